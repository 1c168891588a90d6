//! The node's domain types: portals, the `/dev/disk/by-path` name of an iSCSI LUN, what
//! ControllerPublishVolume hands over (publish context), and requests as the CSI edge parses
//! them.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::path::PathBuf;

use super::NodeError;
use crate::agent::chap::ChapCredentials;
use crate::agent::{Iqn, VolumeId};
use crate::controller::AccessMode;
use crate::types::Bytes;

/// The default iSCSI port.
pub const ISCSI_PORT: u16 = 3260;

/// Publish-context key: portals, comma-separated (`addr:port`).
pub const CTX_PORTALS: &str = "portals";
/// Publish-context key: target IQN.
pub const CTX_TARGET: &str = "targetIqn";
/// Publish-context key: LUN number.
pub const CTX_LUN: &str = "lun";
/// Publish-context key: CHAP user name (empty or absent: no CHAP).
pub const CTX_CHAP_USER: &str = "chapUser";

/// NodeStage secret: CHAP user name (overrides the publish context's).
pub const SECRET_CHAP_USER: &str = "chapUser";
/// NodeStage secret: CHAP secret (without it, the secret is derived from `chap_key_file`).
pub const SECRET_CHAP_SECRET: &str = "chapSecret";

/// Where the udev rules of systemd (`path_id`) name iSCSI disks.
pub const BY_PATH_DIR: &str = "/dev/disk/by-path";

/// An iSCSI portal: an address (or host name) and a port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Portal {
    host: String,
    port: u16,
}

impl Portal {
    /// Parses `addr`, `addr:port`, `[v6]`, `[v6]:port` or a bare IPv6 address; the port
    /// defaults to 3260. Host names are `[A-Za-z0-9.-]`.
    pub fn parse(text: &str) -> Result<Portal, String> {
        let bad = |why: &str| format!("portal {text:?}: {why}");
        let t = text.trim();
        let (host, port) = if let Some(rest) = t.strip_prefix('[') {
            let (addr, after) = rest.split_once(']').ok_or_else(|| bad("missing ]"))?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(|| bad("junk after ]"))?),
            };
            addr.parse::<Ipv6Addr>()
                .map_err(|_| bad("not an IPv6 address"))?;
            (addr, port)
        } else if t.parse::<Ipv6Addr>().is_ok() {
            (t, None)
        } else {
            match t.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (t, None),
            }
        };
        let port = match port {
            None => ISCSI_PORT,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 => n,
                _ => return Err(bad("bad port")),
            },
        };
        let host_ok = !host.is_empty()
            && host.len() <= 253
            && (host.parse::<IpAddr>().is_ok()
                || host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-'));
        if !host_ok {
            return Err(bad("bad address"));
        }
        Ok(Portal {
            host: host.to_owned(),
            port,
        })
    }

    /// The address or host name (IPv6 without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    fn is_v6(&self) -> bool {
        self.host.parse::<Ipv6Addr>().is_ok()
    }

    /// As iscsiadm takes and prints it: `addr:port`, `[v6]:port`.
    pub fn iscsiadm(&self) -> String {
        if self.is_v6() {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for Portal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.iscsiadm())
    }
}

/// One LUN of one target through one portal: what a `/dev/disk/by-path` name says.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TargetLun {
    /// The portal.
    pub portal: Portal,
    /// Target name.
    pub target: String,
    /// LUN.
    pub lun: u32,
}

impl TargetLun {
    /// The name udev gives the disk in [`BY_PATH_DIR`], as systemd's `path_id` formats it:
    /// `ip-ADDR:PORT-iscsi-TARGET-lun-N` (IPv6 addresses without brackets; LUNs of 256 and
    /// more in SAM's hexadecimal form).
    pub fn by_path_name(&self) -> String {
        let lun = if self.lun < 256 {
            format!("lun-{}", self.lun)
        } else {
            format!(
                "lun-0x{:04x}{:04x}00000000",
                self.lun & 0xffff,
                (self.lun >> 16) & 0xffff
            )
        };
        format!(
            "ip-{}:{}-iscsi-{}-{lun}",
            self.portal.host, self.portal.port, self.target
        )
    }

