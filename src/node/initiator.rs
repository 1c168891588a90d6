//! The `Initiator` seam: the host's iSCSI initiator (open-iscsi's node records and sessions)
//! and the SCSI disks its sessions bring, as the node service needs them. The real
//! implementation is [`super::iscsi::IscsiInitiator`] (iscsiadm + sysfs); tests use
//! [`super::fake::FakeHost`].

use std::path::PathBuf;

use super::model::Portal;
pub use super::sysfs::SysSession;
use crate::agent::chap::ChapCredentials;
use crate::exec::iscsiadm::Failure;
use crate::exec::ExecError;
use crate::types::Bytes;

/// Failures of the initiator seam.
#[derive(Debug, thiserror::Error)]
pub enum InitiatorError {
    /// iscsiadm could not be run or did not finish in time.
    #[error("{op}")]
    Exec {
        /// What was being done.
        op: String,
        /// Why.
        #[source]
        source: ExecError,
    },
    /// iscsiadm failed; `failure` classifies its exit code.
    #[error("{op}: iscsiadm exited {code}: {stderr}")]
    Iscsiadm {
        /// What was being done.
        op: String,
        /// The exit code's meaning.
        failure: Failure,
        /// The exit code.
        code: i32,
        /// Its message.
        stderr: String,
    },
    /// sysfs, /dev or the initiator name file could not be read or written.
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
    /// The kernel's iSCSI netlink interface refused or could not be reached.
    #[error("{op}")]
    Netlink {
        /// What was being done.
        op: String,
        /// The OS error (the kernel's errno for a refusal).
        #[source]
        source: std::io::Error,
    },
    /// Tool output or a file did not read as expected.
    #[error("cannot parse {what}: {reason}")]
    Parse {
        /// What was read.
        what: &'static str,
        /// What was wrong.
        reason: String,
    },
}

impl InitiatorError {
    /// The classified iscsiadm failure, if this is one.
    pub fn failure(&self) -> Option<Failure> {
        match self {
            InitiatorError::Iscsiadm { failure, .. } => Some(*failure),
            _ => None,
        }
    }
}

/// Session state as sysfs (`/sys/class/iscsi_session/sessionN/state`) reports it.
pub const SESSION_LOGGED_IN: &str = "LOGGED_IN";

/// A SCSI disk brought by a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disk {
    /// Kernel name (`sdc`): `/dev/sdc`, `/sys/block/sdc`.
    pub name: String,
    /// LUN (the L of H:C:T:L).
    pub lun: u32,
    /// Device number (`/sys/block/sdc/dev`).
    pub dev: (u32, u32),
    /// Size (`/sys/block/sdc/size` × 512).
    pub size: Bytes,
    /// Devices stacked on it (`/sys/block/sdc/holders`: device-mapper, md): it is in use.
    pub holders: Vec<String>,
}

impl Disk {
    /// `/dev/NAME`.
    pub fn dev_path(&self) -> PathBuf {
        PathBuf::from("/dev").join(&self.name)
    }
}

/// One iSCSI session (an I_T nexus: one initiator, one target, through one portal).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    /// Session id (`sessionN`, `iscsiadm -m session -r N`).
    pub sid: u32,
    /// Target name.
    pub target: String,
    /// Portal, in iscsiadm's form (`addr:port`).
    pub portal: String,
    /// `LOGGED_IN`, `FAILED` (connection lost, recovering), `FREE`.
    pub state: String,
    /// Its disks.
    pub disks: Vec<Disk>,
}

impl Session {
    /// Logged in and usable.
    pub fn logged_in(&self) -> bool {
        self.state == SESSION_LOGGED_IN
    }
}

/// One node record (`/etc/iscsi/nodes/TARGET/PORTAL,TPGT`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Target name.
    pub target: String,
    /// Portal, in iscsiadm's form.
    pub portal: String,
}

/// The host's iSCSI initiator.
#[async_trait::async_trait]
pub trait Initiator: Send + Sync {
    /// This host's initiator name (`InitiatorName=` of `/etc/iscsi/initiatorname.iscsi`).
    async fn initiator_name(&self) -> Result<String, InitiatorError>;

    /// Every session with its disks.
    async fn sessions(&self) -> Result<Vec<Session>, InitiatorError>;

    /// Every session's id, target and state only (sysfs, no tool run: cheap enough to poll).
    async fn session_states(&self) -> Result<Vec<SysSession>, InitiatorError>;

    /// Every node record.
    async fn records(&self) -> Result<Vec<Record>, InitiatorError>;

    /// Creates (or resets) the record of `target` at `portal`: manual start-up, and CHAP
    /// when `chap` is given (the secret never reaches a log).
    async fn create_record(
        &self,
        target: &str,
        portal: &Portal,
        chap: Option<&ChapCredentials>,
    ) -> Result<(), InitiatorError>;

    /// Deletes a record; no such record is success.
    async fn delete_record(&self, target: &str, portal: &str) -> Result<(), InitiatorError>;

    /// Logs in through a record; an existing session is success.
    async fn login(&self, target: &str, portal: &str) -> Result<(), InitiatorError>;

    /// Logs session `sid` out (its disks go with it); no such session is success.
    async fn logout(&self, sid: u32) -> Result<(), InitiatorError>;

    /// Rescans a session: new LUNs appear, existing ones re-read their size.
    async fn rescan(&self, sid: u32) -> Result<(), InitiatorError>;

    /// Stops session `sid`'s connection for recovery, as iscsid does before it reconnects
    /// (the session and its disks stay; iscsid's next attempt logs in again). See
    /// `node::repair` for when and why.
    async fn reset_connection(&self, sid: u32) -> Result<(), InitiatorError>;

    /// The disk `/dev/disk/by-path/NAME` points to, once udev made the link.
    async fn by_path(&self, name: &str) -> Result<Option<String>, InitiatorError>;

    /// Writes a disk's dirty buffers (`blockdev --flushbufs`).
    async fn flush(&self, disk: &str) -> Result<(), InitiatorError>;

    /// Removes a SCSI disk from the kernel (`/sys/block/NAME/device/delete`); a disk that is
    /// already gone is success.
    async fn delete_disk(&self, disk: &str) -> Result<(), InitiatorError>;
}
