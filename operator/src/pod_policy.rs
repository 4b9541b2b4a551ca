//! The cluster admin's limits on the pods radfm creates for its users.
//!
//! The operator creates pods with its own ServiceAccount, so without limits it would be a way
//! around the cluster's pod policies: whoever may create a TrainingJob could get a pod with a
//! hostPath volume, another ServiceAccount's token or any Secret. Every pod radfm creates already
//! runs with the `restricted` security profile (non-root, no privilege escalation, every
//! capability dropped, RuntimeDefault seccomp), and no radfm resource has a field for host
//! namespaces, privileged mode or capabilities. The fields that remain able to widen a pod are
//! checked here against the [`PodPolicy`] the admin sets (chart values `podPolicy`), with a safe
//! default:
//! - volumes: only the types listed (default: those the `restricted` Pod Security Standard
//!   allows, without `secret`), so `hostPath` and other node-level volumes are refused;
//! - Secrets as volumes (`secret`, or a `projected` source) or as environment variables
//!   (`valueFrom.secretKeyRef`): refused unless allowed. The credentials Secrets that radfm's
//!   resources name explicitly (`credentialsSecretRef`) remain allowed: they are the documented
//!   channel and the admin reviews them by name;
//! - another ServiceAccount: only the names listed (default none).
//!
//! A refused TrainingJob creates nothing and reports `Created=False` with reason
//! `PodPolicyViolation` naming the field; a refused SiteValidator starts no validation pod.

use k8s_openapi::api::core::v1::{EnvVar, Volume};
use radfm_api::trainingjob::TrainingJobSpec;

/// Volume types allowed by default: the `restricted` Pod Security Standard's list without
/// `secret`.
pub const DEFAULT_VOLUME_TYPES: &str =
    "emptyDir,persistentVolumeClaim,configMap,downwardAPI,ephemeral,csi,projected";

/// What a user's resource may add to the pods radfm creates.
#[derive(clap::Args, Clone, Debug, PartialEq)]
pub struct PodPolicy {
    /// Volume types a TrainingJob's `workers.template.volumes` or a SiteValidator's
    /// `dataVolume` may use (the Pod's volume source names: emptyDir, hostPath, nfs, ...).
    #[arg(
        long = "pod-volume-types",
        env = "RADFM_POD_VOLUME_TYPES",
        value_delimiter = ',',
        default_value = DEFAULT_VOLUME_TYPES
    )]
    pub volume_types: Vec<String>,
    /// Allow Secrets as volumes (secret, projected secret sources) and as environment variables
    /// (valueFrom.secretKeyRef) in templates.
    #[arg(
        long = "pod-allow-secrets",
        env = "RADFM_POD_ALLOW_SECRETS",
        default_value_t = false,
        action = clap::ArgAction::Set
    )]
    pub allow_secrets: bool,
    /// ServiceAccounts a TrainingJob's `workers.template.serviceAccountName` may name.
    #[arg(
        long = "pod-service-accounts",
        env = "RADFM_POD_SERVICE_ACCOUNTS",
        value_delimiter = ','
    )]
    pub service_accounts: Vec<String>,
}

impl Default for PodPolicy {
    fn default() -> Self {
        PodPolicy {
            volume_types: DEFAULT_VOLUME_TYPES.split(',').map(String::from).collect(),
            allow_secrets: false,
            service_accounts: Vec::new(),
        }
    }
}

/// Why a resource's pods are refused: the field and the rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation(pub String);

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl PodPolicy {
    /// Checks what a TrainingJob adds to its worker pods.
    pub fn check_training_job(&self, spec: &TrainingJobSpec) -> Result<(), Violation> {
        let Some(t) = &spec.workers.template else {
            return Ok(());
        };
        for (i, v) in t.volumes.iter().flatten().enumerate() {
            self.check_volume(&format!("spec.workers.template.volumes[{i}]"), v)?;
        }
        for (i, e) in t.env.iter().flatten().enumerate() {
            self.check_env(&format!("spec.workers.template.env[{i}]"), e)?;
        }
        if let Some(sa) = &t.service_account_name
            && !self.service_accounts.contains(sa)
        {
            return Err(Violation(format!(
                "spec.workers.template.serviceAccountName: ServiceAccount {sa:?} is not one the \
                 cluster's radfm pod policy allows ({})",
                list(&self.service_accounts)
            )));
        }
        Ok(())
    }

    /// Checks one volume (`field` names it in the refusal).
    pub fn check_volume(&self, field: &str, v: &Volume) -> Result<(), Violation> {
        let ty = volume_type(v);
        if !self.volume_types.contains(&ty) {
            return Err(Violation(format!(
                "{field}: volume type {ty} is not allowed by the cluster's radfm pod policy \
                 (allowed: {})",
                list(&self.volume_types)
            )));
        }
        let projected_secret = v
            .projected
            .as_ref()
            .is_some_and(|p| p.sources.iter().flatten().any(|s| s.secret.is_some()));
        if (ty == "secret" || projected_secret) && !self.allow_secrets {
            return Err(Violation(format!(
                "{field}: Secrets as volumes are not allowed by the cluster's radfm pod policy"
            )));
        }
        Ok(())
    }

    fn check_env(&self, field: &str, e: &EnvVar) -> Result<(), Violation> {
        let secret = e
            .value_from
            .as_ref()
            .is_some_and(|f| f.secret_key_ref.is_some());
        if secret && !self.allow_secrets {
            return Err(Violation(format!(
                "{field} ({}): Secrets as environment variables are not allowed by the cluster's \
                 radfm pod policy (use the resource's credentialsSecretRef)",
                e.name
            )));
        }
        Ok(())
    }
}

