//! `cinderblock agent-ctl`: operator commands addressed to one storage agent directly
//! (maintenance of a storage node, and the host demo before the controller is involved).

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde_json::json;

use super::{emit, human_size, utc_text, OpsError};
use crate::cli::OutputFormat;
use crate::proto::agent as pb;
use crate::proto::agent::agent_client::AgentClient;
use crate::tls::ClientTls;
use crate::transport::{self, Endpoint};
use crate::types::Bytes;

/// `cinderblock agent-ctl`.
#[derive(Debug, Args)]
pub struct AgentCtlArgs {
    /// The agent's endpoint.
    #[arg(long, env = "CINDERBLOCK_AGENT", value_name = "ENDPOINT")]
    pub agent: Endpoint,
    /// CA certificate (PEM) the agent's certificate must chain to: speaks TLS to a tcp://
    /// agent (a unix:// agent is always plain).
    #[arg(long, env = "CINDERBLOCK_AGENT_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) presented to the agent (mutual TLS).
    #[arg(
        long,
        env = "CINDERBLOCK_AGENT_TLS_CERT",
        value_name = "FILE",
        requires_all = ["tls_ca", "tls_key"]
    )]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of the client certificate.
    #[arg(
        long,
        env = "CINDERBLOCK_AGENT_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,
    /// Name to check the agent's certificate against instead of the endpoint's host.
    #[arg(
        long,
        env = "CINDERBLOCK_AGENT_TLS_SERVER_NAME",
        value_name = "NAME",
        requires = "tls_ca"
    )]
    pub tls_server_name: Option<String>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = OutputFormat::Table, global = true)]
    pub output: OutputFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: AgentCtl,
}

/// Agent operations.
#[derive(Debug, Subcommand)]
pub enum AgentCtl {
    /// The agent's name, version and readiness.
    Info,
    /// Pools with capacity (Cinder's get-pools).
    Pools,
    /// Volumes (of one pool with --pool).
    Volumes {
        /// Only this pool.
        #[arg(long)]
        pool: Option<String>,
    },
    /// Create a volume.
    Create {
        /// Volume id ([a-z0-9-], chosen by you).
        id: String,
        /// Pool name.
        #[arg(long)]
        pool: String,
        /// Size (bytes, or with a unit: 512Mi, 1G, 10GiB).
        #[arg(long)]
        size: Bytes,
        /// Volume type.
        #[arg(long, default_value = "default")]
        r#type: String,
        /// Create from this snapshot.
        #[arg(long, conflicts_with = "from_volume")]
        from_snapshot: Option<String>,
        /// Create as a clone of this volume.
        #[arg(long)]
        from_volume: Option<String>,
    },
    /// Delete a volume.
    Delete {
        /// Volume id.
        id: String,
    },
    /// Grow a volume.
    Extend {
        /// Volume id.
        id: String,
        /// New size.
        #[arg(long)]
        size: Bytes,
    },
    /// Snapshot a volume.
    Snapshot {
        /// Volume id.
        volume: String,
        /// Snapshot id.
        #[arg(long)]
        id: String,
    },
    /// Snapshots (of one volume with --volume).
    Snapshots {
        /// Only snapshots of this volume.
        #[arg(long)]
        volume: Option<String>,
    },
    /// Delete a snapshot.
    DeleteSnapshot {
        /// Snapshot id.
        id: String,
    },
    /// Export a volume to an initiator (prints target, portals, LUN and CHAP user).
    Export {
        /// Volume id.
        id: String,
        /// Initiator IQN allowed to log in.
        #[arg(long)]
        initiator: String,
        /// Also write the CHAP secret to this file (mode 0600); it is never printed.
        #[arg(long, value_name = "FILE")]
        secret_file: Option<PathBuf>,
    },
    /// Time CreateVolume: COUNT blank volumes, PARALLEL at once; prints latency figures and
    /// deletes the volumes again (unless --keep).
    BenchCreate {
        /// Pool name.
        #[arg(long)]
        pool: String,
        /// Size of each volume.
        #[arg(long, default_value = "64Mi")]
        size: Bytes,
        /// Number of volumes.
        #[arg(long, default_value_t = 20)]
        count: usize,
        /// Calls in flight at once.
        #[arg(long, default_value_t = 1)]
        parallel: usize,
        /// Id prefix of the volumes (default: bench-<random>).
        #[arg(long)]
        prefix: Option<String>,
        /// Keep the volumes.
        #[arg(long)]
        keep: bool,
    },
    /// Remove an initiator (or every initiator) from a volume's export.
    Unexport {
        /// Volume id.
        id: String,
        /// Only this initiator.
        #[arg(long)]
        initiator: Option<String>,
    },
    /// Back up a volume into a backup repository; progress goes to stderr.
    BackupCreate {
        /// Volume id.
        volume: String,
        /// Backup id ([a-z0-9-]; default: a new UUID).
        #[arg(long)]
        id: Option<String>,
        /// Store only what changed since the volume's latest backup in the repository.
        #[arg(long)]
        incremental: bool,
        /// Back up an exported (in-use) volume (crash-consistent, via a temporary snapshot).
        #[arg(long)]
        force: bool,
        /// Repository name (default: the agent's default repository).
        #[arg(long)]
        repository: Option<String>,
    },
    /// Backups (of one volume with --volume, of one repository with --repository).
    Backups {
        /// Only backups of this volume.
        #[arg(long)]
        volume: Option<String>,
        /// Only this repository.
        #[arg(long)]
        repository: Option<String>,
    },
    /// One backup in detail.
    BackupShow {
        /// Backup id.
        id: String,
    },
    /// Delete a backup (refused while incremental backups depend on it).
    BackupDelete {
        /// Backup id.
        id: String,
    },
    /// Restore a backup onto an existing blank volume of this agent; progress on stderr.
    BackupRestore {
        /// Backup id.
        backup: String,
        /// Target volume id.
        #[arg(long)]
        volume: String,
    },
    /// Print a backup's record (Cinder's backup-export), to import on another agent.
    BackupExport {
        /// Backup id.
        id: String,
    },
    /// Register an exported backup record in a repository that holds its objects.
    BackupImport {
        /// The record text, or `-` to read it from stdin.
        record: String,
        /// Repository to register it in (default: the one named in the record).
        #[arg(long)]
        repository: Option<String>,
    },
    /// The agent's backup repositories.
    BackupRepositories,
}

