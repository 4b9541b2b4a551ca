//! The exchange: one object-store folder between the hub and the sites, so that no site opens an
//! inbound port. The hub writes `rounds/<r>/global.safetensors` and its signed statement
//! `rounds/<r>/global.json`; site `s` writes only `sites/<s>/rounds/<r>/update.safetensors` and
//! `contribution.json` (the store's policy gives each site's credentials that prefix alone).
//! Every object is written create-only: nothing published is ever replaced, and a second upload
//! of a site in a round is refused by the store itself.

use std::collections::BTreeSet;

use ed25519_dalek::SigningKey;
use radfm_data::store::Location;
use radfm_validation::report::Signed;
use serde::{Deserialize, Serialize};

use crate::admission::{Admitted, Rejection, Round};
use crate::aggregate::{Aggregator, aggregate};
use crate::privacy;
use crate::weights::{self, Precision, Weights};
use crate::{Error, Result};

/// The format tag of the hub's statement of a global model.
pub const GLOBAL_FORMAT: &str = "radfm.federated.global/v1";

/// Largest statement read from the exchange (bounded memory against a hostile writer).
pub const MAX_STATEMENT_BYTES: usize = 64 * 1024;

/// What the hub signs for each round's global model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GlobalStatement {
    /// [`GLOBAL_FORMAT`].
    pub format: String,
    /// The federation (`namespace/name`).
    pub federation: String,
    /// The round this model opens (round 1's is the base model).
    pub round: u32,
    /// Digest of the model's bytes.
    pub digest: String,
    /// Digest of the previous round's model (None for round 1).
    pub previous: Option<String>,
    /// The federation's last training round: a model opening a later round is the final one,
    /// and no site trains on it.
    pub last_round: u32,
    /// Optimizer steps each site runs in this round.
    pub local_steps: u64,
    /// Largest update norm the hub admits; a site clips its update to it.
    pub norm_bound: f64,
}

impl GlobalStatement {
    /// Whether sites train on this model (false: it is the federation's result).
    pub fn opens_training(&self) -> bool {
        self.round <= self.last_round
    }
}

/// How many rounds a federation runs and how long each site trains in one; the hub signs it
/// into every global model's statement so a site follows the hub, not its own settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// The last training round.
    pub last_round: u32,
    /// Optimizer steps each site runs a round.
    pub local_steps: u64,
    /// Largest update norm admitted.
    pub norm_bound: f64,
}

pub use radfm_api::federated::{
    AdmittedRecord, PrivacySpent, RECORD_FORMAT, RejectedRecord, RoundRecord,
};

/// How a round is closed at the hub.
#[derive(Debug, Clone)]
pub struct Closing {
    /// How updates are combined.
    pub aggregator: Aggregator,
    /// Client-level DP with its δ, if on.
    pub privacy: Option<(Privacy, f64)>,
    /// Fewest admitted sites.
    pub min_sites: usize,
    /// Precision of the published model.
    pub precision: Precision,
    /// The federation's schedule, signed into the next model's statement.
    pub schedule: Schedule,
}

/// The exchange folder of one federation.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// The folder.
    pub location: Location,
    /// The federation (`namespace/name`).
    pub federation: String,
    /// Largest model or update read, in bytes.
    pub max_model_bytes: usize,
}

fn round_dir(round: u32) -> String {
    format!("rounds/{round:05}")
}

/// Where the hub's signed statement of the model opening `round` is.
pub fn global_statement_key(round: u32) -> String {
    format!("{}/global.json", round_dir(round))
}

/// Where the hub's signed record of closed `round` is.
pub fn record_key(round: u32) -> String {
    format!("{}/record.json", round_dir(round))
}

/// Where site `site` puts its update of `round`.
pub fn update_key(site: &str, round: u32) -> String {
    format!("sites/{site}/{}/update.safetensors", round_dir(round))
}

/// Where site `site` puts its signed statement of `round`.
pub fn statement_key(site: &str, round: u32) -> String {
    format!("sites/{site}/{}/contribution.json", round_dir(round))
}

