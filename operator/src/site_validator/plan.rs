//! The decision core of the SiteValidator controller: the candidate the registry names and
//! this validator's pods → the pods to create and delete and the new status.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use radfm_api::conditions::{Stamp, ValidationConditionType as Cond, validation_reason};
use radfm_api::health;
use radfm_api::site_validation::{SiteValidator, SiteValidatorStatus};

use super::pod::validation_pod;
use crate::effects::PlannedEvent;
use crate::training_job::workers::PodPhase;

/// A candidate version this site validates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// The version the candidate alias points to.
    pub version: u64,
    /// This site's report of it is in the registry.
    pub reported: bool,
}

/// What the controller saw for one SiteValidator.
#[derive(Debug, Clone)]
pub struct Observed {
    /// The candidate to validate (None: no candidate alias, or it is the baseline and this site
    /// did not report on it), or why the registry could not say.
    pub candidate: Result<Option<Candidate>, String>,
    /// This validator's pods.
    pub pods: Vec<Pod>,
    /// The current time.
    pub now: Timestamp,
    /// Why the cluster's pod policy refuses the validation pod (its `dataVolume`), if it does.
    pub policy_violation: Option<crate::pod_policy::Violation>,
}

/// What the controller must do: delete pods, create the pod, write the status, record events.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Pods to delete (finished, or of another version).
    pub delete_pods: Vec<String>,
    /// The validation pod to create.
    pub create_pod: Option<Pod>,
    /// The status to write.
    pub status: SiteValidatorStatus,
    /// Events to record after the status write.
    pub events: Vec<PlannedEvent>,
    /// When to poll again.
    pub requeue_after: Duration,
}

/// Decides what to do for `sv`.
pub fn plan(sv: &SiteValidator, obs: &Observed) -> Plan {
    let stamp = Stamp {
        generation: sv.metadata.generation,
        now: Time(obs.now),
    };
    let mut status = sv.status.clone().unwrap_or_default();
    status.observed_generation = sv.metadata.generation;
    status.last_poll_time = Some(stamp.now.clone());
    let mut plan = Plan {
        delete_pods: Vec::new(),
        create_pod: None,
        status,
        events: Vec::new(),
        requeue_after: Duration::ZERO,
    };
    match (&obs.policy_violation, &obs.candidate) {
        (Some(violation), _) => {
            let why = radfm_api::conditions::reason::POD_POLICY_VIOLATION;
            let msg = format!("refused by the cluster's radfm pod policy: {violation}");
            if stamp.set(&mut plan.status.conditions, Cond::Ready, false, why, &msg) {
                plan.events.push(PlannedEvent::warning(why, msg));
            }
        }
        (None, Err(e)) => {
            let why = validation_reason::REGISTRY_ERROR;
            stamp.set(&mut plan.status.conditions, Cond::Ready, false, why, e);
        }
        (None, Ok(found)) => {
            let msg = match found {
                Some(c) => format!("candidate is v{}", c.version),
                None => "no candidate to validate".into(),
            };
            let why = validation_reason::POLLING;
            stamp.set(&mut plan.status.conditions, Cond::Ready, true, why, &msg);
            plan.status.running = None;
            match found {
                Some(c) if c.reported => reported(c.version, &obs.pods, &mut plan),
                Some(c) => validate(sv, c.version, &obs.pods, &mut plan),
                None => {}
            }
        }
    }
    report_validating(&stamp, &mut plan.status);
    health::follow_ready(&mut plan.status.conditions, &stamp);
    let poll = Duration::from_secs(sv.spec.poll_interval_seconds.max(5) as u64);
    plan.requeue_after = match plan.status.running {
        Some(_) => poll.min(Duration::from_secs(10)),
        None => poll,
    };
    plan
}

/// The report is in: record it; finished pods go (one still exiting after publishing is left
/// to finish).
fn reported(version: u64, pods: &[Pod], plan: &mut Plan) {
    if plan.status.last_validated_version != Some(version as i64) {
        let note = format!("report of v{version} is in the registry");
        plan.events.push(PlannedEvent::normal(
            validation_reason::REPORT_PUBLISHED,
            note,
        ));
    }
    plan.status.last_validated_version = Some(version as i64);
    plan.delete_pods = pods
        .iter()
        .filter(|p| PodPhase::of(p).is_finished())
        .map(|p| p.name_any())
        .collect();
}

/// No report yet: pods of other versions, failed pods and pods that ended without a report go;
/// the pod of this version is created when missing.
fn validate(sv: &SiteValidator, version: u64, pods: &[Pod], plan: &mut Plan) {
    let want = validation_pod(sv, version);
    let name = want.name_any();
    for p in pods {
        let phase = PodPhase::of(p);
        let mine = p.name_any() == name;
        if mine && phase.is_finished() {
            let note =
                format!("pod {name} ended ({phase:?}) without a report of v{version}; retrying");
            plan.events.push(PlannedEvent::warning(
                validation_reason::VALIDATION_FAILED,
                note,
            ));
        }
        if !mine || phase.is_finished() {
            plan.delete_pods.push(p.name_any());
        }
    }
    if !pods.iter().any(|p| p.name_any() == name) {
        let note = format!("validating v{version} in pod {name}");
        plan.events.push(PlannedEvent::normal(
            validation_reason::VALIDATION_STARTED,
            note,
        ));
        plan.create_pod = Some(want);
    }
    plan.status.running = Some(name);
}

