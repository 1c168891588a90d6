//! A Cinderblock stack of real processes for controller tests: N `cinderblock agent`s with a
//! file pool each, each behind its own private real tgtd, and one `cinderblock controller`
//! talking to them, all over Unix sockets in a temporary directory. Everything is stopped on
//! drop (processes by their own PID). The pieces (agent configuration, spawning and waiting)
//! serve other real-process tests too.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cinderblock::proto::csi::controller_client::ControllerClient;
use cinderblock::transport::{self, Endpoint};

use crate::common::tgtd::Tgtd;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_cinderblock");

/// One agent to start.
#[derive(Clone, Debug)]
pub struct AgentSpec {
    /// Agent (and pool) name.
    pub name: &'static str,
    /// Zone of its pool.
    pub zone: &'static str,
    /// Pool capacity in GiB.
    pub capacity_gib: u64,
    /// Pool capabilities as TOML inline-table entries, e.g. `media = "ssd"`.
    pub capabilities: &'static str,
}

impl AgentSpec {
    /// a: zone z1, ssd, 12 GiB; b: z2, hdd, 10 GiB; c: z3, no media, 8 GiB.
    pub fn three_zones() -> Vec<AgentSpec> {
        vec![
            AgentSpec {
                name: "a",
                zone: "z1",
                capacity_gib: 12,
                capabilities: r#"media = "ssd""#,
            },
            AgentSpec {
                name: "b",
                zone: "z2",
                capacity_gib: 10,
                capabilities: r#"media = "hdd""#,
            },
            AgentSpec {
                name: "c",
                zone: "z3",
                capacity_gib: 8,
                capabilities: "",
            },
        ]
    }
}

