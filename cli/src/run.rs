//! `radfm run FILE`: a TrainingJob on this machine, no cluster.
//!
//! The workers are `radfm-trainer` processes whose environment comes from the same builder the
//! operator uses for pods ([`EnvContract::for_worker`]), so a job that runs here runs the same
//! way in a cluster. Failures follow the operator's semantics: every failed worker is classified
//! by the job's failure policy (default: the exit-code table), the harshest verdict wins, and a
//! gang restart starts all workers again as the next attempt, resuming from the last
//! checkpoint, until `runPolicy.backoffLimit` counted restarts. Ctrl-C makes the workers write a
//! checkpoint and stop; running the same file again resumes.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use radfm_api::TrainingJob;
use radfm_api::env::EnvContract;
use radfm_api::failure::{self, GangVerdict, WorkerFailure};

/// Flags of `radfm run`.
#[derive(clap::Args)]
pub struct RunArgs {
    /// TrainingJob YAML file.
    pub file: PathBuf,
    /// Worker processes (default: spec.workers.replicas).
    #[arg(long)]
    pub workers: Option<i32>,
    /// Override spec.training.steps.
    #[arg(long)]
    pub steps: Option<i64>,
    /// Override spec.model.objective: `contrastive`, `mae,contrastive`, `mae=1,contrastive=0.5`.
    #[arg(long)]
    pub objective: Option<String>,
    /// Override spec.dataset.uri.
    #[arg(long)]
    pub dataset: Option<String>,
    /// Override spec.checkpoint.uri.
    #[arg(long)]
    pub checkpoint: Option<String>,
    /// Append rank 0's JSON progress lines to this file.
    #[arg(long)]
    pub log: Option<PathBuf>,
    /// Write the loss curve as SVG to this file when the run ends.
    #[arg(long)]
    pub loss_plot: Option<PathBuf>,
    /// Samples of the synthetic cohort generated when the dataset is empty.
    #[arg(long, default_value_t = 512)]
    pub synth_samples: usize,
    /// No progress bar (JSON lines still go to --log).
    #[arg(long)]
    pub quiet: bool,
}

/// What to do after every worker of an attempt has exited: `None` when every worker succeeded,
/// else the gang verdict the operator would reach for the same exit codes.
pub fn decide(job: &TrainingJob, codes: &[i32], counted_restarts: i32) -> Option<GangVerdict> {
    let failures: Vec<WorkerFailure> = codes
        .iter()
        .enumerate()
        .filter(|(_, c)| **c != 0)
        .map(|(rank, &c)| WorkerFailure {
            rank: rank as i32,
            exit_code: Some(c),
            ..Default::default()
        })
        .collect();
    failure::gang_verdict(
        job.spec.failure_policy.as_ref(),
        &failures,
        counted_restarts,
        job.spec.run_policy.backoff_limit,
    )
}

