//! GitOps health: radfm's objects judged by the tools' own code, not a reimplementation:
//! kstatus (sigs.k8s.io/cli-utils, what Flux waits on) and Argo CD's Lua health evaluation with
//! the argocd-cm snippet radfm ships (both built into radfm-health, tests/cluster/health).
#![allow(
    clippy::too_many_lines,
    reason = "a scenario test reads as one story from setup to the last assertion"
)]

use std::time::Duration;

use kube::ResourceExt;
use kube::api::Api;
use radfm_api::TrainingJob;
use radfm_api::trainingjob::Phase;
use radfm_e2e::{Cluster, repo_root, serial, wait_object, wait_until};

const WAIT: Duration = Duration::from_secs(60);

#[test]
fn every_radfm_kind_passes_argo_cds_own_health_tests() {
    let dir = repo_root().join("manifests/argocd/resource_customizations");
    let out = std::process::Command::new(radfm_e2e::health_tools().unwrap().join("radfm-health"))
        .arg("test")
        .arg(&dir)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for kind in [
        "TrainingJob",
        "ContinualTraining",
        "SiteValidator",
        "PromotionPolicy",
        "FederatedTraining",
        "FederatedSite",
        "ModelMonitor",
    ] {
        assert!(report.contains(&format!("radfm.io/{kind} ")), "{report}");
    }
}

#[test]
fn an_object_the_operator_has_not_reconciled_yet_is_not_called_healthy() {
    let testdata =
        repo_root().join("manifests/argocd/resource_customizations/radfm.io/TrainingJob/testdata");
    let judge = |file: &str| {
        let yaml = std::fs::read_to_string(testdata.join(file)).unwrap();
        radfm_e2e::gitops_health(&yaml).unwrap().remove(0)
    };
    // A spec change the operator has not seen: every tool waits.
    let changed = judge("new_generation.yaml");
    assert_eq!(
        changed.statuses(),
        ("InProgress", "Progressing", "InProgress")
    );
    // No status at all: Argo CD waits and Flux's expressions cannot be evaluated, which Flux
    // retries; plain kstatus calls it Current (its documented limit, see docs/health.md).
    let fresh = judge("no_status.yaml");
    assert_eq!(
        fresh.statuses(),
        ("Current", "Progressing", "Error"),
        "{fresh:?}"
    );
}

fn job(name: &str, extra: &str) -> String {
    format!(
        "apiVersion: radfm.io/v1alpha1\nkind: TrainingJob\nmetadata: {{name: {name}}}\nspec:\n  \
         image: radfm/trainer:test\n  workers: {{replicas: 1, gpusPerWorker: 4{extra}}}\n  \
         dataset: {{uri: 's3://data/cohort'}}\n  checkpoint: {{uri: 's3://ckpt/{name}'}}\n  \
         training: {{steps: 100}}\n"
    )
}

fn continual(name: &str, extra: &str) -> String {
    format!(
        "apiVersion: radfm.io/v1alpha1\nkind: ContinualTraining\nmetadata: {{name: {name}}}\n\
         spec:\n  schedule: '0 2 * * *'\n  dataset: {{uri: 'file:///nonexistent/data'}}\n  \
         registry: 'file:///nonexistent/registry'\n  register: {{model: chest}}\n  jobTemplate:\n    \
         image: radfm/trainer:test\n    workers: {{replicas: 1, gpusPerWorker: 0}}\n    \
         checkpoint: {{uri: 's3://ckpt/{name}'}}\n{extra}"
    )
}

/// Ends the running worker of job `name` as its kubelet would report the exit.
async fn end_worker(cluster: &Cluster, ns: &str, name: &str, exit: i32, reason: &str) {
    let pod = cluster.running_pod_of(ns, name, WAIT).await.unwrap();
    cluster
        .end_pod(ns, &pod.name_any(), exit, reason)
        .await
        .unwrap();
}

#[tokio::test]
async fn kstatus_and_argo_cd_judge_every_phase_of_live_objects() {
    let _serial = serial().await;
    let cluster = Cluster::start(2, 8).await.unwrap();
    let ns = "health";
    let _guard = cluster.namespace(ns).await.unwrap();
    let _op = cluster.start_operator(ns, "operator-health", &[]).unwrap();
    let apply = |yaml: String| {
        cluster
            .kubectl_stdin(&["apply", "-n", ns, "-f", "-"], Some(&yaml))
            .status
            .success()
            .then_some(())
            .expect("kubectl apply")
    };
    apply(job("queued", ", nodeSelector: {pool: absent}"));
    apply(job("running", ""));
    apply(job("done", ""));
    apply(job("broken", ""));
    apply(job("paused", "") + "  runPolicy: {suspend: true}\n");
    apply(continual("nightly", ""));
    apply(continual("paused-nightly", "  suspend: true\n"));
    apply(continual("on-mars", "  timeZone: Mars/Olympus\n"));

    end_worker(&cluster, ns, "done", 0, "Completed").await;
    end_worker(&cluster, ns, "broken", 64, "Error").await;
    let jobs: Api<TrainingJob> = Api::namespaced(cluster.client.clone(), ns);
    for (name, phase) in [
        ("queued", Phase::Pending),
        ("running", Phase::Running),
        ("done", Phase::Succeeded),
        ("broken", Phase::Failed),
        ("paused", Phase::Suspended),
    ] {
        wait_object(&jobs, name, WAIT, &format!("phase {phase:?}"), |j| {
            j.status.as_ref().and_then(|s| s.phase) == Some(phase)
        })
        .await;
    }

    let want_jobs = [
        ("queued", ("InProgress", "Progressing", "InProgress")),
        ("running", ("InProgress", "Progressing", "InProgress")),
        ("done", ("Current", "Healthy", "Current")),
        ("broken", ("Failed", "Degraded", "Failed")),
        ("paused", ("Current", "Suspended", "Current")),
    ];
    let judged = cluster.gitops_health(ns, "trainingjobs").unwrap();
    for (name, want) in want_jobs {
        assert_eq!(judged[name].statuses(), want, "{:?}", judged[name]);
        assert_eq!(
            judged[name].flux_kstatus, want.0,
            "Flux's kstatus fork agrees"
        );
    }
    assert!(
        judged["broken"]
            .argocd_message
            .contains("exited with code 64"),
        "the reason reaches Argo CD's UI: {:?}",
        judged["broken"]
    );

    let judged = wait_until(WAIT, "every ContinualTraining reconciled", || async {
        let judged = cluster.gitops_health(ns, "continualtrainings").ok()?;
        (judged.len() == 3
            && judged
                .values()
                .all(|h| h.argocd_message != "Waiting for the radfm operator"))
        .then_some(judged)
    })
    .await
    .unwrap();
    for (name, want) in [
        ("nightly", ("Current", "Healthy", "Current")),
        ("paused-nightly", ("Current", "Suspended", "Current")),
        ("on-mars", ("Failed", "Degraded", "Failed")),
    ] {
        assert_eq!(judged[name].statuses(), want, "{:?}", judged[name]);
    }

    // `kubectl wait` works on the same conditions.
    cluster
        .kubectl_ok(&[
            "wait",
            "-n",
            ns,
            "--for=condition=Ready",
            "--timeout=30s",
            "trainingjob/done",
        ])
        .unwrap();
    cluster
        .kubectl_ok(&[
            "wait",
            "-n",
            ns,
            "--for=condition=Stalled",
            "--timeout=30s",
            "trainingjob/broken",
        ])
        .unwrap();
}
