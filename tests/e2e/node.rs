//! End-to-end tests on a real node: radfm's own images run as real containers under a real
//! kubelet and containerd, with pod networking, cluster DNS and kube-proxy, in namespaces each
//! test creates for itself (see radfm_e2e::node). `make test-node` runs only these.
#![allow(
    clippy::too_many_lines,
    reason = "a scenario test reads as one story from setup to the last assertion"
)]

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use radfm_api::site_validation::{PromotionPolicy, SiteValidator};
use radfm_api::trainingjob::Phase;
use radfm_api::{ContinualTraining, TrainingJob};
use radfm_e2e::node::{self, NODE_IP, RealNode, TRAINER_IMAGE};
use radfm_e2e::{S3_ACCESS_KEY, S3_SECRET_KEY, wait_object, wait_until};
use serde_json::{Value, json};

const TRAIN_WAIT: Duration = Duration::from_secs(300);
/// Training steps of the adapted sample job.
const SAMPLE_STEPS: i64 = 120;

/// The sample TrainingJob, adapted only in image, sizes and the S3 endpoint.
fn sample_job() -> Value {
    let path = radfm_e2e::repo_root().join("manifests/samples/trainingjob.yaml");
    let mut job: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let name = job["metadata"]["name"].as_str().unwrap().to_string();
    let spec = &mut job["spec"];
    spec["image"] = json!(TRAINER_IMAGE);
    spec["imagePullPolicy"] = json!("Never");
    spec["workers"] = json!({
        "replicas": 2,
        "gpusPerWorker": 0,
        "nprocPerNode": 2,
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "2Gi"}},
        "shmSize": "256Mi",
        "template": {"env": [
            {"name": "RADFM_LOG_EVERY", "value": "1"},
            {"name": "RADFM_THREADS", "value": "1"},
        ]},
    });
    spec["dataset"]["uri"] = json!("s3://radfm/cohort");
    spec["model"] = json!({"architecture": "vit-tiny", "imageSize": 32, "patchSize": 8});
    // Long enough that the kill below lands mid-training even on a slow, shared machine.
    spec["training"]["steps"] = json!(SAMPLE_STEPS);
    spec["training"]["batchSizePerDevice"] = json!(8);
    spec["training"]["warmupSteps"] = json!(5);
    spec["training"]["precision"] = json!("fp32");
    spec["checkpoint"]["uri"] = json!(format!("s3://radfm/checkpoints/{name}"));
    spec["checkpoint"]["everySteps"] = json!(10);
    spec["export"] = json!({"uri": format!("s3://radfm/models/{name}")});
    job
}

/// The credentials Secret the sample names, pointing at the test's S3 server.
fn s3_secret(node: &RealNode) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "radiology-s3"},
        "stringData": {
            "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
            "AWS_ENDPOINT_URL": format!("http://{NODE_IP}:{}", node.s3.port),
            "AWS_REGION": "us-east-1",
        },
    })
}

/// The real node for `test`, inside the test's own namespaces; `None` in the outer process,
/// which has run the test in them already.
async fn real_node(test: &str) -> Option<RealNode> {
    if !node::in_private_namespaces(test) {
        return None;
    }
    Some(RealNode::start().await.unwrap())
}

/// `pairs` as the `(&str, &str)` list the process helpers take.
fn str_pairs(pairs: &[(String, String)]) -> Vec<(&str, &str)> {
    pairs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

/// JSON lines of a container's log (`kubectl logs`), skipping anything that is not JSON.
fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn step_losses(lines: &[Value]) -> Vec<(i64, f64)> {
    lines
        .iter()
        .filter(|l| l["event"] == "step")
        .filter_map(|l| Some((l["step"].as_i64()?, l["loss"].as_f64()?)))
        .collect()
}

async fn pods_of(api: &Api<Pod>, job: &str, attempt: i32) -> Vec<Pod> {
    let lp = ListParams::default().labels(&format!(
        "radfm.io/job-name={job},radfm.io/attempt={attempt}"
    ));
    let mut pods = api.list(&lp).await.unwrap().items;
    pods.sort_by_key(|p| p.name_any());
    pods
}

fn container_id(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?.container_statuses.as_ref()?;
    let id = status
        .iter()
        .find(|c| c.name == "trainer")?
        .container_id
        .clone()?;
    Some(id.trim_start_matches("containerd://").to_string())
}

/// The README's first step, `helm install radfm charts/radfm -n radfm-system`, with the locally
/// built operator image: two operator pods pass their probes, one holds the leader Lease, and
/// `/metrics` answers on a pod's own address.
async fn install_operator_with_helm(node: &RealNode) {
    let cluster = &node.cluster;
    // The harness applied manifests/rbac.yaml for process-run operators; the chart owns these.
    let rbac = radfm_e2e::repo_root().join("manifests/rbac.yaml");
    cluster
        .kubectl_ok(&["delete", "-f", &rbac.to_string_lossy()])
        .unwrap();
    cluster
        .kubectl_ok(&[
            "label",
            "namespace",
            "radfm-system",
            "pod-security.kubernetes.io/enforce=restricted",
        ])
        .unwrap();
    let chart = radfm_e2e::repo_root().join("charts/radfm");
    radfm_e2e::ok(&cluster.helm(&[
        "install",
        "radfm",
        &chart.to_string_lossy(),
        "-n",
        "radfm-system",
        "--set",
        "image.repository=docker.io/radfm/radfm-operator",
        "--set",
        "image.tag=dev",
        "--set",
        "image.pullPolicy=Never",
    ]));

    let deployments: Api<Deployment> = Api::namespaced(cluster.client.clone(), "radfm-system");
    wait_object(
        &deployments,
        "radfm-operator",
        TRAIN_WAIT,
        "2 ready operator pods",
        |d| d.status.as_ref().and_then(|s| s.ready_replicas) == Some(2),
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), "radfm-system");
    let operators = pods.list(&ListParams::default()).await.unwrap().items;
    let names: Vec<String> = operators.iter().map(|p| p.name_any()).collect();
    let leases: Api<Lease> = Api::namespaced(cluster.client.clone(), "radfm-system");
    let lease = wait_object(&leases, "radfm-operator", TRAIN_WAIT, "a leader", |l| {
        l.spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_ref())
            .is_some()
    })
    .await;
    let holder = lease.spec.unwrap().holder_identity.unwrap();
    assert!(
        names.contains(&holder),
        "leader {holder} is not one of {names:?}"
    );
    for pod in &operators {
        let ip = pod.status.as_ref().unwrap().pod_ip.clone().unwrap();
        let (code, metrics) = radfm_e2e::http_get_text(&format!("{ip}:8080"), "/metrics").unwrap();
        assert_eq!(code, 200);
        let leader = if pod.name_any() == holder { 1 } else { 0 };
        assert!(
            metrics.contains(&format!("radfm_operator_leader {leader}")),
            "{}: {metrics}",
            pod.name_any()
        );
    }
}

