//! Start-up reconciliation: the host's iSCSI state brought in line with the volumes the mount
//! table shows staged, for targets of this project only (`iqn.2026-01.dev.cinderblock:`).
//!
//! - A session that no staged volume needs (a crash between login and mount, or an
//!   unstage cut short) is logged out and its records deleted.
//! - A staged volume whose session is gone is logged in again (from its record, or from a
//!   new record with the secret derived from the master key). Its old mounts still point at
//!   the lost disk; the next NodeStageVolume replaces them, and NodeGetVolumeStats reports
//!   the volume abnormal until then.
//! - A record with neither a session nor a staged volume is deleted.

use std::collections::BTreeSet;

use super::stage::{staged_targets, volume_of};
use super::{Node, NodeError};
use crate::agent::ids::TARGET_IQN_PREFIX;

/// What the reconciliation found and did.
#[derive(Debug, Default)]
pub struct ReconcileReport {
    /// Targets whose sessions were logged out (nothing staged needed them).
    pub logged_out: Vec<String>,
    /// `target at portal` logged in again for a staged volume.
    pub logged_in: Vec<String>,
    /// `target at portal` records deleted.
    pub records_deleted: Vec<String>,
    /// Targets kept because a disk of theirs is in use without a staging mount naming them.
    pub kept_in_use: Vec<String>,
    /// What could not be done.
    pub failed: Vec<(String, NodeError)>,
}

fn ours(target: &str) -> bool {
    target.starts_with(TARGET_IQN_PREFIX)
}

impl Node {
    /// Reconciles once (see the module documentation). Failures of single steps are
    /// collected in the report; reading the host's state failing is an error.
    pub async fn reconcile(&self) -> Result<ReconcileReport, NodeError> {
        let mut report = ReconcileReport::default();
        let view = self.view().await?;
        let staged: Vec<_> = staged_targets(&view)
            .into_iter()
            .filter(|t| ours(&t.target))
            .collect();
        let staged_names: BTreeSet<&str> = staged.iter().map(|t| t.target.as_str()).collect();

        let with_sessions: BTreeSet<String> = view
            .sessions
            .iter()
            .filter(|s| ours(&s.target))
            .map(|s| s.target.clone())
            .collect();
        for target in with_sessions
            .iter()
            .filter(|t| !staged_names.contains(t.as_str()))
        {
            let _lock = self.targets.lock(target).await;
            match self.detach(target, None).await {
                Ok(()) => {
                    tracing::info!(%target, "reconcile: logged out a session no staged volume needs");
                    report.logged_out.push(target.clone());
                }
                Err(NodeError::InUse { users, .. }) => {
                    tracing::info!(%target, ?users, "reconcile: session kept, its disk is in use");
                    report.kept_in_use.push(target.clone());
                }
                Err(e) => {
                    tracing::warn!(%target, error = %crate::logging::error_chain(&e), "reconcile: cannot log out");
                    report.failed.push((target.clone(), e));
                }
            }
        }

        let records = self.initiator.records().await?;
        for t in &staged {
            if with_sessions.contains(&t.target) {
                continue;
            }
            let portal = t.portal.iscsiadm();
            let what = format!("{} at {portal}", t.target);
            let _lock = self.targets.lock(&t.target).await;
            let has_record = records
                .iter()
                .any(|r| r.target == t.target && r.portal == portal);
            if !has_record {
                let creds = match (volume_of(&t.target), &self.chap_key) {
                    (Some(v), Some(k)) => k.credentials(&v),
                    _ => {
                        let e = NodeError::NoChapSecret(format!(
                            "volume staged from {what} lost its session and its record, and \
                             the node has no chap_key_file to make the record again"
                        ));
                        tracing::warn!(target = %t.target, error = %crate::logging::error_chain(&e), "reconcile: cannot log in again");
                        report.failed.push((what, e));
                        continue;
                    }
                };
                if let Err(e) = self
                    .initiator
                    .create_record(&t.target, &t.portal, Some(&creds))
                    .await
                {
                    report.failed.push((what, e.into()));
                    continue;
                }
            }
            match self.initiator.login(&t.target, &portal).await {
                Ok(()) => {
                    tracing::warn!(target = %t.target, %portal,
                        "reconcile: logged in again for a staged volume; its mounts need a new NodeStageVolume");
                    report.logged_in.push(what);
                }
                Err(e) => {
                    tracing::warn!(target = %t.target, %portal, error = %crate::logging::error_chain(&e), "reconcile: login failed");
                    report.failed.push((what, e.into()));
                }
            }
        }

        let sessions = self.initiator.sessions().await?;
        for r in self.initiator.records().await? {
            let needed = staged_names.contains(r.target.as_str())
                || sessions.iter().any(|s| s.target == r.target);
            if !ours(&r.target) || needed {
                continue;
            }
            let what = format!("{} at {}", r.target, r.portal);
            match self.initiator.delete_record(&r.target, &r.portal).await {
                Ok(()) => {
                    tracing::info!(record = %what, "reconcile: deleted a stale node record");
                    report.records_deleted.push(what);
                }
                Err(e) => report.failed.push((what, e.into())),
            }
        }
        Ok(report)
    }
}
