//! What the scheduler knows about each storage pool, and the in-memory bookkeeping that keeps a
//! burst of placements from piling onto one pool before the agents report again.

use std::collections::BTreeMap;
use std::fmt;

use crate::types::Bytes;

use super::index::Index;
use super::request::Request;
use super::SchedulerError;

/// A pool's identity: the agent (Cinder's `host@backend`) and the pool inside it.
///
/// Ordering is by agent, then pool; the scheduler uses it as the final tie-break, so two pools
/// with equal weights always rank the same way.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PoolRef {
    /// The storage agent that owns the pool (one per storage node and backend).
    pub agent: String,
    /// The pool's name inside the agent (an LVM volume group or thin pool).
    pub pool: String,
}

impl PoolRef {
    /// Builds a pool reference.
    pub fn new(agent: impl Into<String>, pool: impl Into<String>) -> Self {
        PoolRef {
            agent: agent.into(),
            pool: pool.into(),
        }
    }
}

impl fmt::Display for PoolRef {
    /// `agent#pool`, the way Cinder writes `host@backend#pool`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.agent, self.pool)
    }
}

/// A capacity figure as an agent reports it.
///
/// Cinder lets a backend say `'unknown'` (it cannot tell) or `'infinite'` (it never runs out);
/// both are kept as such instead of being squeezed into a number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capacity {
    /// A measured amount.
    Known(Bytes),
    /// The backend cannot tell.
    Unknown,
    /// The backend never runs out.
    Infinite,
}

impl Capacity {
    /// The amount, when it is a number.
    pub fn known(self) -> Option<Bytes> {
        match self {
            Capacity::Known(b) => Some(b),
            Capacity::Unknown | Capacity::Infinite => None,
        }
    }
}

/// How a volume is laid out on a pool, which decides how the capacity filter and weigher count
/// it and what [`PoolState::consume`] charges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provisioning {
    /// Blocks are allocated on write; the volume counts against the over-subscription limit.
    Thin,
    /// Every block is allocated at creation; the volume counts against free space.
    Thick,
}

/// Capability names the scheduler answers from [`PoolState`]'s typed fields. They take
/// precedence over the free-form map so the two can never disagree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BuiltIn {
    PoolName,
    Backend,
    AvailabilityZone,
    ThinProvisioning,
    ThickProvisioning,
}

impl BuiltIn {
    /// The built-in answering `name`, if any.
    pub(crate) fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "pool_name" => BuiltIn::PoolName,
            "backend" => BuiltIn::Backend,
            "availability_zone" => BuiltIn::AvailabilityZone,
            "thin_provisioning_support" | "thin_provisioning" => BuiltIn::ThinProvisioning,
            "thick_provisioning_support" | "thick_provisioning" => BuiltIn::ThickProvisioning,
            _ => return None,
        })
    }
}

/// See [`PoolState::provisioning_for`].
pub(crate) fn provisioning(thin: bool, thick: bool, wants_thin: bool) -> Provisioning {
    if thin && (wants_thin || !thick) {
        Provisioning::Thin
    } else {
        Provisioning::Thick
    }
}

/// `size` rounded up to a multiple of `extent` (no rounding for a zero extent); `None` on
/// overflow.
pub(crate) fn round_to_extent(size: Bytes, extent: Bytes) -> Option<Bytes> {
    if extent.get() == 0 {
        Some(size)
    } else {
        size.round_up(extent)
    }
}

/// Cinder's spelling of a boolean capability.
fn bool_capability(b: bool) -> &'static str {
    if b {
        "True"
    } else {
        "False"
    }
}

