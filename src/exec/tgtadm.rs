//! `tgtadm`, the management client of tgtd (the Linux SCSI target daemon): argv builders,
//! parsers of its `show` output and the classification of its failures.
//!
//! Facts this module relies on, observed on tgt 1.0.85 (Debian bookworm) and kept as
//! captured output under `tests/fixtures/tgtadm/` (`capture.sh` there re-captures them):
//! - tgtadm has no machine-readable output; `--op show` prints an indented report (4 spaces a
//!   level) that [`parse_targets`] and [`parse_accounts`] read.
//! - Every refusal by tgtd exits with the same code ([`TGTADM_ERR_REFUSED`]); only the message
//!   on stderr tells which. A tgtd that is not running exits [`TGTADM_ERR_NOT_CONNECTED`].
//! - `--initiator-address` (`-I`) is an address ACL (`ALL`, an IP, a CIDR), `--initiator-name`
//!   a name ACL; both are listed together under "ACL information" (addresses first).
//! - `--params` is refused on `--op new --mode logicalunit`; LUN parameters (`scsi_id`,
//!   `scsi_sn`) are set by a following `--op update`. tgtd truncates both to
//!   [`SCSI_ID_MAX_LEN`] characters without a word.
//! - The control port (`-C`) must be within `0..=`[`MAX_CONTROL_PORT`].
//! - tgtd's control socket is `/var/run/tgtd/socket.N` for control port N (0 included). A
//!   starting tgtd replaces the file; a killed one leaves it behind. The inode number may be
//!   reused at once, but the change time is new ([`Tgtadm::socket_path`]).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::Cmd;

/// The program.
pub const TGTADM: &str = "tgtadm";

/// tgtadm's exit code whenever tgtd answered with a refusal (target exists, no such LUN,
/// ...) and for tgtadm's own argument errors: it is `EINVAL`, whatever the reason, so the
/// reason is read from stderr ([`Refusal`]). Observed on tgt 1.0.85.
pub const TGTADM_ERR_REFUSED: i32 = 22;

/// tgtadm's exit code when no tgtd listens on the control port: `ENOTCONN` ("failed to send
/// request hdr to tgt daemon, Transport endpoint is not connected"), also after tgtd was
/// killed and left its socket file behind. Observed on tgt 1.0.85.
pub const TGTADM_ERR_NOT_CONNECTED: i32 = 107;

/// The highest control port tgtadm and tgtd accept ("-C argument value '40000' out of
/// range"; tgtd exits 34 on it). Observed on tgt 1.0.85.
pub const MAX_CONTROL_PORT: u16 = 32767;

/// tgtd keeps at most this many characters of a LUN's `scsi_id` and `scsi_sn`. Observed on
/// tgt 1.0.85.
pub const SCSI_ID_MAX_LEN: usize = 36;

/// Where tgtd puts its control socket: this, `.`, the control port (tgt's
/// `TGT_IPC_NAMESPACE`). Observed on tgt 1.0.85.
pub const TGTD_SOCKET_PREFIX: &str = "/var/run/tgtd/socket";

/// Deadline of one tgtadm call. tgtd answers in milliseconds; one that takes this long is
/// stuck (tgtd is single-threaded) and is treated as unavailable.
pub const TGTADM_TIMEOUT: Duration = Duration::from_secs(30);

/// Builds tgtadm command lines for one tgtd (selected by its control port).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tgtadm {
    control_port: u16,
}

impl Tgtadm {
    /// Commands for the tgtd on `control_port` (0: tgtd's default, no `-C`).
    pub fn new(control_port: u16) -> Self {
        Tgtadm { control_port }
    }

    /// The control port.
    pub fn control_port(&self) -> u16 {
        self.control_port
    }

    /// The control socket tgtadm talks to (re-created each time tgtd starts).
    pub fn socket_path(&self) -> PathBuf {
        PathBuf::from(format!("{TGTD_SOCKET_PREFIX}.{}", self.control_port))
    }

    fn base(&self) -> Cmd {
        let mut c = Cmd::new(TGTADM).timeout(TGTADM_TIMEOUT);
        if self.control_port != 0 {
            c = c.arg("-C").arg(self.control_port.to_string());
        }
        c.args(["--lld", "iscsi"])
    }

    fn op(&self, op: &str, mode: &str) -> Cmd {
        self.base().args(["--op", op, "--mode", mode])
    }

    /// `--op show --mode sys`: answers while tgtd runs.
    pub fn show_sys(&self) -> Cmd {
        self.op("show", "sys")
    }

    /// `--op show --mode target`: all targets (see [`parse_targets`]).
    pub fn show_targets(&self) -> Cmd {
        self.op("show", "target")
    }

