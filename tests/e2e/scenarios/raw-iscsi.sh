#!/bin/bash
# The Cinder LVM/tgt data path with raw commands, no project code:
#   STOR: VG on the scratch disk, LV, tgt target + LUN, ACL = COMP's initiator name
#   COMP: discovery, login, wait for /dev/disk/by-path (polled), mkfs.ext4, mount, write a
#         file, sha256, umount, logout; a foreign initiator name is refused
#   STOR: mount the LV read-only, the same sha256
# Usage: raw-iscsi.sh STOR COMP PORTAL_IP   (two VMs: stor comp 192.168.77.1;
#                                             one VM:  one one 127.0.0.1)
# Leaves both guests as it found them (target, LV, VG, node records removed).
set -euo pipefail
source "$(dirname "$0")/../lib.sh"
source "$(dirname "$0")/steps.sh"
STOR=${1:?STOR} COMP=${2:?COMP} PORTAL=${3:?PORTAL_IP}:3260
DISK=/dev/vdc # the scratch disk; /dev/vdb is the project's
VG=e2e-raw LV=volume-raw
IQN=iqn.2010-10.org.openstack:$LV
TID=100
BYPATH=/dev/disk/by-path/ip-$PORTAL-iscsi-$IQN-lun-1
echo "== raw iSCSI: LVM+tgt on $STOR, open-iscsi on $COMP, portal $PORTAL"

step "read the initiator name" "$COMP" 'sed -n "s/^InitiatorName=//p" /etc/iscsi/initiatorname.iscsi'
INITIATOR=$STEP_OUT
show "$INITIATOR"
if [ "$STOR" != "$COMP" ]; then
  step "ping ${PORTAL%:*} over the private L2" "$COMP" "ping -c1 -W5 ${PORTAL%:*} >/dev/null"
fi
step "pvcreate, vgcreate, lvcreate -L 1G" "$STOR" \
  "pvcreate -q $DISK && vgcreate -q $VG $DISK && lvcreate -q -y -L 1G -n $LV $VG"
step "tgtadm: target, LUN 1 = the LV, bind initiator name" "$STOR" "
  tgtadm --lld iscsi --op new --mode target --tid $TID -T $IQN &&
  tgtadm --lld iscsi --op new --mode logicalunit --tid $TID --lun 1 -b /dev/$VG/$LV &&
  tgtadm --lld iscsi --op bind --mode target --tid $TID --initiator-name $INITIATOR &&
  tgtadm --lld iscsi --op show --mode target | sed -n '/ACL information/,\$p' | tail -n +2"
show "ACL: $(echo $STEP_OUT)"
step "iscsiadm discovery (sendtargets)" "$COMP" "iscsiadm -m discovery -t st -p $PORTAL"
show "$STEP_OUT"
[ "$STEP_OUT" = "$PORTAL,1 $IQN" ] || { show "expected '$PORTAL,1 $IQN'"; exit 1; }
step "iscsiadm login" "$COMP" "iscsiadm -m node -T $IQN -p $PORTAL --login >/dev/null"
step "poll $BYPATH" "$COMP" "
  for i in \$(seq 300); do [ -b $BYPATH ] && break; sleep 0.1; done
  [ -b $BYPATH ] && echo \"\$(readlink -f $BYPATH) \$(blockdev --getsize64 $BYPATH) bytes after \$((i-1)) polls\""
show "$STEP_OUT"
step "mkfs.ext4 over iSCSI" "$COMP" "mkfs.ext4 -q -F $BYPATH"
step "mount, write 16 MiB, sha256, sync" "$COMP" "
  mkdir -p /mnt/raw && mount $BYPATH /mnt/raw &&
  head -c 16M /dev/urandom >/mnt/raw/payload && sync && sha256sum </mnt/raw/payload"
SUM=$STEP_OUT
show "sha256 $SUM"
step "umount, logout, delete the node record" "$COMP" "
  umount /mnt/raw && iscsiadm -m node -T $IQN -p $PORTAL --logout >/dev/null &&
  iscsiadm -m node -T $IQN -p $PORTAL -o delete && ! [ -e $BYPATH ]"
step "a foreign initiator name is refused" "$COMP" "
  iscsiadm -m iface -I stranger -o new >/dev/null &&
  iscsiadm -m iface -I stranger -o update -n iface.initiatorname -v iqn.2025-01.io.cinderblock.e2e:stranger >/dev/null
  out=\$(iscsiadm -m discovery -t st -p $PORTAL -I stranger 2>&1); rc=\$?
  iscsiadm -m node -o delete -I stranger >/dev/null 2>&1; iscsiadm -m iface -I stranger -o delete >/dev/null
  echo \"discovery rc=\$rc: \$out\"; ! grep -q $IQN <<<\"\$out\""
show "$STEP_OUT"
step "mount the LV read-only, sha256" "$STOR" "
  mkdir -p /mnt/chk && mount -o ro /dev/$VG/$LV /mnt/chk && sha256sum </mnt/chk/payload; rc=\$?; umount /mnt/chk; exit \$rc"
show "sha256 $STEP_OUT"
[ "$STEP_OUT" = "$SUM" ] || { show "MISMATCH: wrote $SUM"; exit 1; }
step "clean up: target, LV, VG, PV" "$STOR" "
  tgtadm --lld iscsi --op delete --force --mode target --tid $TID &&
  lvremove -q -y $VG/$LV && vgremove -q -y $VG && pvremove -q -y $DISK && wipefs -q -a $DISK"
echo "== raw iSCSI ($STOR -> $COMP): same bytes on both sides, $(since "$SCENARIO_T0")s"
