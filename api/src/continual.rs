//! The `ContinualTraining` custom resource: retrain a foundation model on a schedule when enough
//! new data has landed, starting from the current model, and register every result with its
//! lineage.
//!
//! Scheduling copies Kubernetes CronJob (schedule, timeZone, concurrencyPolicy,
//! startingDeadlineSeconds, suspend, history limits) so that MLOps teams meet nothing new; the
//! data trigger, the replay fraction, the base model and the registration are what a CronJob
//! cannot express. Each run is an ordinary TrainingJob built from `jobTemplate`.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::failure::FailurePolicy;
use crate::trainingjob::{
    CheckpointSpec, DatasetSpec, ExportSpec, ModelSpec, PullPolicy, RunPolicy, TrainingJobSpec,
    TrainingSpec, WorkersSpec,
};

/// Longest ContinualTraining name: run names append `-<minutes since epoch>` (9 digits) and must
/// stay within the TrainingJob limit of 40 characters.
pub const MAX_NAME_LEN: usize = 30;

/// Label on every TrainingJob a ContinualTraining created, holding its name.
pub const LABEL_CONTINUAL: &str = "radfm.io/continual-training";
/// Annotation of a run: the scheduled time it was created for (RFC 3339).
pub const ANNOTATION_SCHEDULED: &str = "radfm.io/scheduled-time";
/// Annotation of a run: its data window (JSON of [`RunWindow`]).
pub const ANNOTATION_WINDOW: &str = "radfm.io/data-window";
/// Annotation of a run: the registry version it started from (absent: random initialisation).
pub const ANNOTATION_BASE_VERSION: &str = "radfm.io/base-version";

/// Desired state of a ContinualTraining.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "radfm.io",
    version = "v1alpha1",
    kind = "ContinualTraining",
    doc = "Retrains a model on a schedule when new data lands and registers each version with its lineage (see docs/continual.md).",
    plural = "continualtrainings",
    shortname = "ct",
    category = "radfm",
    namespaced,
    cel,
    status = "ContinualTrainingStatus",
    printcolumn(name = "Schedule", type_ = "string", json_path = ".spec.schedule", description = "Cron schedule"),
    printcolumn(name = "Suspend", type_ = "boolean", json_path = ".spec.suspend", description = "Scheduling suspended"),
    printcolumn(name = "Active", type_ = "integer", json_path = ".status.activeCount", description = "Runs in progress"),
    printcolumn(name = "Watermark", type_ = "integer", json_path = ".status.dataWatermark", description = "Last shard trained on"),
    printcolumn(name = "Version", type_ = "integer", json_path = ".status.lastRegisteredVersion", description = "Last registered model version"),
    printcolumn(name = "Last Schedule", type_ = "date", json_path = ".status.lastScheduleTime"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.metadata.name.size() <= 30 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')")
        .message("metadata.name must be a DNS-1035 label of at most 30 characters (run names append -<minutes>)"),
)]
#[serde(rename_all = "camelCase")]
pub struct ContinualTrainingSpec {
    /// Cron schedule (5 fields, or @hourly, @daily, @weekly, @monthly) at which the trigger is
    /// evaluated.
    #[schemars(length(min = 1))]
    pub schedule: String,
    /// IANA time zone of the schedule (for example Europe/Berlin); default UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    /// When new data justifies a run.
    #[serde(default)]
    pub trigger: TriggerSpec,
    /// What happens when a run is due while another is active: Allow, Forbid (default) or
    /// Replace.
    #[serde(default)]
    pub concurrency_policy: ConcurrencyPolicy,
    /// A run later than this many seconds after its scheduled time is skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub starting_deadline_seconds: Option<i64>,
    /// No new runs while true; active runs continue.
    #[serde(default)]
    pub suspend: bool,
    /// Finished successful runs kept.
    #[serde(default = "default_ok_history")]
    #[schemars(range(min = 0, max = 100))]
    pub successful_jobs_history_limit: i32,
    /// Finished failed runs kept.
    #[serde(default = "default_failed_history")]
    #[schemars(range(min = 0, max = 100))]
    pub failed_jobs_history_limit: i32,
    /// The dataset whose index is watched; runs train on its shards after the watermark.
    pub dataset: DatasetSpec,
    /// Fraction of earlier shards mixed into each run against forgetting (a seeded sample of
    /// `replay` x new shards, at least one when earlier shards exist).
    #[serde(default)]
    #[x_kube(validation = Rule::new("self >= 0.0 && self <= 1.0").message("replay must be in [0, 1]"))]
    pub replay: f64,
    /// Model registry URI (s3://, gs://, az:// or file://) holding the base model and receiving
    /// the new versions.
    #[x_kube(validation = Rule::new("self.matches('^(s3|gs|az|file)://.+')").message("registry must start with s3://, gs://, az:// or file://"))]
    pub registry: String,
    /// The model version each run starts from. Empty: the version this resource registered
    /// last (random initialisation for the first run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model: Option<BaseModel>,
    /// The TrainingJob each run is made from.
    pub job_template: JobTemplate,
    /// Where new versions are registered.
    pub register: RegisterSpec,
}

