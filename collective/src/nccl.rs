//! The GPU collective: one NCCL communicator over all GPUs of all pods.
//!
//! libnccl and the CUDA driver are loaded at run time (cudarc's dynamic loading), so radfm
//! builds and runs where neither exists; [`probe`] says what is missing instead of letting the
//! first NCCL call panic. Rank 0 draws the unique id and hands it out through the rendezvous
//! rendezvous server, whose keys carry the gang attempt.
//!
//! NCCL's blocking calls wait for peers forever, which is how a dead worker hangs a gang. The
//! communicator is therefore created non-blocking, and every call here has a deadline: the
//! init, each collective's enqueue and its completion on the stream are polled together with
//! the communicator's asynchronous error. On an error or at the deadline the communicator is
//! aborted (releasing kernels that wait for a peer) and the call fails with
//! [`Error::PeerLost`], which the trainer turns into the retryable exit code; later calls fail
//! at once.
//!
//! Buffers are raw device pointers of f32 elements on the current device's legacy default
//! stream (the stream libtorch uses unless told otherwise), so work queued before a collective
//! is finished before NCCL reads the buffer.

use std::ffi::{CStr, c_void};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, result as cu, sys as cusys};
use cudarc::nccl::sys as nc;

use crate::rendezvous::RendezvousClient;
use crate::{Error, Result};

/// Rendezvous key of the communicator's unique id (scoped to the attempt by the rendezvous server).
pub const ID_KEY: &str = "nccl-id";

/// A loaded libnccl's version, as `ncclGetVersion` encodes it (2.29.7 is 22907).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version(pub i32);

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = self.0;
        write!(f, "{}.{}.{}", v / 10000, v % 10000 / 100, v % 100)
    }
}

fn unavailable(reason: impl Into<String>) -> Error {
    Error::Unavailable {
        reason: reason.into(),
    }
}

/// Whether a shared library of this name can be loaded from the library path.
fn loadable(name: &str) -> bool {
    // SAFETY: loading runs the library's initialisers; NCCL's and the CUDA driver's are the
    // ones cudarc would run on first use anyway.
    unsafe { libloading::Library::new(name).is_ok() }
}

/// Whether the CUDA driver library can be loaded here.
pub fn driver_present() -> bool {
    // SAFETY: only tries to load the library.
    unsafe { cusys::is_culib_present() }
}

/// Loads the CUDA driver and libnccl, and returns NCCL's version; an error says which
/// library is missing and how to provide it.
pub fn probe() -> Result<Version> {
    if !driver_present() {
        return Err(unavailable(
            "the CUDA driver (libcuda.so.1) is not on the library path: is this a GPU node with \
             the NVIDIA container runtime?",
        ));
    }
    // SAFETY: only tries to load the library.
    if !unsafe { nc::is_culib_present() } {
        let hint = if loadable("libnccl.so.2") {
            "libnccl.so.2 is there, but cudarc loads libnccl.so: add the symlink \
             libnccl.so -> libnccl.so.2 beside it (PyPI's nvidia-nccl-cu13 ships only .so.2)"
        } else {
            "install NCCL (PyPI nvidia-nccl-cu13 or the CUDA image's libnccl2) and put it on \
             LD_LIBRARY_PATH"
        };
        return Err(unavailable(format!("libnccl.so cannot be loaded: {hint}")));
    }
    let mut v = 0;
    // SAFETY: the library is present (checked above) and `v` outlives the call.
    let r = unsafe { nc::ncclGetVersion(&mut v) };
    if r != nc::ncclResult_t::ncclSuccess {
        return Err(unavailable(format!("ncclGetVersion: {}", describe(r))));
    }
    Ok(Version(v))
}

fn describe(r: nc::ncclResult_t) -> String {
    // SAFETY: ncclGetErrorString returns a static string for every result code.
    let s = unsafe { nc::ncclGetErrorString(r) };
    if s.is_null() {
        format!("{r:?}")
    } else {
        // SAFETY: non-null, NUL-terminated, static.
        let text = unsafe { CStr::from_ptr(s) }.to_string_lossy();
        format!("{r:?} ({text})")
    }
}

