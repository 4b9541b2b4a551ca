//! `radfm report`: a version's change-control record as one static HTML page
//! ([`crate::report_html`]).

use std::path::PathBuf;

use anyhow::{Context, Result};

/// Arguments of `radfm report`.
#[derive(clap::Args)]
pub struct ReportArgs {
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
}

/// Renders and writes the page.
pub async fn run(a: ReportArgs) -> Result<()> {
    let policy = a
        .policy
        .map(|p| crate::validate::read_policy(&p))
        .transpose()?;
    let html =
        crate::report_html::render(&a.registry, &a.model, a.version.as_deref(), policy.as_ref())
            .await?;
    std::fs::write(&a.out, html).with_context(|| format!("writing {}", a.out.display()))?;
    println!("wrote {}", a.out.display());
    Ok(())
}
