//! The gate against the registry: gather the candidate's reports, decide, and record the
//! decision in the registry's event log (moving production on Promote, with compare-and-set
//! against the baseline the sites compared with). Used by `radfm gate` and the PromotionPolicy
//! controller; a decision identical to the last one recorded for the candidate is not recorded
//! again, so polling does not flood the log.

use jiff::Timestamp;
use radfm_api::site_validation::PromotionPolicySpec;
use radfm_registry::{EventKind, Registry};

use crate::approval;
use crate::gate::{self, Decision, Outcome, Versions};
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
    };
    let body = serde_json::to_vec_pretty(decision).expect("decisions serialise");
    registry
        .put_decision(model, event.seq, body)
        .await
        .map_err(reg)?;
    Ok(event.seq)
}

/// Decides on the current candidate (with the signed approvals stored for it) and records the
/// decision.
pub async fn gate(
    registry: &Registry,
    policy: &PromotionPolicySpec,
    by: &str,
    now: Timestamp,
) -> Result<GatePass> {
    let model = &policy.model;
    let log = registry.events(model).await.map_err(reg)?;
    let aliases = radfm_registry::aliases_of(&log);
    let production = aliases.get(&policy.production_alias).copied();
    let Some(&candidate) = aliases.get(&policy.candidate_alias) else {
        return Ok(GatePass {
            gated: Gated::NothingToDecide {
                why: format!("{model} has no alias {}", policy.candidate_alias),
            },
            production,
        });
    };
    let Some(baseline) = production else {
        return Err(Error::Data(format!(
            "{model} has no {} version to compare with; promote a first version by hand",
            policy.production_alias
        )));
    };
    if candidate == baseline {
        return Ok(GatePass {
            gated: Gated::NothingToDecide {
                why: format!(
                    "{model} v{candidate} is already {}",
                    policy.production_alias
                ),
            },
            production,
        });
    }
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
