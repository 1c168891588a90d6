//! The agent's operations with Cinder's rules on top of the pools and tgt exports.
//!
//! The in-memory index (volume and snapshot records by id) is a cache of the pools' durable
//! state: rebuilt by [`AgentService::start`] and by every reconciliation pass, and updated by
//! each operation while that operation holds the object's guard. It spares a metadata read
//! per request (an `lvs` costs as much as an `lvcreate`); the storage stays the truth.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

mod backups;

pub use backups::{
    error_chain, BackupStatus, BackupView, CreateBackup, Outcome, Running, Transfers, VolumeState,
    STATUS_KEY, STATUS_REASON_KEY, TEMP_SNAPSHOT_KEY,
};

use super::backend::{
    Backend, NewSnapshot, NewVolume, PoolStats, SnapshotRecord, Source, VolumeRecord,
};
use super::chap::{ChapCredentials, ChapKey};
use super::export::{DesiredExport, Exports, TgtdInstance};
use super::guard::{Guard, Guards};
use super::{file::FilePool, lvm::LvmPool, AgentError, Iqn, SnapshotId, VolumeId};
use crate::config::{AgentConfig, PoolConfig, PoolKindConfig};
use crate::exec::Runner;
use crate::metrics::Counter;
use crate::types::Bytes;

/// A pool with its configuration, as the agent serves it.
#[derive(Debug)]
struct Pool {
    cfg: PoolConfig,
    portals: Vec<String>,
    backend: Arc<dyn Backend>,
}

/// A pool's report (Cinder's pool stats plus configuration).
#[derive(Clone, Debug, PartialEq)]
pub struct PoolReport {
    /// Pool configuration (name, kind, zone, capabilities, reserved %, ratio).
    pub cfg: PoolConfig,
    /// Statistics; `Err` text when the pool cannot be read.
    pub stats: Result<PoolStats, String>,
    /// Allocation unit.
    pub extent: Bytes,
    /// Portals of its exports.
    pub portals: Vec<String>,
}

/// A request to create a volume.
#[derive(Clone, Debug, PartialEq)]
pub struct CreateVolume {
    /// Id chosen by the caller.
    pub id: VolumeId,
    /// Pool name.
    pub pool: String,
    /// Requested size (rounded up to the pool's extent).
    pub size: Bytes,
    /// Volume type name.
    pub volume_type: String,
    /// Caller-owned metadata.
    pub metadata: BTreeMap<String, String>,
    /// Content source on this agent.
    pub source: Option<Source>,
}

/// The answer to an export.
#[derive(Clone, Debug, PartialEq)]
pub struct ExportAnswer {
    /// Target IQN.
    pub target_iqn: String,
    /// Portals.
    pub portals: Vec<String>,
    /// LUN number.
    pub lun: u32,
    /// Incoming CHAP credentials.
    pub chap: ChapCredentials,
}

/// What a data stream reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataSource {
    /// A volume.
    Volume(VolumeId),
    /// A snapshot.
    Snapshot(SnapshotId),
}

#[derive(Debug, Default)]
struct Index {
    volumes: HashMap<VolumeId, VolumeRecord>,
    snapshots: HashMap<SnapshotId, SnapshotRecord>,
}

/// Counters of reconciliation, for the metrics endpoint.
#[derive(Debug, Default)]
struct ReconcileCounters {
    runs: Counter,
    errors: Counter,
    created: Counter,
    repaired: Counter,
    removed: Counter,
    failed: Counter,
    tgtd_restarts: Counter,
}

/// What reconciliation has done since the agent started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReconcileTotals {
    /// Passes started.
    pub runs: u64,
    /// Passes that failed as a whole (tgtd not answering, a pool unreadable).
    pub errors: u64,
    /// Exports found missing and re-created.
    pub created: u64,
    /// Exports found different and repaired.
    pub repaired: u64,
    /// Targets without a volume, removed.
    pub removed: u64,
    /// Exports that could not be restored.
    pub failed: u64,
    /// tgtd restarts seen (its control socket re-created; see [`Exports::tgtd_instance`]).
    pub tgtd_restarts: u64,
}

