//! The controller's domain types: requests as the CSI edge parses them, identifiers derived
//! from CSI names, node ids, StorageClass parameters and the metadata kept with each volume.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use uuid::Uuid;

use super::{CinderStatus, ControllerError, SnapshotStatus};
use crate::agent::{Iqn, SnapshotId, VolumeId};
use crate::types::Bytes;

/// Namespace of the UUIDv5 ids derived from CSI names. Fixed forever: changing it would give
/// every existing volume a new id.
pub const ID_NAMESPACE: Uuid = Uuid::from_u128(0x6c1b_0a4e_2f7d_5c39_9e51_c1d3_b10c_b10c);

/// The volume id of the CSI volume called `name`: the same on every replica and after
/// restarts, so a retried or raced CreateVolume finds the same volume without a database.
pub fn volume_id_for(name: &str) -> VolumeId {
    let id = Uuid::new_v5(&ID_NAMESPACE, format!("volume:{name}").as_bytes());
    // A hyphenated lower-case UUID is always a valid id ([a-z0-9-], 36 characters).
    VolumeId::parse(&id.hyphenated().to_string())
        .unwrap_or_else(|_| unreachable!("a UUID is a valid volume id"))
}

/// The snapshot id of the CSI snapshot called `name` (see [`volume_id_for`]).
pub fn snapshot_id_for(name: &str) -> SnapshotId {
    let id = Uuid::new_v5(&ID_NAMESPACE, format!("snapshot:{name}").as_bytes());
    SnapshotId::parse(&id.hyphenated().to_string())
        .unwrap_or_else(|_| unreachable!("a UUID is a valid snapshot id"))
}

/// A Kubernetes node as the controller knows it: `<host>/<initiator IQN>`, which is what the
/// node service's NodeGetInfo returns as its node id.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct NodeId {
    /// The node's host name (for the agent's logs and for `published_node_ids`).
    pub host: String,
    /// The node's iSCSI initiator name (the export ACL).
    pub iqn: Iqn,
}

impl NodeId {
    /// Parses `<host>/<iqn>`. `None` when malformed: such a node cannot exist, which the
    /// handlers answer as CSI's "node not found".
    pub fn parse(text: &str) -> Option<NodeId> {
        let (host, iqn) = text.split_once('/')?;
        let host_ok = !host.is_empty()
            && host.len() <= 253
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
        if !host_ok {
            return None;
        }
        Some(NodeId {
            host: host.to_owned(),
            iqn: Iqn::parse(iqn).ok()?,
        })
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.host, self.iqn)
    }
}

/// How a volume is accessed.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Access {
    /// A filesystem (`ext4` when the request leaves it empty).
    Mount {
        /// Filesystem type as requested.
        fs: String,
    },
    /// A raw block device.
    Block,
}

/// CSI access modes (all of them, so that support is decided by the domain, not the parser).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AccessMode {
    /// Read-write on one node.
    SingleNodeWriter,
    /// Read-only on one node.
    SingleNodeReaderOnly,
    /// Read-only on many nodes.
    MultiNodeReaderOnly,
    /// Many nodes, one writer.
    MultiNodeSingleWriter,
    /// Read-write on many nodes.
    MultiNodeMultiWriter,
    /// Read-write, one node, one workload.
    SingleNodeSingleWriter,
    /// Read-write, one node, several workloads.
    SingleNodeMultiWriter,
}

impl AccessMode {
    /// The CSI enum name.
    pub fn as_str(self) -> &'static str {
        match self {
            AccessMode::SingleNodeWriter => "SINGLE_NODE_WRITER",
            AccessMode::SingleNodeReaderOnly => "SINGLE_NODE_READER_ONLY",
            AccessMode::MultiNodeReaderOnly => "MULTI_NODE_READER_ONLY",
            AccessMode::MultiNodeSingleWriter => "MULTI_NODE_SINGLE_WRITER",
            AccessMode::MultiNodeMultiWriter => "MULTI_NODE_MULTI_WRITER",
            AccessMode::SingleNodeSingleWriter => "SINGLE_NODE_SINGLE_WRITER",
            AccessMode::SingleNodeMultiWriter => "SINGLE_NODE_MULTI_WRITER",
        }
    }

    /// True when the mode lets several nodes attach the volume at once.
    pub fn is_multi_node(self) -> bool {
        matches!(
            self,
            AccessMode::MultiNodeReaderOnly
                | AccessMode::MultiNodeSingleWriter
                | AccessMode::MultiNodeMultiWriter
        )
    }
}

