//! NodeStageVolume and NodeUnstageVolume: os-brick's connect_volume and disconnect_volume.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;

use super::initiator::Session;
use super::model::{mode_is_read_only, Access, Attachment, StageRequest, TargetLun};
use super::view::{Backing, Staged, View};
use super::{Node, NodeError};
use crate::agent::chap::ChapCredentials;
use crate::agent::ids::target_iqn;
use crate::agent::VolumeId;
use crate::exec::iscsiadm::Failure;
use crate::exec::mount::Content;

/// File systems the node makes and mounts.
pub const SUPPORTED_FS: &[&str] = crate::controller::SUPPORTED_FS;

/// Longest pause between two looks for a disk.
const MAX_POLL: Duration = Duration::from_secs(1);

/// What an existing staging mount means for a new NodeStageVolume.
enum Existing {
    /// The volume is staged there as asked.
    Ready,
    /// Its disk is gone: the stale mount goes and the volume is attached again.
    Stale(PathBuf),
}

impl Node {
    /// Stages a volume: log in (or find the session), wait for the disk, then mount its file
    /// system (made if the disk is blank) or bind its device node. Staging again as before
    /// is OK; a different capability or volume at the path is [`NodeError::Incompatible`].
    pub async fn stage(&self, req: StageRequest) -> Result<(), NodeError> {
        let _guard = self.guards.try_lock(req.volume.as_str())?;
        let target = target_iqn(&req.volume);
        if req.attachment.target.as_str() != target {
            return Err(NodeError::InvalidArgument(format!(
                "publish_context targetIqn {} is not the target of volume {} ({target})",
                req.attachment.target, req.volume
            )));
        }
        if let Access::Mount { fs, .. } = &req.access {
            if !SUPPORTED_FS.contains(&fs.as_str()) {
                return Err(NodeError::InvalidArgument(format!(
                    "file system {fs:?} is not supported ({})",
                    SUPPORTED_FS.join(", ")
                )));
            }
        }
        let chap = self.chap_for(&req)?;
        let _session_lock = self.targets.lock(&target).await;
        let view = self.view().await?;
        match self.existing(&view, &req, &target)? {
            Some(Existing::Ready) => {
                tracing::debug!(volume = %req.volume, path = %req.staging_path.display(), "already staged");
                return Ok(());
            }
            Some(Existing::Stale(mount_point)) => {
                tracing::warn!(volume = %req.volume, path = %mount_point.display(), "staged disk is gone; attaching again");
                self.mounter.unmount(&mount_point).await?;
                if mount_point != req.staging_path {
                    self.mounter.remove(&mount_point).await?;
                }
            }
            None => {}
        }
        let lun = self.attach(&req.attachment, chap.as_ref()).await?;
        match &req.access {
            Access::Block => {
                let file = req.staging_path.join(lun.by_path_name());
                self.mounter.make_dir(&req.staging_path).await?;
                self.mounter.make_file(&file).await?;
                self.mounter.bind(&lun.by_path(), &file).await?;
            }
            Access::Mount { fs, flags } => {
                let device = lun.by_path();
                let read_only = mode_is_read_only(req.mode);
                match self.mounter.probe(&device).await? {
                    Content::Blank if read_only => {
                        return Err(NodeError::UnexpectedContent {
                            device,
                            found: "no file system".into(),
                            wanted: format!("{fs} (a read-only access mode cannot format)"),
                        })
                    }
                    Content::Blank => {
                        tracing::info!(volume = %req.volume, %fs, device = %device.display(), "formatting blank volume");
                        self.mounter.mkfs(&device, fs).await?;
                    }
                    Content::Filesystem(found) if &found == fs => {}
                    Content::Filesystem(found) => {
                        return Err(NodeError::UnexpectedContent {
                            device,
                            found: format!("a {found} file system"),
                            wanted: fs.clone(),
                        })
                    }
                    Content::Other(found) => {
                        return Err(NodeError::UnexpectedContent {
                            device,
                            found,
                            wanted: fs.clone(),
                        })
                    }
                }
                let mut options = flags.clone();
                if read_only && !options.iter().any(|o| o == "ro") {
                    options.push("ro".into());
                }
                // Clones and restored snapshots share the XFS UUID of their source.
                if fs == "xfs" && !options.iter().any(|o| o == "nouuid") {
                    options.push("nouuid".into());
                }
                self.mounter.make_dir(&req.staging_path).await?;
                self.mounter
                    .mount(&device, &req.staging_path, fs, &options)
                    .await?;
            }
        }
        tracing::info!(volume = %req.volume, path = %req.staging_path.display(), access = req.access.kind(), "staged");
        Ok(())
    }

