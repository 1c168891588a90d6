#!/bin/bash
# The LVM pools (src/agent/lvm.rs) on a real LVM, in one guest:
#   1. the command sequences the backend relies on, run raw, each fact checked: tags in the
#      same lvcreate, thin snapshots not inheriting tags and activated with -kn, a thin clone
#      grown then marked complete in one lvchange, a thick origin with a snapshot growing only
#      while inactive, a thick snapshot keeping its size, the COW device cleared with dd while
#      the snapshot is active (blkdiscard cannot: it opens exclusively), a dd copy equal to the
#      snapshot, `lvremove --yes` of an origin taking its snapshots along;
#   2. the backend itself: the library's ignored tests `agent::lvm::tests::real_*` (thick and
#      thin lifecycles: create, snapshot, restore, clone, extend, tags, crash leftovers,
#      delete) run in the guest against a scratch VG. The test binary is the debug build of
#      the library tests (`make test` has usually built it already), built on the host (same
#      glibc) unless CB_LIB_TESTS names one.
# Usage: lvm-backend.sh VM
#   CAPTURE_FIXTURES=DIR  also regenerate tests/fixtures/lvm/ into DIR (on the host)
# Uses the scratch disk /dev/vdc and leaves the guest as it found it (scratch VG removed).
set -euo pipefail
source "$(dirname "$0")/../lib.sh"
source "$(dirname "$0")/steps.sh"
G=${1:?VM}
DISK=/dev/vdc # the scratch disk; /dev/vdb is the project's
VG=e2e-lvm
echo "== LVM backend on $G ($DISK)"

