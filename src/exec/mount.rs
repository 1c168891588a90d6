//! The mount tools of the node service: `blkid`, `mkfs.*`, `mount`/`umount`, `resize2fs`,
//! `xfs_growfs`, `dumpe2fs` and `blockdev`. Argv builders, parsers of their output and the
//! exit codes that mean something other than failure.
//!
//! Output of blkid, dumpe2fs and resize2fs is kept as captured from util-linux 2.38.1 and
//! e2fsprogs 1.47.0 under `tests/fixtures/mount/` (`capture.sh` there re-captures it).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use super::Cmd;

/// blkid's exit code when nothing was detected on the device (`-p`: no signature at all):
/// the device is blank. Captured: `blkid-blank.rc`.
pub const BLKID_NOTHING_FOUND: i32 = 2;

/// blkid's exit code for an ambivalent low-level probe (several signatures that exclude each
/// other): the device must not be formatted. From blkid(8).
pub const BLKID_AMBIVALENT: i32 = 8;

/// mount(8) and umount(8): "mount failure", including umount's "not mounted". From mount(8).
pub const MOUNT_EX_FAIL: i32 = 32;

/// Deadline of commands that write a whole file system's metadata (mkfs, resize).
pub const FS_TIMEOUT: Duration = Duration::from_secs(600);

/// Deadline of probes, mounts and `blockdev` calls.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(60);

fn path_arg(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// `blkid -p -o export DEVICE`: a low-level probe (superblocks read from the device, no
/// cache), as `KEY=value` lines ([`parse_blkid`]).
pub fn blkid(device: &Path) -> Cmd {
    Cmd::new("blkid")
        .timeout(TOOL_TIMEOUT)
        .args(["-p", "-o", "export"])
        .arg(path_arg(device))
}

/// What a low-level probe found on a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    /// No signature at all.
    Blank,
    /// A file system of this type (`ext4`, `xfs`, ...).
    Filesystem(String),
    /// Something that is not a file system (swap, a partition table, an LVM PV, LUKS, a RAID
    /// member): never formatted over.
    Other(String),
}

