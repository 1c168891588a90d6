//! StoragePools: what an agent writes for each of its pools, and which agents the controller
//! takes from them. Pure functions; the API calls are in `registration` and `discovery`.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use super::crd::{
    PoolBackend, PoolCapacity, PoolHealth, StoragePool, StoragePoolSpec, StoragePoolStatus,
};
use crate::agent::backend::Capacity;
use crate::agent::service::PoolReport;
use crate::config::PoolKindConfig;
use crate::transport::Endpoint;

/// Label carrying the agent's name on its StoragePools (to list one agent's pools).
pub const AGENT_LABEL: &str = "cinderblock.dev/agent";

/// Most characters of a Kubernetes object name (DNS-1123 subdomain).
const MAX_NAME: usize = 253;

/// The StoragePool object name of `pool` on `agent`: `<agent>.<pool>` lower-cased, with any
/// character a DNS-1123 subdomain refuses replaced by `-`. When that changed the text (or it
/// had to be shortened), a hash of the exact names is appended so that two pools never share
/// an object.
pub fn object_name(agent: &str, pool: &str) -> String {
    let exact = format!("{agent}.{pool}");
    let mut name: String = exact
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '-' | '.' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '-',
        })
        .collect();
    // Each dot-separated label must start and end with an alphanumeric.
    name = name
        .split('.')
        .map(|l| l.trim_matches('-'))
        .map(|l| if l.is_empty() { "x" } else { l })
        .collect::<Vec<_>>()
        .join(".");
    if name != exact || name.len() > MAX_NAME {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(exact.as_bytes());
        let suffix = hex::encode(&digest[..4]);
        name.truncate(MAX_NAME - suffix.len() - 1);
        name = format!("{}-{suffix}", name.trim_end_matches(['-', '.']));
    }
    name
}

/// A size in binary units as `kubectl` users read them: `12Gi`, `11.5Gi`, `512Mi`, `0`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["", "Ki", "Mi", "Gi", "Ti", "Pi"];
    let mut unit = 0;
    let mut scaled = bytes as f64;
    while scaled >= 1024.0 && unit < UNITS.len() - 1 {
        scaled /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        return bytes.to_string();
    }
    let text = format!("{scaled:.1}");
    let text = text.strip_suffix(".0").unwrap_or(&text);
    format!("{text}{}", UNITS[unit])
}

fn capacity_text(c: Capacity) -> (Option<u64>, String) {
    match c {
        Capacity::Known(b) => (Some(b.0), human(b.0)),
        Capacity::Unknown => (None, "unknown".to_owned()),
        Capacity::Infinite => (None, "infinite".to_owned()),
    }
}

/// The spec of the StoragePool of one of an agent's pools.
pub fn pool_spec(
    agent: &str,
    endpoint: &Endpoint,
    node_name: Option<&str>,
    report: &PoolReport,
) -> StoragePoolSpec {
    StoragePoolSpec {
        agent: agent.to_owned(),
        endpoint: endpoint.to_string(),
        pool: report.cfg.name.clone(),
        zone: report.cfg.zone.clone(),
        backend: match report.cfg.kind {
            PoolKindConfig::File => PoolBackend::File,
            PoolKindConfig::LvmThick => PoolBackend::LvmThick,
            PoolKindConfig::LvmThin => PoolBackend::LvmThin,
        },
        node_name: node_name.map(str::to_owned),
        capabilities: report.cfg.capabilities.clone(),
    }
}

/// The status of a pool's StoragePool at a heartbeat at `now`.
pub fn pool_status(report: &PoolReport, now: Timestamp) -> StoragePoolStatus {
    let thin = report.cfg.kind != PoolKindConfig::LvmThick;
    let mut status = StoragePoolStatus {
        thin_provisioning: thin,
        thick_provisioning: !thin,
        reserved_percentage: u8::try_from(report.cfg.reserved_percentage.min(100)).unwrap_or(100),
        max_over_subscription_ratio: if thin {
            report.cfg.max_over_subscription_ratio
        } else {
            1.0
        },
        portals: report.portals.clone(),
        last_heartbeat: Some(Time(now)),
        ..StoragePoolStatus::default()
    };
    match &report.stats {
        Ok(s) => {
            let (total_bytes, total) = capacity_text(s.total);
            let (free_bytes, free) = capacity_text(s.free);
            status.capacity = PoolCapacity {
                total_bytes,
                free_bytes,
                provisioned_bytes: s.provisioned.0,
                allocated_bytes: s.allocated.0,
                total,
                free,
                provisioned: human(s.provisioned.0),
            };
            status.volume_count = u64::from(s.volume_count);
            status.snapshot_count = u64::from(s.snapshot_count);
            status.health = Some(PoolHealth::Healthy);
        }
        Err(reason) => {
            status.capacity = PoolCapacity {
                total: "unknown".into(),
                free: "unknown".into(),
                provisioned: "unknown".into(),
                ..PoolCapacity::default()
            };
            status.health = Some(PoolHealth::Unhealthy);
            status.unhealthy_reason = Some(reason.clone());
        }
    }
    status
}

