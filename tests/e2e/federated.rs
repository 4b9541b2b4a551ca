//! Federated rounds through an exchange on a real S3 server (versitygw), driven by the `radfm
//! federate` commands a hub and its sites run: hub-signed global models, signed site updates,
//! a refused impostor, the norm bound, two rounds with FedAvg then a robust aggregator, and the
//! bytes each site sends.
#![allow(
    clippy::too_many_lines,
    reason = "a scenario test reads as one story from setup to the last assertion"
)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use radfm_e2e::S3Server;
use radfm_federated::weights::{Precision, Tensor, Weights};

const EXCHANGE: &str = "s3://radfm/federation/exchange";
const FEDERATION: &str = "hub/cxr";
/// Two training rounds of 10 local steps each.
const SCHEDULE: [&str; 6] = [
    "--last-round",
    "2",
    "--local-steps",
    "10",
    "--norm-bound",
    "5",
];
/// One round of the real trainer: its updates are far larger than the toy models'.
const TRAINED_SCHEDULE: [&str; 6] = [
    "--last-round",
    "1",
    "--local-steps",
    "2",
    "--norm-bound",
    "1000",
];

fn model(path: &Path, values: Vec<f32>) {
    let w = Weights(
        [(
            "encoder.blocks.0.w".to_string(),
            Tensor {
                shape: vec![values.len()],
                values,
            },
        )]
        .into_iter()
        .collect(),
    );
    std::fs::write(path, w.to_safetensors(Precision::F32).unwrap()).unwrap();
}

/// `radfm keygen` for each of `who` into `dir`/keys: the folder, and each one's public key.
fn keygen(dir: &Path, who: &[&str]) -> (PathBuf, BTreeMap<String, String>) {
    let keys = dir.join("keys");
    let public = who
        .iter()
        .map(|w| {
            let out = radfm_e2e::radfm(
                &["keygen", "--out", keys.to_str().unwrap(), "--site", w],
                &[],
            );
            (w.to_string(), radfm_e2e::ok(&out).trim().to_string())
        })
        .collect();
    (keys, public)
}

fn values(path: &Path) -> Vec<f32> {
    let w = Weights::from_safetensors(&std::fs::read(path).unwrap(), "model").unwrap();
    w.0["encoder.blocks.0.w"].values.clone()
}

