//! The trainer's one validated configuration.
//!
//! Sources, in order: the env contract the operator (or the local runner) sets, or a TrainingJob
//! YAML file for a single local process; then the trainer-local knobs below, which are not part
//! of the job spec because they concern one process, not the model. Everything is checked here,
//! before any data is read, and errors name the variable or field.

use std::net::SocketAddr;

use radfm_api::env::EnvContract;
use radfm_api::trainingjob::TrainingJob;

use crate::model::VitConfig;
use crate::{Error, Result};

/// Rank of this process inside its pod (set by the launcher; default 0).
pub const LOCAL_RANK: &str = "RADFM_LOCAL_RANK";
/// Steps between progress lines on stdout (default 10).
pub const LOG_EVERY: &str = "RADFM_LOG_EVERY";
/// Address of the Prometheus endpoint (`host:port`); unset: none.
pub const METRICS_ADDR: &str = "RADFM_METRICS_ADDR";
/// Consecutive non-finite losses tolerated (update skipped) before exiting 66 (default 3).
pub const MAX_NONFINITE: &str = "RADFM_MAX_NONFINITE_STEPS";
/// Corrupt samples tolerated per epoch and rank before exiting 65 (default 16).
pub const MAX_BAD_SAMPLES: &str = "RADFM_MAX_BAD_SAMPLES";
/// Random resized crop, flip and intensity jitter: `true` (default) or `false`.
pub const AUGMENT: &str = "RADFM_AUGMENT";
/// CPU threads for libtorch (default: what libtorch picks).
pub const THREADS: &str = "RADFM_THREADS";
/// Loss targets normalised per patch (`true`, MAE's default) or raw pixels (`false`).
pub const NORM_PIX_LOSS: &str = "RADFM_NORM_PIX_LOSS";
/// Seconds a collective may wait for a peer before failing with exit 76, once the gang formed.
pub const COLLECTIVE_TIMEOUT: &str = "RADFM_COLLECTIVE_TIMEOUT";
/// Seconds joining the gang may take (rank 0 reachable, every rank connected): sized for
/// scheduling and image pulls, so a late node is not a failed attempt.
pub const RENDEZVOUS_TIMEOUT: &str = "RADFM_RENDEZVOUS_TIMEOUT";
/// The collective between ranks: `auto` (default: NCCL on GPUs, the TCP ring on CPUs), `nccl`
/// or `ring`.
pub const COLLECTIVE: &str = "RADFM_COLLECTIVE";
/// Fault injection for tests and drills: `nan-loss@STEP` makes every loss from STEP on NaN.
pub const FAULT: &str = "RADFM_FAULT";

/// The trainer-local variables, with what they do (documented in docs/env-contract.md).
pub const LOCAL_VARS: &[(&str, &str)] = &[
    (
        LOCAL_RANK,
        "rank of this process inside the pod (default 0)",
    ),
    (
        LOG_EVERY,
        "steps between JSON progress lines on stdout (default 10)",
    ),
    (
        METRICS_ADDR,
        "host:port of the Prometheus endpoint (default: none)",
    ),
    (
        MAX_NONFINITE,
        "consecutive NaN/inf losses skipped before exiting 66 (default 3)",
    ),
    (
        MAX_BAD_SAMPLES,
        "corrupt samples per epoch and rank before exiting 65 (default 16)",
    ),
    (
        AUGMENT,
        "random resized crop, flip, intensity jitter (default true)",
    ),
    (THREADS, "libtorch CPU threads (default: libtorch's choice)"),
    (
        NORM_PIX_LOSS,
        "MAE targets normalised per patch (default true) or raw pixels",
    ),
    (
        COLLECTIVE_TIMEOUT,
        "seconds a collective waits for a peer before exiting 76 (default 120)",
    ),
    (
        radfm_data::store::SINGLE_WRITER,
        "true: accept a store without create-only writes (one writer only)",
    ),
    (
        RENDEZVOUS_TIMEOUT,
        "seconds joining the gang may take before exiting 76 (default 900)",
    ),
    (
        COLLECTIVE,
        "collective between ranks: auto (default: nccl on GPUs, ring on CPUs), nccl or ring",
    ),
    (FAULT, "fault injection for drills: nan-loss@STEP"),
    (
        radfm_collective::ring::TRANSPORT_VAR,
        "the CPU ring's links: shared memory between ranks on one host, TCP elsewhere (default), or tcp everywhere",
    ),
];