    /// `--op show --mode account`: all accounts (see [`parse_accounts`]).
    pub fn show_accounts(&self) -> Cmd {
        self.op("show", "account")
    }

    /// Creates target `tid` (non-zero) named `iqn`.
    pub fn new_target(&self, tid: u32, iqn: &str) -> Cmd {
        self.op("new", "target")
            .args(["--tid", &tid.to_string(), "--targetname", iqn])
    }

    /// Deletes target `tid` with `--force`: its sessions are dropped, its LUNs and bindings go.
    pub fn delete_target(&self, tid: u32) -> Cmd {
        self.op("delete", "target")
            .args(["--force", "--tid", &tid.to_string()])
    }

    /// Adds LUN `lun` backed by `backing` with the `rdwr` backing store: plain read/write on
    /// the file or block device, the right one for both sparse files and LVM volumes (`aio`
    /// needs aligned I/O to pay off and gains nothing on files; `sg`/`rbd` are other kinds).
    /// `None` when the path is not UTF-8 (tgtadm takes it as text).
    pub fn new_lun(&self, tid: u32, lun: u32, backing: &Path) -> Option<Cmd> {
        let path = backing.to_str()?;
        Some(self.op("new", "logicalunit").args([
            "--tid",
            &tid.to_string(),
            "--lun",
            &lun.to_string(),
            "-b",
            path,
            "--bstype",
            "rdwr",
        ]))
    }

    /// Sets a LUN's SCSI identity: `scsi_id` (the T10 vendor designator of VPD page 0x83) and
    /// `scsi_sn` (the unit serial number, VPD page 0x80), which name the disk in an
    /// initiator's `/dev/disk/by-id`. Values must not contain `,` or `=` (tgtadm's separators)
    /// and are cut to [`SCSI_ID_MAX_LEN`] by tgtd.
    pub fn set_lun_identity(&self, tid: u32, lun: u32, scsi_id: &str, scsi_sn: &str) -> Cmd {
        self.op("update", "logicalunit").args([
            "--tid",
            &tid.to_string(),
            "--lun",
            &lun.to_string(),
            "--params",
            &format!("scsi_id={scsi_id},scsi_sn={scsi_sn}"),
        ])
    }

    /// Removes LUN `lun` (refused with [`Refusal::LunActive`] while commands are queued on it).
    pub fn delete_lun(&self, tid: u32, lun: u32) -> Cmd {
        self.op("delete", "logicalunit").args([
            "--tid",
            &tid.to_string(),
            "--lun",
            &lun.to_string(),
        ])
    }

    /// Allows initiator `name` to log in (name ACL).
    pub fn bind_initiator(&self, tid: u32, name: &str) -> Cmd {
        self.op("bind", "target")
            .args(["--tid", &tid.to_string(), "--initiator-name", name])
    }

    /// Removes initiator `name` from the name ACL.
    pub fn unbind_initiator(&self, tid: u32, name: &str) -> Cmd {
        self.op("unbind", "target")
            .args(["--tid", &tid.to_string(), "--initiator-name", name])
    }

    /// Removes an address ACL entry (`ALL`, an IP or a CIDR). This project never adds one.
    pub fn unbind_address(&self, tid: u32, address: &str) -> Cmd {
        self.op("unbind", "target").args([
            "--tid",
            &tid.to_string(),
            "--initiator-address",
            address,
        ])
    }

    /// Creates a CHAP account. The secret is a [`Cmd::secret_arg`]: redacted from logs (it is
    /// still on tgtadm's command line while it runs: tgtadm takes it no other way).
    pub fn new_account(&self, user: &str, secret: &str) -> Cmd {
        self.op("new", "account")
            .args(["--user", user, "--password"])
            .secret_arg(secret)
    }

    /// Deletes an account (tgtd also unbinds it from every target).
    pub fn delete_account(&self, user: &str) -> Cmd {
        self.op("delete", "account").args(["--user", user])
    }

    /// Binds an account to a target as incoming user: initiators must then log in with CHAP.
    pub fn bind_account(&self, tid: u32, user: &str) -> Cmd {
        self.op("bind", "account")
            .args(["--tid", &tid.to_string(), "--user", user])
    }

    /// Unbinds an account from a target (`outgoing`: the target's mutual-CHAP account).
    pub fn unbind_account(&self, tid: u32, user: &str, outgoing: bool) -> Cmd {
        let c = self
            .op("unbind", "account")
            .args(["--tid", &tid.to_string(), "--user", user]);
        if outgoing {
            c.arg("--outgoing")
        } else {
            c
        }
    }
}

// ---- failures ----------------------------------------------------------------------------

