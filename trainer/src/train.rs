//! The training loop: resume or initialise, stream batches, MAE steps, progress, checkpoints.
//!
//! Shaped like burn-train: [`run`] sets up and then only loops; one step is
//! [`Model::accumulate`] (the micro-batches), [`agree`] (the gang's all-reduce) and
//! [`Model::update`]; [`Checkpoints`] decides when to save (a pure strategy) and saves; the
//! [`Reporter`] owns every output (JSON lines, Prometheus metrics, pod annotations).
//!
//! The loop runs on the calling thread (libtorch work is synchronous); data loading, object-store
//! writes, the metrics endpoint and pod annotations run on a small tokio runtime owned by the run.
//! Every random draw derives from the seed and counters saved in the checkpoint, so a run
//! resumed at step k continues exactly as the uninterrupted run would have.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::time::Instant;

use radfm_data::loader::{Batch, Cursor, Loader, LoaderConfig};
use radfm_data::store::Location;
use tch::nn::VarStore;
use tch::{Device, Tensor};
use tokio::runtime::Runtime;

use crate::checkpoint::{self, CommitId, DataRef, TrainState};
use crate::collective::Collective;
use crate::collective::Gang;
use crate::config::{Fault, Precision, TrainConfig};
use crate::contrastive;
use crate::image_text::{self, ImageText};
use crate::model::{Encoder, Mae};
use crate::optim::{AdamW, AdamWConfig};
use crate::progress::{Metrics, PodAnnotator, Record};
use crate::text::ReportTokenizer;
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

/// Where training stands: what a checkpoint restores.
#[derive(Debug, Clone, Default)]
struct Position {
    step: i64,
    cursor: Cursor,
    /// Non-finite steps in a row.
    streak: u32,
    /// Logged (step, loss) of the whole run, earlier attempts included.
    history: Vec<(i64, f64)>,
    last_loss: Option<f64>,
    resumed_from: Option<i64>,
}

/// Runs training to the end (or to a stop) and returns what happened.
pub fn run(cfg: &TrainConfig, hooks: &Hooks) -> Result<Summary> {
    if let Some(n) = cfg.threads {
        tch::set_num_threads(n);
    }
    let rt = runtime()?;
    let device = cfg.device()?;
    let (loader, data) = open_data(cfg, &rt)?;
    let mut model = Model::new(cfg, device);
    let location = Location::open(&cfg.checkpoint_uri)?;
    let (writer, chosen) = begin_checkpoints(cfg, &rt, &location)?;
    let mut gang = join_gang(cfg, device)?;
    let resume = resume_point(gang.as_mut(), chosen)?;
    let mut pos = model.resume(cfg, &rt, &location, resume)?;
    model.agree_on_tokenizer(cfg, &rt, gang.as_mut())?;
    if let Some(g) = gang.as_mut() {
        broadcast_parameters(g, &model.vs)?;
    }
    let per_epoch = loader.batches_per_epoch();
    let total = total_steps(cfg, per_epoch);
    if pos.cursor.position >= per_epoch * cfg.batch_size as u64 {
        pos.cursor = Cursor {
            epoch: pos.cursor.epoch + 1,
            position: 0,
        };
    }
    let mut reporter = Reporter::open(cfg, hooks, &rt, loader.fetch_retries.clone(), total)?;
    reporter.started(&pos, device);
    let batches = spawn_batches(&rt, loader, pos.cursor);
    let mut checkpoints = Checkpoints {
        rt: &rt,
        writer,
        cfg,
        data,
        total,
        last: None,
        pending: None,
    };
    let first_step = pos.step;
    while pos.step < total {
        if gang_stops(hooks, gang.as_mut())? {
            reporter.committed(checkpoints.finish()?);
            if checkpoints.due_at_stop(&pos) {
                checkpoints.start(&model, &pos)?;
                reporter.committed(checkpoints.finish()?);
            }
            return Err(Error::Terminated { step: pos.step });
        }
        let coll = gang.as_mut().map(|g| g.coll.as_mut());
        let mut acc = model.accumulate(cfg, &batches, &mut pos, device, coll)?;
        agree(gang.as_mut(), cfg, &mut model.opt, &mut acc)?;
        let update = model.update(cfg, &acc, &mut pos, total, &reporter.metrics)?;
        reporter.stepped(&acc, update, &mut pos, first_step);
        if hooks.halt_after == Some(pos.step) {
            break;
        }
        if checkpoints.due_after(pos.step) {
            reporter.committed(checkpoints.begin_due(&model, &pos)?);
        }
        reporter.committed(checkpoints.poll()?);
    }
    reporter.committed(checkpoints.finish()?);
    drop(batches);
    Ok(Summary {
        steps: pos.step,
        total_steps: total,
        resumed_from: pos.resumed_from,
        images_per_s: reporter.images_per_s(),
        losses: reporter.losses,
        checkpoint: checkpoints.last.map(|(uri, _)| uri),
    })
}

