//! The objects a TrainingJob owns, built from the job alone: the headless Service, one Pod per
//! worker and, for gang schedulers, a PodGroup.
//!
//! Everything here is a pure function of the job and the attempt number, so names and contents are
//! deterministic: an operator that crashed half-way through creating a gang builds exactly the same
//! objects again, and the API server's AlreadyExists answer makes the retry idempotent.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvFromSource, EnvVar, EnvVarSource,
    ObjectFieldSelector, Pod, PodSecurityContext, PodSpec, ResourceRequirements, SeccompProfile,
    Secret, SecretEnvSource, SecretVolumeSource, SecurityContext, Service, ServiceAccount,
    ServicePort, ServiceSpec, Toleration, Volume, VolumeMount,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicySpec,
};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use kube::Resource;
use radfm_api::TrainingJob;
use radfm_api::env::{self, EnvContract};
use radfm_api::trainingjob::{PodOverrides, WorkersSpec};
use serde_json::json;

/// Label: the owning TrainingJob's name.
pub const LABEL_JOB: &str = "radfm.io/job-name";
/// Label: the worker's rank.
pub const LABEL_RANK: &str = "radfm.io/rank";
/// Label: the gang attempt the pod belongs to.
pub const LABEL_ATTEMPT: &str = "radfm.io/attempt";
/// Label: who manages the object.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Value of [`LABEL_MANAGED_BY`].
pub const MANAGER: &str = "radfm-operator";
pub use radfm_api::{ANNOTATION_CHECKPOINT, ANNOTATION_PROGRESS};
/// Name of the trainer container.
pub const CONTAINER: &str = "trainer";
/// GPU resource name.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";

/// Gang schedulers radfm creates a PodGroup for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GangScheduler {
    /// Volcano (`scheduling.volcano.sh/v1beta1` PodGroup).
    Volcano,
    /// scheduler-plugins coscheduling (`scheduling.x-k8s.io/v1alpha1` PodGroup).
    Coscheduling,
}

impl GangScheduler {
    /// The gang scheduler named by `schedulerName`, if it is one.
    pub fn of(job: &TrainingJob) -> Option<Self> {
        match job.spec.workers.scheduler_name.as_deref() {
            Some("volcano") => Some(GangScheduler::Volcano),
            Some("scheduler-plugins-scheduler") => Some(GangScheduler::Coscheduling),
            _ => None,
        }
    }

    /// (group, version, kind, plural) of its PodGroup.
    pub fn gvk(self) -> (&'static str, &'static str, &'static str, &'static str) {
        match self {
            GangScheduler::Volcano => ("scheduling.volcano.sh", "v1beta1", "PodGroup", "podgroups"),
            GangScheduler::Coscheduling => {
                ("scheduling.x-k8s.io", "v1alpha1", "PodGroup", "podgroups")
            }
        }
    }
}

/// Name of the headless Service (and of the PodGroup): the job's name.
pub fn service_name(job: &TrainingJob) -> String {
    job.metadata.name.clone().unwrap_or_default()
}

/// Stable hostname of worker `rank` (the same in every attempt).
pub fn hostname(job: &TrainingJob, rank: i32) -> String {
    format!("{}-w{rank}", service_name(job))
}

/// Pod name of worker `rank` in `attempt`.
pub fn pod_name(job: &TrainingJob, rank: i32, attempt: i32) -> String {
    format!("{}-a{attempt}", hostname(job, rank))
}

/// DNS name of rank 0 through the headless Service.
pub fn master_addr(job: &TrainingJob) -> String {
    let ns = job.metadata.namespace.as_deref().unwrap_or("default");
    format!("{}.{}.{ns}.svc", hostname(job, 0), service_name(job))
}

/// Group of the images' non-root user (uid and gid 10001 in radfm's Dockerfiles): pods get it as
/// `fsGroup`, so Secret volumes with mode 0400 stay readable by that user.
pub const IMAGE_GID: i64 = 10001;

/// The pod-level half of the `restricted` Pod Security Standard, which every pod the operator
/// creates meets so that namespaces can enforce it.
pub fn restricted_pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        fs_group: Some(IMAGE_GID),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The container-level half of the `restricted` profile: no privilege escalation, every
/// capability dropped.
pub fn restricted_container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Where the gang's secret is mounted in worker pods.
pub const GANG_SECRET_DIR: &str = "/var/run/radfm/gang";
/// The key of the gang's Secret (and its file name).
pub const GANG_SECRET_KEY: &str = "secret";
const GANG_SECRET_VOLUME: &str = "radfm-gang";

