#!/usr/bin/env bash
# make bench: every figure measured side by side with its baseline, in one run, one line each:
#   bench: NAME = VALUE UNIT (baseline NAME = VALUE UNIT, ratio R, goal G)
# Host figures first (pure code), then the test-VM figures (real LVM) when BENCH_VM != 0.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== host benches"
cargo bench --quiet --bench scheduler 2>/dev/null | grep '^bench:'
cargo bench --quiet --bench controller 2>/dev/null | grep "^bench:"
# The backup bench compares with zstd | sha256sum, zstd -d | dd and restic (skipped if absent).
for tool in zstd restic; do
  command -v "$tool" >/dev/null ||
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$tool" >/dev/null 2>&1 ||
    echo "bench: note: $tool not installable" >&2
done
cargo bench --quiet --bench backup 2>/dev/null | grep "^bench:"
if [ "${BENCH_VM:-1}" != 0 ] && [ -x tests/e2e/bench-vm.sh ]; then
  echo "== test-VM benches (real LVM and tgt inside a Debian guest)"
  bash tests/e2e/bench-vm.sh | grep '^bench:'
fi
