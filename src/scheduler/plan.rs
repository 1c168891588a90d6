//! A request compiled against one [`PoolSet`]: everything a decision needs per pool, worked
//! out once per request, so that the per-pool loop is array reads and arithmetic.

use super::capabilities::{self, CapabilitySpec, Outcome};
use super::config::FilterKind;
use super::filters::SizeRounder;
use super::index::{Column, MISSING};
use super::pool::{BuiltIn, PoolSet, PoolState};
use super::request::Request;
use super::SchedulerError;

/// What the AffinityFilter says about an agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AgentRule {
    /// No objection.
    Allowed,
    /// The request names same-backend agents and this is not one of them.
    NotSame,
    /// The request names this agent as one to stay away from.
    NotDifferent,
}

/// Where a capability spec finds each pool's value.
enum Source<'a> {
    /// A built-in, read from the pool's typed fields.
    BuiltIn(BuiltIn),
    /// A free-form capability: the spec evaluated once per distinct value.
    Column {
        column: &'a Column,
        outcomes: Vec<Outcome>,
    },
    /// No pool reports the capability.
    Absent,
}

/// One capability requirement and where to find its values.
struct PlannedSpec<'a> {
    spec: CapabilitySpec<'a>,
    source: Source<'a>,
}

/// How one pool's value fared against one spec.
pub(crate) struct SpecResult<'a> {
    /// The capability's name.
    pub(crate) name: &'a str,
    /// The spec as written.
    pub(crate) raw: &'a str,
    /// The pool's value, or `None` if it does not report one.
    pub(crate) actual: Option<&'a str>,
    /// The verdict (meaningless when `actual` is `None`).
    pub(crate) outcome: Outcome,
}

/// A request compiled against a pool set.
pub(crate) struct Plan<'a> {
    pub(crate) pools: &'a PoolSet,
    pub(crate) request: &'a Request,
    /// The configured filters, in order, minus those this request makes no-ops (zones when no
    /// zone is requisite, capabilities when no spec applies, affinity when no backend is
    /// named), so that each pool skips them.
    pub(crate) filters: Vec<FilterKind>,
    /// Whether the volume type wants thin provisioning.
    pub(crate) wants_thin: bool,
    /// The requested size, rounded per extent.
    pub(crate) size: SizeRounder,
    specs: Vec<PlannedSpec<'a>>,
    /// By zone id: requisite or not. `None`: every zone is.
    requisite: Option<Vec<bool>>,
    /// By zone id: preference tier (0 = first preferred zone; zones past the 65 535th preferred
    /// one share the last tier). `None`: no preference.
    tiers: Option<Vec<u16>>,
    /// By agent id. `None`: no affinity constraint.
    affinity: Option<Vec<AgentRule>>,
    /// By pool position. `None`: nothing excluded.
    excluded: Option<Vec<bool>>,
}

impl<'a> Plan<'a> {
    /// Compiles `request` against `pools` for the `configured` filters. Fails if an extra spec
    /// does not parse.
    pub(crate) fn new(
        pools: &'a PoolSet,
        request: &'a Request,
        configured: &[FilterKind],
    ) -> Result<Self, SchedulerError> {
        let wants_thin = request.wants_thin()?;
        let index = pools.index();
        let specs: Vec<PlannedSpec<'a>> = capabilities::parse_specs(&request.extra_specs)?
            .into_iter()
            .map(|spec| {
                let source = match spec.built_in {
                    Some(b) => Source::BuiltIn(b),
                    None => match index.capabilities.get(spec.name) {
                        Some(column) => Source::Column {
                            column,
                            outcomes: column
                                .values()
                                .iter()
                                .map(|v| spec.matcher.check(v))
                                .collect(),
                        },
                        None => Source::Absent,
                    },
                };
                PlannedSpec { spec, source }
            })
            .collect();

        let zones = &index.zones;
        let requisite = (!request.requisite_zones.is_empty()).then(|| {
            let mut by_zone = vec![false; zones.values().len()];
            for zone in &request.requisite_zones {
                if let Some(id) = zones.lookup(zone) {
                    by_zone[id as usize] = true;
                }
            }
            by_zone
        });
        let tiers = (!request.preferred_zones.is_empty()).then(|| {
            let last = u16::try_from(request.preferred_zones.len()).unwrap_or(u16::MAX);
            let mut by_zone = vec![last; zones.values().len()];
            // Backwards, so a zone listed twice keeps its first (better) tier.
            for (tier, zone) in request.preferred_zones.iter().enumerate().rev() {
                if let Some(id) = zones.lookup(zone) {
                    by_zone[id as usize] = u16::try_from(tier).unwrap_or(u16::MAX);
                }
            }
            by_zone
        });

        let agents = &index.agents;
        let affinity = (!request.same_backend_as.is_empty()
            || !request.different_backend_as.is_empty())
        .then(|| {
            let default = if request.same_backend_as.is_empty() {
                AgentRule::Allowed
            } else {
                AgentRule::NotSame
            };
            let mut by_agent = vec![default; agents.values().len()];
            for agent in &request.same_backend_as {
                if let Some(id) = agents.lookup(agent) {
                    by_agent[id as usize] = AgentRule::Allowed;
                }
            }
            for agent in &request.different_backend_as {
                if let Some(id) = agents.lookup(agent) {
                    let rule = &mut by_agent[id as usize];
                    if *rule == AgentRule::Allowed {
                        *rule = AgentRule::NotDifferent;
                    }
                }
            }
            by_agent
        });

        let excluded = (!request.exclude.is_empty()).then(|| {
            let mut by_pool = vec![false; pools.len()];
            for id in &request.exclude {
                if let Some(pos) = pools.position_of(id) {
                    by_pool[pos] = true;
                }
            }
            by_pool
        });

        let filters = configured
            .iter()
            .copied()
            .filter(|f| match f {
                FilterKind::AvailabilityZoneFilter => requisite.is_some(),
                FilterKind::CapabilitiesFilter => !specs.is_empty(),
                FilterKind::AffinityFilter => affinity.is_some(),
                FilterKind::CapacityFilter => true,
            })
            .collect();

        Ok(Plan {
            pools,
            request,
            filters,
            wants_thin,
            size: SizeRounder::new(request.size),
            specs,
            requisite,
            tiers,
            affinity,
            excluded,
        })
    }

