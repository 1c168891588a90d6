//! Backups on the agent: Cinder's backup manager over [`crate::backup`].
//!
//! The repositories hold every complete backup (its `metadata`); this agent keeps in memory
//! only what is not there yet: running backups (with their progress) and failed ones (with
//! the reason, until deleted or the agent restarts; their containers, if anything was left,
//! are listed as `error` too). Volumes being read or written show `backing-up` or
//! `restoring`, and a restore marks its target durably in the volume's metadata first, so a
//! target whose restore failed or was interrupted shows `error`, never `available`.
//!
//! Concurrency: `backup:<id>` guards a backup against a second create or a delete; an
//! available volume is backed up while holding its guard (nothing can write it), an exported
//! one (with `force`) through a temporary snapshot, so its initiators keep writing; a
//! restore holds its target's guard. A backup read by a running restore or incremental
//! backup is pinned: deleting it is refused (`ABORTED`) meanwhile.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::watch;

use super::{lock, read, write, AgentService};
use crate::agent::backend::{SnapshotRecord, VolumeRecord, MARKER_KEY};
use crate::agent::guard::Guard;
use crate::agent::tracking;
use crate::agent::{AgentError, BackupId, SnapshotId, VolumeId};
use crate::backup::engine::{self, Parent, Progress, Settings, Source, Target};
use crate::backup::format::{
    self, BackupRecord, BackupStats, Compression, Metadata, METADATA, RECORD_FORMAT,
};
use crate::backup::repo::{self, Repository};
use crate::backup::BackupError;
use crate::config::AgentConfig;
use crate::metrics::{Counter, Gauge, HistogramVec};

/// Volume metadata key marking a restore target: `restoring` while a restore writes it,
/// `error` when one failed. Removed when a restore succeeds.
pub const STATUS_KEY: &str = "cinderblock.status";
/// Why a restore target is in error.
pub const STATUS_REASON_KEY: &str = "cinderblock.status-reason";
/// Snapshot metadata key naming the backup a temporary snapshot was taken for.
pub const TEMP_SNAPSHOT_KEY: &str = "cinderblock.backup";
/// Volume metadata keys a restore does not copy from the backup: the controller's own
/// record of the target (`csi.*`) and the agent's status keys.
const NOT_RESTORED_PREFIXES: [&str; 2] = ["csi.", "cinderblock."];

/// A backup's state (Cinder's backup statuses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackupStatus {
    /// Being made.
    Creating,
    /// Complete: its metadata is in the repository.
    Available,
    /// Failed, or left unfinished (no metadata).
    Error,
    /// Complete, and being restored.
    Restoring,
}

/// A backup as the agent reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct BackupView {
    /// Id.
    pub id: BackupId,
    /// Repository holding it.
    pub repository: String,
    /// State.
    pub status: BackupStatus,
    /// Why it is in error (empty otherwise).
    pub fail_reason: String,
    /// Source volume.
    pub volume_id: String,
    /// Source volume's size (0 when unknown).
    pub volume_size: u64,
    /// Source volume's type.
    pub volume_type: String,
    /// The backup an incremental one builds on.
    pub parent_id: Option<String>,
    /// Backups whose parent this one is.
    pub dependents: Vec<String>,
    /// Started (Unix seconds; 0 when unknown).
    pub created_at: u64,
    /// Completed (Unix seconds; 0 while not complete).
    pub completed_at: u64,
    /// Chunk size.
    pub chunk_size: u64,
    /// Compression of its objects.
    pub compression: Option<Compression>,
    /// Stored and reused figures (of a complete backup).
    pub stats: BackupStats,
    /// Bytes of the volume covered so far (= volume size once complete).
    pub bytes_done: u64,
    /// Bytes to cover.
    pub bytes_total: u64,
}

impl BackupView {
    fn of(meta: &Metadata, repository: &str, id: BackupId) -> Self {
        BackupView {
            id,
            repository: repository.to_owned(),
            status: BackupStatus::Available,
            fail_reason: String::new(),
            volume_id: meta.volume_id.clone(),
            volume_size: meta.volume_size,
            volume_type: meta.volume_type.clone(),
            parent_id: meta.parent_id.clone(),
            dependents: Vec::new(),
            created_at: meta.created_at,
            completed_at: meta.completed_at,
            chunk_size: meta.chunk_size,
            compression: Some(meta.compression),
            stats: meta.stats.clone(),
            bytes_done: meta.volume_size,
            bytes_total: meta.volume_size,
        }
    }

    fn broken(id: BackupId, repository: &str, reason: String) -> Self {
        BackupView {
            id,
            repository: repository.to_owned(),
            status: BackupStatus::Error,
            fail_reason: reason,
            volume_id: String::new(),
            volume_size: 0,
            volume_type: String::new(),
            parent_id: None,
            dependents: Vec::new(),
            created_at: 0,
            completed_at: 0,
            chunk_size: 0,
            compression: None,
            stats: BackupStats::default(),
            bytes_done: 0,
            bytes_total: 0,
        }
    }
}

/// The end of a running operation: the backup, or what failed.
pub type Outcome = Option<Result<BackupView, Arc<AgentError>>>;

/// A running backup or restore: its progress, and its outcome once there is one.
#[derive(Debug, Clone)]
pub struct Running {
    /// The backup.
    pub id: BackupId,
    /// Bytes covered so far.
    pub progress: Arc<Progress>,
    /// `None` until the operation ends.
    pub outcome: watch::Receiver<Outcome>,
}

/// A request to back up a volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateBackup {
    /// Id chosen by the caller.
    pub id: BackupId,
    /// The volume.
    pub volume: VolumeId,
    /// Repository name (default: the agent's default).
    pub repository: Option<String>,
    /// Only what changed since the volume's latest backup in the repository.
    pub incremental: bool,
    /// Back up an exported (in-use) volume through a temporary snapshot.
    pub force: bool,
}