fn rpc(name: &'static str) -> impl Fn(tonic::Status) -> OpsError {
    move |s| super::rpc_failure(name, s)
}

/// What to suggest when a call to a `tcp://` agent failed below gRPC. The agent's TLS
/// refusals reach the client as a closed connection, so the flags given are the only clue.
fn connection_hint(args: &AgentCtlArgs) -> &'static str {
    match (&args.agent, &args.tls_ca, &args.tls_cert) {
        (Endpoint::Unix(_), _, _) => "",
        (Endpoint::Tcp(_), None, _) => {
            " (if the agent serves TLS, give --tls-ca, --tls-cert and --tls-key)"
        }
        (Endpoint::Tcp(_), Some(_), None) => {
            " (the agent requires a client certificate: give --tls-cert and --tls-key)"
        }
        (Endpoint::Tcp(_), Some(_), Some(_)) => {
            " (the agent may not trust this client certificate: is it signed by the agent's client_ca_file?)"
        }
    }
}

fn cap_text(c: &Option<pb::Capacity>) -> String {
    match c.as_ref().and_then(|c| c.value.as_ref()) {
        Some(pb::capacity::Value::Bytes(b)) => Bytes(*b).to_string(),
        Some(pb::capacity::Value::Infinite(_)) => "infinite".into(),
        _ => "unknown".into(),
    }
}

/// A capacity in bytes, `None` when unknown or infinite (JSON `null`).
fn cap_bytes(c: &Option<pb::Capacity>) -> Option<u64> {
    match c.as_ref().and_then(|c| c.value.as_ref()) {
        Some(pb::capacity::Value::Bytes(b)) => Some(*b),
        _ => None,
    }
}

fn status_text(s: i32) -> String {
    pb::VolumeStatus::try_from(s)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("VOLUME_STATUS_")
                .to_lowercase()
                .replace('_', "-")
        })
        .unwrap_or_else(|_| "unknown".into())
}

