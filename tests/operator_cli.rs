//! The operator CLI end to end: the real `cinderblock controller` in front of three real
//! `cinderblock agent` processes (file pools, each with its own private real tgtd). Volumes and
//! snapshots are made through a real CSI client, one volume is published; then the real
//! `cinderblock` binary's `volume`, `snapshot`, `pool` and `type` commands are run against the
//! controller's CSI socket and its `--operator-listen` socket, and their JSON and tables are
//! compared with what was made and with what the agents themselves report.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod common;
#[path = "common/stack.rs"]
mod stack;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use cinderblock::csi::TOPOLOGY_ZONE_KEY;
use cinderblock::proto::agent as agent_pb;
use cinderblock::proto::agent::agent_client::AgentClient;
use cinderblock::proto::csi as pb;
use cinderblock::transport::{self, Endpoint};

use serde_json::Value;
use stack::{AgentSpec, Stack, BIN};

const GIB: i64 = 1 << 30;
const MIB: i64 = 1 << 20;
const NODE1: &str = "node-1/iqn.1993-08.org.debian:01:node1";

/// What one run of the CLI gave.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs the real binary with `args` against the controller socket `socket`.
async fn cli(socket: &Path, args: &[&str]) -> Run {
    let out = tokio::process::Command::new(BIN)
        .args(args)
        .arg("--controller")
        .arg(format!("unix://{}", socket.display()))
        .env_remove("RUST_LOG")
        .env_remove("CINDERBLOCK_CONTROLLER")
        .output()
        .await
        .expect("run cinderblock");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs the CLI, expects success and JSON on stdout.
async fn cli_json(socket: &Path, args: &[&str]) -> Value {
    let run = cli(socket, args).await;
    assert_eq!(run.code, Some(0), "{args:?}: {run:?}");
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {run:?}"))
}

/// Runs the CLI, expects success and returns the table.
async fn cli_table(socket: &Path, args: &[&str]) -> String {
    let run = cli(socket, args).await;
    assert_eq!(run.code, Some(0), "{args:?}: {run:?}");
    run.stdout
}

use common::mount;

fn create_req(name: &str, bytes: i64, volume_type: &str) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(pb::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount()],
        parameters: if volume_type.is_empty() {
            HashMap::new()
        } else {
            HashMap::from([("type".to_string(), volume_type.to_string())])
        },
        ..Default::default()
    }
}

fn in_zone(mut r: pb::CreateVolumeRequest, zone: &str) -> pb::CreateVolumeRequest {
    let topo = pb::Topology {
        segments: HashMap::from([(TOPOLOGY_ZONE_KEY.to_string(), zone.to_string())]),
    };
    r.accessibility_requirements = Some(pb::TopologyRequirement {
        requisite: vec![topo],
        preferred: vec![],
    });
    r
}

