//! The image–report model: the ViT's image embedding and the report encoder's embedding, each
//! projected into one shared space, and the learnable temperature of the contrastive loss.
//!
//! The image side is the ViT encoder that MAE trains and that is exported (its mean patch token,
//! what timm's `global_pool='avg'` gives), so an image–report model exports the same
//! `encoder.safetensors` as an MAE model; the text side (`text.`) and the projections and
//! temperature (`clip.`) are exported beside it with the tokenizer.
//!
//! The report tokenizer is trained once per run, on the reports of the dataset's first shards,
//! by rank 0, and sent to the other ranks, so that every rank meets the same ids; it is saved in
//! each checkpoint and with the exported model and reused from there (resume, `initFrom`). The
//! embedding table has [`VOCAB`] rows whatever the trained vocabulary's size, so that the
//! variables' shapes never depend on the data.

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use radfm_data::loader::{Cursor, Loader, LoaderConfig};

use crate::collective::Collective;
use crate::model::{Encoder, VitConfig};
use crate::text::{ReportTokenizer, TextConfig, TextEncoder};
use crate::{Error, Result};

/// Width of the shared embedding space.
pub const EMBED_DIM: i64 = 256;
/// Rows of the token embedding table: the largest vocabulary a tokenizer may have.
pub const VOCAB: usize = 2048;
/// Blocks of the text encoder.
pub const TEXT_DEPTH: i64 = 4;
/// Reports the tokenizer is trained on (the dataset's first samples in index order).
pub const TOKENIZER_REPORTS: usize = 20_000;
/// The tokenizer's file in checkpoints and exported models.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// Largest tokenizer file read.
pub const MAX_TOKENIZER_BYTES: usize = 8 << 20;

/// The text encoder's sizes for an image encoder: the same width and heads.
pub fn text_config(image: &VitConfig) -> TextConfig {
    TextConfig {
        vocab: VOCAB as i64,
        width: image.width,
        depth: TEXT_DEPTH,
        heads: image.heads,
    }
}

/// The report encoder, both projections and the temperature.
#[derive(Debug)]
pub struct ImageText {
    /// The report encoder (`text.` variables).
    pub text: TextEncoder,
    image_proj: nn::Linear,
    text_proj: nn::Linear,
    /// log of the inverse temperature (`clip.logit_scale`).
    pub logit_scale: Tensor,
}

fn projection(p: nn::Path, width: i64) -> nn::Linear {
    let cfg = nn::LinearConfig {
        ws_init: nn::Init::Randn {
            mean: 0.0,
            stdev: (width as f64).powf(-0.5),
        },
        bs_init: None,
        bias: false,
    };
    nn::linear(p, width, EMBED_DIM, cfg)
}

impl ImageText {
    /// Creates the variables under `root` (`text.`, `clip.`) for an image encoder of `image`'s
    /// sizes.
    pub fn new(root: &nn::Path, image: &VitConfig) -> ImageText {
        let clip = root / "clip";
        let scale = nn::Init::Const(crate::contrastive::initial_logit_scale());
        ImageText {
            text: TextEncoder::new(root / "text", text_config(image)),
            image_proj: projection(&clip / "image_proj", image.width),
            text_proj: projection(&clip / "text_proj", image.width),
            logit_scale: clip.var("logit_scale", &[], scale),
        }
    }

    /// Images in the shared space, [B, EMBED_DIM] (not normalised).
    pub fn image_embedding(&self, encoder: &Encoder, images: &Tensor) -> Tensor {
        self.project_image(&encoder.embed(images))
    }

    /// The encoder's image embeddings ([`Encoder::embed`]) in the shared space.
    pub fn project_image(&self, features: &Tensor) -> Tensor {
        self.image_proj.forward(features)
    }

    /// Reports in the shared space, [B, EMBED_DIM] (not normalised).
    pub fn text_embedding(&self, ids: &Tensor, mask: &Tensor) -> Tensor {
        self.text_proj.forward(&self.text.forward(ids, mask))
    }

    /// Reports as the tokenizer encodes them, in the shared space.
    pub fn embed_reports(&self, tokenizer: &ReportTokenizer, reports: &[&str]) -> Result<Tensor> {
        let (ids, mask) = tokenizer.encode(reports)?;
        Ok(self.text_embedding(&ids, &mask))
    }
}

/// The reports of a batch, each sample's key named where one is missing.
pub fn batch_reports<'a>(
    keys: &[String],
    reports: &'a [Option<String>],
    dataset: &str,
) -> Result<Vec<&'a str>> {
    keys.iter()
        .zip(reports)
        .map(|(key, r)| {
            r.as_deref().ok_or_else(|| Error::Field {
                field: "model.objective.contrastive".into(),
                reason: format!(
                    "sample {key} of {dataset} has no report (.txt): the contrastive objective pairs every image with its report"
                ),
            })
        })
        .collect()
}

