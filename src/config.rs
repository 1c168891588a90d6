//! Configuration: one TOML file per role (`all` takes one file with a section per role), then
//! command-line flags and `CINDERBLOCK_*` environment variables on top (see `cli.rs`).
//!
//! Unknown keys and impossible values are rejected at start with one line naming the key.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::transport::Endpoint;

/// Errors of loading and validating configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// File path.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this role (unknown key, wrong type, bad value).
    #[error("{path}:{line}: {message}{context}")]
    Parse {
        /// File path.
        path: PathBuf,
        /// 1-based line of the offending key.
        line: usize,
        /// The parser's message, on one line.
        message: String,
        /// The offending line, as ` (at `...`)`, or empty.
        context: String,
    },
    /// A value parses but is impossible (e.g. `reserved_percentage = 150`).
    #[error("config key `{key}`: {reason}")]
    Invalid {
        /// Dotted key path, e.g. `agent.pools[1].reserved_percentage`.
        key: String,
        /// Why the value is rejected.
        reason: String,
    },
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

/// Reads and parses a TOML file into `T`, or `T::default()` when `path` is `None`.
pub fn load<T>(path: Option<&Path>) -> Result<T, ConfigError>
where
    T: for<'de> Deserialize<'de> + Default,
{
    let Some(path) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &text)
}

/// Parses TOML text (named `path` in errors) into `T`.
pub fn parse<T>(path: &Path, text: &str) -> Result<T, ConfigError>
where
    T: for<'de> Deserialize<'de>,
{
    toml::from_str(text).map_err(|e| {
        let start = e.span().map(|s| s.start).unwrap_or(0).min(text.len());
        let line = text[..start].bytes().filter(|b| *b == b'\n').count() + 1;
        let context = text
            .lines()
            .nth(line - 1)
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(|l| format!(" (at `{l}`)"))
            .unwrap_or_default();
        ConfigError::Parse {
            path: path.to_owned(),
            line,
            message: e.message().replace('\n', " "),
            context,
        }
    })
}

fn default_csi_endpoint() -> Endpoint {
    Endpoint::Unix(PathBuf::from("/run/cinderblock/csi.sock"))
}

fn default_agent_listen() -> Endpoint {
    Endpoint::Tcp("127.0.0.1:9700".into())
}

fn default_zone() -> String {
    "nova".into()
}

// ---------------------------------------------------------------------------------------
// Controller

/// A storage agent the controller talks to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentRef {
    /// The agent's name (must match what it reports).
    pub name: String,
    /// Where its gRPC API listens.
    pub endpoint: Endpoint,
}

/// A volume type: a named set of extra specs (Cinder's volume types).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VolumeTypeConfig {
    /// Human description.
    pub description: String,
    /// Extra specs matched against pool capabilities by the scheduler.
    pub extra_specs: BTreeMap<String, String>,
}

/// `cinderblock controller`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControllerConfig {
    /// CSI endpoint (Identity + Controller; the operator API is served there too).
    pub endpoint: Endpoint,
    /// A second endpoint serving only the operator API (e.g. TCP for operators while CSI
    /// stays on a Unix socket).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operator_listen: Option<Endpoint>,
    /// Statically configured agents (Kubernetes discovery adds to these).
    pub agents: Vec<AgentRef>,
    /// Volume type used when a request names none.
    pub default_volume_type: String,
    /// Volume types by name.
    pub volume_types: BTreeMap<String, VolumeTypeConfig>,
    /// Filters, weighers and attempts of the filter scheduler (`[scheduler]`; Cinder's defaults
    /// when left out). Not serialized: the scheduler's types only deserialize.
    #[serde(skip_serializing)]
    pub scheduler: crate::scheduler::SchedulerConfig,
    /// How often pool statistics are refreshed from the agents, in seconds (Cinder's
    /// periodic volume stats report; placements are charged in memory in between).
    pub stats_interval_secs: u64,
    /// TLS credentials for every agent reached over `tcp://` (`[agent_tls]`); agents on
    /// `unix://` sockets are dialled in plain text.
    pub agent_tls: Option<AgentClientTlsConfig>,
    /// Where the Prometheus metrics endpoint listens (`GET /metrics`, `GET /healthz`,
    /// "address:port"); off when absent.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Kubernetes integration (`[kubernetes]`): agent discovery from StoragePools, leader
    /// election, the VolumeBackup/VolumeRestore reconcilers. Off when absent.
    pub kubernetes: Option<ControllerKubeConfig>,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        let mut volume_types = BTreeMap::new();
        volume_types.insert("default".to_owned(), VolumeTypeConfig::default());
        ControllerConfig {
            endpoint: default_csi_endpoint(),
            operator_listen: None,
            agents: Vec::new(),
            default_volume_type: "default".into(),
            volume_types,
            scheduler: crate::scheduler::SchedulerConfig::default(),
            stats_interval_secs: 10,
            agent_tls: None,
            metrics_listen: None,
            kubernetes: None,
        }
    }
}