#[tokio::test]
async fn quick_start_on_a_real_node_trains_the_sample_survives_a_killed_worker_and_exports() {
    let Some(node) = real_node(
        "quick_start_on_a_real_node_trains_the_sample_survives_a_killed_worker_and_exports",
    )
    .await
    else {
        return;
    };
    let cluster = &node.cluster;
    install_operator_with_helm(&node).await;
    let ns = "radiology";
    let _guard = cluster.namespace(ns).await.unwrap();

    data_and_credentials(&node, ns);
    let job = sample_job();
    let name = job["metadata"]["name"].as_str().unwrap().to_string();
    apply(&node, ns, &job);

    let jobs: Api<TrainingJob> = Api::namespaced(cluster.client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), ns);
    // Step and Loss move in `kubectl get tj` while it trains (rank 0 annotates its own pod with
    // the account the operator gave it).
    let running = wait_object(
        &jobs,
        &name,
        TRAIN_WAIT,
        "progress past a checkpoint",
        |j| {
            let st = j.status.as_ref();
            let step = st.and_then(|s| s.progress.as_ref()).map(|p| p.step);
            let ckpt = st.and_then(|s| s.last_checkpoint.as_ref()).map(|c| c.step);
            matches!((step, ckpt), (Some(s), Some(c)) if s >= c + 2)
        },
    )
    .await;
    let table = cluster.kubectl_ok(&["get", "tj", "-n", ns]).unwrap();
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(row[1], "Running", "{table}");
    assert!(row[3].parse::<i64>().unwrap() > 0, "Step column: {table}");
    assert!(row[4].parse::<f64>().unwrap() > 0.0, "Loss column: {table}");
    let checkpoint = running.status.unwrap().last_checkpoint.unwrap().step;

    // `kubectl logs` shows rank 0's JSON lines (test 7), before the gang restart removes them.
    let attempt1 = pods_of(&pods, &name, 1).await;
    let rank0 = attempt1[0].name_any();
    let before = json_lines(&cluster.kubectl_ok(&["logs", "-n", ns, &rank0]).unwrap());
    assert!(
        before
            .iter()
            .any(|l| l["event"] == "start" && l["attempt"] == 1),
        "{before:?}"
    );
    let losses_before = step_losses(&before);
    assert!(
        losses_before.iter().any(|(s, _)| *s > checkpoint),
        "{losses_before:?}"
    );
    let kubeconfig = cluster.kubeconfig.to_string_lossy().to_string();
    let radfm_logs = radfm_e2e::radfm(
        &["logs", &name, "-n", ns, "--rank", "0"],
        &[("KUBECONFIG", kubeconfig.as_str())],
    );
    let radfm_lines = json_lines(&String::from_utf8_lossy(&radfm_logs.stdout));
    assert!(
        radfm_lines.iter().any(|l| l["event"] == "step"),
        "radfm logs: {}",
        String::from_utf8_lossy(&radfm_logs.stderr)
    );

    // Kill rank 1's trainer through the container runtime: the whole gang restarts as attempt 2
    // and resumes from the last checkpoint.
    let victim = container_id(&attempt1[1]).expect("rank 1 runs a container");
    node.ctr(&["tasks", "kill", "--signal", "SIGKILL", &victim])
        .unwrap();
    let done = wait_object(&jobs, &name, TRAIN_WAIT, "Succeeded", |j| {
        j.status.as_ref().and_then(|s| s.phase) == Some(Phase::Succeeded)
    })
    .await;
    let status = done.status.unwrap();
    assert_eq!(status.attempt, 2, "{status:?}");
    assert_eq!(status.restarts, 1, "{status:?}");
    assert_eq!(status.progress.as_ref().unwrap().step, SAMPLE_STEPS);

    let attempt2 = pods_of(&pods, &name, 2).await;
    let after = json_lines(
        &cluster
            .kubectl_ok(&["logs", "-n", ns, &attempt2[0].name_any()])
            .unwrap(),
    );
    let start = after
        .iter()
        .find(|l| l["event"] == "start")
        .expect("a start line");
    let resumed = start["resumed_from"]
        .as_i64()
        .expect("attempt 2 resumed from a checkpoint");
    assert!(
        resumed >= checkpoint,
        "resumed from {resumed}, status said {checkpoint}"
    );
    let losses_after = step_losses(&after);
    assert_eq!(
        losses_after.first().map(|(s, _)| *s),
        Some(resumed + 1),
        "{losses_after:?}"
    );
    // Exact resume: steps both attempts ran have the same loss.
    let mut compared = 0;
    for (step, loss) in &losses_after {
        if let Some((_, earlier)) = losses_before.iter().find(|(s, _)| s == step) {
            assert!(
                (loss - earlier).abs() < 1e-6,
                "step {step}: {earlier} then {loss}"
            );
            compared += 1;
        }
    }
    assert!(
        compared > 0 || !losses_before.iter().any(|(s, _)| *s > resumed),
        "no step ran in both attempts"
    );

    // The exported encoder in the bucket loads in PyTorch.
    let model_dir = node.s3.bucket_dir().join(format!("models/{name}"));
    let code = "import sys, safetensors.torch as st\n\
                t = st.load_file(sys.argv[1] + '/encoder.safetensors')\n\
                print(tuple(t['cls_token'].shape), tuple(t['blocks.0.attn.qkv.weight'].shape))";
    let out = radfm_e2e::run_python(code, &[&model_dir.to_string_lossy()]);
    assert_eq!(out.trim(), "(1, 1, 192) (576, 192)");
}