#[derive(Debug)]
struct Job {
    volume: VolumeId,
    repository: String,
    parent: Option<String>,
    created_at: u64,
    progress: Arc<Progress>,
    outcome: watch::Receiver<Outcome>,
    /// `Some(reason)` once failed.
    failed: Option<String>,
}

/// What a volume is busy with.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Activity {
    BackingUp(BackupId),
    Restoring(BackupId),
}

/// What a volume's status shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VolumeState {
    /// Not exported.
    Available,
    /// Exported.
    InUse,
    /// A backup reads it.
    BackingUp,
    /// A restore writes it.
    Restoring,
    /// A restore into it failed or was interrupted.
    Error,
}

/// The agent's backup state.
#[derive(Debug)]
pub(super) struct Backups {
    repos: BTreeMap<String, Arc<dyn Repository>>,
    default_repo: Option<String>,
    settings: Settings,
    // Keep change-tracking markers where the pool can (`[backup] change_tracking`).
    change_tracking: bool,
    // Running and failed backups not in a repository (yet), by id. Locked for a few map
    // operations, never across `.await`.
    jobs: Mutex<HashMap<BackupId, Job>>,
    // Volumes a backup reads or a restore writes. Same locking.
    activity: Mutex<HashMap<VolumeId, Activity>>,
    // Backups read by running operations, with how many restores read each (the rest are
    // incremental backups on top). Same locking; shared with the pins held by tasks.
    pins: Arc<Mutex<HashMap<BackupId, (usize, usize)>>>,
    // What backups and restores moved, for the metrics endpoint.
    transfers: Transfers,
}

/// Upper bounds of the backup and restore duration buckets, in seconds.
const TRANSFER_BUCKETS: &[f64] = &[1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0];

/// Backups and restores finished since the agent started: how many, how long, how many bytes.
#[derive(Debug)]
pub struct Transfers {
    /// Duration by `op` (backup, restore) and `result` (ok, failed).
    pub seconds: HistogramVec,
    /// Bytes of volumes read by finished backups: all but what change tracking showed
    /// unchanged and what the pool showed unallocated.
    pub backup_read_bytes: Counter,
    /// Bytes of volumes finished backups took from their parent unread (change tracking).
    pub backup_unread_bytes: Counter,
    /// Bytes of volumes finished backups recorded as holes unread, because the pool showed
    /// them unallocated (a file's holes, a thin snapshot's unmapped blocks).
    pub backup_unallocated_bytes: Counter,
    /// Bytes those backups wrote to their repository (new chunks, compressed).
    pub backup_stored_bytes: Counter,
    /// Bytes of volumes written by finished restores.
    pub restore_written_bytes: Counter,
    /// Volume bytes per second of the last backup that succeeded.
    pub last_backup_rate: Gauge,
    /// Volume bytes per second of the last restore that succeeded.
    pub last_restore_rate: Gauge,
}

impl Default for Transfers {
    fn default() -> Self {
        Transfers {
            seconds: HistogramVec::new(&["op", "result"], TRANSFER_BUCKETS, 4),
            backup_read_bytes: Counter::default(),
            backup_unread_bytes: Counter::default(),
            backup_unallocated_bytes: Counter::default(),
            backup_stored_bytes: Counter::default(),
            restore_written_bytes: Counter::default(),
            last_backup_rate: Gauge::default(),
            last_restore_rate: Gauge::default(),
        }
    }
}

/// The two kinds of transfer between a volume and a repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transfer {
    Backup,
    Restore,
}

impl Transfer {
    /// The `op` label of the duration histogram.
    fn label(self) -> &'static str {
        match self {
            Transfer::Backup => "backup",
            Transfer::Restore => "restore",
        }
    }
}

impl Transfers {
    /// Records one finished backup or restore of `bytes` volume bytes that began at `started`.
    fn finished(&self, op: Transfer, ok: bool, started: Instant, bytes: u64) {
        let secs = started.elapsed().as_secs_f64();
        let result = if ok { "ok" } else { "failed" };
        self.seconds.observe(&[op.label(), result], secs);
        if ok && secs > 0.0 {
            let rate = (bytes as f64 / secs) as u64;
            let last = match op {
                Transfer::Backup => &self.last_backup_rate,
                Transfer::Restore => &self.last_restore_rate,
            };
            last.set(rate);
        }
    }
}

impl Backups {
    pub(super) fn new(cfg: &AgentConfig) -> Result<Self, AgentError> {
        let mut repos = BTreeMap::new();
        for r in &cfg.backup_repositories {
            let opened = repo::open(r).map_err(BackupError::repo(&r.name))?;
            repos.insert(r.name.clone(), opened);
        }
        let default_repo = cfg
            .backup
            .default_repository
            .clone()
            .or_else(|| cfg.backup_repositories.first().map(|r| r.name.clone()));
        Ok(Backups {
            repos,
            default_repo,
            settings: Settings::from_config(&cfg.backup),
            change_tracking: cfg.backup.change_tracking,
            jobs: Mutex::new(HashMap::new()),
            activity: Mutex::new(HashMap::new()),
            pins: Arc::new(Mutex::new(HashMap::new())),
            transfers: Transfers::default(),
        })
    }

    /// Replaces a repository (tests: a repository that fails like a full disk).
    pub(super) fn set_repository(&mut self, r: Arc<dyn Repository>) {
        self.repos.insert(r.name().to_owned(), r);
    }

    fn repo(&self, name: Option<&str>) -> Result<Arc<dyn Repository>, AgentError> {
        let name = match name.filter(|n| !n.is_empty()) {
            Some(n) => n.to_owned(),
            None => self.default_repo.clone().ok_or(BackupError::NoRepository)?,
        };
        self.repos
            .get(&name)
            .cloned()
            .ok_or_else(|| BackupError::RepositoryNotFound(name).into())
    }

