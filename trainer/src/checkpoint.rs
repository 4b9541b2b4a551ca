//! Checkpoints on any object store, committed atomically.
//!
//! Layout under the checkpoint URI:
//!
//! ```text
//! step-000000500/model.safetensors      every model variable (encoder.*, decoder.*)
//! step-000000500/optimizer.safetensors  AdamW moments (m.<name>, v.<name>)
//! manifests/step-000000500.json         written last: the commit
//! ```
//!
//! Data objects go first and the manifest last, so a crash mid-write leaves objects no manifest
//! names; readers trust only manifests, check every object's size and sha256 against it, and fall
//! back to the next older manifest when one does not verify. Pruning deletes a manifest before
//! its objects, so a reader never follows a manifest into deleted data.

use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use radfm_data::loader::Cursor;
use radfm_data::store::Location;

use crate::{Error, Result};

/// Version of the manifest format this code writes.
pub const FORMAT_VERSION: u32 = 1;
/// Folder of the manifests.
pub const MANIFESTS: &str = "manifests";

/// Name of the data folder of a step.
pub fn step_dir(step: i64) -> String {
    format!("step-{step:09}")
}

/// One object of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObjectRef {
    /// Name relative to the checkpoint URI.
    pub name: String,
    /// Size in bytes.
    pub bytes: u64,
    /// sha256 of the content, hex.
    pub sha256: String,
}

/// What the dataset looked like when training started (for lineage and normalisation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct DataRef {
    /// Dataset folder URI.
    pub uri: String,
    /// First shard sequence number trained on.
    pub first_seq: u64,
    /// Last shard sequence number trained on.
    pub last_seq: u64,
    /// Shards trained on.
    pub shards: usize,
    /// The shard selection (`0-9,12`) when not every shard of the index was used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selection: Option<String>,
    /// Samples in those shards.
    pub samples: u64,
    /// Intensity mean used for normalisation.
    pub mean: f64,
    /// Intensity standard deviation used for normalisation.
    pub std: f64,
}

/// Longest loss history kept in a checkpoint.
pub const MAX_LOSS_POINTS: usize = 512;

/// Appends a point to a loss history, halving its resolution when it grows past
/// [`MAX_LOSS_POINTS`] (every other point kept, the newest always).
pub fn record_loss(history: &mut Vec<(i64, f64)>, step: i64, loss: f64) {
    history.push((step, loss));
    if history.len() > MAX_LOSS_POINTS {
        let last = *history.last().expect("just pushed");
        let mut i = 0;
        history.retain(|_| {
            i += 1;
            i % 2 == 1
        });
        if history.last() != Some(&last) {
            history.push(last);
        }
    }
}

/// Training state besides the tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps completed.
    pub step: i64,
    /// Total steps of the run.
    pub total_steps: i64,
    /// Data position after the last consumed batch.
    pub cursor: Cursor,
    /// AdamW updates applied (differs from `step` when non-finite steps were skipped).
    pub adam_steps: i64,
    /// Consecutive non-finite losses before this step.
    pub nonfinite_streak: u32,
    /// RNG state. Masking noise is drawn after reseeding libtorch's generator with
    /// `mask_seed(seed, step, micro, rank)`, and data order and augmentations derive from
    /// (seed, epoch, position), so the seed and the counters above are the whole RNG state.
    pub rng: String,
    /// Mean loss of the last logged window.
    pub loss: Option<f64>,
    /// (step, mean loss) of every logged window of the run so far, across resumes; thinned to
    /// at most [`MAX_LOSS_POINTS`] points (the loss curve of the model card and the record).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loss_history: Vec<(i64, f64)>,
    /// The dataset.
    pub data: DataRef,
    /// The resolved configuration of the run.
    pub config: serde_json::Value,
    /// radfm version that wrote it.
    pub code_version: String,
}

/// A committed checkpoint's manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format version.
    pub format_version: u32,
    /// Optimizer steps completed.
    pub step: i64,
    /// When it was committed (RFC 3339).
    pub created: String,
    /// The objects, verified on load.
    pub objects: Vec<ObjectRef>,
    /// Training state.
    pub state: TrainState,
}

/// A loaded checkpoint.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// Its manifest.
    pub manifest: Manifest,
    /// Its objects' bytes by name (`model.safetensors`, `optimizer.safetensors`).
    pub objects: Vec<(String, bytes::Bytes)>,
    /// URI of the manifest.
    pub uri: String,
}

impl Loaded {
    /// The bytes of an object by its file name.
    pub fn object(&self, file: &str) -> Result<&bytes::Bytes> {
        self.objects
            .iter()
            .find(|(n, _)| n.ends_with(&format!("/{file}")))
            .map(|(_, b)| b)
            .ok_or_else(|| Error::Checkpoint {
                uri: self.uri.clone(),
                reason: format!("names no {file}"),
            })
    }
}

