//! The TrainingJob controller: the thin layer that talks to the API server. Gather
//! [`Observed`], run [`plan`], carry out the plan, write the status once by server-side apply,
//! then record events.

pub mod cache;
pub mod children;
mod failure_policy;
mod gang_startup;
pub mod plan;
#[cfg(test)]
mod properties;
pub mod queue_policy;
mod success_policy;
mod suspend_policy;
mod ttl_after_finished;
pub mod workers;
pub mod workloads;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::core::v1::{Node, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use radfm_api::TrainingJob;
use radfm_api::conditions::{self, ConditionType, Stamp, reason};
use radfm_api::trainingjob::MANAGED_BY_RADFM;
use tracing::{info, instrument, warn};

use crate::context::{Context, FIELD_MANAGER, drive};
use crate::effects::{PlannedEvent, tolerate};
use crate::{Error, Result};
use children::GangScheduler;
use plan::{Observed, Plan, plan};

/// Reconciles one TrainingJob.
#[instrument(skip_all, fields(job = %job.name_any(), namespace = job.namespace().unwrap_or_default()))]
pub async fn reconcile(job: Arc<TrainingJob>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let result = reconcile_inner(&job, &ctx).await;
    ctx.metrics
        .observe_reconcile(started.elapsed(), result.as_ref().err());
    result
}

async fn reconcile_inner(job: &TrainingJob, ctx: &Context) -> Result<Action> {
    if job.managed_by() != MANAGED_BY_RADFM {
        return reconcile_managed_elsewhere(job, ctx).await;
    }
    if job.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = job
        .namespace()
        .ok_or_else(|| Error::MissingField("metadata.namespace"))?;
    let observed = observe(job, &ns, ctx).await?;
    let mut plan = plan(job, &observed);
    if plan.delete_job {
        // Children first: the job's finalizer-free deletion must leave nothing behind even where
        // no garbage collector runs.
        plan.delete_pods = observed
            .pods
            .iter()
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        plan.delete_service = observed.service_exists;
    }

    let busy = !plan.create_pods.is_empty()
        || !plan.delete_pods.is_empty()
        || !plan.force_delete_pods.is_empty();
    if busy || plan.create_service.is_some() || plan.delete_service {
        info!(
            phase = plan.status.phase.map(|p| p.as_str()),
            attempt = plan.status.attempt,
            create = plan.create_pods.len(),
            delete = plan.delete_pods.len(),
            force_delete = ?plan.force_delete_pods,
            "applying plan"
        );
    }
    let queued_workload = observed.queueing.as_ref().and_then(|q| q.workload.as_ref());
    let create_error = match apply(job, &ns, &plan, ctx).await {
        // The Workload after the pods: a released quota must not be re-admitted before the
        // gang it paid for is gone (the plan releases only once no pod is left).
        Ok(()) => workloads::apply(job, &ns, &plan.workload, queued_workload, ctx)
            .await
            .err(),
        Err(e) => Some(e),
    };
    if let Some(e) = &create_error {
        let stamp = Stamp {
            generation: job.metadata.generation,
            now: observed.now.clone(),
        };
        let message = e.to_string();
        let why = reason::CREATE_FAILED;
        stamp.set(
            &mut plan.status.conditions,
            ConditionType::Created,
            false,
            why,
            &message,
        );
        plan.events.push(PlannedEvent::warning(why, message));
    }

    let jobs: Api<TrainingJob> = Api::namespaced(ctx.client.clone(), &ns);
    if plan.delete_job {
        info!("ttlSecondsAfterFinished passed; deleting the job");
        tolerate(
            jobs.delete(&job.name_any(), &DeleteParams::background())
                .await,
            404,
        )?;
        return Ok(Action::await_change());
    }
    crate::effects::apply_status(&jobs, job, job.status.as_ref(), &plan.status).await?;
    ctx.metrics
        .observe_status(job.status.as_ref(), &plan.status);
    crate::effects::publish(&ctx.recorder, job, "Reconcile", &plan.events).await;

    if let Some(e) = create_error {
        return Err(e);
    }
    Ok(match plan.requeue_after {
        Some(d) => Action::requeue(d),
        None => Action::await_change(),
    })
}

/// A job another controller runs: only one MultiKueue dispatches from this cluster needs
/// something here (its Workload).
async fn reconcile_managed_elsewhere(job: &TrainingJob, ctx: &Context) -> Result<Action> {
    let dispatched = job.managed_by() == crate::kueue::MULTIKUEUE
        && ctx.kueue
        && crate::kueue::queue_of(job).is_some()
        && job.metadata.deletion_timestamp.is_none();
    if dispatched {
        return workloads::reconcile_dispatched(job, ctx).await;
    }
    Ok(Action::await_change())
}

async fn observe(job: &TrainingJob, ns: &str, ctx: &Context) -> Result<Observed> {
    let name = job.name_any();
    let uid = job.uid().unwrap_or_default();
    let caches = ctx
        .training_job_caches
        .as_ref()
        .ok_or(Error::MissingField("the TrainingJob controller's caches"))?;
    caches.wait_until_ready().await;
    let pods = caches.workers_of(ns, &name, &uid);
    let awaited_pods = caches.workers.awaited(ns, &name, std::time::Instant::now());
    let service_exists = caches.has_service(ns, &children::service_name(job));
    let pod_group_exists = match GangScheduler::of(job) {
        Some(s) => pod_group_api(ctx, ns, s)
            .get_opt(&children::service_name(job))
            .await
            .ok()
            .flatten()
            .is_some(),
        None => false,
    };
    let lost_nodes: BTreeSet<String> = pods
        .iter()
        .filter_map(|p| p.spec.as_ref()?.node_name.clone())
        .filter(|n| caches.node(n).is_none_or(|node| !node_ready(&node)))
        .collect();
    Ok(Observed {
        pods,
        awaited_pods,
        service_exists,
        pod_group_exists,
        lost_nodes,
        now: Time(ctx.clock.now()),
        policy_violation: ctx.pod_policy.check_training_job(&job.spec).err(),
        queueing: match crate::kueue::queue_of(job) {
            Some(_) => Some(workloads::observe(job, ns, ctx).await?),
            None => None,
        },
    })
}

/// A node counts as lost when its Ready condition is not True. (Its `unreachable` taints
/// follow Ready=Unknown, but the NoExecute one lingers after the kubelet is back until the node
/// controller's next pass, and pods tolerate it for 300 s: a worker the scheduler just placed on
/// the returning node is not lost.)
fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True")
}

