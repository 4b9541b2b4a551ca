//! The statement a site signs for its update: everything the hub needs to decide whether to take
//! it, bound to the update's bytes by their digest. A statement is stored as
//! [`radfm_validation::report::Signed`] (the exact JSON signed, the signature, the key), like a
//! site's validation report.

use radfm_validation::report::Signed;
use serde::{Deserialize, Serialize};

/// The format tag of a contribution statement.
pub const FORMAT: &str = "radfm.federated.contribution/v1";

/// What a site says about the update it uploads for a round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Contribution {
    /// [`FORMAT`].
    pub format: String,
    /// The federation (the hub's FederatedTraining, `namespace/name`).
    pub federation: String,
    /// The site, as the federation lists it.
    pub site: String,
    /// The round, from 1.
    pub round: u32,
    /// Digest of the global model the update starts from (the round's published model).
    pub base_digest: String,
    /// Digest of the update file's bytes.
    pub update_digest: String,
    /// Training samples seen this round (FedAvg's weight).
    pub samples: u64,
    /// Optimizer steps taken this round.
    pub steps: u64,
    /// Digest of the site's dataset index the samples came from.
    pub dataset_index_digest: String,
    /// The local training loss at the end of the round.
    pub local_loss: f64,
}

impl Contribution {
    /// Signs the statement with the site's key.
    pub fn sign(&self, key: &ed25519_dalek::SigningKey) -> Signed {
        Signed::of(self, key)
    }
}

/// Opens a signed statement: its signature checked against its embedded key, its format
/// required. Whether that key is the site's is [`crate::admission`]'s decision.
pub fn open(signed: &Signed) -> radfm_validation::Result<Contribution> {
    signed.open(|c: &Contribution| &c.format, FORMAT)
}
