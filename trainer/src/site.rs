//! The computing half of site validation: embed the site's images with the candidate and the
//! baseline encoder, predict every task out-of-fold with probes fitted within the site, and
//! aggregate into the report's tasks, drift and fingerprint. Nothing per case leaves this
//! function; `radfm validate` signs and publishes the aggregates.

use std::collections::BTreeMap;

use radfm_data::store::Location;
use radfm_validation::disclosure;
use radfm_validation::report::{self, Cases, DataDrift, RepresentationDrift, TaskReport};
use sha2::{Digest, Sha256};
use tch::{Device, Tensor};

use crate::eval::{self, Embedded};
use crate::{Error, Result};

/// Folds of the within-site cross-validation.
pub const FOLDS: usize = 5;
/// Neighbours of the k-NN view.
pub const K: usize = 10;

/// What to validate.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// Exported folder of the candidate.
    pub candidate_uri: &'a str,
    /// Exported folder of the baseline.
    pub baseline_uri: &'a str,
    /// The site's labelled dataset.
    pub dataset_uri: &'a str,
    /// Task names (`lesion`, `finding=effusion`).
    pub tasks: &'a [String],
    /// Subgroup fields.
    pub subgroups: &'a [String],
    /// Smallest reported cell (at least [`disclosure::MIN_CELL_FLOOR`]).
    pub min_cell: usize,
    /// Seed of the bootstrap.
    pub seed: u64,
}

/// The aggregates of a site.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Cases validated.
    pub cases: usize,
    /// Per task.
    pub tasks: Vec<TaskReport>,
    /// Between the two encoders.
    pub representation_drift: RepresentationDrift,
    /// Site data against the candidate's training data.
    pub data_drift: DataDrift,
    /// sha256 of the dataset's index.
    pub dataset_fingerprint: String,
    /// sha256 of the candidate's weights as loaded.
    pub candidate_sha256: String,
    /// sha256 of the baseline's weights as loaded.
    pub baseline_sha256: String,
}

fn invalid(reason: String) -> Error {
    Error::Field {
        field: "dataset".into(),
        reason,
    }
}

/// One task's out-of-fold predictions by both encoders, before aggregation.
struct Predicted {
    task: String,
    labels: Vec<bool>,
    candidate: Vec<f64>,
    baseline: Vec<f64>,
    knn_auroc: Option<(f64, f64)>,
}

/// Both encoders' probes on one task, cross-validated within the site, folds grouped by patient.
fn predict(req: &Request<'_>, ec: &Embedded, eb: &Embedded, task: &str) -> Result<Predicted> {
    let labels: Vec<f32> = ec
        .meta
        .iter()
        .zip(&ec.keys)
        .map(|(m, key)| {
            eval::target(m, task).ok_or_else(|| {
                invalid(format!(
                    "sample {key} of {} has no 0/1 label {task:?}",
                    req.dataset_uri
                ))
            })
        })
        .collect::<Result<_>>()?;
    let y = Tensor::from_slice(&labels);
    let units: Vec<&str> = ec
        .meta
        .iter()
        .zip(&ec.keys)
        .map(|(m, key)| eval::split_unit(m, key))
        .collect();
    let (lin_c, knn_c) = eval::cross_validated(&ec.features, &y, &units, FOLDS, K)?;
    let (lin_b, knn_b) = eval::cross_validated(&eb.features, &y, &units, FOLDS, K)?;
    let yb: Vec<bool> = labels.iter().map(|&l| l > 0.5).collect();
    let knn_auroc = radfm_validation::stats::auroc(&knn_c, &yb)
        .zip(radfm_validation::stats::auroc(&knn_b, &yb));
    Ok(Predicted {
        task: task.to_string(),
        labels: yb,
        candidate: lin_c,
        baseline: lin_b,
        knn_auroc,
    })
}

/// The aggregates of every task, publishing only the cells the disclosure plan allows (one plan
/// over all tasks, so that no task's table reveals what another hides).
fn task_reports(
    req: &Request<'_>,
    predicted: &[Predicted],
    groups: &[BTreeMap<String, String>],
) -> Result<Vec<TaskReport>> {
    let labels: Vec<&[bool]> = predicted.iter().map(|p| p.labels.as_slice()).collect();
    let cells = disclosure::plan(groups, req.subgroups, req.min_cell, &labels)
        .map_err(|e| invalid(format!("{}: {e}", req.dataset_uri)))?;
    predicted
        .iter()
        .enumerate()
        .map(|(ti, p)| {
            report::task_report(
                &Cases {
                    task: p.task.clone(),
                    candidate: &p.candidate,
                    baseline: &p.baseline,
                    labels: &p.labels,
                    groups,
                },
                &cells,
                p.knn_auroc,
                req.seed ^ (ti as u64) << 48,
            )
            .map_err(|e| invalid(format!("{}: {e}", req.dataset_uri)))
        })
        .collect()
}

