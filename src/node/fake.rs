//! A hand-written, stateful in-memory host for tests: one [`FakeHost`] is both the
//! [`Initiator`] and the [`Mounter`], because on a real host the two share the kernel (a
//! logout deletes disks that mounts still point at).
//!
//! It models what the node service relies on: targets with LUNs behind portals (with CHAP),
//! node records, sessions and their disks, udev's by-path links (optionally late), file
//! systems on LUNs (they survive logouts), the mount table with the fields mountinfo has, and
//! the directories and files the CO's paths are. Misuse that a real kernel would also punish
//! (mounting a file system of the wrong type, removing a mounted path, deleting a record in
//! use) is an error here too, so tests catch it. Every state change is logged ([`FakeHost::log`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use super::initiator::{
    Disk, Initiator, InitiatorError, Record, Session, SysSession, SESSION_LOGGED_IN,
};
use super::model::{Portal, TargetLun};
use super::mounter::{FsState, FsStats, MountError, Mounter};
use super::mountinfo::MountEntry;
use crate::agent::chap::ChapCredentials;
use crate::exec::iscsiadm::{self, Failure};
use crate::exec::mount::Content;
use crate::exec::ExecError;
use crate::types::Bytes;

/// SCSI disk major number.
const SD_MAJOR: u32 = 8;
/// devtmpfs's device number, as on a Debian host.
const DEVTMPFS: (u32, u32) = (0, 5);

#[derive(Clone, Debug)]
struct Lun {
    size: Bytes,
    content: Content,
    fs_size: Bytes,
    errors: bool,
}

#[derive(Clone, Debug)]
struct Target {
    portals: BTreeSet<String>,
    luns: BTreeMap<u32, Lun>,
    chap: Option<ChapCredentials>,
}

#[derive(Clone, Debug)]
struct FakeRecord {
    startup: String,
    chap: Option<ChapCredentials>,
}

#[derive(Clone, Debug)]
struct FakeSession {
    sid: u32,
    target: String,
    portal: String,
    state: String,
}

#[derive(Clone, Debug)]
struct FakeDisk {
    sid: u32,
    target: String,
    lun: u32,
    minor: u32,
    size: Bytes,
    holders: Vec<String>,
    /// Looks for its by-path link left before udev makes it.
    udev_lag: u32,
}

#[derive(Debug, Default)]
struct State {
    initiator_name: Option<String>,
    unreachable: BTreeSet<String>,
    targets: BTreeMap<String, Target>,
    records: BTreeMap<(String, String), FakeRecord>,
    sessions: Vec<FakeSession>,
    disks: BTreeMap<String, FakeDisk>,
    next_sid: u32,
    next_disk: u32,
    udev_lag: u32,
    mounts: Vec<MountEntry>,
    next_mount: u32,
    dirs: BTreeSet<PathBuf>,
    files: BTreeSet<PathBuf>,
    log: Vec<String>,
}

/// The fake host. Share it as `Arc<FakeHost>` for both seams.
#[derive(Debug, Default)]
pub struct FakeHost {
    // Protects the whole fake host; every method locks it once and never across `.await`.
    state: Mutex<State>,
}

fn failed(op: &str, failure: Failure, code: i32, stderr: &str) -> InitiatorError {
    InitiatorError::Iscsiadm {
        op: op.to_owned(),
        failure,
        code,
        stderr: stderr.to_owned(),
    }
}

fn tool_failed(op: String, program: &str, stderr: &str) -> MountError {
    MountError::Exec {
        op,
        source: ExecError::Failed {
            program: program.to_owned(),
            code: 32,
            stderr: stderr.to_owned(),
        },
    }
}

/// `sdb`, `sdc`, ... `sdz`, `sdaa`, ...
fn disk_name(n: u32) -> String {
    let mut n = n + 1; // sdb first: sda is the host's own disk
    let mut s = Vec::new();
    loop {
        s.push(b'a' + u8::try_from(n % 26).unwrap_or(0));
        n /= 26;
        if n == 0 {
            break;
        }
        n -= 1;
    }
    s.reverse();
    format!("sd{}", String::from_utf8_lossy(&s))
}

