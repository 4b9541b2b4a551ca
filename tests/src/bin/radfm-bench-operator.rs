//! `make bench-operator`: radfm's TrainingJob operator against Kubeflow's training-operator v1
//! (PyTorchJob) and Kubeflow Trainer v2 (TrainJob on JobSet, whose pods kube-controller-manager's
//! Job controller creates) on one control plane with kwok-simulated GPU nodes, in one run.
//!
//! Each arm gets a fresh namespace and a freshly started operator. A burst of jobs is applied;
//! each job's time from apply to all its workers Running is taken from a pod watch. Then one
//! worker in each of up to 100 jobs is killed (its pod ends with exit code 137, as the kubelet
//! reports an OOM kill) and the time to a complete Running gang again is taken the same way.
//! Reconcile latency comes from each operator's own `/metrics` histogram, CPU seconds and peak
//! RSS from `/proc`, and API requests from the API server's audit log (each operator runs as its
//! own ServiceAccount). The namespace is deleted between arms and the next waits until its pods
//! are gone.
//!
//! Settings (environment): `BENCH_JOBS` (1000) × `BENCH_WORKERS` (8) for the head-to-head;
//! `BENCH_KILL` (100); `BENCH_GROWTH` (`100x8,300x8,16x8,16x64,16x256`, radfm only, empty for
//! none); `BENCH_DEFAULTS_JOBS` (100: the training-operator at its default settings, which
//! take minutes at 1,000 jobs); `BENCH_TRAINER_V2_JOBS` (as many as `BENCH_JOBS`; 0 for none);
//! `BENCH_OUT` (target/bench-operator). Results go to
//! `$BENCH_OUT/results.json` and `$BENCH_OUT/growth.svg`; the last line is
//! `bench: operator ratio=<training-operator total / radfm total>`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use radfm_e2e::kubeflow::{NAMESPACE as KUBEFLOW_NS, TrainingOperatorSettings};
use radfm_e2e::trainer_v2::{TrainerV2Settings, train_job};
use radfm_e2e::{Cluster, ControlPlane, PodSecurity, http_get_text, wait_until};
use serde_json::json;

/// GPUs of each simulated node; every worker asks for one.
const GPUS_PER_NODE: u32 = 8;
/// How long one burst may take before the arm is reported incomplete.
const BURST_LIMIT: Duration = Duration::from_secs(1800);

/// Which operator an arm runs.
#[derive(Debug, Clone, Copy)]
enum Operator {
    Radfm,
    Kubeflow(TrainingOperatorSettings),
    /// Kubeflow Trainer v2's TrainJob on JobSet.
    TrainerV2(TrainerV2Settings),
}

/// Who sent an API request, as the audit log records it.
#[derive(Debug, Clone, Copy)]
enum Requester {
    /// A user name (an operator's ServiceAccount).
    User(&'static str),
    /// A User-Agent ending (a controller inside kube-controller-manager, which shares its
    /// user with the other controllers there).
    Agent(&'static str),
}

impl Operator {
    fn name(&self) -> String {
        match self {
            Operator::Radfm => "radfm".into(),
            Operator::Kubeflow(s) => format!(
                "training-operator (qps {}, burst {}, threads {})",
                s.qps, s.burst, s.threads
            ),
            Operator::TrainerV2(s) => format!(
                "Trainer v2 + JobSet (qps {}, burst {}, threads {}/1)",
                s.qps, s.burst, s.trainjob_workers
            ),
        }
    }

    /// The pod label naming a worker's job.
    fn job_label(&self) -> &'static str {
        match self {
            Operator::Radfm => "radfm.io/job-name",
            Operator::Kubeflow(_) => "training.kubeflow.org/job-name",
            Operator::TrainerV2(_) => "jobset.sigs.k8s.io/jobset-name",
        }
    }

    /// Whose requests are the operator's: for Trainer v2, Trainer's, JobSet's, and those of
    /// the Job controller that creates the pods for JobSet's Jobs.
    fn requesters(&self) -> &'static [Requester] {
        match self {
            Operator::Radfm => &[Requester::User(
                "system:serviceaccount:radfm-system:radfm-operator",
            )],
            Operator::Kubeflow(_) => &[Requester::User(
                "system:serviceaccount:kubeflow:training-operator",
            )],
            Operator::TrainerV2(_) => &[
                Requester::User(
                    "system:serviceaccount:kubeflow-system:kubeflow-trainer-controller-manager",
                ),
                Requester::User("system:serviceaccount:jobset-system:jobset-controller-manager"),
                Requester::Agent("/job-controller"),
            ],
        }
    }

