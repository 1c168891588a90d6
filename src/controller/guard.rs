//! Per-object operation guard: a second concurrent operation on the same volume (and so the
//! same CSI name, since ids derive from names) or snapshot is refused at once with ABORTED
//! instead of queueing behind the first, as CSI recommends.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use super::ControllerError;
use crate::agent::{SnapshotId, VolumeId};

/// The guard key of a volume.
pub fn volume_key(id: &VolumeId) -> String {
    format!("volume:{id}")
}

/// The guard key of a snapshot.
pub fn snapshot_key(id: &SnapshotId) -> String {
    format!("snapshot:{id}")
}

/// The set of keys with an operation in progress.
#[derive(Clone, Debug, Default)]
pub struct Guards {
    // Protects the set of busy keys; held only to insert or remove, never across `.await`.
    busy: Arc<Mutex<HashSet<String>>>,
}

/// Held for the duration of one operation; releases the key when dropped.
#[derive(Debug)]
pub struct Guard {
    busy: Arc<Mutex<HashSet<String>>>,
    key: String,
}

impl Guards {
    /// Claims `key`, or fails with [`ControllerError::Busy`] when it is already claimed.
    pub fn try_lock(&self, key: String) -> Result<Guard, ControllerError> {
        let mut set = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if !set.insert(key.clone()) {
            return Err(ControllerError::Busy(key));
        }
        Ok(Guard {
            busy: self.busy.clone(),
            key,
        })
    }

    /// True when `key` is claimed.
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
    fn second_claim_is_busy_until_drop() {
        let g = Guards::default();
        let first = g.try_lock("volume:a".into());
        assert_eq!(
            first.as_ref().map(|_| ()).map_err(|e| e.to_string()),
            Ok(())
        );
        assert_eq!(
            g.try_lock("volume:a".into())
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Err("an operation on volume:a is already in progress".to_string())
        );
        assert_eq!(
            [g.is_busy("volume:a"), g.is_busy("volume:b")],
            [true, false]
        );
        drop(first);
        assert_eq!([g.is_busy("volume:a")], [false]);
        assert_eq!(
            g.try_lock("volume:a".into())
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Ok(())
        );
    }
}
