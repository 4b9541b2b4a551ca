//! Ingest: a folder of DICOM, PNG and JPEG files → shards and index in any object store.
//!
//! Files are decoded in parallel (rayon) in batches and written in input order, so the same input
//! gives the same shards. Each shard has a sidecar `<shard>.sources.json` listing the keyed ids
//! of the files it holds; a re-run skips those, so an interrupted ingest resumes where it stopped
//! and files refused by the de-identification gate can be ingested later with `--deidentify`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::dicom;
use crate::image16::Image16;
use crate::index::{DatasetIndex, Stats};
use crate::meta::{SampleMeta, pseudonym};
use crate::report_deid;
use crate::shard::{Sample, ShardWriter};
use crate::store::Location;
use crate::structured_report::{self, Match, ReportIndex, StructuredReport};
use crate::{Error, Result};

/// Writes samples into shards of about `target_bytes`, appending each to the index.
pub struct ShardSink {
    loc: Location,
    target_bytes: usize,
    writer: ShardWriter,
    stats: Stats,
    sources: BTreeSet<String>,
    /// Shards written so far.
    pub shards_written: u64,
    /// Samples written so far.
    pub samples_written: u64,
}

impl ShardSink {
    /// A sink into the dataset folder `loc`.
    pub fn new(loc: Location, target_bytes: usize) -> Self {
        ShardSink {
            loc,
            target_bytes,
            writer: ShardWriter::new(),
            stats: Stats::default(),
            sources: BTreeSet::new(),
            shards_written: 0,
            samples_written: 0,
        }
    }

    /// Adds a sample that came from `source` (a keyed source id, recorded for resumption).
    pub async fn add(&mut self, sample: &Sample, source: Option<&str>) -> Result<()> {
        self.writer.add(sample)?;
        self.stats.add(
            &sample.image.pixels,
            sample.meta.rescale_slope,
            sample.meta.rescale_intercept,
        );
        if let Some(s) = source {
            self.sources.insert(s.to_string());
        }
        self.samples_written += 1;
        if self.writer.bytes() >= self.target_bytes {
            self.flush().await?;
        }
        Ok(())
    }

    /// Writes the current shard, if it holds anything, with the sidecar of its sources.
    pub async fn flush(&mut self) -> Result<()> {
        if self.writer.is_empty() {
            return Ok(());
        }
        let writer = std::mem::take(&mut self.writer);
        let samples = writer.len();
        let tar = writer.finish()?;
        let sources: Vec<&String> = self.sources.iter().collect();
        let stats = std::mem::take(&mut self.stats);
        DatasetIndex::append_shard(&self.loc, tar, samples, stats, &sources).await?;
        self.sources.clear();
        self.shards_written += 1;
        Ok(())
    }
}

/// What to ingest and how.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// Input: a local folder (searched recursively for .dcm/.dicom/.png/.jpg/.jpeg and
    /// extension-less DICOM files) or an object-store prefix URI (objects with those extensions).
    pub input: String,
    /// Output dataset folder URI.
    pub output: String,
    /// Strip identifiers instead of refusing identified DICOM files.
    pub deidentify: bool,
    /// The ingest operator checked that PNG/JPEG inputs and DICOM images at risk of burned-in
    /// text ([`dicom::pixel_risk`]) carry no identifiers in their pixels.
    pub accept_burned_in_risk: bool,
    /// A local file to write the refused files to (`source id,path,reason`, readable by this
    /// user only): the only place source paths appear.
    pub refusals: Option<PathBuf>,
    /// Secret salt of the pseudonyms (patient, study, source ids).
    pub salt: Vec<u8>,
    /// Site recorded for every sample.
    pub site: Option<String>,
    /// Labels side file: CSV (first column the file path relative to `input`, then one column
    /// per label) or JSON (`{"path": {"label": value}}`).
    pub labels: Option<PathBuf>,
    /// Reports: a JSON side file mapping the file path relative to `input` to its report text
    /// (`{"path": "report"}`), or a local folder of DICOM Structured Reports (it may be the input
    /// folder itself) matched to images by study and evidence ([`structured_report`]). Each
    /// report is de-identified ([`report_deid`]) with the image's header identifiers (and the
    /// SR's) before it is written as the sample's `.txt`.
    pub reports: Option<PathBuf>,
    /// Write reports that the de-identification still has doubts about (the ingest operator
    /// read them); without it such files are refused.
    pub accept_report_doubts: bool,
    /// Target shard size in bytes.
    pub shard_bytes: usize,
}

