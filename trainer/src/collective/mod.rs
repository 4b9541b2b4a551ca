//! Data parallelism across processes: collectives on tensors, gradient averaging, the gang.
//!
//! tch has no collectives, so radfm owns this layer. The rendezvous server, the CPU ring and the
//! NCCL communicator live in `radfm-collective` (no libtorch there); this module puts them behind the
//! [`Collective`] trait on tensors. Parameters are broadcast from rank 0 at start; gradients
//! are averaged in buckets, issued in the same (name-sorted) order on every rank.

pub use radfm_collective::{nccl, rendezvous, ring};

use std::time::Duration;

use tch::{Device, Kind, Tensor};

use crate::config::Backend;
use crate::optim::Param;
use crate::{Error, Result};

/// Floats per all-reduce bucket (16 MiB).
pub const BUCKET: usize = 4 << 20;

/// A collective over the processes of a gang. Parameter broadcast and gradient averaging go
/// through this trait only, so the CPU ring and NCCL are interchangeable under the training
/// loop.
pub trait Collective {
    /// This process's rank.
    fn rank(&self) -> usize;
    /// Processes in the gang.
    fn world(&self) -> usize;
    /// Where the tensors given to [`Collective::all_reduce`] and [`Collective::broadcast`] must
    /// live (buckets are assembled there).
    fn device(&self) -> Device;
    /// Element-wise sum over the gang of a contiguous f32 tensor, in place.
    fn all_reduce(&mut self, t: &mut Tensor) -> Result<()>;
    /// `root`'s values of a contiguous f32 tensor, in place on every rank.
    fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<()>;
    /// Element-wise sum over the gang of a few host values (flags, losses), in place.
    fn all_reduce_host(&mut self, values: &mut [f32]) -> Result<()>;
    /// Every rank's rows of a contiguous f32 tensor (the same shape on every rank), stacked in
    /// rank order along the first dimension, on [`Collective::device`]. No gradient flows
    /// through it: a caller that needs one puts its own rows back (as contrastive losses do).
    fn all_gather(&mut self, t: &Tensor) -> Result<Tensor>;
}

/// The shape of `world` ranks' `t` stacked along the first dimension.
fn gathered_shape(t: &Tensor, world: usize) -> Vec<i64> {
    let mut shape = t.size();
    if shape.is_empty() {
        shape.push(1);
    }
    shape[0] *= world as i64;
    shape
}

fn host_values(t: &Tensor, rank: usize) -> Result<Vec<f32>> {
    Vec::try_from(t.to_device(Device::Cpu).to_kind(Kind::Float).flatten(0, -1)).map_err(
        |e: tch::TchError| {
            Error::Collective(radfm_collective::Error::PeerLost {
                rank,
                reason: e.to_string(),
            })
        },
    )
}

impl Collective for ring::Ring {
    fn rank(&self) -> usize {
        ring::Ring::rank(self)
    }

    fn world(&self) -> usize {
        ring::Ring::world(self)
    }

    fn device(&self) -> Device {
        Device::Cpu
    }

    fn all_reduce(&mut self, t: &mut Tensor) -> Result<()> {
        let mut buf = host_values(t, self.rank())?;
        self.all_reduce_sum(&mut buf)?;
        let src = Tensor::from_slice(&buf).view(t.size().as_slice());
        tch::no_grad(|| t.copy_(&src));
        Ok(())
    }

    fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<()> {
        let mut buf = host_values(t, self.rank())?;
        ring::Ring::broadcast(self, &mut buf, root)?;
        let src = Tensor::from_slice(&buf).view(t.size().as_slice());
        tch::no_grad(|| t.copy_(&src));
        Ok(())
    }

    fn all_reduce_host(&mut self, values: &mut [f32]) -> Result<()> {
        Ok(self.all_reduce_sum(values)?)
    }

    fn all_gather(&mut self, t: &Tensor) -> Result<Tensor> {
        let local = host_values(t, self.rank())?;
        let mut out = vec![0.0f32; local.len() * self.world()];
        ring::Ring::all_gather(self, &local, &mut out)?;
        Ok(Tensor::from_slice(&out).view(gathered_shape(t, self.world()).as_slice()))
    }
}

/// NCCL on this rank's GPU: tensors are reduced where they live, on the stream libtorch uses.
pub struct NcclTensors {
    comm: nccl::Nccl,
    device: Device,
}

