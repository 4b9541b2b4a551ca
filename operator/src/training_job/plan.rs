//! The decision core of the TrainingJob controller: observed job + its children → a plan of
//! creates and deletes and the new status.
//!
//! [`plan`] is a pure function (time is an input), so every rule the operator follows is
//! table-tested without a cluster. It is a list of policies, one file each with its own tests:
//! [`super::ttl_after_finished`] (sticky terminal states, clean-up, TTL), the active deadline,
//! [`super::suspend_policy`], [`super::failure_policy`] (gang restarts, backoff),
//! [`super::success_policy`], [`super::queue_policy`] (Kueue admission) and
//! [`super::gang_startup`]. The controller only gathers
//! [`Observed`] and carries out the [`Plan`].

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use radfm_api::conditions::{self, ConditionType as C, Stamp, reason};
use radfm_api::trainingjob::{CheckpointRef, Phase, Progress};
use radfm_api::{TrainingJob, TrainingJobStatus, health};

use super::children::{self, GangScheduler};
use super::queue_policy::{self, Gate};
use super::workers::{Worker, WorkerState, add_secs, secs_between, worker};
use super::{failure_policy, gang_startup, success_policy, suspend_policy, ttl_after_finished};
use crate::effects::PlannedEvent;
use crate::kueue;

/// What the controller saw in the cluster for one job.
#[derive(Debug, Clone)]
pub struct Observed {
    /// Every pod labelled with the job's name and controlled by it, of any attempt (shared with
    /// the controller's cache: a 256-worker gang is not copied on every pass).
    pub pods: Vec<Arc<Pod>>,
    /// Names of pods an earlier pass created that `pods` does not show yet (the cache lags the
    /// API server): they are not created again.
    pub awaited_pods: BTreeSet<String>,
    /// The headless Service exists.
    pub service_exists: bool,
    /// The PodGroup exists (only looked up for gang schedulers).
    pub pod_group_exists: bool,
    /// Nodes of the observed pods that no longer exist or are not Ready.
    pub lost_nodes: BTreeSet<String>,
    /// The current time.
    pub now: Time,
    /// Why the cluster's pod policy refuses the job's pods, if it does.
    pub policy_violation: Option<crate::pod_policy::Violation>,
    /// Kueue's side of a job labelled with a queue (None for other jobs).
    pub queueing: Option<super::queue_policy::Queueing>,
}

/// What the controller must do, in order: create, delete, then write the status once.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// The headless Service to create.
    pub create_service: Option<Service>,
    /// The PodGroup to create (dynamic object of the gang scheduler's CRD).
    pub create_pod_group: Option<(GangScheduler, serde_json::Value)>,
    /// Worker pods to create.
    pub create_pods: Vec<Pod>,
    /// The ServiceAccount, Role and RoleBinding the new pods report progress with, applied
    /// before they are created (absent where the user brings a ServiceAccount).
    pub trainer_access: Option<children::TrainerAccess>,
    /// Create the job's gang Secret and NetworkPolicy (if they do not exist yet) before the
    /// pods.
    pub create_gang_secret: bool,
    /// Pods to delete gracefully.
    pub delete_pods: Vec<String>,
    /// Pods to delete with grace period 0 (stuck Terminating past the timeout).
    pub force_delete_pods: Vec<String>,
    /// Delete the headless Service (the job finished and its pods are being cleaned up).
    pub delete_service: bool,
    /// Delete the TrainingJob itself (TTL after finishing passed).
    pub delete_job: bool,
    /// The status to write.
    pub status: TrainingJobStatus,
    /// Events to record after the status write.
    pub events: Vec<PlannedEvent>,
    /// When to look again even if nothing changes (deadlines, TTL, terminating timeouts).
    pub requeue_after: Option<Duration>,
    /// What the Kueue Workload of a queued job needs.
    pub workload: super::queue_policy::WorkloadActions,
}

impl Plan {
    pub(super) fn requeue_at(&mut self, now: &Time, at: &Time) {
        let secs = secs_between(now, at).max(1) as u64;
        let d = Duration::from_secs(secs);
        self.requeue_after = Some(self.requeue_after.map_or(d, |r| r.min(d)));
    }

    pub(super) fn normal(&mut self, reason: &'static str, note: impl Into<String>) {
        self.events.push(PlannedEvent::normal(reason, note));
    }

    pub(super) fn warning(&mut self, reason: &'static str, note: impl Into<String>) {
        self.events.push(PlannedEvent::warning(reason, note));
    }
}

/// One planning pass: the job, what was observed, and the stamp its conditions get.
pub(super) struct Pass<'a> {
    pub job: &'a TrainingJob,
    pub obs: &'a Observed,
    /// What Kueue's admission adds to the workers (queued jobs only).
    pub admitted: Option<kueue::PodSetChanges>,
    stamp: Stamp,
}