fn runtime() -> Result<Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::Io {
            path: "tokio runtime".into(),
            source: e,
        })
}

/// The loader of this rank and what checkpoints record of the data.
fn open_data(cfg: &TrainConfig, rt: &Runtime) -> Result<(Loader, DataRef)> {
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
    let loader = rt.block_on(Loader::open(&cfg.dataset_uri, loader_cfg))?;
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
    Ok((loader, data))
}

/// `steps`, or `epochs` worth of optimizer steps.
fn total_steps(cfg: &TrainConfig, per_epoch: u64) -> i64 {
    match (cfg.steps, cfg.epochs) {
        (Some(s), _) => s,
        (None, Some(e)) => (e * per_epoch as i64 / cfg.grad_accumulation as i64).max(1),
        (None, None) => unreachable!("the env contract requires steps or epochs"),
    }
}

/// Rank 0 chooses the checkpoint to resume from and claims the folder's next epoch (see
/// [`checkpoint`]); the other ranks learn the choice from it, never choosing on their own.
fn begin_checkpoints(
    cfg: &TrainConfig,
    rt: &Runtime,
    location: &Location,
) -> Result<(Option<checkpoint::Writer>, Option<checkpoint::Loaded>)> {
    if cfg.rank != 0 {
        return Ok((None, None));
    }
    let who = format!(
        "job {} attempt {} pod {}",
        cfg.job,
        cfg.attempt,
        cfg.pod_name.as_deref().unwrap_or("-")
    );
    let (writer, chosen) = rt.block_on(checkpoint::Writer::begin(location, &who, |e| {
        eprintln!("radfm-trainer: skipping checkpoint: {e}")
    }))?;
    Ok((Some(writer), chosen))
}

/// Values of one resume choice: presence, then the step and the epoch in 16-bit pieces (exact
/// in f32, so a sum with zeros from the other ranks carries them unchanged).
const CHOICE_VALUES: usize = 7;

fn encode_choice(choice: Option<CommitId>) -> [f32; CHOICE_VALUES] {
    let mut v = [0.0; CHOICE_VALUES];
    if let Some(id) = choice {
        v[0] = 1.0;
        for (i, x) in [id.step as u64, id.epoch].into_iter().enumerate() {
            for k in 0..3 {
                v[1 + 3 * i + k] = ((x >> (16 * k)) & 0xFFFF) as f32;
            }
        }
    }
    v
}

fn decode_choice(v: &[f32; CHOICE_VALUES]) -> Option<CommitId> {
    if v[0] != 1.0 {
        return None;
    }
    let part = |i: usize| (0..3).fold(0u64, |x, k| x | ((v[1 + 3 * i + k] as u64) << (16 * k)));
    Some(CommitId {
        step: part(0) as i64,
        epoch: part(1),
    })
}

/// Every rank gets rank 0's resume choice (`mine` counts only on rank 0).
fn agree_on_resume(
    coll: &mut dyn crate::collective::Collective,
    mine: Option<CommitId>,
) -> Result<Option<CommitId>> {
    let mut v = match coll.rank() {
        0 => encode_choice(mine),
        _ => [0.0; CHOICE_VALUES],
    };
    coll.all_reduce_host(&mut v)?;
    Ok(decode_choice(&v))
}

/// Where this rank starts: rank 0's choice (its loaded checkpoint, or fresh), learnt over the
/// gang by the other ranks.
fn resume_point(gang: Option<&mut Gang>, chosen: Option<checkpoint::Loaded>) -> Result<Resume> {
    let Some(g) = gang else {
        return Ok(chosen.map_or(Resume::Fresh, |l| Resume::Loaded(Box::new(l))));
    };
    let id = agree_on_resume(g.coll.as_mut(), chosen.as_ref().map(checkpoint::Loaded::id))?;
    Ok(match (chosen, id) {
        (Some(l), _) => Resume::Loaded(Box::new(l)),
        (None, Some(id)) => Resume::Named(id),
        (None, None) => Resume::Fresh,
    })
}

/// Joins the gang (world > 1).
fn join_gang(cfg: &TrainConfig, device: Device) -> Result<Option<Gang>> {
    if cfg.world <= 1 {
        return Ok(None);
    }
    let secret = gang_secret(cfg)?;
    Ok(Some(Gang::join(
        &cfg.master_addr,
        cfg.master_port,
        cfg.rank,
        cfg.world,
        cfg.attempt,
        crate::collective::Timeouts {
            join: cfg.rendezvous_timeout,
            collective: cfg.collective_timeout,
        },
        cfg.collective,
        device,
        secret,
    )?))
}

