//! Data parallelism across processes: rendezvous, collectives, gradient averaging.
//!
//! tch has no collectives, so radfm owns this layer. Rank 0 serves a small [`store`] for
//! rendezvous; the CPU backend is a TCP [`ring`]. Parameters are broadcast from rank 0 at start;
//! gradients are averaged in buckets, issued in the same (name-sorted) order on every rank.

pub mod ring;
pub mod store;

use std::time::Duration;

use tch::{Device, Kind, Tensor};

use crate::optim::Param;
use crate::{Error, Result};

/// Floats per all-reduce bucket (16 MiB).
pub const BUCKET: usize = 4 << 20;

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
pub fn broadcast_tensors(ring: &mut ring::Ring, tensors: &[Tensor]) -> Result<()> {
    if ring.world() == 1 {
        return Ok(());
    }
    for t in tensors {
        let mut buf: Vec<f32> = Vec::try_from(t.detach().to_device(Device::Cpu).to_kind(Kind::Float).flatten(0, -1))
            .map_err(|e: tch::TchError| Error::PeerLost { rank: ring.rank(), reason: e.to_string() })?;
        ring.broadcast(&mut buf, 0)?;
        let src = Tensor::from_slice(&buf).view(t.size().as_slice()).to_device(t.device()).to_kind(t.kind());
        let mut dst = t.shallow_clone();
        tch::no_grad(|| dst.copy_(&src));
    }
    Ok(())
}

/// Averages the gradients of `params` over the gang, bucket by bucket, in parameter order.
/// Parameters without a gradient contribute zeros, so every rank sends the same layout.
pub fn all_reduce_grads(ring: &mut ring::Ring, params: &[Param]) -> Result<()> {
    let world = ring.world();
    if world == 1 {
        return Ok(());
    }
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
                    g.detach().to_device(Device::Cpu).to_kind(Kind::Float).flatten(0, -1)
                } else {
                    Tensor::zeros([p.tensor.numel() as i64], (Kind::Float, Device::Cpu))
                }
            })
            .collect();
        let mut buf: Vec<f32> = Vec::try_from(Tensor::cat(&parts, 0))
            .map_err(|e: tch::TchError| Error::PeerLost { rank: ring.rank(), reason: e.to_string() })?;
        ring.all_reduce_sum(&mut buf)?;
        let summed = Tensor::from_slice(&buf) / world as f64;
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