fn pod_group_api(ctx: &Context, ns: &str, sched: GangScheduler) -> Api<DynamicObject> {
    let (group, version, kind, plural) = sched.gvk();
    let ar =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
    Api::namespaced_with(ctx.client.clone(), ns, &ar)
}

/// The first failure of a pass's writes; every write is still tried.
#[derive(Default)]
struct Failures(Option<Error>);

impl Failures {
    fn note(&mut self, r: std::result::Result<(), kube::Error>, what: String) {
        if let Err(e) = r {
            warn!(error = %e, "{what}");
            self.0.get_or_insert(Error::Child { what, source: e });
        }
    }
}

/// Carries out creates and deletes; AlreadyExists and NotFound are success (the plan is
/// idempotent). Returns the first error after trying everything.
async fn apply(job: &TrainingJob, ns: &str, plan: &Plan, ctx: &Context) -> Result<()> {
    let mut failures = Failures::default();
    create_gang_objects(job, ns, plan, ctx, &mut failures).await?;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    // The RoleBinding alongside the pods: it needs its Role (above), but the pods do not need
    // it to be admitted; the trainer's first progress report comes seconds after its start,
    // and a report refused meanwhile is logged and sent again.
    let binding = async {
        let access = plan.trainer_access.as_ref()?;
        let account = children::trainer_service_account_name(job);
        let r = bind_trainer(ctx, ns, access).await;
        Some((r, format!("binding progress reporting to {account}")))
    };
    let (created, bound) = futures::join!(
        create_pods(&pods, &plan.create_pods, &mut failures),
        binding
    );
    if let Some((r, what)) = bound {
        failures.note(r, what);
    }
    if let Some(caches) = &ctx.training_job_caches {
        caches
            .workers
            .expect(ns, &job.name_any(), created, std::time::Instant::now());
    }
    delete_pods(&pods, plan, &mut failures).await;
    if plan.delete_service {
        let api: Api<Service> = Api::namespaced(ctx.client.clone(), ns);
        let name = children::service_name(job);
        let r = tolerate(api.delete(&name, &DeleteParams::default()).await, 404);
        failures.note(r, format!("deleting service {name}"));
    }
    failures.0.map_or(Ok(()), Err)
}

/// A write's outcome and what it was, for [`Failures::note`].
type Outcome = (std::result::Result<(), kube::Error>, String);

