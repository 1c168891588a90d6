//! What a backup is inside a repository (format version 2; `docs/backup-format.md` says the
//! same for people).
//!
//! A backup `B` is a container `B/` holding:
//!
//! - `chunk-NNNNNNNN`: the volume's chunk number N (offset N × `chunk_size`), compressed;
//!   only chunks with data that changed since the parent are stored.
//! - `sha256file`: the SHA-256 of every 32 KiB block of the volume, raw 32-byte digests one
//!   after the other, compressed like the chunks.
//! - `blake3file` (version 2): the BLAKE3 of every block, laid out the same way. BLAKE3 is
//!   several times faster than SHA-256 here, so an incremental backup finds unchanged blocks
//!   with it and takes their SHA-256 from the parent's `sha256file` instead of rehashing them.
//! - `metadata`: JSON describing the volume and every chunk (its digest, where it is
//!   stored). Written last and atomically: a container without it is an unfinished backup.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::OnceLock;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::{BackupError, BLOCK_SIZE};
use crate::agent::BackupId;

/// The `format` field of every metadata object.
pub const FORMAT_NAME: &str = "cinderblock-backup";
/// The version this code writes; it reads every version up to this one.
pub const FORMAT_VERSION: u32 = 3;
/// The `format` field of an exported backup record.
pub const RECORD_FORMAT: &str = "cinderblock-backup-record";
/// Name of the metadata object in a container.
pub const METADATA: &str = "metadata";
/// Name of the block-digest object in a container.
pub const SHA256FILE: &str = "sha256file";
/// Name of the BLAKE3 block-digest object in a container (version 2).
pub const BLAKE3FILE: &str = "blake3file";
/// The status a complete backup's metadata carries.
pub const STATUS_AVAILABLE: &str = "available";

/// A SHA-256 digest.
pub type Digest = [u8; 32];

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> Digest {
    Sha256::digest(data).into()
}

/// BLAKE3 of `data`.
pub fn blake3(data: &[u8]) -> Digest {
    *::blake3::hash(data).as_bytes()
}

/// The SHA-256 a version-2 data chunk records: of its blocks' SHA-256 digests, one after the
/// other. The blocks are hashed once, for the `sha256file` and the chunk both.
pub fn chunk_digest(blocks: &[Digest]) -> Digest {
    let mut h = Sha256::new();
    for b in blocks {
        h.update(b);
    }
    h.finalize().into()
}

/// The SHA-256 digests of the 32 KiB blocks of `data`.
pub fn block_digests(data: &[u8]) -> Vec<Digest> {
    sha256_many(&data.chunks(BLOCK_SIZE as usize).collect::<Vec<_>>())
}

/// The SHA-256 of each of `pieces`. SHA-256 is one serial chain per message, so one core
/// hashes a single block at about 1.4 GB/s even with the CPU's SHA instructions; hashing
/// independent blocks side by side, one per SIMD lane (`tape-sha256`), doubles that on
/// AVX-512. The batch path is checked once per process against `sha2` on messages of the
/// lengths that matter (a block, and the padding edge cases); if it ever disagrees, every
/// digest is made one by one with `sha2` and an error is logged.
pub fn sha256_many(pieces: &[&[u8]]) -> Vec<Digest> {
    let mut out = vec![[0u8; 32]; pieces.len()];
    if batch_agrees() {
        tape_sha256::hash_many(pieces, &mut out);
    } else {
        for (o, p) in out.iter_mut().zip(pieces) {
            *o = sha256(p);
        }
    }
    out
}

/// Whether `tape-sha256`'s batch hashing gives `sha2`'s digests on this CPU (checked once).
fn batch_agrees() -> bool {
    static AGREES: OnceLock<bool> = OnceLock::new();
    *AGREES.get_or_init(|| {
        let data: Vec<u8> = (0..3 * BLOCK_SIZE as usize + 200)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let block = BLOCK_SIZE as usize;
        // More messages than any backend's lanes, of mixed lengths: empty, around one and
        // two 64-byte blocks and their padding edges, odd sizes, whole 32 KiB blocks.
        let mut pieces: Vec<&[u8]> = [0, 1, 55, 56, 63, 64, 65, 119, 120, 128, 1000, 4097]
            .iter()
            .map(|n| &data[7..7 + n])
            .collect();
        pieces.extend(data.chunks(block));
        pieces.extend(data[3..].chunks(block));
        pieces.extend(std::iter::repeat_n(&data[..block], 17));
        let mut got = vec![[0u8; 32]; pieces.len()];
        tape_sha256::hash_many(&pieces, &mut got);
        let agrees = pieces.iter().zip(&got).all(|(p, g)| sha256(p) == *g);
        if !agrees {
            tracing::error!(
                backend = tape_sha256::backend(),
                "batch SHA-256 disagrees with sha2 on this CPU: hashing one block at a time"
            );
        }
        agrees
    })
}

