//! The trainer env contract: every variable a trainer pod receives.
//!
//! The operator builds it for each worker pod, the local runner builds the same for each local
//! process, and the trainer parses it back into a validated [`EnvContract`] before it does
//! anything else. Keeping builder and parser side by side makes a round-trip test possible and the
//! documentation (docs/env-contract.md) checkable against [`VARS`].

use crate::trainingjob::{ScheduleWindow, TrainingJob};
use crate::{Error, Result};

/// Name, meaning of every contract variable, in the order [`EnvContract::to_vars`] emits them.
pub const VARS: &[(&str, &str)] = &[
    (JOB_NAME, "TrainingJob name"),
    (JOB_NAMESPACE, "TrainingJob namespace"),
    (
        JOB_UID,
        "TrainingJob uid: distinguishes a re-created job of the same name",
    ),
    (
        ATTEMPT,
        "gang attempt, starting at 1; rendezvous keys carry it so stale ranks cannot join",
    ),
    (NODE_RANK, "rank of this worker pod, 0..NNODES-1"),
    (NNODES, "worker pods in the gang (spec.workers.replicas)"),
    (NPROC_PER_NODE, "trainer processes in this pod"),
    (WORLD_SIZE, "NNODES x NPROC_PER_NODE"),
    (
        MASTER_ADDR,
        "DNS name of rank 0 through the headless Service",
    ),
    (MASTER_PORT, "rendezvous port served by global rank 0"),
    (DATASET_URI, "dataset folder URI (index.json and shards)"),
    (
        DATASET_SHARDS,
        "shard sequence numbers to train on (`0-9,12`); unset: all",
    ),
    (CHECKPOINT_URI, "checkpoint folder URI of this job"),
    (CHECKPOINT_EVERY, "steps between checkpoints"),
    (CHECKPOINT_KEEP, "committed checkpoints kept"),
    (MODEL_ARCH, "vit-tiny, vit-small or vit-base"),
    (INIT_FROM, "weights to start from; empty: random init"),
    (STEPS, "total optimizer steps (exclusive with EPOCHS)"),
    (EPOCHS, "total epochs (exclusive with STEPS)"),
    (BATCH_SIZE, "images per device per step"),
    (LEARNING_RATE, "peak learning rate"),
    (WARMUP_STEPS, "linear warm-up steps"),
    (
        SCHEDULE_START_STEP,
        "the learning-rate schedule's step of this job's first step (default 0)",
    ),
    (
        SCHEDULE_TOTAL_STEPS,
        "steps of the whole learning-rate schedule (default: the job's own)",
    ),
    (PRECISION, "fp32 or bf16"),
    (SEED, "seed of init, masking and data order"),
    (GPUS, "GPUs of this pod (0: CPU)"),
    (IMAGE_SIZE, "square input side in pixels (default 224)"),
    (PATCH_SIZE, "square patch side in pixels (default 16)"),
    (MASK_RATIO, "fraction of patches masked (default 0.75)"),
    (
        OBJECTIVE,
        "objectives with weights: mae=1 (default), contrastive=1, mae=1,contrastive=0.5",
    ),
    (WEIGHT_DECAY, "AdamW decoupled weight decay (default 0.05)"),
    (
        GRAD_CLIP_NORM,
        "global gradient-norm clip, 0 disables (default 1.0)",
    ),
    (GRAD_ACCUMULATION, "batches per optimizer step (default 1)"),
    (
        EXPORT_URI,
        "folder rank 0 exports the encoder to after the last step; unset: no export",
    ),
];

