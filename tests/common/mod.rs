//! Support shared by the integration tests. Each test crate uses a part of it.
#![allow(dead_code)]

pub mod s3;
pub mod tgtd;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Where the e2e harness keeps its cache (`tests/e2e/lib.sh` decides the same way).
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CINDERBLOCK_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .expect("neither XDG_CACHE_HOME nor HOME is set");
    base.join("cinderblock")
}

/// The full path of `tool` on PATH, or a panic that names the Debian package to install.
/// A test that needs a missing tool fails; it never passes silently.
pub fn require_tool(tool: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{tool}` is not installed: apt-get install {package} \
                 (tests/e2e/host-deps.sh test installs everything these tests need)"
            )
        })
}

/// qemu 7.2 from bookworm as `tests/e2e/host-deps.sh` unpacks it (with its iSCSI block
/// driver, which the machine's own qemu-utils 10 lacks). Returns a command for `tool`
/// (`qemu-io`, `qemu-img`) with `QEMU_MODULE_DIR` set, or panics saying how to get it.
pub fn qemu_tool(tool: &str) -> Command {
    let root = std::env::var_os("CINDERBLOCK_QEMU_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("qemu"));
    let bin = root.join("usr/bin").join(tool);
    let modules = root.join("usr/lib/x86_64-linux-gnu/qemu");
    assert!(
        bin.is_file() && modules.join("block-iscsi.so").is_file(),
        "{} or its iSCSI block driver is missing: run tests/e2e/host-deps.sh test",
        bin.display()
    );
    let mut cmd = Command::new(bin);
    cmd.env("QEMU_MODULE_DIR", modules)
        .env("LC_ALL", "C")
        .stdin(Stdio::null());
    cmd
}

/// Runs `cmd` and returns its output; panics only if it cannot be started.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs `cmd`, panics with its stderr unless it exits 0, and returns its stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{cmd:?} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A single-node-writer ext4 mount capability, what most CSI requests in the tests ask for.
pub fn mount() -> cinderblock::proto::csi::VolumeCapability {
    use cinderblock::proto::csi::volume_capability::{
        access_mode::Mode, AccessMode, AccessType, MountVolume,
    };
    cinderblock::proto::csi::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: "ext4".into(),
            ..Default::default()
        })),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

/// Every sample of `GET /metrics` on 127.0.0.1:`port`, by `name{labels}`; a scrape that is not
/// `200 OK` in Prometheus' text format panics.
pub fn scrape_metrics(port: u16) -> BTreeMap<String, f64> {
    let get = || -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(text)
    };
    let text = get().unwrap_or_else(|e| panic!("GET 127.0.0.1:{port}/metrics: {e}"));
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    parse_metrics(body)
}

/// The samples of a Prometheus text exposition, by `name{labels}`.
pub fn parse_metrics(body: &str) -> BTreeMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (k, v) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("not a sample: {l:?}"));
            let v = v
                .parse()
                .unwrap_or_else(|e| panic!("bad value in {l:?}: {e}"));
            (k.to_owned(), v)
        })
        .collect()
}
