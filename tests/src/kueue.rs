//! Kueue in the test control plane, installed the way its release manifests install it: its
//! CRDs, its admission webhooks for its own kinds (served by the controller over TLS with a
//! certificate signed by a CA the API server trusts), and a Configuration that names radfm's
//! TrainingJob as an external framework. The controller-manager is Kueue's own, built from its
//! pinned Go module (tests/cluster/build-kueue.sh).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{Cluster, built_path, free_port, wait_until};

/// Folder of Kueue's controller-manager, CRDs and webhook configurations:
/// `$RADFM_KUEUE`, else built now.
pub fn kueue_dir() -> Result<PathBuf> {
    built_path("RADFM_KUEUE", "build-kueue.sh", "kueue")
}

/// A CA and a serving certificate for 127.0.0.1 in `dir` (ca.crt, tls.crt, tls.key).
fn webhook_certificates(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let script = "set -e
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=kueue-test-ca \
  -keyout ca.key -out ca.crt 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj /CN=kueue-webhook-service \
  -keyout tls.key -out tls.csr 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\\n' > san.ext
openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
  -extfile san.ext -out tls.crt 2>/dev/null";
    let ok = Command::new("bash")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .status()?
        .success();
    if !ok {
        bail!(
            "openssl could not make Kueue's webhook certificates in {}",
            dir.display()
        );
    }
    Ok(())
}

/// A file's bytes in base64, as Kubernetes writes bytes in JSON (a `caBundle`, kubeconfig
/// `*-data`).
fn base64_of(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let text = serde_json::to_value(k8s_openapi::ByteString(bytes))?;
    Ok(text.as_str().unwrap_or_default().to_string())
}

/// Where Kueue's controller reads its metrics server's certificate when it does not manage
/// certificates itself: a fixed path in its cmd/kueue (its release manifests mount a Secret
/// there).
const METRICS_CERTS: &str = "/etc/kueue/metrics/certs";

/// Puts a certificate at [`METRICS_CERTS`] unless one is there (any will do: the tests turn the
/// metrics server off, but Kueue loads the certificate before it reads that). Written to a
/// temporary name and renamed, so concurrent test binaries never see half a file.
fn metrics_certificate(certs: &Path) -> Result<()> {
    let dir = Path::new(METRICS_CERTS);
    if dir.join("tls.crt").exists() && dir.join("tls.key").exists() {
        return Ok(());
    }
    let hint = || {
        format!(
            "Kueue's controller reads a certificate from {METRICS_CERTS} (fixed in its \
             cmd/kueue); run the tests as root, or create that folder writable"
        )
    };
    std::fs::create_dir_all(dir).with_context(hint)?;
    for file in ["tls.key", "tls.crt"] {
        let tmp = dir.join(format!("{file}.{}", std::process::id()));
        std::fs::copy(certs.join(file), &tmp).with_context(hint)?;
        std::fs::rename(&tmp, dir.join(file)).with_context(hint)?;
    }
    Ok(())
}

/// Kueue's webhook configurations for its own kinds (Workload, ClusterQueue, ResourceFlavor,
/// ...), pointed at the controller on 127.0.0.1:`port` instead of its in-cluster Service.
/// Webhooks of job frameworks this test does not enable are left out: their paths are not
/// served, and a webhook that answers 404 would refuse every pod.
fn webhook_configurations(manifests: &str, port: u16, ca_bundle: &str) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(manifests) {
        let mut config = Value::deserialize(doc).context("Kueue's webhook manifests")?;
        if config.is_null() {
            continue;
        }
        let webhooks = config["webhooks"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|mut w| {
                let path = w["clientConfig"]["service"]["path"].as_str()?.to_string();
                if !path.contains("-kueue-x-k8s-io-") {
                    return None;
                }
                w["clientConfig"] = json!({
                    "url": format!("https://127.0.0.1:{port}{path}"),
                    "caBundle": ca_bundle,
                });
                Some(w)
            })
            .collect::<Vec<_>>();
        config["webhooks"] = Value::Array(webhooks);
        let name = config["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        config["metadata"] = json!({"name": format!("kueue-{name}")});
        out.push(config);
    }
    Ok(out)
}

