#!/bin/bash
# Install what the tests need on the host. Idempotent; a second run costs about a second.
#   host-deps.sh test   what `make test` needs: tgt, libiscsi-bin, xfsprogs, qemu-io/qemu-img with the
#                       iSCSI block driver (tests/host_tgt.rs)
#   host-deps.sh vm     what `make e2e` needs: debootstrap, firmware, qemu-system-x86_64
#   host-deps.sh        both
#
# qemu comes from bookworm's own debs, unpacked into $CB_CACHE/qemu (not apt-installed):
# this machine kind ships qemu-utils 10 from bookworm-backports, which `Breaks`
# qemu-system-common << 8.0, and backports is not in its apt sources, so neither
# `apt-get install qemu-system-x86` nor a matching qemu-block-extra 10 can be installed.
# The unpacked 7.2 tree is found through QEMU_MODULE_DIR (Debian builds TCG and the iSCSI
# block driver as modules); its shared libraries come from apt like any other package.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
MODE=${1:-all}
case $MODE in test | vm | all) ;; *) die "usage: host-deps.sh [test|vm|all]" ;; esac

test_pkgs=(tgt libiscsi-bin libiscsi7 python3 xfsprogs)
vm_pkgs=(debootstrap e2fsprogs seabios ipxe-qemu qemu-system-data python3 zstd)
qemu_debs=(qemu-system-x86 qemu-system-common qemu-block-extra qemu-utils)
want=()
[ "$MODE" != vm ] && want+=("${test_pkgs[@]}")
[ "$MODE" != test ] && want+=("${vm_pkgs[@]}")

missing() {  # the subset of "$@" that dpkg does not report as installed
  local p
  for p in "$@"; do
    dpkg-query -W -f '${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed' || echo "$p"
  done
}
apt_lists_fresh=0
apt_install() {
  [ $# -eq 0 ] && return 0
  if [ $apt_lists_fresh = 0 ] && [ -z "$(ls /var/lib/apt/lists/ 2>/dev/null | grep _Packages)" ]; then
    log "apt-get update"; apt-get update -q >/dev/null; apt_lists_fresh=1
  fi
  log "apt-get install $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null
}

mapfile -t need < <(missing "${want[@]}")
apt_install "${need[@]}"

# ---- qemu 7.2 from bookworm, unpacked -------------------------------------------------
if [ ! -x "$CB_QEMU/usr/bin/qemu-system-x86_64" ] || [ ! -x "$CB_QEMU/usr/bin/qemu-io" ]; then
  ver() { apt-cache madison qemu-system-x86 |
    awk -F'|' '$3 ~ /bookworm\/main/ && $3 !~ /security/ { gsub(/ /, "", $2); print $2; exit }'; }
  V=$(ver)
  if [ -z "$V" ]; then apt-get update -q >/dev/null; V=$(ver); fi
  [ -n "$V" ] || die "no bookworm qemu-system-x86 in the apt sources"
  dir=$CB_CACHE/qemu-${V//[:+~]/_}
  mkdir -p "$CB_CACHE/qemu-debs"
  (cd "$CB_CACHE/qemu-debs" && for p in "${qemu_debs[@]}"; do
    ls "${p}_"*.deb >/dev/null 2>&1 || apt-get download -q -o APT::Sandbox::User=root "$p=$V" >/dev/null
  done)
  rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
  for p in "${qemu_debs[@]}"; do dpkg -x "$CB_CACHE/qemu-debs/${p}_"*.deb "$dir.tmp"; done
  rm -rf "$dir" && mv "$dir.tmp" "$dir"
  ln -sfn "$(basename "$dir")" "$CB_QEMU"
  log "qemu $V unpacked into $dir"
fi

# The unpacked binaries' shared libraries: every Depends of the qemu debs that is not
# itself one of them (first alternative of each, version constraints dropped).
deps=$(for p in "${qemu_debs[@]}"; do dpkg-deb -f "$CB_CACHE/qemu-debs/${p}_"*.deb Depends; echo ,; done |
  tr ',' '\n' | sed -e 's/|.*//' -e 's/(.*)//' -e 's/:any//' -e 's/ //g' | grep -v -e '^$' -e '^qemu-' | sort -u)
# shellcheck disable=SC2086
mapfile -t need < <(missing $deps)
apt_install "${need[@]}"

# Prove the pieces load (a missing library shows up here, not as a confusing test failure).
"$CB_QEMU/usr/bin/qemu-io" --version >/dev/null || die "unpacked qemu-io does not run"
"$CB_QEMU/usr/bin/qemu-img" --help 2>/dev/null | grep -q -w iscsi ||
  die "the unpacked qemu-img has no iscsi driver (QEMU_MODULE_DIR=$QEMU_MODULE_DIR)"
if [ "$MODE" != test ]; then
  "$CB_QEMU/usr/bin/qemu-system-x86_64" -accel help 2>/dev/null | grep -q tcg ||
    die "the unpacked qemu-system-x86_64 has no TCG accelerator"
fi
log "host deps ($MODE) ready; qemu in $(readlink -f "$CB_QEMU")"
