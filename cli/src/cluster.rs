//! `radfm get | describe | logs`: TrainingJobs in a cluster, through the current kubeconfig.
//!
//! `get` prints `kubectl get tj`'s columns plus progress (percent and ETA from the reported
//! images/s); `describe` adds the spec in brief, conditions, workers and events; `logs` reads
//! the trainer container of a rank's current pod. Rendering is pure, so it is tested without a
//! cluster; the end-to-end tests run the commands against a real API server.

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Event, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, LogParams};
use kube::{Client, ResourceExt};
use radfm_api::TrainingJob;

/// Flags shared by the cluster commands.
#[derive(clap::Args, Clone)]
pub struct Target {
    /// Namespace (default: the kubeconfig's).
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    /// Every namespace (get only).
    #[arg(long, short = 'A')]
    pub all_namespaces: bool,
}

/// Arguments of `radfm get`.
#[derive(clap::Args)]
pub struct GetArgs {
    /// One job.
    name: Option<String>,
    #[command(flatten)]
    target: Target,
}

/// Arguments of `radfm describe`.
#[derive(clap::Args)]
pub struct DescribeArgs {
    /// The job.
    name: String,
    #[command(flatten)]
    target: Target,
}

/// Arguments of `radfm logs`.
#[derive(clap::Args)]
pub struct LogsArgs {
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
    target: Target,
}

async fn client() -> Result<Client> {
    Client::try_default()
        .await
        .context("connecting to the cluster (KUBECONFIG or ~/.kube/config, or in-cluster)")
}

fn jobs(c: &Client, t: &Target) -> Api<TrainingJob> {
    match (&t.namespace, t.all_namespaces) {
        (_, true) => Api::all(c.clone()),
        (Some(ns), false) => Api::namespaced(c.clone(), ns),
        (None, false) => Api::default_namespaced(c.clone()),
    }
}

