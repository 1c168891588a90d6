//! LVM2 as the agent drives it: argv builders, the one function that runs `lvm`, exit-code
//! classification and JSON report parsing. Block-level data commands used beside LVM (zeroing
//! and copying an LV) are here too.
//!
//! Every LVM command runs as `lvm <subcommand> ...` through [`lvm`]: `LC_ALL=C` (set by
//! [`Runner::run`]), a deadline, and for reports `--reportformat json --units b --nosuffix`
//! so that sizes are exact byte counts. Sizes passed to LVM are bytes with the `b` suffix
//! (LVM requires multiples of 512; callers pass multiples of the extent size).
//!
//! Failures are classified by exit code first, then by a documented stderr line. LVM exits 5
//! (`ECMD_FAILED`) for nearly every failure, so the code alone says little; the stderr
//! patterns below were captured from LVM 2.03.16 (Debian bookworm, the guest's version) and
//! are pinned by tests against `tests/fixtures/lvm/`.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime};

use serde::Deserialize;

use super::{Cmd, ExecError, Output, Runner};
use crate::types::Bytes;

/// The program every LVM command goes through (`lvm lvs ...`, `lvm lvcreate ...`).
pub const LVM: &str = "lvm";

/// Deadline of one LVM command, counted from when it starts: commands that change a VG's
/// metadata wait for their turn in [`lvm`] first, untimed. Metadata operations take about a
/// second in the test guest; the margin covers a report waiting for LVM's VG lock behind the
/// one running change.
pub const LVM_TIMEOUT: Duration = Duration::from_secs(120);

/// `EINVALID_CMD_LINE`: the arguments were rejected before anything was done (a bad tag, a
/// size that is not a multiple of 512). A bug on our side, never the storage's state.
pub const LVM_EXIT_INVALID_CMD_LINE: i32 = 3;

/// `ECMD_FAILED`: the command ran and failed. The stderr line tells why.
pub const LVM_EXIT_FAILED: i32 = 5;

/// stderr of `lvs|lvchange|lvremove VG/LV` when the LV does not exist:
/// `  Failed to find logical volume "VG/LV"`.
pub const STDERR_LV_NOT_FOUND: &str = "Failed to find logical volume \"";

/// stderr of `lvextend VG/LV` when the LV does not exist:
/// `  Logical volume LV not found in volume group VG.`
pub const STDERR_LV_NOT_IN_VG: &str = " not found in volume group ";

/// stderr of any command naming a VG that does not exist: `  Volume group "VG" not found`
/// (prefix and suffix of the line).
pub const STDERR_VG_NOT_FOUND: (&str, &str) = ("Volume group \"", "\" not found");

/// stderr of `lvcreate -n LV` when the name is taken:
/// `  Logical Volume "LV" already exists in volume group "VG"`.
pub const STDERR_LV_EXISTS: &str = " already exists in volume group ";

/// stderr of `lvcreate`/`lvextend` when the VG is full, in either of its spellings:
/// `  Volume group "VG" has insufficient free space (495 extents): 20480 required.` and
/// `  Insufficient free space: 20464 extents needed, but only 495 available`
/// (matched without regard to case).
pub const STDERR_NO_SPACE: &str = "insufficient free space";

/// Errors of LVM commands.
#[derive(Debug, thiserror::Error)]
pub enum LvmError {
    /// Exit 5 with a "not found" line: the named LV does not exist.
    #[error("lvm {command}: not found: {stderr}")]
    NotFound {
        /// Subcommand and target, e.g. `lvremove vg/volume-1`.
        command: String,
        /// The matching stderr text.
        stderr: String,
    },
    /// Exit 5 with `Volume group "VG" not found`: the VG itself is missing (kept apart from
    /// [`LvmError::NotFound`] so that a vanished VG never reads as an already deleted LV).
    #[error("lvm {command}: {stderr}")]
    VgNotFound {
        /// Subcommand and target.
        command: String,
        /// The matching stderr text.
        stderr: String,
    },
    /// Exit 5: an LV of that name already exists.
    #[error("lvm {command}: already exists: {stderr}")]
    AlreadyExists {
        /// Subcommand and target.
        command: String,
        /// The matching stderr text.
        stderr: String,
    },
    /// Exit 5: not enough free extents.
    #[error("lvm {command}: {stderr}")]
    NoSpace {
        /// Subcommand and target.
        command: String,
        /// The matching stderr text.
        stderr: String,
    },
    /// Any other failure: a non-zero exit without a known pattern, a timeout, a spawn error.
    #[error("lvm {command} failed")]
    Failed {
        /// Subcommand and target.
        command: String,
        /// What happened.
        #[source]
        source: ExecError,
    },
    /// The report could not be parsed.
    #[error("cannot parse lvm {command} report: {reason}")]
    Parse {
        /// Subcommand and target.
        command: String,
        /// What was wrong.
        reason: String,
    },
}

/// One LVM command: a subcommand of `lvm` and its arguments, made by the builders below.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LvmCmd {
    args: Vec<String>,
    timeout: Duration,
    /// The VG the command reads or changes.
    vg: String,
    /// Whether it changes the VG's metadata (reports do not).
    changes: bool,
}

impl LvmCmd {
    /// A command that changes the metadata of `vg`.
    fn change(subcommand: &str, vg: &str) -> Self {
        LvmCmd {
            args: vec![subcommand.to_owned()],
            timeout: LVM_TIMEOUT,
            vg: vg.to_owned(),
            changes: true,
        }
    }

