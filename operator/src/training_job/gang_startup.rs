//! Starting the current attempt's gang: the headless Service, the PodGroup of a gang scheduler,
//! the trainer's access and every missing rank; then `Created` and `Running` say how far it got.

use std::collections::BTreeSet;

use radfm_api::TrainingJobStatus;
use radfm_api::conditions::{self, ConditionType as C, reason};
use radfm_api::trainingjob::Phase;

use super::children::{self, GangScheduler};
use super::plan::{Pass, Plan};
use super::workers::{Worker, WorkerState};

/// Plans the children the current attempt lacks, except pods an earlier pass created that the
/// controller's cache does not show yet. Returns whether every rank's pod is seen.
pub(super) fn create_missing(
    pass: &Pass,
    plan: &mut Plan,
    st: &TrainingJobStatus,
    current: &[&Worker],
) -> bool {
    let job = pass.job;
    if !pass.obs.service_exists {
        plan.create_service = Some(children::service(job));
    }
    if let Some(sched) = GangScheduler::of(job)
        && !pass.obs.pod_group_exists
    {
        plan.create_pod_group = Some((sched, children::pod_group(job, sched)));
    }
    let present: BTreeSet<i32> = current.iter().map(|w| w.rank).collect();
    let replicas = job.spec.workers.replicas;
    plan.create_pods = (0..replicas)
        .filter(|r| !present.contains(r))
        .filter(|&r| {
            let awaited = &pass.obs.awaited_pods;
            awaited.is_empty() || !awaited.contains(&children::pod_name(job, r, st.attempt))
        })
        .map(|r| {
            let mut pod = children::worker_pod(job, r, st.attempt);
            if let Some(admission) = &pass.admitted {
                admission.apply(&mut pod);
            }
            pod
        })
        .collect();
    // A pass whose writes failed (`Created=False`, `CreateFailed`) may have created the pods
    // but not the trainer's access: the next passes grant it again until one succeeds.
    let writes_failed = conditions::get(&st.conditions, C::Created)
        .is_some_and(|c| c.status == "False" && c.reason == reason::CREATE_FAILED);
    if !plan.create_pods.is_empty() || writes_failed {
        plan.create_gang_secret = true;
        plan.trainer_access = children::trainer_access(job, st.attempt);
    }
    (0..replicas).all(|r| present.contains(&r))
}

/// The cluster's pod policy refuses the job: nothing is created, `Created=False` says why (a
/// warning event once, when it turns).
fn refuse(pass: &Pass, plan: &mut Plan, st: &mut TrainingJobStatus, why: &str) {
    let msg = format!("refused by the cluster's radfm pod policy: {why}");
    if pass.set(st, C::Created, false, reason::POD_POLICY_VIOLATION, &msg) {
        plan.warning(reason::POD_POLICY_VIOLATION, msg);
    }
}

/// `Created` turns True once every worker of the attempt exists, not when creation is merely
/// planned: a create the API server refuses leaves it False with the reason (set by the
/// controller), instead of flapping.
fn report_created(pass: &Pass, plan: &mut Plan, st: &mut TrainingJobStatus, all_seen: bool) {
    let replicas = pass.job.spec.workers.replicas;
    if all_seen
        && pass.obs.service_exists
        && pass.set(
            st,
            C::Created,
            true,
            reason::JOB_CREATED,
            &format!("service and {replicas} workers created"),
        )
    {
        plan.normal(
            reason::JOB_CREATED,
            format!("created service and {replicas} worker pods"),
        );
    }
}

/// `Running` once every rank runs (or already succeeded); a restarted gang says so once.
fn report_running(pass: &Pass, plan: &mut Plan, st: &mut TrainingJobStatus, current: &[&Worker]) {
    let replicas = pass.job.spec.workers.replicas;
    let running = current
        .iter()
        .filter(|w| w.state == WorkerState::Running)
        .count() as i32;
    let succeeded = super::success_policy::succeeded_ranks(current).len() as i32;
    let restarting = conditions::is_true(&st.conditions, C::Restarting);
    if running + succeeded < replicas || !plan.create_pods.is_empty() {
        let msg = format!("{running}/{replicas} workers running");
        pass.set(st, C::Running, false, reason::WORKERS_PENDING, &msg);
        st.phase = Some(if restarting {
            Phase::Restarting
        } else {
            Phase::Pending
        });
        return;
    }
    let (why, msg) = if restarting {
        let msg = format!("attempt {} running with all {replicas} workers", st.attempt);
        (reason::RESTARTED, msg)
    } else {
        (
            reason::WORKERS_RUNNING,
            format!("all {replicas} workers running"),
        )
    };
    if pass.set(st, C::Running, true, why, &msg) && restarting {
        plan.normal(reason::RESTARTED, msg.clone());
    }
    if restarting {
        pass.set(st, C::Restarting, false, why, &msg);
    }
    st.phase = Some(Phase::Running);
}

/// Creates what is missing and reports the gang's progress.
pub(super) fn start(pass: &Pass, plan: &mut Plan, st: &mut TrainingJobStatus, current: &[&Worker]) {
    if let Some(v) = &pass.obs.policy_violation {
        refuse(pass, plan, st, &v.0);
        report_running(pass, plan, st, current);
        return;
    }
    let all_seen = create_missing(pass, plan, st, current);
    report_created(pass, plan, st, all_seen);
    report_running(pass, plan, st, current);
}
