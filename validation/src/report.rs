//! Site reports: aggregate validation results of one candidate at one site, signed with the
//! site's ed25519 key.
//!
//! A report holds only aggregates: per task, overall and per subgroup cell, counts and metrics
//! with confidence intervals. Cells with fewer than the minimum cell size, or without both
//! classes, are suppressed and only counted. The signature covers the exact payload bytes, and
//! the payload binds the report to the model, both versions and their weight hashes, the site, a
//! fingerprint of the site's dataset and the time. A report therefore cannot be replayed for
//! another version or site, or altered, without the signature failing to match.

use std::collections::BTreeMap;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::disclosure::FieldCells;
use crate::stats::{self, CellBias, Estimate, Paired};
use crate::{Error, Result};

/// Format tag of the payload.
pub const FORMAT: &str = "radfm.site-report/v1";

/// Bootstrap resamples behind every interval.
pub const RESAMPLES: usize = 1000;

/// The signed content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteReport {
    /// [`FORMAT`].
    pub format: String,
    /// Model name.
    pub model: String,
    /// Candidate version.
    pub candidate: u64,
    /// sha256 of the candidate's weights.
    pub candidate_sha256: String,
    /// Baseline version (production at validation time).
    pub baseline: u64,
    /// sha256 of the baseline's weights.
    pub baseline_sha256: String,
    /// Site identifier.
    pub site: String,
    /// sha256 of the site dataset's index: the same data gives the same fingerprint.
    pub dataset_fingerprint: String,
    /// When the site produced it (RFC 3339, the site's clock).
    pub created: String,
    /// radfm version of the validator.
    pub code_version: String,
    /// Cases validated.
    pub cases: usize,
    /// Smallest subgroup cell reported.
    pub min_cell_size: usize,
    /// The disclosure-control method applied ([`disclosure::METHOD`](crate::disclosure::METHOD));
    /// empty in reports made before there was one.
    #[serde(default)]
    pub disclosure_method: String,
    /// Results per task.
    pub tasks: Vec<TaskReport>,
    /// How differently the two encoders represent the site's images.
    pub representation_drift: RepresentationDrift,
    /// How the site's images differ from the candidate's training data.
    pub data_drift: DataDrift,
}

/// One task at one site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskReport {
    /// Task name (`lesion`, `finding=effusion`).
    pub task: String,
    /// How predictions were made.
    pub method: String,
    /// All cases (linear probe).
    pub overall: Paired,
    /// k-NN AUROC of candidate and baseline on all cases (a second, model-free view).
    pub knn_auroc: Option<(f64, f64)>,
    /// Subgroup cells large enough to report.
    pub subgroups: Vec<SubgroupReport>,
    /// Cells suppressed (fewer than min_cell_size cases, one class only, or hidden so that
    /// subtraction cannot reveal another hidden cell).
    pub suppressed_cells: usize,
    /// The candidate's expected calibration error on all cases (absent in older reports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration_error: Option<Estimate>,
}

/// One subgroup cell.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubgroupReport {
    /// Metadata field (`sex`).
    pub field: String,
    /// Value (`F`).
    pub value: String,
    /// Candidate vs baseline on the cell.
    pub result: Paired,
    /// The candidate's underdiagnosis and calibration in the cell (absent in older reports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bias: Option<CellBias>,
}

impl SubgroupReport {
    /// `field=value`, or for an intersection `field=value&field=value`.
    pub fn name(&self) -> String {
        if self.is_intersection() {
            self.value.clone()
        } else {
            format!("{}={}", self.field, self.value)
        }
    }

    /// Whether the cell crosses two fields.
    pub fn is_intersection(&self) -> bool {
        self.field.contains(crate::disclosure::CROSS)
    }
}

/// Representation drift between the two encoders on the same images.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RepresentationDrift {
    /// Linear centred kernel alignment of the embeddings (1: same up to rotation and scale).
    pub linear_cka: f64,
}

/// Data drift of the site's images against the candidate's training data.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DataDrift {
    /// Mean intensity at the site.
    pub site_mean: f64,
    /// Intensity standard deviation at the site.
    pub site_std: f64,
    /// Mean intensity of the training data (model card).
    pub train_mean: f64,
    /// Standard deviation of the training data.
    pub train_std: f64,
    /// (site mean − training mean) / training std.
    pub standardized_mean_difference: f64,
    /// site std / training std.
    pub std_ratio: f64,
}

impl DataDrift {
    /// From the two sets of intensity statistics.
    pub fn new(site_mean: f64, site_std: f64, train_mean: f64, train_std: f64) -> DataDrift {
        let t = if train_std > 0.0 { train_std } else { 1.0 };
        DataDrift {
            site_mean,
            site_std,
            train_mean,
            train_std,
            standardized_mean_difference: (site_mean - train_mean) / t,
            std_ratio: site_std / t,
        }
    }
}

