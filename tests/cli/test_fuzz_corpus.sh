#!/usr/bin/env bash
# Every file of tests/fuzz/corpus/<target>/ (the seeds of each reader, and every input a fuzzer once found failing,
# named bug_*) through its fuzz target, built with gcc + ASan/UBSan (make fuzz-bins; docs/fuzzing.md). A reader
# must refuse bad bytes with one line or skip the image: a crash, a sanitizer report (leaks included), an exit or a
# broken property of the target fails the case.
set -u
cd "$(dirname "$0")/../.."
BIN=${FUZZ_BIN:-build-asan/fuzz}
if ! ls "$BIN"/fuzz_* >/dev/null 2>&1; then
  make -s fuzz-bins >/dev/null 2>&1 || { echo "not ok - fuzz targets build (make fuzz-bins)"; exit 1; }
fi
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0:exitcode=86}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export OPENBLAS_NUM_THREADS=1  # no BLAS worker threads still alive at exit, where ASan sometimes reported a signal
log=$(mktemp)
for dir in tests/fuzz/corpus/*/; do
  t=$(basename "$dir")
  n=$(ls "$dir" | wc -l)
  bugs=$(ls "$dir" | grep -c '^bug_')
  if [ ! -x "$BIN/$t" ]; then echo "not ok - fuzz corpus $t: no binary $BIN/$t"; continue; fi
  if timeout 300 "$BIN/$t" "$dir" >"$log" 2>&1; then
    echo "ok - fuzz corpus $t: $n inputs ($bugs once failing) pass under ASan/UBSan"
  else
    echo "not ok - fuzz corpus $t: $(grep -E '^input ' "$log" | tail -1)"
    grep -v '^input ' "$log" | tail -25 | sed 's/^/    /'
  fi
done
rm -f "$log"