    /// A report on `vg`.
    fn report(subcommand: &str, vg: &str) -> Self {
        LvmCmd {
            changes: false,
            ..LvmCmd::change(subcommand, vg)
        }
    }

    /// Whether the command changes its VG's metadata (and so waits for its turn in [`lvm`]).
    pub fn changes_metadata(&self) -> bool {
        self.changes
    }

    fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }

    fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Adds `--addtag T` for each tag.
    fn add_tags(mut self, tags: &[String]) -> Self {
        for t in tags {
            self.args.push("--addtag".into());
            self.args.push(t.clone());
        }
        self
    }

    /// Arguments after `lvm`, subcommand first.
    pub fn argv(&self) -> &[String] {
        &self.args
    }

    /// The command for [`Runner::run`].
    pub fn to_cmd(&self) -> Cmd {
        Cmd::new(LVM)
            .args(self.args.iter().cloned())
            .timeout(self.timeout)
    }

    /// Subcommand and last argument (the target), for messages.
    fn label(&self) -> String {
        match (self.args.first(), self.args.last()) {
            (Some(s), Some(t)) if self.args.len() > 1 => format!("{s} {t}"),
            (Some(s), _) => s.clone(),
            _ => String::new(),
        }
    }
}

/// The queue of metadata changes to `vg` in this process.
///
/// LVM serialises changes to a VG with a file lock, but a command blocked on that lock has its
/// deadline running: fifty concurrent creates made the last ones time out while they had not
/// started. Waiting here instead (a fair queue) starts each deadline when the command runs,
/// and one `lvm` process at a time scans the devices instead of fifty. Reports do not queue:
/// they wait at most for the one change that is running.
fn vg_queue(vg: &str) -> Arc<tokio::sync::Mutex<()>> {
    /// One queue per VG name, made on first use and kept (a handful of VGs per agent). The
    /// outer lock protects the map only and is never held across an await.
    static QUEUES: LazyLock<std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>> =
        LazyLock::new(Default::default);
    let mut queues = QUEUES.lock().unwrap_or_else(|p| p.into_inner());
    queues.entry(vg.to_owned()).or_default().clone()
}

/// Waits for `vg`'s turn in this process's queue of metadata changes and holds it until the
/// guard drops: for work on the VG's devices that no LVM change may run beside (a thin pool's
/// metadata snapshot). Run only reports while holding it: a change would wait for itself.
pub async fn vg_turn(vg: &str) -> tokio::sync::OwnedMutexGuard<()> {
    vg_queue(vg).lock_owned().await
}

/// Runs an LVM command; exit 0 or a classified [`LvmError`]. Every LVM call goes through here.
/// Commands that change a VG's metadata run one at a time per VG, in the order they came.
pub async fn lvm(runner: &Runner, cmd: &LvmCmd) -> Result<Output, LvmError> {
    let command = cmd.label();
    let queue = cmd.changes.then(|| vg_queue(&cmd.vg));
    let _turn = match &queue {
        Some(q) => Some(q.lock().await),
        None => None,
    };
    let out = runner
        .run(&cmd.to_cmd())
        .await
        .map_err(|source| LvmError::Failed {
            command: command.clone(),
            source,
        })?;
    classify(command, out)
}

/// Maps a finished command to `Ok` or the error its exit code and stderr describe.
pub fn classify(command: String, out: Output) -> Result<Output, LvmError> {
    if out.success() {
        return Ok(out);
    }
    let lines = || out.stderr.lines().map(str::trim);
    let line = |pred: &dyn Fn(&str) -> bool| lines().find(|l| pred(l)).map(str::to_owned);
    if out.code == LVM_EXIT_FAILED {
        let vg_missing =
            line(&|l| l.starts_with(STDERR_VG_NOT_FOUND.0) && l.ends_with(STDERR_VG_NOT_FOUND.1));
        if let Some(stderr) = vg_missing {
            return Err(LvmError::VgNotFound { command, stderr });
        }
        let lv_missing =
            line(&|l| l.starts_with(STDERR_LV_NOT_FOUND) || l.contains(STDERR_LV_NOT_IN_VG));
        if let Some(stderr) = lv_missing {
            return Err(LvmError::NotFound { command, stderr });
        }
        if let Some(stderr) = line(&|l| l.contains(STDERR_LV_EXISTS)) {
            return Err(LvmError::AlreadyExists { command, stderr });
        }
        if let Some(stderr) = line(&|l| l.to_ascii_lowercase().contains(STDERR_NO_SPACE)) {
            return Err(LvmError::NoSpace { command, stderr });
        }
    }
    Err(LvmError::Failed {
        source: ExecError::Failed {
            program: format!("{LVM} {command}"),
            code: out.code,
            stderr: out.stderr.trim().to_owned(),
        },
        command,
    })
}

// ---------------------------------------------------------------------------------------
// Reports

/// Fields of `lvs` reports. LV fields only: a segment field (`segtype`, `seg_*`) makes `lvs`
/// print one row per segment, so an LV grown into a second segment would appear twice (seen on
/// a thick origin extended after its snapshot took the next extents). The LV's kind comes
/// from `lv_attr` instead.
pub const LV_FIELDS: &str =
    "lv_name,vg_name,lv_size,lv_attr,lv_tags,origin,pool_lv,data_percent,lv_time,lv_active";

/// Fields of `vgs` reports.
pub const VG_FIELDS: &str = "vg_name,vg_size,vg_free,vg_extent_size,vg_extent_count,vg_free_count";

