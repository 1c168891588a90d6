#!/bin/bash
# `make e2e-up`: build the binary (CB_PROFILE, see lib.sh) and the image, boot a topology
# (default: the two-VM one), start `cinderblock all` in every guest, and print how to reach them. Leaves the VMs
# running; `tests/e2e/down.sh` (`make e2e-down`) stops them.
#   up.sh [two|one|all]
set -euo pipefail
source "$(dirname "$0")/lib.sh"
source "$CB_E2E/topology.sh"
TOPO=${1:-two}
VMS=$(topo_vms "$TOPO")
t=$(now)

"$CB_E2E/host-deps.sh" vm
log "cargo build $(cb_profile_flag) ($CB_PROFILE)"
# As run.sh: the binary and the test together, one feature set.
# shellcheck disable=SC2046
(cd "$CB_REPO" && cargo build $(cb_profile_flag) --bin cinderblock --test e2e_vm)
"$CB_E2E/build-image.sh" >/dev/null
# shellcheck disable=SC2086
topo_boot $VMS
for name in $VMS; do start_cinderblock "$name"; done
echo
echo "e2e topology '$TOPO' up in $(since "$t")s: $VMS"
print_endpoints
echo "Stop everything:           tests/e2e/down.sh"
