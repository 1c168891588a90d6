//! The filters, and the reason each one gives for turning a pool down.
//!
//! # CapacityFilter, as implemented
//!
//! The request is first rounded up to the pool's extent. A thin placement on a pool whose
//! over-subscription ratio is below 1.0 (or NaN) is rejected as misconfigured before anything
//! else. Then, in order:
//!
//! 1. Free capacity `Infinite` passes. Free capacity `Unknown` also passes, as in Cinder (a
//!    backend that cannot tell is given the benefit of the doubt; if the create fails, the
//!    volume is rescheduled), and the pool is listed in
//!    [`Decision::capacity_unknown`](super::Decision::capacity_unknown) so the caller can say so.
//! 2. Total capacity `Unknown`/`Infinite`: a non-zero reserve cannot be computed, so the pool is
//!    rejected; with no reserve, the known free space must still hold the volume (thick:
//!    `free >= size`; thin: `free × ratio >= size`; the over-subscription bound needs a total
//!    and is skipped). Cinder passes such a pool without looking at free space at all.
//! 3. A total of zero is rejected.
//! 4. `reserved = floor(total × reserved% / 100)`, `available = free - reserved`.
//! 5. Thin (see [`PoolState::provisioning_for`]):
//!    - over-subscription: `provisioned + size <= total × ratio`;
//!    - the pool must have space left: `available > 0`;
//!    - Cinder's "adjusted free virtual" rule: `available × ratio >= size`.
//!
//!    With a ratio of 1.0 this is the thick rule plus the provisioned bound.
//! 6. Thick: `available >= size`.

use std::cell::Cell;
use std::collections::BTreeSet;
use std::fmt;

use crate::types::Bytes;

use super::capabilities::Outcome;
use super::plan::{AgentRule, Plan};
use super::pool::{provisioning, round_to_extent, Capacity, PoolState, Provisioning};

/// Why a pool cannot take the volume. `Display` gives the human-readable reason; the variants
/// keep the numbers for callers and tests. Borrows from the pool set and the request, so
/// rejecting thousands of pools allocates nothing.
#[derive(Clone, Debug, PartialEq)]
pub enum Rejection<'a> {
    /// The pool is marked unhealthy (its agent is down or reported it unusable). Always checked.
    Unhealthy,
    /// The request excludes this pool because an earlier attempt on it failed. Always checked.
    Excluded,
    /// AvailabilityZoneFilter: the pool's zone is not requisite.
    Zone {
        /// The pool's zone.
        zone: &'a str,
        /// The zones the request accepts.
        requisite: &'a BTreeSet<String>,
    },
    /// AffinityFilter: the request wants one of `wanted` and this pool's agent is not one.
    NotSameBackend {
        /// The pool's agent.
        agent: &'a str,
        /// The agents the request accepts.
        wanted: &'a BTreeSet<String>,
    },
    /// AffinityFilter: the request wants an agent other than this pool's.
    NotDifferentBackend {
        /// The pool's agent.
        agent: &'a str,
    },
    /// CapacityFilter: not enough room.
    Capacity(CapacityShortfall),
    /// CapabilitiesFilter: an extra spec is not satisfied.
    Capability {
        /// The capability's name.
        name: &'a str,
        /// The extra spec's value as written.
        wanted: &'a str,
        /// What is wrong with the pool's value.
        problem: CapabilityProblem<'a>,
    },
}

