//! `cinderblock volume|snapshot|pool|type`: the everyday commands of OpenStack's `cinder`
//! client, answered by the controller's operator API (`proto/operator.proto`,
//! docs/operator-api.md). Tables for people, `-o json` for scripts.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};
use serde_json::{json, Value};
use tonic::transport::Channel;
use tonic::Code;

use super::{emit, human_size, utc_text, OpsError};
use crate::cli::OutputFormat;
use crate::proto::operator as pb;
use crate::proto::operator::operator_client::OperatorClient;
use crate::transport::{self, Endpoint};

/// Which controller to ask, and how to print its answer (accepted after any subcommand).
#[derive(Debug, Args)]
pub struct Target {
    /// The controller's endpoint: its CSI endpoint, or its `operator_listen`.
    #[arg(
        long,
        global = true,
        env = "CINDERBLOCK_CONTROLLER",
        value_name = "ENDPOINT",
        default_value = "unix:///run/cinderblock/csi.sock"
    )]
    pub controller: Endpoint,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

/// `cinderblock volume`.
#[derive(Debug, Args)]
pub struct VolumeArgs {
    #[command(flatten)]
    pub target: Target,
    /// What to do.
    #[command(subcommand)]
    pub command: VolumeCommand,
}

/// Volume commands.
#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Every volume, with its Cinder status, size, type, pool and attachments.
    List {
        /// Only this pool (`agent#pool`, or a pool name on any agent).
        #[arg(long)]
        pool: Option<String>,
        /// Only this status (available, in-use, creating, deleting, extending, error, ...).
        #[arg(long)]
        status: Option<String>,
    },
    /// One volume in detail, by id or by CSI name (the PV name).
    Show {
        /// Volume id or CSI name.
        #[arg(value_name = "ID_OR_NAME")]
        volume: String,
    },
}

/// `cinderblock snapshot`.
#[derive(Debug, Args)]
pub struct SnapshotArgs {
    #[command(flatten)]
    pub target: Target,
    /// What to do.
    #[command(subcommand)]
    pub command: SnapshotCommand,
}

/// Snapshot commands.
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Every snapshot (of one volume with --volume).
    List {
        /// Only snapshots of this volume (id or CSI name).
        #[arg(long, value_name = "ID_OR_NAME")]
        volume: Option<String>,
    },
}

/// `cinderblock pool`.
#[derive(Debug, Args)]
pub struct PoolArgs {
    #[command(flatten)]
    pub target: Target,
    /// What to do.
    #[command(subcommand)]
    pub command: PoolCommand,
}

/// Pool commands.
#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Every pool with zone, capacity, counts and health (Cinder's get-pools --detail).
    List,
}

/// `cinderblock type`.
#[derive(Debug, Args)]
pub struct TypeArgs {
    #[command(flatten)]
    pub target: Target,
    /// What to do.
    #[command(subcommand)]
    pub command: TypeCommand,
}

/// Volume type commands.
#[derive(Debug, Subcommand)]
pub enum TypeCommand {
    /// The configured volume types with their extra specs.
    List,
}

type Client = OperatorClient<Channel>;

pub(super) async fn client(target: &Target) -> Result<Client, OpsError> {
    Ok(OperatorClient::new(
        transport::connect(&target.controller, false).await?,
    ))
}

/// The error of a failed call; UNIMPLEMENTED means the endpoint is not a controller.
pub(super) fn rpc_err(target: &Target, rpc: &'static str) -> impl Fn(tonic::Status) -> OpsError {
    let endpoint = target.controller.to_string();
    move |s| {
        if s.code() == Code::Unimplemented {
            OpsError::WrongEndpoint {
                endpoint: endpoint.clone(),
                api: "operator",
            }
        } else {
            OpsError::Rpc {
                rpc,
                code: s.code(),
                message: s.message().to_owned(),
            }
        }
    }
}