impl NcclTensors {
    /// A tensor NCCL may read and write in place: f32, contiguous, on this rank's GPU.
    fn buffer(&self, t: &Tensor) -> Result<*mut std::ffi::c_void> {
        if t.device() != self.device || t.kind() != Kind::Float || !t.is_contiguous() {
            return Err(Error::Collective(radfm_collective::Error::PeerLost {
                rank: self.comm.rank(),
                reason: format!(
                    "NCCL needs a contiguous f32 tensor on {:?}, got {:?} {:?}",
                    self.device,
                    t.kind(),
                    t.device()
                ),
            }));
        }
        Ok(t.data_ptr())
    }
}

impl Collective for NcclTensors {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world(&self) -> usize {
        self.comm.world()
    }

    fn device(&self) -> Device {
        self.device
    }

    fn all_reduce(&mut self, t: &mut Tensor) -> Result<()> {
        let buf = self.buffer(t)?;
        // SAFETY: `buf` is `t`'s storage (checked: f32, contiguous, this GPU), kept alive by the
        // borrow of `t` for the whole call.
        Ok(unsafe { self.comm.all_reduce_sum_f32(buf, t.numel()) }?)
    }

    fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<()> {
        let buf = self.buffer(t)?;
        // SAFETY: as for all_reduce.
        Ok(unsafe { self.comm.broadcast_f32(buf, t.numel(), root) }?)
    }

    fn all_reduce_host(&mut self, values: &mut [f32]) -> Result<()> {
        let mut t = Tensor::from_slice(values).to_device(self.device);
        self.all_reduce(&mut t)?;
        values.copy_from_slice(&host_values(&t, self.rank())?);
        Ok(())
    }

    fn all_gather(&mut self, t: &Tensor) -> Result<Tensor> {
        let send = self.buffer(t)?;
        let out = Tensor::empty(
            gathered_shape(t, self.world()).as_slice(),
            (Kind::Float, self.device),
        );
        let recv = self.buffer(&out)?;
        // SAFETY: `send` is `t`'s storage and `recv` is `out`'s (both checked: f32, contiguous,
        // this GPU; `out` holds world × numel(t) values), alive for the whole call.
        unsafe { self.comm.all_gather_f32(send, recv, t.numel()) }?;
        Ok(out)
    }
}

/// The collective a gang uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chosen {
    /// NCCL on this GPU of the machine.
    Nccl {
        /// The CUDA device ordinal.
        ordinal: usize,
    },
    /// The TCP ring.
    Ring,
}

/// The collective a gang uses: the `RADFM_COLLECTIVE` choice, with `auto` taking NCCL exactly
/// when this process trains on a GPU.
pub fn resolve(backend: Backend, device: Device) -> Result<Chosen> {
    match (backend, device) {
        (Backend::Auto | Backend::Nccl, Device::Cuda(ordinal)) => Ok(Chosen::Nccl { ordinal }),
        (Backend::Auto | Backend::Ring, _) => Ok(Chosen::Ring),
        (Backend::Nccl, other) => Err(Error::Field {
            field: crate::config::COLLECTIVE.into(),
            reason: format!(
                "nccl needs a GPU, but this process trains on {other:?} (no GPU requested, or \
                 CUDA is not usable here)"
            ),
        }),
    }
}

/// How long the gang waits.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Joining: rank 0 reachable, every rank connected (scheduling and image pulls included).
    pub join: Duration,
    /// Each collective once the gang formed.
    pub collective: Duration,
}

/// The gang as seen from one process.
pub struct Gang {
    /// The collective.
    pub coll: Box<dyn Collective + Send>,
    /// The rendezvous connection (kept open: rank 0's server lives as long as the gang).
    pub rendezvous: rendezvous::RendezvousClient,
    _server: Option<rendezvous::RendezvousServer>,
}

