//! What the TrainingJob controller keeps in memory from its own watches, so that a pass reads
//! its job's workers, its Service and the nodes they run on without a request.
//!
//! A pass used to list the job's pods, get its Service and get every node its workers ran on:
//! about ten requests per pod event, which made the API server the bottleneck of a burst of
//! 1,000 jobs (`make bench-operator`). The watches that trigger passes now also fill these
//! caches. Workers are indexed by namespace and job, so a pass costs the same whatever the
//! number of other jobs. A cache may lag the API server by a moment; the plan tolerates that
//! as it always has (creates of existing pods are no-ops, deletes of gone pods too, and the next
//! event brings the next pass). One lag is worth avoiding: a pass right after the one that created
//! a wide gang would see few of its pods yet and create the rest again, hundreds of refused
//! requests for a 256-worker gang. So the index remembers the pods a pass created until their
//! watch events arrive ([`WorkerIndex::awaited`]), as kube-controller-manager's "expectations" do.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod, PodSpec, Service};
use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher::Event;

use super::children::LABEL_JOB;

/// The controller's caches.
#[derive(Clone)]
pub struct Caches {
    /// Workers by namespace and job.
    pub workers: WorkerIndex,
    /// The operator's Services.
    pub services: Store<Service>,
    /// Every node.
    pub nodes: Store<Node>,
}

impl Caches {
    /// Waits until every cache holds a complete list: before that, a worker or node missing
    /// from it may only not have arrived yet.
    pub async fn wait_until_ready(&self) {
        self.workers.wait_until_listed().await;
        let _ = self.services.wait_until_ready().await;
        let _ = self.nodes.wait_until_ready().await;
    }

    /// The job's workers owned by `owner_uid` (a job of the same name before it was deleted and
    /// recreated owns none of them).
    pub fn workers_of(&self, ns: &str, job: &str, owner_uid: &str) -> Vec<Arc<Pod>> {
        self.workers
            .of(ns, job)
            .into_iter()
            .filter(|p| crate::effects::controlled_by(p.as_ref(), owner_uid))
            .collect()
    }

    /// Whether the Service `name` exists in `ns`.
    pub fn has_service(&self, ns: &str, name: &str) -> bool {
        self.services
            .get(&ObjectRef::new(name).within(ns))
            .is_some()
    }

    /// The node `name`, if it exists.
    pub fn node(&self, name: &str) -> Option<Arc<Node>> {
        self.nodes.get(&ObjectRef::new(name))
    }
}

type Key = (String, String);

/// Pods by (namespace, job label), kept from a watch's events.
#[derive(Clone)]
pub struct WorkerIndex {
    inner: Arc<RwLock<IndexState>>,
    /// True once the first complete list arrived: before that, a missing pod means nothing.
    listed: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Default for WorkerIndex {
    fn default() -> Self {
        WorkerIndex {
            inner: Arc::default(),
            listed: Arc::new(tokio::sync::watch::channel(false).0),
        }
    }
}

#[derive(Default)]
struct IndexState {
    by_job: HashMap<Key, BTreeMap<String, Arc<Pod>>>,
    /// Where each pod is filed (its job label could change).
    filed: HashMap<(String, String), Key>,
    /// A relist in progress: the complete set replaces the index at its end.
    relist: Option<Vec<Pod>>,
    /// Pods created by a pass whose watch event has not arrived, by job, with when they were
    /// created.
    awaited: HashMap<Key, HashMap<String, Instant>>,
}

/// How long a created pod is awaited at most: a watch that dropped the event (or a pod deleted
/// before it was seen) must not stop the pod being created again for long.
pub const AWAIT_CREATED: Duration = Duration::from_secs(30);

impl IndexState {
    fn insert(&mut self, pod: Pod) {
        let id = (pod.namespace().unwrap_or_default(), pod.name_any());
        self.remove(&id);
        self.forget_awaited(&id);
        let Some(job) = pod.labels().get(LABEL_JOB).cloned() else {
            return;
        };
        let key = (id.0.clone(), job);
        self.by_job
            .entry(key.clone())
            .or_default()
            .insert(id.1.clone(), Arc::new(pod));
        self.filed.insert(id, key);
    }

