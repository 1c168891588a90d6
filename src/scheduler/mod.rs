//! Volume placement: OpenStack Cinder's filter scheduler as a pure function.
//!
//! Data in ([`PoolSet`], [`Request`], [`SchedulerConfig`]), decision out ([`Decision`]): the
//! pools ranked best first, and every other pool with the reason it was turned down. No I/O, no
//! clock, no randomness; the same input always gives the same answer.
//!
//! # Pipeline
//!
//! 1. **Always-on checks.** An unhealthy pool, or one the request excludes after a failed
//!    attempt on it, is rejected whatever the configuration says.
//! 2. **Filters**, in the configured order ([`FilterKind`]). A pool's first rejection is the one
//!    reported. Extra specs are parsed once per request, before any pool is looked at.
//! 3. **Weighers** ([`WeigherKind`]): each gives every surviving pool a raw number, normalised
//!    to 0..=1 across the survivors (min–max; all equal → 0), multiplied by the weigher's
//!    signed multiplier (positive spreads, negative stacks) and summed.
//! 4. **Ranking**, by preferred zone, then weight, then pool id (see below).
//!
//! # Preferred zones
//!
//! CSI asks a plugin to try preferred topologies "in order from first to last", so a pool in
//! the first preferred zone ranks above one in the second, which ranks above one in no
//! preferred zone, whatever the weights; weights order the pools within each of those tiers.
//! Requisite zones, by contrast, are a hard filter. With no preferred zones, the ranking is by
//! weight alone.
//!
//! # Ties
//!
//! Equal weights in the same tier are broken by [`PoolRef`] order (agent, then pool name), so
//! tests and retries are stable.
//!
//! # After a decision
//!
//! [`Scheduler::place`] (or [`PoolSet::consume`]) charges the volume to the chosen pool in
//! memory so the next decision of a burst sees it; [`PoolSet::release`] gives it back. If
//! creating the volume fails, [`Request::exclude_pool`] records the pool and
//! [`should_retry`] says whether another attempt is allowed.
//!
//! # Cost
//!
//! A decision is one pass over the pools plus one per weigher over the survivors; the full
//! ranking is sorted only if [`Decision::ranked`] is called. To keep that pass to array reads
//! and arithmetic, the [`PoolSet`] keeps, next to each pool, a packed copy of its numbers and a
//! dictionary-encoded copy of its zone, agent and capabilities (`index.rs`), and each request is
//! compiled against them once (`plan.rs`): an extra spec is evaluated once per distinct
//! capability value, not once per pool. `benches/scheduler.rs` measures 100 to 10 000 pools
//! against a budget of 1 ms.

mod capabilities;
mod config;
mod filters;
mod index;
mod plan;
mod pool;
mod request;
mod weighers;

use std::fmt;
use std::sync::OnceLock;

pub use capabilities::ExtraSpecError;
pub use config::{
    should_retry, ConfigError, FilterKind, SchedulerConfig, WeigherConfig, WeigherKind,
};
pub use filters::{CapabilityProblem, CapacityShortfall, Rejection};
pub use pool::{Capacity, PoolRef, PoolSet, PoolState, Provisioning};
pub use request::{Request, PROVISIONING_TYPE_KEY};

use filters::CapacityCheck;
use plan::Plan;

/// Why the scheduler could not decide.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// Every pool was rejected, or there are no pools. `reasons` has one entry per pool, in pool
    /// order. The message lists them all; a transport with a size limit should truncate it.
    #[error("no pool can hold the volume: {}", ReasonList(.reasons))]
    NoValidPool {
        /// Each pool and why it was rejected.
        reasons: Vec<(PoolRef, String)>,
    },
    /// A volume-type extra spec cannot be parsed; the request is wrong whatever the pools.
    #[error("extra spec {key}={value:?} is invalid")]
    InvalidExtraSpec {
        /// The key as written.
        key: String,
        /// The value as written.
        value: String,
        /// What is wrong with it.
        #[source]
        source: ExtraSpecError,
    },
    /// The configuration is unusable.
    #[error("invalid scheduler configuration")]
    InvalidConfig(#[source] ConfigError),
    /// Two pools with the same id were given to [`PoolSet::from_pools`].
    #[error("pool {0} is listed twice")]
    DuplicatePool(PoolRef),
    /// [`PoolSet::consume`] or [`PoolSet::release`] named a pool the set does not hold.
    #[error("unknown pool {0}")]
    UnknownPool(PoolRef),
}

