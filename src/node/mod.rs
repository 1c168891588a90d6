//! The node's domain: the iSCSI attach path of Nova/os-brick behind the CSI Node service.
//! NodeStageVolume logs the host in to the volume's target and mounts (or, for block
//! volumes, binds) its disk at the staging path; NodePublishVolume binds that into the
//! workload's path; the unstage path unmounts, flushes, deletes the SCSI disk and logs out.
//!
//! # State lives in the kernel
//!
//! The node keeps nothing in memory between calls and nothing in files of its own. What is
//! staged where is read back from the host each time:
//!
//! - sessions and their disks from sysfs ([`sysfs`]), records from iscsiadm ([`Initiator`]);
//! - mounts from mountinfo ([`Mounter`]). A file system is mounted with its
//!   `/dev/disk/by-path/ip-PORTAL-iscsi-TARGET-lun-N` link as source (`mount -c`), and a block
//!   volume's device node is bound onto a file of that name inside the staging directory,
//!   so the mount table still says which target and LUN a staged volume uses after its disk
//!   is gone.
//!
//! A session is logged out only when none of its disks is mounted anywhere or held by a
//! stacked device: the reference count is the mount table, not a counter.
//!
//! # Concurrency
//!
//! A per-volume guard ([`guard`]) answers ABORTED to a second concurrent call on the same
//! volume. Login, the wait for the disk and the mount, and the in-use check before a logout,
//! hold a per-target lock ([`guard::TargetLocks`]), so a stage and an unstage sharing a
//! session cannot interleave.

pub mod fake;
pub mod guard;
pub mod initiator;
pub mod iscsi;
pub mod model;
pub mod mounter;
pub mod mountinfo;
pub mod netlink;
mod publish;
mod reconcile;
pub mod repair;
mod stage;
mod stats;
pub mod sysfs;
#[cfg(test)]
mod tests;
mod view;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::agent::chap::ChapKey;
use crate::agent::Iqn;
use crate::types::Bytes;

pub use initiator::{Initiator, InitiatorError};
pub use model::*;
pub use mounter::{MountError, Mounter};
pub use reconcile::ReconcileReport;
pub use repair::{RepairCounts, SessionRepair};

/// Everything that can go wrong in the node service. The one mapping to gRPC codes is in
/// `crate::csi::node`.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A required field is missing or malformed.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The volume is not at the given path (stats, expand).
    #[error("{0}")]
    NotFound(String),
    /// The path already holds the volume with another capability, or another volume.
    #[error("incompatible with what is already there: {0}")]
    Incompatible(String),
    /// NodePublishVolume before NodeStageVolume (or at another staging path).
    #[error("not staged: {0}")]
    NotStaged(String),
    /// A single-writer volume is already published at another path.
    #[error("exceeds the volume's capabilities: {0}")]
    ExceedsCapabilities(String),
    /// The volume's disk is still mounted or held elsewhere, so it cannot be detached.
    #[error("volume {volume} is still in use: {users:?}")]
    InUse {
        /// The volume.
        volume: String,
        /// Mount points and holders.
        users: Vec<String>,
    },
    /// The device holds something the node will not format or mount as asked.
    #[error("{device} holds {found}; the capability asks for {wanted}")]
    UnexpectedContent {
        /// The device.
        device: PathBuf,
        /// What blkid found.
        found: String,
        /// What was asked.
        wanted: String,
    },
    /// The target needs CHAP and the node has no secret for it.
    #[error("{0}")]
    NoChapSecret(String),
    /// The host has no usable initiator name.
    #[error("no usable iSCSI initiator name: {0}")]
    NoInitiatorName(String),
    /// Login failed through every portal; the last failure is the source.
    #[error("cannot log in to {target} ({})", .tried.join("; "))]
    Login {
        /// Target name.
        target: String,
        /// Each portal and its failure.
        tried: Vec<String>,
        /// The last failure (it decides the code).
        #[source]
        source: Box<InitiatorError>,
    },
    /// The disk did not appear after the login.
    #[error("{path} did not appear within {after:?}")]
    DeviceTimeout {
        /// The by-path link waited for.
        path: PathBuf,
        /// How long.
        after: Duration,
    },
    /// The disk did not reach the required size after a rescan (the target has not grown
    /// yet).
    #[error("disk {disk} is {size} after a rescan; {required} is required")]
    NotGrown {
        /// The disk.
        disk: String,
        /// Its size.
        size: Bytes,
        /// The size asked for.
        required: Bytes,
    },
    /// The capacity range cannot be met.
    #[error("capacity out of range: {0}")]
    OutOfRange(String),
    /// Another operation on the same volume is in progress.
    #[error("an operation on volume {0} is already in progress")]
    Busy(String),
    /// The initiator failed.
    #[error(transparent)]
    Initiator(#[from] InitiatorError),
    /// A mount tool or path operation failed.
    #[error(transparent)]
    Mount(#[from] MountError),
    /// The node's own view is inconsistent (a bug).
    #[error("internal error: {0}")]
    Internal(String),
}

/// The node's settings, in domain terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSettings {
    /// This node's name: the host part of its node id.
    pub node_name: String,
    /// Availability zone (topology.cinderblock.dev/zone).
    pub zone: String,
    /// NodeGetInfo's max_volumes_per_node.
    pub max_volumes_per_node: u32,
    /// How long to wait for a disk after a login, or for a new size after a rescan.
    pub attach_timeout: Duration,
    /// First interval between two looks for the disk (doubled up to a second).
    pub poll_interval: Duration,
}

