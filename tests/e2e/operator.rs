//! End-to-end tests of the TrainingJob operator against a real API server, the real scheduler and
//! kwok-simulated GPU nodes. Each test has its own control plane and namespace; the operator runs
//! as its own binary under its ServiceAccount's RBAC.
#![allow(
    clippy::too_many_lines,
    reason = "a scenario test reads as one story from setup to the last assertion"
)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, ListParams, Patch, PatchParams};
use radfm_api::TrainingJob;
use radfm_api::conditions::{self, ConditionType};
use radfm_api::trainingjob::Phase;
use radfm_e2e::{Cluster, serial, wait_until};

const WAIT: Duration = Duration::from_secs(60);

fn job_yaml(name: &str, replicas: i32, extra: &str) -> String {
    format!(
        "apiVersion: radfm.io/v1alpha1\nkind: TrainingJob\nmetadata: {{name: {name}}}\nspec:\n  image: radfm/trainer:test\n  \
         workers: {{replicas: {replicas}, gpusPerWorker: 4}}\n  dataset: {{uri: 's3://data/cohort'}}\n  \
         checkpoint: {{uri: 's3://ckpt/{name}'}}\n  training: {{steps: 100}}\n{extra}"
    )
}

struct Env<'a> {
    cluster: &'a Cluster,
    ns: String,
}

impl Env<'_> {
    fn apply(&self, yaml: &str) -> std::process::Output {
        self.cluster
            .kubectl_stdin(&["apply", "-n", &self.ns, "-f", "-"], Some(yaml))
    }

    fn apply_ok(&self, yaml: &str) {
        let out = self.apply(yaml);
        assert!(
            out.status.success(),
            "kubectl apply: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn jobs(&self) -> Api<TrainingJob> {
        Api::namespaced(self.cluster.client.clone(), &self.ns)
    }

    fn pods_api(&self) -> Api<Pod> {
        Api::namespaced(self.cluster.client.clone(), &self.ns)
    }

    async fn pods(&self, job: &str) -> Vec<Pod> {
        let lp = ListParams::default().labels(&format!("radfm.io/job-name={job}"));
        let mut pods = self.pods_api().list(&lp).await.expect("list pods").items;
        pods.sort_by_key(|p| p.metadata.name.clone());
        pods
    }

    async fn pod_names(&self, job: &str) -> Vec<String> {
        self.pods(job)
            .await
            .into_iter()
            .filter_map(|p| p.metadata.name)
            .collect()
    }

    /// Waits until the job satisfies `pred`, returning it.
    async fn wait_job(
        &self,
        name: &str,
        what: &str,
        pred: impl Fn(&TrainingJob) -> bool,
    ) -> TrainingJob {
        radfm_e2e::wait_object(&self.jobs(), name, WAIT, what, pred).await
    }

    async fn wait_phase(&self, name: &str, phase: Phase) -> TrainingJob {
        self.wait_job(name, &format!("phase {phase:?}"), |j| {
            j.status.as_ref().and_then(|s| s.phase) == Some(phase)
        })
        .await
    }

    /// Waits until `n` pods of attempt `attempt` are Running on nodes.
    async fn wait_running(&self, job: &str, attempt: i32, n: usize) -> Vec<Pod> {
        wait_until(
            WAIT,
            &format!("{n} running pods of {job} attempt {attempt}"),
            || async {
                let pods: Vec<Pod> = self
                    .pods(job)
                    .await
                    .into_iter()
                    .filter(|p| {
                        p.labels().get("radfm.io/attempt").map(String::as_str)
                            == Some(&attempt.to_string())
                    })
                    .filter(|p| {
                        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                    })
                    .collect();
                (pods.len() == n).then_some(pods)
            },
        )
        .await
        .unwrap()
    }

    async fn end(&self, pod: &str, code: i32, reason: &str) {
        self.cluster
            .end_pod(&self.ns, pod, code, reason)
            .await
            .unwrap();
    }

    async fn set_suspend(&self, name: &str, suspend: bool) {
        let patch = serde_json::json!({"spec": {"runPolicy": {"suspend": suspend}}});
        self.jobs()
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    }
}

use kube::ResourceExt;

fn condition(job: &TrainingJob, ty: ConditionType) -> (String, String, String) {
    let c = conditions::get(&job.status.as_ref().unwrap().conditions, ty)
        .unwrap_or_else(|| panic!("no {ty:?}"));
    (c.status.clone(), c.reason.clone(), c.message.clone())
}

async fn setup<'a>(
    cluster: &'a Cluster,
    ns: &str,
) -> (radfm_e2e::TestNamespace<'a>, radfm_e2e::Operator) {
    setup_with(cluster, ns, &[]).await
}

/// [`setup`] with extra operator flags (a wider pod policy).
async fn setup_with<'a>(
    cluster: &'a Cluster,
    ns: &str,
    flags: &[&str],
) -> (radfm_e2e::TestNamespace<'a>, radfm_e2e::Operator) {
    let guard = cluster.namespace(ns).await.unwrap();
    let op = cluster
        .start_operator(ns, &format!("operator-{ns}"), flags)
        .unwrap();
    (guard, op)
}

