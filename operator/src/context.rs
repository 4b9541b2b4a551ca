//! What every controller shares: the API client, one event recorder, the metrics, the clock and
//! the policy after a failed pass. One [`Context`] serves all four controllers (each may read
//! time from its own [`Clock`]), so a controller differs from another only in its plan.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use kube::Client;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use tracing::warn;

use crate::Error;
use crate::metrics::Metrics;
use crate::pod_policy::PodPolicy;
use crate::registry_access::RegistryAccess;

/// Field manager of every write the operator makes.
pub const FIELD_MANAGER: &str = "radfm-operator";

/// How long a controller waits after a failed pass before trying again.
pub const RETRY_AFTER_ERROR: Duration = Duration::from_secs(5);

/// A controller's notion of now.
#[derive(Clone, Debug, Default)]
pub enum Clock {
    /// The wall clock.
    #[default]
    Wall,
    /// The RFC 3339 time in a file, re-read on every pass (tests move time without waiting;
    /// `radfm-operator run --clock-file`).
    File(PathBuf),
}

impl Clock {
    /// The current time.
    pub fn now(&self) -> Timestamp {
        match self {
            Clock::Wall => Timestamp::now(),
            Clock::File(p) => match std::fs::read_to_string(p)
                .ok()
                .and_then(|t| t.trim().parse().ok())
            {
                Some(t) => t,
                None => {
                    warn!(path = %p.display(), "clock file unreadable; using the wall clock");
                    Timestamp::now()
                }
            },
        }
    }

    /// How long to wait before looking again when nothing is due before `until` (at most an
    /// hour; a file clock can jump at any moment, so it is read again every second).
    pub fn requeue(&self, now: Timestamp, until: Option<Timestamp>) -> Duration {
        match self {
            Clock::File(_) => Duration::from_secs(1),
            Clock::Wall => until
                .map(|u| u.duration_since(now).as_secs().max(1) as u64)
                .map_or(Duration::from_secs(3600), |s| {
                    Duration::from_secs(s.min(3600))
                }),
        }
    }
}

/// Shared state of the controllers.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Event recorder (reporting as [`FIELD_MANAGER`] and this replica).
    pub recorder: Recorder,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Where this controller reads the time.
    pub clock: Clock,
    /// What users' resources may add to the pods the operator creates.
    pub pod_policy: PodPolicy,
    /// Which registries each namespace may use.
    pub registry_access: RegistryAccess,
    /// Create a NetworkPolicy per TrainingJob that admits only the gang's own pods.
    pub gang_network_policy: bool,
    /// Kueue's Workload API is served: jobs labelled with a queue are admitted through it.
    pub kueue: bool,
    /// What the TrainingJob controller's watches keep (set by that controller for its passes).
    pub training_job_caches: Option<crate::training_job::cache::Caches>,
}

impl Context {
    /// A context on the wall clock; `instance` names this replica in events.
    pub fn new(client: Client, metrics: Arc<Metrics>, instance: Option<String>) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance,
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            clock: Clock::Wall,
            pod_policy: PodPolicy::default(),
            registry_access: RegistryAccess::default(),
            gang_network_policy: true,
            kueue: false,
            training_job_caches: None,
        }
    }

    /// The same client, recorder and metrics, reading time from `clock`.
    pub fn with_clock(&self, clock: Clock) -> Self {
        Context {
            client: self.client.clone(),
            recorder: self.recorder.clone(),
            metrics: self.metrics.clone(),
            clock,
            pod_policy: self.pod_policy.clone(),
            registry_access: self.registry_access.clone(),
            gang_network_policy: self.gang_network_policy,
            kueue: self.kueue,
            training_job_caches: self.training_job_caches.clone(),
        }
    }

    /// The same context with the TrainingJob controller's caches.
    pub fn with_training_job_caches(&self, caches: crate::training_job::cache::Caches) -> Self {
        Context {
            training_job_caches: Some(caches),
            ..self.with_clock(self.clock.clone())
        }
    }
}

/// The requeue after a failed pass of any controller: soon, with the error logged (it is also in
/// the object's status where the pass got that far).
pub fn error_policy<K: kube::Resource<DynamicType = ()>>(
    _obj: Arc<K>,
    error: &Error,
    _ctx: Arc<Context>,
) -> Action {
    warn!(%error, kind = %K::kind(&()), "reconcile failed");
    Action::requeue(RETRY_AFTER_ERROR)
}

/// Runs `fut`, the pass of `object`, turning a panic into [`Error::Panicked`]: the controller
/// polls every object's pass in one task, so an unwinding pass would otherwise end the
/// controller, and with it every other object's reconciliation.
pub async fn contained<F>(object: String, fut: F) -> Result<Action, Error>
where
    F: std::future::Future<Output = Result<Action, Error>>,
{
    use futures::FutureExt;
    std::panic::AssertUnwindSafe(fut)
        .catch_unwind()
        .await
        .unwrap_or_else(|payload| {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-text panic payload".into());
            tracing::error!(%object, %message, "reconcile panicked");
            Err(Error::Panicked { object, message })
        })
}

/// Runs `controller` with `reconcile` (each pass [`contained`]) and the shared error policy
/// until `shutdown` resolves, logging what the controller itself reports (`what` names it in
/// the logs).
pub async fn drive<K, F, Fut>(
    controller: kube::runtime::Controller<K>,
    reconcile: F,
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
    what: &'static str,
) where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    F: FnMut(Arc<K>, Arc<Context>) -> Fut,
    Fut: std::future::Future<Output = Result<Action, Error>> + Send + 'static,
{
    use futures::StreamExt;
    let mut reconcile = reconcile;
    let pass = move |obj: Arc<K>, ctx: Arc<Context>| {
        let object = format!(
            "{} {}/{}",
            K::kind(&()),
            obj.meta().namespace.as_deref().unwrap_or(""),
            obj.meta().name.as_deref().unwrap_or("")
        );
        let metrics = ctx.metrics.clone();
        let fut = reconcile(obj, ctx);
        async move {
            let r = contained(object, fut).await;
            if let Err(e @ Error::Panicked { .. }) = &r {
                metrics.observe_reconcile(Duration::ZERO, Some(e));
            }
            r
        }
    };
    controller
        .graceful_shutdown_on(shutdown)
        .run(pass, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                warn!(error = %e, controller = what, "controller");
            }
        })
        .await;
}