    /// The container whose exit the operator reads.
    fn container(&self) -> &'static str {
        match self {
            Operator::Radfm => "trainer",
            Operator::Kubeflow(_) => "pytorch",
            Operator::TrainerV2(_) => "node",
        }
    }

    /// The operator's reconcile-duration histogram.
    fn reconcile_metric(&self) -> &'static str {
        match self {
            Operator::Radfm => "radfm_operator_reconcile_duration_seconds",
            Operator::Kubeflow(_) | Operator::TrainerV2(_) => {
                "controller_runtime_reconcile_time_seconds"
            }
        }
    }

    /// The labels that pick the job controller's series out of that histogram.
    fn reconcile_filter(&self) -> &'static [&'static str] {
        match self {
            Operator::Radfm => &[],
            Operator::Kubeflow(_) => &["pytorchjob"],
            Operator::TrainerV2(_) => &["controller=\"trainjob_controller\""],
        }
    }

    fn resource(&self) -> ApiResource {
        match self {
            Operator::Radfm => ApiResource {
                group: "radfm.io".into(),
                version: "v1alpha1".into(),
                api_version: "radfm.io/v1alpha1".into(),
                kind: "TrainingJob".into(),
                plural: "trainingjobs".into(),
            },
            Operator::Kubeflow(_) => ApiResource {
                group: "kubeflow.org".into(),
                version: "v1".into(),
                api_version: "kubeflow.org/v1".into(),
                kind: "PyTorchJob".into(),
                plural: "pytorchjobs".into(),
            },
            Operator::TrainerV2(_) => ApiResource {
                group: "trainer.kubeflow.org".into(),
                version: "v1alpha1".into(),
                api_version: "trainer.kubeflow.org/v1alpha1".into(),
                kind: "TrainJob".into(),
                plural: "trainjobs".into(),
            },
        }
    }

    /// Job `name` with `workers` workers of one GPU each.
    fn job(&self, name: &str, workers: usize) -> Result<DynamicObject> {
        let value = match self {
            Operator::Radfm => json!({
                "apiVersion": "radfm.io/v1alpha1", "kind": "TrainingJob",
                "metadata": {"name": name},
                "spec": {
                    "image": "radfm/trainer:test",
                    "workers": {"replicas": workers, "gpusPerWorker": 1},
                    "dataset": {"uri": "s3://data/cohort"},
                    "checkpoint": {"uri": format!("s3://ckpt/{name}")},
                    "training": {"steps": 100},
                },
            }),
            Operator::Kubeflow(_) => {
                let template = |replicas: usize| {
                    json!({"replicas": replicas, "restartPolicy": "ExitCode", "template": {"spec": {
                        "containers": [{"name": "pytorch", "image": "radfm/trainer:test",
                            "resources": {"limits": {"nvidia.com/gpu": 1}}}]}}})
                };
                let mut specs = json!({"Master": template(1)});
                if workers > 1 {
                    specs["Worker"] = template(workers - 1);
                }
                json!({"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
                    "metadata": {"name": name}, "spec": {"pytorchReplicaSpecs": specs}})
            }
            Operator::TrainerV2(_) => train_job(name, workers, "radfm/trainer:test"),
        };
        Ok(serde_json::from_value(value)?)
    }
}

/// Per job: its workers (pod uid → Running), when all were first Running, and after a kill,
/// the killed pod and when a full gang without it was Running.
#[derive(Default)]
struct JobPods {
    running: HashMap<String, bool>,
    submitted: Option<Instant>,
    complete: Option<Instant>,
    killed: Option<(String, Instant)>,
    recovered: Option<Instant>,
}

/// What the pod watch has seen.
struct Tracker {
    workers: usize,
    jobs: Mutex<HashMap<String, JobPods>>,
}

impl Tracker {
    fn observe(&self, job: &str, uid: &str, running: Option<bool>) {
        let mut jobs = self.jobs.lock().unwrap();
        let j = jobs.entry(job.to_string()).or_default();
        match running {
            Some(r) => {
                j.running.insert(uid.to_string(), r);
            }
            None => {
                j.running.remove(uid);
            }
        }
        let killed = j.killed.as_ref().map(|(uid, _)| uid.as_str());
        let up = j
            .running
            .iter()
            .filter(|(u, r)| **r && Some(u.as_str()) != killed)
            .count();
        if up >= self.workers {
            let now = Instant::now();
            j.complete.get_or_insert(now);
            if j.killed.is_some() {
                j.recovered.get_or_insert(now);
            }
        }
    }

    fn count(&self, done: impl Fn(&JobPods) -> bool) -> usize {
        self.jobs
            .lock()
            .unwrap()
            .values()
            .filter(|j| done(j))
            .count()
    }
}

/// Feeds the tracker from a watch on the namespace's pods that carry `label`.
impl Tracker {
    /// Seconds from apply to a full gang Running, per job; and from a kill to the new full
    /// gang Running, per killed job.
    fn latencies(&self) -> (Vec<f64>, Vec<f64>) {
        let table = self.jobs.lock().unwrap();
        let per_job = table
            .values()
            .filter_map(|j| Some(j.complete?.duration_since(j.submitted?).as_secs_f64()))
            .collect();
        let recovery = table
            .values()
            .filter_map(|j| {
                Some(
                    j.recovered?
                        .duration_since(j.killed.as_ref()?.1)
                        .as_secs_f64(),
                )
            })
            .collect();
        (per_job, recovery)
    }
}

fn watch_pods(client: Client, ns: &str, label: &'static str, tracker: Arc<Tracker>) {
    let pods: Api<Pod> = Api::namespaced(client, ns);
    tokio::spawn(async move {
        let stream = watcher(pods, watcher::Config::default().labels(label));
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            let (pod, gone) = match event {
                Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => (p, false),
                Ok(watcher::Event::Delete(p)) => (p, true),
                _ => continue,
            };
            let (Some(job), Some(uid)) = (pod.labels().get(label).cloned(), pod.uid()) else {
                continue;
            };
            let running = pod.metadata.deletion_timestamp.is_none()
                && pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
            tracker.observe(&job, &uid, (!gone).then_some(running));
        }
    });
}

/// CPU seconds (user + system) and the sum of peak RSSs in MiB of an operator's processes.
fn usage(pids: &[u32]) -> Result<(f64, f64)> {
    pids.iter().try_fold((0.0, 0.0), |(cpu, rss), &pid| {
        let (c, r) = process_usage(pid)?;
        Ok((cpu + c, rss + r))
    })
}

