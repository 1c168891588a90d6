//! The controller's rules against hand-written fake agents: every RPC, idempotent retries,
//! racing duplicates and each error code.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tonic::Code;

use super::*;
use crate::agent_rpc::client::{AgentClientError, AgentErrorKind, FakeAgent, FakePool, PoolKind};
use crate::csi::status::code;

const G: u64 = Bytes::GIB;

fn types() -> BTreeMap<String, VolumeType> {
    let t = |name: &str, specs: &[(&str, &str)]| {
        (
            name.to_owned(),
            VolumeType {
                name: name.to_owned(),
                description: String::new(),
                extra_specs: specs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            },
        )
    };
    BTreeMap::from([
        t("default", &[]),
        t("ssd", &[("media", "ssd")]),
        t("shared", &[("multiattach", "<is> True")]),
        t("nvme", &[("media", "nvme")]),
        t("hdd", &[("media", "hdd")]),
    ])
}

async fn controller(agents: &[Arc<FakeAgent>]) -> Controller {
    let settings = Settings {
        scheduler: crate::scheduler::SchedulerConfig::default(),
        volume_types: types(),
        default_volume_type: "default".into(),
    };
    let seams: Vec<Arc<dyn StorageAgent>> = agents
        .iter()
        .map(|a| a.clone() as Arc<dyn StorageAgent>)
        .collect();
    let c = match Controller::new(settings, seams) {
        Ok(c) => c,
        Err(e) => panic!("controller: {e}"),
    };
    let failures: Vec<String> = c.sync_all().await.iter().map(|e| e.to_string()).collect();
    assert_eq!(failures, Vec::<String>::new());
    c
}

/// Three agents: a (z1, ssd, 100 GiB), b (z2, hdd, 50 GiB), c (z3, no media, 20 GiB).
fn three() -> Vec<Arc<FakeAgent>> {
    vec![
        FakeAgent::new(
            "a",
            vec![FakePool::new("p", "z1", Bytes::gib(100)).with_capability("media", "ssd")],
        ),
        FakeAgent::new(
            "b",
            vec![FakePool::new("p", "z2", Bytes::gib(50)).with_capability("media", "hdd")],
        ),
        FakeAgent::new("c", vec![FakePool::new("p", "z3", Bytes::gib(20))]),
    ]
}

fn mount() -> Capability {
    Capability {
        access: Access::Mount { fs: "ext4".into() },
        mode: AccessMode::SingleNodeWriter,
    }
}

fn block(mode: AccessMode) -> Capability {
    Capability {
        access: Access::Block,
        mode,
    }
}

fn req(name: &str, gib: u64) -> CreateVolume {
    CreateVolume {
        name: name.to_owned(),
        capacity: CapacityRange {
            required: Some(Bytes::gib(gib)),
            limit: None,
        },
        capabilities: vec![mount()],
        parameters: BTreeMap::new(),
        mutable_parameters: BTreeMap::new(),
        source: None,
        zones: Zones::default(),
    }
}

fn with_param(mut r: CreateVolume, k: &str, v: &str) -> CreateVolume {
    r.parameters.insert(k.to_owned(), v.to_owned());
    r
}

/// The code of a result's error, or OK.
fn code_of<T>(r: &Result<T, ControllerError>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(e) => code(e),
    }
}

fn placed(r: &Result<VolumeView, ControllerError>) -> Result<String, String> {
    r.as_ref()
        .map(|v| format!("{}#{}", v.agent, v.pool))
        .map_err(|e| e.to_string())
}

const NODE1: &str = "node-1/iqn.1993-08.org.debian:01:aaa";
const NODE2: &str = "node-2/iqn.1993-08.org.debian:01:bbb";

#[tokio::test]
async fn create_twice_returns_the_same_volume_and_conflicts_are_already_exists() {
    let agents = three();
    let c = controller(&agents).await;
    let first = c.create_volume(req("pvc-1", 2)).await;
    let again = c.create_volume(req("pvc-1", 2)).await;
    assert_eq!(
        first.as_ref().map_err(|e| e.to_string()),
        again.as_ref().map_err(|e| e.to_string())
    );
    let v = first.as_ref().map_err(|e| e.to_string());
    assert_eq!(
        v.map(|v| (v.id.clone(), v.capacity, v.name.clone(), v.zone.clone())),
        Ok((
            volume_id_for("pvc-1"),
            Bytes::gib(2),
            Some("pvc-1".to_string()),
            "z1".to_string()
        ))
    );
    // (request, code)
    let mut block_req = req("pvc-1", 2);
    block_req.capabilities = vec![block(AccessMode::SingleNodeWriter)];
    let cases = [
        (req("pvc-1", 3), Code::AlreadyExists),
        (
            with_param(req("pvc-1", 2), "type", "ssd"),
            Code::AlreadyExists,
        ),
        (block_req, Code::AlreadyExists),
        // Sidecar keys do not change what was asked for.
        (
            with_param(req("pvc-1", 2), "csi.storage.k8s.io/pvc/name", "data"),
            Code::Ok,
        ),
    ];
    for (r, want) in cases {
        let got = c.create_volume(r.clone()).await;
        assert_eq!(code_of(&got), want, "{r:?}: {got:?}");
    }
    let creates: usize = agents
        .iter()
        .map(|a| {
            a.calls()
                .iter()
                .filter(|c| c.starts_with("create_volume"))
                .count()
        })
        .sum();
    assert_eq!(creates, 1, "retries never reach an agent");
}

#[tokio::test]
async fn racing_duplicates_get_aborted_and_the_retry_finds_the_volume() {
    let agents = three();
    let c = controller(&agents).await;
    for a in &agents {
        a.set_latency(Duration::from_millis(50));
    }
    let (x, y) = tokio::join!(
        c.create_volume(req("race", 1)),
        c.create_volume(req("race", 1))
    );
    assert_eq!((code_of(&x), code_of(&y)), (Code::Ok, Code::Aborted));
    let retry = c.create_volume(req("race", 1)).await;
    assert_eq!(
        retry.map(|v| v.id).map_err(|e| e.to_string()),
        x.map(|v| v.id).map_err(|e| e.to_string())
    );
    // A delete racing a publish of the same volume is refused the same way.
    let id = volume_id_for("race").to_string();
    let cap = mount();
    let (p, d) = tokio::join!(c.publish_volume(&id, NODE1, &cap), c.delete_volume(&id));
    assert_eq!((code_of(&p), code_of(&d)), (Code::Ok, Code::Aborted));
}