impl Pass<'_> {
    /// Sets a condition of `st`; returns whether it flipped.
    pub fn set(
        &self,
        st: &mut TrainingJobStatus,
        ty: C,
        status: bool,
        why: &str,
        msg: &str,
    ) -> bool {
        self.stamp.set(&mut st.conditions, ty, status, why, msg)
    }

    /// Deletes (or force-deletes, past the terminating timeout) the given workers.
    pub fn remove(&self, plan: &mut Plan, workers: &[&Worker]) {
        let timeout = self.job.spec.run_policy.terminating_timeout_seconds;
        for w in workers {
            match &w.deleting_since {
                None => plan.delete_pods.push(w.name.clone()),
                Some(since) => {
                    let due = add_secs(since, timeout);
                    if secs_between(&due, &self.obs.now) >= 0 {
                        plan.force_delete_pods.push(w.name.clone());
                    } else {
                        plan.requeue_at(&self.obs.now, &due);
                    }
                }
            }
        }
    }

    /// Moves the job to Failed and applies the terminal clean-up.
    pub fn fail(
        &self,
        plan: &mut Plan,
        st: &mut TrainingJobStatus,
        workers: &[Worker],
        why: &'static str,
        msg: &str,
    ) {
        self.set(st, C::Failed, true, why, msg);
        self.set(st, C::Running, false, why, msg);
        self.set(st, C::Restarting, false, why, msg);
        st.phase = Some(Phase::Failed);
        st.completion_time = Some(self.obs.now.clone());
        plan.warning(why, msg);
        ttl_after_finished::finished(self, plan, st, workers);
    }
}

/// Decides what to do for `job` given what was observed.
pub fn plan(job: &TrainingJob, obs: &Observed) -> Plan {
    let gate = queue_policy::gate(job, obs);
    let pass = Pass {
        job,
        obs,
        admitted: gate.changes().cloned(),
        stamp: Stamp {
            generation: job.metadata.generation,
            now: obs.now.clone(),
        },
    };
    let mut plan = Plan::default();
    let mut st = job.status.clone().unwrap_or_default();
    st.observed_generation = job.metadata.generation;
    st.attempt = st.attempt.max(1);
    let mut workers: Vec<Worker> = obs
        .pods
        .iter()
        .filter_map(|p| worker(p, &obs.lost_nodes))
        .collect();
    workers.sort_by_key(|w| (w.attempt, w.rank, w.name.clone()));

    let rp = &job.spec.run_policy;
    if conditions::is_true(&st.conditions, C::Succeeded)
        || conditions::is_true(&st.conditions, C::Failed)
    {
        ttl_after_finished::finished(&pass, &mut plan, &st, &workers);
    } else if let Some(deadline) = deadline_passed(job, &st, &obs.now) {
        let msg = format!("job ran longer than activeDeadlineSeconds={deadline}");
        pass.fail(
            &mut plan,
            &mut st,
            &workers,
            reason::DEADLINE_EXCEEDED,
            &msg,
        );
    } else if rp.suspend {
        suspend_policy::suspend(&pass, &mut plan, &mut st, &workers);
    } else if let Gate::Held { why, message } = &gate {
        suspend_policy::resume(&pass, &mut plan, &mut st);
        queue_policy::hold(&pass, &mut plan, &mut st, &workers, why, message);
    } else {
        suspend_policy::resume(&pass, &mut plan, &mut st);
        if let Some(ch) = &pass.admitted {
            queue_policy::admitted(&pass, &mut plan, &mut st, ch);
        }
        let start = st.start_time.get_or_insert_with(|| obs.now.clone()).clone();
        if let Some(deadline) = rp.active_deadline_seconds {
            plan.requeue_at(&obs.now, &add_secs(&start, deadline));
        }
        run(&pass, &mut plan, &mut st, &workers);
    }
    report_workers(&mut st, &workers, job.spec.workers.replicas);
    queue_policy::sync(&pass, &mut plan, &st, &workers);
    health::of_training_job(&st).write(&mut st.conditions, &pass.stamp);
    plan.status = st;
    plan
}

/// `activeDeadlineSeconds` when it has passed (a suspended job's clock does not run).
fn deadline_passed(job: &TrainingJob, st: &TrainingJobStatus, now: &Time) -> Option<i64> {
    let rp = &job.spec.run_policy;
    let deadline = rp.active_deadline_seconds.filter(|_| !rp.suspend)?;
    let start = st.start_time.as_ref()?;
    (secs_between(start, now) >= deadline).then_some(deadline)
}

