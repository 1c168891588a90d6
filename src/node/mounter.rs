//! The `Mounter` seam: the mount table, file systems and the paths the CO hands over. The
//! real implementation is [`LinuxMounter`] (mount tools through [`Runner`], mountinfo,
//! statvfs); tests use [`super::fake::FakeHost`].

use std::path::{Path, PathBuf};

use super::mountinfo::{self, MountEntry};
use crate::exec::mount::{self as tools, Content};
use crate::exec::{Cmd, ExecError, Output, Runner};
use crate::types::Bytes;

/// Failures of the mounter seam.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// A tool could not be run, timed out or failed.
    #[error("{op}")]
    Exec {
        /// What was being done.
        op: String,
        /// Why.
        #[source]
        source: ExecError,
    },
    /// The file system must be checked (fsck) before it can be resized.
    #[error("{device}: file system needs a check: {reason}")]
    NeedsCheck {
        /// The device.
        device: PathBuf,
        /// The tool's words.
        reason: String,
    },
    /// The node cannot make or grow this file system type.
    #[error("file system type {0:?} is not supported (ext4, xfs)")]
    Unsupported(String),
    /// A path could not be read, created or removed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Tool output or the mount table did not read as expected.
    #[error("cannot parse {what}: {reason}")]
    Parse {
        /// What was read.
        what: &'static str,
        /// What was wrong.
        reason: String,
    },
}

/// statvfs(3) of a mounted file system.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FsStats {
    /// Size in bytes.
    pub total_bytes: u64,
    /// Free for unprivileged users.
    pub available_bytes: u64,
    /// Free in all.
    pub free_bytes: u64,
    /// Inodes.
    pub total_inodes: u64,
    /// Free inodes.
    pub free_inodes: u64,
}

/// What a file system's own metadata says about its health.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FsState {
    /// Nothing recorded against it.
    Clean,
    /// Errors are recorded: it must be checked (fsck) before it is resized.
    NeedsCheck(String),
    /// The type keeps no such state (xfs), or it could not be read.
    Unknown,
}

/// The host's mounts and file systems.
#[async_trait::async_trait]
pub trait Mounter: Send + Sync {
    /// The mount table.
    async fn mounts(&self) -> Result<Vec<MountEntry>, MountError>;

    /// What is on a device.
    async fn probe(&self, device: &Path) -> Result<Content, MountError>;

    /// Makes a file system (`ext4` or `xfs`) on a blank device.
    async fn mkfs(&self, device: &Path, fs: &str) -> Result<(), MountError>;

    /// Mounts a device's file system, keeping `source` as given in the mount table.
    async fn mount(
        &self,
        source: &Path,
        target: &Path,
        fs: &str,
        options: &[String],
    ) -> Result<(), MountError>;

    /// Bind-mounts a directory or a device node.
    async fn bind(&self, source: &Path, target: &Path) -> Result<(), MountError>;

    /// Makes a bind mount read-only.
    async fn remount_readonly(&self, target: &Path) -> Result<(), MountError>;

    /// Unmounts; a path that is not mounted is success.
    async fn unmount(&self, target: &Path) -> Result<(), MountError>;

    /// Creates a directory (and its parents); existing is success.
    async fn make_dir(&self, path: &Path) -> Result<(), MountError>;

    /// Creates an empty file (a block volume's mount point); existing is success.
    async fn make_file(&self, path: &Path) -> Result<(), MountError>;

    /// Removes a file or an empty directory; absent is success.
    async fn remove(&self, path: &Path) -> Result<(), MountError>;

    /// Whether a path exists.
    async fn exists(&self, path: &Path) -> Result<bool, MountError>;

    /// The names in a directory; an absent directory has none.
    async fn list_dir(&self, path: &Path) -> Result<Vec<String>, MountError>;

    /// statvfs of a mounted file system.
    async fn fs_stats(&self, path: &Path) -> Result<FsStats, MountError>;

    /// A block device's size (`blockdev --getsize64`).
    async fn device_size(&self, device: &Path) -> Result<Bytes, MountError>;

    /// The health its metadata records.
    async fn fs_state(&self, device: &Path, fs: &str) -> Result<FsState, MountError>;

    /// Grows a mounted file system to its device's size.
    async fn grow_fs(&self, device: &Path, mount_point: &Path, fs: &str) -> Result<(), MountError>;
}

/// The real mounter: util-linux, e2fsprogs and xfsprogs through [`Runner`] (so behind the
/// configured `exec_prefix`), the mount table from `/proc/self/mountinfo`, statvfs(2) and
/// file operations in this process. The CO's paths (kubelet's directory) must therefore be
/// the same inside and outside the prefix, as they are with the usual bidirectional mount
/// of kubelet's directory into a node plugin.
#[derive(Clone, Debug)]
pub struct LinuxMounter {
    runner: Runner,
    mountinfo: PathBuf,
}