#[tokio::test]
async fn placement_follows_zones_types_and_free_space() {
    let agents = three();
    let c = controller(&agents).await;
    let zones = |requisite: &[&str], preferred: &[&str]| Zones {
        requisite: requisite.iter().map(|z| z.to_string()).collect(),
        preferred: preferred.iter().map(|z| z.to_string()).collect(),
    };
    let mut n = 0;
    let mut next = |r: CreateVolume| {
        n += 1;
        CreateVolume {
            name: format!("v{n}"),
            ..r
        }
    };
    // (request, placement)
    let cases: Vec<(CreateVolume, Result<&str, &str>)> = vec![
        (req("", 1), Ok("a#p")),
        (
            CreateVolume {
                zones: zones(&["z2", "z3"], &[]),
                ..req("", 1)
            },
            Ok("b#p"),
        ),
        (
            CreateVolume {
                zones: zones(&["z1", "z3"], &["z3", "z1"]),
                ..req("", 1)
            },
            Ok("c#p"),
        ),
        (with_param(req("", 1), "type", "ssd"), Ok("a#p")),
        (
            CreateVolume {
                zones: zones(&["z2"], &[]),
                ..with_param(req("", 1), "type", "ssd")
            },
            Err("no pool can hold the volume: a#p: zone \"z1\" is not among the requisite zones (z2); \
                 b#p: zone \"z2\" is not among the requisite zones (z2)"),
        ),
        (with_param(req("", 60), "type", "default"), Ok("a#p")),
        (with_param(req("", 1), "sameBackendAs", "c"), Ok("c#p")),
        (with_param(req("", 1), "differentBackendAs", "a,b"), Ok("c#p")),
    ];
    for (r, want) in cases {
        let r = next(r);
        let got = c.create_volume(r.clone()).await;
        match want {
            Ok(p) => assert_eq!(placed(&got), Ok(p.to_string()), "{r:?}"),
            Err(prefix) => {
                let msg = got
                    .as_ref()
                    .err()
                    .map(|e| e.to_string())
                    .unwrap_or_default();
                assert_eq!(code_of(&got), Code::ResourceExhausted, "{r:?}");
                assert!(msg.starts_with(&prefix[..40]), "{msg}");
            }
        }
    }
    // Free space: a has 100-1-1-60 = 38 GiB left, b 49, c 18: a 45 GiB volume goes to b.
    assert_eq!(
        placed(&c.create_volume(req("big", 45)).await),
        Ok("b#p".to_string())
    );
    let none = c.create_volume(req("huge", 500)).await;
    assert_eq!(code_of(&none), Code::ResourceExhausted);
}

#[tokio::test]
async fn a_burst_of_thirty_spreads_and_never_overfills() {
    let agents = vec![
        FakeAgent::new("a", vec![FakePool::new("p", "z1", Bytes::gib(12))]),
        FakeAgent::new("b", vec![FakePool::new("p", "z1", Bytes::gib(10))]),
        FakeAgent::new("c", vec![FakePool::new("p", "z1", Bytes::gib(8))]),
    ];
    let c = controller(&agents).await;
    for a in &agents {
        a.set_latency(Duration::from_millis(5));
    }
    let all =
        futures::future::join_all((0..30).map(|i| c.create_volume(req(&format!("burst-{i}"), 1))))
            .await;
    let mut counts = BTreeMap::new();
    for r in &all {
        *counts.entry(placed(r)).or_insert(0) += 1;
    }
    assert_eq!(
        counts,
        BTreeMap::from([
            (Ok("a#p".to_string()), 12),
            (Ok("b#p".to_string()), 10),
            (Ok("c#p".to_string()), 8)
        ])
    );
    let extra = c.create_volume(req("burst-31", 1)).await;
    assert_eq!(code_of(&extra), Code::ResourceExhausted);
    // After a refresh the agents' own figures agree.
    c.refresh_pools().await;
    let provisioned: Vec<u64> = c
        .pools()
        .iter()
        .map(|(p, _, _)| p.provisioned.get() / G)
        .collect();
    assert_eq!(provisioned, [12, 10, 8]);
}

#[tokio::test]
async fn a_failed_create_is_rescheduled_up_to_max_attempts() {
    let agents = three();
    let c = controller(&agents).await;
    let full = AgentClientError::new(AgentErrorKind::ResourceExhausted, "thin pool full");
    agents[0].fail_next("create_volume", full.clone());
    assert_eq!(
        placed(&c.create_volume(req("r1", 1)).await),
        Ok("b#p".to_string())
    );
    for a in &agents {
        a.fail_next("create_volume", full.clone());
    }
    let gave_up = c.create_volume(req("r2", 1)).await;
    assert_eq!(
        gave_up.map(|_| ()).map_err(|e| e.to_string()),
        Err("agent c: CreateVolume: thin pool full".to_string())
    );
    // A rule violation is not retried elsewhere.
    agents[0].fail_next(
        "create_volume",
        AgentClientError::new(AgentErrorKind::InvalidArgument, "bad size"),
    );
    let refused = c.create_volume(req("r3", 1)).await;
    assert_eq!(code_of(&refused), Code::InvalidArgument);
}

#[tokio::test]
async fn capacity_is_rounded_to_the_extent_and_out_of_range_is_reported() {
    let agents = three();
    let c = controller(&agents).await;
    let range = |name: &str, req: u64, lim: u64| CreateVolume {
        capacity: CapacityRange {
            required: (req > 0).then_some(Bytes(req)),
            limit: (lim > 0).then_some(Bytes(lim)),
        },
        ..self::req(name, 1)
    };
    let mib = Bytes::MIB;
    // (request, size or code)
    let cases = [
        (range("r-a", 5 * mib, 0), Ok(8 * mib)),
        (range("r-b", 0, 0), Ok(G)),
        (range("r-c", 0, 100 * mib), Ok(100 * mib)),
        (range("r-d", 5 * mib, 6 * mib), Err(Code::OutOfRange)),
        (range("r-e", 2 * G, G), Err(Code::OutOfRange)),
    ];
    for (r, want) in cases {
        let got = c.create_volume(r.clone()).await;
        assert_eq!(
            got.map(|v| v.capacity.get()).map_err(|e| code(&e)),
            want,
            "{r:?}"
        );
    }
}

