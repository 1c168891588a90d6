//! The controller's side of the agent API: the [`StorageAgent`] seam, its real tonic
//! implementation ([`GrpcAgent`]) and a stateful in-memory fake ([`FakeAgent`]) for tests.
//!
//! The seam speaks domain types only (ids, [`Bytes`], [`Capacity`], [`Chunk`]); wire types
//! stop at [`GrpcAgent`]. The controller (`crate::controller`) never sees tonic or prost.
//!
//! CHAP secrets: the agent returns a volume's CHAP secret with every export. [`ExportInfo`]
//! has no field for it, so the secret is dropped here, at the edge, and never reaches the
//! controller's memory, logs or the CSI `publish_context` (the node derives it from the
//! shared key, see `crate::agent::chap`).

use std::collections::BTreeMap;
use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::{Stream, StreamExt};

use crate::agent::data::Chunk;
use crate::agent::{Iqn, SnapshotId, VolumeId};
use crate::proto::agent as pb;
use crate::proto::agent::agent_client::AgentClient;
use crate::scheduler::Capacity;
use crate::tls::ClientTls;
use crate::transport::{self, Endpoint, TransportError};
use crate::types::Bytes;

mod backups;
pub use backups::*;

/// What kind of failure an agent call ended with: the agent API's documented codes
/// (docs/agent-protocol.md), so the controller can apply Cinder's and CSI's rules to them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AgentErrorKind {
    /// Bad id, size 0, size below the source's, malformed IQN.
    InvalidArgument,
    /// No such pool, volume, snapshot or source.
    NotFound,
    /// The id exists with other parameters.
    AlreadyExists,
    /// Cinder's rules: snapshots, exports, same-pool sources, thick extend while exported.
    FailedPrecondition,
    /// Shrinking a volume.
    OutOfRange,
    /// Not enough space in the pool.
    ResourceExhausted,
    /// Another operation on the object is in progress.
    Aborted,
    /// The agent (or its tgtd) does not answer.
    Unavailable,
    /// The call took too long.
    DeadlineExceeded,
    /// Stored data is damaged or missing (a backup's chunk fails its digest).
    DataLoss,
    /// A host command failed on the agent.
    Internal,
    /// Anything else (a code the agent API does not document).
    Unknown,
}

/// A failed agent call: what kind of failure, and the agent's message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct AgentClientError {
    /// The kind of failure.
    pub kind: AgentErrorKind,
    /// The agent's message (names the object and the reason).
    pub message: String,
}

impl AgentClientError {
    /// An error of `kind` with `message`.
    pub fn new(kind: AgentErrorKind, message: impl Into<String>) -> Self {
        AgentClientError {
            kind,
            message: message.into(),
        }
    }
}

/// How a pool allocates space (the agent's `PoolKind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolKind {
    /// Plain logical volumes.
    LvmThick,
    /// Thin logical volumes.
    LvmThin,
    /// Sparse files.
    File,
    /// Not reported.
    Unspecified,
}

/// One pool as an agent's `ListPools` reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolStats {
    /// Pool name, unique on its agent.
    pub name: String,
    /// Backing kind.
    pub kind: PoolKind,
    /// Availability zone.
    pub zone: String,
    /// Total capacity.
    pub total: Capacity,
    /// Free capacity.
    pub free: Capacity,
    /// Sum of virtual sizes of volumes and snapshots.
    pub provisioned: Bytes,
    /// Bytes really allocated.
    pub allocated: Bytes,
    /// Thin provisioning supported.
    pub thin_provisioning: bool,
    /// Thick provisioning supported.
    pub thick_provisioning: bool,
    /// Over-subscription limit (1.0 = none).
    pub max_over_subscription_ratio: f64,
    /// Percentage of total kept free.
    pub reserved_percentage: u8,
    /// Capabilities matched against volume type extra specs.
    pub capabilities: BTreeMap<String, String>,
    /// Volumes in the pool.
    pub volume_count: u64,
    /// Snapshots in the pool.
    pub snapshot_count: u64,
    /// Allocation unit.
    pub extent: Bytes,
    /// iSCSI portals of exports.
    pub portals: Vec<String>,
    /// False when the pool cannot be read.
    pub healthy: bool,
    /// Why it is unhealthy.
    pub unhealthy_reason: String,
}

/// What a volume was created from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum VolumeSource {
    /// A snapshot.
    Snapshot(SnapshotId),
    /// Another volume.
    Volume(VolumeId),
}

/// A volume's state as the agent derives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentVolumeStatus {
    /// Being created.
    Creating,
    /// Not exported.
    Available,
    /// Exported to at least one initiator.
    InUse,
    /// Being deleted.
    Deleting,
    /// Being extended.
    Extending,
    /// Failed.
    Error,
    /// A backup is reading it.
    BackingUp,
    /// A backup is being restored into it.
    Restoring,
    /// Taken out of service by an operator.
    Maintenance,
    /// Unspecified, or a state this controller does not know.
    Other,
}

/// A volume as an agent reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct VolumeInfo {
    /// Volume id.
    pub id: VolumeId,
    /// Pool on the agent.
    pub pool: String,
    /// Exact size.
    pub size: Bytes,
    /// State.
    pub status: AgentVolumeStatus,
    /// Volume type name.
    pub volume_type: String,
    /// Content source.
    pub source: Option<VolumeSource>,
    /// Initiators it is exported to.
    pub exported_to: Vec<String>,
    /// Snapshots whose origin it is.
    pub snapshot_count: u32,
    /// Caller-owned metadata.
    pub metadata: BTreeMap<String, String>,
    /// Creation time.
    pub created_at: Option<SystemTime>,
}

/// A new volume to create on an agent.
#[derive(Clone, Debug, PartialEq)]
pub struct NewVolume {
    /// Id chosen by the controller.
    pub id: VolumeId,
    /// Pool on the agent.
    pub pool: String,
    /// Requested size (the agent rounds it up).
    pub size: Bytes,
    /// Volume type name.
    pub volume_type: String,
    /// Metadata stored with the volume.
    pub metadata: BTreeMap<String, String>,
    /// Content source on the same pool.
    pub source: Option<VolumeSource>,
}