/// What the CapacityFilter found lacking.
#[derive(Clone, Debug, PartialEq)]
pub enum CapacityShortfall {
    /// The size overflows when rounded up to the pool's extent.
    SizeOverflow {
        /// The requested size.
        requested: Bytes,
    },
    /// The total is unknown or infinite, so a non-zero reserve cannot be computed.
    ReserveOfUnknownTotal {
        /// The pool's reserve.
        reserved_percentage: u8,
    },
    /// The pool reports a total of zero.
    ZeroTotal,
    /// A thin pool's over-subscription ratio is below 1.0 or NaN.
    InvalidRatio {
        /// The ratio reported.
        ratio: f64,
    },
    /// Thick: the space left after the reserve is smaller than the volume.
    Thick {
        /// The size, rounded to the extent.
        needed: Bytes,
        /// Free space after the reserve (zero if the reserve exceeds free space).
        available: Bytes,
        /// The pool's reserve.
        reserved_percentage: u8,
    },
    /// Thin: the volume would push the provisioned total past `total × ratio`.
    OverSubscribed {
        /// The size, rounded to the extent.
        needed: Bytes,
        /// Already provisioned on the pool.
        provisioned: Bytes,
        /// The pool's total.
        total: Bytes,
        /// The pool's maximum over-subscription ratio.
        ratio: f64,
    },
    /// Thin: the reserve takes all remaining free space.
    ThinNoSpace {
        /// The pool's reserve.
        reserved_percentage: u8,
    },
    /// Thin: `(free - reserve) × ratio` is smaller than the volume.
    ThinVirtualFree {
        /// The size, rounded to the extent.
        needed: Bytes,
        /// Free space after the reserve.
        available: Bytes,
        /// The pool's reserve.
        reserved_percentage: u8,
        /// The pool's maximum over-subscription ratio.
        ratio: f64,
    },
}

/// What is wrong with a pool's capability value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CapabilityProblem<'a> {
    /// The pool does not report the capability.
    Missing,
    /// The value does not satisfy the spec.
    Mismatch {
        /// The pool's value.
        actual: &'a str,
    },
    /// A numeric operator met a value that is not a number.
    NotNumeric {
        /// The pool's value.
        actual: &'a str,
    },
    /// `<is>` met a value that is not a boolean.
    NotBoolean {
        /// The pool's value.
        actual: &'a str,
    },
}

/// A size for a human: exact GiB or MiB, or bytes below 1 MiB, as such; anything else in GiB
/// with two decimals.
struct Size(u64);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_multiple_of(Bytes::MIB) || self.0 < Bytes::MIB {
            write!(f, "{}", Bytes(self.0))
        } else {
            write!(f, "{:.2}GiB", Bytes(self.0).as_gib_f64())
        }
    }
}

/// ", after N% reserved" unless N is 0.
struct Reserve(u8);

impl fmt::Display for Reserve {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            Ok(())
        } else {
            write!(f, " after {}% reserved", self.0)
        }
    }
}

/// `a, b, c`.
struct List<'a>(&'a BTreeSet<String>);

impl fmt::Display for List<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(s)?;
        }
        Ok(())
    }
}

impl fmt::Display for Rejection<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::Unhealthy => f.write_str("pool is unhealthy"),
            Rejection::Excluded => f.write_str("excluded: an earlier attempt on this pool failed"),
            Rejection::Zone { zone, requisite } => write!(
                f,
                "zone {zone:?} is not among the requisite zones ({})",
                List(requisite)
            ),
            Rejection::NotSameBackend { agent, wanted } => write!(
                f,
                "same-backend affinity: agent {agent} is not one of ({})",
                List(wanted)
            ),
            Rejection::NotDifferentBackend { agent } => {
                write!(f, "different-backend affinity: agent {agent} is excluded")
            }
            Rejection::Capacity(c) => c.fmt(f),
            Rejection::Capability {
                name,
                wanted,
                problem,
            } => match problem {
                CapabilityProblem::Missing => {
                    write!(f, "capability {name} is not reported (wanted {wanted:?})")
                }
                CapabilityProblem::Mismatch { actual } => {
                    write!(f, "capability {name}={actual} does not satisfy {wanted:?}")
                }
                CapabilityProblem::NotNumeric { actual } => write!(
                    f,
                    "capability {name}={actual} is not a number (wanted {wanted:?})"
                ),
                CapabilityProblem::NotBoolean { actual } => write!(
                    f,
                    "capability {name}={actual} is not a boolean (wanted {wanted:?})"
                ),
            },
        }
    }
}

