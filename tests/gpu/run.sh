#!/usr/bin/env bash
# tests/gpu/run.sh: the one-shot GPU check of the CUDA backend (issue 4; docs/gpu-validation.md). One command,
# under 8 minutes on one H100/H200, no network needed:
#   0. environment facts (GPU, driver, nvcc, PyTorch, where the CUDA libraries are);
#   1. build: make USE_MPI=0 -j16 gpu-bins, against the .debs of vendor-debs/ (from `make vendor-debs`) unpacked
#      with dpkg -x into /tmp/sd-deps (never into /) when that folder exists; cuBLAS/cuSOLVER/NCCL from the CUDA
#      toolkit, else from pip's nvidia-* packages (NCCL: nvidia-nccl-cu13);
#   2. build/gpu/test_cuda: every op, and a whole training step of both models in both init modes, CUDA against the
#      CPU backend, with per-tensor bf16 tolerances, and Shampoo (cuSOLVER roots against LAPACK, trajectories
#      against the CPU: spec/shampoo.md P19) (one process per group: a crash loses one group only);
#   3. 300 Fashion-MNIST steps on the GPU, loss and accuracy against a CPU run of the same config
#      (tests/gpu/fixtures/fmnist_cpu_300.jsonl);
#   4. benchmark: bench_step --device cuda for SimplEsT-ViT-S/16 and SimpleViT-S/16 at 224 px, batch 256, fused
#      attention; PyTorch (tests/gpu/torch_bench.py, the reference models) with torch.compile; images/s and MFU
#      (tests/gpu/flops.py);
#   4b. Shampoo@25 against Adam (bench_step --opt, cuSOLVER roots);
#   3b. the NCCL path at np = 1 (tests/gpu/nccl_np1.sh: gradient sums and Shampoo root broadcasts through a one-rank
#      NCCL communicator change no bit);
#   then, as time allows, our unfused attention, PyTorch eager, and the experimental stages;
#   5. one report, $OUT/gpu-report.md (tests/out/ when OUT is unset), and a summary table printed last.
# The stages run in the order of what a short machine must not lose: a stage that would start past the deadline is
# skipped and reported.
# Every stage runs under `timeout`; a failing stage is reported and the script goes on. Exit code 0 when the build,
# the op/step checks outside the fused attention and the Fashion-MNIST tracking passed, else 1.
#
# Knobs (environment): SD_GPU_HARD_S (default 470: no stage runs past it, so the script ends inside 8 minutes),
# SD_GPU_BUDGET_S (default 360: the optional SDPA stage starts only before it), SD_GPU_WORK (logs,
# default /tmp/sd-gpu), SD_COMMIT (the commit to name in the report when there is no .git), SD_SKIP_TORCH=1,
# SD_TORCH_SDPA=1 (also PyTorch with F.scaled_dot_product_attention, compiled, if time is left), SD_FMNIST_DIR.
set -u
cd "$(dirname "$0")/../.." || exit 2
ROOT=$(pwd)
OUTDIR=${OUT:-$ROOT/tests/out}
mkdir -p "$OUTDIR"
W=${SD_GPU_WORK:-/tmp/sd-gpu}
rm -rf "$W" && mkdir -p "$W"
DEPS=/tmp/sd-deps
BUILD=build-gpu
BUDGET=${SD_GPU_BUDGET_S:-360}
HARD=${SD_GPU_HARD_S:-470}
PY=python3
T0=$(date +%s)
elapsed() { echo $(($(date +%s) - T0)); }
left() { echo $((BUDGET - $(elapsed))); }