/// What an ingest did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IngestReport {
    /// Image files found.
    pub files: usize,
    /// Files skipped because an earlier run ingested them.
    pub already_done: usize,
    /// Samples written (a multi-frame file gives several).
    pub samples: u64,
    /// Shards written.
    pub shards: u64,
    /// DICOM files in the input that are not images (Structured Reports, presentation states),
    /// skipped.
    pub not_images: usize,
    /// Structured Reports read from the reports folder.
    pub structured_reports: usize,
    /// Files refused, with why (named by source id; identifier names only, never values or
    /// paths).
    pub refused: Vec<String>,
}

/// Where an input file is.
enum Source {
    Local(PathBuf),
    Object(object_store::path::Path),
}

/// The local folder of an input that is a path or a `file://` URI.
fn local_folder(input: &str) -> Option<PathBuf> {
    if let Some(p) = input.strip_prefix("file://") {
        return Some(PathBuf::from(p));
    }
    (!input.contains("://")).then(|| PathBuf::from(input))
}

fn is_image(p: &Path) -> bool {
    match extension(p) {
        Some(e) => matches!(e.as_str(), "dcm" | "dicom" | "png" | "jpg" | "jpeg"),
        None => std::fs::File::open(p)
            .and_then(|mut f| {
                use std::io::{Read, Seek};
                let mut magic = [0u8; 4];
                f.seek(std::io::SeekFrom::Start(128))?;
                f.read_exact(&mut magic)?;
                Ok(&magic == b"DICM")
            })
            .unwrap_or(false),
    }
}

/// A file's extension in lower case.
fn extension(p: &Path) -> Option<String> {
    p.extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
}

fn is_png_or_jpeg(p: &Path) -> bool {
    extension(p).is_some_and(|e| matches!(e.as_str(), "png" | "jpg" | "jpeg"))
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let io = |e| Error::Io {
        path: dir.display().to_string(),
        source: e,
    };
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(io)?
        .collect::<std::io::Result<_>>()
        .map_err(io)?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        if p.is_dir() {
            walk(&p, out)?;
        } else if is_image(&p) {
            out.push(p);
        }
    }
    Ok(())
}

/// Where the reports come from.
enum Reports {
    /// None given.
    None,
    /// Report text per input file path.
    SideFile(BTreeMap<String, String>),
    /// Structured Reports by study.
    Structured(ReportIndex),
}

/// The reports of an ingest; unreadable Structured Reports stop it before anything is written
/// (their paths go to the refusals file).
fn read_report_source(cfg: &IngestConfig) -> Result<Reports> {
    let Some(path) = cfg.reports.as_deref() else {
        return Ok(Reports::None);
    };
    if !path.is_dir() {
        return read_reports(path).map(Reports::SideFile);
    }
    let mut files = Vec::new();
    walk(path, &mut files)?;
    files.retain(|p| !is_png_or_jpeg(p));
    let read: Vec<(String, String, Result<Option<StructuredReport>>)> = files
        .par_iter()
        .map(|p| {
            let rel = p
                .strip_prefix(path)
                .unwrap_or(p)
                .to_string_lossy()
                .to_string();
            let id = pseudonym(&cfg.salt, &format!("source:{rel}"));
            let got = structured_report::read(p, &source_name(&id));
            (id, rel, got)
        })
        .collect();
    let mut index = ReportIndex::default();
    let mut unreadable = Vec::new();
    for (id, rel, got) in read {
        match got {
            Ok(Some(r)) => index.add(r),
            Ok(None) => {}
            Err(e) => unreadable.push((id, rel, e)),
        }
    }
    let Some((_, _, first)) = unreadable.first() else {
        return Ok(Reports::Structured(index));
    };
    let (source_name, reason) = match first {
        Error::StructuredReport {
            source_name,
            reason,
        } => (source_name.clone(), reason.clone()),
        other => ("reports".to_string(), other.to_string()),
    };
    if let Some(refusals) = &cfg.refusals {
        let rows: Vec<_> = unreadable
            .iter()
            .map(|(id, rel, e)| (id.clone(), rel.clone(), e.to_string()))
            .collect();
        write_refusals(refusals, &rows)?;
    }
    Err(Error::StructuredReport {
        source_name,
        reason: format!(
            "{reason}; {} unreadable Structured Report(s) in all, nothing was ingested",
            unreadable.len()
        ),
    })
}

