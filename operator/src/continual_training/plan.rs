//! The decision core of the ContinualTraining controller: what was observed (the runs, the
//! registrations this pass made, the dataset index when a run is due) → a plan of runs to
//! create and delete and the new status.
//!
//! [`plan`] is pure (time is in [`Observed`]); [`super::schedule`] holds the cron, trigger,
//! concurrency and window rules it applies. The controller observes what [`due`] and
//! [`base_ref`] say the plan will need, and nothing more.

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use kube::{Resource, ResourceExt};
use radfm_api::conditions::{
    ConditionType, ContinualConditionType as Cond, Stamp, continual_reason,
};
use radfm_api::continual::{
    ANNOTATION_BASE_VERSION, ANNOTATION_SCHEDULED, ANNOTATION_TRIGGER, ANNOTATION_WINDOW,
    ConcurrencyPolicy, LABEL_CONTINUAL, RunTrigger, RunWindow, SiteDrift, TriggerKind,
};
use radfm_api::health;
use radfm_api::{ContinualTraining, ContinualTrainingStatus, TrainingJob, conditions};

use super::schedule::{
    self, Concurrency, Decision, DriftCount, Due, Finished, Inputs, Schedule, Window,
};
use crate::effects::PlannedEvent;
use crate::{Error, Result};

/// Annotation on a run once its model is registered: the version number.
pub const ANNOTATION_REGISTERED: &str = "radfm.io/registered-version";

/// The spec's schedule and trigger, parsed.
#[derive(Debug, Clone)]
pub struct Settings {
    /// spec.schedule in spec.timeZone.
    pub schedule: Schedule,
    /// spec.trigger.maxInterval in seconds.
    pub max_interval: Option<i64>,
}

/// Parses what the spec says in strings; an error names the field.
pub fn settings(ct: &ContinualTraining) -> Result<Settings> {
    let schedule = Schedule::parse(&ct.spec.schedule, ct.spec.time_zone.as_deref())?;
    let max_interval = ct
        .spec
        .trigger
        .max_interval
        .as_deref()
        .map(|d| schedule::parse_go_duration(d, "spec.trigger.maxInterval"))
        .transpose()?;
    Ok(Settings {
        schedule,
        max_interval,
    })
}

/// Where a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Neither Succeeded nor Failed.
    Active,
    /// The TrainingJob succeeded.
    Succeeded,
    /// The TrainingJob failed.
    Failed,
}

/// One run (a TrainingJob labelled with this resource and controlled by it), as observed.
#[derive(Debug, Clone)]
pub struct Run {
    /// The TrainingJob.
    pub job: TrainingJob,
    /// Its name.
    pub name: String,
    /// Where it stands.
    pub state: RunState,
}

impl Run {
    /// The run of `job`.
    pub fn of(job: TrainingJob) -> Run {
        let conds = job
            .status
            .as_ref()
            .map(|s| s.conditions.as_slice())
            .unwrap_or_default();
        let state = if conditions::is_true(conds, ConditionType::Succeeded) {
            RunState::Succeeded
        } else if conditions::is_true(conds, ConditionType::Failed) {
            RunState::Failed
        } else {
            RunState::Active
        };
        Run {
            name: job.name_any(),
            state,
            job,
        }
    }

    /// One of the job's annotations.
    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.job.annotations().get(key).map(String::as_str)
    }

    /// Its model is in the registry (the run carries the version).
    pub fn is_registered(&self) -> bool {
        self.annotation(ANNOTATION_REGISTERED).is_some()
    }

    /// The data window recorded on the run (empty when missing or unreadable).
    pub fn window(&self) -> RunWindow {
        self.annotation(ANNOTATION_WINDOW)
            .and_then(|w| serde_json::from_str(w).ok())
            .unwrap_or_default()
    }

    /// When it finished (its creation time while it has no completion time).
    pub fn finished_at(&self) -> Timestamp {
        let st = self.job.status.as_ref();
        st.and_then(|s| s.completion_time.as_ref())
            .or(self.job.metadata.creation_timestamp.as_ref())
            .map_or(Timestamp::UNIX_EPOCH, |t| t.0)
    }
}

/// The runs whose model must be registered this pass: succeeded, not registered yet.
pub fn to_register(runs: &[Run]) -> impl Iterator<Item = &Run> {
    runs.iter()
        .filter(|r| r.state == RunState::Succeeded && !r.is_registered())
}

/// A registration this pass made (or found made by an earlier one).
#[derive(Debug, Clone, PartialEq)]
pub struct Registered {
    /// The version of the run's model.
    pub version: u64,
    /// Registered by this pass (false: found, registered by an interrupted earlier pass).
    pub fresh: bool,
}

/// The outcome of registering one run's model.
#[derive(Debug, Clone)]
pub struct Registration {
    /// The run's name.
    pub run: String,
    /// The version, or why registration failed.
    pub outcome: std::result::Result<Registered, String>,
}

/// The model a new run starts from, as the registry is asked for it.
#[derive(Debug, Clone, PartialEq)]
pub enum BaseRef {
    /// spec.baseModel: the version an alias points to (none when the model does not exist yet).
    Alias {
        /// Model name.
        model: String,
        /// Alias.
        alias: String,
    },
    /// The version this resource registered last.
    Version {
        /// Model name.
        model: String,
        /// Version.
        version: u64,
    },
}

/// The base model as found: its exported folder and version.
#[derive(Debug, Clone, PartialEq)]
pub struct BaseModel {
    /// The exported folder the run initialises from.
    pub folder: String,
    /// Model name.
    pub model: String,
    /// Version.
    pub version: u64,
}

