//! CSI Node service: parse the request into domain types, call [`crate::node::Node`], map its
//! errors with [`to_status`] — the one table from node errors to gRPC codes.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use tonic::{Code, Request, Response, Status};

use super::TOPOLOGY_ZONE_KEY;
use crate::agent::VolumeId;
use crate::exec::iscsiadm::Failure;
use crate::exec::ExecError;
use crate::node::{
    chap_from_secrets, Access, Attachment, ExpandRequest, InitiatorError, MountError, Node,
    NodeError, PublishRequest, StageRequest,
};
use crate::proto::csi as pb;
use crate::proto::csi::node_server::Node as CsiNode;
use crate::types::Bytes;

/// The capabilities NodeGetCapabilities lists.
pub const CAPABILITIES: &[pb::node_service_capability::rpc::Type] = {
    use pb::node_service_capability::rpc::Type as T;
    &[
        T::StageUnstageVolume,
        T::GetVolumeStats,
        T::ExpandVolume,
        T::VolumeCondition,
        T::SingleNodeMultiWriter,
    ]
};

/// The code of a failed process: a timeout is DEADLINE_EXCEEDED, a missing tool
/// FAILED_PRECONDITION (the host lacks a package), anything else INTERNAL.
fn exec_code(e: &ExecError) -> Code {
    match e {
        ExecError::Timeout { .. } => Code::DeadlineExceeded,
        ExecError::Spawn { .. } => Code::FailedPrecondition,
        ExecError::Io { .. } | ExecError::Failed { .. } => Code::Internal,
    }
}

/// The code of an initiator failure.
fn initiator_code(e: &InitiatorError) -> Code {
    match e {
        InitiatorError::Iscsiadm { failure, .. } => match failure {
            Failure::AuthFailed => Code::PermissionDenied,
            // tgtd: no such target, or this initiator is not in its ACL.
            Failure::LoginRefused => Code::NotFound,
            Failure::Unreachable | Failure::DaemonDown | Failure::Busy => Code::Unavailable,
            Failure::SessionExists | Failure::NotFound | Failure::Other => Code::Internal,
        },
        InitiatorError::Exec { source, .. } => exec_code(source),
        InitiatorError::Io { .. }
        | InitiatorError::Netlink { .. }
        | InitiatorError::Parse { .. } => Code::Internal,
    }
}

/// The code of a mount failure.
fn mount_code(e: &MountError) -> Code {
    match e {
        MountError::NeedsCheck { .. } => Code::FailedPrecondition,
        MountError::Unsupported(_) => Code::InvalidArgument,
        MountError::Exec { source, .. } => exec_code(source),
        MountError::Io { .. } | MountError::Parse { .. } => Code::Internal,
    }
}

/// The gRPC code of each node error. Exhaustive on purpose: a new variant must be placed.
pub fn code(e: &NodeError) -> Code {
    match e {
        NodeError::InvalidArgument(_) => Code::InvalidArgument,
        NodeError::NotFound(_) => Code::NotFound,
        NodeError::Incompatible(_) => Code::AlreadyExists,
        NodeError::NotStaged(_)
        | NodeError::ExceedsCapabilities(_)
        | NodeError::InUse { .. }
        | NodeError::UnexpectedContent { .. }
        | NodeError::NoChapSecret(_)
        | NodeError::NoInitiatorName(_) => Code::FailedPrecondition,
        NodeError::Login { source, .. } => initiator_code(source),
        NodeError::DeviceTimeout { .. } => Code::DeadlineExceeded,
        NodeError::NotGrown { .. } => Code::Unavailable,
        NodeError::OutOfRange(_) => Code::OutOfRange,
        NodeError::Busy(_) => Code::Aborted,
        NodeError::Initiator(e) => initiator_code(e),
        NodeError::Mount(e) => mount_code(e),
        NodeError::Internal(_) => Code::Internal,
    }
}

/// The status sent for a node error: its code, and its message with causes on one line.
pub fn to_status(e: NodeError) -> Status {
    Status::new(code(&e), super::status::message(&e))
}

fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg.into())
}

/// A volume id: required; one that cannot be valid names no volume (NOT_FOUND).
fn volume_id(raw: &str) -> Result<VolumeId, Status> {
    if raw.is_empty() {
        return Err(invalid("volume_id is required"));
    }
    VolumeId::parse(raw).map_err(|_| Status::not_found(format!("volume {raw:?} does not exist")))
}

