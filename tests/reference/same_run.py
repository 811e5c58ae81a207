"""Do two run directories hold the same run?  Used by the resume tests (docs/checkpoints.md).

usage: same_run.py A B [--eval-rtol R] [--weights-only]

Compares, tensor by tensor and bit for bit: the exported model.safetensors, and the newest checkpoint of A
(checkpoints/latest) against the same step of B: model, optimizer and EMA files. Then every metrics.jsonl record
without its timings (time_s, images_per_sec, allreduce_wait_s, skew_wait_s), exactly, except the eval losses
(val/loss, val/loss_bm) within a relative R (default 0: exact; runs at other world sizes evaluate in other batch
sizes). --weights-only compares the exported weights alone. Prints "identical" or "differ: WHAT, ..."; exit 0 or 1.
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st  # noqa: E402

TIMINGS = ("time_s", "images_per_sec", "allreduce_wait_s", "skew_wait_s")
EVAL_LOSSES = ("val/loss", "val/loss_bm")


def same_tensors(pa, pb):
    a, _ = st.load(pa)
    b, _ = st.load(pb)
    return list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)


def records(d):
    out = []
    for line in open(os.path.join(d, "metrics.jsonl")):
        r = json.loads(line)
        for k in TIMINGS:
            r.pop(k, None)
        out.append(r)
    return out


def same_record(x, y, rtol):
    if x.keys() != y.keys():
        return False
    return all(x[k] == y[k] or (k in EVAL_LOSSES and abs(x[k] - y[k]) <= rtol * abs(x[k])) for k in x)


def main():
    args = sys.argv[1:]
    rtol = 0.0
    weights_only = "--weights-only" in args
    if weights_only:
        args.remove("--weights-only")
    if "--eval-rtol" in args:
        i = args.index("--eval-rtol")
        rtol = float(args[i + 1])
        del args[i:i + 2]
    a_dir, b_dir = args
    bad = []
    files = ["model.safetensors"]
    if not weights_only:
        last = open(os.path.join(a_dir, "checkpoints", "latest")).read().strip()
        files += [os.path.join("checkpoints", last, f)
                  for f in ("model.safetensors", "optimizer.safetensors", "ema.safetensors")]
    for f in files:
        pa, pb = os.path.join(a_dir, f), os.path.join(b_dir, f)
        if not os.path.exists(pa) and not os.path.exists(pb):
            continue
        if not (os.path.exists(pa) and os.path.exists(pb)) or not same_tensors(pa, pb):
            bad.append(f)
    if not weights_only:
        ra, rb = records(a_dir), records(b_dir)
        if len(ra) != len(rb) or not all(same_record(x, y, rtol) for x, y in zip(ra, rb)):
            bad.append("metrics.jsonl (%d vs %d records)" % (len(ra), len(rb)))
    print("differ: " + ", ".join(bad) if bad else "identical")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
