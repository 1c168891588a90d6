//! The backup pipeline and its inverse.
//!
//! Backup: blocking readers walk the volume on a fixed grid of `chunk_size` chunks (chunks
//! without allocated data, by `SEEK_DATA`, are holes and are not read), into buffers they
//! reuse, a piece at a time: while a piece is in the cache they find its zero blocks and
//! hash its 32 KiB blocks with BLAKE3. An all-zero chunk is a hole. Every other chunk goes
//! to a worker (a blocking thread) that takes the SHA-256 of the blocks whose BLAKE3 the
//! parent has from the parent's `sha256file`, computes the others (side by side, one block
//! per SIMD lane: `format::sha256_many`), and, if the chunk
//! changed, makes its object: the whole chunk, or only its changed blocks when the parent has
//! the rest (the unchanged ranges keep pointing into the parent's objects), compressed unless
//! a sample shows it does not compress; the object is then written to the repository. Two
//! readers take alternate chunks (reading is what bounds an all-zero or mostly unchanged
//! volume). At most `max_in_flight` chunks are in the workers and writes at once, and each
//! reader is at most one chunk ahead besides the one it reads, so a backup holds about
//! `2 × chunk_size × (max_in_flight + 4)` bytes (and a POSIX repository one staging buffer
//! per write in flight). Results are taken in chunk order to build
//! the chunk table, the `sha256file` and the `blake3file`, written at the end, the metadata
//! last. Chunks lying wholly in ranges the pool's change tracking shows unchanged since the
//! parent (`Source::unchanged`) are not read at all: their entries and digests are the
//! parent's (ADR 0009).
//!
//! Restore: objects are fetched and decompressed by up to `max_in_flight` workers, once for
//! all the entries of a chunk that use them; each entry is verified (SHA-256) and written at
//! its offset only once verified; holes are zeroed (punched out of files). The first failure
//! stops the rest: work already in flight finishes, nothing new starts.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use tokio::sync::mpsc;

