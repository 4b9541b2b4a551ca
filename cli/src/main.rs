//! `radfm`: the command line. Each subcommand turns its flags into a validated configuration of
//! the library crate it drives, then runs it; errors name the file, URI or flag concerned.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use radfm_data::index::DatasetIndex;
use radfm_data::ingest::{IngestConfig, ShardSink, ingest};
use radfm_data::store::Location;
use radfm_data::synth::{Site, SynthConfig, cohort};

mod cluster;
mod registry;
mod report_html;
mod run;
mod validate;

#[derive(Parser)]
#[command(
    name = "radfm",
    version,
    about = "Radiology foundation models: data, training, validation"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a synthetic radiology-like cohort as shards.
    Synth(SynthArgs),
    /// Ingest DICOM, PNG and JPEG files into shards (identified DICOM is refused).
    Ingest(IngestArgs),
    /// Run a TrainingJob YAML on this machine: CPU worker processes, gang restarts, resume.
    Run(run::RunArgs),
    /// List TrainingJobs: kubectl's columns plus progress.
    Get {
        /// One job.
        name: Option<String>,
        #[command(flatten)]
        target: cluster::Target,
    },
    /// A TrainingJob in detail: spec in brief, status, conditions, workers, events.
    Describe {
        /// The job.
        name: String,
        #[command(flatten)]
        target: cluster::Target,
    },
    /// Logs of a rank's trainer container (its newest attempt's pod).
    Logs {
        /// The job.
        name: String,
        /// Worker rank.
        #[arg(long, default_value_t = 0)]
        rank: u32,
        /// Stream new lines.
        #[arg(long, short = 'f')]
        follow: bool,
        /// Last lines only.
        #[arg(long)]
        tail: Option<i64>,
        #[command(flatten)]
        target: cluster::Target,
    },
    /// Export the newest checkpoint's encoder (timm names, safetensors) and its model card.
    Export {
        /// Checkpoint folder URI (spec.checkpoint.uri).
        checkpoint: String,
        /// Output folder URI.
        out: String,
    },
    /// Compare an exported encoder with random initialisation by k-NN and linear probes.
    Eval {
        /// Exported model folder URI.
        #[arg(long)]
        model: String,
        /// Labelled dataset folder URI.
        #[arg(long)]
        dataset: String,
        /// 0/1 label of the samples, or FIELD=VALUE over labels and metadata.
        #[arg(long, default_value = "lesion")]
        label: String,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Model registry: list, show, lineage, history, register, promote, rollback.
    #[command(subcommand)]
    Registry(registry::RegistryCmd),
    /// Validate a candidate version on this site's labelled data and publish a signed report of
    /// aggregate metrics (no images, nothing per patient).
    Validate(validate::ValidateArgs),
    /// Create a site's ed25519 signing key (DIR/SITE.key, mode 0600) and print its public key.
    Keygen {
        /// Folder for the key files.
        #[arg(long)]
        out: PathBuf,
        /// Site identifier (names the files).
        #[arg(long)]
        site: String,
    },
    /// Run the promotion gate of a PromotionPolicy once: decide on the candidate from the signed
    /// site reports, record the decision, move production on Promote.
    Gate {
        /// PromotionPolicy YAML (the resource or its spec).
        #[arg(long)]
        policy: PathBuf,
        /// A human approval of this candidate version (policies with requireApproval).
        #[arg(long)]
        approve: Option<u64>,
        /// Who decides (default: $USER).
        #[arg(long)]
        by: Option<String>,
        /// Print the decision as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Render a version's change-control record (lineage, data, site reports, forest plot, gate
    /// decision and reasons) as a static HTML page.
    Report {
        /// Registry URI.
        #[arg(long)]
        registry: String,
        /// Model.
        model: String,
        /// Version number or alias (default: the newest).
        version: Option<String>,
        /// PromotionPolicy YAML, to show its rules and check keys against its trusted sites.
        #[arg(long)]
        policy: Option<PathBuf>,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the CRDs.
    Crd,
    /// Print the version.
    Version,
}

#[derive(clap::Args)]
struct SynthArgs {
    /// Output dataset folder URI (file://, s3://, gs://, az://, or an absolute path).
    #[arg(long)]
    out: String,
    /// Number of images.
    #[arg(long, default_value_t = 512)]
    samples: usize,
    /// Image width and height.
    #[arg(long, default_value_t = 128)]
    size: u32,
    /// Site names, comma-separated.
    #[arg(long, default_value = "site-a,site-b", value_delimiter = ',')]
    sites: Vec<String>,
    /// A site whose scanner is strongly shifted (noise, contrast, blur, resolution).
    #[arg(long)]
    shift_site: Option<String>,
    /// Fraction of images with a lesion.
    #[arg(long, default_value_t = 0.3)]
    lesion_prevalence: f64,
    /// Lesion radius range MIN,MAX as a fraction of the field of view's half-width.
    #[arg(long, default_value = "0.04,0.09")]
    lesion_radius: String,
    /// Fraction of female patients.
    #[arg(long, default_value_t = 0.5)]
    female_fraction: f64,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Index of the first sample (to add new samples to an existing cohort).
    #[arg(long, default_value_t = 0)]
    first_index: usize,
    /// Target shard size in MiB.
    #[arg(long, default_value_t = 64.0)]
    shard_mib: f64,
}

#[derive(clap::Args)]
struct IngestArgs {
    /// Input folder, or object-store prefix URI (s3://, gs://, az://).
    input: String,
    /// Output dataset folder URI.
    #[arg(long)]
    out: String,
    /// Strip identifiers (documented PS3.15 subset) instead of refusing identified DICOM.
    #[arg(long)]
    deidentify: bool,
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
    /// Target shard size in MiB.
    #[arg(long, default_value_t = 64.0)]
    shard_mib: f64,
}

fn lesion_radius(text: &str) -> Result<(f64, f64)> {
    let parsed = text
        .split_once(',')
        .and_then(|(a, b)| Some((a.trim().parse::<f64>().ok()?, b.trim().parse::<f64>().ok()?)));
    match parsed {
        Some((lo, hi)) if 0.0 < lo && lo <= hi && hi < 1.0 => Ok((lo, hi)),
        _ => bail!("--lesion-radius must be MIN,MAX with 0 < MIN <= MAX < 1, got {text:?}"),
    }
}

fn shard_bytes(mib: f64) -> Result<usize> {
    if !(mib > 0.0 && mib <= 16384.0) {
        bail!("--shard-mib must be within (0, 16384], got {mib}");
    }
    Ok((mib * 1048576.0) as usize)
}

fn bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(len);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
            .expect("static template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

async fn synth(a: SynthArgs) -> Result<()> {
    if !(0.0..=1.0).contains(&a.lesion_prevalence) {
        bail!(
            "--lesion-prevalence must be within 0..1, got {}",
            a.lesion_prevalence
        );
    }
    if !(0.0..=1.0).contains(&a.female_fraction) {
        bail!(
            "--female-fraction must be within 0..1, got {}",
            a.female_fraction
        );
    }
    if a.size < 16 {
        bail!("--size must be at least 16, got {}", a.size);
    }
    if let Some(s) = &a.shift_site
        && !a.sites.contains(s)
    {
        bail!(
            "--shift-site {s} is not one of --sites {}",
            a.sites.join(",")
        );
    }
    let sites = a
        .sites
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let site = Site::standard(name, i);
            if a.shift_site.as_deref() == Some(name) {
                site.shifted()
            } else {
                site
            }
        })
        .collect();
    let cfg = SynthConfig {
        samples: a.samples,
        size: a.size,
        sites,
        lesion_prevalence: a.lesion_prevalence,
        lesion_radius: lesion_radius(&a.lesion_radius)?,
        female_fraction: a.female_fraction,
        seed: a.seed,
        first_index: a.first_index,
    };
    write_cohort(&cfg, &a.out, shard_bytes(a.shard_mib)?).await
}

/// A default synthetic cohort (two sites) of `samples` images of side `size` into `uri`.
pub(crate) async fn synth_into(uri: &str, samples: usize, size: u32, seed: u64) -> Result<()> {
    let cfg = SynthConfig {
        samples,
        size,
        seed,
        ..Default::default()
    };
    write_cohort(&cfg, uri, shard_bytes(64.0)?).await
}

async fn write_cohort(cfg: &SynthConfig, out: &str, shard_bytes: usize) -> Result<()> {
    let loc = Location::open(out)?;
    let mut sink = ShardSink::new(loc.clone(), shard_bytes);
    let pb = bar(cfg.samples as u64, "synth");
    for s in cohort(cfg) {
        sink.add(&s, None).await?;
        pb.inc(1);
    }
    sink.flush().await?;
    pb.finish_and_clear();
    let index = DatasetIndex::load(&loc).await?;
    println!(
        "synth: {} samples in {} new shards at {} (dataset: {} shards, {} samples, mean {:.1}, std {:.1})",
        sink.samples_written,
        sink.shards_written,
        out,
        index.shards.len(),
        index.samples(),
        index.stats.mean,
        index.stats.std
    );
    Ok(())
}

async fn run_ingest(a: IngestArgs) -> Result<()> {
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
        salt: a.salt.into_bytes(),
        site: a.site,
        labels: a.labels,
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
    if !report.refused.is_empty() {
        for r in &report.refused {
            eprintln!("{r}");
        }
        bail!(
            "{} file(s) refused by the de-identification gate; nothing of them was written",
            report.refused.len()
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Synth(a) => synth(a).await.context("radfm synth"),
        Command::Ingest(a) => run_ingest(a).await.context("radfm ingest"),
        Command::Run(a) => {
            let code = run::run(a).await.context("radfm run")?;
            std::process::exit(code)
        }
        Command::Get { name, target } => cluster::get(name, target).await.context("radfm get"),
        Command::Describe { name, target } => cluster::describe(name, target)
            .await
            .context("radfm describe"),
        Command::Logs {
            name,
            rank,
            follow,
            tail,
            target,
        } => cluster::logs(name, rank, follow, tail, target)
            .await
            .context("radfm logs"),
        Command::Export { checkpoint, out } => {
            let card = radfm_trainer::export::export(&checkpoint, &out)
                .await
                .context("radfm export")?;
            println!(
                "exported {} ({} parameters, step {}, loss {}) to {out}",
                card.architecture,
                card.parameters,
                card.steps,
                card.final_loss.map_or("-".into(), |l| format!("{l:.4}"))
            );
            Ok(())
        }
        Command::Eval {
            model,
            dataset,
            label,
            json,
        } => {
            let c = radfm_trainer::eval::compare(&model, &dataset, &label, 0)
                .await
                .context("radfm eval")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&c)?);
            } else {
                println!(
                    "label {label:?}: {} training and {} held-out samples",
                    c.pretrained.train, c.pretrained.test
                );
                println!(
                    "{:<12} {:>12} {:>12} {:>12} {:>12}",
                    "encoder", "k-NN AUROC", "k-NN bal.acc", "lin. AUROC", "lin. bal.acc"
                );
                for (name, r) in [
                    ("pretrained", &c.pretrained),
                    ("random init", &c.random_init),
                ] {
                    println!(
                        "{name:<12} {:>12.3} {:>12.3} {:>12.3} {:>12.3}",
                        r.knn.auroc,
                        r.knn.balanced_accuracy,
                        r.linear.auroc,
                        r.linear.balanced_accuracy
                    );
                }
            }
            Ok(())
        }
        Command::Registry(cmd) => registry::run(cmd).await.context("radfm registry"),
        Command::Validate(a) => validate::validate(a).await.context("radfm validate"),
        Command::Keygen { out, site } => validate::keygen(&out, &site).context("radfm keygen"),
        Command::Gate {
            policy,
            approve,
            by,
            json,
        } => {
            let by = by
                .or_else(|| std::env::var("USER").ok())
                .unwrap_or_else(|| "radfm".into());
            validate::gate(&policy, approve, &by, json)
                .await
                .context("radfm gate")
        }
        Command::Report {
            registry,
            model,
            version,
            policy,
            out,
        } => {
            let policy = policy.map(|p| validate::read_policy(&p)).transpose()?;
            let html = report_html::render(&registry, &model, version.as_deref(), policy.as_ref())
                .await
                .context("radfm report")?;
            std::fs::write(&out, html).with_context(|| format!("writing {}", out.display()))?;
            println!("wrote {}", out.display());
            Ok(())
        }
        Command::Crd => {
            for (_, yaml) in radfm_operator::crdgen::crds() {
                print!("---\n{yaml}");
            }
            Ok(())
        }
        Command::Version => {
            println!("radfm {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    }
}