impl fmt::Display for CapacityShortfall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CapacityShortfall::SizeOverflow { requested } => write!(
                f,
                "{} overflows when rounded up to the pool's extent",
                Size(requested.get())
            ),
            CapacityShortfall::ReserveOfUnknownTotal {
                reserved_percentage,
            } => write!(
                f,
                "total capacity is unknown, so {reserved_percentage}% cannot be reserved"
            ),
            CapacityShortfall::ZeroTotal => f.write_str("pool reports a total capacity of zero"),
            CapacityShortfall::InvalidRatio { ratio } => write!(
                f,
                "thin pool's max_over_subscription_ratio {ratio} is below 1.0"
            ),
            CapacityShortfall::Thick {
                needed,
                available,
                reserved_percentage,
            } => write!(
                f,
                "needs {}, {} free{}",
                Size(needed.get()),
                Size(available.get()),
                Reserve(*reserved_percentage)
            ),
            CapacityShortfall::OverSubscribed {
                needed,
                provisioned,
                total,
                ratio,
            } => write!(
                f,
                "needs {} thin, {} already provisioned of {} allowed ({} total x {ratio} max over-subscription)",
                Size(needed.get()),
                Size(provisioned.get()),
                Size(virtual_total(*total, *ratio)),
                Size(total.get()),
            ),
            CapacityShortfall::ThinNoSpace {
                reserved_percentage,
            } => write!(f, "thin pool has no free space{}", Reserve(*reserved_percentage)),
            CapacityShortfall::ThinVirtualFree {
                needed,
                available,
                reserved_percentage,
                ratio,
            } => write!(
                f,
                "needs {} thin, {} free{} x {ratio} max over-subscription = {} virtual free",
                Size(needed.get()),
                Size(available.get()),
                Reserve(*reserved_percentage),
                Size(scaled(*available, *ratio)),
            ),
        }
    }
}

/// `total × ratio` in bytes, saturating.
fn virtual_total(total: Bytes, ratio: f64) -> u64 {
    scaled(total, ratio)
}

/// `b × ratio` in bytes, saturating (float to int casts saturate).
fn scaled(b: Bytes, ratio: f64) -> u64 {
    (b.get() as f64 * ratio) as u64
}

/// `floor(total × pct / 100)`, with percentages above 100 counted as 100.
pub(crate) fn reserved_bytes(total: Bytes, pct: u8) -> u64 {
    let pct = u64::from(pct.min(100));
    let total = total.get();
    // floor(t × p / 100) = (t / 100) × p + floor((t % 100) × p / 100), without overflow.
    total / 100 * pct + total % 100 * pct / 100
}

/// How a pool passed the CapacityFilter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CapacityCheck {
    /// There is room, or the pool never runs out.
    Fits,
    /// The pool cannot tell its free space; passed on trust.
    Unknown,
}

/// Which kind of [`Capacity`] a packed amount is (one byte instead of [`Capacity`]'s eight).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AmountKind {
    Known,
    Unknown,
    Infinite,
}

fn pack(c: Capacity) -> (u64, AmountKind) {
    match c {
        Capacity::Known(b) => (b.get(), AmountKind::Known),
        Capacity::Unknown => (0, AmountKind::Unknown),
        Capacity::Infinite => (0, AmountKind::Infinite),
    }
}

fn unpack(amount: u64, kind: AmountKind) -> Capacity {
    match kind {
        AmountKind::Known => Capacity::Known(Bytes(amount)),
        AmountKind::Unknown => Capacity::Unknown,
        AmountKind::Infinite => Capacity::Infinite,
    }
}

/// What the CapacityFilter reads from a pool: a packed copy of [`PoolState`]'s numbers (56
/// bytes), which the pool set's index keeps per pool so that the per-pool loop reads one cache
/// line instead of the pool's three.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct CapacityInputs {
    total: u64,
    free: u64,
    provisioned: u64,
    extent: u64,
    ratio: f64,
    /// `floor(total × pct / 100)`, 0 when the total is not known.
    reserved: u64,
    total_kind: AmountKind,
    free_kind: AmountKind,
    /// Clamped to 100.
    reserved_percentage: u8,
    thin: bool,
    thick: bool,
    /// [`PoolState::healthy`], kept here because it is read in the same loop.
    pub(crate) healthy: bool,
}

