//! Synthetic radiology-like cohorts: modified Shepp–Logan phantoms with anatomical variation,
//! optional lesions (the label), per-site scanner effects and subgroup attributes.
//!
//! Deterministic from the seed, so tests and the demo get the same cohort on every machine. A site
//! can be given a strong scanner shift so that later fairness checks have something real to find.

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::image16::Image16;
use crate::meta::SampleMeta;
use crate::shard::Sample;

/// Scanner effects of one site.
#[derive(Debug, Clone, PartialEq)]
pub struct Site {
    /// Site name (no dots).
    pub name: String,
    /// Scanner manufacturer and model reported for its images.
    pub scanner: (String, String),
    /// Gaussian noise, as a fraction of the full intensity range.
    pub noise: f64,
    /// Contrast exponent applied to normalised intensities (1 = none).
    pub gamma: f64,
    /// Box-blur radius in pixels.
    pub blur: usize,
    /// Acquisition resolution as a fraction of the output size (1 = full).
    pub resolution: f64,
}

impl Site {
    /// A site with mild, site-specific effects derived from its index.
    pub fn standard(name: &str, i: usize) -> Site {
        let vendors = [
            ("Siemens", "Ysio Max"),
            ("Philips", "DigitalDiagnost"),
            ("GE", "Definium 6000"),
            ("Canon", "CXDI-710C"),
        ];
        let (m, s) = vendors[i % vendors.len()];
        Site {
            name: name.into(),
            scanner: (m.into(), s.into()),
            noise: 0.01 + 0.005 * i as f64,
            gamma: 1.0 + 0.05 * i as f64,
            blur: i % 2,
            resolution: 1.0,
        }
    }

    /// The same site with a strong scanner shift (older detector: noisy, low contrast, blurred,
    /// low resolution).
    pub fn shifted(mut self) -> Site {
        self.scanner = ("Legacy".into(), "CR-1998".into());
        self.noise = 0.04;
        self.gamma = 1.4;
        self.blur = 1;
        self.resolution = 0.5;
        self
    }
}

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthConfig {
    /// Number of samples.
    pub samples: usize,
    /// Image width and height.
    pub size: u32,
    /// Sites; samples are spread evenly over them.
    pub sites: Vec<Site>,
    /// Fraction of images with a lesion (label `lesion` = 1).
    pub lesion_prevalence: f64,
    /// Lesion radius range, as a fraction of the field of view's half-width.
    pub lesion_radius: (f64, f64),
    /// Fraction of female patients.
    pub female_fraction: f64,
    /// Seed of every random choice.
    pub seed: u64,
    /// Index of the first sample (to extend a cohort with new, different samples).
    pub first_index: usize,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            samples: 256,
            size: 128,
            sites: vec![Site::standard("site-a", 0), Site::standard("site-b", 1)],
            lesion_prevalence: 0.3,
            lesion_radius: (0.04, 0.09),
            female_fraction: 0.5,
            seed: 0,
            first_index: 0,
        }
    }
}

/// (x0, y0, a, b, angle in degrees, intensity) of the modified Shepp–Logan phantom.
const ELLIPSES: [(f64, f64, f64, f64, f64, f64); 10] = [
    (0.0, 0.0, 0.69, 0.92, 0.0, 1.0),
    (0.0, -0.0184, 0.6624, 0.874, 0.0, -0.8),
    (0.22, 0.0, 0.11, 0.31, -18.0, -0.2),
    (-0.22, 0.0, 0.16, 0.41, 18.0, -0.2),
    (0.0, 0.35, 0.21, 0.25, 0.0, 0.1),
    (0.0, 0.1, 0.046, 0.046, 0.0, 0.1),
    (0.0, -0.1, 0.046, 0.046, 0.0, 0.1),
    (-0.08, -0.605, 0.046, 0.023, 0.0, 0.1),
    (0.0, -0.606, 0.023, 0.023, 0.0, 0.1),
    (0.06, -0.605, 0.023, 0.046, 0.0, 0.1),
];

/// Stored values use 12 bits, like most detectors.
const MAX_VALUE: f64 = 4095.0;

