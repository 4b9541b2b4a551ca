//! The decision core of the FederatedSite controller: the newest global model the hub published
//! (checked against the hub's key), whether this site's update of that round is in, the round's
//! local TrainingJob and pods → what to create and delete and the new status.
//!
//! A round at a site is three steps: a fetch pod copies the hub's model into the site's
//! workspace (checking the hub's signature and the digest), a local TrainingJob trains it on the
//! site's shards for the hub's number of steps, and a contribute pod signs and uploads the
//! bounded update. The site always works on the newest round: when the hub moves on, the
//! unfinished round is dropped. A failed pod is retried up to [`MAX_FAILURES`] times; a failed
//! local job (after its own restarts) gives the round up.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use kube::{Resource, ResourceExt};
use radfm_api::conditions::{Stamp, ValidationConditionType as Cond, federated_reason as why};
use radfm_api::federated::{FederatedSite, FederatedSiteStatus, SiteContribution, SitePhase};
use radfm_api::health;
use radfm_api::trainingjob::{Phase, TrainingJob};
use radfm_federated::contribution::Contribution;
use radfm_federated::exchange::GlobalStatement;

use crate::effects::PlannedEvent;
use crate::federated_training::plan::ExchangeError;
use crate::federated_training::pods::{EXCHANGE_ENV_PREFIX, FederatePod, SecretEnv};
use crate::federated_training::pods::{LABEL_FEDERATION_OWNER, LABEL_ROUND, termination_message};
use crate::training_job::workers::PodPhase;

/// Failed pods of one round before the site gives the round up.
pub const MAX_FAILURES: u32 = 3;

/// What the exchange shows this site.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SiteView {
    /// The newest global model the hub published, its signature checked.
    pub newest: Option<GlobalStatement>,
    /// This site's contribution to that round, if it is in.
    pub mine: Option<Contribution>,
}

/// What the controller saw for one FederatedSite.
#[derive(Debug, Clone)]
pub struct Observed {
    /// The exchange, or why it could not be read.
    pub exchange: Result<SiteView, ExchangeError>,
    /// The local TrainingJob of the newest round, if it exists.
    pub job: Option<TrainingJob>,
    /// This site's pods.
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
    /// The local TrainingJob to create.
    pub create_job: Option<TrainingJob>,
    /// The status to write.
    pub status: FederatedSiteStatus,
    /// Events to record after the status write.
    pub events: Vec<PlannedEvent>,
    /// When to look again.
    pub requeue_after: Duration,
}

/// Decides what to do for `fs`.
pub fn plan(fs: &FederatedSite, obs: &Observed) -> Plan {
    let stamp = Stamp {
        generation: fs.metadata.generation,
        now: Time(obs.now),
    };
    let mut status = fs.status.clone().unwrap_or_default();
    status.observed_generation = fs.metadata.generation;
    status.last_poll_time = Some(stamp.now.clone());
    let mut plan = Plan {
        delete_pods: Vec::new(),
        create_pod: None,
        create_job: None,
        status,
        events: Vec::new(),
        requeue_after: Duration::from_secs(fs.spec.poll_interval_seconds.max(5) as u64),
    };
    let (ready, reason, message) = match &obs.exchange {
        Err(e) => (false, e.reason, e.message.clone()),
        Ok(view) => {
            let (reason, message) = follow(fs, view, obs, &mut plan);
            (reason != why::LOCAL_TRAINING_FAILED, reason, message)
        }
    };
    let conditions = &mut plan.status.conditions;
    stamp.set(conditions, Cond::Ready, ready, reason, &message);
    health::follow_ready(conditions, &stamp);
    if matches!(
        plan.status.phase,
        Some(SitePhase::Fetching | SitePhase::Training | SitePhase::Contributing)
    ) {
        plan.requeue_after = plan.requeue_after.min(Duration::from_secs(5));
    }
    plan
}

