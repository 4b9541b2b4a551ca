//! A shard spooled to local disk for the loader: streamed from the store chunk by chunk into an
//! unlinked temporary file while its sha256 is computed, then indexed by member offsets, so that
//! any sample can be read and decoded on its own, in any order, by any thread.
//!
//! Why a file and not memory: an epoch visits a shard's samples in a permuted order, so every
//! sample must stay reachable until the shard is done. Held in memory, a shard's bytes (or worse,
//! its decoded images) make the loader's memory grow with the shard size; spooled, the loader
//! holds one write batch of the download and the samples in flight, whatever the shard size, and
//! the disk holds the rest (MosaicML Streaming keeps shards on local disk for the same reason).
//! The file is unlinked at creation, so a crash leaves nothing behind.
//!
//! A shard is usable only once all of it has arrived and matched the index's sha256: no sample
//! of a shard that changed after it was indexed is ever decoded.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use futures::StreamExt;
use sha2::Digest;

use crate::index::ShardEntry;
use crate::shard::{self, BadSample, MAX_REPORT_BYTES, Members, Sample, member_header};
use crate::store::Location;
use crate::{Error, Result};

/// Bytes of the download held before they are written out: the loader's only buffer that
/// scales with anything but the batch.
const WRITE_BATCH: usize = 4 << 20;

/// Members a shard may hold per sample its index entry announces (png, json, txt, and room for
/// members of other kinds), plus a few: a hostile shard of millions of tiny members is refused
/// before its member table outgrows what the index promised.
const MEMBERS_PER_SAMPLE: u64 = 8;

/// Where one member's bytes are in the spool file.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Span {
    offset: u64,
    len: u64,
}

/// The members of one sample, by where they are.
type SampleSpans = Members<Span>;

/// One verified shard on local disk, with where each sample's members are.
#[derive(Debug)]
pub struct SpooledShard {
    name: String,
    file: File,
    samples: Vec<SampleSpans>,
}

/// The download so far: the spool file, the running digest, and for messages the shard's URI
/// and the spool folder.
struct Sink {
    file: File,
    hasher: sha2::Sha256,
    uri: String,
    dir: String,
}

impl Sink {
    /// Writes and hashes `chunks` off the async workers.
    async fn write(mut self, chunks: Vec<bytes::Bytes>) -> Result<Sink> {
        if chunks.is_empty() {
            return Ok(self);
        }
        let uri = self.uri.clone();
        tokio::task::spawn_blocking(move || {
            for c in &chunks {
                self.file.write_all(c).map_err(|source| Error::Io {
                    path: self.dir.clone(),
                    source,
                })?;
                self.hasher.update(c);
            }
            Ok(self)
        })
        .await
        .map_err(|e| stopped(uri, "spooling", e))?
    }
}

/// A spool task that did not finish (it panicked or the runtime is shutting down).
fn stopped(uri: String, what: &str, e: tokio::task::JoinError) -> Error {
    Error::Shard {
        shard: uri,
        reason: format!("{what} stopped: {e}"),
    }
}