/// Numeric precision of the forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// fp32 everywhere.
    Fp32,
    /// bf16 autocast on CUDA (fp32 on CPU).
    Bf16,
}

/// The collective backend between ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// NCCL when this process trains on a GPU, else the ring.
    Auto,
    /// NCCL on the process's GPU.
    Nccl,
    /// The TCP ring through host memory.
    Ring,
}

/// An injected fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Fault {
    /// The loss is NaN from this step on.
    NanLossFrom(i64),
}

/// Everything one trainer process needs, validated.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    /// TrainingJob name.
    pub job: String,
    /// Gang attempt.
    pub attempt: i32,
    /// Rendezvous host (global rank 0).
    pub master_addr: String,
    /// Rendezvous port.
    pub master_port: u16,
    /// How long collectives wait for a peer.
    pub collective_timeout: std::time::Duration,
    /// How long joining the gang may take.
    #[serde(default = "default_rendezvous_timeout")]
    pub rendezvous_timeout: std::time::Duration,
    /// The collective backend asked for.
    pub collective: Backend,
    /// Global rank of this process.
    pub rank: usize,
    /// Processes in the gang.
    pub world: usize,
    /// Rank within the pod (selects the GPU).
    pub local_rank: usize,
    /// Trainer processes per pod.
    pub nproc_per_node: usize,
    /// GPUs of this pod (0: CPU).
    pub gpus: usize,
    /// Dataset folder URI.
    pub dataset_uri: String,
    /// Shard sequence numbers trained on (None: every shard of the index).
    pub dataset_shards: Option<Vec<u64>>,
    /// Folder rank 0 exports the encoder to after the last step.
    pub export_uri: Option<String>,
    /// Checkpoint folder URI.
    pub checkpoint_uri: String,
    /// Steps between checkpoints.
    pub checkpoint_every: i64,
    /// Committed checkpoints kept.
    pub checkpoint_keep: usize,
    /// Architecture preset name.
    pub arch: String,
    /// Model sizes.
    pub model: VitConfig,
    /// Fraction of patches masked.
    pub mask_ratio: f64,
    /// Objectives and their weights.
    #[serde(default)]
    pub objective: radfm_api::trainingjob::Objective,
    /// Weights to start from.
    pub init_from: Option<String>,
    /// Total optimizer steps, if given as steps.
    pub steps: Option<i64>,
    /// Total epochs, if given as epochs.
    pub epochs: Option<i64>,
    /// Images per process per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accumulation: usize,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Linear warm-up steps.
    pub warmup_steps: i64,
    /// The window of a longer learning-rate schedule this job runs (None: its own steps).
    pub schedule: Option<radfm_api::trainingjob::ScheduleWindow>,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Gradient clipping norm (0: off).
    pub grad_clip_norm: f64,
    /// Numeric precision.
    pub precision: Precision,
    /// Seed of init, masking and data order.
    pub seed: i64,
    /// Augmentations on.
    pub augment: bool,
    /// Per-patch normalised loss targets.
    pub norm_pix_loss: bool,
    /// Corrupt samples tolerated per epoch.
    pub max_bad_samples: usize,
    /// Consecutive non-finite losses tolerated.
    pub max_nonfinite: u32,
    /// Steps between progress lines.
    pub log_every: i64,
    /// Prometheus endpoint.
    pub metrics_addr: Option<SocketAddr>,
    /// libtorch CPU threads.
    pub threads: Option<i32>,
    /// Pod to annotate with progress (rank 0 in a cluster).
    pub pod_name: Option<String>,
    /// File with the gang's secret ([`radfm_api::env::GANG_SECRET_FILE`]).
    pub gang_secret_file: Option<std::path::PathBuf>,
    /// Pod namespace.
    pub namespace: String,
    /// Injected fault.
    pub fault: Option<Fault>,
}

impl TrainConfig {
    /// The learning rate of this job's `step` of `total`: its place in the schedule window when
    /// it runs one (a federated round), else in its own warm-up and cosine decay.
    pub fn learning_rate_at(&self, step: i64, total: i64) -> f64 {
        let (step, total) = match self.schedule {
            Some(w) => (w.start_step + step, w.total_steps),
            None => (step, total),
        };
        crate::optim::lr_at(step, total, self.warmup_steps, self.learning_rate)
    }