/// The digest of a full block of zeros (what every block of a hole contributes to the
/// `sha256file`), computed once.
pub fn zero_block_digest() -> Digest {
    zero_digest(BLOCK_SIZE)
}

/// `hash` of `len` zero bytes; a full block's from `full`, computed once.
fn zero_of(len: u64, hash: fn(&[u8]) -> Digest, full: &OnceLock<Digest>) -> Digest {
    if len == BLOCK_SIZE {
        *full.get_or_init(|| hash(&[0u8; BLOCK_SIZE as usize]))
    } else {
        hash(&vec![0u8; len as usize])
    }
}

/// The digest of a zero block of `len` bytes (`len` < 32 KiB only for a volume's last block).
pub fn zero_digest(len: u64) -> Digest {
    static FULL: OnceLock<Digest> = OnceLock::new();
    zero_of(len, sha256, &FULL)
}

/// The BLAKE3 of a zero block of `len` bytes (for the `blake3file`).
pub fn zero_fast_digest(len: u64) -> Digest {
    static FULL: OnceLock<Digest> = OnceLock::new();
    zero_of(len, blake3, &FULL)
}

/// Number of 32 KiB blocks covering `bytes`.
pub fn blocks_in(bytes: u64) -> u64 {
    bytes.div_ceil(BLOCK_SIZE)
}

/// Key of an object of a container, relative to the repository's root.
pub fn key(backup: &BackupId, object: &str) -> String {
    format!("{backup}/{object}")
}

/// Name of chunk number `index` in its container.
pub fn chunk_object(index: u64) -> String {
    format!("chunk-{index:08}")
}

/// How an object's bytes are encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Stored as is.
    None,
    /// zstd frames, one after the other (a reader decodes them all).
    Zstd,
}

thread_local! {
    // zstd contexts kept by each worker thread: making one per chunk allocates and clears
    // its tables every time.
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

/// A zstd-encoded object is a run of frames, each of at most this many bytes of the chunk.
/// zstd sizes its match tables to the input: at 512 KiB they stay in a core's cache, which
/// compresses text-like data at level 3 about a quarter faster than one frame for a 4 MiB
/// chunk, and no worse (each frame's window is the whole frame).
const ZSTD_FRAME: usize = 512 << 10;

fn zstd_compress(data: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        let (_, c) = match &mut *cell {
            Some(kept) if kept.0 == level => kept,
            slot => slot.insert((level, zstd::bulk::Compressor::new(level)?)),
        };
        // An empty input is still one (empty) frame.
        let frames: Vec<&[u8]> = if data.is_empty() {
            vec![data]
        } else {
            data.chunks(ZSTD_FRAME).collect()
        };
        let bound = frames
            .iter()
            .map(|f| zstd::zstd_safe::compress_bound(f.len()))
            .sum();
        let mut out = std::io::Cursor::new(Vec::with_capacity(bound));
        for f in frames {
            let n = c.compress_to_buffer(f, &mut out)?;
            out.set_position(out.position() + n as u64);
        }
        Ok(out.into_inner())
    })
}

fn zstd_decompress(data: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    DECOMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        match &mut *cell {
            Some(d) => d.decompress(data, capacity),
            slot => {
                let mut d = zstd::bulk::Decompressor::new()?;
                let out = d.decompress(data, capacity);
                *slot = Some(d);
                out
            }
        }
    })
}

impl Compression {
    /// Encodes `data`; zstd at `level`.
    pub fn encode(self, data: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
        match self {
            Compression::None => Ok(data.to_vec()),
            Compression::Zstd => zstd_compress(data, level),
        }
    }