impl Default for NodeSettings {
    fn default() -> Self {
        NodeSettings {
            node_name: "localhost".into(),
            zone: "nova".into(),
            max_volumes_per_node: 64,
            attach_timeout: Duration::from_secs(30),
            poll_interval: Duration::from_millis(50),
        }
    }
}

/// What NodeGetInfo answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    /// `<host>/<initiator iqn>`.
    pub node_id: String,
    /// Zone.
    pub zone: String,
    /// Attach limit.
    pub max_volumes_per_node: u32,
}

/// The node service's domain object.
pub struct Node {
    settings: NodeSettings,
    initiator: Arc<dyn Initiator>,
    mounter: Arc<dyn Mounter>,
    chap_key: Option<ChapKey>,
    guards: guard::Guards,
    targets: guard::TargetLocks,
    repairs: Arc<repair::RepairCounts>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("settings", &self.settings)
            .field("chap_key", &self.chap_key)
            .finish_non_exhaustive()
    }
}

impl Node {
    /// A node acting on the host through `initiator` and `mounter`. With `chap_key` (the
    /// agents' master key) it derives each volume's CHAP secret; without it, NodeStage
    /// needs the secret in its `secrets`.
    pub fn new(
        settings: NodeSettings,
        initiator: Arc<dyn Initiator>,
        mounter: Arc<dyn Mounter>,
        chap_key: Option<ChapKey>,
    ) -> Self {
        Node {
            settings,
            initiator,
            mounter,
            chap_key,
            guards: guard::Guards::default(),
            targets: guard::TargetLocks::default(),
            repairs: Arc::default(),
        }
    }

    /// The settings.
    pub fn settings(&self) -> &NodeSettings {
        &self.settings
    }

    /// What session repair did so far.
    pub fn repair_counts(&self) -> Arc<repair::RepairCounts> {
        self.repairs.clone()
    }

    /// NodeGetInfo: `<node name>/<initiator IQN>`, read from the host each time (iscsid may
    /// write the name after this process started).
    pub async fn info(&self) -> Result<NodeInfo, NodeError> {
        let raw = self
            .initiator
            .initiator_name()
            .await
            .map_err(|e| NodeError::NoInitiatorName(e.to_string()))?;
        let iqn = Iqn::parse(&raw).map_err(|e| NodeError::NoInitiatorName(e.to_string()))?;
        let node_id = format!("{}/{iqn}", self.settings.node_name);
        // The controller must be able to read it back.
        if crate::controller::NodeId::parse(&node_id).is_none() {
            return Err(NodeError::Internal(format!(
                "node name {:?} cannot be part of a node id (use [A-Za-z0-9._-])",
                self.settings.node_name
            )));
        }
        Ok(NodeInfo {
            node_id,
            zone: self.settings.zone.clone(),
            max_volumes_per_node: self.settings.max_volumes_per_node,
        })
    }
}
