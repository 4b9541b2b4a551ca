//! Pure decisions of continual training: when a schedule is due, whether new data justifies a
//! run, what the concurrency policy allows, which finished runs to prune, and which shards a run
//! trains on. Time is always passed in, so tests never wait for a cron minute.
//!
//! Scheduling follows Kubernetes CronJob semantics: only the most recent missed time is run (no
//! catch-up storm), a run later than `startingDeadlineSeconds` after its scheduled time is
//! skipped, and the name of a run derives from its scheduled time, so an operator restarted at
//! the firing instant creates the same object again (AlreadyExists) instead of a second run.

use std::str::FromStr;

use jiff::Timestamp;
use jiff::tz::TimeZone;

use radfm_api::continual::TriggerKind;

use crate::{Error, Result};

/// A parsed cron schedule in a time zone.
#[derive(Debug, Clone)]
pub struct Schedule {
    cron: jiff_cron::Schedule,
    tz: TimeZone,
}

impl Schedule {
    /// Parses a standard 5-field cron expression (minute hour day-of-month month day-of-week, or
    /// `@hourly`, `@daily`, `@weekly`, `@monthly`) in an IANA time zone (default UTC).
    pub fn parse(expr: &str, time_zone: Option<&str>) -> Result<Schedule> {
        let fields: Vec<&str> = expr.split_whitespace().collect();
        let seven = match fields.as_slice() {
            ["@hourly"] => "0 0 * * * * *".to_string(),
            ["@daily"] | ["@midnight"] => "0 0 0 * * * *".to_string(),
            ["@weekly"] => "0 0 0 * * Sun *".to_string(),
            ["@monthly"] => "0 0 0 1 * * *".to_string(),
            [m, h, dom, mon, dow] => format!("0 {m} {h} {dom} {mon} {dow} *"),
            _ => {
                return Err(Error::Invalid {
                    field: "spec.schedule".into(),
                    reason: format!("{expr:?} is not a 5-field cron expression"),
                });
            }
        };
        let cron = jiff_cron::Schedule::from_str(&seven).map_err(|e| Error::Invalid {
            field: "spec.schedule".into(),
            reason: format!("{expr:?}: {e}"),
        })?;
        let tz = match time_zone {
            None | Some("") => TimeZone::UTC,
            Some(name) => TimeZone::get(name).map_err(|e| Error::Invalid {
                field: "spec.timeZone".into(),
                reason: format!("{name:?}: {e}"),
            })?,
        };
        Ok(Schedule { cron, tz })
    }

    /// The first scheduled time strictly after `t`.
    pub fn next_after(&self, t: Timestamp) -> Option<Timestamp> {
        self.cron
            .after(t.to_zoned(self.tz.clone()))
            .next()
            .map(|z| z.timestamp())
    }
}

/// What the schedule says at `now`.
#[derive(Debug, Clone, PartialEq)]
pub enum Due {
    /// Run now for this scheduled time; `missed` earlier times since the last run were skipped.
    Fire {
        /// The scheduled time being run.
        scheduled: Timestamp,
        /// Scheduled times skipped (no catch-up).
        missed: u32,
    },
    /// The most recent scheduled time is past its starting deadline.
    TooLate {
        /// The scheduled time that was missed.
        scheduled: Timestamp,
    },
    /// Nothing is due before `next`.
    NotYet {
        /// The next scheduled time.
        next: Option<Timestamp>,
    },
}

/// The schedule's decision at `now`, given the last scheduled time that was handled (or the
/// resource's creation time) and the optional starting deadline.
pub fn due(
    schedule: &Schedule,
    last_handled: Timestamp,
    now: Timestamp,
    starting_deadline_seconds: Option<i64>,
) -> Due {
    let mut latest = None;
    let mut count = 0u32;
    let mut t = last_handled;
    while let Some(n) = schedule.next_after(t) {
        if n > now {
            break;
        }
        latest = Some(n);
        count += 1;
        t = n;
        if count > 10_000 {
            break; // bounded work for a schedule left suspended for years
        }
    }
    match latest {
        None => Due::NotYet {
            next: schedule.next_after(now.max(last_handled)),
        },
        Some(s) => {
            let late = now.duration_since(s).as_secs();
            if starting_deadline_seconds.is_some_and(|d| late > d) {
                Due::TooLate { scheduled: s }
            } else {
                Due::Fire {
                    scheduled: s,
                    missed: count - 1,
                }
            }
        }
    }
}

