//! `radfm-operator`: the TrainingJob and ContinualTraining controllers, and `radfm-operator crd` to print the CRDs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use radfm_operator::context::{Clock, Context};
use radfm_operator::leader::Elector;
use radfm_operator::metrics::{self, Metrics};
use radfm_operator::{
    continual_training, crdgen, federated_site, federated_training, model_monitor,
    promotion_policy, site_validator, telemetry, training_job,
};
use tokio::sync::watch;
use tracing::{error, info, warn};

#[derive(Parser)]
#[command(
    name = "radfm-operator",
    version,
    about = "Runs radfm TrainingJobs on Kubernetes"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller (the default).
    Run(Box<RunArgs>),
    /// Print the CRDs as YAML, or write them into a folder.
    Crd {
        /// Folder to write one file per CRD into.
        #[arg(long)]
        out_dir: Option<std::path::PathBuf>,
        /// Print the Markdown field reference instead.
        #[arg(long)]
        reference: bool,
        /// Also write Argo CD's health checks of every kind into this folder.
        #[arg(long)]
        argocd_out_dir: Option<std::path::PathBuf>,
    },
}

#[derive(Parser)]
#[command(name = "run")]
struct RunArgs {
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "RADFM_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Only one replica reconciles; the others wait on a Lease.
    #[arg(long, env = "RADFM_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Lease name.
    #[arg(long, env = "RADFM_LEASE_NAME", default_value = "radfm-operator")]
    lease_name: String,
    /// Lease namespace (default: the pod's namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "radfm-system")]
    lease_namespace: String,
    /// Lease duration in seconds.
    #[arg(long, env = "RADFM_LEASE_SECONDS", default_value_t = 15)]
    lease_seconds: u64,
    /// This replica's identity (default: the pod name or host name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Watch one namespace only (default: all).
    #[arg(long, env = "RADFM_WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Plain-text logs instead of JSON.
    #[arg(long, env = "RADFM_LOG_TEXT")]
    log_text: bool,
    /// Testing only: read the ContinualTraining controller's "now" (RFC 3339) from this file on
    /// every pass instead of the wall clock.
    #[arg(long, hide = true)]
    clock_file: Option<std::path::PathBuf>,
    /// What users' resources may add to the pods the operator creates.
    #[command(flatten)]
    pod_policy: radfm_operator::pod_policy::PodPolicy,
    /// Create a NetworkPolicy per TrainingJob that admits only the gang's own pods to its
    /// workers (rendezvous, ring, NCCL bootstrap).
    #[arg(long, env = "RADFM_GANG_NETWORK_POLICY", default_value_t = true, action = clap::ArgAction::Set)]
    gang_network_policy: bool,
    /// Which registries each namespace may use.
    #[command(flatten)]
    registry_access: radfm_operator::registry_access::RegistryAccess,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Crd {
            reference: true, ..
        }) => {
            print!("{}", crdgen::reference());
            Ok(())
        }
        Some(Command::Crd {
            out_dir,
            argocd_out_dir,
            ..
        }) => {
            if let Some(dir) = argocd_out_dir {
                write_argocd(&dir)?;
            }
            print_crds(out_dir)
        }
        Some(Command::Run(args)) => run(*args).await,
        None => run(<RunArgs as clap::Parser>::parse_from(["run"])).await,
    }
}

fn print_crds(out_dir: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    for (name, yaml) in crdgen::crds() {
        match &out_dir {
            Some(dir) => {
                let path = dir.join(name);
                std::fs::write(&path, yaml)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            None => print!("---\n{yaml}"),
        }
    }
    Ok(())
}

fn write_argocd(dir: &std::path::Path) -> anyhow::Result<()> {
    for (name, content) in crdgen::argocd() {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, content).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}

async fn serve_metrics(addr: SocketAddr, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    info!(addr = %listener.local_addr()?, "serving /metrics /healthz /readyz");
    let router = metrics::router(metrics);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            error!(error = %e, "metrics server stopped");
        }
    });
    Ok(())
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Waits for the leader lease (meanwhile a follower is ready but not leading). None without
/// leader election, or when a stop came first (the caller reads `stop_rx` to tell them apart).
async fn lead(
    args: &RunArgs,
    client: &kube::Client,
    identity: &str,
    metrics: &Metrics,
    stop_rx: watch::Receiver<bool>,
) -> Option<Arc<Elector>> {
    if !args.leader_elect {
        return None;
    }
    let elector = Elector::new(
        client.clone(),
        &args.lease_namespace,
        &args.lease_name,
        identity,
        Duration::from_secs(args.lease_seconds),
    );
    let retry = elector.duration / 3;
    info!(%identity, lease = %args.lease_name, "waiting for the leader lease");
    loop {
        match elector.try_lead().await {
            Ok(true) => break,
            Ok(false) => metrics.set_ready(),
            Err(e) => warn!(error = %e, "leader election"),
        }
        tokio::select! {
            _ = tokio::time::sleep(retry) => {},
            _ = stopped(stop_rx.clone()) => return None,
        }
    }
    info!(%identity, "became leader");
    Some(Arc::new(elector))
}

