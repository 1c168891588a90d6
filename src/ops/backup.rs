//! `cinderblock backup ...`: Cinder's `backup-create`, `backup-list`, `backup-show`,
//! `backup-delete`, `backup-restore`, `backup-export` and `backup-import`, answered by the
//! controller's operator API. Long operations draw their progress on stderr: a bar with
//! throughput and ETA redrawn in place on a terminal, a plain line every 10% otherwise.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use super::operator::{client, rpc_err, text_or_null, time_json, time_text, Target};
use super::{emit, human_size, OpsError};
use crate::proto::operator as pb;
use crate::types::Bytes;

/// `cinderblock backup`.
#[derive(Debug, Args)]
pub struct BackupArgs {
    #[command(flatten)]
    pub target: Target,
    /// What to do.
    #[command(subcommand)]
    pub command: BackupCommand,
}

/// Backup commands.
#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Back up a volume into a backup repository (on the agent holding it); progress on
    /// stderr.
    Create {
        /// Volume id or CSI name.
        #[arg(value_name = "VOLUME")]
        volume: String,
        /// Store only what changed since the volume's latest backup in the repository.
        #[arg(long)]
        incremental: bool,
        /// Back up an in-use (published) volume, crash-consistently.
        #[arg(long)]
        force: bool,
        /// Repository name (default: the agent's default repository).
        #[arg(long, value_name = "NAME")]
        repository: Option<String>,
        /// Name the backup's id derives from (a retry with it finds the same backup).
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
    },
    /// Every backup of every agent's repositories.
    List {
        /// Only backups of this volume id.
        #[arg(long, value_name = "ID")]
        volume: Option<String>,
    },
    /// One backup in detail.
    Show {
        /// Backup id.
        backup: String,
    },
    /// Delete a backup (refused while incremental backups depend on it).
    Delete {
        /// Backup id.
        backup: String,
    },
    /// Restore a backup onto a new volume placed by the scheduler, or onto an existing one;
    /// progress on stderr.
    Restore {
        /// Backup id.
        backup: String,
        /// Onto this existing volume (id or CSI name): available, at least as large.
        #[arg(long, value_name = "ID", conflicts_with_all = ["volume_type", "zone", "name", "size"])]
        volume: Option<String>,
        /// Type of the new volume (default: the backup's type, else the default type).
        #[arg(long = "type", value_name = "TYPE")]
        volume_type: Option<String>,
        /// Availability zone of the new volume (default: any).
        #[arg(long, value_name = "ZONE")]
        zone: Option<String>,
        /// Name of the new volume (its id derives from it; default: a random id).
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
        /// Size of the new volume (default: the backup's volume size).
        #[arg(long, value_name = "SIZE")]
        size: Option<Bytes>,
    },
    /// Print a backup's record (Cinder's backup-export), to import into another cluster.
    Export {
        /// Backup id.
        backup: String,
    },
    /// Register an exported record (`-` reads it from stdin) in a repository that holds the
    /// backup's objects.
    Import {
        /// The record, or `-`.
        record: String,
        /// Repository (default: the one named in the record).
        #[arg(long, value_name = "NAME")]
        repository: Option<String>,
    },
}

