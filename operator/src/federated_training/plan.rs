//! The decision core of the FederatedTraining controller: what the exchange shows (the newest
//! published round, which sites uploaded to it, the hub's records of closed rounds) and this
//! federation's pods → the pod to create, the pods to delete, the new status.
//!
//! A round closes as soon as every listed site uploaded, or at its deadline with at least
//! `minSites`; below that the federation fails. Publish and aggregate steps run in pods that
//! hold the hub's key; a failed pod is retried up to [`MAX_POD_FAILURES`] times (the steps are
//! idempotent: the exchange is create-only and a round's record is final).

use std::collections::BTreeSet;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use kube::{Resource, ResourceExt};
use radfm_api::conditions::{Stamp, federated_reason as why};
use radfm_api::federated::{
    AdmittedContribution, FederatedPhase, FederatedRoundStatus, FederatedTraining,
    FederatedTrainingStatus, RejectedContribution,
};
use radfm_api::health;
use radfm_federated::exchange::RoundRecord;

use super::pods::{FederatePod, SecretEnv, termination_message};
use crate::effects::PlannedEvent;
use crate::training_job::workers::PodPhase;

/// Failed pods of one step before the federation fails.
pub const MAX_POD_FAILURES: u32 = 3;

/// What the exchange shows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExchangeView {
    /// The newest round whose global model is published, with its digest.
    pub published: Option<(u32, String)>,
    /// Sites whose update of that round is in.
    pub uploaded: BTreeSet<String>,
    /// The hub's records of closed rounds the status lacks.
    pub records: Vec<RoundRecord>,
}

/// Why the exchange could not be read.
#[derive(Debug, Clone, PartialEq)]
pub struct ExchangeError {
    /// The condition reason (InvalidSpec when the exchange is not allowed).
    pub reason: &'static str,
    /// What went wrong.
    pub message: String,
}

/// What the controller saw for one FederatedTraining.
#[derive(Debug, Clone)]
pub struct Observed {
    /// The exchange, or why it could not be read.
    pub exchange: Result<ExchangeView, ExchangeError>,
    /// This federation's pods.
    pub pods: Vec<Pod>,
    /// The current time.
    pub now: Timestamp,
}

/// What the controller must do.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Pods to delete.
    pub delete_pods: Vec<String>,
    /// The pod to create.
    pub create_pod: Option<Pod>,
    /// The status to write.
    pub status: FederatedTrainingStatus,
    /// Events to record after the status write.
    pub events: Vec<PlannedEvent>,
    /// When to look again (None: nothing more happens on its own).
    pub requeue_after: Option<Duration>,
}

/// The step in progress: its pod's name and what it does.
struct Step {
    pod: Pod,
    phase: FederatedPhase,
}

/// Decides what to do for `ft`.
pub fn plan(ft: &FederatedTraining, obs: &Observed) -> Plan {
    let stamp = Stamp {
        generation: ft.metadata.generation,
        now: Time(obs.now),
    };
    let mut status = ft.status.clone().unwrap_or_default();
    status.observed_generation = ft.metadata.generation;
    let mut plan = Plan {
        delete_pods: Vec::new(),
        create_pod: None,
        status,
        events: Vec::new(),
        requeue_after: None,
    };
    let (reason, message) = match (&obs.exchange, plan.status.phase) {
        (_, Some(phase)) if phase.is_finished() => finished(&mut plan, &obs.pods),
        (Err(e), _) => {
            plan.requeue_after = Some(Duration::from_secs(30));
            (e.reason, e.message.clone())
        }
        (Ok(view), _) => {
            record_rounds(&mut plan, &view.records);
            advance(ft, view, obs, &mut plan)
        }
    };
    let health = health::of_federated_training(plan.status.phase, reason, &message);
    health.write(&mut plan.status.conditions, &stamp);
    plan
}

/// A finished federation keeps its status; finished pods go.
fn finished(plan: &mut Plan, pods: &[Pod]) -> (&'static str, String) {
    plan.delete_pods = finished_pods(pods, None);
    match plan.status.phase {
        Some(FederatedPhase::Succeeded) => (
            why::SUCCEEDED,
            format!(
                "{} rounds closed; result {}",
                plan.status.rounds.len(),
                plan.status.result_digest.as_deref().unwrap_or("?")
            ),
        ),
        _ => {
            let failed = plan.status.conditions.iter().find(|c| c.type_ == "Stalled");
            failed.map_or((why::RETRIES_EXHAUSTED, "failed".into()), |c| {
                (reason_const(&c.reason), c.message.clone())
            })
        }
    }
}

/// The reason constant named `text` (a finished status keeps the reason it failed with).
fn reason_const(text: &str) -> &'static str {
    [why::TOO_FEW_SITES, why::RETRIES_EXHAUSTED]
        .into_iter()
        .find(|r| *r == text)
        .unwrap_or(why::RETRIES_EXHAUSTED)
}

