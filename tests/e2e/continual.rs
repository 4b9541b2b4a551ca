//! End-to-end tests of ContinualTraining on a real API server with kwok nodes: the operator binary
//! under its ServiceAccount, a clock file instead of the wall clock (no test waits for a cron
//! minute), real `radfm synth` datasets growing shard by shard, the real trainer run with each
//! run pod's environment, and the model registry on local folders.
#![allow(
    clippy::too_many_lines,
    reason = "a scenario test reads as one story from setup to the last assertion"
)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use radfm_api::continual::{ANNOTATION_WINDOW, LABEL_CONTINUAL, RunWindow};
use radfm_api::{ContinualTraining, TrainingJob};
use radfm_e2e::{Cluster, serial, wait_until};
use radfm_registry::Registry;

const WAIT: Duration = Duration::from_secs(90);

struct Scene<'a> {
    cluster: &'a Cluster,
    ns: String,
    work: PathBuf,
    clock: PathBuf,
}

impl Scene<'_> {
    fn uri(&self, sub: &str) -> String {
        format!("file://{}/{sub}", self.work.display())
    }

    fn set_clock(&self, t: Timestamp) {
        std::fs::write(&self.clock, t.to_string()).unwrap();
    }

    fn apply(&self, yaml: &str) {
        let out = self
            .cluster
            .kubectl_stdin(&["apply", "-n", &self.ns, "-f", "-"], Some(yaml));
        assert!(
            out.status.success(),
            "kubectl apply: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Appends `samples` synthetic images (about 16 per shard) to the dataset; returns every
    /// shard sequence number of the index afterwards.
    async fn add_data(&self, first_index: usize, samples: usize) -> Vec<u64> {
        radfm_e2e::ok(&radfm_e2e::radfm(
            &[
                "synth",
                "--out",
                &self.uri("data"),
                "--samples",
                &samples.to_string(),
                "--size",
                "32",
                "--first-index",
                &first_index.to_string(),
                "--shard-mib",
                "0.035",
            ],
            &[],
        ));
        let loc = radfm_data::store::Location::open(&self.uri("data")).unwrap();
        radfm_data::DatasetIndex::load(&loc)
            .await
            .unwrap()
            .shards
            .iter()
            .map(|s| s.seq)
            .collect()
    }

    fn cts(&self) -> Api<ContinualTraining> {
        Api::namespaced(self.cluster.client.clone(), &self.ns)
    }

    fn jobs(&self) -> Api<TrainingJob> {
        Api::namespaced(self.cluster.client.clone(), &self.ns)
    }

    async fn runs(&self, ct: &str) -> Vec<TrainingJob> {
        let lp = ListParams::default().labels(&format!("{LABEL_CONTINUAL}={ct}"));
        let mut runs = self.jobs().list(&lp).await.unwrap().items;
        runs.sort_by_key(|j| j.name_any());
        runs
    }

    async fn wait_ct(
        &self,
        name: &str,
        what: &str,
        pred: impl Fn(&ContinualTraining) -> bool,
    ) -> ContinualTraining {
        radfm_e2e::wait_object(&self.cts(), name, WAIT, what, pred).await
    }

    /// Waits until the status shows `scheduled` handled.
    async fn wait_handled(&self, name: &str, scheduled: Timestamp) -> ContinualTraining {
        self.wait_ct(name, &format!("scheduled time {scheduled} handled"), |ct| {
            ct.status
                .as_ref()
                .and_then(|s| s.last_schedule_time.as_ref())
                .is_some_and(|t| t.0 == scheduled)
        })
        .await
    }

    async fn wait_run_count(&self, ct: &str, n: usize) -> Vec<TrainingJob> {
        wait_until(WAIT, &format!("{n} runs of {ct}"), || async {
            let runs = self.runs(ct).await;
            (runs.len() == n).then_some(runs)
        })
        .await
        .unwrap()
    }

    /// Runs the real trainer with the run's pod environment (as its container would), then
    /// reports the pod's exit as a kubelet would.
    async fn train(&self, run: &str) {
        let pod = self
            .cluster
            .running_pod_of(&self.ns, run, WAIT)
            .await
            .unwrap();
        let container = &pod.spec.as_ref().unwrap().containers[0];
        let mut vars: Vec<(String, String)> = container
            .env
            .iter()
            .flatten()
            .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
            .collect();
        for (k, v) in [("RADFM_MASTER_ADDR", "127.0.0.1"), ("RADFM_THREADS", "1")] {
            vars.retain(|(n, _)| n != k);
            vars.push((k.to_string(), v.to_string()));
        }
        let out = std::process::Command::new(radfm_e2e::workspace_bin("radfm-trainer").unwrap())
            .arg("train")
            .env_clear()
            .envs(vars)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "trainer of {run}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.cluster
            .end_pod(&self.ns, &pod.name_any(), 0, "Completed")
            .await
            .unwrap();
    }
}

fn ct_yaml(name: &str, scene: &Scene, extra: &str) -> String {
    format!(
        r#"apiVersion: radfm.io/v1alpha1
kind: ContinualTraining
metadata: {{name: {name}}}
spec:
  schedule: "0 * * * *"
  timeZone: Europe/Berlin
  dataset: {{uri: "{data}"}}
  registry: "{registry}"
  replay: 0.5
  register: {{model: chest}}
  jobTemplate:
    image: radfm/trainer:test
    workers: {{replicas: 1, gpusPerWorker: 0}}
    model: {{imageSize: 32, patchSize: 8}}
    training: {{steps: 4, batchSizePerDevice: 8, learningRate: 0.001}}
    checkpoint: {{uri: "{ckpt}", everySteps: 100}}
{extra}"#,
        data = scene.uri("data"),
        registry = scene.uri("registry"),
        ckpt = scene.uri("ckpt"),
    )
}

/// The first full hour after `t` (Europe/Berlin is a whole-hour offset from UTC).
fn next_hour(t: Timestamp) -> Timestamp {
    Timestamp::from_second((t.as_second() / 3600 + 1) * 3600).unwrap()
}

fn hours(n: i64) -> jiff::SignedDuration {
    jiff::SignedDuration::from_hours(n)
}

fn window_of(job: &TrainingJob) -> RunWindow {
    serde_json::from_str(&job.annotations()[ANNOTATION_WINDOW]).unwrap()
}

fn shards_of(job: &TrainingJob) -> Vec<u64> {
    radfm_api::trainingjob::parse_shards(job.spec.dataset.shards.as_deref().unwrap()).unwrap()
}

async fn start<'a>(
    cluster: &'a Cluster,
    ns: &str,
    dir: &Path,
) -> (radfm_e2e::TestNamespace<'a>, Scene<'a>) {
    let guard = cluster.namespace(ns).await.unwrap();
    let scene = Scene {
        cluster,
        ns: ns.into(),
        work: dir.to_path_buf(),
        clock: dir.join("clock"),
    };
    scene.set_clock(Timestamp::now());
    (guard, scene)
}