/// The predictions of one task, case by case, with each case's subgroup values: the input of
/// [`task_report`]. It never leaves the site.
pub struct Cases<'a> {
    /// Task name.
    pub task: String,
    /// Candidate probabilities.
    pub candidate: &'a [f64],
    /// Baseline probabilities.
    pub baseline: &'a [f64],
    /// Labels.
    pub labels: &'a [bool],
    /// Subgroup values of each case (field → value).
    pub groups: &'a [BTreeMap<String, String>],
}

/// Aggregates one task: overall, then every cell that the disclosure plan publishes (see
/// [`disclosure`](crate::disclosure)); the others are only counted.
pub fn task_report(
    cases: &Cases,
    cells: &[FieldCells],
    knn_auroc: Option<(f64, f64)>,
    seed: u64,
) -> Result<TaskReport> {
    let all: Vec<usize> = (0..cases.labels.len()).collect();
    let overall = stats::paired(
        cases.candidate,
        cases.baseline,
        cases.labels,
        &all,
        RESAMPLES,
        seed,
    )
    .ok_or_else(|| Error::Data(format!("task {}: both classes are needed", cases.task)))?;
    let mut subgroups = Vec::new();
    let mut suppressed_cells = 0;
    for (fi, field) in cells.iter().enumerate() {
        for (ci, cell) in field.cells.iter().enumerate().filter(|(_, c)| !c.implicit) {
            let seed = seed ^ ((fi as u64 + 1) << 32) ^ (ci as u64 + 1);
            match cell
                .published
                .then(|| cell_report(cases, &field.field, cell, seed))
            {
                Some(Some(report)) => subgroups.push(report),
                _ => suppressed_cells += 1,
            }
        }
    }
    let ece = stats::cell_bias(cases.candidate, cases.labels, &all, RESAMPLES, seed ^ 1);
    Ok(TaskReport {
        task: cases.task.clone(),
        method: "logistic-regression probe on frozen embeddings, 5-fold cross-validated within the site; operating point p >= 0.5".into(),
        overall,
        knn_auroc,
        subgroups,
        suppressed_cells,
        calibration_error: ece.map(|b| b.calibration_error),
    })
}

/// Candidate against baseline on one published cell, with the candidate's bias measures.
fn cell_report(
    cases: &Cases,
    field: &str,
    cell: &crate::disclosure::Cell,
    seed: u64,
) -> Option<SubgroupReport> {
    let (c, b, y) = (cases.candidate, cases.baseline, cases.labels);
    Some(SubgroupReport {
        field: field.to_string(),
        value: cell.value.clone(),
        result: stats::paired(c, b, y, &cell.rows, RESAMPLES, seed)?,
        bias: stats::cell_bias(c, y, &cell.rows, RESAMPLES, seed ^ 0x5eed),
    })
}

/// A report as stored: the exact payload bytes, their signature and the signer's public key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Signed {
    /// The [`SiteReport`] as JSON text, exactly as signed.
    pub payload: String,
    /// ed25519 signature of the payload's bytes, hex.
    pub signature: String,
    /// The signer's public key, hex.
    pub public_key: String,
}

impl Signed {
    /// `value` as JSON, signed with `key`.
    pub fn of<T: Serialize>(value: &T, key: &SigningKey) -> Signed {
        let payload = serde_json::to_string(value).expect("signed statements serialise");
        let signature = key.sign(payload.as_bytes());
        Signed {
            payload,
            signature: hex::encode(signature.to_bytes()),
            public_key: public_hex(key),
        }
    }

    /// The payload, after checking the signature against the embedded public key, parsed and
    /// required to carry the format tag `expected` (read by `format`). Whether that key is
    /// trusted, and for whom, is the caller's decision.
    pub fn open<T: serde::de::DeserializeOwned>(
        &self,
        format: impl Fn(&T) -> &str,
        expected: &str,
    ) -> Result<T> {
        let key = verifying_key(&self.public_key)?;
        let sig: [u8; 64] = hex::decode(&self.signature)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| Error::Signature("signature is not 64 hex bytes".into()))?;
        key.verify(self.payload.as_bytes(), &Signature::from_bytes(&sig))
            .map_err(|_| Error::Signature("signature does not match the payload".into()))?;
        let value: T = serde_json::from_str(&self.payload)
            .map_err(|e| Error::Data(format!("payload: {e}")))?;
        if format(&value) != expected {
            return Err(Error::Data(format!(
                "payload format {:?}, expected {expected}",
                format(&value)
            )));
        }
        Ok(value)
    }
}

/// Signs a report.
pub fn sign(report: &SiteReport, key: &SigningKey) -> Signed {
    Signed::of(report, key)
}

/// Checks the signature against the embedded public key and parses the payload. Whether that
/// key is trusted, and for which site, is the caller's decision.
pub fn verify(signed: &Signed) -> Result<SiteReport> {
    signed.open(|r: &SiteReport| &r.format, FORMAT)
}