/// A required absolute path.
fn path(raw: &str, field: &str) -> Result<PathBuf, Status> {
    if raw.is_empty() {
        return Err(invalid(format!("{field} is required")));
    }
    let p = PathBuf::from(raw);
    if !p.is_absolute() {
        return Err(invalid(format!("{field} must be an absolute path")));
    }
    Ok(p)
}

/// The access type and mode of a capability (mount flags kept).
fn capability(
    c: Option<&pb::VolumeCapability>,
) -> Result<(Access, crate::controller::AccessMode), Status> {
    let c = c.ok_or_else(|| invalid("volume_capability is required"))?;
    let parsed = super::controller::capability(c)?;
    let access = match (&parsed.access, &c.access_type) {
        (
            crate::controller::Access::Mount { fs },
            Some(pb::volume_capability::AccessType::Mount(m)),
        ) => Access::Mount {
            fs: fs.clone(),
            flags: m.mount_flags.clone(),
        },
        _ => Access::Block,
    };
    Ok((access, parsed.mode))
}

fn map(m: HashMap<String, String>) -> BTreeMap<String, String> {
    m.into_iter().collect()
}

fn size(b: Bytes) -> i64 {
    i64::try_from(b.get()).unwrap_or(i64::MAX)
}

fn usage(u: &crate::node::Usage, unit: pb::volume_usage::Unit) -> pb::VolumeUsage {
    let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    pb::VolumeUsage {
        available: n(u.available),
        total: n(u.total),
        used: n(u.used),
        unit: unit as i32,
    }
}

/// The tonic Node service over the domain node.
#[derive(Debug, Clone)]
pub struct NodeService {
    node: Arc<Node>,
}

impl NodeService {
    /// Serves `node`.
    pub fn new(node: Arc<Node>) -> Self {
        NodeService { node }
    }
}

