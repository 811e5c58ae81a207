#!/usr/bin/env bash
# Checkpoints and resume (docs/checkpoints.md): a run killed with SIGKILL (between checkpoints, or in the middle of
# writing one) or stopped by SIGTERM, then started again with the same run directory, must end with the same
# weights, optimizer state and metrics.jsonl records, bit for bit, as a run that was never interrupted. Covered:
# Adam; Shampoo with root_delay 3 (a refresh pending across the checkpoint); EMA, dropout, Mixup, label smoothing
# and gradient accumulation together; an epoch boundary after the resume. Then what a user can get wrong: a changed
# config (refused, naming the key, nothing touched), a damaged newest checkpoint (set aside, the previous one used),
# run.resume "never" and "require", a finished run started again, and checkpoint pruning.
set -u
BIN=${SIMPLEST_BIN:-./simplest-dist}
TMP=${TEST_TMP:-$(mktemp -d)}/resume
PY=${PYTHON:-/usr/bin/python3}
rm -rf "$TMP"
mkdir -p "$TMP"
. "$(dirname "$0")/../fixtures.inc"
fmnist_data
# 16 steps per epoch: 24 steps cross an epoch boundary after every kill point below.
BASE="$DATA --set model.width=custom --set model.dim=32 --set model.heads=2 --set model.mlp_dim=64 --set model.depth=7
  --set model.patch_size=7 --set train.batch_size=64 --set train.steps=24 --set train.log_every=1
  --set data.train_limit=1024 --set data.eval_limit=256 --set train.eval_every=10 --set run.checkpoint_every=4
  --set run.checkpoint_every_s=0 --set run.threads=1"
SHAMPOO="--set opt.name=shampoo --set shampoo.precondition_frequency=5 --set shampoo.start_preconditioning_step=5
  --set shampoo.root_delay=3 --set run.checkpoint_every=3"
RECIPE="--set train.ema=true --set train.ema_every=2 --set model.drop_p=0.1 --set train.grad_accum=2
  --set train.mixup_alpha=0.2 --set train.label_smoothing=0.1"

train() {  # dir log [--set ...]: one run, its exit code
  local dir=$1 log=$2; shift 2
  "$BIN" configs/fashion-mnist.json $BASE "$@" --set run.dir="$dir" > "$log" 2>&1
}

# same A B: the same run, bit for bit (tests/reference/same_run.py); prints "identical" or what differs
same() { "$PY" tests/reference/same_run.py "$1" "$2"; }

status_field() { "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]+'/status.json'))$2)" "$1"; }

# kill_resume NAME KILLVAR STEP EXPECT_FROM [--set ...]: a straight run, and a run killed by SD_FAULT_<KILLVAR>=STEP
# then resumed; the resumed one must continue from checkpoint EXPECT_FROM and equal the straight one.
kill_resume() {
  local name=$1 var=$2 at=$3 from=$4; shift 4
  train "$TMP/$name-straight" "$TMP/$name-straight.log" "$@" || { echo "not ok - $name: straight run failed"; tail -3 "$TMP/$name-straight.log"; return; }
  env "SD_FAULT_$var=$at" "$BIN" configs/fashion-mnist.json $BASE "$@" --set run.dir="$TMP/$name" > "$TMP/$name-1.log" 2>&1
  local rc1=$?
  train "$TMP/$name" "$TMP/$name-2.log" "$@"
  local rc2=$?
  local diff
  diff=$(same "$TMP/$name-straight" "$TMP/$name")
  local resumed
  resumed=$(grep -o "resuming from [^:]*: step [0-9]*" "$TMP/$name-2.log" | grep -o "[0-9]*$")
  local tmps
  tmps=$(ls "$TMP/$name/checkpoints" | grep -c "\.tmp$")
  if [ "$rc1" = 137 ] && [ "$rc2" = 0 ] && [ "$resumed" = "$from" ] && [ "$diff" = identical ] && [ "$tmps" = 0 ] &&
     [ "$(status_field "$TMP/$name" "['resumed_from']")" = "$from" ]; then
    echo "ok - $name: killed ($var $at), resumed from step $from: weights, optimizer state and metrics identical to the uninterrupted run"
  else
    echo "not ok - $name: kill rc $rc1, resume rc $rc2, resumed from '$resumed' (want $from), $diff, $tmps .tmp left"
    tail -3 "$TMP/$name-2.log"
  fi
}

