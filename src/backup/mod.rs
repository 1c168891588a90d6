//! Backups: Cinder's backup service, run by the storage agent. A backup lives outside the
//! pool, in a repository (a directory or an S3 bucket), and does not depend on its source
//! volume: the volume can be deleted and the backup restored onto a new one.
//!
//! - [`format`]: what a backup is in a repository (chunk table, `metadata`, `sha256file`);
//!   documented for people in `docs/backup-format.md`.
//! - [`repo`]: the [`repo::Repository`] seam with its POSIX-directory and S3 implementations.
//! - [`engine`]: the bounded read → hash → compress → write pipeline and its inverse.
//!
//! The agent (`crate::agent::service`) decides what to read and where to restore, holds the
//! volume guards and keeps the records of running and failed backups; this module only moves
//! and checks bytes.

pub mod engine;
pub mod format;
pub mod repo;

use std::sync::{Mutex, PoisonError};

use crate::agent::BackupId;

pub use repo::RepoError;

/// Size of the blocks whose digests make up a backup's `sha256file` (Cinder's 32 KiB).
pub const BLOCK_SIZE: u64 = 32 * 1024;

/// Chunk-sized buffers given back once used, so that a pipeline neither allocates nor has
/// the kernel zero fresh memory for every chunk: the engine's read buffers, a POSIX
/// repository's `O_DIRECT` staging buffers. Holds at most `keep`.
#[derive(Debug)]
pub(crate) struct Buffers {
    // The buffers free for reuse. Locked for a take, a give or a clear, never while a
    // buffer is used.
    free: Mutex<Vec<Vec<u8>>>,
    keep: usize,
}

impl Buffers {
    /// An empty pool that keeps at most `keep` buffers.
    pub(crate) fn new(keep: usize) -> Self {
        Buffers {
            free: Mutex::new(Vec::new()),
            keep,
        }
    }

    /// A buffer of `len` bytes (their content is whatever was there).
    pub(crate) fn take(&self, len: usize) -> Vec<u8> {
        let mut b = self.free().pop().unwrap_or_default();
        b.resize(len, 0);
        b
    }

    /// Gives `b` back for reuse (dropped when the pool is full).
    pub(crate) fn give(&self, b: Vec<u8>) {
        let mut free = self.free();
        if free.len() < self.keep {
            free.push(b);
        }
    }

    /// Lets every kept buffer go.
    pub(crate) fn clear(&self) {
        self.free().clear();
    }

    /// How many buffers are kept now.
    #[cfg(test)]
    pub(crate) fn kept(&self) -> usize {
        self.free().len()
    }

    fn free(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        self.free.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Everything that can go wrong with a backup. Mapped to gRPC codes in `agent_rpc::status`.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// No backup has this id in any repository.
    #[error("backup {0} not found")]
    NotFound(BackupId),
    /// No repository of that name is configured on this agent.
    #[error("backup repository {0:?} is not configured on this agent")]
    RepositoryNotFound(String),
    /// The agent has no `[[backup_repositories]]`.
    #[error("no backup repository is configured on this agent")]
    NoRepository,
    /// The id exists with other parameters (a retry must repeat the same request).
    #[error("backup {id} already exists: {reason}")]
    AlreadyExists {
        /// The backup.
        id: BackupId,
        /// What differs.
        reason: String,
    },
    /// The volume is exported (in use): a backup needs `force` (crash-consistent copy).
    #[error("volume {0} is in use (exported); back it up with force for a crash-consistent copy")]
    InUse(String),
    /// An incremental backup needs an earlier complete backup of the volume.
    #[error("volume {volume} has no complete backup in repository {repository} to base an incremental backup on")]
    NoParent {
        /// The volume.
        volume: String,
        /// The repository searched.
        repository: String,
    },
    /// Incremental backups depend on this one (Cinder's rule: delete them first).
    #[error("backup {id} has dependent incremental backup(s) {dependents:?}; delete them first")]
    HasDependents {
        /// The backup.
        id: BackupId,
        /// Backups whose parent it is.
        dependents: Vec<BackupId>,
    },
    /// The backup is not complete (still running, failed, or interrupted).
    #[error("backup {id} is {status}, not available")]
    NotAvailable {
        /// The backup.
        id: BackupId,
        /// Its status.
        status: String,
    },
    /// A backup this one builds on is missing from the repository.
    #[error("backup {id} needs backup {missing}, which is not in repository {repository}")]
    ChainBroken {
        /// The backup.
        id: BackupId,
        /// The missing ancestor.
        missing: BackupId,
        /// The repository.
        repository: String,
    },
    /// The restore target is smaller than the backed-up volume.
    #[error("volume {volume} has {size} bytes; backup {id} needs {needed}")]
    TargetTooSmall {
        /// The target volume.
        volume: String,
        /// Its size.
        size: u64,
        /// The backup.
        id: BackupId,
        /// The backed-up volume's size.
        needed: u64,
    },
    /// A stored object does not hold what the metadata says (digest, length, compression).
    #[error("backup object {object} is corrupt: {reason}")]
    Corrupt {
        /// The object's key in the repository.
        object: String,
        /// What does not match.
        reason: String,
    },
    /// An object the metadata names is not in the repository.
    #[error("backup object {0} is missing from the repository")]
    MissingObject(String),
    /// A `metadata` or `sha256file` object cannot be understood.
    #[error("backup {object} is not valid: {reason}")]
    Format {
        /// The object's key.
        object: String,
        /// Why.
        reason: String,
    },
    /// A backup record given to import is not one `ExportBackupRecord` produced.
    #[error("invalid backup record: {0}")]
    Record(String),
    /// The repository failed.
    #[error("backup repository {repository}")]
    Repository {
        /// Repository name.
        repository: String,
        /// What failed.
        #[source]
        source: RepoError,
    },
    /// Reading the volume or writing the restore target failed.
    #[error("{op} {path}")]
    Io {
        /// What we were doing.
        op: &'static str,
        /// The file or device.
        path: std::path::PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// A worker task of the pipeline died (a panic or a cancelled runtime).
    #[error("backup worker failed: {0}")]
    Worker(String),
}

impl BackupError {
    /// Wraps an I/O error with the operation and path.
    pub fn io(
        op: &'static str,
        path: impl Into<std::path::PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> BackupError {
        let path = path.into();
        move |source| BackupError::Io { op, path, source }
    }

    /// Wraps a repository error with the repository's name.
    pub fn repo(repository: &str) -> impl FnOnce(RepoError) -> BackupError {
        let repository = repository.to_owned();
        move |source| BackupError::Repository { repository, source }
    }
}
