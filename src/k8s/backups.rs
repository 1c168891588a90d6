//! The VolumeBackup and VolumeRestore reconcilers (leader only).
//!
//! **VolumeBackup** → the PVC → its bound PV → the CSI volume handle (`csi.cinderblock.dev`)
//! → the agent holding the volume → the agent's CreateBackup stream, whose progress is
//! written to the status. The backup id derives from the object's UID, and the agent treats
//! a CreateBackup of an id it already has as "join it", so a new leader picking up a
//! `Running` backup follows the same backup instead of starting another. Deleting the object
//! deletes the backup (`deletionPolicy: Delete`); while incrementals depend on it the agent
//! refuses, the finalizer stays and the status says why.
//!
//! **VolumeRestore** → the backup (a VolumeBackup's id, or `backupId`) → a new volume
//! through the controller's own CreateVolume (type from the StorageClass, size at least the
//! backup's; the CSI name derives from the UID, so a retry finds the same volume) → the
//! agent's RestoreBackup → a PV with the same CSI fields CreateVolume gives the
//! external-provisioner, pre-bound (`claimRef`) to a new PVC naming it → Kubernetes binds
//! them.
//!
//! Every status write is a compare-and-swap on `resourceVersion` ([`update_status`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{
    CSIPersistentVolumeSource, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
    ObjectReference, PersistentVolume, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PersistentVolumeSpec, VolumeNodeAffinity, VolumeResourceRequirements,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::controller::{Action, Controller as Runtime};
use kube::runtime::finalizer::{finalizer, Event};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::crd::{
    BackupPhase, DeletionPolicy, RestorePhase, VolumeBackup, VolumeBackupStatus, VolumeRestore,
    VolumeRestoreStatus,
};
use super::discovery::AgentDirectory;
use super::leader::Leadership;
use super::pools::human;
use super::KubeError;
use crate::agent_rpc::backups::{BackupAgent, GrpcBackupAgent, NewBackup, ProgressStream};
use crate::agent_rpc::client::{AgentClientError, AgentErrorKind};
use crate::controller::{
    Access, AccessMode, Capability, CapacityRange, Controller, ControllerError, CreateVolume, Zones,
};
use crate::csi::{DRIVER_NAME, TOPOLOGY_ZONE_KEY};
use crate::tls::ClientTls;
use crate::transport::TransportError;
use crate::types::Bytes;

/// Finalizer on VolumeBackups and VolumeRestores.
pub const FINALIZER: &str = "cinderblock.dev/backup-protection";

/// Annotation on restored PVs and PVCs naming the backup.
pub const RESTORED_FROM: &str = "cinderblock.dev/restored-from";

