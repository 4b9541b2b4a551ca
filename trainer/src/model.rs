//! The ViT encoder and the masked-autoencoder decoder.
//!
//! Tensor names follow timm's `VisionTransformer` (`patch_embed.proj`, `blocks.N.attn.qkv`, ...)
//! under the `encoder.` prefix, so an exported encoder loads into timm-style code by name.
//! Position embeddings are fixed 2-D sine-cosine tables (as in MAE) kept as non-trainable
//! variables: they are saved and exported but never updated.

use tch::nn::{self, Init, Module};
use tch::{Kind, Tensor};

use crate::{Error, Result};

/// Encoder and decoder sizes.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VitConfig {
    /// Square input side in pixels.
    pub image_size: i64,
    /// Square patch side in pixels.
    pub patch_size: i64,
    /// Encoder width.
    pub width: i64,
    /// Encoder blocks.
    pub depth: i64,
    /// Encoder attention heads.
    pub heads: i64,
    /// Decoder width.
    pub decoder_width: i64,
    /// Decoder blocks.
    pub decoder_depth: i64,
    /// Decoder attention heads.
    pub decoder_heads: i64,
    /// MLP hidden width over block width.
    pub mlp_ratio: i64,
}

impl VitConfig {
    /// The preset of an architecture name (`vit-tiny`, `vit-small`, `vit-base`), at an image
    /// and patch size.
    pub fn preset(arch: &str, image_size: i64, patch_size: i64) -> Result<VitConfig> {
        let (width, depth, heads, dw, dd, dh) = match arch {
            "vit-tiny" => (192, 12, 3, 128, 2, 4),
            "vit-small" => (384, 12, 6, 256, 4, 8),
            "vit-base" => (768, 12, 12, 512, 8, 16),
            other => {
                return Err(Error::Field {
                    field: "model.architecture".into(),
                    reason: format!("{other:?} is not one of vit-tiny, vit-small, vit-base"),
                });
            }
        };
        let c = VitConfig {
            image_size,
            patch_size,
            width,
            depth,
            heads,
            decoder_width: dw,
            decoder_depth: dd,
            decoder_heads: dh,
            mlp_ratio: 4,
        };
        c.check()?;
        Ok(c)
    }

    /// Checks that the sizes fit together.
    pub fn check(&self) -> Result<()> {
        let bad = |field: &str, reason: String| {
            Err(Error::Field {
                field: field.into(),
                reason,
            })
        };
        if self.patch_size < 1 || self.image_size < self.patch_size {
            return bad(
                "model.patchSize",
                format!(
                    "patch {} must be between 1 and the image size {}",
                    self.patch_size, self.image_size
                ),
            );
        }
        if self.image_size % self.patch_size != 0 {
            return bad(
                "model.imageSize",
                format!(
                    "{} is not a multiple of the patch size {}",
                    self.image_size, self.patch_size
                ),
            );
        }
        if self.width % self.heads != 0 || self.decoder_width % self.decoder_heads != 0 {
            return bad(
                "model.architecture",
                "width must be a multiple of the heads".into(),
            );
        }
        Ok(())
    }

    /// Patches per side.
    pub fn grid(&self) -> i64 {
        self.image_size / self.patch_size
    }

    /// Patches per image.
    pub fn patches(&self) -> i64 {
        self.grid() * self.grid()
    }

    /// Encoder parameters (what the exported model has), for throughput and FLOP estimates.
    pub fn encoder_params(&self) -> i64 {
        let d = self.width;
        let p = self.patch_size;
        let block =
            4 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * (self.mlp_ratio * d * d) + 5 * d;
        d * p * p + d + d + self.depth * block + 2 * d
    }

    /// Model FLOPs of one MAE training step per image: forward plus backward (twice the
    /// forward) of the matrix products and attention, as model-FLOPs utilisation counts them.
    /// The encoder sees the kept patches and the class token, the decoder every token.
    pub fn mae_train_flops(&self, mask_ratio: f64) -> f64 {
        let n = self.patches() as f64;
        let keep = (n * (1.0 - mask_ratio)).round().max(1.0) + 1.0;
        let r = self.mlp_ratio as f64;
        let block = |tokens: f64, d: f64| {
            // qkv, proj and the MLP: (4 + 2r)·d² multiply-adds per token; QKᵀ and AV: 2·t²·d.
            2.0 * tokens * (4.0 + 2.0 * r) * d * d + 2.0 * 2.0 * tokens * tokens * d
        };
        let (d, dd) = (self.width as f64, self.decoder_width as f64);
        let pixels = (self.patch_size * self.patch_size) as f64;
        let forward = 2.0 * n * pixels * d
            + self.depth as f64 * block(keep, d)
            + 2.0 * keep * d * dd
            + self.decoder_depth as f64 * block(n + 1.0, dd)
            + 2.0 * (n + 1.0) * dd * pixels;
        3.0 * forward
    }
}