/// `a#p: reason; b#q: reason`, or a note that there are no pools.
struct ReasonList<'a>(&'a [(PoolRef, String)]);

impl fmt::Display for ReasonList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("no pools are known");
        }
        for (i, (pool, reason)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{pool}: {reason}")?;
        }
        Ok(())
    }
}

/// The scheduler's answer: at least one pool, best first, and the pools it turned down.
///
/// Borrows from the [`PoolSet`] and the [`Request`]; clone [`Decision::best`] to keep the
/// answer past them (for instance to [`PoolSet::consume`] it).
///
/// The best pool is found in one pass; the full ranking is sorted the first time
/// [`Decision::ranked`] asks for it, since placing a volume needs only the best pool (a failed
/// attempt reschedules against fresh state, as Cinder does).
#[derive(Clone, Debug)]
pub struct Decision<'a> {
    best: &'a PoolRef,
    /// Every candidate as (rank key, pool, weight), in pool order.
    candidates: Vec<(u128, &'a PoolRef, f64)>,
    ranked: OnceLock<Vec<(&'a PoolRef, f64)>>,
    rejected: Vec<(&'a PoolRef, Rejection<'a>)>,
    capacity_unknown: Vec<&'a PoolRef>,
}

impl PartialEq for Decision<'_> {
    /// Same ranking, rejections and flags, whether or not the ranking was sorted yet.
    fn eq(&self, other: &Self) -> bool {
        self.best == other.best
            && self.ranked() == other.ranked()
            && self.rejected == other.rejected
            && self.capacity_unknown == other.capacity_unknown
    }
}

impl<'a> Decision<'a> {
    /// The pool to try first.
    pub fn best(&self) -> &'a PoolRef {
        self.best
    }

    /// Every pool that passed the filters, with its summed weight: by preferred-zone tier, then
    /// weight descending, then pool id. Never empty. Sorted on the first call.
    pub fn ranked(&self) -> &[(&'a PoolRef, f64)] {
        self.ranked.get_or_init(|| {
            // Sorting the bare keys (the candidate index is in their low bits) moves half the
            // bytes that sorting whole entries would.
            let mut keys: Vec<u128> = self.candidates.iter().map(|&(key, _, _)| key).collect();
            keys.sort_unstable();
            keys.iter()
                .filter_map(|&key| self.candidates.get((key & INDEX_MASK) as usize))
                .map(|&(_, pool, weight)| (pool, weight))
                .collect()
        })
    }

    /// Every pool that did not pass, with the reason, in pool order.
    pub fn rejected(&self) -> &[(&'a PoolRef, Rejection<'a>)] {
        &self.rejected
    }

    /// Ranked pools that passed the CapacityFilter only because their free capacity is
    /// `Unknown` (Cinder's "assume it fits; reschedule if it does not"). Worth a log line.
    pub fn capacity_unknown(&self) -> &[&'a PoolRef] {
        &self.capacity_unknown
    }
}

/// A validated configuration, ready to schedule.
#[derive(Clone, Debug, PartialEq)]
pub struct Scheduler {
    config: SchedulerConfig,
}

impl Scheduler {
    /// A scheduler for `config`, once [`SchedulerConfig::validate`] accepts it.
    pub fn new(config: SchedulerConfig) -> Result<Self, SchedulerError> {
        config.validate().map_err(SchedulerError::InvalidConfig)?;
        Ok(Scheduler { config })
    }

    /// The configuration in use.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Whether to try again after attempt number `attempt` (1 = the first) failed.
    pub fn should_retry(&self, attempt: u32) -> bool {
        self.config.should_retry(attempt)
    }