/// One pool as the scheduler sees it: the latest agent report plus the in-memory charges of
/// placements made since.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolState {
    /// Which pool this is.
    pub id: PoolRef,
    /// The availability zone (CSI topology segment) the pool serves.
    pub zone: String,
    /// Size of the pool.
    pub total: Capacity,
    /// Space not yet allocated.
    pub free: Capacity,
    /// Sum of the sizes of every volume on the pool, thin ones at their full virtual size
    /// (Cinder's `provisioned_capacity_gb`).
    pub provisioned: Bytes,
    /// Sum of the sizes of the volumes Cinderblock itself placed here
    /// (Cinder's `allocated_capacity_gb`).
    pub allocated: Bytes,
    /// The pool can create thin volumes.
    pub thin_provisioning: bool,
    /// The pool can create thick volumes.
    pub thick_provisioning: bool,
    /// Percentage of `total` held back from new volumes (0..=100; larger values count as 100).
    pub reserved_percentage: u8,
    /// How far thin volumes may over-subscribe `total`; 1.0 means not at all.
    pub max_over_subscription_ratio: f64,
    /// Free-form capabilities matched by volume-type extra specs (`media=ssd`,
    /// `multiattach=True`, …). `pool_name`, `backend`, `availability_zone`,
    /// `thin_provisioning[_support]` and `thick_provisioning[_support]` are answered from the
    /// typed fields instead; see [`PoolState::capability`].
    pub capabilities: BTreeMap<String, String>,
    /// Number of volumes on the pool.
    pub volume_count: u64,
    /// Allocation unit: requests are rounded up to a multiple of it (the LVM extent size).
    /// Zero means "no rounding".
    pub extent: Bytes,
    /// The agent is reachable and reported the pool as usable.
    pub healthy: bool,
}

impl PoolState {
    /// The LVM default extent size.
    pub const DEFAULT_EXTENT: Bytes = Bytes::mib(4);

    /// An empty, healthy, thick-only pool of `total` bytes with no reserve, 4 MiB extents and no
    /// free-form capabilities.
    pub fn new(id: PoolRef, zone: impl Into<String>, total: Bytes) -> Self {
        PoolState {
            id,
            zone: zone.into(),
            total: Capacity::Known(total),
            free: Capacity::Known(total),
            provisioned: Bytes(0),
            allocated: Bytes(0),
            thin_provisioning: false,
            thick_provisioning: true,
            reserved_percentage: 0,
            max_over_subscription_ratio: 1.0,
            capabilities: BTreeMap::new(),
            volume_count: 0,
            extent: Self::DEFAULT_EXTENT,
            healthy: true,
        }
    }

    /// The value of capability `name`: a built-in derived from the typed fields, else the entry
    /// in [`PoolState::capabilities`].
    pub fn capability(&self, name: &str) -> Option<&str> {
        match BuiltIn::from_name(name) {
            Some(b) => Some(self.built_in(b)),
            None => self.capabilities.get(name).map(String::as_str),
        }
    }

    /// The value of a built-in capability.
    pub(crate) fn built_in(&self, b: BuiltIn) -> &str {
        match b {
            BuiltIn::PoolName => &self.id.pool,
            BuiltIn::Backend => &self.id.agent,
            BuiltIn::AvailabilityZone => &self.zone,
            BuiltIn::ThinProvisioning => bool_capability(self.thin_provisioning),
            BuiltIn::ThickProvisioning => bool_capability(self.thick_provisioning),
        }
    }

    /// How a volume lands on this pool when its type does (`wants_thin`) or does not ask for
    /// thin provisioning.
    ///
    /// A thin-capable pool provisions thin when the type wants it, and also when the pool cannot
    /// do thick at all, because that is what the volume will really be. Everything else is
    /// thick. Whether a type that insists on thick may land on a thin-only pool is a
    /// capabilities question (`thick_provisioning_support <is> True`), not a capacity one.
    pub fn provisioning_for(&self, wants_thin: bool) -> Provisioning {
        provisioning(self.thin_provisioning, self.thick_provisioning, wants_thin)
    }

    /// `size` rounded up to the pool's extent; `None` if that overflows.
    pub fn rounded_size(&self, size: Bytes) -> Option<Bytes> {
        round_to_extent(size, self.extent)
    }

    /// Charges a new volume of `size` to this pool until the agent reports again, and returns
    /// the charge (the size rounded up to the extent).
    ///
    /// Every volume adds to `provisioned`, `allocated` and `volume_count`. Only a thick volume
    /// takes `free` space: a new thin volume allocates nothing yet, and the over-subscription
    /// limit (which counts `provisioned`) is what bounds a burst of them. Cinder subtracts free
    /// space for both; that would make a burst of thin volumes stall on a pool that has room.
    pub fn consume(&mut self, size: Bytes, provisioning: Provisioning) -> Bytes {
        let charge = self.rounded_size(size).unwrap_or(Bytes(u64::MAX));
        self.provisioned = Bytes(self.provisioned.get().saturating_add(charge.get()));
        self.allocated = Bytes(self.allocated.get().saturating_add(charge.get()));
        self.volume_count = self.volume_count.saturating_add(1);
        if provisioning == Provisioning::Thick {
            if let Capacity::Known(free) = self.free {
                self.free = Capacity::Known(Bytes(free.get().saturating_sub(charge.get())));
            }
        }
        charge
    }

