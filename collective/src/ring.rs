//! The CPU collective: a ring over TCP, or over shared memory between ranks on one host.
//!
//! All-reduce is the bandwidth-optimal ring algorithm (reduce-scatter, then all-gather): each
//! rank sends and receives 2(n−1)/n of the buffer, whatever n is. Every step sends one chunk to
//! the next rank while receiving one from the previous rank on another thread, so both
//! directions of every link are busy. Sockets carry read and write timeouts: a peer that died
//! closes its sockets (noticed at once), a peer that stalls is noticed when the timeout expires,
//! and either way the collective fails with [`Error::PeerLost`] instead of hanging.
//!
//! Once the TCP ring is formed, each rank offers its next rank a shared-memory link
//! ([`crate::shm`]); a rank that can open it (the same host, the same `/dev/shm`) takes it, and
//! the bytes of that link then bypass the kernel. Links between hosts stay TCP.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crate::auth::{self, GangSecret};
use crate::rendezvous::RendezvousClient;
use crate::shm::{self, Offer, ShmReader, ShmWriter};
use crate::{Error, Result};

/// How ranks on the same host reach each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Shared memory where both ranks of a link can open the same `/dev/shm` file, TCP
    /// elsewhere (the default).
    SharedMemoryWhereLocal,
    /// TCP on every link (`RADFM_RING_TRANSPORT=tcp`).
    Tcp,
}

/// The variable that picks the [`Transport`].
pub const TRANSPORT_VAR: &str = "RADFM_RING_TRANSPORT";

impl Transport {
    /// From [`TRANSPORT_VAR`]: `tcp`, or anything else for the default.
    pub fn from_env() -> Transport {
        match std::env::var(TRANSPORT_VAR).as_deref() {
            Ok("tcp") => Transport::Tcp,
            _ => Transport::SharedMemoryWhereLocal,
        }
    }
}

/// The link to the next rank.
enum Tx {
    Tcp(TcpStream),
    Shm(ShmWriter),
}

/// The link from the previous rank.
enum Rx {
    Tcp(TcpStream),
    Shm(ShmReader),
}

impl Write for Tx {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Tx::Tcp(s) => s.write(buf),
            Tx::Shm(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Tx::Tcp(s) => s.flush(),
            Tx::Shm(s) => s.flush(),
        }
    }
}

impl Read for Rx {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Rx::Tcp(s) => s.read(buf),
            Rx::Shm(s) => s.read(buf),
        }
    }
}

/// Offers the next rank a shared-memory link and answers the previous rank's offer.
fn negotiate(
    mut next: TcpStream,
    mut prev: TcpStream,
    transport: Transport,
    timeout: Duration,
) -> std::io::Result<(Tx, Rx)> {
    let offer = match transport {
        Transport::SharedMemoryWhereLocal => Offer::create(),
        Transport::Tcp => None,
    };
    // Both messages are a few bytes: they fit in the socket buffers, so no rank blocks here on
    // one that is still writing.
    next.write_all(&Offer::message(offer.as_ref()))?;
    let reader = shm::accept(&mut prev, timeout)?;
    prev.write_all(&[u8::from(reader.is_some())])?;
    let mut answer = [0u8; 1];
    next.read_exact(&mut answer)?;
    let writer = match offer {
        Some(o) => o.settle(answer[0] == 1, next.try_clone()?, timeout),
        None => None,
    };
    let tx = writer.map_or(Tx::Tcp(next), Tx::Shm);
    let rx = reader.map_or(Rx::Tcp(prev), Rx::Shm);
    Ok((tx, rx))
}

