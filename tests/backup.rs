//! Backups end to end with real processes: the real `cinderblock agent` (file pool, its own
//! private real tgtd) driven with the real `agent-ctl -o json`, backing up into a POSIX
//! directory and into a real S3-compatible server on 127.0.0.1 (moto's server from PyPI,
//! installed with pip by the test if missing, started on a free port and stopped by PID).
//! Volume bytes are written and compared through the pool's files; repository objects are
//! damaged through the repository directory; a full repository is a real 8 MiB tmpfs
//! (needs root, as the real-tgtd tests do).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod common;
#[path = "common/stack.rs"]
mod stack;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::s3::S3Server;
use common::tgtd::Tgtd;
use common::{require_tool, run, run_ok};
use serde_json::Value;
use stack::{AgentSpec, Proc, BIN};

const MIB: u64 = 1 << 20;
/// Test volumes: 64 MiB in 256 KiB chunks (256 chunks, 2048 blocks of 32 KiB).
const SIZE: u64 = 64 * MIB;
const CHUNK: u64 = 256 * 1024;

const SPEC: AgentSpec = AgentSpec {
    name: "b1",
    zone: "z1",
    capacity_gib: 4,
    capabilities: "",
};

// ---- the agent -----------------------------------------------------------------------------

struct Agent {
    socket: PathBuf,
    metrics: u16,
    pool: PathBuf,
    repo: PathBuf,
    proc: Proc,
    _tgtd: Tgtd,
    _dir: tempfile::TempDir,
}

/// An agent with a POSIX repository `local` at `repo` (default: inside its directory) and,
/// with `s3`, a repository `s3` in that server's bucket `backups`; `default` is the default.
fn start_agent(repo: Option<&Path>, s3: Option<&S3Server>, default: &str) -> Agent {
    start_agent_on(None, repo, s3, default)
}

/// [`start_agent`] with its file pool in `pool` (default: inside its directory).
fn start_agent_on(
    pool: Option<&Path>,
    repo: Option<&Path>,
    s3: Option<&S3Server>,
    default: &str,
) -> Agent {
    let tgtd = stack::start_tgtd();
    let dir = tempfile::tempdir().unwrap();
    let pool = pool.map_or_else(|| dir.path().join("pool"), Path::to_owned);
    std::fs::create_dir_all(&pool).unwrap();
    let repo = repo.map_or_else(|| dir.path().join("repo"), Path::to_owned);
    let socket = dir.path().join("agent.sock");
    let mut tables = format!(
        r#"[backup]
chunk_size = {CHUNK}
max_in_flight = 4
default_repository = "{default}"

[[backup_repositories]]
name = "local"
kind = "posix"
path = "{}"
"#,
        repo.display()
    );
    if let Some(s3) = s3 {
        tables.push_str(&format!(
            r#"
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
        ));
    }
    let listen = format!("unix://{}", socket.display());
    let metrics = common::tgtd::free_tcp_port();
    let root = format!("metrics_listen = \"127.0.0.1:{metrics}\"");
    let toml = stack::agent_config(&SPEC, &listen, &tgtd, &pool, &root, &tables);
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, toml).unwrap();
    let proc = Proc::spawn(
        &["agent", "--config", config.to_str().unwrap()],
        dir.path().join("agent.log"),
        &socket,
    );
    Agent {
        socket,
        metrics,
        pool,
        repo,
        proc,
        _tgtd: tgtd,
        _dir: dir,
    }
}

impl Agent {
    fn ctl_raw(&self, args: &[&str]) -> Output {
        let agent = format!("unix://{}", self.socket.display());
        run(Command::new(BIN)
            .args(["agent-ctl", "--agent", &agent, "-o", "json"])
            .args(args)
            .stdin(Stdio::null()))
    }

