//! A job succeeds when every rank of its current attempt exited 0 (like JobSet's success policy
//! with one replicated job and operator All).

use std::collections::BTreeSet;

use radfm_api::TrainingJobStatus;
use radfm_api::conditions::{ConditionType as C, reason};
use radfm_api::trainingjob::Phase;

use super::plan::{Pass, Plan};
use super::workers::{Worker, WorkerState};

/// The ranks of the current attempt that exited 0.
pub(super) fn succeeded_ranks(current: &[&Worker]) -> BTreeSet<i32> {
    current
        .iter()
        .filter(|w| w.state == WorkerState::Succeeded)
        .map(|w| w.rank)
        .collect()
}

/// Marks the job Succeeded when every rank did; returns whether it did.
pub(super) fn on_success(
    pass: &Pass,
    plan: &mut Plan,
    st: &mut TrainingJobStatus,
    workers: &[Worker],
    current: &[&Worker],
) -> bool {
    let replicas = pass.job.spec.workers.replicas;
    if (succeeded_ranks(current).len() as i32) < replicas {
        return false;
    }
    let why = reason::SUCCEEDED;
    pass.set(
        st,
        C::Succeeded,
        true,
        why,
        "every worker exited successfully",
    );
    pass.set(st, C::Running, false, why, "job finished");
    pass.set(st, C::Restarting, false, why, "job finished");
    st.phase = Some(Phase::Succeeded);
    st.completion_time = Some(pass.obs.now.clone());
    plan.normal(why, format!("all {replicas} workers succeeded"));
    super::ttl_after_finished::finished(pass, plan, st, workers);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;
    use radfm_api::failure::WorkerFailure;

    #[test]
    fn only_ranks_that_exited_zero_count_once_each() {
        let pod = Pod::default();
        let w = |rank, state| Worker {
            pod: &pod,
            name: format!("w{rank}"),
            rank,
            attempt: 1,
            deleting_since: None,
            state,
            ready: false,
        };
        let failed = || WorkerState::Failed(WorkerFailure::default());
        let cases: Vec<(Vec<Worker>, Vec<i32>)> = vec![
            (vec![], vec![]),
            (
                vec![w(0, WorkerState::Succeeded), w(1, WorkerState::Running)],
                vec![0],
            ),
            (
                vec![w(0, WorkerState::Succeeded), w(0, WorkerState::Succeeded)],
                vec![0],
            ),
            (vec![w(0, failed()), w(1, WorkerState::Succeeded)], vec![1]),
        ];
        for (workers, want) in cases {
            let current: Vec<&Worker> = workers.iter().collect();
            assert_eq!(
                succeeded_ranks(&current).into_iter().collect::<Vec<_>>(),
                want
            );
        }
    }
}