fn sha256(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// Writes `files` (name, bytes) for `state.step` and commits them with a manifest; returns the
/// manifest's URI.
pub async fn save(
    loc: &Location,
    state: TrainState,
    files: Vec<(&str, Vec<u8>)>,
) -> Result<String> {
    let dir = step_dir(state.step);
    let mut objects = Vec::new();
    for (file, data) in files {
        let name = format!("{dir}/{file}");
        objects.push(ObjectRef {
            name: name.clone(),
            bytes: data.len() as u64,
            sha256: sha256(&data),
        });
        loc.put(&name, data).await?;
    }
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        step: state.step,
        created: jiff::Timestamp::now().to_string(),
        objects,
        state,
    };
    let name = format!("{MANIFESTS}/{dir}.json");
    let body = serde_json::to_vec_pretty(&manifest).expect("manifests serialise");
    loc.put(&name, body).await?;
    Ok(loc.child_uri(&name))
}

/// Steps of the committed checkpoints, newest first.
pub async fn committed(loc: &Location) -> Result<Vec<i64>> {
    let prefix = loc.child(MANIFESTS);
    let metas: Vec<object_store::ObjectMeta> = loc
        .store
        .list(Some(&prefix))
        .try_collect()
        .await
        .map_err(|e| store_err(loc, MANIFESTS, e))?;
    let mut steps: Vec<i64> = metas
        .iter()
        .filter_map(|m| m.location.filename())
        .filter_map(|f| f.strip_prefix("step-")?.strip_suffix(".json")?.parse().ok())
        .collect();
    steps.sort_unstable_by(|a, b| b.cmp(a));
    Ok(steps)
}

fn store_err(loc: &Location, name: &str, e: object_store::Error) -> Error {
    Error::Data(radfm_data::Error::Store {
        uri: loc.child_uri(name),
        source: e,
    })
}

/// Loads and verifies the checkpoint of `step`.
pub async fn load_step(loc: &Location, step: i64) -> Result<Loaded> {
    let name = format!("{MANIFESTS}/{}.json", step_dir(step));
    let uri = loc.child_uri(&name);
    let bad = |reason: String| Error::Checkpoint {
        uri: uri.clone(),
        reason,
    };
    let body = loc
        .get_opt(&name)
        .await?
        .ok_or_else(|| bad("not found".into()))?;
    let manifest: Manifest =
        serde_json::from_slice(&body).map_err(|e| bad(format!("unreadable manifest: {e}")))?;
    if manifest.format_version > FORMAT_VERSION {
        return Err(bad(format!(
            "format version {} is newer than this trainer's {FORMAT_VERSION}",
            manifest.format_version
        )));
    }
    let mut objects = Vec::new();
    for o in &manifest.objects {
        let data = loc
            .get_opt(&o.name)
            .await?
            .ok_or_else(|| bad(format!("{} is missing", o.name)))?;
        if data.len() as u64 != o.bytes || sha256(&data) != o.sha256 {
            return Err(bad(format!(
                "{} does not match its manifest (size or sha256)",
                o.name
            )));
        }
        objects.push((o.name.clone(), data));
    }
    Ok(Loaded {
        manifest,
        objects,
        uri,
    })
}

