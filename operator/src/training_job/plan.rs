//! The decision core: observed TrainingJob + its children → a plan of creates and deletes and the
//! new status.
//!
//! [`plan`] is a pure function (time is an input), so every rule the operator follows — gang
//! restarts, the failure policy, backoff, suspension, deadlines, TTL, sticky terminal states,
//! force-deletion of pods stuck on a lost node — is table-tested without a cluster. The reconciler
//! only gathers [`Observed`] and carries out the [`Plan`].

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use radfm_api::conditions::{self, ConditionType as C, reason};
use radfm_api::failure::{self, GangVerdict, WorkerFailure};
use radfm_api::trainingjob::{CheckpointRef, CleanPodPolicy, Phase, Progress};
use radfm_api::{TrainingJob, TrainingJobStatus};

use crate::training_job::children::{self, GangScheduler};

/// What the reconciler saw in the cluster for one job.
#[derive(Debug, Clone)]
pub struct Observed {
    /// Every pod labelled with the job's name and controlled by it, of any attempt.
    pub pods: Vec<Pod>,
    /// The headless Service exists.
    pub service_exists: bool,
    /// The PodGroup exists (only looked up for gang schedulers).
    pub pod_group_exists: bool,
    /// Nodes of the observed pods that no longer exist or are not Ready.
    pub lost_nodes: BTreeSet<String>,
    /// The current time.
    pub now: Time,
}

/// An event to record after the status is written.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedEvent {
    /// Warning (true) or Normal.
    pub warning: bool,
    /// CamelCase reason.
    pub reason: &'static str,
    /// Human-readable note.
    pub note: String,
}

/// What the reconciler must do, in order: create, delete, then write the status once.
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
}

/// One worker pod as the decision core sees it.
#[derive(Debug, Clone)]
struct Worker<'a> {
    pod: &'a Pod,
    name: String,
    rank: i32,
    attempt: i32,
    /// When deletion was requested (deletionTimestamp minus the grace period).
    deleting_since: Option<Time>,
    state: WorkerState,
    ready: bool,
}

#[derive(Debug, Clone, PartialEq)]
enum WorkerState {
    Pending,
    Running,
    Succeeded,
    Failed(WorkerFailure),
}

fn label_i32(pod: &Pod, key: &str) -> Option<i32> {
    pod.metadata.labels.as_ref()?.get(key)?.parse().ok()
}

fn worker<'a>(pod: &'a Pod, lost_nodes: &BTreeSet<String>) -> Option<Worker<'a>> {
    let rank = label_i32(pod, children::LABEL_RANK)?;
    let attempt = label_i32(pod, children::LABEL_ATTEMPT)?;
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
    let true_conditions: Vec<String> = status
        .and_then(|s| s.conditions.as_ref())
        .map(|cs| {
            cs.iter()
                .filter(|c| c.status == "True")
                .map(|c| c.type_.clone())
                .collect()
        })
        .unwrap_or_default();
    let ready = true_conditions.iter().any(|c| c == "Ready");
    let terminated = status
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.name == children::CONTAINER))
        .and_then(|c| c.state.as_ref()?.terminated.as_ref());
    let node_lost = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_ref())
        .is_some_and(|n| lost_nodes.contains(n));
    let disrupted = true_conditions.iter().any(|c| c == "DisruptionTarget");
    let failure = || WorkerFailure {
        rank,
        exit_code: terminated.map(|t| t.exit_code),
        reason: terminated
            .and_then(|t| t.reason.clone())
            .filter(|r| r != "Error" && r != "Completed")
            .or_else(|| status.and_then(|s| s.reason.clone())),
        pod_conditions: true_conditions
            .iter()
            .filter(|c| {
                *c != "Ready"
                    && *c != "PodScheduled"
                    && *c != "Initialized"
                    && *c != "ContainersReady"
                    && *c != "PodReadyToStartContainers"
            })
            .cloned()
            .collect(),
        node_lost,
        termination_message: terminated
            .and_then(|t| t.message.as_deref())
            .and_then(failure::last_line),
    };
    let state = match phase {
        "Succeeded" => WorkerState::Succeeded,
        "Failed" => WorkerState::Failed(failure()),
        _ if node_lost || disrupted => WorkerState::Failed(failure()),
        "Running" => WorkerState::Running,
        _ => WorkerState::Pending,
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
        ready,
    })
}

fn secs_between(from: &Time, to: &Time) -> i64 {
    to.0.as_second() - from.0.as_second()
}

