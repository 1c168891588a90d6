//! The node's logic against the fake host: every RPC twice, shared portals, reference counts
//! from the mount table, reconciliation, expansion, statistics and errors.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::fake::FakeHost;
use super::*;
use crate::agent::chap::ChapKey;
use crate::agent::ids::target_iqn;
use crate::agent::VolumeId;
use crate::controller::AccessMode;
use crate::exec::iscsiadm::Failure;
use crate::exec::mount::Content;
use crate::types::Bytes;

const PORTAL: &str = "192.168.77.1:3260";
const PORTAL2: &str = "192.168.78.1:3260";
const INITIATOR: &str = "iqn.1993-08.org.debian:01:comp";

fn key() -> ChapKey {
    ChapKey::new(b"a shared master key, 32 bytes long".to_vec()).unwrap()
}

fn vol(id: &str) -> VolumeId {
    VolumeId::parse(id).unwrap()
}

fn ext4() -> Access {
    Access::Mount {
        fs: "ext4".into(),
        flags: vec!["noatime".into()],
    }
}

struct Bed {
    host: Arc<FakeHost>,
    node: Node,
}

impl Bed {
    fn new() -> Bed {
        Bed::with_key(Some(key()))
    }

    fn with_key(k: Option<ChapKey>) -> Bed {
        let host = Arc::new(FakeHost::new(INITIATOR));
        let settings = NodeSettings {
            node_name: "comp".into(),
            zone: "z1".into(),
            max_volumes_per_node: 10,
            attach_timeout: Duration::from_millis(300),
            poll_interval: Duration::from_millis(1),
        };
        let node = Node::new(settings, host.clone(), host.clone(), k);
        Bed { host, node }
    }

    /// A volume exported through `portals` with CHAP from the shared key.
    fn export(&self, v: &VolumeId, portals: &[&str], size: Bytes) {
        let creds = key().credentials(v);
        self.host
            .add_target(&target_iqn(v), portals, 1, size, Some(creds));
    }

    fn stage_req(&self, v: &VolumeId, staging: &Path, access: Access) -> StageRequest {
        self.stage_req_at(v, staging, access, &[PORTAL])
    }

    fn stage_req_at(
        &self,
        v: &VolumeId,
        staging: &Path,
        access: Access,
        portals: &[&str],
    ) -> StageRequest {
        StageRequest {
            volume: v.clone(),
            staging_path: staging.to_owned(),
            access,
            mode: AccessMode::SingleNodeWriter,
            attachment: Attachment {
                portals: portals.iter().map(|p| Portal::parse(p).unwrap()).collect(),
                target: crate::agent::Iqn::parse(&target_iqn(v)).unwrap(),
                lun: 1,
                chap_user: Some(key().credentials(v).username),
            },
            secrets: None,
        }
    }

    fn publish_req(
        &self,
        v: &VolumeId,
        staging: &Path,
        target: &Path,
        access: Access,
    ) -> PublishRequest {
        PublishRequest {
            volume: v.clone(),
            staging_path: staging.to_owned(),
            target_path: target.to_owned(),
            access,
            mode: AccessMode::SingleNodeWriter,
            readonly: false,
        }
    }

    /// Log lines, then cleared.
    fn take_log(&self) -> Vec<String> {
        let l = self.host.log();
        self.host.clear_log();
        l
    }
}

fn staging(n: &str) -> PathBuf {
    PathBuf::from(format!(
        "/var/lib/kubelet/plugins/kubernetes.io/csi/csi.cinderblock.dev/{n}/globalmount"
    ))
}

fn pod_path(n: &str) -> PathBuf {
    PathBuf::from(format!(
        "/var/lib/kubelet/pods/{n}/volumes/kubernetes.io~csi/pvc/mount"
    ))
}

fn by_path(v: &VolumeId, portal: &str) -> String {
    format!(
        "/dev/disk/by-path/ip-{portal}-iscsi-{}-lun-1",
        target_iqn(v)
    )
}

fn err_text<T>(r: Result<T, NodeError>) -> Result<T, String> {
    r.map_err(|e| e.to_string())
}

#[tokio::test]
async fn info_is_host_and_initiator() {
    let b = Bed::new();
    let info = b.node.info().await.unwrap();
    assert_eq!(
        info,
        NodeInfo {
            node_id: format!("comp/{INITIATOR}"),
            zone: "z1".into(),
            max_volumes_per_node: 10
        }
    );
    let bare = Node::new(
        NodeSettings::default(),
        Arc::new(FakeHost::default()),
        Arc::new(FakeHost::default()),
        None,
    );
    assert!(matches!(
        bare.info().await,
        Err(NodeError::NoInitiatorName(_))
    ));
}

