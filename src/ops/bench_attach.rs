//! `cinderblock bench-attach`: how long a pod waits for its volume on a node, as kubelet
//! sees it: NodeStageVolume (iSCSI login, wait for the disk, mkfs on first use, mount) plus
//! NodePublishVolume (bind mount), timed in one client process. Creating, publishing and
//! cleaning up around each attach are not timed. `make bench` sets this next to the same
//! work done by hand with `iscsiadm`, `mkfs` and `mount` in the same guest.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;
use tonic::transport::Channel;

use super::{rpc_err, OpsError};
use crate::cli::OutputFormat;
use crate::proto::csi::controller_client::ControllerClient;
use crate::proto::csi::node_client::NodeClient;
use crate::proto::csi::volume_capability::{access_mode, AccessMode, AccessType, MountVolume};
use crate::proto::csi::{self as pb, volume_capability::BlockVolume};
use crate::transport::{self, Endpoint};
use crate::types::Bytes;

/// `cinderblock bench-attach`.
#[derive(Debug, clap::Args)]
pub struct BenchAttachArgs {
    /// The controller's CSI endpoint.
    #[arg(long, value_name = "ENDPOINT")]
    pub controller: Endpoint,
    /// The node service's CSI endpoint (this bench runs on that node: it makes the
    /// staging directories itself, as kubelet does).
    #[arg(long, value_name = "ENDPOINT")]
    pub node: Endpoint,
    /// Size of each volume.
    #[arg(long, default_value = "64Mi")]
    pub size: Bytes,
    /// Number of attach cycles (one at a time).
    #[arg(long, default_value_t = 5)]
    pub count: usize,
    /// File system to make and mount, or `block` for a raw block volume.
    #[arg(long, default_value = "ext4")]
    pub fs: String,
    /// Volume type (the StorageClass `type` parameter); empty = the default type.
    #[arg(long, default_value = "")]
    pub r#type: String,
    /// Where staging and target paths are made.
    #[arg(long, default_value = "/var/lib/cinderblock-bench")]
    pub dir: PathBuf,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

/// What the attach cycles measured (milliseconds).
#[derive(Debug, Serialize, PartialEq)]
pub struct AttachReport {
    /// Attach cycles run.
    pub count: usize,
    /// Median NodeStageVolume + NodePublishVolume.
    pub median_ms: f64,
    /// Median NodeStageVolume alone.
    pub stage_median_ms: f64,
    /// Median NodePublishVolume alone.
    pub publish_median_ms: f64,
    /// Fastest attach.
    pub min_ms: f64,
    /// Slowest attach.
    pub max_ms: f64,
}

/// The lower middle of `v` (nearest rank), 0 when empty.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    super::bench::quantile(&v, 0.5)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn capability(fs: &str) -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(if fs == "block" {
            AccessType::Block(BlockVolume {})
        } else {
            AccessType::Mount(MountVolume {
                fs_type: fs.to_owned(),
                ..Default::default()
            })
        }),
        access_mode: Some(AccessMode {
            mode: access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

/// One untimed create + publish, the timed stage + publish, and the untimed way back.
/// Returns (stage, publish) durations.
async fn cycle(
    ctl: &mut ControllerClient<Channel>,
    node: &mut NodeClient<Channel>,
    node_id: &str,
    args: &BenchAttachArgs,
    name: String,
) -> Result<(Duration, Duration), OpsError> {
    let cap = capability(&args.fs);
    let mut parameters = std::collections::HashMap::new();
    if !args.r#type.is_empty() {
        parameters.insert("type".to_owned(), args.r#type.clone());
    }
    let volume = ctl
        .create_volume(pb::CreateVolumeRequest {
            name: name.clone(),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: i64::try_from(args.size.0).unwrap_or(i64::MAX),
                limit_bytes: 0,
            }),
            volume_capabilities: vec![cap.clone()],
            parameters,
            ..Default::default()
        })
        .await
        .map_err(rpc_err("CreateVolume"))?
        .into_inner()
        .volume
        .unwrap_or_default();
    let id = volume.volume_id;
    let published = ctl
        .controller_publish_volume(pb::ControllerPublishVolumeRequest {
            volume_id: id.clone(),
            node_id: node_id.to_owned(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await
        .map_err(rpc_err("ControllerPublishVolume"))?
        .into_inner();
    let stage = args.dir.join("stage").join(&name);
    let pod = args.dir.join("pods").join(&name);
    let target = pod.join("volume");
    for d in [&stage, &pod] {
        std::fs::create_dir_all(d).map_err(|source| OpsError::Io {
            path: d.clone(),
            source,
        })?;
    }
    let t = Instant::now();
    node.node_stage_volume(pb::NodeStageVolumeRequest {
        volume_id: id.clone(),
        publish_context: published.publish_context.clone(),
        staging_target_path: stage.display().to_string(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    })
    .await
    .map_err(rpc_err("NodeStageVolume"))?;
    let staged = t.elapsed();
    let t = Instant::now();
    node.node_publish_volume(pb::NodePublishVolumeRequest {
        volume_id: id.clone(),
        publish_context: published.publish_context,
        staging_target_path: stage.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(cap),
        ..Default::default()
    })
    .await
    .map_err(rpc_err("NodePublishVolume"))?;
    let publish = t.elapsed();
    node.node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
        volume_id: id.clone(),
        target_path: target.display().to_string(),
    })
    .await
    .map_err(rpc_err("NodeUnpublishVolume"))?;
    node.node_unstage_volume(pb::NodeUnstageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: stage.display().to_string(),
    })
    .await
    .map_err(rpc_err("NodeUnstageVolume"))?;
    ctl.controller_unpublish_volume(pb::ControllerUnpublishVolumeRequest {
        volume_id: id.clone(),
        node_id: node_id.to_owned(),
        ..Default::default()
    })
    .await
    .map_err(rpc_err("ControllerUnpublishVolume"))?;
    ctl.delete_volume(pb::DeleteVolumeRequest {
        volume_id: id,
        ..Default::default()
    })
    .await
    .map_err(rpc_err("DeleteVolume"))?;
    // Best effort: the directories are empty again; a leftover only costs an inode.
    let _ = std::fs::remove_dir(&target);
    let _ = std::fs::remove_dir(&pod);
    let _ = std::fs::remove_dir(&stage);
    Ok((staged, publish))
}

/// Runs `cinderblock bench-attach`. The first failing call ends the run with its error.
pub async fn bench_attach(args: BenchAttachArgs) -> Result<AttachReport, OpsError> {
    let mut ctl = ControllerClient::new(transport::connect(&args.controller, false).await?);
    let mut node = NodeClient::new(transport::connect(&args.node, false).await?);
    let node_id = node
        .node_get_info(pb::NodeGetInfoRequest {})
        .await
        .map_err(rpc_err("NodeGetInfo"))?
        .into_inner()
        .node_id;
    let prefix = format!("attach-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let (mut total, mut stages, mut publishes) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..args.count {
        let (s, p) = cycle(
            &mut ctl,
            &mut node,
            &node_id,
            &args,
            format!("{prefix}-{i}"),
        )
        .await?;
        total.push(ms(s + p));
        stages.push(ms(s));
        publishes.push(ms(p));
    }
    Ok(AttachReport {
        count: total.len(),
        min_ms: total.iter().copied().fold(f64::INFINITY, f64::min),
        max_ms: total.iter().copied().fold(0.0, f64::max),
        median_ms: median(total),
        stage_median_ms: median(stages),
        publish_median_ms: median(publishes),
    })
}

/// Prints the report as a table or JSON.
pub fn print_report(r: &AttachReport, format: OutputFormat) {
    match format {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(r).unwrap_or_default()),
        OutputFormat::Table => {
            println!("attaches    {}", r.count);
            println!(
                "stage+publish median {:.1} ms (stage {:.1} ms, publish {:.1} ms), min {:.1} ms, max {:.1} ms",
                r.median_ms, r.stage_median_ms, r.publish_median_ms, r.min_ms, r.max_ms
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_takes_the_lower_middle() {
        assert_eq!(median(vec![]), 0.0);
        assert_eq!(median(vec![3.0]), 3.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0]), 3.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.0);
    }

    #[test]
    fn block_and_mount_capabilities() {
        assert!(matches!(
            capability("block").access_type,
            Some(AccessType::Block(_))
        ));
        match capability("xfs").access_type {
            Some(AccessType::Mount(m)) => assert_eq!(m.fs_type, "xfs"),
            other => panic!("{other:?}"),
        }
    }
}
