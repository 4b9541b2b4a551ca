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

/// One organisation of the federation: its control plane, its operator and its own S3 server
/// (keys no other organisation has).
struct Org {
    name: &'static str,
    cluster: radfm_e2e::Cluster,
    s3: S3Server,
    _operator: radfm_e2e::Operator,
}

const HUB_NS: &str = "hub";
const SITE_NS: &str = "hospital";
const ROUNDS: u32 = 3;

impl Org {
    /// Starts the organisation's control plane and operator; the operator reads the exchange
    /// (on `exchange`'s server) with `exchange_env`, the cluster's allowances cover it.
    async fn start(
        name: &'static str,
        ns: &str,
        exchange_env: &[(String, String)],
        extra: &[&str],
    ) -> Org {
        let s3 = S3Server::start_owned_by(name).unwrap();
        // The organisation's own bucket, named after it.
        std::fs::create_dir_all(s3.bucket_dir().with_file_name(name)).unwrap();
        let cluster = radfm_e2e::Cluster::start(1, 0).await.unwrap();
        std::mem::forget(cluster.namespace(ns).await.unwrap());
        let env: Vec<(&str, &str)> = exchange_env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let operator = cluster
            .start_operator_with_env(ns, &format!("operator-{name}"), extra, &env)
            .unwrap();
        Org {
            name,
            cluster,
            s3,
            _operator: operator,
        }
    }

    fn env(&self) -> Vec<(String, String)> {
        self.s3.env()
    }

    /// A Secret of `pairs` in `ns`.
    fn secret(&self, ns: &str, name: &str, pairs: &[(String, String)]) {
        let mut args = vec![
            "create".to_string(),
            "secret".into(),
            "generic".into(),
            name.into(),
            "-n".into(),
            ns.into(),
        ];
        args.extend(pairs.iter().map(|(k, v)| format!("--from-literal={k}={v}")));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.cluster.kubectl_ok(&args).unwrap();
    }

