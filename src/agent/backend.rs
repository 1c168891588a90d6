//! The pool seam: what every kind of pool (file, lvm-thick, lvm-thin) provides. The agent
//! service enforces Cinder's rules above it; a backend only stores and reports.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::SystemTime;

use super::{AgentError, SnapshotId, VolumeId};
use crate::config::PoolKindConfig;
use crate::types::Bytes;

/// A capacity figure that may be unknown or unbounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capacity {
    /// A known number of bytes.
    Known(Bytes),
    /// The backend cannot tell.
    Unknown,
    /// No practical limit.
    Infinite,
}

/// Pool statistics, read from the storage at each call.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolStats {
    /// Usable size of the pool.
    pub total: Capacity,
    /// Free space.
    pub free: Capacity,
    /// Sum of the virtual sizes of volumes and snapshots.
    pub provisioned: Bytes,
    /// Bytes really allocated.
    pub allocated: Bytes,
    /// Number of volumes.
    pub volume_count: u32,
    /// Number of snapshots.
    pub snapshot_count: u32,
    /// Bytes held only by change-tracking markers (what their volumes have rewritten since
    /// the marker was taken); `None` where the pool cannot tell them apart.
    pub tracking: Option<Bytes>,
}

/// Where a volume's content came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// Restored from a snapshot.
    Snapshot(SnapshotId),
    /// Cloned from a volume.
    Volume(VolumeId),
}

/// A volume as its durable state describes it.
#[derive(Clone, Debug, PartialEq)]
pub struct VolumeRecord {
    /// Id.
    pub id: VolumeId,
    /// Pool name.
    pub pool: String,
    /// Exact size.
    pub size: Bytes,
    /// Allocated bytes (thin/file may be below size).
    pub allocated: Bytes,
    /// Volume type name.
    pub volume_type: String,
    /// Content source.
    pub source: Option<Source>,
    /// Initiator IQNs the volume is exported to (durable, so exports survive tgtd restarts).
    pub exported_to: Vec<String>,
    /// Caller-owned metadata.
    pub metadata: BTreeMap<String, String>,
    /// Creation time.
    pub created_at: SystemTime,
}

/// A snapshot as its durable state describes it.
#[derive(Clone, Debug, PartialEq)]
pub struct SnapshotRecord {
    /// Id.
    pub id: SnapshotId,
    /// Origin volume.
    pub source_volume: VolumeId,
    /// Pool name.
    pub pool: String,
    /// Size of the origin at snapshot time.
    pub size: Bytes,
    /// Caller-owned metadata.
    pub metadata: BTreeMap<String, String>,
    /// Creation time.
    pub created_at: SystemTime,
}

impl SnapshotRecord {
    /// The backup whose change-tracking marker this snapshot is, if it is one.
    pub fn marker_of(&self) -> Option<&str> {
        self.metadata.get(MARKER_KEY).map(String::as_str)
    }
}

/// What to create.
#[derive(Clone, Debug, PartialEq)]
pub struct NewVolume {
    /// Id chosen by the caller.
    pub id: VolumeId,
    /// Size, already rounded up to the pool's extent.
    pub size: Bytes,
    /// Volume type name.
    pub volume_type: String,
    /// Caller-owned metadata.
    pub metadata: BTreeMap<String, String>,
    /// Content source on this pool, if any.
    pub source: Option<Source>,
}

/// Snapshot metadata key of a change-tracking marker: the complete backup whose data the
/// snapshot holds (ADR 0009). A marker is hidden from snapshot lists and counts, is not
/// counted as provisioned or allocated by the pool (its blocks are the volume's, bar those
/// rewritten since), and goes with its volume, with its backup, or when a newer backup of the
/// volume leaves its own.
pub const MARKER_KEY: &str = "cinderblock.backup-marker";

/// What to snapshot.
#[derive(Clone, Debug, PartialEq)]
pub struct NewSnapshot {
    /// Id chosen by the caller.
    pub id: SnapshotId,
    /// Origin volume (on this pool).
    pub source_volume: VolumeId,
    /// Caller-owned metadata.
    pub metadata: BTreeMap<String, String>,
}

