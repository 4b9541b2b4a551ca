//! Checkpoints on any object store, committed atomically and fenced.
//!
//! Layout under the checkpoint URI:
//!
//! ```text
//! epochs/e000003.json                          a writer's claim: where it resumed from
//! step-000000500-e000003/model.safetensors     every model variable (encoder.*, decoder.*)
//! step-000000500-e000003/optimizer.safetensors AdamW moments (m.<name>, v.<name>)
//! manifests/step-000000500-e000003.json        written last: the commit
//! ```
//!
//! Data objects go first and the manifest last, so a crash mid-write leaves objects no manifest
//! names; readers trust only manifests, check every object's size and sha256 against it, and fall
//! back to the next older manifest when one does not verify. Pruning deletes a manifest before
//! its objects, so a reader never follows a manifest into deleted data.
//!
//! **Fencing.** A rank 0 that is still running after a newer gang started (a zombie on a
//! partitioned or force-deleted node) must not be able to change what the newer gang resumes
//! from. Every writer, after choosing its checkpoint, claims the next *epoch* with a create-only
//! write of a marker naming that checkpoint; the store orders the claims. A commit of epoch `e`
//! counts only if every marker of a later epoch resumed from it or from something newer: whatever
//! an older writer commits after a newer one chose is invisible to every reader, whenever it lands.
//! Writers check the markers before each commit and prune and stop with [`Error::Fenced`] once a
//! newer epoch exists, so a zombie neither commits nor deletes. Folders written before epochs
//! existed (`step-000000500/`) read as epoch 0.

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

/// Folder of the epoch markers.
pub const EPOCHS: &str = "epochs";
/// Tries at claiming an epoch before giving up (each lost try means another writer claimed one).
const MAX_CLAIMS: usize = 64;
/// Largest manifest or marker read (a hostile store cannot make a reader allocate more).
const MAX_METADATA_BYTES: usize = 64 << 20;

/// One commit: the step and the epoch of the writer that committed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CommitId {
    /// Optimizer steps completed.
    pub step: i64,
    /// The writer's epoch (0 for checkpoints written before epochs existed).
    pub epoch: u64,
}

impl CommitId {
    /// The data folder of this commit.
    pub fn dir(&self) -> String {
        match self.epoch {
            0 => format!("step-{:09}", self.step),
            e => format!("step-{:09}-e{e:06}", self.step),
        }
    }

    /// The manifest's object name.
    pub fn manifest(&self) -> String {
        format!("{MANIFESTS}/{}.json", self.dir())
    }

    /// The commit a data folder or manifest file stem names.
    pub fn parse(stem: &str) -> Option<CommitId> {
        let rest = stem.strip_prefix("step-")?;
        let (step, epoch) = match rest.split_once("-e") {
            Some((s, e)) => (s, e.parse().ok().filter(|&e| e > 0)?),
            None => (rest, 0),
        };
        Some(CommitId {
            step: step.parse().ok().filter(|&s: &i64| s >= 0)?,
            epoch,
        })
    }
}

impl std::fmt::Display for CommitId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "step {} (epoch {})", self.step, self.epoch)
    }
}

/// A writer's claim on the checkpoint folder, written once, create-only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMarker {
    /// The epoch claimed.
    pub epoch: u64,
    /// The commit the writer resumed from; None for a fresh start.
    pub resumed_from: Option<CommitId>,
    /// Who claimed it (job, attempt, pod), for people reading the folder.
    pub writer: String,
    /// When (RFC 3339).
    pub created: String,
}

