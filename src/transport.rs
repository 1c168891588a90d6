//! Where a role listens and how clients reach it: `unix:///path` or `tcp://host:port`.
//!
//! Serving and dialling both live here so every role and every test uses the same code.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::tls::ClientTls;

/// Errors of endpoint parsing, listening and dialling.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The endpoint text is not `unix:///absolute/path` or `tcp://host:port`.
    #[error("invalid endpoint {text:?}: {reason}")]
    InvalidEndpoint {
        /// The text given.
        text: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Binding the listening socket failed.
    #[error("cannot listen on {endpoint}")]
    Bind {
        /// The endpoint.
        endpoint: Endpoint,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The gRPC server stopped with an error.
    #[error("gRPC server on {endpoint} failed")]
    Serve {
        /// The endpoint.
        endpoint: Endpoint,
        /// The transport error.
        #[source]
        source: tonic::transport::Error,
    },
    /// The client TLS configuration could not be applied to the endpoint.
    #[error("TLS configuration for {endpoint} rejected")]
    Tls {
        /// The endpoint.
        endpoint: Endpoint,
        /// The transport error.
        #[source]
        source: tonic::transport::Error,
    },
    /// Connecting to a remote endpoint failed.
    #[error("cannot connect to {endpoint}")]
    Connect {
        /// The endpoint.
        endpoint: Endpoint,
        /// The transport error.
        #[source]
        source: tonic::transport::Error,
    },
}

/// A gRPC endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix domain socket at an absolute path.
    Unix(PathBuf),
    /// A TCP address; the host may be a name (dialling) or an IP (listening).
    Tcp(String),
}

impl FromStr for Endpoint {
    type Err = TransportError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = |reason| TransportError::InvalidEndpoint {
            text: text.to_owned(),
            reason,
        };
        if let Some(path) = text.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(invalid(
                    "a unix endpoint needs an absolute path (unix:///run/x.sock)",
                ));
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        if let Some(addr) = text.strip_prefix("tcp://") {
            let (host, port) = addr
                .rsplit_once(':')
                .ok_or_else(|| invalid("a tcp endpoint needs host:port"))?;
            if host.is_empty() || port.parse::<u16>().is_err() {
                return Err(invalid("a tcp endpoint needs a host and a port 0..65535"));
            }
            return Ok(Endpoint::Tcp(addr.to_owned()));
        }
        Err(invalid("expected unix:///path or tcp://host:port"))
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix://{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp://{a}"),
        }
    }
}

impl serde::Serialize for Endpoint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Endpoint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Serves `router` on `endpoint` until `shutdown` is cancelled, then drains in-flight calls.
/// A stale Unix socket file is replaced, and removed again on exit.
pub async fn serve(
    router: tonic::transport::server::Router,
    endpoint: &Endpoint,
    shutdown: CancellationToken,
) -> Result<(), TransportError> {
    let bind_err = |source| TransportError::Bind {
        endpoint: endpoint.clone(),
        source,
    };
    let signal = shutdown.clone().cancelled_owned();
    let result = match endpoint {
        Endpoint::Unix(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(bind_err)?;
            }
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(bind_err(e)),
            }
            let listener = tokio::net::UnixListener::bind(path).map_err(bind_err)?;
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            let r = drain(
                router.serve_with_incoming_shutdown(incoming, signal),
                &shutdown,
            )
            .await;
            let _ = std::fs::remove_file(path);
            r
        }
        Endpoint::Tcp(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(bind_err)?;
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            drain(
                router.serve_with_incoming_shutdown(incoming, signal),
                &shutdown,
            )
            .await
        }
    };
    result.map_err(|source| TransportError::Serve {
        endpoint: endpoint.clone(),
        source,
    })
}

