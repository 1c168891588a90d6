#!/bin/bash
# `make bench`, inside the test VM: CreateVolume through the agent API against a raw
# `lvcreate` of the same size on the same VG, in one run, in one guest (real LVM, TCG).
#   1. median latency of 20 sequential creates of 64 MiB: agent (gRPC, measured in one
#      client process: `agent-ctl bench-create`) vs raw `lvcreate` (timed in bash with
#      $EPOCHREALTIME, no extra process), rounds interleaved so drift hits both;
#   2. 50 concurrent agent creates (errors counted, wall time) vs 50 sequential raw lvcreate;
#   3. the same median through the controller's CSI CreateVolume (`cinderblock bench-csi`,
#      controller and agent in the guest), and 200 concurrent CSI creates of 8 MiB (errors,
#      duplicates, wall time) vs 200 sequential raw lvcreate;
#   4. attach: NodeStageVolume + NodePublishVolume through the node service (ext4, 64 MiB,
#      `cinderblock bench-attach`) vs the same steps by hand (guest/attach-bench.sh);
#   5. backup on an LVM thin pool (issue 7's incremental figure on real LVM): a 512 MiB thin
#      volume written whole with random bytes, a full backup, 1% rewritten in 1 MiB runs
#      spread over it, an incremental backup (thin_delta change tracking) against the full
#      one, into a POSIX repository on an ext4 LV of the same VG. Runs first;
#      BENCH_VM_ONLY=backup runs only this part.
# Prints `bench: NAME = VALUE UNIT (baseline NAME = VALUE UNIT, ratio R, goal G)` lines.
# Boots the one-VM guest unless it runs already (then leaves it running).
set -euo pipefail
# Its own run directory by default: the share holds bin/cinderblock, and `make e2e-up` or
# `make e2e` replacing it in the middle of a bench run would break the run.
export CINDERBLOCK_E2E_RUN=${CINDERBLOCK_E2E_RUN:-$(cd "$(dirname "$0")" && pwd)/.run-bench}
# Figures are of what ships: the release build.
export CB_PROFILE=release
source "$(dirname "$0")/lib.sh"
source "$CB_E2E/topology.sh"
G=one
VM=$CB_E2E/vm
ROUNDS=${BENCH_ROUNDS:-4} PER_ROUND=${BENCH_PER_ROUND:-5} BURST=${BENCH_BURST:-50}
CSI_BURST=${BENCH_CSI_BURST:-200}
# The whole guest part is one exec: its 200-volume bursts alone took over an hour on a busy
# host (2026-11-22, beside a running `make e2e`).
export EXEC_TIMEOUT=${EXEC_TIMEOUT:-7200}

"$CB_E2E/host-deps.sh" vm >/dev/null
# The same targets as `make e2e-up` builds: with the test, dev-dependencies' features are
# unified in, and a binary built without it would be a second full release build of every crate.
(cd "$CB_REPO" && cargo build --release --bin cinderblock --test e2e_vm 2>&1 | grep -E '^(error|warning: unused)' || true)
"$CB_E2E/build-image.sh" >/dev/null
mkdir -p "$CB_SHARE/bin" "$CB_SHARE/e2e"
cp "$(cb_bin)" "$CB_SHARE/bin/cinderblock.tmp"
mv "$CB_SHARE/bin/cinderblock.tmp" "$CB_SHARE/bin/cinderblock"
cp "$CB_E2E/guest/agent-lib.sh" "$CB_E2E/guest/attach-bench.sh" "$CB_SHARE/e2e/"

booted=0
# (Not `grep -q`: with pipefail, `vm status` dying of SIGPIPE would read as "not running".)
if ! "$VM" status 2>/dev/null | grep "^$G running" >/dev/null; then
  log "booting $G for the bench"
  topo_boot "$G" >/dev/null
  booted=1
fi
finish() {
  "$VM" exec "$G" 'source /mnt/host/e2e/agent-lib.sh; set +e; agent_stop
    umount /var/tmp/cb-bench-repo 2>/dev/null
    lvremove -q -y cinder-volumes >/dev/null 2>&1; true' >/dev/null 2>&1 || true
  [ $booted = 0 ] || "$VM" stop "$G" >/dev/null 2>&1 || true
}
trap finish EXIT

