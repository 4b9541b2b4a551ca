//! The FederatedTraining controller (in the hub's cluster): read the exchange (the newest
//! published round, the sites' uploads to it, the hub's records of closed rounds), run the
//! publish and aggregate pods, write the status. [`plan`] decides; this module observes and
//! acts. The operator reads the exchange with its own store credentials, within the cluster's
//! registry allowances; only the pods hold the hub's signing key.

pub mod plan;
pub mod pods;

use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use radfm_api::conditions::{continual_reason, federated_reason};
use radfm_api::federated::FederatedTraining;
use radfm_data::store::Location;
use radfm_federated::exchange::{self, Exchange};

use crate::context::{Context, drive};
use crate::effects;
use crate::registry_access::RegistryAccess;
use crate::{Error, Result};
use plan::{ExchangeError, ExchangeView, Observed};
use pods::LABEL_FEDERATION_OWNER;

/// Largest model the operator would read (it reads statements only).
const NO_MODELS: usize = 0;

/// Opens a federation's exchange for `namespace`, if the cluster's allowances cover it.
pub fn open_exchange(
    access: &RegistryAccess,
    namespace: &str,
    uri: &str,
    federation: String,
) -> Result<Exchange, ExchangeError> {
    access
        .check_store("exchange", namespace, uri)
        .map_err(|message| ExchangeError {
            reason: continual_reason::INVALID_SPEC,
            message,
        })?;
    let location = Location::open(uri).map_err(|e| ExchangeError {
        reason: continual_reason::INVALID_SPEC,
        message: format!("spec.exchange.uri: {e}"),
    })?;
    Ok(Exchange {
        location,
        federation,
        max_model_bytes: NO_MODELS,
    })
}

/// A store failure as the status reports it.
pub fn unavailable(e: impl std::fmt::Display) -> ExchangeError {
    ExchangeError {
        reason: federated_reason::EXCHANGE_UNAVAILABLE,
        message: format!("exchange: {e}"),
    }
}

/// The newest round published at or after `from` (rounds are published in order).
pub async fn newest_round(
    ex: &Exchange,
    from: u32,
    hub_key: Option<&str>,
) -> Result<Option<exchange::GlobalStatement>, ExchangeError> {
    let mut newest = None;
    let mut round = from.max(1);
    while let Some(s) = ex
        .global_statement(round, hub_key)
        .await
        .map_err(unavailable)?
    {
        newest = Some(s);
        round += 1;
    }
    if newest.is_none() && from > 1 {
        return Box::pin(newest_round(ex, 1, hub_key)).await;
    }
    Ok(newest)
}

/// What the exchange shows for `ft`.
async fn view(ft: &FederatedTraining, ctx: &Context) -> Result<ExchangeView, ExchangeError> {
    let ns = ft.namespace().unwrap_or_default();
    let ex = open_exchange(
        &ctx.registry_access,
        &ns,
        &ft.spec.exchange.uri,
        plan::federation(ft),
    )?;
    let status = ft.status.clone().unwrap_or_default();
    let Some(newest) = newest_round(&ex, status.round.unwrap_or(1), None).await? else {
        return Ok(ExchangeView {
            base: Some(base_model(ft, &ctx.registry_access).await?),
            ..ExchangeView::default()
        });
    };
    let registered = match &ft.spec.register {
        Some(r) if newest.round > ft.spec.rounds => {
            let reg = registry(ft, &ctx.registry_access)?;
            let uid = radfm_registry::federated::result_uid(&plan::federation(ft), &newest.digest);
            let found = reg.find_by_job(&r.model, &uid).await.map_err(unavailable)?;
            found.map(|v| v.version)
        }
        _ => None,
    };
    let mut uploaded = std::collections::BTreeSet::new();
    let open_round = newest.round <= ft.spec.rounds;
    for site in ft.spec.sites.iter().filter(|_| open_round) {
        let key = exchange::statement_key(&site.name, newest.round);
        if ex
            .location
            .head_opt(&key)
            .await
            .map_err(unavailable)?
            .is_some()
        {
            uploaded.insert(site.name.clone());
        }
    }
    let mut records = Vec::new();
    for round in 1..newest.round {
        if status.rounds.iter().any(|r| r.round == round) {
            continue;
        }
        if let Some(r) = ex.round_record(round, None).await.map_err(unavailable)? {
            records.push(r);
        }
    }
    Ok(ExchangeView {
        published: Some((newest.round, newest.digest)),
        uploaded,
        records,
        base: None,
        registered,
    })
}

