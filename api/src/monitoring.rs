//! The `ModelMonitor` resource: post-deployment monitoring at a hospital.
//!
//! A ModelMonitor sits beside the site's SiteValidator, with the same key and the same trust:
//! on a cron schedule it starts a pod that runs `radfm monitor` on the version the site runs
//! (an alias, `production` by default), comparing the site's recent cases with the reference
//! window the model was validated on. The pod signs the aggregates and stores them beside the
//! version in the registry; the controller reads that report back and says what it found in a
//! `Drifting` condition, events and Prometheus metrics. Scheduling copies CronJob (schedule,
//! timeZone, startingDeadlineSeconds, suspend) so that MLOps teams meet nothing new.

use k8s_openapi::api::core::v1::Volume;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::site_validation::{KeySecretRef, RegistryStore};
use crate::trainingjob::{DatasetSpec, SecretRef};

/// Longest ModelMonitor name: its pods are labelled with it (63) and named after it with
/// `-<minutes since epoch>` appended.
pub const MAX_NAME_LEN: usize = 52;

/// The CEL rule that keeps identifying fields out of `fields` (a test keeps it equal to
/// [`crate::site_validation::IDENTIFIER_FIELDS`]).
const FIELDS_RULE: &str = "self.all(f, !(f in ['patient', 'study', 'key', 'frame', 'width', 'height', 'rescale_slope', 'rescale_intercept']))";