    /// From the process environment.
    pub fn from_env() -> Result<TrainConfig> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// From any variable source (the env contract plus the trainer-local variables). The global
    /// rank is NODE_RANK × NPROC_PER_NODE + RADFM_LOCAL_RANK (set by the launcher; default 0).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<TrainConfig> {
        let contract = EnvContract::from_lookup(&get)?;
        let local_rank: usize = parse_var(&get, LOCAL_RANK, 0)?;
        Self::build(contract, local_rank, &get)
    }

    /// From a TrainingJob YAML file, as one local process (rank 0 of 1); the trainer-local
    /// variables still come from `get`.
    pub fn from_job_file(
        path: &std::path::Path,
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<TrainConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
            path: path.display().to_string(),
            source: e,
        })?;
        let mut job = TrainingJob::from_yaml(&text, &path.display().to_string())?;
        job.spec.workers.replicas = 1;
        job.spec.workers.nproc_per_node = Some(1);
        job.spec.workers.gpus_per_worker = job.spec.workers.gpus_per_worker.min(1);
        let contract = EnvContract::for_worker(&job, 0, 1, "127.0.0.1");
        // The same checks the env path applies.
        let vars = contract.to_vars();
        let contract = EnvContract::from_lookup(|k| {
            vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        })?;
        Self::build(contract, 0, &get)
    }

    fn build(
        c: EnvContract,
        local_rank: usize,
        get: &impl Fn(&str) -> Option<String>,
    ) -> Result<TrainConfig> {
        let nproc = c.nproc_per_node as usize;
        if local_rank >= nproc {
            return Err(Error::Field {
                field: LOCAL_RANK.into(),
                reason: format!("{local_rank} must be < RADFM_NPROC_PER_NODE={nproc}"),
            });
        }
        let model = VitConfig::preset(&c.model_arch, c.image_size.into(), c.patch_size.into())?;
        let fault = parse_fault(get)?;
        let metrics_addr = match get(METRICS_ADDR).filter(|v| !v.is_empty()) {
            None => None,
            Some(v) => Some(v.parse().map_err(|_| Error::Field {
                field: METRICS_ADDR.into(),
                reason: format!("{v:?} is not host:port"),
            })?),
        };
        let augment = parse_bool(get, AUGMENT, true)?;
        let norm_pix_loss = parse_bool(get, NORM_PIX_LOSS, true)?;
        let (collective, collective_timeout) = parse_collective(get)?;
        let rendezvous_timeout = parse_seconds(get, RENDEZVOUS_TIMEOUT, 900.0)?;
        let log_every: i64 = parse_var(get, LOG_EVERY, 10)?;
        if log_every < 1 {
            return Err(Error::Field {
                field: LOG_EVERY.into(),
                reason: format!("{log_every} must be >= 1"),
            });
        }
        Ok(TrainConfig {
            job: c.job_name.clone(),
            attempt: c.attempt,
            master_addr: c.master_addr.clone(),
            master_port: c.master_port,
            collective_timeout,
            rendezvous_timeout,
            collective,
            rank: c.node_rank as usize * nproc + local_rank,
            world: c.world_size() as usize,
            local_rank,
            nproc_per_node: nproc,
            gpus: c.gpus.max(0) as usize,
            dataset_uri: c.dataset_uri,
            dataset_shards: c.dataset_shards,
            export_uri: c.export_uri,
            checkpoint_uri: c.checkpoint_uri,
            checkpoint_every: c.checkpoint_every,
            checkpoint_keep: c.checkpoint_keep as usize,
            arch: c.model_arch,
            model,
            mask_ratio: c.mask_ratio,
            objective: c.objective,
            init_from: c.init_from,
            steps: c.steps,
            epochs: c.epochs.map(i64::from),
            batch_size: c.batch_size as usize,
            grad_accumulation: c.grad_accumulation as usize,
            learning_rate: c.learning_rate,
            warmup_steps: c.warmup_steps,
            schedule: c.schedule,
            weight_decay: c.weight_decay,
            grad_clip_norm: c.grad_clip_norm,
            precision: if c.precision == "bf16" {
                Precision::Bf16
            } else {
                Precision::Fp32
            },
            seed: c.seed,
            augment,
            norm_pix_loss,
            max_bad_samples: parse_var(get, MAX_BAD_SAMPLES, 16)?,
            max_nonfinite: parse_var(get, MAX_NONFINITE, 3)?,
            log_every,
            metrics_addr,
            threads: parse_threads(get)?,
            pod_name: get(radfm_api::env::POD_NAME).filter(|v| !v.is_empty()),
            gang_secret_file: get(radfm_api::env::GANG_SECRET_FILE)
                .filter(|v| !v.is_empty())
                .map(std::path::PathBuf::from),
            namespace: c.job_namespace,
            fault,
        })
    }

    /// The device of this process: its GPU when the pod has GPUs, the CPU when it has none. A
    /// pod that asked for GPUs but sees no usable one is a permanent error: training on the CPU
    /// instead would be silently hundreds of times slower.
    pub fn device(&self) -> Result<tch::Device> {
        let usable = if tch::Cuda::is_available() {
            tch::Cuda::device_count().max(0) as usize
        } else {
            0
        };
        select_device(self.gpus, self.local_rank, usable)
    }
}

