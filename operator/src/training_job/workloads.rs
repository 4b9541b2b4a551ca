//! The API side of Kueue queueing: reading a queued job's Workload, flavors and priority,
//! writing what [`super::queue_policy`] decided, and releasing the Workloads of deleted jobs
//! (the TrainingJob controller never sees a job that is gone).

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::scheduling::v1::PriorityClass;
use kube::ResourceExt;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use radfm_api::TrainingJob;
use tracing::info;

use super::children;
use super::queue_policy::{Queueing, WorkloadActions};
use crate::context::{Context, FIELD_MANAGER, drive};
use crate::effects::tolerate;
use crate::kueue::{self, Priority, PriorityClassRef, ResourceFlavor, Workload};
use crate::{Error, Result};

/// Whether the cluster serves Kueue's Workload API (asked once, at start).
pub async fn kueue_served(client: &kube::Client) -> bool {
    client
        .list_api_group_resources("kueue.x-k8s.io/v1beta2")
        .await
        .is_ok_and(|l| l.resources.iter().any(|r| r.name == "workloads"))
}

/// What Kueue holds for a queued `job`.
pub(super) async fn observe(job: &TrainingJob, ns: &str, ctx: &Context) -> Result<Queueing> {
    if !ctx.kueue {
        return Ok(Queueing {
            kueue_installed: false,
            workload: None,
            flavors: BTreeMap::new(),
            priority: Ok(None),
        });
    }
    let workloads: Api<Workload> = Api::namespaced(ctx.client.clone(), ns);
    let workload = workloads.get_opt(&kueue::workload_name(job)).await?;
    let mut flavors = BTreeMap::new();
    let admission = workload
        .as_ref()
        .and_then(|w| w.status.as_ref())
        .and_then(|s| s.admission.as_ref());
    if let Some(a) = admission {
        let api: Api<ResourceFlavor> = Api::all(ctx.client.clone());
        for name in a
            .pod_set_assignments
            .iter()
            .flat_map(|p| p.flavors.values())
        {
            if let Some(f) = api.get_opt(name).await? {
                flavors.insert(name.clone(), f.spec);
            }
        }
    }
    let priority = match workload {
        None => priority(job, ctx).await?,
        Some(_) => Ok(None),
    };
    Ok(Queueing {
        kueue_installed: true,
        workload,
        flavors,
        priority,
    })
}

/// The priority of a new Workload: a Kueue WorkloadPriorityClass named by label first, then the
/// workers' PriorityClass, as Kueue resolves it for its own jobs.
async fn priority(job: &TrainingJob, ctx: &Context) -> Result<Result<Option<Priority>, String>> {
    if let Some(name) = job.labels().get(kueue::PRIORITY_CLASS_LABEL) {
        let ar = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("kueue.x-k8s.io", "v1beta2", "WorkloadPriorityClass"),
            "workloadpriorityclasses",
        );
        let api: Api<DynamicObject> = Api::all_with(ctx.client.clone(), &ar);
        let value = api
            .get_opt(name)
            .await?
            .and_then(|o| o.data.get("value").and_then(|v| v.as_i64()));
        return Ok(match value {
            Some(v) => Ok(Some(Priority {
                class: PriorityClassRef {
                    group: "kueue.x-k8s.io".into(),
                    kind: "WorkloadPriorityClass".into(),
                    name: name.clone(),
                },
                value: v as i32,
            })),
            None => Err(format!(
                "WorkloadPriorityClass {name} (label {}) does not exist",
                kueue::PRIORITY_CLASS_LABEL
            )),
        });
    }
    let Some(name) = &job.spec.workers.priority_class_name else {
        return Ok(Ok(None));
    };
    let api: Api<PriorityClass> = Api::all(ctx.client.clone());
    Ok(match api.get_opt(name).await? {
        Some(pc) => Ok(Some(Priority {
            class: PriorityClassRef {
                group: "scheduling.k8s.io".into(),
                kind: "PriorityClass".into(),
                name: name.clone(),
            },
            value: pc.value.unwrap_or_default(),
        })),
        None => Err(format!(
            "PriorityClass {name} (spec.workers.priorityClassName) does not exist"
        )),
    })
}

fn params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    }
}

/// Carries out `actions` on the Workload of `job` (`observed` as read this pass).
pub(super) async fn apply(
    job: &TrainingJob,
    ns: &str,
    actions: &WorkloadActions,
    observed: Option<&Workload>,
    ctx: &Context,
) -> Result<()> {
    let api: Api<Workload> = Api::namespaced(ctx.client.clone(), ns);
    let name = kueue::workload_name(job);
    let child = |what: &str, source: kube::Error| Error::Child {
        what: format!("{what} Workload {name}"),
        source,
    };
    if let Some(wl) = &actions.create {
        let pp = crate::effects::post_params();
        tolerate(api.create(&pp, wl).await, 409).map_err(|e| child("creating", e))?;
        info!(workload = %name, "created the Kueue Workload");
    }
    if actions.adopt
        && let Some(wl) = observed
    {
        adopt(&api, wl, job)
            .await
            .map_err(|e| child("adopting", e))?;
    }
    if let Some(active) = actions.active {
        let body = serde_json::json!({"spec": {"active": active}});
        api.patch(&name, &params(), &Patch::Merge(&body))
            .await
            .map_err(|e| child("activating", e))?;
    }
    if let Some(status) = &actions.status {
        api.patch_status(&name, &params(), &Patch::Merge(&status.body()))
            .await
            .map_err(|e| child("writing the status of", e))?;
    }
    if actions.remove_finalizer
        && let Some(wl) = observed
    {
        remove_finalizer(&api, wl)
            .await
            .map_err(|e| child("releasing", e))?;
    }
    Ok(())
}

