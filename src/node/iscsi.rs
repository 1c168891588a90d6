//! The real [`Initiator`]: open-iscsi's `iscsiadm` (through [`Runner`], so behind the
//! configured `exec_prefix`) for records, logins and session listings; sysfs for session
//! states and disks; `/dev/disk/by-path` for the link udev makes.
//!
//! The node process reads sysfs and `/dev` itself, so in a container they must be the
//! host's (the usual `/sys` and `/dev` host mounts of a CSI node plugin).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::initiator::{Initiator, InitiatorError, Record, Session, SysSession};
use super::model::Portal;
use super::{netlink, sysfs};
use crate::agent::chap::ChapCredentials;
use crate::exec::iscsiadm::{self, keys, Failure};
use crate::exec::{mount as tools, Cmd, Output, Runner};

/// The transport of every session the node makes (`iface.transport_name`).
const ISCSI_TCP: &str = "tcp";

/// open-iscsi through iscsiadm and sysfs.
#[derive(Clone, Debug)]
pub struct IscsiInitiator {
    runner: Runner,
    initiator_name_file: PathBuf,
    sys: PathBuf,
    dev: PathBuf,
}

/// The `InitiatorName=` of an initiator name file (`#` comments and blanks skipped).
pub fn parse_initiator_name(text: &str) -> Option<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix("InitiatorName="))
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

impl IscsiInitiator {
    /// The host's initiator: `/sys`, `/dev`, and the initiator name in `initiator_name_file`.
    pub fn new(runner: Runner, initiator_name_file: PathBuf) -> Self {
        IscsiInitiator {
            runner,
            initiator_name_file,
            sys: PathBuf::from("/sys"),
            dev: PathBuf::from("/dev"),
        }
    }

    /// Runs an iscsiadm command; exit codes classified as one of `ok` count as success.
    async fn iscsiadm(&self, op: &str, cmd: Cmd, ok: &[Failure]) -> Result<Output, InitiatorError> {
        let out = self
            .runner
            .run(&cmd)
            .await
            .map_err(|source| InitiatorError::Exec {
                op: op.to_owned(),
                source,
            })?;
        match iscsiadm::classify(out.code) {
            None => Ok(out),
            Some(f) if ok.contains(&f) => Ok(out),
            Some(failure) => Err(InitiatorError::Iscsiadm {
                op: op.to_owned(),
                failure,
                code: out.code,
                stderr: out.stderr.trim().to_owned(),
            }),
        }
    }

    async fn sysfs<T, F>(&self, op: &'static str, f: F) -> Result<T, InitiatorError>
    where
        T: Send + 'static,
        F: FnOnce(&Path) -> std::io::Result<T> + Send + 'static,
    {
        let sys = self.sys.clone();
        let path = sys.clone();
        tokio::task::spawn_blocking(move || f(&sys))
            .await
            .map_err(|e| InitiatorError::Io {
                op,
                path: path.clone(),
                source: std::io::Error::other(e.to_string()),
            })?
            .map_err(|source| InitiatorError::Io { op, path, source })
    }
}

fn normalize(portal: &str) -> String {
    Portal::parse(portal).map_or_else(|_| portal.to_owned(), |p| p.iscsiadm())
}

#[async_trait::async_trait]
impl Initiator for IscsiInitiator {
    async fn initiator_name(&self) -> Result<String, InitiatorError> {
        let path = &self.initiator_name_file;
        let text = tokio::fs::read_to_string(path)
            .await
            .map_err(|source| InitiatorError::Io {
                op: "read initiator name file",
                path: path.clone(),
                source,
            })?;
        parse_initiator_name(&text).ok_or_else(|| InitiatorError::Parse {
            what: "initiator name file",
            reason: format!(
                "{} has no InitiatorName= line (open-iscsi writes one when iscsid first starts)",
                path.display()
            ),
        })
    }

    async fn session_states(&self) -> Result<Vec<SysSession>, InitiatorError> {
        self.sysfs("list iSCSI sessions", sysfs::sessions).await
    }

