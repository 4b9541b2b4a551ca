//! Types shared by every radfm component.
//!
//! The operator, the trainer and the CLI must agree on three contracts, so they live in one crate
//! instead of being restated in each binary:
//! - [`trainingjob`]: the `TrainingJob` custom resource (its CRD is generated from these types);
//! - [`env`]: the environment variables a trainer process receives (built by the operator for a
//!   pod, by the local runner for a process, parsed by the trainer);
//! - [`exit`]: the trainer's exit codes and what they mean for a gang restart;
//! - [`continual`]: the `ContinualTraining` custom resource that schedules retraining runs;
//! - [`validation`]: the `SiteValidator` and `PromotionPolicy` resources of site validation;
//! - [`federated`]: the `FederatedTraining` (hub) and `FederatedSite` (hospital) resources;
//! - [`monitoring`]: the `ModelMonitor` resource that watches a deployed model at a site.
#![deny(missing_docs)]

pub mod conditions;
pub mod continual;
pub mod env;
pub mod exit;
pub mod failure;
pub mod federated;
pub mod health;
pub mod monitoring;
pub mod site_validation;
pub mod trainingjob;

pub use continual::{ContinualTraining, ContinualTrainingSpec, ContinualTrainingStatus};
pub use trainingjob::{TrainingJob, TrainingJobSpec, TrainingJobStatus};

/// Annotation rank 0 writes on its own pod with its progress (JSON of
/// [`trainingjob::Progress`]); the operator copies it into the status.
pub const ANNOTATION_PROGRESS: &str = "radfm.io/progress";
/// Annotation rank 0 writes on its own pod after committing a checkpoint (JSON of
/// [`trainingjob::CheckpointRef`]).
pub const ANNOTATION_CHECKPOINT: &str = "radfm.io/checkpoint";
/// File names of an exported model folder: written by the trainer's export, read by the
/// registry, the evaluators and the operator.
pub mod export_files {
    /// The encoder weights (safetensors, timm names).
    pub const WEIGHTS: &str = "encoder.safetensors";
    /// The model card (JSON), written last.
    pub const CARD: &str = "model_card.json";
}
/// API group of every radfm resource.
pub const GROUP: &str = "radfm.io";
/// API version of the radfm resources in this release.
pub const VERSION: &str = "v1alpha1";

/// Errors of the shared API crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A trainer environment variable is missing or malformed.
    #[error("environment variable {name}: {reason}")]
    Env {
        /// The variable's name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A TrainingJob document could not be parsed.
    #[error("{source_name}: {message}")]
    Yaml {
        /// Where the document came from (a path or `<stdin>`).
        source_name: String,
        /// Field path, line and reason, as the parser reported them.
        message: String,
    },
    /// A TrainingJob failed validation against its CEL rules.
    #[error("{0}")]
    Invalid(String),
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
