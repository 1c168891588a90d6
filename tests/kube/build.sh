#!/bin/bash
# Build kube-apiserver and kube-controller-manager v1.20.2 from Debian's source package
# `kubernetes` with Debian's Go, once, into $CB_CACHE/kube-v1.20.2/.
#
#   tests/kube/build.sh          build unless the cached binaries are there (then ~0 s)
#   tests/kube/build.sh --force  rebuild
#
# No prebuilt Kubernetes binary can be downloaded on our machines; Debian bookworm ships
# the complete v1.20.2 tree (vendor/ included) and golang-go 1.19 builds it. One patch:
# the vendored github.com/modern-go/reflect2 v1.0.1 reads runtime internals that changed
# in Go 1.18 and crashes (SIGSEGV in reflect2.unsafeMapIterNext) on the first write of a
# custom resource; its files are replaced by Debian's golang-github-modern-go-reflect2-dev
# (1.0.2, same API, fixed). A cold build takes 5-15 minutes on 2 cores; it runs under
# `nice` so that it does not starve the other work on the machine.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

FORCE=0
case ${1:-} in --force) FORCE=1 ;; "") ;; *) kube_die "usage: build.sh [--force]" ;; esac

BINS=(kube-apiserver kube-controller-manager)
# Bump when the recipe below changes (patches, flags): cached binaries of another revision
# are rebuilt.
BUILD_REV=3
have_all() {
  local b
  for b in "${BINS[@]}"; do [ -x "$KUBE_BIN/$b" ] || return 1; done
  [ "$(cat "$KUBE_BIN/build-rev" 2>/dev/null)" = "$BUILD_REV" ] || return 1
  "$KUBE_BIN/kube-apiserver" --version 2>/dev/null | grep -qx "Kubernetes $KUBE_VERSION"
}
# One build at a time: a second caller waits for the first and then finds the cache.
mkdir -p "$CB_CACHE"
exec 9>"$CB_CACHE/kube-build.lock"
if ! flock -n 9; then
  kube_log "another build is running: waiting for it"
  flock 9
fi
if [ $FORCE = 0 ] && have_all; then
  kube_log "cached: $KUBE_BIN ($("$KUBE_BIN/kube-apiserver" --version))"
  exit 0
fi

# rsync and jq: the tree's own hack/ scripts (code generation) use them.
kube_apt_install golang-go golang-github-modern-go-reflect2-dev etcd-server dpkg-dev openssl python3 \
  rsync jq make
command -v kubectl >/dev/null || kube_die "kubectl is not installed (the test bed uses the host's)"

start=$(now)
work=$CB_CACHE/kube-build
# Each phase's wall and CPU time, printed as it ends and kept beside the binaries: a build
# on a busy machine shows a long wall time for the same CPU time.
phase_times=$work/phase-times
mkdir -p "$work" && : >"$phase_times"
timed() {  # LABEL COMMAND...
  local label=$1 TIMEFORMAT rc=0
  shift
  TIMEFORMAT="$label: %R s wall, %U s user, %S s sys"
  { time "$@" 2>&3; } 3>&2 2>>"$phase_times" || rc=$?
  kube_log "$(tail -n 1 "$phase_times")"
  return $rc
}
make_openapi() {
  (cd "$tree" && GOCACHE=$work/gocache GOFLAGS='' nice -n 10 make gen_openapi) >"$work/gen-openapi.log" 2>&1
}
mkdir -p "$work/src"

# ---- the source package, through a private apt state with deb-src -----------------------
# The host's apt sources have no deb-src lines; rather than edit them, point apt at a
# sources list and a lists directory of our own (only for this download).
if ! ls "$work"/src/kubernetes_*.dsc >/dev/null 2>&1; then
  apt_dir=$work/apt
  mkdir -p "$apt_dir/lists/partial"
  cat >"$apt_dir/sources.list" <<SRC
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
SRC
  apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::State::Lists=$apt_dir/lists" -o "APT::Sandbox::User=root")
  kube_log "downloading the Debian source package kubernetes"
  apt-get "${apt_opts[@]}" update -q >/dev/null
  (cd "$work/src" && apt-get "${apt_opts[@]}" source --download-only -q kubernetes >/dev/null)
fi
dsc=$(ls "$work"/src/kubernetes_*.dsc | head -1)
tree=$work/tree
if [ ! -f "$tree/.unpacked" ]; then
  rm -rf "$tree"
  kube_log "unpacking $(basename "$dsc")"
  dpkg-source --no-check -x "$dsc" "$tree" >/dev/null
  touch "$tree/.unpacked"
fi
grep -q "^module k8s.io/kubernetes" "$tree/go.mod" || kube_die "$tree/go.mod is not Kubernetes'"
[ -d "$tree/vendor/github.com/modern-go/reflect2" ] || kube_die "no vendored reflect2 in $tree"

