//! TrainingJobs queued by the real Kueue controller: admission onto a ResourceFlavor's nodes,
//! preemption of a lower-priority gang, its return from a new attempt, the Workload finished and
//! released, and jobs without a queue untouched. Kueue runs with its CRDs, webhooks and
//! certificates (tests/src/kueue.rs); nodes are kwok's, with GPUs.
#![allow(
    clippy::too_many_lines,
    reason = "a scenario test reads as one story from setup to the last assertion"
)]

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use radfm_api::TrainingJob;
use radfm_api::conditions::{self, ConditionType};
use radfm_api::trainingjob::Phase;
use radfm_e2e::{Cluster, ControlPlane, GPU_PRODUCT, serial, wait_object, wait_until};
use radfm_operator::kueue::Workload;

const WAIT: Duration = Duration::from_secs(90);

/// A gang of 2 workers with 8 GPUs each (16 GPUs), in queue `team` when `priority` is given.
fn job(name: &str, queue: Option<&str>, priority: &str, gpus: i32) -> String {
    let labels = queue.map_or(String::new(), |q| {
        format!(", labels: {{kueue.x-k8s.io/queue-name: {q}}}")
    });
    format!(
        "apiVersion: radfm.io/v1alpha1\nkind: TrainingJob\nmetadata: {{name: {name}{labels}}}\nspec:\n  \
         image: radfm/trainer:test\n  workers: {{replicas: 2, gpusPerWorker: {gpus}{priority}}}\n  \
         dataset: {{uri: 's3://data/cohort'}}\n  checkpoint: {{uri: 's3://ckpt/{name}'}}\n  \
         training: {{steps: 100}}\n"
    )
}

/// One flavor of the simulated H100 nodes, a ClusterQueue of 16 GPUs that preempts lower
/// priorities, a LocalQueue `team` in `ns`, and two PriorityClasses.
fn queues(ns: &str) -> String {
    format!(
        "apiVersion: kueue.x-k8s.io/v1beta2
kind: ResourceFlavor
metadata: {{name: h100}}
spec:
  nodeLabels: {{nvidia.com/gpu.product: {GPU_PRODUCT}}}
---
apiVersion: kueue.x-k8s.io/v1beta2
kind: ClusterQueue
metadata: {{name: gpus}}
spec:
  namespaceSelector: {{}}
  preemption: {{withinClusterQueue: LowerPriority}}
  resourceGroups:
  - coveredResources: [nvidia.com/gpu]
    flavors:
    - name: h100
      resources: [{{name: nvidia.com/gpu, nominalQuota: 16}}]
---
apiVersion: kueue.x-k8s.io/v1beta2
kind: LocalQueue
metadata: {{name: team, namespace: {ns}}}
spec: {{clusterQueue: gpus}}
---
apiVersion: scheduling.k8s.io/v1
kind: PriorityClass
metadata: {{name: radfm-low}}
value: 100
---
apiVersion: scheduling.k8s.io/v1
kind: PriorityClass
metadata: {{name: radfm-high}}
value: 1000
"
    )
}

struct Env<'a> {
    cluster: &'a Cluster,
    ns: String,
}