impl SpooledShard {
    /// Streams `entry` from `loc` into a new file in `dir`, checks it against the index's
    /// sha256 and indexes its members. Ok(None) when the store has no such object.
    pub async fn fetch(loc: &Location, entry: &ShardEntry, dir: &Path) -> Result<Option<Self>> {
        let Some(mut chunks) = loc.get_stream(&entry.name, entry.bytes).await? else {
            return Ok(None);
        };
        let dir_name = dir.display().to_string();
        let file = tempfile::tempfile_in(dir).map_err(|source| Error::Io {
            path: dir_name.clone(),
            source,
        })?;
        let mut sink = Sink {
            file,
            hasher: sha2::Sha256::new(),
            uri: loc.child_uri(&entry.name),
            dir: dir_name,
        };
        let (mut held, mut held_bytes) = (Vec::new(), 0);
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk?;
            held_bytes += chunk.len();
            held.push(chunk);
            if held_bytes >= WRITE_BATCH {
                sink = sink.write(std::mem::take(&mut held)).await?;
                held_bytes = 0;
            }
        }
        let sink = sink.write(held).await?;
        let (entry, uri) = (entry.clone(), sink.uri.clone());
        tokio::task::spawn_blocking(move || Self::verified(sink, &entry).map(Some))
            .await
            .map_err(|e| stopped(uri, "indexing", e))?
    }

    /// The spooled shard once its digest matches; then its members are indexed.
    fn verified(sink: Sink, entry: &ShardEntry) -> Result<Self> {
        let digest = hex::encode(sink.hasher.finalize());
        check_digest(entry, &digest, &sink.uri)?;
        let io = |source| Error::Io {
            path: sink.dir.clone(),
            source,
        };
        let len = sink.file.metadata().map_err(io)?.len();
        (&sink.file).seek(SeekFrom::Start(0)).map_err(io)?;
        let most = entry.samples.saturating_mul(MEMBERS_PER_SAMPLE) + 64;
        let samples = index_members(&sink.file, len, &entry.name, most)?;
        Ok(SpooledShard {
            name: entry.name.clone(),
            file: sink.file,
            samples,
        })
    }

    /// Samples found in the shard.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether the shard holds no sample.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Reads and decodes sample `i` (in shard order); a sample that is missing, incomplete or
    /// corrupt is a [`BadSample`] saying why. Safe to call from many threads at once.
    pub fn sample(&self, i: u64) -> std::result::Result<Sample, BadSample> {
        let Some(spans) = self.samples.get(i as usize) else {
            return Err(BadSample {
                key: format!("#{i}"),
                reason: format!("the shard holds only {} samples", self.samples.len()),
            });
        };
        let bad = |reason: String| BadSample {
            key: spans.key.clone(),
            reason,
        };
        if let Some(t) = spans.txt.filter(|t| t.len > MAX_REPORT_BYTES as u64) {
            return Err(bad(format!(
                "report of {} bytes, more than the limit of {MAX_REPORT_BYTES}",
                t.len
            )));
        }
        let read = |span: Option<Span>| -> std::result::Result<Option<Vec<u8>>, BadSample> {
            let Some(span) = span else { return Ok(None) };
            let mut buf = vec![0; span.len as usize];
            self.file
                .read_exact_at(&mut buf, span.offset)
                .map_err(|e| bad(format!("reading the spooled shard: {e}")))?;
            Ok(Some(buf))
        };
        let members = Members {
            key: spans.key.clone(),
            png: read(spans.png)?,
            json: read(spans.json)?,
            txt: read(spans.txt)?,
        };
        shard::decode(&self.name, members)
    }
}

/// A shard must be the bytes the index recorded (its sha256): one changed after it was indexed
/// (edited, truncated, replaced) is a data error naming the shard, not a source of silently
/// different training data. Entries without a digest (written by other tools) are not checked.
fn check_digest(entry: &ShardEntry, actual: &str, uri: &str) -> Result<()> {
    if entry.sha256.is_empty() || actual.eq_ignore_ascii_case(&entry.sha256) {
        return Ok(());
    }
    Err(Error::Shard {
        shard: uri.to_string(),
        reason: format!(
            "sha256 {} does not match the index's {}: the shard changed after it was indexed",
            &actual[..12],
            &entry.sha256[..entry.sha256.len().min(12)]
        ),
    })
}