/// One volume capability: how and from how many nodes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Capability {
    /// Mount or block.
    pub access: Access,
    /// Access mode.
    pub mode: AccessMode,
}

/// Filesystems the node service can make and mount.
pub const SUPPORTED_FS: &[&str] = &["ext4", "xfs"];

impl Capability {
    /// Whether Cinderblock serves this capability for a volume of `vtype`; the reason if not.
    pub fn check(&self, vtype: &VolumeType) -> Result<(), String> {
        if let Access::Mount { fs } = &self.access {
            if !SUPPORTED_FS.contains(&fs.as_str()) {
                return Err(format!(
                    "filesystem {fs:?} is not supported (use {})",
                    SUPPORTED_FS.join(" or ")
                ));
            }
        }
        match self.mode {
            AccessMode::SingleNodeWriter
            | AccessMode::SingleNodeSingleWriter
            | AccessMode::SingleNodeMultiWriter
            | AccessMode::MultiNodeReaderOnly => Ok(()),
            AccessMode::MultiNodeMultiWriter => match (&self.access, vtype.multiattach()) {
                (Access::Block, true) => Ok(()),
                (Access::Block, false) => Err(format!(
                    "MULTI_NODE_MULTI_WRITER needs a volume type with multiattach=\"<is> True\"; \
                     type {:?} has none",
                    vtype.name
                )),
                (Access::Mount { .. }, _) => Err(
                    "MULTI_NODE_MULTI_WRITER is only supported for block volumes (a filesystem \
                     mounted on several nodes would be corrupted)"
                        .to_owned(),
                ),
            },
            AccessMode::SingleNodeReaderOnly | AccessMode::MultiNodeSingleWriter => Err(format!(
                "access mode {} is not supported",
                self.mode.as_str()
            )),
        }
    }

    /// Canonical text, e.g. `mount:ext4/SINGLE_NODE_WRITER` or `block/MULTI_NODE_READER_ONLY`.
    pub fn canonical(&self) -> String {
        match &self.access {
            Access::Mount { fs } => format!("mount:{fs}/{}", self.mode.as_str()),
            Access::Block => format!("block/{}", self.mode.as_str()),
        }
    }
}

/// Canonical text of a set of capabilities (sorted, deduplicated, comma-separated).
pub fn canonical_access(caps: &[Capability]) -> String {
    let set: BTreeSet<String> = caps.iter().map(Capability::canonical).collect();
    set.into_iter().collect::<Vec<_>>().join(",")
}

/// Whether a stored access text (see [`canonical_access`]) lists any mount capability.
pub fn access_has_mount(stored: &str) -> bool {
    stored.split(',').any(|c| c.starts_with("mount:"))
}

/// Whether a stored access text allows several nodes.
pub fn access_is_multi_node(stored: &str) -> bool {
    stored.split(',').any(|c| {
        c.ends_with("/MULTI_NODE_READER_ONLY")
            || c.ends_with("/MULTI_NODE_MULTI_WRITER")
            || c.ends_with("/MULTI_NODE_SINGLE_WRITER")
    })
}

/// CSI's capacity range; `None` = unset (the wire's 0).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CapacityRange {
    /// At least this much.
    pub required: Option<Bytes>,
    /// At most this much.
    pub limit: Option<Bytes>,
}

/// Where a volume must and should be, as zones.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Zones {
    /// One of these (empty = any).
    pub requisite: BTreeSet<String>,
    /// Best first.
    pub preferred: Vec<String>,
}

/// What to pre-populate a new volume from (ids as the CO sent them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ContentSource {
    /// A snapshot id.
    Snapshot(String),
    /// A volume id.
    Volume(String),
}

impl ContentSource {
    /// `snapshot:<id>` / `volume:<id>`.
    pub fn canonical(&self) -> String {
        match self {
            ContentSource::Snapshot(s) => format!("snapshot:{s}"),
            ContentSource::Volume(v) => format!("volume:{v}"),
        }
    }

    /// Parses [`ContentSource::canonical`].
    pub fn from_canonical(s: &str) -> Option<Self> {
        if let Some(id) = s.strip_prefix("snapshot:") {
            return Some(ContentSource::Snapshot(id.to_owned()));
        }
        s.strip_prefix("volume:")
            .map(|id| ContentSource::Volume(id.to_owned()))
    }
}

