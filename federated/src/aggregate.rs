//! Combining a round's admitted updates into one. FedAvg weights each site by its samples and is
//! what a federation of honest sites wants; one site that scales its update moves FedAvg as far
//! as it likes (within the norm bound). The coordinate-wise trimmed mean and median (Yin et al.,
//! 2018) bound what a minority of sites can do, at some cost in accuracy when data differ
//! between sites; they ignore sample counts.

use crate::weights::{Tensor, Weights};
use crate::{Error, Result};

/// How updates are combined.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Aggregator {
    /// Mean weighted by samples.
    FedAvg,
    /// Per coordinate, drop the `trim` fraction of largest and of smallest values, average the
    /// rest.
    TrimmedMean {
        /// Fraction dropped at each end, in [0, 0.5).
        trim: f64,
    },
    /// Per coordinate, the median.
    Median,
}

impl std::fmt::Display for Aggregator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Aggregator::FedAvg => f.write_str("fedavg"),
            Aggregator::Median => f.write_str("median"),
            Aggregator::TrimmedMean { trim } => write!(f, "trimmed-mean:{trim}"),
        }
    }
}

impl std::str::FromStr for Aggregator {
    type Err = Error;

    /// `fedavg`, `median` or `trimmed-mean:FRACTION` (the fraction in [0, 0.5)).
    fn from_str(text: &str) -> Result<Aggregator> {
        let invalid = |reason: String| Error::Invalid {
            field: "aggregator",
            reason,
        };
        match text {
            "fedavg" => Ok(Aggregator::FedAvg),
            "median" => Ok(Aggregator::Median),
            t => {
                let fraction = t.strip_prefix("trimmed-mean:").ok_or_else(|| {
                    invalid(format!(
                        "{t}: expected fedavg, median or trimmed-mean:FRACTION"
                    ))
                })?;
                let trim: f64 = fraction
                    .parse()
                    .map_err(|_| invalid(format!("{t}: the trim fraction is not a number")))?;
                if !(0.0..0.5).contains(&trim) {
                    return Err(invalid(format!(
                        "{t}: the trim fraction must be in [0, 0.5)"
                    )));
                }
                Ok(Aggregator::TrimmedMean { trim })
            }
        }
    }
}

/// Combines `updates` (each with its sample count); they must share one layout.
pub fn aggregate(aggregator: Aggregator, updates: &[(u64, &Weights)]) -> Result<Weights> {
    let Some((_, first)) = updates.first() else {
        return Err(Error::Invalid {
            field: "updates",
            reason: "no update to aggregate".into(),
        });
    };
    for (i, (_, u)) in updates.iter().enumerate().skip(1) {
        first.check_same_layout(u, &format!("update {i}"))?;
    }
    let rule = match aggregator {
        Aggregator::FedAvg => {
            let total: f64 = updates.iter().map(|(n, _)| *n as f64).sum();
            if total <= 0.0 {
                return Err(Error::Invalid {
                    field: "samples",
                    reason: "FedAvg needs samples".into(),
                });
            }
            Rule::WeightedMean { total }
        }
        Aggregator::TrimmedMean { trim } => Rule::TrimmedMean {
            k: trimmed(trim, updates.len())?,
        },
        Aggregator::Median => Rule::Median,
    };
    let mut out = Weights::default();
    let mut column = Vec::with_capacity(updates.len());
    for (name, t) in &first.0 {
        let mut values = Vec::with_capacity(t.values.len());
        for i in 0..t.values.len() {
            column.clear();
            column.extend(
                updates
                    .iter()
                    .map(|(n, u)| (*n as f64, f64::from(u.0[name].values[i]))),
            );
            values.push(rule.combine(&mut column) as f32);
        }
        out.0.insert(
            name.clone(),
            Tensor {
                shape: t.shape.clone(),
                values,
            },
        );
    }
    Ok(out)
}

/// One coordinate's rule, over (samples, value) of every update.
enum Rule {
    WeightedMean { total: f64 },
    TrimmedMean { k: usize },
    Median,
}

impl Rule {
    fn combine(&self, xs: &mut [(f64, f64)]) -> f64 {
        match self {
            Rule::WeightedMean { total } => xs.iter().map(|(w, v)| w * v).sum::<f64>() / total,
            Rule::TrimmedMean { k } => {
                sort(xs);
                let kept = &xs[*k..xs.len() - k];
                kept.iter().map(|(_, v)| v).sum::<f64>() / kept.len() as f64
            }
            Rule::Median => {
                sort(xs);
                let n = xs.len();
                if n % 2 == 1 {
                    xs[n / 2].1
                } else {
                    (xs[n / 2 - 1].1 + xs[n / 2].1) / 2.0
                }
            }
        }
    }
}