/// Every rank continues from rank 0's parameters.
fn broadcast_parameters(g: &mut Gang, vs: &VarStore) -> Result<()> {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let tensors: Vec<Tensor> = vars.into_iter().map(|(_, t)| t).collect();
    crate::collective::broadcast_tensors(g.coll.as_mut(), &tensors)
}

/// The gang's secret from its file; without one, membership is not checked (said once).
fn gang_secret(cfg: &TrainConfig) -> Result<Option<radfm_collective::auth::GangSecret>> {
    let Some(path) = &cfg.gang_secret_file else {
        tracing::warn!(
            "no {}: the rendezvous and the ring do not check gang membership",
            radfm_api::env::GANG_SECRET_FILE
        );
        return Ok(None);
    };
    let field = |reason: String| Error::Field {
        field: radfm_api::env::GANG_SECRET_FILE.into(),
        reason,
    };
    let text =
        std::fs::read_to_string(path).map_err(|e| field(format!("{}: {e}", path.display())))?;
    radfm_collective::auth::GangSecret::from_hex(&text)
        .map(Some)
        .ok_or_else(|| {
            field(format!(
                "{}: not a hex secret of 16 bytes or more",
                path.display()
            ))
        })
}

/// Streams batches from `cursor` on, epoch after epoch, two ahead of the loop.
fn spawn_batches(rt: &Runtime, mut loader: Loader, start: Cursor) -> Receiver<Result<Batch>> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Batch>>(2);
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
    rx
}

/// Whether the gang stops now: every rank stops at the same step, whichever got the signal.
fn gang_stops(hooks: &Hooks, gang: Option<&mut Gang>) -> Result<bool> {
    let stop = hooks.stop.load(Ordering::SeqCst);
    let Some(g) = gang else {
        return Ok(stop);
    };
    let mut flag = [stop as u8 as f32];
    g.coll.all_reduce_host(&mut flag)?;
    Ok(flag[0] > 0.0)
}

/// The micro-batches of one step, summed.
struct Accumulated {
    loss_sum: f64,
    finite: bool,
    images: u64,
}

/// One rank's NaN skips the step everywhere; the logged loss is the gang's mean; gradients are
/// averaged only for a step every rank takes.
fn agree(
    gang: Option<&mut Gang>,
    cfg: &TrainConfig,
    opt: &mut AdamW,
    acc: &mut Accumulated,
) -> Result<()> {
    let Some(g) = gang else {
        return Ok(());
    };
    let mut flags = [(!acc.finite) as u8 as f32, acc.loss_sum as f32];
    g.coll.all_reduce_host(&mut flags)?;
    acc.finite = flags[0] == 0.0;
    acc.loss_sum = flags[1] as f64 / cfg.world as f64;
    if acc.finite {
        crate::collective::all_reduce_grads(g.coll.as_mut(), &mut opt.params)?;
    }
    Ok(())
}

/// The learning rate and gradient norm of a step taken (zero for a skipped step).
#[derive(Debug, Clone, Copy, Default)]
struct Update {
    lr: f64,
    grad_norm: f64,
}

/// How an epoch is cut between ranks: a cursor's position means something only under the
/// partition that wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Partition {
    world: usize,
    batch_size: usize,
}

/// The cursor to resume from when the checkpoint was written under `saved` and this run has
/// `now`. Under the same partition, the saved cursor. Under another (workers, processes or the
/// batch changed while suspended) the position would name other samples, so only an epoch
/// boundary is exact: the start of an epoch, or its end (the next epoch then starts under the
/// new partition). A checkpoint from mid-epoch is refused, saying how to resume.
fn resume_cursor(
    saved: Partition,
    now: Partition,
    cursor: Cursor,
    samples: u64,
) -> std::result::Result<Cursor, String> {
    if saved == now || cursor.position == 0 {
        return Ok(cursor);
    }
    let block = radfm_data::loader::per_rank(samples, saved.world.max(1), saved.batch_size.max(1));
    if cursor.position >= block {
        return Ok(Cursor {
            epoch: cursor.epoch + 1,
            position: 0,
        });
    }
    Err(format!(
        "written mid-epoch (epoch {}, {} of {block} samples per rank) by {} ranks with batch {}; \
         this run has {} ranks with batch {}, under which that position names other samples. \
         Resume with {} ranks and batch {} (and change them at the next epoch), or start from a \
         checkpoint at an epoch boundary",
        cursor.epoch,
        cursor.position,
        saved.world,
        saved.batch_size,
        now.world,
        now.batch_size,
        saved.world,
        saved.batch_size
    ))
}

/// Where a run starts.
enum Resume {
    /// From `init_from`, or from scratch.
    Fresh,
    /// From a checkpoint this rank loaded (rank 0).
    Loaded(Box<checkpoint::Loaded>),
    /// From the checkpoint rank 0 chose.
    Named(CommitId),
}