/// The volume source's name (`hostPath`), as the Pod API spells it.
fn volume_type(v: &Volume) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|j| {
            j.as_object()?
                .keys()
                .find(|k| k.as_str() != "name")
                .cloned()
        })
        .unwrap_or_else(|| "emptyDir".into())
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use radfm_api::TrainingJob;

    fn job(template: &str) -> TrainingJobSpec {
        TrainingJob::from_yaml(
            &format!(
                "apiVersion: radfm.io/v1alpha1\nkind: TrainingJob\nmetadata: {{name: j}}\nspec:\n  image: i\n  workers: {{replicas: 1, template: {template}}}\n  dataset: {{uri: 's3://d'}}\n  checkpoint: {{uri: 's3://c'}}\n  training: {{steps: 1}}\n"
            ),
            "test",
        )
        .unwrap()
        .spec
    }

    fn verdict(policy: &PodPolicy, template: &str) -> String {
        policy
            .check_training_job(&job(template))
            .err()
            .map(|v| v.0)
            .unwrap_or_default()
    }

    #[test]
    fn the_default_policy_refuses_every_field_that_widens_a_pod() {
        let p = PodPolicy::default();
        let table = [
            ("{}", ""),
            ("{volumes: [{name: scratch, emptyDir: {}}]}", ""),
            (
                "{volumes: [{name: data, persistentVolumeClaim: {claimName: d}}]}",
                "",
            ),
            (
                "{volumes: [{name: host, hostPath: {path: /etc}}]}",
                "spec.workers.template.volumes[0]: volume type hostPath is not allowed",
            ),
            (
                "{volumes: [{name: n, nfs: {server: s, path: /}}]}",
                "volume type nfs is not allowed",
            ),
            (
                "{volumes: [{name: s, secret: {secretName: other-teams-keys}}]}",
                "volume type secret is not allowed",
            ),
            (
                "{volumes: [{name: p, projected: {sources: [{secret: {name: x}}]}}]}",
                "spec.workers.template.volumes[0]: Secrets as volumes are not allowed",
            ),
            (
                "{env: [{name: TOKEN, valueFrom: {secretKeyRef: {name: x, key: k}}}]}",
                "spec.workers.template.env[0] (TOKEN): Secrets as environment variables",
            ),
            ("{env: [{name: MODE, value: fast}]}", ""),
            (
                "{serviceAccountName: cluster-admin-sa}",
                "serviceAccountName: ServiceAccount \"cluster-admin-sa\" is not one the cluster's radfm pod policy allows (none)",
            ),
        ];
        for (template, want) in table {
            let got = verdict(&p, template);
            assert!(
                if want.is_empty() {
                    got.is_empty()
                } else {
                    got.contains(want)
                },
                "{template}: {got}"
            );
        }
    }

    #[test]
    fn an_admin_can_widen_the_policy_field_by_field() {
        let p = PodPolicy {
            volume_types: vec!["hostPath".into(), "secret".into()],
            allow_secrets: true,
            service_accounts: vec!["trainer-with-bucket-access".into()],
        };
        for template in [
            "{volumes: [{name: host, hostPath: {path: /data}}]}",
            "{volumes: [{name: s, secret: {secretName: k}}]}",
            "{env: [{name: T, valueFrom: {secretKeyRef: {name: x, key: k}}}]}",
            "{serviceAccountName: trainer-with-bucket-access}",
        ] {
            assert_eq!(verdict(&p, template), "", "{template}");
        }
        assert!(
            verdict(&p, "{volumes: [{name: e, emptyDir: {}}]}").contains("emptyDir is not allowed")
        );
    }
}