#[tokio::test]
async fn scheduled_runs_train_on_new_data_from_the_base_model_and_register_with_lineage() {
    let _serial = serial().await;
    let cluster = Cluster::start(1, 0).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (_ns, s) = start(&cluster, "continual", dir.path()).await;
    let clock = s.clock.display().to_string();
    let _op = cluster
        .start_operator("continual", "operator-continual", &["--clock-file", &clock])
        .unwrap();
    let first = s.add_data(0, 48).await;
    assert!(first.len() >= 2, "{first:?}");

    s.apply(&ct_yaml(
        "chest",
        &s,
        "  baseModel: {model: chest, alias: production}\n  successfulJobsHistoryLimit: 1\n",
    ));
    let ct = s
        .wait_ct("chest", "next schedule time", |ct| {
            ct.status
                .as_ref()
                .is_some_and(|st| st.next_schedule_time.is_some())
        })
        .await;
    let created = ct.metadata.creation_timestamp.clone().unwrap().0;
    let t1 = next_hour(created);
    assert_eq!(ct.status.unwrap().next_schedule_time.unwrap().0, t1);
    assert!(
        s.runs("chest").await.is_empty(),
        "nothing before the schedule"
    );

    // The schedule fires: the first run trains on every shard from random initialisation (the
    // model does not exist yet).
    s.set_clock(t1 + jiff::SignedDuration::from_secs(5));
    let runs = s.wait_run_count("chest", 1).await;
    let run1 = &runs[0];
    assert_eq!(
        run1.name_any(),
        format!("chest-{}", t1.as_second() / 60),
        "deterministic name"
    );
    assert_eq!(run1.spec.model.init_from, None);
    assert_eq!(shards_of(run1), first);
    let w1 = window_of(run1);
    assert_eq!((w1.new.clone(), w1.replay.len()), (first.clone(), 0));
    assert_eq!(
        run1.spec.export.as_ref().unwrap().uri,
        format!("{}/{}/export", s.uri("ckpt"), run1.name_any())
    );
    let st = s.wait_handled("chest", t1).await.status.unwrap();
    assert_eq!(st.active, [run1.name_any()]);

    // It trains for real and completes: version 1 is registered with its lineage, the watermark
    // moves to the last shard trained on.
    s.train(&run1.name_any()).await;
    let st = s
        .wait_ct("chest", "v1 registered", |ct| {
            ct.status
                .as_ref()
                .is_some_and(|st| st.last_registered_version == Some(1))
        })
        .await
        .status
        .unwrap();
    assert_eq!(st.data_watermark, Some(*first.last().unwrap() as i64));
    assert!(st.last_successful_time.is_some());
    // GitOps tools see a healthy schedule and a finished run.
    let ct_health = &cluster
        .gitops_health("continual", "continualtrainings")
        .unwrap()["chest"];
    assert_eq!(
        ct_health.statuses(),
        ("Current", "Healthy", "Current"),
        "{ct_health:?}"
    );
    let run_health = &cluster.gitops_health("continual", "trainingjobs").unwrap()[&run1.name_any()];
    assert_eq!(
        run_health.statuses(),
        ("Current", "Healthy", "Current"),
        "{run_health:?}"
    );
    let reg = Registry::open(&s.uri("registry")).unwrap();
    let v1 = reg.version("chest", 1).await.unwrap();
    assert_eq!(v1.spec.job_uid, run1.uid());
    assert_eq!(v1.spec.job_name.as_deref(), Some(run1.name_any().as_str()));
    assert_eq!(v1.spec.parent, None);
    let trained: Vec<u64> = v1.spec.data.shards.iter().map(|r| r.seq).collect();
    assert_eq!(trained, first);
    assert!(v1.spec.data.shards.iter().all(|r| r.sha256.len() == 64));
    assert_eq!(reg.aliases("chest").await.unwrap()["candidate"], 1);
    radfm_e2e::ok(&radfm_e2e::radfm(
        &[
            "registry",
            "promote",
            &s.uri("registry"),
            "chest",
            "1",
            "--reason",
            "site validation passed",
        ],
        &[],
    ));

    // No new data at the next scheduled time: no run, and the status says why.
    let t2 = t1 + hours(1);
    s.set_clock(t2 + jiff::SignedDuration::from_secs(5));
    let ct = s.wait_handled("chest", t2).await;
    let data_ready = radfm_api::conditions::get(
        &ct.status.as_ref().unwrap().conditions,
        radfm_api::conditions::ContinualConditionType::DataReady,
    )
    .unwrap();
    assert_eq!(
        (data_ready.status.as_str(), data_ready.reason.as_str()),
        ("False", "NoNewData")
    );
    assert_eq!(s.runs("chest").await.len(), 1, "no run without new data");

    // New shards land: the next run starts from production (v1) on the new shards plus a
    // replayed earlier one.
    let grown = s.add_data(48, 32).await;
    let second: Vec<u64> = grown
        .iter()
        .copied()
        .filter(|q| !first.contains(q))
        .collect();
    assert!(!second.is_empty());
    let t3 = t2 + hours(1);
    s.set_clock(t3 + jiff::SignedDuration::from_secs(5));
    let runs = s.wait_run_count("chest", 2).await;
    let run2 = runs
        .iter()
        .find(|r| r.name_any() == format!("chest-{}", t3.as_second() / 60))
        .unwrap()
        .clone();
    let v1_folder = v1.spec.weights_uri.trim_end_matches("/encoder.safetensors");
    assert_eq!(run2.spec.model.init_from.as_deref(), Some(v1_folder));
    let w2 = window_of(&run2);
    assert_eq!(w2.new, second);
    assert_eq!(w2.replay.len(), second.len().div_ceil(2).min(first.len()));
    assert!(w2.replay.iter().all(|r| first.contains(r)));
    let mut want: Vec<u64> = w2.new.iter().chain(&w2.replay).copied().collect();
    want.sort();
    assert_eq!(shards_of(&run2), want);

    // Forbid: more data lands while run 2 is active; the due run is skipped.
    let third_all = s.add_data(80, 32).await;
    let t4 = t3 + hours(1);
    s.set_clock(t4 + jiff::SignedDuration::from_secs(5));
    s.wait_handled("chest", t4).await;
    assert_eq!(
        s.runs("chest").await.len(),
        2,
        "Forbid: no second active run"
    );

    // Run 2 completes: v2's parent is v1 and the watermark moves to run 2's last new shard, not
    // to the data that landed meanwhile.
    s.train(&run2.name_any()).await;
    let st = s
        .wait_ct("chest", "v2 registered", |ct| {
            ct.status
                .as_ref()
                .is_some_and(|st| st.last_registered_version == Some(2))
        })
        .await
        .status
        .unwrap();
    assert_eq!(st.data_watermark, Some(*second.last().unwrap() as i64));
    let lineage: Vec<u64> = reg
        .lineage("chest", 2)
        .await
        .unwrap()
        .iter()
        .map(|v| v.version)
        .collect();
    assert_eq!(lineage, [2, 1]);
    let v2 = reg.version("chest", 2).await.unwrap();
    assert_eq!(v2.spec.data.replayed, w2.replay);
    let aliases = reg.aliases("chest").await.unwrap();
    assert_eq!((aliases["candidate"], aliases["production"]), (2, 1));

    // The gate rejects v2, recorded as a PromotionPolicy records it (a note on v2 with the
    // decision beside it): the shards only v2 trained on are not consumed.
    let rejected = reg
        .note(
            "chest",
            Some(2),
            "radfm-operator/continual/chest",
            "Reject v2 (against v1): ...",
        )
        .await
        .unwrap();
    let decision = radfm_validation::gate::Decision {
        model: "chest".into(),
        candidate: 2,
        baseline: 1,
        outcome: radfm_validation::gate::Outcome::Reject,
        reasons: Vec::new(),
        sites: Vec::new(),
        reports: Vec::new(),
        accepted: Vec::new(),
        approval: None,
    };
    reg.put_decision(
        "chest",
        rejected.seq,
        serde_json::to_vec(&decision).unwrap(),
    )
    .await
    .unwrap();

    // History limit 1: once run 2 is registered, run 1 is pruned (after its registration).
    let runs = s.wait_run_count("chest", 1).await;
    assert_eq!(runs[0].name_any(), run2.name_any());

    // The next run takes the data that landed during run 2, still from production (v1) ...
    let t5 = t4 + hours(1);
    s.set_clock(t5 + jiff::SignedDuration::from_secs(5));
    let runs = s.wait_run_count("chest", 2).await;
    let run3 = runs
        .iter()
        .find(|r| r.name_any() == format!("chest-{}", t5.as_second() / 60))
        .unwrap();
    let third: Vec<u64> = third_all
        .iter()
        .copied()
        .filter(|q| !grown.contains(q))
        .collect();
    // ... and the shards that only the rejected v2 trained on return to it.
    let w3 = window_of(run3);
    let mut want: Vec<u64> = second.iter().chain(&third).copied().collect();
    want.sort();
    assert_eq!((w3.new, w3.returned), (want, second.clone()));
    assert!(
        w3.replay.iter().all(|r| first.contains(r)),
        "{:?}",
        w3.replay
    );
    assert_eq!(run3.spec.model.init_from.as_deref(), Some(v1_folder));
    let table = cluster
        .kubectl_ok(&["get", "ct", "-n", "continual"])
        .unwrap();
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        &header[..6],
        [
            "NAME",
            "SCHEDULE",
            "SUSPEND",
            "ACTIVE",
            "WATERMARK",
            "VERSION"
        ],
        "{table}"
    );
    // The schedule's five fields are five words of the row.
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    let watermark = second.last().unwrap().to_string();
    assert_eq!(
        (row[0], &row[6..10]),
        ("chest", &["false", "1", watermark.as_str(), "2"][..]),
        "{table}"
    );
}