/// Drift reported by sites, as the drift trigger counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DriftCount {
    /// Trusted sites whose latest report of the monitored version drifted since the last
    /// successful run.
    pub drifting: u64,
    /// trigger.drift.minSites.
    pub needed: u64,
}

/// Which rule justifies a run, if any: at least `min_new_shards` new shards; or at least one
/// new shard once `max_interval_seconds` have passed since the last successful run; or at least
/// one new shard with drift at enough sites. Without new data nothing runs.
pub fn trigger(
    new_shards: u64,
    min_new_shards: u64,
    since_last_success_secs: Option<i64>,
    max_interval_seconds: Option<i64>,
    drift: Option<DriftCount>,
) -> Option<TriggerKind> {
    if new_shards == 0 {
        return None;
    }
    if new_shards >= min_new_shards.max(1) {
        return Some(TriggerKind::NewData);
    }
    let interval = match (since_last_success_secs, max_interval_seconds) {
        (Some(since), Some(max)) => since >= max,
        (None, Some(_)) => true,
        _ => false,
    };
    if interval {
        return Some(TriggerKind::MaxInterval);
    }
    drift
        .filter(|d| d.drifting >= d.needed.max(1))
        .map(|_| TriggerKind::Drift)
}

/// CronJob's concurrency policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Concurrency {
    /// Runs may overlap.
    Allow,
    /// Skip a due run while one is active.
    Forbid,
    /// Stop the active runs, then start the new one.
    Replace,
}

/// What to do about a due run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Create the run.
    Start,
    /// Do not run this time.
    Skip,
    /// Delete these active runs first, then create the run.
    ReplaceThenStart(Vec<String>),
}

/// The concurrency policy applied to the active runs.
pub fn admit(policy: Concurrency, active: &[String]) -> Admission {
    match (policy, active.is_empty()) {
        (_, true) | (Concurrency::Allow, _) => Admission::Start,
        (Concurrency::Forbid, false) => Admission::Skip,
        (Concurrency::Replace, false) => Admission::ReplaceThenStart(active.to_vec()),
    }
}

/// A finished run.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    /// Its name.
    pub name: String,
    /// When it finished.
    pub at: Timestamp,
    /// Whether it succeeded.
    pub succeeded: bool,
}

/// The finished runs to delete so that at most `keep_ok` successful and `keep_failed` failed
/// ones (the newest) remain.
pub fn prune(finished: &[Finished], keep_ok: usize, keep_failed: usize) -> Vec<String> {
    let mut out = Vec::new();
    for (ok, keep) in [(true, keep_ok), (false, keep_failed)] {
        let mut runs: Vec<&Finished> = finished.iter().filter(|f| f.succeeded == ok).collect();
        runs.sort_by(|a, b| b.at.cmp(&a.at).then_with(|| b.name.cmp(&a.name)));
        out.extend(runs.iter().skip(keep).map(|f| f.name.clone()));
    }
    out.sort();
    out
}

/// The shards a run trains on: every shard after the watermark and every shard returned by a
/// rejected candidate, plus a deterministic sample of `replay` × (new shards) earlier shards
/// against forgetting (at least one when `replay` > 0 and earlier shards exist).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Shard sequence numbers after the watermark, and the returned ones.
    pub new: Vec<u64>,
    /// Of `new`, the shards at or before the watermark that only rejected candidates trained
    /// on: eligible again.
    pub returned: Vec<u64>,
    /// Earlier shards replayed.
    pub replay: Vec<u64>,
    /// The watermark after the run succeeds (the last new shard).
    pub next_watermark: Option<u64>,
}