    /// Decodes an object that must hold exactly `len` bytes once decoded.
    pub fn decode(self, stored: Vec<u8>, len: u64) -> Result<Vec<u8>, String> {
        let data = match self {
            Compression::None => stored,
            Compression::Zstd => zstd_decompress(&stored, len as usize)
                .map_err(|e| format!("cannot decompress: {e}"))?,
        };
        if data.len() as u64 != len {
            return Err(format!("holds {} bytes, expected {len}", data.len()));
        }
        Ok(data)
    }

    /// The name used in configuration and metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Zstd => "zstd",
        }
    }
}

/// What the `sha256` of a data chunk is the digest of.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChunkDigest {
    /// The uncompressed bytes (version 1; the default when the field is absent).
    #[default]
    Data,
    /// The SHA-256 digests of the chunk's 32 KiB blocks, one after the other
    /// ([`chunk_digest`]; version 2).
    Blocks,
}

impl ChunkDigest {
    fn is_data(&self) -> bool {
        *self == ChunkDigest::Data
    }

    /// Whether `data` (a chunk, uncompressed) has the hex digest `want`.
    pub fn matches(self, data: &[u8], want: &str) -> bool {
        let got = match self {
            ChunkDigest::Data => sha256(data),
            ChunkDigest::Blocks => chunk_digest(&block_digests(data)),
        };
        hex::encode(got) == want
    }
}

/// One range of the volume: a hole (all zeros, nothing stored) or data in an object. A range
/// never crosses the chunk grid; a chunk is one entry, or several when an incremental backup
/// stored only its changed blocks (version 3).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum ChunkEntry {
    /// `length` zero bytes at `offset`.
    Hole {
        /// Offset in the volume.
        offset: u64,
        /// Length.
        length: u64,
    },
    /// `length` bytes at `offset`, stored in `backup`'s container as `object`.
    Data {
        /// Offset in the volume.
        offset: u64,
        /// Length (uncompressed).
        length: u64,
        /// SHA-256, hex, of what `sha256_of` says.
        sha256: String,
        /// What `sha256` is the digest of.
        #[serde(default, skip_serializing_if = "ChunkDigest::is_data")]
        sha256_of: ChunkDigest,
        /// How the object is encoded.
        compression: Compression,
        /// Size of the stored object.
        stored_length: u64,
        /// The backup whose container holds the object: this one, or an ancestor for a
        /// chunk an incremental backup found unchanged.
        backup: String,
        /// Object name in that container.
        object: String,
        /// Where these bytes begin in the decoded object (version 3; 0 when absent).
        #[serde(default, skip_serializing_if = "is_zero")]
        object_offset: u64,
        /// Length of the whole decoded object when it is not `length` (version 3): the
        /// object holds more than this range.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        object_length: Option<u64>,
    },
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl ChunkEntry {
    /// Offset in the volume.
    pub fn offset(&self) -> u64 {
        match self {
            ChunkEntry::Hole { offset, .. } | ChunkEntry::Data { offset, .. } => *offset,
        }
    }

    /// Length in the volume.
    pub fn length(&self) -> u64 {
        match self {
            ChunkEntry::Hole { length, .. } | ChunkEntry::Data { length, .. } => *length,
        }
    }

    /// Whether this is part of an object rather than all of it.
    pub fn is_part(&self) -> bool {
        matches!(self, ChunkEntry::Data { object_offset, object_length, .. } if *object_offset != 0 || object_length.is_some())
    }

    /// The object's key relative to the repository root (`None` for a hole).
    pub fn object_key(&self) -> Option<String> {
        match self {
            ChunkEntry::Hole { .. } => None,
            ChunkEntry::Data { backup, object, .. } => Some(format!("{backup}/{object}")),
        }
    }
}

/// Where a file of block digests (`sha256file`, `blake3file`) is and how to check it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sha256FileInfo {
    /// Object name in the container.
    pub object: String,
    /// How it is encoded.
    pub compression: Compression,
    /// Number of digests (blocks).
    pub blocks: u64,
    /// SHA-256 of the raw digests (decoded), hex (for both files).
    pub sha256: String,
}

/// What a backup stored and reused.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupStats {
    /// Bytes of the volume in data chunks.
    pub data_bytes: u64,
    /// Bytes of the volume in holes.
    pub hole_bytes: u64,
    /// Chunks stored by this backup.
    pub stored_chunks: u64,
    /// Bytes of the objects this backup stored (compressed chunks and sha256file).
    pub stored_bytes: u64,
    /// Unchanged chunks taken from the parent's chain.
    pub reused_chunks: u64,
}

