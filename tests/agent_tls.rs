//! Mutual TLS of the agent API with real processes: the real `cinderblock agent` (file pool,
//! its own private real tgtd) serving TLS on 127.0.0.1, reached by the real `agent-ctl` and
//! the real `cinderblock controller`. Certificates are made here with rcgen: a CA, the agent's
//! certificate (127.0.0.1 and localhost), a client certificate, and a second, untrusted CA
//! with a client certificate of its own.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod common;
#[path = "common/stack.rs"]
mod stack;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use cinderblock::proto::csi::controller_client::ControllerClient;
use cinderblock::proto::csi::identity_client::IdentityClient;
use cinderblock::proto::csi::{GetCapacityRequest, ProbeRequest};
use cinderblock::transport::{self, Endpoint};
use common::tgtd::{free_tcp_port, Tgtd};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use stack::{AgentSpec, Proc, BIN};

// ---- certificates ----------------------------------------------------------------------------

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = p.self_signed(&key).unwrap();
    Ca {
        pem: cert.pem(),
        issuer: Issuer::new(p, key),
    }
}

/// A certificate and key signed by `ca`, written as `<name>.crt` and `<name>.key`.
fn leaf(
    dir: &Path,
    ca: &Ca,
    name: &str,
    sans: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> (PathBuf, PathBuf) {
    let key = KeyPair::generate().unwrap();
    let mut p =
        CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![usage];
    let cert = p.signed_by(&key, &ca.issuer).unwrap();
    let (crt, k) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&crt, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (crt, k)
}

/// Every file the tests use.
struct Pki {
    ca: PathBuf,
    server: (PathBuf, PathBuf),
    client: (PathBuf, PathBuf),
    rogue_ca: PathBuf,
    rogue_client: (PathBuf, PathBuf),
}

fn pki(dir: &Path) -> Pki {
    let good = ca("cinderblock test CA");
    let rogue = ca("untrusted test CA");
    let (ca_file, rogue_ca) = (dir.join("ca.crt"), dir.join("rogue-ca.crt"));
    std::fs::write(&ca_file, &good.pem).unwrap();
    std::fs::write(&rogue_ca, &rogue.pem).unwrap();
    Pki {
        ca: ca_file,
        server: leaf(
            dir,
            &good,
            "agent",
            &["127.0.0.1", "localhost"],
            ExtendedKeyUsagePurpose::ServerAuth,
        ),
        client: leaf(
            dir,
            &good,
            "controller",
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
        ),
        rogue_ca,
        rogue_client: leaf(
            dir,
            &rogue,
            "intruder",
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
        ),
    }
}

// ---- a TLS agent -----------------------------------------------------------------------------

struct TlsAgent {
    port: u16,
    proc: Proc,
    pki: Pki,
    dir: tempfile::TempDir,
    // Dropped after the agent.
    _tgtd: Tgtd,
}

const SPEC: AgentSpec = AgentSpec {
    name: "tls1",
    zone: "z1",
    capacity_gib: 4,
    capabilities: "",
};

fn tls_table(pki: &Pki) -> String {
    format!(
        "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nclient_ca_file = \"{}\"\n",
        pki.server.0.display(),
        pki.server.1.display(),
        pki.ca.display()
    )
}

fn start_agent() -> TlsAgent {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let tgtd = stack::start_tgtd();
    let pool = dir.path().join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    let port = free_tcp_port();
    let listen = format!("tcp://127.0.0.1:{port}");
    let config = dir.path().join("agent.toml");
    let toml = stack::agent_config(&SPEC, &listen, &tgtd, &pool, "", &tls_table(&pki));
    std::fs::write(&config, toml).unwrap();
    let proc = Proc::spawn_until(
        &["agent", "--config", config.to_str().unwrap()],
        dir.path().join("agent.log"),
        &listen,
        || stack::listening(port),
    );
    TlsAgent {
        port,
        proc,
        pki,
        dir,
        _tgtd: tgtd,
    }
}

impl TlsAgent {
    fn endpoint(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    /// `cinderblock agent-ctl --agent <this agent> FLAGS -o json pools`.
    fn pools(&self, flags: &[&Path]) -> Output {
        self.pools_with(&self.endpoint(), flags, &[])
    }

    /// Like [`TlsAgent::pools`] with TLS flags given as (flag, file) pairs in `flags`
    /// (`--tls-ca`, `--tls-cert`, `--tls-key` in that order, as many as given) and `extra`.
    fn pools_with(&self, endpoint: &str, flags: &[&Path], extra: &[&str]) -> Output {
        let names = ["--tls-ca", "--tls-cert", "--tls-key"];
        let mut cmd = Command::new(BIN);
        cmd.args(["agent-ctl", "--agent", endpoint])
            .env_remove("RUST_LOG")
            .env("CINDERBLOCK_LOG_LEVEL", "warn")
            .stdin(Stdio::null());
        for (name, file) in names.iter().zip(flags) {
            cmd.arg(name).arg(file);
        }
        cmd.args(extra).args(["-o", "json", "pools"]);
        common::run(&mut cmd)
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn pool_names(out: &Output) -> Vec<String> {
    assert_eq!(out.status.code(), Some(0), "agent-ctl: {}", stderr(out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_owned())
        .collect()
}

/// Asserts that agent-ctl failed with exit code 1 and one `cinderblock: error:` line that
/// contains `want`.
fn assert_refused(out: &Output, case: &str, want: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(1), "{case}: {err}");
    assert!(out.stdout.is_empty(), "{case}: printed {:?}", out.stdout);
    let line = err
        .lines()
        .find(|l| l.starts_with("cinderblock: error: "))
        .unwrap_or_else(|| panic!("{case}: no error line in {err:?}"));
    assert!(line.contains(want), "{case}: {line:?} lacks {want:?}");
}

// ---- tests -----------------------------------------------------------------------------------

#[test]
fn only_a_client_certificate_from_the_trusted_ca_gets_in() {
    let agent = start_agent();
    let p = &agent.pki;

    // (1) The right CA and client certificate: the pools are listed, by IP or by name.
    let good = [p.ca.as_path(), &p.client.0, &p.client.1];
    assert_eq!(pool_names(&agent.pools(&good)), vec![SPEC.name]);
    let localhost = format!("tcp://localhost:{}", agent.port);
    assert_eq!(
        pool_names(&agent.pools_with(&localhost, &good, &[])),
        vec![SPEC.name]
    );
    assert_eq!(
        pool_names(&agent.pools_with(
            &agent.endpoint(),
            &good,
            &["--tls-server-name", "localhost"]
        )),
        vec![SPEC.name]
    );
    // The same through the environment.
    let out = common::run(
        Command::new(BIN)
            .args(["agent-ctl", "-o", "json", "pools"])
            .env("CINDERBLOCK_AGENT", agent.endpoint())
            .env("CINDERBLOCK_AGENT_TLS_CA", &p.ca)
            .env("CINDERBLOCK_AGENT_TLS_CERT", &p.client.0)
            .env("CINDERBLOCK_AGENT_TLS_KEY", &p.client.1),
    );
    assert_eq!(pool_names(&out), vec![SPEC.name]);

    // (2) TLS without a client certificate: the agent requires one.
    // The agent's refusal reaches the client as a closed connection: the hint says why.
    let no_answer = "ListPools failed: no answer over the connection: ";
    let out = agent.pools(&[&p.ca]);
    assert_refused(&out, "no client certificate", no_answer);
    assert_refused(
        &out,
        "no client certificate",
        "(the agent requires a client certificate: give --tls-cert and --tls-key)",
    );
    // (3) A client certificate from a CA the agent does not trust.
    let rogue = [p.ca.as_path(), &p.rogue_client.0, &p.rogue_client.1];
    let out = agent.pools(&rogue);
    assert_refused(&out, "untrusted client CA", no_answer);
    assert_refused(
        &out,
        "untrusted client CA",
        "(the agent may not trust this client certificate",
    );
    // (4) Plain text against the TLS port.
    let out = agent.pools(&[]);
    assert_refused(&out, "plain text", no_answer);
    assert_refused(
        &out,
        "plain text",
        "(if the agent serves TLS, give --tls-ca, --tls-cert and --tls-key)",
    );
    // The client refuses an agent it cannot verify: wrong CA, wrong name.
    let wrong_ca = [p.rogue_ca.as_path(), &p.client.0, &p.client.1];
    assert_refused(
        &agent.pools(&wrong_ca),
        "untrusted agent",
        &format!(
            "cannot connect to {}: transport error: invalid peer certificate: UnknownIssuer",
            agent.endpoint()
        ),
    );
    assert_refused(
        &agent.pools_with(
            &agent.endpoint(),
            &good,
            &["--tls-server-name", "stor9.example"],
        ),
        "wrong server name",
        "invalid peer certificate: certificate not valid for name \"stor9.example\"",
    );

    // Half a client identity is refused before anything is dialled.
    let out = agent.pools(&[&p.ca, &p.client.0]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--tls-key"), "{}", stderr(&out));

    // Every refusal was the agent's or the client's TLS check, and the agent still serves.
    assert_eq!(pool_names(&agent.pools(&good)), vec![SPEC.name]);
    assert!(
        agent.proc.log_text().contains("tls=true"),
        "{}",
        agent.proc.log_text()
    );
}

async fn probe(c: &mut IdentityClient<tonic::transport::Channel>) -> Option<bool> {
    c.probe(ProbeRequest {}).await.unwrap().into_inner().ready
}

/// Starts `cinderblock controller` on a Unix socket in `dir` with `agent_tls` (a TOML table or
/// nothing) and the agent at `endpoint`.
fn controller(dir: &Path, name: &str, endpoint: &str, agent_tls: &str) -> (Proc, PathBuf) {
    let csi = dir.join(format!("{name}.sock"));
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(&config, format!("{}\n{agent_tls}", stack::CONTROLLER_TOML)).unwrap();
    let agent = format!("{}={endpoint}", SPEC.name);
    let endpoint = format!("unix://{}", csi.display());
    let proc = Proc::spawn(
        &[
            "controller",
            "--config",
            config.to_str().unwrap(),
            "--endpoint",
            &endpoint,
            "--agent",
            &agent,
        ],
        dir.join(format!("{name}.log")),
        &csi,
    );
    (proc, csi)
}

#[tokio::test]
async fn a_controller_with_agent_tls_reaches_the_tls_agent_and_one_without_does_not() {
    let agent = tokio::task::spawn_blocking(start_agent).await.unwrap();
    let p = &agent.pki;
    let dir = agent.dir.path();
    let agent_tls = format!(
        "[agent_tls]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        p.ca.display(),
        p.client.0.display(),
        p.client.1.display()
    );
    let (with, with_csi) = controller(dir, "with-tls", &agent.endpoint(), &agent_tls);
    let (without, without_csi) = controller(dir, "without-tls", &agent.endpoint(), "");

    // (5) Probe: ready means an agent answered its own Probe over mutual TLS.
    let ep = Endpoint::Unix(with_csi);
    let mut id = IdentityClient::new(transport::connect(&ep, false).await.unwrap());
    let deadline = Instant::now() + Duration::from_secs(20);
    while probe(&mut id).await != Some(true) {
        assert!(
            Instant::now() < deadline,
            "controller never ready:\n{}\n--- agent\n{}",
            with.log_text(),
            agent.proc.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ...and the controller's agent client (ListPools over TLS) sees the pool's capacity.
    let mut ctl = ControllerClient::new(transport::connect(&ep, false).await.unwrap());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let cap = ctl
            .get_capacity(GetCapacityRequest::default())
            .await
            .unwrap()
            .into_inner()
            .available_capacity;
        if cap == (SPEC.capacity_gib << 30) as i64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "capacity {cap}\n{}",
            with.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Without agent_tls the same agent never answers: not ready, with the reason.
    let ep = Endpoint::Unix(without_csi);
    let mut id = IdentityClient::new(transport::connect(&ep, false).await.unwrap());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let err = id
        .probe(ProbeRequest {})
        .await
        .map(|r| r.into_inner().ready);
    assert!(
        matches!(&err, Ok(Some(false)))
            || err.as_ref().is_err_and(|s| s.message().contains(SPEC.name)),
        "{err:?}\n{}",
        without.log_text()
    );
}

#[test]
fn an_agent_whose_tls_files_are_unusable_stops_and_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let not_pem = dir.path().join("not-a-key.pem");
    std::fs::write(&not_pem, "hello\n").unwrap();
    let missing = dir.path().join("missing.crt");
    let cases = [
        (
            format!(
                "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nclient_ca_file = \"{}\"\n",
                missing.display(),
                pki.server.1.display(),
                pki.ca.display()
            ),
            format!("cannot read certificate {}", missing.display()),
        ),
        (
            format!(
                "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nclient_ca_file = \"{}\"\n",
                pki.server.0.display(),
                not_pem.display(),
                pki.ca.display()
            ),
            format!(
                "private key {} holds no PEM PRIVATE KEY block",
                not_pem.display()
            ),
        ),
    ];
    for (i, (tls, want)) in cases.into_iter().enumerate() {
        let config = dir.path().join(format!("agent-{i}.toml"));
        let pool = dir.path().join("pool");
        std::fs::write(
            &config,
            format!(
                "name = \"a\"\nlisten = \"tcp://127.0.0.1:{}\"\n[[pools]]\nname = \"p\"\n\
                 kind = \"file\"\npath = \"{}\"\n{tls}",
                free_tcp_port(),
                pool.display()
            ),
        )
        .unwrap();
        let out = common::run(
            Command::new(BIN)
                .args(["agent", "--config", config.to_str().unwrap()])
                .env_remove("RUST_LOG")
                .stdin(Stdio::null()),
        );
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains(&format!("cinderblock: error: TLS setup failed: {want}")),
            "{err}"
        );
        assert!(!pool.exists(), "stopped before opening any pool");
    }

    // TLS on a Unix socket is a configuration error naming the key (exit code 2).
    let config = dir.path().join("agent-unix.toml");
    std::fs::write(
        &config,
        format!(
            "name = \"a\"\nlisten = \"unix://{}\"\n{}",
            dir.path().join("a.sock").display(),
            tls_table(&pki)
        ),
    )
    .unwrap();
    let out = common::run(
        Command::new(BIN)
            .args(["agent", "--config", config.to_str().unwrap()])
            .stdin(Stdio::null()),
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("config key `tls`: TLS is served on tcp:// listeners only"),
        "{}",
        stderr(&out)
    );
}
