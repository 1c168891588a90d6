//! The storage agent's domain: Cinder's volume service with its LVM driver and tgt target
//! helper. Pools ([`backend::Backend`]) keep volumes and snapshots, [`export::Exports`]
//! publishes them through tgtd, and [`service::AgentService`] orchestrates both with Cinder's
//! rules (no delete with snapshots or exports, per-volume guard, reconciliation).
//!
//! Durable state is the storage itself: LV names and tags, or metadata files beside file-pool
//! volumes. Nothing else is persisted; tgtd's targets are rebuilt from that state.

pub mod backend;
pub mod chap;
pub mod data;
pub mod export;
pub mod file;
pub mod guard;
pub mod ids;
pub mod lvm;
pub mod service;
pub mod tags;
pub mod tracking;

use std::path::PathBuf;

use crate::exec::ExecError;
use crate::types::Bytes;

pub use ids::{BackupId, Iqn, SnapshotId, VolumeId};

/// Everything that can go wrong in the agent. The one mapping to gRPC codes is in
/// `agent_rpc::status`.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A request field is missing or malformed.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// No such pool on this agent.
    #[error("pool {0:?} not found on this agent")]
    PoolNotFound(String),
    /// No such volume.
    #[error("volume {0} not found")]
    VolumeNotFound(VolumeId),
    /// No such snapshot.
    #[error("snapshot {0} not found")]
    SnapshotNotFound(SnapshotId),
    /// The id exists with different parameters (a retry must repeat the same request).
    #[error("{what} already exists with different parameters: {reason}")]
    AlreadyExists {
        /// Volume or snapshot id.
        what: String,
        /// Which parameter differs.
        reason: String,
    },
    /// Cinder's rule: a volume with snapshots cannot be deleted.
    #[error("volume {id} has {count} snapshot(s); delete them first")]
    HasSnapshots {
        /// The volume.
        id: VolumeId,
        /// How many snapshots depend on it.
        count: usize,
    },
    /// Cinder's rule: an exported (in-use) volume cannot be deleted or changed this way.
    #[error("volume {id} is exported to {initiators:?}; unexport it first")]
    Exported {
        /// The volume.
        id: VolumeId,
        /// Initiators it is exported to.
        initiators: Vec<String>,
    },
    /// A thick origin with snapshots can only grow while inactive, i.e. not exported.
    #[error(
        "volume {0} has snapshots on a thick pool and can only be extended while not exported"
    )]
    ExtendNeedsDetach(VolumeId),
    /// Requested size below the current one.
    #[error("volume {id} is {current}; cannot shrink to {requested}")]
    Shrink {
        /// The volume.
        id: VolumeId,
        /// Current size.
        current: Bytes,
        /// Requested size.
        requested: Bytes,
    },
    /// Not enough free space in the pool.
    #[error("pool {pool} has {free} free, {needed} needed")]
    InsufficientCapacity {
        /// Pool name.
        pool: String,
        /// Bytes needed.
        needed: Bytes,
        /// Bytes free.
        free: Bytes,
    },
    /// Another operation on the same volume or snapshot is in progress.
    #[error("an operation on {0} is already in progress")]
    Busy(String),
    /// A snapshot and its origin must stay on the same pool, or the source is of another kind.
    #[error("{0}")]
    Precondition(String),
    /// tgtd does not answer (stopped or restarting).
    #[error("tgtd is unavailable: {0}")]
    TgtUnavailable(String),
    /// A host command failed.
    #[error("{context}")]
    Exec {
        /// What we were doing.
        context: String,
        /// The command's failure.
        #[source]
        source: ExecError,
    },
    /// A tool's output could not be understood.
    #[error("cannot parse {tool} output: {reason}")]
    Parse {
        /// Tool name.
        tool: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// A backup, restore or backup record operation failed.
    #[error(transparent)]
    Backup(#[from] crate::backup::BackupError),
    /// A file operation failed.
    #[error("{op} {path}")]
    Io {
        /// What we were doing.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
}

impl AgentError {
    /// Wraps an [`ExecError`] with context.
    pub fn exec(context: impl Into<String>) -> impl FnOnce(ExecError) -> AgentError {
        let context = context.into();
        move |source| AgentError::Exec { context, source }
    }

    /// Wraps an I/O error with the operation and path.
    pub fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> AgentError {
        let path = path.into();
        move |source| AgentError::Io { op, path, source }
    }
}
