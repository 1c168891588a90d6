# Shared settings for the e2e harness. Sourced, never run.
#
# Everything the harness writes lives in two places:
#   $CB_CACHE  (~/.cache/cinderblock, or $CINDERBLOCK_CACHE): debs, unpacked qemu, images.
#              Keyed on the recipe's hash, so an unchanged recipe costs nothing.
#   $CB_RUN    (tests/e2e/.run, gitignored, or $CINDERBLOCK_E2E_RUN): per-boot state
#              (pids, overlays, console logs) and the 9p share the guests see at /mnt/host.

CB_E2E=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CB_REPO=$(cd "$CB_E2E/../.." && pwd)
CB_CACHE=${CINDERBLOCK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cinderblock}
CB_RUN=${CINDERBLOCK_E2E_RUN:-$CB_E2E/.run}
CB_SHARE=$CB_RUN/share
CB_SUITE=bookworm

# qemu 7.2 from bookworm, unpacked (see host-deps.sh for why it is not apt-installed).
CB_QEMU=$CB_CACHE/qemu
export QEMU_MODULE_DIR=$CB_QEMU/usr/lib/x86_64-linux-gnu/qemu

# The image recipe: these files and this package list decide the image's cache key.
CB_GUEST_PKGS=lvm2,thin-provisioning-tools,tgt,open-iscsi,e2fsprogs,xfsprogs,udev,kmod,iproute2,iputils-ping,procps,busybox,lsscsi,sg3-utils,util-linux,linux-image-amd64,initramfs-tools,zstd
# Bump to force a fresh debootstrap with the same package list.
CB_ROOTFS_REV=1

# The two-VM topology. The private L2 segment exists only inside qemu (a -netdev socket
# between the two qemu processes on 127.0.0.1); the host never routes these addresses.
CB_STOR_IP=192.168.77.1
CB_COMP_IP=192.168.77.2
CB_ONE_IP=127.0.0.1
# CSI port inside every guest; the host reaches it through hostfwd on 127.0.0.1.
CB_GUEST_CSI_PORT=10000
CB_GUEST_AGENT_PORT=9700 # the agent API in every guest (forwarded too)
# Metrics inside every guest (not forwarded: the tests read them through `vm exec`); the
# same numbers are in tests/e2e_vm.rs.
CB_GUEST_AGENT_METRICS_PORT=9701
CB_GUEST_CSI_METRICS_PORT=9702

# The build of `cinderblock` the guests run. `debug` by default: the build `make test` has
# just made, so `make e2e` after it compiles nothing (a cold release build of every crate
# takes 18 min of 2 cores here, and ran past 30 min in CI beside the booting guests). The
# benches and the VM demo set CB_PROFILE=release: they show what ships.
CB_PROFILE=${CB_PROFILE:-debug}
case $CB_PROFILE in debug | release) ;; *) echo "CB_PROFILE must be debug or release" >&2; exit 2 ;; esac
# The cargo flag of that profile, and the binary it builds.
cb_profile_flag() { if [ "$CB_PROFILE" = release ]; then echo --release; fi; }
cb_bin() { echo "${CARGO_TARGET_DIR:-$CB_REPO/target}/$CB_PROFILE/cinderblock"; }

rootfs_key() { printf '%s\n' "$CB_SUITE" "$CB_GUEST_PKGS" "$CB_ROOTFS_REV" | sha256sum | cut -c1-16; }
image_key() {
  { rootfs_key; cat "$CB_E2E/build-image.sh" "$CB_E2E/guest/init"; } | sha256sum | cut -c1-16
}
image_dir() { echo "$CB_CACHE/image-$(image_key)"; }

# Elapsed-time helpers (wall clock, 0.1 s resolution).
now() { date +%s.%N; }
since() { awk -v s="$1" -v e="$(now)" 'BEGIN { printf "%.1f", e - s }'; }
log() { echo "[e2e $(date +%H:%M:%S)] $*" >&2; }
die() { echo "[e2e] ERROR: $*" >&2; exit 1; }

# A free TCP port on 127.0.0.1 (the kernel picks it; racy only against other pickers).
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
