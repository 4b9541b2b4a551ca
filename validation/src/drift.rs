//! Two-sample drift tests for watching a deployed model at a site.
//!
//! A monitor compares a site's recent cases with a reference window (the data the model was
//! validated or trained on) in the style of CheXstray: on the encoder's embeddings (kernel
//! MMD), on the model's output scores (Kolmogorov–Smirnov) and on categorical image metadata
//! such as scanner or sex mix (χ²). Every p-value comes from a permutation test: under no drift
//! the two windows are exchangeable, so `p = (1 + #{permuted ≥ observed}) / (1 + B)` is valid at
//! any sample size, without an asymptotic distribution. Several tests at once are combined with
//! Holm's step-down adjustment, so a monitor's false-alarm rate per look stays at its level α
//! however many statistics it watches.
//!
//! Inputs are bounded: each window is subsampled (seeded) to [`MAX_ROWS`] rows, so memory and
//! time stay bounded whatever a site feeds in.

use std::collections::BTreeMap;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Rows kept per window (a seeded subsample of larger ones).
pub const MAX_ROWS: usize = 500;

/// Permutations behind every p-value unless a caller asks for others: the smallest p-value is
/// 1/1000, so a look of several statistics can still reach α = 0.01 after Holm's adjustment.
pub const PERMUTATIONS: usize = 999;

/// The outcome of one two-sample test.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftTest {
    /// The statistic on the observed split (MMD², KS distance or χ²).
    pub statistic: f64,
    /// Permutation p-value.
    pub p_value: f64,
    /// Permutations drawn.
    pub permutations: usize,
    /// Reference rows used.
    pub reference: usize,
    /// Recent rows used.
    pub recent: usize,
}

/// Kernel maximum mean discrepancy between embeddings (a Gaussian kernel whose bandwidth is
/// the median pairwise distance of the pooled rows), with its permutation p-value.
pub fn mmd(
    reference: &[Vec<f32>],
    recent: &[Vec<f32>],
    permutations: usize,
    seed: u64,
) -> Result<DriftTest> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (a, b) = (subsample(reference, &mut rng), subsample(recent, &mut rng));
    check_rows("embeddings", &a, &b)?;
    let dim = a[0].len();
    if let Some(bad) = a.iter().chain(&b).find(|r| r.len() != dim) {
        return Err(Error::Data(format!(
            "embeddings: rows of {dim} and {} values cannot be compared",
            bad.len()
        )));
    }
    if a.iter()
        .chain(&b)
        .flat_map(|r| r.iter())
        .any(|v| !v.is_finite())
    {
        return Err(Error::Data("embeddings: a value is not finite".into()));
    }
    let rows: Vec<&Vec<f32>> = a.iter().chain(&b).copied().collect();
    let kernel = gaussian_kernel(&rows);
    let split = |labels: &[bool]| mmd2(&kernel, labels);
    Ok(permutation_test(
        a.len(),
        b.len(),
        permutations,
        &mut rng,
        split,
    ))
}

/// Kolmogorov–Smirnov distance between two samples of scores, with its permutation p-value.
pub fn ks(reference: &[f64], recent: &[f64], permutations: usize, seed: u64) -> Result<DriftTest> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (a, b) = (subsample(reference, &mut rng), subsample(recent, &mut rng));
    check_rows("scores", &a, &b)?;
    if a.iter().chain(&b).any(|v| !v.is_finite()) {
        return Err(Error::Data("scores: a value is not finite".into()));
    }
    let mut order: Vec<(f64, usize)> = a.iter().chain(&b).map(|&&v| v).zip(0..).collect();
    order.sort_by(|x, y| x.0.total_cmp(&y.0));
    let split = |labels: &[bool]| ks_distance(&order, labels);
    Ok(permutation_test(
        a.len(),
        b.len(),
        permutations,
        &mut rng,
        split,
    ))
}

/// χ² of the category counts of two samples (scanner, protocol, sex, age band), with its
/// permutation p-value.
pub fn categorical(
    reference: &[String],
    recent: &[String],
    permutations: usize,
    seed: u64,
) -> Result<DriftTest> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (a, b) = (subsample(reference, &mut rng), subsample(recent, &mut rng));
    check_rows("categories", &a, &b)?;
    let mut codes = BTreeMap::new();
    let category: Vec<usize> = a
        .iter()
        .chain(&b)
        .map(|c| {
            let next = codes.len();
            *codes.entry(c.as_str()).or_insert(next)
        })
        .collect();
    let kinds = codes.len();
    let split = |labels: &[bool]| chi_square(&category, kinds, labels);
    Ok(permutation_test(
        a.len(),
        b.len(),
        permutations,
        &mut rng,
        split,
    ))
}

/// Holm's step-down adjustment: the adjusted p-values of `p` (same order), so that flagging
/// every adjusted value below α keeps the chance of any false flag at most α.
pub fn holm(p: &[f64]) -> Vec<f64> {
    let m = p.len();
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&x, &y| p[x].total_cmp(&p[y]));
    let mut adjusted = vec![0.0; m];
    let mut running: f64 = 0.0;
    for (rank, &i) in order.iter().enumerate() {
        running = running.max(((m - rank) as f64 * p[i]).min(1.0));
        adjusted[i] = running;
    }
    adjusted
}

