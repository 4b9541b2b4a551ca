//! Export of the pretrained encoder for the rest of the ecosystem, and loading it back.
//!
//! An exported model is a folder: `encoder.safetensors` with timm's ViT tensor names
//! (`patch_embed.proj.weight`, `blocks.0.attn.qkv.weight`, `norm.weight`, ...; 1 input channel)
//! and `model_card.json` (architecture, input normalisation, dataset and shard range, steps,
//! final loss, code version). A model trained with the image–report objective also has
//! `text.safetensors` (the report encoder `text.*`, the projections and temperature `clip.*`)
//! and `tokenizer.json` (Hugging Face `tokenizers` format), both named in the card with their
//! digests. The card is written last, so a folder with a card is complete.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::nn::VarStore;

use radfm_data::store::Location;

use crate::checkpoint::{self, DataRef};
use crate::model::{Encoder, VitConfig};
use crate::{Error, Result, tensors};

pub use radfm_api::export_files::{CARD, WEIGHTS};
/// Format of the model card.
pub const CARD_FORMAT: &str = "radfm.model-card/v1";

/// Input the encoder expects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputSpec {
    /// Channels (1: grayscale).
    pub channels: u32,
    /// Square side in pixels.
    pub image_size: i64,
    /// Physical intensity mean subtracted.
    pub mean: f64,
    /// Physical intensity standard deviation divided by.
    pub std: f64,
}

/// The model card written beside exported weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCard {
    /// Card format.
    pub format: String,
    /// Architecture preset.
    pub architecture: String,
    /// Sizes.
    pub vit: VitConfig,
    /// Naming convention of the tensors.
    pub tensor_names: String,
    /// Expected input.
    pub input: InputSpec,
    /// Pretraining objective.
    pub objective: String,
    /// Mask ratio of pretraining.
    pub mask_ratio: f64,
    /// Dataset and shard range trained on.
    pub dataset: DataRef,
    /// Optimizer steps.
    pub steps: i64,
    /// Planned total steps of the run.
    pub total_steps: i64,
    /// Loss at the checkpoint.
    pub final_loss: Option<f64>,
    /// (step, mean loss) of the run's logged windows (the training curve).
    #[serde(default)]
    pub loss_history: Vec<(i64, f64)>,
    /// Checkpoint manifest it came from.
    pub checkpoint: String,
    /// sha256 of encoder.safetensors.
    pub weights_sha256: String,
    /// Encoder parameters.
    pub parameters: i64,
    /// radfm version that trained it.
    pub code_version: String,
    /// When it was exported (RFC 3339).
    pub created: String,
    /// The report side of an image–report model (None: trained on images alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<TextCard>,
    /// How timm builds the module that loads `encoder.safetensors` with `strict=True`
    /// (absent in cards of older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timm: Option<TimmConstructor>,
}

/// `timm.create_model(model, **kwargs)`, with which `encoder.safetensors` loads strictly and
/// the model's output is the embedding radfm uses (mean patch token after the final norm).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimmConstructor {
    /// timm's model name of the preset.
    pub model: String,
    /// Keyword arguments.
    pub kwargs: serde_json::Map<String, serde_json::Value>,
}