/// The running (not suspended, not finished) job: failures first, then success, then the
/// old attempt's clean-up, then the current gang.
fn run(pass: &Pass, plan: &mut Plan, st: &mut TrainingJobStatus, workers: &[Worker]) {
    let replicas = pass.job.spec.workers.replicas;
    let stale: Vec<&Worker> = workers.iter().filter(|w| w.attempt != st.attempt).collect();
    let current: Vec<&Worker> = workers.iter().filter(|w| w.attempt == st.attempt).collect();
    let was_running = conditions::is_true(&st.conditions, C::Running);
    let failures = failure_policy::gang_failures(&current, was_running, replicas);
    if failure_policy::on_failures(pass, plan, st, workers, &failures)
        || success_policy::on_success(pass, plan, st, workers, &current)
    {
        return;
    }
    // Old attempts must be gone before the new gang starts: its ranks would otherwise meet stale
    // peers, and the GPUs they hold may be the ones the new pods need.
    if !stale.is_empty() {
        pass.remove(plan, &stale);
        st.phase = Some(Phase::Restarting);
        return;
    }
    gang_startup::start(pass, plan, st, &current);
}

/// Worker counts and progress describe the current attempt, whatever the branch.
fn report_workers(st: &mut TrainingJobStatus, workers: &[Worker], replicas: i32) {
    let current: Vec<&Worker> = workers.iter().filter(|w| w.attempt == st.attempt).collect();
    let count = |f: &dyn Fn(&Worker) -> bool| current.iter().filter(|w| f(w)).count() as i32;
    st.workers.active = count(&|w| w.is_active());
    st.workers.ready =
        count(&|w| w.ready && w.state == WorkerState::Running && w.deleting_since.is_none());
    st.workers.succeeded = count(&|w| w.state == WorkerState::Succeeded);
    st.workers.failed = count(&|w| matches!(w.state, WorkerState::Failed(_)));
    st.ready = Some(format!("{}/{replicas}", st.workers.ready));
    if let Some(rank0) = workers.iter().rev().find(|w| w.rank == 0) {
        report_rank0(st, rank0);
    }
}

