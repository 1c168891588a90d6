//! Real tgtd on this host, driven with raw `tgtadm`, checked with real userspace iSCSI
//! initiators (libiscsi-bin's `iscsi-*` tools and qemu's iSCSI block driver). No kernel
//! initiator is needed, so this runs on any host (`make test`); the tools come from
//! `tests/e2e/host-deps.sh test`, and a missing one fails the test with that hint.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use common::tgtd::{parse_target_ids, Tgtd};
use common::{qemu_tool, require_tool, run, run_ok};

const TARGET: &str = "iqn.2010-10.org.openstack:volume-host-tgt";
const GOOD: &str = "iqn.2025-01.io.cinderblock.test:bound-initiator";
const BAD: &str = "iqn.2025-01.io.cinderblock.test:stranger";
const LUN_BYTES: u64 = 64 << 20;
const MIB: u64 = 1 << 20;

/// tgtd with target tid 1 = `TARGET`, LUN 1 = a sparse file, ACL = `GOOD` by initiator name.
/// (`--initiator-name`: tgtadm's `-I` is an initiator *address* ACL.)
fn exported_lun(dir: &Path) -> (Tgtd, std::path::PathBuf) {
    let tgtd = Tgtd::start();
    let backing = dir.join("volume.img");
    fs::File::create(&backing)
        .unwrap()
        .set_len(LUN_BYTES)
        .unwrap();
    tgtd.tgtadm_ok(&[
        "--op", "new", "--mode", "target", "--tid", "1", "-T", TARGET,
    ]);
    tgtd.tgtadm_ok(&[
        "--op",
        "new",
        "--mode",
        "logicalunit",
        "--tid",
        "1",
        "--lun",
        "1",
        "-b",
        backing.to_str().unwrap(),
    ]);
    tgtd.tgtadm_ok(&[
        "--op",
        "bind",
        "--mode",
        "target",
        "--tid",
        "1",
        "--initiator-name",
        GOOD,
    ]);
    (tgtd, backing)
}

fn lun_url(tgtd: &Tgtd) -> String {
    format!("iscsi://{}/{TARGET}/1", tgtd.portal())
}

/// qemu-io on LUN 1 as `initiator`, running the qemu-io commands `cmds`.
fn qemu_io(tgtd: &Tgtd, initiator: &str, cmds: &[&str]) -> std::process::Output {
    let opts = format!(
        "driver=iscsi,transport=tcp,portal={},target={TARGET},lun=1,initiator-name={initiator}",
        tgtd.portal()
    );
    let mut cmd = qemu_tool("qemu-io");
    cmd.arg("--image-opts").arg(opts);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    run(&mut cmd)
}

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

fn field<'a>(output: &'a str, key: &str) -> Option<&'a str> {
    output
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
}

#[test]
fn bound_initiator_discovers_inquires_and_sizes_the_lun() {
    require_tool("iscsi-ls", "libiscsi-bin");
    let dir = tempfile::tempdir().unwrap();
    let (tgtd, _backing) = exported_lun(dir.path());

    let ls = run_ok(
        Command::new("iscsi-ls")
            .args(["-s", "-i", GOOD])
            .arg(format!("iscsi://{}", tgtd.portal())),
    );
    let targets: Vec<&str> = ls
        .lines()
        .filter_map(|l| l.strip_prefix("Target:"))
        .collect();
    assert_eq!(
        targets,
        vec![format!("{TARGET} Portal:{},1", tgtd.portal())]
    );
    assert_eq!(
        ls.lines().filter(|l| l.starts_with("Lun:1")).count(),
        1,
        "LUN 1 listed:\n{ls}"
    );

    let inq = run_ok(
        Command::new("iscsi-inq")
            .args(["-i", GOOD])
            .arg(lun_url(&tgtd)),
    );
    assert_eq!(
        field(&inq, "Peripheral Device Type:"),
        Some("DIRECT_ACCESS")
    );
    assert_eq!(field(&inq, "Vendor:"), Some("IET"));
    assert_eq!(field(&inq, "Product:"), Some("VIRTUAL-DISK"));

    let cap = run_ok(
        Command::new("iscsi-readcapacity16")
            .args(["-i", GOOD])
            .arg(lun_url(&tgtd)),
    );
    assert_eq!(field(&cap, "LOGICAL BLOCK LENGTH IN BYTES:"), Some("512"));
    assert_eq!(
        field(&cap, "Total size:"),
        Some(LUN_BYTES.to_string().as_str())
    );
}

