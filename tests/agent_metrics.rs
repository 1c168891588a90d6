//! Reconciliation and its metrics with real processes: the real `cinderblock agent` (file
//! pool, its own private real tgtd, reconciling every second, metrics on 127.0.0.1) driven
//! with the real `agent-ctl`; drift made behind the agent's back with tgtadm; a tgtd killed
//! and started again; exports checked from the initiator side with qemu's iSCSI driver and
//! libiscsi's `iscsi-inq` (from `tests/e2e/host-deps.sh test`). `GET /metrics` is scraped
//! with a plain TCP client.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod common;
#[path = "common/stack.rs"]
mod stack;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use cinderblock::agent::ids::TARGET_IQN_PREFIX;
use common::tgtd::{free_tcp_port, Tgtd};
use common::{qemu_tool, require_tool, run};
use stack::{AgentSpec, Proc, BIN};

const INITIATOR: &str = "iqn.2025-01.io.cinderblock.test:metrics-a";

const SPEC: AgentSpec = AgentSpec {
    name: "m1",
    zone: "z1",
    capacity_gib: 1,
    capabilities: "",
};

struct Agent {
    socket: PathBuf,
    metrics: u16,
    proc: Proc,
    dir: tempfile::TempDir,
}

/// The agent on a Unix socket, with metrics and a 1-second reconciliation, using `tgtd`.
fn start_agent(tgtd: &Tgtd) -> Agent {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    let socket = dir.path().join("agent.sock");
    let metrics = free_tcp_port();
    let root = format!("metrics_listen = \"127.0.0.1:{metrics}\"\nreconcile_interval_secs = 1");
    let listen = format!("unix://{}", socket.display());
    let toml = stack::agent_config(&SPEC, &listen, tgtd, &pool, &root, "");
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, toml).unwrap();
    let proc = Proc::spawn_until(
        &["agent", "--config", config.to_str().unwrap()],
        dir.path().join("agent.log"),
        "agent socket and metrics",
        || socket.exists() && stack::listening(metrics),
    );
    Agent {
        socket,
        metrics,
        proc,
        dir,
    }
}