/// A cohort in the bucket (`radfm synth`, as a user would write it) and the credentials Secret
/// in `ns`.
fn data_and_credentials(node: &RealNode, ns: &str) {
    let s3_env = node.s3.env();
    let env = str_pairs(&s3_env);
    radfm_e2e::ok(&radfm_e2e::radfm(
        &[
            "synth",
            "--out",
            "s3://radfm/cohort",
            "--samples",
            "256",
            "--size",
            "32",
            "--seed",
            "1",
        ],
        &env,
    ));
    apply(node, ns, &s3_secret(node));
}

fn apply(node: &RealNode, ns: &str, v: &Value) {
    let out = node.cluster.kubectl_stdin(
        &["apply", "-n", ns, "-f", "-"],
        Some(&serde_json::to_string(v).unwrap()),
    );
    radfm_e2e::ok(&out);
}

/// What happens when the node's kubelet stops mid-training (docs/architecture.md, "When a node's
/// kubelet stops"): the node turns NotReady after the node monitor's grace period, the operator
/// counts the gang's worker there as lost (a restart that does not count against backoffLimit),
/// force-deletes its pod once terminatingTimeoutSeconds pass without a kubelet to confirm, and
/// the next attempt waits unscheduled on the unreachable node; when the kubelet returns it stops
/// the old container, the new attempt runs, resumes from the last checkpoint and succeeds.
#[tokio::test]
async fn kubelet_stopped_during_training_restarts_the_gang_when_the_node_returns() {
    let Some(node) =
        real_node("kubelet_stopped_during_training_restarts_the_gang_when_the_node_returns").await
    else {
        return;
    };
    let cluster = &node.cluster;
    let ns = "outage";
    let _guard = cluster.namespace(ns).await.unwrap();
    let _operator = cluster.start_operator(ns, "operator-outage", &[]).unwrap();
    data_and_credentials(&node, ns);
    let mut job = sample_job();
    job["metadata"]["name"] = json!("outage");
    job["spec"]["workers"]["replicas"] = json!(1);
    job["spec"]["training"]["steps"] = json!(200);
    job["spec"]["checkpoint"]["uri"] = json!("s3://radfm/checkpoints/outage");
    job["spec"]["export"]["uri"] = json!("s3://radfm/models/outage");
    job["spec"]["runPolicy"]["terminatingTimeoutSeconds"] = json!(5);
    apply(&node, ns, &job);
    let jobs: Api<TrainingJob> = Api::namespaced(cluster.client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), ns);
    wait_object(&jobs, "outage", TRAIN_WAIT, "a checkpoint", |j| {
        j.status
            .as_ref()
            .and_then(|s| s.last_checkpoint.as_ref())
            .is_some()
    })
    .await;

    node.stop("kubelet");
    let restarted = wait_object(
        &jobs,
        "outage",
        TRAIN_WAIT,
        "attempt 2 after the node was lost",
        |j| j.status.as_ref().is_some_and(|s| s.attempt == 2),
    )
    .await;
    let status = restarted.status.unwrap();
    assert_eq!(
        (status.restarts, status.counted_restarts),
        (1, 0),
        "{status:?}"
    );
    let restarting = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Restarting")
        .expect("a Restarting condition");
    assert!(
        restarting.message.contains("lost its node"),
        "{restarting:?}"
    );
    // No kubelet confirms the old pod's end: it is force-deleted after the terminating timeout,
    // and the new one cannot be placed on the unreachable node.
    wait_until(TRAIN_WAIT, "attempt 1's pod force-deleted", || async {
        pods_of(&pods, "outage", 1).await.is_empty().then_some(())
    })
    .await
    .unwrap();
    let waiting =
        wait_until(TRAIN_WAIT, "attempt 2's pod unschedulable", || async {
            let pod = pods_of(&pods, "outage", 2).await.into_iter().next()?;
            let unschedulable =
                pod.status.as_ref()?.conditions.as_ref()?.iter().any(|c| {
                    c.type_ == "PodScheduled" && c.reason.as_deref() == Some("Unschedulable")
                });
            unschedulable.then_some(pod)
        })
        .await
        .unwrap();
    assert!(waiting.spec.unwrap().node_name.is_none());

    node.restart_kubelet().unwrap();
    let done = wait_object(&jobs, "outage", TRAIN_WAIT, "Succeeded", |j| {
        j.status.as_ref().and_then(|s| s.phase) == Some(Phase::Succeeded)
    })
    .await;
    assert_eq!(done.status.unwrap().attempt, 2);
    let logs = cluster
        .kubectl_ok(&["logs", "-n", ns, "outage-w0-a2"])
        .unwrap();
    let start = json_lines(&logs)
        .into_iter()
        .find(|l| l["event"] == "start")
        .expect("a start line");
    assert!(start["resumed_from"].as_i64().is_some(), "{start}");
}

/// Trains a small model with the trainer binary on `data` and exports it to `export`.
fn train_and_export(node: &RealNode, dir: &std::path::Path, name: &str, data: &str, steps: u32) {
    let job = format!(
        "apiVersion: radfm.io/v1alpha1\nkind: TrainingJob\nmetadata: {{name: {name}}}\nspec:\n  image: local\n  \
         workers: {{replicas: 1, gpusPerWorker: 0}}\n  dataset: {{uri: \"{data}\"}}\n  \
         model: {{imageSize: 32, patchSize: 8}}\n  \
         training: {{steps: {steps}, batchSizePerDevice: 32, learningRate: 0.001, warmupSteps: 5}}\n  \
         checkpoint: {{uri: \"s3://radfm/ckpt/{name}\", everySteps: 1000}}\n  \
         export: {{uri: \"s3://radfm/models/{name}\"}}\n"
    );
    radfm_e2e::train_locally(&job, dir, name, &str_pairs(&node.s3.env()));
}

