//! CSI Controller service: parse the request into domain types, call
//! [`crate::controller::Controller`], map its errors with [`super::status::to_status`].
//!
//! Requests are validated here only for what the wire makes optional but the spec requires
//! (names, ids, capabilities); every rule about volumes lives in the domain.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use tonic::{Request, Response, Status};

use super::status::to_status;
use super::TOPOLOGY_ZONE_KEY;
use crate::controller::{
    is_backup_id, Access, AccessMode, Capability, CapacityRange, ContentSource, Controller,
    CreateVolume, SnapshotKind, SnapshotView, VolumeView, Zones,
};
use crate::proto::csi as pb;
use crate::proto::csi::controller_server::Controller as CsiController;
use crate::types::Bytes;

/// The tonic Controller service over the domain controller.
#[derive(Debug, Clone)]
pub struct ControllerService {
    controller: Arc<Controller>,
}

impl ControllerService {
    /// Serves `controller`.
    pub fn new(controller: Arc<Controller>) -> Self {
        ControllerService { controller }
    }
}

/// The capabilities ControllerGetCapabilities lists: every RPC implemented here.
pub const CAPABILITIES: &[pb::controller_service_capability::rpc::Type] = {
    use pb::controller_service_capability::rpc::Type as T;
    &[
        T::CreateDeleteVolume,
        T::PublishUnpublishVolume,
        T::ListVolumes,
        T::GetCapacity,
        T::CreateDeleteSnapshot,
        T::ListSnapshots,
        T::CloneVolume,
        T::ExpandVolume,
        T::ListVolumesPublishedNodes,
        T::VolumeCondition,
        T::GetVolume,
        T::SingleNodeMultiWriter,
        T::ModifyVolume,
        T::GetSnapshot,
    ]
};

fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg.into())
}

fn required<'a>(value: &'a str, field: &str) -> Result<&'a str, Status> {
    if value.is_empty() {
        Err(invalid(format!("{field} is required")))
    } else {
        Ok(value)
    }
}

fn map(m: HashMap<String, String>) -> BTreeMap<String, String> {
    m.into_iter().collect()
}

/// Parses one VolumeCapability; missing access type or mode is INVALID_ARGUMENT. Whether the
/// capability is supported is the domain's decision ([`Capability::check`]).
pub fn capability(c: &pb::VolumeCapability) -> Result<Capability, Status> {
    use pb::volume_capability::access_mode::Mode;
    use pb::volume_capability::AccessType;
    let access = match &c.access_type {
        Some(AccessType::Block(_)) => Access::Block,
        Some(AccessType::Mount(m)) => Access::Mount {
            fs: if m.fs_type.is_empty() {
                "ext4".to_owned()
            } else {
                m.fs_type.to_ascii_lowercase()
            },
        },
        None => {
            return Err(invalid(
                "volume capability needs an access type (block or mount)",
            ))
        }
    };
    let mode = match c.access_mode.as_ref().map(|m| Mode::try_from(m.mode)) {
        Some(Ok(Mode::SingleNodeWriter)) => AccessMode::SingleNodeWriter,
        Some(Ok(Mode::SingleNodeReaderOnly)) => AccessMode::SingleNodeReaderOnly,
        Some(Ok(Mode::MultiNodeReaderOnly)) => AccessMode::MultiNodeReaderOnly,
        Some(Ok(Mode::MultiNodeSingleWriter)) => AccessMode::MultiNodeSingleWriter,
        Some(Ok(Mode::MultiNodeMultiWriter)) => AccessMode::MultiNodeMultiWriter,
        Some(Ok(Mode::SingleNodeSingleWriter)) => AccessMode::SingleNodeSingleWriter,
        Some(Ok(Mode::SingleNodeMultiWriter)) => AccessMode::SingleNodeMultiWriter,
        Some(Ok(Mode::Unknown)) | Some(Err(_)) | None => {
            return Err(invalid("volume capability needs a known access mode"))
        }
    };
    Ok(Capability { access, mode })
}

fn capabilities(caps: &[pb::VolumeCapability]) -> Result<Vec<Capability>, Status> {
    if caps.is_empty() {
        return Err(invalid("volume_capabilities is required"));
    }
    caps.iter().map(capability).collect()
}

