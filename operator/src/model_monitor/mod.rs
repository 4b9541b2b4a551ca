//! The ModelMonitor controller (in a hospital's cluster): at each scheduled time, run a pod
//! ([`pod`]: `radfm monitor`, the site's signing key mounted from its Secret, the site's data
//! never leaving it) that looks at the deployed version; when the signed report of that look is
//! in the registry, show what it found in `Drifting`, events and metrics. [`plan`] decides;
//! this module observes and acts.
//!
//! The controller checks that a stored report verifies and speaks of this site, model and
//! version; whether its key is trusted is for whoever acts on it (the hub's ContinualTraining
//! holds the sites' public keys, as PromotionPolicy does).

pub mod plan;
pub mod pod;

use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use radfm_api::conditions::monitor_reason;
use radfm_api::monitoring::ModelMonitor;
use radfm_validation::monitor::MonitorReport;

use crate::context::{Context, drive};
use crate::continual_training::schedule::Schedule;
use crate::effects;
use crate::metrics::MonitorLabels;
use crate::registry_access::RegistryAccess;
use crate::site_validator::registry_error;
use crate::{Error, Result};
use plan::{Deployed, Found, Observed};
pub use pod::{LABEL_MONITOR, look_pod};

/// A stored report's content, if it verifies and speaks of this monitor's site, model and
/// `version`.
pub fn admit_report(
    mm: &ModelMonitor,
    version: u64,
    bytes: &[u8],
) -> std::result::Result<MonitorReport, String> {
    let s = &mm.spec;
    radfm_validation::monitor::open_stored(bytes, &s.site_id, &s.model, version)
        .map(|(_, r)| r)
        .map_err(|e| e.to_string())
}

/// The version the deployed alias points to and this site's report of it.
async fn deployed(mm: &ModelMonitor, access: &RegistryAccess) -> Result<Option<Deployed>> {
    let s = &mm.spec;
    let ns = mm.namespace().unwrap_or_default();
    let reg = access
        .open(&ns, &s.registry)
        .map_err(|reason| Error::Invalid {
            field: "spec.registry".into(),
            reason,
        })?;
    let aliases = reg.aliases(&s.model).await.map_err(registry_error)?;
    let Some(&version) = aliases.get(&s.deployed_alias) else {
        return Ok(None);
    };
    let report = reg
        .monitor_report(&s.model, version, &s.site_id)
        .await
        .map_err(registry_error)?
        .map(|(uri, bytes)| Found {
            uri,
            report: admit_report(mm, version, &bytes),
        });
    Ok(Some(Deployed { version, report }))
}

/// Reconciles one ModelMonitor.
#[tracing::instrument(skip_all, fields(mm = %mm.name_any()))]
pub async fn reconcile(mm: Arc<ModelMonitor>, ctx: Arc<Context>) -> Result<Action> {
    let ns = mm
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let selector = format!("{LABEL_MONITOR}={}", mm.name_any());
    let observed = Observed {
        schedule: Schedule::parse(&mm.spec.schedule, mm.spec.time_zone.as_deref())
            .map_err(|e| e.to_string()),
        deployed: deployed(&mm, &ctx.registry_access)
            .await
            .map_err(|e| e.to_string()),
        pods: effects::list_owned(&pods, &selector, &mm.uid().unwrap_or_default()).await?,
        now: ctx.clock.now(),
        policy_violation: mm
            .spec
            .data_volume
            .as_ref()
            .and_then(|v| ctx.pod_policy.check_volume("spec.dataVolume", v).err()),
    };
    let plan = plan::plan(&mm, &observed);
    effects::apply_pod_plan(&pods, &plan.delete_pods, plan.create_pod.as_ref()).await?;
    let mms: Api<ModelMonitor> = Api::namespaced(ctx.client.clone(), &ns);
    effects::apply_status(&mms, mm.as_ref(), mm.status.as_ref(), &plan.status).await?;
    effects::publish(&ctx.recorder, mm.as_ref(), "Monitor", &plan.events).await;
    let failed = plan
        .events
        .iter()
        .filter(|e| e.reason == monitor_reason::LOOK_FAILED)
        .count() as u64;
    let labels = MonitorLabels {
        namespace: ns,
        monitor: mm.name_any(),
        site: mm.spec.site_id.clone(),
        model: mm.spec.model.clone(),
    };
    ctx.metrics.observe_monitor(
        &labels,
        plan.status.last_look.as_ref(),
        &plan.recorded,
        failed,
    );
    Ok(match plan.requeue_after {
        Some(after) => Action::requeue(after.min(ctx.clock.requeue(observed.now, None))),
        None => Action::await_change(),
    })
}

/// Runs the ModelMonitor controller until `shutdown` resolves.
pub async fn run_controller(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let mms: Api<ModelMonitor> = effects::scoped(&ctx.client, namespace.as_deref());
    let pods: Api<Pod> = effects::scoped(&ctx.client, namespace.as_deref());
    let controller = Controller::new(mms, watcher::Config::default().any_semantic())
        .owns(pods, watcher::Config::default().labels(LABEL_MONITOR));
    drive(controller, reconcile, ctx, shutdown, "ModelMonitor").await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model_monitor::pod::tests::monitor;
    use radfm_validation::monitor::FORMAT;

    fn signed(site: &str, version: u64) -> Vec<u8> {
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let r = MonitorReport {
            format: FORMAT.into(),
            model: "chest".into(),
            version,
            weights_sha256: "w".into(),
            site: site.into(),
            reference_fingerprint: "a".into(),
            recent_fingerprint: "b".into(),
            created: "2026-12-06T06:00:40Z".into(),
            code_version: "0".into(),
            alpha: 0.01,
            watched: vec![],
            drifting: false,
            performance: Vec::new(),
            look: Some("north-1".into()),
        };
        serde_json::to_vec(&radfm_validation::monitor::sign(&r, &key)).unwrap()
    }

    #[test]
    fn a_stored_report_counts_only_if_it_verifies_and_speaks_of_this_site_and_version() {
        let mm = monitor("");
        assert!(admit_report(&mm, 3, &signed("north", 3)).is_ok());
        let other_site = admit_report(&mm, 3, &signed("south", 3)).unwrap_err();
        assert!(
            other_site.contains("at south, not chest v3 at north"),
            "{other_site}"
        );
        assert!(admit_report(&mm, 4, &signed("north", 3)).is_err());
        let mut tampered: serde_json::Value = serde_json::from_slice(&signed("north", 3)).unwrap();
        let payload = tampered["payload"]
            .as_str()
            .unwrap()
            .replace("\"drifting\":false", "\"drifting\":true");
        tampered["payload"] = payload.into();
        let refused = admit_report(&mm, 3, &serde_json::to_vec(&tampered).unwrap()).unwrap_err();
        assert!(refused.contains("signature"), "{refused}");
        assert!(
            admit_report(&mm, 3, b"{")
                .unwrap_err()
                .contains("not a signed report")
        );
    }
}
