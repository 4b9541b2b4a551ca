//! Kubeflow Trainer v2 (TrainJob) on JobSet in the test control plane, the third column of
//! `make bench-operator`: both controller managers built from their pinned Go modules
//! (tests/cluster/build-trainer-v2.sh) and installed from their own kustomize trees (Trainer's
//! manager overlay, JobSet's default config) as their release manifests install them, except
//! that each runs as a process on this host instead of a Deployment: its webhook Service loses
//! its pod selector and gets an EndpointSlice with this host's address instead, and what the
//! kubelet would mount (the webhook Secret) is copied into the directory it reads. Each runs as
//! its own ServiceAccount with its release RBAC, with its cert-controller making and injecting
//! its webhook certificates. The pods themselves are created by kube-controller-manager's Job
//! controller, so the control plane needs [`crate::ControlPlane::controller_manager`] as well as
//! [`crate::ControlPlane::endpoint_routing`].

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use anyhow::{Context as _, Result};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::kubeflow::host_endpoints;
use crate::{Cluster, built_path, free_port, wait_until};

/// Namespace Trainer's controller manager runs in (its overlay's, and its fallback when it
/// finds no ServiceAccount namespace file, as outside a pod).
pub const TRAINER_NAMESPACE: &str = "kubeflow-system";
/// Namespace JobSet's controller manager runs in (the same on both counts).
pub const JOBSET_NAMESPACE: &str = "jobset-system";
/// Trainer's webhook Service and ServiceAccount (its overlay's names).
const TRAINER_SERVICE: &str = "kubeflow-trainer-controller-manager";
/// JobSet's webhook Service and ServiceAccount.
const JOBSET_SERVICE: &str = "jobset-webhook-service";
const JOBSET_ACCOUNT: &str = "jobset-controller-manager";
/// Where Trainer's webhook and status servers read their certificate (fixed in its
/// pkg/util/cert; JobSet's cert-controller also waits for a file there before it starts).
const TRAINER_CERT_DIR: &str = "/tmp/k8s-webhook-server/serving-certs";
/// Where JobSet's webhook server reads its certificate (its `webhook.certDir` setting), apart
/// from Trainer's.
const JOBSET_CERT_DIR: &str = "/tmp/radfm-bench-jobset/serving-certs";
/// The runtime every benchmark TrainJob refers to (Trainer's own torch-distributed runtime).
pub const RUNTIME: &str = "torch-distributed";

/// Folder of both binaries and their kustomize trees: `$RADFM_TRAINER_V2`, else built now.
pub fn trainer_v2_dir() -> Result<PathBuf> {
    built_path("RADFM_TRAINER_V2", "build-trainer-v2.sh", "bench-operator")
}

/// Trainer's and JobSet's client and worker settings.
#[derive(Debug, Clone, Copy)]
pub struct TrainerV2Settings {
    /// Client QPS of both controller managers (Trainer's release config: 50; JobSet's: 500).
    pub qps: u32,
    /// Client burst of both (Trainer's: 100; JobSet's: 500).
    pub burst: u32,
    /// TrainJobs reconciled at once (Trainer's release config: 5). JobSet's controller has no
    /// such setting: it reconciles one JobSet at a time.
    pub trainjob_workers: u32,
}

/// Both controller managers, running; they are killed when this is dropped.
pub struct TrainerV2 {
    trainer: Child,
    jobset: Child,
    /// Address of Trainer's `/metrics` (plain HTTP).
    pub metrics: String,
}

impl TrainerV2 {
    /// Process ids: Trainer's, then JobSet's.
    pub fn pids(&self) -> [u32; 2] {
        [self.trainer.id(), self.jobset.id()]
    }
}