#[tokio::test]
async fn parameters_and_capabilities_are_validated() {
    let agents = three();
    let c = controller(&agents).await;
    let with_caps = |caps: Vec<Capability>| CreateVolume {
        capabilities: caps,
        ..req("caps", 1)
    };
    let btrfs = Capability {
        access: Access::Mount { fs: "btrfs".into() },
        mode: AccessMode::SingleNodeWriter,
    };
    let mount_multi = Capability {
        access: Access::Mount { fs: "xfs".into() },
        mode: AccessMode::MultiNodeMultiWriter,
    };
    let cases = [
        (
            with_param(req("p1", 1), "fsType", "ext4"),
            Code::InvalidArgument,
        ),
        (
            with_param(req("p2", 1), "type", "gold"),
            Code::InvalidArgument,
        ),
        (with_caps(vec![btrfs]), Code::InvalidArgument),
        (with_caps(vec![mount_multi]), Code::InvalidArgument),
        (
            with_caps(vec![block(AccessMode::MultiNodeMultiWriter)]),
            Code::InvalidArgument,
        ),
        (
            with_caps(vec![block(AccessMode::SingleNodeReaderOnly)]),
            Code::InvalidArgument,
        ),
        (
            with_param(
                CreateVolume {
                    name: "shared".into(),
                    ..with_caps(vec![block(AccessMode::MultiNodeMultiWriter)])
                },
                "type",
                "shared",
            ),
            Code::Ok,
        ),
    ];
    for (r, want) in cases {
        let got = c.create_volume(r.clone()).await;
        assert_eq!(code_of(&got), want, "{r:?}: {got:?}");
    }
}

#[tokio::test]
async fn content_sources_clone_on_the_pool_or_copy_across_agents() {
    let agents = three();
    let c = controller(&agents).await;
    let src = c.create_volume(req("src", 1)).await;
    let src_id = src
        .as_ref()
        .map(|v| v.id.clone())
        .map_err(|e| e.to_string());
    let Ok(src_id) = src_id else {
        panic!("{src_id:?}")
    };
    let pattern: Vec<u8> = (0..3 * 1024 * 1024 + 17).map(|i| (i % 251) as u8).collect();
    agents[0].poke(&src_id, 4096, &pattern);
    let snap = c
        .create_snapshot("snap", src_id.as_str(), &BTreeMap::new())
        .await;
    let snap_id = snap.map(|s| s.id.to_string()).unwrap_or_default();

    let from = |name: &str, source: ContentSource| CreateVolume {
        source: Some(source),
        ..req(name, 1)
    };
    // Same pool: an agent clone.
    let clone = c
        .create_volume(from("clone", ContentSource::Volume(src_id.to_string())))
        .await;
    assert_eq!(placed(&clone), Ok("a#p".to_string()));
    assert!(
        agents[0]
            .calls()
            .iter()
            .any(|l| l.starts_with("create_volume") && l.contains(volume_id_for("clone").as_str())),
        "{:?}",
        agents[0].calls()
    );
    // Another agent (forced): blank + ReadVolume → WriteVolume, bytes equal.
    let copy = c
        .create_volume(with_param(
            from("restore", ContentSource::Snapshot(snap_id.clone())),
            "sameBackendAs",
            "b",
        ))
        .await;
    assert_eq!(placed(&copy), Ok("b#p".to_string()));
    let restored = agents[1].content(&volume_id_for("restore"));
    assert_eq!(
        restored.as_ref().map(|d| d.len()),
        Some(4096 + pattern.len())
    );
    assert_eq!(
        restored.as_ref().map(|d| &d[4096..]),
        Some(&pattern[..]),
        "bytes copied across agents"
    );
    assert_eq!(
        copy.map(|v| v.source).map_err(|e| e.to_string()),
        Ok(Some(ContentSource::Snapshot(snap_id.clone())))
    );
    // Retry of the copy is the same volume, not a second copy.
    let again = c
        .create_volume(with_param(
            from("restore", ContentSource::Snapshot(snap_id.clone())),
            "sameBackendAs",
            "b",
        ))
        .await;
    assert_eq!(placed(&again), Ok("b#p".to_string()));
    // Errors: unknown source, source larger than requested.
    let cases = [
        (
            from("e1", ContentSource::Snapshot("nope".into())),
            Code::NotFound,
        ),
        (
            from(
                "e2",
                ContentSource::Volume(volume_id_for("ghost").to_string()),
            ),
            Code::NotFound,
        ),
        (
            CreateVolume {
                capacity: CapacityRange {
                    required: Some(Bytes::mib(512)),
                    limit: None,
                },
                ..from("e3", ContentSource::Volume(src_id.to_string()))
            },
            Code::OutOfRange,
        ),
        (
            from("restore", ContentSource::Volume(src_id.to_string())),
            Code::AlreadyExists,
        ),
    ];
    for (r, want) in cases {
        let got = c.create_volume(r.clone()).await;
        assert_eq!(code_of(&got), want, "{r:?}: {got:?}");
    }
}

#[tokio::test]
async fn a_failed_copy_leaves_nothing_behind() {
    let agents = three();
    let c = controller(&agents).await;
    let src = c.create_volume(req("src", 1)).await;
    let src_id = src.map(|v| v.id.to_string()).unwrap_or_default();
    agents[1].fail_next(
        "write_volume",
        AgentClientError::new(AgentErrorKind::Internal, "disk error"),
    );
    let r = CreateVolume {
        source: Some(ContentSource::Volume(src_id.clone())),
        ..with_param(req("copy", 1), "sameBackendAs", "b")
    };
    let failed = c.create_volume(r.clone()).await;
    assert_eq!(code_of(&failed), Code::Internal);
    assert_eq!(agents[1].volume_ids(), Vec::<String>::new());
    assert_eq!(placed(&c.create_volume(r).await), Ok("b#p".to_string()));
}