use super::format::{
    self, blake3, blocks_in, chunk_digest, chunk_object, key, sha256, sha256_many, zero_digest,
    zero_fast_digest, BackupStats, ChunkDigest, ChunkEntry, Compression, Digest, Metadata,
    Sha256FileInfo, BLAKE3FILE, FORMAT_NAME, FORMAT_VERSION, METADATA, SHA256FILE,
    STATUS_AVAILABLE,
};
use super::repo::{RepoError, Repository};
use super::{BackupError, Buffers, BLOCK_SIZE};
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
    unread: AtomicU64,
    unallocated: AtomicU64,
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

    /// Bytes of the volume taken from the parent without reading them (change tracking).
    pub fn unread(&self) -> u64 {
        self.unread.load(Ordering::Relaxed)
    }

    /// Bytes of the volume recorded as holes without reading them, because the pool shows
    /// them unallocated (a file's holes, a thin snapshot's unmapped blocks).
    pub fn unallocated(&self) -> u64 {
        self.unallocated.load(Ordering::Relaxed)
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
    /// Byte ranges the pool's change tracking shows unchanged since the parent backup (in
    /// order, not overlapping; empty without tracking). Chunks inside them are taken from the
    /// parent without being read.
    pub unchanged: Vec<(u64, u64)>,
    /// Byte ranges holding data, where the pool keeps a map of them (an LVM thin snapshot's
    /// mapped blocks; in order, not overlapping): the rest reads as zeros and becomes holes
    /// unread. `None`: the file's own `SEEK_DATA` map (a block device has none: all of it).
    pub mapped: Option<Vec<(u64, u64)>>,
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

impl Parent {
    /// Its side of chunk `[offset, offset + len)`: the entries over it and the digests of its
    /// blocks (`None` if the parent does not cover it the same way).
    fn before(&self, offset: u64, len: u64) -> Option<Before> {
        let first = (offset / BLOCK_SIZE) as usize;
        let blocks = first..first + blocks_in(len) as usize;
        let digests = self.digests.get(blocks.clone())?.to_vec();
        let fast = match &self.fast {
            Some(f) => Some(f.get(blocks)?.to_vec()),
            None => None,
        };
        let end = offset + len;
        let from = self.meta.chunks.partition_point(|e| e.offset() < offset);
        let entries: Vec<ChunkEntry> = self.meta.chunks[from..]
            .iter()
            .take_while(|e| e.offset() < end)
            .cloned()
            .collect();
        let covered: u64 = entries.iter().map(ChunkEntry::length).sum();
        let aligned = entries.first().is_some_and(|e| e.offset() == offset);
        (aligned && covered == len).then_some(Before {
            entries,
            digests,
            fast,
        })
    }
}

/// Unix seconds now.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A chunk as the reader hands it over.
enum Raw {
    /// All zeros: `unread` when the pool shows it unallocated, read and found zero otherwise.
    Hole { offset: u64, len: u64, unread: bool },
    /// Unchanged since the parent by the pool's change tracking: not read.
    Same { offset: u64, len: u64 },
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

/// How much a reader reads at a time before it scans and hashes it: small enough that the
/// piece is still in the core's cache (L2) when it is scanned and hashed.
const READ_PIECE: usize = 128 << 10;

/// Reads chunk `[offset, offset + bytes.len())` into `bytes` a piece at a time, scanning
/// each piece for zeros and hashing its blocks while it is still in the cache. Returns the
/// per-block zero flags and BLAKE3 digests.
///
/// While every piece read so far is zeros, each next piece is read into the buffer's first
/// piece again, so a zero region costs only the copy out of the page cache into memory that
/// stays in the cache (not a write of the whole buffer to RAM as well). At the first piece
/// with data, that piece is moved to its place and the pieces before it are zeroed; the rest
/// is read in place. Reading an all-zero volume is bound by that copy. An all-zero chunk
/// (every flag set) leaves `bytes` beyond its first piece as it was: it is a hole, and its
/// buffer goes back unread.
fn read_chunk(
    file: &File,
    path: &Path,
    offset: u64,
    bytes: &mut [u8],
) -> Result<(Vec<bool>, Vec<Digest>), BackupError> {
    let blocks = blocks_in(bytes.len() as u64) as usize;
    let (mut zero, mut fast) = (Vec::with_capacity(blocks), Vec::with_capacity(blocks));
    let mut data_seen = false;
    let mut at = 0usize;
    while at < bytes.len() {
        let n = READ_PIECE.min(bytes.len() - at);
        let slot = if data_seen { at } else { 0 };
        let piece = &mut bytes[slot..slot + n];
        file.read_exact_at(piece, offset + at as u64)
            .map_err(BackupError::io("read", path))?;
        for b in piece.chunks(BLOCK_SIZE as usize) {
            let z = is_zero(b);
            zero.push(z);
            fast.push(if z {
                zero_fast_digest(b.len() as u64)
            } else {
                blake3(b)
            });
            data_seen |= !z;
        }
        if data_seen && slot != at {
            bytes.copy_within(0..n, at);
            bytes[..at].fill(0);
        }
        at += n;
    }
    Ok((zero, fast))
}

/// What a worker made of a chunk.
struct Done {
    /// Its entries in the chunk table (one, or several when only changed blocks are stored).
    entries: Vec<ChunkEntry>,
    /// SHA-256 of its blocks.
    digests: Vec<Digest>,
    /// BLAKE3 of its blocks.
    fast: Vec<Digest>,
    /// The object to write (name, encoded bytes), for a changed data chunk.
    object: Option<(String, Vec<u8>)>,
    /// Bytes written for it to the repository (once written).
    stored: u64,
    /// The read buffer, when it is not the object: it goes back to the reader.
    spare: Option<Vec<u8>>,
}

/// The parent's side of one chunk: its entries and its blocks' digests.
struct Before {
    entries: Vec<ChunkEntry>,
    digests: Vec<Digest>,
    fast: Option<Vec<Digest>>,
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
        entries: vec![ChunkEntry::Hole {
            offset,
            length: len,
        }],
        digests: zero_run(len, zero_digest),
        fast: zero_run(len, zero_fast_digest),
        object: None,
        stored: 0,
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

/// Reads chunks `first`, `first + READERS`, … of `path`'s chunk grid into `tx`, except those
/// whose index is in a range of `same` (in order), handed over unread, and those outside
/// the data ranges (`mapped`, else the file's `SEEK_DATA` map), handed over as unread holes;
/// stops early when `stop` is set or the receiver is gone.
fn read_grid(
    path: &Path,
    (size, chunk, first): (u64, u64, u64),
    same: &[(u64, u64)],
    mapped: Option<&[(u64, u64)]>,
    stop: &AtomicBool,
    tx: &mpsc::Sender<Result<Raw, BackupError>>,
    buffers: &Buffers,
) -> Result<(), BackupError> {
    let file = File::open(path).map_err(BackupError::io("open", path))?;
    let ranges = match mapped {
        Some(m) => m.to_vec(),
        None => data_ranges(&file, size),
    };
    let (mut r, mut q) = (0usize, 0usize);
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
        while q < same.len() && same[q].1 <= index {
            q += 1;
        }
        let unchanged = same.get(q).is_some_and(|(s, _)| *s <= index);
        let raw = if unchanged {
            Raw::Same { offset, len }
        } else if has_data {
            let mut bytes = buffers.take(len as usize);
            let (zero, fast) = read_chunk(&file, path, offset, &mut bytes)?;
            if zero.iter().all(|z| *z) {
                buffers.give(bytes);
                Raw::Hole {
                    offset,
                    len,
                    unread: false,
                }
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
            Raw::Hole {
                offset,
                len,
                unread: true,
            }
        };
        if tx.blocking_send(Ok(raw)).is_err() {
            return Ok(());
        }
        index += READERS;
        offset += READERS * chunk;
    }
    Ok(())
}

/// The index ranges `[a, b)` of the `chunk`-sized chunks of a `size`-byte volume lying wholly
/// inside `ranges` (byte ranges, in order).
fn whole_chunks(ranges: &[(u64, u64)], chunk: u64, size: u64) -> Vec<(u64, u64)> {
    ranges
        .iter()
        .map(|&(s, t)| {
            let last = if t >= size {
                size.div_ceil(chunk)
            } else {
                t / chunk
            };
            (s.div_ceil(chunk), last)
        })
        .filter(|(a, b)| a < b)
        .collect()
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
/// computed otherwise) and comparison with the parent. A chunk that changed gets an object:
/// all of it, or, when the parent has some of its blocks, only the changed ones (the
/// unchanged ranges keep pointing into the parent's objects); compressed unless a sample
/// shows it does not compress.
fn digest_chunk(
    id: &BackupId,
    (index, offset): (u64, u64),
    (bytes, zero, fast): (Vec<u8>, Vec<bool>, Vec<Digest>),
    before: Option<Before>,
    compression: Compression,
    level: i32,
) -> Result<Done, BackupError> {
    let blocks: Vec<&[u8]> = bytes.chunks(BLOCK_SIZE as usize).collect();
    let known = before
        .as_ref()
        .and_then(|p| Some((&p.digests, p.fast.as_ref()?)));
    // Zero blocks have a known digest, blocks whose BLAKE3 matches the parent's its SHA-256;
    // the others are hashed together, side by side.
    let digests: Vec<Option<Digest>> = blocks
        .iter()
        .enumerate()
        .map(|(i, b)| match known {
            _ if zero[i] => Some(zero_digest(b.len() as u64)),
            Some((sha, f)) if f[i] == fast[i] => Some(sha[i]),
            _ => None,
        })
        .collect();
    let todo: Vec<&[u8]> = (digests.iter().zip(&blocks))
        .filter(|(d, _)| d.is_none())
        .map(|(_, b)| *b)
        .collect();
    let mut hashed = sha256_many(&todo).into_iter();
    let digests: Vec<Digest> = digests
        .into_iter()
        .map(|d| d.or_else(|| hashed.next()).unwrap_or_default())
        .collect();
    let changed: Vec<bool> = match before {
        Some(p) if p.digests == digests => {
            return Ok(Done {
                entries: p.entries,
                digests,
                fast,
                object: None,
                stored: 0,
                spare: Some(bytes),
            });
        }
        Some(ref p) => digests
            .iter()
            .zip(&p.digests)
            .map(|(a, b)| a != b)
            .collect(),
        None => vec![true; digests.len()],
    };
    let object = chunk_object(index);
    // Runs of changed blocks go, one after the other, into this chunk's new object; runs
    // of unchanged blocks keep pointing into the parent's objects.
    let block = BLOCK_SIZE as usize;
    let mut entries = Vec::new();
    let mut parts = Vec::new();
    let mut fresh: Vec<u8> = Vec::new();
    let mut a = 0;
    while a < changed.len() {
        let b = a + changed[a..]
            .iter()
            .take_while(|c| **c == changed[a])
            .count();
        let (from, to) = (a * block, (b * block).min(bytes.len()));
        let range = (offset + from as u64, offset + to as u64);
        if changed[a] {
            parts.push(entries.len());
            entries.push(ChunkEntry::Data {
                offset: range.0,
                length: range.1 - range.0,
                sha256: hex::encode(chunk_digest(&digests[a..b])),
                sha256_of: ChunkDigest::Blocks,
                compression: Compression::None,
                stored_length: 0,
                backup: id.to_string(),
                object: object.clone(),
                object_offset: fresh.len() as u64,
                object_length: None,
            });
            if a > 0 || b < changed.len() {
                fresh.extend_from_slice(&bytes[from..to]);
            }
        } else if let Some(p) = &before {
            entries.extend(reuse(&p.entries, range, &digests[a..b]));
        }
        a = b;
    }
    // The whole chunk changed: the object is the read buffer itself. Otherwise it is the
    // changed blocks, and the read buffer goes back to the reader.
    let (data, read_buffer) = if fresh.is_empty() {
        (bytes, None)
    } else {
        (fresh, Some(bytes))
    };
    let object_len = data.len() as u64;
    let (compression, stored, encoded_from) = match compression {
        Compression::Zstd if compressible(&data) => match compression.encode(&data, level) {
            Ok(c) if c.len() < data.len() => (compression, c, Some(data)),
            _ => (Compression::None, data, None),
        },
        _ => (Compression::None, data, None),
    };
    for i in parts {
        if let Some(ChunkEntry::Data {
            compression: c,
            stored_length,
            object_length,
            length,
            ..
        }) = entries.get_mut(i)
        {
            *c = compression;
            *stored_length = stored.len() as u64;
            if object_len != *length {
                *object_length = Some(object_len);
            }
        }
    }
    Ok(Done {
        entries,
        digests,
        fast,
        object: Some((object, stored)),
        stored: 0,
        spare: read_buffer.or(encoded_from),
    })
}

/// The parent's `entries` over `[from, to)` (block-aligned, inside one chunk), cut to it;
/// `digests` are the SHA-256 of its blocks. A cut entry points into its object at the same
/// bytes as before, with a digest of its own blocks.
fn reuse(entries: &[ChunkEntry], (from, to): (u64, u64), digests: &[Digest]) -> Vec<ChunkEntry> {
    let mut out = Vec::new();
    for e in entries {
        let (start, end) = (e.offset(), e.offset() + e.length());
        let (s, t) = (start.max(from), end.min(to));
        if s >= t {
            continue;
        }
        if (s, t) == (start, end) {
            out.push(e.clone());
            continue;
        }
        out.push(match e {
            ChunkEntry::Hole { .. } => ChunkEntry::Hole {
                offset: s,
                length: t - s,
            },
            ChunkEntry::Data {
                compression,
                stored_length,
                backup,
                object,
                object_offset,
                object_length,
                length,
                ..
            } => {
                let first = ((s - from) / BLOCK_SIZE) as usize;
                let last = (t - from).div_ceil(BLOCK_SIZE) as usize;
                ChunkEntry::Data {
                    offset: s,
                    length: t - s,
                    sha256: hex::encode(chunk_digest(&digests[first..last])),
                    sha256_of: ChunkDigest::Blocks,
                    compression: *compression,
                    stored_length: *stored_length,
                    backup: backup.clone(),
                    object: object.clone(),
                    object_offset: object_offset + (s - start),
                    object_length: Some(object_length.unwrap_or(*length)),
                }
            }
        });
    }
    out
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
    // Chunks left unread: only against a parent of the same size with BLAKE3 digests, which
    // then covers every chunk with its entries and both digests.
    let same = Arc::new(match &parent {
        Some(p) if p.fast.is_some() && p.meta.volume_size == size => {
            whole_chunks(&source.unchanged, chunk, size)
        }
        _ => Vec::new(),
    });
    let mapped = Arc::new(source.mapped.clone());
    let mut readers = Vec::new();
    let mut queues = Vec::new();
    for first in 0..READERS {
        let (tx, rx) = mpsc::channel(1);
        let (path, stop, buffers) = (source.path.clone(), stop.clone(), buffers.clone());
        let (same, mapped) = (same.clone(), mapped.clone());
        readers.push(tokio::task::spawn_blocking(move || {
            let grid = (size, chunk, first);
            let map = mapped.as_deref();
            if let Err(e) = read_grid(&path, grid, &same, map, &stop, &tx, &buffers) {
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
                Raw::Hole {
                    offset,
                    len,
                    unread,
                } => {
                    if unread {
                        progress.unallocated.fetch_add(len, Ordering::Relaxed);
                    }
                    hole(offset, len, None)
                }
                Raw::Same { offset, len } => {
                    let Some(Before {
                        entries,
                        digests,
                        fast: Some(fast),
                    }) = parent.as_ref().and_then(|p| p.before(offset, len))
                    else {
                        return Err(BackupError::Worker(format!(
                            "chunk at {offset} was left unread, but the parent does not cover it"
                        )));
                    };
                    progress.unread.fetch_add(len, Ordering::Relaxed);
                    Done {
                        entries,
                        digests,
                        fast,
                        object: None,
                        stored: 0,
                        spare: None,
                    }
                }
                Raw::Data {
                    index,
                    offset,
                    bytes,
                    zero,
                    fast,
                } => {
                    let len = bytes.len() as u64;
                    let before = parent.as_ref().and_then(|p| p.before(offset, len));
                    let data = (bytes, zero, fast);
                    let owner = id.clone();
                    worker(move || {
                        digest_chunk(&owner, (index, offset), data, before, compression, level)
                    })
                    .await?
                }
            };
            if let Some(b) = done.spare.take() {
                buffers.give(b);
            }
            if let Some((name, stored)) = done.object.take() {
                let n = stored.len() as u64;
                repo.put(&key(&id, &name), stored)
                    .await
                    .map_err(BackupError::repo(&repo_name))?;
                progress.stored.fetch_add(n, Ordering::Relaxed);
                done.stored = n;
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
                // Stored: a chunk with a new object (all of it or its changed blocks);
                // reused: a chunk with data and no new object.
                let mut data = false;
                for e in &d.entries {
                    match e {
                        ChunkEntry::Hole { length, .. } => stats.hole_bytes += length,
                        ChunkEntry::Data { length, .. } => {
                            stats.data_bytes += length;
                            data = true;
                        }
                    }
                    progress.done.fetch_add(e.length(), Ordering::Relaxed);
                }
                if d.stored > 0 {
                    stats.stored_chunks += 1;
                    stats.stored_bytes += d.stored;
                } else if data {
                    stats.reused_chunks += 1;
                }
                digests.extend(d.digests);
                fast.extend(d.fast);
                chunks.extend(d.entries);
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

/// The restore's units of work: each hole alone, and the entries of one chunk that share an
/// object together (the object is fetched and decoded once for all of them).
fn object_groups(entries: &[ChunkEntry], chunk_size: u64) -> Vec<Vec<ChunkEntry>> {
    let mut groups: Vec<Vec<ChunkEntry>> = Vec::new();
    let mut by_object: std::collections::HashMap<(u64, String), usize> = Default::default();
    for e in entries {
        let Some(k) = e.object_key() else {
            groups.push(vec![e.clone()]);
            continue;
        };
        let at = *by_object
            .entry((e.offset() / chunk_size.max(1), k))
            .or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
        groups[at].push(e.clone());
    }
    groups
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
    let mut work = futures::stream::iter(object_groups(&meta.chunks, meta.chunk_size))
        .map(|group| {
            let (repo, file, stop) = (repo.clone(), file.clone(), stop.clone());
            let path = target.path.clone();
            let repo_name = repo_name.clone();
            async move {
                if stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                let total: u64 = group.iter().map(ChunkEntry::length).sum();
                match group.first() {
                    None => {}
                    Some(ChunkEntry::Hole { offset, length }) => {
                        let (offset, length) = (*offset, *length);
                        worker(move || zero_range(&file, &path, offset, length)).await?
                    }
                    Some(
                        first @ ChunkEntry::Data {
                            compression,
                            length,
                            object_length,
                            ..
                        },
                    ) => {
                        let (compression, whole) = (*compression, object_length.unwrap_or(*length));
                        let k = first.object_key().unwrap_or_default();
                        let stored = match repo.get(&k).await {
                            Ok(b) => b,
                            Err(RepoError::NotFound { .. }) => {
                                return Err(BackupError::MissingObject(k))
                            }
                            Err(e) => return Err(BackupError::repo(&repo_name)(e)),
                        };
                        worker(move || {
                            let corrupt = |reason: String| BackupError::Corrupt {
                                object: k.clone(),
                                reason,
                            };
                            let data = compression.decode(stored, whole).map_err(corrupt)?;
                            for e in &group {
                                let ChunkEntry::Data {
                                    offset,
                                    length,
                                    sha256: want,
                                    sha256_of,
                                    object_offset,
                                    ..
                                } = e
                                else {
                                    continue;
                                };
                                let part = usize::try_from(*object_offset)
                                    .ok()
                                    .and_then(|from| data.get(from..from + *length as usize))
                                    .ok_or_else(|| {
                                        corrupt(format!("it has no bytes {object_offset}+{length}"))
                                    })?;
                                if !sha256_of.matches(part, want) {
                                    return Err(corrupt(
                                        "its SHA-256 differs from the one in the metadata".into(),
                                    ));
                                }
                                file.write_all_at(part, *offset)
                                    .map_err(BackupError::io("write", &path))?;
                            }
                            Ok(())
                        })
                        .await?
                    }
                }
                progress.done.fetch_add(total, Ordering::Relaxed);
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
            unchanged: Vec::new(),
            mapped: None,
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

    #[test]
    fn a_chunk_read_over_an_old_buffer_has_exactly_the_volume_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.img");
        let f = File::create(&p).unwrap();
        let piece = READ_PIECE as u64;
        f.set_len(8 * piece).unwrap();
        // Chunk 0: zeros then data in its third piece; chunk 1: data then zeros; chunk 2
        // (the last two pieces): all zeros.
        f.write_all_at(&[7u8; 100], 2 * piece + 5).unwrap();
        f.write_all_at(&[9u8; 100], 3 * piece - 100).unwrap();
        f.write_all_at(&[3u8; 100], 4 * piece).unwrap();
        let f = File::open(&p).unwrap();
        for (offset, len) in [
            (0, 3 * piece),
            (4 * piece, 2 * piece),
            (6 * piece, 2 * piece),
        ] {
            let mut bytes = vec![0xaa; len as usize];
            let (zero, fast) = read_chunk(&f, &p, offset, &mut bytes).unwrap();
            let mut want = vec![0u8; len as usize];
            f.read_exact_at(&mut want, offset).unwrap();
            let blocks: Vec<&[u8]> = want.chunks(BLOCK_SIZE as usize).collect();
            let want_zero: Vec<bool> = blocks.iter().map(|b| b.iter().all(|x| *x == 0)).collect();
            assert_eq!(zero, want_zero, "chunk at {offset}");
            let want_fast: Vec<Digest> = blocks.iter().map(|b| blake3(b)).collect();
            assert_eq!(fast, want_fast, "chunk at {offset}");
            if zero.iter().any(|z| !z) {
                assert!(
                    bytes == want,
                    "chunk at {offset}: bytes differ from the volume"
                );
            }
        }
    }

    /// Writes `bytes` into the test volume at `at`.
    fn write_into(vol: &Path, at: u64, bytes: &[u8]) {
        let f = std::fs::OpenOptions::new().write(true).open(vol).unwrap();
        f.write_all_at(bytes, at).unwrap();
    }

    /// Backup `id` of the test volume with the test settings.
    async fn back_up(
        repo: &Arc<dyn Repository>,
        id: &str,
        (vol, size): (&Path, u64),
        parent: Option<Parent>,
    ) -> Metadata {
        back_up_from(repo, id, &source(vol, size), parent).await.0
    }

    /// Backup `id` of `src` with the test settings, and its final progress.
    async fn back_up_from(
        repo: &Arc<dyn Repository>,
        id: &str,
        src: &Source,
        parent: Option<Parent>,
    ) -> (Metadata, Progress) {
        let progress = Progress::default();
        let parent = parent.map(Arc::new);
        let m = backup(repo.clone(), &bid(id), src, parent, &settings(), &progress)
            .await
            .unwrap();
        (m, progress)
    }

    #[tokio::test]
    async fn incremental_stores_changed_chunks_and_restores_through_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let (vol, size) = volume(dir.path());
        let repo = repo(dir.path());
        let s = settings();
        let full = back_up(&repo, "b1", (&vol, size), None).await;
        // Change one block of the text chunk and write into a former hole.
        write_into(&vol, 3 * MIB + 100, b"CHANGED");
        write_into(&vol, 7 * MIB, b"new data");
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
    async fn chunks_change_tracking_shows_unchanged_are_not_read_and_the_backup_is_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let (vol, size) = volume(dir.path());
        let repo = repo(dir.path());
        let full = back_up(&repo, "b1", (&vol, size), None).await;
        // One block of the text chunk (chunk 12) changes; the pool reports [3 MiB, 3 MiB +
        // 64 KiB) changed, so chunk 12 is read and the 31 others are not.
        write_into(&vol, 3 * MIB + 100, b"CHANGED");
        let parent = load_parent(repo.as_ref(), full).await.unwrap();
        let by_digest = back_up(&repo, "b2", (&vol, size), Some(parent.clone())).await;
        let mut src = source(&vol, size);
        src.unchanged = vec![(0, 3 * MIB), (3 * MIB + 64 * 1024, size)];
        let (tracked, progress) = back_up_from(&repo, "b3", &src, Some(parent.clone())).await;
        assert_eq!(progress.unread(), size - 256 * 1024);
        assert_eq!(progress.done(), size);
        // The same backup as one that read everything: table (bar the object owner of the
        // new chunk), digests and stats.
        assert_eq!(tracked.stats, by_digest.stats);
        assert_eq!(tracked.sha256file.sha256, by_digest.sha256file.sha256);
        assert_eq!(tracked.blake3file, by_digest.blake3file);
        let mut renamed = by_digest.chunks.clone();
        for e in &mut renamed {
            if let ChunkEntry::Data { backup, .. } = e {
                if backup == "b2" {
                    *backup = "b3".into();
                }
            }
        }
        assert_eq!(tracked.chunks, renamed);
        let t = blank(dir.path(), "restored", size);
        restore(
            repo.clone(),
            &tracked,
            &t,
            &settings(),
            &Progress::default(),
        )
        .await
        .unwrap();
        assert!(std::fs::read(&t.path).unwrap() == std::fs::read(&vol).unwrap());

        // Against a parent of another size, or one without BLAKE3 digests, everything is read.
        for (id, p) in [
            (
                "b4",
                Parent {
                    fast: None,
                    ..parent.clone()
                },
            ),
            (
                "b5",
                Parent {
                    meta: Metadata {
                        volume_size: size - MIB,
                        ..parent.meta.clone()
                    },
                    ..parent.clone()
                },
            ),
        ] {
            let (_, progress) = back_up_from(&repo, id, &src, Some(p)).await;
            assert_eq!(progress.unread(), 0, "{id}");
        }
    }

    #[tokio::test]
    async fn incrementals_store_only_changed_blocks_and_every_backup_of_the_chain_restores() {
        use rand::RngCore;
        let dir = tempfile::tempdir().unwrap();
        let (vol, size) = volume(dir.path());
        let repo = repo(dir.path());
        let s = settings();
        let bs = BLOCK_SIZE;
        let mut states = vec![std::fs::read(&vol).unwrap()];
        let full = back_up(&repo, "b1", (&vol, size), None).await;
        let scribble = |at: u64| {
            let mut junk = vec![0u8; 100];
            rand::thread_rng().fill_bytes(&mut junk);
            write_into(&vol, at, &junk);
        };
        // The random chunk at 1 MiB (8 blocks): its fourth block changes.
        scribble(MIB + 3 * bs + 10);
        states.push(std::fs::read(&vol).unwrap());
        let parent = load_parent(repo.as_ref(), full.clone()).await.unwrap();
        let b2 = back_up(&repo, "b2", (&vol, size), Some(parent)).await;
        let in_chunk = |m: &Metadata| -> Vec<(u64, u64, String, bool)> {
            m.chunks
                .iter()
                .filter(|c| (MIB..MIB + s.chunk_size).contains(&c.offset()))
                .map(|c| match c {
                    ChunkEntry::Data { backup, .. } => {
                        (c.offset() - MIB, c.length(), backup.clone(), c.is_part())
                    }
                    ChunkEntry::Hole { .. } => panic!("a hole in random data: {c:?}"),
                })
                .collect()
        };
        assert_eq!(
            in_chunk(&b2),
            [
                (0, 3 * bs, "b1".into(), true),
                (3 * bs, bs, "b2".into(), false),
                (4 * bs, 4 * bs, "b1".into(), true),
            ]
        );
        assert_eq!(b2.stats.stored_chunks, 1, "{:?}", b2.stats);
        let mut stored = repo.list("b2").await.unwrap();
        stored.retain(|o| o.starts_with("chunk-"));
        assert_eq!(stored, ["chunk-00000004"]);
        assert_eq!(
            repo.get("b2/chunk-00000004").await.unwrap().len() as u64,
            bs,
            "one random block, stored as it is"
        );

        // A second incremental on the first: a block of a range b2 took from b1, the block b2
        // stored, and the chunk's last block change.
        for at in [MIB + bs, MIB + 3 * bs + 500, MIB + 7 * bs + 1] {
            scribble(at);
        }
        states.push(std::fs::read(&vol).unwrap());
        let parent = load_parent(repo.as_ref(), b2.clone()).await.unwrap();
        let b3 = back_up(&repo, "b3", (&vol, size), Some(parent)).await;
        let owners: Vec<String> = in_chunk(&b3).into_iter().map(|e| e.2).collect();
        assert_eq!(owners, ["b1", "b3", "b1", "b3", "b1", "b3"]);
        assert_eq!(
            b3.referenced_backups(),
            ["b1"],
            "b2's block was overwritten"
        );

        // Every backup restores its own state of the volume.
        for (m, want) in [full, b2, b3].iter().zip(&states) {
            let t = blank(dir.path(), &format!("restored-{}", m.backup_id), size);
            restore(repo.clone(), m, &t, &s, &Progress::default())
                .await
                .unwrap();
            assert!(
                std::fs::read(&t.path).unwrap() == *want,
                "{} restored other bytes",
                m.backup_id
            );
        }
    }

    #[tokio::test]
    async fn a_corrupt_object_shared_by_parts_fails_the_restore_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let (vol, size) = volume(dir.path());
        let repo = repo(dir.path());
        let full = back_up(&repo, "b1", (&vol, size), None).await;
        write_into(&vol, MIB + 3 * BLOCK_SIZE, b"CHANGED");
        let parent = load_parent(repo.as_ref(), full).await.unwrap();
        let inc = back_up(&repo, "b2", (&vol, size), Some(parent)).await;
        // Flip a byte of b1's random chunk, in the range the incremental still uses.
        let obj = dir.path().join("repo/b1/chunk-00000004");
        let mut bytes = std::fs::read(&obj).unwrap();
        bytes[5 * BLOCK_SIZE as usize] ^= 1;
        std::fs::write(&obj, bytes).unwrap();
        let t = blank(dir.path(), "restored", size);
        let err = restore(repo, &inc, &t, &settings(), &Progress::default())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, BackupError::Corrupt { object, .. } if object == "b1/chunk-00000004"),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn incremental_on_a_parent_without_blake3file_compares_by_sha256() {
        let dir = tempfile::tempdir().unwrap();
        let (vol, size) = volume(dir.path());
        let repo = repo(dir.path());
        let full = back_up(&repo, "b1", (&vol, size), None).await;
        write_into(&vol, 3 * MIB + 100, b"CHANGED");
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

    #[tokio::test]
    async fn a_map_of_the_data_decides_what_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("mapped.img");
        let f = File::create(&p).unwrap();
        let size = 8 * MIB;
        f.set_len(size).unwrap();
        f.write_all_at(&[7u8; 4096], 0).unwrap();
        f.write_all_at(&[9u8; 4096], 5 * MIB).unwrap();
        drop(f);
        let chunk = settings().chunk_size;
        assert!(chunk <= MIB, "one chunk holds each write");
        let repo = repo(dir.path());
        // The pool maps the block at 5 MiB only (as a thin snapshot's map would say): the
        // bytes at 0 are not read, and the chunk there is a hole, unread.
        let mut src = source(&p, size);
        src.mapped = Some(vec![(5 * MIB, 5 * MIB + 65536)]);
        let progress = Progress::new(size);
        let m = backup(repo.clone(), &bid("m"), &src, None, &settings(), &progress)
            .await
            .unwrap();
        let data: Vec<u64> = m
            .chunks
            .iter()
            .filter(|c| matches!(c, ChunkEntry::Data { .. }))
            .map(ChunkEntry::offset)
            .collect();
        assert_eq!(data, [5 * MIB / chunk * chunk]);
        assert_eq!(progress.unallocated(), size - chunk);

        // Without a map, the file's own: both writes are read, the holes between them not.
        let progress = Progress::new(size);
        let m = backup(
            repo,
            &bid("n"),
            &source(&p, size),
            None,
            &settings(),
            &progress,
        )
        .await
        .unwrap();
        assert_eq!(m.stats.stored_chunks, 2);
        assert!(
            progress.unallocated() <= size - 2 * chunk,
            "{}",
            progress.unallocated()
        );
    }
}
