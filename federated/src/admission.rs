//! Which contributions a round takes. The hub assumes sites can be wrong or hostile and the
//! exchange can be tampered with: a contribution counts only if a listed site's key signed it,
//! for this federation, this round and this round's global model, once per site, with the
//! update's bytes matching the statement and its norm within the bound. Every refusal has a
//! typed reason, shown in the FederatedTraining's status.

use std::collections::{BTreeMap, BTreeSet};

use radfm_validation::report::Signed;

use crate::contribution::{self, Contribution};
use crate::weights::{self, Weights};

/// What a round accepts.
#[derive(Debug, Clone)]
pub struct Round {
    /// The federation (`namespace/name`).
    pub federation: String,
    /// The round, from 1.
    pub round: u32,
    /// Digest of this round's published global model.
    pub base_digest: String,
    /// The global model's layout: an update must have the same tensors and shapes.
    pub layout: Weights,
    /// The largest L2 norm an update may have.
    pub norm_bound: f64,
    /// Public keys (hex) of the listed sites, by site name.
    pub sites: BTreeMap<String, String>,
}

/// Why a contribution was refused.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rejection {
    /// The signature does not match the statement, or the statement cannot be read.
    BadSignature(String),
    /// The statement names a site the federation does not list.
    UnknownSite(String),
    /// The statement was signed by a key other than the site's.
    WrongKey,
    /// The statement is for another federation.
    OtherFederation(String),
    /// The statement is for another round (a replay or a late update).
    OtherRound(u32),
    /// The update starts from another global model.
    OtherBase(String),
    /// The site already contributed to this round.
    Duplicate,
    /// The update's bytes are not the ones the statement names.
    DigestMismatch,
    /// The update cannot be read or does not fit the model.
    Unreadable(String),
    /// The update's norm is over the bound.
    NormExceeded {
        /// The update's L2 norm.
        norm: String,
        /// The bound.
        bound: String,
    },
    /// The statement claims no samples.
    NoSamples,
}

impl Rejection {
    /// A short CamelCase reason for conditions and events.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::BadSignature(_) => "BadSignature",
            Rejection::UnknownSite(_) => "UnknownSite",
            Rejection::WrongKey => "WrongKey",
            Rejection::OtherFederation(_) => "OtherFederation",
            Rejection::OtherRound(_) => "OtherRound",
            Rejection::OtherBase(_) => "OtherBase",
            Rejection::Duplicate => "Duplicate",
            Rejection::DigestMismatch => "DigestMismatch",
            Rejection::Unreadable(_) => "Unreadable",
            Rejection::NormExceeded { .. } => "NormExceeded",
            Rejection::NoSamples => "NoSamples",
        }
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejection::BadSignature(e) => write!(f, "the statement's signature does not hold: {e}"),
            Rejection::UnknownSite(s) => write!(f, "site {s} is not in the federation"),
            Rejection::WrongKey => write!(f, "signed with a key that is not the site's"),
            Rejection::OtherFederation(x) => write!(f, "statement for federation {x}"),
            Rejection::OtherRound(r) => write!(f, "statement for round {r}"),
            Rejection::OtherBase(d) => write!(f, "update from global model {d}, not this round's"),
            Rejection::Duplicate => write!(f, "the site already contributed to this round"),
            Rejection::DigestMismatch => write!(f, "the update's bytes do not match the statement"),
            Rejection::Unreadable(e) => write!(f, "unreadable update: {e}"),
            Rejection::NormExceeded { norm, bound } => {
                write!(f, "update norm {norm} is over the bound {bound}")
            }
            Rejection::NoSamples => write!(f, "the statement claims no samples"),
        }
    }
}

/// An admitted contribution: the statement and its update.
#[derive(Debug, Clone)]
pub struct Admitted {
    /// The verified statement.
    pub contribution: Contribution,
    /// The update.
    pub update: Weights,
    /// Its L2 norm.
    pub norm: f64,
}

