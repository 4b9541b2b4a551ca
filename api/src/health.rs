//! Health as GitOps tools judge it: the kstatus conditions `Ready`, `Reconciling` and `Stalled`.
//!
//! Flux (through kstatus) and Argo CD (through radfm's Lua health checks) read nothing but these
//! three conditions and `status.observedGeneration`, so every kind's mapping from its own state
//! to health lives here, in one table per kind, and the operator writes the result each pass
//! beside the kind's own conditions. docs/health.md prints the same table.
//!
//! kstatus semantics: `Reconciling=True` means the controller is still working toward the spec
//! (InProgress), `Stalled=True` means it cannot get there without a change from outside (Failed),
//! and neither being True once the generation is observed means the object is settled (Current).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

use crate::conditions::{self, Kind, Stamp};
use crate::trainingjob::{Phase, TrainingJobStatus};

/// The three kstatus condition types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthConditionType {
    /// The object has reached the state its spec asks for.
    Ready,
    /// The controller is still working toward the spec.
    Reconciling,
    /// The controller cannot reach the spec without a change from outside.
    Stalled,
}

impl Kind for HealthConditionType {
    fn name(self) -> &'static str {
        match self {
            HealthConditionType::Ready => "Ready",
            HealthConditionType::Reconciling => "Reconciling",
            HealthConditionType::Stalled => "Stalled",
        }
    }
}

/// Where an object stands, as GitOps tools see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Settled in the state the spec asks for: Ready=True (kstatus Current, Argo CD Healthy).
    Healthy,
    /// Still on its way: Reconciling=True (kstatus InProgress, Argo CD Progressing).
    Progressing,
    /// Paused because the spec says so: Ready=True of reason `Suspended` (kstatus Current, so that
    /// `flux`/`kubectl wait` on a paused object end; Argo CD Suspended).
    Suspended,
    /// Cannot get on without a change: Stalled=True (kstatus Failed, Argo CD Degraded).
    Stalled,
}

/// A verdict with the reason and message its conditions carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// Where the object stands.
    pub verdict: Verdict,
    /// CamelCase reason of the condition that says so.
    pub reason: String,
    /// Human-readable detail.
    pub message: String,
}

/// Reasons the health conditions carry beyond the kinds' own.
pub mod health_reason {
    /// Paused by the spec.
    pub const SUSPENDED: &str = "Suspended";
    /// The controller has not written a status for the current generation yet.
    pub const PENDING: &str = "Pending";
    /// Not in that state.
    pub const NOT_APPLICABLE: &str = "NotApplicable";
}

impl Health {
    fn new(verdict: Verdict, reason: &str, message: impl Into<String>) -> Self {
        Health {
            verdict,
            reason: reason.to_string(),
            message: message.into(),
        }
    }

    /// Writes `Reconciling` and `Stalled` for this verdict; `Ready` is the caller's.
    fn write_reconciling_and_stalled(&self, conditions: &mut Vec<Condition>, stamp: &Stamp) {
        for (ty, verdict) in [
            (HealthConditionType::Reconciling, Verdict::Progressing),
            (HealthConditionType::Stalled, Verdict::Stalled),
        ] {
            if self.verdict == verdict {
                stamp.set(conditions, ty, true, &self.reason, &self.message);
            } else {
                let why = health_reason::NOT_APPLICABLE;
                stamp.set(conditions, ty, false, why, "");
            }
        }
    }

    /// Writes all three conditions of a TrainingJob, whose `Ready` is health's alone.
    pub fn write(&self, conditions: &mut Vec<Condition>, stamp: &Stamp) {
        let ready = matches!(self.verdict, Verdict::Healthy | Verdict::Suspended);
        let ty = HealthConditionType::Ready;
        stamp.set(conditions, ty, ready, &self.reason, &self.message);
        self.write_reconciling_and_stalled(conditions, stamp);
    }
}