/// The image model the objectives train: the MAE (encoder and decoder), or the encoder alone
/// when MAE is not among the objectives.
enum ImageModel {
    Mae(Box<Mae>),
    Encoder(Box<Encoder>),
}

impl ImageModel {
    fn encoder(&self) -> &Encoder {
        match self {
            ImageModel::Mae(m) => &m.encoder,
            ImageModel::Encoder(e) => e,
        }
    }
}

/// The objectives' models, their variables, the report tokenizer and the optimizer.
struct Model {
    vs: VarStore,
    image: ImageModel,
    image_text: Option<ImageText>,
    /// The report tokenizer (contrastive objective), once agreed on.
    tokenizer: Option<ReportTokenizer>,
    opt: AdamW,
}

impl Model {
    fn new(cfg: &TrainConfig, device: Device) -> Model {
        tch::manual_seed(cfg.seed);
        let vs = VarStore::new(device);
        let image = if cfg.objective.mae.is_some() {
            let mut mae = Mae::new(&vs.root(), cfg.model);
            mae.norm_pix = cfg.norm_pix_loss;
            ImageModel::Mae(Box::new(mae))
        } else {
            ImageModel::Encoder(Box::new(Encoder::new(vs.root() / "encoder", cfg.model)))
        };
        let image_text = cfg
            .objective
            .contrastive
            .map(|_| ImageText::new(&vs.root(), &cfg.model));
        let opt = AdamW::new(
            &vs,
            AdamWConfig {
                weight_decay: cfg.weight_decay,
                ..Default::default()
            },
        );
        Model {
            vs,
            image,
            image_text,
            tokenizer: None,
            opt,
        }
    }

    /// The tokenizer every rank uses: the one resumed or initialised from, else one rank 0
    /// trains on the dataset's reports; rank 0's is sent to the others.
    fn agree_on_tokenizer(
        &mut self,
        cfg: &TrainConfig,
        rt: &Runtime,
        gang: Option<&mut Gang>,
    ) -> Result<()> {
        if self.image_text.is_none() {
            return Ok(());
        }
        if self.tokenizer.is_none() && cfg.rank == 0 {
            let shards = cfg.dataset_shards.as_deref();
            let side = cfg.model.image_size as usize;
            let trained =
                rt.block_on(image_text::train_tokenizer(&cfg.dataset_uri, shards, side))?;
            self.tokenizer = Some(trained);
        }
        if let Some(g) = gang {
            let mine = if cfg.rank == 0 {
                self.tokenizer.take()
            } else {
                None
            };
            self.tokenizer = Some(image_text::share_tokenizer(g.coll.as_mut(), mine)?);
        }
        Ok(())
    }

    /// Restores the chosen checkpoint, or initialises from `init_from`.
    fn resume(
        &mut self,
        cfg: &TrainConfig,
        rt: &Runtime,
        location: &Location,
        resume: Resume,
    ) -> Result<Position> {
        let l = match resume {
            Resume::Loaded(l) => *l,
            Resume::Named(id) => rt.block_on(checkpoint::load(location, id))?,
            Resume::Fresh => {
                if let Some(init) = &cfg.init_from {
                    rt.block_on(crate::export::load_init(&self.vs, init))?;
                    if self.image_text.is_some() {
                        self.tokenizer = rt.block_on(crate::export::init_tokenizer(init))?;
                    }
                }
                return Ok(Position::default());
            }
        };
        restore(&mut self.vs, &mut self.opt, cfg, &l)?;
        if self.image_text.is_some() {
            let file = l.object(image_text::TOKENIZER_FILE)?;
            self.tokenizer = Some(image_text::tokenizer_from(file, &l.uri)?);
        }
        let s = &l.manifest.state;
        let partition = |c: &serde_json::Value| Partition {
            world: c.get("world").and_then(|v| v.as_u64()).unwrap_or(1) as usize,
            batch_size: c.get("batch_size").and_then(|v| v.as_u64()).unwrap_or(0) as usize,
        };
        let cursor = resume_cursor(
            partition(&s.config),
            Partition {
                world: cfg.world,
                batch_size: cfg.batch_size,
            },
            s.cursor,
            s.data.samples,
        )
        .map_err(|reason| Error::Field {
            field: "workers".into(),
            reason: format!("{}: {reason}", l.uri),
        })?;
        Ok(Position {
            step: s.step,
            cursor,
            streak: s.nonfinite_streak,
            history: s.loss_history.clone(),
            last_loss: None,
            resumed_from: Some(l.manifest.step),
        })
    }

