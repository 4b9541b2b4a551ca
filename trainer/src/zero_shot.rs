//! Zero-shot evaluation of an image–report model: findings queried by text, and retrieval.
//!
//! **Classification.** For each finding, its positive and negative prompts are embedded by the
//! report encoder (each prompt normalised, each side's prompts averaged, as CLIP's prompt
//! ensembles are), and an image's probability of the finding is the softmax, at the model's
//! learned temperature, of its cosine similarities with the two sides. No label is used to
//! fit anything: the labels only score the probabilities. The scores go through the site
//! validation's statistics and disclosure control (`radfm_validation::report::task_report`):
//! AUROC with bootstrap intervals overall and per published subgroup cell, the pretrained
//! model as the candidate and the same architecture at a seeded random initialisation (the
//! same tokenizer) as the baseline.
//!
//! **Retrieval.** Every image with a report against every report: recall@k from image to text
//! and from text to image. Reports are often worded identically (a normal study), so a retrieved
//! report counts as a hit when its text is the query's own report text, and a retrieved image
//! when its report text is the query text; the chance level under those duplicates is given
//! beside each recall, and ties are broken in a seeded random order. At most [`MAX_RETRIEVAL`] pairs (in the dataset's key order) are ranked,
//! which bounds the similarity matrix.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use radfm_validation::disclosure;
use radfm_validation::report::{Cases, TaskReport};

use crate::eval::{self, Embedded};
use crate::image_text::ImageText;
use crate::model::{Encoder, VitConfig};
use crate::text::ReportTokenizer;
use crate::{Error, Result};

/// Pairs ranked for retrieval.
pub const MAX_RETRIEVAL: usize = 2000;
/// The k of recall@k.
pub const RECALL_AT: [usize; 3] = [1, 5, 10];

/// A finding and the prompts that describe its presence and its absence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    /// 0/1 label of the samples (`lesion`), or FIELD=VALUE over labels and metadata.
    pub label: String,
    /// Texts that say the finding is present.
    pub positive: Vec<String>,
    /// Texts that say it is absent.
    pub negative: Vec<String>,
}

impl Finding {
    /// The synthetic cohorts' finding with prompts in plain words (none of them a report of
    /// the training data word for word). Four on each side, as CLIP averages prompt ensembles:
    /// a small text encoder reads a short negation ("No lesion.") by its noun, and one such
    /// prompt alone can turn the ranking over.
    pub fn lesion() -> Finding {
        Finding {
            label: "lesion".into(),
            positive: [
                "A lesion in the lung.",
                "There is a rounded nodule.",
                "A mass in the lung.",
                "An opacity in the lung.",
            ]
            .map(String::from)
            .to_vec(),
            negative: [
                "No lesion.",
                "The lungs are clear.",
                "No nodule or mass.",
                "No focal opacity.",
            ]
            .map(String::from)
            .to_vec(),
        }
    }
}

/// What to evaluate.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// Exported image–report model folder.
    pub model_uri: &'a str,
    /// Labelled dataset with reports.
    pub dataset_uri: &'a str,
    /// The findings queried.
    pub findings: &'a [Finding],
    /// Subgroup fields (`sex`, `site`, `age_band`).
    pub subgroups: &'a [String],
    /// Smallest published cell.
    pub min_cell: usize,
    /// Seed of the random-init baseline and the bootstrap.
    pub seed: i64,
}

/// Recall at one k.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Recall {
    /// k.
    pub k: usize,
    /// Queries with a hit among their k best.
    pub recall: f64,
    /// Expected recall of a random ranking.
    pub chance: f64,
}

/// Retrieval by one model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Retrieval {
    /// `pretrained` or `random-init`.
    pub model: String,
    /// Image–report pairs ranked.
    pub pairs: usize,
    /// Images as queries, reports retrieved.
    pub image_to_text: Vec<Recall>,
    /// Reports as queries, images retrieved.
    pub text_to_image: Vec<Recall>,
}

