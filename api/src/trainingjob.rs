//! The `TrainingJob` custom resource: one self-supervised pretraining run executed as a gang of
//! trainer pods.
//!
//! The CRD under `manifests/crds/` is generated from these types (`radfm-operator crd`), so the doc
//! comments here are what `kubectl explain trainingjob.spec...` prints, and the CEL rules here are
//! what the API server enforces. Rules that protect a running gang (replicas, GPUs, image) are
//! transition rules: they allow the change only while the job is suspended.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, EnvVar, ResourceRequirements, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::failure::FailurePolicy;

/// Longest TrainingJob name: pod names `<job>-w<rank>-a<attempt>` and the Service name must stay
/// valid DNS labels (63 characters).
pub const MAX_NAME_LEN: usize = 40;

/// Desired state of a TrainingJob: what to train, on what data, on how many workers, and how to
/// react to failures.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "radfm.io",
    version = "v1alpha1",
    kind = "TrainingJob",
    doc = "A self-supervised pretraining run executed as a gang of trainer pods (see docs/trainingjob.md).",
    plural = "trainingjobs",
    shortname = "tj",
    category = "radfm",
    namespaced,
    cel,
    status = "TrainingJobStatus",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase", description = "Lifecycle phase"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.ready", description = "Ready workers / replicas"),
    printcolumn(name = "Step", type_ = "integer", json_path = ".status.progress.step", description = "Last reported optimizer step"),
    printcolumn(name = "Loss", type_ = "number", json_path = ".status.progress.loss", description = "Last reported training loss"),
    printcolumn(name = "Restarts", type_ = "integer", json_path = ".status.restarts", description = "Gang restarts so far"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("self.metadata.name.size() <= 40 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')")
        .message("metadata.name must be a DNS-1035 label of at most 40 characters (pod names append -w<rank>-a<attempt>)"),
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(oldSelf.managedBy) || (has(self.managedBy) && self.managedBy == oldSelf.managedBy)").message("managedBy is immutable").field_path(".managedBy"))]
#[x_kube(validation = Rule::new("oldSelf.runPolicy.suspend || self.image == oldSelf.image").message("image cannot change while the gang is running; set runPolicy.suspend first").field_path(".image"))]
#[x_kube(validation = Rule::new("oldSelf.runPolicy.suspend || self.workers.replicas == oldSelf.workers.replicas").message("workers.replicas cannot change while the gang is running; set runPolicy.suspend first").field_path(".workers.replicas"))]
#[x_kube(validation = Rule::new("oldSelf.runPolicy.suspend || self.workers.gpusPerWorker == oldSelf.workers.gpusPerWorker").message("workers.gpusPerWorker cannot change while the gang is running; set runPolicy.suspend first").field_path(".workers.gpusPerWorker"))]
#[x_kube(validation = Rule::new("oldSelf.runPolicy.suspend || has(self.workers.nprocPerNode) == has(oldSelf.workers.nprocPerNode) && (!has(self.workers.nprocPerNode) || self.workers.nprocPerNode == oldSelf.workers.nprocPerNode)").message("workers.nprocPerNode cannot change while the gang is running; set runPolicy.suspend first").field_path(".workers.nprocPerNode"))]
pub struct TrainingJobSpec {
    /// Trainer container image.
    #[schemars(length(min = 1))]
    pub image: String,
    /// Image pull policy of the trainer container (Always, IfNotPresent, Never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
    /// The gang of worker pods.
    pub workers: WorkersSpec,
    /// Where the training images are.
    pub dataset: DatasetSpec,
    /// The model to pretrain.
    #[serde(default)]
    pub model: ModelSpec,
    /// Optimisation settings.
    #[serde(default)]
    pub training: TrainingSpec,
    /// Where and how often checkpoints are written; a restarted gang resumes from the newest one.
    pub checkpoint: CheckpointSpec,
    /// Export of the encoder (timm names, model card) by rank 0 after the last step; empty: no
    /// export (the checkpoints remain).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export: Option<ExportSpec>,
    /// Restart budget, deadline, suspension and clean-up.
    #[serde(default)]
    pub run_policy: RunPolicy,
    /// How worker failures are handled. Empty: the default policy, which follows the trainer's
    /// exit-code contract (docs/exit-codes.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_policy: Option<FailurePolicy>,
    /// Controller that owns this job. Empty or `radfm.io/operator`: radfm's operator; any other
    /// value (for example `kueue.x-k8s.io/multikueue`) makes radfm's operator leave it alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub managed_by: Option<String>,
}

/// The default value of `managedBy`, meaning radfm's own operator.
pub const MANAGED_BY_RADFM: &str = "radfm.io/operator";

/// Image pull policy.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum PullPolicy {
    /// Always pull.
    Always,
    /// Pull when absent on the node.
    IfNotPresent,
    /// Never pull.
    Never,
}