/// CreateVolume, parsed.
#[derive(Clone, Debug, PartialEq)]
pub struct CreateVolume {
    /// The CO's idempotency key.
    pub name: String,
    /// Size bounds.
    pub capacity: CapacityRange,
    /// At least one capability.
    pub capabilities: Vec<Capability>,
    /// StorageClass parameters.
    pub parameters: BTreeMap<String, String>,
    /// Mutable parameters (win over `parameters`).
    pub mutable_parameters: BTreeMap<String, String>,
    /// Content source.
    pub source: Option<ContentSource>,
    /// Topology requirement.
    pub zones: Zones,
}

/// A volume type: Cinder's named set of extra specs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeType {
    /// Name (the StorageClass `type` parameter).
    pub name: String,
    /// What it is for, for operators.
    pub description: String,
    /// Extra specs matched against pool capabilities.
    pub extra_specs: BTreeMap<String, String>,
}

impl VolumeType {
    /// Cinder's multi-attach rule: the type carries `multiattach="<is> True"`.
    pub fn multiattach(&self) -> bool {
        ["multiattach", "capabilities:multiattach"].iter().any(|k| {
            self.extra_specs.get(*k).is_some_and(|v| {
                let mut words = v.split_whitespace();
                words.next() == Some("<is>")
                    && words.next().is_some_and(|w| w.eq_ignore_ascii_case("true"))
                    && words.next().is_none()
            })
        })
    }
}

/// Parameter key choosing the volume type.
pub const PARAM_TYPE: &str = "type";
/// Parameter key: only agents in this comma-separated list (Cinder's SameBackendFilter).
pub const PARAM_SAME_BACKEND: &str = "sameBackendAs";
/// Parameter key: no agent in this comma-separated list (Cinder's DifferentBackendFilter).
pub const PARAM_DIFFERENT_BACKEND: &str = "differentBackendAs";
/// Prefix of the keys the CSI sidecars add (PVC/PV names, ...): accepted and ignored.
pub const SIDECAR_PREFIX: &str = "csi.storage.k8s.io/";

/// StorageClass parameters, validated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Parameters {
    /// Volume type name (`None` = the default type).
    pub volume_type: Option<String>,
    /// Agents the volume must be on.
    pub same_backend_as: BTreeSet<String>,
    /// Agents the volume must not be on.
    pub different_backend_as: BTreeSet<String>,
    /// The parameters that matter, for the idempotency comparison (sidecar keys removed).
    pub effective: BTreeMap<String, String>,
}

impl Parameters {
    /// Validates `parameters` overlaid with `mutable` (CSI: mutable parameters win).
    pub fn parse(
        parameters: &BTreeMap<String, String>,
        mutable: &BTreeMap<String, String>,
    ) -> Result<Self, ControllerError> {
        let mut out = Parameters::default();
        for (k, v) in parameters.iter().chain(mutable.iter()) {
            if k.starts_with(SIDECAR_PREFIX) {
                continue;
            }
            let agents = || -> BTreeSet<String> {
                v.split(',')
                    .map(str::trim)
                    .filter(|a| !a.is_empty())
                    .map(str::to_owned)
                    .collect()
            };
            match k.as_str() {
                PARAM_TYPE => out.volume_type = Some(v.clone()).filter(|t| !t.is_empty()),
                PARAM_SAME_BACKEND => out.same_backend_as = agents(),
                PARAM_DIFFERENT_BACKEND => out.different_backend_as = agents(),
                _ => {
                    return Err(ControllerError::InvalidArgument(format!(
                        "unknown parameter {k:?} (known: {PARAM_TYPE}, {PARAM_SAME_BACKEND}, \
                         {PARAM_DIFFERENT_BACKEND}, and {SIDECAR_PREFIX}* keys)"
                    )))
                }
            }
            out.effective.insert(k.clone(), v.clone());
        }
        Ok(out)
    }

    /// Canonical text of [`Parameters::effective`] (JSON of a sorted map).
    pub fn canonical(&self) -> String {
        serde_json::to_string(&self.effective).unwrap_or_default()
    }
}

/// Validates snapshot parameters: only the sidecars' keys are accepted.
pub fn check_snapshot_parameters(p: &BTreeMap<String, String>) -> Result<(), ControllerError> {
    match p.keys().find(|k| !k.starts_with(SIDECAR_PREFIX)) {
        Some(k) => Err(ControllerError::InvalidArgument(format!(
            "unknown snapshot parameter {k:?}"
        ))),
        None => Ok(()),
    }
}

