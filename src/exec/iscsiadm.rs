//! `iscsiadm`, open-iscsi's administration tool: argv builders for the node-record, login and
//! session commands the node service uses, parsers of its list output, and the
//! classification of its failures by exit code.
//!
//! Facts this module relies on (open-iscsi 2.1.8, Debian bookworm):
//! - iscsiadm exits with one of the `ISCSI_ERR_*` codes of open-iscsi's `iscsi_err.h`; the
//!   constants below name the ones the node service tells apart. Messages on stderr are for
//!   people and are not parsed.
//! - `-m node -o new` writes a record for one (target, portal) without a discovery, so a
//!   node never learns about other targets behind the same portal. It overwrites an
//!   existing record with defaults, which is why every `new` is followed by the `update`s.
//! - `--login` on a (target, portal) that already has a session exits
//!   [`ISCSI_ERR_SESS_EXISTS`]; `-o delete` without a record exits
//!   [`ISCSI_ERR_NO_OBJS_FOUND`], and a logout of a session that is gone
//!   [`ISCSI_ERR_NO_OBJS_FOUND`] or [`ISCSI_ERR_SESS_NOT_FOUND`]. All mean "already done" to
//!   an idempotent caller.
//! - Sessions are logged out by session id (`-m session -r SID --logout`), which works
//!   whether or not the session's node record still exists.
//! - `-m session` and `-m node` without `-P` print one line per session / record
//!   ([`parse_sessions`], [`parse_records`]); with nothing to list they print a message on
//!   stderr and exit [`ISCSI_ERR_NO_OBJS_FOUND`].
//!
//! The sample outputs in the tests are hand-written from the open-iscsi sources and
//! documentation until they are captured in the test VMs (`tests/e2e`).

use std::time::Duration;

use super::Cmd;

/// The program.
pub const ISCSIADM: &str = "iscsiadm";

/// Generic failure (`ISCSI_ERR`).
pub const ISCSI_ERR: i32 = 1;
/// The session could not be found (`ISCSI_ERR_SESS_NOT_FOUND`), e.g. a rescan of a sid that
/// logged out in between.
pub const ISCSI_ERR_SESS_NOT_FOUND: i32 = 2;
/// Transport error (`ISCSI_ERR_TRANS`): the portal refused or dropped the TCP connection.
pub const ISCSI_ERR_TRANS: i32 = 4;
/// Generic login failure (`ISCSI_ERR_LOGIN`), retryable.
pub const ISCSI_ERR_LOGIN: i32 = 5;
/// Error reading or writing the node database under /etc/iscsi (`ISCSI_ERR_IDBM`).
pub const ISCSI_ERR_IDBM: i32 = 6;
/// Invalid argument (`ISCSI_ERR_INVAL`): a bad `-p`, `-T` or `-n` value.
pub const ISCSI_ERR_INVAL: i32 = 7;
/// The connection timer expired while connecting (`ISCSI_ERR_TRANS_TIMEOUT`): the portal
/// does not answer.
pub const ISCSI_ERR_TRANS_TIMEOUT: i32 = 8;
/// iSCSI PDU timed out (`ISCSI_ERR_PDU_TIMEOUT`).
pub const ISCSI_ERR_PDU_TIMEOUT: i32 = 11;
/// Permission denied (`ISCSI_ERR_ACCESS`): iscsiadm not run as root.
pub const ISCSI_ERR_ACCESS: i32 = 13;
/// A session to this (target, portal) is already logged in (`ISCSI_ERR_SESS_EXISTS`).
pub const ISCSI_ERR_SESS_EXISTS: i32 = 15;
/// A read or write to iscsid failed (`ISCSI_ERR_ISCSID_COMM_ERR`).
pub const ISCSI_ERR_ISCSID_COMM_ERR: i32 = 18;
/// Fatal login error (`ISCSI_ERR_FATAL_LOGIN`): the target answered with a non-retryable
/// status; tgtd answers "target not found" both for a missing target and for an initiator
/// that is not in its ACL.
pub const ISCSI_ERR_FATAL_LOGIN: i32 = 19;
/// iscsid is not running (`ISCSI_ERR_ISCSID_NOTCONN`).
pub const ISCSI_ERR_ISCSID_NOTCONN: i32 = 20;
/// No records, targets, sessions or portals matched (`ISCSI_ERR_NO_OBJS_FOUND`).
pub const ISCSI_ERR_NO_OBJS_FOUND: i32 = 21;
/// Login failed due to an authorization failure (`ISCSI_ERR_LOGIN_AUTH_FAILED`): wrong CHAP
/// user or secret.
pub const ISCSI_ERR_LOGIN_AUTH_FAILED: i32 = 24;
/// Device or resource in use (`ISCSI_ERR_BUSY`), e.g. deleting a record a session uses.
pub const ISCSI_ERR_BUSY: i32 = 28;

