#!/usr/bin/env bash
# model.init_from / model.init_skip: a fresh run that starts from a weights file. With lr 0 the weights cannot move,
# so a run started from run A's weights must export A's tensors bit for bit (and evaluate to A's numbers); with EMA
# on, the EMA copy must start from them too. init_skip keeps the named tensors at the run's own random init (a new
# 12-class head equals a fresh run's, the body equals A's). A PyTorch-style file (compiled "_orig_mod." names, no
# metadata, no buffers) loads the same. A resumed run ignores init_from (its file may be gone) and ends with the
# uninterrupted run's bits. Bad input exits 2 naming the key and the file or tensor.
set -u
. "$(dirname "$0")/../fixtures.inc"
test_setup init_from
fmnist_data
BASE="$DATA --set model.width=custom --set model.dim=32 --set model.heads=2 --set model.mlp_dim=64 --set model.depth=7
  --set model.patch_size=7 --set train.batch_size=64 --set train.log_every=1 --set data.train_limit=1024
  --set data.eval_limit=256 --set run.threads=1 --set run.checkpoint_every_s=0"
train() { local dir=$1; shift; "$BIN" configs/fashion-mnist.json $BASE "$@" --set run.dir="$dir" >"$dir.log" 2>&1; }
cmp_st() {  # A B MODE [names...]: MODE same (bit for bit) / near (1e-6) / differ, over the named or all trainable tensors
  "$PY" - "$@" <<'PYEOF'
import sys, numpy as np
sys.path.insert(0, "tests/reference")
import st
a, _ = st.load(sys.argv[1]); b, _ = st.load(sys.argv[2]); mode = sys.argv[3]; names = sys.argv[4:]
fixed = lambda k: k.endswith((".d", ".B"))
keys = names or [k for k in a if not fixed(k)]
for k in keys:
    x, y = a[k], b[k]
    good = np.array_equal(x, y) if mode == "same" else (x.shape == y.shape and np.allclose(x, y, rtol=1e-6, atol=1e-7)
                                                       if mode == "near" else x.shape != y.shape or not np.allclose(x, y))
    if not good:
        print("%s: %s" % (k, mode)); sys.exit(1)
PYEOF
}
top1() { "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]+'/status.json'))['eval']['top1'])" "$1"; }

train "$TMP/a" --set train.steps=30
A="$TMP/a/model.safetensors"
[ -f "$A" ] || { notok "run A trains" "$(tail -3 "$TMP/a.log")"; exit 0; }

# lr 0: nothing moves, so the exported weights are A's and the eval is A's
train "$TMP/b" --set train.steps=2 --set opt.lr=0 --set model.init_from="$A"
if [ $? = 0 ] && cmp_st "$A" "$TMP/b/model.safetensors" same && [ "$(top1 "$TMP/a")" = "$(top1 "$TMP/b")" ] &&
   grep -q "model.init_from $A: 46 tensors loaded, 0 kept" "$TMP/b.log"; then
  ok "init_from: a run from A's weights at lr 0 exports A's tensors bit for bit and evaluates to A's top-1"
else
  notok "init_from at lr 0" "$(grep -E 'init_from|error' "$TMP/b.log")"
fi
train "$TMP/b_ema" --set train.steps=4 --set opt.lr=0 --set train.ema=true --set train.ema_every=2 --set model.init_from="$A"
if [ $? = 0 ] && cmp_st "$A" "$TMP/b_ema/model.safetensors" near; then
  ok "init_from with EMA: the EMA copy starts from the loaded weights (exported EMA weights equal A's)"
else
  notok "init_from with EMA" "$(tail -3 "$TMP/b_ema.log")"
fi