/// The ellipses summed on an `acq`×`acq` grid, the body rotated by `rot` and scaled by
/// `scale`.
fn rasterize(
    shapes: &[(f64, f64, f64, f64, f64, f64)],
    acq: usize,
    rot: f64,
    scale: (f64, f64),
) -> Vec<f64> {
    let (sx, sy) = scale;
    let mut img = vec![0.0f64; acq * acq];
    let (cr, sr) = (rot.cos(), rot.sin());
    for py in 0..acq {
        for px in 0..acq {
            let u = (px as f64 + 0.5) / acq as f64 * 2.0 - 1.0;
            let v = 1.0 - (py as f64 + 0.5) / acq as f64 * 2.0;
            let (x, y) = ((u * cr - v * sr) / sx, (u * sr + v * cr) / sy);
            let mut val = 0.0;
            for &(x0, y0, a, b, ang, inten) in shapes {
                let (dx, dy) = (x - x0, y - y0);
                let (ca, sa) = (ang.cos(), ang.sin());
                let (ex, ey) = ((dx * ca + dy * sa) / a, (-dx * sa + dy * ca) / b);
                if ex * ex + ey * ey <= 1.0 {
                    val += inten;
                }
            }
            img[py * acq + px] = val;
        }
    }
    img
}

/// Sample `i` of the cohort (absolute index, so cohorts can be extended).
pub fn sample(cfg: &SynthConfig, i: usize) -> Sample {
    let mut rng =
        ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i as u64);
    let site = &cfg.sites[i % cfg.sites.len()];
    let female = rng.random_bool(cfg.female_fraction);
    let age: u32 = rng.random_range(18..=90);
    let lesion = rng.random_bool(cfg.lesion_prevalence);

    // Anatomy: body size depends on sex, tissue contrast on age, plus individual variation.
    let sx = if female { 0.88 } else { 0.96 } * rng.random_range(0.94..1.04);
    let sy = rng.random_range(0.92..1.04);
    let rot = rng.random_range(-8.0f64..8.0).to_radians();
    let aging = 1.0 - (age as f64 - 18.0) / 250.0;
    let mut shapes: Vec<(f64, f64, f64, f64, f64, f64)> = ELLIPSES
        .iter()
        .enumerate()
        .map(|(k, &(x, y, a, b, ang, v))| {
            let jitter = if k < 2 {
                1.0
            } else {
                rng.random_range(0.85..1.15) * aging
            };
            (
                x + rng.random_range(-0.01..0.01),
                y + rng.random_range(-0.01..0.01),
                a,
                b,
                ang.to_radians(),
                v * jitter,
            )
        })
        .collect();
    let mut found = None;
    if lesion {
        let r = rng.random_range(cfg.lesion_radius.0..=cfg.lesion_radius.1);
        let (cx, cy) = (rng.random_range(-0.35..0.35), rng.random_range(-0.5..0.5));
        found = Some(Lesion {
            x: cx,
            y: cy,
            radius: r,
        });
        shapes.push((
            cx,
            cy,
            r,
            r * rng.random_range(0.7..1.3),
            rng.random_range(0.0..std::f64::consts::PI),
            0.35,
        ));
    }

    let n = cfg.size as usize;
    let acq = ((n as f64 * site.resolution).round() as usize).max(8);
    let img = rasterize(&shapes, acq, rot, (sx, sy));
    let img = box_blur(&img, acq, site.blur);
    let mut out = Vec::with_capacity(n * n);
    for py in 0..n {
        for px in 0..n {
            let v = img[(py * acq / n) * acq + px * acq / n];
            let norm = ((v + 0.1) / 1.4).clamp(0.0, 1.0).powf(site.gamma);
            let noisy = norm + site.noise * gaussian(&mut rng);
            out.push((noisy.clamp(0.0, 1.0) * MAX_VALUE).round() as u16);
        }
    }
    Sample {
        key: format!("synth-{}-{i:07}", site.name),
        image: Image16 {
            width: cfg.size,
            height: cfg.size,
            pixels: out,
        },
        meta: meta(cfg, site, i, female, age, lesion),
        report: Some(report(cfg, i, found)),
    }
}

