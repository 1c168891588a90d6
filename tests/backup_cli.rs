//! Backups through the controller, end to end with real processes: real `cinderblock agent`s
//! (file pools, each behind its own private real tgtd) sharing one backup repository (a
//! POSIX directory, or a bucket of moto's real S3 server), one real `cinderblock controller`
//! over Unix sockets, driven by the real binary's `backup ...` commands (`-o json`) and by a
//! real CSI client (`type: backup` snapshots). Volume bytes are written and compared
//! through the pools' files; repository objects are damaged through the directory.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod common;
#[path = "common/stack.rs"]
mod stack;

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cinderblock::csi::TOPOLOGY_ZONE_KEY;
use cinderblock::proto::csi as pb;
use common::s3::S3Server;
use serde_json::Value;
use stack::{AgentSpec, Stack, BIN};

const MIB: u64 = 1 << 20;
/// Test volumes: 64 MiB in 256 KiB chunks (256 chunks, 2048 blocks of 32 KiB).
const SIZE: u64 = 64 * MIB;
const CHUNK: u64 = 256 * 1024;
const NODE1: &str = "node-1/iqn.1993-08.org.debian:01:node1";

fn spec(name: &'static str, zone: &'static str) -> AgentSpec {
    AgentSpec {
        name,
        zone,
        capacity_gib: 2,
        capabilities: "",
    }
}

/// Agent tables: a POSIX repository `shared` at `dir`.
fn posix_tables(dir: &Path) -> String {
    format!(
        r#"[backup]
chunk_size = {CHUNK}
max_in_flight = 4

[[backup_repositories]]
name = "shared"
kind = "posix"
path = "{}"
"#,
        dir.display()
    )
}

/// Agent tables: an S3 repository `s3` in bucket `backups`.
fn s3_tables(s3: &S3Server) -> String {
    format!(
        r#"[backup]
chunk_size = {CHUNK}
max_in_flight = 4

[[backup_repositories]]
name = "s3"
kind = "s3"
endpoint = "{}"
bucket = "backups"
region = "us-east-1"
access_key_id = "testing"
secret_access_key = "testing"
allow_http = true
"#,
        s3.endpoint()
    )
}

/// What one run of the CLI gave.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

async fn cli(stack: &Stack, args: &[&str]) -> Run {
    let out = tokio::process::Command::new(BIN)
        .args(args)
        .arg("--controller")
        .arg(format!("unix://{}", stack.csi.display()))
        .args(["-o", "json"])
        .env_remove("RUST_LOG")
        .env_remove("CINDERBLOCK_CONTROLLER")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("run cinderblock");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The CLI's JSON answer and its stderr; panics (with every log) unless it succeeds.
async fn ok(stack: &Stack, args: &[&str]) -> (Value, String) {
    let r = cli(stack, args).await;
    assert_eq!(r.code, Some(0), "{args:?}: {r:?}\n{}", stack.logs());
    let v = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {r:?}"));
    (v, r.stderr)
}

/// The CLI's stderr; panics unless it fails.
async fn fails(stack: &Stack, args: &[&str]) -> String {
    let r = cli(stack, args).await;
    assert_eq!(r.code, Some(1), "{args:?} did not fail: {r:?}");
    r.stderr
}

use common::mount;

fn in_zone(zone: &str) -> Option<pb::TopologyRequirement> {
    Some(pb::TopologyRequirement {
        requisite: vec![pb::Topology {
            segments: HashMap::from([(TOPOLOGY_ZONE_KEY.to_string(), zone.to_string())]),
        }],
        preferred: vec![],
    })
}

/// A 64 MiB volume called `name` in `zone`, through CSI: its id.
async fn create_volume(stack: &Stack, name: &str, zone: &str) -> String {
    let mut csi = stack.client().await;
    csi.create_volume(pb::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(pb::CapacityRange {
            required_bytes: SIZE as i64,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount()],
        accessibility_requirements: in_zone(zone),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("create {name}: {e}\n{}", stack.logs()))
    .into_inner()
    .volume
    .unwrap()
    .volume_id
}

fn image(stack: &Stack, agent: &str, id: &str) -> PathBuf {
    stack.agent(agent).pool_dir.join(format!("volume-{id}.img"))
}

fn write(path: &Path, offset: u64, data: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, offset).unwrap();
    f.sync_all().unwrap();
}

fn random(n: usize) -> Vec<u8> {
    use rand::RngCore;
    let mut b = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut b);
    b
}

