#!/usr/bin/env bash
# test_cli.sh: end-to-end checks through the simplest-dist binary (run from the repo root by tests/run.sh, with
# SIMPLEST_BIN and TEST_TMP set). Each case prints "ok - name" or "not ok - name" plus indented details:
#   (a) config errors: exit 2 and exactly one stderr line naming the key or file;
#   (b) a missing or corrupt dataset: exit 2 naming the file;
#   (c) a short training run: config.json, status.json, metrics.jsonl, model.safetensors; a rerun moves it aside;
#   (d) eval round trips against the PyTorch reference (tests/reference/check_logits.py) for both archs in both
#       modes, and dataset eval: the printed top-1 equals the argmax accuracy of the written logits;
#   (e) bad checkpoints: exit 2 naming the file;
#   (f) SIGTERM during a run: exit 0 with state "stopped" and the weights written.
# Tiny models and data.train_limit/eval_limit keep it short on a 2-core machine. Uses Fashion-MNIST from Debian's
# dataset-fashion-mnist when installed, else a generated IDX dataset of the same shape.
set -u
cd "$(dirname "$0")/../.." || exit 1
BIN=${SIMPLEST_BIN:-$PWD/simplest-dist}
PY=/usr/bin/python3
ROOT_TMP=${TEST_TMP:-$(mktemp -d /tmp/simplest-tests.XXXXXX)}
T=$(mktemp -d "$ROOT_TMP/cli.XXXXXX")
CONFIG=configs/fashion-mnist.json
failed=0
T0=$SECONDS

ok() { echo "ok - $1"; }
notok() {
  echo "not ok - $1"
  shift
  local l
  for l in "$@"; do printf '    %s\n' "$l"; done
  failed=1
}

if [ ! -x "$BIN" ]; then
  notok "binary exists" "SIMPLEST_BIN=$BIN is not executable (run make)"
  exit 1
fi

# ---------------------------------------------------------------- python helpers (Debian python: numpy, torch)
H=$T/helpers.py
cat >"$H" <<'PYEOF'
import gzip, json, math, os, struct, sys
import numpy as np