/// TrainingJob name.
pub const JOB_NAME: &str = "RADFM_JOB_NAME";
/// TrainingJob namespace.
pub const JOB_NAMESPACE: &str = "RADFM_JOB_NAMESPACE";
/// TrainingJob uid.
pub const JOB_UID: &str = "RADFM_JOB_UID";
/// Gang attempt.
pub const ATTEMPT: &str = "RADFM_ATTEMPT";
/// Pod rank.
pub const NODE_RANK: &str = "RADFM_NODE_RANK";
/// Pods in the gang.
pub const NNODES: &str = "RADFM_NNODES";
/// Processes per pod.
pub const NPROC_PER_NODE: &str = "RADFM_NPROC_PER_NODE";
/// Processes in the gang.
pub const WORLD_SIZE: &str = "RADFM_WORLD_SIZE";
/// Rank 0's address.
pub const MASTER_ADDR: &str = "RADFM_MASTER_ADDR";
/// Rendezvous port.
pub const MASTER_PORT: &str = "RADFM_MASTER_PORT";
/// Dataset URI.
pub const DATASET_URI: &str = "RADFM_DATASET_URI";
/// Shard selection.
pub const DATASET_SHARDS: &str = "RADFM_DATASET_SHARDS";
/// Export folder.
pub const EXPORT_URI: &str = "RADFM_EXPORT_URI";
/// Checkpoint URI.
pub const CHECKPOINT_URI: &str = "RADFM_CHECKPOINT_URI";
/// Checkpoint cadence.
pub const CHECKPOINT_EVERY: &str = "RADFM_CHECKPOINT_EVERY";
/// Checkpoints kept.
pub const CHECKPOINT_KEEP: &str = "RADFM_CHECKPOINT_KEEP";
/// Architecture preset.
pub const MODEL_ARCH: &str = "RADFM_MODEL_ARCH";
/// Initial weights.
pub const INIT_FROM: &str = "RADFM_INIT_FROM";
/// Total steps.
pub const STEPS: &str = "RADFM_STEPS";
/// Total epochs.
pub const EPOCHS: &str = "RADFM_EPOCHS";
/// Batch size per device.
pub const BATCH_SIZE: &str = "RADFM_BATCH_SIZE";
/// Learning rate.
pub const LEARNING_RATE: &str = "RADFM_LEARNING_RATE";
/// Warm-up steps.
pub const WARMUP_STEPS: &str = "RADFM_WARMUP_STEPS";
/// First step of the job within a longer learning-rate schedule.
pub const SCHEDULE_START_STEP: &str = "RADFM_SCHEDULE_START_STEP";
/// Steps of a learning-rate schedule longer than the job.
pub const SCHEDULE_TOTAL_STEPS: &str = "RADFM_SCHEDULE_TOTAL_STEPS";
/// Precision.
pub const PRECISION: &str = "RADFM_PRECISION";
/// Seed.
pub const SEED: &str = "RADFM_SEED";
/// GPUs per pod.
pub const GPUS: &str = "RADFM_GPUS";
/// Square input side.
pub const IMAGE_SIZE: &str = "RADFM_IMAGE_SIZE";
/// Square patch side.
pub const PATCH_SIZE: &str = "RADFM_PATCH_SIZE";
/// Masked fraction of patches.
pub const MASK_RATIO: &str = "RADFM_MASK_RATIO";
/// The pretraining objectives with their weights (`mae=1,contrastive=0.5`).
pub const OBJECTIVE: &str = "RADFM_OBJECTIVE";
/// AdamW weight decay.
pub const WEIGHT_DECAY: &str = "RADFM_WEIGHT_DECAY";
/// Gradient clipping norm.
pub const GRAD_CLIP_NORM: &str = "RADFM_GRAD_CLIP_NORM";
/// Gradient accumulation.
pub const GRAD_ACCUMULATION: &str = "RADFM_GRAD_ACCUMULATION";
/// Pod name (downward API; set by the operator, absent in local runs).
pub const POD_NAME: &str = "RADFM_POD_NAME";

/// File holding the gang's secret (hex), mounted by the operator from the job's Secret: only
/// processes holding it join the rendezvous and the ring. Unset in ad-hoc launches, which then
/// do not check membership.
pub const GANG_SECRET_FILE: &str = "RADFM_GANG_SECRET_FILE";