    /// Ranks the pools for `request`. Fails with [`SchedulerError::InvalidExtraSpec`] if the
    /// volume type's extra specs do not parse, and with [`SchedulerError::NoValidPool`] if
    /// every pool is rejected.
    pub fn schedule<'a>(
        &self,
        pools: &'a PoolSet,
        request: &'a Request,
    ) -> Result<Decision<'a>, SchedulerError> {
        let plan = Plan::new(pools, request, &self.config.filters)?;

        // Positions in the set, which is sorted by id: candidate order is tie-break order.
        let mut candidates: Vec<usize> = Vec::with_capacity(pools.len());
        let mut rejected = Vec::new();
        let mut capacity_unknown = Vec::new();
        for (pos, pool) in pools.iter().enumerate() {
            // `pool` is only an address here; its state is read on rejection only.
            match self.filter(&plan, pos) {
                Ok(check) => {
                    candidates.push(pos);
                    if check == CapacityCheck::Unknown {
                        capacity_unknown.push(&pool.id);
                    }
                }
                Err(why) => rejected.push((&pool.id, why)),
            }
        }

        let index = pools.index();
        let weights = weighers::weigh(
            &self.config.weighers,
            plan.wants_thin,
            candidates.iter().map(|&pos| index.weights(pos)),
        );
        let slice = pools.as_slice();
        let candidates: Vec<(u128, &'a PoolRef, f64)> = candidates
            .iter()
            .zip(&weights)
            .enumerate()
            .map(|(i, (&pos, &w))| (rank_key(plan.tier(pos), w, i), &slice[pos].id, w))
            .collect();
        let Some(&(_, best, _)) = candidates.iter().min_by_key(|&&(key, _, _)| key) else {
            return Err(SchedulerError::NoValidPool {
                reasons: rejected
                    .iter()
                    .map(|(pool, why)| ((*pool).clone(), why.to_string()))
                    .collect(),
            });
        };
        Ok(Decision {
            best,
            candidates,
            ranked: OnceLock::new(),
            rejected,
            capacity_unknown,
        })
    }

    /// Schedules `request`, charges it to the best pool (see [`PoolSet::consume`]) and returns
    /// that pool.
    pub fn place(&self, pools: &mut PoolSet, request: &Request) -> Result<PoolRef, SchedulerError> {
        let best = self.schedule(pools, request)?.best().clone();
        pools.consume(&best, request)?;
        Ok(best)
    }

    /// Runs the always-on checks and the configured filters on the pool at `pos`.
    fn filter<'a>(&self, plan: &Plan<'a>, pos: usize) -> Result<CapacityCheck, Rejection<'a>> {
        let capacity = plan.pools.index().capacity(pos);
        if !capacity.healthy {
            return Err(Rejection::Unhealthy);
        }
        if plan.is_excluded(pos) {
            return Err(Rejection::Excluded);
        }
        let mut check = CapacityCheck::Fits;
        for filter in &plan.filters {
            match filter {
                FilterKind::AvailabilityZoneFilter => filters::availability_zone(plan, pos)?,
                FilterKind::CapacityFilter => {
                    let provisioning = capacity.provisioning_for(plan.wants_thin);
                    check = filters::capacity(capacity, &plan.size, provisioning)?;
                }
                FilterKind::CapabilitiesFilter => filters::capabilities(plan, pos)?,
                FilterKind::AffinityFilter => filters::affinity(plan, pos)?,
            }
        }
        Ok(check)
    }
}

/// Low bits of a [`rank_key`] holding the candidate index.
const INDEX_MASK: u128 = (1 << 48) - 1;