/// The loss curve as a standalone SVG (step on x, loss on y).
pub fn loss_svg(points: &[(i64, f64)], title: &str) -> String {
    let (w, h, m) = (640.0, 360.0, 48.0);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{m}\" y=\"24\" font-family=\"sans-serif\" font-size=\"14\">{}</text>\n",
        escape(title)
    );
    let finite: Vec<(i64, f64)> = points.iter().copied().filter(|p| p.1.is_finite()).collect();
    if let (Some(first), Some(last)) = (finite.first(), finite.last()) {
        let (x0, x1) = (first.0 as f64, (last.0 as f64).max(first.0 as f64 + 1.0));
        let lo = finite.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        let hi = finite.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
        let (lo, hi) = if hi > lo {
            (lo, hi)
        } else {
            (lo - 0.5, hi + 0.5)
        };
        let px = |x: f64| m + (x - x0) / (x1 - x0) * (w - 2.0 * m);
        let py = |y: f64| h - m - (y - lo) / (hi - lo) * (h - 2.0 * m);
        let path: Vec<String> = finite
            .iter()
            .map(|&(s, l)| format!("{:.1},{:.1}", px(s as f64), py(l)))
            .collect();
        svg.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\" points=\"{}\"/>\n",
            path.join(" ")
        ));
        for (y, label) in [(lo, lo), (hi, hi)] {
            svg.push_str(&format!(
                "<text x=\"4\" y=\"{:.1}\" font-family=\"sans-serif\" font-size=\"11\">{label:.3}</text>\n",
                py(y) + 4.0
            ));
        }
        svg.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" font-family=\"sans-serif\" font-size=\"11\">step {}</text>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" font-family=\"sans-serif\" font-size=\"11\" text-anchor=\"end\">step {}</text>\n",
            m,
            h - m + 16.0,
            first.0,
            w - m,
            h - m + 16.0,
            last.0
        ));
        svg.push_str(&format!(
            "<line x1=\"{m}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"black\"/>\n\
             <line x1=\"{m}\" y1=\"{m}\" x2=\"{m}\" y2=\"{:.1}\" stroke=\"black\"/>\n",
            h - m,
            w - m,
            h - m,
            h - m
        ));
    }
    svg.push_str("</svg>\n");
    svg
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The `radfm-trainer` binary: next to this executable, else on PATH.
fn trainer_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("radfm-trainer")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("radfm-trainer"))
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Reads the file into a job with the command line's overrides applied, for CPU workers.
pub fn load_job(a: &RunArgs) -> Result<TrainingJob> {
    let path = a.file.display().to_string();
    let text = std::fs::read_to_string(&a.file).with_context(|| format!("reading {path}"))?;
    let mut job = TrainingJob::from_yaml(&text, &path)?;
    if job.metadata.name.is_none() {
        bail!("{path}: metadata.name is required");
    }
    if let Some(n) = a.workers {
        if n < 1 {
            bail!("--workers must be at least 1, got {n}");
        }
        job.spec.workers.replicas = n;
    }
    if let Some(s) = a.steps {
        if s < 1 {
            bail!("--steps must be at least 1, got {s}");
        }
        job.spec.training.steps = Some(s);
        job.spec.training.epochs = None;
    }
    if let Some(o) = &a.objective {
        job.spec.model.objective = radfm_api::trainingjob::Objective::from_env(o)
            .map_err(|e| anyhow::anyhow!("--objective {o:?}: {e}"))?;
    }
    if let Some(d) = &a.dataset {
        job.spec.dataset.uri = d.clone();
    }
    if let Some(c) = &a.checkpoint {
        job.spec.checkpoint.uri = c.clone();
    }
    // Local workers are CPU processes, one per worker.
    job.spec.workers.gpus_per_worker = 0;
    job.spec.workers.nproc_per_node = Some(1);
    job.metadata.namespace.get_or_insert_with(|| "local".into());
    Ok(job)
}

/// Generates a synthetic cohort into the dataset when it has no shards yet.
async fn ensure_data(job: &TrainingJob, samples: usize) -> Result<()> {
    use radfm_data::index::DatasetIndex;
    use radfm_data::store::Location;
    let uri = &job.spec.dataset.uri;
    let loc = Location::open(uri).with_context(|| format!("dataset {uri}"))?;
    let index = DatasetIndex::load(&loc)
        .await
        .with_context(|| format!("dataset {uri} is unreachable or unreadable"))?;
    if index.shards.is_empty() {
        eprintln!(
            "radfm run: {uri} has no shards; generating a synthetic cohort of {samples} images"
        );
        crate::synth::synth_into(uri, samples, job.spec.model.image_size as u32, 1).await?;
    }
    Ok(())
}

/// What the run shows and keeps of rank 0's JSON lines: a progress bar, the `--log` file and
/// the loss curve.
struct Progress {
    bar: indicatif::ProgressBar,
    log: Option<std::fs::File>,
    losses: Vec<(i64, f64)>,
    workers: usize,
}