/// Why a StoragePool's agent is not taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Skipped {
    /// No heartbeat, or one older than the limit (age in whole seconds, when known).
    Stale {
        /// Seconds since the last heartbeat.
        age_secs: Option<i64>,
    },
    /// The endpoint does not parse.
    BadEndpoint(String),
    /// Two fresh pools of the same agent name advertise different endpoints.
    ConflictingEndpoints(String, String),
}

/// The agents the controller takes from `pools` at `now`: every agent with at least one
/// StoragePool whose heartbeat is younger than `stale_after`, by name, with its endpoint.
/// Pools not taken are returned with the reason (for the log).
pub fn discovered_agents(
    pools: &[StoragePool],
    now: Timestamp,
    stale_after: Duration,
) -> (BTreeMap<String, Endpoint>, Vec<(String, Skipped)>) {
    let mut agents: BTreeMap<String, Endpoint> = BTreeMap::new();
    let mut skipped = Vec::new();
    let limit = i64::try_from(stale_after.as_secs()).unwrap_or(i64::MAX);
    let mut sorted: Vec<&StoragePool> = pools.iter().collect();
    // Deterministic: newest heartbeat first, then by name.
    sorted.sort_by(|a, b| {
        heartbeat(b)
            .cmp(&heartbeat(a))
            .then_with(|| a.metadata.name.cmp(&b.metadata.name))
    });
    for p in sorted {
        let name = p.metadata.name.clone().unwrap_or_default();
        let age = heartbeat(p).map(|t| now.as_second() - t.as_second());
        if age.is_none_or(|a| a > limit) {
            skipped.push((name, Skipped::Stale { age_secs: age }));
            continue;
        }
        let endpoint: Endpoint = match p.spec.endpoint.parse() {
            Ok(e) => e,
            Err(_) => {
                skipped.push((name, Skipped::BadEndpoint(p.spec.endpoint.clone())));
                continue;
            }
        };
        match agents.get(&p.spec.agent) {
            Some(existing) if *existing != endpoint => skipped.push((
                name,
                Skipped::ConflictingEndpoints(existing.to_string(), endpoint.to_string()),
            )),
            Some(_) => {}
            None => {
                agents.insert(p.spec.agent.clone(), endpoint);
            }
        }
    }
    (agents, skipped)
}

