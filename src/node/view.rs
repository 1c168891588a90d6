//! The host as one call of the node service sees it: sessions with their disks, and the mount
//! table. Every decision (is it staged, which disk, is the session still needed) is a
//! question to this view, read fresh from the kernel.

use std::path::Path;

use super::initiator::{Disk, Session};
use super::model::TargetLun;
use super::mountinfo::MountEntry;
use super::{Node, NodeError};

/// Sessions and mounts, read together.
#[derive(Clone, Debug, Default)]
pub(super) struct View {
    pub sessions: Vec<Session>,
    pub mounts: Vec<MountEntry>,
}

/// What is underneath a mount.
#[derive(Clone, Copy, Debug)]
pub(super) enum Backing<'a> {
    /// A disk of an iSCSI session.
    Disk(&'a Session, &'a Disk),
    /// It was on an iSCSI disk that is no longer there (logged out, deleted).
    Gone,
    /// Not an iSCSI disk at all.
    Foreign,
}

/// How a volume is staged at a staging path.
#[derive(Clone, Copy, Debug)]
pub(super) enum Staged<'a> {
    /// A file system mounted on the staging directory.
    Filesystem(&'a MountEntry),
    /// A device node bound onto `<staging>/<by-path name>`.
    Block(&'a MountEntry),
    /// Nothing.
    Nothing,
}

impl View {
    /// The disk of `name` (`sdc`) and its session.
    pub fn disk_by_name(&self, name: &str) -> Option<(&Session, &Disk)> {
        self.sessions
            .iter()
            .find_map(|s| s.disks.iter().find(|d| d.name == name).map(|d| (s, d)))
    }

    fn disk_by_dev(&self, dev: (u32, u32)) -> Option<(&Session, &Disk)> {
        self.sessions
            .iter()
            .find_map(|s| s.disks.iter().find(|d| d.dev == dev).map(|d| (s, d)))
    }

    /// What a mount is on.
    pub fn backing(&self, m: &MountEntry) -> Backing<'_> {
        if let Some((name, deleted)) = m.device_node() {
            if deleted {
                return Backing::Gone;
            }
            return match self.disk_by_name(name) {
                Some((s, d)) => Backing::Disk(s, d),
                None if durable_target(m).is_some() => Backing::Gone,
                None => Backing::Foreign,
            };
        }
        match self.disk_by_dev((m.major, m.minor)) {
            Some((s, d)) => Backing::Disk(s, d),
            None if durable_target(m).is_some() => Backing::Gone,
            None => Backing::Foreign,
        }
    }

    /// The target and LUN a mount belongs to: from its durable name (mount source or block
    /// file name), else from the session of the disk under it.
    pub fn target_of(&self, m: &MountEntry) -> Option<TargetLun> {
        durable_target(m).or_else(|| match self.backing(m) {
            Backing::Disk(s, d) => Some(TargetLun {
                portal: super::Portal::parse(&s.portal).ok()?,
                target: s.target.clone(),
                lun: d.lun,
            }),
            Backing::Gone | Backing::Foreign => None,
        })
    }

    /// The topmost mount at `path`.
    pub fn mount_at(&self, path: &Path) -> Option<&MountEntry> {
        self.mounts.iter().rev().find(|m| m.mount_point == path)
    }

    /// How something is staged at `staging`.
    pub fn staged(&self, staging: &Path) -> Staged<'_> {
        if let Some(m) = self.mount_at(staging) {
            if m.device_node().is_none() {
                return Staged::Filesystem(m);
            }
        }
        self.mounts
            .iter()
            .rev()
            .find(|m| {
                m.device_node().is_some()
                    && m.mount_point.parent() == Some(staging)
                    && block_file_target(m).is_some()
            })
            .map_or(Staged::Nothing, Staged::Block)
    }

    /// Mounts on the same device as `m` (itself included).
    pub fn same_device<'a>(&'a self, m: &'a MountEntry) -> impl Iterator<Item = &'a MountEntry> {
        self.mounts.iter().filter(move |o| same_device(o, m))
    }

    /// Who uses a disk: its mount points and its holders.
    pub fn users(&self, disk: &Disk) -> Vec<String> {
        let mut users: Vec<String> = self
            .mounts
            .iter()
            .filter(|m| match self.backing(m) {
                Backing::Disk(_, d) => d.name == disk.name,
                Backing::Gone | Backing::Foreign => false,
            })
            .map(|m| m.mount_point.display().to_string())
            .collect();
        users.extend(disk.holders.iter().map(|h| format!("holder {h}")));
        users
    }

    /// Sessions to `target`.
    pub fn sessions_of<'a>(&'a self, target: &'a str) -> impl Iterator<Item = &'a Session> {
        self.sessions.iter().filter(move |s| s.target == target)
    }
}

/// Two mounts of the same device (or the same device node).
pub(super) fn same_device(a: &MountEntry, b: &MountEntry) -> bool {
    match (a.device_node(), b.device_node()) {
        (Some(x), Some(y)) => x == y,
        (None, None) => (a.major, a.minor) == (b.major, b.minor) && a.fs_type == b.fs_type,
        _ => false,
    }
}

/// The target of a block volume's staging file (`<staging>/<by-path name>`).
fn block_file_target(m: &MountEntry) -> Option<TargetLun> {
    TargetLun::parse_by_path_name(m.mount_point.file_name()?.to_str()?)
}

/// The target a mount names without looking at any disk: the by-path source of a file
/// system, or the by-path file name a device node was bound onto.
pub(super) fn durable_target(m: &MountEntry) -> Option<TargetLun> {
    if m.device_node().is_some() {
        block_file_target(m)
    } else {
        TargetLun::parse_by_path(&m.source)
    }
}

impl Node {
    /// Reads sessions and mounts.
    pub(super) async fn view(&self) -> Result<View, NodeError> {
        let sessions = self.initiator.sessions().await?;
        let mounts = self.mounter.mounts().await?;
        Ok(View { sessions, mounts })
    }
}
