//! Late labels: how the deployed model performs on a site's recent cases once their labels
//! arrive, against the reference window it was validated on, overall and per subgroup cell.
//!
//! Drift tests say that the data changed; only labels say whether the model got worse, and for
//! whom. For every cell published in both windows (the disclosure plan of each window, see
//! [`disclosure`](crate::disclosure)) a look reports the AUROC of each window and their change
//! with 95 % bootstrap intervals (the windows resampled independently), and a one-sided
//! permutation test of a drop: under no change the (score, label) pairs of both windows are
//! exchangeable, so the observed `AUROC(reference) − AUROC(recent)` is compared with the same
//! difference over random reassignments of cases to windows. These p-values join the look's
//! drift tests in one Holm adjustment, so a stable site stays under the look's false-alarm
//! level however many cells are watched. The recent window's underdiagnosis and calibration per
//! cell are reported beside them.
//!
//! Reference scores must be out-of-fold (the probe never scored a case it was fitted on), or the
//! reference AUROC is optimistic and every look finds a drop.

use std::collections::BTreeMap;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::disclosure;
use crate::drift::DriftTest;
use crate::stats::{self, CellBias, Estimate};
use crate::{Error, Result};

/// Labelled cases kept per window and cell (a seeded subsample of more), which bounds the work
/// of the permutation test.
pub const MAX_LABELLED: usize = 2000;

/// Permutations behind each performance p-value: a look judges many cells together, so the
/// smallest p-value (1/10 000) must survive Holm's adjustment over all of them.
pub const PERMUTATIONS: usize = 9999;

/// One window's cases of a cell: the model's probabilities and the late labels.
#[derive(Debug, Clone, Copy)]
pub struct Scored<'a> {
    /// Probabilities.
    pub p: &'a [f64],
    /// Labels.
    pub y: &'a [bool],
}

/// The performance of the deployed model in one cell, reference against recent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CellPerformance {
    /// `sex=F`, `sex=F&age_band=80+`, or None for all cases.
    pub cell: Option<String>,
    /// Labelled reference cases.
    pub reference_cases: usize,
    /// Labelled recent cases.
    pub recent_cases: usize,
    /// AUROC on the reference window (out-of-fold).
    pub reference_auroc: Estimate,
    /// AUROC on the recent window.
    pub recent_auroc: Estimate,
    /// Recent − reference AUROC; negative: the model got worse.
    pub change: Estimate,
    /// Underdiagnosis and calibration on the recent window (None without recent positives).
    pub recent_bias: Option<CellBias>,
}

impl CellPerformance {
    /// The cell's name for statistics and reasons.
    pub fn name(&self) -> &str {
        self.cell.as_deref().unwrap_or("all cases")
    }
}

fn subsample(rows: &[usize], rng: &mut ChaCha8Rng) -> Vec<usize> {
    let mut rows = rows.to_vec();
    if rows.len() > MAX_LABELLED {
        rows.shuffle(rng);
        rows.truncate(MAX_LABELLED);
        rows.sort_unstable();
    }
    rows
}

fn pick(s: Scored<'_>, rows: &[usize]) -> (Vec<f64>, Vec<bool>) {
    rows.iter().map(|&i| (s.p[i], s.y[i])).unzip()
}