impl Drop for TrainerV2 {
    fn drop(&mut self) {
        for child in [&mut self.trainer, &mut self.jobset] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The objects of one rendered kustomize tree to apply when the controller runs as a process:
/// everything but its Deployments, with the webhook Service `service` pointed at `port` on this
/// host rather than at pods.
pub fn release_objects(rendered: &str, service: &str, port: u16) -> Result<Vec<Value>> {
    let mut objects = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(rendered) {
        let mut object = Value::deserialize(doc).context("a rendered manifest")?;
        if object.is_null() || object["kind"] == "Deployment" {
            continue;
        }
        if object["kind"] == "Service" && object["metadata"]["name"] == service {
            object["spec"] =
                json!({"ports": [{"name": "webhook", "port": 443, "targetPort": port}]});
        }
        objects.push(object);
    }
    Ok(objects)
}

/// Trainer's configuration file (its `Configuration` kind) for a process on this host.
fn trainer_config(settings: TrainerV2Settings, ports: [u16; 4]) -> Value {
    let [webhook, metrics, health, status] = ports;
    json!({
        "apiVersion": "config.trainer.kubeflow.org/v1alpha1", "kind": "Configuration",
        "health": {"healthProbeBindAddress": format!("127.0.0.1:{health}")},
        "metrics": {"bindAddress": format!("127.0.0.1:{metrics}"), "secureServing": false},
        "webhook": {"port": webhook},
        "leaderElection": {"leaderElect": false},
        "controller": {"groupKindConcurrency": {
            "TrainJob.trainer.kubeflow.org": settings.trainjob_workers,
            "TrainingRuntime.trainer.kubeflow.org": 1,
            "ClusterTrainingRuntime.trainer.kubeflow.org": 1,
        }},
        "certManagement": {"enable": true, "webhookServiceName": TRAINER_SERVICE,
                           "webhookSecretName": "kubeflow-trainer-webhook-cert"},
        "clientConnection": {"qps": settings.qps, "burst": settings.burst},
        "statusServer": {"port": status, "qps": 5, "burst": 10},
    })
}

/// JobSet's configuration file for a process on this host.
fn jobset_config(settings: TrainerV2Settings, ports: [u16; 3]) -> Value {
    let [webhook, metrics, health] = ports;
    json!({
        "apiVersion": "config.jobset.x-k8s.io/v1alpha1", "kind": "Configuration",
        "webhook": {"port": webhook, "certDir": JOBSET_CERT_DIR},
        "metrics": {"bindAddress": format!("127.0.0.1:{metrics}")},
        "health": {"healthProbeBindAddress": format!("127.0.0.1:{health}")},
        "leaderElection": {"leaderElect": false},
        "internalCertManagement": {"enable": true},
        "clientConnection": {"qps": settings.qps, "burst": settings.burst},
    })
}

/// TrainJob `name`: `nodes` nodes of one GPU each on [`RUNTIME`].
pub fn train_job(name: &str, nodes: usize, image: &str) -> Value {
    json!({"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
        "metadata": {"name": name},
        "spec": {"runtimeRef": {"name": RUNTIME},
                 "trainer": {"image": image, "numNodes": nodes,
                             "resourcesPerNode": {"limits": {"nvidia.com/gpu": 1}}}}})
}

impl Cluster {
    /// Installs Trainer and JobSet (CRDs, RBAC, webhook Services and configurations), starts
    /// both with `settings`, installs the torch-distributed runtime, and waits until their
    /// webhooks admit a TrainJob and a JobSet.
    pub async fn start_trainer_v2(&self, settings: TrainerV2Settings) -> Result<TrainerV2> {
        let dir = trainer_v2_dir()?;
        let trainer_ports = [free_port(), free_port(), free_port(), free_port()];
        let jobset_ports = [free_port(), free_port(), free_port()];
        self.install_release(
            &dir.join("trainer/overlays/manager"),
            TRAINER_NAMESPACE,
            TRAINER_SERVICE,
            trainer_ports[0],
        )?;
        self.install_release(
            &dir.join("jobset-config/default"),
            JOBSET_NAMESPACE,
            JOBSET_SERVICE,
            jobset_ports[0],
        )?;
        self.wait_established(&[
            "trainjobs.trainer.kubeflow.org",
            "clustertrainingruntimes.trainer.kubeflow.org",
            "jobsets.jobset.x-k8s.io",
        ])
        .await?;
        // Certificates of an earlier start are not this one's.
        for d in [TRAINER_CERT_DIR, JOBSET_CERT_DIR] {
            let _ = std::fs::remove_dir_all(d);
        }
        let trainer = self.spawn_controller(
            &dir.join("trainer-controller-manager"),
            "trainer-controller-manager",
            TRAINER_NAMESPACE,
            TRAINER_SERVICE,
            &trainer_config(settings, trainer_ports),
        )?;
        let jobset = self.spawn_controller(
            &dir.join("jobset"),
            "jobset",
            JOBSET_NAMESPACE,
            JOBSET_ACCOUNT,
            &jobset_config(settings, jobset_ports),
        )?;
        let running = TrainerV2 {
            trainer,
            jobset,
            metrics: format!("127.0.0.1:{}", trainer_ports[1]),
        };
        self.wait_for_trainer_v2_webhooks(&dir.join("torch_distributed.yaml"))
            .await?;
        Ok(running)
    }

    /// Renders the kustomize tree at `tree` and applies it (less its Deployments) with the
    /// webhook Service routed to `port` on this host.
    fn install_release(
        &self,
        tree: &Path,
        namespace: &str,
        service: &str,
        port: u16,
    ) -> Result<()> {
        let rendered = self.kubectl_ok(&["kustomize", &tree.to_string_lossy()])?;
        let mut items = release_objects(&rendered, service, port)?;
        items.push(host_endpoints(namespace, service, port)?);
        let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
        let out = self.kubectl_stdin(
            &["apply", "--server-side", "--force-conflicts", "-f", "-"],
            Some(&list.to_string()),
        );
        if !out.status.success() {
            anyhow::bail!(
                "applying {}: {}",
                tree.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Starts a controller manager as ServiceAccount `namespace/account` with `config` as its
    /// `--config` file.
    fn spawn_controller(
        &self,
        bin: &Path,
        name: &str,
        namespace: &str,
        account: &str,
        config: &Value,
    ) -> Result<Child> {
        let kubeconfig = self.service_account_kubeconfig(namespace, account)?;
        let config_path = self.log_path(name).with_extension("config.yaml");
        std::fs::write(&config_path, config.to_string())?;
        self.spawn_logged(
            bin,
            name,
            &[
                &format!("--config={}", config_path.display()),
                "--zap-log-level=info",
            ],
            &[("KUBECONFIG", kubeconfig.to_string_lossy().as_ref())],
        )
    }

    /// Mounts each webhook Secret once its cert-controller has filled it, and waits until the
    /// webhooks admit the runtime at `runtime` (applied through Trainer's validating webhook,
    /// as an administrator installs it after Trainer), then a JobSet and a TrainJob on that
    /// runtime (dry runs).
    async fn wait_for_trainer_v2_webhooks(&self, runtime: &Path) -> Result<()> {
        let runtime = std::fs::read_to_string(runtime)?;
        let mut probe = train_job("webhook-probe", 2, "radfm/trainer:test");
        probe["metadata"]["namespace"] = json!(TRAINER_NAMESPACE);
        let jobset = json!({"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
            "metadata": {"name": "webhook-probe", "namespace": JOBSET_NAMESPACE},
            "spec": {"replicatedJobs": [{"name": "node", "template": {"spec": {"template": {"spec": {
                "containers": [{"name": "node", "image": "radfm/trainer:test"}]}}}}}]}});
        let last = std::sync::Mutex::new(String::new());
        wait_until(
            Duration::from_secs(180),
            "Trainer's and JobSet's webhooks answer",
            || async {
                let mounted = async {
                    self.mount_webhook_secret(
                        TRAINER_NAMESPACE,
                        "kubeflow-trainer-webhook-cert",
                        TRAINER_CERT_DIR,
                    )
                    .await?;
                    self.mount_webhook_secret(
                        JOBSET_NAMESPACE,
                        "jobset-webhook-server-cert",
                        JOBSET_CERT_DIR,
                    )
                    .await
                };
                if let Err(e) = mounted.await {
                    *last.lock().unwrap() = e.to_string();
                    return None;
                }
                let steps: [(&[&str], String); 3] = [
                    (&["apply", "--server-side", "-f", "-"], runtime.clone()),
                    (&["create", "--dry-run=server", "-f", "-"], jobset.to_string()),
                    (&["create", "--dry-run=server", "-f", "-"], probe.to_string()),
                ];
                for (args, object) in steps {
                    let out = self.kubectl_stdin(args, Some(&object));
                    if !out.status.success() {
                        *last.lock().unwrap() = String::from_utf8_lossy(&out.stderr).to_string();
                        return None;
                    }
                }
                Some(())
            },
        )
        .await
        .with_context(|| {
            format!(
                "Trainer v2 did not come up; the last step said: {}; Trainer's log:\n{}\nJobSet's log:\n{}",
                last.lock().unwrap(),
                self.log_tail("trainer-controller-manager"),
                self.log_tail("jobset"),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_release_run_as_a_process_keeps_everything_but_its_deployment_and_routes_its_webhook_here()
    {
        let rendered = "\
apiVersion: v1
kind: ServiceAccount
metadata: {name: manager, namespace: sys}
---
apiVersion: v1
kind: Service
metadata: {name: webhook, namespace: sys}
spec:
  selector: {control-plane: controller-manager}
  ports: [{port: 443, targetPort: 9443}]
---
apiVersion: v1
kind: Service
metadata: {name: metrics, namespace: sys}
spec:
  selector: {control-plane: controller-manager}
  ports: [{port: 8443}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: manager, namespace: sys}
";
        let objects = release_objects(rendered, "webhook", 31000).unwrap();
        let kinds: Vec<(&str, &str)> = objects
            .iter()
            .map(|o| {
                (
                    o["kind"].as_str().unwrap(),
                    o["metadata"]["name"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            kinds,
            [
                ("ServiceAccount", "manager"),
                ("Service", "webhook"),
                ("Service", "metrics")
            ]
        );
        assert_eq!(
            objects[1]["spec"],
            json!({"ports": [{"name": "webhook", "port": 443, "targetPort": 31000}]}),
            "the webhook Service has no selector and points at the process's port"
        );
        assert!(
            objects[2]["spec"]["selector"].is_object(),
            "other Services are as released"
        );
    }

    #[test]
    fn a_rendered_tree_that_is_not_yaml_is_an_error_not_a_panic() {
        assert!(release_objects("kind: [unclosed", "webhook", 1).is_err());
    }
}
