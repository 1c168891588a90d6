//! `cinderblock agent-ctl bench-create`: CreateVolume latency as a client sees it, measured in
//! one process so that no process start-up is counted (`make bench` compares it with a raw
//! `lvcreate` of the same size on the same node).

use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::task::JoinSet;
use tonic::transport::Channel;

use super::OpsError;
use crate::cli::OutputFormat;
use crate::proto::agent as pb;
use crate::proto::agent::agent_client::AgentClient;
use crate::transport::{self, Endpoint};
use crate::types::Bytes;

/// What one burst measured.
#[derive(Debug, Serialize, PartialEq)]
pub struct BurstReport {
    /// Volumes asked for.
    pub count: usize,
    /// Calls in flight at once.
    pub parallel: usize,
    /// Calls that failed.
    pub errors: usize,
    /// First error message, if any.
    pub first_error: Option<String>,
    /// Answers that named an id another call also got (CSI: 0 for distinct names).
    pub duplicates: usize,
    /// Wall time of the whole burst, milliseconds.
    pub wall_ms: f64,
    /// Median call latency, milliseconds.
    pub median_ms: f64,
    /// 90th percentile call latency, milliseconds.
    pub p90_ms: f64,
    /// Fastest call, milliseconds.
    pub min_ms: f64,
    /// Slowest call, milliseconds.
    pub max_ms: f64,
    /// Ids created (deleted again unless kept).
    pub ids: Vec<String>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The value at quantile `q` (0..=1) of sorted `v`, nearest rank; 0 when empty.
pub(super) fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    // Nearest rank: ceil(q * n), 1-based.
    let rank = (q * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

/// Runs `count` calls of `call(i)`, at most `parallel` at once, and times each. A call
/// answers the id it made, or an error message.
pub async fn burst<F, Fut>(count: usize, parallel: usize, call: F) -> BurstReport
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<String, String>> + Send + 'static,
{
    let parallel = parallel.clamp(1, count.max(1));
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(parallel));
    let mut set = JoinSet::new();
    let t0 = Instant::now();
    for i in 0..count {
        let sem = sem.clone();
        let fut = call(i);
        set.spawn(async move {
            // The semaphore is never closed, so acquire cannot fail; a failure would only
            // mean running unthrottled.
            let _permit = sem.acquire_owned().await.ok();
            let t = Instant::now();
            let r = fut.await;
            (t.elapsed(), r)
        });
    }
    let mut lat = Vec::with_capacity(count);
    let mut ids = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok((d, Ok(id))) => {
                lat.push(ms(d));
                ids.push(id);
            }
            Ok((_, Err(m))) => {
                errors += 1;
                first_error.get_or_insert(m);
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    let wall = t0.elapsed();
    lat.sort_by(f64::total_cmp);
    ids.sort();
    let distinct = ids.windows(2).filter(|w| w[0] != w[1]).count() + usize::from(!ids.is_empty());
    BurstReport {
        count,
        parallel,
        errors,
        first_error,
        duplicates: ids.len() - distinct,
        wall_ms: ms(wall),
        median_ms: quantile(&lat, 0.5),
        p90_ms: quantile(&lat, 0.9),
        min_ms: lat.first().copied().unwrap_or(0.0),
        max_ms: lat.last().copied().unwrap_or(0.0),
        ids,
    }
}

/// Creates `count` blank volumes of `size` on an agent's `pool`, at most `parallel` at once.
/// Ids are `PREFIX-N`.
pub async fn create_burst(
    client: AgentClient<Channel>,
    pool: &str,
    size: Bytes,
    count: usize,
    parallel: usize,
    prefix: &str,
) -> BurstReport {
    burst(count, parallel, |i| {
        let mut c = client.clone();
        let req = pb::CreateVolumeRequest {
            volume_id: format!("{prefix}-{i}"),
            pool: pool.to_owned(),
            size_bytes: size.0,
            volume_type: "default".into(),
            metadata: Default::default(),
            source: None,
        };
        async move {
            let id = req.volume_id.clone();
            c.create_volume(req)
                .await
                .map(|_| id.clone())
                .map_err(|s| format!("{id}: {}", s.message()))
        }
    })
    .await
}

/// Deletes what a burst created, one at a time.
pub async fn delete_all(mut client: AgentClient<Channel>, ids: &[String]) -> Result<(), OpsError> {
    for id in ids {
        client
            .delete_volume(pb::DeleteVolumeRequest {
                volume_id: id.clone(),
            })
            .await
            .map_err(|s| OpsError::Rpc {
                rpc: "DeleteVolume",
                code: s.code(),
                message: s.message().to_owned(),
            })?;
    }
    Ok(())
}

/// `cinderblock bench-csi`: CreateVolume through a CSI controller, as the external
/// provisioner calls it.
#[derive(Debug, clap::Args)]
pub struct BenchCsiArgs {
    /// The controller's CSI endpoint.
    #[arg(long, env = "CINDERBLOCK_ENDPOINT", value_name = "ENDPOINT")]
    pub endpoint: Endpoint,
    /// Size of each volume.
    #[arg(long, default_value = "64Mi")]
    pub size: Bytes,
    /// Number of volumes.
    #[arg(long, default_value_t = 20)]
    pub count: usize,
    /// Calls in flight at once.
    #[arg(long, default_value_t = 1)]
    pub parallel: usize,
    /// Volume type (the StorageClass `type` parameter); empty = the default type.
    #[arg(long, default_value = "")]
    pub r#type: String,
    /// Volume name prefix (default: bench-<random>).
    #[arg(long)]
    pub prefix: Option<String>,
    /// Keep the volumes.
    #[arg(long)]
    pub keep: bool,
    /// Deadline of each CreateVolume in seconds, sent as the external-provisioner sends its
    /// `--timeout` (the controller's agent calls end by it).
    #[arg(long, default_value_t = 3600)]
    pub timeout_secs: u64,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

/// Runs `cinderblock bench-csi`: creates, reports, deletes.
pub async fn bench_csi(args: BenchCsiArgs) -> Result<BurstReport, OpsError> {
    use crate::proto::csi::{self as csi, controller_client::ControllerClient};
    let client = ControllerClient::new(transport::connect(&args.endpoint, false).await?);
    let prefix = args
        .prefix
        .unwrap_or_else(|| format!("bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]));
    let mut parameters = std::collections::HashMap::new();
    if !args.r#type.is_empty() {
        parameters.insert("type".to_owned(), args.r#type.clone());
    }
    let cap = csi::VolumeCapability {
        access_type: Some(csi::volume_capability::AccessType::Mount(
            csi::volume_capability::MountVolume {
                fs_type: "ext4".into(),
                ..Default::default()
            },
        )),
        access_mode: Some(csi::volume_capability::AccessMode {
            mode: csi::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
        }),
    };
    let size = i64::try_from(args.size.0).unwrap_or(i64::MAX);
    let r = burst(args.count, args.parallel, |i| {
        let mut c = client.clone();
        let req = csi::CreateVolumeRequest {
            name: format!("{prefix}-{i}"),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: size,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![cap.clone()],
            parameters: parameters.clone(),
            ..Default::default()
        };
        let mut req = tonic::Request::new(req);
        req.set_timeout(Duration::from_secs(args.timeout_secs));
        async move {
            let name = req.get_ref().name.clone();
            match c.create_volume(req).await {
                Ok(r) => r
                    .into_inner()
                    .volume
                    .map(|v| v.volume_id)
                    .ok_or_else(|| format!("{name}: no volume in the answer")),
                Err(s) => Err(format!("{name}: {:?}: {}", s.code(), s.message())),
            }
        }
    })
    .await;
    if !args.keep {
        let mut c = client.clone();
        for id in &r.ids {
            c.delete_volume(csi::DeleteVolumeRequest {
                volume_id: id.clone(),
                secrets: Default::default(),
            })
            .await
            .map_err(|s| OpsError::Rpc {
                rpc: "DeleteVolume",
                code: s.code(),
                message: s.message().to_owned(),
            })?;
        }
    }
    Ok(r)
}

/// Prints a burst report as a table or JSON.
pub fn print_report(r: &BurstReport, format: OutputFormat) {
    match format {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(r).unwrap_or_default()),
        OutputFormat::Table => {
            println!("volumes     {} ({} at once)", r.count, r.parallel);
            println!("errors      {}", r.errors);
            println!("duplicates  {}", r.duplicates);
            println!("wall        {:.1} ms", r.wall_ms);
            println!(
                "latency     median {:.1} ms, p90 {:.1} ms, min {:.1} ms, max {:.1} ms",
                r.median_ms, r.p90_ms, r.min_ms, r.max_ms
            );
            if let Some(e) = &r.first_error {
                println!("first error {e}");
            }
        }
    }
}

/// The error for a report with failed calls, if any.
pub fn failures(r: &BurstReport, rpc: &'static str) -> Result<(), OpsError> {
    if r.errors == 0 {
        return Ok(());
    }
    Err(OpsError::Burst {
        rpc,
        failed: r.errors,
        total: r.count,
        first: r.first_error.clone().unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_by_nearest_rank() {
        let v = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0];
        assert_eq!(
            (quantile(&v, 0.5), quantile(&v, 0.9), quantile(&v, 1.0)),
            (5.0, 9.0, 10.0)
        );
        assert_eq!((quantile(&[], 0.5), quantile(&[3.0], 0.5)), (0.0, 3.0));
    }
}
