//! Cinder's tgt target helper (`initialize_connection` / `terminate_connection`): each
//! exported volume is one tgtd target named [`target_iqn`], with LUN 1 on the volume's block
//! device or file, a per-volume incoming CHAP account and an ACL of initiator names.
//!
//! tgtd keeps all of this in memory only. The durable truth is the pools' export records; a
//! restarted tgtd is refilled by [`Exports::reconcile`].
//!
//! Every operation observes tgtd (`--op show`), compares with what is wanted and acts only on
//! the difference, so calling it twice changes nothing the second time. Safety rule kept
//! through every step: a target never accepts a login without CHAP. A fresh target has no
//! ACL entry (tgtd then admits nobody); initiators are bound last, after LUN and account;
//! and when the account of an existing target must be fixed, its ACL is emptied first.
//!
//! Callers serialise operations on one volume (`agent::guard`); this module only serialises
//! the choice of target ids.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex as StdMutex, PoisonError};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use super::chap::{ChapCredentials, ChapKey};
use super::ids::{target_iqn, volume_of_target, TARGET_IQN_PREFIX};
use super::{AgentError, Iqn, VolumeId};
use crate::exec::tgtadm::{
    self, Account, Failure, Refusal, Target, Tgtadm, SCSI_ID_MAX_LEN, TGTADM,
};
use crate::exec::{Cmd, ExecError, Output, Runner};

/// The LUN a volume is exported as (LUN 0 is tgtd's controller).
pub const EXPORT_LUN: u32 = 1;

/// Target ids are picked in `1..=TID_SPAN`, starting from a hash of the volume id (see
/// [`pick_tid`]).
const TID_SPAN: u32 = 65_535;

/// How often a LUN delete refused with "still active" (commands queued) is retried, and
/// how long apart: 5 s in all.
const LUN_BUSY_RETRIES: u32 = 50;
const LUN_BUSY_DELAY: Duration = Duration::from_millis(100);

/// New-target attempts when another tgtadm client takes the chosen tid in between.
const TID_RACE_RETRIES: usize = 3;

/// What an initiator needs to log in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// Target name.
    pub target_iqn: String,
    /// LUN number ([`EXPORT_LUN`]).
    pub lun: u32,
    /// Incoming CHAP credentials (Debug redacts the secret).
    pub chap: ChapCredentials,
}

/// One export as the durable state wants it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredExport {
    /// The volume.
    pub id: VolumeId,
    /// Its block device or file.
    pub backing: PathBuf,
    /// Initiators allowed to log in.
    pub initiators: Vec<Iqn>,
}

/// What [`Exports::reconcile`] found and did.
#[derive(Debug, Default)]
pub struct Drift {
    /// Targets that were missing (tgtd restarted) and were created.
    pub created: Vec<VolumeId>,
    /// Targets that existed but differed (LUN, ACL, account) and were repaired.
    pub repaired: Vec<VolumeId>,
    /// Targets under our prefix without a desired export, removed (by IQN: some may not
    /// even name a valid volume).
    pub removed: Vec<String>,
    /// Desired exports that could not be restored (logged; the others went on).
    pub failed: Vec<(VolumeId, AgentError)>,
}

/// Which tgtd process answers: the identity of its control socket file, which every start
/// of tgtd re-creates (see `exec::tgtadm`). Two different values mean tgtd restarted in
/// between (and forgot every target).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TgtdInstance {
    dev: u64,
    ino: u64,
    ctime_sec: i64,
    ctime_nsec: i64,
}

/// A target of ours as tgtd has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetState {
    /// The volume, when the IQN names a valid one.
    pub volume: Option<VolumeId>,
    /// Target name.
    pub iqn: String,
    /// tgtd's target id.
    pub tid: u32,
    /// LUN 1's backing store.
    pub backing: Option<PathBuf>,
    /// LUN 1's size as tgtd reports it: decimal MB, rounded (tgtd's own unit).
    pub size_mb: Option<u64>,
    /// LUN 1's SCSI serial number.
    pub serial: Option<String>,
    /// Initiator names allowed (name ACL).
    pub initiators: Vec<String>,
    /// Address ACL entries (`ALL`, IPs). Never made by this module; removed on repair.
    pub addresses: Vec<String>,
    /// Accounts bound to the target.
    pub accounts: Vec<String>,
    /// Logged-in initiators.
    pub sessions: Vec<Session>,
}

/// A logged-in initiator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    /// Initiator name.
    pub initiator: String,
    /// Its connections' IP addresses.
    pub addresses: Vec<String>,
}