    fn pin(&self, ids: &[BackupId], restore: bool) -> Pin {
        let mut pins = lock(&self.pins);
        for id in ids {
            let e = pins.entry(id.clone()).or_default();
            if restore {
                e.0 += 1;
            } else {
                e.1 += 1;
            }
        }
        Pin {
            pins: self.pins.clone(),
            ids: ids.to_vec(),
            restore,
        }
    }

    fn restoring(&self, id: &BackupId) -> bool {
        lock(&self.pins).get(id).is_some_and(|p| p.0 > 0)
    }

    fn pinned(&self, id: &BackupId) -> bool {
        lock(&self.pins).contains_key(id)
    }

    fn job_view(&self, id: &BackupId, j: &Job) -> BackupView {
        let mut v = BackupView::broken(
            id.clone(),
            &j.repository,
            j.failed.clone().unwrap_or_default(),
        );
        v.status = if j.failed.is_some() {
            BackupStatus::Error
        } else {
            BackupStatus::Creating
        };
        v.volume_id = j.volume.to_string();
        v.parent_id = j.parent.clone();
        v.created_at = j.created_at;
        v.bytes_done = j.progress.done();
        v.bytes_total = j.progress.total();
        v.volume_size = j.progress.total();
        v.stats.stored_bytes = j.progress.stored();
        v
    }
}

/// Pins on backups, released on drop.
#[derive(Debug)]
struct Pin {
    pins: Arc<Mutex<HashMap<BackupId, (usize, usize)>>>,
    ids: Vec<BackupId>,
    restore: bool,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut pins = lock(&self.pins);
        for id in &self.ids {
            if let Some(e) = pins.get_mut(id) {
                if self.restore {
                    e.0 = e.0.saturating_sub(1);
                } else {
                    e.1 = e.1.saturating_sub(1);
                }
                if *e == (0, 0) {
                    pins.remove(id);
                }
            }
        }
    }
}

/// The id of the temporary snapshot of backup `id` (ids are at most 64 characters).
fn temp_snapshot_id(id: &BackupId) -> Result<SnapshotId, AgentError> {
    let name = format!("backup-{id}");
    if name.len() <= 64 {
        SnapshotId::parse(&name)
    } else {
        let h = hex::encode(format::sha256(id.as_str().as_bytes()));
        SnapshotId::parse(&format!("backup-{}", &h[..24]))
    }
}

fn short(reason: &str) -> String {
    // Metadata ends up in LVM tags (at most 1024 characters each, encoded).
    reason.chars().take(300).collect()
}

impl AgentService {
    /// What a volume's status shows: its activity first, then a failed restore, then its
    /// exports.
    pub fn volume_state(&self, v: &VolumeRecord) -> VolumeState {
        match lock(&self.backups.activity).get(&v.id) {
            Some(Activity::BackingUp(_)) => return VolumeState::BackingUp,
            Some(Activity::Restoring(_)) => return VolumeState::Restoring,
            None => {}
        }
        // `restoring` with no restore running: the agent stopped in the middle.
        if v.metadata.contains_key(STATUS_KEY) {
            return VolumeState::Error;
        }
        if v.exported_to.is_empty() {
            VolumeState::Available
        } else {
            VolumeState::InUse
        }
    }

    /// The refusal to delete a volume a backup or restore is using, if one is.
    pub(super) fn backup_activity_blocks(&self, id: &VolumeId) -> Result<(), AgentError> {
        match lock(&self.backups.activity).get(id) {
            None => Ok(()),
            Some(Activity::BackingUp(b)) => Err(AgentError::Precondition(format!(
                "volume {id} is backing-up (backup {b}); delete it when the backup has ended"
            ))),
            Some(Activity::Restoring(b)) => Err(AgentError::Precondition(format!(
                "volume {id} is restoring (backup {b}); delete it when the restore has ended"
            ))),
        }
    }

    /// Deletes temporary backup snapshots no running backup uses (left by an agent that
    /// stopped in the middle of a backup). Failures are logged; the next start tries again.
    pub(super) async fn remove_temporary_snapshots(&self) {
        let running: Vec<BackupId> = lock(&self.backups.jobs).keys().cloned().collect();
        for s in self.list_snapshots(None) {
            let Some(owner) = s.metadata.get(TEMP_SNAPSHOT_KEY) else {
                continue;
            };
            if running.iter().any(|b| b.as_str() == owner) {
                continue;
            }
            match self.delete_snapshot(&s.id).await {
                Ok(()) => {
                    tracing::warn!(snapshot = %s.id, backup = %owner, "removed the temporary snapshot of an interrupted backup")
                }
                Err(e) => {
                    tracing::warn!(snapshot = %s.id, error = %e, "cannot remove a temporary backup snapshot")
                }
            }
        }
    }

    /// The change-tracking markers, of one volume (normally one) or of all.
    pub(super) fn markers(&self, volume: Option<&VolumeId>) -> Vec<SnapshotRecord> {
        read(&self.index)
            .snapshots
            .values()
            .filter(|s| s.marker_of().is_some() && volume.is_none_or(|v| &s.source_volume == v))
            .cloned()
            .collect()
    }