kill_resume adam KILL_AFTER_STEP 10 8
kill_resume shampoo-delay3 KILL_AFTER_STEP 11 10 $SHAMPOO
kill_resume recipe KILL_AFTER_STEP 14 12 $RECIPE
# log_every 3: the checkpoint at 8 cuts the interval 7..9, whose mean the resumed run must log as the uninterrupted
# one does (the interval's sums are in trainer.json)
kill_resume mid-interval KILL_AFTER_STEP 10 8 --set train.log_every=3
# killed with every file of checkpoint 12 written but before DONE: the resume takes 10 (the eval's), and 12 is
# written again
kill_resume in-checkpoint KILL_IN_CHECKPOINT 12 10 $SHAMPOO --set run.checkpoint_every=4

# Pruning: run.keep_checkpoints (2 by default) complete checkpoints remain, and `latest` names the newest.
ls "$TMP/adam-straight/checkpoints" > "$TMP/ls.txt"
if [ "$(grep -c '^step_' "$TMP/ls.txt")" = 2 ] && grep -q '^step_00000024$' "$TMP/ls.txt" &&
   grep -q '^step_00000020$' "$TMP/ls.txt" && [ "$(cat "$TMP/adam-straight/checkpoints/latest")" = step_00000024 ]; then
  echo "ok - the two newest checkpoints are kept and latest names step_00000024"
else
  echo "not ok - checkpoints left: $(tr '\n' ' ' < "$TMP/ls.txt")"
fi

# run.checkpoint_every_s (rank 0's clock, agreed through the per-step flags): a tiny interval checkpoints at every
# step; run.keep_checkpoints 3 leaves the last three, and the run's bits are those of the run that checkpointed less.
train "$TMP/timed" "$TMP/timed.log" --set run.checkpoint_every=0 --set run.checkpoint_every_s=1e-9 --set run.keep_checkpoints=3
rc=$?
left=$(ls "$TMP/timed/checkpoints" | grep '^step_' | tr '\n' ' ')
n=$(grep -c "^checkpoint step" "$TMP/timed.log")
diff=$("$PY" tests/reference/same_run.py --weights-only "$TMP/adam-straight" "$TMP/timed")
if [ "$rc" = 0 ] && [ "$n" = 24 ] && [ "$left" = "step_00000022 step_00000023 step_00000024 " ] && [ "$diff" = identical ]; then
  echo "ok - run.checkpoint_every_s: a checkpoint at each of the 24 steps, the last 3 kept, the same weights"
else
  echo "not ok - run.checkpoint_every_s: rc $rc, $n checkpoints, left: $left, weights $diff"
fi

# SIGTERM (what SLURM sends before a time limit): the run finishes its step, checkpoints, exits 0 with state
# "stopped"; started again it continues to the same bits.
# log_every 7 and an evaluation every step: the stop must add no record (the interval it cuts is saved) and must
# still run the evaluation due at its step
LONG="--set train.steps=400 --set train.eval_every=1 --set data.eval_limit=64 --set train.log_every=7
  --set run.checkpoint_every=50"