/// Kueue's Configuration: TrainingJob as an external framework, `waitForPodsReady` on (so the
/// PodsReady radfm reports is what admission waits on), its webhooks on 127.0.0.1:`port`.
fn configuration(port: u16, cert_dir: &Path) -> String {
    format!(
        "apiVersion: config.kueue.x-k8s.io/v1beta2
kind: Configuration
namespace: kueue-system
health:
  healthProbeBindAddress: \"0\"
metrics:
  bindAddress: \"0\"
webhook:
  host: 127.0.0.1
  port: {port}
  certDir: {cert_dir}
leaderElection:
  leaderElect: false
internalCertManagement:
  enable: false
manageJobsWithoutQueueName: false
waitForPodsReady:
  timeout: 10m
  blockAdmission: false
integrations:
  frameworks: [\"batch/job\"]
  externalFrameworks: [\"TrainingJob.v1alpha1.radfm.io\"]
featureGates:
  VisibilityOnDemand: false
",
        cert_dir = cert_dir.display()
    )
}

impl Cluster {
    /// Installs Kueue's CRDs and webhooks, starts its controller-manager, and waits until its
    /// webhooks answer (a ResourceFlavor can be created). Start the operator after this: it
    /// looks for Kueue's API when it starts.
    pub async fn start_kueue(&self) -> Result<()> {
        self.start_kueue_with("").await
    }

    /// [`Cluster::start_kueue`] with more top-level Configuration fields (YAML), e.g.
    /// `multiKueue`.
    pub async fn start_kueue_with(&self, extra_config: &str) -> Result<()> {
        let kueue = kueue_dir()?;
        let crds = kueue.join("crds");
        self.kubectl_ok(&["apply", "--server-side", "-f", &crds.to_string_lossy()])?;
        self.wait_established(&[
            "workloads.kueue.x-k8s.io",
            "clusterqueues.kueue.x-k8s.io",
            "localqueues.kueue.x-k8s.io",
            "resourceflavors.kueue.x-k8s.io",
        ])
        .await?;
        self.kubectl_ok(&["create", "namespace", "kueue-system"])?;
        let certs = self.log_path("kueue").with_extension("certs");
        webhook_certificates(&certs)?;
        metrics_certificate(&certs)?;
        let ca_bundle = base64_of(&certs.join("ca.crt"))?;
        let port = free_port();
        let manifests = std::fs::read_to_string(kueue.join("webhooks.yaml"))?;
        for config in webhook_configurations(&manifests, port, &ca_bundle)? {
            self.kubectl_stdin(&["apply", "-f", "-"], Some(&config.to_string()))
                .status
                .success()
                .then_some(())
                .context("applying Kueue's webhook configuration")?;
        }
        let config = self.log_path("kueue-config.yaml");
        std::fs::write(&config, configuration(port, &certs) + extra_config)?;
        let kubeconfig = self.kubeconfig.to_string_lossy().to_string();
        let child = self.spawn_logged(
            &kueue.join("kueue"),
            "kueue",
            &[
                "--config",
                &config.to_string_lossy(),
                "--zap-log-level",
                "2",
            ],
            &[("KUBECONFIG", kubeconfig.as_str())],
        )?;
        self.adopt("kueue", child);
        wait_until(Duration::from_secs(90), "Kueue's webhooks answer", || async {
            let flavor = "apiVersion: kueue.x-k8s.io/v1beta2\nkind: ResourceFlavor\nmetadata: {name: kueue-ready-probe}\n";
            let out = self.kubectl_stdin(&["apply", "-f", "-"], Some(flavor));
            out.status.success().then_some(())
        })
        .await
        .with_context(|| format!("Kueue did not come up; its log:\n{}", self.log_tail("kueue")))?;
        self.kubectl_ok(&["delete", "resourceflavor", "kueue-ready-probe"])?;
        Ok(())
    }
}

impl Cluster {
    /// The admin kubeconfig with the API server's CA embedded, as MultiKueue accepts a worker
    /// cluster's (no file paths).
    pub fn embedded_kubeconfig(&self) -> Result<String> {
        let ca = base64_of(&self.dir.path().join("certs/apiserver.crt"))?;
        let tokens = std::fs::read_to_string(self.dir.path().join("tokens.csv"))?;
        let token = tokens.split(',').next().unwrap_or_default();
        Ok(format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    \
             certificate-authority-data: {ca}\nusers:\n- name: u\n  user:\n    token: {token}\n\
             contexts:\n- name: c\n  context: {{cluster: c, user: u}}\ncurrent-context: c\n",
            self.server
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_kueues_own_webhooks_are_kept_and_pointed_at_the_local_controller() {
        let manifests = "---
apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata: {name: mutating-webhook-configuration}
webhooks:
- name: mjob.kb.io
  clientConfig: {service: {name: webhook-service, namespace: system, path: /mutate-batch-v1-job}}
- name: mworkload.kb.io
  clientConfig: {service: {name: webhook-service, namespace: system, path: /mutate-kueue-x-k8s-io-v1beta2-workload}}
";
        let out = webhook_configurations(manifests, 9443, "Q0E=").unwrap();
        assert_eq!(out.len(), 1);
        let hooks = out[0]["webhooks"].as_array().unwrap();
        assert_eq!(hooks.len(), 1);
        assert_eq!(
            hooks[0]["clientConfig"]["url"],
            "https://127.0.0.1:9443/mutate-kueue-x-k8s-io-v1beta2-workload"
        );
        assert_eq!(
            out[0]["metadata"]["name"],
            "kueue-mutating-webhook-configuration"
        );
    }
}
