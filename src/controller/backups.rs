//! Backups through the controller: Cinder's `backup-create`, `backup-list`, `backup-show`,
//! `backup-delete`, `backup-restore`, `backup-export` and `backup-import`, and the CSI path
//! (a VolumeSnapshotClass with `type: backup`, as cinder-csi-plugin does).
//!
//! The work is done by the agents (ADR 0005); the controller finds who should do it:
//!
//! - **Create**: the agent holding the volume. Ids made here are `backup-<uuid>`: random, or
//!   the UUIDv5 of a name (a CSI snapshot name, or the CLI's `--name`), so a retry finds the
//!   same backup. LVM snapshot ids are bare UUIDs, so the prefix tells the two apart.
//! - **List / show**: every agent is asked; a repository shared by several agents (the same
//!   directory or bucket configured under the same name on each) makes them report the same
//!   backup, so reports are merged by id ([`merge`]): the most informative status wins (a
//!   restore or a running backup is known only to the agent doing it; the others see a
//!   complete backup, or a container without metadata), and every agent that reports the
//!   backup is listed.
//! - **Delete**: through the agent whose report won, so a running backup or restore refuses
//!   it (the agent holds the pins), then through any other agent still reporting it.
//! - **Restore**: onto a new volume placed by the scheduler among the pools of agents that
//!   have the backup's repository (Cinder's restore to a new volume), or onto an existing
//!   available, unpublished volume at least as large. A new volume is created carrying the
//!   agent's restore mark (`cinderblock.status`), so it shows `error` — never `available`
//!   with missing data — until a restore into it has completed, whatever crashes meanwhile.
//!
//! No state is kept: backups live in their repositories, running ones in their agent.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::time::SystemTime;

use futures::{Stream, StreamExt};
use uuid::Uuid;

use super::guard::{volume_key, Operation};
use super::volumes::requested_size;
use super::{
    meta, paginate, Controller, ControllerError, CreateVolume, Page, Parameters, SnapshotStatus,
    SnapshotView, VolumeEntry, VolumeSpec, VolumeType, VolumeView, ID_NAMESPACE,
};
use crate::agent::service::STATUS_KEY;
use crate::agent::{BackupId, SnapshotId, VolumeId};
use crate::agent_rpc::client::{
    AgentErrorKind, AgentVolumeStatus, BackupInfo, BackupProgress, BackupState, NewBackup,
    NewVolume,
};
use crate::scheduler::{FilterKind, Request};
use crate::types::Bytes;

/// Prefix of backup ids made by the controller (and of CSI snapshot ids that are backups).
pub const BACKUP_ID_PREFIX: &str = "backup-";

/// VolumeSnapshotClass parameter choosing what a snapshot is (`snapshot` or `backup`).
pub const SNAPSHOT_PARAM_TYPE: &str = "type";
/// VolumeSnapshotClass parameter: the backup repository (default: the agent's default).
pub const SNAPSHOT_PARAM_REPOSITORY: &str = "repository";
/// VolumeSnapshotClass parameter: `true` for an incremental backup when a full one exists.
pub const SNAPSHOT_PARAM_INCREMENTAL: &str = "incremental";

/// The backup id of the backup called `name` (a CSI snapshot name or the CLI's `--name`).
pub fn backup_id_for(name: &str) -> BackupId {
    let id = Uuid::new_v5(&ID_NAMESPACE, format!("backup:{name}").as_bytes());
    BackupId::parse(&format!("{BACKUP_ID_PREFIX}{}", id.hyphenated()))
        .unwrap_or_else(|_| unreachable!("a prefixed UUID is a valid backup id"))
}

/// A new random backup id.
pub fn new_backup_id() -> BackupId {
    BackupId::parse(&format!(
        "{BACKUP_ID_PREFIX}{}",
        Uuid::new_v4().hyphenated()
    ))
    .unwrap_or_else(|_| unreachable!("a prefixed UUID is a valid backup id"))
}

/// Whether a CSI snapshot id designates a backup rather than an LVM snapshot.
pub fn is_backup_id(id: &str) -> bool {
    id.starts_with(BACKUP_ID_PREFIX)
}

fn backup_key(id: &BackupId) -> String {
    format!("backup:{id}")
}

/// A backup as the controller reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct BackupEntry {
    /// The report that won the merge (dependents: the union of every report's).
    pub info: BackupInfo,
    /// The agent whose report it is: the one to act through.
    pub agent: String,
    /// Every agent that reports the backup (that can restore it), by name.
    pub agents: Vec<String>,
}

/// How much a report tells: a running restore or backup is known only to its agent.
fn rank(s: BackupState) -> u8 {
    match s {
        BackupState::Restoring => 4,
        BackupState::Creating => 3,
        BackupState::Available => 2,
        BackupState::Error => 1,
        BackupState::Other => 0,
    }
}