# ---- reflect2 1.0.2 over the vendored 1.0.1 -------------------------------------------
fixed=/usr/share/gocode/src/github.com/modern-go/reflect2
[ -f "$fixed/reflect2.go" ] || kube_die "$fixed missing (golang-github-modern-go-reflect2-dev)"
vend=$tree/vendor/github.com/modern-go/reflect2
rm -rf "$vend"
mkdir -p "$vend"
# Only the package's Go sources and assembly (the Debian package ships tests too).
find "$fixed" -maxdepth 1 -type f \( -name '*.go' -o -name '*.s' \) ! -name '*_test.go' \
  -exec cp {} "$vend/" \;
kube_log "vendored reflect2 replaced by Debian's $(dpkg-query -W -f '${Version}' golang-github-modern-go-reflect2-dev)"

# ---- generated code ----------------------------------------------------------------------
# The OpenAPI definitions (pkg/generated/openapi) are not in the source tree: upstream's
# Makefile generates them before every build (Debian's package builds only kubectl, through
# the same Makefile). Run that one generator the upstream way.
if [ ! -f "$tree/pkg/generated/openapi/zz_generated.openapi.go" ]; then
  t=$(now)
  rm -f "$tree/_output/bin/openapi-gen" # a failed earlier run leaves an empty stamp file
  timed "openapi-gen" make_openapi ||
    { tail -n 30 "$work/gen-openapi.log" >&2; kube_die "make gen_openapi failed (log: $work/gen-openapi.log)"; }
fi

# ---- go build --------------------------------------------------------------------------
# Kubernetes 1.20 builds in GOPATH mode (its hack/lib/init.sh sets GO111MODULE=off; in
# module mode Go 1.19 asks for go.mod updates that -mod=vendor forbids), with vendor/
# (whose k8s.io/* entries link into staging/) resolved under $GOPATH/src/k8s.io/kubernetes.
out=$work/out
rm -rf "$out" && mkdir -p "$out" "$work/gopath/src/k8s.io"
ln -sfn "$tree" "$work/gopath/src/k8s.io/kubernetes"
# The version, as upstream's hack/lib/version.sh stamps it: `--version` reads
# component-base's copy, the API server's /version client-go's.
ldflags="-s -w"
for ver_pkg in k8s.io/kubernetes/vendor/k8s.io/component-base/version \
  k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version; do
  ldflags+=" -X $ver_pkg.gitVersion=$KUBE_VERSION -X $ver_pkg.gitMajor=1"
  ldflags+=" -X $ver_pkg.gitMinor=$(echo "$KUBE_VERSION" | cut -d. -f2)"
  ldflags+=" -X $ver_pkg.gitTreeState=clean -X $ver_pkg.buildDate=1970-01-01T00:00:00Z"
done
export GOPATH=$work/gopath GOCACHE=$work/gocache GO111MODULE=off CGO_ENABLED=0 GOFLAGS=
kube_log "$(go version): building ${BINS[*]} (nice, $(nproc) cores)"
# `providerless`: without the in-tree cloud providers (AWS, Azure, GCE, OpenStack, vSphere
# SDKs), which a test control plane never uses; upstream's KUBE_PROVIDERLESS sets the
# same tag. It leaves out about a third of the packages to compile.
go_build() {
  (cd "$GOPATH/src/k8s.io/kubernetes" &&
    nice -n 10 go build -tags providerless -trimpath -ldflags "$ldflags" -o "$out/$1" "k8s.io/kubernetes/cmd/$1")
}
for b in "${BINS[@]}"; do
  timed "go build $b" go_build "$b"
done
"$out/kube-apiserver" --version | grep -qx "Kubernetes $KUBE_VERSION" ||
  kube_die "built kube-apiserver reports '$("$out/kube-apiserver" --version)'"

echo "$BUILD_REV" >"$out/build-rev"
cp "$phase_times" "$out/phase-times"
since "$start" >"$out/build-seconds" # from the source download to linked binaries
# Atomic publish: a reader sees the old directory or the complete new one.
rm -rf "$KUBE_BIN.new" && mv "$out" "$KUBE_BIN.new"
rm -rf "$KUBE_BIN.old"
[ -d "$KUBE_BIN" ] && mv "$KUBE_BIN" "$KUBE_BIN.old"
mv "$KUBE_BIN.new" "$KUBE_BIN" && rm -rf "$KUBE_BIN.old"
# The tree and the Go build cache are big (~3 GB); the binaries are all we keep.
rm -rf "$tree" "$GOCACHE" "$GOPATH"
kube_log "built in $(cat "$KUBE_BIN/build-seconds") s (a cold build when nothing of kube-build/ was left): $KUBE_BIN"
