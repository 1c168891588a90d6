//! Snapshots: create (idempotent by name), delete, get, list.

use std::collections::BTreeMap;

use super::guard::{snapshot_key, Operation};
use super::{
    check_snapshot_parameters, meta, paginate, Controller, ControllerError, Page, SnapshotEntry,
    SnapshotView,
};
use crate::agent::{SnapshotId, VolumeId};

impl Controller {
    /// CreateSnapshot: the same name and source returns the same snapshot; the same name with
    /// another source is ALREADY_EXISTS.
    pub async fn create_snapshot(
        &self,
        name: &str,
        raw_source: &str,
        parameters: &BTreeMap<String, String>,
    ) -> Result<SnapshotView, ControllerError> {
        check_snapshot_parameters(parameters)?;
        let id = super::snapshot_id_for(name);
        let _guard = self.guards.try_lock(snapshot_key(&id), Operation::Create)?;
        if let Some(existing) = self.lookup_snapshot(&id).await? {
            if existing.info.source_volume.as_str() == raw_source {
                return Ok(self.snapshot_view(&existing));
            }
            return Err(ControllerError::AlreadyExists {
                what: "snapshot",
                name: name.to_owned(),
                reason: format!(
                    "it is a snapshot of {}, not of {raw_source}",
                    existing.info.source_volume
                ),
            });
        }
        let not_found = || ControllerError::VolumeNotFound(raw_source.to_owned());
        let source = VolumeId::parse(raw_source).map_err(|_| not_found())?;
        let volume = self.lookup_volume(&source).await?.ok_or_else(not_found)?;
        let metadata = BTreeMap::from([(meta::NAME.to_owned(), name.to_owned())]);
        let info = self
            .agent(&volume.agent)?
            .create_snapshot(&id, &source, metadata)
            .await
            .map_err(ControllerError::agent(&volume.agent, "CreateSnapshot"))?;
        let entry = SnapshotEntry {
            agent: volume.agent.clone(),
            info,
        };
        {
            let mut st = self.state();
            st.snapshots.insert(id.clone(), entry.clone());
            if let Some(v) = st.volumes.get_mut(&source) {
                v.info.snapshot_count = v.info.snapshot_count.saturating_add(1);
            }
        }
        tracing::info!(snapshot = %id, name, volume = %source, "snapshot created");
        Ok(self.snapshot_view(&entry))
    }

    /// DeleteSnapshot: an unknown snapshot is already deleted.
    pub async fn delete_snapshot(&self, raw_id: &str) -> Result<(), ControllerError> {
        let Ok(id) = SnapshotId::parse(raw_id) else {
            return Ok(());
        };
        let _guard = self.guards.try_lock(snapshot_key(&id), Operation::Delete)?;
        let Some(entry) = self.lookup_snapshot(&id).await? else {
            return Ok(());
        };
        self.agent(&entry.agent)?
            .delete_snapshot(&id)
            .await
            .map_err(ControllerError::agent(&entry.agent, "DeleteSnapshot"))?;
        let mut st = self.state();
        st.snapshots.remove(&id);
        if let Some(v) = st.volumes.get_mut(&entry.info.source_volume) {
            v.info.snapshot_count = v.info.snapshot_count.saturating_sub(1);
        }
        tracing::info!(snapshot = %id, "snapshot deleted");
        Ok(())
    }

    /// GetSnapshot.
    pub async fn get_snapshot(&self, raw_id: &str) -> Result<SnapshotView, ControllerError> {
        let not_found = || ControllerError::SnapshotNotFound(raw_id.to_owned());
        let id = SnapshotId::parse(raw_id).map_err(|_| not_found())?;
        let entry = self.lookup_snapshot(&id).await?.ok_or_else(not_found)?;
        Ok(self.snapshot_view(&entry))
    }

    /// ListSnapshots, filtered by snapshot id and/or source volume id (an unknown one gives an
    /// empty list), in id order, paged by offset tokens.
    pub async fn list_snapshots(
        &self,
        snapshot_id: &str,
        source_volume_id: &str,
        max_entries: usize,
        token: &str,
    ) -> Result<Page<SnapshotView>, ControllerError> {
        if let Err(e) = self.ensure_index_complete().await {
            tracing::warn!(error = %e, "listing snapshots of the agents that answer");
        }
        let views: Vec<SnapshotView> = self
            .state()
            .snapshots
            .values()
            .filter(|e| snapshot_id.is_empty() || e.info.id.as_str() == snapshot_id)
            .filter(|e| {
                source_volume_id.is_empty() || e.info.source_volume.as_str() == source_volume_id
            })
            .map(|e| self.snapshot_view(e))
            .collect();
        paginate(views, max_entries, token)
    }
}