/// A non-blocking communicator config, every other field left to NCCL's defaults.
fn config(version: Version) -> nc::ncclConfig_t {
    const UNDEF: i32 = i32::MIN;
    nc::ncclConfig_t {
        size: std::mem::size_of::<nc::ncclConfig_t>(),
        magic: 0xcafe_beef,
        version: version.0 as u32,
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
        graphUsageMode: UNDEF,
        numRmaCtx: UNDEF,
        maxP2pPeers: UNDEF,
    }
}

/// The unique id as bytes for the rendezvous server.
fn id_bytes(id: &nc::ncclUniqueId) -> Vec<u8> {
    id.internal.iter().map(|&c| c as u8).collect()
}

/// The unique id from the rendezvous server's bytes.
fn id_from(bytes: &[u8]) -> Result<nc::ncclUniqueId> {
    let mut id = nc::ncclUniqueId { internal: [0; 128] };
    if bytes.len() != id.internal.len() {
        return Err(Error::Rendezvous {
            what: ID_KEY.into(),
            reason: format!("{} bytes, not an NCCL unique id of 128", bytes.len()),
        });
    }
    for (d, &b) in id.internal.iter_mut().zip(bytes) {
        *d = b as std::ffi::c_char;
    }
    Ok(id)
}

/// One rank's NCCL communicator.
pub struct Nccl {
    comm: nc::ncclComm_t,
    rank: usize,
    world: usize,
    timeout: Duration,
    event: cusys::CUevent,
    ctx: Arc<CudaContext>,
}

// SAFETY: the communicator and the event are handles owned by this value alone; the CUDA
// context is bound to whichever thread uses it (`bind` before each call).
unsafe impl Send for Nccl {}

