//! Failure policy: what a failed worker means for the gang.
//!
//! Rules are matched in order and the first match wins, like Kubernetes' Job `podFailurePolicy`.
//! A failure no rule matches restarts the gang and counts against `backoffLimit`. Without rules the
//! [`default_rules`] apply; they follow the trainer's exit-code table ([`crate::exit`]).

use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// Ordered failure rules.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct FailurePolicy {
    /// Rules, first match wins. Empty: the default policy.
    #[serde(default)]
    #[schemars(length(max = 32))]
    pub rules: Vec<FailurePolicyRule>,
}

/// One rule: exactly one matcher and the action taken when it matches.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.onExitCodes), has(self.onReasons), has(self.onPodConditions), has(self.onNodeLost)].filter(x, x).size() == 1").message("a failure rule needs exactly one of onExitCodes, onReasons, onPodConditions, onNodeLost"))]
pub struct FailurePolicyRule {
    /// What to do when the rule matches.
    pub action: FailureAction,
    /// Trainer exit codes (inclusive ranges).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_exit_codes: Option<Vec<ExitCodeRange>>,
    /// Container termination reasons (for example OOMKilled) or pod reasons (for example Evicted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_reasons: Option<Vec<String>>,
    /// Pod conditions that are True on the failed pod (for example DisruptionTarget).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_pod_conditions: Option<Vec<String>>,
    /// Matches a worker whose node was deleted or is not Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_node_lost: Option<bool>,
}

/// An inclusive range of exit codes.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("!has(self.to) || self.to >= self.from").message("exit code range: to must be >= from"))]
pub struct ExitCodeRange {
    /// First code.
    #[schemars(range(min = 0, max = 255))]
    pub from: i32,
    /// Last code; default: from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 255))]
    pub to: Option<i32>,
}

impl ExitCodeRange {
    fn contains(&self, code: i32) -> bool {
        (self.from..=self.to.unwrap_or(self.from)).contains(&code)
    }
}

/// What a matching failure does.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
pub enum FailureAction {
    /// Delete every worker and start the next attempt from the last checkpoint, counting
    /// against backoffLimit.
    #[default]
    RestartGang,
    /// Restart the gang without counting it (infrastructure faults).
    RestartGangNotCounted,
    /// Fail the job.
    FailJob,
}

/// What the operator observed about one failed worker.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkerFailure {
    /// The worker's rank.
    pub rank: i32,
    /// Exit code of the trainer container, when it terminated.
    pub exit_code: Option<i32>,
    /// Container termination reason or pod reason.
    pub reason: Option<String>,
    /// Pod conditions that are True.
    pub pod_conditions: Vec<String>,
    /// The worker's node is gone or not Ready.
    pub node_lost: bool,
    /// The last line the trainer wrote before failing (the container's termination message:
    /// worker pods use `FallbackToLogsOnError`), at most [`MESSAGE_LIMIT`] characters.
    pub termination_message: Option<String>,
}

/// Characters of a termination message quoted in a failure's description.
pub const MESSAGE_LIMIT: usize = 300;

/// The last non-empty line of a termination message, cut to [`MESSAGE_LIMIT`] characters.
pub fn last_line(message: &str) -> Option<String> {
    let line = message
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())?;
    Some(line.chars().take(MESSAGE_LIMIT).collect())
}

/// The decision for one failure, with a CamelCase reason and a message for status and events.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// The action.
    pub action: FailureAction,
    /// Index of the matching rule, or None when no rule matched.
    pub rule: Option<usize>,
    /// A sentence naming the worker and what happened to it.
    pub message: String,
}

/// The policy used when a job sets no rules.
pub fn default_rules() -> Vec<FailurePolicyRule> {
    let (from, to) = crate::exit::PERMANENT_RANGE;
    vec![
        FailurePolicyRule {
            action: FailureAction::RestartGangNotCounted,
            on_pod_conditions: Some(vec!["DisruptionTarget".into()]),
            ..Default::default()
        },
        FailurePolicyRule {
            action: FailureAction::RestartGangNotCounted,
            on_node_lost: Some(true),
            ..Default::default()
        },
        FailurePolicyRule {
            action: FailureAction::RestartGangNotCounted,
            on_reasons: Some(vec![
                "Evicted".into(),
                "Preempting".into(),
                "NodeLost".into(),
            ]),
            ..Default::default()
        },
        FailurePolicyRule {
            action: FailureAction::FailJob,
            on_exit_codes: Some(vec![ExitCodeRange { from, to: Some(to) }]),
            ..Default::default()
        },
    ]
}

