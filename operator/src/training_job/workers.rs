//! What the plan sees of a worker pod: its rank, attempt, state and, for a failed worker, the
//! facts the failure policy matches on. Kubernetes' strings (phases, condition types, container
//! reasons) become types here and nowhere else.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{ContainerStateTerminated, Pod, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use radfm_api::failure::{self, WorkerFailure};

use super::children;

/// A pod's `status.phase`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodPhase {
    /// Accepted, not all containers started (also: no phase reported yet).
    Pending,
    /// Bound to a node, containers started.
    Running,
    /// Every container exited 0.
    Succeeded,
    /// A container failed, or the pod was evicted.
    Failed,
}

impl PodPhase {
    /// The phase of `pod` (Pending until the kubelet says otherwise; unknown phases count as
    /// Pending, as the pod may still run).
    pub fn of(pod: &Pod) -> PodPhase {
        match pod.status.as_ref().and_then(|s| s.phase.as_deref()) {
            Some("Running") => PodPhase::Running,
            Some("Succeeded") => PodPhase::Succeeded,
            Some("Failed") => PodPhase::Failed,
            _ => PodPhase::Pending,
        }
    }

    /// The pod will not run again.
    pub fn is_finished(self) -> bool {
        matches!(self, PodPhase::Succeeded | PodPhase::Failed)
    }
}

/// One worker pod as the plan sees it.
#[derive(Debug, Clone)]
pub(super) struct Worker<'a> {
    pub pod: &'a Pod,
    pub name: String,
    pub rank: i32,
    pub attempt: i32,
    /// When deletion was requested (deletionTimestamp minus the grace period).
    pub deleting_since: Option<Time>,
    pub state: WorkerState,
    pub ready: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum WorkerState {
    Pending,
    Running,
    Succeeded,
    Failed(WorkerFailure),
}

impl Worker<'_> {
    /// Pending or Running and not being deleted: it holds (or will hold) resources.
    pub fn is_active(&self) -> bool {
        matches!(self.state, WorkerState::Pending | WorkerState::Running)
            && self.deleting_since.is_none()
    }
}

/// Pod conditions that say nothing about why a worker failed.
const ROUTINE_CONDITIONS: [&str; 5] = [
    "Ready",
    "PodScheduled",
    "Initialized",
    "ContainersReady",
    "PodReadyToStartContainers",
];

fn label_i32(pod: &Pod, key: &str) -> Option<i32> {
    pod.metadata.labels.as_ref()?.get(key)?.parse().ok()
}

fn true_conditions(status: Option<&PodStatus>) -> Vec<String> {
    status
        .and_then(|s| s.conditions.as_ref())
        .map(|cs| {
            cs.iter()
                .filter(|c| c.status == "True")
                .map(|c| c.type_.clone())
                .collect()
        })
        .unwrap_or_default()
}

fn trainer_terminated(status: Option<&PodStatus>) -> Option<&ContainerStateTerminated> {
    status
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.name == children::CONTAINER))
        .and_then(|c| c.state.as_ref()?.terminated.as_ref())
}

/// The facts about a failed worker that its failure policy matches on.
fn failure_of(pod: &Pod, rank: i32, conditions: &[String], node_lost: bool) -> WorkerFailure {
    let status = pod.status.as_ref();
    let terminated = trainer_terminated(status);
    WorkerFailure {
        rank,
        exit_code: terminated.map(|t| t.exit_code),
        reason: terminated
            .and_then(|t| t.reason.clone())
            .filter(|r| r != "Error" && r != "Completed")
            .or_else(|| status.and_then(|s| s.reason.clone())),
        pod_conditions: conditions
            .iter()
            .filter(|c| !ROUTINE_CONDITIONS.contains(&c.as_str()))
            .cloned()
            .collect(),
        node_lost,
        termination_message: terminated
            .and_then(|t| t.message.as_deref())
            .and_then(failure::last_line),
    }
}