impl From<&Target> for TargetState {
    fn from(t: &Target) -> Self {
        let lun = t.lun(EXPORT_LUN);
        TargetState {
            volume: volume_of_target(&t.iqn),
            iqn: t.iqn.clone(),
            tid: t.tid,
            backing: lun.and_then(|l| l.backing_path.clone()),
            size_mb: lun.map(|l| l.size_mb),
            serial: lun.map(|l| l.scsi_sn.clone()),
            initiators: t.acl_names().map(str::to_owned).collect(),
            addresses: t.acl_addresses().map(str::to_owned).collect(),
            accounts: t.accounts.iter().map(|a| a.user.clone()).collect(),
            sessions: t
                .nexuses
                .iter()
                .map(|n| Session {
                    initiator: n.initiator.clone(),
                    addresses: n.connections.iter().map(|c| c.address.clone()).collect(),
                })
                .collect(),
        }
    }
}

/// The SCSI identity (`scsi_id` and `scsi_sn`) of a volume's LUN, so that an initiator's
/// `/dev/disk/by-id` names (from the VPD 0x80 serial and 0x83 T10 designator) stay the same
/// across tgtd restarts and re-exports; tgtd's defaults derive from the target id. The volume
/// id itself when it fits tgtd's 36 characters (a UUID does exactly); longer ids keep their
/// first 27 characters, then `-` and 8 hex digits of their SHA-256. Only `[a-z0-9-]`, so it
/// is safe inside tgtadm's `--params`.
pub fn lun_serial(id: &VolumeId) -> String {
    let s = id.as_str();
    if s.len() <= SCSI_ID_MAX_LEN {
        return s.to_owned();
    }
    let digest = Sha256::digest(s.as_bytes());
    let keep = SCSI_ID_MAX_LEN - 9;
    format!("{}-{}", &s[..keep], hex::encode(&digest[..4]))
}

/// A free target id for `id`: the first free one from a per-volume starting point (SHA-256 of
/// the id) upwards, wrapping within `1..=TID_SPAN`. A volume thus usually gets the same tid
/// again when tgtd is refilled after a restart, which keeps the NAA designator tgtd derives
/// from the tid (the initiator's `wwn-` link) stable too. `None` when all are taken.
fn pick_tid(id: &VolumeId, used: &BTreeSet<u32>) -> Option<u32> {
    let h = Sha256::digest(id.as_str().as_bytes());
    let start = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) % TID_SPAN;
    (0..TID_SPAN)
        .map(|i| (start + i) % TID_SPAN + 1)
        .find(|t| !used.contains(t))
}

/// What one [`Exports::ensure`] found different and fixed (no secrets in here).
#[derive(Debug, Default, PartialEq, Eq)]
struct Changes {
    /// The target did not exist.
    created: bool,
    /// Differences of an existing target, one line each.
    repairs: Vec<String>,
    /// The account existed with a secret this process had not set, and was re-created with
    /// the current one (tgtd never shows a secret, so this cannot be compared).
    secret_reapplied: bool,
}

/// What an [`Exports::ensure`] call created, to remove again if it fails midway.
#[derive(Debug, Default)]
struct Created {
    target: Option<u32>,
    account: Option<String>,
}

/// A refusal by tgtd that the caller may accept ("already exists", "not found") or return.
struct Refused {
    reason: Refusal,
    error: AgentError,
}

/// Volume exports through one tgtd. See the module documentation.
#[derive(Debug)]
pub struct Exports {
    runner: Runner,
    tgtadm: Tgtadm,
    key: ChapKey,
    /// Serialises target-id allocation: held from listing tgtd's targets until `new target`
    /// with the chosen tid has answered, so two exports of this process never pick the same
    /// free tid (nor create the same target twice).
    tid_lock: Mutex<()>,
    /// CHAP users whose secret this process has set. tgtd never shows a secret, so an
    /// account made earlier (by a previous agent, maybe with another key) is re-created once.
    /// Locked briefly, never across an `.await`.
    secrets_set: StdMutex<HashSet<String>>,
    /// Counts `export` calls; with `touched`, lets `reconcile` leave alone the targets that
    /// an export started after it began (the caller's desired list cannot know them).
    seq: AtomicU64,
    /// Target IQN → `seq` value of the last `export` that started on it. Locked briefly,
    /// never across an `.await`.
    touched: StdMutex<HashMap<String, u64>>,
}

impl Exports {
    /// Exports through the tgtd on `control_port` (0: tgtd's default), with CHAP secrets
    /// derived from `key`.
    pub fn new(runner: Runner, control_port: u16, key: ChapKey) -> Self {
        Exports {
            runner,
            tgtadm: Tgtadm::new(control_port),
            key,
            tid_lock: Mutex::new(()),
            secrets_set: StdMutex::new(HashSet::new()),
            seq: AtomicU64::new(0),
            touched: StdMutex::new(HashMap::new()),
        }
    }