impl PullPolicy {
    /// The value Kubernetes expects in a container's `imagePullPolicy`.
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// The worker pods: one pod per node, `nprocPerNode` trainer processes in each.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct WorkersSpec {
    /// Number of worker pods (nodes) in the gang.
    #[schemars(range(min = 1, max = 4096))]
    pub replicas: i32,
    /// GPUs (`nvidia.com/gpu`) requested by each worker pod; 0 runs on CPU.
    #[serde(default)]
    #[schemars(range(min = 0, max = 64))]
    pub gpus_per_worker: i32,
    /// Trainer processes per pod. Default: gpusPerWorker, or 1 on CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 64))]
    pub nproc_per_node: Option<i32>,
    /// CPU and memory of each worker; the GPU request is added from gpusPerWorker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Node labels a worker's node must carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Tolerations of the worker pods (a toleration for `nvidia.com/gpu` taints is added when
    /// GPUs are requested).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    /// Affinity of the worker pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// PriorityClass of the worker pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// Scheduler of the worker pods. `volcano` or `scheduler-plugins-scheduler` also create a
    /// PodGroup so that the gang is scheduled all at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler_name: Option<String>,
    /// Size limit of the memory-backed `/dev/shm` of each worker (the loader's and NCCL's
    /// shared buffers), for example `8Gi`. Default: no limit of its own; it counts against the
    /// pod's memory limit either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shm_size: Option<Quantity>,
    /// Additions to every worker pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<PodOverrides>,
}

impl WorkersSpec {
    /// Trainer processes per pod, with the default applied.
    pub fn nproc(&self) -> i32 {
        self.nproc_per_node.unwrap_or(if self.gpus_per_worker > 0 {
            self.gpus_per_worker
        } else {
            1
        })
    }
}

/// Additions merged into every worker pod.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PodOverrides {
    /// Extra pod labels (radfm's own labels win on conflict).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// Extra pod annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    /// Extra environment variables of the trainer container (radfm's contract variables win).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<EnvVar>>,
    /// Extra volumes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::trainingjob::opaque_list")]
    pub volumes: Option<Vec<Volume>>,
    /// Extra volume mounts of the trainer container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_mounts: Option<Vec<VolumeMount>>,
    /// ServiceAccount of the worker pods. Default: `<job>-trainer` for the rank-0 pod, which the
    /// operator creates with permission to patch that pod and nothing else (the other ranks get
    /// no API token). A ServiceAccount named here must be one the cluster's radfm pod policy
    /// allows, and needs `patch` on the rank-0 pod for progress to show.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// Entrypoint of the trainer container. Default: `/usr/local/bin/radfm-trainer`, the path in
    /// radfm's trainer image; set it for an image that keeps the trainer elsewhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(validation = Rule::new("self.all(c, size(c) > 0)").message("template.command entries must not be empty"))]
    pub command: Option<Vec<String>>,
    /// Arguments of the trainer container. Default: `train` (the trainer reads the rest of its
    /// configuration from the environment contract).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub args: Option<Vec<String>>,
}

/// The trainer container's entrypoint in radfm's trainer image.
pub const TRAINER_COMMAND: &str = "/usr/local/bin/radfm-trainer";
/// The trainer's subcommand a worker pod runs.
pub const TRAINER_ARGS: &[&str] = &["train"];

impl PodOverrides {
    /// The trainer container's command: the override, else [`TRAINER_COMMAND`].
    pub fn trainer_command(&self) -> Vec<String> {
        self.command
            .clone()
            .unwrap_or_else(|| vec![TRAINER_COMMAND.to_string()])
    }

    /// The trainer container's arguments: the override, else [`TRAINER_ARGS`].
    pub fn trainer_args(&self) -> Vec<String> {
        self.args
            .clone()
            .unwrap_or_else(|| TRAINER_ARGS.iter().map(|a| a.to_string()).collect())
    }
}

/// A list whose items the API server keeps as given (the full Volume schema alone would push the
/// CRD past the size `kubectl apply` can store); the Pod validation checks them on creation.
pub(crate) fn opaque_list(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
    })
}

/// One object the API server keeps as given (a Volume; see [`opaque_list`]).
pub(crate) fn opaque_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})
}

/// Object-store URI rule shared by the dataset and checkpoint locations.
const URI_RULE: &str = "self.matches('^(s3|gs|az|file)://.+')";