fn subsample<'a, T>(rows: &'a [T], rng: &mut ChaCha8Rng) -> Vec<&'a T> {
    let mut kept: Vec<&T> = rows.iter().collect();
    if kept.len() > MAX_ROWS {
        kept.shuffle(rng);
        kept.truncate(MAX_ROWS);
    }
    kept
}

fn check_rows<T>(what: &str, a: &[T], b: &[T]) -> Result<()> {
    if a.len() < 2 || b.len() < 2 {
        return Err(Error::Data(format!(
            "{what}: {} reference and {} recent rows are too few to compare (at least 2 each)",
            a.len(),
            b.len()
        )));
    }
    Ok(())
}

/// `statistic(labels)` on the observed split (`true`: recent) and on `permutations` shuffles.
fn permutation_test(
    reference: usize,
    recent: usize,
    permutations: usize,
    rng: &mut ChaCha8Rng,
    statistic: impl Fn(&[bool]) -> f64,
) -> DriftTest {
    let mut labels: Vec<bool> = (0..reference + recent).map(|i| i >= reference).collect();
    let observed = statistic(&labels);
    let mut as_large = 0usize;
    for _ in 0..permutations {
        labels.shuffle(rng);
        // A relative tolerance keeps ties of equal statistics (up to rounding) counted as ties.
        if statistic(&labels) >= observed - 1e-12 * observed.abs().max(1.0) {
            as_large += 1;
        }
    }
    DriftTest {
        statistic: observed,
        p_value: (1 + as_large) as f64 / (1 + permutations) as f64,
        permutations,
        reference,
        recent,
    }
}

fn squared_distance(x: &[f32], y: &[f32]) -> f64 {
    x.iter()
        .zip(y)
        .map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2))
        .sum()
}

/// The pooled rows' Gaussian kernel matrix, bandwidth by the median heuristic.
fn gaussian_kernel(rows: &[&Vec<f32>]) -> Vec<Vec<f64>> {
    let n = rows.len();
    let mut d2 = vec![vec![0.0; n]; n];
    let mut off_diagonal = Vec::with_capacity(n * (n - 1) / 2);
    for i in 0..n {
        for j in i + 1..n {
            let d = squared_distance(rows[i], rows[j]);
            d2[i][j] = d;
            d2[j][i] = d;
            off_diagonal.push(d);
        }
    }
    off_diagonal.sort_by(f64::total_cmp);
    let median = off_diagonal[off_diagonal.len() / 2];
    let width = if median > 0.0 { median } else { 1.0 };
    d2.iter()
        .map(|row| row.iter().map(|d| (-d / width).exp()).collect())
        .collect()
}

/// Unbiased MMD² between the rows labelled false and true.
fn mmd2(kernel: &[Vec<f64>], labels: &[bool]) -> f64 {
    let (mut xx, mut yy, mut xy) = (0.0, 0.0, 0.0);
    for (i, row) in kernel.iter().enumerate() {
        for (j, k) in row.iter().enumerate() {
            match (labels[i], labels[j]) {
                _ if i == j => {}
                (false, false) => xx += k,
                (true, true) => yy += k,
                _ => xy += k,
            }
        }
    }
    let n = labels.iter().filter(|&&l| l).count() as f64;
    let m = labels.len() as f64 - n;
    xx / (m * (m - 1.0)) + yy / (n * (n - 1.0)) - xy / (m * n)
}

/// The largest gap between the two labelled samples' empirical distribution functions, over
/// `order` (values sorted, with their row).
fn ks_distance(order: &[(f64, usize)], labels: &[bool]) -> f64 {
    let n = labels.iter().filter(|&&l| l).count() as f64;
    let m = labels.len() as f64 - n;
    let (mut fa, mut fb, mut widest) = (0.0f64, 0.0f64, 0.0f64);
    for (k, &(value, row)) in order.iter().enumerate() {
        if labels[row] {
            fb += 1.0 / n;
        } else {
            fa += 1.0 / m;
        }
        let tie_follows = order.get(k + 1).is_some_and(|next| next.0 == value);
        if !tie_follows {
            widest = widest.max((fa - fb).abs());
        }
    }
    widest
}

