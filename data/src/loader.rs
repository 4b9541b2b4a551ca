//! The training data loader: deterministic, rank-partitioned, resumable streaming of shards.
//!
//! Order: for each epoch, the shard list and the samples inside each shard are permuted from
//! (seed, epoch); the resulting global order is known from the index alone, before any data is
//! read. Of the first `world × per_rank` positions (per_rank = a multiple of the batch size),
//! rank r takes the contiguous block `[r × per_rank, (r+1) × per_rank)`, so ranks are disjoint,
//! read only the shards their block touches, and always yield the same number of batches — a rank
//! that runs out early is what hangs data-parallel training. The cursor (epoch, position in the
//! block) restores mid-epoch with no sample repeated or skipped.
//!
//! Shards are fetched ahead by a task (bounded prefetch, retries with backoff on transient store
//! errors) and streamed to local spool files ([`crate::spool`]), checked against the index's
//! sha256 and indexed by member offsets. Each batch then reads, decodes and augments just its
//! own samples, in parallel: memory is bounded by the batch, not by the shard size. Corrupt
//! samples are counted and skipped up to a limit, then the loader fails naming the shard; a batch left short by skipped
//! samples is padded with samples already in it, so batch counts stay equal across ranks.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::index::{DatasetIndex, ShardEntry, Stats};
use crate::meta::SampleMeta;
use crate::shard::{BadSample, Sample};
use crate::spool::SpooledShard;
use crate::store::Location;
use crate::{Error, Result};

/// Loader settings.
#[derive(Debug, Clone, PartialEq)]
pub struct LoaderConfig {
    /// Seed of the order and the augmentations.
    pub seed: u64,
    /// This process's global rank.
    pub rank: usize,
    /// Processes in the gang.
    pub world: usize,
    /// Samples per batch on this rank.
    pub batch_size: usize,
    /// Output image side (random resized crop target, or plain resize without augmentation).
    pub image_size: usize,
    /// Random resized crop, flip and intensity jitter.
    pub augment: bool,
    /// Shards fetched ahead.
    pub prefetch: usize,
    /// Corrupt samples tolerated per epoch on this rank before failing.
    pub max_bad_samples: usize,
    /// Only these shard sequence numbers (continual training's data window); None: all.
    pub shards: Option<Vec<u64>>,
    /// Retries of a failed shard fetch.
    pub fetch_retries: u32,
    /// Folder the shards in use are spooled to (None: the system's temporary folder). It holds
    /// at most `prefetch + 3` shards at a time, in unlinked files.
    pub spool_dir: Option<PathBuf>,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            seed: 0,
            rank: 0,
            world: 1,
            batch_size: 32,
            image_size: 128,
            augment: true,
            prefetch: 2,
            max_bad_samples: 16,
            shards: None,
            fetch_retries: 8,
            spool_dir: None,
        }
    }
}

/// Where a rank is in the data: saved in checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Cursor {
    /// Epoch number.
    pub epoch: u64,
    /// Positions of this rank's block already consumed in this epoch.
    pub position: u64,
}

/// One batch, images normalised with the dataset statistics, layout [batch, 1, size, size].
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Pixel values, row-major per image.
    pub images: Vec<f32>,
    /// Sample keys.
    pub keys: Vec<String>,
    /// Sample metadata.
    pub meta: Vec<SampleMeta>,
    /// Each sample's report, where it has one (the image–report objective's text side).
    pub reports: Vec<Option<String>>,
    /// The cursor after this batch.
    pub cursor: Cursor,
}

/// (shard position in the index, sample index in the shard) of every position of an epoch.
pub fn epoch_order(shards: &[ShardEntry], seed: u64, epoch: u64) -> Vec<(usize, u64)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ epoch.wrapping_mul(0xA24B_AED4_963E_E407));
    let mut shard_ids: Vec<usize> = (0..shards.len()).collect();
    shard_ids.shuffle(&mut rng);
    let mut order = Vec::new();
    for s in shard_ids {
        let mut idx: Vec<u64> = (0..shards[s].samples).collect();
        idx.shuffle(&mut rng);
        order.extend(idx.into_iter().map(|i| (s, i)));
    }
    order
}