/// The `metadata` object of a backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    /// Always [`FORMAT_NAME`].
    pub format: String,
    /// Format version.
    pub version: u32,
    /// The backup's id (= its container's name).
    pub backup_id: String,
    /// [`STATUS_AVAILABLE`]: the metadata is written only when the backup is complete.
    pub status: String,
    /// The source volume's id.
    pub volume_id: String,
    /// The source volume's size (what a restore target needs at least).
    pub volume_size: u64,
    /// The source volume's type.
    pub volume_type: String,
    /// The source volume's caller-owned metadata.
    #[serde(default)]
    pub volume_metadata: BTreeMap<String, String>,
    /// When the backup started (Unix seconds).
    pub created_at: u64,
    /// When it completed (Unix seconds).
    pub completed_at: u64,
    /// The backup an incremental one builds on.
    #[serde(default)]
    pub parent_id: Option<String>,
    /// Chunk size (every chunk but the last has this length).
    pub chunk_size: u64,
    /// Block size of the sha256file (32 KiB).
    pub block_size: u64,
    /// Compression of new objects.
    pub compression: Compression,
    /// The block digests.
    pub sha256file: Sha256FileInfo,
    /// The BLAKE3 block digests (version 2; absent in version 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blake3file: Option<Sha256FileInfo>,
    /// What was stored and reused.
    pub stats: BackupStats,
    /// Every chunk of the volume, in offset order, covering it exactly.
    pub chunks: Vec<ChunkEntry>,
}

fn format_err(object: &str, reason: impl Into<String>) -> BackupError {
    BackupError::Format {
        object: object.to_owned(),
        reason: reason.into(),
    }
}

fn is_hex_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn is_object_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

impl Metadata {
    /// The backup's id.
    pub fn id(&self) -> Result<BackupId, BackupError> {
        BackupId::parse(&self.backup_id)
            .map_err(|e| format_err(&self.backup_id, format!("backup_id: {e}")))
    }

    /// The parent's id, for an incremental backup.
    pub fn parent(&self) -> Result<Option<BackupId>, BackupError> {
        self.parent_id
            .as_deref()
            .map(|p| {
                BackupId::parse(p)
                    .map_err(|e| format_err(&self.backup_id, format!("parent_id: {e}")))
            })
            .transpose()
    }

    /// Serialises to the stored JSON.
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain structs, maps with string keys and integers cannot fail.
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// Parses and checks a stored metadata object (`object` names it in errors).
    pub fn parse(bytes: &[u8], object: &str) -> Result<Metadata, BackupError> {
        // Read the version first, so a newer format is reported as such rather than as an
        // unknown field.
        #[derive(Deserialize)]
        struct Head {
            format: String,
            version: u32,
        }
        let head: Head =
            serde_json::from_slice(bytes).map_err(|e| format_err(object, e.to_string()))?;
        if head.format != FORMAT_NAME {
            return Err(format_err(
                object,
                format!("format is {:?}, not {FORMAT_NAME:?}", head.format),
            ));
        }
        if head.version == 0 || head.version > FORMAT_VERSION {
            return Err(format_err(
                object,
                format!(
                    "format version {} is not supported (this agent reads 1..={FORMAT_VERSION})",
                    head.version
                ),
            ));
        }
        let m: Metadata =
            serde_json::from_slice(bytes).map_err(|e| format_err(object, e.to_string()))?;
        m.check(object)?;
        Ok(m)
    }