    /// The tgtd instance behind the control socket, or `None` when its socket file cannot be
    /// seen from here (tgtd never started, or another mount namespace).
    pub async fn tgtd_instance(&self) -> Option<TgtdInstance> {
        use std::os::unix::fs::MetadataExt;
        let m = tokio::fs::metadata(self.tgtadm.socket_path()).await.ok()?;
        Some(TgtdInstance {
            dev: m.dev(),
            ino: m.ino(),
            ctime_sec: m.ctime(),
            ctime_nsec: m.ctime_nsec(),
        })
    }

    /// Ok when tgtd answers; [`AgentError::TgtUnavailable`] when it does not.
    pub async fn ping(&self) -> Result<(), AgentError> {
        self.output("ask tgtd for its state", self.tgtadm.show_sys())
            .await
            .map(drop)
    }

    /// Makes sure volume `id` is exported: target [`target_iqn`] with LUN 1 on `backing`,
    /// the volume's CHAP account bound, and an ACL of exactly `initiators`. Idempotent: a
    /// second call returns the same answer and changes nothing. On failure, what this call
    /// created is removed again; an existing target may be left with an empty ACL (closed).
    pub async fn export(
        &self,
        id: &VolumeId,
        backing: &Path,
        initiators: &[Iqn],
    ) -> Result<ExportInfo, AgentError> {
        let iqn = target_iqn(id);
        let n = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        lock(&self.touched).insert(iqn, n);
        let (info, changes) = self.ensure(id, backing, initiators).await?;
        if changes.created {
            tracing::info!(volume = %id, target = %info.target_iqn, initiators = ?initiators, "exported");
        } else if !changes.repairs.is_empty() {
            tracing::info!(volume = %id, changes = ?changes.repairs, "export updated");
        }
        Ok(info)
    }

    /// Removes volume `id`'s target (with `--force`: sessions are dropped) and its CHAP
    /// account. Not exported: Ok.
    pub async fn unexport(&self, id: &VolumeId) -> Result<(), AgentError> {
        let iqn = target_iqn(id);
        let targets = self.show_targets().await?;
        if let Some(t) = targets.iter().find(|t| t.iqn == iqn) {
            self.accept(
                &format!("delete target {} ({iqn})", t.tid),
                self.tgtadm.delete_target(t.tid),
                &[Refusal::NoTarget],
            )
            .await?;
            tracing::info!(volume = %id, tid = t.tid, "unexported");
        }
        let user = self.key.credentials(id).username;
        if let Some(other) = targets
            .iter()
            .find(|t| t.iqn != iqn && t.has_account(&user))
        {
            // Two volume ids that share a CHAP user name: keep the account of the other.
            tracing::warn!(volume = %id, user, other = %other.iqn, "CHAP account still bound elsewhere; kept");
        } else if self.show_accounts().await?.contains(&user) {
            self.accept(
                &format!("delete account {user}"),
                self.tgtadm.delete_account(&user),
                &[Refusal::NoAccount],
            )
            .await?;
        }
        lock(&self.secrets_set).remove(&user);
        lock(&self.touched).remove(&iqn);
        Ok(())
    }

    /// Makes tgtd see `backing`'s current size after an extend: tgtd reads the size once,
    /// when a LUN is created, so LUN 1 is deleted and created again (same backing store, same
    /// SCSI identity). Sessions stay logged in and go on with I/O on the new LUN; initiators
    /// must rescan to see the new size. A command that reaches tgtd between the delete and
    /// the re-create fails with ILLEGAL REQUEST / LOGICAL UNIT NOT SUPPORTED (observed on tgt
    /// 1.0.85 under continuous writes), which initiators do not retry: quiesce I/O first.
    /// Not exported: Ok (a later export reads the size afresh).
    pub async fn refresh_lun(&self, id: &VolumeId, backing: &Path) -> Result<(), AgentError> {
        let iqn = target_iqn(id);
        let targets = self.show_targets().await?;
        let Some(t) = targets.iter().find(|t| t.iqn == iqn) else {
            tracing::debug!(volume = %id, "not exported: no LUN to refresh");
            return Ok(());
        };
        if t.lun(EXPORT_LUN).is_some() {
            self.delete_lun(t.tid, EXPORT_LUN).await?;
        }
        self.add_lun(t.tid, backing, &lun_serial(id)).await?;
        tracing::info!(volume = %id, tid = t.tid, "LUN re-created to show the new size");
        Ok(())
    }

    /// Our targets (IQN under [`TARGET_IQN_PREFIX`]), sorted by IQN.
    pub async fn targets(&self) -> Result<Vec<TargetState>, AgentError> {
        let mut v: Vec<TargetState> = self
            .show_targets()
            .await?
            .iter()
            .filter(|t| t.iqn.starts_with(TARGET_IQN_PREFIX))
            .map(TargetState::from)
            .collect();
        v.sort_by(|a, b| a.iqn.cmp(&b.iqn));
        Ok(v)
    }

