//! Standard Kubernetes conditions of TrainingJobs and ContinualTrainings.
//!
//! Condition types and reasons are typed constants so that the operator, the CLI and the tests
//! cannot drift apart on spelling. [`set`] moves `lastTransitionTime` only when the status flips,
//! which is what GitOps tools and `kubectl wait` rely on.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Condition types of a TrainingJob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConditionType {
    /// The Service and the worker pods of the first attempt were created.
    Created,
    /// Every worker of the current attempt is running.
    Running,
    /// The gang is being replaced by a new attempt.
    Restarting,
    /// The job is suspended.
    Suspended,
    /// Every worker finished successfully.
    Succeeded,
    /// The job failed.
    Failed,
    /// Kueue admitted the job's Workload (only for jobs labelled with a Kueue queue).
    Admitted,
}

impl ConditionType {
    /// Every type, in display order.
    pub const ALL: [ConditionType; 7] = [
        ConditionType::Admitted,
        ConditionType::Created,
        ConditionType::Running,
        ConditionType::Restarting,
        ConditionType::Suspended,
        ConditionType::Succeeded,
        ConditionType::Failed,
    ];

    /// The type's name.
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionType::Created => "Created",
            ConditionType::Running => "Running",
            ConditionType::Restarting => "Restarting",
            ConditionType::Suspended => "Suspended",
            ConditionType::Succeeded => "Succeeded",
            ConditionType::Failed => "Failed",
            ConditionType::Admitted => "Admitted",
        }
    }
}

/// A typed condition type: its name in `status.conditions[].type`.
pub trait Kind: Copy {
    /// The type's name.
    fn name(self) -> &'static str;
}

impl Kind for ConditionType {
    fn name(self) -> &'static str {
        self.as_str()
    }
}

/// Condition types of a ContinualTraining.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContinualConditionType {
    /// The spec is usable: schedule, time zone, dataset and registry could be read.
    Ready,
    /// A run is in progress.
    Active,
    /// The last scheduled evaluation found enough new data.
    DataReady,
}

impl Kind for ContinualConditionType {
    fn name(self) -> &'static str {
        match self {
            ContinualConditionType::Ready => "Ready",
            ContinualConditionType::Active => "Active",
            ContinualConditionType::DataReady => "DataReady",
        }
    }
}

/// Condition types of SiteValidators and PromotionPolicies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValidationConditionType {
    /// The registry could be read and the spec is usable.
    Ready,
    /// A validation pod is running (SiteValidator).
    Validating,
}

impl Kind for ValidationConditionType {
    fn name(self) -> &'static str {
        match self {
            ValidationConditionType::Ready => "Ready",
            ValidationConditionType::Validating => "Validating",
        }
    }
}

/// Condition types of a ModelMonitor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MonitorConditionType {
    /// The spec is usable and the registry could be read.
    Ready,
    /// A look's pod is running.
    Looking,
    /// The last look at the deployed version found drift (Unknown before the first look at it).
    Drifting,
}

impl Kind for MonitorConditionType {
    fn name(self) -> &'static str {
        match self {
            MonitorConditionType::Ready => "Ready",
            MonitorConditionType::Looking => "Looking",
            MonitorConditionType::Drifting => "Drifting",
        }
    }
}

/// Reasons of ModelMonitor conditions and events (besides the shared `InvalidSpec`,
/// `Suspended`, `RegistryError`, `PodPolicyViolation`, `MissedSchedule` and `Idle`).
pub mod monitor_reason {
    /// Schedule and registry are usable.
    pub const SCHEDULING: &str = "Scheduling";
    /// The deployed alias points to no version: nothing to watch.
    pub const NOTHING_DEPLOYED: &str = "NothingDeployed";
    /// A look's pod was created.
    pub const LOOK_STARTED: &str = "LookStarted";
    /// A look's pod ended without a report, or disappeared.
    pub const LOOK_FAILED: &str = "LookFailed";
    /// The last look found drift.
    pub const DRIFT_DETECTED: &str = "DriftDetected";
    /// The last look found no drift.
    pub const NO_DRIFT: &str = "NoDrift";
    /// No look at the deployed version yet.
    pub const NOT_LOOKED: &str = "NotLookedYet";
}

