#!/usr/bin/env bash
# Resume across ranks (docs/checkpoints.md), under mpirun on the CPU:
#  - comm.deterministic with Shampoo (root_delay 1) and dropout: a run at np = 2 killed with SIGKILL, then resumed
#    at np = 3, ends with the weights, optimizer state and metrics of an uninterrupted np = 1 run, bit for bit.
#    Shampoo's owners change with the rank count: each takes its blocks' factors from the checkpoint;
#  - SIGUSR1 to mpirun (which Open MPI forwards to every rank; SIGTERM it turns into killing the job after a short
#    grace, docs/checkpoints.md): every rank stops at the same step, rank 0 writes the checkpoint, the job exits 0,
#    and a restart at np = 2 ends identical to an uninterrupted np = 2 run.
set -u
. "$(dirname "$0")/common.inc"
mpi_setup mpi_resume
mpi_fmnist_data
TINY="--set model.width=custom --set model.dim=32 --set model.heads=2 --set model.mlp_dim=64 --set model.depth=7
  --set model.patch_size=7 --set train.batch_size=48 --set train.steps=24 --set train.log_every=1
  --set train.eval_every=10 --set data.train_limit=960 --set data.eval_limit=300 --set model.drop_p=0.1
  --set run.threads=1 --set run.checkpoint_every=4 --set run.checkpoint_every_s=0 $DATA"
DET="--set comm.deterministic=true --set comm.shards=6 --set opt.name=shampoo --set shampoo.precondition_frequency=5
  --set shampoo.start_preconditioning_step=5 --set shampoo.root_delay=1"
# Eval losses at another world size come from other eval batch sizes (other BLAS blockings of the fp32 logits)
# summed in another grouping: up to 1.4e-9 relative measured, 1e-6 allowed; accuracies and all training are exact.
same() { "$PY" tests/reference/same_run.py --eval-rtol 1e-6 "$1" "$2"; }
status_field() { "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]+'/status.json'))$2)" "$1"; }

timeout 300 "$BIN" configs/fashion-mnist.json $TINY $DET --set run.dir="$TMP/np1" > "$TMP/np1.log" 2>&1
SD_FAULT_KILL_AFTER_STEP=14 timeout 300 $MPI -np 2 "$BIN" configs/fashion-mnist.json $TINY $DET \
  --set run.dir="$TMP/np2to3" > "$TMP/np2to3-1.log" 2>&1
rc1=$?
timeout 300 $MPI -np 3 "$BIN" configs/fashion-mnist.json $TINY $DET --set run.dir="$TMP/np2to3" > "$TMP/np2to3-2.log" 2>&1
rc2=$?
diff=$(same "$TMP/np1" "$TMP/np2to3")
if [ "$rc1" != 0 ] && [ "$rc2" = 0 ] && grep -q "resuming from .*step_00000012: step 12 of 24 (written by 2 ranks, now 3)" "$TMP/np2to3-2.log" &&
   [ "$diff" = identical ]; then
  echo "ok - deterministic Shampoo run killed at np = 2, resumed at np = 3: identical to the uninterrupted np = 1 run"
else
  echo "not ok - np 2 -> 3 resume: kill rc $rc1, resume rc $rc2, $diff"; grep -E "resuming|error" "$TMP/np2to3-2.log" | head -3
fi

# A checkpoint whose write fails on rank 0 only (SD_FAULT_FAIL_CHECKPOINT, right after Shampoo's state, as a full
# disk): every rank must agree that it failed (else rank 0 retries it alone, and the ranks meet in different
# collectives), the partial directory goes, and training goes on to the same bits. At 20, an eval step and a
# checkpoint_every step (the loop would retry at once). At 24, the last step: the finish retries, fails too, and the
# job ends with exit 1 and state "failed" (not "done": a batch script must not take it for finished).
for at in 20 24; do
  SD_FAULT_FAIL_CHECKPOINT=$at timeout 120 $MPI -np 2 "$BIN" configs/fashion-mnist.json $TINY $DET \
    --set run.dir="$TMP/fail$at" > "$TMP/fail$at.log" 2>&1
  rc=$?
  want_rc=0 want_state=done diff=identical
  [ "$at" = 24 ] && want_rc=1 want_state=failed
  [ "$at" = 20 ] && diff=$(same "$TMP/np1" "$TMP/fail$at" 2>&1 | tail -1)
  state=$(status_field "$TMP/fail$at" "['state']")
  if [ "$rc" = "$want_rc" ] && [ "$state" = "$want_state" ] && grep -q "warning: checkpoint of step $at not written" "$TMP/fail$at.log" &&
     [ -z "$(ls "$TMP/fail$at/checkpoints" | grep "step_$(printf %08d $at)")" ] && [ "$diff" = identical ] &&
     { [ "$at" = 20 ] || grep -q "error: the checkpoint of step 24, the run's last, could not be written" "$TMP/fail$at.log"; }; then
    echo "ok - a checkpoint failing on rank 0 only (step $at of 24): no deadlock, no leftovers, exit $rc, state $state"
  else
    echo "not ok - checkpoint failing on rank 0 at step $at: rc $rc, state $state, $diff"; tail -3 "$TMP/fail$at.log"
  fi
done