/// One pool's storage operations. Implementations must be safe to call concurrently for
/// different volumes; the service serialises calls for one volume.
#[tonic::async_trait]
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// Pool name.
    fn name(&self) -> &str;

    /// Pool kind.
    fn kind(&self) -> PoolKindConfig;

    /// Allocation unit; volume sizes are multiples of it.
    fn extent(&self) -> Bytes;

    /// Whether a freshly created volume reads as zeros everywhere (so a writer may skip holes).
    fn fresh_reads_zero(&self) -> bool;

    /// Prepares the pool (create directories, check the VG/thin pool exist) and cleans up
    /// leftovers of an interrupted create. Called once at start and by reconciliation.
    async fn open(&self) -> Result<(), AgentError>;

    /// Capacity statistics.
    async fn stats(&self) -> Result<PoolStats, AgentError>;

    /// Every volume of the pool, from durable state.
    async fn volumes(&self) -> Result<Vec<VolumeRecord>, AgentError>;

    /// Every snapshot of the pool, from durable state.
    async fn snapshots(&self) -> Result<Vec<SnapshotRecord>, AgentError>;

    /// Creates a volume (blank, or from a snapshot or volume of this pool). The metadata is
    /// written together with the volume, so a crash cannot leave an undescribed volume.
    async fn create(&self, new: &NewVolume) -> Result<VolumeRecord, AgentError>;

    /// Deletes a volume, clearing its data as configured. `VolumeNotFound` when absent.
    async fn delete(&self, id: &VolumeId) -> Result<(), AgentError>;

    /// Grows a volume to `size` (already rounded). The service has checked the rules.
    async fn extend(&self, id: &VolumeId, size: Bytes) -> Result<VolumeRecord, AgentError>;

    /// True when growing this volume requires it to be inactive (thick origin with snapshots).
    async fn extend_needs_detach(&self, id: &VolumeId) -> Result<bool, AgentError>;

    /// Creates a snapshot of a volume of this pool.
    async fn snapshot(&self, new: &NewSnapshot) -> Result<SnapshotRecord, AgentError>;

    /// Deletes a snapshot. `SnapshotNotFound` when absent.
    async fn delete_snapshot(&self, id: &SnapshotId) -> Result<(), AgentError>;

    /// Replaces the volume type and/or metadata.
    async fn update(
        &self,
        id: &VolumeId,
        volume_type: Option<&str>,
        metadata: Option<&BTreeMap<String, String>>,
    ) -> Result<VolumeRecord, AgentError>;

    /// Records the initiators a volume is exported to (durably).
    async fn set_exports(&self, id: &VolumeId, initiators: &[String]) -> Result<(), AgentError>;

    /// The block device or file holding a volume's data (what tgt exports).
    fn volume_path(&self, id: &VolumeId) -> PathBuf;

    /// The block device or file holding a snapshot's data.
    fn snapshot_path(&self, id: &SnapshotId) -> PathBuf;

    /// Whether the pool tracks changes: its snapshots cost no copy, and it can tell which
    /// ranges two snapshots of a volume may differ in ([`Backend::changed_ranges`]).
    fn tracks_changes(&self) -> bool {
        false
    }

    /// The byte ranges where snapshot `after` may differ from the older snapshot `before` of
    /// the same volume (in order, merged), or `None` when the pool cannot tell (then every
    /// range counts as changed).
    async fn changed_ranges(
        &self,
        _before: &SnapshotId,
        _after: &SnapshotId,
    ) -> Result<Option<Vec<(u64, u64)>>, AgentError> {
        Ok(None)
    }

    /// The byte ranges of snapshot `id` that hold data, where the pool keeps a map of them
    /// (an LVM thin snapshot's mapped blocks): the rest reads as zeros, and a backup records
    /// it as holes without reading it. `None` when the pool keeps none (a file answers
    /// `SEEK_DATA` by itself).
    async fn mapped_ranges(&self, _id: &SnapshotId) -> Result<Option<Vec<(u64, u64)>>, AgentError> {
        Ok(None)
    }

    /// Replaces a snapshot's metadata (durably). Needed by pools that track changes: a
    /// backup's temporary snapshot becomes the volume's change-tracking marker.
    async fn set_snapshot_metadata(
        &self,
        id: &SnapshotId,
        _metadata: &BTreeMap<String, String>,
    ) -> Result<SnapshotRecord, AgentError> {
        Err(AgentError::InvalidArgument(format!(
            "pool {} keeps no metadata changes on snapshot {id}",
            self.name()
        )))
    }
}