/// A hospital's SiteValidator whose labelled images live on the node (a PersistentVolume the
/// site's admin made, claimed by the site's namespace) validates a registry candidate in a real
/// validation pod of radfm's image, which signs and publishes its report; the PromotionPolicy
/// decides on it.
#[tokio::test]
async fn site_validator_reads_its_data_from_a_volume_on_the_node_and_the_policy_decides() {
    let Some(node) =
        real_node("site_validator_reads_its_data_from_a_volume_on_the_node_and_the_policy_decides")
            .await
    else {
        return;
    };
    let cluster = &node.cluster;
    let ns = "hospital";
    let _guard = cluster.namespace(ns).await.unwrap();
    let s3_env = node.s3.env();
    let env = str_pairs(&s3_env);
    let _operator = cluster
        .start_operator_with_env(ns, "operator-hospital", &[], &env)
        .unwrap();
    let radfm = |args: &[&str]| radfm_e2e::ok(&radfm_e2e::radfm(args, &env));
    let registry = "s3://radfm/registry";
    let work = tempfile::tempdir().unwrap();
    let synth = |out: &str, seed: &str| {
        radfm(&[
            "synth",
            "--out",
            out,
            "--samples",
            "240",
            "--size",
            "32",
            "--sites",
            "site-a",
            "--seed",
            seed,
            "--lesion-radius",
            "0.15,0.25",
            "--lesion-prevalence",
            "0.4",
        ]);
    };
    synth("s3://radfm/pool", "5");
    // Production v1 and candidate v2 in the registry.
    train_and_export(&node, work.path(), "base", "s3://radfm/pool", 20);
    radfm(&[
        "registry",
        "register",
        registry,
        "chest",
        "--export",
        "s3://radfm/models/base",
        "--reason",
        "first",
    ]);
    radfm(&[
        "registry",
        "promote",
        registry,
        "chest",
        "1",
        "--reason",
        "initial release",
    ]);
    train_and_export(&node, work.path(), "next", "s3://radfm/pool", 40);
    radfm(&[
        "registry",
        "register",
        registry,
        "chest",
        "--export",
        "s3://radfm/models/next",
        "--parent",
        "1",
        "--reason",
        "more steps",
    ]);

    // The site's data on the node, offered as a PersistentVolume and claimed read-only.
    let site_dir = node.dir().join("site-data");
    synth(
        &format!("file://{}", site_dir.join("cxr-labelled").display()),
        "11",
    );
    let volume = json!({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": "hospital-cxr"},
        "spec": {
            "capacity": {"storage": "1Gi"}, "accessModes": ["ReadOnlyMany"],
            "storageClassName": "", "hostPath": {"path": site_dir, "type": "Directory"},
            "claimRef": {"namespace": ns, "name": "cxr-labelled"},
        },
    });
    apply(&node, ns, &volume);
    apply(
        &node,
        ns,
        &json!({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": "cxr-labelled"},
            "spec": {
                "accessModes": ["ReadOnlyMany"], "storageClassName": "", "volumeName": "hospital-cxr",
                "resources": {"requests": {"storage": "1Gi"}},
            },
        }),
    );

    let public = radfm(&[
        "keygen",
        "--out",
        &work.path().join("keys").to_string_lossy(),
        "--site",
        "hospital-c",
    ]);
    cluster
        .kubectl_ok(&[
            "create",
            "secret",
            "generic",
            "hospital-c-key",
            "-n",
            ns,
            &format!(
                "--from-file=ed25519.key={}",
                work.path().join("keys/hospital-c.key").display()
            ),
        ])
        .unwrap();
    let mut secret = s3_secret(&node);
    secret["metadata"]["name"] = json!("registry-s3");
    apply(&node, ns, &secret);

    // The sample SiteValidator, adapted in registry, image and sizes.
    let path = radfm_e2e::repo_root().join("manifests/samples/sitevalidator.yaml");
    let mut sv: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    sv["spec"]["registry"] = json!(registry);
    sv["spec"]["model"] = json!("chest");
    sv["spec"]["image"] = json!(TRAINER_IMAGE);
    sv["spec"]["subgroups"] = json!(["sex"]);
    sv["spec"]["pollIntervalSeconds"] = json!(5);
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), ns);
    // Watched from before it exists: the operator deletes the pod once it has finished.
    let validation_exit = tokio::spawn(first_exit_code(pods.clone(), "hospital-c-v2"));
    apply(&node, ns, &sv);
    let policy = json!({
        "apiVersion": "radfm.io/v1alpha1", "kind": "PromotionPolicy",
        "metadata": {"name": "chest"},
        "spec": {
            "registry": registry, "model": "chest", "task": "lesion", "quorum": 1,
            "trustedSites": [{"site": "hospital-c", "publicKey": public.trim()}],
            "nonInferiorityMargin": 0.5, "pollIntervalSeconds": 5,
        },
    });
    apply(&node, ns, &policy);

    let svs: Api<SiteValidator> = Api::namespaced(cluster.client.clone(), ns);
    wait_object(&svs, "hospital-c", TRAIN_WAIT, "validated v2", |sv| {
        sv.status
            .as_ref()
            .is_some_and(|s| s.last_validated_version == Some(2))
    })
    .await;
    // The report is published before the container has exited, so its exit code may come later.
    let exit = tokio::time::timeout(TRAIN_WAIT, validation_exit)
        .await
        .expect("the validation pod's container terminates")
        .unwrap();
    assert_eq!(exit, 0, "the validation pod ran in a real container");
    let policies: Api<PromotionPolicy> = Api::namespaced(cluster.client.clone(), ns);
    // Held for review until the report is there; then decided on it.
    let decided = wait_object(
        &policies,
        "chest",
        TRAIN_WAIT,
        "a decision on v2's report",
        |pp| {
            pp.status
                .as_ref()
                .and_then(|s| s.last_decision.as_ref())
                .is_some_and(|d| d.version == 2 && !d.sites.is_empty())
        },
    )
    .await;
    for resource in ["sitevalidators", "promotionpolicies"] {
        for (name, h) in cluster.gitops_health(ns, resource).unwrap() {
            assert_eq!(
                h.statuses(),
                ("Current", "Healthy", "Current"),
                "{resource} {name}: {h:?}"
            );
        }
    }
    let decision = decided.status.unwrap().last_decision.unwrap();
    assert_eq!(decision.sites, ["hospital-c"], "{decision:?}");
    assert!(
        ["Promote", "Reject"].contains(&decision.outcome.as_str()),
        "{decision:?}"
    );
}