/// Deadline of list, record and logout commands: they touch local files, sysfs and iscsid.
pub const ISCSIADM_TIMEOUT: Duration = Duration::from_secs(30);

/// Deadline of a login: open-iscsi's own login timeout is 15 s per attempt, with retries.
pub const LOGIN_TIMEOUT: Duration = Duration::from_secs(120);

/// A failed iscsiadm call, classified by exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// [`ISCSI_ERR_SESS_EXISTS`]: already logged in.
    SessionExists,
    /// [`ISCSI_ERR_NO_OBJS_FOUND`] or [`ISCSI_ERR_SESS_NOT_FOUND`]: nothing to act on.
    NotFound,
    /// [`ISCSI_ERR_LOGIN_AUTH_FAILED`]: CHAP credentials refused.
    AuthFailed,
    /// [`ISCSI_ERR_FATAL_LOGIN`]: the target does not exist or does not admit this initiator.
    LoginRefused,
    /// [`ISCSI_ERR_TRANS`], [`ISCSI_ERR_TRANS_TIMEOUT`], [`ISCSI_ERR_PDU_TIMEOUT`] or
    /// [`ISCSI_ERR_LOGIN`]: the portal did not answer or the login did not complete; retryable.
    Unreachable,
    /// [`ISCSI_ERR_ISCSID_NOTCONN`] or [`ISCSI_ERR_ISCSID_COMM_ERR`]: iscsid is down.
    DaemonDown,
    /// [`ISCSI_ERR_BUSY`]: in use.
    Busy,
    /// Any other non-zero code ([`ISCSI_ERR`], [`ISCSI_ERR_IDBM`], [`ISCSI_ERR_INVAL`],
    /// [`ISCSI_ERR_ACCESS`], ...).
    Other,
}

/// Classifies an iscsiadm exit code: `None` on success.
pub fn classify(code: i32) -> Option<Failure> {
    Some(match code {
        0 => return None,
        ISCSI_ERR_SESS_EXISTS => Failure::SessionExists,
        ISCSI_ERR_NO_OBJS_FOUND | ISCSI_ERR_SESS_NOT_FOUND => Failure::NotFound,
        ISCSI_ERR_LOGIN_AUTH_FAILED => Failure::AuthFailed,
        ISCSI_ERR_FATAL_LOGIN => Failure::LoginRefused,
        ISCSI_ERR_TRANS | ISCSI_ERR_TRANS_TIMEOUT | ISCSI_ERR_PDU_TIMEOUT | ISCSI_ERR_LOGIN => {
            Failure::Unreachable
        }
        ISCSI_ERR_ISCSID_NOTCONN | ISCSI_ERR_ISCSID_COMM_ERR => Failure::DaemonDown,
        ISCSI_ERR_BUSY => Failure::Busy,
        _ => Failure::Other,
    })
}

/// Node-record settings the node service writes.
pub mod keys {
    /// `manual`: iscsid never logs in by itself (at boot or on restart); the node service
    /// decides, from the volumes staged.
    pub const STARTUP: &str = "node.startup";
    /// `CHAP` or `None`.
    pub const AUTH_METHOD: &str = "node.session.auth.authmethod";
    /// CHAP user name.
    pub const USERNAME: &str = "node.session.auth.username";
    /// CHAP secret (a secret: redacted from logs).
    pub const PASSWORD: &str = "node.session.auth.password";
}

