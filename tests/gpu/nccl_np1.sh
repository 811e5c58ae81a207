#!/usr/bin/env bash
# tests/gpu/nccl_np1.sh FMNIST_DIR WORKDIR: the NCCL path at np = 1 on one GPU (issue 5), run by tests/gpu/run.sh.
# SD_NCCL_FORCE=1 binds a one-rank NCCL communicator, so the gradient sums run as on several GPUs (bucketed during
# backward on NCCL's stream, events, polled waits) and Shampoo's roots go through the grouped ncclBroadcast. A
# one-rank sum or broadcast changes no bit: each run must equal the same run without NCCL, loss for loss. In this
# mode NCCL writes each result out of place and the compute stream copies it back, and each bucket's start holds
# the compute stream for 2 ms, so that a missing order between the two streams changes the losses (src/comm.c,
# NcclState.oop). The reference runs with SD_NCCL_FORCE unset, whatever the caller's environment.
#   1. Adam, 20 steps (the bucketed all-reduce, comm.overlap on);
#   2. the same with comm.overlap off (one all-reduce of every gradient after backward);
#   3. Shampoo with f = S = 5, 20 steps (four root broadcasts through NCCL).
#   4. comm.deterministic (NCCL is bound but unused here: at one rank the shard gradients are summed in a fixed
#      order by backend ops on the device; this checks that path, which once crashed, on a GPU);
#   5. gradient accumulation over 2 micro-batches (the buckets start only in the last micro-step's backward);
#   6. SAM (two forward/backward passes per step, the second one's gradients reduced);
#   7. Shampoo with root_delay 4 (the roots computed on side streams from a factor snapshot, broadcast 4 steps on);
#   8. Shampoo with apply "owners" (the owner's steps all-gathered through the same grouped broadcast).
set -u
FM=${1:?usage: nccl_np1.sh FMNIST_DIR WORKDIR}
W=${2:?usage: nccl_np1.sh FMNIST_DIR WORKDIR}
BIN=${SIMPLEST_BIN:-./simplest-dist}
PY=${PYTHON:-python3}
mkdir -p "$W"
# comm.timeout_s 20 and a 60 s bound per run: one hung case must not take the stage's time from the others
# (--foreground keeps each run in the stage's process group, so the stage's own timeout still ends it)
COMMON="--set run.device=cuda --set train.steps=20 --set train.log_every=1 --set train.eval_every=0
  --set data.root=$FM --set data.eval_limit=512 --set comm.timeout_s=20"
fails=0
run() {  # name extra...
    local name=$1; shift
    local what="20 steps through NCCL equal the run without it, loss for loss"
    [ "$name" = deterministic ] && what="20 steps with NCCL bound (unused: the device's fixed-order shard sum) equal the run without it"
    rm -rf "$W/$name-ref" "$W/$name-nccl"
    env -u SD_NCCL_FORCE timeout --foreground -k 5 60 "$BIN" configs/fashion-mnist.json $COMMON --set run.dir="$W/$name-ref" "$@" >"$W/$name-ref.log" 2>&1 || {
        echo "not ok - nccl np=1 $name: the run without NCCL failed"; tail -3 "$W/$name-ref.log"; fails=$((fails + 1))
        return; }
    SD_NCCL_FORCE=1 timeout --foreground -k 5 60 "$BIN" configs/fashion-mnist.json $COMMON --set run.dir="$W/$name-nccl" "$@" \
        >"$W/$name-nccl.log" 2>&1 || {
        echo "not ok - nccl np=1 $name: the run with SD_NCCL_FORCE=1 failed"; tail -3 "$W/$name-nccl.log"
        fails=$((fails + 1)); return; }
    if grep -q "one-rank NCCL communicator" "$W/$name-ref.log"; then
        echo "not ok - nccl np=1 $name: the reference run bound NCCL too"; fails=$((fails + 1)); return
    fi
    if ! grep -q "one-rank NCCL communicator" "$W/$name-nccl.log"; then
        echo "not ok - nccl np=1 $name: NCCL was not bound (a build without NCCL?)"; fails=$((fails + 1)); return
    fi
    if "$PY" - "$W/$name-ref/metrics.jsonl" "$W/$name-nccl/metrics.jsonl" <<'PYEOF'
import json, sys
def losses(p):
    return [(r["step"], r["train/loss"]) for r in map(json.loads, open(p)) if "train/loss" in r]
a, b = losses(sys.argv[1]), losses(sys.argv[2])
print("   steps %d, final loss %s / %s" % (len(a), a[-1][1] if a else "-", b[-1][1] if b else "-"))
sys.exit(0 if len(a) == 20 and a == b else 1)
PYEOF
    then echo "ok - nccl np=1 $name: $what"
    else echo "not ok - nccl np=1 $name: the losses differ from the run without NCCL"; fails=$((fails + 1)); fi
}
run adam_overlap
run adam_no_overlap --set comm.overlap=false
run shampoo --set opt.name=shampoo --set shampoo.precondition_frequency=5 --set shampoo.start_preconditioning_step=5
# comm.deterministic at one rank on the GPU: the shard gradients summed in order by backend ops on the device
run deterministic --set comm.deterministic=true --set comm.shards=4
run grad_accum --set train.grad_accum=2
run sam --set train.sam=true
run shampoo_delay4 --set opt.name=shampoo --set shampoo.precondition_frequency=5 \
    --set shampoo.start_preconditioning_step=5 --set shampoo.root_delay=4
run shampoo_owners --set opt.name=shampoo --set shampoo.precondition_frequency=5 \
    --set shampoo.start_preconditioning_step=5 --set shampoo.apply=owners
[ "$fails" = 0 ]