/// How often progress is written to a status at most.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Errors of one reconciliation (retried with a delay).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The apiserver refused or failed.
    #[error(transparent)]
    Kube(#[from] KubeError),
    /// The controller refused or failed (volume lookup or creation).
    #[error("controller")]
    Controller(#[from] ControllerError),
    /// An agent call failed with a code worth retrying.
    #[error("agent {agent}: {op}")]
    Agent {
        /// The agent.
        agent: String,
        /// What was being done.
        op: &'static str,
        /// Its answer.
        #[source]
        source: AgentClientError,
    },
    /// The agent named in a status is not known (yet).
    #[error("agent {0:?} is not known (yet)")]
    UnknownAgent(String),
    /// The agent's endpoint cannot be dialled.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The finalizer helper failed.
    #[error("finalizer")]
    Finalizer(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// What the reconcilers share.
pub struct Context {
    /// The apiserver.
    pub client: kube::Client,
    /// The controller (volume lookups and creation).
    pub controller: Arc<Controller>,
    /// Agent endpoints.
    pub directory: Arc<AgentDirectory>,
    /// TLS for `tcp://` agents.
    pub tls: Option<ClientTls>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("controller", &self.controller)
            .field("directory", &self.directory)
            .finish_non_exhaustive()
    }
}

impl Context {
    async fn agent(&self, name: &str) -> Result<Arc<dyn BackupAgent>, ReconcileError> {
        let endpoint = self
            .directory
            .endpoint(name)
            .ok_or_else(|| ReconcileError::UnknownAgent(name.to_owned()))?;
        Ok(Arc::new(
            GrpcBackupAgent::connect(&endpoint, self.tls.as_ref()).await?,
        ))
    }
}

// ---------------------------------------------------------------------------------------
// Pure parts

/// `done` of `total` as a whole percentage text (`0%` for an empty total).
pub fn percent(done: u64, total: u64) -> String {
    let p = (u128::from(done) * 100)
        .checked_div(u128::from(total))
        .unwrap_or(0)
        .min(100);
    format!("{p}%")
}

/// A duration as `kubectl` prints ages: `45s`, `3m12s`, `2h5m`.
pub fn duration_text(secs: i64) -> String {
    let s = secs.max(0);
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        _ => format!("{}h{}m", s / 3600, (s % 3600) / 60),
    }
}

/// Whether an agent failure is worth retrying (the agent or the network is down, or another
/// operation holds the volume) rather than failing the object.
pub fn retryable(kind: AgentErrorKind) -> bool {
    match kind {
        AgentErrorKind::Unavailable
        | AgentErrorKind::DeadlineExceeded
        | AgentErrorKind::Aborted
        | AgentErrorKind::Unknown => true,
        AgentErrorKind::InvalidArgument
        | AgentErrorKind::NotFound
        | AgentErrorKind::AlreadyExists
        | AgentErrorKind::FailedPrecondition
        | AgentErrorKind::OutOfRange
        | AgentErrorKind::ResourceExhausted
        | AgentErrorKind::DataLoss
        | AgentErrorKind::Internal => false,
    }
}

/// The status of a backup that just completed.
pub fn completed(
    mut st: VolumeBackupStatus,
    size: u64,
    stored: u64,
    parent: &str,
    now: Timestamp,
) -> VolumeBackupStatus {
    st.phase = Some(BackupPhase::Completed);
    st.progress = Some("100%".into());
    st.size_bytes = Some(size);
    st.size = Some(human(size));
    st.stored_bytes = Some(stored);
    st.stored = Some(human(stored));
    st.parent_id = Some(parent.to_owned()).filter(|p| !p.is_empty());
    st.completion_time = Some(Time(now));
    st.duration = st
        .start_time
        .as_ref()
        .map(|t| duration_text(now.as_second() - t.0.as_second()));
    st.message = None;
    st
}

/// The backup id of a VolumeBackup: its UID (a retry, or a new leader, uses the same id).
pub fn backup_id(vb: &VolumeBackup) -> Option<String> {
    vb.metadata.uid.clone()
}

/// The CSI name of a VolumeRestore's volume (its id derives from it).
pub fn restore_volume_name(vr: &VolumeRestore) -> Option<String> {
    vr.metadata.uid.as_ref().map(|u| format!("restore-{u}"))
}

// ---------------------------------------------------------------------------------------
// Status writes

/// Reads `name`, lets `f` change its status, writes it back with the `resourceVersion` read
/// (409 → read again, a few times). Returns the object written.
pub async fn update_status<K>(api: &Api<K>, name: &str, f: impl Fn(&mut K)) -> Result<K, KubeError>
where
    K: Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut obj = api
            .get(name)
            .await
            .map_err(KubeError::api(format!("get {name}")))?;
        f(&mut obj);
        match api.replace_status(name, &PostParams::default(), &obj).await {
            Ok(o) => return Ok(o),
            Err(kube::Error::Api(s)) if s.code == 409 && attempt < 5 => continue,
            Err(e) => return Err(KubeError::api(format!("write the status of {name}"))(e)),
        }
    }
}

// ---------------------------------------------------------------------------------------
// VolumeBackup

fn vb_status(vb: &VolumeBackup) -> VolumeBackupStatus {
    vb.status.clone().unwrap_or_default()
}

async fn set_backup(
    api: &Api<VolumeBackup>,
    name: &str,
    f: impl Fn(&mut VolumeBackupStatus),
) -> Result<VolumeBackup, KubeError> {
    update_status(api, name, |o: &mut VolumeBackup| {
        let st = o.status.get_or_insert_with(VolumeBackupStatus::default);
        f(st);
    })
    .await
}