    /// The byte ranges of `volume` (`size` bytes) that its pool's change tracking shows
    /// unchanged between the marker of backup `parent` and snapshot `now`. Empty (read
    /// everything) when the volume has no marker of that backup or the pool cannot tell.
    async fn unchanged_since(
        &self,
        volume: &VolumeId,
        parent: &str,
        now: &SnapshotId,
        size: u64,
    ) -> Vec<(u64, u64)> {
        let marker = self
            .markers(Some(volume))
            .into_iter()
            .find(|m| m.marker_of() == Some(parent));
        let Some(marker) = marker else {
            tracing::info!(volume = %volume, parent, "no change-tracking marker of the parent backup: every chunk is read");
            return Vec::new();
        };
        let changed = match self.pool(&marker.pool) {
            Ok(p) => p.backend.changed_ranges(&marker.id, now).await,
            Err(e) => Err(e),
        };
        match changed {
            Ok(Some(changed)) => {
                let moved: u64 = changed.iter().map(|(s, t)| t - s).sum();
                tracing::info!(volume = %volume, parent, changed_bytes = moved, ranges = changed.len(), "change tracking: only changed ranges are read");
                tracking::complement(&changed, size)
            }
            Ok(None) => Vec::new(),
            Err(e) => {
                tracing::warn!(volume = %volume, marker = %marker.id, error = %e, "change tracking failed: every chunk is read");
                Vec::new()
            }
        }
    }