/// Trains the tokenizer on the reports of the dataset's first shards (at most
/// [`TOKENIZER_REPORTS`] samples in index order): one pass without augmentation.
pub async fn train_tokenizer(
    dataset_uri: &str,
    shards: Option<&[u64]>,
    image_size: usize,
) -> Result<ReportTokenizer> {
    let cfg = |shards: Option<Vec<u64>>| LoaderConfig {
        batch_size: 1,
        image_size,
        augment: false,
        shards,
        ..Default::default()
    };
    let mut loader = Loader::open(dataset_uri, cfg(shards.map(<[u64]>::to_vec))).await?;
    let mut first = Vec::new();
    let mut total = 0u64;
    for s in loader.shards() {
        first.push(s.seq);
        total += s.samples;
        if total >= TOKENIZER_REPORTS as u64 {
            break;
        }
    }
    if first.len() < loader.shards().len() {
        loader = Loader::open(dataset_uri, cfg(Some(first))).await?;
    }
    let mut reports = Vec::new();
    let mut missing = None;
    loader
        .run_epoch(Cursor::default(), |batch| {
            match batch_reports(&batch.keys, &batch.reports, dataset_uri) {
                Ok(texts) => reports.extend(texts.into_iter().map(str::to_string)),
                Err(e) => missing = Some(e),
            }
            missing.is_none() && reports.len() < TOKENIZER_REPORTS
        })
        .await?;
    if let Some(e) = missing {
        return Err(e);
    }
    ReportTokenizer::train(reports.into_iter(), VOCAB)
}

/// `tokenizer` (rank 0's; None on the other ranks) on every rank: rank 0 sends its JSON.
pub fn share_tokenizer(
    coll: &mut dyn Collective,
    tokenizer: Option<ReportTokenizer>,
) -> Result<ReportTokenizer> {
    let device = coll.device();
    let json = match &tokenizer {
        Some(t) => t.to_json()?.into_bytes(),
        None => Vec::new(),
    };
    let mut len = Tensor::from_slice(&[json.len() as f32]).to_device(device);
    coll.broadcast(&mut len, 0)?;
    let n = len.double_value(&[0]) as usize;
    if let Some(t) = tokenizer {
        let values: Vec<f32> = json.iter().map(|b| f32::from(*b)).collect();
        coll.broadcast(&mut Tensor::from_slice(&values).to_device(device), 0)?;
        return Ok(t);
    }
    let mut values = Tensor::zeros([n as i64], (Kind::Float, device));
    coll.broadcast(&mut values, 0)?;
    let values: Vec<f32> =
        Vec::try_from(values.to_device(tch::Device::Cpu)).map_err(|e| Error::Field {
            field: "tokenizer".into(),
            reason: format!("rank 0's tokenizer: {e}"),
        })?;
    let bytes: Vec<u8> = values.into_iter().map(|v| v as u8).collect();
    let text = String::from_utf8(bytes).map_err(|e| Error::Field {
        field: "tokenizer".into(),
        reason: format!("rank 0's tokenizer is not UTF-8: {e}"),
    })?;
    ReportTokenizer::from_json(&text)
}

/// A tokenizer read from its file's bytes (a checkpoint's or an exported model's), checked to
/// fit the embedding table.
pub fn tokenizer_from(bytes: &[u8], uri: &str) -> Result<ReportTokenizer> {
    let bad = |reason: String| Error::Checkpoint {
        uri: uri.into(),
        reason,
    };
    let text = std::str::from_utf8(bytes).map_err(|e| bad(format!("{TOKENIZER_FILE}: {e}")))?;
    let tok = ReportTokenizer::from_json(text)?;
    if tok.vocab_size() > VOCAB {
        return Err(bad(format!(
            "{TOKENIZER_FILE} has {} entries, more than the {VOCAB} the text encoder embeds",
            tok.vocab_size()
        )));
    }
    Ok(tok)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> VitConfig {
        VitConfig::preset("vit-tiny", 16, 4).unwrap()
    }

    #[test]
    fn variables_live_under_text_and_clip_and_embeddings_share_one_width() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let enc = Encoder::new(vs.root() / "encoder", tiny());
        let it = ImageText::new(&vs.root(), &tiny());
        let names: Vec<String> = vs.variables().into_keys().collect();
        for want in [
            "clip.image_proj.weight",
            "clip.text_proj.weight",
            "clip.logit_scale",
            "text.token_embed.weight",
            "text.blocks.3.attn.qkv.weight",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
        }
        let images = Tensor::randn([3, 1, 16, 16], (Kind::Float, tch::Device::Cpu));
        assert_eq!(it.image_embedding(&enc, &images).size(), [3, EMBED_DIM]);
        let ids = Tensor::ones([3, 8], (Kind::Int64, tch::Device::Cpu));
        assert_eq!(it.text_embedding(&ids, &ids.ne(0)).size(), [3, EMBED_DIM]);
    }

    #[test]
    fn a_missing_report_is_named_by_its_sample() {
        let keys = vec!["a".to_string(), "b".to_string()];
        let reports = vec![Some("No lesion.".to_string()), None];
        let e = batch_reports(&keys, &reports, "file:///d")
            .unwrap_err()
            .to_string();
        assert!(e.contains("sample b of file:///d has no report"), "{e}");
    }
}