/// Common options of every report: JSON, exact bytes, times as Unix seconds.
fn report(subcommand: &str, vg: &str, fields: &str) -> LvmCmd {
    LvmCmd::report(subcommand, vg).args([
        "--reportformat",
        "json",
        "--units",
        "b",
        "--nosuffix",
        "--config",
        "report/time_format=\"%s\"",
        "-o",
        fields,
    ])
}

/// `lvs` of every LV of `vg` (hidden LVs excluded), or of one LV.
pub fn lvs(vg: &str, lv: Option<&str>) -> LvmCmd {
    let target = match lv {
        Some(lv) => format!("{vg}/{lv}"),
        None => vg.to_owned(),
    };
    report("lvs", vg, LV_FIELDS).arg(target)
}

/// `lvs` of some thin LVs of `vg`, named: one report for all of them, with their thin
/// device ids (`Lv::thin_id`).
pub fn lvs_named(vg: &str, lvs: &[&str]) -> LvmCmd {
    report("lvs", vg, &format!("{LV_FIELDS},thin_id"))
        .args(lvs.iter().map(|lv| format!("{vg}/{lv}")))
}

/// `lvs` of the thin device ids of some thin LVs of `vg`: the ids the thin pool's metadata
/// knows them by.
pub fn thin_ids(vg: &str, lvs: &[&str]) -> LvmCmd {
    report("lvs", vg, "lv_name,thin_id").args(lvs.iter().map(|lv| format!("{vg}/{lv}")))
}

/// Parses the JSON of a [`thin_ids`] command: (LV name, thin id) pairs.
pub fn parse_thin_ids(json: &str) -> Result<Vec<(String, u64)>, LvmError> {
    #[derive(Deserialize)]
    struct Raw {
        lv_name: String,
        thin_id: String,
    }
    #[derive(Deserialize)]
    struct Section {
        lv: Vec<Raw>,
    }
    let c = "lvs";
    let r: Report<Section> = serde_json::from_str(json).map_err(|e| parse_err(c, e.to_string()))?;
    r.report
        .into_iter()
        .flat_map(|s| s.lv)
        .map(|raw| {
            let id = raw.thin_id.parse().map_err(|_| {
                parse_err(
                    c,
                    format!(
                        "thin_id {:?} of {} is not a number",
                        raw.thin_id, raw.lv_name
                    ),
                )
            })?;
            Ok((raw.lv_name, id))
        })
        .collect()
}

/// `vgs` of one VG.
pub fn vgs(vg: &str) -> LvmCmd {
    report("vgs", vg, VG_FIELDS).arg(vg)
}

/// One logical volume, as `lvs` reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct Lv {
    /// LV name.
    pub name: String,
    /// VG name.
    pub vg: String,
    /// Size: the virtual size of a thin LV, the COW area of a thick snapshot.
    pub size: Bytes,
    /// The 10 attribute characters (`lvs(8)`).
    pub attr: String,
    /// Tags, as LVM sorts them.
    pub tags: Vec<String>,
    /// Origin LV of a snapshot (thick or thin).
    pub origin: Option<String>,
    /// Thin pool of a thin LV.
    pub pool: Option<String>,
    /// Allocated share of a thin LV or thin pool, or used share of a thick snapshot's COW
    /// area, in percent; `None` when inactive (the kernel reports it).
    pub data_percent: Option<f64>,
    /// Creation time.
    pub created: Option<SystemTime>,
    /// Active on this host; `None` when LVM cannot tell (no device-mapper).
    pub active: Option<bool>,
    /// The id the thin pool's metadata knows a thin LV by, where the report has it
    /// ([`lvs_named`]).
    pub thin_id: Option<u64>,
}

impl Lv {
    fn attr_char(&self, i: usize) -> Option<char> {
        self.attr.chars().nth(i)
    }

    /// A thick LV with (thick) snapshots: `o` in the first attribute.
    pub fn is_thick_origin(&self) -> bool {
        self.attr_char(0) == Some('o')
    }

    /// A thick (copy-on-write) snapshot: `s` in the first attribute.
    pub fn is_thick_snapshot(&self) -> bool {
        self.attr_char(0) == Some('s')
    }

    /// A thin pool: `t` in the first attribute.
    pub fn is_thin_pool(&self) -> bool {
        self.attr_char(0) == Some('t')
    }

    /// A thin pool that zeroes newly provisioned blocks (`z` in the eighth attribute), so a
    /// thin LV never shows another LV's old data.
    pub fn zeroes_new_blocks(&self) -> bool {
        self.attr_char(7) == Some('z')
    }

    /// Allocated bytes, from `data_percent` (thin LVs); `None` when not reported.
    pub fn allocated(&self) -> Option<Bytes> {
        self.data_percent.map(|p| percent_of(self.size, p))
    }
}

/// `size * percent / 100`, truncated to whole bytes.
pub fn percent_of(size: Bytes, percent: f64) -> Bytes {
    let p = percent.clamp(0.0, 100.0);
    Bytes((size.get() as f64 * p / 100.0) as u64)
}

/// One volume group, as `vgs` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vg {
    /// VG name.
    pub name: String,
    /// Size.
    pub size: Bytes,
    /// Free space.
    pub free: Bytes,
    /// Extent size: the allocation unit.
    pub extent_size: Bytes,
    /// Number of extents.
    pub extent_count: u64,
    /// Number of free extents.
    pub free_count: u64,
}

#[derive(Deserialize)]
struct Report<T> {
    report: Vec<T>,
}