/// Metadata keys the controller keeps with each volume on its agent.
pub mod meta {
    /// The CSI name.
    pub const NAME: &str = "csi.name";
    /// Canonical capabilities of CreateVolume.
    pub const ACCESS: &str = "csi.access";
    /// Canonical parameters of CreateVolume.
    pub const PARAMS: &str = "csi.params";
    /// `required:limit` bytes of CreateVolume (0 = unset).
    pub const CAPACITY: &str = "csi.capacity";
    /// Canonical content source of CreateVolume.
    pub const SOURCE: &str = "csi.source";
    /// Set on the target copy while a retype migrates the volume.
    pub const MIGRATION: &str = "csi.migration";
    /// Prefix of `csi.node.<iqn>` = host: the node a publish came from, so that
    /// `published_node_ids` can be rebuilt from the agents after a restart.
    pub const NODE_PREFIX: &str = "csi.node.";
}

/// What the CO asked for when it created a volume: stored with the volume, compared on retry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeSpec {
    /// CSI name.
    pub name: String,
    /// Canonical capabilities.
    pub access: String,
    /// Canonical parameters.
    pub params: String,
    /// Canonical content source (empty = none).
    pub source: String,
    /// Requested range.
    pub capacity: CapacityRange,
}

impl VolumeSpec {
    /// The metadata entries recording this spec.
    pub fn to_metadata(&self) -> BTreeMap<String, String> {
        let n = |b: Option<Bytes>| b.map_or(0, Bytes::get);
        BTreeMap::from([
            (meta::NAME.to_owned(), self.name.clone()),
            (meta::ACCESS.to_owned(), self.access.clone()),
            (meta::PARAMS.to_owned(), self.params.clone()),
            (meta::SOURCE.to_owned(), self.source.clone()),
            (
                meta::CAPACITY.to_owned(),
                format!("{}:{}", n(self.capacity.required), n(self.capacity.limit)),
            ),
        ])
    }

    /// Why an existing volume with `metadata` is not the one this spec asks for, if it is not.
    /// The capacity range is checked against the real size by the caller.
    pub fn mismatch(&self, metadata: &BTreeMap<String, String>) -> Option<String> {
        let get = |k: &str| metadata.get(k).map(String::as_str).unwrap_or("");
        if get(meta::NAME) != self.name {
            return Some(format!(
                "its id belongs to CSI name {:?}",
                metadata.get(meta::NAME)
            ));
        }
        if get(meta::PARAMS) != self.params {
            return Some(format!(
                "it was created with parameters {}, not {}",
                get(meta::PARAMS),
                self.params
            ));
        }
        if get(meta::ACCESS) != self.access {
            return Some(format!(
                "it was created with capabilities [{}], not [{}]",
                get(meta::ACCESS),
                self.access
            ));
        }
        if get(meta::SOURCE) != self.source {
            return Some(format!(
                "it was created from {:?}, not {:?}",
                get(meta::SOURCE),
                self.source
            ));
        }
        None
    }
}

/// A volume as the controller reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct VolumeView {
    /// Volume id.
    pub id: VolumeId,
    /// CSI name, when the volume was made through CSI.
    pub name: Option<String>,
    /// Exact size.
    pub capacity: Bytes,
    /// Agent holding it.
    pub agent: String,
    /// Pool on that agent.
    pub pool: String,
    /// Zone of the pool.
    pub zone: String,
    /// Volume type.
    pub volume_type: String,
    /// Content source.
    pub source: Option<ContentSource>,
    /// Node ids it is published to (`<host>/<iqn>`, or the IQN alone when the host is unknown).
    pub published_nodes: Vec<String>,
    /// The same exports as host and initiator.
    pub attachments: Vec<Attachment>,
    /// Why the volume is abnormal, if it is.
    pub abnormal: Option<String>,
    /// Cinder status.
    pub status: CinderStatus,
    /// Snapshots of it.
    pub snapshot_count: u32,
    /// Creation time, as the agent reports it.
    pub created_at: Option<std::time::SystemTime>,
    /// Metadata stored with the volume (the controller's `csi.*` keys included).
    pub metadata: BTreeMap<String, String>,
}

