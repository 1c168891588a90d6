//! The kernel's mount table, `/proc/self/mountinfo` (proc(5)): one line per mount,
//! `ID PARENT MAJOR:MINOR ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS`,
//! with space, tab, newline and backslash in paths escaped as octal (`\040`).

use std::path::PathBuf;

/// One mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    /// Mount id.
    pub id: u32,
    /// Parent mount id.
    pub parent: u32,
    /// Device number of the file system (for a block file system: its block device).
    pub major: u32,
    /// Minor device number.
    pub minor: u32,
    /// The path inside the file system that is mounted (`/` for a whole file system, `/sdc`
    /// for a bind of a device node in devtmpfs; ` (deleted)` appended once it is unlinked).
    pub root: String,
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// Per-mount options (`rw`/`ro`, ...).
    pub options: Vec<String>,
    /// File system type.
    pub fs_type: String,
    /// Source as given to mount(2) (`/dev/sdc`, a by-path link with `mount -c`, `udev`, ...).
    pub source: String,
    /// Superblock options (`ro` here while the mount says `rw`: the kernel made the file
    /// system read-only after an error).
    pub super_options: Vec<String>,
}

/// Suffix the kernel appends to a path whose dentry was unlinked.
const DELETED: &str = " (deleted)";

impl MountEntry {
    /// The mount is read-only.
    pub fn read_only(&self) -> bool {
        self.options.iter().any(|o| o == "ro")
    }

    /// The superblock is read-only while the mount is not: the file system was remounted
    /// read-only by the kernel (ext4 `errors=remount-ro`, XFS shutdown).
    pub fn forced_read_only(&self) -> bool {
        !self.read_only() && self.super_options.iter().any(|o| o == "ro")
    }

    /// For a bind mount of a device node from devtmpfs (how block volumes are staged and
    /// published): the device's name (`sdc`) and whether the node was since deleted.
    pub fn device_node(&self) -> Option<(&str, bool)> {
        if self.fs_type != "devtmpfs" {
            return None;
        }
        let root = self.root.strip_prefix('/')?;
        if root.is_empty() {
            return None; // devtmpfs itself (/dev)
        }
        Some(match root.strip_suffix(DELETED) {
            Some(name) => (name, true),
            None => (root, false),
        })
    }
}

/// A line that does not read as mountinfo.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("mountinfo line {line}: {reason}")]
pub struct ParseError {
    /// Line number, from 1.
    pub line: usize,
    /// What was wrong.
    pub reason: &'static str,
}

/// Undoes the kernel's octal escapes (`\040` space, `\011` tab, `\012` newline, `\134`
/// backslash).
pub fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = oct
                    .iter()
                    .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                if let Ok(byte) = u8::try_from(v) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses the whole table.
pub fn parse(text: &str) -> Result<Vec<MountEntry>, ParseError> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(no, l)| {
            parse_line(l).map_err(|reason| ParseError {
                line: no + 1,
                reason,
            })
        })
        .collect()
}

