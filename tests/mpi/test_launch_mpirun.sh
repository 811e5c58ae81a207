#!/usr/bin/env bash
# launch/mpirun.sh, the single-machine launcher, on 2 CPU ranks with a small Fashion-MNIST run:
#  - without -n it starts one rank per GPU in CUDA_VISIBLE_DEVICES (here two names, no GPU: the CPU backend);
#  - a rank killed (SIGKILL) after a checkpoint: the job is restarted, resumes, finishes, and equals the
#    uninterrupted run bit for bit;
#  - SIGTERM to the launcher: every rank checkpoints, state "stopped", exit 0, no restart; the next start resumes and
#    again equals the uninterrupted run;
#  - Ctrl-C (SIGINT to the whole process group) stops it cleanly too; a hung job (a frozen rank) is killed after
#    --hang-timeout and restarted;
#  - a crash loop that gains no checkpoint gives up after --restarts; a failed run (state "failed") and a bad config
#    (exit 2) are not restarted.
set -u
. "$(dirname "$0")/common.inc"
mpi_setup launch_mpirun
mpi_fmnist_data
L=launch/mpirun.sh
export SIMPLEST_BIN="$BIN"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
ARGS=(configs/fashion-mnist.json $DATA --set model.width=custom --set model.dim=32 --set model.heads=2
  --set model.mlp_dim=64 --set model.depth=7 --set model.patch_size=7 --set train.batch_size=48 --set train.steps=240
  --set train.log_every=1 --set train.eval_every=0 --set data.train_limit=960 --set data.eval_limit=300
  --set run.threads=1 --set run.checkpoint_every=40)
state() { "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]+'/status.json'))['state'])" "$1" 2>/dev/null; }
wait_for() { for _ in $(seq 1 3000); do [ -e "$1" ] && return 0; sleep 0.02; done; return 1; }
starts() { grep -c '^launch: start ' "$1"; }
rank_pid() { "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]+'/status.json'))['ranks'][$2]['pid'])" "$1"; }

# the uninterrupted run, ranks from CUDA_VISIBLE_DEVICES
CUDA_VISIBLE_DEVICES=0,1 bash $L "${ARGS[@]}" --set run.dir="$TMP/ref" >"$TMP/ref.log" 2>&1
rc=$?
if [ "$rc" = 0 ] && [ "$(state "$TMP/ref")" = done ] && grep -q '^launch: start 1: mpirun -np 2 --bind-to none' "$TMP/ref.log" &&
   [ "$(starts "$TMP/ref.log")" = 1 ]; then
  echo "ok - one rank per GPU named in CUDA_VISIBLE_DEVICES (2), --bind-to none; the run finishes in one start"
else
  echo "not ok - launcher's uninterrupted run (exit $rc)"; tail -5 "$TMP/ref.log"
fi

# a rank dies after the step-80 checkpoint
bash $L -n 2 --restart-delay 0 "${ARGS[@]}" --set run.dir="$TMP/crash" >"$TMP/crash.log" 2>&1 &
lp=$!
wait_for "$TMP/crash/checkpoints/step_00000080/DONE"
victim=$(rank_pid "$TMP/crash" 1)
kill -KILL "$victim"
wait $lp
rc=$?
diff=$("$PY" tests/reference/same_run.py "$TMP/ref" "$TMP/crash")
if [ "$rc" = 0 ] && [ "$(starts "$TMP/crash.log")" = 2 ] && [ "$(state "$TMP/crash")" = done ] &&
   grep -q "resuming from .*step_000000[89]0" "$TMP/crash.log" && [ "$diff" = identical ]; then
  echo "ok - a rank killed after a checkpoint: restarted, resumed, finished, identical to the uninterrupted run"
else
  echo "not ok - rank killed: exit $rc, $(starts "$TMP/crash.log") starts, state $(state "$TMP/crash"), $diff"
  grep -E "^launch|resuming|error" "$TMP/crash.log" | tail -8
fi

