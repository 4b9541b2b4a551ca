//! Decentralised clinical validation resources.
//!
//! A `SiteValidator` runs inside a hospital's cluster: it notices candidate model versions in the
//! shared registry, validates them on the site's own labelled images (which never leave) and
//! publishes a signed report of aggregate metrics. A `PromotionPolicy` runs next to the registry:
//! it trusts a set of site keys and decides, from the verified reports, whether the candidate
//! replaces production, with machine-readable reasons (the modification protocol and performance
//! evaluation of an FDA predetermined change control plan).

use k8s_openapi::api::core::v1::Volume;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::trainingjob::{DatasetSpec, SecretRef};

/// Where a SiteValidator's `dataVolume` is mounted in its validation pods.
pub const DATA_MOUNT_PATH: &str = "/data";

/// No site report may publish subgroup cells smaller than this (the common threshold of health
/// statistics offices is 10 or 11).
pub const MIN_CELL_FLOOR: i32 = 10;

/// Metadata fields that identify a patient or an image: never subgroups.
pub const IDENTIFIER_FIELDS: &[&str] = &[
    "patient",
    "study",
    "key",
    "frame",
    "width",
    "height",
    "rescale_slope",
    "rescale_intercept",
];

/// The CEL rule that keeps [`IDENTIFIER_FIELDS`] out of `subgroups` (a test keeps both equal).
const SUBGROUPS_RULE: &str = "self.all(f, !(f in ['patient', 'study', 'key', 'frame', 'width', 'height', 'rescale_slope', 'rescale_intercept']))";

/// Desired state of a SiteValidator.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "radfm.io",
    version = "v1alpha1",
    kind = "SiteValidator",
    doc = "Validates candidate model versions on this site's data and publishes signed aggregate reports (see docs/validation.md).",
    plural = "sitevalidators",
    shortname = "sv",
    category = "radfm",
    namespaced,
    cel,
    status = "SiteValidatorStatus",
    printcolumn = r#"{"name": "Site", "type": "string", "jsonPath": ".spec.siteId", "description": "Site identifier"}"#,
    printcolumn = r#"{"name": "Model", "type": "string", "jsonPath": ".spec.model", "description": "Registry model"}"#,
    printcolumn = r#"{"name": "Validated", "type": "integer", "jsonPath": ".status.lastValidatedVersion", "description": "Last version validated"}"#,
    printcolumn = r#"{"name": "Running", "type": "string", "jsonPath": ".status.running", "description": "Validation pod in progress"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct SiteValidatorSpec {
    /// This site's identifier, as the promotion policy knows it.
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message("siteId must be lowercase letters, digits and -"))]
    pub site_id: String,
    /// Secret holding the site's ed25519 signing key (hex seed, `radfm keygen`).
    pub signing_key_secret_ref: KeySecretRef,
    /// Shared model registry URI.
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new("self.matches('^(s3|gs|az|file)://.+')").message("registry must start with s3://, gs://, az:// or file://"))]
    pub registry: String,
    /// Model name in the registry.
    #[schemars(length(min = 1))]
    pub model: String,
    /// The site's labelled images; they are read only by the validation pod and never leave.
    /// On object storage: an `s3://`/`gs://`/`az://` URI with `dataset.credentialsSecretRef`;
    /// on a volume: `dataVolume` and a `file:///data/...` URI.
    pub dataset: DatasetSpec,
    /// A volume holding the site's data (a PersistentVolumeClaim or any other volume source, in
    /// the Pod's `volumes` syntax; its name is ignored), mounted read-only at [`DATA_MOUNT_PATH`]
    /// in the validation pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::trainingjob::opaque_object")]
    pub data_volume: Option<Volume>,
    /// Clinical tasks to validate.
    #[schemars(length(min = 1))]
    pub tasks: Vec<TaskSpec>,
    /// Metadata fields reported per subgroup (sex, age_band, scanner, view, ...); identifiers
    /// (patient, study, ...) are refused.
    #[serde(default)]
    #[schemars(length(max = 16), inner(length(max = 63)))]
    #[x_kube(validation = Rule::new(SUBGROUPS_RULE).message("subgroups cannot name identifying fields (patient, study, key, frame, width, height, rescale_slope, rescale_intercept)"))]
    pub subgroups: Vec<String>,
    /// Subgroups with fewer cases are suppressed, not reported, with the cells that would reveal
    /// them by subtraction (at least 10).
    #[serde(default = "default_min_cell")]
    #[x_kube(validation = Rule::new("self >= 10").message("minCellSize must be at least 10"))]
    pub min_cell_size: i32,
    /// Seconds between looks at the registry.
    #[serde(default = "default_poll")]
    #[schemars(range(min = 5))]
    pub poll_interval_seconds: i64,
    /// Alias of the versions to validate.
    #[serde(default = "default_candidate")]
    pub candidate_alias: String,
    /// Alias of the baseline compared against.
    #[serde(default = "default_production")]
    pub baseline_alias: String,
    /// Image of the validation pod (it runs `radfm validate`).
    #[schemars(length(min = 1))]
    pub image: String,
    /// Secret whose keys become environment variables of the validation pod (registry and
    /// dataset credentials).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretRef>,
    /// The hub's store, when it is not the site's: its settings and the URIs they are for (the
    /// registry and the model folders its versions point at), beside the site's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_store: Option<RegistryStore>,
}

