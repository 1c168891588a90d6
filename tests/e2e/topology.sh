# The two topologies the e2e tests use. Sourced (after lib.sh), never run.
#   two: "stor" (LVM + tgtd) and "comp" (open-iscsi) on a private L2 segment that exists
#        only inside qemu; the iSCSI login crosses it (portal 192.168.77.1:3260)
#   one: "one", agent + controller + node together, iSCSI over 127.0.0.1
# Every guest's CSI port (10000) is forwarded from a free 127.0.0.1 port on the host.
# topo_boot writes $CB_RUN/env, which the Rust tests read (`source tests/e2e/.run/env`).
VM=$CB_E2E/vm
CB_ENV=$CB_RUN/env

topo_vms() {  # TOPOLOGY... -> VM names
  local t
  for t in "$@"; do
    case $t in
      two) echo stor comp ;;
      one) echo one ;;
      all) echo stor comp one ;;
      *) die "unknown topology $t (two|one|all)" ;;
    esac
  done | xargs
}

# topo_boot VM...: start them all (SMP=1 each: 2 host cores), then wait for all in parallel.
topo_boot() {
  local name port l2 pids=() rc=0 p
  mkdir -p "$CB_RUN"
  {
    echo "# written by tests/e2e at $(date -u +%FT%TZ)"
    echo "export CINDERBLOCK_E2E_VM=$CB_E2E/vm"
    echo "export CINDERBLOCK_E2E_RUN=$CB_RUN"
    echo "export CINDERBLOCK_E2E_VMS=\"$*\""
  } >"$CB_ENV"
  # The guests' shared backup repository starts empty with them, as their disks do: a
  # backup left by an earlier run (same CSI name, same id) would answer for a new one.
  rm -rf "$CB_SHARE/e2e/backups"
  l2=$(free_port)
  for name in "$@"; do
    port=$(free_port)
    aport=$(free_port)
    echo "export CINDERBLOCK_E2E_$(tr a-z A-Z <<<"$name")_CSI=127.0.0.1:$port" >>"$CB_ENV"
    echo "export CINDERBLOCK_E2E_$(tr a-z A-Z <<<"$name")_AGENT=127.0.0.1:$aport" >>"$CB_ENV"
    fwd="$port:$CB_GUEST_CSI_PORT $aport:$CB_GUEST_AGENT_PORT"
    case $name in
      stor) L2=listen:$l2 IP1=$CB_STOR_IP/24 HOSTFWD=$fwd "$VM" start stor ;;
      comp) L2=connect:$l2 IP1=$CB_COMP_IP/24 HOSTFWD=$fwd "$VM" start comp ;;
      *) HOSTFWD=$fwd "$VM" start "$name" ;;
    esac
  done
  for name in "$@"; do "$VM" wait "$name" & pids+=($!); done
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  return $rc
}

# start_cinderblock VM: `cinderblock all` on the guest's CSI port, log on the share. Its
# agent listens on the guest's agent port (forwarded like the CSI port) and serves two pools
# on the VG cinder-volumes: "thick" (lvm-thick, media=hdd, zone "z-VM") and "thin" (lvm-thin
# on the thin pool pool0, media=ssd, zone "z-shared": every guest's thin pool is in it, so a
# volume can migrate between guests without leaving its zone); both with host=VM. Its node
# service runs too (zone "z-VM"), with the CHAP key every guest shares. A config file
# tests/e2e/guest/cinderblock-VM.toml, when there is one, replaces the generated one;
# CINDERBLOCK_E2E_ARGS adds words to the command line.
start_cinderblock() {
  local name=$1 portal
  case $name in stor) portal=$CB_STOR_IP:3260 ;; comp) portal=$CB_COMP_IP:3260 ;; *) portal=$CB_ONE_IP:3260 ;; esac
  mkdir -p "$CB_SHARE/e2e/backups"
  # One CHAP master key for the whole test cluster: the node of one guest derives the secret
  # of a volume exported by another guest's agent.
  [ -s "$CB_SHARE/e2e/chap.key" ] || head -c 32 /dev/urandom >"$CB_SHARE/e2e/chap.key"
  if [ -f "$CB_E2E/guest/cinderblock-$name.toml" ]; then
    cp "$CB_E2E/guest/cinderblock-$name.toml" "$CB_SHARE/e2e/cinderblock-$name.toml"
  else
    cat >"$CB_SHARE/e2e/cinderblock-$name.toml" <<EOF
[agent]
name = "$name"
listen = "tcp://0.0.0.0:$CB_GUEST_AGENT_PORT"
chap_key_file = "/mnt/host/e2e/chap.key"
metrics_listen = "127.0.0.1:$CB_GUEST_AGENT_METRICS_PORT"

[[agent.pools]]
name = "thick"
kind = "lvm-thick"
vg = "cinder-volumes"
zone = "z-$name"
snapshot_cow_percent = 100
capabilities = { media = "hdd", host = "$name" }

[[agent.pools]]
name = "thin"
kind = "lvm-thin"
vg = "cinder-volumes"
thin_pool = "pool0"
zone = "z-shared"
capabilities = { media = "ssd", host = "$name" }

# Every guest sees the host's share: a POSIX backup repository there is what an NFS export
# shared by the storage nodes is to Cinder's backup service.
[[agent.backup_repositories]]
name = "shared"
kind = "posix"
path = "/mnt/host/e2e/backups"

[agent.backup]
default_repository = "shared"

[node]
zone = "z-$name"
metrics_listen = "127.0.0.1:$CB_GUEST_CSI_METRICS_PORT"
EOF
  fi
  # shellcheck disable=SC2086  # CINDERBLOCK_E2E_ARGS is a list of extra words on purpose
  "$VM" exec "$name" bash /mnt/host/e2e/start-cinderblock.sh all -c "/mnt/host/e2e/cinderblock-$name.toml" \
    --endpoint "tcp://0.0.0.0:$CB_GUEST_CSI_PORT" --portal "$portal" ${CINDERBLOCK_E2E_ARGS:-}
}

print_endpoints() {
  local name var flag
  # shellcheck disable=SC1090
  source "$CB_ENV"
  echo "CSI endpoints (host -> guest :$CB_GUEST_CSI_PORT through qemu hostfwd):"
  for name in $CINDERBLOCK_E2E_VMS; do
    var=CINDERBLOCK_E2E_$(tr a-z A-Z <<<"$name")_CSI
    printf '  %-5s tcp://%s   (%s)\n' "$name" "${!var}" "$var"
  done
  echo "Run a command in a guest:  tests/e2e/vm exec NAME 'lsblk; tgtadm --lld iscsi --op show --mode target'"
  echo "Guest logs:                $CB_SHARE/logs/NAME/ (cinderblock.log), consoles $CB_RUN/vms/NAME/console.log"
  flag=$(cb_profile_flag)
  echo "Rust tests:                source $CB_ENV && cargo test${flag:+ $flag} --test e2e_vm -- --ignored --test-threads=1"
}
