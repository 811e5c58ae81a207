#!/usr/bin/env bash
# tests/gpu/resume_gpu.sh FMNIST_DIR WORKDIR: checkpoint and resume on the GPU (docs/checkpoints.md), run by
# tests/gpu/run.sh. A run killed with SIGKILL after step K (SD_FAULT_KILL_AFTER_STEP) and started again must end
# with the same bits as the run that was never interrupted: the checkpoint's weights, EMA and optimizer tensors and
# the training losses. This checks, on the device, what the CPU tests check on the host: the optimizer state's
# download and upload, the bf16 shadow refreshed from the loaded master weights, the GPU Shampoo state (factors,
# roots, a refresh pending on the side streams across the checkpoint), and that the CUDA step is deterministic.
#   1. Adam, killed after step 10, resumes from 8;
#   2. Shampoo f = S = 5 with root_delay 3, EMA and dropout, killed after step 11, resumes from 10.
set -u
FM=${1:?usage: resume_gpu.sh FMNIST_DIR WORKDIR}
W=${2:?usage: resume_gpu.sh FMNIST_DIR WORKDIR}
BIN=${SIMPLEST_BIN:-./simplest-dist}
PY=${PYTHON:-python3}
mkdir -p "$W"
COMMON="--set run.device=cuda --set train.steps=24 --set train.log_every=1 --set train.eval_every=10
  --set run.checkpoint_every=4 --set run.checkpoint_every_s=0 --set data.root=$FM --set data.train_limit=2048
  --set data.eval_limit=512 --set comm.timeout_s=20"
fails=0
case_() {  # name kill_after want_from extra...
    local name=$1 at=$2 from=$3; shift 3
    rm -rf "$W/$name-straight" "$W/$name"
    timeout --foreground -k 5 60 "$BIN" configs/fashion-mnist.json $COMMON --set run.dir="$W/$name-straight" "$@" \
        >"$W/$name-straight.log" 2>&1 || { echo "not ok - resume $name: the straight run failed"; tail -3 "$W/$name-straight.log"; fails=$((fails + 1)); return; }
    SD_FAULT_KILL_AFTER_STEP=$at timeout --foreground -k 5 60 "$BIN" configs/fashion-mnist.json $COMMON \
        --set run.dir="$W/$name" "$@" >"$W/$name-1.log" 2>&1
    timeout --foreground -k 5 60 "$BIN" configs/fashion-mnist.json $COMMON --set run.dir="$W/$name" "$@" \
        >"$W/$name-2.log" 2>&1 || { echo "not ok - resume $name: the resumed run failed"; tail -3 "$W/$name-2.log"; fails=$((fails + 1)); return; }
    if ! grep -q "resuming from .*step_$(printf %08d "$from")" "$W/$name-2.log"; then
        echo "not ok - resume $name: did not resume from step $from"; grep -E "resuming|error" "$W/$name-2.log" | head -2
        fails=$((fails + 1)); return
    fi
    # tensors compared as the data sections of the safetensors files (the headers hold the run directory)
    if "$PY" - "$W/$name-straight" "$W/$name" <<'PYEOF'
import json, os, struct, sys
a, b = sys.argv[1:3]
def data(p):
    raw = open(p, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    hdr = json.loads(raw[8:8 + n]); hdr.pop("__metadata__", None)
    return hdr, raw[8 + n:]
bad = []
for f in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
    pa, pb = os.path.join(a, "checkpoints/step_00000024", f), os.path.join(b, "checkpoints/step_00000024", f)
    if not os.path.exists(pa): continue
    if data(pa) != data(pb): bad.append(f)
def losses(d):
    return [(r["step"], r["train/loss"]) for r in map(json.loads, open(os.path.join(d, "metrics.jsonl"))) if "train/loss" in r]
la, lb = losses(a), losses(b)
if la != lb or len(la) != 24: bad.append("losses")
print("   final loss %s / %s; differ: %s" % (la[-1][1] if la else "-", lb[-1][1] if lb else "-", ", ".join(bad) or "nothing"))
sys.exit(1 if bad else 0)
PYEOF
    then echo "ok - resume $name: killed after step $at, resumed from $from on the GPU: the same bits as the uninterrupted run"
    else echo "not ok - resume $name: the resumed run differs from the uninterrupted one"; fails=$((fails + 1)); fi
}
case_ adam 10 8
case_ shampoo_delay3_ema 11 10 --set opt.name=shampoo --set shampoo.precondition_frequency=5 \
    --set shampoo.start_preconditioning_step=5 --set shampoo.root_delay=3 --set train.ema=true --set train.ema_every=2 \
    --set model.drop_p=0.1
[ "$fails" = 0 ]
