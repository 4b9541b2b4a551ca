//! Kueue's side of a queued TrainingJob: the `kueue.x-k8s.io/v1beta2` objects radfm reads and
//! writes, and the pure rules that turn them into a Workload, pod changes and status patches.
//!
//! radfm is one of Kueue's *external frameworks*: Kueue's controllers queue, admit, preempt and
//! evict Workloads; the job's own controller creates the Workload, starts the gang only once it is
//! admitted (on the flavors Kueue chose), stops the gang and gives the quota back when it is
//! evicted, reports `PodsReady`, and marks it `Finished`. Kueue's Go `jobframework` does this for
//! the jobs Kueue knows; these are the same rules, written for radfm's plan.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, OwnerReference, Time};
use kube::CustomResource;
use radfm_api::TrainingJob;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// The label that puts a job in a Kueue LocalQueue of its namespace.
pub const QUEUE_LABEL: &str = "kueue.x-k8s.io/queue-name";
/// The label that names a Kueue WorkloadPriorityClass for the job.
pub const PRIORITY_CLASS_LABEL: &str = "kueue.x-k8s.io/priority-class";
/// The label Kueue puts on a job's Workload: the job's UID.
pub const JOB_UID_LABEL: &str = "kueue.x-k8s.io/job-uid";
/// The finalizer that keeps a Workload (and its quota) while its pods may still run.
pub const FINALIZER: &str = "kueue.x-k8s.io/resource-in-use";
/// The annotation (or label) MultiKueue puts on the copy of a job it creates in a worker
/// cluster: the Workload it created there for it, which the job must use instead of its own.
pub const PREBUILT_WORKLOAD: &str = "kueue.x-k8s.io/prebuilt-workload-name";
/// `spec.managedBy` of a job MultiKueue dispatches from its manager cluster.
pub const MULTIKUEUE: &str = "kueue.x-k8s.io/multikueue";
/// The one pod set of a TrainingJob's Workload: its gang of workers.
pub const POD_SET: &str = "workers";

/// Workload condition types and reasons radfm reads or writes.
pub mod condition {
    /// Quota reserved and every admission check ready.
    pub const ADMITTED: &str = "Admitted";
    /// Quota reserved in a ClusterQueue.
    pub const QUOTA_RESERVED: &str = "QuotaReserved";
    /// Kueue evicted the Workload; its job must stop.
    pub const EVICTED: &str = "Evicted";
    /// The Workload was requeued after an eviction.
    pub const REQUEUED: &str = "Requeued";
    /// Every pod of the Workload is ready (reported by the job's controller).
    pub const PODS_READY: &str = "PodsReady";
    /// The job finished; the Workload no longer needs quota.
    pub const FINISHED: &str = "Finished";
    /// Evicted to make room for a higher-priority Workload.
    pub const PREEMPTED: &str = "Preempted";
    /// Evicted because nodes of its pods failed.
    pub const NODE_FAILURES: &str = "NodeFailures";
}

/// A Kueue Workload: the unit of quota and admission of one job.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "kueue.x-k8s.io",
    version = "v1beta2",
    kind = "Workload",
    namespaced,
    status = "WorkloadStatus",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSpec {
    /// The job's pods, by pod set.
    pub pod_sets: Vec<PodSet>,
    /// The LocalQueue the Workload waits in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_name: Option<String>,
    /// The priority class its priority comes from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_ref: Option<PriorityClassRef>,
    /// The priority Kueue orders and preempts by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// False deactivates the Workload: Kueue evicts it and does not admit it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<bool>,
}

/// One group of identical pods.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodSet {
    /// The pod set's name.
    pub name: String,
    /// The pods' template (requests, node selector, tolerations, affinity).
    pub template: PodTemplateSpec,
    /// How many pods.
    pub count: i32,
}

/// A reference to a PriorityClass or a Kueue WorkloadPriorityClass.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PriorityClassRef {
    /// `scheduling.k8s.io` or `kueue.x-k8s.io`.
    pub group: String,
    /// `PriorityClass` or `WorkloadPriorityClass`.
    pub kind: String,
    /// The class's name.
    pub name: String,
}