/// Two hospitals' ModelMonitors watch the production model on a real node. North's recent cases
/// come from a replaced, older scanner; south's are drawn like its reference. At the scheduled
/// time (a clock file moves the schedule) each look runs `radfm monitor` in a real pod of
/// radfm's image, which signs its report into the registry; north is flagged Drifting with the
/// statistics that moved, south is not; the operator's metrics and events say the same and
/// GitOps health stays Healthy (drift is a finding about the model, not a broken resource).
#[tokio::test]
async fn model_monitors_look_on_schedule_in_real_pods_and_only_the_shifted_site_drifts() {
    use radfm_api::monitoring::{ModelMonitor, Verdict};
    let Some(node) =
        real_node("model_monitors_look_on_schedule_in_real_pods_and_only_the_shifted_site_drifts")
            .await
    else {
        return;
    };
    let cluster = &node.cluster;
    let ns = "monitoring";
    let _guard = cluster.namespace(ns).await.unwrap();
    // The 06:00 UTC look two days ahead, with the clock file a minute before it: always later
    // than the objects' creation on the wall clock.
    let utc = jiff::tz::TimeZone::UTC;
    let day = jiff::Timestamp::now().to_zoned(utc.clone()).date() + jiff::Span::new().days(2);
    let slot = day.at(6, 0, 0, 0).to_zoned(utc).unwrap().timestamp();
    let look_name = |site: &str| format!("{site}-{}", slot.as_second() / 60);
    let clock = node.dir().join("monitor-clock");
    let set_clock = |secs: i64| {
        let t = slot + jiff::SignedDuration::from_secs(secs);
        std::fs::write(&clock, t.to_string()).unwrap();
    };
    set_clock(-60);
    let s3_env = node.s3.env();
    let env = str_pairs(&s3_env);
    let operator = cluster
        .start_operator_with_env(
            ns,
            "operator-monitoring",
            &["--clock-file", &clock.to_string_lossy()],
            &env,
        )
        .unwrap();
    let radfm = |args: &[&str]| radfm_e2e::ok(&radfm_e2e::radfm(args, &env));
    let registry = "s3://radfm/registry";
    let work = tempfile::tempdir().unwrap();
    let synth = |out: &str, site: &str, seed: &str, shifted: bool| {
        let mut args = vec![
            "synth",
            "--out",
            out,
            "--samples",
            "240",
            "--size",
            "32",
            "--sites",
            site,
            "--seed",
            seed,
            "--lesion-radius",
            "0.15,0.25",
            "--lesion-prevalence",
            "0.4",
        ];
        if shifted {
            args.extend(["--shift-site", site]);
        }
        radfm(&args);
    };
    synth("s3://radfm/north-reference", "north", "1", false);
    synth("s3://radfm/north-recent", "north", "3", true);
    synth("s3://radfm/south-reference", "south", "4", false);
    synth("s3://radfm/south-recent", "south", "5", false);
    train_and_export(&node, work.path(), "base", "s3://radfm/north-reference", 20);
    radfm(&[
        "registry",
        "register",
        registry,
        "chest",
        "--export",
        "s3://radfm/models/base",
        "--reason",
        "first",
    ]);
    radfm(&[
        "registry",
        "promote",
        registry,
        "chest",
        "1",
        "--reason",
        "initial release",
    ]);
    let mut secret = s3_secret(&node);
    secret["metadata"]["name"] = json!("registry-s3");
    apply(&node, ns, &secret);
    for site in ["north", "south"] {
        radfm(&[
            "keygen",
            "--out",
            &work.path().join("keys").to_string_lossy(),
            "--site",
            site,
        ]);
        cluster
            .kubectl_ok(&[
                "create",
                "secret",
                "generic",
                &format!("{site}-key"),
                "-n",
                ns,
                &format!(
                    "--from-file=ed25519.key={}",
                    work.path().join(format!("keys/{site}.key")).display()
                ),
            ])
            .unwrap();
        // The sample ModelMonitor, adapted in site, data, registry, image and sizes.
        let path = radfm_e2e::repo_root().join("manifests/samples/modelmonitor.yaml");
        let mut mm: Value =
            serde_yaml_ng::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        mm["metadata"]["name"] = json!(site);
        let spec = &mut mm["spec"];
        spec["siteId"] = json!(site);
        spec["signingKeySecretRef"] = json!({"name": format!("{site}-key")});
        spec["registry"] = json!(registry);
        spec["model"] = json!("chest");
        spec["timeZone"] = json!("UTC");
        spec["reference"] = json!({"uri": format!("s3://radfm/{site}-reference")});
        spec["recent"] = json!({"uri": format!("s3://radfm/{site}-recent")});
        spec["fields"] = json!(["manufacturer", "sex"]);
        spec["image"] = json!(TRAINER_IMAGE);
        spec.as_object_mut().unwrap().remove("dataVolume");
        apply(&node, ns, &mm);
    }

    let mms: Api<ModelMonitor> = Api::namespaced(cluster.client.clone(), ns);
    for site in ["north", "south"] {
        let waiting = wait_object(&mms, site, TRAIN_WAIT, "the 06:00 look scheduled", |m| {
            m.status
                .as_ref()
                .is_some_and(|s| s.next_schedule_time.as_ref().map(|t| t.0) == Some(slot))
        })
        .await;
        let drifting = radfm_api::conditions::get(
            &waiting.status.unwrap().conditions,
            radfm_api::conditions::MonitorConditionType::Drifting,
        )
        .cloned()
        .unwrap();
        assert_eq!(drifting.status, "Unknown", "{drifting:?}");
    }
    set_clock(20);
    let mut looks = Vec::new();
    for site in ["north", "south"] {
        let looked = wait_object(&mms, site, TRAIN_WAIT, "a recorded look", |m| {
            m.status.as_ref().is_some_and(|s| s.last_look.is_some())
        })
        .await;
        let st = looked.status.unwrap();
        let drifting = radfm_api::conditions::get(
            &st.conditions,
            radfm_api::conditions::MonitorConditionType::Drifting,
        )
        .cloned()
        .unwrap();
        looks.push((st.last_look.unwrap(), drifting));
    }
    let (north, north_drifting) = &looks[0];
    assert_eq!(north.verdict, Verdict::Drifting, "{north:?}");
    assert_eq!(north_drifting.status, "True", "{north_drifting:?}");
    let evidence = north.evidence().join("; ");
    for moved in ["embeddings", "metadata:manufacturer"] {
        assert!(evidence.contains(moved), "{evidence}");
    }
    assert!(!evidence.contains("metadata:sex"), "{evidence}");
    assert_eq!(north.pod, look_name("north"), "{north:?}");
    let (south, south_drifting) = &looks[1];
    assert_eq!(south.verdict, Verdict::Stable, "{south:?}");
    assert_eq!(south_drifting.status, "False", "{south_drifting:?}");

    // The signed reports are beside v1 in the registry, each naming its look.
    let stored = node
        .s3
        .bucket_dir()
        .join("registry/models/chest/monitoring/v000001");
    for site in ["north", "south"] {
        let bytes = std::fs::read(stored.join(format!("{site}.json"))).unwrap();
        let signed: radfm_validation::report::Signed = serde_json::from_slice(&bytes).unwrap();
        let r = radfm_validation::monitor::verify(&signed).unwrap();
        assert_eq!(r.look, Some(look_name(site)));
        assert_eq!(r.drifting, site == "north");
    }
    // The looks ran in real containers, whose pods are gone once recorded.
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), ns);
    wait_until(TRAIN_WAIT, "the finished looks' pods deleted", || async {
        let left = pods
            .list(&ListParams::default().labels("radfm.io/model-monitor"))
            .await
            .ok()?;
        left.items.is_empty().then_some(())
    })
    .await
    .unwrap();
    let events = cluster
        .kubectl_ok(&["get", "events", "-n", ns, "-o", "json"])
        .unwrap();
    let events: Value = serde_json::from_str(&events).unwrap();
    let reasons: Vec<(String, String)> = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["regarding"]["name"]
                    .as_str()
                    .or(e["involvedObject"]["name"].as_str())
                    .unwrap_or_default()
                    .to_string(),
                e["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    for want in [
        ("north", "LookStarted"),
        ("north", "DriftDetected"),
        ("south", "NoDrift"),
    ] {
        assert!(
            reasons.contains(&(want.0.to_string(), want.1.to_string())),
            "{want:?} in {reasons:?}"
        );
    }
    let addr = operator.metrics_addr(cluster).await.unwrap();
    let (_, metrics) = radfm_e2e::http_get_text(&addr, "/metrics").unwrap();
    for (site, value) in [("north", 1), ("south", 0)] {
        let line = format!(
            "radfm_operator_monitor_drifting{{namespace=\"{ns}\",monitor=\"{site}\",site=\"{site}\",model=\"chest\"}} {value}"
        );
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }
    for (name, h) in cluster.gitops_health(ns, "modelmonitors").unwrap() {
        assert_eq!(
            h.statuses(),
            ("Current", "Healthy", "Current"),
            "{name}: {h:?}"
        );
    }
}

