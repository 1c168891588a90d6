//! The backup pipeline and its inverse.
//!
//! Backup: one blocking reader walks the volume on a fixed grid of `chunk_size` chunks
//! (chunks without allocated data, by `SEEK_DATA`, are holes and are not read); each chunk
//! read goes to a worker (a blocking thread) that detects zeros, hashes its 32 KiB blocks,
//! compares them with the parent's and, if the chunk changed, hashes and compresses it; the
//! object is then written to the repository. At most `max_in_flight` chunks are in the
//! workers and writes at once, and the reader is at most two chunks ahead, so a backup holds
//! about `2 × chunk_size × (max_in_flight + 3)` bytes. Results are taken in chunk order to
//! build the chunk table and the `sha256file`, written at the end, the metadata last.
//!
//! Restore: chunks are fetched, decompressed and verified (SHA-256) by up to
//! `max_in_flight` workers, each written at its offset only once verified; holes are
//! zeroed (punched out of files). The first failure stops the rest: work already in flight
//! finishes, nothing new starts.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::format::{
    self, blocks_in, chunk_object, key, sha256, zero_digest, BackupStats, ChunkEntry, Compression,
    Digest, Metadata, Sha256FileInfo, FORMAT_NAME, FORMAT_VERSION, METADATA, SHA256FILE,
    STATUS_AVAILABLE,
};
use super::repo::{RepoError, Repository};
use super::{BackupError, BLOCK_SIZE};
use crate::agent::data::{data_ranges, is_zero};
use crate::agent::BackupId;
use crate::config::{BackupCompression, BackupConfig};

/// How backups are made (from `[backup]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Chunk size of new full backups (incrementals use their parent's).
    pub chunk_size: u64,
    /// Chunks in the workers and writes at once.
    pub max_in_flight: usize,
    /// Compression of new objects.
    pub compression: Compression,
    /// zstd level.
    pub zstd_level: i32,
}

impl Settings {
    /// The settings of an agent's `[backup]` section.
    pub fn from_config(cfg: &BackupConfig) -> Self {
        Settings {
            chunk_size: cfg.chunk_size,
            max_in_flight: cfg.max_in_flight.max(1),
            compression: match cfg.compression {
                BackupCompression::Zstd => Compression::Zstd,
                BackupCompression::None => Compression::None,
            },
            zstd_level: cfg.zstd_level,
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings::from_config(&BackupConfig::default())
    }
}

/// How far a backup or restore is: bytes of the volume covered, of the total, and bytes
/// written to the repository. Updated by the pipeline, read by anyone.
#[derive(Debug, Default)]
pub struct Progress {
    done: AtomicU64,
    total: AtomicU64,
    stored: AtomicU64,
}

impl Progress {
    /// Nothing covered yet of `total` bytes.
    pub fn new(total: u64) -> Self {
        Progress {
            total: AtomicU64::new(total),
            ..Progress::default()
        }
    }

    /// Bytes of the volume covered so far.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Bytes to cover.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Bytes written to the repository so far.
    pub fn stored(&self) -> u64 {
        self.stored.load(Ordering::Relaxed)
    }
}

/// The volume (or snapshot) to back up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    /// File or block device to read.
    pub path: PathBuf,
    /// Bytes to back up.
    pub size: u64,
    /// The volume's id, type and caller-owned metadata, kept in the backup's metadata.
    pub volume_id: String,
    /// Volume type.
    pub volume_type: String,
    /// Caller-owned metadata.
    pub volume_metadata: std::collections::BTreeMap<String, String>,
}

/// The backup an incremental one builds on: its metadata and block digests.
#[derive(Clone, Debug)]
pub struct Parent {
    /// Its metadata.
    pub meta: Metadata,
    /// Its `sha256file`, decoded.
    pub digests: Vec<Digest>,
}

/// Unix seconds now.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A chunk as the reader hands it over.
enum Raw {
    Hole {
        offset: u64,
        len: u64,
    },
    Data {
        index: u64,
        offset: u64,
        bytes: Vec<u8>,
    },
}

