//! A real Kubernetes node for end-to-end tests: kubelet, containerd with runc, CNI bridge
//! networking, kube-proxy and CoreDNS, beside a control plane that also runs
//! kube-controller-manager, running radfm's own images (`tests/cluster/build-images.sh`).
//!
//! Everything lives in private network, mount and PID namespaces that the test creates for
//! itself ([`in_private_namespaces`] re-runs the test inside `unshare`): the node's address, the
//! pod bridge and every address pods reach (API server, S3 server, DNS) exist only there, so no
//! test traffic touches the machine's own network, mounts made by the kubelet and containerd
//! vanish with the test, and every container process dies with it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;

use crate::{Cluster, ControlPlane, S3Server, repo_root, tools_dir, wait_until};

/// The node's address (on the loopback interface of the test's network namespace): the API server, the
/// S3 server and cluster DNS listen here, and pods reach it through their bridge's gateway.
pub const NODE_IP: &str = "10.250.0.1";
/// The node's name.
pub const NODE_NAME: &str = "node-0";
/// Pod addresses (the CNI bridge's subnet).
pub const POD_SUBNET: &str = "10.244.0.0/24";
/// Tag of the locally built images (`docker.io/radfm/<name>:<tag>`).
pub const IMAGE_TAG: &str = "dev";
/// The trainer image as pods name it.
pub const TRAINER_IMAGE: &str = "docker.io/radfm/radfm-trainer:dev";
/// The operator image as pods name it.
pub const OPERATOR_IMAGE: &str = "docker.io/radfm/radfm-operator:dev";

const INSIDE: &str = "RADFM_NODE_NAMESPACES";

/// Runs the calling test inside fresh network, mount and PID namespaces: returns `true` when the
/// caller is already inside (go on with the test), else runs this test binary again under
/// `unshare` for the test named `test`, streams its output and fails unless it passed (the caller
/// then returns). Needs root, as CI and the development machines have.
pub fn in_private_namespaces(test: &str) -> bool {
    if std::env::var(INSIDE).is_ok_and(|v| v == "1") {
        return true;
    }
    // One node at a time: each is a whole cluster, and two on 2 cores only slow each other down.
    static ONE_NODE: Mutex<()> = Mutex::new(());
    let _one = ONE_NODE.lock().unwrap_or_else(|e| e.into_inner());
    let exe = std::env::current_exe().expect("the test binary's path");
    let status = Command::new("unshare")
        .args([
            "--net",
            "--mount",
            "--pid",
            "--fork",
            "--mount-proc",
            "--propagation",
            "private",
            "--kill-child",
            "--",
        ])
        .arg(exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(INSIDE, "1")
        .status()
        .expect("unshare runs (util-linux)");
    assert!(
        status.success(),
        "{test} failed inside its namespaces ({status})"
    );
    false
}

/// A control plane with one real node, an S3 server and cluster DNS, in the test's namespaces.
pub struct RealNode {
    /// The control plane (API server at [`NODE_IP`]).
    pub cluster: Cluster,
    /// The S3 server at [`NODE_IP`].
    pub s3: S3Server,
    dir: tempfile::TempDir,
    tools: PathBuf,
    children: Mutex<Vec<(String, Child)>>,
}

fn sh(what: &str, cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("starting {what}"))?;
    if !out.status.success() {
        bail!(
            "{what}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn ip(args: &[&str]) -> Result<()> {
    sh(
        &format!("ip {}", args.join(" ")),
        Command::new("ip").args(args),
    )
}

/// Folder of the locally built images: `$RADFM_IMAGES`, else built now from the workspace's
/// binaries next to the test binary.
pub fn images_dir() -> Result<PathBuf> {
    if let Ok(d) = std::env::var("RADFM_IMAGES")
        && !d.is_empty()
    {
        return Ok(PathBuf::from(d));
    }
    let bin = crate::workspace_bin("radfm-trainer")?;
    let bin_dir = bin.parent().expect("a binary has a folder");
    let cache = std::env::var("RADFM_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/radfm")
        });
    let out_dir = cache.join("images");
    let out = Command::new("bash")
        .arg(repo_root().join("tests/cluster/build-images.sh"))
        .arg(bin_dir)
        .arg(&out_dir)
        .arg(IMAGE_TAG)
        .stderr(Stdio::inherit())
        .output()
        .context("running tests/cluster/build-images.sh")?;
    if !out.status.success() {
        bail!("tests/cluster/build-images.sh failed; run `make images`");
    }
    Ok(out_dir)
}