    /// `agent-ctl -o json ARGS`: its JSON answer and its stderr (progress); panics unless it
    /// succeeds.
    fn ctl_with_stderr(&self, args: &[&str]) -> (Value, String) {
        let out = self.ctl_raw(args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "agent-ctl {args:?}: {}\n--- agent\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.proc.log_text()
        );
        let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "agent-ctl {args:?}: {e}: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        (v, String::from_utf8_lossy(&out.stderr).into_owned())
    }

    fn ctl(&self, args: &[&str]) -> Value {
        self.ctl_with_stderr(args).0
    }

    /// `agent-ctl ARGS` that must fail: its stderr.
    fn ctl_fails(&self, args: &[&str]) -> String {
        let out = self.ctl_raw(args);
        assert_ne!(
            out.status.code(),
            Some(0),
            "agent-ctl {args:?} succeeded: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    fn create_volume(&self, id: &str) {
        let v = self.ctl(&["create", id, "--pool", SPEC.name, "--size", "64Mi"]);
        assert_eq!(v["size_bytes"], SIZE);
    }

    fn image(&self, id: &str) -> PathBuf {
        self.pool.join(format!("volume-{id}.img"))
    }

    fn bytes(&self, id: &str) -> Vec<u8> {
        std::fs::read(self.image(id)).unwrap()
    }

    fn write(&self, id: &str, offset: u64, data: &[u8]) {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(self.image(id))
            .unwrap();
        f.write_all_at(data, offset).unwrap();
        f.sync_all().unwrap();
    }

    fn status(&self, volume: &str) -> String {
        let vols = self.ctl(&["volumes"]);
        vols.as_array()
            .unwrap()
            .iter()
            .find(|v| v["id"] == volume)
            .map(|v| v["status"].as_str().unwrap().to_owned())
            .unwrap_or_else(|| panic!("no volume {volume}: {vols}"))
    }
}

fn random(n: usize) -> Vec<u8> {
    use rand::RngCore;
    let mut b = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut b);
    b
}

/// Test content: random data in [0, 8 MiB), text in [8, 16 MiB), written zeros in
/// [16, 24 MiB), unallocated after, four bytes at the very end. 65 of the 256 chunks hold
/// data.
fn fill(agent: &Agent, id: &str) {
    agent.write(id, 0, &random(8 * MIB as usize));
    let line = b"2026-01-02T03:04:05Z INFO volume attached, nothing to report here\n";
    let text: Vec<u8> = line
        .iter()
        .copied()
        .cycle()
        .take(8 * MIB as usize)
        .collect();
    agent.write(id, 8 * MIB, &text);
    agent.write(id, 16 * MIB, &vec![0u8; 8 * MIB as usize]);
    agent.write(id, SIZE - 4, b"tail");
}

/// Changes 1% of the blocks (20 of 2048), in three runs inside three chunks: one of random
/// data, one of text, one that was a hole.
fn change_one_percent(agent: &Agent, id: &str) {
    agent.write(id, MIB + 32 * 1024, &random(7 * 32 * 1024));
    agent.write(id, 12 * MIB + 32 * 1024, &random(7 * 32 * 1024));
    agent.write(id, 40 * MIB, &random(6 * 32 * 1024));
}

fn backup_create(agent: &Agent, args: &[&str]) -> Value {
    let mut full = vec!["backup-create"];
    full.extend_from_slice(args);
    let (b, progress) = agent.ctl_with_stderr(&full);
    assert_eq!(b["status"], "available", "{b}");
    // Not a terminal: plain progress lines, the last one at 100%.
    let last = progress.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("backup ") && last.contains("100% [####################] 64MiB of 64MiB"),
        "{progress}"
    );
    b
}