/// Merges the agents' reports `(agent, backup)` by backup id: the highest [`rank`] wins (the
/// first agent by name on a tie), oldest backups first.
pub fn merge(reports: Vec<(String, BackupInfo)>) -> Vec<BackupEntry> {
    let mut by_id: BTreeMap<String, BackupEntry> = BTreeMap::new();
    let mut sorted = reports;
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    for (agent, info) in sorted {
        match by_id.get_mut(info.id.as_str()) {
            None => {
                by_id.insert(
                    info.id.to_string(),
                    BackupEntry {
                        agents: vec![agent.clone()],
                        agent,
                        info,
                    },
                );
            }
            Some(e) => {
                if !e.agents.contains(&agent) {
                    e.agents.push(agent.clone());
                }
                let mut dependents: BTreeSet<String> = e.info.dependents.drain(..).collect();
                dependents.extend(info.dependents.iter().cloned());
                if rank(info.status) > rank(e.info.status) {
                    e.info = info;
                    e.agent = agent;
                }
                e.info.dependents = dependents.into_iter().collect();
            }
        }
    }
    // Creation times have whole seconds: within one second a parent still comes before the
    // incrementals on top of it (its depth in the chain is smaller).
    let depth = |id: &str| {
        let mut d = 0usize;
        let mut cur = by_id.get(id).and_then(|e| e.info.parent_id.as_deref());
        while let Some(p) = cur.filter(|_| d < by_id.len()) {
            d += 1;
            cur = by_id.get(p).and_then(|e| e.info.parent_id.as_deref());
        }
        d
    };
    let mut keyed: Vec<(usize, BackupEntry)> = by_id
        .values()
        .map(|e| (depth(e.info.id.as_str()), e.clone()))
        .collect();
    keyed.sort_by(|(da, a), (db, b)| {
        (a.info.created_at, *da, &a.info.id).cmp(&(b.info.created_at, *db, &b.info.id))
    });
    keyed.into_iter().map(|(_, e)| e).collect()
}

/// A backup to make (`cinderblock backup create`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupRequest {
    /// The volume: id or CSI name.
    pub volume: String,
    /// Name the id derives from (`None`: a random id).
    pub name: Option<String>,
    /// Repository (`None`: the agent's default).
    pub repository: Option<String>,
    /// Only what changed since the volume's latest backup in the repository.
    pub incremental: bool,
    /// Allowed while the volume is published (in-use).
    pub force: bool,
}

/// Where a restore writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RestoreTarget {
    /// An existing volume (id or CSI name).
    Existing(String),
    /// A new volume placed by the scheduler.
    New(NewRestoreVolume),
}

/// A new volume to restore onto.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NewRestoreVolume {
    /// Volume type (`None`: the backup's type when configured, else the default).
    pub volume_type: Option<String>,
    /// Zone (`None`: any).
    pub zone: Option<String>,
    /// Name the id derives from (`None`: a random id).
    pub name: Option<String>,
    /// Size (`None`: the backup's volume size; never less).
    pub size: Option<Bytes>,
}

/// Progress of a backup or restore started through the controller.
pub type ProgressStream =
    Pin<Box<dyn Stream<Item = Result<BackupProgress, ControllerError>> + Send>>;

/// A backup or restore started on an agent.
pub struct Started {
    /// The backup.
    pub backup: BackupId,
    /// The volume read or written.
    pub volume: VolumeId,
    /// The agent doing it.
    pub agent: String,
    /// Its progress, ending with the backup.
    pub progress: ProgressStream,
}

impl std::fmt::Debug for Started {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Started")
            .field("backup", &self.backup)
            .field("volume", &self.volume)
            .field("agent", &self.agent)
            .finish_non_exhaustive()
    }
}

/// What a CSI CreateSnapshot makes, from the VolumeSnapshotClass parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SnapshotKind {
    /// An LVM (or file-pool) snapshot on the volume's pool; the remaining parameters.
    Snapshot(BTreeMap<String, String>),
    /// A backup in a repository.
    Backup {
        /// Repository (`None`: the agent's default).
        repository: Option<String>,
        /// Incremental on the volume's latest backup there, when there is one.
        incremental: bool,
    },
}

impl SnapshotKind {
    /// Parses the parameters: `type` is `snapshot` (the default) or `backup`; `repository`
    /// and `incremental` (`true`/`false`) only go with `backup`. Anything else is
    /// INVALID_ARGUMENT.
    pub fn parse(parameters: &BTreeMap<String, String>) -> Result<Self, ControllerError> {
        let bad = |m: String| Err(ControllerError::InvalidArgument(m));
        let mut rest = parameters.clone();
        let kind = rest.remove(SNAPSHOT_PARAM_TYPE);
        let repository = rest.remove(SNAPSHOT_PARAM_REPOSITORY);
        let incremental = rest.remove(SNAPSHOT_PARAM_INCREMENTAL);
        match kind.as_deref() {
            None | Some("snapshot") => {
                if let Some(k) = [SNAPSHOT_PARAM_REPOSITORY, SNAPSHOT_PARAM_INCREMENTAL]
                    .into_iter()
                    .find(|k| parameters.contains_key(*k))
                {
                    return bad(format!(
                        "snapshot parameter {k:?} needs {SNAPSHOT_PARAM_TYPE}: backup"
                    ));
                }
                Ok(SnapshotKind::Snapshot(rest))
            }
            Some("backup") => {
                super::check_snapshot_parameters(&rest)?;
                let incremental = match incremental.as_deref() {
                    None | Some("false") => false,
                    Some("true") => true,
                    Some(other) => {
                        return bad(format!(
                            "snapshot parameter {SNAPSHOT_PARAM_INCREMENTAL:?} must be true or \
                             false, not {other:?}"
                        ))
                    }
                };
                match repository.as_deref() {
                    Some("") => bad(format!(
                        "snapshot parameter {SNAPSHOT_PARAM_REPOSITORY:?} is empty"
                    )),
                    _ => Ok(SnapshotKind::Backup {
                        repository,
                        incremental,
                    }),
                }
            }
            Some(other) => bad(format!(
                "snapshot parameter {SNAPSHOT_PARAM_TYPE:?} must be snapshot or backup, not \
                 {other:?}"
            )),
        }
    }
}

fn parse_backup_id(raw: &str) -> Result<BackupId, ControllerError> {
    BackupId::parse(raw).map_err(|_| ControllerError::BackupNotFound(raw.to_owned()))
}

