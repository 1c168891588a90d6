//! Volumes: create (placement, rescheduling, clones and cross-agent copies), delete, expand,
//! get, list, validate, capacity, and retype (modify).

use std::collections::{BTreeMap, BTreeSet};

use super::guard::{volume_key, Operation};
use super::{
    access_has_mount, meta, paginate, Access, Capability, CapacityRange, Charge, Controller,
    ControllerError, CreateVolume, Page, Parameters, VolumeEntry, VolumeSpec, VolumeType,
    VolumeView, DEFAULT_VOLUME_SIZE,
};
use crate::agent::{SnapshotId, VolumeId};
use crate::agent_rpc::client::{NewVolume, ReadSource, VolumeSource};
use crate::scheduler::{
    Capacity, FilterKind, PoolRef, PoolSet, Request, Scheduler, SchedulerConfig, SchedulerError,
};
use crate::types::Bytes;

/// Marks a volume whose content is still being copied in from another pool.
pub(super) const POPULATING: &str = "csi.populating";

/// Where a new volume's content comes from, resolved through the index.
#[derive(Clone, Debug)]
struct Source {
    agent: String,
    pool: PoolRef,
    size: Bytes,
    read: ReadSource,
    same_pool: VolumeSource,
}

/// What GetCapacity reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapacityReport {
    /// Bytes a new volume of the type could use (the best candidate pool's usable capacity).
    pub available: Bytes,
    /// Largest single volume (the same figure: a volume lives in one pool).
    pub maximum_volume_size: Bytes,
}

/// A pool's capacity a new volume could use, as the CapacityFilter counts it: free minus the
/// reserve (thick), or the smaller of the over-subscription headroom and the virtual free
/// space (thin). Unknown capacity counts as nothing; infinite as `u64::MAX`.
fn usable(pool: &crate::scheduler::PoolState, wants_thin: bool) -> u64 {
    let thin = pool.provisioning_for(wants_thin) == crate::scheduler::Provisioning::Thin;
    let ratio = pool.max_over_subscription_ratio;
    let free = match pool.free {
        Capacity::Infinite => return u64::MAX,
        Capacity::Unknown => return 0,
        Capacity::Known(f) => f.get(),
    };
    let (total, reserved) = match pool.total {
        Capacity::Known(t) => (
            Some(t.get()),
            (u128::from(t.get()) * u128::from(pool.reserved_percentage.min(100)) / 100) as u64,
        ),
        Capacity::Unknown | Capacity::Infinite => (None, 0),
    };
    let available = free.saturating_sub(reserved);
    if !thin {
        return available;
    }
    let virtual_free = (available as f64 * ratio) as u64;
    match total {
        Some(t) => {
            let headroom = ((t as f64 * ratio) as u64).saturating_sub(pool.provisioned.get());
            headroom.min(virtual_free)
        }
        None => virtual_free,
    }
}

