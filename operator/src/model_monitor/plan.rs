//! The decision core of the ModelMonitor controller: the deployed version, this site's latest
//! report of it and the monitor's pods → the pod to create, the pods to delete, the new status
//! and the events.
//!
//! A look is one pod named after its scheduled minute; it is done when the registry holds a
//! report that names that pod as its look (a report of an earlier look of the same version is
//! not mistaken for it) or when the pod ends without one. Looks never overlap: a time that falls
//! due while a look runs is evaluated when it ends, and only the latest missed time is looked
//! at, as a CronJob with `concurrencyPolicy: Forbid` does.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use radfm_api::conditions::{
    MonitorConditionType as Cond, Stamp, continual_reason, monitor_reason, reason,
    validation_reason,
};
use radfm_api::continual::ANNOTATION_SCHEDULED;
use radfm_api::health;
use radfm_api::monitoring::{Look, ModelMonitor, ModelMonitorStatus, Statistic, Verdict};
use radfm_validation::monitor::MonitorReport;

use super::pod::look_pod;
use crate::continual_training::schedule::{self, Due, Schedule};
use crate::effects::PlannedEvent;
use crate::site_validator::LABEL_VERSION;
use crate::training_job::workers::PodPhase;

/// How often a running look is checked on.
pub const LOOK_POLL: Duration = Duration::from_secs(10);
/// How often the deployed alias is read while nothing is due (a new version changes what
/// `Drifting` can say).
pub const ALIAS_POLL: Duration = Duration::from_secs(300);

/// This site's stored report of the deployed version.
#[derive(Debug, Clone)]
pub struct Found {
    /// Where it is.
    pub uri: String,
    /// Its verified content, or why it does not verify or does not belong to this monitor.
    pub report: Result<MonitorReport, String>,
}

/// The version the deployed alias points to.
#[derive(Debug, Clone)]
pub struct Deployed {
    /// Its number.
    pub version: u64,
    /// This site's report of it, if any.
    pub report: Option<Found>,
}

/// What the controller saw for one ModelMonitor.
#[derive(Debug, Clone)]
pub struct Observed {
    /// The parsed schedule, or why the spec's schedule or time zone cannot be used.
    pub schedule: Result<Schedule, String>,
    /// The deployed version (None: the alias points nowhere), or why the registry could not
    /// say.
    pub deployed: Result<Option<Deployed>, String>,
    /// This monitor's pods.
    pub pods: Vec<Pod>,
    /// The current time.
    pub now: Timestamp,
    /// Why the cluster's pod policy refuses the monitor's `dataVolume`, if it does.
    pub policy_violation: Option<crate::pod_policy::Violation>,
}

/// What the controller must do: delete pods, create the pod, write the status, record events.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Pods to delete (finished looks).
    pub delete_pods: Vec<String>,
    /// The pod of a look to create.
    pub create_pod: Option<Pod>,
    /// The status to write.
    pub status: ModelMonitorStatus,
    /// Events to record after the status write.
    pub events: Vec<PlannedEvent>,
    /// Looks recorded by this pass (for the metrics' counters).
    pub recorded: Vec<Look>,
    /// When to look again (None: only when the object changes).
    pub requeue_after: Option<Duration>,
}