# SIGTERM to the launcher: a clean stop, then a second launch resumes
bash $L -n 2 --restart-delay 0 "${ARGS[@]}" --set run.dir="$TMP/stop" >"$TMP/stop-1.log" 2>&1 &
lp=$!
wait_for "$TMP/stop/checkpoints/step_00000040/DONE"
kill -TERM $lp
wait $lp
rc1=$?
st1=$(state "$TMP/stop")
bash $L -n 2 --restart-delay 0 "${ARGS[@]}" --set run.dir="$TMP/stop" >"$TMP/stop-2.log" 2>&1
rc2=$?
diff=$("$PY" tests/reference/same_run.py "$TMP/ref" "$TMP/stop")
if [ "$rc1" = 0 ] && [ "$st1" = stopped ] && [ "$(starts "$TMP/stop-1.log")" = 1 ] && [ "$rc2" = 0 ] &&
   [ "$(state "$TMP/stop")" = done ] && grep -q "resuming from" "$TMP/stop-2.log" && [ "$diff" = identical ]; then
  echo "ok - SIGTERM to the launcher: every rank checkpointed and stopped (exit 0, no restart); the next launch resumed to the same bits"
else
  echo "not ok - SIGTERM: exit $rc1 state $st1, restart exit $rc2, $diff"; grep -E "^launch|error" "$TMP/stop-1.log" "$TMP/stop-2.log" | tail -8
fi

# Ctrl-C in a terminal: SIGINT to the launcher's whole process group. The job runs in its own session, so only the
# launcher gets it and turns it into SIGUSR1 (mpirun would kill the ranks on a SIGINT of its own): exit 0, stopped.
# (started as a terminal's foreground job would be: its own process group, SIGINT at its default action; a
# script's background job, or anything under a background `make test`, inherits SIGINT ignored, which bash cannot
# trap)
"$PY" -c 'import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.setpgid(0, 0); os.execvp(sys.argv[1], sys.argv[1:])' \
  bash $L -n 2 --restart-delay 0 "${ARGS[@]}" --set run.dir="$TMP/ctrlc" >"$TMP/ctrlc.log" 2>&1 &
lp=$!
wait_for "$TMP/ctrlc/checkpoints/step_00000040/DONE"
kill -INT -- -"$lp"
wait $lp
rc=$?
if [ "$rc" = 0 ] && [ "$(state "$TMP/ctrlc")" = stopped ] && [ "$(starts "$TMP/ctrlc.log")" = 1 ] &&
   grep -q "^launch: stopped: exit 0, state stopped" "$TMP/ctrlc.log" &&
   ! pgrep -f "run.dir=$TMP/ctrlc" >/dev/null; then
  echo "ok - Ctrl-C (SIGINT to the process group): only the launcher gets it; every rank checkpointed and stopped, exit 0"
else
  echo "not ok - Ctrl-C: exit $rc, state $(state "$TMP/ctrlc")"; grep -E "^launch|error" "$TMP/ctrlc.log" | tail -5
fi

# a stop 0.2 s after the start (mpirun has not started the ranks, which would drop the signal or die of it):
# the launcher forwards it once the job is up, and again until it ends; the run stops cleanly after its first steps
bash $L -n 2 --restart-delay 0 "${ARGS[@]}" --set train.steps=100000 --set run.dir="$TMP/early" >"$TMP/early.log" 2>&1 &
lp=$!
for _ in $(seq 1 500); do grep -q "^launch: start 1" "$TMP/early.log" && break; sleep 0.01; done
sleep 0.2
kill -TERM $lp
wait $lp
rc=$?
if [ "$rc" = 0 ] && [ "$(state "$TMP/early")" = stopped ] && [ "$(starts "$TMP/early.log")" = 1 ]; then
  echo "ok - a stop 0.2 s after the start: forwarded once the job is up, a clean stop (exit 0, state stopped)"
else
  echo "not ok - an early stop: exit $rc, state $(state "$TMP/early")"; grep -E "^launch|error|signal" "$TMP/early.log" | tail -4
fi

# a stop while the launcher still checks the config: nothing is started, exit 0
bash $L -n 2 "${ARGS[@]}" --set run.dir="$TMP/prestart" >"$TMP/prestart.log" 2>&1 &
lp=$!
sleep 0.05
kill -TERM $lp
wait $lp
rc=$?
if [ "$rc" = 0 ] && grep -q "stopped before start 1" "$TMP/prestart.log" && [ ! -e "$TMP/prestart" ]; then
  echo "ok - a stop before the first start: nothing started, exit 0"