impl Agent {
    /// `agent-ctl -o json ARGS`; panics unless it succeeds.
    fn ctl(&self, args: &[&str]) -> serde_json::Value {
        let out = self.ctl_raw(args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "agent-ctl {args:?}: {}\n--- agent\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.proc.log_text()
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn ctl_raw(&self, args: &[&str]) -> Output {
        let agent = format!("unix://{}", self.socket.display());
        run(Command::new(BIN)
            .args(["agent-ctl", "--agent", &agent, "-o", "json"])
            .args(args)
            .env_remove("RUST_LOG")
            .env("CINDERBLOCK_LOG_LEVEL", "warn")
            .stdin(Stdio::null()))
    }

    /// Creates and exports volume `id` to [`INITIATOR`]: (target IQN, CHAP user, secret).
    fn exported(&self, id: &str) -> (String, String, String) {
        self.ctl(&["create", id, "--pool", SPEC.name, "--size", "64Mi"]);
        let secret_file = self.dir.path().join(format!("{id}.secret"));
        let e = self.ctl(&[
            "export",
            id,
            "--initiator",
            INITIATOR,
            "--secret-file",
            secret_file.to_str().unwrap(),
        ]);
        (
            e["target_iqn"].as_str().unwrap().to_owned(),
            e["chap_username"].as_str().unwrap().to_owned(),
            std::fs::read_to_string(secret_file).unwrap(),
        )
    }

    /// Every sample of `GET /metrics`, by `name{labels}`.
    fn scrape(&self) -> BTreeMap<String, u64> {
        common::scrape_metrics(self.metrics)
            .into_iter()
            .map(|(k, v)| (k, v as u64))
            .collect()
    }

    /// One sample (0 when absent).
    fn metric(&self, key: &str) -> u64 {
        self.scrape().get(key).copied().unwrap_or(0)
    }

    /// Waits (20 s at most) until `check` holds, scraping and asking tgtd each time.
    fn wait(&self, what: &str, check: impl Fn(&BTreeMap<String, u64>) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let m = self.scrape();
            if check(&m) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: never happened; metrics {m:#?}\n--- agent\n{}",
                self.proc.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn drift(kind: &str) -> String {
    format!("cinderblock_agent_export_drift_total{{kind=\"{kind}\"}}")
}

fn gauge(name: &str) -> String {
    format!("cinderblock_agent_pool_{name}{{pool=\"{}\"}}", SPEC.name)
}

fn rpc(name: &str, code: &str) -> String {
    format!("cinderblock_agent_rpc_total{{rpc=\"{name}\",code=\"{code}\"}}")
}

/// tgtd's target id of `iqn`, if it has that target.
fn tid_of(tgtd: &Tgtd, iqn: &str) -> Option<u32> {
    let show = tgtd.tgtadm_ok(&["--op", "show", "--mode", "target"]);
    show.lines().find_map(|l| {
        let rest = l.strip_prefix("Target ")?;
        let (tid, name) = rest.split_once(": ")?;
        (name == iqn).then(|| tid.parse().ok()).flatten()
    })
}

/// The ACL (initiator names) of target `tid`.
fn acl_of(tgtd: &Tgtd, tid: u32) -> Vec<String> {
    let show = tgtd.tgtadm_ok(&["--op", "show", "--mode", "target"]);
    let mut in_target = false;
    let mut in_acl = false;
    let mut out = Vec::new();
    for l in show.lines() {
        if let Some(rest) = l.strip_prefix("Target ") {
            in_target = rest.split(':').next() == Some(&tid.to_string());
            in_acl = false;
        } else if in_target && l.trim() == "ACL information:" {
            in_acl = true;
        } else if in_target && in_acl {
            out.push(l.trim().to_owned());
        }
    }
    out
}

#[test]
fn drift_made_behind_the_agents_back_is_corrected_and_counted() {
    let tgtd = stack::start_tgtd();
    let agent = start_agent(&tgtd);
    let (iqn, _, _) = agent.exported("vol-drift");
    let tid = tid_of(&tgtd, &iqn).expect("exported target");
    agent.ctl(&["snapshot", "vol-drift", "--id", "snap-drift"]);

    // Created: the target deleted with tgtadm comes back.
    tgtd.tgtadm_ok(&[
        "--op",
        "delete",
        "--force",
        "--mode",
        "target",
        "--tid",
        &tid.to_string(),
    ]);
    agent.wait("missing target re-created", |m| {
        m.get(&drift("created")).copied().unwrap_or(0) >= 1
    });
    let tid = tid_of(&tgtd, &iqn).expect("target is back");
    assert_eq!(acl_of(&tgtd, tid), vec![INITIATOR.to_owned()]);

    // Repaired: the initiator unbound with tgtadm is bound again.
    tgtd.tgtadm_ok(&[
        "--op",
        "unbind",
        "--mode",
        "target",
        "--tid",
        &tid.to_string(),
        "--initiator-name",
        INITIATOR,
    ]);
    agent.wait("ACL repaired", |m| {
        m.get(&drift("repaired")).copied().unwrap_or(0) >= 1
    });
    assert_eq!(acl_of(&tgtd, tid), vec![INITIATOR.to_owned()]);

    // Removed: a target of ours without a volume goes away.
    let orphan = format!("{TARGET_IQN_PREFIX}volume-orphan");
    tgtd.tgtadm_ok(&[
        "--op", "new", "--mode", "target", "--tid", "4000", "-T", &orphan,
    ]);
    agent.wait("orphan removed", |m| {
        m.get(&drift("removed")).copied().unwrap_or(0) >= 1
    });
    assert_eq!(tid_of(&tgtd, &orphan), None);

    let m = agent.scrape();
    let get = |k: &str| m.get(k).copied();
    assert_eq!(
        (
            get(&drift("created")),
            get(&drift("repaired")),
            get(&drift("removed")),
            get(&drift("failed")),
            get("cinderblock_agent_tgtd_restarts_total"),
            get("cinderblock_agent_reconcile_errors_total"),
        ),
        (Some(1), Some(1), Some(1), Some(0), Some(0), Some(0)),
        "one of each, nothing failed, tgtd never restarted"
    );
    assert!(get("cinderblock_agent_reconcile_runs_total").unwrap() >= 4);

    // Pool gauges match what agent-ctl reports.
    let pools = agent.ctl(&["pools"]);
    let p = &pools[0];
    let m = agent.scrape();
    let get = |k: &str| m.get(&gauge(k)).copied();
    let num = |k: &str| p[k].as_u64();
    assert_eq!(
        (
            get("total_bytes"),
            get("free_bytes"),
            get("provisioned_bytes"),
            get("allocated_bytes"),
            get("volumes"),
            get("snapshots"),
            get("healthy"),
        ),
        (
            num("total_bytes"),
            num("free_bytes"),
            num("provisioned_bytes"),
            num("allocated_bytes"),
            num("volumes"),
            num("snapshots"),
            Some(1),
        )
    );
    assert_eq!(
        (get("total_bytes"), get("volumes"), get("snapshots")),
        (Some(SPEC.capacity_gib << 30), Some(1), Some(1))
    );

    // Calls by method and code, errors included.
    let out = agent.ctl_raw(&["delete", "vol-drift"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "an exported volume is not deleted"
    );
    let m = agent.scrape();
    let get = |k: &str| m.get(k).copied();
    assert_eq!(
        (
            get(&rpc("CreateVolume", "OK")),
            get(&rpc("ExportVolume", "OK")),
            get(&rpc("CreateSnapshot", "OK")),
            get(&rpc("DeleteVolume", "FailedPrecondition")),
            get(&rpc("ListPools", "OK")),
        ),
        (Some(1), Some(1), Some(1), Some(1), Some(1))
    );
}

/// qemu-io on LUN 1 of `iqn` at `portal`, logging in as [`INITIATOR`] with CHAP.
fn qemu_io(portal: &str, iqn: &str, user: &str, secret: &str, cmds: &[&str]) -> Output {
    let mut cmd = qemu_tool("qemu-io");
    cmd.arg("--object")
        .arg(format!("secret,id=s0,data={secret}"))
        .arg("--image-opts")
        .arg(format!(
            "driver=iscsi,transport=tcp,portal={portal},target={iqn},lun=1,\
             initiator-name={INITIATOR},user={user},password-secret=s0"
        ));
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    run(&mut cmd)
}

fn assert_ran(out: &Output, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(0),
        "{what}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_restarted_tgtd_gets_every_export_back_and_the_data_reads_with_chap() {
    require_tool("iscsi-inq", "libiscsi-bin");
    let mut tgtd = stack::start_tgtd();
    let agent = start_agent(&tgtd);
    let (ctl, port, portal) = (tgtd.ctl(), tgtd.port(), tgtd.portal());
    let vols: Vec<(String, String, String)> = ["vol-r1", "vol-r2", "vol-r3"]
        .iter()
        .map(|id| agent.exported(id))
        .collect();
    for (i, (iqn, user, secret)) in vols.iter().enumerate() {
        let pattern = format!("write -P 0x{:x} 1M 1M", 0x51 + i);
        assert_ran(
            &qemu_io(&portal, iqn, user, secret, &[&pattern]),
            "write before the restart",
        );
    }
    let created_before = agent.metric(&drift("created"));

    // A crash: tgtd dies without cleaning up. Reconciliation fails while it is gone...
    tgtd.kill();
    agent.wait("a failed pass while tgtd is down", |m| {
        m.get("cinderblock_agent_reconcile_errors_total")
            .copied()
            .unwrap_or(0)
            >= 1
    });
    // ...and a new tgtd on the same control port and portal knows no target at all.
    let tgtd = Tgtd::start_on(ctl, port);
    let deadline = Instant::now() + Duration::from_secs(20);
    while vols.iter().any(|(iqn, _, _)| tid_of(&tgtd, iqn).is_none()) {
        assert!(
            Instant::now() < deadline,
            "exports not restored:\n{}\n--- agent\n{}",
            tgtd.tgtadm_ok(&["--op", "show", "--mode", "target"]),
            agent.proc.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    agent.wait("restart counted", |m| {
        m.get("cinderblock_agent_tgtd_restarts_total").copied() == Some(1)
            && m.get(&drift("created")).copied().unwrap_or(0) >= created_before + 3
    });

    // The bytes written before the crash read back over iSCSI with each volume's CHAP
    // credentials; without CHAP the login is refused.
    for (i, (iqn, user, secret)) in vols.iter().enumerate() {
        let pattern = format!("read -P 0x{:x} 1M 1M", 0x51 + i);
        assert_ran(
            &qemu_io(&portal, iqn, user, secret, &[&pattern]),
            "read after the restart",
        );
        let no_chap = run(Command::new("iscsi-inq")
            .args(["-i", INITIATOR])
            .arg(format!("iscsi://{portal}/{iqn}/1")));
        assert_ne!(no_chap.status.code(), Some(0), "login without CHAP");
        assert!(
            String::from_utf8_lossy(&no_chap.stderr).contains("Authentication failure"),
            "{}",
            String::from_utf8_lossy(&no_chap.stderr)
        );
    }
    // Back to steady state: nothing more to correct, tgtd counted once.
    let runs = agent.metric("cinderblock_agent_reconcile_runs_total");
    agent.wait("two more passes", |m| {
        m.get("cinderblock_agent_reconcile_runs_total")
            .copied()
            .unwrap_or(0)
            >= runs + 2
    });
    let m = agent.scrape();
    assert_eq!(
        (
            m.get("cinderblock_agent_tgtd_restarts_total").copied(),
            m.get(&drift("failed")).copied(),
            m.get(&drift("created")).copied(),
        ),
        (Some(1), Some(0), Some(created_before + 3))
    );
    drop(agent);
    drop(tgtd);
}

#[test]
fn metrics_listen_on_a_taken_port_stops_the_agent() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("a.sock");
    let out = run(Command::new(BIN)
        .args(["agent", "--name", "m2", "--listen"])
        .arg(format!("unix://{}", sock.display()))
        .arg("--metrics-listen")
        .arg(format!("127.0.0.1:{port}"))
        .env_remove("RUST_LOG")
        .stdin(Stdio::null()));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "cinderblock: error: cannot listen for metrics on 127.0.0.1:{port}: "
        )),
        "{err}"
    );
    assert!(!Path::new(&sock).exists());
}