    /// Undoes [`PoolState::consume`] for a volume of `size` that was deleted or whose creation
    /// failed. Free space never grows past a known total.
    pub fn release(&mut self, size: Bytes, provisioning: Provisioning) -> Bytes {
        let charge = self.rounded_size(size).unwrap_or(Bytes(u64::MAX));
        self.provisioned = Bytes(self.provisioned.get().saturating_sub(charge.get()));
        self.allocated = Bytes(self.allocated.get().saturating_sub(charge.get()));
        self.volume_count = self.volume_count.saturating_sub(1);
        if provisioning == Provisioning::Thick {
            if let Capacity::Known(free) = self.free {
                let mut grown = free.get().saturating_add(charge.get());
                if let Capacity::Known(total) = self.total {
                    grown = grown.min(total.get());
                }
                self.free = Capacity::Known(Bytes(grown));
            }
        }
        charge
    }
}

/// Every pool the scheduler may place on, kept sorted by [`PoolRef`] with no duplicates, so that
/// iteration order is also the tie-break order.
///
/// The set also keeps a dictionary-encoded copy of each pool's zone, agent and capabilities
/// (see `index.rs`), which is why pools are changed only through its methods.
#[derive(Clone, Debug, Default)]
pub struct PoolSet {
    /// Sorted by `id`, ids unique.
    pools: Vec<PoolState>,
    /// Position for position with `pools`.
    index: Index,
}

impl PartialEq for PoolSet {
    /// Same pools; the index is derived from them.
    fn eq(&self, other: &Self) -> bool {
        self.pools == other.pools
    }
}

impl PoolSet {
    /// An empty set.
    pub fn new() -> Self {
        PoolSet::default()
    }

    /// A set holding `pools`; two pools with the same id are an error.
    pub fn from_pools(pools: impl IntoIterator<Item = PoolState>) -> Result<Self, SchedulerError> {
        let mut pools: Vec<PoolState> = pools.into_iter().collect();
        pools.sort_by(|a, b| a.id.cmp(&b.id));
        if let Some(pair) = pools.windows(2).find(|w| w[0].id == w[1].id) {
            return Err(SchedulerError::DuplicatePool(pair[0].id.clone()));
        }
        let mut index = Index::default();
        for (pos, pool) in pools.iter().enumerate() {
            index.insert(pos, pool);
        }
        Ok(PoolSet { pools, index })
    }

    /// Inserts `pool`, or replaces the pool with the same id (a fresh agent report). Returns the
    /// state it replaced.
    pub fn upsert(&mut self, pool: PoolState) -> Option<PoolState> {
        match self.position(&pool.id) {
            Ok(i) => {
                self.index.replace(i, &pool);
                Some(std::mem::replace(&mut self.pools[i], pool))
            }
            Err(i) => {
                self.index.insert(i, &pool);
                self.pools.insert(i, pool);
                None
            }
        }
    }

    /// Removes the pool `id` (its agent went away).
    pub fn remove(&mut self, id: &PoolRef) -> Option<PoolState> {
        let i = self.position(id).ok()?;
        self.index.remove(i);
        Some(self.pools.remove(i))
    }

    /// The pool `id`.
    pub fn get(&self, id: &PoolRef) -> Option<&PoolState> {
        self.position(id).ok().map(|i| &self.pools[i])
    }

    /// The pools, sorted by id.
    pub fn as_slice(&self) -> &[PoolState] {
        &self.pools
    }

