//! Shared-memory links for ranks on the same host.
//!
//! Over loopback TCP every byte is copied into the kernel and out again, with a system call per
//! socket buffer; on a machine whose ranks share few cores that copying is what an all-reduce
//! costs. A link between two ranks that can open the same `/dev/shm` file (local ranks in one
//! pod, or processes on one machine) is instead a single-producer, single-consumer byte ring in
//! a shared mapping, as NCCL's and MPI's shared-memory transports are: the writer copies in, the
//! reader copies out, and a futex word on each side wakes the other.
//!
//! The ring's TCP connection stays open beside it: the link is offered over it (a file name and
//! a random token the file must hold), and while a side waits, a closed connection means its
//! peer died. The file is unlinked as soon as both sides have mapped it, so nothing is left
//! behind. Positions read from the mapping are checked, since the peer writes them.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Bytes of the data ring of one link.
const CAPACITY: usize = 8 << 20;
/// The header: token, the writer's position, the reader's position and the two futex words,
/// each on its own cache line.
const HEADER: usize = 4096;
const TOKEN: usize = 32;
const HEAD: usize = 64;
const TAIL: usize = 128;
const DATA_SEQ: usize = 192;
const SPACE_SEQ: usize = 256;
/// Where the files live, and what their names start with.
const PREFIX: &str = "/dev/shm/radfm-ring-";
/// How often a waiting side looks at the TCP connection for a dead peer.
const LIVENESS: Duration = Duration::from_millis(50);

/// A shared mapping of one link's file.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; all shared state in it is accessed through atomics
// and each side copies only the part of the data ring the positions give it.
unsafe impl Send for Mapping {}

impl Mapping {
    fn of(file: &std::fs::File, len: usize) -> std::io::Result<Mapping> {
        // SAFETY: a fresh shared mapping of a file of at least `len` bytes (checked by callers).
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: ptr.cast(),
            len,
        })
    }

    fn u64_at(&self, offset: usize) -> &AtomicU64 {
        // SAFETY: offsets are 64-byte aligned inside the header of a page-aligned mapping.
        unsafe { &*self.ptr.add(offset).cast::<AtomicU64>() }
    }

    fn u32_at(&self, offset: usize) -> &AtomicU32 {
        // SAFETY: as for u64_at.
        unsafe { &*self.ptr.add(offset).cast::<AtomicU32>() }
    }

    fn token(&self) -> &[u8] {
        // SAFETY: the first TOKEN bytes of the mapping.
        unsafe { std::slice::from_raw_parts(self.ptr, TOKEN) }
    }

    fn data(&self) -> *mut u8 {
        // SAFETY: HEADER < len.
        unsafe { self.ptr.add(HEADER) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping what `of` mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: a FUTEX_WAIT on a live u32 in a shared mapping (not PRIVATE: the other side is
    // another process); spurious returns are handled by the caller's loop.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0,
        );
    }
}

fn futex_wake(word: &AtomicU32) {
    // SAFETY: a FUTEX_WAKE on a live u32 in a shared mapping.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0,
        );
    }
}