/// Decides what to do for `mm`.
pub fn plan(mm: &ModelMonitor, obs: &Observed) -> Plan {
    let stamp = Stamp {
        generation: mm.metadata.generation,
        now: Time(obs.now),
    };
    let mut status = mm.status.clone().unwrap_or_default();
    status.observed_generation = mm.metadata.generation;
    let mut plan = Plan {
        delete_pods: Vec::new(),
        create_pod: None,
        status,
        events: Vec::new(),
        recorded: Vec::new(),
        requeue_after: Some(ALIAS_POLL),
    };
    match (&obs.schedule, &obs.policy_violation, &obs.deployed) {
        (Err(e), _, _) => {
            let why = continual_reason::INVALID_SPEC;
            if stamp.set(&mut plan.status.conditions, Cond::Ready, false, why, e) {
                plan.events.push(PlannedEvent::warning(why, e.clone()));
            }
            plan.requeue_after = None;
        }
        (Ok(_), Some(violation), _) => {
            let why = reason::POD_POLICY_VIOLATION;
            let msg = format!("refused by the cluster's radfm pod policy: {violation}");
            if stamp.set(&mut plan.status.conditions, Cond::Ready, false, why, &msg) {
                plan.events.push(PlannedEvent::warning(why, msg));
            }
            plan.requeue_after = None;
        }
        (Ok(_), None, Err(e)) => {
            let why = validation_reason::REGISTRY_ERROR;
            stamp.set(&mut plan.status.conditions, Cond::Ready, false, why, e);
            plan.requeue_after = Some(Duration::from_secs(30));
        }
        (Ok(sched), None, Ok(deployed)) => {
            follow_looks(mm, deployed.as_ref(), &obs.pods, &mut plan);
            schedule_look(mm, sched, deployed.as_ref(), obs.now, &mut plan);
            report_ready(mm, &stamp, deployed.as_ref(), &mut plan.status);
            report_drifting(&stamp, deployed.as_ref(), &mut plan.status);
        }
    }
    report_looking(&stamp, &mut plan.status);
    health::follow_ready(&mut plan.status.conditions, &stamp);
    if plan.status.running.is_some() {
        plan.requeue_after = Some(LOOK_POLL);
    }
    plan
}

/// The scheduled time a look's pod was created for.
fn scheduled_of(pod: &Pod) -> Option<Timestamp> {
    pod.annotations().get(ANNOTATION_SCHEDULED)?.parse().ok()
}

/// Finished looks are recorded or reported failed, and their pods go; a look in progress stays
/// `running`.
fn follow_looks(mm: &ModelMonitor, deployed: Option<&Deployed>, pods: &[Pod], plan: &mut Plan) {
    let was_running = plan.status.running.take();
    for pod in pods {
        let name = pod.name_any();
        let phase = PodPhase::of(pod);
        let version: Option<u64> = pod.labels().get(LABEL_VERSION).and_then(|v| v.parse().ok());
        let answered = deployed
            .filter(|d| Some(d.version) == version)
            .and_then(|d| d.report.as_ref())
            .filter(|f| {
                f.report
                    .as_ref()
                    .is_ok_and(|r| r.look.as_deref() == Some(name.as_str()))
            });
        let already = plan.status.looks.iter().any(|l| l.pod == name);
        match answered {
            Some(found) if !already => record(mm, pod, found, plan),
            Some(_) => {}
            None if phase.is_finished() => {
                if !already {
                    look_failed(deployed, pod, version, plan);
                }
            }
            None => {
                plan.status.running = Some(name.clone());
                continue;
            }
        }
        if phase.is_finished() {
            plan.delete_pods.push(name);
        }
    }
    if let Some(gone) = was_running {
        let seen = pods.iter().any(|p| p.name_any() == gone)
            || plan.status.looks.iter().any(|l| l.pod == gone);
        if !seen {
            let note = format!("pod {gone} disappeared before it reported");
            plan.events
                .push(PlannedEvent::warning(monitor_reason::LOOK_FAILED, note));
        }
    }
}

/// The look's report is in: it becomes the last look, at the head of the history.
fn record(mm: &ModelMonitor, pod: &Pod, found: &Found, plan: &mut Plan) {
    let Ok(r) = &found.report else { return };
    let look = look_of(pod, r, &found.uri);
    let (why, note) = match look.verdict {
        Verdict::Drifting => (
            monitor_reason::DRIFT_DETECTED,
            format!(
                "{} v{} drifts at {}: {}",
                r.model,
                r.version,
                r.site,
                look.evidence().join("; ")
            ),
        ),
        Verdict::Stable => (
            monitor_reason::NO_DRIFT,
            format!(
                "{} v{} at {}: no drift over {} statistic(s) at α = {}",
                r.model,
                r.version,
                r.site,
                look.statistics.len(),
                r.alpha
            ),
        ),
    };
    plan.events.push(match look.verdict {
        Verdict::Drifting => PlannedEvent::warning(why, note),
        Verdict::Stable => PlannedEvent::normal(why, note),
    });
    let st = &mut plan.status;
    st.looks.insert(0, look.clone());
    st.looks
        .truncate(mm.spec.looks_history_limit.clamp(1, 50) as usize);
    st.last_look = Some(look.clone());
    plan.recorded.push(look);
}

