//! A look's pod: `radfm monitor` on the site's data, with the site's signing key, under the
//! restricted Pod Security Standard and without an API token. It is built like the validation
//! pod ([`crate::site_validator::pod::site_pod`]), because a monitor and a validator of one site
//! hold the same key and the same data.

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use radfm_api::continual::ANNOTATION_SCHEDULED;
use radfm_api::monitoring::ModelMonitor;

use crate::site_validator::pod::{SiteAccess, SitePod, site_pod};

/// Label on a look's pod: the ModelMonitor's name.
pub const LABEL_MONITOR: &str = "radfm.io/model-monitor";

/// The name of the look scheduled at `scheduled`: the monitor's name and the minutes since the
/// epoch, so that an operator restarted at the firing instant names the same pod again.
pub fn look_name(mm: &ModelMonitor, scheduled: Timestamp) -> String {
    format!("{}-{}", mm.name_any(), scheduled.as_second().div_euclid(60))
}

/// `radfm monitor` with the monitor's settings, for `version`, identified as `look`.
fn args(mm: &ModelMonitor, version: u64, look: &str) -> Vec<String> {
    let s = &mm.spec;
    let mut args: Vec<String> = vec![
        "monitor".into(),
        "--registry".into(),
        s.registry.clone(),
        "--model".into(),
        s.model.clone(),
        "--version".into(),
        version.to_string(),
        "--site".into(),
        s.site_id.clone(),
        "--reference".into(),
        s.reference.uri.clone(),
        "--recent".into(),
        s.recent.uri.clone(),
        "--fields".into(),
        s.fields.join(","),
        "--alpha".into(),
        s.alpha.to_string(),
        "--permutations".into(),
        s.permutations.to_string(),
        "--min-cell".into(),
        s.min_cell_size.to_string(),
        "--performance-margin".into(),
        s.performance_margin.to_string(),
        "--look".into(),
        look.into(),
    ];
    for (flag, shards) in [
        ("--reference-shards", &s.reference.shards),
        ("--recent-shards", &s.recent.shards),
    ] {
        if let Some(shards) = shards {
            args.extend([flag.to_string(), shards.clone()]);
        }
    }
    if let Some(task) = &s.task {
        args.extend(["--task".to_string(), task.clone()]);
    }
    args
}

/// The pod of the look at `version` scheduled at `scheduled`.
pub fn look_pod(mm: &ModelMonitor, version: u64, scheduled: Timestamp) -> Pod {
    let s = &mm.spec;
    let name = look_name(mm, scheduled);
    site_pod(SitePod {
        owner: mm,
        owner_label: LABEL_MONITOR,
        args: args(mm, version, &name),
        name,
        version,
        annotations: Some(BTreeMap::from([(
            ANNOTATION_SCHEDULED.to_string(),
            scheduled.to_string(),
        )])),
        container: "monitor",
        image: &s.image,
        access: SiteAccess {
            key: &s.signing_key_secret_ref,
            data_volume: s.data_volume.as_ref(),
            secrets: [
                s.credentials_secret_ref.as_ref(),
                s.reference.credentials_secret_ref.as_ref(),
                s.recent.credentials_secret_ref.as_ref(),
            ]
            .into_iter()
            .flatten()
            .collect(),
            registry: &s.registry,
            registry_store: s.registry_store.as_ref(),
        },
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::site_validator::LABEL_VERSION;

    pub(crate) fn monitor(extra: &str) -> ModelMonitor {
        let yaml = format!(
            "apiVersion: radfm.io/v1alpha1
kind: ModelMonitor
metadata: {{name: north, namespace: site, uid: uid-mm, creationTimestamp: '1970-01-01T00:00:00Z'}}
spec:
  siteId: north
  signingKeySecretRef: {{name: north-key}}
  registry: s3://radiology/registry
  credentialsSecretRef: {{name: registry-s3}}
  model: chest
  schedule: '0 6 * * *'
  reference: {{uri: 's3://north/reference', credentialsSecretRef: {{name: north-data}}}}
  recent: {{uri: 's3://north/recent', credentialsSecretRef: {{name: north-data}}, shards: '40-59'}}
  task: lesion
  image: radfm-trainer:dev
{extra}"
        );
        serde_yaml_ng::from_str(&yaml).unwrap()
    }

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    #[test]
    fn a_looks_pod_runs_radfm_monitor_on_the_deployed_version_named_after_its_scheduled_minute() {
        let mm = monitor("");
        let pod = look_pod(&mm, 7, at(6 * 3600));
        assert_eq!(pod.name_any(), "north-360");
        assert_eq!(pod.labels()[LABEL_MONITOR], "north");
        assert_eq!(pod.labels()[LABEL_VERSION], "7");
        assert_eq!(
            pod.annotations()[ANNOTATION_SCHEDULED],
            "1970-01-01T06:00:00Z"
        );
        let c = pod.spec.unwrap().containers.remove(0);
        let args = c.args.unwrap();
        for pair in [
            ["--version", "7"],
            ["--site", "north"],
            ["--look", "north-360"],
            ["--recent-shards", "40-59"],
            ["--task", "lesion"],
            ["--fields", "manufacturer,sex,age_band"],
            ["--alpha", "0.01"],
            ["--permutations", "999"],
            ["--min-cell", "20"],
            ["--performance-margin", "0.02"],
        ] {
            assert!(args.windows(2).any(|w| w == pair), "{pair:?} in {args:?}");
        }
        assert!(!args.iter().any(|a| a == "--reference-shards"), "{args:?}");
        // One Secret named twice is mounted once.
        let from: Vec<String> = c
            .env_from
            .unwrap()
            .into_iter()
            .map(|f| f.secret_ref.unwrap().name)
            .collect();
        assert_eq!(from, ["registry-s3", "north-data"]);
        let key = c
            .env
            .unwrap()
            .into_iter()
            .find(|e| e.name == "RADFM_SIGNING_KEY_FILE")
            .unwrap();
        assert_eq!(
            key.value.as_deref(),
            Some("/var/run/radfm/signing-key/ed25519.key")
        );
    }

    #[test]
    fn a_looks_pod_is_restricted_holds_no_api_token_and_mounts_site_data_read_only() {
        let mm = monitor("  dataVolume: {persistentVolumeClaim: {claimName: cxr}}");
        let spec = look_pod(&mm, 7, at(0)).spec.unwrap();
        assert_eq!(spec.automount_service_account_token, Some(false));
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        let c_sc = spec.containers[0].security_context.clone().unwrap();
        assert_eq!(c_sc.allow_privilege_escalation, Some(false));
        let mounts = spec.containers[0].volume_mounts.clone().unwrap();
        let data = mounts.iter().find(|m| m.name == "site-data").unwrap();
        assert_eq!(
            (data.mount_path.as_str(), data.read_only),
            ("/data", Some(true))
        );
    }
}
