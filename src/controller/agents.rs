//! The agents the controller reaches: the static ones from its configuration and those
//! discovered later (Kubernetes StoragePools). Readers take a snapshot, so an agent added
//! during an operation is seen by the next one.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};

use crate::agent_rpc::client::StorageAgent;

/// A snapshot of the agents by name.
pub type AgentMap = BTreeMap<String, Arc<dyn StorageAgent>>;

/// The controller's agents.
#[derive(Debug, Default)]
pub struct AgentSet {
    // The current map, replaced whole on each change (copy on write); the lock is held only
    // to clone or swap the `Arc`, never across an `.await`.
    current: RwLock<Arc<AgentMap>>,
}

impl AgentSet {
    /// A set of `agents`.
    pub fn new(agents: Vec<Arc<dyn StorageAgent>>) -> Self {
        let map = agents
            .into_iter()
            .map(|a| (a.name().to_owned(), a))
            .collect();
        AgentSet {
            current: RwLock::new(Arc::new(map)),
        }
    }

    /// The agents now.
    pub fn snapshot(&self) -> Arc<AgentMap> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The agent called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<dyn StorageAgent>> {
        self.snapshot().get(name).cloned()
    }

    /// Adds `agent`, or replaces the agent of the same name (a new endpoint).
    pub fn insert(&self, agent: Arc<dyn StorageAgent>) {
        let mut cur = self.current.write().unwrap_or_else(PoisonError::into_inner);
        let mut map = AgentMap::clone(&cur);
        map.insert(agent.name().to_owned(), agent);
        *cur = Arc::new(map);
    }

    /// Removes the agent called `name`; whether it was there.
    pub fn remove(&self, name: &str) -> bool {
        let mut cur = self.current.write().unwrap_or_else(PoisonError::into_inner);
        if !cur.contains_key(name) {
            return false;
        }
        let mut map = AgentMap::clone(&cur);
        map.remove(name);
        *cur = Arc::new(map);
        true
    }
}
