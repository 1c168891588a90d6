//! The backup part of the agent seam ([`BackupAgent`]): what the controller asks an agent's
//! backup service (docs/agent-protocol.md, "Backup and restore"), in domain types, with its
//! tonic implementation on [`GrpcAgent`] and an in-memory one on [`FakeAgent`].

use std::collections::BTreeMap;
use std::pin::Pin;
use std::time::SystemTime;

use futures::{Stream, StreamExt};

use super::{
    fake_err, from_status, request, time, AgentClientError, AgentErrorKind, FakeAgent, GrpcAgent,
};
use crate::agent::{BackupId, VolumeId};
use crate::proto::agent as pb;
use crate::types::Bytes;

/// A backup's state as an agent reports it (Cinder's backup statuses).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BackupState {
    /// Failed, or an unfinished container.
    Error,
    /// Being made.
    Creating,
    /// Complete.
    Available,
    /// Complete and being restored.
    Restoring,
    /// A state this controller does not know.
    Other,
}

impl BackupState {
    /// Cinder's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            BackupState::Error => "error",
            BackupState::Creating => "creating",
            BackupState::Available => "available",
            BackupState::Restoring => "restoring",
            BackupState::Other => "unknown",
        }
    }

    /// Complete: its metadata is in the repository.
    pub fn is_complete(self) -> bool {
        matches!(self, BackupState::Available | BackupState::Restoring)
    }
}

/// A backup as an agent reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct BackupInfo {
    /// Id (its container's name).
    pub id: BackupId,
    /// Repository name.
    pub repository: String,
    /// State.
    pub status: BackupState,
    /// Why it is in error.
    pub fail_reason: String,
    /// Source volume id (the volume may be gone).
    pub volume_id: String,
    /// Source volume size: what a restore target needs at least.
    pub volume_size: Bytes,
    /// Source volume type.
    pub volume_type: String,
    /// Parent of an incremental backup.
    pub parent_id: Option<String>,
    /// Incremental backups on top of it.
    pub dependents: Vec<String>,
    /// Started.
    pub created_at: Option<SystemTime>,
    /// Completed.
    pub completed_at: Option<SystemTime>,
    /// Chunk size.
    pub chunk_size: Bytes,
    /// `zstd`, `none`, or empty when unknown.
    pub compression: String,
    /// Bytes of the volume in data chunks.
    pub data_bytes: u64,
    /// Bytes of the volume in holes.
    pub hole_bytes: u64,
    /// Bytes this backup stored.
    pub stored_bytes: u64,
    /// Chunks this backup stored.
    pub stored_chunks: u64,
    /// Unchanged chunks taken from the chain.
    pub reused_chunks: u64,
    /// Progress of a running backup.
    pub bytes_done: u64,
    /// Bytes to cover.
    pub bytes_total: u64,
}

/// One step of a running backup or restore; the last one carries the backup.
#[derive(Clone, Debug, PartialEq)]
pub struct BackupProgress {
    /// The backup.
    pub id: String,
    /// Bytes covered.
    pub done: u64,
    /// Bytes to cover.
    pub total: u64,
    /// Bytes written to the repository (backups).
    pub stored: u64,
    /// The backup, on the last message.
    pub finished: Option<BackupInfo>,
}

/// Progress of a running backup or restore, ending with the result or an error.
pub type ProgressStream =
    Pin<Box<dyn Stream<Item = Result<BackupProgress, AgentClientError>> + Send>>;

/// A backup to make.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewBackup {
    /// Id chosen by the caller.
    pub id: BackupId,
    /// The volume (on this agent).
    pub volume: VolumeId,
    /// Repository (`None`: the agent's default).
    pub repository: Option<String>,
    /// Only what changed since the volume's latest backup.
    pub incremental: bool,
    /// Allowed while the volume is exported.
    pub force: bool,
}

/// A repository an agent has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepositoryInfo {
    /// Name (the same name on every agent that shares it).
    pub name: String,
    /// Directory or `s3://bucket/prefix`.
    pub location: String,
    /// The agent's default.
    pub is_default: bool,
}

