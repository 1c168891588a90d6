//! Starting each role: build its services from configuration, serve them until shutdown.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

use crate::agent::chap::ChapKey;
use crate::agent::service::AgentService;
use crate::agent_rpc::client::{GrpcAgent, StorageAgent};
use crate::agent_rpc::metrics::{AgentMetrics, Counted, RpcCounts};
use crate::agent_rpc::server::AgentApi;
use crate::config::{AgentConfig, AgentRef, AllConfig, ControllerConfig, NodeConfig};
use crate::controller::{Controller, ControllerError, Settings};
use crate::csi::controller::ControllerService;
use crate::csi::deadline::CallerDeadline;
use crate::csi::identity::{IdentityService, Services};
use crate::csi::leader_gate::LeaderGate;
use crate::csi::metrics::{ControllerMetrics, NodeMetrics, Observed, RpcMetrics};
use crate::csi::node::NodeService;
use crate::exec::Runner;
use crate::health::{self, Dependency, HealthError, Readiness};
use crate::k8s::leader::Leadership;
use crate::metrics::{self, MetricsError};
use crate::node::iscsi::IscsiInitiator;
use crate::node::mounter::LinuxMounter;
use crate::node::{Node, NodeSettings, RepairCounts, SessionRepair};
use crate::operator::OperatorService;
use crate::proto::agent::agent_server::AgentServer;
use crate::proto::csi::controller_server::ControllerServer;
use crate::proto::csi::identity_client::IdentityClient;
use crate::proto::csi::identity_server::IdentityServer;
use crate::proto::csi::node_server::NodeServer;
use crate::proto::csi::ProbeRequest;
use crate::proto::operator::operator_server::OperatorServer;
use crate::tls::{self, ClientTls, TlsError};
use crate::transport::{self, Endpoint, TransportError};

