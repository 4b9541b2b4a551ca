//! AdamW with decoupled weight decay, the warm-up + cosine schedule and global-norm clipping.
//!
//! tch cannot save its optimizers' state, and exact resume needs the moments, so radfm keeps them
//! as named tensors it can checkpoint. The update follows `torch.optim.AdamW` step for step.
//!
//! Gradients live beside the parameters ([`Param::grad`]), not in libtorch's `.grad`: backward
//! hands each one over fresh ([`AdamW::backward`]) and a step ends by dropping them, as
//! `zero_grad(set_to_none=True)` does in PyTorch. Accumulating into a zeroed `.grad` (all tch
//! can do with `backward`) costs a zeroing pass and an addition pass over every gradient.

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

mod fused;

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay (only on parameters marked for decay).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        // MAE's pretraining betas.
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.05,
        }
    }
}

/// One optimised parameter.
#[derive(Debug)]
pub struct Param {
    /// Variable name (VarStore path).
    pub name: String,
    /// The variable.
    pub tensor: Tensor,
    /// Whether weight decay applies (not on biases, norms, tokens).
    pub decay: bool,
    /// First moment.
    pub m: Tensor,
    /// Second moment.
    pub v: Tensor,
    /// The gradient accumulated since the last step; undefined until a backward reaches it.
    pub grad: Tensor,
}

/// Whether a parameter gets weight decay: matrices and kernels do; biases, norm scales and the
/// learned tokens do not (as in MAE and timm).
pub fn decays(name: &str, dims: usize) -> bool {
    dims >= 2 && !name.ends_with("cls_token") && !name.ends_with("mask_token")
}

/// AdamW over named parameters, moments included.
#[derive(Debug)]
pub struct AdamW {
    /// Hyper-parameters.
    pub cfg: AdamWConfig,
    /// Parameters, sorted by name (the order every rank uses).
    pub params: Vec<Param>,
    /// Updates applied so far (bias correction uses it).
    pub steps: i64,
}

impl AdamW {
    /// Takes the trainable variables of a store, sorted by name.
    pub fn new(vars: &tch::nn::VarStore, cfg: AdamWConfig) -> AdamW {
        let named: BTreeMap<String, Tensor> = vars.variables().into_iter().collect();
        let params = named
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .map(|(name, tensor)| Param {
                decay: decays(&name, tensor.dim()),
                m: tensor.zeros_like(),
                v: tensor.zeros_like(),
                grad: Tensor::new(),
                name,
                tensor,
            })
            .collect();
        AdamW {
            cfg,
            params,
            steps: 0,
        }
    }

    /// Adds the gradients of `loss` to the parameters' [`Param::grad`]: the first backward
    /// after a step hands them over as computed, later ones (micro-batches) add to them.
    /// Parameters that `loss` does not reach keep what they had.
    pub fn backward(&mut self, loss: &Tensor) {
        let tensors: Vec<&Tensor> = self.params.iter().map(|p| &p.tensor).collect();
        let grads = Tensor::run_backward(&[loss], &tensors, false, false);
        tch::no_grad(|| {
            for (p, g) in self.params.iter_mut().zip(grads) {
                if !g.defined() {
                    continue;
                }
                if p.grad.defined() {
                    let _ = p.grad.g_add_(&g);
                } else {
                    p.grad = g;
                }
            }
        });
    }

    /// Drops every gradient (the next backward starts from none).
    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.grad = Tensor::new();
        }
    }

    /// The global L2 norm of the gradients.
    pub fn grad_norm(&self) -> f64 {
        tch::no_grad(|| {
            let sq: Vec<Tensor> = self
                .params
                .iter()
                .filter(|p| p.grad.defined())
                .map(|p| p.grad.to_kind(Kind::Float).norm())
                .collect();
            if sq.is_empty() {
                return 0.0;
            }
            Tensor::stack(&sq, 0).norm().double_value(&[])
        })
    }

    /// Scales gradients so their global norm is at most `max_norm` (0 disables); returns the
    /// norm before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        let norm = self.grad_norm();
        if max_norm > 0.0 && norm > max_norm {
            let scale = max_norm / (norm + 1e-6);
            tch::no_grad(|| {
                for p in &mut self.params {
                    if p.grad.defined() {
                        let _ = p.grad.g_mul_scalar_(scale);
                    }
                }
            });
        }
        norm
    }

    /// One AdamW update at learning rate `lr` of every parameter with a gradient: in one pass
    /// per parameter where its arrays are f32 on the CPU ([`fused`]), with libtorch's
    /// element-wise kernels elsewhere. The gradients stay until [`AdamW::zero_grad`].
    pub fn step(&mut self, lr: f64) {
        self.steps += 1;
        let (cfg, steps) = (self.cfg, self.steps);
        tch::no_grad(|| {
            let (mut fusable, mut rest) = (Vec::new(), Vec::new());
            for (i, p) in self.params.iter().enumerate() {
                if !p.grad.defined() {
                    continue;
                }
                if fused::eligible(&p.tensor, &p.grad, &p.m, &p.v) {
                    fusable.push(i);
                } else {
                    rest.push(i);
                }
            }
            let members: Vec<fused::Member<'_>> = fusable
                .iter()
                .map(|&i| {
                    let p = &self.params[i];
                    fused::Member {
                        tensor: &p.tensor,
                        grad: &p.grad,
                        m: &p.m,
                        v: &p.v,
                        decay: p.decay,
                    }
                })
                .collect();
            let threads = usize::try_from(tch::get_num_threads()).unwrap_or(1);
            if !fused::step(&members, fused::Scalars::new(cfg, lr, steps), threads) {
                rest.extend(fusable);
            }
            for i in rest {
                update_by_kernels(&mut self.params[i], cfg, lr, steps);
            }
        });
    }
}