impl ControllerConfig {
    /// Rejects impossible combinations.
    pub fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        let mut names = BTreeSet::new();
        for (i, a) in self.agents.iter().enumerate() {
            if a.name.is_empty() {
                return Err(invalid(
                    format!("{prefix}agents[{i}].name"),
                    "must not be empty",
                ));
            }
            if !names.insert(&a.name) {
                return Err(invalid(
                    format!("{prefix}agents[{i}].name"),
                    format!("duplicate agent {:?}", a.name),
                ));
            }
        }
        if self.stats_interval_secs == 0 {
            return Err(invalid(
                format!("{prefix}stats_interval_secs"),
                "must be at least 1",
            ));
        }
        if let Some(tls) = &self.agent_tls {
            tls.validate(&format!("{prefix}agent_tls."))?;
        }
        if let Some(k) = &self.kubernetes {
            k.validate(&format!("{prefix}kubernetes."))?;
        }
        if let Err(e) = self.scheduler.validate() {
            return Err(invalid(format!("{prefix}scheduler"), e.to_string()));
        }
        if !self.volume_types.contains_key(&self.default_volume_type) {
            return Err(invalid(
                format!("{prefix}default_volume_type"),
                format!(
                    "no volume type named {:?} in volume_types",
                    self.default_volume_type
                ),
            ));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// TLS of the agent API

/// Mutual TLS of the agent API (`[tls]` of the agent, `[agent.tls]` of `all`): the agent
/// presents `cert_file` and accepts only clients whose certificate chains to
/// `client_ca_file`. Only `tcp://` listeners: a Unix socket stays plain (its file mode is
/// the access control).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentTlsConfig {
    /// The agent's certificate chain (PEM).
    pub cert_file: PathBuf,
    /// The agent's private key (PEM, PKCS#8, SEC1 or PKCS#1).
    pub key_file: PathBuf,
    /// CA certificate(s) (PEM) that client certificates must chain to; required, so a
    /// client without a certificate is refused.
    pub client_ca_file: PathBuf,
}

impl AgentTlsConfig {
    fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        for (key, path) in [
            ("cert_file", &self.cert_file),
            ("key_file", &self.key_file),
            ("client_ca_file", &self.client_ca_file),
        ] {
            if path.as_os_str().is_empty() {
                return Err(invalid(format!("{prefix}{key}"), "must not be empty"));
            }
        }
        Ok(())
    }
}

/// How a client of the agent API verifies agents and proves who it is (`[agent_tls]` of the
/// controller): used for every `tcp://` agent endpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentClientTlsConfig {
    /// CA certificate(s) (PEM) that agent certificates must chain to.
    pub ca_file: PathBuf,
    /// The client certificate chain (PEM) presented to agents.
    pub cert_file: PathBuf,
    /// The client's private key (PEM).
    pub key_file: PathBuf,
    /// Name checked against the agents' certificates instead of each endpoint's host (for
    /// agents reached by IP with certificates that name a DNS name).
    #[serde(default)]
    pub server_name: Option<String>,
}

impl AgentClientTlsConfig {
    fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        for (key, path) in [
            ("ca_file", &self.ca_file),
            ("cert_file", &self.cert_file),
            ("key_file", &self.key_file),
        ] {
            if path.as_os_str().is_empty() {
                return Err(invalid(format!("{prefix}{key}"), "must not be empty"));
            }
        }
        if self.server_name.as_deref() == Some("") {
            return Err(invalid(format!("{prefix}server_name"), "must not be empty"));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Agent

/// What backs a pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PoolKindConfig {
    /// Sparse files in a directory.
    File,
    /// Plain logical volumes in a volume group.
    LvmThick,
    /// Thin logical volumes in a thin pool.
    LvmThin,
}

/// How a deleted volume's blocks are cleared (Cinder's `volume_clear`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VolumeClear {
    /// Overwrite with zeros before release.
    #[default]
    Zero,
    /// Release without clearing (only safe on thin pools or trusted tenants).
    None,
}

/// One pool served by an agent (Cinder's `enabled_backends` entry).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Pool name, unique on this agent.
    pub name: String,
    /// Backing kind.
    pub kind: PoolKindConfig,
    /// Directory of a `file` pool.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Volume group of an LVM pool.
    #[serde(default)]
    pub vg: Option<String>,
    /// Thin pool LV of an `lvm-thin` pool.
    #[serde(default)]
    pub thin_pool: Option<String>,
    /// Capacity of a `file` pool in bytes (default: the filesystem's size).
    #[serde(default)]
    pub capacity_bytes: Option<u64>,
    /// Availability zone.
    #[serde(default = "default_zone")]
    pub zone: String,
    /// Percentage of capacity kept free, 0..100.
    #[serde(default)]
    pub reserved_percentage: u32,
    /// Thin over-subscription limit, >= 1.0.
    #[serde(default = "default_ratio")]
    pub max_over_subscription_ratio: f64,
    /// Free-form capabilities (e.g. `media = "ssd"`).
    #[serde(default)]
    pub capabilities: BTreeMap<String, String>,
    /// iSCSI portals ("address:port") advertised for exports; default: the agent's portal.
    #[serde(default)]
    pub portals: Vec<String>,
    /// How deleted volumes are cleared.
    #[serde(default)]
    pub volume_clear: VolumeClear,
    /// Copy-on-write size of thick snapshots, as a percentage of the origin (1..100).
    #[serde(default = "default_cow_percent")]
    pub snapshot_cow_percent: u32,
}