/// Parses blkid's `-o export` output into its keys.
pub fn parse_blkid(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// The content of a device from blkid's exit code and output: `None` when blkid failed
/// (any other code), with [`BLKID_AMBIVALENT`] reported as [`Content::Other`].
pub fn content(code: i32, stdout: &str) -> Option<Content> {
    match code {
        0 => {}
        BLKID_NOTHING_FOUND => return Some(Content::Blank),
        BLKID_AMBIVALENT => return Some(Content::Other("ambivalent signatures".into())),
        _ => return None,
    }
    let keys = parse_blkid(stdout);
    let usage = keys.get("USAGE").map(String::as_str);
    Some(match (keys.get("TYPE"), usage, keys.get("PTTYPE")) {
        (Some(t), Some("filesystem"), _) => Content::Filesystem(t.clone()),
        (Some(t), _, _) => Content::Other(t.clone()),
        (None, _, Some(pt)) => Content::Other(format!("{pt} partition table")),
        (None, _, None) if keys.is_empty() => Content::Blank,
        (None, _, None) => Content::Other("unknown signature".into()),
    })
}

/// The mkfs command for `fs`, or `None` when the node does not make that file system.
/// `mkfs.ext4 -F` (no prompt for a whole device); `mkfs.xfs` without `-f`, so it refuses a
/// device it finds a signature on (the node only formats what blkid found blank).
pub fn mkfs(fs: &str, device: &Path) -> Option<Cmd> {
    let cmd = match fs {
        "ext4" => Cmd::new("mkfs.ext4").arg("-F"),
        "xfs" => Cmd::new("mkfs.xfs"),
        _ => return None,
    };
    Some(cmd.timeout(FS_TIMEOUT).arg(path_arg(device)))
}

/// `mount -c -t FS [-o OPTIONS] SOURCE TARGET`. `-c` (`--no-canonicalize`) keeps `SOURCE`
/// as given in the mount table, so a `/dev/disk/by-path` name, which says which target and
/// LUN the file system lives on, stays readable there after the disk is gone. The options
/// (CSI mount flags "may hold sensitive data") are redacted from logs.
pub fn mount(source: &Path, target: &Path, fs: &str, options: &[String]) -> Cmd {
    let mut c = Cmd::new("mount")
        .timeout(TOOL_TIMEOUT)
        .args(["-c", "-t", fs]);
    if !options.is_empty() {
        c = c.arg("-o").secret_arg(options.join(","));
    }
    c.arg(path_arg(source)).arg(path_arg(target))
}

/// `mount --bind SOURCE TARGET`.
pub fn bind(source: &Path, target: &Path) -> Cmd {
    Cmd::new("mount")
        .timeout(TOOL_TIMEOUT)
        .arg("--bind")
        .arg(path_arg(source))
        .arg(path_arg(target))
}

/// `mount -o remount,bind,ro TARGET`: makes a bind mount read-only (a bind takes the flags
/// of its source; read-only needs this second step).
pub fn remount_bind_readonly(target: &Path) -> Cmd {
    Cmd::new("mount")
        .timeout(TOOL_TIMEOUT)
        .args(["-o", "remount,bind,ro"])
        .arg(path_arg(target))
}

/// `umount TARGET`.
pub fn umount(target: &Path) -> Cmd {
    Cmd::new("umount")
        .timeout(TOOL_TIMEOUT)
        .arg(path_arg(target))
}

/// True when a failed umount said the path is not mounted (exit [`MOUNT_EX_FAIL`] and
/// util-linux's "not mounted" message): the goal is reached.
pub fn umount_not_mounted(code: i32, stderr: &str) -> bool {
    code == MOUNT_EX_FAIL && stderr.contains("not mounted")
}

/// `resize2fs DEVICE`: grows a mounted ext4 online to the size of its device.
pub fn resize2fs(device: &Path) -> Cmd {
    Cmd::new("resize2fs")
        .timeout(FS_TIMEOUT)
        .arg(path_arg(device))
}

/// True when resize2fs refused because the file system must be checked first (captured:
/// `resize2fs-errors.stderr`).
pub fn resize2fs_needs_check(stderr: &str) -> bool {
    stderr.contains("Please run 'e2fsck")
}

/// `xfs_growfs -d MOUNTPOINT`: grows a mounted XFS's data section to its device's size.
pub fn xfs_growfs(mount_point: &Path) -> Cmd {
    Cmd::new("xfs_growfs")
        .timeout(FS_TIMEOUT)
        .arg("-d")
        .arg(path_arg(mount_point))
}

/// `dumpe2fs -h DEVICE`: the superblock of an ext2/3/4 ([`parse_ext4_state`]).
pub fn dumpe2fs(device: &Path) -> Cmd {
    Cmd::new("dumpe2fs")
        .timeout(TOOL_TIMEOUT)
        .arg("-h")
        .arg(path_arg(device))
}

/// The `Filesystem state:` of `dumpe2fs -h`: `clean`, `not clean`, `clean with errors`, ...
pub fn parse_ext4_state(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("Filesystem state:"))
        .map(|v| v.trim().to_owned())
}

/// `blockdev --getsize64 DEVICE`: the size in bytes, on one line.
pub fn getsize64(device: &Path) -> Cmd {
    Cmd::new("blockdev")
        .timeout(TOOL_TIMEOUT)
        .arg("--getsize64")
        .arg(path_arg(device))
}