impl Round {
    /// Decides one contribution: its signed statement and the update's bytes. `seen` holds the
    /// sites already admitted this round.
    pub fn admit(
        &self,
        signed: &Signed,
        update_bytes: &[u8],
        seen: &BTreeSet<String>,
    ) -> Result<Admitted, Rejection> {
        let c = contribution::open(signed).map_err(|e| Rejection::BadSignature(e.to_string()))?;
        let key = self
            .sites
            .get(&c.site)
            .ok_or_else(|| Rejection::UnknownSite(c.site.clone()))?;
        if !key.trim().eq_ignore_ascii_case(signed.public_key.trim()) {
            return Err(Rejection::WrongKey);
        }
        if c.federation != self.federation {
            return Err(Rejection::OtherFederation(c.federation));
        }
        if c.round != self.round {
            return Err(Rejection::OtherRound(c.round));
        }
        if c.base_digest != self.base_digest {
            return Err(Rejection::OtherBase(c.base_digest));
        }
        if seen.contains(&c.site) {
            return Err(Rejection::Duplicate);
        }
        if c.samples == 0 {
            return Err(Rejection::NoSamples);
        }
        if weights::digest(update_bytes) != c.update_digest {
            return Err(Rejection::DigestMismatch);
        }
        let update = Weights::from_safetensors(update_bytes, &format!("update of {}", c.site))
            .map_err(|e| Rejection::Unreadable(e.to_string()))?;
        self.layout
            .check_same_layout(&update, "update")
            .map_err(|e| Rejection::Unreadable(e.to_string()))?;
        let norm = update.norm();
        if norm > self.norm_bound {
            return Err(Rejection::NormExceeded {
                norm: format!("{norm:.4}"),
                bound: format!("{:.4}", self.norm_bound),
            });
        }
        Ok(Admitted {
            contribution: c,
            update,
            norm,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::Precision;
    use crate::weights::tests::weights;
    use ed25519_dalek::SigningKey;

    struct Setup {
        round: Round,
        keys: BTreeMap<String, SigningKey>,
    }

    fn setup() -> Setup {
        let keys: BTreeMap<String, SigningKey> = ["site-a", "site-b"]
            .iter()
            .enumerate()
            .map(|(i, s)| (s.to_string(), SigningKey::from_bytes(&[i as u8 + 1; 32])))
            .collect();
        let sites = keys
            .iter()
            .map(|(s, k)| (s.clone(), radfm_validation::report::public_hex(k)))
            .collect();
        Setup {
            round: Round {
                federation: "hub/cxr".into(),
                round: 2,
                base_digest: "base2".into(),
                layout: weights(&[("w", vec![0.0, 0.0])]),
                norm_bound: 1.0,
                sites,
            },
            keys,
        }
    }

    fn contribution(site: &str, bytes: &[u8]) -> Contribution {
        Contribution {
            format: contribution::FORMAT.into(),
            federation: "hub/cxr".into(),
            site: site.into(),
            round: 2,
            base_digest: "base2".into(),
            update_digest: weights::digest(bytes),
            samples: 100,
            steps: 10,
            dataset_index_digest: "idx".into(),
            local_loss: 0.5,
        }
    }

    fn update(values: Vec<f32>) -> Vec<u8> {
        weights(&[("w", values)])
            .to_safetensors(Precision::F32)
            .unwrap()
    }

    #[test]
    fn a_listed_sites_signed_update_for_this_round_is_admitted() {
        let s = setup();
        let bytes = update(vec![0.3, 0.4]);
        let signed = contribution("site-a", &bytes).sign(&s.keys["site-a"]);
        let a = s.round.admit(&signed, &bytes, &BTreeSet::new()).unwrap();
        assert_eq!(a.contribution.samples, 100);
        assert!((a.norm - 0.5).abs() < 1e-6);
    }

    #[test]
    fn every_bad_contribution_is_refused_with_its_reason() {
        let s = setup();
        let bytes = update(vec![0.3, 0.4]);
        let seen_a = BTreeSet::from(["site-a".to_string()]);
        let none = BTreeSet::new();
        let with = |f: &dyn Fn(&mut Contribution)| {
            let mut c = contribution("site-a", &bytes);
            f(&mut c);
            c.sign(&s.keys["site-a"])
        };
        let mut tampered = contribution("site-a", &bytes).sign(&s.keys["site-a"]);
        tampered.payload = tampered
            .payload
            .replace("\"samples\":100", "\"samples\":100000");
        let cases: Vec<(Signed, Vec<u8>, &BTreeSet<String>, &str)> = vec![
            (tampered, bytes.clone(), &none, "BadSignature"),
            (
                contribution("site-a", &bytes).sign(&s.keys["site-b"]),
                bytes.clone(),
                &none,
                "WrongKey",
            ),
            (
                with(&|c| c.site = "site-z".into()),
                bytes.clone(),
                &none,
                "UnknownSite",
            ),
            (
                with(&|c| c.federation = "hub/other".into()),
                bytes.clone(),
                &none,
                "OtherFederation",
            ),
            (with(&|c| c.round = 1), bytes.clone(), &none, "OtherRound"),
            (
                with(&|c| c.base_digest = "base1".into()),
                bytes.clone(),
                &none,
                "OtherBase",
            ),
            (with(&|_| {}), bytes.clone(), &seen_a, "Duplicate"),
            (with(&|c| c.samples = 0), bytes.clone(), &none, "NoSamples"),
            (
                with(&|_| {}),
                update(vec![0.3, 0.5]),
                &none,
                "DigestMismatch",
            ),
        ];
        for (signed, bytes, seen, want) in cases {
            let got = s.round.admit(&signed, &bytes, seen).unwrap_err();
            assert_eq!(got.reason(), want, "{got}");
        }
        let big = update(vec![3.0, 4.0]);
        let signed = contribution("site-b", &big).sign(&s.keys["site-b"]);
        let got = s.round.admit(&signed, &big, &none).unwrap_err();
        assert_eq!(
            got.to_string(),
            "update norm 5.0000 is over the bound 1.0000"
        );
        let misshapen = update(vec![0.1, 0.1, 0.1]);
        let signed = contribution("site-b", &misshapen).sign(&s.keys["site-b"]);
        assert_eq!(
            s.round
                .admit(&signed, &misshapen, &none)
                .unwrap_err()
                .reason(),
            "Unreadable"
        );
    }
}
