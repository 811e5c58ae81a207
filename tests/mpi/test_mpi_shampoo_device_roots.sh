#!/usr/bin/env bash
# Shampoo's device-roots path (the CUDA backend's: roots computed into a device broadcast area, broadcast in place,
# status headers read back, roots installed by device copies, a factor snapshot and a side stream under root_delay >= 1)
# run on the CPU backend through tests/unit/device_roots_emu.h (SD_TEST_DEVICE_ROOTS=1), where device memory is host
# memory and each root comes from the host routine:
#  - every case of build/tests/test_shampoo (P1-P13, P18 and the parity with the float64 reference) passes through it;
#  - build/tests/test_shampoo_mpi traces at np = 1 and 3 (uneven ownership; without NCCL the area is staged through
#    the host and broadcast owner by owner) equal the host-roots path's np = 1 traces bit for bit after each of
#    100 steps, for root_delay 0, 1 and 4 and one_d "full" and "adam", and shampoo.apply "owners" (the blocks' steps
#    all-gathered through the host as well), with the replica checks on;
#  - P17 through it: the states those np = 3 runs saved at t = 37 and 50 (pending roots under delay 1 and 4) resumed at
#    np = 2 reproduce the np = 1 trace through t = 100.
# The GPU itself (cuSOLVER roots against LAPACK, NCCL) is checked by tests/gpu/run.sh.
set -u
BUILD=${BUILD:-build}
TMP=${TEST_TMP:-$(mktemp -d)}/shampoo_device_roots
rm -rf "$TMP"
mkdir -p "$TMP/host" "$TMP/dev"
for b in test_shampoo test_shampoo_mpi; do
  if [ ! -x "$BUILD/tests/$b" ]; then echo "not ok - device-roots path: $BUILD/tests/$b is not built"; exit 1; fi
done

SD_TEST_DEVICE_ROOTS=1 "$BUILD/tests/test_shampoo" >"$TMP/unit.log" 2>&1; rc=$?
grep -q "^# every case through Shampoo's device-roots path" "$TMP/unit.log" || echo "not ok - device-roots path: the emulation was not installed"
grep -E '^(not )?ok - ' "$TMP/unit.log" | sed -E 's/^(not )?ok - /&device-roots path: /'
[ $rc != 0 ] && ! grep -q '^not ok - ' "$TMP/unit.log" && { echo "not ok - device-roots path: test_shampoo exit $rc"; tail -n 8 "$TMP/unit.log"; }

if ! command -v mpirun >/dev/null; then
  echo "ok - device-roots path over MPI # SKIP mpirun not installed"
  exit 0
fi
MPI="mpirun --oversubscribe"
[ "$(id -u)" = 0 ] && MPI="$MPI --allow-run-as-root"
export OMPI_MCA_rmaps_base_oversubscribe=1
export SD_SHAMPOO_CHECK=1
timeout 120 $MPI -np 1 "$BUILD/tests/test_shampoo_mpi" trace "$TMP/host" >"$TMP/host.log" 2>&1 ||
  { echo "not ok - device-roots path: the host-roots np = 1 trace failed"; tail -n 8 "$TMP/host.log"; }
for np in 1 3; do
  timeout 120 $MPI -np $np -x SD_TEST_DEVICE_ROOTS=1 "$BUILD/tests/test_shampoo_mpi" trace "$TMP/dev" >"$TMP/dev_np$np.log" 2>&1
  rc=$?
  if [ $rc != 0 ] || ! grep -q "device-roots path (SD_TEST_DEVICE_ROOTS=1)" "$TMP/dev_np$np.log"; then
    echo "not ok - device-roots path at np = $np: exit $rc"; tail -n 8 "$TMP/dev_np$np.log"; continue
  fi
  for v in d0_full d1_full d0_adam d1_adam d0_full_own d1_adam_own d4_full; do
    a="$TMP/host/trace_${v}_np1.txt" b="$TMP/dev/trace_${v}_np$np.txt"
    if [ -s "$a" ] && [ "$(wc -l <"$a")" = 100 ] && cmp -s "$a" "$b"; then
      echo "ok - device-roots path ($v) at np = $np equals the host-roots path at np = 1 bit for bit after each of 100 steps"
    else
      echo "not ok - device-roots path ($v) at np = $np differs from the host-roots path"; diff "$a" "$b" | head -n 4
    fi
  done
done
# P17 through the device path: np = 3's states resumed at np = 2 (test_shampoo_mpi compares with trace_*_np1.txt)
timeout 120 $MPI -np 2 -x SD_TEST_DEVICE_ROOTS=1 "$BUILD/tests/test_shampoo_mpi" resume "$TMP/dev" 3 >"$TMP/resume.log" 2>&1
rc=$?
grep -E '^(not )?ok - ' "$TMP/resume.log" | sed -E 's/^(not )?ok - /&device-roots path: /'
if [ $rc != 0 ] && ! grep -q '^not ok - ' "$TMP/resume.log"; then
  echo "not ok - device-roots path: resume at np = 2 exit $rc"; tail -n 8 "$TMP/resume.log"
fi
