//! The one place that spawns processes.
//!
//! Every host command (lvm, tgtadm, iscsiadm, mkfs, mount, ...) goes through [`Runner::run`]:
//! argv as a list (never `sh -c`), `LC_ALL=C` so output and messages are stable to parse, a
//! timeout, `kill_on_drop` so a cancelled RPC does not leave a child behind, and secrets
//! redacted from logs. Tool-specific argv builders and output parsers live beside this file.

pub mod iscsiadm;
pub mod lvm;
pub mod mount;
pub mod tgtadm;
pub mod thin;

use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

/// Default deadline of one command.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// Errors of running a process. A non-zero exit status is not an error here: callers
/// classify exit codes themselves (see [`Output::code`]).
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The program could not be started (missing binary, permissions).
    #[error("cannot run {program}")]
    Spawn {
        /// Program name.
        program: String,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The program did not finish in time and was killed.
    #[error("{program} timed out after {after:?}")]
    Timeout {
        /// Program name.
        program: String,
        /// The deadline that passed.
        after: Duration,
    },
    /// Waiting for the program or feeding its stdin failed.
    #[error("i/o with {program} failed")]
    Io {
        /// Program name.
        program: String,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The program exited with a status its caller does not accept.
    #[error("{program} exited with {code}: {stderr}")]
    Failed {
        /// Program name.
        program: String,
        /// Exit code (-1 when killed by a signal).
        code: i32,
        /// Standard error, trimmed.
        stderr: String,
    },
}

/// A command to run: program, arguments and options.
#[derive(Clone, Debug)]
pub struct Cmd {
    program: String,
    args: Vec<String>,
    timeout: Duration,
    secrets: Vec<String>,
    stdin: Option<Vec<u8>>,
}

impl Cmd {
    /// A command with the default timeout.
    pub fn new(program: impl Into<String>) -> Self {
        Cmd {
            program: program.into(),
            args: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            secrets: Vec::new(),
            stdin: None,
        }
    }

    /// Appends one argument.
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }

    /// Appends arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Appends an argument that must never appear in logs (a CHAP secret).
    pub fn secret_arg(mut self, a: impl Into<String>) -> Self {
        let a = a.into();
        self.secrets.push(a.clone());
        self.args.push(a);
        self
    }

    /// Sets the deadline.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Feeds these bytes on standard input.
    pub fn stdin(mut self, data: Vec<u8>) -> Self {
        self.stdin = Some(data);
        self
    }

    /// The program name.
    pub fn program(&self) -> &str {
        &self.program
    }

    /// The argument list (as given, secrets included: do not log it, use [`Cmd::display`]).
    pub fn argv(&self) -> &[String] {
        &self.args
    }

    /// The command line for logs, with secrets replaced by `***`.
    pub fn display(&self) -> String {
        let mut s = self.program.clone();
        for a in &self.args {
            s.push(' ');
            if self.secrets.iter().any(|x| x == a) {
                s.push_str("***");
            } else {
                s.push_str(a);
            }
        }
        s
    }
}

/// What a finished command produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Output {
    /// Exit code; -1 when the process was killed by a signal.
    pub code: i32,
    /// Standard output as UTF-8 (lossy).
    pub stdout: String,
    /// Standard error as UTF-8 (lossy).
    pub stderr: String,
}

impl Output {
    /// True when the exit code is 0.
    pub fn success(&self) -> bool {
        self.code == 0
    }

    /// `Ok(self)` on exit 0, otherwise [`ExecError::Failed`].
    pub fn check(self, program: &str) -> Result<Output, ExecError> {
        if self.success() {
            Ok(self)
        } else {
            Err(ExecError::Failed {
                program: program.to_owned(),
                code: self.code,
                stderr: self.stderr.trim().to_owned(),
            })
        }
    }
}

/// Runs commands, optionally behind a prefix (`nsenter --mount=/proc/1/ns/mnt --` or
/// `chroot /host`) so a containerised role can act on its host.
#[derive(Clone, Debug, Default)]
pub struct Runner {
    prefix: Vec<String>,
}

