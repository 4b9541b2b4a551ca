//! Progress reporting: JSON lines on stdout, a Prometheus endpoint, and the pod annotations the
//! operator copies into the TrainingJob status.
//!
//! The annotation channel was chosen over a file beside the checkpoints because the operator
//! already watches its pods and needs no object-store credentials that way: rank 0 patches
//! `radfm.io/progress` and `radfm.io/checkpoint` on its own pod (RADFM_POD_NAME), at most every
//! few seconds and at every checkpoint. Failures to annotate are logged, never fatal.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;

/// One progress record (a JSON line on stdout).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Record {
    /// Always "step".
    pub event: &'static str,
    /// Optimizer steps completed.
    pub step: i64,
    /// Total steps.
    pub total_steps: i64,
    /// Current epoch.
    pub epoch: u64,
    /// Mean loss since the previous record.
    pub loss: f64,
    /// Learning rate of the last step.
    pub lr: f64,
    /// Gradient norm before clipping of the last step.
    pub grad_norm: f64,
    /// Images per second of this process since the previous record.
    pub images_per_s: f64,
    /// Estimated seconds to the end.
    pub eta_s: f64,
    /// Global rank.
    pub rank: usize,
}

/// Trainer metrics.
#[derive(Debug, Default, Clone)]
pub struct Metrics {
    /// Optimizer steps completed.
    pub step: Gauge,
    /// Last mean loss.
    pub loss: Gauge<f64, AtomicU64>,
    /// Learning rate.
    pub lr: Gauge<f64, AtomicU64>,
    /// Images per second of this process.
    pub images_per_second: Gauge<f64, AtomicU64>,
    /// Checkpoints committed.
    pub checkpoints: Counter,
    /// Steps skipped for a non-finite loss.
    pub nonfinite_steps: Counter,
    /// Shard fetches retried.
    pub fetch_retries: Gauge,
}

impl Metrics {
    /// A registry holding these metrics under `radfm_trainer_`.
    pub fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("radfm_trainer");
        r.register("step", "Optimizer steps completed", self.step.clone());
        r.register(
            "loss",
            "Mean training loss of the last window",
            self.loss.clone(),
        );
        r.register("learning_rate", "Learning rate", self.lr.clone());
        r.register(
            "images_per_second",
            "Training images per second of this process",
            self.images_per_second.clone(),
        );
        r.register(
            "checkpoints",
            "Checkpoints committed",
            self.checkpoints.clone(),
        );
        r.register(
            "nonfinite_steps",
            "Steps skipped because the loss was NaN or infinite",
            self.nonfinite_steps.clone(),
        );
        r.register(
            "shard_fetch_retries",
            "Shard fetches retried after a store error",
            self.fetch_retries.clone(),
        );
        r
    }

    /// Serves `/metrics` on `addr` until the runtime stops.
    pub async fn serve(&self, addr: std::net::SocketAddr) -> std::io::Result<std::net::SocketAddr> {
        let registry = Arc::new(self.registry());
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let registry = registry.clone();
                async move {
                    let mut body = String::new();
                    encode(&mut body, &registry).expect("metrics encode");
                    (
                        [(
                            "content-type",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        body,
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let bound = listener.local_addr()?;
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(bound)
    }
}

/// Rank 0's writer of its own pod's annotations.
pub struct PodAnnotator {
    pods: kube::Api<k8s_openapi::api::core::v1::Pod>,
    pod: String,
    last: Option<Instant>,
    every: Duration,
}

impl PodAnnotator {
    /// Connects with the in-cluster (or kubeconfig) credentials.
    pub async fn connect(namespace: &str, pod: &str) -> Result<PodAnnotator, kube::Error> {
        let client = kube::Client::try_default().await?;
        Ok(PodAnnotator {
            pods: kube::Api::namespaced(client, namespace),
            pod: pod.to_string(),
            last: None,
            every: Duration::from_secs(5),
        })
    }

    /// Annotates progress, at most every few seconds unless `force`.
    pub async fn progress(&mut self, r: &Record, force: bool) -> Result<(), kube::Error> {
        if !force && self.last.is_some_and(|t| t.elapsed() < self.every) {
            return Ok(());
        }
        self.last = Some(Instant::now());
        let value = serde_json::json!({
            "step": r.step,
            "totalSteps": r.total_steps,
            "loss": r.loss,
            "imagesPerSecond": r.images_per_s,
            "updatedAt": jiff::Timestamp::now().to_string(),
        });
        self.patch(radfm_api::ANNOTATION_PROGRESS, value).await
    }

    /// Annotates the last committed checkpoint.
    pub async fn checkpoint(&mut self, uri: &str, step: i64) -> Result<(), kube::Error> {
        let value = serde_json::json!({"uri": uri, "step": step});
        self.patch(radfm_api::ANNOTATION_CHECKPOINT, value).await
    }

    async fn patch(&self, key: &str, value: serde_json::Value) -> Result<(), kube::Error> {
        let patch = serde_json::json!({"metadata": {"annotations": {key: value.to_string()}}});
        self.pods
            .patch(
                &self.pod,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&patch),
            )
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_serialise_as_one_json_line() {
        let r = Record {
            event: "step",
            step: 3,
            total_steps: 10,
            epoch: 0,
            loss: 0.5,
            lr: 1e-3,
            grad_norm: 2.0,
            images_per_s: 100.0,
            eta_s: 7.0,
            rank: 0,
        };
        let line = serde_json::to_string(&r).unwrap();
        assert!(!line.contains('\n'));
        assert!(
            line.starts_with(r#"{"event":"step","step":3,"total_steps":10"#),
            "{line}"
        );
    }

    #[tokio::test]
    async fn the_endpoint_serves_the_trainer_metrics() {
        let m = Metrics::default();
        m.step.set(42);
        m.loss.set(0.25);
        let addr = m.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).await.unwrap();
        assert!(body.contains("radfm_trainer_step 42"), "{body}");
        assert!(body.contains("radfm_trainer_loss 0.25"), "{body}");
    }
}