    /// Checks the invariants: ids, sizes, a chunk table that covers the volume exactly with
    /// well-formed entries.
    pub fn check(&self, object: &str) -> Result<(), BackupError> {
        let id = self.id()?;
        let parent = self.parent()?;
        if self.status != STATUS_AVAILABLE {
            return Err(format_err(object, format!("status is {:?}", self.status)));
        }
        if self.block_size != BLOCK_SIZE {
            return Err(format_err(
                object,
                format!("block_size {} is not {BLOCK_SIZE}", self.block_size),
            ));
        }
        if self.chunk_size == 0 || !self.chunk_size.is_multiple_of(BLOCK_SIZE) {
            return Err(format_err(
                object,
                format!(
                    "chunk_size {} is not a multiple of {BLOCK_SIZE}",
                    self.chunk_size
                ),
            ));
        }
        let fits = |f: &Sha256FileInfo| {
            f.blocks == blocks_in(self.volume_size)
                && is_hex_digest(&f.sha256)
                && is_object_name(&f.object)
        };
        if !fits(&self.sha256file) {
            return Err(format_err(
                object,
                "sha256file entry does not fit the volume",
            ));
        }
        if self.blake3file.as_ref().is_some_and(|f| !fits(f)) {
            return Err(format_err(
                object,
                "blake3file entry does not fit the volume",
            ));
        }
        let mut pos = 0u64;
        for (i, c) in self.chunks.iter().enumerate() {
            let bad = |why: &str| format_err(object, format!("chunk {i}: {why}"));
            if c.offset() != pos {
                return Err(bad(&format!(
                    "offset {} where {pos} was expected",
                    c.offset()
                )));
            }
            if c.length() == 0 || c.length() > self.chunk_size {
                return Err(bad(&format!("length {}", c.length())));
            }
            if c.offset() / self.chunk_size != (c.offset() + c.length() - 1) / self.chunk_size {
                return Err(bad("crosses the chunk grid"));
            }
            if let ChunkEntry::Data {
                sha256,
                sha256_of,
                backup,
                object: name,
                length,
                object_offset,
                object_length,
                ..
            } = c
            {
                if !is_hex_digest(sha256) || !is_object_name(name) {
                    return Err(bad("malformed digest or object name"));
                }
                if c.is_part() {
                    if self.version < 3 {
                        return Err(bad("parts of objects need format version 3"));
                    }
                    let whole = object_length.unwrap_or(*length);
                    if object_offset
                        .checked_add(*length)
                        .is_none_or(|end| end > whole)
                        || whole > self.chunk_size
                    {
                        return Err(bad("its range is outside its object"));
                    }
                    if *sha256_of != ChunkDigest::Blocks {
                        return Err(bad("a part of an object needs a digest of its blocks"));
                    }
                }
                let owner = BackupId::parse(backup).map_err(|e| bad(&e.to_string()))?;
                if owner != id && parent.is_none() {
                    return Err(bad("a full backup refers to another backup's object"));
                }
            }
            pos += c.length();
        }
        if pos != self.volume_size {
            return Err(format_err(
                object,
                format!(
                    "chunks cover {pos} bytes of a {}-byte volume",
                    self.volume_size
                ),
            ));
        }
        Ok(())
    }