/// The storage agent.
#[derive(Debug)]
pub struct AgentService {
    name: String,
    pools: BTreeMap<String, Pool>,
    exports: Exports,
    guards: Guards,
    // Cache of the pools' records (see the module comment). Never held across `.await`.
    index: RwLock<Index>,
    counters: ReconcileCounters,
    // The tgtd instance the last reconciliation pass saw. Locked briefly, never across an
    // `.await`.
    last_tgtd: Mutex<Option<TgtdInstance>>,
    // Repositories, running and failed backups, volumes in use by backups and restores.
    backups: backups::Backups,
    // The last pool reports made (for ListPools, a heartbeat or a scrape) and when, for
    // scrapes: reading LVM at every scrape costs seconds on a busy node. Locked briefly,
    // never across an `.await`.
    last_pools: Mutex<Option<(Instant, Arc<Vec<PoolReport>>)>>,
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

/// For every id in `listed` or `index` that `changed` says an operation touched, takes the
/// index's record (or its absence) over the listed one; returns those ids.
fn keep_changed<K, V>(
    listed: &mut HashMap<K, V>,
    index: &HashMap<K, V>,
    changed: impl Fn(&K) -> bool,
) -> Vec<K>
where
    K: Clone + Eq + std::hash::Hash,
    V: Clone,
{
    let ids: HashSet<K> = listed.keys().chain(index.keys()).cloned().collect();
    let changed: Vec<K> = ids.into_iter().filter(|id| changed(id)).collect();
    for id in &changed {
        match index.get(id) {
            Some(v) => listed.insert(id.clone(), v.clone()),
            None => listed.remove(id),
        };
    }
    changed
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl AgentService {
    /// Builds the agent from its configuration (no I/O yet; see [`AgentService::start`]).
    pub fn new(cfg: &AgentConfig, runner: Runner, key: ChapKey) -> Result<Self, AgentError> {
        let mut pools = BTreeMap::new();
        for p in &cfg.pools {
            let backend: Arc<dyn Backend> = match p.kind {
                PoolKindConfig::File => Arc::new(FilePool::new(p)?),
                PoolKindConfig::LvmThick | PoolKindConfig::LvmThin => {
                    Arc::new(LvmPool::new(p, runner.clone())?)
                }
            };
            let portals = if p.portals.is_empty() {
                vec![cfg.tgt.portal.clone()]
            } else {
                p.portals.clone()
            };
            pools.insert(
                p.name.clone(),
                Pool {
                    cfg: p.clone(),
                    portals,
                    backend,
                },
            );
        }
        Ok(AgentService {
            name: cfg.name.clone(),
            pools,
            exports: Exports::new(runner, cfg.tgt.control_port, key),
            guards: Guards::default(),
            index: RwLock::new(Index::default()),
            counters: ReconcileCounters::default(),
            last_tgtd: Mutex::new(None),
            backups: backups::Backups::new(cfg)?,
            last_pools: Mutex::new(None),
        })
    }

    /// The agent's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Pool names.
    pub fn pool_names(&self) -> Vec<String> {
        self.pools.keys().cloned().collect()
    }

    /// Opens every pool (cleaning leftovers of interrupted operations), reconciles, and
    /// removes the temporary snapshots of backups that were running when the agent stopped.
    pub async fn start(&self) -> Result<(), AgentError> {
        for p in self.pools.values() {
            p.backend.open().await?;
        }
        self.reconcile().await?;
        self.remove_temporary_snapshots().await;
        Ok(())
    }

    /// Runs [`AgentService::reconcile`] every `every` until `shutdown`.
    pub async fn reconcile_loop(self: Arc<Self>, every: Duration, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            if let Err(e) = self.reconcile().await {
                tracing::warn!(error = %e, "reconciliation failed");
            }
        }
    }

    /// Rebuilds the index from durable state and makes tgtd's targets match it: missing
    /// exports (tgtd restarted) are re-created, targets without a volume removed. Drift is
    /// logged and counted ([`AgentService::reconcile_totals`]).
    pub async fn reconcile(&self) -> Result<(), AgentError> {
        self.counters.runs.inc();
        self.note_tgtd_restart().await;
        let result = self.reconcile_once().await;
        if result.is_err() {
            self.counters.errors.inc();
        }
        result
    }

    /// What reconciliation has done since the agent started.
    pub fn reconcile_totals(&self) -> ReconcileTotals {
        let c = &self.counters;
        ReconcileTotals {
            runs: c.runs.get(),
            errors: c.errors.get(),
            created: c.created.get(),
            repaired: c.repaired.get(),
            removed: c.removed.get(),
            failed: c.failed.get(),
            tgtd_restarts: c.tgtd_restarts.get(),
        }
    }

    /// Counts a restart of tgtd when its control socket is not the one the previous pass saw.
    async fn note_tgtd_restart(&self) {
        let Some(now) = self.exports.tgtd_instance().await else {
            return;
        };
        let before = lock(&self.last_tgtd).replace(now);
        if before.is_some_and(|b| b != now) {
            self.counters.tgtd_restarts.inc();
            tracing::warn!("tgtd restarted (control socket re-created): every export is restored");
        }
    }

    async fn reconcile_once(&self) -> Result<(), AgentError> {
        // Operations may run while durable state is read: anything one of them touched in
        // the meantime is taken from the index (which the operation keeps current), not
        // from this possibly older reading, and its export is left to the operation.
        let mark = self.guards.mark();
        let mut volumes = HashMap::new();
        let mut snapshots = HashMap::new();
        let mut desired = Vec::new();
        for p in self.pools.values() {
            for v in p.backend.volumes().await? {
                if !v.exported_to.is_empty() {
                    let initiators = v
                        .exported_to
                        .iter()
                        .filter_map(|i| Iqn::parse(i).ok())
                        .collect();
                    desired.push(DesiredExport {
                        id: v.id.clone(),
                        backing: p.backend.volume_path(&v.id),
                        initiators,
                    });
                }
                volumes.insert(v.id.clone(), v);
            }
            for s in p.backend.snapshots().await? {
                snapshots.insert(s.id.clone(), s);
            }
        }
        let unstable: Vec<VolumeId> = {
            let mut idx = write(&self.index);
            let unstable = keep_changed(&mut volumes, &idx.volumes, |id| {
                self.guards.changed_since(id.as_str(), mark)
            });
            keep_changed(&mut snapshots, &idx.snapshots, |id| {
                self.guards.changed_since(&format!("snapshot:{id}"), mark)
            });
            *idx = Index { volumes, snapshots };
            unstable
        };
        // Exports of volumes changed during the reading are left to their operation.
        desired.retain(|d| !unstable.contains(&d.id));
        let drift = self.exports.reconcile_except(&desired, &unstable).await?;
        let c = &self.counters;
        c.created.add(drift.created.len() as u64);
        c.repaired.add(drift.repaired.len() as u64);
        c.removed.add(drift.removed.len() as u64);
        c.failed.add(drift.failed.len() as u64);
        if !drift.created.is_empty() || !drift.repaired.is_empty() || !drift.removed.is_empty() {
            tracing::warn!(
                created = drift.created.len(),
                repaired = drift.repaired.len(),
                removed = drift.removed.len(),
                "export drift corrected"
            );
        }
        Ok(())
    }

    /// tgtd answers and every pool can be read.
    pub async fn ready(&self) -> Result<(), AgentError> {
        self.exports.ping().await?;
        for p in self.pools.values() {
            p.backend.stats().await?;
        }
        Ok(())
    }

    fn pool(&self, name: &str) -> Result<&Pool, AgentError> {
        self.pools
            .get(name)
            .ok_or_else(|| AgentError::PoolNotFound(name.to_owned()))
    }

    fn volume(&self, id: &VolumeId) -> Result<VolumeRecord, AgentError> {
        read(&self.index)
            .volumes
            .get(id)
            .cloned()
            .ok_or_else(|| AgentError::VolumeNotFound(id.clone()))
    }

    fn lock(&self, key: &str) -> Result<Guard, AgentError> {
        self.guards.try_lock(key)
    }

    /// Snapshots of a volume, change-tracking markers not counted (they go with it).
    fn snapshot_count(&self, id: &VolumeId) -> usize {
        read(&self.index)
            .snapshots
            .values()
            .filter(|s| &s.source_volume == id && s.marker_of().is_none())
            .count()
    }

    /// Every pool with fresh statistics.
    pub async fn pools(&self) -> Vec<PoolReport> {
        let mut out = Vec::with_capacity(self.pools.len());
        for p in self.pools.values() {
            out.push(PoolReport {
                cfg: p.cfg.clone(),
                stats: p.backend.stats().await.map_err(|e| e.to_string()),
                extent: p.backend.extent(),
                portals: p.portals.clone(),
            });
        }
        *lock(&self.last_pools) = Some((Instant::now(), Arc::new(out.clone())));
        out
    }

    /// The last reports made by [`Self::pools`] if they are at most `max_age` old, else new
    /// ones. A controller asks for them every few seconds, so a scrape seldom reads the pools
    /// itself.
    pub async fn recent_pools(&self, max_age: Duration) -> Arc<Vec<PoolReport>> {
        if let Some((at, reports)) = lock(&self.last_pools).clone() {
            if at.elapsed() <= max_age {
                return reports;
            }
        }
        Arc::new(self.pools().await)
    }

    /// Creates a volume; a retry with the same parameters returns the existing volume.
    pub async fn create_volume(&self, req: CreateVolume) -> Result<VolumeRecord, AgentError> {
        let pool = self.pool(&req.pool)?;
        if req.size.0 == 0 {
            return Err(AgentError::InvalidArgument(
                "size must be greater than zero".into(),
            ));
        }
        let size = req.size.round_up(pool.backend.extent()).ok_or_else(|| {
            AgentError::InvalidArgument(format!("size {} is too large", req.size.0))
        })?;
        let _g = self.lock(req.id.as_str())?;
        if let Some(existing) = read(&self.index).volumes.get(&req.id).cloned() {
            return same_volume(existing, &req, size);
        }
        let source_size = match &req.source {
            None => None,
            Some(Source::Snapshot(s)) => {
                let snap = read(&self.index)
                    .snapshots
                    .get(s)
                    .cloned()
                    .ok_or_else(|| AgentError::SnapshotNotFound(s.clone()))?;
                if snap.pool != req.pool {
                    return Err(AgentError::Precondition(format!(
                        "snapshot {s} is on pool {}, not {}; copy it with the data stream",
                        snap.pool, req.pool
                    )));
                }
                Some(snap.size)
            }
            Some(Source::Volume(v)) => {
                let vol = self.volume(v)?;
                if vol.pool != req.pool {
                    return Err(AgentError::Precondition(format!(
                        "volume {v} is on pool {}, not {}; copy it with the data stream",
                        vol.pool, req.pool
                    )));
                }
                Some(vol.size)
            }
        };
        if let Some(src) = source_size {
            if size < src {
                return Err(AgentError::InvalidArgument(format!(
                    "size {size} is smaller than the source's {src}"
                )));
            }
        }
        // A source volume must not change while it is being copied.
        let _source_guard = match &req.source {
            Some(Source::Volume(v)) => Some(self.lock(v.as_str())?),
            _ => None,
        };
        let new = NewVolume {
            id: req.id.clone(),
            size,
            volume_type: req.volume_type.clone(),
            metadata: req.metadata.clone(),
            source: req.source.clone(),
        };
        let rec = pool.backend.create(&new).await?;
        write(&self.index)
            .volumes
            .insert(rec.id.clone(), rec.clone());
        tracing::info!(volume = %rec.id, pool = %rec.pool, size = %rec.size, "volume created");
        Ok(rec)
    }

    /// Deletes a volume (Cinder's rules: not with snapshots, not while exported). A volume
    /// that does not exist is already deleted: Ok.
    pub async fn delete_volume(&self, id: &VolumeId) -> Result<(), AgentError> {
        let _g = self.lock(id.as_str())?;
        let Some(vol) = read(&self.index).volumes.get(id).cloned() else {
            return Ok(());
        };
        self.backup_activity_blocks(id)?;
        let snaps = self.snapshot_count(id);
        if snaps > 0 {
            return Err(AgentError::HasSnapshots {
                id: id.clone(),
                count: snaps,
            });
        }
        if !vol.exported_to.is_empty() {
            return Err(AgentError::Exported {
                id: id.clone(),
                initiators: vol.exported_to,
            });
        }
        for m in self.markers(Some(id)) {
            self.delete_snapshot(&m.id).await?;
        }
        match self.pool(&vol.pool)?.backend.delete(id).await {
            Ok(()) | Err(AgentError::VolumeNotFound(_)) => {}
            Err(e) => return Err(e),
        }
        write(&self.index).volumes.remove(id);
        tracing::info!(volume = %id, "volume deleted");
        Ok(())
    }

    /// Grows a volume; the same size again is a no-op, a smaller one an error.
    pub async fn extend_volume(
        &self,
        id: &VolumeId,
        size: Bytes,
    ) -> Result<VolumeRecord, AgentError> {
        let _g = self.lock(id.as_str())?;
        let vol = self.volume(id)?;
        let pool = self.pool(&vol.pool)?;
        let size = size
            .round_up(pool.backend.extent())
            .ok_or_else(|| AgentError::InvalidArgument(format!("size {} is too large", size.0)))?;
        if size < vol.size {
            return Err(AgentError::Shrink {
                id: id.clone(),
                current: vol.size,
                requested: size,
            });
        }
        if size == vol.size {
            return Ok(vol);
        }
        let exported = !vol.exported_to.is_empty();
        if exported && pool.backend.extend_needs_detach(id).await? {
            return Err(AgentError::ExtendNeedsDetach(id.clone()));
        }
        let rec = pool.backend.extend(id, size).await?;
        if exported {
            // tgt caches a LUN's size: re-create the LUN so initiators see the new size.
            self.exports
                .refresh_lun(id, &pool.backend.volume_path(id))
                .await?;
        }
        write(&self.index).volumes.insert(id.clone(), rec.clone());
        tracing::info!(volume = %id, size = %rec.size, "volume extended");
        Ok(rec)
    }

    /// One volume.
    pub fn get_volume(&self, id: &VolumeId) -> Result<VolumeRecord, AgentError> {
        self.volume(id)
    }

    /// Volumes, optionally of one pool, ordered by id.
    pub fn list_volumes(&self, pool: Option<&str>) -> Result<Vec<VolumeRecord>, AgentError> {
        if let Some(p) = pool {
            self.pool(p)?;
        }
        let mut v: Vec<_> = read(&self.index)
            .volumes
            .values()
            .filter(|v| pool.is_none_or(|p| v.pool == p))
            .cloned()
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(v)
    }

    /// Number of snapshots of a volume.
    pub fn snapshots_of(&self, id: &VolumeId) -> u32 {
        self.snapshot_count(id) as u32
    }

    /// Replaces a volume's type and/or metadata (retype in place).
    pub async fn update_volume(
        &self,
        id: &VolumeId,
        volume_type: Option<&str>,
        metadata: Option<&BTreeMap<String, String>>,
    ) -> Result<VolumeRecord, AgentError> {
        let _g = self.lock(id.as_str())?;
        let vol = self.volume(id)?;
        let rec = self
            .pool(&vol.pool)?
            .backend
            .update(id, volume_type, metadata)
            .await?;
        write(&self.index).volumes.insert(id.clone(), rec.clone());
        Ok(rec)
    }

    /// Snapshots a volume; a retry with the same source returns the existing snapshot.
    pub async fn create_snapshot(
        &self,
        id: SnapshotId,
        source: &VolumeId,
        metadata: BTreeMap<String, String>,
    ) -> Result<SnapshotRecord, AgentError> {
        let _g = self.lock(&format!("snapshot:{id}"))?;
        if let Some(existing) = read(&self.index).snapshots.get(&id).cloned() {
            if &existing.source_volume == source {
                return Ok(existing);
            }
            return Err(AgentError::AlreadyExists {
                what: format!("snapshot {id}"),
                reason: format!(
                    "it is a snapshot of {}, not {source}",
                    existing.source_volume
                ),
            });
        }
        let _vg = self.lock(source.as_str())?;
        let vol = self.volume(source)?;
        self.snapshot_held(id, &vol, metadata).await
    }

    /// Snapshots `vol`, whose guard the caller holds, as `id` (whose guard it holds too).
    async fn snapshot_held(
        &self,
        id: SnapshotId,
        vol: &VolumeRecord,
        metadata: BTreeMap<String, String>,
    ) -> Result<SnapshotRecord, AgentError> {
        let new = NewSnapshot {
            id,
            source_volume: vol.id.clone(),
            metadata,
        };
        let rec = self.pool(&vol.pool)?.backend.snapshot(&new).await?;
        write(&self.index)
            .snapshots
            .insert(rec.id.clone(), rec.clone());
        tracing::info!(snapshot = %rec.id, volume = %vol.id, "snapshot created");
        Ok(rec)
    }

    /// Deletes a snapshot; an absent one is already deleted: Ok.
    pub async fn delete_snapshot(&self, id: &SnapshotId) -> Result<(), AgentError> {
        let _g = self.lock(&format!("snapshot:{id}"))?;
        let Some(snap) = read(&self.index).snapshots.get(id).cloned() else {
            return Ok(());
        };
        match self.pool(&snap.pool)?.backend.delete_snapshot(id).await {
            Ok(()) | Err(AgentError::SnapshotNotFound(_)) => {}
            Err(e) => return Err(e),
        }
        write(&self.index).snapshots.remove(id);
        tracing::info!(snapshot = %id, "snapshot deleted");
        Ok(())
    }

    /// One snapshot.
    pub fn get_snapshot(&self, id: &SnapshotId) -> Result<SnapshotRecord, AgentError> {
        read(&self.index)
            .snapshots
            .get(id)
            .cloned()
            .ok_or_else(|| AgentError::SnapshotNotFound(id.clone()))
    }

    /// Snapshots, optionally of one volume, ordered by id (change-tracking markers are not
    /// listed).
    pub fn list_snapshots(&self, source: Option<&VolumeId>) -> Vec<SnapshotRecord> {
        let mut v: Vec<_> = read(&self.index)
            .snapshots
            .values()
            .filter(|s| source.is_none_or(|id| &s.source_volume == id))
            .filter(|s| s.marker_of().is_none())
            .cloned()
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Exports a volume to an initiator (adds it to the target's ACL). Idempotent.
    pub async fn export_volume(
        &self,
        id: &VolumeId,
        initiator: &Iqn,
    ) -> Result<ExportAnswer, AgentError> {
        let _g = self.lock(id.as_str())?;
        let vol = self.volume(id)?;
        let pool = self.pool(&vol.pool)?;
        let mut wanted: BTreeSet<String> = vol.exported_to.iter().cloned().collect();
        wanted.insert(initiator.to_string());
        let wanted: Vec<String> = wanted.into_iter().collect();
        // Durable first: if the target cannot be made, the record is restored; if the agent
        // dies in between, reconciliation makes the target from the record.
        if wanted != vol.exported_to {
            pool.backend.set_exports(id, &wanted).await?;
        }
        let iqns: Vec<Iqn> = wanted.iter().filter_map(|i| Iqn::parse(i).ok()).collect();
        let info = match self
            .exports
            .export(id, &pool.backend.volume_path(id), &iqns)
            .await
        {
            Ok(i) => i,
            Err(e) => {
                if wanted != vol.exported_to {
                    if let Err(undo) = pool.backend.set_exports(id, &vol.exported_to).await {
                        tracing::error!(volume = %id, error = %undo, "cannot restore the export record");
                    }
                }
                return Err(e);
            }
        };
        let mut rec = vol;
        rec.exported_to = wanted;
        write(&self.index).volumes.insert(id.clone(), rec);
        Ok(ExportAnswer {
            target_iqn: info.target_iqn,
            portals: pool.portals.clone(),
            lun: info.lun,
            chap: info.chap,
        })
    }

    /// Removes an initiator from a volume's export (all initiators when `None`); the target
    /// goes when none is left. Not exported, or no such volume: Ok.
    pub async fn unexport_volume(
        &self,
        id: &VolumeId,
        initiator: Option<&Iqn>,
    ) -> Result<(), AgentError> {
        let _g = self.lock(id.as_str())?;
        let Some(vol) = read(&self.index).volumes.get(id).cloned() else {
            // No volume: still make sure no target of ours is left for that id.
            return self.exports.unexport(id).await;
        };
        let pool = self.pool(&vol.pool)?;
        let remaining: Vec<String> = match initiator {
            Some(i) => vol
                .exported_to
                .iter()
                .filter(|x| x.as_str() != i.as_str())
                .cloned()
                .collect(),
            None => Vec::new(),
        };
        if remaining.is_empty() {
            self.exports.unexport(id).await?;
        } else {
            let iqns: Vec<Iqn> = remaining
                .iter()
                .filter_map(|i| Iqn::parse(i).ok())
                .collect();
            self.exports
                .export(id, &pool.backend.volume_path(id), &iqns)
                .await?;
        }
        if remaining != vol.exported_to {
            pool.backend.set_exports(id, &remaining).await?;
        }
        let mut rec = vol;
        rec.exported_to = remaining;
        write(&self.index).volumes.insert(id.clone(), rec);
        Ok(())
    }

    /// The file or device to read for a data stream, and its size.
    pub fn data_path(&self, src: &DataSource) -> Result<(PathBuf, Bytes), AgentError> {
        match src {
            DataSource::Volume(id) => {
                let v = self.volume(id)?;
                Ok((self.pool(&v.pool)?.backend.volume_path(id), v.size))
            }
            DataSource::Snapshot(id) => {
                let s = self.get_snapshot(id)?;
                Ok((self.pool(&s.pool)?.backend.snapshot_path(id), s.size))
            }
        }
    }

    /// Claims a volume for a data write and returns where to write, its size and whether
    /// holes may be skipped. The guard must be held until the write finishes.
    pub fn begin_write(&self, id: &VolumeId) -> Result<(Guard, PathBuf, Bytes, bool), AgentError> {
        let g = self.lock(id.as_str())?;
        let v = self.volume(id)?;
        if !v.exported_to.is_empty() {
            return Err(AgentError::Exported {
                id: id.clone(),
                initiators: v.exported_to,
            });
        }
        let pool = self.pool(&v.pool)?;
        Ok((
            g,
            pool.backend.volume_path(id),
            v.size,
            pool.backend.fresh_reads_zero(),
        ))
    }
}

/// A retried create: the same parameters return the volume, others are ALREADY_EXISTS.
fn same_volume(
    existing: VolumeRecord,
    req: &CreateVolume,
    size: Bytes,
) -> Result<VolumeRecord, AgentError> {
    let differs = |reason: String| AgentError::AlreadyExists {
        what: format!("volume {}", req.id),
        reason,
    };
    if existing.pool != req.pool {
        return Err(differs(format!("it is on pool {}", existing.pool)));
    }
    if existing.size != size {
        return Err(differs(format!("its size is {}", existing.size)));
    }
    if existing.source != req.source {
        return Err(differs("its content source differs".into()));
    }
    if existing.volume_type != req.volume_type {
        return Err(differs(format!("its type is {:?}", existing.volume_type)));
    }
    Ok(existing)
}