/// What a site uploaded for a round, as read by the hub.
#[derive(Debug, Clone)]
pub struct Submission {
    /// The site whose prefix it was read from.
    pub site: String,
    /// The statement, if it could be read.
    pub signed: std::result::Result<Signed, Rejection>,
    /// The update's bytes.
    pub update: Vec<u8>,
}

/// A round's result.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The admitted contributions, by site.
    pub admitted: Vec<Admitted>,
    /// The refused ones, with why.
    pub rejected: Vec<(String, Rejection)>,
    /// The next global model.
    pub next: Weights,
}

/// Client-level differential privacy at aggregation.
#[derive(Debug, Clone, Copy)]
pub struct Privacy {
    /// Updates are clipped to this L2 norm.
    pub clip: f64,
    /// Noise standard deviation, in units of `clip / sites`.
    pub noise_multiplier: f64,
}

impl Exchange {
    fn invalid(&self, key: &str, reason: impl Into<String>) -> Error {
        Error::Exchange {
            key: self.location.child_uri(key),
            reason: reason.into(),
        }
    }

    /// Publishes the global model that opens `round`, signed by the hub; returns its digest.
    /// The model is written before its statement: a reader that finds the statement finds the
    /// model.
    pub async fn publish_global(
        &self,
        round: u32,
        model: &[u8],
        previous: Option<String>,
        schedule: Schedule,
        hub: &SigningKey,
    ) -> Result<String> {
        let dir = round_dir(round);
        let digest = weights::digest(model);
        let statement = GlobalStatement {
            format: GLOBAL_FORMAT.into(),
            federation: self.federation.clone(),
            round,
            digest: digest.clone(),
            previous,
            last_round: schedule.last_round,
            local_steps: schedule.local_steps,
            norm_bound: schedule.norm_bound,
        };
        let signed =
            serde_json::to_vec(&Signed::of(&statement, hub)).expect("statements serialise");
        let model_key = format!("{dir}/global.safetensors");
        if !self.location.put_new(&model_key, model.to_vec()).await? {
            let existing = self
                .location
                .get_bounded(&model_key, self.max_model_bytes)
                .await?
                .unwrap_or_default();
            if weights::digest(&existing) != digest {
                return Err(
                    self.invalid(&model_key, "the round's global model is already published")
                );
            }
        }
        let statement_key = global_statement_key(round);
        if !self.location.put_new(&statement_key, signed).await? {
            let hub_hex = radfm_validation::report::public_hex(hub);
            let existing = self.global_statement(round, Some(&hub_hex)).await?;
            if existing.is_none_or(|e| e.digest != digest) {
                return Err(self.invalid(&statement_key, "another statement is published"));
            }
        }
        Ok(digest)
    }

    /// Closes `round` at the hub and publishes the next global model; safe to run again after a
    /// crash at any point. The decision (the signed [`RoundRecord`]) is written first and is
    /// final: a later run recomputes the next model from the recorded admitted sites only (the
    /// DP noise is seeded from the hub's key and the round, so the bytes are the same), then
    /// writes what is missing. The next model's statement is written last, so a site that finds
    /// it finds the record and the model.
    pub async fn close_round(
        &self,
        round: &Round,
        global: &Weights,
        closing: &Closing,
        hub: &SigningKey,
    ) -> Result<RoundRecord> {
        let hub_hex = radfm_validation::report::public_hex(hub);
        let decided = self.round_record(round.round, Some(&hub_hex)).await?;
        let (sites, min_sites): (Vec<&str>, usize) = match &decided {
            Some(rec) => (
                rec.admitted.iter().map(|a| a.site.as_str()).collect(),
                rec.admitted.len(),
            ),
            None => (
                round.sites.keys().map(String::as_str).collect(),
                closing.min_sites,
            ),
        };
        let submissions = self.submissions(round.round, sites).await?;
        let seed = noise_seed(hub, &self.federation, round.round);
        let privacy = closing.privacy.map(|(p, _)| (p, seed));
        let out = run_round(
            round,
            global,
            &submissions,
            closing.aggregator,
            privacy,
            min_sites,
        )?;
        let next = encode(&out.next, closing.precision)?;
        let record = match decided {
            Some(rec) if rec.next_digest == weights::digest(&next) => rec,
            Some(_) => {
                return Err(self.invalid(
                    &record_key(round.round),
                    "the recorded next model cannot be reproduced from the admitted updates",
                ));
            }
            None => self.decide(round, closing, &out, &next, hub).await?,
        };
        self.publish_global(
            round.round + 1,
            &next,
            Some(round.base_digest.clone()),
            closing.schedule,
            hub,
        )
        .await?;
        Ok(record)
    }

