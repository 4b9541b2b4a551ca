//! Federated training resources.
//!
//! A `FederatedTraining` runs in the hub's cluster: it publishes a signed global model per round
//! to an exchange folder on object storage, waits for the listed sites' signed updates until all
//! are in or the round's deadline passes, and has them admitted and aggregated into the next
//! global model. A `FederatedSite` runs in each hospital's cluster: it only makes outbound calls,
//! fetches each round's global model (checking the hub's signature), trains it on the site's
//! own shards with a local TrainingJob, and uploads a signed, bounded update. Images never leave
//! a site (see docs/federated.md).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::continual::JobTemplate;
use crate::site_validation::KeySecretRef;
use crate::trainingjob::{DatasetSpec, SecretRef};

/// The prefix a site's pods see the exchange's store settings under; `RADFM_STORE_SETTINGS`
/// maps the exchange's URI to it (radfm_data::store::STORE_SETTINGS).
pub const EXCHANGE_ENV_PREFIX: &str = "RADFM_EXCHANGE_";

/// Desired state of a FederatedTraining.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "radfm.io",
    version = "v1alpha1",
    kind = "FederatedTraining",
    doc = "Trains a model across hospitals in rounds: signed global models out, signed bounded updates in, robust aggregation (see docs/federated.md).",
    plural = "federatedtrainings",
    shortname = "ft",
    category = "radfm",
    namespaced,
    cel,
    status = "FederatedTrainingStatus",
    printcolumn(name = "Round", type_ = "integer", json_path = ".status.round", description = "Round in progress (or the last one)"),
    printcolumn(name = "Sites", type_ = "string", json_path = ".status.sites", description = "Sites that uploaded to the round / sites listed"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase", description = "Where the federation is"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.metadata.name.size() <= 40 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')")
        .message("metadata.name must be a DNS-1035 label of at most 40 characters (pod names append -r<round>-aggregate)"),
    validation = Rule::new("self.spec.minSites <= self.spec.sites.size()")
        .message("spec.minSites cannot exceed the number of listed sites"),
    validation = Rule::new("has(self.spec.registry) || (!has(self.spec.register) && !has(self.spec.baseModel.registered))")
        .message("spec.registry is needed by spec.register and spec.baseModel.registered"),
)]
#[serde(rename_all = "camelCase")]
pub struct FederatedTrainingSpec {
    /// The model round 1 starts from.
    pub base_model: FederatedBaseModel,
    /// The model registry the base model is resolved in and the result is registered to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new("self.matches('^(s3|gs|az|file)://.+')").message("registry must start with s3://, gs://, az:// or file://"))]
    pub registry: Option<String>,
    /// Registers the result as a new version with the lineage of every round (a candidate:
    /// promotion stays with the PromotionPolicy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub register: Option<FederatedRegister>,
    /// Where the hub and the sites exchange models.
    pub exchange: ExchangeSpec,
    /// Secret holding the hub's ed25519 signing key (hex seed, `radfm keygen`); mounted only
    /// into the hub's publish and aggregate pods.
    pub signing_key_secret_ref: KeySecretRef,
    /// The participating sites and their public keys.
    #[schemars(length(min = 1, max = 64))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub sites: Vec<FederatedSiteEntry>,
    /// Training rounds.
    #[schemars(range(min = 1, max = 10000))]
    pub rounds: u32,
    /// Optimizer steps each site runs per round.
    #[schemars(range(min = 1))]
    pub local_steps: u64,
    /// Fewest sites a round needs; at its deadline a round closes with the sites that uploaded
    /// if there are at least this many, and the federation fails otherwise.
    #[serde(default = "default_min_sites")]
    #[schemars(range(min = 1))]
    pub min_sites: u32,
    /// Seconds a round waits for the sites after its global model is published.
    #[serde(default = "default_round_deadline")]
    #[schemars(range(min = 10))]
    pub round_deadline_seconds: i64,
    /// How the admitted updates are combined.
    #[serde(default)]
    pub aggregator: AggregatorSpec,
    /// Largest update norm admitted; sites clip their updates to it.
    #[x_kube(validation = Rule::new("self > 0.0").message("normBound must be positive"))]
    pub norm_bound: f64,
    /// Client-level differential privacy at aggregation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub differential_privacy: Option<DifferentialPrivacy>,
    /// Element type of the published global models.
    #[serde(default)]
    pub precision: WirePrecision,
    /// Image of the publish and aggregate pods (it runs `radfm federate`).
    #[schemars(length(min = 1))]
    pub image: String,
}