impl Controller {
    /// CreateVolume: idempotent by name (see the module docs of [`super`]).
    pub async fn create_volume(&self, req: CreateVolume) -> Result<VolumeView, ControllerError> {
        let id = super::volume_id_for(&req.name);
        let _guard = self.guards.try_lock(volume_key(&id), Operation::Create)?;
        let params = Parameters::parse(&req.parameters, &req.mutable_parameters)?;
        let vtype = self.volume_type(params.volume_type.as_deref())?.clone();
        for cap in &req.capabilities {
            cap.check(&vtype)
                .map_err(ControllerError::UnsupportedCapability)?;
        }
        let spec = VolumeSpec {
            name: req.name.clone(),
            access: super::canonical_access(&req.capabilities),
            params: params.canonical(),
            source: req
                .source
                .as_ref()
                .map(super::ContentSource::canonical)
                .unwrap_or_default(),
            capacity: req.capacity,
        };
        if let Some(super::ContentSource::Snapshot(b)) = req.source.as_ref() {
            if super::is_backup_id(b) {
                return self
                    .create_volume_from_backup(&req, &id, &vtype, &spec, &params, b)
                    .await;
            }
        }
        if let Some(existing) = self.lookup_volume(&id).await? {
            return self.existing_volume(existing, &spec, &req).await;
        }
        let source = self.resolve_source(&req).await?;
        let size = requested_size(req.capacity, source.as_ref().map(|s| s.size))?;

        let mut request = Request::new(size);
        request.extra_specs = vtype.extra_specs.clone();
        request.requisite_zones = req.zones.requisite.clone();
        request.preferred_zones = req.zones.preferred.clone();
        request.same_backend_as = params.same_backend_as.clone();
        request.different_backend_as = params.different_backend_as.clone();
        let mut metadata = spec.to_metadata();
        let mut attempt = 1;
        let mut last_failure: Option<String> = None;
        loop {
            let prefer = source.as_ref().map(|s| &s.pool);
            let (pool, charge) =
                self.place(&id, &request, req.capacity.limit, prefer, &last_failure)?;
            let same_pool = source.as_ref().filter(|s| s.pool == pool);
            let copy_from = source.as_ref().filter(|s| s.pool != pool);
            if copy_from.is_some() {
                metadata.insert(POPULATING.to_owned(), "1".to_owned());
            }
            let new = NewVolume {
                id: id.clone(),
                pool: pool.pool.clone(),
                size,
                volume_type: vtype.name.clone(),
                metadata: metadata.clone(),
                source: same_pool.map(|s| s.same_pool.clone()),
            };
            let agent = self.agent(&pool.agent)?.clone();
            match agent.create_volume(new).await {
                Ok(info) => {
                    self.settle(&id, None);
                    let mut entry = self.remember_volume(&pool.agent, info);
                    if let Some(src) = copy_from {
                        entry = self.populate(entry, src).await?;
                    }
                    tracing::info!(volume = %id, name = %req.name, pool = %pool, size = %entry.info.size, "volume created");
                    return Ok(self.view(&entry));
                }
                Err(e) => {
                    self.settle(&id, Some(charge));
                    let retry =
                        super::worth_rescheduling(e.kind) && self.scheduler.should_retry(attempt);
                    tracing::warn!(volume = %id, pool = %pool, attempt, retry, error = %e, "create failed");
                    if !retry {
                        return Err(ControllerError::agent(&pool.agent, "CreateVolume")(e));
                    }
                    // The agent may have made it before failing (a timeout): best effort.
                    if let Err(cleanup) = agent.delete_volume(&id).await {
                        tracing::warn!(volume = %id, pool = %pool, error = %cleanup, "cleanup after a failed create");
                    }
                    last_failure = Some(format!("{pool}: {}", e.message));
                    request.exclude_pool(pool);
                    attempt += 1;
                }
            }
        }
    }

    /// A retried (or raced) CreateVolume for a name that exists: the same volume if the request
    /// is compatible, ALREADY_EXISTS if not. A copy interrupted earlier is finished first.
    async fn existing_volume(
        &self,
        existing: VolumeEntry,
        spec: &VolumeSpec,
        req: &CreateVolume,
    ) -> Result<VolumeView, ControllerError> {
        let conflict = |reason: String| ControllerError::AlreadyExists {
            what: "volume",
            name: req.name.clone(),
            reason,
        };
        if let Some(reason) = spec.mismatch(&existing.info.metadata) {
            return Err(conflict(reason));
        }
        let size = existing.info.size;
        if req.capacity.required.is_some_and(|r| size < r)
            || req.capacity.limit.is_some_and(|l| size > l)
        {
            return Err(conflict(format!(
                "its size {size} is outside the requested range"
            )));
        }
        let mut entry = existing;
        if entry.info.metadata.contains_key(POPULATING) {
            let source = self.resolve_source(req).await?;
            if let Some(src) = source {
                entry = self.populate(entry, &src).await?;
            }
        }
        let view = self.view(&entry);
        if !req.zones.requisite.is_empty() && !req.zones.requisite.contains(&view.zone) {
            return Err(conflict(format!(
                "it is in zone {:?}, not among the requisite zones",
                view.zone
            )));
        }
        Ok(view)
    }