fn volume_json(v: &pb::Volume) -> serde_json::Value {
    json!({
        "id": v.id, "pool": v.pool, "size_bytes": v.size_bytes, "status": status_text(v.status),
        "type": v.volume_type, "exported_to": v.exported_to, "snapshots": v.snapshot_count,
        "allocated_bytes": v.allocated_bytes,
        "source": match &v.source {
            Some(pb::volume::Source::SourceSnapshotId(s)) => format!("snapshot:{s}"),
            Some(pb::volume::Source::SourceVolumeId(s)) => format!("volume:{s}"),
            None => String::new(),
        },
    })
}

fn snapshot_json(s: &pb::Snapshot) -> serde_json::Value {
    json!({"id": s.id, "volume": s.source_volume_id, "pool": s.pool, "size_bytes": s.size_bytes, "ready": s.ready_to_use})
}

fn volume_rows(vols: &[pb::Volume]) -> Vec<Vec<String>> {
    let mut rows = vec![[
        "ID",
        "POOL",
        "SIZE",
        "STATUS",
        "TYPE",
        "SNAPSHOTS",
        "EXPORTED TO",
    ]
    .map(String::from)
    .to_vec()];
    for v in vols {
        rows.push(vec![
            v.id.clone(),
            v.pool.clone(),
            Bytes(v.size_bytes).to_string(),
            status_text(v.status),
            v.volume_type.clone(),
            v.snapshot_count.to_string(),
            v.exported_to.join(","),
        ]);
    }
    rows
}

/// The TLS settings of the flags, read now (`None` without `--tls-ca`).
fn client_tls(args: &AgentCtlArgs) -> Result<Option<ClientTls>, OpsError> {
    let Some(ca) = &args.tls_ca else {
        return Ok(None);
    };
    let identity = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
        _ => None,
    };
    Ok(Some(ClientTls::load(
        ca,
        identity,
        args.tls_server_name.as_deref(),
    )?))
}

/// Runs one agent operation and prints its answer.
pub async fn run(args: AgentCtlArgs) -> Result<(), OpsError> {
    let tls = client_tls(&args)?;
    let channel = transport::connect_tls(&args.agent, false, tls.as_ref()).await?;
    let hint = connection_hint(&args);
    call(AgentClient::new(channel), args.output, args.command)
        .await
        .map_err(|e| match e {
            OpsError::Connection { rpc, message, .. } => {
                OpsError::Connection { rpc, message, hint }
            }
            other => other,
        })
}

