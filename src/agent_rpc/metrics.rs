//! The agent's metrics (served by `crate::metrics` on `metrics_listen`): reconciliation and
//! export drift, tgtd restarts, pool capacity, backup and restore throughput, and agent API
//! calls by method and code.
//!
//! | family | kind | labels |
//! |---|---|---|
//! | `cinderblock_agent_reconcile_runs_total` | counter | |
//! | `cinderblock_agent_reconcile_errors_total` | counter | |
//! | `cinderblock_agent_export_drift_total` | counter | `kind` = created, repaired, removed, failed |
//! | `cinderblock_agent_tgtd_restarts_total` | counter | |
//! | `cinderblock_agent_pool_{total,free,provisioned,allocated}_bytes` | gauge | `pool` |
//! | `cinderblock_agent_pool_tracking_bytes` | gauge | `pool` |
//! | `cinderblock_agent_pool_{volumes,snapshots}` | gauge | `pool` |
//! | `cinderblock_agent_pool_healthy` | gauge (0/1) | `pool` |
//! | `cinderblock_agent_rpc_total` | counter | `rpc`, `code` |
//! | `cinderblock_agent_backup_duration_seconds` | histogram | `op` = backup, restore; `result` = ok, failed |
//! | `cinderblock_agent_backup_bytes_total` | counter | `kind` = backup_read, backup_unread, backup_unallocated, backup_stored, restore_written |
//! | `cinderblock_agent_backup_last_throughput_bytes_per_second` | gauge | `op` |
//!
//! Pool gauges are the agent's last pool reports when at most 30 s old (a controller asks for
//! them every few seconds), else read from the pools for the scrape; a pool that cannot be
//! read has only
//! `healthy 0`, and a capacity the pool cannot tell (unknown, infinite) has no sample, nor
//! has `tracking_bytes` where the pool does not tell markers' blocks apart (LVM: a thin
//! pool's `allocated_bytes` includes them).
//! `rpc_total` counts calls by the code their response started with: a stream that fails
//! after its first message counts as `OK`.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::codegen::http;
use tonic::server::NamedService;

use crate::agent::backend::Capacity;
use crate::agent::service::AgentService;
use crate::metrics::{Collector, CounterVec, Exposition, Kind};

/// How old the pool figures of a scrape may be: those the agent made last (a controller
/// asks for them every few seconds) are used up to this age, then the pools are read anew.
const POOL_STATS_MAX_AGE: Duration = Duration::from_secs(30);

/// Distinct (rpc, code) pairs counted before the rest go to `other`.
const MAX_RPC_SERIES: usize = 256;

/// Agent API calls by method and gRPC code.
#[derive(Debug)]
pub struct RpcCounts(CounterVec);

impl Default for RpcCounts {
    fn default() -> Self {
        RpcCounts(CounterVec::new(&["rpc", "code"], MAX_RPC_SERIES))
    }
}

/// The metrics of one agent.
#[derive(Debug)]
pub struct AgentMetrics {
    agent: Arc<AgentService>,
    rpcs: Arc<RpcCounts>,
}

impl AgentMetrics {
    /// Metrics of `agent`, with the calls counted by [`Counted`] services sharing `rpcs`.
    pub fn new(agent: Arc<AgentService>, rpcs: Arc<RpcCounts>) -> Self {
        AgentMetrics { agent, rpcs }
    }
}

