//! The CSI Node service over real gRPC: a tonic server on a temporary Unix socket with the
//! fake host behind the seams, called through a real client for every RPC; and the real
//! `cinderblock node` binary answering NodeGetInfo and NodeGetCapabilities.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cinderblock::agent::chap::ChapKey;
use cinderblock::agent::ids::target_iqn;
use cinderblock::agent::VolumeId;
use cinderblock::csi::node::NodeService;
use cinderblock::node::fake::FakeHost;
use cinderblock::node::{Node, NodeSettings};
use cinderblock::proto::csi as pb;
use cinderblock::proto::csi::node_client::NodeClient;
use cinderblock::proto::csi::node_server::NodeServer;
use cinderblock::transport::{self, Endpoint};
use cinderblock::types::Bytes;
use pb::volume_capability::{access_mode::Mode, AccessMode, AccessType, BlockVolume, MountVolume};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_cinderblock");
const PORTAL: &str = "192.168.77.1:3260";
const INITIATOR: &str = "iqn.1993-08.org.debian:01:comp";

fn key() -> ChapKey {
    ChapKey::new(b"the agents' master key, 32 bytes".to_vec()).expect("key")
}

/// A Node service on a Unix socket in a temporary directory, stopped on drop.
struct Served {
    host: Arc<FakeHost>,
    client: NodeClient<Channel>,
    stop: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn serve(chap_key: Option<ChapKey>) -> Served {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("csi.sock");
    let host = Arc::new(FakeHost::new(INITIATOR));
    let settings = NodeSettings {
        node_name: "comp".into(),
        zone: "z1".into(),
        max_volumes_per_node: 16,
        attach_timeout: Duration::from_secs(2),
        poll_interval: Duration::from_millis(1),
    };
    let node = Arc::new(Node::new(settings, host.clone(), host.clone(), chap_key));
    let endpoint = Endpoint::Unix(socket.clone());
    let stop = CancellationToken::new();
    let router =
        tonic::transport::Server::builder().add_service(NodeServer::new(NodeService::new(node)));
    let (ep, token) = (endpoint.clone(), stop.clone());
    tokio::spawn(async move { transport::serve(router, &ep, token).await });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "socket never appeared");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let channel = transport::connect(&endpoint, false).await.expect("connect");
    Served {
        host,
        client: NodeClient::new(channel),
        stop,
        _dir: dir,
    }
}

fn cap(access: AccessType, mode: Mode) -> Option<pb::VolumeCapability> {
    Some(pb::VolumeCapability {
        access_type: Some(access),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    })
}

fn mount(fs: &str) -> AccessType {
    AccessType::Mount(MountVolume {
        fs_type: fs.into(),
        mount_flags: vec!["noatime".into()],
        volume_mount_group: String::new(),
    })
}

fn block() -> AccessType {
    AccessType::Block(BlockVolume {})
}

/// What ControllerPublishVolume returns for `v` (the controller's own type builds it).
fn context(v: &VolumeId) -> HashMap<String, String> {
    cinderblock::controller::PublishInfo {
        portals: vec![PORTAL.into()],
        target_iqn: target_iqn(v),
        lun: 1,
        chap_user: key().credentials(v).username,
    }
    .to_context()
    .into_iter()
    .collect()
}

fn stage_req(v: &VolumeId, staging: &Path, access: AccessType) -> pb::NodeStageVolumeRequest {
    pb::NodeStageVolumeRequest {
        volume_id: v.to_string(),
        publish_context: context(v),
        staging_target_path: staging.display().to_string(),
        volume_capability: cap(access, Mode::SingleNodeWriter),
        secrets: HashMap::new(),
        volume_context: HashMap::new(),
    }
}

fn publish_req(
    v: &VolumeId,
    staging: &Path,
    target: &Path,
    access: AccessType,
    readonly: bool,
) -> pb::NodePublishVolumeRequest {
    pb::NodePublishVolumeRequest {
        volume_id: v.to_string(),
        publish_context: context(v),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: cap(access, Mode::SingleNodeWriter),
        readonly,
        secrets: HashMap::new(),
        volume_context: HashMap::new(),
    }
}