/// Parses `blockdev --getsize64` output.
pub fn parse_size(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// `blockdev --flushbufs DEVICE`: writes the device's dirty buffers and drops its cache.
pub fn flushbufs(device: &Path) -> Cmd {
    Cmd::new("blockdev")
        .timeout(TOOL_TIMEOUT)
        .arg("--flushbufs")
        .arg(path_arg(device))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/mount")
            .join(name);
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    fn rc(name: &str) -> i32 {
        fixture(&format!("{name}.rc")).trim().parse().unwrap()
    }

    #[test]
    fn blkid_captures() {
        let cases = [
            ("blkid-blank", Content::Blank),
            ("blkid-ext4", Content::Filesystem("ext4".into())),
            ("blkid-swap", Content::Other("swap".into())),
        ];
        for (name, want) in cases {
            let out = fixture(&format!("{name}.txt"));
            assert_eq!(content(rc(name), &out), Some(want), "{name}");
        }
        let keys = parse_blkid(&fixture("blkid-ext4.txt"));
        assert_eq!(keys.get("DEVNAME").map(String::as_str), Some("ext4.img"));
    }

    #[test]
    fn blkid_hand_written_cases() {
        // blkid(8): exit 8 on an ambivalent probe; a GPT disk reports PTTYPE only.
        let cases = [
            (8, "", Some(Content::Other("ambivalent signatures".into()))),
            (
                0,
                "DEVNAME=/dev/sdc\nPTUUID=1b2c\nPTTYPE=gpt\n",
                Some(Content::Other("gpt partition table".into())),
            ),
            (
                0,
                "DEVNAME=/dev/sdc\nTYPE=LVM2_member\nUSAGE=raid\n",
                Some(Content::Other("LVM2_member".into())),
            ),
            (
                0,
                "DEVNAME=/dev/sdc\nTYPE=xfs\nUSAGE=filesystem\n",
                Some(Content::Filesystem("xfs".into())),
            ),
            (4, "", None),
        ];
        for (code, out, want) in cases {
            assert_eq!(content(code, out), want, "{code} {out:?}");
        }
    }

    #[test]
    fn ext4_state_captures() {
        assert_eq!(
            parse_ext4_state(&fixture("dumpe2fs-clean.txt")).as_deref(),
            Some("clean")
        );
        assert_eq!(
            parse_ext4_state(&fixture("dumpe2fs-errors.txt")).as_deref(),
            Some("clean with errors")
        );
        assert_eq!(parse_ext4_state("nothing"), None);
    }

    #[test]
    fn resize2fs_refusal_capture() {
        assert_eq!(rc("resize2fs-errors"), 1);
        assert!(resize2fs_needs_check(&fixture("resize2fs-errors.stderr")));
        assert!(!resize2fs_needs_check("resize2fs 1.47.0 (5-Feb-2023)\n"));
    }

    #[test]
    fn umount_not_mounted_table() {
        assert!(umount_not_mounted(32, "umount: /mnt/x: not mounted.\n"));
        assert!(!umount_not_mounted(32, "umount: /mnt/x: target is busy.\n"));
        assert!(!umount_not_mounted(1, "not mounted"));
    }

    #[test]
    fn argv() {
        let dev = Path::new("/dev/disk/by-path/ip-10.0.0.1:3260-iscsi-iqn.x:y-lun-1");
        let mnt = Path::new("/var/lib/kubelet/stage/pv1");
        let cases = [
            (blkid(dev), format!("blkid -p -o export {}", dev.display())),
            (
                mkfs("ext4", dev).unwrap(),
                format!("mkfs.ext4 -F {}", dev.display()),
            ),
            (
                mkfs("xfs", dev).unwrap(),
                format!("mkfs.xfs {}", dev.display()),
            ),
            (
                mount(dev, mnt, "ext4", &["noatime".into(), "discard".into()]),
                format!(
                    "mount -c -t ext4 -o *** {} {}",
                    dev.display(),
                    mnt.display()
                ),
            ),
            (
                mount(dev, mnt, "xfs", &[]),
                format!("mount -c -t xfs {} {}", dev.display(), mnt.display()),
            ),
            (
                bind(mnt, Path::new("/t")),
                format!("mount --bind {} /t", mnt.display()),
            ),
            (
                remount_bind_readonly(Path::new("/t")),
                "mount -o remount,bind,ro /t".to_owned(),
            ),
            (umount(mnt), format!("umount {}", mnt.display())),
            (
                resize2fs(Path::new("/dev/sdc")),
                "resize2fs /dev/sdc".to_owned(),
            ),
            (xfs_growfs(mnt), format!("xfs_growfs -d {}", mnt.display())),
            (
                dumpe2fs(Path::new("/dev/sdc")),
                "dumpe2fs -h /dev/sdc".to_owned(),
            ),
            (
                getsize64(Path::new("/dev/sdc")),
                "blockdev --getsize64 /dev/sdc".to_owned(),
            ),
            (
                flushbufs(Path::new("/dev/sdc")),
                "blockdev --flushbufs /dev/sdc".to_owned(),
            ),
        ];
        for (cmd, want) in cases {
            assert_eq!(cmd.display(), want);
        }
        assert_eq!(mkfs("btrfs", dev).map(|c| c.display()), None);
        let m = mount(dev, mnt, "ext4", &["noatime".into(), "discard".into()]);
        assert_eq!(m.argv()[4], "noatime,discard");
        assert_eq!(parse_size("1073741824\n"), Some(1 << 30));
        assert_eq!(parse_size("x"), None);
    }
}