    /// Writes the round's signed record; if another run recorded the round first, that record.
    async fn decide(
        &self,
        round: &Round,
        closing: &Closing,
        out: &Outcome,
        next: &[u8],
        hub: &SigningKey,
    ) -> Result<RoundRecord> {
        let privacy = match closing.privacy {
            Some((p, delta)) => Some(PrivacySpent {
                epsilon: privacy::epsilon(p.noise_multiplier, round.round, delta)?,
                delta,
            }),
            None => None,
        };
        let record = RoundRecord {
            format: RECORD_FORMAT.into(),
            federation: self.federation.clone(),
            round: round.round,
            base_digest: round.base_digest.clone(),
            aggregator: closing.aggregator.to_string(),
            admitted: out.admitted.iter().map(admitted_record).collect(),
            rejected: out
                .rejected
                .iter()
                .map(|(site, why)| RejectedRecord {
                    site: site.clone(),
                    reason: why.reason().into(),
                    message: why.to_string(),
                })
                .collect(),
            next_digest: weights::digest(next),
            privacy,
        };
        let body = serde_json::to_vec(&Signed::of(&record, hub)).expect("records serialise");
        if self
            .location
            .put_new(&record_key(round.round), body)
            .await?
        {
            return Ok(record);
        }
        let hub_hex = radfm_validation::report::public_hex(hub);
        self.round_record(round.round, Some(&hub_hex))
            .await?
            .ok_or_else(|| self.invalid(&record_key(round.round), "vanished after a write race"))
    }