/// Desired state of a ModelMonitor.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "radfm.io",
    version = "v1alpha1",
    kind = "ModelMonitor",
    doc = "Watches the model version a site runs for drift on the site's recent data, on a schedule, and publishes signed monitor reports (see docs/monitoring.md).",
    plural = "modelmonitors",
    shortname = "mm",
    category = "radfm",
    namespaced,
    cel,
    status = "ModelMonitorStatus",
    printcolumn = r#"{"name": "Site", "type": "string", "jsonPath": ".spec.siteId", "description": "Site identifier"}"#,
    printcolumn = r#"{"name": "Model", "type": "string", "jsonPath": ".spec.model", "description": "Registry model"}"#,
    printcolumn = r#"{"name": "Version", "type": "integer", "jsonPath": ".status.lastLook.version", "description": "Version of the last look"}"#,
    printcolumn = r#"{"name": "Drifting", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Drifting\")].status", "description": "The last look found drift"}"#,
    printcolumn = r#"{"name": "Last Look", "type": "date", "jsonPath": ".status.lastLook.time"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#,
    validation = Rule::new("size(self.metadata.name) <= 52").message("metadata.name must be at most 52 characters (it labels and names the monitor's pods)"),
)]
#[serde(rename_all = "camelCase")]
pub struct ModelMonitorSpec {
    /// This site's identifier, as the registry and the hub's trust lists know it.
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message("siteId must be lowercase letters, digits and -"))]
    pub site_id: String,
    /// Secret holding the site's ed25519 signing key (hex seed, `radfm keygen`): the one its
    /// SiteValidator signs with.
    pub signing_key_secret_ref: KeySecretRef,
    /// Shared model registry URI.
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new("self.matches('^(s3|gs|az|file)://.+')").message("registry must start with s3://, gs://, az:// or file://"))]
    pub registry: String,
    /// Model name in the registry.
    #[schemars(length(min = 1))]
    pub model: String,
    /// Alias of the version this site runs.
    #[serde(default = "default_deployed")]
    #[schemars(length(min = 1))]
    pub deployed_alias: String,
    /// Cron schedule of the looks (5 fields, or @hourly, @daily, @weekly, @monthly).
    #[schemars(length(min = 1))]
    pub schedule: String,
    /// IANA time zone of the schedule (for example Europe/Berlin); default UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    /// A look later than this many seconds after its scheduled time is skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub starting_deadline_seconds: Option<i64>,
    /// No new looks while true; a look in progress finishes.
    #[serde(default)]
    pub suspend: bool,
    /// The reference window: the site's data the deployed version was validated on (labelled
    /// when `task` is set). `shards` selects part of its index.
    pub reference: DatasetSpec,
    /// The site's recent cases (labels not needed), in a dataset the site fills; `shards`
    /// selects part of its index.
    pub recent: DatasetSpec,
    /// A volume holding the site's data (in the Pod's `volumes` syntax; its name is ignored),
    /// mounted read-only at [`crate::site_validation::DATA_MOUNT_PATH`] in the monitor's pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::trainingjob::opaque_object")]
    pub data_volume: Option<Volume>,
    /// A 0/1 label of the reference window: a probe fitted on it scores both windows and the
    /// scores' distribution is compared (output drift).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// Metadata fields whose mix is compared (scanner, sex, age band, ...); identifiers are
    /// refused.
    #[serde(default = "default_fields")]
    #[schemars(length(max = 16), inner(length(max = 63)))]
    #[x_kube(validation = Rule::new(FIELDS_RULE).message("fields cannot name identifying fields (patient, study, key, frame, width, height, rescale_slope, rescale_intercept)"))]
    pub fields: Vec<String>,
    /// Smallest subgroup cell whose performance is reported once the recent window's labels
    /// arrive (the same disclosure control as site reports; at least 10).
    #[serde(default = "default_min_cell")]
    #[x_kube(validation = Rule::new("self >= 10").message("minCellSize must be at least 10"))]
    pub min_cell_size: i32,
    /// Drop in AUROC that a look tolerates before a cell's performance counts as worse.
    #[serde(default = "default_performance_margin")]
    #[x_kube(validation = Rule::new("self >= 0.0 && self < 1.0").message("performanceMargin must be in [0, 1)"))]
    pub performance_margin: f64,
    /// False-alarm level of one look, for the drift statistics together and for the
    /// performance statistics together (Holm within each).
    #[serde(default = "default_alpha")]
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 0.2").message("alpha must be in (0, 0.2]"))]
    pub alpha: f64,
    /// Permutations behind each p-value (enough for `alpha` over every statistic, or the look
    /// is refused).
    #[serde(default = "default_permutations")]
    #[x_kube(validation = Rule::new("self >= 19 && self <= 9999").message("permutations must be in [19, 9999]"))]
    pub permutations: i32,
    /// Image of the monitor's pods (it runs `radfm monitor`).
    #[schemars(length(min = 1))]
    pub image: String,
    /// Secret whose keys become environment variables of the monitor's pods (registry
    /// credentials).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretRef>,
    /// The hub's store, when the registry is not in the site's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_store: Option<RegistryStore>,
    /// Looks kept in `status.looks` (newest first).
    #[serde(default = "default_history")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 50").message("looksHistoryLimit must be in [1, 50]"))]
    pub looks_history_limit: i32,
}

fn default_deployed() -> String {
    "production".into()
}
fn default_fields() -> Vec<String> {
    vec!["manufacturer".into(), "sex".into(), "age_band".into()]
}
fn default_alpha() -> f64 {
    0.01
}
fn default_permutations() -> i32 {
    999
}
fn default_min_cell() -> i32 {
    20
}
fn default_performance_margin() -> f64 {
    0.02
}
fn default_history() -> i32 {
    10
}

/// Observed state of a ModelMonitor.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelMonitorStatus {
    /// Conditions: Ready (spec usable, registry readable), Looking (a look's pod runs),
    /// Drifting (the last look at the deployed version found drift; Unknown before the first
    /// look at it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The metadata.generation this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The last scheduled time that was handled (looked, skipped or missed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<Time>,
    /// The next scheduled time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_schedule_time: Option<Time>,
    /// The pod of the look in progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<String>,
    /// The newest look with a report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_look: Option<Look>,
    /// Recent looks, newest first (at most `looksHistoryLimit`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub looks: Vec<Look>,
}