    async fn resolve_source(&self, req: &CreateVolume) -> Result<Option<Source>, ControllerError> {
        let Some(src) = &req.source else {
            return Ok(None);
        };
        let not_found = || ControllerError::SourceNotFound(src.canonical());
        match src {
            super::ContentSource::Snapshot(raw) => {
                let id = SnapshotId::parse(raw).map_err(|_| not_found())?;
                let e = self.lookup_snapshot(&id).await?.ok_or_else(not_found)?;
                Ok(Some(Source {
                    pool: PoolRef::new(&e.agent, &e.info.pool),
                    agent: e.agent,
                    size: e.info.size,
                    read: ReadSource::Snapshot(id.clone()),
                    same_pool: VolumeSource::Snapshot(id),
                }))
            }
            super::ContentSource::Volume(raw) => {
                let id = VolumeId::parse(raw).map_err(|_| not_found())?;
                let e = self.lookup_volume(&id).await?.ok_or_else(not_found)?;
                Ok(Some(Source {
                    pool: PoolRef::new(&e.agent, &e.info.pool),
                    agent: e.agent,
                    size: e.info.size,
                    read: ReadSource::Volume(id.clone()),
                    same_pool: VolumeSource::Volume(id),
                }))
            }
        }
    }

    /// Picks a pool and charges the volume to it in memory. Pools whose extent would round
    /// the size past `limit` are left out; `prefer` (the content source's pool) is taken when
    /// it passes the filters, so clones stay on their source's pool (Cinder does the same).
    pub(super) fn place(
        &self,
        id: &VolumeId,
        request: &Request,
        limit: Option<Bytes>,
        prefer: Option<&PoolRef>,
        last_failure: &Option<String>,
    ) -> Result<(PoolRef, Charge), ControllerError> {
        let mut st = self.state();
        let mut request = request.clone();
        let mut too_coarse = Vec::new();
        if let Some(limit) = limit {
            for p in &st.pools {
                if p.rounded_size(request.size).is_none_or(|r| r > limit) {
                    too_coarse.push(format!("{}: extent {}", p.id, p.extent));
                    request.exclude_pool(p.id.clone());
                }
            }
        }
        let decision = match self.scheduler.schedule(&st.pools, &request) {
            Ok(d) => d,
            Err(e @ SchedulerError::NoValidPool { .. }) if !too_coarse.is_empty() => {
                return Err(ControllerError::OutOfRange(format!(
                    "{} rounded up to a pool's extent exceeds the limit on: {}; {e}",
                    request.size,
                    too_coarse.join(", ")
                )))
            }
            Err(source @ SchedulerError::NoValidPool { .. }) => {
                return Err(ControllerError::NoValidPool {
                    source,
                    last_failure: last_failure.clone(),
                })
            }
            Err(e) => return Err(ControllerError::Internal(e.to_string())),
        };
        let chosen = match prefer {
            Some(p) if decision.ranked().iter().any(|(r, _)| *r == p) => p.clone(),
            Some(_) | None => decision.best().clone(),
        };
        let wants_thin = request
            .wants_thin()
            .map_err(|e| ControllerError::Internal(e.to_string()))?;
        let provisioning = st
            .pools
            .get(&chosen)
            .map(|p| p.provisioning_for(wants_thin))
            .ok_or_else(|| ControllerError::Internal(format!("pool {chosen} vanished")))?;
        st.pools
            .consume(&chosen, &request)
            .map_err(|e| ControllerError::Internal(e.to_string()))?;
        let charge = Charge {
            pool: chosen.clone(),
            size: request.size,
            provisioning,
            settled_at: None,
        };
        st.pending.insert(id.clone(), charge.clone());
        Ok((chosen, charge))
    }

    /// Ends an in-flight placement: kept (the agent's next report includes the volume) or,
    /// with `release`, given back.
    pub(super) fn settle(&self, id: &VolumeId, release: Option<Charge>) {
        let mut st = self.state();
        if release.is_none() {
            // Kept until a report asked for after now is applied (see `apply_pools`).
            if let Some(c) = st.pending.get_mut(id) {
                c.settled_at = Some(std::time::Instant::now());
            }
            return;
        }
        st.pending.remove(id);
        if let Some(c) = release {
            if let Err(e) = st.pools.release(&c.pool, c.size, c.provisioning) {
                tracing::debug!(error = %e, "releasing a charge");
            }
        }
    }

