//! Binary-classification metrics and paired bootstrap confidence intervals.
//!
//! Every function takes predicted probabilities and 0/1 labels of the same cases. Candidate and
//! baseline are always scored on the same bootstrap resamples, so the interval of their
//! difference accounts for the pairing (the usual way to test non-inferiority of a model update).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Probability at and above which a case is called positive (the operating point of the
/// site-fitted, calibrated probe).
pub const OPERATING_POINT: f64 = 0.5;

/// Area under the ROC curve (ties count half); None without both classes.
pub fn auroc(p: &[f64], y: &[bool]) -> Option<f64> {
    let pos = y.iter().filter(|&&l| l).count() as f64;
    let neg = y.len() as f64 - pos;
    if pos == 0.0 || neg == 0.0 {
        return None;
    }
    let mut idx: Vec<usize> = (0..p.len()).collect();
    idx.sort_by(|&a, &b| p[a].total_cmp(&p[b]));
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && p[idx[j + 1]] == p[idx[i]] {
            j += 1;
        }
        let r = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += idx[i..=j].iter().filter(|&&k| y[k]).count() as f64 * r;
        i = j + 1;
    }
    Some((rank_sum - pos * (pos + 1.0) / 2.0) / (pos * neg))
}

/// Area under the precision-recall curve as average precision; None without positives.
pub fn auprc(p: &[f64], y: &[bool]) -> Option<f64> {
    let pos = y.iter().filter(|&&l| l).count();
    if pos == 0 {
        return None;
    }
    let mut idx: Vec<usize> = (0..p.len()).collect();
    idx.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
    let (mut tp, mut ap) = (0.0, 0.0);
    for (rank, &k) in idx.iter().enumerate() {
        if y[k] {
            tp += 1.0;
            ap += tp / (rank + 1) as f64;
        }
    }
    Some(ap / pos as f64)
}

/// Sensitivity and specificity at [`OPERATING_POINT`].
pub fn sens_spec(p: &[f64], y: &[bool]) -> (Option<f64>, Option<f64>) {
    let (mut tp, mut pos, mut tn, mut neg) = (0.0, 0.0, 0.0, 0.0);
    for (&s, &l) in p.iter().zip(y) {
        if l {
            pos += 1.0;
            tp += (s >= OPERATING_POINT) as u8 as f64;
        } else {
            neg += 1.0;
            tn += (s < OPERATING_POINT) as u8 as f64;
        }
    }
    let rate = |a: f64, b: f64| (b > 0.0).then(|| a / b);
    (rate(tp, pos), rate(tn, neg))
}

/// Expected calibration error over 10 equal-width probability bins: the case-weighted mean of
/// |mean predicted probability − observed positive rate| per bin.
pub fn ece(p: &[f64], y: &[bool]) -> Option<f64> {
    if p.is_empty() {
        return None;
    }
    let mut bins = [(0.0f64, 0.0f64, 0usize); 10];
    for (&s, &l) in p.iter().zip(y) {
        let b = ((s * 10.0) as usize).min(9);
        bins[b].0 += s;
        bins[b].1 += l as u8 as f64;
        bins[b].2 += 1;
    }
    let n = p.len() as f64;
    Some(
        bins.iter()
            .filter(|b| b.2 > 0)
            .map(|(conf, acc, _)| (conf - acc).abs() / n)
            .sum::<f64>(),
    )
}

/// False-negative rate at [`OPERATING_POINT`] (1 − sensitivity); None without positives.
pub fn false_negative_rate(p: &[f64], y: &[bool]) -> Option<f64> {
    sens_spec(p, y).0.map(|s| 1.0 - s)
}

/// Where one model harms a subgroup cell although its AUROC may look fine: the cell's
/// false-negative rate against that of all cases (underdiagnosis) and its calibration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CellBias {
    /// False-negative rate in the cell at the operating point.
    pub false_negative_rate: f64,
    /// False-negative rate of the cell minus that of all cases; positive: the cell's disease
    /// is missed more often. Interval from resampling the cell's positives and the other
    /// positives independently.
    pub fnr_gap: Estimate,
    /// Expected calibration error in the cell, with its bootstrap interval.
    pub calibration_error: Estimate,
}

