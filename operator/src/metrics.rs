//! Prometheus metrics and the `/metrics`, `/healthz`, `/readyz` endpoints.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use radfm_api::TrainingJobStatus;
use radfm_api::monitoring::{Look, Verdict};

use crate::Error;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: String,
}

/// One ModelMonitor: where it runs and what it watches.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MonitorLabels {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub monitor: String,
    /// The site it watches for.
    pub site: String,
    /// The registry model watched.
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatisticLabels {
    #[prometheus(flatten)]
    monitor: MonitorLabels,
    statistic: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LookLabels {
    #[prometheus(flatten)]
    monitor: MonitorLabels,
    outcome: String,
}

/// The monitoring metrics of the ModelMonitors this operator runs.
#[derive(Default)]
struct MonitorMetrics {
    drifting: Family<MonitorLabels, Gauge>,
    version: Family<MonitorLabels, Gauge>,
    last_look: Family<MonitorLabels, Gauge>,
    adjusted_p: Family<StatisticLabels, Gauge<f64, AtomicU64>>,
    looks: Family<LookLabels, Counter>,
}

impl MonitorMetrics {
    fn register(&self, registry: &mut Registry) {
        let sub = registry.sub_registry_with_prefix("monitor");
        sub.register(
            "drifting",
            "1 when the last look at the deployed version found drift, 0 when it did not",
            self.drifting.clone(),
        );
        sub.register(
            "version",
            "The model version of the last look",
            self.version.clone(),
        );
        sub.register(
            "last_look_timestamp_seconds",
            "When the last look's report was signed",
            self.last_look.clone(),
        );
        sub.register(
            "adjusted_p_value",
            "Holm-adjusted permutation p-value of each statistic of the last look",
            self.adjusted_p.clone(),
        );
        sub.register(
            "looks",
            "Looks by outcome (drifting, stable, failed)",
            self.looks.clone(),
        );
    }
}

/// Bounds of the reconcile-duration buckets, in seconds: controller-runtime's, so that an
/// objective such as "99 % of passes under 100 ms" falls on a bound, and quantiles compare
/// like for like with operators built on controller-runtime (doubling bounds put the p99 of a
/// 1.3 s pass anywhere between 1.28 and 2.56 s).
pub const RECONCILE_BUCKETS: [f64; 40] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 0.9,
    1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 15.0, 20.0,
    25.0, 30.0, 40.0, 50.0, 60.0,
];

/// The operator's metrics.
pub struct Metrics {
    registry: Registry,
    reconcile_duration: Histogram,
    errors: Family<ErrorLabels, Counter>,
    jobs: Family<PhaseLabels, Gauge>,
    restarts: Counter,
    leader: Gauge,
    monitor: MonitorMetrics,
    ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("radfm_operator");
        let reconcile_duration = Histogram::new(RECONCILE_BUCKETS.iter().copied());
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
        let monitor = MonitorMetrics::default();
        monitor.register(&mut registry);
        Metrics {
            registry,
            reconcile_duration,
            errors,
            jobs,
            restarts,
            leader,
            monitor,
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

    /// Records a ModelMonitor pass: the last look's verdict, version, time and statistics as
    /// gauges (set again on every pass, so a restarted operator shows them from the status),
    /// and this pass's recorded and failed looks as counters.
    pub fn observe_monitor(
        &self,
        labels: &MonitorLabels,
        last: Option<&Look>,
        recorded: &[Look],
        failed: u64,
    ) {
        let m = &self.monitor;
        for look in recorded {
            let outcome = match look.verdict {
                Verdict::Drifting => "drifting",
                Verdict::Stable => "stable",
            };
            m.looks
                .get_or_create(&LookLabels {
                    monitor: labels.clone(),
                    outcome: outcome.into(),
                })
                .inc();
        }
        if failed > 0 {
            m.looks
                .get_or_create(&LookLabels {
                    monitor: labels.clone(),
                    outcome: "failed".into(),
                })
                .inc_by(failed);
        }
        let Some(look) = last else { return };
        m.drifting
            .get_or_create(labels)
            .set((look.verdict == Verdict::Drifting) as i64);
        m.version.get_or_create(labels).set(look.version);
        m.last_look
            .get_or_create(labels)
            .set(look.time.0.as_second());
        for s in &look.statistics {
            m.adjusted_p
                .get_or_create(&StatisticLabels {
                    monitor: labels.clone(),
                    statistic: s.name.clone(),
                })
                .set(s.adjusted_p);
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
    fn a_pass_under_100_ms_counts_in_the_100_ms_bucket_and_one_of_1_3_s_below_1_5_s() {
        let m = Metrics::default();
        m.observe_reconcile(Duration::from_millis(90), None);
        m.observe_reconcile(Duration::from_millis(1300), None);
        let text = m.encode();
        let bucket = |le: &str| {
            let prefix =
                format!("radfm_operator_reconcile_duration_seconds_bucket{{le=\"{le}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .unwrap_or_else(|| panic!("no bucket {le} in {text}"))
                .trim()
                .to_string()
        };
        assert_eq!(bucket("0.05"), "0");
        assert_eq!(bucket("0.1"), "1");
        assert_eq!(bucket("1.25"), "1");
        assert_eq!(bucket("1.5"), "2");
        assert_eq!(bucket("+Inf"), "2");
    }

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

    #[test]
    fn a_monitors_last_look_is_a_gauge_per_site_and_statistic_and_looks_are_counted_by_outcome() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        use radfm_api::monitoring::Statistic;
        let m = Metrics::default();
        let labels = MonitorLabels {
            namespace: "site".into(),
            monitor: "north".into(),
            site: "north".into(),
            model: "chest".into(),
        };
        let look = Look {
            pod: "north-1".into(),
            version: 3,
            scheduled: Time(jiff::Timestamp::from_second(60).unwrap()),
            time: Time(jiff::Timestamp::from_second(90).unwrap()),
            verdict: Verdict::Drifting,
            alpha: 0.01,
            statistics: vec![Statistic {
                name: "metadata:manufacturer".into(),
                value: 40.0,
                adjusted_p: 0.002,
                drifting: true,
            }],
            report: "s3://r/x.json".into(),
        };
        m.observe_monitor(&labels, Some(&look), std::slice::from_ref(&look), 1);
        m.observe_monitor(&labels, Some(&look), &[], 0);
        let text = m.encode();
        let l = r#"namespace="site",monitor="north",site="north",model="chest""#;
        for line in [
            format!("radfm_operator_monitor_drifting{{{l}}} 1"),
            format!("radfm_operator_monitor_version{{{l}}} 3"),
            format!("radfm_operator_monitor_last_look_timestamp_seconds{{{l}}} 90"),
            format!(
                "radfm_operator_monitor_adjusted_p_value{{{l},statistic=\"metadata:manufacturer\"}} 0.002"
            ),
            format!("radfm_operator_monitor_looks_total{{{l},outcome=\"drifting\"}} 1"),
            format!("radfm_operator_monitor_looks_total{{{l},outcome=\"failed\"}} 1"),
        ] {
            assert!(text.contains(&line), "{line} in\n{text}");
        }
    }
}