/// A duration as kubectl prints ages: 45s, 12m, 3h, 5d.
pub fn age(secs: i64) -> String {
    match secs.max(0) {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// Progress as "37% eta 12m", from the step, total and images/s reported by rank 0.
pub fn progress(job: &TrainingJob) -> String {
    let Some(p) = job.status.as_ref().and_then(|s| s.progress.as_ref()) else {
        return "-".into();
    };
    let Some(total) = p.total_steps.filter(|t| *t > 0) else {
        return "-".into();
    };
    let pct = (p.step as f64 / total as f64 * 100.0).min(100.0);
    let batch =
        job.spec.training.batch_size_per_device as f64 * job.spec.training.grad_accumulation as f64;
    let eta = p
        .images_per_second
        .filter(|ips| *ips > 0.0 && p.step < total)
        .map(|ips| {
            format!(
                " eta {}",
                age(((total - p.step) as f64 * batch / ips) as i64)
            )
        });
    format!("{pct:.0}%{}", eta.unwrap_or_default())
}

/// The `get` table.
pub fn table(items: &[TrainingJob], now: Timestamp, with_namespace: bool) -> String {
    let mut rows = vec![{
        let mut h = vec![
            "NAME", "PHASE", "READY", "STEP", "LOSS", "RESTARTS", "AGE", "PROGRESS",
        ];
        if with_namespace {
            h.insert(0, "NAMESPACE");
        }
        h.into_iter().map(String::from).collect::<Vec<_>>()
    }];
    for j in items {
        let st = j.status.clone().unwrap_or_default();
        let created = j.metadata.creation_timestamp.as_ref().map(|t| t.0);
        let mut row = vec![
            j.name_any(),
            st.phase.map_or("-".into(), |p| format!("{p:?}")),
            st.ready.unwrap_or_else(|| "-".into()),
            st.progress
                .as_ref()
                .map_or("-".into(), |p| p.step.to_string()),
            st.progress
                .as_ref()
                .and_then(|p| p.loss)
                .map_or("-".into(), |l| format!("{l:.4}")),
            st.restarts.to_string(),
            created.map_or("-".into(), |c| age(now.duration_since(c).as_secs())),
            progress(j),
        ];
        if with_namespace {
            row.insert(0, j.namespace().unwrap_or_default());
        }
        rows.push(row);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|r| {
            r.iter()
                .zip(&widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect::<Vec<_>>()
                .join("   ")
                .trim_end()
                .to_string()
                + "\n"
        })
        .collect()
}

/// The `describe` text: the spec in brief, the status, conditions, workers, events.
pub fn describe_text(j: &TrainingJob, pods: &[Pod], events: &[Event]) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<18}{v}\n"));
    describe_spec(j, &mut line);
    describe_status(j, &mut line);
    let st = j.status.clone().unwrap_or_default();
    out.push_str("Conditions:\n");
    for c in &st.conditions {
        out.push_str(&condition_line(c));
    }
    out.push_str("Workers:\n");
    for p in pods {
        out.push_str(&worker_line(p));
    }
    out.push_str("Events:\n");
    for e in events {
        out.push_str(&format!(
            "  {:<8} {:<22} {}\n",
            e.type_.clone().unwrap_or_default(),
            e.reason.clone().unwrap_or_default(),
            e.message.clone().unwrap_or_default()
        ));
    }
    out
}

fn describe_spec(j: &TrainingJob, line: &mut impl FnMut(&str, String)) {
    let s = &j.spec;
    line("Name:", j.name_any());
    line("Namespace:", j.namespace().unwrap_or_default());
    line("Image:", s.image.clone());
    let w = &s.workers;
    let each = format!(
        "{} x {} GPU, {} process(es) each",
        w.replicas,
        w.gpus_per_worker,
        w.nproc()
    );
    line("Workers:", each);
    line("Dataset:", s.dataset.uri.clone());
    let m = &s.model;
    let model = format!(
        "{} {}px patch {} mask {}",
        m.architecture.as_str(),
        m.image_size,
        m.patch_size,
        m.mask_ratio
    );
    line("Model:", model);
    let t = &s.training;
    let length = t.steps.map_or_else(
        || format!("{} epochs", t.epochs.unwrap_or(0)),
        |n| format!("{n} steps"),
    );
    let training = format!(
        "{length} x batch {} lr {} {}",
        t.batch_size_per_device,
        t.learning_rate,
        t.precision.as_str()
    );
    line("Training:", training);
    let c = &s.checkpoint;
    let checkpoints = format!(
        "{} every {} steps, keep {}",
        c.uri, c.every_steps, c.keep_last
    );
    line("Checkpoints:", checkpoints);
}

fn describe_status(j: &TrainingJob, line: &mut impl FnMut(&str, String)) {
    let st = j.status.clone().unwrap_or_default();
    line("Phase:", st.phase.map_or("-".into(), |p| format!("{p:?}")));
    let attempt = format!(
        "{} ({} restarts, {} counted of backoffLimit {})",
        st.attempt, st.restarts, st.counted_restarts, j.spec.run_policy.backoff_limit
    );
    line("Attempt:", attempt);
    if let Some(p) = &st.progress {
        let text = format!(
            "step {}/{} loss {} {} img/s ({})",
            p.step,
            p.total_steps.map_or("?".into(), |t| t.to_string()),
            p.loss.map_or("-".into(), |l| format!("{l:.4}")),
            p.images_per_second
                .map_or("-".into(), |v| format!("{v:.0}")),
            progress(j)
        );
        line("Progress:", text);
    }
    if let Some(c) = &st.last_checkpoint {
        line("Last checkpoint:", format!("step {} {}", c.step, c.uri));
    }
}

fn worker_line(p: &Pod) -> String {
    let phase = p
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_default();
    let node = p
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_else(|| "-".into());
    format!(
        "  {:<28} rank {:<4} {:<10} {node}\n",
        p.name_any(),
        p.labels().get("radfm.io/rank").cloned().unwrap_or_default(),
        phase
    )
}

fn condition_line(c: &Condition) -> String {
    format!(
        "  {:<12} {:<6} {:<24} {}\n",
        c.type_, c.status, c.reason, c.message
    )
}

/// `radfm get [NAME]`.
pub async fn get(a: GetArgs) -> Result<()> {
    let (name, t) = (a.name, a.target);
    let c = client().await?;
    let api = jobs(&c, &t);
    let items = match name {
        Some(n) => vec![
            api.get(&n)
                .await
                .with_context(|| format!("TrainingJob {n}"))?,
        ],
        None => {
            api.list(&ListParams::default())
                .await
                .context("listing TrainingJobs")?
                .items
        }
    };
    if items.is_empty() {
        eprintln!("No TrainingJobs found.");
        return Ok(());
    }
    print!("{}", table(&items, Timestamp::now(), t.all_namespaces));
    Ok(())
}

fn namespace_of(c: &Client, t: &Target) -> String {
    t.namespace
        .clone()
        .unwrap_or_else(|| c.default_namespace().to_string())
}

/// The pods of a job, rank order, newest attempt last.
async fn job_pods(c: &Client, ns: &str, name: &str) -> Result<Vec<Pod>> {
    let lp = ListParams::default().labels(&format!("radfm.io/job-name={name}"));
    let mut pods = Api::<Pod>::namespaced(c.clone(), ns).list(&lp).await?.items;
    pods.sort_by_key(|p| p.name_any());
    Ok(pods)
}

/// `radfm describe NAME`.
pub async fn describe(a: DescribeArgs) -> Result<()> {
    let (name, t) = (a.name, a.target);
    let c = client().await?;
    let ns = namespace_of(&c, &t);
    let job = Api::<TrainingJob>::namespaced(c.clone(), &ns)
        .get(&name)
        .await
        .with_context(|| format!("TrainingJob {ns}/{name}"))?;
    let pods = job_pods(&c, &ns, &name).await?;
    let lp = ListParams::default().fields(&format!(
        "involvedObject.kind=TrainingJob,involvedObject.name={name}"
    ));
    let mut events = Api::<Event>::namespaced(c.clone(), &ns)
        .list(&lp)
        .await?
        .items;
    events.sort_by_key(|e| e.last_timestamp.as_ref().map(|t| t.0));
    print!("{}", describe_text(&job, &pods, &events));
    Ok(())
}

/// `radfm logs NAME [--rank R] [--follow]`: the trainer container of the rank's newest pod.
pub async fn logs(a: LogsArgs) -> Result<()> {
    let LogsArgs {
        name,
        rank,
        follow,
        tail,
        target: t,
    } = a;
    let c = client().await?;
    let ns = namespace_of(&c, &t);
    let pods = job_pods(&c, &ns, &name).await?;
    let Some(pod) = pods
        .iter()
        .filter(|p| p.labels().get("radfm.io/rank") == Some(&rank.to_string()))
        .max_by_key(|p| {
            p.labels()
                .get("radfm.io/attempt")
                .and_then(|a| a.parse::<i64>().ok())
                .unwrap_or(0)
        })
    else {
        bail!("TrainingJob {ns}/{name} has no pod of rank {rank}");
    };
    let lp = LogParams {
        container: Some(radfm_operator::training_job::children::CONTAINER.into()),
        follow,
        tail_lines: tail,
        ..Default::default()
    };
    let api = Api::<Pod>::namespaced(c, &ns);
    if follow {
        use futures::AsyncBufReadExt;
        use futures::TryStreamExt;
        let mut lines = api.log_stream(&pod.name_any(), &lp).await?.lines();
        while let Some(l) = lines.try_next().await? {
            println!("{l}");
        }
    } else {
        print!(
            "{}",
            api.logs(&pod.name_any(), &lp)
                .await
                .with_context(|| format!("logs of pod {}", pod.name_any()))?
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(step: Option<i64>) -> TrainingJob {
        let mut j = TrainingJob::from_yaml(
            "apiVersion: radfm.io/v1alpha1\nkind: TrainingJob\nmetadata: {name: mae, namespace: ml}\nspec:\n  image: x\n  \
             workers: {replicas: 2}\n  dataset: {uri: 'file:///d'}\n  checkpoint: {uri: 'file:///c'}\n  \
             training: {steps: 1000, batchSizePerDevice: 10}\n",
            "test",
        )
        .unwrap();
        if let Some(step) = step {
            let p: radfm_api::trainingjob::Progress = serde_json::from_value(serde_json::json!({
                "step": step, "totalSteps": 1000, "loss": 0.25, "imagesPerSecond": 100.0
            }))
            .unwrap();
            j.status = Some(radfm_api::TrainingJobStatus {
                progress: Some(p),
                ready: Some("2/2".into()),
                ..Default::default()
            });
        }
        j
    }

    #[test]
    fn ages_read_like_kubectl() {
        assert_eq!(age(45), "45s");
        assert_eq!(age(600), "10m");
        assert_eq!(age(3 * 3600), "3h");
        assert_eq!(age(5 * 86_400), "5d");
    }

    #[test]
    fn progress_shows_percent_and_eta_from_images_per_second() {
        // 750 steps left x 10 images / 100 images/s = 75 s.
        assert_eq!(progress(&job(Some(250))), "25% eta 75s");
        assert_eq!(progress(&job(Some(1000))), "100%");
        assert_eq!(progress(&job(None)), "-");
    }

    #[test]
    fn the_table_has_kubectls_columns_plus_progress() {
        let t = table(&[job(Some(250))], Timestamp::now(), false);
        let lines: Vec<Vec<&str>> = t.lines().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(
            lines[0],
            [
                "NAME", "PHASE", "READY", "STEP", "LOSS", "RESTARTS", "AGE", "PROGRESS"
            ]
        );
        assert_eq!(
            lines[1],
            [
                "mae", "-", "2/2", "250", "0.2500", "0", "-", "25%", "eta", "75s"
            ]
        );
        let t = table(&[job(None)], Timestamp::now(), true);
        assert!(t.starts_with("NAMESPACE"), "{t}");
    }
}
