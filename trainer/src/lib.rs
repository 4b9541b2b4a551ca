//! radfm's trainer: masked-autoencoder pretraining of a ViT on libtorch (through tch).
//!
//! The process turns the env contract (or a TrainingJob file) into one validated [`TrainConfig`]
//! before anything runs, trains with checkpoints that survive any restart, and maps every failure
//! to an exit code of the documented table — the exit code is all the operator learns from a dead
//! trainer. Modules: [`config`] (the env contract → one validated configuration), [`launch`]
//! (one process per local device), [`collective`] (the gang's tensors over radfm-collective),
//! [`model`] (ViT + MAE), [`contrastive`] (the image–report loss, its negatives across ranks), [`text`] (the report
//! tokenizer and text encoder), [`optim`] (AdamW whose state can be saved), [`tensors`] (safetensors
//! I/O), [`checkpoint`] (atomic, manifest-last, fenced commits on any object store), [`train`] (the
//! loop), [`progress`] (JSON lines, Prometheus, the pod annotation the operator reads),
//! [`export`] (timm-named safetensors + model card), [`eval`] (k-NN and linear probes),
//! [`site`] (a site's validation metrics), [`monitor`] (drift of a deployed model at a site) and [`commands`] (arguments shared with `radfm`).
#![deny(missing_docs)]

pub mod allocator;
pub mod checkpoint;
pub mod collective;
pub mod commands;
pub mod config;
pub mod contrastive;
pub mod eval;
pub mod export;
pub mod image_text;
pub mod launch;
pub mod model;
pub mod monitor;
pub mod optim;
pub mod progress;
pub mod site;
pub mod tensors;
pub mod text;
pub mod train;
pub mod zero_shot;

pub use config::TrainConfig;

use radfm_api::exit;

/// Errors of the trainer library, each with the exit code it maps to.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The env contract is missing a variable or holds an invalid value.
    #[error("invalid configuration: {0}")]
    Config(#[from] radfm_api::Error),
    /// A configuration field is invalid.
    #[error("invalid configuration: {field}: {reason}")]
    Field {
        /// The field (YAML path or variable name).
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// Reading the dataset failed.
    #[error("dataset: {0}")]
    Data(#[from] radfm_data::Error),
    /// A checkpoint or exported model could not be written or read.
    #[error("checkpoint {uri}: {reason}")]
    Checkpoint {
        /// The object or folder.
        uri: String,
        /// What went wrong.
        reason: String,
    },
    /// The loss was NaN or infinite on too many consecutive steps.
    #[error("non-finite loss on {count} consecutive steps (last at step {step})")]
    NonFinite {
        /// The last step with a non-finite loss.
        step: i64,
        /// Consecutive non-finite steps.
        count: u32,
    },
    /// Rendezvous or a collective failed: a peer died or stalled, the store is unreachable.
    #[error(transparent)]
    Collective(#[from] radfm_collective::Error),
    /// SIGTERM arrived; a checkpoint was written at `step`.
    #[error("terminated by SIGTERM; checkpoint written at step {step}")]
    Terminated {
        /// The step of the checkpoint written on the way out.
        step: i64,
    },
    /// Local file I/O failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A newer writer (a later gang) started on the checkpoint folder: this process is stale and
    /// may neither commit nor prune.
    #[error(
        "checkpoint {uri}: fenced: this writer holds epoch {epoch}, but {writer} started epoch {newer}; a newer gang owns the checkpoints"
    )]
    Fenced {
        /// The checkpoint folder.
        uri: String,
        /// This writer's epoch.
        epoch: u64,
        /// The newest epoch claimed.
        newer: u64,
        /// Who claimed it.
        writer: String,
    },
}

impl Error {
    /// The exit code the operator's failure policy expects for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config(_) | Error::Field { .. } => exit::INVALID_CONFIG,
            Error::Data(e) => match e {
                radfm_data::Error::Store { .. } | radfm_data::Error::Io { .. } => exit::RETRYABLE,
                radfm_data::Error::Uri { .. } | radfm_data::Error::Unconditional { .. } => {
                    exit::INVALID_CONFIG
                }
                _ => exit::DATA_ERROR_LIMIT,
            },
            Error::NonFinite { .. } => exit::NON_FINITE_LOSS,
            Error::Terminated { .. } => exit::TERMINATED,
            Error::Collective(e) => match e {
                radfm_collective::Error::Rendezvous { .. }
                | radfm_collective::Error::PeerLost { .. } => exit::PEER_LOST,
                radfm_collective::Error::Io { .. } => exit::RETRYABLE,
                radfm_collective::Error::Unavailable { .. } | radfm_collective::Error::Shape(_) => {
                    exit::INVALID_CONFIG
                }
            },
            Error::Checkpoint { .. } | Error::Io { .. } | Error::Fenced { .. } => exit::RETRYABLE,
        }
    }
}

/// Result alias of the trainer library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_the_documented_exit_codes() {
        let field = Error::Field {
            field: "x".into(),
            reason: "y".into(),
        };
        assert_eq!(field.exit_code(), 64);
        let corrupt = Error::Data(radfm_data::Error::Shard {
            shard: "s".into(),
            reason: "more than 16 corrupt samples".into(),
        });
        assert_eq!(corrupt.exit_code(), 65);
        assert_eq!(Error::NonFinite { step: 3, count: 3 }.exit_code(), 66);
        assert_eq!(Error::Terminated { step: 3 }.exit_code(), 77);
        let io = Error::Checkpoint {
            uri: "s3://b/c".into(),
            reason: "timeout".into(),
        };
        assert_eq!(io.exit_code(), 75);
        let lost = Error::from(radfm_collective::Error::PeerLost {
            rank: 1,
            reason: "rank 2 closed".into(),
        });
        assert_eq!(lost.exit_code(), 76);
        let rendezvous = Error::from(radfm_collective::Error::Rendezvous {
            what: "nccl-id".into(),
            reason: "timeout".into(),
        });
        assert_eq!(rendezvous.exit_code(), 76);
        let no_nccl = Error::from(radfm_collective::Error::Unavailable {
            reason: "libnccl.so".into(),
        });
        assert_eq!(no_nccl.exit_code(), 64);
    }
}