    /// Copies a source's content into a new volume on another pool (ReadVolume → WriteVolume),
    /// then clears the populating mark. On failure the new volume is deleted, so a retry
    /// starts again.
    async fn populate(
        &self,
        entry: VolumeEntry,
        src: &Source,
    ) -> Result<VolumeEntry, ControllerError> {
        let id = entry.info.id.clone();
        let target = self.agent(&entry.agent)?.clone();
        let copied = self
            .copy(&src.agent, src.read.clone(), &entry.agent, &id, src.size)
            .await;
        if let Err(e) = copied {
            if let Err(cleanup) = target.delete_volume(&id).await {
                tracing::warn!(volume = %id, error = %cleanup, "cannot remove a half-copied volume");
            } else {
                self.forget_volume(&id);
            }
            return Err(e);
        }
        let mut metadata = entry.info.metadata.clone();
        metadata.remove(POPULATING);
        let info = target
            .update_volume(&id, "", Some(metadata))
            .await
            .map_err(ControllerError::agent(&entry.agent, "UpdateVolume"))?;
        Ok(self.remember_volume(&entry.agent, info))
    }

    /// Streams `from` on agent `src` into volume `to` on agent `dst`.
    async fn copy(
        &self,
        src: &str,
        from: ReadSource,
        dst: &str,
        to: &VolumeId,
        size: Bytes,
    ) -> Result<(), ControllerError> {
        let reader = self.agent(src)?.clone();
        let writer = self.agent(dst)?.clone();
        let stream = reader
            .read_volume(from)
            .await
            .map_err(ControllerError::agent(src, "ReadVolume"))?;
        let summary = writer
            .write_volume(to, size, stream)
            .await
            .map_err(ControllerError::agent(dst, "WriteVolume"))?;
        tracing::info!(volume = %to, from = src, to = dst, written = summary.bytes_written, holes = summary.hole_bytes, "content copied");
        Ok(())
    }

    pub(super) fn forget_volume(&self, id: &VolumeId) -> Option<VolumeEntry> {
        let mut st = self.state();
        let entry = st.volumes.remove(id)?;
        let pool = PoolRef::new(&entry.agent, &entry.info.pool);
        let wants_thin = {
            let mut r = Request::new(Bytes(0));
            r.extra_specs = self.stored_type(&entry.info.volume_type).extra_specs;
            r.wants_thin().unwrap_or(true)
        };
        if let Some(p) = st.pools.get(&pool) {
            let provisioning = p.provisioning_for(wants_thin);
            let _ = st.pools.release(&pool, entry.info.size, provisioning);
        }
        Some(entry)
    }

    /// DeleteVolume with Cinder's rules; an unknown volume is already deleted.
    pub async fn delete_volume(&self, raw_id: &str) -> Result<(), ControllerError> {
        let Ok(id) = VolumeId::parse(raw_id) else {
            return Ok(()); // no volume can have this id
        };
        let _guard = self.guards.try_lock(volume_key(&id), Operation::Delete)?;
        let Some(entry) = self.lookup_volume(&id).await? else {
            return Ok(());
        };
        let Some(fresh) = self.observe_volume(&entry).await? else {
            return Ok(());
        };
        if fresh.info.snapshot_count > 0 {
            return Err(ControllerError::HasSnapshots {
                id,
                count: fresh.info.snapshot_count,
            });
        }
        if !fresh.info.exported_to.is_empty() {
            return Err(ControllerError::Published {
                id,
                nodes: super::published_nodes(&fresh.info),
            });
        }
        self.agent(&fresh.agent)?
            .delete_volume(&id)
            .await
            .map_err(ControllerError::agent(&fresh.agent, "DeleteVolume"))?;
        self.forget_volume(&id);
        tracing::info!(volume = %id, agent = %fresh.agent, "volume deleted");
        Ok(())
    }

