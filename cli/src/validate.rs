//! `radfm keygen`, `radfm validate`, `radfm gate` and `radfm report`: site validation, the
//! promotion gate and the change-control record.

use std::path::PathBuf;

#[cfg(feature = "torch")]
use anyhow::bail;
use anyhow::{Context, Result};
use radfm_api::site_validation::{PromotionPolicy, PromotionPolicySpec};
use radfm_registry::Registry;
use radfm_validation::apply::{self, Gated};
use radfm_validation::report;
#[cfg(feature = "torch")]
use radfm_validation::report::SiteReport;

/// Arguments of `radfm validate`.
#[cfg(feature = "torch")]
#[derive(clap::Args)]
pub struct ValidateArgs {
    /// Model registry URI.
    #[arg(long)]
    pub registry: String,
    /// Model name.
    #[arg(long)]
    pub model: String,
    /// This site's identifier.
    #[arg(long)]
    pub site: String,
    /// File holding the site's ed25519 signing key (hex seed, `radfm keygen`).
    #[arg(long, env = "RADFM_SIGNING_KEY_FILE")]
    pub key_file: PathBuf,
    /// The site's labelled dataset URI (read here, never copied).
    #[arg(long)]
    pub dataset: String,
    /// Tasks: a 0/1 label, or FIELD=VALUE (repeatable).
    #[arg(long = "task", required = true)]
    pub tasks: Vec<String>,
    /// Subgroup fields, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "sex,age_band,manufacturer"
    )]
    pub subgroups: Vec<String>,
    /// Smallest subgroup cell reported (at least 10); smaller ones, and the cells that would
    /// reveal them by subtraction, are suppressed.
    #[arg(long, default_value_t = 20)]
    pub min_cell: usize,
    /// Version (number or alias) to validate.
    #[arg(long, default_value = "candidate")]
    pub candidate: String,
    /// Version (number or alias) compared against.
    #[arg(long, default_value = "production")]
    pub baseline: String,
    /// Bootstrap seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[cfg(feature = "torch")]
fn folder(weights_uri: &str) -> String {
    weights_uri
        .trim_end_matches(radfm_api::export_files::WEIGHTS)
        .trim_end_matches('/')
        .to_string()
}

/// The weights validated are the registered ones.
#[cfg(feature = "torch")]
fn check_weights(what: &str, loaded: &str, registered: &str) -> Result<()> {
    if loaded != registered {
        bail!("the {what}'s weights ({loaded}) are not the registered ones ({registered})");
    }
    Ok(())
}

/// One line per task: the overall comparison and what was reported or suppressed.
#[cfg(feature = "torch")]
fn print_summary(a: &ValidateArgs, r: &SiteReport) {
    for t in &r.tasks {
        let d = &t.overall.delta_auroc;
        println!(
            "{} v{} vs v{} at {}: {} AUROC {:.3} vs {:.3}, Δ {:+.3} [{:+.3}, {:+.3}] ({} cases, {} subgroups reported, {} suppressed)",
            a.model,
            r.candidate,
            r.baseline,
            a.site,
            t.task,
            t.overall.candidate.auroc.value,
            t.overall.baseline.auroc.value,
            d.value,
            d.lo,
            d.hi,
            t.overall.n,
            t.subgroups.len(),
            t.suppressed_cells
        );
    }
}

/// Validates a candidate on this site's data and publishes the signed report.
#[cfg(feature = "torch")]
pub async fn validate(a: ValidateArgs) -> Result<()> {
    radfm_validation::disclosure::check_settings(&a.subgroups, a.min_cell)
        .context("--min-cell / --subgroups")?;
    let key = read_signing_key(&a.key_file)?;
    let reg = Registry::open(&a.registry)?;
    let cand = reg
        .version(&a.model, reg.resolve(&a.model, &a.candidate).await?)
        .await?;
    let base = reg
        .version(&a.model, reg.resolve(&a.model, &a.baseline).await?)
        .await?;
    let outcome = radfm_trainer::site::validate(&radfm_trainer::site::Request {
        candidate_uri: &folder(&cand.spec.weights_uri),
        baseline_uri: &folder(&base.spec.weights_uri),
        dataset_uri: &a.dataset,
        tasks: &a.tasks,
        subgroups: &a.subgroups,
        min_cell: a.min_cell,
        seed: a.seed,
    })
    .await
    .context("validating")?;
    check_weights(
        "candidate",
        &outcome.candidate_sha256,
        &cand.spec.weights_sha256,
    )?;
    check_weights(
        "baseline",
        &outcome.baseline_sha256,
        &base.spec.weights_sha256,
    )?;
    let r = SiteReport {
        format: report::FORMAT.into(),
        model: a.model.clone(),
        candidate: cand.version,
        candidate_sha256: cand.spec.weights_sha256.clone(),
        baseline: base.version,
        baseline_sha256: base.spec.weights_sha256.clone(),
        site: a.site.clone(),
        dataset_fingerprint: outcome.dataset_fingerprint,
        created: jiff::Timestamp::now().to_string(),
        code_version: env!("CARGO_PKG_VERSION").into(),
        cases: outcome.cases,
        min_cell_size: a.min_cell,
        disclosure_method: radfm_validation::disclosure::METHOD.into(),
        tasks: outcome.tasks,
        representation_drift: outcome.representation_drift,
        data_drift: outcome.data_drift,
    };
    let signed = report::sign(&r, &key);
    let uri = reg
        .put_report(
            &a.model,
            cand.version,
            &a.site,
            serde_json::to_vec_pretty(&signed)?,
        )
        .await?;
    print_summary(&a, &r);
    println!("signed report: {uri}");
    Ok(())
}

