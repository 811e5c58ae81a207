"""PyTorch GPU peer benchmark: training images/s of the reference models (tests/reference/models.py).

One step = upload of the batch from pinned host memory (non_blocking, as our trainer uploads each micro-batch)
+ forward and backward under bf16 autocast + clip_grad_norm_(1.0) + torch.optim.Adam (fused where this torch
has it) on fp32 weights; random images and labels; cross-entropy without smoothing. Eager and torch.compile
(mode "default"; the model is compiled, the optimizer step runs eagerly). Timing: torch.cuda.synchronize() around
each step with a wall clock after the warm-up steps (which include compilation); the median of --steps steps.
Prints one JSON line per (arch, mode), with MFU from tests/gpu/flops.py.

  python3 tests/gpu/torch_bench.py --arch simplest simplevit --mode eager compile     # ViT-S/16, 224 px, batch 256
  python3 tests/gpu/torch_bench.py --attn sdpa ...   # attention through F.scaled_dot_product_attention instead of
                                                     # the reference's explicit softmax (a stronger PyTorch)
Works with torch 1.13 (no torch.compile: that mode reports "skipped") and 2.x; --device cpu for a smoke test.
"""

import argparse
import json
import os
import statistics
import sys
import time
import types

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "reference"))
sys.path.insert(0, HERE)
import flops  # noqa: E402
import models  # noqa: E402


def _sdpa_espa(self, x):
    Bn, N, D = x.shape
    qkv = self.to_qkv(x).reshape(Bn, N, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.B.to(q.dtype))
    out = self.d.to(out.dtype) * out
    return out.transpose(1, 2).reshape(Bn, N, D)


def _sdpa_sv(self, x):
    x = self.norm(x)
    Bn, N, D = x.shape
    qkv = self.to_qkv(x).reshape(Bn, N, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
    return self.to_out(out.transpose(1, 2).reshape(Bn, N, D))


def use_sdpa(model):
    for mod in model.modules():
        if isinstance(mod, models.ESPAAttention):
            mod.forward = types.MethodType(_sdpa_espa, mod)
        elif isinstance(mod, models.SVAttention):
            mod.forward = types.MethodType(_sdpa_sv, mod)


def bench(a, arch, mode):
    dev = torch.device(a.device)
    cfg = dict(arch=arch, image_size=a.image, patch_size=a.patch, num_classes=a.classes, channels=a.channels,
               width=a.width)
    for k in ("dim", "depth", "heads", "mlp_dim"):
        if getattr(a, k):
            cfg[k] = getattr(a, k)
    rc = models.resolve_model_config(cfg)
    rec = {"impl": "pytorch", "torch": torch.__version__, "mode": mode, "attn": a.attn, "arch": arch,
           "amp": a.amp, "image": a.image, "patch": a.patch, "dim": rc["dim"], "depth": rc["depth"], "heads": rc["heads"],
           "mlp": rc["mlp_dim"], "classes": a.classes, "batch": a.batch, "device": a.device}
    if dev.type == "cuda":
        rec["gpu"] = torch.cuda.get_device_name(dev)
    if mode == "compile" and not hasattr(torch, "compile"):
        rec["skipped"] = "torch %s has no torch.compile" % torch.__version__
        return rec
    if a.attn == "sdpa" and not hasattr(F, "scaled_dot_product_attention"):
        rec["skipped"] = "torch %s has no scaled_dot_product_attention" % torch.__version__
        return rec
    torch.manual_seed(a.seed)
    model = models.build_from_config(cfg).to(dev)
    if a.attn == "sdpa":
        use_sdpa(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    kw = {}
    if dev.type == "cuda" and "fused" in torch.optim.Adam.__init__.__code__.co_varnames:
        kw["fused"] = True
    opt = torch.optim.Adam(params, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, **kw)
    rec["adam"] = "fused" if kw else "default"
    fwd = torch.compile(model) if mode == "compile" else model
    x_host = torch.randn(a.batch, a.channels, a.image, a.image)
    y_host = torch.randint(0, a.classes, (a.batch,))
    if dev.type == "cuda":
        x_host, y_host = x_host.pin_memory(), y_host.pin_memory()
    x_dev, y_dev = x_host.to(dev), y_host.to(dev)
    amp = a.amp == "bf16"

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def step():
        if a.no_upload:
            x, y = x_dev, y_dev
        else:
            x, y = x_host.to(dev, non_blocking=True), y_host.to(dev, non_blocking=True)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
            logits = fwd(x)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for _ in range(a.warmup):
        loss = step()
    sync()
    rec["warmup_s"] = round(time.perf_counter() - t0, 2)
    times = []
    for _ in range(a.steps):
        sync()
        t1 = time.perf_counter()
        loss = step()
        sync()
        times.append((time.perf_counter() - t1) * 1e3)
    ms = statistics.median(times)
    ips = a.batch / (ms / 1e3)
    fl = flops.train_flops_per_image(arch, a.image, a.patch, a.channels, rc["dim"], rc["depth"], rc["mlp_dim"],
                                     a.classes)
    rec.update({"steps": a.steps, "ms_per_step": round(ms, 3), "min_ms": round(min(times), 3),
                "img_per_s": round(ips, 1), "gflop_per_img": round(fl / 1e9, 3),
                "mfu": round(flops.mfu(ips, fl, a.peak), 4), "params": sum(p.numel() for p in params),
                "final_loss": round(float(loss.item()), 5)})
    if dev.type == "cuda":
        rec["max_mem_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2 ** 30, 2)
        torch.cuda.reset_peak_memory_stats(dev)
    del model, opt, fwd
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return rec


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", nargs="+", choices=["simplest", "simplevit"], default=["simplest", "simplevit"])
    ap.add_argument("--mode", nargs="+", choices=["eager", "compile"], default=["eager", "compile"])
    ap.add_argument("--attn", choices=["explicit", "sdpa"], default="explicit",
                    help="explicit: the reference models as written; sdpa: F.scaled_dot_product_attention")
    ap.add_argument("--image", type=int, default=224)
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--width", default="s")
    ap.add_argument("--dim", type=int, default=0)
    ap.add_argument("--depth", type=int, default=0)
    ap.add_argument("--heads", type=int, default=0)
    ap.add_argument("--mlp_dim", type=int, default=0)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peak", type=float, default=flops.PEAK_BF16_TFLOPS, help="peak bf16 TFLOP/s for MFU")
    ap.add_argument("--no-upload", action="store_true", help="keep the batch on the GPU (no host-to-device copy)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--amp", choices=["bf16", "none"], default="bf16",
                    help="bf16 autocast (the benchmark); none for a CPU smoke test (torch 1.13's CPU autocast "
                         "fails on SimpleViT)")
    a = ap.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"impl": "pytorch", "torch": torch.__version__, "skipped": "no CUDA device"}))
        return 0
    if a.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    for arch in a.arch:
        for mode in a.mode:
            try:
                rec = bench(a, arch, mode)
            except Exception as e:  # one failing mode must not hide the others
                rec = {"impl": "pytorch", "torch": torch.__version__, "mode": mode, "attn": a.attn, "arch": arch,
                       "error": "%s: %s" % (type(e).__name__, str(e)[:300])}
            print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