#[tokio::test]
async fn stage_twice_formats_once_and_mounts_once() {
    let b = Bed::new();
    let v = vol("0f1e");
    b.export(&v, &[PORTAL], Bytes::gib(1));
    let s = staging("a");
    b.node.stage(b.stage_req(&v, &s, ext4())).await.unwrap();
    let t = target_iqn(&v);
    let user = key().credentials(&v).username;
    assert_eq!(
        b.take_log(),
        vec![
            format!("record {t} {PORTAL} chap={user}"),
            format!("login {t} {PORTAL}"),
            "rescan 1".to_owned(),
            format!("mkfs ext4 {}", by_path(&v, PORTAL)),
            format!(
                "mount {} {} ext4 [noatime]",
                by_path(&v, PORTAL),
                s.display()
            ),
        ]
    );
    assert_eq!(
        b.host.records_of(&t),
        vec![(PORTAL.to_owned(), "manual".to_owned(), Some(user))]
    );
    // Again: observed, compared, nothing to do.
    b.node.stage(b.stage_req(&v, &s, ext4())).await.unwrap();
    assert_eq!(b.take_log(), Vec::<String>::new());
    assert_eq!(b.host.mount_points(), vec![s.clone()]);
}

#[tokio::test]
async fn stage_waits_for_udev() {
    let b = Bed::new();
    let v = vol("lag");
    b.export(&v, &[PORTAL], Bytes::gib(1));
    b.host.set_udev_lag(5);
    b.node
        .stage(b.stage_req(&v, &staging("a"), ext4()))
        .await
        .unwrap();
    assert_eq!(b.host.mount_points(), vec![staging("a")]);

    // A disk that never shows up: DEADLINE_EXCEEDED-class error naming the link.
    let w = vol("never");
    b.export(&w, &[PORTAL], Bytes::gib(1));
    b.host.set_udev_lag(u32::MAX);
    let e = b.node.stage(b.stage_req(&w, &staging("b"), ext4())).await;
    assert!(
        matches!(&e, Err(NodeError::DeviceTimeout { path, .. }) if path.display().to_string() == by_path(&w, PORTAL)),
        "{e:?}"
    );
}

#[tokio::test]
async fn existing_file_system_is_mounted_not_formatted() {
    let b = Bed::new();
    let v = vol("full");
    b.export(&v, &[PORTAL], Bytes::gib(1));
    b.host
        .set_content(&target_iqn(&v), 1, Content::Filesystem("ext4".into()));
    b.node
        .stage(b.stage_req(&v, &staging("a"), ext4()))
        .await
        .unwrap();
    assert!(
        !b.host.log().iter().any(|l| l.starts_with("mkfs")),
        "{:?}",
        b.host.log()
    );
}

#[tokio::test]
async fn content_that_is_not_asked_for_is_refused() {
    let cases = [
        (
            Content::Other("swap".into()),
            ext4(),
            AccessMode::SingleNodeWriter,
        ),
        (
            Content::Filesystem("ext4".into()),
            Access::Mount {
                fs: "xfs".into(),
                flags: vec![],
            },
            AccessMode::SingleNodeWriter,
        ),
        (Content::Blank, ext4(), AccessMode::SingleNodeReaderOnly),
    ];
    for (content, access, mode) in cases {
        let b = Bed::new();
        let v = vol("c");
        b.export(&v, &[PORTAL], Bytes::gib(1));
        b.host.set_content(&target_iqn(&v), 1, content.clone());
        let mut req = b.stage_req(&v, &staging("a"), access);
        req.mode = mode;
        let e = b.node.stage(req).await;
        assert!(
            matches!(e, Err(NodeError::UnexpectedContent { .. })),
            "{content:?}: {e:?}"
        );
        assert!(!b
            .host
            .log()
            .iter()
            .any(|l| l.starts_with("mkfs") || l.starts_with("mount")));
    }
}

#[tokio::test]
async fn read_only_modes_mount_read_only_and_xfs_gets_nouuid() {
    let b = Bed::new();
    let v = vol("ro");
    b.export(&v, &[PORTAL], Bytes::gib(1));
    b.host
        .set_content(&target_iqn(&v), 1, Content::Filesystem("xfs".into()));
    let mut req = b.stage_req(
        &v,
        &staging("a"),
        Access::Mount {
            fs: "xfs".into(),
            flags: vec![],
        },
    );
    req.mode = AccessMode::MultiNodeReaderOnly;
    b.node.stage(req).await.unwrap();
    let log = b.host.log();
    assert_eq!(
        log.last().map(String::as_str),
        Some(
            format!(
                "mount {} {} xfs [ro,nouuid]",
                by_path(&v, PORTAL),
                staging("a").display()
            )
            .as_str()
        )
    );
}