/// One look, as the signed report in the registry says.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Look {
    /// The pod that looked (the report's look identifier).
    pub pod: String,
    /// The version looked at.
    pub version: i64,
    /// The scheduled time of the look.
    pub scheduled: Time,
    /// When the report was signed (the site's clock).
    pub time: Time,
    /// Drifting or Stable.
    pub verdict: Verdict,
    /// Family-wise false-alarm level of the look.
    pub alpha: f64,
    /// Every statistic of the look.
    #[serde(default)]
    pub statistics: Vec<Statistic>,
    /// Where the signed report is.
    pub report: String,
}

/// What a look found.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum Verdict {
    /// At least one statistic drifted.
    Drifting,
    /// No statistic drifted.
    Stable,
}

/// One statistic of a look.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Statistic {
    /// What was compared: `embeddings`, `scores:lesion`, `metadata:manufacturer`.
    pub name: String,
    /// The test statistic (MMD², KS distance or χ²).
    pub value: f64,
    /// Holm-adjusted permutation p-value.
    pub adjusted_p: f64,
    /// Below the look's alpha.
    pub drifting: bool,
}

impl Look {
    /// The drifting statistics as `name (adjusted p = …)`.
    pub fn evidence(&self) -> Vec<String> {
        self.statistics
            .iter()
            .filter(|s| s.drifting)
            .map(|s| format!("{} (adjusted p = {:.4})", s.name, s.adjusted_p))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(extra: &str) -> String {
        let yaml = format!(
            "apiVersion: radfm.io/v1alpha1
kind: ModelMonitor
metadata: {{name: north}}
spec:
  siteId: north
  signingKeySecretRef: {{name: north-key}}
  registry: 's3://r'
  model: chest
  schedule: '0 6 * * *'
  reference: {{uri: 's3://site/reference'}}
  recent: {{uri: 's3://site/recent'}}
  image: i
{extra}"
        );
        let mm: ModelMonitor = serde_yaml_ng::from_str(&yaml).unwrap();
        mm.validate_cel()
            .map(|()| String::new())
            .unwrap_or_else(|e| e.to_string())
    }

    #[test]
    fn a_monitor_gets_the_api_servers_rules() {
        assert_eq!(refusal(""), "");
        assert_eq!(refusal("  fields: [scanner, sex]\n  alpha: 0.05"), "");
        assert!(refusal("  fields: [sex, patient]").contains("fields cannot name identifying"));
        assert!(refusal("  alpha: 0").contains("alpha must be in (0, 0.2]"));
        assert!(refusal("  alpha: 0.5").contains("alpha must be in (0, 0.2]"));
        assert!(refusal("  permutations: 5").contains("permutations must be in [19, 9999]"));
        assert!(refusal("  looksHistoryLimit: 0").contains("looksHistoryLimit"));
    }

    #[test]
    fn identifying_fields_are_never_compared() {
        for field in crate::site_validation::IDENTIFIER_FIELDS {
            assert!(FIELDS_RULE.contains(&format!("'{field}'")), "{field}");
        }
        assert_eq!(
            FIELDS_RULE.matches('\'').count(),
            crate::site_validation::IDENTIFIER_FIELDS.len() * 2
        );
    }

    #[test]
    fn a_looks_evidence_names_only_the_drifting_statistics() {
        let stat = |name: &str, p: f64| Statistic {
            name: name.into(),
            value: 1.0,
            adjusted_p: p,
            drifting: p < 0.01,
        };
        let look = Look {
            pod: "north-1".into(),
            version: 3,
            scheduled: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
            time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
            verdict: Verdict::Drifting,
            alpha: 0.01,
            statistics: vec![stat("embeddings", 0.001), stat("metadata:sex", 0.4)],
            report: "s3://r/x.json".into(),
        };
        assert_eq!(look.evidence(), ["embeddings (adjusted p = 0.0010)"]);
    }
}
