//! The project's release binary running inside real-kernel guests, reached from the host.
//!
//! `tests/e2e/run.sh` (`make e2e`) or `tests/e2e/up.sh` (`make e2e-up`) boots the guests,
//! starts `cinderblock all --endpoint tcp://0.0.0.0:10000` in each and forwards a host port
//! to it. These variables tell the tests where things are (`source tests/e2e/.run/env`):
//!   CINDERBLOCK_E2E_ONE_CSI    127.0.0.1:PORT of the one-VM topology's CSI endpoint
//!   CINDERBLOCK_E2E_STOR_CSI   ... of the storage node of the two-VM topology
//!   CINDERBLOCK_E2E_COMP_CSI   ... of its compute node
//!   CINDERBLOCK_E2E_VM         the `tests/e2e/vm` script (`$VM exec NAME CMD` runs in a guest)
//! A missing variable fails the test with that hint; the tests are ignored by default.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::process::Command;
use std::time::Duration;

use cinderblock::proto::csi::identity_client::IdentityClient;
use cinderblock::proto::csi::{GetPluginInfoRequest, ProbeRequest};
use tonic::transport::Channel;

const NEEDS_VMS: &str = "needs the e2e VMs (make e2e)";

/// The value of `var`, or a panic saying how to get it.
fn env(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!(
            "{var} is not set: {NEEDS_VMS}; or `make e2e-up` then `source tests/e2e/.run/env` \
             and run `cargo test --release --test e2e_vm -- --ignored`"
        )
    })
}

async fn identity(var: &str) -> IdentityClient<Channel> {
    let addr = env(var);
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(20))
        .timeout(Duration::from_secs(60))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to {var}={addr}: {e}"));
    IdentityClient::new(channel)
}

/// Runs `cmd` in guest `vm` through the harness; returns (exit code, stdout).
fn vm_exec(vm: &str, cmd: &str) -> (Option<i32>, String) {
    let out = Command::new(env("CINDERBLOCK_E2E_VM"))
        .args(["exec", vm, cmd])
        .output()
        .expect("run tests/e2e/vm");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
    )
}

async fn probe_and_info(var: &str) {
    let mut client = identity(var).await;

    let probe = client.probe(ProbeRequest {}).await.unwrap().into_inner();
    // CSI: an unset `ready` means ready.
    assert_ne!(probe.ready, Some(false), "{var}: Probe says not ready");

    let info = client
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (info.name.as_str(), info.vendor_version.as_str()),
        (cinderblock::csi::DRIVER_NAME, env!("CARGO_PKG_VERSION"))
    );
}

#[tokio::test]
#[ignore = "needs the e2e VMs (make e2e)"]
async fn one_vm_identity_answers_over_tcp() {
    probe_and_info("CINDERBLOCK_E2E_ONE_CSI").await;
}

#[tokio::test]
#[ignore = "needs the e2e VMs (make e2e)"]
async fn two_vm_storage_node_identity_answers_over_tcp() {
    probe_and_info("CINDERBLOCK_E2E_STOR_CSI").await;
}

#[tokio::test]
#[ignore = "needs the e2e VMs (make e2e)"]
async fn two_vm_compute_node_identity_answers_over_tcp() {
    probe_and_info("CINDERBLOCK_E2E_COMP_CSI").await;
}

#[test]
#[ignore = "needs the e2e VMs (make e2e)"]
fn guests_have_the_kernel_data_path_and_a_known_initiator_name() {
    // What the host lacks and the binary needs in a guest: device-mapper, the iSCSI
    // initiator, and an initiator name the harness chose (so tests can write ACLs for it).
    let vms = env("CINDERBLOCK_E2E_VMS");
    for vm in vms.split_whitespace() {
        let (code, out) = vm_exec(
            vm,
            "grep -q device-mapper /proc/misc && grep -q '^iscsi_tcp ' /proc/modules && \
             cat /etc/iscsi/initiatorname.iscsi",
        );
        let want = format!("InitiatorName=iqn.2025-01.io.cinderblock.e2e:{vm}");
        assert_eq!((code, out), (Some(0), want), "guest {vm}");
    }
}
