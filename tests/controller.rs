//! The real `cinderblock controller` in front of three real `cinderblock agent` processes (file
//! pools, each agent with its own private real tgtd, distinct zones and capabilities), driven
//! through a real tonic CSI client over a Unix socket: placement by zones, types and free
//! space; a burst of 30 creates; every Controller RPC with retries, races, pagination and
//! error codes; cross-agent copies and retype with migration, bytes compared on disk.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod common;
#[path = "common/stack.rs"]
mod stack;

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use cinderblock::csi::TOPOLOGY_ZONE_KEY;
use cinderblock::proto::csi as pb;
use cinderblock::proto::csi::controller_client::ControllerClient;
use pb::volume_capability::{access_mode::Mode, AccessMode, AccessType, BlockVolume, MountVolume};
use stack::{AgentSpec, Stack};
use tonic::transport::Channel;
use tonic::Code;

type Client = ControllerClient<Channel>;

const GIB: i64 = 1 << 30;
const MIB: i64 = 1 << 20;
const NODE1: &str = "node-1/iqn.1993-08.org.debian:01:node1";
const NODE2: &str = "node-2/iqn.1993-08.org.debian:01:node2";

fn mount() -> pb::VolumeCapability {
    mount_mode("ext4", Mode::SingleNodeWriter)
}

fn mount_mode(fs: &str, mode: Mode) -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            ..Default::default()
        })),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

fn block(mode: Mode) -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

fn topo(zone: &str) -> pb::Topology {
    pb::Topology {
        segments: HashMap::from([(TOPOLOGY_ZONE_KEY.to_string(), zone.to_string())]),
    }
}

fn params(kv: &[(&str, &str)]) -> HashMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn create_req(name: &str, bytes: i64) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(pb::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount()],
        ..Default::default()
    }
}

async fn create(c: &mut Client, r: pb::CreateVolumeRequest) -> Result<pb::Volume, tonic::Status> {
    c.create_volume(r)
        .await
        .map(|r| r.into_inner().volume.expect("volume"))
}

fn zone_of(v: &pb::Volume) -> String {
    v.accessible_topology
        .first()
        .and_then(|t| t.segments.get(TOPOLOGY_ZONE_KEY).cloned())
        .unwrap_or_default()
}

fn code<T>(r: &Result<T, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

/// Waits until the controller knows every agent's pool (GetCapacity > 0 in each zone).
async fn wait_ready(stack: &Stack, c: &mut Client) {
    let deadline = Instant::now() + Duration::from_secs(30);
    for a in &stack.agents {
        loop {
            let cap = c
                .get_capacity(pb::GetCapacityRequest {
                    accessible_topology: Some(topo(a.spec.zone)),
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner().available_capacity);
            if matches!(cap, Ok(n) if n > 0) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "controller never saw agent {}: {cap:?}\n{}",
                a.spec.name,
                stack.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn start(specs: Vec<AgentSpec>) -> (Stack, Client) {
    let stack = tokio::task::spawn_blocking(move || Stack::start(&specs))
        .await
        .expect("stack");
    let mut c = stack.client().await;
    wait_ready(&stack, &mut c).await;
    (stack, c)
}

fn volume_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    n.starts_with("volume-") && n.ends_with(".img")
                })
                .count()
        })
        .unwrap_or(0)
}

fn read_file(path: &std::path::Path, offset: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset).expect("read image");
    buf
}

