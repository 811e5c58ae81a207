#!/usr/bin/env bash
# Runs every test: the C unit tests (build/tests/test_*), then the shell tests (tests/cli/*.sh, tests/mpi/*.sh).
# Each test program prints TAP-like "ok - name" / "not ok - name" lines; this script counts them and ends with
# "N passed, N failed". A program that crashes or exits non-zero without reporting a failure counts as one failure.
set -u
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
export SIMPLEST_BIN=${SIMPLEST_BIN:-$PWD/simplest-dist}
export TEST_TMP=${TEST_TMP:-$(mktemp -d /tmp/simplest-tests.XXXXXX)}
passed=0; failed=0; failed_names=()
run_one() {
  local name=$1; shift
  local log="$TEST_TMP/$(basename "$name").log" start=$SECONDS
  "$@" >"$log" 2>&1; local rc=$?
  local ok notok
  ok=$(grep -c '^ok - ' "$log"); notok=$(grep -c '^not ok - ' "$log")
  passed=$((passed + ok)); failed=$((failed + notok))
  if [ "$notok" -gt 0 ] || [ "$rc" -ne 0 ]; then
    if [ "$notok" -eq 0 ]; then failed=$((failed + 1)); fi
    failed_names+=("$name")
    echo "FAIL $name (exit $rc, $ok ok, $notok not ok, $((SECONDS - start)) s)"
    grep -v '^ok - ' "$log" | tail -40 | sed 's/^/    /'
  else
    echo "pass $name ($ok cases, $((SECONDS - start)) s)"
  fi
}
for t in "$BUILD"/tests/test_*; do
  [ -x "$t" ] || continue
  run_one "$(basename "$t")" "$t"
done
for t in tests/cli/*.sh tests/mpi/*.sh; do
  [ -f "$t" ] || continue
  run_one "$t" bash "$t"
done
echo
[ ${#failed_names[@]} -gt 0 ] && echo "failed: ${failed_names[*]}"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