/// CPU seconds (user + system) and peak RSS in MiB of a process.
fn process_usage(pid: u32) -> Result<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("/proc stat")?
        .1
        .split_whitespace()
        .collect();
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu = (fields[11].parse::<f64>()? + fields[12].parse::<f64>()?) / ticks;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hwm_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    Ok((cpu, hwm_kib / 1024.0))
}

/// The cumulative buckets of a Prometheus histogram: every series of one name whose labels
/// contain all of some filters, summed. Two snapshots subtract, so a quantile can cover one
/// phase of an arm (the burst, the recovery) rather than the process's whole life.
#[derive(Debug, Clone, Default, PartialEq)]
struct Buckets(BTreeMap<u64, (f64, f64)>);

impl Buckets {
    /// The buckets of `name` in `text` whose labels contain every one of `filters`.
    fn parse(text: &str, name: &str, filters: &[&str]) -> Buckets {
        let mut buckets: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
        let prefix = format!("{name}_bucket{{");
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(&prefix) else {
                continue;
            };
            let Some((labels, value)) = rest.rsplit_once("} ") else {
                continue;
            };
            if !filters.iter().all(|f| labels.contains(f)) {
                continue;
            }
            let Some(le) = labels
                .split("le=\"")
                .nth(1)
                .and_then(|l| l.split('"').next())
            else {
                continue;
            };
            let le: f64 = match le {
                "+Inf" => f64::INFINITY,
                le => match le.parse() {
                    Ok(v) => v,
                    Err(_) => continue,
                },
            };
            let Ok(count) = value.trim().parse::<f64>() else {
                continue;
            };
            buckets.entry(le.to_bits()).or_insert((le, 0.0)).1 += count;
        }
        Buckets(buckets)
    }

    /// What was observed after `earlier` was taken (bucket by bucket). Where `earlier` is not
    /// empty and has other bounds (a scrape that lost lines), nothing: a missing quantile, not
    /// a wrong one.
    fn since(&self, earlier: &Buckets) -> Buckets {
        if !earlier.0.is_empty() && !earlier.0.keys().eq(self.0.keys()) {
            return Buckets::default();
        }
        let mut out = self.0.clone();
        for (key, (_, before)) in &earlier.0 {
            if let Some((_, count)) = out.get_mut(key) {
                *count = (*count - before).max(0.0);
            }
        }
        Buckets(out)
    }

    /// How many observations the buckets hold.
    fn count(&self) -> f64 {
        self.0.values().map(|(_, c)| *c).fold(0.0, f64::max)
    }

    /// The `q` quantile, interpolated within its bucket as `histogram_quantile` does; None
    /// without observations.
    fn quantile(&self, q: f64) -> Option<f64> {
        let mut sorted: Vec<(f64, f64)> = self.0.values().copied().collect();
        sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
        let total = sorted.last()?.1;
        if total == 0.0 {
            return None;
        }
        let rank = q * total;
        let (mut lower, mut below) = (0.0, 0.0);
        for (le, cumulative) in sorted {
            if cumulative >= rank {
                if le.is_infinite() {
                    return Some(lower);
                }
                let inside = cumulative - below;
                let frac = if inside > 0.0 {
                    (rank - below) / inside
                } else {
                    1.0
                };
                return Some(lower + (le - lower) * frac);
            }
            (lower, below) = (le, cumulative);
        }
        None
    }

    /// How many observations, and their p50 and p99 in milliseconds.
    fn latency(&self) -> Latency {
        let ms = |q| self.quantile(q).map(|s| s * 1000.0);
        Latency {
            observations: self.count(),
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
        }
    }
}

/// One phase's latency from a histogram: observations, p50 and p99 (None without any).
#[derive(Debug, Clone, serde::Serialize)]
struct Latency {
    observations: f64,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
}

impl std::fmt::Display for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
        write!(
            f,
            "{}/{} ms ({:.0})",
            ms(self.p50_ms),
            ms(self.p99_ms),
            self.observations
        )
    }
}

#[derive(serde::Deserialize)]
struct AuditEvent {
    stage: String,
    verb: String,
    user: AuditUser,
    #[serde(rename = "userAgent", default)]
    user_agent: String,
    #[serde(rename = "objectRef")]
    object: Option<AuditObject>,
}

#[derive(serde::Deserialize)]
struct AuditUser {
    username: String,
}

#[derive(serde::Deserialize)]
struct AuditObject {
    resource: Option<String>,
    subresource: Option<String>,
}

impl Requester {
    /// Whether an audit event is this requester's.
    fn sent(&self, event: &AuditEvent) -> bool {
        match self {
            Requester::User(user) => event.user.username == *user,
            Requester::Agent(ending) => event.user_agent.ends_with(ending),
        }
    }

    /// A substring every audit line of this requester holds, to skip the others unparsed.
    fn needle(&self) -> String {
        match self {
            Requester::User(user) => format!("\"username\":\"{user}\""),
            Requester::Agent(ending) => format!("{ending}\""),
        }
    }
}

