//! The tonic `Operator` service: parse → call the controller → map. Conversions from domain
//! views to wire messages are plain functions, tested below.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tonic::{Request, Response, Status};

use crate::agent_rpc::client::PoolKind;
use crate::controller::{
    ContentSource, Controller, PoolReport, SnapshotView, TypeReport, VolumeFilter, VolumeView,
};
use crate::csi::status::to_status;
use crate::proto::operator as pb;
use crate::proto::operator::operator_server::Operator;
use crate::scheduler::Capacity;

/// The operator API over the domain controller.
#[derive(Debug, Clone)]
pub struct OperatorService {
    controller: Arc<Controller>,
}

impl OperatorService {
    /// Serves `controller`.
    pub fn new(controller: Arc<Controller>) -> Self {
        OperatorService { controller }
    }
}

/// A wire timestamp.
pub fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// The wire spelling of a pool kind (the agent configuration's spelling).
pub fn kind_text(kind: Option<PoolKind>) -> &'static str {
    match kind {
        Some(PoolKind::LvmThick) => "lvm-thick",
        Some(PoolKind::LvmThin) => "lvm-thin",
        Some(PoolKind::File) => "file",
        Some(PoolKind::Unspecified) | None => "",
    }
}

fn capacity(c: Capacity) -> pb::Capacity {
    use pb::capacity::Value;
    pb::Capacity {
        value: Some(match c {
            Capacity::Known(b) => Value::Bytes(b.get()),
            Capacity::Unknown => Value::Unknown(true),
            Capacity::Infinite => Value::Infinite(true),
        }),
    }
}

/// The wire volume of a domain view.
pub fn volume_to_pb(v: &VolumeView) -> pb::Volume {
    use pb::volume::Source;
    pb::Volume {
        id: v.id.to_string(),
        name: v.name.clone().unwrap_or_default(),
        status: v.status.as_str().to_owned(),
        size_bytes: v.capacity.get(),
        volume_type: v.volume_type.clone(),
        pool: v.pool.clone(),
        agent: v.agent.clone(),
        zone: v.zone.clone(),
        source: v.source.as_ref().map(|s| match s {
            ContentSource::Snapshot(id) => Source::SourceSnapshotId(id.clone()),
            ContentSource::Volume(id) => Source::SourceVolumeId(id.clone()),
        }),
        attachments: v
            .attachments
            .iter()
            .map(|a| pb::Attachment {
                host: a.host.clone().unwrap_or_default(),
                initiator: a.initiator.clone(),
            })
            .collect(),
        created_at: v.created_at.map(timestamp),
        metadata: v.metadata.clone().into_iter().collect(),
        snapshot_count: v.snapshot_count,
        abnormal_reason: v.abnormal.clone().unwrap_or_default(),
    }
}

/// The wire snapshot of a domain view.
pub fn snapshot_to_pb(s: &SnapshotView) -> pb::Snapshot {
    pb::Snapshot {
        id: s.id.to_string(),
        name: s.name.clone().unwrap_or_default(),
        status: s.status.as_str().to_owned(),
        volume_id: s.source_volume.to_string(),
        size_bytes: s.size.get(),
        pool: s.pool.clone(),
        agent: s.agent.clone(),
        created_at: s.created_at.map(timestamp),
    }
}

/// The wire pool of a report.
pub fn pool_to_pb(p: &PoolReport) -> pb::Pool {
    pb::Pool {
        name: p.id.pool.clone(),
        agent: p.id.agent.clone(),
        zone: p.zone.clone(),
        kind: kind_text(p.kind).to_owned(),
        total: Some(capacity(p.total)),
        free: Some(capacity(p.free)),
        provisioned_bytes: p.provisioned.get(),
        allocated_bytes: p.allocated.get(),
        reserved_percentage: u32::from(p.reserved_percentage),
        max_over_subscription_ratio: p.max_over_subscription_ratio,
        thin_provisioning: p.thin_provisioning,
        thick_provisioning: p.thick_provisioning,
        volume_count: p.volume_count,
        snapshot_count: p.snapshot_count,
        capabilities: p.capabilities.clone().into_iter().collect(),
        healthy: p.healthy,
        unhealthy_reason: p.unhealthy_reason.clone().unwrap_or_default(),
        stats_age: p
            .stats_age
            .and_then(|d| prost_types::Duration::try_from(d).ok()),
        extent_bytes: p.extent.get(),
        portals: p.portals.clone(),
    }
}

/// The wire volume type of a report.
pub fn type_to_pb(t: &TypeReport) -> pb::VolumeType {
    pb::VolumeType {
        name: t.volume_type.name.clone(),
        description: t.volume_type.description.clone(),
        extra_specs: t.volume_type.extra_specs.clone().into_iter().collect(),
        is_default: t.is_default,
    }
}