/// A node a volume is exported to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Attachment {
    /// The node's host name (`None` for an export made outside the controller).
    pub host: Option<String>,
    /// The node's initiator IQN.
    pub initiator: String,
}

/// A snapshot as the controller reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct SnapshotView {
    /// Snapshot id.
    pub id: SnapshotId,
    /// CSI name, when made through CSI.
    pub name: Option<String>,
    /// Origin volume.
    pub source_volume: VolumeId,
    /// Origin size at snapshot time.
    pub size: Bytes,
    /// Creation time.
    pub created_at: Option<std::time::SystemTime>,
    /// Usable as a source.
    pub ready_to_use: bool,
    /// Cinder status.
    pub status: SnapshotStatus,
    /// Agent holding it.
    pub agent: String,
    /// Pool.
    pub pool: String,
}

/// What ControllerPublishVolume hands to the node. Never a secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishInfo {
    /// Portals, comma-separated.
    pub portals: Vec<String>,
    /// Target IQN.
    pub target_iqn: String,
    /// LUN.
    pub lun: u32,
    /// CHAP user name (the node derives the secret from the shared key).
    pub chap_user: String,
}

impl PublishInfo {
    /// The `publish_context` map.
    pub fn to_context(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("portals".to_owned(), self.portals.join(",")),
            ("targetIqn".to_owned(), self.target_iqn.clone()),
            ("lun".to_owned(), self.lun.to_string()),
            ("chapUser".to_owned(), self.chap_user.clone()),
        ])
    }
}

/// One page of a list and the token of the next.
#[derive(Clone, Debug, PartialEq)]
pub struct Page<T> {
    /// The entries.
    pub entries: Vec<T>,
    /// Token of the next page (`None` on the last page).
    pub next_token: Option<String>,
}

