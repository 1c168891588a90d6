//! The controller's domain: OpenStack Cinder's API and scheduler behind the CSI Controller
//! service. It places volumes with [`crate::scheduler`], drives the storage agents through the
//! [`StorageAgent`] seam and applies Cinder's and CSI's rules.
//!
//! # No database
//!
//! Ids are derived from CSI names ([`model::volume_id_for`]), and what a CreateVolume asked
//! for is stored with the volume on its agent ([`model::meta`]). The routing index (which agent
//! and pool holds which volume or snapshot) is rebuilt from every agent's lists at start
//! ([`Controller::sync_all`]) and kept current by each operation; pool statistics are
//! refreshed periodically ([`Controller::refresh_pools`]) and charged in memory at each
//! placement so a burst spreads. Until every agent has been listed once, operations that
//! would have to conclude "no such volume" answer UNAVAILABLE instead of guessing.
//!
//! # Concurrency
//!
//! A per-volume and per-snapshot guard ([`guard`]) answers ABORTED to a second concurrent
//! call on the same object; since a volume's id is derived from its name, that is also the
//! per-name guard. The one lock ([`Controller::state`]) is never held across `.await`.

mod agents;
mod backups;
pub mod guard;
mod inventory;
pub mod model;
mod publish;
mod snapshots;
pub mod status;
#[cfg(test)]
mod tests;
mod volumes;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::agent::{SnapshotId, VolumeId};
use crate::agent_rpc::client::{
    AgentClientError, AgentErrorKind, PoolStats, SnapshotInfo, StorageAgent, VolumeInfo,
};
use crate::scheduler::{
    PoolRef, PoolSet, PoolState, Provisioning, Request, Scheduler, SchedulerConfig, SchedulerError,
};
use crate::types::Bytes;

pub use agents::{AgentMap, AgentSet};
pub use backups::{
    backup_id_for, is_backup_id, merge as merge_backups, new_backup_id, BackupEntry, BackupRequest,
    NewRestoreVolume, ProgressStream, RestoreTarget, SnapshotKind, Started, BACKUP_ID_PREFIX,
};
pub use guard::{Guards, Operation};
pub use inventory::*;
pub use model::*;
pub use status::{snapshot_status, volume_status, CinderStatus, SnapshotStatus, StatusInputs};

