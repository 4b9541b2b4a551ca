//! Export of the pretrained encoder for the rest of the ecosystem, and loading it back.
//!
//! An exported model is a folder: `encoder.safetensors` with timm's ViT tensor names
//! (`patch_embed.proj.weight`, `blocks.0.attn.qkv.weight`, `norm.weight`, ...; 1 input channel)
//! and `model_card.json` (architecture, input normalisation, dataset and shard range, steps,
//! final loss, code version). The card is written last, so a folder with a card is complete.

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
}

/// Exports the newest committed checkpoint under `checkpoint_uri` into the folder `out_uri`.
pub async fn export(checkpoint_uri: &str, out_uri: &str) -> Result<ModelCard> {
    let loaded = latest(checkpoint_uri).await?;
    let model = tensors::from_bytes(loaded.object("model.safetensors")?, &loaded.uri)?;
    let card = card_of_checkpoint(&loaded)?;
    write(model, card, out_uri).await
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
    write(tensors::from_bytes(model, model_uri)?, card, out_uri).await
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
    Ok(ModelCard {
        format: CARD_FORMAT.into(),
        architecture: field("arch")?.as_str().unwrap_or_default().to_string(),
        vit,
        tensor_names: "timm VisionTransformer (in_chans=1, class_token, global_pool=avg)".into(),
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
        objective: "masked autoencoding, normalised-pixel targets".into(),
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
    })
}

/// Writes the encoder of `model` (its `encoder.` variables) and `card` into `out_uri`, the card
/// last.
async fn write(
    model: Vec<(String, tch::Tensor)>,
    mut card: ModelCard,
    out_uri: &str,
) -> Result<ModelCard> {
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
    let weights = tensors::to_bytes(&encoder, Some(meta), WEIGHTS)?;
    card.weights_sha256 = hex::encode(Sha256::digest(&weights));
    card.created = jiff::Timestamp::now().to_string();
    let out = Location::open(out_uri)?;
    out.put(WEIGHTS, weights).await?;
    out.put(
        CARD,
        serde_json::to_vec_pretty(&card).expect("cards serialise"),
    )
    .await?;
    Ok(card)
}

/// An encoder loaded for inference.
pub struct LoadedEncoder {
    /// Holds the variables.
    pub vars: VarStore,
    /// The encoder.
    pub encoder: Encoder,
    /// Its card.
    pub card: ModelCard,
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
    Ok(LoadedEncoder {
        vars,
        encoder,
        card,
    })
}

/// Initialises `vars` from `uri`: an exported model folder (encoder only; the decoder keeps its
/// fresh initialisation), a checkpoint folder (its newest committed checkpoint, every variable),
/// or a `.safetensors` file of every variable (a federated round's global model).
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
        return tensors::load_into(vars, &named, "encoder.", uri);
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