/// An agent's backup service as the controller uses it.
#[async_trait::async_trait]
pub trait BackupAgent: Send + Sync {
    /// Starts a backup (a retry of a running or complete one follows it).
    async fn create_backup(&self, req: NewBackup) -> Result<ProgressStream, AgentClientError>;
    /// One backup, from any of the agent's repositories.
    async fn get_backup(&self, id: &BackupId) -> Result<BackupInfo, AgentClientError>;
    /// Every backup the agent sees (of one volume when set).
    async fn list_backups(&self, volume: Option<&str>)
        -> Result<Vec<BackupInfo>, AgentClientError>;
    /// Deletes a backup; absent is OK.
    async fn delete_backup(&self, id: &BackupId) -> Result<(), AgentClientError>;
    /// Starts restoring onto an existing volume of the agent.
    async fn restore_backup(
        &self,
        id: &BackupId,
        volume: &VolumeId,
    ) -> Result<ProgressStream, AgentClientError>;
    /// A backup's record: (repository, record).
    async fn export_backup_record(
        &self,
        id: &BackupId,
    ) -> Result<(String, String), AgentClientError>;
    /// Registers a record in a repository holding the backup's objects.
    async fn import_backup_record(
        &self,
        record: &str,
        repository: Option<&str>,
    ) -> Result<BackupInfo, AgentClientError>;
    /// The agent's repositories.
    async fn list_backup_repositories(&self) -> Result<Vec<RepositoryInfo>, AgentClientError>;
}

// ---------------------------------------------------------------------------------------
// Over gRPC

fn backup_from_pb(b: pb::Backup) -> Result<BackupInfo, AgentClientError> {
    let status = match pb::BackupStatus::try_from(b.status) {
        Ok(pb::BackupStatus::Creating) => BackupState::Creating,
        Ok(pb::BackupStatus::Available) => BackupState::Available,
        Ok(pb::BackupStatus::Error) => BackupState::Error,
        Ok(pb::BackupStatus::Restoring) => BackupState::Restoring,
        Ok(pb::BackupStatus::Unspecified) | Err(_) => BackupState::Other,
    };
    let compression = match pb::BackupCompression::try_from(b.compression) {
        Ok(pb::BackupCompression::Zstd) => "zstd",
        Ok(pb::BackupCompression::None) => "none",
        Ok(pb::BackupCompression::Unspecified) | Err(_) => "",
    };
    Ok(BackupInfo {
        id: BackupId::parse(&b.id).map_err(|e| super::bad_answer("backup id", e))?,
        repository: b.repository,
        status,
        fail_reason: b.fail_reason,
        volume_id: b.volume_id,
        volume_size: Bytes(b.volume_size_bytes),
        volume_type: b.volume_type,
        parent_id: Some(b.parent_id).filter(|p| !p.is_empty()),
        dependents: b.dependent_ids,
        created_at: time(b.created_at),
        completed_at: time(b.completed_at),
        chunk_size: Bytes(b.chunk_bytes),
        compression: compression.to_owned(),
        data_bytes: b.data_bytes,
        hole_bytes: b.hole_bytes,
        stored_bytes: b.stored_bytes,
        stored_chunks: b.stored_chunks,
        reused_chunks: b.reused_chunks,
        bytes_done: b.bytes_done,
        bytes_total: b.bytes_total,
    })
}

fn progress_stream(s: tonic::Streaming<pb::BackupProgress>) -> ProgressStream {
    Box::pin(s.map(|m| {
        let m = m.map_err(from_status)?;
        Ok(BackupProgress {
            id: m.backup_id,
            done: m.bytes_done,
            total: m.bytes_total,
            stored: m.stored_bytes,
            finished: match (m.done, m.backup) {
                (true, Some(b)) => Some(backup_from_pb(b)?),
                (true, None) => {
                    return Err(super::bad_answer(
                        "progress",
                        "a last message without a backup",
                    ))
                }
                (false, _) => None,
            },
        })
    }))
}

/// A streaming call: no deadline (a backup of a large volume takes as long as it takes; the
/// agent goes on if the stream is dropped).
fn streaming<T>(msg: T) -> tonic::Request<T> {
    tonic::Request::new(msg)
}

#[async_trait::async_trait]
impl BackupAgent for GrpcAgent {
    async fn create_backup(&self, req: NewBackup) -> Result<ProgressStream, AgentClientError> {
        let s = self
            .client()
            .create_backup(streaming(pb::CreateBackupRequest {
                backup_id: req.id.to_string(),
                volume_id: req.volume.to_string(),
                repository: req.repository.unwrap_or_default(),
                incremental: req.incremental,
                force: req.force,
            }))
            .await
            .map_err(from_status)?
            .into_inner();
        Ok(progress_stream(s))
    }

    async fn get_backup(&self, id: &BackupId) -> Result<BackupInfo, AgentClientError> {
        let b = self
            .client()
            .get_backup(request(pb::GetBackupRequest {
                backup_id: id.to_string(),
            }))
            .await
            .map_err(from_status)?
            .into_inner();
        backup_from_pb(b)
    }

    async fn list_backups(
        &self,
        volume: Option<&str>,
    ) -> Result<Vec<BackupInfo>, AgentClientError> {
        self.client()
            .list_backups(request(pb::ListBackupsRequest {
                repository: String::new(),
                volume_id: volume.unwrap_or_default().to_owned(),
            }))
            .await
            .map_err(from_status)?
            .into_inner()
            .backups
            .into_iter()
            .map(backup_from_pb)
            .collect()
    }

