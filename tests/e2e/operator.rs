//! End-to-end tests of the operator against a real API server, scheduler and kwok GPU nodes.

use std::time::Duration;

use radfm_e2e::{Cluster, serial};

#[tokio::test]
async fn control_plane_starts_and_schedules_gpu_pods() {
    let _serial = serial();
    let cluster = Cluster::start(2, 8).await.unwrap();
    let ns = cluster.namespace("smoke").await.unwrap();
    let out = cluster.kubectl_stdin(
        &["apply", "-n", &ns.name, "-f", "-"],
        Some("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: c, image: x, resources: {limits: {nvidia.com/gpu: '8'}}}]\n"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    radfm_e2e::wait_until(Duration::from_secs(30), "pod running", || async {
        let o = cluster
            .kubectl_ok(&[
                "get",
                "pod",
                "p",
                "-n",
                &ns.name,
                "-o",
                "jsonpath={.status.phase}/{.spec.nodeName}",
            ])
            .ok()?;
        o.starts_with("Running/gpu-").then_some(())
    })
    .await
    .unwrap();
}
