//! The backup pipeline and its inverse.
//!
//! Backup: blocking readers walk the volume on a fixed grid of `chunk_size` chunks (chunks
//! without allocated data, by `SEEK_DATA`, are holes and are not read), into buffers they
//! reuse, a piece at a time: while a piece is in the cache they find its zero blocks and
//! hash its 32 KiB blocks with BLAKE3. An all-zero chunk is a hole. Every other chunk goes
//! to a worker (a blocking thread) that takes the SHA-256 of the blocks whose BLAKE3 the
//! parent has from the parent's `sha256file`, computes the others, and, if the chunk
//! changed, compresses it (unless a sample shows it does not compress); the object is then
//! written to the repository. Two readers take alternate chunks (reading is what bounds an
//! all-zero or mostly unchanged volume). At most `max_in_flight` chunks are in the workers
//! and writes at once, and each reader is at most one chunk ahead besides the one it reads,
//! so a backup holds about `2 × chunk_size × (max_in_flight + 4)` bytes. Results are taken
//! in chunk order to build the chunk table, the `sha256file` and the `blake3file`, written
//! at the end, the metadata last.
//!
//! Restore: chunks are fetched, decompressed and verified (SHA-256) by up to
//! `max_in_flight` workers, each written at its offset only once verified; holes are
//! zeroed (punched out of files). The first failure stops the rest: work already in flight
//! finishes, nothing new starts.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use tokio::sync::mpsc;

use super::format::{
    self, blake3, blocks_in, chunk_digest, chunk_object, key, sha256, zero_digest,
    zero_fast_digest, BackupStats, ChunkDigest, ChunkEntry, Compression, Digest, Metadata,
    Sha256FileInfo, BLAKE3FILE, FORMAT_NAME, FORMAT_VERSION, METADATA, SHA256FILE,
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
    /// Its `blake3file`, decoded (`None` for a version-1 backup, which has none: then every
    /// block is compared by SHA-256).
    pub fast: Option<Vec<Digest>>,
}

/// Unix seconds now.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A chunk as the reader hands it over.
enum Raw {
    /// Unallocated or all zeros.
    Hole { offset: u64, len: u64 },
    /// Data, with what the reader found while the bytes were in its cache: which blocks are
    /// zeros, and every block's BLAKE3.
    Data {
        index: u64,
        offset: u64,
        bytes: Vec<u8>,
        zero: Vec<bool>,
        fast: Vec<Digest>,
    },
}

/// How much a reader reads at a time before it scans and hashes it (fits a core's cache).
const READ_PIECE: usize = 1 << 20;

/// Reads chunk `[offset, offset + bytes.len())` into `bytes` a piece at a time, scanning
/// each piece for zeros and hashing its blocks while it is still in the cache. Returns the
/// per-block zero flags and BLAKE3 digests.
fn read_chunk(
    file: &File,
    path: &Path,
    offset: u64,
    bytes: &mut [u8],
) -> Result<(Vec<bool>, Vec<Digest>), BackupError> {
    let blocks = blocks_in(bytes.len() as u64) as usize;
    let (mut zero, mut fast) = (Vec::with_capacity(blocks), Vec::with_capacity(blocks));
    let mut at = 0usize;
    for piece in bytes.chunks_mut(READ_PIECE) {
        file.read_exact_at(piece, offset + at as u64)
            .map_err(BackupError::io("read", path))?;
        at += piece.len();
        for b in piece.chunks(BLOCK_SIZE as usize) {
            let z = is_zero(b);
            zero.push(z);
            fast.push(if z {
                zero_fast_digest(b.len() as u64)
            } else {
                blake3(b)
            });
        }
    }
    Ok((zero, fast))
}

/// What a worker made of a chunk.
struct Done {
    entry: ChunkEntry,
    /// SHA-256 of its blocks.
    digests: Vec<Digest>,
    /// BLAKE3 of its blocks.
    fast: Vec<Digest>,
    /// The object to write (compressed), for a changed data chunk.
    object: Option<Vec<u8>>,
    /// The read buffer, when it is not the object: it goes back to the reader.
    spare: Option<Vec<u8>>,
}

/// The parent's side of one chunk: its entry and its blocks' digests.
struct Before {
    entry: ChunkEntry,
    digests: Vec<Digest>,
    fast: Option<Vec<Digest>>,
}

/// Read buffers given back once their chunk is done, so the reader neither allocates nor
/// has the kernel zero a fresh chunk for every read. Holds at most `keep`.
struct Buffers {
    free: Mutex<Vec<Vec<u8>>>,
    keep: usize,
}

impl Buffers {
    fn new(keep: usize) -> Self {
        Buffers {
            free: Mutex::new(Vec::new()),
            keep,
        }
    }

