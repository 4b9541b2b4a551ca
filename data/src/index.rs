//! The dataset index (`index.json` beside the shards).
//!
//! Append-only: shards get consecutive sequence numbers, and a new index is accepted only if it
//! keeps every existing entry unchanged, so continual training can ask for "the shards since
//! sequence N" and trust the answer. Shards are written with create-only puts before the index
//! names them; the index itself is replaced by one atomic put, so readers never see a partial
//! index or an entry whose shard is missing. An ingest killed between a shard and the index
//! leaves an unlisted shard; the next append adopts or replaces it ([`ORPHAN_GRACE`]).

use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::store::Location;
use crate::{Error, Result};

/// Version of the index format this code writes.
pub const FORMAT_VERSION: u32 = 1;
/// Object name of the index in a dataset folder.
pub const INDEX: &str = "index.json";
/// Largest index read (about a million shard entries).
pub const MAX_INDEX_BYTES: usize = 512 << 20;
/// Largest shard read (whole shards are held in memory while decoded).
pub const MAX_SHARD_BYTES: u64 = 4 << 30;
/// Fewest bytes a sample takes in a shard: two tar members (image and metadata) of a 512-byte
/// header and at least one 512-byte block each. An index claiming more samples than its shard's
/// bytes can hold is refused before the loader allocates the epoch's order.
pub const MIN_SAMPLE_BYTES: u64 = 2048;
/// Most samples one dataset may list.
pub const MAX_SAMPLES: u64 = 1 << 32;
/// Largest sidecar or other JSON document read beside the shards.
pub const MAX_DOCUMENT_BYTES: usize = 64 << 20;

/// How long an append waits for another ingest to list the shard it holds the next number with.
pub const APPEND_PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);
/// How old an unlisted shard must be before an append takes it for a dead ingest's and replaces
/// it (an ingest writes the index seconds after the shard).
pub const ORPHAN_GRACE: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// Running intensity statistics of physical pixel values.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct Stats {
    /// Pixels counted.
    pub pixels: u64,
    /// Sum of values.
    pub sum: f64,
    /// Sum of squared values.
    pub sum_sq: f64,
    /// Mean (derived, kept for readers).
    pub mean: f64,
    /// Standard deviation (derived, kept for readers).
    pub std: f64,
}

impl Stats {
    /// Adds the physical values of one image.
    pub fn add(&mut self, pixels: &[u16], slope: f64, intercept: f64) {
        for &p in pixels {
            let v = p as f64 * slope + intercept;
            self.sum += v;
            self.sum_sq += v * v;
        }
        self.pixels += pixels.len() as u64;
        self.derive();
    }

    /// Merges another running total.
    pub fn merge(&mut self, other: &Stats) {
        self.pixels += other.pixels;
        self.sum += other.sum;
        self.sum_sq += other.sum_sq;
        self.derive();
    }

    fn derive(&mut self) {
        if self.pixels > 0 {
            let n = self.pixels as f64;
            self.mean = self.sum / n;
            self.std = (self.sum_sq / n - self.mean * self.mean).max(0.0).sqrt();
        }
    }
}

/// One shard of the dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// Sequence number: 0, 1, 2, ... in the order shards landed.
    pub seq: u64,
    /// Object name in the dataset folder.
    pub name: String,
    /// Samples in the shard.
    pub samples: u64,
    /// Size in bytes.
    pub bytes: u64,
    /// sha256 of the shard's bytes, hex.
    pub sha256: String,
    /// When the shard landed (RFC 3339).
    pub created: String,
    /// Intensity statistics of the shard.
    pub stats: Stats,
}

/// The index of a dataset folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetIndex {
    /// Index format version.
    pub format_version: u32,
    /// Shards in sequence order.
    pub shards: Vec<ShardEntry>,
    /// Statistics over every shard.
    pub stats: Stats,
}

impl Default for DatasetIndex {
    fn default() -> Self {
        DatasetIndex {
            format_version: FORMAT_VERSION,
            shards: Vec::new(),
            stats: Stats::default(),
        }
    }
}

/// Shard object name of a sequence number.
pub fn shard_name(seq: u64) -> String {
    format!("shard-{seq:06}.tar")
}

/// Name of the sidecar listing the keyed source ids of an ingested shard.
pub fn sources_name(shard: &str) -> String {
    format!("{shard}.sources.json")
}

