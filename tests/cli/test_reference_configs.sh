#!/usr/bin/env bash
# configs/reference/ (the reference's 18 published runs) and configs/imagenet90.json against the spec: `simplest-dist
# check` must print the parameter counts of spec/model.md §10, the run lengths of §3.2 and the setups of §12.12, and
# configs/reference/README.md must list each config with its published top-1 (§12.12's table). The expected numbers
# are written here from the spec, not computed by the code under test. Then one config of each model/optimizer pair
# trains two steps at full width on a generated CIFAR-10 fixture, so that the files are not only valid but usable.
set -u
BIN=${SIMPLEST_BIN:-./simplest-dist}
TMP=${TEST_TMP:-$(mktemp -d)}/reference_configs
PY=${PYTHON:-/usr/bin/python3}
rm -rf "$TMP"; mkdir -p "$TMP"
n=0
for c in configs/reference/*/*.json configs/imagenet90.json; do
  name=${c#configs/}; name=${name//\//_}
  if "$BIN" check "$c" >"$TMP/$name.out" 2>"$TMP/$name.err"; then n=$((n + 1)); else
    echo "not ok - check $c"; cat "$TMP/$name.err"; fi
done
"$PY" - "$TMP" <<'PYEOF'
import glob, json, os, re, sys
tmp = sys.argv[1]
def ok(cond, name, detail=""):
    print(("ok - " if cond else "not ok - ") + name + ("" if cond or not detail else "  # " + str(detail)))

# spec/model.md §10 (trainable parameters), SimplEsT-ViT and SimpleViT without to_out (seed_compat)
PARAMS = {("cifar10", "simplest"): 19523722, ("cifar100", "simplest"): 19558372, ("tiny", "simplest"): 19652168,
          ("cifar10", "simplevit"): 19529098, ("cifar100", "simplevit"): 19563748, ("tiny", "simplevit"): 19657544}
QKV_BIAS_S = 13824  # L * 3D for S: what model.qkv_bias false removes
# §3.2: dataset, image, patch, classes, T (90 epochs of floor(n / 2048) steps); §12.10: evaluations every 240
RUN = {"cifar10": ("cifar10", 32, 4, 10, 50000, 2160), "cifar100": ("cifar100", 32, 4, 100, 50000, 2160),
       "tiny": ("tiny-imagenet", 64, 8, 200, 100000, 4320)}
# §12.12 published top-1 (TAT setup, SimpleViT setup)
PUBLISHED = {("tat", "cifar10", "simplevit", "adam"): 0.8334, ("tat", "cifar10", "simplest", "adam"): 0.7936,
             ("tat", "cifar10", "simplest", "shampoo"): 0.8243, ("tat", "cifar100", "simplevit", "adam"): 0.5880,
             ("tat", "cifar100", "simplest", "adam"): 0.4687, ("tat", "cifar100", "simplest", "shampoo"): 0.5506,
             ("tat", "tiny", "simplevit", "adam"): 0.4529, ("tat", "tiny", "simplest", "adam"): 0.3847,
             ("tat", "tiny", "simplest", "shampoo"): 0.4208,
             ("simplevit", "cifar10", "simplevit", "adam"): 0.8733, ("simplevit", "cifar10", "simplest", "adam"): 0.7894,
             ("simplevit", "cifar10", "simplest", "shampoo"): 0.8496,
             ("simplevit", "cifar100", "simplevit", "adam"): 0.6439,
             ("simplevit", "cifar100", "simplest", "adam"): 0.4776,
             ("simplevit", "cifar100", "simplest", "shampoo"): 0.5899,
             ("simplevit", "tiny", "simplevit", "adam"): 0.5152, ("simplevit", "tiny", "simplest", "adam"): 0.3966,
             ("simplevit", "tiny", "simplest", "shampoo"): 0.4490}
LR_GRID = {("simplest", "adam"): (5e-4, 3e-4), ("simplevit", "adam"): (1e-3,), ("simplest", "shampoo"): (7e-4, 5e-4)}

# the spec's per-block formula (§10) as a second, independent count
def formula(arch, D, M, L, C, p, qkv_bias=True):
    patch = D * 3 * p * p + D
    if arch == "simplest":
        block = 3 * D * D + (3 * D if qkv_bias else 0) + 2 * D * M + M + D
        head = D * C + C
    else:  # SimpleViT without to_out: 4D^2 - D^2
        block = 3 * D * D + 2 * D * M + M + 5 * D
        head = 2 * D + D * C + C
    return patch + L * block + head

files = sorted(glob.glob("configs/reference/*/*.json"))
ok(len(files) == 18 and len(set(files)) == 18, "configs/reference has one config per published result (18)", len(files))
readme = open("configs/reference/README.md").read()
seen = set()
for f in files:
    setup = os.path.basename(os.path.dirname(f))
    m = re.fullmatch(r"(cifar10|cifar100|tiny)-(simplest|simplevit)-(adam|shampoo)\.json", os.path.basename(f))
    if not m or setup not in ("tat", "simplevit"):
        ok(False, "%s: name is <setup>/<dataset>-<arch>-<opt>.json" % f); continue
    key = (setup,) + m.groups()
    ds, arch, opt = m.groups()
    seen.add(key)
    out = os.path.join(tmp, ("reference/%s/%s" % (setup, os.path.basename(f))).replace("/", "_") + ".out")
    try:
        e = json.load(open(out))
    except Exception as ex:
        ok(False, "%s: check printed JSON" % f, ex); continue
    mo, da, tr, op, dv = e["model"], e["data"], e["train"], e["opt"], e["derived"]
    dname, img, p, C, ntrain, T = RUN[ds]
    want = PARAMS[(ds, arch)] - (QKV_BIAS_S if arch == "simplest" and not mo["qkv_bias"] else 0)
    ok(dv["params"] == want == formula(arch, 384, 1536, 12, C, p, mo["qkv_bias"]),
       "%s: %d trainable parameters (spec §10)" % (f, want), dv["params"])
    sp = dv.get("standard_split", {})
    ok(sp.get("train_images") == ntrain and sp.get("steps_per_epoch") == ntrain // 2048 and sp.get("total_steps") == T
       and sp.get("evaluations") == T // 240, "%s: T = %d, %d evaluations (spec §3.2)" % (f, T, T // 240), sp)
    shape = (mo["arch"], mo["dim"], mo["heads"], mo["mlp_dim"], mo["depth"], mo["image_size"], mo["patch_size"],
             mo["num_classes"], mo["eta"], mo["gamma_L"], mo["seed_compat"], mo["mlp_bias"], da["dataset"])
    ok(shape == (arch, 384, 6, 1536, 12, img, p, C, 0.9, 0.005, True, True, dname), "%s: S/%d model on %s" % (f, p, dname), shape)
    rec = (tr["epochs"], tr["steps"], tr["batch_size"], tr["grad_accum"], tr["warmup_steps"], tr["clip"],
           tr["eval_every"], tr["seed"], op["weight_decay"], op["weight_decay_mode"], tr["ema"], tr["sam"])
    ok(rec == (90, 0, 2048, 1, 75, 1.0, 240, 3407, 5e-5, "l2", False, False), "%s: recipe (spec §12)" % f, rec)
    if setup == "tat":
        s = (tr["label_smoothing"], tr["mixup_alpha"], da["augment"], mo["drop_p"])
        ok(s == (0.1, 0, False, 0.2), "%s: TAT setup (smoothing, dropout, no augmentation)" % f, s)
    else:
        s = (tr["label_smoothing"], tr["mixup_alpha"], da["augment"], mo["drop_p"], da["crop_padding"], da["flip"],
             da["randaugment"], da["randaugment_magnitude"])
        ok(s == (0, 0.2, True, 0, 4, True, True, 10), "%s: SimpleViT setup (crop, flip, RandAugment(2, 10), Mixup 0.2)" % f, s)
    ok(op["name"] == opt and op["lr"] in LR_GRID[(arch, opt)], "%s: %s at lr %g (grid %s)" % (f, opt, op["lr"], LR_GRID[(arch, opt)]))
    if opt == "shampoo":
        sh = e["shampoo"]
        s = (sh["precondition_frequency"], sh["start_preconditioning_step"], sh["eps"], sh["max_preconditioner_dim"],
             sh["betas"], sh["graft_beta2"], sh["graft_eps"], sh["momentum"], mo["qkv_bias"])
        ok(s == (25, 25, 1e-12, 8192, [0.9, 0.999], 0.999, 1e-8, 0, False), "%s: Shampoo@25 as the reference ran it" % f, s)
    row = re.search(r"\| `%s/%s` \|[^\n]*\| ([0-9.]+) \|\n" % (setup, re.escape(os.path.basename(f))), readme)
    ok(row is not None and float(row.group(1)) == PUBLISHED[key], "%s: README lists published top-1 %.4f" % (f, PUBLISHED[key]),
       row and row.group(1))
ok(seen == set(PUBLISHED), "every published result has its config", sorted(set(PUBLISHED) - seen))

# configs/imagenet90.json: the reference's S/16 ImageNet run (§3.2, §12.12: Shampoo@25, lr 3e-4, wd 1e-5, TAT setup)
e = json.load(open(os.path.join(tmp, "imagenet90.json.out")))
mo, tr, op, dv = e["model"], e["train"], e["opt"], e["derived"]
ok(dv["params"] == 20181352 == formula("simplest", 384, 1536, 12, 1000, 16), "imagenet90: 20,181,352 parameters", dv["params"])
sp = dv["standard_split"]
ok((sp["train_images"], sp["steps_per_epoch"], sp["total_steps"], sp["evaluations"]) == (1281167, 1251, 112590, 30),
   "imagenet90: T = 112,590 and an evaluation every 3753 steps", sp)
s = (mo["patch_size"], mo["image_size"], tr["batch_size"], tr["grad_accum"], tr["warmup_steps"], op["name"], op["lr"],
     op["weight_decay"], tr["label_smoothing"], mo["drop_p"], e["data"]["augment"])
ok(s == (16, 224, 1024, 2, 10000, "shampoo", 3e-4, 1e-5, 0.1, 0.2, False), "imagenet90: the reference's recipe (TAT setup)", s)
PYEOF
# usable, not only valid: two steps of each model/optimizer pair at full width on a CIFAR-10 fixture (the Shampoo
# state at b = 8192 included); the run directory is the test's.
mkdir -p "$TMP/data/cifar-10-batches-bin"
"$PY" - "$TMP/data/cifar-10-batches-bin" <<'PYEOF'
import os, sys
d = sys.argv[1]
for name, n in [("data_batch_%d.bin" % b, 8) for b in range(1, 6)] + [("test_batch.bin", 8)]:
    with open(os.path.join(d, name), "wb") as f:
        for i in range(n):
            f.write(bytes([i % 10]) + bytes(((i * 37 + p * 11) % 256) for p in range(3072)))
PYEOF
for c in tat/cifar10-simplest-shampoo simplevit/cifar10-simplest-adam simplevit/cifar10-simplevit-adam; do
  run="$TMP/run_${c//\//_}"
  if "$BIN" "configs/reference/$c.json" --set data.root="$TMP/data" --set train.batch_size=8 --set train.steps=2 \
       --set train.log_every=1 --set data.threads=1 --set run.dir="$run" >"$TMP/log" 2>&1 &&
     "$PY" -c 'import json,sys; s=json.load(open(sys.argv[1])); sys.exit(0 if s["state"]=="done" and s["step"]==2 else 1)' "$run/status.json"; then
    echo "ok - configs/reference/$c.json trains (2 steps, full width, CIFAR-10 fixture)"
  else
    echo "not ok - configs/reference/$c.json trains"; tail -5 "$TMP/log"
  fi
done