/// Full backup, incremental after 1% changed, source deleted, both restored onto new
/// volumes and compared byte for byte; the rules around them (delete with dependents,
/// idempotent retries, records) on the way.
fn full_cycle(agent: &Agent, repo: &str) {
    agent.create_volume("src");
    fill(agent, "src");
    let before = agent.bytes("src");

    let full = backup_create(agent, &["src", "--id", "full", "--repository", repo]);
    assert_eq!(full["repository"], repo);
    assert_eq!(full["stored_chunks"], 65, "{full}");
    assert_eq!(full["data_bytes"], 65 * CHUNK, "{full}");
    assert_eq!(full["hole_bytes"], SIZE - 65 * CHUNK, "{full}");
    assert!(
        full["stored_bytes"].as_u64().unwrap() < 9 * MIB,
        "text compressed, random stored as is: {full}"
    );
    // A retry returns the same backup; the same id for another volume is refused.
    let again = agent.ctl(&["backup-create", "src", "--id", "full", "--repository", repo]);
    assert_eq!(again["created_at"], full["created_at"]);
    agent.create_volume("other");
    let err = agent.ctl_fails(&[
        "backup-create",
        "other",
        "--id",
        "full",
        "--repository",
        repo,
    ]);
    assert!(err.contains("AlreadyExists"), "{err}");

    change_one_percent(agent, "src");
    let after = agent.bytes("src");
    let inc = backup_create(
        agent,
        &["src", "--id", "inc", "--incremental", "--repository", repo],
    );
    assert_eq!(inc["parent"], "full");
    // 3 of 256 chunks (1.2%) hold the changed 1% of blocks; 63 unchanged data chunks are
    // the parent's.
    assert_eq!(inc["stored_chunks"], 3, "{inc}");
    assert_eq!(inc["reused_chunks"], 63, "{inc}");
    assert!(inc["stored_bytes"].as_u64().unwrap() < MIB, "{inc}");

    let shown = agent.ctl(&["backup-show", "full"]);
    assert_eq!(shown["dependents"], serde_json::json!(["inc"]));
    let err = agent.ctl_fails(&["backup-delete", "full"]);
    assert!(
        err.contains("FailedPrecondition") && err.contains("inc"),
        "{err}"
    );
    let listed = agent.ctl(&["backups", "--volume", "src"]);
    let ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["full", "inc"], "{listed}");

    // The backups outlive their volume.
    agent.ctl(&["delete", "src"]);
    for (backup, target, want) in [("full", "r-full", &before), ("inc", "r-inc", &after)] {
        agent.create_volume(target);
        let (r, progress) = agent.ctl_with_stderr(&["backup-restore", backup, "--volume", target]);
        assert_eq!(r["restored"], backup);
        assert!(
            progress.lines().last().unwrap_or_default().contains("100%"),
            "{progress}"
        );
        assert!(
            agent.bytes(target) == *want,
            "{target} differs from {backup}'s volume"
        );
        assert_eq!(agent.status(target), "available");
    }

    // Records: export, forget the backup in the repository, import it back.
    let rec = agent.ctl(&["backup-export", "inc"]);
    assert_eq!(rec["repository"], repo);
    let record = rec["record"].as_str().unwrap().to_owned();
    let err = agent.ctl_fails(&["backup-import", "bm90IGEgcmVjb3Jk"]);
    assert!(err.contains("InvalidArgument"), "{err}");
    agent.ctl(&["backup-delete", "inc"]);
    let err = agent.ctl_fails(&["backup-show", "inc"]);
    assert!(err.contains("NotFound"), "{err}");
    // The objects are gone with the backup: the record alone is not enough.
    let err = agent.ctl_fails(&["backup-import", &record]);
    assert!(err.contains("DataLoss") && err.contains("inc/"), "{err}");
    agent.ctl(&["backup-delete", "full"]);
    assert_eq!(agent.ctl(&["backups"]), serde_json::json!([]));
}