impl TimmConstructor {
    /// The constructor of an architecture preset at `vit`'s sizes.
    pub fn of(architecture: &str, vit: &VitConfig) -> TimmConstructor {
        let model = format!("{}_patch16_224", architecture.replace('-', "_"));
        use serde_json::json;
        let kwargs = [
            ("img_size", json!(vit.image_size)),
            ("patch_size", json!(vit.patch_size)),
            ("in_chans", json!(1)),
            ("class_token", json!(true)),
            ("global_pool", json!("avg")),
            ("fc_norm", json!(false)),
            ("num_classes", json!(0)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        TimmConstructor { model, kwargs }
    }

    /// The Python call, as the docs and the card's readers write it.
    pub fn call(&self) -> String {
        let args: Vec<String> = self
            .kwargs
            .iter()
            .map(|(k, v)| match v {
                serde_json::Value::Bool(b) => format!("{k}={}", if *b { "True" } else { "False" }),
                other => format!("{k}={other}"),
            })
            .collect();
        format!("timm.create_model(\"{}\", {})", self.model, args.join(", "))
    }
}

/// The report side of an exported image–report model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextCard {
    /// The file of the report encoder, projections and temperature.
    pub weights: String,
    /// sha256 of it.
    pub weights_sha256: String,
    /// The tokenizer's file.
    pub tokenizer: String,
    /// sha256 of it.
    pub tokenizer_sha256: String,
    /// Width of the shared image–text space.
    pub embed_dim: i64,
    /// Rows of the token embedding table.
    pub vocab: i64,
    /// Text encoder width.
    pub width: i64,
    /// Text encoder blocks.
    pub depth: i64,
    /// Text encoder heads.
    pub heads: i64,
    /// Tokens kept per report.
    pub max_tokens: usize,
    /// How the tensors are named and used.
    pub tensor_names: String,
}

/// The file of the report side of an exported image–report model.
pub const TEXT_WEIGHTS: &str = "text.safetensors";

/// timm's constructor arguments that load `encoder.safetensors` with `strict=True` (ViT sizes
/// aside): the final `norm` is applied before average pooling, so there is no `fc_norm`.
pub const TIMM_ARGS: &str =
    "in_chans=1, class_token=True, global_pool='avg', fc_norm=False, num_classes=0";

/// Exports the newest committed checkpoint under `checkpoint_uri` into the folder `out_uri`.
pub async fn export(checkpoint_uri: &str, out_uri: &str) -> Result<ModelCard> {
    let loaded = latest(checkpoint_uri).await?;
    let model = tensors::from_bytes(loaded.object("model.safetensors")?, &loaded.uri)?;
    let card = card_of_checkpoint(&loaded)?;
    let tokenizer = loaded
        .object(crate::image_text::TOKENIZER_FILE)
        .ok()
        .map(|b| b.to_vec());
    write(model, card, tokenizer, out_uri).await
}

/// Exports a model of every variable given as safetensors bytes (a federation's result,
/// `model_uri` naming where it came from) with the card of the model it was trained from:
/// `base_uri` is a checkpoint folder (its newest commit's configuration) or an exported model
/// folder (its card). `steps` is the training it had since the base.
pub async fn export_model(
    model: &[u8],
    model_uri: &str,
    base_uri: &str,
    steps: i64,
    out_uri: &str,
) -> Result<ModelCard> {
    let base = Location::open(base_uri)?;
    let mut card = match base.get_bounded(CARD, 1 << 20).await? {
        Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| Error::Checkpoint {
            uri: base.child_uri(CARD),
            reason: format!("not a model card: {e}"),
        })?,
        None => card_of_checkpoint(&latest(base_uri).await?)?,
    };
    card.steps = steps;
    card.total_steps = steps;
    card.final_loss = None;
    card.loss_history = Vec::new();
    card.checkpoint = model_uri.to_string();
    card.code_version = env!("CARGO_PKG_VERSION").into();
    card.text = None;
    write(tensors::from_bytes(model, model_uri)?, card, None, out_uri).await
}

/// The whole model (every variable: the encoder from the exported folder `uri`, the decoder
/// freshly initialised from `seed`) as safetensors bytes: what a federation's round 1 starts
/// from when its base model is a registered version.
pub async fn full_model(uri: &str, seed: i64) -> Result<Vec<u8>> {
    let card = load(uri, tch::Device::Cpu).await?.card;
    tch::manual_seed(seed);
    let vars = VarStore::new(tch::Device::Cpu);
    let _mae = crate::model::Mae::new(&vars.root(), card.vit);
    load_init(&vars, uri).await?;
    let mut named: Vec<(String, tch::Tensor)> = vars.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    tensors::to_bytes(&named, None, uri)
}

async fn latest(checkpoint_uri: &str) -> Result<checkpoint::Loaded> {
    let ckpt = Location::open(checkpoint_uri)?;
    checkpoint::load_latest(&ckpt, |e| eprintln!("radfm: skipping checkpoint: {e}"))
        .await?
        .ok_or_else(|| Error::Checkpoint {
            uri: checkpoint_uri.into(),
            reason: "no committed checkpoint".into(),
        })
}

