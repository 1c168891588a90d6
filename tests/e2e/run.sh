#!/bin/bash
# `make e2e`: the real-kernel end-to-end run. Boots the guests ONCE and runs every scenario
# on them, then the Rust tests in tests/e2e_vm.rs against them, then tears everything down
# (also on failure, timeout, Ctrl-C). Prints each stage's duration; exits non-zero if any
# stage failed.
#   run.sh            both topologies (two VMs + one VM, booted together)
#   TOPOLOGY=two run.sh | TOPOLOGY=one run.sh
# Budgets (seconds, per stage, enforced with timeout): see BUDGET_* below.
set -uo pipefail
source "$(dirname "$0")/lib.sh"
source "$CB_E2E/topology.sh"
TOPOLOGY=${TOPOLOGY:-all}
VMS=$(topo_vms "$TOPOLOGY")
LOGS=$CB_RUN/logs
mkdir -p "$LOGS"
BUDGET_DEPS=${BUDGET_DEPS:-600}
BUDGET_IMAGE=${BUDGET_IMAGE:-1200}
BUDGET_BUILD=${BUDGET_BUILD:-1800}
BUDGET_BOOT=${BUDGET_BOOT:-900}
export BOOT_TIMEOUT=${BOOT_TIMEOUT:-$((BUDGET_BOOT - 30))}
BUDGET_SCENARIO=${BUDGET_SCENARIO:-900}
BUDGET_START=${BUDGET_START:-120}
BUDGET_LVM=${BUDGET_LVM:-1200}
BUDGET_AGENT=${BUDGET_AGENT:-1500}
# The Rust tests took 1576 s on the debug build here (2026-11-22), 993 s on the release build.
BUDGET_TESTS=${BUDGET_TESTS:-3600}

T0=$(now)
SUMMARY=()
FAILED=0
BUILD_PID=

record() {  # NAME SECONDS RESULT
  SUMMARY+=("$(printf '%-44s %7ss  %s' "$1" "$2" "$3")")
  [ "$3" = ok ] || FAILED=1
}

# stage NAME BUDGET CMD...: run CMD with a time budget, print and record its duration.
stage() {
  local name=$1 budget=$2 t rc
  shift 2
  echo
  echo "=== $name (budget ${budget}s)"
  t=$(now)
  timeout -k 10 "$budget" "$@" && rc=0 || rc=$?
  local d
  d=$(since "$t")
  case $rc in
    0) record "$name" "$d" ok ;;
    124 | 137) record "$name" "$d" "TIMEOUT after ${budget}s" ;;
    *) record "$name" "$d" "FAILED rc=$rc" ;;
  esac
  echo "=== $name: ${d}s, rc=$rc"
  return $rc
}

teardown() {
  local rc=$?
  trap - EXIT INT TERM
  echo
  echo "=== teardown"
  if [ -n "$BUILD_PID" ] && kill -0 "$BUILD_PID" 2>/dev/null; then
    kill -- "$BUILD_PID" 2>/dev/null # our timeout wrapper; it passes the signal to cargo
    wait "$BUILD_PID" 2>/dev/null
  fi
  # shellcheck disable=SC2086
  "$CB_E2E/down.sh" $VMS || FAILED=1
  echo
  echo "=== e2e summary (guests: $VMS)"
  printf '%s\n' "${SUMMARY[@]}"
  printf '%-44s %7ss\n' "total" "$(since "$T0")"
  printf '%s\n' "${SUMMARY[@]}" >"$LOGS/summary.txt"
  if [ "$FAILED" != 0 ] || [ "$rc" != 0 ]; then
    echo "e2e: FAILED (logs: $LOGS, guest logs: $CB_SHARE/logs, consoles: $CB_RUN/vms/*/console.log)"
    exit 1
  fi
  echo "e2e: all stages passed"
  exit 0
}
trap teardown EXIT
trap 'echo "e2e: interrupted"; exit 130' INT
trap 'echo "e2e: terminated"; exit 143' TERM