/// A snapshot as an agent reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct SnapshotInfo {
    /// Snapshot id.
    pub id: SnapshotId,
    /// Origin volume.
    pub source_volume: VolumeId,
    /// Pool on the agent.
    pub pool: String,
    /// Origin size at snapshot time.
    pub size: Bytes,
    /// Creation time.
    pub created_at: Option<SystemTime>,
    /// Usable as a content source.
    pub ready_to_use: bool,
    /// Caller-owned metadata.
    pub metadata: BTreeMap<String, String>,
}

/// Where an exported volume is reached. Deliberately without the CHAP secret (module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// Target IQN.
    pub target_iqn: String,
    /// Portals ("address:port").
    pub portals: Vec<String>,
    /// LUN number.
    pub lun: u32,
    /// Incoming CHAP user name (not secret).
    pub chap_username: String,
}

/// What `ReadVolume` reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadSource {
    /// A volume's content.
    Volume(VolumeId),
    /// A snapshot's content.
    Snapshot(SnapshotId),
}

/// What `WriteVolume` did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteSummary {
    /// Bytes of data written.
    pub bytes_written: u64,
    /// Bytes of holes covered.
    pub hole_bytes: u64,
}

/// A stream of volume content in offset order.
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<Chunk, AgentClientError>> + Send>>;

/// One storage agent as the controller uses it (the agent API of docs/agent-protocol.md).
#[async_trait::async_trait]
pub trait StorageAgent: BackupAgent + Send + Sync + fmt::Debug {
    /// The agent's configured name (what pools are keyed by).
    fn name(&self) -> &str;
    /// Every pool with fresh statistics.
    async fn list_pools(&self) -> Result<Vec<PoolStats>, AgentClientError>;
    /// Creates (or returns the identical existing) volume.
    async fn create_volume(&self, req: NewVolume) -> Result<VolumeInfo, AgentClientError>;
    /// Deletes a volume; absent is OK.
    async fn delete_volume(&self, id: &VolumeId) -> Result<(), AgentClientError>;
    /// Grows a volume.
    async fn extend_volume(
        &self,
        id: &VolumeId,
        size: Bytes,
    ) -> Result<VolumeInfo, AgentClientError>;
    /// One volume.
    async fn get_volume(&self, id: &VolumeId) -> Result<VolumeInfo, AgentClientError>;
    /// Every volume of the agent.
    async fn list_volumes(&self) -> Result<Vec<VolumeInfo>, AgentClientError>;
    /// Replaces the type (when `volume_type` is non-empty) and, when given, the metadata.
    async fn update_volume(
        &self,
        id: &VolumeId,
        volume_type: &str,
        metadata: Option<BTreeMap<String, String>>,
    ) -> Result<VolumeInfo, AgentClientError>;
    /// Snapshots a volume (idempotent by id and source).
    async fn create_snapshot(
        &self,
        id: &SnapshotId,
        source: &VolumeId,
        metadata: BTreeMap<String, String>,
    ) -> Result<SnapshotInfo, AgentClientError>;
    /// Deletes a snapshot; absent is OK.
    async fn delete_snapshot(&self, id: &SnapshotId) -> Result<(), AgentClientError>;
    /// One snapshot.
    async fn get_snapshot(&self, id: &SnapshotId) -> Result<SnapshotInfo, AgentClientError>;
    /// Every snapshot of the agent.
    async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>, AgentClientError>;
    /// Exports a volume to an initiator (idempotent).
    async fn export_volume(
        &self,
        id: &VolumeId,
        initiator: &Iqn,
        host: &str,
    ) -> Result<ExportInfo, AgentClientError>;
    /// Removes an initiator (`None`: the whole target); not exported is OK.
    async fn unexport_volume(
        &self,
        id: &VolumeId,
        initiator: Option<&Iqn>,
    ) -> Result<(), AgentClientError>;
    /// Streams a volume's or snapshot's content.
    async fn read_volume(&self, source: ReadSource) -> Result<ChunkStream, AgentClientError>;
    /// Fills a volume from `chunks`, which cover `size` bytes. An error item in `chunks`
    /// fails the call with that error (the caller discards the partial target).
    async fn write_volume(
        &self,
        id: &VolumeId,
        size: Bytes,
        chunks: ChunkStream,
    ) -> Result<WriteSummary, AgentClientError>;
}

// ---------------------------------------------------------------------------------------
// The real implementation

/// Deadline of a unary agent call made outside a CSI call with a deadline (thick deletes
/// wipe, so a few minutes are allowed).
const CALL_TIMEOUT: Duration = Duration::from_secs(300);

/// An agent reached over gRPC.
#[derive(Clone, Debug)]
pub struct GrpcAgent {
    name: String,
    client: AgentClient<tonic::transport::Channel>,
}

impl GrpcAgent {
    /// A lazily connected client of the agent `name` at `endpoint` (the agent may start later),
    /// over TLS when `tls` is given and the endpoint is `tcp://`.
    pub async fn connect(
        name: &str,
        endpoint: &Endpoint,
        tls: Option<&ClientTls>,
    ) -> Result<Self, TransportError> {
        let channel = transport::connect_tls(endpoint, true, tls).await?;
        Ok(GrpcAgent {
            name: name.to_owned(),
            client: AgentClient::new(channel),
        })
    }

    fn client(&self) -> AgentClient<tonic::transport::Channel> {
        self.client.clone()
    }
}

/// Deadline of a pool-statistics call: the agent answers from a report or two, so a longer
/// wait means it is busy or stuck, and the caller keeps its last figures meanwhile.
const STATS_TIMEOUT: Duration = Duration::from_secs(30);

/// A request due by the deadline of the CSI call being served (its caller's), else within
/// [`CALL_TIMEOUT`].
fn request<T>(msg: T) -> tonic::Request<T> {
    let deadline = crate::csi::deadline::caller_deadline().map_or(CALL_TIMEOUT, |d| {
        d.saturating_duration_since(Instant::now())
    });
    request_within(msg, deadline)
}

fn request_within<T>(msg: T, deadline: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(deadline);
    r
}

