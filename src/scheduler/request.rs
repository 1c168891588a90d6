//! What a new volume asks of the scheduler.

use std::collections::{BTreeMap, BTreeSet};

use crate::types::Bytes;

use super::capabilities::ExtraSpecError;
use super::pool::PoolRef;
use super::SchedulerError;

/// The extra spec that chooses thin or thick provisioning (`thin` when absent, as in Cinder).
pub const PROVISIONING_TYPE_KEY: &str = "provisioning:type";

/// One placement request: a new volume and its constraints.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Request {
    /// Requested size; each pool rounds it up to its extent.
    pub size: Bytes,
    /// The volume type's extra specs (the StorageClass parameters). Unscoped and
    /// `capabilities:`-scoped keys are matched against pool capabilities; `provisioning:type`
    /// picks thin or thick; other scopes (`qos:`, …) are ignored here.
    pub extra_specs: BTreeMap<String, String>,
    /// Zones the volume must be in (CSI requisite topology); empty means any zone.
    pub requisite_zones: BTreeSet<String>,
    /// Zones the volume should be in, best first (CSI preferred topology).
    pub preferred_zones: Vec<String>,
    /// When non-empty, only pools of these agents qualify (Cinder's SameBackendFilter).
    pub same_backend_as: BTreeSet<String>,
    /// Pools of these agents do not qualify (Cinder's DifferentBackendFilter).
    pub different_backend_as: BTreeSet<String>,
    /// Pools where an earlier attempt to create this volume failed.
    pub exclude: BTreeSet<PoolRef>,
}

impl Request {
    /// A request for `size` bytes with no constraints.
    pub fn new(size: Bytes) -> Self {
        Request {
            size,
            ..Request::default()
        }
    }

    /// Records that creating the volume on `pool` failed, so the next attempt avoids it.
    pub fn exclude_pool(&mut self, pool: PoolRef) {
        self.exclude.insert(pool);
    }

    /// Whether the volume type asks for thin provisioning: `provisioning:type` is `thin` or
    /// absent. Any value other than `thin` or `thick` is an error.
    pub fn wants_thin(&self) -> Result<bool, SchedulerError> {
        match self
            .extra_specs
            .get(PROVISIONING_TYPE_KEY)
            .map(String::as_str)
        {
            None | Some("thin") => Ok(true),
            Some("thick") => Ok(false),
            Some(other) => Err(SchedulerError::InvalidExtraSpec {
                key: PROVISIONING_TYPE_KEY.to_string(),
                value: other.to_string(),
                source: ExtraSpecError::UnknownProvisioningType,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wants_thin_table() {
        let cases = [
            (None, Ok(true)),
            (Some("thin"), Ok(true)),
            (Some("thick"), Ok(false)),
            (
                Some("Thick"),
                Err("extra spec provisioning:type=\"Thick\" is invalid".to_string()),
            ),
        ];
        for (value, want) in cases {
            let mut r = Request::new(Bytes::gib(1));
            if let Some(v) = value {
                r.extra_specs.insert(PROVISIONING_TYPE_KEY.into(), v.into());
            }
            assert_eq!(r.wants_thin().map_err(|e| e.to_string()), want, "{value:?}");
        }
    }

    #[test]
    fn exclude_pool_records_it() {
        let mut r = Request::new(Bytes::gib(1));
        r.exclude_pool(PoolRef::new("a", "p"));
        r.exclude_pool(PoolRef::new("a", "p"));
        assert_eq!(r.exclude.len(), 1);
        assert!(r.exclude.contains(&PoolRef::new("a", "p")));
    }
}
