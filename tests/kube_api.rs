//! Cinderblock against a real kube-apiserver (v1.20, built from Debian's source by the
//! kube-infra scripts; `make kube` starts it and sets `CINDERBLOCK_KUBECONFIG`): the CRDs
//! apply and validate, real `cinderblock agent`s register StoragePools that a real
//! `cinderblock controller` discovers and places volumes on, VolumeBackup → VolumeRestore →
//! a bound PVC (kube-controller-manager binds it), and leader handover when the leading
//! controller is SIGKILLed.
//!
//! Every test talks to the apiserver with `kubectl` (as a user would) and to Cinderblock over
//! its real gRPC APIs; objects are made with a per-test suffix so runs do not collide.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod common;
#[path = "common/stack.rs"]
mod stack;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cinderblock::proto::csi as pb;
use cinderblock::proto::csi::controller_client::ControllerClient;
use cinderblock::transport::{self, Endpoint};
use pb::volume_capability::{access_mode::Mode, AccessMode, AccessType, MountVolume};
use serde_json::Value;
use stack::{agent_config, start_tgtd, AgentSpec, Proc, BIN};

const NEEDS: &str = "needs a real kube-apiserver: make kube";

fn kubeconfig() -> PathBuf {
    PathBuf::from(
        std::env::var_os("CINDERBLOCK_KUBECONFIG")
            .expect("CINDERBLOCK_KUBECONFIG is not set: run these tests with `make kube`"),
    )
}

/// A short random suffix for object names.
fn suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()
}

/// `kubectl ARGS` with `stdin`; (exit code, stdout, stderr).
fn kubectl_in(args: &[&str], stdin: &str) -> (i32, String, String) {
    let mut child = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl is not installed");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn kubectl_ok(args: &[&str], stdin: &str) -> String {
    let (code, out, err) = kubectl_in(args, stdin);
    assert_eq!(code, 0, "kubectl {args:?} failed:\n{out}\n{err}");
    out
}

fn get_json(args: &[&str]) -> Option<Value> {
    let mut full = vec!["get"];
    full.extend_from_slice(args);
    full.extend_from_slice(&["-o", "json"]);
    let (code, out, _) = kubectl_in(&full, "");
    (code == 0).then(|| serde_json::from_str(&out).unwrap())
}