fn heartbeat(p: &StoragePool) -> Option<Timestamp> {
    p.status.as_ref()?.last_heartbeat.as_ref().map(|t| t.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::backend::PoolStats;
    use crate::config::PoolConfig;
    use crate::types::Bytes;

    #[test]
    fn object_names_are_dns_subdomains_and_distinct() {
        let cases = [("stor1", "thin1", "stor1.thin1"), ("a", "b", "a.b")];
        for (agent, pool, want) in cases {
            assert_eq!(object_name(agent, pool), want);
        }
        let odd = object_name("Stor_1", "Pool_A");
        assert!(odd.starts_with("stor-1.pool-a-"), "{odd}");
        assert_eq!(odd.len(), "stor-1.pool-a-".len() + 8);
        // Two names that clean up to the same text stay distinct.
        assert_ne!(
            object_name("Stor_1", "Pool_A"),
            object_name("stor-1", "pool-a")
        );
        assert_ne!(object_name("a_", "b"), object_name("a-", "b"));
        let long = object_name(&"x".repeat(200), &"y".repeat(200));
        assert!(long.len() <= MAX_NAME, "{}", long.len());
        let valid = |n: &str| {
            n.split('.').all(|l| {
                !l.is_empty()
                    && l.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            })
        };
        for n in [odd, long, object_name("-a-", "_")] {
            assert!(valid(&n), "{n}");
        }
    }

    #[test]
    fn human_sizes() {
        let cases = [
            (0, "0"),
            (1000, "1000"),
            (1024, "1Ki"),
            (12 << 30, "12Gi"),
            (23u64 << 29, "11.5Gi"),
            (512 << 20, "512Mi"),
            (3 << 40, "3Ti"),
        ];
        for (bytes, want) in cases {
            assert_eq!(human(bytes), want, "{bytes}");
        }
    }

    fn report(stats: Result<PoolStats, String>) -> PoolReport {
        let cfg: PoolConfig = toml::from_str(
            r#"name = "thin1"
kind = "lvm-thin"
vg = "vg"
thin_pool = "pool"
zone = "z1"
reserved_percentage = 5
max_over_subscription_ratio = 20.0
capabilities = { media = "ssd" }"#,
        )
        .expect("pool config");
        PoolReport {
            cfg,
            stats,
            extent: Bytes(4 << 20),
            portals: vec!["10.0.0.1:3260".into()],
        }
    }

    #[test]
    fn pool_status_from_a_report() {
        let now: Timestamp = "2026-11-02T10:00:00Z".parse().expect("time");
        let r = report(Ok(PoolStats {
            total: Capacity::Known(Bytes::gib(12)),
            free: Capacity::Known(Bytes(23u64 << 29)),
            provisioned: Bytes::mib(512),
            allocated: Bytes::mib(100),
            volume_count: 3,
            snapshot_count: 1,
            tracking: None,
        }));
        let st = pool_status(&r, now);
        assert_eq!(
            st,
            StoragePoolStatus {
                capacity: PoolCapacity {
                    total_bytes: Some(12 << 30),
                    free_bytes: Some(23u64 << 29),
                    provisioned_bytes: 512 << 20,
                    allocated_bytes: 100 << 20,
                    total: "12Gi".into(),
                    free: "11.5Gi".into(),
                    provisioned: "512Mi".into(),
                },
                volume_count: 3,
                snapshot_count: 1,
                thin_provisioning: true,
                thick_provisioning: false,
                reserved_percentage: 5,
                max_over_subscription_ratio: 20.0,
                portals: vec!["10.0.0.1:3260".into()],
                health: Some(PoolHealth::Healthy),
                unhealthy_reason: None,
                last_heartbeat: Some(Time(now)),
            }
        );
        let spec = pool_spec(
            "stor1",
            &"tcp://10.0.0.1:9700".parse().expect("endpoint"),
            Some("node-1"),
            &r,
        );
        assert_eq!(spec.backend, PoolBackend::LvmThin);
        assert_eq!(spec.endpoint, "tcp://10.0.0.1:9700");
        assert_eq!(
            spec.capabilities.get("media").map(String::as_str),
            Some("ssd")
        );

        let bad = pool_status(&report(Err("vgs failed".into())), now);
        assert_eq!(bad.health, Some(PoolHealth::Unhealthy));
        assert_eq!(bad.unhealthy_reason.as_deref(), Some("vgs failed"));
        assert_eq!(bad.capacity.total, "unknown");
        assert_eq!(bad.capacity.total_bytes, None);
    }

    fn sp(name: &str, agent: &str, endpoint: &str, beat: Option<&str>) -> StoragePool {
        let mut p = StoragePool::new(
            name,
            StoragePoolSpec {
                agent: agent.into(),
                endpoint: endpoint.into(),
                pool: "p".into(),
                zone: "z".into(),
                backend: PoolBackend::File,
                node_name: None,
                capabilities: BTreeMap::new(),
            },
        );
        p.status = Some(StoragePoolStatus {
            last_heartbeat: beat.map(|b| Time(b.parse().expect("time"))),
            ..StoragePoolStatus::default()
        });
        p
    }

    #[test]
    fn discovery_takes_fresh_agents_only() {
        let now: Timestamp = "2026-11-02T10:01:00Z".parse().expect("time");
        let pools = vec![
            sp(
                "a.p1",
                "a",
                "tcp://10.0.0.1:9700",
                Some("2026-11-02T10:00:50Z"),
            ),
            sp(
                "a.p2",
                "a",
                "tcp://10.0.0.1:9700",
                Some("2026-11-02T10:00:40Z"),
            ),
            sp(
                "b.p",
                "b",
                "tcp://10.0.0.2:9700",
                Some("2026-11-02T09:59:00Z"),
            ),
            sp("c.p", "c", "tcp://10.0.0.3:9700", None),
            sp("d.p", "d", "not an endpoint", Some("2026-11-02T10:00:59Z")),
            sp(
                "a.p3",
                "a",
                "tcp://10.9.9.9:9700",
                Some("2026-11-02T10:00:30Z"),
            ),
        ];
        let (agents, skipped) = discovered_agents(&pools, now, Duration::from_secs(60));
        assert_eq!(
            agents,
            BTreeMap::from([(
                "a".to_owned(),
                "tcp://10.0.0.1:9700".parse().expect("endpoint")
            )])
        );
        assert_eq!(
            skipped,
            vec![
                (
                    "d.p".to_owned(),
                    Skipped::BadEndpoint("not an endpoint".into())
                ),
                (
                    "a.p3".to_owned(),
                    Skipped::ConflictingEndpoints(
                        "tcp://10.0.0.1:9700".into(),
                        "tcp://10.9.9.9:9700".into()
                    )
                ),
                (
                    "b.p".to_owned(),
                    Skipped::Stale {
                        age_secs: Some(120)
                    }
                ),
                ("c.p".to_owned(), Skipped::Stale { age_secs: None }),
            ]
        );
    }
}
