//! Linear-probe and k-NN evaluation of an encoder's embeddings on a labelled dataset.
//!
//! The standard way to judge a self-supervised encoder: freeze it, embed labelled images, split
//! them by a hash of the sample key (stable across runs and machines), and fit the simplest
//! classifiers on the training part. A pretrained encoder should beat the same architecture at
//! random initialisation; that comparison is what [`compare`] reports.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use radfm_data::loader::{Cursor, Loader, LoaderConfig};

use crate::model::{Encoder, VitConfig};
use crate::{Error, Result};

/// Embeddings with their binary labels.
#[derive(Debug)]
pub struct Embedded {
    /// [N, D] features.
    pub features: Tensor,
    /// [N] labels, 0 or 1.
    pub labels: Tensor,
    /// Sample keys, in row order.
    pub keys: Vec<String>,
    /// Sample metadata, in row order (subgroups of site validation).
    pub meta: Vec<radfm_data::SampleMeta>,
    /// Each sample's report, where it has one, in row order.
    pub reports: Vec<Option<String>>,
}

/// Scores of one classifier on the held-out part.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    /// Accuracy.
    pub accuracy: f64,
    /// Mean of sensitivity and specificity.
    pub balanced_accuracy: f64,
    /// Area under the ROC curve.
    pub auroc: f64,
}

/// Evaluation of one encoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Which encoder.
    pub encoder: String,
    /// Training samples of the probes.
    pub train: usize,
    /// Held-out samples.
    pub test: usize,
    /// Neighbours of the k-NN classifier.
    pub k: usize,
    /// k-NN on cosine similarity.
    pub knn: Scores,
    /// Logistic regression on standardised features.
    pub linear: Scores,
}

/// Embeds every sample of a dataset (one pass, no augmentation) with its 0/1 `label`. Images
/// are normalised with the encoder's training statistics (`mean`, `std`), not the evaluation
/// set's.
pub async fn embed(
    encoder: &Encoder,
    dataset_uri: &str,
    label: &str,
    mean: f64,
    std: f64,
) -> Result<Embedded> {
    embed_shards(encoder, dataset_uri, None, Some(label), mean, std).await
}

/// The `shards` of a dataset (None: every shard of its index) embedded as [`embed`] does, with
/// their 0/1 `label`, or without labels (`labels` is empty) for data whose labels have not
/// arrived.
pub(crate) async fn embed_shards(
    encoder: &Encoder,
    dataset_uri: &str,
    shards: Option<&[u64]>,
    label: Option<&str>,
    mean: f64,
    std: f64,
) -> Result<Embedded> {
    let side = encoder.cfg.image_size;
    let cfg = LoaderConfig {
        batch_size: 16,
        image_size: side as usize,
        augment: false,
        shards: shards.map(<[u64]>::to_vec),
        ..Default::default()
    };
    let mut loader = Loader::open(dataset_uri, cfg).await?;
    // The loader normalised with the evaluation set's statistics (std 1 when it has none).
    let eval_stats = loader.stats();
    let eval_std = eval_stats.std;
    let device = encoder.device();
    let mut feats = Vec::new();
    let mut labels = Vec::new();
    let mut keys = Vec::new();
    let mut metas = Vec::new();
    let mut reports = Vec::new();
    let mut missing = None;
    loader
        .run_epoch(Cursor::default(), |batch| {
            let b = batch.keys.len() as i64;
            let x = Tensor::from_slice(&batch.images).view([b, 1, side, side]);
            // Back to physical values, then the encoder's normalisation.
            let x = ((x * eval_std + eval_stats.mean) - mean) / std;
            let f = tch::no_grad(|| encoder.embed(&x.to_device(device)));
            feats.push(f.to_device(Device::Cpu));
            for (key, meta) in batch.keys.iter().zip(&batch.meta) {
                match label.map(|l| target(meta, l)) {
                    None => {}
                    Some(Some(v)) => labels.push(v),
                    Some(None) => {
                        missing = Some(key.clone());
                        return false;
                    }
                }
                keys.push(key.clone());
                metas.push(meta.clone());
            }
            reports.extend(batch.reports.iter().cloned());
            true
        })
        .await?;
    if let (Some(key), Some(label)) = (missing, label) {
        return Err(Error::Field {
            field: "label".into(),
            reason: format!(
                "sample {key} of {dataset_uri} has no 0/1 label {label:?} (use a 0/1 label or FIELD=VALUE)"
            ),
        });
    }
    Ok(Embedded {
        features: Tensor::cat(&feats, 0),
        labels: Tensor::from_slice(&labels),
        keys,
        meta: metas,
        reports,
    })
}