fn default_ratio() -> f64 {
    20.0
}

fn default_cow_percent() -> u32 {
    25
}

/// Highest control port tgtd and tgtadm accept (`-C`).
pub const MAX_TGT_CONTROL_PORT: u16 = 32767;

/// tgtd as the agent drives it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TgtConfig {
    /// tgtd control port (`tgtadm -C N`); 0 = tgtd's default.
    pub control_port: u16,
    /// Portal advertised to initiators when a pool names none ("address:port").
    pub portal: String,
}

impl Default for TgtConfig {
    fn default() -> Self {
        TgtConfig {
            control_port: 0,
            portal: "127.0.0.1:3260".into(),
        }
    }
}

/// A secret configuration value (an S3 secret key): never printed by `Debug`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// A secret holding `s`.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The secret text (to hand to the client that needs it, never to a log).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// What a backup repository is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RepositoryKind {
    /// A directory (local disk, NFS mount).
    Posix,
    /// An S3-compatible bucket.
    S3,
}

/// One backup repository (`[[backup_repositories]]`, Cinder's backup driver settings).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupRepositoryConfig {
    /// Name, unique on this agent; backups name the repository they are in.
    pub name: String,
    /// Directory or S3 bucket.
    pub kind: RepositoryKind,
    /// Directory of a `posix` repository.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// S3 endpoint URL (default: AWS for the region), e.g. `http://127.0.0.1:9000`.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// S3 bucket (must exist).
    #[serde(default)]
    pub bucket: Option<String>,
    /// S3 region (default `us-east-1`).
    #[serde(default)]
    pub region: Option<String>,
    /// Key prefix inside the bucket.
    #[serde(default)]
    pub prefix: Option<String>,
    /// S3 access key id.
    #[serde(default)]
    pub access_key_id: Option<String>,
    /// S3 secret access key.
    #[serde(default)]
    pub secret_access_key: Option<Secret>,
    /// Allow a plain `http://` endpoint.
    #[serde(default)]
    pub allow_http: bool,
}

/// Compression of backup objects.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackupCompression {
    /// zstd at `zstd_level`.
    #[default]
    Zstd,
    /// Stored as read.
    None,
}

/// How backups are made (`[backup]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackupConfig {
    /// Chunk size in bytes: the unit that is read, hashed, compressed and stored; a multiple
    /// of 32 KiB between 64 KiB and 64 MiB.
    pub chunk_size: u64,
    /// Chunks being hashed, compressed or written at once (memory use is about
    /// 2 x chunk_size x (max_in_flight + 4) per running backup, plus one chunk per write in
    /// flight to a POSIX repository, its `O_DIRECT` staging buffer).
    pub max_in_flight: usize,
    /// Compression of new chunk objects.
    pub compression: BackupCompression,
    /// zstd level (1..=19).
    pub zstd_level: i32,
    /// Repository used when a request names none (default: the first one listed).
    pub default_repository: Option<String>,
    /// Change tracking on pools that can do it (file pools on XFS or btrfs): a volume keeps
    /// the snapshot its latest backup read, hidden, as a marker, and an incremental backup
    /// reads only the ranges the pool shows changed since it. Costs the space of the blocks
    /// rewritten since the latest backup.
    pub change_tracking: bool,
}

impl Default for BackupConfig {
    fn default() -> Self {
        BackupConfig {
            chunk_size: 4 << 20,
            max_in_flight: 4,
            compression: BackupCompression::Zstd,
            zstd_level: 3,
            default_repository: None,
            change_tracking: true,
        }
    }
}

/// `cinderblock agent`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Agent name, unique in the cluster (default: the host name).
    pub name: String,
    /// Where the agent API listens.
    pub listen: Endpoint,
    /// tgtd settings.
    pub tgt: TgtConfig,
    /// File holding the node-local master key that per-volume CHAP secrets derive from.
    pub chap_key_file: Option<PathBuf>,
    /// Mutual TLS of the agent API (`tcp://` listeners only); plain text when absent.
    pub tls: Option<AgentTlsConfig>,
    /// Where the Prometheus metrics endpoint listens (`GET /metrics`, "address:port");
    /// off when absent.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// How often tgtd's targets are reconciled with the volumes' records, in seconds.
    pub reconcile_interval_secs: u64,
    /// Pools served.
    pub pools: Vec<PoolConfig>,
    /// How backups are made.
    pub backup: BackupConfig,
    /// Where backups are stored.
    pub backup_repositories: Vec<BackupRepositoryConfig>,
    /// Registration of the agent's pools as StoragePool objects (`[kubernetes]`); off when
    /// absent.
    pub kubernetes: Option<AgentKubeConfig>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            name: host_name(),
            listen: default_agent_listen(),
            tgt: TgtConfig::default(),
            chap_key_file: None,
            tls: None,
            metrics_listen: None,
            reconcile_interval_secs: 10,
            pools: Vec::new(),
            backup: BackupConfig::default(),
            backup_repositories: Vec::new(),
            kubernetes: None,
        }
    }
}

