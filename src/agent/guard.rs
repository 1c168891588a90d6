//! Per-object operation guard: a second concurrent operation on the same volume or snapshot
//! is refused at once (ABORTED on the wire) instead of queueing behind the first.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use super::AgentError;

/// The set of ids with an operation in progress.
#[derive(Clone, Debug, Default)]
pub struct Guards {
    // Protects the set of busy ids; held only to insert or remove, never across `.await`.
    busy: Arc<Mutex<HashSet<String>>>,
}

/// Held for the duration of one operation; releases the id when dropped.
#[derive(Debug)]
pub struct Guard {
    busy: Arc<Mutex<HashSet<String>>>,
    key: String,
}

impl Guards {
    /// Claims `key`, or fails with [`AgentError::Busy`] when it is already claimed.
    pub fn try_lock(&self, key: &str) -> Result<Guard, AgentError> {
        let mut set = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if !set.insert(key.to_owned()) {
            return Err(AgentError::Busy(key.to_owned()));
        }
        Ok(Guard {
            busy: self.busy.clone(),
            key: key.to_owned(),
        })
    }

    /// True when `key` is claimed (for status reporting).
    pub fn is_busy(&self, key: &str) -> bool {
        self.busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(key)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_busy_until_drop() {
        let g = Guards::default();
        let first = g.try_lock("v1").unwrap();
        assert!(matches!(g.try_lock("v1"), Err(AgentError::Busy(k)) if k == "v1"));
        let other = g.try_lock("v2").unwrap();
        drop(first);
        assert!(!g.is_busy("v1"));
        let _again = g.try_lock("v1").unwrap();
        drop(other);
    }
}
