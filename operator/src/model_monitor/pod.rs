//! A look's pod: `radfm monitor` on the site's data, with the site's signing key, under the
//! restricted Pod Security Standard and without an API token. It shares the validation pod's
//! key mount, environment and labels, because a monitor and a validator of one site hold the
//! same key and the same data.

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{
    Container, EnvFromSource, EnvVar, Pod, PodSpec, SecretEnvSource, SecretVolumeSource, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};
use radfm_api::continual::ANNOTATION_SCHEDULED;
use radfm_api::monitoring::ModelMonitor;
use radfm_api::site_validation::{DATA_MOUNT_PATH, REGISTRY_ENV_PREFIX};

use crate::site_validator::{KEY_DIR, LABEL_VERSION};

/// Label on a look's pod: the ModelMonitor's name.
pub const LABEL_MONITOR: &str = "radfm.io/model-monitor";

/// The name of the look scheduled at `scheduled`: the monitor's name and the minutes since the
/// epoch, so that an operator restarted at the firing instant names the same pod again.
pub fn look_name(mm: &ModelMonitor, scheduled: Timestamp) -> String {
    format!("{}-{}", mm.name_any(), scheduled.as_second().div_euclid(60))
}

fn volumes(mm: &ModelMonitor) -> (Vec<Volume>, Vec<VolumeMount>) {
    let mut volumes = vec![Volume {
        name: "signing-key".into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(mm.spec.signing_key_secret_ref.name.clone()),
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
    if let Some(data) = &mm.spec.data_volume {
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

/// `radfm monitor` with the monitor's settings, for `version`, identified as `look`.
fn args(mm: &ModelMonitor, version: u64, look: &str) -> Vec<String> {
    let s = &mm.spec;
    let mut args: Vec<String> = vec![
        "monitor".into(),
        "--registry".into(),
        s.registry.clone(),
        "--model".into(),
        s.model.clone(),
        "--version".into(),
        version.to_string(),
        "--site".into(),
        s.site_id.clone(),
        "--reference".into(),
        s.reference.uri.clone(),
        "--recent".into(),
        s.recent.uri.clone(),
        "--fields".into(),
        s.fields.join(","),
        "--alpha".into(),
        s.alpha.to_string(),
        "--permutations".into(),
        s.permutations.to_string(),
        "--look".into(),
        look.into(),
    ];
    for (flag, shards) in [
        ("--reference-shards", &s.reference.shards),
        ("--recent-shards", &s.recent.shards),
    ] {
        if let Some(shards) = shards {
            args.extend([flag.to_string(), shards.clone()]);
        }
    }
    if let Some(task) = &s.task {
        args.extend(["--task".to_string(), task.clone()]);
    }
    args
}

/// The site's Secrets as they are, the hub's store under [`REGISTRY_ENV_PREFIX`] for the URIs
/// it covers, and the signing key's path.
fn env(mm: &ModelMonitor) -> (Vec<EnvFromSource>, Vec<EnvVar>) {
    let s = &mm.spec;
    let mut names: Vec<&str> = Vec::new();
    for r in [
        s.credentials_secret_ref.as_ref(),
        s.reference.credentials_secret_ref.as_ref(),
        s.recent.credentials_secret_ref.as_ref(),
    ]
    .into_iter()
    .flatten()
    {
        if !names.contains(&r.name.as_str()) {
            names.push(&r.name);
        }
    }
    let env_from: Vec<EnvFromSource> = names
        .into_iter()
        .map(|name| EnvFromSource {
            secret_ref: Some(SecretEnvSource {
                name: name.into(),
                optional: Some(false),
            }),
            ..Default::default()
        })
        .chain(s.registry_store.as_ref().map(|r| EnvFromSource {
            prefix: Some(REGISTRY_ENV_PREFIX.into()),
            secret_ref: Some(SecretEnvSource {
                name: r.credentials_secret_ref.name.clone(),
                optional: Some(false),
            }),
            ..Default::default()
        }))
        .collect();
    let mut env = vec![EnvVar {
        name: "RADFM_SIGNING_KEY_FILE".into(),
        value: Some(format!("{KEY_DIR}/{}", s.signing_key_secret_ref.key)),
        ..Default::default()
    }];
    if let Some(r) = &s.registry_store {
        let prefixes: Vec<&str> = if r.uri_prefixes.is_empty() {
            vec![s.registry.as_str()]
        } else {
            r.uri_prefixes.iter().map(String::as_str).collect()
        };
        env.push(EnvVar {
            name: radfm_data::store::STORE_SETTINGS.into(),
            value: Some(radfm_data::store::settings_entry(
                &prefixes,
                REGISTRY_ENV_PREFIX,
            )),
            ..Default::default()
        });
    }
    (env_from, env)
}

/// The pod's labels: which monitor and version, and the monitor's Kueue queue and priority
/// class, so a site that queues its GPUs with Kueue's pod integration queues looks too.
fn labels(mm: &ModelMonitor, version: u64) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([
        (LABEL_MONITOR.to_string(), mm.name_any()),
        (LABEL_VERSION.to_string(), version.to_string()),
        (
            crate::training_job::children::LABEL_MANAGED_BY.to_string(),
            crate::training_job::children::MANAGER.to_string(),
        ),
    ]);
    for key in [
        crate::kueue::QUEUE_LABEL,
        crate::kueue::PRIORITY_CLASS_LABEL,
    ] {
        if let Some(v) = mm.labels().get(key) {
            labels.insert(key.to_string(), v.clone());
        }
    }
    labels
}

/// The pod of the look at `version` scheduled at `scheduled`.
pub fn look_pod(mm: &ModelMonitor, version: u64, scheduled: Timestamp) -> Pod {
    let name = look_name(mm, scheduled);
    let (env_from, env) = env(mm);
    let (volumes, mounts) = volumes(mm);
    Pod {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: mm.namespace(),
            labels: Some(labels(mm, version)),
            annotations: Some(BTreeMap::from([(
                ANNOTATION_SCHEDULED.to_string(),
                scheduled.to_string(),
            )])),
            owner_references: Some(vec![OwnerReference {
                api_version: ModelMonitor::api_version(&()).to_string(),
                kind: ModelMonitor::kind(&()).to_string(),
                name: mm.name_any(),
                uid: mm.uid().unwrap_or_default(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            restart_policy: Some("Never".into()),
            containers: vec![Container {
                name: "monitor".into(),
                image: Some(mm.spec.image.clone()),
                command: Some(vec!["/usr/local/bin/radfm".into()]),
                args: Some(args(mm, version, &name)),
                env: Some(env),
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn monitor(extra: &str) -> ModelMonitor {
        let yaml = format!(
            "apiVersion: radfm.io/v1alpha1
kind: ModelMonitor
metadata: {{name: north, namespace: site, uid: uid-mm, creationTimestamp: '1970-01-01T00:00:00Z'}}
spec:
  siteId: north
  signingKeySecretRef: {{name: north-key}}
  registry: s3://radiology/registry
  credentialsSecretRef: {{name: registry-s3}}
  model: chest
  schedule: '0 6 * * *'
  reference: {{uri: 's3://north/reference', credentialsSecretRef: {{name: north-data}}}}
  recent: {{uri: 's3://north/recent', credentialsSecretRef: {{name: north-data}}, shards: '40-59'}}
  task: lesion
  image: radfm-trainer:dev
{extra}"
        );
        serde_yaml_ng::from_str(&yaml).unwrap()
    }

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    #[test]
    fn a_looks_pod_runs_radfm_monitor_on_the_deployed_version_named_after_its_scheduled_minute() {
        let mm = monitor("");
        let pod = look_pod(&mm, 7, at(6 * 3600));
        assert_eq!(pod.name_any(), "north-360");
        assert_eq!(pod.labels()[LABEL_MONITOR], "north");
        assert_eq!(pod.labels()[LABEL_VERSION], "7");
        assert_eq!(
            pod.annotations()[ANNOTATION_SCHEDULED],
            "1970-01-01T06:00:00Z"
        );
        let c = pod.spec.unwrap().containers.remove(0);
        let args = c.args.unwrap();
        for pair in [
            ["--version", "7"],
            ["--site", "north"],
            ["--look", "north-360"],
            ["--recent-shards", "40-59"],
            ["--task", "lesion"],
            ["--fields", "manufacturer,sex,age_band"],
            ["--alpha", "0.01"],
            ["--permutations", "999"],
        ] {
            assert!(args.windows(2).any(|w| w == pair), "{pair:?} in {args:?}");
        }
        assert!(!args.iter().any(|a| a == "--reference-shards"), "{args:?}");
        // One Secret named twice is mounted once.
        let from: Vec<String> = c
            .env_from
            .unwrap()
            .into_iter()
            .map(|f| f.secret_ref.unwrap().name)
            .collect();
        assert_eq!(from, ["registry-s3", "north-data"]);
        let key = c
            .env
            .unwrap()
            .into_iter()
            .find(|e| e.name == "RADFM_SIGNING_KEY_FILE")
            .unwrap();
        assert_eq!(
            key.value.as_deref(),
            Some("/var/run/radfm/signing-key/ed25519.key")
        );
    }

    #[test]
    fn a_looks_pod_is_restricted_holds_no_api_token_and_mounts_site_data_read_only() {
        let mm = monitor("  dataVolume: {persistentVolumeClaim: {claimName: cxr}}");
        let spec = look_pod(&mm, 7, at(0)).spec.unwrap();
        assert_eq!(spec.automount_service_account_token, Some(false));
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        let c_sc = spec.containers[0].security_context.clone().unwrap();
        assert_eq!(c_sc.allow_privilege_escalation, Some(false));
        let mounts = spec.containers[0].volume_mounts.clone().unwrap();
        let data = mounts.iter().find(|m| m.name == "site-data").unwrap();
        assert_eq!(
            (data.mount_path.as_str(), data.read_only),
            ("/data", Some(true))
        );
    }
}