impl AgentConfig {
    /// Rejects impossible values, naming the key.
    pub fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        if self.name.is_empty() {
            return Err(invalid(format!("{prefix}name"), "must not be empty"));
        }
        if self.tgt.control_port > MAX_TGT_CONTROL_PORT {
            return Err(invalid(
                format!("{prefix}tgt.control_port"),
                "tgtadm accepts 0..=32767",
            ));
        }
        if let Some(tls) = &self.tls {
            if let Endpoint::Unix(_) = self.listen {
                return Err(invalid(
                    format!("{prefix}tls"),
                    "TLS is served on tcp:// listeners only; a unix socket stays plain",
                ));
            }
            tls.validate(&format!("{prefix}tls."))?;
        }
        if self.reconcile_interval_secs == 0 {
            return Err(invalid(
                format!("{prefix}reconcile_interval_secs"),
                "must be at least 1",
            ));
        }
        if let Some(k) = &self.kubernetes {
            k.validate(&format!("{prefix}kubernetes."), &self.listen)?;
        }
        let mut names = BTreeSet::new();
        for (i, p) in self.pools.iter().enumerate() {
            let key = |k: &str| format!("{prefix}pools[{i}].{k}");
            if !valid_name(&p.name) {
                return Err(invalid(
                    key("name"),
                    "use 1-64 characters of [A-Za-z0-9_.-]",
                ));
            }
            if !names.insert(&p.name) {
                return Err(invalid(key("name"), format!("duplicate pool {:?}", p.name)));
            }
            if p.reserved_percentage > 100 {
                return Err(invalid(
                    key("reserved_percentage"),
                    "must be between 0 and 100",
                ));
            }
            if p.max_over_subscription_ratio.is_nan() || p.max_over_subscription_ratio < 1.0 {
                return Err(invalid(
                    key("max_over_subscription_ratio"),
                    "must be at least 1.0",
                ));
            }
            if !(1..=100).contains(&p.snapshot_cow_percent) {
                return Err(invalid(
                    key("snapshot_cow_percent"),
                    "must be between 1 and 100",
                ));
            }
            if p.zone.is_empty() {
                return Err(invalid(key("zone"), "must not be empty"));
            }
            match p.kind {
                PoolKindConfig::File => {
                    if p.path.is_none() {
                        return Err(invalid(key("path"), "a file pool needs a directory"));
                    }
                }
                PoolKindConfig::LvmThick | PoolKindConfig::LvmThin => {
                    if p.vg.as_deref().is_none_or(|v| !valid_name(v)) {
                        return Err(invalid(key("vg"), "an LVM pool needs a volume group name"));
                    }
                    if p.kind == PoolKindConfig::LvmThin
                        && p.thin_pool.as_deref().is_none_or(|v| !valid_name(v))
                    {
                        return Err(invalid(
                            key("thin_pool"),
                            "an lvm-thin pool needs a thin pool LV name",
                        ));
                    }
                }
            }
        }
        self.validate_backup(prefix)
    }

    fn validate_backup(&self, prefix: &str) -> Result<(), ConfigError> {
        let b = &self.backup;
        if !b.chunk_size.is_multiple_of(32 << 10)
            || !((64 << 10)..=(64 << 20)).contains(&b.chunk_size)
        {
            return Err(invalid(
                format!("{prefix}backup.chunk_size"),
                "must be a multiple of 32 KiB between 64 KiB and 64 MiB",
            ));
        }
        if !(1..=64).contains(&b.max_in_flight) {
            return Err(invalid(
                format!("{prefix}backup.max_in_flight"),
                "must be between 1 and 64",
            ));
        }
        if !(1..=19).contains(&b.zstd_level) {
            return Err(invalid(
                format!("{prefix}backup.zstd_level"),
                "must be between 1 and 19",
            ));
        }
        let mut names = BTreeSet::new();
        for (i, r) in self.backup_repositories.iter().enumerate() {
            let key = |k: &str| format!("{prefix}backup_repositories[{i}].{k}");
            if !valid_name(&r.name) {
                return Err(invalid(
                    key("name"),
                    "use 1-64 characters of [A-Za-z0-9_.-]",
                ));
            }
            if !names.insert(r.name.as_str()) {
                return Err(invalid(
                    key("name"),
                    format!("duplicate repository {:?}", r.name),
                ));
            }
            match r.kind {
                RepositoryKind::Posix => {
                    if r.path.is_none() {
                        return Err(invalid(key("path"), "a posix repository needs a directory"));
                    }
                }
                RepositoryKind::S3 => {
                    if r.bucket.as_deref().is_none_or(str::is_empty) {
                        return Err(invalid(key("bucket"), "an s3 repository needs a bucket"));
                    }
                    if r.access_key_id.is_some() != r.secret_access_key.is_some() {
                        return Err(invalid(
                            key("secret_access_key"),
                            "give access_key_id and secret_access_key together",
                        ));
                    }
                    if let Some(ep) = &r.endpoint {
                        if ep.starts_with("http://") && !r.allow_http {
                            return Err(invalid(
                                key("allow_http"),
                                "the endpoint is plain http://: set allow_http = true",
                            ));
                        }
                    }
                }
            }
        }
        if let Some(d) = &b.default_repository {
            if !names.contains(d.as_str()) {
                return Err(invalid(
                    format!("{prefix}backup.default_repository"),
                    format!("no [[backup_repositories]] entry is named {d:?}"),
                ));
            }
        }
        Ok(())
    }
}

