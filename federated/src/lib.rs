//! radfm's federated training: hospitals train on their own images and send only signed weight
//! updates; a hub admits, aggregates and publishes the next global model.
//!
//! This crate holds the rules the hub and every site must agree on, pure so they are tested
//! without clusters, stores or GPUs:
//! - [`weights`]: named f32 tensors to and from safetensors (f32 or bf16 on the wire), their
//!   digests, the update of a site (local − global), its norm;
//! - [`exchange`]: the object-store layout between hub and sites (sites only write their own
//!   prefix and only make outbound calls), the hub's signed global models, and one round run
//!   from contributions to the next global model;
//! - [`contribution`]: the statement a site signs for its update (federation, round, base
//!   digest, update digest, samples, steps, dataset-index digest, local loss);
//! - [`admission`]: which contributions a round takes, and why it refuses the others (unknown
//!   or wrong key, another federation, round or base model, a second update, a norm over the
//!   bound, bytes that do not match the statement);
//! - [`aggregate`]: FedAvg weighted by samples, and the robust coordinate-wise trimmed mean and
//!   median;
//! - [`privacy`]: client-level differential privacy (clipping, Gaussian noise at aggregation)
//!   and the Rényi-DP accountant that reports the (ε, δ) spent.
#![deny(missing_docs)]

pub mod admission;
pub mod aggregate;
pub mod contribution;
pub mod exchange;
pub mod privacy;
pub mod weights;

/// Errors of federated training, each naming what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Weights that cannot be read or combined (named: which file or tensor).
    #[error("{what}: {reason}")]
    Weights {
        /// The file or tensor.
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// The exchange could not be read or written.
    #[error(transparent)]
    Store(#[from] radfm_data::Error),
    /// Something in the exchange is not what it must be (named: which object).
    #[error("{key}: {reason}")]
    Exchange {
        /// The object.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// A setting that cannot be used (named: which field).
    #[error("{field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn weights_error(what: &str, reason: impl Into<String>) -> Error {
    Error::Weights {
        what: what.to_string(),
        reason: reason.into(),
    }
}