fn add_secs(t: &Time, secs: i64) -> Time {
    Time(
        t.0.checked_add(k8s_openapi::jiff::SignedDuration::from_secs(secs))
            .unwrap_or(t.0),
    )
}

impl Plan {
    fn requeue_at(&mut self, now: &Time, at: &Time) {
        let secs = secs_between(now, at).max(1) as u64;
        let d = Duration::from_secs(secs);
        self.requeue_after = Some(self.requeue_after.map_or(d, |r| r.min(d)));
    }

    fn event(&mut self, warning: bool, reason: &'static str, note: impl Into<String>) {
        self.events.push(PlannedEvent {
            warning,
            reason,
            note: note.into(),
        });
    }
}

struct Ctx<'a> {
    job: &'a TrainingJob,
    obs: &'a Observed,
    generation: Option<i64>,
}

impl Ctx<'_> {
    fn set(
        &self,
        st: &mut TrainingJobStatus,
        ty: C,
        status: bool,
        reason: &str,
        msg: &str,
    ) -> bool {
        conditions::set(
            &mut st.conditions,
            ty,
            status,
            reason,
            msg,
            self.generation,
            &self.obs.now,
        )
    }

    /// Deletes (or force-deletes, past the terminating timeout) the given workers.
    fn remove(&self, plan: &mut Plan, workers: &[&Worker]) {
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
    fn fail(
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
        plan.event(true, why, msg);
        self.terminal(plan, st, workers);
    }

    /// Clean-up and TTL of a finished job. Never creates anything: terminal states are sticky.
    fn terminal(&self, plan: &mut Plan, st: &TrainingJobStatus, workers: &[Worker]) {
        let rp = &self.job.spec.run_policy;
        let doomed: Vec<&Worker> = workers
            .iter()
            .filter(|w| match rp.clean_pod_policy {
                CleanPodPolicy::All => true,
                CleanPodPolicy::Running => {
                    matches!(w.state, WorkerState::Pending | WorkerState::Running)
                        || w.attempt != st.attempt
                }
                CleanPodPolicy::None => false,
            })
            .collect();
        self.remove(plan, &doomed);
        plan.delete_service =
            rp.clean_pod_policy != CleanPodPolicy::None && self.obs.service_exists;
        if let (Some(ttl), Some(done)) =
            (rp.ttl_seconds_after_finished, st.completion_time.as_ref())
        {
            let due = add_secs(done, ttl);
            if secs_between(&due, &self.obs.now) >= 0 {
                plan.delete_job = true;
            } else {
                plan.requeue_at(&self.obs.now, &due);
            }
        }
    }
}