impl Controller {
    /// Every backup of every agent's repositories (of one volume id when set), merged by id.
    /// Agents that do not answer are left out (logged); if none answers, UNAVAILABLE.
    pub async fn list_backups(
        &self,
        volume: Option<&str>,
    ) -> Result<Vec<BackupEntry>, ControllerError> {
        let answers = futures::future::join_all(self.agents.snapshot().iter().map(|(name, a)| {
            let a = a.clone();
            async move { (name.clone(), a.list_backups(volume).await) }
        }))
        .await;
        let mut reports = Vec::new();
        let mut silent = Vec::new();
        for (agent, answer) in answers {
            match answer {
                Ok(list) => reports.extend(list.into_iter().map(|b| (agent.clone(), b))),
                Err(e) => {
                    tracing::warn!(agent = %agent, error = %e, "cannot list backups");
                    silent.push(agent);
                }
            }
        }
        if !silent.is_empty() && silent.len() == self.agents.snapshot().len() {
            return Err(ControllerError::IndexIncomplete(silent));
        }
        Ok(merge(reports))
    }

    /// One backup as every agent reports it, merged; `None` when no agent has it (and every
    /// agent answered: else UNAVAILABLE).
    async fn find_backup(&self, id: &BackupId) -> Result<Option<BackupEntry>, ControllerError> {
        let answers = futures::future::join_all(self.agents.snapshot().iter().map(|(name, a)| {
            let a = a.clone();
            async move { (name.clone(), a.get_backup(id).await) }
        }))
        .await;
        let mut reports = Vec::new();
        let mut silent = Vec::new();
        for (agent, answer) in answers {
            match answer {
                Ok(b) => reports.push((agent, b)),
                Err(e) if e.kind == AgentErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(agent = %agent, backup = %id, error = %e, "cannot get backup");
                    silent.push(agent);
                }
            }
        }
        match merge(reports).into_iter().next() {
            Some(e) => Ok(Some(e)),
            None if silent.is_empty() => Ok(None),
            None => Err(ControllerError::IndexIncomplete(silent)),
        }
    }

    /// `backup show`: one backup.
    pub async fn get_backup(&self, raw_id: &str) -> Result<BackupEntry, ControllerError> {
        let id = parse_backup_id(raw_id)?;
        self.find_backup(&id)
            .await?
            .ok_or_else(|| ControllerError::BackupNotFound(raw_id.to_owned()))
    }

    /// A complete backup, or FAILED_PRECONDITION naming its status.
    async fn complete_backup(&self, raw_id: &str) -> Result<BackupEntry, ControllerError> {
        let b = self.get_backup(raw_id).await?;
        if !b.info.status.is_complete() {
            return Err(ControllerError::WrongStatus {
                what: format!("backup {raw_id}"),
                status: b.info.status.as_str().to_owned(),
                needed: "available",
            });
        }
        Ok(b)
    }

    /// A volume by id: the index, else every agent is asked (operators also name volumes
    /// made outside the controller, with `agent-ctl`); one found is added to the index.
    async fn locate_volume(&self, id: &VolumeId) -> Result<Option<VolumeEntry>, ControllerError> {
        if let Some(e) = self.lookup_volume(id).await? {
            return Ok(Some(e));
        }
        for (name, agent) in self.agents.snapshot().iter() {
            match agent.get_volume(id).await {
                Ok(info) => return Ok(Some(self.remember_volume(name, info))),
                Err(e) if e.kind == AgentErrorKind::NotFound => {}
                Err(e) => return Err(ControllerError::agent(name, "GetVolume")(e)),
            }
        }
        Ok(None)
    }

    /// A volume by id, else by CSI name, read afresh from its agent.
    async fn resolve_volume(&self, raw: &str) -> Result<VolumeEntry, ControllerError> {
        let not_found = || ControllerError::VolumeNotFound(raw.to_owned());
        if let Ok(id) = VolumeId::parse(raw) {
            if let Some(e) = self.locate_volume(&id).await? {
                return self.observe_volume(&e).await?.ok_or_else(not_found);
            }
        }
        let id = super::volume_id_for(raw);
        let e = self.lookup_volume(&id).await?.ok_or_else(not_found)?;
        let fresh = self.observe_volume(&e).await?.ok_or_else(not_found)?;
        if fresh.info.metadata.get(meta::NAME).map(String::as_str) == Some(raw) {
            Ok(fresh)
        } else {
            Err(not_found())
        }
    }

    /// Names of the agents that have repository `name`, in name order.
    async fn agents_with_repository(&self, name: &str) -> Vec<String> {
        let answers = futures::future::join_all(self.agents.snapshot().iter().map(|(agent, a)| {
            let a = a.clone();
            async move { (agent.clone(), a.list_backup_repositories().await) }
        }))
        .await;
        answers
            .into_iter()
            .filter_map(|(agent, answer)| match answer {
                Ok(repos) => repos.iter().any(|r| r.name == name).then_some(agent),
                Err(e) => {
                    tracing::warn!(agent = %agent, error = %e, "cannot list backup repositories");
                    None
                }
            })
            .collect()
    }

    /// `backup create`: starts a backup on the agent holding the volume. Cinder's rules are
    /// the agent's: an in-use volume needs `force`; the volume shows `backing-up` meanwhile
    /// and cannot be deleted.
    pub async fn create_backup(&self, req: BackupRequest) -> Result<Started, ControllerError> {
        let vol = self.resolve_volume(&req.volume).await?;
        let id = req
            .name
            .as_deref()
            .map_or_else(new_backup_id, backup_id_for);
        let _guard = self.guards.try_lock(backup_key(&id), Operation::Create)?;
        let agent = self.agent(&vol.agent)?.clone();
        let progress = agent
            .create_backup(NewBackup {
                id: id.clone(),
                volume: vol.info.id.clone(),
                repository: req.repository,
                incremental: req.incremental,
                force: req.force,
            })
            .await
            .map_err(ControllerError::agent(&vol.agent, "CreateBackup"))?;
        tracing::info!(backup = %id, volume = %vol.info.id, agent = %vol.agent, "backup started");
        Ok(Started {
            backup: id,
            volume: vol.info.id,
            agent: vol.agent.clone(),
            progress: map_progress(progress, vol.agent, "CreateBackup"),
        })
    }

    /// `backup delete`: Cinder's rules (not while incremental backups depend on it, not while
    /// it is being made or restored). Returns whether there was anything to delete.
    pub async fn delete_backup(&self, raw_id: &str) -> Result<bool, ControllerError> {
        let Ok(id) = BackupId::parse(raw_id) else {
            return Ok(false);
        };
        let _guard = self.guards.try_lock(backup_key(&id), Operation::Delete)?;
        let mut deleted = false;
        // Each round deletes through one agent; agents whose repositories are not shared
        // with it still report the backup, and get their round.
        for _ in 0..=self.agents.snapshot().len() {
            let Some(entry) = self.find_backup(&id).await? else {
                return Ok(deleted);
            };
            self.agent(&entry.agent)?
                .delete_backup(&id)
                .await
                .map_err(ControllerError::agent(&entry.agent, "DeleteBackup"))?;
            tracing::info!(backup = %id, agent = %entry.agent, "backup deleted");
            deleted = true;
        }
        Err(ControllerError::Internal(format!(
            "backup {id} is still reported after deleting it through every agent"
        )))
    }

    /// `backup export`: (repository, record).
    pub async fn export_backup_record(
        &self,
        raw_id: &str,
    ) -> Result<(String, String), ControllerError> {
        let b = self.complete_backup(raw_id).await?;
        self.agent(&b.agent)?
            .export_backup_record(&b.info.id)
            .await
            .map_err(ControllerError::agent(&b.agent, "ExportBackupRecord"))
    }

    /// `backup import`: registers a record through the first agent that has its repository
    /// and holds the backup's objects.
    pub async fn import_backup_record(
        &self,
        record: &str,
        repository: Option<&str>,
    ) -> Result<BackupEntry, ControllerError> {
        let decoded = crate::backup::format::BackupRecord::decode(record)
            .map_err(|e| ControllerError::InvalidArgument(format!("backup record: {e}")))?;
        let repo = repository
            .filter(|r| !r.is_empty())
            .unwrap_or(&decoded.repository)
            .to_owned();
        let holders = self.agents_with_repository(&repo).await;
        if holders.is_empty() {
            return Err(ControllerError::RepositoryUnavailable(repo));
        }
        let mut last = None;
        for name in holders {
            match self
                .agent(&name)?
                .import_backup_record(record, Some(&repo))
                .await
            {
                Ok(b) => {
                    tracing::info!(backup = %b.id, agent = %name, repository = %repo, "backup record imported");
                    return self.get_backup(b.id.as_str()).await;
                }
                Err(e) if e.kind == AgentErrorKind::AlreadyExists => {
                    return Err(ControllerError::agent(&name, "ImportBackupRecord")(e))
                }
                Err(e) => last = Some(ControllerError::agent(&name, "ImportBackupRecord")(e)),
            }
        }
        Err(last.unwrap_or(ControllerError::RepositoryUnavailable(repo)))
    }

    /// `backup restore`: onto an existing volume, or a new one placed by the scheduler.
    pub async fn restore_backup(
        &self,
        raw_id: &str,
        target: RestoreTarget,
    ) -> Result<Started, ControllerError> {
        let backup = self.complete_backup(raw_id).await?;
        let id = backup.info.id.clone();
        let (entry, created) = match target {
            RestoreTarget::Existing(raw) => {
                (self.existing_restore_target(&backup, &raw).await?, false)
            }
            RestoreTarget::New(n) => {
                let vid = n.name.as_deref().map_or_else(
                    || {
                        VolumeId::parse(&Uuid::new_v4().hyphenated().to_string())
                            .unwrap_or_else(|_| unreachable!("a UUID is a valid volume id"))
                    },
                    super::volume_id_for,
                );
                let _guard = self.guards.try_lock(volume_key(&vid), Operation::Create)?;
                let vtype = match n.volume_type.as_deref() {
                    Some(t) => self.volume_type(Some(t))?.clone(),
                    None => self
                        .volume_type(Some(&backup.info.volume_type))
                        .or_else(|_| self.volume_type(None))?
                        .clone(),
                };
                let size = n.size.unwrap_or(backup.info.volume_size);
                if size < backup.info.volume_size {
                    return Err(ControllerError::OutOfRange(format!(
                        "{size} is smaller than backup {id}'s volume ({})",
                        backup.info.volume_size
                    )));
                }
                let mut request = Request::new(size);
                request.extra_specs = vtype.extra_specs.clone();
                request.requisite_zones = n.zone.iter().cloned().collect();
                let mut metadata = BTreeMap::new();
                if let Some(name) = &n.name {
                    metadata.insert(meta::NAME.to_owned(), name.clone());
                }
                let e = self
                    .new_restore_target(&vid, &backup, &vtype, request, None, metadata)
                    .await?;
                (e, true)
            }
        };
        let progress = self.start_restore(&entry, &id, created).await?;
        Ok(Started {
            backup: id,
            volume: entry.info.id.clone(),
            agent: entry.agent.clone(),
            progress,
        })
    }

    /// Starts a restore; a new volume whose restore cannot even start is removed again.
    async fn start_restore(
        &self,
        entry: &VolumeEntry,
        id: &BackupId,
        created: bool,
    ) -> Result<ProgressStream, ControllerError> {
        let agent = self.agent(&entry.agent)?.clone();
        match agent.restore_backup(id, &entry.info.id).await {
            Ok(p) => {
                tracing::info!(backup = %id, volume = %entry.info.id, agent = %entry.agent, "restore started");
                Ok(map_progress(p, entry.agent.clone(), "RestoreBackup"))
            }
            Err(e) => {
                if created {
                    self.remove_restore_target(entry).await;
                }
                Err(ControllerError::agent(&entry.agent, "RestoreBackup")(e))
            }
        }
    }

    async fn remove_restore_target(&self, entry: &VolumeEntry) {
        match self.agent(&entry.agent) {
            Ok(a) => match a.delete_volume(&entry.info.id).await {
                Ok(()) => {
                    self.forget_volume(&entry.info.id);
                }
                Err(e) => {
                    tracing::warn!(volume = %entry.info.id, error = %e, "cannot remove a restore target")
                }
            },
            Err(e) => tracing::warn!(volume = %entry.info.id, error = %e, "restore target"),
        }
    }

    /// An existing volume to restore onto: available (not published, not busy), at least as
    /// large as the backup's volume, on an agent that has the backup's repository.
    async fn existing_restore_target(
        &self,
        backup: &BackupEntry,
        raw: &str,
    ) -> Result<VolumeEntry, ControllerError> {
        let vol = self.resolve_volume(raw).await?;
        if !vol.info.exported_to.is_empty() {
            return Err(ControllerError::Published {
                id: vol.info.id.clone(),
                nodes: super::published_nodes(&vol.info),
            });
        }
        let status = self.view(&vol).status;
        if vol.info.status != AgentVolumeStatus::Available {
            return Err(ControllerError::WrongStatus {
                what: format!("volume {}", vol.info.id),
                status: status.as_str().to_owned(),
                needed: "available",
            });
        }
        if vol.info.size < backup.info.volume_size {
            return Err(ControllerError::OutOfRange(format!(
                "volume {} ({}) is smaller than backup {}'s volume ({})",
                vol.info.id, vol.info.size, backup.info.id, backup.info.volume_size
            )));
        }
        let holders = self.agents_with_repository(&backup.info.repository).await;
        if !holders.contains(&vol.agent) {
            return Err(ControllerError::RepositoryUnavailable(format!(
                "{} (not configured on agent {}, which holds volume {})",
                backup.info.repository, vol.agent, vol.info.id
            )));
        }
        Ok(vol)
    }

    /// Creates a blank volume for a restore, on a pool the scheduler picks among the agents
    /// that have the backup's repository. It carries the agent's restore mark, so it shows
    /// `error` until a restore into it completes.
    async fn new_restore_target(
        &self,
        id: &VolumeId,
        backup: &BackupEntry,
        vtype: &VolumeType,
        mut request: Request,
        limit: Option<Bytes>,
        mut metadata: BTreeMap<String, String>,
    ) -> Result<VolumeEntry, ControllerError> {
        let repo = &backup.info.repository;
        let holders: BTreeSet<String> = self
            .agents_with_repository(repo)
            .await
            .into_iter()
            .collect();
        let allowed: BTreeSet<String> = if request.same_backend_as.is_empty() {
            holders.clone()
        } else {
            request
                .same_backend_as
                .intersection(&holders)
                .cloned()
                .collect()
        };
        if allowed.is_empty() {
            return Err(ControllerError::RepositoryUnavailable(repo.clone()));
        }
        // Only pools whose agent can read the repository. The AffinityFilter says why the
        // others were rejected; without it configured, they are excluded outright.
        if !self
            .settings
            .scheduler
            .filters
            .contains(&FilterKind::AffinityFilter)
        {
            let others: Vec<_> = self
                .state()
                .pools
                .iter()
                .filter(|p| !allowed.contains(&p.id.agent))
                .map(|p| p.id.clone())
                .collect();
            for p in others {
                request.exclude_pool(p);
            }
        }
        request.same_backend_as = allowed;
        let (pool, charge) = self.place(id, &request, limit, None, &None)?;
        metadata.insert(STATUS_KEY.to_owned(), "restoring".to_owned());
        let agent = self.agent(&pool.agent)?.clone();
        let created = agent
            .create_volume(NewVolume {
                id: id.clone(),
                pool: pool.pool.clone(),
                size: request.size,
                volume_type: vtype.name.clone(),
                metadata,
                source: None,
            })
            .await;
        match created {
            Ok(info) => {
                self.settle(id, None);
                tracing::info!(volume = %id, pool = %pool, backup = %backup.info.id, "restore target created");
                Ok(self.remember_volume(&pool.agent, info))
            }
            Err(e) => {
                self.settle(id, Some(charge));
                Err(ControllerError::agent(&pool.agent, "CreateVolume")(e))
            }
        }
    }

    // ---- the CSI path ------------------------------------------------------------------

    /// CSI CreateSnapshot with `type: backup`: starts (or finds) the backup named `name` of
    /// `raw_source` and reports it, `ready_to_use` once complete. The same name for another
    /// volume is ALREADY_EXISTS; a backup that failed is started again. In-use volumes are
    /// backed up crash-consistently (`force`), as Kubernetes snapshots attached volumes.
    pub async fn create_backup_snapshot(
        &self,
        name: &str,
        raw_source: &str,
        repository: Option<String>,
        incremental: bool,
    ) -> Result<SnapshotView, ControllerError> {
        let id = backup_id_for(name);
        let _guard = self.guards.try_lock(backup_key(&id), Operation::Create)?;
        if let Some(b) = self.find_backup(&id).await? {
            if b.info.volume_id != raw_source {
                return Err(ControllerError::AlreadyExists {
                    what: "snapshot",
                    name: name.to_owned(),
                    reason: format!(
                        "it is a backup of {}, not of {raw_source}",
                        b.info.volume_id
                    ),
                });
            }
            if b.info.status != BackupState::Error {
                return backup_snapshot_view(&b);
            }
        }
        let not_found = || ControllerError::VolumeNotFound(raw_source.to_owned());
        let vid = VolumeId::parse(raw_source).map_err(|_| not_found())?;
        let vol = self.lookup_volume(&vid).await?.ok_or_else(not_found)?;
        let agent = self.agent(&vol.agent)?.clone();
        // Incremental on the latest complete backup there, or full when there is none.
        let incremental = incremental && {
            let mine = agent
                .list_backups(Some(vid.as_str()))
                .await
                .map_err(ControllerError::agent(&vol.agent, "ListBackups"))?;
            mine.iter().any(|b| {
                b.status.is_complete() && repository.as_ref().is_none_or(|r| *r == b.repository)
            })
        };
        let mut progress = agent
            .create_backup(NewBackup {
                id: id.clone(),
                volume: vid.clone(),
                repository,
                incremental,
                force: true,
            })
            .await
            .map_err(ControllerError::agent(&vol.agent, "CreateBackup"))?;
        // The first message says whether it is already complete; the agent goes on alone.
        let first = progress
            .next()
            .await
            .ok_or_else(|| ControllerError::Internal(format!("backup {id}: empty progress")))?
            .map_err(ControllerError::agent(&vol.agent, "CreateBackup"))?;
        tracing::info!(backup = %id, name, volume = %vid, incremental, "backup snapshot started");
        let info = match first.finished {
            Some(info) => info,
            None => BackupInfo {
                id: id.clone(),
                repository: String::new(),
                status: BackupState::Creating,
                fail_reason: String::new(),
                volume_id: vid.to_string(),
                volume_size: Bytes(first.total),
                volume_type: vol.info.volume_type.clone(),
                parent_id: None,
                dependents: Vec::new(),
                created_at: Some(SystemTime::now()),
                completed_at: None,
                chunk_size: Bytes(0),
                compression: String::new(),
                data_bytes: 0,
                hole_bytes: 0,
                stored_bytes: first.stored,
                stored_chunks: 0,
                reused_chunks: 0,
                bytes_done: first.done,
                bytes_total: first.total,
            },
        };
        backup_snapshot_view(&BackupEntry {
            info,
            agent: vol.agent.clone(),
            agents: vec![vol.agent],
        })
    }

    /// CSI GetSnapshot of a backup.
    pub async fn get_backup_snapshot(&self, raw_id: &str) -> Result<SnapshotView, ControllerError> {
        let b = self.get_backup(raw_id).await.map_err(|e| match e {
            ControllerError::BackupNotFound(id) => ControllerError::SnapshotNotFound(id),
            other => other,
        })?;
        backup_snapshot_view(&b)
    }

    /// CSI ListSnapshots: LVM snapshots and backups made through the controller
    /// (`backup-` ids), in id order, paged by offset tokens.
    pub async fn list_snapshots_and_backups(
        &self,
        snapshot_id: &str,
        source_volume_id: &str,
        max_entries: usize,
        token: &str,
    ) -> Result<Page<SnapshotView>, ControllerError> {
        let mut views = self
            .list_snapshots(snapshot_id, source_volume_id, 0, "")
            .await?
            .entries;
        if snapshot_id.is_empty() || is_backup_id(snapshot_id) {
            let volume = Some(source_volume_id).filter(|v| !v.is_empty());
            match self.list_backups(volume).await {
                Ok(backups) => views.extend(
                    backups
                        .iter()
                        .filter(|b| is_backup_id(b.info.id.as_str()))
                        .filter(|b| snapshot_id.is_empty() || b.info.id.as_str() == snapshot_id)
                        .filter_map(|b| backup_snapshot_view(b).ok()),
                ),
                Err(e) => tracing::warn!(error = %e, "listing snapshots without backups"),
            }
        }
        views.sort_by(|a, b| a.id.cmp(&b.id));
        paginate(views, max_entries, token)
    }

    /// CSI CreateVolume from a backup (a snapshot id `backup-...`): a new volume placed by
    /// the scheduler among the agents that have the backup's repository, the backup restored
    /// into it before the call returns. A retry while the restore runs is ABORTED (the CO
    /// retries); a volume left in error by a failed restore is removed and made again.
    pub(super) async fn create_volume_from_backup(
        &self,
        req: &CreateVolume,
        id: &VolumeId,
        vtype: &VolumeType,
        spec: &VolumeSpec,
        params: &Parameters,
        raw_backup: &str,
    ) -> Result<VolumeView, ControllerError> {
        if let Some(existing) = self.lookup_volume(id).await? {
            if let Some(reason) = spec.mismatch(&existing.info.metadata) {
                return Err(ControllerError::AlreadyExists {
                    what: "volume",
                    name: req.name.clone(),
                    reason,
                });
            }
            if let Some(fresh) = self.observe_volume(&existing).await? {
                match fresh.info.status {
                    AgentVolumeStatus::Restoring => {
                        return Err(ControllerError::Busy(format!(
                            "volume {id} (restoring backup {raw_backup})"
                        )))
                    }
                    AgentVolumeStatus::Error => self.remove_restore_target(&fresh).await,
                    _ => return Ok(self.view(&fresh)),
                }
            }
        }
        let backup = self
            .complete_backup(raw_backup)
            .await
            .map_err(|e| match e {
                ControllerError::BackupNotFound(_) => {
                    ControllerError::SourceNotFound(format!("snapshot:{raw_backup}"))
                }
                other => other,
            })?;
        let size = requested_size(req.capacity, Some(backup.info.volume_size))?;
        let mut request = Request::new(size);
        request.extra_specs = vtype.extra_specs.clone();
        request.requisite_zones = req.zones.requisite.clone();
        request.preferred_zones = req.zones.preferred.clone();
        request.same_backend_as = params.same_backend_as.clone();
        request.different_backend_as = params.different_backend_as.clone();
        let entry = self
            .new_restore_target(
                id,
                &backup,
                vtype,
                request,
                req.capacity.limit,
                spec.to_metadata(),
            )
            .await?;
        let mut progress = self.start_restore(&entry, &backup.info.id, true).await?;
        while let Some(step) = progress.next().await {
            match step {
                Ok(p) if p.finished.is_some() => break,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(volume = %id, backup = %backup.info.id, error = %e, "restore failed; removing the volume");
                    self.remove_restore_target(&entry).await;
                    return Err(e);
                }
            }
        }
        let fresh = self
            .observe_volume(&entry)
            .await?
            .ok_or_else(|| ControllerError::VolumeNotFound(id.to_string()))?;
        tracing::info!(volume = %id, name = %req.name, backup = %backup.info.id, agent = %fresh.agent, "volume restored from a backup");
        Ok(self.view(&fresh))
    }
}

