//! The `file` pool: volumes are sparse files in a directory, exported by tgt as file-backed
//! LUNs (Cinder's NFS-driver idea). It works wherever device-mapper is missing.
//!
//! Layout: `volume-<id>.img` holds the data and `volume-<id>.json` describes it; snapshots
//! are `snapshot-<id>.img` / `.json`. The JSON file is the commit record: it is written
//! atomically (temporary file, fsync, rename, fsync of the directory) after the data file is
//! complete, and removed first on delete. An image without its JSON is the remains of an
//! interrupted create and is removed by [`FilePool::open`].

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::backend::{
    Backend, Capacity, NewSnapshot, NewVolume, PoolStats, SnapshotRecord, Source, VolumeRecord,
};
use super::{data, tracking, AgentError, SnapshotId, VolumeId};
use crate::config::{PoolConfig, PoolKindConfig};
use crate::types::Bytes;

/// Allocation unit of file pools.
pub const FILE_EXTENT: Bytes = Bytes::mib(1);

/// Version of the metadata file format.
const META_VERSION: u32 = 1;

/// A file pool.
#[derive(Debug)]
pub struct FilePool {
    name: String,
    dir: PathBuf,
    capacity: Option<u64>,
    /// Whether the directory's file system makes reflinks (probed once, when first asked).
    reflinks: OnceLock<bool>,
    /// The images' extent maps, kept while they do not change (see [`Self::stats`]).
    maps: Arc<tracking::ExtentCache>,
    /// The last shared allocation counted from exactly the kept maps, with the cache's
    /// generation then: reused while it is the same. Locked for a read or a store, never
    /// while counting.
    counted: Arc<Mutex<Option<Counted>>>,
}

/// A pool's shared allocation (all bytes, markers' own bytes), with what it was counted
/// from: the extent cache's generation and which images were markers (a snapshot becomes one
/// without a change to its image).
#[derive(Debug)]
struct Counted {
    generation: u64,
    markers: Vec<PathBuf>,
    sums: (u64, u64),
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct VolumeMeta {
    version: u32,
    id: String,
    size: u64,
    volume_type: String,
    #[serde(default)]
    source_snapshot: Option<String>,
    #[serde(default)]
    source_volume: Option<String>,
    #[serde(default)]
    exported_to: Vec<String>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    created_at: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotMeta {
    version: u32,
    id: String,
    source_volume: String,
    size: u64,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    created_at: u64,
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn from_unix(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// Writes `bytes` to `path` atomically and durably.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), AgentError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = std::fs::File::create(&tmp).map_err(AgentError::io("create", &tmp))?;
    f.write_all(bytes).map_err(AgentError::io("write", &tmp))?;
    f.sync_all().map_err(AgentError::io("fsync", &tmp))?;
    std::fs::rename(&tmp, path).map_err(AgentError::io("rename", path))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), AgentError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(AgentError::io("fsync", dir))
}

fn remove_if_exists(path: &Path) -> Result<bool, AgentError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(AgentError::io("remove", path)(e)),
    }
}

/// A metadata file, parsed (`None` when absent).
fn read_meta<T: serde::de::DeserializeOwned>(p: &Path) -> Result<Option<T>, AgentError> {
    match std::fs::read(p) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| AgentError::Parse {
                tool: "file pool metadata",
                reason: format!("{}: {e}", p.display()),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(AgentError::io("read", p)(e)),
    }
}

/// Writes a metadata file atomically.
fn write_meta<T: Serialize>(p: &Path, m: &T) -> Result<(), AgentError> {
    let bytes = serde_json::to_vec_pretty(m).map_err(|e| AgentError::Parse {
        tool: "file pool metadata",
        reason: e.to_string(),
    })?;
    write_atomic(p, &bytes)
}

/// Runs blocking file work off the async runtime.
async fn blocking<T, F>(f: F) -> Result<T, AgentError>
where
    F: FnOnce() -> Result<T, AgentError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(AgentError::Io {
            op: "join",
            path: PathBuf::new(),
            source: std::io::Error::other(e.to_string()),
        })
    })
}