/// Requests of any of `requesters` in the audit log from byte `from` on, total and by verb
/// and resource.
fn audited_requests(
    log: &Path,
    from: u64,
    requesters: &[Requester],
) -> Result<(u64, BTreeMap<String, u64>)> {
    use std::io::{BufRead, Seek};
    let mut file = std::fs::File::open(log)?;
    file.seek(std::io::SeekFrom::Start(from))?;
    let mut by_kind = BTreeMap::new();
    let mut total = 0;
    let needles: Vec<String> = requesters.iter().map(Requester::needle).collect();
    for line in std::io::BufReader::new(file).lines() {
        let line = line?;
        if !needles.iter().any(|n| line.contains(n.as_str())) {
            continue;
        }
        let Ok(e) = serde_json::from_str::<AuditEvent>(&line) else {
            continue;
        };
        if e.stage != "ResponseComplete" || !requesters.iter().any(|r| r.sent(&e)) {
            continue;
        }
        total += 1;
        let what = e.object.map_or(String::new(), |o| {
            let sub = o.subresource.map(|s| format!("/{s}")).unwrap_or_default();
            format!("{}{sub}", o.resource.unwrap_or_default())
        });
        *by_kind.entry(format!("{} {what}", e.verb)).or_default() += 1;
    }
    Ok((total, by_kind))
}

fn audit_size(cluster: &Cluster) -> u64 {
    std::fs::metadata(cluster.audit_log()).map_or(0, |m| m.len())
}

/// The operator's `/metrics` text, or nothing where it cannot be read (the quantiles are then
/// missing, not wrong).
fn scrape(addr: &str) -> String {
    http_get_text(addr, "/metrics")
        .map(|(_, t)| t)
        .unwrap_or_default()
}

/// The API server's latency histogram of pod creates (POST pods, not the scheduler's bindings).
async fn pod_creates(client: &Client) -> Result<Buckets> {
    let text = client
        .request_text(http::Request::get("/metrics").body(Vec::new())?)
        .await
        .context("reading the API server's /metrics")?;
    Ok(Buckets::parse(
        &text,
        "apiserver_request_duration_seconds",
        &["verb=\"POST\"", "resource=\"pods\"", "subresource=\"\""],
    ))
}

/// p-quantile of the values (nearest rank).
fn quantile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// What one arm measured.
#[derive(Debug, Clone, serde::Serialize)]
struct Outcome {
    #[serde(skip)]
    arm: Operator,
    operator: String,
    jobs: usize,
    workers: usize,
    complete_jobs: usize,
    total_seconds: f64,
    job_p50_seconds: f64,
    job_p99_seconds: f64,
    killed: usize,
    recovered: usize,
    recovery_p50_seconds: f64,
    recovery_p99_seconds: f64,
    /// Every reconcile of the arm.
    reconcile: Latency,
    /// Reconciles that ended between apply and all Running.
    burst_reconcile: Latency,
    /// Reconciles that ended between the kills and the last recovered gang.
    recovery_reconcile: Latency,
    /// The API server's own latency for pod creates during the burst (its
    /// apiserver_request_duration_seconds, POST pods), what a pass that creates pods waits on.
    burst_pod_create: Latency,
    cpu_seconds: f64,
    peak_rss_mib: f64,
    api_requests: u64,
    api_requests_per_job: f64,
    top_requests: Vec<(String, u64)>,
}

/// A running operator of one arm: its processes and where its metrics are.
struct Running {
    pids: Vec<u32>,
    metrics: String,
    stop: Box<dyn FnOnce()>,
}

async fn start(cluster: &Cluster, op: Operator, ns: &str) -> Result<Running> {
    match op {
        Operator::Radfm => {
            // Like the training-operator's namespace, without Pod Security admission (radfm's
            // tests enforce `restricted`; PyTorchJob pods would not pass it). The guard only
            // reports on a panic; the bench deletes the namespace itself.
            cluster.namespace_with(ns, PodSecurity::Unenforced).await?;
            let mut operator = cluster.start_operator(ns, &format!("operator-{ns}"), &[])?;
            let metrics = operator.metrics_addr(cluster).await?;
            Ok(Running {
                pids: vec![operator.pid()],
                metrics,
                stop: Box::new(move || operator.kill()),
            })
        }
        Operator::Kubeflow(settings) => {
            cluster.kubectl_ok(&["create", "namespace", ns])?;
            let (mut child, metrics) = cluster.start_training_operator(settings).await?;
            Ok(Running {
                pids: vec![child.id()],
                metrics,
                stop: Box::new(move || {
                    let _ = child.kill();
                    let _ = child.wait();
                }),
            })
        }
        Operator::TrainerV2(settings) => {
            cluster.kubectl_ok(&["create", "namespace", ns])?;
            let running = cluster.start_trainer_v2(settings).await?;
            Ok(Running {
                pids: running.pids().to_vec(),
                metrics: running.metrics.clone(),
                stop: Box::new(move || drop(running)),
            })
        }
    }
}