    /// The pools, sorted by id.
    pub fn iter(&self) -> std::slice::Iter<'_, PoolState> {
        self.pools.iter()
    }

    /// Number of pools.
    pub fn len(&self) -> usize {
        self.pools.len()
    }

    /// Whether there are no pools.
    pub fn is_empty(&self) -> bool {
        self.pools.is_empty()
    }

    /// Charges `request` to pool `id` (see [`PoolState::consume`]) and returns the charge.
    pub fn consume(&mut self, id: &PoolRef, request: &Request) -> Result<Bytes, SchedulerError> {
        let wants_thin = request.wants_thin()?;
        self.charge(id, |pool| {
            let provisioning = pool.provisioning_for(wants_thin);
            pool.consume(request.size, provisioning)
        })
    }

    /// Gives back the charge of a volume of `size` placed on pool `id` (see
    /// [`PoolState::release`]) and returns it.
    pub fn release(
        &mut self,
        id: &PoolRef,
        size: Bytes,
        provisioning: Provisioning,
    ) -> Result<Bytes, SchedulerError> {
        self.charge(id, |pool| pool.release(size, provisioning))
    }

    /// The dictionary-encoded columns.
    pub(crate) fn index(&self) -> &Index {
        &self.index
    }

    /// The position of pool `id` in [`PoolSet::as_slice`].
    pub(crate) fn position_of(&self, id: &PoolRef) -> Option<usize> {
        self.position(id).ok()
    }

    /// Applies a charge to pool `id` and refreshes the index. `f` changes only numbers: zone,
    /// agent and capabilities stay as they are.
    fn charge(
        &mut self,
        id: &PoolRef,
        f: impl FnOnce(&mut PoolState) -> Bytes,
    ) -> Result<Bytes, SchedulerError> {
        let Ok(pos) = self.position(id) else {
            return Err(SchedulerError::UnknownPool(id.clone()));
        };
        let pool = &mut self.pools[pos];
        let charged = f(pool);
        self.index.refresh(pos, pool);
        Ok(charged)
    }

    fn position(&self, id: &PoolRef) -> Result<usize, usize> {
        self.pools.binary_search_by(|p| p.id.cmp(id))
    }
}

impl<'a> IntoIterator for &'a PoolSet {
    type Item = &'a PoolState;
    type IntoIter = std::slice::Iter<'a, PoolState>;

    fn into_iter(self) -> Self::IntoIter {
        self.pools.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(agent: &str, name: &str) -> PoolState {
        PoolState::new(PoolRef::new(agent, name), "z1", Bytes::gib(100))
    }

    #[test]
    fn pool_ref_display_and_order() {
        let a = PoolRef::new("node-a", "vg0");
        assert_eq!(a.to_string(), "node-a#vg0");
        let mut refs = [
            PoolRef::new("b", "a"),
            PoolRef::new("a", "z"),
            PoolRef::new("a", "b"),
        ];
        refs.sort();
        let shown: Vec<String> = refs.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["a#b", "a#z", "b#a"]);
    }

    #[test]
    fn provisioning_for_table() {
        // (thin capable, thick capable, type wants thin, expected)
        let cases = [
            (true, true, true, Provisioning::Thin),
            (true, true, false, Provisioning::Thick),
            (true, false, true, Provisioning::Thin),
            (true, false, false, Provisioning::Thin),
            (false, true, true, Provisioning::Thick),
            (false, true, false, Provisioning::Thick),
            (false, false, true, Provisioning::Thick),
        ];
        for (thin, thick, wants_thin, want) in cases {
            let mut p = pool("a", "p");
            p.thin_provisioning = thin;
            p.thick_provisioning = thick;
            assert_eq!(
                p.provisioning_for(wants_thin),
                want,
                "thin={thin} thick={thick} wants_thin={wants_thin}"
            );
        }
    }

    #[test]
    fn built_in_capabilities_win_over_the_map() {
        let mut p = pool("node-a", "vg0");
        p.thin_provisioning = true;
        p.capabilities
            .insert("thin_provisioning_support".into(), "False".into());
        p.capabilities.insert("media".into(), "ssd".into());
        let cases = [
            ("pool_name", Some("vg0")),
            ("backend", Some("node-a")),
            ("availability_zone", Some("z1")),
            ("thin_provisioning_support", Some("True")),
            ("thin_provisioning", Some("True")),
            ("thick_provisioning_support", Some("True")),
            ("media", Some("ssd")),
            ("iops", None),
        ];
        for (name, want) in cases {
            assert_eq!(p.capability(name), want, "{name}");
        }
    }