/// Finished pods other than `keep`.
fn finished_pods(pods: &[Pod], keep: Option<&str>) -> Vec<String> {
    pods.iter()
        .filter(|p| PodPhase::of(p).is_finished() && Some(p.name_any().as_str()) != keep)
        .map(|p| p.name_any())
        .collect()
}

/// Adds the records of newly closed rounds to the status, with an event per round and per
/// refused contribution.
fn record_rounds(plan: &mut Plan, records: &[RoundRecord]) {
    for r in records {
        if plan.status.rounds.iter().any(|s| s.round == r.round) {
            continue;
        }
        let sites: Vec<&str> = r.admitted.iter().map(|a| a.site.as_str()).collect();
        plan.events.push(PlannedEvent::normal(
            why::ROUND_CLOSED,
            format!(
                "round {} closed with {} ({}); next model {}",
                r.round,
                sites.join(", "),
                r.aggregator,
                short(&r.next_digest)
            ),
        ));
        for x in &r.rejected {
            plan.events.push(PlannedEvent::warning(
                why::CONTRIBUTION_REJECTED,
                format!("round {}: {} refused: {}", r.round, x.site, x.message),
            ));
        }
        plan.status.rounds.push(round_status(r));
    }
    plan.status.rounds.sort_by_key(|r| r.round);
}

fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(12)]
}

fn round_status(r: &RoundRecord) -> FederatedRoundStatus {
    FederatedRoundStatus {
        round: r.round,
        global_digest: r.base_digest.clone(),
        admitted: r
            .admitted
            .iter()
            .map(|a| AdmittedContribution {
                site: a.site.clone(),
                samples: a.samples,
                norm: a.norm,
                update_digest: a.update_digest.clone(),
            })
            .collect(),
        rejected: r
            .rejected
            .iter()
            .map(|x| RejectedContribution {
                site: x.site.clone(),
                reason: x.reason.clone(),
                message: x.message.clone(),
            })
            .collect(),
        next_digest: r.next_digest.clone(),
        epsilon: r.privacy.map(|p| p.epsilon),
    }
}

/// Moves the federation on from what the exchange shows.
fn advance(
    ft: &FederatedTraining,
    view: &ExchangeView,
    obs: &Observed,
    plan: &mut Plan,
) -> (&'static str, String) {
    let Some((round, digest)) = &view.published else {
        return run_step(publish_step(ft), &obs.pods, plan);
    };
    let round = *round;
    if plan.status.round != Some(round) {
        plan.status.round = Some(round);
        plan.status.round_started_at = Some(Time(obs.now));
        plan.status.pod_failures = None;
        if round <= ft.spec.rounds {
            plan.events.push(PlannedEvent::normal(
                why::ROUND_OPENED,
                format!("round {round} opened with model {}", short(digest)),
            ));
        }
    }
    if round > ft.spec.rounds {
        plan.status.round = Some(ft.spec.rounds);
        plan.status.phase = Some(FederatedPhase::Succeeded);
        plan.status.result_digest = Some(digest.clone());
        plan.status.sites = None;
        plan.delete_pods = finished_pods(&obs.pods, None);
        plan.events.push(PlannedEvent::normal(
            why::SUCCEEDED,
            format!("{} rounds closed; result {}", ft.spec.rounds, short(digest)),
        ));
        return (
            why::SUCCEEDED,
            format!("{} rounds closed; result {}", ft.spec.rounds, digest),
        );
    }
    training_round(ft, round, view, obs, plan)
}

/// Round `round` is open: close it when every site is in or at its deadline.
fn training_round(
    ft: &FederatedTraining,
    round: u32,
    view: &ExchangeView,
    obs: &Observed,
    plan: &mut Plan,
) -> (&'static str, String) {
    let listed: BTreeSet<&str> = ft.spec.sites.iter().map(|s| s.name.as_str()).collect();
    let uploaded = view
        .uploaded
        .iter()
        .filter(|s| listed.contains(s.as_str()))
        .count();
    plan.status.sites = Some(format!("{uploaded}/{}", listed.len()));
    let started = plan
        .status
        .round_started_at
        .as_ref()
        .map_or(obs.now, |t| t.0);
    let deadline = started + SignedDuration::from_secs(ft.spec.round_deadline_seconds);
    let past_deadline = obs.now >= deadline;
    let min_sites = ft.spec.min_sites as usize;
    if uploaded == listed.len() || (past_deadline && uploaded >= min_sites) {
        return run_step(aggregate_step(ft, round), &obs.pods, plan);
    }
    if past_deadline {
        let message = format!(
            "round {round} reached its deadline with {uploaded} of {} sites; minSites is {min_sites}",
            listed.len()
        );
        plan.status.phase = Some(FederatedPhase::Failed);
        plan.events
            .push(PlannedEvent::warning(why::TOO_FEW_SITES, message.clone()));
        return (why::TOO_FEW_SITES, message);
    }
    plan.status.phase = Some(FederatedPhase::Training);
    plan.delete_pods = finished_pods(&obs.pods, None);
    let left = deadline.duration_since(obs.now).unsigned_abs();
    plan.requeue_after = Some(left.min(Duration::from_secs(10)));
    (
        why::TRAINING,
        format!(
            "round {round} of {}: {uploaded} of {} sites uploaded; deadline {deadline}",
            ft.spec.rounds,
            listed.len()
        ),
    )
}