/// The evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ZeroShot {
    /// The model.
    pub model: String,
    /// The dataset.
    pub dataset: String,
    /// Cases scored.
    pub cases: usize,
    /// The findings and their prompts.
    pub findings: Vec<Finding>,
    /// Per finding: pretrained (candidate) against random init (baseline).
    pub tasks: Vec<TaskReport>,
    /// Pretrained, then random init.
    pub retrieval: Vec<Retrieval>,
}

/// One model's side of the evaluation.
struct Scorer<'a> {
    encoder: &'a Encoder,
    image_text: &'a ImageText,
    tokenizer: &'a ReportTokenizer,
}

impl Scorer<'_> {
    fn images(&self, e: &Embedded) -> Tensor {
        normalised(&tch::no_grad(|| {
            self.image_text
                .project_image(&e.features.to_device(self.encoder.device()))
        }))
    }

    fn texts(&self, texts: &[&str]) -> Result<Tensor> {
        let mut parts = Vec::new();
        for chunk in texts.chunks(256) {
            let t = tch::no_grad(|| self.image_text.embed_reports(self.tokenizer, chunk))?;
            parts.push(normalised(&t));
        }
        Ok(Tensor::cat(&parts, 0))
    }

    /// Each image's probability of the finding.
    fn probabilities(&self, images: &Tensor, f: &Finding) -> Result<Vec<f64>> {
        let side = |prompts: &[String]| -> Result<Tensor> {
            let texts: Vec<&str> = prompts.iter().map(String::as_str).collect();
            Ok(normalised(&self.texts(&texts)?.mean_dim(
                0,
                true,
                Kind::Float,
            )))
        };
        let (pos, neg) = (side(&f.positive)?, side(&f.negative)?);
        let scale = self
            .image_text
            .logit_scale
            .clamp_max(crate::contrastive::MAX_SCALE.ln())
            .exp();
        let logits = images.matmul(&Tensor::cat(&[pos, neg], 0).tr()) * scale;
        let p = tch::no_grad(|| logits.softmax(1, Kind::Double).select(1, 0));
        Ok(Vec::try_from(p.to_device(Device::Cpu)).unwrap_or_default())
    }

    fn retrieval(&self, name: &str, e: &Embedded, images: &Tensor, seed: i64) -> Result<Retrieval> {
        let rows: Vec<usize> = (0..e.reports.len())
            .filter(|&i| e.reports[i].is_some())
            .take(MAX_RETRIEVAL)
            .collect();
        let texts: Vec<&str> = rows
            .iter()
            .map(|&i| e.reports[i].as_deref().unwrap_or_default())
            .collect();
        let index = Tensor::from_slice(&rows.iter().map(|&i| i as i64).collect::<Vec<_>>());
        let images = images.index_select(0, &index.to_device(images.device()));
        let sim = images.matmul(&self.texts(&texts)?.tr());
        let group = same_text_groups(&texts);
        Ok(Retrieval {
            model: name.into(),
            pairs: rows.len(),
            image_to_text: recalls(&sim, &group, seed),
            text_to_image: recalls(&sim.tr(), &group, seed),
        })
    }
}

fn normalised(t: &Tensor) -> Tensor {
    t / t.norm_scalaropt_dim(2, [-1], true).clamp_min(1e-12)
}

/// Each text's group: texts equal after collapsing white space share one.
fn same_text_groups(texts: &[&str]) -> Vec<usize> {
    let mut ids: BTreeMap<String, usize> = BTreeMap::new();
    texts
        .iter()
        .map(|t| {
            let key = t.split_whitespace().collect::<Vec<_>>().join(" ");
            let next = ids.len();
            *ids.entry(key).or_insert(next)
        })
        .collect()
}

