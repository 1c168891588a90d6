//! Cinderblock's custom resources (group `cinderblock.dev`, version `v1alpha1`):
//!
//! - [`StoragePool`] (cluster-scoped): one per agent pool, written by the agent (spec at
//!   start, status at every heartbeat); `kubectl get storagepools` reads like Cinder's
//!   `get-pools`. The controller discovers agents from them.
//! - [`VolumeBackup`] (namespaced): a backup of a PVC's volume, made by the agent holding it.
//! - [`VolumeRestore`] (namespaced): a new PVC bound to a volume restored from a backup.
//!
//! The OpenAPI schemas are derived from these types (`cinderblock crds` prints them), so the
//! apiserver rejects a spec with a missing required field, a wrong type or an unknown enum
//! value before any reconciler sees it.

// Clippy's `duplicated_attributes` reads each `printcolumn(type_ = "string", ...)` of the
// `#[kube]` derive as a repeated attribute; they are separate columns.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of every Cinderblock resource.
pub const GROUP: &str = "cinderblock.dev";

// ---------------------------------------------------------------------------------------
// StoragePool

/// One pool of one storage agent, as the agent registers it.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "cinderblock.dev",
    version = "v1alpha1",
    kind = "StoragePool",
    plural = "storagepools",
    shortname = "sp",
    category = "cinderblock",
    status = "StoragePoolStatus",
    doc = "A pool of a Cinderblock storage agent (Cinder's host@backend#pool), registered and heartbeated by the agent.",
    printcolumn(name = "Zone", type_ = "string", json_path = ".spec.zone"),
    printcolumn(name = "Backend", type_ = "string", json_path = ".spec.backend"),
    printcolumn(name = "Total", type_ = "string", json_path = ".status.capacity.total"),
    printcolumn(name = "Free", type_ = "string", json_path = ".status.capacity.free"),
    printcolumn(
        name = "Provisioned",
        type_ = "string",
        json_path = ".status.capacity.provisioned"
    ),
    printcolumn(name = "Volumes", type_ = "integer", json_path = ".status.volumeCount"),
    printcolumn(name = "Health", type_ = "string", json_path = ".status.health"),
    printcolumn(
        name = "Heartbeat",
        type_ = "date",
        json_path = ".status.lastHeartbeat",
        priority = 1
    ),
    printcolumn(
        name = "Endpoint",
        type_ = "string",
        json_path = ".spec.endpoint",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct StoragePoolSpec {
    /// The agent's name (unique in the cluster).
    pub agent: String,
    /// Where the agent API is reached (`tcp://host:port` or `unix:///path`).
    pub endpoint: String,
    /// The pool's name on its agent.
    pub pool: String,
    /// Availability zone (`topology.cinderblock.dev/zone`).
    pub zone: String,
    /// What backs the pool.
    pub backend: PoolBackend,
    /// The Kubernetes node the agent runs on, when it knows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// Capabilities matched against volume types' extra specs.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub capabilities: BTreeMap<String, String>,
}

/// What backs a pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum PoolBackend {
    /// Thick logical volumes.
    #[serde(rename = "lvm-thick")]
    LvmThick,
    /// Thin logical volumes.
    #[serde(rename = "lvm-thin")]
    LvmThin,
    /// Sparse files.
    #[serde(rename = "file")]
    File,
    /// Not reported.
    #[serde(rename = "unknown")]
    Unknown,
}

/// A pool's health.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum PoolHealth {
    /// The pool can be read and used.
    Healthy,
    /// The pool cannot be read (`unhealthyReason` says why).
    Unhealthy,
}