/// Everything that can go wrong in the controller. The one mapping to gRPC codes is
/// `crate::csi::status`.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// A required field is missing or malformed, or a parameter is unknown.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A requested capability is not served (filesystem, access mode, multi-attach).
    #[error("unsupported capability: {0}")]
    UnsupportedCapability(String),
    /// The `type` parameter names no configured volume type.
    #[error("unknown volume type {0:?}")]
    UnknownVolumeType(String),
    /// No such volume.
    #[error("volume {0} not found")]
    VolumeNotFound(String),
    /// No such snapshot.
    #[error("snapshot {0} not found")]
    SnapshotNotFound(String),
    /// No agent reports this backup.
    #[error("backup {0} not found")]
    BackupNotFound(String),
    /// A volume or backup is not in the status an operation needs.
    #[error("{what} is {status}; it must be {needed}")]
    WrongStatus {
        /// `volume <id>` or `backup <id>`.
        what: String,
        /// Its status.
        status: String,
        /// The status needed.
        needed: &'static str,
    },
    /// No (suitable) agent has the backup repository.
    #[error("no agent that could serve this has backup repository {0}")]
    RepositoryUnavailable(String),
    /// The content source of a new volume does not exist.
    #[error("content source {0} not found")]
    SourceNotFound(String),
    /// The node id names no node (malformed ids included: such a node cannot exist).
    #[error("node {0:?} not found (node ids are <host>/<initiator iqn>)")]
    NodeNotFound(String),
    /// A volume or snapshot of this name exists with other parameters.
    #[error("{what} {name:?} already exists but is incompatible: {reason}")]
    AlreadyExists {
        /// `volume` or `snapshot`.
        what: &'static str,
        /// The CSI name.
        name: String,
        /// What differs.
        reason: String,
    },
    /// The capacity range cannot be met (limit below required, rounding, source size).
    #[error("capacity out of range: {0}")]
    OutOfRange(String),
    /// The scheduler found no pool (each pool's reason is in the source).
    #[error("{source}{}", .last_failure.as_ref().map(|f| format!(" (last attempt: {f})")).unwrap_or_default())]
    NoValidPool {
        /// The scheduler's answer with every pool's reason.
        #[source]
        source: SchedulerError,
        /// The agent failure of the previous attempt, after a reschedule.
        last_failure: Option<String>,
    },
    /// Cinder's rule: a volume with snapshots cannot be deleted or migrated.
    #[error("volume {id} has {count} snapshot(s)")]
    HasSnapshots {
        /// The volume.
        id: VolumeId,
        /// How many.
        count: u32,
    },
    /// Cinder's rule: a published (in-use) volume cannot be deleted or migrated.
    #[error("volume {id} is published to {nodes:?}")]
    Published {
        /// The volume.
        id: VolumeId,
        /// Where.
        nodes: Vec<String>,
    },
    /// A single-node volume is already published to another node.
    #[error("volume {id} is published to {other} with a single-node access mode")]
    PublishedElsewhere {
        /// The volume.
        id: VolumeId,
        /// The other node.
        other: String,
    },
    /// Another operation on the same volume or snapshot is in progress.
    #[error("an operation on {0} is already in progress")]
    Busy(String),
    /// A list's starting token is not one this controller handed out.
    #[error("invalid starting token {0:?}")]
    BadToken(String),
    /// The index is incomplete: some agents have not answered since the controller started.
    #[error("agents {0:?} have not been listed yet, so the answer is not known")]
    IndexIncomplete(Vec<String>),
    /// An agent call failed.
    #[error("agent {agent}: {op}: {source}")]
    Agent {
        /// The agent.
        agent: String,
        /// What was being done.
        op: &'static str,
        /// The agent's answer.
        #[source]
        source: AgentClientError,
    },
    /// The controller's own state is inconsistent (a bug, or a configuration problem).
    #[error("internal error: {0}")]
    Internal(String),
}

impl ControllerError {
    fn agent(agent: &str, op: &'static str) -> impl FnOnce(AgentClientError) -> Self {
        let agent = agent.to_owned();
        move |source| ControllerError::Agent { agent, op, source }
    }
}

/// How long the last pool figures of an agent that answers too slowly (but does answer the
/// network) still stand. Older, its pools are marked unhealthy like an unreachable agent's.
pub const STATS_STALE_AFTER: Duration = Duration::from_secs(300);

/// Default size of a volume whose request names none.
pub const DEFAULT_VOLUME_SIZE: Bytes = Bytes::gib(1);

/// The controller's configuration, in domain terms.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// Filters, weighers, attempts.
    pub scheduler: SchedulerConfig,
    /// Volume types by name.
    pub volume_types: BTreeMap<String, VolumeType>,
    /// Type used when a request names none.
    pub default_volume_type: String,
}

impl Settings {
    /// Settings from the controller's configuration file.
    pub fn from_config(cfg: &crate::config::ControllerConfig) -> Self {
        Settings {
            scheduler: cfg.scheduler.clone(),
            volume_types: cfg
                .volume_types
                .iter()
                .map(|(name, t)| {
                    (
                        name.clone(),
                        VolumeType {
                            name: name.clone(),
                            description: t.description.clone(),
                            extra_specs: t.extra_specs.clone(),
                        },
                    )
                })
                .collect(),
            default_volume_type: cfg.default_volume_type.clone(),
        }
    }
}

/// Where the index says a volume is, and what the agent last said about it.
#[derive(Clone, Debug, PartialEq)]
pub struct VolumeEntry {
    /// Agent name.
    pub agent: String,
    /// The agent's last answer.
    pub info: VolumeInfo,
}

/// Where a snapshot is.
#[derive(Clone, Debug, PartialEq)]
pub struct SnapshotEntry {
    /// Agent name.
    pub agent: String,
    /// The agent's last answer.
    pub info: SnapshotInfo,
}

