//! The lineage of a federated model: every round that made it, with what each site contributed
//! (samples, steps, the digests of its update and of its dataset index) and what the hub refused
//! and why, copied from the hub's signed round records. The images behind it stay at the sites;
//! the registry records only what the hub saw.

use serde::{Deserialize, Serialize};

/// The job uid a federation's registered result carries ([`crate::Registry::find_by_job`]
/// finds it, so registering again is a no-op).
pub fn result_uid(federation: &str, digest: &str) -> String {
    format!("federated:{federation}:{digest}")
}

/// How a federated version was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct FederatedLineage {
    /// The federation (`namespace/name` of its FederatedTraining).
    pub federation: String,
    /// The exchange folder its rounds went through.
    pub exchange: String,
    /// The hub's public key (hex) that signed every round record.
    pub hub_key: String,
    /// Digest of the final global model (what the exported encoder came from).
    pub result_digest: String,
    /// The rounds, in order.
    pub rounds: Vec<FederatedRound>,
}

/// One closed round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct FederatedRound {
    /// The round, from 1.
    pub round: u32,
    /// Digest of the round's global model.
    pub base_digest: String,
    /// Digest of the model it produced.
    pub next_digest: String,
    /// How the updates were combined.
    pub aggregator: String,
    /// The admitted contributions.
    pub contributions: Vec<FederatedContribution>,
    /// The refused ones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rejected: Vec<FederatedRejection>,
    /// Client-level DP: ε spent after this round (at `delta`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epsilon: Option<f64>,
    /// δ of `epsilon`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<f64>,
}

/// A site's admitted contribution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct FederatedContribution {
    /// The site.
    pub site: String,
    /// Training samples.
    pub samples: u64,
    /// Optimizer steps.
    pub steps: u64,
    /// L2 norm of the update.
    pub norm: f64,
    /// Digest of the update.
    pub update_digest: String,
    /// Digest of the site's dataset index.
    pub dataset_index_digest: String,
    /// The site's loss at the end of its local training.
    pub local_loss: f64,
}

/// A refused contribution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct FederatedRejection {
    /// The site whose prefix it came from.
    pub site: String,
    /// Machine-readable reason.
    pub reason: String,
    /// What was wrong.
    pub message: String,
}
