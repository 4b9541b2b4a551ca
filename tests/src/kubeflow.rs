//! Kubeflow's training-operator v1 in the test control plane, for `make bench-operator`: built
//! from its pinned Go module (tests/cluster/build-kubeflow.sh), installed as its release
//! manifests install it. Its PyTorchJob CRD; its ClusterRole bound to its own ServiceAccount
//! (so the audit log tells its requests apart); its validating webhook, served by the operator
//! itself with the certificates its cert-controller makes for `training-operator.kubeflow.svc`
//! and injects into the webhook configuration. The API server reaches that Service at the
//! address in its EndpointSlice (the host's own address, where the operator listens), as it does
//! a webhook Service in a real cluster; the control plane needs
//! [`crate::ControlPlane::endpoint_routing`].

use std::path::PathBuf;
use std::process::Child;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{Cluster, built_path, free_port, wait_until};

/// Namespace the training-operator runs in (its manifests' default).
pub const NAMESPACE: &str = "kubeflow";

/// Folder of the training-operator binary, its PyTorchJob CRD, webhook configuration and
/// ClusterRole: `$RADFM_KUBEFLOW`, else built now.
pub fn kubeflow_dir() -> Result<PathBuf> {
    built_path("RADFM_KUBEFLOW", "build-kubeflow.sh", "kubeflow")
}

/// The training-operator's client and worker settings.
#[derive(Debug, Clone, Copy)]
pub struct TrainingOperatorSettings {
    /// `--kube-api-qps` (its default: 20).
    pub qps: u32,
    /// `--kube-api-burst` (its default: 30).
    pub burst: u32,
    /// `--controller-threads`, jobs reconciled at once (its default: 1).
    pub threads: u32,
}

impl Default for TrainingOperatorSettings {
    fn default() -> Self {
        TrainingOperatorSettings {
            qps: 20,
            burst: 30,
            threads: 1,
        }
    }
}

/// The first IPv4 address of this host that is not loopback: EndpointSlices refuse loopback
/// addresses.
fn host_address() -> Result<String> {
    let out = std::process::Command::new("hostname").arg("-I").output()?;
    String::from_utf8(out.stdout)?
        .split_whitespace()
        .find(|a| {
            a.parse::<std::net::Ipv4Addr>()
                .is_ok_and(|ip| !ip.is_loopback())
        })
        .map(str::to_string)
        .context("this host has no IPv4 address besides loopback for the webhook's EndpointSlice")
}

/// The PyTorchJob webhook of the release's configuration, named and pointed at Service
/// `training-operator` in [`NAMESPACE`] as its release overlay does.
fn webhook_configuration(manifests: &str) -> Result<Value> {
    for doc in serde_yaml_ng::Deserializer::from_str(manifests) {
        let mut config = Value::deserialize(doc).context("the training-operator's webhooks")?;
        let Some(hooks) = config["webhooks"].as_array().cloned() else {
            continue;
        };
        let hooks: Vec<Value> = hooks
            .into_iter()
            .filter(|w| w["name"].as_str().is_some_and(|n| n.contains("pytorchjob")))
            .map(|mut w| {
                w["clientConfig"]["service"]["name"] = json!("training-operator");
                w["clientConfig"]["service"]["namespace"] = json!(NAMESPACE);
                w
            })
            .collect();
        config["webhooks"] = Value::Array(hooks);
        // The name its cert-controller injects the CA into (cmd/training-operator.v1).
        config["metadata"]["name"] = json!("validator.training-operator.kubeflow.org");
        return Ok(config);
    }
    bail!("no ValidatingWebhookConfiguration in the training-operator's webhook manifests")
}

/// Where the training-operator's webhook server reads its certificate (fixed in its
/// pkg/cert), which its Deployment mounts from the Secret.
const CERT_DIR: &str = "/tmp/k8s-webhook-server/serving-certs";

/// An EndpointSlice that routes Service `service` in `namespace` to `port` on this host, where
/// a controller run as a process serves its webhooks.
pub(crate) fn host_endpoints(namespace: &str, service: &str, port: u16) -> Result<Value> {
    Ok(
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-host"), "namespace": namespace,
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "webhook", "port": port, "protocol": "TCP"}],
        "endpoints": [{"addresses": [host_address()?], "conditions": {"ready": true}}]}),
    )
}

impl Cluster {
    /// Does what the kubelet does for a controller's Pod: once its cert-controller has filled
    /// Secret `namespace/secret`, the Secret's files appear in `dir`.
    pub(crate) async fn mount_webhook_secret(
        &self,
        namespace: &str,
        secret: &str,
        dir: &str,
    ) -> Result<()> {
        let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
            kube::Api::namespaced(self.client.clone(), namespace);
        let data = secrets.get(secret).await?.data.unwrap_or_default();
        let dir = std::path::Path::new(dir);
        std::fs::create_dir_all(dir)?;
        for file in ["ca.crt", "tls.crt", "tls.key"] {
            let Some(bytes) = data.get(file) else {
                bail!("the cert-controller has not filled Secret {namespace}/{secret} yet");
            };
            let (path, tmp) = (dir.join(file), dir.join(format!(".{file}.tmp")));
            if std::fs::read(&path).is_ok_and(|old| old == bytes.0) {
                continue;
            }
            std::fs::write(&tmp, &bytes.0)?;
            std::fs::rename(&tmp, &path)?;
        }
        Ok(())
    }