/// Each case's values of the subgroup `fields` (a field the case lacks is left out), in the
/// form disclosure control and the reports take.
pub fn subgroup_values(
    meta: &[radfm_data::SampleMeta],
    fields: &[String],
) -> Vec<std::collections::BTreeMap<String, String>> {
    meta.iter()
        .map(|m| {
            fields
                .iter()
                .filter_map(|f| Some((f.clone(), field_value(m, f)?)))
                .collect()
        })
        .collect()
}

/// The binary target of a sample: `name` is a 0/1 label of the sample (`lesion`), or
/// `FIELD=VALUE` over its labels and metadata fields (`sex=F`, `site=site-b`, `age_band=80+`).
pub fn target(meta: &radfm_data::SampleMeta, name: &str) -> Option<f32> {
    match name.split_once('=') {
        None => meta.labels.get(name).and_then(label_value),
        Some((field, value)) => Some((field_value(meta, field)? == value) as u8 as f32),
    }
}

/// A sample's value of a label or metadata field, as text (`sex` → `F`).
pub fn field_value(meta: &radfm_data::SampleMeta, field: &str) -> Option<String> {
    let v = meta.labels.get(field).cloned().or_else(|| {
        serde_json::to_value(meta)
            .ok()
            .and_then(|m| m.get(field).cloned())
    })?;
    match v {
        serde_json::Value::Null => None,
        serde_json::Value::String(s) => Some(s),
        other => Some(other.to_string()),
    }
}

fn label_value(v: &serde_json::Value) -> Option<f32> {
    match v {
        serde_json::Value::Bool(b) => Some(*b as u8 as f32),
        serde_json::Value::Number(n) => match n.as_f64()? {
            x if x == 0.0 || x == 1.0 => Some(x as f32),
            _ => None,
        },
        serde_json::Value::String(s) => match s.as_str() {
            "0" | "false" | "negative" => Some(0.0),
            "1" | "true" | "positive" => Some(1.0),
            _ => None,
        },
        _ => None,
    }
}

/// Whether a patient falls in the held-out part (30 %, by sha256 of the patient's split unit,
/// see [`split_unit`]).
pub fn held_out(unit: &str) -> bool {
    Sha256::digest(unit.as_bytes())[0] as u32 * 10 / 256 >= 7
}

/// What train/test splits and cross-validation folds keep together: the patient pseudonym, else
/// the study pseudonym, else the sample key (a sample without either is its own patient). One
/// patient's images never sit on both sides of a split, which would let a probe recognise the
/// patient instead of the finding and inflate AUROC.
pub fn split_unit<'a>(meta: &'a radfm_data::SampleMeta, key: &'a str) -> &'a str {
    meta.patient
        .as_deref()
        .or(meta.study.as_deref())
        .unwrap_or(key)
}

/// Area under the ROC curve of `scores` for binary `labels` (ties count half; 0.5 without both
/// classes).
pub fn auroc(scores: &[f64], labels: &[f32]) -> f64 {
    let y: Vec<bool> = labels.iter().map(|&l| l > 0.5).collect();
    radfm_validation::stats::auroc(scores, &y).unwrap_or(0.5)
}

fn scores(prob: &[f64], labels: &[f32]) -> Scores {
    let (mut tp, mut tn, mut p, mut n) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    for (&s, &l) in prob.iter().zip(labels) {
        if l > 0.5 {
            p += 1.0;
            tp += (s >= 0.5) as u8 as f64;
        } else {
            n += 1.0;
            tn += (s < 0.5) as u8 as f64;
        }
    }
    let rate = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    Scores {
        accuracy: (tp + tn) / (p + n).max(1.0),
        balanced_accuracy: (rate(tp, p) + rate(tn, n)) / 2.0,
        auroc: auroc(prob, labels),
    }
}

fn to_vec(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).expect("a CPU tensor")
}