/// [`TrainConfig::device`] for `gpus` requested, this process's `local_rank` and the number of
/// CUDA devices it can use.
pub fn select_device(gpus: usize, local_rank: usize, usable: usize) -> Result<tch::Device> {
    if gpus == 0 {
        return Ok(tch::Device::Cpu);
    }
    if local_rank < usable {
        return Ok(tch::Device::Cuda(local_rank));
    }
    Err(Error::Field {
        field: radfm_api::env::GPUS.into(),
        reason: format!(
            "the pod requested {gpus} GPU(s) but local rank {local_rank} sees {usable} usable CUDA \
             device(s) (driver or device plugin missing, CUDA_VISIBLE_DEVICES, or a CPU-only \
             libtorch); refusing to train on the CPU"
        ),
    })
}

fn parse_bool(get: &impl Fn(&str) -> Option<String>, name: &str, default: bool) -> Result<bool> {
    match get(name).as_deref().map(str::trim) {
        None | Some("") => Ok(default),
        Some("true") | Some("1") => Ok(true),
        Some("false") | Some("0") => Ok(false),
        Some(other) => Err(Error::Field {
            field: name.into(),
            reason: format!("{other:?} is not true or false"),
        }),
    }
}

fn parse_var<T: std::str::FromStr>(
    get: &impl Fn(&str) -> Option<String>,
    name: &str,
    default: T,
) -> Result<T> {
    match get(name).filter(|v| !v.trim().is_empty()) {
        None => Ok(default),
        Some(v) => v.trim().parse().map_err(|_| Error::Field {
            field: name.into(),
            reason: format!("{v:?} is not a valid number"),
        }),
    }
}

/// RADFM_FAULT: `nan-loss@STEP` (tests inject a non-finite loss from that step on).
fn parse_fault(get: &impl Fn(&str) -> Option<String>) -> Result<Option<Fault>> {
    Ok(match get(FAULT).filter(|v| !v.is_empty()) {
        None => None,
        Some(v) => match v.strip_prefix("nan-loss@").map(str::parse::<i64>) {
            Some(Ok(step)) => Some(Fault::NanLossFrom(step)),
            _ => {
                return Err(Error::Field {
                    field: FAULT.into(),
                    reason: format!("{v:?} is not nan-loss@STEP"),
                });
            }
        },
    })
}

fn default_rendezvous_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(900)
}

