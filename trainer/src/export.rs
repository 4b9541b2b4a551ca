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
    let ckpt = Location::open(checkpoint_uri)?;
    let loaded = checkpoint::load_latest(&ckpt, |e| eprintln!("radfm: skipping checkpoint: {e}"))
        .await?
        .ok_or_else(|| Error::Checkpoint {
            uri: checkpoint_uri.into(),
            reason: "no committed checkpoint".into(),
        })?;
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
    let model = tensors::from_bytes(loaded.object("model.safetensors")?, &loaded.uri)?;
    let encoder: Vec<(String, tch::Tensor)> = model
        .into_iter()
        .filter_map(|(n, t)| n.strip_prefix("encoder.").map(|s| (s.to_string(), t)))
        .collect();
    let parameters = encoder
        .iter()
        .filter(|(n, _)| n != "pos_embed")
        .map(|(_, t)| t.numel() as i64)
        .sum();
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    let weights = tensors::to_bytes(&encoder, Some(meta), WEIGHTS)?;
    let card = ModelCard {
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
        weights_sha256: hex::encode(Sha256::digest(&weights)),
        parameters,
        code_version: state.code_version.clone(),
        created: jiff::Timestamp::now().to_string(),
    };
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