/// The metadata of sample `i`.
fn meta(
    cfg: &SynthConfig,
    site: &Site,
    i: usize,
    female: bool,
    age: u32,
    lesion: bool,
) -> SampleMeta {
    SampleMeta {
        width: cfg.size,
        height: cfg.size,
        rescale_slope: 1.0,
        rescale_intercept: 0.0,
        modality: Some("synthetic".into()),
        body_part: Some("PHANTOM".into()),
        view: Some("PA".into()),
        sex: Some(if female { "F" } else { "M" }.into()),
        age_band: Some(crate::meta::age_band(age).into()),
        manufacturer: Some(site.scanner.0.clone()),
        scanner_model: Some(site.scanner.1.clone()),
        site: Some(site.name.clone()),
        patient: Some(format!("synth-patient-{i:07}")),
        study: Some(format!("synth-study-{i:07}")),
        frame: None,
        labels: BTreeMap::from([("lesion".to_string(), serde_json::json!(lesion as u8))]),
    }
}

/// Where a synthetic lesion lies, in the phantom's coordinates (x right on the image, y up).
#[derive(Debug, Clone, Copy)]
struct Lesion {
    x: f64,
    y: f64,
    radius: f64,
}

/// The field of view's half-width in millimetres, for lesion sizes in reports.
const HALF_FOV_MM: f64 = 175.0;

/// The report of sample `i`: its findings (lesion or not, side, zone, size) in the wording style
/// of its site (site k of the cohort writes in style k mod 3), from a random stream of its own
/// so that images stay as they were without reports.
fn report(cfg: &SynthConfig, i: usize, lesion: Option<Lesion>) -> String {
    let mut rng =
        ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_mul(0xD1B5_4A32_D192_ED03) ^ i as u64);
    let style = (i % cfg.sites.len()) % 3;
    let Some(l) = lesion else {
        let normal = [
            [
                "FINDINGS: No focal opacity. The lungs are clear. IMPRESSION: No lesion.",
                "FINDINGS: Clear lungs, no nodule or mass. IMPRESSION: Normal study.",
            ],
            [
                "The lungs are clear without focal nodule or mass. No lesion is seen.",
                "No suspicious opacity. There is no evidence of a lesion.",
            ],
            ["Normal study. No lesion seen.", "No focal abnormality."],
        ];
        return normal[style][rng.random_range(0..2)].to_string();
    };
    // Radiological convention: the patient's right is on the image's left.
    let side = if l.x < 0.0 { "right" } else { "left" };
    let zone = if l.y > 0.0 { "upper" } else { "lower" };
    let mm = (2.0 * l.radius * HALF_FOV_MM).round() as u32;
    let noun = ["opacity", "nodule", "mass", "lesion"][rng.random_range(0..4)];
    match style {
        0 => format!(
            "FINDINGS: A {mm} mm rounded {noun} in the {side} {zone} zone. IMPRESSION: {} {zone} zone lesion, {mm} mm.",
            capital(side)
        ),
        1 => format!(
            "There is a well-circumscribed {mm} mm {noun} projecting over the {zone} {side} hemithorax, consistent with a lesion."
        ),
        _ => format!("{} {zone} lesion ({mm} mm).", capital(side)),
    }
}

fn capital(word: &str) -> String {
    let mut c = word.chars();
    c.next()
        .map_or_else(String::new, |f| f.to_uppercase().chain(c).collect())
}

/// Every sample of the cohort, in order.
pub fn cohort(cfg: &SynthConfig) -> impl Iterator<Item = Sample> + '_ {
    (cfg.first_index..cfg.first_index + cfg.samples).map(move |i| sample(cfg, i))
}

