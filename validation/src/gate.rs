//! The promotion gate: from the signed site reports of one candidate, decide Promote, Reject or
//! HoldForReview, with reasons a person and a program can both read.
//!
//! Reports first have to be admissible: signed by the trusted key of the site they name, about
//! this model, this candidate and this baseline (by version and weight hash), and dated neither
//! in the future beyond the allowed clock skew nor before the candidate existed. Inadmissible
//! reports are listed with the reason and do not count. Then the rules of the policy apply, in
//! this order: quorum, non-inferiority overall and per subgroup, worst-group gap, underdiagnosis
//! and calibration limits, required subgroups, human approval. Non-inferiority and the
//! worst-group gap judge marginal cells (`sex=F`); the underdiagnosis and calibration limits
//! also judge intersections (`sex=F&age_band=80+`), where harm to a small group hides.

use jiff::Timestamp;
use radfm_api::site_validation::PromotionPolicySpec;
use serde::{Deserialize, Serialize};

use crate::report::{self, Signed, SiteReport};
use crate::stats::Estimate;

/// The outcome of a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Move production to the candidate.
    Promote,
    /// The candidate failed a rule.
    Reject,
    /// Not enough evidence yet (quorum, required subgroups) or waiting for a person.
    HoldForReview,
    /// Production (the decision's `candidate`) showed harm after its promotion and moves back
    /// to the version before it (the decision's `baseline`).
    Rollback,
}

impl Outcome {
    /// The outcome's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Promote => "Promote",
            Outcome::Reject => "Reject",
            Outcome::HoldForReview => "HoldForReview",
            Outcome::Rollback => "Rollback",
        }
    }
}

/// One reason, machine-readable (`code`, `site`, `subgroup`) and in words (`message`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reason {
    /// `non_inferiority`, `worst_group_gap`, `fnr_gap`, `calibration`, `quorum`,
    /// `required_subgroup`, `approval`,
    /// `report_rejected`, `passed`.
    pub code: String,
    /// Site concerned.
    pub site: Option<String>,
    /// Subgroup concerned (`sex=F`), or None for all cases.
    pub subgroup: Option<String>,
    /// What, with the numbers.
    pub message: String,
}

/// The check of one stored report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportCheck {
    /// Where it was read.
    pub uri: String,
    /// The site it claims.
    pub site: Option<String>,
    /// Whether it counted.
    pub accepted: bool,
    /// Why not.
    pub rejected_because: Option<String>,
}

/// The decision on one candidate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// Model.
    pub model: String,
    /// Candidate version.
    pub candidate: u64,
    /// Production version at decision time.
    pub baseline: u64,
    /// The outcome.
    pub outcome: Outcome,
    /// Why (for Promote: the rules it passed).
    pub reasons: Vec<Reason>,
    /// Sites whose reports counted.
    pub sites: Vec<String>,
    /// Every report looked at.
    pub reports: Vec<ReportCheck>,
    /// The accepted reports, for the record.
    #[serde(skip)]
    pub accepted: Vec<SiteReport>,
    /// The signed human approval that counted, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<crate::approval::Approval>,
}

/// What the registry says about the versions under decision.
#[derive(Debug, Clone)]
pub struct Versions {
    /// Model.
    pub model: String,
    /// Candidate version.
    pub candidate: u64,
    /// Its weights' sha256.
    pub candidate_sha256: String,
    /// When it was registered.
    pub candidate_created: Timestamp,
    /// Production version.
    pub baseline: u64,
    /// Its weights' sha256.
    pub baseline_sha256: String,
}

fn fmt_ci(e: &Estimate) -> String {
    format!("{:+.3} [{:+.3}, {:+.3}]", e.value, e.lo, e.hi)
}

/// Checks one stored report against the trusted keys and the versions under decision.
fn admit(
    policy: &PromotionPolicySpec,
    v: &Versions,
    name: &str,
    signed: &[u8],
    now: Timestamp,
) -> Result<SiteReport, String> {
    let signed: Signed =
        serde_json::from_slice(signed).map_err(|e| format!("not a signed report: {e}"))?;
    let trusted = policy
        .trusted_sites
        .iter()
        .find(|t| t.public_key.eq_ignore_ascii_case(signed.public_key.trim()))
        .ok_or("signed by a key that is not trusted (forged?)")?;
    let r = report::verify(&signed).map_err(|e| e.to_string())?;
    if r.site != trusted.site {
        return Err(format!(
            "claims site {} but is signed by {}'s key",
            r.site, trusted.site
        ));
    }
    if name != r.site {
        return Err(format!(
            "stored as {name}'s report but is site {}'s (replayed?)",
            r.site
        ));
    }
    if r.model != v.model || r.candidate != v.candidate || r.candidate_sha256 != v.candidate_sha256
    {
        return Err(format!(
            "is about {} v{} (weights {}), not v{} (replayed?)",
            r.model,
            r.candidate,
            &r.candidate_sha256[..r.candidate_sha256.len().min(12)],
            v.candidate
        ));
    }
    if r.baseline != v.baseline || r.baseline_sha256 != v.baseline_sha256 {
        return Err(format!(
            "compares against v{}, but production is v{}",
            r.baseline, v.baseline
        ));
    }
    dated_within(policy, v, &r.created, now)?;
    if !r.tasks.iter().any(|t| t.task == policy.task) {
        return Err(format!("has no task {:?}", policy.task));
    }
    disclosure_at_least(policy, &r)?;
    bias_measured(policy, &r)?;
    Ok(r)
}

