//! The ContinualTraining controller: the thin layer around [`schedule`]'s decisions.
//!
//! One pass: observe the runs (TrainingJobs labelled with this resource), register every
//! successful run that is not registered yet (idempotent through the job uid recorded in the
//! version), prune history, then evaluate the schedule and, when due and justified by new data,
//! create the next run. The status is written once by server-side apply, events after it.
//!
//! Registration and the watermark form one logical step: the registry version (create-only,
//! carrying the job uid) is the commit point, and the status is derived from it. A crash between
//! the two is repaired by the next pass, which finds the version by the job's uid instead of
//! registering a second one.

pub mod schedule;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use radfm_api::conditions::{
    self, ConditionType, ContinualConditionType as Cond, continual_reason,
};
use radfm_api::continual::{
    ANNOTATION_BASE_VERSION, ANNOTATION_SCHEDULED, ANNOTATION_WINDOW, ConcurrencyPolicy,
    LABEL_CONTINUAL, RunWindow,
};
use radfm_api::{ContinualTraining, ContinualTrainingStatus, TrainingJob};
use radfm_registry::Registry;
use tracing::{info, instrument, warn};

use crate::continual_training::schedule::{
    self as continual, Concurrency, Decision, Due, Finished, Inputs, Schedule,
};
use crate::effects::{self, PlannedEvent};
use crate::training_job::FIELD_MANAGER;
use crate::{Error, Result};

/// Annotation on a run once its model is registered: the version number.
pub const ANNOTATION_REGISTERED: &str = "radfm.io/registered-version";

/// The controller's notion of now.
#[derive(Clone)]
pub enum Clock {
    /// The wall clock.
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

    /// How long to wait before looking again when nothing is due before `until`.
    fn requeue(&self, now: Timestamp, until: Option<Timestamp>) -> Duration {
        match self {
            // A file clock can jump at any moment.
            Clock::File(_) => Duration::from_secs(1),
            Clock::Wall => until
                .map(|u| u.duration_since(now).as_secs().max(1) as u64)
                .map_or(Duration::from_secs(3600), |s| {
                    Duration::from_secs(s.min(3600))
                }),
        }
    }
}

/// Shared state of the ContinualTraining reconciler.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Event recorder.
    pub recorder: Recorder,
    /// Clock.
    pub clock: Clock,
}

/// One run of a ContinualTraining, as observed.
struct Run {
    job: TrainingJob,
    name: String,
    state: RunState,
}

#[derive(PartialEq)]
enum RunState {
    Active,
    Succeeded,
    Failed,
}

fn run_state(job: &TrainingJob) -> RunState {
    let conds = job
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    if conditions::is_true(conds, ConditionType::Succeeded) {
        RunState::Succeeded
    } else if conditions::is_true(conds, ConditionType::Failed) {
        RunState::Failed
    } else {
        RunState::Active
    }
}

fn finished_at(job: &TrainingJob) -> Timestamp {
    job.status
        .as_ref()
        .and_then(|s| s.completion_time.as_ref())
        .map(|t| t.0)
        .or_else(|| job.metadata.creation_timestamp.as_ref().map(|t| t.0))
        .unwrap_or(Timestamp::UNIX_EPOCH)
}

fn annotation<'a>(job: &'a TrainingJob, key: &str) -> Option<&'a str> {
    job.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

/// The data window recorded on a run (empty when the annotation is missing or unreadable).
fn run_window(job: &TrainingJob) -> RunWindow {
    annotation(job, ANNOTATION_WINDOW)
        .and_then(|w| serde_json::from_str(w).ok())
        .unwrap_or_default()
}

