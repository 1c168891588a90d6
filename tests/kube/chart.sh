#!/bin/bash
# Renders the Helm chart deploy/helm/cinderblock and checks every object on a real
# kube-apiserver with a server-side dry run. Fails loudly on any rejected object.
#
#   tests/kube/chart.sh            against the cluster of $KUBECONFIG when it is set and
#                                  answers, else a private one (cluster.sh up/down)
#
# Steps: chart-render (tests/kube/render, Helm's engine rebuilt from Debian's Go packages)
# with the default values and with tests/kube/fixtures/values-full.yaml; the generated TOML
# parsed and compared with the values; the README's example values and objects; the chart's CRDs (deploy/helm/cinderblock/crds/, may
# be empty) and the test-only snapshot CRDs applied for real; every rendered object, and the
# README's example objects, through `kubectl apply --dry-run=server`; finally a deliberately broken
# object must be rejected (proof that the dry run validates).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

# CINDERBLOCK_CHART: another copy of the chart (e.g. with CRDs from a branch under work).
CHART=${CINDERBLOCK_CHART:-$CB_REPO/deploy/helm/cinderblock}
FIX=$CB_KUBE/fixtures
OUT=$(mktemp -d "${TMPDIR:-/tmp}/cinderblock-chart.XXXXXX")
own_cluster=""
cleanup() {
  [ -n "$own_cluster" ] && bash "$CB_KUBE/cluster.sh" down "$own_cluster" >&2 || true
  rm -rf "$OUT"
}
trap cleanup EXIT

t_all=$(now)
RENDER=$(bash "$CB_KUBE/build-render.sh")

# The README's install example: its values file and the objects a user creates.
readme_block() {  # MARKER: the lines between "<<'MARKER'" and "MARKER" in README.md
  awk -v m="$1" 'index($0, "<<'"'"'" m "'"'"'") { on = 1; next } on && $0 == m { exit } on' "$CB_REPO/README.md"
}
readme_block VALUES >"$OUT/readme-values.yaml"
readme_block OBJECTS >"$OUT/readme-objects.yaml"
[ -s "$OUT/readme-values.yaml" ] && [ -s "$OUT/readme-objects.yaml" ] ||
  kube_die "README.md has no <<'VALUES' / <<'OBJECTS' example blocks"

# ---- render --------------------------------------------------------------------------
t=$(now)
"$RENDER" --name cinderblock --namespace cinderblock-system "$CHART" >"$OUT/default.yaml"
"$RENDER" --name cinderblock --namespace cinderblock-system --notes "$CHART" >"$OUT/notes.txt"
"$RENDER" --name storage --namespace storage-system -f "$FIX/values-full.yaml" "$CHART" >"$OUT/full.yaml"
"$RENDER" --name cinderblock --namespace cinderblock-system -f "$OUT/readme-values.yaml" "$CHART" >"$OUT/readme.yaml"
kinds() { grep -c '^kind: ' "$1" || true; }
kube_log "rendered: default values $(kinds "$OUT/default.yaml") objects, full values $(kinds "$OUT/full.yaml") objects, in $(since "$t") s"
[ -s "$OUT/notes.txt" ] || kube_die "NOTES.txt rendered empty"

# Options a reviewer would expect to change the output, checked on the rendered text.
expect() { grep -qF -- "$2" "$OUT/$1" || kube_die "$1: expected to contain: $2"; }
refuse() { ! grep -qF -- "$2" "$OUT/$1" || kube_die "$1: expected NOT to contain: $2"; }
expect default.yaml "--enable-capacity"
expect default.yaml "--feature-gates=Topology=true"
expect default.yaml "mountPropagation: Bidirectional"
expect full.yaml "/var/lib/k0s/kubelet/plugins/csi.cinderblock.dev/csi.sock"
refuse full.yaml "--enable-capacity"
refuse full.yaml "command: [tgtd]"
expect default.yaml "command: [tgtd]"
refuse full.yaml "prometheus.io/scrape"
expect full.yaml "secretName: my-agent-tls"
refuse full.yaml "name: storage-cinderblock-chap"

# The roles' TOML: parses, and says what the values say (types included).
python3 "$CB_KUBE/check_chart_toml.py" "$OUT/default.yaml" "$CHART/values.yaml"
python3 "$CB_KUBE/check_chart_toml.py" "$OUT/full.yaml" "$FIX/values-full.yaml"
python3 "$CB_KUBE/check_chart_toml.py" "$OUT/readme.yaml" "$OUT/readme-values.yaml"

# The same files for tests/chart_config.rs, which parses them with the roles' own parser
# (run.sh runs it; by hand: CINDERBLOCK_CHART_TOML_DIR=DIR cargo test --test chart_config
# -- --ignored). CINDERBLOCK_CHART_TOML_DIR names where to leave them.
if [ -n "${CINDERBLOCK_CHART_TOML_DIR:-}" ]; then
  mkdir -p "$CINDERBLOCK_CHART_TOML_DIR"
  for r in default full readme; do
    python3 - "$OUT/$r.yaml" "$CINDERBLOCK_CHART_TOML_DIR/$r" <<'PY'