    /// Forward and backward over the step's micro-batches; a non-finite loss stops the
    /// accumulation of gradients (the step is skipped) but not the data. The contrastive
    /// objective gathers every rank's embeddings through `coll` (None: one process).
    fn accumulate(
        &mut self,
        cfg: &TrainConfig,
        batches: &Receiver<Result<Batch>>,
        pos: &mut Position,
        device: Device,
        mut coll: Option<&mut (dyn Collective + Send + 'static)>,
    ) -> Result<Accumulated> {
        let side = cfg.model.image_size;
        let mut acc = Accumulated {
            loss_sum: 0.0,
            finite: true,
            images: 0,
        };
        for micro in 0..cfg.grad_accumulation {
            let batch = batches.recv().map_err(|_| Error::Checkpoint {
                uri: cfg.dataset_uri.clone(),
                reason: "the data loader stopped".into(),
            })??;
            let b = batch.keys.len() as i64;
            let images = Tensor::from_slice(&batch.images)
                .view([b, 1, side, side])
                .to_device(device);
            tch::manual_seed(mask_seed(cfg.seed, pos.step, micro, cfg.rank));
            let coll = coll.as_deref_mut().map(|c| c as &mut dyn Collective);
            let (loss, mut value) = self.loss(cfg, &images, &batch, coll, device)?;
            if matches!(cfg.fault, Some(Fault::NanLossFrom(k)) if pos.step >= k) {
                value = f64::NAN;
            }
            if value.is_finite() && acc.finite {
                self.opt.backward(&(loss / cfg.grad_accumulation as f64));
                acc.loss_sum += value;
            } else {
                acc.finite = false;
            }
            pos.cursor = batch.cursor;
            acc.images += b as u64;
        }
        Ok(acc)
    }

    /// The weighted sum of the objectives on one micro-batch: (what to differentiate, its value).
    fn loss(
        &self,
        cfg: &TrainConfig,
        images: &Tensor,
        batch: &Batch,
        coll: Option<&mut dyn Collective>,
        device: Device,
    ) -> Result<(Tensor, f64)> {
        let autocast = cfg.precision == Precision::Bf16 && device.is_cuda();
        let mut parts = Vec::new();
        let mut value = 0.0;
        if let (ImageModel::Mae(mae), Some(w)) = (&self.image, cfg.objective.mae) {
            let loss = tch::autocast(autocast, || mae.loss(images, cfg.mask_ratio));
            value += w * loss.double_value(&[]);
            parts.push(loss * w);
        }
        if let (Some(it), Some(w)) = (&self.image_text, cfg.objective.contrastive) {
            let tokenizer = self.tokenizer.as_ref().ok_or_else(|| Error::Field {
                field: "tokenizer".into(),
                reason: "the contrastive objective has no tokenizer".into(),
            })?;
            let reports = image_text::batch_reports(&batch.keys, &batch.reports, &cfg.dataset_uri)?;
            let (ids, mask) = tokenizer.encode(&reports)?;
            let (img, txt) = tch::autocast(autocast, || {
                (
                    it.image_embedding(self.image.encoder(), images),
                    it.text_embedding(&ids, &mask),
                )
            });
            let (to_differentiate, loss) = match coll {
                Some(c) => contrastive::gathered_loss(c, &img, &txt, &it.logit_scale)?,
                None => {
                    let l = contrastive::loss(&img, &txt, &it.logit_scale);
                    (l.shallow_clone(), l)
                }
            };
            value += w * loss.double_value(&[]);
            parts.push(to_differentiate * w);
        }
        let total = parts
            .into_iter()
            .reduce(|a, b| a + b)
            .expect("model.objective names at least one objective");
        Ok((total, value))
    }

    /// Takes the optimizer step, or counts a skipped one (too many in a row fail the run).
    fn update(
        &mut self,
        cfg: &TrainConfig,
        acc: &Accumulated,
        pos: &mut Position,
        total: i64,
        metrics: &Metrics,
    ) -> Result<Option<Update>> {
        let step = pos.step;
        let update = if acc.finite {
            pos.streak = 0;
            let grad_norm = self.opt.clip_grad_norm(cfg.grad_clip_norm);
            let lr = cfg.learning_rate_at(step, total);
            self.opt.step(lr);
            Some(Update { lr, grad_norm })
        } else {
            pos.streak += 1;
            metrics.nonfinite_steps.inc();
            eprintln!(
                "radfm-trainer: non-finite loss at step {step} ({} in a row), update skipped",
                pos.streak
            );
            if pos.streak >= cfg.max_nonfinite {
                return Err(Error::NonFinite {
                    step,
                    count: pos.streak,
                });
            }
            None
        };
        self.opt.zero_grad();
        pos.step += 1;
        metrics.step.set(pos.step);
        Ok(update)
    }
}

/// When to checkpoint (rank 0 only), and the saving. The state is copied to host memory on
/// the loop's thread; the upload, commit and pruning run on the runtime while training goes on,
/// so a slow object store delays the next checkpoint, never the gang's next collective.
struct Checkpoints<'a> {
    rt: &'a Runtime,
    /// The folder's writer (rank 0 only).
    writer: Option<checkpoint::Writer>,
    cfg: &'a TrainConfig,
    data: DataRef,
    total: i64,
    /// The last checkpoint this run committed: (manifest URI, step).
    last: Option<(String, i64)>,
    /// The upload under way: its step and task.
    pending: Option<(i64, tokio::task::JoinHandle<Result<String>>)>,
}