/// Why a due run could not be decided.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DataError {
    /// spec.baseModel names an alias that does not exist.
    #[error("{0}")]
    BaseMissing(String),
    /// The dataset index or the registry could not be read.
    #[error("{0}")]
    Store(String),
}

/// What a due evaluation reads: the dataset index and the base model.
#[derive(Debug, Clone)]
pub struct DataSnapshot {
    /// Shard sequence numbers in the dataset index.
    pub shards: Vec<u64>,
    /// The base model (None: random initialisation), or why it could not be found.
    pub base: std::result::Result<Option<BaseModel>, DataError>,
    /// What the sites' monitors say (read where spec.trigger.drift is set).
    pub drift: DriftSnapshot,
    /// Shards of this dataset that only candidates the gate rejected were trained on: eligible
    /// again, though behind the watermark.
    pub returned: Vec<u64>,
}

/// The monitor reports the drift trigger read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DriftSnapshot {
    /// Trusted sites whose report of the monitored version drifted since the last successful
    /// run, with their evidence.
    pub drifting: Vec<SiteDrift>,
    /// Reports that do not count, and why (an untrusted key, a bad signature, another version).
    pub refused: Vec<String>,
}

/// What the registry says the schedule's model was trained on: the versions of
/// `spec.register.model` trained from `spec.dataset.uri`. The status is not the only record of
/// progress: a ContinualTraining deleted and applied again from Git has none, and would train
/// from scratch on all the data.
#[derive(Debug, Clone, PartialEq)]
pub struct Trained {
    /// The newest such version.
    pub version: u64,
    /// When it was registered.
    pub created: Timestamp,
    /// The highest shard sequence number any of them was trained on.
    pub last_seq: u64,
}

/// What the controller saw for one ContinualTraining.
#[derive(Debug, Clone)]
pub struct Observed {
    /// Its runs.
    pub runs: Vec<Run>,
    /// The registrations of this pass, one per run of [`to_register`].
    pub registrations: Vec<Registration>,
    /// The data, read only when [`due`] fires.
    pub data: Option<std::result::Result<DataSnapshot, DataError>>,
    /// The registry's record of training on this dataset, read with the data.
    pub trained: Option<Trained>,
    /// The current time.
    pub now: Timestamp,
}

/// When the controller looks again.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Requeue {
    /// Only when something changes (the spec is invalid).
    OnChange,
    /// Soon: the registry or data store failed.
    Soon,
    /// When the schedule is next due (None: nothing scheduled).
    At(Option<Timestamp>),
}

/// What the controller must do, in order: annotate registered runs, delete pruned then
/// replaced runs, create the new run, write the status once, record events.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Runs to annotate with their registered version.
    pub annotate: Vec<(String, u64)>,
    /// Finished runs beyond the history limits.
    pub prune: Vec<String>,
    /// Active runs to delete first (concurrencyPolicy Replace).
    pub replace: Vec<String>,
    /// The run to create.
    pub create: Option<TrainingJob>,
    /// The status to write.
    pub status: ContinualTrainingStatus,
    /// Events to record after the status write.
    pub events: Vec<PlannedEvent>,
    /// When to look again.
    pub requeue: Requeue,
}

impl Plan {
    fn new(ct: &ContinualTraining) -> Plan {
        let mut status = ct.status.clone().unwrap_or_default();
        status.observed_generation = ct.metadata.generation;
        Plan {
            annotate: Vec::new(),
            prune: Vec::new(),
            replace: Vec::new(),
            create: None,
            status,
            events: Vec::new(),
            requeue: Requeue::At(None),
        }
    }
}

fn stamp(ct: &ContinualTraining, now: Timestamp) -> Stamp {
    Stamp {
        generation: ct.metadata.generation,
        now: Time(now),
    }
}

/// The plan for a spec that does not parse: say why, and wait for a new spec.
pub fn invalid(ct: &ContinualTraining, error: &Error, now: Timestamp) -> Plan {
    let mut plan = Plan::new(ct);
    let why = continual_reason::INVALID_SPEC;
    let message = error.to_string();
    stamp(ct, now).set(
        &mut plan.status.conditions,
        Cond::Ready,
        false,
        why,
        &message,
    );
    plan.events.push(PlannedEvent::warning(why, message));
    plan.requeue = Requeue::OnChange;
    let stamp = stamp(ct, now);
    health::follow_ready(&mut plan.status.conditions, &stamp);
    plan
}

/// What the schedule says at `now` (nothing while suspended).
pub fn due(ct: &ContinualTraining, settings: &Settings, now: Timestamp) -> Option<Due> {
    if ct.spec.suspend {
        return None;
    }
    let last_handled = ct
        .status
        .as_ref()
        .and_then(|s| s.last_schedule_time.as_ref())
        .or(ct.metadata.creation_timestamp.as_ref())
        .map_or(now, |t| t.0);
    let deadline = ct.spec.starting_deadline_seconds;
    Some(schedule::due(
        &settings.schedule,
        last_handled,
        now,
        deadline,
    ))
}

/// The model a new run would start from, after this pass's `registrations`.
pub fn base_ref(
    ct: &ContinualTraining,
    registrations: &[Registration],
    trained: Option<&Trained>,
) -> Option<BaseRef> {
    if let Some(base) = &ct.spec.base_model {
        return Some(BaseRef::Alias {
            model: base.model.clone(),
            alias: base.alias.clone(),
        });
    }
    let before = ct.status.as_ref().and_then(|s| s.last_registered_version);
    let now = registrations
        .iter()
        .filter_map(|r| r.outcome.as_ref().ok())
        .map(|r| r.version as i64);
    let recorded = trained.map(|t| t.version as i64);
    let last = before.into_iter().chain(now).chain(recorded).max()?;
    Some(BaseRef::Version {
        model: ct.spec.register.model.clone(),
        version: last as u64,
    })
}