/// The training data.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DatasetSpec {
    /// Dataset location: `s3://`, `gs://`, `az://` or `file://` URI of the folder holding
    /// `index.json` and the shards.
    #[x_kube(validation = Rule::new(URI_RULE).message("dataset.uri must start with s3://, gs://, az:// or file://"))]
    pub uri: String,
    /// Secret whose keys become environment variables of the trainers (for example
    /// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretRef>,
    /// Shard sequence numbers to train on, as ranges (`0-9,12,15-20`); empty: every shard of the
    /// index. ContinualTraining sets it to a run's data window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(SHARDS_RULE).message("dataset.shards must be a comma-separated list of shard numbers or ranges like 0-9,12"))]
    pub shards: Option<String>,
}

/// Shape of a shard selection: comma-separated numbers or `a-b` ranges.
const SHARDS_RULE: &str = "self.matches('^[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*$')";

/// Parses a shard selection (`0-9,12,15-20`) into sorted, distinct sequence numbers; the error
/// says which part is wrong.
pub fn parse_shards(text: &str) -> std::result::Result<Vec<u64>, String> {
    if out_of_bounds(text) {
        return Err(format!(
            "{} characters is longer than a shard selection may be",
            text.len()
        ));
    }
    let mut out = std::collections::BTreeSet::new();
    for part in text.split(',').map(str::trim) {
        let num = |t: &str| {
            t.trim()
                .parse::<u64>()
                .map_err(|_| format!("{part:?} is not a shard number or range a-b"))
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(format!("{part:?}: range start is after its end"));
                }
                if b - a >= MAX_SELECTED_SHARDS as u64
                    || out.len() + (b - a) as usize >= MAX_SELECTED_SHARDS
                {
                    return Err(format!(
                        "{part:?}: more than {MAX_SELECTED_SHARDS} shards selected"
                    ));
                }
                out.extend(a..=b);
            }
            None => {
                out.insert(num(part)?);
            }
        }
    }
    Ok(out.into_iter().collect())
}

/// Most shards one selection may name (about what the largest index can list).
pub const MAX_SELECTED_SHARDS: usize = 1_000_000;

fn out_of_bounds(text: &str) -> bool {
    text.len() > 64 << 10
}

/// Writes sorted sequence numbers as the shortest selection (`0-3,7,9-10`).
pub fn format_shards(seqs: &[u64]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < seqs.len() {
        let mut j = i;
        while j + 1 < seqs.len() && seqs[j + 1] == seqs[j] + 1 {
            j += 1;
        }
        parts.push(if j == i {
            seqs[i].to_string()
        } else {
            format!("{}-{}", seqs[i], seqs[j])
        });
        i = j + 1;
    }
    parts.join(",")
}

/// Where the trained encoder is exported when the job succeeds.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ExportSpec {
    /// Folder URI that receives `encoder.safetensors` and `model_card.json` (written last).
    #[x_kube(validation = Rule::new(URI_RULE).message("export.uri must start with s3://, gs://, az:// or file://"))]
    pub uri: String,
}

/// Reference to a Secret in the job's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct SecretRef {
    /// Secret name.
    #[schemars(length(min = 1))]
    pub name: String,
}

/// The model to pretrain.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.imageSize) || !has(self.patchSize) || self.imageSize % self.patchSize == 0").message("model.imageSize must be a multiple of model.patchSize"))]
pub struct ModelSpec {
    /// Architecture preset: vit-tiny, vit-small or vit-base.
    #[serde(default = "default_architecture")]
    pub architecture: Architecture,
    /// Weights to start from (object-store URI of an exported model or a checkpoint); empty: random
    /// initialisation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<String>,
    /// Square input side in pixels (images are resized or cropped to it).
    #[serde(default = "default_image_size")]
    #[schemars(range(min = 8, max = 4096))]
    pub image_size: i32,
    /// Square patch side in pixels; must divide imageSize.
    #[serde(default = "default_patch_size")]
    #[schemars(range(min = 2, max = 64))]
    pub patch_size: i32,
    /// Fraction of patches masked per image (MAE: 0.75; 0.9 works well on chest X-rays).
    #[serde(default = "default_mask_ratio")]
    #[x_kube(validation = Rule::new("self > 0.0 && self < 1.0").message("model.maskRatio must be in (0, 1)"))]
    pub mask_ratio: f64,
    /// What the model learns from, each objective with its weight in the loss (default: the
    /// masked autoencoder alone). `contrastive` needs a report beside every image.
    #[serde(default)]
    pub objective: Objective,
}

/// The pretraining objectives and their weights; an objective left out is not trained.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.mae) || has(self.contrastive)").message("model.objective needs mae, contrastive or both"))]
pub struct Objective {
    /// Weight of the masked-autoencoder loss (images alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 100.0").message("model.objective.mae must be a weight in (0, 100]"))]
    pub mae: Option<f64>,
    /// Weight of the image–report contrastive loss (each image with its report).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 100.0").message("model.objective.contrastive must be a weight in (0, 100]"))]
    pub contrastive: Option<f64>,
}

