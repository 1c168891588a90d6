//! What changed between two thin snapshots of one LVM thin volume, read from the thin pool's
//! own metadata: `thin_delta` (thin-provisioning-tools) compares the block mappings of two
//! thin devices. It reads a metadata snapshot that the kernel keeps consistent while the pool
//! runs (`dmsetup message <pool>-tpool 0 reserve_metadata_snap`, released afterwards); the
//! kernel commits the pool's metadata before it takes one.
//!
//! A block that both snapshots map to the same data block holds the same bytes (a thin pool
//! never overwrites a shared block: a write to it gets a new one), and a range neither maps
//! reads as zeros in both. Everything else counts as changed: blocks mapped differently, and
//! blocks only one of them maps (written since, or discarded since).
//!
//! Output format, captured from thin-provisioning-tools 0.9.0 (Debian bookworm, the guest's
//! version): a `<superblock ... data_block_size="S" ...>` line (S in 512-byte sectors), then
//! one `<same|different|left_only|right_only begin="B" length="L"/>` line per run of blocks,
//! in block order. Anything else fails the parse, and the caller reads the whole volume.

use std::time::Duration;

use super::{Cmd, ExecError, Runner};

/// The tool that compares two thin devices' mappings.
pub const THIN_DELTA: &str = "thin_delta";

/// stderr of `dmsetup message ... reserve_metadata_snap` while a metadata snapshot is held
/// already (left by an interrupted comparison, or taken by an operator's `thin_dump -m`).
const STDERR_BUSY: &str = "Device or resource busy";

/// Deadline of `thin_delta`: it reads only the two devices' mapping trees, milliseconds for a
/// small pool; a pool with a metadata LV of several GiB takes longer.
const DELTA_TIMEOUT: Duration = Duration::from_secs(300);

/// Errors of a comparison.
#[derive(Debug, thiserror::Error)]
pub enum ThinError {
    /// A command failed or could not run.
    #[error("{context}")]
    Exec {
        /// What was being done.
        context: String,
        /// The failure.
        #[source]
        source: ExecError,
    },
    /// `thin_delta` printed something this parser does not know.
    #[error("cannot read the output of thin_delta: {0}")]
    Parse(String),
}

/// The device-mapper name of LV `lv` of VG `vg` (LVM doubles every `-` of both).
fn dm(vg: &str, lv: &str) -> String {
    super::lvm::dm_name(vg, lv)
}

/// `dmsetup message` to the thin-pool target of `vg/pool` (`<pool>-tpool` while thin LVs of
/// it are active, which a backup's snapshots are).
pub fn message(vg: &str, pool: &str, msg: &str) -> Cmd {
    Cmd::new("dmsetup")
        .arg("message")
        .arg(format!("{}-tpool", dm(vg, pool)))
        .arg("0")
        .arg(msg)
}

/// `thin_delta` of thin devices `a` and `b` of `vg/pool`, on its held metadata snapshot.
pub fn delta(vg: &str, pool: &str, (a, b): (u64, u64)) -> Cmd {
    Cmd::new(THIN_DELTA)
        .args(["--metadata-snap", "--snap1"])
        .arg(a.to_string())
        .arg("--snap2")
        .arg(b.to_string())
        .arg(format!("/dev/mapper/{}_tmeta", dm(vg, pool)))
        .timeout(DELTA_TIMEOUT)
}

/// `thin_delta -V`: whether the tool is installed.
pub fn version() -> Cmd {
    Cmd::new(THIN_DELTA).arg("-V")
}

fn attr(line: &str, name: &str) -> Result<u64, ThinError> {
    let key = format!(" {name}=\"");
    let start = line
        .find(&key)
        .ok_or_else(|| ThinError::Parse(format!("no {name} in {line:?}")))?
        + key.len();
    let len = line[start..]
        .find('"')
        .ok_or_else(|| ThinError::Parse(format!("unterminated {name} in {line:?}")))?;
    line[start..start + len]
        .parse()
        .map_err(|_| ThinError::Parse(format!("{name} is not a number in {line:?}")))
}