/// The bias measures of scores `p` (labels `y`) on the cell `rows`, against all cases; None
/// without positives in the cell.
pub fn cell_bias(
    p: &[f64],
    y: &[bool],
    rows: &[usize],
    resamples: usize,
    seed: u64,
) -> Option<CellBias> {
    let missed = |i: usize| y[i] && p[i] < OPERATING_POINT;
    let mut in_cell = vec![false; y.len()];
    rows.iter().for_each(|&r| in_cell[r] = true);
    let cell: Vec<bool> = rows.iter().filter(|&&i| y[i]).map(|&i| missed(i)).collect();
    let rest: Vec<bool> = (0..y.len())
        .filter(|&i| y[i] && !in_cell[i])
        .map(missed)
        .collect();
    if cell.is_empty() {
        return None;
    }
    let gap = |c: usize, r: usize| {
        c as f64 / cell.len() as f64 - (c + r) as f64 / (cell.len() + rest.len()) as f64
    };
    let count = |v: &[bool]| v.iter().filter(|&&m| m).count();
    let (pc, yc): (Vec<f64>, Vec<bool>) = rows.iter().map(|&i| (p[i], y[i])).unzip();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let draw = |v: &[bool], rng: &mut ChaCha8Rng| {
        (0..v.len())
            .filter(|_| v[rng.random_range(0..v.len())])
            .count()
    };
    let (mut gaps, mut eces) = (Vec::with_capacity(resamples), Vec::with_capacity(resamples));
    for _ in 0..resamples {
        let (c, r) = (draw(&cell, &mut rng), draw(&rest, &mut rng));
        gaps.push(gap(c, r));
        let idx: Vec<usize> = (0..rows.len())
            .map(|_| rng.random_range(0..rows.len()))
            .collect();
        let (ps, ys): (Vec<f64>, Vec<bool>) = idx.iter().map(|&i| (pc[i], yc[i])).unzip();
        eces.extend(ece(&ps, &ys));
    }
    Some(CellBias {
        false_negative_rate: count(&cell) as f64 / cell.len() as f64,
        fnr_gap: interval(gap(count(&cell), count(&rest)), gaps),
        calibration_error: interval(ece(&pc, &yc)?, eces),
    })
}

/// A point estimate with its 95 % bootstrap percentile interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    /// On all cases.
    pub value: f64,
    /// 2.5th percentile of the bootstrap distribution.
    pub lo: f64,
    /// 97.5th percentile.
    pub hi: f64,
}

/// The metrics of one model on one set of cases.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// AUROC with CI.
    pub auroc: Estimate,
    /// Average precision.
    pub auprc: Option<f64>,
    /// Sensitivity at the operating point.
    pub sensitivity: Option<f64>,
    /// Specificity at the operating point.
    pub specificity: Option<f64>,
    /// Expected calibration error.
    pub ece: Option<f64>,
}

/// Candidate and baseline on the same cases, with the paired difference of AUROC.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Paired {
    /// Cases.
    pub n: usize,
    /// Positive cases.
    pub positives: usize,
    /// The candidate.
    pub candidate: Metrics,
    /// The baseline.
    pub baseline: Metrics,
    /// Candidate − baseline AUROC, CI from the same resamples.
    pub delta_auroc: Estimate,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

pub(crate) fn interval(value: f64, mut draws: Vec<f64>) -> Estimate {
    if draws.is_empty() {
        return Estimate {
            value,
            lo: value,
            hi: value,
        };
    }
    draws.sort_by(f64::total_cmp);
    Estimate {
        value,
        lo: percentile(&draws, 0.025),
        hi: percentile(&draws, 0.975),
    }
}

fn metrics(p: &[f64], y: &[bool], auroc_draws: Vec<f64>, value: f64) -> Metrics {
    let (sensitivity, specificity) = sens_spec(p, y);
    Metrics {
        auroc: interval(value, auroc_draws),
        auprc: auprc(p, y),
        sensitivity,
        specificity,
        ece: ece(p, y),
    }
}

