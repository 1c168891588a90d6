//! Operator commands that talk to a running Cinderblock (the `cinder` client's role).

pub mod agent;
pub mod bench;

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::cli::{IdentityArgs, OutputFormat};
use crate::proto::csi::identity_client::IdentityClient;
use crate::proto::csi::{
    plugin_capability, GetPluginCapabilitiesRequest, GetPluginInfoRequest, ProbeRequest,
};
use crate::transport::{self, TransportError};

/// Errors of operator commands.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// The endpoint could not be reached.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The TLS files given are unusable.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The server answered with an error.
    #[error("{rpc} failed: {code:?}: {message}")]
    Rpc {
        /// RPC name.
        rpc: &'static str,
        /// gRPC code.
        code: tonic::Code,
        /// Server message.
        message: String,
    },
    /// Some calls of a measured burst failed.
    #[error("{failed} of {total} {rpc} calls failed, first: {first}")]
    Burst {
        /// RPC name.
        rpc: &'static str,
        /// Failed calls.
        failed: usize,
        /// All calls.
        total: usize,
        /// The first failure.
        first: String,
    },
    /// The call failed below gRPC: the connection was refused or closed (network, TLS).
    #[error("{rpc} failed: no answer over the connection: {message}{hint}")]
    Connection {
        /// RPC name.
        rpc: &'static str,
        /// The transport's message and causes.
        message: String,
        /// What may be wrong, as ` (...)`, or empty.
        hint: &'static str,
    },
    /// `--wait` ran out before the plugin became ready.
    #[error("not ready after {0:?}")]
    NotReady(Duration),
    /// A local file could not be written.
    #[error("cannot write {path}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
}

fn rpc_err(rpc: &'static str) -> impl Fn(tonic::Status) -> OpsError {
    move |s| rpc_failure(rpc, s)
}

/// The error of a failed call: [`OpsError::Connection`] when it failed below gRPC (the
/// status has a cause: tonic made it from a transport error), else [`OpsError::Rpc`] with
/// the server's code and message.
pub fn rpc_failure(rpc: &'static str, s: tonic::Status) -> OpsError {
    if std::error::Error::source(&s).is_some() {
        OpsError::Connection {
            rpc,
            message: status_text(&s),
            hint: "",
        }
    } else {
        OpsError::Rpc {
            rpc,
            code: s.code(),
            message: s.message().to_owned(),
        }
    }
}

/// A status's message and its causes ("transport error" alone does not tell a refused
/// client certificate from a dead peer). A cause already contained in the text so far is
/// not repeated.
fn status_text(s: &tonic::Status) -> String {
    let mut text = s.message().to_owned();
    let mut cause: Option<&dyn std::error::Error> = std::error::Error::source(s);
    while let Some(c) = cause {
        let t = c.to_string();
        if !text.contains(&t) {
            text.push_str(": ");
            text.push_str(&t);
        }
        cause = c.source();
    }
    text
}

/// What `cinderblock identity` reports.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct IdentityReport {
    /// Plugin name.
    pub name: String,
    /// Plugin version.
    pub version: String,
    /// Capabilities, as readable names.
    pub capabilities: Vec<String>,
    /// Probe's answer.
    pub ready: bool,
}

/// Queries Identity on an endpoint (optionally waiting for readiness).
pub async fn identity(args: &IdentityArgs) -> Result<IdentityReport, OpsError> {
    let channel = transport::connect(&args.endpoint, true).await?;
    let mut client = IdentityClient::new(channel);
    let deadline = Instant::now() + Duration::from_secs(args.wait);
    let info = loop {
        match client.get_plugin_info(GetPluginInfoRequest {}).await {
            Ok(r) => break r.into_inner(),
            Err(s) if s.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => return Err(rpc_err("GetPluginInfo")(s)),
        }
    };
    let caps = client
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .map_err(rpc_err("GetPluginCapabilities"))?
        .into_inner();
    let ready = loop {
        let ready = client
            .probe(ProbeRequest {})
            .await
            .map_err(rpc_err("Probe"))?
            .into_inner()
            .ready;
        if ready == Some(true) || Instant::now() >= deadline {
            break ready.unwrap_or(false);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let capabilities = caps
        .capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(plugin_capability::Type::Service(s)) => {
                plugin_capability::service::Type::try_from(s.r#type)
                    .ok()
                    .map(|t| t.as_str_name().to_owned())
            }
            Some(plugin_capability::Type::VolumeExpansion(e)) => {
                plugin_capability::volume_expansion::Type::try_from(e.r#type)
                    .ok()
                    .map(|t| format!("VOLUME_EXPANSION_{}", t.as_str_name()))
            }
            None => None,
        })
        .collect();
    let report = IdentityReport {
        name: info.name,
        version: info.vendor_version,
        capabilities,
        ready,
    };
    if args.wait > 0 && !report.ready {
        return Err(OpsError::NotReady(Duration::from_secs(args.wait)));
    }
    Ok(report)
}

/// Prints an identity report in the chosen format.
pub fn print_identity(report: &IdentityReport, format: OutputFormat) {
    match format {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(report).unwrap_or_default()
        ),
        OutputFormat::Table => {
            println!("plugin        {}", report.name);
            println!("version       {}", report.version);
            println!("capabilities  {}", report.capabilities.join(", "));
            println!("ready         {}", report.ready);
        }
    }
}