/// Random data in [0, 8 MiB), text in [8, 16 MiB), four bytes at the very end: 65 of the
/// 256 chunks hold data.
fn fill(path: &Path) {
    write(path, 0, &random(8 * MIB as usize));
    let line = b"2026-01-02T03:04:05Z INFO volume attached, nothing to report here\n";
    let text: Vec<u8> = line
        .iter()
        .copied()
        .cycle()
        .take(8 * MIB as usize)
        .collect();
    write(path, 8 * MIB, &text);
    write(path, SIZE - 4, b"tail");
}

/// Changes 1% of the blocks (20 of 2048) in three chunks.
fn change_one_percent(path: &Path) {
    write(path, MIB + 32 * 1024, &random(7 * 32 * 1024));
    write(path, 12 * MIB + 32 * 1024, &random(7 * 32 * 1024));
    write(path, 40 * MIB, &random(6 * 32 * 1024));
}

/// `backup create ARGS`: the backup, after checking the plain progress lines (stderr is not
/// a terminal) end at 100%.
async fn backup_create(stack: &Stack, args: &[&str]) -> Value {
    let mut full = vec!["backup", "create"];
    full.extend_from_slice(args);
    let (b, progress) = ok(stack, &full).await;
    assert_eq!(b["status"], "available", "{b}");
    let last = progress.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("backup backup-")
            && last.contains("100% [####################] 64MiB of 64MiB"),
        "{progress}"
    );
    b
}

/// `backup restore ARGS`: (volume id, agent).
async fn backup_restore(stack: &Stack, args: &[&str]) -> (String, String) {
    let mut full = vec!["backup", "restore"];
    full.extend_from_slice(args);
    let (r, progress) = ok(stack, &full).await;
    assert!(
        progress
            .lines()
            .last()
            .unwrap_or_default()
            .starts_with("restore backup-")
            && progress.contains("100%"),
        "{progress}"
    );
    (
        r["volume"].as_str().unwrap().to_owned(),
        r["agent"].as_str().unwrap().to_owned(),
    )
}

async fn volume_status(stack: &Stack, id: &str) -> String {
    let (v, _) = ok(stack, &["volume", "show", id]).await;
    v["status"].as_str().unwrap().to_owned()
}

