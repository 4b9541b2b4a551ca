//! The validation pod: `radfm validate` on the site's data, with the site's signing key, under
//! the restricted Pod Security Standard and without an API token.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, EnvFromSource, EnvVar, Pod, PodSpec, SecretEnvSource, SecretVolumeSource, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};
use radfm_api::site_validation::{
    DATA_MOUNT_PATH, KeySecretRef, REGISTRY_ENV_PREFIX, RegistryStore, SiteValidator,
};
use radfm_api::trainingjob::SecretRef;

/// Label on validation pods: the SiteValidator's name.
pub const LABEL_VALIDATOR: &str = "radfm.io/site-validator";
/// Label on validation pods: the version validated.
pub const LABEL_VERSION: &str = "radfm.io/model-version";
/// Where the signing key is mounted in validation pods.
pub const KEY_DIR: &str = "/var/run/radfm/signing-key";

/// What a pod at a site reads besides its command: the site's signing key, its data volume,
/// its Secrets and the hub's store. SiteValidators and ModelMonitors build their pods from it.
pub(crate) struct SiteAccess<'a> {
    /// The site's signing key.
    pub key: &'a KeySecretRef,
    /// The site's data volume, mounted read-only at [`DATA_MOUNT_PATH`].
    pub data_volume: Option<&'a Volume>,
    /// Secrets whose keys become environment variables as they are (each once).
    pub secrets: Vec<&'a SecretRef>,
    /// The registry URI (what the hub's store covers by default).
    pub registry: &'a str,
    /// The hub's store, when it is not the site's.
    pub registry_store: Option<&'a RegistryStore>,
}