async fn call(
    mut c: AgentClient<tonic::transport::Channel>,
    out: OutputFormat,
    command: AgentCtl,
) -> Result<(), OpsError> {
    match command {
        AgentCtl::Info => {
            let i = c
                .get_info(pb::GetInfoRequest {})
                .await
                .map_err(rpc("GetInfo"))?
                .into_inner();
            let v = json!({"name": i.name, "version": i.version, "ready": i.ready, "reason": i.not_ready_reason, "pools": i.pools});
            let rows = vec![
                vec!["name".into(), i.name],
                vec!["version".into(), i.version],
                vec!["ready".into(), i.ready.to_string()],
                vec!["reason".into(), i.not_ready_reason],
                vec!["pools".into(), i.pools.join(",")],
            ];
            emit(out, v, rows);
        }
        AgentCtl::Pools => {
            let r = c
                .list_pools(pb::ListPoolsRequest {})
                .await
                .map_err(rpc("ListPools"))?
                .into_inner();
            let mut rows = vec![[
                "POOL",
                "KIND",
                "ZONE",
                "TOTAL",
                "FREE",
                "PROVISIONED",
                "VOLUMES",
                "SNAPSHOTS",
                "HEALTHY",
            ]
            .map(String::from)
            .to_vec()];
            let mut js = Vec::new();
            for p in &r.pools {
                let kind = pb::PoolKind::try_from(p.kind)
                    .map(|k| {
                        k.as_str_name()
                            .trim_start_matches("POOL_KIND_")
                            .to_lowercase()
                            .replace('_', "-")
                    })
                    .unwrap_or_default();
                rows.push(vec![
                    p.name.clone(),
                    kind.clone(),
                    p.zone.clone(),
                    cap_text(&p.total),
                    cap_text(&p.free),
                    Bytes(p.provisioned_bytes).to_string(),
                    p.volume_count.to_string(),
                    p.snapshot_count.to_string(),
                    if p.healthy {
                        "yes".into()
                    } else {
                        format!("no: {}", p.unhealthy_reason)
                    },
                ]);
                js.push(json!({"name": p.name, "kind": kind, "zone": p.zone, "total": cap_text(&p.total),
                    "free": cap_text(&p.free), "total_bytes": cap_bytes(&p.total), "free_bytes": cap_bytes(&p.free),
                    "provisioned_bytes": p.provisioned_bytes, "allocated_bytes": p.allocated_bytes,
                    "volumes": p.volume_count, "snapshots": p.snapshot_count, "healthy": p.healthy,
                    "capabilities": p.capabilities.iter().collect::<BTreeMap<_, _>>(), "portals": p.portals}));
            }
            emit(out, json!(js), rows);
        }
        AgentCtl::Volumes { pool } => {
            let r = c
                .list_volumes(pb::ListVolumesRequest {
                    pool: pool.unwrap_or_default(),
                })
                .await
                .map_err(rpc("ListVolumes"))?
                .into_inner();
            emit(
                out,
                json!(r.volumes.iter().map(volume_json).collect::<Vec<_>>()),
                volume_rows(&r.volumes),
            );
        }
        AgentCtl::Create {
            id,
            pool,
            size,
            r#type,
            from_snapshot,
            from_volume,
        } => {
            use pb::create_volume_request::Source;
            let source = from_snapshot
                .map(Source::SourceSnapshotId)
                .or(from_volume.map(Source::SourceVolumeId));
            let v = c
                .create_volume(pb::CreateVolumeRequest {
                    volume_id: id,
                    pool,
                    size_bytes: size.0,
                    volume_type: r#type,
                    metadata: Default::default(),
                    source,
                })
                .await
                .map_err(rpc("CreateVolume"))?
                .into_inner();
            emit(out, volume_json(&v), volume_rows(std::slice::from_ref(&v)));
        }
        AgentCtl::Delete { id } => {
            c.delete_volume(pb::DeleteVolumeRequest {
                volume_id: id.clone(),
            })
            .await
            .map_err(rpc("DeleteVolume"))?;
            emit(
                out,
                json!({"deleted": id}),
                vec![vec![format!("deleted volume {id}")]],
            );
        }
        AgentCtl::Extend { id, size } => {
            let v = c
                .extend_volume(pb::ExtendVolumeRequest {
                    volume_id: id,
                    new_size_bytes: size.0,
                })
                .await
                .map_err(rpc("ExtendVolume"))?
                .into_inner();
            emit(out, volume_json(&v), volume_rows(std::slice::from_ref(&v)));
        }
        AgentCtl::Snapshot { volume, id } => {
            let s = c
                .create_snapshot(pb::CreateSnapshotRequest {
                    snapshot_id: id,
                    source_volume_id: volume,
                    metadata: Default::default(),
                })
                .await
                .map_err(rpc("CreateSnapshot"))?
                .into_inner();
            let rows = vec![
                vec!["ID".into(), "VOLUME".into(), "SIZE".into()],
                vec![
                    s.id.clone(),
                    s.source_volume_id.clone(),
                    Bytes(s.size_bytes).to_string(),
                ],
            ];
            emit(out, snapshot_json(&s), rows);
        }
        AgentCtl::Snapshots { volume } => {
            let r = c
                .list_snapshots(pb::ListSnapshotsRequest {
                    source_volume_id: volume.unwrap_or_default(),
                })
                .await
                .map_err(rpc("ListSnapshots"))?
                .into_inner();
            let mut rows = vec![vec![
                "ID".into(),
                "VOLUME".into(),
                "POOL".into(),
                "SIZE".into(),
            ]];
            for s in &r.snapshots {
                rows.push(vec![
                    s.id.clone(),
                    s.source_volume_id.clone(),
                    s.pool.clone(),
                    Bytes(s.size_bytes).to_string(),
                ]);
            }
            emit(
                out,
                json!(r.snapshots.iter().map(snapshot_json).collect::<Vec<_>>()),
                rows,
            );
        }
        AgentCtl::DeleteSnapshot { id } => {
            c.delete_snapshot(pb::DeleteSnapshotRequest {
                snapshot_id: id.clone(),
            })
            .await
            .map_err(rpc("DeleteSnapshot"))?;
            emit(
                out,
                json!({"deleted": id}),
                vec![vec![format!("deleted snapshot {id}")]],
            );
        }
        AgentCtl::Export {
            id,
            initiator,
            secret_file,
        } => {
            let e = c
                .export_volume(pb::ExportVolumeRequest {
                    volume_id: id,
                    initiator_iqn: initiator,
                    host: String::new(),
                })
                .await
                .map_err(rpc("ExportVolume"))?
                .into_inner();
            if let Some(f) = &secret_file {
                write_secret(f, &e.chap_secret)?;
            }
            let v = json!({"target_iqn": e.target_iqn, "portals": e.portals, "lun": e.lun, "chap_username": e.chap_username});
            let rows = vec![
                vec!["target".into(), e.target_iqn],
                vec!["portals".into(), e.portals.join(",")],
                vec!["lun".into(), e.lun.to_string()],
                vec!["chap user".into(), e.chap_username],
                vec![
                    "chap secret".into(),
                    secret_file.map_or("(not shown; use --secret-file)".into(), |f| {
                        format!("in {}", f.display())
                    }),
                ],
            ];
            emit(out, v, rows);
        }
        AgentCtl::BenchCreate {
            pool,
            size,
            count,
            parallel,
            prefix,
            keep,
        } => {
            let prefix = prefix.unwrap_or_else(|| {
                format!("bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
            });
            let r =
                super::bench::create_burst(c.clone(), &pool, size, count, parallel, &prefix).await;
            if !keep {
                super::bench::delete_all(c, &r.ids).await?;
            }
            super::bench::print_report(&r, out);
            super::bench::failures(&r, "CreateVolume")?;
        }
        AgentCtl::BackupCreate {
            volume,
            id,
            incremental,
            force,
            repository,
        } => {
            let id = id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            let stream = c
                .create_backup(pb::CreateBackupRequest {
                    backup_id: id,
                    volume_id: volume,
                    repository: repository.unwrap_or_default(),
                    incremental,
                    force,
                })
                .await
                .map_err(rpc("CreateBackup"))?
                .into_inner();
            let b = follow(stream, "backup", "CreateBackup").await?;
            emit(out, backup_json(&b), backup_detail(&b));
        }
        AgentCtl::Backups { volume, repository } => {
            let r = c
                .list_backups(pb::ListBackupsRequest {
                    repository: repository.unwrap_or_default(),
                    volume_id: volume.unwrap_or_default(),
                })
                .await
                .map_err(rpc("ListBackups"))?
                .into_inner();
            emit(
                out,
                json!(r.backups.iter().map(backup_json).collect::<Vec<_>>()),
                backup_rows(&r.backups),
            );
        }
        AgentCtl::BackupShow { id } => {
            let b = c
                .get_backup(pb::GetBackupRequest { backup_id: id })
                .await
                .map_err(rpc("GetBackup"))?
                .into_inner();
            emit(out, backup_json(&b), backup_detail(&b));
        }
        AgentCtl::BackupDelete { id } => {
            c.delete_backup(pb::DeleteBackupRequest {
                backup_id: id.clone(),
            })
            .await
            .map_err(rpc("DeleteBackup"))?;
            emit(
                out,
                json!({"deleted": id}),
                vec![vec![format!("deleted backup {id}")]],
            );
        }
        AgentCtl::BackupRestore { backup, volume } => {
            let stream = c
                .restore_backup(pb::RestoreBackupRequest {
                    backup_id: backup,
                    volume_id: volume.clone(),
                })
                .await
                .map_err(rpc("RestoreBackup"))?
                .into_inner();
            let b = follow(stream, "restore", "RestoreBackup").await?;
            emit(
                out,
                json!({"restored": b.id, "volume": volume, "bytes": b.volume_size_bytes}),
                vec![vec![format!(
                    "restored backup {} onto volume {volume} ({})",
                    b.id,
                    human_size(b.volume_size_bytes)
                )]],
            );
        }
        AgentCtl::BackupExport { id } => {
            let r = c
                .export_backup_record(pb::ExportBackupRecordRequest { backup_id: id })
                .await
                .map_err(rpc("ExportBackupRecord"))?
                .into_inner();
            emit(
                out,
                json!({"repository": r.repository, "record": r.record}),
                vec![vec![r.record]],
            );
        }
        AgentCtl::BackupImport { record, repository } => {
            let record = super::record_arg(record)?;
            let b = c
                .import_backup_record(pb::ImportBackupRecordRequest {
                    record,
                    repository: repository.unwrap_or_default(),
                })
                .await
                .map_err(rpc("ImportBackupRecord"))?
                .into_inner();
            emit(out, backup_json(&b), backup_detail(&b));
        }
        AgentCtl::BackupRepositories => {
            let r = c
                .list_backup_repositories(pb::ListBackupRepositoriesRequest {})
                .await
                .map_err(rpc("ListBackupRepositories"))?
                .into_inner();
            let mut rows = vec![vec!["NAME".into(), "LOCATION".into(), "DEFAULT".into()]];
            for b in &r.repositories {
                rows.push(vec![
                    b.name.clone(),
                    b.location.clone(),
                    if b.is_default { "yes" } else { "" }.into(),
                ]);
            }
            let js: Vec<_> = r
                .repositories
                .iter()
                .map(|b| json!({"name": b.name, "location": b.location, "default": b.is_default}))
                .collect();
            emit(out, json!(js), rows);
        }
        AgentCtl::Unexport { id, initiator } => {
            c.unexport_volume(pb::UnexportVolumeRequest {
                volume_id: id.clone(),
                initiator_iqn: initiator.unwrap_or_default(),
            })
            .await
            .map_err(rpc("UnexportVolume"))?;
            emit(
                out,
                json!({"unexported": id}),
                vec![vec![format!("unexported volume {id}")]],
            );
        }
    }
    Ok(())
}

fn write_secret(path: &std::path::Path, secret: &str) -> Result<(), OpsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| OpsError::Io {
            path: path.to_owned(),
            source: e,
        })?;
    f.write_all(secret.as_bytes()).map_err(|e| OpsError::Io {
        path: path.to_owned(),
        source: e,
    })
}

