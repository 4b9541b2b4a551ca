//! `radfm synth`: a synthetic radiology-like cohort (sites, scanner shift, lesions, subgroups)
//! written as shards, for demos and tests without patient data.

use anyhow::{Result, bail};
use radfm_data::index::DatasetIndex;
use radfm_data::ingest::ShardSink;
use radfm_data::store::Location;
use radfm_data::synth::{Site, SynthConfig, cohort};

#[derive(clap::Args)]
pub struct SynthArgs {
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

fn lesion_radius(text: &str) -> Result<(f64, f64)> {
    let parsed = text
        .split_once(',')
        .and_then(|(a, b)| Some((a.trim().parse::<f64>().ok()?, b.trim().parse::<f64>().ok()?)));
    match parsed {
        Some((lo, hi)) if 0.0 < lo && lo <= hi && hi < 1.0 => Ok((lo, hi)),
        _ => bail!("--lesion-radius must be MIN,MAX with 0 < MIN <= MAX < 1, got {text:?}"),
    }
}

pub(crate) fn shard_bytes(mib: f64) -> Result<usize> {
    if !(mib > 0.0 && mib <= 16384.0) {
        bail!("--shard-mib must be within (0, 16384], got {mib}");
    }
    Ok((mib * 1048576.0) as usize)
}

pub(crate) fn bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(len);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
            .expect("static template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// Generates the cohort `a` describes.
pub async fn run(a: SynthArgs) -> Result<()> {
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
