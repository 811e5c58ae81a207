#!/usr/bin/env bash
# CPU training-step benchmark against PyTorch (Debian python3-torch), same machine, same run, same model, batch and
# threads: the issue's reference point (28x28x1, patch 4, D 128, depth 8, 4 heads, MLP 256, batch 256; forward +
# backward + clip + Adam), for both models. See tests/bench/compare.py. Usage: tests/bench/run.sh [rounds]
set -eu
cd "$(dirname "$0")/../.."
BUILD=${BUILD:-build}
PY=${PYTHON:-/usr/bin/python3}
CORE=$(OPENBLAS_VERBOSE=2 "$BUILD/bench/bench_step" --steps 1 --warmup 0 --batch 8 2>&1 | sed -n 's/^Core: //p' | tail -1)
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); OpenBLAS core $CORE; $(date -u +%F)"
exec "$PY" tests/bench/compare.py --build "$BUILD" --rounds "${1:-3}" --core "$CORE"