impl FailurePolicyRule {
    fn matches(&self, f: &WorkerFailure) -> bool {
        if let Some(ranges) = &self.on_exit_codes {
            return f
                .exit_code
                .is_some_and(|c| ranges.iter().any(|r| r.contains(c)));
        }
        if let Some(reasons) = &self.on_reasons {
            return f
                .reason
                .as_ref()
                .is_some_and(|r| reasons.iter().any(|x| x == r));
        }
        if let Some(conds) = &self.on_pod_conditions {
            return f.pod_conditions.iter().any(|c| conds.contains(c));
        }
        if let Some(lost) = self.on_node_lost {
            return f.node_lost == lost;
        }
        false
    }
}

/// Classifies one failure: first matching rule, else a counted gang restart.
pub fn classify(policy: Option<&FailurePolicy>, f: &WorkerFailure) -> Verdict {
    let defaults;
    let rules = match policy {
        Some(p) if !p.rules.is_empty() => &p.rules,
        _ => {
            defaults = default_rules();
            &defaults
        }
    };
    let found = rules.iter().enumerate().find(|(_, r)| r.matches(f));
    Verdict {
        action: found.map(|(_, r)| r.action).unwrap_or_default(),
        rule: found.map(|(i, _)| i),
        message: describe(f),
    }
}

/// Why a gang's failures end the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailCause {
    /// The failure policy says the failure cannot be retried.
    Permanent,
    /// The counted restarts reached `runPolicy.backoffLimit`.
    BackoffLimitExceeded,
}

impl FailCause {
    /// The condition reason the job's status and events carry.
    pub fn reason(self) -> &'static str {
        match self {
            FailCause::Permanent => crate::conditions::reason::PERMANENT_FAILURE,
            FailCause::BackoffLimitExceeded => crate::conditions::reason::BACKOFF_LIMIT_EXCEEDED,
        }
    }
}

/// What a gang does after workers of its current attempt failed: the same verdict for the
/// operator's pods and `radfm run`'s processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GangVerdict {
    /// Delete every worker and start the next attempt from the last checkpoint.
    Restart {
        /// Whether the restart counts against `runPolicy.backoffLimit`.
        counted: bool,
        /// The deciding failure, described.
        message: String,
    },
    /// The job fails.
    Fail {
        /// Why.
        cause: FailCause,
        /// The deciding failure and the rule that ended the job.
        message: String,
    },
}

/// The harshest action wins; of equally harsh ones, the lowest rank's.
fn severity(a: FailureAction) -> u8 {
    match a {
        FailureAction::FailJob => 2,
        FailureAction::RestartGang => 1,
        FailureAction::RestartGangNotCounted => 0,
    }
}

/// The gang's verdict on `failures` (any order) given the restarts already counted, or None when
/// nothing failed. Every failure is classified by `policy`; the harshest verdict decides, ties
/// going to the lowest rank.
pub fn gang_verdict(
    policy: Option<&FailurePolicy>,
    failures: &[WorkerFailure],
    counted_restarts: i32,
    backoff_limit: i32,
) -> Option<GangVerdict> {
    let (_, worst) = failures
        .iter()
        .map(|f| (f.rank, classify(policy, f)))
        .max_by_key(|(rank, v)| (severity(v.action), std::cmp::Reverse(*rank)))?;
    let message = worst.message;
    Some(match worst.action {
        FailureAction::FailJob => GangVerdict::Fail {
            cause: FailCause::Permanent,
            message: format!("{message}: the failure policy says this cannot be retried"),
        },
        FailureAction::RestartGang if counted_restarts >= backoff_limit => GangVerdict::Fail {
            cause: FailCause::BackoffLimitExceeded,
            message: format!("{message}; backoffLimit={backoff_limit} counted restarts exhausted"),
        },
        action => GangVerdict::Restart {
            counted: action == FailureAction::RestartGang,
            message,
        },
    })
}