/// Whether the peer closed the TCP connection (it exited or dropped the ring).
fn peer_closed(tcp: &TcpStream) -> bool {
    let mut byte = 0u8;
    // SAFETY: a non-blocking peek of at most one byte into `byte`.
    let n = unsafe {
        libc::recv(
            tcp.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n == 0
}

/// One side of a link: the mapping, the TCP connection beside it and the collective's timeout.
struct Side {
    map: Mapping,
    tcp: TcpStream,
    timeout: Duration,
    end: End,
}

/// Which end of the data ring a side is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Moves `HEAD`; waits for space on `SPACE_SEQ` and wakes the reader on `DATA_SEQ`.
    Writer,
    /// Moves `TAIL`; waits for data on `DATA_SEQ` and wakes the writer on `SPACE_SEQ`.
    Reader,
}

impl End {
    /// This end's position, the futex word it waits on and the one it wakes.
    fn words(self) -> (usize, usize, usize) {
        match self {
            End::Writer => (HEAD, SPACE_SEQ, DATA_SEQ),
            End::Reader => (TAIL, DATA_SEQ, SPACE_SEQ),
        }
    }
}

impl Side {
    /// Waits until `word` is no longer `seen`; fails when the peer closed its connection or
    /// nothing happened for the timeout.
    fn wait(&self, word: usize, seen: u32) -> std::io::Result<()> {
        let start = Instant::now();
        let word = self.map.u32_at(word);
        while word.load(Ordering::Acquire) == seen {
            if peer_closed(&self.tcp) {
                return Err(std::io::ErrorKind::ConnectionAborted.into());
            }
            if start.elapsed() >= self.timeout {
                return Err(std::io::ErrorKind::TimedOut.into());
            }
            futex_wait(word, seen, LIVENESS);
        }
        Ok(())
    }

    /// Waits until this side can move, and returns its position and how many bytes it may
    /// take: free space for the writer, published bytes for the reader.
    fn ready(&self) -> std::io::Result<(u64, usize)> {
        let (_, waits_on, _) = self.end.words();
        loop {
            // The word before the positions: a move after this load changes the word, so the
            // wait below cannot miss it.
            let seen = self.map.u32_at(waits_on).load(Ordering::Acquire);
            let (head, tail, used) = self.used()?;
            let (at, n) = match self.end {
                End::Writer => (head, CAPACITY - used),
                End::Reader => (tail, used),
            };
            if n > 0 {
                return Ok((at, n));
            }
            self.wait(waits_on, seen)?;
        }
    }

    /// Moves this side's position from `at` by `n` bytes and wakes the other side.
    fn advance(&self, at: u64, n: usize) {
        let (position, _, wakes) = self.end.words();
        self.map
            .u64_at(position)
            .store(at.wrapping_add(n as u64), Ordering::Release);
        self.map.u32_at(wakes).fetch_add(1, Ordering::Release);
        futex_wake(self.map.u32_at(wakes));
    }

    /// The `n` bytes of the data ring from position `pos` on, as the two slices they wrap into
    /// (the second empty unless they wrap).
    ///
    /// # Safety
    /// `n` is at most what [`Side::used`] leaves this side: free space for the writer, published
    /// bytes for the reader. The other side does not touch those bytes until this side advances
    /// past them.
    unsafe fn span(&mut self, pos: u64, n: usize) -> [&mut [u8]; 2] {
        let at = (pos % CAPACITY as u64) as usize;
        let first = n.min(CAPACITY - at);
        // SAFETY: [at, at+first) and [0, n-first) lie in the data ring; the caller owns them.
        unsafe {
            [
                std::slice::from_raw_parts_mut(self.map.data().add(at), first),
                std::slice::from_raw_parts_mut(self.map.data(), n - first),
            ]
        }
    }

    /// The bytes in the ring, checked: a peer cannot make a side read or write out of bounds.
    fn used(&self) -> std::io::Result<(u64, u64, usize)> {
        let head = self.map.u64_at(HEAD).load(Ordering::Acquire);
        let tail = self.map.u64_at(TAIL).load(Ordering::Acquire);
        let used = head.wrapping_sub(tail);
        if used > CAPACITY as u64 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("shared-memory link positions {head} and {tail} are inconsistent"),
            ));
        }
        Ok((head, tail, used as usize))
    }
}

/// The writing side of a link (to the next rank).
pub(crate) struct ShmWriter(Side);

/// The reading side of a link (from the previous rank).
pub(crate) struct ShmReader(Side);

impl Write for ShmWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let s = &mut self.0;
        let (head, free) = s.ready()?;
        let n = free.min(buf.len());
        // SAFETY: n bytes of free space, which the reader leaves alone until `head` moves past
        // them.
        let [a, b] = unsafe { s.span(head, n) };
        let (x, y) = buf[..n].split_at(a.len());
        a.copy_from_slice(x);
        b.copy_from_slice(y);
        s.advance(head, n);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Read for ShmReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let s = &mut self.0;
        let (tail, published) = s.ready()?;
        let n = published.min(buf.len());
        // SAFETY: n published bytes, which the writer does not overwrite until `tail` moves
        // past them.
        let [a, b] = unsafe { s.span(tail, n) };
        let (x, y) = buf[..n].split_at_mut(a.len());
        x.copy_from_slice(a);
        y.copy_from_slice(b);
        s.advance(tail, n);
        Ok(n)
    }
}

/// Removes the link's file when dropped: once both sides mapped it, or when the offer fails.
struct Unlink(String);