impl Runner {
    /// A runner with a command prefix (empty: run directly).
    pub fn with_prefix(prefix: Vec<String>) -> Self {
        Runner { prefix }
    }

    /// Runs `cmd` to completion or until its deadline.
    pub async fn run(&self, cmd: &Cmd) -> Result<Output, ExecError> {
        let (program, args): (&str, Vec<&str>) = match self.prefix.split_first() {
            Some((first, rest)) => (
                first,
                rest.iter()
                    .map(String::as_str)
                    .chain(std::iter::once(cmd.program.as_str()))
                    .chain(cmd.args.iter().map(String::as_str))
                    .collect(),
            ),
            None => (&cmd.program, cmd.args.iter().map(String::as_str).collect()),
        };
        let started = Instant::now();
        let mut child = tokio::process::Command::new(program)
            .args(&args)
            .env("LC_ALL", "C")
            .env("LVM_SUPPRESS_FD_WARNINGS", "1")
            .stdin(if cmd.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| ExecError::Spawn {
                program: cmd.program.clone(),
                source,
            })?;
        let io_err = |source| ExecError::Io {
            program: cmd.program.clone(),
            source,
        };
        if let (Some(data), Some(mut pipe)) = (&cmd.stdin, child.stdin.take()) {
            pipe.write_all(data).await.map_err(io_err)?;
            drop(pipe);
        }
        let out = match tokio::time::timeout(cmd.timeout, child.wait_with_output()).await {
            Ok(r) => r.map_err(io_err)?,
            Err(_) => {
                tracing::warn!(cmd = %cmd.display(), "command timed out");
                return Err(ExecError::Timeout {
                    program: cmd.program.clone(),
                    after: cmd.timeout,
                });
            }
        };
        let output = Output {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        tracing::debug!(
            cmd = %cmd.display(),
            code = output.code,
            ms = started.elapsed().as_millis() as u64,
            "ran"
        );
        Ok(output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_redacts_secrets() {
        let c = Cmd::new("tgtadm")
            .args(["--op", "new", "--user"])
            .arg("cb-user")
            .arg("--password")
            .secret_arg("s3cr3t");
        assert_eq!(c.display(), "tgtadm --op new --user cb-user --password ***");
        assert_eq!(c.argv().last().map(String::as_str), Some("s3cr3t"));
    }

    #[tokio::test]
    async fn runs_with_c_locale_and_exit_code() {
        let r = Runner::default();
        let out = r
            .run(&Cmd::new("sh").args(["-c", "echo $LC_ALL; echo err >&2; exit 3"]))
            .await
            .unwrap();
        assert_eq!(
            out,
            Output {
                code: 3,
                stdout: "C\n".into(),
                stderr: "err\n".into()
            }
        );
    }

    #[tokio::test]
    async fn prefix_is_prepended() {
        let r = Runner::with_prefix(vec!["env".into(), "FOO=bar".into()]);
        let out = r
            .run(&Cmd::new("sh").args(["-c", "echo $FOO"]))
            .await
            .unwrap();
        assert_eq!(out.stdout, "bar\n");
    }

    #[tokio::test]
    async fn timeout_kills() {
        let r = Runner::default();
        let err = r
            .run(
                &Cmd::new("sleep")
                    .arg("5")
                    .timeout(Duration::from_millis(100)),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, ExecError::Timeout { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn stdin_is_fed() {
        let out = Runner::default()
            .run(&Cmd::new("cat").stdin(b"abc".to_vec()))
            .await
            .unwrap();
        assert_eq!(out.stdout, "abc");
    }

    #[tokio::test]
    async fn missing_program_is_spawn_error() {
        let err = Runner::default()
            .run(&Cmd::new("/nonexistent/prog"))
            .await
            .unwrap_err();
        assert!(matches!(err, ExecError::Spawn { .. }), "{err:?}");
    }
}
