#!/usr/bin/env bash
# The GPU check's harness (build/gpu/test_cuda, run by tests/gpu/run.sh on a GPU) checked without a GPU:
#  - --cpu (the CPU backend against a second CPU backend) passes every group;
#  - --cpu-faults (planted bugs in the backend under test) fails exactly where it must: a grafting norm 5e-5 off and
#    roots from a doubled eps are both reported by the Shampoo checks, so those checks can fail on a GPU; in the
#    ops group, dW and LayerNorm's dx overwritten instead of accumulated, LayerNorm's dx from the next row's
#    statistics (D 768-1040), GELU's last element unwritten and a dropout mask from another seed are each reported.
set -u
BUILD=${BUILD:-build}
BIN=$BUILD/gpu/test_cuda
TMP=${TEST_TMP:-$(mktemp -d)}/gpu_harness
mkdir -p "$TMP"
if [ ! -x "$BIN" ]; then echo "not ok - gpu harness: $BIN is not built (make $BIN)"; exit 1; fi
# Every group, with the backend under test keeping the CUDA backend's one-registered-param-buffer rule (the
# Shampoo trajectories once broke it: two models on one device backend, an abort on the first step on a GPU).
"$BIN" --cpu --group ops --group attn --group fused --group optim --group step --group shampoo >"$TMP/cpu.log" 2>&1
rc=$?
n=$(grep -c '^ok - ' "$TMP/cpu.log")
if [ $rc = 0 ] && [ "$n" -ge 350 ] && ! grep -q '^not ok' "$TMP/cpu.log"; then
  echo "ok - gpu harness --cpu: every group passes on the CPU against itself ($n checks)"
else
  echo "not ok - gpu harness --cpu: exit $rc, $n checks"; grep '^not ok' "$TMP/cpu.log" | head -5; tail -n 2 "$TMP/cpu.log"
fi
"$BIN" --cpu-faults --group ops >"$TMP/faults_ops.log" 2>&1; rc=$?
[ $rc = 1 ] && echo "ok - gpu harness --cpu-faults ops: exit 1" || echo "not ok - gpu harness --cpu-faults ops: exit $rc (want 1)"
ops_caught() {  # pattern what
  if grep -q "^not ok - $1" "$TMP/faults_ops.log"; then echo "ok - gpu harness --cpu-faults: $2 is caught"
  else echo "not ok - gpu harness --cpu-faults: $2 was not caught"; fi
}
ops_caught "matmul_bwd R394 Din128 Dout384: dW +=" "dW overwritten (matmul_bwd)"
ops_caught "gelu_fwd n40007" "GELU's last element unwritten"
ops_caught "layernorm_bwd R394 D384: dx +=" "LayerNorm's dx overwritten"
for d in "R64 D768" "R40 D1024" "R20 D1040"; do
  ops_caught "layernorm_bwd $d: dx +=" "LayerNorm's dx from the next row's statistics at $d"
done
ops_caught "dropout_fwd p0.10 step 5 pos 8: mask" "a dropout mask from another seed"
if grep -q "^ok - layernorm_bwd R64 D768: dgamma +=" "$TMP/faults_ops.log" &&
   grep -q "^ok - layernorm_fwd R64 D768: y" "$TMP/faults_ops.log"; then
  echo "ok - gpu harness --cpu-faults: the unfaulted LayerNorm outputs still pass (the checks are specific)"
else
  echo "not ok - gpu harness --cpu-faults: an unfaulted LayerNorm output failed"
fi
"$BIN" --cpu-faults --group shampoo >"$TMP/faults.log" 2>&1; rc=$?
check() {  # pattern what
  if grep -q "^not ok - $1" "$TMP/faults.log"; then echo "ok - gpu harness --cpu-faults: $2 is caught"
  else echo "not ok - gpu harness --cpu-faults: $2 was not caught"; fi
}
[ $rc = 1 ] && echo "ok - gpu harness --cpu-faults: exit 1" || echo "not ok - gpu harness --cpu-faults: exit $rc (want 1)"
check "graft_update_blocks 5 x (96x64) grafted Shampoo step" "a grafting norm 5e-5 off (graft_update_blocks)"
check "inverse_root n96 (40 samples) -1/2 fp64: X against LAPACK" "a root from a doubled eps (inverse_root)"
check "shampoo schedule (f 5, S 5, delay 1" "either fault in a Shampoo trajectory with root_delay 1"
if grep -q "^ok - graft_update_blocks 5 x (96x64) graft step" "$TMP/faults.log"; then
  echo "ok - gpu harness --cpu-faults: the unfaulted graft step still passes (the checks are specific)"
else
  echo "not ok - gpu harness --cpu-faults: the unfaulted graft step failed"
fi