/// The status's view of a report.
fn look_of(pod: &Pod, r: &MonitorReport, uri: &str) -> Look {
    let created = r
        .created
        .parse::<Timestamp>()
        .unwrap_or(Timestamp::UNIX_EPOCH);
    Look {
        pod: pod.name_any(),
        version: r.version as i64,
        scheduled: Time(scheduled_of(pod).unwrap_or(created)),
        time: Time(created),
        verdict: if r.drifting {
            Verdict::Drifting
        } else {
            Verdict::Stable
        },
        alpha: r.alpha,
        statistics: r
            .watched
            .iter()
            .map(|w| Statistic {
                name: w.name.clone(),
                value: w.test.statistic,
                adjusted_p: w.adjusted_p,
                drifting: w.drifting,
            })
            .collect(),
        report: uri.to_string(),
    }
}

fn look_failed(deployed: Option<&Deployed>, pod: &Pod, version: Option<u64>, plan: &mut Plan) {
    let name = pod.name_any();
    let exit = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.terminated.as_ref())
        .map_or(String::new(), |t| {
            format!(
                " (exit code {}{})",
                t.exit_code,
                t.reason
                    .as_ref()
                    .map_or(String::new(), |r| format!(", {r}"))
            )
        });
    let why = match deployed.and_then(|d| d.report.as_ref()) {
        Some(Found { report: Err(e), .. }) => format!("; the stored report is refused: {e}"),
        _ => String::new(),
    };
    let at = version.map_or("an unknown version".into(), |v| format!("v{v}"));
    let note = format!("look {name} at {at} ended without its report{exit}{why}");
    plan.events
        .push(PlannedEvent::warning(monitor_reason::LOOK_FAILED, note));
}

/// A due time starts a look at the deployed version, unless one runs, the monitor is
/// suspended or nothing is deployed.
fn schedule_look(
    mm: &ModelMonitor,
    sched: &Schedule,
    deployed: Option<&Deployed>,
    now: Timestamp,
    plan: &mut Plan,
) {
    let last = plan
        .status
        .last_schedule_time
        .as_ref()
        .map(|t| t.0)
        .or(mm.metadata.creation_timestamp.as_ref().map(|t| t.0))
        .unwrap_or(now);
    if !mm.spec.suspend && plan.status.running.is_none() {
        start_due_look(mm, sched, deployed, last, now, plan);
    }
    let last = plan
        .status
        .last_schedule_time
        .as_ref()
        .map_or(last, |t| t.0);
    let next = sched.next_after(last.max(now));
    plan.status.next_schedule_time = next.map(Time);
    if let Some(n) = next {
        let until = n.duration_since(now).as_secs().max(1) as u64;
        plan.requeue_after = Some(ALIAS_POLL.min(Duration::from_secs(until)));
    }
}

fn start_due_look(
    mm: &ModelMonitor,
    sched: &Schedule,
    deployed: Option<&Deployed>,
    last: Timestamp,
    now: Timestamp,
    plan: &mut Plan,
) {
    match schedule::due(sched, last, now, mm.spec.starting_deadline_seconds) {
        Due::NotYet { .. } => {}
        Due::TooLate { scheduled } => {
            plan.status.last_schedule_time = Some(Time(scheduled));
            let note = format!(
                "the look scheduled at {scheduled} is past startingDeadlineSeconds; skipped"
            );
            plan.events.push(PlannedEvent::warning(
                continual_reason::MISSED_DEADLINE,
                note,
            ));
        }
        Due::Fire { scheduled, .. } => {
            plan.status.last_schedule_time = Some(Time(scheduled));
            let Some(d) = deployed else {
                let note = format!(
                    "scheduled {scheduled}: no look; alias {} of {} points to no version",
                    mm.spec.deployed_alias, mm.spec.model
                );
                plan.events
                    .push(PlannedEvent::normal(monitor_reason::NOTHING_DEPLOYED, note));
                return;
            };
            let pod = look_pod(mm, d.version, scheduled);
            let name = pod.name_any();
            let note = format!(
                "looking at {} v{} in pod {name} (scheduled {scheduled})",
                mm.spec.model, d.version
            );
            plan.events
                .push(PlannedEvent::normal(monitor_reason::LOOK_STARTED, note));
            plan.status.running = Some(name);
            plan.create_pod = Some(pod);
        }
    }
}