/// The headless Service, the PodGroup, the gang Secret and NetworkPolicy and the trainer's
/// ServiceAccount and Role, at once, before any pod (a pod naming a ServiceAccount that does not
/// exist yet is refused; a pod must not start before its gang's NetworkPolicy).
async fn create_gang_objects(
    job: &TrainingJob,
    ns: &str,
    plan: &Plan,
    ctx: &Context,
    failures: &mut Failures,
) -> Result<()> {
    let pp = crate::effects::post_params();
    let name = children::service_name(job);
    let pod_group = match &plan.create_pod_group {
        Some((sched, pg)) => Some((
            *sched,
            serde_json::from_value::<DynamicObject>(pg.clone()).map_err(Error::Serialize)?,
        )),
        None => None,
    };
    let service = async {
        let svc = plan.create_service.as_ref()?;
        let api: Api<Service> = Api::namespaced(ctx.client.clone(), ns);
        let r = tolerate(api.create(&pp, svc).await, 409);
        Some((r, format!("creating service {name}")))
    };
    let group = async {
        let (sched, obj) = pod_group.as_ref()?;
        let r = tolerate(pod_group_api(ctx, ns, *sched).create(&pp, obj).await, 409);
        Some((r, format!("creating PodGroup {name}")))
    };
    let secret = async {
        if !plan.create_gang_secret {
            return None;
        }
        let secret = children::gang_secret(job, hex::encode(rand::random::<[u8; 32]>()));
        let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
        let r = tolerate(api.create(&pp, &secret).await, 409);
        Some((r, format!("creating the gang secret of {name}")))
    };
    let policy = async {
        if !(plan.create_gang_secret && ctx.gang_network_policy) {
            return None;
        }
        let policy = children::gang_network_policy(job);
        let api: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), ns);
        let r = tolerate(api.create(&pp, &policy).await, 409);
        Some((r, format!("creating the gang NetworkPolicy of {name}")))
    };
    let access = async {
        let access = plan.trainer_access.as_ref()?;
        let account = children::trainer_service_account_name(job);
        let r = apply_trainer_access(ctx, ns, access).await;
        Some((r, format!("granting progress reporting to {account}")))
    };
    let outcomes: [Option<Outcome>; 5] =
        futures::join!(service, group, secret, policy, access).into();
    for (r, what) in outcomes.into_iter().flatten() {
        failures.note(r, what);
    }
    Ok(())
}

/// Creates the pods, 16 at a time; returns the names of those that exist now.
async fn create_pods(pods: &Api<Pod>, create: &[Pod], failures: &mut Failures) -> Vec<String> {
    let pp = crate::effects::post_params();
    let created: Vec<(String, std::result::Result<(), kube::Error>)> =
        stream::iter(create.iter().cloned())
            .map(|p| {
                let (pods, pp) = (pods.clone(), pp.clone());
                async move {
                    let r = tolerate(pods.create(&pp, &p).await, 409);
                    (p.metadata.name.clone().unwrap_or_default(), r)
                }
            })
            .buffer_unordered(16)
            .collect()
            .await;
    let mut exist = Vec::new();
    for (name, r) in created {
        if r.is_ok() {
            exist.push(name.clone());
        }
        failures.note(r, format!("creating pod {name}"));
    }
    exist
}