    /// ControllerExpandVolume: grows to `capacity.required` (rounded up by the agent).
    /// Returns the new size and whether the node must grow a filesystem.
    pub async fn expand_volume(
        &self,
        raw_id: &str,
        capacity: CapacityRange,
        access: Option<&Access>,
    ) -> Result<(Bytes, bool), ControllerError> {
        let target = capacity.required.or(capacity.limit).ok_or_else(|| {
            ControllerError::InvalidArgument("capacity_range needs required_bytes".into())
        })?;
        let not_found = || ControllerError::VolumeNotFound(raw_id.to_owned());
        let id = VolumeId::parse(raw_id).map_err(|_| not_found())?;
        let _guard = self.guards.try_lock(volume_key(&id), Operation::Extend)?;
        let entry = self.lookup_volume(&id).await?.ok_or_else(not_found)?;
        let fresh = self.observe_volume(&entry).await?.ok_or_else(not_found)?;
        let node_expansion = match access {
            Some(Access::Block) => false,
            Some(Access::Mount { .. }) => true,
            None => fresh
                .info
                .metadata
                .get(meta::ACCESS)
                .is_none_or(|a| access_has_mount(a)),
        };
        if let Some(limit) = capacity.limit {
            if target > limit {
                return Err(ControllerError::OutOfRange(format!(
                    "required {target} exceeds limit {limit}"
                )));
            }
        }
        if fresh.info.size >= target {
            return Ok((fresh.info.size, node_expansion));
        }
        let pool = PoolRef::new(&fresh.agent, &fresh.info.pool);
        let rounded = self
            .state()
            .pools
            .get(&pool)
            .and_then(|p| p.rounded_size(target))
            .unwrap_or(target);
        if capacity.limit.is_some_and(|l| rounded > l) {
            return Err(ControllerError::OutOfRange(format!(
                "{target} rounds up to {rounded} on pool {pool}, above the limit"
            )));
        }
        let info = self
            .agent(&fresh.agent)?
            .extend_volume(&id, target)
            .await
            .map_err(ControllerError::agent(&fresh.agent, "ExtendVolume"))?;
        let size = info.size;
        self.remember_volume(&fresh.agent, info);
        tracing::info!(volume = %id, %size, "volume extended");
        Ok((size, node_expansion))
    }

    /// ControllerGetVolume: the agent's current view (the cached one, marked abnormal, when
    /// the agent does not answer).
    pub async fn get_volume(&self, raw_id: &str) -> Result<VolumeView, ControllerError> {
        let not_found = || ControllerError::VolumeNotFound(raw_id.to_owned());
        let id = VolumeId::parse(raw_id).map_err(|_| not_found())?;
        let entry = self.lookup_volume(&id).await?.ok_or_else(not_found)?;
        match self.observe_volume(&entry).await {
            Ok(Some(fresh)) => Ok(self.view(&fresh)),
            Ok(None) => Err(not_found()),
            Err(e) => {
                let mut view = self.view(&entry);
                view.abnormal = Some(e.to_string());
                Ok(view)
            }
        }
    }

    /// ListVolumes: every indexed volume by id, paged by offset tokens.
    pub async fn list_volumes(
        &self,
        max_entries: usize,
        token: &str,
    ) -> Result<Page<VolumeView>, ControllerError> {
        if let Err(e) = self.ensure_index_complete().await {
            tracing::warn!(error = %e, "listing volumes of the agents that answer");
        }
        let entries: Vec<VolumeEntry> = self.state().volumes.values().cloned().collect();
        let page = paginate(entries, max_entries, token)?;
        Ok(Page {
            entries: page.entries.iter().map(|e| self.view(e)).collect(),
            next_token: page.next_token,
        })
    }

    /// ValidateVolumeCapabilities: `Ok(Ok(()))` when everything is supported for this volume,
    /// `Ok(Err(why))` when not.
    pub async fn validate_volume(
        &self,
        raw_id: &str,
        caps: &[Capability],
        parameters: &BTreeMap<String, String>,
        mutable: &BTreeMap<String, String>,
    ) -> Result<Result<(), String>, ControllerError> {
        let not_found = || ControllerError::VolumeNotFound(raw_id.to_owned());
        let id = VolumeId::parse(raw_id).map_err(|_| not_found())?;
        let entry = self.lookup_volume(&id).await?.ok_or_else(not_found)?;
        let vtype = self.stored_type(&entry.info.volume_type);
        if !parameters.is_empty() || !mutable.is_empty() {
            match Parameters::parse(parameters, mutable) {
                Err(e) => return Ok(Err(e.to_string())),
                Ok(p) => {
                    if let Some(t) = p.volume_type.filter(|t| *t != vtype.name) {
                        return Ok(Err(format!(
                            "the volume has type {:?}, not {t:?}",
                            vtype.name
                        )));
                    }
                }
            }
        }
        let stored = entry.info.metadata.get(meta::ACCESS);
        for cap in caps {
            if let Err(why) = cap.check(&vtype) {
                return Ok(Err(why));
            }
            let kind = match cap.access {
                Access::Block => "block/",
                Access::Mount { .. } => "mount:",
            };
            if let Some(stored) = stored.filter(|s| !s.is_empty()) {
                if !stored.split(',').any(|c| c.starts_with(kind)) {
                    return Ok(Err(format!(
                        "the volume was created for [{stored}], not {}",
                        cap.canonical()
                    )));
                }
            }
        }
        Ok(Ok(()))
    }