cat >"$CB_SHARE/e2e/agent-bench.toml" <<'EOF'
name = "bench"
listen = "tcp://127.0.0.1:9700"
chap_key_file = "/etc/cinderblock/chap.key"
[[pools]]
name = "thick"
kind = "lvm-thick"
vg = "cinder-volumes"
volume_clear = "none" # deletes are not measured; clearing would only slow the clean-up
EOF
cat >"$CB_SHARE/e2e/controller-bench.toml" <<'EOF'
default_volume_type = "default"
stats_interval_secs = 1
[volume_types.default]
description = "any pool"
EOF

cat >"$CB_SHARE/e2e/agent-bench-backup.toml" <<'EOF'
name = "bench"
listen = "tcp://127.0.0.1:9700"
metrics_listen = "127.0.0.1:9701"
chap_key_file = "/etc/cinderblock/chap.key"
[[pools]]
name = "thin"
kind = "lvm-thin"
vg = "cinder-volumes"
thin_pool = "benchpool"
[[backup_repositories]]
name = "local"
kind = "posix"
path = "/var/tmp/cb-bench-repo"
[backup]
default_repository = "local"
EOF

# 5. Backups on the thin pool (1% = 5 runs of 1 MiB, spread as the host bench spreads them).
bout=$("$VM" exec "$G" "source /mnt/host/e2e/agent-lib.sh
  AGENT_CONFIG=/mnt/host/e2e/agent-bench-backup.toml
  vgs cinder-volumes >/dev/null 2>&1 || { pvcreate -q /dev/vdb && vgcreate -q cinder-volumes /dev/vdb; }
  lvremove -q -y cinder-volumes >/dev/null 2>&1 || true
  lvm lvcreate -q --yes --type thin-pool --size 1280m --name benchpool cinder-volumes >/dev/null
  lvm lvcreate -q --yes --size 768m --name benchrepo cinder-volumes >/dev/null
  mkfs.ext4 -q /dev/cinder-volumes/benchrepo && mkdir -p /var/tmp/cb-bench-repo
  mount /dev/cinder-volumes/benchrepo /var/tmp/cb-bench-repo
  mkdir -p /etc/cinderblock && [ -f /etc/cinderblock/chap.key ] || head -c 32 /dev/urandom >/etc/cinderblock/chap.key
  agent_start
  ctl create bk --pool thin --size 512Mi >/dev/null
  dd if=/dev/urandom of=/dev/cinder-volumes/volume-bk bs=1M count=512 oflag=direct status=none
  t=\${EPOCHREALTIME/./}
  ctl backup-create bk --id bk-full >/dev/null 2>&1
  echo backup_full_ms \$(((\${EPOCHREALTIME/./} - t) / 1000))
  for i in \$(seq 0 4); do
    dd if=/dev/urandom of=/dev/cinder-volumes/volume-bk bs=1M count=1 seek=\$(( (2 * i + 1) * 512 / 10 )) \
      oflag=direct conv=notrunc status=none
  done
  t=\${EPOCHREALTIME/./}
  ctl backup-create bk --id bk-incr --incremental >/dev/null 2>&1
  echo backup_incr_ms \$(((\${EPOCHREALTIME/./} - t) / 1000))
  echo backup_unread_bytes \$(backup_bytes backup_unread)
  ctl backup-delete bk-incr >/dev/null; ctl backup-delete bk-full >/dev/null; ctl delete bk >/dev/null
  agent_stop
  umount /var/tmp/cb-bench-repo; lvremove -q -y cinder-volumes >/dev/null")
echo "$bout" | sed 's/^/  vm| /' >&2
python3 - "$bout" <<'EOF'
import sys
v = dict(l.split()[:2] for l in sys.argv[1].splitlines() if len(l.split()) == 2)
if any(k not in v for k in ("backup_full_ms", "backup_incr_ms", "backup_unread_bytes")):
    sys.exit(f"bench: incomplete backup output from the guest: {sys.argv[1]!r}")
full, inc = float(v["backup_full_ms"]) / 1000, float(v["backup_incr_ms"]) / 1000
unread = int(float(v["backup_unread_bytes"])) / 2**20
print(f"bench: backup_incremental_1pct_time_lvm_thin = {inc:.2f} s (baseline backup_full_time_lvm_thin = {full:.2f} s, "
      f"ratio {inc / full:.2f}, goal <= 0.15) [512 MiB random, 5 runs of 1 MiB rewritten, {unread:.0f} MiB left unread by thin_delta]")
EOF
[ "${BENCH_VM_ONLY:-}" != backup ] || exit 0

out=$("$VM" exec "$G" "source /mnt/host/e2e/agent-lib.sh
  AGENT_CONFIG=/mnt/host/e2e/agent-bench.toml
  vgs cinder-volumes >/dev/null 2>&1 || { pvcreate -q /dev/vdb && vgcreate -q cinder-volumes /dev/vdb; }
  lvremove -q -y cinder-volumes >/dev/null 2>&1 || true
  mkdir -p /etc/cinderblock && [ -f /etc/cinderblock/chap.key ] || head -c 32 /dev/urandom >/etc/cinderblock/chap.key
  agent_start
  raw=()
  for r in \$(seq $ROUNDS); do
    for i in \$(seq $PER_ROUND); do
      t=\${EPOCHREALTIME/./}
      lvcreate -q -y --size 64m --name raw-\$r-\$i cinder-volumes >/dev/null
      raw+=(\$((\${EPOCHREALTIME/./} - t)))
    done
    lvremove -q -y cinder-volumes >/dev/null
    ctl -o json bench-create --pool thick --size 64Mi --count $PER_ROUND --parallel 1 --prefix a\$r |
      sed -n 's/^  \"\\(median_ms\\|errors\\)\": \\([0-9.]*\\),\$/agent_round \\1 \\2/p'
  done
  printf '%s\n' \"\${raw[@]}\" | sort -g | awk '{ v[NR] = \$1 } END { print \"raw_median_ms\", v[int((NR + 1) / 2)] / 1000 }'
  t=\${EPOCHREALTIME/./}
  for i in \$(seq $BURST); do lvcreate -q -y --size 64m --name seq-\$i cinder-volumes >/dev/null; done
  echo raw_seq_wall_ms \$(((\${EPOCHREALTIME/./} - t) / 1000))
  lvremove -q -y cinder-volumes >/dev/null
  ctl -o json bench-create --pool thick --size 64Mi --count $BURST --parallel $BURST --prefix burst |
    sed -n 's/^  \"\\(wall_ms\\|errors\\|median_ms\\)\": \\([0-9.]*\\),\$/burst_\\1 \\2/p'
  lvremove -q -y cinder-volumes >/dev/null 2>&1 || true
  # The controller (Cinder's API + scheduler) in front of the same agent.
  setsid \$CB controller -c /mnt/host/e2e/controller-bench.toml --endpoint tcp://127.0.0.1:10001 \
    --agent bench=tcp://127.0.0.1:9700 >>/mnt/host/logs/\$(hostname)/controller-bench.log 2>&1 </dev/null &
  cpid=\$!
  for _ in \$(seq 120); do
    \$CB bench-csi --endpoint tcp://127.0.0.1:10001 --count 1 --prefix warm >/dev/null 2>&1 && break; sleep 1
  done
  craw=()
  for r in \$(seq $ROUNDS); do
    for i in \$(seq $PER_ROUND); do
      t=\${EPOCHREALTIME/./}
      lvcreate -q -y --size 64m --name craw-\$r-\$i cinder-volumes >/dev/null
      craw+=(\$((\${EPOCHREALTIME/./} - t)))
    done
    lvremove -q -y cinder-volumes >/dev/null
    \$CB bench-csi -o json --endpoint tcp://127.0.0.1:10001 --size 64Mi --count $PER_ROUND --parallel 1 --prefix c\$r |
      sed -n 's/^  \"\\(median_ms\\|errors\\)\": \\([0-9.]*\\),\$/csi_round \\1 \\2/p'
  done
  printf '%s\n' \"\${craw[@]}\" | sort -g | awk '{ v[NR] = \$1 } END { print \"craw_median_ms\", v[int((NR + 1) / 2)] / 1000 }'
  t=\${EPOCHREALTIME/./}
  for i in \$(seq $CSI_BURST); do lvcreate -q -y --size 8m --name cseq-\$i cinder-volumes >/dev/null; done
  echo craw_seq_wall_ms \$(((\${EPOCHREALTIME/./} - t) / 1000))
  lvremove -q -y cinder-volumes >/dev/null
  \$CB bench-csi -o json --endpoint tcp://127.0.0.1:10001 --size 8Mi --count $CSI_BURST --parallel $CSI_BURST --prefix cburst |
    sed -n 's/^  \"\\(wall_ms\\|errors\\|duplicates\\|median_ms\\)\": \\([0-9.]*\\),\$/cburst_\\1 \\2/p'
  bash /mnt/host/e2e/attach-bench.sh tcp://127.0.0.1:10001 $ROUNDS $PER_ROUND
  kill \$cpid; wait \$cpid 2>/dev/null || true
  agent_stop")
echo "$out" | sed 's/^/  vm| /' >&2

python3 - "$out" "$ROUNDS" "$PER_ROUND" "$BURST" "$CSI_BURST" <<'EOF'
import statistics, sys
out, rounds, per, burst, cburst = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
medians = {"agent_round": [], "csi_round": [], "attach_round": []}
errs = {"agent_round": 0, "csi_round": 0, "attach_round": 0}
v = {}
raw_attach = []
for line in out.splitlines():
    w = line.split()
    if w[:1] == ["raw_attach_ms"]:
        raw_attach.append(float(w[1]))
    elif w[:1] and w[0] in medians:
        if w[1] == "median_ms":
            medians[w[0]].append(float(w[2]))
        else:
            errs[w[0]] += int(float(w[2]))
    elif len(w) == 2:
        v[w[0]] = float(w[1])
need = ["raw_median_ms", "raw_seq_wall_ms", "burst_wall_ms", "burst_errors",
        "craw_median_ms", "craw_seq_wall_ms", "cburst_wall_ms", "cburst_errors", "cburst_duplicates"]
if any(len(m) != rounds for m in medians.values()) or any(k not in v for k in need) \
        or len(raw_attach) != rounds * per:
    sys.exit(f"bench: incomplete output from the guest: {out!r}")
agent, errors = medians["agent_round"], errs["agent_round"]
# Median of the per-round medians (each round: {per} creates).
a, raw = statistics.median(agent), v["raw_median_ms"]
print(f"bench: agent_create_median_lvm_thick_64MiB = {a:.1f} ms (baseline raw_lvcreate_median = {raw:.1f} ms, "
      f"ratio {a / raw:.2f}, goal <= 1.10) [{rounds}x{per} sequential, {errors} errors]")
bw, sw = v["burst_wall_ms"] / 1000, v["raw_seq_wall_ms"] / 1000
print(f"bench: agent_create_{burst}_concurrent_wall = {bw:.2f} s (baseline raw_lvcreate_{burst}_sequential_wall = {sw:.2f} s, "
      f"ratio {bw / sw:.2f}, goal 0 errors) [{int(v['burst_errors'])} errors, median call {v.get('burst_median_ms', 0):.0f} ms]")
c, craw = statistics.median(medians["csi_round"]), v["craw_median_ms"]
print(f"bench: controller_create_median_lvm_thick_64MiB = {c:.1f} ms (baseline raw_lvcreate_median = {craw:.1f} ms, "
      f"ratio {c / craw:.2f}, goal <= 1.10) [{rounds}x{per} sequential CSI CreateVolume, {errs['csi_round']} errors]")
cw, csw = v["cburst_wall_ms"] / 1000, v["craw_seq_wall_ms"] / 1000
print(f"bench: controller_create_{cburst}_concurrent_wall = {cw:.2f} s (baseline raw_lvcreate_{cburst}_sequential_wall = {csw:.2f} s, "
      f"ratio {cw / csw:.2f}, goal 0 errors, 0 duplicates) [{int(v['cburst_errors'])} errors, {int(v['cburst_duplicates'])} duplicates, 8 MiB each]")
n, m = statistics.median(medians["attach_round"]), statistics.median(raw_attach)
print(f"bench: node_stage_publish_median_ext4_64MiB = {n:.1f} ms (baseline manual_iscsiadm_login_mkfs_mount_median = {m:.1f} ms, "
      f"ratio {n / m:.2f}, goal <= 1.10) [{rounds}x{per} attaches each way, interleaved, kernel initiator to the guest's own tgtd]")
if errors or v["burst_errors"] or errs["csi_round"] or v["cburst_errors"] or v["cburst_duplicates"]:
    sys.exit("bench: some creates failed")
EOF