/// The kind of an agent's status code. Exhaustive: every gRPC code is placed.
pub fn kind_of(code: tonic::Code) -> AgentErrorKind {
    use tonic::Code as C;
    match code {
        C::InvalidArgument => AgentErrorKind::InvalidArgument,
        C::NotFound => AgentErrorKind::NotFound,
        C::AlreadyExists => AgentErrorKind::AlreadyExists,
        C::FailedPrecondition => AgentErrorKind::FailedPrecondition,
        C::OutOfRange => AgentErrorKind::OutOfRange,
        C::ResourceExhausted => AgentErrorKind::ResourceExhausted,
        C::Aborted => AgentErrorKind::Aborted,
        C::Unavailable => AgentErrorKind::Unavailable,
        C::DeadlineExceeded | C::Cancelled => AgentErrorKind::DeadlineExceeded,
        C::DataLoss => AgentErrorKind::DataLoss,
        C::Internal => AgentErrorKind::Internal,
        C::Ok | C::Unknown | C::PermissionDenied | C::Unimplemented | C::Unauthenticated => {
            AgentErrorKind::Unknown
        }
    }
}

fn from_status(s: tonic::Status) -> AgentClientError {
    AgentClientError::new(kind_of(s.code()), s.message())
}

fn bad_answer(what: &str, detail: impl fmt::Display) -> AgentClientError {
    AgentClientError::new(
        AgentErrorKind::Internal,
        format!("agent answered with an invalid {what}: {detail}"),
    )
}

fn vid(s: &str) -> Result<VolumeId, AgentClientError> {
    VolumeId::parse(s).map_err(|e| bad_answer("volume id", e))
}

fn sid(s: &str) -> Result<SnapshotId, AgentClientError> {
    SnapshotId::parse(s).map_err(|e| bad_answer("snapshot id", e))
}