/// What a worker made of a chunk.
struct Done {
    entry: ChunkEntry,
    digests: Vec<Digest>,
    /// The object to write (compressed), for a changed data chunk.
    object: Option<Vec<u8>>,
}

/// The digests of the blocks of a zero run of `len` bytes (block-aligned).
fn zero_digests(len: u64) -> Vec<Digest> {
    (0..blocks_in(len))
        .map(|b| zero_digest((len - b * BLOCK_SIZE).min(BLOCK_SIZE)))
        .collect()
}

/// Reads `path` on the chunk grid into `tx`; stops early when `stop` is set or the receiver
/// is gone.
fn read_grid(
    path: &Path,
    size: u64,
    chunk: u64,
    stop: &AtomicBool,
    tx: &mpsc::Sender<Result<Raw, BackupError>>,
) -> Result<(), BackupError> {
    let file = File::open(path).map_err(BackupError::io("open", path))?;
    let ranges = data_ranges(&file, size);
    let mut r = 0usize;
    let mut index = 0u64;
    let mut offset = 0u64;
    while offset < size {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        let len = chunk.min(size - offset);
        let end = offset + len;
        while r < ranges.len() && ranges[r].1 <= offset {
            r += 1;
        }
        let has_data = ranges.get(r).is_some_and(|(s, _)| *s < end);
        let raw = if has_data {
            let mut bytes = vec![0u8; len as usize];
            file.read_exact_at(&mut bytes, offset)
                .map_err(BackupError::io("read", path))?;
            Raw::Data {
                index,
                offset,
                bytes,
            }
        } else {
            Raw::Hole { offset, len }
        };
        if tx.blocking_send(Ok(raw)).is_err() {
            return Ok(());
        }
        index += 1;
        offset = end;
    }
    Ok(())
}

/// Runs `f` on a blocking thread.
async fn worker<T, F>(f: F) -> Result<T, BackupError>
where
    F: FnOnce() -> Result<T, BackupError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(BackupError::Worker(e.to_string())))
}

/// The worker's part for one data chunk: zero detection, block digests, comparison with the
/// parent, chunk digest and compression.
fn digest_chunk(
    id: &BackupId,
    index: u64,
    offset: u64,
    bytes: Vec<u8>,
    parent: Option<(ChunkEntry, Vec<Digest>)>,
    compression: Compression,
    level: i32,
) -> Result<Done, BackupError> {
    let len = bytes.len() as u64;
    if is_zero(&bytes) {
        return Ok(Done {
            entry: ChunkEntry::Hole {
                offset,
                length: len,
            },
            digests: zero_digests(len),
            object: None,
        });
    }
    let digests: Vec<Digest> = bytes
        .chunks(BLOCK_SIZE as usize)
        .map(|b| {
            if is_zero(b) {
                zero_digest(b.len() as u64)
            } else {
                sha256(b)
            }
        })
        .collect();
    if let Some((entry, old)) = parent {
        if old == digests {
            return Ok(Done {
                entry,
                digests,
                object: None,
            });
        }
    }
    let digest = hex::encode(sha256(&bytes));
    let (compression, stored) = match compression.encode(&bytes, level) {
        // Incompressible data is stored as it is.
        Ok(c) if c.len() < bytes.len() => (compression, c),
        _ => (Compression::None, bytes),
    };
    let object = chunk_object(index);
    Ok(Done {
        entry: ChunkEntry::Data {
            offset,
            length: len,
            sha256: digest,
            compression,
            stored_length: stored.len() as u64,
            backup: id.to_string(),
            object,
        },
        digests,
        object: Some(stored),
    })
}

