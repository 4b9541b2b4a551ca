//! The computing half of monitoring a deployed model at a site: embed a reference window and
//! the recent window with the model's encoder and compare them (embeddings, the task probe's
//! scores, image metadata) with permutation tests, and, where the recent cases' labels arrived,
//! the probe's AUROC per subgroup cell. Nothing per case leaves this function;
//! `radfm monitor` judges, signs and publishes the aggregates.

use std::collections::BTreeMap;

use radfm_data::store::Location;
use radfm_validation::drift::{self, DriftTest};
use radfm_validation::performance::{self, CellPerformance};
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use crate::eval::{self, Embedded};
use crate::{Error, Result};

/// What to compare.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// Exported folder of the deployed model.
    pub model_uri: &'a str,
    /// The reference window (labelled when `task` is set): what the model was validated on.
    pub reference_uri: &'a str,
    /// Shards of the reference dataset's index to use (None: all).
    pub reference_shards: Option<&'a [u64]>,
    /// The site's recent cases (labels not needed).
    pub recent_uri: &'a str,
    /// Shards of the recent dataset's index to use (None: all).
    pub recent_shards: Option<&'a [u64]>,
    /// A 0/1 task whose probe, fitted on the reference window, scores both windows.
    pub task: Option<&'a str>,
    /// Metadata fields whose mix is compared (`manufacturer`, `sex`, `age_band`).
    pub fields: &'a [String],
    /// Smallest subgroup cell whose performance is reported (late labels).
    pub min_cell: usize,
    /// Drop in AUROC tolerated before a cell's performance counts as worse.
    pub performance_margin: f64,
    /// Permutations behind each p-value.
    pub permutations: usize,
    /// Seed of subsampling and permutations.
    pub seed: u64,
}

/// The tests of one look, before they are judged together.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Drift tests: (what was compared, its test), embeddings first.
    pub tests: Vec<(String, DriftTest)>,
    /// Performance tests, one per cell of [`performance`](Self::performance).
    pub performance_tests: Vec<performance::Statistic>,
    /// Performance per cell once labels arrived (empty: too few labelled recent cases).
    pub performance: Vec<CellPerformance>,
    /// Recent cases with a late label of the task.
    pub labelled_recent: usize,
    /// sha256 of the reference window's index (and its shard selection).
    pub reference_fingerprint: String,
    /// sha256 of the recent window's index (and its shard selection).
    pub recent_fingerprint: String,
    /// sha256 of the model's weights as loaded.
    pub weights_sha256: String,
}

fn invalid(field: &str, reason: String) -> Error {
    Error::Field {
        field: field.into(),
        reason,
    }
}

fn rows(features: &Tensor) -> Vec<Vec<f32>> {
    let f = features.to_kind(Kind::Float).contiguous();
    let n = f.size()[0];
    (0..n)
        .map(|i| Vec::<f32>::try_from(f.get(i)).expect("a CPU float row"))
        .collect()
}

/// The probe's scores of both windows: fitted on the reference window's labels, standardised
/// with its statistics.
fn probe_scores(reference: &Embedded, recent: &Embedded) -> (Vec<f64>, Vec<f64>) {
    let (xr, xn) = (
        reference.features.to_kind(Kind::Float),
        recent.features.to_kind(Kind::Float),
    );
    let mu = xr.mean_dim(0, true, Kind::Float);
    let sd = xr.std_dim(0, false, true) + 1e-6;
    let (xr, xn) = ((&xr - &mu) / &sd, (&xn - &mu) / &sd);
    let both = Tensor::cat(&[&xr, &xn], 0);
    let scores = eval::logistic(&xr, &reference.labels, &both);
    let (a, b) = scores.split_at(reference.keys.len());
    (a.to_vec(), b.to_vec())
}

/// The recent window's late labels of `task`: the rows that have one, and their labels.
fn late_labels(recent: &Embedded, task: &str) -> (Vec<usize>, Vec<bool>) {
    recent
        .meta
        .iter()
        .enumerate()
        .filter_map(|(i, m)| Some((i, eval::target(m, task)? > 0.5)))
        .unzip()
}

/// Each case's value of every field that it has.
fn groups(e: &Embedded, rows: &[usize], fields: &[String]) -> Vec<BTreeMap<String, String>> {
    rows.iter()
        .map(|&i| {
            fields
                .iter()
                .filter_map(|f| Some((f.clone(), eval::field_value(&e.meta[i], f)?)))
                .collect()
        })
        .collect()
}