    async fn sessions(&self) -> Result<Vec<Session>, InitiatorError> {
        let listed = self.session_states().await?;
        if listed.is_empty() {
            // Nothing logged in (or no iSCSI module loaded): iscsiadm need not be installed.
            return Ok(Vec::new());
        }
        let out = self
            .iscsiadm(
                "list sessions",
                iscsiadm::list_sessions(),
                &[Failure::NotFound],
            )
            .await?;
        let portals: BTreeMap<u32, String> = iscsiadm::parse_sessions(&out.stdout)
            .map_err(|e| InitiatorError::Parse {
                what: "iscsiadm -m session",
                reason: e.to_string(),
            })?
            .into_iter()
            .map(|l| (l.sid, normalize(&l.portal)))
            .collect();
        let disks = self.sysfs("list iSCSI disks", sysfs::session_disks).await?;
        Ok(listed
            .into_iter()
            // Sessions that logged out between the two listings are left out.
            .filter_map(|s| {
                let portal = portals.get(&s.sid)?.clone();
                Some(Session {
                    disks: disks
                        .iter()
                        .filter(|(sid, _)| *sid == s.sid)
                        .map(|(_, d)| d.clone())
                        .collect(),
                    sid: s.sid,
                    target: s.target,
                    portal,
                    state: s.state,
                })
            })
            .collect())
    }

    async fn records(&self) -> Result<Vec<Record>, InitiatorError> {
        let out = self
            .iscsiadm(
                "list node records",
                iscsiadm::list_records(),
                &[Failure::NotFound],
            )
            .await?;
        if iscsiadm::classify(out.code).is_some() {
            return Ok(Vec::new());
        }
        Ok(iscsiadm::parse_records(&out.stdout)
            .map_err(|e| InitiatorError::Parse {
                what: "iscsiadm -m node",
                reason: e.to_string(),
            })?
            .into_iter()
            .map(|r| Record {
                target: r.target,
                portal: normalize(&r.portal),
            })
            .collect())
    }

    async fn create_record(
        &self,
        target: &str,
        portal: &Portal,
        chap: Option<&ChapCredentials>,
    ) -> Result<(), InitiatorError> {
        let p = portal.iscsiadm();
        let op = format!("create node record {target} at {p}");
        self.iscsiadm(&op, iscsiadm::new_record(target, &p), &[])
            .await?;
        let set = |k: &str, v: &str| iscsiadm::update_record(target, &p, k, v);
        self.iscsiadm(&op, set(keys::STARTUP, "manual"), &[])
            .await?;
        match chap {
            Some(c) => {
                self.iscsiadm(&op, set(keys::AUTH_METHOD, "CHAP"), &[])
                    .await?;
                self.iscsiadm(&op, set(keys::USERNAME, &c.username), &[])
                    .await?;
                let secret = iscsiadm::update_record_secret(target, &p, keys::PASSWORD, &c.secret);
                self.iscsiadm(&op, secret, &[]).await?;
            }
            None => {
                self.iscsiadm(&op, set(keys::AUTH_METHOD, "None"), &[])
                    .await?;
            }
        }
        Ok(())
    }

    async fn delete_record(&self, target: &str, portal: &str) -> Result<(), InitiatorError> {
        let op = format!("delete node record {target} at {portal}");
        self.iscsiadm(
            &op,
            iscsiadm::delete_record(target, portal),
            &[Failure::NotFound],
        )
        .await
        .map(drop)
    }

    async fn login(&self, target: &str, portal: &str) -> Result<(), InitiatorError> {
        let op = format!("log in to {target} at {portal}");
        self.iscsiadm(
            &op,
            iscsiadm::login(target, portal),
            &[Failure::SessionExists],
        )
        .await
        .map(drop)
    }

    async fn logout(&self, sid: u32) -> Result<(), InitiatorError> {
        let op = format!("log out of session {sid}");
        self.iscsiadm(&op, iscsiadm::logout(sid), &[Failure::NotFound])
            .await
            .map(drop)
    }

    async fn rescan(&self, sid: u32) -> Result<(), InitiatorError> {
        let op = format!("rescan session {sid}");
        self.iscsiadm(&op, iscsiadm::rescan(sid), &[Failure::NotFound])
            .await
            .map(drop)
    }

    async fn reset_connection(&self, sid: u32) -> Result<(), InitiatorError> {
        let op = format!("stop the connection of session {sid} for recovery");
        let sys = self.sys.clone();
        let stop = move || {
            let handle = netlink::transport_handle(&sys, ISCSI_TCP)?;
            netlink::stop_conn_for_recovery(handle, sid, 0)
        };
        match tokio::task::spawn_blocking(stop).await {
            Ok(r) => r.map_err(|source| InitiatorError::Netlink { op, source }),
            Err(e) => Err(InitiatorError::Netlink {
                op,
                source: std::io::Error::other(e.to_string()),
            }),
        }
    }

