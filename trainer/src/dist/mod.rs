//! Data parallelism across processes: rendezvous, collectives, gradient averaging.
//!
//! tch has no collectives, so radfm owns this layer. Rank 0 serves a small [`store`] for
//! rendezvous; collectives go through the [`Collective`] trait, whose CPU backend is a TCP
//! [`ring`]. Parameters are broadcast from rank 0 at start; gradients are averaged in buckets,
//! issued in the same (name-sorted) order on every rank.

pub mod ring;
pub mod store;

use std::time::Duration;

use tch::{Device, Kind, Tensor};

use crate::optim::Param;
use crate::{Error, Result};

/// Floats per all-reduce bucket (16 MiB).
pub const BUCKET: usize = 4 << 20;

/// A collective over the processes of a gang. Parameter broadcast and gradient averaging go
/// through this trait only, so a backend that moves device memory (NCCL) can replace the CPU
/// ring without touching the training loop.
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
}

fn host_values(t: &Tensor, rank: usize) -> Result<Vec<f32>> {
    Vec::try_from(t.to_device(Device::Cpu).to_kind(Kind::Float).flatten(0, -1)).map_err(
        |e: tch::TchError| Error::PeerLost {
            rank,
            reason: e.to_string(),
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
        self.all_reduce_sum(values)
    }
}

/// The gang as seen from one process.
pub struct Gang {
    /// The collective.
    pub ring: ring::Ring,
    /// The store connection (kept open: rank 0's store lives as long as the gang).
    pub store: store::StoreClient,
    _server: Option<store::StoreServer>,
}

impl Gang {
    /// Rendezvous: rank 0 serves the store on `0.0.0.0:port`; every rank connects to
    /// `master:port`, joins the ring and meets the others at a barrier.
    pub fn join(
        master: &str,
        port: u16,
        rank: usize,
        world: usize,
        attempt: i32,
        timeout: Duration,
    ) -> Result<Gang> {
        let server = if rank == 0 {
            Some(store::StoreServer::start(&format!("0.0.0.0:{port}"))?)
        } else {
            None
        };
        let mut store = store::StoreClient::connect(&format!("{master}:{port}"), attempt, timeout)?;
        let ring = ring::Ring::connect(&mut store, rank, world, timeout)?;
        store.barrier("joined", world)?;
        Ok(Gang {
            ring,
            store,
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
pub fn all_reduce_grads(coll: &mut dyn Collective, params: &[Param]) -> Result<()> {
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
                let g = p.tensor.grad();
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
        for p in &params[start..end] {
            let n = p.tensor.numel() as i64;
            let avg = summed.narrow(0, offset, n).view(p.tensor.size().as_slice());
            let mut g = p.tensor.grad();
            if g.defined() {
                tch::no_grad(|| g.copy_(&avg.to_device(g.device()).to_kind(g.kind())));
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
            mae.loss_with(&images, 0.75, &noise).backward();
            if let Some(r) = ring.as_mut() {
                all_reduce_grads(r, &opt.params).unwrap();
            }
            let flat: Vec<Tensor> = opt
                .params
                .iter()
                .map(|p| p.tensor.grad().flatten(0, -1))
                .collect();
            grads.push(Tensor::cat(&flat, 0));
            opt.clip_grad_norm(1.0);
            opt.step(1e-3);
            opt.zero_grad();
        }
        (names, grads)
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

            let server = store::StoreServer::start("127.0.0.1:0").unwrap();
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
                        let mut c =
                            store::StoreClient::connect(&addr, 1, Duration::from_secs(10)).unwrap();
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