    /// Installs the training-operator's CRD, RBAC, webhook Service and configuration, starts it
    /// with `settings` (PyTorchJob only), and waits until its webhook admits a PyTorchJob.
    /// Returns the process and the address of its `/metrics`. A second start finds everything
    /// installed and reuses it.
    pub async fn start_training_operator(
        &self,
        settings: TrainingOperatorSettings,
    ) -> Result<(Child, String)> {
        let dir = kubeflow_dir()?;
        let port = match self.webhook_port()? {
            Some(port) => port,
            None => self.install_training_operator(&dir).await?,
        };
        let kubeconfig = self.service_account_kubeconfig(NAMESPACE, "training-operator")?;
        let kubeconfig = kubeconfig.to_string_lossy().to_string();
        let metrics = format!("127.0.0.1:{}", free_port());
        let args = [
            "--enable-scheme=pytorchjob".to_string(),
            format!("--webhook-server-port={port}"),
            format!("--metrics-bind-address={metrics}"),
            format!("--health-probe-bind-address=127.0.0.1:{}", free_port()),
            format!("--kube-api-qps={}", settings.qps),
            format!("--kube-api-burst={}", settings.burst),
            format!("--controller-threads={}", settings.threads),
            "--zap-log-level=info".to_string(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        // Certificates of an earlier start are not this one's.
        let _ = std::fs::remove_dir_all(CERT_DIR);
        let child = self.spawn_logged(
            &dir.join("training-operator"),
            "training-operator",
            &args,
            &[
                ("KUBECONFIG", kubeconfig.as_str()),
                ("MY_POD_NAMESPACE", NAMESPACE),
            ],
        )?;
        self.wait_for_webhook().await?;
        Ok((child, metrics))
    }

    /// The port of the webhook's EndpointSlice, where an earlier start installed it.
    fn webhook_port(&self) -> Result<Option<u16>> {
        let out = self.kubectl(&[
            "get",
            "endpointslice",
            "-n",
            NAMESPACE,
            "training-operator-host",
            "-o",
            "jsonpath={.ports[0].port}",
        ]);
        if !out.status.success() {
            return Ok(None);
        }
        Ok(Some(String::from_utf8(out.stdout)?.trim().parse()?))
    }

    /// Installs the CRD, RBAC, webhook Service, EndpointSlice and configuration; returns the
    /// webhook's port.
    async fn install_training_operator(&self, dir: &std::path::Path) -> Result<u16> {
        self.kubectl_ok(&[
            "apply",
            "--server-side",
            "-f",
            &dir.join("crds").to_string_lossy(),
        ])?;
        self.wait_established(&["pytorchjobs.kubeflow.org"]).await?;
        self.kubectl_ok(&["create", "namespace", NAMESPACE])?;
        self.kubectl_ok(&["apply", "-f", &dir.join("role.yaml").to_string_lossy()])?;
        let port = free_port();
        let objects = json!({"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "ServiceAccount",
             "metadata": {"name": "training-operator", "namespace": NAMESPACE}},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
             "metadata": {"name": "training-operator"},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "training-operator"},
             "subjects": [{"kind": "ServiceAccount", "name": "training-operator", "namespace": NAMESPACE}]},
            // Its cert-controller fills this Secret with a CA and a serving certificate.
            {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
             "metadata": {"name": "training-operator-webhook-cert", "namespace": NAMESPACE}},
            {"apiVersion": "v1", "kind": "Service",
             "metadata": {"name": "training-operator", "namespace": NAMESPACE},
             "spec": {"ports": [{"name": "webhook", "port": 443, "targetPort": port}]}},
            host_endpoints(NAMESPACE, "training-operator", port)?,
        ]});
        self.kubectl_stdin(&["apply", "-f", "-"], Some(&objects.to_string()))
            .status
            .success()
            .then_some(())
            .context("installing the training-operator's objects")?;
        let manifests = std::fs::read_to_string(dir.join("webhooks.yaml"))?;
        let webhooks = webhook_configuration(&manifests)?;
        self.kubectl_stdin(&["apply", "-f", "-"], Some(&webhooks.to_string()))
            .status
            .success()
            .then_some(())
            .context("installing the training-operator's webhook configuration")?;
        Ok(port)
    }

    /// Waits until the training-operator's webhook admits a PyTorchJob (dry run).
    async fn wait_for_webhook(&self) -> Result<()> {
        let probe = json!({"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
            "metadata": {"name": "webhook-probe", "namespace": NAMESPACE},
            "spec": {"pytorchReplicaSpecs": {"Master": {"replicas": 1, "template": {"spec": {
                "containers": [{"name": "pytorch", "image": "radfm/trainer:test"}]}}}}}});
        let last = std::sync::Mutex::new(String::new());
        wait_until(
            Duration::from_secs(120),
            "the training-operator's webhook answers",
            || async {
                let mounted = self
                    .mount_webhook_secret(NAMESPACE, "training-operator-webhook-cert", CERT_DIR)
                    .await;
                if let Err(e) = mounted {
                    *last.lock().unwrap() = e.to_string();
                    return None;
                }
                let out = self.kubectl_stdin(
                    &["create", "--dry-run=server", "-f", "-"],
                    Some(&probe.to_string()),
                );
                *last.lock().unwrap() = String::from_utf8_lossy(&out.stderr).to_string();
                out.status.success().then_some(())
            },
        )
        .await
        .with_context(|| {
            format!(
                "the training-operator did not come up; the last dry run said: {}; its log:\n{}",
                last.lock().unwrap(),
                self.log_tail("training-operator")
            )
        })
    }
}