/// Decides what to do for `ct`.
pub fn plan(ct: &ContinualTraining, settings: &Settings, obs: &Observed) -> Plan {
    let mut plan = Plan::new(ct);
    let mut store_error =
        record_registrations(ct, obs, &mut plan).map(|e| (continual_reason::STORE_UNAVAILABLE, e));
    if let Some(trained) = &obs.trained {
        recover(ct, trained, &mut plan);
    }
    plan.prune = prune(ct, &obs.runs);
    let mut active: Vec<String> = obs
        .runs
        .iter()
        .filter(|r| r.state == RunState::Active)
        .map(|r| r.name.clone())
        .collect();
    let stamp = stamp(ct, obs.now);
    match due(ct, settings, obs.now) {
        None => {
            plan.status.next_schedule_time = None;
            let why = continual_reason::SUSPENDED;
            let msg = "spec.suspend is true: no new runs";
            stamp.set(&mut plan.status.conditions, Cond::Ready, true, why, msg);
        }
        Some(due) => {
            if let Err(e) = on_schedule(ct, settings, obs, due, &mut active, &mut plan) {
                plan.events
                    .push(PlannedEvent::warning(e.reason(), e.to_string()));
                store_error = Some((e.reason(), e.to_string()));
            }
            report_ready(ct, &stamp, store_error.as_ref(), &mut plan.status);
        }
    }
    if store_error.is_some() {
        plan.requeue = Requeue::Soon;
    }
    report_active(&stamp, active, &mut plan.status);
    health::follow_ready(&mut plan.status.conditions, &stamp);
    plan
}

/// Status and events of this pass's registrations; returns the last failure.
fn record_registrations(ct: &ContinualTraining, obs: &Observed, plan: &mut Plan) -> Option<String> {
    let mut failed = None;
    for r in &obs.registrations {
        let Some(run) = obs.runs.iter().find(|x| x.name == r.run) else {
            continue;
        };
        match &r.outcome {
            Ok(done) => {
                record_registered(ct, run, done, plan);
                plan.annotate.push((run.name.clone(), done.version));
            }
            Err(e) => {
                let why = continual_reason::REGISTER_FAILED;
                plan.events
                    .push(PlannedEvent::warning(why, format!("run {}: {e}", run.name)));
                failed = Some(format!("registering run {}: {e}", run.name));
            }
        }
    }
    failed
}

/// Progress the registry records but the status lacks (a restored or re-applied object) is
/// taken from the registry; the status never moves back.
fn recover(ct: &ContinualTraining, trained: &Trained, plan: &mut Plan) {
    let st = &mut plan.status;
    let before = st.data_watermark;
    st.data_watermark = Some(before.unwrap_or(-1).max(trained.last_seq as i64));
    let version = trained.version as i64;
    if st.last_registered_version.is_none_or(|v| v < version) {
        st.last_registered_version = Some(version);
        st.last_successful_time = Some(Time(trained.created));
    }
    if before.is_none_or(|w| w < trained.last_seq as i64) {
        let note = format!(
            "data watermark {} taken from the registry: {} v{} and earlier versions were \
             trained on {} up to shard {}",
            trained.last_seq,
            ct.spec.register.model,
            trained.version,
            ct.spec.dataset.uri,
            trained.last_seq
        );
        plan.events.push(PlannedEvent::normal(
            continual_reason::WATERMARK_RECOVERED,
            note,
        ));
    }
}

fn record_registered(ct: &ContinualTraining, run: &Run, done: &Registered, plan: &mut Plan) {
    let st = &mut plan.status;
    if let Some(w) = run.window().next_watermark {
        st.data_watermark = Some(st.data_watermark.unwrap_or(-1).max(w as i64));
    }
    let version = done.version as i64;
    if st.last_registered_version.is_none_or(|v| v < version) {
        st.last_registered_version = Some(version);
        st.last_successful_time = Some(Time(run.finished_at()));
    }
    if done.fresh {
        let watermark = st.data_watermark.map_or("none".into(), |w| w.to_string());
        let (model, alias) = (&ct.spec.register.model, &ct.spec.register.alias);
        let note = format!(
            "run {} registered as {model} v{} ({alias}); data watermark {watermark}",
            run.name, done.version
        );
        plan.events
            .push(PlannedEvent::normal(continual_reason::REGISTERED, note));
    }
}

/// Registered successes and failures beyond the history limits (a success whose model is not
/// registered yet is kept).
fn prune(ct: &ContinualTraining, runs: &[Run]) -> Vec<String> {
    let finished: Vec<Finished> = runs
        .iter()
        .filter(|r| match r.state {
            RunState::Succeeded => r.is_registered(),
            RunState::Failed => true,
            RunState::Active => false,
        })
        .map(|r| Finished {
            name: r.name.clone(),
            at: r.finished_at(),
            succeeded: r.state == RunState::Succeeded,
        })
        .collect();
    let keep_ok = ct.spec.successful_jobs_history_limit.max(0) as usize;
    let keep_failed = ct.spec.failed_jobs_history_limit.max(0) as usize;
    schedule::prune(&finished, keep_ok, keep_failed)
}

impl DataError {
    fn reason(&self) -> &'static str {
        match self {
            DataError::BaseMissing(_) => continual_reason::BASE_MODEL_MISSING,
            DataError::Store(_) => continual_reason::STORE_UNAVAILABLE,
        }
    }
}