train "$TMP/term-straight" "$TMP/term-straight.log" $LONG
"$BIN" configs/fashion-mnist.json $BASE $LONG --set run.dir="$TMP/term" > "$TMP/term-1.log" 2>&1 &
pid=$!
for _ in $(seq 1 600); do [ -f "$TMP/term/checkpoints/step_00000050/DONE" ] && break; sleep 0.02; done
kill -TERM $pid
wait $pid
rc1=$?
state=$(status_field "$TMP/term" "['state']")
stopped_at=$(status_field "$TMP/term" "['step']")
has_ckpt=no
[ -f "$TMP/term/checkpoints/step_$(printf %08d "$stopped_at")/DONE" ] && has_ckpt=yes
train "$TMP/term" "$TMP/term-2.log" $LONG
rc2=$?
diff=$(same "$TMP/term-straight" "$TMP/term")
if [ "$rc1" = 0 ] && [ "$state" = stopped ] && [ "$has_ckpt" = yes ] && [ "$stopped_at" -lt 400 ] && [ "$rc2" = 0 ] &&
   [ "$diff" = identical ]; then
  echo "ok - SIGTERM: exit 0, state stopped at step $stopped_at with its checkpoint; the restart ends identical to the uninterrupted run"
else
  echo "not ok - SIGTERM: rc $rc1, state $state at $stopped_at, checkpoint $has_ckpt, restart rc $rc2, $diff"
fi

# A damaged newest checkpoint (complete, but its optimizer file cut short): a warning names it, it is set aside as
# step_N.unreadable, and the previous checkpoint gives the same final bits.
SD_FAULT_KILL_AFTER_STEP=10 "$BIN" configs/fashion-mnist.json $BASE --set run.dir="$TMP/damaged" > /dev/null 2>&1
truncate -s 1000 "$TMP/damaged/checkpoints/step_00000008/optimizer.safetensors"
train "$TMP/damaged" "$TMP/damaged.log"
rc=$?
diff=$(same "$TMP/adam-straight" "$TMP/damaged")
if [ "$rc" = 0 ] && grep -q "warning: checkpoint .*step_00000008 cannot be loaded: .*optimizer.safetensors" "$TMP/damaged.log" &&
   grep -q "resuming from .*step_00000004" "$TMP/damaged.log" && [ -d "$TMP/damaged/checkpoints/step_00000008.unreadable" ] &&
   [ "$diff" = identical ]; then
  echo "ok - a damaged newest checkpoint is named, set aside, and the previous one resumes to the same bits"
else
  echo "not ok - damaged checkpoint: rc $rc, $diff"; grep -E "warning|resuming|error" "$TMP/damaged.log" | head -3
fi

# A checkpoint whose optimizer state is another step's (Adam's t = 4 in the checkpoint of step 8): refused as
# damaged, and the run resumes from step 4 to the same bits.
SD_FAULT_KILL_AFTER_STEP=10 "$BIN" configs/fashion-mnist.json $BASE --set run.dir="$TMP/wrong-t" > /dev/null 2>&1
cp "$TMP/wrong-t/checkpoints/step_00000004/optimizer.safetensors" "$TMP/wrong-t/checkpoints/step_00000008/"
train "$TMP/wrong-t" "$TMP/wrong-t.log"
rc=$?
diff=$(same "$TMP/adam-straight" "$TMP/wrong-t")
if [ "$rc" = 0 ] && grep -q "step_00000008 cannot be loaded: .*Adam's step count is 4 in a checkpoint of step 8" "$TMP/wrong-t.log" &&
   grep -q "resuming from .*step_00000004" "$TMP/wrong-t.log" && [ "$diff" = identical ]; then
  echo "ok - an optimizer state of another step is refused as damaged; the previous checkpoint resumes to the same bits"
else
  echo "not ok - optimizer state of another step: rc $rc, $diff"; grep -E "warning|resuming" "$TMP/wrong-t.log" | head -3
fi

