//! The arguments of the commands `radfm` and `radfm-trainer` both offer, defined once so that
//! the two spell them alike.

use crate::{Error, eval, export, zero_shot};

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
    /// Query findings by text instead of probing, and rank reports against images (a model
    /// trained with the contrastive objective; the dataset needs reports).
    #[arg(long)]
    pub zero_shot: bool,
    /// JSON file of the findings queried: `[{"label": "lesion", "positive": ["…"], "negative":
    /// ["…"]}]` (default: `lesion` with plain prompts).
    #[arg(long, requires = "zero_shot")]
    pub prompts: Option<std::path::PathBuf>,
    /// Subgroup fields of the zero-shot report (cells published as site reports publish them).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "sex,site",
        requires = "zero_shot"
    )]
    pub subgroups: Vec<String>,
    /// Smallest published subgroup cell.
    #[arg(long, default_value_t = 20, requires = "zero_shot")]
    pub min_cell: usize,
}

impl EvalArgs {
    /// Evaluates both encoders.
    pub async fn run(&self) -> Result<eval::Comparison, Error> {
        eval::compare(&self.model, &self.dataset, &self.label, self.seed).await
    }

    /// The zero-shot evaluation (`--zero-shot`).
    pub async fn run_zero_shot(&self) -> Result<zero_shot::ZeroShot, Error> {
        let findings = match &self.prompts {
            None => vec![zero_shot::Finding::lesion()],
            Some(path) => {
                let field = |reason: String| Error::Field {
                    field: "--prompts".into(),
                    reason: format!("{}: {reason}", path.display()),
                };
                let text = std::fs::read(path).map_err(|e| field(e.to_string()))?;
                let f: Vec<zero_shot::Finding> =
                    serde_json::from_slice(&text).map_err(|e| field(e.to_string()))?;
                if let Some(bad) = f
                    .iter()
                    .find(|f| f.positive.is_empty() || f.negative.is_empty())
                {
                    return Err(field(format!(
                        "finding {:?} needs positive and negative prompts",
                        bad.label
                    )));
                }
                f
            }
        };
        zero_shot::evaluate(&zero_shot::Request {
            model_uri: &self.model,
            dataset_uri: &self.dataset,
            findings: &findings,
            subgroups: &self.subgroups,
            min_cell: self.min_cell,
            seed: self.seed,
        })
        .await
    }
}