/// Another organisation's store a pod reads with its own settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RegistryStore {
    /// Secret whose keys are the store's settings (AWS_*, GOOGLE_*, AZURE_*).
    pub credentials_secret_ref: SecretRef,
    /// URI prefixes the settings are for (default: the registry); list the folders the
    /// registry's versions are exported to as well (`s3://hub-models/`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub uri_prefixes: Vec<String>,
}

/// The prefix a pod sees a registry store's settings under.
pub const REGISTRY_ENV_PREFIX: &str = "RADFM_REGISTRY_";

/// A Secret key holding a signing key.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KeySecretRef {
    /// Secret name.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Key within the Secret.
    #[serde(default = "default_key_name")]
    pub key: String,
}

fn default_key_name() -> String {
    "ed25519.key".into()
}

/// A binary clinical task.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TaskSpec {
    /// Label or metadata field (`lesion`).
    #[schemars(length(min = 1))]
    pub label: String,
    /// Value counted as positive; empty: the label is 0/1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub positive_class: Option<String>,
}

impl TaskSpec {
    /// The task's name in reports: `lesion`, or `finding=effusion`.
    pub fn name(&self) -> String {
        match &self.positive_class {
            Some(p) => format!("{}={p}", self.label),
            None => self.label.clone(),
        }
    }
}

fn default_min_cell() -> i32 {
    20
}

fn default_poll() -> i64 {
    300
}
fn default_candidate() -> String {
    "candidate".into()
}
fn default_production() -> String {
    "production".into()
}

/// Observed state of a SiteValidator.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SiteValidatorStatus {
    /// Conditions: Ready (registry reachable), Validating (a pod runs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The metadata.generation this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When the registry was last read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_poll_time: Option<Time>,
    /// The last version whose report this site published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_validated_version: Option<i64>,
    /// The validation pod in progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<String>,
}

/// Desired state of a PromotionPolicy.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "radfm.io",
    version = "v1alpha1",
    kind = "PromotionPolicy",
    doc = "Decides from signed site reports whether a candidate model version replaces production (see docs/validation.md).",
    plural = "promotionpolicies",
    shortname = "pp",
    category = "radfm",
    namespaced,
    cel,
    status = "PromotionPolicyStatus",
    printcolumn = r#"{"name": "Model", "type": "string", "jsonPath": ".spec.model", "description": "Registry model"}"#,
    printcolumn = r#"{"name": "Candidate", "type": "integer", "jsonPath": ".status.lastDecision.version", "description": "Candidate version decided on"}"#,
    printcolumn = r#"{"name": "Decision", "type": "string", "jsonPath": ".status.lastDecision.outcome", "description": "Promote, Reject or HoldForReview"}"#,
    printcolumn = r#"{"name": "Production", "type": "integer", "jsonPath": ".status.production", "description": "Version production points to"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.quorum <= size(self.trustedSites)").message("quorum cannot exceed the number of trustedSites").field_path(".quorum"))]