    /// GetCapacity: what the scheduler would let a volume of the parameters' type use in
    /// `zone` (any zone when `None`): the largest usable capacity among the pools that pass
    /// the filters, honouring reserved percentages and over-subscription.
    pub fn get_capacity(
        &self,
        caps: &[Capability],
        parameters: &BTreeMap<String, String>,
        zone: Option<&str>,
    ) -> Result<CapacityReport, ControllerError> {
        let params = Parameters::parse(parameters, &BTreeMap::new())?;
        let vtype = self.volume_type(params.volume_type.as_deref())?;
        let none = CapacityReport {
            available: Bytes(0),
            maximum_volume_size: Bytes(0),
        };
        if caps.iter().any(|c| c.check(vtype).is_err()) {
            return Ok(none);
        }
        let mut request = Request::new(Bytes(0));
        request.extra_specs = vtype.extra_specs.clone();
        request.requisite_zones = zone
            .map(|z| BTreeSet::from([z.to_owned()]))
            .unwrap_or_default();
        request.same_backend_as = params.same_backend_as;
        request.different_backend_as = params.different_backend_as;
        let wants_thin = request
            .wants_thin()
            .map_err(|e| ControllerError::Internal(e.to_string()))?;
        let st = self.state();
        let best = match self.scheduler.schedule(&st.pools, &request) {
            Ok(d) => d
                .ranked()
                .iter()
                .filter_map(|(id, _)| st.pools.get(id))
                .map(|p| usable(p, wants_thin))
                .max()
                .unwrap_or(0),
            Err(SchedulerError::NoValidPool { .. }) => 0,
            Err(e) => return Err(ControllerError::Internal(e.to_string())),
        };
        Ok(CapacityReport {
            available: Bytes(best),
            maximum_volume_size: Bytes(best),
        })
    }