/// The CSI volume handle behind a PVC, or why there is none yet (`Ok(Err(reason))`).
async fn volume_of_pvc(
    client: &kube::Client,
    ns: &str,
    pvc: &str,
) -> Result<Result<String, String>, KubeError> {
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    let Some(claim) = pvcs
        .get_opt(pvc)
        .await
        .map_err(KubeError::api(format!("get PVC {ns}/{pvc}")))?
    else {
        return Ok(Err(format!("PVC {pvc} not found")));
    };
    let Some(pv_name) = claim
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.clone())
        .filter(|n| !n.is_empty())
    else {
        return Ok(Err(format!("PVC {pvc} is not bound yet")));
    };
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let Some(pv) = pvs
        .get_opt(&pv_name)
        .await
        .map_err(KubeError::api(format!("get PV {pv_name}")))?
    else {
        return Ok(Err(format!("PV {pv_name} not found")));
    };
    match pv.spec.and_then(|s| s.csi) {
        Some(csi) if csi.driver == DRIVER_NAME => Ok(Ok(csi.volume_handle)),
        Some(csi) => Ok(Err(format!(
            "PV {pv_name} belongs to CSI driver {}, not {DRIVER_NAME}",
            csi.driver
        ))),
        None => Ok(Err(format!("PV {pv_name} is not a CSI volume"))),
    }
}

async fn reconcile_backup(
    vb: Arc<VolumeBackup>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let ns = vb.namespace().unwrap_or_default();
    let api: Api<VolumeBackup> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, vb, |event| async {
        match event {
            Event::Apply(vb) => apply_backup(&api, &vb, &ctx).await,
            Event::Cleanup(vb) => cleanup_backup(&api, &vb, &ctx).await,
        }
    })
    .await
    .map_err(|e| ReconcileError::Finalizer(Box::new(e)))
}

async fn apply_backup(
    api: &Api<VolumeBackup>,
    vb: &VolumeBackup,
    ctx: &Context,
) -> Result<Action, ReconcileError> {
    let name_owned = vb.name_any();
    let name = name_owned.as_str();
    let st = vb_status(vb);
    if matches!(st.phase, Some(BackupPhase::Completed | BackupPhase::Failed)) {
        return Ok(Action::await_change());
    }
    let Some(id) = backup_id(vb) else {
        return Ok(Action::await_change());
    };
    let ns = vb.namespace().unwrap_or_default();
    let volume = match volume_of_pvc(&ctx.client, &ns, &vb.spec.pvc_name).await? {
        Ok(v) => v,
        Err(reason) => {
            set_backup(api, name, |s| {
                s.phase = Some(BackupPhase::Pending);
                s.message = Some(reason.clone());
            })
            .await?;
            return Ok(Action::requeue(Duration::from_secs(5)));
        }
    };
    let view = match ctx.controller.get_volume(&volume).await {
        Ok(v) => v,
        Err(ControllerError::VolumeNotFound(_)) => {
            let msg = format!("volume {volume} not found on any agent");
            set_backup(api, name, |s| {
                s.phase = Some(BackupPhase::Failed);
                s.message = Some(msg.clone());
            })
            .await?;
            return Ok(Action::await_change());
        }
        Err(e) => return Err(e.into()),
    };
    let agent = ctx.agent(&view.agent).await?;
    let started = st.start_time.clone().unwrap_or(Time(Timestamp::now()));
    set_backup(api, name, |s| {
        s.phase = Some(BackupPhase::Running);
        s.backup_id = Some(id.clone());
        s.volume_id = Some(volume.clone());
        s.agent = Some(view.agent.clone());
        s.start_time = Some(started.clone());
        s.progress.get_or_insert_with(|| "0%".into());
        s.message = None;
    })
    .await?;
    tracing::info!(volumebackup = %format!("{ns}/{name}"), backup = %id, volume = %volume, agent = %view.agent, "backup started");
    let req = NewBackup {
        id: id.clone(),
        volume_id: volume.clone(),
        repository: vb.spec.repository.clone().unwrap_or_default(),
        incremental: vb.spec.incremental,
        force: vb.spec.force,
    };
    let outcome = match agent.create_backup(req).await {
        Ok(stream) => {
            follow(stream, |done, total, stored| {
                let progress = percent(done, total);
                async move {
                    set_backup(api, name, |s| {
                        s.progress = Some(progress.clone());
                        s.stored_bytes = Some(stored);
                        s.stored = Some(human(stored));
                    })
                    .await
                    .map(drop)
                }
            })
            .await?
        }
        Err(e) => Err(e),
    };
    match outcome {
        Ok(b) => {
            let now = Timestamp::now();
            set_backup(api, name, |s| {
                *s = completed(s.clone(), b.volume_size, b.stored_bytes, &b.parent_id, now);
                s.repository = Some(b.repository.clone());
            })
            .await?;
            tracing::info!(volumebackup = %format!("{ns}/{name}"), backup = %id, size = b.volume_size, stored = b.stored_bytes, "backup completed");
            Ok(Action::await_change())
        }
        Err(e) if retryable(e.kind) => Err(ReconcileError::Agent {
            agent: view.agent.clone(),
            op: "CreateBackup",
            source: e,
        }),
        Err(e) => {
            let now = Timestamp::now();
            set_backup(api, name, |s| {
                s.phase = Some(BackupPhase::Failed);
                s.message = Some(e.message.clone());
                s.completion_time = Some(Time(now));
            })
            .await?;
            tracing::warn!(volumebackup = %format!("{ns}/{name}"), backup = %id, error = %e, "backup failed");
            Ok(Action::await_change())
        }
    }
}