/// What a decoded file says about its case, for finding and de-identifying its report.
struct Case {
    identifiers: report_deid::Context,
    study_uid: Option<String>,
    instance_uid: Option<String>,
}

/// The file's report, de-identified, if it has one.
fn report_of(
    cfg: &IngestConfig,
    reports: &Reports,
    (rel, name): (&str, &str),
    case: &Case,
) -> Result<Option<String>> {
    match reports {
        Reports::None => Ok(None),
        Reports::SideFile(texts) => texts
            .get(rel)
            .map(|r| deidentified_report(cfg, name, r, &case.identifiers))
            .transpose(),
        Reports::Structured(index) => {
            let Some(study) = case.study_uid.as_deref() else {
                return Ok(None);
            };
            match index.for_image(study, case.instance_uid.as_deref()) {
                Match::None => Ok(None),
                Match::Ambiguous(count) => Err(Error::ReportConflict {
                    source_name: name.to_string(),
                    count,
                }),
                Match::One(sr) => {
                    let mut ctx = case.identifiers.clone();
                    ctx.names.extend(sr.identifiers.names.iter().cloned());
                    ctx.identifiers
                        .extend(sr.identifiers.identifiers.iter().cloned());
                    ctx.institutions
                        .extend(sr.identifiers.institutions.iter().cloned());
                    deidentified_report(cfg, name, &sr.text, &ctx).map(Some)
                }
            }
        }
    }
}

/// Largest reports side file read.
pub const MAX_REPORTS_BYTES: u64 = 1 << 30;

fn read_reports(path: &Path) -> Result<BTreeMap<String, String>> {
    let bad = |reason: String| Error::Io {
        path: path.display().to_string(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, reason),
    };
    let size = std::fs::metadata(path)
        .map_err(|e| bad(e.to_string()))?
        .len();
    if size > MAX_REPORTS_BYTES {
        return Err(bad(format!(
            "{size} bytes is more than the limit of {MAX_REPORTS_BYTES}"
        )));
    }
    let text = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let reports: BTreeMap<String, String> = serde_json::from_slice(&text)
        .map_err(|e| bad(format!("reports must map file paths to report texts: {e}")))?;
    if let Some((_, r)) = reports
        .iter()
        .find(|(_, r)| r.len() > crate::shard::MAX_REPORT_BYTES)
    {
        return Err(bad(format!(
            "a report of {} bytes is more than the limit of {}",
            r.len(),
            crate::shard::MAX_REPORT_BYTES
        )));
    }
    Ok(reports)
}

/// The report de-identified with what the file's header says about the case, or the refusal.
fn deidentified_report(
    cfg: &IngestConfig,
    name: &str,
    report: &str,
    ctx: &report_deid::Context,
) -> Result<String> {
    let out = report_deid::scrub(report, ctx);
    if !out.doubts.is_empty() && !cfg.accept_report_doubts {
        let mut kinds: Vec<String> = out.doubts.iter().map(|d| format!("{:?}", d.kind)).collect();
        kinds.dedup();
        return Err(Error::ReportDoubt {
            source_name: name.to_string(),
            kinds: kinds.join(", "),
        });
    }
    Ok(out.text)
}