impl Drop for Unlink {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl ShmReader {
    /// Receives `dst.len()` floats and adds them into `dst`, straight from the shared ring (no
    /// copy into a scratch buffer first), as they arrive.
    pub(crate) fn read_add(&mut self, dst: &mut [f32]) -> std::io::Result<()> {
        let s = &mut self.0;
        let mut done = 0;
        while done < dst.len() {
            let (tail, published) = s.ready()?;
            if tail % 4 != 0 || published % 4 != 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "shared-memory link is not at a whole float",
                ));
            }
            let n = (published / 4).min(dst.len() - done);
            let bytes = 4 * n;
            // SAFETY: 4n published bytes, which the writer does not overwrite until `tail`
            // moves past them. The data ring starts page-aligned and both slices start at a
            // whole float (checked above), so they cast to floats.
            let [a, b] = unsafe { s.span(tail, bytes) };
            let (a, b): (&[f32], &[f32]) = (bytemuck::cast_slice(a), bytemuck::cast_slice(b));
            for (d, x) in dst[done..done + n].iter_mut().zip(a.iter().chain(b)) {
                *d += *x;
            }
            done += n;
            s.advance(tail, bytes);
        }
        Ok(())
    }
}

/// A link offered to the next rank: the file's name and token travel over the TCP connection.
pub(crate) struct Offer {
    file: Unlink,
    map: Mapping,
}

impl Offer {
    /// Creates the file and its mapping; None where this host has no `/dev/shm`.
    pub(crate) fn create() -> Option<Offer> {
        let name = format!("{PREFIX}{}", hex::encode(rand::random::<[u8; 16]>()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&name)
            .ok()?;
        let len = HEADER + CAPACITY;
        let made = file
            .set_len(len as u64)
            .and_then(|()| Mapping::of(&file, len));
        let file = Unlink(name);
        let map = made.ok()?;
        let token: [u8; TOKEN] = rand::random();
        // SAFETY: the first TOKEN bytes of a mapping nobody else has yet.
        unsafe { std::ptr::copy_nonoverlapping(token.as_ptr(), map.ptr, TOKEN) };
        Some(Offer { file, map })
    }

    /// The offer as sent: name length, name, token.
    pub(crate) fn message(offer: Option<&Offer>) -> Vec<u8> {
        let Some(o) = offer else {
            return vec![0];
        };
        let name = o.file.0.as_bytes();
        let mut m = vec![name.len() as u8];
        m.extend_from_slice(name);
        m.extend_from_slice(o.map.token());
        m
    }

    /// The writing side, once the next rank accepted; the file is unlinked either way.
    pub(crate) fn settle(
        self,
        accepted: bool,
        tcp: TcpStream,
        timeout: Duration,
    ) -> Option<ShmWriter> {
        let Offer { file, map } = self;
        drop(file);
        accepted.then(|| {
            ShmWriter(Side {
                map,
                tcp,
                timeout,
                end: End::Writer,
            })
        })
    }
}

/// Reads the previous rank's offer from `tcp` and maps its file when this host has it with the
/// token; None (the link stays TCP) otherwise.
pub(crate) fn accept(tcp: &mut TcpStream, timeout: Duration) -> std::io::Result<Option<ShmReader>> {
    let mut len = [0u8; 1];
    tcp.read_exact(&mut len)?;
    if len[0] == 0 {
        return Ok(None);
    }
    let mut name = vec![0u8; len[0] as usize];
    tcp.read_exact(&mut name)?;
    let mut token = [0u8; TOKEN];
    tcp.read_exact(&mut token)?;
    let Ok(name) = String::from_utf8(name) else {
        return Ok(None);
    };
    let hex_part = name.strip_prefix(PREFIX).unwrap_or_default();
    if hex_part.len() != 32 || !hex_part.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(None);
    }
    let Ok(file) = OpenOptions::new().read(true).write(true).open(&name) else {
        return Ok(None);
    };
    let len = HEADER + CAPACITY;
    if file.metadata().map(|m| m.len()).unwrap_or(0) != len as u64 {
        return Ok(None);
    }
    let Ok(map) = Mapping::of(&file, len) else {
        return Ok(None);
    };
    if map.token() != token {
        return Ok(None);
    }
    let tcp = tcp.try_clone()?;
    Ok(Some(ShmReader(Side {
        map,
        tcp,
        timeout,
        end: End::Reader,
    })))
}
