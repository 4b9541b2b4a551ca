//! Plays the kubelet for pods on kwok's simulated nodes (which run no containers): runs a
//! radfm pod's container as a local process of the workspace's binaries, with the environment
//! and Secret volumes the pod declares, then reports its exit on the pod as a kubelet would.
//! The pods' specs are used as the operator wrote them; only where they run is simulated.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;

use anyhow::{Context as _, Result};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::ResourceExt;
use kube::api::Api;

use crate::Cluster;

/// The environment a pod's first container gets: its Secrets' keys (`envFrom`, with their
/// prefixes) and its literal variables; variables from the downward API are left out.
async fn environment(cluster: &Cluster, pod: &Pod) -> Result<BTreeMap<String, String>> {
    let ns = pod.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(cluster.client.clone(), &ns);
    let c = &pod.spec.as_ref().context("pod without spec")?.containers[0];
    let mut env = BTreeMap::new();
    for from in c.env_from.iter().flatten() {
        let Some(r) = &from.secret_ref else { continue };
        let s = secrets.get(&r.name).await?;
        let prefix = from.prefix.clone().unwrap_or_default();
        for (k, v) in s.data.unwrap_or_default() {
            env.insert(format!("{prefix}{k}"), String::from_utf8(v.0)?);
        }
    }
    for e in c.env.iter().flatten() {
        if let Some(v) = &e.value {
            env.insert(e.name.clone(), v.clone());
        }
    }
    Ok(env)
}

/// Writes each Secret volume the container mounts under `dir`; returns (mount path, folder).
async fn mount_secrets(cluster: &Cluster, pod: &Pod, dir: &Path) -> Result<Vec<(String, String)>> {
    let ns = pod.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(cluster.client.clone(), &ns);
    let spec = pod.spec.as_ref().context("pod without spec")?;
    let mut mounts = Vec::new();
    for m in spec.containers[0].volume_mounts.iter().flatten() {
        let volume = spec.volumes.iter().flatten().find(|v| v.name == m.name);
        let Some(name) = volume.and_then(|v| v.secret.as_ref()?.secret_name.clone()) else {
            continue;
        };
        let folder = dir.join(pod.name_any()).join(&m.name);
        std::fs::create_dir_all(&folder)?;
        for (k, v) in secrets.get(&name).await?.data.unwrap_or_default() {
            std::fs::write(folder.join(k), v.0)?;
        }
        mounts.push((m.mount_path.clone(), folder.display().to_string()));
    }
    Ok(mounts)
}

/// Runs `pod`'s first container as a local process (its command's file name is a workspace
/// binary), with `overrides` on top of its environment and its Secret volumes under `dir`, then
/// ends the pod with the process's exit code and last error line.
pub async fn play(
    cluster: &Cluster,
    pod: &Pod,
    dir: &Path,
    overrides: &[(&str, &str)],
) -> Result<Output> {
    let c = &pod.spec.as_ref().context("pod without spec")?.containers[0];
    let mounts = mount_secrets(cluster, pod, dir).await?;
    let local = |text: &str| {
        mounts
            .iter()
            .fold(text.to_string(), |t, (from, to)| t.replace(from, to))
    };
    let mut env = environment(cluster, pod).await?;
    for v in env.values_mut() {
        *v = local(v);
    }
    for (k, v) in overrides {
        env.insert(k.to_string(), v.to_string());
    }
    let command = c.command.clone().unwrap_or_default();
    let program = command.first().context("pod without command")?;
    let bin = crate::workspace_bin(program.rsplit('/').next().unwrap_or(program))?;
    let args: Vec<String> = command[1..]
        .iter()
        .chain(c.args.iter().flatten())
        .map(|a| local(a))
        .collect();
    let out = std::process::Command::new(bin)
        .args(&args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RADFM_THREADS", "2")
        .envs(&env)
        .output()?;
    let code = out.status.code().unwrap_or(1);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().rev().find(|l| !l.trim().is_empty());
    let (reason, message) = match code {
        0 => ("Completed", None),
        _ => ("Error", last),
    };
    cluster
        .end_pod_with_message(
            &pod.namespace().unwrap_or_default(),
            &pod.name_any(),
            code,
            reason,
            message,
        )
        .await?;
    Ok(out)
}
