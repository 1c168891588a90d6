//! The real `cinderblock` binary, spawned as a process, answering CSI Identity over a Unix
//! socket; readiness following each role's dependencies; configuration errors at start;
//! graceful shutdown on SIGTERM.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cinderblock::proto::csi::identity_client::IdentityClient;
use cinderblock::proto::csi::plugin_capability::{self, service::Type as S};
use cinderblock::proto::csi::{GetPluginCapabilitiesRequest, GetPluginInfoRequest, ProbeRequest};
use cinderblock::transport::{self, Endpoint};

const BIN: &str = env!("CARGO_BIN_EXE_cinderblock");

/// A spawned role, killed on drop.
struct Role {
    child: Child,
    socket: PathBuf,
}

impl Role {
    fn spawn(args: &[&str], socket: &Path) -> Role {
        let child = Command::new(BIN)
            .args(args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn cinderblock");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "{} never appeared",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Role {
            child,
            socket: socket.to_owned(),
        }
    }

    async fn client(&self) -> IdentityClient<tonic::transport::Channel> {
        let ep = Endpoint::Unix(self.socket.clone());
        IdentityClient::new(transport::connect(&ep, false).await.expect("connect"))
    }

    fn terminate(mut self) -> Option<i32> {
        let pid = self.child.id().to_string();
        common::run_ok(Command::new("kill").args(["-TERM", &pid]));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.code();
            }
            assert!(Instant::now() < deadline, "no exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn probe(c: &mut IdentityClient<tonic::transport::Channel>) -> Option<bool> {
    c.probe(ProbeRequest {})
        .await
        .expect("probe")
        .into_inner()
        .ready
}

async fn probe_until(
    c: &mut IdentityClient<tonic::transport::Channel>,
    want: bool,
) -> Option<bool> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = probe(c).await;
        if got == Some(want) || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn services(caps: &[cinderblock::proto::csi::PluginCapability]) -> Vec<i32> {
    caps.iter()
        .filter_map(|c| match &c.r#type {
            Some(plugin_capability::Type::Service(s)) => Some(s.r#type),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn agent_identity_over_unix_socket_follows_tgtd() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let tgtd = common::tgtd::Tgtd::start();
    let listen = format!("unix://{}", sock.display());
    let ctl = tgtd.ctl().to_string();
    let role = Role::spawn(
        &[
            "agent",
            "--listen",
            &listen,
            "--tgt-control-port",
            &ctl,
            "--name",
            "a1",
        ],
        &sock,
    );
    let mut c = role.client().await;

    let info = c
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "csi.cinderblock.dev");
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(probe(&mut c).await, Some(true), "tgtd is up");

    drop(tgtd); // tgtd stopped: the agent is no longer ready
    assert_eq!(probe_until(&mut c, false).await, Some(false));

    assert_eq!(role.terminate(), Some(0), "graceful exit on SIGTERM");
    assert!(!sock.exists(), "socket removed on shutdown");
}

#[tokio::test]
async fn controller_is_ready_only_with_a_reachable_agent() {
    let dir = tempfile::tempdir().unwrap();
    let (csock, asock) = (dir.path().join("csi.sock"), dir.path().join("agent.sock"));
    let agent_ep = format!("unix://{}", asock.display());
    let ctl = Role::spawn(
        &[
            "controller",
            "--endpoint",
            &format!("unix://{}", csock.display()),
            "--agent",
            &format!("a1={agent_ep}"),
        ],
        &csock,
    );
    let mut c = ctl.client().await;
    let caps = c
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        services(&caps.capabilities),
        vec![
            S::ControllerService as i32,
            S::VolumeAccessibilityConstraints as i32
        ]
    );
    assert_eq!(probe(&mut c).await, Some(false), "no agent yet");

    let tgtd = common::tgtd::Tgtd::start();
    let _agent = Role::spawn(
        &[
            "agent",
            "--listen",
            &agent_ep,
            "--tgt-control-port",
            &tgtd.ctl().to_string(),
        ],
        &asock,
    );
    assert_eq!(
        probe_until(&mut c, true).await,
        Some(true),
        "agent up and ready"
    );
}

#[tokio::test]
async fn node_identity_reports_node_capabilities() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("node.sock");
    let node = Role::spawn(
        &[
            "node",
            "--endpoint",
            &format!("unix://{}", sock.display()),
            "--zone",
            "z1",
        ],
        &sock,
    );
    let mut c = node.client().await;
    let caps = c
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        services(&caps.capabilities),
        vec![S::VolumeAccessibilityConstraints as i32]
    );
    // Ready exactly when iscsid's control socket accepts a connection on this machine.
    let iscsid_up = cinderblock::health::Dependency::check(&cinderblock::health::Iscsid)
        .await
        .is_ok();
    assert_eq!(probe(&mut c).await, Some(iscsid_up));
}

fn run_bin(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run cinderblock");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_config_is_one_line_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("agent", "name = \"a\"\nlisten = \"tcp://127.0.0.1:0\"\nbogus = 1\n", "unknown field `bogus`"),
        (
            "agent",
            "[[pools]]\nname = \"p\"\nkind = \"file\"\npath = \"/tmp/x\"\nreserved_percentage = 150\n",
            "config key `pools[0].reserved_percentage`",
        ),
        ("node", "zone = 5\n", ":1: invalid type"),
        ("controller", "default_volume_type = \"gold\"\n", "config key `default_volume_type`"),
        ("all", "[agent]\nlisten = \"ftp://x\"\n", "invalid endpoint"),
    ];
    for (role, text, want) in cases {
        let f = dir.path().join(format!("{role}.toml"));
        std::fs::write(&f, text).unwrap();
        let (code, _out, err) = run_bin(&[role, "--config", f.to_str().unwrap()]);
        assert_eq!(code, Some(2), "{role}: {err}");
        let line = err.trim_end();
        assert_eq!(line.lines().count(), 1, "one line: {line}");
        assert!(line.starts_with("cinderblock: error: "), "{line}");
        assert!(
            line.contains(want),
            "{role}: {line:?} should contain {want:?}"
        );
    }
}

#[test]
fn help_documents_every_flag() {
    let cases: [(&str, &[&str]); 4] = [
        (
            "controller",
            &[
                "--config",
                "--endpoint",
                "--agent",
                "--log-format",
                "--log-level",
            ],
        ),
        (
            "node",
            &[
                "--config",
                "--endpoint",
                "--node-name",
                "--zone",
                "--initiator-name-file",
                "--exec-prefix",
            ],
        ),
        (
            "agent",
            &[
                "--config",
                "--listen",
                "--name",
                "--tgt-control-port",
                "--portal",
                "--chap-key-file",
            ],
        ),
        (
            "all",
            &[
                "--config",
                "--endpoint",
                "--listen",
                "--zone",
                "--without-node",
            ],
        ),
    ];
    for (role, flags) in cases {
        let (code, out, _) = run_bin(&[role, "--help"]);
        assert_eq!(code, Some(0));
        for f in flags {
            assert!(out.contains(f), "{role} --help lacks {f}");
        }
        // Every option line is followed by its description (no undocumented flag).
        let undocumented: Vec<&str> = out
            .lines()
            .collect::<Vec<_>>()
            .windows(2)
            .filter(|w| w[0].trim_start().starts_with("--") && w[1].trim().is_empty())
            .map(|w| w[0])
            .collect();
        assert_eq!(undocumented, Vec::<&str>::new(), "{role}");
    }
}