/// Deletes the plan's pods, 16 at a time: gracefully, or with grace period 0 where stuck.
async fn delete_pods(pods: &Api<Pod>, plan: &Plan, failures: &mut Failures) {
    let force = DeleteParams {
        grace_period_seconds: Some(0),
        ..Default::default()
    };
    let deletes: Vec<(String, DeleteParams)> = plan
        .delete_pods
        .iter()
        .map(|n| (n.clone(), DeleteParams::default()))
        .chain(
            plan.force_delete_pods
                .iter()
                .map(|n| (n.clone(), force.clone())),
        )
        .collect();
    let deleted: Vec<_> = stream::iter(deletes)
        .map(|(n, dp)| {
            let pods = pods.clone();
            async move {
                let r = tolerate(pods.delete(&n, &dp).await, 404);
                (n, r)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    for (name, r) in deleted {
        failures.note(r, format!("deleting pod {name}"));
    }
}

/// Server-side applies the ServiceAccount and Role of [`children::TrainerAccess`] (idempotent;
/// the Role follows the attempt's pod names). k8s-openapi objects serialize with their
/// apiVersion and kind, as an apply body needs.
async fn apply_trainer_access(
    ctx: &Context,
    ns: &str,
    access: &children::TrainerAccess,
) -> std::result::Result<(), kube::Error> {
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let name = access.role.metadata.name.clone().unwrap_or_default();
    let sa: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), ns);
    let roles: Api<Role> = Api::namespaced(ctx.client.clone(), ns);
    let (account, role) = (
        Patch::Apply(&access.service_account),
        Patch::Apply(&access.role),
    );
    futures::try_join!(
        sa.patch(&name, &params, &account),
        roles.patch(&name, &params, &role)
    )?;
    Ok(())
}

/// Server-side applies the RoleBinding of [`children::TrainerAccess`]. Only after its Role:
/// the API server refuses a RoleBinding whose Role it cannot find yet (its escalation check
/// reads the Role), with NotFound.
async fn bind_trainer(
    ctx: &Context,
    ns: &str,
    access: &children::TrainerAccess,
) -> std::result::Result<(), kube::Error> {
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let name = access.binding.metadata.name.clone().unwrap_or_default();
    let bindings: Api<RoleBinding> = Api::namespaced(ctx.client.clone(), ns);
    bindings
        .patch(&name, &params, &Patch::Apply(&access.binding))
        .await?;
    Ok(())
}

fn is_active(job: &TrainingJob) -> bool {
    let conds = job
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    !conditions::is_true(conds, ConditionType::Succeeded)
        && !conditions::is_true(conds, ConditionType::Failed)
}

/// Runs the TrainingJob controller until `shutdown` resolves.
pub async fn run_controller(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let ns = namespace.as_deref();
    let jobs: Api<TrainingJob> = crate::effects::scoped(&client, ns);
    let pods: Api<Pod> = crate::effects::scoped(&client, ns);
    let services: Api<Service> = crate::effects::scoped(&client, ns);
    let owned = watcher::Config::default().labels(&format!(
        "{}={}",
        children::LABEL_MANAGED_BY,
        children::MANAGER
    ));
    // The watches that wake jobs also fill the caches a pass reads.
    let workers = cache::WorkerIndex::default();
    let (service_store, service_writer) = reflector::store();
    let (node_store, node_writer) = reflector::store();
    let ctx = Arc::new(ctx.with_training_job_caches(cache::Caches {
        workers: workers.clone(),
        services: service_store,
        nodes: node_store,
    }));
    let worker_events = watcher(pods, owned.clone())
        .default_backoff()
        .modify(cache::slim_worker)
        .inspect_ok(move |e| workers.apply(e))
        .touched_objects();
    let service_events = watcher(services, owned.clone())
        .default_backoff()
        .modify(cache::slim)
        .reflect(service_writer)
        .touched_objects();
    let mut readiness = cache::ReadinessChanges::default();
    let node_events = watcher(Api::<Node>::all(client), watcher::Config::default())
        .default_backoff()
        .modify(cache::slim_node)
        .reflect(node_writer)
        .try_filter_map(move |e| futures::future::ready(Ok(readiness.filter(e))));
    let controller = Controller::new(jobs, watcher::Config::default().any_semantic()).with_config(
        ControllerConfig::default()
            .debounce(Duration::from_millis(200))
            .concurrency(8),
    );
    let store = controller.store();
    let mut controller = controller
        .owns_stream(worker_events)
        .owns_stream(service_events);
    if ctx.kueue {
        let workloads: Api<crate::kueue::Workload> = crate::effects::scoped(&ctx.client, ns);
        controller = controller.owns(workloads, owned);
    }
    let controller = controller
        // A node going away or turning not ready changes no pod (no kubelet reports), so such
        // node events wake every active job; the plan decides whether its workers were there.
        .watches_stream(node_events, move |_node| {
            store
                .state()
                .iter()
                .filter(|j| is_active(j))
                .map(|j| ObjectRef::from_obj(j.as_ref()))
                .collect::<Vec<_>>()
        });
    drive(controller, reconcile, ctx, shutdown, "TrainingJob").await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(ready: &str, taints: &[&str]) -> Node {
        let taints: Vec<_> = taints
            .iter()
            .map(|effect| serde_json::json!({"key": "node.kubernetes.io/unreachable", "effect": effect}))
            .collect();
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n"},
            "spec": {"taints": taints},
            "status": {"conditions": [{"type": "Ready", "status": ready}]},
        }))
        .unwrap()
    }

    #[test]
    fn a_node_is_lost_while_not_ready_and_back_once_ready_whatever_taint_lingers() {
        assert!(!node_ready(&node("Unknown", &["NoSchedule", "NoExecute"])));
        assert!(!node_ready(&node("False", &[])));
        assert!(node_ready(&node("True", &["NoExecute"])));
        assert!(node_ready(&node("True", &[])));
        assert!(!node_ready(&Node::default()));
    }
}