/// Recall@k of every query row of `sim` ([queries, items], the same pairs on both sides): a
/// hit when one of the k best items is in the query's group; with the chance level. Items
/// are ranked in a seeded random order before sorting, so that ties (a random-init model
/// embeds most images alike) fall at random rather than in the dataset's order.
fn recalls(sim: &Tensor, group: &[usize], seed: i64) -> Vec<Recall> {
    let n = group.len();
    let kmax = RECALL_AT.iter().copied().max().unwrap_or(1).min(n);
    tch::manual_seed(seed);
    let shuffle = Tensor::randperm(n as i64, (Kind::Int64, Device::Cpu));
    let items: Vec<i64> = Vec::try_from(&shuffle).unwrap_or_default();
    let sim = sim.index_select(1, &shuffle.to_device(sim.device()));
    let order: Vec<i64> = Vec::try_from(
        sim.topk(kmax as i64, 1, true, true)
            .1
            .flatten(0, -1)
            .to_device(Device::Cpu),
    )
    .unwrap_or_default();
    let order: Vec<i64> = order.into_iter().map(|i| items[i as usize]).collect();
    let mut size = vec![0usize; n];
    for &g in group {
        size[g] += 1;
    }
    RECALL_AT
        .iter()
        .map(|&k| {
            let k = k.min(n);
            let hits = (0..n)
                .filter(|&q| {
                    order[q * kmax..q * kmax + k]
                        .iter()
                        .any(|&i| group[i as usize] == group[q])
                })
                .count();
            let chance = (0..n)
                .map(|q| chance_of_hit(n, size[group[q]], k))
                .sum::<f64>();
            Recall {
                k,
                recall: hits as f64 / n.max(1) as f64,
                chance: chance / n.max(1) as f64,
            }
        })
        .collect()
}

/// The probability that k of n items drawn at random include one of `m` matching items.
fn chance_of_hit(n: usize, m: usize, k: usize) -> f64 {
    let miss: f64 = (0..k)
        .map(|i| (n - m).saturating_sub(i) as f64 / (n - i) as f64)
        .product();
    1.0 - miss
}

/// A seeded random-init image–report model of `vit`'s sizes.
fn random_init(vit: VitConfig, seed: i64) -> (tch::nn::VarStore, Encoder, ImageText) {
    tch::manual_seed(seed);
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let encoder = Encoder::new(vs.root() / "encoder", vit);
    let it = ImageText::new(&vs.root(), &vit);
    (vs, encoder, it)
}

/// Evaluates the model at `req.model_uri` and a random-init one on `req.dataset_uri`.
pub async fn evaluate(req: &Request<'_>) -> Result<ZeroShot> {
    let first = req.findings.first().ok_or_else(|| Error::Field {
        field: "findings".into(),
        reason: "no finding to query".into(),
    })?;
    let m = crate::export::load(req.model_uri, Device::Cpu).await?;
    let (it, tokenizer) = m.image_text.as_ref().ok_or_else(|| Error::Field {
        field: "model".into(),
        reason: format!(
            "{} was trained on images alone: zero-shot queries need its report encoder (model.objective.contrastive)",
            req.model_uri
        ),
    })?;
    let (mean, std) = (m.card.input.mean, m.card.input.std);
    let data = eval::embed(&m.encoder, req.dataset_uri, &first.label, mean, std).await?;
    let (_vs, r_encoder, r_it) = random_init(m.card.vit, req.seed);
    let r_data = eval::embed(&r_encoder, req.dataset_uri, &first.label, mean, std).await?;
    let trained = Scorer {
        encoder: &m.encoder,
        image_text: it,
        tokenizer,
    };
    let random = Scorer {
        encoder: &r_encoder,
        image_text: &r_it,
        tokenizer,
    };
    let (images, r_images) = (trained.images(&data), random.images(&r_data));
    let tasks = task_reports(req, &data, [&trained, &random], [&images, &r_images])?;
    let retrieval = vec![
        trained.retrieval("pretrained", &data, &images, req.seed)?,
        random.retrieval("random-init", &r_data, &r_images, req.seed)?,
    ];
    Ok(ZeroShot {
        model: req.model_uri.into(),
        dataset: req.dataset_uri.into(),
        cases: data.keys.len(),
        findings: req.findings.to_vec(),
        tasks,
        retrieval,
    })
}