fn code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

fn vol(id: &str) -> VolumeId {
    VolumeId::parse(id).expect("volume id")
}

#[tokio::test]
async fn every_node_rpc_over_grpc() {
    let mut s = serve(Some(key())).await;
    let c = &mut s.client;

    let caps = c
        .node_get_capabilities(pb::NodeGetCapabilitiesRequest {})
        .await
        .expect("caps")
        .into_inner();
    use pb::node_service_capability::rpc::Type as T;
    let types: Vec<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| {
            let pb::node_service_capability::Type::Rpc(r) = c.r#type.as_ref()?;
            Some(r.r#type)
        })
        .collect();
    assert_eq!(
        types,
        [
            T::StageUnstageVolume,
            T::GetVolumeStats,
            T::ExpandVolume,
            T::VolumeCondition,
            T::SingleNodeMultiWriter
        ]
        .map(|t| t as i32)
    );

    let info = c
        .node_get_info(pb::NodeGetInfoRequest {})
        .await
        .expect("info")
        .into_inner();
    assert_eq!(info.node_id, format!("comp/{INITIATOR}"));
    assert_eq!(info.max_volumes_per_node, 16);
    assert_eq!(
        info.accessible_topology.map(|t| t.segments),
        Some(HashMap::from([(
            "topology.cinderblock.dev/zone".to_owned(),
            "z1".to_owned()
        )]))
    );

    let v = vol("5a1e");
    let t = target_iqn(&v);
    s.host
        .add_target(&t, &[PORTAL], 1, Bytes::gib(1), Some(key().credentials(&v)));
    let staging = PathBuf::from(
        "/var/lib/kubelet/plugins/kubernetes.io/csi/csi.cinderblock.dev/h/globalmount",
    );
    let pod = PathBuf::from("/var/lib/kubelet/pods/p1/volumes/kubernetes.io~csi/pvc/mount");

    // Stage: twice OK, then an incompatible capability is ALREADY_EXISTS.
    for _ in 0..2 {
        c.node_stage_volume(stage_req(&v, &staging, mount("ext4")))
            .await
            .expect("stage");
    }
    assert_eq!(
        code(c.node_stage_volume(stage_req(&v, &staging, block())).await),
        Code::AlreadyExists
    );
    assert_eq!(s.host.session_portals(&t), vec![PORTAL.to_owned()]);

    // Publish: twice OK; read-only at the same path is completed, read-write there again
    // is ALREADY_EXISTS; no staging path is FAILED_PRECONDITION.
    for _ in 0..2 {
        c.node_publish_volume(publish_req(&v, &staging, &pod, mount("ext4"), false))
            .await
            .expect("publish");
    }
    let ro_pod = PathBuf::from("/var/lib/kubelet/pods/p2/volumes/kubernetes.io~csi/pvc/mount");
    c.node_publish_volume(publish_req(&v, &staging, &ro_pod, mount("ext4"), true))
        .await
        .expect("publish ro");
    assert_eq!(
        code(
            c.node_publish_volume(publish_req(&v, &staging, &ro_pod, mount("ext4"), false))
                .await
        ),
        Code::AlreadyExists
    );
    assert_eq!(
        code(
            c.node_publish_volume(publish_req(&v, Path::new(""), &pod, mount("ext4"), false))
                .await
        ),
        Code::FailedPrecondition
    );

    // Stats with a condition; a path that is not the volume's is NOT_FOUND.
    let st = c
        .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
            volume_id: v.to_string(),
            volume_path: pod.display().to_string(),
            staging_target_path: staging.display().to_string(),
        })
        .await
        .expect("stats")
        .into_inner();
    let units: Vec<(i32, i64)> = st.usage.iter().map(|u| (u.unit, u.total)).collect();
    assert_eq!(
        units,
        vec![
            (
                pb::volume_usage::Unit::Bytes as i32,
                Bytes::gib(1).get() as i64
            ),
            (pb::volume_usage::Unit::Inodes as i32, 65536)
        ]
    );
    assert_eq!(
        st.volume_condition.map(|c| (c.abnormal, c.message)),
        Some((false, "ok".to_owned()))
    );
    assert_eq!(
        code(
            c.node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
                volume_id: v.to_string(),
                volume_path: "/nowhere".into(),
                staging_target_path: String::new(),
            })
            .await
        ),
        Code::NotFound
    );

    // Expand after the controller grew the LUN.
    s.host.resize_lun(&t, 1, Bytes::gib(3));
    let grown = c
        .node_expand_volume(pb::NodeExpandVolumeRequest {
            volume_id: v.to_string(),
            volume_path: pod.display().to_string(),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: Bytes::gib(3).get() as i64,
                limit_bytes: 0,
            }),
            staging_target_path: staging.display().to_string(),
            volume_capability: cap(mount("ext4"), Mode::SingleNodeWriter),
            secrets: HashMap::new(),
        })
        .await
        .expect("expand")
        .into_inner();
    assert_eq!(grown.capacity_bytes, Bytes::gib(3).get() as i64);

    // Unstage while still published: FAILED_PRECONDITION, the session stays.
    assert_eq!(
        code(
            c.node_unstage_volume(pb::NodeUnstageVolumeRequest {
                volume_id: v.to_string(),
                staging_target_path: staging.display().to_string(),
            })
            .await
        ),
        Code::FailedPrecondition
    );
    assert_eq!(s.host.session_portals(&t), vec![PORTAL.to_owned()]);

    // Unpublish and unstage, each twice.
    for path in [&pod, &ro_pod, &pod] {
        c.node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
            volume_id: v.to_string(),
            target_path: path.display().to_string(),
        })
        .await
        .expect("unpublish");
    }
    for _ in 0..2 {
        c.node_unstage_volume(pb::NodeUnstageVolumeRequest {
            volume_id: v.to_string(),
            staging_target_path: staging.display().to_string(),
        })
        .await
        .expect("unstage");
    }
    assert_eq!(s.host.session_portals(&t), Vec::<String>::new());
    assert_eq!(s.host.records_of(&t), vec![]);
    assert_eq!(s.host.mount_points(), Vec::<PathBuf>::new());
}