fn bytes(n: i64, field: &str) -> Result<Option<Bytes>, Status> {
    match u64::try_from(n) {
        Ok(0) => Ok(None),
        Ok(b) => Ok(Some(Bytes(b))),
        Err(_) => Err(invalid(format!("{field} must not be negative"))),
    }
}

fn capacity_range(r: Option<&pb::CapacityRange>) -> Result<CapacityRange, Status> {
    let Some(r) = r else {
        return Ok(CapacityRange::default());
    };
    Ok(CapacityRange {
        required: bytes(r.required_bytes, "required_bytes")?,
        limit: bytes(r.limit_bytes, "limit_bytes")?,
    })
}

/// Zones of a topology requirement. Segments without the zone key constrain nothing.
fn zones(t: Option<&pb::TopologyRequirement>) -> Zones {
    let Some(t) = t else {
        return Zones::default();
    };
    let zone = |s: &pb::Topology| s.segments.get(TOPOLOGY_ZONE_KEY).cloned();
    let requisite: Vec<Option<String>> = t.requisite.iter().map(zone).collect();
    let mut preferred: Vec<String> = Vec::new();
    for z in t.preferred.iter().filter_map(zone) {
        if !preferred.contains(&z) {
            preferred.push(z);
        }
    }
    Zones {
        // A requisite term without a zone allows every zone.
        requisite: if requisite.iter().any(Option::is_none) {
            Default::default()
        } else {
            requisite.into_iter().flatten().collect()
        },
        preferred,
    }
}

fn content_source(s: Option<&pb::VolumeContentSource>) -> Result<Option<ContentSource>, Status> {
    use pb::volume_content_source::Type;
    match s.and_then(|s| s.r#type.as_ref()) {
        None => Ok(None),
        Some(Type::Snapshot(s)) => Ok(Some(ContentSource::Snapshot(
            required(&s.snapshot_id, "volume_content_source.snapshot.snapshot_id")?.to_owned(),
        ))),
        Some(Type::Volume(v)) => Ok(Some(ContentSource::Volume(
            required(&v.volume_id, "volume_content_source.volume.volume_id")?.to_owned(),
        ))),
    }
}

fn content_source_to_pb(s: &ContentSource) -> pb::VolumeContentSource {
    use pb::volume_content_source::{SnapshotSource, Type, VolumeSource};
    pb::VolumeContentSource {
        r#type: Some(match s {
            ContentSource::Snapshot(id) => Type::Snapshot(SnapshotSource {
                snapshot_id: id.clone(),
            }),
            ContentSource::Volume(id) => Type::Volume(VolumeSource {
                volume_id: id.clone(),
            }),
        }),
    }
}

fn size(b: Bytes) -> i64 {
    i64::try_from(b.get()).unwrap_or(i64::MAX)
}

/// The CSI volume of a domain view.
pub fn volume_to_pb(v: &VolumeView) -> pb::Volume {
    pb::Volume {
        capacity_bytes: size(v.capacity),
        volume_id: v.id.to_string(),
        volume_context: HashMap::new(),
        content_source: v.source.as_ref().map(content_source_to_pb),
        accessible_topology: if v.zone.is_empty() {
            Vec::new()
        } else {
            vec![pb::Topology {
                segments: HashMap::from([(TOPOLOGY_ZONE_KEY.to_owned(), v.zone.clone())]),
            }]
        },
    }
}

fn condition(v: &VolumeView) -> pb::VolumeCondition {
    pb::VolumeCondition {
        abnormal: v.abnormal.is_some(),
        message: v.abnormal.clone().unwrap_or_else(|| "ok".to_owned()),
    }
}

/// The CSI snapshot of a domain view.
pub fn snapshot_to_pb(s: &SnapshotView) -> pb::Snapshot {
    pb::Snapshot {
        size_bytes: size(s.size),
        snapshot_id: s.id.to_string(),
        source_volume_id: s.source_volume.to_string(),
        creation_time: s.created_at.map(|t| {
            let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
            prost_types::Timestamp {
                seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
            }
        }),
        ready_to_use: s.ready_to_use,
        group_snapshot_id: String::new(),
    }
}

fn max_entries(n: i32) -> Result<usize, Status> {
    usize::try_from(n).map_err(|_| invalid("max_entries must not be negative"))
}

