//! End to end: decentralised validation on the real control plane with the registry on the S3
//! server. Three synthetic hospitals (site-c with a strongly shifted scanner) keep their labelled
//! data in their own folders; models are trained by the real trainer; SiteValidators make the
//! operator create validation pods, which this test runs with exactly their command, arguments,
//! environment and mounted key Secret (kwok runs no containers); the PromotionPolicy's gate
//! decides from the signed reports.
#![allow(
    clippy::too_many_lines,
    reason = "a scenario test reads as one story from setup to the last assertion"
)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::Api;
use radfm_api::site_validation::{PromotionPolicy, SiteValidator};
use radfm_e2e::{Cluster, S3Server, serial, wait_until};
use radfm_registry::Registry;
use radfm_validation::report::{self, Signed};

const WAIT: Duration = Duration::from_secs(120);
const SITES: [&str; 3] = ["site-a", "site-b", "site-c"];
const NS: &str = "validation";
const REGISTRY: &str = "s3://radfm/registry";

struct World<'a> {
    cluster: &'a Cluster,
    dir: PathBuf,
    env: Vec<(String, String)>,
}

impl World<'_> {
    fn path(&self, sub: &str) -> PathBuf {
        self.dir.join(sub)
    }

    fn uri(&self, sub: &str) -> String {
        format!("file://{}", self.path(sub).display())
    }

    fn env(&self) -> Vec<(&str, &str)> {
        self.env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    fn radfm(&self, args: &[&str]) -> String {
        radfm_e2e::ok(&radfm_e2e::radfm(args, &self.env()))
    }

    fn synth(&self, out: &str, sites: &str, shift: Option<&str>, samples: usize, seed: u64) {
        let mut args = vec![
            "synth".to_string(),
            "--out".into(),
            self.uri(out),
            "--samples".into(),
            samples.to_string(),
            "--size".into(),
            "32".into(),
            "--sites".into(),
            sites.into(),
            "--seed".into(),
            seed.to_string(),
            "--lesion-radius".into(),
            "0.15,0.25".into(),
            "--lesion-prevalence".into(),
            "0.4".into(),
            "--shard-mib".into(),
            "0.2".into(),
        ];
        if let Some(s) = shift {
            args.extend(["--shift-site".into(), s.into()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.radfm(&args);
    }

    /// Trains with the real trainer and exports to the S3 registry's models area.
    fn train(&self, name: &str, data: &str, steps: u32, lr: f64, init: Option<&str>) -> String {
        let export = format!("s3://radfm/models/{name}");
        let init = init.map_or(String::new(), |i| format!(", initFrom: \"{i}\""));
        let job = format!(
            "apiVersion: radfm.io/v1alpha1\nkind: TrainingJob\nmetadata: {{name: {name}}}\nspec:\n  image: local\n  \
             workers: {{replicas: 1, gpusPerWorker: 0}}\n  dataset: {{uri: \"{data}\"}}\n  \
             model: {{imageSize: 32, patchSize: 8{init}}}\n  \
             training: {{steps: {steps}, batchSizePerDevice: 32, learningRate: {lr}, warmupSteps: 10}}\n  \
             checkpoint: {{uri: \"s3://radfm/ckpt/{name}\", everySteps: 1000}}\n  export: {{uri: \"{export}\"}}\n",
            data = self.uri(data),
        );
        radfm_e2e::train_locally(&job, &self.dir, name, &self.env());
        export
    }

    fn apply(&self, yaml: &str) {
        let out = self
            .cluster
            .kubectl_stdin(&["apply", "-n", NS, "-f", "-"], Some(yaml));
        assert!(
            out.status.success(),
            "kubectl apply: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn policy(&self) -> Api<PromotionPolicy> {
        Api::namespaced(self.cluster.client.clone(), NS)
    }

    /// Waits for a decision on `version` counting `sites` site reports.
    async fn wait_decision(&self, version: i64, outcome: &str, sites: usize) -> PromotionPolicy {
        let what = format!("decision {outcome} on v{version} from {sites} sites");
        wait_until(WAIT, &what, || async {
            let pp = self.policy().get_opt("chest").await.ok()??;
            let d = pp.status.as_ref()?.last_decision.as_ref()?;
            (d.version == version && d.outcome == outcome && d.sites.len() == sites).then_some(pp)
        })
        .await
        .unwrap()
    }

    /// Plays the kubelet for the validation pod of `site` and `version`: runs its container's
    /// command with its arguments and environment, the key Secret mounted where the pod mounts
    /// it, then reports the exit.
    async fn run_validation_pod(&self, site: &str, version: u64) {
        let pods: Api<Pod> = Api::namespaced(self.cluster.client.clone(), NS);
        let name = format!("{site}-v{version}");
        let pod = wait_until(WAIT, &format!("running pod {name}"), || async {
            let p = pods.get_opt(&name).await.ok()??;
            (p.status.as_ref()?.phase.as_deref() == Some("Running")).then_some(p)
        })
        .await
        .unwrap();
        let spec = pod.spec.as_ref().unwrap();
        let c = &spec.containers[0];
        let secrets: Api<Secret> = Api::namespaced(self.cluster.client.clone(), NS);
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        for from in c.env_from.iter().flatten() {
            let s = secrets
                .get(&from.secret_ref.as_ref().unwrap().name)
                .await
                .unwrap();
            for (k, v) in s.data.unwrap_or_default() {
                env.insert(k, String::from_utf8(v.0).unwrap());
            }
        }
        // The key Secret, mounted as the pod would have it.
        let mount = &c.volume_mounts.as_ref().unwrap()[0];
        let secret_name = spec.volumes.as_ref().unwrap()[0]
            .secret
            .as_ref()
            .unwrap()
            .secret_name
            .clone()
            .unwrap();
        let mounted = self.path(&format!("mounts/{name}"));
        std::fs::create_dir_all(&mounted).unwrap();
        for (k, v) in secrets
            .get(&secret_name)
            .await
            .unwrap()
            .data
            .unwrap_or_default()
        {
            std::fs::write(mounted.join(k), v.0).unwrap();
        }
        for e in c.env.iter().flatten() {
            let v = e.value.clone().unwrap_or_default();
            let v = v.replace(&mount.mount_path, &mounted.display().to_string());
            env.insert(e.name.clone(), v);
        }
        assert_eq!(c.command.as_ref().unwrap(), &["/usr/local/bin/radfm"]);
        let out = std::process::Command::new(radfm_e2e::workspace_bin("radfm").unwrap())
            .args(c.args.iter().flatten())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RADFM_THREADS", "2")
            .envs(&env)
            .output()
            .unwrap();
        let code = out.status.code().unwrap_or(1);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.cluster
            .end_pod(NS, &name, code, "Completed")
            .await
            .unwrap();
    }

    async fn wait_validated(&self, site: &str, version: i64) {
        let svs: Api<SiteValidator> = Api::namespaced(self.cluster.client.clone(), NS);
        radfm_e2e::wait_object(&svs, site, WAIT, &format!("validated v{version}"), |sv| {
            sv.status
                .as_ref()
                .is_some_and(|st| st.last_validated_version == Some(version))
        })
        .await;
    }
}

fn site_validator(site: &str, dataset: &str) -> String {
    format!(
        r#"apiVersion: radfm.io/v1alpha1
kind: SiteValidator
metadata: {{name: {site}}}
spec:
  siteId: {site}
  signingKeySecretRef: {{name: {site}-key}}
  registry: "{REGISTRY}"
  credentialsSecretRef: {{name: registry-s3}}
  model: chest
  dataset: {{uri: "{dataset}"}}
  tasks: [{{label: lesion}}]
  subgroups: [sex, age_band, manufacturer]
  minCellSize: 40
  pollIntervalSeconds: 5
  image: radfm/trainer:test
"#
    )
}

fn parse_html(html: &Path) -> serde_json::Value {
    // Parsed by Python's HTML parser: the decision, every reason and every figure's id.
    let script = r#"
import json, sys
from html.parser import HTMLParser
class P(HTMLParser):
    def __init__(self):
        super().__init__(); self.stack=[]; self.out={"outcome":None,"reasons":[],"svg":[],"signatures":[],"bias":[],"looks":[]}
    def handle_starttag(self, tag, attrs):
        a=dict(attrs); self.stack.append((tag,a))
        if tag=="svg": self.out["svg"].append(a.get("id"))
        if tag=="tr" and "data-cell" in a: self.out["bias"].append([a["data-site"],a["data-cell"]])
        if tag=="td" and "data-verdict" in a: self.out["looks"].append(a["data-verdict"])
    def handle_endtag(self, tag):
        while self.stack and self.stack.pop()[0]!=tag: pass
    def handle_data(self, data):
        if not self.stack: return
        tag,a=self.stack[-1]
        if "outcome" in a.get("class",""): self.out["outcome"]=data.strip()
        if tag=="li" and "data-code" in a: self.out["reasons"].append({"code":a["data-code"],"site":a["data-site"],"subgroup":a["data-subgroup"],"text":data})
        if "signature" in a.get("class",""): self.out["signatures"].append(data.strip())
p=P(); p.feed(open(sys.argv[1],encoding="utf-8").read()); print(json.dumps(p.out))
"#;
    let out = std::process::Command::new(radfm_e2e::python())
        .args(["-c", script])
        .arg(html)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn site_reports_gate_promotion_reject_regressions_and_refuse_forged_tampered_or_replayed_reports()
 {
    let _serial = serial().await;
    let s3 = S3Server::start().unwrap();
    let cluster = Cluster::start(1, 0).await.unwrap();
    let _ns = cluster.namespace(NS).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let w = World {
        cluster: &cluster,
        dir: dir.path().to_path_buf(),
        env: s3.env(),
    };
    for (k, v) in s3.env() {
        // SAFETY: set before this test starts any thread that reads the environment.
        unsafe { std::env::set_var(k, v) };
    }
    let env = w.env();
    let _op = cluster
        .start_operator_with_env(NS, "operator-validation", &[], &env)
        .unwrap();

    // Each hospital's labelled images stay in its own folder; site-c's scanner is shifted.
    for (i, site) in SITES.iter().enumerate() {
        let shift = (*site == "site-c").then_some("site-c");
        w.synth(site, site, shift, 300, 11 + i as u64);
    }
    w.synth("pool-all", "site-a,site-b,site-c", Some("site-c"), 1200, 5);
    w.synth("pool-ab", "site-a,site-b", None, 1200, 6);

    // Production v1 trained on every site; registered and promoted by hand (the first version).
    let base = w.train("base", "pool-all", 300, 0.001, None);
    w.radfm(&[
        "registry",
        "register",
        REGISTRY,
        "chest",
        "--export",
        &base,
        "--reason",
        "first model",
    ]);
    w.radfm(&[
        "registry",
        "promote",
        REGISTRY,
        "chest",
        "1",
        "--reason",
        "initial release",
    ]);

    // Keys: each site's Secret; the policy trusts the three public keys.
    let mut trusted = String::new();
    for site in SITES {
        let public = w.radfm(&[
            "keygen",
            "--out",
            &w.path("keys").display().to_string(),
            "--site",
            site,
        ]);
        trusted.push_str(&format!(
            "  - {{site: {site}, publicKey: {}}}\n",
            public.trim()
        ));
        cluster
            .kubectl_ok(&[
                "create",
                "secret",
                "generic",
                &format!("{site}-key"),
                "-n",
                NS,
                &format!(
                    "--from-file=ed25519.key={}",
                    w.path(&format!("keys/{site}.key")).display()
                ),
            ])
            .unwrap();
    }
    let mut literal: Vec<String> = vec![
        "create".into(),
        "secret".into(),
        "generic".into(),
        "registry-s3".into(),
        "-n".into(),
        NS.into(),
    ];
    for (k, v) in &w.env {
        literal.push(format!("--from-literal={k}={v}"));
    }
    cluster
        .kubectl_ok(&literal.iter().map(String::as_str).collect::<Vec<_>>())
        .unwrap();
    let policy = format!(
        "apiVersion: radfm.io/v1alpha1\nkind: PromotionPolicy\nmetadata: {{name: chest}}\nspec:\n  registry: \"{REGISTRY}\"\n  model: chest\n  task: lesion\n  trustedSites:\n{trusted}  quorum: 3\n  nonInferiorityMargin: 0.05\n  maxWorstGroupGap: 0.3\n  requiredSubgroups: [\"sex=F\"]\n  pollIntervalSeconds: 5\n"
    );
    std::fs::write(w.path("policy.yaml"), &policy).unwrap();
    w.apply(&policy);
    for site in SITES {
        w.apply(&site_validator(site, &w.uri(site)));
    }

    // A candidate trained without site-c's data, barely trained: it regresses.
    let bad = w.train("bad", "pool-ab", 5, 0.001, None);
    w.radfm(&[
        "registry",
        "register",
        REGISTRY,
        "chest",
        "--export",
        &bad,
        "--parent",
        "1",
        "--reason",
        "retrained on sites a and b",
    ]);
    for site in SITES {
        w.run_validation_pod(site, 2).await;
    }
    for site in SITES {
        w.wait_validated(site, 2).await;
    }
    let pp = w.wait_decision(2, "Reject", 3).await;
    let decided = pp.status.unwrap().last_decision.unwrap();
    assert_eq!(decided.sites, SITES);
    // The shifted site, whose data the candidate never saw, regresses in a named subgroup.
    assert!(
        decided
            .reasons
            .iter()
            .any(|r| r.starts_with("site site-c, ")
                && !r.starts_with("site site-c, all cases")
                && r.contains("ΔAUROC")
                && r.contains("below margin -0.050")),
        "{:#?}",
        decided.reasons
    );
    let reg = Registry::open(REGISTRY).unwrap();
    assert_eq!(reg.aliases("chest").await.unwrap()["production"], 1);

    // Nothing below the minimum cell size is reported anywhere.
    let mut suppressed = 0;
    for (_, _, bytes) in reg.reports("chest", 2).await.unwrap() {
        let r = report::verify(&serde_json::from_slice::<Signed>(&bytes).unwrap()).unwrap();
        assert!(r.tasks[0].subgroups.iter().all(|g| g.result.n >= 40));
        assert!(r.tasks[0].overall.n >= 40);
        suppressed += r.tasks[0].suppressed_cells;
    }
    assert!(suppressed > 0, "some age bands have fewer than 40 cases");

    // A conservatively fine-tuned candidate. Before the sites report, the registry receives a
    // tampered report (site-a's, one number changed), a forged one (site-b, signed by a key the
    // policy does not trust) and a replayed one (site-c's report of v2): none counts.
    let good = w.train("good", "pool-all", 5, 0.000001, Some(&base));
    w.radfm(&[
        "registry",
        "register",
        REGISTRY,
        "chest",
        "--export",
        &good,
        "--parent",
        "1",
        "--reason",
        "fine-tuned on all sites",
    ]);
    w.run_validation_pod("site-a", 3).await;
    w.wait_validated("site-a", 3).await;
    let store = radfm_data::store::Location::open(REGISTRY).unwrap();
    let name = |v: u32, site: &str| format!("models/chest/reports/v{v:06}/{site}.json");
    let genuine: Signed =
        serde_json::from_slice(&store.get_opt(&name(3, "site-a")).await.unwrap().unwrap()).unwrap();
    let tampered = Signed {
        payload: genuine.payload.replacen("\"cases\":", "\"cases\":1", 1),
        ..genuine.clone()
    };
    assert_ne!(tampered.payload, genuine.payload);
    let mut as_b = report::verify(&genuine).unwrap();
    as_b.site = "site-b".into();
    let forged = report::sign(&as_b, &report::generate_key());
    let replayed = store.get_opt(&name(2, "site-c")).await.unwrap().unwrap();
    store
        .put(&name(3, "site-a"), serde_json::to_vec(&tampered).unwrap())
        .await
        .unwrap();
    store
        .put(&name(3, "site-b"), serde_json::to_vec(&forged).unwrap())
        .await
        .unwrap();
    store
        .put(&name(3, "site-c"), replayed.to_vec())
        .await
        .unwrap();
    let expected = [
        "site-a.json not counted: signature: signature does not match the payload",
        "site-b.json not counted: signed by a key that is not trusted",
        "site-c.json not counted: is about chest v2",
        "0 of 3 required site reports (missing: site-a, site-b, site-c)",
    ];
    wait_until(
        WAIT,
        "HoldForReview of v3 refusing all three reports",
        || async {
            let pp = w.policy().get_opt("chest").await.ok()??;
            let d = pp.status?.last_decision?;
            let reasons = d.reasons.join("\n");
            (d.version == 3
                && d.outcome == "HoldForReview"
                && expected.iter().all(|e| reasons.contains(e)))
            .then_some(())
        },
    )
    .await
    .unwrap();

    // The bad reports go; the policy now wants a person's approval (dr-alice's signature); the
    // sites validate v3 for real: every rule passes and the gate waits for the approval, then
    // promotes. A policy that wants approval without naming approvers is refused.
    let patch_policy = |spec: &str| {
        cluster.kubectl(&[
            "patch", "pp", "chest", "-n", NS, "--type", "merge", "-p", spec,
        ])
    };
    let refused = patch_policy(r#"{"spec": {"requireApproval": true}}"#);
    assert!(
        String::from_utf8_lossy(&refused.stderr)
            .contains("requireApproval needs at least one approver"),
        "{refused:?}"
    );
    let keys = w.path("keys").display().to_string();
    let alice = w.radfm(&["keygen", "--out", &keys, "--site", "dr-alice"]);
    let mallory = w.radfm(&["keygen", "--out", &keys, "--site", "mallory"]);
    assert_ne!(alice, mallory);
    radfm_e2e::ok(&patch_policy(&format!(
        r#"{{"spec": {{"requireApproval": true, "approvers": [{{"name": "dr-alice", "publicKey": "{}"}}]}}}}"#,
        alice.trim()
    )));
    for site in SITES {
        store.delete(&name(3, site)).await.unwrap();
    }
    for site in SITES {
        w.run_validation_pod(site, 3).await;
    }
    let pp = w.wait_decision(3, "HoldForReview", 3).await;
    assert_eq!(
        pp.status.unwrap().last_decision.unwrap().reasons,
        ["every rule passed; waiting for a human approval of v3"]
    );
    assert_eq!(reg.aliases("chest").await.unwrap()["production"], 1);
    // Someone with write access to the registry signs "dr-alice"'s approval with another key:
    // it does not count. Then dr-alice approves.
    let approve = |who: &str, key: &str| {
        w.radfm(&[
            "approve",
            REGISTRY,
            "chest",
            "3",
            "--as",
            who,
            "--key-file",
            &format!("{keys}/{key}.key"),
            "--reason",
            "read the three site reports",
        ])
    };
    approve("dr-alice", "mallory");
    let refused = "approval by dr-alice not counted: signed with a key that is not dr-alice's";
    wait_until(WAIT, "the forged approval refused", || async {
        let pp = w.policy().get_opt("chest").await.ok()??;
        let d = pp.status?.last_decision?;
        (d.outcome == "HoldForReview" && d.reasons.iter().any(|r| r.contains(refused)))
            .then_some(())
    })
    .await
    .unwrap();
    approve("dr-alice", "dr-alice");
    let pp = w.wait_decision(3, "Promote", 3).await;
    let st = pp.status.unwrap();
    assert_eq!(st.production, Some(3));
    assert_eq!(st.last_decision.unwrap().sites, SITES);
    assert_eq!(reg.aliases("chest").await.unwrap()["production"], 3);
    let log = reg.events("chest").await.unwrap();
    let notes: Vec<&str> = log.iter().map(|e| e.reason.as_str()).collect();
    assert!(
        notes
            .iter()
            .any(|n| n.starts_with("Reject v2 (against v1): ")),
        "{notes:?}"
    );
    assert!(
        notes
            .iter()
            .any(|n| n.starts_with("HoldForReview v3 (against v1): ")),
        "{notes:?}"
    );
    assert!(
        notes
            .last()
            .unwrap()
            .starts_with("Promote v3 (against v1): "),
        "{notes:?}"
    );
    assert!(notes.iter().any(|n| n.contains(refused)), "{notes:?}");
    assert!(
        notes.last().unwrap().contains("; approved by dr-alice at "),
        "{notes:?}"
    );
    let table = cluster.kubectl_ok(&["get", "pp", "-n", NS]).unwrap();
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(
        &row[..5],
        ["chest", "chest", "3", "Promote", "3"],
        "{table}"
    );

    // The change-control records of both candidates.
    for (v, outcome) in [("2", "Reject"), ("3", "Promote")] {
        let html = w.path(&format!("v{v}.html"));
        w.radfm(&[
            "report",
            "--registry",
            REGISTRY,
            "chest",
            v,
            "--policy",
            &w.path("policy.yaml").display().to_string(),
            "--out",
            &html.display().to_string(),
        ]);
        let parsed = parse_html(&html);
        assert_eq!(parsed["outcome"], outcome, "{parsed}");
        for id in ["lineage-graph", "loss-plot", "forest-plot"] {
            assert!(
                parsed["svg"].as_array().unwrap().iter().any(|s| s == id),
                "{id}: {parsed}"
            );
        }
        assert_eq!(
            parsed["signatures"],
            serde_json::json!(["verified", "verified", "verified"])
        );
        for site in ["site-a", "site-b", "site-c"] {
            let cells: Vec<&str> = parsed["bias"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|row| row[0] == site)
                .map(|row| row[1].as_str().unwrap())
                .collect();
            assert!(
                cells.first() == Some(&"") && cells.len() > 1,
                "{site}: underdiagnosis and calibration on all cases and per cell: {parsed}"
            );
        }
        let reasons = parsed["reasons"].as_array().unwrap();
        if outcome == "Reject" {
            assert!(
                reasons.iter().any(|r| r["code"] == "non_inferiority"
                    && r["site"] == "site-c"
                    && r["subgroup"] != ""
                    && r["text"].as_str().unwrap().starts_with("site site-c, ")),
                "{parsed}"
            );
        } else {
            assert_eq!(reasons[0]["code"], "passed", "{parsed}");
        }
    }
}

/// A site looks at its production model on two recent windows: one drawn like the reference
/// (stable) and one from a replaced, older scanner (shifted). Only the shifted one is flagged,
/// on the embeddings and the probe's scores as well as on the scanner mix; both reports are signed, stored beside the
/// version, and a changed verdict no longer verifies.
#[test]
fn a_site_monitor_flags_a_scanner_shift_and_not_a_stable_window() {
    let dir = tempfile::tempdir().unwrap();
    let uri = |sub: &str| format!("file://{}", dir.path().join(sub).display());
    let radfm = |args: &[&str]| radfm_e2e::ok(&radfm_e2e::radfm(args, &[]));
    let synth = |out: &str, seed: &str, shifted: bool| {
        let out = uri(out);
        let mut args = vec![
            "synth",
            "--out",
            &out,
            "--samples",
            "240",
            "--size",
            "32",
            "--sites",
            "north",
            "--seed",
            seed,
            "--lesion-radius",
            "0.15,0.25",
            "--lesion-prevalence",
            "0.4",
            "--shard-mib",
            "0.2",
        ];
        if shifted {
            args.extend(["--shift-site", "north"]);
        }
        radfm(&args);
    };
    synth("reference", "1", false);
    synth("stable", "2", false);
    synth("shifted", "3", true);
    // Late labels: the same scanner, but women's lesions are now too small to see (a
    // protocol change for them only): the model fails women, not men.
    for (sex, first, radius) in [("0", "0", "0.15,0.25"), ("1", "120", "0.01,0.02")] {
        radfm(&[
            "synth",
            "--out",
            &uri("harmed"),
            "--samples",
            "120",
            "--size",
            "32",
            "--sites",
            "north",
            "--seed",
            "4",
            "--first-index",
            first,
            "--female-fraction",
            sex,
            "--lesion-radius",
            radius,
            "--lesion-prevalence",
            "0.4",
            "--shard-mib",
            "0.2",
        ]);
    }
    let job = format!(
        "apiVersion: radfm.io/v1alpha1\nkind: TrainingJob\nmetadata: {{name: deployed}}\nspec:\n  image: local\n  \
         workers: {{replicas: 1, gpusPerWorker: 0}}\n  dataset: {{uri: \"{}\"}}\n  \
         model: {{imageSize: 32, patchSize: 8}}\n  \
         training: {{steps: 20, batchSizePerDevice: 32, learningRate: 0.0015, warmupSteps: 5}}\n  \
         checkpoint: {{uri: \"{}\", everySteps: 1000}}\n  export: {{uri: \"{}\"}}\n",
        uri("reference"),
        uri("ckpt"),
        uri("model"),
    );
    radfm_e2e::train_locally(&job, dir.path(), "deployed", &[("RADFM_THREADS", "2")]);
    let registry = uri("registry");
    radfm(&[
        "registry",
        "register",
        &registry,
        "chest",
        "--export",
        &uri("model"),
    ]);
    radfm(&[
        "registry",
        "promote",
        &registry,
        "chest",
        "1",
        "--reason",
        "validated",
    ]);
    let north_public = radfm(&[
        "keygen",
        "--out",
        &dir.path().join("keys").display().to_string(),
        "--site",
        "north",
    ]);
    let key = dir.path().join("keys/north.key").display().to_string();
    let look = |recent: &str| -> serde_json::Value {
        let out = radfm(&[
            "monitor",
            "--registry",
            &registry,
            "--model",
            "chest",
            "--site",
            "north",
            "--key-file",
            &key,
            "--reference",
            &uri("reference"),
            "--recent",
            &uri(recent),
            "--task",
            "lesion",
            "--fields",
            "manufacturer,sex",
            "--json",
        ]);
        serde_json::from_str(&out).unwrap()
    };
    let drifting = |r: &serde_json::Value| -> Vec<String> {
        r["watched"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["drifting"] == true)
            .map(|w| w["name"].as_str().unwrap().to_string())
            .collect()
    };
    let stable = look("stable");
    assert_eq!(stable["drifting"], false, "{stable:#}");
    assert_eq!(stable["version"], 1);
    let shifted = look("shifted");
    assert_eq!(shifted["drifting"], true, "{shifted:#}");
    let flagged = drifting(&shifted);
    assert!(
        flagged.contains(&"embeddings".to_string())
            && flagged.contains(&"metadata:manufacturer".to_string())
            && flagged.contains(&"scores:lesion".to_string()),
        "{shifted:#}"
    );
    assert!(
        !flagged.contains(&"metadata:sex".to_string()),
        "{shifted:#}"
    );
    assert!(
        !stable["performance"].as_array().unwrap().is_empty(),
        "the stable window's labels are compared: {stable:#}"
    );

    let harmed = look("harmed");
    let flagged = drifting(&harmed);
    assert!(
        flagged.contains(&"performance:lesion:sex=F".to_string())
            && !flagged.iter().any(|f| f.contains("sex=M")),
        "{harmed:#}"
    );
    let women = harmed["performance"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["cell"] == "sex=F")
        .unwrap();
    assert!(
        women["change"]["hi"].as_f64().unwrap() < 0.0,
        "the drop comes with its interval: {women:#}"
    );

    let typo = radfm_e2e::radfm(
        &[
            "monitor",
            "--registry",
            &registry,
            "--model",
            "chest",
            "--site",
            "north",
            "--key-file",
            &key,
            "--reference",
            &uri("reference"),
            "--recent",
            &uri("stable"),
            "--fields",
            "scaner",
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&typo.stderr);
    assert!(
        !typo.status.success() && err.contains("no case of either window has the field \"scaner\""),
        "{err}"
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    let stored = rt
        .block_on(
            Registry::open(&registry)
                .unwrap()
                .monitor_reports("chest", 1),
        )
        .unwrap();
    assert_eq!(
        stored.len(),
        1,
        "the site's latest look replaces the earlier one"
    );
    let signed: Signed = serde_json::from_slice(&stored[0].2).unwrap();
    let report = radfm_validation::monitor::verify(&signed).unwrap();
    assert!(report.drifting && report.site == "north");
    let mut forged = signed.clone();
    forged.payload = forged
        .payload
        .replace("\"drifting\":true", "\"drifting\":false");
    assert!(radfm_validation::monitor::verify(&forged).is_err());

    // The change-control record shows what the site saw after deployment.
    let html = dir.path().join("v1.html");
    radfm(&[
        "report",
        "--registry",
        &registry,
        "chest",
        "1",
        "--out",
        &html.display().to_string(),
    ]);
    let parsed = parse_html(&html);
    assert_eq!(parsed["looks"], serde_json::json!(["drifting"]), "{parsed}");
    let text = std::fs::read_to_string(&html).unwrap();
    assert!(
        text.contains("performance:lesion:sex=F (AUROC "),
        "the evidence names the cell and its AUROC change"
    );

    // v2 is promoted; its looks after the promotion show the same harm; a policy that rolls
    // back on harm moves production back to v1, with the reason, and v2 stays out.
    radfm(&[
        "registry",
        "register",
        &registry,
        "chest",
        "--export",
        &uri("model"),
        "--parent",
        "1",
    ]);
    radfm(&[
        "registry",
        "promote",
        &registry,
        "chest",
        "2",
        "--reason",
        "validated",
    ]);
    assert_eq!(look("harmed")["version"], 2);
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "registry: \"{registry}\"\nmodel: chest\ntask: lesion\nquorum: 1\n\
             trustedSites: [{{site: north, publicKey: \"{}\"}}]\nrollback: {{minSites: 1}}\n",
            north_public.trim()
        ),
    )
    .unwrap();
    let gate = radfm(&[
        "gate",
        "--policy",
        &policy.display().to_string(),
        "--by",
        "gate",
    ]);
    assert!(
        gate.starts_with("chest: Rollback v2") && gate.contains("[harm] site north, sex=F: AUROC "),
        "{gate}"
    );
    let aliases = rt
        .block_on(Registry::open(&registry).unwrap().aliases("chest"))
        .unwrap();
    assert_eq!(aliases["production"], 1, "{gate}");
    let again = radfm(&["gate", "--policy", &policy.display().to_string()]);
    assert!(again.starts_with("nothing to decide"), "{again}");
    let html = dir.path().join("v2.html");
    radfm(&[
        "report",
        "--registry",
        &registry,
        "chest",
        "2",
        "--out",
        &html.display().to_string(),
    ]);
    let parsed = parse_html(&html);
    assert_eq!(parsed["outcome"], "Rollback", "{parsed}");
    let reasons = parsed["reasons"].as_array().unwrap();
    assert!(
        reasons
            .iter()
            .any(|r| r["code"] == "harm" && r["site"] == "north" && r["subgroup"] == "sex=F"),
        "{parsed}"
    );
    assert!(
        !reasons.iter().any(|r| r["subgroup"] == "sex=M"),
        "{parsed}"
    );
}