#[test]
fn bytes_written_over_iscsi_land_on_the_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    let (tgtd, backing) = exported_lun(dir.path());

    let out = qemu_io(&tgtd, GOOD, &["write -P 0xab 1M 4M", "read -P 0xab 1M 4M"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "qemu-io write/verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        read_at(&backing, MIB, 4 * MIB as usize),
        vec![0xab; 4 * MIB as usize]
    );
    // Around the written range the sparse file still reads as zeros.
    assert_eq!(read_at(&backing, MIB - 4096, 4096), vec![0; 4096]);
    assert_eq!(read_at(&backing, 5 * MIB, 4096), vec![0; 4096]);

    // And the other way: bytes put on the backing file are what the initiator reads.
    let data: Vec<u8> = (0..MIB).map(|i| (i * 7 % 251) as u8).collect();
    fs::OpenOptions::new()
        .write(true)
        .open(&backing)
        .unwrap()
        .write_all_at(&data, 8 * MIB)
        .unwrap();
    let back = dir.path().join("read-back.raw");
    let opts = format!(
        "driver=iscsi,transport=tcp,portal={},target={TARGET},lun=1,initiator-name={GOOD}",
        tgtd.portal()
    );
    run_ok(
        qemu_tool("qemu-img")
            .args(["convert", "-O", "raw", "--image-opts"])
            .arg(opts)
            .arg(&back),
    );
    assert_eq!(fs::metadata(&back).unwrap().len(), LUN_BYTES);
    assert_eq!(read_at(&back, 8 * MIB, MIB as usize), data);
    assert_eq!(read_at(&back, MIB, 4096), vec![0xab; 4096]);
}

#[test]
fn an_initiator_not_in_the_acl_is_refused() {
    require_tool("iscsi-inq", "libiscsi-bin");
    let dir = tempfile::tempdir().unwrap();
    let (tgtd, backing) = exported_lun(dir.path());

    // Discovery hides the target from it...
    let ls = run_ok(
        Command::new("iscsi-ls")
            .args(["-s", "-i", BAD])
            .arg(format!("iscsi://{}", tgtd.portal())),
    );
    assert_eq!(
        ls.lines().filter(|l| l.starts_with("Target:")).count(),
        0,
        "{ls}"
    );
    // ...the login is refused...
    let inq = run(Command::new("iscsi-inq")
        .args(["-i", BAD])
        .arg(lun_url(&tgtd)));
    assert_ne!(inq.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&inq.stderr).contains("Target not found"),
        "iscsi-inq stderr: {}",
        String::from_utf8_lossy(&inq.stderr)
    );
    // ...and so no byte reaches the LUN.
    let write = qemu_io(&tgtd, BAD, &["write -P 0xcd 0 64k"]);
    assert_ne!(write.status.code(), Some(0));
    assert_eq!(read_at(&backing, 0, 65536), vec![0; 65536]);
    // The bound initiator, same target, same moment: accepted.
    let ok = run(Command::new("iscsi-inq")
        .args(["-i", GOOD])
        .arg(lun_url(&tgtd)));
    assert_eq!(ok.status.code(), Some(0));
}

#[test]
fn drop_stops_tgtd_that_still_has_targets() {
    let dir = tempfile::tempdir().unwrap();
    let (tgtd, _backing) = exported_lun(dir.path());
    let (pid, ctl) = (tgtd.pid(), tgtd.ctl());
    assert_eq!(tgtd.target_ids(), vec![1]);

    drop(tgtd);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "tgtd {pid} still running"
    );
    let after =
        run(Command::new("tgtadm").args(["-C", &ctl.to_string(), "--op", "show", "--mode", "sys"]));
    assert_ne!(after.status.code(), Some(0));
}

#[test]
fn parallel_instances_do_not_share_anything() {
    let a = Tgtd::start();
    let b = Tgtd::start();
    assert_ne!(a.ctl(), b.ctl());
    assert_ne!(a.portal(), b.portal());
    a.tgtadm_ok(&[
        "--op", "new", "--mode", "target", "--tid", "7", "-T", TARGET,
    ]);
    assert_eq!((a.target_ids(), b.target_ids()), (vec![7], vec![]));
}

#[test]
fn parses_target_ids_from_tgtadm_show() {
    let show = "Target 1: iqn.a:one\n    System information:\n        Driver: iscsi\n\
                Target 12: iqn.a:twelve\n    LUN information:\n";
    assert_eq!(parse_target_ids(show), vec![1, 12]);
    assert_eq!(parse_target_ids(""), Vec::<u32>::new());
}

#[test]
fn a_restarted_tgtd_has_forgotten_every_target() {
    let dir = tempfile::tempdir().unwrap();
    let (mut tgtd, _backing) = exported_lun(dir.path());
    let (ctl, port) = (tgtd.ctl(), tgtd.port());
    assert_eq!(tgtd.target_ids(), vec![1]);

    tgtd.kill(); // a crash: no cleanup at all
    let again = Tgtd::start_on(ctl, port);
    assert_eq!(
        (again.ctl(), again.portal()),
        (ctl, format!("127.0.0.1:{port}"))
    );
    assert_eq!(again.target_ids(), Vec::<u32>::new());
    drop(tgtd); // dropping the dead one must not touch the new daemon
    assert_eq!(
        again
            .tgtadm(&["--op", "show", "--mode", "sys"])
            .status
            .code(),
        Some(0)
    );
}
