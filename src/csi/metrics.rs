//! Metrics of the controller and node roles (served by `crate::metrics` on their
//! `metrics_listen`):
//!
//! | family | kind | labels |
//! |---|---|---|
//! | `cinderblock_csi_rpc_total` | counter | `rpc`, `code` |
//! | `cinderblock_csi_rpc_duration_seconds` | histogram | `rpc` |
//! | `cinderblock_controller_pool_{total,free,provisioned}_bytes` | gauge | `pool` (agent#pool) |
//! | `cinderblock_controller_pool_{volumes,healthy}` | gauge | `pool` |
//! | `cinderblock_controller_agents` | gauge | |
//! | `cinderblock_controller_leader` | gauge (0/1) | |
//!
//! RPCs are counted by the code their response started with (as the agent's are).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tonic::codegen::http;
use tonic::server::NamedService;

use crate::agent_rpc::metrics::{code_of, method_of};
use crate::controller::Controller;
use crate::k8s::leader::Leadership;
use crate::metrics::{Collector, CounterVec, Exposition, HistogramVec, Kind, LATENCY_BUCKETS};
use crate::node::RepairCounts;
use crate::scheduler::Capacity;

/// Distinct label combinations kept before the rest go to `other`.
const MAX_SERIES: usize = 256;

/// CSI calls by method and code, and their latency.
#[derive(Debug)]
pub struct RpcMetrics {
    calls: CounterVec,
    latency: HistogramVec,
}

impl Default for RpcMetrics {
    fn default() -> Self {
        RpcMetrics {
            calls: CounterVec::new(&["rpc", "code"], MAX_SERIES),
            latency: HistogramVec::new(&["rpc"], LATENCY_BUCKETS, MAX_SERIES),
        }
    }
}

impl RpcMetrics {
    fn write(&self, out: &mut Exposition) {
        out.counter_vec(
            "cinderblock_csi_rpc_total",
            "CSI calls by method and gRPC code.",
            &self.calls,
        );
        out.histogram_vec(
            "cinderblock_csi_rpc_duration_seconds",
            "Time to the first byte of the answer of CSI calls, by method.",
            &self.latency,
        );
    }
}

/// A gRPC service whose calls are counted and timed in [`RpcMetrics`].
#[derive(Clone, Debug)]
pub struct Observed<S> {
    inner: S,
    metrics: Arc<RpcMetrics>,
}

impl<S> Observed<S> {
    /// Observes `inner`'s calls in `metrics`.
    pub fn new(inner: S, metrics: Arc<RpcMetrics>) -> Self {
        Observed { inner, metrics }
    }
}

impl<S: NamedService> NamedService for Observed<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B, R> tower::Service<http::Request<B>> for Observed<S>
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
        let metrics = self.metrics.clone();
        let started = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            metrics.calls.inc(&[&rpc, code_of(resp.headers())]);
            metrics
                .latency
                .observe(&[&rpc], started.elapsed().as_secs_f64());
            Ok(resp)
        })
    }
}

/// The node role's metrics: its CSI calls and what session repair did.
#[derive(Debug)]
pub struct NodeMetrics {
    /// CSI calls.
    pub rpcs: Arc<RpcMetrics>,
    /// Session repair's counts.
    pub repairs: Arc<RepairCounts>,
}

/// Session repair's counters (`node::repair`).
fn write_repairs(out: &mut Exposition, r: &RepairCounts) {
    out.single(
        "cinderblock_node_session_repairs_total",
        Kind::Counter,
        "Connections of sessions down for session_repair_after_secs stopped for recovery.",
        r.stopped.get(),
    );
    out.single(
        "cinderblock_node_session_repair_failures_total",
        Kind::Counter,
        "Stops for recovery that failed (kernel refusal, no iSCSI netlink).",
        r.failed.get(),
    );
}

#[async_trait::async_trait]
impl Collector for NodeMetrics {
    async fn collect(&self, out: &mut Exposition) {
        self.rpcs.write(out);
        write_repairs(out, &self.repairs);
    }
}

/// The controller role's metrics: CSI calls, pools as the scheduler sees them, leadership;
/// in `cinderblock all`, also the node's session repair.
#[derive(Debug)]
pub struct ControllerMetrics {
    /// CSI calls.
    pub rpcs: Arc<RpcMetrics>,
    /// The controller.
    pub controller: Arc<Controller>,
    /// Whether this replica leads.
    pub leadership: Leadership,
    /// The node's session repair counts, when a node service runs in the same process.
    pub repairs: Option<Arc<RepairCounts>>,
}

type PoolValue = fn(&crate::controller::PoolReport) -> Option<u64>;

fn known(c: Capacity) -> Option<u64> {
    c.known().map(|b| b.get())
}

#[async_trait::async_trait]
impl Collector for ControllerMetrics {
    async fn collect(&self, out: &mut Exposition) {
        self.rpcs.write(out);
        let pools = self.controller.pool_reports();
        let gauges: [(&str, &str, PoolValue); 5] = [
            (
                "total_bytes",
                "Total capacity of the pool as last reported.",
                |p| known(p.total),
            ),
            (
                "free_bytes",
                "Free capacity of the pool, less placements since its last report.",
                |p| known(p.free),
            ),
            (
                "provisioned_bytes",
                "Virtual sizes placed on the pool.",
                |p| Some(p.provisioned.get()),
            ),
            ("volumes", "Volumes on the pool.", |p| Some(p.volume_count)),
            ("healthy", "1 when the scheduler may use the pool.", |p| {
                Some(u64::from(p.healthy))
            }),
        ];
        for (suffix, help, value) in gauges {
            let name = format!("cinderblock_controller_pool_{suffix}");
            out.family(&name, Kind::Gauge, help);
            for p in &pools {
                if let Some(v) = value(p) {
                    out.sample(&name, &[("pool", &p.id.to_string())], v);
                }
            }
        }
        out.single(
            "cinderblock_controller_agents",
            Kind::Gauge,
            "Agents the controller reaches (static and discovered).",
            self.controller.agent_names().len() as u64,
        );
        out.single(
            "cinderblock_controller_leader",
            Kind::Gauge,
            "1 when this replica is the leader.",
            u64::from(self.leadership.is_leader()),
        );
        if let Some(r) = &self.repairs {
            write_repairs(out, r);
        }
    }
}