#[tonic::async_trait]
impl CsiController for ControllerService {
    async fn create_volume(
        &self,
        request: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::CreateVolumeResponse>, Status> {
        let r = request.into_inner();
        let req = CreateVolume {
            name: required(&r.name, "name")?.to_owned(),
            capacity: capacity_range(r.capacity_range.as_ref())?,
            capabilities: capabilities(&r.volume_capabilities)?,
            parameters: map(r.parameters),
            mutable_parameters: map(r.mutable_parameters),
            source: content_source(r.volume_content_source.as_ref())?,
            zones: zones(r.accessibility_requirements.as_ref()),
        };
        let v = self
            .controller
            .create_volume(req)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::CreateVolumeResponse {
            volume: Some(volume_to_pb(&v)),
        }))
    }

    async fn delete_volume(
        &self,
        request: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let r = request.into_inner();
        let id = required(&r.volume_id, "volume_id")?;
        self.controller.delete_volume(id).await.map_err(to_status)?;
        Ok(Response::new(pb::DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        request: Request<pb::ControllerPublishVolumeRequest>,
    ) -> Result<Response<pb::ControllerPublishVolumeResponse>, Status> {
        let r = request.into_inner();
        let id = required(&r.volume_id, "volume_id")?;
        let node = required(&r.node_id, "node_id")?;
        let cap = capability(
            r.volume_capability
                .as_ref()
                .ok_or_else(|| invalid("volume_capability is required"))?,
        )?;
        let info = self
            .controller
            .publish_volume(id, node, &cap)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ControllerPublishVolumeResponse {
            publish_context: info.to_context().into_iter().collect(),
        }))
    }

    async fn controller_unpublish_volume(
        &self,
        request: Request<pb::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<pb::ControllerUnpublishVolumeResponse>, Status> {
        let r = request.into_inner();
        let id = required(&r.volume_id, "volume_id")?;
        self.controller
            .unpublish_volume(id, &r.node_id)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ControllerUnpublishVolumeResponse {}))
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<pb::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<pb::ValidateVolumeCapabilitiesResponse>, Status> {
        let r = request.into_inner();
        let id = required(&r.volume_id, "volume_id")?;
        let caps = capabilities(&r.volume_capabilities)?;
        let parameters = map(r.parameters.clone());
        let mutable = map(r.mutable_parameters.clone());
        let verdict = self
            .controller
            .validate_volume(id, &caps, &parameters, &mutable)
            .await
            .map_err(to_status)?;
        let response = match verdict {
            Ok(()) => pb::ValidateVolumeCapabilitiesResponse {
                confirmed: Some(pb::validate_volume_capabilities_response::Confirmed {
                    volume_context: r.volume_context,
                    volume_capabilities: r.volume_capabilities,
                    parameters: r.parameters,
                    mutable_parameters: r.mutable_parameters,
                }),
                message: String::new(),
            },
            Err(why) => pb::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: why,
            },
        };
        Ok(Response::new(response))
    }

    async fn list_volumes(
        &self,
        request: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let r = request.into_inner();
        let page = self
            .controller
            .list_volumes(max_entries(r.max_entries)?, &r.starting_token)
            .await
            .map_err(to_status)?;
        let entries = page
            .entries
            .iter()
            .map(|v| pb::list_volumes_response::Entry {
                volume: Some(volume_to_pb(v)),
                status: Some(pb::list_volumes_response::VolumeStatus {
                    published_node_ids: v.published_nodes.clone(),
                    volume_condition: Some(condition(v)),
                }),
            })
            .collect();
        Ok(Response::new(pb::ListVolumesResponse {
            entries,
            next_token: page.next_token.unwrap_or_default(),
        }))
    }

    async fn get_capacity(
        &self,
        request: Request<pb::GetCapacityRequest>,
    ) -> Result<Response<pb::GetCapacityResponse>, Status> {
        let r = request.into_inner();
        let caps: Vec<Capability> = r
            .volume_capabilities
            .iter()
            .map(capability)
            .collect::<Result<_, _>>()?;
        let zone = r
            .accessible_topology
            .as_ref()
            .and_then(|t| t.segments.get(TOPOLOGY_ZONE_KEY))
            .map(String::as_str);
        let report = self
            .controller
            .get_capacity(&caps, &map(r.parameters), zone)
            .map_err(to_status)?;
        Ok(Response::new(pb::GetCapacityResponse {
            available_capacity: size(report.available),
            maximum_volume_size: Some(size(report.maximum_volume_size)),
            minimum_volume_size: None,
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _request: Request<pb::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<pb::ControllerGetCapabilitiesResponse>, Status> {
        use pb::controller_service_capability::{Rpc, Type};
        let capabilities = CAPABILITIES
            .iter()
            .map(|t| pb::ControllerServiceCapability {
                r#type: Some(Type::Rpc(Rpc { r#type: *t as i32 })),
            })
            .collect();
        Ok(Response::new(pb::ControllerGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn create_snapshot(
        &self,
        request: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::CreateSnapshotResponse>, Status> {
        let r = request.into_inner();
        let name = required(&r.name, "name")?;
        let source = required(&r.source_volume_id, "source_volume_id")?;
        let s = match SnapshotKind::parse(&map(r.parameters.clone())).map_err(to_status)? {
            SnapshotKind::Snapshot(params) => {
                self.controller.create_snapshot(name, source, &params).await
            }
            SnapshotKind::Backup {
                repository,
                incremental,
            } => {
                self.controller
                    .create_backup_snapshot(name, source, repository, incremental)
                    .await
            }
        }
        .map_err(to_status)?;
        Ok(Response::new(pb::CreateSnapshotResponse {
            snapshot: Some(snapshot_to_pb(&s)),
        }))
    }

    async fn delete_snapshot(
        &self,
        request: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        let r = request.into_inner();
        let id = required(&r.snapshot_id, "snapshot_id")?;
        if is_backup_id(id) {
            self.controller.delete_backup(id).await.map_err(to_status)?;
        } else {
            self.controller
                .delete_snapshot(id)
                .await
                .map_err(to_status)?;
        }
        Ok(Response::new(pb::DeleteSnapshotResponse {}))
    }

    async fn list_snapshots(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let r = request.into_inner();
        let page = self
            .controller
            .list_snapshots_and_backups(
                &r.snapshot_id,
                &r.source_volume_id,
                max_entries(r.max_entries)?,
                &r.starting_token,
            )
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ListSnapshotsResponse {
            entries: page
                .entries
                .iter()
                .map(|s| pb::list_snapshots_response::Entry {
                    snapshot: Some(snapshot_to_pb(s)),
                })
                .collect(),
            next_token: page.next_token.unwrap_or_default(),
        }))
    }

    async fn get_snapshot(
        &self,
        request: Request<pb::GetSnapshotRequest>,
    ) -> Result<Response<pb::GetSnapshotResponse>, Status> {
        let r = request.into_inner();
        let id = required(&r.snapshot_id, "snapshot_id")?;
        let s = if is_backup_id(id) {
            self.controller.get_backup_snapshot(id).await
        } else {
            self.controller.get_snapshot(id).await
        }
        .map_err(to_status)?;
        Ok(Response::new(pb::GetSnapshotResponse {
            snapshot: Some(snapshot_to_pb(&s)),
        }))
    }

    async fn controller_expand_volume(
        &self,
        request: Request<pb::ControllerExpandVolumeRequest>,
    ) -> Result<Response<pb::ControllerExpandVolumeResponse>, Status> {
        let r = request.into_inner();
        let id = required(&r.volume_id, "volume_id")?;
        let range = r
            .capacity_range
            .as_ref()
            .ok_or_else(|| invalid("capacity_range is required"))?;
        let range = capacity_range(Some(range))?;
        let access = r
            .volume_capability
            .as_ref()
            .map(capability)
            .transpose()?
            .map(|c| c.access);
        let (new_size, node_expansion_required) = self
            .controller
            .expand_volume(id, range, access.as_ref())
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ControllerExpandVolumeResponse {
            capacity_bytes: size(new_size),
            node_expansion_required,
        }))
    }

    async fn controller_get_volume(
        &self,
        request: Request<pb::ControllerGetVolumeRequest>,
    ) -> Result<Response<pb::ControllerGetVolumeResponse>, Status> {
        let r = request.into_inner();
        let id = required(&r.volume_id, "volume_id")?;
        let v = self.controller.get_volume(id).await.map_err(to_status)?;
        Ok(Response::new(pb::ControllerGetVolumeResponse {
            volume: Some(volume_to_pb(&v)),
            status: Some(pb::controller_get_volume_response::VolumeStatus {
                published_node_ids: v.published_nodes.clone(),
                volume_condition: Some(condition(&v)),
            }),
        }))
    }

    async fn controller_modify_volume(
        &self,
        request: Request<pb::ControllerModifyVolumeRequest>,
    ) -> Result<Response<pb::ControllerModifyVolumeResponse>, Status> {
        let r = request.into_inner();
        let id = required(&r.volume_id, "volume_id")?;
        if r.mutable_parameters.is_empty() {
            return Err(invalid("mutable_parameters is required"));
        }
        self.controller
            .modify_volume(id, &map(r.mutable_parameters))
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ControllerModifyVolumeResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::volume_capability::{
        access_mode::Mode, AccessMode as PbMode, AccessType, BlockVolume, MountVolume,
    };

    fn cap(access: Option<AccessType>, mode: Option<Mode>) -> pb::VolumeCapability {
        pb::VolumeCapability {
            access_type: access,
            access_mode: mode.map(|m| PbMode { mode: m as i32 }),
        }
    }

    fn mount(fs: &str) -> Option<AccessType> {
        Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            ..Default::default()
        }))
    }

    #[test]
    fn capability_parse_table() {
        let block = Some(AccessType::Block(BlockVolume {}));
        let cases = [
            (
                cap(mount(""), Some(Mode::SingleNodeWriter)),
                Ok("mount:ext4/SINGLE_NODE_WRITER"),
            ),
            (
                cap(mount("XFS"), Some(Mode::SingleNodeMultiWriter)),
                Ok("mount:xfs/SINGLE_NODE_MULTI_WRITER"),
            ),
            (
                cap(block.clone(), Some(Mode::MultiNodeMultiWriter)),
                Ok("block/MULTI_NODE_MULTI_WRITER"),
            ),
            (
                cap(None, Some(Mode::SingleNodeWriter)),
                Err(tonic::Code::InvalidArgument),
            ),
            (cap(block.clone(), None), Err(tonic::Code::InvalidArgument)),
            (
                cap(block, Some(Mode::Unknown)),
                Err(tonic::Code::InvalidArgument),
            ),
        ];
        for (c, want) in cases {
            assert_eq!(
                capability(&c).map(|c| c.canonical()).map_err(|s| s.code()),
                want.map(str::to_string),
                "{c:?}"
            );
        }
    }

    #[test]
    fn zones_table() {
        let topo = |z: Option<&str>| pb::Topology {
            segments: z
                .map(|z| HashMap::from([(TOPOLOGY_ZONE_KEY.to_string(), z.to_string())]))
                .unwrap_or_default(),
        };
        let req = pb::TopologyRequirement {
            requisite: vec![topo(Some("z1")), topo(Some("z2"))],
            preferred: vec![topo(Some("z2")), topo(Some("z1")), topo(Some("z2"))],
        };
        let z = zones(Some(&req));
        assert_eq!(z.requisite.into_iter().collect::<Vec<_>>(), ["z1", "z2"]);
        assert_eq!(z.preferred, ["z2", "z1"]);
        let open = pb::TopologyRequirement {
            requisite: vec![topo(Some("z1")), topo(None)],
            preferred: vec![],
        };
        assert_eq!(zones(Some(&open)), Zones::default());
    }

    #[test]
    fn capacity_range_table() {
        let r = |req, lim| pb::CapacityRange {
            required_bytes: req,
            limit_bytes: lim,
        };
        assert_eq!(
            capacity_range(Some(&r(5, 0))).map_err(|s| s.code()),
            Ok(CapacityRange {
                required: Some(Bytes(5)),
                limit: None
            })
        );
        assert_eq!(
            capacity_range(Some(&r(-1, 0))).map_err(|s| s.code()),
            Err(tonic::Code::InvalidArgument)
        );
        assert_eq!(
            capacity_range(None).map_err(|s| s.code()),
            Ok(CapacityRange::default())
        );
    }
}