impl Checkpoints<'_> {
    /// Every `checkpoint_every` steps and at the last step.
    fn due_after(&self, step: i64) -> bool {
        self.cfg.rank == 0 && (step % self.cfg.checkpoint_every == 0 || step == self.total)
    }

    /// On a stop, unless the step is already saved (resumed from it, or written or being written).
    fn due_at_stop(&self, pos: &Position) -> bool {
        let saved = self.last.as_ref().map_or(-1, |(_, s)| *s);
        let uploading = self.pending.as_ref().map_or(-1, |(s, _)| *s);
        self.cfg.rank == 0
            && pos.resumed_from != Some(pos.step)
            && saved != pos.step
            && uploading != pos.step
    }

    /// A scheduled checkpoint: started, unless the previous upload is still running and this is
    /// not the last step (waiting would hold the gang's next collective; the step is skipped and
    /// said). The last step waits for the previous upload and always checkpoints. Returns an
    /// upload that finished meanwhile.
    fn begin_due(&mut self, model: &Model, pos: &Position) -> Result<Option<(String, i64)>> {
        let done = self.poll()?;
        if let Some((uploading, _)) = &self.pending
            && pos.step != self.total
        {
            eprintln!(
                "radfm-trainer: checkpoint at step {} skipped: the upload of step {uploading} is still running",
                pos.step
            );
            return Ok(done);
        }
        let waited = self.finish()?;
        self.start(model, pos)?;
        Ok(done.or(waited))
    }

    /// Copies the model, optimizer and position and starts their upload, commit and pruning.
    /// The previous upload must be finished ([`Checkpoints::finish`]).
    fn start(&mut self, model: &Model, pos: &Position) -> Result<()> {
        let Some(writer) = self.writer.clone() else {
            return Ok(());
        };
        let state = TrainState {
            step: pos.step,
            total_steps: self.total,
            cursor: pos.cursor,
            adam_steps: model.opt.steps,
            nonfinite_streak: pos.streak,
            rng: RNG_SCHEME.into(),
            loss: pos.last_loss,
            loss_history: pos.history.clone(),
            data: self.data.clone(),
            config: serde_json::to_value(self.cfg).expect("config serialises"),
            code_version: env!("CARGO_PKG_VERSION").into(),
        };
        let mut files = state_files(&model.vs, &model.opt)?;
        if let Some(t) = &model.tokenizer {
            files.push((image_text::TOKENIZER_FILE, t.to_json()?.into_bytes()));
        }
        let keep = self.cfg.checkpoint_keep;
        let task = self.rt.spawn(async move {
            let uri = writer.save(state, files).await?;
            writer.prune(keep).await?;
            Ok(uri)
        });
        self.pending = Some((pos.step, task));
        Ok(())
    }

    /// The upload under way, if it has finished: its manifest URI and step.
    fn poll(&mut self) -> Result<Option<(String, i64)>> {
        match &self.pending {
            Some((_, task)) if task.is_finished() => self.finish(),
            _ => Ok(None),
        }
    }

    /// Waits for the upload under way: its manifest URI and step.
    fn finish(&mut self) -> Result<Option<(String, i64)>> {
        let Some((step, task)) = self.pending.take() else {
            return Ok(None);
        };
        let uri = self.rt.block_on(task).map_err(|e| Error::Checkpoint {
            uri: self.cfg.checkpoint_uri.clone(),
            reason: format!("the upload of step {step} stopped: {e}"),
        })??;
        self.last = Some((uri.clone(), step));
        Ok(Some((uri, step)))
    }
}

/// Every output of the loop: JSON lines (rank 0), Prometheus metrics, pod annotations.
struct Reporter<'a> {
    cfg: &'a TrainConfig,
    rt: &'a Runtime,
    quiet: bool,
    total: i64,
    metrics: Metrics,
    annotator: Option<PodAnnotator>,
    fetch_retries: Arc<AtomicU64>,
    started: Instant,
    images: u64,
    window: Window,
    last_update: Update,
    /// Mean loss of each logged window of this run.
    losses: Vec<(i64, f64)>,
}

/// The steps since the last log line.
struct Window {
    loss: f64,
    steps: u32,
    images: u64,
    since: Instant,
}

impl Window {
    fn new() -> Window {
        Window {
            loss: 0.0,
            steps: 0,
            images: 0,
            since: Instant::now(),
        }
    }
}

