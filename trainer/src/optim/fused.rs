//! AdamW's update in one pass over each CPU parameter, its gradient and its moments.
//!
//! tch exposes no `_fused_adamw_`, and libtorch's element-wise kernels take nine passes per
//! parameter (decay, lerp, two for the second moment, three for the denominator, two for the
//! update), each streaming whole arrays through memory. Here each value is read and written
//! once, the arithmetic in the same order and precision (f32) as those kernels, so the result
//! stays within rounding of theirs. Parameters split into chunks that the intra-op threads
//! share.

use std::ops::Range;

use tch::{Device, Kind, Tensor};

use super::AdamWConfig;

/// Elements per chunk of work: large enough to amortise the hand-off, small enough that the
/// threads finish together.
const CHUNK: usize = 1 << 15;

/// The scalars of one update, in f32 as libtorch's CPU kernels use them.
#[derive(Debug, Clone, Copy)]
pub(super) struct Scalars {
    /// `1 − lr·weight_decay`, for parameters that decay.
    pub keep: f32,
    /// `1 − β1`, the lerp weight of the first moment.
    pub lerp: f32,
    /// β2.
    pub beta2: f32,
    /// `1 − β2`.
    pub one_minus_beta2: f32,
    /// `√(1 − β2ᵗ)`.
    pub sqrt_bc2: f32,
    /// ε.
    pub eps: f32,
    /// `−lr / (1 − β1ᵗ)`.
    pub step: f32,
}

impl Scalars {
    /// The scalars of the `steps`-th update (bias correction counts from 1) at rate `lr`.
    pub fn new(cfg: AdamWConfig, lr: f64, steps: i64) -> Scalars {
        let bc1 = 1.0 - cfg.beta1.powi(steps as i32);
        let bc2 = 1.0 - cfg.beta2.powi(steps as i32);
        Scalars {
            keep: (1.0 - lr * cfg.weight_decay) as f32,
            lerp: (1.0 - cfg.beta1) as f32,
            beta2: cfg.beta2 as f32,
            one_minus_beta2: (1.0 - cfg.beta2) as f32,
            sqrt_bc2: bc2.sqrt() as f32,
            eps: cfg.eps as f32,
            step: (-lr / bc1) as f32,
        }
    }
}

/// One parameter's arrays, borrowed for one update.
struct Arrays<'a> {
    p: &'a mut [f32],
    g: &'a [f32],
    m: &'a mut [f32],
    v: &'a mut [f32],
    decay: bool,
}

/// A parameter the fused update may take: its tensors and whether it decays.
pub(super) struct Member<'a> {
    /// The parameter.
    pub tensor: &'a Tensor,
    /// Its gradient.
    pub grad: &'a Tensor,
    /// First moment.
    pub m: &'a Tensor,
    /// Second moment.
    pub v: &'a Tensor,
    /// Whether weight decay applies (with a configured decay of zero, `keep` is 1: no change).
    pub decay: bool,
}

/// Whether the fused update can take a parameter: every array f32, on the CPU, contiguous,
/// non-empty and of one length.
pub(super) fn eligible(p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor) -> bool {
    let n = p.numel();
    n > 0
        && [p, g, m, v].iter().all(|t| {
            t.kind() == Kind::Float
                && t.device() == Device::Cpu
                && t.is_contiguous()
                && t.numel() == n
        })
}

/// The bytes a tensor's elements occupy.
fn span(t: &Tensor) -> Range<usize> {
    let start = t.data_ptr() as usize;
    start..start + t.numel() * std::mem::size_of::<f32>()
}