/// Polls `f` every 200 ms until it returns `Some`, at most `limit`; panics with `what` and
/// `logs()` otherwise.
fn wait_for<T>(
    what: &str,
    limit: Duration,
    logs: impl Fn() -> String,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: timed out\n{}", logs());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Applies the CRDs from `cinderblock crds` and waits until they are established.
fn apply_crds() {
    let out = Command::new(BIN).arg("crds").output().unwrap();
    assert!(out.status.success());
    kubectl_ok(
        &["apply", "-f", "-"],
        &String::from_utf8(out.stdout).unwrap(),
    );
    kubectl_ok(
        &[
            "wait",
            "--for",
            "condition=established",
            "--timeout=60s",
            "crd/storagepools.cinderblock.dev",
            "crd/volumebackups.cinderblock.dev",
            "crd/volumerestores.cinderblock.dev",
        ],
        "",
    );
}

/// The `[kubernetes]` table of a test agent.
fn agent_kube_table(socket: &Path) -> String {
    format!(
        "[kubernetes]\nkubeconfig = \"{}\"\nadvertise_endpoint = \"unix://{}\"\nheartbeat_interval_secs = 1\n",
        kubeconfig().display(),
        socket.display()
    )
}

/// A running agent registered in the cluster.
struct KubeAgent {
    spec: AgentSpec,
    pool_dir: PathBuf,
    socket: PathBuf,
    proc: Proc,
    _tgtd: common::tgtd::Tgtd,
}

fn start_agent(dir: &Path, spec: AgentSpec, register: bool, extra_tables: &str) -> KubeAgent {
    let tgtd = start_tgtd();
    let pool_dir = dir.join(format!("pool-{}", spec.name));
    std::fs::create_dir_all(&pool_dir).unwrap();
    let socket = dir.join(format!("agent-{}.sock", spec.name));
    let mut tables = extra_tables.to_owned();
    if register {
        tables.push_str(&agent_kube_table(&socket));
    }
    let listen = format!("unix://{}", socket.display());
    let toml = agent_config(&spec, &listen, &tgtd, &pool_dir, "", &tables);
    let config = dir.join(format!("agent-{}.toml", spec.name));
    std::fs::write(&config, toml).unwrap();
    let proc = Proc::spawn(
        &["agent", "--config", config.to_str().unwrap()],
        dir.join(format!("agent-{}.log", spec.name)),
        &socket,
    );
    KubeAgent {
        spec,
        pool_dir,
        socket,
        proc,
        _tgtd: tgtd,
    }
}

/// A controller with `[kubernetes]` (discovery, election on `lease`), serving CSI on
/// `csi`, its metrics on `metrics`; `agents` are static `--agent` flags.
fn start_controller(
    dir: &Path,
    id: &str,
    lease: &str,
    agents: &[&KubeAgent],
    timing: (u64, u64, u64),
    discover: bool,
) -> (Proc, PathBuf, u16) {
    let csi = dir.join(format!("csi-{id}.sock"));
    let metrics = common::tgtd::free_tcp_port();
    let config = dir.join(format!("controller-{id}.toml"));
    std::fs::write(
        &config,
        format!(
            r#"metrics_listen = "127.0.0.1:{metrics}"
stats_interval_secs = 1

[kubernetes]
kubeconfig = "{kc}"
discover_agents = {discover}
discovery_interval_secs = 1
pool_stale_after_secs = 30

[kubernetes.leader_election]
lease_name = "{lease}"
namespace = "default"
identity = "{id}"
lease_duration_secs = {ld}
renew_deadline_secs = {rd}
retry_period_secs = {rp}
"#,
            kc = kubeconfig().display(),
            ld = timing.0,
            rd = timing.1,
            rp = timing.2,
        ),
    )
    .unwrap();
    let mut args: Vec<String> = vec![
        "controller".into(),
        "--config".into(),
        config.display().to_string(),
        "--endpoint".into(),
        format!("unix://{}", csi.display()),
    ];
    for a in agents {
        args.push("--agent".into());
        args.push(format!("{}=unix://{}", a.spec.name, a.socket.display()));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let proc = Proc::spawn(&args, dir.join(format!("controller-{id}.log")), &csi);
    (proc, csi, metrics)
}

async fn csi_client(csi: &Path) -> ControllerClient<tonic::transport::Channel> {
    let ep = Endpoint::Unix(csi.to_owned());
    ControllerClient::new(transport::connect(&ep, false).await.unwrap())
}

fn create_request(name: &str, zone: Option<&str>) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(pb::CapacityRange {
            required_bytes: 64 << 20,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![pb::VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume {
                fs_type: "ext4".into(),
                ..Default::default()
            })),
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
        }],
        accessibility_requirements: zone.map(|z| pb::TopologyRequirement {
            requisite: vec![pb::Topology {
                segments: [(cinderblock::csi::TOPOLOGY_ZONE_KEY.to_owned(), z.to_owned())].into(),
            }],
            preferred: vec![],
        }),
        ..Default::default()
    }
}