/// Whether `commit` counts under `markers`: every later epoch resumed from it or from a newer
/// commit. A commit that lands after a later epoch chose something older is a zombie's.
pub fn counts(commit: CommitId, markers: &[EpochMarker]) -> bool {
    markers
        .iter()
        .filter(|m| m.epoch > commit.epoch)
        .all(|m| m.resumed_from.is_some_and(|r| commit <= r))
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
    /// The writer's epoch.
    #[serde(default)]
    pub epoch: u64,
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
    /// Which commit this is.
    pub fn id(&self) -> CommitId {
        CommitId {
            step: self.manifest.step,
            epoch: self.manifest.epoch,
        }
    }

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

fn marker_name(epoch: u64) -> String {
    format!("{EPOCHS}/e{epoch:06}.json")
}

fn bad(loc: &Location, name: &str, reason: impl Into<String>) -> Error {
    Error::Checkpoint {
        uri: loc.child_uri(name),
        reason: reason.into(),
    }
}

/// Every epoch marker of the folder, oldest first. A marker that does not parse, or whose name
/// and content disagree, is an error naming it: guessing could let a zombie's commit count.
pub async fn markers(loc: &Location) -> Result<Vec<EpochMarker>> {
    let mut out = Vec::new();
    for file in list_files(loc, EPOCHS).await? {
        let Some(epoch) = file
            .strip_prefix('e')
            .and_then(|f| f.strip_suffix(".json"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        let name = marker_name(epoch);
        let body = loc
            .get_bounded(&name, MAX_METADATA_BYTES)
            .await?
            .ok_or_else(|| bad(loc, &name, "listed but gone"))?;
        let marker: EpochMarker = serde_json::from_slice(&body)
            .map_err(|e| bad(loc, &name, format!("unreadable epoch marker: {e}")))?;
        if marker.epoch != epoch {
            return Err(bad(
                loc,
                &name,
                format!("names epoch {} in a file of epoch {epoch}", marker.epoch),
            ));
        }
        out.push(marker);
    }
    out.sort_by_key(|m| m.epoch);
    Ok(out)
}

/// File names directly under `folder` of the location.
async fn list_files(loc: &Location, folder: &str) -> Result<Vec<String>> {
    let prefix = loc.child(folder);
    let metas: Vec<object_store::ObjectMeta> = loc
        .store
        .list(Some(&prefix))
        .try_collect()
        .await
        .map_err(|e| store_err(loc, folder, e))?;
    Ok(metas
        .iter()
        .filter_map(|m| m.location.filename().map(str::to_string))
        .collect())
}

/// Every manifest in the folder, counting or not.
async fn manifests(loc: &Location) -> Result<Vec<CommitId>> {
    Ok(list_files(loc, MANIFESTS)
        .await?
        .iter()
        .filter_map(|f| CommitId::parse(f.strip_suffix(".json")?))
        .collect())
}

/// The commits that count under `markers`, newest first.
async fn counting(loc: &Location, markers: &[EpochMarker]) -> Result<Vec<CommitId>> {
    let mut ids: Vec<CommitId> = manifests(loc)
        .await?
        .into_iter()
        .filter(|&id| counts(id, markers))
        .collect();
    ids.sort_unstable_by(|a, b| b.cmp(a));
    Ok(ids)
}

/// The commits that count, newest first.
pub async fn committed(loc: &Location) -> Result<Vec<CommitId>> {
    counting(loc, &markers(loc).await?).await
}

fn store_err(loc: &Location, name: &str, e: object_store::Error) -> Error {
    Error::Data(radfm_data::Error::Store {
        uri: loc.child_uri(name),
        source: e,
    })
}

/// Loads and verifies one commit.
pub async fn load(loc: &Location, id: CommitId) -> Result<Loaded> {
    let name = id.manifest();
    let uri = loc.child_uri(&name);
    let body = loc
        .get_bounded(&name, MAX_METADATA_BYTES)
        .await?
        .ok_or_else(|| bad(loc, &name, "not found"))?;
    let manifest: Manifest = serde_json::from_slice(&body)
        .map_err(|e| bad(loc, &name, format!("unreadable manifest: {e}")))?;
    if manifest.format_version > FORMAT_VERSION {
        return Err(bad(
            loc,
            &name,
            format!(
                "format version {} is newer than this trainer's {FORMAT_VERSION}",
                manifest.format_version
            ),
        ));
    }
    if (manifest.step, manifest.epoch) != (id.step, id.epoch) {
        return Err(bad(
            loc,
            &name,
            format!(
                "describes step {} of epoch {}, not its own name",
                manifest.step, manifest.epoch
            ),
        ));
    }
    let mut objects = Vec::new();
    for o in &manifest.objects {
        if !o.name.starts_with(&format!("{}/", id.dir())) {
            return Err(bad(
                loc,
                &name,
                format!("names {} outside its folder {}", o.name, id.dir()),
            ));
        }
        let data = match loc.get_bounded(&o.name, o.bytes as usize).await {
            Err(radfm_data::Error::TooLarge { bytes, .. }) => {
                return Err(bad(
                    loc,
                    &name,
                    format!("{} is {bytes} bytes, not the {} it names", o.name, o.bytes),
                ));
            }
            other => other?,
        }
        .ok_or_else(|| bad(loc, &name, format!("{} is missing", o.name)))?;
        if data.len() as u64 != o.bytes || sha256(&data) != o.sha256 {
            return Err(bad(
                loc,
                &name,
                format!("{} does not match its manifest (size or sha256)", o.name),
            ));
        }
        objects.push((o.name.clone(), data));
    }
    Ok(Loaded {
        manifest,
        objects,
        uri,
    })
}

/// The newest counting checkpoint that verifies under `markers`, skipping (and reporting
/// through `warn`) broken ones.
async fn newest_verified(
    loc: &Location,
    markers: &[EpochMarker],
    warn: &mut impl FnMut(&Error),
) -> Result<Option<Loaded>> {
    for id in counting(loc, markers).await? {
        match load(loc, id).await {
            Ok(l) => return Ok(Some(l)),
            Err(e @ Error::Checkpoint { .. }) => warn(&e),
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// The newest checkpoint that counts and verifies, skipping (and reporting through `warn`)
/// broken ones; None when there is none.
pub async fn load_latest(loc: &Location, mut warn: impl FnMut(&Error)) -> Result<Option<Loaded>> {
    newest_verified(loc, &markers(loc).await?, &mut warn).await
}

/// The writer of a checkpoint folder: the epoch it claimed. One per gang (rank 0).
#[derive(Debug, Clone)]
pub struct Writer {
    loc: Location,
    epoch: u64,
}

impl Writer {
    /// Chooses the newest checkpoint that counts and verifies, then claims the next epoch with a
    /// marker naming it. Returns the writer and the chosen checkpoint (None: start fresh).
    pub async fn begin(
        loc: &Location,
        writer: &str,
        mut warn: impl FnMut(&Error),
    ) -> Result<(Writer, Option<Loaded>)> {
        loc.require_conditional_writes().await?;
        for _ in 0..MAX_CLAIMS {
            let before = markers(loc).await?;
            let chosen = newest_verified(loc, &before, &mut warn).await?;
            let epoch = before.last().map_or(0, |m| m.epoch) + 1;
            let marker = EpochMarker {
                epoch,
                resumed_from: chosen.as_ref().map(Loaded::id),
                writer: writer.to_string(),
                created: jiff::Timestamp::now().to_string(),
            };
            let body = serde_json::to_vec_pretty(&marker).expect("markers serialise");
            if !loc.put_new(&marker_name(epoch), body).await? {
                continue;
            }
            // Claims between our choice and ours may have made the choice stale.
            let older: Vec<EpochMarker> = markers(loc)
                .await?
                .into_iter()
                .filter(|m| m.epoch < epoch)
                .collect();
            if let Some(l) = &chosen
                && !counts(l.id(), &older)
            {
                return Err(bad(
                    loc,
                    &marker_name(epoch),
                    format!(
                        "another writer started while this one chose {}; restart to choose again",
                        l.id()
                    ),
                ));
            }
            return Ok((
                Writer {
                    loc: loc.clone(),
                    epoch,
                },
                chosen,
            ));
        }
        Err(bad(
            loc,
            EPOCHS,
            format!("no epoch claimed in {MAX_CLAIMS} tries: other writers keep starting"),
        ))
    }

    /// The epoch this writer claimed.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The markers, or [`Error::Fenced`] once a newer writer claimed an epoch.
    async fn unfenced(&self) -> Result<Vec<EpochMarker>> {
        let markers = markers(&self.loc).await?;
        match markers.last() {
            Some(newest) if newest.epoch > self.epoch => Err(Error::Fenced {
                uri: self.loc.uri.clone(),
                epoch: self.epoch,
                newer: newest.epoch,
                writer: newest.writer.clone(),
            }),
            _ => Ok(markers),
        }
    }

    /// Writes `files` (name, bytes) for `state.step` and commits them with a create-only
    /// manifest; returns the manifest's URI. Refused once a newer writer started.
    pub async fn save(&self, state: TrainState, files: Vec<(&str, Vec<u8>)>) -> Result<String> {
        self.unfenced().await?;
        let id = CommitId {
            step: state.step,
            epoch: self.epoch,
        };
        let mut objects = Vec::new();
        for (file, data) in files {
            let name = format!("{}/{file}", id.dir());
            objects.push(ObjectRef {
                name: name.clone(),
                bytes: data.len() as u64,
                sha256: sha256(&data),
            });
            self.loc.put(&name, data).await?;
        }
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            step: state.step,
            epoch: self.epoch,
            created: jiff::Timestamp::now().to_string(),
            objects,
            state,
        };
        let name = id.manifest();
        let body = serde_json::to_vec_pretty(&manifest).expect("manifests serialise");
        if !self.loc.put_new(&name, body).await? {
            return Err(bad(&self.loc, &name, "already committed"));
        }
        Ok(self.loc.child_uri(&name))
    }

    /// Keeps the newest `keep` counting checkpoints. Deletes older manifests and those that will
    /// never count (an older writer's after a newer one chose), then data folders no kept
    /// manifest names, except this writer's newer than its newest commit (a write in progress).
    /// Refused once a newer writer started. Returns the commits whose data was deleted.
    pub async fn prune(&self, keep: usize) -> Result<Vec<CommitId>> {
        let markers = self.unfenced().await?;
        let all = manifests(&self.loc).await?;
        let mut counted: Vec<CommitId> = all
            .iter()
            .copied()
            .filter(|&id| counts(id, &markers))
            .collect();
        counted.sort_unstable_by(|a, b| b.cmp(a));
        let kept: Vec<CommitId> = counted.iter().take(keep.max(1)).copied().collect();
        let newest_own = kept
            .iter()
            .filter(|id| id.epoch == self.epoch)
            .map(|id| id.step)
            .max();
        let garbage = |id: &CommitId| {
            !kept.contains(id)
                && (id.epoch < self.epoch
                    || (id.epoch == self.epoch && newest_own.is_some_and(|n| id.step < n)))
        };
        let mut deleted: Vec<CommitId> = Vec::new();
        for id in all.iter().filter(|id| garbage(id)) {
            self.loc.delete(&id.manifest()).await?;
            deleted.push(*id);
        }
        let metas: Vec<object_store::ObjectMeta> = self
            .loc
            .store
            .list(Some(&self.loc.prefix))
            .try_collect()
            .await
            .map_err(|e| store_err(&self.loc, "", e))?;
        for m in metas {
            let rel: Vec<String> = m
                .location
                .prefix_match(&self.loc.prefix)
                .map(|p| p.map(|s| s.as_ref().to_string()).collect())
                .unwrap_or_default();
            let Some(id) = rel.first().and_then(|d| CommitId::parse(d)) else {
                continue;
            };
            if rel.len() >= 2 && garbage(&id) {
                self.loc.delete(&rel.join("/")).await?;
                if !deleted.contains(&id) {
                    deleted.push(id);
                }
            }
        }
        deleted.sort_unstable();
        Ok(deleted)
    }
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

    fn folder() -> (tempfile::TempDir, Location) {
        let dir = tempfile::tempdir().unwrap();
        let loc = Location::open(dir.path().to_str().unwrap()).unwrap();
        (dir, loc)
    }

    async fn begin(loc: &Location, who: &str) -> (Writer, Option<Loaded>) {
        Writer::begin(loc, who, |e| panic!("{e}")).await.unwrap()
    }

    async fn commit(w: &Writer, step: i64, body: &[u8]) -> Result<String> {
        w.save(state(step), vec![("model.safetensors", body.to_vec())])
            .await
    }

    fn steps(ids: &[CommitId]) -> Vec<i64> {
        ids.iter().map(|id| id.step).collect()
    }

    #[test]
    fn commit_names_parse_back_and_the_old_layout_reads_as_epoch_zero() {
        for id in [
            CommitId { step: 0, epoch: 0 },
            CommitId {
                step: 500,
                epoch: 0,
            },
            CommitId { step: 7, epoch: 3 },
            CommitId {
                step: 123_456_789_012,
                epoch: 1_234_567,
            },
        ] {
            assert_eq!(CommitId::parse(&id.dir()), Some(id));
        }
        assert_eq!(
            CommitId::parse("step-000000500"),
            Some(CommitId {
                step: 500,
                epoch: 0
            })
        );
        for junk in [
            "step-",
            "step-x",
            "step--1",
            "step-5-e0",
            "step-5-ex",
            "manifests",
        ] {
            assert_eq!(CommitId::parse(junk), None, "{junk}");
        }
    }

    #[test]
    fn newest_committed_checkpoint_wins_and_uncommitted_data_is_ignored() {
        let (_dir, loc) = folder();
        rt().block_on(async {
            assert!(load_latest(&loc, |_| ()).await.unwrap().is_none());
            let (w, chosen) = begin(&loc, "test").await;
            assert!(chosen.is_none());
            commit(&w, 5, b"five").await.unwrap();
            commit(&w, 10, b"ten").await.unwrap();
            // A crash after the data of step 15 but before its manifest.
            loc.put("step-000000015-e000001/model.safetensors", b"half".to_vec())
                .await
                .unwrap();
            let l = load_latest(&loc, |_| ()).await.unwrap().unwrap();
            assert_eq!(l.id(), CommitId { step: 10, epoch: 1 });
            assert_eq!(&l.object("model.safetensors").unwrap()[..], b"ten");
            assert!(
                commit(&w, 10, b"again").await.is_err(),
                "a commit is create-only"
            );
        });
    }

    #[test]
    fn a_corrupted_checkpoint_falls_back_to_the_previous_one() {
        let (_dir, loc) = folder();
        rt().block_on(async {
            let (w, _) = begin(&loc, "test").await;
            commit(&w, 5, b"five").await.unwrap();
            commit(&w, 10, b"ten").await.unwrap();
            loc.put("step-000000010-e000001/model.safetensors", b"tan".to_vec())
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
    fn a_manifest_copied_under_another_name_or_naming_foreign_objects_is_refused() {
        let (_dir, loc) = folder();
        rt().block_on(async {
            let (w, _) = begin(&loc, "test").await;
            commit(&w, 5, b"five").await.unwrap();
            let body = loc.get_opt("manifests/step-000000005-e000001.json").await;
            let body = body.unwrap().unwrap();
            loc.put("manifests/step-000000009-e000001.json", body.to_vec())
                .await
                .unwrap();
            let e = load(&loc, CommitId { step: 9, epoch: 1 })
                .await
                .unwrap_err();
            assert!(e.to_string().contains("not its own name"), "{e}");
            let mut m: Manifest = serde_json::from_slice(&body).unwrap();
            m.objects[0].name = "../../etc/passwd".into();
            loc.put(
                "manifests/step-000000005-e000001.json",
                serde_json::to_vec(&m).unwrap(),
            )
            .await
            .unwrap();
            let e = load(&loc, CommitId { step: 5, epoch: 1 })
                .await
                .unwrap_err();
            assert!(e.to_string().contains("outside its folder"), "{e}");
        });
    }

    #[test]
    fn a_zombie_writer_can_neither_commit_nor_prune_after_a_newer_one_started() {
        let (_dir, loc) = folder();
        rt().block_on(async {
            let (old, _) = begin(&loc, "attempt 1").await;
            commit(&old, 5, b"five").await.unwrap();
            commit(&old, 10, b"ten").await.unwrap();
            // The gang restarts while the old rank 0 still runs on a partitioned node.
            let (new, chosen) = begin(&loc, "attempt 2").await;
            assert_eq!(chosen.unwrap().id(), CommitId { step: 10, epoch: 1 });
            assert!(new.epoch() > old.epoch());
            let e = commit(&old, 20, b"zombie").await.unwrap_err();
            assert!(matches!(e, Error::Fenced { newer: 2, .. }), "{e}");
            assert!(e.to_string().contains("attempt 2"), "{e}");
            assert!(matches!(old.prune(1).await, Err(Error::Fenced { .. })));
            assert_eq!(steps(&committed(&loc).await.unwrap()), [10, 5]);
            // The zombie checked the fence just before the newer writer claimed, and its commit
            // landed after: it never counts, for any reader.
            let late = Writer {
                loc: loc.clone(),
                epoch: old.epoch(),
            };
            let sneak = Manifest {
                format_version: FORMAT_VERSION,
                step: 30,
                epoch: old.epoch(),
                created: String::new(),
                objects: Vec::new(),
                state: state(30),
            };
            let id = CommitId { step: 30, epoch: 1 };
            loc.put(&id.manifest(), serde_json::to_vec(&sneak).unwrap())
                .await
                .unwrap();
            assert_eq!(steps(&committed(&loc).await.unwrap()), [10, 5]);
            assert_eq!(
                load_latest(&loc, |_| ()).await.unwrap().unwrap().id(),
                CommitId { step: 10, epoch: 1 }
            );
            // The newer writer goes on, and its pruning removes the zombie's leftovers but never
            // what it resumed from until something newer replaces it.
            commit(&new, 15, b"fifteen").await.unwrap();
            let deleted = new.prune(2).await.unwrap();
            assert_eq!(
                deleted,
                [
                    CommitId { step: 5, epoch: 1 },
                    CommitId { step: 30, epoch: 1 }
                ]
            );
            assert_eq!(steps(&committed(&loc).await.unwrap()), [15, 10]);
            assert!(late.unfenced().await.is_err());
        });
    }

    #[test]
    fn every_start_claims_a_newer_epoch_naming_what_it_resumed_from() {
        let (_dir, loc) = folder();
        rt().block_on(async {
            let (a, none) = begin(&loc, "a").await;
            assert!(none.is_none());
            commit(&a, 4, b"four").await.unwrap();
            let (b, from_a) = begin(&loc, "b").await;
            let (c, from_a_too) = begin(&loc, "c").await;
            assert_eq!(from_a.unwrap().id(), CommitId { step: 4, epoch: 1 });
            assert_eq!(from_a_too.unwrap().id(), CommitId { step: 4, epoch: 1 });
            // b and c both started from step 4; c is newer, so b is the zombie.
            assert!(matches!(
                commit(&b, 8, b"b").await,
                Err(Error::Fenced { newer: 3, .. })
            ));
            commit(&c, 8, b"c").await.unwrap();
            let ms = markers(&loc).await.unwrap();
            assert_eq!(ms.iter().map(|m| m.epoch).collect::<Vec<_>>(), [1, 2, 3]);
            assert_eq!(ms[2].resumed_from, Some(CommitId { step: 4, epoch: 1 }));
            assert_eq!(ms[2].writer, "c");
            let l = load_latest(&loc, |_| ()).await.unwrap().unwrap();
            assert_eq!(&l.object("model.safetensors").unwrap()[..], b"c");
        });
    }

    #[test]
    fn checkpoints_written_before_epochs_still_resume_and_prune() {
        let (dir, loc) = folder();
        rt().block_on(async {
            let old = CommitId { step: 7, epoch: 0 };
            let data = b"legacy".to_vec();
            let manifest = Manifest {
                format_version: FORMAT_VERSION,
                step: 7,
                epoch: 0,
                created: String::new(),
                objects: vec![ObjectRef {
                    name: "step-000000007/model.safetensors".into(),
                    bytes: data.len() as u64,
                    sha256: sha256(&data),
                }],
                state: state(7),
            };
            let mut json = serde_json::to_value(&manifest).unwrap();
            json.as_object_mut().unwrap().remove("epoch");
            loc.put("step-000000007/model.safetensors", data)
                .await
                .unwrap();
            loc.put(&old.manifest(), serde_json::to_vec(&json).unwrap())
                .await
                .unwrap();
            let (w, chosen) = begin(&loc, "upgrade").await;
            assert_eq!(chosen.unwrap().id(), old);
            commit(&w, 9, b"nine").await.unwrap();
            assert_eq!(w.prune(1).await.unwrap(), [old]);
            assert!(
                !dir.path()
                    .join("step-000000007")
                    .join("model.safetensors")
                    .exists()
            );
        });
    }

    #[test]
    fn pruning_keeps_the_newest_and_removes_orphans() {
        let (dir, loc) = folder();
        rt().block_on(async {
            let (w, _) = begin(&loc, "test").await;
            for s in [5, 10, 15] {
                commit(&w, s, &[1, 2, 3]).await.unwrap();
            }
            loc.put("step-000000012-e000001/model.safetensors", vec![0])
                .await
                .unwrap();
            loc.put("step-000000020-e000001/model.safetensors", vec![0])
                .await
                .unwrap();
            let deleted = w.prune(2).await.unwrap();
            assert_eq!(steps(&deleted), [5, 12]);
            assert_eq!(steps(&committed(&loc).await.unwrap()), [15, 10]);
            assert!(
                !dir.path()
                    .join("step-000000005-e000001")
                    .join("model.safetensors")
                    .exists()
            );
            // Newer than the newest commit: may be a write in progress, kept.
            assert!(
                dir.path()
                    .join("step-000000020-e000001/model.safetensors")
                    .exists()
            );
            assert!(load(&loc, CommitId { step: 10, epoch: 1 }).await.is_ok());
        });
    }

    #[test]
    fn an_oversized_or_mislabelled_marker_is_an_error_naming_it() {
        let (_dir, loc) = folder();
        rt().block_on(async {
            let (_w, _) = begin(&loc, "test").await;
            let mut m: EpochMarker =
                serde_json::from_slice(&loc.get_opt("epochs/e000001.json").await.unwrap().unwrap())
                    .unwrap();
            m.epoch = 9;
            loc.put("epochs/e000002.json", serde_json::to_vec(&m).unwrap())
                .await
                .unwrap();
            let e = markers(&loc).await.unwrap_err();
            assert!(e.to_string().contains("epochs/e000002.json"), "{e}");
            loc.put("epochs/e000002.json", vec![b' '; MAX_METADATA_BYTES + 1])
                .await
                .unwrap();
            let e = markers(&loc).await.unwrap_err();
            assert!(e.to_string().contains("more than the limit"), "{e}");
        });
    }
}