/// Fits the probes on the training part and scores them on the held-out part.
pub fn probe(name: &str, e: &Embedded, k: usize) -> Result<Report> {
    let held = |i: i64| {
        let key = e.keys[i as usize].as_str();
        held_out(e.meta.get(i as usize).map_or(key, |m| split_unit(m, key)))
    };
    let test_rows: Vec<i64> = (0..e.keys.len() as i64).filter(|&i| held(i)).collect();
    let train_rows: Vec<i64> = (0..e.keys.len() as i64).filter(|&i| !held(i)).collect();
    if test_rows.len() < 4 || train_rows.len() < k.max(4) {
        return Err(Error::Field {
            field: "dataset".into(),
            reason: format!(
                "{} samples are too few to probe ({} train, {} held out)",
                e.keys.len(),
                train_rows.len(),
                test_rows.len()
            ),
        });
    }
    let x = e.features.to_kind(Kind::Float);
    let (xtr, xte) = (
        x.index_select(0, &Tensor::from_slice(&train_rows)),
        x.index_select(0, &Tensor::from_slice(&test_rows)),
    );
    let (ytr, yte) = (
        e.labels.index_select(0, &Tensor::from_slice(&train_rows)),
        e.labels.index_select(0, &Tensor::from_slice(&test_rows)),
    );
    let mu = xtr.mean_dim(0, true, Kind::Float);
    let sd = xtr.std_dim(0, false, true) + 1e-6;
    let (xtr, xte) = ((&xtr - &mu) / &sd, (&xte - &mu) / &sd);
    let labels_te: Vec<f32> = Vec::try_from(&yte).expect("labels");

    let k = k.min(train_rows.len());
    let knn = scores(&knn_scores(&xtr, &ytr, &xte, k), &labels_te);

    let prob = logistic(&xtr, &ytr, &xte);
    let linear = scores(&prob, &labels_te);
    Ok(Report {
        encoder: name.into(),
        train: train_rows.len(),
        test: test_rows.len(),
        k,
        knn,
        linear,
    })
}

/// Logistic regression fitted on standardised `xtr` (full batch, L2-regularised, a fixed number
/// of Adam steps from zero); the probabilities of `xte`.
pub(crate) fn logistic(xtr: &Tensor, ytr: &Tensor, xte: &Tensor) -> Vec<f64> {
    let d = xtr.size()[1];
    let vs = VarStore::new(Device::Cpu);
    let w = vs.root().zeros("w", &[d]);
    let b = vs.root().zeros("b", &[1]);
    let mut opt = crate::optim::AdamW::new(
        &vs,
        crate::optim::AdamWConfig {
            beta2: 0.999,
            weight_decay: 0.0,
            ..Default::default()
        },
    );
    for _ in 0..300 {
        opt.zero_grad();
        let logits = xtr.matmul(&w) + &b;
        let loss = logits.binary_cross_entropy_with_logits::<Tensor>(
            ytr,
            None,
            None,
            tch::Reduction::Mean,
        ) + w.square().sum(Kind::Float) * 1e-3;
        opt.backward(&loss);
        opt.step(0.05);
    }
    let prob = tch::no_grad(|| (xte.matmul(&w) + &b).sigmoid());
    to_vec(&prob)
}

/// The k-NN score (positive fraction among the `k` most cosine-similar training rows) of every
/// row of `xte`.
fn knn_scores(xtr: &Tensor, ytr: &Tensor, xte: &Tensor, k: usize) -> Vec<f64> {
    let normed = |t: &Tensor| t / (t.norm_scalaropt_dim(2, [1], true) + 1e-8);
    let sim = normed(xte).matmul(&normed(xtr).transpose(0, 1));
    let k = k.min(xtr.size()[0] as usize).max(1);
    let (_, nn) = sim.topk(k as i64, 1, true, true);
    let votes = ytr.index_select(0, &nn.flatten(0, -1)).view([-1, k as i64]);
    to_vec(&votes.mean_dim(1, false, Kind::Float))
}

/// Out-of-fold predictions of every row: `folds`-fold cross-validation grouped by each row's
/// split unit (its patient, see [`split_unit`]; the fold is a hash of it), standardising with
/// each training fold's statistics. Returns (logistic-regression probabilities, k-NN scores),
/// in row order.
pub fn cross_validated(
    features: &Tensor,
    labels: &Tensor,
    units: &[&str],
    folds: usize,
    k: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let n = units.len();
    let fold_of = |unit: &str| Sha256::digest(unit.as_bytes())[1] as usize % folds;
    let x = features.to_kind(Kind::Float);
    let (mut linear, mut knn) = (vec![0.0; n], vec![0.0; n]);
    for f in 0..folds {
        let test: Vec<i64> = (0..n as i64)
            .filter(|&i| fold_of(units[i as usize]) == f)
            .collect();
        let train: Vec<i64> = (0..n as i64)
            .filter(|&i| fold_of(units[i as usize]) != f)
            .collect();
        if test.is_empty() {
            continue;
        }
        if train.len() < 4 {
            return Err(Error::Field {
                field: "dataset".into(),
                reason: format!("{n} samples are too few for {folds}-fold cross-validation"),
            });
        }
        let (tr, te) = (Tensor::from_slice(&train), Tensor::from_slice(&test));
        let (xtr, xte) = (x.index_select(0, &tr), x.index_select(0, &te));
        let ytr = labels.index_select(0, &tr);
        let mu = xtr.mean_dim(0, true, Kind::Float);
        let sd = xtr.std_dim(0, false, true) + 1e-6;
        let (xtr, xte) = ((&xtr - &mu) / &sd, (&xte - &mu) / &sd);
        let p = logistic(&xtr, &ytr, &xte);
        let q = knn_scores(&xtr, &ytr, &xte, k);
        for (j, &row) in test.iter().enumerate() {
            linear[row as usize] = p[j];
            knn[row as usize] = q[j];
        }
    }
    Ok((linear, knn))
}