    /// The full by-path link.
    pub fn by_path(&self) -> PathBuf {
        PathBuf::from(BY_PATH_DIR).join(self.by_path_name())
    }

    /// Reads a by-path name back (decimal LUNs only: the node only uses small LUNs).
    pub fn parse_by_path_name(name: &str) -> Option<TargetLun> {
        let rest = name.strip_prefix("ip-")?;
        let (portal, rest) = rest.split_once("-iscsi-")?;
        let (target, lun) = rest.rsplit_once("-lun-")?;
        let (host, port) = portal.rsplit_once(':')?;
        let port: u16 = port.parse().ok()?;
        let portal = if host.parse::<Ipv6Addr>().is_ok() {
            Portal::parse(&format!("[{host}]:{port}")).ok()?
        } else {
            Portal::parse(&format!("{host}:{port}")).ok()?
        };
        if target.is_empty() {
            return None;
        }
        Some(TargetLun {
            portal,
            target: target.to_owned(),
            lun: lun.parse().ok()?,
        })
    }

    /// Reads a by-path link path back (`/dev/disk/by-path/NAME`).
    pub fn parse_by_path(path: &str) -> Option<TargetLun> {
        let name = path.strip_prefix(BY_PATH_DIR)?.strip_prefix('/')?;
        Self::parse_by_path_name(name)
    }
}

/// What ControllerPublishVolume returned for this node (`publish_context`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    /// Portals to try, in order.
    pub portals: Vec<Portal>,
    /// The volume's target.
    pub target: Iqn,
    /// Its LUN.
    pub lun: u32,
    /// CHAP user name, when the target requires CHAP.
    pub chap_user: Option<String>,
}

impl Attachment {
    /// Parses a publish context. Every key but `chapUser` is required.
    pub fn from_context(ctx: &BTreeMap<String, String>) -> Result<Attachment, NodeError> {
        let get = |k: &str| {
            ctx.get(k)
                .map(|v| v.trim())
                .filter(|v| !v.is_empty())
                .ok_or_else(|| {
                    NodeError::InvalidArgument(format!("publish_context.{k} is required"))
                })
        };
        let portals = get(CTX_PORTALS)?
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(Portal::parse)
            .collect::<Result<Vec<_>, _>>()
            .map_err(NodeError::InvalidArgument)?;
        let target = Iqn::parse(get(CTX_TARGET)?).map_err(|e| {
            NodeError::InvalidArgument(format!("publish_context.{CTX_TARGET}: {e}"))
        })?;
        let lun = get(CTX_LUN)?.parse().map_err(|_| {
            NodeError::InvalidArgument(format!("publish_context.{CTX_LUN} is not a LUN number"))
        })?;
        let chap_user = ctx
            .get(CTX_CHAP_USER)
            .map(|u| u.trim().to_owned())
            .filter(|u| !u.is_empty());
        Ok(Attachment {
            portals,
            target,
            lun,
            chap_user,
        })
    }

    /// The LUN through `portal`.
    pub fn at(&self, portal: &Portal) -> TargetLun {
        TargetLun {
            portal: portal.clone(),
            target: self.target.to_string(),
            lun: self.lun,
        }
    }
}

/// CHAP credentials from NodeStageVolume's secrets: `chapSecret`, with `chapUser` or else
/// the publish context's user. `None` without a `chapSecret`.
pub fn chap_from_secrets(
    secrets: &BTreeMap<String, String>,
    context_user: Option<&str>,
) -> Result<Option<ChapCredentials>, NodeError> {
    let Some(secret) = secrets.get(SECRET_CHAP_SECRET).filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    let username = secrets
        .get(SECRET_CHAP_USER)
        .map(String::as_str)
        .filter(|u| !u.is_empty())
        .or(context_user)
        .ok_or_else(|| {
            NodeError::InvalidArgument(format!(
                "secrets.{SECRET_CHAP_SECRET} needs a user (secrets.{SECRET_CHAP_USER} or \
                 publish_context.{CTX_CHAP_USER})"
            ))
        })?;
    Ok(Some(ChapCredentials {
        username: username.to_owned(),
        secret: secret.clone(),
    }))
}