    /// A signed document of the hub's: Ok(None) while absent; its signature and format checked,
    /// and with `hub_key` (hex), that the hub signed it.
    async fn hub_document<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
        hub_key: Option<&str>,
        format: impl Fn(&T) -> &str,
        expected: &str,
    ) -> Result<Option<T>> {
        let Some(raw) = self.location.get_bounded(key, MAX_STATEMENT_BYTES).await? else {
            return Ok(None);
        };
        let signed: Signed = serde_json::from_slice(&raw)
            .map_err(|e| self.invalid(key, format!("not a signed statement: {e}")))?;
        if let Some(hub) = hub_key
            && !signed.public_key.trim().eq_ignore_ascii_case(hub.trim())
        {
            return Err(self.invalid(key, "signed by a key that is not the hub's"));
        }
        let value = signed
            .open(format, expected)
            .map_err(|e| self.invalid(key, e.to_string()))?;
        Ok(Some(value))
    }

    /// The statement of the model opening `round`, without the model (what a controller polls):
    /// signature, federation and round checked, and with `hub_key`, the signer.
    pub async fn global_statement(
        &self,
        round: u32,
        hub_key: Option<&str>,
    ) -> Result<Option<GlobalStatement>> {
        let key = global_statement_key(round);
        let Some(statement) = self
            .hub_document(
                &key,
                hub_key,
                |s: &GlobalStatement| &s.format,
                GLOBAL_FORMAT,
            )
            .await?
        else {
            return Ok(None);
        };
        if statement.federation != self.federation || statement.round != round {
            return Err(self.invalid(
                &key,
                format!(
                    "statement of {} round {}",
                    statement.federation, statement.round
                ),
            ));
        }
        Ok(Some(statement))
    }

    /// The hub's record of closed `round`, checked as [`Exchange::global_statement`] is.
    pub async fn round_record(
        &self,
        round: u32,
        hub_key: Option<&str>,
    ) -> Result<Option<RoundRecord>> {
        let key = record_key(round);
        let Some(record) = self
            .hub_document(&key, hub_key, |r: &RoundRecord| &r.format, RECORD_FORMAT)
            .await?
        else {
            return Ok(None);
        };
        if record.federation != self.federation || record.round != round {
            return Err(self.invalid(
                &key,
                format!("record of {} round {}", record.federation, record.round),
            ));
        }
        Ok(Some(record))
    }

    /// The global model that opens `round`, once the hub (public key `hub_key`, hex) published
    /// it: its statement's signature, federation, round and digest checked. Ok(None) while it
    /// is not published.
    pub async fn fetch_global(
        &self,
        round: u32,
        hub_key: &str,
    ) -> Result<Option<(Vec<u8>, GlobalStatement)>> {
        let dir = round_dir(round);
        let Some(statement) = self.global_statement(round, Some(hub_key)).await? else {
            return Ok(None);
        };
        let model_key = format!("{dir}/global.safetensors");
        let model = self
            .location
            .get_bounded(&model_key, self.max_model_bytes)
            .await?
            .ok_or_else(|| self.invalid(&model_key, "the statement's model is missing"))?;
        if weights::digest(&model) != statement.digest {
            return Err(self.invalid(
                &model_key,
                "the model's bytes do not match the hub's statement",
            ));
        }
        Ok(Some((model.to_vec(), statement)))
    }

    /// Uploads a site's update and signed statement for `round`; Ok(false) if the site already
    /// uploaded one (the store refuses the second).
    pub async fn contribute(
        &self,
        site: &str,
        round: u32,
        update: &[u8],
        signed: &Signed,
    ) -> Result<bool> {
        if !self
            .location
            .put_new(&update_key(site, round), update.to_vec())
            .await?
        {
            return Ok(false);
        }
        let statement = serde_json::to_vec(signed).expect("statements serialise");
        Ok(self
            .location
            .put_new(&statement_key(site, round), statement)
            .await?)
    }

    /// What each of `sites` uploaded for `round` (a site with no complete upload is left out).
    pub async fn submissions(
        &self,
        round: u32,
        sites: impl IntoIterator<Item = &str>,
    ) -> Result<Vec<Submission>> {
        let mut out = Vec::new();
        for site in sites {
            let key = statement_key(site, round);
            let Some(raw) = self.location.get_bounded(&key, MAX_STATEMENT_BYTES).await? else {
                continue;
            };
            let signed = serde_json::from_slice::<Signed>(&raw)
                .map_err(|e| Rejection::BadSignature(format!("{key}: {e}")));
            let update = match self
                .location
                .get_bounded(&update_key(site, round), self.max_model_bytes)
                .await
            {
                Ok(Some(b)) => b.to_vec(),
                Ok(None) => continue,
                Err(radfm_data::Error::TooLarge { bytes, limit, .. }) => {
                    out.push(Submission {
                        site: site.to_string(),
                        signed: Err(Rejection::Unreadable(format!(
                            "{bytes} bytes, over the limit of {limit}"
                        ))),
                        update: Vec::new(),
                    });
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            out.push(Submission {
                site: site.to_string(),
                signed,
                update,
            });
        }
        Ok(out)
    }
}

/// Runs one round at the hub: admits the submissions (a statement must name the site whose
/// prefix it sits in), aggregates the admitted updates, optionally with client-level DP, and
/// returns the next global model. Fewer admitted sites than `min_sites` is an error naming
/// every refusal.
pub fn run_round(
    round: &Round,
    global: &Weights,
    submissions: &[Submission],
    aggregator: Aggregator,
    privacy: Option<(Privacy, [u8; 32])>,
    min_sites: usize,
) -> Result<Outcome> {
    let mut seen = BTreeSet::new();
    let mut admitted = Vec::new();
    let mut rejected = Vec::new();
    for s in submissions {
        let decision = s.signed.clone().and_then(|signed| {
            let a = round.admit(&signed, &s.update, &seen)?;
            if a.contribution.site != s.site {
                return Err(Rejection::WrongKey);
            }
            Ok(a)
        });
        match decision {
            Ok(a) => {
                seen.insert(a.contribution.site.clone());
                admitted.push(a);
            }
            Err(why) => rejected.push((s.site.clone(), why)),
        }
    }
    if admitted.len() < min_sites.max(1) {
        let why: Vec<String> = rejected.iter().map(|(s, r)| format!("{s}: {r}")).collect();
        return Err(Error::Invalid {
            field: "minSites",
            reason: format!(
                "round {} admitted {} of at least {min_sites} sites{}",
                round.round,
                admitted.len(),
                if why.is_empty() {
                    String::new()
                } else {
                    format!(" (refused: {})", why.join("; "))
                }
            ),
        });
    }
    let updates: Vec<Weights> = match privacy {
        Some((p, _)) => admitted
            .iter()
            .map(|a| privacy::clip(&a.update, p.clip))
            .collect(),
        None => admitted.iter().map(|a| a.update.clone()).collect(),
    };
    let weighted: Vec<(u64, &Weights)> = admitted
        .iter()
        .zip(&updates)
        .map(|(a, u)| (a.contribution.samples, u))
        .collect();
    let mut step = aggregate(aggregator, &weighted)?;
    if let Some((p, seed)) = privacy {
        step = privacy::add_noise(&step, p.noise_multiplier, p.clip, admitted.len(), seed)?;
    }
    let next = global.plus(&step, "aggregate")?;
    Ok(Outcome {
        admitted,
        rejected,
        next,
    })
}

fn admitted_record(a: &Admitted) -> AdmittedRecord {
    let c = &a.contribution;
    AdmittedRecord {
        site: c.site.clone(),
        samples: c.samples,
        steps: c.steps,
        norm: a.norm,
        update_digest: c.update_digest.clone(),
        dataset_index_digest: c.dataset_index_digest.clone(),
        local_loss: c.local_loss,
    }
}

/// The seed of a round's DP noise: secret to everyone but the hub, and the same on every run of
/// the round (so a round closed again after a crash publishes the same bytes).
fn noise_seed(hub: &SigningKey, federation: &str, round: u32) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"radfm.federated.dp-noise/v1\0");
    h.update(hub.to_bytes());
    h.update(federation.as_bytes());
    h.update(round.to_be_bytes());
    h.finalize().into()
}

