//! The gate against the registry: gather the candidate's reports, decide, and record the
//! decision in the registry's event log (moving production on Promote, with compare-and-set
//! against the baseline the sites compared with). Before that, when the policy asks for it,
//! production's own monitoring is checked for harm and production moves back (compare-and-set
//! against the harmful version) with the decision recorded beside the move. Used by `radfm gate` and the PromotionPolicy
//! controller; a decision identical to the last one recorded for the candidate is not recorded
//! again, so polling does not flood the log.

use jiff::Timestamp;
use radfm_api::site_validation::PromotionPolicySpec;
use radfm_registry::{EventKind, Registry};

use crate::approval;
use crate::gate::{self, Decision, Deployed, Outcome, Versions};
use crate::{Error, Result};

/// What a gate pass found.
#[derive(Debug)]
pub enum Gated {
    /// No candidate alias, or the candidate is already production.
    NothingToDecide {
        /// Why.
        why: String,
    },
    /// A decision, and the event that recorded it (None: the same decision was already
    /// recorded).
    Decided {
        /// The decision.
        decision: Box<Decision>,
        /// Event sequence number of the record, when written now.
        recorded: Option<u64>,
    },
}

/// A gate pass: what it found, and the version production points to afterwards.
#[derive(Debug)]
pub struct GatePass {
    /// What was decided, if anything.
    pub gated: Gated,
    /// Production after the pass (None: the model has no production version).
    pub production: Option<u64>,
}

/// One line: the outcome and every reason.
pub fn summary(d: &Decision) -> String {
    let reasons: Vec<&str> = d.reasons.iter().map(|r| r.message.as_str()).collect();
    format!(
        "{} v{} (against v{}): {}",
        d.outcome.as_str(),
        d.candidate,
        d.baseline,
        reasons.join("; ")
    )
}

fn reg(e: radfm_registry::Error) -> Error {
    Error::Data(format!("registry: {e}"))
}

/// The candidate and the baseline as the gate compares them.
async fn versions(
    registry: &Registry,
    model: &str,
    candidate: u64,
    baseline: u64,
) -> Result<Versions> {
    let cv = registry.version(model, candidate).await.map_err(reg)?;
    let bv = registry.version(model, baseline).await.map_err(reg)?;
    Ok(Versions {
        model: model.to_string(),
        candidate,
        candidate_sha256: cv.spec.weights_sha256.clone(),
        candidate_created: cv
            .created
            .parse()
            .map_err(|e| Error::Data(format!("{model} v{candidate} created: {e}")))?,
        baseline,
        baseline_sha256: bv.spec.weights_sha256.clone(),
    })
}

/// The summary of the newest decision recorded about `candidate`.
fn last_recorded<'a>(
    log: &'a [radfm_registry::Event],
    candidate: u64,
    production: &str,
) -> Option<&'a str> {
    log.iter().rev().find_map(|e| match &e.kind {
        EventKind::Note { version: Some(v) } if *v == candidate => Some(e.reason.as_str()),
        EventKind::AliasMoved { alias, to, .. } if *to == candidate && alias == production => {
            Some(e.reason.as_str())
        }
        _ => None,
    })
}

/// Records the decision: production moves (compare-and-set against the baseline) on Promote,
/// a note otherwise; the decision itself is stored beside the event. Returns the event's number.
async fn record(
    registry: &Registry,
    policy: &PromotionPolicySpec,
    decision: &Decision,
    baseline: u64,
    by: &str,
    text: &str,
) -> Result<u64> {
    let (model, candidate) = (&policy.model, decision.candidate);
    let event = match decision.outcome {
        Outcome::Promote => registry
            .move_alias(
                model,
                &policy.production_alias,
                candidate,
                Some(baseline),
                by,
                text,
            )
            .await
            .map_err(reg)?,
        Outcome::Reject | Outcome::HoldForReview => registry
            .note(model, Some(candidate), by, text)
            .await
            .map_err(reg)?,
        Outcome::Rollback => registry
            .move_alias(
                model,
                &policy.production_alias,
                baseline,
                Some(candidate),
                by,
                text,
            )
            .await
            .map_err(reg)?,
    };
    let body = serde_json::to_vec_pretty(decision).expect("decisions serialise");
    registry
        .put_decision(model, event.seq, body)
        .await
        .map_err(reg)?;
    Ok(event.seq)
}

/// Whether `version` was rolled back from `production` for harm (then it is not promoted
/// again: a new version has to earn it).
fn rolled_back_for_harm(log: &[radfm_registry::Event], version: u64, production: &str) -> bool {
    let prefix = format!("{} v{version} ", Outcome::Rollback.as_str());
    log.iter().any(|e| {
        matches!(&e.kind, EventKind::AliasMoved { alias, from: Some(f), .. }
            if alias == production && *f == version)
            && e.reason.starts_with(&prefix)
    })
}