#[tokio::test]
async fn delete_follows_cinder_rules_and_is_idempotent() {
    let agents = three();
    let c = controller(&agents).await;
    let id = volume_id_for("d").to_string();
    let _ = c.create_volume(req("d", 1)).await;
    let snap = c.create_snapshot("d-snap", &id, &BTreeMap::new()).await;
    assert_eq!(code_of(&snap), Code::Ok);
    assert_eq!(
        code_of(&c.delete_volume(&id).await),
        Code::FailedPrecondition
    );
    let snap_id = snapshot_id_for("d-snap").to_string();
    assert_eq!(code_of(&c.delete_snapshot(&snap_id).await), Code::Ok);
    assert_eq!(
        code_of(&c.publish_volume(&id, NODE1, &mount()).await),
        Code::Ok
    );
    assert_eq!(
        code_of(&c.delete_volume(&id).await),
        Code::FailedPrecondition
    );
    assert_eq!(code_of(&c.unpublish_volume(&id, NODE1).await), Code::Ok);
    // (id, code): deleted, again, never existed, malformed.
    for (raw, want) in [
        (id.as_str(), Code::Ok),
        (id.as_str(), Code::Ok),
        ("3f1b2c4d-0000-5000-8000-000000000000", Code::Ok),
        ("Not An Id!", Code::Ok),
    ] {
        assert_eq!(code_of(&c.delete_volume(raw).await), want, "{raw}");
    }
    assert_eq!(agents[0].volume_ids(), Vec::<String>::new());
}

#[tokio::test]
async fn publish_and_unpublish() {
    let agents = three();
    let c = controller(&agents).await;
    let id = volume_id_for("pub").to_string();
    let _ = c.create_volume(req("pub", 1)).await;
    let first = c.publish_volume(&id, NODE1, &mount()).await;
    let again = c.publish_volume(&id, NODE1, &mount()).await;
    assert_eq!(
        first
            .as_ref()
            .map(PublishInfo::to_context)
            .map_err(|e| e.to_string()),
        again
            .as_ref()
            .map(PublishInfo::to_context)
            .map_err(|e| e.to_string())
    );
    let ctx = first.map(|p| p.to_context()).unwrap_or_default();
    assert_eq!(
        ctx.keys().cloned().collect::<Vec<_>>(),
        ["chapUser", "lun", "portals", "targetIqn"]
    );
    assert_eq!(
        ctx.get("targetIqn").cloned(),
        Some(format!("iqn.2026-01.dev.cinderblock:volume-{id}"))
    );
    // (volume, node, capability, code)
    let ghost = volume_id_for("ghost").to_string();
    let reader = Capability {
        access: Access::Mount { fs: "ext4".into() },
        mode: AccessMode::MultiNodeReaderOnly,
    };
    let cases = [
        (id.as_str(), NODE2, mount(), Code::FailedPrecondition),
        (id.as_str(), NODE2, reader.clone(), Code::FailedPrecondition),
        (id.as_str(), "some-fake-node-id", mount(), Code::NotFound),
        (ghost.as_str(), NODE1, mount(), Code::NotFound),
        ("Bad Id", NODE1, mount(), Code::NotFound),
        (
            id.as_str(),
            NODE1,
            block(AccessMode::MultiNodeMultiWriter),
            Code::InvalidArgument,
        ),
    ];
    for (vol, node, cap, want) in cases {
        let got = c.publish_volume(vol, node, &cap).await;
        assert_eq!(code_of(&got), want, "{vol} {node} {cap:?}: {got:?}");
    }
    let listed = c.list_volumes(0, "").await;
    assert_eq!(
        listed
            .map(|p| p
                .entries
                .iter()
                .map(|v| v.published_nodes.clone())
                .collect::<Vec<_>>())
            .map_err(|e| e.to_string()),
        Ok(vec![vec![NODE1.to_string()]])
    );
    // Unpublish: twice, unknown node, unknown volume, all nodes.
    for (vol, node) in [
        (id.as_str(), NODE1),
        (id.as_str(), NODE1),
        (id.as_str(), "x"),
        (ghost.as_str(), NODE1),
    ] {
        assert_eq!(
            code_of(&c.unpublish_volume(vol, node).await),
            Code::Ok,
            "{vol} {node}"
        );
    }
    let view = c.get_volume(&id).await;
    assert_eq!(
        view.map(|v| (v.published_nodes, v.status))
            .map_err(|e| e.to_string()),
        Ok((vec![], CinderStatus::Available))
    );

    // A multi-node reader volume may be published to several nodes.
    let mut shared = req("ro", 1);
    shared.capabilities = vec![reader.clone()];
    let ro = volume_id_for("ro").to_string();
    let _ = c.create_volume(shared).await;
    assert_eq!(
        code_of(&c.publish_volume(&ro, NODE1, &reader).await),
        Code::Ok
    );
    assert_eq!(
        code_of(&c.publish_volume(&ro, NODE2, &reader).await),
        Code::Ok
    );
    assert_eq!(
        c.get_volume(&ro)
            .await
            .map(|v| v.published_nodes)
            .map_err(|e| e.to_string()),
        Ok(vec![NODE1.to_string(), NODE2.to_string()])
    );
    assert_eq!(code_of(&c.unpublish_volume(&ro, "").await), Code::Ok);
    assert_eq!(
        c.get_volume(&ro)
            .await
            .map(|v| v.published_nodes)
            .map_err(|e| e.to_string()),
        Ok(vec![])
    );
}

#[tokio::test]
async fn list_volumes_pages_in_id_order() {
    let agents = three();
    let c = controller(&agents).await;
    for i in 0..5 {
        let _ = c.create_volume(req(&format!("l{i}"), 1)).await;
    }
    let mut ids: Vec<String> = (0..5)
        .map(|i| volume_id_for(&format!("l{i}")).to_string())
        .collect();
    ids.sort();
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = c.list_volumes(2, &token).await;
        let Ok(page) = page else { panic!("{page:?}") };
        assert!(page.entries.len() <= 2);
        seen.extend(page.entries.iter().map(|v| v.id.to_string()));
        match page.next_token {
            Some(t) => token = t,
            None => break,
        }
    }
    assert_eq!(seen, ids);
    for bad in ["x", "99", "-1"] {
        assert_eq!(
            code_of(&c.list_volumes(2, bad).await),
            Code::Aborted,
            "{bad}"
        );
    }
}