/// Runs a `backup` command.
pub async fn backup(args: BackupArgs) -> Result<(), OpsError> {
    let t = &args.target;
    let out = t.output;
    let mut c = client(t).await?;
    match args.command {
        BackupCommand::Create {
            volume,
            incremental,
            force,
            repository,
            name,
        } => {
            let stream = c
                .create_backup(pb::CreateBackupRequest {
                    volume,
                    name: name.unwrap_or_default(),
                    repository: repository.unwrap_or_default(),
                    incremental,
                    force,
                })
                .await
                .map_err(rpc_err(t, "CreateBackup"))?
                .into_inner();
            let (_, b) = follow(stream, "backup", t, "CreateBackup").await?;
            emit(out, backup_json(&b), backup_detail(&b));
        }
        BackupCommand::List { volume } => {
            let r = c
                .list_backups(pb::ListBackupsRequest {
                    volume_id: volume.unwrap_or_default(),
                })
                .await
                .map_err(rpc_err(t, "ListBackups"))?
                .into_inner();
            emit(
                out,
                json!(r.backups.iter().map(backup_json).collect::<Vec<_>>()),
                backup_rows(&r.backups),
            );
        }
        BackupCommand::Show { backup } => {
            let b = c
                .get_backup(pb::GetBackupRequest { backup_id: backup })
                .await
                .map_err(rpc_err(t, "GetBackup"))?
                .into_inner();
            emit(out, backup_json(&b), backup_detail(&b));
        }
        BackupCommand::Delete { backup } => {
            c.delete_backup(pb::DeleteBackupRequest {
                backup_id: backup.clone(),
            })
            .await
            .map_err(rpc_err(t, "DeleteBackup"))?;
            emit(
                out,
                json!({"deleted": backup}),
                vec![vec![format!("deleted backup {backup}")]],
            );
        }
        BackupCommand::Restore {
            backup,
            volume,
            volume_type,
            zone,
            name,
            size,
        } => {
            use pb::restore_backup_request::Target as T;
            let target = match volume {
                Some(v) => T::Volume(v),
                None => T::NewVolume(pb::NewRestoreVolume {
                    volume_type: volume_type.unwrap_or_default(),
                    zone: zone.unwrap_or_default(),
                    name: name.unwrap_or_default(),
                    size_bytes: size.map_or(0, Bytes::get),
                }),
            };
            let stream = c
                .restore_backup(pb::RestoreBackupRequest {
                    backup_id: backup,
                    target: Some(target),
                })
                .await
                .map_err(rpc_err(t, "RestoreBackup"))?
                .into_inner();
            let (last, b) = follow(stream, "restore", t, "RestoreBackup").await?;
            emit(
                out,
                json!({
                    "restored": b.id, "volume": last.volume_id, "agent": last.agent,
                    "bytes": b.volume_size_bytes,
                }),
                vec![vec![format!(
                    "restored backup {} onto volume {} on agent {} ({})",
                    b.id,
                    last.volume_id,
                    last.agent,
                    human_size(b.volume_size_bytes)
                )]],
            );
        }
        BackupCommand::Export { backup } => {
            let r = c
                .export_backup_record(pb::ExportBackupRecordRequest { backup_id: backup })
                .await
                .map_err(rpc_err(t, "ExportBackupRecord"))?
                .into_inner();
            emit(
                out,
                json!({"repository": r.repository, "record": r.record}),
                vec![vec![r.record]],
            );
        }
        BackupCommand::Import { record, repository } => {
            let record = super::record_arg(record)?;
            let b = c
                .import_backup_record(pb::ImportBackupRecordRequest {
                    record,
                    repository: repository.unwrap_or_default(),
                })
                .await
                .map_err(rpc_err(t, "ImportBackupRecord"))?
                .into_inner();
            emit(out, backup_json(&b), backup_detail(&b));
        }
    }
    Ok(())
}

/// Follows a progress stream to its end, drawing on stderr; returns the last message and
/// the backup it carries.
async fn follow(
    mut stream: tonic::Streaming<pb::BackupProgress>,
    what: &str,
    target: &Target,
    rpc: &'static str,
) -> Result<(pb::BackupProgress, pb::Backup), OpsError> {
    let tty = std::io::stderr().is_terminal();
    let started = Instant::now();
    let mut last_step = None;
    loop {
        let m = match stream.message().await {
            Ok(Some(m)) => m,
            Ok(None) => {
                return Err(OpsError::Rpc {
                    rpc,
                    code: tonic::Code::Unknown,
                    message: "the stream ended without a result".into(),
                })
            }
            Err(s) => {
                if tty {
                    eprintln!();
                }
                return Err(rpc_err(target, rpc)(s));
            }
        };
        let line = progress_text(what, &m, started.elapsed());
        let pct = percent(m.bytes_done, m.bytes_total);
        let mut err = std::io::stderr().lock();
        if tty {
            // Clear to the end of the line: the text may get shorter.
            let _ = write!(err, "\r{line}\x1b[K");
            if m.done {
                let _ = writeln!(err);
            }
        } else if m.done || last_step != Some(pct / 10) {
            let _ = writeln!(err, "{line}");
            last_step = Some(pct / 10);
        }
        let _ = err.flush();
        if m.done {
            if let Some(b) = m.backup.clone() {
                return Ok((m, b));
            }
        }
    }
}

fn percent(done: u64, total: u64) -> u64 {
    (u128::from(done) * 100)
        .checked_div(u128::from(total))
        .map_or(0, |p| p.min(100) as u64)
}