fn base() -> Cmd {
    Cmd::new(ISCSIADM).timeout(ISCSIADM_TIMEOUT)
}

fn node(target: &str, portal: &str) -> Cmd {
    base().args(["-m", "node", "-T", target, "-p", portal])
}

/// `iscsiadm -m node -T TARGET -p PORTAL -o new`: creates (or resets) the node record.
pub fn new_record(target: &str, portal: &str) -> Cmd {
    node(target, portal).args(["-o", "new"])
}

/// `iscsiadm -m node -T TARGET -p PORTAL -o update -n KEY -v VALUE`.
pub fn update_record(target: &str, portal: &str, key: &str, value: &str) -> Cmd {
    node(target, portal).args(["-o", "update", "-n", key, "-v", value])
}

/// Like [`update_record`] for a secret value: redacted from logs (it is still on iscsiadm's
/// command line while it runs; iscsiadm takes it no other way).
pub fn update_record_secret(target: &str, portal: &str, key: &str, secret: &str) -> Cmd {
    node(target, portal)
        .args(["-o", "update", "-n", key, "-v"])
        .secret_arg(secret)
}

/// `iscsiadm -m node -T TARGET -p PORTAL -o delete`.
pub fn delete_record(target: &str, portal: &str) -> Cmd {
    node(target, portal).args(["-o", "delete"])
}

/// `iscsiadm -m node -T TARGET -p PORTAL --login`.
pub fn login(target: &str, portal: &str) -> Cmd {
    node(target, portal).arg("--login").timeout(LOGIN_TIMEOUT)
}

/// `iscsiadm -m session -r SID --logout`.
pub fn logout(sid: u32) -> Cmd {
    base().args(["-m", "session", "-r", &sid.to_string(), "--logout"])
}

/// `iscsiadm -m session -r SID --rescan`: scans the session's target for new LUNs and
/// re-reads the size of the existing ones.
pub fn rescan(sid: u32) -> Cmd {
    base().args(["-m", "session", "-r", &sid.to_string(), "--rescan"])
}

/// `iscsiadm -m session`: one line per session ([`parse_sessions`]).
pub fn list_sessions() -> Cmd {
    base().args(["-m", "session"])
}

/// `iscsiadm -m node`: one line per node record ([`parse_records`]).
pub fn list_records() -> Cmd {
    base().args(["-m", "node"])
}

/// One line of `iscsiadm -m session`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionLine {
    /// Transport (`tcp`, `iser`).
    pub transport: String,
    /// Session id: `sessionN` in sysfs, `-r N` on the command line.
    pub sid: u32,
    /// Portal as iscsiadm prints it (`192.168.77.1:3260`, `[fd00::1]:3260`).
    pub portal: String,
    /// Target portal group tag.
    pub tpgt: i32,
    /// Target name.
    pub target: String,
}

/// One line of `iscsiadm -m node`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordLine {
    /// Portal as iscsiadm prints it.
    pub portal: String,
    /// Target portal group tag (-1 for a record made with `-o new`).
    pub tpgt: i32,
    /// Target name.
    pub target: String,
}

/// Output that does not read as iscsiadm's.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}: {text:?}")]
pub struct ParseError {
    /// Line number, from 1.
    pub line: usize,
    /// What was expected.
    pub reason: &'static str,
    /// The line.
    pub text: String,
}

/// Splits `PORTAL,TPGT TARGET` (the common part of both listings).
fn portal_tpgt_target(text: &str) -> Option<(String, i32, String)> {
    let (pt, target) = text.trim().split_once(' ')?;
    let (portal, tpgt) = pt.rsplit_once(',')?;
    let target = target.trim();
    if portal.is_empty() || target.is_empty() || target.contains(' ') {
        return None;
    }
    Some((portal.to_owned(), parse_tpgt(tpgt)?, target.to_owned()))
}

/// A record made with `-o new` has no TPGT yet: open-iscsi 2.1.8 prints that -1 as an
/// unsigned 32-bit number (seen in the test bed: `192.168.77.1:3260,4294967295 iqn...`).
const TPGT_UNSET_PRINTED: u32 = u32::MAX;

