//! The weighers: one raw number per candidate pool, normalised to 0..=1 across the candidates,
//! multiplied by a signed multiplier and summed.
//!
//! What the weighers need from a pool ([`Inputs`]) is worked out when the pool's state changes,
//! so a decision only copies numbers into one column per weigher and normalises it.
//!
//! # Normalisation
//!
//! Min–max over the candidates: the smallest raw value becomes 0, the largest 1; when every
//! candidate has the same value, all become 0. Two raw values are not ordinary numbers:
//!
//! - [`TOP`] ranks above every number (normalised 1). It stands one step above the largest
//!   number, a step being a tenth of the numbers' spread (or 1 unit if they are all equal), so
//!   the numbers keep their spacing, as Cinder does for `'infinite'`.
//! - [`BOTTOM`] ranks below every number (normalised 0), one step below the smallest.
//!
//! # CapacityWeigher's raw value
//!
//! - Free `Unknown` or total `Unknown`: the least desirable value, whatever the multiplier's
//!   sign (BOTTOM when spreading, TOP when stacking), as Cinder does: a pool that cannot tell
//!   its capacity is the last resort.
//! - Free `Infinite`: TOP. Total `Infinite`: TOP when provisioning thin; else the free space
//!   (a reserve of an infinite total is not computed).
//! - Thin (the provisioning this request gets, with a ratio of at least 1.0): virtual free
//!   capacity, `total × ratio - provisioned - reserved`, as Cinder computes it.
//! - Otherwise: `free - reserved`.

use super::config::{WeigherConfig, WeigherKind};
use super::filters::reserved_bytes;
use super::pool::{Capacity, PoolState, Provisioning};

/// Fraction of the numbers' spread between them and a [`TOP`] or [`BOTTOM`].
const OUTLIER_STEP: f64 = 0.1;

/// The raw value above every number.
pub(crate) const TOP: f64 = f64::INFINITY;

/// The raw value below every number.
pub(crate) const BOTTOM: f64 = f64::NEG_INFINITY;

/// The raw value of weigher `kind` for `pool`: a finite number, [`TOP`] or [`BOTTOM`].
#[cfg(test)]
pub(crate) fn raw_value(
    kind: WeigherKind,
    pool: &PoolState,
    wants_thin: bool,
    multiplier: f64,
) -> f64 {
    Inputs::of(pool).raw(kind, wants_thin, multiplier)
}

/// What the weighers need from one pool, worked out when the pool's state changes rather than
/// on every decision. [`PoolSet`](super::PoolSet) keeps one per pool.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Inputs {
    /// CapacityWeigher's value when the type does not / does want thin provisioning; NaN when
    /// the capacity is unknown (the least desirable value, which depends on the multiplier).
    capacity: [f64; 2],
    allocated: f64,
    volumes: f64,
}

impl Inputs {
    /// The inputs for `pool`.
    pub(crate) fn of(pool: &PoolState) -> Self {
        Inputs {
            capacity: [capacity_value(pool, false), capacity_value(pool, true)],
            allocated: pool.allocated.get() as f64,
            volumes: pool.volume_count as f64,
        }
    }

    /// Weigher `kind`'s raw value: a finite number, [`TOP`] or [`BOTTOM`].
    #[cfg(test)]
    pub(crate) fn raw(&self, kind: WeigherKind, wants_thin: bool, multiplier: f64) -> f64 {
        match kind {
            WeigherKind::CapacityWeigher => self.capacity_raw(wants_thin, multiplier),
            WeigherKind::AllocatedCapacityWeigher => self.allocated,
            WeigherKind::VolumeNumberWeigher => self.volumes,
        }
    }

    /// CapacityWeigher's raw value; unknown capacity is the least desirable value for the
    /// multiplier's sign.
    #[inline]
    fn capacity_raw(&self, wants_thin: bool, multiplier: f64) -> f64 {
        let raw = self.capacity[usize::from(wants_thin)];
        if !raw.is_nan() {
            raw
        } else if multiplier >= 0.0 {
            BOTTOM
        } else {
            TOP
        }
    }
}

/// CapacityWeigher's raw value, NaN for "unknown" (see the module docs).
fn capacity_value(pool: &PoolState, wants_thin: bool) -> f64 {
    let ratio = pool.max_over_subscription_ratio;
    let thin = pool.provisioning_for(wants_thin) == Provisioning::Thin && ratio >= 1.0;
    match (pool.total, pool.free) {
        (Capacity::Unknown, _) | (_, Capacity::Unknown) => f64::NAN,
        (_, Capacity::Infinite) => TOP,
        (Capacity::Infinite, Capacity::Known(_)) if thin => TOP,
        (Capacity::Infinite, Capacity::Known(free)) => free.get() as f64,
        (Capacity::Known(total), Capacity::Known(free)) => {
            let reserved = reserved_bytes(total, pool.reserved_percentage) as f64;
            // An infinite ratio on an empty pool (0 × ∞) gives NaN: as good as unknown.
            if thin {
                total.get() as f64 * ratio - pool.provisioned.get() as f64 - reserved
            } else {
                free.get() as f64 - reserved
            }
        }
    }
}