impl Default for Objective {
    fn default() -> Self {
        Objective {
            mae: Some(1.0),
            contrastive: None,
        }
    }
}

impl Objective {
    /// Checks what CEL checks, for a job read from a file: at least one objective, weights in
    /// (0, 100].
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.mae.is_none() && self.contrastive.is_none() {
            return Err("model.objective needs mae, contrastive or both".into());
        }
        for (name, w) in [("mae", self.mae), ("contrastive", self.contrastive)] {
            if let Some(w) = w
                && !(w > 0.0 && w <= 100.0)
            {
                return Err(format!(
                    "model.objective.{name}: {w} is not a weight in (0, 100]"
                ));
            }
        }
        Ok(())
    }

    /// As the env contract writes it: `mae=1`, `contrastive=1`, `mae=1,contrastive=0.5`.
    pub fn to_env(&self) -> String {
        let parts: Vec<String> = [("mae", self.mae), ("contrastive", self.contrastive)]
            .into_iter()
            .filter_map(|(n, w)| w.map(|w| format!("{n}={w}")))
            .collect();
        parts.join(",")
    }

    /// Reads [`Objective::to_env`]'s form; a name without a weight has weight 1
    /// (`mae,contrastive`).
    pub fn from_env(text: &str) -> std::result::Result<Objective, String> {
        let mut o = Objective {
            mae: None,
            contrastive: None,
        };
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, weight) = part.split_once('=').unwrap_or((part, "1"));
            let w: f64 = weight
                .parse()
                .map_err(|_| format!("{weight:?} is not a number"))?;
            let slot = match name {
                "mae" => &mut o.mae,
                "contrastive" => &mut o.contrastive,
                other => return Err(format!("{other:?} is not mae or contrastive")),
            };
            if slot.replace(w).is_some() {
                return Err(format!("{name} is given twice"));
            }
        }
        o.check()?;
        Ok(o)
    }
}

impl Default for ModelSpec {
    fn default() -> Self {
        ModelSpec {
            architecture: default_architecture(),
            init_from: None,
            image_size: default_image_size(),
            patch_size: default_patch_size(),
            mask_ratio: default_mask_ratio(),
            objective: Objective::default(),
        }
    }
}

fn default_image_size() -> i32 {
    224
}
fn default_patch_size() -> i32 {
    16
}
fn default_mask_ratio() -> f64 {
    0.75
}

fn default_architecture() -> Architecture {
    Architecture::VitTiny
}

/// ViT architecture presets.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Architecture {
    /// Patch 16, width 192, depth 12, 3 heads.
    VitTiny,
    /// Patch 16, width 384, depth 12, 6 heads.
    VitSmall,
    /// Patch 16, width 768, depth 12, 12 heads.
    VitBase,
}

impl Architecture {
    /// The preset's name as written in YAML and in the env contract.
    pub fn as_str(self) -> &'static str {
        match self {
            Architecture::VitTiny => "vit-tiny",
            Architecture::VitSmall => "vit-small",
            Architecture::VitBase => "vit-base",
        }
    }
}

/// Optimisation settings. Exactly one of `steps` and `epochs` is set.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.steps) != has(self.epochs)").message("exactly one of training.steps and training.epochs must be set"))]
pub struct TrainingSpec {
    /// Total optimizer steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub steps: Option<i64>,
    /// Total passes over the dataset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub epochs: Option<i32>,
    /// Images per device (GPU or CPU process) per step.
    #[serde(default = "default_batch")]
    #[schemars(range(min = 1))]
    pub batch_size_per_device: i32,
    /// Peak learning rate (AdamW).
    #[serde(default = "default_lr")]
    #[x_kube(validation = Rule::new("self > 0.0 && self < 1.0").message("training.learningRate must be in (0, 1)"))]
    pub learning_rate: f64,
    /// Linear warm-up steps before the cosine schedule.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub warmup_steps: i64,
    /// Numeric precision: fp32, or bf16 autocast on CUDA.
    #[serde(default = "default_precision")]
    pub precision: Precision,
    /// Seed of every random choice (init, masking, data order).
    #[serde(default)]
    pub seed: i64,
    /// Decoupled AdamW weight decay (not applied to biases, norms and tokens).
    #[serde(default = "default_weight_decay")]
    #[x_kube(validation = Rule::new("self >= 0.0 && self < 1.0").message("training.weightDecay must be in [0, 1)"))]
    pub weight_decay: f64,
    /// Gradients are scaled down to this global L2 norm; 0 disables clipping.
    #[serde(default = "default_grad_clip")]
    #[x_kube(validation = Rule::new("self >= 0.0").message("training.gradClipNorm must be >= 0"))]
    pub grad_clip_norm: f64,
    /// Batches accumulated per optimizer step.
    #[serde(default = "default_accumulation")]
    #[schemars(range(min = 1, max = 1024))]
    pub grad_accumulation: i32,
    /// The part of a longer learning-rate schedule this job runs; empty: the job's own steps are
    /// the whole schedule. A federated site's round sets it, so that warm-up and cosine decay span
    /// the whole federation instead of restarting every round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<ScheduleWindow>,
}