/// Positions per rank per epoch: equal for every rank, a multiple of the batch size.
pub fn per_rank(total: u64, world: usize, batch: usize) -> u64 {
    total / world as u64 / batch as u64 * batch as u64
}

/// The positions of `rank`'s block in an epoch.
pub fn rank_block(order: &[(usize, u64)], cfg: &LoaderConfig) -> Vec<(usize, u64)> {
    let n = per_rank(order.len() as u64, cfg.world, cfg.batch_size) as usize;
    order[cfg.rank * n..(cfg.rank + 1) * n].to_vec()
}

/// The loader of one rank.
pub struct Loader {
    loc: Location,
    shards: Vec<ShardEntry>,
    stats: Stats,
    cfg: LoaderConfig,
    /// Corrupt samples skipped in the current epoch.
    pub bad_samples: usize,
    /// Shard fetches retried after a store error, since the loader opened.
    pub fetch_retries: Arc<AtomicU64>,
}

impl Loader {
    /// Opens a dataset and checks that every rank gets at least one batch per epoch.
    pub async fn open(uri: &str, cfg: LoaderConfig) -> Result<Loader> {
        Self::open_at(Location::open(uri)?, cfg).await
    }

    /// Like [`Loader::open`], on an already opened location.
    pub async fn open_at(loc: Location, cfg: LoaderConfig) -> Result<Loader> {
        let uri = loc.uri.clone();
        let uri = uri.as_str();
        let index = DatasetIndex::load(&loc).await?;
        let shards: Vec<ShardEntry> = match &cfg.shards {
            None => index.shards.clone(),
            Some(want) => {
                if let Some(missing) = want
                    .iter()
                    .find(|&&w| !index.shards.iter().any(|s| s.seq == w))
                {
                    return Err(Error::Index {
                        uri: loc.child_uri(crate::index::INDEX),
                        reason: format!(
                            "shard {missing} of the selection is not in the index ({} shards)",
                            index.shards.len()
                        ),
                    });
                }
                index
                    .shards
                    .iter()
                    .filter(|s| want.contains(&s.seq))
                    .cloned()
                    .collect()
            }
        };
        let total: u64 = shards.iter().map(|s| s.samples).sum();
        if cfg.rank >= cfg.world || cfg.batch_size == 0 {
            return Err(Error::Uri {
                uri: uri.into(),
                reason: format!(
                    "rank {} of world {} with batch {} is not a valid partition",
                    cfg.rank, cfg.world, cfg.batch_size
                ),
            });
        }
        if per_rank(total, cfg.world, cfg.batch_size) == 0 {
            return Err(Error::Index {
                uri: loc.child_uri(crate::index::INDEX),
                reason: format!(
                    "{total} samples in {} selected shards cannot give {} ranks one batch of {} each",
                    shards.len(),
                    cfg.world,
                    cfg.batch_size
                ),
            });
        }
        let mut stats = index.stats;
        if stats.std <= 0.0 {
            stats.std = 1.0;
        }
        Ok(Loader {
            loc,
            shards,
            stats,
            cfg,
            bad_samples: 0,
            fetch_retries: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The shards this loader reads (the index's, or the selected ones).
    pub fn shards(&self) -> &[ShardEntry] {
        &self.shards
    }

    /// The intensity statistics images are normalised with (std 1 when the index has none).
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Batches per epoch on every rank.
    pub fn batches_per_epoch(&self) -> u64 {
        let total: u64 = self.shards.iter().map(|s| s.samples).sum();
        per_rank(total, self.cfg.world, self.cfg.batch_size) / self.cfg.batch_size as u64
    }

    /// Fetches the `needed` shards in order, `prefetch` ahead; stops at the first failure.
    fn spawn_fetcher(&self, needed: &[usize]) -> (Fetched, tokio::task::JoinHandle<()>) {
        let (tx, rx) = tokio::sync::mpsc::channel(self.cfg.prefetch.max(1));
        let loc = self.loc.clone();
        let shards: Vec<ShardEntry> = needed.iter().map(|&s| self.shards[s].clone()).collect();
        let retries = self.cfg.fetch_retries;
        let counter = self.fetch_retries.clone();
        let spool_dir = self
            .cfg
            .spool_dir
            .clone()
            .unwrap_or_else(std::env::temp_dir);
        let needed = needed.to_vec();
        let handle = tokio::spawn(async move {
            for (entry, s) in shards.into_iter().zip(needed) {
                let r = fetch_shard(&loc, &entry, &spool_dir, retries, &counter)
                    .await
                    .map(|shard| (s, shard));
                let failed = r.is_err();
                if tx.send(r).await.is_err() || failed {
                    return;
                }
            }
        });
        (rx, handle)
    }

    /// Waits until every shard the batch `take` reads from is loaded.
    async fn await_shards(
        &self,
        rx: &mut Fetched,
        loaded: &mut Loaded,
        take: &[(usize, u64)],
    ) -> Result<()> {
        for &(s, _) in take {
            while !loaded.contains_key(&s) {
                match rx.recv().await {
                    Some(Ok((id, shard))) => {
                        loaded.insert(id, Arc::new(shard));
                    }
                    Some(Err(e)) => return Err(e),
                    None => {
                        return Err(Error::Shard {
                            shard: self.shards[s].name.clone(),
                            reason: "fetcher stopped".into(),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// The batch's good samples; corrupt ones count against the epoch's limit and are replaced
    /// by repeating good ones of the batch.
    fn choose(
        &mut self,
        decoded: Vec<std::result::Result<Prepared, BadSample>>,
        take: &[(usize, u64)],
    ) -> Result<Vec<Prepared>> {
        let mut chosen: Vec<Prepared> = Vec::with_capacity(take.len());
        for (d, &(s, i)) in decoded.into_iter().zip(take) {
            match d {
                Ok(p) => chosen.push(p),
                Err(bad) => {
                    self.bad_samples += 1;
                    if self.bad_samples > self.cfg.max_bad_samples {
                        return Err(Error::Shard {
                            shard: self.shards[s].name.clone(),
                            reason: format!(
                                "more than {} corrupt samples this epoch (sample {i} of this shard, {}, is one: {})",
                                self.cfg.max_bad_samples, bad.key, bad.reason
                            ),
                        });
                    }
                }
            }
        }
        if chosen.is_empty() {
            return Err(Error::Shard {
                shard: self.shards[take[0].0].name.clone(),
                reason: "a whole batch of corrupt samples".into(),
            });
        }
        let mut k = 0;
        while chosen.len() < take.len() {
            chosen.push(chosen[k].clone());
            k += 1;
        }
        Ok(chosen)
    }

    /// Reads, decodes and prepares the batch `take` (whose first position is `position`), one
    /// sample per task on rayon's pool: the batch's samples are all that is decoded at a time.
    fn decode(
        &self,
        loaded: &Loaded,
        take: &[(usize, u64)],
        epoch: u64,
        position: u64,
    ) -> Vec<std::result::Result<Prepared, BadSample>> {
        let (seed, augment, stats, size) = (
            self.cfg.seed,
            self.cfg.augment,
            self.stats,
            self.cfg.image_size,
        );
        take.par_iter()
            .enumerate()
            .map(|(k, &(s, i))| {
                let sample = loaded[&s].sample(i)?;
                let pos = position + k as u64;
                Ok(Prepared {
                    image: prepare(&sample, size, augment, stats, seed, epoch, pos),
                    key: sample.key,
                    meta: sample.meta,
                    report: sample.report,
                })
            })
            .collect()
    }

    /// Streams the rest of the epoch from `cursor`, calling `each` per batch; stops early when
    /// `each` returns false.
    pub async fn run_epoch(
        &mut self,
        cursor: Cursor,
        mut each: impl FnMut(Batch) -> bool,
    ) -> Result<()> {
        self.bad_samples = 0;
        let order = epoch_order(&self.shards, self.cfg.seed, cursor.epoch);
        let block = rank_block(&order, &self.cfg);
        let start = cursor.position as usize;
        let remaining = &block[start.min(block.len())..];
        // Shards in the order the block first touches them.
        let mut needed: Vec<usize> = Vec::new();
        for &(s, _) in remaining {
            if needed.last() != Some(&s) && !needed.contains(&s) {
                needed.push(s);
            }
        }
        let (mut rx, fetcher) = self.spawn_fetcher(&needed);
        let mut loaded = Loaded::default();
        let mut pending: VecDeque<(usize, u64)> = remaining.iter().copied().collect();
        let mut position = start as u64;
        let size = self.cfg.image_size;
        while !pending.is_empty() {
            let take: Vec<(usize, u64)> = pending
                .drain(..self.cfg.batch_size.min(pending.len()))
                .collect();
            self.await_shards(&mut rx, &mut loaded, &take).await?;
            let decoded = self.decode(&loaded, &take, cursor.epoch, position);
            let chosen = self
                .choose(decoded, &take)
                .inspect_err(|_| fetcher.abort())?;
            position += take.len() as u64;
            let mut batch = Batch {
                images: Vec::with_capacity(take.len() * size * size),
                keys: Vec::with_capacity(take.len()),
                meta: Vec::with_capacity(take.len()),
                reports: Vec::with_capacity(take.len()),
                cursor: Cursor {
                    epoch: cursor.epoch,
                    position,
                },
            };
            for p in chosen {
                batch.images.extend_from_slice(&p.image);
                batch.keys.push(p.key);
                batch.meta.push(p.meta);
                batch.reports.push(p.report);
            }
            // Shards no longer needed by what is left are dropped with their spool files.
            loaded.retain(|id, _| pending.iter().any(|(s, _)| s == id));
            if !each(batch) {
                fetcher.abort();
                return Ok(());
            }
        }
        Ok(())
    }
}

/// One sample ready for a batch: its prepared image and what travels with it.
#[derive(Clone)]
struct Prepared {
    image: Vec<f32>,
    key: String,
    meta: SampleMeta,
    report: Option<String>,
}

/// Spooled shards by their position in the index.
type Loaded = std::collections::HashMap<usize, Arc<SpooledShard>>;

/// The fetcher's shards as they arrive.
type Fetched = tokio::sync::mpsc::Receiver<Result<(usize, SpooledShard)>>;

async fn fetch_shard(
    loc: &Location,
    entry: &ShardEntry,
    spool_dir: &Path,
    retries: u32,
    counter: &AtomicU64,
) -> Result<SpooledShard> {
    let mut delay = Duration::from_millis(200);
    let mut attempt = 0;
    loop {
        match SpooledShard::fetch(loc, entry, spool_dir).await {
            Ok(Some(shard)) => return Ok(shard),
            Ok(None) => {
                return Err(Error::Shard {
                    shard: loc.child_uri(&entry.name),
                    reason: "listed in the index but missing".into(),
                });
            }
            Err(e @ Error::Store { .. }) if attempt < retries => {
                attempt += 1;
                counter.fetch_add(1, Ordering::Relaxed);
                eprintln!(
                    "radfm loader: fetching {} failed (attempt {attempt}/{retries}), retrying in {delay:?}: {e}",
                    entry.name
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// One sample's augmentation: the crop (origin and extent in source pixels), the flip and the
/// intensity jitter (`gain`, `bias`).
#[derive(Debug, Clone, Copy)]
struct Augmentation {
    x0: f64,
    y0: f64,
    cw: f64,
    ch: f64,
    flip: bool,
    gain: f64,
    bias: f64,
}

impl Augmentation {
    /// Drawn from (seed, epoch, position), whatever thread asks; without `augment`, the whole
    /// image unchanged.
    fn draw(s: &Sample, augment: bool, seed: u64, epoch: u64, pos: u64) -> Augmentation {
        let (w, h) = (s.image.width as f64, s.image.height as f64);
        let none = Augmentation {
            x0: 0.0,
            y0: 0.0,
            cw: w,
            ch: h,
            flip: false,
            gain: 1.0,
            bias: 0.0,
        };
        if !augment {
            return none;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(
            seed ^ epoch.rotate_left(32) ^ pos.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let area = w * h * rng.random_range(0.5..1.0);
        let ratio = (rng.random_range((0.75f64).ln()..(4.0f64 / 3.0).ln())).exp();
        let cw = (area * ratio).sqrt().min(w);
        let ch = (area / ratio).sqrt().min(h);
        Augmentation {
            x0: rng.random_range(0.0..=(w - cw)),
            y0: rng.random_range(0.0..=(h - ch)),
            cw,
            ch,
            flip: rng.random_bool(0.5),
            gain: rng.random_range(0.9..1.1),
            bias: rng.random_range(-0.1..0.1),
        }
    }
}

/// Crop, flip, jitter and normalise one sample into `size × size` floats. Deterministic from
/// (seed, epoch, position), whatever thread runs it.
fn prepare(
    s: &Sample,
    size: usize,
    augment: bool,
    stats: Stats,
    seed: u64,
    epoch: u64,
    pos: u64,
) -> Vec<f32> {
    let Augmentation {
        x0,
        y0,
        cw,
        ch,
        flip,
        gain,
        bias,
    } = Augmentation::draw(s, augment, seed, epoch, pos);
    // Bilinear weights sum to one, so rescaling to physical values, normalising and jittering
    // (all affine) apply after interpolating the stored values: out = stored · scale + shift.
    let scale = (s.meta.rescale_slope / stats.std * gain) as f32;
    let shift = ((s.meta.rescale_intercept - stats.mean) / stats.std * gain + bias) as f32;
    // The sampling grid is separable: each output column reads the same two source columns
    // with the same weight on every row, and each output row the same two source rows.
    let mut cols = taps(x0, cw, size, s.image.width as usize);
    if flip {
        cols.reverse();
    }
    let rows = taps(y0, ch, size, s.image.height as usize);
    let (width, px) = (s.image.width as usize, &s.image.pixels);
    // Source rows interpolated along x, each once: consecutive output rows share them.
    let along_x = |r: usize, into: &mut Vec<f32>| {
        let row = &px[r * width..][..width];
        into.clear();
        into.extend(cols.iter().map(|&(x0, x1, tx)| {
            let (a, b) = (f32::from(row[x0]), f32::from(row[x1]));
            a + (b - a) * tx
        }));
    };
    let (mut top, mut bottom) = (Vec::with_capacity(size), Vec::with_capacity(size));
    let (mut top_row, mut bottom_row) = (usize::MAX, usize::MAX);
    let mut out = Vec::with_capacity(size * size);
    for &(y0, y1, ty) in &rows {
        if y0 != top_row {
            if y0 == bottom_row {
                std::mem::swap(&mut top, &mut bottom);
                std::mem::swap(&mut top_row, &mut bottom_row);
            } else {
                along_x(y0, &mut top);
                top_row = y0;
            }
        }
        if y1 != bottom_row {
            along_x(y1, &mut bottom);
            bottom_row = y1;
        }
        out.extend(
            top.iter()
                .zip(&bottom)
                .map(|(&t, &b)| (t + (b - t) * ty) * scale + shift),
        );
    }
    out
}

/// For each of `size` output positions along one axis, the two source positions (clamped to
/// `0..len`) a crop of `extent` starting at `start` samples, and the weight of the second.
fn taps(start: f64, extent: f64, size: usize, len: usize) -> Vec<(usize, usize, f32)> {
    let last = len.saturating_sub(1);
    (0..size)
        .map(|o| {
            let at = start + (o as f64 + 0.5) * extent / size as f64 - 0.5;
            let floor = at.max(0.0).floor();
            let t = (at - floor).clamp(0.0, 1.0) as f32;
            let i = floor as usize;
            (i.min(last), (i + 1).min(last), t)
        })
        .collect()
}

/// The loader's view of a dataset for tests and tools: every key of `rank`'s block from `cursor`.
pub fn keys_from(shards: &[ShardEntry], cfg: &LoaderConfig, cursor: Cursor) -> Vec<(usize, u64)> {
    let order = epoch_order(shards, cfg.seed, cursor.epoch);
    rank_block(&order, cfg)[cursor.position as usize..].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::ShardSink;
    use crate::synth::{SynthConfig, cohort};
    use std::collections::BTreeSet;

    fn entries(sizes: &[u64]) -> Vec<ShardEntry> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| ShardEntry {
                seq: i as u64,
                name: format!("s{i}"),
                samples: n,
                bytes: 0,
                sha256: String::new(),
                created: String::new(),
                stats: Stats::default(),
            })
            .collect()
    }

    /// The resampler as first written: every output pixel by the direct bilinear formula, in
    /// f64, rescaled before interpolating.
    fn direct_prepare(s: &Sample, size: usize, stats: Stats, a: Augmentation) -> Vec<f32> {
        let px = |x: usize, y: usize| -> f64 {
            let v = s.image.pixels[y.min(s.image.height as usize - 1) * s.image.width as usize
                + x.min(s.image.width as usize - 1)] as f64;
            v * s.meta.rescale_slope + s.meta.rescale_intercept
        };
        let mut out = Vec::with_capacity(size * size);
        for oy in 0..size {
            for ox in 0..size {
                let ox = if a.flip { size - 1 - ox } else { ox };
                let sx = a.x0 + (ox as f64 + 0.5) * a.cw / size as f64 - 0.5;
                let sy = a.y0 + (oy as f64 + 0.5) * a.ch / size as f64 - 0.5;
                let (fx, fy) = (sx.max(0.0).floor(), sy.max(0.0).floor());
                let (tx, ty) = ((sx - fx).clamp(0.0, 1.0), (sy - fy).clamp(0.0, 1.0));
                let (ix, iy) = (fx as usize, fy as usize);
                let v = px(ix, iy) * (1.0 - tx) * (1.0 - ty)
                    + px(ix + 1, iy) * tx * (1.0 - ty)
                    + px(ix, iy + 1) * (1.0 - tx) * ty
                    + px(ix + 1, iy + 1) * tx * ty;
                out.push((((v - stats.mean) / stats.std) * a.gain + a.bias) as f32);
            }
        }
        out
    }

    #[test]
    fn the_separable_resampler_matches_the_direct_bilinear_formula() {
        let (width, height) = (37u32, 23u32);
        let pixels: Vec<u16> = (0..width * height)
            .map(|i| ((u64::from(i) * 2_654_435_761) % 4096) as u16)
            .collect();
        let sample = Sample {
            key: "k".into(),
            image: crate::image16::Image16 {
                width,
                height,
                pixels,
            },
            meta: SampleMeta {
                rescale_slope: 2.0,
                rescale_intercept: -1024.0,
                ..SampleMeta::default()
            },
            report: None,
        };
        let stats = Stats {
            mean: 500.0,
            std: 900.0,
            ..Stats::default()
        };
        for (augment, size, pos) in [(false, 16, 0), (false, 64, 1), (true, 16, 2), (true, 48, 3)] {
            for pos in [pos, pos + 100, pos + 1000] {
                let fast = prepare(&sample, size, augment, stats, 7, 1, pos);
                let drawn = Augmentation::draw(&sample, augment, 7, 1, pos);
                let direct = direct_prepare(&sample, size, stats, drawn);
                assert_eq!(fast.len(), size * size);
                for (i, (a, b)) in fast.iter().zip(&direct).enumerate() {
                    assert!(
                        (a - b).abs() < 1e-4,
                        "augment {augment} size {size} at {i}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn ranks_get_disjoint_blocks_with_equal_batch_counts_for_1_to_8_ranks() {
        let shards = entries(&[37, 50, 13, 64, 29, 41]);
        for world in 1..=8 {
            for batch in [1, 4, 7] {
                let mut seen = BTreeSet::new();
                let mut lens = BTreeSet::new();
                for rank in 0..world {
                    let cfg = LoaderConfig {
                        rank,
                        world,
                        batch_size: batch,
                        seed: 3,
                        ..Default::default()
                    };
                    let block = keys_from(&shards, &cfg, Cursor::default());
                    lens.insert(block.len());
                    assert_eq!(block.len() % batch, 0);
                    for k in block {
                        assert!(seen.insert(k), "{k:?} given to two ranks (world {world})");
                    }
                }
                assert_eq!(
                    lens.len(),
                    1,
                    "world {world} batch {batch}: unequal {lens:?}"
                );
            }
        }
    }

    #[test]
    fn order_depends_on_seed_and_epoch_and_covers_every_sample_once() {
        let shards = entries(&[10, 20, 30]);
        let a = epoch_order(&shards, 1, 0);
        assert_eq!(a.iter().copied().collect::<BTreeSet<_>>().len(), 60);
        assert_eq!(a, epoch_order(&shards, 1, 0));
        assert_ne!(a, epoch_order(&shards, 1, 1));
        assert_ne!(a, epoch_order(&shards, 2, 0));
    }

    #[test]
    fn resuming_from_any_cursor_yields_exactly_the_remaining_samples() {
        // Property over every interruption point of a small epoch, several ranks and seeds.
        let shards = entries(&[9, 14, 5, 11]);
        for seed in 0..4 {
            for world in 1..=3 {
                for rank in 0..world {
                    let cfg = LoaderConfig {
                        rank,
                        world,
                        batch_size: 3,
                        seed,
                        ..Default::default()
                    };
                    let full = keys_from(
                        &shards,
                        &cfg,
                        Cursor {
                            epoch: 2,
                            position: 0,
                        },
                    );
                    for k in 0..=full.len() {
                        let rest = keys_from(
                            &shards,
                            &cfg,
                            Cursor {
                                epoch: 2,
                                position: k as u64,
                            },
                        );
                        assert_eq!(
                            rest,
                            full[k..],
                            "seed {seed} rank {rank}/{world} cut at {k}"
                        );
                    }
                }
            }
        }
    }

    /// Records `bytes` as shard 0's content in the index (a writer that indexed what it wrote).
    fn reindex(dir: &std::path::Path, bytes: &[u8]) {
        use sha2::Digest;
        let path = dir.join(crate::index::INDEX);
        let mut index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        index["shards"][0]["sha256"] = hex::encode(sha2::Sha256::digest(bytes)).into();
        std::fs::write(&path, serde_json::to_vec(&index).unwrap()).unwrap();
    }

    async fn dataset(dir: &std::path::Path, samples: usize, shard_bytes: usize) -> String {
        let uri = dir.display().to_string();
        let mut sink = ShardSink::new(Location::open(&uri).unwrap(), shard_bytes);
        for s in cohort(&SynthConfig {
            samples,
            size: 24,
            ..Default::default()
        }) {
            sink.add(&s, None).await.unwrap();
        }
        sink.flush().await.unwrap();
        uri
    }

    #[tokio::test]
    async fn streamed_epoch_interrupted_and_resumed_sees_each_sample_once() {
        let dir = tempfile::tempdir().unwrap();
        let uri = dataset(dir.path(), 45, 20_000).await;
        let cfg = LoaderConfig {
            batch_size: 4,
            image_size: 16,
            world: 2,
            rank: 1,
            ..Default::default()
        };
        let mut full = Vec::new();
        let mut loader = Loader::open(&uri, cfg.clone()).await.unwrap();
        assert_eq!(loader.batches_per_epoch(), 5);
        loader
            .run_epoch(
                Cursor {
                    epoch: 1,
                    position: 0,
                },
                |b| {
                    assert_eq!(b.images.len(), 4 * 16 * 16);
                    assert_eq!(b.reports.len(), 4);
                    for (m, r) in b.meta.iter().zip(&b.reports) {
                        let says_lesion =
                            r.as_deref().expect("synth writes reports").contains(" mm");
                        assert_eq!(
                            says_lesion,
                            m.labels["lesion"] == 1,
                            "a report stays with its image"
                        );
                    }
                    full.push(b);
                    true
                },
            )
            .await
            .unwrap();
        assert_eq!(full.len(), 5);
        // Stop after two batches, "checkpoint" the cursor, resume in a new loader.
        let mut first = Vec::new();
        let mut loader = Loader::open(&uri, cfg.clone()).await.unwrap();
        loader
            .run_epoch(
                Cursor {
                    epoch: 1,
                    position: 0,
                },
                |b| {
                    first.push(b);
                    first.len() < 2
                },
            )
            .await
            .unwrap();
        let cursor = first.last().unwrap().cursor;
        assert_eq!(
            cursor,
            Cursor {
                epoch: 1,
                position: 8
            }
        );
        let mut rest = Vec::new();
        Loader::open(&uri, cfg)
            .await
            .unwrap()
            .run_epoch(cursor, |b| {
                rest.push(b);
                true
            })
            .await
            .unwrap();
        let resumed: Vec<&Batch> = first.iter().chain(rest.iter()).collect();
        assert_eq!(resumed.len(), full.len());
        for (a, b) in resumed.iter().zip(&full) {
            assert_eq!(a.keys, b.keys);
            assert_eq!(a.images, b.images, "augmentations are deterministic too");
            assert_eq!(a.reports, b.reports, "each image keeps its own report");
        }
    }

    #[tokio::test]
    async fn shards_are_spooled_to_unlinked_files_so_a_crash_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let spool = tempfile::tempdir().unwrap();
        let uri = dataset(dir.path(), 30, 20_000).await;
        let cfg = LoaderConfig {
            batch_size: 4,
            image_size: 8,
            spool_dir: Some(spool.path().to_path_buf()),
            ..Default::default()
        };
        let mut loader = Loader::open(&uri, cfg.clone()).await.unwrap();
        assert!(loader.shards().len() > 1);
        let mut batches = 0;
        loader
            .run_epoch(Cursor::default(), |_| {
                batches += 1;
                std::fs::read_dir(spool.path()).unwrap().count() == 0
            })
            .await
            .unwrap();
        assert_eq!(batches, loader.batches_per_epoch());
        let missing = LoaderConfig {
            spool_dir: Some(dir.path().join("no-such-folder")),
            ..cfg
        };
        let e = Loader::open(&uri, missing)
            .await
            .unwrap()
            .run_epoch(Cursor::default(), |_| true)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("no-such-folder"), "{e}");
    }

    #[tokio::test]
    async fn corrupt_samples_are_skipped_up_to_the_limit_then_the_shard_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let uri = dataset(dir.path(), 12, 1 << 20).await;
        // Corrupt every PNG member of the single shard in place (same size, garbage bytes).
        let path = dir.path().join("shard-000000.tar");
        let mut bytes = std::fs::read(&path).unwrap();
        let mut offset = 0;
        let mut corrupted = 0;
        while offset + 512 <= bytes.len() && bytes[offset] != 0 {
            let name = String::from_utf8_lossy(&bytes[offset..offset + 100])
                .trim_end_matches('\0')
                .to_string();
            let size = usize::from_str_radix(
                String::from_utf8_lossy(&bytes[offset + 124..offset + 135]).trim(),
                8,
            )
            .unwrap();
            if name.ends_with(".png") && corrupted < 3 {
                bytes[offset + 512 + 20] ^= 0xFF;
                bytes[offset + 512 + 30] ^= 0xFF;
                corrupted += 1;
            }
            offset += 512 + size.div_ceil(512) * 512;
        }
        std::fs::write(&path, &bytes).unwrap();
        let cfg = LoaderConfig {
            batch_size: 4,
            image_size: 8,
            augment: false,
            max_bad_samples: 3,
            ..Default::default()
        };
        // Changed after indexing: the whole shard is refused, by name.
        let mut changed = Loader::open(&uri, cfg.clone()).await.unwrap();
        let err = changed
            .run_epoch(Cursor::default(), |_| true)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("shard ")
                && err.contains("shard-000000.tar: sha256 ")
                && err.contains("does not match the index's"),
            "{err}"
        );
        // Written corrupt by its writer (the index records these bytes): samples are skipped.
        reindex(dir.path(), &bytes);
        let mut loader = Loader::open(&uri, cfg.clone()).await.unwrap();
        let mut n = 0;
        loader
            .run_epoch(Cursor::default(), |b| {
                assert_eq!(b.keys.len(), 4, "short batches are padded");
                n += 1;
                true
            })
            .await
            .unwrap();
        assert_eq!((n, loader.bad_samples), (3, 3));
        let mut strict = Loader::open(
            &uri,
            LoaderConfig {
                max_bad_samples: 2,
                ..cfg
            },
        )
        .await
        .unwrap();
        let err = strict
            .run_epoch(Cursor::default(), |_| true)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("shard shard-000000.tar: more than 2 corrupt samples"),
            "{err}"
        );
    }
}