impl Gang {
    /// Rendezvous: rank 0 serves rendezvous on `0.0.0.0:port`; every rank connects to
    /// `master:port`, joins the collective ([`resolve`]d from `backend` and `device`) and meets
    /// the others at a barrier, all within `timeouts.join`; collectives then wait
    /// `timeouts.collective`. NCCL missing here is a configuration error naming
    /// `RADFM_COLLECTIVE`.
    #[allow(clippy::too_many_arguments)]
    pub fn join(
        master: &str,
        port: u16,
        rank: usize,
        world: usize,
        attempt: i32,
        timeouts: Timeouts,
        backend: Backend,
        device: Device,
        secret: Option<radfm_collective::auth::GangSecret>,
    ) -> Result<Gang> {
        let chosen = resolve(backend, device)?;
        let server = if rank == 0 {
            Some(rendezvous::RendezvousServer::start(
                &format!("0.0.0.0:{port}"),
                secret.clone(),
                attempt,
            )?)
        } else {
            None
        };
        let mut rendezvous = rendezvous::RendezvousClient::connect(
            &format!("{master}:{port}"),
            attempt,
            timeouts.join,
            secret,
        )?;
        let timeout = timeouts.collective;
        let coll: Box<dyn Collective + Send> = match chosen {
            Chosen::Nccl { ordinal } => {
                let comm = nccl::Nccl::connect(&mut rendezvous, rank, world, ordinal, timeout)
                    .map_err(|e| match e {
                        radfm_collective::Error::Unavailable { reason } => Error::Field {
                            field: crate::config::COLLECTIVE.into(),
                            reason,
                        },
                        other => Error::Collective(other),
                    })?;
                Box::new(NcclTensors { comm, device })
            }
            Chosen::Ring => Box::new(ring::Ring::connect(&mut rendezvous, rank, world, timeout)?),
        };
        rendezvous.barrier("joined", world)?;
        Ok(Gang {
            coll,
            rendezvous,
            _server: server,
        })
    }
}

/// Copies rank 0's values of `tensors` to every rank.
pub fn broadcast_tensors(coll: &mut dyn Collective, tensors: &[Tensor]) -> Result<()> {
    if coll.world() == 1 {
        return Ok(());
    }
    let device = coll.device();
    for t in tensors {
        let mut buf = t
            .detach()
            .to_device(device)
            .to_kind(Kind::Float)
            .flatten(0, -1)
            .contiguous();
        coll.broadcast(&mut buf, 0)?;
        let src = buf
            .view(t.size().as_slice())
            .to_device(t.device())
            .to_kind(t.kind());
        let mut dst = t.shallow_clone();
        tch::no_grad(|| dst.copy_(&src));
    }
    Ok(())
}

