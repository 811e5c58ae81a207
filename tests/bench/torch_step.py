"""PyTorch CPU peer benchmark: one full training step of SimplEsT-ViT or SimpleViT.

forward + backward + clip_grad_norm_(1.0) + torch.optim.Adam step, random input and labels,
cross-entropy without label smoothing.  Prints one JSON line with the median ms per step.

Run with Debian's python (torch 1.13):
  /usr/bin/python3 tests/bench/torch_step.py --arch simplest --threads 2
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "reference"))
import models  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=["simplest", "simplevit"], default="simplest")
    ap.add_argument("--image", type=int, default=28)
    ap.add_argument("--patch", type=int, default=4)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--mlp", type=int, default=256)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    model = models.build_from_config(dict(arch=a.arch, image_size=a.image, patch_size=a.patch,
                                          num_classes=a.classes, channels=a.channels, dim=a.dim,
                                          depth=a.depth, heads=a.heads, mlp_dim=a.mlp))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=a.lr, betas=(0.9, 0.999), eps=1e-8)
    x = torch.randn(a.batch, a.channels, a.image, a.image)
    y = torch.randint(0, a.classes, (a.batch,))

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y, label_smoothing=0.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return loss.item()

    for _ in range(a.warmup):
        step()
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        loss = step()
        times.append((time.perf_counter() - t0) * 1e3)
    ms = statistics.median(times)
    print(json.dumps({"peer": "pytorch %s" % torch.__version__, "arch": a.arch, "batch": a.batch,
                      "threads": a.threads, "ms_per_step": round(ms, 3),
                      "img_per_s": round(a.batch / (ms / 1e3), 1),
                      "params": sum(p.numel() for p in params), "min_ms": round(min(times), 3),
                      "final_loss": round(loss, 6)}))


if __name__ == "__main__":
    main()