/// What the agent last reported about a pool.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StoragePoolStatus {
    /// Capacity as Cinder reports it.
    #[serde(default)]
    pub capacity: PoolCapacity,
    /// Volumes in the pool.
    #[serde(default)]
    pub volume_count: u64,
    /// Snapshots in the pool.
    #[serde(default)]
    pub snapshot_count: u64,
    /// Thin volumes possible.
    #[serde(default)]
    pub thin_provisioning: bool,
    /// Thick volumes possible.
    #[serde(default)]
    pub thick_provisioning: bool,
    /// Percentage of the total kept free.
    #[serde(default)]
    pub reserved_percentage: u8,
    /// Thin over-subscription limit.
    #[serde(default)]
    pub max_over_subscription_ratio: f64,
    /// iSCSI portals of the pool's exports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub portals: Vec<String>,
    /// Healthy or not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<PoolHealth>,
    /// Why the pool is unhealthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy_reason: Option<String>,
    /// When the agent last wrote this status; the controller ignores pools whose heartbeat is
    /// older than its `[kubernetes] pool_stale_after_secs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<Time>,
}

/// Capacity figures: bytes for programs, binary-unit texts for `kubectl get`. A capacity the
/// backend cannot tell has no byte figure and the text `unknown` (or `infinite`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolCapacity {
    /// Total bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_bytes: Option<u64>,
    /// Free bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_bytes: Option<u64>,
    /// Sum of the virtual sizes of volumes and snapshots.
    #[serde(default)]
    pub provisioned_bytes: u64,
    /// Bytes really allocated.
    #[serde(default)]
    pub allocated_bytes: u64,
    /// Total, e.g. `12Gi`.
    #[serde(default)]
    pub total: String,
    /// Free, e.g. `11.5Gi`.
    #[serde(default)]
    pub free: String,
    /// Provisioned, e.g. `500Mi`.
    #[serde(default)]
    pub provisioned: String,
}

// ---------------------------------------------------------------------------------------
// VolumeBackup