fn backup_status_text(s: i32) -> String {
    pb::BackupStatus::try_from(s)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("BACKUP_STATUS_")
                .to_lowercase()
        })
        .unwrap_or_else(|_| "unknown".into())
}

fn time_text(t: &Option<prost_types::Timestamp>) -> String {
    t.as_ref()
        .map(|t| {
            utc_text(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(t.seconds.max(0) as u64),
            )
        })
        .unwrap_or_default()
}

fn backup_json(b: &pb::Backup) -> serde_json::Value {
    let compression = pb::BackupCompression::try_from(b.compression)
        .map(|c| {
            c.as_str_name()
                .trim_start_matches("BACKUP_COMPRESSION_")
                .to_lowercase()
        })
        .unwrap_or_default();
    json!({
        "id": b.id, "repository": b.repository, "status": backup_status_text(b.status),
        "fail_reason": b.fail_reason, "volume": b.volume_id, "volume_size_bytes": b.volume_size_bytes,
        "type": b.volume_type, "parent": b.parent_id, "incremental": !b.parent_id.is_empty(),
        "dependents": b.dependent_ids, "created_at": time_text(&b.created_at),
        "completed_at": time_text(&b.completed_at), "chunk_bytes": b.chunk_bytes,
        "compression": compression, "data_bytes": b.data_bytes, "hole_bytes": b.hole_bytes,
        "stored_bytes": b.stored_bytes, "stored_chunks": b.stored_chunks,
        "reused_chunks": b.reused_chunks, "bytes_done": b.bytes_done, "bytes_total": b.bytes_total,
    })
}

