//! Monitor reports: what a site's look at its deployed model found, signed like site reports.
//!
//! A report carries only aggregates: for each drift test its statistic, its p-value and Holm's
//! adjusted p-value, never a case, a count per metadata category or an embedding; once labels
//! arrive, the AUROC per subgroup cell of both windows under the same disclosure control as
//! site reports, with the recent window's underdiagnosis and calibration. It binds the model,
//! the version and its weight hash, the site, fingerprints of both data windows and the time,
//! so that it cannot be replayed for another version or site without its signature failing.

use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};

use crate::drift::{self, DriftTest};
use crate::performance::CellPerformance;
use crate::report::Signed;
use crate::{Error, Result};

/// Format tag of the payload.
pub const FORMAT: &str = "radfm.monitor-report/v1";

/// The family-wise false-alarm level of one look unless a monitor sets another.
pub const DEFAULT_ALPHA: f64 = 0.01;

/// One statistic the monitor watched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Watched {
    /// What was compared: `embeddings`, `scores:lesion`, `metadata:manufacturer`.
    pub name: String,
    /// The test's outcome.
    pub test: DriftTest,
    /// Holm-adjusted p-value over every statistic of the look.
    pub adjusted_p: f64,
    /// Whether this statistic drifted (adjusted p below the look's α).
    pub drifting: bool,
}

/// The signed content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MonitorReport {
    /// [`FORMAT`].
    pub format: String,
    /// Model name.
    pub model: String,
    /// The version watched (production at the site).
    pub version: u64,
    /// sha256 of its weights.
    pub weights_sha256: String,
    /// Site identifier.
    pub site: String,
    /// sha256 of the reference window's index.
    pub reference_fingerprint: String,
    /// sha256 of the recent window's index.
    pub recent_fingerprint: String,
    /// When the site looked (RFC 3339, the site's clock).
    pub created: String,
    /// radfm version of the monitor.
    pub code_version: String,
    /// Family-wise false-alarm level of this look.
    pub alpha: f64,
    /// Every statistic watched.
    pub watched: Vec<Watched>,
    /// Whether any statistic drifted (performance statistics included).
    pub drifting: bool,
    /// Once labels arrived: performance per cell against the reference window (empty without
    /// enough labelled recent cases).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub performance: Vec<CellPerformance>,
    /// The look this report answers (a ModelMonitor's pod name), so that a controller tells it
    /// from an earlier look's report of the same version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub look: Option<String>,
}

impl MonitorReport {
    /// The statistics that drifted, as `name (statistic …, adjusted p = …)`, and the cells whose
    /// performance dropped with their AUROC change, for conditions and events.
    pub fn evidence(&self) -> Vec<String> {
        self.watched
            .iter()
            .filter(|w| w.drifting)
            .map(|w| match self.cell_of(&w.name) {
                Some(c) => format!(
                    "{} (AUROC {:.3} -> {:.3}, change {:+.3} [{:+.3}, {:+.3}], adjusted p = {:.4})",
                    w.name,
                    c.reference_auroc.value,
                    c.recent_auroc.value,
                    c.change.value,
                    c.change.lo,
                    c.change.hi,
                    w.adjusted_p
                ),
                None => format!(
                    "{} (statistic {:.4}, adjusted p = {:.4})",
                    w.name, w.test.statistic, w.adjusted_p
                ),
            })
            .collect()
    }

    /// The cells whose performance dropped (late labels), by name.
    pub fn performance_dropped(&self) -> Vec<&CellPerformance> {
        self.watched
            .iter()
            .filter(|w| w.drifting)
            .filter_map(|w| self.cell_of(&w.name))
            .collect()
    }

    fn cell_of(&self, statistic: &str) -> Option<&CellPerformance> {
        let rest = statistic.strip_prefix(PERFORMANCE)?;
        let cell = rest.split_once(':').map(|(_, cell)| cell);
        self.performance.iter().find(|c| c.cell.as_deref() == cell)
    }
}

/// How the names of performance statistics begin (`performance:lesion:sex=F`).
pub const PERFORMANCE: &str = "performance:";

/// Judges a look's two families: the drift tests together, and the performance tests (late
/// labels) together, each adjusted by Holm at `alpha`. Data drift and a drop in performance
/// are separate questions with separate consequences; each keeps its own false-alarm level.
pub fn judge_look(
    drift: Vec<(String, DriftTest)>,
    performance: Vec<(String, DriftTest)>,
    alpha: f64,
) -> Result<(Vec<Watched>, bool)> {
    let (mut watched, drifting) = judge(drift, alpha)?;
    if performance.is_empty() {
        return Ok((watched, drifting));
    }
    let (dropped, any) = judge(performance, alpha)?;
    watched.extend(dropped);
    Ok((watched, drifting || any))
}