/// Pages `items` (already in a stable order): tokens are offsets. `max` 0 = everything.
pub fn paginate<T>(items: Vec<T>, max: usize, token: &str) -> Result<Page<T>, ControllerError> {
    let start = if token.is_empty() {
        0
    } else {
        match token.parse::<usize>() {
            Ok(n) if n <= items.len() => n,
            _ => return Err(ControllerError::BadToken(token.to_owned())),
        }
    };
    let end = if max == 0 {
        items.len()
    } else {
        start.saturating_add(max).min(items.len())
    };
    let next_token = (end < items.len()).then(|| end.to_string());
    let entries = items.into_iter().skip(start).take(end - start).collect();
    Ok(Page {
        entries,
        next_token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_uuids_and_distinct_per_kind() {
        let v = volume_id_for("pvc-1");
        assert_eq!(v, volume_id_for("pvc-1"));
        assert_eq!(v.as_str().len(), 36);
        assert_ne!(v.as_str(), volume_id_for("pvc-2").as_str());
        assert_ne!(v.as_str(), snapshot_id_for("pvc-1").as_str());
        assert_eq!(
            Uuid::parse_str(v.as_str()).map(|u| u.get_version_num()),
            Ok(5)
        );
    }

    #[test]
    fn node_id_table() {
        let cases = [
            ("node-1/iqn.1993-08.org.debian:01:abc", Some("node-1")),
            (
                "n.example.com/iqn.2004-10.com.ubuntu:01:x",
                Some("n.example.com"),
            ),
            ("some-fake-node-id", None),
            ("/iqn.1993-08.org.debian:01:abc", None),
            ("node-1/not-an-iqn", None),
            ("node 1/iqn.1993-08.org.debian:01:abc", None),
        ];
        for (text, host) in cases {
            let got = NodeId::parse(text);
            assert_eq!(got.as_ref().map(|n| n.host.as_str()), host, "{text}");
            if let Some(n) = got {
                assert_eq!(n.to_string(), text);
            }
        }
    }

    fn vtype(specs: &[(&str, &str)]) -> VolumeType {
        VolumeType {
            name: "t".into(),
            description: String::new(),
            extra_specs: specs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn capability_support_table() {
        use AccessMode as M;
        let plain = vtype(&[]);
        let multi = vtype(&[("multiattach", "<is> True")]);
        let mount = |fs: &str| Access::Mount { fs: fs.into() };
        let cases = [
            (mount("ext4"), M::SingleNodeWriter, &plain, true),
            (mount("xfs"), M::SingleNodeSingleWriter, &plain, true),
            (mount("xfs"), M::SingleNodeMultiWriter, &plain, true),
            (mount("btrfs"), M::SingleNodeWriter, &plain, false),
            (mount("ext4"), M::MultiNodeReaderOnly, &plain, true),
            (mount("ext4"), M::MultiNodeMultiWriter, &multi, false),
            (Access::Block, M::MultiNodeMultiWriter, &multi, true),
            (Access::Block, M::MultiNodeMultiWriter, &plain, false),
            (Access::Block, M::MultiNodeSingleWriter, &multi, false),
            (Access::Block, M::SingleNodeReaderOnly, &plain, false),
        ];
        for (access, mode, t, ok) in cases {
            let c = Capability {
                access: access.clone(),
                mode,
            };
            assert_eq!(c.check(t).is_ok(), ok, "{c:?} on {t:?}");
        }
    }

    #[test]
    fn multiattach_spec_table() {
        let cases = [
            (vec![("multiattach", "<is> True")], true),
            (vec![("capabilities:multiattach", "<is> true")], true),
            (vec![("multiattach", "<is> False")], false),
            (vec![("multiattach", "True")], false),
            (vec![], false),
        ];
        for (specs, want) in cases {
            assert_eq!(vtype(&specs).multiattach(), want, "{specs:?}");
        }
    }

    #[test]
    fn parameters_table() {
        let map = |kv: &[(&str, &str)]| -> BTreeMap<String, String> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let p = Parameters::parse(
            &map(&[
                ("type", "gold"),
                ("csi.storage.k8s.io/pvc/name", "data"),
                ("sameBackendAs", "a, b"),
            ]),
            &map(&[("type", "silver")]),
        );
        let p = p.map_err(|e| e.to_string());
        assert_eq!(
            p.as_ref().map(|p| (
                p.volume_type.clone(),
                p.same_backend_as.iter().cloned().collect::<Vec<_>>(),
                p.canonical()
            )),
            Ok((
                Some("silver".to_string()),
                vec!["a".to_string(), "b".to_string()],
                r#"{"sameBackendAs":"a, b","type":"silver"}"#.to_string()
            ))
        );
        assert_eq!(
            Parameters::parse(&map(&[("fsType", "ext4")]), &BTreeMap::new())
                .map_err(|e| e.to_string())
                .map(|_| ()),
            Err(
                "invalid argument: unknown parameter \"fsType\" (known: type, sameBackendAs, \
                 differentBackendAs, and csi.storage.k8s.io/* keys)"
                    .to_string()
            )
        );
    }

    #[test]
    fn paginate_table() {
        let items: Vec<u32> = (0..5).collect();
        // (max, token, entries and next token, or the bad token)
        type Case<'a> = (usize, &'a str, Result<(Vec<u32>, Option<&'a str>), &'a str>);
        let cases: [Case<'_>; 7] = [
            (0, "", Ok((vec![0, 1, 2, 3, 4], None))),
            (2, "", Ok((vec![0, 1], Some("2")))),
            (2, "2", Ok((vec![2, 3], Some("4")))),
            (2, "4", Ok((vec![4], None))),
            (9, "5", Ok((vec![], None))),
            (2, "6", Err("6")),
            (2, "x", Err("x")),
        ];
        for (max, token, want) in cases {
            let got = paginate(items.clone(), max, token);
            let got = match got {
                Ok(p) => Ok((p.entries, p.next_token)),
                Err(ControllerError::BadToken(t)) => Err(t),
                Err(e) => panic!("{e}"),
            };
            let want = want
                .map(|(e, n)| (e, n.map(str::to_owned)))
                .map_err(str::to_owned);
            assert_eq!(got, want, "max {max} token {token:?}");
        }
    }

    #[test]
    fn spec_mismatch_names_the_difference() {
        let spec = VolumeSpec {
            name: "n".into(),
            access: "mount:ext4/SINGLE_NODE_WRITER".into(),
            params: "{}".into(),
            source: String::new(),
            capacity: CapacityRange::default(),
        };
        let md = spec.to_metadata();
        assert_eq!(spec.mismatch(&md), None);
        let other = VolumeSpec {
            access: "block/SINGLE_NODE_WRITER".into(),
            ..spec.clone()
        };
        assert_eq!(
            other.mismatch(&md),
            Some(
                "it was created with capabilities [mount:ext4/SINGLE_NODE_WRITER], not \
                 [block/SINGLE_NODE_WRITER]"
                    .to_string()
            )
        );
    }
}