fn read_labels(path: &Path) -> Result<BTreeMap<String, BTreeMap<String, serde_json::Value>>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
        path: path.display().to_string(),
        source: e,
    })?;
    if path.extension().and_then(|e| e.to_str()) == Some("json") {
        // {"relative/path.dcm": {"label": value, ...}, ...}
        return serde_json::from_str(&text).map_err(|e| Error::Image {
            source_name: path.display().to_string(),
            reason: format!("labels must map file paths to objects of labels: {e}"),
        });
    }
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .collect();
    let mut out = BTreeMap::new();
    for (n, line) in lines.enumerate() {
        let cols: Vec<&str> = line.split(',').map(str::trim).collect();
        if cols.len() != header.len() {
            return Err(Error::Image {
                source_name: format!("{}:{}", path.display(), n + 2),
                reason: format!("{} columns, header has {}", cols.len(), header.len()),
            });
        }
        let labels = header[1..]
            .iter()
            .zip(&cols[1..])
            .map(|(k, v)| {
                let value = v
                    .parse::<i64>()
                    .map(serde_json::Value::from)
                    .or_else(|_| v.parse::<f64>().map(serde_json::Value::from))
                    .unwrap_or_else(|_| serde_json::Value::from(*v));
                (k.to_string(), value)
            })
            .collect();
        out.insert(cols[0].to_string(), labels);
    }
    Ok(out)
}

/// A decoded file: its frames, the metadata they share, and what it says about the case.
type Decoded = (Vec<Image16>, SampleMeta, Case);

/// A PNG or JPEG file, refused unless the ingest operator accepted the risk of burned-in text.
fn read_png_or_jpeg(
    cfg: &IngestConfig,
    (path, name, source_id): (&Path, &str, &str),
    ext: &str,
) -> Result<Decoded> {
    if !cfg.accept_burned_in_risk {
        return Err(Error::PixelRisk {
            source_name: name.to_string(),
            reason: format!(
                "a {} file has no metadata to say whether its pixels carry identifiers",
                ext.to_uppercase()
            ),
        });
    }
    let bytes = std::fs::read(path).map_err(|e| Error::Io {
        path: name.to_string(),
        source: e,
    })?;
    let img = if ext == "png" {
        Image16::from_png(&bytes, name)?
    } else {
        Image16::from_jpeg(&bytes, name)?
    };
    let meta = SampleMeta {
        width: img.width,
        height: img.height,
        rescale_slope: 1.0,
        ..Default::default()
    };
    let case = Case {
        identifiers: report_deid::Context {
            date_shift_days: report_deid::date_shift_days(&cfg.salt, source_id),
            ..Default::default()
        },
        study_uid: None,
        instance_uid: None,
    };
    Ok((vec![img], meta, case))
}

/// A DICOM file through the de-identification gate.
fn read_dicom(cfg: &IngestConfig, path: &Path, name: &str) -> Result<Decoded> {
    let gate = dicom::Gate {
        deidentify: cfg.deidentify,
        accept_burned_in_risk: cfg.accept_burned_in_risk,
    };
    let d = dicom::read_named(path, name, gate, &cfg.salt)?;
    let case = Case {
        identifiers: d.identifiers,
        study_uid: d.study_uid,
        instance_uid: d.instance_uid,
    };
    Ok((d.frames, d.meta, case))
}

/// Decodes one file into samples (one per frame).
fn decode(
    cfg: &IngestConfig,
    (path, rel, name, source_id): (&Path, &str, &str, &str),
    reports: &Reports,
) -> Result<Vec<Sample>> {
    let ext = extension(path).unwrap_or_default();
    let (frames, mut meta, case) = match ext.as_str() {
        "png" | "jpg" | "jpeg" => read_png_or_jpeg(cfg, (path, name, source_id), &ext)?,
        _ => read_dicom(cfg, path, name)?,
    };
    let report = report_of(cfg, reports, (rel, name), &case)?;
    meta.site = cfg.site.clone();
    let multi = frames.len() > 1;
    Ok(frames
        .into_iter()
        .enumerate()
        .map(|(f, image)| {
            let mut m = meta.clone();
            if multi {
                m.frame = Some(f as u32);
            }
            let key = if multi {
                format!("{}-f{f:04}", &source_id[..20])
            } else {
                source_id[..20].to_string()
            };
            Sample {
                key,
                image,
                meta: m,
                report: report.clone(),
            }
        })
        .collect())
}