/// A window of a learning-rate schedule longer than one job: the job's step `s` takes the
/// schedule's learning rate at step `startStep + s` of `totalSteps`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.startStep < self.totalSteps").message("training.schedule.startStep must be below training.schedule.totalSteps"))]
pub struct ScheduleWindow {
    /// The schedule's step at which this job's first step falls.
    #[schemars(range(min = 0))]
    pub start_step: i64,
    /// Steps of the whole schedule (warm-up included).
    #[schemars(range(min = 1))]
    pub total_steps: i64,
}

impl ScheduleWindow {
    /// The window of `round` (1-based) when each round runs `local_steps` of `last_round` rounds.
    pub fn of_round(round: u64, last_round: u64, local_steps: i64) -> Self {
        ScheduleWindow {
            start_step: round.saturating_sub(1) as i64 * local_steps,
            total_steps: last_round.max(1) as i64 * local_steps,
        }
    }
}

impl Default for TrainingSpec {
    fn default() -> Self {
        TrainingSpec {
            steps: Some(1000),
            epochs: None,
            batch_size_per_device: default_batch(),
            learning_rate: default_lr(),
            warmup_steps: 0,
            precision: default_precision(),
            seed: 0,
            weight_decay: default_weight_decay(),
            grad_clip_norm: default_grad_clip(),
            grad_accumulation: default_accumulation(),
            schedule: None,
        }
    }
}

fn default_batch() -> i32 {
    32
}
fn default_lr() -> f64 {
    1.5e-4
}
fn default_weight_decay() -> f64 {
    0.05
}
fn default_grad_clip() -> f64 {
    1.0
}
fn default_accumulation() -> i32 {
    1
}
fn default_precision() -> Precision {
    Precision::Fp32
}

/// Numeric precision.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// 32-bit floats everywhere.
    Fp32,
    /// bfloat16 autocast (CUDA only; CPU runs fall back to fp32).
    Bf16,
}

impl Precision {
    /// The value as written in YAML and in the env contract.
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
        }
    }
}

/// Checkpoint location and cadence.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointSpec {
    /// Object-store URI under which checkpoints are written (s3://, gs://, az://, file://).
    #[x_kube(validation = Rule::new(URI_RULE).message("checkpoint.uri must start with s3://, gs://, az:// or file://"))]
    pub uri: String,
    /// Steps between checkpoints.
    #[serde(default = "default_every")]
    #[schemars(range(min = 1))]
    pub every_steps: i64,
    /// Committed checkpoints kept; older ones are deleted.
    #[serde(default = "default_keep")]
    #[schemars(range(min = 1, max = 1000))]
    pub keep_last: i32,
}

fn default_every() -> i64 {
    500
}
fn default_keep() -> i32 {
    3
}

/// Restart budget, deadline, suspension and clean-up, as in Kubeflow's RunPolicy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RunPolicy {
    /// Counted gang restarts allowed before the job fails (node loss and disruptions are not
    /// counted unless the failure policy says so).
    #[serde(default = "default_backoff")]
    #[schemars(range(min = 0, max = 1000))]
    pub backoff_limit: i32,
    /// Seconds the job may run (not counting suspended time) before it fails with
    /// DeadlineExceeded (at most ten years).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 315_360_000))]
    pub active_deadline_seconds: Option<i64>,
    /// Seconds after Succeeded or Failed when the job (and its pods) is deleted (at most ten
    /// years).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 315_360_000))]
    pub ttl_seconds_after_finished: Option<i64>,
    /// Suspended: no worker pods exist; status is kept; resuming starts a new attempt from the
    /// last checkpoint.
    #[serde(default)]
    pub suspend: bool,
    /// Which pods are deleted when the job finishes: All, Running (default) or None (keep every
    /// pod for its logs).
    #[serde(default = "default_clean")]
    pub clean_pod_policy: CleanPodPolicy,
    /// Seconds a deleted worker may stay Terminating (for example because its node is gone)
    /// before it is force-deleted (at most a week).
    #[serde(default = "default_terminating")]
    #[schemars(range(min = 0, max = 604_800))]
    pub terminating_timeout_seconds: i64,
}