    /// ControllerModifyVolume = Cinder's retype. `type` is the only mutable parameter: the
    /// volume is retagged in place when its pool satisfies the new type, else migrated
    /// (detached, without snapshots) to a pool of another agent in the same zone that the
    /// scheduler chooses, keeping its id.
    pub async fn modify_volume(
        &self,
        raw_id: &str,
        mutable: &BTreeMap<String, String>,
    ) -> Result<(), ControllerError> {
        let mut new_type = None;
        for (k, v) in mutable {
            match k.as_str() {
                super::PARAM_TYPE => new_type = Some(v.clone()),
                k if k.starts_with(super::SIDECAR_PREFIX) => {}
                other => {
                    return Err(ControllerError::InvalidArgument(format!(
                        "mutable parameter {other:?} cannot be changed (only {:?})",
                        super::PARAM_TYPE
                    )))
                }
            }
        }
        let new_type = new_type.ok_or_else(|| {
            ControllerError::InvalidArgument("mutable_parameters must set \"type\"".into())
        })?;
        let vtype = self.volume_type(Some(&new_type))?.clone();
        let not_found = || ControllerError::VolumeNotFound(raw_id.to_owned());
        let id = VolumeId::parse(raw_id).map_err(|_| not_found())?;
        let _guard = self.guards.try_lock(volume_key(&id), Operation::Retype)?;
        let entry = self.lookup_volume(&id).await?.ok_or_else(not_found)?;
        let fresh = self.observe_volume(&entry).await?.ok_or_else(not_found)?;
        if fresh.info.volume_type == vtype.name {
            return Ok(());
        }
        if let Some(access) = fresh.info.metadata.get(meta::ACCESS) {
            if access.contains("block/MULTI_NODE_MULTI_WRITER") && !vtype.multiattach() {
                return Err(ControllerError::UnsupportedCapability(format!(
                    "the volume is multi-attach; type {:?} is not",
                    vtype.name
                )));
            }
        }
        let pool = PoolRef::new(&fresh.agent, &fresh.info.pool);
        if self.pool_satisfies(&pool, &vtype)? {
            let info = self
                .agent(&fresh.agent)?
                .update_volume(&id, &vtype.name, None)
                .await
                .map_err(ControllerError::agent(&fresh.agent, "UpdateVolume"))?;
            self.remember_volume(&fresh.agent, info);
            tracing::info!(volume = %id, r#type = %vtype.name, "retyped in place");
            return Ok(());
        }
        self.migrate(fresh, &vtype).await
    }

    /// Whether `pool` passes the CapabilitiesFilter for `vtype`.
    fn pool_satisfies(&self, pool: &PoolRef, vtype: &VolumeType) -> Result<bool, ControllerError> {
        let state = self
            .state()
            .pools
            .get(pool)
            .cloned()
            .ok_or_else(|| ControllerError::IndexIncomplete(vec![pool.agent.clone()]))?;
        let only_capabilities = Scheduler::new(SchedulerConfig {
            filters: vec![FilterKind::CapabilitiesFilter],
            weighers: Vec::new(),
            max_attempts: 1,
        })
        .map_err(|e| ControllerError::Internal(e.to_string()))?;
        let set =
            PoolSet::from_pools([state]).map_err(|e| ControllerError::Internal(e.to_string()))?;
        let mut request = Request::new(Bytes(0));
        request.extra_specs = vtype.extra_specs.clone();
        match only_capabilities.schedule(&set, &request) {
            Ok(_) => Ok(true),
            Err(SchedulerError::NoValidPool { .. }) => Ok(false),
            Err(e) => Err(ControllerError::Internal(e.to_string())),
        }
    }

    /// Retype with migration: create on the target (marked), copy, delete the source, unmark.
    async fn migrate(&self, fresh: VolumeEntry, vtype: &VolumeType) -> Result<(), ControllerError> {
        let id = fresh.info.id.clone();
        if !fresh.info.exported_to.is_empty() {
            return Err(ControllerError::Published {
                id,
                nodes: super::published_nodes(&fresh.info),
            });
        }
        if fresh.info.snapshot_count > 0 {
            return Err(ControllerError::HasSnapshots {
                id,
                count: fresh.info.snapshot_count,
            });
        }
        let zone = self.view(&fresh).zone;
        let mut request = Request::new(fresh.info.size);
        request.extra_specs = vtype.extra_specs.clone();
        if !zone.is_empty() {
            // The PV's node affinity names the zone: the volume must stay in it.
            request.requisite_zones.insert(zone);
        }
        // Volume ids are unique per agent, so the copy must live on another agent.
        request.different_backend_as.insert(fresh.agent.clone());
        let (pool, charge) = self.place(&id, &request, None, None, &None)?;
        let target = self.agent(&pool.agent)?.clone();
        let mut metadata = fresh.info.metadata.clone();
        metadata.insert(meta::MIGRATION.to_owned(), "target".to_owned());
        let created = target
            .create_volume(NewVolume {
                id: id.clone(),
                pool: pool.pool.clone(),
                size: fresh.info.size,
                volume_type: vtype.name.clone(),
                metadata: metadata.clone(),
                source: None,
            })
            .await;
        if let Err(e) = created {
            self.settle(&id, Some(charge));
            return Err(ControllerError::agent(&pool.agent, "CreateVolume")(e));
        }
        let steps = async {
            self.copy(
                &fresh.agent,
                ReadSource::Volume(id.clone()),
                &pool.agent,
                &id,
                fresh.info.size,
            )
            .await?;
            self.agent(&fresh.agent)?
                .delete_volume(&id)
                .await
                .map_err(ControllerError::agent(&fresh.agent, "DeleteVolume"))
        };
        if let Err(e) = steps.await {
            self.settle(&id, Some(charge));
            if let Err(cleanup) = target.delete_volume(&id).await {
                tracing::warn!(volume = %id, error = %cleanup, "cannot remove the migration target");
            }
            return Err(e);
        }
        self.forget_volume(&id);
        self.settle(&id, None);
        metadata.remove(meta::MIGRATION);
        let info = target
            .update_volume(&id, "", Some(metadata))
            .await
            .map_err(ControllerError::agent(&pool.agent, "UpdateVolume"))?;
        self.remember_volume(&pool.agent, info);
        tracing::info!(volume = %id, from = %fresh.agent, to = %pool, r#type = %vtype.name, "retyped with migration");
        Ok(())
    }
}

/// The size to create: `required`, else the source's size, else the default (capped by the
/// limit). OUT_OF_RANGE when the range is impossible or below the source.
pub(super) fn requested_size(
    range: CapacityRange,
    source: Option<Bytes>,
) -> Result<Bytes, ControllerError> {
    let size = match (range.required, source) {
        (Some(r), _) => r,
        (None, Some(s)) => s,
        (None, None) => range
            .limit
            .map_or(DEFAULT_VOLUME_SIZE, |l| l.min(DEFAULT_VOLUME_SIZE)),
    };
    if let Some(limit) = range.limit {
        if size > limit {
            return Err(ControllerError::OutOfRange(format!(
                "required {size} exceeds limit {limit}"
            )));
        }
    }
    if let Some(s) = source {
        if size < s {
            return Err(ControllerError::OutOfRange(format!(
                "the content source is {s}, larger than the requested {size}"
            )));
        }
    }
    Ok(size)
}

#[cfg(test)]
mod unit {
    use super::*;
    use crate::scheduler::PoolState;

    #[test]
    fn requested_size_table() {
        let g = Bytes::gib;
        let r = |req: Option<u64>, lim: Option<u64>| CapacityRange {
            required: req.map(g),
            limit: lim.map(g),
        };
        let cases = [
            (r(None, None), None, Ok(g(1))),
            (r(Some(5), None), None, Ok(g(5))),
            (r(None, Some(10)), None, Ok(g(1))),
            (r(Some(5), Some(4)), None, Err("capacity out of range: required 5GiB exceeds limit 4GiB")),
            (r(None, None), Some(g(3)), Ok(g(3))),
            (r(Some(2), None), Some(g(3)), Err("capacity out of range: the content source is 3GiB, larger than the requested 2GiB")),
            (r(None, Some(2)), Some(g(3)), Err("capacity out of range: required 3GiB exceeds limit 2GiB")),
        ];
        for (range, source, want) in cases {
            assert_eq!(
                requested_size(range, source).map_err(|e| e.to_string()),
                want.map_err(str::to_string),
                "{range:?} {source:?}"
            );
        }
        assert_eq!(
            requested_size(r(None, None), None)
                .map(|b| b.get())
                .map_err(|e| e.to_string()),
            Ok(DEFAULT_VOLUME_SIZE.get())
        );
        let small = CapacityRange {
            required: None,
            limit: Some(Bytes::mib(100)),
        };
        assert_eq!(
            requested_size(small, None).map_err(|e| e.to_string()),
            Ok(Bytes::mib(100))
        );
    }

    #[test]
    fn usable_table() {
        let g = Bytes::gib;
        let mut thick = PoolState::new(PoolRef::new("a", "p"), "z", g(100));
        thick.free = Capacity::Known(g(60));
        thick.reserved_percentage = 10;
        let mut thin = thick.clone();
        thin.thin_provisioning = true;
        thin.thick_provisioning = false;
        thin.max_over_subscription_ratio = 2.0;
        thin.provisioned = g(150);
        let mut unknown = thick.clone();
        unknown.free = Capacity::Unknown;
        let mut infinite = thick.clone();
        infinite.free = Capacity::Infinite;
        // (pool, usable)
        let cases = [
            (&thick, g(50).get()),
            // min(100*2 - 150, (60-10)*2) = 50
            (&thin, g(50).get()),
            (&unknown, 0),
            (&infinite, u64::MAX),
        ];
        for (pool, want) in cases {
            assert_eq!(usable(pool, true), want, "{pool:?}");
        }
        let mut roomy = thin.clone();
        roomy.provisioned = g(0);
        assert_eq!(usable(&roomy, true), g(100).get());
    }
}