/// Receives `inp.len()` values in pieces of 4 MiB; with `reduce`, each piece goes through
/// `scratch` and is added into `inp` as soon as it arrives.
fn receive_pieces(
    prev: &mut Rx,
    inp: &mut [f32],
    reduce: bool,
    scratch: &mut [f32],
) -> std::io::Result<()> {
    const PIECE: usize = 1 << 20;
    for piece in inp.chunks_mut(PIECE) {
        if !reduce {
            prev.read_exact(bytemuck::cast_slice_mut(piece))?;
            continue;
        }
        let buf = &mut scratch[..piece.len()];
        prev.read_exact(bytemuck::cast_slice_mut(buf))?;
        for (d, x) in piece.iter_mut().zip(buf.iter()) {
            *d += *x;
        }
    }
    Ok(())
}

/// A ring of `world` ranks.
pub struct Ring {
    rank: usize,
    world: usize,
    next: Option<Tx>,
    prev: Option<Rx>,
    scratch: Vec<f32>,
}

fn lost(rank: usize, peer: usize, what: &str, e: impl std::fmt::Display) -> Error {
    Error::PeerLost {
        rank,
        reason: format!("{what} with rank {peer}: {e}"),
    }
}

/// Two non-overlapping ranges of `data`: one to read, one to write.
fn disjoint(
    data: &mut [f32],
    read: std::ops::Range<usize>,
    write: std::ops::Range<usize>,
) -> (&[f32], &mut [f32]) {
    if read.end <= write.start {
        let (a, b) = data.split_at_mut(write.start);
        (&a[read], &mut b[..write.len()])
    } else {
        // Chunks never overlap, so the write range ends where the read range starts or before.
        let (a, b) = data.split_at_mut(write.end);
        (
            &b[read.start - write.end..read.end - write.end],
            &mut a[write],
        )
    }
}

/// Time a connection to a rank's ring listener has to prove it is the previous rank.
const LINK_HANDSHAKE: Duration = Duration::from_secs(5);

/// One rank's side of the ring handshake.
#[derive(Clone)]
struct Link {
    secret: Option<GangSecret>,
    attempt: i32,
    rank: usize,
    world: usize,
}

impl Link {
    fn proof(&self, role: &str, rank: usize, ours: &[u8], theirs: &[u8]) -> [u8; 32] {
        self.secret.as_ref().map_or([0; 32], |s| {
            s.proof(role, self.attempt, Some(rank), ours, theirs)
        })
    }

    fn proven(&self, proof: &[u8], role: &str, rank: usize, ours: &[u8], theirs: &[u8]) -> bool {
        self.secret
            .as_ref()
            .is_none_or(|s| s.check(proof, role, self.attempt, Some(rank), ours, theirs))
    }

    /// Connects to the next rank and proves we are its previous rank; retries until `deadline`.
    fn connect_next(&self, addr: SocketAddr, deadline: Instant) -> std::io::Result<TcpStream> {
        let next_rank = (self.rank + 1) % self.world;
        loop {
            let tried =
                TcpStream::connect_timeout(&addr, Duration::from_secs(2)).and_then(|mut s| {
                    s.set_read_timeout(Some(LINK_HANDSHAKE))?;
                    let mut theirs = [0u8; auth::NONCE_BYTES];
                    s.read_exact(&mut theirs)?;
                    let ours = auth::nonce();
                    let mut hello = (self.rank as u32).to_le_bytes().to_vec();
                    hello.extend_from_slice(&ours);
                    hello.extend_from_slice(&self.proof("ring-prev", self.rank, &ours, &theirs));
                    s.write_all(&hello)?;
                    let mut proof = [0u8; 32];
                    s.read_exact(&mut proof)?;
                    if !self.proven(&proof, "ring-next", next_rank, &theirs, &ours) {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::PermissionDenied,
                            format!("the listener of rank {next_rank} could not prove membership"),
                        ));
                    }
                    Ok(s)
                });
            match tried {
                Ok(s) => return Ok(s),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Accepts connections until one proves it is the previous rank (strangers are dropped).
    fn accept_prev(&self, listener: &TcpListener, deadline: Instant) -> Result<TcpStream> {
        let prev_rank = (self.rank + self.world - 1) % self.world;
        listener
            .set_nonblocking(true)
            .map_err(|e| lost(self.rank, prev_rank, "listen", e))?;
        loop {
            match listener.accept() {
                Ok((s, _)) => {
                    if let Ok(s) = self.admit_prev(s, prev_rank) {
                        return Ok(s);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(lost(self.rank, prev_rank, "accept", "timed out"));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(lost(self.rank, prev_rank, "accept", e)),
            }
        }
    }

    fn admit_prev(&self, mut s: TcpStream, prev_rank: usize) -> std::io::Result<TcpStream> {
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(LINK_HANDSHAKE))?;
        s.set_write_timeout(Some(LINK_HANDSHAKE))?;
        let ours = auth::nonce();
        s.write_all(&ours)?;
        let mut hello = [0u8; 4 + auth::NONCE_BYTES + 32];
        s.read_exact(&mut hello)?;
        let who = u32::from_le_bytes(hello[..4].try_into().expect("4 bytes")) as usize;
        let theirs = &hello[4..4 + auth::NONCE_BYTES];
        let proof = &hello[4 + auth::NONCE_BYTES..];
        if who != prev_rank || !self.proven(proof, "ring-prev", prev_rank, theirs, &ours) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "not the previous rank of this gang",
            ));
        }
        s.write_all(&self.proof("ring-next", self.rank, &ours, theirs))?;
        Ok(s)
    }
}