# stage NAME TIMEOUT CMD...: runs CMD with a timeout; log in $W/NAME.log, exit code in NAME.rc, seconds in NAME.secs.
# A stage never runs past the hard deadline (HARD seconds after the start), so the whole script ends within it;
# the report is rewritten and the stage's files are copied to $OUT/gpu-logs/ after every stage ($W does not come
# back from a lent machine), so a run killed from outside still leaves both.
stage() {
    local name=$1 to=$2
    shift 2
    local t=$(date +%s) rest=$((HARD - $(elapsed)))
    if [ "$rest" -lt 15 ]; then
        skip "$name" "past the ${HARD}s hard deadline"
        return 1
    fi
    [ "$to" -gt "$rest" ] && to=$rest
    echo "== [$(elapsed)s] $name (timeout ${to}s)"
    timeout -k 10 "$to" "$@" >"$W/$name.log" 2>&1
    local rc=$?
    echo "$rc" >"$W/$name.rc"
    echo $(($(date +%s) - t)) >"$W/$name.secs"
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && echo "   TIMED OUT after ${to}s" | tee -a "$W/$name.log"
    echo "   rc=$rc in $(cat "$W/$name.secs")s"
    tail -n 3 "$W/$name.log" | cut -c1-200 | sed 's/^/   | /'
    $PY tests/gpu/report.py "$W" "$OUTDIR/gpu-report.md" >/dev/null 2>&1
    keep_logs "$name"
    return "$rc"
}
keep_logs() {  # keep_logs NAME: the stage's log (its last 2 MB), rc and seconds into $OUT/gpu-logs/
    mkdir -p "$OUTDIR/gpu-logs"
    tail -c 2000000 "$W/$1.log" >"$OUTDIR/gpu-logs/$1.log" 2>/dev/null
    cp "$W/$1.rc" "$W/$1.secs" "$OUTDIR/gpu-logs/" 2>/dev/null
    return 0
}
skip() {  # skip NAME REASON
    echo "== [$(elapsed)s] $1 skipped: $2"
    echo "skipped: $2" >"$W/$1.log"
    echo skip >"$W/$1.rc"
    keep_logs "$1"
}

# ---- 0. environment
# Why the PyTorch stages are skipped, or "" (importing torch takes seconds: asked once).
NO_TORCH=""
if [ "${SD_SKIP_TORCH:-0}" = 1 ]; then NO_TORCH="SD_SKIP_TORCH=1"
elif ! $PY -c 'import torch' >/dev/null 2>&1; then NO_TORCH="no PyTorch for $PY"; fi
# A bare node may lack make: `make vendor-debs` carries this machine's (it needs only glibc).
command -v make >/dev/null 2>&1 || { [ -x vendor-debs/bin/make ] && export PATH="$PATH:$ROOT/vendor-debs/bin"; }
if ! command -v nvcc >/dev/null 2>&1; then
    for d in ${CUDA_HOME:-} /usr/local/cuda; do [ -n "$d" ] && [ -x "$d/bin/nvcc" ] && export PATH="$d/bin:$PATH" && break; done