    /// Makes tgtd match `desired`: missing targets are created (tgtd restarted), wrong ones
    /// repaired, and targets under our prefix with no desired export removed. See
    /// [`Exports::reconcile_except`].
    pub async fn reconcile(&self, desired: &[DesiredExport]) -> Result<Drift, AgentError> {
        self.reconcile_except(desired, &[]).await
    }

    /// [`Exports::reconcile`], leaving alone the targets of `keep` (volumes an operation is
    /// changing right now, left out of `desired`) and of exports started while this runs.
    /// A desired export that fails is logged and listed in [`Drift::failed`]; tgtd not
    /// answering stops everything with [`AgentError::TgtUnavailable`].
    pub async fn reconcile_except(
        &self,
        desired: &[DesiredExport],
        keep: &[VolumeId],
    ) -> Result<Drift, AgentError> {
        let began = self.seq.load(Ordering::SeqCst);
        let mut ids = HashSet::new();
        if let Some(dup) = desired.iter().find(|d| !ids.insert(&d.id)) {
            return Err(AgentError::InvalidArgument(format!(
                "volume {} is listed twice in the desired exports",
                dup.id
            )));
        }
        let mut drift = Drift::default();
        for d in desired {
            match self.ensure(&d.id, &d.backing, &d.initiators).await {
                Ok((_, changes)) => {
                    if changes.created {
                        tracing::warn!(volume = %d.id, "drift: export was missing; re-created");
                        drift.created.push(d.id.clone());
                    } else if !changes.repairs.is_empty() {
                        tracing::warn!(volume = %d.id, changes = ?changes.repairs, "drift: export repaired");
                        drift.repaired.push(d.id.clone());
                    }
                    if changes.secret_reapplied {
                        tracing::info!(volume = %d.id, "CHAP secret re-applied (tgtd does not show secrets)");
                    }
                }
                Err(e @ AgentError::TgtUnavailable(_)) => return Err(e),
                Err(e) => {
                    tracing::error!(volume = %d.id, error = %e, "cannot restore export");
                    drift.failed.push((d.id.clone(), e));
                }
            }
        }

        let wanted: HashSet<String> = desired
            .iter()
            .map(|d| &d.id)
            .chain(keep)
            .map(target_iqn)
            .collect();
        let targets = self.show_targets().await?;
        let started_since = |iqn: &str| lock(&self.touched).get(iqn).is_some_and(|n| *n > began);
        let (orphans, remaining): (Vec<&Target>, Vec<&Target>) = targets.iter().partition(|t| {
            t.iqn.starts_with(TARGET_IQN_PREFIX)
                && !wanted.contains(&t.iqn)
                && !started_since(&t.iqn)
        });
        for t in orphans {
            self.accept(
                &format!("delete target {} ({})", t.tid, t.iqn),
                self.tgtadm.delete_target(t.tid),
                &[Refusal::NoTarget],
            )
            .await?;
            for a in &t.accounts {
                if !remaining.iter().any(|r| r.has_account(&a.user)) {
                    self.accept(
                        &format!("delete account {}", a.user),
                        self.tgtadm.delete_account(&a.user),
                        &[Refusal::NoAccount],
                    )
                    .await?;
                    lock(&self.secrets_set).remove(&a.user);
                }
            }
            tracing::warn!(target = %t.iqn, tid = t.tid, "drift: export without a volume; removed");
            drift.removed.push(t.iqn.clone());
        }
        Ok(drift)
    }

    // ---- the ensure steps ------------------------------------------------------------------

    /// Observe, compare, act; on failure remove what this call created.
    async fn ensure(
        &self,
        id: &VolumeId,
        backing: &Path,
        initiators: &[Iqn],
    ) -> Result<(ExportInfo, Changes), AgentError> {
        let iqn = target_iqn(id);
        let chap = self.key.credentials(id);
        let mut created = Created::default();
        match self
            .ensure_steps(id, &iqn, backing, &chap, initiators, &mut created)
            .await
        {
            Ok(changes) => Ok((
                ExportInfo {
                    target_iqn: iqn,
                    lun: EXPORT_LUN,
                    chap,
                },
                changes,
            )),
            Err(e) => {
                self.undo(id, created).await;
                Err(e)
            }
        }
    }

