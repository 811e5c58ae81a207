#!/usr/bin/env bash
# CIFAR-10 through the threaded loader end to end: a generated binary fixture (cifar-10-batches-bin layout),
# augmentation on (RandomCrop pad 4, flip, RandAugment), 2 decoder threads; the run finishes, evaluates every test
# image once, and status.json carries the data section (threads, skipped counts) and loader.json the resume state.
set -u
BIN=${SIMPLEST_BIN:-./simplest-dist}
TMP=${TEST_TMP:-$(mktemp -d)}/train_cifar
PY=${PYTHON:-/usr/bin/python3}
rm -rf "$TMP"; mkdir -p "$TMP/data/cifar-10-batches-bin"
"$PY" - "$TMP/data/cifar-10-batches-bin" <<'PYEOF'
import os, sys
d = sys.argv[1]
def write(name, n, off):
    with open(os.path.join(d, name), "wb") as f:
        for i in range(n):
            label = (i + off) % 10
            f.write(bytes([label]) + bytes(((label * 25 + p // 97 + c * 40) % 256) for c in range(3) for p in range(1024)))
for b in range(1, 6):
    write("data_batch_%d.bin" % b, 40, b)
write("test_batch.bin", 37, 0)
PYEOF
if "$BIN" configs/fashion-mnist.json --set data.dataset=cifar10 --set data.root="$TMP/data" \
    --set data.augment=true --set data.threads=2 --set data.prefetch=2 \
    --set model.width=custom --set model.dim=32 --set model.heads=2 --set model.mlp_dim=64 --set model.depth=2 \
    --set model.arch=simplevit --set model.patch_size=8 --set train.batch_size=20 --set train.steps=12 \
    --set train.log_every=4 --set opt.lr=0.001 --set run.dir="$TMP/run" > "$TMP/log" 2>&1; then
  echo "ok - cifar10 trains through the threaded loader"
else
  echo "not ok - cifar10 trains through the threaded loader"; tail -5 "$TMP/log"
fi
if "$PY" - "$TMP/run" <<'PYEOF'
import json, sys
s = json.load(open(sys.argv[1] + "/status.json"))
d = s["data"]
assert s["state"] == "done", s["state"]
assert d["dataset"] == "cifar10" and d["decoder_threads"] == 2 and d["skipped_total"] == 0, d
assert "truncated" in d["skipped"] and "png" in d["skipped"], d["skipped"]
l = json.load(open(sys.argv[1] + "/checkpoints/step_00000012/loader.json"))  # the final checkpoint's
assert l["epoch"] == 12 // 10 and l["step_in_epoch"] == 12 % 10 and l["global_batch"] == 20, l
PYEOF
then echo "ok - status.json data section and loader.json"; else echo "not ok - status.json data section and loader.json"; fi
if grep -q "37 images" "$TMP/log"; then echo "ok - eval covers the 37 test images once"; else
  echo "not ok - eval covers the 37 test images once"; grep eval "$TMP/log"; fi
if "$BIN" configs/fashion-mnist.json --set data.dataset=cifar10 --set model.patch_size=8 --set train.batch_size=20 >"$TMP/err" 2>&1; then
  echo "not ok - cifar10 without data.root is refused"
else
  grep -q "data.root" "$TMP/err" && echo "ok - cifar10 without data.root is refused" || echo "not ok - cifar10 without data.root is refused"
fi
# data.u8_batches (the default): uint8 batches normalized by the backend. The same run with fp32 batches normalized
# on the decoder threads must give the same training losses and eval, bit for bit (CPU backend).
if "$BIN" configs/fashion-mnist.json --set data.dataset=cifar10 --set data.root="$TMP/data" \
    --set data.augment=true --set data.threads=2 --set data.prefetch=2 --set data.u8_batches=false \
    --set model.width=custom --set model.dim=32 --set model.heads=2 --set model.mlp_dim=64 --set model.depth=2 \
    --set model.arch=simplevit --set model.patch_size=8 --set train.batch_size=20 --set train.steps=12 \
    --set train.log_every=4 --set opt.lr=0.001 --set run.dir="$TMP/run_f32" > "$TMP/log_f32" 2>&1 &&
   "$PY" - "$TMP/run/metrics.jsonl" "$TMP/run_f32/metrics.jsonl" <<'PYEOF'
import json, sys
def rows(p):
    return [{k: v for k, v in json.loads(l).items() if k.startswith(("train/loss", "eval/"))} for l in open(p)]
a, b = rows(sys.argv[1]), rows(sys.argv[2])
assert len(a) >= 3 and a == b, (a, b)
assert json.load(open(sys.argv[1].replace("metrics.jsonl", "config.json")))["data"]["u8_batches"] is True
PYEOF
then echo "ok - uint8 batches normalized by the backend train bit for bit as fp32 batches (losses and eval)"
else echo "not ok - uint8 batches normalized by the backend train bit for bit as fp32 batches"; tail -3 "$TMP/log_f32"; fi