/// What Kueue decided about a Workload.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadStatus {
    /// QuotaReserved, Admitted, Evicted, Requeued, PodsReady, Finished, ...
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Where the quota is reserved, present while it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admission: Option<Admission>,
    /// The admission checks' states and the pod set changes they ask for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub admission_checks: Vec<AdmissionCheckState>,
}

/// A quota reservation.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Admission {
    /// The ClusterQueue whose quota is reserved.
    pub cluster_queue: String,
    /// The flavors assigned to each pod set.
    #[serde(default)]
    pub pod_set_assignments: Vec<PodSetAssignment>,
}

/// The flavors of one pod set's resources.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodSetAssignment {
    /// The pod set's name.
    pub name: String,
    /// ResourceFlavor by resource name.
    #[serde(default)]
    pub flavors: BTreeMap<String, String>,
}

/// One admission check's state.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionCheckState {
    /// The check's name.
    pub name: String,
    /// Pending, Ready, Retry or Rejected.
    #[serde(default)]
    pub state: String,
    /// Changes the check asks the pods to get.
    #[serde(default)]
    pub pod_set_updates: Vec<PodSetUpdate>,
}

/// Additions an admission check asks for.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodSetUpdate {
    /// The pod set's name.
    pub name: String,
    /// Labels to add.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Annotations to add.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// Node selector entries to add.
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations to add.
    #[serde(default)]
    pub tolerations: Vec<Toleration>,
}

/// A Kueue ResourceFlavor: the nodes a flavor stands for.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "kueue.x-k8s.io",
    version = "v1beta2",
    kind = "ResourceFlavor",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct ResourceFlavorSpec {
    /// Labels of the flavor's nodes: the admitted pods' node selector.
    #[serde(default)]
    pub node_labels: BTreeMap<String, String>,
    /// Tolerations the admitted pods get.
    #[serde(default)]
    pub tolerations: Vec<Toleration>,
}

/// The priority a new Workload gets, resolved from its class.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Priority {
    /// The class.
    pub class: PriorityClassRef,
    /// The class's value.
    pub value: i32,
}

/// The queue a job asked for with [`QUEUE_LABEL`], if any.
pub fn queue_of(job: &TrainingJob) -> Option<&str> {
    job.metadata
        .labels
        .as_ref()?
        .get(QUEUE_LABEL)
        .map(String::as_str)
        .filter(|q| !q.is_empty())
}

/// The Workload MultiKueue built for this copy of a job, if it is one.
pub fn prebuilt_workload(job: &TrainingJob) -> Option<&str> {
    let annotated = job
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(PREBUILT_WORKLOAD));
    let labelled = job
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(PREBUILT_WORKLOAD));
    annotated
        .or(labelled)
        .map(String::as_str)
        .filter(|n| !n.is_empty())
}

/// Whether `wl`'s controller is `job`.
pub fn controlled_by(wl: &Workload, job: &TrainingJob) -> bool {
    let uid = job.metadata.uid.as_deref().unwrap_or_default();
    wl.metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.controller == Some(true) && o.uid == uid)
}

/// The name of a job's Workload: MultiKueue's prebuilt one, else one unique per job UID, so a
/// job deleted and created again never meets the old job's Workload.
pub fn workload_name(job: &TrainingJob) -> String {
    if let Some(prebuilt) = prebuilt_workload(job) {
        return prebuilt.to_string();
    }
    let name = job.metadata.name.as_deref().unwrap_or_default();
    let uid: String = job
        .metadata
        .uid
        .as_deref()
        .unwrap_or_default()
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(8)
        .collect();
    let name: String = name
        .chars()
        .take(253 - "trainingjob--".len() - uid.len())
        .collect();
    format!("trainingjob-{name}-{uid}")
}