fn default_ok_history() -> i32 {
    3
}
fn default_failed_history() -> i32 {
    1
}

/// When new data justifies a run (evaluated at scheduled times).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TriggerSpec {
    /// Run when at least this many shards arrived after the watermark.
    #[serde(default = "default_min_new_shards")]
    #[schemars(range(min = 1))]
    pub min_new_shards: i64,
    /// Also run with fewer new shards (but at least one) once this long has passed since the
    /// last successful run, as a Go duration (`168h`, `90m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("duration(self) > duration('0s')").message("trigger.maxInterval must be a positive duration like 24h or 90m"))]
    pub max_interval: Option<String>,
    /// Also run with fewer new shards (but at least one) when sites' ModelMonitors report drift
    /// of the monitored version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<DriftTrigger>,
}

impl Default for TriggerSpec {
    fn default() -> Self {
        TriggerSpec {
            min_new_shards: default_min_new_shards(),
            max_interval: None,
            drift: None,
        }
    }
}

/// Drift at sites as a reason to retrain: signed monitor reports of the monitored version that
/// found drift, from trusted sites, newer than the last successful run.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minSites <= size(self.trustedSites)").message("trigger.drift.minSites cannot exceed the number of trustedSites").field_path(".minSites"))]
pub struct DriftTrigger {
    /// Sites whose signed monitor reports count, with their ed25519 public keys (the keys their
    /// ModelMonitors and SiteValidators sign with).
    #[schemars(length(min = 1, max = 256))]
    pub trusted_sites: Vec<crate::site_validation::TrustedSite>,
    /// Drifting sites needed for a run.
    #[serde(default = "default_min_sites")]
    #[x_kube(validation = Rule::new("self >= 1").message("trigger.drift.minSites must be at least 1"))]
    pub min_sites: i32,
    /// Alias of the monitored version, in the base model's registry model (spec.baseModel, or
    /// spec.register.model).
    #[serde(default = "default_base_alias")]
    #[schemars(length(min = 1))]
    pub alias: String,
    /// Which of a monitor report's findings make its site count: any (the default), only drift
    /// of the inputs and outputs (embeddings, metadata, scores), or only a drop in performance
    /// once late labels arrived.
    #[serde(default)]
    pub signal: MonitorSignal,
}

/// The findings of a site's monitor report that count for a drift trigger.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
pub enum MonitorSignal {
    /// Drift of inputs or outputs, or a drop in performance.
    #[default]
    Any,
    /// Drift of the embeddings, the image metadata or the scores, whatever the labels say.
    Drift,
    /// A drop in performance (AUROC) beyond the monitor's margin, from late labels.
    PerformanceDrop,
}

fn default_min_sites() -> i32 {
    1
}

/// Annotation of a run: why it was created (JSON of [`RunTrigger`]).
pub const ANNOTATION_TRIGGER: &str = "radfm.io/trigger";

/// Why a run was created, as its TrainingJob and its registered version record it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RunTrigger {
    /// Which rule of `spec.trigger` held.
    pub kind: TriggerKind,
    /// One line for people.
    pub summary: String,
    /// For a drift trigger: each drifting site's evidence.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drift: Vec<SiteDrift>,
}

/// The rules of `spec.trigger`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TriggerKind {
    /// At least `minNewShards` new shards.
    NewData,
    /// Fewer new shards, but `maxInterval` passed since the last successful run.
    MaxInterval,
    /// Fewer new shards, but drift at `drift.minSites` trusted sites.
    Drift,
}

/// A site's signed monitor report that found drift.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SiteDrift {
    /// The site.
    pub site: String,
    /// The monitored model.
    pub model: String,
    /// The monitored version.
    pub version: u64,
    /// Where the signed report is.
    pub report: String,
    /// When the site signed it.
    pub created: String,
    /// The statistics that drifted, with their adjusted p-values.
    pub evidence: Vec<String>,
}

fn default_min_new_shards() -> i64 {
    1
}

/// CronJob's concurrency policies.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
pub enum ConcurrencyPolicy {
    /// Runs may overlap.
    Allow,
    /// A due run is skipped while another is active.
    #[default]
    Forbid,
    /// The active runs are deleted and the new one starts.
    Replace,
}

/// A registered model version to start from.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BaseModel {
    /// Model name in the registry.
    #[schemars(length(min = 1))]
    pub model: String,
    /// Alias resolved when a run is created (default `production`). A model that does not exist
    /// yet means a first run from random initialisation; a missing alias of an existing model is
    /// an error.
    #[serde(default = "default_base_alias")]
    pub alias: String,
}

fn default_base_alias() -> String {
    "production".into()
}