impl DatasetIndex {
    /// Loads the index of a dataset folder; an absent index is an empty dataset.
    pub async fn load(loc: &Location) -> Result<DatasetIndex> {
        match loc.get_bounded(INDEX, MAX_INDEX_BYTES).await? {
            None => Ok(DatasetIndex::default()),
            Some(bytes) => {
                let index: DatasetIndex =
                    serde_json::from_slice(&bytes).map_err(|e| Error::Index {
                        uri: loc.child_uri(INDEX),
                        reason: e.to_string(),
                    })?;
                index.validate().map_err(|reason| Error::Index {
                    uri: loc.child_uri(INDEX),
                    reason,
                })?;
                Ok(index)
            }
        }
    }

    /// Checks the invariants: a known format, consecutive sequence numbers from 0, sizes within
    /// [`MAX_SHARD_BYTES`], sample counts that the shard's bytes can hold ([`MIN_SAMPLE_BYTES`])
    /// and at most [`MAX_SAMPLES`] in all.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.format_version != FORMAT_VERSION {
            return Err(format!(
                "format_version {} is not supported (expected {FORMAT_VERSION})",
                self.format_version
            ));
        }
        for (i, s) in self.shards.iter().enumerate() {
            if s.seq != i as u64 {
                return Err(format!("shards[{i}].seq is {} (expected {i})", s.seq));
            }
            if s.bytes > MAX_SHARD_BYTES {
                return Err(format!(
                    "shards[{i}].bytes is {} (more than the limit of {MAX_SHARD_BYTES})",
                    s.bytes
                ));
            }
            if s.samples > s.bytes / MIN_SAMPLE_BYTES {
                return Err(format!(
                    "shards[{i}].samples is {}, more than {} bytes can hold",
                    s.samples, s.bytes
                ));
            }
        }
        let total: u64 = self.shards.iter().map(|s| s.samples).sum();
        if total > MAX_SAMPLES {
            return Err(format!(
                "{total} samples in all (more than the limit of {MAX_SAMPLES})"
            ));
        }
        Ok(())
    }

    /// Total samples.
    pub fn samples(&self) -> u64 {
        self.shards.iter().map(|s| s.samples).sum()
    }

    /// Shards whose sequence number is >= `seq`.
    pub fn since(&self, seq: u64) -> &[ShardEntry] {
        let start = self
            .shards
            .iter()
            .position(|s| s.seq >= seq)
            .unwrap_or(self.shards.len());
        &self.shards[start..]
    }

    /// A shard object exists at the name the next append takes but the index does not list it:
    /// an ingest died between writing it and updating the index, or another ingest is between
    /// the two right now. The same bytes are adopted (a re-run of the same inputs writes the same
    /// shard: headers are deterministic); different bytes older than [`ORPHAN_GRACE`] are a dead
    /// ingest's and are replaced; anything else is refused, naming the object.
    async fn recover_orphan(loc: &Location, name: &str, tar: &bytes::Bytes) -> Result<()> {
        let refuse = |reason: String| Error::Index {
            uri: loc.child_uri(name),
            reason,
        };
        let Some(meta) = loc.head_opt(name).await? else {
            return Err(refuse(
                "appeared and vanished while this ingest wrote it".into(),
            ));
        };
        if meta.size == tar.len() as u64
            && let Some(theirs) = loc.get_bounded(name, tar.len()).await?
            && sha2::Sha256::digest(&theirs) == sha2::Sha256::digest(tar)
        {
            return Ok(());
        }
        let age = jiff::Timestamp::now().as_second() - meta.last_modified.timestamp();
        if age < ORPHAN_GRACE.as_secs() as i64 {
            return Err(refuse(format!(
                "a shard with this sequence number exists but the index does not list it; another \
                 ingest may be writing it (written {age} s ago): run again in {} min, when an \
                 orphan this old is taken for a dead ingest's and replaced",
                ORPHAN_GRACE.as_secs() / 60
            )));
        }
        loc.delete(&sources_name(name)).await?;
        loc.delete(name).await?;
        if !loc.put_new(name, tar.clone()).await? {
            return Err(refuse("another ingest replaced the orphan first".into()));
        }
        Ok(())
    }

    /// Writes a new shard (create-only: an existing object is never overwritten) and appends it
    /// to the index with one atomic put. The shard's name is the index slot: whoever creates
    /// `shard-N` is the only writer that may list it, so concurrent ingests take turns (one
    /// waits, up to [`APPEND_PATIENCE`], until the other's index names its shard, then takes the
    /// next number) and every shard is kept. Non-empty `sources` (keyed ids of the inputs) go to
    /// the shard's sidecar before the index names the shard, so a crash in between only repeats
    /// work. Returns the new entry.
    pub async fn append_shard(
        loc: &Location,
        tar: Vec<u8>,
        samples: u64,
        stats: Stats,
        sources: &[&String],
    ) -> Result<ShardEntry> {
        Self::append_waiting(loc, tar, samples, stats, sources, APPEND_PATIENCE).await
    }

    /// [`DatasetIndex::append_shard`], waiting at most `patience` for a held slot.
    async fn append_waiting(
        loc: &Location,
        tar: Vec<u8>,
        samples: u64,
        stats: Stats,
        sources: &[&String],
        patience: std::time::Duration,
    ) -> Result<ShardEntry> {
        loc.require_conditional_writes().await?;
        let sha256 = hex::encode(sha2::Sha256::digest(&tar));
        let tar = bytes::Bytes::from(tar);
        let started = std::time::Instant::now();
        let mut pause = std::time::Duration::from_millis(50);
        let (mut index, seq, name) = loop {
            let index = DatasetIndex::load(loc).await?;
            let seq = index.shards.len() as u64;
            let name = shard_name(seq);
            if loc.put_new(&name, tar.clone()).await? {
                break (index, seq, name);
            }
            match Self::recover_orphan(loc, &name, &tar).await {
                Ok(()) => break (index, seq, name),
                Err(_) if started.elapsed() < patience => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(std::time::Duration::from_secs(2));
                }
                Err(e) => return Err(e),
            }
        };
        let entry = ShardEntry {
            seq,
            name: name.clone(),
            samples,
            bytes: tar.len() as u64,
            sha256,
            created: jiff::Timestamp::now().to_string(),
            stats,
        };
        if !sources.is_empty() {
            let ids = serde_json::to_vec(sources).expect("strings serialize");
            loc.put(&sources_name(&name), ids).await?;
        }
        // Another writer that appended meanwhile makes this no longer an append.
        if DatasetIndex::load(loc).await?.shards != index.shards {
            return Err(Error::Index {
                uri: loc.child_uri(INDEX),
                reason: "the index changed while a shard was written; not an append".into(),
            });
        }
        index.shards.push(entry.clone());
        index.stats.merge(&entry.stats);
        loc.put(
            INDEX,
            serde_json::to_vec_pretty(&index).expect("index serializes"),
        )
        .await?;
        Ok(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shards_append_with_consecutive_sequence_numbers_and_merged_stats() {
        let dir = tempfile::tempdir().unwrap();
        let loc = Location::open(&format!("file://{}/ds", dir.path().display())).unwrap();
        assert_eq!(DatasetIndex::load(&loc).await.unwrap().shards.len(), 0);
        let mut s1 = Stats::default();
        s1.add(&[0, 2], 1.0, 0.0);
        let mut s2 = Stats::default();
        s2.add(&[4, 6], 1.0, -1.0);
        DatasetIndex::append_shard(&loc, b"tar-one".to_vec(), 0, s1, &[])
            .await
            .unwrap();
        let e = DatasetIndex::append_shard(&loc, b"tar-two".to_vec(), 0, s2, &[])
            .await
            .unwrap();
        assert_eq!((e.seq, e.name.as_str()), (1, "shard-000001.tar"));
        let index = DatasetIndex::load(&loc).await.unwrap();
        assert_eq!(index.shards.len(), 2);
        assert_eq!(index.since(1).len(), 1);
        assert_eq!(index.since(5).len(), 0);
        assert_eq!(index.stats.pixels, 4);
        assert!((index.stats.mean - 2.5).abs() < 1e-12);
        assert_eq!(
            index.shards[0].sha256,
            hex::encode(sha2::Sha256::digest(b"tar-one"))
        );
        assert_eq!(
            std::fs::read(dir.path().join("ds/shard-000001.tar")).unwrap(),
            b"tar-two"
        );
    }

    #[tokio::test]
    async fn an_unlisted_shard_object_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let loc = Location::open(dir.path().to_str().unwrap()).unwrap();
        std::fs::write(dir.path().join("shard-000000.tar"), b"someone else's").unwrap();
        let patience = std::time::Duration::from_millis(300);
        let err = DatasetIndex::append_waiting(
            &loc,
            b"mine".to_vec(),
            0,
            Stats::default(),
            &[],
            patience,
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("shard-000000.tar") && err.contains("another ingest"),
            "{err}"
        );
        assert_eq!(
            std::fs::read(dir.path().join("shard-000000.tar")).unwrap(),
            b"someone else's"
        );
    }

    #[tokio::test]
    async fn an_ingest_killed_between_shard_and_index_resumes_without_repair() {
        let dir = tempfile::tempdir().unwrap();
        let loc = Location::open(dir.path().to_str().unwrap()).unwrap();
        DatasetIndex::append_shard(&loc, b"first".to_vec(), 0, Stats::default(), &[])
            .await
            .unwrap();
        // Killed after writing shard 1, before the index named it.
        std::fs::write(dir.path().join("shard-000001.tar"), b"second").unwrap();
        // The re-run writes the same shard: adopted.
        let e = DatasetIndex::append_shard(&loc, b"second".to_vec(), 0, Stats::default(), &[])
            .await
            .unwrap();
        assert_eq!(e.name, "shard-000001.tar");
        // Killed again, and the re-run's shard differs (inputs changed meanwhile): while the
        // orphan is fresh it may be a live ingest's, so it is refused; once stale, replaced.
        let orphan = dir.path().join("shard-000002.tar");
        std::fs::write(&orphan, b"half-done").unwrap();
        let refused = DatasetIndex::append_waiting(
            &loc,
            b"third".to_vec(),
            0,
            Stats::default(),
            &[],
            std::time::Duration::ZERO,
        )
        .await;
        let text = refused.unwrap_err().to_string();
        assert!(
            text.contains("shard-000002.tar") && text.contains("run again"),
            "{text}"
        );
        let an_hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        std::fs::File::options()
            .write(true)
            .open(&orphan)
            .unwrap()
            .set_modified(an_hour_ago)
            .unwrap();
        DatasetIndex::append_shard(&loc, b"third".to_vec(), 0, Stats::default(), &[])
            .await
            .unwrap();
        let index = DatasetIndex::load(&loc).await.unwrap();
        assert_eq!(index.shards.len(), 3);
        assert_eq!(std::fs::read(&orphan).unwrap(), b"third");
        assert_eq!(
            index.shards[2].sha256,
            hex::encode(sha2::Sha256::digest(b"third"))
        );
    }

    #[tokio::test]
    async fn an_index_claiming_more_than_its_shards_can_hold_is_refused_before_any_allocation() {
        let dir = tempfile::tempdir().unwrap();
        let loc = Location::open(dir.path().to_str().unwrap()).unwrap();
        let entry = |samples: u64, bytes: u64| ShardEntry {
            seq: 0,
            name: shard_name(0),
            samples,
            bytes,
            sha256: "00".into(),
            created: String::new(),
            stats: Stats::default(),
        };
        for (shard, needle) in [
            (entry(1 << 40, 4096), "shards[0].samples"),
            (entry(1, MAX_SHARD_BYTES + 1), "shards[0].bytes"),
        ] {
            let index = DatasetIndex {
                shards: vec![shard],
                ..Default::default()
            };
            std::fs::write(
                dir.path().join("index.json"),
                serde_json::to_vec(&index).unwrap(),
            )
            .unwrap();
            let err = DatasetIndex::load(&loc).await.unwrap_err().to_string();
            assert!(err.contains("index.json") && err.contains(needle), "{err}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_ingests_take_turns_and_keep_every_shard() {
        let dir = tempfile::tempdir().unwrap();
        let loc = Location::open(dir.path().to_str().unwrap()).unwrap();
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let loc = loc.clone();
                tokio::spawn(async move {
                    for k in 0..3 {
                        let body = format!("writer {w} shard {k}").into_bytes();
                        DatasetIndex::append_shard(&loc, body, 0, Stats::default(), &[])
                            .await
                            .unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.await.unwrap();
        }
        let index = DatasetIndex::load(&loc).await.unwrap();
        assert_eq!(index.shards.len(), 12);
        let mut bodies: Vec<String> = index
            .shards
            .iter()
            .map(|s| String::from_utf8(std::fs::read(dir.path().join(&s.name)).unwrap()).unwrap())
            .collect();
        bodies.sort();
        bodies.dedup();
        assert_eq!(
            bodies.len(),
            12,
            "every writer's every shard, once: {bodies:?}"
        );
    }

    #[tokio::test]
    async fn a_corrupt_index_names_itself() {
        let dir = tempfile::tempdir().unwrap();
        let loc = Location::open(dir.path().to_str().unwrap()).unwrap();
        std::fs::write(
            dir.path().join("index.json"),
            br#"{"format_version":1,"shards":[{"seq":3}]}"#,
        )
        .unwrap();
        let err = DatasetIndex::load(&loc).await.unwrap_err().to_string();
        assert!(err.contains("index.json"), "{err}");
    }
}