/// Xavier-uniform linear layer with zero bias, as MAE initialises them.
fn linear(p: nn::Path, i: i64, o: i64) -> nn::Linear {
    let a = (6.0 / (i + o) as f64).sqrt();
    nn::linear(
        p,
        i,
        o,
        nn::LinearConfig {
            ws_init: Init::Uniform { lo: -a, up: a },
            bs_init: Some(Init::Const(0.0)),
            bias: true,
        },
    )
}

fn layer_norm(p: nn::Path, d: i64) -> nn::LayerNorm {
    nn::layer_norm(
        p,
        vec![d],
        nn::LayerNormConfig {
            eps: 1e-6,
            ..Default::default()
        },
    )
}

/// 2-D sine-cosine position table with a leading all-zero row for the class token,
/// shape [1, 1 + grid², dim].
pub fn sincos_pos_embed(dim: i64, grid: i64) -> Tensor {
    let quarter = dim / 4;
    let mut table = vec![0f32; ((1 + grid * grid) * dim) as usize];
    for gy in 0..grid {
        for gx in 0..grid {
            let row = (1 + gy * grid + gx) as usize * dim as usize;
            // First half encodes the column (w), second half the row (h), as MAE does.
            for (half, pos) in [(0usize, gx), (1usize, gy)] {
                for k in 0..quarter {
                    let omega = 1.0 / 10000f64.powf(k as f64 / quarter as f64);
                    let v = pos as f64 * omega;
                    let base = row + half * (dim as usize / 2);
                    table[base + k as usize] = v.sin() as f32;
                    table[base + quarter as usize + k as usize] = v.cos() as f32;
                }
            }
        }
    }
    Tensor::from_slice(&table).view([1, 1 + grid * grid, dim])
}

/// One transformer block (timm names: norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2).
#[derive(Debug)]
pub(crate) struct Block {
    norm1: nn::LayerNorm,
    qkv: nn::Linear,
    proj: nn::Linear,
    norm2: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    heads: i64,
}

impl Block {
    pub(crate) fn new(p: nn::Path, d: i64, heads: i64, mlp_ratio: i64) -> Block {
        Block {
            norm1: layer_norm(&p / "norm1", d),
            qkv: linear(&p / "attn" / "qkv", d, 3 * d),
            proj: linear(&p / "attn" / "proj", d, d),
            norm2: layer_norm(&p / "norm2", d),
            fc1: linear(&p / "mlp" / "fc1", d, mlp_ratio * d),
            fc2: linear(&p / "mlp" / "fc2", mlp_ratio * d, d),
            heads,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.forward_attending(x, None)
    }

    /// The block where each token attends only to the tokens `attend` marks (bool, broadcast
    /// to `[batch, heads, tokens, tokens]`; padding excluded), or to all of them.
    pub(crate) fn forward_attending(&self, x: &Tensor, attend: Option<&Tensor>) -> Tensor {
        let (b, n, d) = x.size3().expect("tokens are [batch, tokens, dim]");
        let h = self.heads;
        let qkv = self
            .qkv
            .forward(&self.norm1.forward(x))
            .view([b, n, 3, h, d / h])
            .permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let a = Tensor::scaled_dot_product_attention(&q, &k, &v, attend, 0.0, false, None, false)
            .transpose(1, 2)
            .reshape([b, n, d]);
        let x = x + self.proj.forward(&a);
        let m = self
            .fc2
            .forward(&self.fc1.forward(&self.norm2.forward(&x)).gelu("none"));
        x + m
    }
}

/// The ViT encoder.
#[derive(Debug)]
pub struct Encoder {
    /// Sizes.
    pub cfg: VitConfig,
    patch: nn::Conv2D,
    cls_token: Tensor,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    norm: nn::LayerNorm,
}

impl Encoder {
    /// Creates the encoder's variables under `p` (timm names).
    pub fn new(p: nn::Path, cfg: VitConfig) -> Encoder {
        let d = cfg.width;
        let k = cfg.patch_size;
        let a = (6.0 / (k * k + d) as f64).sqrt();
        let patch = nn::conv2d(
            &p / "patch_embed" / "proj",
            1,
            d,
            k,
            nn::ConvConfig {
                stride: k,
                ws_init: Init::Uniform { lo: -a, up: a },
                bs_init: Init::Const(0.0),
                ..Default::default()
            },
        );
        let cls_token = p.var(
            "cls_token",
            &[1, 1, d],
            Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        );
        let mut pos_embed = p.zeros_no_train("pos_embed", &[1, 1 + cfg.patches(), d]);
        tch::no_grad(|| {
            pos_embed.copy_(&sincos_pos_embed(d, cfg.grid()).to_device(pos_embed.device()))
        });
        let blocks = (0..cfg.depth)
            .map(|i| Block::new(&p / "blocks" / i, d, cfg.heads, cfg.mlp_ratio))
            .collect();
        Encoder {
            cfg,
            patch,
            cls_token,
            pos_embed,
            blocks,
            norm: layer_norm(&p / "norm", d),
        }
    }