/// Registration of each successful run.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RegisterSpec {
    /// Model name new versions are registered under.
    #[schemars(length(min = 1))]
    pub model: String,
    /// Alias moved to each new version (default `candidate`; promotion to production is a
    /// separate, gated decision: `production`, and the alias of the model's governing
    /// PromotionPolicy, are refused).
    #[serde(default = "default_register_alias")]
    #[x_kube(validation = Rule::new("self != 'production'").message("register.alias cannot be production: promotion is the PromotionPolicy gate's decision"))]
    pub alias: String,
}

fn default_register_alias() -> String {
    "candidate".into()
}

/// The TrainingJob of each run: a TrainingJob spec without the fields the controller fills in
/// (dataset and its shard window, `model.initFrom`, the export folder).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JobTemplate {
    /// Extra labels of each run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// Trainer container image.
    #[schemars(length(min = 1))]
    pub image: String,
    /// Image pull policy of the trainer container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
    /// The gang of worker pods.
    pub workers: WorkersSpec,
    /// The model (initFrom is set per run from the base model).
    #[serde(default)]
    pub model: ModelSpec,
    /// Optimisation settings.
    #[serde(default)]
    pub training: TrainingSpec,
    /// Checkpoint settings; each run writes under `<uri>/<run name>`, and exports its encoder to
    /// `<uri>/<run name>/export`.
    pub checkpoint: CheckpointSpec,
    /// Restart budget, deadline and clean-up of each run (suspend is ignored).
    #[serde(default)]
    pub run_policy: RunPolicy,
    /// Failure policy of each run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_policy: Option<FailurePolicy>,
}

impl JobTemplate {
    /// The TrainingJob spec of run `run`: its own checkpoint and export folders, the dataset
    /// restricted to `shards`, started from `init_from`.
    pub fn job_spec(
        &self,
        run: &str,
        dataset: &DatasetSpec,
        shards: &[u64],
        init_from: Option<String>,
    ) -> TrainingJobSpec {
        let base = self.checkpoint.uri.trim_end_matches('/');
        let mut model = self.model.clone();
        model.init_from = init_from;
        let mut run_policy = self.run_policy.clone();
        run_policy.suspend = false;
        TrainingJobSpec {
            image: self.image.clone(),
            image_pull_policy: self.image_pull_policy,
            workers: self.workers.clone(),
            dataset: DatasetSpec {
                shards: Some(crate::trainingjob::format_shards(shards)),
                ..dataset.clone()
            },
            model,
            training: self.training.clone(),
            checkpoint: CheckpointSpec {
                uri: format!("{base}/{run}"),
                ..self.checkpoint.clone()
            },
            export: Some(ExportSpec {
                uri: format!("{base}/{run}/export"),
            }),
            run_policy,
            failure_policy: self.failure_policy.clone(),
            managed_by: None,
        }
    }
}

/// The data window of a run, as recorded on its TrainingJob.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RunWindow {
    /// Shards after the watermark, and those returned by rejected candidates.
    pub new: Vec<u64>,
    /// Of `new`, the shards only candidates the gate rejected had trained on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub returned: Vec<u64>,
    /// Earlier shards replayed.
    pub replay: Vec<u64>,
    /// The watermark once this run is registered.
    pub next_watermark: Option<u64>,
}

/// Observed state of a ContinualTraining.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContinualTrainingStatus {
    /// Conditions: Ready (the spec is usable), Active (a run is in progress), DataReady (new
    /// data justified the last scheduled evaluation).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The metadata.generation this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The last scheduled time that was handled (run, skipped or missed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<Time>,
    /// The next scheduled time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_schedule_time: Option<Time>,
    /// Names of the runs in progress.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub active: Vec<String>,
    /// Number of runs in progress, for `kubectl get`.
    #[serde(default)]
    pub active_count: i32,
    /// When the last run succeeded and was registered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_successful_time: Option<Time>,
    /// Sequence number of the last shard trained on by a registered run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_watermark: Option<i64>,
    /// The last version registered by this resource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_registered_version: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_alias(alias: &str) -> String {
        let ct: ContinualTraining = serde_yaml_ng::from_str(&format!(
            "apiVersion: radfm.io/v1alpha1
kind: ContinualTraining
metadata: {{name: chest}}
spec:
  schedule: '0 2 * * *'
  dataset: {{uri: 's3://d'}}
  registry: 's3://r'
  register: {{model: chest, alias: {alias}}}
  jobTemplate:
    image: i
    workers: {{replicas: 1}}
    checkpoint: {{uri: 's3://c'}}
    training: {{steps: 10}}
"
        ))
        .unwrap();
        ct.validate_cel()
            .map(|()| String::new())
            .unwrap_or_else(|e| e.to_string())
    }

    #[test]
    fn continual_training_registers_candidates_and_never_production() {
        assert_eq!(with_alias("candidate"), "");
        assert!(
            with_alias("production").contains("register.alias cannot be production"),
            "{}",
            with_alias("production")
        );
    }
}
