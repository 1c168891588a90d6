//! The agent API server: parse → call [`AgentService`] → map. Nothing else happens here.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use futures::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::status::{status_of, to_status};
use crate::agent::backend::{Capacity, SnapshotRecord, Source, VolumeRecord};
use crate::agent::data::{self, Chunk};
use crate::agent::service::{
    AgentService, BackupStatus, BackupView, CreateBackup, CreateVolume, DataSource, PoolReport,
    Running, VolumeState,
};
use crate::agent::{AgentError, BackupId, Iqn, SnapshotId, VolumeId};
use crate::backup::format::Compression;
use crate::config::PoolKindConfig;
use crate::proto::agent as pb;
use crate::types::Bytes;

/// The tonic service wrapping the agent domain.
#[derive(Debug, Clone)]
pub struct AgentApi {
    agent: Arc<AgentService>,
}

impl AgentApi {
    /// Serves `agent`.
    pub fn new(agent: Arc<AgentService>) -> Self {
        AgentApi { agent }
    }

    fn volume_pb(&self, v: VolumeRecord) -> pb::Volume {
        let n = self.agent.snapshots_of(&v.id);
        let state = self.agent.volume_state(&v);
        volume_to_pb(v, n, state)
    }
}

fn vid(s: &str) -> Result<VolumeId, Status> {
    VolumeId::parse(s).map_err(to_status)
}

fn sid(s: &str) -> Result<SnapshotId, Status> {
    SnapshotId::parse(s).map_err(to_status)
}

fn bid(s: &str) -> Result<BackupId, Status> {
    BackupId::parse(s).map_err(to_status)
}

/// How often a CreateBackup or RestoreBackup stream reports progress.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