fn parse_tpgt(text: &str) -> Option<i32> {
    match text.parse::<i32>() {
        Ok(t) => Some(t),
        Err(_) if text.parse::<u32>().ok()? == TPGT_UNSET_PRINTED => Some(-1),
        Err(_) => None,
    }
}

/// Parses `iscsiadm -m session`: `tcp: [SID] PORTAL,TPGT TARGET (non-flash)`; the
/// `(non-flash)` / `(flash)` suffix of newer versions is optional.
pub fn parse_sessions(text: &str) -> Result<Vec<SessionLine>, ParseError> {
    let mut out = Vec::new();
    for (no, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let err = |reason| ParseError {
            line: no + 1,
            reason,
            text: line.to_owned(),
        };
        let (transport, rest) = line
            .split_once(": [")
            .ok_or_else(|| err("expected \"TRANSPORT: [SID] ...\""))?;
        let (sid, rest) = rest
            .split_once("] ")
            .ok_or_else(|| err("expected \"[SID] \""))?;
        let rest = rest
            .trim_end()
            .trim_end_matches("(non-flash)")
            .trim_end_matches("(flash)");
        let (portal, tpgt, target) =
            portal_tpgt_target(rest).ok_or_else(|| err("expected \"PORTAL,TPGT TARGET\""))?;
        out.push(SessionLine {
            transport: transport.to_owned(),
            sid: sid.parse().map_err(|_| err("bad session id"))?,
            portal,
            tpgt,
            target,
        });
    }
    Ok(out)
}