/// Compares the cell `rows` of both windows: intervals, the recent window's bias measures, and
/// the permutation test of a drop larger than `margin` (AUROC points).
pub fn compare(
    cell: Option<String>,
    (reference, reference_rows): (Scored<'_>, &[usize]),
    (recent, recent_rows): (Scored<'_>, &[usize]),
    margin: f64,
    permutations: usize,
    seed: u64,
) -> Result<(CellPerformance, DriftTest)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (ra, rb) = (
        subsample(reference_rows, &mut rng),
        subsample(recent_rows, &mut rng),
    );
    let (pa, ya) = pick(reference, &ra);
    let (pb, yb) = pick(recent, &rb);
    let name = cell.as_deref().unwrap_or("all cases").to_string();
    let need =
        |what: &str| Error::Data(format!("performance in {name}: {what} needs both classes"));
    let auc_a = stats::auroc(&pa, &ya).ok_or_else(|| need("the reference window"))?;
    let auc_b = stats::auroc(&pb, &yb).ok_or_else(|| need("the recent window"))?;
    let (ia, ib, change) = intervals((&pa, &ya), (&pb, &yb), &mut rng);
    let test = drop_test(
        (&pa, &ya),
        (&pb, &yb),
        auc_a - auc_b - margin,
        permutations,
        &mut rng,
    );
    let recent_bias = stats::cell_bias(recent.p, recent.y, &rb, crate::report::RESAMPLES, seed ^ 7);
    Ok((
        CellPerformance {
            cell,
            reference_cases: pa.len(),
            recent_cases: pb.len(),
            reference_auroc: Estimate { value: auc_a, ..ia },
            recent_auroc: Estimate { value: auc_b, ..ib },
            change: Estimate {
                value: auc_b - auc_a,
                ..change
            },
            recent_bias,
        },
        test,
    ))
}

/// 95 % intervals of both AUROCs and of their change, the windows resampled independently.
fn intervals(
    (pa, ya): (&[f64], &[bool]),
    (pb, yb): (&[f64], &[bool]),
    rng: &mut ChaCha8Rng,
) -> (Estimate, Estimate, Estimate) {
    use rand::Rng;
    let draw = |p: &[f64], y: &[bool], rng: &mut ChaCha8Rng| {
        let idx: Vec<usize> = (0..p.len()).map(|_| rng.random_range(0..p.len())).collect();
        let (ps, ys): (Vec<f64>, Vec<bool>) = idx.iter().map(|&i| (p[i], y[i])).unzip();
        stats::auroc(&ps, &ys)
    };
    let (mut da, mut db, mut dd) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..crate::report::RESAMPLES {
        let (Some(a), Some(b)) = (draw(pa, ya, rng), draw(pb, yb, rng)) else {
            continue;
        };
        da.push(a);
        db.push(b);
        dd.push(b - a);
    }
    (
        stats::interval(0.0, da),
        stats::interval(0.0, db),
        stats::interval(0.0, dd),
    )
}

/// One-sided permutation test of a drop: the share of reassignments whose AUROC(a) − AUROC(b)
/// reaches `observed` (the observed difference minus the margin, so that only a drop beyond the
/// margin can be significant). The pooled cases are sorted once; each reassignment then costs
/// one pass over them.
fn drop_test(
    (pa, ya): (&[f64], &[bool]),
    (pb, yb): (&[f64], &[bool]),
    observed: f64,
    permutations: usize,
    rng: &mut ChaCha8Rng,
) -> DriftTest {
    let pooled = Pooled::new(pa.iter().chain(pb), ya.iter().chain(yb));
    let mut in_a: Vec<bool> = (0..pooled.y.len()).map(|i| i < pa.len()).collect();
    let mut at_least = 0usize;
    for _ in 0..permutations {
        in_a.shuffle(rng);
        at_least += (pooled.difference(&in_a) >= observed) as usize;
    }
    DriftTest {
        statistic: observed,
        p_value: (1 + at_least) as f64 / (1 + permutations) as f64,
        permutations,
        reference: pa.len(),
        recent: pb.len(),
    }
}

/// Both windows' cases sorted by score once, in groups of tied scores.
struct Pooled {
    /// Labels in score order.
    y: Vec<bool>,
    /// Where each group of tied scores ends (exclusive), in score order.
    ties: Vec<usize>,
    /// For each position in score order, the case's index before sorting.
    case: Vec<usize>,
}

impl Pooled {
    fn new<'a>(p: impl Iterator<Item = &'a f64>, y: impl Iterator<Item = &'a bool>) -> Pooled {
        let mut cases: Vec<(f64, bool, usize)> = p
            .zip(y)
            .enumerate()
            .map(|(i, (&p, &y))| (p, y, i))
            .collect();
        cases.sort_by(|a, b| a.0.total_cmp(&b.0));
        let ties = (1..=cases.len())
            .filter(|&i| i == cases.len() || cases[i].0 != cases[i - 1].0)
            .collect();
        Pooled {
            y: cases.iter().map(|c| c.1).collect(),
            ties,
            case: cases.iter().map(|c| c.2).collect(),
        }
    }

    /// AUROC of the cases marked in `in_a` minus that of the others (0 when either lacks a
    /// class: it cannot show a drop).
    fn difference(&self, in_a: &[bool]) -> f64 {
        // Per side: negatives below, and the Mann-Whitney sum over positives (ties count half).
        let mut below = [0.0f64; 2];
        let mut sum = [0.0f64; 2];
        let (mut pos, mut neg) = ([0.0f64; 2], [0.0f64; 2]);
        let mut start = 0;
        for &end in &self.ties {
            let (mut gp, mut gn) = ([0.0f64; 2], [0.0f64; 2]);
            for k in start..end {
                let side = (!in_a[self.case[k]]) as usize;
                if self.y[k] {
                    gp[side] += 1.0
                } else {
                    gn[side] += 1.0
                }
            }
            for s in 0..2 {
                sum[s] += gp[s] * (below[s] + gn[s] / 2.0);
                below[s] += gn[s];
                pos[s] += gp[s];
                neg[s] += gn[s];
            }
            start = end;
        }
        if pos.contains(&0.0) || neg.contains(&0.0) {
            return 0.0;
        }
        sum[0] / (pos[0] * neg[0]) - sum[1] / (pos[1] * neg[1])
    }
}