/// Renews the lease; losing it for a whole lease duration sends on the returned channel (the
/// controllers stop, and the pod restarts as a follower), so two leaders never act together
/// for long.
fn keep_leading(elector: Option<Arc<Elector>>, metrics: Arc<Metrics>) -> watch::Receiver<bool> {
    let (lost_tx, lost_rx) = watch::channel(false);
    let Some(elector) = elector else {
        return lost_rx;
    };
    tokio::spawn(async move {
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(elector.duration / 3).await;
            match elector.try_lead().await {
                Ok(true) => last_ok = tokio::time::Instant::now(),
                Ok(false) => {
                    warn!("leader lease taken by another replica");
                    break;
                }
                Err(e) if last_ok.elapsed() < elector.duration => {
                    warn!(error = %e, "renewing the lease")
                }
                Err(e) => {
                    error!(error = %e, "could not renew the lease for a whole lease duration");
                    break;
                }
            }
        }
        metrics.set_leader(false);
        let _ = lost_tx.send(true);
    });
    lost_rx
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let _guard = telemetry::init("radfm-operator", !args.log_text);
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (kubeconfig or in-cluster)")?;
    let metrics = Arc::new(Metrics::default());
    serve_metrics(args.metrics_addr, metrics.clone()).await?;
    let identity = args.identity.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "radfm-operator".into())
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        info!("shutdown requested");
        let _ = stop_tx.send(true);
    });
    let elector = lead(&args, &client, &identity, &metrics, stop_rx.clone()).await;
    if *stop_rx.borrow() {
        return Ok(());
    }
    metrics.set_ready();
    metrics.set_leader(true);
    let lost_rx = keep_leading(elector.clone(), metrics.clone());
    let shutdown = || {
        let (stop, lost) = (stop_rx.clone(), lost_rx.clone());
        async move {
            tokio::select! {
                _ = stopped(stop) => {},
                _ = stopped(lost) => {},
            }
        }
    };
    let mut ctx = Context::new(client, metrics.clone(), Some(identity));
    ctx.pod_policy = args.pod_policy.clone();
    ctx.registry_access = args.registry_access.clone();
    ctx.gang_network_policy = args.gang_network_policy;
    ctx.kueue = training_job::workloads::kueue_served(&ctx.client).await;
    info!(kueue = ctx.kueue, "Kueue's Workload API served");
    // The clock file moves schedules and round deadlines only: pods and the API server keep
    // the wall clock.
    let schedules = Arc::new(ctx.with_clock(args.clock_file.map_or(Clock::Wall, Clock::File)));
    let ctx = Arc::new(ctx);
    let ns = &args.namespace;
    tokio::join!(
        training_job::run_controller(ctx.clone(), ns.clone(), shutdown()),
        continual_training::run_controller(schedules.clone(), ns.clone(), shutdown()),
        site_validator::run_controller(ctx.clone(), ns.clone(), shutdown()),
        promotion_policy::run_controller(ctx.clone(), ns.clone(), shutdown()),
        federated_training::run_controller(schedules.clone(), ns.clone(), shutdown()),
        model_monitor::run_controller(schedules, ns.clone(), shutdown()),
        federated_site::run_controller(ctx.clone(), ns.clone(), shutdown()),
        async {
            if ctx.kueue {
                training_job::workloads::run_release_controller(
                    ctx.clone(),
                    ns.clone(),
                    shutdown(),
                )
                .await;
            }
        },
    );
    if *lost_rx.borrow() {
        anyhow::bail!("lost the leader lease");
    }
    if let Some(elector) = elector {
        elector.release().await.ok();
        info!("leader lease released");
    }
    Ok(())
}