#[tokio::test]
async fn snapshots_by_name() {
    let agents = three();
    let c = controller(&agents).await;
    let v1 = volume_id_for("s-v1").to_string();
    let v2 = volume_id_for("s-v2").to_string();
    let _ = c.create_volume(req("s-v1", 1)).await;
    let _ = c.create_volume(req("s-v2", 1)).await;
    let none = BTreeMap::new();
    let first = c.create_snapshot("snap-1", &v1, &none).await;
    let again = c.create_snapshot("snap-1", &v1, &none).await;
    assert_eq!(
        first.as_ref().map_err(|e| e.to_string()),
        again.as_ref().map_err(|e| e.to_string())
    );
    assert_eq!(
        first
            .as_ref()
            .map(|s| (s.size, s.ready_to_use, s.created_at.is_some()))
            .map_err(|e| e.to_string()),
        Ok((Bytes::gib(1), true, true))
    );
    let bad_param = BTreeMap::from([("cow".to_string(), "10".to_string())]);
    let sidecar = BTreeMap::from([(
        "csi.storage.k8s.io/volumesnapshot/name".to_string(),
        "s".to_string(),
    )]);
    let ghost = volume_id_for("ghost").to_string();
    // (name, source, parameters, code)
    let cases = [
        ("snap-1", v2.as_str(), &none, Code::AlreadyExists),
        ("snap-2", ghost.as_str(), &none, Code::NotFound),
        ("snap-3", v1.as_str(), &bad_param, Code::InvalidArgument),
        ("snap-4", v2.as_str(), &sidecar, Code::Ok),
    ];
    for (name, src, params, want) in cases {
        let got = c.create_snapshot(name, src, params).await;
        assert_eq!(code_of(&got), want, "{name} {src}: {got:?}");
    }
    let s1 = snapshot_id_for("snap-1").to_string();
    let s4 = snapshot_id_for("snap-4").to_string();
    let ids = |p: Result<Page<SnapshotView>, ControllerError>| {
        p.map(|p| {
            p.entries
                .iter()
                .map(|s| s.id.to_string())
                .collect::<Vec<_>>()
        })
        .map_err(|e| e.to_string())
    };
    assert_eq!(
        ids(c.list_snapshots("", &v2, 0, "").await),
        Ok(vec![s4.clone()])
    );
    assert_eq!(
        ids(c.list_snapshots(&s1, "", 0, "").await),
        Ok(vec![s1.clone()])
    );
    assert_eq!(ids(c.list_snapshots("nope", "", 0, "").await), Ok(vec![]));
    let mut all = [s1.clone(), s4.clone()];
    all.sort();
    assert_eq!(
        ids(c.list_snapshots("", "", 1, "1").await),
        Ok(vec![all[1].clone()])
    );
    assert_eq!(
        code_of(&c.list_snapshots("", "", 1, "7").await),
        Code::Aborted
    );
    assert_eq!(code_of(&c.get_snapshot(&s1).await), Code::Ok);
    assert_eq!(code_of(&c.get_snapshot("nope").await), Code::NotFound);
    for _ in 0..2 {
        assert_eq!(code_of(&c.delete_snapshot(&s1).await), Code::Ok);
    }
    assert_eq!(code_of(&c.get_snapshot(&s1).await), Code::NotFound);
}

#[tokio::test]
async fn expand_grows_and_says_whether_the_node_must_follow() {
    let agents = three();
    let c = controller(&agents).await;
    let m = volume_id_for("m").to_string();
    let b = volume_id_for("b").to_string();
    let _ = c.create_volume(req("m", 1)).await;
    let mut br = req("b", 1);
    br.capabilities = vec![block(AccessMode::SingleNodeWriter)];
    let _ = c.create_volume(br).await;
    let range = |req: u64, lim: u64| CapacityRange {
        required: (req > 0).then_some(Bytes(req)),
        limit: (lim > 0).then_some(Bytes(lim)),
    };
    let ghost = volume_id_for("ghost").to_string();
    // (volume, range, result)
    let cases = [
        (m.as_str(), range(2 * G, 0), Ok((2 * G, true))),
        (m.as_str(), range(2 * G, 0), Ok((2 * G, true))),
        (m.as_str(), range(G, 0), Ok((2 * G, true))),
        (b.as_str(), range(3 * G, 0), Ok((3 * G, false))),
        (b.as_str(), range(5 * G, 4 * G), Err(Code::OutOfRange)),
        (ghost.as_str(), range(5 * G, 0), Err(Code::NotFound)),
        (m.as_str(), range(0, 0), Err(Code::InvalidArgument)),
    ];
    for (id, r, want) in cases {
        let got = c.expand_volume(id, r, None).await;
        assert_eq!(
            got.map(|(s, n)| (s.get(), n)).map_err(|e| code(&e)),
            want,
            "{id} {r:?}"
        );
    }
    agents[0].fail_next(
        "extend_volume",
        AgentClientError::new(
            AgentErrorKind::FailedPrecondition,
            "thick origin with snapshots while exported",
        ),
    );
    let refused = c.expand_volume(&m, range(4 * G, 0), None).await;
    assert_eq!(code_of(&refused), Code::FailedPrecondition);
}