/// `m:ss`, or `h:mm:ss` from an hour.
fn clock(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

/// One progress line: `backup b1  45% [#########-----------] 460MiB of 1GiB, 120MiB stored,
/// 92MiB/s, ETA 0:06`; the agent's name and the volume on a restore.
fn progress_text(what: &str, m: &pb::BackupProgress, elapsed: Duration) -> String {
    const WIDTH: u64 = 20;
    let pct = percent(m.bytes_done, m.bytes_total);
    let filled = (pct * WIDTH / 100) as usize;
    let bar = format!(
        "{}{}",
        "#".repeat(filled),
        "-".repeat(WIDTH as usize - filled)
    );
    let mut line = format!(
        "{what} {} {pct:>3}% [{bar}] {} of {}",
        m.backup_id,
        human_size(m.bytes_done),
        human_size(m.bytes_total)
    );
    if m.stored_bytes > 0 {
        line.push_str(&format!(", {} stored", human_size(m.stored_bytes)));
    }
    let secs = elapsed.as_secs_f64();
    if secs >= 0.05 && m.bytes_done > 0 {
        let rate = m.bytes_done as f64 / secs;
        line.push_str(&format!(", {}/s", human_size(rate as u64)));
        if !m.done && m.bytes_total > m.bytes_done {
            let eta = (m.bytes_total - m.bytes_done) as f64 / rate;
            line.push_str(&format!(", ETA {}", clock(Duration::from_secs_f64(eta))));
        }
    }
    if m.done {
        line.push_str(&format!(" in {}", clock(elapsed)));
    }
    line
}

fn backup_json(b: &pb::Backup) -> Value {
    json!({
        "id": b.id,
        "repository": b.repository,
        "status": b.status,
        "fail_reason": text_or_null(&b.fail_reason),
        "volume": b.volume_id,
        "volume_size_bytes": b.volume_size_bytes,
        "type": b.volume_type,
        "parent": text_or_null(&b.parent_id),
        "incremental": !b.parent_id.is_empty(),
        "dependents": b.dependent_ids,
        "created_at": time_json(&b.created_at),
        "completed_at": time_json(&b.completed_at),
        "chunk_bytes": b.chunk_bytes,
        "compression": b.compression,
        "data_bytes": b.data_bytes,
        "hole_bytes": b.hole_bytes,
        "stored_bytes": b.stored_bytes,
        "stored_chunks": b.stored_chunks,
        "reused_chunks": b.reused_chunks,
        "bytes_done": b.bytes_done,
        "bytes_total": b.bytes_total,
        "agents": b.agents,
    })
}

fn backup_rows(backups: &[pb::Backup]) -> Vec<Vec<String>> {
    let header = [
        "ID",
        "VOLUME",
        "STATUS",
        "SIZE",
        "STORED",
        "REPOSITORY",
        "INCREMENTAL ON",
        "CREATED",
    ];
    let mut rows = vec![header.map(String::from).to_vec()];
    for b in backups {
        rows.push(vec![
            b.id.clone(),
            b.volume_id.clone(),
            b.status.clone(),
            human_size(b.volume_size_bytes),
            human_size(b.stored_bytes),
            b.repository.clone(),
            b.parent_id.clone(),
            time_text(&b.created_at),
        ]);
    }
    rows
}

fn backup_detail(b: &pb::Backup) -> Vec<Vec<String>> {
    let kind = if b.parent_id.is_empty() {
        "full".to_owned()
    } else {
        format!("incremental on {}", b.parent_id)
    };
    let mut rows = vec![
        vec!["id".into(), b.id.clone()],
        vec!["status".into(), b.status.clone()],
        vec!["repository".into(), b.repository.clone()],
        vec!["agents".into(), b.agents.join(",")],
        vec!["volume".into(), b.volume_id.clone()],
        vec!["size".into(), human_size(b.volume_size_bytes)],
        vec!["type".into(), b.volume_type.clone()],
        vec!["kind".into(), kind],
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

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(done: u64, total: u64, stored: u64, finished: bool) -> pb::BackupProgress {
        pb::BackupProgress {
            backup_id: "b1".into(),
            bytes_done: done,
            bytes_total: total,
            stored_bytes: stored,
            done: finished,
            ..Default::default()
        }
    }

    #[test]
    fn progress_text_table() {
        let s = Duration::from_secs;
        let cases = [
            (
                msg(0, 0, 0, false),
                s(0),
                "backup b1   0% [--------------------] 0B of 0B",
            ),
            (
                msg(512 << 20, 1 << 30, 100 << 20, false),
                s(4),
                "backup b1  50% [##########----------] 512MiB of 1GiB, 100MiB stored, \
                 128MiB/s, ETA 0:04",
            ),
            (
                msg(1 << 30, 4 << 30, 0, false),
                s(3600),
                "backup b1  25% [#####---------------] 1GiB of 4GiB, 291.3KiB/s, ETA 3:00:00",
            ),
            (
                msg(1 << 30, 1 << 30, 0, true),
                s(8),
                "backup b1 100% [####################] 1GiB of 1GiB, 128MiB/s in 0:08",
            ),
        ];
        for (m, elapsed, want) in cases {
            assert_eq!(progress_text("backup", &m, elapsed), want);
        }
    }

    #[test]
    fn percent_and_clock() {
        assert_eq!(percent(1, 0), 0);
        assert_eq!(percent(u64::MAX, u64::MAX), 100);
        assert_eq!(percent(3, 2), 100);
        assert_eq!(clock(Duration::from_secs(61)), "1:01");
        assert_eq!(clock(Duration::from_secs(3661)), "1:01:01");
    }
}