# A changed config: refused with one line naming the key, exit 2, the run directory untouched. A key that does not
# change training (logging, decoder threads) may differ. (run.threads may differ too, but the CPU backend's sums
# then split differently: the run continues, not to the same bits.)
SD_FAULT_KILL_AFTER_STEP=6 "$BIN" configs/fashion-mnist.json $BASE --set run.dir="$TMP/changed" > /dev/null 2>&1
before=$(cd "$TMP/changed" && find . -type f | sort | xargs md5sum)
train "$TMP/changed" "$TMP/changed.log" --set opt.lr=0.01
rc=$?
after=$(cd "$TMP/changed" && find . -type f | sort | xargs md5sum)
if [ "$rc" = 2 ] && [ "$(wc -l < "$TMP/changed.log")" = 1 ] && grep -q "config key 'opt.lr'" "$TMP/changed.log" &&
   [ "$before" = "$after" ]; then
  echo "ok - a resume with another opt.lr is refused in one line naming the key, exit 2, nothing changed"
else
  echo "not ok - changed config: rc $rc, $(head -c 300 "$TMP/changed.log")"
fi
train "$TMP/changed" "$TMP/changed2.log" --set train.log_every=5 --set data.threads=1 --set data.prefetch=1
rc=$?
diff=$(same "$TMP/adam-straight" "$TMP/changed")
# the log interval changed, so compare weights only: metrics differ in which steps were logged
if [ "$rc" = 0 ] && grep -q "resuming from .*step_00000004" "$TMP/changed2.log" && [ "${diff#differ: metrics.jsonl}" != "$diff" ] &&
   [ "$(echo "$diff" | grep -c safetensors)" = 0 ]; then
  echo "ok - the log interval and the decoder threads may change on resume: same final weights"
else
  echo "not ok - resume with changed log_every/threads: rc $rc, $diff"
fi

# A finished run started again: nothing to do, exit 0; weights, status.json and metrics.jsonl unchanged.
files="$TMP/adam-straight/model.safetensors $TMP/adam-straight/status.json $TMP/adam-straight/metrics.jsonl
  $TMP/adam-straight/checkpoints/step_00000024/optimizer.safetensors"
before=$(md5sum $files)
train "$TMP/adam-straight" "$TMP/again.log"
rc=$?
after=$(md5sum $files)
if [ "$rc" = 0 ] && grep -q "already complete" "$TMP/again.log" && [ "$before" = "$after" ] &&
   [ "$(status_field "$TMP/adam-straight" "['state']")" = done ]; then
  echo "ok - a finished run started again is already complete (exit 0; weights, status and metrics unchanged)"
else
  echo "not ok - finished run again: rc $rc"; tail -2 "$TMP/again.log"
fi

# The last checkpoint cannot be written (SD_FAULT_FAIL_CHECKPOINT=24, as a full disk): exit 1 and state "failed",
# with one error naming the newest complete checkpoint, so that a batch script neither takes the run for done nor
# requeues it in a loop. Started again, it resumes from that checkpoint and finishes.
SD_FAULT_FAIL_CHECKPOINT=24 "$BIN" configs/fashion-mnist.json $BASE --set run.dir="$TMP/lastfail" > "$TMP/lastfail.log" 2>&1
rc=$?
state=$(status_field "$TMP/lastfail" "['state']")
train "$TMP/lastfail" "$TMP/lastfail2.log"
rc2=$?
diff=$(same "$TMP/adam-straight" "$TMP/lastfail")
if [ "$rc" = 1 ] && [ "$state" = failed ] && grep -q "error: the checkpoint of step 24, the run's last, could not be written .*step_00000020" "$TMP/lastfail.log" &&
   [ "$rc2" = 0 ] && grep -q "resuming from .*step_00000020" "$TMP/lastfail2.log" && [ "$diff" = identical ]; then
  echo "ok - a last checkpoint that cannot be written: exit 1, state failed; the restart resumes from step 20 and finishes identical"
else
  echo "not ok - last checkpoint failing: rc $rc, state $state, restart rc $rc2, $diff"; tail -2 "$TMP/lastfail.log"
fi

# run.resume "never": the earlier run is moved aside and training starts over; "require" without a checkpoint fails.
train "$TMP/adam" "$TMP/never.log" --set run.resume=never
rc=$?
if [ "$rc" = 0 ] && [ -d "$TMP/adam.1/checkpoints" ] && ! grep -q resuming "$TMP/never.log" &&
   [ "$(status_field "$TMP/adam" "['resumed_from']")" = None ]; then
  echo "ok - run.resume never moves the earlier run aside and starts over"
