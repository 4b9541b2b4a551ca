//! The decision core of the PromotionPolicy controller: a gate pass (the gate decides and
//! records its decision in the registry, which is the commit point) → the status and event
//! that show it.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use radfm_api::conditions::{Stamp, ValidationConditionType as Cond, validation_reason};
use radfm_api::health;
use radfm_api::site_validation::{DecisionStatus, PromotionPolicy, PromotionPolicyStatus};
use radfm_validation::apply::{self, GatePass, Gated};
use radfm_validation::gate::{Decision, Outcome};

use crate::effects::PlannedEvent;

/// What the controller must do: write the status, record events, poll again.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The status to write.
    pub status: PromotionPolicyStatus,
    /// Events to record after the status write.
    pub events: Vec<PlannedEvent>,
    /// When to poll again.
    pub requeue_after: Duration,
}

/// The plan for `pp` after a gate pass (or the registry error that stopped it) at `now`.
pub fn plan(pp: &PromotionPolicy, gate: &Result<GatePass, String>, now: Timestamp) -> Plan {
    let stamp = Stamp {
        generation: pp.metadata.generation,
        now: Time(now),
    };
    let mut plan = Plan {
        status: pp.status.clone().unwrap_or_default(),
        events: Vec::new(),
        requeue_after: Duration::from_secs(pp.spec.poll_interval_seconds.max(5) as u64),
    };
    plan.status.observed_generation = pp.metadata.generation;
    match gate {
        Err(e) => {
            let why = validation_reason::REGISTRY_ERROR;
            stamp.set(&mut plan.status.conditions, Cond::Ready, false, why, e);
        }
        Ok(pass) => {
            plan.status.production = pass.production.map(|p| p as i64);
            let msg = match &pass.gated {
                Gated::NothingToDecide { why } => why.clone(),
                Gated::Decided { decision, recorded } => {
                    show_decision(decision, *recorded, &stamp, &mut plan)
                }
            };
            let why = validation_reason::POLLING;
            stamp.set(&mut plan.status.conditions, Cond::Ready, true, why, &msg);
        }
    }
    health::follow_ready(&mut plan.status.conditions, &stamp);
    plan
}

/// The decision in the status (its time kept while it stays the same) and, when recorded now,
/// in an event; returns its one-line summary.
fn show_decision(
    decision: &Decision,
    recorded: Option<u64>,
    stamp: &Stamp,
    plan: &mut Plan,
) -> String {
    let line = apply::summary(decision);
    if let Some(seq) = recorded {
        let note = format!("event {seq}: {line}");
        let why = validation_reason::DECIDED;
        plan.events.push(match decision.outcome {
            Outcome::Promote => PlannedEvent::normal(why, note),
            _ => PlannedEvent::warning(why, note),
        });
    }
    let reasons: Vec<String> = decision.reasons.iter().map(|r| r.message.clone()).collect();
    let same = plan.status.last_decision.as_ref().is_some_and(|d| {
        d.version == decision.candidate as i64
            && d.outcome == decision.outcome.as_str()
            && d.reasons == reasons
    });
    if !same {
        plan.status.last_decision = Some(DecisionStatus {
            version: decision.candidate as i64,
            outcome: decision.outcome.as_str().into(),
            reasons,
            sites: decision.sites.clone(),
            time: stamp.now.clone(),
        });
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use radfm_api::conditions;
    use radfm_validation::gate::Reason;

    fn policy() -> PromotionPolicy {
        let yaml = "apiVersion: radfm.io/v1alpha1
kind: PromotionPolicy
metadata: {name: cxr, namespace: hub, generation: 3}
spec:
  registry: s3://radiology/registry
  model: cxr-mae
  task: lesion
  trustedSites: [{site: a, publicKey: 31b5d608508d8ada41ed224c68435b81f83b685507519cfb556290e503aa7169}]
  quorum: 1
  pollIntervalSeconds: 30
";
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    fn decided(outcome: Outcome, recorded: Option<u64>) -> Result<GatePass, String> {
        let decision = Decision {
            model: "cxr-mae".into(),
            candidate: 8,
            baseline: 7,
            outcome,
            reasons: vec![Reason {
                code: "quorum".into(),
                site: None,
                subgroup: None,
                message: "2 of 2 sites reported".into(),
            }],
            sites: vec!["a".into(), "b".into()],
            reports: Vec::new(),
            accepted: Vec::new(),
            approval: None,
        };
        Ok(GatePass {
            gated: Gated::Decided {
                decision: Box::new(decision),
                recorded,
            },
            production: Some(if outcome == Outcome::Promote { 8 } else { 7 }),
        })
    }

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    /// (gate pass, event severities, production, last decision's outcome, Ready)
    type Case<'a> = (
        Result<GatePass, String>,
        Vec<crate::effects::Severity>,
        Option<i64>,
        Option<&'a str>,
        &'a str,
    );

    #[test]
    fn a_gate_pass_shows_in_the_status_and_a_recorded_decision_in_an_event() {
        use crate::effects::Severity::*;
        let nothing = Ok(GatePass {
            gated: Gated::NothingToDecide {
                why: "no candidate alias".into(),
            },
            production: None,
        });
        // (gate, events, production, last decision's outcome, Ready)
        let cases: Vec<Case> = vec![
            (nothing, vec![], None, None, "True"),
            (
                decided(Outcome::Promote, Some(12)),
                vec![Normal],
                Some(8),
                Some("Promote"),
                "True",
            ),
            (
                decided(Outcome::Reject, Some(13)),
                vec![Warning],
                Some(7),
                Some("Reject"),
                "True",
            ),
            (
                decided(Outcome::Reject, None),
                vec![],
                Some(7),
                Some("Reject"),
                "True",
            ),
            (Err("registry: denied".into()), vec![], None, None, "False"),
        ];
        for (gate, events, production, outcome, ready) in cases {
            let label = format!("{:?}", gate.as_ref().map(|g| &g.gated));
            let p = plan(&policy(), &gate, at(100));
            let severities: Vec<_> = p.events.iter().map(|e| e.severity).collect();
            assert_eq!(severities, events, "{label}");
            assert_eq!(p.status.production, production, "{label}");
            let last = p.status.last_decision.as_ref().map(|d| d.outcome.as_str());
            assert_eq!(last, outcome, "{label}");
            let c = conditions::get(&p.status.conditions, Cond::Ready).unwrap();
            assert_eq!(c.status, ready, "{label}");
            assert_eq!(p.status.observed_generation, Some(3));
            assert_eq!(p.requeue_after, Duration::from_secs(30));
        }
    }

    #[test]
    fn the_same_decision_keeps_its_time() {
        let mut pp = policy();
        let first = plan(&pp, &decided(Outcome::Reject, Some(1)), at(100));
        pp.status = Some(first.status);
        let again = plan(&pp, &decided(Outcome::Reject, None), at(500));
        assert_eq!(again.status.last_decision.unwrap().time, Time(at(100)));
    }
}