/// The Workload of `job`: one pod set of its workers built from the pod `template` (what Kueue
/// counts: requests, node selector, tolerations, affinity), owned by the job, with Kueue's
/// finalizer.
pub fn workload(
    job: &TrainingJob,
    owner: OwnerReference,
    template: &Pod,
    queue: &str,
    priority: Option<&Priority>,
    active: bool,
) -> Workload {
    let labels = BTreeMap::from([
        (
            crate::training_job::children::LABEL_MANAGED_BY.to_string(),
            crate::training_job::children::MANAGER.to_string(),
        ),
        (
            crate::training_job::children::LABEL_JOB.to_string(),
            job.metadata.name.clone().unwrap_or_default(),
        ),
        (
            JOB_UID_LABEL.to_string(),
            job.metadata.uid.clone().unwrap_or_default(),
        ),
    ]);
    let template = PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: template.metadata.labels.clone(),
            ..Default::default()
        }),
        spec: template.spec.clone(),
    };
    Workload {
        metadata: ObjectMeta {
            name: Some(workload_name(job)),
            namespace: job.metadata.namespace.clone(),
            labels: Some(labels),
            owner_references: Some(vec![owner]),
            finalizers: Some(vec![FINALIZER.to_string()]),
            ..Default::default()
        },
        spec: WorkloadSpec {
            pod_sets: vec![PodSet {
                name: POD_SET.into(),
                template,
                count: job.spec.workers.replicas,
            }],
            queue_name: Some(queue.to_string()),
            priority_class_ref: priority.map(|p| p.class.clone()),
            priority: priority.map(|p| p.value),
            active: Some(active),
        },
        status: None,
    }
}

/// Where a Workload stands, for its job.
#[derive(Debug, Clone, PartialEq)]
pub enum Standing<'a> {
    /// Waiting for quota; Kueue's message says why.
    Waiting(String),
    /// Admitted: the gang may run as the admission says.
    Admitted(&'a Admission),
    /// Kueue evicted it while it still holds quota: the gang must stop, then the quota goes back.
    Evicted {
        /// Kueue's reason (Preempted, InactiveWorkload, ...).
        reason: String,
        /// Kueue's message.
        message: String,
    },
    /// It is finished (its job ended).
    Finished,
    /// It is being deleted: the gang must stop, then the finalizer goes.
    Deleting,
}

fn condition<'a>(wl: &'a Workload, ty: &str) -> Option<&'a Condition> {
    wl.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == ty)
}

fn is_true(wl: &Workload, ty: &str) -> bool {
    condition(wl, ty).is_some_and(|c| c.status == "True")
}

/// Whether quota is reserved for `wl`.
pub fn holds_quota(wl: &Workload) -> bool {
    is_true(wl, condition::QUOTA_RESERVED)
        || wl.status.as_ref().is_some_and(|s| s.admission.is_some())
}

/// Where `wl` stands.
pub fn standing(wl: &Workload) -> Standing<'_> {
    if wl.metadata.deletion_timestamp.is_some() {
        return Standing::Deleting;
    }
    if is_true(wl, condition::FINISHED) {
        return Standing::Finished;
    }
    if let Some(c) = condition(wl, condition::EVICTED).filter(|c| c.status == "True")
        && holds_quota(wl)
    {
        return Standing::Evicted {
            reason: c.reason.clone(),
            message: c.message.clone(),
        };
    }
    let admission = wl.status.as_ref().and_then(|s| s.admission.as_ref());
    match admission {
        Some(a) if is_true(wl, condition::ADMITTED) => Standing::Admitted(a),
        _ => {
            let queue = wl.spec.queue_name.as_deref().unwrap_or_default();
            let why = condition(wl, condition::QUOTA_RESERVED)
                .or_else(|| condition(wl, condition::ADMITTED))
                .map(|c| c.message.clone())
                .filter(|m| !m.is_empty())
                .unwrap_or_else(|| "waiting for Kueue to reserve quota".into());
            Standing::Waiting(format!("queue {queue}: {why}"))
        }
    }
}

/// What an admission adds to each worker pod.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PodSetChanges {
    /// The ClusterQueue that admitted the job.
    pub cluster_queue: String,
    /// Node selector entries (the flavors' node labels, the checks' additions).
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations (the flavors', the checks').
    pub tolerations: Vec<Toleration>,
    /// Labels the admission checks add.
    pub labels: BTreeMap<String, String>,
    /// Annotations the admission checks add.
    pub annotations: BTreeMap<String, String>,
}

