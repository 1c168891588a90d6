//! The controller finds agents in StoragePools: every `discovery_interval_secs` it lists
//! them, takes the agents with a fresh heartbeat ([`super::pools::discovered_agents`]) and
//! adds those it does not reach yet (or whose endpoint changed) to the [`Controller`]. A
//! statically configured agent of the same name wins. An agent listed once is never removed:
//! volumes stay routed to an agent that stopped heartbeating, and its pools turn unhealthy at
//! the next statistics refresh, as a static agent's would. One whose heartbeat stopped before
//! it was ever listed is dropped, since it would hold every create back.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams};
use tokio_util::sync::CancellationToken;

use super::crd::StoragePool;
use super::pools::discovered_agents;
use super::KubeError;
use crate::agent_rpc::client::GrpcAgent;
use crate::controller::Controller;
use crate::tls::ClientTls;
use crate::transport::Endpoint;

/// Where each agent the controller reaches listens (static and discovered), for the clients
/// that are not [`Controller`] calls (backups).
#[derive(Debug, Default)]
pub struct AgentDirectory {
    // Name → endpoint; locked only to read or replace an entry, never across `.await`.
    endpoints: RwLock<BTreeMap<String, Endpoint>>,
}

impl AgentDirectory {
    /// A directory of the static agents.
    pub fn new(static_agents: impl IntoIterator<Item = (String, Endpoint)>) -> Self {
        AgentDirectory {
            endpoints: RwLock::new(static_agents.into_iter().collect()),
        }
    }

    /// The endpoint of `agent`.
    pub fn endpoint(&self, agent: &str) -> Option<Endpoint> {
        self.endpoints
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(agent)
            .cloned()
    }

    /// Every agent in the directory.
    fn names(&self) -> Vec<String> {
        self.endpoints
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect()
    }

    fn remove(&self, agent: &str) {
        self.endpoints
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(agent);
    }

    fn set(&self, agent: &str, endpoint: Endpoint) {
        self.endpoints
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(agent.to_owned(), endpoint);
    }
}

/// The controller's discovery of agents.
#[derive(Debug)]
pub struct Discovery {
    /// The controller agents are added to.
    pub controller: Arc<Controller>,
    /// Endpoints of every agent.
    pub directory: Arc<AgentDirectory>,
    /// Names configured statically (never replaced by discovery).
    pub static_names: Vec<String>,
    /// TLS for `tcp://` agents.
    pub tls: Option<ClientTls>,
    /// Heartbeats older than this are ignored.
    pub stale_after: Duration,
}

impl Discovery {
    /// One pass: lists StoragePools and adds new agents. Returns the names added or changed.
    pub async fn once(&self, api: &Api<StoragePool>) -> Result<Vec<String>, KubeError> {
        let pools = api
            .list(&ListParams::default())
            .await
            .map_err(KubeError::api("list StoragePools"))?;
        let (agents, skipped) = discovered_agents(&pools.items, Timestamp::now(), self.stale_after);
        for (pool, why) in skipped {
            tracing::debug!(storagepool = %pool, reason = ?why, "StoragePool not used");
        }
        for name in self.directory.names() {
            if self.static_names.contains(&name) || agents.contains_key(&name) {
                continue;
            }
            if self.controller.forget_unlisted_agent(&name) {
                tracing::warn!(agent = %name, "discovered agent dropped: its heartbeat stopped before it was ever listed");
                self.directory.remove(&name);
            }
        }
        let mut changed = Vec::new();
        for (name, endpoint) in agents {
            if self.static_names.contains(&name) {
                continue;
            }
            if self.directory.endpoint(&name).as_ref() == Some(&endpoint) {
                continue;
            }
            match GrpcAgent::connect(&name, &endpoint, self.tls.as_ref()).await {
                Ok(agent) => {
                    tracing::info!(agent = %name, %endpoint, "agent discovered from its StoragePools");
                    self.controller.add_agent(Arc::new(agent));
                    self.directory.set(&name, endpoint);
                    changed.push(name);
                }
                Err(e) => {
                    tracing::warn!(agent = %name, %endpoint, error = %e, "discovered agent unusable");
                }
            }
        }
        if !changed.is_empty() {
            // List the new agents at once rather than at the next statistics refresh.
            self.controller.refresh_pools().await;
        }
        Ok(changed)
    }

    /// Passes until `shutdown`: at once, then every `interval`.
    pub async fn run(self, client: kube::Client, interval: Duration, shutdown: CancellationToken) {
        let api: Api<StoragePool> = Api::all(client);
        loop {
            if let Err(e) = self.once(&api).await {
                tracing::warn!(error = %crate::logging::error_chain(&e), "agent discovery failed");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }
}
