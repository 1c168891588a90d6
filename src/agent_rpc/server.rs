//! The agent API server: parse → call [`AgentService`] → map. Nothing else happens here.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use futures::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::status::to_status;
use crate::agent::backend::{Capacity, SnapshotRecord, Source, VolumeRecord};
use crate::agent::data::{self, Chunk};
use crate::agent::service::{AgentService, CreateVolume, DataSource, PoolReport};
use crate::agent::{AgentError, Iqn, SnapshotId, VolumeId};
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
}

fn vid(s: &str) -> Result<VolumeId, Status> {
    VolumeId::parse(s).map_err(to_status)
}

fn sid(s: &str) -> Result<SnapshotId, Status> {
    SnapshotId::parse(s).map_err(to_status)
}

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

fn volume_to_pb(v: VolumeRecord, snapshot_count: u32) -> pb::Volume {
    let status = if v.exported_to.is_empty() {
        pb::VolumeStatus::Available
    } else {
        pb::VolumeStatus::InUse
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
        let n = self.agent.snapshots_of(&v.id);
        Ok(Response::new(volume_to_pb(v, n)))
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
        Ok(Response::new(volume_to_pb(v, self.agent.snapshots_of(&id))))
    }

    async fn get_volume(
        &self,
        r: Request<pb::GetVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let id = vid(&r.get_ref().volume_id)?;
        let v = self.agent.get_volume(&id).map_err(to_status)?;
        Ok(Response::new(volume_to_pb(v, self.agent.snapshots_of(&id))))
    }

    async fn list_volumes(
        &self,
        r: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let pool = Some(r.get_ref().pool.as_str()).filter(|p| !p.is_empty());
        let vols = self.agent.list_volumes(pool).map_err(to_status)?;
        let volumes = vols
            .into_iter()
            .map(|v| {
                let n = self.agent.snapshots_of(&v.id);
                volume_to_pb(v, n)
            })
            .collect();
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
        Ok(Response::new(volume_to_pb(v, self.agent.snapshots_of(&id))))
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
}