#[x_kube(validation = Rule::new("!self.requireApproval || size(self.approvers) > 0").message("requireApproval needs at least one approver").field_path(".approvers"))]
pub struct PromotionPolicySpec {
    /// Model registry URI.
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new("self.matches('^(s3|gs|az|file)://.+')").message("registry must start with s3://, gs://, az:// or file://"))]
    pub registry: String,
    /// Model name.
    #[schemars(length(min = 1))]
    pub model: String,
    /// The task whose AUROC decides (a task name of the site reports, `lesion`).
    #[schemars(length(min = 1))]
    pub task: String,
    /// Sites whose signed reports count, with their ed25519 public keys.
    #[schemars(length(min = 1, max = 256))]
    pub trusted_sites: Vec<TrustedSite>,
    /// Valid reports needed before deciding (at most the number of trusted sites).
    #[x_kube(validation = Rule::new("self >= 1").message("quorum must be at least 1"))]
    pub quorum: i32,
    /// Non-inferiority margin δ: the lower 95 % bound of candidate − production AUROC must be
    /// at least −δ, overall and in every reported subgroup of every site.
    #[serde(default = "default_margin")]
    #[x_kube(validation = Rule::new("self >= 0.0 && self < 1.0").message("nonInferiorityMargin must be in [0, 1)"))]
    pub non_inferiority_margin: f64,
    /// Largest allowed AUROC gap between the best and the worst subgroup of one field at one
    /// site, for the candidate.
    #[serde(default = "default_gap")]
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 1.0").message("maxWorstGroupGap must be in (0, 1]"))]
    pub max_worst_group_gap: f64,
    /// Largest allowed underdiagnosis: a cell's false-negative rate minus that of all cases at
    /// the same site, for the candidate. A candidate is rejected where the lower 95 % bound of
    /// that gap exceeds this in any reported cell, intersections included. Unset: not checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 1.0").message("maxFalseNegativeRateGap must be in (0, 1]"))]
    pub max_false_negative_rate_gap: Option<f64>,
    /// Largest allowed expected calibration error (10 bins) of the candidate, on all cases and
    /// in every reported cell; rejected where the lower 95 % bound exceeds it. Unset: not
    /// checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 1.0").message("maxCalibrationError must be in (0, 1]"))]
    pub max_calibration_error: Option<f64>,
    /// Subgroups (`sex=F`) that at least one valid report must cover.
    #[serde(default)]
    pub required_subgroups: Vec<String>,
    /// Promotion also needs a human approval: a statement signed by one of `approvers`
    /// (`radfm approve`), about exactly the candidate.
    #[serde(default)]
    pub require_approval: bool,
    /// People whose signed approvals count, with their ed25519 public keys.
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub approvers: Vec<Approver>,
    /// Reports dated further in the future than this (site clock skew) are refused.
    #[serde(default = "default_skew")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 86400").message("maxClockSkewSeconds must be in [0, 86400]"))]
    pub max_clock_skew_seconds: i64,
    /// Reports whose minimum cell size is smaller, or whose disclosure control is weaker than
    /// this code's, are refused (at least 10).
    #[serde(default = "default_min_cell")]
    #[x_kube(validation = Rule::new("self >= 10").message("minCellSize must be at least 10"))]
    pub min_cell_size: i32,
    /// Roll production back to the version before it when its monitoring shows harm: trusted
    /// sites' signed monitor reports (ModelMonitor, `radfm monitor`) of the production version,
    /// dated after its promotion, that found its performance dropped once labels arrived. Unset:
    /// production is never moved back automatically.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<RollbackSpec>,
    /// Alias of the versions under decision.
    #[serde(default = "default_candidate")]
    pub candidate_alias: String,
    /// Alias a promotion moves.
    #[serde(default = "default_production")]
    pub production_alias: String,
    /// Seconds between looks at the registry.
    #[serde(default = "default_poll")]
    #[x_kube(validation = Rule::new("self >= 5").message("pollIntervalSeconds must be at least 5"))]
    pub poll_interval_seconds: i64,
}

impl PromotionPolicy {
    /// The same rules the API server applies (its CEL), for a policy read from a file
    /// (`radfm gate --policy`): a quorum of 0, margins out of range or an untrusted key format
    /// are refused with the rule's message.
    pub fn validate(&self) -> crate::Result<()> {
        self.validate_cel().map_err(|e| {
            crate::Error::Invalid(format!(
                "PromotionPolicy {}: {e}",
                self.metadata.name.as_deref().unwrap_or("<unnamed>")
            ))
        })
    }
}

fn default_margin() -> f64 {
    0.02
}
fn default_gap() -> f64 {
    0.15
}
fn default_skew() -> i64 {
    300
}

/// When harm after a promotion moves production back.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RollbackSpec {
    /// Trusted sites whose monitoring must show a drop in performance.
    #[serde(default = "default_rollback_sites")]
    #[x_kube(validation = Rule::new("self >= 1").message("rollback.minSites must be at least 1"))]
    pub min_sites: i32,
}

fn default_rollback_sites() -> i32 {
    1
}

/// A site and its public key.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrustedSite {
    /// Site identifier.
    #[schemars(length(min = 1, max = 63))]
    pub site: String,
    /// ed25519 public key, 64 lowercase hex characters (`radfm keygen`).
    #[schemars(length(min = 64, max = 64))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9a-f]{64}$')").message("publicKey must be 64 lowercase hex characters"))]
    pub public_key: String,
}

/// A person who may approve promotions, and their public key.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Approver {
    /// The person's name as approvals carry it (`dr-alice`).
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$')").message("approver names are lowercase letters, digits, - and ."))]
    pub name: String,
    /// ed25519 public key, 64 lowercase hex characters (`radfm keygen`).
    #[schemars(length(min = 64, max = 64))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9a-f]{64}$')").message("publicKey must be 64 lowercase hex characters"))]
    pub public_key: String,
}