fi
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "commit: ${SD_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}$(git diff --quiet HEAD 2>/dev/null || echo ' (+ uncommitted changes, or no .git)')"
    echo "host: $(uname -srm), $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)"
    echo "glibc: $(ldd --version 2>/dev/null | head -1)"
    echo "cc: $(cc --version 2>/dev/null | head -1); make: $(command -v make || echo 'MISSING: the build stage cannot run')"
    echo "--- nvidia-smi -L"
    nvidia-smi -L 2>&1 | head -4
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv 2>&1 | head -3
    echo "--- nvcc: $(command -v nvcc || echo 'not found')"
    nvcc --version 2>&1 | tail -2
    echo "--- python3: $(command -v $PY) $($PY --version 2>&1)"
    $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' 2>&1 | tail -1
    echo "--- CUDA libraries"
    NVCC_BIN=$(command -v nvcc || true)
    CUDA_DIR=${NVCC_BIN%/bin/nvcc}
    for l in cudart cublas cublasLt cusolver nccl; do
        echo "lib$l: $(ls "$CUDA_DIR"/lib64/lib$l.so* "$CUDA_DIR"/targets/x86_64-linux/lib/lib$l.so* 2>/dev/null | head -2 | tr '\n' ' ')"
    done
    echo "pip nvidia libs: $($PY -c 'import site, glob; print(" ".join(sorted({p for s in site.getsitepackages() for p in glob.glob(s + "/nvidia/*/lib")})))' 2>/dev/null)"
    echo "ldconfig: $(ldconfig -p 2>/dev/null | grep -E 'lib(nccl|cublas|cjson|openblas|lapacke|gfortran)\.so' | awk '{print $1}' | sort -u | tr '\n' ' ')"
    echo "vendor-debs: $(ls vendor-debs/*.deb 2>/dev/null | wc -l) .debs, $(du -sh vendor-debs 2>/dev/null | cut -f1)"
} >"$W/env.txt" 2>&1
cat "$W/env.txt"

# ---- 1. build
EXTRA_CFLAGS=${EXTRA_CFLAGS:-}
EXTRA_LDFLAGS=${EXTRA_LDFLAGS:-}
LIBDIRS=""
{
    if ls vendor-debs/*.deb >/dev/null 2>&1; then
        rm -rf "$DEPS"
        flags=$(tests/gpu/unpack-debs.sh vendor-debs "$DEPS") || echo "unpack-debs failed"
        EXTRA_CFLAGS="$EXTRA_CFLAGS $(echo "$flags" | sed -n 's/^EXTRA_CFLAGS=//p')"
        EXTRA_LDFLAGS="$EXTRA_LDFLAGS $(echo "$flags" | sed -n 's/^EXTRA_LDFLAGS=//p')"
        LIBDIRS=$(echo "$flags" | sed -n 's/^LIBDIRS=//p')
        # pkg-config must not mix in the node's own packages: the Makefile then uses -lcjson -lopenblas -llapacke -lz
        mkdir -p "$DEPS/no-pkgconfig"
        export PKG_CONFIG_LIBDIR="$DEPS/no-pkgconfig"
        echo "vendored: $(ls vendor-debs/*.deb | wc -l) .debs unpacked into $DEPS"
    else
        echo "no vendor-debs/: building against the node's own packages"
    fi
    # CUDA libraries the Makefile links (-L$CUDA/lib64 -lcudart -lcublas -lcublasLt -lcusolver -lnccl): where the
    # toolkit lacks one (NCCL often), link the copy of pip's nvidia-* packages through a lib<name>.so symlink.
    NVCC_BIN=$(command -v nvcc || true)
    CUDA_DIR=${NVCC_BIN%/bin/nvcc}
    mkdir -p "$DEPS/cudalibs"
    pipdirs=$($PY -c 'import site, glob; print(" ".join(sorted({p for s in site.getsitepackages() for p in glob.glob(s + "/nvidia/*/lib") + glob.glob(s + "/nvidia/cu*/lib")})))' 2>/dev/null)
    NCCL_LIB=0
    # NCCL's header: the toolkit's, else pip's nvidia-nccl-cu13, whose library is then preferred (the same version);
    # without both a header and a library the build has no NCCL, and the np = 1 NCCL stage says so.
    NCCL_USE=0; NCCL_PIPLIB=""
    if [ -e "$CUDA_DIR/include/nccl.h" ]; then
        NCCL_USE=1; echo "nccl.h: $CUDA_DIR/include"
    else
        for d in $pipdirs; do
            if [ -e "$d/../include/nccl.h" ]; then
                NCCL_USE=1; NCCL_PIPLIB=$d
                EXTRA_CFLAGS="$EXTRA_CFLAGS -I$(cd "$d/../include" && pwd)"; echo "nccl.h: $d/../include"; break
            fi
        done
    fi
    [ "$NCCL_USE" = 1 ] || echo "nccl.h: NOT FOUND (building without NCCL)"
    for l in cudart cublas cublasLt cusolver nccl; do
        f=""
        [ $l = nccl ] && [ -n "$NCCL_PIPLIB" ] && f=$(ls "$NCCL_PIPLIB"/libnccl.so* 2>/dev/null | head -1)
        if [ -z "$f" ] && [ -e "$CUDA_DIR/lib64/lib$l.so" ]; then
            [ $l = nccl ] && NCCL_LIB=1
            continue
        fi
        [ -z "$f" ] && f=$(ls "$CUDA_DIR"/targets/x86_64-linux/lib/lib$l.so* /usr/lib/x86_64-linux-gnu/lib$l.so* 2>/dev/null | head -1)
        [ -z "$f" ] && for d in $pipdirs; do f=$(ls "$d"/lib$l.so* 2>/dev/null | head -1); [ -n "$f" ] && break; done
        if [ -n "$f" ]; then
            ln -sfn "$f" "$DEPS/cudalibs/lib$l.so"
            [ $l = nccl ] && NCCL_LIB=1
            EXTRA_LDFLAGS="$EXTRA_LDFLAGS -Wl,-rpath,$(dirname "$f")"
            echo "lib$l: $f (linked through $DEPS/cudalibs)"
        else
            echo "lib$l: NOT FOUND (the link will fail if the backend needs it)"
        fi
    done
    EXTRA_LDFLAGS="$EXTRA_LDFLAGS -L$DEPS/cudalibs"
    if [ "$NCCL_USE" = 1 ] && [ "$NCCL_LIB" != 1 ]; then
        NCCL_USE=0; echo "NCCL: a header but no library: building without NCCL (the link would fail)"
    fi
    echo "NCCL_USE=$NCCL_USE" >"$W/nccl_use.txt"
    echo "EXTRA_CFLAGS=$EXTRA_CFLAGS"
    echo "EXTRA_LDFLAGS=$EXTRA_LDFLAGS"
} >"$W/build-setup.txt" 2>&1
cat "$W/build-setup.txt" | sed 's/^/   /' | cut -c1-220
# No LD_LIBRARY_PATH: the RPATH finds the vendored libraries ($LIBDIRS), and PyTorch keeps the node's own zlib.
# Only the GPU that is here (sm_90 for H100/H200): half the nvcc time of CI's sm_80 + sm_90 build.
CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
NVFLAGS="-O3 -std=c++17 -gencode arch=compute_${CAP:-90},code=sm_${CAP:-90}"
NCCL_USE=$(sed -n 's/^NCCL_USE=//p' "$W/nccl_use.txt" 2>/dev/null); NCCL_USE=${NCCL_USE:-0}
# A failed build must not leave an earlier call's binaries (a warm machine) to be run and reported as this commit's.
rm -f ./simplest-dist $BUILD/gpu/test_cuda $BUILD/bench/bench_step $BUILD/gpu/bench_ops
stage build 300 make USE_CUDA=1 USE_MPI=0 USE_NCCL=$NCCL_USE BUILD=$BUILD -j16 NVCCFLAGS="$NVFLAGS" EXTRA_CFLAGS="$EXTRA_CFLAGS" EXTRA_LDFLAGS="$EXTRA_LDFLAGS" gpu-bins
{ ldd ./simplest-dist; echo "--- test_cuda"; ldd $BUILD/gpu/test_cuda | grep -E 'not found|cjson|openblas|lapack|blas|gfortran|quadmath|libz|cuda|cublas|nccl|cusolver'; } >"$W/ldd.txt" 2>&1