impl State {
    fn lun_of(&self, d: &FakeDisk) -> Option<&Lun> {
        self.targets.get(&d.target)?.luns.get(&d.lun)
    }

    fn portal_of(&self, sid: u32) -> Option<&str> {
        self.sessions
            .iter()
            .find(|s| s.sid == sid)
            .map(|s| s.portal.as_str())
    }

    fn by_path_name(&self, d: &FakeDisk) -> Option<String> {
        let portal = Portal::parse(self.portal_of(d.sid)?).ok()?;
        Some(
            TargetLun {
                portal,
                target: d.target.clone(),
                lun: d.lun,
            }
            .by_path_name(),
        )
    }

    /// The disk a device path names: `/dev/sdX`, a by-path link, or a file a device node is
    /// bound onto.
    fn resolve(&self, path: &Path) -> Option<String> {
        let s = path.to_str()?;
        if let Some(name) = s.strip_prefix("/dev/disk/by-path/") {
            return self
                .disks
                .iter()
                .find(|(_, d)| d.udev_lag == 0 && self.by_path_name(d).as_deref() == Some(name))
                .map(|(n, _)| n.clone());
        }
        if let Some(name) = s.strip_prefix("/dev/") {
            return self.disks.contains_key(name).then(|| name.to_owned());
        }
        let m = self.mounts.iter().rev().find(|m| m.mount_point == path)?;
        match m.device_node() {
            Some((name, false)) => self.disks.contains_key(name).then(|| name.to_owned()),
            _ => None,
        }
    }

    fn remove_disk(&mut self, name: &str) {
        if self.disks.remove(name).is_none() {
            return;
        }
        let gone = format!("/{name}");
        for m in &mut self.mounts {
            if m.fs_type == "devtmpfs" && m.root == gone {
                m.root = format!("/{name} (deleted)");
            }
        }
    }

    fn add_disks(&mut self, sid: u32, target: &str) {
        let luns: Vec<(u32, Bytes)> = self
            .targets
            .get(target)
            .map(|t| t.luns.iter().map(|(n, l)| (*n, l.size)).collect())
            .unwrap_or_default();
        for (lun, size) in luns {
            let exists = self.disks.values().any(|d| d.sid == sid && d.lun == lun);
            if exists {
                continue;
            }
            let n = self.next_disk;
            self.next_disk += 1;
            self.disks.insert(
                disk_name(n),
                FakeDisk {
                    sid,
                    target: target.to_owned(),
                    lun,
                    minor: 16 * (n + 1),
                    size,
                    holders: Vec::new(),
                    udev_lag: self.udev_lag,
                },
            );
        }
    }

    fn is_mounted(&self, path: &Path) -> bool {
        self.mounts.iter().any(|m| m.mount_point == path)
    }

    fn push_mount(&mut self, mut m: MountEntry) {
        self.next_mount += 1;
        m.id = 100 + self.next_mount;
        m.parent = 1;
        self.mounts.push(m);
    }
}