/// What `thin_delta` shows between two thin devices, as byte ranges `[start, end)` in order
/// with adjacent runs merged.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    /// Where they differ: mapped differently, or by one of them only.
    pub changed: Vec<(u64, u64)>,
    /// What the second one maps; the rest of it reads as zeros.
    pub mapped: Vec<(u64, u64)>,
}

/// Appends `r` to ranges in order, merged with the last one when they touch.
fn push(ranges: &mut Vec<(u64, u64)>, r: (u64, u64)) {
    match ranges.last_mut() {
        Some(last) if last.1 >= r.0 => last.1 = last.1.max(r.1),
        _ => ranges.push(r),
    }
}

/// Parses `thin_delta`'s output.
pub fn parse_delta(out: &str) -> Result<Delta, ThinError> {
    let mut block: Option<u64> = None;
    let mut d = Delta::default();
    for line in out.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let tag = line
            .strip_prefix('<')
            .and_then(|l| l.split([' ', '>', '/']).next())
            .ok_or_else(|| ThinError::Parse(format!("unexpected line {line:?}")))?;
        let (changed, mapped) = match tag {
            "superblock" => {
                let sectors = attr(line, "data_block_size")?;
                if sectors == 0 {
                    return Err(ThinError::Parse("data_block_size 0".into()));
                }
                block = Some(sectors * 512);
                continue;
            }
            "diff" | "" => continue,
            "same" => (false, true),
            "different" | "right_only" => (true, true),
            "left_only" => (true, false),
            other => return Err(ThinError::Parse(format!("unknown element <{other}"))),
        };
        let bs = block.ok_or_else(|| ThinError::Parse("a range before the superblock".into()))?;
        let (b, l) = (attr(line, "begin")?, attr(line, "length")?);
        let range = b
            .checked_add(l)
            .and_then(|e| Some((b.checked_mul(bs)?, e.checked_mul(bs)?)))
            .ok_or_else(|| ThinError::Parse(format!("range out of bounds in {line:?}")))?;
        if changed {
            push(&mut d.changed, range);
        }
        if mapped {
            push(&mut d.mapped, range);
        }
    }
    if block.is_none() {
        return Err(ThinError::Parse("no superblock line".into()));
    }
    // In block order already, as the tool prints them; kept so if a version does not.
    let ordered = |mut v: Vec<(u64, u64)>| {
        v.sort_unstable();
        v.into_iter().fold(Vec::new(), |mut out, r| {
            push(&mut out, r);
            out
        })
    };
    Ok(Delta {
        changed: ordered(d.changed),
        mapped: ordered(d.mapped),
    })
}

async fn run(runner: &Runner, c: &Cmd, context: &str) -> Result<String, ThinError> {
    let err = |source| ThinError::Exec {
        context: context.to_owned(),
        source,
    };
    let out = runner.run(c).await.map_err(err)?;
    out.check(c.program()).map(|o| o.stdout).map_err(err)
}