/// Walks the tar headers only (seeking over the data), grouping members into samples as
/// [`Members::gather`] does. A member that claims more than [`shard::MAX_MEMBER_BYTES`], runs past
/// the end of the file, or one member too many, breaks the shard.
fn index_members(file: &File, len: u64, shard: &str, most: u64) -> Result<Vec<SampleSpans>> {
    let broken = |reason: String| Error::Shard {
        shard: shard.to_string(),
        reason,
    };
    let mut archive = tar::Archive::new(file);
    let entries = archive
        .entries_with_seek()
        .map_err(|e| broken(e.to_string()))?;
    let (mut samples, mut pending) = (Vec::new(), None);
    for (n, entry) in entries.enumerate() {
        if n as u64 >= most {
            return Err(broken(format!(
                "more than {most} members, for the index's samples"
            )));
        }
        let entry = entry.map_err(|e| broken(e.to_string()))?;
        let (path, size) = member_header(&entry).map_err(broken)?;
        let span = Span {
            offset: entry.raw_file_position(),
            len: size,
        };
        if span.offset.saturating_add(span.len) > len {
            return Err(broken(format!(
                "member {path} runs past the end of the shard ({len} bytes): truncated"
            )));
        }
        if let Some(done) = Members::gather(&mut pending, &path, span) {
            samples.push(done);
        }
    }
    samples.extend(pending);
    Ok(samples)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::Stats;
    use crate::shard::ShardWriter;
    use crate::shard::tests::sample;

    fn entry(bytes: &[u8], samples: u64) -> ShardEntry {
        ShardEntry {
            seq: 0,
            name: "s.tar".into(),
            samples,
            bytes: bytes.len() as u64,
            sha256: hex::encode(sha2::Sha256::digest(bytes)),
            created: String::new(),
            stats: Stats::default(),
        }
    }

    async fn spool(bytes: &[u8], entry: &ShardEntry) -> Result<Option<SpooledShard>> {
        let store = tempfile::tempdir().unwrap();
        std::fs::write(store.path().join(&entry.name), bytes).unwrap();
        let loc = Location::open(&store.path().display().to_string()).unwrap();
        let spool = tempfile::tempdir().unwrap();
        SpooledShard::fetch(&loc, entry, spool.path()).await
    }

    fn shard_of(keys: &[&str]) -> (Vec<Sample>, Vec<u8>) {
        let samples: Vec<Sample> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| sample(k, i as u16 + 1))
            .collect();
        let mut w = ShardWriter::new();
        for s in &samples {
            w.add(s).unwrap();
        }
        (samples, w.finish().unwrap())
    }

    #[tokio::test]
    async fn a_spooled_shard_gives_each_sample_in_any_order_as_the_streaming_reader_does() {
        let (samples, bytes) = shard_of(&["a", "b", "c", "d"]);
        let shard = spool(&bytes, &entry(&bytes, 4)).await.unwrap().unwrap();
        assert_eq!(shard.len(), 4);
        for i in [3, 0, 2, 1, 3] {
            assert_eq!(shard.sample(i).unwrap(), samples[i as usize]);
        }
        let past = shard.sample(4).unwrap_err();
        assert_eq!(past.reason, "the shard holds only 4 samples");
    }

    #[tokio::test]
    async fn a_shard_changed_after_indexing_is_refused_by_name_before_any_sample_is_read() {
        let (_, bytes) = shard_of(&["a", "b"]);
        let indexed = entry(&bytes, 2);
        let mut changed = bytes.clone();
        changed[700] ^= 0xFF;
        let e = spool(&changed, &indexed).await.unwrap_err().to_string();
        assert!(
            e.contains("s.tar: sha256 ") && e.contains("does not match the index's"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_shard_larger_than_its_index_entry_is_refused_before_it_is_read() {
        let (_, bytes) = shard_of(&["a", "b"]);
        let mut small = entry(&bytes, 2);
        small.bytes = 1024;
        let e = spool(&bytes, &small).await.unwrap_err();
        assert!(
            matches!(e, Error::TooLarge { bytes: b, limit: 1024, .. } if b == bytes.len() as u64),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_truncated_shard_names_the_member_that_runs_past_its_end() {
        let (_, bytes) = shard_of(&["a", "b"]);
        let cut = &bytes[..bytes.len() / 2];
        let mut unchecked = entry(cut, 2);
        unchecked.sha256.clear();
        let e = spool(cut, &unchecked).await.unwrap_err().to_string();
        assert!(
            e.starts_with("shard s.tar: member ") && e.contains("truncated"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn more_members_than_the_index_allows_break_the_shard() {
        let mut w = ShardWriter::new();
        for i in 0..200 {
            w.add(&sample(&format!("k{i}"), 1)).unwrap();
        }
        let bytes = w.finish().unwrap();
        let e = spool(&bytes, &entry(&bytes, 1))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("more than 72 members"), "{e}");
    }

    #[tokio::test]
    async fn a_missing_object_is_none_and_a_corrupt_sample_is_a_bad_sample_not_a_broken_shard() {
        let (_, bytes) = shard_of(&["a"]);
        let mut gone = entry(&bytes, 1);
        gone.name = "gone.tar".into();
        let store = tempfile::tempdir().unwrap();
        let loc = Location::open(&store.path().display().to_string()).unwrap();
        assert!(
            SpooledShard::fetch(&loc, &gone, store.path())
                .await
                .unwrap()
                .is_none()
        );
        let mut w = ShardWriter::new();
        w.add(&sample("a", 1)).unwrap();
        w.member("b.png", b"not a png").unwrap();
        w.member("b.json", br#"{"width":16,"height":12}"#).unwrap();
        w.member("c.txt", &vec![b'x'; MAX_REPORT_BYTES + 1])
            .unwrap();
        let bytes = w.finish().unwrap();
        let shard = spool(&bytes, &entry(&bytes, 3)).await.unwrap().unwrap();
        assert!(shard.sample(0).is_ok());
        assert_eq!(shard.sample(1).unwrap_err().key, "b");
        assert!(
            shard
                .sample(2)
                .unwrap_err()
                .reason
                .contains("more than the limit"),
            "a report over the limit is refused before it is read"
        );
    }
}