    /// The device of the encoder's variables.
    pub fn device(&self) -> tch::Device {
        self.cls_token.device()
    }

    /// Patch tokens with position embeddings, [B, N, D].
    fn tokens(&self, images: &Tensor) -> Tensor {
        let x = self.patch.forward(images).flatten(2, 3).transpose(1, 2);
        x + self.pos_embed.narrow(1, 1, self.cfg.patches())
    }

    fn run(&self, x: Tensor) -> Tensor {
        let b = x.size()[0];
        let cls = (&self.cls_token + self.pos_embed.narrow(1, 0, 1)).expand([b, -1, -1], false);
        let mut x = Tensor::cat(&[cls, x], 1);
        for blk in &self.blocks {
            x = blk.forward(&x);
        }
        self.norm.forward(&x)
    }

    /// All tokens after the final norm, [B, 1 + N, D] (timm's `forward_features`).
    pub fn forward_features(&self, images: &Tensor) -> Tensor {
        self.run(self.tokens(images))
    }

    /// One embedding per image: the mean of the patch tokens, [B, D].
    pub fn embed(&self, images: &Tensor) -> Tensor {
        let f = self.forward_features(images);
        f.narrow(1, 1, self.cfg.patches())
            .mean_dim(1, false, Kind::Float)
    }

    /// Encodes the kept patches of a random mask given by per-patch noise [B, N] (each image
    /// keeps its patches of lowest noise): (latent [B, 1 + keep, D], mask [B, N] with 1 for
    /// masked patches, ids_restore [B, N]).
    pub fn forward_masked_with(
        &self,
        images: &Tensor,
        mask_ratio: f64,
        noise: &Tensor,
    ) -> (Tensor, Tensor, Tensor) {
        let x = self.tokens(images);
        let (b, n, d) = x.size3().expect("tokens are [batch, tokens, dim]");
        let keep = ((n as f64) * (1.0 - mask_ratio)).round().max(1.0) as i64;
        let ids_shuffle = noise.argsort(1, false);
        let ids_restore = ids_shuffle.argsort(1, false);
        let ids_keep = ids_shuffle.narrow(1, 0, keep);
        let kept = x.gather(
            1,
            &ids_keep.unsqueeze(-1).expand([b, keep, d], false),
            false,
        );
        let mask = Tensor::ones([b, n], (Kind::Float, x.device()));
        let _ = mask.narrow(1, 0, keep).fill_(0.0);
        let mask = mask.gather(1, &ids_restore, false);
        (self.run(kept), mask, ids_restore)
    }
}

/// The shallow MAE decoder: reconstructs every patch from the visible latents.
#[derive(Debug)]
pub struct Decoder {
    embed: nn::Linear,
    mask_token: Tensor,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    norm: nn::LayerNorm,
    pred: nn::Linear,
    patches: i64,
}

impl Decoder {
    /// Creates the decoder's variables under `p`.
    pub fn new(p: nn::Path, cfg: VitConfig) -> Decoder {
        let dd = cfg.decoder_width;
        let mut pos_embed = p.zeros_no_train("decoder_pos_embed", &[1, 1 + cfg.patches(), dd]);
        tch::no_grad(|| {
            pos_embed.copy_(&sincos_pos_embed(dd, cfg.grid()).to_device(pos_embed.device()))
        });
        Decoder {
            embed: linear(&p / "decoder_embed", cfg.width, dd),
            mask_token: p.var(
                "mask_token",
                &[1, 1, dd],
                Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            ),
            pos_embed,
            blocks: (0..cfg.decoder_depth)
                .map(|i| {
                    Block::new(
                        &p / "decoder_blocks" / i,
                        dd,
                        cfg.decoder_heads,
                        cfg.mlp_ratio,
                    )
                })
                .collect(),
            norm: layer_norm(&p / "decoder_norm", dd),
            pred: linear(&p / "decoder_pred", dd, cfg.patch_size * cfg.patch_size),
            patches: cfg.patches(),
        }
    }