/// Observed state of a PromotionPolicy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PromotionPolicyStatus {
    /// Conditions: Ready (registry reachable).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The metadata.generation this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The latest decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_decision: Option<DecisionStatus>,
    /// The version production points to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub production: Option<i64>,
}

/// A decision as shown in the status.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DecisionStatus {
    /// Candidate version decided on.
    pub version: i64,
    /// Promote, Reject or HoldForReview.
    pub outcome: String,
    /// Why, one line per reason.
    #[serde(default)]
    pub reasons: Vec<String>,
    /// Sites whose reports were valid and counted.
    #[serde(default)]
    pub sites: Vec<String>,
    /// When.
    pub time: Time,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(spec: &str) -> PromotionPolicy {
        let spec: PromotionPolicySpec = serde_yaml_ng::from_str(spec).unwrap();
        PromotionPolicy::new("gate", spec)
    }

    const KEY: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn refusal(extra: &str) -> String {
        let p = policy(&format!(
            "{{registry: 's3://r', model: chest, task: lesion, trustedSites: [{{site: a, publicKey: {KEY}}}, {{site: b, publicKey: {KEY}}}], {extra}}}"
        ));
        p.validate()
            .map(|()| String::new())
            .unwrap_or_else(|e| e.to_string())
    }

    #[test]
    fn a_policy_from_a_file_gets_the_api_servers_rules() {
        assert_eq!(refusal("quorum: 2"), "");
        assert!(refusal("quorum: 0").contains("quorum must be at least 1"));
        assert!(refusal("quorum: 3").contains("quorum cannot exceed the number of trustedSites"));
        assert!(
            refusal("quorum: 1, nonInferiorityMargin: 1.5")
                .contains("nonInferiorityMargin must be in [0, 1)")
        );
        assert!(
            refusal("quorum: 1, maxWorstGroupGap: 0")
                .contains("maxWorstGroupGap must be in (0, 1]")
        );
        assert!(refusal("quorum: 1, minCellSize: 5").contains("minCellSize must be at least 10"));
        assert!(refusal("quorum: 1, maxClockSkewSeconds: -1").contains("maxClockSkewSeconds"));
        assert!(
            refusal("quorum: 1, requireApproval: true")
                .contains("requireApproval needs at least one approver")
        );
        assert_eq!(
            refusal(&format!(
                "quorum: 1, requireApproval: true, approvers: [{{name: dr-alice, publicKey: {KEY}}}]"
            )),
            ""
        );
        let p = policy(&format!(
            "{{registry: 's3://r', model: chest, task: lesion, quorum: 1, trustedSites: [{{site: a, publicKey: {}}}]}}",
            KEY.to_uppercase()
        ));
        assert!(
            p.validate()
                .unwrap_err()
                .to_string()
                .contains("publicKey must be 64 lowercase hex")
        );
    }

    #[test]
    fn identifying_fields_are_never_subgroups() {
        for field in IDENTIFIER_FIELDS {
            assert!(SUBGROUPS_RULE.contains(&format!("'{field}'")), "{field}");
        }
        assert_eq!(
            SUBGROUPS_RULE.matches('\'').count(),
            IDENTIFIER_FIELDS.len() * 2
        );
        let validator = |subgroups: &str, min_cell: i32| {
            let spec: SiteValidatorSpec = serde_yaml_ng::from_str(&format!(
                "{{siteId: a, signingKeySecretRef: {{name: k}}, registry: 's3://r', model: chest, dataset: {{uri: 'file:///data'}}, tasks: [{{label: lesion}}], image: i, subgroups: {subgroups}, minCellSize: {min_cell}}}"
            ))
            .unwrap();
            SiteValidator::new("v", spec)
                .validate_cel()
                .map(|()| String::new())
                .unwrap_or_else(|e| e.to_string())
        };
        assert_eq!(validator("[sex, age_band]", 20), "");
        assert!(
            validator("[sex, patient]", 20).contains("subgroups cannot name identifying fields")
        );
        assert!(validator("[sex]", 5).contains("minCellSize must be at least 10"));
    }
}

#[cfg(test)]
mod sample_tests {
    use super::*;

    fn sample(name: &str) -> String {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../manifests/samples")
            .join(name);
        std::fs::read_to_string(&path).unwrap()
    }

    #[test]
    fn the_samples_pass_the_api_servers_rules() {
        let pp: PromotionPolicy = serde_yaml_ng::from_str(&sample("promotionpolicy.yaml")).unwrap();
        pp.validate().unwrap();
        let sv: SiteValidator = serde_yaml_ng::from_str(&sample("sitevalidator.yaml")).unwrap();
        sv.validate_cel().unwrap();
        let ct: crate::ContinualTraining =
            serde_yaml_ng::from_str(&sample("continualtraining.yaml")).unwrap();
        ct.validate_cel().unwrap();
    }
}