/// Default rendezvous port.
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// The validated contract of one worker pod (or local worker process group).
#[derive(Debug, Clone, PartialEq)]
pub struct EnvContract {
    /// TrainingJob name.
    pub job_name: String,
    /// TrainingJob namespace.
    pub job_namespace: String,
    /// TrainingJob uid.
    pub job_uid: String,
    /// Gang attempt (>= 1).
    pub attempt: i32,
    /// This pod's rank.
    pub node_rank: i32,
    /// Pods in the gang.
    pub nnodes: i32,
    /// Processes per pod.
    pub nproc_per_node: i32,
    /// Rank 0's host.
    pub master_addr: String,
    /// Rendezvous port.
    pub master_port: u16,
    /// Dataset URI.
    pub dataset_uri: String,
    /// Shard sequence numbers to train on (None: all).
    pub dataset_shards: Option<Vec<u64>>,
    /// Checkpoint URI of this job.
    pub checkpoint_uri: String,
    /// Steps between checkpoints.
    pub checkpoint_every: i64,
    /// Checkpoints kept.
    pub checkpoint_keep: i32,
    /// Architecture preset.
    pub model_arch: String,
    /// Initial weights, if any.
    pub init_from: Option<String>,
    /// Total steps, if the job counts steps.
    pub steps: Option<i64>,
    /// Total epochs, if the job counts epochs.
    pub epochs: Option<i32>,
    /// Batch size per device.
    pub batch_size: i32,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Warm-up steps.
    pub warmup_steps: i64,
    /// The window of a longer learning-rate schedule, if any.
    pub schedule: Option<ScheduleWindow>,
    /// fp32 or bf16.
    pub precision: String,
    /// Seed.
    pub seed: i64,
    /// GPUs of this pod.
    pub gpus: i32,
    /// Square input side in pixels.
    pub image_size: i32,
    /// Square patch side in pixels.
    pub patch_size: i32,
    /// Fraction of patches masked.
    pub mask_ratio: f64,
    /// Objectives and their weights.
    pub objective: crate::trainingjob::Objective,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Global gradient-norm clip (0: off).
    pub grad_clip_norm: f64,
    /// Batches per optimizer step.
    pub grad_accumulation: i32,
    /// Export folder, if the job exports its encoder.
    pub export_uri: Option<String>,
}

impl EnvContract {
    /// The contract of worker `node_rank` of `job` in `attempt`, with rank 0 reachable at
    /// `master_addr`.
    pub fn for_worker(job: &TrainingJob, node_rank: i32, attempt: i32, master_addr: &str) -> Self {
        let s = &job.spec;
        EnvContract {
            job_name: job.metadata.name.clone().unwrap_or_default(),
            job_namespace: job
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            job_uid: job.metadata.uid.clone().unwrap_or_default(),
            attempt,
            node_rank,
            nnodes: s.workers.replicas,
            nproc_per_node: s.workers.nproc(),
            master_addr: master_addr.to_string(),
            master_port: DEFAULT_MASTER_PORT,
            dataset_uri: s.dataset.uri.clone(),
            dataset_shards: s
                .dataset
                .shards
                .as_deref()
                .and_then(|t| crate::trainingjob::parse_shards(t).ok()),
            checkpoint_uri: s.checkpoint.uri.clone(),
            checkpoint_every: s.checkpoint.every_steps,
            checkpoint_keep: s.checkpoint.keep_last,
            model_arch: s.model.architecture.as_str().to_string(),
            init_from: s.model.init_from.clone(),
            steps: s.training.steps,
            epochs: s.training.epochs,
            batch_size: s.training.batch_size_per_device,
            learning_rate: s.training.learning_rate,
            warmup_steps: s.training.warmup_steps,
            schedule: s.training.schedule,
            precision: s.training.precision.as_str().to_string(),
            seed: s.training.seed,
            gpus: s.workers.gpus_per_worker,
            image_size: s.model.image_size,
            patch_size: s.model.patch_size,
            mask_ratio: s.model.mask_ratio,
            objective: s.model.objective,
            weight_decay: s.training.weight_decay,
            grad_clip_norm: s.training.grad_clip_norm,
            grad_accumulation: s.training.grad_accumulation,
            export_uri: s.export.as_ref().map(|e| e.uri.clone()),
        }
    }

    /// Processes in the gang.
    pub fn world_size(&self) -> i32 {
        self.nnodes * self.nproc_per_node
    }

