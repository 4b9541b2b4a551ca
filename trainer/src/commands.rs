//! The arguments of the commands `radfm` and `radfm-trainer` both offer, defined once so that
//! the two spell them alike.

use crate::{Error, eval, export};

/// Arguments of `export`: the newest checkpoint's encoder (timm names, safetensors) and its
/// model card.
#[derive(clap::Args, Debug, Clone)]
pub struct ExportArgs {
    /// Checkpoint folder URI (spec.checkpoint.uri).
    pub checkpoint: String,
    /// Output folder URI.
    pub out: String,
}

impl ExportArgs {
    /// Exports; returns the model card written.
    pub async fn run(&self) -> Result<export::ModelCard, Error> {
        export::export(&self.checkpoint, &self.out).await
    }
}

/// Arguments of `eval`: k-NN and linear probes of an exported encoder against random
/// initialisation.
#[derive(clap::Args, Debug, Clone)]
pub struct EvalArgs {
    /// Exported model folder URI.
    #[arg(long)]
    pub model: String,
    /// Labelled dataset folder URI.
    #[arg(long)]
    pub dataset: String,
    /// 0/1 label of the samples, or FIELD=VALUE over labels and metadata.
    #[arg(long, default_value = "lesion")]
    pub label: String,
    /// Seed of the random-init baseline.
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
}

impl EvalArgs {
    /// Evaluates both encoders.
    pub async fn run(&self) -> Result<eval::Comparison, Error> {
        eval::compare(&self.model, &self.dataset, &self.label, self.seed).await
    }
}
