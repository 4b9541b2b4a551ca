//! The decision core of the FederatedTraining controller: what the exchange shows (the newest
//! published round, which sites uploaded to it, the hub's records of closed rounds) and this
//! federation's pods → the pod to create, the pods to delete, the new status.
//!
//! A round closes as soon as every listed site uploaded, or at its deadline with at least
//! `minSites`; below that the federation fails. Publish and aggregate steps run in pods that
//! hold the hub's key; a failed pod is retried up to [`MAX_STEP_FAILURES`] times (the steps are
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

use super::pods::{FederatePod, MAX_STEP_FAILURES, SecretEnv, count_failure};
use crate::effects::PlannedEvent;
use crate::training_job::workers::PodPhase;

/// What the exchange shows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExchangeView {
    /// The newest round whose global model is published, with its digest.
    pub published: Option<(u32, String)>,
    /// Sites whose update of that round is in.
    pub uploaded: BTreeSet<String>,
    /// The hub's records of closed rounds the status lacks.
    pub records: Vec<RoundRecord>,
    /// Before round 1: the base model to publish (a URI, and the registered version it is).
    pub base: Option<(String, Option<u64>)>,
    /// After the last round: the version the result is registered as, once it is.
    pub registered: Option<u64>,
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
        let Some((uri, version)) = &view.base else {
            plan.status.phase = Some(FederatedPhase::Publishing);
            plan.requeue_after = Some(Duration::from_secs(30));
            return (why::PUBLISHING, "resolving the base model".into());
        };
        plan.status.base_version = *version;
        plan.status.base_uri = Some(uri.clone());
        return run_step(publish_step(ft, uri), &obs.pods, plan);
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
        plan.status.result_digest = Some(digest.clone());
        plan.status.sites = None;
        return finish(ft, view, &obs.pods, plan);
    }
    training_round(ft, round, view, obs, plan)
}

/// Every round is closed: register the result where asked, then succeed.
fn finish(
    ft: &FederatedTraining,
    view: &ExchangeView,
    pods: &[Pod],
    plan: &mut Plan,
) -> (&'static str, String) {
    let digest = plan.status.result_digest.clone().unwrap_or_default();
    if let Some(register) = &ft.spec.register {
        let Some(version) = view.registered else {
            return run_step(register_step(ft), pods, plan);
        };
        plan.status.registered_version = Some(version);
        plan.events.push(PlannedEvent::normal(
            why::REGISTERED,
            format!(
                "result registered as {} v{version} ({})",
                register.model, register.alias
            ),
        ));
    }
    plan.status.phase = Some(FederatedPhase::Succeeded);
    plan.delete_pods = finished_pods(pods, None);
    let registered = plan
        .status
        .registered_version
        .map_or(String::new(), |v| format!("; registered as v{v}"));
    let message = format!(
        "{} rounds closed; result {digest}{registered}",
        ft.spec.rounds
    );
    plan.events
        .push(PlannedEvent::normal(why::SUCCEEDED, message.clone()));
    (why::SUCCEEDED, message)
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
        FederatedPhase::Registering => why::REGISTERING,
        _ => why::AGGREGATING,
    };
    let Some(pod) = pods.iter().find(|p| p.name_any() == name) else {
        plan.create_pod = Some(step.pod);
        return (reason, format!("pod {name} created"));
    };
    if PodPhase::of(pod) != PodPhase::Failed {
        return (reason, format!("pod {name} is {:?}", PodPhase::of(pod)));
    }
    let (failures, message) = count_failure(pod, &mut plan.status.pod_failures);
    plan.delete_pods.push(name);
    if failures >= MAX_STEP_FAILURES {
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
    ft.controller_owner_ref(&()).unwrap_or_default()
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
        store_settings: None,
    }
    .build()
}

fn publish_step(ft: &FederatedTraining, base: &str) -> Step {
    let mut args = vec!["federate".to_string(), "publish".into()];
    args.extend(common_args(ft));
    args.extend(["--round".into(), "1".into()]);
    args.extend(["--model".into(), base.to_string()]);
    Step {
        pod: hub_pod(ft, format!("{}-publish", ft.name_any()), 1, args),
        phase: FederatedPhase::Publishing,
    }
}

