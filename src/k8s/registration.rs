//! The agent registers each of its pools as a StoragePool and heartbeats it: every
//! `heartbeat_interval_secs` it applies the object (spec, agent label) and its status with
//! server-side apply under its own field manager, so a write never undoes another writer's
//! fields and no read-modify-write race exists. StoragePools labelled with this agent whose
//! pool is no longer configured are deleted.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::Resource;
use tokio_util::sync::CancellationToken;

use super::crd::StoragePool;
use super::pools::{object_name, pool_spec, pool_status, AGENT_LABEL};
use super::{KubeError, FIELD_MANAGER};
use crate::agent::service::AgentService;
use crate::transport::Endpoint;

/// What the agent registers.
#[derive(Clone, Debug)]
pub struct Registration {
    /// The agent's name.
    pub agent: String,
    /// The endpoint the controller dials.
    pub endpoint: Endpoint,
    /// The node the agent runs on.
    pub node_name: Option<String>,
    /// Time between heartbeats.
    pub interval: Duration,
}

/// The field manager of an agent's writes (one per agent, so two agents never fight).
fn manager(agent: &str) -> String {
    format!("{FIELD_MANAGER}-agent-{agent}")
}

/// One heartbeat: applies every pool's StoragePool and status, deletes the pools of this
/// agent that are gone. Returns how many pools were written.
pub async fn heartbeat(
    api: &Api<StoragePool>,
    agent: &AgentService,
    reg: &Registration,
) -> Result<usize, KubeError> {
    let params = PatchParams::apply(&manager(&reg.agent)).force();
    let reports = agent.pools().await;
    let now = Timestamp::now();
    let mut names = BTreeSet::new();
    for report in &reports {
        let name = object_name(&reg.agent, &report.cfg.name);
        let spec = pool_spec(&reg.agent, &reg.endpoint, reg.node_name.as_deref(), report);
        let object = serde_json::json!({
            "apiVersion": StoragePool::api_version(&()),
            "kind": StoragePool::kind(&()),
            "metadata": { "name": name, "labels": { AGENT_LABEL: reg.agent } },
            "spec": spec,
        });
        api.patch(&name, &params, &Patch::Apply(&object))
            .await
            .map_err(KubeError::api(format!("apply StoragePool {name}")))?;
        let status = serde_json::json!({
            "apiVersion": StoragePool::api_version(&()),
            "kind": StoragePool::kind(&()),
            "status": pool_status(report, now),
        });
        api.patch_status(&name, &params, &Patch::Apply(&status))
            .await
            .map_err(KubeError::api(format!("apply StoragePool {name} status")))?;
        names.insert(name);
    }
    let mine = api
        .list(&ListParams::default().labels(&format!("{AGENT_LABEL}={}", reg.agent)))
        .await
        .map_err(KubeError::api("list this agent's StoragePools"))?;
    for old in mine.items {
        let Some(name) = old.metadata.name else {
            continue;
        };
        if !names.contains(&name) {
            tracing::info!(storagepool = %name, "pool no longer configured: StoragePool deleted");
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) | Err(kube::Error::Api(_)) => {}
                Err(e) => return Err(KubeError::api(format!("delete StoragePool {name}"))(e)),
            }
        }
    }
    Ok(reports.len())
}

/// Heartbeats until `shutdown`: at once, then every `reg.interval`. Failures are logged
/// and retried at the next beat (the controller ignores pools whose heartbeat is stale).
pub async fn run(
    client: kube::Client,
    agent: Arc<AgentService>,
    reg: Registration,
    shutdown: CancellationToken,
) {
    let api: Api<StoragePool> = Api::all(client);
    let mut failing = false;
    loop {
        match heartbeat(&api, &agent, &reg).await {
            Ok(n) => {
                if failing {
                    tracing::info!(pools = n, "StoragePool heartbeats resumed");
                }
                failing = false;
                tracing::debug!(pools = n, "StoragePools heartbeated");
            }
            Err(e) => {
                failing = true;
                tracing::warn!(error = %crate::logging::error_chain(&e), "StoragePool heartbeat failed");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(reg.interval) => {}
        }
    }
}
