//! The rendezvous server: a small TCP key-value server run by global rank 0.
//!
//! Ranks find each other through it (ring addresses, the NCCL unique id) and meet at barriers.
//! Every key is prefixed with the gang attempt, so a straggler of attempt n can never read or
//! satisfy a key of attempt n+1. Every operation has a deadline: a rank waiting for a peer that
//! died gets an error naming the key instead of hanging.
//!
//! Only members talk to it: every connection starts with the mutual challenge–response of
//! [`crate::auth`] (when the gang has a secret), and nothing is read or written before it
//! succeeds. The server bounds what a hostile peer can cost: lines of at most [`MAX_LINE`] bytes,
//! at most [`MAX_KEYS`] keys, [`MAX_CONNECTIONS`] connections of which [`MAX_PENDING`] may be
//! unauthenticated, each with [`HANDSHAKE_DEADLINE`] to prove itself, and waits of at most
//! [`MAX_WAIT`]. Anything malformed gets `ERR` and, before authentication, the connection closed.
//!
//! Wire format: the server greets with `HELLO <nonce>`; the client answers `AUTH <nonce> <proof>`
//! (or `AUTH none` in a gang without a secret) and the server `OK [<proof>]` or `ERR reason`.
//! Then one request per line, `SET key hex` / `GET key` / `ADD key n` / `WAIT key millis`;
//! answers `OK [value]` or `ERR reason`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::auth::{self, GangSecret};
use crate::{Error, Result};

/// Longest request or answer line.
pub const MAX_LINE: usize = 64 * 1024;
/// Most keys the server holds.
pub const MAX_KEYS: usize = 100_000;
/// Most open connections.
pub const MAX_CONNECTIONS: usize = 4096;
/// Most connections that have not proven membership yet.
pub const MAX_PENDING: usize = 64;
/// Time a new connection has to prove membership.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// Longest `WAIT`.
pub const MAX_WAIT: Duration = Duration::from_secs(3600);

#[derive(Default)]
struct State {
    map: HashMap<String, String>,
}

impl State {
    /// Whether `key` is new and there is no room for another key.
    fn full_for(&self, key: &str) -> bool {
        self.map.len() >= MAX_KEYS && !self.map.contains_key(key)
    }
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    secret: Option<GangSecret>,
    attempt: i32,
    open: AtomicUsize,
    pending: AtomicUsize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Counts a connection while it lives.
struct Slot<'a>(&'a AtomicUsize);

impl<'a> Slot<'a> {
    fn take(counter: &'a AtomicUsize, max: usize) -> Option<Slot<'a>> {
        let taken = counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok();
        taken.then_some(Slot(counter))
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The server side, run by rank 0 on a background thread.
pub struct RendezvousServer {
    /// The bound address.
    pub addr: SocketAddr,
}

impl RendezvousServer {
    /// Listens on `addr` (port 0 picks one) and serves the members of `attempt` (those holding
    /// `secret`, when there is one) until the process exits.
    pub fn start(addr: &str, secret: Option<GangSecret>, attempt: i32) -> Result<RendezvousServer> {
        let io = |e| Error::Io {
            path: format!("rendezvous server {addr}"),
            source: e,
        };
        let listener = TcpListener::bind(addr).map_err(io)?;
        let bound = listener.local_addr().map_err(io)?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            secret,
            attempt,
            open: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
        });
        std::thread::Builder::new()
            .name("radfm-rendezvous".into())
            .spawn(move || {
                for conn in listener.incoming().flatten() {
                    let shared = shared.clone();
                    let _ = std::thread::Builder::new()
                        .name("radfm-rendezvous-conn".into())
                        .spawn(move || serve(conn, &shared));
                }
            })
            .map_err(io)?;
        Ok(RendezvousServer { addr: bound })
    }
}

/// Reads one line of at most [`MAX_LINE`] bytes (None: the peer closed).
fn read_line(reader: &mut impl BufRead) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    let n = reader
        .by_ref()
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("line longer than {MAX_LINE} bytes"),
        ));
    }
    buf.pop();
    String::from_utf8(buf)
        .map(Some)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8"))
}

