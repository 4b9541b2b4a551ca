//! Per-sample metadata stored beside every image (`<key>.json` in a shard).
//!
//! Only whitelisted, non-identifying fields exist here: patient and study appear as keyed-hash
//! pseudonyms, age only as a band. The subgroup fields (sex, age band, scanner, site, view) are
//! what later fairness checks group by.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Metadata of one sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct SampleMeta {
    /// Image width in pixels.
    pub width: u32,
    /// Image height in pixels.
    pub height: u32,
    /// Physical value = stored value × slope + intercept.
    pub rescale_slope: f64,
    /// See `rescale_slope`.
    pub rescale_intercept: f64,
    /// DICOM modality (CR, DX, CT, MR, ...) or "synthetic".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modality: Option<String>,
    /// Body part examined.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_part: Option<String>,
    /// View position (PA, AP, LAT, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub view: Option<String>,
    /// Patient sex (F, M, O).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sex: Option<String>,
    /// Age band ("0-17", "18-39", "40-59", "60-79", "80+").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub age_band: Option<String>,
    /// Scanner manufacturer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manufacturer: Option<String>,
    /// Scanner model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scanner_model: Option<String>,
    /// Site (hospital) the image comes from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// Pseudonymous patient id (keyed hash).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient: Option<String>,
    /// Pseudonymous study id (keyed hash).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub study: Option<String>,
    /// Frame index within a multi-frame source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frame: Option<u32>,
    /// Labels (from a side file or the synthetic generator).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, serde_json::Value>,
}

/// The age band of an age in years.
pub fn age_band(years: u32) -> &'static str {
    match years {
        0..=17 => "0-17",
        18..=39 => "18-39",
        40..=59 => "40-59",
        60..=79 => "60-79",
        _ => "80+",
    }
}

/// Keyed pseudonym of an identifier: HMAC-SHA256 with a secret salt, first 16 bytes as hex.
/// Without the salt nobody can recompute it from a patient id.
pub fn pseudonym(salt: &[u8], value: &str) -> String {
    use hmac::{Hmac, Mac};
    let mut mac =
        <Hmac<sha2::Sha256> as Mac>::new_from_slice(salt).expect("HMAC accepts any key length");
    mac.update(value.as_bytes());
    hex::encode(&mac.finalize().into_bytes()[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pseudonyms_depend_on_the_salt_and_reveal_nothing() {
        let a = pseudonym(b"salt-1", "PAT-0001");
        assert_eq!(a.len(), 32);
        assert_eq!(a, pseudonym(b"salt-1", "PAT-0001"));
        assert_ne!(a, pseudonym(b"salt-2", "PAT-0001"));
        assert!(!a.contains("0001"));
        assert_eq!(
            (age_band(17), age_band(45), age_band(90)),
            ("0-17", "40-59", "80+")
        );
    }
}