# The rest is one brace group: bash parses all of it before running it, so editing this
# file during a run cannot derail the run.
{

stage "host packages + qemu 7.2 (host-deps.sh vm)" "$BUDGET_DEPS" "$CB_E2E/host-deps.sh" vm || exit 1

# The build (binary + the e2e_vm test; CB_PROFILE, see lib.sh) runs beside the image build
# and the boot. After `make test` it has nothing to compile.
echo
echo "=== binary build (background): cargo build $(cb_profile_flag) ($CB_PROFILE), log $LOGS/cargo-build.log"
BUILD_T0=$(now)
# shellcheck disable=SC2046
(cd "$CB_REPO" && exec timeout -k 10 "$BUDGET_BUILD" \
  cargo build $(cb_profile_flag) --bin cinderblock --test e2e_vm) >"$LOGS/cargo-build.log" 2>&1 &
BUILD_PID=$!

stage "image build (build-image.sh)" "$BUDGET_IMAGE" "$CB_E2E/build-image.sh" || exit 1
# shellcheck disable=SC2016
stage "boot: $VMS" "$BUDGET_BOOT" bash -c \
  'source "$1/lib.sh"; source "$1/topology.sh"; shift; topo_boot "$@"' _ "$CB_E2E" $VMS || exit 1

case " $VMS " in *" stor "*)
  stage "scenario: raw LVM+tgt+iSCSI, two VMs" "$BUDGET_SCENARIO" \
    "$CB_E2E/scenarios/raw-iscsi.sh" stor comp "$CB_STOR_IP" ;;
esac
case " $VMS " in *" one "*)
  stage "scenario: raw LVM+tgt+iSCSI, one VM" "$BUDGET_SCENARIO" \
    "$CB_E2E/scenarios/raw-iscsi.sh" one one "$CB_ONE_IP" ;;
esac

echo
echo "=== waiting for the binary build"
wait "$BUILD_PID" && rc=0 || rc=$?
BUILD_PID=
case $rc in
  0) record "binary build (parallel to the stages above)" "$(since "$BUILD_T0")" ok ;;
  124 | 137) record "binary build (parallel to the stages above)" "$(since "$BUILD_T0")" "TIMEOUT" ;;
  *) record "binary build (parallel to the stages above)" "$(since "$BUILD_T0")" "FAILED rc=$rc" ;;
esac
if [ $rc != 0 ]; then
  tail -40 "$LOGS/cargo-build.log"
  exit 1
fi
grep -E '^\s*(Finished|Compiling cinderblock)' "$LOGS/cargo-build.log" || true
cp "$(cb_bin)" "$CB_SHARE/bin/cinderblock.tmp" &&
  mv "$CB_SHARE/bin/cinderblock.tmp" "$CB_SHARE/bin/cinderblock"

# The agent on real LVM (issue 4), in the one-VM guest (or stor when only two VMs run).
AGENT_VM=one
case " $VMS " in *" one "*) ;; *) AGENT_VM=stor ;; esac
stage "scenario: LVM backend (lvm-backend.sh $AGENT_VM)" "$BUDGET_LVM" \
  "$CB_E2E/scenarios/lvm-backend.sh" "$AGENT_VM"
stage "scenario: agent on LVM + iSCSI (agent-lvm.sh $AGENT_VM)" "$BUDGET_AGENT" \
  "$CB_E2E/scenarios/agent-lvm.sh" "$AGENT_VM"

started=1
for name in $VMS; do
  # shellcheck disable=SC2016
  stage "start cinderblock all in $name" "$BUDGET_START" bash -c \
    'source "$1/lib.sh"; source "$1/topology.sh"; start_cinderblock "$2"' _ "$CB_E2E" "$name" ||
    started=0
done
[ $started = 1 ] || exit 1
print_endpoints

# shellcheck disable=SC1090
source "$CB_ENV"
# shellcheck disable=SC2016
FLAG=$(cb_profile_flag)
stage "cargo test${FLAG:+ $FLAG} --test e2e_vm -- --ignored" "$BUDGET_TESTS" \
  bash -c 'cd "$1" && cargo test $2 --test e2e_vm -- --ignored --test-threads=1' _ "$CB_REPO" "$FLAG"
exit
}