/// Pearson's χ² of the 2 × `kinds` table of categories by label.
fn chi_square(category: &[usize], kinds: usize, labels: &[bool]) -> f64 {
    let mut table = vec![[0.0f64; 2]; kinds];
    for (&c, &l) in category.iter().zip(labels) {
        table[c][usize::from(l)] += 1.0;
    }
    let total = labels.len() as f64;
    let recent = labels.iter().filter(|&&l| l).count() as f64;
    let sides = [total - recent, recent];
    table
        .iter()
        .map(|counts| {
            let row: f64 = counts.iter().sum();
            (0..2)
                .map(|s| {
                    let expected = row * sides[s] / total;
                    (counts[s] - expected).powi(2) / expected
                })
                .sum::<f64>()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;
    use rand_distr::{Distribution, Normal};

    fn gaussian_rows(n: usize, dim: usize, shift: f32, rng: &mut ChaCha8Rng) -> Vec<Vec<f32>> {
        let normal = Normal::new(0.0f32, 1.0).unwrap();
        (0..n)
            .map(|_| {
                (0..dim)
                    .map(|d| normal.sample(rng) + if d == 0 { shift } else { 0.0 })
                    .collect()
            })
            .collect()
    }

    /// Fraction of `looks` seeds at which `test` flags at level 0.05.
    fn flag_rate(looks: u64, test: impl Fn(u64) -> f64) -> f64 {
        (0..looks).filter(|&s| test(s) < 0.05).count() as f64 / looks as f64
    }

    #[test]
    fn mmd_flags_a_shifted_embedding_window_and_rarely_an_unshifted_one() {
        let look = |seed: u64, shift: f32| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let reference = gaussian_rows(60, 8, 0.0, &mut rng);
            let recent = gaussian_rows(60, 8, shift, &mut rng);
            mmd(&reference, &recent, 99, seed).unwrap().p_value
        };
        let false_alarms = flag_rate(60, |s| look(s, 0.0));
        let detections = flag_rate(20, |s| look(1000 + s, 1.0));
        // Binomial(60, 0.05) exceeds 8 false alarms with probability below 0.2 %.
        assert!(false_alarms <= 8.0 / 60.0, "false alarms {false_alarms}");
        assert!(detections >= 0.9, "detections {detections}");
    }

    #[test]
    fn ks_flags_shifted_scores_and_counts_ties_as_ties() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let reference: Vec<f64> = (0..200).map(|_| rng.random_range(0.0..1.0)).collect();
        let same: Vec<f64> = (0..200).map(|_| rng.random_range(0.0..1.0)).collect();
        let shifted: Vec<f64> = (0..200).map(|_| rng.random_range(0.2..1.2)).collect();
        assert!(ks(&reference, &shifted, 199, 1).unwrap().p_value < 0.01);
        assert!(ks(&reference, &same, 199, 1).unwrap().p_value > 0.05);
        let identical = ks(&[0.5; 10], &[0.5; 10], 50, 1).unwrap();
        assert_eq!((identical.statistic, identical.p_value), (0.0, 1.0));
        let apart = ks(&[0.0, 0.0, 0.0], &[1.0, 1.0, 1.0], 50, 1).unwrap();
        assert_eq!(apart.statistic, 1.0);
    }

    #[test]
    fn a_changed_scanner_mix_is_flagged_and_a_stable_one_is_not() {
        let mix = |n: usize, share_b: f64, rng: &mut ChaCha8Rng| -> Vec<String> {
            (0..n)
                .map(|_| if rng.random_bool(share_b) { "B" } else { "A" }.to_string())
                .collect()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let reference = mix(300, 0.2, &mut rng);
        let stable = mix(300, 0.2, &mut rng);
        let changed = mix(300, 0.45, &mut rng);
        assert!(categorical(&reference, &changed, 199, 2).unwrap().p_value < 0.01);
        assert!(categorical(&reference, &stable, 199, 2).unwrap().p_value > 0.05);
    }

    #[test]
    fn holm_adjusts_in_step_down_order_and_never_above_one() {
        let adjusted = holm(&[0.01, 0.04, 0.03, 0.5]);
        let want = [0.04, 0.09, 0.09, 0.5];
        for (a, w) in adjusted.iter().zip(want) {
            assert!((a - w).abs() < 1e-12, "{adjusted:?}");
        }
        assert_eq!(holm(&[0.6, 0.7]), vec![1.0, 1.0]);
    }

    #[test]
    fn bad_windows_are_refused_naming_what_is_wrong() {
        let row = |v: f32| vec![v, v];
        let err = |r: Result<DriftTest>| r.unwrap_err().to_string();
        assert!(err(mmd(&[row(0.0)], &[row(1.0), row(2.0)], 9, 0)).contains("too few"));
        assert!(
            err(mmd(&[row(0.0), vec![1.0]], &[row(1.0), row(2.0)], 9, 0))
                .contains("2 and 1 values")
        );
        assert!(
            err(mmd(&[row(0.0), row(f32::NAN)], &[row(1.0), row(2.0)], 9, 0))
                .contains("not finite")
        );
        assert!(err(ks(&[0.1, f64::INFINITY], &[0.2, 0.3], 9, 0)).contains("scores"));
    }

    #[test]
    fn large_windows_are_subsampled_to_a_bound() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let scores: Vec<f64> = (0..5 * MAX_ROWS)
            .map(|_| rng.random_range(0.0..1.0))
            .collect();
        let t = ks(&scores, &scores[..10], 9, 0).unwrap();
        assert_eq!((t.reference, t.recent), (MAX_ROWS, 10));
    }
}