/// A spawned process, killed (SIGKILL, by its PID) on drop.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Spawns `cinderblock ARGS` and waits until `socket` exists (see [`Proc::spawn_until`]).
    pub fn spawn(args: &[&str], log: PathBuf, socket: &Path) -> Proc {
        Proc::spawn_until(args, log, &socket.display().to_string(), || socket.exists())
    }

    /// Spawns `cinderblock ARGS`, its output going to `log`, and waits (30 s at most) until
    /// `ready` holds; panics with the log if the process exits first or never gets ready.
    pub fn spawn_until(args: &[&str], log: PathBuf, what: &str, ready: impl Fn() -> bool) -> Proc {
        let out = std::fs::File::create(&log).expect("log file");
        let child = Command::new(BIN)
            .args(args)
            .env_remove("RUST_LOG")
            .env("CINDERBLOCK_LOG_LEVEL", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log file"))
            .stderr(out)
            .spawn()
            .expect("spawn cinderblock");
        let mut p = Proc { child, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready() {
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!("{args:?} exited with {status}:\n{}", p.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "{what} never got ready:\n{}",
                p.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        p
    }

    /// The process's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the process logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    /// Its spec.
    pub spec: AgentSpec,
    /// Its pool directory (file pool: `volume-<id>.img` files).
    pub pool_dir: PathBuf,
    /// Its socket.
    pub socket: PathBuf,
    /// Its process.
    pub proc: Proc,
    /// Its tgtd (dropped after the agent).
    pub tgtd: Tgtd,
}

/// The whole stack.
#[derive(Debug)]
pub struct Stack {
    /// The controller process (dropped first).
    pub controller: Proc,
    /// CSI socket of the controller (the operator API is served there too).
    pub csi: PathBuf,
    /// The controller's `--operator-listen` socket: the operator API alone.
    #[allow(dead_code)] // used by tests/operator_cli.rs only
    pub operator: PathBuf,
    /// The agents, in spec order.
    pub agents: Vec<Agent>,
    /// Holds every file (dropped last).
    pub _dir: tempfile::TempDir,
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
pub fn listening(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// An agent configuration for `spec`: listening on `listen`, its tgtd, one file pool in
/// `pool_dir`; `root` adds top-level keys, `tables` adds tables at the end.
pub fn agent_config(
    spec: &AgentSpec,
    listen: &str,
    tgtd: &Tgtd,
    pool_dir: &Path,
    root: &str,
    tables: &str,
) -> String {
    format!(
        r#"name = "{name}"
listen = "{listen}"
{root}

[tgt]
portal = "{portal}"
control_port = {ctl}

[[pools]]
name = "{name}"
kind = "file"
path = "{pool}"
capacity_bytes = {capacity}
zone = "{zone}"
max_over_subscription_ratio = 1.0
capabilities = {{ {caps} }}

{tables}
"#,
        name = spec.name,
        portal = tgtd.portal(),
        ctl = tgtd.ctl(),
        pool = pool_dir.display(),
        capacity = spec.capacity_gib << 30,
        zone = spec.zone,
        caps = spec.capabilities,
    )
}

/// `Tgtd::start`, tried again when a start fails (its control-port choice sometimes lands
/// outside what tgtadm accepts, which makes a whole start fail now and then).
pub fn start_tgtd() -> Tgtd {
    for _ in 0..3 {
        if let Ok(t) = std::panic::catch_unwind(Tgtd::start) {
            return t;
        }
    }
    Tgtd::start()
}

/// The controller configuration of the tests: volume types and a fast stats refresh.
pub const CONTROLLER_TOML: &str = r#"
default_volume_type = "default"
stats_interval_secs = 1

[volume_types.default]
description = "anything"

[volume_types.ssd]
extra_specs = { media = "ssd" }

[volume_types.hdd]
extra_specs = { media = "hdd" }

[volume_types.shared]
extra_specs = { multiattach = "<is> True" }
"#;

impl Stack {
    /// Starts one agent per spec, then the controller.
    pub fn start(specs: &[AgentSpec]) -> Stack {
        Stack::start_with(specs, |_| String::new())
    }

    /// Like [`Stack::start`], with `tables(spec)` appended to each agent's configuration
    /// (backup repositories, ...).
    pub fn start_with(specs: &[AgentSpec], tables: impl Fn(&AgentSpec) -> String) -> Stack {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut agents = Vec::new();
        for spec in specs {
            let tgtd = start_tgtd();
            let pool_dir = dir.path().join(format!("pool-{}", spec.name));
            std::fs::create_dir_all(&pool_dir).expect("pool directory");
            let socket = dir.path().join(format!("agent-{}.sock", spec.name));
            let config = dir.path().join(format!("agent-{}.toml", spec.name));
            let listen = format!("unix://{}", socket.display());
            let toml = agent_config(spec, &listen, &tgtd, &pool_dir, "", &tables(spec));
            std::fs::write(&config, toml).expect("agent config");
            let log = dir.path().join(format!("agent-{}.log", spec.name));
            let config_arg = config.display().to_string();
            let proc = Proc::spawn(&["agent", "--config", &config_arg], log, &socket);
            agents.push(Agent {
                spec: spec.clone(),
                pool_dir,
                socket,
                proc,
                tgtd,
            });
        }
        let csi = dir.path().join("csi.sock");
        let operator = dir.path().join("operator.sock");
        let config = dir.path().join("controller.toml");
        std::fs::write(&config, CONTROLLER_TOML).expect("controller config");
        let mut args: Vec<String> = vec![
            "controller".into(),
            "--config".into(),
            config.display().to_string(),
            "--endpoint".into(),
            format!("unix://{}", csi.display()),
            "--operator-listen".into(),
            format!("unix://{}", operator.display()),
        ];
        for a in &agents {
            args.push("--agent".into());
            args.push(format!("{}=unix://{}", a.spec.name, a.socket.display()));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let controller = Proc::spawn(&args, dir.path().join("controller.log"), &csi);
        Stack {
            controller,
            csi,
            operator,
            agents,
            _dir: dir,
        }
    }

    /// A CSI Controller client over the Unix socket.
    pub async fn client(&self) -> ControllerClient<tonic::transport::Channel> {
        let ep = Endpoint::Unix(self.csi.clone());
        ControllerClient::new(transport::connect(&ep, false).await.expect("connect"))
    }

    /// The agent called `name`.
    pub fn agent(&self, name: &str) -> &Agent {
        self.agents
            .iter()
            .find(|a| a.spec.name == name)
            .expect("no such agent")
    }

    /// Every log, for a failure message.
    pub fn logs(&self) -> String {
        let mut out = format!("--- controller\n{}", self.controller.log_text());
        for a in &self.agents {
            out.push_str(&format!("--- agent {}\n{}", a.spec.name, a.proc.log_text()));
        }
        out
    }
}
