//! A finished job: terminal states are sticky (nothing is created again), `cleanPodPolicy` says
//! which pods go, and `ttlSecondsAfterFinished` deletes the job itself once due, except a job a
//! GitOps tool applied: Argo CD's or Flux's self-heal would apply it again, and the job would
//! train again from scratch, in a loop (docs/health.md, "GitOps").

use kube::ResourceExt;
use radfm_api::TrainingJobStatus;
use radfm_api::conditions::reason;
use radfm_api::trainingjob::CleanPodPolicy;

use super::plan::{Pass, Plan};
use super::workers::{Worker, WorkerState, add_secs, secs_between};

/// Whether `cleanPodPolicy` removes `w` from a job that finished in `attempt`.
fn cleaned(policy: CleanPodPolicy, w: &Worker, attempt: i32) -> bool {
    match policy {
        CleanPodPolicy::All => true,
        CleanPodPolicy::Running => {
            matches!(w.state, WorkerState::Pending | WorkerState::Running) || w.attempt != attempt
        }
        CleanPodPolicy::None => false,
    }
}

/// Markers GitOps tools put on what they apply: Argo CD's annotation tracking (its default since
/// 3.0), and Flux's kustomize- and helm-controller labels.
const GITOPS_ANNOTATIONS: [&str; 1] = ["argocd.argoproj.io/tracking-id"];
const GITOPS_LABELS: [&str; 2] = [
    "kustomize.toolkit.fluxcd.io/name",
    "helm.toolkit.fluxcd.io/name",
];

/// The marker that says a GitOps tool applied `job`, if any.
fn gitops_marker(job: &radfm_api::TrainingJob) -> Option<&'static str> {
    let annotations = job.annotations();
    let labels = job.labels();
    GITOPS_ANNOTATIONS
        .into_iter()
        .find(|k| annotations.contains_key(*k))
        .or_else(|| GITOPS_LABELS.into_iter().find(|k| labels.contains_key(*k)))
}

/// Clean-up and TTL of a finished job.
pub(super) fn finished(pass: &Pass, plan: &mut Plan, st: &TrainingJobStatus, workers: &[Worker]) {
    let rp = &pass.job.spec.run_policy;
    let doomed: Vec<&Worker> = workers
        .iter()
        .filter(|w| cleaned(rp.clean_pod_policy, w, st.attempt))
        .collect();
    pass.remove(plan, &doomed);
    plan.delete_service = rp.clean_pod_policy != CleanPodPolicy::None && pass.obs.service_exists;
    if let (Some(ttl), Some(done)) = (rp.ttl_seconds_after_finished, st.completion_time.as_ref()) {
        let due = add_secs(done, ttl);
        if secs_between(&due, &pass.obs.now) < 0 {
            plan.requeue_at(&pass.obs.now, &due);
        } else if let Some(marker) = gitops_marker(pass.job) {
            // No requeue after this: repeated only by later changes, and the event recorder
            // counts repeats of one event.
            plan.warning(
                reason::TTL_KEPT_FOR_GITOPS,
                format!(
                    "ttlSecondsAfterFinished is not applied: {marker} says a GitOps tool applied \
                     this job and would apply it again; keep a ContinualTraining in Git instead, \
                     or remove the job from Git"
                ),
            );
        } else {
            plan.delete_job = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;
    use radfm_api::failure::WorkerFailure;

    #[test]
    fn clean_pod_policy_says_which_workers_of_a_finished_job_go() {
        let pod = Pod::default();
        let w = |state, attempt| Worker {
            pod: &pod,
            name: "w".into(),
            rank: 0,
            attempt,
            deleting_since: None,
            state,
            ready: false,
        };
        let failed = WorkerState::Failed(WorkerFailure::default());
        use CleanPodPolicy::{All, Running};
        let cases = [
            (All, w(WorkerState::Succeeded, 2), true),
            (All, w(failed.clone(), 2), true),
            (Running, w(WorkerState::Running, 2), true),
            (Running, w(WorkerState::Pending, 2), true),
            (Running, w(WorkerState::Succeeded, 2), false),
            (Running, w(failed.clone(), 2), false),
            (Running, w(failed.clone(), 1), true),
            (CleanPodPolicy::None, w(WorkerState::Running, 2), false),
            (CleanPodPolicy::None, w(failed, 1), false),
        ];
        for (policy, worker, want) in cases {
            assert_eq!(
                cleaned(policy, &worker, 2),
                want,
                "{policy:?} {:?}",
                worker.state
            );
        }
    }
}