impl Env<'_> {
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

    fn jobs(&self) -> Api<TrainingJob> {
        Api::namespaced(self.cluster.client.clone(), &self.ns)
    }

    fn workloads(&self) -> Api<Workload> {
        Api::namespaced(self.cluster.client.clone(), &self.ns)
    }

    async fn job(
        &self,
        name: &str,
        what: &str,
        pred: impl Fn(&TrainingJob) -> bool,
    ) -> TrainingJob {
        wait_object(&self.jobs(), name, WAIT, what, pred).await
    }

    /// The pods of `job`'s `attempt` that run on a node.
    async fn running(&self, job: &str, attempt: i32, n: usize) -> Vec<Pod> {
        let pods: Api<Pod> = Api::namespaced(self.cluster.client.clone(), &self.ns);
        let lp = ListParams::default().labels(&format!(
            "radfm.io/job-name={job},radfm.io/attempt={attempt}"
        ));
        wait_until(
            WAIT,
            &format!("{n} running pods of {job} attempt {attempt}"),
            || async {
                let list = pods.list(&lp).await.ok()?.items;
                let running: Vec<Pod> = list
                    .into_iter()
                    .filter(|p| {
                        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                    })
                    .collect();
                (running.len() == n).then_some(running)
            },
        )
        .await
        .unwrap()
    }

    async fn pod_count(&self, job: &str) -> usize {
        let pods: Api<Pod> = Api::namespaced(self.cluster.client.clone(), &self.ns);
        let lp = ListParams::default().labels(&format!("radfm.io/job-name={job}"));
        pods.list(&lp).await.unwrap().items.len()
    }

    /// Waits until `job`'s Workload is `Finished` (with `reason`, where given) and Kueue's
    /// finalizer is gone.
    async fn wait_released(&self, job: &str, reason: Option<&str>) {
        wait_until(
            WAIT,
            &format!("the Workload of {job} finished and released"),
            || async {
                let wl = self.workload_of(job).await;
                let finished = workload_condition(&wl, "Finished")
                    .is_some_and(|c| c.0 == "True" && reason.is_none_or(|r| c.1 == r));
                (finished && wl.finalizers().is_empty()).then_some(())
            },
        )
        .await
        .unwrap();
    }

    /// The Workload radfm made for `job`.
    async fn workload_of(&self, job: &str) -> Workload {
        let lp = ListParams::default().labels(&format!("radfm.io/job-name={job}"));
        let list = self.workloads().list(&lp).await.unwrap().items;
        assert_eq!(list.len(), 1, "one Workload per job: {list:?}");
        list.into_iter().next().unwrap()
    }
}

/// Kueue on `cluster`, namespace `ns` with [`queues`], and radfm's operator watching it (started
/// after Kueue: it looks for Kueue's API when it starts).
async fn queued<'a>(
    cluster: &'a Cluster,
    ns: &str,
) -> (radfm_e2e::TestNamespace<'a>, Env<'a>, radfm_e2e::Operator) {
    cluster.start_kueue().await.unwrap();
    let guard = cluster.namespace(ns).await.unwrap();
    let env = Env {
        cluster,
        ns: ns.into(),
    };
    env.apply(&queues(ns));
    let op = cluster
        .start_operator(ns, &format!("operator-{ns}"), &[])
        .unwrap();
    (guard, env, op)
}

fn condition(job: &TrainingJob, ty: ConditionType) -> Option<(String, String, String)> {
    let c = conditions::get(&job.status.as_ref()?.conditions, ty)?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

fn phase(job: &TrainingJob) -> Option<Phase> {
    job.status.as_ref()?.phase
}

fn workload_condition(wl: &Workload, ty: &str) -> Option<(String, String)> {
    let c = wl
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == ty)?;
    Some((c.status.clone(), c.reason.clone()))
}