/// Follows the hub to its newest round.
fn follow(
    fs: &FederatedSite,
    view: &SiteView,
    obs: &Observed,
    plan: &mut Plan,
) -> (&'static str, String) {
    let Some(global) = &view.newest else {
        plan.status.phase = Some(SitePhase::Waiting);
        return (
            why::WAITING,
            "the hub has published no global model yet".into(),
        );
    };
    let round = global.round;
    if plan.status.round != Some(round) {
        plan.status.round = Some(round);
        plan.status.failures = None;
    }
    let this_round = round.to_string();
    plan.delete_pods = obs
        .pods
        .iter()
        .filter(|p| {
            p.labels().get(LABEL_ROUND) != Some(&this_round) || PodPhase::of(p).is_finished()
        })
        .map(|p| p.name_any())
        .collect();
    if !global.opens_training() {
        plan.status.phase = Some(SitePhase::Finished);
        return (
            why::FINISHED,
            format!(
                "the hub published the federation's result ({})",
                global.digest
            ),
        );
    }
    if let Some(c) = &view.mine {
        record(c, plan);
        plan.status.phase = Some(SitePhase::Waiting);
        return (
            why::CONTRIBUTED,
            format!("update of round {round} is in; waiting for the hub's next model"),
        );
    }
    if plan.status.failures.unwrap_or(0) >= MAX_FAILURES {
        plan.status.phase = Some(SitePhase::Waiting);
        return (
            why::LOCAL_TRAINING_FAILED,
            format!("round {round} was given up; waiting for the hub's next model"),
        );
    }
    work(fs, global, obs, plan)
}

/// Records this site's contribution in the status (once).
fn record(c: &Contribution, plan: &mut Plan) {
    if plan.status.contributions.iter().any(|x| x.round == c.round) {
        return;
    }
    plan.events.push(PlannedEvent::normal(
        why::CONTRIBUTED,
        format!(
            "round {}: update of {} samples, {} steps uploaded",
            c.round, c.samples, c.steps
        ),
    ));
    plan.status.contributions.push(SiteContribution {
        round: c.round,
        base_digest: c.base_digest.clone(),
        update_digest: c.update_digest.clone(),
        samples: c.samples,
        steps: c.steps,
        local_loss: c.local_loss,
    });
}

/// The round's next step: fetch, train, contribute.
fn work(
    fs: &FederatedSite,
    global: &GlobalStatement,
    obs: &Observed,
    plan: &mut Plan,
) -> (&'static str, String) {
    let round = global.round;
    let fetch = fetch_pod(fs, round);
    match step(fetch, &obs.pods, plan) {
        StepState::Done => {}
        StepState::Busy(message) => {
            plan.status.phase = Some(SitePhase::Fetching);
            return (why::FETCHING, message);
        }
    }
    match obs.job.as_ref().and_then(|j| j.status.as_ref()?.phase) {
        None if obs.job.is_none() => {
            plan.create_job = Some(local_job(fs, global));
            plan.status.phase = Some(SitePhase::Training);
            return (why::TRAINING, format!("round {round}: local job created"));
        }
        Some(Phase::Succeeded) => {}
        Some(Phase::Failed) => {
            plan.status.failures = Some(MAX_FAILURES);
            plan.status.phase = Some(SitePhase::Waiting);
            let message = format!("round {round}: local job {} failed", job_name(fs, round));
            plan.events.push(PlannedEvent::warning(
                why::LOCAL_TRAINING_FAILED,
                message.clone(),
            ));
            return (why::LOCAL_TRAINING_FAILED, message);
        }
        phase => {
            plan.status.phase = Some(SitePhase::Training);
            return (
                why::TRAINING,
                format!("round {round}: local job is {phase:?}"),
            );
        }
    }
    let contribute = contribute_pod(fs, round);
    plan.status.phase = Some(SitePhase::Contributing);
    match step(contribute, &obs.pods, plan) {
        StepState::Busy(message) => (why::CONTRIBUTING, message),
        StepState::Done => (
            why::CONTRIBUTING,
            format!("round {round}: update uploaded; waiting to see it in the exchange"),
        ),
    }
}

/// Where a pod step is.
enum StepState {
    /// The pod succeeded.
    Done,
    /// It was created, runs, or failed and will be retried; what to say.
    Busy(String),
}

/// Runs a pod step: create its pod, wait for it, count and retry its failures.
fn step(pod: Pod, pods: &[Pod], plan: &mut Plan) -> StepState {
    let name = pod.name_any();
    let Some(existing) = pods.iter().find(|p| p.name_any() == name) else {
        plan.create_pod = Some(pod);
        return StepState::Busy(format!("pod {name} created"));
    };
    match PodPhase::of(existing) {
        PodPhase::Succeeded => {
            plan.delete_pods.retain(|p| p != &name);
            StepState::Done
        }
        PodPhase::Failed => {
            let failures = plan.status.failures.unwrap_or(0) + 1;
            plan.status.failures = Some(failures);
            let detail = termination_message(existing).unwrap_or_else(|| "no message".into());
            let message = format!("pod {name} failed ({failures} of {MAX_FAILURES}): {detail}");
            plan.events
                .push(PlannedEvent::warning(why::POD_FAILED, message.clone()));
            StepState::Busy(message)
        }
        phase => StepState::Busy(format!("pod {name} is {phase:?}")),
    }
}

