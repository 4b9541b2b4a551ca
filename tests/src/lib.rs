//! A real Kubernetes control plane for radfm's end-to-end tests.
//!
//! [`Cluster::start`] runs etcd, kube-apiserver (RBAC on, token and service-account
//! authentication), kube-scheduler and kwok from the binaries `make cluster-tools` builds, on free
//! loopback ports in a temporary folder; installs the CRDs and RBAC from `manifests/`; and
//! registers simulated GPU nodes. Pods the real scheduler binds to them are moved to Running by
//! kwok; tests end pods with an exit code of their choice by writing the pod status. Dropping the
//! cluster (also while unwinding from a failed assertion) kills every process and removes the
//! folder. No kube-controller-manager runs: no garbage collector, no node lifecycle controller,
//! which the operator must cope with anyway.
#![deny(missing_docs)]

pub mod kubeflow;
pub mod kubelet;
pub mod kueue;
pub mod node;
pub mod trainer_v2;

use std::io::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde_json::json;

/// GPU product label set on the simulated nodes.
pub const GPU_PRODUCT: &str = "NVIDIA-H100-80GB-HBM3";

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Folder of the pinned cluster binaries: `$RADFM_CLUSTER_TOOLS`, else built now.
pub fn tools_dir() -> Result<PathBuf> {
    built_path("RADFM_CLUSTER_TOOLS", "build-tools.sh", "cluster-tools")
}

/// Folder of the GitOps health judges, radfm-health and radfm-flux-health
/// (tests/cluster/build-health.sh): `$RADFM_HEALTH_TOOLS`, else built now.
pub fn health_tools() -> Result<PathBuf> {
    built_path("RADFM_HEALTH_TOOLS", "build-health.sh", "health-tool")
}

/// `$var`, else the last line printed by tests/cluster/`script` (which builds what is missing).
fn built_path(var: &str, script: &str, make_target: &str) -> Result<PathBuf> {
    if let Ok(d) = std::env::var(var)
        && !d.is_empty()
    {
        return Ok(PathBuf::from(d));
    }
    let out = Command::new("bash")
        .arg(repo_root().join("tests/cluster").join(script))
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running tests/cluster/{script}"))?;
    if !out.status.success() {
        bail!("tests/cluster/{script} failed; run `make {make_target}`");
    }
    Ok(PathBuf::from(
        String::from_utf8(out.stdout)?
            .trim()
            .lines()
            .last()
            .unwrap_or_default(),
    ))
}

/// An object's health as GitOps tools judge it, each with its own code (radfm-health and
/// radfm-flux-health).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GitOpsHealth {
    /// The object's kind.
    pub kind: String,
    /// The object's name.
    pub name: String,
    /// kstatus' status (what Flux waits on): InProgress, Current, Failed, Terminating, ...
    pub kstatus: String,
    /// kstatus' message.
    pub kstatus_message: String,
    /// Argo CD's health with radfm's argocd-cm overrides: Healthy, Progressing, Degraded, ...
    pub argocd: String,
    /// Argo CD's message.
    pub argocd_message: String,
    /// Flux with radfm's healthCheckExprs (manifests/flux): InProgress, Current, Failed, or
    /// Error while they cannot be evaluated (no status yet; Flux retries).
    #[serde(default)]
    pub flux: String,
    /// Flux's own kstatus fork, without expressions.
    #[serde(default)]
    pub flux_kstatus: String,
}

/// What radfm-flux-health prints per object.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct FluxVerdict {
    name: String,
    flux: String,
    flux_kstatus: String,
}

impl GitOpsHealth {
    /// (kstatus, Argo CD, Flux with radfm's expressions) statuses.
    pub fn statuses(&self) -> (&str, &str, &str) {
        (&self.kstatus, &self.argocd, &self.flux)
    }
}

/// Judges `objects` (one object or a List, as JSON) with kstatus, with Argo CD's health
/// evaluation fed by the argocd-cm snippet radfm ships (manifests/argocd), and with Flux's
/// evaluator of the healthCheckExprs radfm ships (manifests/flux).
pub fn gitops_health(objects: &str) -> Result<Vec<GitOpsHealth>> {
    let tools = health_tools()?;
    let cm = repo_root().join("manifests/argocd/argocd-cm-health.yaml");
    let argocd_args = ["eval".as_ref(), cm.as_os_str()];
    let printed = run_judge(&tools.join("radfm-health"), &argocd_args, objects)?;
    let mut judged: Vec<GitOpsHealth> = json_lines(&printed)?;
    let kustomization = repo_root().join("manifests/flux/kustomization-health.yaml");
    let flux_args = [kustomization.as_os_str()];
    let printed = run_judge(&tools.join("radfm-flux-health"), &flux_args, objects)?;
    let flux: Vec<FluxVerdict> = json_lines(&printed)?;
    if flux.len() != judged.len() {
        bail!(
            "Flux judged {} objects, kstatus {}",
            flux.len(),
            judged.len()
        );
    }
    for (h, f) in judged.iter_mut().zip(flux) {
        if h.name != f.name {
            bail!("Flux judged {} where kstatus judged {}", f.name, h.name);
        }
        (h.flux, h.flux_kstatus) = (f.flux, f.flux_kstatus);
    }
    Ok(judged)
}

fn json_lines<T: serde::de::DeserializeOwned>(text: &str) -> Result<Vec<T>> {
    text.lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("a judge printed {l}")))
        .collect()
}