/// A backup of the volume behind a PVC, stored in a repository of the agent holding it.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "cinderblock.dev",
    version = "v1alpha1",
    kind = "VolumeBackup",
    plural = "volumebackups",
    shortname = "vb",
    category = "cinderblock",
    namespaced,
    status = "VolumeBackupStatus",
    doc = "A backup (Cinder's backup) of the volume bound to a PersistentVolumeClaim.",
    printcolumn(name = "PVC", type_ = "string", json_path = ".spec.pvcName"),
    printcolumn(
        name = "Incremental",
        type_ = "boolean",
        json_path = ".spec.incremental"
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Progress", type_ = "string", json_path = ".status.progress"),
    printcolumn(name = "Size", type_ = "string", json_path = ".status.size"),
    printcolumn(name = "Stored", type_ = "string", json_path = ".status.stored"),
    printcolumn(name = "Duration", type_ = "string", json_path = ".status.duration"),
    printcolumn(
        name = "Backup",
        type_ = "string",
        json_path = ".status.backupId",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct VolumeBackupSpec {
    /// The PVC (in this namespace) whose volume is backed up; it must be bound to a
    /// Cinderblock volume.
    #[schemars(length(min = 1, max = 253))]
    pub pvc_name: String,
    /// Store only what changed since the volume's latest backup in the repository.
    #[serde(default)]
    pub incremental: bool,
    /// The agent's repository; empty: the agent's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// Back up a volume in use (crash-consistent, through a temporary snapshot).
    #[serde(default)]
    pub force: bool,
    /// What deleting this object does to the backup in the repository.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// What deleting a VolumeBackup does to the stored backup.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum DeletionPolicy {
    /// The backup is deleted from its repository (refused while incrementals depend on it).
    #[default]
    Delete,
    /// The backup stays in its repository.
    Retain,
}

/// Where a backup is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum BackupPhase {
    /// Accepted, not started (waiting for the PVC to be bound, or for the agent).
    Pending,
    /// The agent is copying.
    Running,
    /// Complete: restorable.
    Completed,
    /// Failed (`message` says why); a new VolumeBackup is needed.
    Failed,
}

/// What the controller last observed of a backup.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeBackupStatus {
    /// Where the backup is in its life.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<BackupPhase>,
    /// The agent's backup id (derived from this object's UID).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_id: Option<String>,
    /// The backed-up volume (the PV's volume handle).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_id: Option<String>,
    /// The agent holding the volume (and making the backup).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// The repository the backup is in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// The backup an incremental one builds on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
    /// Percentage of the volume covered, e.g. `42%`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// Size of the backed-up volume in bytes (what a restore needs at least).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// Bytes written to the repository (compressed, new chunks only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_bytes: Option<u64>,
    /// `size_bytes` in binary units.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
    /// `stored_bytes` in binary units.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored: Option<String>,
    /// When the agent started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the backup completed or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// From start to completion, e.g. `1m12s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
    /// Why it failed, or why deletion is held back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

// ---------------------------------------------------------------------------------------
// VolumeRestore

/// A new PVC bound to a new volume restored from a backup.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "cinderblock.dev",
    version = "v1alpha1",
    kind = "VolumeRestore",
    plural = "volumerestores",
    shortname = "vr",
    category = "cinderblock",
    namespaced,
    status = "VolumeRestoreStatus",
    doc = "Restores a Cinderblock backup into a new volume, bound to a new PersistentVolumeClaim.",
    printcolumn(name = "Backup", type_ = "string", json_path = ".spec.backupName"),
    printcolumn(name = "PVC", type_ = "string", json_path = ".spec.pvcName"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Progress", type_ = "string", json_path = ".status.progress"),
    printcolumn(name = "PV", type_ = "string", json_path = ".status.pvName"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct VolumeRestoreSpec {
    /// A VolumeBackup in this namespace (its backup id is used).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_name: Option<String>,
    /// Or a backup id directly (a backup made elsewhere, e.g. imported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_id: Option<String>,
    /// The PVC to create (in this namespace); it must not exist.
    #[schemars(length(min = 1, max = 253))]
    pub pvc_name: String,
    /// StorageClass of the new PVC and PV; its `type` parameter picks the volume type.
    #[schemars(length(min = 1, max = 253))]
    pub storage_class_name: String,
    /// Size of the new volume (a quantity such as `10Gi`); default and minimum: the backup's
    /// volume size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
}

/// Where a restore is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RestorePhase {
    /// Accepted, not started.
    Pending,
    /// The target volume is being created.
    Creating,
    /// The agent is writing the backup into the volume.
    Restoring,
    /// The PV and PVC exist; waiting for Kubernetes to bind them.
    Binding,
    /// The PVC is bound to the restored volume.
    Completed,
    /// Failed (`message` says why).
    Failed,
}

/// What the controller last observed of a restore.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeRestoreStatus {
    /// Where the restore is in its life.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RestorePhase>,
    /// The backup restored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_id: Option<String>,
    /// The new volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_id: Option<String>,
    /// The PV made for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pv_name: Option<String>,
    /// Percentage restored, e.g. `42%`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// Why it failed, or what it waits for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

// ---------------------------------------------------------------------------------------
// CRD documents

/// The CRDs of every Cinderblock resource, in a fixed order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    use kube::CustomResourceExt;
    let mut crds = vec![
        StoragePool::crd(),
        VolumeBackup::crd(),
        VolumeRestore::crd(),
    ];
    for crd in &mut crds {
        for v in &mut crd.spec.versions {
            let status = v
                .schema
                .as_mut()
                .and_then(|s| s.open_api_v3_schema.as_mut())
                .and_then(|s| s.properties.as_mut())
                .and_then(|p| p.get_mut("status"));
            if let Some(status) = status {
                strip_defaults(status);
            }
        }
    }
    crds
}

/// Removes every `default` under a status schema: only Cinderblock writes statuses, always
/// whole, so defaults there serve nothing, and the 1.20 apiserver rejects the empty-string
/// defaults the derived schema would carry ("must be of type string: null").
fn strip_defaults(
    schema: &mut k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaProps,
) {
    schema.default = None;
    for p in schema.properties.iter_mut().flat_map(|m| m.values_mut()) {
        strip_defaults(p);
    }
}

/// Errors of rendering the CRDs.
#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    /// A CRD could not be written as YAML.
    #[error("cannot render CRD {name} as YAML")]
    Yaml {
        /// The CRD.
        name: String,
        /// The serializer's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Header of the rendered CRD file.
const CRD_HEADER: &str = "# Generated by `cinderblock crds` from src/k8s/crd.rs: do not edit.\n";

/// Every CRD as one YAML stream (`---` between documents), as `cinderblock crds` prints it
/// and `deploy/helm/cinderblock/crds/cinderblock.dev.yaml` holds it.
pub fn crds_yaml() -> Result<String, CrdError> {
    let mut out = String::from(CRD_HEADER);
    for crd in crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let text = serde_saphyr::to_string(&crd).map_err(|e| CrdError::Yaml {
            name,
            source: Box::new(e),
        })?;
        out.push_str("---\n");
        out.push_str(&text);
        if !text.ends_with('\n') {
            out.push('\n');
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema_of(crd: &CustomResourceDefinition) -> serde_json::Value {
        serde_json::to_value(
            crd.spec.versions[0]
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref())
                .expect("schema"),
        )
        .expect("json")
    }

    #[test]
    fn crd_names_scopes_and_columns() {
        let got: Vec<(String, String, Vec<String>)> = crds()
            .iter()
            .map(|c| {
                let cols = c.spec.versions[0]
                    .additional_printer_columns
                    .as_ref()
                    .map(|v| {
                        v.iter()
                            .filter(|c| c.priority.unwrap_or(0) == 0)
                            .map(|c| c.name.to_uppercase())
                            .collect()
                    })
                    .unwrap_or_default();
                (
                    c.metadata.name.clone().unwrap_or_default(),
                    c.spec.scope.clone(),
                    cols,
                )
            })
            .collect();
        let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            got,
            vec![
                (
                    "storagepools.cinderblock.dev".to_owned(),
                    "Cluster".to_owned(),
                    s(&[
                        "ZONE",
                        "BACKEND",
                        "TOTAL",
                        "FREE",
                        "PROVISIONED",
                        "VOLUMES",
                        "HEALTH",
                        "AGE"
                    ])
                ),
                (
                    "volumebackups.cinderblock.dev".to_owned(),
                    "Namespaced".to_owned(),
                    s(&[
                        "PVC",
                        "INCREMENTAL",
                        "PHASE",
                        "PROGRESS",
                        "SIZE",
                        "STORED",
                        "DURATION",
                        "AGE"
                    ])
                ),
                (
                    "volumerestores.cinderblock.dev".to_owned(),
                    "Namespaced".to_owned(),
                    s(&["BACKUP", "PVC", "PHASE", "PROGRESS", "PV", "AGE"])
                ),
            ]
        );
    }

    #[test]
    fn backup_schema_requires_pvc_name_and_closes_enums() {
        let crds = crds();
        let schema = schema_of(&crds[1]);
        let spec = &schema["properties"]["spec"];
        assert_eq!(spec["required"], serde_json::json!(["pvcName"]));
        assert_eq!(spec["properties"]["pvcName"]["minLength"], 1);
        assert_eq!(
            spec["properties"]["deletionPolicy"]["enum"],
            serde_json::json!(["Delete", "Retain"])
        );
        assert_eq!(
            schema["properties"]["status"]["properties"]["phase"]["enum"],
            serde_json::json!(["Pending", "Running", "Completed", "Failed"])
        );
        // The status is a subresource: the controller's writes cannot touch the spec.
        assert!(crds[1].spec.versions[0]
            .subresources
            .as_ref()
            .and_then(|s| s.status.as_ref())
            .is_some());
    }

    /// The chart's CRD file is `cinderblock crds` output: regenerate it after changing a type.
    #[test]
    fn committed_crd_file_is_current() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/helm/cinderblock/crds/cinderblock.dev.yaml"
        );
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == crds_yaml().expect("yaml"),
            "{path} is stale: run `cargo run -- crds > deploy/helm/cinderblock/crds/cinderblock.dev.yaml`"
        );
    }

    #[test]
    fn yaml_has_three_documents_and_round_trips() {
        let text = crds_yaml().expect("yaml");
        assert!(text.starts_with(CRD_HEADER));
        let body = text
            .trim_start_matches(CRD_HEADER)
            .trim_start_matches("---\n");
        let parsed: Vec<CustomResourceDefinition> = body
            .split("\n---\n")
            .map(|d| serde_saphyr::from_str(d).expect("parse back"))
            .collect();
        assert_eq!(parsed.len(), 3, "{text}");
        assert_eq!(parsed, crds());
    }
}
