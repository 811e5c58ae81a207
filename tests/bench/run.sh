#!/usr/bin/env bash
# CPU training-step benchmark: simplest-dist against PyTorch (Debian python3-torch) on the same machine, in the same
# run, with the same model, batch and thread count (the issue's reference point: 28x28x1, patch 4, D 128, depth 8,
# 4 heads, MLP 256, batch 256; forward + backward + clip + Adam). PyTorch is timed twice, with OpenBLAS's own CPU
# detection and with OPENBLAS_CORETYPE set to the kernel simplest-dist uses, and the faster peer is the one compared.
# Usage: tests/bench/run.sh [steps]   (env THREADS, default: all cores)
set -u
cd "$(dirname "$0")/../.."
BUILD=${BUILD:-build}
STEPS=${1:-8}
THREADS=${THREADS:-$(nproc)}
PY=${PYTHON:-/usr/bin/python3}
CORE=$(OPENBLAS_VERBOSE=2 "$BUILD/bench/bench_step" --steps 1 --warmup 0 --batch 8 2>&1 | sed -n 's/^Core: //p' | tail -1)
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); threads $THREADS; OpenBLAS core $CORE"
ARGS="--image 28 --patch 4 --channels 1 --dim 128 --depth 8 --heads 4 --mlp 256 --classes 10 --batch 256"
for arch in simplest simplevit; do
  ours=$("$BUILD/bench/bench_step" --arch $arch $ARGS --steps "$STEPS" --warmup 2 --threads "$THREADS")
  echo "$ours"
  best=""
  if "$PY" -c "import torch" 2>/dev/null; then
    for core in "" "$CORE"; do
      peer=$(OPENBLAS_CORETYPE=$core "$PY" tests/bench/torch_step.py --arch $arch $ARGS --steps "$STEPS" --warmup 2 --threads "$THREADS")
      echo "$peer  (OPENBLAS_CORETYPE=${core:-unset})"
      ms=$(echo "$peer" | "$PY" -c "import json,sys; print(json.load(sys.stdin)['ms_per_step'])")
      if [ -z "$best" ] || "$PY" -c "import sys; sys.exit(0 if $ms < $best else 1)"; then best=$ms; fi
    done
    our_ms=$(echo "$ours" | "$PY" -c "import json,sys; print(json.load(sys.stdin)['ms_per_step'])")
    "$PY" -c "print('ratio $arch: simplest-dist is %.2fx faster than PyTorch (%.0f ms vs %.0f ms per step)' % ($best/$our_ms, $our_ms, $best))"
  else
    echo "PyTorch not installed (apt-get install python3-torch): no peer measured"
  fi
done