/// One integer whose ascending order is the ranking: preference tier ascending (16 bits),
/// weight descending (64 bits), candidate index ascending (48 bits, i.e. pool id order).
/// Sorting these is several times cheaper than comparing tuples with a float in them.
fn rank_key(tier: u16, weight: f64, index: usize) -> u128 {
    // `+ 0.0` turns -0.0 into 0.0 so equal weights tie. For finite floats, flipping the sign
    // bit of positives and every bit of negatives gives an ascending unsigned order;
    // inverting it once more makes it descending.
    let bits = (weight + 0.0).to_bits();
    let ascending = if bits >> 63 == 0 {
        bits | 1 << 63
    } else {
        !bits
    };
    let descending = !ascending;
    (u128::from(tier) << 112) | (u128::from(descending) << 48) | (index as u128 & INDEX_MASK)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::types::Bytes;

    fn pool(agent: &str, name: &str, zone: &str, total_gib: u64, free_gib: u64) -> PoolState {
        let mut p = PoolState::new(PoolRef::new(agent, name), zone, Bytes::gib(total_gib));
        p.free = Capacity::Known(Bytes::gib(free_gib));
        p
    }

    fn set(pools: impl IntoIterator<Item = PoolState>) -> PoolSet {
        match PoolSet::from_pools(pools) {
            Ok(s) => s,
            Err(e) => panic!("bad test pools: {e}"),
        }
    }

    fn scheduler(config: SchedulerConfig) -> Scheduler {
        match Scheduler::new(config) {
            Ok(s) => s,
            Err(e) => panic!("bad test config: {e}"),
        }
    }

    fn strings(xs: &[&str]) -> BTreeSet<String> {
        xs.iter().map(|x| x.to_string()).collect()
    }

    /// The ranked pool ids, or the error message.
    fn ranking(s: &Scheduler, pools: &PoolSet, request: &Request) -> Result<Vec<String>, String> {
        s.schedule(pools, request)
            .map(|d| d.ranked().iter().map(|(p, _)| p.to_string()).collect())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn spread_vs_stack() {
        let pools = set([
            pool("a", "p", "z1", 100, 10),
            pool("b", "p", "z1", 100, 90),
            pool("c", "p", "z1", 100, 50),
        ]);
        let request = Request::new(Bytes::gib(5));
        // (capacity multiplier, ranking)
        let cases = [(1.0, ["b#p", "c#p", "a#p"]), (-1.0, ["a#p", "c#p", "b#p"])];
        for (multiplier, want) in cases {
            let s = scheduler(SchedulerConfig {
                weighers: vec![WeigherConfig::new(WeigherKind::CapacityWeigher, multiplier)],
                ..SchedulerConfig::default()
            });
            assert_eq!(
                ranking(&s, &pools, &request),
                Ok(want.map(str::to_string).to_vec()),
                "multiplier {multiplier}"
            );
        }
    }

    #[test]
    fn weights_are_reported() {
        let pools = set([
            pool("a", "p", "z1", 100, 10),
            pool("b", "p", "z1", 100, 90),
            pool("c", "p", "z1", 100, 50),
        ]);
        let s = scheduler(SchedulerConfig::default());
        let request = Request::new(Bytes::gib(5));
        let d = s.schedule(&pools, &request);
        let weights = d.map(|d| {
            d.ranked()
                .iter()
                .map(|(p, w)| (p.to_string(), *w))
                .collect::<Vec<_>>()
        });
        assert_eq!(
            weights.map_err(|e| e.to_string()),
            Ok(vec![
                ("b#p".to_string(), 1.0),
                ("c#p".to_string(), 0.5),
                ("a#p".to_string(), 0.0)
            ])
        );
    }

    #[test]
    fn volume_number_weigher_prefers_fewer_volumes() {
        let mut pools = vec![
            pool("a", "p", "z1", 100, 100),
            pool("b", "p", "z1", 100, 100),
            pool("c", "p", "z1", 100, 100),
        ];
        for (p, count) in pools.iter_mut().zip([5, 1, 3]) {
            p.volume_count = count;
        }
        let s = scheduler(SchedulerConfig {
            weighers: vec![WeigherKind::VolumeNumberWeigher.into()],
            ..SchedulerConfig::default()
        });
        assert_eq!(
            ranking(&s, &set(pools), &Request::new(Bytes::gib(1))),
            Ok(vec!["b#p".into(), "c#p".into(), "a#p".into()])
        );
    }

    #[test]
    fn ties_break_by_pool_id() {
        // Inserted out of order, identical capacity: ranking follows the id.
        let pools = set([
            pool("node-b", "vg0", "z1", 100, 50),
            pool("node-a", "vg1", "z1", 100, 50),
            pool("node-a", "vg0", "z1", 100, 50),
        ]);
        let s = scheduler(SchedulerConfig::default());
        let want = Ok(vec![
            "node-a#vg0".to_string(),
            "node-a#vg1".to_string(),
            "node-b#vg0".to_string(),
        ]);
        for _ in 0..3 {
            assert_eq!(ranking(&s, &pools, &Request::new(Bytes::gib(1))), want);
        }
    }

    #[test]
    fn zones_requisite_and_preferred() {
        let pools = set([
            pool("a", "p", "z1", 100, 90),
            pool("b", "p", "z2", 100, 20),
            pool("c", "p", "z3", 100, 50),
            pool("d", "p", "z2", 100, 60),
        ]);
        let s = scheduler(SchedulerConfig::default());
        // (requisite, preferred, ranking)
        type Case<'c> = (&'c [&'c str], &'c [&'c str], Result<Vec<&'c str>, &'c str>);
        let cases: [Case<'_>; 5] = [
            (&[], &[], Ok(vec!["a#p", "d#p", "c#p", "b#p"])),
            (&["z2", "z3"], &[], Ok(vec!["d#p", "c#p", "b#p"])),
            // Preferred tiers first, weight within a tier.
            (&[], &["z2"], Ok(vec!["d#p", "b#p", "a#p", "c#p"])),
            (&[], &["z3", "z2"], Ok(vec!["c#p", "d#p", "b#p", "a#p"])),
            (
                &["z9"],
                &["z1"],
                Err("no pool can hold the volume: \
                     a#p: zone \"z1\" is not among the requisite zones (z9); \
                     b#p: zone \"z2\" is not among the requisite zones (z9); \
                     c#p: zone \"z3\" is not among the requisite zones (z9); \
                     d#p: zone \"z2\" is not among the requisite zones (z9)"),
            ),
        ];
        for (requisite, preferred, want) in cases {
            let mut request = Request::new(Bytes::gib(1));
            request.requisite_zones = strings(requisite);
            request.preferred_zones = preferred.iter().map(|z| z.to_string()).collect();
            assert_eq!(
                ranking(&s, &pools, &request),
                want.map(|v| v.into_iter().map(str::to_string).collect())
                    .map_err(str::to_string),
                "requisite {requisite:?} preferred {preferred:?}"
            );
        }
    }

    #[test]
    fn affinity() {
        let pools = set([
            pool("a", "p", "z1", 100, 90),
            pool("a", "q", "z1", 100, 10),
            pool("b", "p", "z1", 100, 50),
        ]);
        let s = scheduler(SchedulerConfig::default());
        // (same_backend_as, different_backend_as, ranking)
        let cases: [(&[&str], &[&str], Vec<&str>); 3] = [
            (&["b"], &[], vec!["b#p"]),
            (&[], &["a"], vec!["b#p"]),
            (&["a", "b"], &["b"], vec!["a#p", "a#q"]),
        ];
        for (same, different, want) in cases {
            let mut request = Request::new(Bytes::gib(1));
            request.same_backend_as = strings(same);
            request.different_backend_as = strings(different);
            assert_eq!(
                ranking(&s, &pools, &request),
                Ok(want.into_iter().map(str::to_string).collect()),
                "same {same:?} different {different:?}"
            );
        }
    }

    #[test]
    fn capabilities_filter_through_schedule() {
        let mut fast = pool("a", "ssd", "z1", 100, 50);
        fast.capabilities.insert("media".into(), "ssd".into());
        let mut slow = pool("a", "hdd", "z1", 100, 90);
        slow.capabilities.insert("media".into(), "hdd".into());
        let bare = pool("b", "p", "z1", 100, 90);
        let pools = set([fast, slow, bare]);
        let s = scheduler(SchedulerConfig::default());
        let mut request = Request::new(Bytes::gib(1));
        request
            .extra_specs
            .insert("capabilities:media".into(), "ssd".into());
        let d = s.schedule(&pools, &request);
        let summary = d.map(|d| {
            (
                d.best().to_string(),
                d.rejected()
                    .iter()
                    .map(|(p, why)| format!("{p}: {why}"))
                    .collect::<Vec<_>>(),
            )
        });
        assert_eq!(
            summary.map_err(|e| e.to_string()),
            Ok((
                "a#ssd".to_string(),
                vec![
                    "a#hdd: capability media=hdd does not satisfy \"ssd\"".to_string(),
                    "b#p: capability media is not reported (wanted \"ssd\")".to_string(),
                ]
            ))
        );
    }

    #[test]
    fn bad_extra_spec_fails_before_any_pool() {
        let pools = set([pool("a", "p", "z1", 100, 50)]);
        let s = scheduler(SchedulerConfig::default());
        let mut request = Request::new(Bytes::gib(1));
        request
            .extra_specs
            .insert("iops".into(), "<at-least> 5".into());
        match s.schedule(&pools, &request) {
            Err(SchedulerError::InvalidExtraSpec { key, source, .. }) => {
                assert_eq!(key, "iops");
                assert_eq!(
                    source,
                    ExtraSpecError::UnknownOperator {
                        operator: "<at-least>".into()
                    }
                );
            }
            other => panic!("expected InvalidExtraSpec, got {other:?}"),
        }
    }

    #[test]
    fn filters_run_in_configured_order_and_first_rejection_wins() {
        // Too small AND in the wrong zone: the first configured filter names the reason.
        let pools = set([pool("a", "p", "z1", 10, 1)]);
        let mut request = Request::new(Bytes::gib(5));
        request.requisite_zones = strings(&["z2"]);
        let cases = [
            (
                vec![FilterKind::AvailabilityZoneFilter, FilterKind::CapacityFilter],
                "no pool can hold the volume: a#p: zone \"z1\" is not among the requisite zones (z2)",
            ),
            (
                vec![FilterKind::CapacityFilter, FilterKind::AvailabilityZoneFilter],
                "no pool can hold the volume: a#p: needs 5GiB, 1GiB free",
            ),
        ];
        for (filters, want) in cases {
            let s = scheduler(SchedulerConfig {
                filters: filters.clone(),
                ..SchedulerConfig::default()
            });
            assert_eq!(
                ranking(&s, &pools, &request),
                Err(want.to_string()),
                "{filters:?}"
            );
        }
        // With no filters, only the always-on checks apply.
        let s = scheduler(SchedulerConfig {
            filters: vec![],
            ..SchedulerConfig::default()
        });
        assert_eq!(ranking(&s, &pools, &request), Ok(vec!["a#p".to_string()]));
    }

    #[test]
    fn no_valid_pool_lists_every_pool_and_reason() {
        let mut sick = pool("a", "p", "z1", 100, 100);
        sick.healthy = false;
        let mut reserved = pool("b", "p", "z1", 100, 13);
        reserved.reserved_percentage = 10;
        let mut unknown_total = pool("c", "p", "z1", 100, 50);
        unknown_total.total = Capacity::Unknown;
        unknown_total.reserved_percentage = 5;
        let pools = set([
            sick,
            reserved,
            unknown_total,
            pool("d", "p", "z1", 100, 100),
        ]);
        let s = scheduler(SchedulerConfig::default());
        let mut request = Request::new(Bytes::gib(10));
        request.exclude_pool(PoolRef::new("d", "p"));
        match s.schedule(&pools, &request) {
            Err(err @ SchedulerError::NoValidPool { .. }) => {
                assert_eq!(
                    err.to_string(),
                    "no pool can hold the volume: \
                     a#p: pool is unhealthy; \
                     b#p: needs 10GiB, 3GiB free after 10% reserved; \
                     c#p: total capacity is unknown, so 5% cannot be reserved; \
                     d#p: excluded: an earlier attempt on this pool failed"
                );
                let SchedulerError::NoValidPool { reasons } = err else {
                    unreachable!()
                };
                let ids: Vec<String> = reasons.iter().map(|(p, _)| p.to_string()).collect();
                assert_eq!(ids, ["a#p", "b#p", "c#p", "d#p"]);
            }
            other => panic!("expected NoValidPool, got {other:?}"),
        }
        assert_eq!(
            ranking(&s, &PoolSet::new(), &request),
            Err("no pool can hold the volume: no pools are known".to_string())
        );
    }

    #[test]
    fn reschedule_excludes_the_failed_pool() {
        let pools = set([
            pool("a", "p", "z1", 100, 90),
            pool("b", "p", "z1", 100, 60),
            pool("c", "p", "z1", 100, 30),
        ]);
        let s = scheduler(SchedulerConfig::default());
        let mut request = Request::new(Bytes::gib(1));
        let mut tried = Vec::new();
        let mut attempt = 1;
        let outcome = loop {
            let best = match s.schedule(&pools, &request) {
                Ok(d) => d.best().clone(),
                Err(e) => break e.to_string(),
            };
            tried.push(best.to_string());
            // Every create fails in this test.
            if !s.should_retry(attempt) {
                break format!("gave up after attempt {attempt}");
            }
            request.exclude_pool(best);
            attempt += 1;
        };
        assert_eq!(tried, ["a#p", "b#p", "c#p"]);
        assert_eq!(outcome, "gave up after attempt 3");

        // With more attempts than pools, the last schedule says why nothing is left.
        let s = scheduler(SchedulerConfig {
            max_attempts: 10,
            ..SchedulerConfig::default()
        });
        let mut request = Request::new(Bytes::gib(1));
        for id in ["a", "b", "c"] {
            request.exclude_pool(PoolRef::new(id, "p"));
        }
        assert_eq!(
            ranking(&s, &pools, &request),
            Err("no pool can hold the volume: \
                 a#p: excluded: an earlier attempt on this pool failed; \
                 b#p: excluded: an earlier attempt on this pool failed; \
                 c#p: excluded: an earlier attempt on this pool failed"
                .to_string())
        );
    }

    #[test]
    fn consume_prevents_overfill_in_a_burst() {
        // 3 pools with room for 12, 10 and 8 volumes of 10 GiB: 30 placements fill them exactly,
        // the 31st finds no room.
        let mut pools = set([
            pool("a", "p", "z1", 120, 120),
            pool("b", "p", "z1", 100, 100),
            pool("c", "p", "z1", 80, 80),
        ]);
        let s = scheduler(SchedulerConfig::default());
        let request = Request::new(Bytes::gib(10));
        let mut placed: Vec<String> = Vec::new();
        for _ in 0..30 {
            match s.place(&mut pools, &request) {
                Ok(p) => placed.push(p.to_string()),
                Err(e) => panic!("placement {} failed: {e}", placed.len() + 1),
            }
            for p in &pools {
                let used = p.provisioned.get();
                assert!(
                    used <= Bytes::gib(120).get(),
                    "{} over-filled: {used}",
                    p.id
                );
                assert_eq!(
                    p.free.known().map(|f| f.get() + used),
                    p.total.known().map(Bytes::get),
                    "{}",
                    p.id
                );
            }
        }
        let count = |id: &str| placed.iter().filter(|p| *p == id).count();
        assert_eq!((count("a#p"), count("b#p"), count("c#p")), (12, 10, 8));
        // Spreading: each placement goes to the emptiest pool, ties to the smaller id.
        assert_eq!(placed[..4], ["a#p", "a#p", "a#p", "b#p"]);
        assert_eq!(
            s.place(&mut pools, &request).map_err(|e| e.to_string()),
            Err("no pool can hold the volume: \
                 a#p: needs 10GiB, 0B free; b#p: needs 10GiB, 0B free; c#p: needs 10GiB, 0B free"
                .to_string())
        );
        let freed = pools.release(&PoolRef::new("b", "p"), Bytes::gib(10), Provisioning::Thick);
        assert_eq!(freed.map_err(|e| e.to_string()), Ok(Bytes::gib(10)));
        assert_eq!(
            s.place(&mut pools, &request)
                .map(|p| p.to_string())
                .map_err(|e| e.to_string()),
            Ok("b#p".to_string())
        );
    }

    #[test]
    fn thin_burst_stops_at_the_over_subscription_limit() {
        let mut thin = pool("a", "thin", "z1", 100, 100);
        thin.thin_provisioning = true;
        thin.thick_provisioning = false;
        thin.max_over_subscription_ratio = 2.0;
        let mut pools = set([thin]);
        let s = scheduler(SchedulerConfig::default());
        let request = Request::new(Bytes::gib(30));
        let placed = (0..10)
            .map_while(|_| s.place(&mut pools, &request).ok())
            .count();
        // 6 × 30 GiB = 180 GiB <= 200 GiB; a 7th would make 210 GiB.
        assert_eq!(placed, 6);
        assert_eq!(
            pools
                .get(&PoolRef::new("a", "thin"))
                .map(|p| (p.provisioned, p.free)),
            Some((Bytes::gib(180), Capacity::Known(Bytes::gib(100))))
        );
    }

    #[test]
    fn unknown_capacity_passes_but_is_flagged_and_ranks_below_known() {
        let mut unknown = pool("a", "p", "z1", 100, 0);
        unknown.free = Capacity::Unknown;
        let mut infinite = pool("b", "p", "z1", 100, 0);
        infinite.free = Capacity::Infinite;
        let pools = set([
            unknown,
            infinite,
            pool("c", "p", "z1", 3000, 2000),
            pool("d", "p", "z1", 100, 50),
        ]);
        let request = Request::new(Bytes::gib(1000));
        // (capacity multiplier, ranking): spreading puts the infinite pool first; stacking puts
        // it last with the unknown one (Cinder ranks both as "infinite free" then); the unknown
        // pool is never preferred to a known one.
        let cases = [(1.0, ["b#p", "c#p", "a#p"]), (-1.0, ["c#p", "a#p", "b#p"])];
        for (multiplier, want) in cases {
            let s = scheduler(SchedulerConfig {
                weighers: vec![WeigherConfig::new(WeigherKind::CapacityWeigher, multiplier)],
                ..SchedulerConfig::default()
            });
            let d = s.schedule(&pools, &request);
            let summary = d.map(|d| {
                (
                    d.ranked()
                        .iter()
                        .map(|(p, _)| p.to_string())
                        .collect::<Vec<_>>(),
                    d.capacity_unknown()
                        .iter()
                        .map(|p| p.to_string())
                        .collect::<Vec<_>>(),
                    d.rejected()
                        .iter()
                        .map(|(p, w)| format!("{p}: {w}"))
                        .collect::<Vec<_>>(),
                )
            });
            assert_eq!(
                summary.map_err(|e| e.to_string()),
                Ok((
                    want.map(str::to_string).to_vec(),
                    vec!["a#p".to_string()],
                    vec!["d#p: needs 1000GiB, 50GiB free".to_string()],
                )),
                "multiplier {multiplier}"
            );
        }
    }

    #[test]
    fn thick_type_on_thin_pool() {
        let mut both = pool("a", "both", "z1", 100, 20);
        both.thin_provisioning = true;
        both.max_over_subscription_ratio = 10.0;
        let pools = set([both]);
        let s = scheduler(SchedulerConfig::default());
        let mut request = Request::new(Bytes::gib(50));
        assert_eq!(
            ranking(&s, &pools, &request),
            Ok(vec!["a#both".to_string()])
        );
        request
            .extra_specs
            .insert(PROVISIONING_TYPE_KEY.into(), "thick".into());
        assert_eq!(
            ranking(&s, &pools, &request),
            Err("no pool can hold the volume: a#both: needs 50GiB, 20GiB free".to_string())
        );
    }

    #[test]
    fn invalid_config_is_refused() {
        let err = Scheduler::new(SchedulerConfig {
            max_attempts: 0,
            ..SchedulerConfig::default()
        });
        match err {
            Err(SchedulerError::InvalidConfig(source)) => {
                assert_eq!(source, ConfigError::ZeroMaxAttempts)
            }
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn pool_updates_are_seen_by_the_next_decision() {
        let mut slow = pool("a", "p", "z1", 100, 50);
        slow.capabilities.insert("media".into(), "hdd".into());
        let mut pools = set([slow]);
        let s = scheduler(SchedulerConfig::default());
        let mut request = Request::new(Bytes::gib(1));
        request
            .extra_specs
            .insert("media".into(), "<or> ssd <or> nvme".into());
        request.requisite_zones = strings(&["z2"]);
        let decide = |pools: &PoolSet| ranking(&s, pools, &request);
        assert_eq!(
            decide(&pools),
            Err("no pool can hold the volume: \
                 a#p: zone \"z1\" is not among the requisite zones (z2)"
                .to_string())
        );

        // A fresh report moves the pool and changes its media; a new pool appears.
        let mut moved = pool("a", "p", "z2", 100, 50);
        moved.capabilities.insert("media".into(), "nvme".into());
        pools.upsert(moved);
        let mut other = pool("b", "p", "z2", 100, 90);
        other.capabilities.insert("media".into(), "ssd".into());
        other.capabilities.insert("iops".into(), "100".into());
        pools.upsert(other);
        assert_eq!(
            decide(&pools),
            Ok(vec!["b#p".to_string(), "a#p".to_string()])
        );

        pools.remove(&PoolRef::new("b", "p"));
        assert_eq!(decide(&pools), Ok(vec!["a#p".to_string()]));
        pools.remove(&PoolRef::new("a", "p"));
        assert_eq!(
            decide(&pools),
            Err("no pool can hold the volume: no pools are known".to_string())
        );
    }

    #[test]
    fn rank_key_orders_tier_then_weight_then_index() {
        // Each row must rank strictly before the next.
        let rows = [
            (0, 2.5, 9),
            (0, 0.0, 0),
            (0, -0.0, 1),
            (0, -1e-300, 0),
            (0, -7.0, 0),
            (1, 100.0, 0),
            (1, 100.0, 1),
            (u16::MAX, f64::MAX, 0),
        ];
        let keys: Vec<u128> = rows.iter().map(|&(t, w, i)| rank_key(t, w, i)).collect();
        for (pair, rows) in keys.windows(2).zip(rows.windows(2)) {
            assert!(
                pair[0] < pair[1],
                "{:?} should rank before {:?}",
                rows[0],
                rows[1]
            );
        }
        assert_eq!(rank_key(0, 1.0, 5) & INDEX_MASK, 5);
    }

    #[test]
    fn ranking_is_the_same_sorted_early_or_late() {
        let pools = set([
            pool("a", "p", "z1", 100, 10),
            pool("b", "p", "z2", 100, 90),
            pool("c", "p", "z1", 100, 50),
        ]);
        let s = scheduler(SchedulerConfig::default());
        let mut request = Request::new(Bytes::gib(1));
        request.preferred_zones = vec!["z1".into()];
        let (early, late) = match (s.schedule(&pools, &request), s.schedule(&pools, &request)) {
            (Ok(early), Ok(late)) => (early, late),
            other => panic!("unexpected: {other:?}"),
        };
        let shown: Vec<String> = early.ranked().iter().map(|(p, _)| p.to_string()).collect();
        assert_eq!(shown, ["c#p", "a#p", "b#p"]);
        assert_eq!(early.best(), &PoolRef::new("c", "p"));
        // `late` has not sorted its ranking yet; they still compare equal.
        assert_eq!(early, late);
    }
}