    /// The pod `id` is seen (or gone): it is no longer awaited, whichever job awaited it.
    fn forget_awaited(&mut self, id: &(String, String)) {
        if self.awaited.is_empty() {
            return;
        }
        self.awaited.retain(|(ns, _), names| {
            if *ns == id.0 {
                names.remove(&id.1);
            }
            !names.is_empty()
        });
    }

    fn remove(&mut self, id: &(String, String)) {
        if let Some(key) = self.filed.remove(id)
            && let Some(pods) = self.by_job.get_mut(&key)
        {
            pods.remove(&id.1);
            if pods.is_empty() {
                self.by_job.remove(&key);
            }
        }
    }
}

impl WorkerIndex {
    /// Applies one watch event.
    pub fn apply(&self, event: &Event<Pod>) {
        let mut state = self.inner.write().unwrap_or_else(|e| e.into_inner());
        match event {
            Event::Apply(p) => state.insert(p.clone()),
            Event::Delete(p) => {
                let id = (p.namespace().unwrap_or_default(), p.name_any());
                state.forget_awaited(&id);
                state.remove(&id);
            }
            Event::Init => state.relist = Some(Vec::new()),
            Event::InitApply(p) => state.relist.get_or_insert_with(Vec::new).push(p.clone()),
            Event::InitDone => {
                let pods = state.relist.take().unwrap_or_default();
                state.by_job.clear();
                state.filed.clear();
                for p in pods {
                    state.insert(p);
                }
                self.listed.send_replace(true);
            }
        }
    }

    /// Remembers that `job`'s pods `names` in `ns` were just created (or found to exist).
    pub fn expect(
        &self,
        ns: &str,
        job: &str,
        names: impl IntoIterator<Item = String>,
        now: Instant,
    ) {
        let mut state = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let unseen: Vec<String> = names
            .into_iter()
            .filter(|n| !state.filed.contains_key(&(ns.to_string(), n.clone())))
            .collect();
        if unseen.is_empty() {
            return;
        }
        let awaited = state
            .awaited
            .entry((ns.to_string(), job.to_string()))
            .or_default();
        awaited.extend(unseen.into_iter().map(|n| (n, now)));
    }

    /// `job`'s pods in `ns` created less than [`AWAIT_CREATED`] before `now` that the watch has
    /// not shown yet: a pass must not create them again. Older entries are forgotten.
    pub fn awaited(&self, ns: &str, job: &str, now: Instant) -> BTreeSet<String> {
        let mut state = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let key = (ns.to_string(), job.to_string());
        let Some(names) = state.awaited.get_mut(&key) else {
            return BTreeSet::new();
        };
        names.retain(|_, at| now.saturating_duration_since(*at) < AWAIT_CREATED);
        let awaited = names.keys().cloned().collect();
        if names.is_empty() {
            state.awaited.remove(&key);
        }
        awaited
    }

    /// Waits until the first complete list arrived.
    pub async fn wait_until_listed(&self) {
        let mut rx = self.listed.subscribe();
        // The sender lives as long as the index, so this only ends once listed.
        let _ = rx.wait_for(|listed| *listed).await;
    }