/// Makes `job` the controller of MultiKueue's prebuilt Workload `wl`, labelled as radfm's own,
/// guarded by the resourceVersion it was read at.
async fn adopt(
    api: &Api<Workload>,
    wl: &Workload,
    job: &TrainingJob,
) -> std::result::Result<(), kube::Error> {
    let mut owners = wl.owner_references().to_vec();
    owners.push(children::owner(job));
    let body = serde_json::json!({
        "metadata": {
            "resourceVersion": wl.resource_version(),
            "ownerReferences": owners,
            "labels": {
                children::LABEL_MANAGED_BY: children::MANAGER,
                children::LABEL_JOB: job.name_any(),
                kueue::JOB_UID_LABEL: job.uid().unwrap_or_default(),
            },
        },
    });
    api.patch(&wl.name_any(), &params(), &Patch::Merge(&body))
        .await?;
    info!(workload = %wl.name_any(), "adopted MultiKueue's prebuilt Workload");
    Ok(())
}

/// The Workload side of a job MultiKueue dispatches from this cluster (`spec.managedBy:
/// kueue.x-k8s.io/multikueue`): its Workload is created and released here, nothing else.
pub(super) async fn reconcile_dispatched(job: &TrainingJob, ctx: &Context) -> Result<Action> {
    let ns = job
        .namespace()
        .ok_or_else(|| Error::MissingField("metadata.namespace"))?;
    let q = observe(job, &ns, ctx).await?;
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(ctx.clock.now());
    let actions = super::queue_policy::mirror(job, &q, &now);
    apply(job, &ns, &actions, q.workload.as_ref(), ctx).await?;
    Ok(Action::await_change())
}

/// Removes Kueue's finalizer, keeping any other, guarded by the resourceVersion it was read at
/// (a stale read gets a conflict and is retried, never drops a finalizer added meanwhile).
async fn remove_finalizer(
    api: &Api<Workload>,
    wl: &Workload,
) -> std::result::Result<(), kube::Error> {
    if !wl.finalizers().iter().any(|f| f == kueue::FINALIZER) {
        return Ok(());
    }
    let kept: Vec<&String> = wl
        .finalizers()
        .iter()
        .filter(|f| *f != kueue::FINALIZER)
        .collect();
    let body = serde_json::json!({
        "metadata": {"resourceVersion": wl.resource_version(), "finalizers": kept},
    });
    tolerate(
        api.patch(&wl.name_any(), &params(), &Patch::Merge(&body))
            .await,
        404,
    )
}

/// Releases the Workload of a job that is gone or going: its pods go with the job (they are the
/// job's children), and a Workload whose job no longer exists has no controller to release it.
async fn release_orphan(wl: Arc<Workload>, ctx: Arc<Context>) -> Result<Action> {
    let being_deleted = wl.metadata.deletion_timestamp.is_some();
    let has_finalizer = wl.finalizers().iter().any(|f| f == kueue::FINALIZER);
    let ns = wl.namespace().unwrap_or_default();
    if !being_deleted || !has_finalizer {
        return Ok(Action::await_change());
    }
    let owner = wl
        .owner_references()
        .iter()
        .find(|o| o.controller == Some(true) && o.kind == "TrainingJob")
        .cloned();
    let jobs: Api<TrainingJob> = Api::namespaced(ctx.client.clone(), &ns);
    let job = match &owner {
        Some(o) => jobs.get_opt(&o.name).await?,
        None => None,
    };
    let orphaned = match (&owner, &job) {
        (Some(o), Some(j)) => {
            j.uid().as_deref() != Some(o.uid.as_str()) || j.metadata.deletion_timestamp.is_some()
        }
        _ => true,
    };
    if orphaned {
        let api: Api<Workload> = Api::namespaced(ctx.client.clone(), &ns);
        remove_finalizer(&api, &wl).await?;
        info!(workload = %wl.name_any(), "released the Workload of a deleted TrainingJob");
    }
    Ok(Action::await_change())
}

/// Runs the release of orphaned Workloads until `shutdown` resolves.
pub async fn run_release_controller(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let api: Api<Workload> = crate::effects::scoped(&ctx.client, namespace.as_deref());
    let owned = watcher::Config::default().labels(&format!(
        "{}={}",
        children::LABEL_MANAGED_BY,
        children::MANAGER
    ));
    let controller = Controller::new(api, owned);
    drive(controller, release_orphan, ctx, shutdown, "Workload").await;
}
