//! The training loop: resume or initialise, stream batches, MAE steps, progress, checkpoints.
//!
//! The loop runs on the calling thread (libtorch work is synchronous); data loading, object-store
//! writes, the metrics endpoint and pod annotations run on a small tokio runtime owned by the run.
//! Every random draw derives from the seed and counters saved in the checkpoint, so a run
//! resumed at step k continues exactly as the uninterrupted run would have.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use radfm_data::loader::{Batch, Cursor, Loader, LoaderConfig};
use radfm_data::store::Location;
use tch::Tensor;
use tch::nn::VarStore;

use crate::checkpoint::{self, DataRef, TrainState};
use crate::config::{Fault, Precision, TrainConfig};
use crate::model::Mae;
use crate::optim::{AdamW, AdamWConfig, lr_at};
use crate::progress::{Metrics, PodAnnotator, Record};
use crate::{Error, Result, tensors};

/// How the RNG state is described in checkpoints.
pub const RNG_SCHEME: &str = "libtorch generator reseeded per micro-batch with mask_seed(seed, step, micro, rank); data order and augmentation from (seed, epoch, position)";

/// The seed of the masking noise of one micro-batch.
pub fn mask_seed(seed: i64, step: i64, micro: usize, rank: usize) -> i64 {
    let mut x = (seed as u64) ^ 0x9E37_79B9_7F4A_7C15;
    for v in [step as u64, micro as u64, rank as u64] {
        x = (x ^ v).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x ^= x >> 31;
    }
    (x >> 1) as i64
}

/// Controls from outside the loop.
#[derive(Debug, Clone, Default)]
pub struct Hooks {
    /// Set (by SIGTERM) to checkpoint and stop with [`Error::Terminated`].
    pub stop: Arc<AtomicBool>,
    /// Stop after this step without a final checkpoint, as a crash would (tests).
    pub halt_after: Option<i64>,
    /// Print no JSON lines.
    pub quiet: bool,
}

/// What a run did.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Steps completed (including those of earlier attempts).
    pub steps: i64,
    /// Total steps of the run.
    pub total_steps: i64,
    /// The step resumed from, if any.
    pub resumed_from: Option<i64>,
    /// Mean loss of each logged window: (step, loss).
    pub losses: Vec<(i64, f64)>,
    /// Images per second of this process over the run.
    pub images_per_s: f64,
    /// URI of the last committed checkpoint manifest written by this run.
    pub checkpoint: Option<String>,
}

