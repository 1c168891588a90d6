//! moto's S3 server (PyPI) on 127.0.0.1 for the backup tests: installed with pip when
//! missing, started on a free port with a bucket, killed by PID on drop.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test support: a panic is the failure report

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use super::tgtd::free_tcp_port;
use super::{require_tool, run, run_ok};

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
fn listening(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// moto's S3 server on 127.0.0.1, killed (by PID) on drop.
pub struct S3Server {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

static MOTO: Once = Once::new();

impl S3Server {
    /// Starts the server (installing moto from PyPI first if it is missing) with `bucket`.
    pub fn start(bucket: &str) -> S3Server {
        require_tool("python3", "python3");
        MOTO.call_once(|| {
            let have = run(Command::new("python3").args(["-c", "import moto.server, flask_cors"]));
            if !have.status.success() {
                run_ok(Command::new("python3").args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "moto[server]",
                ]));
            }
        });
        let dir = tempfile::tempdir().unwrap();
        for _ in 0..5 {
            let port = free_tcp_port();
            let log = std::fs::File::create(dir.path().join("moto.log")).unwrap();
            let child = Command::new("python3")
                .args([
                    "-m",
                    "moto.server",
                    "-H",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                ])
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("spawn moto");
            let mut s = S3Server {
                child,
                port,
                _dir: tempfile::tempdir().unwrap(),
            };
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = s.child.try_wait() {
                    break; // the port was taken in between: try another
                }
                if listening(port) {
                    s.http("PUT", &format!("/{bucket}"));
                    return s;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = s.child.kill();
        }
        panic!(
            "moto's S3 server did not start: {}",
            std::fs::read_to_string(dir.path().join("moto.log")).unwrap_or_default()
        );
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// One plain HTTP request (moto takes unsigned requests); panics unless it answers 2xx.
    pub fn http(&self, method: &str, path: &str) -> String {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            c,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )
        .unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 2"),
            "{method} {path}: {answer}"
        );
        answer
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