/// Errors that stop a role.
#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    /// Listening or serving failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The agent could not be built from its configuration.
    #[error("agent setup failed")]
    Agent(#[from] crate::agent::AgentError),
    /// The CHAP key file is unusable.
    #[error("CHAP key file {path}: {reason}")]
    ChapKey {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A role task panicked or was aborted.
    #[error("a role task ended abnormally")]
    Join(#[from] tokio::task::JoinError),
    /// The controller's configuration is unusable (scheduler, volume types).
    #[error("controller configuration")]
    Controller(#[from] ControllerError),
    /// TLS certificates or keys are unusable.
    #[error("TLS setup failed")]
    Tls(#[from] TlsError),
    /// The metrics endpoint could not listen.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// The Kubernetes API is unusable (configuration, client).
    #[error("Kubernetes")]
    Kube(#[from] crate::k8s::KubeError),
}

/// At least one configured storage agent answers its Identity `Probe` with ready.
#[derive(Debug)]
pub struct AgentsReachable {
    agents: Vec<(AgentRef, tonic::transport::Channel)>,
}

impl AgentsReachable {
    /// Lazily connected channels to every agent (they may start after the controller), over
    /// TLS to `tcp://` agents when `tls` is given.
    pub async fn new(agents: &[AgentRef], tls: Option<&ClientTls>) -> Result<Self, TransportError> {
        let mut out = Vec::with_capacity(agents.len());
        for a in agents {
            out.push((
                a.clone(),
                transport::connect_tls(&a.endpoint, true, tls).await?,
            ));
        }
        Ok(AgentsReachable { agents: out })
    }
}

/// How long the controller's Probe waits for an agent's Probe.
const AGENT_PROBE_TIMEOUT: Duration = Duration::from_secs(20);

#[tonic::async_trait]
impl Dependency for AgentsReachable {
    async fn check(&self) -> Result<(), HealthError> {
        let mut reasons = Vec::new();
        for (agent, channel) in &self.agents {
            let mut client = IdentityClient::new(channel.clone());
            let mut req = tonic::Request::new(ProbeRequest {});
            // The agent's own Probe reads every pool (vgs/lvs), which takes seconds on a busy
            // or emulated node; a short timeout here made the controller report "not ready"
            // while the agent was fine (seen in the test VMs).
            req.set_timeout(AGENT_PROBE_TIMEOUT);
            match client.probe(req).await {
                Ok(r) if r.get_ref().ready == Some(true) => return Ok(()),
                Ok(_) => reasons.push(format!("{}: not ready", agent.name)),
                Err(s) => reasons.push(format!("{}: {}", agent.name, s.message())),
            }
        }
        if reasons.is_empty() {
            reasons.push("none configured".into());
        }
        Err(HealthError::NoAgent(reasons.join("; ")))
    }
}

fn identity(services: Services, readiness: Readiness) -> IdentityServer<IdentityService> {
    IdentityServer::new(IdentityService::new(services, readiness))
}

/// `cinderblock controller`.
pub async fn run_controller(
    cfg: ControllerConfig,
    shutdown: CancellationToken,
) -> Result<(), RoleError> {
    let tls = agent_tls(&cfg)?;
    let readiness = Readiness::default().with(Arc::new(
        AgentsReachable::new(&cfg.agents, tls.as_ref()).await?,
    ));
    let services = Services {
        controller: true,
        node: false,
    };
    let metrics_listener = match cfg.metrics_listen {
        Some(addr) => Some(metrics::bind(addr).await?),
        None => None,
    };
    tracing::info!(endpoint = %cfg.endpoint, agents = cfg.agents.len(), agent_tls = tls.is_some(), "controller serving");
    let (controller, operator, core) =
        controller_service(&cfg, tls.as_ref(), shutdown.clone()).await?;
    let leadership = match &cfg.kubernetes {
        Some(k) => {
            crate::k8s::start_controller(&cfg, k, core.clone(), tls.clone(), shutdown.clone())
                .await?
        }
        None => Leadership::always(),
    };
    let rpcs = Arc::new(RpcMetrics::default());
    if let Some(listener) = metrics_listener {
        let collector = Arc::new(ControllerMetrics {
            rpcs: rpcs.clone(),
            controller: core,
            leadership: leadership.clone(),
            repairs: None,
        });
        tokio::spawn(metrics::serve(listener, collector, shutdown.clone()));
    }
    let router = Server::builder()
        .add_service(Observed::new(identity(services, readiness), rpcs.clone()))
        .add_service(Observed::new(
            LeaderGate::new(CallerDeadline::new(controller), leadership),
            rpcs,
        ))
        .add_service(operator.clone());
    serve_with_operator(
        router,
        &cfg.endpoint,
        operator,
        cfg.operator_listen.as_ref(),
        shutdown,
    )
    .await
}

/// Serves `router` on `endpoint` and, when `operator_listen` is another endpoint, the operator
/// API alone there too. When either server stops, the other is shut down.
async fn serve_with_operator(
    router: tonic::transport::server::Router,
    endpoint: &Endpoint,
    operator: OperatorServer<OperatorService>,
    operator_listen: Option<&Endpoint>,
    shutdown: CancellationToken,
) -> Result<(), RoleError> {
    let second = operator_listen.filter(|e| *e != endpoint);
    let main = async {
        let r = transport::serve(router, endpoint, shutdown.clone()).await;
        shutdown.cancel();
        r
    };
    let extra = async {
        let Some(listen) = second else {
            return Ok(());
        };
        tracing::info!(%listen, "operator API serving");
        let r = transport::serve(
            Server::builder().add_service(operator),
            listen,
            shutdown.clone(),
        )
        .await;
        shutdown.cancel();
        r
    };
    let (main, extra) = tokio::join!(main, extra);
    main?;
    extra?;
    Ok(())
}

/// The CSI Controller service and the operator API over a [`Controller`] reaching every
/// configured agent, with the task that lists the agents and refreshes pool statistics (first
/// at once, then every `stats_interval_secs`) until `shutdown`.
async fn controller_service(
    cfg: &ControllerConfig,
    tls: Option<&ClientTls>,
    shutdown: CancellationToken,
) -> Result<
    (
        ControllerServer<ControllerService>,
        OperatorServer<OperatorService>,
        Arc<Controller>,
    ),
    RoleError,
> {
    let mut agents: Vec<Arc<dyn StorageAgent>> = Vec::with_capacity(cfg.agents.len());
    for a in &cfg.agents {
        agents.push(Arc::new(
            GrpcAgent::connect(&a.name, &a.endpoint, tls).await?,
        ));
    }
    let controller = Arc::new(Controller::new(Settings::from_config(cfg), agents)?);
    let interval = Duration::from_secs(cfg.stats_interval_secs.max(1));
    tokio::spawn(controller.clone().run_refresh(interval, shutdown));
    Ok((
        ControllerServer::new(ControllerService::new(controller.clone())),
        OperatorServer::new(OperatorService::new(controller.clone())),
        controller,
    ))
}

/// The controller's TLS credentials for agents (`[agent_tls]`), read now.
fn agent_tls(cfg: &ControllerConfig) -> Result<Option<ClientTls>, RoleError> {
    Ok(cfg
        .agent_tls
        .as_ref()
        .map(ClientTls::from_config)
        .transpose()?)
}

/// `cinderblock node`: Identity (Probe = iscsid reachable) and Node, after a start-up
/// reconciliation of the host's iSCSI sessions with the volumes staged on it.
pub async fn run_node(cfg: NodeConfig, shutdown: CancellationToken) -> Result<(), RoleError> {
    let key = cfg
        .chap_key_file
        .as_deref()
        .map(load_chap_key)
        .transpose()?;
    let readiness = Readiness::default().with(Arc::new(health::Iscsid));
    let services = Services {
        controller: false,
        node: true,
    };
    let metrics_listener = match cfg.metrics_listen {
        Some(addr) => Some(metrics::bind(addr).await?),
        None => None,
    };
    let (node, repairs) = node_service(&cfg, key, &shutdown).await;
    let rpcs = Arc::new(RpcMetrics::default());
    if let Some(listener) = metrics_listener {
        let collector = Arc::new(NodeMetrics {
            rpcs: rpcs.clone(),
            repairs,
        });
        tokio::spawn(metrics::serve(listener, collector, shutdown.clone()));
    }
    tracing::info!(endpoint = %cfg.endpoint, node = %cfg.node_name, zone = %cfg.zone, "node serving");
    let router = Server::builder()
        .add_service(Observed::new(identity(services, readiness), rpcs.clone()))
        .add_service(Observed::new(node, rpcs));
    transport::serve(router, &cfg.endpoint, shutdown).await?;
    Ok(())
}

/// The CSI Node service acting on this host (commands behind `exec_prefix`), reconciled
/// once before it serves, with session repair running beside it until `shutdown`. A failed
/// reconciliation (iscsid or iscsiadm missing) is logged: the service still answers, and
/// Probe says whether iscsid is there.
async fn node_service(
    cfg: &NodeConfig,
    chap_key: Option<ChapKey>,
    shutdown: &CancellationToken,
) -> (NodeServer<NodeService>, Arc<RepairCounts>) {
    let runner = Runner::with_prefix(cfg.exec_prefix.clone());
    let settings = NodeSettings {
        node_name: cfg.node_name.clone(),
        zone: cfg.zone.clone(),
        max_volumes_per_node: cfg.max_volumes_per_node,
        attach_timeout: Duration::from_secs(cfg.attach_timeout_secs),
        ..NodeSettings::default()
    };
    let node = Arc::new(Node::new(
        settings,
        Arc::new(IscsiInitiator::new(
            runner.clone(),
            cfg.initiator_name_file.clone(),
        )),
        Arc::new(LinuxMounter::new(runner)),
        chap_key,
    ));
    match node.reconcile().await {
        Ok(r) => tracing::info!(
            logged_out = ?r.logged_out,
            logged_in = ?r.logged_in,
            records_deleted = ?r.records_deleted,
            kept_in_use = ?r.kept_in_use,
            failed = r.failed.len(),
            "node reconciled"
        ),
        Err(e) => tracing::warn!(
            error = %crate::logging::error_chain(&e),
            "node reconciliation failed; serving anyway"
        ),
    }
    if cfg.session_repair_after_secs > 0 {
        let after = Duration::from_secs(cfg.session_repair_after_secs);
        tokio::spawn(repair_sessions(node.clone(), after, shutdown.clone()));
    }
    let repairs = node.repair_counts();
    (NodeServer::new(NodeService::new(node)), repairs)
}

/// Session repair (`node::repair`): a look at the sessions every `after / 4` (1 to 10 s).
async fn repair_sessions(node: Arc<Node>, after: Duration, shutdown: CancellationToken) {
    let mut repair = SessionRepair::new(after);
    let mut tick =
        tokio::time::interval((after / 4).clamp(Duration::from_secs(1), Duration::from_secs(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = node.repair_sessions(&mut repair).await {
            tracing::debug!(error = %crate::logging::error_chain(&e), "session repair: cannot list sessions");
        }
    }
}

/// The agent is ready when tgtd answers and every pool can be read.
#[derive(Debug)]
struct AgentReady(Arc<AgentService>);

#[tonic::async_trait]
impl Dependency for AgentReady {
    async fn check(&self) -> Result<(), HealthError> {
        self.0
            .ready()
            .await
            .map_err(|e| HealthError::Agent(e.to_string()))
    }
}

fn chap_key(cfg: &AgentConfig) -> Result<ChapKey, RoleError> {
    let Some(path) = &cfg.chap_key_file else {
        tracing::warn!(
            "no chap_key_file: CHAP secrets derive from a random key and change when the agent restarts"
        );
        return Ok(ChapKey::random());
    };
    load_chap_key(path)
}

fn load_chap_key(path: &std::path::Path) -> Result<ChapKey, RoleError> {
    match ChapKey::from_file(path) {
        Ok(Some(k)) => Ok(k),
        Ok(None) => Err(RoleError::ChapKey {
            path: path.to_owned(),
            reason: "shorter than 16 bytes".into(),
        }),
        Err(e) => Err(RoleError::ChapKey {
            path: path.to_owned(),
            reason: e.to_string(),
        }),
    }
}

/// `cinderblock agent`: the agent API and an Identity service (Probe = tgtd answering and
/// every pool readable), with mutual TLS when `[tls]` is set; the metrics endpoint when
/// `metrics_listen` is set. Pools are opened and exports reconciled before serving.
pub async fn run_agent(cfg: AgentConfig, shutdown: CancellationToken) -> Result<(), RoleError> {
    let key = chap_key(&cfg)?;
    run_agent_with_key(cfg, key, shutdown).await
}

/// [`run_agent`] with its CHAP key already loaded (`all` shares it with the node).
async fn run_agent_with_key(
    cfg: AgentConfig,
    key: ChapKey,
    shutdown: CancellationToken,
) -> Result<(), RoleError> {
    // Everything that can be wrong with the configuration fails before any I/O on pools.
    let mut server = tls::server_builder(cfg.tls.as_ref())?;
    let metrics_listener = match cfg.metrics_listen {
        Some(addr) => Some(metrics::bind(addr).await?),
        None => None,
    };
    let agent = Arc::new(AgentService::new(&cfg, Runner::default(), key)?);
    if let Err(e) = agent.start().await {
        // tgtd may come up later: serve anyway (Probe says not ready) and let the
        // reconciliation loop catch up.
        tracing::warn!(error = %e, "initial reconciliation failed; retrying in the background");
    }
    let every = Duration::from_secs(cfg.reconcile_interval_secs.max(1));
    let reconciler = tokio::spawn(agent.clone().reconcile_loop(every, shutdown.clone()));
    if let Some(k) = &cfg.kubernetes {
        let client = crate::k8s::client(k.kubeconfig.as_deref()).await?;
        let reg = crate::k8s::registration::Registration {
            agent: cfg.name.clone(),
            endpoint: k.advertised(&cfg.listen),
            node_name: k
                .node_name
                .clone()
                .or_else(|| std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty())),
            interval: Duration::from_secs(k.heartbeat_interval_secs),
        };
        tracing::info!(endpoint = %reg.endpoint, "registering pools as StoragePools");
        tokio::spawn(crate::k8s::registration::run(
            client,
            agent.clone(),
            reg,
            shutdown.clone(),
        ));
    }
    let rpcs = Arc::new(RpcCounts::default());
    if let Some(listener) = metrics_listener {
        let collector = Arc::new(AgentMetrics::new(agent.clone(), rpcs.clone()));
        tokio::spawn(metrics::serve(listener, collector, shutdown.clone()));
    }
    warn_if_plain(&cfg);
    let readiness = Readiness::default().with(Arc::new(AgentReady(agent.clone())));
    tracing::info!(listen = %cfg.listen, agent = %cfg.name, pools = cfg.pools.len(), tls = cfg.tls.is_some(), "agent serving");
    let router = server
        .add_service(Counted::new(
            identity(Services::default(), readiness),
            rpcs.clone(),
        ))
        .add_service(Counted::new(
            AgentServer::new(AgentApi::new(agent)).max_decoding_message_size(64 << 20),
            rpcs,
        ));
    let served = transport::serve(router, &cfg.listen, shutdown.clone()).await;
    shutdown.cancel();
    reconciler.await?;
    served?;
    Ok(())
}

/// Warns when the agent API is served in plain text beyond this host: whoever reaches the
/// port can create, export and read volumes.
fn warn_if_plain(cfg: &AgentConfig) {
    let Endpoint::Tcp(addr) = &cfg.listen else {
        return;
    };
    if cfg.tls.is_some() {
        return;
    }
    let loopback = addr
        .parse::<std::net::SocketAddr>()
        .map(|a| a.ip().is_loopback())
        .unwrap_or_else(|_| addr.starts_with("localhost:"));
    if !loopback {
        tracing::warn!(listen = %cfg.listen, "agent API served without TLS beyond this host: configure [tls] (mutual TLS)");
    }
}

/// `cinderblock all`: agent on its own listener, controller (and node) on the CSI endpoint.
/// The node derives CHAP secrets from the agent's key unless it names its own key file.
/// Metrics: the agent's on `[agent] metrics_listen`; the CSI services' (calls of both, the
/// controller's pools) on `[controller] metrics_listen`, else `[node] metrics_listen`.
pub async fn run_all(
    mut cfg: AllConfig,
    without_node: bool,
    shutdown: CancellationToken,
) -> Result<(), RoleError> {
    let endpoint = cfg
        .endpoint
        .clone()
        .unwrap_or_else(|| cfg.controller.endpoint.clone());
    if cfg.controller.agents.is_empty() {
        cfg.controller.agents.push(AgentRef {
            name: cfg.agent.name.clone(),
            endpoint: local_dial(&cfg.agent.listen),
        });
    }
    let agent_key = chap_key(&cfg.agent)?;
    let node_key = match &cfg.node.chap_key_file {
        Some(path) => load_chap_key(path)?,
        None => agent_key.clone(),
    };
    let agent = tokio::spawn(run_agent_with_key(
        cfg.agent.clone(),
        agent_key,
        shutdown.clone(),
    ));

    let tls = agent_tls(&cfg.controller)?;
    let mut readiness = Readiness::default()
        .with(Arc::new(
            AgentsReachable::new(&cfg.controller.agents, tls.as_ref()).await?,
        ))
        .with(Arc::new(health::Tgtd::new(
            Runner::default(),
            cfg.agent.tgt.control_port,
        )));
    if !without_node {
        readiness = readiness.with(Arc::new(health::Iscsid));
    }
    let services = Services {
        controller: true,
        node: !without_node,
    };
    // One metrics endpoint for the CSI services of this process: the controller's address,
    // else the node's. The agent serves its own on `[agent] metrics_listen`.
    let metrics_listener = match cfg.controller.metrics_listen.or(cfg.node.metrics_listen) {
        Some(addr) => Some(metrics::bind(addr).await?),
        None => None,
    };
    tracing::info!(%endpoint, node = !without_node, "all-in-one serving");
    let (controller, operator, core) =
        controller_service(&cfg.controller, tls.as_ref(), shutdown.clone()).await?;
    let node = if without_node {
        None
    } else {
        Some(node_service(&cfg.node, Some(node_key), &shutdown).await)
    };
    let rpcs = Arc::new(RpcMetrics::default());
    if let Some(listener) = metrics_listener {
        let collector = Arc::new(ControllerMetrics {
            rpcs: rpcs.clone(),
            controller: core,
            leadership: Leadership::always(),
            repairs: node.as_ref().map(|(_, r)| r.clone()),
        });
        tokio::spawn(metrics::serve(listener, collector, shutdown.clone()));
    }
    let node = node.map(|(n, _)| Observed::new(n, rpcs.clone()));
    let router = Server::builder()
        .add_service(Observed::new(identity(services, readiness), rpcs.clone()))
        .add_service(Observed::new(CallerDeadline::new(controller), rpcs))
        .add_service(operator.clone())
        .add_optional_service(node);
    let csi = serve_with_operator(
        router,
        &endpoint,
        operator,
        cfg.controller.operator_listen.as_ref(),
        shutdown.clone(),
    )
    .await;
    shutdown.cancel();
    agent.await??;
    csi?;
    Ok(())
}

/// The address a local client dials to reach a listener (0.0.0.0 becomes 127.0.0.1).
fn local_dial(listen: &Endpoint) -> Endpoint {
    match listen {
        Endpoint::Tcp(a) => match a.strip_prefix("0.0.0.0:") {
            Some(port) => Endpoint::Tcp(format!("127.0.0.1:{port}")),
            None => Endpoint::Tcp(a.clone()),
        },
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_dial_table() {
        let cases = [
            ("tcp://0.0.0.0:9700", "tcp://127.0.0.1:9700"),
            ("tcp://10.1.2.3:9700", "tcp://10.1.2.3:9700"),
            ("unix:///run/a.sock", "unix:///run/a.sock"),
        ];
        for (input, want) in cases {
            assert_eq!(local_dial(&input.parse().unwrap()).to_string(), want);
        }
    }
}