# A checkpoint that takes rank 0 3 s (SD_FAULT_SLOW_CHECKPOINT) while comm.timeout_s is 1: the other rank waits
# under run.checkpoint_timeout_s instead and the run finishes; with run.checkpoint_timeout_s 1 as well, the job
# ends as hung, the waiting rank naming that key, instead of hanging.
SD_FAULT_SLOW_CHECKPOINT=8 timeout 120 $MPI -np 2 "$BIN" configs/fashion-mnist.json $TINY --set comm.timeout_s=1 \
  --set run.dir="$TMP/slow" > "$TMP/slow.log" 2>&1
rc1=$?
SD_FAULT_SLOW_CHECKPOINT=8 timeout 120 $MPI -np 2 "$BIN" configs/fashion-mnist.json $TINY --set comm.timeout_s=1 \
  --set run.checkpoint_timeout_s=1 --set run.dir="$TMP/slow-hung" > "$TMP/slow-hung.log" 2>&1
rc2=$?
if [ "$rc1" = 0 ] && [ "$(status_field "$TMP/slow" "['state']")" = done ] && [ "$rc2" != 0 ] && [ "$rc2" != 124 ] &&
   grep -q "rank 1 waited .* (run.checkpoint_timeout_s)" "$TMP/slow-hung.log"; then
  echo "ok - a checkpoint slower than comm.timeout_s: the ranks wait under run.checkpoint_timeout_s (done); past that, the job ends naming the waiting rank (exit $rc2)"
else
  echo "not ok - slow checkpoint: rc $rc1 (want 0, done), with checkpoint_timeout_s 1 rc $rc2"; tail -2 "$TMP/slow.log" "$TMP/slow-hung.log"
fi

LONG="--set train.steps=300 --set train.eval_every=0 --set run.checkpoint_every=40"
timeout 300 $MPI -np 2 "$BIN" configs/fashion-mnist.json $TINY $LONG --set run.dir="$TMP/term-straight" > "$TMP/term-straight.log" 2>&1
timeout 300 $MPI -np 2 "$BIN" configs/fashion-mnist.json $TINY $LONG --set run.dir="$TMP/term" > "$TMP/term-1.log" 2>&1 &
pid=$!
for _ in $(seq 1 1500); do [ -f "$TMP/term/checkpoints/step_00000040/DONE" ] && break; sleep 0.02; done
# timeout runs mpirun as its child; signal mpirun itself
mp=$(pgrep -P $pid mpirun)
kill -USR1 "${mp:-$pid}"
wait $pid
rc1=$?
state=$(status_field "$TMP/term" "['state']")
at=$(status_field "$TMP/term" "['step']")
timeout 300 $MPI -np 2 "$BIN" configs/fashion-mnist.json $TINY $LONG --set run.dir="$TMP/term" > "$TMP/term-2.log" 2>&1
rc2=$?
diff=$(same "$TMP/term-straight" "$TMP/term")
if [ "$rc1" = 0 ] && [ "$state" = stopped ] && [ "$at" -lt 300 ] &&
   [ "$rc2" = 0 ] && grep -q "resuming from .*step_$(printf %08d "$at")" "$TMP/term-2.log" && [ "$diff" = identical ]; then
  echo "ok - SIGUSR1 to mpirun: both ranks stop at step $at, exit 0 with its checkpoint; the np = 2 restart ends identical"
else
  echo "not ok - SIGUSR1 under mpirun: rc $rc1, state $state at $at, restart rc $rc2, $diff"; tail -3 "$TMP/term-1.log"
fi

# model.init_from at np = 2: rank 0 reads the file, every rank takes its bits. At lr 0 nothing moves, so the exported
# weights are the file's trainable tensors bit for bit, and a busy run directory stops the whole job with 75.
timeout 300 $MPI -np 2 "$BIN" configs/fashion-mnist.json $TINY --set opt.lr=0 --set train.steps=2 \
  --set model.init_from="$TMP/term/model.safetensors" --set run.dir="$TMP/init2" > "$TMP/init2.log" 2>&1
rc=$?
if [ "$rc" = 0 ] && "$PY" - "$TMP/term/model.safetensors" "$TMP/init2/model.safetensors" <<'PYEOF'
import sys, numpy as np; sys.path.insert(0, "tests/reference"); import st
a, _ = st.load(sys.argv[1]); b, _ = st.load(sys.argv[2])
sys.exit(0 if all(np.array_equal(a[k], b[k]) for k in a if not k.endswith((".d", ".B"))) else 1)
PYEOF
then
  echo "ok - init_from at np = 2: at lr 0 the exported weights are the file's tensors bit for bit"
else
  echo "not ok - init_from at np = 2: rc $rc"; grep -E "init_from|error" "$TMP/init2.log" | tail -3
fi
flock -n "$TMP/.init2.lock" sleep 30 &
holder=$!
sleep 0.3
timeout 120 $MPI -np 2 "$BIN" configs/fashion-mnist.json $TINY --set run.dir="$TMP/init2" > "$TMP/busy2.log" 2>&1
rc=$?
kill $holder 2>/dev/null; wait $holder 2>/dev/null
if [ "$rc" = 75 ] && grep -q "is in use by another simplest-dist job" "$TMP/busy2.log"; then
  echo "ok - a busy run directory at np = 2: the whole job ends with 75"
else
  echo "not ok - busy run directory at np = 2: rc $rc"; tail -3 "$TMP/busy2.log"
fi