#[derive(Deserialize)]
struct LvSection {
    lv: Vec<RawLv>,
}

#[derive(Deserialize)]
struct VgSection {
    vg: Vec<RawVg>,
}

#[derive(Deserialize)]
struct RawLv {
    lv_name: String,
    vg_name: String,
    lv_size: String,
    lv_attr: String,
    lv_tags: String,
    origin: String,
    pool_lv: String,
    data_percent: String,
    lv_time: String,
    lv_active: String,
    #[serde(default)]
    thin_id: String,
}

#[derive(Deserialize)]
struct RawVg {
    vg_name: String,
    vg_size: String,
    vg_free: String,
    vg_extent_size: String,
    vg_extent_count: String,
    vg_free_count: String,
}

fn parse_err(command: &str, reason: impl Into<String>) -> LvmError {
    LvmError::Parse {
        command: command.to_owned(),
        reason: reason.into(),
    }
}

fn num(command: &str, field: &str, v: &str) -> Result<u64, LvmError> {
    v.parse()
        .map_err(|_| parse_err(command, format!("{field} {v:?} is not a byte count")))
}

fn opt(v: String) -> Option<String> {
    Some(v).filter(|s| !s.is_empty())
}

/// Parses the JSON of an [`lvs`] command.
pub fn parse_lvs(json: &str) -> Result<Vec<Lv>, LvmError> {
    let c = "lvs";
    let r: Report<LvSection> =
        serde_json::from_str(json).map_err(|e| parse_err(c, e.to_string()))?;
    let mut out = Vec::new();
    for raw in r.report.into_iter().flat_map(|s| s.lv) {
        let data_percent = match raw.data_percent.as_str() {
            "" => None,
            p => Some(
                p.parse::<f64>()
                    .map_err(|_| parse_err(c, format!("data_percent {p:?}")))?,
            ),
        };
        let created = match raw.lv_time.as_str() {
            "" => None,
            t => Some(SystemTime::UNIX_EPOCH + Duration::from_secs(num(c, "lv_time", t)?)),
        };
        let active = match raw.lv_active.as_str() {
            "active" => Some(true),
            "" => Some(false),
            _ => None,
        };
        let thin_id = match raw.thin_id.as_str() {
            "" => None,
            id => Some(
                id.parse::<u64>()
                    .map_err(|_| parse_err(c, format!("thin_id {id:?}")))?,
            ),
        };
        out.push(Lv {
            size: Bytes(num(c, "lv_size", &raw.lv_size)?),
            tags: raw
                .lv_tags
                .split(',')
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
                .collect(),
            name: raw.lv_name,
            vg: raw.vg_name,
            attr: raw.lv_attr,
            origin: opt(raw.origin),
            pool: opt(raw.pool_lv),
            data_percent,
            created,
            active,
            thin_id,
        });
    }
    Ok(out)
}

/// Parses the JSON of a [`vgs`] command.
pub fn parse_vgs(json: &str) -> Result<Vec<Vg>, LvmError> {
    let c = "vgs";
    let r: Report<VgSection> =
        serde_json::from_str(json).map_err(|e| parse_err(c, e.to_string()))?;
    r.report
        .into_iter()
        .flat_map(|s| s.vg)
        .map(|raw| {
            Ok(Vg {
                size: Bytes(num(c, "vg_size", &raw.vg_size)?),
                free: Bytes(num(c, "vg_free", &raw.vg_free)?),
                extent_size: Bytes(num(c, "vg_extent_size", &raw.vg_extent_size)?),
                extent_count: num(c, "vg_extent_count", &raw.vg_extent_count)?,
                free_count: num(c, "vg_free_count", &raw.vg_free_count)?,
                name: raw.vg_name,
            })
        })
        .collect()
}

/// Runs [`lvs`] and parses it.
pub async fn list_lvs(runner: &Runner, vg: &str, lv: Option<&str>) -> Result<Vec<Lv>, LvmError> {
    let out = lvm(runner, &lvs(vg, lv)).await?;
    parse_lvs(&out.stdout)
}

/// Runs [`vgs`] for one VG and parses it.
pub async fn show_vg(runner: &Runner, vg: &str) -> Result<Vg, LvmError> {
    let out = lvm(runner, &vgs(vg)).await?;
    parse_vgs(&out.stdout)?
        .into_iter()
        .find(|v| v.name == vg)
        .ok_or_else(|| parse_err("vgs", format!("no VG {vg:?} in the report")))
}

// ---------------------------------------------------------------------------------------
// Changes

fn bytes_arg(b: Bytes) -> String {
    format!("{}b", b.get())
}

/// What `lvcreate` makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NewLv<'a> {
    /// A plain (linear) LV. Its first 4 KiB are zeroed and known signatures wiped, so a new
    /// volume never shows a previous volume's filesystem; the rest is not cleared.
    Thick {
        /// Size.
        size: Bytes,
    },
    /// A thin LV in thin pool `pool` of the same VG.
    Thin {
        /// Virtual size.
        size: Bytes,
        /// Thin pool LV name.
        pool: &'a str,
    },
    /// A thick (copy-on-write) snapshot of `origin` with a COW area of `cow` bytes.
    ThickSnapshot {
        /// Origin LV name.
        origin: &'a str,
        /// COW area size.
        cow: Bytes,
    },
    /// A thin snapshot of thin LV `origin`. LVM flags thin snapshots "skip activation" by
    /// default; `--setactivationskip n` clears that, so it is activated now and at every
    /// `vgchange -ay`, and can be read (exported, cloned) at any time.
    ThinSnapshot {
        /// Origin LV name.
        origin: &'a str,
    },
}