    /// The pods labelled as workers of `job` in `ns`.
    pub fn of(&self, ns: &str, job: &str) -> Vec<Arc<Pod>> {
        let state = self.inner.read().unwrap_or_else(|e| e.into_inner());
        state
            .by_job
            .get(&(ns.to_string(), job.to_string()))
            .map(|pods| pods.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Number of pods held.
    pub fn len(&self) -> usize {
        let state = self.inner.read().unwrap_or_else(|e| e.into_inner());
        state.filed.len()
    }

    /// Whether it holds no pod.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Drops what a pass never reads from a cached object: the field managers' bookkeeping (and a
/// node's image list), a large part of each object's memory.
pub fn slim<K: kube::Resource>(obj: &mut K) {
    obj.meta_mut().managed_fields = None;
}

/// A worker pod as the index keeps it: its metadata, the node it was bound to and its status,
/// which are all a pass reads of it. The rest of its spec (containers, environment, volumes) is
/// what radfm itself wrote and never reads back, and it is most of a worker pod's memory: with
/// it, 8,000 cached workers took the operator to 314 MiB (`make bench-operator`).
pub fn slim_worker(pod: &mut Pod) {
    slim(pod);
    if let Some(spec) = pod.spec.take() {
        pod.spec = Some(PodSpec {
            node_name: spec.node_name,
            ..PodSpec::default()
        });
    }
}

/// A node as the cache keeps it: without its image list, which can run to hundreds of entries.
pub fn slim_node(node: &mut Node) {
    slim(node);
    if let Some(s) = node.status.as_mut() {
        s.images = None;
    }
}

/// Tells which node events can change a job's plan: a node's readiness changing, or the node
/// going away. Kubelets rewrite every node's status every few minutes; waking every active job
/// on each of those rewrites would reconcile all jobs several times a second on a large cluster.
#[derive(Default)]
pub struct ReadinessChanges {
    ready: HashMap<String, bool>,
}

impl ReadinessChanges {
    /// The node to pass on, if the event matters.
    pub fn filter(&mut self, event: Event<Node>) -> Option<Node> {
        match event {
            Event::Apply(n) | Event::InitApply(n) => {
                let ready = super::node_ready(&n);
                let before = self.ready.insert(n.name_any(), ready);
                // A node seen for the first time matters only when it is not ready.
                let changed = match before {
                    Some(was) => was != ready,
                    None => !ready,
                };
                changed.then_some(n)
            }
            Event::Delete(n) => {
                self.ready.remove(&n.name_any());
                Some(n)
            }
            Event::Init | Event::InitDone => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str, job: Option<&str>) -> Pod {
        let labels = job.map(|j| serde_json::json!({LABEL_JOB: j}));
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": ns, "labels": labels},
        }))
        .unwrap()
    }

    fn names(pods: &[Arc<Pod>]) -> Vec<String> {
        pods.iter().map(|p| p.name_any()).collect()
    }

    #[test]
    fn a_cached_worker_is_a_fraction_of_the_pod_and_reads_the_same_to_a_pass() {
        use super::super::children::fixtures::{JobBuilder, exited, pod, terminating};
        use super::super::workers::worker;
        let job = JobBuilder::new(2).build();
        let lost = BTreeSet::from(["node-1".to_string()]);
        let pods = [
            pod(&job, 0, 1, "Pending"),
            pod(&job, 0, 1, "Running"),
            pod(&job, 1, 1, "Running"),
            exited(pod(&job, 0, 1, "Running"), 137, "OOMKilled"),
            terminating(pod(&job, 0, 2, "Running"), 5),
        ];
        for full in pods {
            let mut cached = full.clone();
            slim_worker(&mut cached);
            let seen = |p: &Pod| {
                worker(p, &lost).map(|w| {
                    let when = w.deleting_since.clone();
                    (w.name, w.rank, w.attempt, when, w.state, w.ready)
                })
            };
            assert_eq!(seen(&cached), seen(&full));
            assert_eq!(cached.metadata, full.metadata);
            assert_eq!(cached.status, full.status);
            let size = |p: &Pod| serde_json::to_vec(p).unwrap().len();
            assert!(
                size(&cached) * 3 < size(&full),
                "{} of {} bytes kept",
                size(&cached),
                size(&full)
            );
        }
    }

    #[test]
    fn workers_are_found_by_namespace_and_job_and_leave_on_delete() {
        let index = WorkerIndex::default();
        index.apply(&Event::Apply(pod("a", "mae-w0-a1", Some("mae"))));
        index.apply(&Event::Apply(pod("a", "mae-w1-a1", Some("mae"))));
        index.apply(&Event::Apply(pod("b", "mae-w0-a1", Some("mae"))));
        index.apply(&Event::Apply(pod("a", "other", None)));
        assert_eq!(names(&index.of("a", "mae")), ["mae-w0-a1", "mae-w1-a1"]);
        assert_eq!(names(&index.of("b", "mae")), ["mae-w0-a1"]);
        index.apply(&Event::Delete(pod("a", "mae-w0-a1", Some("mae"))));
        assert_eq!(names(&index.of("a", "mae")), ["mae-w1-a1"]);
        // A pod relabelled to another job moves with its label.
        index.apply(&Event::Apply(pod("a", "mae-w1-a1", Some("other"))));
        assert!(index.of("a", "mae").is_empty());
        assert_eq!(index.len(), 2);
    }

    #[test]
    fn a_relist_replaces_the_index_only_once_complete() {
        let index = WorkerIndex::default();
        index.apply(&Event::Apply(pod("a", "gone", Some("mae"))));
        index.apply(&Event::Init);
        index.apply(&Event::InitApply(pod("a", "kept", Some("mae"))));
        assert_eq!(
            names(&index.of("a", "mae")),
            ["gone"],
            "the old set until the relist ends"
        );
        index.apply(&Event::InitDone);
        assert_eq!(names(&index.of("a", "mae")), ["kept"]);
    }

    #[tokio::test]
    async fn the_index_is_ready_only_after_its_first_complete_list() {
        let index = WorkerIndex::default();
        let waiting = tokio::spawn({
            let index = index.clone();
            async move { index.wait_until_listed().await }
        });
        index.apply(&Event::Init);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        index.apply(&Event::InitDone);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("ready after the list")
            .unwrap();
    }

    #[test]
    fn created_pods_are_awaited_until_the_watch_shows_them_or_the_wait_expires() {
        let index = WorkerIndex::default();
        let t0 = Instant::now();
        index.apply(&Event::Apply(pod("a", "mae-w0-a1", Some("mae"))));
        let created = ["mae-w0-a1", "mae-w1-a1", "mae-w2-a1", "mae-w3-a1"].map(String::from);
        index.expect("a", "mae", created, t0);
        let awaited = |i: &WorkerIndex, ns: &str, at: Instant| -> Vec<String> {
            i.awaited(ns, "mae", at).into_iter().collect()
        };
        // w0 was already in the cache; the others are awaited, in their namespace only.
        assert_eq!(
            awaited(&index, "a", t0),
            ["mae-w1-a1", "mae-w2-a1", "mae-w3-a1"]
        );
        assert!(awaited(&index, "b", t0).is_empty());
        index.apply(&Event::Apply(pod("a", "mae-w1-a1", Some("mae"))));
        index.apply(&Event::Delete(pod("a", "mae-w2-a1", Some("mae"))));
        assert_eq!(awaited(&index, "a", t0), ["mae-w3-a1"]);
        assert!(awaited(&index, "a", t0 + AWAIT_CREATED).is_empty());
    }

    fn node(name: &str, ready: &str) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "status": {"conditions": [{"type": "Ready", "status": ready}]},
        }))
        .unwrap()
    }

    #[test]
    fn only_readiness_changes_and_deleted_nodes_wake_jobs() {
        let mut f = ReadinessChanges::default();
        let passed = |f: &mut ReadinessChanges, e| f.filter(e).map(|n| n.name_any());
        assert_eq!(passed(&mut f, Event::InitApply(node("a", "True"))), None);
        assert_eq!(
            passed(&mut f, Event::InitApply(node("b", "Unknown"))),
            Some("b".into())
        );
        // A heartbeat that changes nothing about readiness.
        assert_eq!(passed(&mut f, Event::Apply(node("a", "True"))), None);
        assert_eq!(
            passed(&mut f, Event::Apply(node("a", "Unknown"))),
            Some("a".into())
        );
        assert_eq!(
            passed(&mut f, Event::Apply(node("a", "True"))),
            Some("a".into())
        );
        assert_eq!(
            passed(&mut f, Event::Delete(node("a", "True"))),
            Some("a".into())
        );
        assert_eq!(passed(&mut f, Event::InitDone), None);
    }
}
