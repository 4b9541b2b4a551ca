//! Kueue admission of a job labelled `kueue.x-k8s.io/queue-name`: the gang runs only while its
//! Workload is admitted, on the flavors Kueue chose; an eviction stops the whole gang and gives
//! the quota back once no pod is left; a finished job finishes its Workload and releases it.
//!
//! The hold lives in the status (phase `Queued`, condition `Admitted`), not in
//! `runPolicy.suspend`: radfm never writes its users' spec, so a job applied from Git does not
//! drift, and no mutating webhook has to win a race against the first pods. The user's own
//! `runPolicy.suspend` deactivates the Workload (`spec.active: false`), which gives its quota
//! back.

use std::collections::BTreeMap;

use radfm_api::conditions::{ConditionType as C, reason};
use radfm_api::trainingjob::Phase;
use radfm_api::{TrainingJob, TrainingJobStatus};

use super::children;
use super::plan::{Observed, Pass, Plan};
use super::workers::{Worker, add_secs};
use crate::kueue::{self, PodSetChanges, Priority, ResourceFlavorSpec, Standing, Workload};

/// What the controller saw of Kueue for a queued job.
#[derive(Debug, Clone)]
pub struct Queueing {
    /// Kueue's Workload API was served when the operator started.
    pub kueue_installed: bool,
    /// The job's Workload, if it exists.
    pub workload: Option<Workload>,
    /// The ResourceFlavors the admission names that exist.
    pub flavors: BTreeMap<String, ResourceFlavorSpec>,
    /// The priority a new Workload gets (looked up only while there is none); an error names a
    /// class that does not exist.
    pub priority: Result<Option<Priority>, String>,
}

/// What the Workload of a queued job needs this pass.
#[derive(Debug, Clone, Default)]
pub struct WorkloadActions {
    /// The Workload to create.
    pub create: Option<Workload>,
    /// The status change to write.
    pub status: Option<kueue::StatusPatch>,
    /// `spec.active` to set (it follows `runPolicy.suspend`).
    pub active: Option<bool>,
    /// Remove Kueue's finalizer (after the status change, if any, was written).
    pub remove_finalizer: bool,
    /// Make the job the controller of MultiKueue's prebuilt Workload (as Kueue's job
    /// controllers do), so it follows the job's events and its garbage collection.
    pub adopt: bool,
}

/// Whether the gang may run.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Gate {
    /// Not queued: nothing to wait for.
    Unqueued,
    /// Admitted: the workers get these changes.
    Admitted(PodSetChanges),
    /// Held in the queue, with the `Admitted` condition's reason and message.
    Held { why: &'static str, message: String },
}

impl Gate {
    /// The admission's changes to the workers, if admitted.
    pub fn changes(&self) -> Option<&PodSetChanges> {
        match self {
            Gate::Admitted(c) => Some(c),
            _ => None,
        }
    }
}

fn held(why: &'static str, message: impl Into<String>) -> Gate {
    Gate::Held {
        why,
        message: message.into(),
    }
}

/// Decides whether `job`'s gang may run given its Workload.
pub(super) fn gate(job: &TrainingJob, obs: &Observed) -> Gate {
    let (Some(queue), Some(q)) = (kueue::queue_of(job), &obs.queueing) else {
        return Gate::Unqueued;
    };
    if !q.kueue_installed {
        return held(
            reason::QUEUED,
            format!(
                "queue {queue}: Kueue's Workload API (kueue.x-k8s.io/v1beta2) is not served; \
                 install Kueue, then restart the operator"
            ),
        );
    }
    let Some(wl) = &q.workload else {
        if let Some(prebuilt) = kueue::prebuilt_workload(job) {
            return held(
                reason::QUEUED,
                format!("queue {queue}: waiting for MultiKueue's Workload {prebuilt}"),
            );
        }
        return match &q.priority {
            Err(e) => held(reason::ADMISSION_NOT_APPLICABLE, e.clone()),
            Ok(_) => held(
                reason::QUEUED,
                format!("queue {queue}: creating the Workload"),
            ),
        };
    };
    let foreign = wl.metadata.owner_references.iter().flatten().find(|o| {
        o.controller == Some(true) && Some(o.uid.as_str()) != job.metadata.uid.as_deref()
    });
    if let Some(owner) = foreign {
        return held(
            reason::ADMISSION_NOT_APPLICABLE,
            format!(
                "Workload {} is controlled by {} {}",
                kueue::workload_name(job),
                owner.kind,
                owner.name
            ),
        );
    }
    match kueue::standing(wl) {
        Standing::Waiting(message) => held(reason::QUEUED, message),
        Standing::Evicted {
            reason: why,
            message,
        } => held(
            reason::EVICTED,
            format!("evicted by Kueue ({why}): {message}"),
        ),
        Standing::Deleting => held(reason::EVICTED, "the Workload is being deleted"),
        Standing::Finished => held(
            reason::QUEUED,
            "the Workload finished before the job; waiting for it to go",
        ),
        Standing::Admitted(admission) => {
            let template = children::worker_pod(job, 0, 1);
            match kueue::changes(wl, admission, &q.flavors) {
                Err(e) => held(reason::ADMISSION_NOT_APPLICABLE, e),
                Ok(ch) => match ch.conflict(&template) {
                    Some(e) => held(reason::ADMISSION_NOT_APPLICABLE, e),
                    None => Gate::Admitted(ch),
                },
            }
        }
    }
}

