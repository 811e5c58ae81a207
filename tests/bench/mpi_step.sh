#!/usr/bin/env bash
# CPU data-parallel step time at np = 1 and np = 2 on this machine, and the share of the gradient all-reduce that
# the overlap hides behind backward: 1 - (exposed wait with overlap) / (all-reduce time without overlap).
# Fashion-MNIST, the issue's reference model (patch 4, D 128, depth 8, MLP 256), global batch 256.
# Usage: tests/bench/mpi_step.sh [steps]
set -eu
cd "$(dirname "$0")/../.."
STEPS=${1:-30}
PY=${PYTHON:-/usr/bin/python3}
MPI="mpirun --oversubscribe"
[ "$(id -u)" = 0 ] && MPI="$MPI --allow-run-as-root"
TMP=$(mktemp -d)
ARGS="--set model.patch_size=4 --set train.steps=$STEPS --set train.log_every=10 --set train.eval_every=0
  --set data.eval_limit=256 --set train.warmup_steps=5"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(date -u +%F); $STEPS steps"
run() {  # name np extra...   (np 1 runs without mpirun, so that it may use every core)
  local name=$1 np=$2; shift 2
  local launch="$MPI -np $np"
  [ "$np" = 1 ] && launch=""
  $launch ./simplest-dist configs/fashion-mnist.json $ARGS --set run.dir="$TMP/$name" "$@" > "$TMP/$name.log" 2>&1
  "$PY" - "$TMP/$name/metrics.jsonl" "$name" "$np" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if "train/loss" in l]
a, b = rows[0], rows[-1]  # time from the first log line on: warm-up excluded
steps = b["step"] - a["step"]
ms = 1e3 * (b["time_s"] - a["time_s"]) / steps
wait = 1e3 * (b["allreduce_wait_s"] - a["allreduce_wait_s"]) / steps
skew = 1e3 * (b["skew_wait_s"] - a["skew_wait_s"]) / steps
print(f"RESULT {sys.argv[2]}: np={sys.argv[3]} {ms:.0f} ms/step, {256e3 / ms:.0f} img/s, gradient-sum wait "
      f"{wait:.2f} ms/step (of which waiting for the slower rank {skew:.2f})")
open(sys.argv[1] + ".wait", "w").write(f"{wait} {skew}")
PYEOF
}
run np1 1
run np2_overlap 2
run np2_blocking 2 --set comm.overlap=false
"$PY" -c "
on, _ = map(float, open('$TMP/np2_overlap/metrics.jsonl.wait').read().split())
off, skew = map(float, open('$TMP/np2_blocking/metrics.jsonl.wait').read().split())
pure = off - skew
hidden = 1 - max(0.0, on - skew) / pure if pure > 0 else float('nan')
print(f'RESULT hidden: all-reduce alone {pure:.1f} ms/step; with overlap {on:.1f} ms/step exposed, less {skew:.1f} of '
      f'rank skew: {100 * hidden:.0f}% of the all-reduce hidden behind backward')"
rm -rf "$TMP"