    fn apply(&self, ns: &str, yaml: &str) {
        let out = self
            .cluster
            .kubectl_stdin(&["apply", "-n", ns, "-f", "-"], Some(yaml));
        assert!(
            out.status.success(),
            "{}: kubectl apply: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Plays the kubelet for every Running pod of `ns` not played yet; returns what the
    /// contribute pods printed.
    async fn play_pods(
        &self,
        ns: &str,
        dir: &Path,
        played: &mut std::collections::BTreeSet<String>,
    ) -> Vec<String> {
        let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
            kube::Api::namespaced(self.cluster.client.clone(), ns);
        let mut printed = Vec::new();
        for pod in pods.list(&Default::default()).await.unwrap() {
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
            if !running || !played.insert(uid) {
                continue;
            }
            let name = pod.metadata.name.clone().unwrap_or_default();
            let out = radfm_e2e::kubelet::play(
                &self.cluster,
                &pod,
                dir,
                &[("RADFM_MASTER_ADDR", "127.0.0.1")],
            )
            .await
            .unwrap();
            assert!(
                out.status.success(),
                "{}: pod {name}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
            if name.ends_with("-contribute") {
                printed.push(String::from_utf8_lossy(&out.stdout).trim().to_string());
            }
        }
        printed
    }
}

fn federated_training_yaml(exchange: &str, public: &BTreeMap<String, String>) -> String {
    format!(
        "apiVersion: radfm.io/v1alpha1
kind: FederatedTraining
metadata: {{name: cxr}}
spec:
  baseModel: {{registered: {{model: chest}}}}
  registry: s3://radfm/registry
  register: {{model: chest}}
  exchange: {{uri: '{exchange}', credentialsSecretRef: {{name: hub-store}}}}
  signingKeySecretRef: {{name: hub-key}}
  sites:
  - {{name: north, publicKey: {north}}}
  - {{name: south, publicKey: {south}}}
  - {{name: east, publicKey: {east}}}
  rounds: {ROUNDS}
  localSteps: 3
  minSites: 2
  roundDeadlineSeconds: 600
  aggregator: {{kind: TrimmedMean, trimFraction: 0.0}}
  normBound: 1000
  image: radfm/trainer:dev
",
        north = public["north"],
        south = public["south"],
        east = public["east"],
    )
}

fn federated_site_yaml(site: &str, exchange: &str, hub: &str) -> String {
    format!(
        "apiVersion: radfm.io/v1alpha1
kind: FederatedSite
metadata: {{name: cxr}}
spec:
  federation: {HUB_NS}/cxr
  site: {site}
  hubPublicKey: {hub}
  exchange: {{uri: '{exchange}', credentialsSecretRef: {{name: exchange-store}}}}
  signingKeySecretRef: {{name: site-key}}
  dataset: {{uri: 's3://{site}/cxr', credentialsSecretRef: {{name: site-store}}}}
  workspace: 's3://{site}/federated'
  jobTemplate:
    image: radfm/trainer:dev
    workers: {{replicas: 1, gpusPerWorker: 0}}
    model: {{architecture: vit-tiny, imageSize: 64, patchSize: 8}}
    training: {{steps: 1, batchSizePerDevice: 16, learningRate: 0.001, warmupSteps: 1}}
    checkpoint: {{uri: s3://radfm/unused, everySteps: 1000}}
  image: radfm/trainer:dev
  pollIntervalSeconds: 5
"
    )
}

fn site_validator_yaml(site: &str) -> String {
    format!(
        "apiVersion: radfm.io/v1alpha1
kind: SiteValidator
metadata: {{name: chest}}
spec:
  siteId: {site}
  signingKeySecretRef: {{name: site-key}}
  registry: s3://radfm/registry
  registryStore: {{credentialsSecretRef: {{name: exchange-store}}, uriPrefixes: ['s3://radfm']}}
  model: chest
  dataset: {{uri: 's3://{site}/labelled', credentialsSecretRef: {{name: site-store}}}}
  tasks: [{{label: lesion}}]
  pollIntervalSeconds: 5
  image: radfm/trainer:dev
"
    )
}

/// The hub's FederatedTraining, once `done` holds of it (the sites' pods played meanwhile).
async fn drive(
    hub: &Org,
    sites: &[&Org],
    dir: &Path,
    played: &mut std::collections::BTreeSet<String>,
    sent: &mut Vec<String>,
    what: &str,
    done: impl Fn(&radfm_api::federated::FederatedTrainingStatus) -> bool,
) -> radfm_api::federated::FederatedTrainingStatus {
    let fts: kube::Api<radfm_api::federated::FederatedTraining> =
        kube::Api::namespaced(hub.cluster.client.clone(), HUB_NS);
    let start = std::time::Instant::now();
    loop {
        let status = fts.get("cxr").await.unwrap().status.unwrap_or_default();
        if done(&status) {
            return status;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(300),
            "{what}: {status:#?}\n{}",
            hub.cluster.log_tail("operator-hub")
        );
        hub.play_pods(HUB_NS, dir, played).await;
        for site in sites {
            sent.extend(site.play_pods(SITE_NS, dir, played).await);
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// Hub and sites on their own control planes, S3 servers and keys: the FederatedTraining
/// publishes, each FederatedSite fetches, trains with a local TrainingJob and uploads; a silent
/// listed site makes round 1 close at its deadline; its forged and replayed uploads are refused
/// with their reasons in the status; three rounds end in a result every site sees.
#[tokio::test(flavor = "multi_thread")]
async fn a_hub_and_two_hospital_clusters_federate_three_rounds_through_their_resources() {
    let _serial = radfm_e2e::serial().await;
    let dir = tempfile::tempdir().unwrap();
    let clock = dir.path().join("hub-clock");
    let t0 = jiff::Timestamp::now();
    std::fs::write(&clock, t0.to_string()).unwrap();
    let hub_s3 = S3Server::start_owned_by("hub").unwrap();
    let exchange_env = hub_s3.env();
    let exchange = "s3://radfm/exchange";
    let hub = Org::start(
        "hub",
        HUB_NS,
        &exchange_env,
        &["--clock-file", clock.to_str().unwrap()],
    )
    .await;
    // The hub's store is the exchange's (the registry side of the hub).
    let hub = Org { s3: hub_s3, ..hub };
    let north = Org::start("north", SITE_NS, &exchange_env, &[]).await;
    let south = Org::start("south", SITE_NS, &exchange_env, &[]).await;
    let (keys, public) = keygen(dir.path(), &["hub", "north", "south", "east"]);
    let key_of = |who: &str| std::fs::read_to_string(keys.join(format!("{who}.key"))).unwrap();

    // The base model: a short run of the real trainer on the hub's own store.
    let hub_env: Vec<(&str, &str)> = exchange_env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let sample = radfm_e2e::repo_root().join("manifests/samples/trainingjob-local.yaml");
    radfm_e2e::ok(&radfm_e2e::radfm(
        &[
            "run",
            sample.to_str().unwrap(),
            "--workers",
            "1",
            "--steps",
            "1",
            "--dataset",
            &format!("file://{}/hub-cohort", dir.path().display()),
            "--checkpoint",
            "s3://radfm/base-ckpt",
            "--synth-samples",
            "64",
            "--quiet",
        ],
        &hub_env,
    ));
    // ... exported and registered as production v1, the federation's base.
    let hub_radfm = |args: &[&str]| radfm_e2e::ok(&radfm_e2e::radfm(args, &hub_env));
    hub_radfm(&["export", "s3://radfm/base-ckpt", "s3://radfm/models/base"]);
    hub_radfm(&[
        "registry",
        "register",
        "s3://radfm/registry",
        "chest",
        "--export",
        "s3://radfm/models/base",
        "--alias",
        "production",
        "--reason",
        "the hub's base model",
    ]);
    // Each hospital's images, on its own server only.
    for (i, site) in [&north, &south].iter().enumerate() {
        let env = site.env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        radfm_e2e::ok(&radfm_e2e::radfm(
            &[
                "synth",
                "--out",
                &format!("s3://{}/cxr", site.name),
                "--samples",
                "96",
                "--size",
                "64",
                "--sites",
                site.name,
                "--seed",
                &(20 + i).to_string(),
                "--shard-mib",
                "0.5",
            ],
            &env,
        ));
        // Labelled images for validation, also only at the site.
        radfm_e2e::ok(&radfm_e2e::radfm(
            &[
                "synth",
                "--out",
                &format!("s3://{}/labelled", site.name),
                "--samples",
                "200",
                "--size",
                "64",
                "--sites",
                site.name,
                "--seed",
                &(40 + i).to_string(),
                "--lesion-radius",
                "0.15,0.25",
                "--shard-mib",
                "0.5",
            ],
            &env,
        ));
        let pairs = [("ed25519.key".to_string(), key_of(site.name))];
        site.secret(SITE_NS, "site-key", &pairs);
        site.secret(SITE_NS, "site-store", &site.env());
        site.secret(SITE_NS, "exchange-store", &exchange_env);
        site.apply(
            SITE_NS,
            &federated_site_yaml(site.name, exchange, &public["hub"]),
        );
    }
    hub.secret(HUB_NS, "hub-key", &[("ed25519.key".into(), key_of("hub"))]);
    hub.secret(HUB_NS, "hub-store", &exchange_env);
    // The API server refuses what cannot be run, naming the field.
    let good = federated_training_yaml(exchange, &public);
    let cases = [
        (
            good.replace("minSites: 2", "minSites: 4"),
            "minSites cannot exceed",
        ),
        (
            good.replace("- {name: east,", "- {name: north,"),
            "spec.sites[2]: Duplicate value: {\"name\":\"north\"}",
        ),
        (
            good.replace(
                "register: {model: chest}",
                "register: {model: chest, alias: production}",
            ),
            "register.alias cannot be production",
        ),
        (
            good.replace(
                "kind: TrimmedMean, trimFraction: 0.0",
                "kind: FedAvg, trimFraction: 0.1",
            ),
            "trimFraction applies to the TrimmedMean aggregator only",
        ),
        (
            good.replace(&public["east"], "not-a-key"),
            "spec.sites[2].publicKey",
        ),
        (
            good.replace("  registry: s3://radfm/registry\n", ""),
            "spec.registry is needed",
        ),
    ];
    for (yaml, why) in cases {
        let out = hub.cluster.kubectl_stdin(
            &["apply", "--dry-run=server", "-n", HUB_NS, "-f", "-"],
            Some(&yaml),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(why),
            "{why}: {stderr}"
        );
    }
    hub.apply(HUB_NS, &good);
    // A site cannot train the contrastive objective in rounds: its vocabulary would be its own.
    let contrastive = federated_site_yaml("north", exchange, &public["hub"]).replace(
        "patchSize: 8}",
        "patchSize: 8, objective: {mae: 1, contrastive: 1}}",
    );
    let out = north.cluster.kubectl_stdin(
        &["apply", "--dry-run=server", "-n", SITE_NS, "-f", "-"],
        Some(&contrastive),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("federated rounds train the mae objective only"),
        "{stderr}"
    );

    let mut played = std::collections::BTreeSet::new();
    let mut sent = Vec::new();
    let sites = [&north, &south];
    // Round 1: north and south upload, east never answers; the round waits until its deadline.
    let st = drive(
        &hub,
        &sites,
        dir.path(),
        &mut played,
        &mut sent,
        "round 1 uploads",
        |s| s.round == Some(1) && s.sites.as_deref() == Some("2/3"),
    )
    .await;
    assert_eq!(
        st.phase,
        Some(radfm_api::federated::FederatedPhase::Training)
    );
    std::fs::write(
        &clock,
        (t0 + jiff::SignedDuration::from_secs(601)).to_string(),
    )
    .unwrap();
    let st = drive(
        &hub,
        &sites,
        dir.path(),
        &mut played,
        &mut sent,
        "round 2 opens",
        |s| s.round == Some(2),
    )
    .await;
    let r1 = &st.rounds[0];
    let admitted: Vec<&str> = r1.admitted.iter().map(|a| a.site.as_str()).collect();
    assert_eq!(
        admitted,
        ["north", "south"],
        "closed at the deadline with 2 of 3"
    );

    // Round 2: "east" uploads an update signed with north's key.
    let ex_env: Vec<(&str, &str)> = hub_env.clone();
    let fed = format!("{HUB_NS}/cxr");
    let common = ["--exchange", exchange, "--federation", fed.as_str()];
    let global2 = dir.path().join("global2.safetensors");
    radfm_e2e::ok(&radfm_e2e::radfm(
        &[
            &["federate", "fetch"][..],
            &common,
            &["--round", "2", "--hub-key", &public["hub"], "--out"],
            &[global2.to_str().unwrap()],
        ]
        .concat(),
        &ex_env,
    ));
    let north_key = keys.join("north.key").display().to_string();
    radfm_e2e::ok(&radfm_e2e::radfm(
        &[
            &["federate", "contribute"][..],
            &common,
            &[
                "--round",
                "2",
                "--hub-key",
                &public["hub"],
                "--site",
                "east",
            ],
            &[
                "--key-file",
                &north_key,
                "--local",
                global2.to_str().unwrap(),
            ],
            &[
                "--samples",
                "96",
                "--steps",
                "3",
                "--dataset-index-digest",
                "east",
            ],
        ]
        .concat(),
        &ex_env,
    ));
    let st = drive(
        &hub,
        &sites,
        dir.path(),
        &mut played,
        &mut sent,
        "round 3 opens",
        |s| s.round == Some(3),
    )
    .await;
    let r2 = &st.rounds[1];
    assert_eq!(r2.admitted.len(), 2, "{r2:?}");
    assert_eq!(
        (r2.rejected[0].site.as_str(), r2.rejected[0].reason.as_str()),
        ("east", "WrongKey")
    );

    // Round 3: east replays north's signed round-2 upload under its own prefix.
    let bucket = hub.s3.bucket_dir().join("exchange/sites");
    let east3 = bucket.join("east/rounds/00003");
    std::fs::create_dir_all(&east3).unwrap();
    for f in ["update.safetensors", "contribution.json"] {
        std::fs::copy(bucket.join("north/rounds/00002").join(f), east3.join(f)).unwrap();
    }
    let st = drive(
        &hub,
        &sites,
        dir.path(),
        &mut played,
        &mut sent,
        "success",
        |s| s.phase == Some(radfm_api::federated::FederatedPhase::Succeeded),
    )
    .await;
    assert_eq!(st.rounds.len(), ROUNDS as usize);
    let r3 = &st.rounds[2];
    assert_eq!(
        (r3.rejected[0].site.as_str(), r3.rejected[0].reason.as_str()),
        ("east", "OtherRound")
    );
    for r in &st.rounds {
        assert!(
            r.admitted
                .iter()
                .all(|a| a.samples == 3 * 16 && a.norm > 0.0),
            "{r:?}"
        );
    }
    assert_eq!(st.result_digest.as_deref(), Some(r3.next_digest.as_str()));
    assert_eq!((st.base_version, st.registered_version), (Some(1), Some(2)));

    // The result is candidate v2 of the registry, from v1, with every round's lineage.
    let lineage = hub_radfm(&[
        "registry",
        "lineage",
        "s3://radfm/registry",
        "chest",
        "candidate",
    ]);
    let lines: Vec<&str> = lineage.lines().collect();
    assert!(
        lines[0].starts_with("chest v2") && lines[0].contains("federated hub/cxr"),
        "{lineage}"
    );
    assert!(lines[1].contains("round 1: north 48 samples"), "{lineage}");
    assert!(lines[2].contains("refused east WrongKey"), "{lineage}");
    assert!(lines[3].contains("refused east OtherRound"), "{lineage}");
    assert!(lines[4].starts_with("  chest v1"), "{lineage}");
    let html = dir.path().join("v2.html");
    hub_radfm(&[
        "report",
        "--registry",
        "s3://radfm/registry",
        "--out",
        html.to_str().unwrap(),
        "chest",
        "2",
    ]);
    let html = std::fs::read_to_string(&html).unwrap();
    assert!(
        html.contains("Federated rounds of v2"),
        "the change-control record"
    );
    assert_eq!(html.matches("<tr class=\"rejected\">").count(), 2);
    assert!(html.contains("refused: WrongKey"));

    // The sites validate candidate v2 on their own labelled images (the hub's store read with
    // the hub's settings, the site's with its own); the hub's PromotionPolicy decides.
    let mut trusted = String::new();
    for site in sites {
        trusted.push_str(&format!(
            "  - {{site: {}, publicKey: {}}}\n",
            site.name, public[site.name]
        ));
        site.apply(SITE_NS, &site_validator_yaml(site.name));
    }
    hub.apply(
        HUB_NS,
        &format!(
            "apiVersion: radfm.io/v1alpha1\nkind: PromotionPolicy\nmetadata: {{name: chest}}\nspec:\n  \
             registry: s3://radfm/registry\n  model: chest\n  task: lesion\n  trustedSites:\n{trusted}  \
             quorum: 2\n  nonInferiorityMargin: 0.5\n  pollIntervalSeconds: 5\n"
        ),
    );
    let policies: kube::Api<radfm_api::site_validation::PromotionPolicy> =
        kube::Api::namespaced(hub.cluster.client.clone(), HUB_NS);
    let start = std::time::Instant::now();
    let decision = loop {
        let pp = policies.get("chest").await.unwrap();
        let last = pp.status.and_then(|s| s.last_decision);
        if let Some(d) = last.filter(|d| d.version == 2 && d.sites.len() == 2) {
            break d;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(300),
            "no decision on v2\n{}",
            hub.cluster.log_tail("operator-hub")
        );
        for site in sites {
            site.play_pods(SITE_NS, dir.path(), &mut played).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    };
    assert_eq!(decision.sites, ["north", "south"], "{decision:?}");
    eprintln!(
        "the gate on federated v2: {} {:?}",
        decision.outcome, decision.reasons
    );
    let printed = hub
        .cluster
        .kubectl_ok(&["get", "ft", "-n", HUB_NS])
        .unwrap();
    assert!(
        printed.contains("ROUND") && printed.contains("Succeeded"),
        "{printed}"
    );
    // GitOps tools judge the finished federation healthy with their own code.
    let live = hub
        .cluster
        .kubectl_ok(&["get", "ft", "cxr", "-n", HUB_NS, "-o", "yaml"])
        .unwrap();
    let judged = radfm_e2e::gitops_health(&live).unwrap().remove(0);
    assert_eq!(
        judged.statuses(),
        ("Current", "Healthy", "Current"),
        "{judged:?}"
    );

    // Every site took part in every round and sees the result.
    for site in sites {
        let fss: kube::Api<radfm_api::federated::FederatedSite> =
            kube::Api::namespaced(site.cluster.client.clone(), SITE_NS);
        let fs = radfm_e2e::wait_object(
            &fss,
            "cxr",
            std::time::Duration::from_secs(60),
            "finished",
            |fs| {
                fs.status.as_ref().and_then(|s| s.phase)
                    == Some(radfm_api::federated::SitePhase::Finished)
            },
        )
        .await;
        let rounds: Vec<u32> = fs
            .status
            .unwrap()
            .contributions
            .iter()
            .map(|c| c.round)
            .collect();
        assert_eq!(rounds, [1, 2, 3], "{}", site.name);
    }
    for line in &sent {
        eprintln!("bytes sent by a site in a round: {line}");
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(v["bytesSent"].as_u64().unwrap() > 0);
    }
    assert_eq!(sent.len(), 6, "two sites, three rounds");

    // Only models, updates and statements are in the exchange; the hub's credentials open no
    // hospital's store.
    for entry in walk(&hub.s3.bucket_dir().join("exchange")) {
        let name = entry.file_name().unwrap().to_string_lossy().to_string();
        assert!(
            name.ends_with(".safetensors") || name.ends_with(".json"),
            "unexpected object in the exchange: {}",
            entry.display()
        );
        assert!(!name.starts_with("shard"), "{}", entry.display());
    }
    let mut hub_at_north = exchange_env.clone();
    for (k, v) in &mut hub_at_north {
        if k == "AWS_ENDPOINT_URL" {
            *v = format!("http://127.0.0.1:{}", north.s3.port);
        }
    }
    let north_store =
        radfm_data::store::Location::open_with("s3://north/cxr", hub_at_north.clone()).unwrap();
    // versitygw answers an unknown access key with 404 (XAdminUserNotFound; AWS says 403):
    // either way, no bytes.
    let refused = north_store.get_opt("index.json").await;
    assert!(
        !matches!(refused, Ok(Some(_))),
        "the hub read north's images"
    );
    // Knowing north's access key without its secret is refused outright.
    for (k, v) in &mut hub_at_north {
        if k == "AWS_ACCESS_KEY_ID" {
            *v = "north-access".into();
        }
    }
    let guessed = radfm_data::store::Location::open_with("s3://radfm/cxr", hub_at_north).unwrap();
    let refused = guessed.get_opt("index.json").await;
    assert!(refused.is_err(), "{refused:?}");
    let own = radfm_data::store::Location::open_with("s3://north/cxr", north.env()).unwrap();
    assert!(own.get_opt("index.json").await.unwrap().is_some());
}