/// The exit code of the first container of pod `name` once it has terminated, seen through a
/// watch so that a pod deleted right after finishing is not missed.
async fn first_exit_code(pods: Api<Pod>, name: &'static str) -> i32 {
    use futures::TryStreamExt;
    use kube::runtime::{WatchStreamExt, watcher};
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut stream = std::pin::pin!(watcher(pods, config).applied_objects());
    loop {
        let Ok(Some(pod)) = stream.try_next().await else {
            continue;
        };
        let terminated = pod
            .status
            .and_then(|s| s.container_statuses)
            .and_then(|c| c.into_iter().next())
            .and_then(|c| c.state)
            .and_then(|s| s.terminated);
        if let Some(t) = terminated {
            return t.exit_code;
        }
    }
}

/// The sample ContinualTraining, adapted in image, sizes, buckets and a clock file instead of
/// the wall clock, fires at its 02:00 Berlin slot: its run trains on real pods and its result is
/// registered in the registry with the run's lineage.
#[tokio::test]
async fn continual_training_run_executes_on_real_pods_and_registers_its_version() {
    let Some(node) =
        real_node("continual_training_run_executes_on_real_pods_and_registers_its_version").await
    else {
        return;
    };
    let cluster = &node.cluster;
    let ns = "nightly";
    let _guard = cluster.namespace(ns).await.unwrap();
    let clock = node.dir().join("clock");
    std::fs::write(&clock, jiff::Timestamp::now().to_string()).unwrap();
    let s3_env = node.s3.env();
    let env = str_pairs(&s3_env);
    let _operator = cluster
        .start_operator_with_env(
            ns,
            "operator-nightly",
            &["--clock-file", &clock.to_string_lossy()],
            &env,
        )
        .unwrap();
    data_and_credentials(&node, ns);

    let path = radfm_e2e::repo_root().join("manifests/samples/continualtraining.yaml");
    let mut ct: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let spec = &mut ct["spec"];
    spec["trigger"]["minNewShards"] = json!(1);
    spec["dataset"]["uri"] = json!("s3://radfm/cohort");
    spec["registry"] = json!("s3://radfm/registry");
    spec["baseModel"]["model"] = json!("chest");
    spec["register"]["model"] = json!("chest");
    let template = &mut spec["jobTemplate"];
    template["image"] = json!(TRAINER_IMAGE);
    template["imagePullPolicy"] = json!("Never");
    template["workers"] = json!({
        "replicas": 1, "gpusPerWorker": 0,
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}},
        "template": {"env": [{"name": "RADFM_THREADS", "value": "2"}]},
    });
    template["model"] = json!({"architecture": "vit-tiny", "imageSize": 32, "patchSize": 8});
    template["training"] = json!({
        "steps": 10, "batchSizePerDevice": 16, "learningRate": 0.001, "warmupSteps": 2,
        "precision": "fp32",
    });
    template["checkpoint"] = json!({"uri": "s3://radfm/checkpoints/nightly", "everySteps": 5});
    apply(&node, ns, &ct);

    let cts: Api<ContinualTraining> = Api::namespaced(cluster.client.clone(), ns);
    let scheduled = wait_object(
        &cts,
        "cxr-nightly",
        TRAIN_WAIT,
        "a next schedule time",
        |c| {
            c.status
                .as_ref()
                .is_some_and(|s| s.next_schedule_time.is_some())
        },
    )
    .await;
    let slot = scheduled.status.unwrap().next_schedule_time.unwrap().0;
    std::fs::write(
        &clock,
        (slot + jiff::SignedDuration::from_secs(5)).to_string(),
    )
    .unwrap();
    let registered = wait_object(
        &cts,
        "cxr-nightly",
        TRAIN_WAIT,
        "a registered version",
        |c| c.status.as_ref().and_then(|s| s.last_registered_version) == Some(1),
    )
    .await;
    assert!(registered.status.unwrap().data_watermark.is_some());

    // The run was a TrainingJob of real pods; the registry knows it by its uid.
    let jobs: Api<TrainingJob> = Api::namespaced(cluster.client.clone(), ns);
    let runs = jobs.list(&ListParams::default()).await.unwrap().items;
    assert_eq!(runs.len(), 1, "{runs:?}");
    let run = &runs[0];
    assert_eq!(
        run.status.as_ref().and_then(|s| s.phase),
        Some(Phase::Succeeded)
    );
    let out = radfm_e2e::ok(&radfm_e2e::radfm(
        &["registry", "show", "s3://radfm/registry", "chest", "1"],
        &env,
    ));
    assert!(out.contains(&run.uid().unwrap()), "{out}");
}

