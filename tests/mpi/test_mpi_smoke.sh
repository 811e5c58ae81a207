#!/usr/bin/env bash
# test_mpi_smoke.sh: the binary under mpirun (run from the repo root by tests/run.sh, with SIMPLEST_BIN and TEST_TMP
# set). A tiny model trains 10 steps at batch 32 with np=1 and np=2: both must succeed, only rank 0 may write the run
# directory, and the final training losses must agree. Eval of one checkpoint at np=3 must give the same top-1
# count as np=1 on 1001 images (uneven shards 333/334/334). Prints "ok - ... # SKIP" when mpirun is missing.
set -u
cd "$(dirname "$0")/../.." || exit 1
BIN=${SIMPLEST_BIN:-$PWD/simplest-dist}
PY=/usr/bin/python3
ROOT_TMP=${TEST_TMP:-$(mktemp -d /tmp/simplest-tests.XXXXXX)}
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

if ! command -v mpirun >/dev/null 2>&1; then
  ok "mpi smoke: np=1 vs np=2 training, np=3 eval # SKIP mpirun not found"
  exit 0
fi
if [ ! -x "$BIN" ]; then
  notok "binary exists" "SIMPLEST_BIN=$BIN is not executable (run make)"
  exit 1
fi
T=$(mktemp -d "$ROOT_TMP/mpi.XXXXXX")
export OMPI_MCA_rmaps_base_oversubscribe=1
MPIRUN=(mpirun --oversubscribe)
[ "$(id -u)" = 0 ] && MPIRUN+=(--allow-run-as-root)

if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  DATA=/usr/share/datasets/fashion-mnist
else  # a Fashion-MNIST-shaped IDX dataset: 2048 train and 1001 eval images
  DATA=$T/synth
  $PY - "$DATA" <<'PYEOF' || notok "generate a synthetic IDX dataset"
import gzip, os, struct, sys
import numpy as np
root = sys.argv[1]
os.makedirs(root, exist_ok=True)
rng = np.random.default_rng(5)
for split, n in (("train", 2048), ("t10k", 1001)):
    labels = rng.integers(0, 10, size=n)
    imgs = rng.integers(0, 60, size=(n, 28, 28))
    for i, y in enumerate(labels):
        imgs[i, :, y * 2:y * 2 + 6] += 150
    with gzip.open(os.path.join(root, "%s-images-idx3-ubyte.gz" % split), "wb") as f:
        f.write(struct.pack(">IIII", 0x803, n, 28, 28) + np.clip(imgs, 0, 255).astype(np.uint8).tobytes())
    with gzip.open(os.path.join(root, "%s-labels-idx1-ubyte.gz" % split), "wb") as f:
        f.write(struct.pack(">II", 0x801, n) + labels.astype(np.uint8).tobytes())
PYEOF
fi

# run.threads=1: one OpenMP thread per rank, so that 2-3 ranks share a 2-core machine without oversubscription.
ARGS=(--set "data.root=$DATA" --set data.train_limit=2048 --set data.eval_limit=512 --set run.threads=1
  --set model.dim=32 --set model.heads=2 --set model.mlp_dim=64 --set model.depth=7
  --set train.steps=10 --set train.log_every=10 --set train.batch_size=32)

# Every run writes under its own parent folder, so that anything a non-zero rank writes (or moves aside) shows.
for np in 1 2; do
  mkdir -p "$T/np$np"
  t=$SECONDS
  "${MPIRUN[@]}" -np $np "$BIN" $CONFIG "${ARGS[@]}" --set "run.dir=$T/np$np/run" >"$T/np$np.out" 2>"$T/np$np.err"
  rc=$?
  echo "# train np=$np: $((SECONDS - t)) s"
  if [ $rc -eq 0 ]; then ok "mpi: train 10 steps at np=$np exits 0"
  else notok "mpi: train 10 steps at np=$np exits 0" "exit $rc" "$(tail -5 "$T/np$np.err")"; fi
done

# Only rank 0 writes: one run directory holding exactly the expected files, one record per log step, no duplicates.
check=$($PY - "$T" <<'PYEOF' 2>&1
import json, os, sys
T = sys.argv[1]
errs = []
for np_ in (1, 2):
    parent = os.path.join(T, "np%d" % np_)
    entries = sorted(os.listdir(parent))
    if entries != [".run.lock", "run"]:  # the run directory and rank 0's lock beside it (docs/checkpoints.md)
        errs.append("np=%d: %s holds %s, want only run/ and .run.lock" % (np_, parent, entries))
    d = os.path.join(parent, "run")
    files = sorted(os.listdir(d)) if os.path.isdir(d) else []
    want = ["checkpoints", "config.json", "metrics.jsonl", "model.safetensors", "status.json"]
    if files != want:
        errs.append("np=%d: run dir holds %s, want %s" % (np_, files, want))
        continue
    ck = sorted(os.listdir(os.path.join(d, "checkpoints")))
    if ck != ["latest", "step_00000010"]:
        errs.append("np=%d: checkpoints/ holds %s, want latest and step_00000010" % (np_, ck))
    recs = [json.loads(l) for l in open(os.path.join(d, "metrics.jsonl"))]
    train = [r["step"] for r in recs if "train/loss" in r]
    evals = [r["step"] for r in recs if "val/acc" in r]
    if train != [10] or evals != [10]:
        errs.append("np=%d: metrics.jsonl train steps %s, eval steps %s; want [10] and [10]" % (np_, train, evals))
    st = json.load(open(os.path.join(d, "status.json")))
    ranks = st.get("ranks") or []
    if st.get("state") != "done" or st.get("world_size") != np_ or len(ranks) != np_ or \
            sorted(r.get("rank") for r in ranks) != list(range(np_)) or any(r.get("step") != 10 for r in ranks):
        errs.append("np=%d: status state %r world_size %r ranks %r" % (np_, st.get("state"), st.get("world_size"),
                                                                      ranks))
print("\n".join(errs))
sys.exit(1 if errs else 0)
PYEOF
)
if [ $? -eq 0 ]; then ok "mpi: only rank 0 writes the run directory (np=1, np=2)"
else notok "mpi: only rank 0 writes the run directory (np=1, np=2)" "$check"; fi