    /// The variables, in [`VARS`] order; optional values that are unset are left out.
    pub fn to_vars(&self) -> Vec<(String, String)> {
        let mut v: Vec<(&str, String)> = vec![
            (JOB_NAME, self.job_name.clone()),
            (JOB_NAMESPACE, self.job_namespace.clone()),
            (JOB_UID, self.job_uid.clone()),
            (ATTEMPT, self.attempt.to_string()),
            (NODE_RANK, self.node_rank.to_string()),
            (NNODES, self.nnodes.to_string()),
            (NPROC_PER_NODE, self.nproc_per_node.to_string()),
            (WORLD_SIZE, self.world_size().to_string()),
            (MASTER_ADDR, self.master_addr.clone()),
            (MASTER_PORT, self.master_port.to_string()),
            (DATASET_URI, self.dataset_uri.clone()),
        ];
        if let Some(s) = &self.dataset_shards {
            v.push((DATASET_SHARDS, crate::trainingjob::format_shards(s)));
        }
        v.extend([
            (CHECKPOINT_URI, self.checkpoint_uri.clone()),
            (CHECKPOINT_EVERY, self.checkpoint_every.to_string()),
            (CHECKPOINT_KEEP, self.checkpoint_keep.to_string()),
            (MODEL_ARCH, self.model_arch.clone()),
        ]);
        if let Some(i) = &self.init_from {
            v.push((INIT_FROM, i.clone()));
        }
        if let Some(s) = self.steps {
            v.push((STEPS, s.to_string()));
        }
        if let Some(e) = self.epochs {
            v.push((EPOCHS, e.to_string()));
        }
        v.extend([
            (BATCH_SIZE, self.batch_size.to_string()),
            (LEARNING_RATE, self.learning_rate.to_string()),
            (WARMUP_STEPS, self.warmup_steps.to_string()),
        ]);
        if let Some(w) = &self.schedule {
            v.extend([
                (SCHEDULE_START_STEP, w.start_step.to_string()),
                (SCHEDULE_TOTAL_STEPS, w.total_steps.to_string()),
            ]);
        }
        v.extend([
            (PRECISION, self.precision.clone()),
            (SEED, self.seed.to_string()),
            (GPUS, self.gpus.to_string()),
            (IMAGE_SIZE, self.image_size.to_string()),
            (PATCH_SIZE, self.patch_size.to_string()),
            (MASK_RATIO, self.mask_ratio.to_string()),
            (OBJECTIVE, self.objective.to_env()),
            (WEIGHT_DECAY, self.weight_decay.to_string()),
            (GRAD_CLIP_NORM, self.grad_clip_norm.to_string()),
            (GRAD_ACCUMULATION, self.grad_accumulation.to_string()),
        ]);
        if let Some(e) = &self.export_uri {
            v.push((EXPORT_URI, e.clone()));
        }
        v.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    }

    /// Parses and validates the contract; the error names the variable.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let req = |name: &str| -> Result<String> {
            match get(name) {
                Some(v) if !v.trim().is_empty() => Ok(v.trim().to_string()),
                _ => Err(Error::Env {
                    name: name.into(),
                    reason: "is required but not set".into(),
                }),
            }
        };
        let opt = |name: &str| get(name).filter(|v| !v.trim().is_empty());
        let c = EnvContract {
            job_name: req(JOB_NAME)?,
            job_namespace: opt(JOB_NAMESPACE).unwrap_or_else(|| "default".into()),
            job_uid: opt(JOB_UID).unwrap_or_default(),
            attempt: parse(ATTEMPT, req(ATTEMPT)?)?,
            node_rank: parse(NODE_RANK, req(NODE_RANK)?)?,
            nnodes: parse(NNODES, req(NNODES)?)?,
            nproc_per_node: parse(NPROC_PER_NODE, req(NPROC_PER_NODE)?)?,
            master_addr: req(MASTER_ADDR)?,
            master_port: parse(
                MASTER_PORT,
                opt(MASTER_PORT).unwrap_or_else(|| DEFAULT_MASTER_PORT.to_string()),
            )?,
            dataset_uri: req(DATASET_URI)?,
            dataset_shards: opt(DATASET_SHARDS)
                .map(|t| {
                    crate::trainingjob::parse_shards(&t).map_err(|reason| Error::Env {
                        name: DATASET_SHARDS.into(),
                        reason,
                    })
                })
                .transpose()?,
            checkpoint_uri: req(CHECKPOINT_URI)?,
            checkpoint_every: parse(CHECKPOINT_EVERY, req(CHECKPOINT_EVERY)?)?,
            checkpoint_keep: parse(CHECKPOINT_KEEP, req(CHECKPOINT_KEEP)?)?,
            model_arch: req(MODEL_ARCH)?,
            init_from: opt(INIT_FROM),
            steps: opt(STEPS).map(|v| parse(STEPS, v)).transpose()?,
            epochs: opt(EPOCHS).map(|v| parse(EPOCHS, v)).transpose()?,
            batch_size: parse(BATCH_SIZE, req(BATCH_SIZE)?)?,
            learning_rate: parse(LEARNING_RATE, req(LEARNING_RATE)?)?,
            warmup_steps: parse(
                WARMUP_STEPS,
                opt(WARMUP_STEPS).unwrap_or_else(|| "0".into()),
            )?,
            schedule: schedule_window(opt(SCHEDULE_START_STEP), opt(SCHEDULE_TOTAL_STEPS))?,
            precision: req(PRECISION)?,
            seed: parse(SEED, opt(SEED).unwrap_or_else(|| "0".into()))?,
            gpus: parse(GPUS, opt(GPUS).unwrap_or_else(|| "0".into()))?,
            image_size: parse(IMAGE_SIZE, opt(IMAGE_SIZE).unwrap_or_else(|| "224".into()))?,
            patch_size: parse(PATCH_SIZE, opt(PATCH_SIZE).unwrap_or_else(|| "16".into()))?,
            mask_ratio: parse(MASK_RATIO, opt(MASK_RATIO).unwrap_or_else(|| "0.75".into()))?,
            objective: opt(OBJECTIVE)
                .map(|t| {
                    crate::trainingjob::Objective::from_env(&t).map_err(|reason| Error::Env {
                        name: OBJECTIVE.into(),
                        reason,
                    })
                })
                .transpose()?
                .unwrap_or_default(),
            weight_decay: parse(
                WEIGHT_DECAY,
                opt(WEIGHT_DECAY).unwrap_or_else(|| "0.05".into()),
            )?,
            grad_clip_norm: parse(
                GRAD_CLIP_NORM,
                opt(GRAD_CLIP_NORM).unwrap_or_else(|| "1.0".into()),
            )?,
            grad_accumulation: parse(
                GRAD_ACCUMULATION,
                opt(GRAD_ACCUMULATION).unwrap_or_else(|| "1".into()),
            )?,
            export_uri: opt(EXPORT_URI),
        };
        check(&c, get(WORLD_SIZE))?;
        Ok(c)
    }
}