/// A one-site federation on real pods: the FederatedTraining's publish and aggregate pods, the
/// FederatedSite's fetch and contribute pods and its local TrainingJob all run radfm's image
/// under the restricted Pod Security Standard, through the exchange on the S3 server.
#[tokio::test]
async fn a_federated_round_runs_on_real_pods_from_publish_to_the_result() {
    let Some(node) =
        real_node("a_federated_round_runs_on_real_pods_from_publish_to_the_result").await
    else {
        return;
    };
    let cluster = &node.cluster;
    let ns = "federation";
    let _guard = cluster.namespace(ns).await.unwrap();
    let s3_env = node.s3.env();
    let env = str_pairs(&s3_env);
    let _operator = cluster
        .start_operator_with_env(ns, "operator-federation", &[], &env)
        .unwrap();
    data_and_credentials(&node, ns);
    radfm_e2e::ok(&radfm_e2e::radfm(
        &[
            "run",
            radfm_e2e::repo_root()
                .join("manifests/samples/trainingjob-local.yaml")
                .to_str()
                .unwrap(),
            "--workers",
            "1",
            "--steps",
            "1",
            "--dataset",
            "s3://radfm/cohort",
            "--checkpoint",
            "s3://radfm/federation/base",
            "--quiet",
        ],
        &env,
    ));
    let keys = node.dir().join("keys");
    let mut public = std::collections::BTreeMap::new();
    for who in ["hub", "north"] {
        let out = radfm_e2e::radfm(
            &["keygen", "--out", keys.to_str().unwrap(), "--site", who],
            &[],
        );
        public.insert(who, radfm_e2e::ok(&out).trim().to_string());
        let key = std::fs::read_to_string(keys.join(format!("{who}.key"))).unwrap();
        apply(
            &node,
            ns,
            &json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": format!("{who}-key")},
                "stringData": {"ed25519.key": key}}),
        );
    }
    let exchange = json!({"uri": "s3://radfm/federation/exchange",
        "credentialsSecretRef": {"name": "radiology-s3"}});
    apply(
        &node,
        ns,
        &json!({"apiVersion": "radfm.io/v1alpha1", "kind": "FederatedTraining",
            "metadata": {"name": "cxr"},
            "spec": {"baseModel": {"uri": "s3://radfm/federation/base"}, "exchange": exchange,
                "signingKeySecretRef": {"name": "hub-key"},
                "sites": [{"name": "north", "publicKey": public["north"]}],
                "rounds": 1, "localSteps": 3, "normBound": 1000, "image": TRAINER_IMAGE}}),
    );
    apply(
        &node,
        ns,
        &json!({"apiVersion": "radfm.io/v1alpha1", "kind": "FederatedSite",
            "metadata": {"name": "north"},
            "spec": {"federation": format!("{ns}/cxr"), "site": "north",
                "hubPublicKey": public["hub"], "exchange": exchange,
                "signingKeySecretRef": {"name": "north-key"},
                "dataset": {"uri": "s3://radfm/cohort", "credentialsSecretRef": {"name": "radiology-s3"}},
                "workspace": "s3://radfm/federation/north",
                "jobTemplate": {"image": TRAINER_IMAGE, "imagePullPolicy": "Never",
                    "workers": {"replicas": 1, "gpusPerWorker": 0,
                        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}},
                        "template": {"env": [{"name": "RADFM_THREADS", "value": "2"}]}},
                    "model": {"architecture": "vit-tiny", "imageSize": 64, "patchSize": 8},
                    "training": {"steps": 1, "batchSizePerDevice": 16, "precision": "fp32"},
                    "checkpoint": {"uri": "s3://radfm/unused", "everySteps": 100}},
                "image": TRAINER_IMAGE, "pollIntervalSeconds": 5}}),
    );
    let fts: Api<radfm_api::federated::FederatedTraining> =
        Api::namespaced(cluster.client.clone(), ns);
    let done = wait_object(&fts, "cxr", TRAIN_WAIT, "a federated result", |ft| {
        ft.status
            .as_ref()
            .and_then(|s| s.phase)
            .is_some_and(|p| p.is_finished())
    })
    .await;
    let st = done.status.unwrap();
    assert_eq!(
        st.phase,
        Some(radfm_api::federated::FederatedPhase::Succeeded),
        "{st:#?}"
    );
    assert_eq!(st.rounds.len(), 1);
    assert_eq!(st.rounds[0].admitted[0].site, "north");
    assert!(st.rounds[0].admitted[0].norm > 0.0);
    // Every step ran as a real container: the local job's pods succeeded on the node.
    let jobs: Api<TrainingJob> = Api::namespaced(cluster.client.clone(), ns);
    let local = jobs.get("north-r1").await.unwrap();
    assert_eq!(local.status.and_then(|s| s.phase), Some(Phase::Succeeded));
}