/// Makes backup `id` of `source` in `repo`: every changed chunk, the `sha256file`, then the
/// metadata. On error, objects already written stay (the caller removes the container);
/// no metadata is written, so the backup never looks complete.
pub async fn backup(
    repo: Arc<dyn Repository>,
    id: &BackupId,
    source: &Source,
    parent: Option<Arc<Parent>>,
    settings: &Settings,
    progress: &Progress,
) -> Result<Metadata, BackupError> {
    let created_at = now_secs();
    let chunk = parent
        .as_ref()
        .map_or(settings.chunk_size, |p| p.meta.chunk_size);
    let size = source.size;
    progress.total.store(size, Ordering::Relaxed);
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel(2);
    let reader = {
        let (path, stop) = (source.path.clone(), stop.clone());
        tokio::task::spawn_blocking(move || {
            if let Err(e) = read_grid(&path, size, chunk, &stop, &tx) {
                let _ = tx.blocking_send(Err(e));
            }
        })
    };
    let repo_name = repo.name().to_owned();
    let work = ReceiverStream::new(rx).map(|raw| {
        let (repo, stop, parent, id) = (repo.clone(), stop.clone(), parent.clone(), id.clone());
        let repo_name = repo_name.clone();
        let (compression, level) = (settings.compression, settings.zstd_level);
        async move {
            if stop.load(Ordering::Relaxed) {
                return Ok(None);
            }
            let done = match raw? {
                Raw::Hole { offset, len } => Done {
                    entry: ChunkEntry::Hole {
                        offset,
                        length: len,
                    },
                    digests: zero_digests(len),
                    object: None,
                },
                Raw::Data {
                    index,
                    offset,
                    bytes,
                } => {
                    let len = bytes.len() as u64;
                    let old = parent.as_ref().and_then(|p| {
                        let e = p.meta.chunks.get(index as usize)?;
                        let first = (offset / BLOCK_SIZE) as usize;
                        let d = p.digests.get(first..first + blocks_in(len) as usize)?;
                        (e.offset() == offset && e.length() == len).then(|| (e.clone(), d.to_vec()))
                    });
                    worker(move || digest_chunk(&id, index, offset, bytes, old, compression, level))
                        .await?
                }
            };
            let mut done = done;
            if let (Some(stored), Some(k)) = (done.object.take(), done.entry.object_key()) {
                let n = stored.len() as u64;
                repo.put(&k, stored)
                    .await
                    .map_err(BackupError::repo(&repo_name))?;
                progress.stored.fetch_add(n, Ordering::Relaxed);
            }
            Ok::<_, BackupError>(Some(done))
        }
    });
    let mut work = work.buffered(settings.max_in_flight.max(1));
    let mut chunks = Vec::new();
    let mut digests: Vec<Digest> = Vec::with_capacity(blocks_in(size) as usize);
    let mut stats = BackupStats::default();
    let mut failure = None;
    while let Some(r) = work.next().await {
        match r {
            Ok(Some(d)) if failure.is_none() => {
                match &d.entry {
                    ChunkEntry::Hole { length, .. } => stats.hole_bytes += length,
                    ChunkEntry::Data {
                        length,
                        backup,
                        stored_length,
                        ..
                    } => {
                        stats.data_bytes += length;
                        if backup == id.as_str() {
                            stats.stored_chunks += 1;
                            stats.stored_bytes += stored_length;
                        } else {
                            stats.reused_chunks += 1;
                        }
                    }
                }
                progress.done.fetch_add(d.entry.length(), Ordering::Relaxed);
                digests.extend(d.digests);
                chunks.push(d.entry);
            }
            Ok(_) => {}
            Err(e) => {
                stop.store(true, Ordering::Relaxed);
                failure.get_or_insert(e);
            }
        }
    }
    drop(work);
    let _ = reader.await;
    if let Some(e) = failure {
        return Err(e);
    }
    let covered: u64 = chunks.iter().map(ChunkEntry::length).sum();
    if covered != size {
        return Err(BackupError::Worker(format!(
            "read {covered} of {size} bytes of {}",
            source.path.display()
        )));
    }

    let raw = format::encode_digests(&digests);
    let sha = hex::encode(sha256(&raw));
    let (compression, level) = (settings.compression, settings.zstd_level);
    let stored = worker(move || {
        compression
            .encode(&raw, level)
            .map_err(|e| BackupError::Worker(format!("compress sha256file: {e}")))
    })
    .await?;
    stats.stored_bytes += stored.len() as u64;
    progress
        .stored
        .fetch_add(stored.len() as u64, Ordering::Relaxed);
    repo.put(&key(id, SHA256FILE), stored)
        .await
        .map_err(BackupError::repo(&repo_name))?;

    let meta = Metadata {
        format: FORMAT_NAME.into(),
        version: FORMAT_VERSION,
        backup_id: id.to_string(),
        status: STATUS_AVAILABLE.into(),
        volume_id: source.volume_id.clone(),
        volume_size: size,
        volume_type: source.volume_type.clone(),
        volume_metadata: source.volume_metadata.clone(),
        created_at,
        completed_at: now_secs(),
        parent_id: parent.as_ref().map(|p| p.meta.backup_id.clone()),
        chunk_size: chunk,
        block_size: BLOCK_SIZE,
        compression: settings.compression,
        sha256file: Sha256FileInfo {
            object: SHA256FILE.into(),
            compression: settings.compression,
            blocks: digests.len() as u64,
            sha256: sha,
        },
        stats,
        chunks,
    };
    meta.check(&key(id, METADATA))?;
    repo.put_commit(&key(id, METADATA), meta.to_json())
        .await
        .map_err(BackupError::repo(&repo_name))?;
    Ok(meta)
}

