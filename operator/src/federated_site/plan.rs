//! The decision core of the FederatedSite controller: the newest global model the hub published
//! (checked against the hub's key), whether this site's update of that round is in, the round's
//! local TrainingJob and pods → what to create and delete and the new status.
//!
//! A round at a site is three steps: a fetch pod copies the hub's model into the site's
//! workspace (checking the hub's signature and the digest), a local TrainingJob trains it on the
//! site's shards for the hub's number of steps, and a contribute pod signs and uploads the
//! bounded update. The site always works on the newest round: when the hub moves on, the
//! unfinished round is dropped. A failed pod is retried up to [`MAX_STEP_FAILURES`] times; a failed
//! local job (after its own restarts) gives the round up.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use kube::{Resource, ResourceExt};
use radfm_api::conditions::{Stamp, ValidationConditionType as Cond, federated_reason as why};
use radfm_api::federated::{FederatedSite, FederatedSiteStatus, SiteContribution, SitePhase};
use radfm_api::health;
use radfm_api::trainingjob::{Phase, ScheduleWindow, TrainingJob};
use radfm_federated::contribution::Contribution;
use radfm_federated::exchange::GlobalStatement;

use crate::effects::PlannedEvent;
use crate::federated_training::plan::ExchangeError;
use crate::federated_training::pods::count_failure;
use crate::federated_training::pods::{FederatePod, SecretEnv};
use crate::federated_training::pods::{LABEL_FEDERATION_OWNER, LABEL_ROUND, MAX_STEP_FAILURES};
use crate::training_job::workers::PodPhase;
use radfm_api::federated::EXCHANGE_ENV_PREFIX;

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
    if plan.status.failures.unwrap_or(0) >= MAX_STEP_FAILURES {
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
            plan.status.failures = Some(MAX_STEP_FAILURES);
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
            let (_, message) = count_failure(existing, &mut plan.status.failures);
            plan.events
                .push(PlannedEvent::warning(why::POD_FAILED, message.clone()));
            StepState::Busy(message)
        }
        phase => StepState::Busy(format!("pod {name} is {phase:?}")),
    }
}

