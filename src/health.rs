//! Readiness of a role's dependencies, answered by CSI `Probe` (and the agent's `GetInfo`).
//!
//! controller: at least one storage agent answers; node: iscsid accepts connections;
//! agent: tgtd answers its control socket.

use std::sync::Arc;
use std::time::Duration;

use crate::exec::{Cmd, Runner};

/// Why a dependency is not ready.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    /// tgtd does not answer `tgtadm --op show --mode sys`.
    #[error("tgtd is not answering: {0}")]
    Tgtd(String),
    /// iscsid's control socket refuses connections.
    #[error("iscsid is not reachable: {0}")]
    Iscsid(#[source] std::io::Error),
    /// The storage agent's own checks failed (tgtd, pools).
    #[error("agent not ready: {0}")]
    Agent(String),
    /// No configured storage agent answered.
    #[error("no storage agent reachable ({0})")]
    NoAgent(String),
}

/// Something a role needs before it can serve.
#[tonic::async_trait]
pub trait Dependency: Send + Sync {
    /// Checks the dependency once, quickly.
    async fn check(&self) -> Result<(), HealthError>;
}

/// A set of dependencies that must all be ready.
#[derive(Clone, Default)]
pub struct Readiness {
    deps: Vec<Arc<dyn Dependency>>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Readiness({} dependencies)", self.deps.len())
    }
}

impl Readiness {
    /// Adds a dependency.
    pub fn with(mut self, dep: Arc<dyn Dependency>) -> Self {
        self.deps.push(dep);
        self
    }

    /// Ok when every dependency is ready, else the first failure.
    pub async fn check(&self) -> Result<(), HealthError> {
        for d in &self.deps {
            d.check().await?;
        }
        Ok(())
    }
}

/// tgtd answering on its control port.
#[derive(Debug)]
pub struct Tgtd {
    runner: Runner,
    control_port: u16,
}

impl Tgtd {
    /// Checks tgtd through `tgtadm` (with `-C port` when not the default).
    pub fn new(runner: Runner, control_port: u16) -> Self {
        Tgtd {
            runner,
            control_port,
        }
    }
}

#[tonic::async_trait]
impl Dependency for Tgtd {
    async fn check(&self) -> Result<(), HealthError> {
        let mut cmd = Cmd::new("tgtadm").timeout(Duration::from_secs(5));
        if self.control_port != 0 {
            cmd = cmd.args(["-C".to_owned(), self.control_port.to_string()]);
        }
        let cmd = cmd.args(["--lld", "iscsi", "--op", "show", "--mode", "sys"]);
        match self.runner.run(&cmd).await {
            Ok(out) if out.success() => Ok(()),
            Ok(out) => Err(HealthError::Tgtd(format!(
                "exit {}: {}",
                out.code,
                out.stderr.trim()
            ))),
            Err(e) => Err(HealthError::Tgtd(e.to_string())),
        }
    }
}

/// The abstract Unix socket iscsid listens on for iscsiadm.
pub const ISCSID_ABSTRACT_SOCKET: &[u8] = b"ISCSIADM_ABSTRACT_NAMESPACE";

/// iscsid accepting connections on its abstract control socket.
#[derive(Debug, Default)]
pub struct Iscsid;

#[tonic::async_trait]
impl Dependency for Iscsid {
    async fn check(&self) -> Result<(), HealthError> {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(ISCSID_ABSTRACT_SOCKET)
            .map_err(HealthError::Iscsid)?;
        // A local connect never blocks for long; no need for a thread.
        std::os::unix::net::UnixStream::connect_addr(&addr)
            .map(drop)
            .map_err(HealthError::Iscsid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(bool);

    #[tonic::async_trait]
    impl Dependency for Fixed {
        async fn check(&self) -> Result<(), HealthError> {
            if self.0 {
                Ok(())
            } else {
                Err(HealthError::NoAgent("test".into()))
            }
        }
    }

    #[tokio::test]
    async fn all_must_be_ready() {
        let ok = Readiness::default().with(Arc::new(Fixed(true)));
        assert_eq!(ok.check().await.map_err(|e| e.to_string()), Ok(()));
        let bad = ok.clone().with(Arc::new(Fixed(false)));
        assert_eq!(
            bad.check().await.map_err(|e| e.to_string()),
            Err("no storage agent reachable (test)".to_owned())
        );
    }

    #[tokio::test]
    async fn tgtd_check_reports_failure_when_absent() {
        // A control port nobody uses: tgtadm (if installed) fails to connect; if tgtadm is
        // missing the spawn fails. Either way the check must say not ready.
        let err = Tgtd::new(Runner::default(), 65_001)
            .check()
            .await
            .unwrap_err();
        assert!(matches!(err, HealthError::Tgtd(_)), "{err:?}");
    }
}