/// The schedule at `now`: nothing due, a missed deadline, or an evaluation of the data.
fn on_schedule(
    ct: &ContinualTraining,
    settings: &Settings,
    obs: &Observed,
    due: Due,
    active: &mut Vec<String>,
    plan: &mut Plan,
) -> std::result::Result<(), DataError> {
    let scheduled = match due {
        Due::NotYet { next } => {
            plan.status.next_schedule_time = next.map(Time);
            plan.requeue = Requeue::At(next);
            return Ok(());
        }
        Due::TooLate { scheduled } => {
            plan.status.last_schedule_time = Some(Time(scheduled));
            let note = format!(
                "the run scheduled at {scheduled} is past startingDeadlineSeconds; skipped"
            );
            let why = continual_reason::MISSED_DEADLINE;
            plan.events.push(PlannedEvent::warning(why, note));
            return Ok(());
        }
        Due::Fire { scheduled, .. } => scheduled,
    };
    let firing = Firing {
        ct,
        obs,
        stamp: stamp(ct, obs.now),
        scheduled,
    };
    let result = firing.evaluate(settings, active, plan);
    let last = plan
        .status
        .last_schedule_time
        .as_ref()
        .map_or(obs.now, |t| t.0);
    let next = settings.schedule.next_after(last.max(obs.now));
    plan.status.next_schedule_time = next.map(Time);
    plan.requeue = Requeue::At(next);
    result
}

/// A scheduled time that is due now.
struct Firing<'a> {
    ct: &'a ContinualTraining,
    obs: &'a Observed,
    stamp: Stamp,
    scheduled: Timestamp,
}

impl Firing<'_> {
    /// The trigger, the concurrency policy and the window decide; a run is built when they
    /// say so.
    fn evaluate(
        &self,
        settings: &Settings,
        active: &mut Vec<String>,
        plan: &mut Plan,
    ) -> std::result::Result<(), DataError> {
        let data = match &self.obs.data {
            Some(Ok(data)) => data,
            Some(Err(e)) => return Err(e.clone()),
            None => return Err(DataError::Store("the dataset index was not read".into())),
        };
        for why in &data.drift.refused {
            let note = format!("monitor report not counted: {why}");
            plan.events.push(PlannedEvent::warning(
                continual_reason::MONITOR_REPORT_REFUSED,
                note,
            ));
        }
        let (st, spec) = (&plan.status, &self.ct.spec);
        let decision = schedule::decide(&Inputs {
            scheduled: self.scheduled,
            shards: &data.shards,
            watermark: st.data_watermark.map(|w| w as u64),
            returned: &data.returned,
            replay: spec.replay,
            min_new_shards: spec.trigger.min_new_shards.max(1) as u64,
            since_last_success_secs: st
                .last_successful_time
                .as_ref()
                .map(|t| self.obs.now.duration_since(t.0).as_secs()),
            max_interval_secs: settings.max_interval,
            drift: spec.trigger.drift.as_ref().map(|d| DriftCount {
                drifting: data.drift.drifting.len() as u64,
                needed: d.min_sites.max(1) as u64,
            }),
            policy: concurrency(spec.concurrency_policy),
            active,
        });
        match decision {
            Decision::NoNewData { new } => self.no_new_data(new, plan),
            Decision::SkipActive => {
                let note = format!(
                    "scheduled {}: concurrencyPolicy Forbid and {} active",
                    self.scheduled,
                    active.join(", ")
                );
                let why = continual_reason::SKIPPED_ACTIVE;
                plan.events.push(PlannedEvent::normal(why, note));
                plan.status.last_schedule_time = Some(Time(self.scheduled));
            }
            Decision::Run {
                trigger,
                window,
                replace,
            } => {
                // Without its base model nothing is decided: the time is evaluated again.
                let base = data.base.clone()?;
                let trigger = self.run_trigger(trigger, &window, &data.drift);
                self.start_run(&window, &trigger, replace, base.as_ref(), active, plan);
            }
        }
        Ok(())
    }

    fn no_new_data(&self, new: usize, plan: &mut Plan) {
        let st = &mut plan.status;
        st.last_schedule_time = Some(Time(self.scheduled));
        let trigger = &self.ct.spec.trigger;
        let drift = match (&trigger.drift, &self.obs.data) {
            (Some(d), Some(Ok(data))) => format!(
                " (or at least 1 with drift at {} site(s); {} drifting)",
                d.min_sites,
                data.drift.drifting.len()
            ),
            _ => String::new(),
        };
        let msg = format!(
            "{new} new shard(s) after watermark {}; trigger needs {}{}{drift}",
            st.data_watermark.map_or("none".into(), |w| w.to_string()),
            trigger.min_new_shards,
            trigger
                .max_interval
                .as_ref()
                .map_or(String::new(), |m| format!(" (or at least 1 after {m})"))
        );
        let why = continual_reason::NO_NEW_DATA;
        self.stamp
            .set(&mut st.conditions, Cond::DataReady, false, why, &msg);
        let note = format!("scheduled {}: no run; {msg}", self.scheduled);
        plan.events.push(PlannedEvent::normal(why, note));
    }

    /// The record of why this run exists.
    fn run_trigger(&self, kind: TriggerKind, window: &Window, drift: &DriftSnapshot) -> RunTrigger {
        let t = &self.ct.spec.trigger;
        let new = window.new.len();
        let (summary, evidence) = match kind {
            TriggerKind::NewData => (
                format!(
                    "{new} new shard(s), at least trigger.minNewShards {}",
                    t.min_new_shards
                ),
                Vec::new(),
            ),
            TriggerKind::MaxInterval => (
                format!(
                    "{new} new shard(s) and trigger.maxInterval {} passed since the last successful run",
                    t.max_interval.as_deref().unwrap_or("?")
                ),
                Vec::new(),
            ),
            TriggerKind::Drift => {
                let sites: Vec<String> = drift
                    .drifting
                    .iter()
                    .map(|d| format!("{} ({})", d.site, d.evidence.join(", ")))
                    .collect();
                let version = drift
                    .drifting
                    .first()
                    .map_or(String::new(), |d| format!(" of {} v{}", d.model, d.version));
                (
                    format!(
                        "{new} new shard(s) and drift{version} at {}",
                        sites.join("; ")
                    ),
                    drift.drifting.clone(),
                )
            }
        };
        RunTrigger {
            kind,
            summary,
            drift: evidence,
        }
    }

    fn start_run(
        &self,
        window: &Window,
        trigger: &RunTrigger,
        replace: Vec<String>,
        base: Option<&BaseModel>,
        active: &mut Vec<String>,
        plan: &mut Plan,
    ) {
        for old in &replace {
            let note = format!("deleted active run {old} (concurrencyPolicy Replace)");
            plan.events
                .push(PlannedEvent::normal(continual_reason::RUN_REPLACED, note));
        }
        active.retain(|a| !replace.contains(a));
        plan.replace = replace;
        let summary = format!("{}; {}", summary(window, base), trigger.summary);
        let job = run_job(self.ct, self.scheduled, window, base, trigger);
        let run = job.name_any();
        // A run created by an earlier pass (an operator restarted at the firing instant) keeps
        // its deterministic name: it is not created twice.
        if !self.obs.runs.iter().any(|r| r.name == run) {
            let note = format!("created run {run} for {}: {summary}", self.scheduled);
            plan.events
                .push(PlannedEvent::normal(continual_reason::RUN_CREATED, note));
            plan.create = Some(job);
        }
        if !active.contains(&run) {
            active.push(run);
        }
        plan.status.last_schedule_time = Some(Time(self.scheduled));
        let why = continual_reason::NEW_DATA;
        self.stamp.set(
            &mut plan.status.conditions,
            Cond::DataReady,
            true,
            why,
            &summary,
        );
    }
}