fn time(t: Option<prost_types::Timestamp>) -> Option<SystemTime> {
    let t = t?;
    let secs = u64::try_from(t.seconds).ok()?;
    let nanos = u32::try_from(t.nanos).ok()?;
    UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

fn capacity(c: Option<pb::Capacity>) -> Capacity {
    use pb::capacity::Value;
    match c.and_then(|c| c.value) {
        Some(Value::Bytes(b)) => Capacity::Known(Bytes(b)),
        Some(Value::Infinite(true)) => Capacity::Infinite,
        Some(Value::Unknown(_)) | Some(Value::Infinite(false)) | None => Capacity::Unknown,
    }
}

fn pool_from_pb(p: pb::Pool) -> PoolStats {
    let kind = match pb::PoolKind::try_from(p.kind) {
        Ok(pb::PoolKind::LvmThick) => PoolKind::LvmThick,
        Ok(pb::PoolKind::LvmThin) => PoolKind::LvmThin,
        Ok(pb::PoolKind::File) => PoolKind::File,
        Ok(pb::PoolKind::Unspecified) | Err(_) => PoolKind::Unspecified,
    };
    PoolStats {
        name: p.name,
        kind,
        zone: p.zone,
        total: capacity(p.total),
        free: capacity(p.free),
        provisioned: Bytes(p.provisioned_bytes),
        allocated: Bytes(p.allocated_bytes),
        thin_provisioning: p.thin_provisioning,
        thick_provisioning: p.thick_provisioning,
        max_over_subscription_ratio: p.max_over_subscription_ratio,
        reserved_percentage: u8::try_from(p.reserved_percentage.min(100)).unwrap_or(100),
        capabilities: p.capabilities.into_iter().collect(),
        volume_count: u64::from(p.volume_count),
        snapshot_count: u64::from(p.snapshot_count),
        extent: Bytes(p.extent_bytes),
        portals: p.portals,
        healthy: p.healthy,
        unhealthy_reason: p.unhealthy_reason,
    }
}

fn volume_from_pb(v: pb::Volume) -> Result<VolumeInfo, AgentClientError> {
    use pb::volume::Source;
    let status = match pb::VolumeStatus::try_from(v.status) {
        Ok(pb::VolumeStatus::Creating) => AgentVolumeStatus::Creating,
        Ok(pb::VolumeStatus::Available) => AgentVolumeStatus::Available,
        Ok(pb::VolumeStatus::InUse) => AgentVolumeStatus::InUse,
        Ok(pb::VolumeStatus::Deleting) => AgentVolumeStatus::Deleting,
        Ok(pb::VolumeStatus::Extending) => AgentVolumeStatus::Extending,
        Ok(pb::VolumeStatus::Error) => AgentVolumeStatus::Error,
        Ok(pb::VolumeStatus::BackingUp) => AgentVolumeStatus::BackingUp,
        Ok(pb::VolumeStatus::Restoring) => AgentVolumeStatus::Restoring,
        Ok(pb::VolumeStatus::Maintenance) => AgentVolumeStatus::Maintenance,
        Ok(pb::VolumeStatus::Unspecified) | Err(_) => AgentVolumeStatus::Other,
    };
    Ok(VolumeInfo {
        id: vid(&v.id)?,
        pool: v.pool,
        size: Bytes(v.size_bytes),
        status,
        volume_type: v.volume_type,
        source: match v.source {
            None => None,
            Some(Source::SourceSnapshotId(s)) => Some(VolumeSource::Snapshot(sid(&s)?)),
            Some(Source::SourceVolumeId(s)) => Some(VolumeSource::Volume(vid(&s)?)),
        },
        exported_to: v.exported_to,
        snapshot_count: v.snapshot_count,
        metadata: v.metadata.into_iter().collect(),
        created_at: time(v.created_at),
    })
}

fn snapshot_from_pb(s: pb::Snapshot) -> Result<SnapshotInfo, AgentClientError> {
    Ok(SnapshotInfo {
        id: sid(&s.id)?,
        source_volume: vid(&s.source_volume_id)?,
        pool: s.pool,
        size: Bytes(s.size_bytes),
        created_at: time(s.created_at),
        ready_to_use: s.ready_to_use,
        metadata: s.metadata.into_iter().collect(),
    })
}

fn chunk_from_pb(c: pb::DataChunk) -> Chunk {
    if c.data.is_empty() {
        Chunk::Hole {
            offset: c.offset,
            len: c.hole_bytes,
        }
    } else {
        Chunk::Data {
            offset: c.offset,
            bytes: c.data,
        }
    }
}

fn chunk_to_pb(c: Chunk) -> pb::DataChunk {
    match c {
        Chunk::Data { offset, bytes } => pb::DataChunk {
            offset,
            data: bytes,
            hole_bytes: 0,
        },
        Chunk::Hole { offset, len } => pb::DataChunk {
            offset,
            data: Vec::new(),
            hole_bytes: len,
        },
    }
}

#[async_trait::async_trait]
impl StorageAgent for GrpcAgent {
    fn name(&self) -> &str {
        &self.name
    }

    async fn list_pools(&self) -> Result<Vec<PoolStats>, AgentClientError> {
        let r = self
            .client()
            .list_pools(request_within(pb::ListPoolsRequest {}, STATS_TIMEOUT))
            .await
            .map_err(from_status)?;
        Ok(r.into_inner().pools.into_iter().map(pool_from_pb).collect())
    }

    async fn create_volume(&self, req: NewVolume) -> Result<VolumeInfo, AgentClientError> {
        use pb::create_volume_request::Source;
        let msg = pb::CreateVolumeRequest {
            volume_id: req.id.to_string(),
            pool: req.pool,
            size_bytes: req.size.get(),
            volume_type: req.volume_type,
            metadata: req.metadata.into_iter().collect(),
            source: req.source.map(|s| match s {
                VolumeSource::Snapshot(s) => Source::SourceSnapshotId(s.to_string()),
                VolumeSource::Volume(v) => Source::SourceVolumeId(v.to_string()),
            }),
        };
        let r = self
            .client()
            .create_volume(request(msg))
            .await
            .map_err(from_status)?;
        volume_from_pb(r.into_inner())
    }

    async fn delete_volume(&self, id: &VolumeId) -> Result<(), AgentClientError> {
        let msg = pb::DeleteVolumeRequest {
            volume_id: id.to_string(),
        };
        self.client()
            .delete_volume(request(msg))
            .await
            .map_err(from_status)?;
        Ok(())
    }

    async fn extend_volume(
        &self,
        id: &VolumeId,
        size: Bytes,
    ) -> Result<VolumeInfo, AgentClientError> {
        let msg = pb::ExtendVolumeRequest {
            volume_id: id.to_string(),
            new_size_bytes: size.get(),
        };
        let r = self
            .client()
            .extend_volume(request(msg))
            .await
            .map_err(from_status)?;
        volume_from_pb(r.into_inner())
    }

    async fn get_volume(&self, id: &VolumeId) -> Result<VolumeInfo, AgentClientError> {
        let msg = pb::GetVolumeRequest {
            volume_id: id.to_string(),
        };
        let r = self
            .client()
            .get_volume(request(msg))
            .await
            .map_err(from_status)?;
        volume_from_pb(r.into_inner())
    }

    async fn list_volumes(&self) -> Result<Vec<VolumeInfo>, AgentClientError> {
        let r = self
            .client()
            .list_volumes(request(pb::ListVolumesRequest::default()))
            .await
            .map_err(from_status)?;
        r.into_inner()
            .volumes
            .into_iter()
            .map(volume_from_pb)
            .collect()
    }

    async fn update_volume(
        &self,
        id: &VolumeId,
        volume_type: &str,
        metadata: Option<BTreeMap<String, String>>,
    ) -> Result<VolumeInfo, AgentClientError> {
        let msg = pb::UpdateVolumeRequest {
            volume_id: id.to_string(),
            volume_type: volume_type.to_owned(),
            replace_metadata: metadata.is_some(),
            metadata: metadata.unwrap_or_default().into_iter().collect(),
        };
        let r = self
            .client()
            .update_volume(request(msg))
            .await
            .map_err(from_status)?;
        volume_from_pb(r.into_inner())
    }

    async fn create_snapshot(
        &self,
        id: &SnapshotId,
        source: &VolumeId,
        metadata: BTreeMap<String, String>,
    ) -> Result<SnapshotInfo, AgentClientError> {
        let msg = pb::CreateSnapshotRequest {
            snapshot_id: id.to_string(),
            source_volume_id: source.to_string(),
            metadata: metadata.into_iter().collect(),
        };
        let r = self
            .client()
            .create_snapshot(request(msg))
            .await
            .map_err(from_status)?;
        snapshot_from_pb(r.into_inner())
    }

    async fn delete_snapshot(&self, id: &SnapshotId) -> Result<(), AgentClientError> {
        let msg = pb::DeleteSnapshotRequest {
            snapshot_id: id.to_string(),
        };
        self.client()
            .delete_snapshot(request(msg))
            .await
            .map_err(from_status)?;
        Ok(())
    }

    async fn get_snapshot(&self, id: &SnapshotId) -> Result<SnapshotInfo, AgentClientError> {
        let msg = pb::GetSnapshotRequest {
            snapshot_id: id.to_string(),
        };
        let r = self
            .client()
            .get_snapshot(request(msg))
            .await
            .map_err(from_status)?;
        snapshot_from_pb(r.into_inner())
    }

    async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>, AgentClientError> {
        let r = self
            .client()
            .list_snapshots(request(pb::ListSnapshotsRequest::default()))
            .await
            .map_err(from_status)?;
        r.into_inner()
            .snapshots
            .into_iter()
            .map(snapshot_from_pb)
            .collect()
    }

    async fn export_volume(
        &self,
        id: &VolumeId,
        initiator: &Iqn,
        host: &str,
    ) -> Result<ExportInfo, AgentClientError> {
        let msg = pb::ExportVolumeRequest {
            volume_id: id.to_string(),
            initiator_iqn: initiator.to_string(),
            host: host.to_owned(),
        };
        let e = self
            .client()
            .export_volume(request(msg))
            .await
            .map_err(from_status)?
            .into_inner();
        // `e.chap_secret` is dropped here on purpose (module docs).
        Ok(ExportInfo {
            target_iqn: e.target_iqn,
            portals: e.portals,
            lun: e.lun,
            chap_username: e.chap_username,
        })
    }

    async fn unexport_volume(
        &self,
        id: &VolumeId,
        initiator: Option<&Iqn>,
    ) -> Result<(), AgentClientError> {
        let msg = pb::UnexportVolumeRequest {
            volume_id: id.to_string(),
            initiator_iqn: initiator.map(Iqn::to_string).unwrap_or_default(),
        };
        self.client()
            .unexport_volume(request(msg))
            .await
            .map_err(from_status)?;
        Ok(())
    }

    async fn read_volume(&self, source: ReadSource) -> Result<ChunkStream, AgentClientError> {
        use pb::read_volume_request::Source;
        let msg = pb::ReadVolumeRequest {
            source: Some(match source {
                ReadSource::Volume(v) => Source::VolumeId(v.to_string()),
                ReadSource::Snapshot(s) => Source::SnapshotId(s.to_string()),
            }),
            chunk_bytes: 0,
        };
        // No deadline: a stream lasts as long as the volume takes to read.
        let stream = self
            .client()
            .read_volume(tonic::Request::new(msg))
            .await
            .map_err(from_status)?
            .into_inner();
        Ok(Box::pin(
            stream.map(|r| r.map(chunk_from_pb).map_err(from_status)),
        ))
    }

    async fn write_volume(
        &self,
        id: &VolumeId,
        size: Bytes,
        chunks: ChunkStream,
    ) -> Result<WriteSummary, AgentClientError> {
        use pb::write_volume_request::Item;
        // A client stream cannot carry an error, so a pump task forwards chunks into a channel
        // (the request stream) and stops at the first failed item, which then fails the call
        // whatever the agent answered: the caller discards the partial target.
        let (tx, rx) = tokio::sync::mpsc::channel::<pb::WriteVolumeRequest>(4);
        let first = pb::WriteVolumeRequest {
            item: Some(Item::Target(pb::WriteTarget {
                volume_id: id.to_string(),
                size_bytes: size.get(),
            })),
        };
        let pump = tokio::spawn(async move {
            let mut chunks = chunks;
            if tx.send(first).await.is_err() {
                return Ok(());
            }
            while let Some(c) = chunks.next().await {
                let msg = pb::WriteVolumeRequest {
                    item: Some(Item::Chunk(chunk_to_pb(c?))),
                };
                if tx.send(msg).await.is_err() {
                    break; // the call ended; its answer says why
                }
            }
            Ok::<(), AgentClientError>(())
        });
        let outgoing = tokio_stream::wrappers::ReceiverStream::new(rx);
        let answer = self
            .client()
            .write_volume(tonic::Request::new(outgoing))
            .await;
        match pump.await {
            Ok(Ok(())) => {}
            Ok(Err(read_failure)) => return Err(read_failure),
            Err(e) => {
                return Err(AgentClientError::new(
                    AgentErrorKind::Internal,
                    format!("copy task: {e}"),
                ))
            }
        }
        let r = answer.map_err(from_status)?.into_inner();
        Ok(WriteSummary {
            bytes_written: r.bytes_written,
            hole_bytes: r.hole_bytes,
        })
    }
}

// ---------------------------------------------------------------------------------------
// The fake

/// A stateful in-memory agent with the agent API's rules (docs/agent-protocol.md): sizes
/// rounded to the extent, capacity checks, same-pool sources, Cinder's delete rules, exports,
/// data streams. Written by hand for the controller's unit tests; failures and latency can be
/// injected.
#[derive(Debug)]
pub struct FakeAgent {
    name: String,
    // Protects every pool, volume, snapshot and injected failure; never held across `.await`.
    state: Mutex<FakeState>,
}

/// A pool of a [`FakeAgent`].
#[derive(Clone, Debug, PartialEq)]
pub struct FakePool {
    /// Pool name.
    pub name: String,
    /// Zone.
    pub zone: String,
    /// Capacity.
    pub total: Bytes,
    /// Thin (allocate on write, over-subscription applies) or thick.
    pub thin: bool,
    /// Over-subscription limit of a thin pool.
    pub ratio: f64,
    /// Reserved percentage.
    pub reserved_percentage: u8,
    /// Allocation unit.
    pub extent: Bytes,
    /// Capabilities reported.
    pub capabilities: BTreeMap<String, String>,
    /// Reported unhealthy.
    pub unhealthy: bool,
}

impl FakePool {
    /// A healthy thin pool of `total` bytes in `zone`, ratio 1.0, extent 4 MiB.
    pub fn new(name: &str, zone: &str, total: Bytes) -> Self {
        FakePool {
            name: name.to_owned(),
            zone: zone.to_owned(),
            total,
            thin: true,
            ratio: 1.0,
            reserved_percentage: 0,
            extent: Bytes::mib(4),
            capabilities: BTreeMap::new(),
            unhealthy: false,
        }
    }

    /// With a capability.
    pub fn with_capability(mut self, key: &str, value: &str) -> Self {
        self.capabilities.insert(key.to_owned(), value.to_owned());
        self
    }
}

#[derive(Debug, Default)]
struct FakeState {
    pools: Vec<FakePool>,
    volumes: BTreeMap<VolumeId, (VolumeInfo, Vec<u8>)>,
    snapshots: BTreeMap<SnapshotId, (SnapshotInfo, Vec<u8>)>,
    /// Failures to return, per operation name, first in first out.
    failures: BTreeMap<&'static str, Vec<AgentClientError>>,
    /// Every mutating call, in order ("create_volume v1 pool", ...), for assertions.
    calls: Vec<String>,
    latency: Duration,
    down: bool,
    /// Backups by id (see `backups.rs`).
    backups: BTreeMap<String, backups::FakeBackup>,
    /// Backup repository names; empty = one called `default`.
    repositories: Vec<String>,
}

const FAKE_CHUNK: usize = 1 << 20;

fn fake_err(kind: AgentErrorKind, msg: impl Into<String>) -> AgentClientError {
    AgentClientError::new(kind, msg)
}

impl FakeAgent {
    /// An agent named `name` serving `pools`.
    pub fn new(name: &str, pools: Vec<FakePool>) -> Arc<Self> {
        Arc::new(FakeAgent {
            name: name.to_owned(),
            state: Mutex::new(FakeState {
                pools,
                ..FakeState::default()
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next call of `op` (a trait method name) fails with `err`.
    pub fn fail_next(&self, op: &'static str, err: AgentClientError) {
        self.lock().failures.entry(op).or_default().push(err);
    }

    /// Every call waits this long first (to make concurrent calls overlap).
    pub fn set_latency(&self, latency: Duration) {
        self.lock().latency = latency;
    }

    /// While down, every call fails with UNAVAILABLE.
    pub fn set_down(&self, down: bool) {
        self.lock().down = down;
    }

    /// Mutating calls so far.
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    /// A volume's content (written bytes; the rest reads as zeros), if it exists.
    pub fn content(&self, id: &VolumeId) -> Option<Vec<u8>> {
        self.lock().volumes.get(id).map(|(_, d)| d.clone())
    }

    /// Writes `bytes` at `offset` of a volume directly (as a workload would).
    pub fn poke(&self, id: &VolumeId, offset: usize, bytes: &[u8]) {
        if let Some((_, d)) = self.lock().volumes.get_mut(id) {
            if d.len() < offset + bytes.len() {
                d.resize(offset + bytes.len(), 0);
            }
            d[offset..offset + bytes.len()].copy_from_slice(bytes);
        }
    }

    /// Volume ids on this agent.
    pub fn volume_ids(&self) -> Vec<String> {
        self.lock().volumes.keys().map(|v| v.to_string()).collect()
    }

    /// Changes a pool's definition (e.g. to shrink it or mark it unhealthy).
    pub fn update_pool(&self, pool: FakePool) {
        let mut st = self.lock();
        if let Some(p) = st.pools.iter_mut().find(|p| p.name == pool.name) {
            *p = pool;
        }
    }

    async fn enter(&self, op: &'static str) -> Result<(), AgentClientError> {
        let latency = self.lock().latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let mut st = self.lock();
        if st.down {
            return Err(fake_err(AgentErrorKind::Unavailable, "agent is down"));
        }
        if let Some(list) = st.failures.get_mut(op) {
            if !list.is_empty() {
                return Err(list.remove(0));
            }
        }
        Ok(())
    }
}

impl FakeState {
    fn pool(&self, name: &str) -> Option<&FakePool> {
        self.pools.iter().find(|p| p.name == name)
    }

    fn provisioned(&self, pool: &str) -> u64 {
        self.volumes
            .values()
            .filter(|(v, _)| v.pool == pool)
            .map(|(v, _)| v.size.get())
            .chain(
                self.snapshots
                    .values()
                    .filter(|(s, _)| s.pool == pool)
                    .map(|(s, _)| s.size.get()),
            )
            .sum()
    }

    fn allocated(&self, pool: &str) -> u64 {
        self.volumes
            .values()
            .filter(|(v, _)| v.pool == pool)
            .map(|(v, d)| {
                if self.pool(pool).is_some_and(|p| p.thin) {
                    d.len() as u64
                } else {
                    v.size.get()
                }
            })
            .sum()
    }

    fn stats(&self, p: &FakePool) -> PoolStats {
        let allocated = self.allocated(&p.name);
        let mut caps = p.capabilities.clone();
        caps.insert("pool_name".into(), p.name.clone());
        caps.entry("multiattach".into())
            .or_insert_with(|| "True".into());
        PoolStats {
            name: p.name.clone(),
            kind: if p.thin {
                PoolKind::LvmThin
            } else {
                PoolKind::LvmThick
            },
            zone: p.zone.clone(),
            total: Capacity::Known(p.total),
            free: Capacity::Known(Bytes(p.total.get().saturating_sub(allocated))),
            provisioned: Bytes(self.provisioned(&p.name)),
            allocated: Bytes(allocated),
            thin_provisioning: p.thin,
            thick_provisioning: !p.thin,
            max_over_subscription_ratio: if p.thin { p.ratio } else { 1.0 },
            reserved_percentage: p.reserved_percentage,
            capabilities: caps,
            volume_count: self
                .volumes
                .values()
                .filter(|(v, _)| v.pool == p.name)
                .count() as u64,
            snapshot_count: self
                .snapshots
                .values()
                .filter(|(s, _)| s.pool == p.name)
                .count() as u64,
            extent: p.extent,
            portals: vec!["127.0.0.1:3260".into()],
            healthy: !p.unhealthy,
            unhealthy_reason: if p.unhealthy {
                "fake pool marked unhealthy".into()
            } else {
                String::new()
            },
        }
    }

    fn volume_view(&self, id: &VolumeId) -> Option<VolumeInfo> {
        let (v, _) = self.volumes.get(id)?;
        let mut v = v.clone();
        v.snapshot_count = self
            .snapshots
            .values()
            .filter(|(s, _)| s.source_volume == *id)
            .count() as u32;
        v.status = if v.exported_to.is_empty() {
            AgentVolumeStatus::Available
        } else {
            AgentVolumeStatus::InUse
        };
        Some(v)
    }

    fn create(&mut self, req: NewVolume) -> Result<VolumeInfo, AgentClientError> {
        use AgentErrorKind as K;
        let pool = self
            .pool(&req.pool)
            .cloned()
            .ok_or_else(|| fake_err(K::NotFound, format!("pool {:?} not found", req.pool)))?;
        if req.size.get() == 0 {
            return Err(fake_err(K::InvalidArgument, "size 0"));
        }
        let size = req
            .size
            .round_up(pool.extent)
            .ok_or_else(|| fake_err(K::InvalidArgument, "size overflows"))?;
        let content = match &req.source {
            None => Vec::new(),
            Some(VolumeSource::Snapshot(s)) => {
                let (snap, data) = self
                    .snapshots
                    .get(s)
                    .ok_or_else(|| fake_err(K::NotFound, format!("snapshot {s} not found")))?;
                if snap.pool != req.pool {
                    return Err(fake_err(
                        K::FailedPrecondition,
                        format!("snapshot {s} is on pool {}", snap.pool),
                    ));
                }
                if size < snap.size {
                    return Err(fake_err(K::InvalidArgument, "size below the source's"));
                }
                data.clone()
            }
            Some(VolumeSource::Volume(v)) => {
                let (src, data) = self
                    .volumes
                    .get(v)
                    .ok_or_else(|| fake_err(K::NotFound, format!("volume {v} not found")))?;
                if src.pool != req.pool {
                    return Err(fake_err(
                        K::FailedPrecondition,
                        format!("volume {v} is on pool {}", src.pool),
                    ));
                }
                if size < src.size {
                    return Err(fake_err(K::InvalidArgument, "size below the source's"));
                }
                data.clone()
            }
        };
        if let Some((existing, _)) = self.volumes.get(&req.id) {
            let same = existing.pool == req.pool
                && existing.size == size
                && existing.volume_type == req.volume_type
                && existing.source == req.source;
            return if same {
                self.volume_view(&req.id)
                    .ok_or_else(|| fake_err(K::Internal, "vanished"))
            } else {
                Err(fake_err(
                    K::AlreadyExists,
                    format!("volume {} exists with other parameters", req.id),
                ))
            };
        }
        let stats = self.stats(&pool);
        let reserved = pool.total.get() * u64::from(pool.reserved_percentage) / 100;
        let fits = if pool.thin {
            (stats.provisioned.get() + size.get()) as f64 <= pool.total.get() as f64 * pool.ratio
        } else {
            stats
                .free
                .known()
                .map_or(0, Bytes::get)
                .saturating_sub(reserved)
                >= size.get()
        };
        if !fits {
            return Err(fake_err(
                K::ResourceExhausted,
                format!("pool {} has no room for {size}", pool.name),
            ));
        }
        let info = VolumeInfo {
            id: req.id.clone(),
            pool: req.pool,
            size,
            status: AgentVolumeStatus::Available,
            volume_type: req.volume_type,
            source: req.source,
            exported_to: Vec::new(),
            snapshot_count: 0,
            metadata: req.metadata,
            created_at: Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
        };
        self.volumes.insert(req.id.clone(), (info, content));
        self.volume_view(&req.id)
            .ok_or_else(|| fake_err(K::Internal, "vanished"))
    }
}

fn not_found_volume(id: &VolumeId) -> AgentClientError {
    fake_err(AgentErrorKind::NotFound, format!("volume {id} not found"))
}

/// Splits `data` (the written prefix of a `size`-byte volume) into data chunks and one hole.
fn chunks_of(data: &[u8], size: u64) -> Vec<Chunk> {
    let mut out: Vec<Chunk> = data
        .chunks(FAKE_CHUNK)
        .enumerate()
        .map(|(i, c)| Chunk::Data {
            offset: (i * FAKE_CHUNK) as u64,
            bytes: c.to_vec(),
        })
        .collect();
    let written = data.len() as u64;
    if written < size {
        out.push(Chunk::Hole {
            offset: written,
            len: size - written,
        });
    }
    out
}

#[async_trait::async_trait]
impl StorageAgent for FakeAgent {
    fn name(&self) -> &str {
        &self.name
    }

    async fn list_pools(&self) -> Result<Vec<PoolStats>, AgentClientError> {
        self.enter("list_pools").await?;
        let st = self.lock();
        Ok(st.pools.iter().map(|p| st.stats(p)).collect())
    }

    async fn create_volume(&self, req: NewVolume) -> Result<VolumeInfo, AgentClientError> {
        self.enter("create_volume").await?;
        let mut st = self.lock();
        st.calls
            .push(format!("create_volume {} {}", req.id, req.pool));
        st.create(req)
    }

    async fn delete_volume(&self, id: &VolumeId) -> Result<(), AgentClientError> {
        self.enter("delete_volume").await?;
        let mut st = self.lock();
        st.calls.push(format!("delete_volume {id}"));
        let Some(v) = st.volume_view(id) else {
            return Ok(());
        };
        if v.snapshot_count > 0 {
            return Err(fake_err(
                AgentErrorKind::FailedPrecondition,
                format!("volume {id} has {} snapshot(s)", v.snapshot_count),
            ));
        }
        if !v.exported_to.is_empty() {
            return Err(fake_err(
                AgentErrorKind::FailedPrecondition,
                format!("volume {id} is exported to {:?}", v.exported_to),
            ));
        }
        st.volumes.remove(id);
        Ok(())
    }

    async fn extend_volume(
        &self,
        id: &VolumeId,
        size: Bytes,
    ) -> Result<VolumeInfo, AgentClientError> {
        self.enter("extend_volume").await?;
        let mut st = self.lock();
        st.calls.push(format!("extend_volume {id} {size}"));
        let pool_name = st
            .volumes
            .get(id)
            .map(|(v, _)| v.pool.clone())
            .ok_or_else(|| not_found_volume(id))?;
        let extent = st.pool(&pool_name).map_or(Bytes(1), |p| p.extent);
        let new = size.round_up(extent).unwrap_or(size);
        let entry = st.volumes.get_mut(id).ok_or_else(|| not_found_volume(id))?;
        if new < entry.0.size {
            return Err(fake_err(AgentErrorKind::OutOfRange, "cannot shrink"));
        }
        entry.0.size = new;
        st.volume_view(id).ok_or_else(|| not_found_volume(id))
    }

    async fn get_volume(&self, id: &VolumeId) -> Result<VolumeInfo, AgentClientError> {
        self.enter("get_volume").await?;
        self.lock()
            .volume_view(id)
            .ok_or_else(|| not_found_volume(id))
    }

    async fn list_volumes(&self) -> Result<Vec<VolumeInfo>, AgentClientError> {
        self.enter("list_volumes").await?;
        let st = self.lock();
        Ok(st
            .volumes
            .keys()
            .filter_map(|id| st.volume_view(id))
            .collect())
    }

    async fn update_volume(
        &self,
        id: &VolumeId,
        volume_type: &str,
        metadata: Option<BTreeMap<String, String>>,
    ) -> Result<VolumeInfo, AgentClientError> {
        self.enter("update_volume").await?;
        let mut st = self.lock();
        st.calls.push(format!("update_volume {id} {volume_type}"));
        let entry = st.volumes.get_mut(id).ok_or_else(|| not_found_volume(id))?;
        if !volume_type.is_empty() {
            entry.0.volume_type = volume_type.to_owned();
        }
        if let Some(m) = metadata {
            entry.0.metadata = m;
        }
        st.volume_view(id).ok_or_else(|| not_found_volume(id))
    }

    async fn create_snapshot(
        &self,
        id: &SnapshotId,
        source: &VolumeId,
        metadata: BTreeMap<String, String>,
    ) -> Result<SnapshotInfo, AgentClientError> {
        self.enter("create_snapshot").await?;
        let mut st = self.lock();
        st.calls.push(format!("create_snapshot {id} {source}"));
        if let Some((s, _)) = st.snapshots.get(id) {
            return if s.source_volume == *source {
                Ok(s.clone())
            } else {
                Err(fake_err(
                    AgentErrorKind::AlreadyExists,
                    format!("snapshot {id} exists with another source"),
                ))
            };
        }
        let (v, data) = st
            .volumes
            .get(source)
            .ok_or_else(|| not_found_volume(source))?;
        let info = SnapshotInfo {
            id: id.clone(),
            source_volume: source.clone(),
            pool: v.pool.clone(),
            size: v.size,
            created_at: Some(UNIX_EPOCH + Duration::from_secs(1_700_000_100)),
            ready_to_use: true,
            metadata,
        };
        let data = data.clone();
        st.snapshots.insert(id.clone(), (info.clone(), data));
        Ok(info)
    }

    async fn delete_snapshot(&self, id: &SnapshotId) -> Result<(), AgentClientError> {
        self.enter("delete_snapshot").await?;
        let mut st = self.lock();
        st.calls.push(format!("delete_snapshot {id}"));
        st.snapshots.remove(id);
        Ok(())
    }

    async fn get_snapshot(&self, id: &SnapshotId) -> Result<SnapshotInfo, AgentClientError> {
        self.enter("get_snapshot").await?;
        self.lock()
            .snapshots
            .get(id)
            .map(|(s, _)| s.clone())
            .ok_or_else(|| fake_err(AgentErrorKind::NotFound, format!("snapshot {id} not found")))
    }

    async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>, AgentClientError> {
        self.enter("list_snapshots").await?;
        Ok(self
            .lock()
            .snapshots
            .values()
            .map(|(s, _)| s.clone())
            .collect())
    }

    async fn export_volume(
        &self,
        id: &VolumeId,
        initiator: &Iqn,
        _host: &str,
    ) -> Result<ExportInfo, AgentClientError> {
        self.enter("export_volume").await?;
        let mut st = self.lock();
        st.calls.push(format!("export_volume {id} {initiator}"));
        let entry = st.volumes.get_mut(id).ok_or_else(|| not_found_volume(id))?;
        if !entry.0.exported_to.iter().any(|i| i == initiator.as_str()) {
            entry.0.exported_to.push(initiator.to_string());
        }
        let short: String = id.as_str().chars().filter(|c| *c != '-').take(16).collect();
        Ok(ExportInfo {
            target_iqn: crate::agent::ids::target_iqn(id),
            portals: vec!["127.0.0.1:3260".into()],
            lun: 1,
            chap_username: format!("cb-{short}"),
        })
    }

    async fn unexport_volume(
        &self,
        id: &VolumeId,
        initiator: Option<&Iqn>,
    ) -> Result<(), AgentClientError> {
        self.enter("unexport_volume").await?;
        let mut st = self.lock();
        st.calls.push(format!(
            "unexport_volume {id} {}",
            initiator.map(Iqn::as_str).unwrap_or("*")
        ));
        if let Some((v, _)) = st.volumes.get_mut(id) {
            match initiator {
                Some(i) => v.exported_to.retain(|e| e != i.as_str()),
                None => v.exported_to.clear(),
            }
        }
        Ok(())
    }

    async fn read_volume(&self, source: ReadSource) -> Result<ChunkStream, AgentClientError> {
        self.enter("read_volume").await?;
        let st = self.lock();
        let chunks = match &source {
            ReadSource::Volume(v) => st
                .volumes
                .get(v)
                .map(|(info, d)| chunks_of(d, info.size.get()))
                .ok_or_else(|| not_found_volume(v))?,
            ReadSource::Snapshot(s) => st
                .snapshots
                .get(s)
                .map(|(info, d)| chunks_of(d, info.size.get()))
                .ok_or_else(|| {
                    fake_err(AgentErrorKind::NotFound, format!("snapshot {s} not found"))
                })?,
        };
        Ok(Box::pin(futures::stream::iter(chunks.into_iter().map(Ok))))
    }

    async fn write_volume(
        &self,
        id: &VolumeId,
        size: Bytes,
        mut chunks: ChunkStream,
    ) -> Result<WriteSummary, AgentClientError> {
        self.enter("write_volume").await?;
        let volume_size = {
            let mut st = self.lock();
            st.calls.push(format!("write_volume {id}"));
            let (v, _) = st.volumes.get(id).ok_or_else(|| not_found_volume(id))?;
            if !v.exported_to.is_empty() {
                return Err(fake_err(
                    AgentErrorKind::FailedPrecondition,
                    format!("volume {id} is exported"),
                ));
            }
            v.size
        };
        if size > volume_size {
            return Err(fake_err(
                AgentErrorKind::InvalidArgument,
                format!("stream covers {size}, volume {id} has {volume_size}"),
            ));
        }
        let mut summary = WriteSummary::default();
        let mut staged: Vec<(usize, Vec<u8>)> = Vec::new();
        while let Some(c) = chunks.next().await {
            match c? {
                Chunk::Data { offset, bytes } => {
                    if offset + bytes.len() as u64 > volume_size.get() {
                        return Err(fake_err(
                            AgentErrorKind::InvalidArgument,
                            "chunk past the end",
                        ));
                    }
                    summary.bytes_written += bytes.len() as u64;
                    staged.push((offset as usize, bytes));
                }
                Chunk::Hole { len, .. } => summary.hole_bytes += len,
            }
        }
        let mut st = self.lock();
        let (_, data) = st.volumes.get_mut(id).ok_or_else(|| not_found_volume(id))?;
        for (offset, bytes) in staged {
            if data.len() < offset + bytes.len() {
                data.resize(offset + bytes.len(), 0);
            }
            data[offset..offset + bytes.len()].copy_from_slice(&bytes);
        }
        Ok(summary)
    }
}