# ---- 2. every op and a whole step against the CPU backend
if [ -x $BUILD/gpu/test_cuda ]; then
    for g in ops attn fused optim step shampoo; do
        # shampoo: about 10,500 cuSOLVER roots in its trajectories plus root timings up to n = 1024, never yet timed
        # on a GPU (its log prints the time of each section)
        to=90; [ $g = shampoo ] && to=180
        stage "test_cuda_$g" $to $BUILD/gpu/test_cuda --group $g
    done
else
    for g in ops attn fused optim step shampoo; do skip "test_cuda_$g" "no build/gpu/test_cuda (the build failed)"; done
fi

# ---- 2b. optional: where the step's time goes (SD_GPU_PROFILE=1): every backend op timed with CUDA events
# (bench_step with SD_CUDA_PROFILE=1; the stream is serialized while measured, so the total exceeds a real step).
if [ "${SD_GPU_PROFILE:-0}" = 1 ] && [ -x $BUILD/bench/bench_step ]; then
    for arch in simplest simplevit; do
        for attn in unfused fused; do
            stage "profile_${arch}_${attn}" 60 env SD_CUDA_PROFILE=1 $BUILD/bench/bench_step --device cuda --attn $attn \
                --arch $arch --image 224 --patch 16 --channels 3 --dim 384 --depth 12 --heads 6 --mlp 1536 \
                --classes 1000 --batch 256 --steps 5 --warmup 1
        done
    done