    /// Ids of other backups whose objects this one uses.
    pub fn referenced_backups(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .chunks
            .iter()
            .filter_map(|c| match c {
                ChunkEntry::Data { backup, .. } if *backup != self.backup_id => {
                    Some(backup.clone())
                }
                _ => None,
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

/// Encodes block digests as stored in a `sha256file` (before compression).
pub fn encode_digests(digests: &[Digest]) -> Vec<u8> {
    digests.concat()
}

/// Decodes a `sha256file` (after decompression), checking it against its metadata entry.
pub fn decode_digests(
    raw: &[u8],
    info: &Sha256FileInfo,
    object: &str,
) -> Result<Vec<Digest>, BackupError> {
    if hex::encode(sha256(raw)) != info.sha256 {
        return Err(BackupError::Corrupt {
            object: object.to_owned(),
            reason: "its SHA-256 differs from the one in the metadata".into(),
        });
    }
    if raw.len() as u64 != info.blocks * 32 {
        return Err(BackupError::Corrupt {
            object: object.to_owned(),
            reason: format!("{} bytes for {} digests", raw.len(), info.blocks),
        });
    }
    Ok(raw
        .chunks_exact(32)
        .map(|c| {
            let mut d = [0u8; 32];
            d.copy_from_slice(c);
            d
        })
        .collect())
}

/// An exported backup record (Cinder's `backup-export`): the metadata and the repository
/// that held it, as base64 of JSON so it can be pasted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupRecord {
    /// Always [`RECORD_FORMAT`].
    pub format: String,
    /// Record version (1).
    pub version: u32,
    /// The repository the backup was exported from.
    pub repository: String,
    /// The backup's metadata.
    pub metadata: Metadata,
}

impl BackupRecord {
    /// The record's text form.
    pub fn encode(&self) -> String {
        base64::engine::general_purpose::STANDARD
            .encode(serde_json::to_vec(self).unwrap_or_default())
    }

    /// Parses a record's text form (surrounding whitespace ignored) and checks its metadata.
    pub fn decode(text: &str) -> Result<BackupRecord, BackupError> {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|e| BackupError::Record(format!("not base64: {e}")))?;
        let r: BackupRecord = serde_json::from_slice(&raw)
            .map_err(|e| BackupError::Record(format!("not a backup record: {e}")))?;
        if r.format != RECORD_FORMAT || r.version != 1 {
            return Err(BackupError::Record(format!(
                "format {:?} version {} is not {RECORD_FORMAT:?} version 1",
                r.format, r.version
            )));
        }
        r.metadata.check("record")?;
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn many_digests_at_once_are_the_digests_one_at_a_time() {
        use rand::RngCore;
        assert!(batch_agrees(), "backend {}", tape_sha256::backend());
        let mut data = vec![0u8; 5 * BLOCK_SIZE as usize];
        rand::thread_rng().fill_bytes(&mut data);
        let mut pieces: Vec<&[u8]> = data.chunks(BLOCK_SIZE as usize).collect();
        pieces.extend((0..40).map(|i| &data[i * 13..i * 13 + i * 977]));
        let want: Vec<Digest> = pieces.iter().map(|p| sha256(p)).collect();
        assert_eq!(sha256_many(&pieces), want);
        assert!(sha256_many(&[]).is_empty());
        assert_eq!(block_digests(&data[..BLOCK_SIZE as usize + 10]).len(), 2);
    }

    fn sample() -> Metadata {
        let cs = 4 * BLOCK_SIZE;
        Metadata {
            format: FORMAT_NAME.into(),
            version: FORMAT_VERSION,
            backup_id: "b2".into(),
            status: STATUS_AVAILABLE.into(),
            volume_id: "v1".into(),
            volume_size: 2 * cs + BLOCK_SIZE,
            volume_type: "default".into(),
            volume_metadata: BTreeMap::from([("app".into(), "db".into())]),
            created_at: 1_700_000_000,
            completed_at: 1_700_000_060,
            parent_id: Some("b1".into()),
            chunk_size: cs,
            block_size: BLOCK_SIZE,
            compression: Compression::Zstd,
            sha256file: Sha256FileInfo {
                object: SHA256FILE.into(),
                compression: Compression::Zstd,
                blocks: 9,
                sha256: "ab".repeat(32),
            },
            blake3file: Some(Sha256FileInfo {
                object: BLAKE3FILE.into(),
                compression: Compression::Zstd,
                blocks: 9,
                sha256: "ba".repeat(32),
            }),
            stats: BackupStats::default(),
            chunks: vec![
                ChunkEntry::Data {
                    offset: 0,
                    length: cs,
                    sha256: "cd".repeat(32),
                    sha256_of: ChunkDigest::Data,
                    compression: Compression::Zstd,
                    stored_length: 100,
                    backup: "b1".into(),
                    object: chunk_object(0),
                    object_offset: 0,
                    object_length: None,
                },
                ChunkEntry::Hole {
                    offset: cs,
                    length: cs,
                },
                ChunkEntry::Data {
                    offset: 2 * cs,
                    length: BLOCK_SIZE,
                    sha256: "ef".repeat(32),
                    sha256_of: ChunkDigest::Blocks,
                    compression: Compression::None,
                    stored_length: 2 * BLOCK_SIZE,
                    backup: "b2".into(),
                    object: chunk_object(2),
                    // The second block of an object of two (version 3).
                    object_offset: BLOCK_SIZE,
                    object_length: Some(2 * BLOCK_SIZE),
                },
            ],
        }
    }

    #[test]
    fn metadata_round_trips_and_reads_back_the_same() {
        let m = sample();
        let json = m.to_json();
        let text = String::from_utf8(json.clone()).unwrap();
        assert!(text.contains("\"kind\": \"hole\""), "{text}");
        assert!(text.contains("\"object\": \"chunk-00000002\""), "{text}");
        assert!(text.contains("\"object_offset\": 32768"), "{text}");
        // Whole objects do not carry the version-3 fields.
        assert_eq!(text.matches("object_offset").count(), 1, "{text}");
        assert_eq!(text.matches("object_length").count(), 1, "{text}");
        assert!(m.chunks[2].is_part() && !m.chunks[0].is_part());
        assert_eq!(Metadata::parse(&json, "b2/metadata").unwrap(), m);
        assert_eq!(m.referenced_backups(), vec!["b1".to_string()]);
        assert_eq!(
            m.chunks[0].object_key().as_deref(),
            Some("b1/chunk-00000000")
        );
        assert_eq!(m.chunks[1].object_key(), None);
    }

    #[test]
    fn chunk_table_must_cover_the_volume() {
        type Breaker = Box<dyn Fn(&mut Metadata)>;
        let cases: Vec<(&str, Breaker)> = vec![
            ("gap", Box::new(|m| drop(m.chunks.remove(1)))),
            ("short", Box::new(|m| m.volume_size += 1)),
            ("too long", Box::new(|m| m.chunk_size = BLOCK_SIZE)),
            ("odd chunk size", Box::new(|m| m.chunk_size = 1000)),
            (
                "bad digest",
                Box::new(|m| {
                    if let ChunkEntry::Data { sha256, .. } = &mut m.chunks[0] {
                        *sha256 = "xyz".into();
                    }
                }),
            ),
            (
                "path in object",
                Box::new(|m| {
                    if let ChunkEntry::Data { object, .. } = &mut m.chunks[2] {
                        *object = "../../etc/passwd".into();
                    }
                }),
            ),
            (
                "full backup using another's object",
                Box::new(|m| m.parent_id = None),
            ),
            ("not complete", Box::new(|m| m.status = "creating".into())),
            (
                "part beyond its object",
                Box::new(|m| {
                    if let ChunkEntry::Data { object_offset, .. } = &mut m.chunks[2] {
                        *object_offset = BLOCK_SIZE + 1;
                    }
                }),
            ),
            (
                "part of an object with a data digest",
                Box::new(|m| {
                    if let ChunkEntry::Data { sha256_of, .. } = &mut m.chunks[2] {
                        *sha256_of = ChunkDigest::Data;
                    }
                }),
            ),
            ("part in version 2", Box::new(|m| m.version = 2)),
            (
                "entry across the chunk grid",
                Box::new(|m| {
                    let cs = m.chunk_size;
                    if let ChunkEntry::Data { length, .. } = &mut m.chunks[0] {
                        *length = cs - BLOCK_SIZE;
                    }
                    m.chunks[1] = ChunkEntry::Hole {
                        offset: cs - BLOCK_SIZE,
                        length: cs,
                    };
                }),
            ),
        ];
        for (name, break_it) in cases {
            let mut m = sample();
            break_it(&mut m);
            let err = Metadata::parse(&m.to_json(), "b2/metadata").unwrap_err();
            assert!(matches!(err, BackupError::Format { .. }), "{name}: {err:?}");
        }
    }

    #[test]
    fn newer_format_versions_are_refused_by_name() {
        let mut m = sample();
        m.version = FORMAT_VERSION + 1;
        let err = Metadata::parse(&m.to_json(), "b2/metadata").unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("version {} is not supported", FORMAT_VERSION + 1)),
            "{err}"
        );
        let err = Metadata::parse(b"{\"format\":\"x\",\"version\":1}", "o").unwrap_err();
        assert!(
            err.to_string().contains("not \"cinderblock-backup\""),
            "{err}"
        );
    }

    #[test]
    fn version_1_metadata_reads_as_whole_chunk_digests_without_blake3file() {
        let mut m = sample();
        m.version = 1;
        m.blake3file = None;
        if let ChunkEntry::Data {
            sha256_of,
            object_offset,
            object_length,
            ..
        } = &mut m.chunks[2]
        {
            *sha256_of = ChunkDigest::Data;
            (*object_offset, *object_length) = (0, None);
        }
        let text = String::from_utf8(m.to_json()).unwrap();
        assert!(
            !text.contains("sha256_of") && !text.contains("blake3file"),
            "{text}"
        );
        assert_eq!(Metadata::parse(text.as_bytes(), "b2/metadata").unwrap(), m);

        let mut bad = sample();
        bad.blake3file.as_mut().unwrap().blocks = 8;
        let err = Metadata::parse(&bad.to_json(), "b2/metadata").unwrap_err();
        assert!(err.to_string().contains("blake3file"), "{err}");
    }

    #[test]
    fn chunk_digests_cover_the_bytes_or_the_block_digests() {
        let data: Vec<u8> = (0..(2 * BLOCK_SIZE + 100))
            .map(|i| (i % 251) as u8)
            .collect();
        let blocks = block_digests(&data);
        assert_eq!(blocks.len(), 3);
        assert_eq!(blocks[2], sha256(&data[2 * BLOCK_SIZE as usize..]));
        let whole = hex::encode(sha256(&data));
        let listed = hex::encode(chunk_digest(&blocks));
        assert_eq!(listed, hex::encode(sha256(&blocks.concat())));
        assert!(ChunkDigest::Data.matches(&data, &whole));
        assert!(ChunkDigest::Blocks.matches(&data, &listed));
        assert!(!ChunkDigest::Blocks.matches(&data, &whole));
        let mut flipped = data.clone();
        flipped[40_000] ^= 1;
        assert!(!ChunkDigest::Blocks.matches(&flipped, &listed));
        assert_eq!(zero_fast_digest(BLOCK_SIZE), blake3(&[0u8; 32768]));
        assert_ne!(zero_fast_digest(BLOCK_SIZE), zero_block_digest());
    }

    #[test]
    fn digests_round_trip_and_are_checked() {
        let digests = vec![sha256(b"a"), zero_block_digest(), sha256(b"c")];
        let raw = encode_digests(&digests);
        let info = Sha256FileInfo {
            object: SHA256FILE.into(),
            compression: Compression::None,
            blocks: 3,
            sha256: hex::encode(sha256(&raw)),
        };
        assert_eq!(
            decode_digests(&raw, &info, "b/sha256file").unwrap(),
            digests
        );
        let mut bad = raw.clone();
        bad[5] ^= 1;
        assert!(matches!(
            decode_digests(&bad, &info, "b/sha256file"),
            Err(BackupError::Corrupt { .. })
        ));
        assert_eq!(zero_digest(BLOCK_SIZE), sha256(&[0u8; 32768]));
        assert_eq!(zero_digest(512), sha256(&[0u8; 512]));
    }

    #[test]
    fn compression_round_trips_and_checks_length() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 7) as u8).collect();
        for c in [Compression::None, Compression::Zstd] {
            let stored = c.encode(&data, 3).unwrap();
            assert_eq!(c.decode(stored.clone(), data.len() as u64).unwrap(), data);
            assert!(c.decode(stored, data.len() as u64 + 1).is_err());
        }
        assert!(Compression::Zstd.encode(&data, 3).unwrap().len() < data.len() / 10);
        assert!(Compression::Zstd.decode(vec![1, 2, 3], 10).is_err());
    }

    #[test]
    fn a_large_chunk_is_stored_as_512_kib_frames_and_decodes_whole() {
        // 1.25 MiB: two whole frames and a half one.
        let data: Vec<u8> = (0..(5u32 << 18))
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 27) as u8)
            .collect();
        let stored = Compression::Zstd.encode(&data, 3).unwrap();
        // Each frame's decoded size, and the encoded size of the last one.
        let (mut frames, mut last) = (Vec::new(), 0);
        let mut rest = &stored[..];
        while !rest.is_empty() {
            last = zstd::zstd_safe::find_frame_compressed_size(rest).unwrap();
            frames.push(
                zstd::bulk::decompress(&rest[..last], ZSTD_FRAME)
                    .unwrap()
                    .len(),
            );
            rest = &rest[last..];
        }
        assert_eq!(frames, [ZSTD_FRAME, ZSTD_FRAME, ZSTD_FRAME / 2]);
        let len = data.len() as u64;
        assert_eq!(Compression::Zstd.decode(stored.clone(), len).unwrap(), data);
        // A frame lost from the end is a short object, not a shorter chunk.
        let cut = stored.len() - last;
        assert!(Compression::Zstd
            .decode(stored[..cut].to_vec(), len)
            .is_err());
        // An empty chunk is one empty frame.
        let empty = Compression::Zstd.encode(&[], 3).unwrap();
        assert!(!empty.is_empty());
        assert_eq!(
            Compression::Zstd.decode(empty, 0).unwrap(),
            Vec::<u8>::new()
        );
    }

    #[test]
    fn records_round_trip_and_reject_garbage() {
        let r = BackupRecord {
            format: RECORD_FORMAT.into(),
            version: 1,
            repository: "local".into(),
            metadata: sample(),
        };
        let text = r.encode();
        assert_eq!(BackupRecord::decode(&format!("  {text}\n")).unwrap(), r);
        for bad in ["%%%", "aGVsbG8=", ""] {
            assert!(
                matches!(BackupRecord::decode(bad), Err(BackupError::Record(_))),
                "{bad}"
            );
        }
    }
}
