//! Any bytes as the payload of a report signed by a trusted site (a site that went rogue, or a
//! bug there): the gate decides, with reasons, on whatever arrives; it never panics.
#![no_main]
use radfm_api::site_validation::{PromotionPolicySpec, TrustedSite};
use radfm_validation::gate::{Versions, decide};
use radfm_validation::report::{Signed, public_hex, signing_key};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(payload) = std::str::from_utf8(data) else {
        return;
    };
    let key = signing_key(&"07".repeat(32)).unwrap();
    let signed = Signed {
        payload: payload.to_string(),
        public_key: public_hex(&key),
        signature: {
            use ed25519_dalek::Signer;
            hex(&key.sign(payload.as_bytes()).to_bytes())
        },
    };
    let policy = PromotionPolicySpec {
        registry: "file:///r".into(),
        model: "chest".into(),
        task: "lesion".into(),
        trusted_sites: vec![TrustedSite {
            site: "site-a".into(),
            public_key: public_hex(&key),
        }],
        quorum: 1,
        non_inferiority_margin: 0.02,
        max_worst_group_gap: 0.15,
        max_false_negative_rate_gap: Some(0.1),
        max_calibration_error: Some(0.1),
        rollback: None,
        required_subgroups: vec!["sex=F".into()],
        require_approval: false,
        approvers: Vec::new(),
        max_clock_skew_seconds: 300,
        min_cell_size: 20,
        candidate_alias: "candidate".into(),
        production_alias: "production".into(),
        poll_interval_seconds: 60,
    };
    let versions = Versions {
        model: "chest".into(),
        candidate: 2,
        candidate_sha256: "c".repeat(64),
        candidate_created: "2026-11-29T11:00:00Z".parse().unwrap(),
        baseline: 1,
        baseline_sha256: "b".repeat(64),
    };
    let stored = vec![(
        "site-a".to_string(),
        "file:///r/site-a.json".to_string(),
        serde_json::to_vec(&signed).unwrap(),
    )];
    let now: jiff::Timestamp = "2026-11-29T12:00:00Z".parse().unwrap();
    let d = decide(&policy, &versions, &stored, None, now);
    let _ = radfm_validation::apply::summary(&d);
});

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