/// Why tgtd refused a request: tgtadm prints `tgtadm: <message>` (tgtd's documented error
/// strings) and exits [`TGTADM_ERR_REFUSED`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// "can't find the target"
    NoTarget,
    /// "this target already exists" (the tid, or another target with the same name)
    TargetExists,
    /// "can't find the logical unit"
    NoLun,
    /// "this logical unit number already exists"
    LunExists,
    /// "this logical unit is still active" (commands queued on it)
    LunActive,
    /// "this target is still active" (sessions; `--force` deletes anyway)
    TargetActive,
    /// "this access control rule already exists"
    AclExists,
    /// "this access control rule does not exist"
    NoAcl,
    /// "this account already exists" (also: already bound to this target)
    AccountExists,
    /// "can't find the account"
    NoAccount,
    /// "invalid request" (e.g. a backing store that cannot be opened)
    InvalidRequest,
    /// Any other message (tgtadm's own argument errors included).
    Other,
}

/// A failed tgtadm call, classified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// tgtd is not running or does not answer on this control port.
    Unavailable,
    /// tgtd (or tgtadm's argument check) refused the request.
    Refused(Refusal),
    /// An exit code tgtadm is not known to use.
    Unknown,
}

/// tgtd's messages, as tgtadm prints them after `tgtadm: `.
const REFUSALS: &[(&str, Refusal)] = &[
    ("can't find the target", Refusal::NoTarget),
    ("this target already exists", Refusal::TargetExists),
    ("can't find the logical unit", Refusal::NoLun),
    (
        "this logical unit number already exists",
        Refusal::LunExists,
    ),
    ("this logical unit is still active", Refusal::LunActive),
    ("this target is still active", Refusal::TargetActive),
    (
        "this access control rule already exists",
        Refusal::AclExists,
    ),
    ("this access control rule does not exist", Refusal::NoAcl),
    ("this account already exists", Refusal::AccountExists),
    ("can't find the account", Refusal::NoAccount),
    ("invalid request", Refusal::InvalidRequest),
];

/// Classifies a tgtadm exit: `None` on success; otherwise by exit code first, then by the
/// documented message.
pub fn classify(code: i32, stderr: &str) -> Option<Failure> {
    match code {
        0 => None,
        TGTADM_ERR_NOT_CONNECTED => Some(Failure::Unavailable),
        TGTADM_ERR_REFUSED => {
            let msg = stderr.trim();
            let reason = REFUSALS
                .iter()
                .find(|(text, _)| msg.contains(text))
                .map_or(Refusal::Other, |(_, r)| *r);
            Some(Failure::Refused(reason))
        }
        // Other connection failures ("can't connect to tgt daemon, ...") exit with a
        // negative errno whose low byte is not worth naming: tgtadm's message is the signal.
        _ if stderr.contains("tgt daemon") => Some(Failure::Unavailable),
        _ => Some(Failure::Unknown),
    }
}

// ---- show output --------------------------------------------------------------------------

/// One target of `tgtadm --op show --mode target`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Target {
    /// Target id.
    pub tid: u32,
    /// Target name.
    pub iqn: String,
    /// "State:" (`ready`, `offline`).
    pub state: String,
    /// Logged-in initiators (I_T nexuses).
    pub nexuses: Vec<Nexus>,
    /// LUNs, LUN 0 (tgtd's controller) included.
    pub luns: Vec<Lun>,
    /// Bound accounts.
    pub accounts: Vec<Account>,
    /// Access control list, in tgtd's order (addresses, then names).
    pub acl: Vec<AclEntry>,
}

impl Target {
    /// LUN `n`, if the target has it.
    pub fn lun(&self, n: u32) -> Option<&Lun> {
        self.luns.iter().find(|l| l.lun == n)
    }

    /// Initiator names of the ACL.
    pub fn acl_names(&self) -> impl Iterator<Item = &str> {
        self.acl.iter().filter_map(|a| match a {
            AclEntry::Name(n) => Some(n.as_str()),
            AclEntry::Address(_) => None,
        })
    }

    /// Addresses of the ACL (`ALL`, IPs, CIDRs).
    pub fn acl_addresses(&self) -> impl Iterator<Item = &str> {
        self.acl.iter().filter_map(|a| match a {
            AclEntry::Address(n) => Some(n.as_str()),
            AclEntry::Name(_) => None,
        })
    }

    /// Whether `user` is bound to this target (incoming or outgoing).
    pub fn has_account(&self, user: &str) -> bool {
        self.accounts.iter().any(|a| a.user == user)
    }
}

/// An I_T nexus: one logged-in initiator session.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Nexus {
    /// Nexus (session) id.
    pub id: u64,
    /// Initiator name.
    pub initiator: String,
    /// Initiator alias ("none" when it sent none).
    pub alias: String,
    /// Connections of the session.
    pub connections: Vec<Connection>,
}