fn owner(fs: &FederatedSite) -> OwnerReference {
    OwnerReference {
        api_version: FederatedSite::api_version(&()).to_string(),
        kind: FederatedSite::kind(&()).to_string(),
        name: fs.name_any(),
        uid: fs.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// The round's folder in the site's workspace.
fn round_folder(fs: &FederatedSite, round: u32) -> String {
    format!(
        "{}/rounds/{round:05}",
        fs.spec.workspace.trim_end_matches('/')
    )
}

/// Where the round's global model is copied to (the local job's initFrom).
pub fn global_copy(fs: &FederatedSite, round: u32) -> String {
    format!("{}/global.safetensors", round_folder(fs, round))
}

/// The local job's checkpoint folder (what the update is computed from).
pub fn checkpoints(fs: &FederatedSite, round: u32) -> String {
    format!("{}/checkpoints", round_folder(fs, round))
}

/// The local TrainingJob of `round`.
pub fn job_name(fs: &FederatedSite, round: u32) -> String {
    format!("{}-r{round}", fs.name_any())
}

/// `--exchange`, `--federation`, `--round` and `--hub-key` of the site's steps.
fn common_args(fs: &FederatedSite, step: &str, round: u32) -> Vec<String> {
    let s = &fs.spec;
    [
        "federate",
        step,
        "--exchange",
        &s.exchange.uri,
        "--federation",
        &s.federation,
        "--round",
        &round.to_string(),
        "--hub-key",
        &s.hub_public_key,
    ]
    .map(String::from)
    .to_vec()
}

fn site_pod(fs: &FederatedSite, step: &str, round: u32, args: Vec<String>, sign: bool) -> Pod {
    let s = &fs.spec;
    let site_store = s
        .dataset
        .credentials_secret_ref
        .iter()
        .map(|secret| SecretEnv {
            secret,
            prefix: None,
        });
    let exchange = s
        .exchange
        .credentials_secret_ref
        .iter()
        .map(|secret| SecretEnv {
            secret,
            prefix: Some(EXCHANGE_ENV_PREFIX),
        });
    FederatePod {
        name: format!("{}-r{round}-{step}", fs.name_any()),
        namespace: fs.namespace(),
        owner: owner(fs),
        round,
        image: &s.image,
        args,
        key: sign.then_some(&s.signing_key_secret_ref),
        env_from: site_store.chain(exchange).collect(),
    }
    .build()
}

/// The pod that copies the round's global model into the workspace, checked.
fn fetch_pod(fs: &FederatedSite, round: u32) -> Pod {
    let mut args = common_args(fs, "fetch", round);
    args.extend(["--out".into(), global_copy(fs, round)]);
    site_pod(fs, "fetch", round, args, false)
}

/// The pod that signs and uploads the round's update.
fn contribute_pod(fs: &FederatedSite, round: u32) -> Pod {
    let mut args = common_args(fs, "contribute", round);
    args.extend([
        "--site".into(),
        fs.spec.site.clone(),
        "--local".into(),
        checkpoints(fs, round),
        "--precision".into(),
        fs.spec.precision.cli_name().into(),
    ]);
    site_pod(fs, "contribute", round, args, true)
}

/// The round's local TrainingJob: the template on the site's shards, from the round's global
/// model, for the hub's number of steps.
pub fn local_job(fs: &FederatedSite, global: &GlobalStatement) -> TrainingJob {
    let round = global.round;
    let name = job_name(fs, round);
    let s = &fs.spec;
    let mut spec = s
        .job_template
        .job_spec(&name, &s.dataset, &[], Some(global_copy(fs, round)));
    spec.dataset = s.dataset.clone();
    spec.checkpoint.uri = checkpoints(fs, round);
    spec.export = None;
    spec.training.steps = Some(global.local_steps as i64);
    spec.training.epochs = None;
    let mut labels = s.job_template.labels.clone().unwrap_or_default();
    labels.insert(LABEL_FEDERATION_OWNER.into(), fs.name_any());
    labels.insert(LABEL_ROUND.into(), round.to_string());
    TrainingJob {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: fs.namespace(),
            labels: Some(labels),
            owner_references: Some(vec![owner(fs)]),
            ..Default::default()
        },
        spec,
        status: None,
    }
}