impl LinuxMounter {
    /// Runs tools with `runner`, reads `/proc/self/mountinfo`.
    pub fn new(runner: Runner) -> Self {
        LinuxMounter {
            runner,
            mountinfo: PathBuf::from("/proc/self/mountinfo"),
        }
    }

    async fn run(&self, op: String, cmd: &Cmd) -> Result<Output, MountError> {
        self.runner
            .run(cmd)
            .await
            .map_err(|source| MountError::Exec { op, source })
    }

    async fn run_ok(&self, op: String, cmd: &Cmd) -> Result<Output, MountError> {
        let out = self.run(op.clone(), cmd).await?;
        out.check(cmd.program())
            .map_err(|source| MountError::Exec { op, source })
    }
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> MountError {
    let path = path.to_owned();
    move |source| MountError::Io { op, path, source }
}

#[async_trait::async_trait]
impl Mounter for LinuxMounter {
    async fn mounts(&self) -> Result<Vec<MountEntry>, MountError> {
        let text = tokio::fs::read_to_string(&self.mountinfo)
            .await
            .map_err(io("read", &self.mountinfo))?;
        mountinfo::parse(&text).map_err(|e| MountError::Parse {
            what: "mountinfo",
            reason: e.to_string(),
        })
    }

    async fn probe(&self, device: &Path) -> Result<Content, MountError> {
        let cmd = tools::blkid(device);
        let op = format!("probe {}", device.display());
        let out = self.run(op.clone(), &cmd).await?;
        tools::content(out.code, &out.stdout).ok_or_else(|| MountError::Exec {
            op,
            source: ExecError::Failed {
                program: cmd.program().to_owned(),
                code: out.code,
                stderr: out.stderr.trim().to_owned(),
            },
        })
    }

    async fn mkfs(&self, device: &Path, fs: &str) -> Result<(), MountError> {
        let cmd = tools::mkfs(fs, device).ok_or_else(|| MountError::Unsupported(fs.to_owned()))?;
        self.run_ok(format!("make {fs} on {}", device.display()), &cmd)
            .await
            .map(drop)
    }

    async fn mount(
        &self,
        source: &Path,
        target: &Path,
        fs: &str,
        options: &[String],
    ) -> Result<(), MountError> {
        let cmd = tools::mount(source, target, fs, options);
        let op = format!("mount {} on {}", source.display(), target.display());
        self.run_ok(op, &cmd).await.map(drop)
    }

    async fn bind(&self, source: &Path, target: &Path) -> Result<(), MountError> {
        let op = format!("bind {} on {}", source.display(), target.display());
        self.run_ok(op, &tools::bind(source, target))
            .await
            .map(drop)
    }

    async fn remount_readonly(&self, target: &Path) -> Result<(), MountError> {
        let op = format!("remount {} read-only", target.display());
        self.run_ok(op, &tools::remount_bind_readonly(target))
            .await
            .map(drop)
    }

    async fn unmount(&self, target: &Path) -> Result<(), MountError> {
        let cmd = tools::umount(target);
        let op = format!("unmount {}", target.display());
        let out = self.run(op.clone(), &cmd).await?;
        if out.success() || tools::umount_not_mounted(out.code, &out.stderr) {
            return Ok(());
        }
        out.check(cmd.program())
            .map(drop)
            .map_err(|source| MountError::Exec { op, source })
    }

    async fn make_dir(&self, path: &Path) -> Result<(), MountError> {
        tokio::fs::create_dir_all(path)
            .await
            .map_err(io("create directory", path))
    }

    async fn make_file(&self, path: &Path) -> Result<(), MountError> {
        if let Some(parent) = path.parent() {
            self.make_dir(parent).await?;
        }
        tokio::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .await
            .map(drop)
            .map_err(io("create file", path))
    }

    async fn remove(&self, path: &Path) -> Result<(), MountError> {
        let meta = match tokio::fs::symlink_metadata(path).await {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io("inspect", path)(e)),
        };
        let r = if meta.is_dir() {
            tokio::fs::remove_dir(path).await
        } else {
            tokio::fs::remove_file(path).await
        };
        match r {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other.map_err(io("remove", path)),
        }
    }

    async fn exists(&self, path: &Path) -> Result<bool, MountError> {
        tokio::fs::try_exists(path)
            .await
            .map_err(io("inspect", path))
    }