def synth(root, n_train, n_test):
    """A Fashion-MNIST-shaped IDX dataset whose classes are learnable (class-dependent stripes plus noise)."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(5)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) * 7 + 3) % 10
        rng.shuffle(labels)
        imgs = rng.integers(0, 60, size=(n, 28, 28))
        for i, y in enumerate(labels):
            imgs[i, :, y * 2:y * 2 + 6] += 150
        imgs = np.clip(imgs, 0, 255).astype(np.uint8)
        with gzip.open(os.path.join(root, "%s-images-idx3-ubyte.gz" % split), "wb") as f:
            f.write(struct.pack(">IIII", 0x803, n, 28, 28) + imgs.tobytes())
        with gzip.open(os.path.join(root, "%s-labels-idx1-ubyte.gz" % split), "wb") as f:
            f.write(struct.pack(">II", 0x801, n) + labels.astype(np.uint8).tobytes())

def labels(root, n):
    p = os.path.join(root, "t10k-labels-idx1-ubyte.gz")
    with gzip.open(p, "rb") as f:
        data = f.read()
    return np.frombuffer(data[8:], dtype=np.uint8)[:n].astype(np.int64)

def images(root, n):
    """The first n eval images, normalized as the loader does: ((u/255f) - mean)/std in fp32."""
    p = os.path.join(root, "t10k-images-idx3-ubyte.gz")
    with gzip.open(p, "rb") as f:
        data = f.read()
    u = np.frombuffer(data[16:16 + n * 784], dtype=np.uint8).reshape(n, 1, 28, 28)
    x = u.astype(np.float32) / np.float32(255)
    return ((x - np.float32(0.2860)) / np.float32(0.3530)).astype(np.float32)

def check_run(d, steps, depth, eval_expected=True):
    errs = []
    def need(c, m):
        if not c: errs.append(m)
    cfg = json.load(open(os.path.join(d, "config.json")))
    need(isinstance(cfg, dict) and all(k in cfg for k in ("model", "data", "train", "opt", "run")),
         "config.json lacks sections: %s" % list(cfg))
    need(cfg["model"]["depth"] == depth, "config.json model.depth %s" % cfg["model"].get("depth"))
    need(cfg["train"]["steps"] == steps, "config.json train.steps %s" % cfg["train"].get("steps"))
    st = json.load(open(os.path.join(d, "status.json")))
    need(st.get("state") == "done", "status state %r" % st.get("state"))
    need(st.get("step") == steps, "status step %r" % st.get("step"))
    need(st.get("total_steps") == steps, "status total_steps %r" % st.get("total_steps"))
    need(st.get("world_size") == 1, "status world_size %r" % st.get("world_size"))
    need(isinstance(st.get("ranks"), list) and len(st["ranks"]) == 1, "status ranks %r" % st.get("ranks"))
    ev = st.get("eval") or {}
    t1 = ev.get("top1")
    need(isinstance(t1, (int, float)) and 0 <= t1 <= 1, "status eval.top1 %r" % t1)
    need(isinstance(st.get("loss"), (int, float)) and math.isfinite(st["loss"]), "status loss %r" % st.get("loss"))
    sp = st.get("signalprop") or {}
    blocks = sp.get("blocks") or []
    need(len(blocks) == depth, "signalprop has %d blocks, want %d" % (len(blocks), depth))
    for b in blocks:
        need(isinstance(b.get("mean_sq"), (int, float)) and isinstance(b.get("mean_token_cos"), (int, float)),
             "signalprop block %r" % b)
    lines = open(os.path.join(d, "metrics.jsonl")).read().splitlines()
    recs = []
    for i, l in enumerate(lines):
        try:
            recs.append(json.loads(l))
        except Exception as e:
            errs.append("metrics.jsonl line %d is not JSON: %r (%s)" % (i + 1, l[:80], e))
    train_steps = [r["step"] for r in recs if "train/loss" in r]
    want = list(range(10, steps + 1, 10))
    need(train_steps == want, "metrics train steps %r, want %r" % (train_steps, want))
    for r in recs:
        if "train/loss" in r:
            need(math.isfinite(r["train/loss"]), "non-finite train/loss %r" % r)
    evals = [r for r in recs if "val/acc" in r]
    if eval_expected:
        need(len(evals) >= 1 and evals[-1]["step"] == steps, "metrics eval lines %r" % evals)
        if evals and isinstance(t1, (int, float)):
            need(abs(evals[-1]["val/acc"] - t1) < 1e-5, "metrics val/acc %r vs status top1 %r" % (evals[-1], t1))
    for e in errs: print(e)
    return 1 if errs else 0

def status_field(d, field):
    st = json.load(open(os.path.join(d, "status.json")))
    v = st
    for k in field.split("."):
        v = v.get(k) if isinstance(v, dict) else None
    print(v)
    return 0

def mkinput(path, n, seed):
    rng = np.random.default_rng(int(seed))
    np.save(path, rng.standard_normal((int(n), 1, 28, 28)).astype(np.float32))
    return 0

def eval_logits(root, logits_path, n, printed_top1, input_logits=None):
    n = int(n)
    L = np.load(logits_path)
    if L.dtype != np.float32 or L.shape != (n, 10):
        print("logits %s %s, want float32 (%d, 10)" % (L.dtype, L.shape, n)); return 1
    if not np.isfinite(L).all():
        print("non-finite logits"); return 1
    y = labels(root, n)
    acc = float((L.argmax(1) == y).mean())
    if abs(acc - float(printed_top1)) > 0.5e-4 + 1e-9:
        print("argmax accuracy %.6f of the logits != printed top-1 %s" % (acc, printed_top1)); return 1
    if input_logits:
        Li = np.load(input_logits)
        err = float(np.abs(Li - L[:Li.shape[0]]).max())
        if err > 1e-5 * max(1.0, float(np.abs(L).max())):
            print("dataset-order logits differ from --input logits of the same images: max err %.3g" % err)
            return 1
    return 0

def last_train_loss(path):
    recs = [json.loads(l) for l in open(path)]
    print([r for r in recs if "train/loss" in r][-1]["train/loss"])
    return 0

if __name__ == "__main__":
    cmd = sys.argv[1]
    args = sys.argv[2:]
    if cmd == "synth": sys.exit(synth(args[0], int(args[1]), int(args[2])) or 0)
    if cmd == "check_run": sys.exit(check_run(args[0], int(args[1]), int(args[2])))
    if cmd == "status_field": sys.exit(status_field(args[0], args[1]))
    if cmd == "mkinput": sys.exit(mkinput(*args))
    if cmd == "images": np.save(args[2], images(args[0], int(args[1]))); sys.exit(0)
    if cmd == "eval_logits": sys.exit(eval_logits(*args))
    if cmd == "last_train_loss": sys.exit(last_train_loss(args[0]))
    if cmd == "json": json.load(open(args[0])); sys.exit(0)
    sys.exit("unknown helper command " + cmd)
PYEOF

if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  DATA=/usr/share/datasets/fashion-mnist
else
  DATA=$T/synth
  $PY "$H" synth "$DATA" 2048 1001 || notok "generate a synthetic IDX dataset"
fi
# run.threads=1: on a loaded 2-core machine the OpenMP pool of the default (all cores) can run 50x slower.
COMMON=(--set "data.root=$DATA" --set data.train_limit=2048 --set data.eval_limit=512 --set run.threads=1)
TINY=(--set model.dim=32 --set model.heads=2 --set model.mlp_dim=64 --set model.depth=7)

# expect_user_error NAME NEEDLE CMD...: exit code 2, exactly one line on stderr, and it contains NEEDLE.
expect_user_error() {
  local name=$1 needle=$2
  shift 2
  "$@" >"$T/out" 2>"$T/err"
  local rc=$? lines
  lines=$(wc -l <"$T/err")
  if [ "$rc" -eq 2 ] && [ "$lines" -eq 1 ] && grep -qF -- "$needle" "$T/err"; then
    ok "$name"
  else
    notok "$name" "exit $rc (want 2), $lines stderr lines (want 1), want '$needle' in:" "$(head -c 600 "$T/err")"
  fi
}

# ---------------------------------------------------------------- (a) config errors
mkcfg() { printf '%s\n' "$2" >"$T/$1"; echo "$T/$1"; }
C_UNKNOWN=$(mkcfg unknown.json '{"model": {"dimm": 32}, "train": {"batch_size": 64}, "opt": {"lr": 0.001}}')
C_TYPE=$(mkcfg type.json '{"model": {"depth": "eight"}, "train": {"batch_size": 64}, "opt": {"lr": 0.001}}')
C_RANGE=$(mkcfg range.json '{"model": {"drop_p": 1.5}, "train": {"batch_size": 64}, "opt": {"lr": 0.001}}')
C_JSON=$(mkcfg badjson.json $'{\n  "train": {"batch_size": 64},\n  "opt": {"lr": 0.001,}\n}')
expect_user_error "config: unknown key exits 2 naming it" "model.dimm" "$BIN" "$C_UNKNOWN"
expect_user_error "config: wrong type exits 2 naming the key" "model.depth" "$BIN" "$C_TYPE"
expect_user_error "config: out-of-range value exits 2 naming the key" "model.drop_p" "$BIN" "$C_RANGE"
expect_user_error "config: missing file exits 2 naming it" "$T/nonexistent.json" "$BIN" "$T/nonexistent.json"
expect_user_error "config: invalid JSON exits 2 naming the file" "badjson.json" "$BIN" "$C_JSON"
expect_user_error "config: unknown key in --set exits 2 naming it" "train.stepz" "$BIN" $CONFIG --set train.stepz=3
expect_user_error "config: --set with a bad value exits 2 naming the key" "train.batch_size" \
  "$BIN" $CONFIG --set train.batch_size=big
expect_user_error "config: --set without = exits 2" "train.steps" "$BIN" $CONFIG --set train.steps
expect_user_error "cli: unknown option exits 2 naming it" "--frobnicate" "$BIN" $CONFIG --frobnicate
expect_user_error "cli: eval without --checkpoint exits 2" "--checkpoint" "$BIN" eval $CONFIG
expect_user_error "config: SimplEsT depth 6 with eta 0.9 exits 2" "model.depth" \
  "$BIN" $CONFIG --set model.depth=6 --set model.eta=0.9
expect_user_error "check: a bad override exits 2 naming the key" "model.drop_p" \
  "$BIN" check configs/imagenet90.json --set model.drop_p=7
# `simplest-dist check`: every shipped config validates and prints its effective config (with the derived transforms)
for c in configs/*.json; do
  out=$("$BIN" check "$c" 2>"$T/check.err"); rc=$?
  if [ "$rc" = 0 ] && printf '%s' "$out" | "$PY" -c 'import json,sys; d=json.load(sys.stdin); sys.exit(0 if d["derived"]["train_transform"] and d["model"]["dim"] > 0 else 1)'; then
    ok "check: $c is valid (effective config printed, transforms named)"
  else
    notok "check: $c" "exit $rc" "$(cat "$T/check.err")"
  fi
done
# check sizes the job: the default config's model (spec §10 formula: D 128, M 256, depth 8, patch 7, 1 channel) and
# its length on Fashion-MNIST's standard 60,000 images (234 steps an epoch, 12 epochs), and data.train_limit shrinks it
out=$("$BIN" check configs/fashion-mnist.json --set data.train_limit=1000 --set train.eval_every=5 2>/dev/null)
if printf '%s' "$("$BIN" check configs/fashion-mnist.json 2>/dev/null)" | "$PY" -c '
import json, sys
d = json.load(sys.stdin)["derived"]; s = d["standard_split"]
D, M, L, p, C = 128, 256, 8, 7, 10
want = D * p * p + D + L * (3 * D * D + 3 * D + 2 * D * M + M + D) + D * C + C
sys.exit(0 if d["params"] == want and (s["train_images"], s["eval_images"], s["steps_per_epoch"], s["total_steps"],
          s["evaluations"], s["train_images_seen"]) == (60000, 10000, 234, 2808, 6, 2808 * 256) else 1)' &&
   printf '%s' "$out" | "$PY" -c '
import json, sys
s = json.load(sys.stdin)["derived"]["standard_split"]
sys.exit(0 if (s["train_images"], s["steps_per_epoch"], s["total_steps"], s["evaluations"]) == (1000, 3, 36, 8) else 1)'; then
  ok "check: derived params and standard_split (T, evaluations; data.train_limit counted)"
else
  notok "check: derived params and standard_split" "$out"
fi
# a batch larger than the standard split: check still validates (the real data may differ) but warns
err=$("$BIN" check configs/fashion-mnist.json --set train.batch_size=70000 2>&1 >/dev/null); rc=$?
if [ "$rc" = 0 ] && grep -q "warning: config key 'train.batch_size': 70000 is larger than the 60000 training images" <<<"$err"; then
  ok "check: warns when the batch exceeds the standard split"
else
  notok "check: batch larger than the split" "exit $rc" "$err"
fi
if ldd "$BIN" 2>/dev/null | grep -q cudart; then
  ok "config: run.device cuda without a CUDA build exits 2 # SKIP this build has CUDA"
else
  expect_user_error "config: run.device cuda without a CUDA build exits 2" "run.device" \
    "$BIN" $CONFIG "${COMMON[@]}" --set run.device=cuda --set "run.dir=$T/cuda-run"
fi

# ---------------------------------------------------------------- (b) dataset errors
mkdir -p "$T/emptyroot" "$T/truncroot" "$T/junkroot"
expect_user_error "data: empty data.root exits 2 naming the file" "$T/emptyroot/train-images-idx3-ubyte" \
  "$BIN" $CONFIG "${TINY[@]}" --set "data.root=$T/emptyroot" --set "run.dir=$T/r-empty"
cp "$DATA/train-labels-idx1-ubyte.gz" "$DATA/t10k-images-idx3-ubyte.gz" "$DATA/t10k-labels-idx1-ubyte.gz" \
  "$T/truncroot/"
head -c 20000 "$DATA/train-images-idx3-ubyte.gz" >"$T/truncroot/train-images-idx3-ubyte.gz"
expect_user_error "data: truncated gz exits 2 naming the file" "$T/truncroot/train-images-idx3-ubyte.gz" \
  "$BIN" $CONFIG "${TINY[@]}" --set "data.root=$T/truncroot" --set "run.dir=$T/r-trunc"
cp "$DATA"/*.gz "$T/junkroot/"
head -c 5000 /dev/urandom >"$T/junkroot/t10k-labels-idx1-ubyte.gz"
expect_user_error "data: a corrupt eval label file exits 2 naming it" "$T/junkroot/t10k-labels-idx1-ubyte.gz" \
  "$BIN" $CONFIG "${TINY[@]}" --set "data.root=$T/junkroot" --set "run.dir=$T/r-junk"
left=$(ls -d "$T"/r-empty* "$T"/r-trunc* "$T"/r-junk* 2>/dev/null)
if [ -z "$left" ]; then ok "data: a run that fails on its data creates no run directory"
else notok "data: a run that fails on its data creates no run directory" "$left"; fi

# ---------------------------------------------------------------- (c) a short training run
RUN1=$T/run1
t=$SECONDS
"$BIN" $CONFIG "${COMMON[@]}" "${TINY[@]}" --set train.steps=30 --set train.log_every=10 --set train.batch_size=64 \
  --set "run.dir=$RUN1" \
  >"$T/train1.out" 2>"$T/train1.err"
rc=$?
echo "# train 30 steps: $((SECONDS - t)) s"
if [ $rc -eq 0 ]; then ok "train: 30 steps exit 0"; else notok "train: 30 steps exit 0" "exit $rc" "$(tail -5 "$T/train1.err")"; fi
missing=""
for f in config.json status.json metrics.jsonl model.safetensors; do [ -s "$RUN1/$f" ] || missing="$missing $f"; done
if [ -z "$missing" ]; then ok "train: run dir has config.json status.json metrics.jsonl model.safetensors"
else notok "train: run dir has config.json status.json metrics.jsonl model.safetensors" "missing:$missing"; fi
if msg=$($PY "$H" check_run "$RUN1" 30 7 2>&1); then
  ok "train: status.json, metrics.jsonl and config.json contents"
else
  notok "train: status.json, metrics.jsonl and config.json contents" "$msg"
fi
if [ $rc -eq 0 ] && grep -q '^step 30/30' "$T/train1.out"; then ok "train: progress lines on stdout"
else notok "train: progress lines on stdout" "$(head -5 "$T/train1.out")"; fi
# The effective config loads back as a config: eval with it and the run's weights.
"$BIN" eval "$RUN1/config.json" --checkpoint "$RUN1/model.safetensors" >"$T/eval1.out" 2>"$T/eval1.err"
rc=$?
top1_run=$($PY "$H" status_field "$RUN1" eval.top1 2>/dev/null)
top1_eval=$(sed -n 's/.*top-1 \([0-9.]*\).*/\1/p' "$T/eval1.out" | head -1)
if [ $rc -eq 0 ] && [ -n "$top1_eval" ] && $PY -c "import sys; sys.exit(abs(float('$top1_run') - float('$top1_eval')) > 0.5e-4)"; then
  ok "train: config.json loads back; eval of the weights reproduces the run's top-1"
else
  notok "train: config.json loads back; eval of the weights reproduces the run's top-1" "exit $rc, run top-1 $top1_run," \
    "eval: $(cat "$T/eval1.out" "$T/eval1.err" | tail -3)"
fi
# Rerun into the same run.dir with another config: refused (the run would resume; docs/checkpoints.md), with one
# line naming the key and nothing touched; with run.resume "never" the first run moves to run1.1 unchanged.
(cd "$RUN1" && find . -type f -exec md5sum {} + | sort -k2) >"$T/run1.md5" 2>/dev/null
"$BIN" $CONFIG "${COMMON[@]}" "${TINY[@]}" --set train.steps=2 --set train.log_every=1 --set train.batch_size=64 \
  --set "run.dir=$RUN1" >"$T/train2.out" 2>"$T/train2.err"
rc=$?
same=$( (cd "$RUN1" && find . -type f -exec md5sum {} + | sort -k2) )
if [ $rc -eq 2 ] && [ "$(wc -l < "$T/train2.err")" = 1 ] && grep -q "config key 'train.steps'" "$T/train2.err" &&
   [ "$same" = "$(cat "$T/run1.md5")" ]; then
  ok "train: a rerun with another train.steps is refused in one line naming the key, the run untouched"
else
  notok "train: a rerun with another train.steps is refused in one line naming the key, the run untouched" \
    "exit $rc; $(head -c 300 "$T/train2.err")"
fi
"$BIN" $CONFIG "${COMMON[@]}" "${TINY[@]}" --set train.steps=2 --set train.log_every=1 --set train.batch_size=64 \
  --set "run.dir=$RUN1" --set run.resume=never >"$T/train2.out" 2>"$T/train2.err"
rc=$?
after=$( (cd "$RUN1.1" 2>/dev/null && find . -type f -exec md5sum {} + | sort -k2) )
if [ $rc -eq 0 ] && [ -d "$RUN1.1" ] && [ "$after" = "$(cat "$T/run1.md5")" ] && [ -s "$RUN1/model.safetensors" ] &&
  [ "$($PY "$H" status_field "$RUN1" step)" = 2 ]; then
  ok "train: a rerun with run.resume never moves the earlier run to run1.1 with nothing lost"
else
  notok "train: a rerun with run.resume never moves the earlier run to run1.1 with nothing lost" "exit $rc; $(ls -d "$RUN1"* | tr '\n' ' ')" \
    "$(tail -2 "$T/train2.err")"
fi

# ---------------------------------------------------------------- (d) eval round trips against PyTorch
$PY "$H" mkinput "$T/X.npy" 24 11
for arch in simplest simplevit; do
  for compat in false true; do
    name="$arch seed_compat=$compat"
    d=$T/rt-$arch-$compat
    depth=7
    [ $arch = simplevit ] && depth=2
    "$BIN" $CONFIG --set "data.root=$DATA" --set data.train_limit=256 --set data.eval_limit=64 \
      --set model.dim=32 --set model.heads=2 --set model.mlp_dim=64 --set model.depth=$depth \
      --set model.arch=$arch --set model.seed_compat=$compat --set train.batch_size=32 --set train.steps=4 \
      --set train.warmup_steps=0 --set opt.lr=0.003 --set run.threads=1 --set "run.dir=$d" >"$d.train.log" 2>&1
    rc=$?
    if [ $rc -ne 0 ]; then notok "eval round trip vs PyTorch: $name" "training exit $rc" "$(tail -3 "$d.train.log")"; continue; fi
    "$BIN" eval "$d/config.json" --checkpoint "$d/model.safetensors" --input "$T/X.npy" --logits "$d/L.npy" \
      >"$d.eval.log" 2>&1
    rc=$?
    if [ $rc -ne 0 ]; then notok "eval round trip vs PyTorch: $name" "eval exit $rc" "$(tail -3 "$d.eval.log")"; continue; fi
    if msg=$($PY tests/reference/check_logits.py "$d/model.safetensors" "$T/X.npy" "$d/L.npy" 2>&1); then
      ok "eval round trip vs PyTorch: $name"
      echo "# $msg"
    else
      notok "eval round trip vs PyTorch: $name" "$msg"
    fi
  done
done
# Dataset eval: the printed top-1 equals the argmax accuracy of the logits written in dataset order, and those
# logits equal the --input logits of the same images normalized in numpy.
N=300
$PY "$H" images "$DATA" 40 "$T/first40.npy"
"$BIN" eval "$RUN1.1/config.json" --checkpoint "$RUN1.1/model.safetensors" --set data.eval_limit=$N \
  --logits "$T/Ld.npy" >"$T/evald.out" 2>"$T/evald.err"
rc=$?
"$BIN" eval "$RUN1.1/config.json" --checkpoint "$RUN1.1/model.safetensors" --input "$T/first40.npy" \
  --logits "$T/Li.npy" >/dev/null 2>>"$T/evald.err"
rc2=$?
top1=$(sed -n 's/.*top-1 \([0-9.]*\).*/\1/p' "$T/evald.out" | head -1)
if [ $rc -eq 0 ] && [ $rc2 -eq 0 ] && [ -n "$top1" ] && grep -q "$N images" "$T/evald.out" &&
  msg=$($PY "$H" eval_logits "$DATA" "$T/Ld.npy" $N "$top1" "$T/Li.npy" 2>&1); then
  ok "eval on the dataset: printed top-1 = argmax accuracy of [N, 10] logits in dataset order"
else
  notok "eval on the dataset: printed top-1 = argmax accuracy of [N, 10] logits in dataset order" \
    "exit $rc/$rc2, top-1 '$top1'" "${msg:-}" "$(cat "$T/evald.out" "$T/evald.err" | tail -4)"
fi

# ---------------------------------------------------------------- (e) bad checkpoints
SV=$T/rt-simplevit-false
ST=$T/rt-simplest-false
head -c $(($(stat -c %s "$ST/model.safetensors") / 2)) "$ST/model.safetensors" >"$T/trunc.safetensors"
expect_user_error "eval: a checkpoint of the other arch exits 2 naming it" "$SV/model.safetensors" \
  "$BIN" eval "$ST/config.json" --checkpoint "$SV/model.safetensors" --input "$T/X.npy"
expect_user_error "eval: a checkpoint of another shape exits 2 naming it" "$ST/model.safetensors" \
  "$BIN" eval "$ST/config.json" --set model.dim=48 --checkpoint "$ST/model.safetensors" --input "$T/X.npy"
expect_user_error "eval: a checkpoint of the other seed_compat mode exits 2 naming it" "$ST/model.safetensors" \
  "$BIN" eval "$ST/config.json" --set model.seed_compat=true --checkpoint "$ST/model.safetensors" --input "$T/X.npy"
expect_user_error "eval: a truncated checkpoint exits 2 naming it" "$T/trunc.safetensors" \
  "$BIN" eval "$ST/config.json" --checkpoint "$T/trunc.safetensors" --input "$T/X.npy"
expect_user_error "eval: a nonexistent checkpoint exits 2 naming it" "$T/none.safetensors" \
  "$BIN" eval "$ST/config.json" --checkpoint "$T/none.safetensors" --input "$T/X.npy"
$PY -c "import numpy as np; np.save('$T/X3.npy', np.zeros((2, 3, 28, 28), np.float32))"
expect_user_error "eval: an --input of the wrong shape exits 2 naming it" "$T/X3.npy" \
  "$BIN" eval "$ST/config.json" --checkpoint "$ST/model.safetensors" --input "$T/X3.npy"

# ---------------------------------------------------------------- (f) SIGTERM
SIG=$T/sigrun
"$BIN" $CONFIG "${COMMON[@]}" "${TINY[@]}" --set train.batch_size=32 --set train.steps=100000 \
  --set train.log_every=1 --set "run.dir=$SIG" >"$T/sig.out" 2>"$T/sig.err" &
pid=$!
for _ in $(seq 1 300); do
  [ -s "$SIG/status.json" ] && break
  kill -0 $pid 2>/dev/null || break
  sleep 0.1
done
if [ -s "$SIG/status.json" ]; then
  t=$SECONDS
  kill -TERM $pid
  for _ in $(seq 1 100); do kill -0 $pid 2>/dev/null || break; sleep 0.1; done
  if kill -0 $pid 2>/dev/null; then
    kill -KILL $pid 2>/dev/null
    wait $pid 2>/dev/null
    notok "SIGTERM: exits 0 with state stopped and weights" "still running 10 s after SIGTERM"
  else
    wait $pid
    rc=$?
    state=$($PY "$H" status_field "$SIG" state 2>&1)
    step=$($PY "$H" status_field "$SIG" step 2>&1)
    if [ $rc -eq 0 ] && [ "$state" = stopped ] && [ -s "$SIG/model.safetensors" ] && [ "$step" -ge 1 ] 2>/dev/null &&
      [ "$step" -lt 100000 ]; then
      ok "SIGTERM: exits 0 with state stopped and weights"
      echo "# stopped at step $step, $((SECONDS - t)) s after SIGTERM"
    else
      notok "SIGTERM: exits 0 with state stopped and weights" "exit $rc, state '$state', step '$step'" \
        "$(ls "$SIG")" "$(tail -3 "$T/sig.err")"
    fi
  fi
else
  kill -KILL $pid 2>/dev/null
  wait $pid 2>/dev/null
  notok "SIGTERM: exits 0 with state stopped and weights" "status.json never appeared" "$(tail -3 "$T/sig.err")"
fi

echo "# test_cli.sh: $((SECONDS - T0)) s"
[ $failed -eq 0 ] && rm -rf "$T"
exit $failed
