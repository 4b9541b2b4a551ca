//! Prometheus metrics and the `/metrics`, `/healthz`, `/readyz` endpoints.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use radfm_api::TrainingJobStatus;

use crate::Error;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: String,
}

/// The operator's metrics.
pub struct Metrics {
    registry: Registry,
    reconcile_duration: Histogram,
    errors: Family<ErrorLabels, Counter>,
    jobs: Family<PhaseLabels, Gauge>,
    restarts: Counter,
    leader: Gauge,
    ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("radfm_operator");
        let reconcile_duration = Histogram::new(exponential_buckets(0.005, 2.0, 12));
        let errors = Family::<ErrorLabels, Counter>::default();
        let jobs = Family::<PhaseLabels, Gauge>::default();
        let restarts = Counter::default();
        let leader = Gauge::default();
        registry.register(
            "reconcile_duration_seconds",
            "Time of one reconcile pass",
            reconcile_duration.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Failed reconcile passes by error kind",
            errors.clone(),
        );
        registry.register(
            "jobs",
            "TrainingJobs by phase, as last reconciled",
            jobs.clone(),
        );
        registry.register(
            "gang_restarts",
            "Gang restarts started by this operator",
            restarts.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader lease",
            leader.clone(),
        );
        Metrics {
            registry,
            reconcile_duration,
            errors,
            jobs,
            restarts,
            leader,
            ready: AtomicBool::new(false),
        }
    }
}

impl Metrics {
    /// Records one reconcile pass.
    pub fn observe_reconcile(&self, took: Duration, error: Option<&Error>) {
        self.reconcile_duration.observe(took.as_secs_f64());
        if let Some(e) = error {
            self.errors
                .get_or_create(&ErrorLabels {
                    kind: e.kind().into(),
                })
                .inc();
        }
    }

    /// Records a status transition: phase gauges move and new restarts are counted.
    pub fn observe_status(&self, old: Option<&TrainingJobStatus>, new: &TrainingJobStatus) {
        let phase =
            |s: Option<&TrainingJobStatus>| s.and_then(|s| s.phase).map(|p| p.as_str().to_string());
        let (before, after) = (phase(old), phase(Some(new)));
        if before != after {
            if let Some(b) = before {
                self.jobs.get_or_create(&PhaseLabels { phase: b }).dec();
            }
            if let Some(a) = after {
                self.jobs.get_or_create(&PhaseLabels { phase: a }).inc();
            }
        }
        let added = new.restarts - old.map(|s| s.restarts).unwrap_or(0);
        if added > 0 {
            self.restarts.inc_by(added as u64);
        }
    }

    /// Sets the leader gauge.
    pub fn set_leader(&self, leader: bool) {
        self.leader.set(leader as i64);
    }

    /// Marks the operator ready (it reached the API server).
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// The metrics in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

async fn metrics(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.encode(),
    )
}

async fn readyz(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    if m.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

/// The HTTP endpoints.
pub fn router(m: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use radfm_api::trainingjob::Phase;

    #[test]
    fn phase_transitions_move_gauges_and_restarts_are_counted_once() {
        let m = Metrics::default();
        let running = TrainingJobStatus {
            phase: Some(Phase::Running),
            ..Default::default()
        };
        let restarting = TrainingJobStatus {
            phase: Some(Phase::Restarting),
            restarts: 1,
            ..Default::default()
        };
        m.observe_status(None, &running);
        m.observe_status(Some(&running), &restarting);
        m.observe_status(Some(&restarting), &restarting);
        m.observe_reconcile(Duration::from_millis(3), Some(&Error::MissingField("x")));
        let text = m.encode();
        assert!(
            text.contains("radfm_operator_jobs{phase=\"Running\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("radfm_operator_jobs{phase=\"Restarting\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("radfm_operator_gang_restarts_total 1"),
            "{text}"
        );
        assert!(
            text.contains("radfm_operator_reconcile_errors_total{kind=\"invalid\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("radfm_operator_reconcile_duration_seconds_count 1"),
            "{text}"
        );
    }
}