/// The volumes and mounts: the signing key (mode 0400, readable through the pod's fsGroup) and,
/// where the site keeps its data on a volume, that volume read-only at [`DATA_MOUNT_PATH`].
fn site_volumes(a: &SiteAccess) -> (Vec<Volume>, Vec<VolumeMount>) {
    let mut volumes = vec![Volume {
        name: "signing-key".into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(a.key.name.clone()),
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
    if let Some(data) = a.data_volume {
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

/// The environment: the site's Secrets as they are, the hub's store (if it is another) under
/// [`REGISTRY_ENV_PREFIX`] for the URIs it covers, and the signing key's path.
fn site_env(a: &SiteAccess) -> (Vec<EnvFromSource>, Vec<EnvVar>) {
    let mut names: Vec<&str> = Vec::new();
    for r in &a.secrets {
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
        .chain(a.registry_store.map(|r| EnvFromSource {
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
        value: Some(format!("{KEY_DIR}/{}", a.key.key)),
        ..Default::default()
    }];
    if let Some(r) = a.registry_store {
        let prefixes: Vec<&str> = if r.uri_prefixes.is_empty() {
            vec![a.registry]
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

/// A site pod's labels: its owner (under `owner_label`) and version, and the owner's Kueue
/// queue and priority class, so a site that queues its GPUs with Kueue's pod integration queues
/// these pods too.
fn site_labels<K: Resource>(
    owner_label: &str,
    owner: &K,
    version: u64,
) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([
        (owner_label.to_string(), owner.name_any()),
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
        if let Some(v) = owner.labels().get(key) {
            labels.insert(key.to_string(), v.clone());
        }
    }
    labels
}

/// What distinguishes one site pod from another.
pub(crate) struct SitePod<'a, K> {
    /// The owning resource.
    pub owner: &'a K,
    /// The label naming the owner on its pods.
    pub owner_label: &'a str,
    /// The pod's name.
    pub name: String,
    /// The model version the pod works on.
    pub version: u64,
    /// Extra annotations.
    pub annotations: Option<BTreeMap<String, String>>,
    /// The container's name.
    pub container: &'a str,
    /// The container image.
    pub image: &'a str,
    /// `radfm` arguments.
    pub args: Vec<String>,
    /// Key, data and stores.
    pub access: SiteAccess<'a>,
}

/// A pod at a site: `radfm` with `args`, owned by its resource, under the restricted Pod Security
/// Standard, with no API token (it reads files and object storage only).
pub(crate) fn site_pod<K: Resource<DynamicType = ()>>(p: SitePod<'_, K>) -> Pod {
    let (env_from, env) = site_env(&p.access);
    let (volumes, mounts) = site_volumes(&p.access);
    Pod {
        metadata: ObjectMeta {
            name: Some(p.name),
            namespace: p.owner.namespace(),
            labels: Some(site_labels(p.owner_label, p.owner, p.version)),
            annotations: p.annotations,
            owner_references: Some(vec![OwnerReference {
                api_version: K::api_version(&()).to_string(),
                kind: K::kind(&()).to_string(),
                name: p.owner.name_any(),
                uid: p.owner.uid().unwrap_or_default(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            restart_policy: Some("Never".into()),
            containers: vec![Container {
                name: p.container.into(),
                image: Some(p.image.into()),
                command: Some(vec!["/usr/local/bin/radfm".into()]),
                args: Some(p.args),
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
            automount_service_account_token: Some(false),
            ..Default::default()
        }),
        status: None,
    }
}

/// `radfm validate` with the site's settings, for `version`.
fn validate_args(sv: &SiteValidator, version: u64) -> Vec<String> {
    let s = &sv.spec;
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
    args
}

/// The validation pod of `version` for `sv`: `radfm validate` with the site's settings.
pub fn validation_pod(sv: &SiteValidator, version: u64) -> Pod {
    let s = &sv.spec;
    site_pod(SitePod {
        owner: sv,
        owner_label: LABEL_VALIDATOR,
        name: format!("{}-v{version}", sv.name_any()),
        version,
        annotations: None,
        container: "validate",
        image: &s.image,
        args: validate_args(sv, version),
        access: SiteAccess {
            key: &s.signing_key_secret_ref,
            data_volume: s.data_volume.as_ref(),
            secrets: [
                s.credentials_secret_ref.as_ref(),
                s.dataset.credentials_secret_ref.as_ref(),
            ]
            .into_iter()
            .flatten()
            .collect(),
            registry: &s.registry,
            registry_store: s.registry_store.as_ref(),
        },
    })
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
    fn validation_pod_waits_in_the_kueue_queue_of_its_validator() {
        let mut sv = validator("");
        sv.metadata.labels = Some(BTreeMap::from([(
            crate::kueue::QUEUE_LABEL.to_string(),
            "site-gpus".to_string(),
        )]));
        let labels = validation_pod(&sv, 7).metadata.labels.unwrap();
        assert_eq!(labels[crate::kueue::QUEUE_LABEL], "site-gpus");
        let unqueued = validation_pod(&validator(""), 7).metadata.labels.unwrap();
        assert!(!unqueued.contains_key(crate::kueue::QUEUE_LABEL));
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

    #[test]
    fn the_hubs_store_reaches_the_pod_under_its_own_prefix_for_the_registrys_uris_only() {
        let sv = validator(
            "  registryStore: {credentialsSecretRef: {name: hub-store}, uriPrefixes: ['s3://radiology/registry', 's3://hub-models']}",
        );
        let c = validation_pod(&sv, 7).spec.unwrap().containers.remove(0);
        let from = c.env_from.unwrap();
        let hub = from
            .iter()
            .find(|f| f.secret_ref.as_ref().unwrap().name == "hub-store")
            .unwrap();
        assert_eq!(hub.prefix.as_deref(), Some("RADFM_REGISTRY_"));
        let settings = c
            .env
            .unwrap()
            .into_iter()
            .find(|e| e.name == "RADFM_STORE_SETTINGS")
            .unwrap();
        assert_eq!(
            settings.value.as_deref(),
            Some("s3://radiology/registry=RADFM_REGISTRY_,s3://hub-models=RADFM_REGISTRY_")
        );
        let plain = validation_pod(&validator(""), 7)
            .spec
            .unwrap()
            .containers
            .remove(0);
        assert!(
            plain
                .env
                .unwrap()
                .iter()
                .all(|e| e.name != "RADFM_STORE_SETTINGS")
        );
    }
}
