//! The image–report contrastive objective (CLIP, ConVIRT): paired image and text embeddings are
//! pulled together and every other pairing in the batch pushed apart, in both directions.
//!
//! With `n` pairs, both sides L2-normalised and a learnable temperature (`logit_scale`, the log of
//! the inverse temperature, clamped so that the scale stays at most 100), the logits are
//! `exp(logit_scale) · image · textᵀ` and the loss is the mean of the cross-entropy of each row
//! (image → its report) and of each column (report → its image).
//!
//! **Across ranks** the negatives must span the whole global batch, or a run on `k` ranks would
//! train a different objective from one process with the same global batch. Each rank gathers
//! every rank's embeddings ([`Collective::all_gather`], no gradient), puts its own rows back as
//! the tensors that carry gradient, and computes the loss over the global batch. The gradient of
//! that loss with respect to a rank's own rows is then exactly the single-process gradient of
//! those rows. Summed over ranks, the encoders' gradients are the single-process ones; the
//! temperature's gradient, which every rank computes in full, would be counted `k` times. The
//! training loop averages gradients over ranks, so [`gathered_loss`] returns a loss to
//! differentiate that is `k` times the loss for the encoders and once for the temperature:
//! averaged, every gradient equals one process's.

use tch::{Kind, Reduction, Tensor};

use crate::Result;
use crate::collective::Collective;

/// Initial `logit_scale`: the inverse temperature 1/0.07, as CLIP starts.
pub fn initial_logit_scale() -> f64 {
    (1.0f64 / 0.07).ln()
}

/// Largest inverse temperature.
pub const MAX_SCALE: f64 = 100.0;

fn normalised(t: &Tensor) -> Tensor {
    t / t.norm_scalaropt_dim(2, [-1], true).clamp_min(1e-12)
}

/// The symmetric contrastive loss of `image` and `text` embeddings (`[n, d]` each, row i of one
/// paired with row i of the other) at the scale `exp(logit_scale)`.
pub fn loss(image: &Tensor, text: &Tensor, logit_scale: &Tensor) -> Tensor {
    let scale = logit_scale.clamp_max(MAX_SCALE.ln()).exp();
    loss_at(image, text, &scale)
}

fn loss_at(image: &Tensor, text: &Tensor, scale: &Tensor) -> Tensor {
    let (i, t) = (normalised(image), normalised(text));
    let logits = i.matmul(&t.tr()) * scale;
    let n = logits.size()[0];
    let target = Tensor::arange(n, (Kind::Int64, logits.device()));
    let rows = logits.cross_entropy_loss::<Tensor>(&target, None, Reduction::Mean, -100, 0.0);
    let cols = logits
        .tr()
        .cross_entropy_loss::<Tensor>(&target, None, Reduction::Mean, -100, 0.0);
    (rows + cols) / 2.0
}

/// A rank's local batch stacked with every other rank's: the gathered rows with this rank's
/// replaced by `local` itself, so that gradient flows into this rank's rows.
fn global_rows(coll: &mut dyn Collective, local: &Tensor) -> Result<Tensor> {
    let gathered = coll.all_gather(&local.detach().to_kind(Kind::Float).contiguous())?;
    let n = local.size()[0];
    let start = coll.rank() as i64 * n;
    let total = gathered.size()[0];
    let before = gathered.narrow(0, 0, start);
    let after = gathered.narrow(0, start + n, total - start - n);
    Ok(Tensor::cat(&[before, local.to_kind(Kind::Float), after], 0))
}