/// A connection of a session.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Connection {
    /// Connection id.
    pub cid: u32,
    /// The initiator's IP address.
    pub address: String,
}

/// A logical unit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Lun {
    /// LUN number.
    pub lun: u32,
    /// "Type:" (`disk`, `controller`, ...).
    pub device_type: String,
    /// "SCSI ID:" (VPD 0x83 T10 designator).
    pub scsi_id: String,
    /// "SCSI SN:" (VPD 0x80 serial number).
    pub scsi_sn: String,
    /// Size in decimal megabytes (10^6 bytes) rounded to the nearest, as tgtd prints it:
    /// 64 MiB shows as 67, 1 GiB as 1074. Only good for "did it change" at MB granularity.
    pub size_mb: u64,
    /// Logical block size in bytes.
    pub block_size: u32,
    /// "Readonly: Yes".
    pub readonly: bool,
    /// "Backing store type:" (`rdwr`, `aio`, `null` for LUN 0).
    pub backing_type: String,
    /// "Backing store path:", `None` for "None".
    pub backing_path: Option<PathBuf>,
}

/// An account bound to a target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    /// User name.
    pub user: String,
    /// Outgoing (mutual CHAP) rather than incoming.
    pub outgoing: bool,
}

/// An ACL entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AclEntry {
    /// `--initiator-address`: `ALL`, an IP address or a CIDR.
    Address(String),
    /// `--initiator-name`.
    Name(String),
}

impl AclEntry {
    /// Tells an address entry from a name: tgtd lists both under "ACL information".
    fn from_show(s: &str) -> Self {
        let ip = s
            .split('/')
            .next()
            .unwrap_or(s)
            .trim_start_matches('[')
            .trim_end_matches(']');
        if s == "ALL" || ip.parse::<IpAddr>().is_ok() {
            AclEntry::Address(s.to_owned())
        } else {
            AclEntry::Name(s.to_owned())
        }
    }
}

/// `show` output that does not read as tgtadm's.
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

