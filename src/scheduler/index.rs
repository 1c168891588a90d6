//! What every decision reads from every pool, kept in flat arrays: the strings it compares
//! (zone, agent, each capability) with each distinct value stored once and numbered, and the
//! weighers' inputs.
//!
//! A decision then evaluates an extra spec once per distinct value instead of once per pool,
//! and each pool costs one array read per spec instead of a map lookup and string comparisons
//! scattered over the heap. [`PoolSet`](super::PoolSet) keeps the index in step with its pools;
//! nothing else writes to it.

use std::collections::BTreeMap;

use super::filters::CapacityInputs;
use super::pool::PoolState;
use super::weighers::Inputs;

/// The id recorded for a pool that does not report a capability.
pub(crate) const MISSING: u32 = u32::MAX;

/// One string per pool, dictionary-encoded.
#[derive(Clone, Debug, Default)]
pub(crate) struct Column {
    /// Distinct values, by id. May hold values no pool uses any more, until compaction.
    values: Vec<String>,
    /// Value → id.
    ids: BTreeMap<String, u32>,
    /// Per pool position: the id of its value, or [`MISSING`].
    of_pool: Vec<u32>,
}

impl Column {
    /// A column of `len` pools that all lack the value.
    fn missing(len: usize) -> Self {
        Column {
            of_pool: vec![MISSING; len],
            ..Column::default()
        }
    }

    fn id_of(&mut self, value: Option<&str>) -> u32 {
        let Some(value) = value else {
            return MISSING;
        };
        if let Some(&id) = self.ids.get(value) {
            return id;
        }
        // More than u32::MAX - 1 distinct values cannot come from a set of pools that fits in
        // memory; should it happen, the value is recorded as missing rather than aliased.
        let Ok(id) = u32::try_from(self.values.len()) else {
            return MISSING;
        };
        if id == MISSING {
            return MISSING;
        }
        self.values.push(value.to_owned());
        self.ids.insert(value.to_owned(), id);
        id
    }

    fn insert(&mut self, pos: usize, value: Option<&str>) {
        let id = self.id_of(value);
        self.of_pool.insert(pos, id);
    }

    fn set(&mut self, pos: usize, value: Option<&str>) {
        let id = self.id_of(value);
        self.of_pool[pos] = id;
        self.compact_if_sparse();
    }

    fn remove(&mut self, pos: usize) {
        self.of_pool.remove(pos);
        self.compact_if_sparse();
    }

    /// Drops values no pool uses once they outnumber the pools, so that agents reporting
    /// ever-changing values cannot grow the dictionary without bound.
    fn compact_if_sparse(&mut self) {
        if self.values.len() <= 2 * self.of_pool.len() + 16 {
            return;
        }
        let old = std::mem::take(&mut self.values);
        self.ids.clear();
        for id in &mut self.of_pool {
            if *id == MISSING {
                continue;
            }
            let value = &old[*id as usize];
            *id = match self.ids.get(value.as_str()) {
                Some(&new) => new,
                None => {
                    // Fewer values than before, so the new id fits.
                    let new = self.values.len() as u32;
                    self.values.push(value.clone());
                    self.ids.insert(value.clone(), new);
                    new
                }
            };
        }
    }

    /// The distinct values, by id.
    pub(crate) fn values(&self) -> &[String] {
        &self.values
    }

    /// The id of the pool at `pos`'s value, or [`MISSING`].
    pub(crate) fn id_at(&self, pos: usize) -> u32 {
        self.of_pool[pos]
    }

    /// The id of `value`, if some pool has (or had) it.
    pub(crate) fn lookup(&self, value: &str) -> Option<u32> {
        self.ids.get(value).copied()
    }
}

/// The columns for a whole [`PoolSet`](super::PoolSet), position for position.
#[derive(Clone, Debug, Default)]
pub(crate) struct Index {
    /// Each pool's zone.
    pub(crate) zones: Column,
    /// Each pool's agent.
    pub(crate) agents: Column,
    /// Each free-form capability, by name.
    pub(crate) capabilities: BTreeMap<String, Column>,
    /// Each pool's health and capacity numbers, read for every pool.
    capacity: Vec<CapacityInputs>,
    /// Each pool's weigher inputs, read for candidates only.
    weights: Vec<Inputs>,
    /// Number of pools.
    len: usize,
}

impl Index {
    /// Adds `pool` at position `pos`.
    pub(crate) fn insert(&mut self, pos: usize, pool: &PoolState) {
        self.add_columns_for(pool);
        self.zones.insert(pos, Some(&pool.zone));
        self.agents.insert(pos, Some(&pool.id.agent));
        self.capacity.insert(pos, CapacityInputs::of(pool));
        self.weights.insert(pos, Inputs::of(pool));
        for (name, column) in &mut self.capabilities {
            column.insert(pos, pool.capabilities.get(name).map(String::as_str));
        }
        self.len += 1;
    }