/// Reads a backup's metadata; `None` when the container has none (no such backup, or an
/// unfinished one).
pub async fn load_metadata(
    repo: &dyn Repository,
    id: &BackupId,
) -> Result<Option<Metadata>, BackupError> {
    let k = key(id, METADATA);
    match repo.get(&k).await {
        Ok(bytes) => Metadata::parse(&bytes, &k).map(Some),
        Err(RepoError::NotFound { .. }) => Ok(None),
        Err(e) => Err(BackupError::repo(repo.name())(e)),
    }
}

/// Reads and checks a backup's block digests (for an incremental backup on top of it).
pub async fn load_digests(
    repo: &dyn Repository,
    meta: &Metadata,
) -> Result<Vec<Digest>, BackupError> {
    let id = meta.id()?;
    let k = key(&id, &meta.sha256file.object);
    let stored = match repo.get(&k).await {
        Ok(b) => b,
        Err(RepoError::NotFound { .. }) => return Err(BackupError::MissingObject(k)),
        Err(e) => return Err(BackupError::repo(repo.name())(e)),
    };
    let info = meta.sha256file.clone();
    worker(move || {
        let raw = info
            .compression
            .decode(stored, info.blocks * 32)
            .map_err(|reason| BackupError::Corrupt {
                object: k.clone(),
                reason,
            })?;
        format::decode_digests(&raw, &info, &k)
    })
    .await
}

/// Walks a backup's chain of parents: every ancestor must be in the repository, and every
/// object the backup uses must belong to it or an ancestor. Returns the ancestors' ids,
/// nearest first.
pub async fn check_chain(
    repo: &dyn Repository,
    meta: &Metadata,
) -> Result<Vec<BackupId>, BackupError> {
    let id = meta.id()?;
    let mut chain = Vec::new();
    let mut next = meta.parent()?;
    while let Some(p) = next {
        if p == id || chain.contains(&p) {
            return Err(BackupError::Format {
                object: key(&id, METADATA),
                reason: format!("its chain of parents loops at {p}"),
            });
        }
        let m = load_metadata(repo, &p)
            .await?
            .ok_or_else(|| BackupError::ChainBroken {
                id: id.clone(),
                missing: p.clone(),
                repository: repo.name().to_owned(),
            })?;
        next = m.parent()?;
        chain.push(p);
    }
    for r in meta.referenced_backups() {
        if !chain.iter().any(|c| c.as_str() == r) {
            return Err(BackupError::Format {
                object: key(&id, METADATA),
                reason: format!("uses objects of backup {r}, which is not an ancestor"),
            });
        }
    }
    Ok(chain)
}

/// Where a restore writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// File or block device.
    pub path: PathBuf,
    /// Its size.
    pub size: u64,
    /// Its volume id (for messages).
    pub volume_id: String,
}