/// A report's disclosure control must be this code's method with at least the policy's minimum
/// cell size, and every cell it publishes must respect it.
fn disclosure_at_least(policy: &PromotionPolicySpec, r: &SiteReport) -> Result<(), String> {
    if r.disclosure_method != crate::disclosure::METHOD {
        return Err(format!(
            "applied disclosure control {:?}, weaker than {} that the policy requires",
            r.disclosure_method,
            crate::disclosure::METHOD
        ));
    }
    let floor = usize::try_from(policy.min_cell_size)
        .unwrap_or(0)
        .max(crate::disclosure::MIN_CELL_FLOOR);
    if r.min_cell_size < floor {
        return Err(format!(
            "suppresses cells below {} cases, the policy requires at least {floor}",
            r.min_cell_size
        ));
    }
    let small = r
        .tasks
        .iter()
        .flat_map(|t| &t.subgroups)
        .find(|s| s.result.n < r.min_cell_size);
    if let Some(s) = small {
        return Err(format!(
            "publishes cell {} with {} cases, below its own minimum of {}",
            s.name(),
            s.result.n,
            r.min_cell_size
        ));
    }
    Ok(())
}

/// A policy that limits underdiagnosis or calibration needs reports that measure them.
fn bias_measured(policy: &PromotionPolicySpec, r: &SiteReport) -> Result<(), String> {
    if policy.max_false_negative_rate_gap.is_none() && policy.max_calibration_error.is_none() {
        return Ok(());
    }
    let t = r.tasks.iter().find(|t| t.task == policy.task);
    let unmeasured = t.is_some_and(|t| {
        t.calibration_error.is_none() || t.subgroups.iter().any(|s| s.bias.is_none())
    });
    if unmeasured {
        return Err(format!(
            "measures no underdiagnosis or calibration for {:?} (a validator older than the policy's limits)",
            policy.task
        ));
    }
    Ok(())
}

/// A signed statement about the candidate (a site report, an approval) must be dated within the
/// candidate's lifetime: not ahead of now, nor before its registration, by more than the
/// policy's clock skew.
pub(crate) fn dated_within(
    policy: &PromotionPolicySpec,
    v: &Versions,
    created: &str,
    now: Timestamp,
) -> Result<(), String> {
    let created: Timestamp = created
        .parse()
        .map_err(|e| format!("created {created:?}: {e}"))?;
    let skew = jiff::SignedDuration::from_secs(policy.max_clock_skew_seconds.max(0));
    if created > now + skew {
        return Err(format!(
            "dated {created}, beyond the allowed clock skew of {}s ahead of {now}",
            policy.max_clock_skew_seconds
        ));
    }
    if created + skew < v.candidate_created {
        return Err(format!(
            "dated {created}, before the candidate was registered ({})",
            v.candidate_created
        ));
    }
    Ok(())
}

/// A rule that failed, without a site or subgroup.
fn rule(code: &str, subgroup: Option<String>, message: String) -> Reason {
    Reason {
        code: code.into(),
        site: None,
        subgroup,
        message,
    }
}

/// Decides on a candidate from the stored reports (`(site, uri, bytes)`: the site is the name
/// under which the report is stored): admit the reports, then every rule (quorum,
/// non-inferiority, worst-group gap, required subgroups, approval); any reject rule rejects, any
/// hold rule holds for review, else the candidate is promoted.
pub fn decide(
    policy: &PromotionPolicySpec,
    v: &Versions,
    stored: &[(String, String, Vec<u8>)],
    approval: Option<&crate::approval::Approval>,
    now: Timestamp,
) -> Decision {
    let (accepted, checks, mut reasons) = admit_all(policy, v, stored, now);
    let sites: Vec<String> = accepted.iter().map(|r| r.site.clone()).collect();
    let mut reject = Vec::new();
    let mut hold: Vec<Reason> = quorum(policy, &sites).into_iter().collect();
    for r in &accepted {
        if let Some(t) = r.tasks.iter().find(|t| t.task == policy.task) {
            reject.extend(non_inferiority(policy, &r.site, t));
            reject.extend(worst_group_gaps(policy, &r.site, t));
            reject.extend(underdiagnosis(policy, &r.site, t));
            reject.extend(miscalibration(policy, &r.site, t));
        }
    }
    hold.extend(required_subgroups(policy, &accepted));
    let outcome = if !reject.is_empty() {
        Outcome::Reject
    } else if !hold.is_empty() {
        Outcome::HoldForReview
    } else if policy.require_approval && approval.is_none() {
        let why = format!(
            "every rule passed; waiting for a human approval of v{}",
            v.candidate
        );
        hold.push(rule("approval", None, why));
        Outcome::HoldForReview
    } else {
        reasons.push(passed(policy, &sites, approval));
        Outcome::Promote
    };
    reasons.splice(0..0, reject.into_iter().chain(hold));
    Decision {
        model: v.model.clone(),
        candidate: v.candidate,
        baseline: v.baseline,
        outcome,
        reasons,
        sites,
        reports: checks,
        accepted,
        approval: approval.filter(|_| policy.require_approval).cloned(),
    }
}

