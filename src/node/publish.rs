//! NodePublishVolume and NodeUnpublishVolume: bind mounts from the staging path into the
//! workload's path.

use std::path::Path;

use super::model::{mode_is_read_only, Access, PublishRequest};
use super::view::{same_device, Backing, Staged};
use super::{Node, NodeError};
use crate::agent::ids::target_iqn;
use crate::agent::VolumeId;
use crate::controller::AccessMode;

/// Most mounts stacked on one target path that NodeUnpublishVolume takes off.
const MAX_STACKED: usize = 8;

impl Node {
    /// Publishes a staged volume at the target path: a bind of the staging directory (file
    /// system), or of the staged device node onto a file (block); read-only when asked.
    /// Publishing again the same way is OK; the path holding something else, or the volume
    /// read-only where read-write is asked, is [`NodeError::Incompatible`].
    pub async fn publish(&self, req: PublishRequest) -> Result<(), NodeError> {
        let _guard = self.guards.try_lock(req.volume.as_str())?;
        if req.staging_path.as_os_str().is_empty() {
            return Err(NodeError::NotStaged(
                "staging_target_path is required (the node stages volumes)".into(),
            ));
        }
        let readonly = req.readonly || mode_is_read_only(req.mode);
        let target = target_iqn(&req.volume);
        let view = self.view().await?;
        let staging = req.staging_path.display();
        let staged = match (view.staged(&req.staging_path), &req.access) {
            (Staged::Filesystem(m), Access::Mount { .. }) | (Staged::Block(m), Access::Block) => m,
            (Staged::Nothing, _) => {
                return Err(NodeError::NotStaged(format!(
                    "volume {} is not staged at {staging}",
                    req.volume
                )))
            }
            (Staged::Filesystem(_), Access::Block) | (Staged::Block(_), Access::Mount { .. }) => {
                return Err(NodeError::NotStaged(format!(
                    "volume {} is staged at {staging} for another access type than {}",
                    req.volume,
                    req.access.kind()
                )))
            }
        };
        if view.target_of(staged).is_none_or(|t| t.target != target) {
            return Err(NodeError::NotStaged(format!(
                "{staging} holds another volume than {}",
                req.volume
            )));
        }
        if matches!(view.backing(staged), Backing::Gone) {
            return Err(NodeError::NotStaged(format!(
                "the disk of volume {} is gone; stage it again",
                req.volume
            )));
        }
        let to = req.target_path.display();
        if let Some(existing) = view.mount_at(&req.target_path) {
            if !same_device(existing, staged) {
                return Err(NodeError::Incompatible(format!(
                    "{to} holds another mount ({} from {})",
                    existing.fs_type, existing.source
                )));
            }
            return match (existing.read_only(), readonly) {
                (ro, want) if ro == want => Ok(()),
                // A publish cut short between its bind and its remount: finish it.
                (false, true) => {
                    self.mounter.remount_readonly(&req.target_path).await?;
                    Ok(())
                }
                _ => Err(NodeError::Incompatible(format!(
                    "volume {} is published read-only at {to}; read-write was asked",
                    req.volume
                ))),
            };
        }
        if req.mode == AccessMode::SingleNodeSingleWriter {
            let others: Vec<String> = view
                .same_device(staged)
                .filter(|m| m.mount_point != staged.mount_point)
                .map(|m| m.mount_point.display().to_string())
                .collect();
            if !others.is_empty() {
                return Err(NodeError::ExceedsCapabilities(format!(
                    "volume {} is SINGLE_NODE_SINGLE_WRITER and already published at {others:?}",
                    req.volume
                )));
            }
        }
        match req.access {
            Access::Block => self.mounter.make_file(&req.target_path).await?,
            Access::Mount { .. } => self.mounter.make_dir(&req.target_path).await?,
        }
        self.mounter
            .bind(&staged.mount_point, &req.target_path)
            .await?;
        if readonly {
            self.mounter.remount_readonly(&req.target_path).await?;
        }
        tracing::info!(volume = %req.volume, path = %to, readonly, "published");
        Ok(())
    }

    /// Unpublishes: takes every mount off the target path and removes the path. Nothing there
    /// is OK.
    pub async fn unpublish(&self, volume: &VolumeId, target_path: &Path) -> Result<(), NodeError> {
        let _guard = self.guards.try_lock(volume.as_str())?;
        for _ in 0..MAX_STACKED {
            let mounts = self.mounter.mounts().await?;
            if !mounts.iter().any(|m| m.mount_point == target_path) {
                self.mounter.remove(target_path).await?;
                tracing::info!(%volume, path = %target_path.display(), "unpublished");
                return Ok(());
            }
            self.mounter.unmount(target_path).await?;
        }
        Err(NodeError::Internal(format!(
            "{} is still mounted after {MAX_STACKED} unmounts",
            target_path.display()
        )))
    }
}