/// A TrainingJob's health.
///
/// | Phase | Verdict | Reason |
/// |---|---|---|
/// | none yet, Pending | Progressing | the phase |
/// | Running, Restarting | Progressing | the phase |
/// | Suspended | Suspended | Suspended |
/// | Succeeded | Healthy | Succeeded |
/// | Failed | Stalled | the Failed condition's reason |
/// | any, refused by the pod policy | Stalled | PodPolicyViolation |
pub fn of_training_job(status: &TrainingJobStatus) -> Health {
    let failed = || conditions::get(&status.conditions, conditions::ConditionType::Failed);
    let progress = || {
        let ready = status.ready.as_deref().unwrap_or("0/0");
        let step = status.progress.as_ref().map_or(String::new(), |p| {
            let total = p.total_steps.map_or(String::new(), |t| format!("/{t}"));
            format!(", step {}{total}", p.step)
        });
        format!("{ready} workers ready{step}")
    };
    let refused = conditions::get(&status.conditions, conditions::ConditionType::Created)
        .filter(|c| c.status == "False" && STALLED_REASONS.contains(&c.reason.as_str()));
    if let Some(c) = refused {
        return Health::new(Verdict::Stalled, &c.reason, c.message.clone());
    }
    match status.phase {
        None => Health::new(
            Verdict::Progressing,
            health_reason::PENDING,
            "not started yet",
        ),
        Some(phase @ (Phase::Pending | Phase::Running | Phase::Restarting)) => Health::new(
            Verdict::Progressing,
            phase.as_str(),
            format!("attempt {}: {}", status.attempt.max(1), progress()),
        ),
        Some(Phase::Queued) => {
            let admitted = conditions::get(&status.conditions, conditions::ConditionType::Admitted);
            Health::new(
                Verdict::Progressing,
                Phase::Queued.as_str(),
                admitted.map_or("waiting for Kueue to admit the job".to_string(), |c| {
                    c.message.clone()
                }),
            )
        }
        Some(Phase::Suspended) => Health::new(
            Verdict::Suspended,
            health_reason::SUSPENDED,
            "runPolicy.suspend is true: no workers run",
        ),
        Some(Phase::Succeeded) => Health::new(
            Verdict::Healthy,
            Phase::Succeeded.as_str(),
            format!("every worker succeeded: {}", progress()),
        ),
        Some(Phase::Failed) => match failed() {
            Some(c) => Health::new(Verdict::Stalled, &c.reason, c.message.clone()),
            None => Health::new(Verdict::Stalled, Phase::Failed.as_str(), "the job failed"),
        },
    }
}

/// A FederatedTraining's health.
///
/// | Phase | Verdict | Reason |
/// |---|---|---|
/// | none yet | Progressing | Pending |
/// | Publishing, Training, Aggregating | Progressing | the phase |
/// | Succeeded | Healthy | Succeeded |
/// | Failed | Stalled | TooFewSites, RetriesExhausted |
/// | any, `why` one of [`STALLED_REASONS`] (the exchange is not allowed) | Stalled | `why` |
///
/// `why` and `message` are the plan's account of the phase.
pub fn of_federated_training(
    phase: Option<crate::federated::FederatedPhase>,
    why: &str,
    message: &str,
) -> Health {
    use crate::federated::FederatedPhase as P;
    let verdict = match phase {
        Some(P::Succeeded) => Verdict::Healthy,
        Some(P::Failed) => Verdict::Stalled,
        _ if STALLED_REASONS.contains(&why) => Verdict::Stalled,
        _ => Verdict::Progressing,
    };
    Health::new(verdict, why, message)
}

/// Writes `Reconciling` and `Stalled` of a kind that sets its own `Ready` (ContinualTraining,
/// SiteValidator, PromotionPolicy), derived from that `Ready` by [`of_ready_condition`].
pub fn follow_ready(conditions: &mut Vec<Condition>, stamp: &Stamp) {
    of_ready_condition(conditions).write_reconciling_and_stalled(conditions, stamp);
}

/// `Ready=False` reasons that only a change from outside clears (Stalled); every other reason of
/// a False `Ready` is retried by the controller on its own (Progressing).
pub const STALLED_REASONS: [&str; 3] = [
    conditions::continual_reason::INVALID_SPEC,
    conditions::continual_reason::BASE_MODEL_MISSING,
    conditions::reason::POD_POLICY_VIOLATION,
];