/// The input's files as (source, path relative to the input): a local folder walked, or an
/// object-store prefix listed (images only), in a stable order.
async fn list_input(
    local_root: Option<&Path>,
    remote: Option<&Location>,
) -> Result<Vec<(Source, String)>> {
    if let Some(root) = local_root {
        let mut paths = Vec::new();
        walk(root, &mut paths)?;
        return Ok(paths
            .into_iter()
            .map(|p| {
                let rel = p
                    .strip_prefix(root)
                    .unwrap_or(&p)
                    .to_string_lossy()
                    .to_string();
                (Source::Local(p), rel)
            })
            .collect());
    }
    let r = remote.expect("a remote input where the input is not a local folder");
    use futures::TryStreamExt;
    let mut objects: Vec<object_store::ObjectMeta> = r
        .store
        .list(Some(&r.prefix))
        .try_collect()
        .await
        .map_err(|e| Error::Store {
            uri: r.uri.clone(),
            source: e,
        })?;
    objects.sort_by(|a, b| a.location.cmp(&b.location));
    let mut files = Vec::new();
    for o in objects {
        let rel = o
            .location
            .prefix_match(&r.prefix)
            .map(|parts| {
                parts
                    .map(|p| p.as_ref().to_string())
                    .collect::<Vec<_>>()
                    .join("/")
            })
            .unwrap_or_default();
        if is_image(Path::new(&rel)) {
            files.push((Source::Object(o.location), rel));
        }
    }
    Ok(files)
}

/// The pseudonymous source ids already in the dataset (the shards' sidecars).
async fn ingested_sources(loc: &Location) -> Result<BTreeSet<String>> {
    let index = DatasetIndex::load(loc).await?;
    let mut done: BTreeSet<String> = BTreeSet::new();
    for s in &index.shards {
        let sidecar = crate::index::sources_name(&s.name);
        if let Some(bytes) = loc
            .get_bounded(&sidecar, crate::index::MAX_DOCUMENT_BYTES)
            .await?
        {
            let ids: Vec<String> = serde_json::from_slice(&bytes).map_err(|e| Error::Index {
                uri: loc.child_uri(&sidecar),
                reason: e.to_string(),
            })?;
            done.extend(ids);
        }
    }
    Ok(done)
}

/// A local path for each file of the batch: local files as they are, objects fetched into
/// `scratch`.
async fn fetch_batch(
    batch: &[(Source, String, String)],
    remote: Option<&Location>,
    scratch: &Path,
) -> Result<Vec<PathBuf>> {
    let mut paths = Vec::with_capacity(batch.len());
    for (k, (src, _, id)) in batch.iter().enumerate() {
        let o = match src {
            Source::Local(p) => {
                paths.push(p.clone());
                continue;
            }
            Source::Object(o) => o,
        };
        let r = remote.expect("objects come from a remote input");
        use object_store::ObjectStoreExt;
        let got = match r.store.get(o).await {
            Ok(g) => g.bytes().await,
            Err(e) => Err(e),
        };
        let bytes = got.map_err(|e| Error::Store {
            uri: format!("{} ({})", r.uri, source_name(id)),
            source: e,
        })?;
        let ext = Path::new(o.as_ref())
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("dcm");
        let p = scratch.join(format!("{k}.{ext}"));
        std::fs::write(&p, &bytes).map_err(|e| Error::Io {
            path: p.display().to_string(),
            source: e,
        })?;
        paths.push(p);
    }
    Ok(paths)
}

/// How errors, logs and reports name a source file: by its keyed id, never its path.
fn source_name(id: &str) -> String {
    format!("source {}", short_id(id))
}