/// The next global model as bytes in `precision` (what [`Exchange::publish_global`] takes).
pub fn encode(model: &Weights, precision: Precision) -> Result<Vec<u8>> {
    model.to_safetensors(precision)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::contribution::{Contribution, FORMAT};
    use crate::weights::tests::weights;

    fn key(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32])
    }

    const SCHEDULE: Schedule = Schedule {
        last_round: 2,
        local_steps: 5,
        norm_bound: 10.0,
    };

    fn exchange(dir: &std::path::Path) -> Exchange {
        Exchange {
            location: Location::open(&dir.to_string_lossy()).unwrap(),
            federation: "hub/cxr".into(),
            max_model_bytes: 1 << 20,
        }
    }

    fn statement(
        federation: &str,
        site: &str,
        round: u32,
        base: &str,
        update: &[u8],
    ) -> Contribution {
        Contribution {
            format: FORMAT.into(),
            federation: federation.into(),
            site: site.into(),
            round,
            base_digest: base.into(),
            update_digest: weights::digest(update),
            samples: 10,
            steps: 5,
            dataset_index_digest: format!("{site}-index"),
            local_loss: 0.4,
        }
    }

    fn update_of(delta: f32) -> Vec<u8> {
        weights(&[("w", vec![delta, delta])])
            .to_safetensors(Precision::F32)
            .unwrap()
    }

    async fn site_round(
        ex: &Exchange,
        site: &str,
        k: &SigningKey,
        round: u32,
        base: &str,
        delta: f32,
    ) -> bool {
        let update = update_of(delta);
        let c = statement(&ex.federation, site, round, base, &update);
        ex.contribute(site, round, &update, &c.sign(k))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_round_goes_from_the_hubs_model_through_signed_site_updates_to_the_next_model() {
        let dir = tempfile::tempdir().unwrap();
        let ex = exchange(dir.path());
        let hub = key(9);
        let hub_hex = radfm_validation::report::public_hex(&hub);
        let base = weights(&[("w", vec![1.0, 1.0])]);
        let digest = ex
            .publish_global(
                1,
                &encode(&base, Precision::F32).unwrap(),
                None,
                SCHEDULE,
                &hub,
            )
            .await
            .unwrap();
        assert!(
            ex.publish_global(1, b"other", None, SCHEDULE, &hub)
                .await
                .is_err(),
            "published once"
        );

        let (bytes, statement) = ex.fetch_global(1, &hub_hex).await.unwrap().unwrap();
        assert_eq!(
            (statement.round, statement.digest.clone()),
            (1, digest.clone())
        );
        let other_hub = radfm_validation::report::public_hex(&key(8));
        assert!(
            ex.fetch_global(1, &other_hub)
                .await
                .unwrap_err()
                .to_string()
                .contains("not the hub's")
        );
        assert!(ex.fetch_global(2, &hub_hex).await.unwrap().is_none());

        let sites = BTreeMap::from([
            ("a".to_string(), key(1)),
            ("b".to_string(), key(2)),
            ("c".to_string(), key(3)),
        ]);
        assert!(site_round(&ex, "a", &sites["a"], 1, &digest, 0.5).await);
        assert!(site_round(&ex, "b", &sites["b"], 1, &digest, 1.5).await);
        // c signs with a's key, under its own prefix.
        assert!(site_round(&ex, "c", &sites["a"], 1, &digest, 9.0).await);
        assert!(
            !site_round(&ex, "a", &sites["a"], 1, &digest, 0.0).await,
            "one upload a round"
        );

        let round = Round {
            federation: ex.federation.clone(),
            round: 1,
            base_digest: digest.clone(),
            layout: Weights::from_safetensors(&bytes, "global").unwrap(),
            norm_bound: 10.0,
            sites: sites
                .iter()
                .map(|(s, k)| (s.clone(), radfm_validation::report::public_hex(k)))
                .collect(),
        };
        let subs = ex.submissions(1, ["a", "b", "c", "d"]).await.unwrap();
        assert_eq!(subs.len(), 3, "d never answered");
        let out = run_round(&round, &round.layout, &subs, Aggregator::FedAvg, None, 2).unwrap();
        assert_eq!(out.admitted.len(), 2);
        assert_eq!(out.rejected, vec![("c".to_string(), Rejection::WrongKey)]);
        assert_eq!(out.next.0["w"].values, vec![2.0, 2.0], "1 + mean(0.5, 1.5)");
        let next = encode(&out.next, Precision::Bf16).unwrap();
        ex.publish_global(2, &next, Some(digest), SCHEDULE, &hub)
            .await
            .unwrap();
        let (_, s2) = ex.fetch_global(2, &hub_hex).await.unwrap().unwrap();
        assert_eq!(s2.previous.as_deref(), Some(statement.digest.as_str()));

        let err = run_round(&round, &round.layout, &subs, Aggregator::FedAvg, None, 3).unwrap_err();
        assert!(
            err.to_string()
                .contains("admitted 2 of at least 3 sites (refused: c: signed with a key"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn tampered_models_in_the_exchange_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ex = exchange(dir.path());
        let hub = key(9);
        let model = encode(&weights(&[("w", vec![1.0])]), Precision::F32).unwrap();
        ex.publish_global(1, &model, None, SCHEDULE, &hub)
            .await
            .unwrap();
        let path = dir.path().join("rounds/00001/global.safetensors");
        let evil = encode(&weights(&[("w", vec![666.0])]), Precision::F32).unwrap();
        std::fs::write(path, evil).unwrap();
        let hub_hex = radfm_validation::report::public_hex(&hub);
        let err = ex.fetch_global(1, &hub_hex).await.unwrap_err();
        assert!(
            err.to_string().contains("do not match the hub's statement"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_round_closed_again_after_a_crash_publishes_the_same_model_from_its_record() {
        let dir = tempfile::tempdir().unwrap();
        let ex = exchange(dir.path());
        let hub = key(9);
        let hub_hex = radfm_validation::report::public_hex(&hub);
        let base = weights(&[("w", vec![1.0, 1.0])]);
        let digest = ex
            .publish_global(
                1,
                &encode(&base, Precision::F32).unwrap(),
                None,
                SCHEDULE,
                &hub,
            )
            .await
            .unwrap();
        let (a, b) = (key(1), key(2));
        assert!(site_round(&ex, "a", &a, 1, &digest, 0.5).await);
        assert!(site_round(&ex, "b", &b, 1, &digest, 1.5).await);
        let round = Round {
            federation: ex.federation.clone(),
            round: 1,
            base_digest: digest.clone(),
            layout: base.clone(),
            norm_bound: 10.0,
            sites: [("a", &a), ("b", &b), ("c", &key(3))]
                .into_iter()
                .map(|(s, k)| (s.to_string(), radfm_validation::report::public_hex(k)))
                .collect(),
        };
        let closing = Closing {
            aggregator: Aggregator::FedAvg,
            privacy: Some((
                Privacy {
                    clip: 1.0,
                    noise_multiplier: 1.0,
                },
                1e-5,
            )),
            min_sites: 2,
            precision: Precision::F32,
            schedule: SCHEDULE,
        };
        let first = ex.close_round(&round, &base, &closing, &hub).await.unwrap();
        let (model, statement) = ex.fetch_global(2, &hub_hex).await.unwrap().unwrap();
        assert_eq!(statement.digest, first.next_digest);
        assert_eq!(statement.previous.as_deref(), Some(digest.as_str()));
        assert!(statement.opens_training(), "round 2 of 2 is trained");
        assert_eq!(
            first
                .admitted
                .iter()
                .map(|a| a.site.as_str())
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert!(first.privacy.unwrap().epsilon > 0.0);

        // The hub stopped after its record: the model and its statement are gone. Site c
        // uploads late; the round stays as decided.
        std::fs::remove_file(dir.path().join("rounds/00002/global.safetensors")).unwrap();
        std::fs::remove_file(dir.path().join("rounds/00002/global.json")).unwrap();
        assert!(site_round(&ex, "c", &key(3), 1, &digest, 3.0).await);
        let again = ex.close_round(&round, &base, &closing, &hub).await.unwrap();
        assert_eq!(again, first);
        let (model_again, _) = ex.fetch_global(2, &hub_hex).await.unwrap().unwrap();
        assert_eq!(
            model_again, model,
            "the same noisy model, from the same seed"
        );
        assert_eq!(
            ex.round_record(1, Some(&hub_hex)).await.unwrap(),
            Some(first)
        );
    }

    #[test]
    fn privacy_clips_every_update_before_the_mean_and_adds_noise() {
        let layout = weights(&[("w", vec![0.0; 4])]);
        let k = key(1);
        let update = weights(&[("w", vec![3.0, 4.0, 0.0, 0.0])])
            .to_safetensors(Precision::F32)
            .unwrap();
        let c = statement("f", "a", 1, "b", &update);
        let round = Round {
            federation: "f".into(),
            round: 1,
            base_digest: "b".into(),
            layout: layout.clone(),
            norm_bound: 100.0,
            sites: BTreeMap::from([("a".to_string(), radfm_validation::report::public_hex(&k))]),
        };
        let subs = vec![Submission {
            site: "a".into(),
            signed: Ok(c.sign(&k)),
            update,
        }];
        let quiet = Privacy {
            clip: 1.0,
            noise_multiplier: 0.0,
        };
        let out = run_round(
            &round,
            &layout,
            &subs,
            Aggregator::FedAvg,
            Some((quiet, [1; 32])),
            1,
        )
        .unwrap();
        assert!((out.next.norm() - 1.0).abs() < 1e-6, "clipped to 1");
        let noisy = Privacy {
            clip: 1.0,
            noise_multiplier: 1.0,
        };
        let out2 = run_round(
            &round,
            &layout,
            &subs,
            Aggregator::FedAvg,
            Some((noisy, [1; 32])),
            1,
        )
        .unwrap();
        assert_ne!(out2.next, out.next);
    }
}