#[tokio::test]
async fn invalid_trainingjobs_are_rejected_naming_the_field() {
    let _serial = serial().await;
    let cluster = Cluster::start(1, 8).await.unwrap();
    let (_ns, _op) = setup(&cluster, "invalid").await;
    let env = Env {
        cluster: &cluster,
        ns: "invalid".into(),
    };
    let base = job_yaml("ok", 2, "");
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "missing image",
            base.replace("  image: radfm/trainer:test\n", ""),
            "spec.image: Required value",
        ),
        (
            "replicas 0",
            base.replace("replicas: 2", "replicas: 0"),
            "spec.workers.replicas: Invalid value: 0",
        ),
        (
            "negative GPUs",
            base.replace("gpusPerWorker: 4", "gpusPerWorker: -1"),
            "spec.workers.gpusPerWorker: Invalid value: -1",
        ),
        (
            "unknown cleanPodPolicy",
            job_yaml("ok", 2, "  runPolicy: {cleanPodPolicy: Sometimes}\n"),
            "spec.runPolicy.cleanPodPolicy: Unsupported value: \"Sometimes\"",
        ),
        (
            "bad URI scheme",
            base.replace("s3://data/cohort", "http://data/cohort"),
            "dataset.uri must start with s3://, gs://, az:// or file://",
        ),
        (
            "steps and epochs",
            base.replace(
                "training: {steps: 100}",
                "training: {steps: 100, epochs: 2}",
            ),
            "exactly one of training.steps and training.epochs must be set",
        ),
        (
            "a schedule window that starts past its end",
            base.replace(
                "training: {steps: 100}",
                "training: {steps: 100, schedule: {startStep: 200, totalSteps: 200}}",
            ),
            "training.schedule.startStep must be below training.schedule.totalSteps",
        ),
        (
            "a TTL past any representable time",
            job_yaml(
                "ok",
                2,
                "  runPolicy: {ttlSecondsAfterFinished: 9223372036854775807}\n",
            ),
            "spec.runPolicy.ttlSecondsAfterFinished: Invalid value",
        ),
        (
            "an empty objective",
            job_yaml("ok", 2, "  model: {objective: {}}\n"),
            "model.objective needs mae, contrastive or both",
        ),
        (
            "a zero objective weight",
            job_yaml("ok", 2, "  model: {objective: {mae: 1, contrastive: 0}}\n"),
            "model.objective.contrastive must be a weight in (0, 100]",
        ),
        (
            "unknown field",
            job_yaml("ok", 2, "  replicaz: 3\n"),
            "unknown field \"spec.replicaz\"",
        ),
        (
            "long name",
            base.replace("name: ok", &format!("name: {}", "x".repeat(41))),
            "metadata.name must be a DNS-1035 label of at most 40",
        ),
    ];
    for (what, yaml, want) in &cases {
        let out = env.apply(yaml);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: accepted");
        assert!(err.contains(want), "{what}: {err}");
    }
    // Changing the gang of a running job is refused; suspended, it is allowed.
    env.apply_ok(&base);
    env.wait_running("ok", 1, 2).await;
    let out = env.apply(&base.replace("replicas: 2", "replicas: 3"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("workers.replicas cannot change while the gang is running"),
        "{err}"
    );
    env.set_suspend("ok", true).await;
    env.wait_phase("ok", Phase::Suspended).await;
    env.apply_ok(
        &base
            .replace("replicas: 2", "replicas: 3")
            .replace("training:", "runPolicy: {suspend: true}\n  training:"),
    );
}