/// The newest checkpoint that verifies, skipping (and reporting through `warn`) broken ones;
/// None when there is none.
pub async fn load_latest(loc: &Location, mut warn: impl FnMut(&Error)) -> Result<Option<Loaded>> {
    for step in committed(loc).await? {
        match load_step(loc, step).await {
            Ok(l) => return Ok(Some(l)),
            Err(e @ Error::Checkpoint { .. }) => warn(&e),
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// Keeps the newest `keep` committed checkpoints: deletes older manifests, then their data, then
/// data folders older than the newest commit that no manifest names (left by crashed writes).
/// Returns the steps whose checkpoints were deleted.
pub async fn prune(loc: &Location, keep: usize) -> Result<Vec<i64>> {
    let steps = committed(loc).await?;
    let Some(&newest) = steps.first() else {
        return Ok(Vec::new());
    };
    let kept: Vec<i64> = steps.iter().take(keep.max(1)).copied().collect();
    let mut deleted = Vec::new();
    for &step in steps.iter().skip(keep.max(1)) {
        let name = format!("{MANIFESTS}/{}.json", step_dir(step));
        delete(loc, &name).await?;
        deleted.push(step);
    }
    let metas: Vec<object_store::ObjectMeta> = loc
        .store
        .list(Some(&loc.prefix))
        .try_collect()
        .await
        .map_err(|e| store_err(loc, "", e))?;
    for m in metas {
        let rel: Vec<String> = m
            .location
            .prefix_match(&loc.prefix)
            .map(|p| p.map(|s| s.as_ref().to_string()).collect())
            .unwrap_or_default();
        let Some(step) = rel
            .first()
            .and_then(|d| d.strip_prefix("step-"))
            .and_then(|s| s.parse::<i64>().ok())
        else {
            continue;
        };
        if rel.len() >= 2 && !kept.contains(&step) && step < newest {
            delete(loc, &rel.join("/")).await?;
            if !deleted.contains(&step) {
                deleted.push(step);
            }
        }
    }
    deleted.sort_unstable();
    Ok(deleted)
}

async fn delete(loc: &Location, name: &str) -> Result<()> {
    Ok(loc.delete(name).await?)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn loss_history_is_thinned_to_a_bounded_curve_keeping_the_newest_point() {
        let mut h = Vec::new();
        for step in 1..=2000 {
            record_loss(&mut h, step, 1.0 / step as f64);
        }
        assert!(h.len() <= MAX_LOSS_POINTS + 1, "{}", h.len());
        assert!(h.len() > MAX_LOSS_POINTS / 4);
        assert_eq!(h.first().unwrap().0, 1);
        assert_eq!(h.last().unwrap().0, 2000);
        assert!(h.windows(2).all(|w| w[0].0 < w[1].0));
    }

    pub(crate) fn state(step: i64) -> TrainState {
        TrainState {
            loss_history: Vec::new(),
            step,
            total_steps: 100,
            cursor: Cursor {
                epoch: 0,
                position: step as u64 * 4,
            },
            adam_steps: step,
            nonfinite_streak: 0,
            rng: "test".into(),
            loss: Some(1.0),
            data: DataRef::default(),
            config: serde_json::json!({}),
            code_version: "test".into(),
        }
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn newest_committed_checkpoint_wins_and_uncommitted_data_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let loc = Location::open(dir.path().to_str().unwrap()).unwrap();
        rt().block_on(async {
            assert!(load_latest(&loc, |_| ()).await.unwrap().is_none());
            save(
                &loc,
                state(5),
                vec![("model.safetensors", b"five".to_vec())],
            )
            .await
            .unwrap();
            save(
                &loc,
                state(10),
                vec![("model.safetensors", b"ten".to_vec())],
            )
            .await
            .unwrap();
            // A crash after the data of step 15 but before its manifest.
            loc.put("step-000000015/model.safetensors", b"half".to_vec())
                .await
                .unwrap();
            let l = load_latest(&loc, |_| ()).await.unwrap().unwrap();
            assert_eq!(l.manifest.step, 10);
            assert_eq!(&l.object("model.safetensors").unwrap()[..], b"ten");
        });
    }

    #[test]
    fn a_corrupted_checkpoint_falls_back_to_the_previous_one() {
        let dir = tempfile::tempdir().unwrap();
        let loc = Location::open(dir.path().to_str().unwrap()).unwrap();
        rt().block_on(async {
            save(
                &loc,
                state(5),
                vec![("model.safetensors", b"five".to_vec())],
            )
            .await
            .unwrap();
            save(
                &loc,
                state(10),
                vec![("model.safetensors", b"ten".to_vec())],
            )
            .await
            .unwrap();
            loc.put("step-000000010/model.safetensors", b"tan".to_vec())
                .await
                .unwrap();
            let mut warnings = Vec::new();
            let l = load_latest(&loc, |e| warnings.push(e.to_string()))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(l.manifest.step, 5);
            assert_eq!(warnings.len(), 1);
            assert!(
                warnings[0].contains("does not match its manifest"),
                "{warnings:?}"
            );
        });
    }

    #[test]
    fn pruning_keeps_the_newest_and_removes_orphans() {
        let dir = tempfile::tempdir().unwrap();
        let loc = Location::open(dir.path().to_str().unwrap()).unwrap();
        rt().block_on(async {
            for s in [5, 10, 15] {
                save(&loc, state(s), vec![("model.safetensors", vec![1, 2, 3])])
                    .await
                    .unwrap();
            }
            loc.put("step-000000012/model.safetensors", vec![0])
                .await
                .unwrap();
            loc.put("step-000000020/model.safetensors", vec![0])
                .await
                .unwrap();
            let deleted = prune(&loc, 2).await.unwrap();
            assert_eq!(deleted, [5, 12]);
            assert_eq!(committed(&loc).await.unwrap(), [15, 10]);
            assert!(
                !dir.path()
                    .join("step-000000005")
                    .join("model.safetensors")
                    .exists()
            );
            // Newer than the newest commit: may be a write in progress, kept.
            assert!(dir.path().join("step-000000020/model.safetensors").exists());
            assert!(load_step(&loc, 10).await.is_ok());
        });
    }
}