#[tokio::test]
async fn kueue_admits_preempts_and_requeues_gangs_within_a_16_gpu_quota() {
    let _serial = serial().await;
    let cluster = Cluster::start_with(&ControlPlane {
        kwok_nodes: 3,
        gpus: 8,
        // The garbage collector deletes a deleted job's Workload.
        controller_manager: true,
        ..ControlPlane::default()
    })
    .await
    .unwrap();
    let ns = "kueue";
    let (_guard, env, _op) = queued(&cluster, ns).await;

    // A low-priority gang takes the whole quota, on the flavor's nodes.
    env.apply(&job(
        "low",
        Some("team"),
        ", priorityClassName: radfm-low",
        8,
    ));
    let low = env
        .job("low", "low admitted", |j| {
            condition(j, ConditionType::Admitted).is_some_and(|c| c.0 == "True")
        })
        .await;
    assert_eq!(
        condition(&low, ConditionType::Admitted).unwrap().2,
        "admitted by ClusterQueue gpus"
    );
    for pod in env.running("low", 1, 2).await {
        let selector = pod.spec.unwrap().node_selector.unwrap();
        assert_eq!(
            selector["nvidia.com/gpu.product"], GPU_PRODUCT,
            "the flavor's node labels"
        );
    }
    let wl = env.workload_of("low").await;
    assert_eq!(wl.spec.priority, Some(100));
    assert_eq!(wl.spec.pod_sets[0].count, 2);
    assert_eq!(wl.owner_references()[0].kind, "TrainingJob");
    wait_until(WAIT, "PodsReady reported to Kueue", || async {
        let wl = env.workload_of("low").await;
        (workload_condition(&wl, "PodsReady").map(|c| c.0) == Some("True".into())).then_some(())
    })
    .await
    .unwrap();

    // A job without a queue is not Kueue's: it runs beside the full quota.
    env.apply(&job("free", None, "", 0));
    env.running("free", 1, 2).await;
    assert!(
        env.workloads()
            .list(&ListParams::default().labels("radfm.io/job-name=free"))
            .await
            .unwrap()
            .items
            .is_empty()
    );

    // A high-priority gang preempts it: the whole low gang stops, its quota goes back, it queues.
    env.apply(&job(
        "high",
        Some("team"),
        ", priorityClassName: radfm-high",
        8,
    ));
    let low = env
        .job("low", "low evicted and queued", |j| {
            phase(j) == Some(Phase::Queued)
                && condition(j, ConditionType::Admitted).is_some_and(|c| c.1 == "Evicted")
        })
        .await;
    assert!(
        condition(&low, ConditionType::Admitted)
            .unwrap()
            .2
            .contains("Preempted")
    );
    env.running("high", 1, 2).await;
    wait_until(WAIT, "the low gang's pods gone", || async {
        (env.pod_count("low").await == 0).then_some(())
    })
    .await
    .unwrap();
    let wl = env.workload_of("low").await;
    assert_eq!(workload_condition(&wl, "QuotaReserved").unwrap().0, "False");
    assert_eq!(
        workload_condition(&wl, "Requeued").unwrap(),
        ("True".into(), "Preempted".into())
    );
    assert!(wl.status.as_ref().unwrap().admission.is_none());
    let health = cluster.gitops_health(ns, "trainingjobs").unwrap();
    assert_eq!(
        health["low"].statuses(),
        ("InProgress", "Progressing", "InProgress"),
        "a queued job is progressing"
    );

    // The high gang succeeds: its Workload is finished and released; the low gang comes back as
    // a new attempt (from its checkpoint).
    for pod in env.running("high", 1, 2).await {
        cluster
            .end_pod(ns, &pod.name_any(), 0, "Completed")
            .await
            .unwrap();
    }
    env.job("high", "high succeeded", |j| {
        phase(j) == Some(Phase::Succeeded)
    })
    .await;
    env.wait_released("high", Some("Succeeded")).await;
    env.running("low", 2, 2).await;
    let low = env
        .job("low", "low admitted again", |j| {
            condition(j, ConditionType::Admitted).is_some_and(|c| c.0 == "True")
        })
        .await;
    assert_eq!(low.status.unwrap().attempt, 2);

    // Deleting a job takes its Workload with it: radfm releases the finalizer.
    env.jobs().delete("low", &Default::default()).await.unwrap();
    wait_until(WAIT, "the low Workload deleted", || async {
        let lp = ListParams::default().labels("radfm.io/job-name=low");
        env.workloads()
            .list(&lp)
            .await
            .ok()?
            .items
            .is_empty()
            .then_some(())
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_job_in_a_queue_without_room_waits_queued_with_kueues_reason() {
    let _serial = serial().await;
    let cluster = Cluster::start(1, 8).await.unwrap();
    let ns = "kueue-full";
    let (_guard, env, _op) = queued(&cluster, ns).await;

    // 3 workers of 8 GPUs never fit a 16-GPU quota.
    env.apply(&job("huge", Some("team"), "", 8).replace("replicas: 2", "replicas: 3"));
    let huge = env
        .job("huge", "huge queued with Kueue's reason", |j| {
            phase(j) == Some(Phase::Queued)
                && condition(j, ConditionType::Admitted)
                    .is_some_and(|c| c.2.contains("queue team") && c.2.contains("nvidia.com/gpu"))
        })
        .await;
    assert_eq!(
        condition(&huge, ConditionType::Admitted).unwrap().1,
        "Queued"
    );
    assert_eq!(env.pod_count("huge").await, 0);
    let wl = env.workload_of("huge").await;
    assert_eq!(wl.spec.pod_sets[0].count, 3);

    // An unknown queue label is Kueue's to judge: the job waits, saying so.
    env.apply(&job("lost", Some("nowhere"), "", 1));
    env.job("lost", "lost queued", |j| {
        phase(j) == Some(Phase::Queued)
            && condition(j, ConditionType::Admitted).is_some_and(|c| c.2.contains("queue nowhere"))
    })
    .await;
}

/// What MultiKueue does across clusters, played on one: the manager's side of a dispatched job
/// (managedBy MultiKueue) and the worker's side (a copy naming its prebuilt Workload).
#[tokio::test]
async fn multikueue_jobs_get_their_workload_on_the_manager_and_use_the_prebuilt_one_on_a_worker() {
    let _serial = serial().await;
    let cluster = Cluster::start(2, 8).await.unwrap();
    let ns = "multikueue";
    let (_guard, env, _op) = queued(&cluster, ns).await;

    // Manager: radfm creates the Workload and nothing else; the status is MultiKueue's to copy.
    let dispatched = job("dispatched", Some("team"), "", 8)
        .replace("spec:\n", "spec:\n  managedBy: kueue.x-k8s.io/multikueue\n");
    env.apply(&dispatched);
    wait_until(WAIT, "the dispatched job's Workload", || async {
        let lp = ListParams::default().labels("radfm.io/job-name=dispatched");
        (!env.workloads().list(&lp).await.ok()?.items.is_empty()).then_some(())
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        env.pod_count("dispatched").await,
        0,
        "nothing runs on the manager"
    );
    assert!(
        env.jobs().get("dispatched").await.unwrap().status.is_none(),
        "radfm writes no status there"
    );
    // MultiKueue copies the worker's status back; radfm then finishes and releases the Workload.
    let mirrored = serde_json::json!({"status": {"phase": "Succeeded", "attempt": 1}});
    env.jobs()
        .patch_status(
            "dispatched",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&mirrored),
        )
        .await
        .unwrap();
    env.wait_released("dispatched", None).await;

    // Worker: MultiKueue created the Workload and the job's copy naming it; radfm adopts it and
    // runs the gang once this cluster's Kueue admits it.
    env.apply(
        "apiVersion: kueue.x-k8s.io/v1beta2
kind: Workload
metadata: {name: from-manager}
spec:
  queueName: team
  podSets:
  - name: workers
    count: 2
    template:
      spec:
        restartPolicy: Never
        containers:
        - name: trainer
          image: radfm/trainer:test
          resources: {requests: {nvidia.com/gpu: 8}, limits: {nvidia.com/gpu: 8}}
",
    );
    let copy = job("copy", Some("team"), "", 8).replace(
        "metadata: {name: copy,",
        "metadata: {name: copy, annotations: {kueue.x-k8s.io/prebuilt-workload-name: from-manager},",
    );
    env.apply(&copy);
    env.running("copy", 1, 2).await;
    let wl = env.workloads().get("from-manager").await.unwrap();
    assert_eq!(wl.owner_references()[0].kind, "TrainingJob", "adopted");
    assert_eq!(wl.labels()["radfm.io/job-name"], "copy");
    let lp = ListParams::default().labels("radfm.io/job-name=copy");
    assert_eq!(
        env.workloads().list(&lp).await.unwrap().items.len(),
        1,
        "no second Workload"
    );
}

/// MultiKueue between two control planes, each with its own Kueue and radfm operator: the
/// manager dispatches a TrainingJob to the worker, the worker runs the gang on its nodes, and the
/// worker's status comes back to the manager's job.
#[tokio::test]
async fn multikueue_dispatches_a_job_to_a_worker_cluster_and_mirrors_its_status_back() {
    let _serial = serial().await;
    let manager = Cluster::start(0, 0).await.unwrap();
    let worker = Cluster::start(2, 8).await.unwrap();
    manager
        .start_kueue_with(
            "multiKueue:\n  externalFrameworks:\n  - name: TrainingJob.v1alpha1.radfm.io\n",
        )
        .await
        .unwrap();
    worker.start_kueue().await.unwrap();
    let ns = "dispatch";
    let _manager_ns = manager.namespace(ns).await.unwrap();
    let _worker_ns = worker.namespace(ns).await.unwrap();
    let on_manager = Env {
        cluster: &manager,
        ns: ns.into(),
    };
    let on_worker = Env {
        cluster: &worker,
        ns: ns.into(),
    };
    on_worker.apply(&queues(ns));
    let secret = serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "worker-kubeconfig", "namespace": "kueue-system"},
        "stringData": {"kubeconfig": worker.embedded_kubeconfig().unwrap()},
    });
    manager.kubectl_stdin(&["apply", "-f", "-"], Some(&secret.to_string()));
    on_manager.apply(&format!(
        "apiVersion: kueue.x-k8s.io/v1beta2
kind: MultiKueueCluster
metadata: {{name: worker}}
spec: {{clusterSource: {{kubeConfig: {{locationType: Secret, location: worker-kubeconfig}}}}}}
---
apiVersion: kueue.x-k8s.io/v1beta2
kind: MultiKueueConfig
metadata: {{name: dispatch}}
spec: {{clusters: [worker]}}
---
apiVersion: kueue.x-k8s.io/v1beta2
kind: AdmissionCheck
metadata: {{name: dispatch}}
spec:
  controllerName: kueue.x-k8s.io/multikueue
  parameters: {{apiGroup: kueue.x-k8s.io, kind: MultiKueueConfig, name: dispatch}}
---
apiVersion: kueue.x-k8s.io/v1beta2
kind: ResourceFlavor
metadata: {{name: h100}}
---
apiVersion: kueue.x-k8s.io/v1beta2
kind: ClusterQueue
metadata: {{name: gpus}}
spec:
  namespaceSelector: {{}}
  admissionChecksStrategy: {{admissionChecks: [{{name: dispatch}}]}}
  resourceGroups:
  - coveredResources: [nvidia.com/gpu]
    flavors:
    - name: h100
      resources: [{{name: nvidia.com/gpu, nominalQuota: 16}}]
---
apiVersion: kueue.x-k8s.io/v1beta2
kind: LocalQueue
metadata: {{name: team, namespace: {ns}}}
spec: {{clusterQueue: gpus}}
"
    ));
    let _manager_op = manager.start_operator(ns, "operator-manager", &[]).unwrap();
    let _worker_op = worker.start_operator(ns, "operator-worker", &[]).unwrap();

    let dispatched = job("remote", Some("team"), "", 8)
        .replace("spec:\n", "spec:\n  managedBy: kueue.x-k8s.io/multikueue\n");
    on_manager.apply(&dispatched);
    let pods = on_worker.running("remote", 1, 2).await;
    assert_eq!(
        on_manager.pod_count("remote").await,
        0,
        "nothing runs on the manager"
    );
    let copy = wait_object(
        &on_worker.jobs(),
        "remote",
        WAIT,
        "the worker's copy",
        |_| true,
    )
    .await;
    assert!(
        copy.spec.managed_by.is_none(),
        "the worker's copy is radfm's to run"
    );
    on_manager
        .job("remote", "the worker's Running status mirrored", |j| {
            phase(j) == Some(Phase::Running)
        })
        .await;

    for pod in pods {
        worker
            .end_pod(ns, &pod.name_any(), 0, "Completed")
            .await
            .unwrap();
    }
    on_manager
        .job("remote", "the worker's Succeeded status mirrored", |j| {
            phase(j) == Some(Phase::Succeeded)
        })
        .await;
    on_manager.wait_released("remote", None).await;
}