fn write_pattern(path: &std::path::Path, offset: u64, pattern: &[u8]) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    f.write_all_at(pattern, offset).expect("write pattern");
    f.sync_all().expect("sync");
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 31 + usize::from(seed)) % 251) as u8)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn placement_follows_zones_types_and_free_space_and_a_burst_spreads() {
    let (stack, mut c) = start(AgentSpec::three_zones()).await;
    // (request, zone or error code)
    let with = |name: &str, p: &[(&str, &str)], requisite: &[&str], preferred: &[&str]| {
        let mut r = create_req(name, GIB);
        r.parameters = params(p);
        if !requisite.is_empty() || !preferred.is_empty() {
            r.accessibility_requirements = Some(pb::TopologyRequirement {
                requisite: requisite.iter().map(|z| topo(z)).collect(),
                preferred: preferred.iter().map(|z| topo(z)).collect(),
            });
        }
        r
    };
    let cases = [
        (with("p-any", &[], &[], &[]), Ok("z1")),
        (with("p-z2", &[], &["z2", "z3"], &[]), Ok("z2")),
        (with("p-pref", &[], &["z1", "z3"], &["z3", "z1"]), Ok("z3")),
        (with("p-ssd", &[("type", "ssd")], &[], &[]), Ok("z1")),
        (with("p-hdd", &[("type", "hdd")], &[], &[]), Ok("z2")),
        (
            with("p-none", &[("type", "hdd")], &["z1", "z3"], &[]),
            Err(Code::ResourceExhausted),
        ),
        (
            with(
                "p-k8s",
                &[("csi.storage.k8s.io/pvc/name", "x")],
                &["z3"],
                &[],
            ),
            Ok("z3"),
        ),
    ];
    let mut made = Vec::new();
    for (r, want) in cases {
        let got = create(&mut c, r.clone()).await;
        if let Ok(v) = &got {
            made.push(v.volume_id.clone());
        }
        assert_eq!(
            got.as_ref().map(zone_of).map_err(|s| s.code()),
            want.map(str::to_string),
            "{}: {got:?}",
            r.name
        );
    }
    let none = create(
        &mut c,
        with("p-none", &[("type", "hdd")], &["z1", "z3"], &[]),
    )
    .await;
    let msg = none
        .err()
        .map(|s| s.message().to_owned())
        .unwrap_or_default();
    assert_eq!(
        msg,
        "no pool can hold the volume: a#a: capability media=ssd does not satisfy \"hdd\"; \
         b#b: zone \"z2\" is not among the requisite zones (z1, z3); \
         c#c: capability media is not reported (wanted \"hdd\")"
    );
    // Free space: each pool holds 2 GiB now (10, 8 and 6 GiB left). 9 GiB fits only a; then
    // 7 GiB fits only b; then another 7 GiB fits nowhere.
    let big = create(&mut c, create_req("p-9g", 9 * GIB)).await;
    assert_eq!(
        big.as_ref().map(zone_of).map_err(|s| s.code()),
        Ok("z1".to_string())
    );
    let bigger = create(&mut c, create_req("p-7g", 7 * GIB)).await;
    assert_eq!(
        bigger.as_ref().map(zone_of).map_err(|s| s.code()),
        Ok("z2".to_string())
    );
    let too_big = create(&mut c, create_req("p-7g-2", 7 * GIB)).await;
    assert_eq!(code(&too_big), Code::ResourceExhausted);
    for v in [big, bigger].into_iter().flatten() {
        made.push(v.volume_id);
    }
    for id in made {
        let r = c
            .delete_volume(pb::DeleteVolumeRequest {
                volume_id: id.clone(),
                ..Default::default()
            })
            .await;
        assert_eq!(code(&r), Code::Ok, "{id}");
    }

    // A burst of 30 concurrent 1 GiB creates fills 12/10/8 exactly (capacity weigher spreads,
    // in-memory charges stop each pool at its size), and a 31st finds no room.
    let mut tasks = Vec::new();
    for i in 0..30 {
        let mut client = c.clone();
        tasks.push(tokio::spawn(async move {
            create(&mut client, create_req(&format!("burst-{i}"), GIB)).await
        }));
    }
    let mut per_zone: BTreeMap<String, usize> = BTreeMap::new();
    for t in tasks {
        let v = t.await.expect("task");
        let v = v.unwrap_or_else(|s| panic!("burst create failed: {s:?}\n{}", stack.logs()));
        *per_zone.entry(zone_of(&v)).or_default() += 1;
    }
    assert_eq!(
        per_zone,
        BTreeMap::from([("z1".into(), 12), ("z2".into(), 10), ("z3".into(), 8)])
    );
    let files: Vec<usize> = stack
        .agents
        .iter()
        .map(|a| volume_files(&a.pool_dir))
        .collect();
    assert_eq!(files, [12, 10, 8]);
    let extra = create(&mut c, create_req("burst-31", GIB)).await;
    assert_eq!(code(&extra), Code::ResourceExhausted);
    // The agents' own statistics agree once refreshed: nothing was over-provisioned.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for a in &stack.agents {
        let cap = c
            .get_capacity(pb::GetCapacityRequest {
                accessible_topology: Some(topo(a.spec.zone)),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().available_capacity);
        assert_eq!(cap.map_err(|s| s.code()), Ok(0), "agent {}", a.spec.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_controller_rpc_through_the_real_client() {
    let (stack, mut c) = start(AgentSpec::three_zones()).await;

    // ControllerGetCapabilities.
    let caps = c
        .controller_get_capabilities(pb::ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .len();
    assert_eq!(caps, 14);

    // CreateVolume: a retry returns the same volume; racing duplicates never make two.
    let first = create(&mut c, create_req("vol-1", 100 * MIB)).await;
    let again = create(&mut c, create_req("vol-1", 100 * MIB)).await;
    let v1 = first.unwrap();
    assert_eq!(again.map_err(|s| s.code()), Ok(v1.clone()));
    assert_eq!(
        (v1.capacity_bytes, zone_of(&v1)),
        (100 * MIB, "z1".to_string())
    );
    let (mut c1, mut c2) = (c.clone(), c.clone());
    let (x, y) = tokio::join!(
        create(&mut c1, create_req("race", 64 * MIB)),
        create(&mut c2, create_req("race", 64 * MIB))
    );
    let codes = [code(&x), code(&y)];
    assert!(
        codes.contains(&Code::Ok) && codes.iter().all(|k| [Code::Ok, Code::Aborted].contains(k)),
        "{codes:?}"
    );
    let race = create(&mut c, create_req("race", 64 * MIB)).await.unwrap();
    for r in [x, y].into_iter().flatten() {
        assert_eq!(r.volume_id, race.volume_id);
    }
    let race_files: usize = stack
        .agents
        .iter()
        .map(|a| {
            a.pool_dir
                .join(format!("volume-{}.img", race.volume_id))
                .exists() as usize
        })
        .sum();
    assert_eq!(race_files, 1);

    // CreateVolume error codes.
    let mut no_caps = create_req("e-nocaps", GIB);
    no_caps.volume_capabilities.clear();
    let mut btrfs = create_req("e-btrfs", GIB);
    btrfs.volume_capabilities = vec![mount_mode("btrfs", Mode::SingleNodeWriter)];
    let mut mnmw_mount = create_req("e-mnmw", GIB);
    mnmw_mount.volume_capabilities = vec![mount_mode("ext4", Mode::MultiNodeMultiWriter)];
    let mut mnmw_block_plain = create_req("e-mnmw-b", GIB);
    mnmw_block_plain.volume_capabilities = vec![block(Mode::MultiNodeMultiWriter)];
    let mut mnmw_block_shared = create_req("shared-1", GIB);
    mnmw_block_shared.volume_capabilities = vec![block(Mode::MultiNodeMultiWriter)];
    mnmw_block_shared.parameters = params(&[("type", "shared")]);
    let mut range = create_req("e-range", 2 * GIB);
    range.capacity_range.as_mut().unwrap().limit_bytes = GIB;
    let mut unknown_snap = create_req("e-src", GIB);
    unknown_snap.volume_content_source = Some(pb::VolumeContentSource {
        r#type: Some(pb::volume_content_source::Type::Snapshot(
            pb::volume_content_source::SnapshotSource {
                snapshot_id: "no-such-snapshot".into(),
            },
        )),
    });
    let mut bad_param = create_req("e-param", GIB);
    bad_param.parameters = params(&[("fsType", "ext4")]);
    let mut bad_type = create_req("e-type", GIB);
    bad_type.parameters = params(&[("type", "gold")]);
    let cases = [
        (create_req("", GIB), Code::InvalidArgument),
        (no_caps, Code::InvalidArgument),
        (btrfs, Code::InvalidArgument),
        (mnmw_mount, Code::InvalidArgument),
        (mnmw_block_plain, Code::InvalidArgument),
        (mnmw_block_shared, Code::Ok),
        (bad_param, Code::InvalidArgument),
        (bad_type, Code::InvalidArgument),
        (create_req("vol-1", 200 * MIB), Code::AlreadyExists),
        (range, Code::OutOfRange),
        (unknown_snap, Code::NotFound),
        (create_req("e-huge", 100 * GIB), Code::ResourceExhausted),
    ];
    for (r, want) in cases {
        let got = create(&mut c, r.clone()).await;
        assert_eq!(code(&got), want, "{}: {got:?}", r.name);
    }

    // ValidateVolumeCapabilities.
    let validate =
        |id: &str, caps: Vec<pb::VolumeCapability>| pb::ValidateVolumeCapabilitiesRequest {
            volume_id: id.into(),
            volume_capabilities: caps,
            ..Default::default()
        };
    let ok = c
        .validate_volume_capabilities(validate(&v1.volume_id, vec![mount()]))
        .await
        .map(|r| r.into_inner().confirmed.is_some());
    assert_eq!(ok.map_err(|s| s.code()), Ok(true));
    let unsupported = c
        .validate_volume_capabilities(validate(
            &v1.volume_id,
            vec![mount_mode("btrfs", Mode::SingleNodeWriter)],
        ))
        .await
        .map(|r| r.into_inner());
    assert_eq!(
        unsupported
            .map(|r| (r.confirmed.is_some(), r.message))
            .map_err(|s| s.code()),
        Ok((
            false,
            "filesystem \"btrfs\" is not supported (use ext4 or xfs)".to_string()
        ))
    );
    for (r, want) in [
        (
            validate("00000000-0000-5000-8000-000000000000", vec![mount()]),
            Code::NotFound,
        ),
        (validate(&v1.volume_id, vec![]), Code::InvalidArgument),
        (validate("", vec![mount()]), Code::InvalidArgument),
    ] {
        let got = c.validate_volume_capabilities(r.clone()).await;
        assert_eq!(code(&got), want, "{r:?}");
    }

    // ControllerPublishVolume: export on a's real tgtd; no secret in the context.
    let publish =
        |id: &str, node: &str, cap: pb::VolumeCapability| pb::ControllerPublishVolumeRequest {
            volume_id: id.into(),
            node_id: node.into(),
            volume_capability: Some(cap),
            ..Default::default()
        };
    let ctx = c
        .controller_publish_volume(publish(&v1.volume_id, NODE1, mount()))
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    let ctx: BTreeMap<String, String> = ctx.into_iter().collect();
    let a = stack.agent("a");
    let target = format!("iqn.2026-01.dev.cinderblock:volume-{}", v1.volume_id);
    assert_eq!(
        ctx.iter()
            .filter(|(k, _)| *k != "chapUser")
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect::<Vec<_>>(),
        [
            ("lun", "1"),
            ("portals", a.tgtd.portal().as_str()),
            ("targetIqn", target.as_str())
        ]
    );
    assert_eq!(
        ctx.get("chapUser").map(|u| u.starts_with("cb-")),
        Some(true)
    );
    let shown = a.tgtd.tgtadm_ok(&["--op", "show", "--mode", "target"]);
    assert!(shown.contains(&target), "{shown}");
    assert!(shown.contains("iqn.1993-08.org.debian:01:node1"), "{shown}");
    let again = c
        .controller_publish_volume(publish(&v1.volume_id, NODE1, mount()))
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    assert_eq!(again.into_iter().collect::<BTreeMap<_, _>>(), ctx);
    let ghost = "00000000-0000-5000-8000-000000000000";
    for (r, want) in [
        (
            publish(&v1.volume_id, NODE2, mount()),
            Code::FailedPrecondition,
        ),
        (
            publish(&v1.volume_id, "some-fake-node-id", mount()),
            Code::NotFound,
        ),
        (publish(ghost, NODE1, mount()), Code::NotFound),
        (publish(&v1.volume_id, "", mount()), Code::InvalidArgument),
        (
            pb::ControllerPublishVolumeRequest {
                volume_capability: None,
                ..publish(&v1.volume_id, NODE1, mount())
            },
            Code::InvalidArgument,
        ),
    ] {
        let got = c.controller_publish_volume(r.clone()).await;
        assert_eq!(code(&got), want, "{r:?}");
    }
    let del = c
        .delete_volume(pb::DeleteVolumeRequest {
            volume_id: v1.volume_id.clone(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(&del), Code::FailedPrecondition);

    // ListVolumes (paged by one) and ControllerGetVolume show the published node.
    let mut token = String::new();
    let mut listed = BTreeMap::new();
    loop {
        let page = c
            .list_volumes(pb::ListVolumesRequest {
                max_entries: 1,
                starting_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.entries.len() <= 1);
        for e in page.entries {
            let v = e.volume.unwrap();
            let status = e.status.unwrap();
            listed.insert(v.volume_id, status.published_node_ids);
        }
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    assert_eq!(listed.len(), 3, "vol-1, race, shared-1");
    assert_eq!(listed.get(&v1.volume_id), Some(&vec![NODE1.to_string()]));
    let bad_token = c
        .list_volumes(pb::ListVolumesRequest {
            max_entries: 1,
            starting_token: "bogus".into(),
        })
        .await;
    assert_eq!(code(&bad_token), Code::Aborted);
    let got = c
        .controller_get_volume(pb::ControllerGetVolumeRequest {
            volume_id: v1.volume_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        got.status
            .map(|s| (s.published_node_ids, s.volume_condition.map(|c| c.abnormal))),
        Some((vec![NODE1.to_string()], Some(false)))
    );
    let missing = c
        .controller_get_volume(pb::ControllerGetVolumeRequest {
            volume_id: ghost.into(),
        })
        .await;
    assert_eq!(code(&missing), Code::NotFound);

    // ControllerUnpublishVolume: twice, and for an unknown volume.
    for id in [v1.volume_id.as_str(), v1.volume_id.as_str(), ghost] {
        let r = c
            .controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
                volume_id: id.into(),
                node_id: NODE1.into(),
                ..Default::default()
            })
            .await;
        assert_eq!(code(&r), Code::Ok, "{id}");
    }
    let shown = a.tgtd.tgtadm_ok(&["--op", "show", "--mode", "target"]);
    assert!(!shown.contains(&target), "{shown}");

    // Snapshots.
    let snap = |name: &str, src: &str| pb::CreateSnapshotRequest {
        name: name.into(),
        source_volume_id: src.into(),
        ..Default::default()
    };
    let s1 = c
        .create_snapshot(snap("snap-1", &v1.volume_id))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    let s1b = c
        .create_snapshot(snap("snap-1", &v1.volume_id))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(s1, s1b);
    assert_eq!(
        (s1.size_bytes, s1.ready_to_use, s1.creation_time.is_some()),
        (100 * MIB, true, true)
    );
    for (r, want) in [
        (snap("snap-1", &race.volume_id), Code::AlreadyExists),
        (snap("snap-2", ghost), Code::NotFound),
        (snap("", &v1.volume_id), Code::InvalidArgument),
        (snap("snap-3", ""), Code::InvalidArgument),
    ] {
        let got = c.create_snapshot(r.clone()).await;
        assert_eq!(code(&got), want, "{r:?}");
    }
    let got = c
        .get_snapshot(pb::GetSnapshotRequest {
            snapshot_id: s1.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().snapshot);
    assert_eq!(got.map_err(|s| s.code()), Ok(Some(s1.clone())));
    let by_source = c
        .list_snapshots(pb::ListSnapshotsRequest {
            source_volume_id: v1.volume_id.clone(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().entries.len());
    assert_eq!(by_source.map_err(|s| s.code()), Ok(1));
    let bad = c
        .list_snapshots(pb::ListSnapshotsRequest {
            starting_token: "42".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(&bad), Code::Aborted);
    let del = c
        .delete_volume(pb::DeleteVolumeRequest {
            volume_id: v1.volume_id.clone(),
            ..Default::default()
        })
        .await;
    assert_eq!(
        code(&del),
        Code::FailedPrecondition,
        "a volume with snapshots"
    );
    for _ in 0..2 {
        let r = c
            .delete_snapshot(pb::DeleteSnapshotRequest {
                snapshot_id: s1.snapshot_id.clone(),
                ..Default::default()
            })
            .await;
        assert_eq!(code(&r), Code::Ok);
    }
    let gone = c
        .get_snapshot(pb::GetSnapshotRequest {
            snapshot_id: s1.snapshot_id.clone(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(&gone), Code::NotFound);

    // ControllerExpandVolume.
    let expand = |id: &str, req: i64, lim: i64, cap: Option<pb::VolumeCapability>| {
        pb::ControllerExpandVolumeRequest {
            volume_id: id.into(),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: req,
                limit_bytes: lim,
            }),
            volume_capability: cap,
            ..Default::default()
        }
    };
    let cases = [
        (
            expand(&v1.volume_id, 300 * MIB, 0, None),
            Ok((300 * MIB, true)),
        ),
        (
            expand(&v1.volume_id, 300 * MIB, 0, None),
            Ok((300 * MIB, true)),
        ),
        (
            expand(
                &race.volume_id,
                128 * MIB,
                0,
                Some(block(Mode::SingleNodeWriter)),
            ),
            Ok((128 * MIB, false)),
        ),
        (
            expand(&v1.volume_id, 2 * GIB, GIB, None),
            Err(Code::OutOfRange),
        ),
        (expand(ghost, GIB, 0, None), Err(Code::NotFound)),
    ];
    for (r, want) in cases {
        let got = c
            .controller_expand_volume(r.clone())
            .await
            .map(|r| r.into_inner())
            .map(|r| (r.capacity_bytes, r.node_expansion_required));
        assert_eq!(got.map_err(|s| s.code()), want, "{r:?}");
    }
    let img = a.pool_dir.join(format!("volume-{}.img", v1.volume_id));
    assert_eq!(
        std::fs::metadata(&img).map(|m| m.len()).ok(),
        Some(300 << 20)
    );

    // GetCapacity: per zone and type, honouring what is provisioned.
    let capacity = |zone: &str, t: &str| pb::GetCapacityRequest {
        parameters: if t.is_empty() {
            HashMap::new()
        } else {
            params(&[("type", t)])
        },
        accessible_topology: Some(topo(zone)),
        ..Default::default()
    };
    // (vol-1, race and shared-1 are all on a: the capacity weigher spreads to the emptiest.)
    for (r, want) in [
        (capacity("z2", "hdd"), Ok(10 * GIB)),
        (capacity("z2", "ssd"), Ok(0)),
        (capacity("z3", ""), Ok(8 * GIB)),
        (capacity("z1", "gold"), Err(Code::InvalidArgument)),
    ] {
        let got = c
            .get_capacity(r.clone())
            .await
            .map(|r| r.into_inner().available_capacity);
        assert_eq!(got.map_err(|s| s.code()), want, "{r:?}");
    }

    // ControllerModifyVolume: retag in place (a satisfies ssd), errors.
    let modify = |id: &str, kv: &[(&str, &str)]| pb::ControllerModifyVolumeRequest {
        volume_id: id.into(),
        mutable_parameters: params(kv),
        ..Default::default()
    };
    for (r, want) in [
        (modify(&v1.volume_id, &[("type", "ssd")]), Code::Ok),
        (modify(&v1.volume_id, &[("type", "ssd")]), Code::Ok),
        (
            modify(&v1.volume_id, &[("iops", "100")]),
            Code::InvalidArgument,
        ),
        (
            modify(&v1.volume_id, &[("type", "gold")]),
            Code::InvalidArgument,
        ),
        (modify(&v1.volume_id, &[]), Code::InvalidArgument),
        (modify(ghost, &[("type", "ssd")]), Code::NotFound),
    ] {
        let got = c.controller_modify_volume(r.clone()).await;
        assert_eq!(code(&got), want, "{r:?}");
    }
    assert_eq!(
        std::fs::read_to_string(a.pool_dir.join(format!("volume-{}.json", v1.volume_id)))
            .map(|j| j.contains("\"ssd\""))
            .map_err(|e| e.to_string()),
        Ok(true)
    );

    // DeleteVolume: twice, unknown, then everything is gone from the pools.
    for id in [
        v1.volume_id.as_str(),
        v1.volume_id.as_str(),
        ghost,
        race.volume_id.as_str(),
    ] {
        let r = c
            .delete_volume(pb::DeleteVolumeRequest {
                volume_id: id.into(),
                ..Default::default()
            })
            .await;
        assert_eq!(code(&r), Code::Ok, "{id}");
    }
    let empty = c.delete_volume(pb::DeleteVolumeRequest::default()).await;
    assert_eq!(code(&empty), Code::InvalidArgument);
    let left: usize = stack.agents.iter().map(|a| volume_files(&a.pool_dir)).sum();
    assert_eq!(left, 1, "only shared-1 is left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cross_agent_copies_and_retype_migration_keep_the_bytes() {
    // a: z1 ssd; b: z2 hdd; c: z2 plain, so a retype from c to hdd can move within z2.
    let mut specs = AgentSpec::three_zones();
    specs[2].zone = "z2";
    let (stack, mut c) = start(specs).await;
    let mut src = create_req("src", 64 * MIB);
    src.parameters = params(&[("type", "ssd")]);
    let src = create(&mut c, src).await.unwrap();
    let a = stack.agent("a");
    let b = stack.agent("b");
    let data = pattern(3 * (1 << 20) + 4099, 7);
    write_pattern(
        &a.pool_dir.join(format!("volume-{}.img", src.volume_id)),
        1 << 20,
        &data,
    );

    let snap = c
        .create_snapshot(pb::CreateSnapshotRequest {
            name: "src-snap".into(),
            source_volume_id: src.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    let from = |name: &str, source: pb::volume_content_source::Type, p: &[(&str, &str)]| {
        let mut r = create_req(name, 0);
        r.capacity_range = None;
        r.parameters = params(p);
        r.volume_content_source = Some(pb::VolumeContentSource {
            r#type: Some(source),
        });
        r
    };
    let snap_src =
        pb::volume_content_source::Type::Snapshot(pb::volume_content_source::SnapshotSource {
            snapshot_id: snap.snapshot_id.clone(),
        });
    let vol_src =
        pb::volume_content_source::Type::Volume(pb::volume_content_source::VolumeSource {
            volume_id: src.volume_id.clone(),
        });
    // Restore onto another agent (forced by sameBackendAs): blank + ReadVolume → WriteVolume.
    let restored = create(
        &mut c,
        from("restored", snap_src.clone(), &[("sameBackendAs", "b")]),
    )
    .await
    .unwrap();
    assert_eq!(
        (zone_of(&restored), restored.capacity_bytes),
        ("z2".to_string(), 64 * MIB)
    );
    let img = b
        .pool_dir
        .join(format!("volume-{}.img", restored.volume_id));
    assert_eq!(read_file(&img, 1 << 20, data.len()), data, "restored bytes");
    assert_eq!(read_file(&img, 0, 4096), vec![0u8; 4096], "holes stay zero");
    // The retry is the same volume (no second copy); the content source is reported.
    let again = create(
        &mut c,
        from("restored", snap_src, &[("sameBackendAs", "b")]),
    )
    .await
    .unwrap();
    assert_eq!(again, restored);
    assert_eq!(
        restored.content_source.and_then(|s| s.r#type),
        Some(pb::volume_content_source::Type::Snapshot(
            pb::volume_content_source::SnapshotSource {
                snapshot_id: snap.snapshot_id.clone()
            }
        ))
    );
    // A clone with no constraint stays on the source's pool (the agent clones it there).
    let clone = create(&mut c, from("clone", vol_src.clone(), &[]))
        .await
        .unwrap();
    assert_eq!(zone_of(&clone), "z1");
    let img = a.pool_dir.join(format!("volume-{}.img", clone.volume_id));
    assert_eq!(read_file(&img, 1 << 20, data.len()), data, "cloned bytes");
    // Across agents and bigger than the source.
    let mut wide = from("wide", vol_src, &[("differentBackendAs", "a,b")]);
    wide.capacity_range = Some(pb::CapacityRange {
        required_bytes: 128 * MIB,
        limit_bytes: 0,
    });
    let wide = create(&mut c, wide).await.unwrap();
    let c_agent = stack.agent("c");
    assert_eq!(wide.capacity_bytes, 128 * MIB);
    let img = c_agent
        .pool_dir
        .join(format!("volume-{}.img", wide.volume_id));
    assert_eq!(read_file(&img, 1 << 20, data.len()), data, "copied bytes");

    // Retype with migration: "wide" is on c (z2, no media); type hdd only fits b (z2), so the
    // detached volume moves to b under the same id, bytes and all.
    let modify = pb::ControllerModifyVolumeRequest {
        volume_id: wide.volume_id.clone(),
        mutable_parameters: params(&[("type", "hdd")]),
        ..Default::default()
    };
    let r = c.controller_modify_volume(modify.clone()).await;
    assert_eq!(code(&r), Code::Ok, "{r:?}\n{}", stack.logs());
    assert!(!img.exists(), "the source copy is deleted");
    let moved = b.pool_dir.join(format!("volume-{}.img", wide.volume_id));
    assert_eq!(
        read_file(&moved, 1 << 20, data.len()),
        data,
        "migrated bytes"
    );
    let got = c
        .controller_get_volume(pb::ControllerGetVolumeRequest {
            volume_id: wide.volume_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(
        (zone_of(&got), got.volume_id),
        ("z2".to_string(), wide.volume_id.clone())
    );
    // In use: no migration. ssd only exists in z1, so back to ssd is impossible anyway.
    let published = c
        .controller_publish_volume(pb::ControllerPublishVolumeRequest {
            volume_id: clone.volume_id.clone(),
            node_id: NODE1.into(),
            volume_capability: Some(mount()),
            ..Default::default()
        })
        .await;
    assert_eq!(code(&published), Code::Ok);
    let in_use = c
        .controller_modify_volume(pb::ControllerModifyVolumeRequest {
            volume_id: clone.volume_id.clone(),
            mutable_parameters: params(&[("type", "hdd")]),
            ..Default::default()
        })
        .await;
    assert_eq!(code(&in_use), Code::FailedPrecondition);
}