import sys, yaml
for d in yaml.safe_load_all(open(sys.argv[1])):
    if d and d["kind"] in ("ConfigMap", "Secret"):
        for k, v in (d.get("data") or d.get("stringData") or {}).items():
            if k.endswith(".toml"):
                open(f"{sys.argv[2]}-{k}", "w").write(v)
PY
  done
  kube_log "rendered TOML left in $CINDERBLOCK_CHART_TOML_DIR"
fi

# A chart that must refuse to render: a default volume type that does not exist.
printf 'controller: {config: {defaultVolumeType: nope}}\n' >"$OUT/bad-values.yaml"
if "$RENDER" -f "$OUT/bad-values.yaml" "$CHART" >/dev/null 2>"$OUT/bad.err"; then
  kube_die "the chart rendered with defaultVolumeType 'nope'"
fi
grep -q 'not a key of volumeTypes' "$OUT/bad.err" || kube_die "unexpected render error: $(cat "$OUT/bad.err")"

# ---- a cluster -----------------------------------------------------------------------
if [ -n "${KUBECONFIG:-}" ] && kubectl get --raw /readyz >/dev/null 2>&1; then
  kube_log "using the cluster of KUBECONFIG=$KUBECONFIG"
else
  own_cluster=$OUT/cluster
  bash "$CB_KUBE/cluster.sh" up "$own_cluster" >&2
  # shellcheck disable=SC1091
  source "$own_cluster/env"
fi
server=$(kubectl version -o json 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["serverVersion"]["gitVersion"])')
kube_log "API server $server"

# ---- CRDs, for real (objects of a kind can only be dry-run once its CRD is established) -
t=$(now)
crd_files=()
if [ -d "$CHART/crds" ]; then
  while IFS= read -r f; do crd_files+=("$f"); done < <(find "$CHART/crds" -maxdepth 1 -type f \( -name '*.yaml' -o -name '*.yml' -o -name '*.json' \) | sort)
fi
crd_files+=("$FIX/snapshot-crds.yaml")
for f in "${crd_files[@]}"; do
  kubectl apply -f "$f" >"$OUT/crd-apply.log" 2>&1 || { cat "$OUT/crd-apply.log" >&2; kube_die "CRDs of $f rejected"; }
  sed 's/^/  /' "$OUT/crd-apply.log" >&2
done
kubectl wait --for condition=established --timeout=60s crd --all >/dev/null
kube_log "CRDs applied (${#crd_files[@]} files; chart crds/: $(( ${#crd_files[@]} - 1 ))) in $(since "$t") s"

# ---- server-side dry run ---------------------------------------------------------------
for ns in cinderblock-system storage-system; do
  kubectl get namespace "$ns" >/dev/null 2>&1 || kubectl create namespace "$ns" >/dev/null
done
dry_run() {  # FILE NAMESPACE: every object accepted, one "(server dry run)" line each
  local f=$1 ns=$2 n got
  n=$(kinds "$f")
  if ! kubectl apply --dry-run=server -n "$ns" -f "$f" >"$OUT/dry.log" 2>&1; then
    cat "$OUT/dry.log" >&2
    kube_die "the API server rejected objects of $(basename "$f") (above)"
  fi
  got=$(grep -c '(server dry run)' "$OUT/dry.log" || true)
  [ "$got" = "$n" ] || { cat "$OUT/dry.log" >&2; kube_die "$(basename "$f"): $n objects, $got accepted"; }
  kube_log "$(basename "$f"): all $n objects pass the server-side dry run"
}
t=$(now)
dry_run "$OUT/default.yaml" cinderblock-system
dry_run "$OUT/full.yaml" storage-system
dry_run "$OUT/readme.yaml" cinderblock-system
dry_run "$OUT/readme-objects.yaml" cinderblock-system
kube_log "dry runs in $(since "$t") s"

# ---- the check can fail ---------------------------------------------------------------
# The CSIDriver with a lifecycle mode the API does not know must be refused.
python3 - "$OUT/default.yaml" >"$OUT/broken.yaml" <<'PY'
import sys, yaml
for d in yaml.safe_load_all(open(sys.argv[1])):
    if d and d["kind"] == "CSIDriver":
        d["spec"]["volumeLifecycleModes"] = ["Sometimes"]
        print(yaml.safe_dump(d))
PY
if kubectl apply --dry-run=server -f "$OUT/broken.yaml" >"$OUT/broken.log" 2>&1; then
  cat "$OUT/broken.log" >&2
  kube_die "a CSIDriver with volumeLifecycleModes [Sometimes] passed the dry run: the check checks nothing"
fi
grep -q 'Sometimes' "$OUT/broken.log" || { cat "$OUT/broken.log" >&2; kube_die "unexpected refusal"; }
kube_log "a broken CSIDriver is refused, as it must be"
kube_log "chart check passed in $(since "$t_all") s"