fn concurrency(policy: ConcurrencyPolicy) -> Concurrency {
    match policy {
        ConcurrencyPolicy::Allow => Concurrency::Allow,
        ConcurrencyPolicy::Forbid => Concurrency::Forbid,
        ConcurrencyPolicy::Replace => Concurrency::Replace,
    }
}

fn summary(window: &Window, base: Option<&BaseModel>) -> String {
    let returned = match window.returned.len() {
        0 => String::new(),
        n => format!(
            " ({n} returned by rejected candidates: {})",
            radfm_api::trainingjob::format_shards(&window.returned)
        ),
    };
    format!(
        "{} new shard(s) {}{returned}, {} replayed, from {}",
        window.new.len(),
        radfm_api::trainingjob::format_shards(&window.new),
        window.replay.len(),
        base.map_or("random initialisation".to_string(), |b| format!(
            "{} v{}",
            b.model, b.version
        ))
    )
}

/// The TrainingJob of the run at `scheduled`: the job template on the window's shards, from the
/// base model, owned by `ct`, annotated with what the registration will record.
pub fn run_job(
    ct: &ContinualTraining,
    scheduled: Timestamp,
    window: &Window,
    base: Option<&BaseModel>,
    trigger: &RunTrigger,
) -> TrainingJob {
    let spec = &ct.spec;
    let name = schedule::run_name(&ct.name_any(), scheduled);
    let mut selected: Vec<u64> = window.new.iter().chain(&window.replay).copied().collect();
    selected.sort_unstable();
    let record = RunWindow {
        new: window.new.clone(),
        returned: window.returned.clone(),
        replay: window.replay.clone(),
        next_watermark: window.next_watermark,
    };
    let mut annotations = BTreeMap::from([
        (ANNOTATION_SCHEDULED.to_string(), scheduled.to_string()),
        (
            ANNOTATION_WINDOW.to_string(),
            serde_json::to_string(&record).unwrap_or_default(),
        ),
        (
            ANNOTATION_TRIGGER.to_string(),
            serde_json::to_string(trigger).unwrap_or_default(),
        ),
    ]);
    if let Some(b) = base {
        annotations.insert(
            ANNOTATION_BASE_VERSION.to_string(),
            format!("{}:{}", b.model, b.version),
        );
    }
    let mut labels = spec.job_template.labels.clone().unwrap_or_default();
    labels.insert(LABEL_CONTINUAL.to_string(), ct.name_any());
    let init_from = base.map(|b| b.folder.clone());
    TrainingJob {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: ct.namespace(),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: Some(vec![owner(ct)]),
            ..Default::default()
        },
        spec: spec
            .job_template
            .job_spec(&name, &spec.dataset, &selected, init_from),
        status: None,
    }
}