fn page_size(n: u32) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

#[tonic::async_trait]
impl Operator for OperatorService {
    async fn list_volumes(
        &self,
        request: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let r = request.into_inner();
        let filter = VolumeFilter::parse(&r.pool, &r.status).map_err(to_status)?;
        let page = self
            .controller
            .inventory_volumes(&filter, page_size(r.max_entries), &r.page_token)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ListVolumesResponse {
            volumes: page.entries.iter().map(volume_to_pb).collect(),
            next_page_token: page.next_token.unwrap_or_default(),
        }))
    }

    async fn get_volume(
        &self,
        request: Request<pb::GetVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        use pb::get_volume_request::Key;
        let view = match request.into_inner().key {
            Some(Key::Id(id)) if !id.is_empty() => self.controller.get_volume(&id).await,
            Some(Key::Name(name)) if !name.is_empty() => {
                self.controller.volume_by_name(&name).await
            }
            Some(Key::Id(_) | Key::Name(_)) | None => {
                return Err(Status::invalid_argument("set the volume's id or its name"))
            }
        };
        Ok(Response::new(volume_to_pb(&view.map_err(to_status)?)))
    }

    async fn list_snapshots(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let r = request.into_inner();
        let page = self
            .controller
            .inventory_snapshots(&r.volume_id, page_size(r.max_entries), &r.page_token)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ListSnapshotsResponse {
            snapshots: page.entries.iter().map(snapshot_to_pb).collect(),
            next_page_token: page.next_token.unwrap_or_default(),
        }))
    }

    async fn list_pools(
        &self,
        _request: Request<pb::ListPoolsRequest>,
    ) -> Result<Response<pb::ListPoolsResponse>, Status> {
        Ok(Response::new(pb::ListPoolsResponse {
            pools: self
                .controller
                .pool_reports()
                .iter()
                .map(pool_to_pb)
                .collect(),
        }))
    }

    async fn list_types(
        &self,
        _request: Request<pb::ListTypesRequest>,
    ) -> Result<Response<pb::ListTypesResponse>, Status> {
        Ok(Response::new(pb::ListTypesResponse {
            types: self
                .controller
                .type_reports()
                .iter()
                .map(type_to_pb)
                .collect(),
        }))
    }

    type CreateBackupStream = super::backups::ProgressStream;

    async fn create_backup(
        &self,
        request: Request<pb::CreateBackupRequest>,
    ) -> Result<Response<Self::CreateBackupStream>, Status> {
        super::backups::create(&self.controller, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn list_backups(
        &self,
        request: Request<pb::ListBackupsRequest>,
    ) -> Result<Response<pb::ListBackupsResponse>, Status> {
        super::backups::list(&self.controller, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn get_backup(
        &self,
        request: Request<pb::GetBackupRequest>,
    ) -> Result<Response<pb::Backup>, Status> {
        super::backups::get(&self.controller, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn delete_backup(
        &self,
        request: Request<pb::DeleteBackupRequest>,
    ) -> Result<Response<pb::DeleteBackupResponse>, Status> {
        super::backups::delete(&self.controller, request.into_inner())
            .await
            .map(Response::new)
    }

    type RestoreBackupStream = super::backups::ProgressStream;

    async fn restore_backup(
        &self,
        request: Request<pb::RestoreBackupRequest>,
    ) -> Result<Response<Self::RestoreBackupStream>, Status> {
        super::backups::restore(&self.controller, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn export_backup_record(
        &self,
        request: Request<pb::ExportBackupRecordRequest>,
    ) -> Result<Response<pb::BackupRecord>, Status> {
        super::backups::export(&self.controller, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn import_backup_record(
        &self,
        request: Request<pb::ImportBackupRecordRequest>,
    ) -> Result<Response<pb::Backup>, Status> {
        super::backups::import(&self.controller, request.into_inner())
            .await
            .map(Response::new)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use super::*;
    use crate::agent::{SnapshotId, VolumeId};
    use crate::controller::{Attachment, CinderStatus, SnapshotStatus, VolumeType};
    use crate::scheduler::PoolRef;
    use crate::types::Bytes;

    fn vid(s: &str) -> VolumeId {
        VolumeId::parse(s).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn volume_fields_reach_the_wire() {
        let view = VolumeView {
            id: vid("v1"),
            name: Some("pvc-1".into()),
            capacity: Bytes::gib(2),
            agent: "a".into(),
            pool: "p".into(),
            zone: "z1".into(),
            volume_type: "ssd".into(),
            source: Some(ContentSource::Snapshot("s1".into())),
            published_nodes: vec!["n1/iqn.1993-08.org.debian:01:x".into()],
            attachments: vec![
                Attachment {
                    host: Some("n1".into()),
                    initiator: "iqn.1993-08.org.debian:01:x".into(),
                },
                Attachment {
                    host: None,
                    initiator: "iqn.1993-08.org.debian:01:y".into(),
                },
            ],
            abnormal: None,
            status: CinderStatus::InUse,
            snapshot_count: 3,
            created_at: Some(UNIX_EPOCH + Duration::new(1_700_000_000, 5)),
            metadata: BTreeMap::from([("csi.name".to_string(), "pvc-1".to_string())]),
        };
        let got = volume_to_pb(&view);
        let want = pb::Volume {
            id: "v1".into(),
            name: "pvc-1".into(),
            status: "in-use".into(),
            size_bytes: 2 << 30,
            volume_type: "ssd".into(),
            pool: "p".into(),
            agent: "a".into(),
            zone: "z1".into(),
            source: Some(pb::volume::Source::SourceSnapshotId("s1".into())),
            attachments: vec![
                pb::Attachment {
                    host: "n1".into(),
                    initiator: "iqn.1993-08.org.debian:01:x".into(),
                },
                pb::Attachment {
                    host: String::new(),
                    initiator: "iqn.1993-08.org.debian:01:y".into(),
                },
            ],
            created_at: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 5,
            }),
            metadata: [("csi.name".to_string(), "pvc-1".to_string())]
                .into_iter()
                .collect(),
            snapshot_count: 3,
            abnormal_reason: String::new(),
        };
        assert_eq!(got, want);
    }

    #[test]
    fn snapshot_pool_and_type_fields_reach_the_wire() {
        let snap = SnapshotView {
            id: SnapshotId::parse("s1").unwrap_or_else(|e| panic!("{e}")),
            name: None,
            source_volume: vid("v1"),
            size: Bytes::mib(100),
            created_at: None,
            ready_to_use: true,
            status: SnapshotStatus::Available,
            agent: "a".into(),
            pool: "p".into(),
        };
        assert_eq!(
            snapshot_to_pb(&snap),
            pb::Snapshot {
                id: "s1".into(),
                name: String::new(),
                status: "available".into(),
                volume_id: "v1".into(),
                size_bytes: 100 << 20,
                pool: "p".into(),
                agent: "a".into(),
                created_at: None,
            }
        );

        let pool = PoolReport {
            id: PoolRef::new("a", "p"),
            zone: "z1".into(),
            kind: Some(PoolKind::LvmThin),
            total: Capacity::Known(Bytes::gib(10)),
            free: Capacity::Unknown,
            provisioned: Bytes::gib(4),
            allocated: Bytes::gib(1),
            reserved_percentage: 5,
            max_over_subscription_ratio: 20.0,
            thin_provisioning: true,
            thick_provisioning: false,
            volume_count: 2,
            snapshot_count: 1,
            capabilities: BTreeMap::from([("media".to_string(), "ssd".to_string())]),
            healthy: false,
            unhealthy_reason: Some("agent does not answer".into()),
            stats_age: Some(Duration::from_millis(1500)),
            extent: Bytes::mib(4),
            portals: vec!["10.0.0.1:3260".into()],
        };
        let got = pool_to_pb(&pool);
        assert_eq!(
            (
                got.name.as_str(),
                got.agent.as_str(),
                got.kind.as_str(),
                got.total.and_then(|c| c.value),
                got.free.and_then(|c| c.value),
                got.stats_age,
                got.unhealthy_reason.as_str(),
            ),
            (
                "p",
                "a",
                "lvm-thin",
                Some(pb::capacity::Value::Bytes(10 << 30)),
                Some(pb::capacity::Value::Unknown(true)),
                Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 500_000_000
                }),
                "agent does not answer",
            )
        );
        let kinds = [
            (Some(PoolKind::LvmThick), "lvm-thick"),
            (Some(PoolKind::LvmThin), "lvm-thin"),
            (Some(PoolKind::File), "file"),
            (Some(PoolKind::Unspecified), ""),
            (None, ""),
        ];
        for (k, want) in kinds {
            assert_eq!(kind_text(k), want, "{k:?}");
        }

        let t = TypeReport {
            volume_type: VolumeType {
                name: "gold".into(),
                description: "fast".into(),
                extra_specs: BTreeMap::from([("media".to_string(), "ssd".to_string())]),
            },
            is_default: true,
        };
        assert_eq!(
            type_to_pb(&t),
            pb::VolumeType {
                name: "gold".into(),
                description: "fast".into(),
                extra_specs: [("media".to_string(), "ssd".to_string())]
                    .into_iter()
                    .collect(),
                is_default: true,
            }
        );
    }
}