/// A placement charged in memory while its create is in flight (re-applied after a refresh).
#[derive(Clone, Debug, PartialEq)]
struct Charge {
    pool: PoolRef,
    size: Bytes,
    provisioning: Provisioning,
    /// When the agent answered the create; `None` while it is in flight. A report asked for
    /// before that moment may not include the volume yet.
    settled_at: Option<Instant>,
}

/// Everything behind [`Controller::state`].
#[derive(Debug, Default)]
struct State {
    volumes: BTreeMap<VolumeId, VolumeEntry>,
    snapshots: BTreeMap<SnapshotId, SnapshotEntry>,
    /// Agents listed at least once since start.
    synced: BTreeSet<String>,
    pools: PoolSet,
    /// Portals of each pool.
    portals: BTreeMap<PoolRef, Vec<String>>,
    /// Why a pool is unhealthy (agent unreachable, pool unreadable).
    unhealthy: BTreeMap<PoolRef, String>,
    /// Each pool's last report as its agent sent it (kind, snapshot count, ...: what the
    /// scheduler's [`PoolState`] leaves out).
    reports: BTreeMap<PoolRef, PoolStats>,
    /// When each agent last answered ListPools.
    reported_at: BTreeMap<String, Instant>,
    pending: BTreeMap<VolumeId, Charge>,
}

/// The controller.
#[derive(Debug)]
pub struct Controller {
    agents: AgentSet,
    scheduler: Scheduler,
    settings: Settings,
    // Protects the routing index and the pool statistics; held only for in-memory updates,
    // never across `.await`.
    state: Mutex<State>,
    guards: Guards,
}

fn pool_state(agent: &str, p: &PoolStats) -> PoolState {
    let mut s = PoolState::new(PoolRef::new(agent, &p.name), &p.zone, Bytes(0));
    s.total = p.total;
    s.free = p.free;
    s.provisioned = p.provisioned;
    s.allocated = p.allocated;
    s.thin_provisioning = p.thin_provisioning;
    s.thick_provisioning = p.thick_provisioning;
    s.reserved_percentage = p.reserved_percentage;
    s.max_over_subscription_ratio = p.max_over_subscription_ratio;
    s.capabilities = p.capabilities.clone();
    s.volume_count = p.volume_count;
    s.extent = p.extent;
    s.healthy = p.healthy;
    s
}

/// True for agent failures after which another pool may succeed.
fn worth_rescheduling(kind: AgentErrorKind) -> bool {
    match kind {
        AgentErrorKind::ResourceExhausted
        | AgentErrorKind::Unavailable
        | AgentErrorKind::DeadlineExceeded
        | AgentErrorKind::Internal
        | AgentErrorKind::Unknown => true,
        AgentErrorKind::InvalidArgument
        | AgentErrorKind::NotFound
        | AgentErrorKind::AlreadyExists
        | AgentErrorKind::FailedPrecondition
        | AgentErrorKind::OutOfRange
        | AgentErrorKind::DataLoss
        | AgentErrorKind::Aborted => false,
    }
}

