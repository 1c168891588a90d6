#!/bin/bash
# The storage agent on real LVM, in one guest: `cinderblock agent` serving an lvm-thick pool
# (VG cinder-volumes on /dev/vdb) and an lvm-thin pool (VG cb-thin on /dev/vdc, thin pool
# pool0), driven through its gRPC API with `cinderblock agent-ctl`, read and written through
# the guest's kernel iSCSI initiator logged in to the guest's tgtd with the export's CHAP
# credentials. Checks, each failing the scenario:
#   1. per pool: create (size rounded up to the extent and reported exactly), export, write a
#      pattern through iSCSI and read it back, a wrong CHAP secret refused, delete while
#      exported refused, snapshot, clone from the snapshot (bytes equal), extend (thin: online,
#      the logged-in initiator sees the new size after a rescan; thick with a snapshot: refused
#      while exported, done once unexported, snapshot intact), delete with snapshots refused,
#      then everything deleted, a second delete fine, no LV and no target left;
#   2. backups on the thin pool (thin_delta): a full backup of a volume with 1 MiB written
#      reads only the 4 MiB chunk holding it (agent metric backup_unallocated); a volume
#      written whole, backed up, 1 MiB rewritten: the incremental reads only that chunk
#      (backup_unread) and restores onto a new volume byte for byte; the marker snapshot
#      hidden, the full backup undeletable while the incremental depends on it, nothing
#      left after the deletes;
#   3. wipe on delete: a thick volume over the extents of a deleted one reads zeros;
#   4. tgtd killed and restarted: the agent re-creates every export, data intact over iSCSI;
#   5. the agent SIGKILLed in the middle of 20 creates: after a restart every LV is tagged,
#      none is left half-made, and the agent lists exactly the LVs that exist.
# Usage: agent-lvm.sh VM. Leaves the guest as it found it (agent stopped, cb-thin removed).
set -euo pipefail
source "$(dirname "$0")/../lib.sh"
source "$(dirname "$0")/steps.sh"
G=${1:?VM}
echo "== storage agent on LVM in $G"

mkdir -p "$CB_SHARE/e2e"
cp "$CB_E2E/guest/agent-lib.sh" "$CB_SHARE/e2e/agent-lib.sh"
cat >"$CB_SHARE/e2e/agent-lvm.toml" <<'EOF'
name = "e2e-agent"
listen = "tcp://0.0.0.0:9700"
metrics_listen = "127.0.0.1:9701"
chap_key_file = "/etc/cinderblock/chap.key"
tgt = { portal = "127.0.0.1:3260" }

[[pools]]
name = "thick"
kind = "lvm-thick"
vg = "cinder-volumes"
zone = "z1"
volume_clear = "zero"
snapshot_cow_percent = 100
capabilities = { media = "hdd" }

[[pools]]
name = "thin"
kind = "lvm-thin"
vg = "cb-thin"
thin_pool = "pool0"
zone = "z1"
max_over_subscription_ratio = 10.0
capabilities = { media = "ssd" }

[[backup_repositories]]
name = "local"
kind = "posix"
path = "/var/lib/cb-e2e-backups"

[backup]
default_repository = "local"
EOF

cleanup() {
  "$VM" exec "$G" "source /mnt/host/e2e/agent-lib.sh; set +e; agent_stop
    for s in \$(iscsiadm -m node 2>/dev/null | awk '{print \$2}' | grep '^$IQN_PREFIX_HOST'); do
      iscsiadm -m node -T \$s --logout; iscsiadm -m node -T \$s -o delete; done
    lvremove -q -y cinder-volumes >/dev/null 2>&1; vgremove -q -f cb-thin >/dev/null 2>&1
    pvremove -q /dev/vdc >/dev/null 2>&1; true" >/dev/null 2>&1 || true
}
IQN_PREFIX_HOST=iqn.2026-01.dev.cinderblock:
trap cleanup EXIT

L='source /mnt/host/e2e/agent-lib.sh'

step "VGs, thin pool, CHAP key, agent started" "$G" "$L
  vgs cinder-volumes >/dev/null 2>&1 || { pvcreate -q /dev/vdb && vgcreate -q cinder-volumes /dev/vdb; }
  pvcreate -q -y -ff /dev/vdc && vgcreate -q cb-thin /dev/vdc
  lvm lvcreate -q --yes --type thin-pool --size 2g --name pool0 cb-thin
  mkdir -p /etc/cinderblock && head -c 32 /dev/urandom >/etc/cinderblock/chap.key
  agent_start
  ctl pools"