/// The data window for a run from the index's shard sequence numbers (sorted), the current
/// watermark (the last shard already trained on; None: nothing yet) and the shards returned by
/// rejected candidates. `seed` makes the replay sample reproducible (the scheduled time, in
/// practice).
pub fn window(
    shards: &[u64],
    watermark: Option<u64>,
    returned: &[u64],
    replay: f64,
    seed: u64,
) -> Window {
    let before = |s: u64| watermark.is_some_and(|w| s <= w);
    let (old, new): (Vec<u64>, Vec<u64>) = shards
        .iter()
        .partition(|&&s| before(s) && !returned.contains(&s));
    let after: Option<u64> = new.iter().copied().filter(|s| !before(*s)).max();
    let returned: Vec<u64> = new.iter().copied().filter(|s| before(*s)).collect();
    let want = if replay > 0.0 && !old.is_empty() && !new.is_empty() {
        ((new.len() as f64 * replay).ceil() as usize).clamp(1, old.len())
    } else {
        0
    };
    // A seeded partial Fisher-Yates shuffle (splitmix64), enough for a reproducible sample.
    let mut pool = old.clone();
    let mut x = seed ^ 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    for i in 0..want {
        let j = i + (next() % (pool.len() - i) as u64) as usize;
        pool.swap(i, j);
    }
    let mut replayed: Vec<u64> = pool.into_iter().take(want).collect();
    replayed.sort_unstable();
    Window {
        next_watermark: after.or(watermark),
        new,
        returned,
        replay: replayed,
    }
}

/// The deterministic name of the run scheduled at `scheduled`: `<name>-<minutes since epoch>`,
/// with `name` shortened so the result fits TrainingJob's 40-character limit.
pub fn run_name(name: &str, scheduled: Timestamp) -> String {
    let suffix = format!("-{}", scheduled.as_second().div_euclid(60));
    let room = 40usize.saturating_sub(suffix.len());
    let base: String = name.chars().take(room).collect();
    format!("{}{suffix}", base.trim_end_matches('-'))
}

/// Parses a Go duration (`168h`, `1h30m`, `90s`, `1.5h`), as the API server's CEL `duration()`
/// accepts it, into whole seconds.
pub fn parse_go_duration(text: &str, field: &str) -> Result<i64> {
    let bad = |why: &str| Error::Invalid {
        field: field.into(),
        reason: format!("{text:?} {why}"),
    };
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(bad("is empty"));
    }
    let mut nanos: f64 = 0.0;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| bad("lacks a unit (ns, us, ms, s, m, h)"))?;
        let value: f64 = rest[..num_len]
            .parse()
            .map_err(|_| bad("is not a duration like 24h or 1h30m"))?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            u => return Err(bad(&format!("has unknown unit {u:?}"))),
        };
        nanos += value * scale;
        rest = &rest[unit_len..];
    }
    Ok((nanos / 1e9).floor() as i64)
}

/// What a due scheduled evaluation needs to know.
#[derive(Debug, Clone)]
pub struct Inputs<'a> {
    /// The scheduled time being handled (seeds the replay sample).
    pub scheduled: Timestamp,
    /// Shard sequence numbers in the dataset index.
    pub shards: &'a [u64],
    /// Last shard already trained on by a registered run.
    pub watermark: Option<u64>,
    /// Shards at or before the watermark that only rejected candidates trained on.
    pub returned: &'a [u64],
    /// Replay fraction.
    pub replay: f64,
    /// trigger.minNewShards.
    pub min_new_shards: u64,
    /// Seconds since the last successful run, if any.
    pub since_last_success_secs: Option<i64>,
    /// trigger.maxInterval in seconds.
    pub max_interval_secs: Option<i64>,
    /// Drift at sites, where trigger.drift is set.
    pub drift: Option<DriftCount>,
    /// concurrencyPolicy.
    pub policy: Concurrency,
    /// Runs in progress.
    pub active: &'a [String],
}

/// The decision of a due scheduled evaluation.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Too little new data: nothing runs until the next scheduled time.
    NoNewData {
        /// Shards after the watermark.
        new: usize,
    },
    /// Forbid: a run is active.
    SkipActive,
    /// Create a run on this window, after deleting `replace`.
    Run {
        /// The rule that held.
        trigger: TriggerKind,
        /// The data window.
        window: Window,
        /// Active runs to delete first (Replace).
        replace: Vec<String>,
    },
}

