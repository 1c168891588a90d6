#!/usr/bin/env bash
# make demo: a single-host Cinderblock walking a volume through its life.
#   scripts/demo.sh host   (default) `cinderblock all` with a file pool behind a private real
#                          tgtd on this host; data goes over iSCSI through a userspace initiator
#   scripts/demo.sh vm     the same walk inside a test VM: LVM pools, kernel iSCSI initiator
# Everything it starts is stopped on exit, success or not.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-host}
case $MODE in
  host) ;;
  vm) exec bash tests/e2e/demo-vm.sh ;;
  *) echo "usage: make demo [DEMO=host|vm]" >&2; exit 2 ;;
esac

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

say "installing what the demo needs (tgt, a userspace iSCSI initiator) and building cinderblock"
bash tests/e2e/host-deps.sh test
cargo build --release --quiet
CB=$PWD/target/release/cinderblock
source tests/e2e/lib.sh   # CB_QEMU (qemu-io with its iSCSI driver), free_port

W=$(mktemp -d /tmp/cinderblock-demo.XXXXXX)
CTL=$(( 20000 + RANDOM % 12000 ))  # tgtadm accepts -C 0..32767
PORT=$(free_port)
TGTD_PID= CB_PID=
cleanup() {
  set +e
  [ -n "$CB_PID" ] && kill -TERM "$CB_PID" 2>/dev/null && wait "$CB_PID" 2>/dev/null
  if [ -n "$TGTD_PID" ]; then
    for tid in $(tgtadm -C "$CTL" --lld iscsi --op show --mode target 2>/dev/null | sed -n 's/^Target \([0-9]*\):.*/\1/p'); do
      tgtadm -C "$CTL" --lld iscsi --op delete --force --mode target --tid "$tid"
    done
    tgtadm -C "$CTL" --op delete --mode system 2>/dev/null
    for _ in $(seq 50); do kill -0 "$TGTD_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$TGTD_PID" 2>/dev/null
  fi
  mountpoint -q "$W/pool" && umount "$W/pool"
  rm -rf "$W"
}
trap cleanup EXIT

# The file pool goes on XFS (a loop device over a sparse file) where this machine can make
# one: snapshots are then reflinks, and incremental backups read only what changed.
mkdir -p "$W/pool"
if truncate -s 2G "$W/pool.xfs" && mkfs.xfs -q -m reflink=1 "$W/pool.xfs" 2>/dev/null &&
  mount -o loop "$W/pool.xfs" "$W/pool" 2>/dev/null; then
  say "the file pool is on XFS (loop device): change tracking on"
else
  rm -f "$W/pool.xfs"
  say "the file pool is a plain directory (no XFS here): incrementals compare every block"
fi
MPORT=$(free_port)
metrics() {  # the agent's metrics endpoint, lines matching $1
  exec 3<>"/dev/tcp/127.0.0.1/$MPORT"
  printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3
  grep "$1" <&3 | sed 's/^/    /'
  exec 3<&-
}

say "starting a private tgtd (control port $CTL, portal 127.0.0.1:$PORT)"
tgtd -f -C "$CTL" --iscsi portal=127.0.0.1:$PORT >"$W/tgtd.log" 2>&1 &
TGTD_PID=$!
for _ in $(seq 100); do tgtadm -C "$CTL" --op show --mode sys >/dev/null 2>&1 && break; sleep 0.1; done

head -c 32 /dev/urandom >"$W/chap.key"
cat >"$W/all.toml" <<EOF
endpoint = "unix://$W/csi.sock"

[agent]
name = "demo-host"
listen = "unix://$W/agent.sock"
chap_key_file = "$W/chap.key"
tgt = { control_port = $CTL, portal = "127.0.0.1:$PORT" }
metrics_listen = "127.0.0.1:$MPORT"

[agent.backup]
chunk_size = 1048576

[[agent.backup_repositories]]
name = "demo-repo"
kind = "posix"
path = "$W/backups"

[[agent.pools]]
name = "files"
kind = "file"
path = "$W/pool"
capacity_bytes = 10737418240
zone = "nova"
capabilities = { media = "demo" }

[controller]
default_volume_type = "default"
stats_interval_secs = 2

[controller.volume_types.default]
description = "any pool"

[controller.volume_types.demo-media]
description = "only pools with media=demo"
extra_specs = { media = "demo" }

