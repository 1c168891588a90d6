#!/bin/bash
# `make kube`: everything Kubernetes-facing, against a real kube-apiserver.
#   1. build kube-apiserver + kube-controller-manager v1.20.2 (cached after the first run)
#   2. start etcd + kube-apiserver + kube-controller-manager (cluster.sh up --with-kcm)
#   3. apply the chart's CRDs (deploy/helm/cinderblock/crds/, whatever is there)
#   4. the chart: render + server-side dry run (chart.sh)
#   5. the chart's generated TOML parsed and validated by the roles' own parser
#      (tests/chart_config.rs)
#   6. hadolint on the Dockerfile
#   7. the Rust tests that need an API server (tests/kube_api.rs, when it exists), with
#      CINDERBLOCK_KUBECONFIG set
# The control plane is stopped on exit, whatever happens. Stage durations are printed last.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

RUN_DIR=${CINDERBLOCK_KUBE_RUN:-$CB_KUBE/.run}
stages=()
stage() {  # NAME COMMAND...: runs it, records its duration
  local name=$1 t
  shift
  t=$(now)
  kube_log "== $name"
  "$@"
  stages+=("$(printf '%-22s %7s s' "$name" "$(since "$t")")")
}
report() {
  local rc=$?
  bash "$CB_KUBE/cluster.sh" down "$RUN_DIR" >&2 || true
  echo "---- make kube: stage durations" >&2
  local s
  for s in "${stages[@]}"; do echo "  $s" >&2; done
  [ $rc = 0 ] && echo "make kube: passed" >&2 || echo "make kube: FAILED (exit $rc)" >&2
}
trap report EXIT

apply_crds() {
  local crds=$CB_REPO/deploy/helm/cinderblock/crds f n=0
  if [ -d "$crds" ]; then
    for f in "$crds"/*.yaml "$crds"/*.yml "$crds"/*.json; do
      [ -f "$f" ] || continue
      kubectl apply -f "$f" >&2
      n=$((n + 1))
    done
  fi
  if [ $n -gt 0 ]; then
    kubectl wait --for condition=established --timeout=60s crd --all >/dev/null
  fi
  kube_log "$n CRD files applied from deploy/helm/cinderblock/crds/"
}

# The Rust tests run in the debug profile: `make test` has built them already, where a
# release build would compile every crate once more (18 min on 2 cores with a cold cache,
# measured 2026-11-22).
chart_schema() {  # the TOML chart.sh left in $CINDERBLOCK_CHART_TOML_DIR, by the roles' parser
  (cd "$CB_REPO" && nice -n 10 cargo test --test chart_config -- --ignored)
}

rust_tests() {
  if [ ! -f "$CB_REPO/tests/kube_api.rs" ]; then
    kube_log "tests/kube_api.rs does not exist yet: no Rust tests to run"
    return 0
  fi
  (cd "$CB_REPO" && nice -n 10 cargo test --test kube_api -- --ignored --test-threads=1)
}

stage "build (cached)" bash "$CB_KUBE/build.sh"
bash "$CB_KUBE/cluster.sh" down "$RUN_DIR" >&2 # left over from an interrupted run
stage "cluster up" bash "$CB_KUBE/cluster.sh" up "$RUN_DIR" --with-kcm
# shellcheck disable=SC1091
source "$RUN_DIR/env"
stage "apply CRDs" apply_crds
export CINDERBLOCK_CHART_TOML_DIR=$RUN_DIR/chart-toml
rm -rf "$CINDERBLOCK_CHART_TOML_DIR"
stage "chart check" bash "$CB_KUBE/chart.sh"
stage "chart TOML vs schema" chart_schema
stage "hadolint" bash "$CB_KUBE/lint-dockerfile.sh"
stage "rust kube_api tests" rust_tests