#[async_trait::async_trait]
impl Collector for AgentMetrics {
    async fn collect(&self, out: &mut Exposition) {
        let t = self.agent.reconcile_totals();
        out.single(
            "cinderblock_agent_reconcile_runs_total",
            Kind::Counter,
            "Reconciliation passes of tgtd's targets against the volumes' records.",
            t.runs,
        );
        out.single(
            "cinderblock_agent_reconcile_errors_total",
            Kind::Counter,
            "Reconciliation passes that failed as a whole (tgtd not answering, pool unreadable).",
            t.errors,
        );
        let name = "cinderblock_agent_export_drift_total";
        out.family(
            name,
            Kind::Counter,
            "Exports found drifted by reconciliation: created (missing), repaired (different), \
             removed (no volume), failed (could not be restored).",
        );
        for (kind, n) in [
            ("created", t.created),
            ("repaired", t.repaired),
            ("removed", t.removed),
            ("failed", t.failed),
        ] {
            out.sample(name, &[("kind", kind)], n);
        }
        out.single(
            "cinderblock_agent_tgtd_restarts_total",
            Kind::Counter,
            "tgtd restarts seen by reconciliation (its control socket re-created).",
            t.tgtd_restarts,
        );

        let pools = self.agent.recent_pools(POOL_STATS_MAX_AGE).await;
        let gauges: [(&str, &str, PoolValue); 7] = [
            ("total_bytes", "Usable size of the pool.", |s| {
                known(s.total)
            }),
            ("free_bytes", "Free space of the pool.", |s| known(s.free)),
            (
                "provisioned_bytes",
                "Sum of the virtual sizes of the pool's volumes and snapshots.",
                |s| Some(s.provisioned.0),
            ),
            (
                "allocated_bytes",
                "Bytes really allocated in the pool.",
                |s| Some(s.allocated.0),
            ),
            (
                "tracking_bytes",
                "Bytes held only by change-tracking markers (file pools with reflinks).",
                |s| s.tracking.map(|b| b.0),
            ),
            ("volumes", "Volumes in the pool.", |s| {
                Some(u64::from(s.volume_count))
            }),
            ("snapshots", "Snapshots in the pool.", |s| {
                Some(u64::from(s.snapshot_count))
            }),
        ];
        for (suffix, help, value) in gauges {
            let name = format!("cinderblock_agent_pool_{suffix}");
            out.family(&name, Kind::Gauge, help);
            for p in pools.iter() {
                if let Some(v) = p.stats.as_ref().ok().and_then(value) {
                    out.sample(&name, &[("pool", &p.cfg.name)], v);
                }
            }
        }
        let name = "cinderblock_agent_pool_healthy";
        out.family(name, Kind::Gauge, "1 when the pool can be read, else 0.");
        for p in pools.iter() {
            out.sample(name, &[("pool", &p.cfg.name)], u64::from(p.stats.is_ok()));
        }

        let tr = self.agent.transfers();
        out.histogram_vec(
            "cinderblock_agent_backup_duration_seconds",
            "Finished backups and restores by op (backup, restore) and result (ok, failed).",
            &tr.seconds,
        );
        let name = "cinderblock_agent_backup_bytes_total";
        out.family(
            name,
            Kind::Counter,
            "Bytes moved by successful backups and restores: volume bytes a backup read \
             (backup_read), volume bytes it took from its parent unread because change \
             tracking showed them unchanged (backup_unread), volume bytes it recorded as holes \
             unread because the pool showed them unallocated (backup_unallocated), bytes it \
             wrote to its repository (backup_stored), volume bytes a restore wrote \
             (restore_written).",
        );
        for (kind, c) in [
            ("backup_read", &tr.backup_read_bytes),
            ("backup_unread", &tr.backup_unread_bytes),
            ("backup_unallocated", &tr.backup_unallocated_bytes),
            ("backup_stored", &tr.backup_stored_bytes),
            ("restore_written", &tr.restore_written_bytes),
        ] {
            out.sample(name, &[("kind", kind)], c.get());
        }
        let name = "cinderblock_agent_backup_last_throughput_bytes_per_second";
        out.family(
            name,
            Kind::Gauge,
            "Volume bytes per second of the last successful backup and restore (0: none yet).",
        );
        out.sample(name, &[("op", "backup")], tr.last_backup_rate.get());
        out.sample(name, &[("op", "restore")], tr.last_restore_rate.get());

        out.counter_vec(
            "cinderblock_agent_rpc_total",
            "Agent API calls by method and gRPC code.",
            &self.rpcs.0,
        );
    }
}

type PoolValue = fn(&crate::agent::backend::PoolStats) -> Option<u64>;

fn known(c: Capacity) -> Option<u64> {
    match c {
        Capacity::Known(b) => Some(b.0),
        Capacity::Unknown | Capacity::Infinite => None,
    }
}

/// The method of a gRPC path (`/pkg.Service/Method` → `Method`).
pub(crate) fn method_of(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or_default()
}

/// The gRPC code a response starts with: its `grpc-status` header (errors are sent
/// trailers-only), else OK (the status follows in the trailers).
pub(crate) fn code_of(headers: &http::HeaderMap) -> &'static str {
    let Some(v) = headers.get("grpc-status") else {
        return "OK";
    };
    let n = v
        .to_str()
        .ok()
        .and_then(|s| s.parse::<i32>().ok())
        .unwrap_or(2);
    code_name(tonic::Code::from_i32(n))
}

/// gRPC's names for the codes (as in grpc-go and its Prometheus middleware).
fn code_name(c: tonic::Code) -> &'static str {
    use tonic::Code as C;
    match c {
        C::Ok => "OK",
        C::Cancelled => "Canceled",
        C::Unknown => "Unknown",
        C::InvalidArgument => "InvalidArgument",
        C::DeadlineExceeded => "DeadlineExceeded",
        C::NotFound => "NotFound",
        C::AlreadyExists => "AlreadyExists",
        C::PermissionDenied => "PermissionDenied",
        C::ResourceExhausted => "ResourceExhausted",
        C::FailedPrecondition => "FailedPrecondition",
        C::Aborted => "Aborted",
        C::OutOfRange => "OutOfRange",
        C::Unimplemented => "Unimplemented",
        C::Internal => "Internal",
        C::Unavailable => "Unavailable",
        C::DataLoss => "DataLoss",
        C::Unauthenticated => "Unauthenticated",
    }
}

/// A gRPC service whose calls are counted in [`RpcCounts`] (same name, same routes).
#[derive(Clone, Debug)]
pub struct Counted<S> {
    inner: S,
    counts: Arc<RpcCounts>,
}

impl<S> Counted<S> {
    /// Counts `inner`'s calls in `counts`.
    pub fn new(inner: S, counts: Arc<RpcCounts>) -> Self {
        Counted { inner, counts }
    }
}

impl<S: NamedService> NamedService for Counted<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B, R> tower::Service<http::Request<B>> for Counted<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let rpc = method_of(req.uri().path()).to_owned();
        let counts = self.counts.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            counts.0.inc(&[&rpc, code_of(resp.headers())]);
            Ok(resp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_and_code() {
        assert_eq!(
            method_of("/cinderblock.agent.v1.Agent/ListPools"),
            "ListPools"
        );
        assert_eq!(method_of(""), "");
        let mut h = http::HeaderMap::new();
        assert_eq!(code_of(&h), "OK");
        h.insert("grpc-status", http::HeaderValue::from_static("5"));
        assert_eq!(code_of(&h), "NotFound");
        h.insert("grpc-status", http::HeaderValue::from_static("junk"));
        assert_eq!(code_of(&h), "Unknown");
    }
}