#[tokio::test]
async fn operator_restarted_at_the_firing_instant_creates_exactly_one_run() {
    let _serial = serial().await;
    let cluster = Cluster::start(1, 0).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (_ns, s) = start(&cluster, "restart", dir.path()).await;
    let clock = s.clock.display().to_string();
    s.add_data(0, 32).await;
    // The API server enforces the CRD's rules, naming the field.
    let good = ct_yaml("bad", &s, "");
    for (yaml, field, message) in [
        (
            good.replace("spec:\n", "spec:\n  concurrencyPolicy: Sometimes\n"),
            "spec.concurrencyPolicy",
            "Unsupported value",
        ),
        (
            good.replace("spec:\n", "spec:\n  trigger: {maxInterval: 3days}\n"),
            "spec.trigger.maxInterval",
            "positive duration",
        ),
        (
            good.replace("replay: 0.5", "replay: 1.5"),
            "spec.replay",
            "replay must be in [0, 1]",
        ),
    ] {
        let out = cluster.kubectl_stdin(&["apply", "-n", "restart", "-f", "-"], Some(&yaml));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted:\n{yaml}");
        assert!(err.contains(field) && err.contains(message), "{err}");
    }
    s.apply(&ct_yaml("chest", &s, "  concurrencyPolicy: Allow\n"));
    let ct: ContinualTraining = wait_until(WAIT, "ContinualTraining stored", || async {
        s.cts().get_opt("chest").await.ok()?
    })
    .await
    .unwrap();
    let t1 = next_hour(ct.metadata.creation_timestamp.clone().unwrap().0);
    s.set_clock(t1 + jiff::SignedDuration::from_secs(1));
    let mut first = cluster
        .start_operator("restart", "operator-a", &["--clock-file", &clock])
        .unwrap();
    // Killed the moment its run exists, before it may have recorded the scheduled time.
    wait_until(WAIT, "the first run", || async {
        (!s.runs("chest").await.is_empty()).then_some(())
    })
    .await
    .unwrap();
    first.kill();
    let _second = cluster
        .start_operator("restart", "operator-b", &["--clock-file", &clock])
        .unwrap();
    s.wait_ct("chest", "the second operator's pass", |ct| {
        ct.status.as_ref().is_some_and(|st| {
            st.last_schedule_time.as_ref().is_some_and(|t| t.0 == t1)
                && st
                    .next_schedule_time
                    .as_ref()
                    .is_some_and(|t| t.0 == t1 + hours(1))
        })
    })
    .await;
    // Give the new leader a few more passes at the same instant.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let runs = s.runs("chest").await;
    let names: Vec<String> = runs.iter().map(|r| r.name_any()).collect();
    assert_eq!(names, [format!("chest-{}", t1.as_second() / 60)]);
}