/// The federation's registry, if the cluster's allowances cover it.
fn registry(
    ft: &FederatedTraining,
    access: &RegistryAccess,
) -> Result<radfm_registry::Registry, ExchangeError> {
    let invalid = |message: String| ExchangeError {
        reason: continual_reason::INVALID_SPEC,
        message,
    };
    let uri = ft
        .spec
        .registry
        .as_deref()
        .ok_or_else(|| invalid("spec.registry is not set".into()))?;
    access
        .open(&ft.namespace().unwrap_or_default(), uri)
        .map_err(invalid)
}

/// The model round 1 is published from: the URI, or the registered version's exported folder.
async fn base_model(
    ft: &FederatedTraining,
    access: &RegistryAccess,
) -> Result<(String, Option<u64>), ExchangeError> {
    let base = &ft.spec.base_model;
    if let Some(uri) = &base.uri {
        return Ok((uri.clone(), None));
    }
    let Some(r) = &base.registered else {
        return Err(ExchangeError {
            reason: continual_reason::INVALID_SPEC,
            message: "spec.baseModel names neither uri nor registered".into(),
        });
    };
    let reg = registry(ft, access)?;
    let version = reg.resolve(&r.model, &r.alias).await.map_err(|e| match e {
        radfm_registry::Error::NotFound(what) => ExchangeError {
            reason: continual_reason::BASE_MODEL_MISSING,
            message: format!("spec.baseModel.registered: {what}"),
        },
        e => unavailable(e),
    })?;
    let v = reg.version(&r.model, version).await.map_err(unavailable)?;
    let folder = v
        .spec
        .weights_uri
        .rsplit_once('/')
        .map_or(v.spec.weights_uri.clone(), |(folder, _)| folder.to_string());
    Ok((folder, Some(version)))
}

/// Reconciles one FederatedTraining.
#[tracing::instrument(skip_all, fields(ft = %ft.name_any()))]
pub async fn reconcile(ft: Arc<FederatedTraining>, ctx: Arc<Context>) -> Result<Action> {
    let ns = ft
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let selector = format!("{LABEL_FEDERATION_OWNER}={}", ft.name_any());
    let finished = ft
        .status
        .as_ref()
        .and_then(|s| s.phase)
        .is_some_and(|p| p.is_finished());
    // A finished federation's plan looks at nothing in the exchange.
    let exchange = match finished {
        true => Ok(ExchangeView::default()),
        false => view(&ft, &ctx).await,
    };
    let observed = Observed {
        exchange,
        pods: effects::list_owned(&pods, &selector, &ft.uid().unwrap_or_default())
            .await?
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect(),
        now: ctx.clock.now(),
    };
    let plan = plan::plan(&ft, &observed);
    effects::apply_pod_plan(&pods, &plan.delete_pods, plan.create_pod.as_ref()).await?;
    let fts: Api<FederatedTraining> = Api::namespaced(ctx.client.clone(), &ns);
    effects::apply_status(&fts, ft.as_ref(), ft.status.as_ref(), &plan.status).await?;
    effects::publish(&ctx.recorder, ft.as_ref(), "Federate", &plan.events).await;
    Ok(match plan.requeue_after {
        Some(d) => Action::requeue(ctx.clock.requeue(observed.now, None).min(d)),
        None => Action::await_change(),
    })
}

/// Runs the FederatedTraining controller until `shutdown` resolves.
pub async fn run_controller(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let fts: Api<FederatedTraining> = effects::scoped(&ctx.client, namespace.as_deref());
    let pods: Api<Pod> = effects::scoped(&ctx.client, namespace.as_deref());
    let controller = Controller::new(fts, watcher::Config::default().any_semantic()).owns(
        pods,
        watcher::Config::default().labels(LABEL_FEDERATION_OWNER),
    );
    drive(controller, reconcile, ctx, shutdown, "FederatedTraining").await;
}