    /// A buffer of `len` bytes (their content is whatever was there).
    fn take(&self, len: usize) -> Vec<u8> {
        let reused = self
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let mut b = reused.unwrap_or_default();
        b.resize(len, 0);
        b
    }

    fn give(&self, b: Vec<u8>) {
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        if free.len() < self.keep {
            free.push(b);
        }
    }
}

/// The per-block digests of a zero run of `len` bytes (block-aligned), with `digest` giving
/// a zero block's.
fn zero_run(len: u64, digest: fn(u64) -> Digest) -> Vec<Digest> {
    (0..blocks_in(len))
        .map(|b| digest((len - b * BLOCK_SIZE).min(BLOCK_SIZE)))
        .collect()
}

/// A chunk of zeros as the chunk table and digest files record it.
fn hole(offset: u64, len: u64, spare: Option<Vec<u8>>) -> Done {
    Done {
        entry: ChunkEntry::Hole {
            offset,
            length: len,
        },
        digests: zero_run(len, zero_digest),
        fast: zero_run(len, zero_fast_digest),
        object: None,
        spare,
    }
}

/// Whether a chunk is worth compressing: a sample of it (four 16 KiB pieces spread over it)
/// must shrink by 2% at zstd's fastest level. Random or already compressed data fails and is
/// stored as it is, without paying for a whole compression that would be thrown away.
fn compressible(data: &[u8]) -> bool {
    const PIECE: usize = 16 << 10;
    if data.len() < 16 * PIECE {
        return true;
    }
    let step = data.len() / 4;
    let sample: Vec<u8> = (0..4)
        .flat_map(|i| &data[i * step..i * step + PIECE])
        .copied()
        .collect();
    zstd::bulk::compress(&sample, 1).map_or(true, |c| c.len() < sample.len() / 100 * 98)
}

/// Readers of one backup: each reads every `READERS`th chunk, so copying from the page
/// cache or the device, which bounds an all-zero or mostly unchanged volume, runs on two
/// cores.
const READERS: u64 = 2;

/// Reads chunks `first`, `first + READERS`, … of `path`'s chunk grid into `tx`; stops early
/// when `stop` is set or the receiver is gone.
fn read_grid(
    path: &Path,
    (size, chunk, first): (u64, u64, u64),
    stop: &AtomicBool,
    tx: &mpsc::Sender<Result<Raw, BackupError>>,
    buffers: &Buffers,
) -> Result<(), BackupError> {
    let file = File::open(path).map_err(BackupError::io("open", path))?;
    let ranges = data_ranges(&file, size);
    let mut r = 0usize;
    let mut index = first;
    let mut offset = first * chunk;
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
            let mut bytes = buffers.take(len as usize);
            let (zero, fast) = read_chunk(&file, path, offset, &mut bytes)?;
            if zero.iter().all(|z| *z) {
                buffers.give(bytes);
                Raw::Hole { offset, len }
            } else {
                Raw::Data {
                    index,
                    offset,
                    bytes,
                    zero,
                    fast,
                }
            }
        } else {
            Raw::Hole { offset, len }
        };
        if tx.blocking_send(Ok(raw)).is_err() {
            return Ok(());
        }
        index += READERS;
        offset += READERS * chunk;
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