/// Averages the gradients of `params` over the gang, bucket by bucket, in parameter order.
/// Parameters without a gradient contribute zeros, so every rank sends the same layout.
pub fn all_reduce_grads(coll: &mut dyn Collective, params: &mut [Param]) -> Result<()> {
    let world = coll.world();
    if world == 1 {
        return Ok(());
    }
    let device = coll.device();
    let mut start = 0;
    while start < params.len() {
        let mut end = start;
        let mut len = 0;
        while end < params.len() && (end == start || len + params[end].tensor.numel() <= BUCKET) {
            len += params[end].tensor.numel();
            end += 1;
        }
        let parts: Vec<Tensor> = params[start..end]
            .iter()
            .map(|p| {
                let g = &p.grad;
                if g.defined() {
                    g.detach()
                        .to_device(device)
                        .to_kind(Kind::Float)
                        .flatten(0, -1)
                } else {
                    Tensor::zeros([p.tensor.numel() as i64], (Kind::Float, device))
                }
            })
            .collect();
        let mut bucket = Tensor::cat(&parts, 0);
        coll.all_reduce(&mut bucket)?;
        let summed = bucket / world as f64;
        let mut offset = 0i64;
        for p in &mut params[start..end] {
            let n = p.tensor.numel() as i64;
            let avg = summed.narrow(0, offset, n).view(p.tensor.size().as_slice());
            if p.grad.defined() {
                let (device, kind) = (p.grad.device(), p.grad.kind());
                tch::no_grad(|| p.grad.copy_(&avg.to_device(device).to_kind(kind)));
            }
            offset += n;
        }
        start = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Mae, VitConfig};
    use crate::optim::{AdamW, AdamWConfig};
    use tch::nn::VarStore;

    fn cfg() -> VitConfig {
        VitConfig {
            image_size: 16,
            patch_size: 4,
            width: 32,
            depth: 2,
            heads: 2,
            decoder_width: 16,
            decoder_depth: 1,
            decoder_heads: 2,
            mlp_ratio: 2,
        }
    }

    /// AdamW steps on the given batches (each with its masking noise); returns the parameters
    /// sorted by name and the (averaged) gradients of every step, flattened.
    /// Starts from `init` (other tests share libtorch's global generator, so the initial
    /// values are passed in rather than re-drawn); `perturb` starts elsewhere instead, which the
    /// broadcast from rank 0 must undo.
    fn train(
        mut ring: Option<ring::Ring>,
        init: &[(String, Tensor)],
        perturb: bool,
        batches: Vec<(Tensor, Tensor)>,
    ) -> (Vec<(String, Tensor)>, Vec<Tensor>) {
        let vs = VarStore::new(Device::Cpu);
        let mae = Mae::new(&vs.root(), cfg());
        let start: Vec<(String, Tensor)> = init
            .iter()
            .map(|(n, t)| (n.clone(), if perturb { t + 0.5 } else { t.copy() }))
            .collect();
        crate::tensors::load_into(&vs, &start, "", "init").unwrap();
        let mut opt = AdamW::new(&vs, AdamWConfig::default());
        let mut names: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        if let Some(r) = ring.as_mut() {
            let ts: Vec<Tensor> = names.iter().map(|(_, t)| t.shallow_clone()).collect();
            broadcast_tensors(r, &ts).unwrap();
        }
        let mut grads = Vec::new();
        for (images, noise) in batches {
            opt.backward(&mae.loss_with(&images, 0.75, &noise));
            if let Some(r) = ring.as_mut() {
                all_reduce_grads(r, &mut opt.params).unwrap();
            }
            let flat: Vec<Tensor> = opt.params.iter().map(|p| p.grad.flatten(0, -1)).collect();
            grads.push(Tensor::cat(&flat, 0));
            opt.clip_grad_norm(1.0);
            opt.step(1e-3);
            opt.zero_grad();
        }
        (names, grads)
    }

    #[test]
    fn auto_picks_nccl_on_a_gpu_and_the_ring_on_the_cpu() {
        let table = [
            (
                Backend::Auto,
                Device::Cuda(1),
                Some(Chosen::Nccl { ordinal: 1 }),
            ),
            (Backend::Auto, Device::Cpu, Some(Chosen::Ring)),
            (Backend::Ring, Device::Cuda(0), Some(Chosen::Ring)),
            (
                Backend::Nccl,
                Device::Cuda(0),
                Some(Chosen::Nccl { ordinal: 0 }),
            ),
            (Backend::Nccl, Device::Cpu, None),
        ];
        for (asked, device, want) in table {
            match (resolve(asked, device), want) {
                (Ok(got), Some(want)) => assert_eq!(got, want, "{asked:?} on {device:?}"),
                (Err(e), None) => {
                    let e = e.to_string();
                    assert!(
                        e.contains("RADFM_COLLECTIVE") && e.contains("needs a GPU"),
                        "{e}"
                    )
                }
                (got, want) => panic!("{asked:?} on {device:?}: {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn a_rank_arriving_after_the_collective_timeout_still_joins_within_the_rendezvous_timeout() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let timeouts = Timeouts {
            join: Duration::from_secs(30),
            collective: Duration::from_secs(1),
        };
        let ranks: Vec<_> = (0..2)
            .map(|rank| {
                std::thread::spawn(move || {
                    if rank == 1 {
                        // A slow image pull: three collective timeouts late.
                        std::thread::sleep(Duration::from_secs(3));
                    }
                    let mut g = Gang::join(
                        "127.0.0.1",
                        port,
                        rank,
                        2,
                        1,
                        timeouts,
                        Backend::Ring,
                        Device::Cpu,
                        None,
                    )
                    .unwrap();
                    let mut v = [1.0f32];
                    g.coll.all_reduce_host(&mut v).unwrap();
                    v[0]
                })
            })
            .collect();
        for r in ranks {
            assert_eq!(r.join().unwrap(), 2.0);
        }
    }

    #[test]
    fn nccl_on_a_machine_without_cuda_is_a_configuration_error_naming_what_is_missing() {
        // Without the CUDA driver (every CI machine), joining NCCL must fail with a permanent,
        // explained error, not cudarc's panic; with a driver this proves nothing and is skipped.
        if nccl::driver_present() {
            return;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = Gang::join(
            "127.0.0.1",
            port,
            0,
            2,
            1,
            Timeouts {
                join: Duration::from_secs(5),
                collective: Duration::from_secs(5),
            },
            Backend::Nccl,
            Device::Cuda(0),
            None,
        )
        .map(|_| ())
        .unwrap_err();
        assert_eq!(e.exit_code(), radfm_api::exit::INVALID_CONFIG);
        let text = e.to_string();
        assert!(
            text.contains("RADFM_COLLECTIVE") && text.contains("libcuda"),
            "{text}"
        );
    }

    #[test]
    fn all_gather_stacks_every_ranks_rows_in_rank_order() {
        let world = 3;
        let server = rendezvous::RendezvousServer::start("127.0.0.1:0", None, 1).unwrap();
        let addr = server.addr.to_string();
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let addr = addr.clone();
                std::thread::spawn(move || {
                    let mut c = rendezvous::RendezvousClient::connect(
                        &addr,
                        1,
                        Duration::from_secs(10),
                        None,
                    )
                    .unwrap();
                    let mut ring =
                        ring::Ring::connect(&mut c, rank, world, Duration::from_secs(10)).unwrap();
                    let mine = Tensor::full([2, 4], rank as f64, (Kind::Float, Device::Cpu));
                    Collective::all_gather(&mut ring, &mine).unwrap()
                })
            })
            .collect();
        let want = Tensor::from_slice(&[0f32, 0., 1., 1., 2., 2.])
            .view([6, 1])
            .expand([6, 4], false);
        for h in handles {
            let got = h.join().unwrap();
            assert_eq!(got.size(), [6, 4]);
            assert!(got.equal(&want), "{got}");
        }
    }

    #[test]
    fn n_ranks_with_batch_b_match_one_process_with_batch_n_times_b() {
        for world in [2usize, 4] {
            let b: i64 = 3;
            tch::manual_seed(42);
            let steps: Vec<(Tensor, Tensor)> = (0..3)
                .map(|_| {
                    (
                        Tensor::randn([world as i64 * b, 1, 16, 16], (Kind::Float, Device::Cpu)),
                        Tensor::rand([world as i64 * b, 16], (Kind::Float, Device::Cpu)),
                    )
                })
                .collect();
            let init: Vec<(String, Tensor)> = {
                let vs = VarStore::new(Device::Cpu);
                let _ = Mae::new(&vs.root(), cfg());
                vs.variables()
                    .into_iter()
                    .map(|(n, t)| (n, t.detach().copy()))
                    .collect()
            };
            let single = train(
                None,
                &init,
                false,
                steps.iter().map(|(x, n)| (x.copy(), n.copy())).collect(),
            );

            let server = rendezvous::RendezvousServer::start("127.0.0.1:0", None, 1).unwrap();
            let addr = server.addr.to_string();
            let handles: Vec<_> = (0..world)
                .map(|rank| {
                    let addr = addr.clone();
                    // Each rank's slice of every global batch; ranks other than 0 start from a
                    // different init, which the broadcast must overwrite.
                    let mine: Vec<(Tensor, Tensor)> = steps
                        .iter()
                        .map(|(x, n)| {
                            let r = rank as i64 * b;
                            (x.narrow(0, r, b).copy(), n.narrow(0, r, b).copy())
                        })
                        .collect();
                    let init: Vec<(String, Tensor)> =
                        init.iter().map(|(n, t)| (n.clone(), t.copy())).collect();
                    std::thread::spawn(move || {
                        let mut c = rendezvous::RendezvousClient::connect(
                            &addr,
                            1,
                            Duration::from_secs(10),
                            None,
                        )
                        .unwrap();
                        let ring =
                            ring::Ring::connect(&mut c, rank, world, Duration::from_secs(10))
                                .unwrap();
                        train(Some(ring), &init, rank != 0, mine)
                    })
                })
                .collect();
            for h in handles {
                let (params, grads) = h.join().unwrap();
                // The averaged gradients are the single process's, up to summation order.
                for (step, (a, b)) in single.1.iter().zip(&grads).enumerate() {
                    let excess = ((a - b).abs() - a.abs() * 1e-4 - 1e-6)
                        .max()
                        .double_value(&[]);
                    assert!(
                        excess <= 0.0,
                        "world {world}: gradients of step {step} differ"
                    );
                }
                // Parameters agree within float tolerance, except the attention key biases:
                // their exact gradient is zero (softmax ignores a constant added to every key),
                // and AdamW's division by the gradient's running RMS turns the rounding noise
                // left there into steps of up to lr in either direction.
                for ((name, a), (_, b)) in single.0.iter().zip(&params) {
                    let (a, b) = if name.ends_with("attn.qkv.bias") {
                        let d = a.size()[0] / 3;
                        let qv = |t: &Tensor| {
                            Tensor::cat(&[t.narrow(0, 0, d), t.narrow(0, 2 * d, d)], 0)
                        };
                        (qv(a), qv(b))
                    } else {
                        (a.shallow_clone(), b.shallow_clone())
                    };
                    let diff = (&a - &b).abs().max().double_value(&[]);
                    assert!(diff < 1e-5, "world {world}: {name} differs by {diff}");
                }
            }
        }
    }
}