fi
# ... and the heavy ops one by one at the ViT-S/16 shapes, ours (cuBLASLt, then cublasGemmEx) and PyTorch's.
if [ "${SD_GPU_PROFILE:-0}" = 1 ] && [ -x $BUILD/gpu/bench_ops ]; then
    stage bench_ops 60 $BUILD/gpu/bench_ops --device cuda
    stage bench_ops_nolt 60 env SD_LT=0 $BUILD/gpu/bench_ops --device cuda
    [ -z "$NO_TORCH" ] && stage torch_ops 90 $PY tests/gpu/torch_ops.py
fi
# SD_GPU_QUICK=1: the build, the checks and the profile only (no Fashion-MNIST, no benchmarks).
if [ "${SD_GPU_QUICK:-0}" = 1 ]; then
    $PY tests/gpu/report.py "$W" "$OUTDIR/gpu-report.md" >/dev/null 2>&1
    for f in "$W"/profile_*.log; do [ -f "$f" ] && { echo "--- $f"; grep -v '^{' "$f"; }; done
    for f in "$W"/bench_ops*.log "$W"/torch_ops.log; do [ -f "$f" ] && { echo "--- $f"; grep '^{' "$f" | cut -c1-150; }; done
    echo "quick run: $(elapsed)s"
    exit 0
fi

# ---- 3. Fashion-MNIST: 300 steps on the GPU against the CPU run in tests/gpu/fixtures
FM=${SD_FMNIST_DIR:-}
[ -z "$FM" ] && for d in vendor-debs/fashion-mnist /usr/share/datasets/fashion-mnist; do
    [ -e "$d/train-images-idx3-ubyte.gz" ] && FM=$d && break
done
if [ ! -x ./simplest-dist ]; then
    skip fmnist_gpu "no ./simplest-dist (the build failed)"
elif [ -z "$FM" ]; then
    skip fmnist_gpu "no Fashion-MNIST files (vendor-debs/fashion-mnist or SD_FMNIST_DIR)"
else
    stage fmnist_gpu 150 ./simplest-dist configs/fashion-mnist.json --set run.device=cuda --set train.steps=300 \
        --set train.log_every=10 --set train.eval_every=150 --set data.root="$FM" --set run.dir="$W/fm-gpu"
fi

# ---- 4b. Shampoo@25 against Adam on one GPU (cuSOLVER roots), between torch.compile and eager
# (SD_GPU_SHAMPOO_BENCH=0 skips it). delay24: the roots of a refresh computed on the side streams behind 24 steps
# (docs/scaling.md: how much the side streams slow the training stream they overlap, the one unmeasured input of the
# 8xH100 model), before delay 1, which the others bracket.
shampoo_bench() {
    [ "${SD_GPU_SHAMPOO_BENCH:-1}" = 1 ] && [ -x $BUILD/bench/bench_step ] || return 0
    local v a
    for v in adam shampoo shampoo_delay24 shampoo_delay1; do
        case $v in
            adam) a="--opt adam" ;; shampoo) a="--opt shampoo" ;; shampoo_delay1) a="--opt shampoo --root-delay 1" ;;
            shampoo_delay24) a="--opt shampoo --root-delay 24" ;;
        esac
        stage "shampoo_$v" 90 $BUILD/bench/bench_step --device cuda --arch simplest $VITS $a --steps 50 --warmup 50
    done
}

# ---- 4. benchmarks: ours (the fused attention, the default; the unfused fallback after eager), then PyTorch
VITS="--image 224 --patch 16 --channels 3 --dim 384 --depth 12 --heads 6 --mlp 1536 --classes 1000 --batch 256"
ours_bench() {  # attn
    local arch
    for arch in simplest simplevit; do
        if [ -x $BUILD/bench/bench_step ]; then
            stage "bench_${arch}_$1" 90 $BUILD/bench/bench_step --device cuda --attn $1 --arch $arch $VITS \
                --steps 20 --warmup 5
        else
            skip "bench_${arch}_$1" "no bench_step (the build failed)"
        fi
    done
}
ours_bench fused
export PYTHONUNBUFFERED=1
if [ -n "$NO_TORCH" ]; then
    skip torch_eager "$NO_TORCH"
    skip torch_compile "$NO_TORCH"