fn report_ready(
    mm: &ModelMonitor,
    stamp: &Stamp,
    deployed: Option<&Deployed>,
    st: &mut ModelMonitorStatus,
) {
    let (why, msg) = match deployed {
        _ if mm.spec.suspend => (
            continual_reason::SUSPENDED,
            "spec.suspend is true: no new looks".to_string(),
        ),
        None => (
            monitor_reason::NOTHING_DEPLOYED,
            format!(
                "alias {} of {} points to no version",
                mm.spec.deployed_alias, mm.spec.model
            ),
        ),
        Some(d) => (
            monitor_reason::SCHEDULING,
            format!(
                "watching {} v{} ({})",
                mm.spec.model, d.version, mm.spec.deployed_alias
            ),
        ),
    };
    stamp.set(&mut st.conditions, Cond::Ready, true, why, &msg);
}

/// `Drifting` speaks of the deployed version only: after a new version is deployed it is
/// Unknown until a look at that version.
fn report_drifting(stamp: &Stamp, deployed: Option<&Deployed>, st: &mut ModelMonitorStatus) {
    let current = deployed.and_then(|d| {
        st.looks
            .iter()
            .find(|l| l.version == d.version as i64)
            .map(|l| (d, l))
    });
    match (current, deployed) {
        (Some((_, look)), _) => {
            let (state, why, msg) = match look.verdict {
                Verdict::Drifting => (
                    true,
                    monitor_reason::DRIFT_DETECTED,
                    format!(
                        "look {} at v{}: {}",
                        look.pod,
                        look.version,
                        look.evidence().join("; ")
                    ),
                ),
                Verdict::Stable => (
                    false,
                    monitor_reason::NO_DRIFT,
                    format!(
                        "look {} at v{}: no statistic below α = {}",
                        look.pod, look.version, look.alpha
                    ),
                ),
            };
            stamp.set(&mut st.conditions, Cond::Drifting, state, why, &msg);
        }
        (None, Some(d)) => {
            let msg = format!("no look at v{} yet", d.version);
            stamp.set_unknown(
                &mut st.conditions,
                Cond::Drifting,
                monitor_reason::NOT_LOOKED,
                &msg,
            );
        }
        (None, None) => {
            let msg = "nothing deployed";
            stamp.set_unknown(
                &mut st.conditions,
                Cond::Drifting,
                monitor_reason::NOTHING_DEPLOYED,
                msg,
            );
        }
    }
}