impl CapacityInputs {
    /// The inputs for `pool`.
    pub(crate) fn of(pool: &PoolState) -> Self {
        let (total, total_kind) = pack(pool.total);
        let (free, free_kind) = pack(pool.free);
        CapacityInputs {
            total,
            free,
            provisioned: pool.provisioned.get(),
            extent: pool.extent.get(),
            ratio: pool.max_over_subscription_ratio,
            reserved: pool
                .total
                .known()
                .map_or(0, |total| reserved_bytes(total, pool.reserved_percentage)),
            total_kind,
            free_kind,
            reserved_percentage: pool.reserved_percentage.min(100),
            thin: pool.thin_provisioning,
            thick: pool.thick_provisioning,
            healthy: pool.healthy,
        }
    }

    fn total(&self) -> Capacity {
        unpack(self.total, self.total_kind)
    }

    fn free(&self) -> Capacity {
        unpack(self.free, self.free_kind)
    }

    /// See [`PoolState::provisioning_for`].
    pub(crate) fn provisioning_for(&self, wants_thin: bool) -> Provisioning {
        provisioning(self.thin, self.thick, wants_thin)
    }
}

/// The requested size rounded up to a pool's extent, remembering the last extent seen: the
/// pools of a fleet mostly share one extent size, and a 64-bit division per pool is not free.
pub(crate) struct SizeRounder {
    requested: Bytes,
    /// (extent, rounded size) last computed.
    last: Cell<(Bytes, Option<Bytes>)>,
}

impl SizeRounder {
    /// A rounder for `requested`.
    pub(crate) fn new(requested: Bytes) -> Self {
        SizeRounder {
            requested,
            last: Cell::new((Bytes(0), round_to_extent(requested, Bytes(0)))),
        }
    }

    /// The size rounded up to `extent`; `None` on overflow.
    pub(crate) fn rounded(&self, extent: Bytes) -> Option<Bytes> {
        let (last_extent, last) = self.last.get();
        if last_extent == extent {
            return last;
        }
        let rounded = round_to_extent(self.requested, extent);
        self.last.set((extent, rounded));
        rounded
    }
}

/// Whether the pool described by `pool` has room for `size` provisioned as `provisioning`.
pub(crate) fn capacity(
    pool: &CapacityInputs,
    size: &SizeRounder,
    provisioning: Provisioning,
) -> Result<CapacityCheck, Rejection<'static>> {
    let reject = |s: CapacityShortfall| Err(Rejection::Capacity(s));
    let Some(needed) = size.rounded(Bytes(pool.extent)) else {
        return reject(CapacityShortfall::SizeOverflow {
            requested: size.requested,
        });
    };
    let pct = pool.reserved_percentage;
    let ratio = pool.ratio;
    let thin = provisioning == Provisioning::Thin;
    if thin && (ratio.is_nan() || ratio < 1.0) {
        return reject(CapacityShortfall::InvalidRatio { ratio });
    }
    let free = match pool.free() {
        Capacity::Infinite => return Ok(CapacityCheck::Fits),
        Capacity::Unknown => return Ok(CapacityCheck::Unknown),
        Capacity::Known(free) => free,
    };
    let total = match pool.total() {
        Capacity::Known(total) => total,
        Capacity::Unknown | Capacity::Infinite => {
            if pct > 0 {
                return reject(CapacityShortfall::ReserveOfUnknownTotal {
                    reserved_percentage: pct,
                });
            }
            let room = if thin {
                scaled(free, ratio)
            } else {
                free.get()
            };
            if room >= needed.get() {
                return Ok(CapacityCheck::Fits);
            }
            return reject(if thin {
                CapacityShortfall::ThinVirtualFree {
                    needed,
                    available: free,
                    reserved_percentage: 0,
                    ratio,
                }
            } else {
                CapacityShortfall::Thick {
                    needed,
                    available: free,
                    reserved_percentage: 0,
                }
            });
        }
    };
    if total.get() == 0 {
        return reject(CapacityShortfall::ZeroTotal);
    }
    let available = Bytes(free.get().saturating_sub(pool.reserved));
    if thin {
        let would_provision = pool.provisioned as f64 + needed.get() as f64;
        if would_provision > total.get() as f64 * ratio {
            return reject(CapacityShortfall::OverSubscribed {
                needed,
                provisioned: Bytes(pool.provisioned),
                total,
                ratio,
            });
        }
        if available.get() == 0 {
            return reject(CapacityShortfall::ThinNoSpace {
                reserved_percentage: pct,
            });
        }
        if (available.get() as f64 * ratio) < needed.get() as f64 {
            return reject(CapacityShortfall::ThinVirtualFree {
                needed,
                available,
                reserved_percentage: pct,
                ratio,
            });
        }
    } else if available < needed {
        return reject(CapacityShortfall::Thick {
            needed,
            available,
            reserved_percentage: pct,
        });
    }
    Ok(CapacityCheck::Fits)
}