/// Names of pools, VGs and LVs: 1-64 characters of `[A-Za-z0-9_.-]`, not starting with `-`.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

// ---------------------------------------------------------------------------------------
// Node

/// `cinderblock node`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// CSI endpoint (Identity + Node).
    pub endpoint: Endpoint,
    /// This node's name (default: the host name).
    pub node_name: String,
    /// Availability zone of this node.
    pub zone: String,
    /// Where the initiator IQN is read from.
    pub initiator_name_file: PathBuf,
    /// Prefix for host commands, e.g. `["nsenter", "--mount=/proc/1/ns/mnt", "--"]`.
    pub exec_prefix: Vec<String>,
    /// Most volumes attachable to this node (reported by NodeGetInfo).
    pub max_volumes_per_node: u32,
    /// The agents' CHAP master key file: the node derives each volume's CHAP secret from it
    /// (without it, NodeStageVolume needs `chapSecret` in its secrets). In `all`, the agent's
    /// key is used when this is unset.
    pub chap_key_file: Option<PathBuf>,
    /// How long NodeStageVolume waits for a disk after the login (and NodeExpandVolume for
    /// the new size), in seconds.
    pub attach_timeout_secs: u64,
    /// A session to one of our targets that stays out of `LOGGED_IN` this long gets its
    /// connection stopped for recovery (again every as long while it stays down), which gets
    /// iscsid out of a reconnect loop it cannot leave by itself (`node::repair`); 0: never.
    pub session_repair_after_secs: u64,
    /// Where the Prometheus metrics endpoint listens (`GET /metrics`, `GET /healthz`,
    /// "address:port"); off when absent.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            endpoint: default_csi_endpoint(),
            node_name: host_name(),
            zone: default_zone(),
            initiator_name_file: PathBuf::from("/etc/iscsi/initiatorname.iscsi"),
            exec_prefix: Vec::new(),
            max_volumes_per_node: 64,
            chap_key_file: None,
            attach_timeout_secs: 30,
            session_repair_after_secs: 30,
            metrics_listen: None,
        }
    }
}

impl NodeConfig {
    /// Rejects impossible values, naming the key.
    pub fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        if self.node_name.is_empty() {
            return Err(invalid(format!("{prefix}node_name"), "must not be empty"));
        }
        if self.zone.is_empty() {
            return Err(invalid(format!("{prefix}zone"), "must not be empty"));
        }
        if self.max_volumes_per_node == 0 {
            return Err(invalid(
                format!("{prefix}max_volumes_per_node"),
                "must be at least 1",
            ));
        }
        if self.attach_timeout_secs == 0 {
            return Err(invalid(
                format!("{prefix}attach_timeout_secs"),
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// All in one

/// `cinderblock all`: controller, agent and node in one process on one host.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AllConfig {
    /// CSI endpoint serving Identity, Controller and Node.
    pub endpoint: Option<Endpoint>,
    /// Controller section (its `endpoint` is ignored: `endpoint` above is used).
    pub controller: ControllerConfig,
    /// Agent section.
    pub agent: AgentConfig,
    /// Node section (its `endpoint` is ignored).
    pub node: NodeConfig,
}

impl AllConfig {
    /// Validates every section.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.controller.validate("controller.")?;
        self.agent.validate("agent.")?;
        // With no agents listed, the controller dials the agent of this process.
        if self.agent.tls.is_some()
            && self.controller.agents.is_empty()
            && self.controller.agent_tls.is_none()
        {
            return Err(invalid(
                "controller.agent_tls",
                "the agent serves TLS ([agent.tls]): the controller needs a CA and a client certificate to reach it",
            ));
        }
        self.node.validate("node.")
    }
}

// ---------------------------------------------------------------------------------------
// Kubernetes

/// The agent's `[kubernetes]`: one StoragePool per pool, heartbeated.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentKubeConfig {
    /// A kubeconfig file; absent: `$KUBECONFIG` or `~/.kube/config` when present, else
    /// in-cluster (the pod's service account).
    pub kubeconfig: Option<PathBuf>,
    /// The Kubernetes node the agent runs on (recorded in each StoragePool); default:
    /// `$NODE_NAME` when set.
    pub node_name: Option<String>,
    /// The agent API endpoint the controller dials (default: `listen`; required when
    /// `listen` is a wildcard address such as `0.0.0.0`).
    pub advertise_endpoint: Option<Endpoint>,
    /// Seconds between two heartbeats (status writes).
    pub heartbeat_interval_secs: u64,
}

impl Default for AgentKubeConfig {
    fn default() -> Self {
        AgentKubeConfig {
            kubeconfig: None,
            node_name: None,
            advertise_endpoint: None,
            heartbeat_interval_secs: 10,
        }
    }
}

impl AgentKubeConfig {
    fn validate(&self, prefix: &str, listen: &Endpoint) -> Result<(), ConfigError> {
        if self.heartbeat_interval_secs == 0 {
            return Err(invalid(
                format!("{prefix}heartbeat_interval_secs"),
                "must be at least 1",
            ));
        }
        let wildcard = matches!(listen, Endpoint::Tcp(a) if a.starts_with("0.0.0.0:") || a.starts_with("[::]:"));
        if self.advertise_endpoint.is_none() && wildcard {
            return Err(invalid(
                format!("{prefix}advertise_endpoint"),
                format!(
                    "`listen` is the wildcard {listen}: say which address the controller dials"
                ),
            ));
        }
        Ok(())
    }

