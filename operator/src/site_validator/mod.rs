//! Controllers of decentralised validation.
//!
//! `SiteValidator` (in a hospital's cluster): poll the registry; when the candidate alias points
//! to a version this site has not reported on, run a validation pod (`radfm validate`, the site's
//! signing key mounted from its Secret, the site's data never leaving it); when the report is in
//! the registry, record it. A failed pod is deleted and retried at the next poll.
//!
//! `PromotionPolicy` (next to the registry): poll, run the gate
//! ([`radfm_validation::apply::gate`]) and show its decision. The gate records decisions in the
//! registry's event log, and records a decision only when it changes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{
    Container, EnvFromSource, EnvVar, Pod, PodSpec, SecretEnvSource, SecretVolumeSource, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use radfm_api::conditions::{self, ValidationConditionType as Cond, validation_reason};
use radfm_api::validation::{
    ANNOTATION_APPROVE, DATA_MOUNT_PATH, DecisionStatus, PromotionPolicy, PromotionPolicyStatus,
    SiteValidator, SiteValidatorStatus,
};
use radfm_registry::Registry;
use radfm_validation::apply::{self, Gated};
use tracing::{info, warn};

use crate::effects::{self, PlannedEvent};
use crate::training_job::FIELD_MANAGER;
use crate::{Error, Result};

/// Label on validation pods: the SiteValidator's name.
pub const LABEL_VALIDATOR: &str = "radfm.io/site-validator";
/// Label on validation pods: the version validated.
pub const LABEL_VERSION: &str = "radfm.io/model-version";
/// Where the signing key is mounted in validation pods.
pub const KEY_DIR: &str = "/var/run/radfm/signing-key";

/// Shared state of both controllers.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Event recorder.
    pub recorder: Recorder,
}

fn registry_error(e: impl std::fmt::Display) -> Error {
    Error::Invalid {
        field: "spec.registry".into(),
        reason: e.to_string(),
    }
}

/// The validation pod's volumes and mounts: the signing key (mode 0400, readable through the
/// pod's fsGroup) and, where the site keeps its data on a volume, that volume read-only at
/// [`DATA_MOUNT_PATH`].
fn validation_volumes(sv: &SiteValidator) -> (Vec<Volume>, Vec<VolumeMount>) {
    let mut volumes = vec![Volume {
        name: "signing-key".into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(sv.spec.signing_key_secret_ref.name.clone()),
            default_mode: Some(0o400),
            ..Default::default()
        }),
        ..Default::default()
    }];
    let mut mounts = vec![VolumeMount {
        name: "signing-key".into(),
        mount_path: KEY_DIR.into(),
        read_only: Some(true),
        ..Default::default()
    }];
    if let Some(data) = &sv.spec.data_volume {
        volumes.push(Volume {
            name: "site-data".into(),
            ..data.clone()
        });
        mounts.push(VolumeMount {
            name: "site-data".into(),
            mount_path: DATA_MOUNT_PATH.into(),
            read_only: Some(true),
            ..Default::default()
        });
    }
    (volumes, mounts)
}