/// The accepted reports (one per site, sorted by site), the check of every stored report, and
/// a reason for each one rejected.
fn admit_all(
    policy: &PromotionPolicySpec,
    v: &Versions,
    stored: &[(String, String, Vec<u8>)],
    now: Timestamp,
) -> (Vec<SiteReport>, Vec<ReportCheck>, Vec<Reason>) {
    let mut reasons = Vec::new();
    let mut checks = Vec::new();
    let mut accepted: Vec<SiteReport> = Vec::new();
    for (site, uri, bytes) in stored {
        let check = |site: &str, rejected_because: Option<String>| ReportCheck {
            uri: uri.clone(),
            site: Some(site.to_string()),
            accepted: rejected_because.is_none(),
            rejected_because,
        };
        match admit(policy, v, site, bytes, now) {
            Ok(r) if accepted.iter().any(|a| a.site == r.site) => {
                checks.push(check(
                    &r.site,
                    Some("a second report of the same site".into()),
                ));
            }
            Ok(r) => {
                checks.push(check(&r.site, None));
                accepted.push(r);
            }
            Err(why) => {
                reasons.push(Reason {
                    code: "report_rejected".into(),
                    site: Some(site.clone()),
                    subgroup: None,
                    message: format!("report {uri} not counted: {why}"),
                });
                checks.push(check(site, Some(why)));
            }
        }
    }
    accepted.sort_by(|a, b| a.site.cmp(&b.site));
    (accepted, checks, reasons)
}

fn quorum(policy: &PromotionPolicySpec, sites: &[String]) -> Option<Reason> {
    if sites.len() as i32 >= policy.quorum {
        return None;
    }
    let missing: Vec<&str> = policy
        .trusted_sites
        .iter()
        .map(|t| t.site.as_str())
        .filter(|s| !sites.iter().any(|a| a == s))
        .collect();
    let why = format!(
        "{} of {} required site reports (missing: {})",
        sites.len(),
        policy.quorum,
        missing.join(", ")
    );
    Some(rule("quorum", None, why))
}

/// Every cell (all cases and each subgroup) whose lower CI of ΔAUROC is below −margin.
fn non_inferiority(
    policy: &PromotionPolicySpec,
    site: &str,
    t: &report::TaskReport,
) -> Vec<Reason> {
    let margin = -policy.non_inferiority_margin;
    let marginal = t.subgroups.iter().filter(|s| !s.is_intersection());
    std::iter::once((None, &t.overall))
        .chain(marginal.map(|s| (Some(s.name()), &s.result)))
        .filter(|(_, p)| p.delta_auroc.lo < margin)
        .map(|(sub, p)| Reason {
            code: "non_inferiority".into(),
            site: Some(site.to_string()),
            message: format!(
                "site {site}, {}: ΔAUROC {} below margin {margin:+.3}",
                sub.as_deref().unwrap_or("all cases"),
                fmt_ci(&p.delta_auroc),
            ),
            subgroup: sub,
        })
        .collect()
}

/// Each subgroup field whose best and worst candidate AUROC differ by more than allowed.
fn worst_group_gaps(
    policy: &PromotionPolicySpec,
    site: &str,
    t: &report::TaskReport,
) -> Vec<Reason> {
    let mut fields: Vec<&str> = t
        .subgroups
        .iter()
        .filter(|s| !s.is_intersection())
        .map(|s| s.field.as_str())
        .collect();
    fields.sort_unstable();
    fields.dedup();
    let mut reasons = Vec::new();
    for field in fields {
        let aurocs: Vec<(f64, &report::SubgroupReport)> = t
            .subgroups
            .iter()
            .filter(|s| s.field == field)
            .map(|s| (s.result.candidate.auroc.value, s))
            .collect();
        let best = aurocs.iter().max_by(|a, b| a.0.total_cmp(&b.0));
        let worst = aurocs.iter().min_by(|a, b| a.0.total_cmp(&b.0));
        let (Some(best), Some(worst)) = (best, worst) else {
            continue;
        };
        let gap = best.0 - worst.0;
        if aurocs.len() < 2 || gap <= policy.max_worst_group_gap {
            continue;
        }
        reasons.push(Reason {
            code: "worst_group_gap".into(),
            site: Some(site.to_string()),
            subgroup: Some(worst.1.name()),
            message: format!(
                "site {site}, {field}: AUROC {:.3} ({}) vs {:.3} ({}), gap {gap:.3} above {:.3}",
                worst.0,
                worst.1.name(),
                best.0,
                best.1.name(),
                policy.max_worst_group_gap
            ),
        });
    }
    reasons
}