    /// Predicted pixels of every patch, [B, N, patch²].
    pub fn forward(&self, latent: &Tensor, ids_restore: &Tensor) -> Tensor {
        let x = self.embed.forward(latent);
        let (b, l, dd) = x.size3().expect("latent is [batch, tokens, dim]");
        let n = self.patches;
        let masked = self.mask_token.expand([b, n + 1 - l, dd], false);
        let seq = Tensor::cat(&[x.narrow(1, 1, l - 1), masked], 1);
        let seq = seq.gather(
            1,
            &ids_restore.unsqueeze(-1).expand([b, n, dd], false),
            false,
        );
        let mut x = Tensor::cat(&[x.narrow(1, 0, 1), seq], 1) + &self.pos_embed;
        for blk in &self.blocks {
            x = blk.forward(&x);
        }
        self.pred.forward(&self.norm.forward(&x)).narrow(1, 1, n)
    }
}

/// [B, 1, H, W] images as [B, N, patch²] patch rows (row-major patches, row-major pixels).
pub fn patchify(images: &Tensor, patch: i64) -> Tensor {
    let (b, _, h, w) = images
        .size4()
        .expect("images are [batch, 1, height, width]");
    let (gh, gw) = (h / patch, w / patch);
    images
        .reshape([b, 1, gh, patch, gw, patch])
        .permute([0, 2, 4, 3, 5, 1])
        .reshape([b, gh * gw, patch * patch])
}

/// Encoder plus decoder.
#[derive(Debug)]
pub struct Mae {
    /// The encoder (`encoder.` variables).
    pub encoder: Encoder,
    /// The decoder (`decoder.` variables).
    pub decoder: Decoder,
    /// Sizes.
    pub cfg: VitConfig,
    /// Targets are pixels normalised per patch (MAE's default) rather than raw pixels.
    pub norm_pix: bool,
}

impl Mae {
    /// Creates every variable under `root`.
    pub fn new(root: &nn::Path, cfg: VitConfig) -> Mae {
        Mae {
            encoder: Encoder::new(root / "encoder", cfg),
            decoder: Decoder::new(root / "decoder", cfg),
            cfg,
            norm_pix: true,
        }
    }

    /// The MAE loss: mean squared error on masked patches against (per-patch normalised) pixels.
    pub fn loss(&self, images: &Tensor, mask_ratio: f64) -> Tensor {
        let b = images.size()[0];
        let noise = Tensor::rand([b, self.cfg.patches()], (Kind::Float, images.device()));
        self.loss_with(images, mask_ratio, &noise)
    }