/// Runs the validation of one candidate against one baseline on the site's data.
pub async fn validate(req: &Request<'_>) -> Result<Outcome> {
    let first = req
        .tasks
        .first()
        .ok_or_else(|| invalid("no task to validate".into()))?;
    let cand = crate::export::load(req.candidate_uri, Device::Cpu).await?;
    let base = crate::export::load(req.baseline_uri, Device::Cpu).await?;
    let (mc, sc) = (cand.card.input.mean, cand.card.input.std);
    let ec: Embedded = eval::embed(&cand.encoder, req.dataset_uri, first, mc, sc).await?;
    let (mb, sb) = (base.card.input.mean, base.card.input.std);
    let eb: Embedded = eval::embed(&base.encoder, req.dataset_uri, first, mb, sb).await?;
    if ec.keys != eb.keys {
        return Err(invalid(format!(
            "{} was read in a different order by the two encoders",
            req.dataset_uri
        )));
    }
    let groups = eval::subgroup_values(&ec.meta, req.subgroups);
    let predicted = req
        .tasks
        .iter()
        .map(|task| predict(req, &ec, &eb, task))
        .collect::<Result<Vec<_>>>()?;
    let tasks = task_reports(req, &predicted, &groups)?;
    let loc = Location::open(req.dataset_uri)?;
    let index_bytes = loc
        .get_bounded(radfm_data::index::INDEX, radfm_data::index::MAX_INDEX_BYTES)
        .await?
        .ok_or_else(|| invalid(format!("{} has no index", req.dataset_uri)))?;
    let index = radfm_data::DatasetIndex::load(&loc).await?;
    Ok(Outcome {
        cases: ec.keys.len(),
        tasks,
        representation_drift: RepresentationDrift {
            linear_cka: eval::linear_cka(&ec.features, &eb.features),
        },
        data_drift: DataDrift::new(
            index.stats.mean,
            index.stats.std,
            cand.card.input.mean,
            cand.card.input.std,
        ),
        dataset_fingerprint: hex::encode(Sha256::digest(&index_bytes)),
        candidate_sha256: cand.card.weights_sha256.clone(),
        baseline_sha256: base.card.weights_sha256.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cka_is_one_for_rotated_copies_and_low_for_unrelated_features() {
        tch::manual_seed(0);
        let a = Tensor::randn([200, 8], (tch::Kind::Float, Device::Cpu));
        let (q, _) = Tensor::linalg_qr(
            &Tensor::randn([8, 8], (tch::Kind::Float, Device::Cpu)),
            "reduced",
        );
        let rotated = a.matmul(&q) * 3.0;
        assert!((eval::linear_cka(&a, &rotated) - 1.0).abs() < 1e-6);
        let other = Tensor::randn([200, 8], (tch::Kind::Float, Device::Cpu));
        assert!(eval::linear_cka(&a, &other) < 0.2);
    }

    #[test]
    fn out_of_fold_predictions_cover_every_row_and_separate_separable_data() {
        let n = 120;
        let labels: Vec<f32> = (0..n).map(|i| (i % 2) as f32).collect();
        let feats: Vec<f32> = labels
            .iter()
            .enumerate()
            .flat_map(|(i, &l)| [l * 2.0 + (i % 7) as f32 * 0.1, (i % 5) as f32 * 0.1])
            .collect();
        let keys: Vec<String> = (0..n).map(|i| format!("k{i}")).collect();
        let units: Vec<&str> = keys.iter().map(String::as_str).collect();
        let (lin, knn) = eval::cross_validated(
            &Tensor::from_slice(&feats).view([n as i64, 2]),
            &Tensor::from_slice(&labels),
            &units,
            FOLDS,
            K,
        )
        .unwrap();
        let y: Vec<bool> = labels.iter().map(|&l| l > 0.5).collect();
        assert!(radfm_validation::stats::auroc(&lin, &y).unwrap() > 0.95);
        assert!(radfm_validation::stats::auroc(&knn, &y).unwrap() > 0.95);
    }

    /// Each patient has several images that look alike (the same patient, nothing about the
    /// finding) and one label: a fold split by image puts a patient on both sides and the probe
    /// recognises the patient (AUROC near 1); grouped by patient it cannot (near 0.5).
    #[test]
    fn folds_keep_each_patients_images_together_so_nothing_leaks() {
        tch::manual_seed(3);
        let (patients, per) = (40, 15);
        let looks = Tensor::randn([patients, 16], (tch::Kind::Float, Device::Cpu));
        let patient_label: Vec<f32> = (0..patients).map(|p| ((p * 7919) % 2) as f32).collect();
        let rows: Vec<i64> = (0..patients * per).map(|i| i / per).collect();
        let noise = Tensor::randn([patients * per, 16], (tch::Kind::Float, Device::Cpu)) * 0.05;
        let feats = looks.index_select(0, &Tensor::from_slice(&rows)) + noise;
        let labels: Vec<f32> = rows.iter().map(|&p| patient_label[p as usize]).collect();
        let keys: Vec<String> = (0..rows.len()).map(|i| format!("img{i}")).collect();
        let names: Vec<String> = rows.iter().map(|p| format!("patient{p}")).collect();
        let y: Vec<bool> = labels.iter().map(|&l| l > 0.5).collect();
        let knn_auroc = |units: Vec<&str>| {
            let (_, knn) =
                eval::cross_validated(&feats, &Tensor::from_slice(&labels), &units, FOLDS, K)
                    .unwrap();
            radfm_validation::stats::auroc(&knn, &y).unwrap()
        };
        let by_image = knn_auroc(keys.iter().map(String::as_str).collect());
        let by_patient = knn_auroc(names.iter().map(String::as_str).collect());
        assert!(
            by_image > 0.9,
            "split by image leaks the patient: {by_image}"
        );
        assert!(by_patient < 0.7, "grouped by patient: {by_patient}");
    }
}