fn sort(xs: &mut [(f64, f64)]) {
    xs.sort_by(|a, b| a.1.total_cmp(&b.1));
}

/// Values dropped at each end for `trim` of `n`; at least one must remain.
fn trimmed(trim: f64, n: usize) -> Result<usize> {
    if !(0.0..0.5).contains(&trim) {
        return Err(Error::Invalid {
            field: "aggregator.trim",
            reason: format!("{trim} is not in [0, 0.5)"),
        });
    }
    Ok((trim * n as f64).floor() as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::tests::weights;

    #[test]
    fn aggregators_are_named_as_the_cli_and_the_resources_spell_them() {
        for text in ["fedavg", "median", "trimmed-mean:0.2"] {
            let a: Aggregator = text.parse().unwrap();
            assert_eq!(a.to_string(), text);
        }
        for (bad, why) in [
            ("mean", "expected fedavg, median or trimmed-mean"),
            ("trimmed-mean:x", "not a number"),
            ("trimmed-mean:0.5", "must be in [0, 0.5)"),
        ] {
            let e = bad.parse::<Aggregator>().unwrap_err().to_string();
            assert!(
                e.contains(why) && e.starts_with("aggregator:"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn fedavg_weights_sites_by_their_samples() {
        let a = weights(&[("w", vec![1.0, 0.0])]);
        let b = weights(&[("w", vec![4.0, 3.0])]);
        let avg = aggregate(Aggregator::FedAvg, &[(300, &a), (100, &b)]).unwrap();
        assert_eq!(avg.0["w"].values, vec![1.75, 0.75]);
    }

    #[test]
    fn median_and_trimmed_mean_take_the_middle_of_each_coordinate() {
        let us: Vec<Weights> = [1.0, 2.0, 3.0, 4.0, 100.0]
            .iter()
            .map(|v| weights(&[("w", vec![*v])]))
            .collect();
        let refs: Vec<(u64, &Weights)> = us.iter().map(|u| (1, u)).collect();
        assert_eq!(
            aggregate(Aggregator::Median, &refs).unwrap().0["w"].values,
            vec![3.0]
        );
        let tm = aggregate(Aggregator::TrimmedMean { trim: 0.2 }, &refs).unwrap();
        assert_eq!(tm.0["w"].values, vec![3.0]);
        assert_eq!(
            aggregate(Aggregator::Median, &refs[..4]).unwrap().0["w"].values,
            vec![2.5]
        );
    }

    #[test]
    fn a_scaled_byzantine_update_moves_fedavg_but_not_the_robust_aggregators() {
        // Four honest sites near (1, -1); one sends its update scaled by -50.
        let honest: Vec<Weights> = [0.9f32, 1.0, 1.1, 1.05]
            .iter()
            .map(|v| weights(&[("w", vec![*v, -*v])]))
            .collect();
        let byzantine = honest[0].scaled(-50.0);
        let mut all: Vec<(u64, &Weights)> = honest.iter().map(|u| (100, u)).collect();
        let honest_only = aggregate(Aggregator::FedAvg, &all).unwrap();
        all.push((100, &byzantine));
        let distance =
            |w: &Weights| w.minus(&honest_only, "aggregate").unwrap().norm() / honest_only.norm();
        let fedavg = distance(&aggregate(Aggregator::FedAvg, &all).unwrap());
        let median = distance(&aggregate(Aggregator::Median, &all).unwrap());
        let trimmed = distance(&aggregate(Aggregator::TrimmedMean { trim: 0.2 }, &all).unwrap());
        assert!(
            fedavg > 5.0,
            "FedAvg is dragged {fedavg:.2}× the honest update away"
        );
        assert!(median < 0.1, "median stays within 10%: {median:.3}");
        assert!(trimmed < 0.1, "trimmed mean stays within 10%: {trimmed:.3}");
    }

    #[test]
    fn aggregation_refuses_what_it_cannot_combine() {
        let a = weights(&[("w", vec![1.0])]);
        let b = weights(&[("w", vec![1.0, 2.0])]);
        assert!(aggregate(Aggregator::FedAvg, &[]).is_err());
        assert!(aggregate(Aggregator::Median, &[(1, &a), (1, &b)]).is_err());
        let err = aggregate(Aggregator::TrimmedMean { trim: 0.5 }, &[(1, &a)]).unwrap_err();
        assert_eq!(err.to_string(), "aggregator.trim: 0.5 is not in [0, 0.5)");
        assert!(aggregate(Aggregator::FedAvg, &[(0, &a)]).is_err());
    }
}