fn parse<T: std::str::FromStr>(name: &str, v: String) -> Result<T> {
    v.parse().map_err(|_| Error::Env {
        name: name.into(),
        reason: format!("{v:?} is not a valid number"),
    })
}

/// The schedule window from its two variables: both or neither, the start below the total.
fn schedule_window(start: Option<String>, total: Option<String>) -> Result<Option<ScheduleWindow>> {
    let (start, total) = match (start, total) {
        (None, None) => return Ok(None),
        (Some(s), Some(t)) => (
            parse::<i64>(SCHEDULE_START_STEP, s)?,
            parse::<i64>(SCHEDULE_TOTAL_STEPS, t)?,
        ),
        (Some(_), None) | (None, Some(_)) => {
            return Err(Error::Env {
                name: SCHEDULE_TOTAL_STEPS.into(),
                reason: format!("{SCHEDULE_START_STEP} and {SCHEDULE_TOTAL_STEPS} go together"),
            });
        }
    };
    at_least(SCHEDULE_START_STEP, start, 0)?;
    at_least(SCHEDULE_TOTAL_STEPS, total, start + 1)?;
    Ok(Some(ScheduleWindow {
        start_step: start,
        total_steps: total,
    }))
}

fn at_least(name: &str, v: i64, min: i64) -> Result<()> {
    if v < min {
        return Err(Error::Env {
            name: name.into(),
            reason: format!("{v} must be >= {min}"),
        });
    }
    Ok(())
}