/// Follows a progress stream, reporting at most every [`PROGRESS_EVERY`]; the backup at the
/// end, or the agent's error.
async fn follow<F, Fut>(
    mut stream: ProgressStream,
    report: F,
) -> Result<Result<crate::agent_rpc::backups::BackupInfo, AgentClientError>, KubeError>
where
    F: Fn(u64, u64, u64) -> Fut,
    Fut: std::future::Future<Output = Result<(), KubeError>>,
{
    let mut last = tokio::time::Instant::now();
    while let Some(m) = stream.next().await {
        match m {
            Ok(p) => {
                if let Some(b) = p.done {
                    return Ok(Ok(b));
                }
                if last.elapsed() >= PROGRESS_EVERY {
                    last = tokio::time::Instant::now();
                    report(p.bytes_done, p.bytes_total, p.stored_bytes).await?;
                }
            }
            Err(e) => return Ok(Err(e)),
        }
    }
    Ok(Err(AgentClientError::new(
        AgentErrorKind::Unavailable,
        "the progress stream ended without a result",
    )))
}

async fn cleanup_backup(
    api: &Api<VolumeBackup>,
    vb: &VolumeBackup,
    ctx: &Context,
) -> Result<Action, ReconcileError> {
    let st = vb_status(vb);
    let (Some(id), Some(agent_name)) = (st.backup_id.clone(), st.agent.clone()) else {
        // Never started: nothing stored.
        return Ok(Action::await_change());
    };
    if vb.spec.deletion_policy == DeletionPolicy::Retain {
        tracing::info!(backup = %id, "VolumeBackup deleted; backup retained in its repository");
        return Ok(Action::await_change());
    }
    let agent = ctx.agent(&agent_name).await?;
    match agent.delete_backup(&id).await {
        Ok(()) => {
            tracing::info!(backup = %id, agent = %agent_name, "backup deleted");
            Ok(Action::await_change())
        }
        Err(e) if e.kind == AgentErrorKind::FailedPrecondition => {
            // Incrementals depend on it (or it is being restored): keep the finalizer, say
            // why, look again later.
            let msg = format!("deletion held back: {}", e.message);
            set_backup(api, &vb.name_any(), |s| s.message = Some(msg.clone())).await?;
            Err(ReconcileError::Agent {
                agent: agent_name,
                op: "DeleteBackup",
                source: e,
            })
        }
        Err(e) => Err(ReconcileError::Agent {
            agent: agent_name,
            op: "DeleteBackup",
            source: e,
        }),
    }
}

// ---------------------------------------------------------------------------------------
// VolumeRestore

async fn set_restore(
    api: &Api<VolumeRestore>,
    name: &str,
    f: impl Fn(&mut VolumeRestoreStatus),
) -> Result<VolumeRestore, KubeError> {
    update_status(api, name, |o: &mut VolumeRestore| {
        let st = o.status.get_or_insert_with(VolumeRestoreStatus::default);
        f(st);
    })
    .await
}

