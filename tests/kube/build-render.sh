#!/bin/bash
# Build chart-render (tests/kube/render/main.go): a Helm-compatible chart renderer made
# from Debian's Go packages only (helm is not packaged in Debian). Offline, GOPATH mode over
# /usr/share/gocode; cached under $CB_CACHE/chart-render-<hash of the source and the
# package versions>. Prints the binary's path.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

pkgs=(golang-go golang-github-masterminds-sprig-dev golang-github-ghodss-yaml-dev)
kube_apt_install "${pkgs[@]}"
key=$({ cat "$CB_KUBE/render/main.go"; dpkg-query -W -f '${Package} ${Version}\n' "${pkgs[@]}"; } |
  sha256sum | cut -c1-16)
dir=$CB_CACHE/chart-render-$key
if [ ! -x "$dir/chart-render" ]; then
  tmp=$(mktemp -d "$CB_CACHE/chart-render.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  mkdir -p "$tmp/gopath/src/chart-render"
  cp "$CB_KUBE/render/main.go" "$tmp/gopath/src/chart-render/"
  # GOPATH mode: Debian's -dev packages live in /usr/share/gocode/src, at paths without
  # the /vN of their module (sprig/v3, semver/v3): link each such module under its import
  # path in our own GOPATH entry.
  while read -r gomod; do
    d=$(dirname "$gomod")
    mod=$(awk '$1 == "module" { print $2; exit }' "$gomod")
    case $mod in */v[0-9]*) ;; *) continue ;; esac
    [ "/usr/share/gocode/src/$mod" = "$d" ] && continue
    mkdir -p "$tmp/gopath/src/$(dirname "$mod")"
    ln -sfn "$d" "$tmp/gopath/src/$mod"
  done < <(find /usr/share/gocode/src -maxdepth 4 -name go.mod)
  (cd "$tmp/gopath/src/chart-render" &&
    GO111MODULE=off GOPATH="$tmp/gopath:/usr/share/gocode" GOCACHE="$tmp/cache" GOFLAGS='' \
      CGO_ENABLED=0 nice -n 10 go build -o "$tmp/chart-render" .) >&2
  mkdir -p "$tmp/out" && mv "$tmp/chart-render" "$tmp/out/"
  rm -rf "$dir" && mv "$tmp/out" "$dir"
  kube_log "chart-render built into $dir"
fi
echo "$dir/chart-render"