fn report_looking(stamp: &Stamp, st: &mut ModelMonitorStatus) {
    let (state, why, msg) = match &st.running {
        Some(p) => (true, monitor_reason::LOOK_STARTED, format!("pod {p}")),
        None => (
            false,
            validation_reason::IDLE,
            "no look in progress".to_string(),
        ),
    };
    stamp.set(&mut st.conditions, Cond::Looking, state, why, &msg);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model_monitor::pod::tests::monitor;
    use radfm_api::conditions;
    use radfm_validation::drift::DriftTest;
    use radfm_validation::monitor::Watched;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    const SIX: i64 = 6 * 3600;

    fn report(version: u64, look: &str, drifting: bool) -> MonitorReport {
        let watched = |name: &str, p: f64| Watched {
            name: name.into(),
            test: DriftTest {
                statistic: 0.2,
                p_value: p,
                permutations: 999,
                reference: 200,
                recent: 200,
            },
            adjusted_p: p,
            drifting: p < 0.01,
        };
        MonitorReport {
            format: radfm_validation::monitor::FORMAT.into(),
            model: "chest".into(),
            version,
            weights_sha256: "w".into(),
            site: "north".into(),
            reference_fingerprint: "a".into(),
            recent_fingerprint: "b".into(),
            created: "1970-01-01T06:00:40Z".into(),
            code_version: "0".into(),
            alpha: 0.01,
            watched: vec![
                watched("embeddings", if drifting { 0.001 } else { 0.4 }),
                watched("metadata:sex", 0.6),
            ],
            drifting,
            performance: Vec::new(),
            look: Some(look.into()),
        }
    }

    fn pod(name: &str, version: u64, phase: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": name,
                "labels": {LABEL_VERSION: version.to_string()},
                "annotations": {ANNOTATION_SCHEDULED: "1970-01-01T06:00:00Z"},
            },
            "status": {"phase": phase},
        }))
        .unwrap()
    }

    fn deployed(version: u64, report: Option<MonitorReport>) -> Result<Option<Deployed>, String> {
        Ok(Some(Deployed {
            version,
            report: report.map(|r| Found {
                uri: format!("s3://r/models/chest/monitoring/v{version:06}/north.json"),
                report: Ok(r),
            }),
        }))
    }

    fn observe(deployed: Result<Option<Deployed>, String>, pods: Vec<Pod>, now: i64) -> Observed {
        Observed {
            schedule: Schedule::parse("0 6 * * *", None).map_err(|e| e.to_string()),
            deployed,
            pods,
            now: at(now),
            policy_violation: None,
        }
    }

    fn reasons(p: &Plan) -> Vec<&'static str> {
        p.events.iter().map(|e| e.reason).collect()
    }

    fn condition(p: &Plan, ty: Cond) -> (String, String) {
        let c = conditions::get(&p.status.conditions, ty).unwrap();
        (c.status.clone(), c.reason.clone())
    }

    /// Applies a plan's status to the object, as the status write does.
    fn after(mut mm: ModelMonitor, p: &Plan) -> ModelMonitor {
        mm.status = Some(p.status.clone());
        mm
    }

    #[test]
    fn a_due_time_starts_one_look_at_the_deployed_version_and_its_report_records_the_verdict() {
        use monitor_reason::*;
        let mm = monitor("");
        // Before 06:00 nothing is due; the next time is shown.
        let early = plan(&mm, &observe(deployed(3, None), vec![], SIX - 60));
        assert!(early.create_pod.is_none());
        assert_eq!(early.status.next_schedule_time, Some(Time(at(SIX))));
        assert_eq!(condition(&early, Cond::Drifting).0, "Unknown");
        assert_eq!(early.requeue_after, Some(Duration::from_secs(60)));
        // At 06:00 the look's pod starts.
        let start = plan(&mm, &observe(deployed(3, None), vec![], SIX + 1));
        let pod_name = start.create_pod.as_ref().unwrap().name_any();
        assert_eq!(pod_name, "north-360");
        assert_eq!(reasons(&start), [LOOK_STARTED]);
        assert_eq!(start.status.running.as_deref(), Some("north-360"));
        assert_eq!(condition(&start, Cond::Looking).0, "True");
        assert_eq!(start.requeue_after, Some(LOOK_POLL));
        let mm = after(mm, &start);
        // Running, no report yet: nothing new.
        let waiting = plan(
            &mm,
            &observe(
                deployed(3, None),
                vec![pod("north-360", 3, "Running")],
                SIX + 20,
            ),
        );
        assert!(waiting.create_pod.is_none() && waiting.events.is_empty());
        assert_eq!(waiting.status.running.as_deref(), Some("north-360"));
        // An earlier look's report of the same version is not this look's.
        let stale = plan(
            &mm,
            &observe(
                deployed(3, Some(report(3, "north-359", false))),
                vec![pod("north-360", 3, "Running")],
                SIX + 30,
            ),
        );
        assert!(stale.status.last_look.is_none() && stale.events.is_empty());
        // The report names the look: recorded, Drifting set, the finished pod deleted.
        let done = plan(
            &mm,
            &observe(
                deployed(3, Some(report(3, "north-360", true))),
                vec![pod("north-360", 3, "Succeeded")],
                SIX + 45,
            ),
        );
        assert_eq!(reasons(&done), [DRIFT_DETECTED]);
        assert_eq!(done.delete_pods, ["north-360"]);
        assert_eq!(
            condition(&done, Cond::Drifting),
            ("True".into(), DRIFT_DETECTED.into())
        );
        assert_eq!(condition(&done, Cond::Looking).0, "False");
        let look = done.status.last_look.clone().unwrap();
        assert_eq!((look.version, look.verdict), (3, Verdict::Drifting));
        assert_eq!(look.evidence(), ["embeddings (adjusted p = 0.0010)"]);
        assert_eq!(look.scheduled, Time(at(SIX)));
        assert_eq!(done.recorded.len(), 1);
        assert_eq!(done.status.running, None);
        // Recorded once: the next pass, pod gone, says nothing more.
        let mm = after(mm, &done);
        let quiet = plan(
            &mm,
            &observe(
                deployed(3, Some(report(3, "north-360", true))),
                vec![],
                SIX + 60,
            ),
        );
        assert!(
            quiet.events.is_empty() && quiet.recorded.is_empty(),
            "{:?}",
            quiet.events
        );
        assert_eq!(quiet.status.looks.len(), 1);
    }

    #[test]
    fn a_look_that_ends_without_its_report_is_reported_and_the_next_time_looks_again() {
        let mm = monitor("");
        let start = plan(&mm, &observe(deployed(3, None), vec![], SIX + 1));
        let mm = after(mm, &start);
        let mut failed = pod("north-360", 3, "Failed");
        failed.status = serde_json::from_value(serde_json::json!({
            "phase": "Failed",
            "containerStatuses": [{"name": "monitor", "image": "i", "imageID": "", "ready": false,
                "restartCount": 0, "state": {"terminated": {"exitCode": 2, "reason": "Error"}}}],
        }))
        .unwrap();
        let p = plan(&mm, &observe(deployed(3, None), vec![failed], SIX + 50));
        assert_eq!(reasons(&p), [monitor_reason::LOOK_FAILED]);
        assert!(
            p.events[0].note.contains("exit code 2, Error"),
            "{}",
            p.events[0].note
        );
        assert_eq!(p.delete_pods, ["north-360"]);
        assert_eq!(p.status.running, None);
        assert_eq!(condition(&p, Cond::Drifting).0, "Unknown");
        // The next day's time starts a new look.
        let mm = after(mm, &p);
        let next = plan(&mm, &observe(deployed(3, None), vec![], SIX + 86_400 + 5));
        assert_eq!(next.create_pod.unwrap().name_any(), "north-1800");
    }

    #[test]
    fn a_time_due_while_a_look_runs_waits_for_it_and_a_missed_deadline_is_skipped() {
        let mm = monitor("  startingDeadlineSeconds: 600");
        let start = plan(&mm, &observe(deployed(3, None), vec![], SIX + 1));
        let mm = after(mm, &start);
        // A day later the look still runs: no second pod.
        let busy = plan(
            &mm,
            &observe(
                deployed(3, None),
                vec![pod("north-360", 3, "Running")],
                SIX + 86_400 + 5,
            ),
        );
        assert!(busy.create_pod.is_none());
        assert_eq!(busy.status.last_schedule_time, Some(Time(at(SIX))));
        // Once it ended, the time an hour back is past the 10-minute deadline: skipped.
        let mut mm = after(mm, &busy);
        mm.status.as_mut().unwrap().running = None;
        let late = plan(
            &mm,
            &observe(deployed(3, None), vec![], SIX + 86_400 + 3600),
        );
        assert!(late.create_pod.is_none());
        assert_eq!(reasons(&late), [continual_reason::MISSED_DEADLINE]);
        assert_eq!(late.status.last_schedule_time, Some(Time(at(SIX + 86_400))));
    }

    #[test]
    fn drifting_speaks_only_of_the_deployed_version() {
        let mm = monitor("");
        let start = plan(&mm, &observe(deployed(3, None), vec![], SIX + 1));
        let mm = after(mm, &start);
        let done = plan(
            &mm,
            &observe(
                deployed(3, Some(report(3, "north-360", false))),
                vec![pod("north-360", 3, "Succeeded")],
                SIX + 45,
            ),
        );
        assert_eq!(
            condition(&done, Cond::Drifting),
            ("False".into(), monitor_reason::NO_DRIFT.into())
        );
        assert_eq!(reasons(&done), [monitor_reason::NO_DRIFT]);
        // v4 is promoted: the look at v3 says nothing about it.
        let mm = after(mm, &done);
        let promoted = plan(&mm, &observe(deployed(4, None), vec![], SIX + 120));
        assert_eq!(
            condition(&promoted, Cond::Drifting),
            ("Unknown".into(), monitor_reason::NOT_LOOKED.into())
        );
        assert_eq!(promoted.status.last_look.unwrap().version, 3);
    }

    #[test]
    fn suspension_nothing_deployed_a_bad_schedule_or_registry_start_no_look_and_say_why() {
        let suspended = monitor("  suspend: true");
        let p = plan(&suspended, &observe(deployed(3, None), vec![], SIX + 1));
        assert!(p.create_pod.is_none());
        assert_eq!(
            condition(&p, Cond::Ready),
            ("True".into(), continual_reason::SUSPENDED.into())
        );
        let mm = monitor("");
        let none = plan(&mm, &observe(Ok(None), vec![], SIX + 1));
        assert!(none.create_pod.is_none());
        assert_eq!(reasons(&none), [monitor_reason::NOTHING_DEPLOYED]);
        assert_eq!(
            condition(&none, Cond::Ready),
            ("True".into(), monitor_reason::NOTHING_DEPLOYED.into())
        );
        let broken = plan(
            &mm,
            &observe(Err("registry: denied".into()), vec![], SIX + 1),
        );
        assert!(broken.create_pod.is_none());
        assert_eq!(
            condition(&broken, Cond::Ready),
            ("False".into(), validation_reason::REGISTRY_ERROR.into())
        );
        assert_eq!(broken.requeue_after, Some(Duration::from_secs(30)));
        let mut bad = observe(deployed(3, None), vec![], SIX + 1);
        bad.schedule = Err("spec.schedule: \"every day\" is not a 5-field cron expression".into());
        let p = plan(&mm, &bad);
        assert!(p.create_pod.is_none());
        assert_eq!(
            condition(&p, Cond::Ready),
            ("False".into(), continual_reason::INVALID_SPEC.into())
        );
        assert_eq!(p.requeue_after, None);
        let stalled = p.status.conditions.iter().find(|c| c.type_ == "Stalled");
        assert_eq!(stalled.map(|c| c.status.as_str()), Some("True"));
    }

    #[test]
    fn the_history_keeps_the_newest_looks_up_to_its_limit() {
        let mut mm = monitor("  looksHistoryLimit: 2");
        for day in 0..3i64 {
            let t = SIX + day * 86_400;
            let start = plan(&mm, &observe(deployed(3, None), vec![], t + 1));
            let name = start.create_pod.as_ref().unwrap().name_any();
            mm = after(mm, &start);
            let mut p = pod(&name, 3, "Succeeded");
            p.metadata.annotations =
                Some([(ANNOTATION_SCHEDULED.to_string(), at(t).to_string())].into());
            let done = plan(
                &mm,
                &observe(
                    deployed(3, Some(report(3, &name, day == 2))),
                    vec![p],
                    t + 40,
                ),
            );
            mm = after(mm, &done);
        }
        let st = mm.status.unwrap();
        let pods: Vec<&str> = st.looks.iter().map(|l| l.pod.as_str()).collect();
        assert_eq!(pods, ["north-3240", "north-1800"]);
        assert_eq!(st.last_look.unwrap().verdict, Verdict::Drifting);
    }
}