else
  echo "not ok - run.resume never: rc $rc"
fi
train "$TMP/empty" "$TMP/require.log" --set run.resume=require
rc=$?
if [ "$rc" = 2 ] && grep -q "run.resume" "$TMP/require.log"; then
  echo "ok - run.resume require without a checkpoint: exit 2 naming the key"
else
  echo "not ok - run.resume require: rc $rc"; cat "$TMP/require.log" | head -3
fi

# eval takes a checkpoint directory: its EMA weights when it has them (what the run evaluated), else its weights.
for d in adam-straight recipe-straight; do
  last="$TMP/$d/checkpoints/$(cat "$TMP/$d/checkpoints/latest")"
  a=$("$BIN" eval "$TMP/$d/config.json" --checkpoint "$last" 2>&1 | grep -o "top-1 .*")
  b=$("$BIN" eval "$TMP/$d/config.json" --checkpoint "$TMP/$d/model.safetensors" 2>&1 | grep -o "top-1 .*")
  if [ -n "$a" ] && [ "$a" = "$b" ]; then
    echo "ok - eval --checkpoint DIR ($d) equals eval of the exported weights: $a"
  else
    echo "not ok - eval --checkpoint DIR ($d): '$a' vs exported '$b'"
  fi
done

# One job per run directory: a second one started while the first runs is refused (exit 75, naming the holder; also
# through a symlink and as "dir/.") and leaves the first alone; once the first has stopped, the same command resumes it.
"$BIN" configs/fashion-mnist.json $BASE --set train.steps=100000 --set run.dir="$TMP/locked" >"$TMP/locked-1.log" 2>&1 &
first=$!
for _ in $(seq 1 600); do [ -f "$TMP/locked/status.json" ] && break; sleep 0.05; done
"$BIN" configs/fashion-mnist.json $BASE --set train.steps=100000 --set run.dir="$TMP/locked" >"$TMP/locked-2.log" 2>&1
rc2=$?
ln -sfn "$TMP/locked" "$TMP/locked-link"  # the same directory under another name, and with a trailing "/."
"$BIN" configs/fashion-mnist.json $BASE --set train.steps=100000 --set run.dir="$TMP/locked-link" >/dev/null 2>&1
rc_link=$?
"$BIN" configs/fashion-mnist.json $BASE --set train.steps=100000 --set run.dir="$TMP/locked/." >/dev/null 2>&1
rc_dot=$?
alive=0; kill -0 $first 2>/dev/null && alive=1
kill -TERM $first; wait $first
rc1=$?
st1=$(status_field "$TMP/locked" "['state']")
timeout 120 "$BIN" configs/fashion-mnist.json $BASE --set train.steps=100000 --set run.dir="$TMP/locked" \
  >"$TMP/locked-3.log" 2>&1 &
third=$!
for _ in $(seq 1 600); do grep -q "resuming from" "$TMP/locked-3.log" && break; sleep 0.05; done
kill -TERM $third; wait $third
if [ "$rc2" = 75 ] && [ "$rc_link" = 75 ] && [ "$rc_dot" = 75 ] && grep -q "is in use by another simplest-dist job (pid $first on " "$TMP/locked-2.log" &&
   [ "$alive" = 1 ] && [ "$rc1" = 0 ] && [ "$st1" = stopped ] && grep -q "resuming from" "$TMP/locked-3.log" &&
   [ ! -e "$TMP/locked.1" ]; then
  echo "ok - a second job on a run directory in use is refused (exit 75) naming the holder; after the first stops, it resumes"
else
  echo "not ok - run directory lock: second rc $rc2 (via a symlink $rc_link, with /. $rc_dot), first alive $alive rc $rc1 state $st1"
  cat "$TMP/locked-2.log" | tail -2; tail -2 "$TMP/locked-3.log"
fi