/// Reasons of SiteValidator and PromotionPolicy conditions and events.
pub mod validation_reason {
    /// Registry read; nothing wrong.
    pub const POLLING: &str = "Polling";
    /// The registry could not be read, or a gate could not run.
    pub const REGISTRY_ERROR: &str = "RegistryError";
    /// A validation pod was created for a candidate.
    pub const VALIDATION_STARTED: &str = "ValidationStarted";
    /// This site's report of the candidate is in the registry.
    pub const REPORT_PUBLISHED: &str = "ReportPublished";
    /// The validation pod failed; it is retried at the next poll.
    pub const VALIDATION_FAILED: &str = "ValidationFailed";
    /// No validation in progress.
    pub const IDLE: &str = "Idle";
    /// A gate decision was recorded.
    pub const DECIDED: &str = "Decided";
}

/// Reasons of FederatedTraining and FederatedSite conditions and events.
pub mod federated_reason {
    /// Round 1's global model is being published.
    pub const PUBLISHING: &str = "Publishing";
    /// A round's global model is out; the sites train.
    pub const TRAINING: &str = "Training";
    /// A round is being closed.
    pub const AGGREGATING: &str = "Aggregating";
    /// A round's global model was seen published.
    pub const ROUND_OPENED: &str = "RoundOpened";
    /// A round was closed: its record is in the exchange.
    pub const ROUND_CLOSED: &str = "RoundClosed";
    /// A contribution was refused.
    pub const CONTRIBUTION_REJECTED: &str = "ContributionRejected";
    /// The result is being exported and registered.
    pub const REGISTERING: &str = "Registering";
    /// The result was registered.
    pub const REGISTERED: &str = "VersionRegistered";
    /// Every round is closed (and the result registered where asked).
    pub const SUCCEEDED: &str = "Succeeded";
    /// A round's deadline passed with fewer sites than minSites.
    pub const TOO_FEW_SITES: &str = "TooFewSites";
    /// A publish, aggregate, fetch or contribute pod failed (retried up to 3 times).
    pub const POD_FAILED: &str = "PodFailed";
    /// A step's pod failed 3 times.
    pub const RETRIES_EXHAUSTED: &str = "RetriesExhausted";
    /// The exchange could not be read.
    pub const EXCHANGE_UNAVAILABLE: &str = "ExchangeUnavailable";
    /// The site polls the exchange.
    pub const WAITING: &str = "Waiting";
    /// The site fetches the round's global model.
    pub const FETCHING: &str = "Fetching";
    /// The site computes and uploads its update.
    pub const CONTRIBUTING: &str = "Contributing";
    /// The site's update of a round is in the exchange.
    pub const CONTRIBUTED: &str = "Contributed";
    /// The site's local TrainingJob of a round failed; the site waits for the next round.
    pub const LOCAL_TRAINING_FAILED: &str = "LocalTrainingFailed";
    /// The hub published the federation's result.
    pub const FINISHED: &str = "Finished";
}