#[test]
fn posix_repository_full_incremental_restore() {
    let agent = start_agent(None, None, "local");
    full_cycle(&agent, "local");
    // Two backups and two restores of the 64 MiB volume, in the agent's metrics.
    let m = common::scrape_metrics(agent.metrics);
    let get = |k: &str| {
        m.get(k)
            .copied()
            .unwrap_or_else(|| panic!("no {k} in {m:?}"))
    };
    let size = SIZE as f64;
    for (op, n) in [("backup", 2.0), ("restore", 2.0)] {
        let key =
            format!("cinderblock_agent_backup_duration_seconds_count{{op=\"{op}\",result=\"ok\"}}");
        assert_eq!(get(&key), n, "{key}");
        let key =
            format!("cinderblock_agent_backup_last_throughput_bytes_per_second{{op=\"{op}\"}}");
        assert!(get(&key) > 0.0, "{key}");
    }
    // Every byte of both volumes either read or shown unallocated by the file (SEEK_DATA).
    let unallocated = get("cinderblock_agent_backup_bytes_total{kind=\"backup_unallocated\"}");
    assert!(unallocated > 0.0, "the volume's holes were read");
    assert_eq!(
        get("cinderblock_agent_backup_bytes_total{kind=\"backup_read\"}") + unallocated,
        2.0 * size
    );
    assert_eq!(
        get("cinderblock_agent_backup_bytes_total{kind=\"restore_written\"}"),
        2.0 * size
    );
    let stored = get("cinderblock_agent_backup_bytes_total{kind=\"backup_stored\"}");
    assert!(stored > 0.0 && stored < 10.0 * MIB as f64, "{stored}");
    // Deleting a backup removes its container.
    assert_eq!(std::fs::read_dir(&agent.repo).unwrap().count(), 0);
}

#[test]
fn s3_repository_full_incremental_restore() {
    let s3 = S3Server::start("backups");
    let agent = start_agent(None, Some(&s3), "s3");
    let repos = agent.ctl(&["backup-repositories"]);
    assert_eq!(repos[1]["name"], "s3");
    assert_eq!(repos[1]["default"], true);
    full_cycle(&agent, "s3");
    // The bucket is empty again.
    let listing = s3.http("GET", "/backups?list-type=2");
    assert!(listing.contains("<KeyCount>0</KeyCount>"), "{listing}");
}

#[test]
fn record_import_registers_a_backup_whose_metadata_was_lost() {
    let agent = start_agent(None, None, "local");
    agent.create_volume("v");
    fill(&agent, "v");
    backup_create(&agent, &["v", "--id", "b"]);
    let record = agent.ctl(&["backup-export", "b"])["record"]
        .as_str()
        .unwrap()
        .to_owned();
    std::fs::remove_file(agent.repo.join("b/metadata")).unwrap();
    let shown = agent.ctl(&["backup-show", "b"]);
    assert_eq!(shown["status"], "error", "no metadata: unfinished: {shown}");
    let imported = agent.ctl(&["backup-import", &record]);
    assert_eq!(imported["status"], "available");
    assert_eq!(imported["stored_chunks"], 65);
    // The same record again is fine.
    assert_eq!(agent.ctl(&["backup-import", &record])["id"], "b");
    agent.create_volume("r");
    agent.ctl(&["backup-restore", "b", "--volume", "r"]);
    assert!(agent.bytes("r") == agent.bytes("v"));
}

#[test]
fn a_corrupt_chunk_fails_the_restore_and_leaves_the_target_in_error() {
    let agent = start_agent(None, None, "local");
    agent.create_volume("v");
    fill(&agent, "v");
    backup_create(&agent, &["v", "--id", "b"]);
    // Chunk 40 holds text (compressed): flip one byte of its object.
    let object = agent.repo.join("b/chunk-00000040");
    let mut stored = std::fs::read(&object).unwrap();
    let mid = stored.len() / 2;
    stored[mid] ^= 0x01;
    std::fs::write(&object, &stored).unwrap();

    agent.create_volume("target");
    let err = agent.ctl_fails(&["backup-restore", "b", "--volume", "target"]);
    assert!(
        err.contains("DataLoss") && err.contains("b/chunk-00000040"),
        "{err}"
    );
    assert_eq!(agent.status("target"), "error");
    let vols = agent.ctl(&["volumes"]);
    assert!(vols.to_string().contains("target"), "{vols}");
    // The backup is untouched: still available, the damaged object as it was.
    assert_eq!(agent.ctl(&["backup-show", "b"])["status"], "available");
    assert_eq!(std::fs::read(&object).unwrap(), stored);
    // A volume in error can be deleted.
    agent.ctl(&["delete", "target"]);
}