/// `lvcreate` of LV `name` in `vg` carrying `tags`: the tags are written in the same
/// metadata commit as the LV, so no crash can leave it untagged.
pub fn lvcreate(vg: &str, name: &str, what: NewLv<'_>, tags: &[String]) -> LvmCmd {
    let c = LvmCmd::change("lvcreate", vg).arg("--yes");
    let c = match what {
        NewLv::Thick { size } => c
            .args(["--zero", "y", "--wipesignatures", "y", "--size"])
            .arg(bytes_arg(size)),
        NewLv::Thin { size, pool } => c
            .args(["--type", "thin", "--virtualsize"])
            .arg(bytes_arg(size))
            .arg("--thinpool")
            .arg(pool),
        NewLv::ThickSnapshot { cow, .. } => c.args(["--snapshot", "--size"]).arg(bytes_arg(cow)),
        NewLv::ThinSnapshot { .. } => {
            c.args(["--snapshot", "--setactivationskip", "n", "--activate", "y"])
        }
    };
    let c = c.arg("--name").arg(name).add_tags(tags);
    match what {
        NewLv::Thick { .. } | NewLv::Thin { .. } => c.arg(vg),
        NewLv::ThickSnapshot { origin, .. } | NewLv::ThinSnapshot { origin } => {
            c.arg(format!("{vg}/{origin}"))
        }
    }
}

/// `lvextend` of `vg/lv` to `size`.
pub fn lvextend(vg: &str, lv: &str, size: Bytes) -> LvmCmd {
    LvmCmd::change("lvextend", vg)
        .arg("--size")
        .arg(bytes_arg(size))
        .arg(format!("{vg}/{lv}"))
}

/// `lvchange --activate y|n` of `vg/lv` (a thick origin takes its snapshots along).
pub fn lvchange_activate(vg: &str, lv: &str, active: bool) -> LvmCmd {
    LvmCmd::change("lvchange", vg)
        .arg("--activate")
        .arg(if active { "y" } else { "n" })
        .arg(format!("{vg}/{lv}"))
}

/// One `lvchange` adding and deleting tags of `vg/lv`: LVM applies both in one metadata
/// commit, so the change is atomic.
pub fn lvchange_tags(vg: &str, lv: &str, add: &[String], delete: &[String]) -> LvmCmd {
    let mut c = LvmCmd::change("lvchange", vg).add_tags(add);
    for t in delete {
        c = c.arg("--deltag").arg(t.clone());
    }
    c.arg(format!("{vg}/{lv}"))
}

/// `lvremove --yes` of `vg/lv`. On a thick origin `--yes` would also remove its snapshots:
/// callers check first.
pub fn lvremove(vg: &str, lv: &str) -> LvmCmd {
    LvmCmd::change("lvremove", vg)
        .arg("--yes")
        .arg(format!("{vg}/{lv}"))
}

// ---------------------------------------------------------------------------------------
// Data on LVs

/// Deadline of a command that reads or writes `bytes` of an LV: two minutes plus 8 MiB/s,
/// slow enough for a loaded disk under an emulated guest.
pub fn data_timeout(bytes: Bytes) -> Duration {
    Duration::from_secs(120 + bytes.get() / (8 * Bytes::MIB))
}

/// Overwrites the first `size` bytes of a block device with zeros, with direct I/O and a final
/// flush. `dd` rather than `blkdiscard --zeroout`: blkdiscard opens the device exclusively,
/// which fails (EBUSY) on the `-cow` device of an active snapshot, the one Cinder clears too.
pub fn zero_device(path: &str, size: Bytes) -> Cmd {
    Cmd::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={path}"))
        .args([
            "bs=1M",
            "iflag=count_bytes",
            "oflag=direct",
            "conv=fsync",
            "status=none",
        ])
        .arg(format!("count={}", size.get()))
        .timeout(data_timeout(size))
}

/// Copies the first `bytes` of `src` to `dst` with direct I/O and a final flush. Every byte
/// is written (no `conv=sparse`): a thick destination does not read as zeros.
pub fn copy_device(src: &str, dst: &str, bytes: Bytes) -> Cmd {
    Cmd::new("dd")
        .arg(format!("if={src}"))
        .arg(format!("of={dst}"))
        .args([
            "bs=1M",
            "iflag=direct,count_bytes",
            "oflag=direct",
            "conv=fsync",
            "status=none",
        ])
        .arg(format!("count={}", bytes.get()))
        .timeout(data_timeout(bytes))
}