impl Controller {
    /// A controller over `agents`. Fails when the scheduler configuration or a volume type's
    /// extra specs are invalid (checked once here rather than on every request).
    pub fn new(
        settings: Settings,
        agents: Vec<Arc<dyn StorageAgent>>,
    ) -> Result<Self, ControllerError> {
        let scheduler = Scheduler::new(settings.scheduler.clone())
            .map_err(|e| ControllerError::Internal(e.to_string()))?;
        if !settings
            .volume_types
            .contains_key(&settings.default_volume_type)
        {
            return Err(ControllerError::UnknownVolumeType(
                settings.default_volume_type.clone(),
            ));
        }
        for t in settings.volume_types.values() {
            // Extra specs are parsed before any pool is looked at, so an empty set tells.
            let mut probe = Request::new(Bytes(1));
            probe.extra_specs = t.extra_specs.clone();
            if let Err(e @ SchedulerError::InvalidExtraSpec { .. }) =
                scheduler.schedule(&PoolSet::new(), &probe)
            {
                return Err(ControllerError::Internal(format!(
                    "volume type {:?}: {e}",
                    t.name
                )));
            }
        }
        Ok(Controller {
            agents: AgentSet::new(agents),
            scheduler,
            settings,
            state: Mutex::new(State::default()),
            guards: Guards::default(),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn agent(&self, name: &str) -> Result<Arc<dyn StorageAgent>, ControllerError> {
        self.agents
            .get(name)
            .ok_or_else(|| ControllerError::Internal(format!("agent {name:?} is not configured")))
    }

    /// Adds an agent found after start (a Kubernetes StoragePool), or replaces the agent of
    /// the same name when its endpoint changed. It is listed at the next refresh.
    pub fn add_agent(&self, agent: Arc<dyn StorageAgent>) {
        let name = agent.name().to_owned();
        self.agents.insert(agent);
        // Listed again from the new client before its volumes are trusted.
        self.state().synced.remove(&name);
    }

    /// Drops an agent that was never listed (a discovered agent that stopped heartbeating
    /// before it answered): no volume is routed to it, and while it stays unlisted every
    /// create and list waits for it with UNAVAILABLE. An agent listed once stays: its volumes
    /// are routed to it, and its pools turn unhealthy while it is silent. Whether it was
    /// dropped.
    pub fn forget_unlisted_agent(&self, name: &str) -> bool {
        // Held while removing, so a listing that completes meanwhile cannot interleave.
        let st = self.state();
        !st.synced.contains(name) && self.agents.remove(name)
    }

    /// The names of the agents the controller reaches now.
    pub fn agent_names(&self) -> Vec<String> {
        self.agents.snapshot().keys().cloned().collect()
    }

    /// The volume type called `name` (`None`: the default type).
    pub fn volume_type(&self, name: Option<&str>) -> Result<&VolumeType, ControllerError> {
        let name = name.unwrap_or(&self.settings.default_volume_type);
        self.settings
            .volume_types
            .get(name)
            .ok_or_else(|| ControllerError::UnknownVolumeType(name.to_owned()))
    }

    /// Every configured volume type.
    pub fn volume_types(&self) -> Vec<VolumeType> {
        self.settings.volume_types.values().cloned().collect()
    }

    /// The default volume type's name.
    pub fn default_volume_type(&self) -> &str {
        &self.settings.default_volume_type
    }

    /// The volume type of a stored volume; an unknown (since removed) type has no extra specs.
    fn stored_type(&self, name: &str) -> VolumeType {
        self.settings
            .volume_types
            .get(name)
            .cloned()
            .unwrap_or_else(|| VolumeType {
                name: name.to_owned(),
                description: String::new(),
                extra_specs: BTreeMap::new(),
            })
    }

    /// Lists one agent's pools, volumes and snapshots into the index.
    pub async fn sync_agent(&self, name: &str) -> Result<(), ControllerError> {
        let agent = self.agent(name)?;
        let asked = Instant::now();
        let pools = agent
            .list_pools()
            .await
            .map_err(ControllerError::agent(name, "ListPools"))?;
        let volumes = agent
            .list_volumes()
            .await
            .map_err(ControllerError::agent(name, "ListVolumes"))?;
        let snapshots = agent
            .list_snapshots()
            .await
            .map_err(ControllerError::agent(name, "ListSnapshots"))?;
        let mut st = self.state();
        self.apply_pools(&mut st, name, Ok(pools), asked);
        st.volumes.retain(|_, e| e.agent != name);
        st.snapshots.retain(|_, e| e.agent != name);
        for info in volumes {
            let migrating = |i: &VolumeInfo| i.metadata.contains_key(meta::MIGRATION);
            match st.volumes.get(&info.id) {
                // The same id on two agents: a retype migration was interrupted. The source
                // (no migration mark) stays authoritative until the migration finishes.
                Some(existing) if migrating(&info) || !migrating(&existing.info) => {
                    tracing::warn!(volume = %info.id, agent = name, kept = %existing.agent,
                        "volume id found on two agents; keeping the migration source");
                    continue;
                }
                Some(_) | None => {}
            }
            st.volumes.insert(
                info.id.clone(),
                VolumeEntry {
                    agent: name.to_owned(),
                    info,
                },
            );
        }
        for info in snapshots {
            st.snapshots.insert(
                info.id.clone(),
                SnapshotEntry {
                    agent: name.to_owned(),
                    info,
                },
            );
        }
        st.synced.insert(name.to_owned());
        Ok(())
    }

    /// Syncs every agent; returns the failures (the controller keeps serving without them).
    pub async fn sync_all(&self) -> Vec<ControllerError> {
        let mut failures = Vec::new();
        for name in self.agents.snapshot().keys() {
            if let Err(e) = self.sync_agent(name).await {
                tracing::warn!(agent = %name, error = %e, "cannot list agent");
                failures.push(e);
            }
        }
        failures
    }

    /// Syncs the agents never listed yet; fails if some still do not answer.
    async fn ensure_index_complete(&self) -> Result<(), ControllerError> {
        let missing: Vec<String> = {
            let st = self.state();
            self.agents
                .snapshot()
                .keys()
                .filter(|a| !st.synced.contains(*a))
                .cloned()
                .collect()
        };
        let mut still = Vec::new();
        for name in missing {
            if self.sync_agent(&name).await.is_err() {
                still.push(name);
            }
        }
        if still.is_empty() {
            Ok(())
        } else {
            Err(ControllerError::IndexIncomplete(still))
        }
    }

    /// Refreshes pool statistics from every agent, all asked at once so that one slow agent
    /// delays nobody else's figures. An agent that cannot be reached has its pools marked
    /// unhealthy (the scheduler then skips them) until it answers again; one that is only slow
    /// keeps its last figures until they are [`STATS_STALE_AFTER`] old.
    pub async fn refresh_pools(&self) {
        let agents = self.agents.snapshot();
        let asked = Instant::now();
        let answers = futures::future::join_all(
            agents
                .iter()
                .map(|(name, agent)| async move { (name, agent.list_pools().await) }),
        )
        .await;
        for (name, answer) in answers {
            if let Err(e) = &answer {
                tracing::warn!(agent = %name, error = %e, "pool statistics unavailable");
            }
            let synced = {
                let mut st = self.state();
                self.apply_pools(&mut st, name, answer, asked);
                st.synced.contains(name)
            };
            if !synced {
                if let Err(e) = self.sync_agent(name).await {
                    tracing::debug!(agent = %name, error = %e, "agent not listed yet");
                }
            }
        }
    }

    fn apply_pools(
        &self,
        st: &mut State,
        agent: &str,
        answer: Result<Vec<PoolStats>, AgentClientError>,
        asked: Instant,
    ) {
        match answer {
            Ok(pools) => {
                let listed: BTreeSet<PoolRef> =
                    pools.iter().map(|p| PoolRef::new(agent, &p.name)).collect();
                let gone: Vec<PoolRef> = st
                    .pools
                    .iter()
                    .filter(|p| p.id.agent == agent && !listed.contains(&p.id))
                    .map(|p| p.id.clone())
                    .collect();
                for id in gone {
                    st.pools.remove(&id);
                    st.portals.remove(&id);
                    st.unhealthy.remove(&id);
                    st.reports.remove(&id);
                }
                st.reported_at.insert(agent.to_owned(), Instant::now());
                for p in &pools {
                    let state = pool_state(agent, p);
                    let id = state.id.clone();
                    if p.healthy {
                        st.unhealthy.remove(&id);
                    } else {
                        st.unhealthy.insert(id.clone(), p.unhealthy_reason.clone());
                    }
                    st.portals.insert(id.clone(), p.portals.clone());
                    st.reports.insert(id, p.clone());
                    st.pools.upsert(state);
                }
                // Placements still in flight, or answered after this report was asked for,
                // may not be in the agent's figures yet: charge them again. Those answered
                // before it are in the figures and are done with.
                st.pending.retain(|_, c| {
                    c.pool.agent != agent || c.settled_at.is_none_or(|t| t >= asked)
                });
                let pending: Vec<Charge> = st
                    .pending
                    .values()
                    .filter(|c| c.pool.agent == agent)
                    .cloned()
                    .collect();
                for c in pending {
                    if let Some(p) = st.pools.as_slice().iter().position(|p| p.id == c.pool) {
                        let mut state = st.pools.as_slice()[p].clone();
                        state.consume(c.size, c.provisioning);
                        st.pools.upsert(state);
                    }
                }
            }
            Err(e)
                if e.kind == AgentErrorKind::DeadlineExceeded
                    && st
                        .reported_at
                        .get(agent)
                        .is_some_and(|t| t.elapsed() < STATS_STALE_AFTER) =>
            {
                // Busy (a burst of creates queued on its VG), not gone: its last figures
                // stand, and the charges of placements since then still apply.
            }
            Err(e) => {
                let ids: Vec<PoolRef> = st
                    .pools
                    .iter()
                    .filter(|p| p.id.agent == agent)
                    .map(|p| p.id.clone())
                    .collect();
                for id in ids {
                    if let Some(mut state) = st.pools.get(&id).cloned() {
                        state.healthy = false;
                        st.pools.upsert(state);
                    }
                    st.unhealthy
                        .insert(id, format!("agent does not answer: {}", e.message));
                }
            }
        }
    }

    /// Refreshes pools (and lists agents not listed yet) at once, then every `interval`
    /// until `shutdown`.
    pub async fn run_refresh(self: Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = self.refresh_pools() => {}
        }
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => self.refresh_pools().await,
            }
        }
    }