/// The health of a kind whose own `Ready` condition says whether its spec is usable and its
/// stores reachable (ContinualTraining, SiteValidator, PromotionPolicy).
///
/// | Ready | Reason | Verdict |
/// |---|---|---|
/// | missing | | Progressing |
/// | True | Suspended | Suspended |
/// | True | any other | Healthy |
/// | False | one of [`STALLED_REASONS`] | Stalled |
/// | False | any other (a store that did not answer) | Progressing |
pub fn of_ready_condition(conditions: &[Condition]) -> Health {
    let Some(ready) = conditions.iter().find(|c| c.type_ == "Ready") else {
        return Health::new(
            Verdict::Progressing,
            health_reason::PENDING,
            "not reconciled yet",
        );
    };
    let verdict = match (ready.status.as_str(), ready.reason.as_str()) {
        ("True", health_reason::SUSPENDED) => Verdict::Suspended,
        ("True", _) => Verdict::Healthy,
        (_, why) if STALLED_REASONS.contains(&why) => Verdict::Stalled,
        _ => Verdict::Progressing,
    };
    Health::new(verdict, &ready.reason, ready.message.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conditions::{ConditionType, continual_reason, reason, validation_reason};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn stamp() -> Stamp {
        Stamp {
            generation: Some(3),
            now: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
        }
    }

    fn job(phase: Option<Phase>) -> TrainingJobStatus {
        let mut st = TrainingJobStatus {
            phase,
            ready: Some("1/2".into()),
            attempt: 2,
            ..Default::default()
        };
        if phase == Some(Phase::Failed) {
            let why = reason::BACKOFF_LIMIT_EXCEEDED;
            stamp().set(
                &mut st.conditions,
                ConditionType::Failed,
                true,
                why,
                "3 > 2",
            );
        }
        st
    }

    fn status_of(conditions: &[Condition], ty: HealthConditionType) -> (String, String) {
        let c = conditions::get(conditions, ty).unwrap();
        (c.status.clone(), c.reason.clone())
    }

    #[test]
    fn every_training_job_phase_has_its_verdict() {
        let table = [
            (None, Verdict::Progressing, "Pending"),
            (Some(Phase::Queued), Verdict::Progressing, "Queued"),
            (Some(Phase::Pending), Verdict::Progressing, "Pending"),
            (Some(Phase::Running), Verdict::Progressing, "Running"),
            (Some(Phase::Restarting), Verdict::Progressing, "Restarting"),
            (Some(Phase::Suspended), Verdict::Suspended, "Suspended"),
            (Some(Phase::Succeeded), Verdict::Healthy, "Succeeded"),
            (
                Some(Phase::Failed),
                Verdict::Stalled,
                "BackoffLimitExceeded",
            ),
        ];
        for (phase, verdict, why) in table {
            let health = of_training_job(&job(phase));
            assert_eq!(
                (health.verdict, health.reason.as_str()),
                (verdict, why),
                "{phase:?}"
            );
        }
    }

    #[test]
    fn a_job_the_pod_policy_refuses_is_stalled_not_pending() {
        let mut st = job(Some(Phase::Pending));
        let why = reason::POD_POLICY_VIOLATION;
        stamp().set(
            &mut st.conditions,
            ConditionType::Created,
            false,
            why,
            "hostPath",
        );
        let health = of_training_job(&st);
        assert_eq!(
            (health.verdict, health.reason.as_str()),
            (Verdict::Stalled, why)
        );
        let why = reason::CREATE_FAILED;
        stamp().set(
            &mut st.conditions,
            ConditionType::Created,
            false,
            why,
            "quota",
        );
        assert_eq!(of_training_job(&st).verdict, Verdict::Progressing);
    }

    #[test]
    fn a_running_job_says_how_far_it_got() {
        let mut st = job(Some(Phase::Running));
        st.progress = Some(crate::trainingjob::Progress {
            step: 40,
            total_steps: Some(120),
            ..Default::default()
        });
        let message = of_training_job(&st).message;
        assert_eq!(message, "attempt 2: 1/2 workers ready, step 40/120");
    }

    #[test]
    fn a_job_gets_exactly_one_true_condition_per_verdict() {
        let table = [
            (Some(Phase::Running), ["False", "True", "False"]),
            (Some(Phase::Succeeded), ["True", "False", "False"]),
            (Some(Phase::Failed), ["False", "False", "True"]),
            (Some(Phase::Suspended), ["True", "False", "False"]),
        ];
        for (phase, want) in table {
            let mut conditions = Vec::new();
            of_training_job(&job(phase)).write(&mut conditions, &stamp());
            let got = [
                HealthConditionType::Ready,
                HealthConditionType::Reconciling,
                HealthConditionType::Stalled,
            ]
            .map(|ty| status_of(&conditions, ty).0);
            assert_eq!(got, want, "{phase:?}");
        }
    }

    #[test]
    fn a_ready_condition_maps_to_its_verdict() {
        let table = [
            (true, continual_reason::SCHEDULING, Verdict::Healthy),
            (true, validation_reason::POLLING, Verdict::Healthy),
            (true, continual_reason::SUSPENDED, Verdict::Suspended),
            (false, continual_reason::INVALID_SPEC, Verdict::Stalled),
            (
                false,
                continual_reason::BASE_MODEL_MISSING,
                Verdict::Stalled,
            ),
            (false, reason::POD_POLICY_VIOLATION, Verdict::Stalled),
            (
                false,
                continual_reason::STORE_UNAVAILABLE,
                Verdict::Progressing,
            ),
            (
                false,
                validation_reason::REGISTRY_ERROR,
                Verdict::Progressing,
            ),
        ];
        for (ready, why, verdict) in table {
            let mut conditions = Vec::new();
            stamp().set(&mut conditions, HealthConditionType::Ready, ready, why, "m");
            assert_eq!(of_ready_condition(&conditions).verdict, verdict, "{why}");
        }
        assert_eq!(of_ready_condition(&[]).verdict, Verdict::Progressing);
    }

    #[test]
    fn writing_beside_ready_leaves_the_kinds_own_ready_alone() {
        let mut conditions = Vec::new();
        let why = continual_reason::INVALID_SPEC;
        stamp().set(
            &mut conditions,
            HealthConditionType::Ready,
            false,
            why,
            "bad cron",
        );
        follow_ready(&mut conditions, &stamp());
        let ready = conditions::get(&conditions, HealthConditionType::Ready).unwrap();
        assert_eq!(
            (ready.reason.as_str(), ready.message.as_str()),
            (why, "bad cron")
        );
        let stalled = conditions::get(&conditions, HealthConditionType::Stalled).unwrap();
        assert_eq!(
            (stalled.status.as_str(), stalled.message.as_str()),
            ("True", "bad cron")
        );
        assert_eq!(
            status_of(&conditions, HealthConditionType::Reconciling).0,
            "False"
        );
    }
}