/// Parses `iscsiadm -m node`: `PORTAL,TPGT TARGET` per record.
pub fn parse_records(text: &str) -> Result<Vec<RecordLine>, ParseError> {
    let mut out = Vec::new();
    for (no, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let (portal, tpgt, target) = portal_tpgt_target(line).ok_or_else(|| ParseError {
            line: no + 1,
            reason: "expected \"PORTAL,TPGT TARGET\"",
            text: line.to_owned(),
        })?;
        out.push(RecordLine {
            portal,
            tpgt,
            target,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Hand-written from open-iscsi 2.1.8's print formats (usr/session_info.c, idbm.c);
    // replace with captures from the test VMs.
    const SESSIONS: &str = "\
tcp: [1] 192.168.77.1:3260,1 iqn.2026-01.dev.cinderblock:volume-0f1e2d3c (non-flash)
tcp: [12] 192.168.77.1:3260,1 iqn.2026-01.dev.cinderblock:volume-aa11 (non-flash)
tcp: [3] [fd00::1]:3260,1 iqn.2010-10.org.openstack:volume-x
";

    const RECORDS: &str = "\
192.168.77.1:3260,-1 iqn.2026-01.dev.cinderblock:volume-0f1e2d3c
[fd00::1]:3260,1 iqn.2010-10.org.openstack:volume-x
";

    #[test]
    fn sessions_parse() {
        let got = parse_sessions(SESSIONS).unwrap();
        assert_eq!(
            got,
            vec![
                SessionLine {
                    transport: "tcp".into(),
                    sid: 1,
                    portal: "192.168.77.1:3260".into(),
                    tpgt: 1,
                    target: "iqn.2026-01.dev.cinderblock:volume-0f1e2d3c".into(),
                },
                SessionLine {
                    transport: "tcp".into(),
                    sid: 12,
                    portal: "192.168.77.1:3260".into(),
                    tpgt: 1,
                    target: "iqn.2026-01.dev.cinderblock:volume-aa11".into(),
                },
                SessionLine {
                    transport: "tcp".into(),
                    sid: 3,
                    portal: "[fd00::1]:3260".into(),
                    tpgt: 1,
                    target: "iqn.2010-10.org.openstack:volume-x".into(),
                },
            ]
        );
        assert_eq!(parse_sessions("").unwrap(), vec![]);
    }

    #[test]
    fn records_parse() {
        let got = parse_records(RECORDS).unwrap();
        assert_eq!(
            got.iter()
                .map(|r| (r.portal.as_str(), r.tpgt, r.target.as_str()))
                .collect::<Vec<_>>(),
            vec![
                (
                    "192.168.77.1:3260",
                    -1,
                    "iqn.2026-01.dev.cinderblock:volume-0f1e2d3c"
                ),
                ("[fd00::1]:3260", 1, "iqn.2010-10.org.openstack:volume-x"),
            ]
        );
    }

    #[test]
    fn malformed_lines_are_errors() {
        for bad in [
            "tcp: [x] 1.2.3.4:3260,1 iqn.a:b",
            "tcp 1.2.3.4:3260,1 iqn.a:b",
            "tcp: [1] 1.2.3.4:3260 iqn.a:b",
        ] {
            assert_eq!(
                parse_sessions(bad).map_err(|e| e.line),
                Err(1),
                "{bad:?} should not parse"
            );
        }
        assert_eq!(
            parse_records("\n1.2.3.4:3260,x iqn.a:b").map_err(|e| e.line),
            Err(2)
        );
    }

    #[test]
    fn exit_codes_table() {
        let cases = [
            (0, None),
            (15, Some(Failure::SessionExists)),
            (21, Some(Failure::NotFound)),
            (2, Some(Failure::NotFound)),
            (24, Some(Failure::AuthFailed)),
            (19, Some(Failure::LoginRefused)),
            (4, Some(Failure::Unreachable)),
            (8, Some(Failure::Unreachable)),
            (5, Some(Failure::Unreachable)),
            (20, Some(Failure::DaemonDown)),
            (28, Some(Failure::Busy)),
            (6, Some(Failure::Other)),
            (-1, Some(Failure::Other)),
        ];
        for (code, want) in cases {
            assert_eq!(classify(code), want, "exit {code}");
        }
    }

    #[test]
    fn argv() {
        let t = "iqn.2026-01.dev.cinderblock:volume-a";
        let p = "192.168.77.1:3260";
        let cases = [
            (
                new_record(t, p),
                format!("iscsiadm -m node -T {t} -p {p} -o new"),
            ),
            (
                update_record(t, p, keys::STARTUP, "manual"),
                format!("iscsiadm -m node -T {t} -p {p} -o update -n node.startup -v manual"),
            ),
            (
                update_record_secret(t, p, keys::PASSWORD, "s3cr3t-value"),
                format!(
                    "iscsiadm -m node -T {t} -p {p} -o update -n node.session.auth.password -v ***"
                ),
            ),
            (
                delete_record(t, p),
                format!("iscsiadm -m node -T {t} -p {p} -o delete"),
            ),
            (
                login(t, p),
                format!("iscsiadm -m node -T {t} -p {p} --login"),
            ),
            (logout(12), "iscsiadm -m session -r 12 --logout".to_owned()),
            (rescan(7), "iscsiadm -m session -r 7 --rescan".to_owned()),
            (list_sessions(), "iscsiadm -m session".to_owned()),
            (list_records(), "iscsiadm -m node".to_owned()),
        ];
        for (cmd, want) in cases {
            assert_eq!(cmd.display(), want);
        }
        let secret = update_record_secret(t, p, keys::PASSWORD, "s3cr3t-value");
        assert_eq!(
            secret.argv().last().map(String::as_str),
            Some("s3cr3t-value")
        );
    }

    #[test]
    fn a_new_record_without_tpgt_parses_as_minus_one() {
        // Captured in the test bed (open-iscsi 2.1.8, Debian bookworm) after `-o new`.
        let out = "192.168.77.1:3260,4294967295 iqn.2026-01.dev.cinderblock:volume-c634b85f\n";
        let r = parse_records(out).unwrap();
        assert_eq!(
            (r[0].portal.as_str(), r[0].tpgt, r[0].target.as_str()),
            (
                "192.168.77.1:3260",
                -1,
                "iqn.2026-01.dev.cinderblock:volume-c634b85f"
            )
        );
        assert!(parse_records("10.0.0.1:3260,4294967294 iqn.x\n").is_err());
    }
}