/// A real full file system: an 8 MiB tmpfs as the repository.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
                .arg(dir),
        );
        Tmpfs(dir.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A real XFS file system (reflinks on) on a loop device over a sparse 1 GiB file.
struct Xfs {
    mount: PathBuf,
    image: PathBuf,
}

impl Xfs {
    fn mount(dir: &Path) -> Xfs {
        require_tool("mkfs.xfs", "xfsprogs");
        let (mount, image) = (dir.join("xfs"), dir.join("xfs.img"));
        std::fs::create_dir_all(&mount).unwrap();
        std::fs::File::create(&image)
            .unwrap()
            .set_len(1 << 30)
            .unwrap();
        run_ok(
            Command::new("mkfs.xfs")
                .args(["-q", "-m", "reflink=1"])
                .arg(&image),
        );
        run_ok(
            Command::new("mount")
                .args(["-o", "loop"])
                .arg(&image)
                .arg(&mount),
        );
        Xfs { mount, image }
    }
}

impl Drop for Xfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mount).status();
        let _ = std::fs::remove_file(&self.image);
    }
}

/// Files of the pool's snapshots (marker snapshots included), by name.
fn snapshot_files(pool: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(pool)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("snapshot-") && n.ends_with(".img"))
        .collect();
    v.sort();
    v
}

#[test]
fn change_tracking_on_xfs_reads_only_the_changed_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let xfs = Xfs::mount(dir.path());
    let pool = xfs.mount.join("pool");
    let agent = start_agent_on(Some(&pool), None, None, "local");
    let unread = || {
        common::scrape_metrics(agent.metrics)
            .get("cinderblock_agent_backup_bytes_total{kind=\"backup_unread\"}")
            .copied()
            .unwrap()
    };
    agent.create_volume("src");
    fill(&agent, "src");
    let before = agent.bytes("src");

    // The full backup leaves its snapshot behind as the volume's marker, hidden from lists
    // and from Cinder's rule against deleting a volume with snapshots.
    backup_create(&agent, &["src", "--id", "full"]);
    assert_eq!(unread(), 0.0);
    assert_eq!(snapshot_files(&pool), ["snapshot-backup-full.img"]);
    assert_eq!(agent.ctl(&["snapshots"]), serde_json::json!([]));

    // Space, counted by block: the marker shares all of the volume's.
    let space = || {
        let pools = agent.ctl(&["pools"]);
        let metrics = common::scrape_metrics(agent.metrics);
        let tracking = format!(
            "cinderblock_agent_pool_tracking_bytes{{pool=\"{}\"}}",
            SPEC.name
        );
        (
            pools[0]["allocated_bytes"].as_u64().unwrap(),
            metrics[&tracking] as u64,
        )
    };
    let (written, none) = space();
    assert_eq!(none, 0);
    assert!(
        (24 * MIB..=25 * MIB).contains(&written),
        "allocated {written}"
    );

    // 1% changed in three chunks: those are read, the other 253 are taken from the parent
    // unread (the file system may count a neighbour of a rewritten range as moved, never
    // fewer than the three).
    change_one_percent(&agent, "src");
    let after = agent.bytes("src");
    // The rewritten blocks moved: the marker alone holds the old ones, and the pool counts
    // them (14 blocks of 32 KiB, or a little more with neighbours; the third run, 6 blocks,
    // filled a hole of both). A user snapshot shares everything with the volume and adds
    // nothing.
    let filled = 6 * 32 * 1024;
    let (grown, held) = space();
    assert!((448 << 10..=4 * MIB).contains(&held), "marker holds {held}");
    assert_eq!(grown, written + filled + held);
    agent.ctl(&["snapshot", "src", "--id", "s1"]);
    assert_eq!(space(), (grown, held));
    agent.ctl(&["delete-snapshot", "s1"]);
    let inc = backup_create(&agent, &["src", "--id", "inc", "--incremental"]);
    // The new marker shares every block again, and the old one is gone with what it held.
    assert_eq!(space(), (written + filled, 0));
    assert_eq!(inc["stored_chunks"], 3, "{inc}");
    let skipped = unread() as u64;
    assert!(
        (SIZE - 8 * CHUNK..=SIZE - 3 * CHUNK).contains(&skipped),
        "unread {skipped} of {SIZE}\n{}",
        agent.proc.log_text()
    );
    assert_eq!(snapshot_files(&pool), ["snapshot-backup-inc.img"]);

    // Nothing changed: nothing read, nothing stored. (Made within the same second as the
    // two before, often: the parent is still the latest of the chain, `inc`.)
    let same = backup_create(&agent, &["src", "--id", "same", "--incremental"]);
    assert_eq!(same["parent"], "inc", "{same}");
    assert_eq!(same["stored_chunks"], 0, "{same}");
    assert_eq!(unread() as u64, skipped + SIZE);

    // Deleting the backup deletes its marker; the next incremental (on `inc`, now the
    // latest) has none to compare with and reads everything, and leaves its own.
    agent.ctl(&["backup-delete", "same"]);
    assert_eq!(snapshot_files(&pool), Vec::<String>::new());
    let again = backup_create(&agent, &["src", "--id", "again", "--incremental"]);
    assert_eq!(again["parent"], "inc", "{again}");
    assert_eq!(again["stored_chunks"], 0, "{again}");
    assert_eq!(unread() as u64, skipped + SIZE);
    assert_eq!(snapshot_files(&pool), ["snapshot-backup-again.img"]);

    // The volume deletes with its marker; every backup restores its bytes.
    agent.ctl(&["delete", "src"]);
    assert_eq!(snapshot_files(&pool), Vec::<String>::new());
    for (backup, want) in [("full", &before), ("inc", &after), ("again", &after)] {
        let target = format!("r-{backup}");
        agent.create_volume(&target);
        agent.ctl(&["backup-restore", backup, "--volume", &target]);
        assert!(agent.bytes(&target) == *want, "{target} differs");
    }
}