impl<'a> Reporter<'a> {
    /// Serves metrics and connects the pod annotator (rank 0; annotations are best effort).
    fn open(
        cfg: &'a TrainConfig,
        hooks: &Hooks,
        rt: &'a Runtime,
        fetch_retries: Arc<AtomicU64>,
        total: i64,
    ) -> Result<Reporter<'a>> {
        let metrics = Metrics::default();
        if let (Some(addr), 0) = (cfg.metrics_addr, cfg.rank) {
            let bound = rt.block_on(metrics.serve(addr)).map_err(|e| Error::Io {
                path: format!("metrics endpoint {addr}"),
                source: e,
            })?;
            eprintln!("radfm-trainer: metrics on http://{bound}/metrics");
        }
        let annotator = match (&cfg.pod_name, cfg.rank) {
            (Some(pod), 0) => rt
                .block_on(PodAnnotator::connect(&cfg.namespace, pod))
                .inspect_err(|e| eprintln!("radfm-trainer: progress annotations off: {e}"))
                .ok(),
            _ => None,
        };
        Ok(Reporter {
            cfg,
            rt,
            quiet: hooks.quiet,
            total,
            metrics,
            annotator,
            fetch_retries,
            started: Instant::now(),
            images: 0,
            window: Window::new(),
            last_update: Update::default(),
            losses: Vec::new(),
        })
    }

    fn say(&self, line: &str) {
        if self.cfg.rank == 0 && !self.quiet {
            // A closed stdout (a log collector gone) must not stop training.
            use std::io::Write;
            let _ = writeln!(std::io::stdout(), "{line}");
        }
    }

    fn started(&self, pos: &Position, device: Device) {
        let cfg = self.cfg;
        let start = serde_json::json!({
            "event": "start", "job": cfg.job, "attempt": cfg.attempt, "world": cfg.world,
            "total_steps": self.total, "resumed_from": pos.resumed_from, "cursor": pos.cursor,
            "device": format!("{device:?}"),
        });
        self.say(&start.to_string());
    }

    /// Accounts a step; every `log_every` steps (and at the end) reports the window.
    fn stepped(
        &mut self,
        acc: &Accumulated,
        update: Option<Update>,
        pos: &mut Position,
        first_step: i64,
    ) {
        self.images += acc.images;
        self.window.images += acc.images;
        if let Some(u) = update {
            self.last_update = u;
            self.window.loss += acc.loss_sum / self.cfg.grad_accumulation as f64;
            self.window.steps += 1;
        }
        let step = pos.step;
        if step % self.cfg.log_every == 0 || step == self.total {
            let record = self.record(pos, first_step);
            self.report(&record, pos);
            self.window = Window::new();
        }
    }

    fn record(&self, pos: &Position, first_step: i64) -> Record {
        let w = &self.window;
        let loss = if w.steps > 0 {
            w.loss / w.steps as f64
        } else {
            f64::NAN
        };
        let done = (pos.step - first_step).max(1) as f64;
        Record {
            event: "step",
            step: pos.step,
            total_steps: self.total,
            epoch: pos.cursor.epoch,
            loss,
            lr: self.last_update.lr,
            grad_norm: self.last_update.grad_norm,
            images_per_s: w.images as f64 / w.since.elapsed().as_secs_f64().max(1e-9),
            eta_s: self.started.elapsed().as_secs_f64() / done * (self.total - pos.step) as f64,
            rank: self.cfg.rank,
        }
    }

    fn report(&mut self, record: &Record, pos: &mut Position) {
        if record.loss.is_finite() {
            self.losses.push((record.step, record.loss));
            checkpoint::record_loss(&mut pos.history, record.step, record.loss);
            pos.last_loss = Some(record.loss);
            self.metrics.loss.set(record.loss);
        }
        self.metrics.lr.set(record.lr);
        self.metrics.images_per_second.set(record.images_per_s);
        let retries = self.fetch_retries.load(Ordering::Relaxed) as i64;
        self.metrics.fetch_retries.set(retries);
        self.say(&serde_json::to_string(record).expect("records serialise"));
        let last = record.step == self.total;
        if let Some(a) = self.annotator.as_mut()
            && let Err(e) = self.rt.block_on(a.progress(record, last))
        {
            eprintln!("radfm-trainer: progress annotation failed: {e}");
        }
    }

    /// Announces a committed checkpoint on the pod.
    /// A checkpoint upload finished (None: nothing finished).
    fn committed(&mut self, done: Option<(String, i64)>) {
        let Some((uri, step)) = done else {
            return;
        };
        self.metrics.checkpoints.inc();
        if let Some(a) = self.annotator.as_mut()
            && let Err(e) = self.rt.block_on(a.checkpoint(&uri, step))
        {
            eprintln!("radfm-trainer: checkpoint annotation failed: {e}");
        }
    }

    fn images_per_s(&self) -> f64 {
        self.images as f64 / self.started.elapsed().as_secs_f64().max(1e-9)
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
    let objective: Option<radfm_api::trainingjob::Objective> = l
        .manifest
        .state
        .config
        .get("objective")
        .and_then(|m| serde_json::from_value(m.clone()).ok());
    if objective.unwrap_or_default() != cfg.objective {
        return Err(Error::Field {
            field: "model.objective".into(),
            reason: format!(
                "{} was written with objective {}, this run has {}; use a new checkpoint.uri (model.initFrom starts from its weights)",
                l.uri,
                objective.unwrap_or_default().to_env(),
                cfg.objective.to_env()
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

    #[test]
    fn resuming_under_another_partition_is_exact_at_epoch_boundaries_and_refused_between() {
        let p = |world, batch_size| Partition { world, batch_size };
        let at = |epoch, position| Cursor { epoch, position };
        // 96 samples, 4 ranks × batch 8: a block of 24 per rank (three batches).
        let table = [
            (
                p(4, 8),
                p(4, 8),
                at(2, 8),
                Ok(at(2, 8)),
                "same partition: unchanged",
            ),
            (
                p(4, 8),
                p(2, 8),
                at(2, 0),
                Ok(at(2, 0)),
                "start of an epoch",
            ),
            (p(4, 8), p(2, 8), at(2, 24), Ok(at(3, 0)), "end of an epoch"),
            (
                p(4, 8),
                p(4, 4),
                at(2, 24),
                Ok(at(3, 0)),
                "batch changed at the end",
            ),
            (
                p(4, 8),
                p(2, 8),
                at(2, 8),
                Err("written mid-epoch"),
                "mid-epoch",
            ),
            (
                p(2, 8),
                p(4, 8),
                at(0, 40),
                Err("Resume with 2 ranks"),
                "says how",
            ),
        ];
        for (saved, now, cursor, want, case) in table {
            match (resume_cursor(saved, now, cursor, 96), want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{case}"),
                (Err(e), Err(needle)) => assert!(e.contains(needle), "{case}: {e}"),
                (got, want) => panic!("{case}: {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn a_resume_choice_survives_the_sum_with_the_other_ranks_zeros() {
        for id in [
            None,
            Some(CommitId { step: 0, epoch: 1 }),
            Some(CommitId {
                step: 123_456_789_012,
                epoch: 65_537,
            }),
        ] {
            assert_eq!(decode_choice(&encode_choice(id)), id);
        }
    }

    #[test]
    fn every_rank_resumes_from_rank_zeros_choice_not_its_own() {
        use crate::collective::{rendezvous, ring};
        let server = rendezvous::RendezvousServer::start("127.0.0.1:0", None, 1).unwrap();
        let addr = server.addr.to_string();
        // Each rank believes in a different checkpoint (a commit landed between their reads).
        let beliefs = [
            Some(CommitId { step: 40, epoch: 3 }),
            Some(CommitId { step: 50, epoch: 2 }),
            None,
        ];
        let threads: Vec<_> = beliefs
            .into_iter()
            .enumerate()
            .map(|(rank, belief)| {
                let addr = addr.clone();
                std::thread::spawn(move || {
                    let t = std::time::Duration::from_secs(10);
                    let mut c = rendezvous::RendezvousClient::connect(&addr, 1, t, None).unwrap();
                    let mut r = ring::Ring::connect(&mut c, rank, 3, t).unwrap();
                    agree_on_resume(&mut r, belief).unwrap()
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), Some(CommitId { step: 40, epoch: 3 }));
        }
    }

    #[test]
    fn rank_zero_checkpoints_on_schedule_at_the_end_and_at_a_stop_not_yet_saved() {
        let m = crate::config::tests::vars(&[]);
        let cfg = TrainConfig::from_lookup(|k| m.get(k).cloned()).unwrap();
        let rt = runtime().unwrap();
        let mut c = Checkpoints {
            rt: &rt,
            writer: None,
            cfg: &cfg,
            data: DataRef::default(),
            total: 12,
            last: None,
            pending: None,
        };
        let due: Vec<i64> = (1..=12).filter(|s| c.due_after(*s)).collect();
        assert_eq!(due, [5, 10, 12], "every 5 steps and the last");
        let at = |step, resumed_from| Position {
            step,
            resumed_from,
            ..Default::default()
        };
        assert!(c.due_at_stop(&at(7, None)));
        assert!(
            !c.due_at_stop(&at(7, Some(7))),
            "resumed from this very step"
        );
        c.last = Some(("m".into(), 7));
        assert!(!c.due_at_stop(&at(7, None)), "just written");
        let other = TrainConfig {
            rank: 1,
            ..cfg.clone()
        };
        c.cfg = &other;
        assert!(
            !c.due_after(10) && !c.due_at_stop(&at(8, None)),
            "only rank 0 writes"
        );
    }
}
