#!/bin/bash
# Runs INSIDE the bench guest (sourced helpers from agent-lib.sh; the agent and a controller
# already run): how long a pod waits for its volume. The node service's NodeStageVolume +
# NodePublishVolume (`cinderblock bench-attach`, timed in one client process) against the
# same work done by hand on a fresh, blank, exported volume: node record with CHAP and
# manual start-up, login, wait for the disk (10 ms polling), blkid, mkfs.ext4, mount, bind
# mount. Rounds are interleaved so drift hits both. Prints
#   attach_round median_ms X     one per round (node service)
#   raw_attach_ms X              one per manual attach
#   attach-bench.sh CONTROLLER_ENDPOINT ROUNDS PER_ROUND
# CHAP_KEY: the agent's CHAP master key (default /etc/cinderblock/chap.key).
set -euo pipefail
source /mnt/host/e2e/agent-lib.sh
CONTROLLER=$1 ROUNDS=$2 PER_ROUND=$3
NODE_EP=tcp://127.0.0.1:10002
NLOG=/mnt/host/logs/$(hostname)/node-bench.log
D=/var/lib/cb-attach-bench

cat >/run/node-bench.toml <<EON
chap_key_file = "${CHAP_KEY:-/etc/cinderblock/chap.key}"
EON
setsid "$CB" node -c /run/node-bench.toml --endpoint "$NODE_EP" >>"$NLOG" 2>&1 </dev/null &
npid=$!
trap 'kill $npid 2>/dev/null || true' EXIT
for _ in $(seq 600); do listening 10002 && break; sleep 0.2; done
listening 10002 || { tail -20 "$NLOG" >&2; fail "node service not listening"; }

raw_attach() {  # one manual attach of a fresh volume; prints its duration in ms
  local vol=raw-att-$1 t dev ms
  ctl create "$vol" --pool thick --size 64Mi >/dev/null
  export_to_me "$vol"
  local tgt=$IQN_PREFIX$vol stage=$D/raw/$vol/stage pod=$D/raw/$vol/pod
  mkdir -p "$stage" "$pod"
  t=${EPOCHREALTIME/./}
  iscsiadm -m node -T "$tgt" -p "$PORTAL" -o new >/dev/null
  iscsiadm -m node -T "$tgt" -p "$PORTAL" -o update -n node.startup -v manual
  iscsiadm -m node -T "$tgt" -p "$PORTAL" -o update -n node.session.auth.authmethod -v CHAP
  iscsiadm -m node -T "$tgt" -p "$PORTAL" -o update -n node.session.auth.username -v "$CHAP_USER"
  iscsiadm -m node -T "$tgt" -p "$PORTAL" -o update -n node.session.auth.password -v "$CHAP_SECRET"
  iscsiadm -m node -T "$tgt" -p "$PORTAL" --login >/dev/null
  dev=/dev/disk/by-path/ip-$PORTAL-iscsi-$tgt-lun-1
  until [ -b "$dev" ]; do sleep 0.01; done
  blkid -p "$dev" >/dev/null || true # blank: exit 2
  mkfs.ext4 -F -q "$dev"
  mount -t ext4 "$dev" "$stage"
  mount --bind "$stage" "$pod"
  ms=$(((${EPOCHREALTIME/./} - t) / 1000))
  umount "$pod" "$stage"
  logout "$vol"
  ctl unexport "$vol" >/dev/null
  ctl delete "$vol" >/dev/null
  echo "$ms"
}

for r in $(seq "$ROUNDS"); do
  "$CB" bench-attach -o json --controller "$CONTROLLER" --node "$NODE_EP" --count "$PER_ROUND" \
    --size 64Mi --fs ext4 --dir "$D/csi" |
    sed -n 's/^  "median_ms": \([0-9.]*\),$/attach_round median_ms \1/p'
  for i in $(seq "$PER_ROUND"); do
    echo "raw_attach_ms $(raw_attach "$r-$i")"
  done
done