/// One parameter's AdamW update from its gradient by libtorch's element-wise kernels, the
/// `steps`-th (bias correction counts from 1). Fused in-place forms of m = β1·m + (1−β1)·g,
/// v = β2·v + (1−β2)·g², p −= lr/bc1 · m / (√v/√bc2 + ε): fewer kernels and temporaries than
/// the formula as written.
fn update_by_kernels(p: &mut Param, cfg: AdamWConfig, lr: f64, steps: i64) {
    let AdamWConfig {
        beta1,
        beta2,
        eps,
        weight_decay,
    } = cfg;
    let bc1 = 1.0 - beta1.powi(steps as i32);
    let bc2 = 1.0 - beta2.powi(steps as i32);
    if p.decay && weight_decay > 0.0 {
        let _ = p.tensor.g_mul_scalar_(1.0 - lr * weight_decay);
    }
    let g = &p.grad;
    let _ = p.m.lerp_(g, 1.0 - beta1);
    let _ = p.v.g_mul_scalar_(beta2).addcmul_(&(g * (1.0 - beta2)), g);
    let mut denom = p.v.sqrt();
    let _ = denom.g_div_scalar_(bc2.sqrt()).g_add_scalar_(eps);
    let _ = p.tensor.addcdiv_(&(&p.m * (-lr / bc1)), &denom);
}

/// Learning rate at `step` (0-based): linear warm-up to `peak`, then cosine decay to zero at
/// `total`.
pub fn lr_at(step: i64, total: i64, warmup: i64, peak: f64) -> f64 {
    if warmup > 0 && step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = (total - warmup).max(1) as f64;
    let t = ((step - warmup) as f64 / span).clamp(0.0, 1.0);
    peak * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::VarStore;

    #[test]
    fn schedule_warms_up_linearly_then_decays_by_cosine() {
        assert!((lr_at(0, 100, 10, 1.0) - 0.1).abs() < 1e-12);
        assert!((lr_at(9, 100, 10, 1.0) - 1.0).abs() < 1e-12);
        assert!((lr_at(10, 100, 10, 1.0) - 1.0).abs() < 1e-12);
        assert!((lr_at(55, 100, 10, 1.0) - 0.5).abs() < 1e-12);
        assert!(lr_at(100, 100, 10, 1.0).abs() < 1e-12);
        assert!((lr_at(0, 10, 0, 2.0) - 2.0).abs() < 1e-12);
    }

    #[test]
    fn decay_skips_biases_norms_and_tokens() {
        assert!(decays("encoder.blocks.0.attn.qkv.weight", 2));
        assert!(decays("encoder.patch_embed.proj.weight", 4));
        assert!(!decays("encoder.blocks.0.attn.qkv.bias", 1));
        assert!(!decays("encoder.norm.weight", 1));
        assert!(!decays("encoder.cls_token", 3));
        assert!(!decays("decoder.mask_token", 3));
    }

    /// The same numbers torch.optim.AdamW(lr=0.1, betas=(0.9, 0.95), eps=1e-8,
    /// weight_decay=0.05) gives for w = [1, -2], loss = sum(w²), two steps.
    #[test]
    fn adamw_matches_pytorch_on_a_quadratic() {
        let vs = VarStore::new(tch::Device::Cpu);
        let w =
            (vs.root() / "w").var_copy("weight", &Tensor::from_slice(&[1.0f32, -2.0]).view([1, 2]));
        let mut opt = AdamW::new(&vs, AdamWConfig::default());
        for _ in 0..2 {
            opt.zero_grad();
            opt.backward(&w.square().sum(Kind::Float));
            opt.step(0.1);
        }
        let got: Vec<f32> = Vec::try_from(w.flatten(0, -1)).unwrap();
        // Step 1: w ← w(1 − 0.005) − 0.1·sign(g) ; step 2 likewise with the moments.
        let mut expect = [1.0f64, -2.0];
        let (mut m, mut v) = ([0.0f64; 2], [0.0f64; 2]);
        for t in 1..=2 {
            for i in 0..2 {
                let g = 2.0 * expect[i];
                expect[i] *= 1.0 - 0.1 * 0.05;
                m[i] = 0.9 * m[i] + 0.1 * g;
                v[i] = 0.95 * v[i] + 0.05 * g * g;
                let mh = m[i] / (1.0 - 0.9f64.powi(t));
                let denom = v[i].sqrt() / (1.0 - 0.95f64.powi(t)).sqrt() + 1e-8;
                expect[i] -= 0.1 * mh / denom;
            }
        }
        for i in 0..2 {
            assert!(
                (got[i] as f64 - expect[i]).abs() < 1e-6,
                "{got:?} vs {expect:?}"
            );
        }
    }

    #[test]
    fn clipping_scales_gradients_to_the_max_norm() {
        let vs = VarStore::new(tch::Device::Cpu);
        let w = vs.root().var_copy("w", &Tensor::from_slice(&[3.0f32, 4.0]));
        let mut opt = AdamW::new(&vs, AdamWConfig::default());
        opt.backward(&(&w * &Tensor::from_slice(&[3.0f32, 4.0])).sum(Kind::Float));
        assert!((opt.clip_grad_norm(1.0) - 5.0).abs() < 1e-6);
        assert!((opt.grad_norm() - 1.0).abs() < 1e-5);
    }
}