    /// The CHAP credentials to log in with: the request's secrets, else the secret derived
    /// from the master key for the publish context's user; none when the target needs none.
    fn chap_for(&self, req: &StageRequest) -> Result<Option<ChapCredentials>, NodeError> {
        if let Some(c) = &req.secrets {
            return Ok(Some(c.clone()));
        }
        let Some(user) = &req.attachment.chap_user else {
            return Ok(None);
        };
        let Some(key) = &self.chap_key else {
            return Err(NodeError::NoChapSecret(format!(
                "target {} requires CHAP user {user:?}, and neither the NodeStage secrets \
                 (chapSecret) nor the node's chap_key_file give its secret",
                req.attachment.target
            )));
        };
        let derived = key.credentials(&req.volume);
        if &derived.username != user {
            tracing::warn!(volume = %req.volume, context_user = %user, derived_user = %derived.username,
                "CHAP user of the publish context differs from the derived one; using the context's");
        }
        Ok(Some(ChapCredentials {
            username: user.clone(),
            secret: derived.secret,
        }))
    }

    /// What is already at the staging path, checked against the request.
    fn existing(
        &self,
        view: &View,
        req: &StageRequest,
        target: &str,
    ) -> Result<Option<Existing>, NodeError> {
        let path = req.staging_path.display();
        let (m, as_block) = match view.staged(&req.staging_path) {
            Staged::Nothing => return Ok(None),
            Staged::Filesystem(m) => (m, false),
            Staged::Block(m) => (m, true),
        };
        let wants_block = matches!(req.access, Access::Block);
        if as_block != wants_block {
            return Err(NodeError::Incompatible(format!(
                "{path} is staged as {}, the capability asks for {}",
                if as_block { "block" } else { "mount" },
                req.access.kind()
            )));
        }
        match view.target_of(m) {
            Some(t) if t.target == target && t.lun == req.attachment.lun => {}
            Some(t) => {
                return Err(NodeError::Incompatible(format!(
                    "{path} holds LUN {} of {}, not volume {}",
                    t.lun, t.target, req.volume
                )))
            }
            None => {
                return Err(NodeError::Incompatible(format!(
                    "{path} holds {} from {}, not volume {}",
                    m.fs_type, m.source, req.volume
                )))
            }
        }
        match view.backing(m) {
            Backing::Gone => return Ok(Some(Existing::Stale(m.mount_point.clone()))),
            Backing::Foreign => {
                return Err(NodeError::Incompatible(format!(
                    "{path} holds a device that is not an iSCSI disk"
                )))
            }
            Backing::Disk(..) => {}
        }
        if let Access::Mount { fs, .. } = &req.access {
            if &m.fs_type != fs {
                return Err(NodeError::Incompatible(format!(
                    "{path} holds a {} file system, the capability asks for {fs}",
                    m.fs_type
                )));
            }
        }
        Ok(Some(Existing::Ready))
    }

    /// Logs in through the first portal that admits this node (or finds its session), rescans
    /// the session and waits for the LUN's by-path link.
    async fn attach(
        &self,
        at: &Attachment,
        chap: Option<&ChapCredentials>,
    ) -> Result<TargetLun, NodeError> {
        let target = at.target.as_str();
        let sessions = self.initiator.sessions().await?;
        let session_at = |sessions: &[Session], portal: &str| {
            sessions
                .iter()
                .find(|s| s.target == target && s.portal == portal)
                .map(|s| s.sid)
        };
        // Portals with a session first: no second session to the same target.
        let mut portals = at.portals.clone();
        portals.sort_by_key(|p| session_at(&sessions, &p.iscsiadm()).is_none());
        let mut tried = Vec::new();
        let mut last = None;
        for portal in &portals {
            let p = portal.iscsiadm();
            if session_at(&sessions, &p).is_none() {
                let logged_in = async {
                    self.initiator.create_record(target, portal, chap).await?;
                    self.initiator.login(target, &p).await
                }
                .await;
                if let Err(e) = logged_in {
                    tracing::warn!(%target, portal = %p, error = %crate::logging::error_chain(&e), "login failed");
                    tried.push(format!("{p}: {}", crate::logging::error_chain(&e)));
                    // A record that never logged in is not left behind.
                    if let Err(e) = self.initiator.delete_record(target, &p).await {
                        tracing::warn!(%target, portal = %p, error = %crate::logging::error_chain(&e), "cannot delete the record");
                    }
                    last = Some(e);
                    continue;
                }
                tracing::info!(%target, portal = %p, chap = chap.is_some(), "logged in");
            }
            let lun = at.at(portal);
            let fresh = self.initiator.sessions().await?;
            if let Some(sid) = session_at(&fresh, &p) {
                // A session that already existed may predate the LUN or its current size.
                if let Err(e) = self.initiator.rescan(sid).await {
                    tracing::warn!(%target, sid, error = %crate::logging::error_chain(&e), "rescan failed");
                }
            }
            self.wait_for_disk(&lun).await?;
            return Ok(lun);
        }
        match last {
            Some(source) => Err(NodeError::Login {
                target: target.to_owned(),
                tried,
                source: Box::new(source),
            }),
            None => Err(NodeError::InvalidArgument(
                "publish_context.portals names no portal".into(),
            )),
        }
    }