async fn reconcile_restore(
    vr: Arc<VolumeRestore>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let ns = vr.namespace().unwrap_or_default();
    let api: Api<VolumeRestore> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, vr, |event| async {
        match event {
            Event::Apply(vr) => apply_restore(&api, &vr, &ctx).await,
            Event::Cleanup(vr) => cleanup_restore(&vr, &ctx).await,
        }
    })
    .await
    .map_err(|e| ReconcileError::Finalizer(Box::new(e)))
}

/// The backup a restore reads: `(id, agent that made it, volume size)`, or why not yet /
/// never (`Err((reason, final))`).
async fn restore_source(
    vr: &VolumeRestore,
    ctx: &Context,
) -> Result<Result<(String, Option<String>, u64), (String, bool)>, ReconcileError> {
    let ns = vr.namespace().unwrap_or_default();
    match (&vr.spec.backup_name, &vr.spec.backup_id) {
        (Some(name), None) => {
            let vbs: Api<VolumeBackup> = Api::namespaced(ctx.client.clone(), &ns);
            let Some(vb) = vbs
                .get_opt(name)
                .await
                .map_err(KubeError::api(format!("get VolumeBackup {name}")))?
            else {
                return Ok(Err((format!("VolumeBackup {name} not found"), false)));
            };
            let st = vb_status(&vb);
            match (st.phase, st.backup_id, st.size_bytes) {
                (Some(BackupPhase::Completed), Some(id), Some(size)) => {
                    Ok(Ok((id, st.agent, size)))
                }
                (Some(BackupPhase::Failed), _, _) => {
                    Ok(Err((format!("VolumeBackup {name} failed"), true)))
                }
                _ => Ok(Err((
                    format!("waiting for VolumeBackup {name} to complete"),
                    false,
                ))),
            }
        }
        (None, Some(id)) => {
            // Ask every agent until one has it.
            for agent_name in ctx.controller.agent_names() {
                let agent = ctx.agent(&agent_name).await?;
                if let Ok(b) = agent.get_backup(id).await {
                    return Ok(Ok((b.id, Some(agent_name), b.volume_size)));
                }
            }
            Ok(Err((format!("no agent knows backup {id}"), false)))
        }
        _ => Ok(Err((
            "give exactly one of backupName and backupId".to_owned(),
            true,
        ))),
    }
}

