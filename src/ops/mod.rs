//! Operator commands that talk to a running Cinderblock (the `cinder` client's role).

pub mod agent;
pub mod backup;
pub mod bench;
pub mod bench_attach;
pub mod operator;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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
    /// `show` of an object that no id and no CSI name designates.
    #[error("{what} {key:?} not found (no {what} has this id or CSI name)")]
    NotFound {
        /// `volume`, ...
        what: &'static str,
        /// What the operator typed.
        key: String,
    },
    /// The endpoint answers but does not serve the API asked for.
    #[error("{endpoint} does not serve the {api} API (is it the controller's endpoint?)")]
    WrongEndpoint {
        /// The endpoint.
        endpoint: String,
        /// The API.
        api: &'static str,
    },
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

/// A backup record given on the command line, or read from stdin when it is `-`.
fn record_arg(record: String) -> Result<String, OpsError> {
    if record != "-" {
        return Ok(record);
    }
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).map_err(|e| OpsError::Io {
        path: "<stdin>".into(),
        source: e,
    })?;
    Ok(text)
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

/// Rows as an aligned table (the first row is the header), columns two spaces apart, no
/// trailing blanks; every line ends with a newline.
pub fn render_table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|i| {
            rows.iter()
                .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Prints `value` as pretty JSON, or `rows` as a table ([`render_table`]).
pub fn emit(format: OutputFormat, value: serde_json::Value, rows: Vec<Vec<String>>) {
    match format {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        ),
        OutputFormat::Table => print!("{}", render_table(&rows)),
    }
}

/// A size for people: the largest binary unit that keeps the number at least 1, with one
/// decimal unless whole (`12GiB`, `11.5GiB`, `100MiB`, `512B`).
pub fn human_size(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (unit, size) in UNITS {
        if bytes >= size {
            return if bytes.is_multiple_of(size) {
                format!("{}{unit}", bytes / size)
            } else {
                format!("{:.1}{unit}", bytes as f64 / size as f64)
            };
        }
    }
    format!("{bytes}B")
}

/// A time as RFC 3339 in UTC, whole seconds (`2026-01-02T03:04:05Z`); times before 1970 show
/// as the epoch.
pub fn utc_text(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (y, m, d) = civil_from_days(secs / 86_400);
    let rem = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Year, month and day of the `days`-th day after 1970-01-01 in the proleptic Gregorian
/// calendar: shift to a calendar starting on 1 March 0000 (so the leap day ends a year), count
/// whole 400-year eras, then years, then months of the shifted year (153 days per 5 months).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    // Days from 0000-03-01 to 1970-01-01.
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns_and_trims() {
        let rows = vec![
            vec!["ID".to_string(), "STATUS".to_string(), "NAME".to_string()],
            vec!["v-1".to_string(), "in-use".to_string(), String::new()],
            vec![
                "volume-22".to_string(),
                "available".to_string(),
                "pvc-é".to_string(),
            ],
        ];
        assert_eq!(
            render_table(&rows),
            "ID         STATUS     NAME\n\
             v-1        in-use\n\
             volume-22  available  pvc-é\n"
        );
        assert_eq!(render_table(&[]), "");
    }

    #[test]
    fn human_size_table() {
        let cases = [
            (0, "0B"),
            (512, "512B"),
            (1536, "1.5KiB"),
            (100 << 20, "100MiB"),
            (12 << 30, "12GiB"),
            ((23 << 30) / 2, "11.5GiB"),
            (3 << 40, "3TiB"),
        ];
        for (bytes, want) in cases {
            assert_eq!(human_size(bytes), want, "{bytes}");
        }
    }

    #[test]
    fn utc_text_table() {
        let cases = [
            (0, "1970-01-01T00:00:00Z"),
            (951_782_400, "2000-02-29T00:00:00Z"),
            (951_868_799, "2000-02-29T23:59:59Z"),
            (951_868_800, "2000-03-01T00:00:00Z"),
            (1_700_000_000, "2023-11-14T22:13:20Z"),
            (4_107_542_400, "2100-03-01T00:00:00Z"),
        ];
        for (secs, want) in cases {
            assert_eq!(
                utc_text(UNIX_EPOCH + Duration::from_secs(secs)),
                want,
                "{secs}"
            );
        }
    }
}