fn parse_err(line_no: usize, line: &str, reason: &'static str) -> ParseError {
    ParseError {
        line: line_no + 1,
        reason,
        text: line.to_owned(),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Section {
    None,
    System,
    Nexus,
    Lun,
    Account,
    Acl,
}

/// Parses `tgtadm --op show --mode target` (all targets; empty output: none).
///
/// Unknown keys are skipped (newer tgtd versions add some); a line that does not fit the
/// structure, or a number that is not one, is an error.
pub fn parse_targets(text: &str) -> Result<Vec<Target>, ParseError> {
    let mut targets: Vec<Target> = Vec::new();
    let mut section = Section::None;
    for (no, raw) in text.lines().enumerate() {
        let line = raw.trim_end();
        if line.is_empty() {
            continue;
        }
        let body = line.trim_start();
        let depth = (line.len() - body.len()) / 4;
        let err = |why: &'static str| parse_err(no, raw, why);
        if depth == 0 {
            let rest = body
                .strip_prefix("Target ")
                .ok_or_else(|| err("expected \"Target N: IQN\""))?;
            let (tid, iqn) = rest
                .split_once(": ")
                .ok_or_else(|| err("expected \"Target N: IQN\""))?;
            targets.push(Target {
                tid: tid.parse().map_err(|_| err("bad target id"))?,
                iqn: iqn.trim().to_owned(),
                ..Target::default()
            });
            section = Section::None;
            continue;
        }
        let t = targets
            .last_mut()
            .ok_or_else(|| err("indented line before any target"))?;
        match (depth, section) {
            (1, _) => {
                section = match body {
                    "System information:" => Section::System,
                    "I_T nexus information:" => Section::Nexus,
                    "LUN information:" => Section::Lun,
                    "Account information:" => Section::Account,
                    "ACL information:" => Section::Acl,
                    _ => Section::None, // a section this parser does not know: skipped
                };
            }
            (2, Section::System) => {
                if let Some(v) = body.strip_prefix("State:") {
                    t.state = v.trim().to_owned();
                }
            }
            (2, Section::Nexus) => {
                let id = body
                    .strip_prefix("I_T nexus:")
                    .ok_or_else(|| err("expected \"I_T nexus: N\""))?;
                t.nexuses.push(Nexus {
                    id: id.trim().parse().map_err(|_| err("bad nexus id"))?,
                    ..Nexus::default()
                });
            }
            (3, Section::Nexus) => {
                let n = t
                    .nexuses
                    .last_mut()
                    .ok_or_else(|| err("nexus detail before a nexus"))?;
                if let Some(v) = body.strip_prefix("Initiator:") {
                    let (name, alias) = v.trim().split_once(" alias: ").unwrap_or((v.trim(), ""));
                    n.initiator = name.to_owned();
                    n.alias = alias.to_owned();
                } else if let Some(v) = body.strip_prefix("Connection:") {
                    n.connections.push(Connection {
                        cid: v.trim().parse().map_err(|_| err("bad connection id"))?,
                        address: String::new(),
                    });
                }
            }
            (4, Section::Nexus) => {
                let c = t
                    .nexuses
                    .last_mut()
                    .and_then(|n| n.connections.last_mut())
                    .ok_or_else(|| err("connection detail before a connection"))?;
                if let Some(v) = body.strip_prefix("IP Address:") {
                    c.address = v.trim().to_owned();
                }
            }
            (2, Section::Lun) => {
                let n = body
                    .strip_prefix("LUN:")
                    .ok_or_else(|| err("expected \"LUN: N\""))?;
                t.luns.push(Lun {
                    lun: n.trim().parse().map_err(|_| err("bad LUN number"))?,
                    ..Lun::default()
                });
            }
            (3, Section::Lun) => {
                let l = t
                    .luns
                    .last_mut()
                    .ok_or_else(|| err("LUN detail before a LUN"))?;
                let Some((key, value)) = body.split_once(':') else {
                    continue;
                };
                let value = value.trim();
                match key {
                    "Type" => l.device_type = value.to_owned(),
                    "SCSI ID" => l.scsi_id = value.to_owned(),
                    "SCSI SN" => l.scsi_sn = value.to_owned(),
                    "Size" => {
                        // "67 MB, Block size: 512"
                        let (size, block) = value
                            .split_once(", Block size:")
                            .ok_or_else(|| err("expected \"N MB, Block size: N\""))?;
                        let mb = size
                            .trim()
                            .strip_suffix(" MB")
                            .ok_or_else(|| err("size not in MB"))?;
                        l.size_mb = mb.trim().parse().map_err(|_| err("bad size"))?;
                        l.block_size = block.trim().parse().map_err(|_| err("bad block size"))?;
                    }
                    "Readonly" => l.readonly = value == "Yes",
                    "Backing store type" => l.backing_type = value.to_owned(),
                    "Backing store path" => {
                        l.backing_path =
                            (value != "None" && !value.is_empty()).then(|| PathBuf::from(value));
                    }
                    _ => {}
                }
            }
            (2, Section::Account) => {
                let (user, outgoing) = match body.strip_suffix(" (outgoing)") {
                    Some(u) => (u, true),
                    None => (body, false),
                };
                t.accounts.push(Account {
                    user: user.to_owned(),
                    outgoing,
                });
            }
            (2, Section::Acl) => t.acl.push(AclEntry::from_show(body)),
            (_, Section::None) => {} // inside a skipped section
            _ => return Err(err("unexpected indentation")),
        }
    }
    Ok(targets)
}

/// Parses `tgtadm --op show --mode account`: the user names (empty output: none).
pub fn parse_accounts(text: &str) -> Result<Vec<String>, ParseError> {
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    match lines.next() {
        None => return Ok(Vec::new()),
        Some((_, l)) if l.trim_end() == "Account list:" => {}
        Some((no, l)) => return Err(parse_err(no, l, "expected \"Account list:\"")),
    }
    lines
        .map(|(no, l)| {
            if l.starts_with(' ') {
                Ok(l.trim().to_owned())
            } else {
                Err(parse_err(no, l, "expected an indented user name"))
            }
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report
mod tests {
    use super::*;

    const SHOW_TARGET: &str = include_str!("../../tests/fixtures/tgtadm/show_target.txt");
    const SHOW_TARGET_EMPTY: &str =
        include_str!("../../tests/fixtures/tgtadm/show_target_empty.txt");
    const SHOW_ACCOUNT: &str = include_str!("../../tests/fixtures/tgtadm/show_account.txt");
    const SHOW_ACCOUNT_EMPTY: &str =
        include_str!("../../tests/fixtures/tgtadm/show_account_empty.txt");
    const ERRORS: &str = include_str!("../../tests/fixtures/tgtadm/errors.tsv");

    fn argv(c: &Cmd) -> Vec<&str> {
        std::iter::once(c.program())
            .chain(c.argv().iter().map(String::as_str))
            .collect()
    }

    #[test]
    fn control_port_zero_means_default_socket() {
        assert_eq!(
            argv(&Tgtadm::new(0).show_sys()),
            ["tgtadm", "--lld", "iscsi", "--op", "show", "--mode", "sys"]
        );
        assert_eq!(
            argv(&Tgtadm::new(4711).show_targets()),
            ["tgtadm", "-C", "4711", "--lld", "iscsi", "--op", "show", "--mode", "target"]
        );
        assert_eq!(
            argv(&Tgtadm::new(4711).show_accounts()),
            ["tgtadm", "-C", "4711", "--lld", "iscsi", "--op", "show", "--mode", "account"]
        );
        assert_eq!(
            (
                Tgtadm::new(0).socket_path(),
                Tgtadm::new(4711).socket_path()
            ),
            (
                PathBuf::from("/var/run/tgtd/socket.0"),
                PathBuf::from("/var/run/tgtd/socket.4711")
            )
        );
    }

    #[test]
    fn target_argv() {
        let t = Tgtadm::new(7);
        let iqn = "iqn.2026-01.dev.cinderblock:volume-a";
        assert_eq!(
            argv(&t.new_target(3, iqn)),
            [
                "tgtadm",
                "-C",
                "7",
                "--lld",
                "iscsi",
                "--op",
                "new",
                "--mode",
                "target",
                "--tid",
                "3",
                "--targetname",
                iqn
            ]
        );
        assert_eq!(
            argv(&t.delete_target(3)),
            [
                "tgtadm", "-C", "7", "--lld", "iscsi", "--op", "delete", "--mode", "target",
                "--force", "--tid", "3"
            ]
        );
    }

    #[test]
    fn lun_argv() {
        let t = Tgtadm::new(0);
        let new = t.new_lun(3, 1, Path::new("/srv/pool/volume-a")).unwrap();
        assert_eq!(
            argv(&new),
            [
                "tgtadm",
                "--lld",
                "iscsi",
                "--op",
                "new",
                "--mode",
                "logicalunit",
                "--tid",
                "3",
                "--lun",
                "1",
                "-b",
                "/srv/pool/volume-a",
                "--bstype",
                "rdwr"
            ]
        );
        assert_eq!(
            argv(&t.set_lun_identity(3, 1, "5f0c-ab12", "5f0c-ab12")),
            [
                "tgtadm",
                "--lld",
                "iscsi",
                "--op",
                "update",
                "--mode",
                "logicalunit",
                "--tid",
                "3",
                "--lun",
                "1",
                "--params",
                "scsi_id=5f0c-ab12,scsi_sn=5f0c-ab12"
            ]
        );
        assert_eq!(
            argv(&t.delete_lun(3, 1)),
            [
                "tgtadm",
                "--lld",
                "iscsi",
                "--op",
                "delete",
                "--mode",
                "logicalunit",
                "--tid",
                "3",
                "--lun",
                "1"
            ]
        );
        use std::os::unix::ffi::OsStrExt;
        let not_utf8 = Path::new(std::ffi::OsStr::from_bytes(b"/srv/\xff"));
        assert_eq!(t.new_lun(3, 1, not_utf8).map(|c| c.display()), None);
    }

    #[test]
    fn acl_argv_uses_name_acl_and_address_only_to_remove() {
        let t = Tgtadm::new(0);
        let a = "iqn.1993-08.org.debian:01:a";
        assert_eq!(
            argv(&t.bind_initiator(3, a)),
            [
                "tgtadm",
                "--lld",
                "iscsi",
                "--op",
                "bind",
                "--mode",
                "target",
                "--tid",
                "3",
                "--initiator-name",
                a
            ]
        );
        assert_eq!(
            argv(&t.unbind_initiator(3, a)),
            [
                "tgtadm",
                "--lld",
                "iscsi",
                "--op",
                "unbind",
                "--mode",
                "target",
                "--tid",
                "3",
                "--initiator-name",
                a
            ]
        );
        assert_eq!(
            argv(&t.unbind_address(3, "ALL")),
            [
                "tgtadm",
                "--lld",
                "iscsi",
                "--op",
                "unbind",
                "--mode",
                "target",
                "--tid",
                "3",
                "--initiator-address",
                "ALL"
            ]
        );
    }

    #[test]
    fn account_argv_redacts_the_secret() {
        let t = Tgtadm::new(9);
        let new = t.new_account("cb-5f0cab12", "0123456789abcdef01234567");
        assert_eq!(
            argv(&new),
            [
                "tgtadm",
                "-C",
                "9",
                "--lld",
                "iscsi",
                "--op",
                "new",
                "--mode",
                "account",
                "--user",
                "cb-5f0cab12",
                "--password",
                "0123456789abcdef01234567"
            ]
        );
        assert_eq!(
            new.display(),
            "tgtadm -C 9 --lld iscsi --op new --mode account --user cb-5f0cab12 --password ***"
        );
        assert_eq!(
            argv(&t.delete_account("cb-x")),
            [
                "tgtadm", "-C", "9", "--lld", "iscsi", "--op", "delete", "--mode", "account",
                "--user", "cb-x"
            ]
        );
        assert_eq!(
            argv(&t.bind_account(3, "cb-x")),
            [
                "tgtadm", "-C", "9", "--lld", "iscsi", "--op", "bind", "--mode", "account",
                "--tid", "3", "--user", "cb-x"
            ]
        );
        assert_eq!(
            argv(&t.unbind_account(3, "cb-x", false)),
            [
                "tgtadm", "-C", "9", "--lld", "iscsi", "--op", "unbind", "--mode", "account",
                "--tid", "3", "--user", "cb-x"
            ]
        );
        assert_eq!(
            argv(&t.unbind_account(3, "out", true)).last().copied(),
            Some("--outgoing")
        );
    }

    #[test]
    fn parses_captured_targets() {
        let targets = parse_targets(SHOW_TARGET).unwrap();
        assert_eq!(
            targets
                .iter()
                .map(|t| (t.tid, t.iqn.as_str()))
                .collect::<Vec<_>>(),
            [
                (1, "iqn.2010-10.org.openstack:volume-foreign"),
                (7, "iqn.2026-01.dev.cinderblock:volume-5f0c-ab12"),
                (9, "iqn.2026-01.dev.cinderblock:volume-half"),
            ]
        );

        let ours = &targets[1];
        let lun0 = Lun {
            lun: 0,
            device_type: "controller".into(),
            scsi_id: "IET     00070000".into(),
            scsi_sn: "beaf70".into(),
            size_mb: 0,
            block_size: 1,
            readonly: false,
            backing_type: "null".into(),
            backing_path: None,
        };
        let lun1 = Lun {
            lun: 1,
            device_type: "disk".into(),
            scsi_id: "5f0c-ab12".into(),
            scsi_sn: "5f0c-ab12".into(),
            size_mb: 67,
            block_size: 512,
            readonly: false,
            backing_type: "rdwr".into(),
            backing_path: Some("/srv/cinderblock/volume-5f0c-ab12.img".into()),
        };
        let nexus = |id, who: &str| Nexus {
            id,
            initiator: format!("iqn.2025-01.io.cinderblock.test:{who}"),
            alias: "none".into(),
            connections: vec![Connection {
                cid: 0,
                address: "127.0.0.1".into(),
            }],
        };
        assert_eq!(
            ours,
            &Target {
                tid: 7,
                iqn: "iqn.2026-01.dev.cinderblock:volume-5f0c-ab12".into(),
                state: "ready".into(),
                nexuses: vec![nexus(1, "node-a"), nexus(2, "node-b")],
                luns: vec![lun0, lun1.clone()],
                accounts: vec![Account {
                    user: "cb-5f0cab12".into(),
                    outgoing: false
                }],
                acl: vec![
                    AclEntry::Name("iqn.2025-01.io.cinderblock.test:node-a".into()),
                    AclEntry::Name("iqn.2025-01.io.cinderblock.test:node-b".into()),
                ],
            }
        );
        assert_eq!(ours.lun(1), Some(&lun1));
        assert_eq!(ours.lun(2), None);

        let foreign = &targets[0];
        assert_eq!(
            foreign
                .luns
                .iter()
                .map(|l| (l.lun, l.size_mb, l.backing_type.as_str()))
                .collect::<Vec<_>>(),
            [(0, 0, "null"), (1, 1074, "rdwr"), (2, 10, "aio")]
        );
        assert_eq!(
            foreign.accounts,
            [
                Account {
                    user: "foreign-in".into(),
                    outgoing: false
                },
                Account {
                    user: "foreign-out".into(),
                    outgoing: true
                },
            ]
        );
        assert_eq!(
            foreign.acl_addresses().collect::<Vec<_>>(),
            ["ALL", "192.0.2.0/24"]
        );
        assert_eq!(
            foreign.acl_names().collect::<Vec<_>>(),
            ["iqn.1993-08.org.debian:01:foreign"]
        );
        assert_eq!(foreign.nexuses, []);

        let half = &targets[2];
        assert_eq!(
            (
                half.luns.len(),
                half.accounts.len(),
                half.acl.len(),
                half.state.as_str()
            ),
            (1, 0, 0, "ready")
        );
    }

    #[test]
    fn parses_no_targets() {
        assert_eq!(SHOW_TARGET_EMPTY, "");
        assert_eq!(parse_targets(SHOW_TARGET_EMPTY).unwrap(), []);
    }

    #[test]
    fn rejects_what_is_not_a_target_listing() {
        let target = "Target 1: iqn.a:b\n";
        for (bad, want) in [
            ("Target x: iqn.a:b\n".to_owned(), (1, "bad target id")),
            (
                "Something else\n".to_owned(),
                (1, "expected \"Target N: IQN\""),
            ),
            (
                "    LUN information:\n".to_owned(),
                (1, "indented line before any target"),
            ),
            (
                format!("{target}    LUN information:\n        LUN: one\n"),
                (3, "bad LUN number"),
            ),
            (
                format!("{target}    LUN information:\n        LUN: 1\n            Size: big\n"),
                (4, "expected \"N MB, Block size: N\""),
            ),
            (
                format!("{target}    I_T nexus information:\n            Initiator: iqn.x\n"),
                (3, "nexus detail before a nexus"),
            ),
            (
                format!("{target}    ACL information:\n            iqn.x\n"),
                (3, "unexpected indentation"),
            ),
        ] {
            let err = parse_targets(&bad).unwrap_err();
            assert_eq!((err.line, err.reason), want, "{bad:?}");
        }
    }

    #[test]
    fn skips_unknown_keys_and_sections() {
        let text = "Target 2: iqn.a:b\n    System information:\n        Driver: iscsi\n        \
                    State: ready\n        Nop interval: 5\n    Portal information:\n        \
                    Portal: 1.2.3.4:3260,1\n    LUN information:\n        LUN: 1\n            \
                    Future key: whatever\n            Size: 2 MB, Block size: 4096\n";
        let t = parse_targets(text).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!((t[0].luns[0].size_mb, t[0].luns[0].block_size), (2, 4096));
    }

    #[test]
    fn acl_entries_are_told_apart() {
        for (s, want) in [
            ("ALL", AclEntry::Address("ALL".into())),
            ("10.0.0.1", AclEntry::Address("10.0.0.1".into())),
            ("192.0.2.0/24", AclEntry::Address("192.0.2.0/24".into())),
            ("fe80::1", AclEntry::Address("fe80::1".into())),
            ("iqn.2025-01.x:y", AclEntry::Name("iqn.2025-01.x:y".into())),
            (
                "eui.0123456789abcdef",
                AclEntry::Name("eui.0123456789abcdef".into()),
            ),
        ] {
            assert_eq!(AclEntry::from_show(s), want, "{s}");
        }
    }

    #[test]
    fn parses_captured_accounts() {
        assert_eq!(
            parse_accounts(SHOW_ACCOUNT).unwrap(),
            ["cb-5f0cab12", "foreign-out", "foreign-in"]
        );
        assert_eq!(
            parse_accounts(SHOW_ACCOUNT_EMPTY).unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(
            parse_accounts("Accounts:\n  a\n"),
            Err(ParseError {
                line: 1,
                reason: "expected \"Account list:\"",
                text: "Accounts:".into()
            })
        );
    }

    #[test]
    fn classifies_captured_failures() {
        use Failure::*;
        use Refusal::*;
        let want = [
            ("target_exists", Refused(TargetExists)),
            ("target_name_exists", Refused(TargetExists)),
            ("no_target", Refused(NoTarget)),
            ("no_target_show", Refused(NoTarget)),
            ("lun_exists", Refused(LunExists)),
            ("no_lun", Refused(NoLun)),
            ("no_backing", Refused(InvalidRequest)),
            ("acl_exists", Refused(AclExists)),
            ("no_acl", Refused(NoAcl)),
            ("account_exists", Refused(AccountExists)),
            ("account_bound", Refused(AccountExists)),
            ("no_account", Refused(NoAccount)),
            ("no_account_delete", Refused(NoAccount)),
            ("params_on_new", Refused(Other)),
            ("tid_zero", Refused(Other)),
            ("control_port_out_of_range", Refused(Other)),
            ("tgtd_not_running", Unavailable),
        ];
        let got: Vec<(&str, Failure)> = ERRORS
            .lines()
            .map(|l| {
                let mut f = l.splitn(3, '\t');
                let (name, code, stderr) =
                    (f.next().unwrap(), f.next().unwrap(), f.next().unwrap());
                (name, classify(code.parse().unwrap(), stderr).unwrap())
            })
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn classifies_by_exit_code_first() {
        assert_eq!(classify(0, "tgtadm: can't find the target"), None);
        // Same words, other exit code: not a refusal.
        assert_eq!(
            classify(1, "tgtadm: can't find the target"),
            Some(Failure::Unknown)
        );
        assert_eq!(
            classify(TGTADM_ERR_NOT_CONNECTED, ""),
            Some(Failure::Unavailable)
        );
        assert_eq!(
            classify(
                -1,
                "tgtadm: can't connect to tgt daemon, Connection refused"
            ),
            Some(Failure::Unavailable)
        );
        assert_eq!(
            classify(
                TGTADM_ERR_REFUSED,
                "tgtadm: this logical unit is still active\n"
            ),
            Some(Failure::Refused(Refusal::LunActive))
        );
    }
}