impl Default for RunPolicy {
    fn default() -> Self {
        RunPolicy {
            backoff_limit: default_backoff(),
            active_deadline_seconds: None,
            ttl_seconds_after_finished: None,
            suspend: false,
            clean_pod_policy: default_clean(),
            terminating_timeout_seconds: default_terminating(),
        }
    }
}

fn default_backoff() -> i32 {
    3
}
fn default_clean() -> CleanPodPolicy {
    CleanPodPolicy::Running
}
fn default_terminating() -> i64 {
    300
}

/// Pods deleted when the job finishes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum CleanPodPolicy {
    /// Delete every pod.
    All,
    /// Delete the pods still running; keep finished ones for their logs.
    Running,
    /// Keep every pod.
    None,
}

/// Observed state of a TrainingJob.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrainingJobStatus {
    /// Pending, Running, Restarting, Suspended, Succeeded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Standard conditions: Created, Running, Restarting, Suspended, Succeeded, Failed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The metadata.generation this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// "ready/replicas", for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,
    /// Worker pod counts of the current attempt.
    #[serde(default)]
    pub workers: WorkerCounts,
    /// Current attempt, starting at 1; each gang restart adds one.
    #[serde(default)]
    pub attempt: i32,
    /// Gang restarts so far, counted or not.
    #[serde(default)]
    pub restarts: i32,
    /// Gang restarts counted against runPolicy.backoffLimit.
    #[serde(default)]
    pub counted_restarts: i32,
    /// When the job (last) started running; cleared while suspended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the job reached Succeeded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// The newest committed checkpoint reported by the trainers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checkpoint: Option<CheckpointRef>,
    /// Training progress reported by rank 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
}

/// Lifecycle phase, a summary of the conditions for `kubectl get`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum Phase {
    /// Waiting in a Kueue queue for admission: no workers exist.
    Queued,
    /// Workers are being created or scheduled.
    Pending,
    /// Every worker of the current attempt is running.
    Running,
    /// The gang is being torn down before the next attempt.
    Restarting,
    /// Suspended: no workers exist.
    Suspended,
    /// Every worker finished successfully.
    Succeeded,
    /// The job failed; see the Failed condition for why.
    Failed,
}

impl Phase {
    /// The phase's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Queued => "Queued",
            Phase::Pending => "Pending",
            Phase::Running => "Running",
            Phase::Restarting => "Restarting",
            Phase::Suspended => "Suspended",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
        }
    }
}

/// Worker pod counts of the current attempt.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerCounts {
    /// Pods that exist and have not finished.
    #[serde(default)]
    pub active: i32,
    /// Pods whose Ready condition is True.
    #[serde(default)]
    pub ready: i32,
    /// Pods that exited successfully.
    #[serde(default)]
    pub succeeded: i32,
    /// Pods that failed.
    #[serde(default)]
    pub failed: i32,
}

/// A committed checkpoint.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointRef {
    /// URI of the checkpoint's manifest.
    pub uri: String,
    /// Optimizer step it holds.
    pub step: i64,
}

/// Training progress as reported by rank 0.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// Optimizer steps done.
    pub step: i64,
    /// Steps in the whole run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_steps: Option<i64>,
    /// Last training loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// Training throughput of the whole gang.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images_per_second: Option<f64>,
    /// When rank 0 reported it (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
}

/// The 1-based line where `key` first appears as a mapping key (block or flow style).
fn key_line(text: &str, key: &str) -> Option<usize> {
    let needle = format!("{key}:");
    text.lines()
        .position(|line| {
            line.match_indices(&needle).any(|(i, _)| {
                line[..i]
                    .chars()
                    .last()
                    .is_none_or(|c| c == ' ' || c == '{' || c == ',' || c == '-')
            })
        })
        .map(|i| i + 1)
}