async fn wait_pools(stack: &Stack, healthy: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (pools, _) = ok(stack, &["pool", "list"]).await;
        let n = pools
            .as_array()
            .map(|a| a.iter().filter(|p| p["healthy"] == true).count())
            .unwrap_or(0);
        if n == healthy {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pools: {pools}\n{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Full, then incremental after 1% changed, on agent `a`; the source deleted; both restored
/// through the scheduler in zone z2 (agent `b`, which shares the repository) and compared.
/// Returns the ids of the full and the incremental backup.
async fn full_incremental_restore(stack: &Stack, repository: &str) -> (String, String) {
    let vol = create_volume(stack, "pvc-src", "z1").await;
    let src = image(stack, "a", &vol);
    fill(&src);
    let before = std::fs::read(&src).unwrap();

    let full = backup_create(stack, &["pvc-src", "--repository", repository]).await;
    let full_id = full["id"].as_str().unwrap().to_owned();
    assert_eq!(full["repository"], repository);
    assert_eq!(full["volume"], vol.as_str());
    assert_eq!(full["stored_chunks"], 65, "{full}");
    assert_eq!(full["data_bytes"], 65 * CHUNK, "{full}");
    // Both agents read the shared repository.
    let (shown, _) = ok(stack, &["backup", "show", &full_id]).await;
    assert_eq!(shown["agents"], serde_json::json!(["a", "b"]), "{shown}");

    change_one_percent(&src);
    let after = std::fs::read(&src).unwrap();
    let inc = backup_create(stack, &[&vol, "--incremental", "--repository", repository]).await;
    let inc_id = inc["id"].as_str().unwrap().to_owned();
    assert_eq!(inc["parent"], full_id.as_str(), "{inc}");
    assert_eq!(inc["stored_chunks"], 3, "{inc}");
    assert_eq!(inc["reused_chunks"], 63, "{inc}");

    // Cinder's rule: not while an incremental backup depends on it.
    let err = fails(stack, &["backup", "delete", &full_id]).await;
    assert!(
        err.contains("FailedPrecondition") && err.contains(&inc_id),
        "{err}"
    );
    let (listed, _) = ok(stack, &["backup", "list", "--volume", &vol]).await;
    let ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [full_id.as_str(), inc_id.as_str()], "{listed}");

    // The backups outlive their volume.
    let mut csi = stack.client().await;
    csi.delete_volume(pb::DeleteVolumeRequest {
        volume_id: vol.clone(),
        ..Default::default()
    })
    .await
    .expect("delete the source");
    for (backup, want) in [(&full_id, &before), (&inc_id, &after)] {
        let (restored, agent) =
            backup_restore(stack, &[backup, "--type", "default", "--zone", "z2"]).await;
        assert_eq!(agent, "b");
        assert!(
            std::fs::read(image(stack, "b", &restored)).unwrap() == *want,
            "the volume restored from {backup} differs"
        );
        assert_eq!(volume_status(stack, &restored).await, "available");
    }
    (full_id, inc_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posix_repository_shared_by_two_agents() {
    let repo = tempfile::tempdir().unwrap();
    // Agent c (zone z3) has no repository: the scheduler must never restore onto it.
    let stack = Stack::start_with(&[spec("a", "z1"), spec("b", "z2"), spec("c", "z3")], |s| {
        if s.name == "c" {
            String::new()
        } else {
            posix_tables(repo.path())
        }
    });
    wait_pools(&stack, 3).await;
    let (full, inc) = full_incremental_restore(&stack, "shared").await;

    // Zone z3 has pools, but none whose agent has the repository.
    let err = fails(&stack, &["backup", "restore", &full, "--zone", "z3"]).await;
    assert!(
        err.contains("ResourceExhausted") && err.contains("c#c: same-backend affinity"),
        "{err}"
    );

    // Onto an existing volume: too small is refused; an in-use one too.
    let small = create_volume(&stack, "pvc-small", "z2").await;
    let mut csi = stack.client().await;
    csi.controller_expand_volume(pb::ControllerExpandVolumeRequest {
        volume_id: small.clone(),
        capacity_range: Some(pb::CapacityRange {
            required_bytes: (SIZE + 4 * MIB) as i64,
            limit_bytes: 0,
        }),
        ..Default::default()
    })
    .await
    .expect("expand");
    let tiny = {
        let mut r = pb::CreateVolumeRequest {
            name: "pvc-tiny".into(),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: (16 * MIB) as i64,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![mount()],
            ..Default::default()
        };
        r.accessibility_requirements = in_zone("z2");
        csi.create_volume(r)
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
            .volume_id
    };
    let err = fails(&stack, &["backup", "restore", &inc, "--volume", &tiny]).await;
    assert!(err.contains("OutOfRange"), "{err}");
    let (r, _) = ok(
        &stack,
        &["backup", "restore", &inc, "--volume", "pvc-small"],
    )
    .await;
    assert_eq!(r["volume"], small.as_str());
    let restored = std::fs::read(image(&stack, "b", &small)).unwrap();
    assert_eq!(restored.len() as u64, SIZE + 4 * MIB);
    let (inc_vol, _) = ok(&stack, &["backup", "show", &inc]).await;
    assert_eq!(inc_vol["volume_size_bytes"], SIZE);

    // A flipped byte in a stored chunk: the restore fails naming it, and the new volume is
    // left in error (never available with bad data); the backup is untouched.
    let object = repo.path().join(&full).join("chunk-00000040");
    let mut stored = std::fs::read(&object).unwrap();
    let mid = stored.len() / 2;
    stored[mid] ^= 0x01;
    std::fs::write(&object, &stored).unwrap();
    let err = fails(
        &stack,
        &["backup", "restore", &full, "--zone", "z2", "--name", "bad"],
    )
    .await;
    assert!(
        err.contains("DataLoss") && err.contains(&format!("{full}/chunk-00000040")),
        "{err}"
    );
    assert_eq!(volume_status(&stack, "bad").await, "error");
    let (b, _) = ok(&stack, &["backup", "show", &full]).await;
    assert_eq!(b["status"], "available");
    assert_eq!(std::fs::read(&object).unwrap(), stored);

    // --force: an in-use (published) volume needs it.
    let vol = create_volume(&stack, "pvc-busy", "z1").await;
    fill(&image(&stack, "a", &vol));
    csi.controller_publish_volume(pb::ControllerPublishVolumeRequest {
        volume_id: vol.clone(),
        node_id: NODE1.into(),
        volume_capability: Some(mount()),
        ..Default::default()
    })
    .await
    .expect("publish");
    let err = fails(&stack, &["backup", "create", "pvc-busy"]).await;
    assert!(
        err.contains("FailedPrecondition") && err.contains("force"),
        "{err}"
    );
    let forced = backup_create(&stack, &["pvc-busy", "--force", "--name", "nightly"]).await;
    assert_eq!(forced["stored_chunks"], 65);
    assert_eq!(volume_status(&stack, &vol).await, "in-use");
    // The same name finds the same backup.
    let again = backup_create(&stack, &["pvc-busy", "--force", "--name", "nightly"]).await;
    assert_eq!(again["id"], forced["id"]);

    // Deleting: the incremental first, then its parent (damaged or not); an unknown id is
    // NOT_FOUND.
    ok(&stack, &["backup", "delete", &inc]).await;
    ok(&stack, &["backup", "delete", &full]).await;
    let err = fails(&stack, &["backup", "show", &full]).await;
    assert!(err.contains("NotFound"), "{err}");
    let err = fails(&stack, &["backup", "delete", &full]).await;
    assert!(err.contains("NotFound"), "{err}");
    assert!(!repo.path().join(&full).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_repository_shared_by_two_agents() {
    let s3 = S3Server::start("backups");
    let stack = Stack::start_with(&[spec("a", "z1"), spec("b", "z2")], |_| s3_tables(&s3));
    wait_pools(&stack, 2).await;
    let (full, inc) = full_incremental_restore(&stack, "s3").await;
    ok(&stack, &["backup", "delete", &inc]).await;
    ok(&stack, &["backup", "delete", &full]).await;
    let (listed, _) = ok(&stack, &["backup", "list"]).await;
    assert_eq!(listed, serde_json::json!([]));
    let listing = s3.http("GET", "/backups?list-type=2");
    assert!(listing.contains("<KeyCount>0</KeyCount>"), "{listing}");
}

/// Cinder's backup-export / backup-import: the record of a backup is all a fresh cluster
/// needs to restore it from a repository whose records were lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_and_import_into_a_fresh_cluster() {
    let repo = tempfile::tempdir().unwrap();
    let (record, id, want) = {
        let stack = Stack::start_with(&[spec("a", "z1")], |_| posix_tables(repo.path()));
        wait_pools(&stack, 1).await;
        let vol = create_volume(&stack, "pvc-old", "z1").await;
        fill(&image(&stack, "a", &vol));
        let b = backup_create(&stack, &[&vol]).await;
        let id = b["id"].as_str().unwrap().to_owned();
        let (rec, _) = ok(&stack, &["backup", "export", &id]).await;
        assert_eq!(rec["repository"], "shared");
        let want = std::fs::read(image(&stack, "a", &vol)).unwrap();
        (rec["record"].as_str().unwrap().to_owned(), id, want)
    };
    // The old cluster is gone, and the repository lost the backup's record.
    std::fs::remove_file(repo.path().join(&id).join("metadata")).unwrap();
    let stack = Stack::start_with(&[spec("n", "z9")], |_| posix_tables(repo.path()));
    wait_pools(&stack, 1).await;
    let (b, _) = ok(&stack, &["backup", "show", &id]).await;
    assert_eq!(b["status"], "error", "{b}");
    let err = fails(&stack, &["backup", "restore", &id]).await;
    assert!(err.contains("FailedPrecondition"), "{err}");
    let err = fails(&stack, &["backup", "import", "bm90IGEgcmVjb3Jk"]).await;
    assert!(err.contains("InvalidArgument"), "{err}");
    let (imported, _) = ok(&stack, &["backup", "import", &record]).await;
    assert_eq!(imported["status"], "available", "{imported}");
    assert_eq!(imported["id"], id.as_str());
    let (vol, agent) = backup_restore(&stack, &[&id]).await;
    assert_eq!(agent, "n");
    assert!(std::fs::read(image(&stack, "n", &vol)).unwrap() == want);
}

/// The CSI path: a VolumeSnapshotClass with `type: backup`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csi_snapshots_of_type_backup() {
    let repo = tempfile::tempdir().unwrap();
    let stack = Stack::start_with(&[spec("a", "z1"), spec("b", "z2")], |_| {
        posix_tables(repo.path())
    });
    wait_pools(&stack, 2).await;
    let vol = create_volume(&stack, "pvc-app", "z1").await;
    fill(&image(&stack, "a", &vol));
    let want = std::fs::read(image(&stack, "a", &vol)).unwrap();
    let mut csi = stack.client().await;
    let req = |params: &[(&str, &str)]| pb::CreateSnapshotRequest {
        name: "snapshot-1".into(),
        source_volume_id: vol.clone(),
        parameters: params
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..Default::default()
    };
    let err = csi
        .create_snapshot(req(&[("type", "backup"), ("incremental", "maybe")]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    let params = [
        ("type", "backup"),
        ("repository", "shared"),
        ("incremental", "true"), // no full backup yet: a full one
        ("csi.storage.k8s.io/volumesnapshot/name", "snap"),
    ];
    let first = csi
        .create_snapshot(req(&params))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", stack.logs()))
        .into_inner()
        .snapshot
        .unwrap();
    assert!(first.snapshot_id.starts_with("backup-"), "{first:?}");
    assert_eq!(first.source_volume_id, vol);
    assert_eq!(first.size_bytes, SIZE as i64);
    // The snapshotter calls again until ready: same snapshot every time.
    let deadline = Instant::now() + Duration::from_secs(60);
    let ready = loop {
        let s = csi
            .create_snapshot(req(&params))
            .await
            .unwrap()
            .into_inner()
            .snapshot
            .unwrap();
        assert_eq!(s.snapshot_id, first.snapshot_id);
        if s.ready_to_use {
            break s;
        }
        assert!(Instant::now() < deadline, "never ready\n{}", stack.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (b, _) = ok(&stack, &["backup", "show", &ready.snapshot_id]).await;
    assert_eq!(b["parent"], Value::Null, "{b}");
    // The same name for another volume is ALREADY_EXISTS.
    let other = create_volume(&stack, "pvc-other", "z1").await;
    let mut clash = req(&params);
    clash.source_volume_id = other;
    let err = csi.create_snapshot(clash).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err:?}");

    let listed = csi
        .list_snapshots(pb::ListSnapshotsRequest {
            source_volume_id: vol.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = listed
        .entries
        .iter()
        .map(|e| e.snapshot.as_ref().unwrap().snapshot_id.as_str())
        .collect();
    assert_eq!(ids, [ready.snapshot_id.as_str()]);
    let got = csi
        .get_snapshot(pb::GetSnapshotRequest {
            snapshot_id: ready.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert!(got.ready_to_use);

    // A PVC from the snapshot, in the other zone: restored on agent b.
    let restore = pb::CreateVolumeRequest {
        name: "pvc-restored".into(),
        volume_capabilities: vec![mount()],
        volume_content_source: Some(pb::VolumeContentSource {
            r#type: Some(pb::volume_content_source::Type::Snapshot(
                pb::volume_content_source::SnapshotSource {
                    snapshot_id: ready.snapshot_id.clone(),
                },
            )),
        }),
        accessibility_requirements: in_zone("z2"),
        ..Default::default()
    };
    let v = csi
        .create_volume(restore.clone())
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", stack.logs()))
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v.capacity_bytes, SIZE as i64);
    assert!(std::fs::read(image(&stack, "b", &v.volume_id)).unwrap() == want);
    assert_eq!(volume_status(&stack, &v.volume_id).await, "available");
    // A retry returns the same volume.
    let again = csi.create_volume(restore).await.unwrap().into_inner();
    assert_eq!(again.volume.unwrap().volume_id, v.volume_id);

    // DeleteSnapshot deletes the backup; again is fine.
    for _ in 0..2 {
        csi.delete_snapshot(pb::DeleteSnapshotRequest {
            snapshot_id: ready.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let (listed, _) = ok(&stack, &["backup", "list"]).await;
    assert_eq!(listed, serde_json::json!([]));
    let err = csi
        .get_snapshot(pb::GetSnapshotRequest {
            snapshot_id: ready.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}