#[tokio::test]
async fn stage_conflicts_are_already_exists() {
    let b = Bed::new();
    let v = vol("x1");
    let w = vol("x2");
    b.export(&v, &[PORTAL], Bytes::gib(1));
    b.export(&w, &[PORTAL], Bytes::gib(1));
    let s = staging("a");
    b.node.stage(b.stage_req(&v, &s, ext4())).await.unwrap();
    let xfs = Access::Mount {
        fs: "xfs".into(),
        flags: vec![],
    };
    for (req, why) in [
        (b.stage_req(&v, &s, Access::Block), "block over mount"),
        (b.stage_req(&v, &s, xfs), "other fs"),
        (b.stage_req(&w, &s, ext4()), "other volume"),
    ] {
        let e = b.node.stage(req).await;
        assert!(matches!(e, Err(NodeError::Incompatible(_))), "{why}: {e:?}");
    }
}

#[tokio::test]
async fn context_of_another_volume_is_invalid() {
    let b = Bed::new();
    let v = vol("mine");
    let mut req = b.stage_req(&v, &staging("a"), ext4());
    req.attachment.target = crate::agent::Iqn::parse(&target_iqn(&vol("theirs"))).unwrap();
    assert!(matches!(
        b.node.stage(req).await,
        Err(NodeError::InvalidArgument(_))
    ));
    let mut req = b.stage_req(
        &v,
        &staging("a"),
        Access::Mount {
            fs: "btrfs".into(),
            flags: vec![],
        },
    );
    req.attachment.target = crate::agent::Iqn::parse(&target_iqn(&v)).unwrap();
    assert!(matches!(
        b.node.stage(req).await,
        Err(NodeError::InvalidArgument(_))
    ));
}

#[tokio::test]
async fn chap_from_key_secrets_or_nowhere() {
    // Without a key and without secrets: no secret to log in with.
    let b = Bed::with_key(None);
    let v = vol("chap");
    b.export(&v, &[PORTAL], Bytes::gib(1));
    let e = b.node.stage(b.stage_req(&v, &staging("a"), ext4())).await;
    assert!(matches!(e, Err(NodeError::NoChapSecret(_))), "{e:?}");
    // Secrets from the request work without a key.
    let mut req = b.stage_req(&v, &staging("a"), ext4());
    req.secrets = Some(key().credentials(&v));
    b.node.stage(req).await.unwrap();
    // A wrong secret is the target's refusal, classified.
    let w = vol("chap2");
    b.export(&w, &[PORTAL], Bytes::gib(1));
    let mut req = b.stage_req(&w, &staging("b"), ext4());
    req.secrets = Some(crate::agent::chap::ChapCredentials {
        username: key().credentials(&w).username,
        secret: "not-the-secret-at-all".into(),
    });
    match b.node.stage(req).await {
        Err(NodeError::Login { source, tried, .. }) => {
            assert_eq!(source.failure(), Some(Failure::AuthFailed));
            assert_eq!(tried.len(), 1);
            assert!(!tried[0].contains("not-the-secret"), "{tried:?}");
        }
        other => panic!("{other:?}"),
    }
    // The failed login left no record behind.
    assert_eq!(b.host.records_of(&target_iqn(&w)), vec![]);
}

#[tokio::test]
async fn login_falls_back_to_the_next_portal() {
    let b = Bed::new();
    let v = vol("multi");
    b.export(&v, &[PORTAL, PORTAL2], Bytes::gib(1));
    b.host.set_reachable(PORTAL, false);
    b.node
        .stage(b.stage_req_at(&v, &staging("a"), ext4(), &[PORTAL, PORTAL2]))
        .await
        .unwrap();
    assert_eq!(
        b.host.session_portals(&target_iqn(&v)),
        vec![PORTAL2.to_owned()]
    );
    assert_eq!(
        b.host.records_of(&target_iqn(&v)).len(),
        1,
        "the failed portal's record is gone"
    );
    // Staged again with the first portal back: the existing session is used, not a second.
    b.host.set_reachable(PORTAL, true);
    b.node
        .stage(b.stage_req_at(&v, &staging("a"), ext4(), &[PORTAL, PORTAL2]))
        .await
        .unwrap();
    assert_eq!(
        b.host.session_portals(&target_iqn(&v)),
        vec![PORTAL2.to_owned()]
    );
    // A target this node may not see: NOT_FOUND-class refusal.
    let w = vol("hidden");
    let e = b.node.stage(b.stage_req(&w, &staging("b"), ext4())).await;
    assert!(
        matches!(&e, Err(NodeError::Login { source, .. }) if source.failure() == Some(Failure::LoginRefused)),
        "{e:?}"
    );
}