impl RealNode {
    /// Brings up the node's network, the control plane (with kube-controller-manager), the S3
    /// server, containerd with radfm's images imported, CoreDNS, the kubelet and kube-proxy, and
    /// waits until the node is Ready. Call only inside [`in_private_namespaces`].
    pub async fn start() -> Result<RealNode> {
        if std::env::var(INSIDE).ok().as_deref() != Some("1") {
            bail!("RealNode::start runs only inside in_private_namespaces");
        }
        let images = images_dir()?;
        // Paths that containerd, its shims and CNI use outside their configured folders: fresh
        // tmpfs mounts in the test's private mount namespace, so nothing is left on the machine.
        for dir in ["/run/netns", "/run/containerd", "/var/lib/cni"] {
            std::fs::create_dir_all(dir)?;
            sh(
                &format!("mounting a tmpfs on {dir}"),
                Command::new("mount").args(["-t", "tmpfs", "tmpfs", dir]),
            )?;
        }
        // The node's address sits on the namespace's loopback interface (this kernel has no
        // dummy interfaces): local to the node's processes, routed to from the pod bridge.
        ip(&["link", "set", "lo", "up"])?;
        ip(&["addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"])?;

        let cluster = Cluster::start_with(&ControlPlane {
            address: NODE_IP.into(),
            controller_manager: true,
            ..ControlPlane::default()
        })
        .await?;
        let s3 = S3Server::start_on(NODE_IP)?;
        let node = RealNode {
            cluster,
            s3,
            dir: tempfile::Builder::new().prefix("radfm-node-").tempdir()?,
            tools: tools_dir()?,
            children: Mutex::new(Vec::new()),
        };
        node.start_containerd()?;
        for image in ["pause", "radfm-trainer", "radfm-operator"] {
            node.ctr(&[
                "images",
                "import",
                "--no-unpack=false",
                &images.join(format!("{image}.tar")).to_string_lossy(),
            ])
            .with_context(|| format!("importing the {image} image"))?;
        }
        node.start_coredns()?;
        node.start_kubelet()?;
        node.start_kube_proxy()?;
        let nodes: Api<Node> = Api::all(node.cluster.client.clone());
        wait_until(Duration::from_secs(120), "the real node Ready", || async {
            let n = nodes.get_opt(NODE_NAME).await.ok()??;
            let ready = n
                .status?
                .conditions?
                .into_iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            ready.then_some(())
        })
        .await
        .with_context(|| format!("kubelet log:\n{}", node.log_tail("kubelet")))?;
        Ok(node)
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn socket(&self) -> PathBuf {
        self.path("containerd/containerd.sock")
    }

    /// Path of a node process's log.
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.path(&format!("{name}.log"))
    }

    /// The last 60 lines of a node process's log.
    pub fn log_tail(&self, name: &str) -> String {
        crate::tail_lines(&self.log_path(name), 60)
    }

