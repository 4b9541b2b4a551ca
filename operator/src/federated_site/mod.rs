//! The FederatedSite controller (in a hospital's cluster): poll the exchange for the hub's newest
//! global model (checked against the hub's key) and this site's upload to that round, run the
//! round's fetch pod, local TrainingJob and contribute pod, write the status. [`plan`] decides;
//! this module observes and acts. Every call goes out from the site; nothing comes in.

pub mod plan;

use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use radfm_api::TrainingJob;
use radfm_api::federated::FederatedSite;
use radfm_federated::contribution;
use radfm_federated::exchange::{self, MAX_STATEMENT_BYTES};
use radfm_validation::report::Signed;
use tracing::info;

use crate::context::{Context, drive};
use crate::effects::{self, tolerate};
use crate::federated_training::plan::ExchangeError;
use crate::federated_training::pods::LABEL_FEDERATION_OWNER;
use crate::federated_training::{newest_round, open_exchange, unavailable};
use crate::{Error, Result};
use plan::{Observed, SiteView};

/// What the exchange shows `fs`.
async fn view(fs: &FederatedSite, ctx: &Context) -> Result<SiteView, ExchangeError> {
    let s = &fs.spec;
    let ns = fs.namespace().unwrap_or_default();
    let ex = open_exchange(
        &ctx.registry_access,
        &ns,
        &s.exchange.uri,
        s.federation.clone(),
    )?;
    let from = fs.status.as_ref().and_then(|st| st.round).unwrap_or(1);
    let Some(newest) = newest_round(&ex, from, Some(&s.hub_public_key)).await? else {
        return Ok(SiteView::default());
    };
    let key = exchange::statement_key(&s.site, newest.round);
    let mine = match ex
        .location
        .get_bounded(&key, MAX_STATEMENT_BYTES)
        .await
        .map_err(unavailable)?
    {
        None => None,
        Some(raw) => {
            let signed: Signed =
                serde_json::from_slice(&raw).map_err(|e| unavailable(format!("{key}: {e}")))?;
            Some(contribution::open(&signed).map_err(|e| unavailable(format!("{key}: {e}")))?)
        }
    };
    Ok(SiteView {
        newest: Some(newest),
        mine,
    })
}

/// Reconciles one FederatedSite.
#[tracing::instrument(skip_all, fields(fs = %fs.name_any()))]
pub async fn reconcile(fs: Arc<FederatedSite>, ctx: Arc<Context>) -> Result<Action> {
    let ns = fs
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let jobs: Api<TrainingJob> = Api::namespaced(ctx.client.clone(), &ns);
    let selector = format!("{LABEL_FEDERATION_OWNER}={}", fs.name_any());
    let exchange = view(&fs, &ctx).await;
    let job = match exchange.as_ref().ok().and_then(|v| v.newest.as_ref()) {
        Some(g) => jobs.get_opt(&plan::job_name(&fs, g.round)).await?,
        None => None,
    };
    let observed = Observed {
        exchange,
        job,
        pods: effects::list_owned(&pods, &selector, &fs.uid().unwrap_or_default())
            .await?
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect(),
        now: ctx.clock.now(),
    };
    let plan = plan::plan(&fs, &observed);
    effects::apply_pod_plan(&pods, &plan.delete_pods, plan.create_pod.as_ref()).await?;
    if let Some(job) = &plan.create_job {
        let pp = crate::effects::post_params();
        tolerate(jobs.create(&pp, job).await, 409)?;
        info!(job = %job.name_any(), "local training started");
    }
    let fss: Api<FederatedSite> = Api::namespaced(ctx.client.clone(), &ns);
    effects::apply_status(&fss, fs.as_ref(), fs.status.as_ref(), &plan.status).await?;
    effects::publish(&ctx.recorder, fs.as_ref(), "Federate", &plan.events).await;
    let wait = ctx
        .clock
        .requeue(observed.now, None)
        .min(plan.requeue_after);
    Ok(Action::requeue(wait))
}

/// Runs the FederatedSite controller until `shutdown` resolves.
pub async fn run_controller(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let fss: Api<FederatedSite> = effects::scoped(&ctx.client, namespace.as_deref());
    let pods: Api<Pod> = effects::scoped(&ctx.client, namespace.as_deref());
    let jobs: Api<TrainingJob> = effects::scoped(&ctx.client, namespace.as_deref());
    let controller = Controller::new(fss, watcher::Config::default().any_semantic())
        .owns(
            pods,
            watcher::Config::default().labels(LABEL_FEDERATION_OWNER),
        )
        .owns(
            jobs,
            watcher::Config::default().labels(LABEL_FEDERATION_OWNER),
        );
    drive(controller, reconcile, ctx, shutdown, "FederatedSite").await;
}
