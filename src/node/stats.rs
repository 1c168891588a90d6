//! NodeGetVolumeStats and NodeExpandVolume.

use std::path::Path;

use tokio::time::Instant;

use super::model::{ExpandRequest, Usage, VolumeStats};
use super::mounter::FsState;
use super::mountinfo::MountEntry;
use super::view::{Backing, View};
use super::{MountError, Node, NodeError};
use crate::agent::ids::target_iqn;
use crate::agent::VolumeId;
use crate::types::Bytes;

impl Node {
    /// The mount of `volume` at `path`, or NOT_FOUND.
    fn volume_mount<'a>(
        &self,
        view: &'a View,
        volume: &VolumeId,
        path: &Path,
        exists: bool,
    ) -> Result<&'a MountEntry, NodeError> {
        let shown = path.display();
        let Some(m) = view.mount_at(path) else {
            return Err(NodeError::NotFound(if exists {
                format!("volume {volume} is not mounted at {shown}")
            } else {
                format!("{shown} does not exist")
            }));
        };
        let target = target_iqn(volume);
        match view.target_of(m) {
            Some(t) if t.target == target => Ok(m),
            Some(t) => Err(NodeError::NotFound(format!(
                "{shown} holds {}, not volume {volume}",
                t.target
            ))),
            // A disk that is gone and a bind that names no target: the path is a mount of
            // ours only if it shares its device with one that names the volume.
            None => view
                .same_device(m)
                .find_map(|o| view.target_of(o).filter(|t| t.target == target))
                .map(|_| m)
                .ok_or_else(|| {
                    NodeError::NotFound(format!("{shown} holds no volume of this node"))
                }),
        }
    }

    /// Usage and condition of a volume at a staged or published path. Abnormal when its
    /// session is not logged in, its disk is gone, or the kernel made its file system
    /// read-only.
    pub async fn stats(&self, volume: &VolumeId, path: &Path) -> Result<VolumeStats, NodeError> {
        let view = self.view().await?;
        let exists = self.mounter.exists(path).await?;
        let m = self.volume_mount(&view, volume, path, exists)?;
        let backing = view.backing(m);
        let mut abnormal = match backing {
            Backing::Disk(s, d) if !s.logged_in() => Some(format!(
                "session {} to {} through {} is {} (disk {})",
                s.sid, s.target, s.portal, s.state, d.name
            )),
            Backing::Disk(..) => None,
            Backing::Gone => Some("the volume's disk is gone (its session was logged out)".into()),
            Backing::Foreign => Some(format!("{} is not on an iSCSI disk", path.display())),
        };
        if m.device_node().is_some() {
            let total = match backing {
                Backing::Disk(..) => self.mounter.device_size(path).await?.get(),
                Backing::Gone | Backing::Foreign => 0,
            };
            return Ok(VolumeStats {
                bytes: Usage {
                    total,
                    available: 0,
                    used: 0,
                },
                inodes: None,
                abnormal,
            });
        }
        if abnormal.is_none() && m.forced_read_only() {
            abnormal = Some(format!(
                "the kernel made the {} file system read-only (errors found)",
                m.fs_type
            ));
        }
        let st = self.mounter.fs_stats(path).await?;
        Ok(VolumeStats {
            bytes: Usage {
                total: st.total_bytes,
                available: st.available_bytes,
                used: st.total_bytes.saturating_sub(st.free_bytes),
            },
            inodes: Some(Usage {
                total: st.total_inodes,
                available: st.free_inodes,
                used: st.total_inodes.saturating_sub(st.free_inodes),
            }),
            abnormal,
        })
    }

    /// Grows a volume on this node after the controller grew it: rescan the session until the
    /// disk shows at least the required size, then grow the file system online (block
    /// volumes: nothing more). Returns the disk's size.
    pub async fn expand(&self, req: ExpandRequest) -> Result<Bytes, NodeError> {
        let _guard = self.guards.try_lock(req.volume.as_str())?;
        if let (Some(r), Some(l)) = (req.required, req.limit) {
            if r > l {
                return Err(NodeError::OutOfRange(format!(
                    "required {r} is above the limit {l}"
                )));
            }
        }
        let view = self.view().await?;
        let exists = self.mounter.exists(&req.volume_path).await?;
        let m = self.volume_mount(&view, &req.volume, &req.volume_path, exists)?;
        let (sid, disk) = match view.backing(m) {
            Backing::Disk(s, d) => (s.sid, d.name.clone()),
            Backing::Gone | Backing::Foreign => {
                return Err(NodeError::NotFound(format!(
                    "the disk of volume {} at {} is not attached",
                    req.volume,
                    req.volume_path.display()
                )))
            }
        };
        let size = self.rescan_until(sid, &disk, req.required).await?;
        if m.device_node().is_none() {
            let device = Path::new("/dev").join(&disk);
            if let FsState::NeedsCheck(reason) = self.mounter.fs_state(&device, &m.fs_type).await? {
                return Err(MountError::NeedsCheck { device, reason }.into());
            }
            self.mounter
                .grow_fs(&device, &m.mount_point, &m.fs_type)
                .await?;
        }
        tracing::info!(volume = %req.volume, %size, "expanded on the node");
        Ok(size)
    }

    /// Rescans session `sid` until `disk` is at least `required` (once when no size is
    /// required), within the attach timeout.
    async fn rescan_until(
        &self,
        sid: u32,
        disk: &str,
        required: Option<Bytes>,
    ) -> Result<Bytes, NodeError> {
        let deadline = Instant::now() + self.settings.attach_timeout;
        let mut pause = self.settings.poll_interval;
        loop {
            self.initiator.rescan(sid).await?;
            let view = self.view().await?;
            let size = view
                .disk_by_name(disk)
                .map(|(_, d)| d.size)
                .ok_or_else(|| NodeError::NotFound(format!("disk {disk} went away")))?;
            let now = Instant::now();
            match required {
                Some(r) if size < r && now < deadline => {}
                Some(r) if size < r => {
                    return Err(NodeError::NotGrown {
                        disk: disk.to_owned(),
                        size,
                        required: r,
                    })
                }
                _ => return Ok(size),
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(std::time::Duration::from_secs(1));
        }
    }
}