# a file with another head (12 classes, as from a run on another dataset): init_skip keeps the run's own random
# init for it
"$PY" - "$A" "$TMP/a12.safetensors" <<'PYEOF'
import sys, numpy as np; sys.path.insert(0, "tests/reference"); import st
t, _ = st.load(sys.argv[1]); rng = np.random.default_rng(1)
t["linear_head.weight"] = rng.standard_normal((12, t["linear_head.weight"].shape[1])).astype(np.float32)
t["linear_head.bias"] = rng.standard_normal(12).astype(np.float32)
st.save(sys.argv[2], t)
PYEOF
train "$TMP/c" --set train.steps=1 --set opt.lr=0
train "$TMP/d" --set train.steps=1 --set opt.lr=0 --set model.init_from="$TMP/a12.safetensors" --set model.init_skip=linear_head
body=$("$PY" -c "
import sys; sys.path.insert(0, 'tests/reference'); import st
print(' '.join(k for k in st.load(sys.argv[1])[0] if not k.startswith('linear_head') and not k.endswith(('.d', '.B'))))" "$A")
# shellcheck disable=SC2086 # the names are words
if [ -f "$TMP/d/model.safetensors" ] && cmp_st "$TMP/c/model.safetensors" "$TMP/d/model.safetensors" same linear_head.weight linear_head.bias &&
   cmp_st "$A" "$TMP/d/model.safetensors" same $body && cmp_st "$A" "$TMP/c/model.safetensors" differ $body &&
   grep -q "44 tensors loaded, 2 kept at their random init" "$TMP/d.log"; then
  ok "init_skip linear_head: a file with a 12-class head; the head stays at the run's random init, every other tensor A's"
else
  notok "init_skip" "$(grep -E 'init_from|error' "$TMP/d.log")"
fi

# a PyTorch-style file: "_orig_mod." names, trainable tensors only, no metadata
"$PY" - "$A" "$TMP/torch.safetensors" <<'PYEOF'
import sys; sys.path.insert(0, "tests/reference"); import st
t, _ = st.load(sys.argv[1])
st.save(sys.argv[2], [("_orig_mod." + k, v) for k, v in t.items() if not k.endswith((".d", ".B"))])
PYEOF
train "$TMP/e" --set train.steps=1 --set opt.lr=0 --set model.init_from="$TMP/torch.safetensors"
if [ $? = 0 ] && cmp_st "$A" "$TMP/e/model.safetensors" same; then
  ok "init_from a PyTorch-style file (compiled names, no metadata, no buffers)"
else
  notok "PyTorch-style init file" "$(grep -E 'error' "$TMP/e.log")"
fi

# init_skip prefixes end at a name component: "transformer.layers.1" is layer 1 (the first block's MLP, 4 tensors),
# not layers 10-13 too
train "$TMP/g" --set train.steps=1 --set opt.lr=0 --set model.init_from="$A" --set model.init_skip=transformer.layers.1
if [ $? = 0 ] && grep -q "42 tensors loaded, 4 kept at their random init" "$TMP/g.log" &&
   cmp_st "$A" "$TMP/g/model.safetensors" same transformer.layers.10.to_qkv.weight transformer.layers.13.layer2.lin.bias &&
   cmp_st "$A" "$TMP/g/model.safetensors" differ transformer.layers.1.layer1.lin.weight; then
  ok "init_skip transformer.layers.1 keeps layer 1 only (prefixes end at a '.')"
else
  notok "init_skip component prefix" "$(grep -E 'init_from|error' "$TMP/g.log")"
fi

# a file whose tensor data starts at an offset that is not a multiple of 4 (the format allows it): the same weights
"$PY" - "$A" "$TMP/odd.safetensors" <<'PYEOF'
import json, struct, sys; sys.path.insert(0, "tests/reference"); import st
t, _ = st.load(sys.argv[1])
head, off, blobs = {}, 0, []
for k, v in t.items():
    b = v.astype("<f4").tobytes(); head[k] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [off, off + len(b)]}
    off += len(b); blobs.append(b)
h = json.dumps(head).encode()
while (8 + len(h)) % 4 != 1: h += b" "
open(sys.argv[2], "wb").write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
PYEOF
train "$TMP/h" --set train.steps=1 --set opt.lr=0 --set model.init_from="$TMP/odd.safetensors"
if [ $? = 0 ] && cmp_st "$A" "$TMP/h/model.safetensors" same; then
  ok "init_from a file whose data is not 4-byte aligned"
