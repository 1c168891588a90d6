//! The operator API's backup RPCs: parse → [`Controller`]'s backup operations → map. The
//! progress of a backup or restore is the agent's, relayed message by message.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use tonic::Status;

use super::service::timestamp;
use crate::agent_rpc::client::BackupProgress;
use crate::controller::{
    BackupEntry, BackupRequest, Controller, NewRestoreVolume, RestoreTarget, Started,
};
use crate::csi::status::to_status;
use crate::proto::operator as pb;
use crate::types::Bytes;

/// A stream of progress messages.
pub type ProgressStream = Pin<Box<dyn Stream<Item = Result<pb::BackupProgress, Status>> + Send>>;

/// The wire backup of a merged report.
pub fn backup_to_pb(b: &BackupEntry) -> pb::Backup {
    let i = &b.info;
    pb::Backup {
        id: i.id.to_string(),
        repository: i.repository.clone(),
        status: i.status.as_str().to_owned(),
        fail_reason: i.fail_reason.clone(),
        volume_id: i.volume_id.clone(),
        volume_size_bytes: i.volume_size.get(),
        volume_type: i.volume_type.clone(),
        parent_id: i.parent_id.clone().unwrap_or_default(),
        dependent_ids: i.dependents.clone(),
        created_at: i.created_at.map(timestamp),
        completed_at: i.completed_at.map(timestamp),
        data_bytes: i.data_bytes,
        hole_bytes: i.hole_bytes,
        stored_bytes: i.stored_bytes,
        stored_chunks: i.stored_chunks,
        reused_chunks: i.reused_chunks,
        bytes_done: i.bytes_done,
        bytes_total: i.bytes_total,
        agents: b.agents.clone(),
        chunk_bytes: i.chunk_size.get(),
        compression: i.compression.clone(),
    }
}

fn progress_to_pb(s: &Started, p: BackupProgress) -> pb::BackupProgress {
    pb::BackupProgress {
        backup_id: s.backup.to_string(),
        volume_id: s.volume.to_string(),
        agent: s.agent.clone(),
        bytes_done: p.done,
        bytes_total: p.total,
        stored_bytes: p.stored,
        done: p.finished.is_some(),
        backup: p.finished.map(|info| {
            backup_to_pb(&BackupEntry {
                info,
                agent: s.agent.clone(),
                agents: vec![s.agent.clone()],
            })
        }),
    }
}

/// The wire stream of a started operation.
pub fn progress_stream(mut s: Started) -> ProgressStream {
    let progress = std::mem::replace(&mut s.progress, Box::pin(futures::stream::empty()));
    Box::pin(progress.map(move |step| match step {
        Ok(p) => Ok(progress_to_pb(&s, p)),
        Err(e) => Err(to_status(e)),
    }))
}

fn opt(s: String) -> Option<String> {
    Some(s).filter(|s| !s.is_empty())
}

/// CreateBackup.
pub async fn create(c: &Controller, r: pb::CreateBackupRequest) -> Result<ProgressStream, Status> {
    if r.volume.is_empty() {
        return Err(Status::invalid_argument("volume is required"));
    }
    let started = c
        .create_backup(BackupRequest {
            volume: r.volume,
            name: opt(r.name),
            repository: opt(r.repository),
            incremental: r.incremental,
            force: r.force,
        })
        .await
        .map_err(to_status)?;
    Ok(progress_stream(started))
}

/// RestoreBackup.
pub async fn restore(
    c: &Controller,
    r: pb::RestoreBackupRequest,
) -> Result<ProgressStream, Status> {
    use pb::restore_backup_request::Target;
    if r.backup_id.is_empty() {
        return Err(Status::invalid_argument("backup_id is required"));
    }
    let target = match r.target {
        Some(Target::Volume(v)) if !v.is_empty() => RestoreTarget::Existing(v),
        Some(Target::NewVolume(n)) => RestoreTarget::New(NewRestoreVolume {
            volume_type: opt(n.volume_type),
            zone: opt(n.zone),
            name: opt(n.name),
            size: Some(Bytes(n.size_bytes)).filter(|b| b.get() > 0),
        }),
        Some(Target::Volume(_)) | None => {
            return Err(Status::invalid_argument(
                "set the target: an existing volume, or a new volume",
            ))
        }
    };
    let started = c
        .restore_backup(&r.backup_id, target)
        .await
        .map_err(to_status)?;
    Ok(progress_stream(started))
}

/// ListBackups.
pub async fn list(
    c: &Controller,
    r: pb::ListBackupsRequest,
) -> Result<pb::ListBackupsResponse, Status> {
    let volume = opt(r.volume_id);
    let backups = c.list_backups(volume.as_deref()).await.map_err(to_status)?;
    Ok(pb::ListBackupsResponse {
        backups: backups.iter().map(backup_to_pb).collect(),
    })
}

/// GetBackup.
pub async fn get(c: &Controller, r: pb::GetBackupRequest) -> Result<pb::Backup, Status> {
    let b = c.get_backup(&r.backup_id).await.map_err(to_status)?;
    Ok(backup_to_pb(&b))
}

/// DeleteBackup: an unknown backup is NOT_FOUND here (an operator typed it), unlike CSI.
pub async fn delete(
    c: &Controller,
    r: pb::DeleteBackupRequest,
) -> Result<pb::DeleteBackupResponse, Status> {
    if c.delete_backup(&r.backup_id).await.map_err(to_status)? {
        Ok(pb::DeleteBackupResponse {})
    } else {
        Err(Status::not_found(format!(
            "backup {} not found",
            r.backup_id
        )))
    }
}

/// ExportBackupRecord.
pub async fn export(
    c: &Controller,
    r: pb::ExportBackupRecordRequest,
) -> Result<pb::BackupRecord, Status> {
    let (repository, record) = c
        .export_backup_record(&r.backup_id)
        .await
        .map_err(to_status)?;
    Ok(pb::BackupRecord { repository, record })
}

/// ImportBackupRecord.
pub async fn import(
    c: &Controller,
    r: pb::ImportBackupRecordRequest,
) -> Result<pb::Backup, Status> {
    let b = c
        .import_backup_record(r.record.trim(), opt(r.repository).as_deref())
        .await
        .map_err(to_status)?;
    Ok(backup_to_pb(&b))
}