/// "worker 3 exited with code 64 (InvalidConfig)", "worker 1 lost its node", ...
pub fn describe(f: &WorkerFailure) -> String {
    let mut s = format!("worker {}", f.rank);
    if f.node_lost {
        s.push_str(" lost its node");
    } else if let Some(c) = f.exit_code {
        s.push_str(&format!(" exited with code {c} ({})", crate::exit::name(c)));
    } else {
        s.push_str(" failed");
    }
    if let Some(r) = &f.reason {
        s.push_str(&format!(", reason {r}"));
    }
    if !f.pod_conditions.is_empty() {
        s.push_str(&format!(", conditions {}", f.pod_conditions.join(",")));
    }
    if let Some(m) = &f.termination_message {
        s.push_str(&format!(": {m}"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit(code: i32) -> WorkerFailure {
        WorkerFailure {
            rank: 1,
            exit_code: Some(code),
            ..Default::default()
        }
    }

    #[test]
    fn default_policy_follows_the_exit_code_table() {
        let cases = [
            (exit(64), FailureAction::FailJob),
            (exit(66), FailureAction::FailJob),
            (exit(75), FailureAction::RestartGang),
            (exit(76), FailureAction::RestartGang),
            (exit(137), FailureAction::RestartGang),
            (exit(1), FailureAction::RestartGang),
            (
                WorkerFailure {
                    node_lost: true,
                    exit_code: Some(64),
                    ..Default::default()
                },
                FailureAction::RestartGangNotCounted,
            ),
            (
                WorkerFailure {
                    pod_conditions: vec!["DisruptionTarget".into()],
                    ..Default::default()
                },
                FailureAction::RestartGangNotCounted,
            ),
            (
                WorkerFailure {
                    reason: Some("Evicted".into()),
                    ..Default::default()
                },
                FailureAction::RestartGangNotCounted,
            ),
        ];
        for (f, want) in cases {
            assert_eq!(classify(None, &f).action, want, "{f:?}");
            assert_eq!(crate::exit::class(64), crate::exit::ExitClass::Permanent);
        }
    }

    #[test]
    fn first_matching_user_rule_wins_and_unmatched_failures_restart_counted() {
        let policy = FailurePolicy {
            rules: vec![
                FailurePolicyRule {
                    action: FailureAction::FailJob,
                    on_reasons: Some(vec!["OOMKilled".into()]),
                    ..Default::default()
                },
                FailurePolicyRule {
                    action: FailureAction::RestartGangNotCounted,
                    on_exit_codes: Some(vec![ExitCodeRange {
                        from: 137,
                        to: None,
                    }]),
                    ..Default::default()
                },
            ],
        };
        let oom = WorkerFailure {
            exit_code: Some(137),
            reason: Some("OOMKilled".into()),
            ..Default::default()
        };
        assert_eq!(classify(Some(&policy), &oom).action, FailureAction::FailJob);
        assert_eq!(classify(Some(&policy), &oom).rule, Some(0));
        assert_eq!(
            classify(Some(&policy), &exit(137)).action,
            FailureAction::RestartGangNotCounted
        );
        let v = classify(Some(&policy), &exit(64));
        assert_eq!((v.action, v.rule), (FailureAction::RestartGang, None));
        assert_eq!(v.message, "worker 1 exited with code 64 (InvalidConfig)");
    }

    #[test]
    fn a_failure_quotes_the_last_line_the_trainer_wrote() {
        let f = WorkerFailure {
            termination_message: last_line(
                "radfm-trainer: starting\nradfm-trainer: dataset: s3://b/c: builder error\n\n",
            ),
            ..exit(64)
        };
        assert_eq!(
            describe(&f),
            "worker 1 exited with code 64 (InvalidConfig): radfm-trainer: dataset: s3://b/c: builder error"
        );
        let long = "x".repeat(5000);
        assert_eq!(last_line(&long).unwrap().len(), MESSAGE_LIMIT);
        assert_eq!(last_line(" \n \n"), None);
    }

    fn failed(rank: i32, code: i32) -> WorkerFailure {
        WorkerFailure {
            rank,
            exit_code: Some(code),
            ..Default::default()
        }
    }

    #[test]
    fn the_gang_takes_the_harshest_verdict_and_of_equals_the_lowest_ranks() {
        use FailCause::*;
        let lost = |rank| WorkerFailure {
            rank,
            node_lost: true,
            ..Default::default()
        };
        let restart = |counted, m: &str| {
            Some(GangVerdict::Restart {
                counted,
                message: m.into(),
            })
        };
        let fail = |cause, m: &str| {
            Some(GangVerdict::Fail {
                cause,
                message: m.into(),
            })
        };
        let cases: Vec<(Vec<WorkerFailure>, i32, Option<GangVerdict>)> = vec![
            (vec![], 0, None),
            (
                vec![failed(1, 76)],
                0,
                restart(true, "worker 1 exited with code 76 (PeerLost)"),
            ),
            (vec![lost(2)], 3, restart(false, "worker 2 lost its node")),
            (
                vec![lost(0), failed(3, 76)],
                0,
                restart(true, "worker 3 exited with code 76 (PeerLost)"),
            ),
            (
                vec![failed(11, 76), failed(2, 77)],
                0,
                restart(true, "worker 2 exited with code 77 (Terminated)"),
            ),
            (
                vec![failed(1, 76), failed(3, 64)],
                0,
                fail(
                    Permanent,
                    "worker 3 exited with code 64 (InvalidConfig): the failure policy says this cannot be retried",
                ),
            ),
            (
                vec![failed(1, 76)],
                2,
                fail(
                    BackoffLimitExceeded,
                    "worker 1 exited with code 76 (PeerLost); backoffLimit=2 counted restarts exhausted",
                ),
            ),
            (vec![lost(1)], 2, restart(false, "worker 1 lost its node")),
        ];
        for (failures, counted, want) in cases {
            assert_eq!(
                gang_verdict(None, &failures, counted, 2),
                want,
                "{failures:?}"
            );
        }
    }
}