impl Progress {
    fn new(a: &RunArgs, workers: usize) -> Result<Progress> {
        let log = match &a.log {
            Some(p) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .with_context(|| format!("opening {}", p.display()))?,
            ),
            None => None,
        };
        Ok(Progress {
            bar: indicatif::ProgressBar::hidden(),
            log,
            losses: Vec::new(),
            workers,
        })
    }

    /// A fresh bar for the attempt.
    fn attempt(&mut self, quiet: bool, name: &str, attempt: i32, steps: u64) {
        self.bar = if quiet {
            indicatif::ProgressBar::hidden()
        } else {
            indicatif::ProgressBar::new(steps)
        };
        self.bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}",
            )
            .expect("template")
            .progress_chars("=> "),
        );
        self.bar.set_prefix(format!("{name} attempt {attempt}"));
    }

    fn line(&mut self, v: &serde_json::Value) -> Result<()> {
        if let Some(l) = self.log.as_mut() {
            writeln!(l, "{v}")?;
        }
        match v["event"].as_str() {
            Some("start") => {
                self.bar.set_length(v["total_steps"].as_u64().unwrap_or(0));
                if let Some(s) = v["resumed_from"].as_u64() {
                    self.bar.set_position(s);
                    self.bar.suspend(|| {
                        eprintln!("radfm run: resuming from the checkpoint of step {s}")
                    });
                }
            }
            Some("step") => {
                let (step, loss) = (v["step"].as_i64().unwrap_or(0), v["loss"].as_f64());
                self.bar.set_position(step as u64);
                self.bar.set_message(format!(
                    "loss {:.4} {:.0} img/s",
                    loss.unwrap_or(f64::NAN),
                    v["images_per_s"].as_f64().unwrap_or(0.0) * self.workers as f64
                ));
                if let Some(l) = loss {
                    self.losses.push((step, l));
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// The attempt's gang secret, in a file only this user can read (kept until the attempt ends),
/// as the operator mounts one into a job's pods: other local users cannot join the gang.
fn gang_secret_file() -> Result<tempfile::NamedTempFile> {
    use std::io::Write;
    let mut f = tempfile::Builder::new()
        .prefix("radfm-gang-")
        .tempfile()
        .context("creating the gang secret file")?;
    f.write_all(
        radfm_collective::auth::GangSecret::generate()
            .to_hex()
            .as_bytes(),
    )?;
    f.flush()?;
    Ok(f)
}

/// Starts one `radfm-trainer train` per rank with the env the operator gives a worker pod;
/// rank 0's stdout is piped.
fn spawn_gang(
    job: &TrainingJob,
    attempt: i32,
    threads: usize,
    secret: &std::path::Path,
) -> Result<Vec<Child>> {
    let port = free_port()?;
    let workers = job.spec.workers.replicas as usize;
    let mut children: Vec<Child> = Vec::with_capacity(workers);
    for rank in 0..workers {
        let mut env = EnvContract::for_worker(job, rank as i32, attempt, "127.0.0.1");
        env.master_port = port;
        let mut cmd = Command::new(trainer_bin());
        cmd.arg("train")
            .envs(env.to_vars())
            .env("RADFM_LOG_EVERY", "1")
            .env("RADFM_THREADS", threads.to_string())
            .env(radfm_api::env::GANG_SECRET_FILE, secret)
            .stdout(if rank == 0 {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::inherit());
        children.push(cmd.spawn().with_context(|| {
            format!(
                "starting {}: build it with `cargo build -p radfm-trainer` (libtorch: `make libtorch`)",
                trainer_bin().display()
            )
        })?);
    }
    Ok(children)
}

/// Follows the attempt until every worker exited; returns their exit codes (rank order).
/// Ctrl-C, or one worker failing, stops the others with SIGTERM (rank 0 checkpoints), as the
/// operator deletes the rest of a gang.
fn wait_for_gang(
    mut children: Vec<Child>,
    progress: &mut Progress,
    stop: &AtomicBool,
) -> Result<Vec<i32>> {
    let reader = BufReader::new(children[0].stdout.take().expect("piped"));
    let (tx, rx) = std::sync::mpsc::channel::<serde_json::Value>();
    let pump = std::thread::spawn(move || {
        for line in reader.lines().map_while(std::result::Result::ok) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && tx.send(v).is_err()
            {
                return;
            }
        }
    });
    let mut codes: Vec<Option<i32>> = vec![None; children.len()];
    let mut signalled = false;
    while codes.iter().any(Option::is_none) {
        while let Ok(v) = rx.try_recv() {
            progress.line(&v)?;
        }
        let failed_now = codes.iter().any(|c| c.is_some_and(|c| c != 0));
        if (stop.load(Ordering::SeqCst) || failed_now) && !signalled {
            for (c, code) in children.iter().zip(&codes) {
                if code.is_none() {
                    // SAFETY: kill(2) on our own children's pids.
                    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
                }
            }
            signalled = true;
        }
        for (i, c) in children.iter_mut().enumerate() {
            if codes[i].is_none()
                && let Some(status) = c.try_wait()?
            {
                codes[i] = Some(radfm_api::exit::of_status(status));
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = pump.join();
    progress.bar.finish_and_clear();
    Ok(codes.into_iter().map(|c| c.unwrap_or(-1)).collect())
}

/// Runs the job to the end; returns the process exit code.
pub async fn run(a: RunArgs) -> Result<i32> {
    let job = load_job(&a)?;
    ensure_data(&job, a.synth_samples).await?;
    let name = job.metadata.name.clone().unwrap_or_default();
    let workers = job.spec.workers.replicas as usize;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores / workers).max(1);
    let mut progress = Progress::new(&a, workers)?;
    let steps = job.spec.training.steps.unwrap_or(0).max(0) as u64;
    let (mut attempt, mut counted) = (1, 0);
    let started = Instant::now();
    let result = loop {
        let secret = gang_secret_file()?;
        let children = spawn_gang(&job, attempt, threads, secret.path())?;
        progress.attempt(a.quiet, &name, attempt, steps);
        let codes = wait_for_gang(children, &mut progress, &stop)?;
        if stop.load(Ordering::SeqCst) {
            eprintln!(
                "radfm run: stopped; checkpoints are under {} — run the same command again to resume",
                job.spec.checkpoint.uri
            );
            break 130;
        }
        match decide(&job, &codes, counted) {
            None => break 0,
            Some(GangVerdict::Fail { cause, message }) => {
                eprintln!(
                    "radfm run: {name} failed after {attempt} attempt(s): {message} ({})",
                    cause.reason()
                );
                break 1;
            }
            Some(GangVerdict::Restart {
                counted: c,
                message,
            }) => {
                counted += c as i32;
                eprintln!(
                    "radfm run: {message}; restarting the gang as attempt {} (from the last checkpoint)",
                    attempt + 1
                );
                attempt += 1;
            }
        }
    };
    let losses = &progress.losses;
    if let Some(p) = &a.loss_plot {
        write_plot(p, losses, &name)?;
    }
    if result == 0 {
        let last = losses.last().map_or(f64::NAN, |l| l.1);
        println!(
            "radfm run: {name} finished in {:.0} s: {} steps, final loss {last:.4}, {attempt} attempt(s); checkpoints: {}",
            started.elapsed().as_secs_f64(),
            losses.last().map_or(0, |l| l.0),
            job.spec.checkpoint.uri
        );
    }
    Ok(result)
}

fn write_plot(path: &Path, losses: &[(i64, f64)], name: &str) -> Result<()> {
    std::fs::write(
        path,
        loss_svg(losses, &format!("{name}: MAE training loss")),
    )
    .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use radfm_api::failure::FailCause;

    fn job(extra: &str) -> TrainingJob {
        TrainingJob::from_yaml(
            &format!(
                "apiVersion: radfm.io/v1alpha1\nkind: TrainingJob\nmetadata: {{name: t}}\nspec:\n  image: x\n  \
                 workers: {{replicas: 2}}\n  dataset: {{uri: 'file:///d'}}\n  checkpoint: {{uri: 'file:///c'}}\n  \
                 training: {{steps: 10}}\n{extra}"
            ),
            "test",
        )
        .unwrap()
    }

    fn fails(v: Option<GangVerdict>, cause: FailCause, rank: &str) -> bool {
        matches!(v, Some(GangVerdict::Fail { cause: c, message }) if c == cause && message.starts_with(rank))
    }

    #[test]
    fn local_gangs_take_the_operators_verdict_for_their_exit_codes() {
        let j = job("  runPolicy: {backoffLimit: 2}\n");
        assert_eq!(decide(&j, &[0, 0], 0), None);
        assert!(matches!(
            decide(&j, &[76, 77], 0),
            Some(GangVerdict::Restart { counted: true, .. })
        ));
        assert!(fails(
            decide(&j, &[76, 77], 2),
            FailCause::BackoffLimitExceeded,
            "worker 0"
        ));
        assert!(fails(
            decide(&j, &[64, 77], 0),
            FailCause::Permanent,
            "worker 0 exited with code 64"
        ));
        assert!(fails(
            decide(&j, &[77, 66], 0),
            FailCause::Permanent,
            "worker 1"
        ));
    }

    #[test]
    fn a_custom_policy_can_make_a_code_uncounted() {
        let j = job(
            "  runPolicy: {backoffLimit: 0}\n  failurePolicy:\n    rules:\n    - action: RestartGangNotCounted\n      onExitCodes: [{from: 75}]\n",
        );
        assert!(matches!(
            decide(&j, &[75, 0], 0),
            Some(GangVerdict::Restart { counted: false, .. })
        ));
        assert!(fails(
            decide(&j, &[76, 0], 0),
            FailCause::BackoffLimitExceeded,
            "worker 0"
        ));
    }

    #[test]
    fn the_loss_plot_is_an_svg_polyline_through_every_point() {
        let svg = loss_svg(&[(1, 1.0), (2, 0.5), (3, f64::NAN), (4, 0.25)], "a <b>");
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("a &lt;b&gt;"));
        let points = svg
            .split("points=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        assert_eq!(points.split(' ').count(), 3);
        assert!(svg.trim_end().ends_with("</svg>"));
    }
}