    async fn ensure_steps(
        &self,
        id: &VolumeId,
        iqn: &str,
        backing: &Path,
        chap: &ChapCredentials,
        initiators: &[Iqn],
        created: &mut Created,
    ) -> Result<Changes, AgentError> {
        let user = chap.username.as_str();
        let targets = self.show_targets().await?;
        let accounts = self.show_accounts().await?;
        let mut changes = Changes::default();

        // The target.
        let mut t = match targets.iter().find(|t| t.iqn == iqn) {
            Some(t) => t.clone(),
            None => {
                let (t, new) = self.create_target(id, iqn).await?;
                if new {
                    created.target = Some(t.tid);
                    changes.created = true;
                }
                t
            }
        };
        let tid = t.tid;
        let orig = t.clone();
        if let Some(other) = targets.iter().find(|o| o.tid != tid && o.has_account(user)) {
            return Err(AgentError::Precondition(format!(
                "CHAP user {user} of volume {id} is already bound to target {}",
                other.iqn
            )));
        }

        // The CHAP account, bound as the target's only account.
        let exists = accounts.iter().any(|a| a == user);
        let secret_known = lock(&self.secrets_set).contains(user);
        let only_ours = [Account {
            user: user.to_owned(),
            outgoing: false,
        }];
        if !exists {
            changes.repairs.push(format!("CHAP account {user} missing"));
        }
        if t.accounts != only_ours {
            let bound: Vec<&str> = t.accounts.iter().map(|a| a.user.as_str()).collect();
            changes
                .repairs
                .push(format!("accounts bound {bound:?}, want [{user:?}]"));
        }
        if !(exists && secret_known && t.accounts == only_ours) {
            // Close the door first: with no ACL entry tgtd admits nobody, so no login can
            // slip in without CHAP while the account is being fixed.
            for entry in std::mem::take(&mut t.acl) {
                let cmd = match &entry {
                    tgtadm::AclEntry::Name(n) => self.tgtadm.unbind_initiator(tid, n),
                    tgtadm::AclEntry::Address(a) => self.tgtadm.unbind_address(tid, a),
                };
                self.accept(
                    &format!("close target {tid} ({entry:?})"),
                    cmd,
                    &[Refusal::NoAcl],
                )
                .await?;
            }
            for a in t.accounts.iter().filter(|a| a.user != user || a.outgoing) {
                self.accept(
                    &format!("unbind account {} from target {tid}", a.user),
                    self.tgtadm.unbind_account(tid, &a.user, a.outgoing),
                    &[Refusal::NoAccount],
                )
                .await?;
            }
            if exists && !secret_known {
                self.accept(
                    &format!("delete account {user} to set its secret"),
                    self.tgtadm.delete_account(user),
                    &[Refusal::NoAccount],
                )
                .await?;
                changes.secret_reapplied = true;
            }
            if !(exists && secret_known) {
                self.output(
                    &format!("create account {user}"),
                    self.tgtadm.new_account(user, &chap.secret),
                )
                .await?;
                if !exists {
                    created.account = Some(user.to_owned());
                }
                lock(&self.secrets_set).insert(user.to_owned());
            }
            self.accept(
                &format!("bind account {user} to target {tid}"),
                self.tgtadm.bind_account(tid, user),
                &[Refusal::AccountExists],
            )
            .await?;
        }

        // LUN 1 on the backing store, with the volume's SCSI identity; no other LUN.
        let serial = lun_serial(id);
        match t.lun(EXPORT_LUN) {
            Some(l) if l.backing_path.as_deref() == Some(backing) => {
                if l.scsi_id != serial || l.scsi_sn != serial {
                    changes
                        .repairs
                        .push(format!("LUN 1 identity {:?}/{:?}", l.scsi_id, l.scsi_sn));
                    self.output(
                        &format!("set LUN identity on target {tid}"),
                        self.tgtadm
                            .set_lun_identity(tid, EXPORT_LUN, &serial, &serial),
                    )
                    .await?;
                }
            }
            Some(l) => {
                changes
                    .repairs
                    .push(format!("LUN 1 on {:?}, want {backing:?}", l.backing_path));
                self.delete_lun(tid, EXPORT_LUN).await?;
                self.add_lun(tid, backing, &serial).await?;
            }
            None => {
                changes.repairs.push("LUN 1 missing".to_owned());
                self.add_lun(tid, backing, &serial).await?;
            }
        }
        for l in t.luns.iter().filter(|l| l.lun != 0 && l.lun != EXPORT_LUN) {
            changes.repairs.push(format!("extra LUN {}", l.lun));
            self.delete_lun(tid, l.lun).await?;
        }

        // The ACL: exactly these initiator names, no address entries. Differences are
        // reported against the target as found (closing the door above is no difference).
        let want: BTreeSet<&str> = initiators.iter().map(Iqn::as_str).collect();
        let found: BTreeSet<&str> = orig.acl_names().collect();
        changes
            .repairs
            .extend(orig.acl_addresses().map(|a| format!("ACL address {a}")));
        changes
            .repairs
            .extend(found.difference(&want).map(|n| format!("ACL has {n}")));
        changes
            .repairs
            .extend(want.difference(&found).map(|n| format!("ACL lacks {n}")));
        let have: BTreeSet<&str> = t.acl_names().collect();
        for a in t.acl_addresses() {
            self.accept(
                &format!("unbind address {a} from target {tid}"),
                self.tgtadm.unbind_address(tid, a),
                &[Refusal::NoAcl],
            )
            .await?;
        }
        for n in have.difference(&want) {
            self.accept(
                &format!("unbind initiator {n} from target {tid}"),
                self.tgtadm.unbind_initiator(tid, n),
                &[Refusal::NoAcl],
            )
            .await?;
        }
        for n in want.difference(&have) {
            self.accept(
                &format!("bind initiator {n} to target {tid}"),
                self.tgtadm.bind_initiator(tid, n),
                &[Refusal::AclExists],
            )
            .await?;
        }
        Ok(changes)
    }

