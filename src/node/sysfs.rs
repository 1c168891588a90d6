//! What sysfs says about iSCSI sessions and their disks. Everything here takes the sysfs root
//! as an argument (`/sys` on a host), so the walk is tested on a directory tree shaped like
//! the kernel's.
//!
//! - `/sys/class/iscsi_session/sessionN/{targetname,state}`: one directory per session.
//! - `/sys/block/sdX` is a link into the device tree, through the session that brought the
//!   disk: `../devices/platform/host2/session1/target2:0:0/2:0:0:1/block/sdc` (H:C:T:L, L
//!   the LUN). Disks that are not iSCSI have no `sessionN` component.
//! - `/sys/block/sdX/{dev,size,holders/}`: device number, size in 512-byte sectors, and the
//!   devices stacked on it.
//! - `/sys/block/sdX/device/delete`: writing `1` removes the SCSI device.

use std::io;
use std::path::{Component, Path};

use super::initiator::Disk;
use crate::types::Bytes;

/// A session as sysfs lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SysSession {
    /// Session id.
    pub sid: u32,
    /// Target name.
    pub target: String,
    /// State (`LOGGED_IN`, `FAILED`, `FREE`).
    pub state: String,
}

fn read_trimmed(p: &Path) -> io::Result<String> {
    Ok(std::fs::read_to_string(p)?.trim().to_owned())
}

fn not_found_is_empty<T>(r: io::Result<Vec<T>>) -> io::Result<Vec<T>> {
    match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        other => other,
    }
}

/// Every session (none when the iSCSI transport class is not loaded), by session id.
pub fn sessions(sys: &Path) -> io::Result<Vec<SysSession>> {
    let dir = sys.join("class/iscsi_session");
    not_found_is_empty((|| {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(sid) = name
                .to_str()
                .and_then(|n| n.strip_prefix("session"))
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let path = entry.path();
            // A session that goes away between the listing and the reads is skipped.
            let (Ok(target), Ok(state)) = (
                read_trimmed(&path.join("targetname")),
                read_trimmed(&path.join("state")),
            ) else {
                continue;
            };
            out.push(SysSession { sid, target, state });
        }
        out.sort_by_key(|s| s.sid);
        Ok(out)
    })())
}

/// The session id and LUN of a disk from its `/sys/block` link target.
pub fn session_and_lun(link: &Path) -> Option<(u32, u32)> {
    let parts: Vec<&str> = link
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => s.to_str(),
            _ => None,
        })
        .collect();
    let sid = parts
        .iter()
        .find_map(|p| p.strip_prefix("session")?.parse::<u32>().ok())?;
    let block = parts.iter().rposition(|p| *p == "block")?;
    let hctl = parts.get(block.checked_sub(1)?)?;
    let lun = hctl.rsplit(':').next()?.parse().ok()?;
    // H:C:T:L has exactly four parts.
    (hctl.split(':').count() == 4).then_some((sid, lun))
}

/// Every disk brought by an iSCSI session, with its session id.
pub fn session_disks(sys: &Path) -> io::Result<Vec<(u32, Disk)>> {
    let dir = sys.join("block");
    not_found_is_empty((|| {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let Ok(link) = std::fs::read_link(entry.path()) else {
                continue;
            };
            let Some((sid, lun)) = session_and_lun(&link) else {
                continue;
            };
            let path = entry.path();
            // Skipped when it goes away while being read.
            let Ok(dev) = read_trimmed(&path.join("dev")) else {
                continue;
            };
            let Some(dev) = dev
                .split_once(':')
                .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
            else {
                continue;
            };
            let sectors: u64 = read_trimmed(&path.join("size"))
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let mut holders: Vec<String> = match std::fs::read_dir(path.join("holders")) {
                Ok(it) => it
                    .filter_map(|e| e.ok()?.file_name().to_str().map(str::to_owned))
                    .collect(),
                Err(_) => Vec::new(),
            };
            holders.sort();
            out.push((
                sid,
                Disk {
                    name,
                    lun,
                    dev,
                    size: Bytes(sectors.saturating_mul(512)),
                    holders,
                },
            ));
        }
        out.sort_by(|a, b| (a.0, &a.1.name).cmp(&(b.0, &b.1.name)));
        Ok(out)
    })())
}