/// The model a federation starts from: a registered version or a URI.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.uri) != has(self.registered)").message("baseModel takes exactly one of uri and registered"))]
pub struct FederatedBaseModel {
    /// A checkpoint folder (its newest committed checkpoint, every variable), a `.safetensors`
    /// file of every variable, or an exported model folder (its encoder; the decoder starts
    /// fresh from a fixed seed, the same at every site).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new("self.matches('^(s3|gs|az|file)://.+')").message("baseModel.uri must start with s3://, gs://, az:// or file://"))]
    pub uri: Option<String>,
    /// A version in `spec.registry`, by alias (resolved when round 1 is published).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registered: Option<RegisteredModel>,
}

/// A registered model version by alias.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RegisteredModel {
    /// Model name in the registry.
    #[schemars(length(min = 1, max = 253))]
    pub model: String,
    /// Alias (or version number) of the version.
    #[serde(default = "default_production")]
    #[schemars(length(min = 1, max = 63))]
    pub alias: String,
}

fn default_production() -> String {
    "production".into()
}

/// Where a federation's result is registered.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FederatedRegister {
    /// Model name in the registry.
    #[schemars(length(min = 1, max = 253))]
    pub model: String,
    /// Alias the new version gets.
    #[serde(default = "default_candidate")]
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new("self != 'production'").message("register.alias cannot be production: promotion is the PromotionPolicy gate's decision"))]
    pub alias: String,
}

fn default_candidate() -> String {
    "candidate".into()
}

fn default_min_sites() -> u32 {
    1
}

fn default_round_deadline() -> i64 {
    24 * 3600
}

/// The exchange folder and the credentials of the pods that write it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExchangeSpec {
    /// Folder URI; the hub writes `rounds/`, each site only `sites/<name>/`.
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new("self.matches('^(s3|gs|az|file)://.+')").message("exchange.uri must start with s3://, gs://, az:// or file://"))]
    pub uri: String,
    /// Secret whose keys are the exchange's store settings (AWS_*, GOOGLE_*, AZURE_*); a site's
    /// pods get them prefixed [`EXCHANGE_ENV_PREFIX`] (mapped to this URI by
    /// `RADFM_STORE_SETTINGS`), beside the site's own store settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretRef>,
}

/// A site of the federation.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FederatedSiteEntry {
    /// The site's name (unique): its prefix in the exchange.
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message("site names are DNS labels"))]
    pub name: String,
    /// The site's ed25519 public key (hex), the only key its updates may be signed with.
    #[schemars(length(min = 64, max = 64))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9a-fA-F]+$')").message("publicKey must be 64 hex digits"))]
    pub public_key: String,
}

/// How a round's updates are combined.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.kind == 'TrimmedMean' || !has(self.trimFraction)").message("trimFraction applies to the TrimmedMean aggregator only"))]
pub struct AggregatorSpec {
    /// FedAvg (weighted by samples), TrimmedMean or Median (robust to a minority of bad sites).
    #[serde(default)]
    pub kind: AggregatorKind,
    /// Fraction of values dropped at each end of each coordinate (TrimmedMean), in [0, 0.5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 0.0 && self < 0.5").message("trimFraction must be in [0, 0.5)"))]
    pub trim_fraction: Option<f64>,
}

impl AggregatorSpec {
    /// The aggregator as `radfm federate aggregate --aggregator` spells it.
    pub fn cli_name(&self) -> String {
        match self.kind {
            AggregatorKind::FedAvg => "fedavg".into(),
            AggregatorKind::Median => "median".into(),
            AggregatorKind::TrimmedMean => {
                format!("trimmed-mean:{}", self.trim_fraction.unwrap_or(0.1))
            }
        }
    }
}

/// The aggregation rule.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum AggregatorKind {
    /// Mean weighted by samples.
    #[default]
    FedAvg,
    /// Coordinate-wise trimmed mean.
    TrimmedMean,
    /// Coordinate-wise median.
    Median,
}

/// Client-level differential privacy: every update clipped, Gaussian noise added to the mean.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DifferentialPrivacy {
    /// Updates are clipped to this L2 norm.
    #[x_kube(validation = Rule::new("self > 0.0").message("clip must be positive"))]
    pub clip: f64,
    /// Noise standard deviation in units of clip / sites.
    #[x_kube(validation = Rule::new("self > 0.0").message("noiseMultiplier must be positive"))]
    pub noise_multiplier: f64,
    /// The δ at which the spent ε is reported.
    #[serde(default = "default_delta")]
    #[x_kube(validation = Rule::new("self > 0.0 && self < 1.0").message("delta must be in (0, 1)"))]
    pub delta: f64,
}

fn default_delta() -> f64 {
    1e-5
}

/// Element type on the wire.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum WirePrecision {
    /// 4 bytes a value.
    #[default]
    F32,
    /// 2 bytes a value.
    BF16,
}