/// Applies `jobs` jobs at once (32 requests in flight), recording each one's submission.
async fn submit(
    client: &Client,
    op: Operator,
    ns: &str,
    jobs: usize,
    workers: usize,
    tracker: &Tracker,
) -> Result<()> {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &op.resource());
    let objects: Vec<DynamicObject> = (0..jobs)
        .map(|i| op.job(&format!("job-{i:04}"), workers))
        .collect::<Result<_>>()?;
    futures::stream::iter(objects)
        .map(|obj| {
            let api = api.clone();
            async move {
                let name = obj.name_any();
                tracker
                    .jobs
                    .lock()
                    .unwrap()
                    .entry(name.clone())
                    .or_default()
                    .submitted = Some(Instant::now());
                api.create(&PostParams::default(), &obj)
                    .await
                    .with_context(|| format!("creating {name}"))
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(())
}

/// Ends one non-first worker of each of the first `kill` jobs with exit code 137, at once.
async fn kill_workers(
    client: &Client,
    op: Operator,
    ns: &str,
    kill: usize,
    tracker: &Tracker,
) -> Result<usize> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let list = pods.list(&Default::default()).await?;
    let mut victims: BTreeMap<String, Pod> = BTreeMap::new();
    for p in list.items {
        let Some(job) = p.labels().get(op.job_label()).cloned() else {
            continue;
        };
        let name = p.name_any();
        let first =
            name.ends_with("-w0-a1") || name.ends_with("-master-0") || name.contains("-node-0-0-");
        if !first && victims.len() < kill && !victims.contains_key(&job) {
            victims.insert(job, p);
        }
    }
    let status = json!({"status": {
        "phase": "Failed",
        "conditions": [{"type": "Ready", "status": "False"}, {"type": "ContainersReady", "status": "False"}],
        "containerStatuses": [{
            "name": op.container(), "image": "radfm/trainer:test", "imageID": "", "ready": false,
            "restartCount": 0, "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}},
        }],
    }});
    let n = victims.len();
    futures::stream::iter(victims)
        .map(|(job, pod)| {
            let (pods, status) = (pods.clone(), status.clone());
            async move {
                let uid = pod.uid().unwrap_or_default();
                if let Some(j) = tracker.jobs.lock().unwrap().get_mut(&job) {
                    j.killed = Some((uid, Instant::now()));
                }
                pods.patch_status(
                    &pod.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&status),
                )
                .await
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(n)
}

/// Waits until `done` holds for `want` jobs, or the limit passes.
async fn wait_for(tracker: &Tracker, want: usize, done: impl Fn(&JobPods) -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < BURST_LIMIT {
        if tracker.count(&done) >= want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// One arm: a fresh namespace and operator, the burst, the kills, the measurements.
async fn arm(
    cluster: &Cluster,
    op: Operator,
    ns: &str,
    jobs: usize,
    workers: usize,
    kill: usize,
) -> Result<Outcome> {
    let running = start(cluster, op, ns).await?;
    let tracker = Arc::new(Tracker {
        workers,
        jobs: Mutex::new(HashMap::new()),
    });
    watch_pods(cluster.client.clone(), ns, op.job_label(), tracker.clone());
    let audit_from = audit_size(cluster);
    let (cpu0, _) = usage(&running.pids)?;
    let reconciles =
        |text: &str| Buckets::parse(text, op.reconcile_metric(), op.reconcile_filter());
    let before = reconciles(&scrape(&running.metrics));
    let creates_before = pod_creates(&cluster.client).await?;
    let began = Instant::now();
    submit(&cluster.client, op, ns, jobs, workers, &tracker).await?;
    let all = wait_for(&tracker, jobs, |j| j.complete.is_some()).await;
    let total = began.elapsed().as_secs_f64();
    let burst_end = reconciles(&scrape(&running.metrics));
    let burst = burst_end.since(&before);
    let creates = pod_creates(&cluster.client).await?.since(&creates_before);
    eprintln!(
        "bench: {} {jobs}x{workers}: {} in {total:.1} s",
        op.name(),
        if all { "all Running" } else { "INCOMPLETE" }
    );
    let killed = if all {
        kill_workers(&cluster.client, op, ns, kill, &tracker).await?
    } else {
        0
    };
    wait_for(&tracker, killed, |j| j.recovered.is_some()).await;
    let (cpu1, rss) = usage(&running.pids)?;
    let whole = reconciles(&scrape(&running.metrics));
    let recovering = whole.since(&burst_end);
    (running.stop)();
    keep_log(cluster, op, ns);
    // The audit backend writes in batches: let it catch up.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (requests, by_kind) = audited_requests(&cluster.audit_log(), audit_from, op.requesters())?;
    let mut top: Vec<(String, u64)> = by_kind.into_iter().collect();
    top.sort_by_key(|t| std::cmp::Reverse(t.1));
    top.truncate(6);
    let (per_job, recovery) = tracker.latencies();
    Ok(Outcome {
        arm: op,
        operator: op.name(),
        jobs,
        workers,
        complete_jobs: per_job.len(),
        total_seconds: total,
        job_p50_seconds: quantile(&per_job, 0.5),
        job_p99_seconds: quantile(&per_job, 0.99),
        killed,
        recovered: recovery.len(),
        recovery_p50_seconds: quantile(&recovery, 0.5),
        recovery_p99_seconds: quantile(&recovery, 0.99),
        reconcile: whole.latency(),
        burst_reconcile: burst.latency(),
        recovery_reconcile: recovering.latency(),
        burst_pod_create: creates.latency(),
        cpu_seconds: cpu1 - cpu0,
        peak_rss_mib: rss,
        api_requests: requests,
        api_requests_per_job: requests as f64 / jobs as f64,
        top_requests: top,
    })
}

/// Copies the arm's operator logs to `$BENCH_OUT/<namespace>[-<log>].log`.
fn keep_log(cluster: &Cluster, op: Operator, ns: &str) {
    let dir = std::env::var("BENCH_OUT").unwrap_or_else(|_| "target/bench-operator".into());
    let copy = |log: &str, to: String| {
        let _ = std::fs::copy(cluster.log_path(log), Path::new(&dir).join(to));
    };
    match op {
        Operator::Radfm => copy(&format!("operator-{ns}"), format!("{ns}.log")),
        Operator::Kubeflow(_) => copy("training-operator", format!("{ns}.log")),
        Operator::TrainerV2(_) => {
            for log in ["trainer-controller-manager", "jobset"] {
                copy(log, format!("{ns}-{log}.log"));
            }
        }
    }
}

/// Deletes the namespace and waits until it and its pods are gone (the GPUs are free again).
async fn clean(cluster: &Cluster, ns: &str) -> Result<()> {
    cluster.kubectl_ok(&["delete", "namespace", ns, "--wait=false"])?;
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(cluster.client.clone());
    wait_until(
        Duration::from_secs(900),
        &format!("namespace {ns} gone"),
        || async { namespaces.get_opt(ns).await.ok()?.is_none().then_some(()) },
    )
    .await
}

fn env_usize(name: &str, default: usize) -> Result<usize> {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v.parse().with_context(|| format!("{name}={v}")),
        _ => Ok(default),
    }
}

/// `100x8,300x8` into (jobs, workers) pairs.
fn sizes(spec: &str) -> Result<Vec<(usize, usize)>> {
    spec.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            let (j, w) = s
                .trim()
                .split_once('x')
                .with_context(|| format!("BENCH_GROWTH: {s} is not JOBSxWORKERS"))?;
            Ok((j.parse()?, w.parse()?))
        })
        .collect()
}

fn print_table(outcomes: &[Outcome]) {
    println!(
        "{:<52} {:>5} {:>4} {:>8} {:>7} {:>7} {:>8} {:>8} {:>7} {:>7} {:>7} {:>8}",
        "operator",
        "jobs",
        "wkrs",
        "total s",
        "p50 s",
        "p99 s",
        "rec p50",
        "rec p99",
        "rcl p99",
        "cpu s",
        "RSS MiB",
        "req/job"
    );
    for o in outcomes {
        println!(
            "{:<52} {:>5} {:>4} {:>8.1} {:>7.2} {:>7.2} {:>8.2} {:>8.2} {:>7} {:>7.1} {:>7.0} {:>8.1}",
            o.operator,
            o.jobs,
            o.workers,
            o.total_seconds,
            o.job_p50_seconds,
            o.job_p99_seconds,
            o.recovery_p50_seconds,
            o.recovery_p99_seconds,
            o.reconcile.p99_ms.map_or("-".into(), |v| format!("{v:.1}")),
            o.cpu_seconds,
            o.peak_rss_mib,
            o.api_requests_per_job
        );
    }
}

/// A line plot of total seconds and CPU seconds against pods (jobs × workers) for radfm's runs.
fn growth_svg(outcomes: &[Outcome]) -> String {
    let mut points: Vec<(f64, f64, f64)> = outcomes
        .iter()
        .filter(|o| o.operator == "radfm")
        .map(|o| ((o.jobs * o.workers) as f64, o.total_seconds, o.cpu_seconds))
        .collect();
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (w, h, pad) = (640.0, 400.0, 60.0);
    let xmax = points.iter().map(|p| p.0).fold(1.0, f64::max);
    let ymax = points.iter().map(|p| p.1.max(p.2)).fold(1.0, f64::max);
    let x = |v: f64| pad + v / xmax * (w - 2.0 * pad);
    let y = |v: f64| h - pad - v / ymax * (h - 2.0 * pad);
    let line = |pick: &dyn Fn(&(f64, f64, f64)) -> f64| {
        points
            .iter()
            .map(|p| format!("{:.1},{:.1}", x(p.0), y(pick(p))))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <line x1=\"{pad}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"black\"/>\n\
         <line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{b}\" stroke=\"black\"/>\n\
         <text x=\"{cx}\" y=\"{lb}\" text-anchor=\"middle\">worker pods (jobs × workers); max {xmax:.0}</text>\n\
         <text x=\"15\" y=\"{pad}\">seconds; max {ymax:.1}</text>\n\
         <polyline fill=\"none\" stroke=\"steelblue\" stroke-width=\"2\" points=\"{total}\"/>\n\
         <polyline fill=\"none\" stroke=\"darkorange\" stroke-width=\"2\" points=\"{cpu}\"/>\n\
         <text x=\"{lx}\" y=\"{l1}\" fill=\"steelblue\">apply → all Running (s)</text>\n\
         <text x=\"{lx}\" y=\"{l2}\" fill=\"darkorange\">operator CPU (s)</text>\n",
        b = h - pad,
        r = w - pad,
        cx = w / 2.0,
        lb = h - 20.0,
        total = line(&|p| p.1),
        cpu = line(&|p| p.2),
        lx = pad + 10.0,
        l1 = pad + 10.0,
        l2 = pad + 26.0,
    );
    for p in &points {
        svg += &format!(
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"steelblue\"/><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\">{:.0}</text>\n",
            x(p.0),
            y(p.1),
            x(p.0) + 4.0,
            y(p.1) - 4.0,
            p.0
        );
    }
    svg + "</svg>\n"
}

/// One arm to run: the operator, jobs, workers per job, workers to kill.
type Arm = (Operator, usize, usize, usize);

/// How many jobs each optional arm runs (0: none).
struct ArmSizes {
    /// The training-operator at its default settings.
    defaults_jobs: usize,
    /// Trainer v2 + JobSet with matched settings.
    trainer_v2_jobs: usize,
}

/// The arms in order: the head-to-head at `jobs` × `workers`, the training-operator at its
/// defaults, Trainer v2 on JobSet with matched settings, then radfm at each growth size.
fn arms(
    jobs: usize,
    workers: usize,
    kill: usize,
    optional: &ArmSizes,
    growth: &[(usize, usize)],
) -> Vec<Arm> {
    let matched = TrainingOperatorSettings {
        qps: 100_000,
        burst: 100_000,
        threads: 8,
    };
    let mut plan = vec![
        (Operator::Radfm, jobs, workers, kill),
        (Operator::Kubeflow(matched), jobs, workers, kill),
    ];
    if optional.defaults_jobs > 0 {
        let (n, defaults) = (
            optional.defaults_jobs,
            Operator::Kubeflow(TrainingOperatorSettings::default()),
        );
        plan.push((defaults, n, workers, kill.min(n)));
    }
    if optional.trainer_v2_jobs > 0 {
        let matched = Operator::TrainerV2(TrainerV2Settings {
            qps: matched.qps,
            burst: matched.burst,
            trainjob_workers: matched.threads,
        });
        let n = optional.trainer_v2_jobs;
        plan.push((matched, n, workers, kill.min(n)));
    }
    plan.extend(growth.iter().map(|&(j, w)| (Operator::Radfm, j, w, 0)));
    plan
}

/// The control plane with enough nodes for the largest arm.
async fn control_plane(plan: &[Arm]) -> Result<Cluster> {
    let most_pods = plan.iter().map(|a| a.1 * a.2).max().unwrap_or(0);
    // A tenth more GPUs than the largest arm asks for: on a cluster with none to spare, a
    // replacement pod waits in the scheduler's backoff until it learns the old pod's GPU is free.
    let nodes = (most_pods + most_pods / 10).div_ceil(GPUS_PER_NODE as usize);
    let started = Instant::now();
    eprintln!("bench: starting the control plane with {nodes} kwok nodes of {GPUS_PER_NODE} GPUs");
    let cluster = Cluster::start_with(&ControlPlane {
        kwok_nodes: nodes,
        gpus: GPUS_PER_NODE,
        controller_manager: true,
        audit_log: true,
        endpoint_routing: true,
        control_plane_qps: Some(5000),
        node_monitor_grace: Duration::from_secs(50),
        ..ControlPlane::default()
    })
    .await?;
    eprintln!(
        "bench: control plane up in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(cluster)
}

/// The summary table, the request breakdown, the plot, and the ratio line.
fn report(outcomes: &[Outcome], out: &Path, jobs: usize) -> Result<()> {
    println!();
    print_table(outcomes);
    std::fs::write(out.join("growth.svg"), growth_svg(outcomes))?;
    for o in outcomes {
        println!(
            "{} {}x{} top requests: {:?}",
            o.operator, o.jobs, o.workers, o.top_requests
        );
        println!(
            "{} {}x{} reconcile p50/p99 (passes): burst {}, recovery {}, whole arm {}; \
             API server pod create p50/p99 (creates) in the burst: {}",
            o.operator,
            o.jobs,
            o.workers,
            o.burst_reconcile,
            o.recovery_reconcile,
            o.reconcile,
            o.burst_pod_create,
        );
    }
    let (radfm, kubeflow) = (&outcomes[0], &outcomes[1]);
    let trainer_v2 = outcomes
        .iter()
        .find(|o| matches!(o.arm, Operator::TrainerV2(_)));
    if let Some(v2) = trainer_v2 {
        println!(
            "{}: {} of {} jobs Running in {:.1} s; ratio to radfm {:.2} (where all ran)",
            v2.operator,
            v2.complete_jobs,
            v2.jobs,
            v2.total_seconds,
            v2.total_seconds / radfm.total_seconds
        );
    }
    if radfm.complete_jobs < jobs || kubeflow.complete_jobs < jobs {
        bail!(
            "an arm did not finish: radfm {} of {jobs}, training-operator {} of {jobs}",
            radfm.complete_jobs,
            kubeflow.complete_jobs
        );
    }
    println!(
        "bench: operator ratio={:.2}",
        kubeflow.total_seconds / radfm.total_seconds
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let jobs = env_usize("BENCH_JOBS", 1000)?;
    let workers = env_usize("BENCH_WORKERS", 8)?;
    let kill = env_usize("BENCH_KILL", 100)?;
    let optional = ArmSizes {
        defaults_jobs: env_usize("BENCH_DEFAULTS_JOBS", 100)?,
        trainer_v2_jobs: env_usize("BENCH_TRAINER_V2_JOBS", jobs)?,
    };
    let growth = sizes(
        &std::env::var("BENCH_GROWTH").unwrap_or_else(|_| "100x8,300x8,16x8,16x64,16x256".into()),
    )?;
    let out = PathBuf::from(
        std::env::var("BENCH_OUT").unwrap_or_else(|_| "target/bench-operator".into()),
    );
    std::fs::create_dir_all(&out)?;
    let plan = arms(jobs, workers, kill, &optional, &growth);
    let started = Instant::now();
    let cluster = control_plane(&plan).await?;
    let mut outcomes = Vec::new();
    for (k, (op, j, w, kill)) in plan.into_iter().enumerate() {
        let ns = format!("bench-{k}");
        outcomes.push(arm(&cluster, op, &ns, j, w, kill).await?);
        print_table(&outcomes[outcomes.len() - 1..]);
        clean(&cluster, &ns).await?;
        std::fs::write(
            out.join("results.json"),
            serde_json::to_string_pretty(&outcomes)?,
        )?;
    }
    let _ = cluster.kubectl(&["delete", "namespace", KUBEFLOW_NS, "--wait=false"]);
    eprintln!(
        "bench: whole run {:.0} s; results in {}",
        started.elapsed().as_secs_f64(),
        out.display()
    );
    report(&outcomes, &out, jobs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_interpolate_within_the_bucket_as_prometheus_does() {
        let text = "\
x_bucket{controller=\"a\",le=\"0.1\"} 50
x_bucket{controller=\"a\",le=\"0.2\"} 90
x_bucket{controller=\"a\",le=\"+Inf\"} 100
x_bucket{controller=\"b\",le=\"0.1\"} 1000
x_bucket{controller=\"b\",le=\"+Inf\"} 1000
x_sum{controller=\"a\"} 9
";
        let a = Buckets::parse(text, "x", &["\"a\""]);
        let p50 = a.quantile(0.5).unwrap();
        assert!((p50 - 0.1).abs() < 1e-9, "{p50}");
        let p70 = a.quantile(0.7).unwrap();
        assert!((p70 - 0.15).abs() < 1e-9, "{p70}");
        // Past the last finite bucket the answer is that bucket's bound, as Prometheus says.
        assert_eq!(a.quantile(0.99), Some(0.2));
        assert_eq!(a.count(), 100.0);
        // Series are summed when the filters match several.
        let both = Buckets::parse(text, "x", &[]).quantile(0.5).unwrap();
        assert!(both < 0.1, "{both}");
        assert_eq!(Buckets::parse(text, "y", &[]).quantile(0.5), None);
    }

    #[test]
    fn a_phase_is_the_difference_of_two_snapshots_and_every_filter_must_match() {
        let line = |verb: &str, sub: &str, le: &str, n: u32| {
            format!(
                "apiserver_request_duration_seconds_bucket{{resource=\"pods\",subresource=\"{sub}\",verb=\"{verb}\",le=\"{le}\"}} {n}\n"
            )
        };
        let filters = ["verb=\"POST\"", "resource=\"pods\"", "subresource=\"\""];
        let before = [
            line("POST", "", "0.1", 10),
            line("POST", "", "1", 10),
            line("POST", "", "+Inf", 10),
            line("POST", "binding", "0.1", 500),
            line("POST", "binding", "+Inf", 500),
        ]
        .concat();
        // In the phase: 10 creates took under 0.1 s and 90 took between 0.1 and 1 s; the
        // scheduler's bindings and the GETs are not creates.
        let after = [
            line("POST", "", "0.1", 20),
            line("POST", "", "1", 110),
            line("POST", "", "+Inf", 110),
            line("POST", "binding", "0.1", 9000),
            line("POST", "binding", "+Inf", 9000),
            line("GET", "", "0.1", 7),
            line("GET", "", "+Inf", 7),
        ]
        .concat();
        let phase = Buckets::parse(&after, "apiserver_request_duration_seconds", &filters).since(
            &Buckets::parse(&before, "apiserver_request_duration_seconds", &filters),
        );
        assert_eq!(phase.count(), 100.0);
        let p50 = phase.quantile(0.5).unwrap();
        assert!((p50 - 0.5).abs() < 1e-9, "{p50}");
        let latency = phase.latency();
        assert_eq!(latency.observations, 100.0);
        assert!((latency.p99_ms.unwrap() - 990.0).abs() < 1e-6, "{latency}");
        assert_eq!(latency.to_string(), "500/990 ms (100)");
        // Nothing happened between two equal snapshots.
        let none = phase.since(&phase);
        assert_eq!((none.count(), none.quantile(0.5)), (0.0, None));
        // A snapshot that lost a bucket's line gives no quantile rather than a wrong one.
        let torn = [line("POST", "", "0.1", 10), line("POST", "", "+Inf", 10)].concat();
        let torn = Buckets::parse(&torn, "apiserver_request_duration_seconds", &filters);
        let unknown =
            Buckets::parse(&after, "apiserver_request_duration_seconds", &filters).since(&torn);
        assert_eq!(unknown.latency().p50_ms, None);
    }

    #[test]
    fn quantiles_take_the_nearest_rank_and_sizes_parse_jobs_by_workers() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert!(quantile(&[], 0.5).is_nan());
        assert_eq!(sizes("100x8, 16x256").unwrap(), [(100, 8), (16, 256)]);
        assert!(
            sizes("100")
                .unwrap_err()
                .to_string()
                .contains("JOBSxWORKERS")
        );
    }

    #[test]
    fn a_job_counts_as_recovered_only_with_a_full_gang_that_lacks_the_killed_worker() {
        let t = Tracker {
            workers: 2,
            jobs: Mutex::new(HashMap::new()),
        };
        t.observe("j", "a", Some(true));
        t.observe("j", "b", Some(true));
        assert_eq!(t.count(|j| j.complete.is_some()), 1);
        t.jobs.lock().unwrap().get_mut("j").unwrap().killed = Some(("b".into(), Instant::now()));
        // The watch has not yet seen the kill: b still looks Running, but does not count.
        t.observe("j", "a", Some(true));
        assert_eq!(t.count(|j| j.recovered.is_some()), 0);
        t.observe("j", "b", None);
        t.observe("j", "c", Some(false));
        assert_eq!(t.count(|j| j.recovered.is_some()), 0);
        t.observe("j", "c", Some(true));
        assert_eq!(t.count(|j| j.recovered.is_some()), 1);
    }
}
