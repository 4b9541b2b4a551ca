//! The ContinualTraining controller: the thin layer around [`plan`].
//!
//! One pass: observe the runs (TrainingJobs labelled with this resource), register every
//! successful run that is not registered yet (idempotent through the job uid recorded in the
//! version), read the dataset index and base model when the schedule is due, then carry out the
//! plan: annotate registered runs, prune history, replace and create runs. The status is written
//! once by server-side apply, events after it.
//!
//! Registration and the watermark form one logical step: the registry version (create-only,
//! carrying the job uid) is the commit point, and the status is derived from it. A crash between
//! the two is repaired by the next pass, which finds the version by the job's uid instead of
//! registering a second one.

pub mod plan;
pub mod schedule;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use radfm_api::continual::{
    ANNOTATION_BASE_VERSION, ANNOTATION_SCHEDULED, ANNOTATION_TRIGGER, DriftTrigger,
    LABEL_CONTINUAL, MonitorSignal, RunTrigger, SiteDrift,
};
use radfm_api::{ContinualTraining, TrainingJob};
use radfm_registry::EventKind;
use radfm_validation::gate::{Decision, Outcome};
use radfm_validation::monitor::MonitorReport;
use tracing::{info, instrument, warn};

use crate::context::{Context, drive};
use crate::effects::{self, tolerate};
use crate::registry_access::RegistryAccess;
use crate::{Error, Result};
pub use plan::ANNOTATION_REGISTERED;
use plan::{
    BaseModel, BaseRef, DataError, DataSnapshot, DriftSnapshot, Observed, Plan, Registered,
    Registration, Requeue, Run,
};
use schedule::Due;

/// Reconciles one ContinualTraining.
#[instrument(skip_all, fields(ct = %ct.name_any(), namespace = ct.namespace().unwrap_or_default()))]
pub async fn reconcile(ct: Arc<ContinualTraining>, ctx: Arc<Context>) -> Result<Action> {
    if ct.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = ct
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let jobs: Api<TrainingJob> = Api::namespaced(ctx.client.clone(), &ns);
    let now = ctx.clock.now();
    let plan = match plan::settings(&ct) {
        Err(e) => plan::invalid(&ct, &e, now),
        Ok(settings) => {
            let observed = observe(&ct, &settings, &jobs, &ctx.registry_access, now).await?;
            plan::plan(&ct, &settings, &observed)
        }
    };
    apply(&ct, &jobs, &plan).await?;
    let cts: Api<ContinualTraining> = Api::namespaced(ctx.client.clone(), &ns);
    effects::apply_status(&cts, ct.as_ref(), ct.status.as_ref(), &plan.status).await?;
    effects::publish(&ctx.recorder, ct.as_ref(), "Schedule", &plan.events).await;
    Ok(match plan.requeue {
        Requeue::OnChange => Action::await_change(),
        Requeue::Soon => Action::requeue(Duration::from_secs(10)),
        Requeue::At(until) => Action::requeue(ctx.clock.requeue(now, until)),
    })
}

/// The runs, this pass's registrations (the commit point of a finished run), and the data when
/// the schedule fires.
async fn observe(
    ct: &ContinualTraining,
    settings: &plan::Settings,
    jobs: &Api<TrainingJob>,
    access: &RegistryAccess,
    now: jiff::Timestamp,
) -> Result<Observed> {
    let selector = format!("{LABEL_CONTINUAL}={}", ct.name_any());
    let uid = ct.uid().unwrap_or_default();
    let runs: Vec<Run> = effects::list_owned(jobs, &selector, &uid)
        .await?
        .into_iter()
        .map(Run::of)
        .collect();
    let mut registrations = Vec::new();
    for run in plan::to_register(&runs) {
        let outcome = register_run(ct, run, access).await.map_err(|e| {
            warn!(run = %run.name, error = %e, "registering the run's model");
            e.to_string()
        });
        registrations.push(Registration {
            run: run.name.clone(),
            outcome,
        });
    }
    let (mut data, mut trained) = (None, None);
    if let Some(Due::Fire { scheduled, missed }) = plan::due(ct, settings, now) {
        if missed > 0 {
            info!(%scheduled, missed, "missed scheduled times skipped (no catch-up)");
        }
        data = Some(match trained_in_registry(ct, access).await {
            Ok((found, returned)) => {
                trained = found;
                let base = plan::base_ref(ct, &registrations, trained.as_ref());
                read_data(ct, base, returned, access).await
            }
            Err(e) => Err(e),
        });
    }
    Ok(Observed {
        runs,
        registrations,
        data,
        trained,
        now,
    })
}