/// The min–max map of one weigher's raw values onto 0..=1 (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Scale {
    lo: f64,
    range: f64,
    /// Every value maps to 0 (they are all equal).
    flat: bool,
}

impl Scale {
    /// Fits the scale to one weigher's raw values. Branch-free over the values: this runs once
    /// per weigher over every candidate.
    pub(crate) fn fit(raws: &[f64]) -> Self {
        let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
        let (mut min_all, mut max_all) = (f64::INFINITY, f64::NEG_INFINITY);
        for &raw in raws {
            min_all = min_all.min(raw);
            max_all = max_all.max(raw);
            let finite = raw.is_finite();
            lo = lo.min(if finite { raw } else { f64::INFINITY });
            hi = hi.max(if finite { raw } else { f64::NEG_INFINITY });
        }
        let any_top = max_all == TOP;
        let any_bottom = min_all == BOTTOM;
        let all_same = min_all == max_all;
        if lo > hi {
            // No finite numbers at all.
            lo = 0.0;
            hi = 0.0;
        }
        let step = if hi > lo {
            (hi - lo) * OUTLIER_STEP
        } else {
            1.0
        };
        let lo = if any_bottom { lo - step } else { lo };
        let hi = if any_top { hi + step } else { hi };
        let range = hi - lo;
        Scale {
            lo,
            range,
            flat: raws.is_empty() || all_same || range.is_nan() || range <= 0.0,
        }
    }

    /// Whether every value maps to 0.
    pub(crate) fn is_flat(&self) -> bool {
        self.flat
    }

    /// `raw` mapped onto 0..=1 (for a scale that is not flat). [`TOP`] divides to +∞ and
    /// [`BOTTOM`] to -∞, which the clamp turns into 1 and 0; numbers already fall in 0..=1.
    pub(crate) fn apply(&self, raw: f64) -> f64 {
        ((raw - self.lo) / self.range).clamp(0.0, 1.0)
    }
}