/// Whether no two of the arrays the update writes or reads overlap (tied weights or a
/// gradient sharing its parameter's storage would), so that borrowing them is sound.
fn disjoint(members: &[Member<'_>]) -> bool {
    let mut spans: Vec<Range<usize>> = members
        .iter()
        .flat_map(|m| [span(m.tensor), span(m.grad), span(m.m), span(m.v)])
        .collect();
    spans.sort_by_key(|s| s.start);
    spans.windows(2).all(|w| w[0].end <= w[1].start)
}

/// Applies one update to every member on `threads` threads. Returns false, touching nothing,
/// where the members' arrays overlap; the caller then takes libtorch's kernels.
pub(super) fn step(members: &[Member<'_>], s: Scalars, threads: usize) -> bool {
    if !disjoint(members) {
        return false;
    }
    let mut chunks: Vec<Arrays<'_>> = Vec::new();
    for member in members {
        let n = member.tensor.numel();
        // SAFETY: `eligible` checked that each tensor holds `n` contiguous f32 on the CPU,
        // `disjoint` that no two arrays share a byte, and the tensors outlive the borrows
        // (`members` is borrowed for this call). Nothing else runs on these tensors meanwhile:
        // the trainer's step is single-threaded and the graph that saved them is gone.
        let (p, g, m, v) = unsafe {
            (
                std::slice::from_raw_parts_mut(member.tensor.data_ptr().cast::<f32>(), n),
                std::slice::from_raw_parts(member.grad.data_ptr().cast::<f32>().cast_const(), n),
                std::slice::from_raw_parts_mut(member.m.data_ptr().cast::<f32>(), n),
                std::slice::from_raw_parts_mut(member.v.data_ptr().cast::<f32>(), n),
            )
        };
        let parts = p
            .chunks_mut(CHUNK)
            .zip(g.chunks(CHUNK))
            .zip(m.chunks_mut(CHUNK))
            .zip(v.chunks_mut(CHUNK));
        for (((p, g), m), v) in parts {
            chunks.push(Arrays {
                p,
                g,
                m,
                v,
                decay: member.decay,
            });
        }
    }
    run(chunks, s, threads);
    true
}

/// Deals the chunks to `threads` threads, in contiguous runs of about equal length.
fn run(chunks: Vec<Arrays<'_>>, s: Scalars, threads: usize) {
    let total: usize = chunks.iter().map(|c| c.p.len()).sum();
    let threads = threads.clamp(1, chunks.len().max(1));
    if threads == 1 {
        chunks.into_iter().for_each(|c| update(c, s));
        return;
    }
    let share = total.div_ceil(threads);
    let mut groups: Vec<Vec<Arrays<'_>>> = vec![Vec::new()];
    let mut filled = 0;
    for c in chunks {
        if filled >= share && groups.len() < threads {
            groups.push(Vec::new());
            filled = 0;
        }
        filled += c.p.len();
        groups.last_mut().expect("one group at least").push(c);
    }
    std::thread::scope(|scope| {
        let mut groups = groups.into_iter();
        let here = groups.next();
        for g in groups {
            scope.spawn(move || g.into_iter().for_each(|c| update(c, s)));
        }
        here.into_iter().flatten().for_each(|c| update(c, s));
    });
}

/// The update of one chunk, as `torch.optim.AdamW`'s single-tensor path computes it:
/// `p ·= keep`; `m = lerp(m, g, 1 − β1)`; `v = β2·v + (1 − β2)·g·g`;
/// `p += step·m / (√v / √bc2 + ε)`.
fn update(c: Arrays<'_>, s: Scalars) {
    let lerp_low = s.lerp < 0.5;
    let elements =
        c.p.iter_mut()
            .zip(c.g)
            .zip(c.m.iter_mut())
            .zip(c.v.iter_mut());
    for (((p, &g), m), v) in elements {
        if c.decay {
            *p *= s.keep;
        }
        // libtorch's lerp picks the form by the weight, for accuracy near either end.
        *m = if lerp_low {
            *m + s.lerp * (g - *m)
        } else {
            g - (g - *m) * (1.0 - s.lerp)
        };
        *v = *v * s.beta2 + (g * s.one_minus_beta2) * g;
        let denom = v.sqrt() / s.sqrt_bc2 + s.eps;
        *p += (*m * s.step) / denom;
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Param, update_by_kernels};
    use super::*;

    fn scalars(lr: f64, t: i64) -> Scalars {
        Scalars::new(AdamWConfig::default(), lr, t)
    }

    /// A parameter with its gradient.
    struct Case {
        param: Param,
    }

    /// A matrix larger than a chunk (so it splits) and a small bias, each with random values.
    fn cases(seed: i64) -> Vec<Case> {
        tch::manual_seed(seed);
        [(vec![300i64, 400], true), (vec![77], false)]
            .into_iter()
            .map(|(shape, decay)| {
                let zeros = || Tensor::zeros(shape.as_slice(), (Kind::Float, Device::Cpu));
                Case {
                    param: Param {
                        name: format!("{shape:?}"),
                        tensor: Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu)),
                        decay,
                        m: zeros(),
                        v: zeros(),
                        grad: zeros(),
                    },
                }
            })
            .collect()
    }

    /// Copies of the same cases (the RNG is shared by tests running at once, so a seed alone
    /// does not give the same values twice).
    fn copies(cs: &[Case]) -> Vec<Case> {
        cs.iter()
            .map(|c| Case {
                param: Param {
                    name: c.param.name.clone(),
                    tensor: c.param.tensor.copy(),
                    decay: c.param.decay,
                    m: c.param.m.copy(),
                    v: c.param.v.copy(),
                    grad: c.param.grad.copy(),
                },
            })
            .collect()
    }

    fn members(cs: &[Case]) -> Vec<Member<'_>> {
        cs.iter()
            .map(|c| Member {
                tensor: &c.param.tensor,
                grad: &c.param.grad,
                m: &c.param.m,
                v: &c.param.v,
                decay: c.param.decay,
            })
            .collect()
    }

    /// The largest difference beyond `allclose`'s tolerance (rtol 1e-5, atol 1e-7), as a
    /// multiple of that tolerance: under 1 means within it.
    fn excess(a: &Tensor, b: &Tensor) -> f64 {
        ((a - b).abs() / (b.abs() * 1e-5 + 1e-7))
            .max()
            .double_value(&[])
    }

    #[test]
    fn the_one_pass_update_follows_libtorchs_kernels_within_rounding_over_several_steps() {
        let fused = cases(7);
        let (mut by_kernels, start) = (copies(&fused), copies(&fused));
        for t in 1..=5 {
            for (a, b) in fused.iter().zip(&by_kernels) {
                let g = Tensor::randn(a.param.grad.size().as_slice(), (Kind::Float, Device::Cpu));
                tch::no_grad(|| {
                    a.param.grad.shallow_clone().copy_(&g);
                    b.param.grad.shallow_clone().copy_(&g);
                });
            }
            let lr = 1e-2 * t as f64;
            assert!(step(&members(&fused), scalars(lr, t), 2));
            for b in &mut by_kernels {
                tch::no_grad(|| update_by_kernels(&mut b.param, AdamWConfig::default(), lr, t));
            }
        }
        for (a, b) in fused.iter().zip(&by_kernels) {
            let (a, b) = (&a.param, &b.param);
            for (x, y) in [(&a.tensor, &b.tensor), (&a.m, &b.m), (&a.v, &b.v)] {
                let d = excess(x, y);
                assert!(d < 1.0, "{d} times the tolerance");
            }
        }
        // The update moved the parameters (decay on the matrix only is part of the match).
        assert!(excess(&fused[0].param.tensor, &start[0].param.tensor) > 1e3);
    }

    #[test]
    fn the_result_does_not_depend_on_the_number_of_threads() {
        let one = cases(3);
        let four = copies(&one);
        for cs in [&one, &four] {
            tch::no_grad(|| {
                for c in cs.iter() {
                    c.param
                        .grad
                        .shallow_clone()
                        .copy_(&(&c.param.tensor * 0.5 + 0.25));
                }
            });
        }
        assert!(step(&members(&one), scalars(0.1, 1), 1));
        assert!(step(&members(&four), scalars(0.1, 1), 4));
        for (a, b) in one.iter().zip(&four) {
            let (a, b) = (&a.param, &b.param);
            assert!(a.tensor.equal(&b.tensor) && a.m.equal(&b.m) && a.v.equal(&b.v));
        }
    }

    #[test]
    fn overlapping_arrays_are_refused_and_left_untouched() {
        let cs = cases(5);
        let before = cs[1].param.tensor.copy();
        // A second member whose moment is the first member's parameter (as tied storage
        // would be): borrowing both mutably would alias.
        let mut ms = members(&cs);
        ms.push(Member {
            tensor: &cs[1].param.m,
            grad: &cs[1].param.grad,
            m: &cs[1].param.tensor,
            v: &cs[1].param.v,
            decay: false,
        });
        assert!(!step(&ms, scalars(0.1, 1), 2));
        assert!(cs[1].param.tensor.equal(&before));
    }

    #[test]
    fn only_contiguous_cpu_f32_arrays_of_one_length_are_eligible() {
        let f = |shape: &[i64]| Tensor::zeros(shape, (Kind::Float, Device::Cpu));
        let (p, g, m, v) = (f(&[4, 3]), f(&[4, 3]), f(&[4, 3]), f(&[4, 3]));
        assert!(eligible(&p, &g, &m, &v));
        assert!(!eligible(&p, &g.tr(), &m, &v));
        assert!(!eligible(&p, &f(&[3]), &m, &v));
        assert!(!eligible(&p, &g.to_kind(Kind::Double), &m, &v));
        assert!(!eligible(&f(&[0]), &f(&[0]), &f(&[0]), &f(&[0])));
    }
}