fn owner(ct: &ContinualTraining) -> OwnerReference {
    OwnerReference {
        api_version: ContinualTraining::api_version(&()).to_string(),
        kind: ContinualTraining::kind(&()).to_string(),
        name: ct.name_any(),
        uid: ct.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

fn report_ready(
    ct: &ContinualTraining,
    stamp: &Stamp,
    store_error: Option<&(&'static str, String)>,
    st: &mut ContinualTrainingStatus,
) {
    if let Some((why, e)) = store_error {
        stamp.set(&mut st.conditions, Cond::Ready, false, why, e);
        return;
    }
    let next = st
        .next_schedule_time
        .as_ref()
        .map_or("none".into(), |t| t.0.to_string());
    let msg = format!(
        "schedule {:?} ({}); next {next}",
        ct.spec.schedule,
        ct.spec.time_zone.as_deref().unwrap_or("UTC"),
    );
    stamp.set(
        &mut st.conditions,
        Cond::Ready,
        true,
        continual_reason::SCHEDULING,
        &msg,
    );
}

fn report_active(stamp: &Stamp, mut active: Vec<String>, st: &mut ContinualTrainingStatus) {
    active.sort();
    st.active_count = active.len() as i32;
    let (state, why, msg) = if active.is_empty() {
        (
            false,
            continual_reason::IDLE,
            "no run in progress".to_string(),
        )
    } else {
        (
            true,
            continual_reason::RUNNING,
            format!("running: {}", active.join(", ")),
        )
    };
    stamp.set(&mut st.conditions, Cond::Active, state, why, &msg);
    st.active = active;
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3600;

    /// Hourly at :00, created at 00:30 on day 0 (second 1800), 2 new shards trigger a run.
    fn ct(extra: &str) -> ContinualTraining {
        let yaml = format!(
            "apiVersion: radfm.io/v1alpha1
kind: ContinualTraining
metadata: {{name: nightly, namespace: ns, uid: ct-uid, generation: 2, creationTimestamp: '1970-01-01T00:30:00Z'}}
spec:
  schedule: '0 * * * *'
  trigger: {{minNewShards: 2}}
  successfulJobsHistoryLimit: 1
  failedJobsHistoryLimit: 1
  dataset: {{uri: 'file:///shards'}}
  registry: file:///registry
  register: {{model: cxr, alias: candidate}}
  jobTemplate:
    image: trainer:dev
    workers: {{replicas: 1}}
    checkpoint: {{uri: 'file:///ckpt'}}
    training: {{steps: 10}}
{extra}"
        );
        serde_yaml_ng::from_str(&yaml).unwrap()
    }

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    fn run(name: &str, state: RunState, registered: Option<u64>, done: i64) -> Run {
        let condition = match state {
            RunState::Active => "",
            RunState::Succeeded => "Succeeded",
            RunState::Failed => "Failed",
        };
        let mut annotations = serde_json::json!({
            ANNOTATION_WINDOW: r#"{"new":[3,4],"replay":[],"nextWatermark":4}"#,
        });
        if let Some(v) = registered {
            annotations[ANNOTATION_REGISTERED] = v.to_string().into();
        }
        let job = serde_json::json!({
            "apiVersion": "radfm.io/v1alpha1", "kind": "TrainingJob",
            "metadata": {"name": name, "annotations": annotations},
            "spec": ct("").spec.job_template.job_spec(name, &ct("").spec.dataset, &[], None),
            "status": {"completionTime": Time(at(done)),
                "conditions": [{"type": condition, "status": "True", "reason": "R", "message": "",
                    "lastTransitionTime": Time(at(done))}]},
        });
        Run::of(serde_json::from_value(job).unwrap())
    }

    fn data(shards: &[u64]) -> Option<std::result::Result<DataSnapshot, DataError>> {
        Some(Ok(DataSnapshot {
            shards: shards.to_vec(),
            base: Ok(None),
            drift: DriftSnapshot::default(),
            returned: Vec::new(),
        }))
    }

    fn observe(
        runs: Vec<Run>,
        data: Option<std::result::Result<DataSnapshot, DataError>>,
        now: i64,
    ) -> Observed {
        Observed {
            runs,
            registrations: Vec::new(),
            data,
            trained: None,
            now: at(now),
        }
    }

    fn plan_of(ct: &ContinualTraining, obs: &Observed) -> Plan {
        plan(ct, &settings(ct).unwrap(), obs)
    }

    fn reasons(p: &Plan) -> Vec<&'static str> {
        p.events.iter().map(|e| e.reason).collect()
    }

    fn condition(p: &Plan, ty: Cond) -> (String, String) {
        let c = conditions::get(&p.status.conditions, ty).unwrap();
        (c.status.clone(), c.reason.clone())
    }

    #[test]
    fn a_spec_that_does_not_parse_says_which_field_and_waits_for_a_new_one() {
        let bad = ct("  timeZone: Mars/Olympus\n");
        let err = settings(&bad).unwrap_err();
        let p = invalid(&bad, &err, at(HOUR));
        assert_eq!(
            condition(&p, Cond::Ready),
            ("False".into(), continual_reason::INVALID_SPEC.into())
        );
        let stalled = conditions::get(&p.status.conditions, health::HealthConditionType::Stalled);
        assert_eq!(stalled.map(|c| c.status.as_str()), Some("True"));
        assert_eq!(
            (p.requeue, reasons(&p)),
            (Requeue::OnChange, vec![continual_reason::INVALID_SPEC])
        );
        assert!(p.create.is_none());
    }

    #[test]
    fn a_schedule_reapplied_without_status_continues_from_what_the_registry_recorded() {
        let trained = Trained {
            version: 3,
            created: at(1000),
            last_seq: 4,
        };
        let mut obs = observe(vec![], data(&[1, 2, 3, 4, 5, 6]), HOUR);
        obs.trained = Some(trained.clone());
        let p = plan_of(&ct(""), &obs);
        assert_eq!(
            reasons(&p),
            [
                continual_reason::WATERMARK_RECOVERED,
                continual_reason::RUN_CREATED
            ]
        );
        let job = p.create.as_ref().unwrap();
        let window: RunWindow =
            serde_json::from_str(&job.annotations()[ANNOTATION_WINDOW]).unwrap();
        assert_eq!(
            window.new,
            [5, 6],
            "only the shards after the registry's watermark"
        );
        assert_eq!(p.status.data_watermark, Some(4));
        assert_eq!(p.status.last_registered_version, Some(3));
        assert_eq!(
            base_ref(&ct(""), &[], Some(&trained)),
            Some(BaseRef::Version {
                model: "cxr".into(),
                version: 3
            }),
            "training goes on from the last version, not from scratch"
        );

        // A status ahead of the registry's record is kept (it never moves back), silently.
        let mut ahead = ct("");
        ahead.status = Some(ContinualTrainingStatus {
            data_watermark: Some(5),
            last_registered_version: Some(4),
            ..Default::default()
        });
        let p = plan_of(&ahead, &obs);
        assert_eq!(p.status.data_watermark, Some(5));
        assert_eq!(p.status.last_registered_version, Some(4));
        assert!(!reasons(&p).contains(&continual_reason::WATERMARK_RECOVERED));
    }

    /// (extra spec, runs, shards, now, creates a run, events, DataReady reason)
    type Case<'a> = (
        &'a str,
        Vec<Run>,
        &'a [u64],
        i64,
        bool,
        Vec<&'a str>,
        Option<&'a str>,
    );

    #[test]
    fn each_scheduled_time_creates_runs_skips_or_waits_as_data_and_policy_say() {
        use continual_reason::*;
        let active = || vec![run("old", RunState::Active, None, 0)];
        // (extra spec, runs, shards, now, want create, want events, want DataReady reason)
        let cases: Vec<Case> = vec![
            (
                "",
                vec![],
                &[1, 2],
                HOUR,
                true,
                vec![RUN_CREATED],
                Some(NEW_DATA),
            ),
            (
                "",
                vec![],
                &[1],
                HOUR,
                false,
                vec![NO_NEW_DATA],
                Some(NO_NEW_DATA),
            ),
            ("", vec![], &[1, 2], 2000, false, vec![], None),
            (
                "  concurrencyPolicy: Forbid\n",
                active(),
                &[1, 2],
                HOUR,
                false,
                vec![SKIPPED_ACTIVE],
                None,
            ),
            (
                "  concurrencyPolicy: Allow\n",
                active(),
                &[1, 2],
                HOUR,
                true,
                vec![RUN_CREATED],
                Some(NEW_DATA),
            ),
            (
                "  concurrencyPolicy: Replace\n",
                active(),
                &[1, 2],
                HOUR,
                true,
                vec![RUN_REPLACED, RUN_CREATED],
                Some(NEW_DATA),
            ),
            (
                "  startingDeadlineSeconds: 60\n",
                vec![],
                &[1, 2],
                HOUR + 600,
                false,
                vec![MISSED_DEADLINE],
                None,
            ),
            (
                "  suspend: true\n",
                vec![],
                &[1, 2],
                HOUR,
                false,
                vec![],
                None,
            ),
        ];
        for (extra, runs, shards, now, create, events, data_ready) in cases {
            let c = ct(extra);
            let p = plan_of(&c, &observe(runs, data(shards), now));
            assert_eq!(p.create.is_some(), create, "{extra:?} at {now}");
            assert_eq!(reasons(&p), events, "{extra:?} at {now}");
            let got =
                conditions::get(&p.status.conditions, Cond::DataReady).map(|c| c.reason.as_str());
            assert_eq!(got, data_ready, "{extra:?} at {now}");
        }
    }

    #[test]
    fn a_run_waits_in_the_kueue_queue_its_template_names() {
        let mut c = ct("");
        c.spec.job_template.labels = Some(std::collections::BTreeMap::from([(
            crate::kueue::QUEUE_LABEL.to_string(),
            "team-a".to_string(),
        )]));
        let p = plan_of(&c, &observe(vec![], data(&[1, 2]), HOUR + 5));
        let job = p.create.unwrap();
        assert_eq!(crate::kueue::queue_of(&job), Some("team-a"));
        assert_eq!(job.labels()[LABEL_CONTINUAL], "nightly");
    }

    #[test]
    fn a_run_is_the_template_on_the_new_shards_owned_and_annotated() {
        let c = ct("");
        let p = plan_of(&c, &observe(vec![], data(&[1, 2]), HOUR + 5));
        let job = p.create.clone().unwrap();
        assert_eq!(job.name_any(), schedule::run_name("nightly", at(HOUR)));
        assert_eq!(job.labels()[LABEL_CONTINUAL], "nightly");
        assert_eq!(job.owner_references()[0].uid, "ct-uid");
        assert_eq!(
            job.annotations()[ANNOTATION_SCHEDULED],
            at(HOUR).to_string()
        );
        assert_eq!(p.status.last_schedule_time, Some(Time(at(HOUR))));
        assert_eq!(p.status.next_schedule_time, Some(Time(at(2 * HOUR))));
        assert_eq!(p.status.active, [job.name_any()]);
        assert_eq!(p.requeue, Requeue::At(Some(at(2 * HOUR))));
        let (status, why) = condition(&p, Cond::Active);
        assert_eq!(
            (status.as_str(), why.as_str()),
            ("True", continual_reason::RUNNING)
        );
    }

    #[test]
    fn drift_at_trusted_sites_runs_on_fewer_new_shards_and_the_run_records_the_evidence() {
        let mut c = ct("");
        c.spec.trigger.drift = Some(
            serde_yaml_ng::from_str(&format!(
                "{{trustedSites: [{{site: north, publicKey: '{}'}}]}}",
                "ab".repeat(32)
            ))
            .unwrap(),
        );
        let north = SiteDrift {
            site: "north".into(),
            model: "cxr".into(),
            version: 3,
            report: "file:///registry/models/cxr/monitoring/v000003/north.json".into(),
            created: "1970-01-01T00:50:00Z".into(),
            evidence: vec!["embeddings (statistic 0.1000, adjusted p = 0.0020)".into()],
        };
        let with_drift = |shards: &[u64], drifting: Vec<SiteDrift>| {
            let mut d = data(shards);
            if let Some(Ok(snapshot)) = d.as_mut() {
                snapshot.drift = DriftSnapshot {
                    drifting,
                    refused: vec![
                        "east.json: site east is not in trigger.drift.trustedSites".into(),
                    ],
                };
            }
            d
        };
        // One new shard, below minNewShards, and no drift: no run, and the status says why.
        let quiet = plan_of(&c, &observe(vec![], with_drift(&[1], vec![]), HOUR + 5));
        assert!(quiet.create.is_none());
        let dr = conditions::get(&quiet.status.conditions, Cond::DataReady).unwrap();
        assert!(
            dr.message.contains("with drift at 1 site(s); 0 drifting"),
            "{}",
            dr.message
        );
        // North drifts: a run on the one new shard, carrying the evidence.
        let p = plan_of(
            &c,
            &observe(vec![], with_drift(&[1], vec![north.clone()]), HOUR + 5),
        );
        assert_eq!(
            reasons(&p),
            [
                continual_reason::MONITOR_REPORT_REFUSED,
                continual_reason::RUN_CREATED
            ]
        );
        let job = p.create.unwrap();
        let t: RunTrigger = serde_json::from_str(&job.annotations()[ANNOTATION_TRIGGER]).unwrap();
        assert_eq!((t.kind, t.drift), (TriggerKind::Drift, vec![north.clone()]));
        assert!(
            t.summary
                .contains("1 new shard(s) and drift of cxr v3 at north (embeddings"),
            "{}",
            t.summary
        );
        // Enough new data: new data is the reason, whatever the sites say.
        let p = plan_of(
            &c,
            &observe(vec![], with_drift(&[1, 2], vec![north]), HOUR + 5),
        );
        let job = p.create.unwrap();
        let t: RunTrigger = serde_json::from_str(&job.annotations()[ANNOTATION_TRIGGER]).unwrap();
        assert_eq!((t.kind, t.drift.len()), (TriggerKind::NewData, 0));
    }

    #[test]
    fn a_run_that_already_exists_is_not_created_twice() {
        let c = ct("  concurrencyPolicy: Allow\n");
        let name = schedule::run_name("nightly", at(HOUR));
        let p = plan_of(
            &c,
            &observe(
                vec![run(&name, RunState::Active, None, 0)],
                data(&[1, 2]),
                HOUR,
            ),
        );
        assert!(p.create.is_none() && p.events.is_empty());
        assert_eq!(p.status.active, [name]);
    }

    #[test]
    fn unreadable_data_or_a_missing_base_model_decides_nothing_and_retries_soon() {
        let missing = Some(Ok(DataSnapshot {
            shards: vec![1, 2],
            base: Err(DataError::BaseMissing(
                "spec.baseModel: no alias production".into(),
            )),
            drift: DriftSnapshot::default(),
            returned: Vec::new(),
        }));
        let store = Some(Err(DataError::Store("dataset index: timeout".into())));
        for (data, why) in [
            (missing, continual_reason::BASE_MODEL_MISSING),
            (store, continual_reason::STORE_UNAVAILABLE),
        ] {
            let p = plan_of(&ct(""), &observe(vec![], data, HOUR));
            assert!(p.create.is_none());
            assert_eq!((reasons(&p), p.requeue), (vec![why], Requeue::Soon));
            assert_eq!(
                p.status.last_schedule_time, None,
                "the time is evaluated again"
            );
            assert_eq!(condition(&p, Cond::Ready).0, "False");
        }
    }

    #[test]
    fn registrations_move_the_watermark_and_failures_surface_in_ready() {
        let c = ct("");
        let mut obs = observe(
            vec![
                run("r1", RunState::Succeeded, None, 1000),
                run("r2", RunState::Succeeded, None, 1200),
            ],
            None,
            2000,
        );
        obs.registrations = vec![
            Registration {
                run: "r1".into(),
                outcome: Ok(Registered {
                    version: 4,
                    fresh: true,
                }),
            },
            Registration {
                run: "r2".into(),
                outcome: Err("registry: denied".into()),
            },
        ];
        let p = plan_of(&c, &obs);
        assert_eq!(p.annotate, [("r1".to_string(), 4)]);
        assert_eq!(p.status.data_watermark, Some(4));
        assert_eq!(p.status.last_registered_version, Some(4));
        assert_eq!(p.status.last_successful_time, Some(Time(at(1000))));
        assert_eq!(
            reasons(&p),
            [
                continual_reason::REGISTERED,
                continual_reason::REGISTER_FAILED
            ]
        );
        assert_eq!(
            condition(&p, Cond::Ready),
            ("False".into(), continual_reason::STORE_UNAVAILABLE.into())
        );
        assert_eq!(p.requeue, Requeue::Soon);
        assert_eq!(
            base_ref(&c, &obs.registrations, None),
            Some(BaseRef::Version {
                model: "cxr".into(),
                version: 4
            })
        );
    }

    #[test]
    fn history_beyond_the_limits_is_pruned_but_unregistered_successes_are_kept() {
        let runs = vec![
            run("ok-old", RunState::Succeeded, Some(1), 100),
            run("ok-new", RunState::Succeeded, Some(2), 200),
            run("ok-unregistered", RunState::Succeeded, None, 50),
            run("failed-old", RunState::Failed, None, 100),
            run("failed-new", RunState::Failed, None, 200),
        ];
        let p = plan_of(&ct(""), &observe(runs, None, 2000));
        let mut pruned = p.prune.clone();
        pruned.sort();
        assert_eq!(pruned, ["failed-old", "ok-old"]);
    }
}