    #[test]
    fn consume_and_release_thick() {
        let mut p = pool("a", "p");
        let charged = p.consume(Bytes::mib(5), Provisioning::Thick);
        assert_eq!(charged, Bytes::mib(8));
        assert_eq!(
            p.free,
            Capacity::Known(Bytes(Bytes::gib(100).get() - Bytes::mib(8).get()))
        );
        assert_eq!(p.provisioned, Bytes::mib(8));
        assert_eq!(p.allocated, Bytes::mib(8));
        assert_eq!(p.volume_count, 1);

        let released = p.release(Bytes::mib(5), Provisioning::Thick);
        assert_eq!(released, Bytes::mib(8));
        assert_eq!(p.free, Capacity::Known(Bytes::gib(100)));
        assert_eq!(p.provisioned, Bytes(0));
        assert_eq!(p.allocated, Bytes(0));
        assert_eq!(p.volume_count, 0);

        // Releasing more than was charged never goes below zero nor above the total.
        p.release(Bytes::gib(1), Provisioning::Thick);
        assert_eq!(p.free, Capacity::Known(Bytes::gib(100)));
        assert_eq!(p.provisioned, Bytes(0));
        assert_eq!(p.volume_count, 0);
    }

    #[test]
    fn consume_thin_leaves_free_space() {
        let mut p = pool("a", "p");
        p.thin_provisioning = true;
        p.consume(Bytes::gib(10), Provisioning::Thin);
        assert_eq!(p.free, Capacity::Known(Bytes::gib(100)));
        assert_eq!(p.provisioned, Bytes::gib(10));
        assert_eq!(p.volume_count, 1);
    }

    #[test]
    fn consume_with_unknown_or_infinite_free_keeps_it() {
        for free in [Capacity::Unknown, Capacity::Infinite] {
            let mut p = pool("a", "p");
            p.free = free;
            p.consume(Bytes::gib(1), Provisioning::Thick);
            assert_eq!(p.free, free);
            assert_eq!(p.provisioned, Bytes::gib(1));
        }
    }

    #[test]
    fn zero_extent_means_no_rounding() {
        let mut p = pool("a", "p");
        p.extent = Bytes(0);
        assert_eq!(p.rounded_size(Bytes(7)), Some(Bytes(7)));
        p.extent = Bytes::mib(4);
        assert_eq!(p.rounded_size(Bytes(7)), Some(Bytes::mib(4)));
        assert_eq!(p.rounded_size(Bytes(u64::MAX)), None);
    }

    #[test]
    fn pool_set_sorts_rejects_duplicates_and_upserts() {
        let set = PoolSet::from_pools([pool("b", "p"), pool("a", "q"), pool("a", "p")]);
        let set = match set {
            Ok(s) => s,
            Err(e) => panic!("unexpected error: {e}"),
        };
        let ids: Vec<String> = set.iter().map(|p| p.id.to_string()).collect();
        assert_eq!(ids, ["a#p", "a#q", "b#p"]);

        let dup = PoolSet::from_pools([pool("a", "p"), pool("b", "p"), pool("a", "p")]);
        assert_eq!(
            dup.err().map(|e| e.to_string()),
            Some("pool a#p is listed twice".to_string())
        );

        let mut set = set;
        let mut fresh = pool("a", "q");
        fresh.volume_count = 7;
        let old = set.upsert(fresh);
        assert_eq!(old.map(|p| p.volume_count), Some(0));
        assert_eq!(
            set.get(&PoolRef::new("a", "q")).map(|p| p.volume_count),
            Some(7)
        );
        assert_eq!(set.upsert(pool("0", "first")), None);
        assert_eq!(set.as_slice()[0].id, PoolRef::new("0", "first"));
        assert_eq!(set.len(), 4);
        assert_eq!(
            set.remove(&PoolRef::new("b", "p")).map(|p| p.id),
            Some(PoolRef::new("b", "p"))
        );
        assert_eq!(set.len(), 3);
    }

    #[test]
    fn pool_set_consume_unknown_pool() {
        let mut set = PoolSet::new();
        let err = set.consume(&PoolRef::new("x", "y"), &Request::new(Bytes::gib(1)));
        assert_eq!(
            err.err().map(|e| e.to_string()),
            Some("unknown pool x#y".to_string())
        );
    }
}