    async fn delete_backup(&self, id: &BackupId) -> Result<(), AgentClientError> {
        self.client()
            .delete_backup(request(pb::DeleteBackupRequest {
                backup_id: id.to_string(),
            }))
            .await
            .map_err(from_status)?;
        Ok(())
    }

    async fn restore_backup(
        &self,
        id: &BackupId,
        volume: &VolumeId,
    ) -> Result<ProgressStream, AgentClientError> {
        let s = self
            .client()
            .restore_backup(streaming(pb::RestoreBackupRequest {
                backup_id: id.to_string(),
                volume_id: volume.to_string(),
            }))
            .await
            .map_err(from_status)?
            .into_inner();
        Ok(progress_stream(s))
    }

    async fn export_backup_record(
        &self,
        id: &BackupId,
    ) -> Result<(String, String), AgentClientError> {
        let r = self
            .client()
            .export_backup_record(request(pb::ExportBackupRecordRequest {
                backup_id: id.to_string(),
            }))
            .await
            .map_err(from_status)?
            .into_inner();
        Ok((r.repository, r.record))
    }

    async fn import_backup_record(
        &self,
        record: &str,
        repository: Option<&str>,
    ) -> Result<BackupInfo, AgentClientError> {
        let b = self
            .client()
            .import_backup_record(request(pb::ImportBackupRecordRequest {
                record: record.to_owned(),
                repository: repository.unwrap_or_default().to_owned(),
            }))
            .await
            .map_err(from_status)?
            .into_inner();
        backup_from_pb(b)
    }

    async fn list_backup_repositories(&self) -> Result<Vec<RepositoryInfo>, AgentClientError> {
        Ok(self
            .client()
            .list_backup_repositories(request(pb::ListBackupRepositoriesRequest {}))
            .await
            .map_err(from_status)?
            .into_inner()
            .repositories
            .into_iter()
            .map(|r| RepositoryInfo {
                name: r.name,
                location: r.location,
                is_default: r.is_default,
            })
            .collect())
    }
}

// ---------------------------------------------------------------------------------------
// The fake: backups complete at once, into one repository per fake agent (`default`, or
// those given to `set_backup_repositories`), holding a copy of the volume's bytes.

/// A backup held by a [`FakeAgent`].
#[derive(Clone, Debug, PartialEq)]
pub(super) struct FakeBackup {
    info: BackupInfo,
    data: Vec<u8>,
}

fn fake_done(info: BackupInfo) -> ProgressStream {
    let total = info.volume_size.get();
    Box::pin(futures::stream::iter([Ok(BackupProgress {
        id: info.id.to_string(),
        done: total,
        total,
        stored: info.stored_bytes,
        finished: Some(info),
    })]))
}

impl FakeAgent {
    /// The repositories this fake reports (the first is the default).
    pub fn set_backup_repositories(&self, names: &[&str]) {
        self.lock().repositories = names.iter().map(|n| (*n).to_owned()).collect();
    }

    fn fake_repositories(&self) -> Vec<String> {
        let r = self.lock().repositories.clone();
        if r.is_empty() {
            vec!["default".to_owned()]
        } else {
            r
        }
    }
}

#[async_trait::async_trait]
impl BackupAgent for FakeAgent {
    async fn create_backup(&self, req: NewBackup) -> Result<ProgressStream, AgentClientError> {
        self.enter("create_backup").await?;
        let repos = self.fake_repositories();
        let repository = req.repository.clone().unwrap_or_else(|| repos[0].clone());
        if !repos.contains(&repository) {
            return Err(fake_err(
                AgentErrorKind::NotFound,
                format!("no backup repository {repository:?}"),
            ));
        }
        let mut st = self.lock();
        if let Some(b) = st.backups.get(req.id.as_str()) {
            if b.info.volume_id != req.volume.as_str() {
                return Err(fake_err(
                    AgentErrorKind::AlreadyExists,
                    format!("backup {} is a backup of another volume", req.id),
                ));
            }
            return Ok(fake_done(b.info.clone()));
        }
        let (vol, data) = st
            .volumes
            .get(&req.volume)
            .cloned()
            .ok_or_else(|| super::not_found_volume(&req.volume))?;
        if !vol.exported_to.is_empty() && !req.force {
            return Err(fake_err(
                AgentErrorKind::FailedPrecondition,
                format!("volume {} is in use: back it up with force", req.volume),
            ));
        }
        let parent = if req.incremental {
            let latest = st
                .backups
                .values()
                .filter(|b| b.info.volume_id == req.volume.as_str())
                .filter(|b| b.info.repository == repository)
                .max_by_key(|b| b.info.created_at)
                .map(|b| b.info.id.to_string());
            Some(latest.ok_or_else(|| {
                fake_err(
                    AgentErrorKind::FailedPrecondition,
                    format!("no backup of volume {} to build on", req.volume),
                )
            })?)
        } else {
            None
        };
        st.calls
            .push(format!("create_backup {} {}", req.id, req.volume));
        let now = SystemTime::now();
        let info = BackupInfo {
            id: req.id.clone(),
            repository,
            status: BackupState::Available,
            fail_reason: String::new(),
            volume_id: req.volume.to_string(),
            volume_size: vol.size,
            volume_type: vol.volume_type.clone(),
            parent_id: parent,
            dependents: Vec::new(),
            created_at: Some(now),
            completed_at: Some(now),
            chunk_size: Bytes::mib(4),
            compression: "none".into(),
            data_bytes: data.len() as u64,
            hole_bytes: vol.size.get().saturating_sub(data.len() as u64),
            stored_bytes: data.len() as u64,
            stored_chunks: 0,
            reused_chunks: 0,
            bytes_done: vol.size.get(),
            bytes_total: vol.size.get(),
        };
        st.backups.insert(
            req.id.to_string(),
            FakeBackup {
                info: info.clone(),
                data,
            },
        );
        Ok(fake_done(info))
    }