impl FilePool {
    /// A file pool from its configuration (`kind = "file"`, `path` set).
    pub fn new(cfg: &PoolConfig) -> Result<Self, AgentError> {
        let dir = cfg.path.clone().ok_or_else(|| {
            AgentError::InvalidArgument(format!("file pool {} has no path", cfg.name))
        })?;
        Ok(Self::at(&cfg.name, dir, cfg.capacity_bytes))
    }

    /// The pool `name` over `dir`, nothing probed or cached yet.
    fn at(name: &str, dir: PathBuf, capacity: Option<u64>) -> Self {
        FilePool {
            name: name.to_owned(),
            dir,
            capacity,
            reflinks: OnceLock::new(),
            maps: Arc::new(tracking::ExtentCache::new(
                tracking::ExtentCache::SETTLED,
                tracking::ExtentCache::MAX_EXTENTS,
            )),
            counted: Arc::new(Mutex::new(None)),
        }
    }

    fn vol_img(&self, id: &VolumeId) -> PathBuf {
        self.dir.join(format!("volume-{id}.img"))
    }

    fn vol_meta(&self, id: &VolumeId) -> PathBuf {
        self.dir.join(format!("volume-{id}.json"))
    }

    fn snap_img(&self, id: &SnapshotId) -> PathBuf {
        self.dir.join(format!("snapshot-{id}.img"))
    }

    fn snap_meta(&self, id: &SnapshotId) -> PathBuf {
        self.dir.join(format!("snapshot-{id}.json"))
    }

    fn allocated(path: &Path) -> u64 {
        std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
    }

    fn read_volume_meta(&self, id: &VolumeId) -> Result<Option<VolumeMeta>, AgentError> {
        read_meta(&self.vol_meta(id))
    }

    fn write_volume_meta(&self, m: &VolumeMeta) -> Result<(), AgentError> {
        write_meta(&self.vol_meta(&VolumeId::parse(&m.id)?), m)
    }

    fn volume_record(&self, m: VolumeMeta) -> Result<VolumeRecord, AgentError> {
        let id = VolumeId::parse(&m.id)?;
        let source = match (&m.source_snapshot, &m.source_volume) {
            (Some(s), _) => Some(Source::Snapshot(SnapshotId::parse(s)?)),
            (None, Some(v)) => Some(Source::Volume(VolumeId::parse(v)?)),
            (None, None) => None,
        };
        Ok(VolumeRecord {
            allocated: Bytes(Self::allocated(&self.vol_img(&id))),
            id,
            pool: self.name.clone(),
            size: Bytes(m.size),
            volume_type: m.volume_type,
            source,
            exported_to: m.exported_to,
            metadata: m.metadata,
            created_at: from_unix(m.created_at),
        })
    }

    fn snapshot_record(&self, m: SnapshotMeta) -> Result<SnapshotRecord, AgentError> {
        Ok(SnapshotRecord {
            id: SnapshotId::parse(&m.id)?,
            source_volume: VolumeId::parse(&m.source_volume)?,
            pool: self.name.clone(),
            size: Bytes(m.size),
            metadata: m.metadata,
            created_at: from_unix(m.created_at),
        })
    }