async fn apply_restore(
    api: &Api<VolumeRestore>,
    vr: &VolumeRestore,
    ctx: &Context,
) -> Result<Action, ReconcileError> {
    let name_owned = vr.name_any();
    let name = name_owned.as_str();
    let ns = vr.namespace().unwrap_or_default();
    let st = vr.status.clone().unwrap_or_default();
    let fail = |msg: String| async move {
        set_restore(api, name, |s| {
            s.phase = Some(RestorePhase::Failed);
            s.message = Some(msg.clone());
        })
        .await
        .map(|_| Action::await_change())
        .map_err(ReconcileError::from)
    };
    match st.phase {
        Some(RestorePhase::Completed | RestorePhase::Failed) => return Ok(Action::await_change()),
        Some(RestorePhase::Binding) => return bind_restore(api, vr, ctx).await,
        Some(RestorePhase::Pending | RestorePhase::Creating | RestorePhase::Restoring) | None => {}
    }
    let (backup, _made_by, backup_size) = match restore_source(vr, ctx).await? {
        Ok(s) => s,
        Err((reason, true)) => return fail(reason).await,
        Err((reason, false)) => {
            set_restore(api, name, |s| {
                s.phase = Some(RestorePhase::Pending);
                s.message = Some(reason.clone());
            })
            .await?;
            return Ok(Action::requeue(Duration::from_secs(3)));
        }
    };
    let scs: Api<StorageClass> = Api::all(ctx.client.clone());
    let Some(sc) = scs
        .get_opt(&vr.spec.storage_class_name)
        .await
        .map_err(KubeError::api("get StorageClass"))?
    else {
        return fail(format!(
            "StorageClass {} not found",
            vr.spec.storage_class_name
        ))
        .await;
    };
    if sc.provisioner != DRIVER_NAME {
        return fail(format!(
            "StorageClass {} is provisioned by {}, not {DRIVER_NAME}",
            vr.spec.storage_class_name, sc.provisioner
        ))
        .await;
    }
    let wanted = match vr.spec.size.as_deref().map(str::parse::<Bytes>) {
        None => Bytes(backup_size),
        Some(Ok(b)) => b.max(Bytes(backup_size)),
        Some(Err(e)) => return fail(e.to_string()).await,
    };
    let Some(volume_name) = restore_volume_name(vr) else {
        return Ok(Action::await_change());
    };
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    if let Some(existing) = pvcs
        .get_opt(&vr.spec.pvc_name)
        .await
        .map_err(KubeError::api("get PVC"))?
    {
        let ours = existing
            .annotations()
            .get(RESTORED_FROM)
            .is_some_and(|b| *b == backup);
        if !ours {
            return fail(format!("PVC {} already exists", vr.spec.pvc_name)).await;
        }
    }
    set_restore(api, name, |s| {
        s.phase = Some(RestorePhase::Creating);
        s.backup_id = Some(backup.clone());
        s.message = None;
    })
    .await?;
    // The controller's own CreateVolume: scheduler, type from the StorageClass, idempotent
    // by name.
    let parameters: BTreeMap<String, String> = sc.parameters.clone().unwrap_or_default();
    let fs = parameters
        .get("csi.storage.k8s.io/fstype")
        .cloned()
        .unwrap_or_else(|| "ext4".to_owned());
    let volume = match ctx
        .controller
        .create_volume(CreateVolume {
            name: volume_name,
            capacity: CapacityRange {
                required: Some(wanted),
                limit: None,
            },
            capabilities: vec![Capability {
                access: Access::Mount { fs: fs.clone() },
                mode: AccessMode::SingleNodeWriter,
            }],
            parameters: parameters
                .iter()
                .filter(|(k, _)| !k.starts_with("csi.storage.k8s.io/"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            mutable_parameters: BTreeMap::new(),
            source: None,
            zones: Zones::default(),
        })
        .await
    {
        Ok(v) => v,
        Err(
            e @ (ControllerError::InvalidArgument(_)
            | ControllerError::UnknownVolumeType(_)
            | ControllerError::NoValidPool { .. }
            | ControllerError::OutOfRange(_)
            | ControllerError::AlreadyExists { .. }),
        ) => return fail(crate::logging::error_chain(&e)).await,
        Err(e) => return Err(e.into()),
    };
    let vid = volume.id.to_string();
    set_restore(api, name, |s| {
        s.phase = Some(RestorePhase::Restoring);
        s.volume_id = Some(vid.clone());
        s.progress.get_or_insert_with(|| "0%".into());
    })
    .await?;
    let agent = ctx.agent(&volume.agent).await?;
    let outcome = match agent.restore_backup(&backup, &vid).await {
        Ok(stream) => {
            follow(stream, |done, total, _| {
                let progress = percent(done, total);
                async move {
                    set_restore(api, name, |s| s.progress = Some(progress.clone()))
                        .await
                        .map(drop)
                }
            })
            .await?
        }
        Err(e) => Err(e),
    };
    match outcome {
        Ok(_) => {}
        Err(e) if retryable(e.kind) => {
            return Err(ReconcileError::Agent {
                agent: volume.agent.clone(),
                op: "RestoreBackup",
                source: e,
            })
        }
        Err(e) => return fail(format!("restore on agent {}: {}", volume.agent, e.message)).await,
    }
    tracing::info!(volumerestore = %format!("{ns}/{name}"), backup = %backup, volume = %vid, "backup restored");
    // The PV, with what CreateVolume would have given the external-provisioner.
    let pb = crate::csi::controller::volume_to_pb(&volume);
    let pv_name = format!("cinderblock-{volume_name_suffix}", volume_name_suffix = vid);
    let zone = pb
        .accessible_topology
        .first()
        .and_then(|t| t.segments.get(TOPOLOGY_ZONE_KEY).cloned());
    let size = Quantity(
        Bytes(u64::try_from(pb.capacity_bytes).unwrap_or(0))
            .get()
            .to_string(),
    );
    let pv = PersistentVolume {
        metadata: ObjectMeta {
            name: Some(pv_name.clone()),
            annotations: Some(BTreeMap::from([
                (
                    "pv.kubernetes.io/provisioned-by".to_owned(),
                    DRIVER_NAME.to_owned(),
                ),
                (RESTORED_FROM.to_owned(), backup.clone()),
            ])),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeSpec {
            capacity: Some(BTreeMap::from([("storage".to_owned(), size.clone())])),
            access_modes: Some(vec!["ReadWriteOnce".to_owned()]),
            persistent_volume_reclaim_policy: Some(
                sc.reclaim_policy.clone().unwrap_or_else(|| "Delete".into()),
            ),
            storage_class_name: Some(vr.spec.storage_class_name.clone()),
            volume_mode: Some("Filesystem".to_owned()),
            csi: Some(CSIPersistentVolumeSource {
                driver: DRIVER_NAME.to_owned(),
                volume_handle: pb.volume_id.clone(),
                fs_type: Some(fs),
                volume_attributes: Some(pb.volume_context.clone().into_iter().collect())
                    .filter(|m: &BTreeMap<String, String>| !m.is_empty()),
                ..CSIPersistentVolumeSource::default()
            }),
            node_affinity: zone.map(|z| VolumeNodeAffinity {
                required: Some(NodeSelector {
                    node_selector_terms: vec![NodeSelectorTerm {
                        match_expressions: Some(vec![NodeSelectorRequirement {
                            key: TOPOLOGY_ZONE_KEY.to_owned(),
                            operator: "In".to_owned(),
                            values: Some(vec![z]),
                        }]),
                        ..NodeSelectorTerm::default()
                    }],
                }),
            }),
            claim_ref: Some(ObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("PersistentVolumeClaim".to_owned()),
                namespace: Some(ns.clone()),
                name: Some(vr.spec.pvc_name.clone()),
                ..ObjectReference::default()
            }),
            ..PersistentVolumeSpec::default()
        }),
        status: None,
    };
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    create_if_missing(&pvs, &pv, &pv_name).await?;
    let pvc = PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(vr.spec.pvc_name.clone()),
            namespace: Some(ns.clone()),
            annotations: Some(BTreeMap::from([(RESTORED_FROM.to_owned(), backup.clone())])),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".to_owned()]),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".to_owned(), size)])),
                ..VolumeResourceRequirements::default()
            }),
            storage_class_name: Some(vr.spec.storage_class_name.clone()),
            volume_mode: Some("Filesystem".to_owned()),
            volume_name: Some(pv_name.clone()),
            ..PersistentVolumeClaimSpec::default()
        }),
        status: None,
    };
    create_if_missing(&pvcs, &pvc, &vr.spec.pvc_name).await?;
    set_restore(api, name, |s| {
        s.phase = Some(RestorePhase::Binding);
        s.pv_name = Some(pv_name.clone());
        s.progress = Some("100%".into());
        s.message = Some(format!("waiting for PVC {} to bind", vr.spec.pvc_name));
    })
    .await?;
    Ok(Action::requeue(Duration::from_secs(2)))
}