#[tokio::test]
async fn two_volumes_one_portal_unstage_one_keeps_the_other_session() {
    let b = Bed::new();
    let (v, w) = (vol("one"), vol("two"));
    b.export(&v, &[PORTAL], Bytes::gib(1));
    b.export(&w, &[PORTAL], Bytes::gib(1));
    b.node
        .stage(b.stage_req(&v, &staging("v"), ext4()))
        .await
        .unwrap();
    b.node
        .stage(b.stage_req(&w, &staging("w"), Access::Block))
        .await
        .unwrap();
    b.take_log();
    b.node.unstage(&v, &staging("v")).await.unwrap();
    let (tv, tw) = (target_iqn(&v), target_iqn(&w));
    assert_eq!(
        b.take_log(),
        vec![
            format!("umount {}", staging("v").display()),
            "flush sdb".to_owned(),
            "delete sdb".to_owned(),
            format!("logout {tv} {PORTAL}"),
            format!("delete record {tv} {PORTAL}"),
        ]
    );
    assert_eq!(b.host.session_portals(&tw), vec![PORTAL.to_owned()]);
    assert_eq!(b.host.records_of(&tw).len(), 1);
    assert_eq!(b.host.disks_of(&tw), vec!["sdc".to_owned()]);
    // Unstaged again: nothing left to do.
    b.node.unstage(&v, &staging("v")).await.unwrap();
    assert_eq!(b.take_log(), Vec::<String>::new());
}

#[tokio::test]
async fn a_disk_still_mounted_elsewhere_keeps_its_session() {
    let b = Bed::new();
    let v = vol("busy");
    b.export(&v, &[PORTAL], Bytes::gib(1));
    let s = staging("a");
    b.node.stage(b.stage_req(&v, &s, ext4())).await.unwrap();
    let p = pod_path("p1");
    b.node
        .publish(b.publish_req(&v, &s, &p, ext4()))
        .await
        .unwrap();
    // The CO unstages before unpublishing: the staging mount goes, the disk stays attached.
    let e = b.node.unstage(&v, &s).await;
    match e {
        Err(NodeError::InUse { users, .. }) => assert_eq!(users, vec![p.display().to_string()]),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        b.host.session_portals(&target_iqn(&v)),
        vec![PORTAL.to_owned()]
    );
    b.node.unpublish(&v, &p).await.unwrap();
    b.node.unstage(&v, &s).await.unwrap();
    assert_eq!(
        b.host.session_portals(&target_iqn(&v)),
        Vec::<String>::new()
    );
    assert_eq!(b.host.mount_points(), Vec::<PathBuf>::new());
    // A holder (device-mapper on top) also keeps it.
    b.node.stage(b.stage_req(&v, &s, ext4())).await.unwrap();
    b.node
        .unstage(&v, &s)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    b.node
        .stage(b.stage_req(&v, &s, Access::Block))
        .await
        .unwrap();
    let disk = b.host.disks_of(&target_iqn(&v)).remove(0);
    b.host.add_holder(&disk, "dm-0");
    assert!(matches!(
        b.node.unstage(&v, &s).await,
        Err(NodeError::InUse { .. })
    ));
}