    /// Polls for the by-path link of `lun` until the attach timeout.
    async fn wait_for_disk(&self, lun: &TargetLun) -> Result<String, NodeError> {
        let name = lun.by_path_name();
        let deadline = Instant::now() + self.settings.attach_timeout;
        let mut pause = self.settings.poll_interval;
        loop {
            if let Some(disk) = self.initiator.by_path(&name).await? {
                return Ok(disk);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(NodeError::DeviceTimeout {
                    path: lun.by_path(),
                    after: self.settings.attach_timeout,
                });
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(MAX_POLL);
        }
    }

    /// Unstages a volume: unmount the staging path, then — unless the volume's disk is still
    /// mounted or held elsewhere — flush and delete its disks, log out and delete the node
    /// records of its target. Nothing staged and no session is OK.
    pub async fn unstage(&self, volume: &VolumeId, staging: &Path) -> Result<(), NodeError> {
        let _guard = self.guards.try_lock(volume.as_str())?;
        let target = target_iqn(volume);
        let _session_lock = self.targets.lock(&target).await;
        let view = self.view().await?;
        let (m, block) = match view.staged(staging) {
            Staged::Nothing => (None, false),
            Staged::Filesystem(m) => (Some(m), false),
            Staged::Block(m) => (Some(m), true),
        };
        if let Some(m) = m {
            match view.target_of(m) {
                Some(t) if t.target != target => {
                    tracing::warn!(%volume, path = %staging.display(), holds = %t.target,
                        "staging path holds another volume; leaving it mounted");
                }
                _ => {
                    self.mounter.unmount(&m.mount_point).await?;
                    if block {
                        self.mounter.remove(&m.mount_point).await?;
                    }
                }
            }
        }
        // Block files of this target left by a stage or unstage cut short, so the CO can
        // remove its staging directory.
        let mounts = self.mounter.mounts().await?;
        for name in self.mounter.list_dir(staging).await? {
            let file = staging.join(&name);
            let ours = TargetLun::parse_by_path_name(&name).is_some_and(|t| t.target == target);
            if ours && !mounts.iter().any(|m| m.mount_point == file) {
                self.mounter.remove(&file).await?;
            }
        }
        self.detach(&target, Some(volume)).await?;
        tracing::info!(%volume, path = %staging.display(), "unstaged");
        Ok(())
    }

    /// Detaches a target unless one of its disks is in use: flush and delete each disk, log
    /// every session out, delete every record. The caller holds the target's lock.
    pub(super) async fn detach(
        &self,
        target: &str,
        volume: Option<&VolumeId>,
    ) -> Result<(), NodeError> {
        let view = self.view().await?;
        let sessions: Vec<&Session> = view.sessions_of(target).collect();
        let users: Vec<String> = sessions
            .iter()
            .flat_map(|s| s.disks.iter())
            .flat_map(|d| view.users(d))
            .collect();
        if !users.is_empty() {
            return Err(NodeError::InUse {
                volume: volume.map_or_else(|| target.to_owned(), ToString::to_string),
                users,
            });
        }
        for s in &sessions {
            for d in &s.disks {
                if s.logged_in() {
                    self.initiator.flush(&d.name).await?;
                } else {
                    // Without a connection a flush would only wait for the recovery timeout.
                    tracing::warn!(%target, disk = %d.name, state = %s.state, "session down; disk deleted without a flush");
                }
                self.initiator.delete_disk(&d.name).await?;
            }
            self.initiator.logout(s.sid).await?;
            tracing::info!(%target, portal = %s.portal, sid = s.sid, "logged out");
        }
        for r in self.initiator.records().await? {
            if r.target == target {
                match self.initiator.delete_record(target, &r.portal).await {
                    Ok(()) => {}
                    // A session made by someone else in the meantime keeps its record.
                    Err(e) if e.failure() == Some(Failure::Busy) => {
                        tracing::warn!(%target, portal = %r.portal, "record in use; kept");
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }
}

/// The staged volumes a view shows: the target of every staging mount it can name.
pub(super) fn staged_targets(view: &View) -> Vec<TargetLun> {
    let mut out: Vec<TargetLun> = view
        .mounts
        .iter()
        .filter_map(super::view::durable_target)
        .collect();
    out.sort();
    out.dedup();
    out
}

/// A volume id from one of our target names.
pub(super) fn volume_of(target: &str) -> Option<VolumeId> {
    crate::agent::ids::volume_of_target(target)
}