#[tokio::test]
async fn block_volume_and_request_errors_over_grpc() {
    // No master key on this node: the CHAP secret comes in NodeStage's secrets.
    let mut s = serve(None).await;
    let c = &mut s.client;
    let v = vol("b10c");
    let t = target_iqn(&v);
    s.host
        .add_target(&t, &[PORTAL], 1, Bytes::gib(2), Some(key().credentials(&v)));
    let staging =
        PathBuf::from("/var/lib/kubelet/plugins/kubernetes.io/csi/volumeDevices/staging/pvc-b");
    let dev = PathBuf::from(
        "/var/lib/kubelet/plugins/kubernetes.io/csi/volumeDevices/publish/pvc-b/pod1",
    );

    assert_eq!(
        code(c.node_stage_volume(stage_req(&v, &staging, block())).await),
        Code::FailedPrecondition,
        "CHAP needed, no secret anywhere"
    );
    let mut req = stage_req(&v, &staging, block());
    req.secrets = HashMap::from([("chapSecret".to_owned(), key().credentials(&v).secret)]);
    c.node_stage_volume(req.clone()).await.expect("stage block");
    c.node_stage_volume(req).await.expect("stage block again");
    c.node_publish_volume(publish_req(&v, &staging, &dev, block(), false))
        .await
        .expect("publish block");
    let st = c
        .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
            volume_id: v.to_string(),
            volume_path: dev.display().to_string(),
            staging_target_path: String::new(),
        })
        .await
        .expect("stats")
        .into_inner();
    assert_eq!(
        st.usage
            .iter()
            .map(|u| (u.unit, u.total))
            .collect::<Vec<_>>(),
        vec![(
            pb::volume_usage::Unit::Bytes as i32,
            Bytes::gib(2).get() as i64
        )]
    );

    // Requests the edge refuses.
    let mut no_id = stage_req(&v, &staging, block());
    no_id.volume_id.clear();
    assert_eq!(
        code(c.node_stage_volume(no_id).await),
        Code::InvalidArgument
    );
    let mut no_ctx = stage_req(&vol("other"), Path::new("/s2"), block());
    no_ctx.publish_context.remove("targetIqn");
    assert_eq!(
        code(c.node_stage_volume(no_ctx).await),
        Code::InvalidArgument
    );
    let mut relative = stage_req(&v, &staging, block());
    relative.staging_target_path = "relative/path".into();
    assert_eq!(
        code(c.node_stage_volume(relative).await),
        Code::InvalidArgument
    );
    let mut no_cap = stage_req(&v, &staging, block());
    no_cap.volume_capability = None;
    assert_eq!(
        code(c.node_stage_volume(no_cap).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
                volume_id: v.to_string(),
                target_path: String::new(),
            })
            .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
                volume_id: "Not A Volume".into(),
                volume_path: "/x".into(),
                staging_target_path: String::new(),
            })
            .await
        ),
        Code::NotFound
    );
    // A target that does not admit this node: NOT_FOUND.
    let hidden = vol("hidden");
    let mut req = stage_req(&hidden, Path::new("/s3"), mount("ext4"));
    req.secrets = HashMap::from([("chapSecret".to_owned(), "x".repeat(24))]);
    assert_eq!(code(c.node_stage_volume(req).await), Code::NotFound);

    c.node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
        volume_id: v.to_string(),
        target_path: dev.display().to_string(),
    })
    .await
    .expect("unpublish");
    c.node_unstage_volume(pb::NodeUnstageVolumeRequest {
        volume_id: v.to_string(),
        staging_target_path: staging.display().to_string(),
    })
    .await
    .expect("unstage");
    assert_eq!(s.host.mount_points(), Vec::<PathBuf>::new());
    assert_eq!(s.host.session_portals(&t), Vec::<String>::new());
}