/// Adjusts the tests of one family together and judges each at `alpha`.
pub fn judge(tests: Vec<(String, DriftTest)>, alpha: f64) -> Result<(Vec<Watched>, bool)> {
    if !(alpha > 0.0 && alpha < 1.0) {
        return Err(Error::Data(format!("alpha {alpha} must be in (0, 1)")));
    }
    if let Some((name, t)) = tests
        .iter()
        .find(|(_, t)| tests.len() as f64 / (t.permutations + 1) as f64 >= alpha)
    {
        return Err(Error::Data(format!(
            "{name}: {} permutations cannot reach α = {alpha} over {} statistics (at least {} needed)",
            t.permutations,
            tests.len(),
            (tests.len() as f64 / alpha).ceil() as usize
        )));
    }
    let p: Vec<f64> = tests.iter().map(|(_, t)| t.p_value).collect();
    let adjusted = drift::holm(&p);
    let watched: Vec<Watched> = tests
        .into_iter()
        .zip(adjusted)
        .map(|((name, test), adjusted_p)| Watched {
            name,
            test,
            adjusted_p,
            drifting: adjusted_p < alpha,
        })
        .collect();
    let drifting = watched.iter().any(|w| w.drifting);
    Ok((watched, drifting))
}

/// Signs a report with the site's key.
pub fn sign(report: &MonitorReport, key: &SigningKey) -> Signed {
    Signed::of(report, key)
}

/// Checks the signature and the format; the payload. Whether the signer is trusted for the
/// site it names is the caller's decision.
pub fn verify(signed: &Signed) -> Result<MonitorReport> {
    signed.open(|r: &MonitorReport| &r.format, FORMAT)
}

/// A report as stored for `site`'s look at `model` `version`: parsed, verified, and refused
/// unless it speaks of exactly that site, model and version (a report copied to another site's
/// or version's place). Returns the signed envelope too, for the caller's check of the key.
pub fn open_stored(
    bytes: &[u8],
    site: &str,
    model: &str,
    version: u64,
) -> Result<(Signed, MonitorReport)> {
    let signed: Signed = serde_json::from_slice(bytes)
        .map_err(|e| Error::Data(format!("not a signed report: {e}")))?;
    let r = verify(&signed)?;
    if (r.site.as_str(), r.model.as_str(), r.version) != (site, model, version) {
        return Err(Error::Data(format!(
            "it speaks of {} v{} at {}, not {model} v{version} at {site}",
            r.model, r.version, r.site
        )));
    }
    Ok((signed, r))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test(p: f64) -> DriftTest {
        DriftTest {
            statistic: 1.0 - p,
            p_value: p,
            permutations: 999,
            reference: 100,
            recent: 100,
        }
    }

    fn report(watched: Vec<Watched>, drifting: bool) -> MonitorReport {
        MonitorReport {
            format: FORMAT.into(),
            model: "chest".into(),
            version: 3,
            weights_sha256: "w".into(),
            site: "north".into(),
            reference_fingerprint: "a".into(),
            recent_fingerprint: "b".into(),
            created: "2026-12-06T00:00:00Z".into(),
            code_version: "0".into(),
            alpha: 0.01,
            watched,
            drifting,
            performance: Vec::new(),
            look: None,
        }
    }

    #[test]
    fn a_look_drifts_only_where_the_adjusted_p_value_is_below_alpha() {
        let (watched, drifting) = judge(
            vec![
                ("embeddings".into(), test(0.001)),
                ("metadata:manufacturer".into(), test(0.006)),
                ("scores:lesion".into(), test(0.3)),
            ],
            0.01,
        )
        .unwrap();
        assert!(drifting);
        let flags: Vec<bool> = watched.iter().map(|w| w.drifting).collect();
        assert_eq!(
            flags,
            [true, false, false],
            "0.006 alone is below 0.01; adjusted for the second of three tests (× 2) it is not"
        );
    }

    #[test]
    fn reports_are_verified_and_tampering_is_refused() {
        let key = crate::report::generate_key();
        let (watched, drifting) = judge(vec![("embeddings".into(), test(0.5))], 0.01).unwrap();
        let r = report(watched, drifting);
        let signed = sign(&r, &key);
        assert_eq!(verify(&signed).unwrap(), r);
        let mut forged = signed.clone();
        forged.payload = forged
            .payload
            .replace("\"drifting\":false", "\"drifting\":true");
        assert!(
            verify(&forged).is_err(),
            "a changed verdict breaks the signature"
        );
        assert!(judge(vec![], 1.5).is_err());
        let few = DriftTest {
            permutations: 199,
            ..test(0.5)
        };
        let coarse = judge(vec![("a".into(), few.clone()), ("b".into(), few)], 0.01);
        assert!(
            coarse
                .unwrap_err()
                .to_string()
                .contains("199 permutations cannot reach α = 0.01 over 2 statistics"),
            "199 permutations give p ≥ 0.005, × 2 = 0.01"
        );
    }
}