/// The validation pod of `version` for `sv`: `radfm validate` with the site's settings.
pub fn validation_pod(sv: &SiteValidator, version: u64) -> Pod {
    let s = &sv.spec;
    let name = format!("{}-v{version}", sv.name_any());
    let mut args = vec![
        "validate".to_string(),
        "--registry".into(),
        s.registry.clone(),
        "--model".into(),
        s.model.clone(),
        "--site".into(),
        s.site_id.clone(),
        "--dataset".into(),
        s.dataset.uri.clone(),
        "--candidate".into(),
        version.to_string(),
        "--baseline".into(),
        s.baseline_alias.clone(),
        "--min-cell".into(),
        s.min_cell_size.to_string(),
        "--subgroups".into(),
        s.subgroups.join(","),
    ];
    for t in &s.tasks {
        args.push("--task".into());
        args.push(t.name());
    }
    let env_from: Vec<EnvFromSource> = [
        s.credentials_secret_ref.as_ref(),
        s.dataset.credentials_secret_ref.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|r| EnvFromSource {
        secret_ref: Some(SecretEnvSource {
            name: r.name.clone(),
            optional: Some(false),
        }),
        ..Default::default()
    })
    .collect();
    let (volumes, mounts) = validation_volumes(sv);
    Pod {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: sv.namespace(),
            labels: Some(BTreeMap::from([
                (LABEL_VALIDATOR.to_string(), sv.name_any()),
                (LABEL_VERSION.to_string(), version.to_string()),
                (
                    crate::training_job::children::LABEL_MANAGED_BY.to_string(),
                    crate::training_job::children::MANAGER.to_string(),
                ),
            ])),
            owner_references: Some(vec![OwnerReference {
                api_version: SiteValidator::api_version(&()).to_string(),
                kind: SiteValidator::kind(&()).to_string(),
                name: sv.name_any(),
                uid: sv.uid().unwrap_or_default(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            restart_policy: Some("Never".into()),
            containers: vec![Container {
                name: "validate".into(),
                image: Some(s.image.clone()),
                command: Some(vec!["/usr/local/bin/radfm".into()]),
                args: Some(args),
                env: Some(vec![EnvVar {
                    name: "RADFM_SIGNING_KEY_FILE".into(),
                    value: Some(format!("{KEY_DIR}/{}", s.signing_key_secret_ref.key)),
                    ..Default::default()
                }]),
                env_from: (!env_from.is_empty()).then_some(env_from),
                volume_mounts: Some(mounts),
                security_context: Some(
                    crate::training_job::children::restricted_container_security(),
                ),
                ..Default::default()
            }],
            volumes: Some(volumes),
            security_context: Some(crate::training_job::children::restricted_pod_security()),
            // The pod reads files and object storage only; it has no business with the API.
            automount_service_account_token: Some(false),
            ..Default::default()
        }),
        status: None,
    }
}

fn pod_phase(p: &Pod) -> &str {
    p.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

/// Reconciles one SiteValidator.
#[tracing::instrument(skip_all, fields(sv = %sv.name_any()))]
pub async fn reconcile_site(sv: Arc<SiteValidator>, ctx: Arc<Context>) -> Result<Action> {
    let ns = sv
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let now = Time(jiff::Timestamp::now());
    let generation = sv.metadata.generation;
    let mut status: SiteValidatorStatus = sv.status.clone().unwrap_or_default();
    status.observed_generation = generation;
    status.last_poll_time = Some(now.clone());
    let svs: Api<SiteValidator> = Api::namespaced(ctx.client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let poll = Duration::from_secs(sv.spec.poll_interval_seconds.max(5) as u64);
    let s = &sv.spec;

    let checked = async {
        let reg = Registry::open(&s.registry).map_err(registry_error)?;
        let aliases = reg.aliases(&s.model).await.map_err(registry_error)?;
        let Some(&candidate) = aliases.get(&s.candidate_alias) else {
            return Ok::<_, Error>(None);
        };
        let reported = reg
            .report_sites(&s.model, candidate)
            .await
            .map_err(registry_error)?
            .contains(&s.site_id);
        // A candidate that is already the baseline needs no validation; if this site's report
        // is what promoted it (before this pass saw the report), the status still records it.
        if aliases.get(&s.baseline_alias) == Some(&candidate) && !reported {
            return Ok(None);
        }
        Ok(Some((candidate, reported)))
    }
    .await;
    let mut events = Vec::new();
    match checked {
        Err(e) => {
            conditions::set(
                &mut status.conditions,
                Cond::Ready,
                false,
                validation_reason::REGISTRY_ERROR,
                &e.to_string(),
                generation,
                &now,
            );
        }
        Ok(found) => {
            conditions::set(
                &mut status.conditions,
                Cond::Ready,
                true,
                validation_reason::POLLING,
                &match found {
                    Some((v, _)) => format!("candidate is v{v}"),
                    None => "no candidate to validate".into(),
                },
                generation,
                &now,
            );
            let mine: Vec<Pod> = effects::list_owned(
                &pods,
                &format!("{LABEL_VALIDATOR}={}", sv.name_any()),
                &sv.uid().unwrap_or_default(),
            )
            .await?;
            status.running = None;
            match found {
                Some((v, true)) => {
                    if status.last_validated_version != Some(v as i64) {
                        events.push(PlannedEvent {
                            warning: false,
                            reason: validation_reason::REPORT_PUBLISHED,
                            note: format!("report of v{v} is in the registry"),
                        });
                    }
                    status.last_validated_version = Some(v as i64);
                    // Finished pods go; one still exiting after publishing is left to finish.
                    for p in mine
                        .iter()
                        .filter(|p| matches!(pod_phase(p), "Succeeded" | "Failed"))
                    {
                        let _ = pods
                            .delete(&p.name_any(), &DeleteParams::background())
                            .await;
                    }
                }
                Some((v, false)) => {
                    let want = validation_pod(&sv, v);
                    let name = want.name_any();
                    // Pods of other versions, failed pods and pods that ended without a report
                    // go; the next pass starts a new one.
                    let finished = |p: &Pod| matches!(pod_phase(p), "Succeeded" | "Failed");
                    for p in &mine {
                        if p.name_any() != name || finished(p) {
                            if p.name_any() == name {
                                events.push(PlannedEvent {
                                    warning: true,
                                    reason: validation_reason::VALIDATION_FAILED,
                                    note: format!(
                                        "pod {} ended ({}) without a report of v{v}; retrying",
                                        p.name_any(),
                                        pod_phase(p)
                                    ),
                                });
                            }
                            let _ = pods
                                .delete(&p.name_any(), &DeleteParams::background())
                                .await;
                        }
                    }
                    if !mine.iter().any(|p| p.name_any() == name) {
                        let pp = PostParams {
                            field_manager: Some(FIELD_MANAGER.into()),
                            ..Default::default()
                        };
                        match pods.create(&pp, &want).await {
                            Ok(_) => {
                                info!(pod = %name, version = v, "validation started");
                                events.push(PlannedEvent {
                                    warning: false,
                                    reason: validation_reason::VALIDATION_STARTED,
                                    note: format!("validating v{v} in pod {name}"),
                                });
                            }
                            Err(kube::Error::Api(e)) if e.code == 409 => {}
                            Err(e) => return Err(e.into()),
                        }
                    }
                    status.running = Some(name);
                }
                None => {}
            }
        }
    }
    conditions::set(
        &mut status.conditions,
        Cond::Validating,
        status.running.is_some(),
        if status.running.is_some() {
            validation_reason::VALIDATION_STARTED
        } else {
            validation_reason::IDLE
        },
        &status
            .running
            .as_ref()
            .map_or("no validation in progress".into(), |p| format!("pod {p}")),
        generation,
        &now,
    );
    effects::apply_status(&svs, sv.as_ref(), sv.status.as_ref(), &status).await?;
    effects::publish(&ctx.recorder, sv.as_ref(), "Validate", &events).await;
    Ok(Action::requeue(if status.running.is_some() {
        poll.min(Duration::from_secs(10))
    } else {
        poll
    }))
}

/// Reconciles one PromotionPolicy.
#[tracing::instrument(skip_all, fields(pp = %pp.name_any()))]
pub async fn reconcile_policy(pp: Arc<PromotionPolicy>, ctx: Arc<Context>) -> Result<Action> {
    let ns = pp
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let now = jiff::Timestamp::now();
    let generation = pp.metadata.generation;
    let mut status: PromotionPolicyStatus = pp.status.clone().unwrap_or_default();
    status.observed_generation = generation;
    let api: Api<PromotionPolicy> = Api::namespaced(ctx.client.clone(), &ns);
    let approved = pp
        .annotations()
        .get(ANNOTATION_APPROVE)
        .and_then(|v| v.trim().trim_start_matches('v').parse::<u64>().ok());
    let by = format!("radfm-operator/{ns}/{}", pp.name_any());
    let mut event = None;
    let result = async {
        let reg = Registry::open(&pp.spec.registry).map_err(registry_error)?;
        apply::gate(&reg, &pp.spec, approved, &by, now)
            .await
            .map_err(registry_error)
    }
    .await;
    match result {
        Ok(pass) => {
            status.production = pass.production.map(|p| p as i64);
            let msg = match pass.gated {
                Gated::NothingToDecide { why } => why,
                Gated::Decided { decision, recorded } => {
                    let line = apply::summary(&decision);
                    if let Some(seq) = recorded {
                        event = Some(PlannedEvent {
                            warning: decision.outcome != radfm_validation::gate::Outcome::Promote,
                            reason: validation_reason::DECIDED,
                            note: format!("event {seq}: {line}"),
                        });
                    }
                    let reasons: Vec<String> =
                        decision.reasons.iter().map(|r| r.message.clone()).collect();
                    let same = status.last_decision.as_ref().is_some_and(|d| {
                        d.version == decision.candidate as i64
                            && d.outcome == decision.outcome.as_str()
                            && d.reasons == reasons
                    });
                    if !same {
                        status.last_decision = Some(DecisionStatus {
                            version: decision.candidate as i64,
                            outcome: decision.outcome.as_str().into(),
                            reasons,
                            sites: decision.sites.clone(),
                            time: Time(now),
                        });
                    }
                    line
                }
            };
            conditions::set(
                &mut status.conditions,
                Cond::Ready,
                true,
                validation_reason::POLLING,
                &msg,
                generation,
                &Time(now),
            );
        }
        Err(e) => {
            conditions::set(
                &mut status.conditions,
                Cond::Ready,
                false,
                validation_reason::REGISTRY_ERROR,
                &e.to_string(),
                generation,
                &Time(now),
            );
        }
    }
    effects::apply_status(&api, pp.as_ref(), pp.status.as_ref(), &status).await?;
    effects::publish(&ctx.recorder, pp.as_ref(), "Gate", event.as_slice()).await;
    Ok(Action::requeue(Duration::from_secs(
        pp.spec.poll_interval_seconds.max(5) as u64,
    )))
}

fn error_policy<K>(_obj: Arc<K>, error: &Error, _ctx: Arc<Context>) -> Action {
    warn!(%error, "validation reconcile failed");
    Action::requeue(Duration::from_secs(5))
}

/// Runs the SiteValidator and PromotionPolicy controllers until `shutdown` resolves.
pub async fn run_controllers(
    client: Client,
    instance: Option<String>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let ctx = Arc::new(Context {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.into(),
                instance,
            },
        ),
        client: client.clone(),
    });
    let ns = namespace.as_deref();
    let svs: Api<SiteValidator> = effects::scoped(&client, ns);
    let pps: Api<PromotionPolicy> = effects::scoped(&client, ns);
    let pods: Api<Pod> = effects::scoped(&client, ns);
    let (tx, rx) = tokio::sync::watch::channel(false);
    let stop = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let sites = Controller::new(svs, watcher::Config::default().any_semantic())
        .owns(pods, watcher::Config::default().labels(LABEL_VALIDATOR))
        .graceful_shutdown_on(stop(rx.clone()))
        .run(reconcile_site, error_policy, ctx.clone())
        .for_each(|r| async move {
            if let Err(e) = r {
                warn!(error = %e, "site validator controller");
            }
        });
    let policies = Controller::new(pps, watcher::Config::default().any_semantic())
        .graceful_shutdown_on(stop(rx))
        .run(reconcile_policy, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                warn!(error = %e, "promotion policy controller");
            }
        });
    tokio::join!(sites, policies, async move {
        shutdown.await;
        let _ = tx.send(true);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validator(data_volume: &str) -> SiteValidator {
        let yaml = [
            "apiVersion: radfm.io/v1alpha1",
            "kind: SiteValidator",
            "metadata: {name: hospital-c, namespace: site, uid: uid-sv}",
            "spec:",
            "  siteId: hospital-c",
            "  signingKeySecretRef: {name: hospital-c-key}",
            "  registry: s3://radiology/registry",
            "  model: cxr-mae",
            "  dataset: {uri: 'file:///data/cxr-labelled'}",
            data_volume,
            "  tasks: [{label: lesion}]",
            "  image: radfm-trainer:dev",
        ]
        .join("\n");
        serde_yaml_ng::from_str(&yaml).unwrap()
    }

    #[test]
    fn validation_pod_mounts_the_sites_data_volume_read_only_at_data() {
        let sv = validator("  dataVolume: {persistentVolumeClaim: {claimName: cxr-labelled}}");
        let spec = validation_pod(&sv, 7).spec.unwrap();
        let volumes = spec.volumes.unwrap();
        let data = volumes.iter().find(|v| v.name == "site-data").unwrap();
        assert_eq!(
            data.persistent_volume_claim.as_ref().unwrap().claim_name,
            "cxr-labelled"
        );
        let mounts = spec.containers[0].volume_mounts.clone().unwrap();
        let mount = mounts.iter().find(|m| m.name == "site-data").unwrap();
        assert_eq!(
            (mount.mount_path.as_str(), mount.read_only),
            ("/data", Some(true))
        );
        let args = spec.containers[0].args.clone().unwrap();
        assert!(
            args.windows(2)
                .any(|w| w == ["--dataset", "file:///data/cxr-labelled"])
        );
    }

    #[test]
    fn validation_pod_without_a_data_volume_mounts_only_its_key() {
        let spec = validation_pod(&validator(""), 7).spec.unwrap();
        let names: Vec<_> = spec.volumes.unwrap().into_iter().map(|v| v.name).collect();
        assert_eq!(names, ["signing-key"]);
    }

    #[test]
    fn validation_pod_is_restricted_and_holds_no_api_token() {
        let spec = validation_pod(&validator(""), 7).spec.unwrap();
        let pod_sc = spec.security_context.unwrap();
        assert_eq!(
            (pod_sc.run_as_non_root, pod_sc.fs_group),
            (Some(true), Some(crate::training_job::children::IMAGE_GID))
        );
        assert_eq!(pod_sc.seccomp_profile.unwrap().type_, "RuntimeDefault");
        let c_sc = spec.containers[0].security_context.clone().unwrap();
        assert_eq!(c_sc.allow_privilege_escalation, Some(false));
        assert_eq!(c_sc.capabilities.unwrap().drop.unwrap(), ["ALL"]);
        assert_eq!(spec.automount_service_account_token, Some(false));
    }
}