/// How long in-flight calls get to finish after a shutdown signal. Clients that keep an idle
/// connection open would otherwise hold the process forever.
pub const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs the server future; once `shutdown` fires, gives it [`DRAIN_TIMEOUT`] to finish.
async fn drain<F>(server: F, shutdown: &CancellationToken) -> Result<(), tonic::transport::Error>
where
    F: std::future::Future<Output = Result<(), tonic::transport::Error>>,
{
    tokio::pin!(server);
    tokio::select! {
        r = &mut server => return r,
        _ = shutdown.cancelled() => {}
    }
    match tokio::time::timeout(DRAIN_TIMEOUT, server).await {
        Ok(r) => r,
        Err(_) => {
            tracing::info!("connections still open after {DRAIN_TIMEOUT:?}; closing them");
            Ok(())
        }
    }
}

/// Binds a TCP listener for `addr` and reports the real address (useful with port 0).
pub async fn local_tcp_addr(addr: &str) -> std::io::Result<SocketAddr> {
    tokio::net::TcpListener::bind(addr).await?.local_addr()
}

/// Opens a gRPC channel to `endpoint`. The connection is made lazily when `lazy` is true
/// (controllers keep channels to agents that may come up later).
pub async fn connect(endpoint: &Endpoint, lazy: bool) -> Result<Channel, TransportError> {
    connect_tls(endpoint, lazy, None).await
}

/// [`connect`], with TLS on a `tcp://` endpoint when `tls` is given. A `unix://` endpoint is
/// always dialled in plain text (`tls` does not apply to it; see `crate::tls`).
pub async fn connect_tls(
    endpoint: &Endpoint,
    lazy: bool,
    tls: Option<&ClientTls>,
) -> Result<Channel, TransportError> {
    let conn_err = |source| TransportError::Connect {
        endpoint: endpoint.clone(),
        source,
    };
    match endpoint {
        Endpoint::Tcp(addr) => {
            let scheme = if tls.is_some() { "https" } else { "http" };
            let mut ep = Channel::from_shared(format!("{scheme}://{addr}"))
                .map_err(|_| TransportError::InvalidEndpoint {
                    text: endpoint.to_string(),
                    reason: "not a valid URI authority",
                })?
                .connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true);
            if let Some(tls) = tls {
                ep = ep
                    .tls_config(tls.config().clone())
                    .map_err(|source| TransportError::Tls {
                        endpoint: endpoint.clone(),
                        source,
                    })?;
            }
            if lazy {
                Ok(ep.connect_lazy())
            } else {
                ep.connect().await.map_err(conn_err)
            }
        }
        Endpoint::Unix(path) => {
            // The URI is required by tonic but unused: the connector below ignores it.
            let ep = Channel::from_static("http://[::1]:1").connect_timeout(Duration::from_secs(5));
            let path = path.clone();
            let connector = tower::service_fn(move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(stream))
                }
            });
            if lazy {
                Ok(ep.connect_with_connector_lazy(connector))
            } else {
                ep.connect_with_connector(connector).await.map_err(conn_err)
            }
        }
    }
}

/// Cancels `token` on SIGTERM or SIGINT (graceful shutdown of every role).
pub fn cancel_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot install the SIGTERM handler");
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received, shutting down"),
        }
        token.cancel();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        let ok = [
            (
                "unix:///run/csi.sock",
                Endpoint::Unix("/run/csi.sock".into()),
            ),
            (
                "tcp://127.0.0.1:9700",
                Endpoint::Tcp("127.0.0.1:9700".into()),
            ),
            ("tcp://[::1]:10000", Endpoint::Tcp("[::1]:10000".into())),
            ("tcp://stor1:9700", Endpoint::Tcp("stor1:9700".into())),
        ];
        for (text, want) in ok {
            let got: Endpoint = text.parse().unwrap();
            assert_eq!(got, want, "{text}");
            assert_eq!(got.to_string(), text);
        }
        for bad in [
            "unix://relative.sock",
            "tcp://nohost",
            "tcp://:80",
            "tcp://h:99999",
            "http://x:1",
            "",
        ] {
            assert!(
                matches!(
                    bad.parse::<Endpoint>(),
                    Err(TransportError::InvalidEndpoint { .. })
                ),
                "{bad}"
            );
        }
    }
}