/// `pool list -o json` until every agent's pool is listed and healthy.
async fn wait_pools(stack: &Stack) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let pools = cli_json(&stack.csi, &["pool", "list", "-o", "json"]).await;
        let healthy = pools
            .as_array()
            .map(|a| a.iter().filter(|p| p["healthy"] == true).count())
            .unwrap_or(0);
        if healthy == stack.agents.len() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pools never became healthy: {pools}\n{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Each agent's own ListPools: pool name → (volumes, snapshots).
async fn agent_counts(stack: &Stack) -> BTreeMap<String, (u64, u64)> {
    let mut out = BTreeMap::new();
    for a in &stack.agents {
        let ch = transport::connect(&Endpoint::Unix(a.socket.clone()), false)
            .await
            .expect("connect agent");
        let pools = AgentClient::new(ch)
            .list_pools(agent_pb::ListPoolsRequest {})
            .await
            .expect("agent ListPools")
            .into_inner()
            .pools;
        for p in pools {
            out.insert(
                format!("{}#{}", a.spec.name, p.name),
                (u64::from(p.volume_count), u64::from(p.snapshot_count)),
            );
        }
    }
    out
}

/// `pool list -o json`: `agent#pool` → (volumes, snapshots).
fn cli_counts(pools: &Value) -> BTreeMap<String, (u64, u64)> {
    pools
        .as_array()
        .expect("a JSON array")
        .iter()
        .map(|p| {
            (
                format!(
                    "{}#{}",
                    p["agent"].as_str().unwrap(),
                    p["name"].as_str().unwrap()
                ),
                (
                    p["volume_count"].as_u64().unwrap(),
                    p["snapshot_count"].as_u64().unwrap(),
                ),
            )
        })
        .collect()
}

/// The fields of a `volume list -o json` entry that the test compares.
#[derive(Debug, PartialEq, Eq)]
struct Row {
    id: String,
    status: String,
    size_bytes: u64,
    volume_type: String,
    /// `agent#pool`.
    pool: String,
    zone: String,
    /// The attachments as JSON text.
    attachments: String,
}

impl Row {
    fn of(v: &Value) -> Row {
        let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
        Row {
            id: s("id"),
            status: s("status"),
            size_bytes: v["size_bytes"].as_u64().unwrap_or_default(),
            volume_type: s("type"),
            pool: format!("{}#{}", s("agent"), s("pool")),
            zone: s("zone"),
            attachments: v["attachments"].to_string(),
        }
    }
}

/// Volumes of a `volume list -o json` answer by name.
fn by_name(list: &Value) -> BTreeMap<String, Value> {
    list.as_array()
        .expect("a JSON array")
        .iter()
        .map(|v| (v["name"].as_str().unwrap_or_default().to_owned(), v.clone()))
        .collect()
}

/// The header line of a table.
fn header(table: &str) -> Vec<String> {
    table
        .lines()
        .next()
        .unwrap_or_default()
        .split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operator_cli_reports_what_the_agents_hold() {
    let stack = tokio::task::spawn_blocking(|| Stack::start(&AgentSpec::three_zones()))
        .await
        .expect("stack");
    let mut csi = stack.client().await;
    wait_pools(&stack).await;

    // Three volumes on three agents, one published, one snapshot.
    let ssd = csi
        .create_volume(create_req("op-ssd", GIB, "ssd"))
        .await
        .expect("create op-ssd")
        .into_inner()
        .volume
        .unwrap();
    let hdd = csi
        .create_volume(create_req("op-hdd", 2 * GIB, "hdd"))
        .await
        .expect("create op-hdd")
        .into_inner()
        .volume
        .unwrap();
    let plain = csi
        .create_volume(in_zone(create_req("op-plain", 512 * MIB, ""), "z3"))
        .await
        .expect("create op-plain")
        .into_inner()
        .volume
        .unwrap();
    csi.controller_publish_volume(pb::ControllerPublishVolumeRequest {
        volume_id: hdd.volume_id.clone(),
        node_id: NODE1.into(),
        volume_capability: Some(mount()),
        ..Default::default()
    })
    .await
    .expect("publish op-hdd");
    let snap = csi
        .create_snapshot(pb::CreateSnapshotRequest {
            name: "op-snap".into(),
            source_volume_id: ssd.volume_id.clone(),
            ..Default::default()
        })
        .await
        .expect("snapshot op-ssd")
        .into_inner()
        .snapshot
        .unwrap();

    // volume list -o json: statuses derived from the agents, sizes, pools, types, attachments.
    let list = cli_json(&stack.csi, &["volume", "list", "-o", "json"]).await;
    let got: BTreeMap<String, Row> = by_name(&list)
        .into_iter()
        .map(|(n, v)| (n, Row::of(&v)))
        .collect();
    let row = |id: &str, status: &str, size_bytes: u64, vtype: &str, pool: &str, zone: &str| Row {
        id: id.to_owned(),
        status: status.to_owned(),
        size_bytes,
        volume_type: vtype.to_owned(),
        pool: pool.to_owned(),
        zone: zone.to_owned(),
        attachments: "[]".to_owned(),
    };
    let want = BTreeMap::from([
        (
            "op-ssd".to_string(),
            row(&ssd.volume_id, "available", 1 << 30, "ssd", "a#a", "z1"),
        ),
        (
            "op-hdd".to_string(),
            Row {
                attachments: r#"[{"host":"node-1","initiator":"iqn.1993-08.org.debian:01:node1"}]"#
                    .to_owned(),
                ..row(&hdd.volume_id, "in-use", 2 << 30, "hdd", "b#b", "z2")
            },
        ),
        (
            "op-plain".to_string(),
            row(
                &plain.volume_id,
                "available",
                512 << 20,
                "default",
                "c#c",
                "z3",
            ),
        ),
    ]);
    assert_eq!(got, want, "{list}");
    let ssd_json = &by_name(&list)["op-ssd"];
    assert_eq!(ssd_json["snapshot_count"], 1);
    assert_eq!(ssd_json["metadata"]["csi.name"], "op-ssd");
    assert!(ssd_json["created_at"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));

    // Filters.
    let names = |v: &Value| by_name(v).into_keys().collect::<Vec<_>>();
    let in_use = cli_json(
        &stack.csi,
        &["volume", "list", "--status", "in-use", "-o", "json"],
    )
    .await;
    assert_eq!(names(&in_use), ["op-hdd"]);
    let on_a = cli_json(
        &stack.csi,
        &["volume", "list", "--pool", "a#a", "-o", "json"],
    )
    .await;
    assert_eq!(names(&on_a), ["op-ssd"]);

    // The table has its header and one row per volume.
    let table = cli_table(&stack.csi, &["volume", "list"]).await;
    assert_eq!(
        header(&table),
        [
            "ID",
            "NAME",
            "STATUS",
            "SIZE",
            "TYPE",
            "POOL",
            "ZONE",
            "ATTACHED TO"
        ]
    );
    assert_eq!(table.lines().count(), 4, "{table}");
    let hdd_line = table
        .lines()
        .find(|l| l.contains("op-hdd"))
        .unwrap_or_default();
    for part in [
        hdd.volume_id.as_str(),
        "in-use",
        "2GiB",
        "hdd",
        "b#b",
        "node-1",
    ] {
        assert!(hdd_line.contains(part), "{part} in {hdd_line:?}");
    }

    // volume show: by CSI name and by id, table and JSON.
    let shown = cli_table(&stack.csi, &["volume", "show", "op-hdd"]).await;
    assert_eq!(header(&shown), ["PROPERTY", "VALUE"]);
    let status_line = shown
        .lines()
        .find(|l| l.starts_with("status "))
        .unwrap_or_default();
    assert_eq!(
        status_line.split_whitespace().nth(1),
        Some("in-use"),
        "{shown}"
    );
    let by_id = cli_json(
        &stack.csi,
        &["volume", "show", &hdd.volume_id, "-o", "json"],
    )
    .await;
    assert_eq!(
        (&by_id["name"], &by_id["status"], &by_id["size_bytes"]),
        (
            &Value::from("op-hdd"),
            &Value::from("in-use"),
            &Value::from(2u64 << 30)
        )
    );

    // snapshot list: all, and of one volume named by its CSI name.
    let snaps = cli_json(&stack.csi, &["snapshot", "list", "-o", "json"]).await;
    let one = |v: &Value| {
        v.as_array().map(|a| {
            a.iter()
                .map(|s| {
                    (
                        s["id"].as_str().unwrap_or_default().to_owned(),
                        s["name"].as_str().unwrap_or_default().to_owned(),
                        s["status"].as_str().unwrap_or_default().to_owned(),
                        s["volume_id"].as_str().unwrap_or_default().to_owned(),
                        s["size_bytes"].as_u64().unwrap_or_default(),
                    )
                })
                .collect::<Vec<_>>()
        })
    };
    let want_snap = Some(vec![(
        snap.snapshot_id.clone(),
        "op-snap".to_string(),
        "available".to_string(),
        ssd.volume_id.clone(),
        1u64 << 30,
    )]);
    assert_eq!(one(&snaps), want_snap);
    let of_ssd = cli_json(
        &stack.csi,
        &["snapshot", "list", "--volume", "op-ssd", "-o", "json"],
    )
    .await;
    assert_eq!(one(&of_ssd), want_snap);
    let of_hdd = cli_json(
        &stack.csi,
        &["snapshot", "list", "--volume", &hdd.volume_id, "-o", "json"],
    )
    .await;
    assert_eq!(one(&of_hdd), Some(vec![]));
    let table = cli_table(&stack.csi, &["snapshot", "list"]).await;
    assert_eq!(
        header(&table),
        ["ID", "NAME", "STATUS", "VOLUME", "SIZE", "POOL", "CREATED"]
    );

    // pool list over the operator-only socket: counts match the agents' own once the
    // statistics have been refreshed (every second in the test configuration).
    let deadline = Instant::now() + Duration::from_secs(15);
    let pools = loop {
        let pools = cli_json(&stack.operator, &["pool", "list", "-o", "json"]).await;
        let want = agent_counts(&stack).await;
        if cli_counts(&pools) == want {
            assert_eq!(
                want,
                BTreeMap::from([
                    ("a#a".to_string(), (1, 1)),
                    ("b#b".to_string(), (1, 0)),
                    ("c#c".to_string(), (1, 0)),
                ])
            );
            break pools;
        }
        assert!(
            Instant::now() < deadline,
            "counts never matched: {pools} vs {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let a = &pools[0];
    assert_eq!(
        (
            &a["name"],
            &a["agent"],
            &a["zone"],
            &a["kind"],
            &a["total"],
            &a["capabilities"]["media"],
            &a["healthy"],
            &a["unhealthy_reason"],
        ),
        (
            &Value::from("a"),
            &Value::from("a"),
            &Value::from("z1"),
            &Value::from("file"),
            &Value::from(12u64 << 30),
            &Value::from("ssd"),
            &Value::from(true),
            &Value::Null,
        ),
        "{a}"
    );
    assert!(
        a["provisioned_bytes"].as_u64().unwrap_or_default() >= 2 << 30,
        "the volume and its snapshot: {a}"
    );
    assert!(
        a["stats_age_seconds"].as_f64().is_some_and(|s| s < 10.0),
        "{a}"
    );
    let table = cli_table(&stack.operator, &["pool", "list"]).await;
    assert_eq!(header(&table)[..3], ["POOL", "ZONE", "KIND"]);
    assert_eq!(table.lines().count(), 4, "{table}");

    // type list: the controller's configured types.
    let types = cli_json(&stack.csi, &["type", "list", "-o", "json"]).await;
    let got: Vec<(String, bool, String, Value)> = types
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap_or_default().to_owned(),
                t["is_default"].as_bool().unwrap_or_default(),
                t["description"].as_str().unwrap_or_default().to_owned(),
                t["extra_specs"].clone(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (
                "default".into(),
                true,
                "anything".into(),
                serde_json::json!({})
            ),
            (
                "hdd".into(),
                false,
                String::new(),
                serde_json::json!({"media": "hdd"})
            ),
            (
                "shared".into(),
                false,
                String::new(),
                serde_json::json!({"multiattach": "<is> True"})
            ),
            (
                "ssd".into(),
                false,
                String::new(),
                serde_json::json!({"media": "ssd"})
            ),
        ]
    );
    let table = cli_table(&stack.csi, &["type", "list"]).await;
    assert_eq!(
        header(&table),
        ["NAME", "DEFAULT", "DESCRIPTION", "EXTRA SPECS"]
    );

    // After unpublishing, the volume is available again.
    csi.controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
        volume_id: hdd.volume_id.clone(),
        node_id: NODE1.into(),
        ..Default::default()
    })
    .await
    .expect("unpublish");
    let again = cli_json(&stack.csi, &["volume", "show", "op-hdd", "-o", "json"]).await;
    assert_eq!(
        (&again["status"], &again["attachments"]),
        (&Value::from("available"), &serde_json::json!([]))
    );

    // Failures: one line on stderr, a non-zero exit, nothing on stdout.
    let cases: [(&[&str], &Path, &str); 3] = [
        (
            &["volume", "show", "ghost"],
            &stack.csi,
            "cinderblock: error: volume \"ghost\" not found (no volume has this id or CSI name)\n",
        ),
        (
            &["volume", "list", "--status", "bogus"],
            &stack.csi,
            "cinderblock: error: ListVolumes failed: InvalidArgument: invalid argument: unknown \
             status \"bogus\" (known: creating, available, attaching, in-use, detaching, \
             deleting, extending, retyping, backing-up, restoring-backup, maintenance, error)\n",
        ),
        (&["pool", "list"], &stack.agents[0].socket, ""),
    ];
    for (args, socket, want) in cases {
        let run = cli(socket, args).await;
        assert_eq!(
            (run.code, run.stdout.as_str()),
            (Some(1), ""),
            "{args:?}: {run:?}"
        );
        if want.is_empty() {
            let line = format!(
                "cinderblock: error: unix://{} does not serve the operator API (is it the \
                 controller's endpoint?)\n",
                socket.display()
            );
            assert_eq!(run.stderr, line, "{args:?}");
        } else {
            assert_eq!(run.stderr, want, "{args:?}");
        }
    }
}