/// Runs `step`'s pod: create it, wait for it, retry it when it failed.
fn run_step(step: Step, pods: &[Pod], plan: &mut Plan) -> (&'static str, String) {
    let name = step.pod.name_any();
    plan.status.phase = Some(step.phase);
    plan.delete_pods = finished_pods(pods, Some(&name));
    plan.requeue_after = Some(Duration::from_secs(5));
    let reason = match step.phase {
        FederatedPhase::Publishing => why::PUBLISHING,
        _ => why::AGGREGATING,
    };
    let Some(pod) = pods.iter().find(|p| p.name_any() == name) else {
        plan.create_pod = Some(step.pod);
        return (reason, format!("pod {name} created"));
    };
    if PodPhase::of(pod) != PodPhase::Failed {
        return (reason, format!("pod {name} is {:?}", PodPhase::of(pod)));
    }
    let failures = plan.status.pod_failures.unwrap_or(0) + 1;
    plan.status.pod_failures = Some(failures);
    plan.delete_pods.push(name.clone());
    let detail = termination_message(pod).unwrap_or_else(|| "no message".into());
    let message = format!("pod {name} failed ({failures} of {MAX_POD_FAILURES}): {detail}");
    if failures >= MAX_POD_FAILURES {
        plan.status.phase = Some(FederatedPhase::Failed);
        plan.events.push(PlannedEvent::warning(
            why::RETRIES_EXHAUSTED,
            message.clone(),
        ));
        return (why::RETRIES_EXHAUSTED, message);
    }
    plan.events
        .push(PlannedEvent::warning(why::POD_FAILED, message.clone()));
    (reason, message)
}

fn owner(ft: &FederatedTraining) -> OwnerReference {
    OwnerReference {
        api_version: FederatedTraining::api_version(&()).to_string(),
        kind: FederatedTraining::kind(&()).to_string(),
        name: ft.name_any(),
        uid: ft.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// The federation's name in the exchange and in every signed statement.
pub fn federation(ft: &FederatedTraining) -> String {
    format!("{}/{}", ft.namespace().unwrap_or_default(), ft.name_any())
}

/// `--exchange`, `--federation` and the schedule every hub step passes.
fn common_args(ft: &FederatedTraining) -> Vec<String> {
    let s = &ft.spec;
    [
        "--exchange",
        &s.exchange.uri,
        "--federation",
        &federation(ft),
        "--last-round",
        &s.rounds.to_string(),
        "--local-steps",
        &s.local_steps.to_string(),
        "--norm-bound",
        &s.norm_bound.to_string(),
    ]
    .map(String::from)
    .to_vec()
}

fn hub_pod(ft: &FederatedTraining, name: String, round: u32, args: Vec<String>) -> Pod {
    let env_from = ft
        .spec
        .exchange
        .credentials_secret_ref
        .iter()
        .map(|secret| SecretEnv {
            secret,
            prefix: None,
        })
        .collect();
    FederatePod {
        name,
        namespace: ft.namespace(),
        owner: owner(ft),
        round,
        image: &ft.spec.image,
        args,
        key: Some(&ft.spec.signing_key_secret_ref),
        env_from,
    }
    .build()
}

fn publish_step(ft: &FederatedTraining) -> Step {
    let mut args = vec!["federate".to_string(), "publish".into()];
    args.extend(common_args(ft));
    args.extend(["--round".into(), "1".into()]);
    args.extend(["--model".into(), ft.spec.base_model.clone()]);
    Step {
        pod: hub_pod(ft, format!("{}-publish", ft.name_any()), 1, args),
        phase: FederatedPhase::Publishing,
    }
}

fn aggregate_step(ft: &FederatedTraining, round: u32) -> Step {
    let s = &ft.spec;
    let mut args = vec!["federate".to_string(), "aggregate".into()];
    args.extend(common_args(ft));
    args.extend([
        "--round".into(),
        round.to_string(),
        "--min-sites".into(),
        s.min_sites.to_string(),
        "--aggregator".into(),
        s.aggregator.cli_name(),
        "--precision".into(),
        s.precision.cli_name().into(),
    ]);
    for site in &s.sites {
        args.extend([
            "--site".into(),
            format!("{}={}", site.name, site.public_key),
        ]);
    }
    if let Some(dp) = &s.differential_privacy {
        args.extend([
            "--dp-clip".into(),
            dp.clip.to_string(),
            "--dp-noise-multiplier".into(),
            dp.noise_multiplier.to_string(),
            "--dp-delta".into(),
            dp.delta.to_string(),
        ]);
    }
    Step {
        pod: hub_pod(
            ft,
            format!("{}-r{round}-aggregate", ft.name_any()),
            round,
            args,
        ),
        phase: FederatedPhase::Aggregating,
    }
}