    async fn get_backup(&self, id: &BackupId) -> Result<BackupInfo, AgentClientError> {
        self.enter("get_backup").await?;
        self.list_backups(None)
            .await?
            .into_iter()
            .find(|b| &b.id == id)
            .ok_or_else(|| fake_err(AgentErrorKind::NotFound, format!("backup {id} not found")))
    }

    async fn list_backups(
        &self,
        volume: Option<&str>,
    ) -> Result<Vec<BackupInfo>, AgentClientError> {
        self.enter("list_backups").await?;
        let st = self.lock();
        let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for b in st.backups.values() {
            if let Some(p) = &b.info.parent_id {
                deps.entry(p.clone())
                    .or_default()
                    .push(b.info.id.to_string());
            }
        }
        Ok(st
            .backups
            .values()
            .filter(|b| volume.is_none_or(|v| b.info.volume_id == v))
            .map(|b| BackupInfo {
                dependents: deps.get(b.info.id.as_str()).cloned().unwrap_or_default(),
                ..b.info.clone()
            })
            .collect())
    }

    async fn delete_backup(&self, id: &BackupId) -> Result<(), AgentClientError> {
        self.enter("delete_backup").await?;
        let mut st = self.lock();
        if let Some(dep) = st
            .backups
            .values()
            .find(|b| b.info.parent_id.as_deref() == Some(id.as_str()))
        {
            return Err(fake_err(
                AgentErrorKind::FailedPrecondition,
                format!("backup {id} has dependent backups: {}", dep.info.id),
            ));
        }
        st.calls.push(format!("delete_backup {id}"));
        st.backups.remove(id.as_str());
        Ok(())
    }

    async fn restore_backup(
        &self,
        id: &BackupId,
        volume: &VolumeId,
    ) -> Result<ProgressStream, AgentClientError> {
        self.enter("restore_backup").await?;
        let mut st = self.lock();
        let b =
            st.backups.get(id.as_str()).cloned().ok_or_else(|| {
                fake_err(AgentErrorKind::NotFound, format!("backup {id} not found"))
            })?;
        let (vol, data) = st
            .volumes
            .get_mut(volume)
            .ok_or_else(|| super::not_found_volume(volume))?;
        if vol.size < b.info.volume_size {
            return Err(fake_err(
                AgentErrorKind::FailedPrecondition,
                format!("volume {volume} is smaller than backup {id}'s volume"),
            ));
        }
        *data = b.data.clone();
        vol.metadata.remove(crate::agent::service::STATUS_KEY);
        st.calls.push(format!("restore_backup {id} {volume}"));
        Ok(fake_done(b.info))
    }

    async fn export_backup_record(
        &self,
        id: &BackupId,
    ) -> Result<(String, String), AgentClientError> {
        let b = self.get_backup(id).await?;
        Ok((b.repository.clone(), format!("fake-record:{id}")))
    }

    async fn import_backup_record(
        &self,
        record: &str,
        _repository: Option<&str>,
    ) -> Result<BackupInfo, AgentClientError> {
        let id = record
            .strip_prefix("fake-record:")
            .and_then(|id| BackupId::parse(id).ok())
            .ok_or_else(|| fake_err(AgentErrorKind::InvalidArgument, "not a record"))?;
        self.get_backup(&id).await
    }

    async fn list_backup_repositories(&self) -> Result<Vec<RepositoryInfo>, AgentClientError> {
        self.enter("list_backup_repositories").await?;
        Ok(self
            .fake_repositories()
            .into_iter()
            .enumerate()
            .map(|(i, name)| RepositoryInfo {
                location: format!("memory://{name}"),
                name,
                is_default: i == 0,
            })
            .collect())
    }
}
