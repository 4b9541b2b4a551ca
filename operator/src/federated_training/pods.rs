//! The pods of a federation: `radfm federate <step>` with the hub's or the site's signing key
//! mounted (the operator never reads keys), store settings from Secrets, under the restricted
//! Pod Security Standard and without an API token.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, EnvFromSource, EnvVar, Pod, PodSpec, SecretEnvSource, SecretVolumeSource, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use radfm_api::site_validation::KeySecretRef;
use radfm_api::trainingjob::SecretRef;

/// Where the signing key is mounted.
pub const KEY_DIR: &str = "/var/run/radfm/signing-key";
/// Label on federation pods: the owning FederatedTraining or FederatedSite.
pub const LABEL_FEDERATION_OWNER: &str = "radfm.io/federation-owner";
/// Label on federation pods: the round they work on.
pub const LABEL_ROUND: &str = "radfm.io/federated-round";

/// Store settings a pod gets from a Secret, optionally under a prefix.
#[derive(Debug, Clone, PartialEq)]
pub struct SecretEnv<'a> {
    /// The Secret.
    pub secret: &'a SecretRef,
    /// The prefix of its keys (`RADFM_EXCHANGE_`), if any.
    pub prefix: Option<&'static str>,
}

/// What one `radfm federate` pod is.
#[derive(Debug, Clone)]
pub struct FederatePod<'a> {
    /// Pod name.
    pub name: String,
    /// Namespace.
    pub namespace: Option<String>,
    /// The owning resource.
    pub owner: OwnerReference,
    /// The round it works on.
    pub round: u32,
    /// Image with `radfm`.
    pub image: &'a str,
    /// `radfm` arguments (`federate publish ...`).
    pub args: Vec<String>,
    /// The signing key to mount, if the step signs.
    pub key: Option<&'a KeySecretRef>,
    /// Store settings.
    pub env_from: Vec<SecretEnv<'a>>,
    /// `RADFM_STORE_SETTINGS`: which stores take prefixed settings.
    pub store_settings: Option<String>,
}

impl FederatePod<'_> {
    /// The signing key's volume, mount and variable (none for a step that signs nothing).
    fn key(&self) -> (Vec<Volume>, Vec<VolumeMount>, Vec<EnvVar>) {
        let Some(k) = self.key else {
            return (Vec::new(), Vec::new(), Vec::new());
        };
        (
            vec![Volume {
                name: "signing-key".into(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(k.name.clone()),
                    default_mode: Some(0o400),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            vec![VolumeMount {
                name: "signing-key".into(),
                mount_path: KEY_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            }],
            vec![EnvVar {
                name: "RADFM_SIGNING_KEY_FILE".into(),
                value: Some(format!("{KEY_DIR}/{}", k.key)),
                ..Default::default()
            }],
        )
    }

    /// The Secrets the pod's variables come from, each with its prefix.
    fn env_from(&self) -> Vec<EnvFromSource> {
        self.env_from
            .iter()
            .map(|e| EnvFromSource {
                prefix: e.prefix.map(str::to_string),
                secret_ref: Some(SecretEnvSource {
                    name: e.secret.name.clone(),
                    optional: Some(false),
                }),
                ..Default::default()
            })
            .collect()
    }

    /// The pod.
    pub fn build(&self) -> Pod {
        let (volumes, mounts, mut env) = self.key();
        env.extend(self.store_settings.as_ref().map(|v| EnvVar {
            name: radfm_data::store::STORE_SETTINGS.into(),
            value: Some(v.clone()),
            ..Default::default()
        }));
        let env_from = self.env_from();
        let labels = BTreeMap::from([
            (LABEL_FEDERATION_OWNER.to_string(), self.owner.name.clone()),
            (LABEL_ROUND.to_string(), self.round.to_string()),
            (
                crate::training_job::children::LABEL_MANAGED_BY.to_string(),
                crate::training_job::children::MANAGER.to_string(),
            ),
        ]);
        Pod {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: self.namespace.clone(),
                labels: Some(labels),
                owner_references: Some(vec![self.owner.clone()]),
                ..Default::default()
            },
            spec: Some(PodSpec {
                restart_policy: Some("Never".into()),
                containers: vec![Container {
                    name: "federate".into(),
                    image: Some(self.image.to_string()),
                    command: Some(vec!["/usr/local/bin/radfm".into()]),
                    args: Some(self.args.clone()),
                    env: (!env.is_empty()).then_some(env),
                    env_from: (!env_from.is_empty()).then_some(env_from),
                    volume_mounts: (!mounts.is_empty()).then_some(mounts),
                    // The error a failed step ends with becomes the pod's termination message,
                    // which the controller puts in the status.
                    termination_message_policy: Some("FallbackToLogsOnError".into()),
                    security_context: Some(
                        crate::training_job::children::restricted_container_security(),
                    ),
                    ..Default::default()
                }],
                volumes: (!volumes.is_empty()).then_some(volumes),
                security_context: Some(crate::training_job::children::restricted_pod_security()),
                automount_service_account_token: Some(false),
                ..Default::default()
            }),
            status: None,
        }
    }
}

/// Failed pods of one step (publish, aggregate, register, fetch, contribute) before the step is
/// given up.
pub const MAX_STEP_FAILURES: u32 = 3;

/// Counts one more failure of a step's `pod` in `failures`; returns the new count and a message
/// naming the pod, the count and the container's last log line.
pub fn count_failure(pod: &Pod, failures: &mut Option<u32>) -> (u32, String) {
    let count = failures.unwrap_or(0) + 1;
    *failures = Some(count);
    let detail = termination_message(pod).unwrap_or_else(|| "no message".into());
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    (
        count,
        format!("pod {name} failed ({count} of {MAX_STEP_FAILURES}): {detail}"),
    )
}

/// The message a finished pod's container ended with, shortened to its last line.
pub fn termination_message(pod: &Pod) -> Option<String> {
    let msg = pod
        .status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find_map(|c| c.state.as_ref()?.terminated.as_ref()?.message.clone())?;
    let last = msg.lines().rev().find(|l| !l.trim().is_empty())?.trim();
    Some(last.chars().take(512).collect())
}