    /// Pool statistics as the scheduler sees them now (agent figures plus in-memory charges).
    pub fn pools(&self) -> Vec<(PoolState, Vec<String>, Option<String>)> {
        let st = self.state();
        st.pools
            .iter()
            .map(|p| {
                (
                    p.clone(),
                    st.portals.get(&p.id).cloned().unwrap_or_default(),
                    st.unhealthy.get(&p.id).cloned(),
                )
            })
            .collect()
    }

    /// The index entry of `id`, if any. A miss is trusted only once every agent has been
    /// listed: otherwise the agents not listed yet are tried, and UNAVAILABLE answered if
    /// some still do not answer.
    async fn lookup_volume(&self, id: &VolumeId) -> Result<Option<VolumeEntry>, ControllerError> {
        if let Some(e) = self.state().volumes.get(id).cloned() {
            return Ok(Some(e));
        }
        self.ensure_index_complete().await?;
        Ok(self.state().volumes.get(id).cloned())
    }

    async fn lookup_snapshot(
        &self,
        id: &SnapshotId,
    ) -> Result<Option<SnapshotEntry>, ControllerError> {
        if let Some(e) = self.state().snapshots.get(id).cloned() {
            return Ok(Some(e));
        }
        self.ensure_index_complete().await?;
        Ok(self.state().snapshots.get(id).cloned())
    }

