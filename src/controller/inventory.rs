//! What the operator API reports (`cinderblock volume|snapshot|pool|type ...`): volumes and
//! snapshots as the agents report them right now, pools as the scheduler sees them, and the
//! configured volume types.
//!
//! Lists ask every agent afresh rather than reading the routing index, so an operator sees the
//! storage's truth (an export made by hand, a volume removed behind the controller's back).
//! The answers are not written back into the index: a list racing a create could otherwise
//! drop the new volume from it. An agent that does not answer is represented by its entries
//! in the index, marked abnormal.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{
    meta, paginate, volume_id_for, CinderStatus, Controller, ControllerError, Page, SnapshotEntry,
    SnapshotView, VolumeEntry, VolumeType, VolumeView,
};
use crate::agent_rpc::client::PoolKind;
use crate::scheduler::{Capacity, PoolRef};
use crate::types::Bytes;

/// Which volumes a list shows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VolumeFilter {
    /// Only this pool: `agent#pool`, or a pool name on any agent.
    pub pool: Option<String>,
    /// Only this status.
    pub status: Option<CinderStatus>,
}

impl VolumeFilter {
    /// A filter from the request's texts (empty = no filter). An unknown status is
    /// INVALID_ARGUMENT naming the known ones.
    pub fn parse(pool: &str, status: &str) -> Result<Self, ControllerError> {
        let status = if status.is_empty() {
            None
        } else {
            let known = || {
                CinderStatus::ALL
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            Some(CinderStatus::parse(status).ok_or_else(|| {
                ControllerError::InvalidArgument(format!(
                    "unknown status {status:?} (known: {})",
                    known()
                ))
            })?)
        };
        Ok(VolumeFilter {
            pool: Some(pool.trim().to_owned()).filter(|p| !p.is_empty()),
            status,
        })
    }

    /// Whether `v` passes.
    pub fn matches(&self, v: &VolumeView) -> bool {
        let pool_ok = self
            .pool
            .as_ref()
            .is_none_or(|p| *p == v.pool || *p == PoolRef::new(&v.agent, &v.pool).to_string());
        pool_ok && self.status.is_none_or(|s| s == v.status)
    }
}

/// One pool as `cinderblock pool list` shows it (Cinder's `get-pools --detail`).
#[derive(Clone, Debug, PartialEq)]
pub struct PoolReport {
    /// Agent and pool.
    pub id: PoolRef,
    /// Availability zone.
    pub zone: String,
    /// Backing kind (`None` until the agent has reported it).
    pub kind: Option<PoolKind>,
    /// Total capacity.
    pub total: Capacity,
    /// Free capacity, less what placements made since the last report will take.
    pub free: Capacity,
    /// Sum of virtual sizes, including placements since the last report.
    pub provisioned: Bytes,
    /// Bytes allocated.
    pub allocated: Bytes,
    /// Percentage of total kept free.
    pub reserved_percentage: u8,
    /// Thin over-subscription limit.
    pub max_over_subscription_ratio: f64,
    /// Thin volumes possible.
    pub thin_provisioning: bool,
    /// Thick volumes possible.
    pub thick_provisioning: bool,
    /// Volumes on the pool.
    pub volume_count: u64,
    /// Snapshots on the pool (as last reported).
    pub snapshot_count: u64,
    /// Capabilities matched against extra specs.
    pub capabilities: BTreeMap<String, String>,
    /// Usable by the scheduler.
    pub healthy: bool,
    /// Why not.
    pub unhealthy_reason: Option<String>,
    /// Time since the agent last answered ListPools.
    pub stats_age: Option<Duration>,
    /// Allocation unit.
    pub extent: Bytes,
    /// iSCSI portals of its exports.
    pub portals: Vec<String>,
}

/// One volume type as `cinderblock type list` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypeReport {
    /// The type.
    pub volume_type: VolumeType,
    /// Used when a request names no type.
    pub is_default: bool,
}

impl Controller {
    /// Every volume of every agent, asked now; `(entry, why abnormal)` by id. When the same id
    /// is on two agents (an interrupted retype migration) the source copy is shown, as the
    /// index does.
    async fn current_volumes(&self) -> BTreeMap<String, (VolumeEntry, Option<String>)> {
        let answers = futures::future::join_all(self.agents.snapshot().iter().map(|(name, a)| {
            let a = a.clone();
            async move { (name.clone(), a.list_volumes().await) }
        }))
        .await;
        let mut out: BTreeMap<String, (VolumeEntry, Option<String>)> = BTreeMap::new();
        let mut add = |entry: VolumeEntry, abnormal: Option<String>| {
            let migrating = |e: &VolumeEntry| e.info.metadata.contains_key(meta::MIGRATION);
            let key = entry.info.id.to_string();
            match out.get(&key) {
                Some((kept, _)) if migrating(&entry) || !migrating(kept) => {}
                Some(_) | None => {
                    out.insert(key, (entry, abnormal));
                }
            }
        };
        for (agent, answer) in answers {
            match answer {
                Ok(infos) => {
                    for info in infos {
                        let entry = VolumeEntry {
                            agent: agent.clone(),
                            info,
                        };
                        add(entry, None);
                    }
                }
                Err(e) => {
                    let why = format!("agent {agent} does not answer: {}", e.message);
                    let cached: Vec<VolumeEntry> = self
                        .state()
                        .volumes
                        .values()
                        .filter(|v| v.agent == agent)
                        .cloned()
                        .collect();
                    for entry in cached {
                        add(entry, Some(why.clone()));
                    }
                }
            }
        }
        out
    }