else
    # torch.compile first (the number the speed target is set against), leaving about 150 s for 4b (Shampoo, ~30 s)
    # and the NCCL stage (16 short runs, ~70 s).
    to=$((HARD - $(elapsed) - 150))
    [ "$to" -gt 300 ] && to=300
    if [ "$to" -ge 60 ]; then
        stage torch_compile "$to" $PY tests/gpu/torch_bench.py --mode compile --steps 20 --warmup 3
    else
        skip torch_compile "only $((HARD - $(elapsed)))s left before the ${HARD}s deadline"
    fi
fi
shampoo_bench
# ---- 3b. the NCCL path at np = 1 (issue 5): a one-rank NCCL communicator (SD_NCCL_FORCE=1) must change no bit
# (after torch.compile and 4b: the stages run in the order of what a short machine must not lose)
if [ "$NCCL_USE" != 1 ]; then
    skip nccl_np1 "the build has no NCCL (no nccl.h in the toolkit or pip's nvidia-nccl-cu13)"
elif [ -x ./simplest-dist ] && [ -n "$FM" ]; then
    stage nccl_np1 150 tests/gpu/nccl_np1.sh "$FM" "$W/nccl"
    mkdir -p "$OUTDIR/gpu-logs/nccl" && for f in "$W"/nccl/*.log; do [ -f "$f" ] && tail -c 200000 "$f" >"$OUTDIR/gpu-logs/nccl/$(basename "$f")"; done
fi

# ---- 3c. checkpoint and resume on the GPU: a run killed and started again ends with the uninterrupted run's bits
if [ -x ./simplest-dist ] && [ -n "$FM" ]; then
    stage resume_gpu 120 tests/gpu/resume_gpu.sh "$FM" "$W/resume"
fi

ours_bench unfused
if [ -z "$NO_TORCH" ]; then
    stage torch_eager 120 $PY tests/gpu/torch_bench.py --mode eager --steps 20 --warmup 5
    if [ "${SD_TORCH_SDPA:-0}" = 1 ] && [ "$(left)" -gt 120 ]; then
        stage torch_compile_sdpa 240 $PY tests/gpu/torch_bench.py --mode compile --attn sdpa --steps 20 --warmup 3
    fi
fi

# ---- experimental, outside the pass/fail (last, so that they never take the time of the checks above): bias
# gradients from the BGRADB epilogue (SD_LT_BGRAD=1), checked against the CPU and timed
if [ -x $BUILD/gpu/test_cuda ]; then
    stage experimental_bgrad_ops 90 env SD_LT_BGRAD=1 $BUILD/gpu/test_cuda --group ops
    stage experimental_bgrad_step 90 env SD_LT_BGRAD=1 $BUILD/gpu/test_cuda --group step
fi
if [ -x $BUILD/bench/bench_step ]; then  # only reported beside the others, never the "best"
    stage bench_simplest_fused_bgrad 90 env SD_LT_BGRAD=1 $BUILD/bench/bench_step --device cuda --attn fused \
        --arch simplest $VITS --steps 20 --warmup 5
    # SimpleViT with the LayerNorm kernels before the register-resident ones (SD_LN_REG=0), to time the change
    stage bench_simplevit_fused_oldln 90 env SD_LN_REG=0 $BUILD/bench/bench_step --device cuda --attn fused \
        --arch simplevit $VITS --steps 20 --warmup 5
fi

# ---- 5. the report (and the setup facts beside the stage logs)
mkdir -p "$OUTDIR/gpu-logs"
for f in "$W"/*.txt; do [ -f "$f" ] && cp "$f" "$OUTDIR/gpu-logs/" 2>/dev/null; done
REPORT="$OUTDIR/gpu-report.md"
if $PY tests/gpu/report.py "$W" "$REPORT"; then
    rc=$(cat "$W/report.rc" 2>/dev/null || echo 1)
else
    echo "report.py failed; raw logs follow" | tee "$REPORT"
    for f in "$W"/*.log "$W"/*.txt; do echo "--- $f"; cat "$f"; done >>"$REPORT"
    rc=1
fi
for f in "$W"/experimental_bgrad_*.log; do
    [ -f "$f" ] && echo "experimental $(basename "$f" .log): $(grep -c '^ok - ' "$f") ok, $(grep -c '^not ok - ' "$f") not ok"
done
echo "report: $REPORT ($(elapsed)s in all)"
exit "$rc"
