"""Runs simplest-dist's bench_step and PyTorch's torch_step.py alternately on the same machine and prints the ratio.

Each round runs ours, then PyTorch with OpenBLAS's own CPU detection, then PyTorch with OPENBLAS_CORETYPE set to
the kernel simplest-dist uses; the faster PyTorch variant is the peer. Rounds alternate so that a noisy neighbour
hits both sides; the summary uses the median over rounds of each run's median step, and also the best (min) step.
"""
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def run(cmd, env=None):
    out = subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--core", default="")
    ap.add_argument("--arch", nargs="+", default=["simplest", "simplevit"])
    ap.add_argument("--shape", default="--image 28 --patch 4 --channels 1 --dim 128 --depth 8 --heads 4 --mlp 256 "
                                       "--classes 10 --batch 256")
    a = ap.parse_args()
    shape = a.shape.split()
    common = shape + ["--steps", str(a.steps), "--warmup", "2", "--threads", str(a.threads)]
    have_torch = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True).returncode == 0
    for arch in a.arch:
        ours, peer = [], []
        for r in range(a.rounds):
            o = run([os.path.join(a.build, "bench", "bench_step"), "--arch", arch] + common)
            ours.append(o)
            print(json.dumps(o), flush=True)
            if not have_torch:
                continue
            best = None
            for core in ("", a.core):
                env = dict(os.environ)
                if core:
                    env["OPENBLAS_CORETYPE"] = core
                else:
                    env.pop("OPENBLAS_CORETYPE", None)
                p = run([sys.executable, "tests/bench/torch_step.py", "--arch", arch] + common, env)
                p["openblas_coretype"] = core or "auto"
                print(json.dumps(p), flush=True)
                if best is None or p["ms_per_step"] < best["ms_per_step"]:
                    best = p
            peer.append(best)
        om = statistics.median(x["ms_per_step"] for x in ours)
        omin = min(x["min_ms"] for x in ours)
        if peer:
            pm = statistics.median(x["ms_per_step"] for x in peer)
            pmin = min(x["min_ms"] for x in peer)
            print(f"RESULT {arch}: simplest-dist {om:.0f} ms/step ({256e3 / om:.0f} img/s) vs {peer[0]['peer']} "
                  f"{pm:.0f} ms/step: {pm / om:.2f}x faster (median of {a.rounds} rounds); best steps "
                  f"{omin:.0f} vs {pmin:.0f} ms: {pmin / omin:.2f}x", flush=True)
        else:
            print(f"RESULT {arch}: simplest-dist {om:.0f} ms/step; PyTorch not installed, no peer measured")


if __name__ == "__main__":
    main()