else
  echo "not ok - a stop before the first start: exit $rc"; tail -3 "$TMP/prestart.log"
fi

# a hung job: rank 1 frozen (SIGSTOP) after a checkpoint, with comm.timeout_s far away; status.json stops changing,
# --hang-timeout 4 kills the whole job (the frozen rank too) and the restart resumes and finishes to the same bits
bash $L -n 2 --restart-delay 0 --hang-timeout 4 "${ARGS[@]}" --set comm.timeout_s=600 --set run.status_every_s=1 \
  --set run.dir="$TMP/hang" >"$TMP/hang.log" 2>&1 &
lp=$!
wait_for "$TMP/hang/checkpoints/step_00000080/DONE"
victim=$(rank_pid "$TMP/hang" 1)
kill -STOP "$victim"
wait $lp
rc=$?
diff=$("$PY" tests/reference/same_run.py "$TMP/ref" "$TMP/hang" 2>&1)
if [ "$rc" = 0 ] && grep -q "the job is hung, killing it" "$TMP/hang.log" && [ "$(starts "$TMP/hang.log")" = 2 ] &&
   [ "$(state "$TMP/hang")" = done ] && ! kill -0 "$victim" 2>/dev/null && [ "$diff" = identical ]; then
  echo "ok - a hung job (a frozen rank) is killed whole after --hang-timeout and restarted; it resumes and finishes to the uninterrupted run's bits"
else
  echo "not ok - hung job: exit $rc, $(starts "$TMP/hang.log") starts, state $(state "$TMP/hang"), $diff"
  grep -E "^launch|error" "$TMP/hang.log" | tail -6
  kill -KILL "$victim" 2>/dev/null
fi

# run.resume "never" on the command line: the first start moves an earlier run aside, a restart after a crash must
# continue this run (not move it aside and start over)
mkdir -p "$TMP/never" && cp -r "$TMP/ref/." "$TMP/never/"
bash $L -n 2 --restart-delay 0 "${ARGS[@]}" --set run.resume=never --set run.dir="$TMP/never" >"$TMP/never.log" 2>&1 &
lp=$!
for _ in $(seq 1 3000); do [ -f "$TMP/never/checkpoints/step_00000080/DONE" ] && [ -f "$TMP/never.1/status.json" ] && break; sleep 0.02; done
victim=$(rank_pid "$TMP/never" 1)
kill -KILL "$victim"
wait $lp
rc=$?
diff=$("$PY" tests/reference/same_run.py "$TMP/ref" "$TMP/never")
if [ "$rc" = 0 ] && [ "$(starts "$TMP/never.log")" = 2 ] && [ -d "$TMP/never.1" ] && [ ! -e "$TMP/never.2" ] &&
   grep -q "start 2: .*--set run.resume=auto" "$TMP/never.log" && [ "$diff" = identical ]; then
  echo "ok - run.resume never: the first start moves the earlier run aside, the restart after a crash resumes this one"
else
  echo "not ok - resume never and a restart: exit $rc, $(starts "$TMP/never.log") starts, $diff"; ls -d "$TMP"/never*
fi

# a status.json left by an earlier run ("failed") says nothing about a start that dies before writing its own: a
# stand-in binary that validates the config and then exits 1 is restarted until --restarts runs out
mkdir -p "$TMP/stale" "$TMP/fake"
echo '{"schema": "simplest-dist-status-1", "state": "failed", "updated_unix": 1000}' >"$TMP/stale/status.json"
printf '#!/bin/sh
[ "$1" = check ] && exec %s "$@"
exit 1
' "$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")" >"$TMP/fake/sd"
chmod +x "$TMP/fake/sd"
SIMPLEST_BIN="$TMP/fake/sd" bash $L -n 1 --restarts 1 --restart-delay 0 "${ARGS[@]}" --set run.dir="$TMP/stale" \
  >"$TMP/stale.log" 2>&1
rc=$?
if [ "$rc" = 1 ] && [ "$(starts "$TMP/stale.log")" = 2 ] && grep -q "giving up" "$TMP/stale.log"; then
  echo "ok - an earlier run's status.json (state failed) does not stop the restarts of a start that dies before its own"
else
  echo "not ok - stale status.json: exit $rc, $(starts "$TMP/stale.log") starts"; grep "^launch" "$TMP/stale.log" | tail -3