# ---- the test binary (built now, while nothing else needs the guest) -------------------
if [ -z "${CB_LIB_TESTS:-}" ]; then
  t=$(now)
  CB_LIB_TESTS=$(cd "$CB_REPO" && cargo test --lib --no-run --message-format=json 2>"$CB_RUN/lvm-lib-tests-build.log" |
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["lib"]:
        print(m["executable"])') || { tail -30 "$CB_RUN/lvm-lib-tests-build.log"; die "cannot build the library tests"; }
  log "library tests built in $(since "$t")s: $CB_LIB_TESTS"
fi
mkdir -p "$CB_SHARE/bin" "$CB_SHARE/lvm"
cp "$CB_LIB_TESTS" "$CB_SHARE/bin/cinderblock-lib-tests.tmp"
mv "$CB_SHARE/bin/cinderblock-lib-tests.tmp" "$CB_SHARE/bin/cinderblock-lib-tests"
cp "$CB_REPO/tests/fixtures/lvm/capture.sh" "$CB_SHARE/lvm/capture.sh"

cleanup() {
  "$VM" exec "$G" "vgremove -f $VG >/dev/null 2>&1; pvremove -q $DISK >/dev/null 2>&1; true" || true
}
trap cleanup EXIT

# Every snippet fails on the first failed command or check.
S='set -eu; fail() { echo "CHECK FAILED: $*" >&2; exit 1; }'

step "pvcreate, vgcreate, thin pool with zeroing" "$G" "$S
  pvcreate -q -y -ff $DISK && vgcreate -q $VG $DISK
  lvm lvcreate -q --yes --type thin-pool --size 512m --name pool0 $VG
  attr=\$(lvs --noheadings -o lv_attr $VG/pool0 | tr -d ' ')
  echo \"pool0 \$attr\"; [ \"\$(echo \$attr | cut -c8)\" = z ] || fail 'thin pool does not zero new blocks'"
show "$STEP_OUT"

step "thin volume, tags in the lvcreate" "$G" "$S
  lvm lvcreate --yes --type thin --virtualsize 67108864b --thinpool pool0 --name volume-t1 \
    --addtag cb.v=1 --addtag cb.type=gold --addtag cb.export=iqn.2025-01.io.cinderblock.e2e:x $VG >/dev/null
  dd if=/dev/urandom of=/dev/$VG/volume-t1 bs=1M count=8 oflag=direct status=none
  lvs --noheadings -o lv_tags $VG/volume-t1 | grep -qx ' *cb.export=iqn.2025-01.io.cinderblock.e2e:x,cb.type=gold,cb.v=1' ||
    fail \"tags: \$(lvs --noheadings -o lv_tags $VG/volume-t1)\""

step "thin snapshot: -kn activates it, tags not inherited" "$G" "$S
  lvm lvcreate --yes --snapshot --setactivationskip n --activate y --name _snapshot-s1 \
    --addtag cb.v=1 --addtag cb.snapof=t1 --addtag cb.size=67108864 $VG/volume-t1 >/dev/null
  lvm lvcreate --yes --snapshot --name plain $VG/volume-t1 >/dev/null
  [ -b /dev/$VG/_snapshot-s1 ] || fail 'the -kn snapshot is not active'
  [ ! -e /dev/$VG/plain ] || fail 'a default thin snapshot is active'
  [ -z \"\$(lvs --noheadings -o lv_tags $VG/plain | tr -d ' ')\" ] || fail 'a thin snapshot inherited tags'
  lvm lvremove -q --yes $VG/plain
  cmp /dev/$VG/volume-t1 /dev/$VG/_snapshot-s1 || fail 'snapshot differs from origin'"

step "thin clone: snapshot tagged creating, lvextend, one lvchange" "$G" "$S
  lvm lvcreate --yes --snapshot --setactivationskip n --activate y --name volume-t2 \
    --addtag cb.v=1 --addtag cb.src=snap:s1 --addtag cb.state=creating $VG/_snapshot-s1 >/dev/null
  lvm lvextend --size 134217728b $VG/volume-t2 >/dev/null
  a=\$(vgs --noheadings -o vg_seqno $VG); lvm lvchange --deltag cb.state=creating $VG/volume-t2 >/dev/null
  b=\$(vgs --noheadings -o vg_seqno $VG); [ \$((b - a)) = 1 ] || fail \"seqno \$a -> \$b\"
  [ \"\$(blockdev --getsize64 /dev/$VG/volume-t2)\" = 134217728 ] || fail 'not grown'
  cmp -n 67108864 /dev/$VG/_snapshot-s1 /dev/$VG/volume-t2 || fail 'clone differs'
  lvm lvremove -q --yes $VG/volume-t1 && cmp -n 67108864 /dev/$VG/_snapshot-s1 /dev/$VG/volume-t2 ||
    fail 'removing a thin origin changed its snapshots'
  a=\$(vgs --noheadings -o vg_seqno $VG)
  lvm lvchange --addtag cb.export=iqn.a --addtag cb.meta.k=v --deltag cb.src=snap:s1 $VG/volume-t2 >/dev/null
  b=\$(vgs --noheadings -o vg_seqno $VG); [ \$((b - a)) = 1 ] || fail \"several tag changes: seqno \$a -> \$b\"
  lvm lvremove -q --yes $VG/volume-t2 $VG/_snapshot-s1"

step "thick origin + snapshot: grows only while inactive" "$G" "$S
  lvm lvcreate --yes --zero y --wipesignatures y --size 67108864b --name volume-k1 --addtag cb.v=1 $VG >/dev/null
  dd if=/dev/urandom of=/dev/$VG/volume-k1 bs=1M count=64 oflag=direct status=none
  lvm lvcreate --yes --snapshot --size 71303168b --name _snapshot-k1 --addtag cb.v=1 $VG/volume-k1 >/dev/null
  dd if=/dev/$VG/volume-k1 of=/tmp/k1.before bs=1M status=none
  dd if=/dev/urandom of=/dev/$VG/volume-k1 bs=1M count=64 oflag=direct status=none
  lvs --noheadings -o lv_attr $VG/_snapshot-k1 | grep -q '^ *swi-a' || fail 'a full-size+ COW overflowed'
  out=\$(lvm lvextend --size 134217728b $VG/volume-k1 2>&1) && fail 'online extend of an origin worked'
  echo \"\$out\" | grep -q 'can be resized only while inactive' || fail \"unexpected: \$out\"
  lvm lvchange --activate n $VG/volume-k1 && lvm lvextend --size 134217728b $VG/volume-k1 >/dev/null &&
    lvm lvchange --activate y $VG/volume-k1
  [ \"\$(blockdev --getsize64 /dev/$VG/volume-k1)\" = 134217728 ] || fail 'origin not grown'
  [ \"\$(blockdev --getsize64 /dev/$VG/_snapshot-k1)\" = 67108864 ] || fail 'snapshot size changed'
  cmp /tmp/k1.before /dev/$VG/_snapshot-k1 || fail 'snapshot content changed'"

step "thick clone by dd, COW cleared with dd, lvremove" "$G" "$S
  lvm lvcreate --yes --zero y --wipesignatures y --size 67108864b --name volume-k2 --addtag cb.state=creating $VG >/dev/null
  dd if=/dev/$VG/_snapshot-k1 of=/dev/$VG/volume-k2 bs=1M iflag=direct,count_bytes oflag=direct conv=fsync status=none count=67108864
  cmp /tmp/k1.before /dev/$VG/volume-k2 || fail 'copy differs from the snapshot'
  cow=/dev/mapper/$(echo $VG | sed s/-/--/g)-_snapshot--k1-cow
  blkdiscard --zeroout \$cow 2>/dev/null && fail 'blkdiscard could open the COW device'
  size=\$(blockdev --getsize64 \$cow)
  dd if=/dev/zero of=\$cow bs=1M iflag=count_bytes oflag=direct conv=fsync status=none count=\$size
  cmp -n \$size /dev/zero \$cow || fail 'COW not zeroed'
  lvm lvremove -q --yes $VG/_snapshot-k1
  dd if=/dev/zero of=/dev/$VG/volume-k2 bs=1M iflag=count_bytes oflag=direct conv=fsync status=none count=67108864
  lvm lvremove -q --yes $VG/volume-k2"

step "lvremove --yes of an origin removes its snapshots" "$G" "$S
  lvm lvcreate -q --yes --snapshot --size 8m --name _snapshot-k2 $VG/volume-k1
  lvm lvremove -q --yes $VG/volume-k1
  ! lvs $VG/_snapshot-k2 >/dev/null 2>&1 || fail 'the snapshot survived'"

step "the backend, thick and thin (agent::lvm::tests::real_*)" "$G" "$S
  cd /tmp && rc=0 && CB_LVM_TEST_VG=$VG CB_LVM_TEST_THIN_POOL=pool0 \
    /mnt/host/bin/cinderblock-lib-tests --ignored --test-threads=1 agent::lvm::tests::real_ >/tmp/real.log 2>&1 || rc=\$?
  if [ \$rc != 0 ]; then cat /tmp/real.log; exit \$rc; fi
  grep -E '^test |^test result' /tmp/real.log
  [ -z \"\$(lvs --noheadings -o lv_name $VG | grep -v pool0)\" ] || fail \"LVs left: \$(lvs $VG)\""
show "$STEP_OUT"

if [ -n "${CAPTURE_FIXTURES:-}" ]; then
  rm -rf "$CB_SHARE/lvm/fixtures"
  step "capture tests/fixtures/lvm (capture.sh)" "$G" "$S
    vgremove -f $VG >/dev/null; pvremove -q $DISK
    sh /mnt/host/lvm/capture.sh $DISK /mnt/host/lvm/fixtures"
  mkdir -p "$CAPTURE_FIXTURES"
  cp "$CB_SHARE"/lvm/fixtures/* "$CAPTURE_FIXTURES"/
  show "fixtures in $CAPTURE_FIXTURES"
fi
echo "== LVM backend: ok ($(since "$SCENARIO_T0")s)"