/// Scores candidate (`pc`) and baseline (`pb`) on the cases `rows` with `resamples` paired
/// bootstrap resamples (seeded); None when the cases lack a class.
pub fn paired(
    pc: &[f64],
    pb: &[f64],
    y: &[bool],
    rows: &[usize],
    resamples: usize,
    seed: u64,
) -> Option<Paired> {
    let pick = |v: &[f64], idx: &[usize]| -> Vec<f64> { idx.iter().map(|&i| v[i]).collect() };
    let yy: Vec<bool> = rows.iter().map(|&i| y[i]).collect();
    let (c, b) = (pick(pc, rows), pick(pb, rows));
    let (ac, ab) = (auroc(&c, &yy)?, auroc(&b, &yy)?);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut dc, mut db, mut dd) = (Vec::new(), Vec::new(), Vec::new());
    let n = rows.len();
    let mut idx = vec![0usize; n];
    for _ in 0..resamples {
        for slot in idx.iter_mut() {
            *slot = rng.random_range(0..n);
        }
        let ys: Vec<bool> = idx.iter().map(|&i| yy[i]).collect();
        let (Some(x), Some(z)) = (auroc(&pick(&c, &idx), &ys), auroc(&pick(&b, &idx), &ys)) else {
            continue;
        };
        dc.push(x);
        db.push(z);
        dd.push(x - z);
    }
    Some(Paired {
        n,
        positives: yy.iter().filter(|&&l| l).count(),
        candidate: metrics(&c, &yy, dc, ac),
        baseline: metrics(&b, &yy, db, ab),
        delta_auroc: interval(ac - ab, dd),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auroc_and_auprc_match_hand_computed_values() {
        let p = [0.1, 0.4, 0.35, 0.8];
        let y = [false, false, true, true];
        // sklearn: roc_auc_score = 0.75, average_precision_score = 0.8333.
        assert!((auroc(&p, &y).unwrap() - 0.75).abs() < 1e-12);
        assert!((auprc(&p, &y).unwrap() - 0.833_333_333_333).abs() < 1e-9);
        assert_eq!(auroc(&p, &[true; 4]), None);
        assert_eq!(auroc(&[0.5, 0.5], &[true, false]), Some(0.5));
    }

    #[test]
    fn operating_point_and_calibration() {
        let p = [0.9, 0.6, 0.2, 0.1, 0.7];
        let y = [true, false, true, false, true];
        let (se, sp) = sens_spec(&p, &y);
        assert_eq!((se, sp), (Some(2.0 / 3.0), Some(0.5)));
        // Perfectly calibrated bins give 0; always-0.9 on all-negative cases gives 0.9.
        assert!(ece(&[0.0, 1.0], &[false, true]).unwrap() < 1e-12);
        assert!((ece(&[0.9; 4], &[false; 4]).unwrap() - 0.9).abs() < 1e-12);
    }

    #[test]
    fn a_cell_whose_disease_is_missed_more_often_has_a_positive_fnr_gap() {
        let n = 600;
        let y: Vec<bool> = (0..n).map(|i| i % 2 == 0).collect();
        let in_cell = |i: usize| i < 200;
        // Positives score 0.7 except a third of the cell's, scored 0.3 (missed).
        let p: Vec<f64> = (0..n)
            .map(|i| match (y[i], in_cell(i) && i % 3 == 0) {
                (true, true) => 0.3,
                (true, false) => 0.7,
                (false, _) => 0.3,
            })
            .collect();
        let cell: Vec<usize> = (0..n).filter(|&i| in_cell(i)).collect();
        let b = cell_bias(&p, &y, &cell, 500, 1).unwrap();
        // 34 of the cell's 100 positives are missed; 34 of all 300.
        assert!((b.false_negative_rate - 0.34).abs() < 1e-12);
        assert!((b.fnr_gap.value - (0.34 - 34.0 / 300.0)).abs() < 1e-12);
        assert!(b.fnr_gap.lo > 0.1, "{:?}", b.fnr_gap);
        let other: Vec<usize> = (0..n).filter(|&i| !in_cell(i)).collect();
        let fair = cell_bias(&p, &y, &other, 500, 1).unwrap();
        assert!(fair.fnr_gap.hi < 0.0, "{:?}", fair.fnr_gap);
        assert!(
            fair.calibration_error.value > 0.25,
            "0.7 for positives, 0.3 for negatives"
        );
        assert!(fair.calibration_error.lo <= fair.calibration_error.value);
        let negatives: Vec<usize> = (1..n).step_by(2).collect();
        assert_eq!(cell_bias(&p, &y, &negatives, 10, 1), None);
    }

    #[test]
    fn paired_bootstrap_separates_a_worse_model_and_not_an_equal_one() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let n = 400;
        let y: Vec<bool> = (0..n).map(|i| i % 3 == 0).collect();
        let good: Vec<f64> = y
            .iter()
            .map(|&l| (if l { 0.7 } else { 0.3 }) + rng.random_range(-0.3..0.3))
            .collect();
        let noisy: Vec<f64> = y
            .iter()
            .map(|&l| (if l { 0.55 } else { 0.45 }) + rng.random_range(-0.3..0.3))
            .collect();
        let rows: Vec<usize> = (0..n).collect();
        let worse = paired(&noisy, &good, &y, &rows, 300, 1).unwrap();
        assert!(worse.delta_auroc.hi < 0.0, "{:?}", worse.delta_auroc);
        assert!(worse.candidate.auroc.lo <= worse.candidate.auroc.value);
        let same = paired(&good, &good, &y, &rows, 300, 1).unwrap();
        assert_eq!((same.delta_auroc.lo, same.delta_auroc.hi), (0.0, 0.0));
        assert_eq!(paired(&good, &good, &y, &rows, 300, 1), Some(same));
        assert!(
            paired(&good, &good, &y, &[0, 3, 6], 10, 1).is_none(),
            "one class only"
        );
    }
}