/// The job's gang Secret: named after the job and its uid, so that a re-created job of the same
/// name never meets the old job's secret.
pub fn gang_secret_name(job: &TrainingJob) -> String {
    let uid = job.metadata.uid.as_deref().unwrap_or_default();
    format!("{}-gang-{}", service_name(job), &uid[..uid.len().min(8)])
}

/// The Secret only this job's pods mount: `hex`, a fresh random secret the controller draws
/// when it creates the Secret (rendezvous and ring admit only holders, see
/// `radfm_collective::auth`).
pub fn gang_secret(job: &TrainingJob, hex: String) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(gang_secret_name(job)),
            namespace: job.metadata.namespace.clone(),
            labels: Some(base_labels(job)),
            owner_references: Some(vec![owner(job)]),
            ..Default::default()
        },
        string_data: Some(BTreeMap::from([(GANG_SECRET_KEY.to_string(), hex)])),
        type_: Some("Opaque".into()),
        ..Default::default()
    }
}

/// ServiceAccount of the job's worker pods when the template names none.
pub fn trainer_service_account_name(job: &TrainingJob) -> String {
    format!("{}-trainer", service_name(job))
}

/// What rank 0 needs to report progress (annotations on its own pod), when the job's template
/// names no ServiceAccount: the job's own ServiceAccount, used by the rank-0 pod only, a Role
/// allowing `patch` of exactly that pod of this attempt (no `get`, no other pod), and the binding
/// between them. The other ranks run without an API token. All owned by the job.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainerAccess {
    /// `<job>-trainer`.
    pub service_account: ServiceAccount,
    /// The rank-0 pod of `attempt`, by name.
    pub role: Role,
    /// The Role bound to the ServiceAccount.
    pub binding: RoleBinding,
}

/// The [`TrainerAccess`] of `attempt`, or `None` where the user brings a ServiceAccount.
pub fn trainer_access(job: &TrainingJob, attempt: i32) -> Option<TrainerAccess> {
    let template = job.spec.workers.template.as_ref();
    if template.is_some_and(|t| t.service_account_name.is_some()) {
        return None;
    }
    let name = trainer_service_account_name(job);
    let meta = ObjectMeta {
        name: Some(name.clone()),
        namespace: job.metadata.namespace.clone(),
        labels: Some(base_labels(job)),
        owner_references: Some(vec![owner(job)]),
        ..Default::default()
    };
    let pods = vec![pod_name(job, 0, attempt)];
    Some(TrainerAccess {
        service_account: ServiceAccount {
            metadata: meta.clone(),
            ..Default::default()
        },
        role: Role {
            metadata: meta.clone(),
            rules: Some(vec![PolicyRule {
                api_groups: Some(vec![String::new()]),
                resources: Some(vec!["pods".into()]),
                resource_names: Some(pods),
                verbs: vec!["patch".into()],
                ..Default::default()
            }]),
        },
        binding: RoleBinding {
            metadata: meta,
            role_ref: RoleRef {
                api_group: Some("rbac.authorization.k8s.io".into()),
                kind: "Role".into(),
                name: name.clone(),
            },
            subjects: Some(vec![Subject {
                kind: "ServiceAccount".into(),
                name,
                namespace: job.metadata.namespace.clone(),
                ..Default::default()
            }]),
        },
    })
}

pub(crate) fn owner(job: &TrainingJob) -> OwnerReference {
    job.controller_owner_ref(&())
        .expect("a TrainingJob from the API server has a name and uid")
}

fn base_labels(job: &TrainingJob) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_JOB.to_string(), service_name(job)),
        (LABEL_MANAGED_BY.to_string(), MANAGER.to_string()),
    ])
}