/// The real binary, killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn the_binary_answers_node_info_and_capabilities() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("node.sock");
    let name_file = dir.path().join("initiatorname.iscsi");
    std::fs::write(
        &name_file,
        "## DO NOT EDIT OR REMOVE THIS FILE!\nInitiatorName=iqn.2025-01.io.cinderblock.e2e:comp\n",
    )
    .expect("write initiator name");
    let child = Command::new(BIN)
        .args([
            "node",
            "--endpoint",
            &format!("unix://{}", sock.display()),
            "--node-name",
            "comp-1",
            "--zone",
            "z9",
            "--initiator-name-file",
            &name_file.display().to_string(),
        ])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn cinderblock node");
    let _proc = Proc(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            sock.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let channel = transport::connect(&Endpoint::Unix(sock.clone()), false)
        .await
        .expect("connect");
    let mut c = NodeClient::new(channel);
    let info = c
        .node_get_info(pb::NodeGetInfoRequest {})
        .await
        .expect("info")
        .into_inner();
    assert_eq!(info.node_id, "comp-1/iqn.2025-01.io.cinderblock.e2e:comp");
    assert_eq!(info.max_volumes_per_node, 64);
    assert_eq!(
        info.accessible_topology
            .and_then(|t| t.segments.get("topology.cinderblock.dev/zone").cloned()),
        Some("z9".to_owned())
    );
    let caps = c
        .node_get_capabilities(pb::NodeGetCapabilitiesRequest {})
        .await
        .expect("caps")
        .into_inner();
    assert_eq!(caps.capabilities.len(), 5);

    // The name is read at each call: without it, FAILED_PRECONDITION.
    std::fs::write(&name_file, "GenerateName=yes\n").expect("rewrite");
    assert_eq!(
        code(c.node_get_info(pb::NodeGetInfoRequest {}).await),
        Code::FailedPrecondition
    );
}
