//! Standard Kubernetes conditions of a TrainingJob.
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
}

impl ConditionType {
    /// Every type, in display order.
    pub const ALL: [ConditionType; 6] = [
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
        }
    }
}

/// Reasons of condition transitions and events.
pub mod reason {
    /// Service and workers created.
    pub const JOB_CREATED: &str = "JobCreated";
    /// Creating a child object failed.
    pub const CREATE_FAILED: &str = "CreateFailed";
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
}

/// Sets a condition, keeping `lastTransitionTime` unless `status` flips. Returns whether the status
/// flipped (or the condition is new).
pub fn set(
    conditions: &mut Vec<Condition>,
    ty: ConditionType,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: &Time,
) -> bool {
    let status_str = if status { "True" } else { "False" };
    match conditions.iter_mut().find(|c| c.type_ == ty.as_str()) {
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
                type_: ty.as_str().to_string(),
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

/// Whether the condition exists and is True.
pub fn is_true(conditions: &[Condition], ty: ConditionType) -> bool {
    get(conditions, ty).is_some_and(|c| c.status == "True")
}

/// The condition of that type, if any.
pub fn get(conditions: &[Condition], ty: ConditionType) -> Option<&Condition> {
    conditions.iter().find(|c| c.type_ == ty.as_str())
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
    }
}