/// Linear centred kernel alignment of two embeddings of the same rows (Kornblith et al. 2019):
/// 1 when they agree up to rotation and isotropic scale, near 0 when unrelated.
pub fn linear_cka(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_kind(Kind::Double);
    let b = b.to_kind(Kind::Double);
    let a = &a - a.mean_dim(0, true, Kind::Double);
    let b = &b - b.mean_dim(0, true, Kind::Double);
    let cross = b.transpose(0, 1).matmul(&a).square().sum(Kind::Double);
    let aa = a
        .transpose(0, 1)
        .matmul(&a)
        .square()
        .sum(Kind::Double)
        .sqrt();
    let bb = b
        .transpose(0, 1)
        .matmul(&b)
        .square()
        .sum(Kind::Double)
        .sqrt();
    (cross / (aa * bb + 1e-12)).double_value(&[])
}

/// Evaluation of a pretrained encoder next to the same architecture at random initialisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// The pretrained encoder.
    pub pretrained: Report,
    /// Random initialisation (seeded).
    pub random_init: Report,
}

/// Probes the exported model at `model_uri` (normalised with its card's statistics) and a
/// seeded random-init encoder of the same sizes on the same data.
pub async fn compare(
    model_uri: &str,
    dataset_uri: &str,
    label: &str,
    seed: i64,
) -> Result<Comparison> {
    let m = crate::export::load(model_uri, Device::Cpu).await?;
    let (encoder, mean, std) = (&m.encoder, m.card.input.mean, m.card.input.std);
    let pretrained = probe(
        model_uri,
        &embed(encoder, dataset_uri, label, mean, std).await?,
        10,
    )?;
    let random = random_encoder(encoder.cfg, seed, encoder.device());
    let random_init = probe(
        "random-init",
        &embed(&random.1, dataset_uri, label, mean, std).await?,
        10,
    )?;
    Ok(Comparison {
        pretrained,
        random_init,
    })
}

/// A seeded random-init encoder (with the store that holds its variables).
pub fn random_encoder(cfg: VitConfig, seed: i64, device: Device) -> (VarStore, Encoder) {
    tch::manual_seed(seed);
    let vs = VarStore::new(device);
    let e = Encoder::new(vs.root() / "encoder", cfg);
    (vs, e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auroc_counts_ties_as_half_and_orders_correctly() {
        assert_eq!(auroc(&[0.1, 0.2, 0.8, 0.9], &[0.0, 0.0, 1.0, 1.0]), 1.0);
        assert_eq!(auroc(&[0.9, 0.8, 0.2, 0.1], &[0.0, 0.0, 1.0, 1.0]), 0.0);
        assert_eq!(auroc(&[0.5, 0.5], &[0.0, 1.0]), 0.5);
        assert!((auroc(&[0.1, 0.4, 0.35, 0.8], &[0.0, 0.0, 1.0, 1.0]) - 0.75).abs() < 1e-12);
    }

    #[test]
    fn the_split_is_stable_and_roughly_seventy_thirty() {
        let held = (0..1000).filter(|i| held_out(&format!("k{i}"))).count();
        assert!((250..350).contains(&held), "{held}");
        assert_eq!(held_out("synth-a-0000001"), held_out("synth-a-0000001"));
    }

    #[test]
    fn probes_separate_separable_features() {
        let n = 200;
        let labels: Vec<f32> = (0..n).map(|i| (i % 3 == 0) as u8 as f32).collect();
        let feats: Vec<f32> = labels
            .iter()
            .enumerate()
            .flat_map(|(i, &l)| [l * 2.0 + (i % 7) as f32 * 0.05, (i % 5) as f32 * 0.1])
            .collect();
        let e = Embedded {
            features: Tensor::from_slice(&feats).view([n as i64, 2]),
            labels: Tensor::from_slice(&labels),
            keys: (0..n).map(|i| format!("k{i}")).collect(),
            meta: Vec::new(),
            reports: Vec::new(),
        };
        let r = probe("toy", &e, 5).unwrap();
        assert!(r.knn.balanced_accuracy > 0.95, "{r:?}");
        assert!(r.linear.auroc > 0.95, "{r:?}");
    }
}