/// Performance per cell where the recent window's labels arrived: the reference scored
/// out-of-fold, the labelled recent cases by the probe fitted on the whole reference.
fn late_performance(
    req: &Request<'_>,
    task: &str,
    (reference, reference_scores): (&Embedded, Vec<f64>),
    (recent, recent_scores): (&Embedded, &[f64]),
) -> Result<(Vec<CellPerformance>, Vec<performance::Statistic>, usize)> {
    let (rows, y_recent) = late_labels(recent, task);
    let p_recent: Vec<f64> = rows.iter().map(|&i| recent_scores[i]).collect();
    let all: Vec<usize> = (0..reference.keys.len()).collect();
    let y_reference: Vec<bool> = Vec::<f32>::try_from(&reference.labels)
        .map_err(|e| invalid("reference", format!("labels: {e}")))?
        .iter()
        .map(|&l| l > 0.5)
        .collect();
    let (ga, gb) = (
        groups(reference, &all, req.fields),
        groups(recent, &rows, req.fields),
    );
    let settings = performance::Settings {
        task,
        fields: req.fields,
        min_cell_size: req.min_cell,
        margin: req.performance_margin,
        permutations: performance::PERMUTATIONS.max(req.permutations),
        seed: req.seed ^ 0xfeed,
    };
    let reference = performance::Labelled {
        scored: performance::Scored {
            p: &reference_scores,
            y: &y_reference,
        },
        groups: &ga,
    };
    let recent = performance::Labelled {
        scored: performance::Scored {
            p: &p_recent,
            y: &y_recent,
        },
        groups: &gb,
    };
    let cells = performance::by_cell(reference, recent, &settings)
        .map_err(|e| invalid("window", format!("{}: late labels: {e}", req.recent_uri)))?
        .unwrap_or_default();
    let (perf, tests) = cells.into_iter().unzip();
    Ok((perf, tests, rows.len()))
}

/// Out-of-fold probe scores of the reference window (the probe never scores a case of its own
/// fold's training part).
fn reference_out_of_fold(reference: &Embedded) -> Result<Vec<f64>> {
    let units: Vec<&str> = reference
        .meta
        .iter()
        .zip(&reference.keys)
        .map(|(m, key)| eval::split_unit(m, key))
        .collect();
    let (linear, _) = eval::cross_validated(
        &reference.features,
        &reference.labels,
        &units,
        crate::site::FOLDS,
        crate::site::K,
    )?;
    Ok(linear)
}

/// The category of a case that lacks the field.
const UNKNOWN: &str = "unknown";

/// Each row's value of `field` ([`UNKNOWN`] where it has none).
fn categories(e: &Embedded, field: &str) -> Vec<String> {
    e.meta
        .iter()
        .map(|m| eval::field_value(m, field).unwrap_or_else(|| UNKNOWN.into()))
        .collect()
}

/// sha256 of a window: its dataset's index, then the selected shard numbers when a selection
/// is made (a whole index hashes as the index alone).
async fn fingerprint(uri: &str, shards: Option<&[u64]>) -> Result<String> {
    let loc = Location::open(uri)?;
    let bytes = loc
        .get_bounded(radfm_data::index::INDEX, radfm_data::index::MAX_INDEX_BYTES)
        .await?
        .ok_or_else(|| invalid("dataset", format!("{uri} has no index")))?;
    let mut h = Sha256::new();
    h.update(&bytes);
    if let Some(shards) = shards {
        h.update(format!("\nshards {shards:?}").as_bytes());
    }
    Ok(hex::encode(h.finalize()))
}

/// Runs one look: the reference window against the recent one.
pub async fn monitor(req: &Request<'_>) -> Result<Outcome> {
    let m = crate::export::load(req.model_uri, Device::Cpu).await?;
    let (mean, std) = (m.card.input.mean, m.card.input.std);
    let reference = eval::embed_shards(
        &m.encoder,
        req.reference_uri,
        req.reference_shards,
        req.task,
        mean,
        std,
    )
    .await?;
    let recent = eval::embed_shards(
        &m.encoder,
        req.recent_uri,
        req.recent_shards,
        None,
        mean,
        std,
    )
    .await?;
    let failed = |e: radfm_validation::Error| {
        let windows = format!("{} against {}", req.recent_uri, req.reference_uri);
        invalid("window", format!("{windows}: {e}"))
    };
    let mut tests = vec![(
        "embeddings".to_string(),
        drift::mmd(
            &rows(&reference.features),
            &rows(&recent.features),
            req.permutations,
            req.seed,
        )
        .map_err(failed)?,
    )];
    let mut scores = None;
    if let Some(task) = req.task {
        let (a, b) = probe_scores(&reference, &recent);
        let t = drift::ks(&a, &b, req.permutations, req.seed ^ 1).map_err(failed)?;
        tests.push((format!("scores:{task}"), t));
        scores = Some((task, b));
    }
    for (i, field) in req.fields.iter().enumerate() {
        let (a, b) = (categories(&reference, field), categories(&recent, field));
        if a.iter().chain(&b).all(|c| c == UNKNOWN) {
            return Err(invalid(
                "fields",
                format!("no case of either window has the field {field:?}"),
            ));
        }
        let t = drift::categorical(&a, &b, req.permutations, req.seed ^ (2 + i as u64))
            .map_err(failed)?;
        tests.push((format!("metadata:{field}"), t));
    }
    let (mut performance, mut performance_tests, mut labelled_recent) = (vec![], vec![], 0);
    if let Some((task, recent_scores)) = scores {
        let oof = reference_out_of_fold(&reference)?;
        (performance, performance_tests, labelled_recent) =
            late_performance(req, task, (&reference, oof), (&recent, &recent_scores))?;
    }
    Ok(Outcome {
        tests,
        performance_tests,
        performance,
        labelled_recent,
        reference_fingerprint: fingerprint(req.reference_uri, req.reference_shards).await?,
        recent_fingerprint: fingerprint(req.recent_uri, req.recent_shards).await?,
        weights_sha256: m.card.weights_sha256.clone(),
    })
}
