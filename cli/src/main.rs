//! `radfm`: the command line. `main` parses and dispatches; each subcommand lives in its own
//! module, turns its flags into a validated configuration of the library crate it drives, and
//! runs it; errors name the file, URI or flag concerned.
//!
//! Built without the default `torch` feature, `radfm` links no libtorch: it keeps every data,
//! cluster and registry command and leaves `export`, `eval` and `validate` (which run the
//! encoder) to the full build or to `radfm-trainer`.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

mod cluster;
mod federate;
mod ingest;
#[cfg(feature = "torch")]
mod model;
#[cfg(feature = "torch")]
mod monitor;
mod registry;
mod report;
mod report_html;
mod run;
mod synth;
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
    Synth(synth::SynthArgs),
    /// Ingest DICOM, PNG and JPEG files into shards (identified DICOM is refused).
    Ingest(ingest::IngestArgs),
    /// Run a TrainingJob YAML on this machine: CPU worker processes, gang restarts, resume.
    Run(run::RunArgs),
    /// List TrainingJobs: kubectl's columns plus progress.
    Get(cluster::GetArgs),
    /// A TrainingJob in detail: spec in brief, status, conditions, workers, events.
    Describe(cluster::DescribeArgs),
    /// Logs of a rank's trainer container (its newest attempt's pod).
    Logs(cluster::LogsArgs),
    /// Export the newest checkpoint's encoder (timm names, safetensors) and its model card.
    #[cfg(feature = "torch")]
    Export(radfm_trainer::commands::ExportArgs),
    /// Compare an exported encoder with random initialisation by k-NN and linear probes.
    #[cfg(feature = "torch")]
    Eval(model::EvalCommand),
    /// Model registry: list, show, lineage, history, verify, register, promote, rollback.
    #[command(subcommand)]
    Registry(registry::RegistryCmd),
    /// Validate a candidate version on this site's labelled data and publish a signed report of
    /// aggregate metrics (no images, nothing per patient).
    #[cfg(feature = "torch")]
    Validate(validate::ValidateArgs),
    /// Look at the deployed model on this site's recent data: drift of embeddings, probe scores
    /// and metadata against a reference window, judged together and published as a signed
    /// monitor report (aggregates only).
    #[cfg(feature = "torch")]
    Monitor(monitor::MonitorArgs),
    /// Create a site's ed25519 signing key (DIR/SITE.key, mode 0600) and print its public key.
    Keygen(validate::KeygenArgs),
    /// Run the promotion gate of a PromotionPolicy once: decide on the candidate from the signed
    /// site reports, record the decision, move production on Promote.
    Gate(validate::GateArgs),
    /// Approve a candidate version as a person the PromotionPolicy lists: signs a statement with
    /// the approver's key and stores it beside the version.
    Approve(validate::ApproveArgs),
    /// Federated training through an exchange folder: publish, contribute, aggregate, status.
    #[command(subcommand)]
    Federate(federate::FederateCmd),
    /// Render a version's change-control record (lineage, data, site reports, forest plot, gate
    /// decision and reasons) as a static HTML page.
    Report(report::ReportArgs),
    /// Print the CRDs.
    Crd,
    /// Print the version.
    Version,
}

/// DICOM parsers reserve what a file declares; the ingest caps that per parse (see
/// `radfm_data::alloc_cap`).
#[global_allocator]
static ALLOCATOR: radfm_data::alloc_cap::Capped = radfm_data::alloc_cap::Capped;

#[tokio::main]
async fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Synth(a) => synth::run(a).await.context("radfm synth"),
        Command::Ingest(a) => ingest::run(a).await.context("radfm ingest"),
        Command::Run(a) => {
            let code = run::run(a).await.context("radfm run")?;
            std::process::exit(code)
        }
        Command::Get(a) => cluster::get(a).await.context("radfm get"),
        Command::Describe(a) => cluster::describe(a).await.context("radfm describe"),
        Command::Logs(a) => cluster::logs(a).await.context("radfm logs"),
        #[cfg(feature = "torch")]
        Command::Export(a) => model::export(a).await.context("radfm export"),
        #[cfg(feature = "torch")]
        Command::Eval(a) => model::eval(a).await.context("radfm eval"),
        Command::Registry(cmd) => registry::run(cmd).await.context("radfm registry"),
        #[cfg(feature = "torch")]
        Command::Validate(a) => validate::validate(a).await.context("radfm validate"),
        #[cfg(feature = "torch")]
        Command::Monitor(a) => monitor::run(a).await.context("radfm monitor"),
        Command::Keygen(a) => validate::keygen(&a.out, &a.site).context("radfm keygen"),
        Command::Gate(a) => validate::gate(a).await.context("radfm gate"),
        Command::Approve(a) => validate::approve(a).await.context("radfm approve"),
        Command::Report(a) => report::run(a).await.context("radfm report"),
        Command::Federate(cmd) => federate::run(cmd).await.context("radfm federate"),
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