    /// The endpoint advertised in StoragePools.
    pub fn advertised(&self, listen: &Endpoint) -> Endpoint {
        self.advertise_endpoint
            .clone()
            .unwrap_or_else(|| listen.clone())
    }
}

/// Leader election of controller replicas through a `coordination.k8s.io/v1` Lease.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeaderElectionConfig {
    /// Elect a leader; off: this replica always leads (one replica only!).
    pub enabled: bool,
    /// The Lease's name.
    pub lease_name: String,
    /// The Lease's namespace; default: `$POD_NAMESPACE`, else `default`.
    pub namespace: Option<String>,
    /// This replica's identity; default: `$POD_NAME`, else the host name.
    pub identity: Option<String>,
    /// How long a Lease holds without renewal before another replica may take it.
    pub lease_duration_secs: u64,
    /// How long the leader keeps trying to renew before it steps down (less than the lease
    /// duration, so it stops before anyone else can start).
    pub renew_deadline_secs: u64,
    /// Seconds between two attempts to acquire or renew.
    pub retry_period_secs: u64,
}

impl Default for LeaderElectionConfig {
    fn default() -> Self {
        LeaderElectionConfig {
            enabled: true,
            lease_name: "cinderblock-controller".into(),
            namespace: None,
            identity: None,
            lease_duration_secs: 15,
            renew_deadline_secs: 10,
            retry_period_secs: 2,
        }
    }
}

/// The controller's `[kubernetes]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControllerKubeConfig {
    /// A kubeconfig file; absent: `$KUBECONFIG` or `~/.kube/config` when present, else
    /// in-cluster (the pod's service account).
    pub kubeconfig: Option<PathBuf>,
    /// Add the agents of StoragePools with a fresh heartbeat to the static `agents`.
    pub discover_agents: bool,
    /// Seconds between two listings of the StoragePools.
    pub discovery_interval_secs: u64,
    /// A StoragePool whose heartbeat is older than this many seconds is ignored.
    pub pool_stale_after_secs: u64,
    /// Run the VolumeBackup and VolumeRestore reconcilers (on the leader).
    pub backups: bool,
    /// `[kubernetes.leader_election]`.
    pub leader_election: LeaderElectionConfig,
}

impl Default for ControllerKubeConfig {
    fn default() -> Self {
        ControllerKubeConfig {
            kubeconfig: None,
            discover_agents: true,
            discovery_interval_secs: 10,
            pool_stale_after_secs: 60,
            backups: true,
            leader_election: LeaderElectionConfig::default(),
        }
    }
}

impl ControllerKubeConfig {
    fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        for (key, v) in [
            ("discovery_interval_secs", self.discovery_interval_secs),
            ("pool_stale_after_secs", self.pool_stale_after_secs),
        ] {
            if v == 0 {
                return Err(invalid(format!("{prefix}{key}"), "must be at least 1"));
            }
        }
        let le = &self.leader_election;
        let key = |k: &str| format!("{prefix}leader_election.{k}");
        if le.lease_name.is_empty() {
            return Err(invalid(key("lease_name"), "must not be empty"));
        }
        if le.retry_period_secs == 0 {
            return Err(invalid(key("retry_period_secs"), "must be at least 1"));
        }
        if le.renew_deadline_secs <= le.retry_period_secs {
            return Err(invalid(
                key("renew_deadline_secs"),
                "must be greater than retry_period_secs",
            ));
        }
        if le.lease_duration_secs <= le.renew_deadline_secs {
            return Err(invalid(
                key("lease_duration_secs"),
                "must be greater than renew_deadline_secs (a leader must stop before its lease can be taken)",
            ));
        }
        Ok(())
    }
}