else
  notok "init_from an unaligned file" "$(grep -E 'error' "$TMP/h.log")"
fi

# a resumed run ignores init_from: killed after step 9 (checkpoint at 8), A's file moved away, resumed
train "$TMP/f_ref" --set train.steps=16 --set run.checkpoint_every=4 --set model.init_from="$A"
(SD_FAULT_KILL_AFTER_STEP=9 train "$TMP/f" --set train.steps=16 --set run.checkpoint_every=4 --set model.init_from="$A") 2>/dev/null
rc1=$?
mv "$A" "$A.away"
train "$TMP/f" --set train.steps=16 --set run.checkpoint_every=4 --set model.init_from="$A"
rc2=$?
mv "$A.away" "$A"
diff=$("$PY" tests/reference/same_run.py "$TMP/f_ref" "$TMP/f")
if [ "$rc1" != 0 ] && [ "$rc2" = 0 ] && grep -q "resuming from" "$TMP/f.log" &&
   grep -q "model.init_from $A: not used, the run resumes from its own checkpoint" "$TMP/f.log" &&
   [ "$diff" = identical ]; then
  ok "a resumed run ignores model.init_from (its file gone) and ends with the uninterrupted run's bits"
else
  notok "resume with init_from" "exit $rc1 / $rc2, $diff" "$(tail -3 "$TMP/f.log")"
fi

# bad input: exit 2, one line naming the key and what is wrong
bad() {  # name expected-text [--set ...]
  local name=$1 want=$2; shift 2
  "$BIN" configs/fashion-mnist.json $BASE --set train.steps=1 "$@" --set run.dir="$TMP/bad" >"$TMP/bad.log" 2>&1
  local rc=$?
  if [ "$rc" = 2 ] && grep -qF -- "$want" "$TMP/bad.log" && [ "$(grep -c 'error' "$TMP/bad.log")" = 1 ]; then ok "init_from: $name"; else
    notok "init_from: $name" "exit $rc" "$(cat "$TMP/bad.log" | tail -3)"; fi
  rm -rf "$TMP/bad" "$TMP"/bad.[0-9]*
}
bad "a missing file exits 2 naming it" "config key 'model.init_from': $TMP/nope.safetensors" \
  --set model.init_from="$TMP/nope.safetensors"
bad "a head of another shape exits 2 naming the tensor and init_skip" \
  "tensor 'linear_head.weight' is F32 [12,32], the model needs F32 [10,32] (model.init_skip" \
  --set model.init_from="$TMP/a12.safetensors"
bad "an init_skip prefix that matches nothing exits 2" "model.init_skip: 'linear_haed' is the start of no trainable tensor" \
  --set model.init_from="$A" --set model.init_skip=linear_haed
bad "another seed_compat mode exits 2" "was trained with model.seed_compat false, this config says true" \
  --set model.init_from="$A" --set model.seed_compat=true
bad "the other arch exits 2" "holds simplest weights, but model.arch is \"simplevit\"" \
  --set model.init_from="$A" --set model.arch=simplevit
bad "init_skip without init_from exits 2" "config key 'model.init_skip'" --set model.init_skip=linear_head
# without metadata, the mode is read from layer 0's B: A's B transposed is not in the default (row) form
"$PY" - "$A" "$TMP/colB.safetensors" <<'PYEOF'
import sys, numpy as np; sys.path.insert(0, "tests/reference"); import st
t, _ = st.load(sys.argv[1])
t["transformer.layers.0.B"] = np.ascontiguousarray(np.swapaxes(t["transformer.layers.0.B"], -1, -2))
st.save(sys.argv[2], t)
PYEOF
bad "a B in the other mode's form (no metadata) exits 2" \
  "transformer.layers.0.B is in the seed_compat (column-normalized) form but model.seed_compat is false" \
  --set model.init_from="$TMP/colB.safetensors"
printf 'not a safetensors file' >"$TMP/junk.safetensors"
bad "a file that is not safetensors exits 2 naming it" "$TMP/junk.safetensors" --set model.init_from="$TMP/junk.safetensors"