/// A positive number of seconds below a million.
fn parse_seconds(
    get: &impl Fn(&str) -> Option<String>,
    var: &str,
    default: f64,
) -> Result<std::time::Duration> {
    let secs: f64 = parse_var(get, var, default)?;
    if !(secs > 0.0 && secs < 1e6) {
        return Err(Error::Field {
            field: var.into(),
            reason: format!("{secs} must be a positive number of seconds below 1000000"),
        });
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

/// The collective backend and its timeout.
fn parse_collective(
    get: &impl Fn(&str) -> Option<String>,
) -> Result<(Backend, std::time::Duration)> {
    let collective_timeout = parse_seconds(get, COLLECTIVE_TIMEOUT, 120.0)?;
    let collective = match get(COLLECTIVE).as_deref().map(str::trim) {
        None | Some("") | Some("auto") => Backend::Auto,
        Some("nccl") => Backend::Nccl,
        Some("ring") => Backend::Ring,
        Some(other) => {
            return Err(Error::Field {
                field: COLLECTIVE.into(),
                reason: format!("{other:?} is not auto, nccl or ring"),
            });
        }
    };
    Ok((collective, collective_timeout))
}

/// RADFM_THREADS: libtorch's intra-op threads, where set.
fn parse_threads(get: &impl Fn(&str) -> Option<String>) -> Result<Option<i32>> {
    get(THREADS)
        .filter(|v| !v.is_empty())
        .map(|v| {
            v.parse::<i32>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or(Error::Field {
                    field: THREADS.into(),
                    reason: format!("{v:?} is not a positive integer"),
                })
        })
        .transpose()
}

#[cfg(test)]
pub(crate) mod tests {

    #[test]
    fn a_pod_that_asked_for_gpus_never_trains_on_the_cpu() {
        assert_eq!(select_device(0, 0, 0).unwrap(), tch::Device::Cpu);
        assert_eq!(select_device(0, 0, 8).unwrap(), tch::Device::Cpu);
        assert_eq!(select_device(8, 3, 8).unwrap(), tch::Device::Cuda(3));
        let e = select_device(1, 0, 0).unwrap_err();
        assert_eq!(e.exit_code(), radfm_api::exit::INVALID_CONFIG);
        assert!(
            e.to_string()
                .contains("requested 1 GPU(s) but local rank 0 sees 0 usable"),
            "{e}"
        );
        assert!(
            select_device(2, 1, 1).is_err(),
            "fewer devices than local ranks"
        );
    }
    use super::*;
    use std::collections::HashMap;

    /// A valid single-process contract; override entries per test.
    pub(crate) fn vars(extra: &[(&str, &str)]) -> HashMap<String, String> {
        let mut m: HashMap<String, String> = [
            ("RADFM_JOB_NAME", "t"),
            ("RADFM_ATTEMPT", "1"),
            ("RADFM_NODE_RANK", "0"),
            ("RADFM_NNODES", "1"),
            ("RADFM_NPROC_PER_NODE", "1"),
            ("RADFM_MASTER_ADDR", "127.0.0.1"),
            ("RADFM_DATASET_URI", "file:///tmp/d"),
            ("RADFM_CHECKPOINT_URI", "file:///tmp/c"),
            ("RADFM_CHECKPOINT_EVERY", "5"),
            ("RADFM_CHECKPOINT_KEEP", "2"),
            ("RADFM_MODEL_ARCH", "vit-tiny"),
            ("RADFM_STEPS", "10"),
            ("RADFM_BATCH_SIZE", "4"),
            ("RADFM_LEARNING_RATE", "0.001"),
            ("RADFM_PRECISION", "fp32"),
            ("RADFM_IMAGE_SIZE", "32"),
            ("RADFM_PATCH_SIZE", "8"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in extra {
            m.insert(k.to_string(), v.to_string());
        }
        m
    }

    fn parse(extra: &[(&str, &str)]) -> Result<TrainConfig> {
        let m = vars(extra);
        TrainConfig::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn global_rank_combines_node_and_local_rank() {
        let c = parse(&[
            ("RADFM_NNODES", "2"),
            ("RADFM_NODE_RANK", "1"),
            ("RADFM_NPROC_PER_NODE", "4"),
            ("RADFM_LOCAL_RANK", "3"),
        ])
        .unwrap();
        assert_eq!((c.rank, c.world), (7, 8));
        assert_eq!(c.collective, Backend::Auto);
        let ring = parse(&[("RADFM_COLLECTIVE", "ring")]).unwrap();
        assert_eq!(ring.collective, Backend::Ring);
        assert_eq!(c.model.grid(), 4);
    }

    #[test]
    fn rounds_in_a_schedule_window_follow_one_warm_up_and_cosine_instead_of_restarting() {
        let whole = parse(&[("RADFM_STEPS", "120"), ("RADFM_WARMUP_STEPS", "10")]).unwrap();
        let mut stitched = Vec::new();
        for round in 1..=3 {
            let (start, total) = (((round - 1) * 40).to_string(), "120".to_string());
            let c = parse(&[
                ("RADFM_STEPS", "40"),
                ("RADFM_WARMUP_STEPS", "10"),
                ("RADFM_SCHEDULE_START_STEP", &start),
                ("RADFM_SCHEDULE_TOTAL_STEPS", &total),
            ])
            .unwrap();
            stitched.extend((0..40).map(|s| c.learning_rate_at(s, 40)));
        }
        let one: Vec<f64> = (0..120).map(|s| whole.learning_rate_at(s, 120)).collect();
        assert_eq!(stitched, one);
        let alone = parse(&[("RADFM_STEPS", "40"), ("RADFM_WARMUP_STEPS", "10")]).unwrap();
        assert!(
            alone.learning_rate_at(39, 40) < 1e-5 && stitched[39] > 5e-4,
            "a round alone decays to zero at its end; round 1 of three does not"
        );
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (var, value, needle) in [
            ("RADFM_LOCAL_RANK", "1", "RADFM_LOCAL_RANK"),
            ("RADFM_FAULT", "boom", "RADFM_FAULT"),
            ("RADFM_METRICS_ADDR", "nope", "RADFM_METRICS_ADDR"),
            ("RADFM_IMAGE_SIZE", "36", "RADFM_IMAGE_SIZE"),
            ("RADFM_MASK_RATIO", "1.5", "RADFM_MASK_RATIO"),
            ("RADFM_AUGMENT", "maybe", "RADFM_AUGMENT"),
            ("RADFM_LOG_EVERY", "0", "RADFM_LOG_EVERY"),
            ("RADFM_THREADS", "-2", "RADFM_THREADS"),
            ("RADFM_COLLECTIVE_TIMEOUT", "-1", "RADFM_COLLECTIVE_TIMEOUT"),
            ("RADFM_RENDEZVOUS_TIMEOUT", "0", "RADFM_RENDEZVOUS_TIMEOUT"),
            (
                "RADFM_RENDEZVOUS_TIMEOUT",
                "1e9",
                "RADFM_RENDEZVOUS_TIMEOUT",
            ),
            ("RADFM_COLLECTIVE", "gloo", "RADFM_COLLECTIVE"),
        ] {
            let e = parse(&[(var, value)]).unwrap_err();
            assert!(e.to_string().contains(needle), "{var}={value}: {e}");
            assert_eq!(e.exit_code(), 64, "{e}");
        }
    }

    #[test]
    fn the_local_sample_job_is_a_valid_single_process_config() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../manifests/samples/trainingjob-local.yaml");
        let c = TrainConfig::from_job_file(&path, |_| None).unwrap();
        assert_eq!((c.world, c.model.grid(), c.steps), (1, 8, Some(300)));
        assert_eq!(c.dataset_uri, "file:///tmp/radfm/cohort");
    }

    #[test]
    fn docs_list_every_trainer_local_variable() {
        let doc = include_str!("../../docs/env-contract.md");
        for (name, _) in LOCAL_VARS {
            assert!(
                doc.contains(&format!("| `{name}` |")),
                "docs/env-contract.md lacks {name}"
            );
        }
    }

    #[test]
    fn fault_injection_parses() {
        let c = parse(&[("RADFM_FAULT", "nan-loss@7")]).unwrap();
        assert_eq!(c.fault, Some(Fault::NanLossFrom(7)));
    }

    #[test]
    fn a_job_file_becomes_a_single_process_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("job.yaml");
        std::fs::write(
            &path,
            r#"apiVersion: radfm.io/v1alpha1
kind: TrainingJob
metadata: {name: laptop}
spec:
  image: radfm/trainer:dev
  workers: {replicas: 4, gpusPerWorker: 8}
  dataset: {uri: "file:///data/cohort"}
  checkpoint: {uri: "file:///data/ckpt", everySteps: 50}
  model: {architecture: vit-small, imageSize: 64, patchSize: 8, maskRatio: 0.9}
  training: {steps: 100, learningRate: 0.001, gradAccumulation: 2}
"#,
        )
        .unwrap();
        let c = TrainConfig::from_job_file(&path, |_| None).unwrap();
        assert_eq!((c.rank, c.world, c.gpus), (0, 1, 1));
        assert_eq!((c.model.width, c.model.image_size), (384, 64));
        assert_eq!((c.mask_ratio, c.grad_accumulation), (0.9, 2));
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("  model:", "  modle:")).unwrap();
        let e = TrainConfig::from_job_file(&path, |_| None).unwrap_err();
        assert!(e.to_string().contains("spec.modle"), "{e}");
    }
}
