//! Human approvals of a candidate, signed by the approving person.
//!
//! A promotion that needs a person must name one: not whoever could edit an annotation, but the
//! holder of a key the policy lists (`approvers`). `radfm approve` signs a statement binding the
//! approver's name to the model, the version and its weight hash, with a time and a reason, and
//! stores it beside the version in the registry. The gate counts an approval only if its
//! signature verifies against the key the policy lists for that name and it is about exactly the
//! candidate under decision; the decision records who approved and when.

use ed25519_dalek::SigningKey;
use jiff::Timestamp;
use radfm_api::site_validation::PromotionPolicySpec;
use serde::{Deserialize, Serialize};

use crate::gate::Versions;
use crate::report::Signed;

/// Format tag of the payload.
pub const FORMAT: &str = "radfm.approval/v1";

/// What an approver signs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Approval {
    /// [`FORMAT`].
    pub format: String,
    /// Model name.
    pub model: String,
    /// The approved version.
    pub version: u64,
    /// sha256 of its weights.
    pub weights_sha256: String,
    /// The approver's name as the policy lists it.
    pub approver: String,
    /// When (RFC 3339).
    pub created: String,
    /// Why, in the approver's words.
    pub reason: String,
}

/// Signs an approval with the approver's key.
pub fn sign(a: &Approval, key: &SigningKey) -> Signed {
    Signed::of(a, key)
}

/// Checks one stored approval (`name`: the approver it is stored under) against the policy's
/// approvers and the candidate.
pub fn admit(
    policy: &PromotionPolicySpec,
    v: &Versions,
    name: &str,
    bytes: &[u8],
    now: Timestamp,
) -> std::result::Result<Approval, String> {
    let signed: Signed =
        serde_json::from_slice(bytes).map_err(|e| format!("not a signed approval: {e}"))?;
    let listed = policy
        .approvers
        .iter()
        .find(|a| a.name == name)
        .ok_or_else(|| format!("{name} is not an approver of this policy"))?;
    if !listed
        .public_key
        .eq_ignore_ascii_case(signed.public_key.trim())
    {
        return Err(format!("signed with a key that is not {name}'s"));
    }
    let a = signed
        .open(|a: &Approval| &a.format, FORMAT)
        .map_err(|e| e.to_string())?;
    if a.approver != name {
        return Err(format!("names {} but is stored as {name}'s", a.approver));
    }
    if a.model != v.model || a.version != v.candidate || a.weights_sha256 != v.candidate_sha256 {
        return Err(format!(
            "approves {} v{}, not v{} with these weights",
            a.model, a.version, v.candidate
        ));
    }
    crate::gate::dated_within(policy, v, &a.created, now)?;
    Ok(a)
}

/// The first valid approval among the stored ones (`(approver, bytes)`), and why each other one
/// does not count.
pub fn first_valid(
    policy: &PromotionPolicySpec,
    v: &Versions,
    stored: &[(String, Vec<u8>)],
    now: Timestamp,
) -> (Option<Approval>, Vec<(String, String)>) {
    let mut refused = Vec::new();
    let mut valid = None;
    for (name, bytes) in stored {
        match admit(policy, v, name, bytes, now) {
            Ok(a) if valid.is_none() => valid = Some(a),
            Ok(_) => {}
            Err(why) => refused.push((name.clone(), why)),
        }
    }
    (valid, refused)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::generate_key;
    use radfm_api::site_validation::Approver;

    fn setting() -> (PromotionPolicySpec, Versions, SigningKey) {
        let key = generate_key();
        let policy: PromotionPolicySpec = serde_json::from_value(serde_json::json!({
            "registry": "file:///r", "model": "chest", "task": "lesion", "quorum": 1,
            "trustedSites": [], "requireApproval": true,
        }))
        .unwrap();
        let policy = PromotionPolicySpec {
            approvers: vec![Approver {
                name: "dr-alice".into(),
                public_key: crate::report::public_hex(&key),
            }],
            ..policy
        };
        let v = Versions {
            model: "chest".into(),
            candidate: 3,
            candidate_sha256: "c".repeat(64),
            candidate_created: "2026-12-01T10:00:00Z".parse().unwrap(),
            baseline: 1,
            baseline_sha256: "b".repeat(64),
        };
        (policy, v, key)
    }

    fn approval(version: u64, approver: &str) -> Approval {
        Approval {
            format: FORMAT.into(),
            model: "chest".into(),
            version,
            weights_sha256: "c".repeat(64),
            approver: approver.into(),
            created: "2026-12-01T11:00:00Z".into(),
            reason: "reviewed the site reports".into(),
        }
    }

    fn check(
        setting: &(PromotionPolicySpec, Versions, SigningKey),
        name: &str,
        signed: &Signed,
    ) -> String {
        let (policy, v, _) = setting;
        admit(
            policy,
            v,
            name,
            &serde_json::to_vec(signed).unwrap(),
            "2026-12-01T12:00:00Z".parse().unwrap(),
        )
        .err()
        .unwrap_or_default()
    }

    #[test]
    fn only_a_listed_approvers_signature_on_this_candidate_counts() {
        let world = setting();
        let (policy, v, key) = &world;
        let good = sign(&approval(3, "dr-alice"), key);
        let now = "2026-12-01T12:00:00Z".parse().unwrap();
        let a = admit(
            policy,
            v,
            "dr-alice",
            &serde_json::to_vec(&good).unwrap(),
            now,
        )
        .unwrap();
        assert_eq!(a.approver, "dr-alice");

        let stranger = generate_key();
        assert!(
            check(
                &world,
                "dr-alice",
                &sign(&approval(3, "dr-alice"), &stranger)
            )
            .contains("not dr-alice's")
        );
        assert!(
            check(&world, "mallory", &sign(&approval(3, "mallory"), &stranger))
                .contains("not an approver")
        );
        assert!(
            check(&world, "dr-alice", &sign(&approval(2, "dr-alice"), key))
                .contains("approves chest v2, not v3")
        );
        let mut tampered = good.clone();
        tampered.payload = tampered.payload.replace("reviewed", "skimmed");
        assert!(check(&world, "dr-alice", &tampered).contains("does not match"));
        let (_, refused) = first_valid(policy, v, &[("mallory".into(), b"{}".to_vec())], now);
        assert!(
            refused[0].1.contains("not a signed approval"),
            "{refused:?}"
        );
    }
}