    /// Names in the pool directory with a given prefix and suffix (the id in between).
    fn ids_with(&self, prefix: &str, suffix: &str) -> Result<Vec<String>, AgentError> {
        let mut out = Vec::new();
        let rd = std::fs::read_dir(&self.dir).map_err(AgentError::io("list", &self.dir))?;
        for entry in rd {
            let entry = entry.map_err(AgentError::io("list", &self.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(id) = name
                .strip_prefix(prefix)
                .and_then(|r| r.strip_suffix(suffix))
            {
                out.push(id.to_owned());
            }
        }
        out.sort();
        Ok(out)
    }

    /// Whether the pool's directory takes reflinks: clones a small probe file (no, when the
    /// probe cannot even be written).
    fn probe_reflinks(&self) -> bool {
        let (probe, clone) = (
            self.dir.join(".reflink-probe.tmp"),
            self.dir.join(".reflink-probe-clone.tmp"),
        );
        let ok = std::fs::create_dir_all(&self.dir).is_ok()
            && std::fs::write(&probe, [1u8; 4096]).is_ok()
            && reflink_copy::reflink(&probe, &clone).is_ok();
        let _ = remove_if_exists(&clone);
        let _ = remove_if_exists(&probe);
        tracing::info!(pool = %self.name, reflinks = ok, "change tracking for incremental backups {}", if ok { "possible: snapshots are reflinks" } else { "off: the file system makes no reflinks" });
        ok
    }

    /// Where snapshots are reflinks, the bytes the pool's images occupy with each shared
    /// block counted once (by `FIEMAP`; a sum of the files' own allocations counts a block
    /// once per file sharing it), and of those the bytes only change-tracking markers hold.
    /// `None` without reflinks (each file's blocks are its own) or when an image cannot be
    /// mapped (deleted meanwhile): the caller sums the files' allocations instead. The maps
    /// are read on a blocking thread, and kept while their files do not change: mapping a
    /// pool of many fragmented images takes a while.
    async fn shared_allocation(
        &self,
        vols: &[VolumeRecord],
        snaps: &[SnapshotRecord],
    ) -> Option<(u64, u64)> {
        if !self.tracks_changes() {
            return None;
        }
        let kept: Vec<PathBuf> = vols
            .iter()
            .map(|v| self.vol_img(&v.id))
            .chain(
                snaps
                    .iter()
                    .filter(|s| s.marker_of().is_none())
                    .map(|s| self.snap_img(&s.id)),
            )
            .collect();
        let mut markers: Vec<PathBuf> = snaps
            .iter()
            .filter(|s| s.marker_of().is_some())
            .map(|s| self.snap_img(&s.id))
            .collect();
        markers.sort();
        let (cache, counted) = (self.maps.clone(), self.counted.clone());
        let count = move || {
            let n = kept.len();
            let (maps, generation) = cache.maps(&[kept, markers.clone()].concat()).ok()?;
            let reuse = |c: &Counted| Some(c.generation) == generation && c.markers == markers;
            let last = counted.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(c) = last.as_ref().filter(|c| reuse(c)) {
                return Some(c.sums);
            }
            drop(last);
            let (own, theirs) = maps.split_at(n);
            let all = tracking::distinct_bytes(own.iter().chain(theirs).flat_map(|m| m.iter()));
            let own = tracking::distinct_bytes(own.iter().flat_map(|m| m.iter()));
            let sums = (all, all.saturating_sub(own));
            if let Some(generation) = generation {
                *counted.lock().unwrap_or_else(PoisonError::into_inner) = Some(Counted {
                    generation,
                    markers,
                    sums,
                });
            }
            Some(sums)
        };
        tokio::task::spawn_blocking(count).await.ok().flatten()
    }

    /// Makes `dst` a copy of `src` sized `size`: a reflink where the filesystem can, else a
    /// sparse-aware copy. Written under a temporary name and renamed into place.
    fn clone_file(src: &Path, dst: &Path, size: u64) -> Result<(), AgentError> {
        let dir = dst.parent().unwrap_or(Path::new("."));
        let tmp = dir.join(format!(
            ".{}.tmp",
            dst.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ));
        remove_if_exists(&tmp)?;
        if reflink_copy::reflink(src, &tmp).is_err() {
            let f = std::fs::File::create(&tmp).map_err(AgentError::io("create", &tmp))?;
            f.set_len(data::device_size(src)?)
                .map_err(AgentError::io("truncate", &tmp))?;
            drop(f);
            data::copy_sparse(src, &tmp, true)?;
        }
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&tmp)
            .map_err(AgentError::io("open", &tmp))?;
        if f.metadata().map_err(AgentError::io("stat", &tmp))?.len() < size {
            f.set_len(size).map_err(AgentError::io("truncate", &tmp))?;
        }
        f.sync_all().map_err(AgentError::io("fsync", &tmp))?;
        std::fs::rename(&tmp, dst).map_err(AgentError::io("rename", dst))
    }
}

#[tonic::async_trait]
impl Backend for FilePool {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> PoolKindConfig {
        PoolKindConfig::File
    }