impl WirePrecision {
    /// The value of the `--precision` flag.
    pub fn cli_name(self) -> &'static str {
        match self {
            WirePrecision::F32 => "f32",
            WirePrecision::BF16 => "bf16",
        }
    }
}

/// Where a FederatedTraining is.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum FederatedPhase {
    /// Round 1's global model is being published.
    #[default]
    Publishing,
    /// The round's global model is out; sites are training.
    Training,
    /// The round is being closed and the next model published.
    Aggregating,
    /// The result is being exported and registered.
    Registering,
    /// Every round is closed; `status.resultDigest` is the federated model.
    Succeeded,
    /// The federation stopped (too few sites at a deadline, or a pod that kept failing).
    Failed,
}

impl FederatedPhase {
    /// Whether nothing more happens.
    pub fn is_finished(self) -> bool {
        matches!(self, FederatedPhase::Succeeded | FederatedPhase::Failed)
    }
}

/// Observed state of a FederatedTraining.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FederatedTrainingStatus {
    /// Conditions: Ready, Reconciling, Stalled, Succeeded, Failed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The metadata.generation this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Where the federation is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<FederatedPhase>,
    /// The round in progress (after the last: the last one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round: Option<u32>,
    /// When the round in progress was seen published (its deadline counts from here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round_started_at: Option<Time>,
    /// Sites that uploaded to the round in progress / sites listed (`2/3`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sites: Option<String>,
    /// Closed rounds, from the hub's signed round records.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rounds: Vec<FederatedRoundStatus>,
    /// Digest of the federated model (the global model after the last round).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_digest: Option<String>,
    /// The model round 1 was published from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_uri: Option<String>,
    /// The registered version round 1 started from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_version: Option<u64>,
    /// The version the result was registered as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registered_version: Option<u64>,
    /// Failed publish or aggregate pods of the current step, retried up to 3 times.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_failures: Option<u32>,
}

/// A closed round.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FederatedRoundStatus {
    /// The round.
    pub round: u32,
    /// Digest of the round's global model.
    pub global_digest: String,
    /// Admitted contributions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub admitted: Vec<AdmittedContribution>,
    /// Refused contributions, with why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rejected: Vec<RejectedContribution>,
    /// Digest of the next global model.
    pub next_digest: String,
    /// Client-level DP: ε spent so far (at the spec's δ).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epsilon: Option<f64>,
}

/// An admitted contribution.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdmittedContribution {
    /// The site.
    pub site: String,
    /// Training samples (the FedAvg weight).
    pub samples: u64,
    /// L2 norm of the update.
    pub norm: f64,
    /// Digest of the update.
    pub update_digest: String,
}

/// A refused contribution.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RejectedContribution {
    /// The site whose prefix it came from.
    pub site: String,
    /// Machine-readable reason (BadSignature, UnknownSite, WrongKey, OtherRound, OtherBase, Duplicate, NormExceeded, ...).
    pub reason: String,
    /// What was wrong.
    pub message: String,
}

/// Desired state of a FederatedSite.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "radfm.io",
    version = "v1alpha1",
    kind = "FederatedSite",
    doc = "This hospital's part in a federated training: fetch each signed global model, train it locally, upload a signed bounded update; outbound calls only (see docs/federated.md).",
    plural = "federatedsites",
    shortname = "fs",
    category = "radfm",
    namespaced,
    cel,
    status = "FederatedSiteStatus",
    printcolumn(name = "Federation", type_ = "string", json_path = ".spec.federation", description = "The hub's FederatedTraining"),
    printcolumn(name = "Round", type_ = "integer", json_path = ".status.round", description = "Round in progress"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase", description = "Where this site is in the round"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.metadata.name.size() <= 40 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')")
        .message("metadata.name must be a DNS-1035 label of at most 40 characters (job names append -r<round>)"),
)]
#[serde(rename_all = "camelCase")]
pub struct FederatedSiteSpec {
    /// The federation: `namespace/name` of the hub's FederatedTraining.
    #[schemars(length(max = 127))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?/[a-z]([-a-z0-9]*[a-z0-9])?$')").message("federation must be NAMESPACE/NAME of the hub's FederatedTraining"))]
    pub federation: String,
    /// This site's name in the federation (its prefix in the exchange).
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message("site must be a DNS label"))]
    pub site: String,
    /// The hub's ed25519 public key (hex): global models not signed with it are refused.
    #[schemars(length(min = 64, max = 64))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9a-fA-F]+$')").message("hubPublicKey must be 64 hex digits"))]
    pub hub_public_key: String,
    /// The exchange folder, and the Secret with the store settings that reach it.
    pub exchange: ExchangeSpec,
    /// Secret holding this site's ed25519 signing key; mounted only into the contribute pod.
    pub signing_key_secret_ref: KeySecretRef,
    /// The site's shards (with the credentials of the site's own store); they never leave.
    pub dataset: DatasetSpec,
    /// Folder on the site's own store for each round's global model and local checkpoints
    /// (`<workspace>/rounds/<r>/`).
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new("self.matches('^(s3|gs|az|file)://.+')").message("workspace must start with s3://, gs://, az:// or file://"))]
    pub workspace: String,
    /// The local TrainingJob of each round (its steps come from the hub; its checkpoint folder
    /// is set per round under the workspace; initFrom is the round's global model). Federated
    /// rounds train the masked autoencoder only: with the contrastive objective each site would
    /// learn its own report vocabulary, and averaging text encoders over different vocabularies
    /// means nothing.
    #[x_kube(validation = Rule::new("!has(self.model) || !has(self.model.objective) || !has(self.model.objective.contrastive)").message("jobTemplate.model.objective: federated rounds train the mae objective only (each site would learn its own report vocabulary)"))]
    pub job_template: JobTemplate,
    /// Element type of the uploaded updates.
    #[serde(default)]
    pub precision: WirePrecision,
    /// Image of the fetch and contribute pods (it runs `radfm federate`).
    #[schemars(length(min = 1))]
    pub image: String,
    /// Seconds between looks at the exchange.
    #[serde(default = "default_poll")]
    #[schemars(range(min = 5))]
    pub poll_interval_seconds: i64,
}

