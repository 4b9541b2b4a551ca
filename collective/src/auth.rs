//! Gang membership: only processes holding the job's secret, in the current attempt, join.
//!
//! The operator creates one random secret per TrainingJob and mounts it into that job's pods
//! only. Every connection to the rendezvous server and between ring neighbours starts with a
//! mutual challenge–response: each side sends a fresh random nonce and proves knowledge of the
//! secret with HMAC-SHA256 over both nonces, the attempt and its role (and, in the ring, its
//! rank). A stranger, a pod of another job or a straggler of an older attempt cannot answer, and
//! nothing (ring addresses, the NCCL unique id) is sent before the proof. The secret itself never
//! crosses the wire.

use hmac::{Hmac, Mac};

/// Bytes of a nonce.
pub const NONCE_BYTES: usize = 32;

/// The job's shared secret; without one (ad-hoc launches outside the operator and `radfm run`)
/// membership is not checked.
#[derive(Clone)]
pub struct GangSecret(Vec<u8>);

impl std::fmt::Debug for GangSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GangSecret(..)")
    }
}

impl GangSecret {
    /// A secret from its bytes (at least 16).
    pub fn new(bytes: Vec<u8>) -> Option<GangSecret> {
        (bytes.len() >= 16).then_some(GangSecret(bytes))
    }

    /// A fresh random secret (for launchers that start every rank themselves).
    pub fn generate() -> GangSecret {
        GangSecret(rand::random::<[u8; 32]>().to_vec())
    }

    /// The secret as hex (how it is stored in the Secret and in files).
    pub fn to_hex(&self) -> String {
        hex::encode(&self.0)
    }

    /// A secret from hex text (surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> Option<GangSecret> {
        GangSecret::new(hex::decode(text.trim()).ok()?)
    }

    fn mac(
        &self,
        role: &str,
        attempt: i32,
        rank: Option<usize>,
        ours: &[u8],
        theirs: &[u8],
    ) -> Hmac<sha2::Sha256> {
        let mut mac =
            <Hmac<sha2::Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC accepts any key");
        mac.update(b"radfm-gang/v1|");
        mac.update(role.as_bytes());
        mac.update(&attempt.to_le_bytes());
        mac.update(&rank.map_or(u64::MAX, |r| r as u64).to_le_bytes());
        mac.update(ours);
        mac.update(theirs);
        mac
    }

    /// The proof of `role` for the two nonces in `attempt` (and `rank`, where it matters).
    pub fn proof(
        &self,
        role: &str,
        attempt: i32,
        rank: Option<usize>,
        ours: &[u8],
        theirs: &[u8],
    ) -> [u8; 32] {
        self.mac(role, attempt, rank, ours, theirs)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Whether `proof` is the proof of `role` (constant-time comparison).
    pub fn check(
        &self,
        proof: &[u8],
        role: &str,
        attempt: i32,
        rank: Option<usize>,
        ours: &[u8],
        theirs: &[u8],
    ) -> bool {
        self.mac(role, attempt, rank, ours, theirs)
            .verify_slice(proof)
            .is_ok()
    }
}

/// A fresh random nonce.
pub fn nonce() -> [u8; NONCE_BYTES] {
    rand::random()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proof_holds_only_for_the_same_secret_role_attempt_rank_and_nonces() {
        let s = GangSecret::generate();
        let (a, b) = (nonce(), nonce());
        let p = s.proof("client", 3, Some(1), &a, &b);
        assert!(s.check(&p, "client", 3, Some(1), &a, &b));
        assert!(!s.check(&p, "server", 3, Some(1), &a, &b));
        assert!(!s.check(&p, "client", 2, Some(1), &a, &b));
        assert!(!s.check(&p, "client", 3, Some(0), &a, &b));
        assert!(!s.check(&p, "client", 3, Some(1), &b, &a));
        assert!(!GangSecret::generate().check(&p, "client", 3, Some(1), &a, &b));
        assert!(
            GangSecret::new(vec![0; 8]).is_none(),
            "short secrets are refused"
        );
        assert_eq!(GangSecret::from_hex(&s.to_hex()).unwrap().0, s.0);
    }
}