/// The findings' reports: one disclosure plan over all of them, as site validation makes.
fn task_reports(
    req: &Request<'_>,
    data: &Embedded,
    scorers: [&Scorer<'_>; 2],
    images: [&Tensor; 2],
) -> Result<Vec<TaskReport>> {
    let invalid = |reason: String| Error::Field {
        field: "dataset".into(),
        reason: format!("{}: {reason}", req.dataset_uri),
    };
    let mut labels = Vec::new();
    for f in req.findings {
        let y: Option<Vec<bool>> = data
            .meta
            .iter()
            .map(|m| eval::target(m, &f.label).map(|v| v > 0.5))
            .collect();
        labels.push(y.ok_or_else(|| invalid(format!("a sample has no 0/1 label {:?}", f.label)))?);
    }
    let groups = eval::subgroup_values(&data.meta, req.subgroups);
    let label_refs: Vec<&[bool]> = labels.iter().map(Vec::as_slice).collect();
    let cells = disclosure::plan(&groups, req.subgroups, req.min_cell, &label_refs)
        .map_err(|e| invalid(e.to_string()))?;
    let mut out = Vec::new();
    for (fi, (f, y)) in req.findings.iter().zip(&labels).enumerate() {
        let candidate = scorers[0].probabilities(images[0], f)?;
        let baseline = scorers[1].probabilities(images[1], f)?;
        let cases = Cases {
            task: f.label.clone(),
            candidate: &candidate,
            baseline: &baseline,
            labels: y,
            groups: &groups,
        };
        let seed = (req.seed as u64) ^ ((fi as u64) << 48);
        let mut t = radfm_validation::report::task_report(&cases, &cells, None, seed)
            .map_err(|e| invalid(e.to_string()))?;
        t.method = "zero-shot: softmax at the model's temperature over the cosine similarities \
                    with the averaged positive and negative prompts; no label fitted; baseline: \
                    the same architecture at random initialisation"
            .into();
        out.push(t);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_reports_share_a_group_whatever_their_spacing() {
        let g = same_text_groups(&["No lesion.", "No  lesion. ", "Left lower lesion (9 mm)."]);
        assert_eq!(g, [0, 0, 1]);
    }

    #[test]
    fn recall_counts_a_hit_in_the_querys_group_and_chance_counts_duplicates() {
        // Three pairs; texts 0 and 1 identical. Image q is most similar to text order[q].
        let sim = Tensor::from_slice(&[
            0.1f32, 0.9, 0.0, // image 0 prefers text 1 (same text as its own): hit at 1
            0.8, 0.1, 0.0, // image 1 prefers text 0 (same text): hit at 1
            0.9, 0.5, 0.1, // image 2 prefers texts 0 and 1: its own is last
        ])
        .view([3, 3]);
        let r = recalls(&sim, &[0, 0, 1], 7);
        assert_eq!(r[0].k, 1);
        assert!((r[0].recall - 2.0 / 3.0).abs() < 1e-12, "{r:?}");
        // k is capped at the number of pairs: everything is a hit.
        assert_eq!((r[1].k, r[1].recall), (3, 1.0));
        // Chance at k = 1: 2/3 for the two duplicates, 1/3 for the third.
        assert!((r[0].chance - (2.0 / 3.0 * 2.0 + 1.0 / 3.0) / 3.0).abs() < 1e-12);
        assert!((chance_of_hit(10, 1, 5) - 0.5).abs() < 1e-12);
        assert!((chance_of_hit(10, 10, 1) - 1.0).abs() < 1e-12);
    }
}