/// Rank 0's progress and newest checkpoint annotations reach the status (a checkpoint never
/// goes back).
fn report_rank0(st: &mut TrainingJobStatus, rank0: &Worker) {
    let ann = rank0.pod.metadata.annotations.as_ref();
    if let Some(p) = ann
        .and_then(|a| a.get(children::ANNOTATION_PROGRESS))
        .and_then(|v| serde_json::from_str::<Progress>(v).ok())
    {
        st.progress = Some(p);
    }
    if let Some(c) = ann
        .and_then(|a| a.get(children::ANNOTATION_CHECKPOINT))
        .and_then(|v| serde_json::from_str::<CheckpointRef>(v).ok())
        && st
            .last_checkpoint
            .as_ref()
            .is_none_or(|old| c.step >= old.step)
    {
        st.last_checkpoint = Some(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::training_job::children::fixtures::{JobBuilder, exited, pod, t, terminating};
    use kube::ResourceExt as _;
    use radfm_api::conditions::get;
    use radfm_api::trainingjob::CleanPodPolicy;

    fn observe(pods: Vec<Pod>, now: i64) -> Observed {
        Observed {
            pods: pods.into_iter().map(Arc::new).collect(),
            awaited_pods: BTreeSet::new(),
            service_exists: true,
            pod_group_exists: false,
            lost_nodes: BTreeSet::new(),
            now: t(now),
            policy_violation: None,
            queueing: None,
        }
    }

    fn names(pods: &[Pod]) -> Vec<String> {
        pods.iter()
            .map(|p| p.metadata.name.clone().unwrap())
            .collect()
    }

    /// Applies a plan's status to the job, as the API server would after the status write.
    fn after(mut job: TrainingJob, plan: &Plan) -> TrainingJob {
        job.status = Some(plan.status.clone());
        job
    }

    fn running_job(replicas: i32) -> (TrainingJob, Vec<Pod>) {
        let job = JobBuilder::new(replicas).build();
        let p = plan(&job, &observe(vec![], 1));
        let job = after(job, &p);
        let pods: Vec<Pod> = (0..replicas).map(|r| pod(&job, r, 1, "Running")).collect();
        let p = plan(&job, &observe(pods.clone(), 2));
        (after(job, &p), pods)
    }

    fn cond(st: &TrainingJobStatus, ty: C) -> (String, String) {
        let c = get(&st.conditions, ty).unwrap_or_else(|| panic!("no {ty:?} condition"));
        (c.status.clone(), c.reason.clone())
    }

    #[test]
    fn fresh_job_creates_service_and_every_worker_with_the_env_contract() {
        let job = JobBuilder::new(3).build();
        let mut obs = observe(vec![], 1);
        obs.service_exists = false;
        let p = plan(&job, &obs);
        assert!(p.create_service.is_some());
        assert_eq!(
            names(&p.create_pods),
            ["mae-w0-a1", "mae-w1-a1", "mae-w2-a1"]
        );
        let env = p.create_pods[2].spec.as_ref().unwrap().containers[0]
            .env
            .clone()
            .unwrap();
        assert!(
            env.iter()
                .any(|e| e.name == "RADFM_NODE_RANK" && e.value.as_deref() == Some("2"))
        );
        assert_eq!(p.status.phase, Some(Phase::Pending));
        assert!(
            get(&p.status.conditions, C::Created).is_none(),
            "Created waits until the workers exist"
        );
        assert_eq!(
            (p.status.attempt, p.status.ready.as_deref()),
            (1, Some("0/3"))
        );
        assert_eq!(p.status.start_time, Some(t(1)));
        assert!(p.events.is_empty());
        assert!(p.create_pod_group.is_none());
        let access = p
            .trainer_access
            .as_ref()
            .expect("progress access comes with the pods");
        assert_eq!(
            access.role.rules.as_ref().unwrap()[0]
                .resource_names
                .as_deref()
                .unwrap(),
            ["mae-w0-a1"],
            "only rank 0 reports progress, on its own pod"
        );
        assert_eq!(access.role.rules.as_ref().unwrap()[0].verbs, ["patch"]);
        assert!(p.create_gang_secret, "the gang secret comes with the pods");
        let token = |rank: usize| {
            let spec = p.create_pods[rank].spec.as_ref().unwrap();
            (
                spec.service_account_name.clone(),
                spec.automount_service_account_token,
            )
        };
        assert_eq!(token(0), (Some("mae-trainer".into()), None));
        assert_eq!(
            token(1),
            (None, Some(false)),
            "other ranks get no API token"
        );
        let job = after(job, &p);
        let pods: Vec<Pod> = (0..3).map(|r| pod(&job, r, 1, "Pending")).collect();
        let p = plan(&job, &observe(pods, 2));
        assert_eq!(
            cond(&p.status, C::Created),
            ("True".into(), reason::JOB_CREATED.into())
        );
        assert_eq!(p.events[0].reason, reason::JOB_CREATED);
    }

    #[test]
    fn pods_created_but_not_yet_seen_are_not_created_again_and_the_job_is_not_yet_created() {
        let job = JobBuilder::new(3).build();
        let p = plan(&job, &observe(vec![], 1));
        let job = after(job, &p);
        // The cache shows rank 0; ranks 1 and 2 were created by the last pass but not seen yet.
        let mut obs = observe(vec![pod(&job, 0, 1, "Pending")], 2);
        obs.awaited_pods = ["mae-w1-a1".to_string(), "mae-w2-a1".to_string()].into();
        let p = plan(&job, &obs);
        assert!(p.create_pods.is_empty(), "{:?}", names(&p.create_pods));
        assert!(
            !p.create_gang_secret && p.trainer_access.is_none(),
            "nothing else is written again either"
        );
        assert!(!conditions::is_true(&p.status.conditions, C::Created));
        // Once rank 2 is no longer awaited (its wait expired) and still not seen, it is created.
        obs.awaited_pods.remove("mae-w2-a1");
        assert_eq!(names(&plan(&job, &obs).create_pods), ["mae-w2-a1"]);
    }

    #[test]
    fn a_job_the_pod_policy_refuses_creates_nothing_and_says_why_once() {
        let job = JobBuilder::new(2).build();
        let mut obs = observe(vec![], 1);
        obs.service_exists = false;
        obs.policy_violation = Some(crate::pod_policy::Violation(
            "spec.workers.template.volumes[0]: volume type hostPath is not allowed".into(),
        ));
        let p = plan(&job, &obs);
        assert!(p.create_pods.is_empty() && p.create_service.is_none());
        assert!(p.trainer_access.is_none());
        let (status, why) = cond(&p.status, C::Created);
        assert_eq!(
            (status.as_str(), why.as_str()),
            ("False", reason::POD_POLICY_VIOLATION)
        );
        assert!(
            get(&p.status.conditions, C::Created)
                .unwrap()
                .message
                .contains("hostPath")
        );
        assert_eq!(p.events.len(), 1);
        let p = plan(&after(job, &p), &obs);
        assert!(p.create_pods.is_empty() && p.events.is_empty());
    }

    #[test]
    fn all_workers_running_sets_phase_running_and_repeated_passes_change_nothing() {
        let (job, pods) = running_job(2);
        let st = job.status.clone().unwrap();
        assert_eq!(st.phase, Some(Phase::Running));
        assert_eq!(cond(&st, C::Running).0, "True");
        assert_eq!(st.ready.as_deref(), Some("2/2"));
        let again = plan(&job, &observe(pods, 50));
        assert!(
            again.create_pods.is_empty() && again.delete_pods.is_empty() && again.events.is_empty()
        );
        assert_eq!(
            again.status, st,
            "a pass with nothing new rewrites the same status"
        );
    }

    #[test]
    fn retryable_worker_failure_replaces_the_whole_gang_with_the_next_attempt() {
        let (job, mut pods) = running_job(3);
        pods[1] = exited(pods[1].clone(), radfm_api::exit::PEER_LOST, "Error");
        let p = plan(&job, &observe(pods.clone(), 10));
        assert_eq!(p.delete_pods, ["mae-w0-a1", "mae-w1-a1", "mae-w2-a1"]);
        assert!(
            p.create_pods.is_empty(),
            "new pods wait until the old gang is gone"
        );
        assert_eq!(
            (
                p.status.attempt,
                p.status.restarts,
                p.status.counted_restarts
            ),
            (2, 1, 1)
        );
        assert_eq!(p.status.phase, Some(Phase::Restarting));
        let (status, why) = cond(&p.status, C::Restarting);
        assert_eq!(
            (status.as_str(), why.as_str()),
            ("True", reason::WORKER_FAILED)
        );
        assert!(
            get(&p.status.conditions, C::Restarting)
                .unwrap()
                .message
                .contains("worker 1 exited with code 76 (PeerLost)")
        );
        let job = after(job, &p);

        // Old pods still terminating: nothing is created yet.
        let dying: Vec<Pod> = pods.iter().map(|p| terminating(p.clone(), 11)).collect();
        let p = plan(&job, &observe(dying, 12));
        assert!(p.create_pods.is_empty() && p.delete_pods.is_empty());
        assert_eq!(p.status.phase, Some(Phase::Restarting));

        // Old gang gone: attempt 2 is created, then runs.
        let p = plan(&job, &observe(vec![], 20));
        assert_eq!(
            names(&p.create_pods),
            ["mae-w0-a2", "mae-w1-a2", "mae-w2-a2"]
        );
        let job = after(job, &p);
        let pods: Vec<Pod> = (0..3).map(|r| pod(&job, r, 2, "Running")).collect();
        let p = plan(&job, &observe(pods, 30));
        assert_eq!(p.status.phase, Some(Phase::Running));
        assert_eq!(
            cond(&p.status, C::Restarting),
            ("False".into(), reason::RESTARTED.into())
        );
        assert_eq!(p.events[0].reason, reason::RESTARTED);
    }

    #[test]
    fn permanent_exit_code_fails_the_job_without_restart_and_keeps_the_failed_pod() {
        let (job, mut pods) = running_job(2);
        pods[0] = exited(pods[0].clone(), radfm_api::exit::INVALID_CONFIG, "Error");
        // What FallbackToLogsOnError puts in the container status: the log's tail.
        pods[0]
            .status
            .as_mut()
            .unwrap()
            .container_statuses
            .as_mut()
            .unwrap()[0]
            .state
            .as_mut()
            .unwrap()
            .terminated
            .as_mut()
            .unwrap()
            .message = Some("radfm-trainer: RADFM_STEPS: not a number\n".into());
        let p = plan(&job, &observe(pods, 10));
        assert_eq!(p.status.phase, Some(Phase::Failed));
        assert_eq!(
            cond(&p.status, C::Failed),
            ("True".into(), reason::PERMANENT_FAILURE.into())
        );
        assert!(
            get(&p.status.conditions, C::Failed)
                .unwrap()
                .message
                .contains(
                    "worker 0 exited with code 64 (InvalidConfig): radfm-trainer: RADFM_STEPS: not a number"
                ),
            "{:?}",
            p.status.conditions
        );
        let stalled = get(&p.status.conditions, health::HealthConditionType::Stalled).unwrap();
        assert_eq!(
            (stalled.status.as_str(), stalled.reason.as_str()),
            ("True", reason::PERMANENT_FAILURE),
            "GitOps tools see the failure"
        );
        assert_eq!(p.status.attempt, 1);
        assert_eq!(
            p.delete_pods,
            ["mae-w1-a1"],
            "cleanPodPolicy Running keeps finished pods for their logs"
        );
        assert!(p.create_pods.is_empty());
        assert_eq!(p.status.completion_time, Some(t(10)));
    }

    #[test]
    fn exhausted_backoff_limit_fails_with_reason() {
        let (job, mut pods) = running_job(2);
        let job = JobBuilder(job)
            .with(|j| j.status.as_mut().unwrap().counted_restarts = 3)
            .build();
        pods[1] = exited(pods[1].clone(), 1, "Error");
        let p = plan(&job, &observe(pods, 10));
        assert_eq!(
            cond(&p.status, C::Failed),
            ("True".into(), reason::BACKOFF_LIMIT_EXCEEDED.into())
        );
        assert!(
            get(&p.status.conditions, C::Failed)
                .unwrap()
                .message
                .contains("backoffLimit=3")
        );
        assert_eq!(p.status.restarts, 0);
    }

    #[test]
    fn node_loss_restarts_the_gang_without_counting() {
        let (job, pods) = running_job(2);
        let mut obs = observe(pods, 10);
        obs.lost_nodes.insert("node-1".into());
        let p = plan(&job, &obs);
        assert_eq!(
            (
                p.status.attempt,
                p.status.restarts,
                p.status.counted_restarts
            ),
            (2, 1, 0)
        );
        assert_eq!(cond(&p.status, C::Restarting).1, reason::DISRUPTED);
        assert!(
            get(&p.status.conditions, C::Restarting)
                .unwrap()
                .message
                .contains("worker 1 lost its node")
        );
    }

    #[test]
    fn worker_deleted_from_a_running_gang_restarts_it_without_counting() {
        let (job, pods) = running_job(3);
        let p = plan(&job, &observe(vec![pods[0].clone(), pods[2].clone()], 10));
        assert_eq!((p.status.attempt, p.status.counted_restarts), (2, 0));
        assert!(p.create_pods.is_empty());
    }

    #[test]
    fn a_pass_after_failed_writes_grants_the_trainers_access_again_until_one_succeeds() {
        let (job, pods) = running_job(2);
        let p = plan(&job, &observe(pods.clone(), 3));
        assert!(
            p.trainer_access.is_none(),
            "nothing to grant on a quiet pass"
        );
        // The controller records a failed write (the RoleBinding refused) over the plan's status.
        let mut failed = job.clone();
        let st = failed.status.as_mut().unwrap();
        Stamp {
            generation: failed.metadata.generation,
            now: t(3),
        }
        .set(
            &mut st.conditions,
            C::Created,
            false,
            reason::CREATE_FAILED,
            "granting progress reporting to mae-trainer: NotFound",
        );
        let p = plan(&failed, &observe(pods.clone(), 4));
        assert!(p.trainer_access.is_some() && p.create_gang_secret);
        assert!(p.create_pods.is_empty(), "the pods exist");
        assert_eq!(
            cond(&p.status, C::Created).0,
            "True",
            "this pass's writes succeed"
        );
        let p = plan(&after(failed, &p), &observe(pods, 5));
        assert!(p.trainer_access.is_none());
    }

    #[test]
    fn missing_workers_of_a_gang_still_being_created_are_created_without_duplicates() {
        let job = JobBuilder::new(4).build();
        let p = plan(&job, &observe(vec![], 1));
        let job = after(job, &p);
        // The operator died after creating two pods; one is already running.
        let pods = vec![pod(&job, 0, 1, "Running"), pod(&job, 2, 1, "Pending")];
        let p = plan(&job, &observe(pods, 5));
        assert_eq!(names(&p.create_pods), ["mae-w1-a1", "mae-w3-a1"]);
        assert_eq!(p.status.attempt, 1);
    }

    #[test]
    fn suspend_deletes_pods_keeps_status_and_resume_starts_a_new_attempt() {
        let (job, pods) = running_job(2);
        let job = JobBuilder(job)
            .with(|j| j.spec.run_policy.suspend = true)
            .build();
        let p = plan(&job, &observe(pods, 10));
        assert_eq!(p.delete_pods, ["mae-w0-a1", "mae-w1-a1"]);
        assert_eq!(p.status.phase, Some(Phase::Suspended));
        assert_eq!(
            cond(&p.status, C::Suspended),
            ("True".into(), reason::SUSPENDED.into())
        );
        assert_eq!(p.status.start_time, None);
        assert_eq!(p.status.restarts, 0);
        let job = after(job, &p);
        let p = plan(&job, &observe(vec![], 20));
        assert!(p.create_pods.is_empty(), "nothing runs while suspended");

        let job = JobBuilder(after(job, &p))
            .with(|j| j.spec.run_policy.suspend = false)
            .build();
        let p = plan(&job, &observe(vec![], 30));
        assert_eq!(
            cond(&p.status, C::Suspended),
            ("False".into(), reason::RESUMED.into())
        );
        assert_eq!(names(&p.create_pods), ["mae-w0-a2", "mae-w1-a2"]);
        assert_eq!(p.status.start_time, Some(t(30)));
    }

    #[test]
    fn suspend_right_after_creation_still_resumes_as_a_new_attempt() {
        // The workers exist but no pass has seen them yet (Created is not True).
        let job = JobBuilder::new(2).build();
        let p = plan(&job, &observe(vec![], 1));
        let job = JobBuilder(after(job, &p))
            .with(|j| j.spec.run_policy.suspend = true)
            .build();
        let pods: Vec<Pod> = (0..2).map(|r| pod(&job, r, 1, "Running")).collect();
        let p = plan(&job, &observe(pods.clone(), 2));
        assert_eq!(p.status.attempt, 2);
        let job = after(job, &p);
        let dying: Vec<Pod> = pods.iter().map(|p| terminating(p.clone(), 2)).collect();
        assert_eq!(
            plan(&job, &observe(dying, 3)).status.attempt,
            2,
            "bumped once"
        );
        let job = JobBuilder(job)
            .with(|j| j.spec.run_policy.suspend = false)
            .build();
        let p = plan(&job, &observe(vec![], 4));
        assert_eq!(names(&p.create_pods), ["mae-w0-a2", "mae-w1-a2"]);
    }

    #[test]
    fn job_created_suspended_starts_at_attempt_one_when_resumed() {
        let job = JobBuilder::new(1)
            .with(|j| j.spec.run_policy.suspend = true)
            .build();
        let p = plan(&job, &observe(vec![], 1));
        assert!(p.create_pods.is_empty());
        let job = JobBuilder(after(job, &p))
            .with(|j| j.spec.run_policy.suspend = false)
            .build();
        let p = plan(&job, &observe(vec![], 2));
        assert_eq!(names(&p.create_pods), ["mae-w0-a1"]);
    }

    #[test]
    fn pod_stuck_terminating_past_the_timeout_is_force_deleted() {
        let (job, pods) = running_job(2);
        let job = JobBuilder(job)
            .with(|j| j.spec.run_policy.terminating_timeout_seconds = 60)
            .build();
        let mut obs = observe(pods.clone(), 10);
        obs.lost_nodes.insert("node-0".into());
        let p = plan(&job, &obs);
        let job = after(job, &p);
        let dying: Vec<Pod> = pods.iter().map(|p| terminating(p.clone(), 11)).collect();
        let mut obs = observe(dying.clone(), 30);
        obs.lost_nodes.insert("node-0".into());
        let p = plan(&job, &obs);
        assert!(p.force_delete_pods.is_empty());
        assert_eq!(p.requeue_after, Some(Duration::from_secs(41)));
        let mut obs = observe(dying, 71);
        obs.lost_nodes.insert("node-0".into());
        let p = plan(&job, &obs);
        assert_eq!(p.force_delete_pods, ["mae-w0-a1", "mae-w1-a1"]);
        assert!(p.create_pods.is_empty());
    }

    #[test]
    fn finished_job_whose_pods_were_deleted_recreates_nothing() {
        let (job, pods) = running_job(2);
        let done: Vec<Pod> = pods
            .iter()
            .map(|p| exited(p.clone(), 0, "Completed"))
            .collect();
        let p = plan(&job, &observe(done, 10));
        assert_eq!(p.status.phase, Some(Phase::Succeeded));
        assert_eq!(p.status.completion_time, Some(t(10)));
        assert!(
            p.delete_pods.is_empty(),
            "cleanPodPolicy Running keeps succeeded pods"
        );
        let job = after(job, &p);
        let mut obs = observe(vec![], 100);
        obs.service_exists = false;
        let p = plan(&job, &obs);
        assert!(p.create_pods.is_empty() && p.create_service.is_none());
        assert_eq!(p.status.phase, Some(Phase::Succeeded));
        assert!(p.events.is_empty());
    }

    #[test]
    fn clean_pod_policy_all_deletes_every_pod_and_the_service_on_success() {
        let (job, pods) = running_job(2);
        let job = JobBuilder(job)
            .with(|j| j.spec.run_policy.clean_pod_policy = CleanPodPolicy::All)
            .build();
        let done: Vec<Pod> = pods
            .iter()
            .map(|p| exited(p.clone(), 0, "Completed"))
            .collect();
        let p = plan(&job, &observe(done, 10));
        assert_eq!(p.delete_pods, ["mae-w0-a1", "mae-w1-a1"]);
        assert!(p.delete_service);
    }

    #[test]
    fn clean_pod_policy_none_keeps_every_pod_when_failing() {
        let (job, mut pods) = running_job(2);
        let job = JobBuilder(job)
            .with(|j| j.spec.run_policy.clean_pod_policy = CleanPodPolicy::None)
            .build();
        pods[0] = exited(pods[0].clone(), 65, "Error");
        let p = plan(&job, &observe(pods, 10));
        assert_eq!(p.status.phase, Some(Phase::Failed));
        assert!(p.delete_pods.is_empty() && !p.delete_service);
    }

    #[test]
    fn active_deadline_exceeded_fails_the_job() {
        let (job, pods) = running_job(2);
        let job = JobBuilder(job)
            .with(|j| j.spec.run_policy.active_deadline_seconds = Some(100))
            .build();
        let p = plan(&job, &observe(pods.clone(), 50));
        assert_eq!(p.status.phase, Some(Phase::Running));
        assert_eq!(p.requeue_after, Some(Duration::from_secs(51)));
        let p = plan(&job, &observe(pods, 101));
        assert_eq!(
            cond(&p.status, C::Failed),
            ("True".into(), reason::DEADLINE_EXCEEDED.into())
        );
        assert_eq!(p.delete_pods, ["mae-w0-a1", "mae-w1-a1"]);
    }

    #[test]
    fn ttl_after_finished_deletes_the_job_once_due() {
        let (job, pods) = running_job(1);
        let job = JobBuilder(job)
            .with(|j| j.spec.run_policy.ttl_seconds_after_finished = Some(30))
            .build();
        let done = vec![exited(pods[0].clone(), 0, "Completed")];
        let p = plan(&job, &observe(done.clone(), 10));
        assert!(!p.delete_job);
        assert_eq!(p.requeue_after, Some(Duration::from_secs(30)));
        let job = after(job, &p);
        assert!(plan(&job, &observe(done.clone(), 40)).delete_job);

        // Applied by Argo CD or Flux: deleting it would only make self-heal train it again.
        for (annotation, label) in [
            (Some("argocd.argoproj.io/tracking-id"), None),
            (None, Some("kustomize.toolkit.fluxcd.io/name")),
        ] {
            let mut managed = job.clone();
            if let Some(key) = annotation {
                managed
                    .annotations_mut()
                    .insert(key.into(), "app:radfm.io/TrainingJob:ml/mae".into());
            }
            if let Some(key) = label {
                managed.labels_mut().insert(key.into(), "training".into());
            }
            let p = plan(&managed, &observe(done.clone(), 40));
            assert!(!p.delete_job, "{annotation:?} {label:?}");
            assert_eq!(
                p.events.iter().map(|e| e.reason).collect::<Vec<_>>(),
                [reason::TTL_KEPT_FOR_GITOPS]
            );
        }
    }

    /// Durations past the representable time must not wrap or fall back to "now": a TTL of
    /// i64::MAX seconds never deletes the job, a deadline of i64::MAX never fails it.
    #[test]
    fn huge_durations_mean_never_not_now() {
        let (job, pods) = running_job(1);
        let job = JobBuilder(job)
            .with(|j| j.spec.run_policy.ttl_seconds_after_finished = Some(i64::MAX))
            .build();
        let done = vec![exited(pods[0].clone(), 0, "Completed")];
        let p = plan(&job, &observe(done.clone(), 10));
        let job = after(job, &p);
        assert!(!plan(&job, &observe(done, 1_000)).delete_job);

        let (job, pods) = running_job(1);
        let job = JobBuilder(job)
            .with(|j| j.spec.run_policy.active_deadline_seconds = Some(i64::MAX))
            .build();
        let p = plan(&job, &observe(pods, 1_000));
        assert!(
            get(&p.status.conditions, C::Failed).is_none(),
            "{:?}",
            p.status
        );
    }

    #[test]
    fn gang_scheduler_gets_a_pod_group_with_min_member() {
        let job = JobBuilder::new(4)
            .with(|j| j.spec.workers.scheduler_name = Some("volcano".into()))
            .build();
        let p = plan(&job, &observe(vec![], 1));
        let (sched, pg) = p.create_pod_group.expect("pod group");
        assert_eq!(sched, GangScheduler::Volcano);
        assert_eq!(pg["apiVersion"], "scheduling.volcano.sh/v1beta1");
        assert_eq!(pg["spec"]["minMember"], 4);
        let ann = p.create_pods[0].metadata.annotations.clone().unwrap();
        assert_eq!(ann["scheduling.k8s.io/group-name"], "mae");
        let job = JobBuilder::new(2)
            .with(|j| j.spec.workers.scheduler_name = Some("scheduler-plugins-scheduler".into()))
            .build();
        let p = plan(&job, &observe(vec![], 1));
        assert_eq!(
            p.create_pod_group.unwrap().1["apiVersion"],
            "scheduling.x-k8s.io/v1alpha1"
        );
        assert_eq!(
            p.create_pods[1].metadata.labels.clone().unwrap()["scheduling.x-k8s.io/pod-group"],
            "mae"
        );
    }

    #[test]
    fn rank_zero_progress_and_checkpoint_annotations_reach_the_status() {
        let (job, mut pods) = running_job(2);
        pods[0]
            .metadata
            .annotations
            .get_or_insert_with(Default::default)
            .extend([
                (
                    children::ANNOTATION_PROGRESS.to_string(),
                    r#"{"step":40,"totalSteps":100,"loss":0.42,"imagesPerSecond":88.5}"#
                        .to_string(),
                ),
                (
                    children::ANNOTATION_CHECKPOINT.to_string(),
                    r#"{"uri":"s3://ckpt/mae/step-40/manifest.json","step":40}"#.to_string(),
                ),
            ]);
        let p = plan(&job, &observe(pods, 10));
        let prog = p.status.progress.unwrap();
        assert_eq!(
            (prog.step, prog.total_steps, prog.loss),
            (40, Some(100), Some(0.42))
        );
        assert_eq!(p.status.last_checkpoint.unwrap().step, 40);
    }

    #[test]
    fn simultaneous_failures_take_the_harshest_verdict() {
        let (job, pods) = running_job(3);
        let pods = vec![
            exited(pods[0].clone(), 75, "Error"),
            exited(pods[1].clone(), 66, "Error"),
            pods[2].clone(),
        ];
        let p = plan(&job, &observe(pods, 10));
        assert_eq!(cond(&p.status, C::Failed).1, reason::PERMANENT_FAILURE);
    }
}