async fn create_if_missing<K>(api: &Api<K>, obj: &K, name: &str) -> Result<(), KubeError>
where
    K: Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    match api.create(&PostParams::default(), obj).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(KubeError::api(format!("create {name}"))(e)),
    }
}

async fn bind_restore(
    api: &Api<VolumeRestore>,
    vr: &VolumeRestore,
    ctx: &Context,
) -> Result<Action, ReconcileError> {
    let ns = vr.namespace().unwrap_or_default();
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    let phase = pvcs
        .get_opt(&vr.spec.pvc_name)
        .await
        .map_err(KubeError::api("get PVC"))?
        .and_then(|p| p.status)
        .and_then(|s| s.phase);
    if phase.as_deref() == Some("Bound") {
        set_restore(api, &vr.name_any(), |s| {
            s.phase = Some(RestorePhase::Completed);
            s.message = None;
        })
        .await?;
        tracing::info!(volumerestore = %format!("{ns}/{}", vr.name_any()), pvc = %vr.spec.pvc_name, "restored PVC bound");
        return Ok(Action::await_change());
    }
    Ok(Action::requeue(Duration::from_secs(2)))
}

/// Deleting an unfinished restore deletes the volume it made (a finished one belongs to its
/// PV now).
async fn cleanup_restore(vr: &VolumeRestore, ctx: &Context) -> Result<Action, ReconcileError> {
    let st = vr.status.clone().unwrap_or_default();
    let unfinished = !matches!(
        st.phase,
        Some(RestorePhase::Binding | RestorePhase::Completed)
    );
    if let (true, Some(v)) = (unfinished, st.volume_id) {
        match ctx.controller.delete_volume(&v).await {
            Ok(()) | Err(ControllerError::VolumeNotFound(_)) => {
                tracing::info!(volume = %v, "unfinished restore deleted with its volume");
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Action::await_change())
}

// ---------------------------------------------------------------------------------------
// Running

fn error_policy<K>(_obj: Arc<K>, e: &ReconcileError, _ctx: Arc<Context>) -> Action {
    tracing::warn!(error = %crate::logging::error_chain(e), "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(3))
}

/// Runs both reconcilers while this replica leads; stops them when it stops leading and
/// starts them again at its next term, until `shutdown`.
pub async fn run(ctx: Arc<Context>, leadership: Leadership, shutdown: CancellationToken) {
    while let Some(term) = leadership.term(&shutdown).await {
        tracing::info!("VolumeBackup/VolumeRestore reconcilers started (leader)");
        let backups = Runtime::new(
            Api::<VolumeBackup>::all(ctx.client.clone()),
            watcher::Config::default(),
        )
        .graceful_shutdown_on(term.clone().cancelled_owned())
        .run(reconcile_backup, error_policy, ctx.clone())
        .for_each(|_| async {});
        let restores = Runtime::new(
            Api::<VolumeRestore>::all(ctx.client.clone()),
            watcher::Config::default(),
        )
        .graceful_shutdown_on(term.clone().cancelled_owned())
        .run(reconcile_restore, error_policy, ctx.clone())
        .for_each(|_| async {});
        tokio::join!(backups, restores);
        tracing::info!("VolumeBackup/VolumeRestore reconcilers stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_and_durations() {
        let cases = [(0, 0, "0%"), (1, 3, "33%"), (3, 3, "100%"), (5, 3, "100%")];
        for (d, t, want) in cases {
            assert_eq!(percent(d, t), want);
        }
        let cases = [(-1, "0s"), (45, "45s"), (192, "3m12s"), (7500, "2h5m")];
        for (s, want) in cases {
            assert_eq!(duration_text(s), want);
        }
    }

    #[test]
    fn completion_sets_every_figure() {
        let start: Timestamp = "2026-11-02T10:00:00Z".parse().expect("time");
        let now: Timestamp = "2026-11-02T10:01:12Z".parse().expect("time");
        let running = VolumeBackupStatus {
            phase: Some(BackupPhase::Running),
            progress: Some("40%".into()),
            start_time: Some(Time(start)),
            message: Some("old".into()),
            ..VolumeBackupStatus::default()
        };
        let done = completed(running, 1 << 30, 3 << 20, "", now);
        assert_eq!(
            done,
            VolumeBackupStatus {
                phase: Some(BackupPhase::Completed),
                progress: Some("100%".into()),
                size_bytes: Some(1 << 30),
                size: Some("1Gi".into()),
                stored_bytes: Some(3 << 20),
                stored: Some("3Mi".into()),
                start_time: Some(Time(start)),
                completion_time: Some(Time(now)),
                duration: Some("1m12s".into()),
                ..VolumeBackupStatus::default()
            }
        );
        assert_eq!(
            completed(VolumeBackupStatus::default(), 1, 1, "p", now).parent_id,
            Some("p".into())
        );
    }

    #[test]
    fn retry_table() {
        use AgentErrorKind as K;
        let retried: Vec<K> = [
            K::InvalidArgument,
            K::NotFound,
            K::AlreadyExists,
            K::FailedPrecondition,
            K::OutOfRange,
            K::ResourceExhausted,
            K::Aborted,
            K::Unavailable,
            K::DeadlineExceeded,
            K::Internal,
            K::Unknown,
        ]
        .into_iter()
        .filter(|k| retryable(*k))
        .collect();
        assert_eq!(
            retried,
            vec![K::Aborted, K::Unavailable, K::DeadlineExceeded, K::Unknown]
        );
    }
}
