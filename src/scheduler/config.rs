//! Which filters and weighers run, with Cinder's defaults.
//!
//! In TOML:
//!
//! ```toml
//! filters = ["AvailabilityZoneFilter", "CapacityFilter", "CapabilitiesFilter", "AffinityFilter"]
//! max_attempts = 3
//!
//! [[weighers]]
//! name = "CapacityWeigher"
//! multiplier = -1.0          # stack instead of spread
//!
//! [[weighers]]
//! name = "VolumeNumberWeigher" # multiplier left out: its default, -1.0
//! ```

use serde::Deserialize;

/// A filter: a yes/no test of one pool against the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
pub enum FilterKind {
    /// The pool's zone must be among the request's requisite zones, if it lists any.
    AvailabilityZoneFilter,
    /// The pool must have room for the volume (reserve, thin over-subscription).
    CapacityFilter,
    /// The pool's capabilities must satisfy the volume type's extra specs.
    CapabilitiesFilter,
    /// The pool's agent must (not) be one the request names (Cinder's SameBackendFilter and
    /// DifferentBackendFilter in one).
    AffinityFilter,
}

/// A weigher: a number per pool; larger (after the multiplier) ranks first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
pub enum WeigherKind {
    /// Free capacity after the reserve (virtual free capacity on thin pools). A positive
    /// multiplier spreads volumes over the emptiest pools, a negative one stacks them.
    CapacityWeigher,
    /// Capacity Cinderblock has allocated on the pool.
    AllocatedCapacityWeigher,
    /// Number of volumes on the pool.
    VolumeNumberWeigher,
}

impl WeigherKind {
    /// Cinder's default multiplier: 1.0 for capacity (spread), -1.0 for allocated capacity and
    /// for volume number (the emptier, the better).
    pub fn default_multiplier(self) -> f64 {
        match self {
            WeigherKind::CapacityWeigher => 1.0,
            WeigherKind::AllocatedCapacityWeigher | WeigherKind::VolumeNumberWeigher => -1.0,
        }
    }
}

/// One weigher and its multiplier.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeigherConfig {
    /// Which weigher.
    pub name: WeigherKind,
    /// Factor applied to the weigher's 0..=1 value; `None` takes
    /// [`WeigherKind::default_multiplier`].
    #[serde(default)]
    pub multiplier: Option<f64>,
}

impl WeigherConfig {
    /// `name` with an explicit multiplier.
    pub fn new(name: WeigherKind, multiplier: f64) -> Self {
        WeigherConfig {
            name,
            multiplier: Some(multiplier),
        }
    }

    /// The multiplier in effect.
    pub fn multiplier(&self) -> f64 {
        self.multiplier
            .unwrap_or_else(|| self.name.default_multiplier())
    }
}

impl From<WeigherKind> for WeigherConfig {
    /// `name` with its default multiplier.
    fn from(name: WeigherKind) -> Self {
        WeigherConfig {
            name,
            multiplier: None,
        }
    }
}

/// The scheduler's configuration.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    /// Filters, run in this order; a pool's first rejection is the one reported. Default:
    /// Cinder's `AvailabilityZoneFilter`, `CapacityFilter`, `CapabilitiesFilter`, plus
    /// `AffinityFilter`, which does nothing unless a request names backends (Cinder leaves its
    /// affinity filters off by default and then silently ignores the hints; a CSI parameter
    /// that is silently ignored would be worse).
    pub filters: Vec<FilterKind>,
    /// Weighers, summed. Default: Cinder's `CapacityWeigher` with multiplier 1.0 (spread).
    pub weighers: Vec<WeigherConfig>,
    /// How many times one volume is tried in all, the first attempt included (Cinder's
    /// `scheduler_max_attempts`, default 3). 1 disables rescheduling.
    pub max_attempts: u32,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            filters: vec![
                FilterKind::AvailabilityZoneFilter,
                FilterKind::CapacityFilter,
                FilterKind::CapabilitiesFilter,
                FilterKind::AffinityFilter,
            ],
            weighers: vec![WeigherKind::CapacityWeigher.into()],
            max_attempts: 3,
        }
    }
}

/// Why a [`SchedulerConfig`] is unusable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// A filter is listed twice.
    #[error("filter {0:?} is listed twice")]
    DuplicateFilter(FilterKind),
    /// A weigher is listed twice (its weight would silently count double).
    #[error("weigher {0:?} is listed twice")]
    DuplicateWeigher(WeigherKind),
    /// A multiplier is NaN or infinite, which would make every weight meaningless.
    #[error("weigher {weigher:?} has a non-finite multiplier {multiplier}")]
    NonFiniteMultiplier {
        /// The weigher.
        weigher: WeigherKind,
        /// The multiplier given.
        multiplier: f64,
    },
    /// `max_attempts` is 0: not even the first attempt would be allowed.
    #[error("max_attempts must be at least 1")]
    ZeroMaxAttempts,
}

impl SchedulerConfig {
    /// Checks the configuration for mistakes serde cannot catch.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (i, f) in self.filters.iter().enumerate() {
            if self.filters[..i].contains(f) {
                return Err(ConfigError::DuplicateFilter(*f));
            }
        }
        for (i, w) in self.weighers.iter().enumerate() {
            if self.weighers[..i]
                .iter()
                .any(|earlier| earlier.name == w.name)
            {
                return Err(ConfigError::DuplicateWeigher(w.name));
            }
            let multiplier = w.multiplier();
            if !multiplier.is_finite() {
                return Err(ConfigError::NonFiniteMultiplier {
                    weigher: w.name,
                    multiplier,
                });
            }
        }
        if self.max_attempts == 0 {
            return Err(ConfigError::ZeroMaxAttempts);
        }
        Ok(())
    }

    /// Whether a volume whose attempt number `attempt` (1 = the first) just failed should be
    /// tried again on another pool. See [`should_retry`].
    pub fn should_retry(&self, attempt: u32) -> bool {
        should_retry(attempt, self.max_attempts)
    }
}