fn gaussian(rng: &mut ChaCha8Rng) -> f64 {
    let (u1, u2): (f64, f64) = (rng.random_range(1e-12..1.0), rng.random());
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

fn box_blur(img: &[f64], n: usize, r: usize) -> Vec<f64> {
    if r == 0 {
        return img.to_vec();
    }
    let mut out = vec![0.0; img.len()];
    for y in 0..n {
        for x in 0..n {
            let (mut s, mut c) = (0.0, 0.0);
            for yy in y.saturating_sub(r)..(y + r + 1).min(n) {
                for xx in x.saturating_sub(r)..(x + r + 1).min(n) {
                    s += img[yy * n + xx];
                    c += 1.0;
                }
            }
            out[y * n + x] = s / c;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mean(s: &Sample) -> f64 {
        s.image.pixels.iter().map(|&p| p as f64).sum::<f64>() / s.image.pixels.len() as f64
    }

    #[test]
    fn reports_describe_each_images_findings_in_its_sites_style() {
        let cfg = SynthConfig {
            samples: 120,
            size: 32,
            seed: 3,
            sites: ["a", "b", "c"]
                .iter()
                .enumerate()
                .map(|(k, s)| Site::standard(s, k))
                .collect(),
            ..Default::default()
        };
        for s in cohort(&cfg) {
            let report = s.report.as_deref().unwrap();
            let lesion = s.meta.labels["lesion"] == 1;
            let says_size = report.contains(" mm");
            assert_eq!(says_size, lesion, "{}: {report}", s.key);
            if lesion {
                let side = ["right", "left"]
                    .iter()
                    .filter(|w| report.to_lowercase().contains(*w))
                    .count();
                let zone = ["upper", "lower"]
                    .iter()
                    .filter(|w| report.contains(*w))
                    .count();
                assert_eq!((side, zone), (1, 1), "one side, one zone: {report}");
            } else {
                assert!(report.contains("No") || report.contains("no "), "{report}");
            }
            let style = match s.meta.site.as_deref() {
                Some("a") => report.starts_with("FINDINGS:"),
                Some("b") => {
                    report.starts_with("The lungs")
                        || report.starts_with("No suspicious")
                        || report.starts_with("There is")
                }
                _ => !report.starts_with("FINDINGS:") && !report.starts_with("There is"),
            };
            assert!(style, "{:?}: {report}", s.meta.site);
        }
    }

    #[test]
    fn cohort_is_deterministic_and_spreads_sites_sexes_and_lesions() {
        let cfg = SynthConfig {
            samples: 200,
            size: 64,
            seed: 7,
            ..Default::default()
        };
        let a: Vec<Sample> = cohort(&cfg).collect();
        let b: Vec<Sample> = cohort(&cfg).collect();
        assert_eq!(a, b);
        let count = |f: &dyn Fn(&Sample) -> bool| a.iter().filter(|s| f(s)).count();
        assert_eq!(count(&|s| s.meta.site.as_deref() == Some("site-a")), 100);
        let females = count(&|s| s.meta.sex.as_deref() == Some("F"));
        assert!((70..=130).contains(&females), "{females}");
        let lesions = count(&|s| s.meta.labels["lesion"] == 1);
        assert!((35..=85).contains(&lesions), "{lesions}");
        assert!(a.iter().all(|s| s.image.pixels.iter().all(|&p| p <= 4095)));
        let other: Vec<Sample> = cohort(&SynthConfig {
            seed: 8,
            ..cfg.clone()
        })
        .collect();
        assert_ne!(a[0].image, other[0].image);
    }

    #[test]
    fn a_lesion_adds_bright_pixels_and_a_shifted_site_looks_different() {
        let base = SynthConfig {
            samples: 1,
            size: 64,
            lesion_prevalence: 0.0,
            ..Default::default()
        };
        let with = SynthConfig {
            lesion_prevalence: 1.0,
            ..base.clone()
        };
        assert!(mean(&sample(&with, 3)) > mean(&sample(&base, 3)));
        let shifted = SynthConfig {
            sites: vec![Site::standard("site-a", 0).shifted()],
            ..base.clone()
        };
        let (a, b) = (sample(&base, 2), sample(&shifted, 2));
        assert_ne!(a.meta.manufacturer, b.meta.manufacturer);
        assert!(
            (mean(&a) - mean(&b)).abs() > 50.0,
            "{} vs {}",
            mean(&a),
            mean(&b)
        );
    }
}