/// Each cell (intersections included) whose false-negative rate exceeds that of all cases by
/// more than the policy allows, with 95 % confidence (the interval's lower bound).
fn underdiagnosis(policy: &PromotionPolicySpec, site: &str, t: &report::TaskReport) -> Vec<Reason> {
    let Some(limit) = policy.max_false_negative_rate_gap else {
        return Vec::new();
    };
    t.subgroups
        .iter()
        .filter_map(|s| Some((s, s.bias.as_ref()?)))
        .filter(|(_, b)| b.fnr_gap.lo > limit)
        .map(|(s, b)| Reason {
            code: "fnr_gap".into(),
            site: Some(site.to_string()),
            subgroup: Some(s.name()),
            message: format!(
                "site {site}, {}: false-negative rate {:.3}, gap to all cases {} above {limit:.3} (underdiagnosis)",
                s.name(),
                b.false_negative_rate,
                fmt_ci(&b.fnr_gap)
            ),
        })
        .collect()
}

/// All cases and each cell whose expected calibration error exceeds the policy's limit with
/// 95 % confidence.
fn miscalibration(policy: &PromotionPolicySpec, site: &str, t: &report::TaskReport) -> Vec<Reason> {
    let Some(limit) = policy.max_calibration_error else {
        return Vec::new();
    };
    let cells = t.subgroups.iter().filter_map(|s| {
        let b = s.bias.as_ref()?;
        Some((Some(s.name()), b.calibration_error))
    });
    std::iter::once(t.calibration_error.map(|e| (None, e)))
        .flatten()
        .chain(cells)
        .filter(|(_, e)| e.lo > limit)
        .map(|(sub, e)| Reason {
            code: "calibration".into(),
            site: Some(site.to_string()),
            message: format!(
                "site {site}, {}: expected calibration error {:.3} [{:.3}, {:.3}] above {limit:.3}",
                sub.as_deref().unwrap_or("all cases"),
                e.value,
                e.lo,
                e.hi
            ),
            subgroup: sub,
        })
        .collect()
}

/// Each required subgroup no accepted report covers.
fn required_subgroups(policy: &PromotionPolicySpec, accepted: &[SiteReport]) -> Vec<Reason> {
    let covered = |required: &String| {
        accepted.iter().any(|r| {
            r.tasks
                .iter()
                .filter(|t| t.task == policy.task)
                .any(|t| t.subgroups.iter().any(|s| &s.name() == required))
        })
    };
    policy
        .required_subgroups
        .iter()
        .filter(|r| !covered(r))
        .map(|required| {
            let why = format!(
                "no accepted report covers {required} (absent or below the minimum cell size)"
            );
            rule("required_subgroup", Some(required.clone()), why)
        })
        .collect()
}

fn passed(
    policy: &PromotionPolicySpec,
    sites: &[String],
    approval: Option<&crate::approval::Approval>,
) -> Reason {
    let approved = match approval.filter(|_| policy.require_approval) {
        Some(a) => format!(
            "; approved by {} at {} ({})",
            a.approver, a.created, a.reason
        ),
        None => String::new(),
    };
    let mut limits = String::new();
    if let Some(gap) = policy.max_false_negative_rate_gap {
        limits += &format!("; underdiagnosis gaps within {gap:.3}");
    }
    if let Some(ece) = policy.max_calibration_error {
        limits += &format!("; calibration errors within {ece:.3}");
    }
    let why = format!(
        "{} site(s) ({}) non-inferior within {:.3} overall and in every reported subgroup; worst-group gaps within {:.3}{limits}{}",
        sites.len(),
        sites.join(", "),
        policy.non_inferiority_margin,
        policy.max_worst_group_gap,
        approved
    );
    rule("passed", None, why)
}

/// The production version as the harm check sees it.
#[derive(Debug, Clone)]
pub struct Deployed {
    /// Model.
    pub model: String,
    /// Production version.
    pub version: u64,
    /// Its weights' sha256.
    pub weights_sha256: String,
    /// When production moved to it.
    pub promoted: Timestamp,
    /// The version production pointed to before.
    pub previous: u64,
}

