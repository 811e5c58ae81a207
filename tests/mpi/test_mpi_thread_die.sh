#!/usr/bin/env bash
# A fatal error on a thread other than the main one (a loader worker, a Shampoo root thread, the NCCL-setup
# watchdog) ends the whole job at np = 2, naming the rank, while that rank's main thread waits inside MPI. MPI runs
# at MPI_THREAD_FUNNELED, so such a thread calls no MPI (no MPI_Abort); its process's exit must still stop the
# peer. build/tests/test_util --mpi-thread-die: rank 1 fails 0.3 s in, on a helper thread, inside a barrier that
# rank 0 never joins (no timeout), and rank 0 sleeps 60 s: only the failure can end the job.
set -u
. "$(dirname "$0")/common.inc"
mpi_setup mpi_thread_die
BIN=${BUILD:-build}/tests/test_util
if [ ! -x "$BIN" ]; then echo "not ok - mpi thread die: $BIN is not built"; exit 1; fi
for kind in die user watchdog; do
  t0=$(date +%s.%N)
  timeout 50 $MPI -np 2 "$BIN" --mpi-thread-die $kind >"$TMP/$kind.log" 2>&1
  rc=$?
  secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  case $kind in
    die) want="internal error (rank 1) at .*planted failure on a helper thread" ;;
    user) want="error (rank 1): planted user error on a helper thread" ;;
    watchdog) want="rank 1: a planted hang did not finish within 0.3 s (test.timeout_s)" ;;
  esac
  if [ $rc != 0 ] && [ $rc != 124 ] && [ $rc != 3 ] && grep -q "$want" "$TMP/$kind.log" &&
     awk -v s="$secs" 'BEGIN { exit !(s < 30) }'; then
    echo "ok - mpi thread die ($kind): the job ends in $secs s with exit $rc, naming rank 1"
  else
    echo "not ok - mpi thread die ($kind): exit $rc after $secs s (124 = the job outlived the failure)"
    tail -n 6 "$TMP/$kind.log"
  fi
done