fn report_validating(stamp: &Stamp, status: &mut SiteValidatorStatus) {
    let (state, why, msg) = match &status.running {
        Some(p) => (
            true,
            validation_reason::VALIDATION_STARTED,
            format!("pod {p}"),
        ),
        None => (
            false,
            validation_reason::IDLE,
            "no validation in progress".into(),
        ),
    };
    stamp.set(&mut status.conditions, Cond::Validating, state, why, &msg);
}

#[cfg(test)]
mod tests {
    use super::*;
    use radfm_api::conditions;

    fn validator() -> SiteValidator {
        let yaml = "apiVersion: radfm.io/v1alpha1
kind: SiteValidator
metadata: {name: hospital-c, namespace: site, uid: uid-sv, generation: 1}
spec:
  siteId: hospital-c
  signingKeySecretRef: {name: hospital-c-key}
  registry: s3://radiology/registry
  model: cxr-mae
  dataset: {uri: 'file:///data/cxr-labelled'}
  tasks: [{label: lesion}]
  image: radfm-trainer:dev
  pollIntervalSeconds: 60
";
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    fn pod(name: &str, phase: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name}, "status": {"phase": phase}
        }))
        .unwrap()
    }

    fn observe(candidate: Result<Option<(u64, bool)>, &str>, pods: Vec<Pod>) -> Observed {
        Observed {
            candidate: candidate
                .map(|c| c.map(|(version, reported)| Candidate { version, reported }))
                .map_err(String::from),
            pods,
            now: Timestamp::from_second(100).unwrap(),
            policy_violation: None,
        }
    }

    /// (candidate and reported, pods, creates a pod, deletes, events, running, poll seconds)
    type Case<'a> = (
        Result<Option<(u64, bool)>, &'a str>,
        Vec<Pod>,
        bool,
        Vec<&'a str>,
        Vec<&'a str>,
        bool,
        u64,
    );

    #[test]
    fn the_candidate_and_the_pods_decide_what_the_validator_does() {
        use validation_reason::*;
        // (candidate, pods, create, delete, events, running, poll seconds)
        let cases: Vec<Case> = vec![
            (Ok(None), vec![], false, vec![], vec![], false, 60),
            (
                Ok(Some((7, false))),
                vec![],
                true,
                vec![],
                vec![VALIDATION_STARTED],
                true,
                10,
            ),
            (
                Ok(Some((7, false))),
                vec![pod("hospital-c-v7", "Running")],
                false,
                vec![],
                vec![],
                true,
                10,
            ),
            (
                Ok(Some((7, false))),
                vec![pod("hospital-c-v7", "Failed")],
                false,
                vec!["hospital-c-v7"],
                vec![VALIDATION_FAILED],
                true,
                10,
            ),
            (
                Ok(Some((7, false))),
                vec![pod("hospital-c-v6", "Running")],
                true,
                vec!["hospital-c-v6"],
                vec![VALIDATION_STARTED],
                true,
                10,
            ),
            (
                Ok(Some((7, true))),
                vec![
                    pod("hospital-c-v7", "Succeeded"),
                    pod("hospital-c-v8", "Running"),
                ],
                false,
                vec!["hospital-c-v7"],
                vec![REPORT_PUBLISHED],
                false,
                60,
            ),
            (
                Err("registry: denied"),
                vec![pod("hospital-c-v7", "Failed")],
                false,
                vec![],
                vec![],
                false,
                60,
            ),
        ];
        let sv = validator();
        for (candidate, pods, create, delete, events, running, poll) in cases {
            let label = format!("{candidate:?}");
            let p = plan(&sv, &observe(candidate, pods));
            assert_eq!(p.create_pod.is_some(), create, "{label}");
            assert_eq!(p.delete_pods, delete, "{label}");
            assert_eq!(
                p.events.iter().map(|e| e.reason).collect::<Vec<_>>(),
                events,
                "{label}"
            );
            assert_eq!(p.status.running.is_some(), running, "{label}");
            assert_eq!(p.requeue_after, Duration::from_secs(poll), "{label}");
            let validating = conditions::is_true(&p.status.conditions, Cond::Validating);
            assert_eq!(validating, running, "{label}");
        }
    }

    #[test]
    fn a_report_is_recorded_once_and_a_registry_error_makes_the_validator_unready() {
        let mut sv = validator();
        let p = plan(&sv, &observe(Ok(Some((7, true))), vec![]));
        assert_eq!(p.status.last_validated_version, Some(7));
        sv.status = Some(p.status);
        let again = plan(&sv, &observe(Ok(Some((7, true))), vec![]));
        assert!(again.events.is_empty());
        let broken = plan(&sv, &observe(Err("registry: denied"), vec![]));
        let ready = conditions::get(&broken.status.conditions, Cond::Ready).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", validation_reason::REGISTRY_ERROR)
        );
        assert_eq!(broken.status.last_validated_version, Some(7));
    }

    #[test]
    fn a_data_volume_the_pod_policy_refuses_starts_no_pod_and_says_why() {
        let sv = validator();
        let mut obs = observe(Ok(Some((7, false))), vec![]);
        obs.policy_violation = Some(crate::pod_policy::Violation(
            "spec.dataVolume: volume type hostPath is not allowed".into(),
        ));
        let p = plan(&sv, &obs);
        assert!(p.create_pod.is_none());
        let ready = conditions::get(&p.status.conditions, Cond::Ready).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", radfm_api::conditions::reason::POD_POLICY_VIOLATION)
        );
        assert!(ready.message.contains("hostPath"), "{}", ready.message);
        assert_eq!(p.events.len(), 1);
    }
}