/// Reconciles one ContinualTraining.
#[instrument(skip_all, fields(ct = %ct.name_any(), namespace = ct.namespace().unwrap_or_default()))]
pub async fn reconcile(ct: Arc<ContinualTraining>, ctx: Arc<Context>) -> Result<Action> {
    if ct.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = ct
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let name = ct.name_any();
    let now = ctx.clock.now();
    let now_t = Time(now);
    let generation = ct.metadata.generation;
    let mut status = ct.status.clone().unwrap_or_default();
    status.observed_generation = generation;
    let mut events: Vec<PlannedEvent> = Vec::new();
    let jobs: Api<TrainingJob> = Api::namespaced(ctx.client.clone(), &ns);
    let cts: Api<ContinualTraining> = Api::namespaced(ctx.client.clone(), &ns);

    let spec_checked = (|| {
        let schedule = Schedule::parse(&ct.spec.schedule, ct.spec.time_zone.as_deref())?;
        let max_interval = ct
            .spec
            .trigger
            .max_interval
            .as_deref()
            .map(|d| continual::parse_go_duration(d, "spec.trigger.maxInterval"))
            .transpose()?;
        Ok::<_, Error>((schedule, max_interval))
    })();
    let (schedule, max_interval) = match spec_checked {
        Ok(v) => v,
        Err(e) => {
            conditions::set(
                &mut status.conditions,
                Cond::Ready,
                false,
                continual_reason::INVALID_SPEC,
                &e.to_string(),
                generation,
                &now_t,
            );
            events.push(PlannedEvent {
                warning: true,
                reason: continual_reason::INVALID_SPEC,
                note: e.to_string(),
            });
            finish(&cts, &ct, &status, &events, &ctx).await?;
            return Ok(Action::await_change());
        }
    };

    // Observe the runs this resource owns.
    let uid = ct.uid().unwrap_or_default();
    let runs: Vec<Run> = effects::list_owned(&jobs, &format!("{LABEL_CONTINUAL}={name}"), &uid)
        .await?
        .into_iter()
        .map(|job| Run {
            name: job.name_any(),
            state: run_state(&job),
            job,
        })
        .collect();

    // Register successful runs that are not registered yet.
    let mut store_error: Option<String> = None;
    for run in runs.iter().filter(|r| {
        r.state == RunState::Succeeded && annotation(&r.job, ANNOTATION_REGISTERED).is_none()
    }) {
        match register_run(&ct, &run.job).await {
            Ok((version, fresh)) => {
                if let Some(w) = run_window(&run.job).next_watermark {
                    status.data_watermark = Some(status.data_watermark.unwrap_or(-1).max(w as i64));
                }
                if status
                    .last_registered_version
                    .is_none_or(|v| v < version as i64)
                {
                    status.last_registered_version = Some(version as i64);
                    status.last_successful_time = Some(Time(finished_at(&run.job)));
                }
                if fresh {
                    events.push(PlannedEvent {
                        warning: false,
                        reason: continual_reason::REGISTERED,
                        note: format!(
                            "run {} registered as {} v{version} ({}); data watermark {}",
                            run.name,
                            ct.spec.register.model,
                            ct.spec.register.alias,
                            status
                                .data_watermark
                                .map_or("none".into(), |w| w.to_string())
                        ),
                    });
                }
                let patch = serde_json::json!({"metadata": {"annotations": {ANNOTATION_REGISTERED: version.to_string()}}});
                jobs.patch(&run.name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
            }
            Err(e) => {
                warn!(run = %run.name, error = %e, "registering the run's model");
                events.push(PlannedEvent {
                    warning: true,
                    reason: continual_reason::REGISTER_FAILED,
                    note: format!("run {}: {e}", run.name),
                });
                store_error = Some(format!("registering run {}: {e}", run.name));
            }
        }
    }
    // History: registered successes and failures beyond the limits.
    let finished: Vec<Finished> = runs
        .iter()
        .filter(|r| match r.state {
            RunState::Succeeded => annotation(&r.job, ANNOTATION_REGISTERED).is_some(),
            RunState::Failed => true,
            RunState::Active => false,
        })
        .map(|r| Finished {
            name: r.name.clone(),
            at: finished_at(&r.job),
            succeeded: r.state == RunState::Succeeded,
        })
        .collect();
    for old in continual::prune(
        &finished,
        ct.spec.successful_jobs_history_limit.max(0) as usize,
        ct.spec.failed_jobs_history_limit.max(0) as usize,
    ) {
        info!(run = %old, "pruning run history");
        tolerate_missing(jobs.delete(&old, &DeleteParams::background()).await)?;
    }
    let mut active: Vec<String> = runs
        .iter()
        .filter(|r| r.state == RunState::Active)
        .map(|r| r.name.clone())
        .collect();

    // The schedule.
    let mut requeue_until = None;
    if ct.spec.suspend {
        status.next_schedule_time = None;
        conditions::set(
            &mut status.conditions,
            Cond::Ready,
            true,
            continual_reason::SUSPENDED,
            "spec.suspend is true: no new runs",
            generation,
            &now_t,
        );
    } else {
        let last_handled = status
            .last_schedule_time
            .as_ref()
            .map(|t| t.0)
            .or_else(|| ct.metadata.creation_timestamp.as_ref().map(|t| t.0))
            .unwrap_or(now);
        match continual::due(
            &schedule,
            last_handled,
            now,
            ct.spec.starting_deadline_seconds,
        ) {
            Due::NotYet { next } => {
                status.next_schedule_time = next.map(Time);
                requeue_until = next;
            }
            Due::TooLate { scheduled } => {
                status.last_schedule_time = Some(Time(scheduled));
                events.push(PlannedEvent {
                    warning: true,
                    reason: continual_reason::MISSED_DEADLINE,
                    note: format!(
                        "the run scheduled at {scheduled} is past startingDeadlineSeconds; skipped"
                    ),
                });
            }
            Due::Fire { scheduled, missed } => {
                if missed > 0 {
                    info!(%scheduled, missed, "missed scheduled times skipped (no catch-up)");
                }
                match evaluate(&ct, scheduled, now, &status, max_interval, &active).await {
                    Ok(Evaluation::NoNewData { new }) => {
                        status.last_schedule_time = Some(Time(scheduled));
                        let msg = format!(
                            "{new} new shard(s) after watermark {}; trigger needs {}{}",
                            status
                                .data_watermark
                                .map_or("none".into(), |w| w.to_string()),
                            ct.spec.trigger.min_new_shards,
                            ct.spec
                                .trigger
                                .max_interval
                                .as_ref()
                                .map_or(String::new(), |m| format!(" (or at least 1 after {m})"))
                        );
                        conditions::set(
                            &mut status.conditions,
                            Cond::DataReady,
                            false,
                            continual_reason::NO_NEW_DATA,
                            &msg,
                            generation,
                            &now_t,
                        );
                        events.push(PlannedEvent {
                            warning: false,
                            reason: continual_reason::NO_NEW_DATA,
                            note: format!("scheduled {scheduled}: no run; {msg}"),
                        });
                    }
                    Ok(Evaluation::SkipActive) => {
                        status.last_schedule_time = Some(Time(scheduled));
                        events.push(PlannedEvent {
                            warning: false,
                            reason: continual_reason::SKIPPED_ACTIVE,
                            note: format!(
                                "scheduled {scheduled}: concurrencyPolicy Forbid and {} active",
                                active.join(", ")
                            ),
                        });
                    }
                    Ok(Evaluation::Run {
                        job,
                        replace,
                        summary,
                    }) => {
                        for old in &replace {
                            tolerate_missing(jobs.delete(old, &DeleteParams::background()).await)?;
                            events.push(PlannedEvent {
                                warning: false,
                                reason: continual_reason::RUN_REPLACED,
                                note: format!(
                                    "deleted active run {old} (concurrencyPolicy Replace)"
                                ),
                            });
                        }
                        active.retain(|a| !replace.contains(a));
                        let run = job.name_any();
                        let pp = PostParams {
                            field_manager: Some(FIELD_MANAGER.into()),
                            ..Default::default()
                        };
                        match jobs.create(&pp, &job).await {
                            Ok(_) => {
                                info!(%run, %scheduled, "created run");
                                events.push(PlannedEvent {
                                    warning: false,
                                    reason: continual_reason::RUN_CREATED,
                                    note: format!("created run {run} for {scheduled}: {summary}"),
                                });
                            }
                            // Created by an earlier pass (an operator restarted at the firing
                            // instant): the deterministic name makes this a no-op.
                            Err(kube::Error::Api(s)) if s.code == 409 => {
                                info!(%run, "run already exists");
                            }
                            Err(e) => return Err(e.into()),
                        }
                        if !active.contains(&run) {
                            active.push(run);
                        }
                        status.last_schedule_time = Some(Time(scheduled));
                        conditions::set(
                            &mut status.conditions,
                            Cond::DataReady,
                            true,
                            continual_reason::NEW_DATA,
                            &summary,
                            generation,
                            &now_t,
                        );
                    }
                    Err(e) => {
                        let reason = match &e {
                            EvalError::BaseMissing(_) => continual_reason::BASE_MODEL_MISSING,
                            EvalError::Store(_) => continual_reason::STORE_UNAVAILABLE,
                        };
                        events.push(PlannedEvent {
                            warning: true,
                            reason,
                            note: e.to_string(),
                        });
                        store_error = Some(e.to_string());
                    }
                }
                let after = status
                    .last_schedule_time
                    .as_ref()
                    .map_or(now, |t| t.0)
                    .max(now);
                let next = schedule.next_after(after);
                status.next_schedule_time = next.map(Time);
                requeue_until = next;
            }
        }
        match &store_error {
            Some(e) => conditions::set(
                &mut status.conditions,
                Cond::Ready,
                false,
                continual_reason::STORE_UNAVAILABLE,
                e,
                generation,
                &now_t,
            ),
            None => conditions::set(
                &mut status.conditions,
                Cond::Ready,
                true,
                continual_reason::SCHEDULING,
                &format!(
                    "schedule {:?} ({}); next {}",
                    ct.spec.schedule,
                    ct.spec.time_zone.as_deref().unwrap_or("UTC"),
                    status
                        .next_schedule_time
                        .as_ref()
                        .map_or("none".into(), |t| t.0.to_string())
                ),
                generation,
                &now_t,
            ),
        };
    }
    active.sort();
    status.active_count = active.len() as i32;
    conditions::set(
        &mut status.conditions,
        Cond::Active,
        !active.is_empty(),
        if active.is_empty() {
            continual_reason::IDLE
        } else {
            continual_reason::RUNNING
        },
        &if active.is_empty() {
            "no run in progress".to_string()
        } else {
            format!("running: {}", active.join(", "))
        },
        generation,
        &now_t,
    );
    status.active = active;
    finish(&cts, &ct, &status, &events, &ctx).await?;
    if store_error.is_some() {
        return Ok(Action::requeue(Duration::from_secs(10)));
    }
    Ok(Action::requeue(ctx.clock.requeue(now, requeue_until)))
}

fn tolerate_missing<T>(r: std::result::Result<T, kube::Error>) -> Result<()> {
    match r {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Why a due evaluation could not decide.
#[derive(Debug, thiserror::Error)]
enum EvalError {
    #[error("{0}")]
    BaseMissing(String),
    #[error("{0}")]
    Store(String),
}

enum Evaluation {
    NoNewData {
        new: usize,
    },
    SkipActive,
    Run {
        job: Box<TrainingJob>,
        replace: Vec<String>,
        summary: String,
    },
}

/// Reads the dataset index, decides, and builds the run (with its base model) when one is due.
async fn evaluate(
    ct: &ContinualTraining,
    scheduled: Timestamp,
    now: Timestamp,
    status: &ContinualTrainingStatus,
    max_interval: Option<i64>,
    active: &[String],
) -> std::result::Result<Evaluation, EvalError> {
    let spec = &ct.spec;
    let loc = radfm_data::store::Location::open(&spec.dataset.uri)
        .map_err(|e| EvalError::Store(format!("spec.dataset.uri: {e}")))?;
    let index = radfm_data::DatasetIndex::load(&loc)
        .await
        .map_err(|e| EvalError::Store(format!("dataset index: {e}")))?;
    let shards: Vec<u64> = index.shards.iter().map(|s| s.seq).collect();
    let decision = continual::decide(&Inputs {
        scheduled,
        shards: &shards,
        watermark: status.data_watermark.map(|w| w as u64),
        replay: spec.replay,
        min_new_shards: spec.trigger.min_new_shards.max(1) as u64,
        since_last_success_secs: status
            .last_successful_time
            .as_ref()
            .map(|t| now.duration_since(t.0).as_secs()),
        max_interval_secs: max_interval,
        policy: match spec.concurrency_policy {
            ConcurrencyPolicy::Allow => Concurrency::Allow,
            ConcurrencyPolicy::Forbid => Concurrency::Forbid,
            ConcurrencyPolicy::Replace => Concurrency::Replace,
        },
        active,
    });
    let (window, replace) = match decision {
        Decision::NoNewData { new } => return Ok(Evaluation::NoNewData { new }),
        Decision::SkipActive => return Ok(Evaluation::SkipActive),
        Decision::Run { window, replace } => (window, replace),
    };
    let (init_from, base_version) = base_model(ct, status).await?;
    let mut selected: Vec<u64> = window.new.iter().chain(&window.replay).copied().collect();
    selected.sort_unstable();
    let run = continual::run_name(&ct.name_any(), scheduled);
    let summary = format!(
        "{} new shard(s) {}, {} replayed, from {}",
        window.new.len(),
        radfm_api::trainingjob::format_shards(&window.new),
        window.replay.len(),
        base_version
            .as_ref()
            .map_or("random initialisation".to_string(), |(m, v)| format!(
                "{m} v{v}"
            ))
    );
    let record = RunWindow {
        new: window.new.clone(),
        replay: window.replay.clone(),
        next_watermark: window.next_watermark,
    };
    let mut annotations = BTreeMap::from([
        (ANNOTATION_SCHEDULED.to_string(), scheduled.to_string()),
        (
            ANNOTATION_WINDOW.to_string(),
            serde_json::to_string(&record).map_err(|e| EvalError::Store(e.to_string()))?,
        ),
    ]);
    if let Some((m, v)) = &base_version {
        annotations.insert(ANNOTATION_BASE_VERSION.to_string(), format!("{m}:{v}"));
    }
    let mut labels = spec.job_template.labels.clone().unwrap_or_default();
    labels.insert(LABEL_CONTINUAL.to_string(), ct.name_any());
    let job = TrainingJob {
        metadata: ObjectMeta {
            name: Some(run.clone()),
            namespace: ct.namespace(),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: Some(vec![OwnerReference {
                api_version: ContinualTraining::api_version(&()).to_string(),
                kind: ContinualTraining::kind(&()).to_string(),
                name: ct.name_any(),
                uid: ct.uid().unwrap_or_default(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..Default::default()
        },
        spec: spec
            .job_template
            .job_spec(&run, &spec.dataset, &selected, init_from),
        status: None,
    };
    Ok(Evaluation::Run {
        job: Box::new(job),
        replace,
        summary,
    })
}

/// The exported folder and (model, version) a run starts from: the base model's alias, else the
/// version this resource registered last, else random initialisation.
async fn base_model(
    ct: &ContinualTraining,
    status: &ContinualTrainingStatus,
) -> std::result::Result<(Option<String>, Option<(String, u64)>), EvalError> {
    let store = |e: radfm_registry::Error| EvalError::Store(format!("registry: {e}"));
    let reg = Registry::open(&ct.spec.registry).map_err(store)?;
    let (model, version) = match &ct.spec.base_model {
        Some(base) => {
            if !reg.exists(&base.model).await.map_err(store)? {
                return Ok((None, None));
            }
            let v = match reg.resolve(&base.model, &base.alias).await {
                Ok(v) => v,
                Err(radfm_registry::Error::NotFound(m)) => {
                    return Err(EvalError::BaseMissing(format!("spec.baseModel: {m}")));
                }
                Err(e) => return Err(store(e)),
            };
            (base.model.clone(), v)
        }
        None => match status.last_registered_version {
            Some(v) => (ct.spec.register.model.clone(), v as u64),
            None => return Ok((None, None)),
        },
    };
    let found = reg.version(&model, version).await.map_err(store)?;
    let folder = found
        .spec
        .weights_uri
        .trim_end_matches(radfm_api::export_files::WEIGHTS)
        .trim_end_matches('/')
        .to_string();
    Ok((Some(folder), Some((model, version))))
}

/// Registers a successful run's export (or finds the version registered by an earlier pass).
/// Returns the version and whether it was registered now.
async fn register_run(ct: &ContinualTraining, job: &TrainingJob) -> Result<(u64, bool)> {
    let invalid = |field: &str, reason: String| Error::Invalid {
        field: format!("{}: {field}", job.name_any()),
        reason,
    };
    let reg_err = |e: radfm_registry::Error| invalid("registry", e.to_string());
    let reg = Registry::open(&ct.spec.registry).map_err(reg_err)?;
    let model = &ct.spec.register.model;
    let alias = &ct.spec.register.alias;
    let by = format!(
        "radfm-operator/{}/{}",
        ct.namespace().unwrap_or_default(),
        ct.name_any()
    );
    let uid = job.uid().unwrap_or_default();
    if let Some(v) = reg.find_by_job(model, &uid).await.map_err(reg_err)? {
        // Registered by a pass that stopped before recording it; make sure the alias moved too.
        let log = reg.events(model).await.map_err(reg_err)?;
        if !radfm_registry::alias_history(&log, alias)
            .iter()
            .any(|(_, to)| *to == v.version)
        {
            reg.move_alias(
                model,
                alias,
                v.version,
                None,
                &by,
                "completing an interrupted registration",
            )
            .await
            .map_err(reg_err)?;
        }
        return Ok((v.version, false));
    }
    let export = job
        .spec
        .export
        .as_ref()
        .ok_or_else(|| invalid("spec.export", "the run has no export folder".into()))?;
    let mut spec = radfm_registry::from_export(&export.uri)
        .await
        .map_err(reg_err)?;
    let window = run_window(job);
    let base = annotation(job, ANNOTATION_BASE_VERSION).and_then(|b| {
        let (m, v) = b.rsplit_once(':')?;
        Some((m.to_string(), v.parse::<u64>().ok()?))
    });
    spec.parent = base.as_ref().filter(|(m, _)| m == model).map(|(_, v)| *v);
    spec.job_name = Some(job.name_any());
    spec.job_uid = Some(uid);
    spec.data.replayed = window.replay.clone();
    let reason = format!(
        "continual training {}/{}: run {} scheduled {}; {} new shard(s) {}, {} replayed; from {}",
        ct.namespace().unwrap_or_default(),
        ct.name_any(),
        job.name_any(),
        annotation(job, ANNOTATION_SCHEDULED).unwrap_or("?"),
        window.new.len(),
        radfm_api::trainingjob::format_shards(&window.new),
        window.replay.len(),
        base.map_or("random initialisation".into(), |(m, v)| format!("{m} v{v}")),
    );
    let v = reg
        .register(model, spec, &by, &reason, Some(alias))
        .await
        .map_err(reg_err)?;
    Ok((v.version, true))
}

/// Writes the status (server-side apply, fixed field manager), then the events.
async fn finish(
    cts: &Api<ContinualTraining>,
    ct: &ContinualTraining,
    status: &ContinualTrainingStatus,
    events: &[PlannedEvent],
    ctx: &Context,
) -> Result<()> {
    effects::apply_status(cts, ct, ct.status.as_ref(), status).await?;
    effects::publish(&ctx.recorder, ct, "Schedule", events).await;
    Ok(())
}

/// Requeue policy after an error.
pub fn error_policy(_ct: Arc<ContinualTraining>, error: &Error, _ctx: Arc<Context>) -> Action {
    warn!(%error, "continual training reconcile failed");
    Action::requeue(Duration::from_secs(5))
}

/// Runs the ContinualTraining controller until `shutdown` resolves.
pub async fn run_controller(
    client: Client,
    instance: Option<String>,
    namespace: Option<String>,
    clock: Clock,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let cts: Api<ContinualTraining> = effects::scoped(&client, namespace.as_deref());
    let jobs: Api<TrainingJob> = effects::scoped(&client, namespace.as_deref());
    let reporter = Reporter {
        controller: FIELD_MANAGER.into(),
        instance,
    };
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client,
        clock,
    });
    Controller::new(cts, watcher::Config::default().any_semantic())
        .with_config(
            ControllerConfig::default()
                .debounce(Duration::from_millis(200))
                .concurrency(4),
        )
        .owns(jobs, watcher::Config::default().labels(LABEL_CONTINUAL))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                warn!(error = %e, "continual training controller");
            }
        })
        .await;
}