/// The contrastive loss over the global batch of the gang (every rank's pairs, in rank order):
/// `(to_differentiate, value)`. `value` is the loss; `to_differentiate` has the same value times
/// the world size, with the temperature's share of it scaled back so that, once the training loop
/// averages gradients over ranks, every parameter's gradient equals the single-process one.
/// Every rank must pass the same number of pairs.
pub fn gathered_loss(
    coll: &mut dyn Collective,
    image: &Tensor,
    text: &Tensor,
    logit_scale: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let world = coll.world() as f64;
    let (gi, gt) = (global_rows(coll, image)?, global_rows(coll, text)?);
    let scale = logit_scale.clamp_max(MAX_SCALE.ln()).exp();
    // Same value as `scale`; its gradient is 1/world of it.
    let shared = &scale / world + (&scale - &scale / world).detach();
    let value = loss_at(&gi, &gt, &scale.detach()).detach();
    Ok((loss_at(&gi, &gt, &shared) * world, value))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tch::Device;

    use super::*;
    use crate::collective::{rendezvous, ring};

    fn leaf(t: &Tensor) -> Tensor {
        t.detach().copy().set_requires_grad(true)
    }

    #[test]
    fn matched_pairs_score_low_and_shuffled_pairs_high() {
        tch::manual_seed(1);
        let image = Tensor::randn([8, 16], (Kind::Float, Device::Cpu));
        let text = &image + 0.05 * Tensor::randn([8, 16], (Kind::Float, Device::Cpu));
        let scale = Tensor::from(initial_logit_scale());
        let matched = loss(&image, &text, &scale).double_value(&[]);
        let shuffled = loss(&image, &text.roll([1], [0]), &scale).double_value(&[]);
        assert!(matched < 0.1 && shuffled > 5.0, "{matched} {shuffled}");
        // By hand, n = 2, orthogonal unit rows, scale 1: each row's CE is ln(1 + e^-1).
        let eye = Tensor::eye(2, (Kind::Float, Device::Cpu));
        let by_hand = (1.0 + (-1.0f64).exp()).ln();
        let ours = loss(&eye, &eye, &Tensor::from(0.0)).double_value(&[]);
        assert!((ours - by_hand).abs() < 1e-6, "{ours} vs {by_hand}");
        let capped = loss(&eye, &eye, &Tensor::from(10.0)).double_value(&[]);
        let at_max = (1.0 + (-MAX_SCALE).exp()).ln();
        assert!((capped - at_max).abs() < 1e-6, "the scale stops at 100");
    }

    /// Every rank's gradient of its own rows, and the temperature's averaged gradient, equal the
    /// single process's on the same global batch; so does the loss.
    #[test]
    fn k_ranks_with_gathered_negatives_equal_one_process_with_the_global_batch() {
        let (world, b, d) = (3usize, 4i64, 8i64);
        tch::manual_seed(7);
        let image = Tensor::randn([world as i64 * b, d], (Kind::Float, Device::Cpu));
        let text = Tensor::randn([world as i64 * b, d], (Kind::Float, Device::Cpu));
        let (si, st, ss) = (leaf(&image), leaf(&text), leaf(&Tensor::from(1.5)));
        let single = loss(&si, &st, &ss);
        single.backward();
        let server = rendezvous::RendezvousServer::start("127.0.0.1:0", None, 1).unwrap();
        let addr = server.addr.to_string();
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let addr = addr.clone();
                let mine = (
                    image.narrow(0, rank as i64 * b, b).copy(),
                    text.narrow(0, rank as i64 * b, b).copy(),
                );
                std::thread::spawn(move || {
                    let mut c = rendezvous::RendezvousClient::connect(
                        &addr,
                        1,
                        Duration::from_secs(10),
                        None,
                    )
                    .unwrap();
                    let mut r =
                        ring::Ring::connect(&mut c, rank, world, Duration::from_secs(10)).unwrap();
                    let (i, t, s) = (leaf(&mine.0), leaf(&mine.1), leaf(&Tensor::from(1.5)));
                    let (diff, value) = gathered_loss(&mut r, &i, &t, &s).unwrap();
                    diff.backward();
                    (
                        value.double_value(&[]),
                        i.grad(),
                        t.grad(),
                        s.grad().double_value(&[]),
                    )
                })
            })
            .collect();
        let mut scale_grad = 0.0;
        for (rank, h) in handles.into_iter().enumerate() {
            let (value, gi, gt, gs) = h.join().unwrap();
            assert!((value - single.double_value(&[])).abs() < 1e-6);
            let rows = |g: Tensor| g.narrow(0, rank as i64 * b, b);
            // The loop averages gradients: world × (this rank's) / world.
            let close =
                |a: &Tensor, e: &Tensor| (a / world as f64 - e).abs().max().double_value(&[]);
            assert!(
                close(&gi, &rows(si.grad())) < 1e-6,
                "rank {rank} image rows"
            );
            assert!(close(&gt, &rows(st.grad())) < 1e-6, "rank {rank} text rows");
            scale_grad += gs / world as f64;
        }
        assert!((scale_grad - ss.grad().double_value(&[])).abs() < 1e-6);
    }
}