impl FakeHost {
    /// An empty host with this initiator name.
    pub fn new(initiator_name: &str) -> Self {
        let h = FakeHost::default();
        h.lock().initiator_name = Some(initiator_name.to_owned());
        h
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    // ---- the storage side and the outside world ------------------------------------------

    /// A target with one LUN of `size`, reachable through `portals`, requiring `chap` when
    /// given. The LUN starts blank.
    pub fn add_target(
        &self,
        target: &str,
        portals: &[&str],
        lun: u32,
        size: Bytes,
        chap: Option<ChapCredentials>,
    ) {
        let mut s = self.lock();
        let t = s.targets.entry(target.to_owned()).or_insert(Target {
            portals: BTreeSet::new(),
            luns: BTreeMap::new(),
            chap,
        });
        t.portals.extend(portals.iter().map(|p| p.to_string()));
        t.luns.insert(
            lun,
            Lun {
                size,
                content: Content::Blank,
                fs_size: Bytes(0),
                errors: false,
            },
        );
    }

    /// Grows a LUN on the storage side; disks see it after a rescan.
    pub fn resize_lun(&self, target: &str, lun: u32, size: Bytes) {
        if let Some(l) = self
            .lock()
            .targets
            .get_mut(target)
            .and_then(|t| t.luns.get_mut(&lun))
        {
            l.size = size;
        }
    }

    /// Puts content on a LUN (as if written elsewhere).
    pub fn set_content(&self, target: &str, lun: u32, content: Content) {
        if let Some(l) = self
            .lock()
            .targets
            .get_mut(target)
            .and_then(|t| t.luns.get_mut(&lun))
        {
            l.content = content;
        }
    }

    /// Records errors in a LUN's file system (fsck needed).
    pub fn set_fs_errors(&self, target: &str, lun: u32) {
        if let Some(l) = self
            .lock()
            .targets
            .get_mut(target)
            .and_then(|t| t.luns.get_mut(&lun))
        {
            l.errors = true;
        }
    }

    /// The size the file system on a LUN spans.
    pub fn fs_size(&self, target: &str, lun: u32) -> Option<Bytes> {
        let s = self.lock();
        s.targets.get(target)?.luns.get(&lun).map(|l| l.fs_size)
    }

    /// Makes a portal unreachable (or reachable again).
    pub fn set_reachable(&self, portal: &str, reachable: bool) {
        let mut s = self.lock();
        if reachable {
            s.unreachable.remove(portal);
        } else {
            s.unreachable.insert(portal.to_owned());
        }
    }

    /// Sets how many looks for a by-path link fail after a disk appears.
    pub fn set_udev_lag(&self, polls: u32) {
        self.lock().udev_lag = polls;
    }

    /// Sets the state of every session to `target` (`FAILED`: connection lost).
    pub fn set_session_state(&self, target: &str, state: &str) {
        for sess in self
            .lock()
            .sessions
            .iter_mut()
            .filter(|x| x.target == target)
        {
            sess.state = state.to_owned();
        }
    }

    /// Logs out every session to `target` behind the node's back (its disks go; its records
    /// stay).
    pub fn drop_sessions(&self, target: &str) {
        let mut s = self.lock();
        let sids: Vec<u32> = s
            .sessions
            .iter()
            .filter(|x| x.target == target)
            .map(|x| x.sid)
            .collect();
        let names: Vec<String> = s
            .disks
            .iter()
            .filter(|(_, d)| sids.contains(&d.sid))
            .map(|(n, _)| n.clone())
            .collect();
        for n in names {
            s.remove_disk(&n);
        }
        s.sessions.retain(|x| x.target != target);
        s.log.push(format!("(outside) logout {target}"));
    }

    /// Stacks a device (device-mapper) on a disk.
    pub fn add_holder(&self, disk: &str, holder: &str) {
        if let Some(d) = self.lock().disks.get_mut(disk) {
            d.holders.push(holder.to_owned());
        }
    }

    /// Makes the kernel remount a mount's file system read-only (an error was found).
    pub fn force_read_only(&self, mount_point: &Path) {
        let mut s = self.lock();
        if let Some(m) = s.mounts.iter().find(|m| m.mount_point == mount_point) {
            let dev = (m.major, m.minor);
            for m in s.mounts.iter_mut().filter(|m| (m.major, m.minor) == dev) {
                m.super_options = vec!["ro".into()];
            }
        }
    }

    /// Creates a directory, as the CO does for staging paths.
    pub fn mkdir(&self, path: &Path) {
        let mut s = self.lock();
        for a in path.ancestors() {
            s.dirs.insert(a.to_owned());
        }
    }

    // ---- inspection -----------------------------------------------------------------------

    /// Every state change so far, one line each (`login T P`, `mount S T ext4 [..]`, ...).
    pub fn log(&self) -> Vec<String> {
        self.lock().log.clone()
    }

    /// Clears the log.
    pub fn clear_log(&self) {
        self.lock().log.clear();
    }

    /// Portals with a session to `target`.
    pub fn session_portals(&self, target: &str) -> Vec<String> {
        self.lock()
            .sessions
            .iter()
            .filter(|s| s.target == target)
            .map(|s| s.portal.clone())
            .collect()
    }

    /// Portals with a record of `target`, with their `node.startup` and CHAP user.
    pub fn records_of(&self, target: &str) -> Vec<(String, String, Option<String>)> {
        self.lock()
            .records
            .iter()
            .filter(|((t, _), _)| t == target)
            .map(|((_, p), r)| {
                (
                    p.clone(),
                    r.startup.clone(),
                    r.chap.as_ref().map(|c| c.username.clone()),
                )
            })
            .collect()
    }

    /// Disks of sessions to `target`.
    pub fn disks_of(&self, target: &str) -> Vec<String> {
        self.lock()
            .disks
            .iter()
            .filter(|(_, d)| d.target == target)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Mount points, in mount order.
    pub fn mount_points(&self) -> Vec<PathBuf> {
        self.lock()
            .mounts
            .iter()
            .map(|m| m.mount_point.clone())
            .collect()
    }

    /// Whether a path exists.
    pub fn path_exists(&self, path: &Path) -> bool {
        let s = self.lock();
        s.dirs.contains(path) || s.files.contains(path)
    }
}

#[async_trait::async_trait]
impl Initiator for FakeHost {
    async fn initiator_name(&self) -> Result<String, InitiatorError> {
        self.lock()
            .initiator_name
            .clone()
            .ok_or_else(|| InitiatorError::Io {
                op: "read initiator name file",
                path: PathBuf::from("/etc/iscsi/initiatorname.iscsi"),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            })
    }

    async fn sessions(&self) -> Result<Vec<Session>, InitiatorError> {
        let s = self.lock();
        Ok(s.sessions
            .iter()
            .map(|x| Session {
                sid: x.sid,
                target: x.target.clone(),
                portal: x.portal.clone(),
                state: x.state.clone(),
                disks: s
                    .disks
                    .iter()
                    .filter(|(_, d)| d.sid == x.sid)
                    .map(|(n, d)| Disk {
                        name: n.clone(),
                        lun: d.lun,
                        dev: (SD_MAJOR, d.minor),
                        size: d.size,
                        holders: d.holders.clone(),
                    })
                    .collect(),
            })
            .collect())
    }

    async fn session_states(&self) -> Result<Vec<SysSession>, InitiatorError> {
        Ok(self
            .lock()
            .sessions
            .iter()
            .map(|x| SysSession {
                sid: x.sid,
                target: x.target.clone(),
                state: x.state.clone(),
            })
            .collect())
    }

    async fn records(&self) -> Result<Vec<Record>, InitiatorError> {
        Ok(self
            .lock()
            .records
            .keys()
            .map(|(t, p)| Record {
                target: t.clone(),
                portal: p.clone(),
            })
            .collect())
    }

    async fn create_record(
        &self,
        target: &str,
        portal: &Portal,
        chap: Option<&ChapCredentials>,
    ) -> Result<(), InitiatorError> {
        let mut s = self.lock();
        let p = portal.iscsiadm();
        s.records.insert(
            (target.to_owned(), p.clone()),
            FakeRecord {
                startup: "manual".into(),
                chap: chap.cloned(),
            },
        );
        let user = chap.map_or("-", |c| c.username.as_str()).to_owned();
        s.log.push(format!("record {target} {p} chap={user}"));
        Ok(())
    }

    async fn delete_record(&self, target: &str, portal: &str) -> Result<(), InitiatorError> {
        let mut s = self.lock();
        let key = (target.to_owned(), portal.to_owned());
        if s.sessions
            .iter()
            .any(|x| x.target == target && x.portal == portal)
        {
            return Err(failed(
                "delete record",
                Failure::Busy,
                iscsiadm::ISCSI_ERR_BUSY,
                "a session is using it",
            ));
        }
        if s.records.remove(&key).is_some() {
            s.log.push(format!("delete record {target} {portal}"));
        }
        Ok(())
    }

    async fn login(&self, target: &str, portal: &str) -> Result<(), InitiatorError> {
        let mut s = self.lock();
        if s.sessions
            .iter()
            .any(|x| x.target == target && x.portal == portal)
        {
            return Ok(());
        }
        let op = format!("log in to {target} at {portal}");
        let Some(rec) = s
            .records
            .get(&(target.to_owned(), portal.to_owned()))
            .cloned()
        else {
            return Err(failed(&op, Failure::NotFound, 21, "No records found"));
        };
        if s.unreachable.contains(portal) {
            return Err(failed(
                &op,
                Failure::Unreachable,
                iscsiadm::ISCSI_ERR_TRANS_TIMEOUT,
                "connection timed out",
            ));
        }
        let Some(t) = s.targets.get(target).filter(|t| t.portals.contains(portal)) else {
            return Err(failed(
                &op,
                Failure::LoginRefused,
                iscsiadm::ISCSI_ERR_FATAL_LOGIN,
                "target not found",
            ));
        };
        if t.chap.is_some() && t.chap != rec.chap {
            return Err(failed(
                &op,
                Failure::AuthFailed,
                iscsiadm::ISCSI_ERR_LOGIN_AUTH_FAILED,
                "Login failed to authenticate with target",
            ));
        }
        s.next_sid += 1;
        let sid = s.next_sid;
        s.sessions.push(FakeSession {
            sid,
            target: target.to_owned(),
            portal: portal.to_owned(),
            state: SESSION_LOGGED_IN.into(),
        });
        s.add_disks(sid, target);
        s.log.push(format!("login {target} {portal}"));
        Ok(())
    }

    async fn logout(&self, sid: u32) -> Result<(), InitiatorError> {
        let mut s = self.lock();
        let Some(i) = s.sessions.iter().position(|x| x.sid == sid) else {
            return Ok(());
        };
        let FakeSession { target, portal, .. } = s.sessions.remove(i);
        let names: Vec<String> = s
            .disks
            .iter()
            .filter(|(_, d)| d.sid == sid)
            .map(|(n, _)| n.clone())
            .collect();
        for n in names {
            s.remove_disk(&n);
        }
        s.log.push(format!("logout {target} {portal}"));
        Ok(())
    }

    async fn rescan(&self, sid: u32) -> Result<(), InitiatorError> {
        let mut s = self.lock();
        let Some(target) = s
            .sessions
            .iter()
            .find(|x| x.sid == sid)
            .map(|x| x.target.clone())
        else {
            return Ok(());
        };
        s.add_disks(sid, &target);
        let sizes: Vec<(String, Bytes)> = s
            .disks
            .iter()
            .filter(|(_, d)| d.sid == sid)
            .filter_map(|(n, d)| Some((n.clone(), s.lun_of(d)?.size)))
            .collect();
        for (n, size) in sizes {
            if let Some(d) = s.disks.get_mut(&n) {
                d.size = size;
            }
        }
        s.log.push(format!("rescan {sid}"));
        Ok(())
    }

    /// Models iscsid's next attempt after the stop: a session whose portal is reachable
    /// logs in again; no such session is an error, as the kernel's (`EINVAL`).
    async fn reset_connection(&self, sid: u32) -> Result<(), InitiatorError> {
        let mut s = self.lock();
        let Some(i) = s.sessions.iter().position(|x| x.sid == sid) else {
            return Err(InitiatorError::Netlink {
                op: format!("stop the connection of session {sid} for recovery"),
                source: std::io::Error::from_raw_os_error(22),
            });
        };
        let reachable = !s.unreachable.contains(&s.sessions[i].portal);
        if reachable {
            s.sessions[i].state = SESSION_LOGGED_IN.into();
        }
        s.log.push(format!("reset-connection {sid}"));
        Ok(())
    }

    async fn by_path(&self, name: &str) -> Result<Option<String>, InitiatorError> {
        let mut s = self.lock();
        let found = s
            .disks
            .iter()
            .find(|(_, d)| s.by_path_name(d).as_deref() == Some(name))
            .map(|(n, _)| n.clone());
        let Some(disk) = found else {
            return Ok(None);
        };
        match s.disks.get_mut(&disk) {
            Some(d) if d.udev_lag > 0 => {
                d.udev_lag -= 1;
                Ok(None)
            }
            Some(_) => Ok(Some(disk)),
            None => Ok(None),
        }
    }

    async fn flush(&self, disk: &str) -> Result<(), InitiatorError> {
        let mut s = self.lock();
        if !s.disks.contains_key(disk) {
            return Err(InitiatorError::Exec {
                op: format!("flush {disk}"),
                source: ExecError::Failed {
                    program: "blockdev".into(),
                    code: 1,
                    stderr: format!("blockdev: cannot open /dev/{disk}: No such file or directory"),
                },
            });
        }
        s.log.push(format!("flush {disk}"));
        Ok(())
    }

    async fn delete_disk(&self, disk: &str) -> Result<(), InitiatorError> {
        let mut s = self.lock();
        if s.disks.contains_key(disk) {
            s.remove_disk(disk);
            s.log.push(format!("delete {disk}"));
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Mounter for FakeHost {
    async fn mounts(&self) -> Result<Vec<MountEntry>, MountError> {
        Ok(self.lock().mounts.clone())
    }

    async fn probe(&self, device: &Path) -> Result<Content, MountError> {
        let s = self.lock();
        let lun = s
            .resolve(device)
            .and_then(|n| s.disks.get(&n))
            .and_then(|d| s.lun_of(d))
            .ok_or_else(|| {
                tool_failed(
                    format!("probe {}", device.display()),
                    "blkid",
                    "no such device",
                )
            })?;
        Ok(lun.content.clone())
    }

    async fn mkfs(&self, device: &Path, fs: &str) -> Result<(), MountError> {
        let mut s = self.lock();
        let d = s
            .resolve(device)
            .and_then(|n| s.disks.get(&n))
            .cloned()
            .ok_or_else(|| {
                tool_failed(
                    format!("mkfs {}", device.display()),
                    "mkfs",
                    "no such device",
                )
            })?;
        if let Some(lun) = s
            .targets
            .get_mut(&d.target)
            .and_then(|t| t.luns.get_mut(&d.lun))
        {
            lun.content = Content::Filesystem(fs.to_owned());
            lun.fs_size = d.size;
        }
        s.log.push(format!("mkfs {fs} {}", device.display()));
        Ok(())
    }

    async fn mount(
        &self,
        source: &Path,
        target: &Path,
        fs: &str,
        options: &[String],
    ) -> Result<(), MountError> {
        let mut s = self.lock();
        let op = format!("mount {} on {}", source.display(), target.display());
        let d = s
            .resolve(source)
            .and_then(|n| s.disks.get(&n))
            .cloned()
            .ok_or_else(|| tool_failed(op.clone(), "mount", "special device does not exist"))?;
        let content = s.lun_of(&d).map(|l| l.content.clone());
        if content != Some(Content::Filesystem(fs.to_owned())) {
            return Err(tool_failed(
                op,
                "mount",
                "wrong fs type, bad option, bad superblock",
            ));
        }
        if !s.dirs.contains(target) {
            return Err(tool_failed(op, "mount", "mount point does not exist"));
        }
        if s.is_mounted(target) {
            return Err(tool_failed(
                op,
                "mount",
                "fake: already mounted (a double mount is a bug)",
            ));
        }
        let ro = options.iter().any(|o| o == "ro");
        let rw = if ro { "ro" } else { "rw" };
        s.push_mount(MountEntry {
            id: 0,
            parent: 0,
            major: SD_MAJOR,
            minor: d.minor,
            root: "/".into(),
            mount_point: target.to_owned(),
            options: vec![rw.into(), "relatime".into()],
            fs_type: fs.to_owned(),
            source: source.display().to_string(),
            super_options: vec![rw.into()],
        });
        s.log.push(format!(
            "mount {} {} {fs} [{}]",
            source.display(),
            target.display(),
            options.join(",")
        ));
        Ok(())
    }

    async fn bind(&self, source: &Path, target: &Path) -> Result<(), MountError> {
        let mut s = self.lock();
        let op = format!("bind {} on {}", source.display(), target.display());
        let entry = if let Some(disk) = s.resolve(source) {
            if !s.files.contains(target) {
                return Err(tool_failed(op, "mount", "a device binds onto a file"));
            }
            MountEntry {
                id: 0,
                parent: 0,
                major: DEVTMPFS.0,
                minor: DEVTMPFS.1,
                root: format!("/{disk}"),
                mount_point: target.to_owned(),
                options: vec!["rw".into(), "nosuid".into(), "relatime".into()],
                fs_type: "devtmpfs".into(),
                source: "udev".into(),
                super_options: vec!["rw".into()],
            }
        } else if let Some(m) = s.mounts.iter().rev().find(|m| m.mount_point == source) {
            if !s.dirs.contains(target) {
                return Err(tool_failed(op, "mount", "mount point does not exist"));
            }
            MountEntry {
                mount_point: target.to_owned(),
                ..m.clone()
            }
        } else {
            return Err(tool_failed(
                op,
                "mount",
                "fake: bind source is neither a device nor a mount",
            ));
        };
        s.push_mount(entry);
        s.log
            .push(format!("bind {} {}", source.display(), target.display()));
        Ok(())
    }

    async fn remount_readonly(&self, target: &Path) -> Result<(), MountError> {
        let mut s = self.lock();
        let Some(m) = s.mounts.iter_mut().rev().find(|m| m.mount_point == target) else {
            return Err(tool_failed(
                format!("remount {}", target.display()),
                "mount",
                "not mounted",
            ));
        };
        m.options[0] = "ro".into();
        s.log.push(format!("remount-ro {}", target.display()));
        Ok(())
    }

    async fn unmount(&self, target: &Path) -> Result<(), MountError> {
        let mut s = self.lock();
        if let Some(i) = s.mounts.iter().rposition(|m| m.mount_point == target) {
            s.mounts.remove(i);
            s.log.push(format!("umount {}", target.display()));
        }
        Ok(())
    }

    async fn make_dir(&self, path: &Path) -> Result<(), MountError> {
        let mut s = self.lock();
        if s.files.contains(path) {
            return Err(MountError::Io {
                op: "create directory",
                path: path.to_owned(),
                source: std::io::Error::from(std::io::ErrorKind::AlreadyExists),
            });
        }
        for a in path.ancestors() {
            s.dirs.insert(a.to_owned());
        }
        Ok(())
    }

    async fn make_file(&self, path: &Path) -> Result<(), MountError> {
        let mut s = self.lock();
        if s.dirs.contains(path) {
            return Err(MountError::Io {
                op: "create file",
                path: path.to_owned(),
                source: std::io::Error::from(std::io::ErrorKind::AlreadyExists),
            });
        }
        if let Some(parent) = path.parent() {
            for a in parent.ancestors() {
                s.dirs.insert(a.to_owned());
            }
        }
        s.files.insert(path.to_owned());
        Ok(())
    }

    async fn remove(&self, path: &Path) -> Result<(), MountError> {
        let mut s = self.lock();
        let busy = || MountError::Io {
            op: "remove",
            path: path.to_owned(),
            source: std::io::Error::from(std::io::ErrorKind::ResourceBusy),
        };
        if s.is_mounted(path) {
            return Err(busy());
        }
        let has_children = s
            .dirs
            .iter()
            .chain(s.files.iter())
            .any(|p| p != path && p.starts_with(path));
        if s.dirs.contains(path) && has_children {
            return Err(MountError::Io {
                op: "remove",
                path: path.to_owned(),
                source: std::io::Error::from(std::io::ErrorKind::DirectoryNotEmpty),
            });
        }
        s.dirs.remove(path);
        s.files.remove(path);
        Ok(())
    }

    async fn exists(&self, path: &Path) -> Result<bool, MountError> {
        let s = self.lock();
        Ok(s.dirs.contains(path) || s.files.contains(path))
    }

    async fn list_dir(&self, path: &Path) -> Result<Vec<String>, MountError> {
        let s = self.lock();
        Ok(s.dirs
            .iter()
            .chain(s.files.iter())
            .filter(|p| p.parent() == Some(path))
            .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
            .collect())
    }

    async fn fs_stats(&self, path: &Path) -> Result<FsStats, MountError> {
        let s = self.lock();
        let m = s
            .mounts
            .iter()
            .rev()
            .find(|m| m.mount_point == path)
            .ok_or_else(|| MountError::Io {
                op: "statvfs",
                path: path.to_owned(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            })?;
        // The file system outlives its disk: find its LUN through the mount's source.
        let lun = TargetLun::parse_by_path(&m.source)
            .and_then(|t| s.targets.get(&t.target)?.luns.get(&t.lun).cloned());
        let total = lun.map_or(0, |l| l.fs_size.get());
        let used = Bytes::MIB.min(total);
        let inodes = total / (16 * Bytes::KIB);
        Ok(FsStats {
            total_bytes: total,
            available_bytes: total - used,
            free_bytes: total - used,
            total_inodes: inodes,
            free_inodes: inodes.saturating_sub(11),
        })
    }

    async fn device_size(&self, device: &Path) -> Result<Bytes, MountError> {
        let s = self.lock();
        s.resolve(device)
            .and_then(|n| s.disks.get(&n))
            .map(|d| d.size)
            .ok_or_else(|| {
                tool_failed(
                    format!("size of {}", device.display()),
                    "blockdev",
                    "No such device",
                )
            })
    }

    async fn fs_state(&self, device: &Path, _fs: &str) -> Result<FsState, MountError> {
        let s = self.lock();
        let lun = s
            .resolve(device)
            .and_then(|n| s.disks.get(&n))
            .and_then(|d| s.lun_of(d))
            .ok_or_else(|| {
                tool_failed(
                    format!("dumpe2fs {}", device.display()),
                    "dumpe2fs",
                    "No such device",
                )
            })?;
        Ok(if lun.errors {
            FsState::NeedsCheck("file system state is \"clean with errors\"".into())
        } else {
            FsState::Clean
        })
    }

    async fn grow_fs(
        &self,
        device: &Path,
        _mount_point: &Path,
        fs: &str,
    ) -> Result<(), MountError> {
        let mut s = self.lock();
        let d = s
            .resolve(device)
            .and_then(|n| s.disks.get(&n))
            .cloned()
            .ok_or_else(|| {
                tool_failed(
                    format!("grow {}", device.display()),
                    "resize2fs",
                    "No such device",
                )
            })?;
        let lun = s
            .targets
            .get_mut(&d.target)
            .and_then(|t| t.luns.get_mut(&d.lun))
            .ok_or_else(|| MountError::Unsupported(fs.to_owned()))?;
        if lun.errors {
            return Err(MountError::NeedsCheck {
                device: device.to_owned(),
                reason: "Please run 'e2fsck -f' first.".into(),
            });
        }
        lun.fs_size = d.size;
        s.log.push(format!("grow {fs} {}", device.display()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_names() {
        let names: Vec<String> = [0, 1, 24, 25, 26].into_iter().map(disk_name).collect();
        assert_eq!(names, ["sdb", "sdc", "sdz", "sdaa", "sdab"]);
    }
}