    fn spawn(&self, name: &str, args: &[&str]) -> Result<()> {
        let path = format!(
            "{}:{}",
            self.tools.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let child = crate::spawn_logged(
            &self.tools.join(name),
            &self.log_path(name),
            args,
            &[("PATH", path.as_str())],
        )?;
        self.children.lock().unwrap().push((name.into(), child));
        Ok(())
    }

    /// Runs `ctr` against the node's containerd in the `k8s.io` namespace.
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(self.tools.join("ctr"))
            .arg("--address")
            .arg(self.socket())
            .args(["--namespace", "k8s.io"])
            .args(args)
            .output()
            .context("running ctr")?;
        if !out.status.success() {
            bail!(
                "ctr {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn start_containerd(&self) -> Result<()> {
        let d = self.dir.path();
        std::fs::create_dir_all(d.join("cni"))?;
        std::fs::write(
            d.join("cni/10-radfm.conflist"),
            serde_json::to_string_pretty(&serde_json::json!({
                "cniVersion": "1.0.0",
                "name": "radfm",
                "plugins": [{
                    "type": "bridge",
                    "bridge": "cni0",
                    "isGateway": true,
                    "ipMasq": false,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": d.join("cni-ipam"),
                        "ranges": [[{"subnet": POD_SUBNET}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                    },
                }],
            }))?,
        )?;
        let config = format!(
            r#"version = 3
root = "{root}"
state = "{state}"
[grpc]
  address = "{socket}"
[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "docker.io/radfm/pause:{IMAGE_TAG}"
[plugins.'io.containerd.cri.v1.runtime']
  # These machines withhold CAP_SYS_RESOURCE, so a container's oom_score_adj cannot go below
  # containerd's own (the sandbox asks for -998): clamp it, as rootless setups do.
  restrict_oom_score_adj = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = "/usr/bin/runc"
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "{cni}"
"#,
            root = d.join("containerd/root").display(),
            state = d.join("containerd/state").display(),
            socket = self.socket().display(),
            cni = d.join("cni").display(),
        );
        std::fs::write(d.join("containerd.toml"), config)?;
        self.spawn(
            "containerd",
            &["--config", &d.join("containerd.toml").to_string_lossy()],
        )?;
        let start = std::time::Instant::now();
        while self.ctr(&["version"]).is_err() {
            if start.elapsed() > Duration::from_secs(30) {
                bail!(
                    "containerd did not answer within 30 s:\n{}",
                    self.log_tail("containerd")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    fn start_coredns(&self) -> Result<()> {
        let corefile = format!(
            ".:53 {{\n    errors\n    ready 127.0.0.1:8181\n    kubernetes cluster.local {{\n        kubeconfig {}\n        pods insecure\n    }}\n    cache 5\n}}\n",
            self.cluster.kubeconfig.display()
        );
        std::fs::write(self.path("Corefile"), corefile)?;
        self.spawn(
            "coredns",
            &["-conf", &self.path("Corefile").to_string_lossy()],
        )
    }

    fn start_kubelet(&self) -> Result<()> {
        let d = self.dir.path();
        std::fs::write(d.join("resolv.conf"), "")?;
        let config = serde_json::json!({
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            // This machine kind mounts cgroup v1; kubelet 1.35+ refuses it unless told.
            "failCgroupV1": false,
            "cgroupDriver": "cgroupfs",
            "containerRuntimeEndpoint": format!("unix://{}", self.socket().display()),
            "authentication": {"anonymous": {"enabled": true}, "webhook": {"enabled": false}},
            "authorization": {"mode": "AlwaysAllow"},
            "clusterDNS": [NODE_IP],
            "clusterDomain": "cluster.local",
            "resolvConf": d.join("resolv.conf"),
            "podLogsDir": d.join("pod-logs"),
            "failSwapOn": false,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
                "nodefs.inodesFree": "1%",
            },
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": false,
            "nodeStatusUpdateFrequency": "4s",
        });
        std::fs::write(d.join("kubelet.yaml"), serde_json::to_string(&config)?)?;
        self.spawn(
            "kubelet",
            &[
                "--config",
                &d.join("kubelet.yaml").to_string_lossy(),
                "--kubeconfig",
                &self.cluster.kubeconfig.to_string_lossy(),
                "--root-dir",
                &d.join("kubelet").to_string_lossy(),
                "--cert-dir",
                &d.join("kubelet-pki").to_string_lossy(),
                "--hostname-override",
                NODE_NAME,
                "--node-ip",
                NODE_IP,
                "--v",
                "1",
            ],
        )
    }

    fn start_kube_proxy(&self) -> Result<()> {
        self.spawn(
            "kube-proxy",
            &[
                "--kubeconfig",
                &self.cluster.kubeconfig.to_string_lossy(),
                "--hostname-override",
                NODE_NAME,
                "--proxy-mode",
                "iptables",
                "--cluster-cidr",
                "10.244.0.0/16",
                "--conntrack-max-per-core",
                "0",
                "--metrics-bind-address",
                "127.0.0.1:10249",
                "--healthz-bind-address",
                "127.0.0.1:10256",
                "--v",
                "1",
            ],
        )
    }

    /// Stops a node process by name (kubelet, kube-proxy, containerd, coredns), as an outage.
    pub fn stop(&self, name: &str) {
        let mut children = self.children.lock().unwrap();
        for (n, c) in children.iter_mut() {
            if n == name {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// Starts the kubelet again after [`RealNode::stop`].
    pub fn restart_kubelet(&self) -> Result<()> {
        self.children
            .lock()
            .unwrap()
            .retain(|(n, _)| n != "kubelet");
        self.start_kubelet()
    }

    /// The folder of the node's files (logs, configs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for name in ["kubelet", "containerd", "kube-proxy", "coredns"] {
                eprintln!("--- {name} log (last lines) ---\n{}", self.log_tail(name));
            }
            // The whole logs outlive the test's folder, for a closer look.
            let keep = std::env::temp_dir().join("radfm-node-failed");
            let _ = std::fs::create_dir_all(&keep);
            for name in ["kubelet", "containerd", "kube-proxy", "coredns"] {
                let _ = std::fs::copy(self.log_path(name), keep.join(format!("{name}.log")));
            }
            let _ = Command::new("cp")
                .arg("-r")
                .arg(self.path("pod-logs"))
                .arg(&keep)
                .status();
            eprintln!("node and container logs kept in {}", keep.display());
        }
        for (_, c) in self.children.lock().unwrap().iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