/// Runs training to the end (or to a stop) and returns what happened.
pub fn run(cfg: &TrainConfig, hooks: &Hooks) -> Result<Summary> {
    if let Some(n) = cfg.threads {
        tch::set_num_threads(n);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::Io {
            path: "tokio runtime".into(),
            source: e,
        })?;
    let device = cfg.device();
    let ckpt = Location::open(&cfg.checkpoint_uri)?;
    let loader_cfg = LoaderConfig {
        seed: cfg.seed as u64,
        rank: cfg.rank,
        world: cfg.world,
        batch_size: cfg.batch_size,
        image_size: cfg.model.image_size as usize,
        augment: cfg.augment,
        max_bad_samples: cfg.max_bad_samples,
        shards: cfg.dataset_shards.clone(),
        ..Default::default()
    };
    let mut loader = rt.block_on(Loader::open(&cfg.dataset_uri, loader_cfg))?;
    let shards = loader.shards();
    let data = DataRef {
        uri: cfg.dataset_uri.clone(),
        first_seq: shards.first().map_or(0, |s| s.seq),
        last_seq: shards.last().map_or(0, |s| s.seq),
        shards: shards.len(),
        selection: cfg
            .dataset_shards
            .as_deref()
            .map(radfm_api::trainingjob::format_shards),
        samples: shards.iter().map(|s| s.samples).sum(),
        mean: loader.stats().mean,
        std: loader.stats().std,
    };

    tch::manual_seed(cfg.seed);
    let mut vs = VarStore::new(device);
    let mut mae = Mae::new(&vs.root(), cfg.model);
    mae.norm_pix = cfg.norm_pix_loss;
    let mut opt = AdamW::new(
        &vs,
        AdamWConfig {
            weight_decay: cfg.weight_decay,
            ..Default::default()
        },
    );

    let mut step = 0i64;
    let mut cursor = Cursor::default();
    let mut streak = 0u32;
    let latest = rt.block_on(checkpoint::load_latest(&ckpt, |e| {
        eprintln!("radfm-trainer: skipping checkpoint: {e}")
    }))?;
    let resumed_from = latest.as_ref().map(|l| l.manifest.step);
    let mut history: Vec<(i64, f64)> = latest
        .as_ref()
        .map(|l| l.manifest.state.loss_history.clone())
        .unwrap_or_default();
    match &latest {
        Some(l) => {
            restore(&mut vs, &mut opt, cfg, l)?;
            let s = &l.manifest.state;
            (step, cursor, streak) = (s.step, s.cursor, s.nonfinite_streak);
        }
        None => {
            if let Some(init) = &cfg.init_from {
                rt.block_on(crate::export::load_init(&vs, init))?;
            }
        }
    }

    let mut gang = if cfg.world > 1 {
        let g = crate::collective::Gang::join(
            &cfg.master_addr,
            cfg.master_port,
            cfg.rank,
            cfg.world,
            cfg.attempt,
            cfg.collective_timeout,
            cfg.collective,
            device,
        )?;
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let mut g = g;
        let tensors: Vec<Tensor> = vars.into_iter().map(|(_, t)| t).collect();
        crate::collective::broadcast_tensors(g.coll.as_mut(), &tensors)?;
        Some(g)
    } else {
        None
    };

    let per_epoch = loader.batches_per_epoch();
    let total = match (cfg.steps, cfg.epochs) {
        (Some(s), _) => s,
        (None, Some(e)) => (e * per_epoch as i64 / cfg.grad_accumulation as i64).max(1),
        (None, None) => unreachable!("the env contract requires steps or epochs"),
    };
    if cursor.position >= per_epoch * cfg.batch_size as u64 {
        cursor = Cursor {
            epoch: cursor.epoch + 1,
            position: 0,
        };
    }

    let metrics = Metrics::default();
    let retries = loader.fetch_retries.clone();
    if let (Some(addr), 0) = (cfg.metrics_addr, cfg.rank) {
        let bound = rt.block_on(metrics.serve(addr)).map_err(|e| Error::Io {
            path: format!("metrics endpoint {addr}"),
            source: e,
        })?;
        eprintln!("radfm-trainer: metrics on http://{bound}/metrics");
    }
    let mut annotator = match (&cfg.pod_name, cfg.rank) {
        (Some(pod), 0) => match rt.block_on(PodAnnotator::connect(&cfg.namespace, pod)) {
            Ok(a) => Some(a),
            Err(e) => {
                eprintln!("radfm-trainer: progress annotations off: {e}");
                None
            }
        },
        _ => None,
    };

    if cfg.rank == 0 && !hooks.quiet {
        use std::io::Write;
        let start = serde_json::json!({
            "event": "start", "job": cfg.job, "attempt": cfg.attempt, "world": cfg.world,
            "total_steps": total, "resumed_from": resumed_from, "cursor": cursor,
            "device": format!("{device:?}"),
        });
        let _ = writeln!(std::io::stdout(), "{start}");
    }
    let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Batch>>(2);
    let start = cursor;
    rt.spawn(async move {
        let mut cursor = start;
        loop {
            let mut open = true;
            let r = loader
                .run_epoch(cursor, |b| {
                    open = tokio::task::block_in_place(|| tx.send(Ok(b)).is_ok());
                    open
                })
                .await;
            if let Err(e) = r {
                let _ = tx.send(Err(e.into()));
                return;
            }
            if !open {
                return;
            }
            cursor = Cursor {
                epoch: cursor.epoch + 1,
                position: 0,
            };
        }
    });

    let side = cfg.model.image_size;
    let autocast = cfg.precision == Precision::Bf16 && device.is_cuda();
    let run_start = Instant::now();
    let first_step = step;
    let mut images_total = 0u64;
    let (mut win_loss, mut win_n, mut win_images, mut win_t) = (0.0, 0u32, 0u64, Instant::now());
    let mut losses = Vec::new();
    let mut last_loss = None;
    let mut last_ckpt = None;
    let (mut lr, mut grad_norm) = (0.0, 0.0);

    let save = |vs: &VarStore,
                opt: &AdamW,
                step: i64,
                cursor: Cursor,
                streak: u32,
                loss: Option<f64>,
                history: &[(i64, f64)]|
     -> Result<String> {
        let state = TrainState {
            step,
            total_steps: total,
            cursor,
            adam_steps: opt.steps,
            nonfinite_streak: streak,
            rng: RNG_SCHEME.into(),
            loss,
            loss_history: history.to_vec(),
            data: data.clone(),
            config: serde_json::to_value(cfg).expect("config serialises"),
            code_version: env!("CARGO_PKG_VERSION").into(),
        };
        let files = state_files(vs, opt)?;
        rt.block_on(async {
            let uri = checkpoint::save(&ckpt, state, files).await?;
            checkpoint::prune(&ckpt, cfg.checkpoint_keep).await?;
            Ok(uri)
        })
    };

    while step < total {
        let mut stop = hooks.stop.load(Ordering::SeqCst);
        if let Some(g) = gang.as_mut() {
            // Every rank stops at the same step, whichever rank got the signal.
            let mut flag = [stop as u8 as f32];
            g.coll.all_reduce_host(&mut flag)?;
            stop = flag[0] > 0.0;
        }
        if stop {
            if cfg.rank == 0 && resumed_from != Some(step) && last_ckpt_step(&last_ckpt) != step {
                let uri = save(&vs, &opt, step, cursor, streak, last_loss, &history)?;
                announce(&rt, &mut annotator, &uri, step);
            }
            return Err(Error::Terminated { step });
        }
        let mut loss_sum = 0.0;
        let mut finite = true;
        for micro in 0..cfg.grad_accumulation {
            let batch = match rx.recv() {
                Ok(b) => b?,
                Err(_) => {
                    return Err(Error::Checkpoint {
                        uri: cfg.dataset_uri.clone(),
                        reason: "the data loader stopped".into(),
                    });
                }
            };
            let b = batch.keys.len() as i64;
            let images = Tensor::from_slice(&batch.images)
                .view([b, 1, side, side])
                .to_device(device);
            tch::manual_seed(mask_seed(cfg.seed, step, micro, cfg.rank));
            let loss = tch::autocast(autocast, || mae.loss(&images, cfg.mask_ratio));
            let mut value = loss.double_value(&[]);
            if matches!(cfg.fault, Some(Fault::NanLossFrom(k)) if step >= k) {
                value = f64::NAN;
            }
            if value.is_finite() && finite {
                (loss / cfg.grad_accumulation as f64).backward();
                loss_sum += value;
            } else {
                finite = false;
            }
            cursor = batch.cursor;
            images_total += b as u64;
            win_images += b as u64;
        }
        if let Some(g) = gang.as_mut() {
            // One rank's NaN skips the step everywhere; the logged loss is the gang's mean.
            let mut flags = [(!finite) as u8 as f32, loss_sum as f32];
            g.coll.all_reduce_host(&mut flags)?;
            finite = flags[0] == 0.0;
            loss_sum = flags[1] as f64 / cfg.world as f64;
            if finite {
                crate::collective::all_reduce_grads(g.coll.as_mut(), &opt.params)?;
            }
        }
        if finite {
            streak = 0;
            grad_norm = opt.clip_grad_norm(cfg.grad_clip_norm);
            lr = lr_at(step, total, cfg.warmup_steps, cfg.learning_rate);
            opt.step(lr);
            win_loss += loss_sum / cfg.grad_accumulation as f64;
            win_n += 1;
        } else {
            streak += 1;
            metrics.nonfinite_steps.inc();
            eprintln!(
                "radfm-trainer: non-finite loss at step {step} ({streak} in a row), update skipped"
            );
            if streak >= cfg.max_nonfinite {
                return Err(Error::NonFinite {
                    step,
                    count: streak,
                });
            }
        }
        opt.zero_grad();
        step += 1;
        metrics.step.set(step);

        if step % cfg.log_every == 0 || step == total {
            let dt = win_t.elapsed().as_secs_f64().max(1e-9);
            let ips = win_images as f64 / dt;
            let loss = if win_n > 0 {
                win_loss / win_n as f64
            } else {
                f64::NAN
            };
            let done = (step - first_step).max(1) as f64;
            let record = Record {
                event: "step",
                step,
                total_steps: total,
                epoch: cursor.epoch,
                loss,
                lr,
                grad_norm,
                images_per_s: ips,
                eta_s: run_start.elapsed().as_secs_f64() / done * (total - step) as f64,
                rank: cfg.rank,
            };
            if loss.is_finite() {
                losses.push((step, loss));
                checkpoint::record_loss(&mut history, step, loss);
                last_loss = Some(loss);
                metrics.loss.set(loss);
            }
            metrics.lr.set(lr);
            metrics.images_per_second.set(ips);
            metrics
                .fetch_retries
                .set(retries.load(Ordering::Relaxed) as i64);
            if cfg.rank == 0 && !hooks.quiet {
                // A closed stdout (a log collector gone) must not stop training.
                use std::io::Write;
                let line = serde_json::to_string(&record).expect("records serialise");
                let _ = writeln!(std::io::stdout(), "{line}");
            }
            if let Some(a) = annotator.as_mut()
                && let Err(e) = rt.block_on(a.progress(&record, step == total))
            {
                eprintln!("radfm-trainer: progress annotation failed: {e}");
            }
            (win_loss, win_n, win_images, win_t) = (0.0, 0, 0, Instant::now());
        }
        if hooks.halt_after == Some(step) {
            break;
        }
        if cfg.rank == 0 && (step % cfg.checkpoint_every == 0 || step == total) {
            let uri = save(&vs, &opt, step, cursor, streak, last_loss, &history)?;
            metrics.checkpoints.inc();
            announce(&rt, &mut annotator, &uri, step);
            last_ckpt = Some((uri, step));
        }
    }
    drop(rx);
    Ok(Summary {
        steps: step,
        total_steps: total,
        resumed_from,
        losses,
        images_per_s: images_total as f64 / run_start.elapsed().as_secs_f64().max(1e-9),
        checkpoint: last_ckpt.map(|(uri, _)| uri),
    })
}

