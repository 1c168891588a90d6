#!/bin/bash
# A real Kubernetes control plane on 127.0.0.1 for tests: etcd + kube-apiserver v1.20.2
# (+ kube-controller-manager), self-signed certificates, free ports. No kubelet, no nodes.
#
#   tests/kube/cluster.sh up DIR [--with-kcm]   start; writes DIR/kubeconfig and DIR/env
#   tests/kube/cluster.sh down DIR              stop what `up DIR` started (by PID)
#
# The contract (tests/kube/README.md): after `up`, `source DIR/env` exports KUBECONFIG and
# CINDERBLOCK_KUBECONFIG (both DIR/kubeconfig, cluster-admin), and the API server answers
# /readyz. Logs are DIR/*.log, PIDs DIR/*.pid. `down` is idempotent and leaves the logs.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

usage() { kube_die "usage: cluster.sh up DIR [--with-kcm] | cluster.sh down DIR"; }
[ $# -ge 2 ] || usage
CMD=$1 DIR=$2
shift 2
WITH_KCM=0
for a in "$@"; do
  case $a in --with-kcm) WITH_KCM=1 ;; *) usage ;; esac
done

# Processes in start order; `down` stops them in reverse.
PROCS=(etcd kube-apiserver kube-controller-manager)

# Is the process of DIR/NAME.pid alive and ours (its command line names DIR)?
alive() {
  local pidfile=$DIR/$1.pid pid
  [ -f "$pidfile" ] || return 1
  pid=$(cat "$pidfile")
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF "$DIR"
}

stop_one() {
  local name=$1 pid i
  if ! alive "$name"; then
    rm -f "$DIR/$name.pid"
    return 0
  fi
  pid=$(cat "$DIR/$name.pid")
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    kube_log "$name ($pid) ignored SIGTERM for 10 s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$DIR/$name.pid"
}