/// The host name from the kernel, or `localhost`.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str<T: for<'de> Deserialize<'de>>(text: &str) -> Result<T, ConfigError> {
        parse(Path::new("t.toml"), text)
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let err = parse_str::<AgentConfig>("name = \"a\"\nbogus_key = 1\n").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("t.toml:2: unknown field `bogus_key`"),
            "{msg}"
        );
        assert!(!msg.contains('\n'), "one line: {msg}");
    }

    #[test]
    fn nested_unknown_key() {
        let text =
            "[[pools]]\nname = \"p\"\nkind = \"file\"\npath = \"/x\"\nreserverd_percentage = 5\n";
        let msg = parse_str::<AgentConfig>(text).unwrap_err().to_string();
        assert!(
            msg.starts_with("t.toml:5: unknown field `reserverd_percentage`"),
            "{msg}"
        );
    }

    #[test]
    fn bad_endpoint_value() {
        let msg = parse_str::<NodeConfig>("endpoint = \"http://x\"\n")
            .unwrap_err()
            .to_string();
        assert!(msg.starts_with("t.toml:1: invalid endpoint"), "{msg}");
    }

    #[test]
    fn impossible_values_name_the_key() {
        let base = "[[pools]]\nname = \"p\"\nkind = \"file\"\npath = \"/x\"\n";
        let cases = [
            ("reserved_percentage = 150", "pools[0].reserved_percentage"),
            (
                "max_over_subscription_ratio = 0.5",
                "pools[0].max_over_subscription_ratio",
            ),
            ("snapshot_cow_percent = 0", "pools[0].snapshot_cow_percent"),
            ("zone = \"\"", "pools[0].zone"),
        ];
        for (line, key) in cases {
            let cfg: AgentConfig = parse_str(&format!("{base}{line}\n")).unwrap();
            match cfg.validate("") {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{line}"),
                other => panic!("{line}: {other:?}"),
            }
        }
        let cfg: AgentConfig =
            parse_str("[[pools]]\nname = \"p\"\nkind = \"lvm-thin\"\nvg = \"vg0\"\n").unwrap();
        match cfg.validate("agent.") {
            Err(ConfigError::Invalid { key, .. }) => assert_eq!(key, "agent.pools[0].thin_pool"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn backup_sections_parse_and_impossible_values_name_the_key() {
        let good = r#"
[backup]
chunk_size = 1048576
max_in_flight = 8
compression = "none"
zstd_level = 5
default_repository = "s3"

[[backup_repositories]]
name = "local"
kind = "posix"
path = "/srv/backups"

[[backup_repositories]]
name = "s3"
kind = "s3"
endpoint = "http://127.0.0.1:9000"
bucket = "b"
access_key_id = "id"
secret_access_key = "very-secret"
allow_http = true
"#;
        let cfg: AgentConfig = parse_str(good).unwrap();
        cfg.validate("").unwrap();
        assert_eq!(cfg.backup.compression, BackupCompression::None);
        assert_eq!(cfg.backup_repositories[1].kind, RepositoryKind::S3);
        let debug = format!("{cfg:?}");
        assert!(!debug.contains("very-secret"), "{debug}");
        assert_eq!(
            cfg.backup_repositories[1]
                .secret_access_key
                .as_ref()
                .map(Secret::expose),
            Some("very-secret")
        );
        let cases = [
            ("[backup]\nchunk_size = 100000\n", "backup.chunk_size"),
            ("[backup]\nchunk_size = 32768\n", "backup.chunk_size"),
            ("[backup]\nmax_in_flight = 0\n", "backup.max_in_flight"),
            ("[backup]\nzstd_level = 30\n", "backup.zstd_level"),
            (
                "[backup]\ndefault_repository = \"nope\"\n",
                "backup.default_repository",
            ),
            (
                "[[backup_repositories]]\nname = \"r\"\nkind = \"posix\"\n",
                "backup_repositories[0].path",
            ),
            (
                "[[backup_repositories]]\nname = \"r\"\nkind = \"s3\"\n",
                "backup_repositories[0].bucket",
            ),
            (
                "[[backup_repositories]]\nname = \"r\"\nkind = \"s3\"\nbucket = \"b\"\nendpoint = \"http://x\"\n",
                "backup_repositories[0].allow_http",
            ),
            (
                "[[backup_repositories]]\nname = \"r\"\nkind = \"s3\"\nbucket = \"b\"\naccess_key_id = \"a\"\n",
                "backup_repositories[0].secret_access_key",
            ),
            (
                "[[backup_repositories]]\nname = \"r\"\nkind = \"posix\"\npath = \"/a\"\n[[backup_repositories]]\nname = \"r\"\nkind = \"posix\"\npath = \"/b\"\n",
                "backup_repositories[1].name",
            ),
        ];
        for (text, key) in cases {
            let cfg: AgentConfig = parse_str(text).unwrap();
            match cfg.validate("") {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn defaults_are_valid() {
        AllConfig::default().validate().unwrap();
        let ctl = ControllerConfig::default();
        assert_eq!(ctl.default_volume_type, "default");
    }

    #[test]
    fn controller_scheduler_and_stats_interval() {
        let cfg: ControllerConfig = parse_str(
            "stats_interval_secs = 2\n[scheduler]\nmax_attempts = 5\n[[scheduler.weighers]]\nname = \"CapacityWeigher\"\nmultiplier = -1.0\n",
        )
        .unwrap();
        assert_eq!(
            (
                cfg.stats_interval_secs,
                cfg.scheduler.max_attempts,
                cfg.scheduler.weighers.len()
            ),
            (2, 5, 1)
        );
        for (text, key) in [
            ("[scheduler]\nmax_attempts = 0\n", "scheduler"),
            ("stats_interval_secs = 0\n", "stats_interval_secs"),
        ] {
            let cfg: ControllerConfig = parse_str(text).unwrap();
            match cfg.validate("controller.") {
                Err(ConfigError::Invalid { key: k, .. }) => {
                    assert_eq!(k, format!("controller.{key}"))
                }
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn tls_metrics_and_interval() {
        let cfg: AgentConfig = parse_str(
            "listen = \"tcp://0.0.0.0:9700\"\nmetrics_listen = \"127.0.0.1:9701\"\n\
             reconcile_interval_secs = 1\n\
             [tls]\ncert_file = \"/c.pem\"\nkey_file = \"/k.pem\"\nclient_ca_file = \"/ca.pem\"\n",
        )
        .unwrap();
        cfg.validate("").unwrap();
        assert_eq!(
            (
                cfg.metrics_listen.map(|a| a.to_string()),
                cfg.reconcile_interval_secs,
                cfg.tls.map(|t| t.client_ca_file)
            ),
            (
                Some("127.0.0.1:9701".to_owned()),
                1,
                Some(PathBuf::from("/ca.pem"))
            )
        );

        let msg = parse_str::<AgentConfig>("metrics_listen = \"localhost\"\n")
            .unwrap_err()
            .to_string();
        assert!(msg.starts_with("t.toml:1: invalid socket address"), "{msg}");
        let msg = parse_str::<AgentConfig>("[tls]\ncert_file = \"/c.pem\"\n")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("missing field `key_file`"), "{msg}");

        let tls = "[tls]\ncert_file = \"/c\"\nkey_file = \"/k\"\nclient_ca_file = \"/ca\"\n";
        let cases = [
            (
                format!("listen = \"unix:///run/a.sock\"\n{tls}"),
                "agent.tls",
            ),
            (
                "[tls]\ncert_file = \"\"\nkey_file = \"/k\"\nclient_ca_file = \"/ca\"\n".into(),
                "agent.tls.cert_file",
            ),
            (
                "reconcile_interval_secs = 0\n".into(),
                "agent.reconcile_interval_secs",
            ),
        ];
        for (text, key) in cases {
            let cfg: AgentConfig = parse_str(&text).unwrap();
            match cfg.validate("agent.") {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn controller_agent_tls() {
        let text = "[agent_tls]\nca_file = \"/ca\"\ncert_file = \"/c\"\nkey_file = \"/k\"\n";
        let cfg: ControllerConfig = parse_str(text).unwrap();
        cfg.validate("").unwrap();
        assert_eq!(cfg.agent_tls.map(|t| t.server_name), Some(None));
        let cfg: ControllerConfig = parse_str(&format!("{text}server_name = \"\"\n")).unwrap();
        match cfg.validate("controller.") {
            Err(ConfigError::Invalid { key, .. }) => {
                assert_eq!(key, "controller.agent_tls.server_name")
            }
            other => panic!("{other:?}"),
        }

        // `all` with a TLS agent and no agents listed: the controller dials that agent and
        // needs credentials for it.
        let all = "[agent]\nlisten = \"tcp://127.0.0.1:9700\"\n\
                   [agent.tls]\ncert_file = \"/c\"\nkey_file = \"/k\"\nclient_ca_file = \"/ca\"\n";
        let cfg: AllConfig = parse_str(all).unwrap();
        match cfg.validate() {
            Err(ConfigError::Invalid { key, .. }) => assert_eq!(key, "controller.agent_tls"),
            other => panic!("{other:?}"),
        }
        let cfg: AllConfig = parse_str(&format!(
            "{all}[controller.agent_tls]\nca_file = \"/ca\"\ncert_file = \"/c\"\nkey_file = \"/k\"\n"
        ))
        .unwrap();
        cfg.validate().unwrap();
    }

    #[test]
    fn missing_default_type_rejected() {
        let cfg: ControllerConfig = parse_str("default_volume_type = \"gold\"\n").unwrap();
        match cfg.validate("") {
            Err(ConfigError::Invalid { key, .. }) => assert_eq!(key, "default_volume_type"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn names() {
        for ok in ["pool1", "a.b_c-d", "X"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "-x", "a b", "a;b", "a/b", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
