//! `radfm ingest`: DICOM, PNG and JPEG files into shards, through the de-identification gate
//! (identified DICOM is refused unless `--deidentify` strips it).

use std::path::PathBuf;

use anyhow::{Result, bail};
use radfm_data::ingest::{IngestConfig, ingest};

use crate::synth::{bar, shard_bytes};

#[derive(clap::Args)]
pub struct IngestArgs {
    /// Input folder, or object-store prefix URI (s3://, gs://, az://).
    input: String,
    /// Output dataset folder URI.
    #[arg(long)]
    out: String,
    /// Strip identifiers (documented PS3.15 subset) instead of refusing identified DICOM.
    #[arg(long)]
    deidentify: bool,
    /// State that you checked the pixels of PNG/JPEG inputs and of DICOM images at risk of
    /// burned-in text (secondary capture, ultrasound, ... without BurnedInAnnotation NO): they
    /// carry no identifiers. Without it such files are refused.
    #[arg(long)]
    accept_burned_in_risk: bool,
    /// Write the refused files (source id, path, reason) to this local file, readable by you
    /// only; messages name files by their source id, never their path.
    #[arg(long)]
    refusals: Option<PathBuf>,
    /// Secret salt of the pseudonyms; default: $RADFM_PSEUDONYM_SALT.
    #[arg(long, env = "RADFM_PSEUDONYM_SALT", hide_env_values = true)]
    salt: String,
    /// Site recorded for every image.
    #[arg(long)]
    site: Option<String>,
    /// Labels: CSV (file path relative to INPUT, then one column per label) or JSON
    /// ({"path": {"label": value}}).
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Reports: a JSON file mapping each file path relative to INPUT to its report text, or a
    /// folder of DICOM Structured Reports (it may be INPUT itself), matched to images by study
    /// and the SR's evidence; of several, the verified, complete, final and latest wins. Each
    /// report is de-identified (names, dates shifted per patient, record numbers, phones,
    /// addresses, ages over 89, institutions; the headers' own identifiers first) and written
    /// beside its image as `<key>.txt`.
    #[arg(long)]
    reports: Option<PathBuf>,
    /// State that you read the reports the de-identification still doubts about and that they
    /// do not identify anyone; without it such files are refused.
    #[arg(long)]
    accept_report_doubts: bool,
    /// Target shard size in MiB.
    #[arg(long, default_value_t = 64.0)]
    shard_mib: f64,
}

/// Ingests `a.input` into `a.out`.
pub async fn run(a: IngestArgs) -> Result<()> {
    if a.salt.len() < 16 {
        bail!(
            "--salt (or RADFM_PSEUDONYM_SALT) must be at least 16 characters: it keeps the pseudonyms secret"
        );
    }
    if !a.input.contains("://") && !std::path::Path::new(&a.input).is_dir() {
        bail!("{}: not a folder", a.input);
    }
    let cfg = IngestConfig {
        input: a.input.clone(),
        output: a.out.clone(),
        deidentify: a.deidentify,
        accept_burned_in_risk: a.accept_burned_in_risk,
        refusals: a.refusals.clone(),
        salt: a.salt.into_bytes(),
        site: a.site,
        labels: a.labels,
        reports: a.reports.clone(),
        accept_report_doubts: a.accept_report_doubts,
        shard_bytes: shard_bytes(a.shard_mib)?,
    };
    let pb = bar(0, "ingest");
    let report = ingest(&cfg, &|done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    })
    .await?;
    pb.finish_and_clear();
    println!(
        "ingest: {} files, {} already ingested, {} samples in {} new shards at {}",
        report.files, report.already_done, report.samples, report.shards, a.out
    );
    if report.not_images > 0 {
        println!(
            "ingest: {} DICOM files are not images (Structured Reports, presentation states) and were skipped",
            report.not_images
        );
    }
    if a.reports.as_deref().is_some_and(std::path::Path::is_dir) {
        println!(
            "ingest: {} Structured Reports read",
            report.structured_reports
        );
    }
    if !report.refused.is_empty() {
        for r in &report.refused {
            eprintln!("{r}");
        }
        let listed = a
            .refusals
            .as_ref()
            .map_or(" (--refusals FILE lists their paths)".to_string(), |f| {
                format!(" (their paths are in {})", f.display())
            });
        bail!(
            "{} file(s) refused by the de-identification gate; nothing of them was written{listed}",
            report.refused.len()
        );
    }
    Ok(())
}