    fn extent(&self) -> Bytes {
        FILE_EXTENT
    }

    fn fresh_reads_zero(&self) -> bool {
        true
    }

    async fn open(&self) -> Result<(), AgentError> {
        std::fs::create_dir_all(&self.dir).map_err(AgentError::io("create", &self.dir))?;
        // Remains of interrupted operations: temporary files, and images whose commit record
        // (the JSON file) was never written or was already removed by a delete.
        let rd = std::fs::read_dir(&self.dir).map_err(AgentError::io("list", &self.dir))?;
        for entry in rd {
            let entry = entry.map_err(AgentError::io("list", &self.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let orphan = if name.starts_with('.') && name.ends_with(".tmp") {
                true
            } else if let Some(stem) = name.strip_suffix(".img") {
                !self.dir.join(format!("{stem}.json")).exists()
            } else {
                false
            };
            if orphan {
                tracing::warn!(pool = %self.name, file = %name, "removing leftover of an interrupted operation");
                remove_if_exists(&entry.path())?;
            }
        }
        self.tracks_changes();
        Ok(())
    }

    async fn stats(&self) -> Result<PoolStats, AgentError> {
        let vols = self.volumes().await?;
        let mut snaps = self.snapshots().await?;
        let shared = self.shared_allocation(&vols, &snaps).await;
        snaps.retain(|s| s.marker_of().is_none());
        let provisioned: u64 = vols
            .iter()
            .map(|v| v.size.0)
            .chain(snaps.iter().map(|s| s.size.0))
            .sum();
        let (allocated, tracking) = match shared {
            Some((all, markers)) => (all, Some(Bytes(markers))),
            None => (
                vols.iter().map(|v| v.allocated.0).sum::<u64>()
                    + snaps
                        .iter()
                        .map(|s| Self::allocated(&self.snap_img(&s.id)))
                        .sum::<u64>(),
                None,
            ),
        };
        let vfs = rustix::fs::statvfs(&self.dir)
            .map_err(|e| AgentError::io("statvfs", &self.dir)(e.into()))?;
        let fs_total = vfs.f_blocks * vfs.f_frsize;
        let fs_free = vfs.f_bavail * vfs.f_frsize;
        let (total, free) = match self.capacity {
            Some(cap) => (cap, cap.saturating_sub(allocated).min(fs_free)),
            None => (fs_total, fs_free),
        };
        Ok(PoolStats {
            total: Capacity::Known(Bytes(total)),
            free: Capacity::Known(Bytes(free)),
            provisioned: Bytes(provisioned),
            allocated: Bytes(allocated),
            volume_count: vols.len() as u32,
            snapshot_count: snaps.len() as u32,
            tracking,
        })
    }

    async fn volumes(&self) -> Result<Vec<VolumeRecord>, AgentError> {
        let mut out = Vec::new();
        for raw in self.ids_with("volume-", ".json")? {
            let Ok(id) = VolumeId::parse(&raw) else {
                continue;
            };
            if let Some(m) = self.read_volume_meta(&id)? {
                out.push(self.volume_record(m)?);
            }
        }
        Ok(out)
    }

    async fn snapshots(&self) -> Result<Vec<SnapshotRecord>, AgentError> {
        let mut out = Vec::new();
        for raw in self.ids_with("snapshot-", ".json")? {
            let Ok(id) = SnapshotId::parse(&raw) else {
                continue;
            };
            if let Some(m) = read_meta::<SnapshotMeta>(&self.snap_meta(&id))? {
                out.push(self.snapshot_record(m)?);
            }
        }
        Ok(out)
    }

    async fn create(&self, new: &NewVolume) -> Result<VolumeRecord, AgentError> {
        let img = self.vol_img(&new.id);
        let size = new.size.0;
        let src = match &new.source {
            None => None,
            Some(Source::Snapshot(s)) => {
                if !self.snap_meta(s).exists() {
                    return Err(AgentError::SnapshotNotFound(s.clone()));
                }
                Some(self.snap_img(s))
            }
            Some(Source::Volume(v)) => {
                if !self.vol_meta(v).exists() {
                    return Err(AgentError::VolumeNotFound(v.clone()));
                }
                Some(self.vol_img(v))
            }
        };
        let img2 = img.clone();
        blocking(move || match src {
            Some(src) => FilePool::clone_file(&src, &img2, size),
            None => {
                let tmp = img2.with_extension("img.creating");
                let f = std::fs::File::create(&tmp).map_err(AgentError::io("create", &tmp))?;
                f.set_len(size).map_err(AgentError::io("truncate", &tmp))?;
                f.sync_all().map_err(AgentError::io("fsync", &tmp))?;
                std::fs::rename(&tmp, &img2).map_err(AgentError::io("rename", &img2))
            }
        })
        .await?;
        let (source_snapshot, source_volume) = match &new.source {
            Some(Source::Snapshot(s)) => (Some(s.to_string()), None),
            Some(Source::Volume(v)) => (None, Some(v.to_string())),
            None => (None, None),
        };
        let meta = VolumeMeta {
            version: META_VERSION,
            id: new.id.to_string(),
            size,
            volume_type: new.volume_type.clone(),
            source_snapshot,
            source_volume,
            exported_to: Vec::new(),
            metadata: new.metadata.clone(),
            created_at: unix_secs(SystemTime::now()),
        };
        if let Err(e) = self.write_volume_meta(&meta) {
            let _ = remove_if_exists(&img);
            return Err(e);
        }
        self.volume_record(meta)
    }

    async fn delete(&self, id: &VolumeId) -> Result<(), AgentError> {
        // The commit record goes first: a crash after it leaves an orphan image that open()
        // removes, never a described volume without data. A new file never shows old bytes,
        // so `volume_clear` needs no wipe here.
        if !remove_if_exists(&self.vol_meta(id))? {
            return Err(AgentError::VolumeNotFound(id.clone()));
        }
        sync_dir(&self.dir)?;
        remove_if_exists(&self.vol_img(id))?;
        Ok(())
    }

    async fn extend(&self, id: &VolumeId, size: Bytes) -> Result<VolumeRecord, AgentError> {
        let mut m = self
            .read_volume_meta(id)?
            .ok_or_else(|| AgentError::VolumeNotFound(id.clone()))?;
        let img = self.vol_img(id);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&img)
            .map_err(AgentError::io("open", &img))?;
        f.set_len(size.0)
            .map_err(AgentError::io("truncate", &img))?;
        f.sync_all().map_err(AgentError::io("fsync", &img))?;
        m.size = size.0;
        self.write_volume_meta(&m)?;
        self.volume_record(m)
    }

    async fn extend_needs_detach(&self, _id: &VolumeId) -> Result<bool, AgentError> {
        Ok(false)
    }

    async fn snapshot(&self, new: &NewSnapshot) -> Result<SnapshotRecord, AgentError> {
        let vm = self
            .read_volume_meta(&new.source_volume)?
            .ok_or_else(|| AgentError::VolumeNotFound(new.source_volume.clone()))?;
        let (src, dst) = (self.vol_img(&new.source_volume), self.snap_img(&new.id));
        let size = vm.size;
        let dst2 = dst.clone();
        blocking(move || FilePool::clone_file(&src, &dst2, size)).await?;
        let meta = SnapshotMeta {
            version: META_VERSION,
            id: new.id.to_string(),
            source_volume: new.source_volume.to_string(),
            size,
            metadata: new.metadata.clone(),
            created_at: unix_secs(SystemTime::now()),
        };
        if let Err(e) = write_meta(&self.snap_meta(&new.id), &meta) {
            let _ = remove_if_exists(&dst);
            return Err(e);
        }
        self.snapshot_record(meta)
    }

    async fn delete_snapshot(&self, id: &SnapshotId) -> Result<(), AgentError> {
        if !remove_if_exists(&self.snap_meta(id))? {
            return Err(AgentError::SnapshotNotFound(id.clone()));
        }
        sync_dir(&self.dir)?;
        remove_if_exists(&self.snap_img(id))?;
        Ok(())
    }

    async fn update(
        &self,
        id: &VolumeId,
        volume_type: Option<&str>,
        metadata: Option<&BTreeMap<String, String>>,
    ) -> Result<VolumeRecord, AgentError> {
        let mut m = self
            .read_volume_meta(id)?
            .ok_or_else(|| AgentError::VolumeNotFound(id.clone()))?;
        if let Some(t) = volume_type {
            m.volume_type = t.to_owned();
        }
        if let Some(md) = metadata {
            m.metadata = md.clone();
        }
        self.write_volume_meta(&m)?;
        self.volume_record(m)
    }

    async fn set_exports(&self, id: &VolumeId, initiators: &[String]) -> Result<(), AgentError> {
        let mut m = self
            .read_volume_meta(id)?
            .ok_or_else(|| AgentError::VolumeNotFound(id.clone()))?;
        m.exported_to = initiators.to_vec();
        self.write_volume_meta(&m)
    }

    fn volume_path(&self, id: &VolumeId) -> PathBuf {
        self.vol_img(id)
    }

    fn snapshot_path(&self, id: &SnapshotId) -> PathBuf {
        self.snap_img(id)
    }

    fn tracks_changes(&self) -> bool {
        *self.reflinks.get_or_init(|| self.probe_reflinks())
    }

    async fn changed_ranges(
        &self,
        before: &SnapshotId,
        after: &SnapshotId,
    ) -> Result<Option<Vec<(u64, u64)>>, AgentError> {
        if !self.tracks_changes() {
            return Ok(None);
        }
        let (a, b) = (self.snap_img(before), self.snap_img(after));
        blocking(move || {
            let size = data::device_size(&b)?;
            if data::device_size(&a)? != size {
                return Ok(None);
            }
            let (ea, eb) = (tracking::extents(&a)?, tracking::extents(&b)?);
            Ok(Some(tracking::changed(&ea, &eb, size)))
        })
        .await
    }

    async fn set_snapshot_metadata(
        &self,
        id: &SnapshotId,
        metadata: &BTreeMap<String, String>,
    ) -> Result<SnapshotRecord, AgentError> {
        let p = self.snap_meta(id);
        let mut m: SnapshotMeta =
            read_meta(&p)?.ok_or_else(|| AgentError::SnapshotNotFound(id.clone()))?;
        m.metadata = metadata.clone();
        write_meta(&p, &m)?;
        self.snapshot_record(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::backend::MARKER_KEY;

    fn pool(dir: &Path) -> FilePool {
        FilePool::at("f1", dir.to_owned(), Some(Bytes::gib(1).0))
    }

    fn vid(s: &str) -> VolumeId {
        VolumeId::parse(s).unwrap()
    }

    /// A real XFS (reflinks on) on a loop device over a sparse file in `dir`, unmounted when
    /// dropped. Needs root and xfsprogs, as the XFS tests in `tests/backup.rs`.
    struct Xfs(PathBuf);

    impl Xfs {
        fn mount(dir: &Path) -> Xfs {
            let (image, mount) = (dir.join("xfs.img"), dir.join("xfs"));
            std::fs::create_dir_all(&mount).unwrap();
            std::fs::File::create(&image)
                .and_then(|f| f.set_len(300 << 20))
                .unwrap();
            let run = |cmd: &mut std::process::Command| {
                let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
                assert!(out.status.success(), "{cmd:?}: {out:?}");
            };
            run(std::process::Command::new("mkfs.xfs")
                .args(["-q", "-m", "reflink=1"])
                .arg(&image));
            run(std::process::Command::new("mount")
                .args(["-o", "loop"])
                .arg(&image)
                .arg(&mount));
            Xfs(mount)
        }
    }

    impl Drop for Xfs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }

    #[tokio::test]
    async fn kept_extent_maps_count_the_same_and_follow_a_snapshot_turned_marker() {
        let dir = tempfile::tempdir().unwrap();
        let xfs = Xfs::mount(dir.path());
        let p = FilePool {
            dir: xfs.0.join("pool"),
            maps: Arc::new(tracking::ExtentCache::new(
                Duration::ZERO,
                tracking::ExtentCache::MAX_EXTENTS,
            )),
            ..pool(dir.path())
        };
        p.open().await.unwrap();
        let v = p.create(&new_vol("v1", 4, None)).await.unwrap();
        let write = |at: u64, mib: usize| {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(p.volume_path(&v.id))
                .unwrap();
            f.write_all_at(&vec![7u8; mib << 20], at << 20).unwrap();
        };
        write(0, 4);
        let s = p
            .snapshot(&new_snap("s1", &v.id, BTreeMap::new()))
            .await
            .unwrap();
        let space = || async {
            let st = p.stats().await.unwrap();
            (st.allocated, st.tracking, p.maps.mapped())
        };
        // The snapshot shares the volume's 4 MiB; both images mapped, then taken as kept.
        let mib = |n| Bytes::mib(n);
        assert_eq!(space().await, (mib(4), Some(Bytes(0)), 2));
        assert_eq!(space().await, (mib(4), Some(Bytes(0)), 2));
        // A rewritten MiB moves: only the volume is mapped again.
        write(1, 1);
        assert_eq!(space().await, (mib(5), Some(Bytes(0)), 3));
        // Made a marker (its record only): nothing is mapped, and the MiB only it holds now
        // counts as the marker's.
        let md = BTreeMap::from([(MARKER_KEY.to_owned(), v.id.to_string())]);
        p.set_snapshot_metadata(&s.id, &md).await.unwrap();
        assert_eq!(space().await, (mib(5), Some(Bytes::mib(1)), 3));
        // Gone: counted without it, from the map already kept.
        p.delete_snapshot(&s.id).await.unwrap();
        assert_eq!(space().await, (mib(4), Some(Bytes(0)), 3));
    }

    fn new_snap(id: &str, of: &VolumeId, metadata: BTreeMap<String, String>) -> NewSnapshot {
        NewSnapshot {
            id: SnapshotId::parse(id).unwrap(),
            source_volume: of.clone(),
            metadata,
        }
    }

    fn new_vol(id: &str, mib: u64, source: Option<Source>) -> NewVolume {
        NewVolume {
            id: vid(id),
            size: Bytes::mib(mib),
            volume_type: "default".into(),
            metadata: BTreeMap::from([("csi.name".to_owned(), "pvc-1".to_owned())]),
            source,
        }
    }

    #[tokio::test]
    async fn lifecycle_and_durable_records() {
        let dir = tempfile::tempdir().unwrap();
        let p = pool(dir.path());
        p.open().await.unwrap();
        let v = p.create(&new_vol("v1", 8, None)).await.unwrap();
        assert_eq!(
            (v.size, v.allocated, v.pool.as_str()),
            (Bytes::mib(8), Bytes(0), "f1")
        );
        std::fs::write(p.volume_path(&v.id), b"hello").unwrap();
        let s = p
            .snapshot(&new_snap("s1", &v.id, BTreeMap::new()))
            .await
            .unwrap();
        assert_eq!(s.size, Bytes::mib(8));
        let c = p
            .create(&new_vol("v2", 16, Some(Source::Snapshot(s.id.clone()))))
            .await
            .unwrap();
        assert_eq!(c.size, Bytes::mib(16));
        assert_eq!(&std::fs::read(p.volume_path(&c.id)).unwrap()[..5], b"hello");
        let e = p.extend(&v.id, Bytes::mib(32)).await.unwrap();
        assert_eq!(e.size, Bytes::mib(32));
        assert_eq!(
            data::device_size(&p.volume_path(&v.id)).unwrap(),
            32 * Bytes::MIB
        );
        p.set_exports(&v.id, &["iqn.2000-01.x:a".to_owned()])
            .await
            .unwrap();

        // A fresh FilePool over the same directory sees the same state (no memory).
        let again = pool(dir.path());
        let vols = again.volumes().await.unwrap();
        let ids: Vec<_> = vols.iter().map(|v| v.id.as_str().to_owned()).collect();
        assert_eq!(ids, vec!["v1", "v2"]);
        assert_eq!(vols[0].exported_to, vec!["iqn.2000-01.x:a".to_owned()]);
        assert_eq!(vols[1].source, Some(Source::Snapshot(s.id.clone())));
        let st = again.stats().await.unwrap();
        assert_eq!(
            (st.volume_count, st.snapshot_count, st.provisioned),
            (2, 1, Bytes::mib(32 + 16 + 8))
        );

        p.delete_snapshot(&s.id).await.unwrap();
        assert!(matches!(
            p.delete_snapshot(&s.id).await,
            Err(AgentError::SnapshotNotFound(_))
        ));
        p.delete(&c.id).await.unwrap();
        assert!(matches!(
            p.delete(&c.id).await,
            Err(AgentError::VolumeNotFound(_))
        ));
    }

    #[tokio::test]
    async fn a_marker_keeps_its_new_metadata_and_is_not_counted_in_the_stats() {
        let dir = tempfile::tempdir().unwrap();
        let p = pool(dir.path());
        p.open().await.unwrap();
        let v = p.create(&new_vol("v1", 8, None)).await.unwrap();
        std::fs::write(p.volume_path(&v.id), b"hello").unwrap();
        let temp = BTreeMap::from([("cinderblock.backup".to_owned(), "b1".to_owned())]);
        let id = p
            .snapshot(&new_snap("backup-b1", &v.id, temp))
            .await
            .unwrap()
            .id;
        assert_eq!(p.stats().await.unwrap().snapshot_count, 1);
        let marker = BTreeMap::from([(MARKER_KEY.to_owned(), "b1".to_owned())]);
        let rec = p.set_snapshot_metadata(&id, &marker).await.unwrap();
        assert_eq!(rec.metadata, marker);
        // Durable: a fresh FilePool over the directory reads it back.
        let again = pool(dir.path());
        assert_eq!(again.snapshots().await.unwrap()[0].metadata, marker);
        let st = again.stats().await.unwrap();
        assert_eq!(
            (st.snapshot_count, st.provisioned),
            (0, Bytes::mib(8)),
            "{st:?}"
        );
        assert!(matches!(
            p.set_snapshot_metadata(&SnapshotId::parse("nope").unwrap(), &marker)
                .await,
            Err(AgentError::SnapshotNotFound(_))
        ));
        // ext4 and tmpfs make no reflinks: no change tracking there, and nothing to compare.
        if !p.tracks_changes() {
            assert_eq!(p.changed_ranges(&id, &id).await.unwrap(), None);
        }
    }

    #[tokio::test]
    async fn open_removes_uncommitted_images() {
        let dir = tempfile::tempdir().unwrap();
        let p = pool(dir.path());
        p.open().await.unwrap();
        p.create(&new_vol("keep", 1, None)).await.unwrap();
        std::fs::write(dir.path().join("volume-crashed.img"), b"x").unwrap();
        std::fs::write(dir.path().join(".volume-half.json.tmp"), b"{").unwrap();
        p.open().await.unwrap();
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, vec!["volume-keep.img", "volume-keep.json"]);
    }

    #[tokio::test]
    async fn missing_sources_are_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let p = pool(dir.path());
        p.open().await.unwrap();
        let err = p
            .create(&new_vol("v", 1, Some(Source::Volume(vid("nope")))))
            .await
            .unwrap_err();
        assert!(
            matches!(err, AgentError::VolumeNotFound(ref id) if id.as_str() == "nope"),
            "{err:?}"
        );
        assert_eq!(p.volumes().await.unwrap().len(), 0);
    }
}