    async fn list_dir(&self, path: &Path) -> Result<Vec<String>, MountError> {
        let mut dir = match tokio::fs::read_dir(path).await {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io("list", path)(e)),
        };
        let mut names = Vec::new();
        while let Some(entry) = dir.next_entry().await.map_err(io("list", path))? {
            if let Some(n) = entry.file_name().to_str() {
                names.push(n.to_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    async fn fs_stats(&self, path: &Path) -> Result<FsStats, MountError> {
        let p = path.to_owned();
        let st = tokio::task::spawn_blocking(move || rustix::fs::statvfs(&p))
            .await
            .map_err(|e| io("statvfs", path)(std::io::Error::other(e.to_string())))?
            .map_err(|e| io("statvfs", path)(e.into()))?;
        let frsize = st.f_frsize;
        Ok(FsStats {
            total_bytes: st.f_blocks.saturating_mul(frsize),
            available_bytes: st.f_bavail.saturating_mul(frsize),
            free_bytes: st.f_bfree.saturating_mul(frsize),
            total_inodes: st.f_files,
            free_inodes: st.f_ffree,
        })
    }

    async fn device_size(&self, device: &Path) -> Result<Bytes, MountError> {
        let cmd = tools::getsize64(device);
        let out = self
            .run_ok(format!("size of {}", device.display()), &cmd)
            .await?;
        tools::parse_size(&out.stdout)
            .map(Bytes)
            .ok_or_else(|| MountError::Parse {
                what: "blockdev --getsize64",
                reason: format!("{:?} is not a size", out.stdout.trim()),
            })
    }

    async fn fs_state(&self, device: &Path, fs: &str) -> Result<FsState, MountError> {
        if !matches!(fs, "ext4" | "ext3" | "ext2") {
            return Ok(FsState::Unknown);
        }
        let cmd = tools::dumpe2fs(device);
        let out = self
            .run_ok(format!("read the superblock of {}", device.display()), &cmd)
            .await?;
        Ok(match tools::parse_ext4_state(&out.stdout) {
            // "not clean" alone is how a mounted ext2 (no journal) looks: only recorded
            // errors ("clean with errors", "not clean with errors") call for a check.
            Some(s) if s.contains("error") => {
                FsState::NeedsCheck(format!("file system state is {s:?}"))
            }
            Some(_) => FsState::Clean,
            None => FsState::Unknown,
        })
    }

    async fn grow_fs(&self, device: &Path, mount_point: &Path, fs: &str) -> Result<(), MountError> {
        let (cmd, op) = match fs {
            "ext4" | "ext3" | "ext2" => (
                tools::resize2fs(device),
                format!("grow {fs} on {}", device.display()),
            ),
            "xfs" => (
                tools::xfs_growfs(mount_point),
                format!("grow xfs at {}", mount_point.display()),
            ),
            other => return Err(MountError::Unsupported(other.to_owned())),
        };
        let out = self.run(op.clone(), &cmd).await?;
        if !out.success() && tools::resize2fs_needs_check(&out.stderr) {
            return Err(MountError::NeedsCheck {
                device: device.to_owned(),
                reason: out.stderr.trim().to_owned(),
            });
        }
        out.check(cmd.program())
            .map(drop)
            .map_err(|source| MountError::Exec { op, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn paths_and_stats_on_this_host() {
        let dir = tempfile::tempdir().unwrap();
        let m = LinuxMounter::new(Runner::default());
        let d = dir.path().join("a/b");
        let f = dir.path().join("c/file");
        m.make_dir(&d).await.unwrap();
        m.make_dir(&d).await.unwrap();
        m.make_file(&f).await.unwrap();
        m.make_file(&f).await.unwrap();
        assert_eq!(
            m.list_dir(&dir.path().join("c")).await.unwrap(),
            vec!["file"]
        );
        assert_eq!(
            m.list_dir(&dir.path().join("none")).await.unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(
            (m.exists(&d).await.unwrap(), m.exists(&f).await.unwrap()),
            (true, true)
        );
        m.remove(&f).await.unwrap();
        m.remove(&d).await.unwrap();
        m.remove(&d).await.unwrap();
        assert_eq!(
            (m.exists(&d).await.unwrap(), m.exists(&f).await.unwrap()),
            (false, false)
        );
        let st = m.fs_stats(dir.path()).await.unwrap();
        assert!(
            st.total_bytes >= st.free_bytes && st.free_bytes >= st.available_bytes,
            "{st:?}"
        );
        let table = m.mounts().await.unwrap();
        assert!(
            table.iter().any(|e| e.mount_point == Path::new("/")),
            "root is mounted"
        );
    }

    #[tokio::test]
    async fn ext4_state_and_probe_of_an_image_file() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("fs.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(32 << 20)
            .unwrap();
        let m = LinuxMounter::new(Runner::default());
        assert_eq!(m.probe(&img).await.unwrap(), Content::Blank);
        m.mkfs(&img, "ext4").await.unwrap();
        assert_eq!(
            m.probe(&img).await.unwrap(),
            Content::Filesystem("ext4".into())
        );
        assert_eq!(m.fs_state(&img, "ext4").await.unwrap(), FsState::Clean);
        assert_eq!(m.fs_state(&img, "xfs").await.unwrap(), FsState::Unknown);
        assert!(matches!(
            m.mkfs(&img, "btrfs").await,
            Err(MountError::Unsupported(_))
        ));
    }
}