/// Runs one judge with `objects` on its stdin; returns what it printed.
fn run_judge(bin: &Path, args: &[&std::ffi::OsStr], objects: &str) -> Result<String> {
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    child
        .stdin
        .take()
        .context("judge stdin")?
        .write_all(objects.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{}: {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// A binary of this workspace, built by `cargo build --workspace --bins` next to the test binary.
pub fn workspace_bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test> or target/<profile>/<bin>
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "{name} is not built next to {}; run `cargo build --workspace --bins` (make test does)",
        exe.display()
    )
}

/// Asks the kernel to kill the child when the thread that starts it exits, so nothing outlives a
/// test process that was itself killed.
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// The last `n` lines of a log file (empty when it cannot be read).
pub fn tail_lines(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Starts a process whose output goes to `log`; it is killed if the test process dies.
pub fn spawn_logged(bin: &Path, log: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<Child> {
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(logf.try_clone()?)
        .stderr(logf);
    die_with_parent(&mut cmd);
    cmd.spawn()
        .with_context(|| format!("starting {}", bin.display()))
}

/// Runs a TrainingJob as one local trainer process (`radfm-trainer train --job`, two threads)
/// with `env`; the YAML is written to `dir/<name>.yaml`. Panics with the trainer's stderr when
/// it fails.
pub fn train_locally(job_yaml: &str, dir: &Path, name: &str, env: &[(&str, &str)]) {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, job_yaml).expect("writing the job file");
    let out = Command::new(workspace_bin("radfm-trainer").expect("radfm-trainer is built"))
        .args(["train", "--job"])
        .arg(&path)
        .envs(env.iter().copied())
        .env("RADFM_THREADS", "2")
        .output()
        .expect("radfm-trainer runs");
    assert!(
        out.status.success(),
        "training {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A loopback port free at the time of the call.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs end-to-end tests one at a time: each has its own control plane, and two on a 2-core
/// machine would only slow each other down. (An async lock: a failed test releases it.)
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

/// Which Pod Security Standard a test namespace enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodSecurity {
    /// `restricted`, as radfm's pods must pass.
    Restricted,
    /// None (other operators' pods, such as PyTorchJob's, would not pass `restricted`).
    Unenforced,
}

/// A control-plane client's `--kube-api-qps` and `--kube-api-burst` (twice the QPS), if set.
fn client_rate(qps: Option<u32>) -> Vec<String> {
    qps.map(|q| {
        vec![
            format!("--kube-api-qps={q}"),
            format!("--kube-api-burst={}", 2 * q),
        ]
    })
    .unwrap_or_default()
}

/// What [`Cluster::start_with`] runs.
#[derive(Debug, Clone)]
pub struct ControlPlane {
    /// Address the API server binds and advertises (the `kubernetes` Service's endpoint).
    pub address: String,
    /// kwok-simulated GPU nodes to register (no kwok runs with none).
    pub kwok_nodes: usize,
    /// GPUs of each simulated node.
    pub gpus: u32,
    /// Run kube-controller-manager too (EndpointSlices for cluster DNS, garbage collection,
    /// node lifecycle, the `kube-root-ca.crt` ConfigMaps that pods' API tokens carry).
    pub controller_manager: bool,
    /// Write an audit log of every request's metadata (who, verb, resource) to
    /// [`Cluster::audit_log`], for counting each client's requests.
    pub audit_log: bool,
    /// The API server reaches Services (admission webhooks) at their EndpointSlices' addresses
    /// (`--enable-aggregator-routing`), not their cluster IPs, which nothing routes here.
    pub endpoint_routing: bool,
    /// kube-scheduler's and kube-controller-manager's client QPS (burst twice that); their
    /// defaults (50 and 20) are the bottleneck of thousands of pods: scheduling them, and
    /// deleting them with their namespace.
    pub control_plane_qps: Option<u32>,
    /// How long a node's heartbeats may lapse before the node controller marks it Unknown
    /// (`--node-monitor-grace-period`). 20 s keeps node-loss tests short; one kwok process
    /// renewing hundreds of nodes' Leases on a loaded machine needs Kubernetes' default, 50 s.
    pub node_monitor_grace: Duration,
}

impl Default for ControlPlane {
    fn default() -> Self {
        ControlPlane {
            address: "127.0.0.1".into(),
            kwok_nodes: 0,
            gpus: 0,
            controller_manager: false,
            audit_log: false,
            endpoint_routing: false,
            control_plane_qps: None,
            node_monitor_grace: Duration::from_secs(20),
        }
    }
}

/// A running control plane.
pub struct Cluster {
    dir: tempfile::TempDir,
    tools: PathBuf,
    children: Mutex<Vec<(String, Child)>>,
    /// Admin kubeconfig (system:masters).
    pub kubeconfig: PathBuf,
    /// API server URL.
    pub server: String,
    /// Admin client.
    pub client: Client,
}

/// The service-account signing key pair and an admin token (in tokens.csv) in `d`; returns the
/// token.
fn credentials(d: &Path) -> Result<String> {
    let sh = |cmd: &str| -> Result<()> {
        let ok = Command::new("bash")
            .arg("-c")
            .arg(cmd)
            .current_dir(d)
            .status()?
            .success();
        if !ok {
            bail!("{cmd} failed");
        }
        Ok(())
    };
    sh(
        "openssl genrsa -out sa.key 2048 2>/dev/null && openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null",
    )?;
    let token = format!("admin-{}", std::process::id());
    std::fs::write(
        d.join("tokens.csv"),
        format!("{token},admin,admin,system:masters\n"),
    )?;

    Ok(token)
}

impl Cluster {
    /// Starts etcd, the API server, the scheduler and kwok, then installs radfm's CRDs and RBAC
    /// and `nodes` simulated nodes with `gpus` GPUs each.
    pub async fn start(nodes: usize, gpus: u32) -> Result<Cluster> {
        Cluster::start_with(&ControlPlane {
            kwok_nodes: nodes,
            gpus,
            ..ControlPlane::default()
        })
        .await
    }

    /// Starts a control plane as `options` say.
    pub async fn start_with(options: &ControlPlane) -> Result<Cluster> {
        let (nodes, gpus, address) = (options.kwok_nodes, options.gpus, options.address.as_str());
        let dir = tempfile::Builder::new()
            .prefix("radfm-cluster-")
            .tempdir()?;
        let tools = tools_dir()?;
        let d = dir.path();
        let token = credentials(d)?;
        let (etcd_port, peer_port, api_port) = (free_port(), free_port(), free_port());
        let server = format!("https://{address}:{api_port}");
        let mut cluster = Cluster {
            kubeconfig: d.join("admin.kubeconfig"),
            server: server.clone(),
            client: Client::try_from(Config::new(server.parse()?))?, // replaced below
            tools,
            children: Mutex::new(Vec::new()),
            dir,
        };
        let d = cluster.dir.path().to_path_buf();
        let etcd_url = cluster.spawn_etcd(etcd_port, peer_port)?;
        cluster.spawn_apiserver(address, api_port, &etcd_url, options)?;
        let ca = d.join("certs/apiserver.crt");
        wait_for_file(&ca, Duration::from_secs(60))?;
        write_kubeconfig(&cluster.kubeconfig, &server, &ca, &token)?;
        cluster.client = client_from(&cluster.kubeconfig).await?;
        cluster.wait_for_apiserver().await?;
        if options.controller_manager {
            cluster.spawn_controller_manager(&ca, options)?;
        }
        cluster.spawn_scheduler_and_kwok(nodes, options.control_plane_qps)?;
        cluster.install_radfm().await?;
        for i in 0..nodes {
            cluster.add_gpu_node(&format!("gpu-{i}"), gpus).await?;
        }
        let nodes_api: Api<Node> = Api::all(cluster.client.clone());
        let exited = wait_until(Duration::from_secs(60), "simulated nodes Ready", || async {
            if let Some(why) = cluster.exited() {
                return Some(Some(why));
            }
            let list = nodes_api.list(&Default::default()).await.ok()?;
            let ready = list.items.iter().filter(|n| node_is_ready(n)).count();
            (ready == nodes).then_some(None)
        })
        .await?;
        if let Some(why) = exited {
            bail!("the control plane did not start: {why}");
        }
        Ok(cluster)
    }

    /// The first of the cluster's processes that has exited, with the end of its log.
    pub fn exited(&self) -> Option<String> {
        let mut children = self.children.lock().unwrap_or_else(|e| e.into_inner());
        children.iter_mut().find_map(|(name, child)| {
            let status = child.try_wait().ok()??;
            Some(format!(
                "{name} exited ({status}); the end of {}:\n{}",
                self.log_path(name).display(),
                tail_lines(&self.log_path(name), 5)
            ))
        })
    }

    /// Starts etcd; returns its client URL.
    fn spawn_etcd(&self, etcd_port: u16, peer_port: u16) -> Result<String> {
        let d = self.dir.path();
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        self.spawn(
            "etcd",
            &[
                "--data-dir",
                &d.join("etcd").to_string_lossy(),
                "--listen-client-urls",
                &etcd_url,
                "--advertise-client-urls",
                &etcd_url,
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{peer_port}"),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer_port}"),
                "--initial-cluster",
                &format!("default=http://127.0.0.1:{peer_port}"),
                "--log-level",
                "warn",
            ],
            &[],
        )?;
        Ok(etcd_url)
    }

    /// Starts kube-apiserver with RBAC, token and service-account authentication.
    fn spawn_apiserver(
        &self,
        address: &str,
        api_port: u16,
        etcd_url: &str,
        options: &ControlPlane,
    ) -> Result<()> {
        let d = self.dir.path();
        let mut extra: Vec<String> = Vec::new();
        if options.audit_log {
            let policy = d.join("audit-policy.yaml");
            std::fs::write(
                &policy,
                "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n- level: Metadata\n",
            )?;
            extra.extend([
                format!("--audit-policy-file={}", policy.display()),
                format!("--audit-log-path={}", self.audit_log().display()),
                "--audit-log-mode=batch".into(),
                // One file: a rotation (at 100 MB by default) would lose what a reader counts.
                "--audit-log-maxsize=0".into(),
            ]);
        }
        if options.endpoint_routing {
            extra.push("--enable-aggregator-routing=true".into());
        }
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        self.spawn(
            "kube-apiserver",
            &[
                extra.as_slice(),
                &[
                    "--etcd-servers",
                    etcd_url,
                    "--bind-address",
                    address,
                    "--advertise-address",
                    address,
                    "--secure-port",
                    &api_port.to_string(),
                    "--cert-dir",
                    &d.join("certs").to_string_lossy(),
                    "--token-auth-file",
                    &d.join("tokens.csv").to_string_lossy(),
                    "--authorization-mode",
                    "RBAC",
                    "--service-account-key-file",
                    &d.join("sa.pub").to_string_lossy(),
                    "--service-account-signing-key-file",
                    &d.join("sa.key").to_string_lossy(),
                    "--service-account-issuer",
                    "https://kubernetes.default.svc",
                    "--service-cluster-ip-range",
                    "10.96.0.0/16",
                    // No node lifecycle controller runs to lift the not-ready taint this plugin adds.
                    "--disable-admission-plugins",
                    "TaintNodesByCondition",
                    // Logs and exec reach a real kubelet at its node's address, not a DNS name.
                    "--kubelet-preferred-address-types",
                    "InternalIP",
                    "--v",
                    "1",
                ],
            ]
            .concat(),
            &[],
        )?;
        Ok(())
    }

    /// The API server's audit log (JSON lines; written where [`ControlPlane::audit_log`] is
    /// set).
    pub fn audit_log(&self) -> PathBuf {
        self.dir.path().join("audit.log")
    }

    /// Waits (90 s at most) until kube-apiserver answers /readyz.
    async fn wait_for_apiserver(&self) -> Result<()> {
        let start = Instant::now();
        loop {
            let ready = self.client.request_text(http_get("/readyz")?).await;
            if matches!(&ready, Ok(body) if body.trim() == "ok") {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(90) {
                bail!(
                    "kube-apiserver not ready after 90 s: {ready:?}; log: {}",
                    self.log_tail("kube-apiserver")
                );
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Starts kube-controller-manager (node lifecycle, garbage collection, service accounts).
    fn spawn_controller_manager(&self, ca: &Path, options: &ControlPlane) -> Result<()> {
        let d = self.dir.path();
        let kc = self.kubeconfig.to_string_lossy().to_string();
        let ca = ca.to_string_lossy().to_string();
        let grace = format!("{}s", options.node_monitor_grace.as_secs());
        let rate = client_rate(options.control_plane_qps);
        let rate: Vec<&str> = rate.iter().map(String::as_str).collect();
        self.spawn(
            "kube-controller-manager",
            &[
                &[
                    "--kubeconfig",
                    &kc,
                    "--leader-elect=false",
                    "--secure-port",
                    "0",
                    "--root-ca-file",
                    &ca,
                    "--service-account-private-key-file",
                    &d.join("sa.key").to_string_lossy(),
                    "--cluster-cidr",
                    "10.244.0.0/16",
                    "--service-cluster-ip-range",
                    "10.96.0.0/16",
                    "--node-monitor-grace-period",
                    &grace,
                    "--v",
                    "1",
                ],
                rate.as_slice(),
            ]
            .concat(),
            &[],
        )?;
        Ok(())
    }

    /// Waits (60 s at most) until the CRDs `kubectl wait crd <crds>` names are Established.
    /// `kubectl wait` fails outright while a new CRD has no conditions yet, so it is asked again.
    pub async fn wait_established(&self, crds: &[&str]) -> Result<()> {
        let args = [
            &[
                "wait",
                "--for=condition=Established",
                "--timeout=10s",
                "crd",
            ],
            crds,
        ]
        .concat();
        wait_until(Duration::from_secs(60), "CRDs Established", || async {
            self.kubectl(&args).status.success().then_some(())
        })
        .await
    }

    /// Applies radfm's CRDs (waiting until Established), its namespace and its RBAC.
    async fn install_radfm(&self) -> Result<()> {
        let crds = repo_root().join("manifests/crds");
        self.kubectl_ok(&["apply", "-f", &crds.to_string_lossy()])?;
        self.wait_established(&["--all"]).await?;
        self.kubectl_ok(&["create", "namespace", "radfm-system"])?;
        self.kubectl_ok(&[
            "apply",
            "-f",
            &repo_root().join("manifests/rbac.yaml").to_string_lossy(),
        ])?;
        Ok(())
    }

    /// Starts kube-scheduler, and kwok where simulated nodes are wanted.
    fn spawn_scheduler_and_kwok(&self, nodes: usize, qps: Option<u32>) -> Result<()> {
        let kc = self.kubeconfig.to_string_lossy().to_string();
        let rate = client_rate(qps);
        let rate: Vec<&str> = rate.iter().map(String::as_str).collect();
        self.spawn(
            "kube-scheduler",
            &[
                &[
                    "--kubeconfig",
                    &kc,
                    "--leader-elect=false",
                    "--secure-port",
                    "0",
                    "--v",
                    "1",
                ],
                rate.as_slice(),
            ]
            .concat(),
            &[],
        )?;
        let stages = repo_root().join("tests/cluster/kwok-stages.yaml");
        if nodes > 0 {
            self.spawn(
                "kwok",
                &[
                    "--kubeconfig",
                    &kc,
                    "-c",
                    &stages.to_string_lossy(),
                    "--manage-all-nodes=false",
                    "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                    "--manage-nodes-with-label-selector=",
                    // Heartbeats by Lease, as kubelets send them: kwok renews each node's Lease and
                    // the node controller reads the renewals. (The stages set Ready once; with no
                    // heartbeat every node would turn Unknown after the grace period and flap
                    // back, and the operator would see workers losing their nodes.)
                    "--node-lease-duration-seconds=40",
                    // A line per Lease renewal otherwise.
                    "--v=WARN",
                    "--cidr=10.0.0.1/16",
                    "--node-ip=127.0.0.1",
                    "--node-port",
                    &free_port().to_string(),
                    "--server-address",
                    &format!("127.0.0.1:{}", free_port()),
                ],
                &[],
            )?;
        }

        Ok(())
    }

    /// Registers a simulated node with `gpus` GPUs that kwok keeps Ready.
    pub async fn add_gpu_node(&self, name: &str, gpus: u32) -> Result<()> {
        let node: Node = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "annotations": {"kwok.x-k8s.io/node": "fake"},
                "labels": {
                    "kubernetes.io/hostname": name,
                    "type": "kwok",
                    "nvidia.com/gpu.product": GPU_PRODUCT,
                    "nvidia.com/gpu.count": gpus.to_string(),
                },
            },
            "status": {
                "allocatable": {"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": gpus.to_string()},
                "capacity": {"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": gpus.to_string()},
            },
        }))?;
        Api::<Node>::all(self.client.clone())
            .create(&PostParams::default(), &node)
            .await?;
        Ok(())
    }

    fn spawn(&self, name: &str, args: &[&str], env: &[(&str, &str)]) -> Result<()> {
        let bin = self.tools.join(name);
        let child = self.spawn_logged(&bin, name, args, env)?;
        self.adopt(name, child);
        Ok(())
    }

    /// Keeps `child` running as long as the cluster (it is killed with it).
    pub fn adopt(&self, name: &str, child: Child) {
        self.children
            .lock()
            .unwrap()
            .push((name.to_string(), child));
    }

    /// Starts a process whose output goes to `<cluster dir>/<log>.log`; it is killed if the test
    /// process dies.
    pub fn spawn_logged(
        &self,
        bin: &Path,
        log: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Child> {
        spawn_logged(bin, &self.log_path(log), args, env)
    }

    /// Path of a process log in the cluster folder.
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    /// The last 40 lines of a process log.
    pub fn log_tail(&self, name: &str) -> String {
        tail_lines(&self.log_path(name), 40)
    }

    /// Runs the pinned helm against this cluster, with its cache, config and data folders in
    /// the cluster folder (nothing of the user's helm setup is read or written).
    pub fn helm(&self, args: &[&str]) -> Output {
        Command::new(self.tool("helm"))
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CACHE_HOME", self.log_path("helm-cache"))
            .env("HELM_CONFIG_HOME", self.log_path("helm-config"))
            .env("HELM_DATA_HOME", self.log_path("helm-data"))
            .output()
            .expect("helm runs")
    }

    /// A pinned cluster tool (kubectl, helm, ...).
    pub fn tool(&self, name: &str) -> PathBuf {
        self.tools.join(name)
    }

    /// Runs kubectl as admin.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_stdin(args, None)
    }

    /// Runs kubectl as admin with `stdin` as input.
    pub fn kubectl_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        use std::io::Write;
        let mut child = Command::new(self.tool("kubectl"))
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl starts");
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .expect("kubectl stdin");
        }
        drop(child.stdin.take());
        child.wait_with_output().expect("kubectl runs")
    }

    /// Runs kubectl and fails with its stderr unless it succeeds; returns stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.kubectl(args);
        if !out.status.success() {
            bail!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    }

    /// Every object of `resource` (e.g. `trainingjobs`) in `namespace` judged by kstatus and
    /// Argo CD (see [`gitops_health`]), by name.
    pub fn gitops_health(
        &self,
        namespace: &str,
        resource: &str,
    ) -> Result<std::collections::BTreeMap<String, GitOpsHealth>> {
        let list = self.kubectl_ok(&["get", resource, "-n", namespace, "-o", "json"])?;
        Ok(gitops_health(&list)?
            .into_iter()
            .map(|h| (h.name.clone(), h))
            .collect())
    }

    /// Creates a namespace that enforces the `restricted` Pod Security Standard, with its
    /// `default` ServiceAccount (no controller-manager creates it here) and a RoleBinding that lets the operator hold its Lease there. The guard dumps the
    /// namespace's objects and the operator logs if the test fails.
    pub async fn namespace(&self, name: &str) -> Result<TestNamespace<'_>> {
        // Every pod the operator creates must pass the `restricted` Pod Security Standard; the
        // API server's PodSecurity admission enforces it here as a cluster admin would.
        self.namespace_with(name, PodSecurity::Restricted).await
    }

    /// [`Cluster::namespace`] with the Pod Security admission `security` says.
    pub async fn namespace_with(
        &self,
        name: &str,
        security: PodSecurity,
    ) -> Result<TestNamespace<'_>> {
        let labels = match security {
            PodSecurity::Restricted => json!({
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/enforce-version": "latest",
            }),
            PodSecurity::Unenforced => json!({}),
        };
        let ns: Namespace =
            serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}}))?;
        Api::<Namespace>::all(self.client.clone())
            .create(&PostParams::default(), &ns)
            .await?;
        let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "default"}}))?;
        // Where kube-controller-manager runs, it may have created it first.
        match Api::<ServiceAccount>::namespaced(self.client.clone(), name)
            .create(&PostParams::default(), &sa)
            .await
        {
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            r => {
                r?;
            }
        }
        self.kubectl_ok(&[
            "create",
            "rolebinding",
            "radfm-operator-leader-election",
            "-n",
            name,
            "--clusterrole=radfm-operator-leader-election",
            "--serviceaccount=radfm-system:radfm-operator",
        ])?;
        Ok(TestNamespace {
            cluster: self,
            name: name.to_string(),
        })
    }

    /// A kubeconfig that authenticates as `namespace/sa` with a token from the TokenRequest API,
    /// so the operator runs with exactly the RBAC of its manifests.
    pub fn service_account_kubeconfig(&self, namespace: &str, sa: &str) -> Result<PathBuf> {
        let token = self.kubectl_ok(&["create", "token", sa, "-n", namespace, "--duration=24h"])?;
        let path = self.dir.path().join(format!("{namespace}-{sa}.kubeconfig"));
        write_kubeconfig(
            &path,
            &self.server,
            &self.dir.path().join("certs/apiserver.crt"),
            token.trim(),
        )?;
        Ok(path)
    }

    /// Starts the operator binary, as its ServiceAccount, watching `namespace` and holding its
    /// Lease there. `name` names its log.
    pub fn start_operator(&self, namespace: &str, name: &str, extra: &[&str]) -> Result<Operator> {
        self.start_operator_with_env(namespace, name, extra, &[])
    }

    /// Like [`Cluster::start_operator`], with extra environment variables (object-store
    /// credentials of the registry).
    pub fn start_operator_with_env(
        &self,
        namespace: &str,
        name: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Operator> {
        let bin = workspace_bin("radfm-operator")?;
        let kubeconfig = self.service_account_kubeconfig("radfm-system", "radfm-operator")?;
        let kc = kubeconfig.to_string_lossy().to_string();
        let mut args = vec![
            "run",
            "--namespace",
            namespace,
            "--lease-namespace",
            namespace,
            "--identity",
            name,
            "--metrics-addr",
            "127.0.0.1:0",
            "--log-text",
        ];
        // The test registries (local folders and the S3 server) are allowed for every namespace
        // unless the test sets its own allowances.
        if !extra.iter().any(|a| a.starts_with("--allowed-registries")) {
            args.push("--allowed-registries=*=file:///,*=s3://");
        }
        args.extend_from_slice(extra);
        let child = self.spawn_logged(
            &bin,
            name,
            &args,
            &[
                &[
                    ("KUBECONFIG", kc.as_str()),
                    ("RUST_LOG", "info,radfm_operator=debug"),
                ],
                env,
            ]
            .concat(),
        )?;
        Ok(Operator {
            child,
            name: name.to_string(),
        })
    }

    /// The first Running pod of TrainingJob `job` in `namespace`, waiting up to `timeout`.
    pub async fn running_pod_of(
        &self,
        namespace: &str,
        job: &str,
        timeout: Duration,
    ) -> Result<Pod> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let lp = ListParams::default().labels(&format!("radfm.io/job-name={job}"));
        wait_until(timeout, &format!("a running pod of {job}"), || async {
            pods.list(&lp)
                .await
                .ok()?
                .items
                .into_iter()
                .find(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        })
        .await
    }

    /// Ends a running pod as a kubelet would report it: phase, exit code and reason of the trainer
    /// container.
    pub async fn end_pod(
        &self,
        namespace: &str,
        pod: &str,
        exit_code: i32,
        reason: &str,
    ) -> Result<()> {
        self.end_pod_with_message(namespace, pod, exit_code, reason, None)
            .await
    }

    /// [`Cluster::end_pod`] with the termination message the container left (what
    /// `terminationMessagePolicy: FallbackToLogsOnError` makes of a failed container's log).
    pub async fn end_pod_with_message(
        &self,
        namespace: &str,
        pod: &str,
        exit_code: i32,
        reason: &str,
        message: Option<&str>,
    ) -> Result<()> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let phase = if exit_code == 0 {
            "Succeeded"
        } else {
            "Failed"
        };
        let status = json!({"status": {
            "phase": phase,
            "conditions": [{"type": "Ready", "status": "False"}, {"type": "ContainersReady", "status": "False"}],
            "containerStatuses": [{
                "name": "trainer", "image": "radfm", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": exit_code, "reason": reason, "message": message}},
            }],
        }});
        pods.patch_status(pod, &PatchParams::default(), &Patch::Merge(&status))
            .await?;
        Ok(())
    }

    /// Deletes a node object (the machine is gone).
    pub async fn delete_node(&self, name: &str) -> Result<()> {
        Api::<Node>::all(self.client.clone())
            .delete(name, &DeleteParams::default())
            .await?;
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let mut children = self.children.lock().unwrap_or_else(|e| e.into_inner());
        // Reverse start order: clients first, etcd last.
        for (_, child) in children.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A running operator process; killed (SIGKILL) when dropped.
pub struct Operator {
    child: Child,
    /// Its identity and log name.
    pub name: String,
}

impl Operator {
    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The address its /metrics endpoint listens on, read from its log.
    pub async fn metrics_addr(&self, cluster: &Cluster) -> Result<String> {
        wait_until(
            Duration::from_secs(30),
            "operator metrics address",
            || async {
                let log = std::fs::read_to_string(cluster.log_path(&self.name)).ok()?;
                let line = log.lines().find(|l| l.contains("serving /metrics"))?;
                Some(
                    line.split("addr=")
                        .nth(1)?
                        .split_whitespace()
                        .next()?
                        .to_string(),
                )
            },
        )
        .await
    }

    /// Sends SIGKILL and waits for the process to end.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM (graceful shutdown) and waits up to `timeout`.
    pub fn terminate(&mut self, timeout: Duration) -> Result<()> {
        // SAFETY: sending a signal to a child we own.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("operator {} did not stop within {timeout:?}", self.name)
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A test namespace; on a failing test it prints what was in it.
pub struct TestNamespace<'a> {
    cluster: &'a Cluster,
    /// Its name.
    pub name: String,
}

impl Drop for TestNamespace<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let dump = self.cluster.kubectl(&[
                "get",
                "trainingjobs,pods,services,events",
                "-n",
                &self.name,
                "-o",
                "yaml",
            ]);
            eprintln!(
                "--- objects in namespace {} ---\n{}",
                self.name,
                String::from_utf8_lossy(&dump.stdout)
            );
            for entry in std::fs::read_dir(self.cluster.dir.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let name = entry.file_name().to_string_lossy().to_string();
                if name.starts_with("operator") && name.ends_with(".log") {
                    eprintln!(
                        "--- {name} ---\n{}",
                        self.cluster.log_tail(name.trim_end_matches(".log"))
                    );
                }
            }
        }
    }
}

