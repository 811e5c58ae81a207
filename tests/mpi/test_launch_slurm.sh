#!/usr/bin/env bash
# The SLURM launch scripts (launch/slurm/*.sbatch) run as SLURM would run them, with stand-ins for srun and
# scontrol (there is no SLURM here): a small Fashion-MNIST run on 2 CPU ranks gets the time-limit signal, stops
# with a checkpoint, and the script requeues the job; the requeued job resumes and finishes, and does not requeue.
#  - imagenet90-mpirun.sbatch: SLURM signals the batch shell (B:USR1); the script's trap forwards it to mpirun.
#  - imagenet90.sbatch: SLURM signals every task (USR1); srun's stand-in is mpirun.
set -u
. "$(dirname "$0")/common.inc"
mpi_setup launch_slurm
mpi_fmnist_data
FAKE="$TMP/bin"
mkdir -p "$FAKE"
printf '#!/bin/sh\necho "$@" >> "%s/scontrol.calls"\n' "$TMP" > "$FAKE/scontrol"
# srun --kill-on-bad-exit=1 PROGRAM ARGS...: the tasks as mpirun ranks
printf '#!/bin/sh\nshift\nexec %s -np "$SLURM_NTASKS" "$@"\n' "$MPI" > "$FAKE/srun"
chmod +x "$FAKE/scontrol" "$FAKE/srun"
ROOT=${DATA#--set data.root=}
[ -n "$ROOT" ] || ROOT=/usr/share/datasets/fashion-mnist
export PATH="$FAKE:$PATH" SLURM_NTASKS=2 SLURM_JOB_ID=4242 CONFIG=configs/fashion-mnist.json DATA="$ROOT"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export EXTRA="--set model.width=custom --set model.dim=32 --set model.heads=2 --set model.mlp_dim=64
  --set model.depth=7 --set model.patch_size=7 --set train.batch_size=48 --set train.steps=400 --set train.log_every=1
  --set train.eval_every=0 --set data.train_limit=960 --set data.eval_limit=300 --set run.threads=1
  --set run.checkpoint_every=40"

status_field() { "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]+'/status.json'))$2)" "$1"; }

# job NAME SCRIPT HOW: one job (signalled at its step-40 checkpoint: HOW "shell" signals the batch shell, "tasks"
# the ranks), then its requeued restart
job() {
  local name=$1 script=$2 how=$3
  export RUN_DIR="$TMP/$name"
  rm -f "$TMP/scontrol.calls"
  bash "$script" > "$TMP/$name-1.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 1500); do [ -f "$RUN_DIR/checkpoints/step_00000040/DONE" ] && break; sleep 0.02; done
  if [ "$how" = shell ]; then kill -USR1 $pid; else pkill -USR1 -f "simplest-dist $CONFIG.*$RUN_DIR"; fi
  wait $pid
  local rc1=$? state1 at calls1
  state1=$(status_field "$RUN_DIR" "['state']")
  at=$(status_field "$RUN_DIR" "['step']")
  calls1=$(cat "$TMP/scontrol.calls" 2>/dev/null)
  rm -f "$TMP/scontrol.calls"
  bash "$script" > "$TMP/$name-2.log" 2>&1
  local rc2=$? state2 calls2
  state2=$(status_field "$RUN_DIR" "['state']")
  calls2=$(cat "$TMP/scontrol.calls" 2>/dev/null)
  if [ "$rc1" = 0 ] && [ "$state1" = stopped ] && [ "$calls1" = "requeue 4242" ] && [ "$rc2" = 0 ] &&
     [ "$state2" = done ] && [ -z "$calls2" ] && grep -q "resuming from .*step_$(printf %08d "$at")" "$TMP/$name-2.log"; then
    echo "ok - $script: signalled ($how), stopped at step $at with a checkpoint, requeued; the restart resumed and finished without requeueing"
  else
    echo "not ok - $script ($how): rc $rc1, state $state1 at $at, scontrol '$calls1'; restart rc $rc2, state $state2, scontrol '$calls2'"
    tail -3 "$TMP/$name-1.log" "$TMP/$name-2.log"
  fi
}
job mpirun launch/slurm/imagenet90-mpirun.sbatch shell
job srun launch/slurm/imagenet90.sbatch tasks