[node]
zone = "nova"
EOF
say "starting cinderblock all (controller + agent; this host has no kernel iSCSI initiator, so no node service)"
cat "$W/all.toml"
"$CB" all --config "$W/all.toml" --without-node >"$W/cinderblock.log" 2>&1 &
CB_PID=$!

say "CSI Identity answers, and Probe is ready once the agent and tgtd are"
run "$CB" identity --endpoint "unix://$W/csi.sock" --wait 30
A=(--agent "unix://$W/agent.sock")

say "the pool, as Cinder's get-pools shows it"
run "$CB" agent-ctl "${A[@]}" pools

VOL=demo-0001 SNAP=demo-0001-snap CLONE=demo-0002
INIT=iqn.2026-01.dev.cinderblock:demo-initiator
say "create a 64 MiB volume"
run "$CB" agent-ctl "${A[@]}" create "$VOL" --pool files --size 64Mi

say "export it to initiator $INIT (one target per volume, ACL by initiator name, CHAP)"
run "$CB" agent-ctl "${A[@]}" export "$VOL" --initiator "$INIT" --secret-file "$W/secret"
IQN=iqn.2026-01.dev.cinderblock:volume-$VOL
USER=$("$CB" agent-ctl "${A[@]}" -o json export "$VOL" --initiator "$INIT" | sed -n 's/.*"chap_username": "\(.*\)".*/\1/p')
run tgtadm -C "$CTL" --lld iscsi --op show --mode target | grep -E 'Target|Backing store path|ACL|Account|^        [a-z]' | sed 's/^/    /'

qio() {  # qemu-io over iSCSI as $INIT with the volume's CHAP credentials
  local iqn=$1 user=$2 secret=$3; shift 3
  "$CB_QEMU/usr/bin/qemu-io" --object "secret,id=chap,file=$secret" --image-opts \
    "driver=iscsi,transport=tcp,portal=127.0.0.1:$PORT,target=$iqn,lun=1,initiator-name=$INIT,user=$user,password-secret=chap" "$@"
}
say "write a pattern over iSCSI with CHAP (qemu-io, a userspace initiator) and read it back"
run qio "$IQN" "$USER" "$W/secret" -c 'write -P 0x5a 0 4M' -c 'read -P 0x5a 0 4M'
say "a wrong CHAP secret is refused by the target"
echo -n wrong-secret-000000000 >"$W/bad"
if qio "$IQN" "$USER" "$W/bad" -c 'read 0 512' >"$W/bad.log" 2>&1; then
  echo "UNEXPECTED: a wrong secret was accepted"; exit 1
else
  echo "    refused: $(grep -m1 -io 'failed.*\|error.*' "$W/bad.log" | head -c 120)"
fi

say "snapshot it, then create a clone from the snapshot"
run "$CB" agent-ctl "${A[@]}" snapshot "$VOL" --id "$SNAP"
run "$CB" agent-ctl "${A[@]}" create "$CLONE" --pool files --size 128Mi --from-snapshot "$SNAP"
run "$CB" agent-ctl "${A[@]}" export "$CLONE" --initiator "$INIT" --secret-file "$W/secret2"
USER2=$("$CB" agent-ctl "${A[@]}" -o json export "$CLONE" --initiator "$INIT" | sed -n 's/.*"chap_username": "\(.*\)".*/\1/p')
say "the clone carries the snapshot's bytes (read over iSCSI)"
run qio "iqn.2026-01.dev.cinderblock:volume-$CLONE" "$USER2" "$W/secret2" -c 'read -P 0x5a 0 4M' -c 'read -P 0 4M 60M'

say "extend the exported volume online: 64 MiB -> 256 MiB, the target shows the new size"
run "$CB" agent-ctl "${A[@]}" extend "$VOL" --size 256Mi
tgtadm -C "$CTL" --lld iscsi --op show --mode target | grep -A40 "volume-$VOL" | grep -m2 'Size:' | sed 's/^/    /'

say "Cinder's rules: a volume with snapshots, or exported, cannot be deleted"
"$CB" agent-ctl "${A[@]}" delete "$VOL" && { echo "UNEXPECTED: deleted"; exit 1; } || true

say "volumes and snapshots now, as the agent holds them"
run "$CB" agent-ctl "${A[@]}" volumes
run "$CB" agent-ctl "${A[@]}" snapshots