/// AvailabilityZoneFilter: the pool's zone must be requisite, if the request lists any.
pub(crate) fn availability_zone<'a>(plan: &Plan<'a>, pos: usize) -> Result<(), Rejection<'a>> {
    if plan.zone_is_requisite(pos) {
        Ok(())
    } else {
        Err(Rejection::Zone {
            zone: plan.zone_name(pos),
            requisite: &plan.request.requisite_zones,
        })
    }
}

/// AffinityFilter: same-backend then different-backend, at the agent level.
pub(crate) fn affinity<'a>(plan: &Plan<'a>, pos: usize) -> Result<(), Rejection<'a>> {
    let agent = || plan.agent_name(pos);
    match plan.agent_rule(pos) {
        AgentRule::Allowed => Ok(()),
        AgentRule::NotSame => Err(Rejection::NotSameBackend {
            agent: agent(),
            wanted: &plan.request.same_backend_as,
        }),
        AgentRule::NotDifferent => Err(Rejection::NotDifferentBackend { agent: agent() }),
    }
}

/// CapabilitiesFilter: every spec must be satisfied; the first one (in key order) that is not
/// is reported.
pub(crate) fn capabilities<'a>(plan: &Plan<'a>, pos: usize) -> Result<(), Rejection<'a>> {
    let Some(unmet) = plan.first_unmet_spec(pos) else {
        return Ok(());
    };
    let problem = match (unmet.actual, unmet.outcome) {
        (None, _) => CapabilityProblem::Missing,
        (Some(actual), Outcome::NotNumeric) => CapabilityProblem::NotNumeric { actual },
        (Some(actual), Outcome::NotBoolean) => CapabilityProblem::NotBoolean { actual },
        (Some(actual), Outcome::Mismatch | Outcome::Match) => {
            CapabilityProblem::Mismatch { actual }
        }
    };
    Err(Rejection::Capability {
        name: unmet.name,
        wanted: unmet.raw,
        problem,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::super::config::FilterKind;
    use super::super::pool::{PoolRef, PoolSet};
    use super::super::request::Request;
    use super::*;

    /// Runs one of the plan-based filters on a single pool.
    fn run(filter: FilterKind, pool: PoolState, request: &Request) -> Result<(), String> {
        let pools = PoolSet::from_pools([pool]).map_err(|e| e.to_string())?;
        let plan = Plan::new(&pools, request, &[filter]).map_err(|e| e.to_string())?;
        let pool = &pools.as_slice()[0];
        let verdict = match filter {
            FilterKind::AvailabilityZoneFilter => availability_zone(&plan, 0),
            FilterKind::AffinityFilter => affinity(&plan, 0),
            FilterKind::CapabilitiesFilter => capabilities(&plan, 0),
            FilterKind::CapacityFilter => capacity(
                &CapacityInputs::of(pool),
                &SizeRounder::new(request.size),
                pool.provisioning_for(true),
            )
            .map(|_| ()),
        };
        verdict.map_err(|r| r.to_string())
    }

    /// A pool of `total` GiB with `free` GiB free and `pct`% reserved.
    fn pool(total: u64, free: u64, pct: u8) -> PoolState {
        let mut p = PoolState::new(PoolRef::new("a", "p"), "z1", Bytes::gib(total));
        p.free = Capacity::Known(Bytes::gib(free));
        p.reserved_percentage = pct;
        p
    }

    fn thin(mut p: PoolState, provisioned: u64, ratio: f64) -> PoolState {
        p.thin_provisioning = true;
        p.thick_provisioning = false;
        p.provisioned = Bytes::gib(provisioned);
        p.max_over_subscription_ratio = ratio;
        p
    }

    /// What a capacity table expects: how the pool passes, or the rejection message.
    type Want = Result<CapacityCheck, &'static str>;

    fn check(p: &PoolState, size: Bytes) -> Result<CapacityCheck, String> {
        capacity(
            &CapacityInputs::of(p),
            &SizeRounder::new(size),
            p.provisioning_for(true),
        )
        .map_err(|r| r.to_string())
    }

    #[test]
    fn thick_reserved_percentage_table() {
        // (total GiB, free GiB, reserved %, request GiB, outcome)
        let cases: [(u64, u64, u8, u64, Want); 8] = [
            (100, 50, 0, 50, Ok(CapacityCheck::Fits)),
            (100, 50, 0, 51, Err("needs 51GiB, 50GiB free")),
            (100, 20, 10, 10, Ok(CapacityCheck::Fits)),
            (
                100,
                20,
                10,
                11,
                Err("needs 11GiB, 10GiB free after 10% reserved"),
            ),
            (
                100,
                13,
                10,
                10,
                Err("needs 10GiB, 3GiB free after 10% reserved"),
            ),
            (100, 5, 10, 1, Err("needs 1GiB, 0B free after 10% reserved")),
            (
                100,
                100,
                100,
                1,
                Err("needs 1GiB, 0B free after 100% reserved"),
            ),
            // Percentages above 100 count as 100.
            (
                100,
                100,
                250,
                1,
                Err("needs 1GiB, 0B free after 100% reserved"),
            ),
        ];
        for (total, free, pct, size, want) in cases {
            let p = pool(total, free, pct);
            assert_eq!(
                check(&p, Bytes::gib(size)),
                want.map_err(str::to_string),
                "total={total} free={free} reserved={pct}% size={size}"
            );
        }
    }

    #[test]
    fn reserve_is_floored_in_bytes() {
        // 10% of 1 GiB + 5 bytes is floor(107374182.9) = 107374182 bytes.
        assert_eq!(reserved_bytes(Bytes(Bytes::GIB + 5), 10), 107_374_182);
        assert_eq!(reserved_bytes(Bytes(u64::MAX), 100), u64::MAX);
        assert_eq!(reserved_bytes(Bytes::gib(10), 0), 0);
    }

    #[test]
    fn extent_rounding_counts() {
        // 9 GiB + 1 byte rounds to 9 GiB + 4 MiB and no longer fits in 9 GiB.
        let p = pool(100, 9, 0);
        assert_eq!(
            check(&p, Bytes(Bytes::GIB * 9 + 1)),
            Err("needs 9220MiB, 9GiB free".to_string())
        );
        let mut odd = pool(100, 9, 0);
        odd.extent = Bytes(3);
        odd.free = Capacity::Known(Bytes(10));
        assert_eq!(
            check(&odd, Bytes(11)),
            Err("needs 12B, 10B free".to_string())
        );
        assert_eq!(
            check(&p, Bytes(u64::MAX)),
            Err(format!(
                "{:.2}GiB overflows when rounded up to the pool's extent",
                Bytes(u64::MAX).as_gib_f64()
            ))
        );
    }

    #[test]
    fn thin_over_subscription_table() {
        // (total, free, reserved %, provisioned, ratio, request, outcome), sizes in GiB.
        type Case = (u64, u64, u8, u64, f64, u64, Want);
        let cases: [Case; 10] = [
            // provisioned + size <= total × ratio
            (100, 100, 0, 190, 2.0, 10, Ok(CapacityCheck::Fits)),
            (
                100,
                100,
                0,
                191,
                2.0,
                10,
                Err("needs 10GiB thin, 191GiB already provisioned of 200GiB allowed (100GiB total x 2 max over-subscription)"),
            ),
            // Over-subscribing beyond free space is the point of thin provisioning.
            (100, 10, 0, 150, 20.0, 100, Ok(CapacityCheck::Fits)),
            // The adjusted free rule: (free - reserve) × ratio >= size.
            (
                100,
                12,
                10,
                0,
                2.0,
                5,
                Err("needs 5GiB thin, 2GiB free after 10% reserved x 2 max over-subscription = 4GiB virtual free"),
            ),
            (100, 12, 10, 0, 2.0, 4, Ok(CapacityCheck::Fits)),
            // free - reserve must be positive.
            (100, 10, 10, 0, 20.0, 1, Err("thin pool has no free space after 10% reserved")),
            // Ratio 1 behaves like thick, plus the provisioned bound.
            (100, 30, 0, 0, 1.0, 30, Ok(CapacityCheck::Fits)),
            (
                100,
                30,
                0,
                0,
                1.0,
                31,
                Err("needs 31GiB thin, 30GiB free x 1 max over-subscription = 30GiB virtual free"),
            ),
            (
                100,
                90,
                0,
                95,
                1.0,
                10,
                Err("needs 10GiB thin, 95GiB already provisioned of 100GiB allowed (100GiB total x 1 max over-subscription)"),
            ),
            (100, 100, 0, 0, 0.5, 1, Err("thin pool's max_over_subscription_ratio 0.5 is below 1.0")),
        ];
        for (total, free, pct, provisioned, ratio, size, want) in cases {
            let p = thin(pool(total, free, pct), provisioned, ratio);
            assert_eq!(
                check(&p, Bytes::gib(size)),
                want.map_err(str::to_string),
                "total={total} free={free} reserved={pct}% provisioned={provisioned} ratio={ratio} size={size}"
            );
        }
    }

    #[test]
    fn nan_ratio_is_invalid_for_thin_only() {
        let p = thin(pool(100, 100, 0), 0, f64::NAN);
        assert_eq!(
            check(&p, Bytes::gib(1)),
            Err("thin pool's max_over_subscription_ratio NaN is below 1.0".to_string())
        );
        let mut thick = pool(100, 100, 0);
        thick.max_over_subscription_ratio = f64::NAN;
        assert_eq!(check(&thick, Bytes::gib(1)), Ok(CapacityCheck::Fits));
    }

    #[test]
    fn thick_request_on_thin_and_thick_pool_counts_free_space() {
        let mut p = thin(pool(100, 10, 0), 0, 20.0);
        p.thick_provisioning = true;
        let thick = capacity(
            &CapacityInputs::of(&p),
            &SizeRounder::new(Bytes::gib(50)),
            p.provisioning_for(false),
        );
        assert_eq!(
            thick.map_err(|r| r.to_string()),
            Err("needs 50GiB, 10GiB free".to_string())
        );
        assert_eq!(check(&p, Bytes::gib(50)), Ok(CapacityCheck::Fits));
    }

    #[test]
    fn unknown_and_infinite_capacity_table() {
        use Capacity::{Infinite, Known, Unknown};
        let g = Bytes::gib;
        // (total, free, reserved %, request GiB, outcome)
        let cases: [(Capacity, Capacity, u8, u64, Want); 9] = [
            (Known(g(100)), Infinite, 50, 1000, Ok(CapacityCheck::Fits)),
            (Known(g(100)), Unknown, 50, 1000, Ok(CapacityCheck::Unknown)),
            (Unknown, Unknown, 0, 1000, Ok(CapacityCheck::Unknown)),
            (Infinite, Infinite, 10, 1000, Ok(CapacityCheck::Fits)),
            (Infinite, Known(g(10)), 0, 10, Ok(CapacityCheck::Fits)),
            (Unknown, Known(g(10)), 0, 11, Err("needs 11GiB, 10GiB free")),
            (
                Unknown,
                Known(g(10)),
                5,
                1,
                Err("total capacity is unknown, so 5% cannot be reserved"),
            ),
            (
                Infinite,
                Known(g(10)),
                5,
                1,
                Err("total capacity is unknown, so 5% cannot be reserved"),
            ),
            (
                Known(g(0)),
                Known(g(0)),
                0,
                0,
                Err("pool reports a total capacity of zero"),
            ),
        ];
        for (total, free, pct, size, want) in cases {
            let mut p = pool(0, 0, pct);
            p.total = total;
            p.free = free;
            assert_eq!(
                check(&p, Bytes::gib(size)),
                want.map_err(str::to_string),
                "total={total:?} free={free:?} reserved={pct}% size={size}"
            );
        }
    }

    #[test]
    fn availability_zone_table() {
        let set = |zs: &[&str]| zs.iter().map(|z| z.to_string()).collect::<BTreeSet<_>>();
        // (pool zone, requisite, outcome)
        let cases = [
            ("z1", vec![], Ok(())),
            ("z1", vec!["z1", "z2"], Ok(())),
            (
                "z3",
                vec!["z1", "z2"],
                Err("zone \"z3\" is not among the requisite zones (z1, z2)"),
            ),
        ];
        for (zone, requisite, want) in cases {
            let mut p = pool(10, 10, 0);
            p.zone = zone.into();
            let mut r = Request::new(Bytes::gib(1));
            r.requisite_zones = set(&requisite);
            assert_eq!(
                run(FilterKind::AvailabilityZoneFilter, p, &r),
                want.map_err(str::to_string),
                "{zone} in {requisite:?}"
            );
        }
    }

    #[test]
    fn affinity_table() {
        let set = |xs: &[&str]| xs.iter().map(|x| x.to_string()).collect::<BTreeSet<_>>();
        // (pool agent, same_backend_as, different_backend_as, outcome)
        let cases = [
            ("a", vec![], vec![], Ok(())),
            ("a", vec!["a", "b"], vec![], Ok(())),
            (
                "c",
                vec!["a", "b"],
                vec![],
                Err("same-backend affinity: agent c is not one of (a, b)"),
            ),
            ("c", vec![], vec!["a"], Ok(())),
            (
                "a",
                vec![],
                vec!["a"],
                Err("different-backend affinity: agent a is excluded"),
            ),
        ];
        for (agent, same, different, want) in cases {
            let mut p = pool(10, 10, 0);
            p.id = PoolRef::new(agent, "p");
            let mut r = Request::new(Bytes::gib(1));
            r.same_backend_as = set(&same);
            r.different_backend_as = set(&different);
            assert_eq!(
                run(FilterKind::AffinityFilter, p, &r),
                want.map_err(str::to_string),
                "{agent} same={same:?} different={different:?}"
            );
        }
    }

    #[test]
    fn capabilities_table() {
        let mut p = pool(10, 10, 0);
        p.capabilities = [("media", "ssd"), ("iops", "5000"), ("multiattach", "True")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        // (extra specs, outcome)
        type Case<'c> = (&'c [(&'c str, &'c str)], Result<(), &'c str>);
        let cases: [Case<'_>; 9] = [
            (&[], Ok(())),
            (
                &[("media", "ssd"), ("capabilities:iops", ">= 1000")],
                Ok(()),
            ),
            (
                &[("multiattach", "<is> True"), ("qos:iops", "<= 1")],
                Ok(()),
            ),
            (&[("backend", "a"), ("pool_name", "<or> p <or> q")], Ok(())),
            (
                &[("media", "hdd")],
                Err("capability media=ssd does not satisfy \"hdd\""),
            ),
            (
                &[("capabilities:iops", ">= 10000")],
                Err("capability iops=5000 does not satisfy \">= 10000\""),
            ),
            (
                &[("capabilities:encryption", "<is> True")],
                Err("capability encryption is not reported (wanted \"<is> True\")"),
            ),
            (
                &[("media", ">= 3")],
                Err("capability media=ssd is not a number (wanted \">= 3\")"),
            ),
            (
                &[("media", "<is> True")],
                Err("capability media=ssd is not a boolean (wanted \"<is> True\")"),
            ),
        ];
        for (specs, want) in cases {
            let mut r = Request::new(Bytes::gib(1));
            r.extra_specs = specs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            assert_eq!(
                run(FilterKind::CapabilitiesFilter, p.clone(), &r),
                want.map_err(str::to_string),
                "{specs:?}"
            );
        }
    }

    #[test]
    fn size_display() {
        assert_eq!(Size(Bytes::GIB * 3).to_string(), "3GiB");
        assert_eq!(Size(Bytes::MIB * 5).to_string(), "5MiB");
        assert_eq!(Size(Bytes::GIB + Bytes::GIB / 2 + 1).to_string(), "1.50GiB");
        assert_eq!(Size(0).to_string(), "0B");
    }
}