impl Ring {
    /// Joins the ring: publishes this rank's listening address with the rendezvous server,
    /// connects to the next rank and accepts the previous one, each within the rendezvous
    /// client's join timeout; the links then carry read and write timeouts of `timeout`. Both links
    /// start with the membership proof of [`crate::auth`] (with the gang's secret, bound to the
    /// attempt and both ranks): a connection that cannot prove it is the previous rank is dropped
    /// and the rank keeps waiting for the real one.
    pub fn connect(
        rendezvous: &mut RendezvousClient,
        rank: usize,
        world: usize,
        timeout: Duration,
    ) -> Result<Ring> {
        Self::connect_over(rendezvous, rank, world, timeout, Transport::from_env())
    }

    /// [`Ring::connect`] with the transport given.
    pub fn connect_over(
        rendezvous: &mut RendezvousClient,
        rank: usize,
        world: usize,
        timeout: Duration,
        transport: Transport,
    ) -> Result<Ring> {
        if world == 1 {
            return Ok(Ring {
                rank,
                world,
                next: None,
                prev: None,
                scratch: Vec::new(),
            });
        }
        let (next_rank, prev_rank) = ((rank + 1) % world, (rank + world - 1) % world);
        let listener = TcpListener::bind((rendezvous.local_ip, 0))
            .map_err(|e| lost(rank, prev_rank, "listen", e))?;
        let me = listener
            .local_addr()
            .map_err(|e| lost(rank, prev_rank, "listen", e))?;
        rendezvous.set(&format!("ring/{rank}"), me.to_string().as_bytes())?;
        let next_addr: SocketAddr =
            String::from_utf8_lossy(&rendezvous.get(&format!("ring/{next_rank}"))?)
                .parse()
                .map_err(|e| lost(rank, next_rank, "address", e))?;
        let link = Link {
            secret: rendezvous.secret.clone(),
            attempt: rendezvous.attempt,
            rank,
            world,
        };
        let deadline = Instant::now() + rendezvous.timeout();
        let to_next = link.clone();
        let connector = std::thread::spawn(move || to_next.connect_next(next_addr, deadline));
        let prev = link.accept_prev(&listener, deadline)?;
        let next = connector
            .join()
            .map_err(|_| lost(rank, next_rank, "connect", "connector thread panicked"))?
            .map_err(|e| lost(rank, next_rank, "connect", e))?;
        for s in [&next, &prev] {
            s.set_nodelay(true)
                .map_err(|e| lost(rank, prev_rank, "socket", e))?;
            s.set_read_timeout(Some(timeout))
                .map_err(|e| lost(rank, prev_rank, "socket", e))?;
            s.set_write_timeout(Some(timeout))
                .map_err(|e| lost(rank, prev_rank, "socket", e))?;
        }
        let (next, prev) = negotiate(next, prev, transport, timeout)
            .map_err(|e| lost(rank, next_rank, "link", e))?;
        Ok(Ring {
            rank,
            world,
            next: Some(next),
            prev: Some(prev),
            scratch: Vec::new(),
        })
    }

