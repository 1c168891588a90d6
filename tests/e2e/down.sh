#!/bin/bash
# `make e2e-down`: stop the guests that up.sh/run.sh started (qemu by the PID it wrote, after
# a QMP quit), then show that nothing is left: no qemu of theirs, no loop device or mount over
# files of the run dir or cache (the harness uses none: images are made with mkfs.ext4 -d,
# guests' disks are qcow2 files), and which tgtd processes run on the host (the harness
# starts none; tgtd runs inside the guests). Exits non-zero if one of ours is left.
#   down.sh [VM...]   (default: the VMs listed in tests/e2e/.run/env, else all of the run dir)
set -uo pipefail
source "$(dirname "$0")/lib.sh"
if [ $# -eq 0 ] && [ -f "$CB_RUN/env" ]; then
  # shellcheck disable=SC1091
  set -- $(source "$CB_RUN/env" && echo "$CINDERBLOCK_E2E_VMS")
fi
[ $# -eq 0 ] && set -- $(ls "$CB_RUN/vms" 2>/dev/null)
"$CB_E2E/vm" stop "$@"
left=0
echo "--- ps: qemu of $*"
pat=$(printf -- '-e %s/vms/%s/ ' "$CB_RUN" "$@")
# shellcheck disable=SC2086
if [ $# -gt 0 ] && ps -eo pid,args | grep -v grep | grep $pat; then left=1; else echo "(none)"; fi
echo "--- ps: tgtd on the host (none is the harness's)"
ps -eo pid,args | grep -v grep | grep -w tgtd || echo "(none)"
echo "--- losetup -a: loop devices over files of the run dir or cache"
if losetup -a | grep -e "$CB_RUN" -e "$CB_CACHE"; then left=1; else echo "(none)"; fi
echo "--- findmnt: mounts under the run dir or cache"
if findmnt -rn -o TARGET,SOURCE | grep -e "^$CB_RUN" -e "^$CB_CACHE"; then left=1; else echo "(none)"; fi
[ $left = 0 ] && echo "e2e down: nothing left" || echo "e2e down: something is left (above)"
exit $left