# The final losses agree within 1e-3 relative. The global batch is world-size independent (tests/unit/test_data.c
# checks it bitwise), so the only difference is the order of the gradient and loss sums across ranks. Bit-exact
# agreement across world sizes is a later issue; until then this bound is the contract.
loss=$($PY - "$T/np1/run/metrics.jsonl" "$T/np2/run/metrics.jsonl" <<'PYEOF' 2>&1
import json, sys
l = []
for p in sys.argv[1:]:
    l.append([json.loads(x) for x in open(p) if "train/loss" in x][-1]["train/loss"])
rel = abs(l[0] - l[1]) / abs(l[0])
print("np=1 %.7g, np=2 %.7g, rel diff %.3g" % (l[0], l[1], rel))
sys.exit(0 if rel <= 1e-3 else 1)
PYEOF
)
if [ $? -eq 0 ]; then ok "mpi: final training loss at np=2 matches np=1 within 1e-3 relative"; echo "# $loss"
else notok "mpi: final training loss at np=2 matches np=1 within 1e-3 relative" "$loss"; fi

# Eval of one checkpoint on 1001 images: np=3 (shards 333/334/334) gives the same top-1 count as np=1.
CK=$T/np1/run
for np in 1 3; do
  "${MPIRUN[@]}" -np $np "$BIN" eval "$CK/config.json" --checkpoint "$CK/model.safetensors" \
    --set data.eval_limit=1001 --logits "$T/L$np.npy" >"$T/eval$np.out" 2>"$T/eval$np.err"
  echo "$?" >"$T/eval$np.rc"
done
line1=$(grep 'top-1' "$T/eval1.out" | head -1)
line3=$(grep 'top-1' "$T/eval3.out" | head -1)
res=$($PY - "$line1" "$line3" "$T/L1.npy" "$T/L3.npy" <<'PYEOF' 2>&1
import re, sys
import numpy as np
def parse(line):
    m = re.search(r"top-1 ([0-9.]+) \| top-5 ([0-9.]+) \| loss ([0-9.]+) \| (\d+) images", line)
    if not m:
        raise SystemExit("cannot parse eval line %r" % line)
    return float(m.group(1)), float(m.group(2)), float(m.group(3)), int(m.group(4))
a, b = parse(sys.argv[1]), parse(sys.argv[2])
n = a[3]
c1, c3 = round(a[0] * n), round(b[0] * n)  # 4 printed decimals identify the count exactly for n <= 5000
print("np=1: %d/%d top-1, np=3: %d/%d" % (c1, n, c3, b[3]))
errs = []
if n != 1001 or b[3] != 1001: errs.append("image counts %d and %d, want 1001" % (n, b[3]))
if c1 != c3: errs.append("top-1 counts differ")
if round(a[1] * n) != round(b[1] * n): errs.append("top-5 counts differ: %s vs %s" % (a[1], b[1]))
if abs(a[2] - b[2]) > 1e-3: errs.append("losses differ: %s vs %s" % (a[2], b[2]))
L1, L3 = np.load(sys.argv[3]), np.load(sys.argv[4])
if L1.shape != (1001, 10) or L3.shape != (1001, 10):
    errs.append("logits shapes %s %s" % (L1.shape, L3.shape))
else:
    err = float(np.abs(L1 - L3).max())
    if err > 1e-5 * max(1.0, float(np.abs(L1).max())):
        errs.append("np=3 logits differ from np=1 by %.3g" % err)
print("\n".join(errs))
sys.exit(1 if errs else 0)
PYEOF
)
rc=$?
if [ "$(cat "$T/eval1.rc")" = 0 ] && [ "$(cat "$T/eval3.rc")" = 0 ] && [ $rc -eq 0 ]; then
  ok "mpi: eval at np=3 gives the same top-1 count as np=1 on 1001 images"
  echo "# $(echo "$res" | head -1)"
else
  notok "mpi: eval at np=3 gives the same top-1 count as np=1 on 1001 images" \
    "exit np=1 $(cat "$T/eval1.rc"), np=3 $(cat "$T/eval3.rc")" "$res" "$(tail -3 "$T/eval3.err")"
fi

echo "# test_mpi_smoke.sh: $((SECONDS - T0)) s"
[ $failed -eq 0 ] && rm -rf "$T"
exit $failed