/// The instructions of a Dockerfile's last stage, as (instruction, rest of the line).
fn final_stage(dockerfile: &str) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(radfm_e2e::repo_root().join(dockerfile)).unwrap();
    let mut stage = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        if word == "FROM" {
            stage.clear();
        }
        stage.push((word.to_string(), rest.trim().to_string()));
    }
    stage
}

/// The image config (`config` of the OCI config blob) and the paths in its layers.
fn image_config_and_paths(archive: &std::path::Path) -> (Value, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let untar = std::process::Command::new("tar")
        .arg("-xf")
        .arg(archive)
        .arg("-C")
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(untar.success());
    let blob = |digest: &str| {
        dir.path()
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    };
    let read = |digest: &str| -> Value {
        serde_json::from_slice(&std::fs::read(blob(digest)).unwrap()).unwrap()
    };
    let index: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("index.json")).unwrap()).unwrap();
    let manifest = read(index["manifests"][0]["digest"].as_str().unwrap());
    let config = read(manifest["config"]["digest"].as_str().unwrap())["config"].clone();
    let mut paths = Vec::new();
    for layer in manifest["layers"].as_array().unwrap() {
        let out = std::process::Command::new("tar")
            .arg("-tzf")
            .arg(blob(layer["digest"].as_str().unwrap()))
            .output()
            .unwrap();
        paths.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(|l| format!("/{}", l.trim_start_matches("./"))),
        );
    }
    (config, paths)
}

#[test]
fn local_images_agree_with_the_production_dockerfiles() {
    let images = node::images_dir().unwrap();
    let docker_archive = tempfile::tempdir().unwrap();
    let copy = std::process::Command::new("skopeo")
        .arg("copy")
        .arg(format!(
            "oci-archive:{}",
            images.join("radfm-operator.tar").display()
        ))
        .arg(format!(
            "docker-archive:{}:{}",
            docker_archive.path().join("operator.tar").display(),
            node::OPERATOR_IMAGE
        ))
        .output()
        .expect("skopeo runs (make node-deps)");
    radfm_e2e::ok(&copy);
    for (dockerfile, archive) in [
        ("trainer/Dockerfile", "radfm-trainer.tar"),
        ("operator/Dockerfile", "radfm-operator.tar"),
    ] {
        let stage = final_stage(dockerfile);
        let (config, paths) = image_config_and_paths(&images.join(archive));
        let instruction = |word: &str| -> Vec<String> {
            stage
                .iter()
                .filter(|(w, _)| w == word)
                .map(|(_, r)| r.clone())
                .collect()
        };
        let exec_form = |word: &str| -> Option<Value> {
            instruction(word)
                .last()
                .map(|r| serde_json::from_str(r).unwrap())
        };
        assert_eq!(
            Some(config["User"].as_str().unwrap().to_string()),
            instruction("USER").last().cloned(),
            "{dockerfile}: user"
        );
        assert_eq!(
            Some(config["Entrypoint"].clone()),
            exec_form("ENTRYPOINT"),
            "{dockerfile}"
        );
        if let Some(cmd) = exec_form("CMD") {
            assert_eq!(config["Cmd"], cmd, "{dockerfile}: CMD");
        }
        // podman's image library (through skopeo) reads the archive the same way, and turns it
        // into the docker-archive that any `docker load` takes.
        let skopeo = std::process::Command::new("skopeo")
            .args(["inspect", "--config"])
            .arg(format!("oci-archive:{}", images.join(archive).display()))
            .output()
            .expect("skopeo runs (make node-deps)");
        let theirs: Value = serde_json::from_str(&radfm_e2e::ok(&skopeo)).unwrap();
        assert_eq!(theirs["config"], config, "{archive}");
        assert!(
            config["Env"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e.as_str().unwrap().starts_with("PATH=")),
            "{archive}: {config}"
        );
        for copy in instruction("COPY") {
            let target = copy.split_whitespace().last().unwrap().to_string();
            if target.starts_with("/usr/local/bin/") {
                assert!(
                    paths.contains(&target),
                    "{archive} lacks {target} that {dockerfile} copies"
                );
            }
        }
    }
}