fi

# stand-in binaries (validating with the real one): FAKE_MODE picks what a start does
REAL="$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")"
cat >"$TMP/fake/sd2" <<EOF2
#!/bin/bash
[ "\$1" = check ] && exec "$REAL" "\$@"
n=\$(( \$(cat "$TMP/fake/count" 2>/dev/null || echo 0) + 1 )); echo \$n >"$TMP/fake/count"
case "\$FAKE_MODE:\$n" in
  early:1) exit 1 ;;                       # dies in its setup, before it takes the run directory over
  done-hang:*) mkdir -p "\$RUN"; printf '{"schema": "simplest-dist-status-1", "state": "done", "updated_unix": %s}' \$(date +%s) >"\$RUN/status.json"
               exec sleep 1000 ;;          # wrote its final state, then hangs in its teardown
esac
exec "$REAL" "\$@"
EOF2
chmod +x "$TMP/fake/sd2"

# a first start that dies before taking the run directory over keeps the user's run.resume never for the restart:
# the finished run in the directory is moved aside and a new one trained (not "already complete")
rm -f "$TMP/fake/count"; mkdir -p "$TMP/never2" && cp -a "$TMP/ref/." "$TMP/never2/"  # -a: the old files keep their times
FAKE_MODE=early SIMPLEST_BIN="$TMP/fake/sd2" bash $L -n 1 --restart-delay 0 "${ARGS[@]}" --set run.resume=never \
  --set run.dir="$TMP/never2" >"$TMP/never2.log" 2>&1
rc=$?
if [ "$rc" = 0 ] && [ "$(starts "$TMP/never2.log")" = 2 ] && [ -d "$TMP/never2.1" ] && [ "$(state "$TMP/never2")" = done ] &&
   ! grep -q "run.resume=auto" "$TMP/never2.log"; then
  echo "ok - a start that died before taking the run directory over: the restart keeps run.resume never (a new run)"
else
  echo "not ok - early death with resume never: exit $rc, $(starts "$TMP/never2.log") starts"; grep -E "^launch|complete" "$TMP/never2.log" | tail -4
fi

# a job that wrote "done" and hangs in its teardown is killed, and the launcher ends as done (exit 0, no restart)
rm -f "$TMP/fake/count"
RUN="$TMP/donehang" FAKE_MODE=done-hang SIMPLEST_BIN="$TMP/fake/sd2" timeout 60 bash $L -n 1 --restart-delay 0 \
  --hang-timeout 3 "${ARGS[@]}" --set run.dir="$TMP/donehang" >"$TMP/donehang.log" 2>&1
rc=$?
if [ "$rc" = 0 ] && grep -q "state done, limit 3 s): the job is hung, killing it" "$TMP/donehang.log" &&
   [ "$(starts "$TMP/donehang.log")" = 1 ] && grep -q "finished: exit .*, state done" "$TMP/donehang.log"; then
  echo "ok - a job hung in its teardown after writing done is killed; the launcher ends as done (exit 0)"
else
  echo "not ok - teardown hang: exit $rc"; grep "^launch" "$TMP/donehang.log" | tail -4
fi

# the run directory's lock: another job holds it. At the first start the launcher ends with 75 (no second job); at a
# restart (a crash, the old ranks' lock not yet free) it waits and tries again
lockf="$TMP/.busy.lock"
flock -n "$lockf" sleep 4 &
holder=$!
sleep 0.5
bash $L -n 1 --restart-delay 0 "${ARGS[@]}" --set run.dir="$TMP/busy" >"$TMP/busy1.log" 2>&1
rc1=$?
wait $holder
rm -f "$TMP/fake/count"
flock -n "$lockf" sleep 8 &
holder=$!
sleep 0.5
FAKE_MODE=early SIMPLEST_BIN="$TMP/fake/sd2" bash $L -n 1 --restart-delay 1 --restarts 10 "${ARGS[@]}" \
  --set run.dir="$TMP/busy" >"$TMP/busy2.log" 2>&1
