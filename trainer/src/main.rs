//! `radfm-trainer`: the process each trainer pod (or local worker) runs.
//!
//! `train` reads the env contract (or `--job FILE`), trains, and exits with a code from
//! docs/exit-codes.md; SIGTERM writes a checkpoint and exits 77 (retryable). `config` prints
//! the resolved configuration; `export` and `eval` work on finished checkpoints.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use clap::{Parser, Subcommand};
use radfm_trainer::commands::{EvalArgs, ExportArgs};
use radfm_trainer::{Error, TrainConfig, export, train};

#[derive(Parser)]
#[command(
    name = "radfm-trainer",
    version,
    about = "radfm's MAE pretraining process"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train (resuming from the newest committed checkpoint, if any).
    Train {
        /// A TrainingJob YAML file to run as one local process instead of the env contract.
        #[arg(long)]
        job: Option<PathBuf>,
    },
    /// Print the resolved configuration as JSON, or exit 64 naming the bad variable.
    Config {
        /// A TrainingJob YAML file instead of the env contract.
        #[arg(long)]
        job: Option<PathBuf>,
    },
    /// Export the newest checkpoint's encoder (timm names, safetensors) and a model card.
    Export(ExportArgs),
    /// k-NN and linear-probe evaluation of an exported encoder against random initialisation;
    /// with --zero-shot, findings queried by text and retrieval.
    Eval(EvalArgs),
    /// Print the version.
    Version,
}

fn config(job: Option<PathBuf>) -> Result<TrainConfig, Error> {
    let env = |k: &str| std::env::var(k).ok();
    match job {
        Some(path) => TrainConfig::from_job_file(&path, env),
        None => TrainConfig::from_lookup(env),
    }
}

fn fail(e: Error) -> ExitCode {
    eprintln!("radfm-trainer: {e}");
    ExitCode::from(e.exit_code() as u8)
}

fn print_json<T: serde::Serialize>(r: Result<T, Error>) -> ExitCode {
    match r {
        Ok(v) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&v).expect("serialisable")
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn main() -> ExitCode {
    radfm_trainer::allocator::keep_tensor_memory();
    let cli = Cli::parse();
    match cli.command {
        Command::Config { job } => match config(job) {
            Ok(c) => {
                println!("{}", serde_json::to_string(&c).expect("config serialises"));
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        Command::Train { job } => {
            let cfg = match config(job) {
                Ok(c) => c,
                Err(e) => return fail(e),
            };
            // The pod's entry process launches one trainer per local device.
            if cfg.nproc_per_node > 1 && std::env::var(radfm_trainer::config::LOCAL_RANK).is_err() {
                return ExitCode::from(radfm_trainer::launch::run(cfg.nproc_per_node) as u8);
            }
            let hooks = train::Hooks {
                stop: Arc::new(AtomicBool::new(false)),
                ..Default::default()
            };
            for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
                if let Err(e) = signal_hook::flag::register(sig, hooks.stop.clone()) {
                    eprintln!("radfm-trainer: cannot handle signal {sig}: {e}");
                }
            }
            match train::run(&cfg, &hooks) {
                Ok(s) => {
                    let done = serde_json::json!({
                        "event": "done",
                        "steps": s.steps,
                        "final_loss": s.losses.last().map(|l| l.1),
                        "images_per_s": s.images_per_s,
                        "checkpoint": s.checkpoint,
                    });
                    if cfg.rank == 0 {
                        if let Some(out) = &cfg.export_uri {
                            match runtime().block_on(export::export(&cfg.checkpoint_uri, out)) {
                                Ok(card) => println!(
                                    "{}",
                                    serde_json::json!({"event": "exported", "uri": out, "weights_sha256": card.weights_sha256})
                                ),
                                Err(e) => return fail(e),
                            }
                        }
                        println!("{done}");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        Command::Export(a) => print_json(runtime().block_on(a.run())),
        Command::Eval(a) if a.zero_shot => print_json(runtime().block_on(a.run_zero_shot())),
        Command::Eval(a) => print_json(runtime().block_on(a.run())),
        Command::Version => {
            println!("radfm-trainer {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
    }
}