#[test]
fn a_full_repository_ends_the_backup_in_error_and_keeps_the_source() {
    require_tool("mount", "mount");
    let dir = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(&dir.path().join("repo"));
    let agent = start_agent(Some(&fs.0), None, "local");
    agent.create_volume("v");
    // 24 MiB of random data: incompressible, three times what the repository holds.
    agent.write("v", 0, &random(24 * MIB as usize));
    let before = agent.bytes("v");
    let err = agent.ctl_fails(&["backup-create", "v", "--id", "b"]);
    assert!(
        err.contains("ResourceExhausted") && err.contains("no space left"),
        "{err}"
    );
    let shown = agent.ctl(&["backup-show", "b"]);
    assert_eq!(shown["status"], "error", "{shown}");
    assert!(
        shown["fail_reason"]
            .as_str()
            .unwrap()
            .contains("no space left"),
        "{shown}"
    );
    let listed = agent.ctl(&["backups"]);
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["status"] != "available"),
        "{listed}"
    );
    // Nothing complete in the repository, and the failed backup's objects are gone.
    assert!(!fs.0.join("b/metadata").exists());
    assert_eq!(
        std::fs::read_dir(fs.0.join("b")).map_or(0, |d| d.count()),
        0
    );
    assert_eq!(agent.status("v"), "available");
    assert!(agent.bytes("v") == before);
    // Deleting the failed backup forgets it.
    agent.ctl(&["backup-delete", "b"]);
    let err = agent.ctl_fails(&["backup-show", "b"]);
    assert!(err.contains("NotFound"), "{err}");
}

