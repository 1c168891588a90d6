# Step runner for scenarios. Sourced (after lib.sh), never run.
#   step LABEL VM CMD    runs CMD in guest VM, prints one timed line; on failure prints the
#                        output and returns non-zero. Output stays in $STEP_OUT.
#   show TEXT            prints TEXT indented under the last step
VM=$CB_E2E/vm
STEP_OUT=
SCENARIO_T0=$(now)

step() {
  local label=$1 vm=$2 cmd=$3 t rc err
  t=$(now)
  err=$(mktemp)
  STEP_OUT=$("$VM" exec "$vm" "$cmd" 2>"$err") && rc=0 || rc=$?
  printf '  %-6s %-52s %6.2fs %s\n' "[$vm]" "$label" "$(since "$t")" \
    "$([ $rc = 0 ] && echo ok || echo "FAILED rc=$rc")"
  if [ $rc != 0 ]; then
    sed 's/^/         | /' <<<"$STEP_OUT"
    sed 's/^/         ! /' "$err"
  fi
  rm -f "$err"
  return $rc
}

show() { sed 's/^/         = /' <<<"$*"; }