/// The card of a checkpoint (weights digest and parameters are filled in by [`write`]).
fn card_of_checkpoint(loaded: &checkpoint::Loaded) -> Result<ModelCard> {
    let state = &loaded.manifest.state;
    let field = |name: &str| {
        state
            .config
            .get(name)
            .cloned()
            .ok_or_else(|| Error::Checkpoint {
                uri: loaded.uri.clone(),
                reason: format!("state.config lacks {name}"),
            })
    };
    let vit: VitConfig =
        serde_json::from_value(field("model")?).map_err(|e| Error::Checkpoint {
            uri: loaded.uri.clone(),
            reason: format!("state.config.model: {e}"),
        })?;
    let architecture = field("arch")?.as_str().unwrap_or_default().to_string();
    Ok(ModelCard {
        format: CARD_FORMAT.into(),
        timm: Some(TimmConstructor::of(&architecture, &vit)),
        architecture,
        vit,
        tensor_names: format!("timm VisionTransformer ({TIMM_ARGS})"),
        input: InputSpec {
            channels: 1,
            image_size: vit.image_size,
            mean: state.data.mean,
            std: if state.data.std > 0.0 {
                state.data.std
            } else {
                1.0
            },
        },
        objective: objective_of(state.config.get("objective")),
        mask_ratio: field("mask_ratio")?.as_f64().unwrap_or_default(),
        dataset: state.data.clone(),
        steps: state.step,
        total_steps: state.total_steps,
        final_loss: state.loss,
        loss_history: state.loss_history.clone(),
        checkpoint: loaded.uri.clone(),
        weights_sha256: String::new(),
        parameters: 0,
        code_version: state.code_version.clone(),
        created: String::new(),
        text: None,
    })
}

/// The card's words for a run's objectives (a checkpoint without any: MAE, as before there
/// was a choice).
fn objective_of(config: Option<&serde_json::Value>) -> String {
    let o: radfm_api::trainingjob::Objective = config
        .and_then(|v| serde_json::from_value(v.clone()).ok())
        .unwrap_or_default();
    let mut parts = Vec::new();
    if let Some(w) = o.mae {
        parts.push(format!(
            "masked autoencoding, normalised-pixel targets (weight {w})"
        ));
    }
    if let Some(w) = o.contrastive {
        parts.push(format!(
            "image-report contrastive, symmetric InfoNCE over the global batch (weight {w})"
        ));
    }
    parts.join(" + ")
}

/// Writes the encoder of `model` (its `encoder.` variables), its report side (`text.`, `clip.`)
/// with `tokenizer` where it has one, and `card` into `out_uri`, the card last.
async fn write(
    model: Vec<(String, tch::Tensor)>,
    mut card: ModelCard,
    tokenizer: Option<Vec<u8>>,
    out_uri: &str,
) -> Result<ModelCard> {
    let (text, model): (Vec<_>, Vec<_>) = model
        .into_iter()
        .partition(|(n, _)| n.starts_with("text.") || n.starts_with("clip."));
    let encoder: Vec<(String, tch::Tensor)> = model
        .into_iter()
        .filter_map(|(n, t)| n.strip_prefix("encoder.").map(|s| (s.to_string(), t)))
        .collect();
    card.parameters = encoder
        .iter()
        .filter(|(n, _)| n != "pos_embed")
        .map(|(_, t)| t.numel() as i64)
        .sum();
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    let weights = tensors::to_bytes(&encoder, Some(meta.clone()), WEIGHTS)?;
    card.weights_sha256 = hex::encode(Sha256::digest(&weights));
    card.created = jiff::Timestamp::now().to_string();
    let out = Location::open(out_uri)?;
    out.put(WEIGHTS, weights).await?;
    if !text.is_empty() {
        let tokenizer = tokenizer.ok_or_else(|| Error::Checkpoint {
            uri: card.checkpoint.clone(),
            reason: format!(
                "it has a report encoder but no {}",
                crate::image_text::TOKENIZER_FILE
            ),
        })?;
        let bytes = tensors::to_bytes(&text, Some(meta), TEXT_WEIGHTS)?;
        card.text = Some(text_card(&card.vit, &bytes, &tokenizer));
        out.put(TEXT_WEIGHTS, bytes).await?;
        out.put(crate::image_text::TOKENIZER_FILE, tokenizer)
            .await?;
    }
    out.put(
        CARD,
        serde_json::to_vec_pretty(&card).expect("cards serialise"),
    )
    .await?;
    Ok(card)
}