fn parse_line(line: &str) -> Result<MountEntry, &'static str> {
    let fields: Vec<&str> = line.split(' ').collect();
    let sep = fields
        .iter()
        .position(|f| *f == "-")
        .ok_or("no \" - \" separator")?;
    if sep < 6 || fields.len() < sep + 4 {
        return Err("too few fields");
    }
    let num = |s: &str| s.parse::<u32>().map_err(|_| "bad number");
    let (major, minor) = fields[2].split_once(':').ok_or("bad MAJOR:MINOR")?;
    let opts = |s: &str| s.split(',').map(str::to_owned).collect::<Vec<_>>();
    Ok(MountEntry {
        id: num(fields[0])?,
        parent: num(fields[1])?,
        major: num(major)?,
        minor: num(minor)?,
        root: unescape(fields[3]),
        mount_point: PathBuf::from(unescape(fields[4])),
        options: opts(fields[5]),
        fs_type: unescape(fields[sep + 1]),
        source: unescape(fields[sep + 2]),
        super_options: opts(fields[sep + 3]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // The shape of a Debian 12 node with one staged file system volume (published once) and
    // one staged and published block volume. Hand-written after proc(5); to be replaced by a
    // capture from the test VMs.
    const TABLE: &str = "\
22 1 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
24 1 0:5 / /dev rw,nosuid,relatime shared:2 - devtmpfs udev rw,size=4007416k,nr_inodes=1001854,mode=755
29 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,errors=remount-ro
120 29 8:32 / /var/lib/kubelet/plugins/kubernetes.io/csi/csi.cinderblock.dev/ab12/globalmount rw,relatime shared:80 - ext4 /dev/disk/by-path/ip-192.168.77.1:3260-iscsi-iqn.2026-01.dev.cinderblock:volume-0f1e-lun-1 rw
125 29 8:32 / /var/lib/kubelet/pods/p1/volumes/kubernetes.io~csi/pvc-1/mount ro,relatime shared:80 - ext4 /dev/disk/by-path/ip-192.168.77.1:3260-iscsi-iqn.2026-01.dev.cinderblock:volume-0f1e-lun-1 ro
130 29 0:5 /sdd /var/lib/kubelet/plugins/kubernetes.io/csi/volumeDevices/staging/pvc-2/ip-192.168.77.1:3260-iscsi-iqn.2026-01.dev.cinderblock:volume-aa11-lun-1 rw,nosuid,relatime shared:2 - devtmpfs udev rw,size=4007416k
131 29 0:5 /sde\\040(deleted) /var/lib/kubelet/pods/p2/volume\\040dev rw,nosuid,relatime shared:2 - devtmpfs udev rw,size=4007416k
140 29 8:48 / /mnt/broken rw,relatime - ext4 /dev/sdf ro,errors=remount-ro
";

    #[test]
    fn parses_a_node_table() {
        let t = parse(TABLE).unwrap();
        assert_eq!(t.len(), 8);
        let stage = &t[3];
        assert_eq!(
            (stage.id, stage.parent, stage.major, stage.minor),
            (120, 29, 8, 32)
        );
        assert_eq!(stage.fs_type, "ext4");
        assert!(stage
            .source
            .starts_with("/dev/disk/by-path/ip-192.168.77.1:3260-iscsi-"));
        assert_eq!(stage.device_node(), None);
        assert!(!stage.read_only());
        assert!(t[4].read_only());
        assert_eq!(t[5].device_node(), Some(("sdd", false)));
        assert_eq!(t[6].device_node(), Some(("sde", true)));
        assert_eq!(
            t[6].mount_point,
            PathBuf::from("/var/lib/kubelet/pods/p2/volume dev")
        );
        assert_eq!(t[1].device_node(), None, "/dev itself");
        assert!(t[7].forced_read_only());
        assert!(!t[4].forced_read_only());
    }

    #[test]
    fn bad_lines() {
        assert_eq!(
            parse("1 2 3").map_err(|e| e.reason),
            Err("no \" - \" separator")
        );
        assert_eq!(
            parse("x 1 0:1 / / rw - ext4 /dev/a rw").map_err(|e| e.line),
            Err(1)
        );
        assert_eq!(
            parse("\n1 1 01 / / rw - ext4 /dev/a rw").map_err(|e| (e.line, e.reason)),
            Err((2, "bad MAJOR:MINOR"))
        );
    }

    #[test]
    fn unescape_table() {
        for (raw, want) in [
            ("a\\040b", "a b"),
            ("a\\011b\\012c\\134d", "a\tb\nc\\d"),
            ("plain", "plain"),
            ("trailing\\04", "trailing\\04"),
            ("bad\\09x", "bad\\09x"),
        ] {
            assert_eq!(unescape(raw), want, "{raw}");
        }
    }
}