fn default_poll() -> i64 {
    60
}

/// Where a FederatedSite is in the current round.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum SitePhase {
    /// No global model to train: before round 1, or this site's update of the round is in.
    #[default]
    Waiting,
    /// The round's global model is being fetched and checked.
    Fetching,
    /// The local TrainingJob runs.
    Training,
    /// The signed update is being computed and uploaded.
    Contributing,
    /// The hub published the federation's result; nothing more to train.
    Finished,
}

/// Observed state of a FederatedSite.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FederatedSiteStatus {
    /// Conditions: Ready, Reconciling, Stalled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The metadata.generation this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Where this site is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<SitePhase>,
    /// The newest round the hub published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round: Option<u32>,
    /// When the exchange was last read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_poll_time: Option<Time>,
    /// This site's uploads, one per round it took part in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub contributions: Vec<SiteContribution>,
    /// Failed pods or local jobs of the current round, retried up to 3 times.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failures: Option<u32>,
}

/// What this site uploaded for a round.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SiteContribution {
    /// The round.
    pub round: u32,
    /// Digest of the global model trained from.
    pub base_digest: String,
    /// Digest of the uploaded update.
    pub update_digest: String,
    /// Training samples.
    pub samples: u64,
    /// Optimizer steps.
    pub steps: u64,
    /// Loss at the end of local training.
    pub local_loss: f64,
}

/// The format tag of the hub's record of a closed round.
pub const RECORD_FORMAT: &str = "radfm.federated.round/v1";

/// A contribution the hub admitted, as its round record keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmittedRecord {
    /// The site.
    pub site: String,
    /// Training samples the site saw this round (the FedAvg weight).
    pub samples: u64,
    /// Optimizer steps the site ran.
    pub steps: u64,
    /// L2 norm of the update.
    pub norm: f64,
    /// Digest of the update's bytes.
    pub update_digest: String,
    /// Digest of the site's dataset index.
    pub dataset_index_digest: String,
    /// The site's loss at the end of its local training.
    pub local_loss: f64,
}

/// A refused contribution, as the round record keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RejectedRecord {
    /// The site whose prefix it came from.
    pub site: String,
    /// Machine-readable reason (BadSignature, UnknownSite, WrongKey, OtherRound, OtherBase, Duplicate, NormExceeded, ...).
    pub reason: String,
    /// What was wrong.
    pub message: String,
}

/// The hub's signed record of a closed round: what it admitted and refused and the model it
/// published next (the lineage of a federated model, round by round).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RoundRecord {
    /// [`RECORD_FORMAT`].
    pub format: String,
    /// The federation.
    pub federation: String,
    /// The round closed.
    pub round: u32,
    /// Digest of the round's global model (what every admitted update is based on).
    pub base_digest: String,
    /// The aggregator (`fedavg`, `median`, `trimmed-mean:0.2`).
    pub aggregator: String,
    /// Admitted contributions.
    pub admitted: Vec<AdmittedRecord>,
    /// Refused contributions, with why.
    pub rejected: Vec<RejectedRecord>,
    /// Digest of the next global model.
    pub next_digest: String,
    /// Client-level DP: (ε, δ) spent after this round.
    pub privacy: Option<PrivacySpent>,
}

/// The privacy budget spent so far.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PrivacySpent {
    /// ε at `delta` over every round so far.
    pub epsilon: f64,
    /// δ.
    pub delta: f64,
}