/// GitOps restore: the ContinualTraining is deleted and applied again from Git with no status.
/// Its progress is in the registry, so the next run trains only on data it has not seen, from
/// the last version, instead of from scratch on everything.
#[tokio::test]
async fn a_schedule_deleted_and_applied_again_from_git_does_not_retrain_on_old_data() {
    let _serial = serial().await;
    let cluster = Cluster::start(1, 0).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (_ns, s) = start(&cluster, "restore", dir.path()).await;
    let clock = s.clock.display().to_string();
    let _op = cluster
        .start_operator("restore", "operator-restore", &["--clock-file", &clock])
        .unwrap();
    let first = s.add_data(0, 32).await;
    let yaml = ct_yaml("chest", &s, "");
    s.apply(&yaml);
    let ct = s
        .wait_ct("chest", "next schedule time", |ct| {
            ct.status
                .as_ref()
                .is_some_and(|st| st.next_schedule_time.is_some())
        })
        .await;
    let t1 = next_hour(ct.metadata.creation_timestamp.clone().unwrap().0);
    s.set_clock(t1 + jiff::SignedDuration::from_secs(5));
    let run1 = s.wait_run_count("chest", 1).await.remove(0);
    s.train(&run1.name_any()).await;
    s.wait_ct("chest", "v1 registered", |ct| {
        ct.status
            .as_ref()
            .is_some_and(|st| st.last_registered_version == Some(1))
    })
    .await;

    // Deleted (its runs go with it) and applied again, as Argo CD or Flux would after a restore.
    cluster
        .kubectl_ok(&["delete", "ct", "chest", "-n", "restore", "--wait=true"])
        .unwrap();
    // Its runs go too, as the garbage collector would delete them (this control plane runs none).
    cluster
        .kubectl_ok(&[
            "delete",
            "trainingjobs",
            "--all",
            "-n",
            "restore",
            "--wait=true",
        ])
        .unwrap();
    s.apply(&yaml);
    // Its clock is past the first slot, so it evaluates the data at once: the registry's record
    // says there is nothing new, and nothing runs.
    let restored = s
        .wait_ct("chest", "the watermark taken from the registry", |ct| {
            ct.status
                .as_ref()
                .is_some_and(|st| st.data_watermark.is_some())
        })
        .await;
    assert_eq!(
        restored.status.unwrap().data_watermark,
        Some(*first.last().unwrap() as i64)
    );
    assert!(s.runs("chest").await.is_empty(), "no run on old data");
    let grown = s.add_data(32, 32).await;
    let new: Vec<u64> = grown
        .iter()
        .copied()
        .filter(|q| !first.contains(q))
        .collect();
    s.set_clock(t1 + hours(1) + jiff::SignedDuration::from_secs(5));
    let run = wait_until(WAIT, "the restored schedule's run", || async {
        s.runs("chest")
            .await
            .into_iter()
            .find(|r| r.name_any() == format!("chest-{}", (t1 + hours(1)).as_second() / 60))
    })
    .await
    .unwrap();
    assert_eq!(
        window_of(&run).new,
        new,
        "only the shards v1 was not trained on"
    );
    let v1 = Registry::open(&s.uri("registry"))
        .unwrap()
        .version("chest", 1)
        .await
        .unwrap();
    let v1_folder = v1.spec.weights_uri.trim_end_matches("/encoder.safetensors");
    assert_eq!(run.spec.model.init_from.as_deref(), Some(v1_folder));
    let st = s.cts().get("chest").await.unwrap().status.unwrap();
    assert_eq!(st.data_watermark, Some(*first.last().unwrap() as i64));
    assert_eq!(st.last_registered_version, Some(1));
    let reasons = cluster
        .kubectl_ok(&[
            "get",
            "events",
            "-n",
            "restore",
            "-o",
            "jsonpath={.items[*].reason}",
        ])
        .unwrap();
    assert!(reasons.contains("WatermarkRecovered"), "{reasons}");
}