#[test]
fn an_exported_volume_needs_force_and_is_read_through_a_temporary_snapshot() {
    let agent = start_agent(None, None, "local");
    agent.create_volume("v");
    fill(&agent, "v");
    agent.ctl(&[
        "export",
        "v",
        "--initiator",
        "iqn.2025-01.io.cinderblock.test:backup-a",
    ]);
    assert_eq!(agent.status("v"), "in-use");
    let err = agent.ctl_fails(&["backup-create", "v", "--id", "b"]);
    assert!(
        err.contains("FailedPrecondition") && err.contains("force"),
        "{err}"
    );
    let b = backup_create(&agent, &["v", "--id", "b", "--force"]);
    assert_eq!(b["stored_chunks"], 65);
    assert_eq!(
        agent.ctl(&["snapshots"]),
        serde_json::json!([]),
        "temporary snapshot removed"
    );
    assert_eq!(agent.status("v"), "in-use");
    agent.ctl(&["unexport", "v"]);
    agent.create_volume("r");
    agent.ctl(&["backup-restore", "b", "--volume", "r"]);
    assert!(agent.bytes("r") == agent.bytes("v"));
}

// ---- in process: what a running backup or restore looks like ---------------------------------

mod running {
    use std::collections::BTreeMap;
    use std::os::unix::fs::FileExt;
    use std::sync::Arc;
    use std::time::Duration;

    use cinderblock::agent::chap::ChapKey;
    use cinderblock::agent::service::{
        AgentService, BackupStatus, CreateBackup, CreateVolume, Running, VolumeState,
    };
    use cinderblock::agent::{AgentError, BackupId, VolumeId};
    use cinderblock::backup::repo::{PosixRepository, RepoError, Repository};
    use cinderblock::config::AgentConfig;
    use cinderblock::exec::Runner;
    use cinderblock::types::Bytes;

    /// A repository whose reads and writes each take `delay`, so that a backup or restore
    /// lasts long enough to be seen running.
    #[derive(Debug)]
    struct Slow {
        inner: PosixRepository,
        delay: Duration,
    }

    #[async_trait::async_trait]
    impl Repository for Slow {
        fn name(&self) -> &str {
            self.inner.name()
        }
        fn location(&self) -> String {
            self.inner.location()
        }
        async fn put(&self, key: &str, data: Vec<u8>) -> Result<(), RepoError> {
            tokio::time::sleep(self.delay).await;
            self.inner.put(key, data).await
        }
        async fn put_commit(&self, key: &str, data: Vec<u8>) -> Result<(), RepoError> {
            self.inner.put_commit(key, data).await
        }
        async fn get(&self, key: &str) -> Result<Vec<u8>, RepoError> {
            tokio::time::sleep(self.delay).await;
            self.inner.get(key).await
        }
        async fn delete(&self, key: &str) -> Result<(), RepoError> {
            self.inner.delete(key).await
        }
        async fn list(&self, container: &str) -> Result<Vec<String>, RepoError> {
            self.inner.list(container).await
        }
        async fn containers(&self) -> Result<Vec<String>, RepoError> {
            self.inner.containers().await
        }
        async fn remove_container(&self, container: &str) -> Result<(), RepoError> {
            self.inner.remove_container(container).await
        }
    }

    fn agent(dir: &std::path::Path) -> Arc<AgentService> {
        std::fs::create_dir_all(dir.join("pool")).unwrap();
        let cfg: AgentConfig = toml::from_str(&format!(
            r#"name = "a"
[backup]
chunk_size = 262144
max_in_flight = 2
[[pools]]
name = "p"
kind = "file"
path = "{pool}"
[[backup_repositories]]
name = "local"
kind = "posix"
path = "{repo}"
"#,
            pool = dir.join("pool").display(),
            repo = dir.join("repo").display()
        ))
        .unwrap();
        cfg.validate("").unwrap();
        let mut a = AgentService::new(&cfg, Runner::default(), ChapKey::random()).unwrap();
        a.replace_backup_repository(Arc::new(Slow {
            inner: PosixRepository::new("local", dir.join("repo")),
            delay: Duration::from_millis(40),
        }));
        Arc::new(a)
    }