    /// Whether this rank's links to its neighbours are shared memory (to next, from previous).
    pub fn shared_memory_links(&self) -> (bool, bool) {
        (
            matches!(self.next, Some(Tx::Shm(_))),
            matches!(self.prev, Some(Rx::Shm(_))),
        )
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Ranks in the ring.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Sends `out` to the next rank while receiving `inp.len()` values from the previous rank;
    /// with `reduce`, what arrives is added into `inp` as it arrives, overlapping the reduction
    /// with the transfer of the rest.
    fn exchange(
        &mut self,
        out: &[f32],
        inp: &mut [f32],
        reduce: bool,
        scratch: &mut [f32],
    ) -> Result<()> {
        let (rank, world) = (self.rank, self.world);
        let next = self.next.as_mut().expect("a ring of 2+ ranks");
        let prev = self.prev.as_mut().expect("a ring of 2+ ranks");
        std::thread::scope(|s| {
            let sender = s.spawn(|| next.write_all(bytemuck::cast_slice(out)));
            let received = match (prev, reduce) {
                (Rx::Shm(shm), true) => shm.read_add(inp),
                (prev, _) => receive_pieces(prev, inp, reduce, scratch),
            };
            let sent = sender.join().expect("sender thread");
            sent.map_err(|e| lost(rank, (rank + 1) % world, "send", e))?;
            received.map_err(|e| lost(rank, (rank + world - 1) % world, "receive", e))
        })
    }

    /// Sums `data` over all ranks, in place (every rank ends with the same sum).
    pub fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<()> {
        let n = self.world;
        if n == 1 || data.is_empty() {
            return Ok(());
        }
        let len = data.len();
        let bounds = |i: usize| i * len / n..(i + 1) * len / n;
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.resize((1 << 20).min(len), 0.0);
        // Reduce-scatter: after n-1 steps rank r holds the full sum of chunk (r+1) mod n.
        // All-gather: then the reduced chunks travel once around the ring.
        for (phase, reduce) in [(0, true), (1, false)] {
            for step in 0..n - 1 {
                let send = (self.rank + n + phase - step) % n;
                let recv = (self.rank + n + phase - step - 1) % n;
                let (out, inp) = disjoint(data, bounds(send), bounds(recv));
                let r = self.exchange(out, inp, reduce, &mut scratch);
                if r.is_err() {
                    self.scratch = scratch;
                    return r;
                }
            }
        }
        self.scratch = scratch;
        Ok(())
    }

    /// Gathers every rank's `local` (the same length on every rank) into `out`, in rank order:
    /// `out[r * local.len()..]` holds rank r's values on every rank. Each chunk travels once
    /// around the ring.
    pub fn all_gather(&mut self, local: &[f32], out: &mut [f32]) -> Result<()> {
        let (n, len) = (self.world, local.len());
        if out.len() != n * len {
            return Err(Error::Shape(format!(
                "all-gather of {len} values from each of {n} ranks needs {} slots, got {}",
                n * len,
                out.len()
            )));
        }
        out[self.rank * len..(self.rank + 1) * len].copy_from_slice(local);
        if n == 1 || len == 0 {
            return Ok(());
        }
        let bounds = |i: usize| i * len..(i + 1) * len;
        for step in 0..n - 1 {
            let send = (self.rank + n - step) % n;
            let recv = (self.rank + n - step - 1) % n;
            let (o, i) = disjoint(out, bounds(send), bounds(recv));
            self.exchange(o, i, false, &mut [])?;
        }
        Ok(())
    }

    /// Copies `root`'s `data` to every rank (forwarded around the ring in 1 MiB pieces).
    pub fn broadcast(&mut self, data: &mut [f32], root: usize) -> Result<()> {
        let n = self.world;
        if n == 1 || data.is_empty() {
            return Ok(());
        }
        let (rank, last) = (self.rank, (root + n - 1) % n);
        const PIECE: usize = 1 << 18;
        for piece in data.chunks_mut(PIECE) {
            if rank != root {
                self.prev
                    .as_mut()
                    .expect("ring")
                    .read_exact(bytemuck::cast_slice_mut(piece))
                    .map_err(|e| lost(rank, (rank + n - 1) % n, "receive", e))?;
            }
            if rank != last {
                self.next
                    .as_mut()
                    .expect("ring")
                    .write_all(bytemuck::cast_slice(piece))
                    .map_err(|e| lost(rank, (rank + 1) % n, "send", e))?;
            }
        }
        Ok(())
    }

    /// Returns once every rank has called it.
    pub fn barrier(&mut self) -> Result<()> {
        self.all_reduce_sum(&mut [0.0]).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rendezvous::{RendezvousClient, RendezvousServer};

    fn rings(world: usize, timeout: Duration) -> Vec<std::thread::JoinHandle<Ring>> {
        rings_over(world, timeout, Transport::SharedMemoryWhereLocal)
    }

    fn rings_over(
        world: usize,
        timeout: Duration,
        transport: Transport,
    ) -> Vec<std::thread::JoinHandle<Ring>> {
        let secret = GangSecret::generate();
        let server = RendezvousServer::start("127.0.0.1:0", Some(secret.clone()), 1).unwrap();
        let addr = server.addr.to_string();
        (0..world)
            .map(|rank| {
                let (addr, secret) = (addr.clone(), secret.clone());
                std::thread::spawn(move || {
                    let mut c =
                        RendezvousClient::connect(&addr, 1, Duration::from_secs(10), Some(secret))
                            .unwrap();
                    Ring::connect_over(&mut c, rank, world, timeout, transport).unwrap()
                })
            })
            .collect()
    }

    #[test]
    fn all_reduce_sums_every_element_for_any_world_length_and_transport() {
        for (world, transport) in [2, 3, 4]
            .into_iter()
            .flat_map(|w| [(w, Transport::SharedMemoryWhereLocal), (w, Transport::Tcp)])
        {
            // 3,000,017 floats: 12 MiB, more than a shared-memory link holds at once.
            let large = if transport == Transport::Tcp {
                1
            } else {
                3_000_017
            };
            for len in [1, 5, 1000, 65_537, large] {
                let handles: Vec<_> = rings_over(world, Duration::from_secs(10), transport)
                    .into_iter()
                    .enumerate()
                    .map(|(rank, h)| {
                        std::thread::spawn(move || {
                            let mut ring = h.join().unwrap();
                            let mut v: Vec<f32> =
                                (0..len).map(|i| (i % 4096 * (rank + 1)) as f32).collect();
                            ring.all_reduce_sum(&mut v).unwrap();
                            let mut b = if rank == 1 {
                                vec![7.0; 3]
                            } else {
                                vec![0.0; 3]
                            };
                            ring.broadcast(&mut b, 1).unwrap();
                            ring.barrier().unwrap();
                            let shm = transport == Transport::SharedMemoryWhereLocal;
                            assert_eq!(ring.shared_memory_links(), (shm, shm));
                            (v, b)
                        })
                    })
                    .collect();
                let total: usize = (1..=world).sum();
                for h in handles {
                    let (v, b) = h.join().unwrap();
                    for (i, x) in v.iter().enumerate() {
                        assert_eq!(
                            *x,
                            (i % 4096 * total) as f32,
                            "world {world} len {len} at {i}"
                        );
                    }
                    assert_eq!(b, [7.0; 3]);
                }
            }
        }
    }

    #[test]
    fn all_gather_puts_every_ranks_values_in_rank_order_on_every_rank() {
        for world in [1, 2, 3, 4] {
            for len in [0, 1, 7, 300_001] {
                let handles: Vec<_> = rings(world, Duration::from_secs(10))
                    .into_iter()
                    .enumerate()
                    .map(|(rank, h)| {
                        std::thread::spawn(move || {
                            let mut ring = h.join().unwrap();
                            let local: Vec<f32> =
                                (0..len).map(|i| (rank * 1_000_000 + i) as f32).collect();
                            let mut out = vec![-1.0; world * len];
                            ring.all_gather(&local, &mut out).unwrap();
                            let short = ring.all_gather(&local, &mut vec![0.0; world * len + 1]);
                            (out, short.unwrap_err().to_string())
                        })
                    })
                    .collect();
                for h in handles {
                    let (out, short) = h.join().unwrap();
                    for (k, x) in out.iter().enumerate() {
                        let (r, i) = (k / len.max(1), k % len.max(1));
                        assert_eq!(*x, (r * 1_000_000 + i) as f32, "world {world} len {len}");
                    }
                    assert!(short.contains("needs"), "{short}");
                }
            }
        }
    }

    #[test]
    fn a_dead_peer_fails_the_collective_instead_of_hanging() {
        for transport in [Transport::SharedMemoryWhereLocal, Transport::Tcp] {
            let mut handles = rings_over(3, Duration::from_secs(2), transport);
            let dead = handles.pop().unwrap().join().unwrap();
            drop(dead);
            let t = Instant::now();
            let errs: Vec<Error> = handles
                .into_iter()
                .map(|h| {
                    std::thread::spawn(move || {
                        let mut r = h.join().unwrap();
                        // Over shared memory, more than a link holds: the writer must notice
                        // the dead reader too.
                        let len = match transport {
                            Transport::Tcp => 1000,
                            Transport::SharedMemoryWhereLocal => 9_000_000,
                        };
                        r.all_reduce_sum(&mut vec![1.0; len]).unwrap_err()
                    })
                })
                .map(|h| h.join().unwrap())
                .collect();
            assert!(t.elapsed() < Duration::from_secs(10), "{transport:?}");
            for e in errs {
                assert!(matches!(e, Error::PeerLost { .. }), "{transport:?}: {e}");
            }
        }
    }

    /// A stranger reaches rank 1's ring port first and claims to be rank 0: it is dropped and the
    /// real rank 0 joins; the all-reduce is exact.
    #[test]
    fn a_stranger_on_a_ring_port_is_dropped_and_the_ring_forms() {
        let secret = GangSecret::generate();
        let server = RendezvousServer::start("127.0.0.1:0", Some(secret.clone()), 1).unwrap();
        let addr = server.addr.to_string();
        let t = Duration::from_secs(10);
        let spawn = |rank: usize, delay: Duration| {
            let (addr, secret) = (addr.clone(), secret.clone());
            std::thread::spawn(move || {
                std::thread::sleep(delay);
                let mut c = RendezvousClient::connect(&addr, 1, t, Some(secret)).unwrap();
                let mut ring = Ring::connect(&mut c, rank, 2, t).unwrap();
                let mut v = vec![rank as f32 + 1.0; 4];
                ring.all_reduce_sum(&mut v).unwrap();
                v
            })
        };
        let one = spawn(1, Duration::ZERO);
        let mut spy = RendezvousClient::connect(&addr, 1, t, Some(secret.clone())).unwrap();
        let port = String::from_utf8(spy.get("ring/1").unwrap()).unwrap();
        let mut stranger = TcpStream::connect(&port).unwrap();
        let mut claim = 0u32.to_le_bytes().to_vec();
        claim.extend_from_slice(&[7u8; auth::NONCE_BYTES + 32]);
        let _ = stranger.write_all(&claim);
        let zero = spawn(0, Duration::from_millis(300));
        assert_eq!(one.join().unwrap(), [3.0; 4]);
        assert_eq!(zero.join().unwrap(), [3.0; 4]);
    }
}
