//! The backup side of the agent API as the controller's Kubernetes reconcilers use it:
//! [`BackupAgent`] speaks domain types; [`GrpcBackupAgent`] is its tonic implementation.
//! (Kept apart from [`super::client::StorageAgent`], whose callers never back up.)

use std::pin::Pin;

use futures::{Stream, StreamExt};

use super::client::{kind_of, AgentClientError, AgentErrorKind};
use crate::proto::agent as pb;
use crate::proto::agent::agent_client::AgentClient;
use crate::tls::ClientTls;
use crate::transport::{self, Endpoint, TransportError};

/// A backup's state as its agent reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackupState {
    /// Being written.
    Creating,
    /// Complete.
    Available,
    /// Failed or unfinished.
    Error,
    /// Complete, being restored.
    Restoring,
    /// Not reported.
    Unknown,
}

/// A backup as its agent reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupInfo {
    /// Id.
    pub id: String,
    /// Repository holding it.
    pub repository: String,
    /// State.
    pub state: BackupState,
    /// Why it is in error.
    pub fail_reason: String,
    /// The backed-up volume.
    pub volume_id: String,
    /// Size of the backed-up volume in bytes.
    pub volume_size: u64,
    /// The backup it builds on (empty: full).
    pub parent_id: String,
    /// Backups building on it.
    pub dependent_ids: Vec<String>,
    /// Bytes stored in the repository.
    pub stored_bytes: u64,
}

/// One message of a backup or restore stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Bytes of the volume covered.
    pub bytes_done: u64,
    /// Of this many.
    pub bytes_total: u64,
    /// Bytes stored so far (backups).
    pub stored_bytes: u64,
    /// The backup, on the last message.
    pub done: Option<BackupInfo>,
}

/// A stream of progress messages ending with the backup, or an error.
pub type ProgressStream = Pin<Box<dyn Stream<Item = Result<Progress, AgentClientError>> + Send>>;

/// What a new backup is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewBackup {
    /// Id (chosen by the caller: a retry finds the same backup).
    pub id: String,
    /// The volume.
    pub volume_id: String,
    /// Repository (empty: the agent's default).
    pub repository: String,
    /// Only what changed since the volume's latest backup.
    pub incremental: bool,
    /// Back up an exported volume through a temporary snapshot.
    pub force: bool,
}

/// Backups on one agent.
#[async_trait::async_trait]
pub trait BackupAgent: Send + Sync + std::fmt::Debug {
    /// Starts (or, with the same id and volume, rejoins) a backup.
    async fn create_backup(&self, req: NewBackup) -> Result<ProgressStream, AgentClientError>;
    /// The backup `id` (NOT_FOUND when no repository of the agent has it).
    async fn get_backup(&self, id: &str) -> Result<BackupInfo, AgentClientError>;
    /// Deletes a backup (FAILED_PRECONDITION while incrementals depend on it).
    async fn delete_backup(&self, id: &str) -> Result<(), AgentClientError>;
    /// Restores backup `id` onto the agent's volume `volume_id`.
    async fn restore_backup(
        &self,
        id: &str,
        volume_id: &str,
    ) -> Result<ProgressStream, AgentClientError>;
}

/// [`BackupAgent`] over gRPC.
#[derive(Clone, Debug)]
pub struct GrpcBackupAgent {
    client: AgentClient<tonic::transport::Channel>,
}

impl GrpcBackupAgent {
    /// A lazily connected client of the agent at `endpoint`.
    pub async fn connect(
        endpoint: &Endpoint,
        tls: Option<&ClientTls>,
    ) -> Result<Self, TransportError> {
        let channel = transport::connect_tls(endpoint, true, tls).await?;
        Ok(GrpcBackupAgent {
            client: AgentClient::new(channel).max_decoding_message_size(64 << 20),
        })
    }
}

fn from_status(s: tonic::Status) -> AgentClientError {
    AgentClientError::new(kind_of(s.code()), s.message())
}

fn info(b: pb::Backup) -> BackupInfo {
    let state = match pb::BackupStatus::try_from(b.status) {
        Ok(pb::BackupStatus::Creating) => BackupState::Creating,
        Ok(pb::BackupStatus::Available) => BackupState::Available,
        Ok(pb::BackupStatus::Error) => BackupState::Error,
        Ok(pb::BackupStatus::Restoring) => BackupState::Restoring,
        Ok(pb::BackupStatus::Unspecified) | Err(_) => BackupState::Unknown,
    };
    BackupInfo {
        id: b.id,
        repository: b.repository,
        state,
        fail_reason: b.fail_reason,
        volume_id: b.volume_id,
        volume_size: b.volume_size_bytes,
        parent_id: b.parent_id,
        dependent_ids: b.dependent_ids,
        stored_bytes: b.stored_bytes,
    }
}

fn progress_stream(s: tonic::Streaming<pb::BackupProgress>) -> ProgressStream {
    Box::pin(s.map(|m| match m {
        Ok(m) => Ok(Progress {
            bytes_done: m.bytes_done,
            bytes_total: m.bytes_total,
            stored_bytes: m.stored_bytes,
            done: if m.done { m.backup.map(info) } else { None },
        }),
        Err(s) => Err(from_status(s)),
    }))
}

#[async_trait::async_trait]
impl BackupAgent for GrpcBackupAgent {
    async fn create_backup(&self, req: NewBackup) -> Result<ProgressStream, AgentClientError> {
        let s = self
            .client
            .clone()
            .create_backup(pb::CreateBackupRequest {
                backup_id: req.id,
                volume_id: req.volume_id,
                repository: req.repository,
                incremental: req.incremental,
                force: req.force,
            })
            .await
            .map_err(from_status)?;
        Ok(progress_stream(s.into_inner()))
    }

    async fn get_backup(&self, id: &str) -> Result<BackupInfo, AgentClientError> {
        let b = self
            .client
            .clone()
            .get_backup(pb::GetBackupRequest {
                backup_id: id.to_owned(),
            })
            .await
            .map_err(from_status)?;
        Ok(info(b.into_inner()))
    }

    async fn delete_backup(&self, id: &str) -> Result<(), AgentClientError> {
        match self
            .client
            .clone()
            .delete_backup(pb::DeleteBackupRequest {
                backup_id: id.to_owned(),
            })
            .await
        {
            Ok(_) => Ok(()),
            // Already gone: what a delete wants.
            Err(s) if kind_of(s.code()) == AgentErrorKind::NotFound => Ok(()),
            Err(s) => Err(from_status(s)),
        }
    }

    async fn restore_backup(
        &self,
        id: &str,
        volume_id: &str,
    ) -> Result<ProgressStream, AgentClientError> {
        let s = self
            .client
            .clone()
            .restore_backup(pb::RestoreBackupRequest {
                backup_id: id.to_owned(),
                volume_id: volume_id.to_owned(),
            })
            .await
            .map_err(from_status)?;
        Ok(progress_stream(s.into_inner()))
    }
}
