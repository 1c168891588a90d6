//! Command-line interface: one binary, one subcommand per role plus operator commands.
//! Every flag can also be set with a `CINDERBLOCK_*` environment variable; flags and
//! variables override the TOML file given with `--config`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::logging::LogFormat;
use crate::transport::Endpoint;

/// Cinderblock: OpenStack Cinder's block storage for Kubernetes (CSI driver csi.cinderblock.dev).
#[derive(Debug, Parser)]
#[command(
    name = "cinderblock",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "CINDERBLOCK_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Log filter (`info`, `debug`, `cinderblock=debug,tonic=info`); RUST_LOG wins when set.
    #[arg(
        long,
        global = true,
        default_value = "info",
        env = "CINDERBLOCK_LOG_LEVEL"
    )]
    pub log_level: String,
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Roles and operator commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the CSI controller (Identity + Controller services; Cinder's API and scheduler).
    Controller(ControllerArgs),
    /// Run the CSI node service (Identity + Node services; iSCSI attach and mounts).
    Node(NodeArgs),
    /// Run the storage agent on a storage node (Cinder's volume service: LVM/file pools + tgt).
    Agent(AgentArgs),
    /// Run controller, agent and node in one process on a single host (Cinder's "all").
    All(AllArgs),
    /// Query a CSI endpoint's Identity service: plugin info, capabilities and readiness.
    Identity(IdentityArgs),
    /// Operate one storage agent directly (pools, volumes, snapshots, exports).
    AgentCtl(crate::ops::agent::AgentCtlArgs),
    /// Measure CreateVolume through a CSI controller (latency, burst wall time, duplicates).
    BenchCsi(crate::ops::bench::BenchCsiArgs),
    /// Measure NodeStageVolume + NodePublishVolume on this node (what a pod waits for).
    BenchAttach(crate::ops::bench_attach::BenchAttachArgs),
    /// Volumes as the controller sees them (Cinder's `cinder list` / `cinder show`).
    Volume(crate::ops::operator::VolumeArgs),
    /// Snapshots (Cinder's `cinder snapshot-list`).
    Snapshot(crate::ops::operator::SnapshotArgs),
    /// Pools with capacity and counts (Cinder's `cinder get-pools --detail`).
    Pool(crate::ops::operator::PoolArgs),
    /// Volume types (Cinder's `cinder type-list`).
    Type(crate::ops::operator::TypeArgs),
    /// Backups through the controller (Cinder's backup-create/-list/-show/-delete/-restore/
    /// -export/-import).
    Backup(crate::ops::backup::BackupArgs),
    /// Print the CustomResourceDefinitions (StoragePool, VolumeBackup, VolumeRestore) as YAML.
    Crds,
}

/// Flags shared by every role.
#[derive(Debug, Args)]
pub struct ConfigArg {
    /// TOML configuration file of this role.
    #[arg(long, short = 'c', env = "CINDERBLOCK_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// `cinderblock controller`.
#[derive(Debug, Args)]
pub struct ControllerArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// CSI endpoint to serve (unix:///path or tcp://host:port).
    #[arg(long, env = "CINDERBLOCK_ENDPOINT", value_name = "ENDPOINT")]
    pub endpoint: Option<Endpoint>,
    /// Also serve the operator API alone on this endpoint (it is always on the CSI endpoint).
    #[arg(long, env = "CINDERBLOCK_OPERATOR_LISTEN", value_name = "ENDPOINT")]
    pub operator_listen: Option<Endpoint>,
    /// A storage agent as NAME=ENDPOINT (repeat, or comma-separate in the variable); added
    /// to the agents of the configuration file.
    #[arg(
        long = "agent",
        env = "CINDERBLOCK_AGENTS",
        value_delimiter = ',',
        value_name = "NAME=ENDPOINT"
    )]
    pub agents: Vec<String>,
}

/// `cinderblock node`.
#[derive(Debug, Args)]
pub struct NodeArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// CSI endpoint to serve (unix:///path or tcp://host:port).
    #[arg(long, env = "CINDERBLOCK_ENDPOINT", value_name = "ENDPOINT")]
    pub endpoint: Option<Endpoint>,
    #[command(flatten)]
    pub node: NodeFlags,
    /// File with the agents' CHAP master key, to derive each volume's CHAP secret (`all`
    /// uses the agent's `--chap-key-file`).
    #[arg(long, env = "CINDERBLOCK_CHAP_KEY_FILE", value_name = "FILE")]
    pub chap_key_file: Option<PathBuf>,
}

/// Node settings that are also accepted by `all`.
#[derive(Debug, Args)]
pub struct NodeFlags {
    /// This node's name (default: the host name).
    #[arg(long, env = "CINDERBLOCK_NODE_NAME")]
    pub node_name: Option<String>,
    /// Availability zone of this node (topology.cinderblock.dev/zone).
    #[arg(long, env = "CINDERBLOCK_ZONE")]
    pub zone: Option<String>,
    /// File holding this node's iSCSI initiator name.
    #[arg(long, env = "CINDERBLOCK_INITIATOR_NAME_FILE", value_name = "FILE")]
    pub initiator_name_file: Option<PathBuf>,
    /// Prefix for host commands, space-separated (e.g. "nsenter --mount=/proc/1/ns/mnt --").
    #[arg(long, env = "CINDERBLOCK_EXEC_PREFIX", value_name = "WORDS")]
    pub exec_prefix: Option<String>,
}

