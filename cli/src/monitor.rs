//! `radfm monitor`: one look at the deployed model on a site's recent data, judged and signed.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use radfm_registry::Registry;
use radfm_validation::monitor::{self, MonitorReport};

/// Arguments of `radfm monitor`.
#[derive(clap::Args)]
pub struct MonitorArgs {
    /// Model registry URI.
    #[arg(long)]
    pub registry: String,
    /// Model name.
    #[arg(long)]
    pub model: String,
    /// Version (number or alias) deployed at this site.
    #[arg(long, default_value = "production")]
    pub version: String,
    /// This site's identifier.
    #[arg(long)]
    pub site: String,
    /// File holding the site's ed25519 signing key (hex seed, `radfm keygen`).
    #[arg(long, env = "RADFM_SIGNING_KEY_FILE")]
    pub key_file: PathBuf,
    /// The reference window: the site's data the model was validated on (labelled when --task
    /// is given).
    #[arg(long)]
    pub reference: String,
    /// Shards of the reference dataset to use (`0-9,12`; default: every shard of its index).
    #[arg(long)]
    pub reference_shards: Option<String>,
    /// The site's recent cases (labels not needed; where they arrived, performance per
    /// subgroup cell is compared too).
    #[arg(long)]
    pub recent: String,
    /// Shards of the recent dataset to use (`40-59`; default: every shard of its index).
    #[arg(long)]
    pub recent_shards: Option<String>,
    /// The look this report answers, recorded in it (a ModelMonitor passes its pod's name).
    #[arg(long, value_parser = parse_look)]
    pub look: Option<String>,
    /// A 0/1 task whose probe, fitted on the reference window, scores both windows.
    #[arg(long)]
    pub task: Option<String>,
    /// Metadata fields whose mix is compared, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "manufacturer,sex,age_band"
    )]
    pub fields: Vec<String>,
    /// Smallest subgroup cell whose performance is reported once labels arrive (at least 10).
    #[arg(long, default_value_t = 20)]
    pub min_cell: usize,
    /// Drop in AUROC tolerated before a cell's performance counts as worse (late labels).
    #[arg(long, default_value_t = 0.02)]
    pub performance_margin: f64,
    /// Family-wise false-alarm level of the look (Holm over every statistic).
    #[arg(long, default_value_t = monitor::DEFAULT_ALPHA)]
    pub alpha: f64,
    /// Permutations behind each p-value.
    #[arg(long, default_value_t = radfm_validation::drift::PERMUTATIONS)]
    pub permutations: usize,
    /// Seed of subsampling and permutations.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// A look identifier: a Kubernetes object name, short enough to carry in a report.
fn parse_look(text: &str) -> Result<String, String> {
    let ok = !text.is_empty()
        && text.len() <= 253
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    ok.then(|| text.to_string())
        .ok_or_else(|| format!("{text:?} is not a lowercase object name of at most 253 characters"))
}

/// A shard selection argument, or why `flag` is wrong.
fn shards(flag: &str, text: Option<&str>) -> Result<Option<Vec<u64>>> {
    text.map(|t| {
        radfm_api::trainingjob::parse_shards(t).map_err(|e| anyhow::anyhow!("{flag} {t:?}: {e}"))
    })
    .transpose()
}

fn print_summary(r: &MonitorReport) {
    for w in &r.watched {
        println!(
            "{:<28} statistic {:>9.4}  p {:.4}  adjusted {:.4}{}",
            w.name,
            w.test.statistic,
            w.test.p_value,
            w.adjusted_p,
            if w.drifting { "  DRIFTING" } else { "" }
        );
    }
    for c in &r.performance {
        println!(
            "{:<28} AUROC {:.3} -> {:.3}, change {:+.3} [{:+.3}, {:+.3}] ({} -> {} labelled cases)",
            c.name(),
            c.reference_auroc.value,
            c.recent_auroc.value,
            c.change.value,
            c.change.lo,
            c.change.hi,
            c.reference_cases,
            c.recent_cases
        );
    }
    let verdict = if r.drifting { "drifting" } else { "stable" };
    println!(
        "{} v{} at {}: {verdict} (α = {})",
        r.model, r.version, r.site, r.alpha
    );
}

/// The shard selections of both windows, once every setting is checked.
type Windows = (Option<Vec<u64>>, Option<Vec<u64>>);

fn check(a: &MonitorArgs) -> Result<Windows> {
    if a.permutations < 19 {
        bail!(
            "--permutations {} is too few for p-values below 0.05 (at least 19)",
            a.permutations
        );
    }
    if !(0.0..1.0).contains(&a.performance_margin) {
        bail!(
            "--performance-margin must be in [0, 1), got {}",
            a.performance_margin
        );
    }
    radfm_validation::disclosure::check_settings(&a.fields, a.min_cell)
        .context("--fields and --min-cell")?;
    Ok((
        shards("--reference-shards", a.reference_shards.as_deref())?,
        shards("--recent-shards", a.recent_shards.as_deref())?,
    ))
}

/// Looks once, signs the report and stores it beside the version in the registry.
pub async fn run(a: MonitorArgs) -> Result<()> {
    let (reference_shards, recent_shards) = check(&a)?;
    let key = crate::validate::read_signing_key(&a.key_file)?;
    let reg = Registry::open(&a.registry)?;
    let deployed = reg
        .version(&a.model, reg.resolve(&a.model, &a.version).await?)
        .await?;
    let folder = deployed
        .spec
        .weights_uri
        .trim_end_matches(radfm_api::export_files::WEIGHTS)
        .trim_end_matches('/')
        .to_string();
    let outcome = radfm_trainer::monitor::monitor(&radfm_trainer::monitor::Request {
        model_uri: &folder,
        reference_uri: &a.reference,
        reference_shards: reference_shards.as_deref(),
        recent_uri: &a.recent,
        recent_shards: recent_shards.as_deref(),
        task: a.task.as_deref(),
        fields: &a.fields,
        min_cell: a.min_cell,
        performance_margin: a.performance_margin,
        permutations: a.permutations,
        seed: a.seed,
    })
    .await
    .context("monitoring")?;
    if outcome.weights_sha256 != deployed.spec.weights_sha256 {
        bail!(
            "the deployed model's weights ({}) are not the registered ones ({})",
            outcome.weights_sha256,
            deployed.spec.weights_sha256
        );
    }
    if a.task.is_some() && outcome.performance.is_empty() {
        eprintln!(
            "late labels: {} labelled recent cases, fewer than --min-cell {} or one class only: performance not assessed",
            outcome.labelled_recent, a.min_cell
        );
    }
    let (watched, drifting) =
        monitor::judge_look(outcome.tests, outcome.performance_tests, a.alpha)
            .context("--alpha and --permutations")?;
    let r = MonitorReport {
        format: monitor::FORMAT.into(),
        model: a.model.clone(),
        version: deployed.version,
        weights_sha256: deployed.spec.weights_sha256.clone(),
        site: a.site.clone(),
        reference_fingerprint: outcome.reference_fingerprint,
        recent_fingerprint: outcome.recent_fingerprint,
        created: jiff::Timestamp::now().to_string(),
        code_version: env!("CARGO_PKG_VERSION").into(),
        alpha: a.alpha,
        watched,
        drifting,
        performance: outcome.performance,
        look: a.look.clone(),
    };
    let signed = monitor::sign(&r, &key);
    let uri = reg
        .put_monitor_report(
            &a.model,
            deployed.version,
            &a.site,
            serde_json::to_vec_pretty(&signed)?,
        )
        .await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print_summary(&r);
        println!("signed monitor report: {uri}");
    }
    Ok(())
}