    /// Replaces the pool at position `pos` with `pool`.
    pub(crate) fn replace(&mut self, pos: usize, pool: &PoolState) {
        self.add_columns_for(pool);
        self.zones.set(pos, Some(&pool.zone));
        self.agents.set(pos, Some(&pool.id.agent));
        self.refresh(pos, pool);
        for (name, column) in &mut self.capabilities {
            column.set(pos, pool.capabilities.get(name).map(String::as_str));
        }
    }

    /// Removes the pool at position `pos`; columns no pool reports any more go too.
    pub(crate) fn remove(&mut self, pos: usize) {
        self.zones.remove(pos);
        self.agents.remove(pos);
        self.capacity.remove(pos);
        self.weights.remove(pos);
        for column in self.capabilities.values_mut() {
            column.remove(pos);
        }
        self.capabilities
            .retain(|_, column| column.of_pool.iter().any(|&id| id != MISSING));
        self.len -= 1;
    }

    /// Recomputes what depends on the numbers of the pool at `pos` (after a charge).
    pub(crate) fn refresh(&mut self, pos: usize, pool: &PoolState) {
        self.capacity[pos] = CapacityInputs::of(pool);
        self.weights[pos] = Inputs::of(pool);
    }

    /// The health and capacity numbers of the pool at `pos`.
    pub(crate) fn capacity(&self, pos: usize) -> &CapacityInputs {
        &self.capacity[pos]
    }

    /// The weigher inputs of the pool at `pos`.
    pub(crate) fn weights(&self, pos: usize) -> &Inputs {
        &self.weights[pos]
    }

    fn add_columns_for(&mut self, pool: &PoolState) {
        for name in pool.capabilities.keys() {
            if !self.capabilities.contains_key(name) {
                self.capabilities
                    .insert(name.clone(), Column::missing(self.len));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::pool::PoolRef;
    use crate::types::Bytes;

    fn pool(agent: &str, zone: &str, caps: &[(&str, &str)]) -> PoolState {
        let mut p = PoolState::new(PoolRef::new(agent, "p"), zone, Bytes::gib(1));
        p.capabilities = caps
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        p
    }

    /// Each column decoded back to strings, position by position.
    fn decode(index: &Index) -> Vec<(String, Vec<Option<String>>)> {
        let column = |c: &Column| {
            (0..index.len)
                .map(|pos| match c.id_at(pos) {
                    MISSING => None,
                    id => Some(c.values()[id as usize].clone()),
                })
                .collect::<Vec<_>>()
        };
        let mut out = vec![
            ("<zone>".to_string(), column(&index.zones)),
            ("<agent>".to_string(), column(&index.agents)),
        ];
        out.extend(
            index
                .capabilities
                .iter()
                .map(|(name, c)| (name.clone(), column(c))),
        );
        out
    }

    fn some(xs: &[Option<&str>]) -> Vec<Option<String>> {
        xs.iter().map(|x| x.map(str::to_string)).collect()
    }

    #[test]
    fn insert_replace_remove_keep_columns_aligned() {
        let mut index = Index::default();
        index.insert(0, &pool("a", "z1", &[("media", "ssd")]));
        index.insert(0, &pool("b", "z2", &[("iops", "100")]));
        index.insert(1, &pool("c", "z1", &[("media", "ssd"), ("iops", "5")]));
        assert_eq!(
            decode(&index),
            vec![
                ("<zone>".into(), some(&[Some("z2"), Some("z1"), Some("z1")])),
                ("<agent>".into(), some(&[Some("b"), Some("c"), Some("a")])),
                ("iops".into(), some(&[Some("100"), Some("5"), None])),
                ("media".into(), some(&[None, Some("ssd"), Some("ssd")])),
            ]
        );
        // "ssd" is stored once.
        assert_eq!(index.capabilities["media"].values(), ["ssd"]);

        index.replace(2, &pool("a", "z3", &[("media", "hdd")]));
        index.remove(0);
        assert_eq!(
            decode(&index),
            vec![
                ("<zone>".into(), some(&[Some("z1"), Some("z3")])),
                ("<agent>".into(), some(&[Some("c"), Some("a")])),
                ("iops".into(), some(&[Some("5"), None])),
                ("media".into(), some(&[Some("ssd"), Some("hdd")])),
            ]
        );
        index.remove(0);
        // Nobody reports iops any more: the column is gone.
        assert_eq!(
            decode(&index),
            vec![
                ("<zone>".into(), some(&[Some("z3")])),
                ("<agent>".into(), some(&[Some("a")])),
                ("media".into(), some(&[Some("hdd")])),
            ]
        );
    }

    #[test]
    fn churning_values_are_compacted() {
        let mut index = Index::default();
        index.insert(0, &pool("a", "z1", &[("serial", "0")]));
        for i in 1..1000 {
            index.replace(0, &pool("a", "z1", &[("serial", &i.to_string())]));
        }
        let serial = &index.capabilities["serial"];
        assert!(serial.values().len() <= 2 + 16, "{}", serial.values().len());
        assert_eq!(serial.values()[serial.id_at(0) as usize], "999".to_string());
        assert_eq!(serial.lookup("999"), Some(serial.id_at(0)));
    }
}