/// CreateVolume on `csi`, retried (as the external-provisioner does) while the answer is
/// UNAVAILABLE, for at most `limit`.
async fn create_retrying(
    csi: &Path,
    name: &str,
    zone: Option<&str>,
    limit: Duration,
) -> pb::Volume {
    let deadline = Instant::now() + limit;
    let mut client = csi_client(csi).await;
    loop {
        match client.create_volume(create_request(name, zone)).await {
            Ok(r) => return r.into_inner().volume.unwrap(),
            Err(s) if Instant::now() < deadline => {
                assert!(
                    matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Aborted),
                    "{s:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => panic!("CreateVolume {name}: {s:?}"),
        }
    }
}

fn http_get(port: u16, path: &str) -> String {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

// ---------------------------------------------------------------------------------------

#[test]
#[ignore = "needs a real kube-apiserver: make kube"]
fn crds_apply_and_bad_volume_backups_are_rejected_by_the_schema() {
    let _ = NEEDS;
    apply_crds();
    let s = suffix();
    let good = format!(
        "apiVersion: cinderblock.dev/v1alpha1\nkind: VolumeBackup\nmetadata:\n  name: ok-{s}\n  namespace: default\nspec:\n  pvcName: data\n  incremental: true\n  deletionPolicy: Retain\n"
    );
    kubectl_ok(&["apply", "--dry-run=server", "-f", "-"], &good);
    let cases = [
        ("spec:\n  incremental: true\n", "spec.pvcName"),
        ("spec:\n  pvcName: 5\n", "spec.pvcName"),
        (
            "spec:\n  pvcName: data\n  incremental: \"yes\"\n",
            "spec.incremental",
        ),
        (
            "spec:\n  pvcName: data\n  deletionPolicy: Sometimes\n",
            "spec.deletionPolicy",
        ),
        ("spec:\n  pvcName: \"\"\n", "spec.pvcName"),
    ];
    for (spec, field) in cases {
        let doc = format!(
            "apiVersion: cinderblock.dev/v1alpha1\nkind: VolumeBackup\nmetadata:\n  name: bad-{s}\n  namespace: default\n{spec}"
        );
        let (code, out, err) = kubectl_in(
            &["apply", "--dry-run=server", "--validate=false", "-f", "-"],
            &doc,
        );
        assert_ne!(code, 0, "accepted:\n{doc}\n{out}");
        assert!(
            err.contains(field) && err.contains(" is invalid: "),
            "{doc}\n{err}"
        );
    }
    // A VolumeRestore needs its target PVC and StorageClass.
    let (code, _, err) = kubectl_in(
        &["apply", "--dry-run=server", "--validate=false", "-f", "-"],
        &format!("apiVersion: cinderblock.dev/v1alpha1\nkind: VolumeRestore\nmetadata:\n  name: r-{s}\n  namespace: default\nspec:\n  backupName: x\n"),
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("spec.pvcName") && err.contains("spec.storageClassName"),
        "{err}"
    );
    // The printer columns are Cinder's get-pools.
    let (_, out, err) = kubectl_in(&["get", "storagepools"], "");
    let header = out.lines().next().unwrap_or_default().to_owned() + &err;
    assert!(
        header.contains("No resources found")
            || [
                "NAME",
                "ZONE",
                "BACKEND",
                "TOTAL",
                "FREE",
                "PROVISIONED",
                "VOLUMES",
                "HEALTH",
                "AGE"
            ]
            .iter()
            .all(|c| header.contains(c)),
        "{header}"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a real kube-apiserver: make kube"]
async fn agents_register_storagepools_and_the_controller_places_on_discovered_agents() {
    apply_crds();
    // StoragePools of agents from earlier runs would be discovered while their heartbeat is
    // fresh (and, dead, make lookups UNAVAILABLE): start from none.
    kubectl_ok(&["delete", "storagepools", "--all"], "");
    let dir = tempfile::tempdir().unwrap();
    let s = suffix();
    let spec = |name: &'static str, zone: &'static str, gib| AgentSpec {
        name,
        zone,
        capacity_gib: gib,
        capabilities: "",
    };
    // Agent names are cluster-wide: unique per run.
    let a_name: &'static str = Box::leak(format!("ka-{s}").into_boxed_str());
    let b_name: &'static str = Box::leak(format!("kb-{s}").into_boxed_str());
    let a = start_agent(dir.path(), spec(a_name, "zone-a", 4), true, "");
    let b = start_agent(dir.path(), spec(b_name, "zone-b", 6), true, "");
    let logs = || format!("{}\n{}", a.proc.log_text(), b.proc.log_text());
    for agent in [&a, &b] {
        let name = format!("{}.{}", agent.spec.name, agent.spec.name);
        let sp = wait_for(
            "StoragePool registered",
            Duration::from_secs(30),
            logs,
            || get_json(&["storagepool", &name]).filter(|v| v["status"]["health"] == "Healthy"),
        );
        assert_eq!(sp["spec"]["agent"], agent.spec.name);
        assert_eq!(sp["spec"]["backend"], "file");
        assert_eq!(sp["spec"]["zone"], agent.spec.zone);
        assert_eq!(
            sp["spec"]["endpoint"],
            format!("unix://{}", agent.socket.display())
        );
        assert_eq!(
            sp["status"]["capacity"]["totalBytes"],
            agent.spec.capacity_gib << 30
        );
        assert_eq!(
            sp["status"]["capacity"]["total"],
            format!("{}Gi", agent.spec.capacity_gib)
        );
        assert_eq!(
            sp["metadata"]["labels"]["cinderblock.dev/agent"],
            agent.spec.name
        );
    }
    // Heartbeats move.
    let name_a = format!("{a_name}.{a_name}");
    let beat = |n: &str| get_json(&["storagepool", n]).unwrap()["status"]["lastHeartbeat"].clone();
    let first = beat(&name_a);
    wait_for("a second heartbeat", Duration::from_secs(10), logs, || {
        (beat(&name_a) != first).then_some(())
    });
    let table = kubectl_ok(&["get", "storagepools", &name_a], "");
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "ZONE",
            "BACKEND",
            "TOTAL",
            "FREE",
            "PROVISIONED",
            "VOLUMES",
            "HEALTH",
            "AGE"
        ]
    );
    assert!(
        table.contains("zone-a") && table.contains("4Gi") && table.contains("Healthy"),
        "{table}"
    );

    // A controller with no static agent: everything comes from the StoragePools.
    let (ctl, csi, metrics) = start_controller(
        dir.path(),
        &format!("c-{s}"),
        &format!("lease-{s}"),
        &[],
        (6, 4, 1),
        true,
    );
    let vol = create_retrying(
        &csi,
        &format!("pvc-{s}"),
        Some("zone-b"),
        Duration::from_secs(40),
    )
    .await;
    assert_eq!(
        vol.accessible_topology[0].segments[cinderblock::csi::TOPOLOGY_ZONE_KEY],
        "zone-b"
    );
    let img = b.pool_dir.join(format!("volume-{}.img", vol.volume_id));
    assert!(img.exists(), "volume not on agent b:\n{}", ctl.log_text());
    assert!(!a
        .pool_dir
        .join(format!("volume-{}.img", vol.volume_id))
        .exists());
    // The StoragePool shows it at the next heartbeat.
    let name_b = format!("{b_name}.{b_name}");
    wait_for("volume counted", Duration::from_secs(10), logs, || {
        (get_json(&["storagepool", &name_b]).unwrap()["status"]["volumeCount"] == 1).then_some(())
    });
    // Metrics of the controller: the create counted, pools as gauges, leader 1.
    let scrape = common::scrape_metrics(metrics);
    let sample = |name: &str| scrape.get(name).copied();
    assert_eq!(
        sample("cinderblock_csi_rpc_total{rpc=\"CreateVolume\",code=\"OK\"}"),
        Some(1.0),
        "{scrape:?}"
    );
    assert!(
        sample("cinderblock_csi_rpc_duration_seconds_count{rpc=\"CreateVolume\"}")
            .is_some_and(|n| n >= 1.0),
        "{scrape:?}"
    );
    assert_eq!(
        sample(&format!(
            "cinderblock_controller_pool_total_bytes{{pool=\"{b_name}#{b_name}\"}}"
        )),
        Some((6u64 << 30) as f64),
        "{scrape:?}"
    );
    assert_eq!(sample("cinderblock_controller_leader"), Some(1.0));
    assert!(http_get(metrics, "/healthz").starts_with("HTTP/1.1 200 OK"));

    // An agent that stops heartbeating is no longer discovered by a new controller... and
    // its StoragePools are cleaned up when its pools go: delete by stopping it and checking
    // the heartbeat ages.
    drop(a);
    drop(b);
    for n in [&name_a, &name_b] {
        kubectl_ok(&["delete", "storagepool", n], "");
    }
}

/// Writes `data` at the start of a file-pool volume.
fn write_image(img: &Path, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(data, 0).unwrap();
}

fn read_image(img: &Path, n: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(img).unwrap();
    let mut buf = vec![0u8; n];
    f.read_exact_at(&mut buf, 0).unwrap();
    buf
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a real kube-apiserver with kube-controller-manager: make kube"]
async fn volume_backup_completes_and_volume_restore_yields_a_bound_pvc() {
    apply_crds();
    let dir = tempfile::tempdir().unwrap();
    let s = suffix();
    let name: &'static str = Box::leak(format!("kbk-{s}").into_boxed_str());
    let repo = dir.path().join("repo");
    let tables = format!(
        "[backup]\nchunk_size = 65536\n\n[[backup_repositories]]\nname = \"local\"\nkind = \"posix\"\npath = \"{}\"\n\n",
        repo.display()
    );
    let agent = start_agent(
        dir.path(),
        AgentSpec {
            name,
            zone: "zone-a",
            capacity_gib: 4,
            capabilities: "",
        },
        true,
        &tables,
    );
    let (ctl, csi, metrics) = start_controller(
        dir.path(),
        &format!("c-{s}"),
        &format!("lease-{s}"),
        &[&agent],
        (6, 4, 1),
        false,
    );
    let logs = || format!("{}\n{}", ctl.log_text(), agent.proc.log_text());
    let ns = "default";
    // A StorageClass of ours, a volume made through CSI as the external-provisioner would,
    // its PV and a PVC bound to it.
    let sc = format!("cb-{s}");
    kubectl_ok(
        &["apply", "-f", "-"],
        &format!("apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata:\n  name: {sc}\nprovisioner: csi.cinderblock.dev\nreclaimPolicy: Retain\nparameters:\n  type: default\n"),
    );
    let vol = create_retrying(&csi, &format!("pvc-src-{s}"), None, Duration::from_secs(40)).await;
    let img = agent.pool_dir.join(format!("volume-{}.img", vol.volume_id));
    let data: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    write_image(&img, &data);
    let pv = format!("pv-src-{s}");
    let pvc = format!("src-{s}");
    kubectl_ok(
        &["apply", "-f", "-"],
        &format!(
            "apiVersion: v1\nkind: PersistentVolume\nmetadata:\n  name: {pv}\nspec:\n  capacity:\n    storage: 64Mi\n  accessModes: [ReadWriteOnce]\n  persistentVolumeReclaimPolicy: Retain\n  storageClassName: {sc}\n  csi:\n    driver: csi.cinderblock.dev\n    volumeHandle: {}\n  claimRef:\n    namespace: {ns}\n    name: {pvc}\n---\napiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: {pvc}\n  namespace: {ns}\nspec:\n  accessModes: [ReadWriteOnce]\n  storageClassName: {sc}\n  volumeName: {pv}\n  resources:\n    requests:\n      storage: 64Mi\n",
            vol.volume_id
        ),
    );
    wait_for("source PVC bound", Duration::from_secs(60), logs, || {
        (get_json(&["pvc", "-n", ns, &pvc])?["status"]["phase"] == "Bound").then_some(())
    });

    // The backup.
    let vb = format!("vb-{s}");
    kubectl_ok(
        &["apply", "-f", "-"],
        &format!("apiVersion: cinderblock.dev/v1alpha1\nkind: VolumeBackup\nmetadata:\n  name: {vb}\n  namespace: {ns}\nspec:\n  pvcName: {pvc}\n"),
    );
    let done = wait_for(
        "VolumeBackup completed",
        Duration::from_secs(90),
        logs,
        || {
            let v = get_json(&["volumebackup", "-n", ns, &vb])?;
            assert_ne!(v["status"]["phase"], "Failed", "{v:#}");
            (v["status"]["phase"] == "Completed").then_some(v)
        },
    );
    let st = &done["status"];
    assert_eq!(st["backupId"], done["metadata"]["uid"]);
    assert_eq!(st["volumeId"], vol.volume_id.as_str());
    assert_eq!(st["agent"], name);
    assert_eq!(st["sizeBytes"], 64 << 20);
    assert_eq!(st["progress"], "100%");
    assert!(st["storedBytes"].as_u64().unwrap() > 0, "{st:#}");
    assert!(
        st["duration"].as_str().is_some_and(|d| d.ends_with('s')),
        "{st:#}"
    );
    assert_eq!(
        done["metadata"]["finalizers"],
        serde_json::json!(["cinderblock.dev/backup-protection"])
    );
    let backup_id = st["backupId"].as_str().unwrap().to_owned();
    assert!(
        repo.join(&backup_id).exists(),
        "backup container in the repository"
    );

    // The restore into a new PVC.
    let vr = format!("vr-{s}");
    let restored_pvc = format!("restored-{s}");
    kubectl_ok(
        &["apply", "-f", "-"],
        &format!("apiVersion: cinderblock.dev/v1alpha1\nkind: VolumeRestore\nmetadata:\n  name: {vr}\n  namespace: {ns}\nspec:\n  backupName: {vb}\n  pvcName: {restored_pvc}\n  storageClassName: {sc}\n"),
    );
    let restored = wait_for(
        "VolumeRestore completed",
        Duration::from_secs(120),
        logs,
        || {
            let v = get_json(&["volumerestore", "-n", ns, &vr])?;
            assert_ne!(v["status"]["phase"], "Failed", "{v:#}");
            (v["status"]["phase"] == "Completed").then_some(v)
        },
    );
    let claim = get_json(&["pvc", "-n", ns, &restored_pvc]).unwrap();
    assert_eq!(claim["status"]["phase"], "Bound");
    let pv_name = restored["status"]["pvName"].as_str().unwrap();
    assert_eq!(claim["spec"]["volumeName"], pv_name);
    let new_pv = get_json(&["pv", pv_name]).unwrap();
    let new_id = restored["status"]["volumeId"].as_str().unwrap();
    assert_eq!(new_pv["spec"]["csi"]["driver"], "csi.cinderblock.dev");
    assert_eq!(new_pv["spec"]["csi"]["volumeHandle"], new_id);
    assert_eq!(
        new_pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][0]
            ["values"],
        serde_json::json!(["zone-a"])
    );
    assert_ne!(new_id, vol.volume_id);
    let new_img = agent.pool_dir.join(format!("volume-{new_id}.img"));
    assert_eq!(read_image(&new_img, data.len()), data, "restored bytes");

    // The leader did the work, and the restore the reconciler made is not counted as a CSI
    // call: the one CreateVolume that succeeded is the source's.
    let scrape = common::scrape_metrics(metrics);
    assert_eq!(
        scrape.get("cinderblock_controller_leader"),
        Some(&1.0),
        "{scrape:?}"
    );
    assert_eq!(
        scrape.get("cinderblock_csi_rpc_total{rpc=\"CreateVolume\",code=\"OK\"}"),
        Some(&1.0),
        "{scrape:?}"
    );

    // Deleting the VolumeBackup deletes the backup (finalizer), then the object goes.
    kubectl_ok(
        &["delete", "volumebackup", "-n", ns, &vb, "--wait=false"],
        "",
    );
    wait_for("VolumeBackup gone", Duration::from_secs(30), logs, || {
        get_json(&["volumebackup", "-n", ns, &vb])
            .is_none()
            .then_some(())
    });
    assert!(
        !repo.join(&backup_id).exists(),
        "backup deleted from the repository"
    );
    // The restore's finalizer needs the controller; the StoragePools go once their agent is
    // stopped (else its next heartbeat writes them again).
    kubectl_ok(&["delete", "volumerestore", "-n", ns, &vr], "");
    drop(ctl);
    drop(agent);
    for args in [
        vec!["delete", "pvc", "-n", ns, &restored_pvc, &pvc],
        vec!["delete", "pv", pv_name, &pv],
        vec!["delete", "storageclass", &sc],
        vec![
            "delete",
            "storagepool",
            "-l",
            &format!("cinderblock.dev/agent={name}"),
        ],
    ] {
        kubectl_ok(&args, "");
    }
}

fn lease_holder(lease: &str) -> Option<String> {
    get_json(&["lease", "-n", "default", lease])?["spec"]["holderIdentity"]
        .as_str()
        .map(str::to_owned)
}

fn sigkill(pid: u32) {
    let out = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success());
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs a real kube-apiserver: make kube"]
async fn killing_the_leader_hands_over_within_the_lease_duration_without_lost_or_double_creates() {
    let dir = tempfile::tempdir().unwrap();
    let s = suffix();
    let agent = start_agent(
        dir.path(),
        AgentSpec {
            name: "solo",
            zone: "zone-a",
            capacity_gib: 8,
            capabilities: "",
        },
        false,
        "",
    );
    let agent2 = start_agent(
        dir.path(),
        AgentSpec {
            name: "duo",
            zone: "zone-a",
            capacity_gib: 8,
            capabilities: "",
        },
        false,
        "",
    );
    let lease = format!("lease-{s}");
    const LEASE_SECS: u64 = 6;
    let timing = (LEASE_SECS, 4, 1);
    let (c1, csi1, m1) =
        start_controller(dir.path(), "one", &lease, &[&agent, &agent2], timing, false);
    let (c2, csi2, m2) =
        start_controller(dir.path(), "two", &lease, &[&agent, &agent2], timing, false);
    let log_dir = dir.path().to_owned();
    let logs = move || {
        ["one", "two"]
            .iter()
            .map(|id| {
                std::fs::read_to_string(log_dir.join(format!("controller-{id}.log")))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    let leader = wait_for("a leader", Duration::from_secs(20), &logs, || {
        lease_holder(&lease)
    });
    let mut replicas = [("one", csi1, m1, Some(c1)), ("two", csi2, m2, Some(c2))];
    if leader == "two" {
        replicas.swap(0, 1);
    }
    // The follower refuses mutating calls and serves reads.
    let mut follower = csi_client(&replicas[1].1).await;
    let refused = follower
        .create_volume(create_request(&format!("x-{s}"), None))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("not the leader"), "{refused:?}");
    follower
        .controller_get_capabilities(pb::ControllerGetCapabilitiesRequest {})
        .await
        .unwrap();
    let scrape = common::scrape_metrics(replicas[1].2);
    assert_eq!(
        scrape.get("cinderblock_controller_leader"),
        Some(&0.0),
        "{scrape:?}"
    );

    // Creates through both replicas, as a provisioner on each would send them; the leader is
    // SIGKILLed after the fifth.
    const N: usize = 12;
    let names: Vec<String> = (0..N).map(|i| format!("ha-{s}-{i}")).collect();
    let mut handover = None;
    for (i, name) in names.iter().enumerate() {
        if i == 5 {
            let pid = replicas[0].3.as_ref().unwrap().pid();
            sigkill(pid);
            let killed_at = Instant::now();
            // The next create goes to the survivor, retried while UNAVAILABLE.
            let v = create_retrying(
                &replicas[1].1,
                name,
                None,
                Duration::from_secs(LEASE_SECS * 3),
            )
            .await;
            assert!(!v.volume_id.is_empty());
            handover = Some(killed_at.elapsed());
            continue;
        }
        let target = if handover.is_some() { 1 } else { 0 };
        // Also ask the other replica for the same name: a second create is refused or, for
        // the leader, returns the same volume.
        let v = create_retrying(&replicas[target].1, name, None, Duration::from_secs(20)).await;
        let again = create_retrying(&replicas[target].1, name, None, Duration::from_secs(20)).await;
        assert_eq!(v.volume_id, again.volume_id);
    }
    let handover = handover.unwrap();
    eprintln!("handover after SIGKILL of the leader: {handover:?}");
    assert!(
        handover < Duration::from_secs(LEASE_SECS + 3),
        "handover took {handover:?}\n{}",
        logs()
    );
    assert_eq!(lease_holder(&lease).as_deref(), Some(replicas[1].0));
    // Exactly one volume per name over both agents: none lost, none made twice (a second
    // create of a name would have to land on the other agent's pool to exist twice).
    let mut got: Vec<String> = Vec::new();
    for dir in [&agent.pool_dir, &agent2.pool_dir] {
        for e in std::fs::read_dir(dir).unwrap() {
            let f = e.unwrap().file_name().to_string_lossy().into_owned();
            if let Some(id) = f
                .strip_prefix("volume-")
                .and_then(|r| r.strip_suffix(".json"))
            {
                got.push(id.to_owned());
            }
        }
    }
    got.sort();
    let mut want: Vec<String> = names
        .iter()
        .map(|n| cinderblock::controller::volume_id_for(n).to_string())
        .collect();
    want.sort();
    assert_eq!(got, want, "{}", logs());
    kubectl_ok(&["delete", "lease", "-n", "default", &lease], "");
}