/// The production version, when the policy rolls back on harm and production has a version
/// before it that was not itself rolled back for harm.
async fn deployed(
    registry: &Registry,
    policy: &PromotionPolicySpec,
    log: &[radfm_registry::Event],
) -> Result<Option<Deployed>> {
    let alias = &policy.production_alias;
    let last_move = log.iter().rev().find_map(|e| match &e.kind {
        EventKind::AliasMoved { alias: a, from, to } if a == alias => Some((e, *from, *to)),
        _ => None,
    });
    let Some((event, Some(previous), version)) = last_move else {
        return Ok(None);
    };
    if policy.rollback.is_none() || rolled_back_for_harm(log, previous, alias) {
        return Ok(None);
    }
    let v = registry
        .version(&policy.model, version)
        .await
        .map_err(reg)?;
    let promoted = event
        .time
        .parse()
        .map_err(|e| Error::Data(format!("event {} time: {e}", event.seq)))?;
    Ok(Some(Deployed {
        model: policy.model.clone(),
        version,
        weights_sha256: v.spec.weights_sha256,
        promoted,
        previous,
    }))
}

/// Rolls production back when the policy asks for it and its monitoring shows harm (see
/// [`gate::harm`]); the decision is recorded with the move.
async fn roll_back_on_harm(
    registry: &Registry,
    policy: &PromotionPolicySpec,
    log: &[radfm_registry::Event],
    by: &str,
    now: Timestamp,
) -> Result<Option<GatePass>> {
    let Some(d) = deployed(registry, policy, log).await? else {
        return Ok(None);
    };
    let looks = registry
        .monitor_reports(&policy.model, d.version)
        .await
        .map_err(reg)?;
    let Some(decision) = gate::harm(policy, &d, &looks, now) else {
        return Ok(None);
    };
    let text = summary(&decision);
    let seq = record(registry, policy, &decision, d.previous, by, &text).await?;
    Ok(Some(GatePass {
        gated: Gated::Decided {
            decision: Box::new(decision),
            recorded: Some(seq),
        },
        production: Some(d.previous),
    }))
}

/// The candidate and the production baseline to decide between, or why there is nothing to
/// decide (no candidate, the candidate is production, or it was rolled back for harm).
fn candidate_to_decide(
    policy: &PromotionPolicySpec,
    log: &[radfm_registry::Event],
) -> Result<std::result::Result<(u64, u64), String>> {
    let (model, production_alias) = (&policy.model, &policy.production_alias);
    let aliases = radfm_registry::aliases_of(log);
    let Some(&candidate) = aliases.get(&policy.candidate_alias) else {
        return Ok(Err(format!(
            "{model} has no alias {}",
            policy.candidate_alias
        )));
    };
    let Some(&baseline) = aliases.get(production_alias) else {
        return Err(Error::Data(format!(
            "{model} has no {production_alias} version to compare with; promote a first version by hand"
        )));
    };
    if candidate == baseline {
        return Ok(Err(format!(
            "{model} v{candidate} is already {production_alias}"
        )));
    }
    if rolled_back_for_harm(log, candidate, production_alias) {
        return Ok(Err(format!(
            "{model} v{candidate} was rolled back from {production_alias} for harm; it is not promoted again"
        )));
    }
    Ok(Ok((candidate, baseline)))
}