/// Zeroes a range: punches it out of a file, or writes zeros where that is not supported.
fn zero_range(file: &File, path: &Path, offset: u64, len: u64) -> Result<(), BackupError> {
    use rustix::fs::{fallocate, FallocateFlags};
    if fallocate(
        file,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        offset,
        len,
    )
    .is_ok()
    {
        return Ok(());
    }
    const STEP: u64 = 1 << 20;
    let zeros = vec![0u8; STEP.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(STEP);
        file.write_all_at(&zeros[..n as usize], offset + done)
            .map_err(BackupError::io("write", path))?;
        done += n;
    }
    Ok(())
}

/// Restores the backup `meta` describes onto `target`: every chunk is fetched, decoded and
/// checked against its SHA-256 before it is written; holes are zeroed. The caller has
/// checked the chain ([`check_chain`]).
pub async fn restore(
    repo: Arc<dyn Repository>,
    meta: &Metadata,
    target: &Target,
    settings: &Settings,
    progress: &Progress,
) -> Result<(), BackupError> {
    let id = meta.id()?;
    if target.size < meta.volume_size {
        return Err(BackupError::TargetTooSmall {
            volume: target.volume_id.clone(),
            size: target.size,
            id,
            needed: meta.volume_size,
        });
    }
    progress.total.store(meta.volume_size, Ordering::Relaxed);
    let file = Arc::new(
        std::fs::OpenOptions::new()
            .write(true)
            .open(&target.path)
            .map_err(BackupError::io("open", &target.path))?,
    );
    let stop = Arc::new(AtomicBool::new(false));
    let repo_name = repo.name().to_owned();
    let mut work = futures::stream::iter(meta.chunks.clone())
        .map(|entry| {
            let (repo, file, stop) = (repo.clone(), file.clone(), stop.clone());
            let path = target.path.clone();
            let repo_name = repo_name.clone();
            async move {
                if stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                let (offset, length) = (entry.offset(), entry.length());
                match entry {
                    ChunkEntry::Hole { .. } => {
                        worker(move || zero_range(&file, &path, offset, length)).await?
                    }
                    ChunkEntry::Data {
                        sha256: want,
                        compression,
                        backup,
                        object,
                        ..
                    } => {
                        let k = format!("{backup}/{object}");
                        let stored = match repo.get(&k).await {
                            Ok(b) => b,
                            Err(RepoError::NotFound { .. }) => {
                                return Err(BackupError::MissingObject(k))
                            }
                            Err(e) => return Err(BackupError::repo(&repo_name)(e)),
                        };
                        worker(move || {
                            let data = compression.decode(stored, length).map_err(|reason| {
                                BackupError::Corrupt {
                                    object: k.clone(),
                                    reason,
                                }
                            })?;
                            if hex::encode(sha256(&data)) != want {
                                return Err(BackupError::Corrupt {
                                    object: k,
                                    reason: "its SHA-256 differs from the one in the metadata"
                                        .into(),
                                });
                            }
                            file.write_all_at(&data, offset)
                                .map_err(BackupError::io("write", &path))
                        })
                        .await?
                    }
                }
                progress.done.fetch_add(length, Ordering::Relaxed);
                Ok::<(), BackupError>(())
            }
        })
        .buffer_unordered(settings.max_in_flight.max(1));
    let mut failure = None;
    while let Some(r) = work.next().await {
        if let Err(e) = r {
            stop.store(true, Ordering::Relaxed);
            failure.get_or_insert(e);
        }
    }
    drop(work);
    if let Some(e) = failure {
        return Err(e);
    }
    let path = target.path.clone();
    worker(move || file.sync_all().map_err(BackupError::io("fsync", &path))).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::repo::{LimitedRepository, PosixRepository};

    const MIB: u64 = 1 << 20;

    fn settings() -> Settings {
        Settings {
            chunk_size: 256 * 1024,
            max_in_flight: 3,
            compression: Compression::Zstd,
            zstd_level: 3,
        }
    }

    fn bid(s: &str) -> BackupId {
        BackupId::parse(s).unwrap()
    }

    /// A sparse 8 MiB file: random data at 1 MiB, text at 3 MiB, an all-zero written chunk
    /// at 5 MiB, a few bytes at the end.
    fn volume(dir: &Path) -> (PathBuf, u64) {
        use rand::RngCore;
        let p = dir.join("vol.img");
        let f = File::create(&p).unwrap();
        let size = 8 * MIB;
        f.set_len(size).unwrap();
        let mut random = vec![0u8; 512 * 1024];
        rand::thread_rng().fill_bytes(&mut random);
        f.write_all_at(&random, MIB).unwrap();
        let text = "the quick brown fox jumps over the lazy dog\n".repeat(5000);
        f.write_all_at(text.as_bytes(), 3 * MIB).unwrap();
        f.write_all_at(&vec![0u8; 256 * 1024], 5 * MIB).unwrap();
        f.write_all_at(b"tail", size - 4).unwrap();
        (p, size)
    }

    fn source(path: &Path, size: u64) -> Source {
        Source {
            path: path.to_owned(),
            size,
            volume_id: "v1".into(),
            volume_type: "default".into(),
            volume_metadata: Default::default(),
        }
    }

    fn blank(dir: &Path, name: &str, size: u64) -> Target {
        let p = dir.join(name);
        File::create(&p).unwrap().set_len(size).unwrap();
        Target {
            path: p,
            size,
            volume_id: name.into(),
        }
    }

    fn repo(dir: &Path) -> Arc<dyn Repository> {
        Arc::new(PosixRepository::new("local", dir.join("repo")))
    }

    #[tokio::test]
    async fn full_backup_stores_only_data_and_restores_the_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (vol, size) = volume(dir.path());
        let repo = repo(dir.path());
        let progress = Progress::default();
        let m = backup(
            repo.clone(),
            &bid("b1"),
            &source(&vol, size),
            None,
            &settings(),
            &progress,
        )
        .await
        .unwrap();
        assert_eq!(m.chunks.len(), 32);
        // Random (2 chunks), text (1 chunk), tail (1 chunk); the zero chunk is a hole.
        assert_eq!(m.stats.stored_chunks, 4, "{:?}", m.stats);
        assert_eq!(m.stats.data_bytes, 4 * 256 * 1024);
        assert_eq!(m.stats.hole_bytes, size - 4 * 256 * 1024);
        assert_eq!(progress.done(), size);
        assert_eq!(m.sha256file.blocks, size / BLOCK_SIZE);
        let text_chunk = &m.chunks[12];
        assert!(
            matches!(text_chunk, ChunkEntry::Data { compression: Compression::Zstd, stored_length, .. } if *stored_length < 10_000),
            "{text_chunk:?}"
        );
        assert!(
            matches!(
                &m.chunks[4],
                ChunkEntry::Data {
                    compression: Compression::None,
                    ..
                }
            ),
            "random data is stored as is: {:?}",
            m.chunks[4]
        );
        let mut objects = repo.list("b1").await.unwrap();
        objects.sort();
        assert_eq!(objects.len(), 4 + 2, "{objects:?}");
        assert_eq!(
            load_metadata(repo.as_ref(), &bid("b1")).await.unwrap(),
            Some(m.clone())
        );

        let t = blank(dir.path(), "restored", size + MIB);
        restore(repo, &m, &t, &settings(), &Progress::default())
            .await
            .unwrap();
        let want = std::fs::read(&vol).unwrap();
        let got = std::fs::read(&t.path).unwrap();
        assert!(got[..size as usize] == want[..], "restored bytes differ");
    }

    #[tokio::test]
    async fn incremental_stores_changed_chunks_and_restores_through_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let (vol, size) = volume(dir.path());
        let repo = repo(dir.path());
        let s = settings();
        let full = backup(
            repo.clone(),
            &bid("b1"),
            &source(&vol, size),
            None,
            &s,
            &Progress::default(),
        )
        .await
        .unwrap();
        // Change one block of the text chunk and write into a former hole.
        let f = std::fs::OpenOptions::new().write(true).open(&vol).unwrap();
        f.write_all_at(b"CHANGED", 3 * MIB + 100).unwrap();
        f.write_all_at(b"new data", 7 * MIB).unwrap();
        drop(f);
        let digests = load_digests(repo.as_ref(), &full).await.unwrap();
        let parent = Arc::new(Parent {
            meta: full.clone(),
            digests,
        });
        let inc = backup(
            repo.clone(),
            &bid("b2"),
            &source(&vol, size),
            Some(parent),
            &s,
            &Progress::default(),
        )
        .await
        .unwrap();
        assert_eq!(inc.parent_id.as_deref(), Some("b1"));
        assert_eq!(inc.stats.stored_chunks, 2, "{:?}", inc.stats);
        assert_eq!(inc.stats.reused_chunks, 3, "{:?}", inc.stats);
        assert_eq!(inc.referenced_backups(), vec!["b1".to_string()]);
        assert_eq!(
            check_chain(repo.as_ref(), &inc).await.unwrap(),
            vec![bid("b1")]
        );

        let t = blank(dir.path(), "restored", size);
        restore(repo.clone(), &inc, &t, &s, &Progress::default())
            .await
            .unwrap();
        assert!(std::fs::read(&t.path).unwrap() == std::fs::read(&vol).unwrap());

        // The chain is checked: without b1's metadata, b2 cannot be restored.
        repo.delete("b1/metadata").await.unwrap();
        let err = check_chain(repo.as_ref(), &inc).await.unwrap_err();
        assert!(
            matches!(err, BackupError::ChainBroken { ref missing, .. } if missing.as_str() == "b1"),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn a_flipped_byte_fails_the_restore_naming_the_object() {
        let dir = tempfile::tempdir().unwrap();
        let (vol, size) = volume(dir.path());
        let repo = repo(dir.path());
        let s = Settings {
            compression: Compression::None,
            ..settings()
        };
        let m = backup(
            repo.clone(),
            &bid("b1"),
            &source(&vol, size),
            None,
            &s,
            &Progress::default(),
        )
        .await
        .unwrap();
        let obj = dir.path().join("repo/b1/chunk-00000012");
        let mut bytes = std::fs::read(&obj).unwrap();
        bytes[77] ^= 0x40;
        std::fs::write(&obj, bytes).unwrap();
        let t = blank(dir.path(), "restored", size);
        let err = restore(repo.clone(), &m, &t, &s, &Progress::default())
            .await
            .unwrap_err();
        assert!(
            matches!(err, BackupError::Corrupt { ref object, .. } if object == "b1/chunk-00000012"),
            "{err:?}"
        );
        std::fs::remove_file(&obj).unwrap();
        let err = restore(repo, &m, &t, &s, &Progress::default())
            .await
            .unwrap_err();
        assert!(
            matches!(err, BackupError::MissingObject(ref k) if k == "b1/chunk-00000012"),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn a_full_repository_fails_the_backup_without_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let (vol, size) = volume(dir.path());
        let limited: Arc<dyn Repository> =
            Arc::new(LimitedRepository::new(repo(dir.path()), 300 * 1024));
        let err = backup(
            limited.clone(),
            &bid("b1"),
            &source(&vol, size),
            None,
            &settings(),
            &Progress::default(),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(
                err,
                BackupError::Repository {
                    source: RepoError::Full { .. },
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(
            load_metadata(limited.as_ref(), &bid("b1")).await.unwrap(),
            None
        );
        assert!(!limited
            .list("b1")
            .await
            .unwrap()
            .contains(&METADATA.to_string()));
    }

    #[tokio::test]
    async fn a_volume_of_zeros_stores_nothing_but_its_digests() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("zeros.img");
        let f = File::create(&p).unwrap();
        f.set_len(4 * MIB).unwrap();
        f.write_all_at(&vec![0u8; MIB as usize], MIB).unwrap();
        drop(f);
        let repo = repo(dir.path());
        let m = backup(
            repo.clone(),
            &bid("z"),
            &source(&p, 4 * MIB),
            None,
            &settings(),
            &Progress::default(),
        )
        .await
        .unwrap();
        assert!(m
            .chunks
            .iter()
            .all(|c| matches!(c, ChunkEntry::Hole { .. })));
        assert_eq!(m.stats.stored_chunks, 0);
        assert_eq!(repo.list("z").await.unwrap(), [METADATA, SHA256FILE]);
        let digests = load_digests(repo.as_ref(), &m).await.unwrap();
        assert!(digests.iter().all(|d| *d == format::zero_block_digest()));
    }
}
