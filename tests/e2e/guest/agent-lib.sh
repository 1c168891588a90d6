# Guest-side helpers for the agent scenarios (sourced INSIDE a guest from /mnt/host/e2e).
# The agent runs from /mnt/host/bin/cinderblock with the config $AGENT_CONFIG (default
# /mnt/host/e2e/agent-lvm.toml);
# agent-ctl talks to it on 127.0.0.1:9700; the kernel initiator (open-iscsi) logs in to the
# guest's own tgtd on 127.0.0.1:3260 with the CHAP credentials an export returns.
set -eu
CB=/mnt/host/bin/cinderblock
AGENT=tcp://127.0.0.1:9700
PORTAL=127.0.0.1:3260
ALOG=/mnt/host/logs/$(hostname)/agent.log
ME=$(sed -n 's/^InitiatorName=//p' /etc/iscsi/initiatorname.iscsi)
IQN_PREFIX=iqn.2026-01.dev.cinderblock:volume-

fail() { echo "CHECK FAILED: $*" >&2; exit 1; }
ctl() { "$CB" agent-ctl --agent "$AGENT" "$@"; }

# expect_fail CODE CMD...: CMD must fail, and its error must name the gRPC code CODE.
expect_fail() {
  local code=$1 out
  shift
  if out=$("$@" 2>&1); then fail "'$*' succeeded; expected $code"; fi
  echo "$out" | grep -q "$code" || fail "'$*' failed without $code: $out"
  echo "refused as expected: $(echo "$out" | tail -1)"
}

listening() {  # is TCP port $1 in LISTEN state?
  awk -v p="$(printf ':%04X' "$1")" 'NR > 1 && $4 == "0A" && substr($2, length($2) - 4) == p { f = 1 }
                                     END { exit !f }' /proc/net/tcp /proc/net/tcp6
}

agent_start() {
  mkdir -p "$(dirname "$ALOG")"
  echo "=== $(date -u +%FT%TZ) agent start" >>"$ALOG"
  NO_COLOR=1 setsid "$CB" agent -c "${AGENT_CONFIG:-/mnt/host/e2e/agent-lvm.toml}" >>"$ALOG" 2>&1 </dev/null &
  echo $! >/run/cb-agent.pid
  local end=$(($(date +%s) + 120))
  until listening 9700; do
    kill -0 "$(cat /run/cb-agent.pid)" 2>/dev/null || { tail -20 "$ALOG" >&2; fail "agent exited"; }
    [ "$(date +%s)" -lt $end ] || { tail -20 "$ALOG" >&2; fail "agent not listening after 120 s"; }
    sleep 0.2
  done
}

agent_stop() {  # SIGTERM (or the signal $1) and wait for the process to go
  local pid
  pid=$(cat /run/cb-agent.pid 2>/dev/null) || return 0
  kill "-${1:-TERM}" "$pid" 2>/dev/null || true
  for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  rm -f /run/cb-agent.pid
}

# backup_bytes KIND: the agent's cinderblock_agent_backup_bytes_total{kind="KIND"} (its
# metrics_listen is 127.0.0.1:9701; 0 before any backup).
backup_bytes() {
  busybox wget -qO- http://127.0.0.1:9701/metrics |
    awk -v k="cinderblock_agent_backup_bytes_total{kind=\"$1\"}" '$1 == k { v = $2 } END { printf "%d\n", v }'
}

# export_to_me VOL: export VOL to this guest's initiator; sets CHAP_USER and CHAP_SECRET.
export_to_me() {
  local out
  out=$(ctl export "$1" --initiator "$ME" --secret-file "/run/chap-$1")
  CHAP_USER=$(echo "$out" | awk '/^chap user/ { print $3 }')
  CHAP_SECRET=$(cat "/run/chap-$1")
  [ -n "$CHAP_USER" ] && [ -n "$CHAP_SECRET" ] || fail "no CHAP credentials in: $out"
  echo "$out" | grep -q "^target *$IQN_PREFIX$1\$" || fail "unexpected target: $out"
}

# login VOL [SECRET]: kernel login with CHAP; prints the disk's path once it exists.
login() {
  local t=$IQN_PREFIX$1 secret=${2:-$CHAP_SECRET} dev
  iscsiadm -m node -T "$t" -p "$PORTAL" -o new >/dev/null
  iscsiadm -m node -T "$t" -p "$PORTAL" -o update -n node.startup -v manual
  iscsiadm -m node -T "$t" -p "$PORTAL" -o update -n node.session.auth.authmethod -v CHAP
  iscsiadm -m node -T "$t" -p "$PORTAL" -o update -n node.session.auth.username -v "$CHAP_USER"
  iscsiadm -m node -T "$t" -p "$PORTAL" -o update -n node.session.auth.password -v "$secret"
  iscsiadm -m node -T "$t" -p "$PORTAL" --login >/dev/null || return 1
  dev=/dev/disk/by-path/ip-$PORTAL-iscsi-$t-lun-1
  for _ in $(seq 300); do [ -b "$dev" ] && break; sleep 0.1; done
  [ -b "$dev" ] || fail "no $dev after login"
  echo "$dev"
}

logout() {
  local t=$IQN_PREFIX$1
  iscsiadm -m node -T "$t" -p "$PORTAL" --logout >/dev/null 2>&1 || true
  iscsiadm -m node -T "$t" -p "$PORTAL" -o delete >/dev/null 2>&1 || true
}

lv_dev() { echo "/dev/$1/volume-$2"; }  # VG VOL
sha() { dd if="$1" bs=1M count="${2:-8}" iflag=direct status=none | sha256sum | cut -d' ' -f1; }
targets() { tgtadm --lld iscsi --mode target --op show | grep -c '^Target ' || true; }