/// The contract's ranges and cross-field rules; `world_size`: RADFM_WORLD_SIZE where set, which
/// must agree with the node and process counts.
fn check(c: &EnvContract, world_size: Option<String>) -> Result<()> {
    at_least(ATTEMPT, c.attempt.into(), 1)?;
    at_least(NNODES, c.nnodes.into(), 1)?;
    at_least(NPROC_PER_NODE, c.nproc_per_node.into(), 1)?;
    at_least(NODE_RANK, c.node_rank.into(), 0)?;
    if c.node_rank >= c.nnodes {
        return Err(Error::Env {
            name: NODE_RANK.into(),
            reason: format!("{} must be < {NNODES}={}", c.node_rank, c.nnodes),
        });
    }
    if let Some(w) = world_size.filter(|w| !w.is_empty())
        && w != c.world_size().to_string()
    {
        return Err(Error::Env {
            name: WORLD_SIZE.into(),
            reason: format!("{w} != {NNODES} x {NPROC_PER_NODE} = {}", c.world_size()),
        });
    }
    if c.steps.is_some() == c.epochs.is_some() {
        return Err(Error::Env {
            name: STEPS.into(),
            reason: format!("exactly one of {STEPS} and {EPOCHS} must be set"),
        });
    }
    at_least(BATCH_SIZE, c.batch_size.into(), 1)?;
    at_least(CHECKPOINT_EVERY, c.checkpoint_every, 1)?;
    at_least(CHECKPOINT_KEEP, c.checkpoint_keep.into(), 1)?;
    if !(c.learning_rate > 0.0 && c.learning_rate < 1.0) {
        return Err(Error::Env {
            name: LEARNING_RATE.into(),
            reason: format!("{} must be in (0, 1)", c.learning_rate),
        });
    }
    if !["fp32", "bf16"].contains(&c.precision.as_str()) {
        return Err(Error::Env {
            name: PRECISION.into(),
            reason: format!("{:?} must be fp32 or bf16", c.precision),
        });
    }
    at_least(PATCH_SIZE, c.patch_size.into(), 1)?;
    at_least(IMAGE_SIZE, c.image_size.into(), c.patch_size.into())?;
    if c.image_size % c.patch_size != 0 {
        return Err(Error::Env {
            name: IMAGE_SIZE.into(),
            reason: format!(
                "{} is not a multiple of {PATCH_SIZE}={}",
                c.image_size, c.patch_size
            ),
        });
    }
    at_least(GRAD_ACCUMULATION, c.grad_accumulation.into(), 1)?;
    for (name, v, lo, hi) in [
        (MASK_RATIO, c.mask_ratio, 0.0, 1.0),
        (WEIGHT_DECAY, c.weight_decay, -1e-300, 1.0),
        (GRAD_CLIP_NORM, c.grad_clip_norm, -1e-300, f64::INFINITY),
    ] {
        if !(v > lo && v < hi) {
            return Err(Error::Env {
                name: name.into(),
                reason: format!("{v} is out of range"),
            });
        }
    }
    if !["vit-tiny", "vit-small", "vit-base"].contains(&c.model_arch.as_str()) {
        return Err(Error::Env {
            name: MODEL_ARCH.into(),
            reason: format!("{:?} is not a known preset", c.model_arch),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    pub(crate) fn job() -> TrainingJob {
        TrainingJob::from_yaml(
            r#"
apiVersion: radfm.io/v1alpha1
kind: TrainingJob
metadata: {name: mae, namespace: ml, uid: u-1}
spec:
  image: radfm/trainer:dev
  workers: {replicas: 2, gpusPerWorker: 4}
  dataset: {uri: "s3://bucket/cohort"}
  checkpoint: {uri: "s3://bucket/ckpt/mae"}
  training: {steps: 100, learningRate: 0.001}
  export: {uri: "s3://bucket/models/mae"}
"#,
            "test",
        )
        .unwrap()
    }

    #[test]
    fn contract_round_trips_through_the_environment() {
        let c = EnvContract::for_worker(&job(), 1, 3, "mae-w0.mae.ml.svc");
        assert_eq!((c.nproc_per_node, c.world_size(), c.gpus), (4, 8, 4));
        let vars: HashMap<_, _> = c.to_vars().into_iter().collect();
        assert_eq!(vars[WORLD_SIZE], "8");
        assert_eq!(vars[ATTEMPT], "3");
        assert_eq!(vars[EXPORT_URI], "s3://bucket/models/mae");
        assert!(!vars.contains_key(DATASET_SHARDS));
        let mut windowed = job();
        windowed.spec.dataset.shards = Some("7,0-2,3".into());
        let c = EnvContract::for_worker(&windowed, 0, 1, "h");
        assert_eq!(c.dataset_shards, Some(vec![0, 1, 2, 3, 7]));
        let vars: HashMap<_, _> = c.to_vars().into_iter().collect();
        assert_eq!(vars[DATASET_SHARDS], "0-3,7");
        assert_eq!(
            EnvContract::from_lookup(|k| vars.get(k).cloned()).unwrap(),
            c
        );
        let back = EnvContract::from_lookup(|k| vars.get(k).cloned()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn a_schedule_window_travels_as_two_variables_that_go_together() {
        let mut round = job();
        round.spec.training.schedule = Some(ScheduleWindow::of_round(3, 5, 40));
        let c = EnvContract::for_worker(&round, 0, 1, "h");
        let vars: HashMap<_, _> = c.to_vars().into_iter().collect();
        assert_eq!(
            (
                &vars[SCHEDULE_START_STEP][..],
                &vars[SCHEDULE_TOTAL_STEPS][..]
            ),
            ("80", "200")
        );
        assert_eq!(
            EnvContract::from_lookup(|k| vars.get(k).cloned()).unwrap(),
            c
        );
        let plain: HashMap<_, _> = EnvContract::for_worker(&job(), 0, 1, "h")
            .to_vars()
            .into_iter()
            .collect();
        assert!(!plain.contains_key(SCHEDULE_START_STEP));
        let cases = [
            (Some("5"), None, "go together"),
            (None, Some("5"), "go together"),
            (
                Some("5"),
                Some("5"),
                "RADFM_SCHEDULE_TOTAL_STEPS: 5 must be >= 6",
            ),
            (
                Some("-1"),
                Some("5"),
                "RADFM_SCHEDULE_START_STEP: -1 must be >= 0",
            ),
        ];
        for (start, total, want) in cases {
            let mut vars = plain.clone();
            for (name, value) in [(SCHEDULE_START_STEP, start), (SCHEDULE_TOTAL_STEPS, total)] {
                if let Some(v) = value {
                    vars.insert(name.to_string(), v.to_string());
                }
            }
            let err = EnvContract::from_lookup(|k| vars.get(k).cloned())
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{start:?} {total:?}: {err}");
        }
    }

    #[test]
    fn every_emitted_variable_is_documented_in_order() {
        let c = EnvContract::for_worker(&job(), 0, 1, "h");
        let names: Vec<_> = VARS.iter().map(|v| v.0).collect();
        let emitted: Vec<_> = c.to_vars().into_iter().map(|v| v.0).collect();
        let mut positions = emitted
            .iter()
            .map(|e| names.iter().position(|n| n == e).expect(e));
        let mut last = positions.next().unwrap();
        for p in positions {
            assert!(p > last, "order");
            last = p;
        }
    }

    #[test]
    fn invalid_contract_errors_name_the_variable() {
        let base: HashMap<_, _> = EnvContract::for_worker(&job(), 0, 1, "h")
            .to_vars()
            .into_iter()
            .collect();
        let cases = [
            (
                NODE_RANK,
                Some("2"),
                "RADFM_NODE_RANK: 2 must be < RADFM_NNODES=2",
            ),
            (
                ATTEMPT,
                Some("x"),
                "RADFM_ATTEMPT: \"x\" is not a valid number",
            ),
            (
                MASTER_ADDR,
                None,
                "RADFM_MASTER_ADDR: is required but not set",
            ),
            (
                PRECISION,
                Some("fp8"),
                "RADFM_PRECISION: \"fp8\" must be fp32 or bf16",
            ),
            (
                WORLD_SIZE,
                Some("3"),
                "RADFM_WORLD_SIZE: 3 != RADFM_NNODES x RADFM_NPROC_PER_NODE = 8",
            ),
            (
                EPOCHS,
                Some("2"),
                "exactly one of RADFM_STEPS and RADFM_EPOCHS",
            ),
            (
                DATASET_SHARDS,
                Some("0-3,x"),
                "RADFM_DATASET_SHARDS: \"x\" is not a shard number",
            ),
        ];
        for (name, value, want) in cases {
            let mut vars = base.clone();
            match value {
                Some(v) => vars.insert(name.to_string(), v.to_string()),
                None => vars.remove(name),
            };
            let err = EnvContract::from_lookup(|k| vars.get(k).cloned())
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{name}: {err}");
        }
    }
}

#[cfg(test)]
mod doc_tests {
    #[test]
    fn docs_env_contract_lists_every_variable() {
        let doc = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../docs/env-contract.md"
        ))
        .unwrap();
        for (name, _) in super::VARS {
            assert!(
                doc.contains(&format!("| `{name}` |")),
                "docs/env-contract.md lacks {name}"
            );
        }
    }
}