/// The volume an operator designates: by id first, then by CSI name (as the `cinder` client
/// resolves names).
async fn find_volume(c: &mut Client, target: &Target, key: &str) -> Result<pb::Volume, OpsError> {
    use pb::get_volume_request::Key;
    for k in [Key::Id(key.to_owned()), Key::Name(key.to_owned())] {
        match c.get_volume(pb::GetVolumeRequest { key: Some(k) }).await {
            Ok(v) => return Ok(v.into_inner()),
            Err(s) if s.code() == Code::NotFound => {}
            Err(s) => return Err(rpc_err(target, "GetVolume")(s)),
        }
    }
    Err(OpsError::NotFound {
        what: "volume",
        key: key.to_owned(),
    })
}

fn time(t: &Option<prost_types::Timestamp>) -> Option<SystemTime> {
    let t = t.as_ref()?;
    let secs = u64::try_from(t.seconds).ok()?;
    let nanos = u32::try_from(t.nanos).ok()?;
    UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

pub(super) fn time_text(t: &Option<prost_types::Timestamp>) -> String {
    time(t).map(utc_text).unwrap_or_default()
}

pub(super) fn time_json(t: &Option<prost_types::Timestamp>) -> Value {
    time(t).map_or(Value::Null, |t| Value::String(utc_text(t)))
}

pub(super) fn text_or_null(s: &str) -> Value {
    if s.is_empty() {
        Value::Null
    } else {
        Value::String(s.to_owned())
    }
}

fn sorted<V: Clone>(m: &std::collections::HashMap<String, V>) -> BTreeMap<String, V> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// `agent#pool`, Cinder's `host@backend#pool`.
fn pool_ref(agent: &str, pool: &str) -> String {
    format!("{agent}#{pool}")
}

fn source_json(v: &pb::Volume) -> Value {
    match &v.source {
        Some(pb::volume::Source::SourceSnapshotId(id)) => json!({"snapshot": id}),
        Some(pb::volume::Source::SourceVolumeId(id)) => json!({"volume": id}),
        None => Value::Null,
    }
}

fn source_text(v: &pb::Volume) -> String {
    match &v.source {
        Some(pb::volume::Source::SourceSnapshotId(id)) => format!("snapshot {id}"),
        Some(pb::volume::Source::SourceVolumeId(id)) => format!("volume {id}"),
        None => String::new(),
    }
}

/// Where a volume is attached, for a table: the node's host, else its initiator.
fn attached_text(v: &pb::Volume) -> String {
    v.attachments
        .iter()
        .map(|a| {
            if a.host.is_empty() {
                a.initiator.clone()
            } else {
                a.host.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The JSON of a volume (sizes in bytes, times in RFC 3339).
pub fn volume_json(v: &pb::Volume) -> Value {
    json!({
        "id": v.id,
        "name": text_or_null(&v.name),
        "status": v.status,
        "size_bytes": v.size_bytes,
        "type": v.volume_type,
        "pool": v.pool,
        "agent": v.agent,
        "zone": v.zone,
        "source": source_json(v),
        "attachments": v.attachments.iter()
            .map(|a| json!({"host": text_or_null(&a.host), "initiator": a.initiator}))
            .collect::<Vec<_>>(),
        "snapshot_count": v.snapshot_count,
        "created_at": time_json(&v.created_at),
        "metadata": sorted(&v.metadata),
        "abnormal_reason": text_or_null(&v.abnormal_reason),
    })
}

/// The rows of `volume list`.
pub fn volume_rows(vols: &[pb::Volume]) -> Vec<Vec<String>> {
    let header = [
        "ID",
        "NAME",
        "STATUS",
        "SIZE",
        "TYPE",
        "POOL",
        "ZONE",
        "ATTACHED TO",
    ];
    let mut rows = vec![header.map(String::from).to_vec()];
    for v in vols {
        rows.push(vec![
            v.id.clone(),
            v.name.clone(),
            v.status.clone(),
            human_size(v.size_bytes),
            v.volume_type.clone(),
            pool_ref(&v.agent, &v.pool),
            v.zone.clone(),
            attached_text(v),
        ]);
    }
    rows
}

/// The rows of `volume show`: one property per row.
pub fn volume_detail_rows(v: &pb::Volume) -> Vec<Vec<String>> {
    let mut rows: Vec<Vec<String>> = vec![
        vec!["PROPERTY".into(), "VALUE".into()],
        vec!["id".into(), v.id.clone()],
        vec!["name".into(), v.name.clone()],
        vec!["status".into(), v.status.clone()],
        vec![
            "size".into(),
            format!("{} ({} bytes)", human_size(v.size_bytes), v.size_bytes),
        ],
        vec!["type".into(), v.volume_type.clone()],
        vec!["pool".into(), pool_ref(&v.agent, &v.pool)],
        vec!["zone".into(), v.zone.clone()],
        vec!["source".into(), source_text(v)],
    ];
    let attachments: Vec<String> = v
        .attachments
        .iter()
        .map(|a| match a.host.as_str() {
            "" => a.initiator.clone(),
            host => format!("{host} ({})", a.initiator),
        })
        .collect();
    rows.push(vec!["attached to".into(), attachments.join(", ")]);
    rows.push(vec!["snapshots".into(), v.snapshot_count.to_string()]);
    rows.push(vec!["created".into(), time_text(&v.created_at)]);
    if !v.abnormal_reason.is_empty() {
        rows.push(vec!["abnormal".into(), v.abnormal_reason.clone()]);
    }
    for (k, val) in sorted(&v.metadata) {
        rows.push(vec![format!("metadata {k}"), val]);
    }
    rows
}

fn snapshot_json(s: &pb::Snapshot) -> Value {
    json!({
        "id": s.id,
        "name": text_or_null(&s.name),
        "status": s.status,
        "volume_id": s.volume_id,
        "size_bytes": s.size_bytes,
        "pool": s.pool,
        "agent": s.agent,
        "created_at": time_json(&s.created_at),
    })
}

fn snapshot_rows(snaps: &[pb::Snapshot]) -> Vec<Vec<String>> {
    let header = ["ID", "NAME", "STATUS", "VOLUME", "SIZE", "POOL", "CREATED"];
    let mut rows = vec![header.map(String::from).to_vec()];
    for s in snaps {
        rows.push(vec![
            s.id.clone(),
            s.name.clone(),
            s.status.clone(),
            s.volume_id.clone(),
            human_size(s.size_bytes),
            pool_ref(&s.agent, &s.pool),
            time_text(&s.created_at),
        ]);
    }
    rows
}

/// A capacity for JSON: bytes, or `"unknown"` / `"infinite"`.
fn capacity_json(c: &Option<pb::Capacity>) -> Value {
    match c.as_ref().and_then(|c| c.value.as_ref()) {
        Some(pb::capacity::Value::Bytes(b)) => json!(b),
        Some(pb::capacity::Value::Infinite(true)) => json!("infinite"),
        Some(pb::capacity::Value::Infinite(false) | pb::capacity::Value::Unknown(_)) | None => {
            json!("unknown")
        }
    }
}

fn capacity_text(c: &Option<pb::Capacity>) -> String {
    match capacity_json(c) {
        Value::Number(n) => n.as_u64().map(human_size).unwrap_or_default(),
        other => other.as_str().unwrap_or_default().to_owned(),
    }
}

fn age(p: &pb::Pool) -> Option<Duration> {
    let d = p.stats_age.as_ref()?;
    Some(Duration::new(
        u64::try_from(d.seconds).ok()?,
        u32::try_from(d.nanos).ok()?,
    ))
}

/// The JSON of a pool.
pub fn pool_json(p: &pb::Pool) -> Value {
    json!({
        "name": p.name,
        "agent": p.agent,
        "zone": p.zone,
        "kind": p.kind,
        "total": capacity_json(&p.total),
        "free": capacity_json(&p.free),
        "provisioned_bytes": p.provisioned_bytes,
        "allocated_bytes": p.allocated_bytes,
        "reserved_percentage": p.reserved_percentage,
        "max_over_subscription_ratio": p.max_over_subscription_ratio,
        "thin_provisioning": p.thin_provisioning,
        "thick_provisioning": p.thick_provisioning,
        "volume_count": p.volume_count,
        "snapshot_count": p.snapshot_count,
        "capabilities": sorted(&p.capabilities),
        "healthy": p.healthy,
        "unhealthy_reason": text_or_null(&p.unhealthy_reason),
        "stats_age_seconds": age(p).map(|d| d.as_secs_f64()),
        "extent_bytes": p.extent_bytes,
        "portals": p.portals,
    })
}

/// The rows of `pool list`.
pub fn pool_rows(pools: &[pb::Pool]) -> Vec<Vec<String>> {
    let header = [
        "POOL",
        "ZONE",
        "KIND",
        "TOTAL",
        "FREE",
        "PROVISIONED",
        "RESERVED",
        "RATIO",
        "VOLUMES",
        "SNAPSHOTS",
        "HEALTHY",
        "STATS AGE",
    ];
    let mut rows = vec![header.map(String::from).to_vec()];
    for p in pools {
        rows.push(vec![
            pool_ref(&p.agent, &p.name),
            p.zone.clone(),
            p.kind.clone(),
            capacity_text(&p.total),
            capacity_text(&p.free),
            human_size(p.provisioned_bytes),
            format!("{}%", p.reserved_percentage),
            format!("{:.1}", p.max_over_subscription_ratio),
            p.volume_count.to_string(),
            p.snapshot_count.to_string(),
            if p.healthy {
                "yes".into()
            } else {
                format!("no: {}", p.unhealthy_reason)
            },
            age(p).map_or_else(|| "never".into(), |d| format!("{}s", d.as_secs())),
        ]);
    }
    rows
}

fn type_json(t: &pb::VolumeType) -> Value {
    json!({
        "name": t.name,
        "description": t.description,
        "extra_specs": sorted(&t.extra_specs),
        "is_default": t.is_default,
    })
}

fn type_rows(types: &[pb::VolumeType]) -> Vec<Vec<String>> {
    let mut rows = vec![["NAME", "DEFAULT", "DESCRIPTION", "EXTRA SPECS"]
        .map(String::from)
        .to_vec()];
    for t in types {
        let specs: Vec<String> = sorted(&t.extra_specs)
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        rows.push(vec![
            t.name.clone(),
            if t.is_default { "yes" } else { "" }.into(),
            t.description.clone(),
            specs.join(", "),
        ]);
    }
    rows
}

/// `cinderblock volume ...`.
pub async fn volume(args: VolumeArgs) -> Result<(), OpsError> {
    let t = &args.target;
    let mut c = client(t).await?;
    match args.command {
        VolumeCommand::List { pool, status } => {
            let mut volumes = Vec::new();
            let mut page_token = String::new();
            loop {
                let page = c
                    .list_volumes(pb::ListVolumesRequest {
                        pool: pool.clone().unwrap_or_default(),
                        status: status.clone().unwrap_or_default(),
                        max_entries: 0,
                        page_token,
                    })
                    .await
                    .map_err(rpc_err(t, "ListVolumes"))?
                    .into_inner();
                volumes.extend(page.volumes);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            let value = json!(volumes.iter().map(volume_json).collect::<Vec<_>>());
            emit(t.output, value, volume_rows(&volumes));
        }
        VolumeCommand::Show { volume } => {
            let v = find_volume(&mut c, t, &volume).await?;
            emit(t.output, volume_json(&v), volume_detail_rows(&v));
        }
    }
    Ok(())
}

/// `cinderblock snapshot ...`.
pub async fn snapshot(args: SnapshotArgs) -> Result<(), OpsError> {
    let t = &args.target;
    let mut c = client(t).await?;
    match args.command {
        SnapshotCommand::List { volume } => {
            let volume_id = match volume {
                Some(key) => find_volume(&mut c, t, &key).await?.id,
                None => String::new(),
            };
            let mut snapshots = Vec::new();
            let mut page_token = String::new();
            loop {
                let page = c
                    .list_snapshots(pb::ListSnapshotsRequest {
                        volume_id: volume_id.clone(),
                        max_entries: 0,
                        page_token,
                    })
                    .await
                    .map_err(rpc_err(t, "ListSnapshots"))?
                    .into_inner();
                snapshots.extend(page.snapshots);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            let value = json!(snapshots.iter().map(snapshot_json).collect::<Vec<_>>());
            emit(t.output, value, snapshot_rows(&snapshots));
        }
    }
    Ok(())
}

/// `cinderblock pool ...`.
pub async fn pool(args: PoolArgs) -> Result<(), OpsError> {
    let t = &args.target;
    let mut c = client(t).await?;
    match args.command {
        PoolCommand::List => {
            let pools = c
                .list_pools(pb::ListPoolsRequest {})
                .await
                .map_err(rpc_err(t, "ListPools"))?
                .into_inner()
                .pools;
            let value = json!(pools.iter().map(pool_json).collect::<Vec<_>>());
            emit(t.output, value, pool_rows(&pools));
        }
    }
    Ok(())
}

/// `cinderblock type ...`.
pub async fn volume_type(args: TypeArgs) -> Result<(), OpsError> {
    let t = &args.target;
    let mut c = client(t).await?;
    match args.command {
        TypeCommand::List => {
            let types = c
                .list_types(pb::ListTypesRequest {})
                .await
                .map_err(rpc_err(t, "ListTypes"))?
                .into_inner()
                .types;
            let value = json!(types.iter().map(type_json).collect::<Vec<_>>());
            emit(t.output, value, type_rows(&types));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::render_table;

    fn volume() -> pb::Volume {
        pb::Volume {
            id: "0b6d".into(),
            name: "pvc-1".into(),
            status: "in-use".into(),
            size_bytes: 3 << 29,
            volume_type: "ssd".into(),
            pool: "p".into(),
            agent: "a".into(),
            zone: "z1".into(),
            source: Some(pb::volume::Source::SourceSnapshotId("5e6f".into())),
            attachments: vec![pb::Attachment {
                host: "node-1".into(),
                initiator: "iqn.1993-08.org.debian:01:n1".into(),
            }],
            created_at: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            metadata: [("csi.name".to_string(), "pvc-1".to_string())]
                .into_iter()
                .collect(),
            snapshot_count: 1,
            abnormal_reason: String::new(),
        }
    }

    #[test]
    fn volume_table_and_json() {
        let v = volume();
        assert_eq!(
            render_table(&volume_rows(std::slice::from_ref(&v))),
            "ID    NAME   STATUS  SIZE    TYPE  POOL  ZONE  ATTACHED TO\n\
             0b6d  pvc-1  in-use  1.5GiB  ssd   a#p   z1    node-1\n"
        );
        assert_eq!(
            volume_json(&v),
            json!({
                "id": "0b6d", "name": "pvc-1", "status": "in-use", "size_bytes": 3u64 << 29,
                "type": "ssd", "pool": "p", "agent": "a", "zone": "z1",
                "source": {"snapshot": "5e6f"},
                "attachments": [{"host": "node-1", "initiator": "iqn.1993-08.org.debian:01:n1"}],
                "snapshot_count": 1, "created_at": "2023-11-14T22:13:20Z",
                "metadata": {"csi.name": "pvc-1"}, "abnormal_reason": null,
            })
        );
        let detail = render_table(&volume_detail_rows(&v));
        assert_eq!(
            detail,
            "PROPERTY           VALUE\n\
             id                 0b6d\n\
             name               pvc-1\n\
             status             in-use\n\
             size               1.5GiB (1610612736 bytes)\n\
             type               ssd\n\
             pool               a#p\n\
             zone               z1\n\
             source             snapshot 5e6f\n\
             attached to        node-1 (iqn.1993-08.org.debian:01:n1)\n\
             snapshots          1\n\
             created            2023-11-14T22:13:20Z\n\
             metadata csi.name  pvc-1\n"
        );
    }

    #[test]
    fn pool_capacity_and_age() {
        let p = pb::Pool {
            name: "p".into(),
            agent: "a".into(),
            zone: "z1".into(),
            kind: "file".into(),
            total: Some(pb::Capacity {
                value: Some(pb::capacity::Value::Bytes(12 << 30)),
            }),
            free: Some(pb::Capacity {
                value: Some(pb::capacity::Value::Unknown(true)),
            }),
            provisioned_bytes: 1 << 30,
            reserved_percentage: 5,
            max_over_subscription_ratio: 1.0,
            volume_count: 1,
            healthy: false,
            unhealthy_reason: "agent does not answer".into(),
            stats_age: Some(prost_types::Duration {
                seconds: 2,
                nanos: 500_000_000,
            }),
            ..Default::default()
        };
        let rows = pool_rows(std::slice::from_ref(&p));
        assert_eq!(
            rows[1],
            [
                "a#p",
                "z1",
                "file",
                "12GiB",
                "unknown",
                "1GiB",
                "5%",
                "1.0",
                "1",
                "0",
                "no: agent does not answer",
                "2s"
            ]
        );
        let j = pool_json(&p);
        assert_eq!(
            (
                &j["total"],
                &j["free"],
                &j["stats_age_seconds"],
                &j["unhealthy_reason"]
            ),
            (
                &json!(12u64 << 30),
                &json!("unknown"),
                &json!(2.5),
                &json!("agent does not answer")
            )
        );
        let never = pb::Pool {
            stats_age: None,
            healthy: true,
            ..p
        };
        let rows = pool_rows(&[never]);
        assert_eq!(
            (rows[1][10].as_str(), rows[1][11].as_str()),
            ("yes", "never")
        );
    }

    #[test]
    fn type_rows_list_specs_in_order() {
        let t = pb::VolumeType {
            name: "gold".into(),
            description: "fast".into(),
            extra_specs: [
                ("media".to_string(), "ssd".to_string()),
                ("multiattach".to_string(), "<is> True".to_string()),
            ]
            .into_iter()
            .collect(),
            is_default: true,
        };
        assert_eq!(
            render_table(&type_rows(&[t])),
            "NAME  DEFAULT  DESCRIPTION  EXTRA SPECS\n\
             gold  yes      fast         media=ssd, multiattach=<is> True\n"
        );
    }

    #[test]
    fn errors_name_the_problem() {
        let t = Target {
            controller: Endpoint::Unix("/run/x.sock".into()),
            output: OutputFormat::Table,
        };
        let cases = [
            (
                tonic::Status::unimplemented("no such service"),
                "unix:///run/x.sock does not serve the operator API (is it the controller's \
                 endpoint?)",
            ),
            (
                tonic::Status::invalid_argument("unknown status \"x\""),
                "ListVolumes failed: InvalidArgument: unknown status \"x\"",
            ),
        ];
        for (status, want) in cases {
            assert_eq!(rpc_err(&t, "ListVolumes")(status).to_string(), want);
        }
        assert_eq!(
            OpsError::NotFound {
                what: "volume",
                key: "ghost".into()
            }
            .to_string(),
            "volume \"ghost\" not found (no volume has this id or CSI name)"
        );
    }
}