    /// Re-reads a volume from its agent (observe before act) and updates the index. `None`
    /// when the agent no longer has it.
    async fn observe_volume(
        &self,
        entry: &VolumeEntry,
    ) -> Result<Option<VolumeEntry>, ControllerError> {
        let agent = self.agent(&entry.agent)?;
        match agent.get_volume(&entry.info.id).await {
            Ok(info) => {
                let fresh = VolumeEntry {
                    agent: entry.agent.clone(),
                    info,
                };
                self.state()
                    .volumes
                    .insert(fresh.info.id.clone(), fresh.clone());
                Ok(Some(fresh))
            }
            Err(e) if e.kind == AgentErrorKind::NotFound => {
                self.state().volumes.remove(&entry.info.id);
                Ok(None)
            }
            Err(e) => Err(ControllerError::agent(&entry.agent, "GetVolume")(e)),
        }
    }

    fn remember_volume(&self, agent: &str, info: VolumeInfo) -> VolumeEntry {
        let entry = VolumeEntry {
            agent: agent.to_owned(),
            info,
        };
        self.state()
            .volumes
            .insert(entry.info.id.clone(), entry.clone());
        entry
    }

    /// The controller's view of an index entry.
    fn view(&self, e: &VolumeEntry) -> VolumeView {
        let in_flight = self.guards.operation(&guard::volume_key(&e.info.id));
        let status = volume_status(StatusInputs {
            agent: e.info.status,
            exported: !e.info.exported_to.is_empty(),
            populating: e.info.metadata.contains_key(volumes::POPULATING),
            migration_target: e.info.metadata.contains_key(meta::MIGRATION),
            in_flight,
        });
        let st = self.state();
        let pool = PoolRef::new(&e.agent, &e.info.pool);
        let zone = st
            .pools
            .get(&pool)
            .map(|p| p.zone.clone())
            .unwrap_or_default();
        let mut abnormal = st
            .unhealthy
            .get(&pool)
            .map(|r| format!("pool {pool} is unhealthy: {r}"));
        if status == CinderStatus::Error {
            abnormal.get_or_insert_with(|| "the agent reports an error".to_owned());
        }
        let attachments = attachments(&e.info);
        VolumeView {
            id: e.info.id.clone(),
            name: e.info.metadata.get(meta::NAME).cloned(),
            capacity: e.info.size,
            agent: e.agent.clone(),
            pool: e.info.pool.clone(),
            zone,
            volume_type: e.info.volume_type.clone(),
            source: e
                .info
                .metadata
                .get(meta::SOURCE)
                .and_then(|s| ContentSource::from_canonical(s))
                .or_else(|| {
                    e.info.source.as_ref().map(|s| match s {
                        crate::agent_rpc::client::VolumeSource::Snapshot(s) => {
                            ContentSource::Snapshot(s.to_string())
                        }
                        crate::agent_rpc::client::VolumeSource::Volume(v) => {
                            ContentSource::Volume(v.to_string())
                        }
                    })
                }),
            published_nodes: attachments.iter().map(node_id_text).collect(),
            attachments,
            abnormal,
            status,
            snapshot_count: e.info.snapshot_count,
            created_at: e.info.created_at,
            metadata: e.info.metadata.clone(),
        }
    }