/// Carries out the plan's writes to runs, in order.
async fn apply(ct: &ContinualTraining, jobs: &Api<TrainingJob>, plan: &Plan) -> Result<()> {
    for (run, version) in &plan.annotate {
        let patch = serde_json::json!({"metadata": {"annotations": {ANNOTATION_REGISTERED: version.to_string()}}});
        jobs.patch(run, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    for old in plan.prune.iter().chain(&plan.replace) {
        info!(run = %old, "deleting run");
        tolerate(jobs.delete(old, &DeleteParams::background()).await, 404)?;
    }
    if let Some(job) = &plan.create {
        let pp = crate::effects::post_params();
        tolerate(jobs.create(&pp, job).await, 409)?;
        info!(run = %job.name_any(), ct = %ct.name_any(), "created run");
    }
    Ok(())
}

/// The dataset index's shards and the base model.
async fn read_data(
    ct: &ContinualTraining,
    base: Option<BaseRef>,
    returned: Vec<u64>,
    access: &RegistryAccess,
) -> std::result::Result<DataSnapshot, DataError> {
    let loc = radfm_data::store::Location::open(&ct.spec.dataset.uri)
        .map_err(|e| DataError::Store(format!("spec.dataset.uri: {e}")))?;
    let index = radfm_data::DatasetIndex::load(&loc)
        .await
        .map_err(|e| DataError::Store(format!("dataset index: {e}")))?;
    let drift = match &ct.spec.trigger.drift {
        Some(trigger) => drift_reports(ct, trigger, access).await?,
        None => DriftSnapshot::default(),
    };
    Ok(DataSnapshot {
        shards: index.shards.iter().map(|s| s.seq).collect(),
        base: base_model(ct, base, access).await,
        drift,
        returned,
    })
}

/// Versions of `model` whose newest gate decision is Reject, or that the gate rolled back from
/// production for harm (a later move of any alias to a version, such as a promotion by hand,
/// clears it).
async fn rejected_versions(
    reg: &radfm_registry::Registry,
    model: &str,
) -> std::result::Result<BTreeSet<u64>, radfm_registry::Error> {
    let mut rejected: BTreeMap<u64, bool> = BTreeMap::new();
    for e in reg.events(model).await? {
        match e.kind {
            EventKind::Note { version: Some(v) } => {
                let Some(body) = reg.decision(model, e.seq).await? else {
                    continue;
                };
                if let Ok(d) = serde_json::from_slice::<Decision>(&body) {
                    rejected.insert(v, d.outcome == Outcome::Reject);
                }
            }
            EventKind::AliasMoved { to, from, .. } => {
                rejected.insert(to, false);
                let Some(body) = reg.decision(model, e.seq).await? else {
                    continue;
                };
                let d = serde_json::from_slice::<Decision>(&body).ok();
                if let (Some(d), Some(from)) = (d, from)
                    && d.outcome == Outcome::Rollback
                {
                    rejected.insert(from, true);
                }
            }
            _ => {}
        }
    }
    Ok(rejected
        .into_iter()
        .filter_map(|(v, r)| r.then_some(v))
        .collect())
}

/// The trusted sites' monitor reports of the monitored version that drifted since the last
/// successful run, and the reports that do not count with the reason.
async fn drift_reports(
    ct: &ContinualTraining,
    trigger: &DriftTrigger,
    access: &RegistryAccess,
) -> std::result::Result<DriftSnapshot, DataError> {
    let store = |e: radfm_registry::Error| DataError::Store(format!("registry: {e}"));
    let ns = ct.namespace().unwrap_or_default();
    let reg = access
        .open(&ns, &ct.spec.registry)
        .map_err(DataError::Store)?;
    let model = ct
        .spec
        .base_model
        .as_ref()
        .map_or(&ct.spec.register.model, |b| &b.model);
    if !reg.exists(model).await.map_err(store)? {
        return Ok(DriftSnapshot::default());
    }
    let Some(&version) = reg.aliases(model).await.map_err(store)?.get(&trigger.alias) else {
        return Ok(DriftSnapshot::default());
    };
    let since = ct
        .status
        .as_ref()
        .and_then(|s| s.last_successful_time.as_ref())
        .map(|t| t.0);
    let mut out = DriftSnapshot::default();
    for (site, uri, bytes) in reg.monitor_reports(model, version).await.map_err(store)? {
        match admit_drift(trigger, model, version, &site, &bytes) {
            Err(why) => out.refused.push(format!("{uri}: {why}")),
            Ok(None) => {}
            Ok(Some(r)) => {
                let created: Option<jiff::Timestamp> = r.created.parse().ok();
                if since.is_some_and(|s| created.is_none_or(|c| c <= s)) {
                    continue;
                }
                out.drifting.push(SiteDrift {
                    site: r.site.clone(),
                    model: r.model.clone(),
                    version: r.version,
                    report: uri,
                    created: r.created.clone(),
                    evidence: counted_evidence(trigger.signal, &r),
                });
            }
        }
    }
    Ok(out)
}

/// A stored monitor report as the drift trigger sees it: refused (with the reason) unless it is
/// signed by the trusted key of the site it is stored for and speaks of `model` `version`;
/// `None` when it found nothing of the trigger's signal.
pub fn admit_drift(
    trigger: &DriftTrigger,
    model: &str,
    version: u64,
    site: &str,
    bytes: &[u8],
) -> std::result::Result<Option<MonitorReport>, String> {
    let trusted = trigger
        .trusted_sites
        .iter()
        .find(|t| t.site == site)
        .ok_or_else(|| format!("site {site} is not in trigger.drift.trustedSites"))?;
    let (signed, r) = radfm_validation::monitor::open_stored(bytes, site, model, version)
        .map_err(|e| e.to_string())?;
    if !signed.public_key.eq_ignore_ascii_case(&trusted.public_key) {
        return Err(format!("not signed with {site}'s trusted key"));
    }
    Ok((!counted_evidence(trigger.signal, &r).is_empty()).then_some(r))
}

/// A report's findings that count for `signal`, as the report words them.
fn counted_evidence(signal: MonitorSignal, r: &MonitorReport) -> Vec<String> {
    let performance = |e: &String| e.starts_with(radfm_validation::monitor::PERFORMANCE);
    let evidence = r.evidence().into_iter();
    match signal {
        MonitorSignal::Any => evidence.collect(),
        MonitorSignal::Drift => evidence.filter(|e| !performance(e)).collect(),
        MonitorSignal::PerformanceDrop => evidence.filter(performance).collect(),
    }
}

/// The registry's record of what `spec.register.model` was trained on from `spec.dataset.uri`
/// (None: no such version yet), and the shards of that dataset which only rejected versions
/// trained on as new data: a candidate the gate refused does not consume its data. One listing
/// of the versions serves both.
async fn trained_in_registry(
    ct: &ContinualTraining,
    access: &RegistryAccess,
) -> std::result::Result<(Option<plan::Trained>, Vec<u64>), DataError> {
    let store = |e: radfm_registry::Error| DataError::Store(format!("registry: {e}"));
    let ns = ct.namespace().unwrap_or_default();
    let reg = access
        .open(&ns, &ct.spec.registry)
        .map_err(DataError::Store)?;
    let model = &ct.spec.register.model;
    if !reg.exists(model).await.map_err(store)? {
        return Ok((None, Vec::new()));
    }
    let rejected = rejected_versions(&reg, model).await.map_err(store)?;
    let (mut kept, mut back) = (BTreeSet::new(), BTreeSet::new());
    let mut trained: Option<plan::Trained> = None;
    for v in reg.versions(model).await.map_err(store)? {
        if v.spec.data.index_uri != ct.spec.dataset.uri {
            continue;
        }
        let seqs = v.spec.data.shards.iter().map(|s| s.seq);
        if rejected.contains(&v.version) {
            back.extend(seqs.clone().filter(|s| !v.spec.data.replayed.contains(s)));
        } else {
            kept.extend(seqs.clone());
        }
        let last_seq = seqs.max().unwrap_or(v.spec.data.last_seq);
        let created = v.created.parse().map_err(|e| {
            DataError::Store(format!(
                "registry: {model} v{} created {:?}: {e}",
                v.version, v.created
            ))
        })?;
        let t = trained.get_or_insert(plan::Trained {
            version: v.version,
            created,
            last_seq,
        });
        t.last_seq = t.last_seq.max(last_seq);
        if v.version > t.version {
            (t.version, t.created) = (v.version, created);
        }
    }
    Ok((trained, back.difference(&kept).copied().collect()))
}

/// The exported folder and version `base` names (None: random initialisation, also where
/// spec.baseModel's model does not exist yet).
async fn base_model(
    ct: &ContinualTraining,
    base: Option<BaseRef>,
    access: &RegistryAccess,
) -> std::result::Result<Option<BaseModel>, DataError> {
    let store = |e: radfm_registry::Error| DataError::Store(format!("registry: {e}"));
    let Some(base) = base else {
        return Ok(None);
    };
    let ns = ct.namespace().unwrap_or_default();
    let reg = access
        .open(&ns, &ct.spec.registry)
        .map_err(DataError::Store)?;
    let (model, version) = match base {
        BaseRef::Version { model, version } => (model, version),
        BaseRef::Alias { model, alias } => {
            if !reg.exists(&model).await.map_err(store)? {
                return Ok(None);
            }
            match reg.resolve(&model, &alias).await {
                Ok(v) => (model, v),
                Err(radfm_registry::Error::NotFound(m)) => {
                    return Err(DataError::BaseMissing(format!("spec.baseModel: {m}")));
                }
                Err(e) => return Err(store(e)),
            }
        }
    };
    let found = reg.version(&model, version).await.map_err(store)?;
    let folder = found
        .spec
        .weights_uri
        .trim_end_matches(radfm_api::export_files::WEIGHTS)
        .trim_end_matches('/')
        .to_string();
    Ok(Some(BaseModel {
        folder,
        model,
        version,
    }))
}

/// Registers a successful run's export (or finds the version registered by an earlier pass).
/// Returns the version and whether it was registered now.
async fn register_run(
    ct: &ContinualTraining,
    run: &Run,
    access: &RegistryAccess,
) -> Result<Registered> {
    let job = &run.job;
    let invalid = |field: &str, reason: String| Error::Invalid {
        field: format!("{}: {field}", job.name_any()),
        reason,
    };
    let reg_err = |e: radfm_registry::Error| invalid("registry", e.to_string());
    let ns = ct.namespace().unwrap_or_default();
    let reg = access
        .open(&ns, &ct.spec.registry)
        .map_err(|reason| invalid("spec.registry", reason))?;
    let model = &ct.spec.register.model;
    let alias = &ct.spec.register.alias;
    let by = format!("radfm-operator/{ns}/{}", ct.name_any());
    // A ContinualTraining registers candidates only: the model must be this namespace's, and
    // the alias not the one its governing PromotionPolicy promotes to.
    let log = reg.claim(model, &ns, &by).await.map_err(reg_err)?;
    radfm_registry::check_alias_free(&log, model, alias)
        .map_err(|e| invalid("spec.register.alias", e.to_string()))?;
    let uid = job.uid().unwrap_or_default();
    if let Some(v) = reg.find_by_job(model, &uid).await.map_err(reg_err)? {
        // Registered by a pass that stopped before recording it; make sure the alias moved too.
        if !radfm_registry::alias_history(&log, alias)
            .iter()
            .any(|(_, to)| *to == v.version)
        {
            reg.move_alias(
                model,
                alias,
                v.version,
                None,
                &by,
                "completing an interrupted registration",
            )
            .await
            .map_err(reg_err)?;
        }
        return Ok(Registered {
            version: v.version,
            fresh: false,
        });
    }
    let export = job
        .spec
        .export
        .as_ref()
        .ok_or_else(|| invalid("spec.export", "the run has no export folder".into()))?;
    let mut spec = radfm_registry::from_export(&export.uri)
        .await
        .map_err(reg_err)?;
    let reason = record_run(ct, run, &mut spec);
    let v = reg
        .register(model, spec, &by, &reason, Some(alias))
        .await
        .map_err(reg_err)?;
    Ok(Registered {
        version: v.version,
        fresh: true,
    })
}

/// Fills in what the run knows about the version (parent, job, replay, trigger) and returns the
/// registry reason.
fn record_run(ct: &ContinualTraining, run: &Run, spec: &mut radfm_registry::NewVersion) -> String {
    let job = &run.job;
    let window = run.window();
    let base = run.annotation(ANNOTATION_BASE_VERSION).and_then(|b| {
        let (m, v) = b.rsplit_once(':')?;
        Some((m.to_string(), v.parse::<u64>().ok()?))
    });
    let model = &ct.spec.register.model;
    spec.parent = base.as_ref().filter(|(m, _)| m == model).map(|(_, v)| *v);
    spec.job_name = Some(job.name_any());
    spec.job_uid = job.uid();
    spec.data.replayed = window.replay.clone();
    let trigger: Option<RunTrigger> = run
        .annotation(ANNOTATION_TRIGGER)
        .and_then(|t| serde_json::from_str(t).ok());
    let why = trigger
        .as_ref()
        .map_or(String::new(), |t| format!("; triggered by {}", t.summary));
    spec.trigger = trigger;
    format!(
        "continual training {}/{}: run {} scheduled {}; {} new shard(s) {}, {} replayed; from {}{why}",
        ct.namespace().unwrap_or_default(),
        ct.name_any(),
        job.name_any(),
        run.annotation(ANNOTATION_SCHEDULED).unwrap_or("?"),
        window.new.len(),
        radfm_api::trainingjob::format_shards(&window.new),
        window.replay.len(),
        base.map_or("random initialisation".into(), |(m, v)| format!("{m} v{v}")),
    )
}

/// Runs the ContinualTraining controller until `shutdown` resolves.
pub async fn run_controller(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client: &Client = &ctx.client;
    let cts: Api<ContinualTraining> = effects::scoped(client, namespace.as_deref());
    let jobs: Api<TrainingJob> = effects::scoped(client, namespace.as_deref());
    let controller = Controller::new(cts, watcher::Config::default().any_semantic())
        .with_config(
            ControllerConfig::default()
                .debounce(Duration::from_millis(200))
                .concurrency(4),
        )
        .owns(jobs, watcher::Config::default().labels(LABEL_CONTINUAL));
    drive(controller, reconcile, ctx, shutdown, "ContinualTraining").await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use radfm_validation::monitor::FORMAT;

    fn key(seed: u8) -> ed25519_dalek::SigningKey {
        ed25519_dalek::SigningKey::from_bytes(&[seed; 32])
    }

    fn trigger() -> DriftTrigger {
        let public = hex::encode(key(1).verifying_key().to_bytes());
        serde_yaml_ng::from_str(&format!(
            "{{trustedSites: [{{site: north, publicKey: '{public}'}}]}}"
        ))
        .unwrap()
    }

    fn stored(signer: u8, site: &str, version: u64, drifting: bool) -> Vec<u8> {
        let watched = if drifting {
            vec![watched("embeddings")]
        } else {
            Vec::new()
        };
        stored_with(signer, site, version, watched)
    }

    fn watched(name: &str) -> radfm_validation::monitor::Watched {
        let test = radfm_validation::drift::DriftTest {
            statistic: 0.5,
            p_value: 0.0001,
            permutations: 9999,
            reference: 100,
            recent: 100,
        };
        radfm_validation::monitor::Watched {
            name: name.into(),
            test,
            adjusted_p: 0.0002,
            drifting: true,
        }
    }

    fn stored_with(
        signer: u8,
        site: &str,
        version: u64,
        watched: Vec<radfm_validation::monitor::Watched>,
    ) -> Vec<u8> {
        let drifting = !watched.is_empty();
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
            watched,
            drifting,
            performance: Vec::new(),
            look: None,
        };
        serde_json::to_vec(&radfm_validation::monitor::sign(&r, &key(signer))).unwrap()
    }

    #[tokio::test]
    async fn a_version_is_rejected_while_its_newest_decision_is_reject_or_a_rollback_and_no_alias_moved_to_it()
     {
        let dir = tempfile::tempdir().unwrap();
        let reg = radfm_registry::Registry::open(dir.path().to_str().unwrap()).unwrap();
        for _ in 0..3 {
            let spec = radfm_registry::NewVersion {
                weights_uri: "file:///m".into(),
                ..Default::default()
            };
            reg.register("chest", spec, "ci", "trained", None)
                .await
                .unwrap();
        }
        let decide = |version: u64, outcome: &str| {
            let reg = &reg;
            let outcome = outcome.to_string();
            async move {
                let e = reg
                    .note("chest", Some(version), "gate", "decided")
                    .await
                    .unwrap();
                let body = serde_json::json!({
                    "model": "chest", "candidate": version, "baseline": 1,
                    "outcome": outcome, "reasons": [], "sites": [], "reports": [],
                });
                reg.put_decision("chest", e.seq, serde_json::to_vec(&body).unwrap())
                    .await
                    .unwrap();
            }
        };
        decide(2, "HoldForReview").await;
        decide(2, "Reject").await;
        decide(3, "Reject").await;
        assert_eq!(
            rejected_versions(&reg, "chest").await.unwrap(),
            BTreeSet::from([2, 3])
        );
        // v3 promoted by hand after all: its data is consumed.
        reg.move_alias("chest", "production", 3, None, "dr-alice", "override")
            .await
            .unwrap();
        assert_eq!(
            rejected_versions(&reg, "chest").await.unwrap(),
            BTreeSet::from([2])
        );
        // v3 harmed patients after all and the gate rolled production back: its data returns.
        let back = reg
            .move_alias("chest", "production", 1, Some(3), "gate", "Rollback v3 ...")
            .await
            .unwrap();
        let body = serde_json::json!({
            "model": "chest", "candidate": 3, "baseline": 1,
            "outcome": "Rollback", "reasons": [], "sites": [], "reports": [],
        });
        reg.put_decision("chest", back.seq, serde_json::to_vec(&body).unwrap())
            .await
            .unwrap();
        assert_eq!(
            rejected_versions(&reg, "chest").await.unwrap(),
            BTreeSet::from([2, 3])
        );
    }

    #[test]
    fn only_a_trusted_sites_own_signed_report_of_the_monitored_version_counts_as_drift() {
        let t = trigger();
        let admit = |site: &str, bytes: Vec<u8>| admit_drift(&t, "chest", 3, site, &bytes);
        assert!(
            admit("north", stored(1, "north", 3, true))
                .unwrap()
                .is_some()
        );
        assert!(
            admit("north", stored(1, "north", 3, false))
                .unwrap()
                .is_none()
        );
        let refusals = [
            (
                admit("east", stored(1, "east", 3, true)),
                "not in trigger.drift.trustedSites",
            ),
            (
                admit("north", stored(2, "north", 3, true)),
                "not signed with north's trusted key",
            ),
            (
                admit("north", stored(1, "north", 2, true)),
                "not chest v3 at north",
            ),
            (admit("north", b"{".to_vec()), "not a signed report"),
        ];
        for (got, want) in refusals {
            let e = got.unwrap_err();
            assert!(e.contains(want), "{e} should say {want}");
        }
        // A verdict edited after signing is refused by the signature.
        let mut edited: serde_json::Value =
            serde_json::from_slice(&stored(1, "north", 3, false)).unwrap();
        let payload = edited["payload"]
            .as_str()
            .unwrap()
            .replace("\"drifting\":false", "\"drifting\":true");
        edited["payload"] = payload.into();
        let e = admit("north", serde_json::to_vec(&edited).unwrap()).unwrap_err();
        assert!(e.contains("signature"), "{e}");
    }

    #[test]
    fn a_trigger_counts_only_the_signal_it_names_and_attaches_only_that_evidence() {
        let drift = stored_with(1, "north", 3, vec![watched("metadata:manufacturer")]);
        let drop = stored_with(1, "north", 3, vec![watched("performance:lesion:sex=F")]);
        let cases = [
            (MonitorSignal::Any, &drift, Some("metadata:manufacturer")),
            (MonitorSignal::Any, &drop, Some("performance:lesion:sex=F")),
            (MonitorSignal::Drift, &drift, Some("metadata:manufacturer")),
            (MonitorSignal::Drift, &drop, None),
            (MonitorSignal::PerformanceDrop, &drift, None),
            (
                MonitorSignal::PerformanceDrop,
                &drop,
                Some("performance:lesion:sex=F"),
            ),
        ];
        for (signal, bytes, want) in cases {
            let t = DriftTrigger {
                signal,
                ..trigger()
            };
            let got = admit_drift(&t, "chest", 3, "north", bytes).unwrap();
            let evidence = got.map(|r| counted_evidence(signal, &r));
            match want {
                None => assert_eq!(evidence, None, "{signal:?}"),
                Some(name) => {
                    let evidence = evidence.unwrap();
                    assert_eq!(evidence.len(), 1, "{signal:?}: {evidence:?}");
                    assert!(evidence[0].starts_with(name), "{signal:?}: {evidence:?}");
                }
            }
        }
        let both = stored_with(
            1,
            "north",
            3,
            vec![watched("embeddings"), watched("performance:lesion")],
        );
        let r = admit_drift(&trigger(), "chest", 3, "north", &both)
            .unwrap()
            .unwrap();
        assert_eq!(counted_evidence(MonitorSignal::Any, &r).len(), 2);
    }
}
