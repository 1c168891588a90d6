#!/bin/bash
# Runs INSIDE a guest: stop the running `cinderblock` (SIGTERM, or SIGKILL with --kill, the
# way a crashed or upgraded pod goes away) and start it again with the arguments
# start-cinderblock.sh saved. Mounts, sessions and exports are left as the process left them.
#   restart-cinderblock.sh [--kill] [--no-start]
set -euo pipefail
sig=TERM start=1
for a in "$@"; do
  case $a in
    --kill) sig=KILL ;;
    --no-start) start=0 ;;
    *) echo "usage: restart-cinderblock.sh [--kill] [--no-start]" >&2; exit 2 ;;
  esac
done
if [ -f /run/cinderblock.pid ]; then
  pid=$(cat /run/cinderblock.pid)
  if kill -"$sig" "$pid" 2>/dev/null; then
    for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then echo "cinderblock pid $pid did not stop" >&2; exit 1; fi
  fi
  rm -f /run/cinderblock.pid
fi
[ "$start" = 1 ] || exit 0
mapfile -t args </run/cinderblock.args
exec bash "$(dirname "$0")/start-cinderblock.sh" "${args[@]}"