/// Removes a SCSI disk (`echo 1 > /sys/block/NAME/device/delete`); already gone is success.
pub fn delete_disk(sys: &Path, name: &str) -> io::Result<()> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a disk name: {name:?}"),
        ));
    }
    match std::fs::write(sys.join("block").join(name).join("device/delete"), b"1") {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A disk of [`tree`]: name, session (none: not iSCSI), H:C:T:L, dev, sectors, holders.
    pub(crate) type TreeDisk<'a> = (&'a str, Option<u32>, &'a str, &'a str, u64, &'a [&'a str]);

    /// Builds a sysfs-shaped tree: sessions (sid, target, state) and disks.
    pub(crate) fn tree(root: &Path, sessions: &[(u32, &str, &str)], disks: &[TreeDisk<'_>]) {
        for (sid, target, state) in sessions {
            let d = root.join(format!("class/iscsi_session/session{sid}"));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("targetname"), format!("{target}\n")).unwrap();
            std::fs::write(d.join("state"), format!("{state}\n")).unwrap();
        }
        std::fs::create_dir_all(root.join("block")).unwrap();
        for (name, sid, hctl, dev, sectors, holders) in disks {
            let host = hctl.split(':').next().unwrap();
            let rel = match sid {
                Some(s) => format!(
                    "devices/platform/host{host}/session{s}/target{}/{hctl}/block/{name}",
                    hctl.rsplit_once(':').unwrap().0
                ),
                None => format!("devices/pci0000:00/0000:00:05.0/virtio2/host{host}/target0:0:0/{hctl}/block/{name}"),
            };
            let d = root.join(&rel);
            std::fs::create_dir_all(d.join("holders")).unwrap();
            std::fs::create_dir_all(d.join("device")).unwrap();
            std::fs::write(d.join("device/delete"), b"").unwrap();
            std::fs::write(d.join("dev"), format!("{dev}\n")).unwrap();
            std::fs::write(d.join("size"), format!("{sectors}\n")).unwrap();
            for h in *holders {
                std::fs::create_dir_all(d.join("holders").join(h)).unwrap();
            }
            symlink(format!("../{rel}"), root.join("block").join(name)).unwrap();
        }
    }

    #[test]
    fn walks_sessions_and_disks() {
        let dir = tempfile::tempdir().unwrap();
        let t1 = "iqn.2026-01.dev.cinderblock:volume-a";
        let t2 = "iqn.2026-01.dev.cinderblock:volume-b";
        tree(
            dir.path(),
            &[(1, t1, "LOGGED_IN"), (3, t2, "FAILED")],
            &[
                ("sdc", Some(1), "2:0:0:1", "8:32", 2_097_152, &[]),
                ("sdd", Some(3), "4:0:0:1", "8:48", 4096, &["dm-0"]),
                ("vda", None, "0:0:0:0", "254:0", 100, &[]),
            ],
        );
        assert_eq!(
            sessions(dir.path()).unwrap(),
            vec![
                SysSession {
                    sid: 1,
                    target: t1.into(),
                    state: "LOGGED_IN".into()
                },
                SysSession {
                    sid: 3,
                    target: t2.into(),
                    state: "FAILED".into()
                },
            ]
        );
        assert_eq!(
            session_disks(dir.path()).unwrap(),
            vec![
                (
                    1,
                    Disk {
                        name: "sdc".into(),
                        lun: 1,
                        dev: (8, 32),
                        size: Bytes::gib(1),
                        holders: vec![]
                    }
                ),
                (
                    3,
                    Disk {
                        name: "sdd".into(),
                        lun: 1,
                        dev: (8, 48),
                        size: Bytes(4096 * 512),
                        holders: vec!["dm-0".into()]
                    }
                ),
            ]
        );
        delete_disk(dir.path(), "sdc").unwrap();
        let written = std::fs::read(dir.path().join("block/sdc/device/delete")).unwrap();
        assert_eq!(written, b"1");
        assert_eq!(delete_disk(dir.path(), "sdz").map_err(|e| e.kind()), Ok(()));
        assert_eq!(
            delete_disk(dir.path(), "../x").map_err(|e| e.kind()),
            Err(io::ErrorKind::InvalidInput)
        );
    }

    #[test]
    fn no_iscsi_at_all() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(sessions(dir.path()).unwrap(), vec![]);
        assert_eq!(session_disks(dir.path()).unwrap(), vec![]);
    }

    #[test]
    fn link_table() {
        let cases = [
            (
                "../devices/platform/host2/session1/target2:0:0/2:0:0:1/block/sdc",
                Some((1, 1)),
            ),
            (
                "../devices/platform/host12/session10/target12:0:0/12:0:0:0/block/sdq",
                Some((10, 0)),
            ),
            ("../devices/pci0000:00/0000:00:05.0/virtio2/block/vda", None),
            (
                "../devices/platform/host2/session1/target2:0:0/block/sdc",
                None,
            ),
        ];
        for (link, want) in cases {
            assert_eq!(session_and_lun(Path::new(link)), want, "{link}");
        }
    }
}