fn backup_rows(backups: &[pb::Backup]) -> Vec<Vec<String>> {
    let mut rows = vec![[
        "ID",
        "VOLUME",
        "REPOSITORY",
        "STATUS",
        "SIZE",
        "STORED",
        "PARENT",
        "CREATED",
    ]
    .map(String::from)
    .to_vec()];
    for b in backups {
        rows.push(vec![
            b.id.clone(),
            b.volume_id.clone(),
            b.repository.clone(),
            backup_status_text(b.status),
            human_size(b.volume_size_bytes),
            human_size(b.stored_bytes),
            b.parent_id.clone(),
            time_text(&b.created_at),
        ]);
    }
    rows
}

fn backup_detail(b: &pb::Backup) -> Vec<Vec<String>> {
    let mut rows = vec![
        vec!["id".into(), b.id.clone()],
        vec!["status".into(), backup_status_text(b.status)],
        vec!["repository".into(), b.repository.clone()],
        vec!["volume".into(), b.volume_id.clone()],
        vec!["size".into(), human_size(b.volume_size_bytes)],
        vec!["type".into(), b.volume_type.clone()],
        vec![
            "kind".into(),
            if b.parent_id.is_empty() {
                "full".into()
            } else {
                format!("incremental on {}", b.parent_id)
            },
        ],
        vec!["dependents".into(), b.dependent_ids.join(",")],
        vec!["created".into(), time_text(&b.created_at)],
        vec!["completed".into(), time_text(&b.completed_at)],
        vec![
            "data / holes".into(),
            format!(
                "{} / {}",
                human_size(b.data_bytes),
                human_size(b.hole_bytes)
            ),
        ],
        vec![
            "stored".into(),
            format!(
                "{} in {} chunk(s); {} chunk(s) reused",
                human_size(b.stored_bytes),
                b.stored_chunks,
                b.reused_chunks
            ),
        ],
    ];
    if !b.fail_reason.is_empty() {
        rows.push(vec!["error".into(), b.fail_reason.clone()]);
    }
    rows
}