fn timestamp(t: std::time::SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn capacity(c: Capacity) -> pb::Capacity {
    use pb::capacity::Value;
    pb::Capacity {
        value: Some(match c {
            Capacity::Known(b) => Value::Bytes(b.0),
            Capacity::Unknown => Value::Unknown(true),
            Capacity::Infinite => Value::Infinite(true),
        }),
    }
}

/// Wire form of a pool report.
pub fn pool_to_pb(p: PoolReport) -> pb::Pool {
    let kind = match p.cfg.kind {
        PoolKindConfig::File => pb::PoolKind::File,
        PoolKindConfig::LvmThick => pb::PoolKind::LvmThick,
        PoolKindConfig::LvmThin => pb::PoolKind::LvmThin,
    };
    // Thin and file pools allocate on write; thick pools allocate at create.
    let thin = p.cfg.kind != PoolKindConfig::LvmThick;
    let mut caps = p.cfg.capabilities.clone();
    caps.insert("pool_name".into(), p.cfg.name.clone());
    caps.insert("storage_protocol".into(), "iSCSI".into());
    caps.insert(
        "thin_provisioning".into(),
        if thin { "True" } else { "False" }.into(),
    );
    caps.insert(
        "thick_provisioning".into(),
        if thin { "False" } else { "True" }.into(),
    );
    caps.entry("multiattach".into())
        .or_insert_with(|| "True".into());
    let (stats, healthy, reason) = match p.stats {
        Ok(s) => (Some(s), true, String::new()),
        Err(e) => (None, false, e),
    };
    pb::Pool {
        name: p.cfg.name.clone(),
        kind: kind as i32,
        zone: p.cfg.zone.clone(),
        total: Some(capacity(
            stats.as_ref().map_or(Capacity::Unknown, |s| s.total),
        )),
        free: Some(capacity(
            stats.as_ref().map_or(Capacity::Unknown, |s| s.free),
        )),
        provisioned_bytes: stats.as_ref().map_or(0, |s| s.provisioned.0),
        allocated_bytes: stats.as_ref().map_or(0, |s| s.allocated.0),
        thin_provisioning: thin,
        thick_provisioning: !thin,
        max_over_subscription_ratio: if thin {
            p.cfg.max_over_subscription_ratio
        } else {
            1.0
        },
        reserved_percentage: p.cfg.reserved_percentage,
        capabilities: caps.into_iter().collect(),
        volume_count: stats.as_ref().map_or(0, |s| s.volume_count),
        snapshot_count: stats.as_ref().map_or(0, |s| s.snapshot_count),
        extent_bytes: p.extent.0,
        portals: p.portals,
        healthy,
        unhealthy_reason: reason,
    }
}

fn volume_to_pb(v: VolumeRecord, snapshot_count: u32, state: VolumeState) -> pb::Volume {
    let status = match state {
        VolumeState::Available => pb::VolumeStatus::Available,
        VolumeState::InUse => pb::VolumeStatus::InUse,
        VolumeState::BackingUp => pb::VolumeStatus::BackingUp,
        VolumeState::Restoring => pb::VolumeStatus::Restoring,
        VolumeState::Error => pb::VolumeStatus::Error,
    };
    pb::Volume {
        id: v.id.to_string(),
        pool: v.pool,
        size_bytes: v.size.0,
        status: status as i32,
        volume_type: v.volume_type,
        source: v.source.map(|s| match s {
            Source::Snapshot(s) => pb::volume::Source::SourceSnapshotId(s.to_string()),
            Source::Volume(v) => pb::volume::Source::SourceVolumeId(v.to_string()),
        }),
        exported_to: v.exported_to,
        snapshot_count,
        metadata: v.metadata.into_iter().collect(),
        created_at: Some(timestamp(v.created_at)),
        allocated_bytes: v.allocated.0,
    }
}

fn snapshot_to_pb(s: SnapshotRecord) -> pb::Snapshot {
    pb::Snapshot {
        id: s.id.to_string(),
        source_volume_id: s.source_volume.to_string(),
        pool: s.pool,
        size_bytes: s.size.0,
        created_at: Some(timestamp(s.created_at)),
        ready_to_use: true,
        metadata: s.metadata.into_iter().collect(),
    }
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

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::DataChunk, Status>> + Send>>;
type ProgressStream = Pin<Box<dyn Stream<Item = Result<pb::BackupProgress, Status>> + Send>>;

fn time_pb(secs: u64) -> Option<prost_types::Timestamp> {
    (secs > 0).then_some(prost_types::Timestamp {
        seconds: secs as i64,
        nanos: 0,
    })
}

/// Wire form of a backup.
pub fn backup_to_pb(b: BackupView) -> pb::Backup {
    let status = match b.status {
        BackupStatus::Creating => pb::BackupStatus::Creating,
        BackupStatus::Available => pb::BackupStatus::Available,
        BackupStatus::Error => pb::BackupStatus::Error,
        BackupStatus::Restoring => pb::BackupStatus::Restoring,
    };
    let compression = match b.compression {
        None => pb::BackupCompression::Unspecified,
        Some(Compression::None) => pb::BackupCompression::None,
        Some(Compression::Zstd) => pb::BackupCompression::Zstd,
    };
    pb::Backup {
        id: b.id.to_string(),
        repository: b.repository,
        status: status as i32,
        fail_reason: b.fail_reason,
        volume_id: b.volume_id,
        volume_size_bytes: b.volume_size,
        volume_type: b.volume_type,
        parent_id: b.parent_id.unwrap_or_default(),
        dependent_ids: b.dependents,
        created_at: time_pb(b.created_at),
        completed_at: time_pb(b.completed_at),
        chunk_bytes: b.chunk_size,
        compression: compression as i32,
        data_bytes: b.stats.data_bytes,
        hole_bytes: b.stats.hole_bytes,
        stored_bytes: b.stats.stored_bytes,
        stored_chunks: b.stats.stored_chunks,
        reused_chunks: b.stats.reused_chunks,
        bytes_done: b.bytes_done,
        bytes_total: b.bytes_total,
    }
}

/// The progress of a running backup or restore every [`PROGRESS_EVERY`], then its result.
fn progress_stream(r: Running) -> ProgressStream {
    let out = async_stream::stream! {
        let mut outcome = r.outcome;
        loop {
            let ended = outcome.borrow_and_update().clone();
            match ended {
                Some(Ok(b)) => {
                    yield Ok(pb::BackupProgress {
                        backup_id: r.id.to_string(),
                        bytes_done: r.progress.done().max(b.bytes_done),
                        bytes_total: r.progress.total().max(b.bytes_total),
                        stored_bytes: r.progress.stored(),
                        done: true,
                        backup: Some(backup_to_pb(b)),
                    });
                    break;
                }
                Some(Err(e)) => {
                    yield Err(status_of(&e));
                    break;
                }
                None => {}
            }
            yield Ok(pb::BackupProgress {
                backup_id: r.id.to_string(),
                bytes_done: r.progress.done(),
                bytes_total: r.progress.total(),
                stored_bytes: r.progress.stored(),
                done: false,
                backup: None,
            });
            tokio::select! {
                changed = outcome.changed() => {
                    if changed.is_err() && outcome.borrow().is_none() {
                        yield Err(Status::internal(format!("the task of backup {} ended without a result", r.id)));
                        break;
                    }
                }
                _ = tokio::time::sleep(PROGRESS_EVERY) => {}
            }
        }
    };
    Box::pin(out)
}

#[tonic::async_trait]
impl pb::agent_server::Agent for AgentApi {
    async fn get_info(
        &self,
        _r: Request<pb::GetInfoRequest>,
    ) -> Result<Response<pb::GetInfoResponse>, Status> {
        let ready = self.agent.ready().await;
        Ok(Response::new(pb::GetInfoResponse {
            name: self.agent.name().to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ready: ready.is_ok(),
            not_ready_reason: ready.err().map(|e| e.to_string()).unwrap_or_default(),
            pools: self.agent.pool_names(),
        }))
    }

    async fn list_pools(
        &self,
        _r: Request<pb::ListPoolsRequest>,
    ) -> Result<Response<pb::ListPoolsResponse>, Status> {
        let pools = self
            .agent
            .pools()
            .await
            .into_iter()
            .map(pool_to_pb)
            .collect();
        Ok(Response::new(pb::ListPoolsResponse { pools }))
    }

    async fn create_volume(
        &self,
        r: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = r.into_inner();
        let source = match r.source {
            None => None,
            Some(pb::create_volume_request::Source::SourceSnapshotId(s)) => {
                Some(Source::Snapshot(sid(&s)?))
            }
            Some(pb::create_volume_request::Source::SourceVolumeId(v)) => {
                Some(Source::Volume(vid(&v)?))
            }
        };
        let req = CreateVolume {
            id: vid(&r.volume_id)?,
            pool: r.pool,
            size: Bytes(r.size_bytes),
            volume_type: r.volume_type,
            metadata: r.metadata.into_iter().collect(),
            source,
        };
        let v = self.agent.create_volume(req).await.map_err(to_status)?;
        Ok(Response::new(self.volume_pb(v)))
    }

    async fn delete_volume(
        &self,
        r: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        self.agent
            .delete_volume(&vid(&r.get_ref().volume_id)?)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::DeleteVolumeResponse {}))
    }

    async fn extend_volume(
        &self,
        r: Request<pb::ExtendVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = r.into_inner();
        let id = vid(&r.volume_id)?;
        let v = self
            .agent
            .extend_volume(&id, Bytes(r.new_size_bytes))
            .await
            .map_err(to_status)?;
        Ok(Response::new(self.volume_pb(v)))
    }

    async fn get_volume(
        &self,
        r: Request<pb::GetVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let id = vid(&r.get_ref().volume_id)?;
        let v = self.agent.get_volume(&id).map_err(to_status)?;
        Ok(Response::new(self.volume_pb(v)))
    }

    async fn list_volumes(
        &self,
        r: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let pool = Some(r.get_ref().pool.as_str()).filter(|p| !p.is_empty());
        let vols = self.agent.list_volumes(pool).map_err(to_status)?;
        let volumes = vols.into_iter().map(|v| self.volume_pb(v)).collect();
        Ok(Response::new(pb::ListVolumesResponse { volumes }))
    }

    async fn update_volume(
        &self,
        r: Request<pb::UpdateVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = r.into_inner();
        let id = vid(&r.volume_id)?;
        let vt = Some(r.volume_type.as_str()).filter(|t| !t.is_empty());
        let md: BTreeMap<String, String> = r.metadata.into_iter().collect();
        let v = self
            .agent
            .update_volume(&id, vt, r.replace_metadata.then_some(&md))
            .await
            .map_err(to_status)?;
        Ok(Response::new(self.volume_pb(v)))
    }

    async fn create_snapshot(
        &self,
        r: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::Snapshot>, Status> {
        let r = r.into_inner();
        let s = self
            .agent
            .create_snapshot(
                sid(&r.snapshot_id)?,
                &vid(&r.source_volume_id)?,
                r.metadata.into_iter().collect(),
            )
            .await
            .map_err(to_status)?;
        Ok(Response::new(snapshot_to_pb(s)))
    }

    async fn delete_snapshot(
        &self,
        r: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        self.agent
            .delete_snapshot(&sid(&r.get_ref().snapshot_id)?)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::DeleteSnapshotResponse {}))
    }

    async fn get_snapshot(
        &self,
        r: Request<pb::GetSnapshotRequest>,
    ) -> Result<Response<pb::Snapshot>, Status> {
        let s = self
            .agent
            .get_snapshot(&sid(&r.get_ref().snapshot_id)?)
            .map_err(to_status)?;
        Ok(Response::new(snapshot_to_pb(s)))
    }

    async fn list_snapshots(
        &self,
        r: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let src = &r.get_ref().source_volume_id;
        let src = if src.is_empty() {
            None
        } else {
            Some(vid(src)?)
        };
        let snapshots = self
            .agent
            .list_snapshots(src.as_ref())
            .into_iter()
            .map(snapshot_to_pb)
            .collect();
        Ok(Response::new(pb::ListSnapshotsResponse { snapshots }))
    }

    async fn export_volume(
        &self,
        r: Request<pb::ExportVolumeRequest>,
    ) -> Result<Response<pb::Export>, Status> {
        let r = r.into_inner();
        let initiator = Iqn::parse(&r.initiator_iqn).map_err(to_status)?;
        let e = self
            .agent
            .export_volume(&vid(&r.volume_id)?, &initiator)
            .await
            .map_err(to_status)?;
        tracing::info!(volume = %r.volume_id, initiator = %initiator, host = %r.host, target = %e.target_iqn, "exported");
        Ok(Response::new(pb::Export {
            target_iqn: e.target_iqn,
            portals: e.portals,
            lun: e.lun,
            chap_username: e.chap.username,
            chap_secret: e.chap.secret,
        }))
    }

    async fn unexport_volume(
        &self,
        r: Request<pb::UnexportVolumeRequest>,
    ) -> Result<Response<pb::UnexportVolumeResponse>, Status> {
        let r = r.into_inner();
        let initiator = if r.initiator_iqn.is_empty() {
            None
        } else {
            Some(Iqn::parse(&r.initiator_iqn).map_err(to_status)?)
        };
        self.agent
            .unexport_volume(&vid(&r.volume_id)?, initiator.as_ref())
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::UnexportVolumeResponse {}))
    }

    type ReadVolumeStream = ChunkStream;

    async fn read_volume(
        &self,
        r: Request<pb::ReadVolumeRequest>,
    ) -> Result<Response<Self::ReadVolumeStream>, Status> {
        let r = r.into_inner();
        let src = match r.source {
            Some(pb::read_volume_request::Source::VolumeId(v)) => DataSource::Volume(vid(&v)?),
            Some(pb::read_volume_request::Source::SnapshotId(s)) => DataSource::Snapshot(sid(&s)?),
            None => {
                return Err(Status::invalid_argument(
                    "a volume_id or snapshot_id is required",
                ))
            }
        };
        let (path, _size) = self.agent.data_path(&src).map_err(to_status)?;
        let chunk = if r.chunk_bytes == 0 {
            data::DEFAULT_CHUNK
        } else {
            r.chunk_bytes as usize
        };
        if chunk > 16 * data::DEFAULT_CHUNK {
            return Err(Status::invalid_argument(
                "chunk_bytes must be at most 16 MiB",
            ));
        }
        let mut rx = data::read_stream(path, chunk, 4);
        let out = async_stream::stream! {
            while let Some(c) = rx.recv().await {
                yield c.map(chunk_to_pb).map_err(to_status);
            }
        };
        Ok(Response::new(Box::pin(out)))
    }

    async fn write_volume(
        &self,
        r: Request<Streaming<pb::WriteVolumeRequest>>,
    ) -> Result<Response<pb::WriteVolumeResponse>, Status> {
        let mut stream = r.into_inner();
        let target = match stream.message().await? {
            Some(pb::WriteVolumeRequest {
                item: Some(pb::write_volume_request::Item::Target(t)),
            }) => t,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message must name the target volume",
                ))
            }
        };
        let id = vid(&target.volume_id)?;
        let (guard, path, size, holes_zero) = self.agent.begin_write(&id).map_err(to_status)?;
        if target.size_bytes > size.0 {
            return Err(to_status(AgentError::InvalidArgument(format!(
                "the stream covers {} bytes but volume {id} has {}",
                target.size_bytes, size.0
            ))));
        }
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Chunk>(4);
        let writer = tokio::task::spawn_blocking(move || {
            let _guard = guard;
            let mut w = data::ChunkWriter::open(&path, holes_zero)?;
            while let Some(c) = rx.blocking_recv() {
                w.write(&c, size.0)?;
            }
            w.finish()
        });
        while let Some(m) = stream.message().await? {
            match m.item {
                Some(pb::write_volume_request::Item::Chunk(c)) => {
                    if tx.send(chunk_from_pb(c)).await.is_err() {
                        break; // the writer failed; its error is reported below
                    }
                }
                _ => {
                    return Err(Status::invalid_argument(
                        "only data chunks may follow the target",
                    ))
                }
            }
        }
        drop(tx);
        let (written, holes) = writer
            .await
            .map_err(|e| Status::internal(format!("writer task: {e}")))?
            .map_err(to_status)?;
        Ok(Response::new(pb::WriteVolumeResponse {
            bytes_written: written,
            hole_bytes: holes,
        }))
    }

    type CreateBackupStream = ProgressStream;

    async fn create_backup(
        &self,
        r: Request<pb::CreateBackupRequest>,
    ) -> Result<Response<Self::CreateBackupStream>, Status> {
        let r = r.into_inner();
        let req = CreateBackup {
            id: bid(&r.backup_id)?,
            volume: vid(&r.volume_id)?,
            repository: Some(r.repository).filter(|s| !s.is_empty()),
            incremental: r.incremental,
            force: r.force,
        };
        let running = self.agent.create_backup(req).await.map_err(to_status)?;
        Ok(Response::new(progress_stream(running)))
    }

    async fn get_backup(
        &self,
        r: Request<pb::GetBackupRequest>,
    ) -> Result<Response<pb::Backup>, Status> {
        let b = self
            .agent
            .get_backup(&bid(&r.get_ref().backup_id)?)
            .await
            .map_err(to_status)?;
        Ok(Response::new(backup_to_pb(b)))
    }

    async fn list_backups(
        &self,
        r: Request<pb::ListBackupsRequest>,
    ) -> Result<Response<pb::ListBackupsResponse>, Status> {
        let r = r.into_inner();
        let volume = if r.volume_id.is_empty() {
            None
        } else {
            Some(vid(&r.volume_id)?)
        };
        let backups = self
            .agent
            .list_backups(Some(r.repository.as_str()), volume.as_ref())
            .await
            .map_err(to_status)?
            .into_iter()
            .map(backup_to_pb)
            .collect();
        Ok(Response::new(pb::ListBackupsResponse { backups }))
    }

    async fn delete_backup(
        &self,
        r: Request<pb::DeleteBackupRequest>,
    ) -> Result<Response<pb::DeleteBackupResponse>, Status> {
        self.agent
            .delete_backup(&bid(&r.get_ref().backup_id)?)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::DeleteBackupResponse {}))
    }

    type RestoreBackupStream = ProgressStream;

    async fn restore_backup(
        &self,
        r: Request<pb::RestoreBackupRequest>,
    ) -> Result<Response<Self::RestoreBackupStream>, Status> {
        let r = r.into_inner();
        let running = self
            .agent
            .restore_backup(&bid(&r.backup_id)?, &vid(&r.volume_id)?)
            .await
            .map_err(to_status)?;
        Ok(Response::new(progress_stream(running)))
    }

    async fn export_backup_record(
        &self,
        r: Request<pb::ExportBackupRecordRequest>,
    ) -> Result<Response<pb::BackupRecord>, Status> {
        let (record, repository) = self
            .agent
            .export_backup_record(&bid(&r.get_ref().backup_id)?)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::BackupRecord { repository, record }))
    }

    async fn import_backup_record(
        &self,
        r: Request<pb::ImportBackupRecordRequest>,
    ) -> Result<Response<pb::Backup>, Status> {
        let r = r.into_inner();
        let b = self
            .agent
            .import_backup_record(&r.record, Some(r.repository.as_str()))
            .await
            .map_err(to_status)?;
        Ok(Response::new(backup_to_pb(b)))
    }

    async fn list_backup_repositories(
        &self,
        _r: Request<pb::ListBackupRepositoriesRequest>,
    ) -> Result<Response<pb::ListBackupRepositoriesResponse>, Status> {
        let (repos, default) = self.agent.backup_repositories();
        let repositories = repos
            .into_iter()
            .map(|(name, location)| pb::BackupRepository {
                is_default: default.as_deref() == Some(name.as_str()),
                name,
                location,
            })
            .collect();
        Ok(Response::new(pb::ListBackupRepositoriesResponse {
            repositories,
        }))
    }
}