fn text_card(vit: &VitConfig, weights: &[u8], tokenizer: &[u8]) -> TextCard {
    let t = crate::image_text::text_config(vit);
    TextCard {
        weights: TEXT_WEIGHTS.into(),
        weights_sha256: hex::encode(Sha256::digest(weights)),
        tokenizer: crate::image_text::TOKENIZER_FILE.into(),
        tokenizer_sha256: hex::encode(Sha256::digest(tokenizer)),
        embed_dim: crate::image_text::EMBED_DIM,
        vocab: t.vocab,
        width: t.width,
        depth: t.depth,
        heads: t.heads,
        max_tokens: crate::text::MAX_TOKENS,
        tensor_names: "text.token_embed.weight, text.pos_embed, text.blocks.N.* (timm block \
                       names), text.norm.*: report encoder, mean over the report's tokens; \
                       clip.image_proj.weight applied to encoder.safetensors' mean patch token \
                       (after norm), clip.text_proj.weight to the report's; clip.logit_scale: \
                       log inverse temperature"
            .into(),
    }
}

/// An encoder loaded for inference.
pub struct LoadedEncoder {
    /// Holds the variables.
    pub vars: VarStore,
    /// The encoder.
    pub encoder: Encoder,
    /// Its card.
    pub card: ModelCard,
    /// The report side, for a model trained with the image–report objective.
    pub image_text: Option<(crate::image_text::ImageText, crate::text::ReportTokenizer)>,
}

/// Largest exported encoder read (a ViT-g in f32 is about 4 GiB).
pub const MAX_WEIGHTS_BYTES: usize = 8 << 30;

/// Loads an exported model folder.
pub async fn load(uri: &str, device: tch::Device) -> Result<LoadedEncoder> {
    let loc = Location::open(uri)?;
    let bad = |reason: String| Error::Checkpoint {
        uri: uri.into(),
        reason,
    };
    let card: ModelCard = serde_json::from_slice(
        &loc.get_bounded(CARD, radfm_data::index::MAX_DOCUMENT_BYTES)
            .await?
            .ok_or_else(|| bad(format!("no {CARD}: not an exported model")))?,
    )
    .map_err(|e| bad(format!("{CARD}: {e}")))?;
    let weights = loc
        .get_bounded(WEIGHTS, MAX_WEIGHTS_BYTES)
        .await?
        .ok_or_else(|| bad(format!("{WEIGHTS} is missing")))?;
    if hex::encode(Sha256::digest(&weights)) != card.weights_sha256 {
        return Err(bad(format!("{WEIGHTS} does not match the card's sha256")));
    }
    let vars = VarStore::new(device);
    let encoder = Encoder::new(vars.root() / "encoder", card.vit);
    let named: Vec<(String, tch::Tensor)> = tensors::from_bytes(&weights, uri)?
        .into_iter()
        .map(|(n, t)| (format!("encoder.{n}"), t))
        .collect();
    tensors::load_into(&vars, &named, "", uri)?;
    let image_text = match &card.text {
        None => None,
        Some(t) => Some(load_text(&loc, &vars, &card.vit, t, uri).await?),
    };
    Ok(LoadedEncoder {
        vars,
        encoder,
        card,
        image_text,
    })
}

