//! `agent::export::Exports` against a real, private tgtd per test (own control port, own
//! portal on 127.0.0.1, so tests run in parallel), checked from the initiator side with real
//! userspace iSCSI initiators: libiscsi-bin's `iscsi-*` tools and qemu's iSCSI block driver
//! (qemu 7.2 unpacked by `tests/e2e/host-deps.sh test`). A missing tool fails the test with
//! the package to install.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod common;

use std::fs;
use std::hash::{BuildHasher, RandomState};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use cinderblock::agent::chap::ChapKey;
use cinderblock::agent::export::{DesiredExport, Drift, ExportInfo, Exports, TargetState};
use cinderblock::agent::ids::{target_iqn, TARGET_IQN_PREFIX};
use cinderblock::agent::{AgentError, Iqn, VolumeId};
use cinderblock::exec::{ExecError, Runner};
use common::tgtd::free_tcp_port;
use common::{qemu_tool, require_tool, run, run_ok};

const A: &str = "iqn.2025-01.io.cinderblock.test:node-a";
const B: &str = "iqn.2025-01.io.cinderblock.test:node-b";
const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

// ---- a private tgtd ------------------------------------------------------------------------
//
// Local rather than common::tgtd::Tgtd, which (a) picks control ports in 20000..60000 while
// tgtadm/tgtd accept only 0..=32767, so about two starts in three fail and a whole start
// fails about once in twenty, and (b) cannot start a fresh tgtd on a given control port and
// portal, which the restart test needs.

/// A tgtd in the foreground on its own control port and portal; shut down on drop.
struct Daemon {
    child: Child,
    ctl: u16,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start() -> Daemon {
        for attempt in 0..16u32 {
            let h = RandomState::new().hash_one((std::process::id(), attempt, Instant::now()));
            let ctl = 20_000 + (h % 12_000) as u16; // tgtadm's -C stops at 32767
            if tgtadm_raw(ctl, &["--op", "show", "--mode", "sys"])
                .status
                .success()
            {
                continue; // another tgtd owns this control port
            }
            if let Some(d) = Daemon::try_start(ctl, free_tcp_port()) {
                return d;
            }
        }
        panic!("no tgtd started in 16 attempts");
    }

    /// A fresh tgtd on the control port and portal of a dead one.
    fn start_on(ctl: u16, port: u16) -> Daemon {
        for _ in 0..50 {
            if let Some(d) = Daemon::try_start(ctl, port) {
                return d;
            }
            sleep(Duration::from_millis(100));
        }
        panic!("tgtd did not start again on control port {ctl}, portal port {port}");
    }

    fn try_start(ctl: u16, port: u16) -> Option<Daemon> {
        require_tool("tgtd", "tgt");
        require_tool("tgtadm", "tgt");
        let dir = tempfile::tempdir().unwrap();
        let log = fs::File::create(dir.path().join("tgtd.log")).unwrap();
        let child = Command::new("tgtd")
            .args(["-f", "-C", &ctl.to_string(), "--iscsi"])
            .arg(format!("portal=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn tgtd");
        let mut d = Daemon {
            child,
            ctl,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = d.child.try_wait() {
                return None; // control port taken
            }
            let answers = tgtadm_raw(ctl, &["--op", "show", "--mode", "sys"])
                .status
                .success();
            if answers && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(d);
            }
            sleep(Duration::from_millis(50));
        }
        d.kill();
        None
    }

