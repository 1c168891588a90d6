#!/bin/bash
# `make demo DEMO=vm`: the volume walk on real LVM and a real kernel iSCSI initiator, in one
# test VM booted for the purpose (stopped again at the end). What it walks through is
# scenarios/agent-lvm.sh: thick and thin pools, create, export with CHAP, write and read
# through iSCSI, snapshot, clone, extend, delete rules, wipe on delete, tgtd restart and an
# agent crash. Every step prints its time and what it checked.
set -euo pipefail
# The walk runs what ships: the release build.
export CB_PROFILE=release
source "$(dirname "$0")/lib.sh"
source "$CB_E2E/topology.sh"
t=$(now)
"$CB_E2E/host-deps.sh" vm
log "cargo build --release (the binary the guest runs)"
(cd "$CB_REPO" && cargo build --release --bin cinderblock)
"$CB_E2E/build-image.sh" >/dev/null
mkdir -p "$CB_SHARE/bin"
cp "$(cb_bin)" "$CB_SHARE/bin/cinderblock.tmp"
mv "$CB_SHARE/bin/cinderblock.tmp" "$CB_SHARE/bin/cinderblock"
trap '"$CB_E2E/vm" stop one >/dev/null 2>&1 || true' EXIT
log "booting the guest 'one' (Debian, stock kernel, LVM, tgt, open-iscsi; TCG, a few minutes)"
topo_boot one
"$CB_E2E/scenarios/agent-lvm.sh" one
echo
echo "demo (vm) done in $(since "$t")s"