impl TrainingJob {
    /// Parses a TrainingJob from YAML, naming the field path and line of the first problem, then
    /// checks the CEL rules the API server would check on creation.
    pub fn from_yaml(text: &str, source_name: &str) -> crate::Result<TrainingJob> {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let mut unknown = Vec::new();
        let job: TrainingJob = serde_ignored::deserialize(de, |path| {
            let path = path.to_string();
            if path != "apiVersion" && path != "kind" {
                unknown.push(path)
            }
        })
        .map_err(|e| crate::Error::Yaml {
            source_name: source_name.to_string(),
            message: e.to_string(),
        })?;
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Header {
            api_version: Option<String>,
            kind: Option<String>,
        }
        let header: Header = serde_yaml_ng::from_str(text).map_err(|e| crate::Error::Yaml {
            source_name: source_name.to_string(),
            message: e.to_string(),
        })?;
        let want_version = format!("{}/{}", crate::GROUP, crate::VERSION);
        if header.api_version.as_deref() != Some(want_version.as_str())
            || header.kind.as_deref() != Some("TrainingJob")
        {
            return Err(crate::Error::Yaml {
                source_name: source_name.to_string(),
                message: format!(
                    "apiVersion/kind: expected {want_version} TrainingJob, found {} {}",
                    header.api_version.as_deref().unwrap_or("<none>"),
                    header.kind.as_deref().unwrap_or("<none>")
                ),
            });
        }
        if let Some(field) = unknown.first() {
            let key = field.rsplit('.').next().unwrap_or(field);
            let at = key_line(text, key).map_or(String::new(), |n| format!(" (line {n})"));
            return Err(crate::Error::Yaml {
                source_name: source_name.to_string(),
                message: format!("{field}: unknown field{at}"),
            });
        }
        job.validate_cel()
            .map_err(|e| crate::Error::Invalid(format!("{source_name}: {e}")))?;
        Ok(job)
    }