/// The changes `admission` (and the admission checks of `wl`) make to the workers, with the
/// flavors' definitions; an error names what cannot be applied.
pub fn changes(
    wl: &Workload,
    admission: &Admission,
    flavors: &BTreeMap<String, ResourceFlavorSpec>,
) -> Result<PodSetChanges, String> {
    let mut out = PodSetChanges {
        cluster_queue: admission.cluster_queue.clone(),
        ..Default::default()
    };
    let assignment = admission
        .pod_set_assignments
        .iter()
        .find(|a| a.name == POD_SET)
        .ok_or_else(|| format!("the admission has no assignment for pod set {POD_SET}"))?;
    for flavor in assignment.flavors.values() {
        let spec = flavors
            .get(flavor)
            .ok_or_else(|| format!("ResourceFlavor {flavor} does not exist"))?;
        merge(&mut out.node_selector, &spec.node_labels, "nodeSelector")?;
        add_tolerations(&mut out.tolerations, &spec.tolerations);
    }
    let checks = wl.status.as_ref().map_or(&[][..], |s| &s.admission_checks);
    for update in checks
        .iter()
        .flat_map(|c| &c.pod_set_updates)
        .filter(|u| u.name == POD_SET)
    {
        merge(
            &mut out.node_selector,
            &update.node_selector,
            "nodeSelector",
        )?;
        merge(&mut out.labels, &update.labels, "labels")?;
        merge(&mut out.annotations, &update.annotations, "annotations")?;
        add_tolerations(&mut out.tolerations, &update.tolerations);
    }
    Ok(out)
}

fn merge(
    into: &mut BTreeMap<String, String>,
    add: &BTreeMap<String, String>,
    field: &str,
) -> Result<(), String> {
    for (k, v) in add {
        match into.get(k) {
            Some(old) if old != v => {
                return Err(format!("{field} {k}: admitted as {v}, but also {old}"));
            }
            _ => {
                into.insert(k.clone(), v.clone());
            }
        }
    }
    Ok(())
}

fn add_tolerations(into: &mut Vec<Toleration>, add: &[Toleration]) {
    for t in add {
        if !into.contains(t) {
            into.push(t.clone());
        }
    }
}