/// The report side of an exported model, checked against its card's digests.
async fn load_text(
    loc: &Location,
    vars: &VarStore,
    vit: &VitConfig,
    card: &TextCard,
    uri: &str,
) -> Result<(crate::image_text::ImageText, crate::text::ReportTokenizer)> {
    let bad = |reason: String| Error::Checkpoint {
        uri: uri.into(),
        reason,
    };
    let weights = loc
        .get_bounded(TEXT_WEIGHTS, MAX_WEIGHTS_BYTES)
        .await?
        .ok_or_else(|| bad(format!("{TEXT_WEIGHTS} is missing")))?;
    let tokenizer = loc
        .get_bounded(
            crate::image_text::TOKENIZER_FILE,
            crate::image_text::MAX_TOKENIZER_BYTES,
        )
        .await?
        .ok_or_else(|| bad(format!("{} is missing", crate::image_text::TOKENIZER_FILE)))?;
    for (file, bytes, want) in [
        (TEXT_WEIGHTS, &weights, &card.weights_sha256),
        (
            crate::image_text::TOKENIZER_FILE,
            &tokenizer,
            &card.tokenizer_sha256,
        ),
    ] {
        if hex::encode(Sha256::digest(bytes)) != *want {
            return Err(bad(format!("{file} does not match the card's sha256")));
        }
    }
    let it = crate::image_text::ImageText::new(&vars.root(), vit);
    let named = tensors::from_bytes(&weights, uri)?;
    tensors::load_into(vars, &named, "text.", uri)?;
    tensors::load_into(vars, &named, "clip.", uri)?;
    let tok = crate::image_text::tokenizer_from(&tokenizer, uri)?;
    Ok((it, tok))
}

/// The report tokenizer of what `init_from` names, where it has one: an exported image–report
/// model's, or the newest committed checkpoint's (None for a `.safetensors` file or a model
/// trained on images alone: the run trains its own).
pub async fn init_tokenizer(uri: &str) -> Result<Option<crate::text::ReportTokenizer>> {
    use crate::image_text::{MAX_TOKENIZER_BYTES, TOKENIZER_FILE, tokenizer_from};
    if uri.ends_with(".safetensors") {
        return Ok(None);
    }
    let loc = Location::open(uri)?;
    if loc.get_opt(CARD).await?.is_some() {
        return match loc.get_bounded(TOKENIZER_FILE, MAX_TOKENIZER_BYTES).await? {
            Some(bytes) => Ok(Some(tokenizer_from(&bytes, uri)?)),
            None => Ok(None),
        };
    }
    let loaded = latest(uri).await?;
    match loaded.object(TOKENIZER_FILE) {
        Ok(bytes) => Ok(Some(tokenizer_from(bytes, &loaded.uri)?)),
        Err(_) => Ok(None),
    }
}

/// Initialises `vars` from `uri`: an exported model folder (the encoder, and an image–report
/// model's report side; the rest keeps its fresh initialisation), a checkpoint folder (its newest
/// committed checkpoint, every variable), or a `.safetensors` file of every variable (a
/// federated round's global model).
pub async fn load_init(vars: &VarStore, uri: &str) -> Result<usize> {
    if let Some((folder, file)) = uri.rsplit_once('/')
        && file.ends_with(".safetensors")
    {
        let bytes = Location::open(folder)?
            .get_opt(file)
            .await?
            .ok_or_else(|| Error::Checkpoint {
                uri: uri.into(),
                reason: "initFrom names a safetensors file that does not exist".into(),
            })?;
        let model = tensors::from_bytes(&bytes, uri)?;
        return tensors::load_into(vars, &model, "", uri);
    }
    let loc = Location::open(uri)?;
    if loc.get_opt(CARD).await?.is_some() {
        let exported = load(uri, tch::Device::Cpu).await?;
        let named: Vec<(String, tch::Tensor)> = exported.vars.variables().into_iter().collect();
        let mut copied = tensors::load_into(vars, &named, "encoder.", uri)?;
        if exported.image_text.is_some() {
            copied += tensors::load_into(vars, &named, "text.", uri)?;
            copied += tensors::load_into(vars, &named, "clip.", uri)?;
        }
        return Ok(copied);
    }
    let loaded = checkpoint::load_latest(&loc, |e| eprintln!("radfm-trainer: skipping checkpoint: {e}"))
        .await?
        .ok_or_else(|| Error::Checkpoint {
            uri: uri.into(),
            reason: format!("initFrom names neither an exported model ({CARD}) nor a folder with committed checkpoints"),
        })?;
    let model = tensors::from_bytes(loaded.object("model.safetensors")?, &loaded.uri)?;
    tensors::load_into(vars, &model, "", &loaded.uri)
}