/// A public key from hex.
pub fn verifying_key(hex_key: &str) -> Result<VerifyingKey> {
    let bytes: [u8; 32] = hex::decode(hex_key.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| Error::Signature("public key is not 32 hex bytes".into()))?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| Error::Signature(format!("public key: {e}")))
}

/// A signing key from its hex seed (the content of the site's key Secret).
pub fn signing_key(hex_seed: &str) -> Result<SigningKey> {
    let bytes: [u8; 32] = hex::decode(hex_seed.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| Error::Signature("signing key is not a 32-byte hex seed".into()))?;
    Ok(SigningKey::from_bytes(&bytes))
}

/// A new signing key from the operating system's randomness.
pub fn generate_key() -> SigningKey {
    let seed: [u8; 32] = rand::random();
    SigningKey::from_bytes(&seed)
}

/// The public key of a signing key, hex.
pub fn public_hex(key: &SigningKey) -> String {
    hex::encode(key.verifying_key().to_bytes())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A report of 60 cases, 40 women and 20 men, every cell published.
    pub(crate) fn report(site: &str, candidate: u64) -> SiteReport {
        report_split(site, candidate, 40)
    }

    /// A report of 60 cases of which `women` are women (minimum cell size 20).
    pub(crate) fn report_split(site: &str, candidate: u64, women: usize) -> SiteReport {
        let y: Vec<bool> = (0..60).map(|i| i % 2 == 0).collect();
        let p: Vec<f64> = y
            .iter()
            .enumerate()
            .map(|(i, &l)| if l { 0.6 } else { 0.4 } + (i % 7) as f64 * 0.03)
            .collect();
        let groups: Vec<BTreeMap<String, String>> = (0..60)
            .map(|i| {
                BTreeMap::from([
                    (
                        "sex".to_string(),
                        if i < women { "F" } else { "M" }.to_string(),
                    ),
                    ("scanner".to_string(), "A".to_string()),
                ])
            })
            .collect();
        let fields = ["sex".to_string(), "scanner".to_string()];
        let cells = crate::disclosure::plan(&groups, &fields, 20, &[&y]).unwrap();
        let task = task_report(
            &Cases {
                task: "lesion".into(),
                candidate: &p,
                baseline: &p,
                labels: &y,
                groups: &groups,
            },
            &cells,
            None,
            7,
        )
        .unwrap();
        SiteReport {
            format: FORMAT.into(),
            model: "chest".into(),
            candidate,
            candidate_sha256: "c".repeat(64),
            baseline: 1,
            baseline_sha256: "b".repeat(64),
            site: site.into(),
            dataset_fingerprint: "f".repeat(64),
            created: "2026-11-29T12:00:00Z".into(),
            code_version: "test".into(),
            cases: 60,
            min_cell_size: 20,
            disclosure_method: crate::disclosure::METHOD.into(),
            tasks: vec![task],
            representation_drift: RepresentationDrift { linear_cka: 0.9 },
            data_drift: DataDrift::new(1.0, 1.0, 1.0, 1.0),
        }
    }

    #[test]
    fn small_cells_are_suppressed_with_a_complement_and_never_reported() {
        let names = |r: &SiteReport| -> Vec<String> {
            r.tasks[0].subgroups.iter().map(|s| s.name()).collect()
        };
        assert_eq!(
            names(&report("site-a", 2)),
            [
                "sex=F",
                "sex=M",
                "scanner=A",
                "sex=F&scanner=A",
                "sex=M&scanner=A"
            ]
        );
        let r = report_split("site-a", 2, 50);
        let t = &r.tasks[0];
        assert_eq!(
            names(&r),
            ["scanner=A"],
            "sex=M has 10 cases; sex=F (50) would reveal it as 60 - 50; so would their intersections with scanner=A"
        );
        assert_eq!(t.suppressed_cells, 4);
        let text = sign(&r, &generate_key()).payload;
        assert!(!text.contains("\"M\""), "{text}");
    }

    #[test]
    fn signatures_verify_and_any_change_breaks_them() {
        let key = generate_key();
        let signed = sign(&report("site-a", 2), &key);
        assert_eq!(verify(&signed).unwrap(), report("site-a", 2));
        let tampered = Signed {
            payload: signed.payload.replace("\"candidate\":2", "\"candidate\":3"),
            ..signed.clone()
        };
        assert_ne!(tampered.payload, signed.payload);
        let e = verify(&tampered).unwrap_err().to_string();
        assert!(e.contains("does not match"), "{e}");
        let other = Signed {
            public_key: public_hex(&generate_key()),
            ..signed.clone()
        };
        assert!(verify(&other).is_err());
        let seed = hex::encode(key.to_bytes());
        assert_eq!(public_hex(&signing_key(&seed).unwrap()), signed.public_key);
    }
}