/// Decides what to do for `job` given what was observed.
pub fn plan(job: &TrainingJob, obs: &Observed) -> Plan {
    let ctx = Ctx {
        job,
        obs,
        generation: job.metadata.generation,
    };
    let mut plan = Plan::default();
    let mut st = job.status.clone().unwrap_or_default();
    st.observed_generation = job.metadata.generation;
    st.attempt = st.attempt.max(1);
    let spec = &job.spec;
    let rp = &spec.run_policy;
    let replicas = spec.workers.replicas;

    let mut workers: Vec<Worker> = obs
        .pods
        .iter()
        .filter_map(|p| worker(p, &obs.lost_nodes))
        .collect();
    workers.sort_by_key(|w| (w.attempt, w.rank, w.name.clone()));

    let finished = conditions::is_true(&st.conditions, C::Succeeded)
        || conditions::is_true(&st.conditions, C::Failed);
    if finished {
        ctx.terminal(&mut plan, &st, &workers);
    } else if let Some(deadline) = rp.active_deadline_seconds.filter(|_| !rp.suspend)
        && let Some(start) = st.start_time.clone()
        && secs_between(&start, &obs.now) >= deadline
    {
        let msg = format!("job ran longer than activeDeadlineSeconds={deadline}");
        ctx.fail(
            &mut plan,
            &mut st,
            &workers,
            reason::DEADLINE_EXCEEDED,
            &msg,
        );
    } else if rp.suspend {
        let live: Vec<&Worker> = workers.iter().collect();
        ctx.remove(&mut plan, &live);
        // Workers of this attempt existed: the resumed gang is a new attempt, so none of its
        // ranks can meet a rank of the suspended one.
        if workers.iter().any(|w| w.attempt == st.attempt) {
            st.attempt += 1;
        }
        if ctx.set(
            &mut st,
            C::Suspended,
            true,
            reason::SUSPENDED,
            "runPolicy.suspend is true; workers deleted",
        ) {
            plan.event(
                false,
                reason::SUSPENDED,
                "job suspended; worker pods deleted",
            );
        }
        ctx.set(
            &mut st,
            C::Running,
            false,
            reason::SUSPENDED,
            "job is suspended",
        );
        st.phase = Some(Phase::Suspended);
        st.start_time = None;
    } else {
        if conditions::is_true(&st.conditions, C::Suspended) {
            ctx.set(
                &mut st,
                C::Suspended,
                false,
                reason::RESUMED,
                "runPolicy.suspend is false",
            );
            plan.event(
                false,
                reason::RESUMED,
                "job resumed; a new attempt starts from the last checkpoint",
            );
        }
        if st.start_time.is_none() {
            st.start_time = Some(obs.now.clone());
        }
        if let Some(deadline) = rp.active_deadline_seconds
            && let Some(start) = &st.start_time
        {
            plan.requeue_at(&obs.now, &add_secs(start, deadline));
        }
        run(&ctx, &mut plan, &mut st, &workers);
    }

    // Counts and progress describe the current attempt, whatever the branch.
    let current: Vec<&Worker> = workers.iter().filter(|w| w.attempt == st.attempt).collect();
    let count = |f: &dyn Fn(&Worker) -> bool| current.iter().filter(|w| f(w)).count() as i32;
    st.workers.active = count(&|w| {
        matches!(w.state, WorkerState::Pending | WorkerState::Running) && w.deleting_since.is_none()
    });
    st.workers.ready =
        count(&|w| w.ready && w.state == WorkerState::Running && w.deleting_since.is_none());
    st.workers.succeeded = count(&|w| w.state == WorkerState::Succeeded);
    st.workers.failed = count(&|w| matches!(w.state, WorkerState::Failed(_)));
    st.ready = Some(format!("{}/{replicas}", st.workers.ready));
    if let Some(rank0) = workers.iter().rev().find(|w| w.rank == 0) {
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
    plan.status = st;
    plan
}

/// The running (not suspended, not finished) job.
fn run(ctx: &Ctx, plan: &mut Plan, st: &mut TrainingJobStatus, workers: &[Worker]) {
    let job = ctx.job;
    let replicas = job.spec.workers.replicas;
    let stale: Vec<&Worker> = workers.iter().filter(|w| w.attempt != st.attempt).collect();
    let current: Vec<&Worker> = workers.iter().filter(|w| w.attempt == st.attempt).collect();

    // A failure of the current attempt decides for the whole gang.
    let was_running = conditions::is_true(&st.conditions, C::Running);
    let mut failures: Vec<WorkerFailure> = current
        .iter()
        .filter_map(|w| match &w.state {
            WorkerState::Failed(f) => Some(f.clone()),
            _ => None,
        })
        .collect();
    if was_running {
        // A worker that vanished from a gang that was complete cannot rejoin its collectives.
        let present: BTreeSet<i32> = current
            .iter()
            .filter(|w| w.deleting_since.is_none())
            .map(|w| w.rank)
            .collect();
        for rank in (0..replicas).filter(|r| !present.contains(r)) {
            if !failures.iter().any(|f| f.rank == rank) {
                // Deleted out from under a running gang: an infrastructure event, not the
                // trainer's fault.
                failures.push(WorkerFailure {
                    rank,
                    reason: Some("WorkerDeleted".into()),
                    pod_conditions: vec!["DisruptionTarget".into()],
                    ..Default::default()
                });
            }
        }
    }
    match failure::gang_verdict(
        job.spec.failure_policy.as_ref(),
        &failures,
        st.counted_restarts,
        job.spec.run_policy.backoff_limit,
    ) {
        None => {}
        Some(GangVerdict::Fail { cause, message }) => {
            ctx.fail(plan, st, workers, cause.reason(), &message);
            return;
        }
        Some(GangVerdict::Restart { counted, message }) => {
            restart_gang(ctx, plan, st, workers, counted, &message);
            return;
        }
    }

    let succeeded = current
        .iter()
        .filter(|w| w.state == WorkerState::Succeeded)
        .map(|w| w.rank)
        .collect::<BTreeSet<_>>();
    if succeeded.len() as i32 >= replicas {
        ctx.set(
            st,
            C::Succeeded,
            true,
            reason::SUCCEEDED,
            "every worker exited successfully",
        );
        ctx.set(st, C::Running, false, reason::SUCCEEDED, "job finished");
        ctx.set(st, C::Restarting, false, reason::SUCCEEDED, "job finished");
        st.phase = Some(Phase::Succeeded);
        st.completion_time = Some(ctx.obs.now.clone());
        plan.event(
            false,
            reason::SUCCEEDED,
            format!("all {replicas} workers succeeded"),
        );
        ctx.terminal(plan, st, workers);
        return;
    }

    // Old attempts must be gone before the new gang starts: its ranks would otherwise meet stale
    // peers, and the GPUs they hold may be the ones the new pods need.
    if !stale.is_empty() {
        ctx.remove(plan, &stale);
        st.phase = Some(Phase::Restarting);
        return;
    }

    if !ctx.obs.service_exists {
        plan.create_service = Some(children::service(job));
    }
    if let Some(sched) = GangScheduler::of(job)
        && !ctx.obs.pod_group_exists
    {
        plan.create_pod_group = Some((sched, children::pod_group(job, sched)));
    }
    let present: BTreeSet<i32> = current.iter().map(|w| w.rank).collect();
    plan.create_pods = (0..replicas)
        .filter(|r| !present.contains(r))
        .map(|r| children::worker_pod(job, r, st.attempt))
        .collect();
    if !plan.create_pods.is_empty() {
        plan.trainer_access = children::trainer_access(job, st.attempt);
    }
    // Created turns True once every worker of the attempt exists, not when creation is merely
    // planned: a create the API server refuses leaves it False with the reason (set by the
    // reconciler), instead of flapping.
    if plan.create_pods.is_empty()
        && ctx.obs.service_exists
        && ctx.set(
            st,
            C::Created,
            true,
            reason::JOB_CREATED,
            &format!("service and {replicas} workers created"),
        )
    {
        plan.event(
            false,
            reason::JOB_CREATED,
            format!("created service and {replicas} worker pods"),
        );
    }

    let running = current
        .iter()
        .filter(|w| w.state == WorkerState::Running)
        .count() as i32;
    let all_running = running + succeeded.len() as i32 >= replicas && plan.create_pods.is_empty();
    let restarting = conditions::is_true(&st.conditions, C::Restarting);
    if all_running {
        let (why, msg) = if restarting {
            (
                reason::RESTARTED,
                format!("attempt {} running with all {replicas} workers", st.attempt),
            )
        } else {
            (
                reason::WORKERS_RUNNING,
                format!("all {replicas} workers running"),
            )
        };
        if ctx.set(st, C::Running, true, why, &msg) && restarting {
            plan.event(false, reason::RESTARTED, msg.clone());
        }
        if restarting {
            ctx.set(st, C::Restarting, false, why, &msg);
        }
        st.phase = Some(Phase::Running);
    } else {
        let msg = format!("{running}/{replicas} workers running");
        ctx.set(st, C::Running, false, reason::WORKERS_PENDING, &msg);
        st.phase = Some(if restarting {
            Phase::Restarting
        } else {
            Phase::Pending
        });
    }
}

/// Starts the next attempt: every worker of this and earlier attempts goes.
fn restart_gang(
    ctx: &Ctx,
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
    if counted {
        st.counted_restarts += 1;
    }
    st.restarts += 1;
    let from = st.attempt;
    st.attempt += 1;
    let note = format!(
        "{message}; restarting the whole gang as attempt {} (restart {}{})",
        st.attempt,
        st.restarts,
        if counted { "" } else { ", not counted" }
    );
    ctx.set(st, C::Restarting, true, why, &note);
    ctx.set(st, C::Running, false, why, &note);
    st.phase = Some(Phase::Restarting);
    plan.event(true, why, note);
    let doomed: Vec<&Worker> = workers.iter().filter(|w| w.attempt <= from).collect();
    ctx.remove(plan, &doomed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::training_job::children::fixtures::{JobBuilder, exited, pod, t, terminating};
    use radfm_api::conditions::get;

    fn observe(pods: Vec<Pod>, now: i64) -> Observed {
        Observed {
            pods,
            service_exists: true,
            pod_group_exists: false,
            lost_nodes: BTreeSet::new(),
            now: t(now),
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
            ["mae-w0-a1", "mae-w1-a1", "mae-w2-a1"]
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
        assert!(plan(&job, &observe(done, 40)).delete_job);
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