/// Where the result's encoder is exported (beside the rounds, in the hub's exchange).
pub fn result_folder(ft: &FederatedTraining) -> String {
    format!("{}/result", ft.spec.exchange.uri.trim_end_matches('/'))
}

fn register_step(ft: &FederatedTraining) -> Step {
    let s = &ft.spec;
    let register = s.register.as_ref().expect("registering only where asked");
    let mut args = vec!["federate".to_string(), "register".into()];
    args.extend([
        "--exchange".into(),
        s.exchange.uri.clone(),
        "--federation".into(),
        federation(ft),
        "--last-round".into(),
        s.rounds.to_string(),
        "--base".into(),
        ft.status
            .as_ref()
            .and_then(|st| st.base_uri.clone())
            .unwrap_or_default(),
        "--out".into(),
        result_folder(ft),
        "--registry".into(),
        s.registry.clone().unwrap_or_default(),
        "--model".into(),
        register.model.clone(),
        "--alias".into(),
        register.alias.clone(),
    ]);
    if let Some(v) = ft.status.as_ref().and_then(|st| st.base_version) {
        args.extend(["--parent".into(), v.to_string()]);
    }
    let round = s.rounds;
    Step {
        pod: hub_pod(ft, format!("{}-register", ft.name_any()), round, args),
        phase: FederatedPhase::Registering,
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

#[cfg(test)]
mod tests {
    use super::*;
    use radfm_federated::exchange::{AdmittedRecord, PrivacySpent, RECORD_FORMAT, RejectedRecord};

    const KEY_A: &str = "aa00000000000000000000000000000000000000000000000000000000000000";
    const KEY_B: &str = "bb00000000000000000000000000000000000000000000000000000000000000";
    const KEY_C: &str = "cc00000000000000000000000000000000000000000000000000000000000000";

    fn federation() -> FederatedTraining {
        let yaml = format!(
            "apiVersion: radfm.io/v1alpha1
kind: FederatedTraining
metadata: {{name: cxr, namespace: hub, uid: uid-ft, generation: 1}}
spec:
  baseModel: {{registered: {{model: chest}}}}
  registry: s3://models/registry
  register: {{model: chest}}
  exchange: {{uri: s3://exchange/cxr, credentialsSecretRef: {{name: hub-store}}}}
  signingKeySecretRef: {{name: hub-key}}
  sites: [{{name: a, publicKey: {KEY_A}}}, {{name: b, publicKey: {KEY_B}}}, {{name: c, publicKey: {KEY_C}}}]
  rounds: 2
  localSteps: 50
  minSites: 2
  roundDeadlineSeconds: 600
  aggregator: {{kind: TrimmedMean, trimFraction: 0.2}}
  normBound: 10
  differentialPrivacy: {{clip: 5, noiseMultiplier: 0.8}}
  image: radfm/trainer:dev
"
        );
        serde_yaml_ng::from_str(&yaml).unwrap()
    }

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_000_000 + s).unwrap()
    }

    fn pod(name: &str, phase: &str, message: Option<&str>) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "status": {"phase": phase, "containerStatuses": [{
                "name": "federate", "image": "i", "imageID": "", "ready": false,
                "restartCount": 0,
                "state": {"terminated": {"exitCode": 1, "message": message}}}]}
        }))
        .unwrap()
    }

    fn open_round(round: u32, uploaded: &[&str]) -> ExchangeView {
        ExchangeView {
            published: Some((round, format!("sha256:{round}{round}{round}"))),
            uploaded: uploaded.iter().map(|s| s.to_string()).collect(),
            ..ExchangeView::default()
        }
    }

    /// `ft` with round `round` seen opened at `at(0)`.
    fn in_round(round: u32, failures: Option<u32>) -> FederatedTraining {
        let mut ft = federation();
        ft.status = Some(FederatedTrainingStatus {
            round: Some(round),
            round_started_at: Some(Time(at(0))),
            phase: Some(FederatedPhase::Training),
            pod_failures: failures,
            ..Default::default()
        });
        ft
    }

    fn run(ft: &FederatedTraining, view: ExchangeView, pods: Vec<Pod>, now: i64) -> Plan {
        plan(
            ft,
            &Observed {
                exchange: Ok(view),
                pods,
                now: at(now),
            },
        )
    }

    fn condition<'a>(plan: &'a Plan, ty: &str) -> (&'a str, &'a str) {
        let c = plan
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == ty)
            .unwrap();
        (c.status.as_str(), c.reason.as_str())
    }

    fn args(pod: &Pod) -> String {
        pod.spec.as_ref().unwrap().containers[0]
            .args
            .as_ref()
            .unwrap()
            .join(" ")
    }

    #[test]
    fn a_new_federation_publishes_round_one_from_the_base_model_in_a_pod_holding_the_hub_key() {
        let nothing_yet = run(&federation(), ExchangeView::default(), vec![], 0);
        assert!(
            nothing_yet.create_pod.is_none(),
            "the base model is not resolved yet"
        );
        let base = ExchangeView {
            base: Some(("s3://models/base-ckpt".into(), Some(4))),
            ..ExchangeView::default()
        };
        let p = run(&federation(), base, vec![], 0);
        assert_eq!(p.status.base_version, Some(4));
        let pod = p.create_pod.as_ref().unwrap();
        assert_eq!(pod.name_any(), "cxr-publish");
        let a = args(pod);
        for part in [
            "federate publish --exchange s3://exchange/cxr --federation hub/cxr",
            "--last-round 2 --local-steps 50 --norm-bound 10",
            "--round 1 --model s3://models/base-ckpt",
        ] {
            assert!(a.contains(part), "{a}");
        }
        let spec = pod.spec.as_ref().unwrap();
        let c = &spec.containers[0];
        assert_eq!(
            spec.volumes.as_ref().unwrap()[0]
                .secret
                .as_ref()
                .unwrap()
                .secret_name
                .as_deref(),
            Some("hub-key")
        );
        assert_eq!(c.env_from.as_ref().unwrap()[0].prefix, None);
        assert_eq!(spec.automount_service_account_token, Some(false));
        assert_eq!(p.status.phase, Some(FederatedPhase::Publishing));
        assert_eq!(condition(&p, "Reconciling"), ("True", why::PUBLISHING));
    }

    #[test]
    fn a_round_waits_for_its_sites_and_closes_when_all_are_in_or_at_its_deadline() {
        // (uploaded, seconds since the round opened, aggregates, phase, health reason)
        let cases: [(&[&str], i64, bool, FederatedPhase, &str); 6] = [
            (&[], 10, false, FederatedPhase::Training, why::TRAINING),
            (
                &["a", "b"],
                10,
                false,
                FederatedPhase::Training,
                why::TRAINING,
            ),
            (
                &["a", "b", "c"],
                10,
                true,
                FederatedPhase::Aggregating,
                why::AGGREGATING,
            ),
            (
                &["a", "b"],
                600,
                true,
                FederatedPhase::Aggregating,
                why::AGGREGATING,
            ),
            (
                &["a", "x"],
                600,
                false,
                FederatedPhase::Failed,
                why::TOO_FEW_SITES,
            ),
            (&[], 601, false, FederatedPhase::Failed, why::TOO_FEW_SITES),
        ];
        for (uploaded, now, aggregates, phase, reason) in cases {
            let p = run(&in_round(1, None), open_round(1, uploaded), vec![], now);
            let what = format!("{uploaded:?} at {now}s");
            assert_eq!(p.create_pod.is_some(), aggregates, "{what}");
            assert_eq!(p.status.phase, Some(phase), "{what}");
            let health = if phase == FederatedPhase::Failed {
                "Stalled"
            } else {
                "Reconciling"
            };
            assert_eq!(condition(&p, health), ("True", reason), "{what}");
        }
        let p = run(&in_round(1, None), open_round(1, &["a"]), vec![], 10);
        assert_eq!(p.status.sites.as_deref(), Some("1/3"));
        assert_eq!(p.requeue_after, Some(Duration::from_secs(10)));
        let close = run(&in_round(1, None), open_round(1, &["a"]), vec![], 595);
        assert_eq!(
            close.requeue_after,
            Some(Duration::from_secs(5)),
            "the deadline"
        );
        let failed = run(&in_round(1, None), open_round(1, &["a"]), vec![], 600);
        let stalled = failed
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == "Stalled");
        assert!(
            stalled
                .unwrap()
                .message
                .contains("1 of 3 sites; minSites is 2"),
            "{stalled:?}"
        );
    }

    #[test]
    fn the_aggregate_pod_lists_every_site_key_the_aggregator_and_the_privacy_settings() {
        let p = run(
            &in_round(2, None),
            open_round(2, &["a", "b", "c"]),
            vec![],
            5,
        );
        let pod = p.create_pod.unwrap();
        assert_eq!(pod.name_any(), "cxr-r2-aggregate");
        let a = args(&pod);
        for part in [
            "federate aggregate",
            "--round 2 --min-sites 2 --aggregator trimmed-mean:0.2 --precision f32",
            &format!("--site a={KEY_A} --site b={KEY_B} --site c={KEY_C}"),
            "--dp-clip 5 --dp-noise-multiplier 0.8 --dp-delta 0.00001",
        ] {
            assert!(a.contains(part), "{part}: {a}");
        }
    }

    #[test]
    fn a_failed_step_is_retried_twice_then_the_federation_fails_with_the_pods_message() {
        let failed = || {
            vec![pod(
                "cxr-r1-aggregate",
                "Failed",
                Some("Error: minSites: round 1 admitted 1 of at least 2 sites\n"),
            )]
        };
        let all_in = || open_round(1, &["a", "b", "c"]);
        let first = run(&in_round(1, None), all_in(), failed(), 5);
        assert_eq!(first.status.pod_failures, Some(1));
        assert_eq!(first.delete_pods, ["cxr-r1-aggregate"]);
        assert!(
            first.create_pod.is_none(),
            "recreated once the old one is gone"
        );
        assert_eq!(first.status.phase, Some(FederatedPhase::Aggregating));
        let again = run(&in_round(1, Some(1)), all_in(), vec![], 6);
        assert!(again.create_pod.is_some());
        let last = run(&in_round(1, Some(2)), all_in(), failed(), 7);
        assert_eq!(last.status.phase, Some(FederatedPhase::Failed));
        let stalled = last.status.conditions.iter().find(|c| c.type_ == "Stalled");
        let stalled = stalled.unwrap();
        assert_eq!(stalled.reason, why::RETRIES_EXHAUSTED);
        assert!(
            stalled.message.contains("admitted 1 of at least 2 sites"),
            "{}",
            stalled.message
        );
        // Finished is final: a later pass keeps the reason.
        let mut done = federation();
        done.status = Some(last.status);
        let later = run(&done, all_in(), failed(), 8);
        assert_eq!(later.status.phase, Some(FederatedPhase::Failed));
        assert_eq!(
            condition(&later, "Stalled"),
            ("True", why::RETRIES_EXHAUSTED)
        );
        assert_eq!(later.delete_pods, ["cxr-r1-aggregate"]);
    }

    #[test]
    fn closed_rounds_come_into_the_status_from_the_hubs_records_with_refusals_as_warnings() {
        let record = RoundRecord {
            format: RECORD_FORMAT.into(),
            federation: "hub/cxr".into(),
            round: 1,
            base_digest: "sha256:111".into(),
            aggregator: "trimmed-mean:0.2".into(),
            admitted: vec![AdmittedRecord {
                site: "a".into(),
                samples: 640,
                steps: 50,
                norm: 3.5,
                update_digest: "sha256:u".into(),
                dataset_index_digest: "sha256:i".into(),
                local_loss: 0.4,
            }],
            rejected: vec![RejectedRecord {
                site: "b".into(),
                reason: "NormTooLarge".into(),
                message: "update norm 99 is over the bound 10".into(),
            }],
            next_digest: "sha256:222".into(),
            privacy: Some(PrivacySpent {
                epsilon: 3.1,
                delta: 1e-5,
            }),
        };
        let mut view = open_round(2, &[]);
        view.records = vec![record];
        let finished_pod = pod("cxr-r1-aggregate", "Succeeded", None);
        let p = run(&in_round(1, None), view, vec![finished_pod], 700);
        assert_eq!(p.status.round, Some(2));
        assert_eq!(
            p.status.round_started_at,
            Some(Time(at(700))),
            "round 2's clock"
        );
        assert_eq!(p.status.phase, Some(FederatedPhase::Training));
        assert_eq!(p.delete_pods, ["cxr-r1-aggregate"]);
        let r = &p.status.rounds[0];
        assert_eq!(
            (r.round, r.admitted[0].samples, r.epsilon),
            (1, 640, Some(3.1))
        );
        assert_eq!(r.rejected[0].reason, "NormTooLarge");
        let reasons: Vec<&str> = p.events.iter().map(|e| e.reason).collect();
        assert_eq!(
            reasons,
            [
                why::ROUND_CLOSED,
                why::CONTRIBUTION_REJECTED,
                why::ROUND_OPENED
            ]
        );
    }

    #[test]
    fn the_model_after_the_last_round_is_registered_as_a_candidate_then_the_federation_succeeds() {
        let mut ft = in_round(2, None);
        let st = ft.status.as_mut().unwrap();
        st.base_uri = Some("s3://models/registry/models/chest/v4".into());
        st.base_version = Some(4);
        let p = run(&ft, open_round(3, &[]), vec![], 900);
        assert_eq!(p.status.phase, Some(FederatedPhase::Registering));
        assert_eq!(p.status.result_digest.as_deref(), Some("sha256:333"));
        let pod = p.create_pod.unwrap();
        assert_eq!(pod.name_any(), "cxr-register");
        let a = args(&pod);
        for part in [
            "federate register --exchange s3://exchange/cxr --federation hub/cxr --last-round 2",
            "--base s3://models/registry/models/chest/v4 --out s3://exchange/cxr/result",
            "--registry s3://models/registry --model chest --alias candidate --parent 4",
        ] {
            assert!(a.contains(part), "{part}: {a}");
        }
        let mut registered = open_round(3, &[]);
        registered.registered = Some(5);
        let p = run(&ft, registered, vec![], 901);
        assert_eq!(p.status.phase, Some(FederatedPhase::Succeeded));
        assert_eq!(p.status.round, Some(2));
        assert_eq!(p.status.registered_version, Some(5));
        assert_eq!(condition(&p, "Ready"), ("True", why::SUCCEEDED));
        assert_eq!(p.requeue_after, None);
        let reasons: Vec<&str> = p.events.iter().map(|e| e.reason).collect();
        assert_eq!(reasons, [why::REGISTERED, why::SUCCEEDED]);
    }

    #[test]
    fn an_exchange_that_is_not_allowed_stalls_and_one_that_does_not_answer_is_retried() {
        for (reason, health) in [
            (
                radfm_api::conditions::continual_reason::INVALID_SPEC,
                "Stalled",
            ),
            (why::EXCHANGE_UNAVAILABLE, "Reconciling"),
        ] {
            let p = plan(
                &federation(),
                &Observed {
                    exchange: Err(ExchangeError {
                        reason,
                        message: "exchange s3://exchange/cxr: no".into(),
                    }),
                    pods: vec![],
                    now: at(0),
                },
            );
            assert_eq!(condition(&p, health), ("True", reason));
            assert!(p.create_pod.is_none());
            assert_eq!(p.requeue_after, Some(Duration::from_secs(30)));
        }
    }
}