    async fn volume(a: &AgentService, dir: &std::path::Path, id: &str) -> VolumeId {
        let id = VolumeId::parse(id).unwrap();
        a.create_volume(CreateVolume {
            id: id.clone(),
            pool: "p".into(),
            size: Bytes::mib(16),
            volume_type: "default".into(),
            metadata: BTreeMap::from([("app".to_string(), "db".to_string())]),
            source: None,
        })
        .await
        .unwrap();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join(format!("pool/volume-{id}.img")))
            .unwrap();
        f.write_all_at(&super::random(4 << 20), 0).unwrap();
        id
    }

    async fn wait(mut r: Running) -> Result<BackupStatus, Arc<AgentError>> {
        loop {
            if let Some(o) = r.outcome.borrow_and_update().clone() {
                return o.map(|b| b.status);
            }
            r.outcome.changed().await.unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_running_backup_shows_backing_up_and_refuses_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let a = agent(dir.path());
        let v = volume(&a, dir.path(), "v").await;
        let b = BackupId::parse("b").unwrap();
        let req = CreateBackup {
            id: b.clone(),
            volume: v.clone(),
            repository: None,
            incremental: false,
            force: false,
        };
        let running = a.create_backup(req.clone()).await.unwrap();
        assert_eq!(
            a.volume_state(&a.get_volume(&v).unwrap()),
            VolumeState::BackingUp
        );
        let err = a.delete_volume(&v).await.unwrap_err();
        assert!(matches!(err, AgentError::Busy(_)), "{err:?}");
        let shown = a.get_backup(&b).await.unwrap();
        assert_eq!(shown.status, BackupStatus::Creating);
        assert!(shown.bytes_done < shown.bytes_total, "{shown:?}");
        let err = a.delete_backup(&b).await.unwrap_err();
        assert!(matches!(err, AgentError::Busy(_)), "{err:?}");
        // A retry follows the same backup.
        let again = a.create_backup(req).await.unwrap();
        assert_eq!(wait(running).await.unwrap(), BackupStatus::Available);
        assert_eq!(wait(again).await.unwrap(), BackupStatus::Available);
        assert_eq!(
            a.volume_state(&a.get_volume(&v).unwrap()),
            VolumeState::Available
        );

        // A restore: the target shows restoring, the backup cannot be deleted meanwhile.
        let r = VolumeId::parse("r").unwrap();
        a.create_volume(CreateVolume {
            id: r.clone(),
            pool: "p".into(),
            size: Bytes::mib(16),
            volume_type: "default".into(),
            metadata: BTreeMap::new(),
            source: None,
        })
        .await
        .unwrap();
        let restoring = a.restore_backup(&b, &r).await.unwrap();
        assert_eq!(
            a.volume_state(&a.get_volume(&r).unwrap()),
            VolumeState::Restoring
        );
        assert_eq!(
            a.get_backup(&b).await.unwrap().status,
            BackupStatus::Restoring
        );
        let err = a.delete_backup(&b).await.unwrap_err();
        assert!(matches!(err, AgentError::Busy(_)), "{err:?}");
        let err = a.delete_volume(&r).await.unwrap_err();
        assert!(matches!(err, AgentError::Busy(_)), "{err:?}");
        wait(restoring).await.unwrap();
        let restored = a.get_volume(&r).unwrap();
        assert_eq!(a.volume_state(&restored), VolumeState::Available);
        assert_eq!(restored.metadata.get("app").map(String::as_str), Some("db"));
        assert_eq!(
            std::fs::read(dir.path().join("pool/volume-r.img")).unwrap(),
            std::fs::read(dir.path().join("pool/volume-v.img")).unwrap()
        );
        a.delete_backup(&b).await.unwrap();
        a.delete_volume(&v).await.unwrap();
    }
}