    fn portal(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// tgtd dies without cleaning up (SIGKILL to this very child).
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn tgtadm(&self, args: &[&str]) -> Output {
        let mut full = vec!["--lld", "iscsi"];
        full.extend_from_slice(args);
        tgtadm_raw(self.ctl, &full)
    }

    fn tgtadm_ok(&self, args: &[&str]) -> String {
        let out = self.tgtadm(args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "tgtadm {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn show(&self) -> String {
        self.tgtadm_ok(&["--op", "show", "--mode", "target"])
    }

    fn accounts(&self) -> Vec<String> {
        let out = self.tgtadm_ok(&["--op", "show", "--mode", "account"]);
        out.lines().skip(1).map(|l| l.trim().to_owned()).collect()
    }

    fn tids(&self) -> Vec<u32> {
        self.show()
            .lines()
            .filter_map(|l| l.strip_prefix("Target ")?.split(':').next()?.parse().ok())
            .collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // tgtd ignores SIGTERM and refuses to stop while it has targets.
        for tid in self.tids() {
            let _ = self.tgtadm(&[
                "--op",
                "delete",
                "--force",
                "--mode",
                "target",
                "--tid",
                &tid.to_string(),
            ]);
        }
        let _ = tgtadm_raw(self.ctl, &["--op", "delete", "--mode", "system"]);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            sleep(Duration::from_millis(50));
        }
        self.kill();
    }
}

fn tgtadm_raw(ctl: u16, args: &[&str]) -> Output {
    run(Command::new("tgtadm")
        .arg("-C")
        .arg(ctl.to_string())
        .args(args)
        .env("LC_ALL", "C"))
}

// ---- helpers -------------------------------------------------------------------------------

fn key() -> ChapKey {
    ChapKey::new(b"agent_tgt test master key, 32 b".to_vec()).unwrap()
}

fn exports(d: &Daemon) -> Exports {
    Exports::new(Runner::default(), d.ctl, key())
}

fn vid(s: &str) -> VolumeId {
    VolumeId::parse(s).unwrap()
}

fn iqn(s: &str) -> Iqn {
    Iqn::parse(s).unwrap()
}

fn sparse(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    fs::File::create(&p).unwrap().set_len(size).unwrap();
    p
}

fn read_at(path: &Path, offset: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

/// libiscsi URL of the export's LUN, with `user%secret@` when given.
fn url(d: &Daemon, info: &ExportInfo, chap: Option<(&str, &str)>) -> String {
    let auth = chap.map(|(u, s)| format!("{u}%{s}@")).unwrap_or_default();
    format!(
        "iscsi://{auth}{}/{}/{}",
        d.portal(),
        info.target_iqn,
        info.lun
    )
}

fn good_url(d: &Daemon, info: &ExportInfo) -> String {
    url(d, info, Some((&info.chap.username, &info.chap.secret)))
}

/// `iscsi-inq` (libiscsi-bin) as `initiator`; the whole output.
fn inquiry(initiator: &str, url: &str, extra: &[&str]) -> Output {
    require_tool("iscsi-inq", "libiscsi-bin");
    run(Command::new("iscsi-inq")
        .args(["-i", initiator])
        .args(extra)
        .arg(url))
}

/// qemu-io on the export's LUN as `initiator` with CHAP secret `secret`, running `cmds`.
fn qemu_io(d: &Daemon, info: &ExportInfo, initiator: &str, secret: &str, cmds: &[&str]) -> Output {
    let mut cmd = qemu_tool("qemu-io");
    cmd.args(image_opts(d, info, initiator, secret));
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    run(&mut cmd)
}

fn image_opts(d: &Daemon, info: &ExportInfo, initiator: &str, secret: &str) -> Vec<String> {
    vec![
        "--object".into(),
        format!("secret,id=s0,data={secret}"),
        "--image-opts".into(),
        format!(
            "driver=iscsi,transport=tcp,portal={},target={},lun={},initiator-name={initiator},\
             user={},password-secret=s0",
            d.portal(),
            info.target_iqn,
            info.lun,
            info.chap.username
        ),
    ]
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

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Drift as comparable text: created, repaired, removed, failed volume ids.
fn summary(d: &Drift) -> (Vec<String>, Vec<String>, Vec<String>, Vec<String>) {
    let ids = |v: &[VolumeId]| v.iter().map(ToString::to_string).collect();
    (
        ids(&d.created),
        ids(&d.repaired),
        d.removed.clone(),
        d.failed.iter().map(|(id, _)| id.to_string()).collect(),
    )
}

fn no_drift() -> (Vec<String>, Vec<String>, Vec<String>, Vec<String>) {
    (vec![], vec![], vec![], vec![])
}

// ---- tests ---------------------------------------------------------------------------------

#[tokio::test]
async fn chap_initiator_reads_and_writes_and_everyone_else_is_refused() {
    let d = Daemon::start();
    let dir = tempfile::tempdir().unwrap();
    let backing = sparse(dir.path(), "volume.img", SIZE);
    let e = exports(&d);
    let id = vid("agent-tgt-chap");

    let info = e.export(&id, &backing, &[iqn(A)]).await.unwrap();
    assert_eq!(
        info,
        ExportInfo {
            target_iqn: "iqn.2026-01.dev.cinderblock:volume-agent-tgt-chap".into(),
            lun: 1,
            chap: key().credentials(&id),
        }
    );

    // (1) A with the right CHAP user and secret writes a pattern that lands in the file...
    let out = qemu_io(
        &d,
        &info,
        A,
        &info.chap.secret,
        &["write -P 0x5a 1M 2M", "read -P 0x5a 1M 2M"],
    );
    assert_ran(&out, "qemu-io as A with CHAP");
    assert_eq!(
        read_at(&backing, MIB, 2 * MIB),
        vec![0x5a; 2 * MIB as usize]
    );
    assert_eq!(read_at(&backing, 0, 4096), vec![0; 4096]);
    // ...and sees the volume's serial number (VPD 0x80), not tgtd's tid-derived default.
    let serial = inquiry(A, &good_url(&d, &info), &["-e", "1", "-c", "128"]);
    assert_ran(&serial, "iscsi-inq VPD 0x80");
    let serial = String::from_utf8_lossy(&serial.stdout).into_owned();
    let sn = serial
        .lines()
        .find_map(|l| l.strip_prefix("Unit Serial Number:"));
    assert_eq!(
        sn.map(|s| s.trim_matches(['[', ']', ' '])),
        Some("agent-tgt-chap")
    );

    // (2) A with a wrong secret, or without CHAP, is refused, and writes nothing.
    let wrong = inquiry(
        A,
        &url(&d, &info, Some((&info.chap.username, "wrongwrongwrong123"))),
        &[],
    );
    assert_ne!(wrong.status.code(), Some(0));
    assert!(
        stderr(&wrong).contains("Authentication failure"),
        "{}",
        stderr(&wrong)
    );
    let none = inquiry(A, &url(&d, &info, None), &[]);
    assert_ne!(none.status.code(), Some(0));
    assert!(
        stderr(&none).contains("Authentication failure"),
        "{}",
        stderr(&none)
    );
    let out = qemu_io(&d, &info, A, "wrongwrongwrong123", &["write -P 0xcd 0 64k"]);
    assert_ne!(out.status.code(), Some(0));

    // (3) B, not in the ACL, is refused even with the right secret.
    let other = inquiry(B, &good_url(&d, &info), &[]);
    assert_ne!(other.status.code(), Some(0));
    assert!(
        stderr(&other).contains("Target not found"),
        "{}",
        stderr(&other)
    );
    let out = qemu_io(&d, &info, B, &info.chap.secret, &["write -P 0xcd 0 64k"]);
    assert_ne!(out.status.code(), Some(0));

    assert_eq!(read_at(&backing, 0, 64 * 1024), vec![0; 64 * 1024]);
}

#[tokio::test]
async fn export_twice_changes_nothing_and_the_acl_follows_the_list() {
    let d = Daemon::start();
    let dir = tempfile::tempdir().unwrap();
    let backing = sparse(dir.path(), "volume.img", SIZE);
    let e = exports(&d);
    let id = vid("agent-tgt-twice");

    let first = e.export(&id, &backing, &[iqn(A)]).await.unwrap();
    let before = d.show();
    let second = e.export(&id, &backing, &[iqn(A), iqn(A)]).await.unwrap();
    assert_eq!(second, first);
    assert_eq!(d.show(), before, "the second export changed tgtd");
    assert_eq!(d.tids().len(), 1);

    // An agent restarted with the same key: same answer, same target; the account is
    // re-created once (tgtd never shows a secret) and logins keep working.
    let restarted = exports(&d);
    assert_eq!(
        restarted.export(&id, &backing, &[iqn(A)]).await.unwrap(),
        first
    );
    assert_eq!(d.show(), before);
    let out = qemu_io(&d, &first, A, &first.chap.secret, &["read 0 64k"]);
    assert_ran(&out, "qemu-io after the agent restarted");

    // The ACL is exactly the list given: B in, A out; then both.
    let tid = e.targets().await.unwrap()[0].tid;
    e.export(&id, &backing, &[iqn(B)]).await.unwrap();
    let t = e.targets().await.unwrap();
    assert_eq!(
        (t.len(), t[0].tid, t[0].initiators.clone()),
        (1, tid, vec![B.to_owned()])
    );
    e.export(&id, &backing, &[iqn(B), iqn(A)]).await.unwrap();
    let mut names = e.targets().await.unwrap()[0].initiators.clone();
    names.sort();
    assert_eq!(names, [A, B]);
    assert_ran(&inquiry(A, &good_url(&d, &first), &[]), "A after re-adding");
}

#[tokio::test]
async fn unexport_twice_is_ok_and_removes_target_and_account() {
    let d = Daemon::start();
    let dir = tempfile::tempdir().unwrap();
    let backing = sparse(dir.path(), "volume.img", SIZE);
    let e = exports(&d);
    let id = vid("agent-tgt-unexport");

    let info = e.export(&id, &backing, &[iqn(A)]).await.unwrap();
    assert_eq!(d.accounts(), vec![info.chap.username.clone()]);
    e.unexport(&id).await.unwrap();
    assert_eq!(e.targets().await.unwrap(), Vec::<TargetState>::new());
    assert_eq!(d.accounts(), Vec::<String>::new());
    e.unexport(&id).await.unwrap();
    e.unexport(&vid("never-exported")).await.unwrap();
    assert_eq!(d.show(), "");
}

#[tokio::test]
async fn reconcile_refills_a_restarted_tgtd_and_the_data_is_still_there() {
    let mut d = Daemon::start();
    let dir = tempfile::tempdir().unwrap();
    let backing = sparse(dir.path(), "volume.img", SIZE);
    let e = exports(&d);
    let id = vid("agent-tgt-restart");

    let info = e.export(&id, &backing, &[iqn(A)]).await.unwrap();
    let tid = e.targets().await.unwrap()[0].tid;
    let out = qemu_io(&d, &info, A, &info.chap.secret, &["write -P 0x77 3M 1M"]);
    assert_ran(&out, "qemu-io write before the restart");
    e.ping().await.unwrap();

    let (ctl, port) = (d.ctl, d.port);
    d.kill();
    let err = e.ping().await.unwrap_err();
    assert!(matches!(err, AgentError::TgtUnavailable(_)), "{err:?}");
    let err = e.targets().await.unwrap_err();
    assert!(matches!(err, AgentError::TgtUnavailable(_)), "{err:?}");

    let d = Daemon::start_on(ctl, port);
    e.ping().await.unwrap();
    assert_eq!(
        e.targets().await.unwrap(),
        Vec::<TargetState>::new(),
        "tgtd forgot everything"
    );
    let desired = [DesiredExport {
        id: id.clone(),
        backing: backing.clone(),
        initiators: vec![iqn(A)],
    }];
    let drift = e.reconcile(&desired).await.unwrap();
    assert_eq!(
        summary(&drift),
        (vec![id.to_string()], vec![], vec![], vec![])
    );

    let t = e.targets().await.unwrap();
    assert_eq!(
        (
            t.len(),
            t[0].tid,
            t[0].backing.clone(),
            t[0].initiators.clone()
        ),
        (1, tid, Some(backing.clone()), vec![A.to_owned()]),
        "same tid again (picked from the volume id)"
    );
    let out = qemu_io(&d, &info, A, &info.chap.secret, &["read -P 0x77 3M 1M"]);
    assert_ran(&out, "qemu-io read after the restart");
    let refused = inquiry(A, &url(&d, &info, None), &[]);
    assert!(
        stderr(&refused).contains("Authentication failure"),
        "{}",
        stderr(&refused)
    );

    assert_eq!(summary(&e.reconcile(&desired).await.unwrap()), no_drift());
}

#[tokio::test]
async fn reconcile_removes_orphans_repairs_tampering_and_leaves_the_rest_alone() {
    let d = Daemon::start();
    let dir = tempfile::tempdir().unwrap();
    let e = exports(&d);
    let orphan = format!("{TARGET_IQN_PREFIX}volume-orphan");
    let scratch = format!("{TARGET_IQN_PREFIX}scratch");
    let foreign = "iqn.2010-10.org.openstack:volume-foreign";
    d.tgtadm_ok(&[
        "--op", "new", "--mode", "target", "--tid", "500", "-T", &orphan,
    ]);
    d.tgtadm_ok(&[
        "--op",
        "new",
        "--mode",
        "account",
        "--user",
        "cb-orphan",
        "--password",
        "orphanorphan12",
    ]);
    d.tgtadm_ok(&[
        "--op",
        "bind",
        "--mode",
        "account",
        "--tid",
        "500",
        "--user",
        "cb-orphan",
    ]);
    d.tgtadm_ok(&[
        "--op", "new", "--mode", "target", "--tid", "501", "-T", &scratch,
    ]);
    d.tgtadm_ok(&[
        "--op", "new", "--mode", "target", "--tid", "502", "-T", foreign,
    ]);

    // One of ours, exported and then tampered with in every way reconcile repairs.
    let id = vid("agent-tgt-tampered");
    let backing = sparse(dir.path(), "tampered.img", SIZE);
    let elsewhere = sparse(dir.path(), "elsewhere.img", SIZE);
    let info = e.export(&id, &backing, &[iqn(A)]).await.unwrap();
    let targets = e.targets().await.unwrap();
    let tid = targets
        .iter()
        .find(|t| t.iqn == info.target_iqn)
        .unwrap()
        .tid
        .to_string();
    d.tgtadm_ok(&[
        "--op", "bind", "--mode", "target", "--tid", &tid, "-I", "ALL",
    ]);
    d.tgtadm_ok(&[
        "--op",
        "bind",
        "--mode",
        "target",
        "--tid",
        &tid,
        "--initiator-name",
        B,
    ]);
    d.tgtadm_ok(&[
        "--op",
        "unbind",
        "--mode",
        "account",
        "--tid",
        &tid,
        "--user",
        &info.chap.username,
    ]);
    d.tgtadm_ok(&[
        "--op",
        "delete",
        "--mode",
        "logicalunit",
        "--tid",
        &tid,
        "--lun",
        "1",
    ]);
    d.tgtadm_ok(&[
        "--op",
        "new",
        "--mode",
        "logicalunit",
        "--tid",
        &tid,
        "--lun",
        "1",
        "-b",
        elsewhere.to_str().unwrap(),
    ]);
    // Open to anyone without CHAP now, which is what reconcile must undo.
    assert_ran(
        &inquiry(B, &url(&d, &info, None), &[]),
        "tampered target open to B",
    );

    // Another of ours that an operation is changing right now: kept though not desired.
    let busy = vid("agent-tgt-busy");
    let busy_backing = sparse(dir.path(), "busy.img", SIZE);
    e.export(&busy, &busy_backing, &[iqn(B)]).await.unwrap();

    let desired = [DesiredExport {
        id: id.clone(),
        backing: backing.clone(),
        initiators: vec![iqn(A)],
    }];
    let drift = e
        .reconcile_except(&desired, std::slice::from_ref(&busy))
        .await
        .unwrap();
    let (created, repaired, mut removed, failed) = summary(&drift);
    removed.sort();
    assert_eq!(
        (created, repaired, removed, failed),
        (
            vec![],
            vec![id.to_string()],
            vec![scratch.clone(), orphan.clone()],
            vec![]
        )
    );

    let t = e.targets().await.unwrap();
    assert_eq!(
        t.iter().map(|t| t.iqn.as_str()).collect::<Vec<_>>(),
        [target_iqn(&busy), target_iqn(&id)]
    );
    let repaired = &t[1];
    assert_eq!(
        (
            repaired.backing.clone(),
            repaired.serial.clone(),
            repaired.initiators.clone()
        ),
        (
            Some(backing.clone()),
            Some(id.to_string()),
            vec![A.to_owned()]
        )
    );
    assert_eq!(
        (repaired.addresses.clone(), repaired.accounts.clone()),
        (vec![], vec![info.chap.username.clone()])
    );
    assert!(
        d.show().contains(foreign),
        "someone else's target is left alone"
    );
    let mut accounts = d.accounts();
    accounts.sort();
    let mut want = vec![
        info.chap.username.clone(),
        key().credentials(&busy).username,
    ];
    want.sort();
    assert_eq!(accounts, want, "the orphan's account went with it");

    // CHAP and the ACL hold again (tgtd checks CHAP first, then the ACL).
    let b = inquiry(B, &good_url(&d, &info), &[]);
    assert!(stderr(&b).contains("Target not found"), "{}", stderr(&b));
    let a = inquiry(A, &url(&d, &info, None), &[]);
    assert!(
        stderr(&a).contains("Authentication failure"),
        "{}",
        stderr(&a)
    );
    assert_ran(
        &inquiry(A, &good_url(&d, &info), &[]),
        "A with CHAP after the repair",
    );

    let again = e
        .reconcile_except(&desired, std::slice::from_ref(&busy))
        .await
        .unwrap();
    assert_eq!(summary(&again), no_drift());
    // Without the keep list the busy volume's target is an orphan too.
    let drift = e.reconcile(&desired).await.unwrap();
    assert_eq!(summary(&drift).2, [target_iqn(&busy)]);
}

#[tokio::test]
async fn refresh_lun_shows_the_new_size_while_an_initiator_is_logged_in() {
    let d = Daemon::start();
    let dir = tempfile::tempdir().unwrap();
    let backing = sparse(dir.path(), "volume.img", SIZE);
    let e = exports(&d);
    let id = vid("agent-tgt-extend");
    let info = e.export(&id, &backing, &[iqn(A)]).await.unwrap();

    // qemu-io stays logged in, reading commands from its stdin.
    let log = dir.path().join("qemu-io.log");
    let mut session = qemu_tool("qemu-io")
        .args(image_opts(&d, &info, A, &info.chap.secret))
        .stdin(Stdio::piped())
        .stdout(fs::File::create(&log).unwrap())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut input = session.stdin.take().unwrap();
    let send = |input: &mut std::process::ChildStdin, line: &str, done: &str| {
        use std::io::Write;
        writeln!(input, "{line}").unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !fs::read_to_string(&log).unwrap().contains(done) {
            assert!(
                Instant::now() < deadline,
                "qemu-io did not {line:?}:\n{}",
                fs::read_to_string(&log).unwrap()
            );
            sleep(Duration::from_millis(50));
        }
    };
    send(
        &mut input,
        "write -P 0x11 0 64k",
        "wrote 65536/65536 bytes at offset 0",
    );
    let t = e.targets().await.unwrap();
    assert_eq!(
        (t[0].sessions.len(), t[0].size_mb),
        (1, Some(67)),
        "64 MiB is 67 MB to tgtd"
    );

    fs::OpenOptions::new()
        .write(true)
        .open(&backing)
        .unwrap()
        .set_len(2 * SIZE)
        .unwrap();
    e.refresh_lun(&id, &backing).await.unwrap();

    let t = e.targets().await.unwrap();
    assert_eq!(
        (
            t[0].size_mb,
            t[0].serial.clone(),
            t[0].sessions
                .iter()
                .map(|s| s.initiator.clone())
                .collect::<Vec<_>>()
        ),
        (Some(134), Some(id.to_string()), vec![A.to_owned()]),
        "new size, same identity, the session still logged in"
    );
    // The open session goes on writing to the re-created LUN.
    send(
        &mut input,
        "write -P 0x22 1M 64k",
        "wrote 65536/65536 bytes at offset 1048576",
    );
    send(
        &mut input,
        "read -P 0x22 1M 64k",
        "read 65536/65536 bytes at offset 1048576",
    );
    assert_eq!(read_at(&backing, MIB, 64 * 1024), vec![0x22; 64 * 1024]);
    assert_eq!(read_at(&backing, 0, 64 * 1024), vec![0x11; 64 * 1024]);
    // A new READ CAPACITY reports the new size.
    require_tool("iscsi-readcapacity16", "libiscsi-bin");
    let cap = run_ok(
        Command::new("iscsi-readcapacity16")
            .args(["-i", A])
            .arg(good_url(&d, &info)),
    );
    let total = cap
        .lines()
        .find_map(|l| l.strip_prefix("Total size:"))
        .map(str::trim);
    assert_eq!(total, Some((2 * SIZE).to_string().as_str()));

    // Unexport with the session still logged in: --force drops it.
    e.unexport(&id).await.unwrap();
    assert_eq!(e.targets().await.unwrap(), Vec::<TargetState>::new());
    // qemu's iSCSI driver now retries the login forever instead of reading its stdin.
    drop(input);
    session.kill().unwrap();
    session.wait().unwrap();
    // Refreshing an export that is gone is nothing to do.
    e.refresh_lun(&id, &backing).await.unwrap();
}

#[tokio::test]
async fn a_failed_export_leaves_nothing_behind() {
    let d = Daemon::start();
    let dir = tempfile::tempdir().unwrap();
    let e = exports(&d);
    let id = vid("agent-tgt-fails");

    // tgtd cannot open the backing store: the target and account made before are removed.
    let missing = dir.path().join("missing.img");
    let err = e.export(&id, &missing, &[iqn(A)]).await.unwrap_err();
    match &err {
        AgentError::Exec {
            source: ExecError::Failed { code, stderr, .. },
            ..
        } => {
            assert_eq!((*code, stderr.as_str()), (22, "tgtadm: invalid request"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!((d.show(), d.accounts()), (String::new(), vec![]));

    // Nothing stuck: the same export with a real file works.
    let backing = sparse(dir.path(), "volume.img", SIZE);
    let info = e.export(&id, &backing, &[iqn(A)]).await.unwrap();
    assert_ran(
        &inquiry(A, &good_url(&d, &info), &[]),
        "A after the failed attempt",
    );
}

#[tokio::test]
async fn concurrent_exports_get_distinct_target_ids() {
    let d = Daemon::start();
    let dir = tempfile::tempdir().unwrap();
    let e = exports(&d);
    let vols: Vec<(VolumeId, PathBuf)> = (0..6)
        .map(|i| {
            (
                vid(&format!("agent-tgt-many-{i}")),
                sparse(dir.path(), &format!("v{i}.img"), MIB),
            )
        })
        .collect();
    let initiators = [iqn(A)];
    let all =
        futures::future::join_all(vols.iter().map(|(id, p)| e.export(id, p, &initiators))).await;
    let iqns: Vec<String> = all.into_iter().map(|r| r.unwrap().target_iqn).collect();
    assert_eq!(
        iqns,
        vols.iter()
            .map(|(id, _)| target_iqn(id))
            .collect::<Vec<_>>()
    );
    let mut tids = d.tids();
    tids.sort_unstable();
    tids.dedup();
    assert_eq!(tids.len(), 6);
    assert_eq!(e.targets().await.unwrap().len(), 6);
}