#[tokio::test]
async fn get_capacity_follows_type_zone_and_reserve() {
    let mut reserved = FakePool::new("p", "z2", Bytes::gib(50)).with_capability("media", "hdd");
    reserved.reserved_percentage = 10;
    let agents = vec![
        FakeAgent::new(
            "a",
            vec![FakePool::new("p", "z1", Bytes::gib(100)).with_capability("media", "ssd")],
        ),
        FakeAgent::new("b", vec![reserved]),
    ];
    let c = controller(&agents).await;
    let _ = c.create_volume(req("cap", 30)).await; // on a (spread: most free)
    let no = BTreeMap::new();
    let ssd = BTreeMap::from([("type".to_string(), "ssd".to_string())]);
    let nvme = BTreeMap::from([("type".to_string(), "nvme".to_string())]);
    // (parameters, zone, capabilities, available GiB)
    let multi = [block(AccessMode::MultiNodeMultiWriter)];
    type Case<'a> = (
        &'a BTreeMap<String, String>,
        Option<&'a str>,
        &'a [Capability],
        u64,
    );
    let cases: [Case<'_>; 6] = [
        (&no, None, &[], 70),
        (&no, Some("z2"), &[], 45),
        (&ssd, Some("z2"), &[], 0),
        (&ssd, None, &[], 70),
        (&nvme, None, &[], 0),
        (&no, None, &multi, 0),
    ];
    for (params, zone, caps, want) in cases {
        let got = c.get_capacity(caps, params, zone);
        assert_eq!(
            got.map(|r| (r.available.get() / G, r.maximum_volume_size.get() / G))
                .map_err(|e| e.to_string()),
            Ok((want, want)),
            "{params:?} {zone:?}"
        );
    }
    let bad = BTreeMap::from([("type".to_string(), "gold".to_string())]);
    assert_eq!(
        code_of(&c.get_capacity(&[], &bad, None)),
        Code::InvalidArgument
    );
}

#[tokio::test]
async fn modify_retypes_in_place_or_migrates_keeping_the_id() {
    let agents = vec![
        FakeAgent::new(
            "a",
            vec![FakePool::new("p", "z1", Bytes::gib(100)).with_capability("media", "ssd")],
        ),
        FakeAgent::new(
            "b",
            vec![FakePool::new("p", "z1", Bytes::gib(100)).with_capability("media", "nvme")],
        ),
        FakeAgent::new(
            "c",
            vec![FakePool::new("p", "z9", Bytes::gib(100)).with_capability("media", "hdd")],
        ),
    ];
    let c = controller(&agents).await;
    let id = volume_id_for("m");
    let raw = id.to_string();
    let _ = c
        .create_volume(with_param(req("m", 1), "type", "ssd"))
        .await;
    agents[0].poke(&id, 0, b"hello, retype");
    let to = |t: &str| BTreeMap::from([("type".to_string(), t.to_string())]);
    // In place: the ssd pool satisfies "default".
    assert_eq!(
        code_of(&c.modify_volume(&raw, &to("default")).await),
        Code::Ok
    );
    assert_eq!(
        c.get_volume(&raw)
            .await
            .map(|v| (v.agent, v.volume_type))
            .map_err(|e| e.to_string()),
        Ok(("a".to_string(), "default".to_string()))
    );
    // In use: no migration.
    assert_eq!(
        code_of(&c.publish_volume(&raw, NODE1, &mount()).await),
        Code::Ok
    );
    assert_eq!(
        code_of(&c.modify_volume(&raw, &to("nvme")).await),
        Code::FailedPrecondition
    );
    assert_eq!(code_of(&c.unpublish_volume(&raw, NODE1).await), Code::Ok);
    // Migration to b (nvme, same zone), same id, same bytes.
    assert_eq!(code_of(&c.modify_volume(&raw, &to("nvme")).await), Code::Ok);
    assert_eq!(
        c.get_volume(&raw)
            .await
            .map(|v| (v.agent, v.volume_type, v.id))
            .map_err(|e| e.to_string()),
        Ok(("b".to_string(), "nvme".to_string(), id.clone()))
    );
    assert_eq!(agents[0].volume_ids(), Vec::<String>::new());
    assert_eq!(
        agents[1].content(&id).map(|d| d[..13].to_vec()),
        Some(b"hello, retype".to_vec())
    );
    // Again: nothing to do. Errors: unknown type, unknown key, no pool in the zone, unknown id.
    let ghost = volume_id_for("ghost").to_string();
    let cases = [
        (raw.as_str(), to("nvme"), Code::Ok),
        (raw.as_str(), to("gold"), Code::InvalidArgument),
        (
            raw.as_str(),
            BTreeMap::from([("iops".to_string(), "5".to_string())]),
            Code::InvalidArgument,
        ),
        // The only hdd pool is in another zone than the volume.
        (raw.as_str(), to("hdd"), Code::ResourceExhausted),
        (ghost.as_str(), to("ssd"), Code::NotFound),
    ];
    for (vol, params, want) in cases {
        let got = c.modify_volume(vol, &params).await;
        assert_eq!(code_of(&got), want, "{vol} {params:?}: {got:?}");
    }
}

#[tokio::test]
async fn the_index_is_rebuilt_from_the_agents_after_a_restart() {
    let agents = three();
    let c = controller(&agents).await;
    let v = c.create_volume(req("keep", 1)).await;
    let _ = c
        .create_snapshot(
            "keep-snap",
            volume_id_for("keep").as_str(),
            &BTreeMap::new(),
        )
        .await;
    let id = volume_id_for("keep").to_string();
    assert_eq!(
        code_of(&c.publish_volume(&id, NODE1, &mount()).await),
        Code::Ok
    );
    drop(c);
    let restarted = controller(&agents).await;
    let again = restarted.create_volume(req("keep", 1)).await;
    assert_eq!(
        again
            .map(|v| (v.id, v.published_nodes))
            .map_err(|e| e.to_string()),
        v.map(|v| (v.id, vec![NODE1.to_string()]))
            .map_err(|e| e.to_string())
    );
    assert_eq!(
        code_of(
            &restarted
                .get_snapshot(snapshot_id_for("keep-snap").as_str())
                .await
        ),
        Code::Ok
    );
}

#[tokio::test]
async fn an_agent_never_listed_makes_lookups_unavailable() {
    let agents = three();
    agents[2].set_down(true);
    let settings = Settings {
        scheduler: crate::scheduler::SchedulerConfig::default(),
        volume_types: types(),
        default_volume_type: "default".into(),
    };
    let seams: Vec<Arc<dyn StorageAgent>> = agents
        .iter()
        .map(|a| a.clone() as Arc<dyn StorageAgent>)
        .collect();
    let c = match Controller::new(settings, seams) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(c.sync_all().await.len(), 1);
    let r = c.create_volume(req("x", 1)).await;
    assert_eq!(code_of(&r), Code::Unavailable);
    assert_eq!(
        code_of(&c.delete_volume(volume_id_for("x").as_str()).await),
        Code::Unavailable
    );
    agents[2].set_down(false);
    assert_eq!(code_of(&c.create_volume(req("x", 1)).await), Code::Ok);
}