#[tokio::test]
async fn sample_job_runs_on_gpu_nodes_and_kubectl_get_shows_its_columns() {
    let _serial = serial().await;
    let cluster = Cluster::start(4, 8).await.unwrap();
    let (_ns, op) = setup(&cluster, "sample").await;
    let env = Env {
        cluster: &cluster,
        ns: "sample".into(),
    };
    let sample = radfm_e2e::repo_root().join("manifests/samples/trainingjob.yaml");
    cluster
        .kubectl_ok(&["apply", "-n", "sample", "-f", &sample.to_string_lossy()])
        .unwrap();
    let pods = env.wait_running("mae-chest-xray", 1, 2).await;
    // The gang's own Secret and NetworkPolicy exist, owned by the job.
    let owned = cluster
        .kubectl_ok(&[
            "get",
            "secrets,networkpolicies",
            "-n",
            "sample",
            "-l",
            "radfm.io/job-name=mae-chest-xray",
            "-o",
            "jsonpath={range .items[*]}{.kind}/{.metadata.ownerReferences[0].kind} {end}",
        ])
        .unwrap();
    assert_eq!(
        owned.trim(),
        "Secret/TrainingJob NetworkPolicy/TrainingJob",
        "{owned}"
    );
    let nodes: BTreeSet<String> = pods
        .iter()
        .filter_map(|p| p.spec.as_ref()?.node_name.clone())
        .collect();
    assert_eq!(
        nodes.len(),
        2,
        "8 GPUs per worker: one worker per 8-GPU node"
    );
    let svc: Service = Api::namespaced(cluster.client.clone(), "sample")
        .get("mae-chest-xray")
        .await
        .unwrap();
    assert_eq!(svc.spec.unwrap().cluster_ip.as_deref(), Some("None"));
    let job = env.wait_phase("mae-chest-xray", Phase::Running).await;
    assert_eq!(condition(&job, ConditionType::Running).0, "True");
    assert_eq!(
        job.status.as_ref().unwrap().observed_generation,
        job.metadata.generation
    );

    // Rank 0 reports progress on its own pod; the operator surfaces it in the columns.
    let rank0 = pods
        .iter()
        .find(|p| p.labels()["radfm.io/rank"] == "0")
        .unwrap()
        .name_any();
    let ann = serde_json::json!({"metadata": {"annotations": {
        "radfm.io/progress": r#"{"step":1200,"totalSteps":100000,"loss":0.4375,"imagesPerSecond":950.5}"#}}});
    // ...with the credentials the operator gave the job's pods, which reach this gang's pods and
    // nothing else.
    let trainer = cluster
        .service_account_kubeconfig("sample", "mae-chest-xray-trainer")
        .unwrap();
    let as_trainer: Api<Pod> =
        Api::namespaced(radfm_e2e::client_from(&trainer).await.unwrap(), "sample");
    as_trainer
        .patch(&rank0, &PatchParams::default(), &Patch::Merge(&ann))
        .await
        .unwrap();
    let can = |verb: &str, what: &str| {
        let out = cluster.kubectl(&[
            "auth",
            "can-i",
            verb,
            what,
            "-n",
            "sample",
            "--as",
            "system:serviceaccount:sample:mae-chest-xray-trainer",
        ]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(can("patch", "pods/mae-chest-xray-w0-a1"), "yes");
    assert_eq!(can("get", "pods/mae-chest-xray-w0-a1"), "no");
    assert_eq!(
        can("patch", "pods/mae-chest-xray-w1-a1"),
        "no",
        "another rank's pod"
    );
    assert_eq!(can("patch", "pods/another-job-w0-a1"), "no");
    assert_eq!(can("list", "pods"), "no");
    assert_eq!(can("get", "secrets/radiology-s3"), "no");
    env.wait_job("mae-chest-xray", "progress", |j| {
        j.status
            .as_ref()
            .and_then(|s| s.progress.as_ref())
            .is_some_and(|p| p.step == 1200)
    })
    .await;
    // The operator's endpoints report the job and its leadership.
    let addr = op.metrics_addr(&cluster).await.unwrap();
    assert_eq!(radfm_e2e::http_get_text(&addr, "/readyz").unwrap().0, 200);
    assert_eq!(radfm_e2e::http_get_text(&addr, "/healthz").unwrap().0, 200);
    let (code, metrics) = radfm_e2e::http_get_text(&addr, "/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.contains("radfm_operator_jobs{phase=\"Running\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("radfm_operator_leader 1"), "{metrics}");
    assert!(
        metrics.contains("radfm_operator_reconcile_duration_seconds_count"),
        "{metrics}"
    );
    let table = cluster.kubectl_ok(&["get", "tj", "-n", "sample"]).unwrap();
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "PHASE", "READY", "STEP", "LOSS", "RESTARTS", "AGE"]
    );
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(
        &row[..6],
        ["mae-chest-xray", "Running", "2/2", "1200", "0.4375", "0"],
        "{table}"
    );
}

#[tokio::test]
async fn all_workers_succeeding_completes_the_job_and_cleans_pods() {
    let _serial = serial().await;
    // Room for both jobs at once (5 pods of 4 GPUs); with less, whichever job the scheduler
    // placed first decided whether `done` could ever have all three pods running.
    let cluster = Cluster::start(3, 8).await.unwrap();
    let (_ns, _op) = setup(&cluster, "success").await;
    let env = Env {
        cluster: &cluster,
        ns: "success".into(),
    };
    env.apply_ok(&job_yaml("done", 3, "  runPolicy: {cleanPodPolicy: All}\n"));
    env.apply_ok(&job_yaml("keep", 2, ""));
    for pod in env.wait_running("done", 1, 3).await {
        env.end(&pod.name_any(), 0, "Completed").await;
    }
    for pod in env.wait_running("keep", 1, 2).await {
        env.end(&pod.name_any(), 0, "Completed").await;
    }
    let job = env.wait_phase("done", Phase::Succeeded).await;
    let st = job.status.clone().unwrap();
    assert!(st.completion_time.is_some());
    assert_eq!(condition(&job, ConditionType::Succeeded).1, "JobSucceeded");
    wait_until(WAIT, "cleanPodPolicy All deletes every pod", || async {
        env.pod_names("done").await.is_empty().then_some(())
    })
    .await
    .unwrap();
    env.wait_phase("keep", Phase::Succeeded).await;
    assert_eq!(
        env.pod_names("keep").await.len(),
        2,
        "cleanPodPolicy Running keeps finished pods for their logs"
    );
    // Terminal state is sticky: nothing comes back, and the status does not move.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(env.pod_names("done").await.is_empty());
    let again = env.jobs().get("done").await.unwrap();
    assert_eq!(again.status.unwrap().completion_time, st.completion_time);
}

#[tokio::test]
async fn retryable_exit_restarts_the_whole_gang_and_permanent_exit_fails_the_job() {
    let _serial = serial().await;
    let cluster = Cluster::start(3, 8).await.unwrap();
    let (_ns, _op) = setup(&cluster, "failures").await;
    let env = Env {
        cluster: &cluster,
        ns: "failures".into(),
    };
    env.apply_ok(&job_yaml("retry", 3, "  runPolicy: {backoffLimit: 1}\n"));
    env.apply_ok(&job_yaml("perm", 2, ""));

    let pods = env.wait_running("retry", 1, 3).await;
    env.end(&pods[1].name_any(), radfm_api::exit::PEER_LOST, "Error")
        .await;
    let pods2 = env.wait_running("retry", 2, 3).await;
    let names: Vec<String> = pods2.iter().map(|p| p.name_any()).collect();
    assert_eq!(names, ["retry-w0-a2", "retry-w1-a2", "retry-w2-a2"]);
    wait_until(WAIT, "attempt 1 pods gone", || async {
        env.pod_names("retry")
            .await
            .iter()
            .all(|n| n.ends_with("-a2"))
            .then_some(())
    })
    .await
    .unwrap();
    let job = env.wait_phase("retry", Phase::Running).await;
    let st = job.status.clone().unwrap();
    assert_eq!((st.attempt, st.restarts, st.counted_restarts), (2, 1, 1));
    let env_attempt = pods2[0].spec.as_ref().unwrap().containers[0]
        .env
        .as_ref()
        .unwrap()
        .iter()
        .find(|e| e.name == "RADFM_ATTEMPT")
        .cloned();
    assert_eq!(env_attempt.and_then(|e| e.value).as_deref(), Some("2"));

    // backoffLimit 1 is used up: the next retryable failure fails the job.
    env.end("retry-w0-a2", 1, "Error").await;
    let job = env.wait_phase("retry", Phase::Failed).await;
    let (_, why, msg) = condition(&job, ConditionType::Failed);
    assert_eq!(why, "BackoffLimitExceeded");
    assert!(msg.contains("worker 0 exited with code 1"), "{msg}");

    let pods = env.wait_running("perm", 1, 2).await;
    env.end(
        &pods[0].name_any(),
        radfm_api::exit::INVALID_CONFIG,
        "Error",
    )
    .await;
    let job = env.wait_phase("perm", Phase::Failed).await;
    let (_, why, msg) = condition(&job, ConditionType::Failed);
    assert_eq!(why, "PermanentFailure");
    assert!(msg.contains("exited with code 64 (InvalidConfig)"), "{msg}");
    assert_eq!(job.status.unwrap().restarts, 0);
    let events = cluster
        .kubectl_ok(&[
            "get",
            "events",
            "-n",
            "failures",
            "-o",
            "jsonpath={.items[*].reason}",
        ])
        .unwrap();
    assert!(
        events.contains("WorkerFailed") && events.contains("PermanentFailure"),
        "{events}"
    );
}

#[tokio::test]
async fn lost_node_restarts_the_gang_and_stuck_pods_are_force_deleted() {
    let _serial = serial().await;
    let cluster = Cluster::start(3, 8).await.unwrap();
    let (_ns, _op) = setup(&cluster, "nodeloss").await;
    let env = Env {
        cluster: &cluster,
        ns: "nodeloss".into(),
    };
    env.apply_ok(
        &job_yaml("mae", 2, "  runPolicy: {terminatingTimeoutSeconds: 3}\n")
            .replace("gpusPerWorker: 4", "gpusPerWorker: 8"),
    );
    let pods = env.wait_running("mae", 1, 2).await;
    let victim = pods[0].spec.as_ref().unwrap().node_name.clone().unwrap();
    cluster.delete_node(&victim).await.unwrap();
    // The pod on the deleted node has no kubelet to finish its deletion: it stays Terminating
    // until the operator force-deletes it; then attempt 2 runs on the remaining nodes.
    env.wait_running("mae", 2, 2).await;
    let job = env.wait_phase("mae", Phase::Running).await;
    let st = job.status.clone().unwrap();
    assert_eq!(
        (st.attempt, st.restarts, st.counted_restarts),
        (2, 1, 0),
        "node loss is not counted"
    );
    let (_, why, msg) = condition(&job, ConditionType::Restarting);
    assert_eq!(why, "Restarted");
    assert!(msg.contains("attempt 2"), "{msg}");
    assert!(
        env.pod_names("mae")
            .await
            .iter()
            .all(|n| n.ends_with("-a2"))
    );
    let log = std::fs::read_to_string(cluster.log_path("operator-nodeloss")).unwrap();
    assert!(
        log.contains(&format!("force_delete=[\"{}\"]", pods[0].name_any())),
        "the stuck pod was force-deleted:\n{log}"
    );
    let events = cluster
        .kubectl_ok(&[
            "get",
            "events",
            "-n",
            "nodeloss",
            "-o",
            "jsonpath={.items[*].message}",
        ])
        .unwrap();
    assert!(
        events.contains("worker 0 lost its node") || events.contains("worker 1 lost its node"),
        "{events}"
    );
}

#[tokio::test]
async fn suspend_resume_deadline_and_ttl() {
    let _serial = serial().await;
    let cluster = Cluster::start(2, 8).await.unwrap();
    let (_ns, _op) = setup(&cluster, "lifecycle").await;
    let env = Env {
        cluster: &cluster,
        ns: "lifecycle".into(),
    };

    env.apply_ok(&job_yaml("pause", 2, ""));
    env.wait_running("pause", 1, 2).await;
    env.set_suspend("pause", true).await;
    let job = env.wait_phase("pause", Phase::Suspended).await;
    assert_eq!(condition(&job, ConditionType::Suspended).0, "True");
    wait_until(WAIT, "suspended pods deleted", || async {
        env.pod_names("pause").await.is_empty().then_some(())
    })
    .await
    .unwrap();
    env.set_suspend("pause", false).await;
    env.wait_running("pause", 2, 2).await;
    let job = env.wait_phase("pause", Phase::Running).await;
    assert_eq!(condition(&job, ConditionType::Suspended).1, "JobResumed");

    env.apply_ok(&job_yaml(
        "late",
        1,
        "  runPolicy: {activeDeadlineSeconds: 3}\n",
    ));
    let job = env.wait_phase("late", Phase::Failed).await;
    assert_eq!(condition(&job, ConditionType::Failed).1, "DeadlineExceeded");

    env.apply_ok(&job_yaml(
        "brief",
        1,
        "  runPolicy: {ttlSecondsAfterFinished: 2}\n",
    ));
    let pods = env.wait_running("brief", 1, 1).await;
    env.end(&pods[0].name_any(), 0, "Completed").await;
    wait_until(WAIT, "job deleted after its TTL", || async {
        env.jobs()
            .get_opt("brief")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        env.pod_names("brief").await.is_empty(),
        "no child returns after the TTL deletion"
    );
    let svc: Api<Service> = Api::namespaced(cluster.client.clone(), "lifecycle");
    assert!(svc.get_opt("brief").await.unwrap().is_none());
}

#[tokio::test]
async fn operator_killed_while_creating_a_large_gang_leaves_no_duplicates() {
    let _serial = serial().await;
    let cluster = Cluster::start(4, 8).await.unwrap();
    let ns = cluster.namespace("crash").await.unwrap();
    let env = Env {
        cluster: &cluster,
        ns: ns.name.clone(),
    };
    env.apply_ok(&job_yaml("big", 32, "").replace("gpusPerWorker: 4", "gpusPerWorker: 1"));
    let mut op = cluster
        .start_operator("crash", "operator-crash-1", &[])
        .unwrap();
    wait_until(WAIT, "some pods created", || async {
        (!env.pod_names("big").await.is_empty()).then_some(())
    })
    .await
    .unwrap();
    op.kill();
    let partial = env.pod_names("big").await.len();
    let _op2 = cluster
        .start_operator("crash", "operator-crash-2", &[])
        .unwrap();
    env.wait_running("big", 1, 32).await;
    let job = env.wait_phase("big", Phase::Running).await;
    let names = env.pod_names("big").await;
    let unique: BTreeSet<&String> = names.iter().collect();
    assert_eq!(
        (names.len(), unique.len()),
        (32, 32),
        "killed after {partial} pods"
    );
    let st = job.status.unwrap();
    assert_eq!(
        (st.attempt, st.restarts, st.ready.as_deref()),
        (1, 0, Some("32/32"))
    );
}

#[tokio::test]
async fn two_operator_replicas_elect_one_leader_and_fail_over() {
    let _serial = serial().await;
    let cluster = Cluster::start(2, 8).await.unwrap();
    let ns = cluster.namespace("leader").await.unwrap();
    let env = Env {
        cluster: &cluster,
        ns: ns.name.clone(),
    };
    let lease_args = ["--lease-seconds", "4"];
    let mut a = cluster
        .start_operator("leader", "operator-a", &lease_args)
        .unwrap();
    let holder = || async {
        let out = cluster
            .kubectl_ok(&[
                "get",
                "lease",
                "radfm-operator",
                "-n",
                "leader",
                "-o",
                "jsonpath={.spec.holderIdentity}",
            ])
            .ok()?;
        (!out.is_empty()).then_some(out)
    };
    assert_eq!(
        wait_until(WAIT, "a leader", holder).await.unwrap(),
        "operator-a"
    );
    let mut b = cluster
        .start_operator("leader", "operator-b", &lease_args)
        .unwrap();
    env.apply_ok(&job_yaml("one", 1, ""));
    env.wait_phase("one", Phase::Running).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        holder().await.as_deref(),
        Some("operator-a"),
        "the standby does not take a live lease"
    );
    let b_log = std::fs::read_to_string(cluster.log_path("operator-b")).unwrap();
    assert!(!b_log.contains("became leader"), "{b_log}");

    // The leader dies without releasing its lease: the standby takes over once it expires.
    let killed = Instant::now();
    a.kill();
    wait_until(Duration::from_secs(30), "operator-b leads", || async {
        (holder().await.as_deref() == Some("operator-b")).then_some(())
    })
    .await
    .unwrap();
    let took = killed.elapsed();
    env.apply_ok(&job_yaml("two", 1, ""));
    env.wait_phase("two", Phase::Running).await;
    eprintln!(
        "leader takeover after SIGKILL: {:.1} s (lease 4 s)",
        took.as_secs_f64()
    );

    // A graceful stop (SIGTERM) releases the lease for the next standby.
    let _c = cluster
        .start_operator("leader", "operator-c", &lease_args)
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    b.terminate(Duration::from_secs(30)).unwrap();
    let b_log = std::fs::read_to_string(cluster.log_path("operator-b")).unwrap();
    assert!(b_log.contains("leader lease released"), "{b_log}");
    wait_until(WAIT, "operator-c leads", || async {
        (holder().await.as_deref() == Some("operator-c")).then_some(())
    })
    .await
    .unwrap();
    env.apply_ok(&job_yaml("three", 1, ""));
    env.wait_phase("three", Phase::Running).await;
}

#[tokio::test]
async fn helm_chart_lints_installs_and_agrees_with_the_manifests() {
    let _serial = serial().await;
    let cluster = Cluster::start(1, 8).await.unwrap();
    let chart = radfm_e2e::repo_root().join("charts/radfm");
    // The harness installed manifests/rbac.yaml; the chart must be able to own the same objects.
    cluster
        .kubectl_ok(&[
            "delete",
            "-f",
            &radfm_e2e::repo_root()
                .join("manifests/rbac.yaml")
                .to_string_lossy(),
        ])
        .unwrap();
    let lint = cluster.helm(&["lint", "--strict", &chart.to_string_lossy()]);
    assert!(
        lint.status.success(),
        "{}",
        String::from_utf8_lossy(&lint.stdout)
    );

    // The chart's CRDs are the generated ones; its RBAC rules are the manifests' rules.
    let crd_dir = radfm_e2e::repo_root().join("manifests/crds");
    for entry in std::fs::read_dir(&crd_dir).unwrap() {
        let entry = entry.unwrap();
        let chart_copy = chart.join("crds").join(entry.file_name());
        assert_eq!(
            std::fs::read_to_string(entry.path()).unwrap(),
            std::fs::read_to_string(&chart_copy).unwrap(),
            "run `make crds`"
        );
    }
    let rendered = cluster.helm(&[
        "template",
        "radfm",
        &chart.to_string_lossy(),
        "-n",
        "radfm-system",
    ]);
    assert!(
        rendered.status.success(),
        "{}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    // Object-store credentials for the registry reach the operator only when named.
    let with_secret = cluster.helm(&[
        "template",
        "radfm",
        &chart.to_string_lossy(),
        "--set",
        "objectStoreCredentialsSecret=registry-s3",
    ]);
    let text = String::from_utf8_lossy(&with_secret.stdout);
    assert!(
        text.contains("envFrom:\n        - secretRef: {name: \"registry-s3\"}"),
        "{text}"
    );
    assert!(!String::from_utf8_lossy(&rendered.stdout).contains("envFrom"));
    let rules = |text: &str| -> Vec<(String, serde_json::Value)> {
        let mut out = Vec::new();
        for doc in serde_yaml_ng::Deserializer::from_str(text) {
            let v: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
            if v["kind"] == "ClusterRole" || v["kind"] == "Role" {
                out.push((
                    v["metadata"]["name"].as_str().unwrap().to_string(),
                    v["rules"].clone(),
                ));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    };
    let manifests =
        std::fs::read_to_string(radfm_e2e::repo_root().join("manifests/rbac.yaml")).unwrap();
    assert_eq!(
        rules(&String::from_utf8_lossy(&rendered.stdout)),
        rules(&manifests)
    );

    let install = cluster.helm(&[
        "install",
        "radfm",
        &chart.to_string_lossy(),
        "-n",
        "radfm-release",
        "--create-namespace",
        "--wait=false",
    ]);
    assert!(
        install.status.success(),
        "{}",
        String::from_utf8_lossy(&install.stderr)
    );
    let deploy = cluster
        .kubectl_ok(&[
            "get",
            "deployment",
            "radfm-operator",
            "-n",
            "radfm-release",
            "-o",
            "jsonpath={.spec.replicas}",
        ])
        .unwrap();
    assert_eq!(deploy, "2");
    let sa = cluster
        .kubectl_ok(&[
            "auth",
            "can-i",
            "create",
            "pods",
            "--as=system:serviceaccount:radfm-release:radfm-operator",
        ])
        .unwrap();
    assert_eq!(sa.trim(), "yes");
    // Least privilege: the operator creates each job's gang Secret but can never read one.
    for (verb, want) in [
        ("create", "yes"),
        ("get", "no"),
        ("list", "no"),
        ("watch", "no"),
    ] {
        let can = cluster.kubectl(&[
            "auth",
            "can-i",
            verb,
            "secrets",
            "--as=system:serviceaccount:radfm-release:radfm-operator",
        ]);
        assert_eq!(
            String::from_utf8_lossy(&can.stdout).trim(),
            want,
            "{verb} secrets"
        );
    }
}

#[tokio::test]
async fn sixty_four_worker_gang_reaches_running() {
    let _serial = serial().await;
    let cluster = Cluster::start(8, 8).await.unwrap();
    let (_ns, _op) = setup(&cluster, "scale").await;
    let env = Env {
        cluster: &cluster,
        ns: "scale".into(),
    };
    let applied = Instant::now();
    env.apply_ok(&job_yaml("wide", 64, "").replace("gpusPerWorker: 4", "gpusPerWorker: 1"));
    env.wait_running("wide", 1, 64).await;
    let job = env.wait_phase("wide", Phase::Running).await;
    let took = applied.elapsed();
    assert_eq!(job.status.unwrap().ready.as_deref(), Some("64/64"));
    eprintln!(
        "64-worker job: apply -> all Running in {:.1} s",
        took.as_secs_f64()
    );
}

#[tokio::test]
async fn errors_creating_workers_appear_in_the_created_condition() {
    let _serial = serial().await;
    let cluster = Cluster::start(1, 8).await.unwrap();
    let (_ns, _op) = setup(&cluster, "createfail").await;
    let env = Env {
        cluster: &cluster,
        ns: "createfail".into(),
    };
    // Extra volumes pass the CRD schema as given; the Pod validation rejects this one.
    let bad = "gpusPerWorker: 4, template: {volumes: [{name: Not_A_DNS_Label, emptyDir: {}}]}}";
    env.apply_ok(&job_yaml("badvol", 1, "").replace("gpusPerWorker: 4}", bad));
    let not_created = |name: &'static str| {
        env.wait_job(name, "Created=False", |j| {
            j.status
                .as_ref()
                .and_then(|s| conditions::get(&s.conditions, ConditionType::Created))
                .is_some_and(|c| c.status == "False")
        })
    };
    let job = not_created("badvol").await;
    let (_, why, msg) = condition(&job, ConditionType::Created);
    assert_eq!(why, "CreateFailed");
    assert!(
        msg.contains("creating pod badvol-w0-a1") && msg.contains("spec.volumes[2].name"),
        "{msg}"
    );
    let events = cluster
        .kubectl_ok(&[
            "get",
            "events",
            "-n",
            "createfail",
            "-o",
            "jsonpath={.items[*].reason}",
        ])
        .unwrap();
    assert!(events.contains("CreateFailed"), "{events}");
    assert!(env.pod_names("badvol").await.is_empty());

    // A node-level volume passes the API server but not the cluster's radfm pod policy: nothing
    // is created, and Created says which field.
    let host = "gpusPerWorker: 4, template: {volumes: [{name: host, hostPath: {path: /etc}}]}}";
    env.apply_ok(&job_yaml("hostvol", 1, "").replace("gpusPerWorker: 4}", host));
    let job = not_created("hostvol").await;
    let (_, why, msg) = condition(&job, ConditionType::Created);
    assert_eq!(why, "PodPolicyViolation");
    assert!(
        msg.contains("spec.workers.template.volumes[0]: volume type hostPath is not allowed"),
        "{msg}"
    );
    assert!(env.pod_names("hostvol").await.is_empty());
}

#[tokio::test]
async fn real_trainer_progress_and_checkpoint_reach_the_trainingjob_status() {
    let _serial = serial().await;
    let cluster = Cluster::start(1, 4).await.unwrap();
    // The admin allows the trainers' own ServiceAccount by name.
    let (_ns, _op) = setup_with(&cluster, "progress", &["--pod-service-accounts=trainer"]).await;
    let env = Env {
        cluster: &cluster,
        ns: "progress".into(),
    };
    // The trainers' ServiceAccount with only the radfm-trainer ClusterRole (pods patch).
    cluster
        .kubectl_ok(&["create", "serviceaccount", "trainer", "-n", "progress"])
        .unwrap();
    cluster
        .kubectl_ok(&[
            "create",
            "rolebinding",
            "radfm-trainer",
            "-n",
            "progress",
            "--clusterrole=radfm-trainer",
            "--serviceaccount=progress:trainer",
        ])
        .unwrap();
    let kubeconfig = cluster
        .service_account_kubeconfig("progress", "trainer")
        .unwrap();
    env.apply_ok(&job_yaml(
        "mae",
        1,
        "  model: {imageSize: 32, patchSize: 8}\n  workers: {replicas: 1, gpusPerWorker: 0, template: {serviceAccountName: trainer}}\n",
    ).replace("  workers: {replicas: 1, gpusPerWorker: 4}\n", ""));
    let pods = env.wait_running("mae", 1, 1).await;
    let pod = &pods[0];

    // Run the real trainer with exactly the pod's env contract, as its container would, with
    // local folders in place of the job's s3:// URIs.
    let work = tempfile::tempdir().unwrap();
    let synth = std::process::Command::new(radfm_e2e::workspace_bin("radfm").unwrap())
        .args(["synth", "--samples", "64", "--size", "32", "--out"])
        .arg(work.path().join("data"))
        .output()
        .unwrap();
    assert!(synth.status.success());
    let container = &pod.spec.as_ref().unwrap().containers[0];
    let mut vars: Vec<(String, String)> = container
        .env
        .iter()
        .flatten()
        .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
        .collect();
    let ckpt = format!("file://{}/ckpt", work.path().display());
    for (k, v) in [
        (
            "RADFM_DATASET_URI",
            format!("file://{}/data", work.path().display()),
        ),
        ("RADFM_CHECKPOINT_URI", ckpt.clone()),
        ("RADFM_POD_NAME", pod.name_any()),
        // One process (a CPU worker): no rendezvous through the pod's DNS name.
        ("RADFM_MASTER_ADDR", "127.0.0.1".into()),
        ("RADFM_STEPS", "30".into()),
        ("RADFM_BATCH_SIZE", "8".into()),
        ("RADFM_THREADS", "1".into()),
        ("KUBECONFIG", kubeconfig.display().to_string()),
    ] {
        vars.retain(|(n, _)| n != k);
        vars.push((k.to_string(), v));
    }
    let out = std::process::Command::new(radfm_e2e::workspace_bin("radfm-trainer").unwrap())
        .arg("train")
        .env_clear()
        .envs(vars)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        !stderr.contains("annotation"),
        "annotating failed: {stderr}"
    );

    let job = env
        .wait_job("mae", "progress and checkpoint from the trainer", |j| {
            j.status.as_ref().is_some_and(|s| {
                s.progress.as_ref().is_some_and(|p| p.step == 30)
                    && s.last_checkpoint.as_ref().is_some_and(|c| c.step == 30)
            })
        })
        .await;
    let st = job.status.unwrap();
    let progress = st.progress.unwrap();
    assert_eq!(progress.total_steps, Some(30));
    assert!(progress.loss.is_some_and(|l| l.is_finite() && l > 0.0));
    assert_eq!(
        st.last_checkpoint.unwrap().uri,
        format!("{ckpt}/manifests/step-000000030-e000001.json")
    );
    let table = cluster
        .kubectl_ok(&["get", "tj", "-n", "progress"])
        .unwrap();
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(&row[..4], ["mae", "Running", "1/1", "30"], "{table}");

    // The CLI's cluster views (`radfm get`, `radfm describe`; also `kubectl radfm ...`).
    let kubeconfig = cluster.kubeconfig.display().to_string();
    let env = [("KUBECONFIG", kubeconfig.as_str())];
    let radfm = |args: &[&str]| radfm_e2e::ok(&radfm_e2e::radfm(args, &env));
    let table = radfm(&["get", "-n", "progress"]);
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(&row[..4], ["mae", "Running", "1/1", "30"], "{table}");
    assert_eq!(row.last(), Some(&"100%"), "{table}");
    let all = radfm(&["get", "-A"]);
    assert!(
        all.lines()
            .any(|l| l.starts_with("progress ") && l.contains(" mae ")),
        "{all}"
    );
    // `radfm logs` finds the rank's newest pod; kwok runs no kubelet, so reading the text itself
    // fails here, naming the pod.
    let logs = |args: &[&str]| {
        let out = radfm_e2e::radfm(args, &env);
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let err = logs(&["logs", "mae", "-n", "progress", "--rank", "3"]);
    assert!(
        err.contains("TrainingJob progress/mae has no pod of rank 3"),
        "{err}"
    );
    let err = logs(&["logs", "mae", "-n", "progress"]);
    assert!(
        err.contains(&format!("logs of pod {}", pod.name_any())),
        "{err}"
    );

    // As a kubectl plugin: `kubectl radfm get` finds kubectl-radfm on PATH.
    let plugins = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(
        radfm_e2e::workspace_bin("radfm").unwrap(),
        plugins.path().join("kubectl-radfm"),
    )
    .unwrap();
    let path = format!(
        "{}:{}",
        plugins.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = std::process::Command::new(cluster.tool("kubectl"))
        .args(["radfm", "get", "mae", "-n", "progress"])
        .env("PATH", path)
        .env("KUBECONFIG", &cluster.kubeconfig)
        .output()
        .unwrap();
    let plugin = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        plugin.lines().nth(1).is_some_and(|l| l.starts_with("mae ")),
        "{plugin}"
    );
    let text = radfm(&["describe", "mae", "-n", "progress"]);
    for needle in [
        "Phase:            Running".to_string(),
        "Progress:         step 30/30".to_string(),
        format!("Last checkpoint:  step 30 {ckpt}/manifests/step-000000030-e000001.json"),
        "Running      True".to_string(),
        pod.name_any(),
    ] {
        assert!(text.contains(&needle), "{needle:?} not in:\n{text}");
    }
}

#[tokio::test]
async fn a_reconcile_that_panics_is_contained_and_every_other_object_is_still_reconciled() {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::runtime::controller::{Action, Controller};
    use radfm_operator::context::{Context, drive};
    use std::sync::{Arc, Mutex};

    let _serial = serial().await;
    let cluster = Cluster::start(0, 0).await.unwrap();
    let ns = cluster.namespace("panics").await.unwrap();
    let maps: Api<ConfigMap> = Api::namespaced(cluster.client.clone(), &ns.name);
    let make = |name: &str| -> ConfigMap {
        serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap()
    };
    for name in ["boom", "fine-1"] {
        maps.create(&Default::default(), &make(name)).await.unwrap();
    }
    let passes: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = passes.clone();
    let reconcile = move |cm: Arc<ConfigMap>, _ctx: Arc<Context>| {
        let seen = seen.clone();
        async move {
            let name = cm.metadata.name.clone().unwrap_or_default();
            seen.lock().unwrap().push(name.clone());
            if name == "boom" {
                panic!("a bug that only this object reaches");
            }
            Ok(Action::await_change())
        }
    };
    let metrics = Arc::new(radfm_operator::metrics::Metrics::default());
    let ctx = Arc::new(Context::new(cluster.client.clone(), metrics.clone(), None));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let controller = Controller::new(maps.clone(), Default::default());
    let running = tokio::spawn(drive(
        controller,
        reconcile,
        ctx,
        async move {
            let _ = stopped.await;
        },
        "ConfigMap",
    ));
    let count = |name: &str| passes.lock().unwrap().iter().filter(|n| *n == name).count();
    wait_until(
        WAIT,
        "fine-1 reconciled and boom retried after its panic",
        || async { (count("fine-1") >= 1 && count("boom") >= 2).then_some(()) },
    )
    .await
    .unwrap();
    // The controller lives on: an object created after the panics is reconciled.
    maps.create(&Default::default(), &make("fine-2"))
        .await
        .unwrap();
    wait_until(WAIT, "fine-2 reconciled", || async {
        (count("fine-2") >= 1).then_some(())
    })
    .await
    .unwrap();
    assert!(!running.is_finished(), "the controller stopped");
    assert!(
        metrics
            .encode()
            .contains("radfm_operator_reconcile_errors_total{kind=\"panic\"}"),
        "{}",
        metrics.encode()
    );
    let _ = stop.send(());
    running.await.unwrap();
}
