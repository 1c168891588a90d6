//! A real, private `tgtd` for host-side tests.
//!
//! Each [`Tgtd`] runs its own daemon in the foreground with its own management channel
//! (`-C N`, a socket `/var/run/tgtd/socket.N` guarded by a lock file) and its own iSCSI
//! portal on `127.0.0.1:<free port>`, so tests can run in parallel with each other and
//! with a system tgtd. On drop it is shut down the supported way: every target deleted
//! with `--force` (tgtd ignores SIGTERM and refuses `delete --mode system` while it has
//! targets), then `--op delete --mode system`, then SIGKILL by PID as a last resort.

use std::collections::HashSet;
use std::fs;
use std::hash::{BuildHasher, RandomState};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use super::require_tool;

/// How long tgtd gets to answer its management channel after start.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long tgtd gets to exit after `--op delete --mode system`.
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);
/// Start attempts: a control port or portal port another process took in between.
const START_ATTEMPTS: u32 = 8;

/// A private tgtd process; see the module documentation.
#[derive(Debug)]
pub struct Tgtd {
    child: Child,
    ctl: u16,
    port: u16,
    log: PathBuf,
    /// Holds tgtd's log; removed on drop.
    _dir: tempfile::TempDir,
}

impl Tgtd {
    /// Starts a tgtd and waits until its management channel answers and its portal listens.
    /// Panics with the reason (tool missing, no free port, tgtd log) if it cannot.
    pub fn start() -> Tgtd {
        let mut last_log = String::new();
        for attempt in 0..START_ATTEMPTS {
            let ctl = pick_control_port(attempt);
            if tgtadm_raw(ctl, &["--op", "show", "--mode", "sys"])
                .status
                .success()
            {
                continue; // another tgtd already owns this management channel
            }
            match Tgtd::try_start(ctl, free_tcp_port()) {
                Ok(tgtd) => return tgtd,
                Err(log) => last_log = log,
            }
        }
        panic!("tgtd did not start in {START_ATTEMPTS} attempts; last log:\n{last_log}");
    }

    /// Starts a fresh tgtd on the management channel and portal port of one that died (see
    /// [`Tgtd::kill`]): a restart, which forgets every target. Retries for a few seconds.
    pub fn start_on(ctl: u16, port: u16) -> Tgtd {
        let mut last_log = String::new();
        for _ in 0..50 {
            match Tgtd::try_start(ctl, port) {
                Ok(tgtd) => return tgtd,
                Err(log) => last_log = log,
            }
            sleep(Duration::from_millis(100));
        }
        panic!("tgtd did not start again on -C {ctl}, portal port {port}; last log:\n{last_log}");
    }

    /// Kills tgtd with SIGKILL, by PID, without any cleanup: a crash.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The iSCSI portal's TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// One start: Ok once ready, Err(tgtd's log) if it exited or did not get ready.
    fn try_start(ctl: u16, port: u16) -> Result<Tgtd, String> {
        require_tool("tgtd", "tgt");
        require_tool("tgtadm", "tgt");
        let dir = tempfile::tempdir().expect("temporary directory for tgtd");
        let log = dir.path().join("tgtd.log");
        let log_file = fs::File::create(&log).expect("tgtd log file");
        let child = Command::new("tgtd")
            .args(["-f", "-C", &ctl.to_string(), "--iscsi"])
            .arg(format!("portal=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("tgtd log file"))
            .stderr(log_file)
            .spawn()
            .expect("spawn tgtd");
        let mut tgtd = Tgtd {
            child,
            ctl,
            port,
            log,
            _dir: dir,
        };
        if tgtd.wait_ready() {
            return Ok(tgtd);
        }
        Err(fs::read_to_string(&tgtd.log).unwrap_or_default())
        // dropping `tgtd` here shuts it down
    }

    /// The management channel number (`tgtadm -C`).
    pub fn ctl(&self) -> u16 {
        self.ctl
    }

    /// The iSCSI portal, `127.0.0.1:PORT`.
    pub fn portal(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// tgtd's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Runs `tgtadm -C N --lld iscsi ARGS` and returns its output, whatever the exit code.
    pub fn tgtadm(&self, args: &[&str]) -> Output {
        let mut full = vec!["--lld", "iscsi"];
        full.extend_from_slice(args);
        tgtadm_raw(self.ctl, &full)
    }

    /// Like [`Tgtd::tgtadm`], but panics with tgtadm's stderr unless it exits 0; returns stdout.
    pub fn tgtadm_ok(&self, args: &[&str]) -> String {
        let out = self.tgtadm(args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "tgtadm -C {} --lld iscsi {}: {}",
            self.ctl,
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The target ids tgtd currently has (from `--op show --mode target`).
    pub fn target_ids(&self) -> Vec<u32> {
        let out = self.tgtadm(&["--op", "show", "--mode", "target"]);
        parse_target_ids(&String::from_utf8_lossy(&out.stdout))
    }

    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false; // e.g. the control port's lock is held by another tgtd
            }
            let answered = tgtadm_raw(self.ctl, &["--op", "show", "--mode", "sys"])
                .status
                .success();
            // tgtd keeps running when its portal cannot be bound, so check the socket too.
            if answered && listens_on(self.child.id(), self.port) {
                return true;
            }
            sleep(Duration::from_millis(50));
        }
        false
    }

    fn shutdown(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        for tid in self.target_ids() {
            let tid = tid.to_string();
            let _ = self.tgtadm(&[
                "--op", "delete", "--force", "--mode", "target", "--tid", &tid,
            ]);
        }
        let _ = tgtadm_raw(self.ctl, &["--op", "delete", "--mode", "system"]);
        let deadline = Instant::now() + EXIT_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            sleep(Duration::from_millis(50));
        }
        // Last resort, by PID (Child::kill sends SIGKILL to this very process).
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Tgtd {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn tgtadm_raw(ctl: u16, args: &[&str]) -> Output {
    Command::new("tgtadm")
        .arg("-C")
        .arg(ctl.to_string())
        .args(args)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .expect("run tgtadm")
}

/// `Target 3: iqn...` lines of `tgtadm --op show --mode target`.
pub fn parse_target_ids(show: &str) -> Vec<u32> {
    show.lines()
        .filter_map(|l| l.strip_prefix("Target "))
        .filter_map(|rest| rest.split(':').next()?.trim().parse().ok())
        .collect()
}

/// A management channel number unlikely to be used by anyone else: random per process and
/// attempt, within 20000..32000 (tgtd and tgtadm accept 0..=32767; the system tgtd uses 0).
fn pick_control_port(attempt: u32) -> u16 {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let h = RandomState::new().hash_one((std::process::id(), n, attempt, Instant::now()));
    20_000 + (h % 12_000) as u16
}

/// A TCP port the kernel considers free on 127.0.0.1 right now.
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Whether process `pid` has a TCP socket listening on 127.0.0.1:`port` (from /proc).
fn listens_on(pid: u32, port: u16) -> bool {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    let inodes: HashSet<String> = fds
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .filter_map(|p| {
            let s = p.to_string_lossy().into_owned();
            Some(s.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let Ok(tcp) = fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let want = format!("0100007F:{port:04X}");
    tcp.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // columns: sl local_address rem_address st ... inode (10th)
        f.len() > 9 && f[1] == want && f[3] == "0A" && inodes.contains(f[9])
    })
}