/// Holds the job in its queue: no worker runs (those of an evicted gang are deleted, and the
/// next admission starts a new attempt from the last checkpoint); the deadline's clock stops.
pub(super) fn hold(
    pass: &Pass,
    plan: &mut Plan,
    st: &mut TrainingJobStatus,
    workers: &[Worker],
    why: &'static str,
    message: &str,
) {
    let live: Vec<&Worker> = workers.iter().collect();
    pass.remove(plan, &live);
    if workers.iter().any(|w| w.attempt == st.attempt) {
        st.attempt += 1;
    }
    if pass.set(st, C::Admitted, false, why, message) {
        if why == reason::EVICTED {
            plan.warning(
                why,
                format!("{message}; the gang is stopped and queued again"),
            );
        } else if why == reason::ADMISSION_NOT_APPLICABLE {
            plan.warning(why, message.to_string());
        } else {
            plan.normal(why, message.to_string());
        }
    }
    pass.set(
        st,
        C::Running,
        false,
        why,
        "waiting for Kueue to admit the job",
    );
    st.phase = Some(Phase::Queued);
    st.start_time = None;
    // What would end these holds changes no object the controller watches (a ResourceFlavor or
    // PriorityClass created later; MultiKueue's prebuilt Workload, not yet labelled as the
    // job's): look again.
    let waits_for_prebuilt = kueue::prebuilt_workload(pass.job).is_some()
        && pass
            .obs
            .queueing
            .as_ref()
            .is_some_and(|q| q.workload.is_none());
    if why == reason::ADMISSION_NOT_APPLICABLE || waits_for_prebuilt {
        let now = &pass.obs.now;
        plan.requeue_at(now, &add_secs(now, RECHECK_SECS));
    }
}

/// How often a hold that no watched object ends is looked at again.
const RECHECK_SECS: i64 = 15;

/// Records the admission once.
pub(super) fn admitted(
    pass: &Pass,
    plan: &mut Plan,
    st: &mut TrainingJobStatus,
    ch: &PodSetChanges,
) {
    let message = format!("admitted by ClusterQueue {}", ch.cluster_queue);
    if pass.set(st, C::Admitted, true, reason::ADMITTED, &message) {
        plan.normal(reason::ADMITTED, message);
    }
}

/// What the Workload needs after this pass's decisions (`st` is the new status).
pub(super) fn sync(pass: &Pass, plan: &mut Plan, st: &TrainingJobStatus, workers: &[Worker]) {
    let Some(q) = &pass.obs.queueing else {
        return;
    };
    let gang = Gang {
        phase: st.phase,
        failure: radfm_api::conditions::get(&st.conditions, C::Failed).map(|c| c.message.clone()),
        pods_left: !workers.is_empty(),
        reports_pods_ready: pass.admitted.is_some(),
        attempt: st.attempt,
    };
    plan.workload = actions(pass.job, q, &gang, &pass.obs.now);
}

/// The Workload of a job that MultiKueue dispatches from this (manager) cluster: radfm creates
/// and releases it, and runs nothing here; MultiKueue copies the job to a worker cluster and its
/// status back.
pub fn mirror(
    job: &TrainingJob,
    q: &Queueing,
    now: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
) -> WorkloadActions {
    let st = job.status.clone().unwrap_or_default();
    let gang = Gang {
        phase: st.phase,
        failure: radfm_api::conditions::get(&st.conditions, C::Failed).map(|c| c.message.clone()),
        pods_left: false,
        // The status MultiKueue copies back says how the worker's gang is doing; Kueue's
        // waitForPodsReady on the manager reads it from here.
        reports_pods_ready: true,
        attempt: st.attempt.max(1),
    };
    actions(job, q, &gang, now)
}