#[tokio::test]
async fn publish_twice_readonly_and_conflicts() {
    let b = Bed::new();
    let v = vol("pub");
    b.export(&v, &[PORTAL], Bytes::gib(1));
    let s = staging("a");
    let p = pod_path("p1");
    // Not staged yet, or no staging path at all.
    let e = b.node.publish(b.publish_req(&v, &s, &p, ext4())).await;
    assert!(matches!(e, Err(NodeError::NotStaged(_))), "{e:?}");
    let e = b
        .node
        .publish(b.publish_req(&v, Path::new(""), &p, ext4()))
        .await;
    assert!(matches!(e, Err(NodeError::NotStaged(_))), "{e:?}");

    b.node.stage(b.stage_req(&v, &s, ext4())).await.unwrap();
    b.take_log();
    let mut ro = b.publish_req(&v, &s, &p, ext4());
    ro.readonly = true;
    b.node.publish(ro.clone()).await.unwrap();
    assert_eq!(
        b.take_log(),
        vec![
            format!("bind {} {}", s.display(), p.display()),
            format!("remount-ro {}", p.display()),
        ]
    );
    b.node.publish(ro).await.unwrap();
    assert_eq!(
        b.take_log(),
        Vec::<String>::new(),
        "second publish: nothing to do"
    );
    // Read-write asked where it is published read-only.
    let e = b.node.publish(b.publish_req(&v, &s, &p, ext4())).await;
    assert!(matches!(e, Err(NodeError::Incompatible(_))), "{e:?}");
    // Block asked of a volume staged as a file system.
    let e = b
        .node
        .publish(b.publish_req(&v, &s, &pod_path("p2"), Access::Block))
        .await;
    assert!(matches!(e, Err(NodeError::NotStaged(_))), "{e:?}");
    // Another path is fine for SINGLE_NODE_WRITER, not for SINGLE_NODE_SINGLE_WRITER.
    let mut single = b.publish_req(&v, &s, &pod_path("p3"), ext4());
    single.mode = AccessMode::SingleNodeSingleWriter;
    let e = b.node.publish(single).await;
    assert!(matches!(e, Err(NodeError::ExceedsCapabilities(_))), "{e:?}");
    b.node
        .publish(b.publish_req(&v, &s, &pod_path("p4"), ext4()))
        .await
        .unwrap();

    // Another volume's mount at the target path.
    let w = vol("other");
    b.export(&w, &[PORTAL], Bytes::gib(1));
    b.node
        .stage(b.stage_req(&w, &staging("b"), ext4()))
        .await
        .unwrap();
    let e = b
        .node
        .publish(b.publish_req(&w, &staging("b"), &p, ext4()))
        .await;
    assert!(matches!(e, Err(NodeError::Incompatible(_))), "{e:?}");

    // Unpublish twice: the path goes, then nothing to do.
    b.node.unpublish(&v, &p).await.unwrap();
    assert!(!b.host.path_exists(&p));
    b.node.unpublish(&v, &p).await.unwrap();
}

#[tokio::test]
async fn a_publish_cut_before_its_remount_is_finished() {
    let b = Bed::new();
    let v = vol("cut");
    b.export(&v, &[PORTAL], Bytes::gib(1));
    let s = staging("a");
    let p = pod_path("p1");
    b.node.stage(b.stage_req(&v, &s, ext4())).await.unwrap();
    b.node
        .publish(b.publish_req(&v, &s, &p, ext4()))
        .await
        .unwrap();
    b.take_log();
    let mut ro = b.publish_req(&v, &s, &p, ext4());
    ro.readonly = true;
    b.node.publish(ro).await.unwrap();
    assert_eq!(b.take_log(), vec![format!("remount-ro {}", p.display())]);
}

#[tokio::test]
async fn block_volume_round_trip_leaves_nothing() {
    let b = Bed::new();
    let v = vol("blk");
    b.export(&v, &[PORTAL], Bytes::gib(2));
    let s =
        PathBuf::from("/var/lib/kubelet/plugins/kubernetes.io/csi/volumeDevices/staging/pvc-blk");
    let p = PathBuf::from(
        "/var/lib/kubelet/plugins/kubernetes.io/csi/volumeDevices/publish/pvc-blk/pod1",
    );
    b.host.mkdir(&s);
    b.node
        .stage(b.stage_req(&v, &s, Access::Block))
        .await
        .unwrap();
    b.node
        .stage(b.stage_req(&v, &s, Access::Block))
        .await
        .unwrap();
    let file = s.join(format!("ip-{PORTAL}-iscsi-{}-lun-1", target_iqn(&v)));
    assert_eq!(b.host.mount_points(), vec![file.clone()]);
    assert!(!b.host.log().iter().any(|l| l.starts_with("mkfs")));
    b.node
        .publish(b.publish_req(&v, &s, &p, Access::Block))
        .await
        .unwrap();
    b.node
        .publish(b.publish_req(&v, &s, &p, Access::Block))
        .await
        .unwrap();
    let st = b.node.stats(&v, &p).await.unwrap();
    assert_eq!(
        st,
        VolumeStats {
            bytes: Usage {
                total: Bytes::gib(2).get(),
                available: 0,
                used: 0
            },
            inodes: None,
            abnormal: None
        }
    );
    b.node.unpublish(&v, &p).await.unwrap();
    b.node.unstage(&v, &s).await.unwrap();
    assert_eq!(b.host.mount_points(), Vec::<PathBuf>::new());
    assert!(!b.host.path_exists(&file) && !b.host.path_exists(&p));
    assert!(b.host.path_exists(&s), "the CO's staging directory stays");
    assert_eq!(
        b.host.session_portals(&target_iqn(&v)),
        Vec::<String>::new()
    );

    // A stage cut short after the file was made: unstage removes the file too.
    b.node
        .stage(b.stage_req(&v, &s, Access::Block))
        .await
        .unwrap();
    let file = b.host.mount_points().remove(0);
    b.node.mounter.unmount(&file).await.unwrap();
    assert!(b.host.path_exists(&file));
    b.node.unstage(&v, &s).await.unwrap();
    assert!(!b.host.path_exists(&file));
}