    /// Turns the temporary snapshot of backup `id`, just completed, into the volume's marker
    /// and deletes the volume's older markers (if any are left: `run_backup` deletes them
    /// while the data is read). False (the snapshot is then deleted as any temporary one)
    /// when it cannot be marked.
    async fn make_marker(&self, volume: &VolumeId, snap: &SnapshotId, id: &BackupId) -> bool {
        let md = BTreeMap::from([(MARKER_KEY.to_owned(), id.to_string())]);
        let marked = match self.get_snapshot(snap) {
            Ok(s) => match self.pool(&s.pool) {
                Ok(p) => p.backend.set_snapshot_metadata(snap, &md).await,
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        let rec = match marked {
            Ok(rec) => rec,
            Err(e) => {
                tracing::warn!(backup = %id, snapshot = %snap, error = %e, "cannot keep the temporary snapshot as a change-tracking marker");
                return false;
            }
        };
        write(&self.index).snapshots.insert(rec.id.clone(), rec);
        self.delete_older_markers(volume, snap).await;
        true
    }

    /// Deletes the markers of `volume` other than `keep`.
    async fn delete_older_markers(&self, volume: &VolumeId, keep: &SnapshotId) {
        for old in self.markers(Some(volume)) {
            if &old.id != keep {
                self.delete_marker(&old).await;
            }
        }
    }

    /// Deletes a change-tracking marker; a failure is logged (the next backup of the volume,
    /// or its deletion, tries again).
    pub(super) async fn delete_marker(&self, m: &SnapshotRecord) {
        if let Err(e) = self.delete_snapshot(&m.id).await {
            tracing::warn!(snapshot = %m.id, error = %e, "cannot delete a change-tracking marker");
        }
    }

    /// Names of the configured repositories, and the default one.
    pub fn backup_repositories(&self) -> (Vec<(String, String)>, Option<String>) {
        (
            self.backups
                .repos
                .values()
                .map(|r| (r.name().to_owned(), r.location()))
                .collect(),
            self.backups.default_repo.clone(),
        )
    }

    /// Replaces a configured repository by another of the same name (tests: fault
    /// injection behind the repository seam). Only before the service is shared.
    pub fn replace_backup_repository(&mut self, r: Arc<dyn Repository>) {
        self.backups.set_repository(r);
    }

    /// Starts backup `req.id` of a volume and returns at once with its progress. A retry of
    /// a running or complete backup of the same volume returns it; another volume under the
    /// same id is `ALREADY_EXISTS`.
    pub async fn create_backup(self: &Arc<Self>, req: CreateBackup) -> Result<Running, AgentError> {
        let repo = self.backups.repo(req.repository.as_deref())?;
        let id = req.id.clone();
        let differs = |volume: &str| -> AgentError {
            BackupError::AlreadyExists {
                id: id.clone(),
                reason: format!("it is a backup of volume {volume}"),
            }
            .into()
        };
        if let Some(j) = lock(&self.backups.jobs).get(&id) {
            if j.volume != req.volume {
                return Err(differs(j.volume.as_str()));
            }
            if j.failed.is_none() {
                return Ok(Running {
                    id: id.clone(),
                    progress: j.progress.clone(),
                    outcome: j.outcome.clone(),
                });
            }
        }
        let guard = self.lock(&format!("backup:{id}"))?;
        if let Some(meta) = engine::load_metadata(repo.as_ref(), &id).await? {
            if meta.volume_id != req.volume.as_str() {
                return Err(differs(&meta.volume_id));
            }
            let view = self.view_in(repo.as_ref(), &meta, &id).await?;
            let (_tx, outcome) = watch::channel(Some(Ok(view)));
            let progress = Arc::new(Progress::default());
            return Ok(Running {
                id,
                progress,
                outcome,
            });
        }
        // A retry after a failure starts again from an empty container.
        self.remove_container(repo.as_ref(), &id).await?;
        lock(&self.backups.jobs).remove(&id);

        let vol = self.volume(&req.volume)?;
        let exported = !vol.exported_to.is_empty();
        if exported && !req.force {
            return Err(BackupError::InUse(vol.id.to_string()).into());
        }
        let parent = if req.incremental {
            Some(self.latest_backup(repo.as_ref(), &vol.id).await?)
        } else {
            None
        };
        let parent_ids: Vec<BackupId> = match &parent {
            Some(p) => vec![p.meta.id()?],
            None => Vec::new(),
        };
        // Pinned from now on: the parent cannot be deleted under the backup.
        let pin = self.backups.pin(&parent_ids, false);

        // What to read: the volume itself under its guard, or a temporary snapshot of it.
        // Where the pool tracks changes, the snapshot is taken in both cases (it costs no
        // copy there) and outlives a successful backup as the volume's marker. An available
        // volume is still read itself: its pages may be in the cache, the new snapshot's
        // are not, and nothing writes it while its guard is held.
        let backend = self.pool(&vol.pool)?.backend.clone();
        let tracking = self.backups.change_tracking && backend.tracks_changes();
        let snap = temp_snapshot_id(&id)?;
        // A leftover of an interrupted attempt holds older data: never reuse it.
        if self.get_snapshot(&snap).is_ok() {
            self.delete_snapshot(&snap).await?;
        }
        let md = BTreeMap::from([(TEMP_SNAPSHOT_KEY.to_owned(), id.to_string())]);
        let (source_path, size, vol_guard, temp) = if exported {
            let s = self.create_snapshot(snap.clone(), &vol.id, md).await?;
            let (path, _) = self.data_path(&super::DataSource::Snapshot(snap.clone()))?;
            (path, s.size, None, Some(snap))
        } else {
            let g = self.lock(vol.id.as_str())?;
            let vol = self.volume(&vol.id)?;
            let temp = if tracking {
                self.snapshot_held(snap.clone(), &vol, md).await?;
                Some(snap)
            } else {
                None
            };
            (backend.volume_path(&vol.id), vol.size, Some(g), temp)
        };
        let unchanged = match (&parent, &temp) {
            (Some(p), Some(now)) if tracking => {
                self.unchanged_since(&vol.id, &p.meta.backup_id, now, size.0)
                    .await
            }
            _ => Vec::new(),
        };
        // Where the pool keeps a map of the snapshot's data (a thin LV), the rest is not read.
        let mapped = match &temp {
            Some(now) if tracking => match backend.mapped_ranges(now).await {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(volume = %vol.id, snapshot = %now, error = %e, "cannot read the snapshot's map of data: every chunk is read");
                    None
                }
            },
            _ => None,
        };
        let source = Source {
            path: source_path,
            size: size.0,
            volume_id: vol.id.to_string(),
            volume_type: vol.volume_type.clone(),
            volume_metadata: vol.metadata.clone(),
            unchanged,
            mapped,
        };
        lock(&self.backups.activity).insert(vol.id.clone(), Activity::BackingUp(id.clone()));
        let progress = Arc::new(Progress::new(size.0));
        let (tx, outcome) = watch::channel(None);
        lock(&self.backups.jobs).insert(
            id.clone(),
            Job {
                volume: vol.id.clone(),
                repository: repo.name().to_owned(),
                parent: parent.as_ref().map(|p| p.meta.backup_id.clone()),
                created_at: engine::now_secs(),
                progress: progress.clone(),
                outcome: outcome.clone(),
                failed: None,
            },
        );
        tracing::info!(backup = %id, volume = %vol.id, repository = repo.name(), incremental = parent.is_some(), via_snapshot = temp.is_some(), "backup started");
        let me = self.clone();
        let running = Running {
            id: id.clone(),
            progress: progress.clone(),
            outcome,
        };
        tokio::spawn(async move {
            me.run_backup(BackupTask {
                id,
                repo,
                source,
                parent: parent.map(Arc::new),
                _pin: pin,
                progress,
                volume: vol.id,
                temp,
                keep_marker: tracking,
                _guards: (guard, vol_guard),
                tx,
            })
            .await;
        });
        Ok(running)
    }

    /// What backups and restores moved since the agent started.
    pub fn transfers(&self) -> &Transfers {
        &self.backups.transfers
    }

    async fn run_backup(&self, t: BackupTask) {
        let started = Instant::now();
        // The volume's older markers served their comparison (`unchanged_since`): they are
        // deleted while the data is read, not after it. A backup that fails leaves the
        // volume without a marker then, and its next incremental reads every chunk.
        let older_markers = async {
            if let (true, Some(snap)) = (t.keep_marker, &t.temp) {
                self.delete_older_markers(&t.volume, snap).await;
            }
        };
        let (result, ()) = tokio::join!(
            engine::backup(
                t.repo.clone(),
                &t.id,
                &t.source,
                t.parent.clone(),
                &self.backups.settings,
                &t.progress,
            ),
            older_markers
        );
        if let Some(snap) = &t.temp {
            let marked = match &result {
                Ok(_) if t.keep_marker => self.make_marker(&t.volume, snap, &t.id).await,
                _ => false,
            };
            if !marked {
                if let Err(e) = self.delete_snapshot(snap).await {
                    tracing::error!(backup = %t.id, snapshot = %snap, error = %e, "cannot delete the temporary snapshot");
                }
            }
        }
        lock(&self.backups.activity).remove(&t.volume);
        let tr = &self.backups.transfers;
        tr.finished(Transfer::Backup, result.is_ok(), started, t.progress.done());
        let outcome = match result {
            Ok(meta) => {
                let (unread, unallocated) = (t.progress.unread(), t.progress.unallocated());
                tr.backup_read_bytes.add(
                    meta.volume_size
                        .saturating_sub(unread)
                        .saturating_sub(unallocated),
                );
                tr.backup_unread_bytes.add(unread);
                tr.backup_unallocated_bytes.add(unallocated);
                tr.backup_stored_bytes.add(meta.stats.stored_bytes);
                tracing::info!(backup = %t.id, stored_chunks = meta.stats.stored_chunks, reused_chunks = meta.stats.reused_chunks, stored_bytes = meta.stats.stored_bytes, unread_bytes = unread, unallocated_bytes = unallocated, "backup complete");
                lock(&self.backups.jobs).remove(&t.id);
                let mut v = BackupView::of(&meta, t.repo.name(), t.id.clone());
                v.status = BackupStatus::Available;
                Ok(v)
            }
            Err(e) => {
                let reason = error_chain(&e);
                tracing::error!(backup = %t.id, error = %reason, "backup failed");
                if let Err(c) = self.remove_container(t.repo.as_ref(), &t.id).await {
                    tracing::warn!(backup = %t.id, error = %error_chain(&c), "cannot remove the failed backup's objects");
                }
                if let Some(j) = lock(&self.backups.jobs).get_mut(&t.id) {
                    j.failed = Some(reason);
                }
                Err(Arc::new(AgentError::Backup(e)))
            }
        };
        // Guards and pin go before the outcome is told: whoever waits for it may delete the
        // volume or the parent backup at once.
        drop((t._guards, t._pin));
        let _ = t.tx.send(Some(outcome));
    }

    /// The volume's latest complete backup in `repo`, with its block digests.
    async fn latest_backup(
        &self,
        repo: &dyn Repository,
        volume: &VolumeId,
    ) -> Result<Parent, AgentError> {
        let mine: HashMap<String, Metadata> = self
            .metadata_of(repo)
            .await?
            .into_iter()
            .filter_map(|(_, m)| m.ok())
            .filter(|m| m.volume_id == volume.as_str())
            .map(|m| (m.backup_id.clone(), m))
            .collect();
        // Times are whole seconds: backups made within one second tie, and then the one
        // further down its chain of parents is the later.
        let depth = |m: &Metadata| {
            let mut n = 0usize;
            let mut at = m;
            while let Some(p) = at.parent_id.as_ref().and_then(|p| mine.get(p)) {
                n += 1;
                at = p;
                if n > mine.len() {
                    break;
                }
            }
            n
        };
        let best = mine
            .values()
            .max_by_key(|m| (m.completed_at, m.created_at, depth(m), m.backup_id.clone()))
            .cloned();
        let meta = best.ok_or_else(|| BackupError::NoParent {
            volume: volume.to_string(),
            repository: repo.name().to_owned(),
        })?;
        Ok(engine::load_parent(repo, meta).await?)
    }

    /// Every container of a repository with its metadata: `Ok(None)` for a container without
    /// metadata, `Err(reason)` for unreadable metadata.
    async fn metadata_of(
        &self,
        repo: &dyn Repository,
    ) -> Result<Vec<(BackupId, Result<Metadata, String>)>, AgentError> {
        let names = repo
            .containers()
            .await
            .map_err(BackupError::repo(repo.name()))?;
        let mut out = Vec::new();
        for n in names {
            let Ok(id) = BackupId::parse(&n) else {
                continue;
            };
            match engine::load_metadata(repo, &id).await {
                Ok(Some(m)) => out.push((id, Ok(m))),
                Ok(None) => out.push((
                    id,
                    Err("the container has no metadata: the backup did not complete".into()),
                )),
                Err(e @ BackupError::Format { .. }) => out.push((id, Err(e.to_string()))),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(out)
    }

    /// Deletes every object of a container, the metadata first (its commit record).
    async fn remove_container(
        &self,
        repo: &dyn Repository,
        id: &BackupId,
    ) -> Result<(), BackupError> {
        let to_err = BackupError::repo(repo.name());
        let objects = match repo.list(id.as_str()).await {
            Ok(o) => o,
            Err(e) => return Err(to_err(e)),
        };
        if objects.is_empty() {
            return Ok(());
        }
        if let Err(e) = repo.delete(&format::key(id, METADATA)).await {
            return Err(BackupError::repo(repo.name())(e));
        }
        for o in objects.iter().filter(|o| o.as_str() != METADATA) {
            if let Err(e) = repo.delete(&format::key(id, o)).await {
                return Err(BackupError::repo(repo.name())(e));
            }
        }
        repo.remove_container(id.as_str())
            .await
            .map_err(BackupError::repo(repo.name()))
    }

    /// A complete backup's view, with its dependents.
    async fn view_in(
        &self,
        repo: &dyn Repository,
        meta: &Metadata,
        id: &BackupId,
    ) -> Result<BackupView, AgentError> {
        let mut v = BackupView::of(meta, repo.name(), id.clone());
        for (other, m) in self.metadata_of(repo).await? {
            if let Ok(m) = m {
                if m.parent_id.as_deref() == Some(id.as_str()) {
                    v.dependents.push(other.to_string());
                }
            }
        }
        if self.backups.restoring(id) {
            v.status = BackupStatus::Restoring;
        }
        Ok(v)
    }

    /// Backups of every repository (or one), optionally of one volume, oldest first.
    pub async fn list_backups(
        &self,
        repository: Option<&str>,
        volume: Option<&VolumeId>,
    ) -> Result<Vec<BackupView>, AgentError> {
        let repos: Vec<Arc<dyn Repository>> = match repository.filter(|r| !r.is_empty()) {
            Some(name) => vec![self.backups.repo(Some(name))?],
            None => self.backups.repos.values().cloned().collect(),
        };
        let mut out: Vec<BackupView> = Vec::new();
        for repo in &repos {
            let all = self.metadata_of(repo.as_ref()).await?;
            let mut dependents: HashMap<String, Vec<String>> = HashMap::new();
            for (id, m) in &all {
                if let Ok(Metadata {
                    parent_id: Some(p), ..
                }) = m
                {
                    dependents
                        .entry(p.clone())
                        .or_default()
                        .push(id.to_string());
                }
            }
            let jobs = lock(&self.backups.jobs);
            for (id, m) in all {
                if jobs.contains_key(&id) {
                    continue; // running or failed: reported from memory below
                }
                let mut v = match m {
                    Ok(m) => BackupView::of(&m, repo.name(), id.clone()),
                    Err(reason) => BackupView::broken(id.clone(), repo.name(), reason),
                };
                v.dependents = dependents.remove(id.as_str()).unwrap_or_default();
                if v.status == BackupStatus::Available && self.backups.restoring(&id) {
                    v.status = BackupStatus::Restoring;
                }
                out.push(v);
            }
            for (id, j) in jobs.iter().filter(|(_, j)| j.repository == repo.name()) {
                out.push(self.backups.job_view(id, j));
            }
        }
        out.retain(|v| volume.is_none_or(|vol| v.volume_id == vol.as_str()));
        out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(out)
    }

    /// One backup: a running or failed one from memory, else from the repositories.
    pub async fn get_backup(&self, id: &BackupId) -> Result<BackupView, AgentError> {
        if let Some(j) = lock(&self.backups.jobs).get(id) {
            return Ok(self.backups.job_view(id, j));
        }
        self.list_backups(None, None)
            .await?
            .into_iter()
            .find(|v| &v.id == id)
            .ok_or_else(|| BackupError::NotFound(id.clone()).into())
    }

    /// The repository whose container `id` is, if any.
    async fn find_container(
        &self,
        id: &BackupId,
    ) -> Result<Option<Arc<dyn Repository>>, AgentError> {
        for repo in self.backups.repos.values() {
            let objects = repo
                .list(id.as_str())
                .await
                .map_err(BackupError::repo(repo.name()))?;
            if !objects.is_empty() {
                return Ok(Some(repo.clone()));
            }
        }
        Ok(None)
    }

    /// The complete backup `id` and its repository.
    async fn available(
        &self,
        id: &BackupId,
    ) -> Result<(Arc<dyn Repository>, Metadata), AgentError> {
        if let Some(j) = lock(&self.backups.jobs).get(id) {
            let status = if j.failed.is_some() {
                "error"
            } else {
                "creating"
            };
            return Err(BackupError::NotAvailable {
                id: id.clone(),
                status: status.into(),
            }
            .into());
        }
        let repo = self
            .find_container(id)
            .await?
            .ok_or_else(|| BackupError::NotFound(id.clone()))?;
        let meta = engine::load_metadata(repo.as_ref(), id)
            .await?
            .ok_or_else(|| BackupError::NotAvailable {
                id: id.clone(),
                status: "error (unfinished)".into(),
            })?;
        Ok((repo, meta))
    }

    /// Deletes a backup (Cinder's rules: not while incremental backups depend on it). An
    /// absent backup is already deleted: Ok.
    pub async fn delete_backup(&self, id: &BackupId) -> Result<(), AgentError> {
        let _g = self.lock(&format!("backup:{id}"))?;
        if self.backups.pinned(id) {
            return Err(AgentError::Busy(format!(
                "backup {id} (a restore or an incremental backup is reading it)"
            )));
        }
        let failed_job = lock(&self.backups.jobs)
            .get(id)
            .map(|j| j.repository.clone());
        let repo = match self.find_container(id).await? {
            Some(r) => r,
            None => {
                lock(&self.backups.jobs).remove(id);
                return Ok(());
            }
        };
        if failed_job.is_none() {
            let dependents: Vec<BackupId> = self
                .metadata_of(repo.as_ref())
                .await?
                .into_iter()
                .filter(|(_, m)| {
                    m.as_ref()
                        .is_ok_and(|m| m.parent_id.as_deref() == Some(id.as_str()))
                })
                .map(|(d, _)| d)
                .collect();
            if !dependents.is_empty() {
                return Err(BackupError::HasDependents {
                    id: id.clone(),
                    dependents,
                }
                .into());
            }
        }
        self.remove_container(repo.as_ref(), id).await?;
        lock(&self.backups.jobs).remove(id);
        for m in self.markers(None) {
            if m.marker_of() == Some(id.as_str()) {
                self.delete_marker(&m).await;
            }
        }
        tracing::info!(backup = %id, repository = repo.name(), "backup deleted");
        Ok(())
    }

    /// Starts restoring a complete backup onto an existing volume of this agent (blank, not
    /// exported, at least as large) and returns at once with its progress. The volume is
    /// marked `restoring` durably first; it shows `error` if the restore fails.
    pub async fn restore_backup(
        self: &Arc<Self>,
        id: &BackupId,
        volume: &VolumeId,
    ) -> Result<Running, AgentError> {
        let (repo, meta) = self.available(id).await?;
        let chain = engine::check_chain(repo.as_ref(), &meta).await?;
        let (guard, path, size, _) = self.begin_write(volume)?;
        if size.0 < meta.volume_size {
            return Err(BackupError::TargetTooSmall {
                volume: volume.to_string(),
                size: size.0,
                id: id.clone(),
                needed: meta.volume_size,
            }
            .into());
        }
        // The backup shows `restoring`; its ancestors are only protected from deletion.
        let pin = (
            self.backups.pin(std::slice::from_ref(id), true),
            self.backups.pin(&chain, false),
        );
        self.set_status_keys(volume, Some(("restoring", "")))
            .await?;
        lock(&self.backups.activity).insert(volume.clone(), Activity::Restoring(id.clone()));
        let progress = Arc::new(Progress::new(meta.volume_size));
        let (tx, outcome) = watch::channel(None);
        let running = Running {
            id: id.clone(),
            progress: progress.clone(),
            outcome,
        };
        tracing::info!(backup = %id, volume = %volume, repository = repo.name(), "restore started");
        let me = self.clone();
        let target = Target {
            path,
            size: size.0,
            volume_id: volume.to_string(),
        };
        let volume = volume.clone();
        let id = id.clone();
        tokio::spawn(async move {
            let guard: Guard = guard;
            let started = Instant::now();
            let result = engine::restore(
                repo.clone(),
                &meta,
                &target,
                &me.backups.settings,
                &progress,
            )
            .await;
            drop(pin);
            let outcome = match result {
                Ok(()) => match me.finish_restore(&volume, &meta).await {
                    Ok(()) => {
                        tracing::info!(backup = %id, volume = %volume, "restore complete");
                        me.view_in(repo.as_ref(), &meta, &id).await
                    }
                    Err(e) => Err(e),
                },
                Err(e) => Err(AgentError::Backup(e)),
            };
            let outcome = match outcome {
                Ok(v) => Ok(v),
                Err(e) => {
                    let reason = error_chain(&e);
                    tracing::error!(backup = %id, volume = %volume, error = %reason, "restore failed: the volume is in error");
                    if let Err(m) = me.set_status_keys(&volume, Some(("error", &reason))).await {
                        tracing::error!(volume = %volume, error = %m, "cannot mark the volume in error");
                    }
                    Err(Arc::new(e))
                }
            };
            lock(&me.backups.activity).remove(&volume);
            let tr = &me.backups.transfers;
            tr.finished(
                Transfer::Restore,
                outcome.is_ok(),
                started,
                meta.volume_size,
            );
            if outcome.is_ok() {
                tr.restore_written_bytes.add(meta.volume_size);
            }
            drop(guard);
            let _ = tx.send(Some(outcome));
        });
        Ok(running)
    }

    /// After a good restore: the backup's volume metadata on the target, the status keys
    /// removed.
    async fn finish_restore(&self, volume: &VolumeId, meta: &Metadata) -> Result<(), AgentError> {
        let vol = self.volume(volume)?;
        let mut md: BTreeMap<String, String> = vol
            .metadata
            .into_iter()
            .filter(|(k, _)| k != STATUS_KEY && k != STATUS_REASON_KEY)
            .collect();
        for (k, v) in &meta.volume_metadata {
            if !NOT_RESTORED_PREFIXES.iter().any(|p| k.starts_with(p)) {
                md.insert(k.clone(), v.clone());
            }
        }
        self.replace_metadata_held(volume, md).await
    }

    /// Sets (`Some((status, reason))`) or clears the status keys of a volume whose guard the
    /// caller holds.
    async fn set_status_keys(
        &self,
        volume: &VolumeId,
        status: Option<(&str, &str)>,
    ) -> Result<(), AgentError> {
        let vol = self.volume(volume)?;
        let mut md = vol.metadata;
        md.remove(STATUS_REASON_KEY);
        match status {
            Some((s, reason)) => {
                md.insert(STATUS_KEY.into(), s.into());
                if !reason.is_empty() {
                    md.insert(STATUS_REASON_KEY.into(), short(reason));
                }
            }
            None => {
                md.remove(STATUS_KEY);
            }
        }
        self.replace_metadata_held(volume, md).await
    }

    /// Replaces a volume's metadata; the caller holds its guard.
    async fn replace_metadata_held(
        &self,
        volume: &VolumeId,
        md: BTreeMap<String, String>,
    ) -> Result<(), AgentError> {
        let vol = self.volume(volume)?;
        let rec = self
            .pool(&vol.pool)?
            .backend
            .update(volume, None, Some(&md))
            .await?;
        write(&self.index).volumes.insert(volume.clone(), rec);
        Ok(())
    }

    /// Cinder's `backup-export`: the record of a complete backup, to import elsewhere.
    pub async fn export_backup_record(
        &self,
        id: &BackupId,
    ) -> Result<(String, String), AgentError> {
        let (repo, meta) = self.available(id).await?;
        let record = BackupRecord {
            format: RECORD_FORMAT.into(),
            version: 1,
            repository: repo.name().to_owned(),
            metadata: meta,
        };
        Ok((record.encode(), repo.name().to_owned()))
    }

    /// Cinder's `backup-import`: registers an exported record in a repository that holds
    /// the backup's objects (the record's repository when `repository` is empty). The same
    /// record again is Ok; another backup under the same id is `ALREADY_EXISTS`.
    pub async fn import_backup_record(
        &self,
        record: &str,
        repository: Option<&str>,
    ) -> Result<BackupView, AgentError> {
        let rec = BackupRecord::decode(record)?;
        let name = repository
            .filter(|r| !r.is_empty())
            .unwrap_or(&rec.repository);
        let repo = self.backups.repo(Some(name))?;
        let meta = rec.metadata;
        let id = meta.id()?;
        let _g = self.lock(&format!("backup:{id}"))?;
        if let Some(existing) = engine::load_metadata(repo.as_ref(), &id).await? {
            if existing != meta {
                return Err(BackupError::AlreadyExists {
                    id: id.clone(),
                    reason: format!(
                        "repository {} holds a different backup under this id",
                        repo.name()
                    ),
                }
                .into());
            }
            return self.view_in(repo.as_ref(), &meta, &id).await;
        }
        let objects = repo
            .list(id.as_str())
            .await
            .map_err(BackupError::repo(repo.name()))?;
        let mut needed = vec![meta.sha256file.object.clone()];
        needed.extend(meta.blake3file.iter().map(|f| f.object.clone()));
        needed.extend(meta.chunks.iter().filter_map(|c| match c {
            format::ChunkEntry::Data { backup, object, .. } if *backup == meta.backup_id => {
                Some(object.clone())
            }
            _ => None,
        }));
        if let Some(missing) = needed.iter().find(|o| !objects.contains(o)) {
            return Err(BackupError::MissingObject(format::key(&id, missing)).into());
        }
        engine::check_chain(repo.as_ref(), &meta).await?;
        repo.put_commit(&format::key(&id, METADATA), meta.to_json())
            .await
            .map_err(BackupError::repo(repo.name()))?;
        tracing::info!(backup = %id, repository = repo.name(), "backup record imported");
        self.view_in(repo.as_ref(), &meta, &id).await
    }
}

/// What a running backup task holds until it ends.
struct BackupTask {
    id: BackupId,
    repo: Arc<dyn Repository>,
    source: Source,
    parent: Option<Arc<Parent>>,
    /// The parent, pinned until the backup ends.
    _pin: Pin,
    progress: Arc<Progress>,
    volume: VolumeId,
    temp: Option<SnapshotId>,
    /// The temporary snapshot becomes the volume's change-tracking marker if the backup
    /// succeeds.
    keep_marker: bool,
    /// The backup's guard and, without a temporary snapshot, the volume's.
    _guards: (Guard, Option<Guard>),
    tx: watch::Sender<Outcome>,
}

/// An error and its causes on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = c.source();
    }
    s
}