    /// Whether the pool at `pos` is in a requisite zone.
    pub(crate) fn zone_is_requisite(&self, pos: usize) -> bool {
        match &self.requisite {
            None => true,
            Some(by_zone) => Self::lookup(by_zone, &self.pools.index().zones, pos).unwrap_or(false),
        }
    }

    /// The preference tier of the pool at `pos`: 0 for the first preferred zone, the number of
    /// preferred zones for a zone not among them, 0 for every pool when none is preferred.
    pub(crate) fn tier(&self, pos: usize) -> u16 {
        match &self.tiers {
            None => 0,
            Some(by_zone) => {
                Self::lookup(by_zone, &self.pools.index().zones, pos).unwrap_or(u16::MAX)
            }
        }
    }

    /// The AffinityFilter's verdict on the pool at `pos`.
    pub(crate) fn agent_rule(&self, pos: usize) -> AgentRule {
        match &self.affinity {
            None => AgentRule::Allowed,
            Some(by_agent) => Self::lookup(by_agent, &self.pools.index().agents, pos)
                // An agent without an id was named by no request: only same-backend applies.
                .unwrap_or(if self.request.same_backend_as.is_empty() {
                    AgentRule::Allowed
                } else {
                    AgentRule::NotSame
                }),
        }
    }

    /// `by_id`'s entry for the value of the pool at `pos` in `column`. `None` only for a pool
    /// without an id, which the index records once a column holds `u32::MAX` distinct values.
    fn lookup<T: Copy>(by_id: &[T], column: &Column, pos: usize) -> Option<T> {
        by_id.get(column.id_at(pos) as usize).copied()
    }

    /// Whether the request excludes the pool at `pos`.
    pub(crate) fn is_excluded(&self, pos: usize) -> bool {
        self.excluded.as_ref().is_some_and(|by_pool| by_pool[pos])
    }

    /// The pool at `pos`.
    pub(crate) fn pool(&self, pos: usize) -> &'a PoolState {
        &self.pools.as_slice()[pos]
    }

    /// The zone of the pool at `pos`, read from the index (which stays in cache) rather than
    /// from the pool's state (which would not).
    pub(crate) fn zone_name(&self, pos: usize) -> &'a str {
        Self::name_in(&self.pools.index().zones, pos).unwrap_or_else(|| &self.pool(pos).zone)
    }

    /// The agent of the pool at `pos`, read from the index like [`Plan::zone_name`].
    pub(crate) fn agent_name(&self, pos: usize) -> &'a str {
        Self::name_in(&self.pools.index().agents, pos).unwrap_or_else(|| &self.pool(pos).id.agent)
    }

    fn name_in(column: &'a Column, pos: usize) -> Option<&'a str> {
        match column.id_at(pos) {
            MISSING => None,
            id => column.values().get(id as usize).map(String::as_str),
        }
    }

    /// The first spec the pool at `pos` does not satisfy, if any.
    pub(crate) fn first_unmet_spec(&self, pos: usize) -> Option<SpecResult<'a>> {
        for planned in &self.specs {
            let (actual, outcome) = match &planned.source {
                Source::BuiltIn(b) => {
                    // Only here: reading every pool's state would cost a cache miss each.
                    let actual = self.pool(pos).built_in(*b);
                    (Some(actual), planned.spec.matcher.check(actual))
                }
                Source::Column { column, outcomes } => {
                    let id = column.id_at(pos) as usize;
                    match (column.values().get(id), outcomes.get(id)) {
                        (Some(actual), Some(&outcome)) => (Some(actual.as_str()), outcome),
                        _ => (None, Outcome::Mismatch),
                    }
                }
                Source::Absent => (None, Outcome::Mismatch),
            };
            if actual.is_none() || outcome != Outcome::Match {
                return Some(SpecResult {
                    name: planned.spec.name,
                    raw: planned.spec.raw,
                    actual,
                    outcome,
                });
            }
        }
        None
    }
}