/// Checks one stored monitor report of production: signed by the trusted key of the site it is
/// stored for, about exactly the deployed weights, and looked after the promotion.
fn admit_look(
    policy: &PromotionPolicySpec,
    d: &Deployed,
    site: &str,
    bytes: &[u8],
    now: Timestamp,
) -> Result<crate::monitor::MonitorReport, String> {
    let trusted = policy
        .trusted_sites
        .iter()
        .find(|t| t.site == site)
        .ok_or_else(|| format!("site {site} is not trusted by the policy"))?;
    let (signed, r) =
        crate::monitor::open_stored(bytes, site, &d.model, d.version).map_err(|e| e.to_string())?;
    if !signed.public_key.eq_ignore_ascii_case(&trusted.public_key) {
        return Err(format!("not signed with {site}'s trusted key (forged?)"));
    }
    if r.weights_sha256 != d.weights_sha256 {
        return Err("about other weights than production's (replayed?)".into());
    }
    let created: Timestamp = r
        .created
        .parse()
        .map_err(|e| format!("created {:?}: {e}", r.created))?;
    let skew = jiff::SignedDuration::from_secs(policy.max_clock_skew_seconds.max(0));
    if created > now + skew {
        return Err(format!(
            "dated {created}, ahead of {now} beyond the clock skew"
        ));
    }
    if created < d.promoted {
        return Err(format!(
            "looked at {created}, before the promotion at {}",
            d.promoted
        ));
    }
    Ok(r)
}

/// Whether production must roll back: a Rollback decision when at least `rollback.minSites`
/// trusted sites' looks after the promotion found a drop in performance, with one reason per
/// cell that dropped; None otherwise (drift without a drop in performance is for retraining,
/// not for rollback).
pub fn harm(
    policy: &PromotionPolicySpec,
    d: &Deployed,
    looks: &[(String, String, Vec<u8>)],
    now: Timestamp,
) -> Option<Decision> {
    let needed = policy.rollback.as_ref()?.min_sites.max(1) as usize;
    let (mut reasons, mut sites, mut checks) = (Vec::new(), Vec::new(), Vec::new());
    for (site, uri, bytes) in looks {
        let admitted = admit_look(policy, d, site, bytes, now);
        checks.push(ReportCheck {
            uri: uri.clone(),
            site: Some(site.clone()),
            accepted: admitted.is_ok(),
            rejected_because: admitted.as_ref().err().cloned(),
        });
        let Ok(r) = admitted else { continue };
        let dropped = r.performance_dropped();
        if dropped.is_empty() {
            continue;
        }
        sites.push(site.clone());
        reasons.extend(dropped.into_iter().map(|c| harm_reason(&r, c)));
    }
    (sites.len() >= needed).then(|| Decision {
        model: d.model.clone(),
        candidate: d.version,
        baseline: d.previous,
        outcome: Outcome::Rollback,
        reasons,
        sites,
        reports: checks,
        accepted: Vec::new(),
        approval: None,
    })
}

