#!/bin/bash
# Runs INSIDE a guest (the share is /mnt/host): start the project's binary in the background
# the way a node's init system would, and return once its CSI endpoint listens.
#   start-cinderblock.sh [ARGS...]   e.g. start-cinderblock.sh all --endpoint tcp://0.0.0.0:10000
# Before starting: the operator's part of a Cinder LVM node, the VG `cinder-volumes` on
# /dev/vdb (the data disk) with a 1 GiB thin pool pool0, and /etc/cinderblock/chap.key. Log: /mnt/host/logs/$(hostname)/cinderblock.log (on the host:
# tests/e2e/.run/share/logs/NAME/cinderblock.log). PID: /run/cinderblock.pid.
# Waits up to START_TIMEOUT (180 s) for the TCP port of the --endpoint argument.
set -euo pipefail
BIN=/mnt/host/bin/cinderblock
LOG=/mnt/host/logs/$(hostname)/cinderblock.log
VG=${CINDERBLOCK_E2E_VG:-cinder-volumes}
[ -x "$BIN" ] || { echo "no $BIN: build it (tests/e2e/up.sh does) and restart the VM" >&2; exit 1; }

if ! vgs "$VG" >/dev/null 2>&1; then
  pvcreate -q /dev/vdb && vgcreate -q "$VG" /dev/vdb
fi
# A thin pool beside the thick volumes (the generated config's "thin" pool), and the
# node-local CHAP master key.
if ! lvs "$VG/pool0" >/dev/null 2>&1; then
  lvm lvcreate -q --yes --type thin-pool --size 1g --name pool0 "$VG" >/dev/null
fi
if [ ! -s /etc/cinderblock/chap.key ]; then
  mkdir -p /etc/cinderblock && head -c 32 /dev/urandom >/etc/cinderblock/chap.key
fi
if [ -f /run/cinderblock.pid ] && kill -0 "$(cat /run/cinderblock.pid)" 2>/dev/null; then
  echo "cinderblock already running, pid $(cat /run/cinderblock.pid)"
  exit 0
fi

port=
prev=
for a in "$@"; do
  case $prev$a in
    --endpointtcp://* | --endpoint=tcp://*) port=${a##*:} ;;
  esac
  prev=$a
done

mkdir -p "$(dirname "$LOG")"
# The arguments, one per line, for restart-cinderblock.sh.
printf '%s\n' "$@" >/run/cinderblock.args
echo "=== $(date -u +%FT%TZ) $BIN $*" >>"$LOG"
NO_COLOR=1 setsid "$BIN" "$@" >>"$LOG" 2>&1 </dev/null &
pid=$!
echo "$pid" >/run/cinderblock.pid

listening() {  # is TCP port $1 in LISTEN state (any address)?
  awk -v p="$(printf ':%04X' "$1")" 'NR > 1 && $4 == "0A" && substr($2, length($2) - 4) == p { f = 1 }
                                     END { exit !f }' /proc/net/tcp /proc/net/tcp6
}
end=$(($(date +%s) + ${START_TIMEOUT:-180}))
while :; do
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "cinderblock exited at start; its log:" >&2
    tail -30 "$LOG" >&2
    exit 1
  fi
  if [ -z "$port" ] || listening "$port"; then break; fi
  if [ "$(date +%s)" -ge $end ]; then
    echo "cinderblock (pid $pid) does not listen on :$port after ${START_TIMEOUT:-180}s; its log:" >&2
    tail -30 "$LOG" >&2
    exit 1
  fi
  sleep 0.2
done
echo "cinderblock pid $pid${port:+ listening on :$port}, log $LOG"