#[test]
fn a_hub_and_three_sites_run_two_signed_rounds_through_s3() {
    let s3 = S3Server::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let owned = s3.env();
    let env: Vec<(&str, &str)> = owned
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let run = |args: &[&str]| radfm_e2e::radfm(args, &env);
    let ok = |args: &[&str]| radfm_e2e::ok(&run(args));
    let (keys, public) = keygen(dir.path(), &["hub", "a", "b", "c"]);
    let key = |who: &str| keys.join(format!("{who}.key")).display().to_string();
    let common = ["--exchange", EXCHANGE, "--federation", FEDERATION];
    let base = dir.path().join("base.safetensors");
    model(&base, vec![1.0; 8]);
    let published = ok(&[
        &["federate", "publish"][..],
        &common,
        &["--model", base.to_str().unwrap(), "--key-file", &key("hub")],
        &SCHEDULE,
    ]
    .concat());
    assert!(published.contains("\"round\":1"), "{published}");

    // Each site trains from the global model (here: its weights moved by a site-specific step).
    let contribute = |site: &str, signer: &str, round: u32, local: &Path| {
        run(&[
            &["federate", "contribute"][..],
            &common,
            &[
                "--round",
                &round.to_string(),
                "--hub-key",
                &public["hub"],
                "--site",
                site,
                "--key-file",
                &key(signer),
                "--local",
                local.to_str().unwrap(),
                "--samples",
                "100",
                "--steps",
                "10",
                "--dataset-index-digest",
                &format!("{site}-index"),
                "--norm-bound",
                "4",
                "--precision",
                "bf16",
            ],
        ]
        .concat())
    };
    let local = |name: &str, v: f32| {
        let p = dir.path().join(format!("{name}.safetensors"));
        model(&p, vec![v; 8]);
        p
    };
    let sent = radfm_e2e::ok(&contribute("a", "a", 1, &local("a1", 1.5)));
    let sent: serde_json::Value = serde_json::from_str(sent.trim()).unwrap();
    assert!(sent["bytesSent"].as_u64().unwrap() > 0);
    eprintln!(
        "bytes sent per site per round (8 bf16 values + statement): {}",
        sent["bytesSent"]
    );
    radfm_e2e::ok(&contribute("b", "b", 1, &local("b1", 0.5)));
    // An impostor signs for c with a's key; and c's weights moved far: the site clips them.
    radfm_e2e::ok(&contribute("c", "a", 1, &local("c1", 100.0)));
    let twice = contribute("a", "a", 1, &local("a1b", 2.0));
    assert!(!twice.status.success(), "one upload per site and round");
    assert!(String::from_utf8_lossy(&twice.stderr).contains("already contributed"));
    // A site checks the hub's signature: a wrong hub key is refused.
    let mut forged = common.to_vec();
    forged.extend([
        "--round",
        "1",
        "--hub-key",
        &public["a"],
        "--site",
        "b",
        "--key-file",
    ]);
    let kb = key("b");
    let lb = local("b1x", 0.5);
    forged.extend([
        kb.as_str(),
        "--local",
        lb.to_str().unwrap(),
        "--samples",
        "1",
        "--steps",
        "1",
        "--dataset-index-digest",
        "x",
        "--norm-bound",
        "4",
    ]);
    let refused = run(&[&["federate", "contribute"][..], &forged].concat());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("not the hub's"),
        "{refused:?}"
    );

    let site_args: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|s| format!("{s}={}", public[*s]))
        .collect();
    let aggregate = |round: &str, aggregator: &str| {
        let mut args: Vec<&str> = vec!["federate", "aggregate"];
        args.extend(common);
        args.extend(SCHEDULE);
        args.extend([
            "--round",
            round,
            "--min-sites",
            "2",
            "--aggregator",
            aggregator,
        ]);
        let hub_key = key("hub");
        for s in &site_args {
            args.extend(["--site", s.as_str()]);
        }
        args.extend(["--key-file", hub_key.as_str()]);
        let out = ok(&args);
        serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()
    };
    let r1 = aggregate("1", "fedavg");
    let admitted: Vec<&str> = r1["admitted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["site"].as_str().unwrap())
        .collect();
    assert_eq!(admitted, ["a", "b"]);
    assert_eq!(r1["rejected"][0]["site"], "c");
    assert_eq!(r1["rejected"][0]["reason"], "WrongKey");
    // Round 2 opens with 1 + mean(0.5, -0.5) = 1.0 per value.
    let global2 = s3
        .bucket_dir()
        .join("federation/exchange/rounds/00002/global.safetensors");
    for v in values(&global2) {
        assert!((v - 1.0).abs() < 1e-2, "{v}");
    }

    // Round 2 with a robust aggregator: two honest sites near +0.5 and one far off.
    radfm_e2e::ok(&contribute("a", "a", 2, &local("a2", 1.5)));
    radfm_e2e::ok(&contribute("b", "b", 2, &local("b2", 1.4)));
    radfm_e2e::ok(&contribute("c", "c", 2, &local("c2", -50.0)));
    let r2 = aggregate("2", "median");
    assert_eq!(r2["admitted"].as_array().unwrap().len(), 3);
    let status = ok(&[
        &["federate", "status"][..],
        &common,
        &[
            "--hub-key",
            &public["hub"],
            "--site",
            "a",
            "--site",
            "b",
            "--site",
            "c",
        ],
    ]
    .concat());
    assert!(
        status.contains("round 1") && status.contains("round 3"),
        "{status}"
    );
    assert!(
        status.lines().nth(1).unwrap().ends_with("a,b,c"),
        "{status}"
    );

    // Only models and updates ever enter the exchange.
    let exchange = s3.bucket_dir().join("federation/exchange");
    for entry in walk(&exchange) {
        let name = entry.file_name().unwrap().to_string_lossy().to_string();
        assert!(
            name.ends_with(".safetensors") || name.ends_with(".json"),
            "unexpected object in the exchange: {}",
            entry.display()
        );
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The real trainer in the loop: the hub's base model comes from a checkpoint, each site fetches
/// the round's model, trains from it on its own synthetic cohort (every variable: encoder and
/// decoder) and contributes its newest checkpoint; the hub aggregates and opens round 2.
#[test]
fn sites_train_the_global_model_with_the_real_trainer_and_the_hub_aggregates() {
    let s3 = S3Server::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let owned = s3.env();
    let env: Vec<(&str, &str)> = owned
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let ok = |args: &[&str]| radfm_e2e::ok(&radfm_e2e::radfm(args, &env));
    let (keys, public) = keygen(dir.path(), &["hub", "north", "south"]);
    let key = |who: &str| keys.join(format!("{who}.key")).display().to_string();
    let uri = |p: &str| format!("file://{}/{p}", dir.path().display());
    let sample = radfm_e2e::repo_root().join("manifests/samples/trainingjob-local.yaml");
    let train = |yaml: &Path, name: &str, steps: &str| {
        ok(&[
            "run",
            yaml.to_str().unwrap(),
            "--workers",
            "1",
            "--steps",
            steps,
            "--dataset",
            &uri(&format!("{name}-cohort")),
            "--checkpoint",
            &uri(&format!("{name}-ckpt")),
            "--synth-samples",
            "64",
            "--quiet",
        ]);
    };
    let common = ["--exchange", EXCHANGE, "--federation", FEDERATION];

    train(&sample, "hub", "1");
    ok(&[
        &["federate", "publish"][..],
        &common,
        &["--model", &uri("hub-ckpt"), "--key-file", &key("hub")],
        &TRAINED_SCHEDULE,
    ]
    .concat());

    for site in ["north", "south"] {
        let global = dir.path().join(format!("{site}-global.safetensors"));
        ok(&[
            &["federate", "fetch"][..],
            &common,
            &[
                "--round",
                "1",
                "--hub-key",
                &public["hub"],
                "--out",
                global.to_str().unwrap(),
            ],
        ]
        .concat());
        let yaml = dir.path().join(format!("{site}.yaml"));
        let text = std::fs::read_to_string(&sample).unwrap().replace(
            "    patchSize: 8\n",
            &format!(
                "    patchSize: 8\n    initFrom: file://{}\n",
                global.display()
            ),
        );
        std::fs::write(&yaml, text).unwrap();
        train(&yaml, site, "2");
        ok(&[
            &["federate", "contribute"][..],
            &common,
            &[
                "--round",
                "1",
                "--hub-key",
                &public["hub"],
                "--site",
                site,
                "--key-file",
                &key(site),
                "--local",
                &uri(&format!("{site}-ckpt")),
            ],
        ]
        .concat());
    }
    let mut args: Vec<String> = ["federate", "aggregate"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(common.iter().map(|s| s.to_string()));
    args.extend(TRAINED_SCHEDULE.map(String::from));
    args.extend(["--round", "1", "--min-sites", "2", "--key-file"].map(String::from));
    args.push(key("hub"));
    for site in ["north", "south"] {
        args.extend(["--site".to_string(), format!("{site}={}", public[site])]);
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out: serde_json::Value = serde_json::from_str(ok(&refs).trim()).unwrap();
    assert_eq!(out["admitted"].as_array().unwrap().len(), 2, "{out}");
    let norms: Vec<f64> = out["admitted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["norm"].as_f64().unwrap())
        .collect();
    assert!(
        norms.iter().all(|n| *n > 0.0),
        "both sites trained: {norms:?}"
    );
    // What each site declared came from its checkpoint: 2 steps, its samples, its index.
    for a in out["admitted"].as_array().unwrap() {
        assert_eq!(a["steps"], 2, "{a}");
        assert!(a["samples"].as_u64().unwrap() >= 2, "{a}");
        assert_eq!(a["datasetIndexDigest"].as_str().unwrap().len(), 64, "{a}");
        assert!(a["localLoss"].as_f64().unwrap() > 0.0, "{a}");
    }

    let exchange = s3.bucket_dir().join("federation/exchange/rounds");
    let base = Weights::from_safetensors(
        &std::fs::read(exchange.join("00001/global.safetensors")).unwrap(),
        "1",
    )
    .unwrap();
    let next = Weights::from_safetensors(
        &std::fs::read(exchange.join("00002/global.safetensors")).unwrap(),
        "2",
    )
    .unwrap();
    base.check_same_layout(&next, "round 2").unwrap();
    assert!(
        base.0.keys().any(|k| k.starts_with("decoder")),
        "the decoder is federated too"
    );
    assert!(next.minus(&base, "step").unwrap().norm() > 0.0);
}