say "the same through the controller's operator API (Cinder's list, snapshot-list, get-pools, type-list)"
export CINDERBLOCK_CONTROLLER="unix://$W/csi.sock"
run "$CB" volume list
run "$CB" volume show "$VOL"
run "$CB" snapshot list
run "$CB" pool list
run "$CB" type list

say "backups through the controller (Cinder's backup-create / backup-list / backup-restore)"
BVOL=demo-0003
run "$CB" agent-ctl "${A[@]}" create "$BVOL" --pool files --size 64Mi
IMG=$W/pool/volume-$BVOL.img
dd if=/dev/urandom of="$IMG" bs=1M count=8 conv=notrunc status=none
run "$CB" backup create "$BVOL" --repository demo-repo
FULL=$("$CB" backup list --volume "$BVOL" -o json | grep -o '"id": *"backup-[^"]*"' | tail -1 | sed 's/.*"\(backup-[^"]*\)"/\1/')
say "change 1 MiB, then an incremental backup stores only the changed chunk (and on XFS reads only it)"
dd if=/dev/urandom of="$IMG" bs=1M count=1 seek=4 conv=notrunc,fsync status=none
WANT=$(sha256sum <"$IMG" | cut -d' ' -f1)
if mountpoint -q "$W/pool"; then
  echo "    the full backup's marker alone still holds the 1 MiB the volume rewrote: the pool"
  echo "    counts it in its allocated bytes, each shared block once, and shows it apart:"
  "$CB" agent-ctl "${A[@]}" pools >/dev/null # a fresh pool report for the gauges
  metrics 'pool_\(allocated\|tracking\)_bytes{'
fi
run "$CB" backup create "$BVOL" --incremental
echo "    volume bytes read by backups, taken unread from the parent (change tracking), and"
echo "    left unread as holes the pool showed unallocated:"
metrics 'backup_bytes_total{kind="backup_\(read\|unread\|unallocated\)"}'
INC=$("$CB" backup list --volume "$BVOL" -o json | grep -o '"id": *"backup-[^"]*"' | grep -v "$FULL" | tail -1 | sed 's/.*"\(backup-[^"]*\)"/\1/')
run "$CB" backup list
say "Cinder's rule: a backup with incremental backups on top cannot be deleted"
"$CB" backup delete "$FULL" && { echo "UNEXPECTED: deleted"; exit 1; } || true
say "delete the source volume, restore the incremental backup onto a new volume placed by the scheduler"
run "$CB" agent-ctl "${A[@]}" delete "$BVOL"
RESTORED=$("$CB" backup restore "$INC" --zone nova --name demo-restored -o json | sed -n 's/.*"volume": *"\([^"]*\)".*/\1/p')
run "$CB" volume show demo-restored
GOT=$(sha256sum <"$W/pool/volume-$RESTORED.img" | cut -d' ' -f1)
if [ "$GOT" = "$WANT" ]; then echo "    restored bytes identical: sha256 $GOT"; else echo "MISMATCH: $GOT != $WANT"; exit 1; fi
run "$CB" backup delete "$INC"
run "$CB" backup delete "$FULL"
run "$CB" agent-ctl "${A[@]}" delete "$RESTORED"

say "unexport, delete the snapshot and both volumes (a second delete is fine: already gone)"
run "$CB" agent-ctl "${A[@]}" unexport "$VOL"
run "$CB" agent-ctl "${A[@]}" unexport "$CLONE"
run "$CB" agent-ctl "${A[@]}" delete-snapshot "$SNAP"
run "$CB" agent-ctl "${A[@]}" delete "$VOL"
run "$CB" agent-ctl "${A[@]}" delete "$CLONE"
run "$CB" agent-ctl "${A[@]}" delete "$CLONE"
run "$CB" agent-ctl "${A[@]}" pools
echo "    targets left in tgtd: $(tgtadm -C "$CTL" --lld iscsi --op show --mode target | grep -c '^Target' || true)"

say "stopping cinderblock (SIGTERM) and tgtd"
kill -TERM "$CB_PID"; wait "$CB_PID"; echo "    cinderblock exited with $?"; CB_PID=
echo
echo "demo: done. Log of the run: (removed with $W) -- rerun with 'make demo' any time."