#[tokio::test]
async fn invalid_volume_types_are_refused_at_start() {
    let mut t = types();
    t.insert(
        "broken".into(),
        VolumeType {
            name: "broken".into(),
            description: String::new(),
            extra_specs: BTreeMap::from([("iops".to_string(), ">= lots".to_string())]),
        },
    );
    let settings = Settings {
        scheduler: crate::scheduler::SchedulerConfig::default(),
        volume_types: t,
        default_volume_type: "default".into(),
    };
    assert_eq!(
        Controller::new(settings, vec![])
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Err(
            "internal error: volume type \"broken\": extra spec iops=\">= lots\" is invalid"
                .to_string()
        )
    );
}

/// The ids and statuses an inventory list shows.
fn statuses(
    page: &Result<Page<VolumeView>, ControllerError>,
) -> Result<Vec<(String, &'static str)>, String> {
    page.as_ref()
        .map(|p| {
            p.entries
                .iter()
                .map(|v| (v.name.clone().unwrap_or_default(), v.status.as_str()))
                .collect()
        })
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn inventory_shows_cinder_statuses_and_filters() {
    let agents = three();
    let c = controller(&agents).await;
    let ssd = c
        .create_volume(with_param(req("inv-ssd", 1), "type", "ssd"))
        .await;
    let hdd = c
        .create_volume(with_param(req("inv-hdd", 2), "type", "hdd"))
        .await;
    assert_eq!(
        [placed(&ssd), placed(&hdd)],
        [Ok("a#p".to_string()), Ok("b#p".to_string())]
    );
    let hdd_id = volume_id_for("inv-hdd").to_string();
    assert_eq!(
        code_of(&c.publish_volume(&hdd_id, NODE1, &mount()).await),
        Code::Ok
    );

    let all = VolumeFilter::default();
    let mut want = vec![("inv-ssd", "available"), ("inv-hdd", "in-use")];
    want.sort_by_key(|(n, _)| volume_id_for(n).to_string());
    let want: Vec<(String, &str)> = want.into_iter().map(|(n, s)| (n.to_string(), s)).collect();
    assert_eq!(statuses(&c.inventory_volumes(&all, 0, "").await), Ok(want));

    // (pool filter, status filter, names or the error)
    type Case<'a> = (&'a str, &'a str, Result<Vec<&'a str>, &'a str>);
    let cases: [Case<'_>; 7] = [
        ("", "in-use", Ok(vec!["inv-hdd"])),
        ("", "in_use", Ok(vec!["inv-hdd"])),
        ("", "available", Ok(vec!["inv-ssd"])),
        ("a#p", "", Ok(vec!["inv-ssd"])),
        ("b#p", "available", Ok(vec![])),
        ("c#p", "", Ok(vec![])),
        (
            "",
            "attached",
            Err(
                "invalid argument: unknown status \"attached\" (known: creating, available, \
                 attaching, in-use, detaching, deleting, extending, retyping, backing-up, \
                 restoring-backup, maintenance, error)",
            ),
        ),
    ];
    for (pool, status, want) in cases {
        let got = match VolumeFilter::parse(pool, status) {
            Ok(f) => c
                .inventory_volumes(&f, 0, "")
                .await
                .map(|p| {
                    p.entries
                        .into_iter()
                        .filter_map(|v| v.name)
                        .collect::<Vec<_>>()
                })
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let want = want
            .map(|v| v.into_iter().map(str::to_owned).collect::<Vec<_>>())
            .map_err(str::to_owned);
        assert_eq!(got, want, "{pool:?} {status:?}");
    }
    // The pool name alone matches on every agent ("p" is on all three).
    let by_name = c
        .inventory_volumes(&VolumeFilter::parse("p", "").unwrap_or_default(), 0, "")
        .await
        .map(|p| p.entries.len());
    assert_eq!(by_name.map_err(|e| e.to_string()), Ok(2));

    // The in-use volume shows where it is attached, with the node's host.
    let shown = c.volume_by_name("inv-hdd").await;
    assert_eq!(
        shown
            .as_ref()
            .map(|v| (v.id.to_string(), v.attachments.clone(), v.capacity))
            .map_err(|e| e.to_string()),
        Ok((
            hdd_id.clone(),
            vec![Attachment {
                host: Some("node-1".into()),
                initiator: "iqn.1993-08.org.debian:01:aaa".into()
            }],
            Bytes::gib(2)
        ))
    );
    assert_eq!(
        c.volume_by_name("nobody")
            .await
            .map(|v| v.id)
            .map_err(|e| e.to_string()),
        Err("volume nobody not found".to_string())
    );
    // An id is not a name.
    assert_eq!(code_of(&c.volume_by_name(&hdd_id).await), Code::NotFound);

    // An agent that does not answer: its volumes come from the index, marked abnormal.
    agents[1].set_down(true);
    let listed = c.inventory_volumes(&all, 0, "").await;
    let hdd_row = listed
        .as_ref()
        .ok()
        .and_then(|p| p.entries.iter().find(|v| v.id.as_str() == hdd_id))
        .map(|v| (v.status, v.abnormal.clone()));
    assert_eq!(
        hdd_row,
        Some((
            CinderStatus::InUse,
            Some("agent b does not answer: agent is down".to_string())
        ))
    );
    agents[1].set_down(false);
}

#[tokio::test]
async fn inventory_shows_operations_in_flight() {
    let agents = three();
    let c = Arc::new(controller(&agents).await);
    let _ = c.create_volume(req("busy", 1)).await;
    let id = volume_id_for("busy").to_string();
    agents[0].set_latency(Duration::from_millis(300));
    let deleting = {
        let c = c.clone();
        let id = id.clone();
        tokio::spawn(async move { c.delete_volume(&id).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let listed = c.inventory_volumes(&VolumeFilter::default(), 0, "").await;
    assert_eq!(
        statuses(&listed),
        Ok(vec![("busy".to_string(), "deleting")])
    );
    let done = deleting.await.map_err(|e| e.to_string());
    assert_eq!(done.map(|r| r.map_err(|e| e.to_string())), Ok(Ok(())));
    agents[0].set_latency(Duration::ZERO);
    let listed = c.inventory_volumes(&VolumeFilter::default(), 0, "").await;
    assert_eq!(statuses(&listed), Ok(vec![]));
}

#[tokio::test]
async fn inventory_of_snapshots_pools_and_types() {
    let agents = three();
    let c = controller(&agents).await;
    let _ = c
        .create_volume(with_param(req("s-src", 1), "type", "ssd"))
        .await;
    let _ = c
        .create_volume(with_param(req("s-other", 1), "type", "hdd"))
        .await;
    let src = volume_id_for("s-src").to_string();
    let other = volume_id_for("s-other").to_string();
    for (name, vol) in [("snap-a", &src), ("snap-b", &src), ("snap-c", &other)] {
        assert_eq!(
            code_of(&c.create_snapshot(name, vol, &BTreeMap::new()).await),
            Code::Ok
        );
    }
    let names = |r: Result<Page<SnapshotView>, ControllerError>| {
        r.map(|p| {
            let mut v: Vec<(String, &'static str, String)> = p
                .entries
                .into_iter()
                .map(|s| {
                    (
                        s.name.unwrap_or_default(),
                        s.status.as_str(),
                        s.source_volume.to_string(),
                    )
                })
                .collect();
            v.sort();
            v
        })
        .map_err(|e| e.to_string())
    };
    assert_eq!(
        names(c.inventory_snapshots(&src, 0, "").await),
        Ok(vec![
            ("snap-a".to_string(), "available", src.clone()),
            ("snap-b".to_string(), "available", src.clone()),
        ])
    );
    assert_eq!(
        names(c.inventory_snapshots("", 0, "").await).map(|v| v.len()),
        Ok(3)
    );
    assert_eq!(
        names(c.inventory_snapshots("no-such-volume", 0, "").await),
        Ok(vec![])
    );

    c.refresh_pools().await;
    let pools: Vec<(String, u64, u64, bool, Option<PoolKind>)> = c
        .pool_reports()
        .into_iter()
        .map(|p| {
            (
                p.id.to_string(),
                p.volume_count,
                p.snapshot_count,
                p.healthy,
                p.kind,
            )
        })
        .collect();
    let fake = Some(PoolKind::LvmThin);
    assert_eq!(
        pools,
        vec![
            ("a#p".to_string(), 1, 2, true, fake),
            ("b#p".to_string(), 1, 1, true, fake),
            ("c#p".to_string(), 0, 0, true, fake),
        ]
    );
    assert!(c
        .pool_reports()
        .iter()
        .all(|p| p.stats_age.is_some_and(|a| a < Duration::from_secs(5))));
    // Too slow to answer (a burst queued on its VG) is not down: the last figures stand.
    agents[2].fail_next(
        "list_pools",
        AgentClientError::new(AgentErrorKind::DeadlineExceeded, "Timeout expired"),
    );
    c.refresh_pools().await;
    let slow: Vec<(bool, Option<String>)> = c
        .pool_reports()
        .into_iter()
        .filter(|p| p.id.agent == "c")
        .map(|p| (p.healthy, p.unhealthy_reason))
        .collect();
    assert_eq!(slow, vec![(true, None)]);
    agents[2].set_down(true);
    c.refresh_pools().await;
    let down: Vec<(bool, Option<String>)> = c
        .pool_reports()
        .into_iter()
        .filter(|p| p.id.agent == "c")
        .map(|p| (p.healthy, p.unhealthy_reason))
        .collect();
    assert_eq!(
        down,
        vec![(
            false,
            Some("agent does not answer: agent is down".to_string())
        )]
    );

    let types: Vec<(String, bool)> = c
        .type_reports()
        .into_iter()
        .map(|t| (t.volume_type.name, t.is_default))
        .collect();
    assert_eq!(
        types,
        vec![
            ("default".to_string(), true),
            ("hdd".to_string(), false),
            ("nvme".to_string(), false),
            ("shared".to_string(), false),
            ("ssd".to_string(), false),
        ]
    );
}

#[tokio::test]
async fn a_report_older_than_a_finished_create_does_not_give_its_space_back() {
    let agents = vec![FakeAgent::new(
        "a",
        vec![FakePool::new("p", "z1", Bytes::gib(10))],
    )];
    let c = controller(&agents).await;
    let free = |c: &Controller| c.pools()[0].0.free;
    // A report asked for before the create, answered after it.
    let asked = std::time::Instant::now();
    let stale = agents[0].list_pools().await.unwrap();
    let v = c.create_volume(req("pvc-1", 4)).await;
    assert_eq!(code_of(&v), Code::Ok);
    let after_create = free(&c);
    {
        let mut st = c.state();
        c.apply_pools(&mut st, "a", Ok(stale), asked);
    }
    assert_eq!(
        free(&c),
        after_create,
        "the stale report must not free the new volume's space"
    );
    // A report asked for afterwards includes the volume: charged once, not twice.
    let asked = std::time::Instant::now();
    let fresh = agents[0].list_pools().await.unwrap();
    {
        let mut st = c.state();
        c.apply_pools(&mut st, "a", Ok(fresh), asked);
    }
    assert_eq!(free(&c), after_create);
    assert!(c.state().pending.is_empty());
}

#[tokio::test]
async fn an_agent_added_but_never_listed_holds_creates_back_until_forgotten() {
    let agents = three();
    let c = controller(&agents).await;
    let late = FakeAgent::new("late", vec![FakePool::new("p", "z1", Bytes::gib(10))]);
    late.set_down(true);
    c.add_agent(late.clone());
    c.refresh_pools().await;
    // It may hold a volume of that name: no create can be answered.
    assert_eq!(
        code_of(&c.create_volume(req("held", 1)).await),
        Code::Unavailable
    );
    assert!(c.forget_unlisted_agent("late"));
    assert!(!c.agent_names().contains(&"late".to_string()));
    assert_eq!(code_of(&c.create_volume(req("held", 1)).await), Code::Ok);
    // A listed agent is never forgotten: its volumes are routed to it.
    agents[0].set_down(true);
    assert!(!c.forget_unlisted_agent("a"));
    assert!(c.agent_names().contains(&"a".to_string()));
}