show "$STEP_OUT"

# cycle POOL VG: the volume lifecycle of issue 4 on one pool.
cycle() {
  local P=$1 VG=$2
  step "$P: create 62Mi -> 64Mi, export, delete while exported refused" "$G" "$L
    ctl -o json create $P-v1 --pool $P --size 62Mi | grep -q '\"size_bytes\": 67108864' || fail 'size not rounded to 64 MiB'
    export_to_me $P-v1
    expect_fail FailedPrecondition ctl delete $P-v1"
  show "$STEP_OUT"

  step "$P: iSCSI login with CHAP, write 8 MiB, read back" "$G" "$L
    export_to_me $P-v1
    dev=\$(login $P-v1)
    dd if=/dev/urandom of=/run/$P.pat bs=1M count=8 status=none
    dd if=/run/$P.pat of=\$dev bs=1M oflag=direct conv=fsync status=none
    [ \"\$(sha \$dev)\" = \"\$(sha256sum </run/$P.pat | cut -d' ' -f1)\" ] || fail 'read back differs'
    [ \"\$(blockdev --getsize64 \$dev)\" = 67108864 ] || fail 'LUN size'
    logout $P-v1
    [ \"\$(sha /dev/$VG/volume-$P-v1)\" = \"\$(sha256sum </run/$P.pat | cut -d' ' -f1)\" ] ||
      fail 'the LV does not hold what the initiator wrote'
    login $P-v1 wrong-secret-0123456789 >/dev/null 2>&1 && fail 'a wrong CHAP secret logged in'
    logout $P-v1
    echo 'pattern written and read through iSCSI; wrong secret refused'"
  show "$STEP_OUT"

  step "$P: snapshot, clone from it (bytes equal)" "$G" "$L
    ctl snapshot $P-v1 --id $P-s1 >/dev/null
    ctl create $P-c1 --pool $P --size 64Mi --from-snapshot $P-s1 >/dev/null
    [ \"\$(sha /dev/$VG/volume-$P-c1)\" = \"\$(sha256sum </run/$P.pat | cut -d' ' -f1)\" ] || fail 'clone differs'
    expect_fail FailedPrecondition ctl delete $P-v1"
  show "$STEP_OUT"

  if [ "$P" = thin ]; then
    step "thin: online extend to 128Mi, the logged-in initiator sees it" "$G" "$L
      export_to_me $P-v1
      dev=\$(login $P-v1)
      ctl -o json extend $P-v1 --size 128Mi | grep -q '\"size_bytes\": 134217728' || fail 'extend'
      iscsiadm -m session -R >/dev/null
      for _ in \$(seq 100); do [ \"\$(blockdev --getsize64 \$dev)\" = 134217728 ] && break; sleep 0.1; done
      [ \"\$(blockdev --getsize64 \$dev)\" = 134217728 ] || fail \"initiator sees \$(blockdev --getsize64 \$dev)\"
      [ \"\$(sha \$dev)\" = \"\$(sha256sum </run/$P.pat | cut -d' ' -f1)\" ] || fail 'data changed'
      logout $P-v1
      ctl unexport $P-v1 >/dev/null"
  else
    step "thick: extend with a snapshot refused while exported, done after" "$G" "$L
      expect_fail FailedPrecondition ctl extend $P-v1 --size 128Mi
      ctl unexport $P-v1 >/dev/null
      ctl -o json extend $P-v1 --size 128Mi | grep -q '\"size_bytes\": 134217728' || fail 'extend'
      [ \"\$(blockdev --getsize64 /dev/$VG/volume-$P-v1)\" = 134217728 ] || fail 'LV not grown'
      [ \"\$(sha /dev/$VG/_snapshot-$P-s1)\" = \"\$(sha256sum </run/$P.pat | cut -d' ' -f1)\" ] || fail 'snapshot changed'
      [ \"\$(sha /dev/$VG/volume-$P-v1)\" = \"\$(sha256sum </run/$P.pat | cut -d' ' -f1)\" ] || fail 'origin changed'"
  fi
  show "$STEP_OUT"

  step "$P: delete snapshot, clone, volume; again; nothing left" "$G" "$L
    ctl delete-snapshot $P-s1 >/dev/null && ctl delete $P-c1 >/dev/null && ctl delete $P-v1 >/dev/null
    ctl delete $P-v1 && ctl delete-snapshot $P-s1
    left=\$(lvs --noheadings -o lv_name $VG | grep -e volume- -e _snapshot- || true)
    [ -z \"\$left\" ] || fail \"LVs left: \$left\"
    [ \"\$(targets)\" = 0 ] || fail 'targets left'"
  show "$STEP_OUT"
}

cycle thick cinder-volumes
cycle thin cb-thin

# Backups on the thin pool, where the pool's metadata shows what to read: a full backup
# reads only the blocks the volume's snapshot maps, an incremental only those changed since
# the full backup's marker snapshot (thin_delta both times).
step "thin: a backup reads only mapped blocks; 1 MiB rewritten, the incremental reads only its chunk; restore equal" "$G" "$L
  ctl create b0 --pool thin --size 64Mi >/dev/null
  dd if=/dev/urandom of=/dev/cb-thin/volume-b0 bs=1M count=1 seek=9 oflag=direct status=none
  a0=\$(backup_bytes backup_unallocated)
  ctl backup-create b0 --id b0-full >/dev/null 2>&1
  a=\$(( \$(backup_bytes backup_unallocated) - a0 ))
  echo \"full backup, 1 MiB written: \$a of 67108864 bytes unmapped, not read\"
  [ \$a = 62914560 ] || fail \"expected 60 MiB not read (all but the chunk at 8 MiB): \$(grep 'backup complete' \$ALOG | tail -1)\"
  ctl backup-delete b0-full >/dev/null && ctl delete b0 >/dev/null

  ctl create b1 --pool thin --size 64Mi >/dev/null
  dd if=/dev/urandom of=/dev/cb-thin/volume-b1 bs=1M count=64 oflag=direct status=none
  ctl backup-create b1 --id b1-full >/dev/null 2>&1
  dd if=/dev/urandom of=/dev/cb-thin/volume-b1 bs=1M count=1 seek=21 oflag=direct conv=notrunc status=none
  u0=\$(backup_bytes backup_unread)
  ctl backup-create b1 --id b1-incr --incremental >/dev/null 2>&1
  u=\$(( \$(backup_bytes backup_unread) - u0 ))
  echo \"incremental, 1 MiB rewritten: \$u of 67108864 bytes unchanged, not read\"
  [ \$u = 62914560 ] || fail \"expected 60 MiB not read (all but the chunk at 20 MiB): \$(grep 'change tracking' \$ALOG | tail -2)\"
  [ \"\$(ctl -o json snapshots --volume b1 | tr -d ' \\n')\" = '[]' ] || fail 'the marker is listed'
  [ \"\$(lvs --noheadings -o lv_name cb-thin | grep -c _snapshot-)\" = 1 ] || fail 'expected one marker LV'
  ctl create b2 --pool thin --size 64Mi >/dev/null
  ctl backup-restore b1-incr --volume b2 >/dev/null 2>&1
  cmp /dev/cb-thin/volume-b1 /dev/cb-thin/volume-b2 || fail 'the restored volume differs'
  expect_fail FailedPrecondition ctl backup-delete b1-full
  ctl backup-delete b1-incr >/dev/null && ctl backup-delete b1-full >/dev/null
  ctl delete b1 >/dev/null && ctl delete b2 >/dev/null
  left=\$(lvs --noheadings -o lv_name cb-thin | grep -e volume- -e _snapshot- || true)
  [ -z \"\$left\" ] || fail \"LVs left: \$left\""
show "$STEP_OUT"

step "wipe on delete: a new thick volume over the same extents reads zeros" "$G" "$L
  ctl create w1 --pool thick --size 64Mi >/dev/null
  ext1=\$(lvs --noheadings -o seg_pe_ranges cinder-volumes/volume-w1 | tr -d ' ')
  dd if=/dev/urandom of=/dev/cinder-volumes/volume-w1 bs=1M count=64 oflag=direct status=none
  cmp -s -n 67108864 /dev/zero /dev/cinder-volumes/volume-w1 && fail 'nothing written'
  ctl delete w1 >/dev/null
  ctl create w2 --pool thick --size 64Mi >/dev/null
  ext2=\$(lvs --noheadings -o seg_pe_ranges cinder-volumes/volume-w2 | tr -d ' ')
  [ \"\$ext1\" = \"\$ext2\" ] || fail \"different extents: \$ext1 vs \$ext2\"
  cmp -n 67108864 /dev/zero /dev/cinder-volumes/volume-w2 || fail 'the new volume shows old data'
  ctl delete w2 >/dev/null
  echo \"extents \$ext1 reused, all 64 MiB read zero\""
show "$STEP_OUT"

step "tgtd killed and restarted: every export back, data intact" "$G" "$L
  for P in thick thin; do
    ctl create r-\$P --pool \$P --size 32Mi >/dev/null
    export_to_me r-\$P
    dev=\$(login r-\$P)
    dd if=/dev/urandom of=/run/r-\$P.pat bs=1M count=8 status=none
    dd if=/run/r-\$P.pat of=\$dev bs=1M oflag=direct conv=fsync status=none
    logout r-\$P
  done
  [ \"\$(targets)\" = 2 ] || fail \"\$(targets) targets before\"
  pkill -KILL -x tgtd; for _ in \$(seq 50); do pgrep -x tgtd >/dev/null || break; sleep 0.1; done
  setsid tgtd -f >>/run/tgtd.log 2>&1 </dev/null &
  for _ in \$(seq 100); do tgtadm --lld iscsi --op show --mode sys >/dev/null 2>&1 && break; sleep 0.1; done
  [ \"\$(targets)\" = 0 ] || fail 'the new tgtd remembers targets'
  t0=\$(date +%s)
  for _ in \$(seq 600); do [ \"\$(targets)\" = 2 ] && break; sleep 0.1; done
  [ \"\$(targets)\" = 2 ] || fail \"only \$(targets) targets 60 s after the restart\"
  echo \"exports back \$((\$(date +%s) - t0)) s after the tgtd restart\"
  for P in thick thin; do
    export_to_me r-\$P
    dev=\$(login r-\$P)
    [ \"\$(sha \$dev)\" = \"\$(sha256sum </run/r-\$P.pat | cut -d' ' -f1)\" ] || fail \"r-\$P data differs\"
    logout r-\$P
    ctl unexport r-\$P >/dev/null && ctl delete r-\$P >/dev/null
  done
  echo 'both volumes read back through the restored targets'"
show "$STEP_OUT"

step "agent SIGKILLed amid 20 creates: every LV tagged and accounted" "$G" "$L
  for i in \$(seq 1 20); do
    P=thick; [ \$((i % 2)) = 0 ] && P=thin
    ctl create crash-\$i --pool \$P --size 32Mi >/run/crash-\$i.log 2>&1 &
  done
  # Kill as soon as the first LVs exist (their device links: no LVM command in the loop,
  # which would wait for the VG lock the creates hold).
  for _ in \$(seq 1200); do
    n=\$(ls /dev/cinder-volumes /dev/cb-thin 2>/dev/null | grep -c volume-crash- || true)
    [ \$n -ge 2 ] && break; sleep 0.05
  done
  agent_stop KILL
  wait || true
  ok=\$(grep -l '^crash-' /run/crash-*.log 2>/dev/null | wc -l)
  echo \"agent killed with \$n LVs made; \$ok creates had answered\"
  agent_start
  bad=\$(lvs --noheadings --separator ' ' -o lv_name,lv_tags cinder-volumes cb-thin |
    awk '\$1 != \"pool0\" && \$2 !~ /cb.v=1/ { print \$1 }')
  [ -z \"\$bad\" ] || fail \"untagged LVs: \$bad\"
  half=\$(lvs --noheadings --separator ' ' -o lv_name,lv_tags cinder-volumes cb-thin | grep cb.state=creating || true)
  [ -z \"\$half\" ] || fail \"half-made LVs after restart: \$half\"
  lvs_ids=\$(lvs --noheadings -o lv_name cinder-volumes cb-thin | tr -d ' ' | sed -n 's/^volume-//p' | sort)
  agent_ids=\$(ctl volumes | awk 'NR > 1 { print \$1 }' | sort)
  [ \"\$lvs_ids\" = \"\$agent_ids\" ] || fail \"LVs: [\$lvs_ids] agent: [\$agent_ids]\"
  for f in /run/crash-*.log; do
    id=\$(basename \$f .log)
    if grep -q \"^\$id \" \$f; then echo \"\$agent_ids\" | grep -qx \$id || fail \"\$id answered but is gone\"; fi
  done
  echo \"after restart: \$(echo \$lvs_ids | wc -w) volumes, all tagged, all listed by the agent\"
  for id in \$agent_ids; do ctl delete \$id >/dev/null; done
  [ -z \"\$(lvs --noheadings -o lv_name cinder-volumes cb-thin | grep volume-)\" ] || fail 'left over'"
show "$STEP_OUT"

step "agent stopped with SIGTERM" "$G" "$L
  agent_stop TERM
  ! listening 9700 || fail 'still listening'"
echo "== storage agent on LVM: ok ($(since "$SCENARIO_T0")s)"