    /// Creates the target under the tid lock. `(target, true)` when this call created it,
    /// `(target, false)` when it appeared meanwhile.
    async fn create_target(&self, id: &VolumeId, iqn: &str) -> Result<(Target, bool), AgentError> {
        let _alloc = self.tid_lock.lock().await;
        let mut last = None;
        for _ in 0..TID_RACE_RETRIES {
            let targets = self.show_targets().await?;
            if let Some(t) = targets.iter().find(|t| t.iqn == iqn) {
                return Ok((t.clone(), false));
            }
            let used: BTreeSet<u32> = targets.iter().map(|t| t.tid).collect();
            let tid = pick_tid(id, &used)
                .ok_or_else(|| AgentError::Precondition("tgtd has no free target id".to_owned()))?;
            match self
                .call(
                    &format!("create target {tid} ({iqn})"),
                    self.tgtadm.new_target(tid, iqn),
                )
                .await?
            {
                Ok(_) => {
                    let t = Target {
                        tid,
                        iqn: iqn.to_owned(),
                        ..Target::default()
                    };
                    return Ok((t, true));
                }
                // Another tgtadm client took the tid (or the name) in between: look again.
                Err(r) if r.reason == Refusal::TargetExists => last = Some(r.error),
                Err(r) => return Err(r.error),
            }
        }
        Err(last
            .unwrap_or_else(|| AgentError::Precondition("cannot allocate a target id".to_owned())))
    }

    /// Adds LUN 1 on `backing` and sets its SCSI identity.
    async fn add_lun(&self, tid: u32, backing: &Path, serial: &str) -> Result<(), AgentError> {
        let cmd = self
            .tgtadm
            .new_lun(tid, EXPORT_LUN, backing)
            .ok_or_else(|| {
                AgentError::InvalidArgument(format!("backing store path {backing:?} is not UTF-8"))
            })?;
        self.output(
            &format!("add LUN 1 on {} to target {tid}", backing.display()),
            cmd,
        )
        .await?;
        self.output(
            &format!("set LUN identity on target {tid}"),
            self.tgtadm
                .set_lun_identity(tid, EXPORT_LUN, serial, serial),
        )
        .await
        .map(drop)
    }

    /// Deletes a LUN, retrying while tgtd says it still has commands queued. Gone: Ok.
    async fn delete_lun(&self, tid: u32, lun: u32) -> Result<(), AgentError> {
        let what = format!("delete LUN {lun} of target {tid}");
        for _ in 1..LUN_BUSY_RETRIES {
            match self.call(&what, self.tgtadm.delete_lun(tid, lun)).await? {
                Ok(_) => return Ok(()),
                Err(r) if r.reason == Refusal::NoLun => return Ok(()),
                Err(r) if r.reason == Refusal::LunActive => {
                    tokio::time::sleep(LUN_BUSY_DELAY).await
                }
                Err(r) => return Err(r.error),
            }
        }
        self.accept(&what, self.tgtadm.delete_lun(tid, lun), &[Refusal::NoLun])
            .await
            .map(drop)
    }

    /// Removes what a failed ensure created (best effort: the failure is what is reported).
    async fn undo(&self, id: &VolumeId, created: Created) {
        if let Some(tid) = created.target {
            let what = format!("delete target {tid}");
            let r = self.accept(&what, self.tgtadm.delete_target(tid), &[Refusal::NoTarget]);
            if let Err(e) = r.await {
                tracing::error!(volume = %id, tid, error = %e, "cannot remove the half-made target");
            }
        }
        if let Some(user) = created.account {
            let what = format!("delete account {user}");
            let r = self.accept(
                &what,
                self.tgtadm.delete_account(&user),
                &[Refusal::NoAccount],
            );
            if let Err(e) = r.await {
                tracing::error!(volume = %id, user, error = %e, "cannot remove the new CHAP account");
            }
            lock(&self.secrets_set).remove(&user);
        }
    }