#[tokio::test]
async fn stats_and_conditions() {
    let b = Bed::new();
    let v = vol("st");
    b.export(&v, &[PORTAL], Bytes::gib(1));
    let s = staging("a");
    let p = pod_path("p1");
    b.node.stage(b.stage_req(&v, &s, ext4())).await.unwrap();
    b.node
        .publish(b.publish_req(&v, &s, &p, ext4()))
        .await
        .unwrap();
    let st = b.node.stats(&v, &p).await.unwrap();
    let total = Bytes::gib(1).get();
    assert_eq!(
        st.bytes,
        Usage {
            total,
            available: total - Bytes::MIB,
            used: Bytes::MIB
        }
    );
    assert_eq!(st.inodes.map(|i| i.used), Some(11));
    assert_eq!(st.abnormal, None);
    // Not mounted there, not there at all, another volume's path.
    assert!(
        matches!(b.node.stats(&v, Path::new("/nowhere")).await, Err(NodeError::NotFound(m)) if m.contains("does not exist"))
    );
    b.host.mkdir(Path::new("/empty"));
    assert!(
        matches!(b.node.stats(&v, Path::new("/empty")).await, Err(NodeError::NotFound(m)) if m.contains("not mounted"))
    );
    assert!(matches!(
        b.node.stats(&vol("else"), &p).await,
        Err(NodeError::NotFound(_))
    ));

    b.host.force_read_only(&s);
    let st = b.node.stats(&v, &p).await.unwrap();
    assert!(
        st.abnormal
            .as_deref()
            .is_some_and(|m| m.contains("read-only")),
        "{st:?}"
    );
    b.host.set_session_state(&target_iqn(&v), "FAILED");
    let st = b.node.stats(&v, &p).await.unwrap();
    assert!(
        st.abnormal.as_deref().is_some_and(|m| m.contains("FAILED")),
        "{st:?}"
    );
    b.host.drop_sessions(&target_iqn(&v));
    let st = b.node.stats(&v, &p).await.unwrap();
    assert!(
        st.abnormal.as_deref().is_some_and(|m| m.contains("gone")),
        "{st:?}"
    );
}

#[tokio::test]
async fn a_session_left_down_gets_its_connection_stopped_for_recovery() {
    let b = Bed::new();
    let (v, w) = (vol("down"), vol("up"));
    b.export(&v, &[PORTAL], Bytes::gib(1));
    b.export(&w, &[PORTAL], Bytes::gib(1));
    for (x, n) in [(&v, "v"), (&w, "w")] {
        b.node
            .stage(b.stage_req(x, &staging(n), ext4()))
            .await
            .unwrap();
    }
    let (tv, tw) = (target_iqn(&v), target_iqn(&w));
    b.host.set_session_state(&tv, "FAILED");
    b.take_log();
    // While the portal is unreachable the reset is sent, and the session stays down.
    b.host.set_reachable(PORTAL, false);
    let mut repair = SessionRepair::new(Duration::ZERO);
    let first = b.node.repair_sessions(&mut repair).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(b.take_log(), vec![format!("reset-connection {}", first[0])]);
    let st = b.node.stats(&v, &staging("v")).await.unwrap();
    assert!(
        st.abnormal.as_deref().is_some_and(|m| m.contains("FAILED")),
        "{st:?}"
    );
    // Reachable again: the next round's reset brings it back; the healthy one is never touched.
    b.host.set_reachable(PORTAL, true);
    assert_eq!(b.node.repair_sessions(&mut repair).await.unwrap(), first);
    assert_eq!(b.take_log(), vec![format!("reset-connection {}", first[0])]);
    assert_eq!(
        b.node.stats(&v, &staging("v")).await.unwrap().abnormal,
        None
    );
    assert_eq!(
        b.node.repair_sessions(&mut repair).await.unwrap(),
        Vec::<u32>::new()
    );
    assert_eq!(b.take_log(), Vec::<String>::new());
    assert_eq!(b.host.session_portals(&tw), vec![PORTAL.to_owned()]);
    let counts = b.node.repair_counts();
    assert_eq!((counts.stopped.get(), counts.failed.get()), (2, 0));
}

