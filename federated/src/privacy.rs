//! Client-level differential privacy (DP-FedAvg, McMahan et al., 2018): each site's update is
//! clipped to L2 norm C, the mean of the clipped updates gets Gaussian noise of standard
//! deviation z·C/n, so that what the published model reveals about any one *site* (not only any
//! one image) is bounded. The accountant is the Rényi-DP one PyTorch's Opacus uses: the Gaussian
//! mechanism's RDP α/(2z²) a round, composed over rounds, turned into (ε, δ) with the conversion
//! of Balle et al. (2020), minimised over the same grid of orders. Every listed site contributes
//! each round (no subsampling amplification is claimed).

use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, Normal};

use crate::weights::Weights;
use crate::{Error, Result};

/// `update` scaled down to L2 norm at most `bound` (unchanged when within it).
pub fn clip(update: &Weights, bound: f64) -> Weights {
    let norm = update.norm();
    if norm <= bound || norm == 0.0 {
        update.clone()
    } else {
        update.scaled(bound / norm)
    }
}

/// Adds Gaussian noise of standard deviation `noise_multiplier · clip / sites` to every value of
/// the mean of `sites` clipped updates. The randomness comes from `seed` (the hub draws it from
/// the operating system and never publishes it).
pub fn add_noise(
    mean: &Weights,
    noise_multiplier: f64,
    clip: f64,
    sites: usize,
    seed: [u8; 32],
) -> Result<Weights> {
    if sites == 0 {
        return Err(Error::Invalid {
            field: "sites",
            reason: "noise for no site".into(),
        });
    }
    let std = noise_multiplier * clip / sites as f64;
    let normal = Normal::new(0.0, std).map_err(|e| Error::Invalid {
        field: "privacy.noiseMultiplier",
        reason: e.to_string(),
    })?;
    let mut rng = ChaCha20Rng::from_seed(seed);
    let mut out = mean.clone();
    for t in out.0.values_mut() {
        for v in &mut t.values {
            *v = (f64::from(*v) + normal.sample(&mut rng)) as f32;
        }
    }
    Ok(out)
}

/// The Rényi orders the accountant minimises over (Opacus's default grid).
fn orders() -> impl Iterator<Item = f64> {
    (1..100)
        .map(|x| 1.0 + f64::from(x) / 10.0)
        .chain((12..64).map(f64::from))
}

/// The ε spent after `rounds` rounds with noise multiplier `z`, at `delta`.
pub fn epsilon(noise_multiplier: f64, rounds: u32, delta: f64) -> Result<f64> {
    if noise_multiplier <= 0.0 || !(0.0..1.0).contains(&delta) || delta == 0.0 {
        return Err(Error::Invalid {
            field: "privacy",
            reason: format!(
                "noise multiplier {noise_multiplier} must be > 0 and delta {delta} in (0, 1)"
            ),
        });
    }
    let z2 = noise_multiplier * noise_multiplier;
    Ok(orders()
        .map(|a| {
            let rdp = f64::from(rounds) * a / (2.0 * z2);
            rdp + ((a - 1.0) / a).ln() - (delta.ln() + a.ln()) / (a - 1.0)
        })
        .fold(f64::INFINITY, f64::min)
        .max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::tests::weights;

    #[test]
    fn clipping_bounds_the_norm_and_keeps_the_direction() {
        let u = weights(&[("w", vec![3.0, 4.0])]);
        let c = clip(&u, 1.0);
        assert!((c.norm() - 1.0).abs() < 1e-6);
        assert_eq!(c.0["w"].values, vec![0.6, 0.8]);
        assert_eq!(clip(&u, 10.0), u);
    }

    #[test]
    fn noise_has_the_stated_spread_and_depends_only_on_the_seed() {
        let zero = Weights(
            [(
                "w".to_string(),
                crate::weights::Tensor {
                    shape: vec![20_000],
                    values: vec![0.0; 20_000],
                },
            )]
            .into_iter()
            .collect(),
        );
        let noisy = add_noise(&zero, 1.0, 2.0, 4, [7; 32]).unwrap();
        let values = &noisy.0["w"].values;
        let var = values.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / values.len() as f64;
        assert!(
            (var.sqrt() - 0.5).abs() < 0.02,
            "std {} for z·C/n = 0.5",
            var.sqrt()
        );
        assert_eq!(add_noise(&zero, 1.0, 2.0, 4, [7; 32]).unwrap(), noisy);
        assert_ne!(add_noise(&zero, 1.0, 2.0, 4, [8; 32]).unwrap(), noisy);
    }

    #[test]
    fn the_accountant_matches_opacus_rdp_and_is_below_the_simple_rdp_bound() {
        // Opacus's RDP accountant (sample rate 1) on the same grid of orders.
        let cases = [
            (1.0, 1, 4.728_507),
            (1.1, 100, 83.099_779),
            (5.0, 10, 2.813_653),
        ];
        for (z, t, want) in cases {
            let got = epsilon(z, t, 1e-5).unwrap();
            assert!((got - want).abs() < 1e-4, "z={z} T={t}: {got} vs {want}");
        }
        // Mironov's conversion, minimised over all real orders: T/(2z²) + 2·sqrt(T·ln(1/δ)/(2z²)).
        let simple = 0.5 + 2.0 * (0.5 * (1e5f64).ln()).sqrt();
        assert!(epsilon(1.0, 1, 1e-5).unwrap() < simple);
        assert!(
            epsilon(1.0, 2, 1e-5).unwrap() > epsilon(1.0, 1, 1e-5).unwrap(),
            "more rounds spend more"
        );
        assert!(epsilon(0.0, 1, 1e-5).is_err());
    }
}
