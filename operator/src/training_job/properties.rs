//! Properties of [`plan`] over any history a cluster can produce: pods start, exit with any code,
//! vanish, lose their nodes, the user suspends and resumes, time passes. Table tests pin single
//! transitions; these check what must hold after every step of every generated history.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::Pod;
use proptest::prelude::*;
use radfm_api::TrainingJob;
use radfm_api::trainingjob::Phase;

use super::children::fixtures::{JobBuilder, exited, pod, t, terminating};
use super::children::{LABEL_ATTEMPT, LABEL_RANK};
use super::plan::{Observed, plan};

/// One thing that happens in the cluster between two passes.
#[derive(Debug, Clone)]
enum Event {
    /// Time passes; pods whose deletion was requested are gone.
    Tick(i64),
    /// The n-th pod (of those that exist) is scheduled and starts.
    Start(usize),
    /// The n-th pod's container exits with this code.
    Exit(usize, i32),
    /// The n-th pod is deleted by someone else (an eviction, a person).
    Vanish(usize),
    /// The n-th pod's node is lost.
    LoseNode(usize),
    /// The user sets `spec.runPolicy.suspend`.
    Suspend(bool),
}

fn event() -> impl Strategy<Value = Event> {
    let codes = prop::sample::select(vec![0, 1, 64, 65, 66, 75, 76, 77, 137, 143]);
    prop_oneof![
        3 => (1i64..400).prop_map(Event::Tick),
        4 => (0usize..8).prop_map(Event::Start),
        4 => ((0usize..8), codes).prop_map(|(i, c)| Event::Exit(i, c)),
        1 => (0usize..8).prop_map(Event::Vanish),
        1 => (0usize..8).prop_map(Event::LoseNode),
        1 => any::<bool>().prop_map(Event::Suspend),
    ]
}

fn label(p: &Pod, key: &str) -> i32 {
    p.metadata.labels.as_ref().unwrap()[key].parse().unwrap()
}

fn terminal(phase: Option<Phase>) -> bool {
    matches!(phase, Some(Phase::Succeeded | Phase::Failed))
}

/// The cluster as the simulation keeps it.
struct World {
    job: TrainingJob,
    pods: Vec<Pod>,
    lost: BTreeSet<String>,
    now: i64,
}

impl World {
    fn apply(&mut self, e: &Event) {
        let pick = |n: usize, len: usize| (len > 0).then(|| n % len);
        match *e {
            Event::Tick(s) => {
                self.now += s;
                self.pods
                    .retain(|p| p.metadata.deletion_timestamp.is_none());
            }
            Event::Start(n) => {
                if let Some(i) = pick(n, self.pods.len()) {
                    let st = self.pods[i].status.as_mut().unwrap();
                    if st.phase.as_deref() == Some("Pending") {
                        st.phase = Some("Running".into());
                    }
                }
            }
            Event::Exit(n, code) => {
                if let Some(i) = pick(n, self.pods.len()) {
                    let p = &self.pods[i];
                    if matches!(p.status.as_ref().unwrap().phase.as_deref(), Some("Running")) {
                        self.pods[i] = exited(p.clone(), code, "Error");
                    }
                }
            }
            Event::Vanish(n) => {
                if let Some(i) = pick(n, self.pods.len()) {
                    self.pods.remove(i);
                }
            }
            Event::LoseNode(n) => {
                if let Some(i) = pick(n, self.pods.len())
                    && let Some(node) = self.pods[i].spec.as_ref().unwrap().node_name.clone()
                {
                    self.lost.insert(node);
                }
            }
            Event::Suspend(s) => self.job.spec.run_policy.suspend = s,
        }
    }

    fn observed(&self) -> Observed {
        Observed {
            pods: self.pods.iter().cloned().map(std::sync::Arc::new).collect(),
            awaited_pods: BTreeSet::new(),
            service_exists: true,
            pod_group_exists: false,
            lost_nodes: self.lost.clone(),
            now: t(self.now),
            policy_violation: None,
            queueing: None,
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn no_history_duplicates_a_pod_leaves_a_terminal_phase_or_restarts_past_the_backoff_limit(
        replicas in 1i32..4,
        backoff in 0i32..3,
        events in prop::collection::vec(event(), 1..80),
    ) {
        let job = JobBuilder::new(replicas)
            .with(|j| j.spec.run_policy.backoff_limit = backoff)
            .build();
        let mut w = World { job, pods: Vec::new(), lost: BTreeSet::new(), now: 1 };
        for e in std::iter::once(Event::Tick(1)).chain(events) {
            w.apply(&e);
            let before = w.job.status.as_ref().and_then(|s| s.phase);
            let p = plan(&w.job, &w.observed());

            let mut made = BTreeSet::new();
            for c in &p.create_pods {
                let key = (label(c, LABEL_RANK), label(c, LABEL_ATTEMPT));
                prop_assert!(made.insert(key), "{key:?} created twice in one pass");
                prop_assert!(
                    !w.pods.iter().any(|o| (label(o, LABEL_RANK), label(o, LABEL_ATTEMPT)) == key),
                    "{key:?} created while it exists (after {e:?})"
                );
            }
            if terminal(before) {
                prop_assert_eq!(p.status.phase, before, "left a terminal phase after {:?}", e);
                prop_assert!(p.create_pods.is_empty(), "created pods after finishing");
            }
            prop_assert!(
                p.status.counted_restarts <= backoff,
                "{} counted restarts with a backoff limit of {backoff}",
                p.status.counted_restarts
            );

            w.job.status = Some(p.status.clone());
            for c in &p.create_pods {
                let (rank, attempt) = (label(c, LABEL_RANK), label(c, LABEL_ATTEMPT));
                let mut created = pod(&w.job, rank, attempt, "Pending");
                created.metadata.creation_timestamp = Some(t(w.now));
                w.pods.push(created);
            }
            for name in &p.delete_pods {
                if let Some(o) = w.pods.iter_mut().find(|o| o.metadata.name.as_ref() == Some(name))
                    && o.metadata.deletion_timestamp.is_none()
                {
                    *o = terminating(o.clone(), w.now);
                }
            }
            w.pods.retain(|o| !p.force_delete_pods.contains(o.metadata.name.as_ref().unwrap()));
            if p.delete_job {
                break;
            }
        }
    }
}