#[tokio::test]
async fn expand_rescans_and_grows_the_file_system() {
    let b = Bed::new();
    let v = vol("grow");
    let t = target_iqn(&v);
    b.export(&v, &[PORTAL], Bytes::gib(1));
    let s = staging("a");
    let p = pod_path("p1");
    b.node.stage(b.stage_req(&v, &s, ext4())).await.unwrap();
    b.node
        .publish(b.publish_req(&v, &s, &p, ext4()))
        .await
        .unwrap();
    b.host.resize_lun(&t, 1, Bytes::gib(2));
    let req = ExpandRequest {
        volume: v.clone(),
        volume_path: p.clone(),
        required: Some(Bytes::gib(2)),
        limit: None,
    };
    assert_eq!(b.node.expand(req.clone()).await.unwrap(), Bytes::gib(2));
    assert_eq!(b.host.fs_size(&t, 1), Some(Bytes::gib(2)));
    assert_eq!(
        b.node.expand(req.clone()).await.unwrap(),
        Bytes::gib(2),
        "again: same answer"
    );
    assert_eq!(
        b.node.stats(&v, &p).await.unwrap().bytes.total,
        Bytes::gib(2).get()
    );

    // The target has not grown (yet): retryable.
    let mut bigger = req.clone();
    bigger.required = Some(Bytes::gib(3));
    assert!(matches!(
        b.node.expand(bigger).await,
        Err(NodeError::NotGrown { .. })
    ));
    // A file system with recorded errors: FAILED_PRECONDITION with the reason.
    b.host.set_fs_errors(&t, 1);
    match b.node.expand(req.clone()).await {
        Err(NodeError::Mount(MountError::NeedsCheck { reason, .. })) => {
            assert!(reason.contains("errors"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    let mut bad = req;
    bad.limit = Some(Bytes::gib(1));
    assert!(matches!(
        b.node.expand(bad).await,
        Err(NodeError::OutOfRange(_))
    ));
    let mut elsewhere = ExpandRequest {
        volume: v.clone(),
        volume_path: PathBuf::from("/nowhere"),
        required: None,
        limit: None,
    };
    assert!(matches!(
        b.node.expand(elsewhere.clone()).await,
        Err(NodeError::NotFound(_))
    ));
    // Block volumes: the disk's new size, no file system to grow.
    let w = vol("growblk");
    b.export(&w, &[PORTAL], Bytes::gib(1));
    b.node
        .stage(b.stage_req(&w, &staging("b"), Access::Block))
        .await
        .unwrap();
    b.host.resize_lun(&target_iqn(&w), 1, Bytes::gib(5));
    b.host.clear_log();
    elsewhere.volume = w.clone();
    elsewhere.volume_path =
        staging("b").join(format!("ip-{PORTAL}-iscsi-{}-lun-1", target_iqn(&w)));
    assert_eq!(b.node.expand(elsewhere).await.unwrap(), Bytes::gib(5));
    assert!(!b.host.log().iter().any(|l| l.starts_with("grow")));
}

#[tokio::test]
async fn a_lost_session_is_replaced_by_the_next_stage() {
    let b = Bed::new();
    let v = vol("lost");
    b.export(&v, &[PORTAL], Bytes::gib(1));
    let s = staging("a");
    b.node.stage(b.stage_req(&v, &s, ext4())).await.unwrap();
    b.host.drop_sessions(&target_iqn(&v));
    b.take_log();
    b.node.stage(b.stage_req(&v, &s, ext4())).await.unwrap();
    let log = b.take_log();
    assert_eq!(
        log.first().map(String::as_str),
        Some(format!("umount {}", s.display()).as_str()),
        "{log:?}"
    );
    assert!(log.iter().any(|l| l.starts_with("login")), "{log:?}");
    assert!(
        !log.iter().any(|l| l.starts_with("mkfs")),
        "the file system survived: {log:?}"
    );
    assert_eq!(b.host.mount_points(), vec![s]);
}

#[tokio::test]
async fn reconcile_cleans_stale_sessions_and_logs_staged_volumes_back_in() {
    let b = Bed::new();
    // Staged and healthy.
    let keep = vol("keep");
    b.export(&keep, &[PORTAL], Bytes::gib(1));
    b.node
        .stage(b.stage_req(&keep, &staging("keep"), ext4()))
        .await
        .unwrap();
    // Logged in, never mounted (a crash between login and mount).
    let stale = vol("stale");
    b.export(&stale, &[PORTAL], Bytes::gib(1));
    b.node
        .stage(b.stage_req(&stale, &staging("stale"), Access::Block))
        .await
        .unwrap();
    let file = staging("stale").join(format!("ip-{PORTAL}-iscsi-{}-lun-1", target_iqn(&stale)));
    b.node.mounter.unmount(&file).await.unwrap();
    // Staged, session lost behind the node's back (record kept).
    let lost = vol("lost");
    b.export(&lost, &[PORTAL], Bytes::gib(1));
    b.node
        .stage(b.stage_req(&lost, &staging("lost"), ext4()))
        .await
        .unwrap();
    b.host.drop_sessions(&target_iqn(&lost));
    // A record of ours with nothing behind it, and a foreign session that is not ours.
    let orphan = vol("orphan");
    b.node
        .initiator
        .create_record(&target_iqn(&orphan), &Portal::parse(PORTAL).unwrap(), None)
        .await
        .unwrap();
    let foreign = "iqn.2010-10.org.openstack:volume-x";
    b.host
        .add_target(foreign, &[PORTAL], 0, Bytes::gib(1), None);
    b.node
        .initiator
        .create_record(foreign, &Portal::parse(PORTAL).unwrap(), None)
        .await
        .unwrap();
    b.node.initiator.login(foreign, PORTAL).await.unwrap();

    let r = b.node.reconcile().await.unwrap();
    assert_eq!(r.logged_out, vec![target_iqn(&stale)]);
    assert_eq!(
        r.logged_in,
        vec![format!("{} at {PORTAL}", target_iqn(&lost))]
    );
    assert_eq!(
        r.records_deleted,
        vec![format!("{} at {PORTAL}", target_iqn(&orphan))]
    );
    assert!(r.failed.is_empty(), "{:?}", r.failed);
    assert_eq!(
        b.host.session_portals(&target_iqn(&keep)),
        vec![PORTAL.to_owned()]
    );
    assert_eq!(
        b.host.session_portals(&target_iqn(&lost)),
        vec![PORTAL.to_owned()]
    );
    assert_eq!(b.host.session_portals(foreign), vec![PORTAL.to_owned()]);
    assert_eq!(b.host.records_of(&target_iqn(&stale)), vec![]);
    // Nothing left to do the second time.
    let r = b.node.reconcile().await.unwrap();
    assert_eq!(
        (
            r.logged_out.len(),
            r.logged_in.len(),
            r.records_deleted.len(),
            r.failed.len()
        ),
        (0, 0, 0, 0)
    );
}

#[tokio::test]
async fn reconcile_without_record_rebuilds_it_from_the_key() {
    let b = Bed::new();
    let v = vol("rebuild");
    let t = target_iqn(&v);
    b.export(&v, &[PORTAL], Bytes::gib(1));
    b.node
        .stage(b.stage_req(&v, &staging("a"), ext4()))
        .await
        .unwrap();
    b.host.drop_sessions(&t);
    b.node.initiator.delete_record(&t, PORTAL).await.unwrap();
    let r = b.node.reconcile().await.unwrap();
    assert_eq!(r.logged_in.len(), 1, "{r:?}");
    assert_eq!(b.host.session_portals(&t), vec![PORTAL.to_owned()]);
    // Without the key it cannot.
    let nokey = Bed::with_key(None);
    nokey.export(&v, &[PORTAL], Bytes::gib(1));
    let mut req = nokey.stage_req(&v, &staging("a"), ext4());
    req.secrets = Some(key().credentials(&v));
    nokey.node.stage(req).await.unwrap();
    nokey.host.drop_sessions(&t);
    nokey
        .node
        .initiator
        .delete_record(&t, PORTAL)
        .await
        .unwrap();
    let r = nokey.node.reconcile().await.unwrap();
    assert!(
        matches!(r.failed.as_slice(), [(_, NodeError::NoChapSecret(_))]),
        "{r:?}"
    );
}

#[tokio::test]
async fn a_second_call_on_the_same_volume_is_aborted() {
    let b = Bed::new();
    let v = vol("race");
    b.export(&v, &[PORTAL], Bytes::gib(1));
    let held = b.node.guards.try_lock(v.as_str()).unwrap();
    let cases = [
        err_text(b.node.stage(b.stage_req(&v, &staging("a"), ext4())).await),
        err_text(b.node.unstage(&v, &staging("a")).await),
        err_text(
            b.node
                .publish(b.publish_req(&v, &staging("a"), &pod_path("p"), ext4()))
                .await,
        ),
        err_text(b.node.unpublish(&v, &pod_path("p")).await),
    ];
    for c in cases {
        assert_eq!(
            c,
            Err(format!("an operation on volume {v} is already in progress"))
        );
    }
    drop(held);
    b.node
        .stage(b.stage_req(&v, &staging("a"), ext4()))
        .await
        .unwrap();
}