fn last_ckpt_step(last: &Option<(String, i64)>) -> i64 {
    last.as_ref().map_or(-1, |(_, s)| *s)
}

fn announce(rt: &tokio::runtime::Runtime, a: &mut Option<PodAnnotator>, uri: &str, step: i64) {
    if let Some(a) = a.as_mut()
        && let Err(e) = rt.block_on(a.checkpoint(uri, step))
    {
        eprintln!("radfm-trainer: checkpoint annotation failed: {e}");
    }
}

/// The checkpoint files of a model and its optimizer.
pub fn state_files(vs: &VarStore, opt: &AdamW) -> Result<Vec<(&'static str, Vec<u8>)>> {
    let mut model: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    model.sort_by(|a, b| a.0.cmp(&b.0));
    let mut moments = Vec::with_capacity(opt.params.len() * 2);
    for p in &opt.params {
        moments.push((format!("m.{}", p.name), p.m.shallow_clone()));
        moments.push((format!("v.{}", p.name), p.v.shallow_clone()));
    }
    Ok(vec![
        (
            "model.safetensors",
            tensors::to_bytes(&model, None, "model")?,
        ),
        (
            "optimizer.safetensors",
            tensors::to_bytes(&moments, None, "optimizer")?,
        ),
    ])
}

fn restore(
    vs: &mut VarStore,
    opt: &mut AdamW,
    cfg: &TrainConfig,
    l: &checkpoint::Loaded,
) -> Result<()> {
    let saved: Option<crate::model::VitConfig> = l
        .manifest
        .state
        .config
        .get("model")
        .and_then(|m| serde_json::from_value(m.clone()).ok());
    if saved.is_some_and(|m| m != cfg.model) {
        return Err(Error::Field {
            field: "model".into(),
            reason: format!(
                "{} was written with model {:?}, this run has {:?}; use a new checkpoint.uri",
                l.uri, saved, cfg.model
            ),
        });
    }
    let model = tensors::from_bytes(l.object("model.safetensors")?, &l.uri)?;
    tensors::load_into(vs, &model, "", &l.uri)?;
    let moments = tensors::from_bytes(l.object("optimizer.safetensors")?, &l.uri)?;
    for p in &mut opt.params {
        for (prefix, target) in [("m.", &mut p.m), ("v.", &mut p.v)] {
            let name = format!("{prefix}{}", p.name);
            let t = moments
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, t)| t)
                .ok_or_else(|| Error::Checkpoint {
                    uri: l.uri.clone(),
                    reason: format!("optimizer state lacks {name}"),
                })?;
            tch::no_grad(|| target.copy_(&t.to_device(target.device())));
        }
    }
    opt.steps = l.manifest.state.adam_steps;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_seeds_differ_per_step_micro_and_rank() {
        let a = mask_seed(1, 0, 0, 0);
        assert_ne!(a, mask_seed(1, 1, 0, 0));
        assert_ne!(a, mask_seed(1, 0, 1, 0));
        assert_ne!(a, mask_seed(1, 0, 0, 1));
        assert_ne!(a, mask_seed(2, 0, 0, 0));
        assert_eq!(a, mask_seed(1, 0, 0, 0));
        assert!(a >= 0);
    }
}
