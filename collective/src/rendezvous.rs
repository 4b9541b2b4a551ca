//! The rendezvous server: a small TCP key-value server run by global rank 0.
//!
//! Ranks find each other through it (ring addresses, the NCCL unique id) and meet at barriers.
//! Every key is prefixed with the gang attempt, so a straggler of attempt n can never read or
//! satisfy a key of attempt n+1. Every operation has a deadline: a rank waiting for a peer that
//! died gets an error naming the key instead of hanging.
//!
//! Wire format: one request per line, `SET key hex` / `GET key` / `ADD key n` / `WAIT key
//! millis`; answers `OK [value]` or `ERR reason`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::{Error, Result};

#[derive(Default)]
struct State {
    map: HashMap<String, String>,
}

/// The server side, run by rank 0 on a background thread.
pub struct RendezvousServer {
    /// The bound address.
    pub addr: SocketAddr,
}

impl RendezvousServer {
    /// Listens on `addr` (port 0 picks one) and serves until the process exits.
    pub fn start(addr: &str) -> Result<RendezvousServer> {
        let listener = TcpListener::bind(addr).map_err(|e| Error::Io {
            path: format!("rendezvous server {addr}"),
            source: e,
        })?;
        let bound = listener.local_addr().map_err(|e| Error::Io {
            path: format!("rendezvous server {addr}"),
            source: e,
        })?;
        let shared = Arc::new((Mutex::new(State::default()), Condvar::new()));
        std::thread::Builder::new()
            .name("radfm-rendezvous".into())
            .spawn(move || {
                for conn in listener.incoming().flatten() {
                    let shared = shared.clone();
                    let _ = std::thread::Builder::new()
                        .name("radfm-rendezvous-conn".into())
                        .spawn(move || serve(conn, shared));
                }
            })
            .expect("spawn the rendezvous thread");
        Ok(RendezvousServer { addr: bound })
    }
}

fn serve(conn: TcpStream, shared: Arc<(Mutex<State>, Condvar)>) {
    let _ = conn.set_nodelay(true);
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    let reader = BufReader::new(conn);
    let (lock, cond) = &*shared;
    for line in reader.lines() {
        let Ok(line) = line else { return };
        let parts: Vec<&str> = line.splitn(3, ' ').collect();
        let reply = match parts.as_slice() {
            ["SET", key, value] => {
                lock.lock()
                    .unwrap()
                    .map
                    .insert(key.to_string(), value.to_string());
                cond.notify_all();
                "OK".to_string()
            }
            ["GET", key] => match lock.lock().unwrap().map.get(*key) {
                Some(v) => format!("OK {v}"),
                None => "ERR missing".into(),
            },
            ["ADD", key, n] => match n.parse::<i64>() {
                Ok(n) => {
                    let mut st = lock.lock().unwrap();
                    let cur: i64 = st.map.get(*key).and_then(|v| v.parse().ok()).unwrap_or(0);
                    st.map.insert(key.to_string(), (cur + n).to_string());
                    cond.notify_all();
                    format!("OK {}", cur + n)
                }
                Err(_) => "ERR bad number".into(),
            },
            ["WAIT", key, millis] => {
                let deadline = Instant::now() + Duration::from_millis(millis.parse().unwrap_or(0));
                let mut st = lock.lock().unwrap();
                loop {
                    if let Some(v) = st.map.get(*key) {
                        break format!("OK {v}");
                    }
                    let now = Instant::now();
                    if now >= deadline {
                        break "ERR timeout".into();
                    }
                    st = cond.wait_timeout(st, deadline - now).unwrap().0;
                }
            }
            _ => "ERR bad request".into(),
        };
        if writeln!(out, "{reply}").is_err() {
            return;
        }
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
}

impl RendezvousClient {
    /// Connects to `addr` (retrying until `timeout`: rank 0 may not be up yet); keys are scoped
    /// to `attempt`.
    pub fn connect(addr: &str, attempt: i32, timeout: Duration) -> Result<RendezvousClient> {
        let deadline = Instant::now() + timeout;
        let err = |reason: String| Error::Rendezvous {
            what: format!("rendezvous server {addr}"),
            reason,
        };
        let stream = loop {
            let attempt_once = addr
                .to_socket_addrs()
                .map_err(|e| e.to_string())
                .and_then(|mut it| it.next().ok_or_else(|| "no address".to_string()))
                .and_then(|sa| {
                    TcpStream::connect_timeout(&sa, Duration::from_secs(2))
                        .map_err(|e| e.to_string())
                });
            match attempt_once {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(err(format!("unreachable for {timeout:?}: {e}")));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        };
        stream.set_nodelay(true).map_err(|e| err(e.to_string()))?;
        let local_ip = stream.local_addr().map_err(|e| err(e.to_string()))?.ip();
        let writer = stream.try_clone().map_err(|e| err(e.to_string()))?;
        Ok(RendezvousClient {
            reader: BufReader::new(stream),
            writer,
            prefix: format!("a{attempt}/"),
            timeout,
            local_ip,
            addr: addr.to_string(),
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
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => return Err(err("connection closed (rank 0 gone?)".into())),
            Ok(_) => {}
            Err(e) => return Err(err(e.to_string())),
        }
        let line = line.trim_end();
        match line.strip_prefix("OK") {
            Some(rest) => Ok(rest.trim_start().to_string()),
            None => Err(err(line.trim_start_matches("ERR ").to_string())),
        }
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
        let server = RendezvousServer::start("127.0.0.1:0").unwrap();
        let addr = server.addr.to_string();
        let handles: Vec<_> = (0..3)
            .map(|rank| {
                let addr = addr.clone();
                std::thread::spawn(move || {
                    let mut c =
                        RendezvousClient::connect(&addr, 1, Duration::from_secs(5)).unwrap();
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
        let server = RendezvousServer::start("127.0.0.1:0").unwrap();
        let addr = server.addr.to_string();
        let mut old = RendezvousClient::connect(&addr, 1, Duration::from_millis(300)).unwrap();
        old.set("nccl-id", b"stale").unwrap();
        let mut new = RendezvousClient::connect(&addr, 2, Duration::from_millis(300)).unwrap();
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
        let e =
            RendezvousClient::connect(&format!("127.0.0.1:{port}"), 1, Duration::from_millis(500))
                .err()
                .unwrap();
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(e.to_string().contains("unreachable"), "{e}");
    }
}