/// How a volume is consumed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Access {
    /// A file system, made if the volume is blank, mounted with `flags`.
    Mount {
        /// File system type (`ext4`, `xfs`).
        fs: String,
        /// mount(8) options from the capability.
        flags: Vec<String>,
    },
    /// The raw block device.
    Block,
}

impl Access {
    /// `mount` or `block`, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Access::Mount { .. } => "mount",
            Access::Block => "block",
        }
    }
}

/// True for the access modes that never write.
pub fn mode_is_read_only(mode: AccessMode) -> bool {
    matches!(
        mode,
        AccessMode::SingleNodeReaderOnly | AccessMode::MultiNodeReaderOnly
    )
}

/// NodeStageVolume in domain terms.
#[derive(Clone, Debug)]
pub struct StageRequest {
    /// The volume.
    pub volume: VolumeId,
    /// Where the CO wants it staged (a directory).
    pub staging_path: PathBuf,
    /// Mount or block.
    pub access: Access,
    /// Access mode.
    pub mode: AccessMode,
    /// Where the volume is exported.
    pub attachment: Attachment,
    /// CHAP credentials from the request's secrets (Debug redacts the secret).
    pub secrets: Option<ChapCredentials>,
}

/// NodePublishVolume in domain terms.
#[derive(Clone, Debug)]
pub struct PublishRequest {
    /// The volume.
    pub volume: VolumeId,
    /// Where NodeStageVolume put it.
    pub staging_path: PathBuf,
    /// Where the workload wants it (created by the node: a directory, or a file for block).
    pub target_path: PathBuf,
    /// Mount or block.
    pub access: Access,
    /// Access mode.
    pub mode: AccessMode,
    /// Publish read-only.
    pub readonly: bool,
}

/// Usage of a published volume.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VolumeStats {
    /// Bytes: total, available, used (file systems); total only for block volumes.
    pub bytes: Usage,
    /// Inodes (file systems only).
    pub inodes: Option<Usage>,
    /// Why the volume is abnormal, `None` when healthy.
    pub abnormal: Option<String>,
}

/// One usage counter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Capacity.
    pub total: u64,
    /// Free for unprivileged use.
    pub available: u64,
    /// In use.
    pub used: u64,
}

/// NodeExpandVolume in domain terms.
#[derive(Clone, Debug)]
pub struct ExpandRequest {
    /// The volume.
    pub volume: VolumeId,
    /// A path where it is staged or published.
    pub volume_path: PathBuf,
    /// Size the device must at least reach (the controller already grew the volume).
    pub required: Option<Bytes>,
    /// Size it must not exceed.
    pub limit: Option<Bytes>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn portal_table() {
        let cases = [
            ("192.168.77.1:3260", Some("192.168.77.1:3260")),
            ("192.168.77.1", Some("192.168.77.1:3260")),
            ("10.0.0.1:3261", Some("10.0.0.1:3261")),
            ("[fd00::1]:3260", Some("[fd00::1]:3260")),
            ("[fd00::1]", Some("[fd00::1]:3260")),
            ("fd00::1", Some("[fd00::1]:3260")),
            ("stor-1.example:3260", Some("stor-1.example:3260")),
            ("", None),
            ("1.2.3.4:0", None),
            ("1.2.3.4:x", None),
            ("[fd00::1", None),
            ("[nope]:3260", None),
            ("a b:3260", None),
            ("$(x):3260", None),
        ];
        for (text, want) in cases {
            assert_eq!(
                Portal::parse(text).ok().map(|p| p.iscsiadm()),
                want.map(str::to_owned),
                "{text:?}"
            );
        }
    }