/// The headless Service that gives every worker a DNS name, even before it is Ready.
pub fn service(job: &TrainingJob) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(service_name(job)),
            namespace: job.metadata.namespace.clone(),
            labels: Some(base_labels(job)),
            owner_references: Some(vec![owner(job)]),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(base_labels(job)),
            ports: Some(vec![ServicePort {
                name: Some("rendezvous".into()),
                port: env::DEFAULT_MASTER_PORT.into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The job's NetworkPolicy: its worker pods accept connections from the same job's pods only
/// (rendezvous, ring, NCCL's bootstrap); egress (object storage) is left alone. Enforced where
/// the cluster's network plugin implements NetworkPolicy.
pub fn gang_network_policy(job: &TrainingJob) -> NetworkPolicy {
    let gang = LabelSelector {
        match_labels: Some(BTreeMap::from([(LABEL_JOB.to_string(), service_name(job))])),
        ..Default::default()
    };
    NetworkPolicy {
        metadata: ObjectMeta {
            name: Some(format!("{}-gang", service_name(job))),
            namespace: job.metadata.namespace.clone(),
            labels: Some(base_labels(job)),
            owner_references: Some(vec![owner(job)]),
            ..Default::default()
        },
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(gang.clone()),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: Some(vec![NetworkPolicyPeer {
                    pod_selector: Some(gang),
                    ..Default::default()
                }]),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
}

/// The PodGroup for a gang scheduler, as a dynamic object (its CRD is the scheduler's).
pub fn pod_group(job: &TrainingJob, sched: GangScheduler) -> serde_json::Value {
    let (group, version, kind, _) = sched.gvk();
    let o = owner(job);
    json!({
        "apiVersion": format!("{group}/{version}"),
        "kind": kind,
        "metadata": {
            "name": service_name(job),
            "namespace": job.metadata.namespace,
            "labels": base_labels(job),
            "ownerReferences": [o],
        },
        "spec": {"minMember": job.spec.workers.replicas},
    })
}

/// The worker's labels (rank, attempt, gang scheduler group) and annotations over the
/// template's.
fn worker_metadata(
    job: &TrainingJob,
    over: &PodOverrides,
    rank: i32,
    attempt: i32,
) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let mut labels = over.labels.clone().unwrap_or_default();
    labels.extend(base_labels(job));
    labels.insert(LABEL_RANK.into(), rank.to_string());
    labels.insert(LABEL_ATTEMPT.into(), attempt.to_string());
    let mut annotations = over.annotations.clone().unwrap_or_default();
    match GangScheduler::of(job) {
        Some(GangScheduler::Volcano) => {
            annotations.insert("scheduling.k8s.io/group-name".into(), service_name(job));
        }
        Some(GangScheduler::Coscheduling) => {
            labels.insert("scheduling.x-k8s.io/pod-group".into(), service_name(job));
        }
        None => {}
    }
    (labels, annotations)
}

/// The env contract and the pod's name, over the template's variables of other names.
fn worker_env(job: &TrainingJob, over: &PodOverrides, rank: i32, attempt: i32) -> Vec<EnvVar> {
    let contract = EnvContract::for_worker(job, rank, attempt, &master_addr(job));
    let ours: Vec<EnvVar> = contract
        .to_vars()
        .into_iter()
        .map(|(name, value)| EnvVar {
            name,
            value: Some(value),
            ..Default::default()
        })
        .chain([EnvVar {
            name: env::GANG_SECRET_FILE.into(),
            value: Some(format!("{GANG_SECRET_DIR}/{GANG_SECRET_KEY}")),
            ..Default::default()
        }])
        .chain([EnvVar {
            name: env::POD_NAME.into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.name".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }])
        .collect();
    let mut env_vars: Vec<EnvVar> = over
        .env
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|e| !ours.iter().any(|o| o.name == e.name))
        .collect();
    env_vars.extend(ours);
    env_vars
}

/// Resources and tolerations: GPUs requested and limited, and the GPU taint tolerated.
fn worker_resources(w: &WorkersSpec) -> (ResourceRequirements, Vec<Toleration>) {
    let mut resources = w.resources.clone().unwrap_or_default();
    let mut tolerations = w.tolerations.clone().unwrap_or_default();
    if w.gpus_per_worker == 0 {
        return (resources, tolerations);
    }
    let gpus = Quantity(w.gpus_per_worker.to_string());
    for side in [&mut resources.limits, &mut resources.requests] {
        side.get_or_insert_with(BTreeMap::new)
            .insert(GPU_RESOURCE.into(), gpus.clone());
    }
    if !tolerations
        .iter()
        .any(|t| t.key.as_deref() == Some(GPU_RESOURCE))
    {
        tolerations.push(Toleration {
            key: Some(GPU_RESOURCE.into()),
            operator: Some("Exists".into()),
            effect: Some("NoSchedule".into()),
            ..Default::default()
        });
    }
    (resources, tolerations)
}

/// A memory-backed /dev/shm sized by `workers.shmSize`, then the template's volumes.
fn worker_volumes(
    job: &TrainingJob,
    w: &WorkersSpec,
    over: &PodOverrides,
) -> (Vec<Volume>, Vec<VolumeMount>) {
    let mut volumes = vec![
        Volume {
            name: "dshm".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".into()),
                size_limit: w.shm_size.clone(),
            }),
            ..Default::default()
        },
        Volume {
            name: GANG_SECRET_VOLUME.into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(gang_secret_name(job)),
                default_mode: Some(0o440),
                optional: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        },
    ];
    volumes.extend(over.volumes.clone().unwrap_or_default());
    let mut mounts = vec![
        VolumeMount {
            name: "dshm".into(),
            mount_path: "/dev/shm".into(),
            ..Default::default()
        },
        VolumeMount {
            name: GANG_SECRET_VOLUME.into(),
            mount_path: GANG_SECRET_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        },
    ];
    mounts.extend(over.volume_mounts.clone().unwrap_or_default());
    (volumes, mounts)
}

/// Worker pod `rank` of `attempt`, carrying the env contract.
pub fn worker_pod(job: &TrainingJob, rank: i32, attempt: i32) -> Pod {
    let spec = &job.spec;
    let w = &spec.workers;
    let over = w.template.clone().unwrap_or_default();
    let (labels, annotations) = worker_metadata(job, &over, rank, attempt);
    let env_vars = worker_env(job, &over, rank, attempt);
    let (resources, tolerations) = worker_resources(w);
    let (volumes, mounts) = worker_volumes(job, w, &over);
    Pod {
        metadata: ObjectMeta {
            name: Some(pod_name(job, rank, attempt)),
            namespace: job.metadata.namespace.clone(),
            labels: Some(labels),
            annotations: (!annotations.is_empty()).then_some(annotations),
            owner_references: Some(vec![owner(job)]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            hostname: Some(hostname(job, rank)),
            subdomain: Some(service_name(job)),
            restart_policy: Some("Never".into()),
            containers: vec![Container {
                name: CONTAINER.into(),
                image: Some(spec.image.clone()),
                image_pull_policy: spec.image_pull_policy.map(|p| p.as_str().to_string()),
                // A failed trainer's last log lines become the container's termination
                // message, which the job's Failed condition quotes.
                termination_message_policy: Some("FallbackToLogsOnError".into()),
                command: Some(over.trainer_command()),
                args: Some(over.trainer_args()),
                security_context: Some(restricted_container_security()),
                env: Some(env_vars),
                env_from: spec.dataset.credentials_secret_ref.as_ref().map(|s| {
                    vec![EnvFromSource {
                        secret_ref: Some(SecretEnvSource {
                            name: s.name.clone(),
                            optional: Some(false),
                        }),
                        ..Default::default()
                    }]
                }),
                ports: Some(vec![k8s_openapi::api::core::v1::ContainerPort {
                    name: Some("rendezvous".into()),
                    container_port: env::DEFAULT_MASTER_PORT.into(),
                    ..Default::default()
                }]),
                resources: Some(ResourceRequirements { ..resources }),
                volume_mounts: Some(mounts),
                ..Default::default()
            }],
            volumes: Some(volumes),
            node_selector: w.node_selector.clone(),
            tolerations: (!tolerations.is_empty()).then_some(tolerations),
            affinity: w.affinity.clone(),
            priority_class_name: w.priority_class_name.clone(),
            scheduler_name: w.scheduler_name.clone(),
            service_account_name: over
                .service_account_name
                .clone()
                .or_else(|| (rank == 0).then(|| trainer_service_account_name(job))),
            // Only rank 0 talks to the API server (its own pod's annotations).
            automount_service_account_token: (over.service_account_name.is_none() && rank != 0)
                .then_some(false),
            security_context: Some(restricted_pod_security()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
pub(crate) mod fixtures {
    //! Builders for jobs and pods in the states the table tests need.
    use super::*;
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateTerminated, ContainerStatus, PodCondition, PodStatus,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    pub fn t(secs: i64) -> Time {
        Time(Timestamp::from_second(1_800_000_000 + secs).unwrap())
    }

    pub struct JobBuilder(pub TrainingJob);

    impl JobBuilder {
        pub fn new(replicas: i32) -> Self {
            let mut job = TrainingJob::from_yaml(
                &[
                    "apiVersion: radfm.io/v1alpha1",
                    "kind: TrainingJob",
                    "metadata: {name: mae, namespace: ml, uid: uid-1, generation: 1}",
                    "spec:",
                    "  image: radfm/trainer:1",
                    &format!("  workers: {{replicas: {replicas}, gpusPerWorker: 8}}"),
                    "  dataset: {uri: 's3://data/cohort'}",
                    "  checkpoint: {uri: 's3://ckpt/mae'}",
                    "  training: {steps: 100}",
                ]
                .join("\n"),
                "fixture",
            )
            .unwrap();
            job.metadata.creation_timestamp = Some(t(0));
            JobBuilder(job)
        }
        pub fn with(mut self, f: impl FnOnce(&mut TrainingJob)) -> Self {
            f(&mut self.0);
            self
        }
        pub fn build(self) -> TrainingJob {
            self.0
        }
    }

    /// A worker pod as the API server would return it after creation, in the given phase.
    pub fn pod(job: &TrainingJob, rank: i32, attempt: i32, phase: &str) -> Pod {
        let mut p = worker_pod(job, rank, attempt);
        p.metadata.uid = Some(format!("pod-{rank}-{attempt}"));
        p.metadata.creation_timestamp = Some(t(1));
        p.spec.as_mut().unwrap().node_name = Some(format!("node-{rank}"));
        p.status = Some(PodStatus {
            phase: Some(phase.into()),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: if phase == "Running" { "True" } else { "False" }.into(),
                ..Default::default()
            }]),
            ..Default::default()
        });
        p
    }

    pub fn exited(mut p: Pod, code: i32, reason: &str) -> Pod {
        let st = p.status.as_mut().unwrap();
        st.phase = Some(if code == 0 { "Succeeded" } else { "Failed" }.into());
        st.container_statuses = Some(vec![ContainerStatus {
            name: CONTAINER.into(),
            state: Some(ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: code,
                    reason: Some(reason.into()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }]);
        p
    }

    /// A pod whose deletion was requested at `since` with a 30 s grace period.
    pub fn terminating(mut p: Pod, since: i64) -> Pod {
        p.metadata.deletion_timestamp = Some(t(since + 30));
        p.metadata.deletion_grace_period_seconds = Some(30);
        p
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::JobBuilder;
    use super::*;

    #[test]
    fn worker_pod_carries_the_env_contract_gpus_and_stable_dns_name() {
        let job = JobBuilder::new(4).build();
        let pod = worker_pod(&job, 2, 3);
        assert_eq!(pod.metadata.name.as_deref(), Some("mae-w2-a3"));
        let spec = pod.spec.unwrap();
        assert_eq!(
            (spec.hostname.as_deref(), spec.subdomain.as_deref()),
            (Some("mae-w2"), Some("mae"))
        );
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        let c = &spec.containers[0];
        let env: BTreeMap<_, _> = c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .filter_map(|e| Some((e.name.as_str(), e.value.clone()?)))
            .collect();
        assert_eq!(env[env::NODE_RANK], "2");
        assert_eq!(env[env::ATTEMPT], "3");
        assert_eq!(env[env::WORLD_SIZE], "32");
        assert_eq!(env[env::MASTER_ADDR], "mae-w0.mae.ml.svc");
        assert_eq!(env[env::JOB_UID], "uid-1");
        assert_eq!(
            c.resources.as_ref().unwrap().limits.as_ref().unwrap()[GPU_RESOURCE].0,
            "8"
        );
        assert!(
            spec.tolerations
                .unwrap()
                .iter()
                .any(|t| t.key.as_deref() == Some(GPU_RESOURCE))
        );
        let labels = pod.metadata.labels.unwrap();
        assert_eq!(
            (labels[LABEL_RANK].as_str(), labels[LABEL_ATTEMPT].as_str()),
            ("2", "3")
        );
        let owner = &pod.metadata.owner_references.unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.controller),
            ("TrainingJob", Some(true))
        );
    }

    #[test]
    fn user_overrides_merge_but_contract_variables_win() {
        let job = JobBuilder::new(1)
            .with(|j| {
                j.spec.workers.template = Some(radfm_api::trainingjob::PodOverrides {
                    env: Some(vec![
                        EnvVar {
                            name: env::NODE_RANK.into(),
                            value: Some("99".into()),
                            ..Default::default()
                        },
                        EnvVar {
                            name: "EXTRA".into(),
                            value: Some("1".into()),
                            ..Default::default()
                        },
                    ]),
                    labels: Some(BTreeMap::from([
                        (LABEL_RANK.to_string(), "x".to_string()),
                        ("team".into(), "rad".into()),
                    ])),
                    service_account_name: Some("trainer".into()),
                    ..Default::default()
                })
            })
            .build();
        let pod = worker_pod(&job, 0, 1);
        let env = pod.spec.as_ref().unwrap().containers[0]
            .env
            .clone()
            .unwrap();
        assert_eq!(env.iter().filter(|e| e.name == env::NODE_RANK).count(), 1);
        assert_eq!(
            env.iter()
                .find(|e| e.name == env::NODE_RANK)
                .unwrap()
                .value
                .as_deref(),
            Some("0")
        );
        assert!(env.iter().any(|e| e.name == "EXTRA"));
        let labels = pod.metadata.labels.unwrap();
        assert_eq!(
            (labels[LABEL_RANK].as_str(), labels["team"].as_str()),
            ("0", "rad")
        );
        assert_eq!(
            pod.spec.unwrap().service_account_name.as_deref(),
            Some("trainer")
        );
    }

    #[test]
    fn worker_runs_the_trainers_train_subcommand_unless_the_template_says_otherwise() {
        let pod = worker_pod(&JobBuilder::new(1).build(), 0, 1);
        let c = &pod.spec.unwrap().containers[0];
        assert_eq!(
            (c.command.clone().unwrap(), c.args.clone().unwrap()),
            (
                vec!["/usr/local/bin/radfm-trainer".to_string()],
                vec!["train".to_string()]
            )
        );
        let job = JobBuilder::new(1)
            .with(|j| {
                j.spec.workers.template = Some(radfm_api::trainingjob::PodOverrides {
                    command: Some(vec!["/opt/bin/trainer".into()]),
                    args: Some(vec!["train".into(), "--verbose".into()]),
                    ..Default::default()
                })
            })
            .build();
        let c = &worker_pod(&job, 0, 1).spec.unwrap().containers[0];
        assert_eq!(c.command.as_deref().unwrap(), ["/opt/bin/trainer"]);
        assert_eq!(c.args.as_deref().unwrap(), ["train", "--verbose"]);
    }

    #[test]
    fn worker_meets_the_restricted_pod_security_profile_and_sizes_its_shared_memory() {
        let job = JobBuilder::new(1)
            .with(|j| j.spec.workers.shm_size = Some(Quantity("2Gi".into())))
            .build();
        let spec = worker_pod(&job, 0, 1).spec.unwrap();
        let pod_sc = spec.security_context.unwrap();
        assert_eq!(pod_sc.run_as_non_root, Some(true));
        assert_eq!(pod_sc.seccomp_profile.unwrap().type_, "RuntimeDefault");
        let c_sc = spec.containers[0].security_context.clone().unwrap();
        assert_eq!(c_sc.allow_privilege_escalation, Some(false));
        assert_eq!(c_sc.capabilities.unwrap().drop.unwrap(), ["ALL"]);
        assert_eq!(c_sc.privileged, None);
        let shm = spec.volumes.unwrap().into_iter().find(|v| v.name == "dshm");
        let shm = shm.unwrap().empty_dir.unwrap();
        assert_eq!(
            (shm.medium.as_deref(), shm.size_limit),
            (Some("Memory"), Some(Quantity("2Gi".into())))
        );
    }

    #[test]
    fn only_the_gangs_own_pods_may_connect_to_its_workers() {
        let job = JobBuilder::new(2).build();
        let np = gang_network_policy(&job);
        let spec = np.spec.unwrap();
        let own = BTreeMap::from([(LABEL_JOB.to_string(), "mae".to_string())]);
        assert_eq!(spec.pod_selector.unwrap().match_labels.unwrap(), own);
        assert_eq!(spec.policy_types.unwrap(), ["Ingress"]);
        let rules = spec.ingress.unwrap();
        assert_eq!(rules.len(), 1);
        let from = rules[0].from.as_ref().unwrap();
        assert_eq!(from.len(), 1);
        assert_eq!(
            from[0]
                .pod_selector
                .as_ref()
                .unwrap()
                .match_labels
                .as_ref()
                .unwrap(),
            &own
        );
        assert!(from[0].namespace_selector.is_none(), "this namespace only");
        let worker_labels = worker_pod(&job, 1, 1).metadata.labels.unwrap();
        assert_eq!(worker_labels[LABEL_JOB], "mae");
    }

    #[test]
    fn every_worker_mounts_its_jobs_gang_secret_and_nothing_of_another_job() {
        let job = JobBuilder::new(2).build();
        let secret = gang_secret(&job, "ab".repeat(32));
        assert_eq!(secret.metadata.name.as_deref(), Some("mae-gang-uid-1"));
        assert_eq!(
            secret.metadata.owner_references.unwrap()[0].kind,
            "TrainingJob"
        );
        let pod = worker_pod(&job, 1, 2);
        let spec = pod.spec.unwrap();
        let volume = spec
            .volumes
            .unwrap()
            .into_iter()
            .find(|v| v.name == GANG_SECRET_VOLUME)
            .unwrap();
        assert_eq!(
            volume.secret.unwrap().secret_name.as_deref(),
            Some("mae-gang-uid-1")
        );
        let c = &spec.containers[0];
        let mount = c
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.name == GANG_SECRET_VOLUME)
            .unwrap();
        assert_eq!(
            (mount.mount_path.as_str(), mount.read_only),
            (GANG_SECRET_DIR, Some(true))
        );
        let file = c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .find(|e| e.name == env::GANG_SECRET_FILE)
            .unwrap();
        assert_eq!(file.value.as_deref(), Some("/var/run/radfm/gang/secret"));
    }

    #[test]
    fn rank_zero_gets_an_account_allowed_to_annotate_only_its_own_pod() {
        let job = JobBuilder::new(2).build();
        let pod = worker_pod(&job, 0, 3);
        assert_eq!(
            pod.spec.unwrap().service_account_name.as_deref(),
            Some("mae-trainer")
        );
        let other = worker_pod(&job, 1, 3).spec.unwrap();
        assert_eq!(other.service_account_name, None);
        assert_eq!(other.automount_service_account_token, Some(false));
        let access = trainer_access(&job, 3).unwrap();
        assert_eq!(
            access.service_account.metadata.name.as_deref(),
            Some("mae-trainer")
        );
        let rules = access.role.rules.unwrap();
        assert_eq!(rules.len(), 1);
        assert_eq!(rules[0].resources.as_deref().unwrap(), ["pods"]);
        assert_eq!(rules[0].verbs, ["patch"]);
        assert_eq!(rules[0].resource_names.as_deref().unwrap(), ["mae-w0-a3"]);
        let subject = &access.binding.subjects.unwrap()[0];
        assert_eq!(
            (subject.kind.as_str(), subject.name.as_str()),
            ("ServiceAccount", "mae-trainer")
        );
        assert_eq!(access.binding.role_ref.name, "mae-trainer");
        for owners in [
            access.role.metadata.owner_references,
            access.service_account.metadata.owner_references,
        ] {
            assert_eq!(owners.unwrap()[0].kind, "TrainingJob");
        }
    }

    #[test]
    fn a_job_that_brings_its_own_service_account_gets_no_access_objects() {
        let job = JobBuilder::new(1)
            .with(|j| {
                j.spec.workers.template = Some(radfm_api::trainingjob::PodOverrides {
                    service_account_name: Some("team-trainer".into()),
                    ..Default::default()
                })
            })
            .build();
        assert!(trainer_access(&job, 1).is_none());
    }

    #[test]
    fn headless_service_publishes_not_ready_addresses() {
        let svc = service(&JobBuilder::new(2).build());
        let spec = svc.spec.unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(spec.publish_not_ready_addresses, Some(true));
        assert_eq!(spec.selector.unwrap()[LABEL_JOB], "mae");
    }
}