    // ---- tgtadm calls ------------------------------------------------------------------------

    async fn show_targets(&self) -> Result<Vec<Target>, AgentError> {
        let out = self
            .output("list targets", self.tgtadm.show_targets())
            .await?;
        tgtadm::parse_targets(&out.stdout).map_err(parse_error)
    }

    async fn show_accounts(&self) -> Result<Vec<String>, AgentError> {
        let out = self
            .output("list accounts", self.tgtadm.show_accounts())
            .await?;
        tgtadm::parse_accounts(&out.stdout).map_err(parse_error)
    }

    /// Runs a tgtadm command that must succeed.
    async fn output(&self, what: &str, cmd: Cmd) -> Result<Output, AgentError> {
        self.call(what, cmd).await?.map_err(|r| r.error)
    }

    /// Runs a tgtadm command that must succeed or be refused for one of `ok` (already so).
    /// True when it changed something.
    async fn accept(&self, what: &str, cmd: Cmd, ok: &[Refusal]) -> Result<bool, AgentError> {
        match self.call(what, cmd).await? {
            Ok(_) => Ok(true),
            Err(r) if ok.contains(&r.reason) => Ok(false),
            Err(r) => Err(r.error),
        }
    }

    /// Runs a tgtadm command: the outer error is fatal (tgtd unavailable, tgtadm missing,
    /// unknown failure), the inner one a refusal the caller may accept.
    async fn call(&self, what: &str, cmd: Cmd) -> Result<Result<Output, Refused>, AgentError> {
        let context = || format!("tgtadm: {what}");
        let out = self.runner.run(&cmd).await.map_err(|e| match e {
            ExecError::Timeout { after, .. } => {
                AgentError::TgtUnavailable(format!("tgtadm did not answer in {after:?} ({what})"))
            }
            source => AgentError::Exec {
                context: context(),
                source,
            },
        })?;
        let failure = match tgtadm::classify(out.code, &out.stderr) {
            None => return Ok(Ok(out)),
            Some(Failure::Unavailable) => {
                return Err(AgentError::TgtUnavailable(out.stderr.trim().to_owned()));
            }
            Some(f) => f,
        };
        let error = AgentError::Exec {
            context: context(),
            source: ExecError::Failed {
                program: TGTADM.to_owned(),
                code: out.code,
                stderr: out.stderr.trim().to_owned(),
            },
        };
        match failure {
            Failure::Refused(reason) => Ok(Err(Refused { reason, error })),
            Failure::Unavailable | Failure::Unknown => Err(error),
        }
    }
}

fn parse_error(e: tgtadm::ParseError) -> AgentError {
    AgentError::Parse {
        tool: TGTADM,
        reason: e.to_string(),
    }
}