impl PodSetChanges {
    /// Why the changes contradict a worker pod (a node selector key the job sets to another
    /// value), if they do.
    pub fn conflict(&self, pod: &Pod) -> Option<String> {
        let mut selector = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_selector.clone())
            .unwrap_or_default();
        merge(&mut selector, &self.node_selector, "nodeSelector")
            .err()
            .map(|e| format!("{e} (spec.workers.nodeSelector)"))
    }

    /// Applies the changes to a worker pod (checked by [`Self::conflict`] first).
    pub fn apply(&self, pod: &mut Pod) {
        let spec = pod.spec.get_or_insert_with(Default::default);
        let selector = spec.node_selector.get_or_insert_with(Default::default);
        selector.extend(self.node_selector.clone());
        let tolerations = spec.tolerations.get_or_insert_with(Default::default);
        add_tolerations(tolerations, &self.tolerations);
        let labels = pod.metadata.labels.get_or_insert_with(Default::default);
        for (k, v) in &self.labels {
            labels.entry(k.clone()).or_insert_with(|| v.clone());
        }
        let annotations = pod
            .metadata
            .annotations
            .get_or_insert_with(Default::default);
        for (k, v) in &self.annotations {
            annotations.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
}

fn workload_condition(
    wl: &Workload,
    ty: &str,
    status: bool,
    reason: &str,
    message: &str,
    now: &Time,
) -> Condition {
    let status = if status { "True" } else { "False" };
    let old = condition(wl, ty);
    let last_transition_time = match old {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => now.clone(),
    };
    Condition {
        type_: ty.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message: message.to_string(),
        observed_generation: wl.metadata.generation,
        last_transition_time,
    }
}

/// A change to a Workload's status: a JSON merge patch of the status subresource carrying the
/// Workload's resourceVersion, so a write never overwrites what Kueue wrote meanwhile (a conflict
/// is retried on a fresh read).
#[derive(Debug, Clone, PartialEq)]
pub struct StatusPatch {
    conditions: Vec<Condition>,
    clear_admission: bool,
    resource_version: Option<String>,
}

impl StatusPatch {
    fn of(wl: &Workload) -> StatusPatch {
        StatusPatch {
            conditions: wl
                .status
                .as_ref()
                .map(|s| s.conditions.clone())
                .unwrap_or_default(),
            clear_admission: false,
            resource_version: wl.metadata.resource_version.clone(),
        }
    }

    fn set(&mut self, c: Condition) {
        match self.conditions.iter_mut().find(|o| o.type_ == c.type_) {
            Some(o) => *o = c,
            None => self.conditions.push(c),
        }
    }

    /// The merge patch's body.
    pub fn body(&self) -> serde_json::Value {
        let mut status = json!({ "conditions": self.conditions });
        if self.clear_admission {
            status["admission"] = serde_json::Value::Null;
        }
        json!({
            "metadata": { "resourceVersion": self.resource_version },
            "status": status,
        })
    }

    /// The conditions after the patch.
    pub fn conditions(&self) -> &[Condition] {
        &self.conditions
    }

    /// Whether the patch removes the admission.
    pub fn clears_admission(&self) -> bool {
        self.clear_admission
    }
}

/// Gives the quota of an evicted Workload back once its gang stopped, as Kueue's job
/// controllers do: no admission, `QuotaReserved` and `Admitted` False, and `Requeued` True where
/// the eviction asks to come back (preemption, node failures).
pub fn release(wl: &Workload, reason: &str, message: &str, now: &Time) -> StatusPatch {
    let mut p = StatusPatch::of(wl);
    let requeue = reason == condition::PREEMPTED || reason == condition::NODE_FAILURES;
    p.set(workload_condition(
        wl,
        condition::REQUEUED,
        requeue,
        reason,
        message,
        now,
    ));
    p.set(workload_condition(
        wl,
        condition::QUOTA_RESERVED,
        false,
        "Pending",
        message,
        now,
    ));
    p.set(workload_condition(
        wl,
        condition::ADMITTED,
        false,
        "NoReservation",
        "The workload has no reservation",
        now,
    ));
    p.clear_admission = true;
    p
}

/// Marks the Workload of a finished job `Finished`.
pub fn finish(wl: &Workload, succeeded: bool, message: &str, now: &Time) -> StatusPatch {
    let mut p = StatusPatch::of(wl);
    let reason = if succeeded { "Succeeded" } else { "Failed" };
    p.set(workload_condition(
        wl,
        condition::FINISHED,
        true,
        reason,
        message,
        now,
    ));
    p
}

/// Reports whether every worker is ready (`waitForPodsReady`), when that changed; `None` when
/// the Workload already says so.
pub fn pods_ready(wl: &Workload, ready: bool, now: &Time) -> Option<StatusPatch> {
    let was = condition(wl, condition::PODS_READY);
    let started_before = was.is_some_and(|c| {
        c.reason == "Started" || c.reason == "Recovered" || c.reason == "WaitForRecovery"
    });
    let (reason, message) = match (ready, started_before) {
        (true, false) => (
            "Started",
            "All pods reached readiness and the workload is running",
        ),
        (true, true) => ("Recovered", "All pods reached readiness again"),
        (false, false) => ("WaitForStart", "Not all pods are ready or succeeded"),
        (false, true) => (
            "WaitForRecovery",
            "At least one pod has failed, waiting for recovery",
        ),
    };
    let status = if ready { "True" } else { "False" };
    if was.is_some_and(|c| c.status == status) {
        return None;
    }
    let mut p = StatusPatch::of(wl);
    p.set(workload_condition(
        wl,
        condition::PODS_READY,
        ready,
        reason,
        message,
        now,
    ));
    Some(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::training_job::children::fixtures::{JobBuilder, t};

    fn cond(ty: &str, status: &str, reason: &str) -> Condition {
        Condition {
            type_: ty.into(),
            status: status.into(),
            reason: reason.into(),
            message: format!("{ty} {reason}"),
            observed_generation: None,
            last_transition_time: t(0),
        }
    }

    fn admission(flavor: &str) -> Admission {
        Admission {
            cluster_queue: "gpus".into(),
            pod_set_assignments: vec![PodSetAssignment {
                name: POD_SET.into(),
                flavors: BTreeMap::from([("nvidia.com/gpu".into(), flavor.into())]),
            }],
        }
    }

    fn wl(conditions: Vec<Condition>, admission: Option<Admission>) -> Workload {
        let mut w = Workload::new("w", WorkloadSpec::default());
        w.metadata.resource_version = Some("7".into());
        w.spec.queue_name = Some("team-a".into());
        w.status = Some(WorkloadStatus {
            conditions,
            admission,
            admission_checks: vec![],
        });
        w
    }

    fn h100() -> BTreeMap<String, ResourceFlavorSpec> {
        BTreeMap::from([(
            "h100".to_string(),
            ResourceFlavorSpec {
                node_labels: BTreeMap::from([("gpu".into(), "h100".into())]),
                tolerations: vec![Toleration {
                    key: Some("gpu".into()),
                    operator: Some("Exists".into()),
                    effect: Some("NoSchedule".into()),
                    ..Default::default()
                }],
            },
        )])
    }

    #[test]
    fn a_workload_stands_where_its_conditions_say() {
        let waiting = wl(vec![cond("QuotaReserved", "False", "Pending")], None);
        assert_eq!(
            standing(&waiting),
            Standing::Waiting("queue team-a: QuotaReserved Pending".into())
        );
        assert!(matches!(standing(&wl(vec![], None)), Standing::Waiting(_)));
        let admitted = wl(
            vec![
                cond("QuotaReserved", "True", "QuotaReserved"),
                cond("Admitted", "True", "Admitted"),
            ],
            Some(admission("h100")),
        );
        assert!(matches!(standing(&admitted), Standing::Admitted(a) if a.cluster_queue == "gpus"));
        let reserved_not_checked = wl(
            vec![cond("QuotaReserved", "True", "QuotaReserved")],
            Some(admission("h100")),
        );
        assert!(
            matches!(standing(&reserved_not_checked), Standing::Waiting(_)),
            "quota without checks is not admission"
        );
        let evicted = wl(
            vec![
                cond("QuotaReserved", "True", "QuotaReserved"),
                cond("Admitted", "True", "Admitted"),
                cond("Evicted", "True", "Preempted"),
            ],
            Some(admission("h100")),
        );
        assert!(
            matches!(standing(&evicted), Standing::Evicted { reason, .. } if reason == "Preempted")
        );
        let released = wl(
            vec![
                cond("QuotaReserved", "False", "Pending"),
                cond("Evicted", "True", "Preempted"),
            ],
            None,
        );
        assert!(
            matches!(standing(&released), Standing::Waiting(_)),
            "released quota queues again"
        );
        let finished = wl(vec![cond("Finished", "True", "Succeeded")], None);
        assert_eq!(standing(&finished), Standing::Finished);
        let mut deleting = admitted.clone();
        deleting.metadata.deletion_timestamp = Some(t(5));
        assert_eq!(standing(&deleting), Standing::Deleting);
    }

    #[test]
    fn an_admission_puts_the_flavors_nodes_and_tolerations_on_the_workers() {
        let mut w = wl(vec![], Some(admission("h100")));
        w.status.as_mut().unwrap().admission_checks = vec![AdmissionCheckState {
            name: "prov".into(),
            state: "Ready".into(),
            pod_set_updates: vec![PodSetUpdate {
                name: POD_SET.into(),
                annotations: BTreeMap::from([("provreq".into(), "p1".into())]),
                node_selector: BTreeMap::from([("zone".into(), "a".into())]),
                ..Default::default()
            }],
        }];
        let ch = changes(&w, &admission("h100"), &h100()).unwrap();
        assert_eq!(ch.cluster_queue, "gpus");
        let job = JobBuilder::new(2).build();
        let mut pod = crate::training_job::children::worker_pod(&job, 0, 1);
        assert_eq!(ch.conflict(&pod), None);
        ch.apply(&mut pod);
        let spec = pod.spec.unwrap();
        let selector = spec.node_selector.unwrap();
        assert_eq!(selector["gpu"], "h100");
        assert_eq!(selector["zone"], "a");
        assert!(
            spec.tolerations
                .unwrap()
                .iter()
                .any(|t| t.key.as_deref() == Some("gpu"))
        );
        assert_eq!(pod.metadata.annotations.unwrap()["provreq"], "p1");
    }

    #[test]
    fn an_admission_that_cannot_be_applied_says_why() {
        let w = wl(vec![], Some(admission("a100")));
        let err = changes(&w, &admission("a100"), &h100()).unwrap_err();
        assert!(err.contains("ResourceFlavor a100"), "{err}");
        let ch = changes(&w, &admission("h100"), &h100()).unwrap();
        let job = JobBuilder::new(1)
            .with(|j| {
                j.spec.workers.node_selector = Some(BTreeMap::from([("gpu".into(), "a100".into())]))
            })
            .build();
        let pod = crate::training_job::children::worker_pod(&job, 0, 1);
        let err = ch.conflict(&pod).unwrap();
        assert!(
            err.contains("gpu") && err.contains("h100") && err.contains("a100"),
            "{err}"
        );
    }

    #[test]
    fn releasing_an_evicted_workload_clears_its_admission_and_requeues_a_preempted_one() {
        let w = wl(
            vec![
                cond("QuotaReserved", "True", "QuotaReserved"),
                cond("Admitted", "True", "Admitted"),
                cond("Evicted", "True", "Preempted"),
            ],
            Some(admission("h100")),
        );
        let p = release(&w, "Preempted", "preempted by b", &t(9));
        let body = p.body();
        assert_eq!(body["metadata"]["resourceVersion"], "7");
        assert!(body["status"]["admission"].is_null() && p.clears_admission());
        let get = |ty: &str| {
            p.conditions()
                .iter()
                .find(|c| c.type_ == ty)
                .unwrap()
                .clone()
        };
        assert_eq!(get("QuotaReserved").status, "False");
        assert_eq!(get("QuotaReserved").last_transition_time, t(9));
        assert_eq!(get("Admitted").status, "False");
        assert_eq!(get("Requeued").status, "True");
        assert_eq!(
            get("Evicted").status,
            "True",
            "Kueue's own conditions are kept"
        );
        let deactivated = release(&w, "InactiveWorkload", "deactivated", &t(9));
        let requeued = deactivated
            .conditions()
            .iter()
            .find(|c| c.type_ == "Requeued")
            .unwrap();
        assert_eq!(requeued.status, "False");
    }

    #[test]
    fn pods_ready_is_reported_only_when_it_changes() {
        let w = wl(vec![], None);
        let p = pods_ready(&w, false, &t(1)).unwrap();
        assert_eq!(p.conditions()[0].reason, "WaitForStart");
        let w = wl(vec![cond("PodsReady", "False", "WaitForStart")], None);
        assert!(pods_ready(&w, false, &t(2)).is_none());
        let p = pods_ready(&w, true, &t(2)).unwrap();
        assert_eq!(p.conditions()[0].reason, "Started");
        let w = wl(vec![cond("PodsReady", "True", "Started")], None);
        assert_eq!(
            pods_ready(&w, false, &t(3)).unwrap().conditions()[0].reason,
            "WaitForRecovery"
        );
        let p = finish(&w, true, "every worker succeeded", &t(4));
        assert!(
            p.conditions()
                .iter()
                .any(|c| c.type_ == "Finished" && c.status == "True" && c.reason == "Succeeded")
        );
    }

    #[test]
    fn a_workload_is_named_after_its_job_and_uid_and_counts_the_gang() {
        let job = JobBuilder::new(4)
            .with(|j| {
                j.metadata.uid = Some("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0".into());
                j.metadata.labels = Some(BTreeMap::from([(QUEUE_LABEL.into(), "team-a".into())]));
            })
            .build();
        assert_eq!(queue_of(&job), Some("team-a"));
        assert_eq!(workload_name(&job), "trainingjob-mae-0f1e2d3c");
        let pod = crate::training_job::children::worker_pod(&job, 0, 1);
        let owner = OwnerReference::default();
        let prio = Priority {
            class: PriorityClassRef {
                group: "scheduling.k8s.io".into(),
                kind: "PriorityClass".into(),
                name: "high".into(),
            },
            value: 1000,
        };
        let w = workload(&job, owner, &pod, "team-a", Some(&prio), true);
        assert_eq!(w.spec.pod_sets[0].count, 4);
        assert_eq!(w.spec.pod_sets[0].name, POD_SET);
        assert_eq!(w.spec.priority, Some(1000));
        assert_eq!(
            w.metadata.finalizers.as_deref(),
            Some(&[FINALIZER.to_string()][..])
        );
        let json = serde_json::to_value(&w).unwrap();
        assert_eq!(json["apiVersion"], "kueue.x-k8s.io/v1beta2");
        assert!(
            json["spec"]["podSets"][0]["template"]["spec"]["containers"][0]["resources"]
                .is_object()
        );
        assert!(json.get("status").is_none_or(|s| s.is_null()));
    }
}