/// The device-mapper name of `vg/lv` (`-` doubled in each part), as under `/dev/mapper/`.
pub fn dm_name(vg: &str, lv: &str) -> String {
    format!("{}-{}", vg.replace('-', "--"), lv.replace('-', "--"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report
mod tests {
    use super::*;

    /// A runner whose `lvm` is `sleep 1` (the prefix swallows the LVM arguments).
    fn sleeping_lvm() -> Runner {
        Runner::with_prefix(["sh", "-c", "sleep 1", "sleep"].map(String::from).to_vec())
    }

    /// Three commands at once on one runner; the wall time they took together.
    async fn three_at_once(cmds: [LvmCmd; 3]) -> Duration {
        let runner = sleeping_lvm();
        let start = std::time::Instant::now();
        let outs = futures::future::join_all(cmds.iter().map(|c| lvm(&runner, c))).await;
        assert!(outs.iter().all(Result::is_ok), "{outs:?}");
        start.elapsed()
    }

    #[tokio::test]
    async fn metadata_changes_to_one_vg_take_turns_and_reports_do_not_wait() {
        let tags: [String; 0] = [];
        let vg = "queue-test-a";
        let changes = [
            lvcreate(
                vg,
                "a",
                NewLv::Thick {
                    size: Bytes::mib(4),
                },
                &tags,
            ),
            lvextend(vg, "b", Bytes::mib(8)),
            lvremove(vg, "c"),
        ];
        assert!(changes.iter().all(LvmCmd::changes_metadata));
        let took = three_at_once(changes).await;
        assert!(
            took >= Duration::from_secs(3),
            "changes overlapped: {took:?}"
        );

        let reports = [lvs(vg, None), lvs(vg, Some("a")), vgs(vg)];
        assert!(!reports.iter().any(LvmCmd::changes_metadata));
        let took = three_at_once(reports).await;
        assert!(
            took < Duration::from_millis(2900),
            "reports queued: {took:?}"
        );

        // Other VGs have their own turns.
        let spread = [
            lvremove("queue-test-b", "x"),
            lvremove("queue-test-c", "x"),
            lvremove("queue-test-d", "x"),
        ];
        let took = three_at_once(spread).await;
        assert!(
            took < Duration::from_millis(2900),
            "VGs share a queue: {took:?}"
        );
    }

    fn fixture(name: &str) -> String {
        let path = format!("{}/tests/fixtures/lvm/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// A captured failure: its stderr and exit code.
    fn captured(name: &str) -> Output {
        Output {
            code: fixture(&format!("err-{name}.rc")).trim().parse().unwrap(),
            stdout: String::new(),
            stderr: fixture(&format!("err-{name}.txt")),
        }
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    /// An argv written as one line (no argument of these tests contains a space).
    fn words(line: &str) -> Vec<String> {
        line.split(' ').map(str::to_owned).collect()
    }

    fn at(secs: u64) -> Option<SystemTime> {
        Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
    }

    #[test]
    fn report_argv() {
        assert_eq!(
            lvs("vg0", Some("volume-1")).argv(),
            s(&[
                "lvs",
                "--reportformat",
                "json",
                "--units",
                "b",
                "--nosuffix",
                "--config",
                "report/time_format=\"%s\"",
                "-o",
                LV_FIELDS,
                "vg0/volume-1"
            ])
        );
        assert_eq!(
            lvs("vg0", None).argv().last().map(String::as_str),
            Some("vg0")
        );
        assert_eq!(vgs("vg0").argv()[0], "vgs");
        assert_eq!(vgs("vg0").argv()[9], VG_FIELDS);
        let cmd = vgs("vg0").to_cmd();
        assert_eq!(cmd.program(), "lvm");
        assert_eq!(
            cmd.display(),
            format!(
                "lvm vgs --reportformat json --units b --nosuffix --config report/time_format=\"%s\" -o {VG_FIELDS} vg0"
            )
        );
    }

    #[test]
    fn a_named_report_carries_thin_ids() {
        let c = lvs_named("cbfix", &["_snapshot-da", "_snapshot-db"]);
        let fields = format!("{LV_FIELDS},thin_id");
        assert_eq!(
            &c.argv()[8..],
            s(&["-o", &fields, "cbfix/_snapshot-da", "cbfix/_snapshot-db"])
        );
        // Captured: the thin ids are those the separate report gives.
        let lvs = parse_lvs(&fixture("lvs-named-thin.json")).unwrap();
        let ids: Vec<(String, u64)> = lvs
            .iter()
            .map(|l| (l.name.clone(), l.thin_id.unwrap()))
            .collect();
        assert_eq!(ids, parse_thin_ids(&fixture("lvs-thin-id.json")).unwrap());
        assert_eq!(
            (
                lvs[1].size,
                lvs[1].origin.as_deref(),
                lvs[1].pool.as_deref()
            ),
            (Bytes::mib(64), Some("volume-d1"), Some("pool0"))
        );
        // The other captured rows with a thin id added as LVM prints it: a number for a thin
        // LV, empty for a thick one; anything else is refused.
        let mut report: serde_json::Value = serde_json::from_str(&fixture("lvs.json")).unwrap();
        for lv in report["report"][0]["lv"].as_array_mut().unwrap() {
            let id = if lv["lv_name"] == "_snapshot-9c0d" {
                "6"
            } else {
                ""
            };
            lv["thin_id"] = id.into();
        }
        let lvs = parse_lvs(&report.to_string()).unwrap();
        let id = |n: &str| lvs.iter().find(|l| l.name == n).unwrap().thin_id;
        assert_eq!((id("_snapshot-9c0d"), id("volume-0a1b")), (Some(6), None));
        report["report"][0]["lv"][0]["thin_id"] = "six".into();
        assert!(matches!(
            parse_lvs(&report.to_string()),
            Err(LvmError::Parse { .. })
        ));
    }

    #[test]
    fn thin_ids_of_the_captured_snapshots() {
        let c = thin_ids("cbfix", &["_snapshot-da", "_snapshot-db"]);
        assert_eq!(
            &c.argv()[8..],
            s(&[
                "-o",
                "lv_name,thin_id",
                "cbfix/_snapshot-da",
                "cbfix/_snapshot-db"
            ])
        );
        assert_eq!(
            parse_thin_ids(&fixture("lvs-thin-id.json")).unwrap(),
            vec![
                ("_snapshot-da".to_owned(), 6),
                ("_snapshot-db".to_owned(), 7)
            ]
        );
        // A thick LV has no thin id.
        let thick = r#"{"report":[{"lv":[{"lv_name":"volume-0a1b","thin_id":""}]}]}"#;
        assert!(matches!(parse_thin_ids(thick), Err(LvmError::Parse { .. })));
    }

    #[test]
    fn lvcreate_argv() {
        let tags = words("cb.v=1 cb.type=gold");
        let thick = NewLv::Thick {
            size: Bytes::gib(1),
        };
        assert_eq!(
            lvcreate("vg0", "volume-1", thick, &tags).argv(),
            words("lvcreate --yes --zero y --wipesignatures y --size 1073741824b --name volume-1 --addtag cb.v=1 --addtag cb.type=gold vg0")
        );
        let thin = NewLv::Thin {
            size: Bytes::mib(8),
            pool: "pool0",
        };
        assert_eq!(
            lvcreate("vg0", "volume-2", thin, &tags[..1]).argv(),
            words("lvcreate --yes --type thin --virtualsize 8388608b --thinpool pool0 --name volume-2 --addtag cb.v=1 vg0")
        );
        let snap = NewLv::ThickSnapshot {
            origin: "volume-1",
            cow: Bytes::mib(4),
        };
        assert_eq!(
            lvcreate("vg0", "_snapshot-s", snap, &[]).argv(),
            words("lvcreate --yes --snapshot --size 4194304b --name _snapshot-s vg0/volume-1")
        );
        let thin_snap = NewLv::ThinSnapshot {
            origin: "_snapshot-s",
        };
        assert_eq!(
            lvcreate("vg0", "volume-3", thin_snap, &tags[..1]).argv(),
            words("lvcreate --yes --snapshot --setactivationskip n --activate y --name volume-3 --addtag cb.v=1 vg0/_snapshot-s")
        );
    }

    #[test]
    fn change_argv() {
        assert_eq!(
            lvextend("vg0", "volume-1", Bytes::gib(2)).argv(),
            words("lvextend --size 2147483648b vg0/volume-1")
        );
        assert_eq!(
            lvchange_activate("vg0", "volume-1", false).argv(),
            words("lvchange --activate n vg0/volume-1")
        );
        assert_eq!(
            lvchange_activate("vg0", "volume-1", true).argv(),
            words("lvchange --activate y vg0/volume-1")
        );
        let add = words("cb.export=iqn.a");
        let del = words("cb.export=iqn.b cb.state=creating");
        assert_eq!(
            lvchange_tags("vg0", "volume-1", &add, &del).argv(),
            words("lvchange --addtag cb.export=iqn.a --deltag cb.export=iqn.b --deltag cb.state=creating vg0/volume-1")
        );
        assert_eq!(
            lvremove("vg0", "volume-1").argv(),
            words("lvremove --yes vg0/volume-1")
        );
        assert_eq!(lvremove("vg", "volume-1").label(), "lvremove vg/volume-1");
    }

    #[test]
    fn data_commands() {
        let z = zero_device("/dev/mapper/vg0-_snapshot--s-cow", Bytes::mib(16));
        assert_eq!(z.program(), "dd");
        assert_eq!(
            z.argv(),
            words("if=/dev/zero of=/dev/mapper/vg0-_snapshot--s-cow bs=1M iflag=count_bytes oflag=direct conv=fsync status=none count=16777216")
        );
        let c = copy_device("/dev/vg0/_snapshot-s", "/dev/vg0/volume-2", Bytes::mib(12));
        assert_eq!(c.program(), "dd");
        assert_eq!(
            c.argv(),
            words("if=/dev/vg0/_snapshot-s of=/dev/vg0/volume-2 bs=1M iflag=direct,count_bytes oflag=direct conv=fsync status=none count=12582912")
        );
        assert_eq!(data_timeout(Bytes::gib(1)), Duration::from_secs(120 + 128));
        assert_eq!(dm_name("my-vg", "_snapshot-a-b"), "my--vg-_snapshot--a--b");
    }

    #[test]
    fn parse_captured_lvs() {
        let lvs = parse_lvs(&fixture("lvs.json")).unwrap();
        let names: Vec<&str> = lvs.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "_snapshot-5e6f",
                "_snapshot-9c0d",
                "foreign",
                "lvol-skip",
                "pool0",
                "volume-0a1b",
                "volume-0c2d",
                "volume-1e2f",
                "volume-7a8b"
            ]
        );
        let by = |n: &str| lvs.iter().find(|l| l.name == n).cloned().unwrap();
        assert_eq!(
            by("volume-0a1b"),
            Lv {
                name: "volume-0a1b".into(),
                vg: "cbfix".into(),
                size: Bytes::mib(128),
                attr: "owi-a-s---".into(),
                tags: words("cb.export=iqn.1993-08.org.debian:01:node1 cb.meta.pvc&20name=data-0 cb.type=gold cb.v=1"),
                origin: None,
                pool: None,
                data_percent: None,
                created: at(1795312164),
                active: Some(true),
                thin_id: None,
            }
        );
        // A thick snapshot: its size is the COW area, attribute `s`.
        assert_eq!(
            by("_snapshot-5e6f"),
            Lv {
                name: "_snapshot-5e6f".into(),
                vg: "cbfix".into(),
                size: Bytes::mib(16),
                attr: "swi-a-s---".into(),
                tags: words("cb.size=67108864 cb.snapof=0a1b cb.v=1"),
                origin: Some("volume-0a1b".into()),
                pool: None,
                data_percent: Some(12.60),
                created: at(1795312168),
                active: Some(true),
                thin_id: None,
            }
        );
        assert_eq!(
            by("volume-1e2f"),
            Lv {
                name: "volume-1e2f".into(),
                vg: "cbfix".into(),
                size: Bytes::mib(128),
                attr: "Vwi-a-tz--".into(),
                tags: words("cb.src=snap:9c0d cb.type=thin cb.v=1"),
                origin: Some("_snapshot-9c0d".into()),
                pool: Some("pool0".into()),
                data_percent: Some(6.25),
                created: at(1795312216),
                active: Some(true),
                thin_id: None,
            }
        );
        let pool = by("pool0");
        assert_eq!(
            (pool.is_thin_pool(), pool.size, pool.data_percent),
            (true, Bytes::mib(512), Some(1.56))
        );
        assert!(pool.zeroes_new_blocks());
        assert_eq!(pool.allocated(), Some(Bytes(8375186)));
        assert!(by("volume-0a1b").is_thick_origin());
        assert!(by("_snapshot-5e6f").is_thick_snapshot() && !by("volume-0a1b").is_thick_snapshot());
        assert!(!by("volume-7a8b").is_thin_pool());
        assert!(!by("volume-7a8b").is_thick_origin() && !by("volume-0c2d").is_thick_origin());
        assert_eq!(by("volume-7a8b").allocated(), Some(Bytes::mib(8)));
        let (skip, foreign) = (by("lvol-skip"), by("foreign"));
        assert_eq!(
            (skip.attr.as_str(), skip.active, skip.data_percent),
            ("Vwi---tz-k", Some(false), None)
        );
        assert_eq!(
            (foreign.tags, foreign.active),
            (words("owner=someone"), Some(false))
        );
        assert_eq!(
            parse_lvs(&fixture("lvs-one.json")).unwrap(),
            vec![by("volume-7a8b")]
        );
    }

    #[test]
    fn parse_without_device_mapper() {
        let lvs = parse_lvs(&fixture("lvs-no-dm.json")).unwrap();
        assert_eq!(lvs.len(), 3);
        assert!(lvs
            .iter()
            .all(|l| l.active.is_none() && l.data_percent.is_none()));
        assert_eq!(
            lvs[2].tags,
            words("cb.src=vol:0a1b cb.state=creating cb.type=default cb.v=1")
        );
    }

    #[test]
    fn parse_captured_vgs() {
        assert_eq!(
            parse_vgs(&fixture("vgs.json")).unwrap(),
            vec![Vg {
                name: "cbfix".into(),
                size: Bytes(4290772992),
                free: Bytes(3523215360),
                extent_size: Bytes::mib(4),
                extent_count: 1023,
                free_count: 840,
            }]
        );
    }

    #[test]
    fn parse_rejects_garbage() {
        assert!(matches!(parse_lvs("not json"), Err(LvmError::Parse { .. })));
        let bad_size = fixture("lvs-one.json").replace("\"134217728\"", "\"12.5\"");
        assert!(matches!(parse_lvs(&bad_size), Err(LvmError::Parse { .. })));
        assert!(matches!(
            parse_vgs("{\"report\":[{\"lv\":[]}]}"),
            Err(LvmError::Parse { .. })
        ));
    }

    fn kind(r: Result<Output, LvmError>) -> &'static str {
        match r {
            Ok(_) => "ok",
            Err(LvmError::NotFound { .. }) => "not-found",
            Err(LvmError::VgNotFound { .. }) => "vg-not-found",
            Err(LvmError::AlreadyExists { .. }) => "exists",
            Err(LvmError::NoSpace { .. }) => "no-space",
            Err(LvmError::Failed { .. }) => "failed",
            Err(LvmError::Parse { .. }) => "parse",
        }
    }

    #[test]
    fn classify_captured_failures() {
        let table = [
            ("lvs-lv-missing", "not-found"),
            ("lvs-vg-missing", "vg-not-found"),
            ("lvremove-lv-missing", "not-found"),
            ("lvchange-lv-missing", "not-found"),
            ("lvextend-lv-missing", "not-found"),
            ("lvcreate-exists", "exists"),
            ("lvcreate-no-space", "no-space"),
            ("lvextend-no-space", "no-space"),
            ("lvextend-not-larger", "failed"),
            ("lvextend-origin-active", "failed"),
            ("lvchange-bad-tag", "failed"),
            ("lvcreate-reserved-name", "failed"),
        ];
        for (name, want) in table {
            assert_eq!(kind(classify("x".into(), captured(name))), want, "{name}");
        }
    }

    #[test]
    fn classify_needs_code_and_pattern() {
        // The "not found" line with exit 3 (a command-line error) is not "not found".
        let mut o = captured("lvs-lv-missing");
        o.code = LVM_EXIT_INVALID_CMD_LINE;
        match classify("x".into(), o) {
            Err(LvmError::Failed {
                source: ExecError::Failed { code, .. },
                ..
            }) => assert_eq!(code, 3),
            other => panic!("{other:?}"),
        }
        let o = Output {
            code: LVM_EXIT_FAILED,
            stdout: String::new(),
            stderr: "  Something else\n".into(),
        };
        assert_eq!(kind(classify("x".into(), o)), "failed");
        let o = Output {
            code: 0,
            stdout: String::new(),
            stderr: "  WARNING: x\n".into(),
        };
        assert_eq!(kind(classify("x".into(), o)), "ok");
    }
}
