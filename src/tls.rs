//! Mutual TLS of the agent API (tonic over rustls with the ring provider).
//!
//! The agent presents its certificate and accepts only clients whose certificate chains to
//! its client CA; the controller, its health check and `agent-ctl` verify the agent against
//! their CA and present their own certificate. TLS applies to `tcp://` endpoints only: a Unix
//! socket stays plain text, its file mode being the access control.
//!
//! Certificate and key files are read once, at start; a missing file or one without the
//! expected PEM block is reported with its path before anything listens or dials.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, Server, ServerTlsConfig};

use crate::config::{AgentClientTlsConfig, AgentTlsConfig};

/// How long a client gets to complete the TLS handshake before the agent drops it.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of loading TLS material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file could not be read.
    #[error("cannot read {what} {path}")]
    Read {
        /// What the file should hold ("client CA", "certificate", "private key").
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file holds no PEM block of the expected kind.
    #[error("{what} {path} holds no PEM {label} block")]
    NoPem {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The PEM label looked for.
        label: &'static str,
    },
    /// rustls rejected the server's certificate, key or client CA.
    #[error("TLS server configuration rejected")]
    Server {
        /// tonic's error (which names rustls's reason).
        #[source]
        source: tonic::transport::Error,
    },
}

/// Reads `path` and checks that it holds a PEM block whose label ends with `label`.
fn read_pem(what: &'static str, path: &Path, label: &'static str) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })?;
    let text = String::from_utf8_lossy(&bytes);
    let found = text.lines().any(|l| {
        l.trim()
            .strip_prefix("-----BEGIN ")
            .and_then(|rest| rest.strip_suffix("-----"))
            .is_some_and(|l| l.ends_with(label))
    });
    if !found {
        return Err(TlsError::NoPem {
            what,
            path: path.to_owned(),
            label,
        });
    }
    Ok(bytes)
}

fn identity(cert: &Path, key: &Path) -> Result<Identity, TlsError> {
    Ok(Identity::from_pem(
        read_pem("certificate", cert, "CERTIFICATE")?,
        read_pem("private key", key, "PRIVATE KEY")?,
    ))
}

/// The agent's server side: its identity, and client certificates required and checked
/// against `client_ca_file`.
pub fn server_config(cfg: &AgentTlsConfig) -> Result<ServerTlsConfig, TlsError> {
    let ca = read_pem("client CA", &cfg.client_ca_file, "CERTIFICATE")?;
    Ok(ServerTlsConfig::new()
        .identity(identity(&cfg.cert_file, &cfg.key_file)?)
        .client_ca_root(Certificate::from_pem(ca))
        .client_auth_optional(false)
        .timeout(HANDSHAKE_TIMEOUT))
}

/// A server builder, with mutual TLS when `cfg` is given (files are read and checked now).
pub fn server_builder(cfg: Option<&AgentTlsConfig>) -> Result<Server, TlsError> {
    let builder = Server::builder();
    match cfg {
        None => Ok(builder),
        Some(cfg) => builder
            .tls_config(server_config(cfg)?)
            .map_err(|source| TlsError::Server { source }),
    }
}

/// What a client of the agent API uses for `tcp://` endpoints.
#[derive(Clone, Debug)]
pub struct ClientTls {
    config: ClientTlsConfig,
}

impl ClientTls {
    /// Verifies servers against `ca` and presents `identity` (certificate, key) when given;
    /// `server_name` replaces the endpoint's host in the certificate check.
    pub fn load(
        ca: &Path,
        identity_files: Option<(&Path, &Path)>,
        server_name: Option<&str>,
    ) -> Result<Self, TlsError> {
        let ca = read_pem("CA", ca, "CERTIFICATE")?;
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        if let Some((cert, key)) = identity_files {
            config = config.identity(identity(cert, key)?);
        }
        if let Some(name) = server_name {
            config = config.domain_name(name);
        }
        Ok(ClientTls { config })
    }

    /// From the controller's `[agent_tls]`.
    pub fn from_config(cfg: &AgentClientTlsConfig) -> Result<Self, TlsError> {
        ClientTls::load(
            &cfg.ca_file,
            Some((&cfg.cert_file, &cfg.key_file)),
            cfg.server_name.as_deref(),
        )
    }

    /// tonic's configuration.
    pub fn config(&self) -> &ClientTlsConfig {
        &self.config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_files_are_checked_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(
            &cert,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        std::fs::write(&key, "not a key\n").unwrap();
        let missing = dir.path().join("missing.pem");

        assert_eq!(
            read_pem("certificate", &cert, "CERTIFICATE").unwrap(),
            std::fs::read(&cert).unwrap()
        );
        let err = read_pem("private key", &key, "PRIVATE KEY").unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "private key {} holds no PEM PRIVATE KEY block",
                key.display()
            )
        );
        let err = ClientTls::load(&missing, None, None).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("cannot read CA {}", missing.display())
        );
        // A certificate is not a key, even though both are PEM.
        let err = ClientTls::load(&cert, Some((&cert, &cert)), None).unwrap_err();
        assert!(
            matches!(
                err,
                TlsError::NoPem {
                    label: "PRIVATE KEY",
                    ..
                }
            ),
            "{err}"
        );
    }
}