    /// [`Mae::loss`] with given masking noise [B, N].
    pub fn loss_with(&self, images: &Tensor, mask_ratio: f64, noise: &Tensor) -> Tensor {
        let (latent, mask, ids_restore) =
            self.encoder.forward_masked_with(images, mask_ratio, noise);
        let pred = self
            .decoder
            .forward(&latent, &ids_restore)
            .to_kind(Kind::Float);
        let target = patchify(images, self.cfg.patch_size);
        let target = if self.norm_pix {
            let mean = target.mean_dim(-1, true, Kind::Float);
            let var = target.var_dim(-1, true, true); // unbiased, as MAE
            (target - mean) / (var + 1e-6).sqrt()
        } else {
            target
        };
        let per_patch = (pred - target).square().mean_dim(-1, false, Kind::Float);
        (per_patch * &mask).sum(Kind::Float) / mask.sum(Kind::Float)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> VitConfig {
        VitConfig {
            image_size: 16,
            patch_size: 4,
            width: 16,
            depth: 2,
            heads: 2,
            decoder_width: 8,
            decoder_depth: 1,
            decoder_heads: 2,
            mlp_ratio: 2,
        }
    }

    #[test]
    fn vit_base_16_flops_match_the_published_count() {
        // timm/fvcore count 17.6 GMACs for ViT-B/16 at 224 (3 input channels; one channel
        // saves 0.08 G in the patch embedding). Without masking the encoder's share of the
        // training FLOPs is 3 × 2 × that.
        let base = VitConfig::preset("vit-base", 224, 16).unwrap();
        let no_decoder = VitConfig {
            decoder_depth: 0,
            ..base
        };
        let per_image = no_decoder.mae_train_flops(0.0);
        let encoder_only =
            per_image - 3.0 * (2.0 * 197.0 * 512.0 * 768.0 + 2.0 * 197.0 * 512.0 * 256.0);
        let published = 3.0 * 2.0 * 17.58e9;
        assert!(
            (encoder_only / published - 1.0).abs() < 0.01,
            "{encoder_only:e}"
        );
        // Masking 75 % leaves the encoder a quarter of the tokens.
        assert!(base.mae_train_flops(0.75) < 0.5 * base.mae_train_flops(0.0));
    }

    #[test]
    fn variable_names_follow_timm() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let _ = Mae::new(&vs.root(), tiny());
        let names = vs.variables();
        for n in [
            "encoder.patch_embed.proj.weight",
            "encoder.patch_embed.proj.bias",
            "encoder.cls_token",
            "encoder.pos_embed",
            "encoder.blocks.1.attn.qkv.weight",
            "encoder.blocks.1.attn.proj.bias",
            "encoder.blocks.0.mlp.fc2.weight",
            "encoder.blocks.0.norm2.bias",
            "encoder.norm.weight",
            "decoder.mask_token",
            "decoder.decoder_pred.weight",
        ] {
            assert!(names.contains_key(n), "{n} missing from {:?}", names.keys());
        }
        assert!(!names["encoder.pos_embed"].requires_grad());
        assert_eq!(
            names["encoder.patch_embed.proj.weight"].size(),
            [16, 1, 4, 4]
        );
    }

    #[test]
    fn masking_keeps_a_quarter_and_marks_the_rest() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let m = Mae::new(&vs.root(), tiny());
        let x = Tensor::randn([3, 1, 16, 16], (Kind::Float, tch::Device::Cpu));
        let noise = Tensor::rand([3, 16], (Kind::Float, tch::Device::Cpu));
        let (latent, mask, restore) = m.encoder.forward_masked_with(&x, 0.75, &noise);
        assert_eq!(latent.size(), [3, 1 + 4, 16]);
        assert_eq!(mask.sum(Kind::Float).double_value(&[]), 3.0 * 12.0);
        assert_eq!(restore.size(), [3, 16]);
        assert_eq!(m.decoder.forward(&latent, &restore).size(), [3, 16, 16]);
        let loss = m.loss(&x, 0.75).double_value(&[]);
        assert!(loss.is_finite() && loss > 0.0);
    }

    #[test]
    fn patchify_orders_patches_row_major() {
        let x = Tensor::arange(16, (Kind::Float, tch::Device::Cpu)).view([1, 1, 4, 4]);
        let p = patchify(&x, 2);
        let first: Vec<f32> = Vec::try_from(p.get(0).get(0)).unwrap();
        let second: Vec<f32> = Vec::try_from(p.get(0).get(1)).unwrap();
        assert_eq!(first, [0.0, 1.0, 4.0, 5.0]);
        assert_eq!(second, [2.0, 3.0, 6.0, 7.0]);
    }

    #[test]
    fn sincos_table_has_a_zero_class_row_and_unit_rows() {
        let t = sincos_pos_embed(8, 2);
        assert_eq!(t.size(), [1, 5, 8]);
        assert_eq!(
            t.get(0).get(0).abs().sum(Kind::Float).double_value(&[]),
            0.0
        );
        // sin² + cos² = 1 for each of the 4 frequency pairs of a row.
        let row = t.get(0).get(4).square().sum(Kind::Float).double_value(&[]);
        assert!((row - 4.0).abs() < 1e-5);
    }

    #[test]
    fn presets_reject_sizes_that_do_not_tile() {
        let e = VitConfig::preset("vit-tiny", 100, 16).unwrap_err();
        assert!(e.to_string().contains("model.imageSize"), "{e}");
        let e = VitConfig::preset("vit-huge", 224, 16).unwrap_err();
        assert!(e.to_string().contains("model.architecture"), "{e}");
    }
}