    /// Volumes passing `filter`, in id order, paged by offset tokens.
    pub async fn inventory_volumes(
        &self,
        filter: &VolumeFilter,
        max_entries: usize,
        token: &str,
    ) -> Result<Page<VolumeView>, ControllerError> {
        let views: Vec<VolumeView> = self
            .current_volumes()
            .await
            .into_values()
            .map(|(entry, abnormal)| {
                let mut v = self.view(&entry);
                if abnormal.is_some() {
                    v.abnormal = abnormal;
                }
                v
            })
            .filter(|v| filter.matches(v))
            .collect();
        paginate(views, max_entries, token)
    }

    /// The volume whose CSI name is `name` (its id derives from the name).
    pub async fn volume_by_name(&self, name: &str) -> Result<VolumeView, ControllerError> {
        let not_found = || ControllerError::VolumeNotFound(name.to_owned());
        let id = volume_id_for(name);
        match self.get_volume(id.as_str()).await {
            Ok(v) if v.name.as_deref() == Some(name) => Ok(v),
            Ok(_) | Err(ControllerError::VolumeNotFound(_)) => Err(not_found()),
            Err(e) => Err(e),
        }
    }

    /// Snapshots of every agent, asked now (of `volume_id` only when non-empty), in id order,
    /// paged by offset tokens.
    pub async fn inventory_snapshots(
        &self,
        volume_id: &str,
        max_entries: usize,
        token: &str,
    ) -> Result<Page<SnapshotView>, ControllerError> {
        let answers = futures::future::join_all(self.agents.snapshot().iter().map(|(name, a)| {
            let a = a.clone();
            async move { (name.clone(), a.list_snapshots().await) }
        }))
        .await;
        let mut entries: BTreeMap<String, SnapshotEntry> = BTreeMap::new();
        for (agent, answer) in answers {
            let found: Vec<SnapshotEntry> = match answer {
                Ok(infos) => infos
                    .into_iter()
                    .map(|info| SnapshotEntry {
                        agent: agent.clone(),
                        info,
                    })
                    .collect(),
                Err(e) => {
                    tracing::warn!(agent = %agent, error = %e, "listing snapshots from the index");
                    self.state()
                        .snapshots
                        .values()
                        .filter(|s| s.agent == agent)
                        .cloned()
                        .collect()
                }
            };
            for e in found {
                entries.insert(e.info.id.to_string(), e);
            }
        }
        let views: Vec<SnapshotView> = entries
            .values()
            .filter(|e| volume_id.is_empty() || e.info.source_volume.as_str() == volume_id)
            .map(|e| self.snapshot_view(e))
            .collect();
        paginate(views, max_entries, token)
    }

    /// Every known pool, by agent then name.
    pub fn pool_reports(&self) -> Vec<PoolReport> {
        let st = self.state();
        st.pools
            .iter()
            .map(|p| {
                let report = st.reports.get(&p.id);
                let unhealthy_reason = st.unhealthy.get(&p.id).cloned();
                PoolReport {
                    id: p.id.clone(),
                    zone: p.zone.clone(),
                    kind: report.map(|r| r.kind),
                    total: p.total,
                    free: p.free,
                    provisioned: p.provisioned,
                    allocated: p.allocated,
                    reserved_percentage: p.reserved_percentage,
                    max_over_subscription_ratio: p.max_over_subscription_ratio,
                    thin_provisioning: p.thin_provisioning,
                    thick_provisioning: p.thick_provisioning,
                    volume_count: p.volume_count,
                    snapshot_count: report.map_or(0, |r| r.snapshot_count),
                    capabilities: p.capabilities.clone(),
                    healthy: p.healthy && unhealthy_reason.is_none(),
                    unhealthy_reason,
                    stats_age: st.reported_at.get(&p.id.agent).map(|t| t.elapsed()),
                    extent: p.extent,
                    portals: st.portals.get(&p.id).cloned().unwrap_or_default(),
                }
            })
            .collect()
    }

    /// Every configured volume type, by name.
    pub fn type_reports(&self) -> Vec<TypeReport> {
        self.settings
            .volume_types
            .values()
            .map(|t| TypeReport {
                volume_type: t.clone(),
                is_default: t.name == self.settings.default_volume_type,
            })
            .collect()
    }
}