impl Nccl {
    /// Joins the communicator of `world` ranks on GPU `ordinal` of this machine: rank 0 draws
    /// the unique id and publishes it through the rendezvous server, the others read it; all
    /// within the rendezvous client's join timeout. Each collective then waits up to `timeout`.
    pub fn connect(
        rendezvous: &mut RendezvousClient,
        rank: usize,
        world: usize,
        ordinal: usize,
        timeout: Duration,
    ) -> Result<Nccl> {
        let version = probe()?;
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| unavailable(format!("GPU {ordinal} cannot be opened: {e:?}")))?;
        let id = if rank == 0 {
            let mut id = nc::ncclUniqueId { internal: [0; 128] };
            // SAFETY: `id` outlives the call.
            let r = unsafe { nc::ncclGetUniqueId(&mut id) };
            if r != nc::ncclResult_t::ncclSuccess {
                return Err(unavailable(format!("ncclGetUniqueId: {}", describe(r))));
            }
            rendezvous.set(ID_KEY, &id_bytes(&id))?;
            id
        } else {
            id_from(&rendezvous.get(ID_KEY)?)?
        };
        let event = cu::event::create(cusys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
            .map_err(|e| unavailable(format!("cuEventCreate on GPU {ordinal}: {e:?}")))?;
        let mut me = Nccl {
            comm: std::ptr::null_mut(),
            rank,
            world,
            timeout,
            event,
            ctx,
        };
        let deadline = Instant::now() + rendezvous.timeout();
        let mut cfg = config(version);
        // SAFETY: `me.comm` and `cfg` outlive the call; NCCL copies the config.
        let r = unsafe {
            nc::ncclCommInitRankConfig(&mut me.comm, world as i32, id, rank as i32, &mut cfg)
        };
        me.accepted("communicator init", r)?;
        me.settle("communicator init", deadline)?;
        Ok(me)
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Ranks in the communicator.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Sums `count` f32 values at device pointer `buf` over all ranks, in place.
    ///
    /// # Safety
    /// `buf` must point to at least `count` f32 values in device memory of this rank's GPU,
    /// not freed or written by anyone else until the call returns.
    pub unsafe fn all_reduce_sum_f32(&mut self, buf: *mut c_void, count: usize) -> Result<()> {
        self.bind()?;
        let deadline = Instant::now() + self.timeout;
        // SAFETY: the caller vouches for `buf`; the communicator is alive (checked by bind).
        let r = unsafe {
            nc::ncclAllReduce(
                buf,
                buf,
                count,
                nc::ncclDataType_t::ncclFloat32,
                nc::ncclRedOp_t::ncclSum,
                self.comm,
                std::ptr::null_mut(),
            )
        };
        self.finish("all-reduce", count, r, deadline)
    }

    /// Copies `root`'s `count` f32 values at `buf` to every rank, in place.
    ///
    /// # Safety
    /// As for [`Nccl::all_reduce_sum_f32`].
    pub unsafe fn broadcast_f32(
        &mut self,
        buf: *mut c_void,
        count: usize,
        root: usize,
    ) -> Result<()> {
        self.bind()?;
        let deadline = Instant::now() + self.timeout;
        // SAFETY: as above.
        let r = unsafe {
            nc::ncclBroadcast(
                buf,
                buf,
                count,
                nc::ncclDataType_t::ncclFloat32,
                root as i32,
                self.comm,
                std::ptr::null_mut(),
            )
        };
        self.finish("broadcast", count, r, deadline)
    }

    /// Gathers `count` f32 values at `send` from every rank into `recv` (`world × count`
    /// values), in rank order.
    ///
    /// # Safety
    /// `send` must point to `count` and `recv` to `world × count` f32 values in device memory
    /// of this rank's GPU, not freed or written by anyone else until the call returns.
    pub unsafe fn all_gather_f32(
        &mut self,
        send: *const c_void,
        recv: *mut c_void,
        count: usize,
    ) -> Result<()> {
        self.bind()?;
        let deadline = Instant::now() + self.timeout;
        // SAFETY: the caller vouches for both buffers; the communicator is alive.
        let r = unsafe {
            nc::ncclAllGather(
                send,
                recv,
                count,
                nc::ncclDataType_t::ncclFloat32,
                self.comm,
                std::ptr::null_mut(),
            )
        };
        self.finish("all-gather", count, r, deadline)
    }

    /// Makes this rank's GPU current on the calling thread; fails at once on an aborted
    /// communicator.
    fn bind(&mut self) -> Result<()> {
        if self.comm.is_null() {
            return Err(Error::PeerLost {
                rank: self.rank,
                reason: "the NCCL communicator was aborted by an earlier failure".into(),
            });
        }
        self.ctx.bind_to_thread().map_err(|e| Error::PeerLost {
            rank: self.rank,
            reason: format!("binding GPU {}: {e:?}", self.ctx.ordinal()),
        })
    }

    fn finish(
        &mut self,
        what: &str,
        count: usize,
        r: nc::ncclResult_t,
        deadline: Instant,
    ) -> Result<()> {
        let what = format!("{what} of {count} floats");
        self.accepted(&what, r)?;
        self.settle(&what, deadline)?;
        // SAFETY: the event belongs to this context; the null stream is its legacy stream.
        if let Err(e) = unsafe { cu::event::record(self.event, std::ptr::null_mut()) } {
            return Err(self.fail(&what, format!("cuEventRecord: {e:?}")));
        }
        self.wait(&what, deadline)
    }

    /// An immediate result of an NCCL call on a non-blocking communicator: success or
    /// in-progress go on, anything else aborts.
    fn accepted(&mut self, what: &str, r: nc::ncclResult_t) -> Result<()> {
        match r {
            nc::ncclResult_t::ncclSuccess | nc::ncclResult_t::ncclInProgress => Ok(()),
            e => Err(self.fail(what, describe(e))),
        }
    }

    /// The communicator's asynchronous state: Ok(true) when idle, Ok(false) while in progress.
    fn poll(&mut self, what: &str) -> Result<bool> {
        let mut state = nc::ncclResult_t::ncclSuccess;
        // SAFETY: the communicator is alive and `state` outlives the call.
        let r = unsafe { nc::ncclCommGetAsyncError(self.comm, &mut state) };
        if r != nc::ncclResult_t::ncclSuccess {
            return Err(self.fail(what, format!("ncclCommGetAsyncError: {}", describe(r))));
        }
        match state {
            nc::ncclResult_t::ncclSuccess => Ok(true),
            nc::ncclResult_t::ncclInProgress => Ok(false),
            e => Err(self.fail(what, describe(e))),
        }
    }

    /// Waits until NCCL has accepted the last call (init or enqueue).
    fn settle(&mut self, what: &str, deadline: Instant) -> Result<()> {
        let mut spins = 0u32;
        while !self.poll(what)? {
            self.pause(what, deadline, &mut spins)?;
        }
        Ok(())
    }

    /// Waits until the stream has run the enqueued collective, watching for NCCL's errors.
    fn wait(&mut self, what: &str, deadline: Instant) -> Result<()> {
        let mut spins = 0u32;
        loop {
            // SAFETY: the event was created in this context and recorded above.
            match unsafe { cusys::cuEventQuery(self.event) } {
                cusys::CUresult::CUDA_SUCCESS => return Ok(()),
                cusys::CUresult::CUDA_ERROR_NOT_READY => {}
                e => return Err(self.fail(what, format!("cuEventQuery: {e:?}"))),
            }
            self.poll(what)?;
            self.pause(what, deadline, &mut spins)?;
        }
    }

    /// Spins briefly (collectives of small buffers finish in microseconds), then sleeps; fails
    /// past the deadline.
    fn pause(&mut self, what: &str, deadline: Instant, spins: &mut u32) -> Result<()> {
        if Instant::now() >= deadline {
            let t = self.timeout;
            return Err(self.fail(
                what,
                format!("not finished within {t:?}: a peer died or stalls"),
            ));
        }
        *spins += 1;
        if *spins < 1000 {
            std::hint::spin_loop();
        } else {
            std::thread::sleep(Duration::from_micros(100));
        }
        Ok(())
    }

    /// Aborts the communicator (releasing kernels that wait for a peer) and names the failure.
    fn fail(&mut self, what: &str, reason: String) -> Error {
        self.abort();
        Error::PeerLost {
            rank: self.rank,
            reason: format!("NCCL {what}: {reason}"),
        }
    }

    fn abort(&mut self) {
        if !self.comm.is_null() {
            // SAFETY: the communicator is alive and never used after this.
            unsafe { nc::ncclCommAbort(self.comm) };
            self.comm = std::ptr::null_mut();
        }
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        // Abort rather than finalize: finalizing waits for peers, which may be gone.
        self.abort();
        // SAFETY: the event was created by this value and is not used after this.
        unsafe {
            let _ = cu::event::destroy(self.event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_print_as_nccl_writes_them() {
        assert_eq!(Version(22907).to_string(), "2.29.7");
        assert_eq!(Version(21803).to_string(), "2.18.3");
    }

    #[test]
    fn unique_ids_survive_the_rendezvous_server_and_wrong_lengths_are_refused() {
        let mut id = nc::ncclUniqueId { internal: [0; 128] };
        for (i, c) in id.internal.iter_mut().enumerate() {
            *c = (i as u8).wrapping_mul(37) as std::ffi::c_char;
        }
        let back = id_from(&id_bytes(&id)).unwrap();
        assert_eq!(back.internal, id.internal);
        let e = id_from(b"stale").unwrap_err().to_string();
        assert!(e.contains("nccl-id") && e.contains("5 bytes"), "{e}");
    }

    #[test]
    fn the_config_is_non_blocking_and_leaves_the_rest_to_nccl() {
        let c = config(Version(22907));
        assert_eq!(c.blocking, 0);
        assert_eq!(c.magic, 0xcafe_beef);
        assert_eq!(c.version, 22907);
        assert_eq!(c.size, std::mem::size_of::<nc::ncclConfig_t>());
        assert_eq!(c.minCTAs, i32::MIN);
        assert!(c.netName.is_null());
    }
}