#[tonic::async_trait]
impl CsiNode for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<pb::NodeStageVolumeRequest>,
    ) -> Result<Response<pb::NodeStageVolumeResponse>, Status> {
        let r = request.into_inner();
        let volume = volume_id(&r.volume_id)?;
        let staging_path = path(&r.staging_target_path, "staging_target_path")?;
        let (access, mode) = capability(r.volume_capability.as_ref())?;
        let attachment = Attachment::from_context(&map(r.publish_context)).map_err(to_status)?;
        let secrets = chap_from_secrets(&map(r.secrets), attachment.chap_user.as_deref())
            .map_err(to_status)?;
        self.node
            .stage(StageRequest {
                volume,
                staging_path,
                access,
                mode,
                attachment,
                secrets,
            })
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        request: Request<pb::NodeUnstageVolumeRequest>,
    ) -> Result<Response<pb::NodeUnstageVolumeResponse>, Status> {
        let r = request.into_inner();
        let volume = volume_id(&r.volume_id)?;
        let staging = path(&r.staging_target_path, "staging_target_path")?;
        self.node
            .unstage(&volume, &staging)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        request: Request<pb::NodePublishVolumeRequest>,
    ) -> Result<Response<pb::NodePublishVolumeResponse>, Status> {
        let r = request.into_inner();
        let volume = volume_id(&r.volume_id)?;
        let target_path = path(&r.target_path, "target_path")?;
        let (access, mode) = capability(r.volume_capability.as_ref())?;
        // Empty is FAILED_PRECONDITION (the spec's "staging target path not set"): the domain
        // says so.
        let staging_path = if r.staging_target_path.is_empty() {
            PathBuf::new()
        } else {
            path(&r.staging_target_path, "staging_target_path")?
        };
        self.node
            .publish(PublishRequest {
                volume,
                staging_path,
                target_path,
                access,
                mode,
                readonly: r.readonly,
            })
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<pb::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<pb::NodeUnpublishVolumeResponse>, Status> {
        let r = request.into_inner();
        let volume = volume_id(&r.volume_id)?;
        let target = path(&r.target_path, "target_path")?;
        self.node
            .unpublish(&volume, &target)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<pb::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<pb::NodeGetVolumeStatsResponse>, Status> {
        let r = request.into_inner();
        let volume = volume_id(&r.volume_id)?;
        let volume_path = path(&r.volume_path, "volume_path")?;
        let st = self
            .node
            .stats(&volume, &volume_path)
            .await
            .map_err(to_status)?;
        let mut usage_list = vec![usage(&st.bytes, pb::volume_usage::Unit::Bytes)];
        if let Some(i) = &st.inodes {
            usage_list.push(usage(i, pb::volume_usage::Unit::Inodes));
        }
        Ok(Response::new(pb::NodeGetVolumeStatsResponse {
            usage: usage_list,
            volume_condition: Some(pb::VolumeCondition {
                abnormal: st.abnormal.is_some(),
                message: st.abnormal.unwrap_or_else(|| "ok".into()),
            }),
        }))
    }

    async fn node_expand_volume(
        &self,
        request: Request<pb::NodeExpandVolumeRequest>,
    ) -> Result<Response<pb::NodeExpandVolumeResponse>, Status> {
        let r = request.into_inner();
        let volume = volume_id(&r.volume_id)?;
        let volume_path = path(&r.volume_path, "volume_path")?;
        if let Some(c) = r.volume_capability.as_ref() {
            capability(Some(c))?;
        }
        let bytes = |n: i64, field: &str| match u64::try_from(n) {
            Ok(0) => Ok(None),
            Ok(b) => Ok(Some(Bytes(b))),
            Err(_) => Err(invalid(format!(
                "capacity_range.{field} must not be negative"
            ))),
        };
        let (required, limit) = match &r.capacity_range {
            Some(c) => (
                bytes(c.required_bytes, "required_bytes")?,
                bytes(c.limit_bytes, "limit_bytes")?,
            ),
            None => (None, None),
        };
        let new_size = self
            .node
            .expand(ExpandRequest {
                volume,
                volume_path,
                required,
                limit,
            })
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::NodeExpandVolumeResponse {
            capacity_bytes: size(new_size),
        }))
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<pb::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<pb::NodeGetCapabilitiesResponse>, Status> {
        use pb::node_service_capability::{Rpc, Type};
        Ok(Response::new(pb::NodeGetCapabilitiesResponse {
            capabilities: CAPABILITIES
                .iter()
                .map(|t| pb::NodeServiceCapability {
                    r#type: Some(Type::Rpc(Rpc { r#type: *t as i32 })),
                })
                .collect(),
        }))
    }

    async fn node_get_info(
        &self,
        _request: Request<pb::NodeGetInfoRequest>,
    ) -> Result<Response<pb::NodeGetInfoResponse>, Status> {
        let info = self.node.info().await.map_err(to_status)?;
        Ok(Response::new(pb::NodeGetInfoResponse {
            node_id: info.node_id,
            max_volumes_per_node: i64::from(info.max_volumes_per_node),
            accessible_topology: Some(pb::Topology {
                segments: HashMap::from([(TOPOLOGY_ZONE_KEY.to_owned(), info.zone)]),
            }),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn iscsiadm(failure: Failure) -> InitiatorError {
        InitiatorError::Iscsiadm {
            op: "op".into(),
            failure,
            code: 1,
            stderr: String::new(),
        }
    }

    fn exec(e: ExecError) -> InitiatorError {
        InitiatorError::Exec {
            op: "op".into(),
            source: e,
        }
    }

    #[test]
    fn table() {
        let io = || std::io::Error::other("x");
        let failed = || ExecError::Failed {
            program: "p".into(),
            code: 1,
            stderr: String::new(),
        };
        let cases: Vec<(NodeError, Code)> = vec![
            (
                NodeError::InvalidArgument("x".into()),
                Code::InvalidArgument,
            ),
            (NodeError::NotFound("x".into()), Code::NotFound),
            (NodeError::Incompatible("x".into()), Code::AlreadyExists),
            (NodeError::NotStaged("x".into()), Code::FailedPrecondition),
            (
                NodeError::ExceedsCapabilities("x".into()),
                Code::FailedPrecondition,
            ),
            (
                NodeError::InUse {
                    volume: "v".into(),
                    users: vec![],
                },
                Code::FailedPrecondition,
            ),
            (
                NodeError::UnexpectedContent {
                    device: "/dev/x".into(),
                    found: "swap".into(),
                    wanted: "ext4".into(),
                },
                Code::FailedPrecondition,
            ),
            (
                NodeError::NoChapSecret("x".into()),
                Code::FailedPrecondition,
            ),
            (
                NodeError::NoInitiatorName("x".into()),
                Code::FailedPrecondition,
            ),
            (
                NodeError::Login {
                    target: "t".into(),
                    tried: vec![],
                    source: Box::new(iscsiadm(Failure::AuthFailed)),
                },
                Code::PermissionDenied,
            ),
            (
                NodeError::Login {
                    target: "t".into(),
                    tried: vec![],
                    source: Box::new(iscsiadm(Failure::LoginRefused)),
                },
                Code::NotFound,
            ),
            (
                NodeError::Login {
                    target: "t".into(),
                    tried: vec![],
                    source: Box::new(iscsiadm(Failure::Unreachable)),
                },
                Code::Unavailable,
            ),
            (
                NodeError::DeviceTimeout {
                    path: "/dev/disk/by-path/x".into(),
                    after: Duration::from_secs(1),
                },
                Code::DeadlineExceeded,
            ),
            (
                NodeError::NotGrown {
                    disk: "sdc".into(),
                    size: Bytes(1),
                    required: Bytes(2),
                },
                Code::Unavailable,
            ),
            (NodeError::OutOfRange("x".into()), Code::OutOfRange),
            (NodeError::Busy("v".into()), Code::Aborted),
            (NodeError::Internal("x".into()), Code::Internal),
            (iscsiadm(Failure::DaemonDown).into(), Code::Unavailable),
            (iscsiadm(Failure::Busy).into(), Code::Unavailable),
            (iscsiadm(Failure::SessionExists).into(), Code::Internal),
            (iscsiadm(Failure::NotFound).into(), Code::Internal),
            (iscsiadm(Failure::Other).into(), Code::Internal),
            (
                exec(ExecError::Timeout {
                    program: "iscsiadm".into(),
                    after: Duration::from_secs(1),
                })
                .into(),
                Code::DeadlineExceeded,
            ),
            (
                exec(ExecError::Spawn {
                    program: "iscsiadm".into(),
                    source: io(),
                })
                .into(),
                Code::FailedPrecondition,
            ),
            (exec(failed()).into(), Code::Internal),
            (
                InitiatorError::Io {
                    op: "read",
                    path: "/sys".into(),
                    source: io(),
                }
                .into(),
                Code::Internal,
            ),
            (
                InitiatorError::Parse {
                    what: "x",
                    reason: "y".into(),
                }
                .into(),
                Code::Internal,
            ),
            (
                MountError::NeedsCheck {
                    device: "/dev/sdc".into(),
                    reason: "errors".into(),
                }
                .into(),
                Code::FailedPrecondition,
            ),
            (
                MountError::Unsupported("btrfs".into()).into(),
                Code::InvalidArgument,
            ),
            (
                MountError::Exec {
                    op: "mount".into(),
                    source: failed(),
                }
                .into(),
                Code::Internal,
            ),
            (
                MountError::Io {
                    op: "mkdir",
                    path: "/x".into(),
                    source: io(),
                }
                .into(),
                Code::Internal,
            ),
            (
                MountError::Parse {
                    what: "mountinfo",
                    reason: "x".into(),
                }
                .into(),
                Code::Internal,
            ),
        ];
        for (err, want) in cases {
            assert_eq!(code(&err), want, "{err}");
        }
    }

    #[test]
    fn status_message_has_causes_and_no_secret() {
        let s = to_status(NodeError::Mount(MountError::Exec {
            op: "mount /dev/sdc on /s".into(),
            source: ExecError::Failed {
                program: "mount".into(),
                code: 32,
                stderr: "wrong fs type".into(),
            },
        }));
        assert_eq!(s.code(), Code::Internal);
        assert_eq!(
            s.message(),
            "mount /dev/sdc on /s: mount exited with 32: wrong fs type"
        );
    }

    #[test]
    fn request_edges() {
        assert_eq!(
            volume_id("").map_err(|s| s.code()).err(),
            Some(Code::InvalidArgument)
        );
        assert_eq!(
            volume_id("Bad Id").map_err(|s| s.code()).err(),
            Some(Code::NotFound)
        );
        assert_eq!(
            path("rel/x", "p").map_err(|s| s.code()).err(),
            Some(Code::InvalidArgument)
        );
        assert_eq!(
            path("", "p").map_err(|s| s.code()).err(),
            Some(Code::InvalidArgument)
        );
        assert_eq!(
            capability(None).map_err(|s| s.code()).err(),
            Some(Code::InvalidArgument)
        );
        use pb::volume_capability::{access_mode::Mode, AccessMode, AccessType, MountVolume};
        let c = pb::VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume {
                fs_type: String::new(),
                mount_flags: vec!["noatime".into()],
                volume_mount_group: String::new(),
            })),
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
        };
        assert_eq!(
            capability(Some(&c)).map(|(a, _)| a).map_err(|s| s.code()),
            Ok(Access::Mount {
                fs: "ext4".into(),
                flags: vec!["noatime".into()]
            })
        );
    }
}