rc2=$?
wait $holder
if [ "$rc1" = 75 ] && [ "$(starts "$TMP/busy1.log")" = 1 ] && grep -q "in use by another job (exit 75)" "$TMP/busy1.log" &&
   [ "$rc2" = 0 ] && grep -q "the job ended with exit 75" "$TMP/busy2.log" && [ "$(state "$TMP/busy")" = done ]; then
  echo "ok - a busy run directory: 75 at the first start; at a restart the launcher waits for the lock and goes on"
else
  echo "not ok - busy run directory: first $rc1, restart case $rc2"; grep "^launch" "$TMP/busy1.log" "$TMP/busy2.log" | tail -6
fi

# ranks from CUDA_VISIBLE_DEVICES as CUDA counts them (up to the first invalid entry), or from nvidia-smi
printf '#!/bin/sh
for i in 0 1 2 3; do echo "GPU $i: Stand-in (UUID: GPU-$i)"; done
' >"$TMP/fake/nvidia-smi"
chmod +x "$TMP/fake/nvidia-smi"
np_of() { "$@" bash $L --dry-run "${ARGS[@]}" 2>&1 | sed -n 's/^mpirun -np \([0-9]*\) .*/\1/p'; }
got="$(np_of env CUDA_VISIBLE_DEVICES=) $(np_of env CUDA_VISIBLE_DEVICES=-1) $(np_of env CUDA_VISIBLE_DEVICES=0,-1,2)"
got="$got $(np_of env CUDA_VISIBLE_DEVICES=0,,1) $(np_of env CUDA_VISIBLE_DEVICES=2,0,1) $(np_of env CUDA_VISIBLE_DEVICES=GPU-aa,GPU-bb)"
got="$got $(np_of env -u CUDA_VISIBLE_DEVICES PATH="$TMP/fake:$PATH") $(np_of env CUDA_VISIBLE_DEVICES=0,1 NP=5)"
if [ "$got" = "1 1 1 1 3 2 4 5" ]; then
  echo "ok - ranks: CUDA_VISIBLE_DEVICES counted as CUDA does ('', -1, 0,-1,2, 0,,1, 2,0,1, UUIDs), else nvidia-smi, else NP"
else
  echo "not ok - rank counts: got '$got', want '1 1 1 1 3 2 4 5'"
fi

# a crash loop: every start dies at step 50, after the step-40 checkpoint; the second start gains nothing
SD_FAULT_KILL_AFTER_STEP=50 bash $L -n 2 --restarts 1 --restart-delay 0 "${ARGS[@]}" --set run.dir="$TMP/loop" \
  >"$TMP/loop.log" 2>&1
rc=$?
if [ "$rc" = 1 ] && [ "$(starts "$TMP/loop.log")" = 3 ] && grep -q "giving up: 2 starts in a row" "$TMP/loop.log" &&
   [ -f "$TMP/loop/checkpoints/step_00000040/DONE" ]; then
  echo "ok - a crash loop gives up after --restarts starts without a new checkpoint (exit 1), the checkpoint kept"
else
  echo "not ok - crash loop: exit $rc, $(starts "$TMP/loop.log") starts"; grep "^launch" "$TMP/loop.log" | tail -5
fi

# not restarted: a failed run (its final checkpoint cannot be written) and a bad config
SD_FAULT_FAIL_CHECKPOINT=240 bash $L -n 2 --restart-delay 0 "${ARGS[@]}" --set run.dir="$TMP/failed" >"$TMP/failed.log" 2>&1
rc=$?
if [ "$rc" = 1 ] && [ "$(state "$TMP/failed")" = failed ] && [ "$(starts "$TMP/failed.log")" = 1 ]; then
  echo "ok - a run that ends in state failed is not restarted (exit 1)"
else
  echo "not ok - failed run: exit $rc, state $(state "$TMP/failed"), $(starts "$TMP/failed.log") starts"
fi
bash $L -n 2 "${ARGS[@]}" --set run.dir="$TMP/bad" --set train.clip=-1 >"$TMP/bad.log" 2>&1
rc=$?
if [ "$rc" = 2 ] && grep -q "train.clip" "$TMP/bad.log" && ! grep -q "^launch: start" "$TMP/bad.log" && [ ! -e "$TMP/bad" ]; then
  echo "ok - a bad config stops the launcher before any start, naming the key (exit 2)"
else
  echo "not ok - bad config: exit $rc"; cat "$TMP/bad.log"
fi