/// Whether to reschedule after attempt number `attempt` (1 = the first) failed, when at most
/// `max_attempts` attempts are allowed in all. The caller adds the failed pool to
/// [`Request::exclude`](super::Request::exclude) before scheduling again.
pub fn should_retry(attempt: u32, max_attempts: u32) -> bool {
    attempt < max_attempts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<SchedulerConfig, String> {
        toml::from_str(s).map_err(|e| e.message().to_string())
    }

    #[test]
    fn empty_config_is_the_default() {
        let cfg = parse("");
        assert_eq!(cfg, Ok(SchedulerConfig::default()));
        let cfg = SchedulerConfig::default();
        assert_eq!(cfg.max_attempts, 3);
        assert_eq!(cfg.weighers.len(), 1);
        assert_eq!(cfg.weighers[0].multiplier(), 1.0);
        assert_eq!(cfg.validate(), Ok(()));
    }

    #[test]
    fn full_config_parses() {
        let cfg = parse(
            r#"
            filters = ["CapacityFilter", "AvailabilityZoneFilter"]
            max_attempts = 5
            [[weighers]]
            name = "CapacityWeigher"
            multiplier = -2.5
            [[weighers]]
            name = "VolumeNumberWeigher"
            [[weighers]]
            name = "AllocatedCapacityWeigher"
            "#,
        );
        let want = SchedulerConfig {
            filters: vec![
                FilterKind::CapacityFilter,
                FilterKind::AvailabilityZoneFilter,
            ],
            weighers: vec![
                WeigherConfig::new(WeigherKind::CapacityWeigher, -2.5),
                WeigherKind::VolumeNumberWeigher.into(),
                WeigherKind::AllocatedCapacityWeigher.into(),
            ],
            max_attempts: 5,
        };
        assert_eq!(cfg, Ok(want.clone()));
        let multipliers: Vec<f64> = want
            .weighers
            .iter()
            .map(WeigherConfig::multiplier)
            .collect();
        assert_eq!(multipliers, [-2.5, -1.0, -1.0]);
    }

    #[test]
    fn unknown_fields_and_names_are_rejected() {
        // (config, start of the error message)
        let cases = [
            ("max_atempts = 3", "unknown field `max_atempts`"),
            (
                "filters = [\"RetryFilter\"]",
                "unknown variant `RetryFilter`",
            ),
            (
                "[[weighers]]\nname = \"CapacityWeigher\"\nmultipler = 1.0",
                "unknown field `multipler`",
            ),
            (
                "[[weighers]]\nname = \"GoodnessWeigher\"",
                "unknown variant `GoodnessWeigher`",
            ),
            ("max_attempts = -1", "invalid value: integer `-1`"),
        ];
        for (case, want) in cases {
            let got = parse(case).err().unwrap_or_default();
            assert_eq!(got.get(..want.len()), Some(want), "{case:?}: {got}");
        }
    }

    #[test]
    fn validate_table() {
        let base = SchedulerConfig::default;
        let cases = [
            (
                SchedulerConfig {
                    filters: vec![FilterKind::CapacityFilter, FilterKind::CapacityFilter],
                    ..base()
                },
                Err(ConfigError::DuplicateFilter(FilterKind::CapacityFilter)),
            ),
            (
                SchedulerConfig {
                    weighers: vec![
                        WeigherKind::CapacityWeigher.into(),
                        WeigherConfig::new(WeigherKind::CapacityWeigher, 2.0),
                    ],
                    ..base()
                },
                Err(ConfigError::DuplicateWeigher(WeigherKind::CapacityWeigher)),
            ),
            (
                SchedulerConfig {
                    weighers: vec![WeigherConfig::new(
                        WeigherKind::VolumeNumberWeigher,
                        f64::INFINITY,
                    )],
                    ..base()
                },
                Err(ConfigError::NonFiniteMultiplier {
                    weigher: WeigherKind::VolumeNumberWeigher,
                    multiplier: f64::INFINITY,
                }),
            ),
            (
                SchedulerConfig {
                    max_attempts: 0,
                    ..base()
                },
                Err(ConfigError::ZeroMaxAttempts),
            ),
            (
                SchedulerConfig {
                    filters: vec![],
                    weighers: vec![],
                    max_attempts: 1,
                },
                Ok(()),
            ),
        ];
        for (cfg, want) in cases {
            assert_eq!(cfg.validate(), want, "{cfg:?}");
        }
    }

    #[test]
    fn should_retry_table() {
        // (attempt that failed, max_attempts, retry?)
        let cases = [
            (1, 3, true),
            (2, 3, true),
            (3, 3, false),
            (4, 3, false),
            (1, 1, false),
        ];
        for (attempt, max, want) in cases {
            assert_eq!(
                should_retry(attempt, max),
                want,
                "attempt {attempt} of {max}"
            );
        }
        let cfg = SchedulerConfig::default();
        assert_eq!(
            (1..=4).map(|a| cfg.should_retry(a)).collect::<Vec<_>>(),
            [true, true, false, false]
        );
    }
}
