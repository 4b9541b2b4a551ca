//! `make demo`: the operator on a local simulated GPU cluster, end to end.
//!
//! Starts the test control plane (real API server and scheduler, kwok GPU nodes), runs the
//! operator binary under its RBAC, applies `manifests/samples/trainingjob.yaml`, then plays what
//! a kubelet would report: one worker dies with the trainer's PeerLost code (the whole gang
//! restarts from its checkpoint as attempt 2), then every worker of attempt 2 exits 0. It prints
//! `kubectl get tj` at each step. Trainer pods are simulated: no images run.

use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use radfm_e2e::{Cluster, repo_root, wait_until};

const JOB: &str = "mae-chest-xray";
const NS: &str = "demo";

async fn running(cluster: &Cluster, attempt: i32, n: usize) -> Result<Vec<String>> {
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), NS);
    wait_until(
        Duration::from_secs(120),
        &format!("{n} running workers of attempt {attempt}"),
        || async {
            let lp = ListParams::default().labels(&format!(
                "radfm.io/job-name={JOB},radfm.io/attempt={attempt}"
            ));
            let list = pods.list(&lp).await.ok()?;
            let names: Vec<String> = list
                .items
                .iter()
                .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
                .map(|p| p.name_any())
                .collect();
            (names.len() == n).then_some(names)
        },
    )
    .await
}

fn show(cluster: &Cluster, title: &str) -> Result<()> {
    println!("\n== {title}\n$ kubectl get tj -n {NS}");
    print!("{}", cluster.kubectl_ok(&["get", "tj", "-n", NS])?);
    println!("$ kubectl get pods -n {NS} -o wide");
    print!(
        "{}",
        cluster.kubectl_ok(&["get", "pods", "-n", NS, "-o", "wide"])?
    );
    Ok(())
}

async fn phase(cluster: &Cluster, want: &str) -> Result<()> {
    wait_until(
        Duration::from_secs(120),
        &format!("phase {want}"),
        || async {
            let p = cluster
                .kubectl_ok(&["get", "tj", JOB, "-n", NS, "-o", "jsonpath={.status.phase}"])
                .ok()?;
            (p == want).then_some(())
        },
    )
    .await
}

#[tokio::main]
async fn main() -> Result<()> {
    println!(
        "Starting a local control plane: etcd, kube-apiserver, kube-scheduler, kwok with 4 nodes x 8 GPUs ..."
    );
    let cluster = Cluster::start(4, 8).await?;
    let _ns = cluster.namespace(NS).await?;
    let _operator = cluster.start_operator(NS, "operator-demo", &[])?;
    let sample = repo_root().join("manifests/samples/trainingjob.yaml");
    println!("$ kubectl apply -f {}", sample.display());
    print!(
        "{}",
        cluster.kubectl_ok(&["apply", "-n", NS, "-f", &sample.to_string_lossy()])?
    );

    let pods = running(&cluster, 1, 2).await?;
    phase(&cluster, "Running").await?;
    show(
        &cluster,
        "the gang is running: one pod per 8-GPU node, behind a headless Service",
    )?;

    println!(
        "\n== worker {} exits with code 76 (PeerLost, retryable): the whole gang restarts",
        pods[1]
    );
    cluster
        .end_pod(NS, &pods[1], radfm_api::exit::PEER_LOST, "Error")
        .await?;
    let pods = running(&cluster, 2, 2).await.context("attempt 2")?;
    phase(&cluster, "Running").await?;
    show(
        &cluster,
        "attempt 2 is running (it resumes from the last checkpoint)",
    )?;

    println!("\n== every worker exits 0");
    for p in &pods {
        cluster.end_pod(NS, p, 0, "Completed").await?;
    }
    phase(&cluster, "Succeeded").await?;
    show(
        &cluster,
        "the job succeeded; cleanPodPolicy Running keeps finished pods for their logs",
    )?;
    println!("\n$ kubectl describe tj {JOB} (conditions and events)");
    let describe = cluster.kubectl_ok(&["describe", "tj", JOB, "-n", NS])?;
    let tail: Vec<&str> = describe
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("Conditions:"))
        .collect();
    println!("{}", tail.join("\n"));
    println!(
        "\ndemo: done. The training itself (trainer image) is not run on this simulated cluster."
    );
    Ok(())
}