/// `cinderblock agent`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    #[command(flatten)]
    pub agent: AgentFlags,
}

/// Agent settings that are also accepted by `all`.
#[derive(Debug, Args)]
pub struct AgentFlags {
    /// Where the agent API (and its Identity service) listens.
    #[arg(long, env = "CINDERBLOCK_LISTEN", value_name = "ENDPOINT")]
    pub listen: Option<Endpoint>,
    /// Agent name, unique in the cluster (default: the host name).
    #[arg(long, env = "CINDERBLOCK_AGENT_NAME")]
    pub name: Option<String>,
    /// tgtd control port (tgtadm -C N); 0 = tgtd's default.
    #[arg(long, env = "CINDERBLOCK_TGT_CONTROL_PORT", value_name = "N")]
    pub tgt_control_port: Option<u16>,
    /// iSCSI portal advertised to initiators ("address:port").
    #[arg(long, env = "CINDERBLOCK_PORTAL", value_name = "ADDR:PORT")]
    pub portal: Option<String>,
    /// File with the master key that per-volume CHAP secrets are derived from.
    #[arg(long, env = "CINDERBLOCK_CHAP_KEY_FILE", value_name = "FILE")]
    pub chap_key_file: Option<PathBuf>,
    /// Serve Prometheus metrics on http://ADDR:PORT/metrics.
    #[arg(long, env = "CINDERBLOCK_METRICS_LISTEN", value_name = "ADDR:PORT")]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// `cinderblock all`.
#[derive(Debug, Args)]
pub struct AllArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// CSI endpoint serving Identity, Controller and Node.
    #[arg(long, env = "CINDERBLOCK_ENDPOINT", value_name = "ENDPOINT")]
    pub endpoint: Option<Endpoint>,
    #[command(flatten)]
    pub agent: AgentFlags,
    #[command(flatten)]
    pub node: NodeFlags,
    /// Do not run the node service (hosts without an iSCSI initiator: the controller and
    /// agent still serve, and volumes are reached with userspace initiators).
    #[arg(long, env = "CINDERBLOCK_WITHOUT_NODE")]
    pub without_node: bool,
}

/// `cinderblock identity`.
#[derive(Debug, Args)]
pub struct IdentityArgs {
    /// CSI endpoint to query.
    #[arg(long, env = "CINDERBLOCK_ENDPOINT", value_name = "ENDPOINT")]
    pub endpoint: Endpoint,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
    /// Keep probing until ready or this many seconds pass (0 = probe once).
    #[arg(long, default_value_t = 0, value_name = "SECONDS")]
    pub wait: u64,
}

/// Output of operator commands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Human-readable table.
    #[default]
    Table,
    /// JSON for scripts.
    Json,
}

impl AgentFlags {
    /// Lays these flags over a loaded configuration.
    pub fn apply(&self, cfg: &mut crate::config::AgentConfig) {
        if let Some(v) = &self.listen {
            cfg.listen = v.clone();
        }
        if let Some(v) = &self.name {
            cfg.name = v.clone();
        }
        if let Some(v) = self.tgt_control_port {
            cfg.tgt.control_port = v;
        }
        if let Some(v) = &self.portal {
            cfg.tgt.portal = v.clone();
        }
        if let Some(v) = &self.chap_key_file {
            cfg.chap_key_file = Some(v.clone());
        }
        if let Some(v) = self.metrics_listen {
            cfg.metrics_listen = Some(v);
        }
    }
}

impl NodeFlags {
    /// Lays these flags over a loaded configuration.
    pub fn apply(&self, cfg: &mut crate::config::NodeConfig) {
        if let Some(v) = &self.node_name {
            cfg.node_name = v.clone();
        }
        if let Some(v) = &self.zone {
            cfg.zone = v.clone();
        }
        if let Some(v) = &self.initiator_name_file {
            cfg.initiator_name_file = v.clone();
        }
        if let Some(v) = &self.exec_prefix {
            cfg.exec_prefix = v.split_whitespace().map(str::to_owned).collect();
        }
    }
}

/// Parses `NAME=ENDPOINT` agent flags.
pub fn parse_agent_flags(
    flags: &[String],
) -> Result<Vec<crate::config::AgentRef>, crate::config::ConfigError> {
    flags
        .iter()
        .map(|f| {
            let bad = |reason: String| crate::config::ConfigError::Invalid {
                key: "--agent".into(),
                reason,
            };
            let (name, ep) = f
                .split_once('=')
                .ok_or_else(|| bad(format!("{f:?} is not NAME=ENDPOINT")))?;
            let endpoint = ep
                .parse()
                .map_err(|e: crate::transport::TransportError| bad(e.to_string()))?;
            Ok(crate::config::AgentRef {
                name: name.to_owned(),
                endpoint,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_flags() {
        let got = parse_agent_flags(&["a=tcp://127.0.0.1:1".into()]).unwrap();
        assert_eq!(got[0].name, "a");
        assert_eq!(got[0].endpoint.to_string(), "tcp://127.0.0.1:1");
        for bad in ["noequals", "a=http://x"] {
            assert!(matches!(
                parse_agent_flags(&[bad.into()]),
                Err(crate::config::ConfigError::Invalid { .. })
            ));
        }
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