/// The ed25519 signing key in `path` (hex seed, as `radfm keygen` writes it).
pub fn read_signing_key(path: &std::path::Path) -> Result<ed25519_dalek::SigningKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading --key-file {}", path.display()))?;
    report::signing_key(&text).with_context(|| format!("--key-file {}", path.display()))
}

/// Writes a new signing key and prints its public key.
pub fn keygen(out: &std::path::Path, site: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let key = report::generate_key();
    let path = out.join(format!("{site}.key"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| {
            format!(
                "creating {} (an existing key is never overwritten)",
                path.display()
            )
        })?;
    writeln!(f, "{}", hex::encode(key.to_bytes()))?;
    let public = report::public_hex(&key);
    std::fs::write(out.join(format!("{site}.pub")), format!("{public}\n"))?;
    println!("{public}");
    Ok(())
}

/// Reads a PromotionPolicy YAML (the resource, or only its spec).
pub fn read_policy(path: &std::path::Path) -> Result<PromotionPolicySpec> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let value: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&text).with_context(|| format!("{}", path.display()))?;
    let policy: PromotionPolicy = if value.get("kind").is_some() {
        serde_yaml_ng::from_value(value).with_context(|| format!("{}", path.display()))?
    } else {
        let spec =
            serde_yaml_ng::from_value(value).with_context(|| format!("{}", path.display()))?;
        PromotionPolicy::new("policy", spec)
    };
    policy
        .validate()
        .with_context(|| format!("{}", path.display()))?;
    Ok(policy.spec)
}

/// Arguments of `radfm keygen`.
#[derive(clap::Args)]
pub struct KeygenArgs {
    /// Folder for the key files.
    #[arg(long)]
    pub out: PathBuf,
    /// Site identifier (names the files).
    #[arg(long)]
    pub site: String,
}

/// Arguments of `radfm gate`.
#[derive(clap::Args)]
pub struct GateArgs {
    /// PromotionPolicy YAML (the resource or its spec).
    #[arg(long)]
    policy: PathBuf,
    /// Who decides (default: $USER).
    #[arg(long)]
    by: Option<String>,
    /// Print the decision as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs the promotion gate once and prints the decision.
pub async fn gate(a: GateArgs) -> Result<()> {
    let by =
        a.by.or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| "radfm".into());
    let json = a.json;
    let spec = read_policy(&a.policy)?;
    let reg = Registry::open(&spec.registry)?;
    match apply::gate(&reg, &spec, &by, jiff::Timestamp::now())
        .await?
        .gated
    {
        Gated::NothingToDecide { why } => println!("nothing to decide: {why}"),
        Gated::Decided { decision, recorded } => {
            if json {
                println!("{}", serde_json::to_string_pretty(&decision)?);
            } else {
                println!(
                    "{}: {} v{}",
                    decision.model,
                    decision.outcome.as_str(),
                    decision.candidate
                );
                for r in &decision.reasons {
                    println!("  - [{}] {}", r.code, r.message);
                }
                match recorded {
                    Some(seq) => println!("recorded as event {seq}"),
                    None => println!("(same decision as already recorded)"),
                }
            }
        }
    }
    Ok(())
}

/// Arguments of `radfm approve`.
#[derive(clap::Args)]
pub struct ApproveArgs {
    /// Registry URI.
    registry: String,
    /// Model.
    model: String,
    /// Version (number or alias) approved.
    version: String,
    /// The approver's name, as the PromotionPolicy's approvers list it.
    #[arg(long = "as")]
    approver: String,
    /// The approver's ed25519 key file (`radfm keygen`).
    #[arg(long, env = "RADFM_APPROVER_KEY_FILE")]
    key_file: PathBuf,
    /// Why (recorded with the decision).
    #[arg(long)]
    reason: String,
}

/// Signs and stores a person's approval of a candidate version.
pub async fn approve(a: ApproveArgs) -> Result<()> {
    let key = read_signing_key(&a.key_file)?;
    let reg = Registry::open(&a.registry)?;
    let v = reg
        .version(&a.model, reg.resolve(&a.model, &a.version).await?)
        .await?;
    let statement = radfm_validation::approval::Approval {
        format: radfm_validation::approval::FORMAT.into(),
        model: a.model.clone(),
        version: v.version,
        weights_sha256: v.spec.weights_sha256.clone(),
        approver: a.approver.clone(),
        created: jiff::Timestamp::now().to_string(),
        reason: a.reason,
    };
    let signed = radfm_validation::approval::sign(&statement, &key);
    let uri = reg
        .put_approval(
            &a.model,
            v.version,
            &a.approver,
            serde_json::to_vec(&signed)?,
        )
        .await?;
    println!(
        "{} approved {} v{} (key {}): {uri}",
        a.approver, a.model, v.version, signed.public_key
    );
    Ok(())
}