fn serve(conn: TcpStream, shared: &Shared) {
    let Some(_open) = Slot::take(&shared.open, MAX_CONNECTIONS) else {
        return;
    };
    let _ = conn.set_nodelay(true);
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    {
        let Some(_pending) = Slot::take(&shared.pending, MAX_PENDING) else {
            return;
        };
        let _ = reader.get_ref().set_read_timeout(Some(HANDSHAKE_DEADLINE));
        let _ = out.set_write_timeout(Some(HANDSHAKE_DEADLINE));
        if !admit(&mut reader, &mut out, shared) {
            return;
        }
    }
    let _ = reader.get_ref().set_read_timeout(None);
    let _ = out.set_write_timeout(None);
    while let Ok(Some(line)) = read_line(&mut reader) {
        let reply = answer(&line, shared);
        if writeln!(out, "{reply}").is_err() {
            return;
        }
    }
}

/// The server's half of the handshake: true when the peer proved membership.
fn admit(reader: &mut impl BufRead, out: &mut TcpStream, shared: &Shared) -> bool {
    let ours = auth::nonce();
    if writeln!(out, "HELLO {}", hex::encode(ours)).is_err() {
        return false;
    }
    let Ok(Some(line)) = read_line(reader) else {
        return false;
    };
    let parts: Vec<&str> = line.split(' ').collect();
    let reply = match (&shared.secret, parts.as_slice()) {
        (None, ["AUTH", ..]) => Some("OK".to_string()),
        (Some(secret), ["AUTH", theirs, proof]) => {
            let theirs = hex::decode(theirs).unwrap_or_default();
            let proof = hex::decode(proof).unwrap_or_default();
            let member = theirs.len() == auth::NONCE_BYTES
                && secret.check(&proof, "client", shared.attempt, None, &theirs, &ours);
            member.then(|| {
                let mine = secret.proof("server", shared.attempt, None, &ours, &theirs);
                format!("OK {}", hex::encode(mine))
            })
        }
        _ => None,
    };
    match reply {
        Some(ok) => writeln!(out, "{ok}").is_ok(),
        None => {
            let _ = writeln!(out, "ERR not a member of this gang");
            false
        }
    }
}

