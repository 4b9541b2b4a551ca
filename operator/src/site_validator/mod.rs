//! The SiteValidator controller (in a hospital's cluster): poll the registry; when the
//! candidate alias points to a version this site has not reported on, run a validation pod
//! ([`pod`]: `radfm validate`, the site's signing key mounted from its Secret, the site's data
//! never leaving it); when the report is in the registry, record it. A failed pod is deleted and
//! retried at the next poll. [`plan`] decides; this module observes and acts.

pub mod plan;
pub mod pod;

use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use radfm_api::site_validation::SiteValidator;

use crate::context::{Context, drive};
use crate::effects;
use crate::registry_access::RegistryAccess;
use crate::{Error, Result};
use plan::{Candidate, Observed};
pub use pod::{KEY_DIR, LABEL_VALIDATOR, LABEL_VERSION, validation_pod};

/// The registry's failure as the spec field it came through.
pub(crate) fn registry_error(e: impl std::fmt::Display) -> Error {
    Error::Invalid {
        field: "spec.registry".into(),
        reason: e.to_string(),
    }
}

/// The version this site should validate, and whether its report is in already.
async fn candidate(sv: &SiteValidator, access: &RegistryAccess) -> Result<Option<Candidate>> {
    let s = &sv.spec;
    let ns = sv.namespace().unwrap_or_default();
    let reg = access
        .open(&ns, &s.registry)
        .map_err(|reason| Error::Invalid {
            field: "spec.registry".into(),
            reason,
        })?;
    let aliases = reg.aliases(&s.model).await.map_err(registry_error)?;
    let Some(&version) = aliases.get(&s.candidate_alias) else {
        return Ok(None);
    };
    let reported = reg
        .report_sites(&s.model, version)
        .await
        .map_err(registry_error)?
        .contains(&s.site_id);
    // A candidate that is already the baseline needs no validation; if this site's report is
    // what promoted it (before this pass saw the report), the status still records it.
    if aliases.get(&s.baseline_alias) == Some(&version) && !reported {
        return Ok(None);
    }
    Ok(Some(Candidate { version, reported }))
}

/// Reconciles one SiteValidator.
#[tracing::instrument(skip_all, fields(sv = %sv.name_any()))]
pub async fn reconcile(sv: Arc<SiteValidator>, ctx: Arc<Context>) -> Result<Action> {
    let ns = sv
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let selector = format!("{LABEL_VALIDATOR}={}", sv.name_any());
    let observed = Observed {
        candidate: candidate(&sv, &ctx.registry_access)
            .await
            .map_err(|e| e.to_string()),
        pods: effects::list_owned(&pods, &selector, &sv.uid().unwrap_or_default()).await?,
        now: ctx.clock.now(),
        policy_violation: sv
            .spec
            .data_volume
            .as_ref()
            .and_then(|v| ctx.pod_policy.check_volume("spec.dataVolume", v).err()),
    };
    let plan = plan::plan(&sv, &observed);
    effects::apply_pod_plan(&pods, &plan.delete_pods, plan.create_pod.as_ref()).await?;
    let svs: Api<SiteValidator> = Api::namespaced(ctx.client.clone(), &ns);
    effects::apply_status(&svs, sv.as_ref(), sv.status.as_ref(), &plan.status).await?;
    effects::publish(&ctx.recorder, sv.as_ref(), "Validate", &plan.events).await;
    Ok(Action::requeue(plan.requeue_after))
}

/// Runs the SiteValidator controller until `shutdown` resolves.
pub async fn run_controller(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let svs: Api<SiteValidator> = effects::scoped(&ctx.client, namespace.as_deref());
    let pods: Api<Pod> = effects::scoped(&ctx.client, namespace.as_deref());
    let controller = Controller::new(svs, watcher::Config::default().any_semantic())
        .owns(pods, watcher::Config::default().labels(LABEL_VALIDATOR));
    drive(controller, reconcile, ctx, shutdown, "SiteValidator").await;
}