fn lock<T>(m: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report
mod tests {
    use super::*;

    fn vid(s: &str) -> VolumeId {
        VolumeId::parse(s).unwrap()
    }

    #[test]
    fn serial_is_the_id_when_it_fits() {
        let uuid = "5f0c1e2d-ab12-4cde-8f00-0123456789ab";
        assert_eq!(lun_serial(&vid(uuid)), uuid);
        assert_eq!(lun_serial(&vid("a")), "a");
    }

    #[test]
    fn long_ids_get_a_stable_unique_36_character_serial() {
        let a = vid(&format!("{}-a", "x".repeat(40)));
        let b = vid(&format!("{}-b", "x".repeat(40)));
        let (sa, sb) = (lun_serial(&a), lun_serial(&b));
        assert_eq!((sa.len(), sb.len()), (SCSI_ID_MAX_LEN, SCSI_ID_MAX_LEN));
        assert_eq!(&sa[..27], &"x".repeat(27));
        assert_ne!(sa, sb);
        assert_eq!(sa, lun_serial(&a));
        assert!(
            sa.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-'),
            "{sa}"
        );
    }

    #[test]
    fn tid_is_stable_per_volume_and_skips_used_ones() {
        let id = vid("5f0c-ab12");
        let first = pick_tid(&id, &BTreeSet::new()).unwrap();
        assert_eq!(pick_tid(&id, &BTreeSet::new()), Some(first));
        assert!((1..=TID_SPAN).contains(&first));
        let next = pick_tid(&id, &BTreeSet::from([first])).unwrap();
        assert_eq!(next, first % TID_SPAN + 1);
        assert_ne!(pick_tid(&vid("other"), &BTreeSet::new()), Some(first));
    }

    #[test]
    fn tid_wraps_and_runs_out() {
        let id = vid("5f0c-ab12");
        let all: BTreeSet<u32> = (1..=TID_SPAN).collect();
        assert_eq!(pick_tid(&id, &all), None);
        let mut one_free = all.clone();
        one_free.remove(&1);
        assert_eq!(pick_tid(&id, &one_free), Some(1));
    }

    #[test]
    fn target_state_from_captured_show() {
        let show = include_str!("../../tests/fixtures/tgtadm/show_target.txt");
        let targets = tgtadm::parse_targets(show).unwrap();
        let states: Vec<TargetState> = targets.iter().map(TargetState::from).collect();
        assert_eq!(
            states[1],
            TargetState {
                volume: Some(vid("5f0c-ab12")),
                iqn: "iqn.2026-01.dev.cinderblock:volume-5f0c-ab12".into(),
                tid: 7,
                backing: Some("/srv/cinderblock/volume-5f0c-ab12.img".into()),
                size_mb: Some(67),
                serial: Some("5f0c-ab12".into()),
                initiators: vec![
                    "iqn.2025-01.io.cinderblock.test:node-a".into(),
                    "iqn.2025-01.io.cinderblock.test:node-b".into(),
                ],
                addresses: vec![],
                accounts: vec!["cb-5f0cab12".into()],
                sessions: vec![
                    Session {
                        initiator: "iqn.2025-01.io.cinderblock.test:node-a".into(),
                        addresses: vec!["127.0.0.1".into()],
                    },
                    Session {
                        initiator: "iqn.2025-01.io.cinderblock.test:node-b".into(),
                        addresses: vec!["127.0.0.1".into()],
                    },
                ],
            }
        );
        // Half-made: no LUN, no account, no ACL.
        assert_eq!(
            (
                states[2].volume.clone(),
                states[2].backing.clone(),
                states[2].accounts.len()
            ),
            (Some(vid("half")), None, 0)
        );
        assert_eq!(states[0].addresses, ["ALL", "192.0.2.0/24"]);
    }

    /// Exports whose every tgtadm call exits `code` with the captured `stderr` of `case` in
    /// tests/fixtures/tgtadm/errors.tsv (a `sh -c` prefix stands in for tgtadm).
    fn replaying(case: &str) -> Exports {
        let errors = include_str!("../../tests/fixtures/tgtadm/errors.tsv");
        let (code, stderr) = errors
            .lines()
            .find_map(|l| {
                let mut f = l.splitn(3, '\t');
                if f.next()? != case {
                    return None;
                }
                Some((f.next()?, f.next()?))
            })
            .unwrap();
        let script = format!("printf '%s\\n' \"$0\" >&2; exit {code}");
        let runner = Runner::with_prefix(vec!["sh".into(), "-c".into(), script, stderr.into()]);
        Exports::new(runner, 0, ChapKey::random())
    }

    #[tokio::test]
    async fn tgtd_not_running_is_unavailable() {
        let e = replaying("tgtd_not_running");
        let err = e.ping().await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "tgtd is unavailable: tgtadm: failed to send request hdr to tgt daemon, \
             Transport endpoint is not connected"
        );
        let err = e
            .export(&vid("a"), Path::new("/srv/a"), &[])
            .await
            .unwrap_err();
        assert!(matches!(err, AgentError::TgtUnavailable(_)), "{err:?}");
        let err = e.reconcile(&[]).await.unwrap_err();
        assert!(matches!(err, AgentError::TgtUnavailable(_)), "{err:?}");
    }

    #[tokio::test]
    async fn a_refusal_keeps_tgtadm_words_and_code() {
        let err = replaying("no_target").ping().await.unwrap_err();
        match err {
            AgentError::Exec {
                context,
                source:
                    ExecError::Failed {
                        program,
                        code,
                        stderr,
                    },
            } => {
                assert_eq!(
                    (context.as_str(), program.as_str(), code, stderr.as_str()),
                    (
                        "tgtadm: ask tgtd for its state",
                        "tgtadm",
                        22,
                        "tgtadm: can't find the target"
                    )
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn missing_tgtadm_is_an_exec_error() {
        let e = Exports::new(
            Runner::with_prefix(vec!["/nonexistent/wrapper".into()]),
            0,
            ChapKey::random(),
        );
        let err = e.ping().await.unwrap_err();
        assert!(
            matches!(
                &err,
                AgentError::Exec {
                    source: ExecError::Spawn { .. },
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn duplicate_desired_ids_are_rejected_before_touching_tgtd() {
        let e = replaying("tgtd_not_running");
        let d = DesiredExport {
            id: vid("a"),
            backing: "/srv/a".into(),
            initiators: vec![],
        };
        let err = e.reconcile(&[d.clone(), d]).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid argument: volume a is listed twice in the desired exports"
        );
    }
}