/// What the Workload's side needs to know of the gang.
struct Gang {
    phase: Option<Phase>,
    failure: Option<String>,
    pods_left: bool,
    reports_pods_ready: bool,
    attempt: i32,
}

fn actions(
    job: &TrainingJob,
    q: &Queueing,
    gang: &Gang,
    now: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
) -> WorkloadActions {
    let mut out = WorkloadActions::default();
    let Some(queue) = kueue::queue_of(job) else {
        return out;
    };
    if !q.kueue_installed {
        return out;
    }
    let finished = matches!(gang.phase, Some(Phase::Succeeded | Phase::Failed));
    let active = !job.spec.run_policy.suspend;
    let Some(wl) = &q.workload else {
        let prebuilt = kueue::prebuilt_workload(job).is_some();
        if let (false, false, Ok(priority)) = (finished, prebuilt, &q.priority) {
            let template = children::worker_pod(job, 0, gang.attempt);
            let owner = children::owner(job);
            out.create = Some(kueue::workload(
                job,
                owner,
                &template,
                queue,
                priority.as_ref(),
                active,
            ));
        }
        return out;
    };
    let has_finalizer = wl
        .metadata
        .finalizers
        .as_ref()
        .is_some_and(|f| f.iter().any(|f| f == kueue::FINALIZER));
    let uncontrolled = !wl
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.controller == Some(true));
    out.adopt = uncontrolled && kueue::prebuilt_workload(job).is_some();
    let standing = kueue::standing(wl);
    match &standing {
        Standing::Deleting => out.remove_finalizer = has_finalizer && !gang.pods_left,
        Standing::Finished => out.remove_finalizer = has_finalizer,
        _ if finished => {
            let succeeded = gang.phase == Some(Phase::Succeeded);
            let message = match (succeeded, &gang.failure) {
                (true, _) => "the TrainingJob succeeded".to_string(),
                (false, Some(m)) => m.clone(),
                (false, None) => "the TrainingJob failed".to_string(),
            };
            out.status = Some(kueue::finish(wl, succeeded, &message, now));
            out.remove_finalizer = has_finalizer;
        }
        Standing::Evicted {
            reason: why,
            message,
        } => {
            // Pods being deleted still hold their GPUs: the quota goes back when they are gone.
            if !gang.pods_left {
                out.status = Some(kueue::release(wl, why, message, now));
            }
        }
        Standing::Admitted(_) if gang.reports_pods_ready => {
            let ready = gang.phase == Some(Phase::Running);
            out.status = kueue::pods_ready(wl, ready, now);
        }
        Standing::Admitted(_) | Standing::Waiting(_) => {}
    }
    let live = !finished && standing != Standing::Deleting;
    if live && wl.spec.active != Some(active) {
        out.active = Some(active);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
    use radfm_api::conditions::{self, ConditionType as C, reason};
    use radfm_api::trainingjob::Phase;

    use super::Queueing;
    use crate::kueue::{
        self, Admission, PodSetAssignment, ResourceFlavorSpec, Workload, WorkloadStatus,
    };
    use crate::training_job::children::fixtures::{JobBuilder, pod, t};
    use crate::training_job::plan::{Observed, plan};

    fn queued_job() -> radfm_api::TrainingJob {
        JobBuilder::new(2)
            .with(|j| {
                j.metadata.labels = Some(BTreeMap::from([(
                    kueue::QUEUE_LABEL.into(),
                    "team-a".into(),
                )]))
            })
            .build()
    }

    fn obs(pods: Vec<k8s_openapi::api::core::v1::Pod>, workload: Option<Workload>) -> Observed {
        Observed {
            pods: pods.into_iter().map(std::sync::Arc::new).collect(),
            awaited_pods: Default::default(),
            service_exists: true,
            pod_group_exists: false,
            lost_nodes: Default::default(),
            now: t(100),
            policy_violation: None,
            queueing: Some(Queueing {
                kueue_installed: true,
                workload,
                flavors: BTreeMap::from([(
                    "h100".to_string(),
                    ResourceFlavorSpec {
                        node_labels: BTreeMap::from([("gpu".into(), "h100".into())]),
                        tolerations: vec![],
                    },
                )]),
                priority: Ok(None),
            }),
        }
    }

    fn c(ty: &str, status: &str, reason: &str) -> Condition {
        Condition {
            type_: ty.into(),
            status: status.into(),
            reason: reason.into(),
            message: format!("{ty}: {reason}"),
            observed_generation: None,
            last_transition_time: t(0),
        }
    }

    fn workload(
        job: &radfm_api::TrainingJob,
        conditions: Vec<Condition>,
        admitted: bool,
    ) -> Workload {
        let template = crate::training_job::children::worker_pod(job, 0, 1);
        let owner = k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference::default();
        let mut w = kueue::workload(job, owner, &template, "team-a", None, true);
        w.metadata.resource_version = Some("3".into());
        w.status = Some(WorkloadStatus {
            conditions,
            admission: admitted.then(|| Admission {
                cluster_queue: "gpus".into(),
                pod_set_assignments: vec![PodSetAssignment {
                    name: kueue::POD_SET.into(),
                    flavors: BTreeMap::from([("nvidia.com/gpu".into(), "h100".into())]),
                }],
            }),
            admission_checks: vec![],
        });
        w
    }

    /// `job` with the status phase MultiKueue copied back from a worker cluster.
    fn with_phase(job: radfm_api::TrainingJob, phase: Phase) -> radfm_api::TrainingJob {
        JobBuilder(job)
            .with(|j| {
                j.status = Some(radfm_api::TrainingJobStatus {
                    phase: Some(phase),
                    ..Default::default()
                })
            })
            .build()
    }

    fn admitted_conditions() -> Vec<Condition> {
        vec![
            c("QuotaReserved", "True", "QuotaReserved"),
            c("Admitted", "True", "Admitted"),
        ]
    }

    #[test]
    fn a_queued_job_without_a_workload_creates_one_and_runs_nothing() {
        let job = queued_job();
        let p = plan(&job, &obs(vec![], None));
        assert!(p.create_pods.is_empty());
        let wl = p.workload.create.expect("a Workload is created");
        assert_eq!(wl.spec.queue_name.as_deref(), Some("team-a"));
        assert_eq!(wl.spec.pod_sets[0].count, 2);
        assert_eq!(p.status.phase, Some(Phase::Queued));
        let admitted = conditions::get(&p.status.conditions, C::Admitted).unwrap();
        assert_eq!(
            (admitted.status.as_str(), admitted.reason.as_str()),
            ("False", reason::QUEUED)
        );
        assert!(p.status.start_time.is_none());
    }

    #[test]
    fn a_job_waits_while_its_workload_has_no_quota() {
        let job = queued_job();
        let wl = workload(&job, vec![c("QuotaReserved", "False", "Pending")], false);
        let p = plan(&job, &obs(vec![], Some(wl)));
        assert!(
            p.create_pods.is_empty() && p.workload.create.is_none() && p.workload.status.is_none()
        );
        assert_eq!(p.status.phase, Some(Phase::Queued));
        let admitted = conditions::get(&p.status.conditions, C::Admitted).unwrap();
        assert!(
            admitted.message.contains("QuotaReserved: Pending"),
            "{}",
            admitted.message
        );
    }

    #[test]
    fn an_admitted_job_starts_its_gang_on_the_admitted_flavor() {
        let job = queued_job();
        let wl = workload(&job, admitted_conditions(), true);
        let p = plan(&job, &obs(vec![], Some(wl)));
        assert_eq!(p.create_pods.len(), 2);
        for pod in &p.create_pods {
            assert_eq!(
                pod.spec.as_ref().unwrap().node_selector.as_ref().unwrap()["gpu"],
                "h100"
            );
        }
        let admitted = conditions::get(&p.status.conditions, C::Admitted).unwrap();
        assert_eq!(
            (admitted.status.as_str(), admitted.message.as_str()),
            ("True", "admitted by ClusterQueue gpus")
        );
        let ready = p.workload.status.expect("PodsReady is reported");
        assert_eq!(
            ready
                .conditions()
                .iter()
                .find(|c| c.type_ == "PodsReady")
                .unwrap()
                .status,
            "False"
        );
    }

    #[test]
    fn a_running_gang_reports_pods_ready_once() {
        let job = queued_job();
        let wl = workload(&job, admitted_conditions(), true);
        let running = vec![pod(&job, 0, 1, "Running"), pod(&job, 1, 1, "Running")];
        let p = plan(&job, &obs(running.clone(), Some(wl.clone())));
        assert_eq!(p.status.phase, Some(Phase::Running));
        let ready = p.workload.status.unwrap();
        assert_eq!(
            ready
                .conditions()
                .iter()
                .find(|c| c.type_ == "PodsReady")
                .unwrap()
                .status,
            "True"
        );
        let mut conditions = admitted_conditions();
        conditions.push(c("PodsReady", "True", "Started"));
        let wl = workload(&job, conditions, true);
        assert!(
            plan(&job, &obs(running, Some(wl)))
                .workload
                .status
                .is_none()
        );
    }

    #[test]
    fn an_evicted_gang_stops_and_gives_its_quota_back_only_when_its_pods_are_gone() {
        let job = queued_job();
        let mut conditions = admitted_conditions();
        conditions.push(c("Evicted", "True", "Preempted"));
        let wl = workload(&job, conditions, true);
        let running = vec![pod(&job, 0, 1, "Running"), pod(&job, 1, 1, "Running")];
        let p = plan(&job, &obs(running, Some(wl.clone())));
        assert_eq!(p.delete_pods.len(), 2, "the whole gang stops");
        assert!(p.workload.status.is_none(), "its pods still hold the GPUs");
        assert_eq!(p.status.phase, Some(Phase::Queued));
        assert_eq!(
            p.status.attempt, 2,
            "the next admission starts a new attempt"
        );
        let admitted = conditions::get(&p.status.conditions, C::Admitted).unwrap();
        assert_eq!(admitted.reason, reason::EVICTED);
        assert!(p.events.iter().any(|e| e.reason == reason::EVICTED));

        let p = plan(&job, &obs(vec![], Some(wl)));
        let release = p.workload.status.expect("the quota goes back");
        assert!(release.clears_admission());
        assert!(p.create_pods.is_empty());
    }

    #[test]
    fn a_finished_job_finishes_and_releases_its_workload() {
        let job = queued_job();
        let wl = workload(&job, admitted_conditions(), true);
        let done = vec![
            crate::training_job::children::fixtures::exited(
                pod(&job, 0, 1, "Succeeded"),
                0,
                "Completed",
            ),
            crate::training_job::children::fixtures::exited(
                pod(&job, 1, 1, "Succeeded"),
                0,
                "Completed",
            ),
        ];
        let p = plan(&job, &obs(done, Some(wl)));
        assert_eq!(p.status.phase, Some(Phase::Succeeded));
        let finish = p.workload.status.expect("Finished is written");
        assert!(
            finish
                .conditions()
                .iter()
                .any(|c| c.type_ == "Finished" && c.reason == "Succeeded")
        );
        assert!(p.workload.remove_finalizer);
    }

    #[test]
    fn suspending_a_queued_job_deactivates_its_workload() {
        let job = queued_job();
        let suspended = JobBuilder(job.clone())
            .with(|j| j.spec.run_policy.suspend = true)
            .build();
        let wl = workload(&job, admitted_conditions(), true);
        let p = plan(&suspended, &obs(vec![], Some(wl.clone())));
        assert_eq!(p.workload.active, Some(false));
        assert_eq!(p.status.phase, Some(Phase::Suspended));
        assert_eq!(plan(&job, &obs(vec![], Some(wl))).workload.active, None);
    }

    #[test]
    fn an_admission_the_gang_cannot_use_holds_it_and_says_why() {
        let job = queued_job();
        let mut wl = workload(&job, admitted_conditions(), true);
        wl.status
            .as_mut()
            .unwrap()
            .admission
            .as_mut()
            .unwrap()
            .pod_set_assignments[0]
            .flavors
            .insert("nvidia.com/gpu".into(), "missing".into());
        let p = plan(&job, &obs(vec![], Some(wl)));
        assert!(p.create_pods.is_empty());
        let admitted = conditions::get(&p.status.conditions, C::Admitted).unwrap();
        assert_eq!(admitted.reason, reason::ADMISSION_NOT_APPLICABLE);
        assert!(admitted.message.contains("ResourceFlavor missing"));
        assert!(
            p.requeue_after.is_some(),
            "a flavor created later is noticed"
        );
    }

    #[test]
    fn a_deleted_workload_loses_its_finalizer_once_the_gang_is_gone() {
        let job = queued_job();
        let mut wl = workload(&job, admitted_conditions(), true);
        wl.metadata.deletion_timestamp = Some(t(50));
        let running = vec![pod(&job, 0, 1, "Running")];
        let p = plan(&job, &obs(running, Some(wl.clone())));
        assert_eq!(p.delete_pods.len(), 1);
        assert!(!p.workload.remove_finalizer);
        assert!(plan(&job, &obs(vec![], Some(wl))).workload.remove_finalizer);
    }

    #[test]
    fn a_job_without_a_queue_label_ignores_kueue() {
        let job = JobBuilder::new(2).build();
        let p = plan(&job, &obs(vec![], None));
        assert_eq!(p.create_pods.len(), 2);
        assert!(p.workload.create.is_none());
        assert!(conditions::get(&p.status.conditions, C::Admitted).is_none());
    }

    #[test]
    fn a_multikueue_copy_waits_for_and_adopts_its_prebuilt_workload() {
        let job = JobBuilder(queued_job())
            .with(|j| {
                j.metadata.annotations = Some(BTreeMap::from([(
                    kueue::PREBUILT_WORKLOAD.into(),
                    "wl-from-manager".into(),
                )]))
            })
            .build();
        assert_eq!(kueue::workload_name(&job), "wl-from-manager");
        let p = plan(&job, &obs(vec![], None));
        assert!(p.workload.create.is_none(), "MultiKueue made it");
        assert!(p.create_pods.is_empty());
        assert!(
            p.requeue_after.is_some(),
            "the prebuilt Workload is not watched yet"
        );
        let admitted = conditions::get(&p.status.conditions, C::Admitted).unwrap();
        assert!(
            admitted.message.contains("wl-from-manager"),
            "{}",
            admitted.message
        );

        let mut wl = workload(&job, admitted_conditions(), true);
        wl.metadata.owner_references = None;
        let p = plan(&job, &obs(vec![], Some(wl.clone())));
        assert!(p.workload.adopt);
        assert_eq!(p.create_pods.len(), 2, "admitted: the gang runs");

        wl.metadata.owner_references = Some(vec![
            k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                controller: Some(true),
                kind: "JobSet".into(),
                name: "other".into(),
                uid: "other-uid".into(),
                ..Default::default()
            },
        ]);
        let p = plan(&job, &obs(vec![], Some(wl)));
        assert!(p.create_pods.is_empty() && !p.workload.adopt);
        let admitted = conditions::get(&p.status.conditions, C::Admitted).unwrap();
        assert_eq!(admitted.reason, reason::ADMISSION_NOT_APPLICABLE);
    }

    #[test]
    fn a_multikueue_job_on_the_manager_gets_a_workload_and_finishes_it_from_the_mirrored_status() {
        let job = JobBuilder(queued_job())
            .with(|j| j.spec.managed_by = Some(kueue::MULTIKUEUE.into()))
            .build();
        let q = obs(vec![], None).queueing.unwrap();
        let a = super::mirror(&job, &q, &t(1));
        assert_eq!(a.create.unwrap().spec.queue_name.as_deref(), Some("team-a"));

        let wl = workload(&job, admitted_conditions(), true);
        let q = obs(vec![], Some(wl)).queueing.unwrap();
        let running = with_phase(job.clone(), Phase::Running);
        let a = super::mirror(&running, &q, &t(2));
        assert!(
            a.create.is_none() && !a.remove_finalizer,
            "running elsewhere"
        );
        let ready = a.status.expect("the mirrored Running is PodsReady");
        assert!(
            ready
                .conditions()
                .iter()
                .any(|c| c.type_ == "PodsReady" && c.status == "True")
        );

        let done = with_phase(job, Phase::Succeeded);
        let a = super::mirror(&done, &q, &t(3));
        assert!(
            a.status
                .unwrap()
                .conditions()
                .iter()
                .any(|c| c.type_ == "Finished")
        );
        assert!(a.remove_finalizer);
    }

    #[test]
    fn a_queued_job_without_kueue_waits_and_says_to_install_it() {
        let job = queued_job();
        let mut o = obs(vec![], None);
        o.queueing.as_mut().unwrap().kueue_installed = false;
        let p = plan(&job, &o);
        assert!(p.create_pods.is_empty() && p.workload.create.is_none());
        let admitted = conditions::get(&p.status.conditions, C::Admitted).unwrap();
        assert!(admitted.message.contains("install Kueue"));
    }
}
