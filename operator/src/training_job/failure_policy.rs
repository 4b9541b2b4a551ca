//! A failure of the current attempt decides for the whole gang: the failed workers (and, in a
//! gang that was complete, the ones that vanished) go to the job's failure policy, and the one
//! [`radfm_api::failure::gang_verdict`] restarts the gang as the next attempt or fails the job.

use std::collections::BTreeSet;

use radfm_api::TrainingJobStatus;
use radfm_api::conditions::{ConditionType as C, reason};
use radfm_api::failure::{self, GangVerdict, WorkerFailure};
use radfm_api::trainingjob::Phase;

use super::plan::{Pass, Plan};
use super::workers::{Worker, WorkerState};

/// The failures of the current attempt. A worker that vanished from a gang that was running
/// cannot rejoin its collectives: it counts as a disruption (not the trainer's fault).
pub(super) fn gang_failures(
    current: &[&Worker],
    was_running: bool,
    replicas: i32,
) -> Vec<WorkerFailure> {
    let mut failures: Vec<WorkerFailure> = current
        .iter()
        .filter_map(|w| match &w.state {
            WorkerState::Failed(f) => Some(f.clone()),
            _ => None,
        })
        .collect();
    if !was_running {
        return failures;
    }
    let present: BTreeSet<i32> = current
        .iter()
        .filter(|w| w.deleting_since.is_none())
        .map(|w| w.rank)
        .collect();
    for rank in (0..replicas).filter(|r| !present.contains(r)) {
        if !failures.iter().any(|f| f.rank == rank) {
            failures.push(WorkerFailure {
                rank,
                reason: Some("WorkerDeleted".into()),
                pod_conditions: vec!["DisruptionTarget".into()],
                ..Default::default()
            });
        }
    }
    failures
}

/// Applies the gang verdict on `failures`; returns whether there was one (the pass is then done).
pub(super) fn on_failures(
    pass: &Pass,
    plan: &mut Plan,
    st: &mut TrainingJobStatus,
    workers: &[Worker],
    failures: &[WorkerFailure],
) -> bool {
    let rp = &pass.job.spec.run_policy;
    let policy = pass.job.spec.failure_policy.as_ref();
    match failure::gang_verdict(policy, failures, st.counted_restarts, rp.backoff_limit) {
        None => false,
        Some(GangVerdict::Fail { cause, message }) => {
            pass.fail(plan, st, workers, cause.reason(), &message);
            true
        }
        Some(GangVerdict::Restart { counted, message }) => {
            restart_gang(pass, plan, st, workers, counted, &message);
            true
        }
    }
}

/// Starts the next attempt: every worker of this and earlier attempts goes.
fn restart_gang(
    pass: &Pass,
    plan: &mut Plan,
    st: &mut TrainingJobStatus,
    workers: &[Worker],
    counted: bool,
    message: &str,
) {
    let why = if counted {
        reason::WORKER_FAILED
    } else {
        reason::DISRUPTED
    };
    st.counted_restarts += i32::from(counted);
    st.restarts += 1;
    let from = st.attempt;
    st.attempt += 1;
    let note = format!(
        "{message}; restarting the whole gang as attempt {} (restart {}{})",
        st.attempt,
        st.restarts,
        if counted { "" } else { ", not counted" }
    );
    pass.set(st, C::Restarting, true, why, &note);
    pass.set(st, C::Running, false, why, &note);
    st.phase = Some(Phase::Restarting);
    plan.warning(why, note);
    let doomed: Vec<&Worker> = workers.iter().filter(|w| w.attempt <= from).collect();
    pass.remove(plan, &doomed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    #[test]
    fn failed_workers_and_workers_gone_from_a_running_gang_are_its_failures() {
        let pod = Pod::default();
        let w = |rank, state, deleting: bool| Worker {
            pod: &pod,
            name: format!("w{rank}"),
            rank,
            attempt: 1,
            deleting_since: deleting.then_some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)),
            state,
            ready: true,
        };
        let exit = |rank, code| WorkerFailure {
            rank,
            exit_code: Some(code),
            ..Default::default()
        };
        let deleted = |rank| WorkerFailure {
            rank,
            reason: Some("WorkerDeleted".into()),
            pod_conditions: vec!["DisruptionTarget".into()],
            ..Default::default()
        };
        let running = |rank| w(rank, WorkerState::Running, false);
        let failed = |rank, code| w(rank, WorkerState::Failed(exit(rank, code)), false);
        let cases: Vec<(Vec<Worker>, bool, Vec<WorkerFailure>)> = vec![
            (vec![running(0), running(1), running(2)], true, vec![]),
            (
                vec![running(0), failed(1, 76), running(2)],
                true,
                vec![exit(1, 76)],
            ),
            (vec![running(0), running(2)], true, vec![deleted(1)]),
            (
                vec![running(0), w(1, WorkerState::Running, true), running(2)],
                true,
                vec![deleted(1)],
            ),
            (vec![running(0)], false, vec![]),
            (vec![failed(1, 64)], false, vec![exit(1, 64)]),
            (
                vec![failed(1, 64)],
                true,
                vec![exit(1, 64), deleted(0), deleted(2)],
            ),
        ];
        for (workers, was_running, want) in cases {
            let current: Vec<&Worker> = workers.iter().collect();
            assert_eq!(
                gang_failures(&current, was_running, 3),
                want,
                "{was_running}"
            );
        }
    }
}