/// One window's labelled cases: probabilities, labels and each case's subgroup values.
#[derive(Debug, Clone, Copy)]
pub struct Labelled<'a> {
    /// Probabilities and labels.
    pub scored: Scored<'a>,
    /// Subgroup values of each case (field → value).
    pub groups: &'a [BTreeMap<String, String>],
}

/// What a look compares once labels arrived.
#[derive(Debug, Clone)]
pub struct Settings<'a> {
    /// Task name, part of each statistic's name (`performance:lesion:sex=F`).
    pub task: &'a str,
    /// Subgroup fields (each crossed with each other where cells allow).
    pub fields: &'a [String],
    /// Smallest cell reported in either window.
    pub min_cell_size: usize,
    /// Drop in AUROC points that is tolerated.
    pub margin: f64,
    /// Permutations of each test.
    pub permutations: usize,
    /// Seed.
    pub seed: u64,
}

/// A look's performance statistic: its name and test, to judge with the drift tests.
pub type Statistic = (String, DriftTest);

/// All cases, then every cell both windows' disclosure plans publish, compared. None when the
/// recent window has fewer labelled cases than the minimum cell size or one class only:
/// nothing can be said about performance yet.
pub fn by_cell(
    reference: Labelled<'_>,
    recent: Labelled<'_>,
    s: &Settings<'_>,
) -> Result<Option<Vec<(CellPerformance, Statistic)>>> {
    let both = |y: &[bool]| y.iter().any(|&l| l) && y.iter().any(|&l| !l);
    if recent.scored.y.len() < s.min_cell_size || !both(recent.scored.y) {
        return Ok(None);
    }
    let plan_a = disclosure::plan(
        reference.groups,
        s.fields,
        s.min_cell_size,
        &[reference.scored.y],
    )?;
    let plan_b = disclosure::plan(recent.groups, s.fields, s.min_cell_size, &[recent.scored.y])?;
    let all_a: Vec<usize> = (0..reference.scored.y.len()).collect();
    let all_b: Vec<usize> = (0..recent.scored.y.len()).collect();
    let mut cells: Vec<(Option<String>, &[usize], &[usize])> = vec![(None, &all_a, &all_b)];
    for (fa, fb) in plan_a.iter().zip(&plan_b) {
        for ca in fa.cells.iter().filter(|c| c.published && !c.implicit) {
            let Some(cb) = fb
                .cells
                .iter()
                .find(|c| c.value == ca.value && c.published && !c.implicit)
            else {
                continue;
            };
            let name = match fa.field.contains(disclosure::CROSS) {
                true => ca.value.clone(),
                false => format!("{}={}", fa.field, ca.value),
            };
            cells.push((Some(name), &ca.rows, &cb.rows));
        }
    }
    cells
        .into_iter()
        .enumerate()
        .map(|(i, (cell, ra, rb))| {
            let stat = match &cell {
                Some(c) => format!("performance:{}:{c}", s.task),
                None => format!("performance:{}", s.task),
            };
            let seed = s.seed ^ ((i as u64 + 1) << 40);
            let (perf, test) = compare(
                cell,
                (reference.scored, ra),
                (recent.scored, rb),
                s.margin,
                s.permutations,
                seed,
            )?;
            Ok((perf, (stat, test)))
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    /// Scores of `n` cases, half positive, separated by `signal` (0: chance).
    fn scored(n: usize, signal: f64, seed: u64) -> (Vec<f64>, Vec<bool>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|i| {
                let y = i % 2 == 0;
                let mean = 0.5 + if y { signal } else { -signal };
                ((mean + rng.random_range(-0.3..0.3)).clamp(0.0, 1.0), y)
            })
            .unzip()
    }

    fn look(
        reference: (Vec<f64>, Vec<bool>),
        recent: (Vec<f64>, Vec<bool>),
        margin: f64,
    ) -> (CellPerformance, DriftTest) {
        let ra: Vec<usize> = (0..reference.0.len()).collect();
        let rb: Vec<usize> = (0..recent.0.len()).collect();
        compare(
            Some("sex=F".into()),
            (
                Scored {
                    p: &reference.0,
                    y: &reference.1,
                },
                &ra,
            ),
            (
                Scored {
                    p: &recent.0,
                    y: &recent.1,
                },
                &rb,
            ),
            margin,
            999,
            3,
        )
        .unwrap()
    }

    #[test]
    fn the_one_pass_auroc_difference_equals_two_sorted_aurocs_with_ties() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for _ in 0..50 {
            let n = rng.random_range(4..60);
            let p: Vec<f64> = (0..n)
                .map(|_| (rng.random_range(0..6) as f64) / 5.0)
                .collect();
            let y: Vec<bool> = (0..n).map(|_| rng.random_bool(0.4)).collect();
            let in_a: Vec<bool> = (0..n).map(|_| rng.random_bool(0.5)).collect();
            let side = |a: bool| -> (Vec<f64>, Vec<bool>) {
                (0..n)
                    .filter(|&i| in_a[i] == a)
                    .map(|i| (p[i], y[i]))
                    .unzip()
            };
            let ((pa, ya), (pb, yb)) = (side(true), side(false));
            let want = match (stats::auroc(&pa, &ya), stats::auroc(&pb, &yb)) {
                (Some(a), Some(b)) => a - b,
                _ => 0.0,
            };
            let got = Pooled::new(p.iter(), y.iter()).difference(&in_a);
            assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        }
    }

    #[test]
    fn a_real_drop_is_significant_with_its_interval_and_an_unchanged_cell_is_not() {
        let (dropped, test) = look(scored(200, 0.2, 1), scored(200, 0.05, 2), 0.0);
        assert!(dropped.change.value < -0.2, "{dropped:?}");
        assert!(dropped.change.hi < 0.0, "{dropped:?}");
        assert!(test.p_value <= 0.002, "{test:?}");
        let (same, test) = look(scored(200, 0.2, 1), scored(200, 0.2, 2), 0.0);
        assert!(same.change.lo < 0.0 && same.change.hi > 0.0, "{same:?}");
        assert!(test.p_value > 0.05, "{test:?}");
        assert_eq!(
            (same.reference_cases, same.recent_cases, same.name()),
            (200, 200, "sex=F")
        );
    }

    fn by_sex(n: usize) -> Vec<BTreeMap<String, String>> {
        (0..n)
            .map(|i| {
                BTreeMap::from([(
                    "sex".to_string(),
                    if i % 4 < 2 { "F" } else { "M" }.to_string(),
                )])
            })
            .collect()
    }

    #[test]
    fn late_labels_find_the_subgroup_the_model_now_fails_and_only_that_one() {
        let (pa, ya) = scored(600, 0.2, 1);
        let (good, yb) = scored(600, 0.2, 2);
        let (chance, _) = scored(600, 0.0, 3);
        let groups = by_sex(600);
        let women = |i: usize| groups[i]["sex"] == "F";
        let pb: Vec<f64> = (0..600)
            .map(|i| if women(i) { chance[i] } else { good[i] })
            .collect();
        let fields = ["sex".to_string()];
        let settings = Settings {
            task: "lesion",
            fields: &fields,
            min_cell_size: 20,
            margin: 0.0,
            permutations: 999,
            seed: 1,
        };
        let reference = Labelled {
            scored: Scored { p: &pa, y: &ya },
            groups: &groups,
        };
        let recent = Labelled {
            scored: Scored { p: &pb, y: &yb },
            groups: &groups,
        };
        let cells = by_cell(reference, recent, &settings).unwrap().unwrap();
        let names: Vec<&str> = cells.iter().map(|(_, (n, _))| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "performance:lesion",
                "performance:lesion:sex=F",
                "performance:lesion:sex=M"
            ]
        );
        let p: Vec<f64> = cells.iter().map(|(_, (_, t))| t.p_value).collect();
        assert!(p[1] <= 0.002 && p[2] > 0.01, "{p:?}");
        let f = &cells[1].0;
        assert!(f.change.hi < 0.0 && f.recent_auroc.value < 0.6, "{f:?}");
        assert_eq!(f.recent_cases, 300);
        let few = Labelled {
            scored: Scored {
                p: &pb[..10],
                y: &yb[..10],
            },
            groups: &groups[..10],
        };
        let none = by_cell(reference, few, &settings).unwrap();
        assert!(
            none.is_none(),
            "10 labelled recent cases are fewer than the minimum cell of 20"
        );
    }

    #[test]
    fn a_drop_within_the_margin_is_not_significant() {
        let (small, strict) = look(scored(400, 0.2, 1), scored(400, 0.17, 2), 0.0);
        let (_, lenient) = look(scored(400, 0.2, 1), scored(400, 0.17, 2), 0.1);
        assert!(small.change.value < 0.0, "{small:?}");
        assert!(lenient.p_value > strict.p_value, "{strict:?} {lenient:?}");
        assert!(lenient.p_value > 0.5, "{lenient:?}");
    }

    #[test]
    fn a_window_without_both_classes_is_an_error_naming_the_cell() {
        let reference = scored(50, 0.2, 1);
        let recent = (vec![0.4; 20], vec![true; 20]);
        let ra: Vec<usize> = (0..50).collect();
        let rb: Vec<usize> = (0..20).collect();
        let e = compare(
            Some("age_band=80+".into()),
            (
                Scored {
                    p: &reference.0,
                    y: &reference.1,
                },
                &ra,
            ),
            (
                Scored {
                    p: &recent.0,
                    y: &recent.1,
                },
                &rb,
            ),
            0.0,
            99,
            1,
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("age_band=80+: the recent window needs both classes"),
            "{e}"
        );
    }
}
