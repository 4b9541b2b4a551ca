//! End-to-end tests of the model registry on a real S3 server (versitygw): `radfm registry`
//! commands over exported models, and concurrent writers that rely on create-only puts.
#![allow(
    clippy::too_many_lines,
    reason = "a scenario test reads as one story from setup to the last assertion"
)]

use radfm_e2e::{S3Server, repo_root};

/// stdout of a `radfm` command that must succeed.
fn radfm(args: &[&str], env: &[(&str, &str)]) -> String {
    radfm_e2e::ok(&radfm_e2e::radfm(args, env))
}

#[test]
fn versions_aliases_lineage_and_history_on_s3() {
    let s3 = S3Server::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Every write below is signed with this writer's key.
    let keys = dir.path().join("keys");
    let public = radfm(
        &[
            "keygen",
            "--out",
            keys.to_str().unwrap(),
            "--site",
            "writer",
        ],
        &[],
    );
    let key_file = keys.join("writer.key").display().to_string();
    let mut owned = s3.env();
    owned.push((radfm_registry::KEY_FILE_ENV.to_string(), key_file.clone()));
    let env: Vec<(&str, &str)> = owned
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let uri = |p: &str| format!("file://{}/{p}", dir.path().display());
    let sample = repo_root().join("manifests/samples/trainingjob-local.yaml");
    radfm(
        &[
            "run",
            sample.to_str().unwrap(),
            "--workers",
            "1",
            "--steps",
            "2",
            "--dataset",
            &uri("cohort"),
            "--checkpoint",
            &uri("ckpt"),
            "--synth-samples",
            "64",
            "--quiet",
        ],
        &[],
    );
    radfm(&["export", &uri("ckpt"), &uri("model")], &[]);

    let reg = "s3://radfm/registry";
    let export = uri("model");
    assert!(
        radfm(
            &[
                "registry", "register", reg, "cxr", "--export", &export, "--by", "ci"
            ],
            &env
        )
        .contains("registered cxr v1 (candidate)")
    );
    assert!(
        radfm(
            &[
                "registry",
                "register",
                reg,
                "cxr",
                "--export",
                &export,
                "--parent",
                "1",
                "--by",
                "ci",
                "--reason",
                "retrained on new shards"
            ],
            &env
        )
        .contains("registered cxr v2 (candidate)")
    );
    radfm(
        &[
            "registry",
            "promote",
            reg,
            "cxr",
            "1",
            "--expect",
            "0",
            "--reason",
            "first model",
            "--by",
            "alice",
        ],
        &env,
    );
    radfm(
        &[
            "registry",
            "promote",
            reg,
            "cxr",
            "candidate",
            "--expect",
            "1",
            "--reason",
            "gate passed",
            "--by",
            "gate",
        ],
        &env,
    );

    // A promotion based on a stale view is refused, naming where the alias is.
    let out = radfm_e2e::radfm(
        &[
            "registry", "promote", reg, "cxr", "1", "--expect", "1", "--reason", "x",
        ],
        &env,
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("alias production of cxr is at version 2, not version 1"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    radfm(
        &[
            "registry",
            "rollback",
            reg,
            "cxr",
            "--reason",
            "site B regression",
            "--by",
            "oncall",
        ],
        &env,
    );
    let list = radfm(&["registry", "list", reg, "cxr"], &env);
    let rows: Vec<Vec<&str>> = list
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows[0].last(), Some(&"production"), "{list}");
    assert_eq!(rows[1].last(), Some(&"candidate"), "{list}");

    let shown: serde_json::Value =
        serde_json::from_str(&radfm(&["registry", "show", reg, "cxr", "2"], &env)).unwrap();
    assert_eq!(shown["parent"], 1);
    assert_eq!(shown["data"]["index_uri"], uri("cohort"));
    assert_eq!(shown["data"]["shards"].as_array().unwrap().len(), 1);
    assert_eq!(shown["weights_sha256"].as_str().unwrap().len(), 64);
    let lineage = radfm(&["registry", "lineage", reg, "cxr", "candidate"], &env);
    assert!(
        lineage.lines().next().unwrap().starts_with("cxr v2"),
        "{lineage}"
    );
    assert!(
        lineage.lines().nth(1).unwrap().starts_with("  cxr v1"),
        "{lineage}"
    );
    let history = radfm(&["registry", "history", reg, "cxr"], &env);
    let last = history.lines().last().unwrap();
    assert!(
        last.contains("oncall")
            && last.contains("production: v2 -> v1")
            && last.ends_with("site B regression"),
        "{history}"
    );
    assert_eq!(radfm(&["registry", "list", reg], &env).trim(), "cxr");

    // The history is a signed chain: intact as written; an edit by someone with bucket access
    // (the reason of the first promotion rewritten) is found, and `verify` fails.
    let verify = || {
        radfm_e2e::radfm(
            &[
                "registry",
                "verify",
                reg,
                "cxr",
                "--trusted-key",
                public.trim(),
            ],
            &env,
        )
    };
    let verified = radfm_e2e::ok(&verify());
    assert!(verified.contains("chain intact"), "{verified}");
    let event = s3
        .bucket_dir()
        .join("registry/models/cxr/events/000000005.json");
    let text = std::fs::read_to_string(&event).unwrap();
    assert!(text.contains("first model"), "{text}");
    std::fs::write(&event, text.replace("first model", "approved by the board")).unwrap();
    let out = verify();
    assert_eq!(out.status.code(), Some(1));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("event 5: its signature does not match")
            && said.contains("event 6: its link does not match"),
        "{said}"
    );
}

/// Needs an S3 server that honours `If-None-Match: *` (AWS S3 since 2024, MinIO, versitygw, the
/// test server); on one that ignores it (s3s-fs 0.14) this test shows versions overwritten.
#[test]
fn concurrent_registrations_on_s3_get_distinct_gapless_versions() {
    let s3 = S3Server::start().unwrap();
    for (k, v) in s3.env() {
        // SAFETY: set before any thread of this test reads the environment.
        unsafe { std::env::set_var(k, v) };
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let r = radfm_registry::Registry::open("s3://radfm/concurrent").unwrap();
    let handles: Vec<_> = (0..6)
        .map(|i| {
            let r = r.clone();
            rt.spawn(async move {
                let spec = radfm_registry::NewVersion {
                    weights_uri: format!("s3://radfm/models/{i}"),
                    ..Default::default()
                };
                r.register("cxr", spec, &format!("writer-{i}"), "race", None)
                    .await
                    .unwrap()
                    .version
            })
        })
        .collect();
    let mut got: Vec<u64> = rt.block_on(async {
        let mut v = Vec::new();
        for h in handles {
            v.push(h.await.unwrap());
        }
        v
    });
    got.sort_unstable();
    assert_eq!(got, (1..=6).collect::<Vec<_>>());
    let log = rt.block_on(r.events("cxr")).unwrap();
    assert_eq!(log.len(), 6);
    let uris: std::collections::BTreeSet<String> = rt
        .block_on(r.versions("cxr"))
        .unwrap()
        .into_iter()
        .map(|v| v.spec.weights_uri)
        .collect();
    assert_eq!(uris.len(), 6, "a version was overwritten");
}