    fn snapshot_view(&self, e: &SnapshotEntry) -> SnapshotView {
        let in_flight = self.guards.operation(&guard::snapshot_key(&e.info.id));
        SnapshotView {
            id: e.info.id.clone(),
            name: e.info.metadata.get(meta::NAME).cloned(),
            source_volume: e.info.source_volume.clone(),
            size: e.info.size,
            created_at: e.info.created_at,
            ready_to_use: e.info.ready_to_use,
            status: snapshot_status(e.info.ready_to_use, in_flight),
            agent: e.agent.clone(),
            pool: e.info.pool.clone(),
        }
    }
}

/// Where a volume is exported: each initiator, with the host from the `csi.node.<iqn>`
/// metadata when the controller made the export.
pub fn attachments(info: &VolumeInfo) -> Vec<Attachment> {
    info.exported_to
        .iter()
        .map(|iqn| Attachment {
            host: info
                .metadata
                .get(&format!("{}{iqn}", meta::NODE_PREFIX))
                .cloned(),
            initiator: iqn.clone(),
        })
        .collect()
}

/// The CSI node id of an attachment: `<host>/<iqn>`, or the IQN alone when the host is unknown.
fn node_id_text(a: &Attachment) -> String {
    match &a.host {
        Some(host) => format!("{host}/{}", a.initiator),
        None => a.initiator.clone(),
    }
}

/// Node ids a volume is published to: `<host>/<iqn>` from the `csi.node.<iqn>` metadata, or
/// the IQN alone for an export made outside the controller.
pub fn published_nodes(info: &VolumeInfo) -> Vec<String> {
    attachments(info).iter().map(node_id_text).collect()
}
