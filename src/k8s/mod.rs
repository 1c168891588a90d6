//! Kubernetes as Cinderblock's state store and control surface: the custom resources
//! ([`crd`]), agents registering their pools ([`registration`]), the controller discovering
//! them ([`discovery`]), leader election over a Lease ([`leader`]) and the VolumeBackup /
//! VolumeRestore reconcilers ([`backups`]).
//!
//! Everything here talks to the apiserver through `kube`; the pure parts (object names,
//! status mapping, the leader state machine, phase transitions) are plain functions with
//! unit tests, and `tests/kube_api.rs` runs the rest against a real apiserver.

pub mod backups;
pub mod crd;
pub mod discovery;
pub mod leader;
pub mod pools;
pub mod registration;

use std::path::Path;

/// Field manager of every write Cinderblock makes (server-side apply and updates).
pub const FIELD_MANAGER: &str = "cinderblock";

/// Errors of talking to the Kubernetes API.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// No usable kubeconfig or in-cluster configuration.
    #[error("no Kubernetes client configuration")]
    Config(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The client could not be built from the configuration.
    #[error("cannot build the Kubernetes client")]
    Client(#[source] kube::Error),
    /// An API call failed.
    #[error("Kubernetes API: {op}")]
    Api {
        /// What was being done.
        op: String,
        /// The client's error (an apiserver Status, a transport failure).
        #[source]
        source: kube::Error,
    },
}

impl KubeError {
    /// A closure wrapping a client error with what was being done.
    pub fn api(op: impl Into<String>) -> impl FnOnce(kube::Error) -> KubeError {
        let op = op.into();
        move |source| KubeError::Api { op, source }
    }

    /// The apiserver's HTTP status code, when the apiserver answered.
    pub fn code(&self) -> Option<u16> {
        match self {
            KubeError::Api {
                source: kube::Error::Api(s),
                ..
            } => Some(s.code),
            KubeError::Api { .. } | KubeError::Config(_) | KubeError::Client(_) => None,
        }
    }
}

/// A client from `kubeconfig`, or else `$KUBECONFIG` / `~/.kube/config`, or else the pod's
/// service account.
pub async fn client(kubeconfig: Option<&Path>) -> Result<kube::Client, KubeError> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| KubeError::Config(Box::new(e)))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| KubeError::Config(Box::new(e)))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| KubeError::Config(Box::new(e)))?,
    };
    kube::Client::try_from(config).map_err(KubeError::Client)
}

/// `POD_NAME` when set, else the host name: who this replica is in a Lease.
pub fn default_identity() -> String {
    std::env::var("POD_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(crate::config::host_name)
}

/// `POD_NAMESPACE` when set, else `default`.
pub fn default_namespace() -> String {
    std::env::var("POD_NAMESPACE")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".to_owned())
}

/// Starts the controller's Kubernetes side: leader election (or [`leader::Leadership::always`]
/// when disabled), agent discovery on every replica, and the VolumeBackup / VolumeRestore
/// reconcilers on the leader. Returns the leadership the CSI gate and metrics follow.
pub async fn start_controller(
    cfg: &crate::config::ControllerConfig,
    kube_cfg: &crate::config::ControllerKubeConfig,
    controller: std::sync::Arc<crate::controller::Controller>,
    tls: Option<crate::tls::ClientTls>,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<leader::Leadership, KubeError> {
    use std::sync::Arc;
    use std::time::Duration;

    let client = client(kube_cfg.kubeconfig.as_deref()).await?;
    let le = &kube_cfg.leader_election;
    let leadership = if le.enabled {
        let identity = le.identity.clone().unwrap_or_else(default_identity);
        let lease = leader::LeaseRef {
            namespace: le.namespace.clone().unwrap_or_else(default_namespace),
            name: le.lease_name.clone(),
        };
        let timing = leader::Timing {
            lease_duration: Duration::from_secs(le.lease_duration_secs),
            renew_deadline: Duration::from_secs(le.renew_deadline_secs),
            retry_period: Duration::from_secs(le.retry_period_secs),
        };
        tracing::info!(lease = %format!("{}/{}", lease.namespace, lease.name), %identity, "leader election enabled");
        let (leadership, _task) = leader::start(
            client.clone(),
            lease,
            leader::Elector::new(identity, timing),
            shutdown.clone(),
        );
        leadership
    } else {
        leader::Leadership::always()
    };
    let directory = Arc::new(discovery::AgentDirectory::new(
        cfg.agents
            .iter()
            .map(|a| (a.name.clone(), a.endpoint.clone())),
    ));
    if kube_cfg.discover_agents {
        let d = discovery::Discovery {
            controller: controller.clone(),
            directory: directory.clone(),
            static_names: cfg.agents.iter().map(|a| a.name.clone()).collect(),
            tls: tls.clone(),
            stale_after: Duration::from_secs(kube_cfg.pool_stale_after_secs),
        };
        tokio::spawn(d.run(
            client.clone(),
            Duration::from_secs(kube_cfg.discovery_interval_secs),
            shutdown.clone(),
        ));
    }
    if kube_cfg.backups {
        let ctx = Arc::new(backups::Context {
            client,
            controller,
            directory,
            tls,
        });
        tokio::spawn(backups::run(ctx, leadership.clone(), shutdown));
    }
    Ok(leadership)
}