fn owner(fs: &FederatedSite) -> OwnerReference {
    fs.controller_owner_ref(&()).unwrap_or_default()
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
        store_settings: s.exchange.credentials_secret_ref.as_ref().map(|_| {
            radfm_data::store::settings_entry(&[s.exchange.uri.as_str()], EXCHANGE_ENV_PREFIX)
        }),
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
/// model, for the hub's number of steps, at this round's place in one learning-rate schedule
/// over every round (warm-up once, cosine decay across the federation).
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
    spec.training.schedule = Some(ScheduleWindow::of_round(
        round.into(),
        global.last_round.into(),
        global.local_steps as i64,
    ));
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

#[cfg(test)]
mod tests {
    use super::*;
    use radfm_federated::contribution::FORMAT;
    use radfm_federated::exchange::GLOBAL_FORMAT;

    const HUB: &str = "dd00000000000000000000000000000000000000000000000000000000000000";

    fn site(status: Option<FederatedSiteStatus>) -> FederatedSite {
        let yaml = format!(
            "apiVersion: radfm.io/v1alpha1
kind: FederatedSite
metadata: {{name: north, namespace: site, uid: uid-fs, generation: 1}}
spec:
  federation: hub/cxr
  site: north
  hubPublicKey: {HUB}
  exchange: {{uri: s3://exchange/cxr, credentialsSecretRef: {{name: exchange-store}}}}
  signingKeySecretRef: {{name: north-key}}
  dataset: {{uri: s3://north/cxr, credentialsSecretRef: {{name: north-store}}}}
  workspace: s3://north/federated/
  jobTemplate:
    image: radfm/trainer:dev
    labels: {{kueue.x-k8s.io/queue-name: site-gpus}}
    workers: {{replicas: 1, gpusPerWorker: 1}}
    training: {{batchSizePerDevice: 32, epochs: 4}}
    checkpoint: {{uri: s3://ignored/ckpt, everySteps: 10}}
  image: radfm/trainer:dev
"
        );
        let mut fs: FederatedSite = serde_yaml_ng::from_str(&yaml).unwrap();
        fs.status = status;
        fs
    }

    fn global(round: u32) -> GlobalStatement {
        GlobalStatement {
            format: GLOBAL_FORMAT.into(),
            federation: "hub/cxr".into(),
            round,
            digest: format!("sha256:{round}"),
            previous: None,
            last_round: 3,
            local_steps: 40,
            norm_bound: 10.0,
        }
    }

    fn mine(round: u32) -> Contribution {
        Contribution {
            format: FORMAT.into(),
            federation: "hub/cxr".into(),
            site: "north".into(),
            round,
            base_digest: format!("sha256:{round}"),
            update_digest: "sha256:u".into(),
            samples: 1280,
            steps: 40,
            dataset_index_digest: "sha256:i".into(),
            local_loss: 0.3,
        }
    }

    fn pod(name: &str, round: u32, phase: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {LABEL_ROUND: round.to_string()}},
            "status": {"phase": phase}
        }))
        .unwrap()
    }

    fn job(phase: Option<Phase>) -> TrainingJob {
        let mut j = local_job(&site(None), &global(2));
        j.status = phase.map(|phase| radfm_api::TrainingJobStatus {
            phase: Some(phase),
            ..Default::default()
        });
        j
    }

    fn run(
        fs: &FederatedSite,
        newest: Option<GlobalStatement>,
        contributed: Option<Contribution>,
        job: Option<TrainingJob>,
        pods: Vec<Pod>,
    ) -> Plan {
        plan(
            fs,
            &Observed {
                exchange: Ok(SiteView {
                    newest,
                    mine: contributed,
                }),
                job,
                pods,
                now: Timestamp::from_second(1_000_000).unwrap(),
            },
        )
    }

    fn ready(p: &Plan) -> (&str, &str) {
        let c = p
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        (c.status.as_str(), c.reason.as_str())
    }

    /// (the round's job, pods, the pod created, a job created, the phase)
    type Case = (
        Option<TrainingJob>,
        Vec<Pod>,
        Option<&'static str>,
        bool,
        SitePhase,
    );

    #[test]
    fn a_round_at_a_site_is_fetch_then_local_training_then_contribute() {
        let fetched = || pod("north-r2-fetch", 2, "Succeeded");
        // (job, pods, pod created, job created, phase)
        let cases: Vec<Case> = vec![
            (
                None,
                vec![],
                Some("north-r2-fetch"),
                false,
                SitePhase::Fetching,
            ),
            (
                None,
                vec![pod("north-r2-fetch", 2, "Running")],
                None,
                false,
                SitePhase::Fetching,
            ),
            (None, vec![fetched()], None, true, SitePhase::Training),
            (
                Some(job(None)),
                vec![fetched()],
                None,
                false,
                SitePhase::Training,
            ),
            (
                Some(job(Some(Phase::Running))),
                vec![fetched()],
                None,
                false,
                SitePhase::Training,
            ),
            (
                Some(job(Some(Phase::Succeeded))),
                vec![fetched()],
                Some("north-r2-contribute"),
                false,
                SitePhase::Contributing,
            ),
        ];
        for (i, (job, pods, pod, creates_job, phase)) in cases.into_iter().enumerate() {
            let p = run(&site(None), Some(global(2)), None, job, pods);
            assert_eq!(
                p.create_pod.as_ref().map(|p| p.name_any()),
                pod.map(String::from),
                "{i}"
            );
            assert_eq!(p.create_job.is_some(), creates_job, "{i}");
            assert_eq!(p.status.phase, Some(phase), "{i}");
            assert_eq!(ready(&p).0, "True", "{i}");
            assert!(
                p.delete_pods.is_empty(),
                "{i}: the fetch pod stays: {:?}",
                p.delete_pods
            );
            assert_eq!(p.requeue_after, Duration::from_secs(5), "{i}");
        }
    }

    #[test]
    fn the_fetch_pod_gets_the_exchange_settings_prefixed_and_no_key_the_contribute_pod_the_key() {
        let fetch = run(&site(None), Some(global(2)), None, None, vec![]);
        let spec = fetch.create_pod.unwrap().spec.unwrap();
        let c = &spec.containers[0];
        let env_from: Vec<(Option<&str>, &str)> = c
            .env_from
            .iter()
            .flatten()
            .map(|e| {
                (
                    e.prefix.as_deref(),
                    e.secret_ref.as_ref().unwrap().name.as_str(),
                )
            })
            .collect();
        assert_eq!(
            env_from,
            [
                (None, "north-store"),
                (Some("RADFM_EXCHANGE_"), "exchange-store")
            ]
        );
        assert!(spec.volumes.is_none(), "fetching signs nothing");
        let settings = c
            .env
            .iter()
            .flatten()
            .find(|e| e.name == "RADFM_STORE_SETTINGS");
        assert_eq!(
            settings.and_then(|e| e.value.as_deref()),
            Some("s3://exchange/cxr=RADFM_EXCHANGE_"),
            "the exchange's URI takes the prefixed settings"
        );
        let args = c.args.as_ref().unwrap().join(" ");
        assert!(
            args.ends_with(&format!(
                "--round 2 --hub-key {HUB} --out s3://north/federated/rounds/00002/global.safetensors"
            )),
            "{args}"
        );
        let contribute = run(
            &site(None),
            Some(global(2)),
            None,
            Some(job(Some(Phase::Succeeded))),
            vec![pod("north-r2-fetch", 2, "Succeeded")],
        );
        let spec = contribute.create_pod.unwrap().spec.unwrap();
        let args = spec.containers[0].args.as_ref().unwrap().join(" ");
        assert!(
            args.contains(
                "--site north --local s3://north/federated/rounds/00002/checkpoints --precision f32"
            ),
            "{args}"
        );
        let key = spec.volumes.unwrap()[0].secret.clone().unwrap();
        assert_eq!(key.secret_name.as_deref(), Some("north-key"));
    }

    #[test]
    fn the_local_job_trains_the_hubs_model_on_the_sites_shards_for_the_hubs_steps() {
        let j = job(None);
        assert_eq!(j.name_any(), "north-r2");
        let s = &j.spec;
        assert_eq!(
            s.model.init_from.as_deref(),
            Some("s3://north/federated/rounds/00002/global.safetensors")
        );
        assert_eq!((s.training.steps, s.training.epochs), (Some(40), None));
        assert_eq!(
            s.training.schedule,
            Some(ScheduleWindow {
                start_step: 40,
                total_steps: 120
            }),
            "round 2 of 3 takes steps 40 to 79 of one schedule"
        );
        assert_eq!(
            s.checkpoint.uri,
            "s3://north/federated/rounds/00002/checkpoints"
        );
        assert_eq!(s.dataset.uri, "s3://north/cxr");
        assert_eq!(s.dataset.shards, None, "every shard of the site");
        assert_eq!(s.export, None);
        assert_eq!(
            j.labels()
                .get("kueue.x-k8s.io/queue-name")
                .map(String::as_str),
            Some("site-gpus"),
            "the site's queue"
        );
    }

    #[test]
    fn a_failed_pod_is_retried_and_a_failed_local_job_gives_the_round_up() {
        let p = run(
            &site(None),
            Some(global(2)),
            None,
            None,
            vec![pod("north-r2-fetch", 2, "Failed")],
        );
        assert_eq!(p.status.failures, Some(1));
        assert_eq!(p.delete_pods, ["north-r2-fetch"]);
        let failed_job = run(
            &site(None),
            Some(global(2)),
            None,
            Some(job(Some(Phase::Failed))),
            vec![pod("north-r2-fetch", 2, "Succeeded")],
        );
        assert_eq!(ready(&failed_job), ("False", why::LOCAL_TRAINING_FAILED));
        assert!(failed_job.create_pod.is_none());
        let given_up = run(
            &site(Some(failed_job.status)),
            Some(global(2)),
            None,
            Some(job(Some(Phase::Failed))),
            vec![],
        );
        assert!(given_up.create_pod.is_none() && given_up.create_job.is_none());
        let stalled = given_up
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == "Stalled");
        assert_eq!(stalled.unwrap().status, "False", "the next round heals it");
        let next = run(
            &site(Some(given_up.status)),
            Some(global(3)),
            None,
            None,
            vec![],
        );
        assert_eq!(next.status.failures, None);
        assert_eq!(next.create_pod.unwrap().name_any(), "north-r3-fetch");
    }

    #[test]
    fn an_upload_in_the_exchange_ends_the_round_and_the_hubs_result_ends_the_federation() {
        let p = run(
            &site(None),
            Some(global(2)),
            Some(mine(2)),
            Some(job(Some(Phase::Succeeded))),
            vec![
                pod("north-r2-fetch", 2, "Succeeded"),
                pod("north-r2-contribute", 2, "Succeeded"),
                pod("north-r1-contribute", 1, "Running"),
            ],
        );
        assert_eq!(p.status.phase, Some(SitePhase::Waiting));
        assert_eq!(ready(&p), ("True", why::CONTRIBUTED));
        assert_eq!(p.status.contributions[0].samples, 1280);
        assert_eq!(p.events[0].reason, why::CONTRIBUTED);
        assert_eq!(p.delete_pods.len(), 3);
        assert_eq!(p.requeue_after, Duration::from_secs(60));
        let again = run(
            &site(Some(p.status)),
            Some(global(2)),
            Some(mine(2)),
            None,
            vec![],
        );
        assert_eq!(again.status.contributions.len(), 1, "recorded once");
        assert!(again.events.is_empty());
        let done = run(
            &site(Some(again.status)),
            Some(global(4)),
            None,
            None,
            vec![],
        );
        assert_eq!(done.status.phase, Some(SitePhase::Finished));
        assert_eq!(ready(&done), ("True", why::FINISHED));
        assert!(done.create_pod.is_none());
    }

    #[test]
    fn before_round_one_the_site_waits_and_an_unreadable_exchange_is_retried() {
        let p = run(&site(None), None, None, None, vec![]);
        assert_eq!(p.status.phase, Some(SitePhase::Waiting));
        assert_eq!(ready(&p), ("True", why::WAITING));
        let e = plan(
            &site(None),
            &Observed {
                exchange: Err(ExchangeError {
                    reason: why::EXCHANGE_UNAVAILABLE,
                    message: "exchange: refused".into(),
                }),
                job: None,
                pods: vec![],
                now: Timestamp::from_second(1).unwrap(),
            },
        );
        assert_eq!(ready(&e), ("False", why::EXCHANGE_UNAVAILABLE));
        let reconciling = e
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == "Reconciling");
        assert_eq!(reconciling.unwrap().status, "True");
    }
}