down() {
  [ -d "$DIR" ] || return 0
  local i
  for ((i = ${#PROCS[@]} - 1; i >= 0; i--)); do stop_one "${PROCS[$i]}"; done
  rm -rf "$DIR/etcd-data"
  kube_log "stopped the control plane in $DIR"
}

# Starts NAME in the background, detached from this shell, logging to DIR/NAME.log.
start() {
  local name=$1
  shift
  setsid "$@" >"$DIR/$name.log" 2>&1 </dev/null &
  echo $! >"$DIR/$name.pid"
}

certs() {
  local c=$DIR/pki
  mkdir -p "$c"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=cinderblock-test-ca" \
    -keyout "$c/ca.key" -out "$c/ca.crt" 2>/dev/null
  # The serving certificate names every way a client dials the API server, in-cluster
  # names included (10.0.0.1 is the first address of --service-cluster-ip-range).
  cat >"$c/serving.ext" <<EXT
subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc
extendedKeyUsage=serverAuth
EXT
  sign serving "/CN=kube-apiserver" "$c/serving.ext"
  printf 'extendedKeyUsage=clientAuth\n' >"$c/client.ext"
  # system:masters: cluster-admin through RBAC's bootstrap binding.
  sign admin "/O=system:masters/CN=cinderblock-test-admin" "$c/client.ext"
  # Service account tokens are signed with this pair.
  openssl genrsa -out "$c/sa.key" 2048 2>/dev/null
  openssl rsa -in "$c/sa.key" -pubout -out "$c/sa.pub" 2>/dev/null
  chmod 600 "$c"/*.key
}

sign() {
  local c=$DIR/pki name=$1 subj=$2 ext=$3
  openssl req -newkey rsa:2048 -nodes -subj "$subj" -keyout "$c/$name.key" -out "$c/$name.csr" 2>/dev/null
  openssl x509 -req -in "$c/$name.csr" -CA "$c/ca.crt" -CAkey "$c/ca.key" -CAcreateserial \
    -days 3650 -extfile "$ext" -out "$c/$name.crt" 2>/dev/null
}

write_kubeconfig() {
  local c=$DIR/pki url=$1
  cat >"$DIR/kubeconfig" <<KCFG
apiVersion: v1
kind: Config
clusters:
  - name: cinderblock-test
    cluster:
      server: $url
      certificate-authority-data: $(base64 -w0 "$c/ca.crt")
users:
  - name: admin
    user:
      client-certificate-data: $(base64 -w0 "$c/admin.crt")
      client-key-data: $(base64 -w0 "$c/admin.key")
contexts:
  - name: cinderblock-test
    context: {cluster: cinderblock-test, user: admin, namespace: default}
current-context: cinderblock-test
KCFG
  chmod 600 "$DIR/kubeconfig"
}

# Waits up to $2 seconds for the API server's /readyz; on failure shows the log's tail.
wait_ready() {
  local deadline=$(($(date +%s) + $1))
  until KUBECONFIG=$DIR/kubeconfig kubectl get --raw /readyz >/dev/null 2>&1; do
    if ! alive kube-apiserver; then
      tail -n 30 "$DIR/kube-apiserver.log" >&2
      kube_die "kube-apiserver exited (log: $DIR/kube-apiserver.log)"
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      tail -n 30 "$DIR/kube-apiserver.log" >&2
      kube_die "kube-apiserver not ready after $1 s (log: $DIR/kube-apiserver.log)"
    fi
    sleep 0.5
  done
}

up() {
  local p
  mkdir -p "$DIR"
  DIR=$(cd "$DIR" && pwd)
  for p in "${PROCS[@]}"; do
    alive "$p" && kube_die "$p of $DIR is already running: cluster.sh down $DIR first"
  done
  # Any cached binaries will do here (run.sh's first stage rebuilds stale ones); build only
  # when there are none.
  if [ -x "$KUBE_BIN/kube-apiserver" ] && [ -x "$KUBE_BIN/kube-controller-manager" ]; then
    kube_log "using $KUBE_BIN (build revision $(cat "$KUBE_BIN/build-rev" 2>/dev/null || echo 1))"
  else
    bash "$CB_KUBE/build.sh" >&2
  fi
  kube_apt_install etcd-server openssl python3 curl
  local t0
  t0=$(now)
  rm -rf "$DIR/pki" "$DIR/etcd-data"
  certs

  local etcd_port etcd_peer api_port kcm_port
  etcd_port=$(free_port) etcd_peer=$(free_port) api_port=$(free_port) kcm_port=$(free_port)
  # etcd-server's Debian build; its own data directory, nothing on the default ports.
  start etcd etcd --name cinderblock-test --data-dir "$DIR/etcd-data" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" \
    --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-cluster "cinderblock-test=http://127.0.0.1:$etcd_peer" \
    --log-level warn

  local c=$DIR/pki
  # 1.20's defaults that would touch the host or collide with other users of the machine
  # are turned off: the insecure port 8080, /var/run/kubernetes. Privileged pods are
  # allowed (the chart's node and agent DaemonSets are privileged); CSIStorageCapacity is
  # alpha in 1.20 (feature gate + storage.k8s.io/v1alpha1).
  start kube-apiserver "$KUBE_BIN/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" \
    --insecure-port 0 --cert-dir "$DIR/apiserver-certs" \
    --tls-cert-file "$c/serving.crt" --tls-private-key-file "$c/serving.key" \
    --client-ca-file "$c/ca.crt" \
    --service-account-key-file "$c/sa.pub" --service-account-signing-key-file "$c/sa.key" \
    --service-account-issuer https://kubernetes.default.svc \
    --service-cluster-ip-range 10.0.0.0/24 \
    --authorization-mode Node,RBAC \
    --allow-privileged=true \
    --feature-gates CSIStorageCapacity=true \
    --runtime-config storage.k8s.io/v1alpha1=true \
    --profiling=false --v=1
  write_kubeconfig "https://127.0.0.1:$api_port"
  wait_ready 120
  local served
  served=$(kubectl --kubeconfig "$DIR/kubeconfig" version -o json 2>/dev/null |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["serverVersion"]["gitVersion"])')
  [ "$served" = "$KUBE_VERSION" ] || kube_log "WARNING: the API server reports $served, not $KUBE_VERSION (binaries of build revision 1: run tests/kube/build.sh)"
  kube_log "kube-apiserver $KUBE_VERSION ready at https://127.0.0.1:$api_port in $(since "$t0") s"

  if [ $WITH_KCM = 1 ]; then
    # PV/PVC binding (re-examined every second instead of every 15 s, so that tests do not
    # wait), garbage collection, service account tokens. No cloud provider, no leader
    # election (one instance), no insecure port.
    start kube-controller-manager "$KUBE_BIN/kube-controller-manager" \
      --kubeconfig "$DIR/kubeconfig" \
      --authentication-kubeconfig "$DIR/kubeconfig" --authorization-kubeconfig "$DIR/kubeconfig" \
      --bind-address 127.0.0.1 --secure-port "$kcm_port" --port 0 \
      --cert-dir "$DIR/kcm-certs" \
      --leader-elect=false \
      --service-account-private-key-file "$c/sa.key" --root-ca-file "$c/ca.crt" \
      --use-service-account-credentials=false \
      --pvclaimbinder-sync-period 1s \
      --feature-gates CSIStorageCapacity=true \
      --profiling=false --v=1
    local deadline=$(($(date +%s) + 60))
    until curl -ksf "https://127.0.0.1:$kcm_port/healthz" >/dev/null 2>&1; do
      alive kube-controller-manager ||
        { tail -n 30 "$DIR/kube-controller-manager.log" >&2; kube_die "kube-controller-manager exited"; }
      [ "$(date +%s)" -lt "$deadline" ] || kube_die "kube-controller-manager not healthy after 60 s"
      sleep 0.5
    done
    kube_log "kube-controller-manager healthy on 127.0.0.1:$kcm_port"
  fi

  cat >"$DIR/env" <<ENV
# Written by tests/kube/cluster.sh up: source it to reach the test API server.
export KUBECONFIG=$DIR/kubeconfig
export CINDERBLOCK_KUBECONFIG=$DIR/kubeconfig
export CINDERBLOCK_KUBE_APISERVER=https://127.0.0.1:$api_port
export CINDERBLOCK_KUBE_WITH_KCM=$WITH_KCM
ENV
  kube_log "control plane up in $(since "$t0") s: source $DIR/env"
}

case $CMD in
  up) up ;;
  down)
    DIR=$(cd "$DIR" 2>/dev/null && pwd || echo "$DIR")
    down
    ;;
  *) usage ;;
esac
