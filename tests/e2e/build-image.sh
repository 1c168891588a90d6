#!/bin/bash
# Build the guest image: Debian bookworm (minbase) with Debian's stock kernel, lvm2, tgt,
# open-iscsi, ..., as an ext4 image made with `mkfs.ext4 -d` (no loop device, no mount).
#
#   $CB_CACHE/debs/            debootstrap's deb cache (kept across recipe changes)
#   $CB_CACHE/rootfs-K1/       pristine debootstrap tree, K1 = hash(suite, package list)
#   $CB_CACHE/image-K2/        vmlinuz, initrd.img, rootfs.ext4, K2 = hash(K1, this file,
#                              guest/init); an unchanged recipe costs nothing
#
# Prints the image directory on stdout. FORCE=1 rebuilds the image (not the debootstrap).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
IMG_SIZE=${IMG_SIZE:-2G}
K1=$(rootfs_key)
ROOTFS=$CB_CACHE/rootfs-$K1
IMG=$(image_dir)
LOGS=$CB_CACHE/logs
mkdir -p "$CB_CACHE/debs" "$LOGS"

if [ "${FORCE:-0}" != 1 ] && [ -s "$IMG/rootfs.ext4" ] && [ -s "$IMG/initrd.img" ] && [ -s "$IMG/vmlinuz" ]; then
  log "image $IMG is up to date"
  echo "$IMG"
  exit 0
fi
command -v debootstrap >/dev/null || die "debootstrap missing: run tests/e2e/host-deps.sh vm"

# Never rm -rf through a live mount (an interrupted chroot step may have left /proc mounted).
umount_under() { findmnt -rn -o TARGET | grep "^$1/" | sort -r | while read -r m; do umount -l "$m"; done || true; }

# ---- 1. debootstrap (only when the package list changes) -----------------------------
if [ ! -e "$ROOTFS/.cinderblock-debootstrap-ok" ]; then
  MIRROR=${MIRROR:-$( (grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}'
    grep -h '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}') |
    grep -v -e security -e '^$' | head -1 || true)}
  [ -n "$MIRROR" ] || die "no Debian mirror in the apt sources"
  umount_under "$ROOTFS.tmp"
  rm -rf "$ROOTFS.tmp"
  log "debootstrap --variant=minbase $CB_SUITE (log: $LOGS/debootstrap.log)"
  t=$(now)
  debootstrap --variant=minbase --include="$CB_GUEST_PKGS" --cache-dir="$CB_CACHE/debs" \
    "$CB_SUITE" "$ROOTFS.tmp" "$MIRROR" >"$LOGS/debootstrap.log" 2>&1 ||
    { tail -30 "$LOGS/debootstrap.log" >&2; die "debootstrap failed"; }
  touch "$ROOTFS.tmp/.cinderblock-debootstrap-ok"
  rm -rf "$ROOTFS" && mv "$ROOTFS.tmp" "$ROOTFS"
  log "debootstrap done in $(since "$t")s ($(du -sh "$ROOTFS" | cut -f1))"
  # Older trees of other package lists are dead weight.
  for d in "$CB_CACHE"/rootfs-*; do [ "$d" = "$ROOTFS" ] || { umount_under "$d"; rm -rf "$d"; }; done
fi

# ---- 2. configure a copy of the tree ---------------------------------------------------
t=$(now)
W=$CB_CACHE/work-$$
trap 'umount_under "$W"; rm -rf "$W"' EXIT
cp -a "$ROOTFS" "$W"
echo cinderblock-e2e >"$W/etc/hostname"
printf '127.0.0.1 localhost\n' >"$W/etc/hosts"
echo '/dev/vda / ext4 rw,noatime 0 1' >"$W/etc/fstab"
chroot "$W" passwd -d root >/dev/null
# guest/init writes the initiator name per VM; iscsid is started by it, not by systemd.
sed -i 's/^iscsid.startup.*/iscsid.startup = \/bin\/true/' "$W/etc/iscsi/iscsid.conf"
# A small initramfs: only what mounting /dev/vda needs (quicker to unpack under TCG).
printf 'MODULES=list\nCOMPRESS=zstd\n' >"$W/etc/initramfs-tools/conf.d/cinderblock.conf"
printf 'virtio_pci\nvirtio_blk\next4\n' >"$W/etc/initramfs-tools/modules"
install -m 0755 "$CB_E2E/guest/init" "$W/sbin/cinderblock-e2e-init"
mkdir -p "$W/mnt/host"

KVER=$(ls "$W/lib/modules" | sort -V | tail -1)
mount -t proc proc "$W/proc"
chroot "$W" update-initramfs -u -k "$KVER" >"$LOGS/initramfs.log" 2>&1 ||
  { umount "$W/proc"; tail -20 "$LOGS/initramfs.log" >&2; die "update-initramfs failed"; }
umount "$W/proc"

# Slim down: docs, locales, apt caches, firmware and driver trees a virtio guest never loads.
rm -rf "$W"/usr/share/{doc,man,info,locale}/* "$W"/var/cache/apt/*.bin \
  "$W"/var/lib/apt/lists/* "$W"/var/cache/apt/archives/*.deb "$W"/lib/firmware
M=$W/lib/modules/$KVER/kernel
rm -rf "$M"/drivers/{gpu,media,net/wireless,net/ethernet,infiniband,staging,bluetooth,iio,input,hid,usb} \
  "$M"/drivers/{sound,video,isdn,mmc,platform} "$M"/sound "$M"/net/{wireless,mac80211,bluetooth}
chroot "$W" depmod "$KVER"

# ---- 3. the image ------------------------------------------------------------------------
rm -rf "$IMG.tmp" && mkdir -p "$IMG.tmp"
cp "$W/boot/vmlinuz-$KVER" "$IMG.tmp/vmlinuz"
cp "$W/boot/initrd.img-$KVER" "$IMG.tmp/initrd.img"
mkfs.ext4 -q -F -L cinderblock -E root_owner=0:0 -d "$W" "$IMG.tmp/rootfs.ext4" "$IMG_SIZE" \
  >"$LOGS/mkfs.log" 2>&1 || { cat "$LOGS/mkfs.log" >&2; die "mkfs.ext4 -d failed"; }
echo "kernel $KVER, packages $CB_GUEST_PKGS" >"$IMG.tmp/RECIPE"
rm -rf "$IMG" && mv "$IMG.tmp" "$IMG"
# Older images are dead weight, unless a running qemu still boots from one.
for d in "$CB_CACHE"/image-*; do
  [ "$d" = "$IMG" ] && continue
  grep -qa -- "$d/" /proc/[0-9]*/cmdline 2>/dev/null || rm -rf "$d"
done
log "image $IMG built in $(since "$t")s (kernel $KVER, $(du -h "$IMG/rootfs.ext4" | cut -f1) used)"
echo "$IMG"