/// A backup as a CSI snapshot: its repository stands in the pool's place.
fn backup_snapshot_view(b: &BackupEntry) -> Result<SnapshotView, ControllerError> {
    let bad = |what: &str| ControllerError::Internal(format!("backup {}: {what}", b.info.id));
    Ok(SnapshotView {
        id: SnapshotId::parse(b.info.id.as_str()).map_err(|_| bad("not a snapshot id"))?,
        name: None,
        source_volume: VolumeId::parse(&b.info.volume_id)
            .map_err(|_| bad("no source volume recorded"))?,
        size: b.info.volume_size,
        created_at: b.info.created_at,
        ready_to_use: b.info.status.is_complete(),
        status: if b.info.status.is_complete() {
            SnapshotStatus::Available
        } else {
            SnapshotStatus::Creating
        },
        agent: b.agent.clone(),
        pool: b.info.repository.clone(),
    })
}

fn map_progress(
    p: crate::agent_rpc::client::ProgressStream,
    agent: String,
    op: &'static str,
) -> ProgressStream {
    Box::pin(p.map(move |step| step.map_err(ControllerError::agent(&agent, op))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str, status: BackupState, dependents: &[&str], created: u64) -> BackupInfo {
        BackupInfo {
            id: BackupId::parse(id).unwrap_or_else(|e| panic!("{e}")),
            repository: "shared".into(),
            status,
            fail_reason: String::new(),
            volume_id: "v1".into(),
            volume_size: Bytes::mib(64),
            volume_type: "default".into(),
            parent_id: None,
            dependents: dependents.iter().map(|d| (*d).to_owned()).collect(),
            created_at: Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(created)),
            completed_at: None,
            chunk_size: Bytes::mib(4),
            compression: "zstd".into(),
            data_bytes: 0,
            hole_bytes: 0,
            stored_bytes: 0,
            stored_chunks: 0,
            reused_chunks: 0,
            bytes_done: 0,
            bytes_total: 0,
        }
    }

    #[test]
    fn within_one_second_a_parent_is_listed_before_its_incrementals() {
        use BackupState as S;
        let mut inc1 = info("a-inc", S::Available, &[], 10);
        inc1.parent_id = Some("z-full".into());
        let mut inc2 = info("m-inc", S::Available, &[], 10);
        inc2.parent_id = Some("a-inc".into());
        let full = info("z-full", S::Available, &["a-inc"], 10);
        let older = info("zz-old", S::Available, &[], 9);
        let reports = vec![
            ("a".to_string(), inc2),
            ("a".to_string(), inc1),
            ("a".to_string(), full),
            ("a".to_string(), older),
        ];
        let ids: Vec<String> = merge(reports)
            .into_iter()
            .map(|e| e.info.id.to_string())
            .collect();
        assert_eq!(ids, ["zz-old", "z-full", "a-inc", "m-inc"]);
    }

    #[test]
    fn merge_keeps_the_most_informative_report_and_every_agent() {
        use BackupState as S;
        let reports = vec![
            // b1: running on agent b; a sees the unfinished container.
            ("b".to_string(), info("b1", S::Creating, &[], 20)),
            ("a".to_string(), info("b1", S::Error, &[], 20)),
            // b0: complete, seen by both, restoring on c; dependents from both views.
            ("a".to_string(), info("b0", S::Available, &["x"], 10)),
            ("c".to_string(), info("b0", S::Restoring, &["y"], 10)),
            // b2: one agent only.
            ("a".to_string(), info("b2", S::Available, &[], 30)),
        ];
        // (id, status, winning agent, agents, dependents)
        type Row = (String, S, String, Vec<String>, Vec<String>);
        let got: Vec<Row> = merge(reports)
            .into_iter()
            .map(|e| {
                (
                    e.info.id.to_string(),
                    e.info.status,
                    e.agent,
                    e.agents,
                    e.info.dependents,
                )
            })
            .collect();
        let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            got,
            vec![
                (
                    "b0".into(),
                    S::Restoring,
                    "c".into(),
                    s(&["a", "c"]),
                    s(&["x", "y"])
                ),
                ("b1".into(), S::Creating, "b".into(), s(&["a", "b"]), s(&[])),
                ("b2".into(), S::Available, "a".into(), s(&["a"]), s(&[])),
            ]
        );
    }

    /// Fake agents a (z1), b (z2), c (z3); only a has repository `default`.
    async fn fakes() -> (
        Controller,
        Vec<std::sync::Arc<crate::agent_rpc::client::FakeAgent>>,
    ) {
        use crate::agent_rpc::client::{FakeAgent, FakePool, StorageAgent};
        let agents: Vec<_> = [("a", "z1"), ("b", "z2"), ("c", "z3")]
            .into_iter()
            .map(|(n, z)| FakeAgent::new(n, vec![FakePool::new("p", z, Bytes::gib(10))]))
            .collect();
        agents[1].set_backup_repositories(&["other"]);
        agents[2].set_backup_repositories(&["other"]);
        let settings = super::super::Settings {
            scheduler: crate::scheduler::SchedulerConfig::default(),
            volume_types: BTreeMap::from([(
                "default".to_string(),
                VolumeType {
                    name: "default".into(),
                    description: String::new(),
                    extra_specs: BTreeMap::new(),
                },
            )]),
            default_volume_type: "default".into(),
        };
        let seams: Vec<std::sync::Arc<dyn StorageAgent>> = agents
            .iter()
            .map(|a| a.clone() as std::sync::Arc<dyn StorageAgent>)
            .collect();
        let c = Controller::new(settings, seams).unwrap_or_else(|e| panic!("{e}"));
        c.sync_all().await;
        (c, agents)
    }

    async fn drain(mut s: Started) -> Result<BackupInfo, ControllerError> {
        while let Some(step) = s.progress.next().await {
            if let Some(b) = step?.finished {
                return Ok(b);
            }
        }
        Err(ControllerError::Internal("no result".into()))
    }

    #[tokio::test]
    async fn restores_go_only_to_agents_with_the_repository() {
        use crate::agent_rpc::client::StorageAgent as _;
        let (c, agents) = fakes().await;
        let v = VolumeId::parse("v1").unwrap_or_else(|e| panic!("{e}"));
        agents[0]
            .create_volume(NewVolume {
                id: v.clone(),
                pool: "p".into(),
                size: Bytes::mib(64),
                volume_type: "default".into(),
                metadata: BTreeMap::new(),
                source: None,
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        agents[0].poke(&v, 4096, b"payload");
        let req = BackupRequest {
            volume: "v1".into(),
            name: Some("n1".into()),
            repository: None,
            incremental: false,
            force: false,
        };
        let started = c.create_backup(req).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(started.backup, backup_id_for("n1"));
        let b = drain(started).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(b.repository, "default");
        let id = b.id.to_string();

        // Zone z3 exists, but its agent lacks the repository.
        let new = |zone: Option<&str>| {
            RestoreTarget::New(NewRestoreVolume {
                zone: zone.map(str::to_owned),
                ..Default::default()
            })
        };
        let err = c.restore_backup(&id, new(Some("z3"))).await.unwrap_err();
        assert!(
            err.to_string().contains("c#p: same-backend affinity"),
            "{err}"
        );
        assert_eq!(
            crate::csi::status::code(&err),
            tonic::Code::ResourceExhausted
        );
        // Anywhere: only agent a qualifies; the new volume gets the backup's bytes.
        let started = c
            .restore_backup(&id, new(None))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(started.agent, "a");
        let target = started.volume.clone();
        drain(started).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(agents[0].content(&target), agents[0].content(&v));
        assert!(agents[1].volume_ids().is_empty() && agents[2].volume_ids().is_empty());
        // Unknown backups and volumes.
        let err = c
            .restore_backup("backup-nope", new(None))
            .await
            .unwrap_err();
        assert_eq!(crate::csi::status::code(&err), tonic::Code::NotFound);
        assert!(!c
            .delete_backup("backup-nope")
            .await
            .unwrap_or_else(|e| panic!("{e}")));
        assert!(c.delete_backup(&id).await.unwrap_or_else(|e| panic!("{e}")));
        assert_eq!(c.list_backups(None).await.map(|l| l.len()).ok(), Some(0));
    }

    #[test]
    fn backup_ids_are_stable_prefixed_and_distinct_from_snapshot_ids() {
        let a = backup_id_for("snap-1");
        assert_eq!(a, backup_id_for("snap-1"));
        assert_ne!(a, backup_id_for("snap-2"));
        assert!(is_backup_id(a.as_str()));
        assert!(!is_backup_id(
            super::super::snapshot_id_for("snap-1").as_str()
        ));
        assert!(is_backup_id(new_backup_id().as_str()));
        assert_ne!(new_backup_id(), new_backup_id());
    }

    #[test]
    fn snapshot_kind_table() {
        let p = |kv: &[(&str, &str)]| -> BTreeMap<String, String> {
            kv.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let sidecar = "csi.storage.k8s.io/volumesnapshot/name";
        type Case = (BTreeMap<String, String>, Result<SnapshotKind, &'static str>);
        let cases: Vec<Case> = vec![
            (p(&[]), Ok(SnapshotKind::Snapshot(p(&[])))),
            (
                p(&[("type", "snapshot"), (sidecar, "s")]),
                Ok(SnapshotKind::Snapshot(p(&[(sidecar, "s")]))),
            ),
            (
                p(&[("type", "backup")]),
                Ok(SnapshotKind::Backup {
                    repository: None,
                    incremental: false,
                }),
            ),
            (
                p(&[
                    ("type", "backup"),
                    ("repository", "nfs"),
                    ("incremental", "true"),
                    (sidecar, "s"),
                ]),
                Ok(SnapshotKind::Backup {
                    repository: Some("nfs".into()),
                    incremental: true,
                }),
            ),
            (
                p(&[("type", "tape")]),
                Err("\"type\" must be snapshot or backup"),
            ),
            (
                p(&[("type", "backup"), ("incremental", "yes")]),
                Err("must be true or false"),
            ),
            (
                p(&[("type", "backup"), ("repository", "")]),
                Err("is empty"),
            ),
            (p(&[("repository", "nfs")]), Err("needs type: backup")),
            (
                p(&[("type", "backup"), ("color", "red")]),
                Err("unknown snapshot parameter \"color\""),
            ),
        ];
        for (params, want) in cases {
            match (SnapshotKind::parse(&params), want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{params:?}"),
                (Err(e), Err(part)) => {
                    assert!(
                        matches!(e, ControllerError::InvalidArgument(_)),
                        "{params:?}: {e:?}"
                    );
                    assert!(e.to_string().contains(part), "{params:?}: {e}");
                }
                (got, want) => panic!("{params:?}: got {got:?}, want {want:?}"),
            }
        }
    }
}