/// Reasons of ContinualTraining conditions and events.
pub mod continual_reason {
    /// Schedule, dataset and registry are usable.
    pub const SCHEDULING: &str = "Scheduling";
    /// spec.suspend is true.
    pub const SUSPENDED: &str = "Suspended";
    /// A field cannot be used (bad schedule, time zone, duration).
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// The dataset index or the registry could not be read.
    pub const STORE_UNAVAILABLE: &str = "StoreUnavailable";
    /// The base model's alias does not exist.
    pub const BASE_MODEL_MISSING: &str = "BaseModelMissing";
    /// A run was created.
    pub const RUN_CREATED: &str = "RunCreated";
    /// Active runs were deleted for a new one (Replace).
    pub const RUN_REPLACED: &str = "RunReplaced";
    /// A due run was skipped because another is active (Forbid).
    pub const SKIPPED_ACTIVE: &str = "SkippedActiveRun";
    /// A due run was skipped because too little new data arrived.
    pub const NO_NEW_DATA: &str = "NoNewData";
    /// Enough new data for a run.
    pub const NEW_DATA: &str = "NewData";
    /// A due run was later than startingDeadlineSeconds.
    pub const MISSED_DEADLINE: &str = "MissedSchedule";
    /// The status lacked progress the registry records (an object re-applied from Git); the
    /// watermark was taken from the registry.
    pub const WATERMARK_RECOVERED: &str = "WatermarkRecovered";
    /// A run succeeded and its model was registered; the watermark moved.
    pub const REGISTERED: &str = "VersionRegistered";
    /// A site's monitor report was not counted by the drift trigger (untrusted key, bad
    /// signature, another version or model).
    pub const MONITOR_REPORT_REFUSED: &str = "MonitorReportRefused";
    /// A run succeeded but its export could not be registered.
    pub const REGISTER_FAILED: &str = "RegistrationFailed";
    /// A run failed.
    pub const RUN_FAILED: &str = "RunFailed";
    /// Runs are in progress.
    pub const RUNNING: &str = "RunsActive";
    /// No run is in progress.
    pub const IDLE: &str = "Idle";
}

/// Reasons of condition transitions and events.
pub mod reason {
    /// Service and workers created.
    pub const JOB_CREATED: &str = "JobCreated";
    /// Creating a child object failed.
    pub const CREATE_FAILED: &str = "CreateFailed";
    /// The cluster's radfm pod policy refuses a field of the resource; nothing is created.
    pub const POD_POLICY_VIOLATION: &str = "PodPolicyViolation";
    /// Waiting for workers to be scheduled and started.
    pub const WORKERS_PENDING: &str = "WorkersPending";
    /// Every worker running.
    pub const WORKERS_RUNNING: &str = "WorkersRunning";
    /// A worker failed; the gang restarts (counted).
    pub const WORKER_FAILED: &str = "WorkerFailed";
    /// An infrastructure fault; the gang restarts (not counted).
    pub const DISRUPTED: &str = "Disrupted";
    /// The new attempt is running.
    pub const RESTARTED: &str = "Restarted";
    /// runPolicy.suspend is true.
    pub const SUSPENDED: &str = "JobSuspended";
    /// runPolicy.suspend went back to false.
    pub const RESUMED: &str = "JobResumed";
    /// Every worker succeeded.
    pub const SUCCEEDED: &str = "JobSucceeded";
    /// A failure the policy says cannot be retried.
    pub const PERMANENT_FAILURE: &str = "PermanentFailure";
    /// Counted restarts exceeded runPolicy.backoffLimit.
    pub const BACKOFF_LIMIT_EXCEEDED: &str = "BackoffLimitExceeded";
    /// runPolicy.activeDeadlineSeconds passed.
    pub const DEADLINE_EXCEEDED: &str = "DeadlineExceeded";
    /// Not in that state.
    pub const NOT_APPLICABLE: &str = "NotApplicable";
    /// ttlSecondsAfterFinished is due but not applied: a GitOps tool applied the job.
    pub const TTL_KEPT_FOR_GITOPS: &str = "TTLKeptForGitOps";
    /// The job waits in its Kueue queue: its Workload has no admission yet.
    pub const QUEUED: &str = "Queued";
    /// Kueue admitted the job's Workload; its gang may start.
    pub const ADMITTED: &str = "Admitted";
    /// Kueue evicted the job's Workload (preemption, quota change, deactivation); the gang is
    /// stopped and the job queues again.
    pub const EVICTED: &str = "Evicted";
    /// Kueue's admission cannot be applied to the gang (a missing ResourceFlavor, a node
    /// selector that contradicts the job's).
    pub const ADMISSION_NOT_APPLICABLE: &str = "AdmissionNotApplicable";
}

/// Sets a condition, keeping `lastTransitionTime` unless `status` flips. Returns whether the status
/// flipped (or the condition is new).
pub fn set(
    conditions: &mut Vec<Condition>,
    ty: impl Kind,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: &Time,
) -> bool {
    let status = if status { "True" } else { "False" };
    put(conditions, ty, status, reason, message, generation, now)
}