/// Closing the loop: a ContinualTraining that needs four new shards also runs on a single new
/// shard when a trusted site's ModelMonitor report says production drifts. The run and the
/// version it registers carry the site's evidence, `radfm registry lineage` and the HTML record
/// show it, a report signed with another key does not count, and the same report does not
/// trigger again once a run after it has succeeded.
#[tokio::test]
async fn drift_at_a_trusted_site_retrains_on_new_data_and_the_version_names_the_evidence() {
    let _serial = serial().await;
    let cluster = Cluster::start(1, 0).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (_ns, s) = start(&cluster, "drift", dir.path()).await;
    let clock = s.clock.display().to_string();
    let _op = cluster
        .start_operator("drift", "operator-drift", &["--clock-file", &clock])
        .unwrap();
    let radfm = |args: &[&str]| radfm_e2e::ok(&radfm_e2e::radfm(args, &[]));
    let keys = dir.path().join("keys");
    let key_dir = keys.display().to_string();
    let north_public = radfm(&["keygen", "--out", &key_dir, "--site", "north"]);
    radfm(&["keygen", "--out", &key_dir, "--site", "impostor"]);
    let first = s.add_data(0, 64).await;
    assert!(first.len() >= 4, "{first:?}");
    s.apply(&ct_yaml(
        "chest",
        &s,
        &format!(
            "  baseModel: {{model: chest, alias: production}}\n  trigger:\n    minNewShards: 4\n    \
             drift: {{trustedSites: [{{site: north, publicKey: '{}'}}], minSites: 1}}\n",
            north_public.trim()
        ),
    ));
    let ct = s
        .wait_ct("chest", "next schedule time", |ct| {
            ct.status
                .as_ref()
                .is_some_and(|st| st.next_schedule_time.is_some())
        })
        .await;
    let t1 = next_hour(ct.metadata.creation_timestamp.clone().unwrap().0);

    // v1 from every shard (new data), promoted to production.
    s.set_clock(t1 + jiff::SignedDuration::from_secs(5));
    let runs = s.wait_run_count("chest", 1).await;
    s.train(&runs[0].name_any()).await;
    s.wait_ct("chest", "v1 registered", |ct| {
        ct.status
            .as_ref()
            .is_some_and(|st| st.last_registered_version == Some(1))
    })
    .await;
    let registry = s.uri("registry");
    radfm(&[
        "registry",
        "promote",
        &registry,
        "chest",
        "1",
        "--reason",
        "validated",
    ]);

    // One new shard and no drift: below minNewShards, no run.
    let more = s.add_data(64, 16).await;
    let new: Vec<u64> = more[first.len()..].to_vec();
    assert!((1..4).contains(&new.len()), "{more:?}");
    let t2 = t1 + hours(1);
    s.set_clock(t2 + jiff::SignedDuration::from_secs(5));
    let ct = s.wait_handled("chest", t2).await;
    let data_ready = radfm_api::conditions::get(
        &ct.status.as_ref().unwrap().conditions,
        radfm_api::conditions::ContinualConditionType::DataReady,
    )
    .cloned()
    .unwrap();
    assert_eq!(data_ready.status, "False", "{data_ready:?}");
    assert!(
        data_ready.message.contains("0 drifting"),
        "{}",
        data_ready.message
    );
    assert_eq!(s.runs("chest").await.len(), 1);

    // North's monitor looks at production on cases from a replaced scanner and finds drift;
    // an impostor's report, stored under another site's name, does not count.
    radfm(&[
        "synth",
        "--out",
        &s.uri("north-recent"),
        "--samples",
        "96",
        "--size",
        "32",
        "--sites",
        "north",
        "--shift-site",
        "north",
        "--seed",
        "9",
    ]);
    let look = |site: &str, key: &str| {
        radfm(&[
            "monitor",
            "--registry",
            &registry,
            "--model",
            "chest",
            "--site",
            site,
            "--key-file",
            &keys.join(key).display().to_string(),
            "--reference",
            &s.uri("data"),
            "--recent",
            &s.uri("north-recent"),
            "--fields",
            "manufacturer",
            "--permutations",
            "199",
            "--alpha",
            "0.05",
            "--json",
        ])
    };
    let report: serde_json::Value = serde_json::from_str(&look("north", "north.key")).unwrap();
    assert_eq!(report["drifting"], true, "{report:#}");
    look("east", "impostor.key");

    // The next scheduled time runs on the one new shard, for the drift.
    let t3 = t2 + hours(1);
    s.set_clock(t3 + jiff::SignedDuration::from_secs(5));
    let runs = s.wait_run_count("chest", 2).await;
    let run2 = runs
        .iter()
        .find(|r| r.name_any() == format!("chest-{}", t3.as_second() / 60))
        .unwrap();
    assert_eq!(window_of(run2).new, new);
    let trigger: radfm_api::continual::RunTrigger =
        serde_json::from_str(&run2.annotations()[radfm_api::continual::ANNOTATION_TRIGGER])
            .unwrap();
    assert_eq!(trigger.kind, radfm_api::continual::TriggerKind::Drift);
    let sites: Vec<&str> = trigger.drift.iter().map(|d| d.site.as_str()).collect();
    assert_eq!(sites, ["north"], "{trigger:?}");
    assert!(
        trigger.drift[0]
            .evidence
            .iter()
            .any(|e| e.starts_with("metadata:manufacturer")),
        "{trigger:?}"
    );
    let events = cluster
        .kubectl_ok(&["get", "events", "-n", "drift", "-o", "json"])
        .unwrap();
    assert!(
        events.contains("MonitorReportRefused") && events.contains("site east is not in"),
        "{events}"
    );
    s.train(&run2.name_any()).await;
    s.wait_ct("chest", "v2 registered", |ct| {
        ct.status
            .as_ref()
            .is_some_and(|st| st.last_registered_version == Some(2))
    })
    .await;
    let reg = Registry::open(&registry).unwrap();
    let v2 = reg.version("chest", 2).await.unwrap();
    assert_eq!(v2.spec.parent, Some(1));
    assert_eq!(v2.spec.trigger.as_ref(), Some(&trigger));
    let lineage = radfm(&["registry", "lineage", &registry, "chest", "2"]);
    assert!(
        lineage.contains("triggered by Drift") && lineage.contains("drift at north (chest v1"),
        "{lineage}"
    );
    let html = dir.path().join("record.html");
    radfm(&[
        "report",
        "--registry",
        &registry,
        "--out",
        &html.display().to_string(),
        "chest",
        "2",
    ]);
    let html = std::fs::read_to_string(&html).unwrap();
    assert!(
        html.contains(r#"data-trigger="Drift""#) && html.contains(r#"<li data-site="north">"#),
        "the record shows why v2 exists"
    );

    // The same report predates v2's success: with one more new shard, no run.
    s.add_data(80, 16).await;
    let t4 = t3 + hours(1);
    s.set_clock(t4 + jiff::SignedDuration::from_secs(5));
    s.wait_handled("chest", t4).await;
    assert_eq!(s.runs("chest").await.len(), 2);
}
