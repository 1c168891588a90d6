# shellcheck shell=bash disable=SC2034
# Shared settings for the Kubernetes test bed (tests/kube/). Sourced, never run.
#
# Everything built or downloaded lives under $CB_CACHE (~/.cache/cinderblock, or
# $CINDERBLOCK_CACHE), keyed on a version or a recipe hash, so a second run reuses it.

CB_KUBE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CB_REPO=$(cd "$CB_KUBE/../.." && pwd)
CB_CACHE=${CINDERBLOCK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cinderblock}

# The Kubernetes release the test bed runs: the one whose complete source Debian bookworm
# ships (source package `kubernetes`, vendor/ included).
KUBE_VERSION=v1.20.2
KUBE_BIN=$CB_CACHE/kube-$KUBE_VERSION

kube_log() { echo "[kube $(date +%H:%M:%S)] $*" >&2; }
kube_die() { echo "[kube] ERROR: $*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v s="$1" -v e="$(now)" 'BEGIN { printf "%.1f", e - s }'; }

# A free TCP port on 127.0.0.1 (the kernel picks it; racy only against other pickers).
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# apt packages: install the ones dpkg does not report as installed.
kube_missing() {
  local p
  for p in "$@"; do
    dpkg-query -W -f '${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed' || echo "$p"
  done
}
kube_apt_install() {
  local need
  mapfile -t need < <(kube_missing "$@")
  [ ${#need[@]} -eq 0 ] && return 0
  if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
    kube_log "apt-get update"; apt-get update -q >/dev/null
  fi
  kube_log "apt-get install ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
}