    async fn by_path(&self, name: &str) -> Result<Option<String>, InitiatorError> {
        let link = self.dev.join("disk/by-path").join(name);
        match tokio::fs::canonicalize(&link).await {
            Ok(real) => Ok(real
                .strip_prefix(&self.dev)
                .ok()
                .and_then(|p| p.to_str())
                .filter(|n| !n.contains('/'))
                .map(str::to_owned)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(InitiatorError::Io {
                op: "resolve",
                path: link,
                source,
            }),
        }
    }

    async fn flush(&self, disk: &str) -> Result<(), InitiatorError> {
        let cmd = tools::flushbufs(&self.dev.join(disk));
        let op = format!("flush {disk}");
        let out = self
            .runner
            .run(&cmd)
            .await
            .map_err(|source| InitiatorError::Exec {
                op: op.clone(),
                source,
            })?;
        out.check(cmd.program())
            .map(drop)
            .map_err(|source| InitiatorError::Exec { op, source })
    }

    async fn delete_disk(&self, disk: &str) -> Result<(), InitiatorError> {
        let name = disk.to_owned();
        self.sysfs("delete SCSI disk", move |s| sysfs::delete_disk(s, &name))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initiator_name_file() {
        // Debian's file after iscsid generated a name, and before.
        let generated = "## DO NOT EDIT OR REMOVE THIS FILE!\n## If you remove this file, the iSCSI daemon will not start.\n## If you change the InitiatorName, existing access control lists\n## may reject this initiator.  The InitiatorName must be unique\n## for each iSCSI initiator.  Do NOT duplicate iSCSI InitiatorNames.\nInitiatorName=iqn.1993-08.org.debian:01:4f5e6d7c8b9a\n";
        assert_eq!(
            parse_initiator_name(generated).as_deref(),
            Some("iqn.1993-08.org.debian:01:4f5e6d7c8b9a")
        );
        assert_eq!(parse_initiator_name("GenerateName=yes\n"), None);
        assert_eq!(parse_initiator_name("#InitiatorName=iqn.x:y\n"), None);
        assert_eq!(parse_initiator_name("InitiatorName=\n"), None);
    }

    #[tokio::test]
    async fn sysfs_without_sessions_needs_no_iscsiadm() {
        let dir = tempfile::tempdir().unwrap();
        let mut i = IscsiInitiator::new(
            Runner::with_prefix(vec!["/nonexistent/iscsiadm-must-not-run".into()]),
            dir.path().join("initiatorname.iscsi"),
        );
        i.sys = dir.path().to_owned();
        assert_eq!(i.sessions().await.unwrap(), vec![]);
        assert!(matches!(
            i.initiator_name().await,
            Err(InitiatorError::Io { .. })
        ));
        std::fs::write(
            dir.path().join("initiatorname.iscsi"),
            "InitiatorName=iqn.2025-01.io.cinderblock.e2e:comp\n",
        )
        .unwrap();
        assert_eq!(
            i.initiator_name().await.unwrap(),
            "iqn.2025-01.io.cinderblock.e2e:comp"
        );
    }

    #[tokio::test]
    async fn by_path_resolves_udev_links() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().canonicalize().unwrap();
        std::fs::create_dir_all(dev.join("disk/by-path")).unwrap();
        std::fs::write(dev.join("sdc"), b"").unwrap();
        std::os::unix::fs::symlink(
            "../../sdc",
            dev.join("disk/by-path/ip-1.2.3.4:3260-iscsi-iqn.a:b-lun-1"),
        )
        .unwrap();
        let mut i = IscsiInitiator::new(Runner::default(), dev.join("x"));
        i.dev = dev;
        assert_eq!(
            i.by_path("ip-1.2.3.4:3260-iscsi-iqn.a:b-lun-1")
                .await
                .unwrap()
                .as_deref(),
            Some("sdc")
        );
        assert_eq!(
            i.by_path("ip-1.2.3.4:3260-iscsi-iqn.a:b-lun-2")
                .await
                .unwrap(),
            None
        );
    }
}