fn node_is_ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn http_get(path: &str) -> Result<http::Request<Vec<u8>>> {
    Ok(http::Request::get(path).body(Vec::new())?)
}

fn write_kubeconfig(path: &Path, server: &str, ca: &Path, token: &str) -> Result<()> {
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: radfm-test\n  cluster:\n    server: {server}\n    certificate-authority: {}\n\
         users:\n- name: user\n  user:\n    token: {token}\ncontexts:\n- name: radfm-test\n  context:\n    cluster: radfm-test\n    user: user\n\
         current-context: radfm-test\n",
        ca.display()
    );
    std::fs::write(path, text)?;
    Ok(())
}

/// A client from a kubeconfig file.
pub async fn client_from(path: &Path) -> Result<Client> {
    let kc = Kubeconfig::read_from(path)?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

fn wait_for_file(path: &Path, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    while !path.exists() {
        if start.elapsed() > timeout {
            bail!("{} did not appear within {timeout:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // The API server writes the certificate before the key; give it a moment to finish.
    std::thread::sleep(Duration::from_millis(200));
    Ok(())
}

/// Waits until the object `name` exists and satisfies `pred`, returning it; panics naming
/// `what` after `timeout`.
pub async fn wait_object<K>(
    api: &Api<K>,
    name: &str,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&K) -> bool,
) -> K
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    wait_until(timeout, &format!("{name}: {what}"), || async {
        let o = api.get_opt(name).await.ok()??;
        pred(&o).then_some(o)
    })
    .await
    .unwrap()
}

/// Polls `check` every 200 ms until it returns Some, or fails after `timeout` naming `what`.
pub async fn wait_until<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A plain HTTP GET on loopback: (status code, body). It asks as HTTP/1.0, so the server
/// sends the body as it is, not in HTTP/1.1's chunked encoding, whose size lines would land in
/// the middle of the text (Go's servers chunk any response over a few KiB, such as
/// `/metrics`).
pub fn http_get_text(addr: &str, path: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("HTTP status line")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Runs the workspace's `radfm` binary with `env` added, one libtorch thread per process, and
/// no backtraces in its error output (so messages can be compared exactly).
pub fn radfm(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(workspace_bin("radfm").expect("radfm is built"))
        .args(args)
        .envs(env.iter().copied())
        .env("RADFM_THREADS", "1")
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .output()
        .expect("radfm runs")
}

/// The stdout of a command that must have succeeded; otherwise a panic showing its output.
pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "command failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The Python of the interoperability tests (`make py-deps`): `$RADFM_PYTHON`, else
/// `~/.cache/radfm/pyenv/bin/python`.
pub fn python() -> PathBuf {
    let p = std::env::var("RADFM_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/radfm/pyenv/bin/python")
        });
    assert!(
        p.is_file(),
        "{} not found: run `make py-deps` (make test does)",
        p.display()
    );
    p
}

/// Runs a Python snippet with the interoperability Python; returns stdout, failing with stderr.
pub fn run_python(code: &str, args: &[&str]) -> String {
    let out = Command::new(python())
        .arg("-c")
        .arg(code)
        .args(args)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "python failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// A real S3 server (versitygw's POSIX gateway: checks SigV4 signatures and honours conditional
/// writes, `If-None-Match: *` and `If-Match`, as AWS S3 and MinIO do) on a loopback port, serving
/// a temporary folder; bucket `radfm` exists. Credentials reach clients through AWS_* variables,
/// as in production.
pub struct S3Server {
    child: Option<Child>,
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// Address it listens on.
    pub host: String,
    /// Port.
    pub port: u16,
    access_key: String,
    secret_key: String,
}

/// Access key of the test S3 server.
pub const S3_ACCESS_KEY: &str = "radfm-test-access";
/// Secret key of the test S3 server.
pub const S3_SECRET_KEY: &str = "radfm-test-secret-key-0123456789";

impl S3Server {
    /// Starts the server (`make s3-server` builds it; `$RADFM_S3_SERVER` overrides the path).
    pub fn start() -> Result<S3Server> {
        S3Server::start_on("127.0.0.1")
    }

    /// Starts a server of its own keys (`owner` in both): another organisation's store, which
    /// no other server's credentials open.
    pub fn start_owned_by(owner: &str) -> Result<S3Server> {
        let mut s = S3Server::start_on("127.0.0.1")?;
        s.access_key = format!("{owner}-access");
        s.secret_key = format!("{owner}-secret-key-0123456789");
        s.restart()?;
        Ok(s)
    }

    /// Starts the server listening on `host` (an address pods reach, on a real node).
    pub fn start_on(host: &str) -> Result<S3Server> {
        let bin = std::env::var("RADFM_S3_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|_| {
                PathBuf::from(std::env::var("HOME").unwrap_or_default())
                    .join(".cache/radfm/versitygw-v1.8.0/versitygw")
            });
        if !bin.is_file() {
            bail!(
                "{} not found: run `make s3-server` (make test does)",
                bin.display()
            );
        }
        let dir = tempfile::Builder::new().prefix("radfm-s3-").tempdir()?;
        std::fs::create_dir_all(dir.path().join("data/radfm"))?;
        let mut s = S3Server {
            child: None,
            dir,
            bin,
            host: host.to_string(),
            port: free_port(),
            access_key: S3_ACCESS_KEY.into(),
            secret_key: S3_SECRET_KEY.into(),
        };
        s.restart()?;
        Ok(s)
    }

    /// (Re)starts the server on the same port and folder, waiting until it accepts connections.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("s3.log"))?;
        let mut cmd = Command::new(&self.bin);
        cmd.args([
            "--access",
            &self.access_key,
            "--secret",
            &self.secret_key,
            "--port",
            &format!("{}:{}", self.host, self.port),
            "--quiet",
            "posix",
        ])
        .arg(self.dir.path().join("data"))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
        die_with_parent(&mut cmd);
        self.child = Some(
            cmd.spawn()
                .with_context(|| format!("starting {}", self.bin.display()))?,
        );
        let start = Instant::now();
        while std::net::TcpStream::connect((self.host.as_str(), self.port)).is_err() {
            if start.elapsed() > Duration::from_secs(20) {
                bail!("the S3 server did not listen on {} within 20 s", self.port);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Stops the server (an outage).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The AWS_* variables a client needs.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".into(), self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY".into(), self.secret_key.clone()),
            (
                "AWS_ENDPOINT_URL".into(),
                format!("http://{}:{}", self.host, self.port),
            ),
            ("AWS_REGION".into(), "us-east-1".into()),
        ]
    }

    /// The folder holding bucket `radfm`'s objects.
    pub fn bucket_dir(&self) -> PathBuf {
        self.dir.path().join("data/radfm")
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A TCP proxy whose client-to-server direction runs at `bytes_per_s` (a congested link to an
/// object store); the other direction is not slowed. Stops accepting on drop.
pub struct SlowProxy {
    /// Port it listens on (127.0.0.1).
    pub port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl SlowProxy {
    /// Forwards connections on a free loopback port to `target`.
    pub fn start(target: std::net::SocketAddr, bytes_per_s: u64) -> Result<SlowProxy> {
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = std::net::TcpStream::connect(target) else {
                    continue;
                };
                let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
                    continue;
                };
                std::thread::spawn(move || throttled_copy(client, server, bytes_per_s));
                std::thread::spawn(move || {
                    let (mut from, mut to) = (s2, c2);
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        Ok(SlowProxy { port, stop })
    }
}

fn throttled_copy(mut from: std::net::TcpStream, mut to: std::net::TcpStream, bytes_per_s: u64) {
    use std::io::{Read, Write};
    let mut buf = vec![0u8; 16 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                std::thread::sleep(Duration::from_secs_f64(n as f64 / bytes_per_s as f64));
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Network namespaces that stand in for pods: namespace `i` has its own address
/// `10.<net>.0.<10+i>` on a veth pair whose other end sits on a bridge in a further namespace
/// (the switch), so processes talk over real interfaces, as pods do, a link can be cut to
/// simulate a stall, and no test address exists in the machine's own network namespace.
/// Removed on drop.
pub struct NetNs {
    names: Vec<String>,
    switch: String,
    net: u8,
}

impl NetNs {
    /// Creates `n` namespaces, or returns None when this machine cannot (no `ip`, no
    /// CAP_NET_ADMIN); callers then fall back to loopback.
    pub fn create(n: usize) -> Option<NetNs> {
        let ip = |args: &[&str]| -> bool {
            Command::new("ip")
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        // A private /24 per test process (pid-derived), so parallel test binaries do not clash.
        let id = std::process::id() % 200;
        let net = 30 + (id % 200) as u8;
        let tag = format!("rf{id}");
        let switch = format!("{tag}sw");
        let ns = NetNs {
            names: (0..n).map(|i| format!("{tag}n{i}")).collect(),
            switch: switch.clone(),
            net,
        };
        // Leftovers of a killed earlier run with the same tag.
        for name in &ns.names {
            ip(&["netns", "del", name]);
        }
        ip(&["netns", "del", &switch]);
        if !ip(&["netns", "add", &switch]) {
            return None;
        }
        let ok = ip(&["-n", &switch, "link", "add", "sw0", "type", "bridge"])
            && ip(&["-n", &switch, "link", "set", "sw0", "up"])
            && ns.names.iter().enumerate().all(|(i, name)| {
                let (port, peer) = (format!("{name}h"), format!("{name}p"));
                ip(&["netns", "add", name])
                    && ip(&[
                        "-n", &switch, "link", "add", &port, "type", "veth", "peer", "name", &peer,
                    ])
                    && ip(&["-n", &switch, "link", "set", &peer, "netns", name])
                    && ip(&["-n", &switch, "link", "set", &port, "master", "sw0"])
                    && ip(&["-n", &switch, "link", "set", &port, "up"])
                    && ip(&[
                        "-n",
                        name,
                        "addr",
                        "add",
                        &format!("10.{net}.0.{}/24", 10 + i),
                        "dev",
                        &peer,
                    ])
                    && ip(&["-n", name, "link", "set", &peer, "up"])
                    && ip(&["-n", name, "link", "set", "lo", "up"])
            });
        ok.then_some(ns)
    }

    /// The address of namespace `i`.
    pub fn addr(&self, i: usize) -> String {
        format!("10.{}.0.{}", self.net, 10 + i)
    }

    /// A command that runs `program` inside namespace `i`.
    pub fn command(&self, i: usize, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.names[i]]).arg(program);
        c
    }

    /// Takes namespace `i`'s link down (its process keeps running, unreachable: a stall).
    pub fn cut(&self, i: usize) {
        let _ = Command::new("ip")
            .args(["-n", &self.switch])
            .args(["link", "set", &format!("{}h", self.names[i]), "down"])
            .status();
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of each veth pair, and with it the pair.
        for name in self.names.iter().chain([&self.switch]) {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}
