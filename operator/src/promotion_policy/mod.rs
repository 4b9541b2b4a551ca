//! The PromotionPolicy controller (next to the registry): poll, run the gate
//! ([`radfm_validation::apply::gate`]) and show its decision ([`plan`]). The gate records
//! decisions in the registry's event log, and records a decision only when it changes.

pub mod plan;

use std::sync::Arc;

use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use radfm_api::site_validation::PromotionPolicy;
use radfm_registry::Governor;
use radfm_validation::apply;

use crate::context::{Context, drive};
use crate::effects;
use crate::site_validator::registry_error;
use crate::{Error, Result};

/// Reconciles one PromotionPolicy.
#[tracing::instrument(skip_all, fields(pp = %pp.name_any()))]
pub async fn reconcile(pp: Arc<PromotionPolicy>, ctx: Arc<Context>) -> Result<Action> {
    let ns = pp
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let now = ctx.clock.now();
    let by = format!("radfm-operator/{ns}/{}", pp.name_any());
    let gate = async {
        let reg = ctx.registry_access.open(&ns, &pp.spec.registry)?;
        let governor = Governor {
            namespace: ns.clone(),
            policy: pp.name_any(),
            production_alias: pp.spec.production_alias.clone(),
        };
        reg.govern(&pp.spec.model, &governor, &by)
            .await
            .map_err(|e| format!("registry: {e}"))?;
        apply::gate(&reg, &pp.spec, &by, now)
            .await
            .map_err(|e| registry_error(e).to_string())
    }
    .await;
    let plan = plan::plan(&pp, &gate, now);
    let api: Api<PromotionPolicy> = Api::namespaced(ctx.client.clone(), &ns);
    effects::apply_status(&api, pp.as_ref(), pp.status.as_ref(), &plan.status).await?;
    effects::publish(&ctx.recorder, pp.as_ref(), "Gate", &plan.events).await;
    Ok(Action::requeue(plan.requeue_after))
}

/// Runs the PromotionPolicy controller until `shutdown` resolves.
pub async fn run_controller(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let pps: Api<PromotionPolicy> = effects::scoped(&ctx.client, namespace.as_deref());
    let controller = Controller::new(pps, watcher::Config::default().any_semantic());
    drive(controller, reconcile, ctx, shutdown, "PromotionPolicy").await;
}