fn answer(line: &str, shared: &Shared) -> String {
    let parts: Vec<&str> = line.splitn(3, ' ').collect();
    match parts.as_slice() {
        ["SET", key, value] => {
            let mut st = shared.lock();
            if st.full_for(key) {
                return format!("ERR more than {MAX_KEYS} keys");
            }
            st.map.insert(key.to_string(), value.to_string());
            shared.changed.notify_all();
            "OK".to_string()
        }
        ["GET", key] => match shared.lock().map.get(*key) {
            Some(v) => format!("OK {v}"),
            None => "ERR missing".into(),
        },
        ["ADD", key, n] => match n.parse::<i64>() {
            Ok(n) => {
                let mut st = shared.lock();
                if st.full_for(key) {
                    return format!("ERR more than {MAX_KEYS} keys");
                }
                let cur: i64 = st.map.get(*key).and_then(|v| v.parse().ok()).unwrap_or(0);
                let Some(sum) = cur.checked_add(n) else {
                    return "ERR counter overflow".into();
                };
                st.map.insert(key.to_string(), sum.to_string());
                shared.changed.notify_all();
                format!("OK {sum}")
            }
            Err(_) => "ERR bad number".into(),
        },
        ["WAIT", key, millis] => {
            let wait = millis
                .parse::<u64>()
                .map(Duration::from_millis)
                .unwrap_or_default()
                .min(MAX_WAIT);
            let deadline = Instant::now() + wait;
            let mut st = shared.lock();
            loop {
                if let Some(v) = st.map.get(*key) {
                    break format!("OK {v}");
                }
                let now = Instant::now();
                if now >= deadline {
                    break "ERR timeout".into();
                }
                st = shared
                    .changed
                    .wait_timeout(st, deadline - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        _ => "ERR bad request".into(),
    }
}

/// A rank's connection to the rendezvous server.
pub struct RendezvousClient {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    prefix: String,
    timeout: Duration,
    /// The address this rank reaches the rendezvous server from (what peers can reach it by).
    pub local_ip: std::net::IpAddr,
    addr: String,
    /// The gang's secret (the ring proves membership with it too).
    pub secret: Option<GangSecret>,
    /// The gang attempt.
    pub attempt: i32,
}

/// The client's half of the handshake on a fresh connection: Ok(false) when the server closed
/// before greeting (full, or still starting), an error when it refuses or cannot prove itself.
fn handshake(
    reader: &mut BufReader<TcpStream>,
    writer: &mut TcpStream,
    secret: Option<&GangSecret>,
    attempt: i32,
) -> std::result::Result<bool, String> {
    let hello = match read_line(reader) {
        Ok(Some(l)) => l,
        Ok(None) | Err(_) => return Ok(false),
    };
    let theirs = hello
        .strip_prefix("HELLO ")
        .and_then(|n| hex::decode(n).ok())
        .filter(|n| n.len() == auth::NONCE_BYTES)
        .ok_or_else(|| format!("not a rendezvous server (greeted {hello:?})"))?;
    let ours = auth::nonce();
    let auth_line = match secret {
        Some(s) => {
            let proof = s.proof("client", attempt, None, &ours, &theirs);
            format!("AUTH {} {}", hex::encode(ours), hex::encode(proof))
        }
        None => "AUTH none".into(),
    };
    writeln!(writer, "{auth_line}").map_err(|e| e.to_string())?;
    let reply = read_line(reader)
        .map_err(|e| e.to_string())?
        .ok_or("closed during the handshake")?;
    let proof = match reply.strip_prefix("OK") {
        Some(rest) => rest.trim().to_string(),
        None => return Err(format!("refused us: {}", reply.trim_start_matches("ERR "))),
    };
    if let Some(s) = secret {
        let proof = hex::decode(proof).unwrap_or_default();
        if !s.check(&proof, "server", attempt, None, &theirs, &ours) {
            return Err("could not prove it belongs to this gang".into());
        }
    }
    Ok(true)
}

impl RendezvousClient {
    /// Connects to `addr` (retrying until `timeout`: rank 0 may not be up yet) and proves
    /// membership with `secret`; keys are scoped to `attempt`.
    pub fn connect(
        addr: &str,
        attempt: i32,
        timeout: Duration,
        secret: Option<GangSecret>,
    ) -> Result<RendezvousClient> {
        let deadline = Instant::now() + timeout;
        let err = |reason: String| Error::Rendezvous {
            what: format!("rendezvous server {addr}"),
            reason,
        };
        let (stream, reader, writer) = loop {
            let attempt_once = addr
                .to_socket_addrs()
                .map_err(|e| e.to_string())
                .and_then(|mut it| it.next().ok_or_else(|| "no address".to_string()))
                .and_then(|sa| {
                    TcpStream::connect_timeout(&sa, Duration::from_secs(2))
                        .map_err(|e| e.to_string())
                });
            let greeted = attempt_once.and_then(|s| {
                s.set_read_timeout(Some(HANDSHAKE_DEADLINE))
                    .map_err(|e| e.to_string())?;
                let mut writer = s.try_clone().map_err(|e| e.to_string())?;
                let mut reader = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
                match handshake(&mut reader, &mut writer, secret.as_ref(), attempt) {
                    Ok(true) => Ok(Some((s, reader, writer))),
                    Ok(false) => Ok(None),
                    Err(why) => Err(format!("fatal: {why}")),
                }
            });
            match greeted {
                Ok(Some(found)) => break found,
                Err(e) if e.starts_with("fatal: ") => {
                    return Err(err(e.trim_start_matches("fatal: ").to_string()));
                }
                Err(e) if Instant::now() >= deadline => {
                    return Err(err(format!("unreachable for {timeout:?}: {e}")));
                }
                Ok(None) if Instant::now() >= deadline => {
                    return Err(err(format!("no greeting for {timeout:?} (server full?)")));
                }
                _ => std::thread::sleep(Duration::from_millis(200)),
            }
        };
        stream.set_nodelay(true).map_err(|e| err(e.to_string()))?;
        let local_ip = stream.local_addr().map_err(|e| err(e.to_string()))?.ip();
        Ok(RendezvousClient {
            reader,
            writer,
            prefix: format!("a{attempt}/"),
            timeout,
            local_ip,
            addr: addr.to_string(),
            secret,
            attempt,
        })
    }

    fn call(&mut self, req: String, wait: Duration) -> Result<String> {
        let what = req.split(' ').take(2).collect::<Vec<_>>().join(" ");
        let err = |reason: String| Error::Rendezvous {
            what: format!("rendezvous server {} {what}", self.addr),
            reason,
        };
        self.reader
            .get_ref()
            .set_read_timeout(Some(wait + Duration::from_secs(5)))
            .map_err(|e| err(e.to_string()))?;
        writeln!(self.writer, "{req}").map_err(|e| err(e.to_string()))?;
        let line = match read_line(&mut self.reader) {
            Ok(None) => return Err(err("connection closed (rank 0 gone?)".into())),
            Ok(Some(l)) => l,
            Err(e) => return Err(err(e.to_string())),
        };
        let line = line.trim_end();
        match line.strip_prefix("OK") {
            Some(rest) => Ok(rest.trim_start().to_string()),
            None => Err(err(line.trim_start_matches("ERR ").to_string())),
        }
    }

    /// How long joining may wait: connecting, and each key waited for.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sets `key` to `value`.
    pub fn set(&mut self, key: &str, value: &[u8]) -> Result<()> {
        let req = format!("SET {}{key} {}", self.prefix, hex::encode(value));
        self.call(req, Duration::ZERO).map(|_| ())
    }

    /// Waits (up to the rendezvous timeout) for `key` and returns its value.
    pub fn get(&mut self, key: &str) -> Result<Vec<u8>> {
        let t = self.timeout;
        let req = format!("WAIT {}{key} {}", self.prefix, t.as_millis());
        let v = self.call(req, t)?;
        hex::decode(v).map_err(|e| Error::Rendezvous {
            what: key.into(),
            reason: e.to_string(),
        })
    }

    /// Adds `n` to the counter `key`; returns the new value.
    pub fn add(&mut self, key: &str, n: i64) -> Result<i64> {
        let req = format!("ADD {}{key} {n}", self.prefix);
        let v = self.call(req, Duration::ZERO)?;
        v.parse().map_err(|_| Error::Rendezvous {
            what: key.into(),
            reason: format!("bad counter {v:?}"),
        })
    }

    /// Waits until `world` ranks reached barrier `name`.
    pub fn barrier(&mut self, name: &str, world: usize) -> Result<()> {
        let n = self.add(&format!("barrier/{name}/count"), 1)?;
        if n as usize == world {
            self.set(&format!("barrier/{name}/done"), b"1")?;
        }
        self.get(&format!("barrier/{name}/done")).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_exchange_values_and_meet_at_a_barrier() {
        let server = RendezvousServer::start("127.0.0.1:0", None, 1).unwrap();
        let addr = server.addr.to_string();
        let handles: Vec<_> = (0..3)
            .map(|rank| {
                let addr = addr.clone();
                std::thread::spawn(move || {
                    let mut c =
                        RendezvousClient::connect(&addr, 1, Duration::from_secs(5), None).unwrap();
                    c.set(&format!("addr/{rank}"), format!("r{rank}").as_bytes())
                        .unwrap();
                    c.barrier("start", 3).unwrap();
                    let next = (rank + 1) % 3;
                    String::from_utf8(c.get(&format!("addr/{next}")).unwrap()).unwrap()
                })
            })
            .collect();
        let got: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(got, ["r1", "r2", "r0"]);
    }

    #[test]
    fn keys_of_another_attempt_are_invisible_and_waits_time_out() {
        let server = RendezvousServer::start("127.0.0.1:0", None, 1).unwrap();
        let addr = server.addr.to_string();
        let mut old =
            RendezvousClient::connect(&addr, 1, Duration::from_millis(300), None).unwrap();
        old.set("nccl-id", b"stale").unwrap();
        let mut new =
            RendezvousClient::connect(&addr, 2, Duration::from_millis(300), None).unwrap();
        let e = new.get("nccl-id").unwrap_err();
        assert!(e.to_string().contains("timeout"), "{e}");
        assert!(matches!(e, Error::Rendezvous { .. }), "{e}");
    }

    #[test]
    fn an_absent_rendezvous_server_is_reported_after_the_connect_timeout() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let t = Instant::now();
        let e = RendezvousClient::connect(
            &format!("127.0.0.1:{port}"),
            1,
            Duration::from_millis(500),
            None,
        )
        .err()
        .unwrap();
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(e.to_string().contains("unreachable"), "{e}");
    }

    #[test]
    fn only_members_of_this_attempt_are_admitted_and_both_sides_prove_it() {
        let secret = GangSecret::generate();
        let server = RendezvousServer::start("127.0.0.1:0", Some(secret.clone()), 4).unwrap();
        let addr = server.addr.to_string();
        let t = Duration::from_secs(2);
        let mut member = RendezvousClient::connect(&addr, 4, t, Some(secret.clone())).unwrap();
        member.set("nccl-id", b"id").unwrap();
        for (who, attempt, key) in [
            ("no secret", 4, None),
            ("another job", 4, Some(GangSecret::generate())),
            ("an older attempt", 3, Some(secret.clone())),
        ] {
            let e = RendezvousClient::connect(&addr, attempt, t, key)
                .err()
                .unwrap();
            assert!(
                e.to_string().contains("not a member of this gang"),
                "{who}: {e}"
            );
        }
        // A server that does not hold the secret cannot pass as rank 0.
        let impostor =
            RendezvousServer::start("127.0.0.1:0", Some(GangSecret::generate()), 4).unwrap();
        let e = RendezvousClient::connect(&impostor.addr.to_string(), 4, t, Some(secret.clone()))
            .err()
            .unwrap();
        assert!(e.to_string().contains("not a member"), "{e}");
        assert_eq!(member.get("nccl-id").unwrap(), b"id");
    }

    /// A stranger floods connections, sends an oversized line and garbage: members still meet.
    #[test]
    fn hostile_connections_cost_bounded_resources_and_members_still_meet() {
        let secret = GangSecret::generate();
        let server = RendezvousServer::start("127.0.0.1:0", Some(secret.clone()), 1).unwrap();
        let addr = server.addr.to_string();
        let idle: Vec<TcpStream> = (0..MAX_PENDING + 40)
            .filter_map(|_| TcpStream::connect(&addr).ok())
            .collect();
        let mut huge = TcpStream::connect(&addr).unwrap();
        let _ = huge.write_all(&vec![b'A'; MAX_LINE + 10]);
        let mut garbage = TcpStream::connect(&addr).unwrap();
        let _ = garbage.write_all(b"\xff\xfe SET a b\nWAIT x 99999999999\n");
        let started = Instant::now();
        let members: Vec<_> = (0..2)
            .map(|rank| {
                let (addr, secret) = (addr.clone(), secret.clone());
                std::thread::spawn(move || {
                    let mut c =
                        RendezvousClient::connect(&addr, 1, HANDSHAKE_DEADLINE * 3, Some(secret))
                            .unwrap();
                    c.set(&format!("r/{rank}"), b"x").unwrap();
                    c.barrier("start", 2).unwrap();
                })
            })
            .collect();
        for m in members {
            m.join().unwrap();
        }
        assert!(started.elapsed() < HANDSHAKE_DEADLINE * 3);
        drop(idle);
    }
}