/// Rolls production back if its monitoring shows harm (when the policy asks for it); otherwise
/// decides on the current candidate (with the signed approvals stored for it) and records the
/// decision.
pub async fn gate(
    registry: &Registry,
    policy: &PromotionPolicySpec,
    by: &str,
    now: Timestamp,
) -> Result<GatePass> {
    let model = &policy.model;
    let log = registry.events(model).await.map_err(reg)?;
    if let Some(pass) = roll_back_on_harm(registry, policy, &log, by, now).await? {
        return Ok(pass);
    }
    let production = radfm_registry::aliases_of(&log)
        .get(&policy.production_alias)
        .copied();
    let (candidate, baseline) = match candidate_to_decide(policy, &log)? {
        Ok(pair) => pair,
        Err(why) => {
            return Ok(GatePass {
                gated: Gated::NothingToDecide { why },
                production,
            });
        }
    };
    let versions = versions(registry, model, candidate, baseline).await?;
    let stored = registry.reports(model, candidate).await.map_err(reg)?;
    let approvals = registry.approvals(model, candidate).await.map_err(reg)?;
    let (approval, refused) = approval::first_valid(policy, &versions, &approvals, now);
    let mut decision = gate::decide(policy, &versions, &stored, approval.as_ref(), now);
    if policy.require_approval {
        decision
            .reasons
            .extend(refused.into_iter().map(|(who, why)| gate::Reason {
                code: "approval_rejected".into(),
                site: None,
                subgroup: None,
                message: format!("approval by {who} not counted: {why}"),
            }));
    }
    let text = summary(&decision);
    if last_recorded(&log, candidate, &policy.production_alias) == Some(text.as_str()) {
        return Ok(GatePass {
            gated: Gated::Decided {
                decision: Box::new(decision),
                recorded: None,
            },
            production,
        });
    }
    let seq = record(registry, policy, &decision, baseline, by, &text).await?;
    let production = if decision.outcome == Outcome::Promote {
        Some(candidate)
    } else {
        production
    };
    Ok(GatePass {
        gated: Gated::Decided {
            decision: Box::new(decision),
            recorded: Some(seq),
        },
        production,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drift::DriftTest;
    use crate::monitor::{self, MonitorReport, Watched};
    use crate::performance::CellPerformance;
    use crate::stats::Estimate;
    use radfm_api::site_validation::{RollbackSpec, TrustedSite};
    use radfm_registry::NewVersion;

    fn version() -> NewVersion {
        NewVersion {
            weights_uri: "file:///m".into(),
            weights_sha256: "c".repeat(64),
            code_version: "test".into(),
            ..Default::default()
        }
    }

    /// North's signed look at v2 now, whose women's AUROC dropped.
    fn harmful_look(key: &ed25519_dalek::SigningKey) -> Vec<u8> {
        let e = |value| Estimate {
            value,
            lo: value - 0.05,
            hi: value + 0.05,
        };
        let test = DriftTest {
            statistic: 0.3,
            p_value: 0.0001,
            permutations: 9999,
            reference: 200,
            recent: 200,
        };
        let r = MonitorReport {
            format: monitor::FORMAT.into(),
            model: "chest".into(),
            version: 2,
            weights_sha256: "c".repeat(64),
            site: "north".into(),
            reference_fingerprint: "a".into(),
            recent_fingerprint: "b".into(),
            created: Timestamp::now().to_string(),
            code_version: "test".into(),
            alpha: 0.01,
            watched: vec![Watched {
                name: "performance:lesion:sex=F".into(),
                test,
                adjusted_p: 0.0002,
                drifting: true,
            }],
            drifting: true,
            performance: vec![CellPerformance {
                cell: Some("sex=F".into()),
                reference_cases: 200,
                recent_cases: 200,
                reference_auroc: e(0.85),
                recent_auroc: e(0.55),
                change: e(-0.3),
                recent_bias: None,
            }],
            look: Some("north-1".into()),
        };
        serde_json::to_vec(&monitor::sign(&r, key)).unwrap()
    }

    fn policy(registry: &str, key: &ed25519_dalek::SigningKey) -> PromotionPolicySpec {
        let yaml = format!(
            "registry: \"file://{registry}\"\nmodel: chest\ntask: lesion\nquorum: 1\n\
             trustedSites: [{{site: north, publicKey: \"{}\"}}]\nrollback: {{minSites: 1}}\n",
            crate::report::public_hex(key)
        );
        serde_yaml_ng::from_str(&yaml).unwrap()
    }

    #[tokio::test]
    async fn harm_after_a_promotion_rolls_production_back_once_and_the_version_stays_out() {
        let dir = tempfile::tempdir().unwrap();
        let key = crate::report::generate_key();
        let p = policy(dir.path().to_str().unwrap(), &key);
        assert_eq!(p.rollback, Some(RollbackSpec { min_sites: 1 }));
        assert_eq!(
            p.trusted_sites[0],
            TrustedSite {
                site: "north".into(),
                public_key: crate::report::public_hex(&key)
            }
        );
        let r = Registry::open(&p.registry).unwrap();
        r.register("chest", version(), "ci", "first", Some("production"))
            .await
            .unwrap();
        r.register("chest", version(), "ci", "second", Some("candidate"))
            .await
            .unwrap();
        r.move_alias(
            "chest",
            "production",
            2,
            Some(1),
            "gate",
            "Promote v2 (against v1): passed",
        )
        .await
        .unwrap();
        let now = || Timestamp::now() + jiff::SignedDuration::from_secs(1);
        let pass = gate(&r, &p, "gate", now()).await.unwrap();
        assert!(
            matches!(pass.gated, Gated::NothingToDecide { .. }),
            "no look yet: {pass:?}"
        );
        assert_eq!(pass.production, Some(2));

        r.put_monitor_report("chest", 2, "north", harmful_look(&key))
            .await
            .unwrap();
        let pass = gate(&r, &p, "gate", now()).await.unwrap();
        let Gated::Decided {
            decision,
            recorded: Some(seq),
        } = pass.gated
        else {
            panic!("{pass:?}")
        };
        assert_eq!(
            (decision.outcome, pass.production),
            (Outcome::Rollback, Some(1))
        );
        assert_eq!(r.aliases("chest").await.unwrap()["production"], 1);
        let stored: Decision =
            serde_json::from_slice(&r.decision("chest", seq).await.unwrap().unwrap()).unwrap();
        assert_eq!(stored.reasons[0].subgroup.as_deref(), Some("sex=F"));

        let pass = gate(&r, &p, "gate", now()).await.unwrap();
        let Gated::NothingToDecide { why } = pass.gated else {
            panic!("{pass:?}")
        };
        assert_eq!(
            why,
            "chest v2 was rolled back from production for harm; it is not promoted again"
        );
        assert_eq!(r.aliases("chest").await.unwrap()["production"], 1);
    }
}
