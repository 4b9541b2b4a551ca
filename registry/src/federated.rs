//! The lineage of a federated model: every round that made it, as the hub's signed round
//! records have it (what each site contributed: samples, steps, the digests of its update and
//! of its dataset index; what the hub refused and why). The images behind it stay at the
//! sites; the registry records only what the hub saw.

use radfm_api::federated::RoundRecord;
use serde::{Deserialize, Serialize};

/// The job uid a federation's registered result carries ([`crate::Registry::find_by_job`]
/// finds it, so registering again is a no-op).
pub fn result_uid(federation: &str, digest: &str) -> String {
    format!("federated:{federation}:{digest}")
}

/// How a federated version was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// The hub's records of the rounds, in order.
    pub rounds: Vec<RoundRecord>,
}