/// [`set`] to `Unknown`: the controller cannot say yet (for example before a first
/// observation). Returns whether the status changed.
pub fn set_unknown(
    conditions: &mut Vec<Condition>,
    ty: impl Kind,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: &Time,
) -> bool {
    put(conditions, ty, "Unknown", reason, message, generation, now)
}

fn put(
    conditions: &mut Vec<Condition>,
    ty: impl Kind,
    status_str: &str,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: &Time,
) -> bool {
    match conditions.iter_mut().find(|c| c.type_ == ty.name()) {
        Some(c) => {
            let flipped = c.status != status_str;
            if flipped {
                c.last_transition_time = now.clone();
                c.status = status_str.to_string();
            }
            c.reason = reason.to_string();
            c.message = message.to_string();
            c.observed_generation = generation;
            flipped
        }
        None => {
            conditions.push(Condition {
                type_: ty.name().to_string(),
                status: status_str.to_string(),
                reason: reason.to_string(),
                message: message.to_string(),
                observed_generation: generation,
                last_transition_time: now.clone(),
            });
            true
        }
    }
}

/// The generation and time a reconcile pass stamps on every condition it sets.
#[derive(Debug, Clone, PartialEq)]
pub struct Stamp {
    /// The object's `metadata.generation` this pass acted on.
    pub generation: Option<i64>,
    /// The pass's time.
    pub now: Time,
}

impl Stamp {
    /// Sets condition `ty` to `status` with `reason` and `message` (see [`set`]); returns whether
    /// it flipped or is new.
    pub fn set(
        &self,
        conditions: &mut Vec<Condition>,
        ty: impl Kind,
        status: bool,
        reason: &str,
        message: &str,
    ) -> bool {
        set(
            conditions,
            ty,
            status,
            reason,
            message,
            self.generation,
            &self.now,
        )
    }

    /// Sets condition `ty` to Unknown (see [`set_unknown`]); returns whether it changed.
    pub fn set_unknown(
        &self,
        conditions: &mut Vec<Condition>,
        ty: impl Kind,
        reason: &str,
        message: &str,
    ) -> bool {
        set_unknown(conditions, ty, reason, message, self.generation, &self.now)
    }
}

/// Whether the condition exists and is True.
pub fn is_true(conditions: &[Condition], ty: impl Kind) -> bool {
    get(conditions, ty).is_some_and(|c| c.status == "True")
}

/// The condition of that type, if any.
pub fn get(conditions: &[Condition], ty: impl Kind) -> Option<&Condition> {
    conditions.iter().find(|c| c.type_ == ty.name())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn t(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn last_transition_time_moves_only_when_status_flips() {
        let mut c = Vec::new();
        assert!(set(
            &mut c,
            ConditionType::Running,
            false,
            "A",
            "a",
            Some(1),
            &t(10)
        ));
        assert!(!set(
            &mut c,
            ConditionType::Running,
            false,
            "B",
            "b",
            Some(2),
            &t(20)
        ));
        assert_eq!(c[0].last_transition_time, t(10));
        assert_eq!(
            (c[0].reason.as_str(), c[0].observed_generation),
            ("B", Some(2))
        );
        assert!(set(
            &mut c,
            ConditionType::Running,
            true,
            "C",
            "c",
            Some(2),
            &t(30)
        ));
        assert_eq!(c[0].last_transition_time, t(30));
        assert!(is_true(&c, ConditionType::Running));
        assert!(!is_true(&c, ConditionType::Failed));
        assert_eq!(c.len(), 1);
        assert!(set_unknown(
            &mut c,
            ConditionType::Running,
            "D",
            "d",
            Some(3),
            &t(40)
        ));
        assert_eq!(
            (c[0].status.as_str(), c[0].last_transition_time.clone()),
            ("Unknown", t(40))
        );
        assert!(!is_true(&c, ConditionType::Running));
    }
}