/// Compares thin devices `ids.0` and `ids.1` of `vg/pool` (the same id twice: what it
/// maps). Takes the
/// pool's metadata snapshot for the comparison and always gives it back. A metadata snapshot
/// already held is released first and taken again: an older one would not know the newer
/// device. The caller serialises comparisons on one pool (the kernel keeps one metadata
/// snapshot per pool).
pub async fn compare(
    runner: &Runner,
    (vg, pool): (&str, &str),
    ids: (u64, u64),
) -> Result<Delta, ThinError> {
    let reserve = message(vg, pool, "reserve_metadata_snap");
    let release = message(vg, pool, "release_metadata_snap");
    let what = format!("thin pool {vg}/{pool}");
    let reserving = format!("reserving a metadata snapshot of {what}");
    match run(runner, &reserve, &reserving).await {
        Err(ThinError::Exec {
            source: ExecError::Failed { stderr, .. },
            ..
        }) if stderr.contains(STDERR_BUSY) => {
            tracing::warn!(vg, pool, "a metadata snapshot of the thin pool was held already: releasing it and taking a new one");
            run(
                runner,
                &release,
                &format!("releasing the old metadata snapshot of {what}"),
            )
            .await?;
            run(runner, &reserve, &reserving).await?;
        }
        other => {
            other?;
        }
    }
    let out = run(
        runner,
        &delta(vg, pool, ids),
        &format!("comparing thin devices {} and {} of {what}", ids.0, ids.1),
    )
    .await;
    let released = run(
        runner,
        &release,
        &format!("releasing the metadata snapshot of {what}"),
    )
    .await;
    let out = out?;
    if let Err(e) = released {
        // The comparison stands; the next one releases it first.
        tracing::warn!(vg, pool, error = %e, "cannot release the thin pool's metadata snapshot");
    }
    parse_delta(&out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report
mod tests {
    use super::*;

    /// Captured in the test guest: 64 MiB thin volume written whole, snapshot 2; 192 KiB
    /// written at block 100 and 1 MiB discarded at 1 MiB; snapshot 3.
    const CAPTURED: &str = include_str!("../../tests/fixtures/lvm/thin_delta.txt");

    #[test]
    fn captured_output_gives_the_written_and_the_discarded_ranges() {
        let kib = 1024;
        let d = parse_delta(CAPTURED).unwrap();
        assert_eq!(
            d.changed,
            vec![(1024 * kib, 2048 * kib), (6400 * kib, 6592 * kib)]
        );
        // The second snapshot maps all but the discarded MiB.
        assert_eq!(d.mapped, vec![(0, 1024 * kib), (2048 * kib, 65536 * kib)]);
    }

    #[test]
    fn adjacent_runs_merge_and_unknown_output_is_an_error() {
        let out = "<superblock uuid=\"\" time=\"1\" transaction=\"1\" data_block_size=\"8\" nr_data_blocks=\"0\">\n\
                   <diff left=\"1\" right=\"2\">\n\
                   <right_only begin=\"0\" length=\"2\"/>\n\
                   <different begin=\"2\" length=\"1\"/>\n\
                   <same begin=\"3\" length=\"1\"/>\n\
                   <left_only begin=\"4\" length=\"1\"/>\n\
                   </diff>\n</superblock>\n";
        let d = parse_delta(out).unwrap();
        assert_eq!(d.changed, vec![(0, 3 * 4096), (4 * 4096, 5 * 4096)]);
        assert_eq!(d.mapped, vec![(0, 4 * 4096)]);
        assert!(parse_delta("").is_err(), "no superblock");
        let odd = out.replace("<same", "<mapped");
        assert!(parse_delta(&odd).is_err());
        let bad = out.replace(
            "<different begin=\"2\" length=\"1\"",
            "<different begin=\"2\" length=\"x\"",
        );
        assert_ne!(bad, out);
        assert!(parse_delta(&bad).is_err());
        assert!(parse_delta("<different begin=\"0\" length=\"1\"/>").is_err());
    }

    #[test]
    fn the_busy_line_is_the_captured_one() {
        let captured = include_str!("../../tests/fixtures/lvm/err-dmsetup-reserve-busy.txt");
        assert!(captured.contains(STDERR_BUSY), "{captured}");
    }

    #[test]
    fn commands_name_the_pool_devices_as_device_mapper_does() {
        assert_eq!(
            message("cinder-volumes", "pool0", "reserve_metadata_snap").argv(),
            [
                "message",
                "cinder--volumes-pool0-tpool",
                "0",
                "reserve_metadata_snap"
            ]
        );
        assert_eq!(
            delta("cinder-volumes", "pool0", (2, 3)).argv(),
            [
                "--metadata-snap",
                "--snap1",
                "2",
                "--snap2",
                "3",
                "/dev/mapper/cinder--volumes-pool0_tmeta"
            ]
        );
    }
}
