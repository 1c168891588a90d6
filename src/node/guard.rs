//! Concurrency of the node service: a per-volume guard that refuses a second concurrent call
//! on the same volume (ABORTED, as CSI recommends), and per-target locks that serialise the
//! session-level steps (login → disk → mount; in-use check → logout) of calls that share a
//! target.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use super::NodeError;

/// The set of volumes with an operation in progress.
#[derive(Clone, Debug, Default)]
pub struct Guards {
    // Protects the set of busy volume ids; held only to insert or remove, never across
    // `.await`.
    busy: Arc<Mutex<HashSet<String>>>,
}

/// Held for the duration of one operation; releases the volume when dropped.
#[derive(Debug)]
pub struct Guard {
    busy: Arc<Mutex<HashSet<String>>>,
    key: String,
}

impl Guards {
    /// Claims `volume`, or fails with [`NodeError::Busy`].
    pub fn try_lock(&self, volume: &str) -> Result<Guard, NodeError> {
        let mut set = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if !set.insert(volume.to_owned()) {
            return Err(NodeError::Busy(volume.to_owned()));
        }
        Ok(Guard {
            busy: self.busy.clone(),
            key: volume.to_owned(),
        })
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

/// One async lock per target name, made on first use.
#[derive(Clone, Debug, Default)]
pub struct TargetLocks {
    // Protects the map from target name to its lock; held only to look up or insert, never
    // across `.await`. The per-target locks themselves are tokio mutexes held across the
    // session-level steps.
    locks: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

impl TargetLocks {
    /// Waits for and takes the lock of `target`.
    pub async fn lock(&self, target: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut map = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(target.to_owned()).or_default().clone()
        };
        lock.lock_owned().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_claim_is_busy_until_drop() {
        let g = Guards::default();
        let first = g.try_lock("v1").unwrap();
        assert!(matches!(g.try_lock("v1"), Err(NodeError::Busy(v)) if v == "v1"));
        let other = g.try_lock("v2").unwrap();
        drop(first);
        let again = g.try_lock("v1");
        assert_eq!(again.map(|_| ()).map_err(|e| e.to_string()), Ok(()));
        drop(other);
    }

    #[tokio::test]
    async fn target_locks_serialise_per_target() {
        let l = TargetLocks::default();
        let a = l.lock("t1").await;
        // Another target is free.
        let _b = l.lock("t2").await;
        let l2 = l.clone();
        let waiter = tokio::spawn(async move {
            let _g = l2.lock("t1").await;
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "t1 is held");
        drop(a);
        waiter.await.unwrap();
    }
}
