//! Per-object operation guard: a second concurrent operation on the same volume (and so the
//! same CSI name, since ids derive from names) or snapshot is refused at once with ABORTED
//! instead of queueing behind the first, as CSI recommends. Each claim records which
//! operation holds it, so the operator API can show Cinder's transient statuses (`deleting`,
//! `extending`, `attaching`, ...) for work in flight.

use std::collections::HashMap;
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

/// What a claimed key is busy with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Operation {
    /// CreateVolume / CreateSnapshot (including a cross-agent copy).
    Create,
    /// DeleteVolume / DeleteSnapshot.
    Delete,
    /// ControllerExpandVolume.
    Extend,
    /// ControllerPublishVolume.
    Publish,
    /// ControllerUnpublishVolume.
    Unpublish,
    /// ControllerModifyVolume (retag in place or migration).
    Retype,
}

type Busy = Arc<Mutex<HashMap<String, Operation>>>;

/// The keys with an operation in progress, and which operation.
#[derive(Clone, Debug, Default)]
pub struct Guards {
    // Protects the map of busy keys; held only to insert, remove or read, never across
    // `.await`.
    busy: Busy,
}

/// Held for the duration of one operation; releases the key when dropped.
#[derive(Debug)]
pub struct Guard {
    busy: Busy,
    key: String,
}

impl Guards {
    /// Claims `key` for `op`, or fails with [`ControllerError::Busy`] when it is already
    /// claimed.
    pub fn try_lock(&self, key: String, op: Operation) -> Result<Guard, ControllerError> {
        let mut map = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if map.contains_key(&key) {
            return Err(ControllerError::Busy(key));
        }
        map.insert(key.clone(), op);
        Ok(Guard {
            busy: self.busy.clone(),
            key,
        })
    }

    /// True when `key` is claimed.
    pub fn is_busy(&self, key: &str) -> bool {
        self.operation(key).is_some()
    }

    /// The operation holding `key`, if any.
    pub fn operation(&self, key: &str) -> Option<Operation> {
        self.busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .copied()
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
        let first = g.try_lock("volume:a".into(), Operation::Extend);
        assert_eq!(
            first.as_ref().map(|_| ()).map_err(|e| e.to_string()),
            Ok(())
        );
        assert_eq!(
            g.try_lock("volume:a".into(), Operation::Delete)
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Err("an operation on volume:a is already in progress".to_string())
        );
        assert_eq!(
            [g.is_busy("volume:a"), g.is_busy("volume:b")],
            [true, false]
        );
        assert_eq!(
            [g.operation("volume:a"), g.operation("volume:b")],
            [Some(Operation::Extend), None]
        );
        drop(first);
        assert_eq!([g.is_busy("volume:a")], [false]);
        assert_eq!(
            g.try_lock("volume:a".into(), Operation::Delete)
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Ok(())
        );
    }
}
