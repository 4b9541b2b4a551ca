//! The API calls every controller shares: watching in one namespace or all, listing its
//! children, treating "already there" as success, and the two writes a pass ends with: the
//! status, by server-side apply with the operator's fixed field manager (skipped when
//! unchanged), then the events a plan asked for.

use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use tracing::warn;

use crate::Result;
use crate::context::FIELD_MANAGER;

/// Normal or Warning, as Kubernetes events are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// Something expected happened.
    Normal,
    /// Something a person may need to look at.
    Warning,
}

/// An event a plan asks for, recorded after the status is written.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedEvent {
    /// Normal or Warning.
    pub severity: Severity,
    /// CamelCase reason.
    pub reason: &'static str,
    /// Human-readable note.
    pub note: String,
}

impl PlannedEvent {
    /// A Normal event.
    pub fn normal(reason: &'static str, note: impl Into<String>) -> Self {
        PlannedEvent {
            severity: Severity::Normal,
            reason,
            note: note.into(),
        }
    }

    /// A Warning event.
    pub fn warning(reason: &'static str, note: impl Into<String>) -> Self {
        PlannedEvent {
            severity: Severity::Warning,
            reason,
            note: note.into(),
        }
    }
}

/// Create parameters of every object the operator makes (its field manager).
pub fn post_params() -> kube::api::PostParams {
    kube::api::PostParams {
        field_manager: Some(crate::context::FIELD_MANAGER.into()),
        ..Default::default()
    }
}

/// Deletes the pods a plan names (a failed delete is logged and retried by the next pass) and
/// creates the one it wants (one that exists already counts as created).
pub async fn apply_pod_plan(
    pods: &Api<k8s_openapi::api::core::v1::Pod>,
    delete: &[String],
    create: Option<&k8s_openapi::api::core::v1::Pod>,
) -> Result<()> {
    for name in delete {
        if let Err(e) = pods
            .delete(name, &kube::api::DeleteParams::background())
            .await
        {
            tracing::warn!(pod = %name, error = %e, "deleting a pod");
        }
    }
    if let Some(pod) = create {
        tolerate(pods.create(&post_params(), pod).await, 409)?;
        tracing::info!(pod = %pod.name_any(), "pod created");
    }
    Ok(())
}

/// Treats one API status code as success: AlreadyExists (409) on create and NotFound (404) on
/// delete mean the plan's effect is already there.
pub fn tolerate<T>(
    r: std::result::Result<T, kube::Error>,
    code: u16,
) -> std::result::Result<(), kube::Error> {
    match r {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == code => Ok(()),
        Err(e) => Err(e),
    }
}

/// The API of `K` in one namespace, or in all of them (the operator's `--namespace`).
pub fn scoped<K>(client: &kube::Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// The objects with label selector `labels` whose controller owner has uid `owner_uid`.
pub async fn list_owned<K>(api: &Api<K>, labels: &str, owner_uid: &str) -> Result<Vec<K>>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let lp = kube::api::ListParams::default().labels(labels);
    Ok(api
        .list(&lp)
        .await?
        .items
        .into_iter()
        .filter(|o| controlled_by(o, owner_uid))
        .collect())
}

/// Whether `obj`'s controller owner has uid `owner_uid`.
pub fn controlled_by<K: Resource>(obj: &K, owner_uid: &str) -> bool {
    obj.owner_references()
        .iter()
        .any(|r| r.controller == Some(true) && r.uid == owner_uid)
}

/// Writes `status` of `obj` by server-side apply unless it equals `current`.
pub async fn apply_status<K, S>(
    api: &Api<K>,
    obj: &K,
    current: Option<&S>,
    status: &S,
) -> Result<()>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    S: Serialize + PartialEq,
{
    if current == Some(status) {
        return Ok(());
    }
    let body = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(
        &obj.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(())
}

/// Records `events` about `obj`; a failure to record is logged, not returned.
pub async fn publish<K>(recorder: &Recorder, obj: &K, action: &str, events: &[PlannedEvent])
where
    K: Resource<DynamicType = ()>,
{
    let reference = obj.object_ref(&());
    for e in events {
        let ev = Event {
            type_: match e.severity {
                Severity::Normal => EventType::Normal,
                Severity::Warning => EventType::Warning,
            },
            reason: e.reason.to_string(),
            note: Some(e.note.chars().take(1000).collect()),
            action: action.into(),
            secondary: None,
        };
        if let Err(err) = recorder.publish(&ev, &reference).await {
            warn!(error = %err, reason = e.reason, "could not record event");
        }
    }
}