/// Follows a backup or restore progress stream to its end, drawing progress on stderr: a
/// bar redrawn in place on a terminal, else a plain line every 10%.
async fn follow(
    mut stream: tonic::Streaming<pb::BackupProgress>,
    what: &str,
    rpc_name: &'static str,
) -> Result<pb::Backup, OpsError> {
    use std::io::{IsTerminal, Write};
    let tty = std::io::stderr().is_terminal();
    let mut last_step = None;
    loop {
        let m = match stream.message().await {
            Ok(Some(m)) => m,
            Ok(None) => {
                return Err(OpsError::Rpc {
                    rpc: rpc_name,
                    code: tonic::Code::Unknown,
                    message: "the stream ended without a result".into(),
                })
            }
            Err(s) => {
                if tty {
                    eprintln!();
                }
                return Err(rpc(rpc_name)(s));
            }
        };
        let pct = (m.bytes_done * 100).checked_div(m.bytes_total).unwrap_or(0);
        let line = progress_line(
            what,
            &m.backup_id,
            m.bytes_done,
            m.bytes_total,
            m.stored_bytes,
        );
        let mut err = std::io::stderr().lock();
        if tty {
            let _ = write!(err, "\r{line}");
            if m.done {
                let _ = writeln!(err);
            }
        } else if m.done || last_step != Some(pct / 10) {
            let _ = writeln!(err, "{line}");
            last_step = Some(pct / 10);
        }
        let _ = err.flush();
        if m.done {
            if let Some(b) = m.backup {
                return Ok(b);
            }
        }
    }
}

/// One progress line: `backup b1  45% [#########-----------] 460MiB of 1GiB, 120MiB stored`.
fn progress_line(what: &str, id: &str, done: u64, total: u64, stored: u64) -> String {
    const WIDTH: u64 = 20;
    let pct = (done * 100).checked_div(total).unwrap_or(0).min(100);
    let filled = (pct * WIDTH / 100) as usize;
    let bar = format!(
        "{}{}",
        "#".repeat(filled),
        "-".repeat(WIDTH as usize - filled)
    );
    let mut line = format!(
        "{what} {id} {pct:>3}% [{bar}] {} of {}",
        human_size(done),
        human_size(total)
    );
    if stored > 0 {
        line.push_str(&format!(", {} stored", human_size(stored)));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines() {
        assert_eq!(
            progress_line("backup", "b1", 0, 0, 0),
            "backup b1   0% [--------------------] 0B of 0B"
        );
        assert_eq!(
            progress_line("backup", "b1", 512 << 20, 1 << 30, 100 << 20),
            "backup b1  50% [##########----------] 512MiB of 1GiB, 100MiB stored"
        );
        assert_eq!(
            progress_line("restore", "b1", 1 << 30, 1 << 30, 0),
            "restore b1 100% [####################] 1GiB of 1GiB"
        );
    }
}