/// The summed weight of each candidate: every active weigher's raw values, normalised across
/// the candidates, multiplied and added up. `inputs` yields each candidate's [`Inputs`], in
/// candidate order; it is walked once per weigher.
pub(crate) fn weigh<'i, I>(weighers: &[WeigherConfig], wants_thin: bool, inputs: I) -> Vec<f64>
where
    I: ExactSizeIterator<Item = &'i Inputs> + Clone,
{
    let mut totals = vec![0.0; inputs.len()];
    let mut column = Vec::with_capacity(inputs.len());
    for weigher in weighers {
        let multiplier = weigher.multiplier();
        if multiplier == 0.0 {
            continue;
        }
        column.clear();
        // One loop per weigher kind, so the loop body does not branch on it.
        match weigher.name {
            WeigherKind::CapacityWeigher => column.extend(
                inputs
                    .clone()
                    .map(|i| i.capacity_raw(wants_thin, multiplier)),
            ),
            WeigherKind::AllocatedCapacityWeigher => {
                column.extend(inputs.clone().map(|i| i.allocated));
            }
            WeigherKind::VolumeNumberWeigher => column.extend(inputs.clone().map(|i| i.volumes)),
        }
        let scale = Scale::fit(&column);
        if scale.is_flat() {
            // Every value normalises to 0 and adds nothing.
            continue;
        }
        for (total, &raw) in totals.iter_mut().zip(&column) {
            *total += multiplier * scale.apply(raw);
        }
    }
    totals
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::pool::PoolRef;
    use crate::types::Bytes;

    fn normalised(raws: &[f64]) -> Vec<f64> {
        let scale = Scale::fit(raws);
        raws.iter()
            .map(|&r| if scale.is_flat() { 0.0 } else { scale.apply(r) })
            .collect()
    }

    #[test]
    fn normalise_table() {
        let cases: [(&[f64], &[f64]); 9] = [
            (&[], &[]),
            (&[5.0], &[0.0]),
            (&[5.0, 5.0], &[0.0, 0.0]),
            (&[0.0, 5.0, 10.0], &[0.0, 0.5, 1.0]),
            (&[-10.0, 10.0], &[0.0, 1.0]),
            (&[TOP, TOP], &[0.0, 0.0]),
            (&[BOTTOM, TOP], &[0.0, 1.0]),
            // TOP sits one step (10% of the spread) above the largest number.
            (&[0.0, 10.0, TOP], &[0.0, 10.0 / 11.0, 1.0]),
            // Equal numbers: a step of 1 unit.
            (&[3.0, BOTTOM, 3.0], &[1.0, 0.0, 1.0]),
        ];
        for (raws, want) in cases {
            assert_eq!(normalised(raws), want, "{raws:?}");
        }
    }

    fn pool(name: &str, total: u64, free: u64) -> PoolState {
        let mut p = PoolState::new(PoolRef::new("a", name), "z1", Bytes::gib(total));
        p.free = Capacity::Known(Bytes::gib(free));
        p
    }

    fn weigh(weighers: &[WeigherConfig], pools: &[PoolState]) -> Vec<f64> {
        let inputs: Vec<Inputs> = pools.iter().map(Inputs::of).collect();
        super::weigh(weighers, true, inputs.iter())
    }

    #[test]
    fn capacity_raw_table() {
        use Capacity::{Infinite, Known, Unknown};
        let g = |n| Known(Bytes::gib(n));
        // (total, free, reserved %, thin ratio (None = thick), provisioned GiB, multiplier,
        // raw in GiB)
        type Case = (Capacity, Capacity, u8, Option<f64>, u64, f64, f64);
        let cases: [Case; 12] = [
            (g(100), g(40), 0, None, 0, 1.0, 40.0),
            (g(100), g(40), 10, None, 0, 1.0, 30.0),
            (g(100), g(5), 10, None, 0, 1.0, -5.0),
            // Virtual free: total × ratio - provisioned - reserved.
            (g(100), g(40), 10, Some(3.0), 120, 1.0, 170.0),
            // A ratio below 1 counts as thick.
            (g(100), g(40), 0, Some(0.5), 120, 1.0, 40.0),
            (g(0), g(0), 0, Some(f64::INFINITY), 0, 1.0, BOTTOM),
            (g(100), Unknown, 0, None, 0, 1.0, BOTTOM),
            (g(100), Unknown, 0, None, 0, -1.0, TOP),
            (Unknown, g(5), 0, None, 0, 1.0, BOTTOM),
            (g(100), Infinite, 0, None, 0, 1.0, TOP),
            (Infinite, g(5), 0, None, 0, -1.0, 5.0),
            (Infinite, g(5), 0, Some(2.0), 0, -1.0, TOP),
        ];
        for (total, free, pct, ratio, provisioned, multiplier, want) in cases {
            let mut p = pool("p", 0, 0);
            p.total = total;
            p.free = free;
            p.reserved_percentage = pct;
            p.provisioned = Bytes::gib(provisioned);
            if let Some(r) = ratio {
                p.thin_provisioning = true;
                p.max_over_subscription_ratio = r;
            }
            let raw = raw_value(WeigherKind::CapacityWeigher, &p, true, multiplier);
            assert_eq!(
                raw / Bytes::GIB as f64,
                want,
                "{total:?} {free:?} {pct}% ratio={ratio:?} m={multiplier}"
            );
        }
    }

    #[test]
    fn spread_and_stack() {
        let pools = [pool("a", 100, 10), pool("b", 100, 60), pool("c", 100, 110)];
        let spread = weigh(&[WeigherKind::CapacityWeigher.into()], &pools);
        assert_eq!(spread, [0.0, 0.5, 1.0]);
        let stack = weigh(
            &[WeigherConfig::new(WeigherKind::CapacityWeigher, -2.0)],
            &pools,
        );
        assert_eq!(stack, [0.0, -1.0, -2.0]);
        let off = weigh(
            &[WeigherConfig::new(WeigherKind::CapacityWeigher, 0.0)],
            &pools,
        );
        assert_eq!(off, [0.0, 0.0, 0.0]);
        assert_eq!(weigh(&[], &pools), [0.0, 0.0, 0.0]);
    }

    #[test]
    fn volume_number_and_allocated_capacity() {
        let mut pools = [
            pool("a", 100, 100),
            pool("b", 100, 100),
            pool("c", 100, 100),
        ];
        for (p, (count, allocated)) in pools.iter_mut().zip([(4, 10), (0, 30), (2, 20)]) {
            p.volume_count = count;
            p.allocated = Bytes::gib(allocated);
        }
        let by_count = weigh(&[WeigherKind::VolumeNumberWeigher.into()], &pools);
        assert_eq!(by_count, [-1.0, 0.0, -0.5]);
        let by_allocated = weigh(&[WeigherKind::AllocatedCapacityWeigher.into()], &pools);
        assert_eq!(by_allocated, [0.0, -1.0, -0.5]);
        let both = weigh(
            &[
                WeigherKind::VolumeNumberWeigher.into(),
                WeigherConfig::new(WeigherKind::AllocatedCapacityWeigher, -0.5),
            ],
            &pools,
        );
        assert_eq!(both, [-1.0, -0.5, -0.75]);
    }
}