/// Trigger, then concurrency policy, then the data window: the whole decision at a due time.
pub fn decide(i: &Inputs) -> Decision {
    let w = window(
        i.shards,
        i.watermark,
        i.returned,
        i.replay,
        i.scheduled.as_second() as u64,
    );
    let Some(trigger) = trigger(
        w.new.len() as u64,
        i.min_new_shards,
        i.since_last_success_secs,
        i.max_interval_secs,
        i.drift,
    ) else {
        return Decision::NoNewData { new: w.new.len() };
    };
    match admit(i.policy, i.active) {
        Admission::Skip => Decision::SkipActive,
        Admission::Start => Decision::Run {
            trigger,
            window: w,
            replace: Vec::new(),
        },
        Admission::ReplaceThenStart(replace) => Decision::Run {
            trigger,
            window: w,
            replace,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_parse_like_the_api_server() {
        for (text, secs) in [
            ("24h", 86_400),
            ("1h30m", 5_400),
            ("90s", 90),
            ("1.5h", 5_400),
            ("2h0m30s", 7_230),
            ("1500ms", 1),
        ] {
            assert_eq!(parse_go_duration(text, "f").unwrap(), secs, "{text}");
        }
        for bad in ["", "24", "1d", "h", "1..5h"] {
            let e = parse_go_duration(bad, "spec.trigger.maxInterval").unwrap_err();
            assert!(
                e.to_string().starts_with("spec.trigger.maxInterval: "),
                "{bad}: {e}"
            );
        }
    }

    /// A due evaluation two shards past the watermark, needing two, with no run active.
    fn inputs(shards: &[u64]) -> Inputs<'_> {
        Inputs {
            scheduled: ts("2026-01-01T03:00:00Z"),
            shards,
            watermark: Some(3),
            returned: &[],
            replay: 0.5,
            min_new_shards: 2,
            since_last_success_secs: Some(600),
            max_interval_secs: None,
            drift: None,
            policy: Concurrency::Forbid,
            active: &[],
        }
    }

    #[test]
    fn due_evaluations_check_data_then_concurrency_then_build_the_window() {
        let shards: Vec<u64> = (0..6).collect();
        let active = vec!["ct-1".to_string()];
        let base = inputs(&shards);
        let Decision::Run {
            trigger,
            window,
            replace,
        } = decide(&base)
        else {
            panic!("two new shards must run")
        };
        assert_eq!(
            (window.new.as_slice(), window.replay.len()),
            (&[4, 5][..], 1)
        );
        assert!(replace.is_empty());
        assert_eq!(trigger, TriggerKind::NewData);
        let cases: Vec<(Inputs, Decision)> = vec![
            (
                Inputs {
                    watermark: Some(4),
                    ..base.clone()
                },
                Decision::NoNewData { new: 1 },
            ),
            (
                Inputs {
                    watermark: Some(5),
                    max_interval_secs: Some(60),
                    ..base.clone()
                },
                Decision::NoNewData { new: 0 },
            ),
            (
                Inputs {
                    active: &active,
                    ..base.clone()
                },
                Decision::SkipActive,
            ),
            (
                Inputs {
                    active: &active,
                    watermark: Some(5),
                    ..base.clone()
                },
                Decision::NoNewData { new: 0 },
            ),
        ];
        for (inputs, want) in cases {
            assert_eq!(decide(&inputs), want, "{inputs:?}");
        }
        let Decision::Run { replace, .. } = decide(&Inputs {
            active: &active,
            policy: Concurrency::Replace,
            ..base.clone()
        }) else {
            panic!("Replace runs")
        };
        assert_eq!(replace, active);
        // One new shard below the minimum, but maxInterval has passed since the last success.
        assert!(matches!(
            decide(&Inputs {
                watermark: Some(4),
                max_interval_secs: Some(600),
                ..base.clone()
            }),
            Decision::Run {
                trigger: TriggerKind::MaxInterval,
                ..
            }
        ));
    }

    #[test]
    fn drift_at_enough_sites_runs_on_fewer_new_shards_than_the_minimum() {
        let shards: Vec<u64> = (0..6).collect();
        let base = Inputs {
            watermark: Some(4),
            ..inputs(&shards)
        };
        let drift = |drifting| {
            decide(&Inputs {
                watermark: Some(4),
                drift: Some(DriftCount {
                    drifting,
                    needed: 2,
                }),
                ..base.clone()
            })
        };
        assert!(matches!(
            drift(2),
            Decision::Run {
                trigger: TriggerKind::Drift,
                ..
            }
        ));
        assert_eq!(drift(1), Decision::NoNewData { new: 1 });
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn next_runs_follow_the_time_zone_across_daylight_saving_changes() {
        // 02:30 every day in New York: on 2026-03-08 clocks jump from 02:00 to 03:00, so 02:30
        // does not exist that day; on 2026-11-01 01:30 happens twice.
        let s = Schedule::parse("30 2 * * *", Some("America/New_York")).unwrap();
        let before = ts("2026-03-07T12:00:00Z");
        let first = s.next_after(before).unwrap();
        // 02:30 does not exist on 2026-03-08: the run moves forward by the gap, to 03:30 EDT.
        assert_eq!(first, ts("2026-03-08T07:30:00Z"));
        let after_gap = s.next_after(first).unwrap();
        assert_eq!(after_gap, ts("2026-03-09T06:30:00Z")); // 02:30 EDT = 06:30 UTC
        let daily = Schedule::parse("0 9 * * *", Some("Europe/Berlin")).unwrap();
        assert_eq!(
            daily.next_after(ts("2026-10-25T06:00:00Z")).unwrap(),
            ts("2026-10-25T08:00:00Z") // CET after the switch: 09:00 = 08:00 UTC
        );
        assert_eq!(
            Schedule::parse("@hourly", None)
                .unwrap()
                .next_after(ts("2026-01-01T00:10:00Z")),
            Some(ts("2026-01-01T01:00:00Z"))
        );
    }

    #[test]
    fn bad_schedules_and_zones_name_the_field() {
        let e = Schedule::parse("* * *", None).unwrap_err();
        assert!(e.to_string().contains("spec.schedule"), "{e}");
        let e = Schedule::parse("61 * * * *", None).unwrap_err();
        assert!(e.to_string().contains("spec.schedule"), "{e}");
        let e = Schedule::parse("0 * * * *", Some("Mars/Olympus")).unwrap_err();
        assert!(e.to_string().contains("spec.timeZone"), "{e}");
    }

    #[test]
    fn only_the_latest_missed_time_fires_and_late_ones_are_skipped() {
        let s = Schedule::parse("0 * * * *", None).unwrap();
        let last = ts("2026-01-01T00:00:00Z");
        // Operator down for three and a half hours: one run, for 03:00, with two missed.
        assert_eq!(
            due(&s, last, ts("2026-01-01T03:30:00Z"), None),
            Due::Fire {
                scheduled: ts("2026-01-01T03:00:00Z"),
                missed: 2
            }
        );
        // With a 10-minute starting deadline the 03:00 run is too late at 03:30.
        assert_eq!(
            due(&s, last, ts("2026-01-01T03:30:00Z"), Some(600)),
            Due::TooLate {
                scheduled: ts("2026-01-01T03:00:00Z")
            }
        );
        assert_eq!(
            due(&s, last, ts("2026-01-01T00:59:59Z"), None),
            Due::NotYet {
                next: Some(ts("2026-01-01T01:00:00Z"))
            }
        );
        // Exactly at the firing instant.
        assert_eq!(
            due(&s, last, ts("2026-01-01T01:00:00Z"), Some(0)),
            Due::Fire {
                scheduled: ts("2026-01-01T01:00:00Z"),
                missed: 0
            }
        );
    }

    #[test]
    fn no_new_data_never_triggers_and_max_interval_or_drift_relax_the_minimum() {
        use TriggerKind::*;
        let drift = |drifting| {
            Some(DriftCount {
                drifting,
                needed: 1,
            })
        };
        let cases = [
            ((0, 1, None, Some(60), drift(3)), None),
            ((5, 5, Some(10), None, None), Some(NewData)),
            ((2, 5, Some(10), Some(3600), None), None),
            ((2, 5, Some(3600), Some(3600), None), Some(MaxInterval)),
            // Never succeeded: any new data.
            ((1, 5, None, Some(3600), None), Some(MaxInterval)),
            ((1, 0, Some(1), None, None), Some(NewData)),
            ((1, 5, Some(10), None, drift(1)), Some(Drift)),
            ((1, 5, Some(10), None, drift(0)), None),
            ((5, 5, Some(10), None, drift(1)), Some(NewData)),
        ];
        for ((new, min, since, max, drift), want) in cases {
            assert_eq!(
                trigger(new, min, since, max, drift),
                want,
                "{new} new, min {min}, since {since:?}, max {max:?}, {drift:?}"
            );
        }
    }

    #[test]
    fn concurrency_policies_match_cronjob() {
        let active = vec!["ct-1".to_string()];
        assert_eq!(admit(Concurrency::Forbid, &[]), Admission::Start);
        assert_eq!(admit(Concurrency::Forbid, &active), Admission::Skip);
        assert_eq!(admit(Concurrency::Allow, &active), Admission::Start);
        assert_eq!(
            admit(Concurrency::Replace, &active),
            Admission::ReplaceThenStart(active.clone())
        );
    }

    #[test]
    fn history_keeps_the_newest_of_each_outcome() {
        let f = |name: &str, min: i64, ok: bool| Finished {
            name: name.into(),
            at: Timestamp::from_second(min * 60).unwrap(),
            succeeded: ok,
        };
        let runs = [
            f("a", 1, true),
            f("b", 2, false),
            f("c", 3, true),
            f("d", 4, true),
            f("e", 5, false),
        ];
        assert_eq!(prune(&runs, 2, 1), ["a", "b"]);
        assert_eq!(prune(&runs, 0, 0), ["a", "b", "c", "d", "e"]);
        assert!(prune(&runs, 10, 10).is_empty());
    }

    #[test]
    fn windows_take_new_shards_and_a_reproducible_replay_sample() {
        let shards: Vec<u64> = (0..10).collect();
        let w = window(&shards, Some(6), &[], 0.5, 42);
        assert_eq!(w.new, [7, 8, 9]);
        assert_eq!(w.replay.len(), 2);
        assert!(w.replay.iter().all(|s| *s <= 6));
        assert_eq!(w.next_watermark, Some(9));
        assert_eq!(
            window(&shards, Some(6), &[], 0.5, 42),
            w,
            "same seed, same sample"
        );
        let first = window(&shards, None, &[], 0.5, 1);
        assert_eq!((first.new.len(), first.replay.len()), (10, 0));
        let none = window(&shards, Some(9), &[], 0.5, 1);
        assert!(none.new.is_empty() && none.replay.is_empty());
        assert_eq!(none.next_watermark, Some(9));
    }

    #[test]
    fn shards_only_a_rejected_candidate_trained_on_are_new_again_and_never_replayed() {
        let shards: Vec<u64> = (0..10).collect();
        // v2 (rejected) trained on 5 and 6; the watermark went to 6 when it registered.
        let w = window(&shards, Some(6), &[5, 6], 1.0, 7);
        assert_eq!(w.new, [5, 6, 7, 8, 9]);
        assert_eq!(w.returned, [5, 6]);
        assert!(w.replay.iter().all(|s| *s <= 4), "{w:?}");
        assert_eq!(w.next_watermark, Some(9));
        // Nothing after the watermark: the returned shards alone, the watermark unmoved.
        let only = window(&shards, Some(9), &[5, 6], 0.0, 7);
        assert_eq!(
            (only.new.clone(), only.next_watermark),
            (vec![5, 6], Some(9))
        );
        // A returned shard no longer in the index is not trained on.
        let gone = window(&[0, 1, 2], Some(2), &[5], 0.0, 7);
        assert!(gone.new.is_empty());
    }

    #[test]
    fn run_names_are_deterministic_and_fit_the_name_limit() {
        let t = ts("2026-01-01T03:00:00Z");
        assert_eq!(
            run_name("chest-xray", t),
            format!("chest-xray-{}", t.as_second() / 60)
        );
        let long = run_name("a-very-long-continual-training-name-indeed", t);
        assert!(long.len() <= 40, "{long}");
        assert_eq!(
            long,
            run_name("a-very-long-continual-training-name-indeed", t)
        );
    }
}