    /// The effective managing controller (`radfm.io/operator` when unset).
    pub fn managed_by(&self) -> &str {
        self.spec.managed_by.as_deref().unwrap_or(MANAGED_BY_RADFM)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    const VALID: &str = r#"
apiVersion: radfm.io/v1alpha1
kind: TrainingJob
metadata: {name: mae-ct}
spec:
  image: radfm/trainer:dev
  workers: {replicas: 2}
  dataset: {uri: "file:///data/cohort"}
  checkpoint: {uri: "s3://ckpt/mae"}
  training: {steps: 10}
"#;

    fn valid() -> TrainingJob {
        TrainingJob::from_yaml(VALID, "valid.yaml").unwrap()
    }

    /// CEL rules need the defaults the API server would apply; a round trip through JSON gives
    /// them because every defaulted field is serialized.
    fn cel_error(job: &TrainingJob) -> String {
        job.validate_cel()
            .map(|_| String::new())
            .unwrap_or_else(|e| e.to_string())
    }

    #[test]
    fn objectives_round_trip_through_the_env_form_and_bad_ones_are_named() {
        let both = Objective {
            mae: Some(1.0),
            contrastive: Some(0.5),
        };
        assert_eq!(both.to_env(), "mae=1,contrastive=0.5");
        assert_eq!(Objective::from_env(&both.to_env()), Ok(both));
        assert_eq!(
            Objective::from_env("contrastive").unwrap(),
            Objective {
                mae: None,
                contrastive: Some(1.0)
            }
        );
        assert_eq!(Objective::default().to_env(), "mae=1");
        for (bad, says) in [
            ("", "needs mae, contrastive or both"),
            ("mae=0", "not a weight"),
            ("mae=x", "not a number"),
            ("clip=1", "not mae or contrastive"),
            ("mae=1,mae=2", "given twice"),
        ] {
            let e = Objective::from_env(bad).unwrap_err();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn defaults_fill_a_minimal_job() {
        let j = valid();
        assert_eq!(j.spec.run_policy.backoff_limit, 3);
        assert_eq!(j.spec.run_policy.clean_pod_policy, CleanPodPolicy::Running);
        assert_eq!(j.spec.model.architecture, Architecture::VitTiny);
        assert_eq!(j.spec.workers.nproc(), 1);
        assert_eq!(j.spec.checkpoint.keep_last, 3);
    }

    #[test]
    fn cel_rejects_bad_uris_and_steps_with_epochs() {
        let mut j = valid();
        j.spec.dataset.uri = "http://x/y".into();
        assert!(
            cel_error(&j).contains("dataset.uri must start with"),
            "{}",
            cel_error(&j)
        );
        let mut j = valid();
        j.spec.checkpoint.uri = "/local/path".into();
        assert!(cel_error(&j).contains("checkpoint.uri must start with"));
        let mut j = valid();
        j.spec.training.epochs = Some(2);
        assert!(cel_error(&j).contains("exactly one of training.steps and training.epochs"));
        let mut j = valid();
        j.spec.training.steps = None;
        assert!(cel_error(&j).contains("exactly one of"));
        let mut j = valid();
        j.metadata.name = Some("a-name-that-is-far-too-long-for-pod-names-x".into());
        assert!(
            cel_error(&j).contains("DNS-1035 label of at most 40"),
            "{}",
            cel_error(&j)
        );
    }

    #[test]
    fn running_gang_shape_is_immutable_unless_suspended() {
        let old = valid();
        let mut new = valid();
        new.spec.workers.replicas = 4;
        let err = new.validate_cel_update(&old).unwrap_err().to_string();
        assert!(
            err.contains("workers.replicas cannot change while the gang is running"),
            "{err}"
        );
        new.spec.workers.replicas = 2;
        new.spec.image = "other".into();
        assert!(
            new.validate_cel_update(&old)
                .unwrap_err()
                .to_string()
                .contains("image cannot change")
        );
        let mut suspended = valid();
        suspended.spec.run_policy.suspend = true;
        let mut resized = suspended.clone();
        resized.spec.workers.replicas = 8;
        resized.spec.workers.gpus_per_worker = 8;
        assert!(resized.validate_cel_update(&suspended).is_ok());
        let mut lr = valid();
        lr.spec.training.learning_rate = 0.5;
        assert!(
            lr.validate_cel_update(&old).is_ok(),
            "other fields stay mutable"
        );
    }

    #[test]
    fn failure_rules_need_exactly_one_matcher() {
        let mut j = valid();
        j.spec.failure_policy = Some(FailurePolicy {
            rules: vec![crate::failure::FailurePolicyRule {
                action: crate::failure::FailureAction::FailJob,
                on_node_lost: Some(true),
                on_reasons: Some(vec!["OOMKilled".into()]),
                ..Default::default()
            }],
        });
        assert!(
            cel_error(&j).contains("exactly one of onExitCodes"),
            "{}",
            cel_error(&j)
        );
    }

    #[test]
    fn yaml_errors_name_the_field_and_line() {
        let bad = VALID.replace("replicas: 2", "replicas: two");
        let err = TrainingJob::from_yaml(&bad, "job.yaml")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("job.yaml: spec.workers.replicas: invalid type"),
            "{err}"
        );
        assert!(err.contains("line 7"), "{err}");
        let bad = VALID.replace("spec:\n", "spec:\n  imagee: x\n");
        let line = bad.lines().position(|l| l.contains("imagee")).unwrap() + 1;
        let err = TrainingJob::from_yaml(&bad, "job.yaml")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            format!("job.yaml: spec.imagee: unknown field (line {line})")
        );
        let flow = VALID.replace(
            "spec:\n",
            "spec:\n  runPolicy: {suspend: true, backofLimit: 2}\n",
        );
        let err = TrainingJob::from_yaml(&flow, "job.yaml")
            .unwrap_err()
            .to_string();
        assert!(
            err.ends_with(&format!(
                "spec.runPolicy.backofLimit: unknown field (line {line})"
            )),
            "{err}"
        );
    }

    #[test]
    fn crd_has_printer_columns_list_map_conditions_and_status_subresource() {
        let crd = serde_json::to_value(TrainingJob::crd()).unwrap();
        let v = &crd["spec"]["versions"][0];
        let cols: Vec<_> = v["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(cols, ["Phase", "Ready", "Step", "Loss", "Restarts", "Age"]);
        assert!(v["subresources"]["status"].is_object());
        let conds =
            &v["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["conditions"];
        assert_eq!(conds["x-kubernetes-list-type"], "map");
        assert_eq!(conds["x-kubernetes-list-map-keys"][0], "type");
        assert_eq!(crd["spec"]["names"]["shortNames"][0], "tj");
        let replicas = &v["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["workers"]
            ["properties"]["replicas"];
        assert_eq!(replicas["minimum"], 1.0);
        assert!(
            replicas["description"]
                .as_str()
                .unwrap()
                .contains("Number of worker pods")
        );
    }

    #[test]
    fn shard_selections_parse_sorted_and_format_as_ranges() {
        assert_eq!(parse_shards("7,0-2,3,2").unwrap(), vec![0, 1, 2, 3, 7]);
        assert_eq!(format_shards(&[0, 1, 2, 3, 7, 9, 10]), "0-3,7,9-10");
        assert_eq!(format_shards(&[]), "");
        for (bad, why) in [
            ("3-1", "range start is after its end"),
            ("a", "\"a\" is not a shard number"),
            ("1,,2", "\"\" is not a shard number"),
            ("0-18446744073709551615", "more than 1000000 shards"),
            // Many ranges, each small: the total counts.
            (
                &(0..3)
                    .map(|k| format!("{}-{}", k * 600_000, k * 600_000 + 599_999))
                    .collect::<Vec<_>>()
                    .join(","),
                "more than 1000000 shards",
            ),
            (&"1,".repeat(40_000), "longer than a shard selection may be"),
        ] {
            let err = parse_shards(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
        let all: Vec<u64> = (0..50).filter(|s| s % 3 != 1).collect();
        assert_eq!(parse_shards(&format_shards(&all)).unwrap(), all);
    }
}