/// The worker of `pod`, or None for a pod without rank and attempt labels.
pub(super) fn worker<'a>(pod: &'a Pod, lost_nodes: &BTreeSet<String>) -> Option<Worker<'a>> {
    let rank = label_i32(pod, children::LABEL_RANK)?;
    let attempt = label_i32(pod, children::LABEL_ATTEMPT)?;
    let conditions = true_conditions(pod.status.as_ref());
    let node_lost = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_ref())
        .is_some_and(|n| lost_nodes.contains(n));
    let disrupted = conditions.iter().any(|c| c == "DisruptionTarget");
    let failed = || WorkerState::Failed(failure_of(pod, rank, &conditions, node_lost));
    let state = match PodPhase::of(pod) {
        PodPhase::Succeeded => WorkerState::Succeeded,
        PodPhase::Failed => failed(),
        _ if node_lost || disrupted => failed(),
        PodPhase::Running => WorkerState::Running,
        PodPhase::Pending => WorkerState::Pending,
    };
    Some(Worker {
        pod,
        name: pod.metadata.name.clone()?,
        rank,
        attempt,
        deleting_since: pod
            .metadata
            .deletion_timestamp
            .as_ref()
            .map(|t| add_secs(t, -pod.metadata.deletion_grace_period_seconds.unwrap_or(0))),
        state,
        ready: conditions.iter().any(|c| c == "Ready"),
    })
}

/// Seconds from `from` to `to`.
pub(super) fn secs_between(from: &Time, to: &Time) -> i64 {
    to.0.as_second() - from.0.as_second()
}

/// `t` moved by `secs`, saturating at the ends of the representable range: a duration too
/// long to represent means "never", not "now".
pub(super) fn add_secs(t: &Time, secs: i64) -> Time {
    use k8s_openapi::jiff::{SignedDuration, Timestamp};
    Time(
        t.0.checked_add(SignedDuration::from_secs(secs))
            .unwrap_or(if secs >= 0 {
                Timestamp::MAX
            } else {
                Timestamp::MIN
            }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(phase: &str, conditions: &[&str], node: &str, exit: Option<(i32, &str)>) -> Pod {
        let conditions: Vec<_> = conditions
            .iter()
            .map(|c| serde_json::json!({"type": c, "status": "True"}))
            .collect();
        let terminated = exit.map(|(code, reason)| {
            serde_json::json!([{"name": children::CONTAINER, "image": "x", "imageID": "", "ready": false,
                "restartCount": 0, "state": {"terminated": {"exitCode": code, "reason": reason}}}])
        });
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "w", "labels": {children::LABEL_RANK: "2", children::LABEL_ATTEMPT: "1"}},
            "spec": {"nodeName": node, "containers": []},
            "status": {"phase": phase, "conditions": conditions, "containerStatuses": terminated},
        }))
        .unwrap()
    }

    #[test]
    fn a_pods_phase_conditions_and_node_make_the_workers_state() {
        let lost = BTreeSet::from(["gone".to_string()]);
        let failed = |f: WorkerFailure| WorkerState::Failed(WorkerFailure { rank: 2, ..f });
        let cases = [
            (pod("Pending", &[], "n1", None), WorkerState::Pending),
            (pod("Running", &["Ready"], "n1", None), WorkerState::Running),
            (
                pod("Succeeded", &[], "n1", Some((0, "Completed"))),
                WorkerState::Succeeded,
            ),
            (pod("Unknown", &[], "n1", None), WorkerState::Pending),
            (
                pod(
                    "Failed",
                    &["Ready", "PodScheduled"],
                    "n1",
                    Some((64, "Error")),
                ),
                failed(WorkerFailure {
                    exit_code: Some(64),
                    ..Default::default()
                }),
            ),
            (
                pod("Failed", &[], "n1", Some((137, "OOMKilled"))),
                failed(WorkerFailure {
                    exit_code: Some(137),
                    reason: Some("OOMKilled".into()),
                    ..Default::default()
                }),
            ),
            (
                pod("Running", &["Ready"], "gone", None),
                failed(WorkerFailure {
                    node_lost: true,
                    ..Default::default()
                }),
            ),
            (
                pod("Running", &["DisruptionTarget"], "n1", None),
                failed(WorkerFailure {
                    pod_conditions: vec!["DisruptionTarget".into()],
                    ..Default::default()
                }),
            ),
        ];
        for (p, want) in cases {
            let w = worker(&p, &lost).unwrap();
            assert_eq!(
                (w.rank, w.attempt, &w.state),
                (2, 1, &want),
                "{:?}",
                p.status
            );
        }
    }

    #[test]
    fn a_pod_without_rank_and_attempt_labels_is_not_a_worker() {
        let mut p = pod("Running", &[], "n1", None);
        p.metadata.labels = None;
        assert!(worker(&p, &BTreeSet::new()).is_none());
    }
}