    #[test]
    fn by_path_names_round_trip() {
        let t = |portal: &str, lun| TargetLun {
            portal: Portal::parse(portal).unwrap(),
            target: "iqn.2026-01.dev.cinderblock:volume-0f1e-2d".into(),
            lun,
        };
        let v4 = t("192.168.77.1:3260", 1);
        assert_eq!(
            v4.by_path_name(),
            "ip-192.168.77.1:3260-iscsi-iqn.2026-01.dev.cinderblock:volume-0f1e-2d-lun-1"
        );
        let v6 = t("[fd00::1]:3260", 0);
        assert_eq!(
            v6.by_path_name(),
            "ip-fd00::1:3260-iscsi-iqn.2026-01.dev.cinderblock:volume-0f1e-2d-lun-0"
        );
        for x in [v4, v6] {
            assert_eq!(
                TargetLun::parse_by_path_name(&x.by_path_name()),
                Some(x.clone())
            );
            assert_eq!(
                TargetLun::parse_by_path(&x.by_path().to_string_lossy()),
                Some(x.clone())
            );
        }
        assert_eq!(
            t("1.2.3.4", 300)
                .by_path_name()
                .rsplit_once("-lun-")
                .map(|x| x.1),
            Some("0x012c000000000000")
        );
        for bad in [
            "sdc",
            "ip-1.2.3.4:3260-iscsi--lun-1",
            "ip-1.2.3.4-iscsi-iqn.a:b-lun-1",
            "pci-0000:00:1f.2-ata-1",
        ] {
            assert_eq!(TargetLun::parse_by_path_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn context_keys_match_the_controller() {
        let info = crate::controller::PublishInfo {
            portals: vec!["192.168.77.1:3260".into(), "192.168.78.1:3260".into()],
            target_iqn: "iqn.2026-01.dev.cinderblock:volume-ab".into(),
            lun: 1,
            chap_user: "cb-ab-12345678".into(),
        };
        let a = Attachment::from_context(&info.to_context()).unwrap();
        assert_eq!(
            a.portals.iter().map(Portal::iscsiadm).collect::<Vec<_>>(),
            info.portals
        );
        assert_eq!(a.target.as_str(), info.target_iqn);
        assert_eq!(a.lun, 1);
        assert_eq!(a.chap_user.as_deref(), Some("cb-ab-12345678"));
    }

    #[test]
    fn chap_secrets_table() {
        let m = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>()
        };
        let got = |s: &BTreeMap<String, String>, ctx: Option<&str>| {
            chap_from_secrets(s, ctx)
                .map(|c| c.map(|c| (c.username, c.secret)))
                .map_err(|e| e.to_string())
        };
        let pair = |u: &str, s: &str| Ok(Some((u.to_owned(), s.to_owned())));
        assert_eq!(got(&m(&[]), Some("u")), Ok(None));
        assert_eq!(got(&m(&[(SECRET_CHAP_SECRET, "")]), Some("u")), Ok(None));
        assert_eq!(
            got(&m(&[(SECRET_CHAP_SECRET, "s")]), Some("ctx")),
            pair("ctx", "s")
        );
        assert_eq!(
            got(
                &m(&[(SECRET_CHAP_SECRET, "s"), (SECRET_CHAP_USER, "mine")]),
                Some("ctx")
            ),
            pair("mine", "s")
        );
        assert!(got(&m(&[(SECRET_CHAP_SECRET, "s")]), None).is_err());
    }

    #[test]
    fn context_errors() {
        let ctx = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>()
        };
        let ok = [
            (CTX_PORTALS, "10.0.0.1:3260"),
            (CTX_TARGET, "iqn.2026-01.dev.cinderblock:volume-a"),
            (CTX_LUN, "1"),
        ];
        let a = Attachment::from_context(&ctx(&ok)).unwrap();
        assert_eq!(a.chap_user, None);
        for (drop_key, bad) in [
            (CTX_PORTALS, None),
            (CTX_TARGET, None),
            (CTX_LUN, None),
            (CTX_LUN, Some("one")),
            (CTX_TARGET, Some("eui.1234")),
            (CTX_PORTALS, Some("a b")),
        ] {
            let mut m = ctx(&ok);
            match bad {
                None => {
                    m.remove(drop_key);
                }
                Some(v) => {
                    m.insert(drop_key.to_owned(), v.to_owned());
                }
            }
            assert!(
                matches!(
                    Attachment::from_context(&m),
                    Err(NodeError::InvalidArgument(_))
                ),
                "{drop_key}={bad:?}"
            );
        }
    }
}