/// The worker's part for one data chunk (the reader found its zero blocks and their
/// BLAKE3): SHA-256 of the blocks (taken from the parent where the BLAKE3 matches it,
/// computed otherwise), comparison with the parent, chunk digest and compression.
fn digest_chunk(
    id: &BackupId,
    (index, offset): (u64, u64),
    (bytes, zero, fast): (Vec<u8>, Vec<bool>, Vec<Digest>),
    before: Option<Before>,
    compression: Compression,
    level: i32,
) -> Result<Done, BackupError> {
    let len = bytes.len() as u64;
    let blocks: Vec<&[u8]> = bytes.chunks(BLOCK_SIZE as usize).collect();
    let known = before
        .as_ref()
        .and_then(|p| Some((&p.digests, p.fast.as_ref()?)));
    let digests: Vec<Digest> = blocks
        .iter()
        .enumerate()
        .map(|(i, b)| match known {
            _ if zero[i] => zero_digest(b.len() as u64),
            Some((sha, f)) if f[i] == fast[i] => sha[i],
            _ => sha256(b),
        })
        .collect();
    if let Some(p) = before {
        if p.digests == digests {
            return Ok(Done {
                entry: p.entry,
                digests,
                fast,
                object: None,
                spare: Some(bytes),
            });
        }
    }
    let digest = hex::encode(chunk_digest(&digests));
    let (compression, stored, spare) = match compression {
        Compression::Zstd if compressible(&bytes) => match compression.encode(&bytes, level) {
            Ok(c) if c.len() < bytes.len() => (compression, c, Some(bytes)),
            _ => (Compression::None, bytes, None),
        },
        _ => (Compression::None, bytes, None),
    };
    let object = chunk_object(index);
    Ok(Done {
        entry: ChunkEntry::Data {
            offset,
            length: len,
            sha256: digest,
            sha256_of: ChunkDigest::Blocks,
            compression,
            stored_length: stored.len() as u64,
            backup: id.to_string(),
            object,
        },
        digests,
        fast,
        object: Some(stored),
        spare,
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
    let buffers = Arc::new(Buffers::new(settings.max_in_flight.max(1) + 4));
    let mut readers = Vec::new();
    let mut queues = Vec::new();
    for first in 0..READERS {
        let (tx, rx) = mpsc::channel(1);
        let (path, stop, buffers) = (source.path.clone(), stop.clone(), buffers.clone());
        readers.push(tokio::task::spawn_blocking(move || {
            if let Err(e) = read_grid(&path, (size, chunk, first), &stop, &tx, &buffers) {
                let _ = tx.blocking_send(Err(e));
            }
        }));
        queues.push(rx);
    }
    // Chunk i comes from reader i mod READERS; the stream ends at the first reader with
    // nothing more (the end of the volume, or a reader stopped by an error it sent).
    let chunks_in_order = Box::pin(futures::stream::unfold(
        (queues, 0usize),
        |(mut queues, i)| async move {
            let n = queues.len();
            let raw = queues[i % n].recv().await?;
            Some((raw, (queues, i + 1)))
        },
    ));
    let repo_name = repo.name().to_owned();
    let work = chunks_in_order.map(|raw| {
        let (repo, stop, parent, id) = (repo.clone(), stop.clone(), parent.clone(), id.clone());
        let (repo_name, buffers) = (repo_name.clone(), buffers.clone());
        let (compression, level) = (settings.compression, settings.zstd_level);
        async move {
            if stop.load(Ordering::Relaxed) {
                return Ok(None);
            }
            let mut done = match raw? {
                Raw::Hole { offset, len } => hole(offset, len, None),
                Raw::Data {
                    index,
                    offset,
                    bytes,
                    zero,
                    fast,
                } => {
                    let len = bytes.len() as u64;
                    let before = parent.as_ref().and_then(|p| {
                        let e = p.meta.chunks.get(index as usize)?;
                        let first = (offset / BLOCK_SIZE) as usize;
                        let blocks = first..first + blocks_in(len) as usize;
                        let digests = p.digests.get(blocks.clone())?.to_vec();
                        let fast = match &p.fast {
                            Some(f) => Some(f.get(blocks)?.to_vec()),
                            None => None,
                        };
                        (e.offset() == offset && e.length() == len).then(|| Before {
                            entry: e.clone(),
                            digests,
                            fast,
                        })
                    });
                    let data = (bytes, zero, fast);
                    worker(move || {
                        digest_chunk(&id, (index, offset), data, before, compression, level)
                    })
                    .await?
                }
            };
            if let Some(b) = done.spare.take() {
                buffers.give(b);
            }
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
    let mut fast: Vec<Digest> = Vec::with_capacity(blocks_in(size) as usize);
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
                fast.extend(d.fast);
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
    for r in readers {
        let _ = r.await;
    }
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

    let (sha256file, n) = put_digest_file(repo.as_ref(), id, SHA256FILE, digests, settings).await?;
    let (blake3file, m) = put_digest_file(repo.as_ref(), id, BLAKE3FILE, fast, settings).await?;
    stats.stored_bytes += n + m;
    progress.stored.fetch_add(n + m, Ordering::Relaxed);

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
        sha256file,
        blake3file: Some(blake3file),
        stats,
        chunks,
    };
    meta.check(&key(id, METADATA))?;
    repo.put_commit(&key(id, METADATA), meta.to_json())
        .await
        .map_err(BackupError::repo(&repo_name))?;
    Ok(meta)
}

/// Writes one of a backup's digest files (`sha256file`, `blake3file`); returns its metadata
/// entry and the bytes stored.
async fn put_digest_file(
    repo: &dyn Repository,
    id: &BackupId,
    name: &'static str,
    digests: Vec<Digest>,
    settings: &Settings,
) -> Result<(Sha256FileInfo, u64), BackupError> {
    let raw = format::encode_digests(&digests);
    let info = Sha256FileInfo {
        object: name.into(),
        compression: settings.compression,
        blocks: digests.len() as u64,
        sha256: hex::encode(sha256(&raw)),
    };
    let (compression, level) = (settings.compression, settings.zstd_level);
    let stored = worker(move || {
        compression
            .encode(&raw, level)
            .map_err(|e| BackupError::Worker(format!("compress {name}: {e}")))
    })
    .await?;
    let n = stored.len() as u64;
    repo.put(&key(id, name), stored)
        .await
        .map_err(BackupError::repo(repo.name()))?;
    Ok((info, n))
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

/// Reads and checks a backup's SHA-256 block digests.
pub async fn load_digests(
    repo: &dyn Repository,
    meta: &Metadata,
) -> Result<Vec<Digest>, BackupError> {
    load_digest_file(repo, meta, &meta.sha256file).await
}

/// Reads what an incremental backup on top of `meta` needs: its metadata and both digest
/// files (the `blake3file` only where it has one).
pub async fn load_parent(repo: &dyn Repository, meta: Metadata) -> Result<Parent, BackupError> {
    let digests = load_digests(repo, &meta).await?;
    let fast = match &meta.blake3file {
        Some(info) => Some(load_digest_file(repo, &meta, info).await?),
        None => None,
    };
    Ok(Parent {
        meta,
        digests,
        fast,
    })
}

/// Reads and checks one of a backup's digest files.
async fn load_digest_file(
    repo: &dyn Repository,
    meta: &Metadata,
    info: &Sha256FileInfo,
) -> Result<Vec<Digest>, BackupError> {
    let id = meta.id()?;
    let k = key(&id, &info.object);
    let stored = match repo.get(&k).await {
        Ok(b) => b,
        Err(RepoError::NotFound { .. }) => return Err(BackupError::MissingObject(k)),
        Err(e) => return Err(BackupError::repo(repo.name())(e)),
    };
    let info = info.clone();
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
                        sha256_of,
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
                            if !sha256_of.matches(&data, &want) {
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
        assert_eq!(objects.len(), 4 + 3, "{objects:?}");
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

    /// Backup `id` of the test volume with the test settings.
    async fn back_up(
        repo: &Arc<dyn Repository>,
        id: &str,
        (vol, size): (&Path, u64),
        parent: Option<Parent>,
    ) -> Metadata {
        let parent = parent.map(Arc::new);
        backup(
            repo.clone(),
            &bid(id),
            &source(vol, size),
            parent,
            &settings(),
            &Progress::default(),
        )
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn incremental_stores_changed_chunks_and_restores_through_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let (vol, size) = volume(dir.path());
        let repo = repo(dir.path());
        let s = settings();
        let full = back_up(&repo, "b1", (&vol, size), None).await;
        // Change one block of the text chunk and write into a former hole.
        let f = std::fs::OpenOptions::new().write(true).open(&vol).unwrap();
        f.write_all_at(b"CHANGED", 3 * MIB + 100).unwrap();
        f.write_all_at(b"new data", 7 * MIB).unwrap();
        drop(f);
        let parent = load_parent(repo.as_ref(), full.clone()).await.unwrap();
        assert!(parent.fast.is_some());
        let inc = back_up(&repo, "b2", (&vol, size), Some(parent)).await;
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
    async fn incremental_on_a_parent_without_blake3file_compares_by_sha256() {
        let dir = tempfile::tempdir().unwrap();
        let (vol, size) = volume(dir.path());
        let repo = repo(dir.path());
        let full = back_up(&repo, "b1", (&vol, size), None).await;
        let f = std::fs::OpenOptions::new().write(true).open(&vol).unwrap();
        f.write_all_at(b"CHANGED", 3 * MIB + 100).unwrap();
        drop(f);
        // A version-1 parent: no BLAKE3 digests to compare with.
        let mut parent = load_parent(repo.as_ref(), full.clone()).await.unwrap();
        parent.fast = None;
        let inc = back_up(&repo, "b2", (&vol, size), Some(parent)).await;
        assert_eq!(
            (inc.stats.stored_chunks, inc.stats.reused_chunks),
            (1, 3),
            "{:?}",
            inc.stats
        );
        // The digests are the same whichever way they were found.
        let parent = load_parent(repo.as_ref(), full).await.unwrap();
        let by_blake3 = back_up(&repo, "b3", (&vol, size), Some(parent)).await;
        assert_eq!(by_blake3.sha256file.sha256, inc.sha256file.sha256);
        assert_eq!(
            load_digests(repo.as_ref(), &inc).await.unwrap(),
            format::block_digests(&std::fs::read(&vol).unwrap())
        );
    }

    #[test]
    fn random_chunks_skip_compression_and_text_does_not() {
        use rand::RngCore;
        let mut random = vec![0u8; 4 * MIB as usize];
        rand::thread_rng().fill_bytes(&mut random);
        assert!(!compressible(&random));
        let text = "volume=vol-7 latency_us=123 status=ok\n".repeat(120_000);
        assert!(compressible(text.as_bytes()));
        // Small chunks are simply compressed.
        assert!(compressible(&random[..64 * 1024]));
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
        assert_eq!(
            repo.list("z").await.unwrap(),
            [BLAKE3FILE, METADATA, SHA256FILE]
        );
        let digests = load_digests(repo.as_ref(), &m).await.unwrap();
        assert!(digests.iter().all(|d| *d == format::zero_block_digest()));
    }
}