/// The part of a keyed source id that messages and the refusals file show.
fn short_id(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// The local list of refused files, `source id,path,reason` (CSV), readable by this user only.
fn write_refusals(path: &Path, rows: &[(String, String, String)]) -> Result<()> {
    use std::io::Write;
    let io = |e| Error::Io {
        path: path.display().to_string(),
        source: e,
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path).map_err(io)?;
    writeln!(f, "source,path,reason").map_err(io)?;
    for (id, rel, why) in rows {
        let quoted = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
        writeln!(f, "{},{},{}", short_id(id), quoted(rel), quoted(why)).map_err(io)?;
    }
    Ok(())
}

/// The input files whose keyed source id is not in the dataset yet, with that id.
fn not_yet_ingested(
    cfg: &IngestConfig,
    files: Vec<(Source, String)>,
    done: &BTreeSet<String>,
) -> Vec<(Source, String, String)> {
    files
        .into_iter()
        .filter_map(|(src, rel)| {
            let id = pseudonym(&cfg.salt, &format!("source:{rel}"));
            (!done.contains(&id)).then_some((src, rel, id))
        })
        .collect()
}

/// Ingests `cfg.input` into `cfg.output`. Identified DICOM files are refused (listed in the
/// report and the error) unless `deidentify`; everything else is written.
pub async fn ingest(
    cfg: &IngestConfig,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<IngestReport> {
    let loc = Location::open(&cfg.output)?;
    let local_root = local_folder(&cfg.input);
    let remote = match &local_root {
        Some(_) => None,
        None => Some(Location::open(&cfg.input)?),
    };
    let files = list_input(local_root.as_deref(), remote.as_ref()).await?;
    let labels = cfg.labels.as_deref().map(read_labels).transpose()?;
    let labels = labels.unwrap_or_default();
    let reports = read_report_source(cfg)?;
    let done = ingested_sources(&loc).await?;
    let mut report = IngestReport {
        files: files.len(),
        structured_reports: match &reports {
            Reports::Structured(index) => index.len(),
            _ => 0,
        },
        ..Default::default()
    };
    let todo = not_yet_ingested(cfg, files, &done);
    report.already_done = report.files - todo.len();
    let mut sink = ShardSink::new(loc, cfg.shard_bytes);
    let total = todo.len();
    let mut refusals: Vec<(String, String, String)> = Vec::new();
    for (batch_no, batch) in todo.chunks(64).enumerate() {
        // Objects of a remote input are fetched into a scratch folder one batch at a time.
        let scratch = tempfile::tempdir().map_err(|e| Error::Io {
            path: "(temporary folder)".into(),
            source: e,
        })?;
        let paths = fetch_batch(batch, remote.as_ref(), scratch.path()).await?;
        let decoded: Vec<(String, String, Result<Vec<Sample>>)> = batch
            .par_iter()
            .zip(paths.par_iter())
            .map(|((_, rel, id), p)| {
                let name = source_name(id);
                let samples = decode(cfg, (p, rel, &name, id), &reports);
                (rel.clone(), id.clone(), samples)
            })
            .collect();
        for (rel, id, result) in decoded {
            match result {
                Ok(samples) => {
                    for mut s in samples {
                        if let Some(l) = labels.get(&rel) {
                            s.meta.labels.extend(l.clone());
                        }
                        sink.add(&s, Some(&id)).await?;
                    }
                }
                Err(Error::NotAnImage { .. }) => report.not_images += 1,
                Err(
                    e @ (Error::Identified { .. }
                    | Error::PixelRisk { .. }
                    | Error::ReportDoubt { .. }
                    | Error::ReportConflict { .. }),
                ) => {
                    refusals.push((id, rel, e.to_string()));
                    report.refused.push(e.to_string());
                }
                Err(e) => return Err(e),
            }
        }
        progress((batch_no * 64 + batch.len()).min(total), total);
    }
    sink.flush().await?;
    if let Some(path) = &cfg.refusals {
        write_refusals(path, &refusals)?;
    }
    report.samples = sink.samples_written;
    report.shards = sink.shards_written;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_come_from_csv_or_json_and_bad_rows_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("l.csv");
        std::fs::write(&csv, "file,lesion,score\na.png,1,0.5\nb/c.dcm,0,x\n").unwrap();
        let l = read_labels(&csv).unwrap();
        assert_eq!(l["a.png"]["lesion"], serde_json::json!(1));
        assert_eq!(l["a.png"]["score"], serde_json::json!(0.5));
        assert_eq!(l["b/c.dcm"]["score"], serde_json::json!("x"));
        let json = dir.path().join("l.json");
        std::fs::write(&json, r#"{"a.png": {"lesion": 1}}"#).unwrap();
        assert_eq!(
            read_labels(&json).unwrap()["a.png"]["lesion"],
            serde_json::json!(1)
        );
        std::fs::write(&csv, "file,lesion\na.png,1,2\n").unwrap();
        let err = read_labels(&csv).unwrap_err().to_string();
        assert!(
            err.contains("l.csv:2") && err.contains("3 columns, header has 2"),
            "{err}"
        );
    }
}