fn harm_reason(
    r: &crate::monitor::MonitorReport,
    c: &crate::performance::CellPerformance,
) -> Reason {
    let look = r.look.as_deref().unwrap_or("a look");
    Reason {
        code: "harm".into(),
        site: Some(r.site.clone()),
        subgroup: c.cell.clone(),
        message: format!(
            "site {}, {}: AUROC {:.3} -> {:.3} after the promotion, change {} ({look} at {})",
            r.site,
            c.name(),
            c.reference_auroc.value,
            c.recent_auroc.value,
            fmt_ci(&c.change),
            r.created
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::report;
    use crate::report::{generate_key, public_hex, sign};
    use ed25519_dalek::SigningKey;
    use radfm_api::site_validation::TrustedSite;

    struct World {
        keys: Vec<(String, SigningKey)>,
        policy: PromotionPolicySpec,
        versions: Versions,
    }

    fn world() -> World {
        let keys: Vec<(String, SigningKey)> = ["site-a", "site-b", "site-c"]
            .iter()
            .map(|s| (s.to_string(), generate_key()))
            .collect();
        let policy = PromotionPolicySpec {
            registry: "file:///r".into(),
            model: "chest".into(),
            task: "lesion".into(),
            trusted_sites: keys
                .iter()
                .map(|(s, k)| TrustedSite {
                    site: s.clone(),
                    public_key: public_hex(k),
                })
                .collect(),
            quorum: 3,
            non_inferiority_margin: 0.02,
            max_worst_group_gap: 0.15,
            max_false_negative_rate_gap: None,
            max_calibration_error: None,
            required_subgroups: vec!["sex=F".into()],
            require_approval: false,
            approvers: Vec::new(),
            max_clock_skew_seconds: 300,
            min_cell_size: 20,
            rollback: None,
            candidate_alias: "candidate".into(),
            production_alias: "production".into(),
            poll_interval_seconds: 60,
        };
        World {
            keys,
            policy,
            versions: Versions {
                model: "chest".into(),
                candidate: 2,
                candidate_sha256: "c".repeat(64),
                candidate_created: "2026-11-29T11:00:00Z".parse().unwrap(),
                baseline: 1,
                baseline_sha256: "b".repeat(64),
            },
        }
    }

    fn stored(site: &str, r: &SiteReport, key: &SigningKey) -> (String, String, Vec<u8>) {
        (
            site.to_string(),
            format!("file:///r/{site}.json"),
            serde_json::to_vec(&sign(r, key)).unwrap(),
        )
    }

    fn now() -> Timestamp {
        "2026-11-29T12:01:00Z".parse().unwrap()
    }

    fn all_good(w: &World) -> Vec<(String, String, Vec<u8>)> {
        w.keys
            .iter()
            .map(|(s, k)| stored(s, &report(s, 2), k))
            .collect()
    }

    #[test]
    fn equal_candidates_at_every_site_are_promoted() {
        let w = world();
        let d = decide(&w.policy, &w.versions, &all_good(&w), None, now());
        assert_eq!(d.outcome, Outcome::Promote, "{:?}", d.reasons);
        assert_eq!(d.sites, ["site-a", "site-b", "site-c"]);
        assert_eq!(d.reasons[0].code, "passed");
    }

    #[test]
    fn a_regression_in_one_subgroup_rejects_naming_site_and_subgroup() {
        let w = world();
        let mut reports = all_good(&w);
        let mut bad = report("site-c", 2);
        let cell = &mut bad.tasks[0].subgroups[0].result;
        cell.delta_auroc = Estimate {
            value: -0.06,
            lo: -0.09,
            hi: -0.03,
        };
        reports[2] = stored("site-c", &bad, &w.keys[2].1);
        let d = decide(&w.policy, &w.versions, &reports, None, now());
        assert_eq!(d.outcome, Outcome::Reject);
        assert_eq!(
            d.reasons[0].message,
            "site site-c, sex=F: ΔAUROC -0.060 [-0.090, -0.030] below margin -0.020"
        );
        assert_eq!(
            (
                d.reasons[0].site.as_deref(),
                d.reasons[0].subgroup.as_deref()
            ),
            (Some("site-c"), Some("sex=F"))
        );
    }

    #[test]
    fn forged_tampered_replayed_and_skewed_reports_do_not_count() {
        let w = world();
        let good = all_good(&w);
        let stranger = generate_key();
        let tampered = {
            let mut s: Signed = serde_json::from_slice(&good[1].2).unwrap();
            s.payload = s.payload.replace("\"cases\":60", "\"cases\":61");
            (
                good[1].0.clone(),
                good[1].1.clone(),
                serde_json::to_vec(&s).unwrap(),
            )
        };
        let mut future = report("site-c", 2);
        future.created = "2026-11-29T13:00:00Z".into();
        let cases = [
            (
                stored("site-a", &report("site-a", 2), &stranger),
                "not trusted",
            ),
            (tampered, "does not match"),
            (
                stored("site-c", &report("site-c", 1), &w.keys[2].1),
                "replayed",
            ),
            (
                stored("site-c", &report("site-a", 2), &w.keys[0].1),
                "replayed",
            ),
            (
                stored("site-c", &report("site-c", 2), &w.keys[0].1),
                "signed by site-a's key",
            ),
            (stored("site-c", &future, &w.keys[2].1), "clock skew"),
        ];
        for (bad, why) in cases {
            let mut reports = good.clone();
            let i = w.keys.iter().position(|(s, _)| *s == bad.0).unwrap();
            reports[i] = bad;
            let d = decide(&w.policy, &w.versions, &reports, None, now());
            assert_eq!(d.outcome, Outcome::HoldForReview, "{why}: {:?}", d.reasons);
            assert!(
                d.reasons
                    .iter()
                    .any(|r| r.code == "report_rejected" && r.message.contains(why)),
                "{why}: {:?}",
                d.reasons
            );
            assert!(d.reasons.iter().any(|r| r.code == "quorum"));
        }
    }

    #[test]
    fn missing_required_subgroups_and_approval_hold_for_review() {
        let mut w = world();
        w.policy.required_subgroups = vec!["age_band=80+".into()];
        let d = decide(&w.policy, &w.versions, &all_good(&w), None, now());
        assert_eq!(d.outcome, Outcome::HoldForReview);
        assert_eq!(d.reasons[0].code, "required_subgroup");
        w.policy.required_subgroups.clear();
        w.policy.require_approval = true;
        let d = decide(&w.policy, &w.versions, &all_good(&w), None, now());
        assert_eq!(
            (d.outcome, d.reasons[0].code.as_str()),
            (Outcome::HoldForReview, "approval")
        );
        let alice = crate::approval::Approval {
            format: crate::approval::FORMAT.into(),
            model: "chest".into(),
            version: 2,
            weights_sha256: "c".repeat(64),
            approver: "dr-alice".into(),
            created: "2026-11-29T12:00:30Z".into(),
            reason: "read every report".into(),
        };
        let d = decide(&w.policy, &w.versions, &all_good(&w), Some(&alice), now());
        assert_eq!(d.outcome, Outcome::Promote);
        assert!(
            d.reasons[0]
                .message
                .ends_with("; approved by dr-alice at 2026-11-29T12:00:30Z (read every report)"),
            "{}",
            d.reasons[0].message
        );
        assert_eq!(
            d.approval.as_ref().map(|a| a.approver.as_str()),
            Some("dr-alice")
        );
    }

    #[test]
    fn a_large_gap_between_subgroups_rejects() {
        let w = world();
        let mut reports = all_good(&w);
        let mut r = report("site-b", 2);
        assert_eq!(r.tasks[0].subgroups[1].name(), "sex=M");
        r.tasks[0].subgroups[1].result.candidate.auroc.value -= 0.3;
        reports[1] = stored("site-b", &r, &w.keys[1].1);
        let d = decide(&w.policy, &w.versions, &reports, None, now());
        assert_eq!(d.outcome, Outcome::Reject);
        assert_eq!(d.reasons[0].code, "worst_group_gap");
        assert_eq!(d.reasons[0].subgroup.as_deref(), Some("sex=M"));
    }

    #[test]
    fn underdiagnosis_in_an_intersection_and_miscalibration_reject_naming_site_and_cell() {
        let mut w = world();
        let mut r = report("site-b", 2);
        let cell = r.tasks[0]
            .subgroups
            .iter_mut()
            .find(|s| s.is_intersection());
        let cell = cell.expect("the report crosses sex and scanner");
        assert_eq!(cell.name(), "sex=F&scanner=A");
        let bias = cell.bias.as_mut().unwrap();
        bias.false_negative_rate = 0.3;
        bias.fnr_gap = Estimate {
            value: 0.2,
            lo: 0.12,
            hi: 0.28,
        };
        let mut reports = all_good(&w);
        reports[1] = stored("site-b", &r, &w.keys[1].1);
        w.policy.max_false_negative_rate_gap = Some(0.1);
        let d = decide(&w.policy, &w.versions, &reports, None, now());
        assert_eq!(d.outcome, Outcome::Reject);
        assert_eq!(
            d.reasons[0].message,
            "site site-b, sex=F&scanner=A: false-negative rate 0.300, gap to all cases +0.200 [+0.120, +0.280] above 0.100 (underdiagnosis)"
        );
        assert_eq!(d.reasons.len(), 1, "{:?}", d.reasons);
        w.policy.max_false_negative_rate_gap = None;
        w.policy.max_calibration_error = Some(0.3);
        let d = decide(&w.policy, &w.versions, &all_good(&w), None, now());
        assert_eq!(d.outcome, Outcome::Reject);
        let first = &d.reasons[0];
        assert_eq!(
            (first.code.as_str(), first.subgroup.as_deref()),
            ("calibration", None)
        );
        assert!(
            first
                .message
                .starts_with("site site-a, all cases: expected calibration error 0.40"),
            "{}",
            first.message
        );
        w.policy.max_calibration_error = Some(0.5);
        let d = decide(&w.policy, &w.versions, &all_good(&w), None, now());
        assert_eq!(d.outcome, Outcome::Promote, "{:?}", d.reasons);
        assert!(
            d.reasons[0]
                .message
                .contains("; calibration errors within 0.500")
        );
    }

    #[test]
    fn reports_without_bias_measures_do_not_count_when_the_policy_limits_them() {
        let mut w = world();
        let mut old = report("site-a", 2);
        old.tasks[0]
            .subgroups
            .iter_mut()
            .for_each(|s| s.bias = None);
        let reports = vec![stored("site-a", &old, &w.keys[0].1)];
        w.policy.quorum = 1;
        let d = decide(&w.policy, &w.versions, &reports, None, now());
        assert_eq!(
            d.outcome,
            Outcome::Promote,
            "no limits: an older report counts"
        );
        w.policy.max_false_negative_rate_gap = Some(0.1);
        let d = decide(&w.policy, &w.versions, &reports, None, now());
        assert_eq!(d.outcome, Outcome::HoldForReview);
        let because = d.reports[0].rejected_because.as_deref().unwrap_or_default();
        assert!(because.contains("measures no underdiagnosis"), "{because}");
    }

    /// Site `site`'s signed look at production v2 (weights `c…`) at `created`, whose women's
    /// AUROC dropped when `harmed`, else only its embeddings drifted.
    fn look(w: &World, site: usize, created: &str, harmed: bool) -> (String, String, Vec<u8>) {
        use crate::drift::DriftTest;
        use crate::monitor::{FORMAT, MonitorReport, Watched, sign};
        use crate::performance::CellPerformance;
        let name = &w.keys[site].0;
        let e = |value| Estimate {
            value,
            lo: value - 0.05,
            hi: value + 0.05,
        };
        let test = DriftTest {
            statistic: 0.3,
            p_value: 0.0001,
            permutations: 9999,
            reference: 200,
            recent: 200,
        };
        let watched = |name: &str, drifting| Watched {
            name: name.into(),
            test: test.clone(),
            adjusted_p: 0.0003,
            drifting,
        };
        let r = MonitorReport {
            format: FORMAT.into(),
            model: "chest".into(),
            version: 2,
            weights_sha256: "c".repeat(64),
            site: name.clone(),
            reference_fingerprint: "a".into(),
            recent_fingerprint: "b".into(),
            created: created.into(),
            code_version: "test".into(),
            alpha: 0.01,
            watched: vec![
                watched("embeddings", true),
                watched("performance:lesion:sex=F", harmed),
            ],
            drifting: true,
            performance: vec![CellPerformance {
                cell: Some("sex=F".into()),
                reference_cases: 200,
                recent_cases: 200,
                reference_auroc: e(0.85),
                recent_auroc: e(0.55),
                change: e(-0.30),
                recent_bias: None,
            }],
            look: Some(format!("{name}-1")),
        };
        let uri = format!("file:///r/monitoring/{name}.json");
        (
            name.clone(),
            uri,
            serde_json::to_vec(&sign(&r, &w.keys[site].1)).unwrap(),
        )
    }

    #[test]
    fn harm_after_the_promotion_at_enough_trusted_sites_rolls_production_back_naming_site_and_cell()
    {
        let mut w = world();
        let deployed = Deployed {
            model: "chest".into(),
            version: 2,
            weights_sha256: "c".repeat(64),
            promoted: "2026-11-29T12:00:00Z".parse().unwrap(),
            previous: 1,
        };
        let after = "2026-11-29T12:00:30Z";
        let harmed = [look(&w, 0, after, true)];
        assert!(
            harm(&w.policy, &deployed, &harmed, now()).is_none(),
            "no rollback policy"
        );
        w.policy.rollback = Some(radfm_api::site_validation::RollbackSpec { min_sites: 1 });
        let d = harm(&w.policy, &deployed, &harmed, now()).expect("harm at site-a");
        assert_eq!(
            (d.outcome, d.candidate, d.baseline),
            (Outcome::Rollback, 2, 1)
        );
        assert_eq!(
            d.reasons[0].message,
            "site site-a, sex=F: AUROC 0.850 -> 0.550 after the promotion, change -0.300 [-0.350, -0.250] (site-a-1 at 2026-11-29T12:00:30Z)"
        );
        assert_eq!(
            (
                d.reasons[0].site.as_deref(),
                d.reasons[0].subgroup.as_deref()
            ),
            (Some("site-a"), Some("sex=F"))
        );

        let drift_only = [look(&w, 0, after, false)];
        assert!(
            harm(&w.policy, &deployed, &drift_only, now()).is_none(),
            "drift is for retraining"
        );
        let before = [look(&w, 0, "2026-11-29T11:59:00Z", true)];
        let d = harm(&w.policy, &deployed, &before, now());
        assert!(
            d.is_none(),
            "a look before the promotion is not about production's harm"
        );
        let mut forged = look(&w, 1, after, true);
        forged.0 = "site-a".into();
        let refused = {
            w.policy.rollback = Some(radfm_api::site_validation::RollbackSpec { min_sites: 2 });
            harm(
                &w.policy,
                &deployed,
                &[look(&w, 0, after, true), forged],
                now(),
            )
        };
        assert!(
            refused.is_none(),
            "site-b's key does not speak for site-a, and one site is not two"
        );
        let both = [look(&w, 0, after, true), look(&w, 1, after, true)];
        let d = harm(&w.policy, &deployed, &both, now()).unwrap();
        assert_eq!(d.sites, ["site-a", "site-b"]);
    }

    #[test]
    fn reports_with_weaker_disclosure_control_than_the_policy_do_not_count() {
        let mut w = world();
        let weaker = |change: &dyn Fn(&mut SiteReport)| {
            let mut r = report("site-a", 2);
            change(&mut r);
            r
        };
        let cases: [(SiteReport, &str); 3] = [
            (
                weaker(&|r| r.disclosure_method = String::new()),
                "applied disclosure control \"\", weaker than threshold+complementary/v1",
            ),
            (
                weaker(&|r| r.min_cell_size = 12),
                "suppresses cells below 12 cases, the policy requires at least 20",
            ),
            (
                weaker(&|r| r.tasks[0].subgroups[1].result.n = 3),
                "publishes cell sex=M with 3 cases, below its own minimum of 20",
            ),
        ];
        w.policy.quorum = 1;
        for (r, why) in cases {
            let d = decide(
                &w.policy,
                &w.versions,
                &[stored("site-a", &r, &w.keys[0].1)],
                None,
                now(),
            );
            assert_eq!(d.outcome, Outcome::HoldForReview);
            let because = d.reports[0].rejected_because.as_deref().unwrap_or_default();
            assert!(because.contains(why), "{because}");
        }
    }
}
