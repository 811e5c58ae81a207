"""Generate the committed reference fixtures in tests/reference/fixtures/.

Run with Debian's python (torch 1.13):  /usr/bin/python3 tests/reference/gen_fixtures.py

For every case it writes
  <case>.weights.safetensors  the initial state_dict (spec 11 names, shapes and order) + metadata
  <case>.debug.safetensors    input, labels, logits, smoothed-CE loss, grad.<name>, and a 5-step
                              manual Adam run (train.loss, train.lr, final.<name>)
The training step follows spec 12.1 and 12.4-12.7 (clip, LR schedule, weight decay, Adam), written
out by hand in fp32.  Gradients are cross-checked against a float64 copy of the same model.
"""

import copy
import json
import math
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import models  # noqa: E402
import st  # noqa: E402

OUT_DIR = os.path.join(HERE, "fixtures")

BATCH = 4
LABEL_SMOOTHING = 0.1
LR = 3e-3
WARMUP = 2
TOTAL = 5
CLIP = 1.0
WEIGHT_DECAY = 0.05
BETA1, BETA2, ADAM_EPS = 0.9, 0.999, 1e-8

MODEL_KEYS = ["arch", "image_size", "patch_size", "num_classes", "channels", "dim", "depth", "heads",
              "mlp_dim", "eta", "gamma_L", "qkv_bias", "mlp_bias", "drop_p", "seed_compat"]


def case(arch, image, patch, channels, dim, heads, mlp, depth, classes, seed_compat, mode,
         qkv_bias=True, mlp_bias=True):
    model = dict(arch=arch, image_size=image, patch_size=patch, num_classes=classes, channels=channels,
                 dim=dim, depth=depth, heads=heads, mlp_dim=mlp, eta=0.9, gamma_L=0.005,
                 qkv_bias=qkv_bias, mlp_bias=mlp_bias, drop_p=0.0, seed_compat=seed_compat)
    assert list(model) == MODEL_KEYS
    return dict(model=model, mode=mode)


CASES = [
    ("simplest_default", case("simplest", 8, 2, 3, 16, 2, 64, 7, 5, False, "l2")),
    ("simplest_compat", case("simplest", 12, 3, 1, 16, 4, 64, 8, 24, True, "decoupled")),
    ("simplest_nobias", case("simplest", 8, 4, 3, 8, 2, 32, 7, 3, False, "l2", qkv_bias=False, mlp_bias=False)),
    ("simplevit_default", case("simplevit", 8, 2, 3, 16, 2, 64, 2, 5, False, "decoupled")),
    ("simplevit_compat", case("simplevit", 12, 4, 1, 16, 4, 32, 3, 7, True, "l2")),
]


def smoothed_ce(logits, labels, eps):
    C = logits.shape[-1]
    onehot = torch.nn.functional.one_hot(labels.long(), C).to(logits.dtype)
    t = (1.0 - eps) * onehot + eps / C
    return -(t * torch.log_softmax(logits, dim=-1)).sum(-1).mean()


def lr_factor(s, W, T):
    if s < W:
        return s / max(1, W)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * (s - W) / max(1, T - W))))


def forward_backward(model, x, y):
    params = models.trainable_named_parameters(model)
    for _, p in params:
        p.grad = None
    logits = model(x)
    loss = smoothed_ce(logits, y, LABEL_SMOOTHING)
    loss.backward()
    return logits.detach(), loss.detach(), [(n, p.grad.detach().clone()) for n, p in params]


def train(model, x, y, mode, seed_compat, steps=TOTAL):
    """Manual clip + schedule + weight decay + Adam, spec 12.4-12.7, in the model's dtype."""
    params = models.trainable_named_parameters(model)
    m = [torch.zeros_like(p) for _, p in params]
    v = [torch.zeros_like(p) for _, p in params]
    losses, lrs = [], []
    for k in range(1, steps + 1):
        _, loss, grads = forward_backward(model, x, y)
        losses.append(loss.item())
        g = [gr for _, gr in grads]
        total = torch.sqrt(sum((gi * gi).sum() for gi in g))
        coef = torch.clamp(1.0 / (total + 1e-6), max=1.0)
        g = [gi * coef for gi in g]
        lr = LR * lr_factor(k - 1 if seed_compat else k, WARMUP, TOTAL)
        lrs.append(lr)
        bc1 = 1.0 - BETA1 ** k
        bc2 = 1.0 - BETA2 ** k
        with torch.no_grad():
            for i, (name, p) in enumerate(params):
                gi = g[i]
                decay = "bias" not in name
                if decay and mode == "l2":
                    gi = gi + WEIGHT_DECAY * p
                elif decay and mode == "decoupled":
                    p.mul_(1.0 - lr * WEIGHT_DECAY)
                m[i].mul_(BETA1).add_((1.0 - BETA1) * gi)
                v[i].mul_(BETA2).add_((1.0 - BETA2) * gi * gi)
                mhat = m[i] / bc1
                vhat = v[i] / bc2
                p.sub_(lr * mhat / (torch.sqrt(vhat) + ADAM_EPS))
    return losses, lrs


def rel_err(a, b):
    """max |a - b| / max |b| (b the fp64 reference), guarded for all-zero b."""
    den = b.abs().max().item()
    num = (a.double() - b).abs().max().item()
    return num / den if den > 0 else num


def gen_case(idx, name, spec):
    mcfg = spec["model"]
    mode = spec["mode"]
    compat = mcfg["seed_compat"]
    torch.manual_seed(3407 + idx)
    model = models.build_from_config(mcfg).float()
    model.train()
    C, H = mcfg["channels"], mcfg["image_size"]
    x = torch.randn(BATCH, C, H, H, dtype=torch.float32)
    y = torch.randint(0, mcfg["num_classes"], (BATCH,), dtype=torch.int32)

    init_sd = copy.deepcopy(model.state_dict())
    logits, loss, grads = forward_backward(model, x, y)

    # fp64 cross-check of logits, loss and gradients
    m64 = copy.deepcopy(model).double()
    l64, loss64, g64 = forward_backward(m64, x.double(), y)
    e_logit = rel_err(logits, l64)
    assert e_logit < 1e-5, (name, "logits", e_logit)
    assert abs(loss.item() - loss64.item()) <= 1e-5 * max(1.0, abs(loss64.item())), (name, loss, loss64)
    worst = (0.0, None)
    gmax = max(gr.abs().max().item() for _, gr in g64)
    for (n, g), (n2, gd) in zip(grads, g64):
        assert n == n2
        e = (g.double() - gd).abs().max().item()
        # per tensor: relative to the tensor's own scale, floored at 1e-3 of the global max
        r = e / max(gd.abs().max().item(), 1e-3 * gmax)
        if r > worst[0]:
            worst = (r, n)
        assert r < 1e-3, (name, n, r)

    # 5-step training run from the same initial weights, same batch each step
    tm = models.build_from_config(mcfg).float()
    tm.load_state_dict(init_sd, strict=True)
    tm.train()
    t_losses, t_lrs = train(tm, x, y, mode, compat)
    assert abs(t_losses[0] - loss.item()) <= 1e-6 * max(1.0, abs(loss.item()))
    # same run in fp64 for information (Adam amplifies rounding on near-zero gradients)
    tm64 = copy.deepcopy(model).double()
    tm64.load_state_dict(init_sd, strict=True)
    t64_losses, _ = train(tm64, x.double(), y, mode, compat)
    fin_dev = max((p.double() - p64).abs().max().item() for (_, p), (_, p64) in
                  zip(models.trainable_named_parameters(tm), models.trainable_named_parameters(tm64)))

    # files
    os.makedirs(OUT_DIR, exist_ok=True)
    wmeta = {"format": "simplest-dist-weights-1", "arch": mcfg["arch"],
             "seed_compat": "true" if compat else "false", "step": "0", "ema": "false",
             "config": json.dumps({"model": mcfg})}
    wt = [(k, v.detach().cpu().float().contiguous().numpy()) for k, v in init_sd.items()]
    st.save(os.path.join(OUT_DIR, name + ".weights.safetensors"), wt, wmeta)

    dbg = [("input", x.numpy()), ("labels", y.numpy().astype(np.int32)),
           ("logits", logits.numpy().astype(np.float32)),
           ("loss", np.array([loss.item()], dtype=np.float32))]
    dbg += [("grad." + n, g.numpy().astype(np.float32)) for n, g in grads]
    dbg += [("train.loss", np.array(t_losses, dtype=np.float32)),
            ("train.lr", np.array(t_lrs, dtype=np.float32))]
    dbg += [("final." + n, p.detach().numpy().astype(np.float32)) for n, p in models.trainable_named_parameters(tm)]
    dmeta = {"label_smoothing": "0.1", "lr": "0.003", "warmup_steps": str(WARMUP), "total_steps": str(TOTAL),
             "clip": "1.0", "weight_decay": "0.05", "weight_decay_mode": mode, "beta1": "0.9",
             "beta2": "0.999", "eps": "1e-08", "seed_compat": "true" if compat else "false"}
    st.save(os.path.join(OUT_DIR, name + ".debug.safetensors"), dbg, dmeta)

    # read back and check bitwise
    rt, rmeta = st.load(os.path.join(OUT_DIR, name + ".weights.safetensors"))
    assert list(rt) == list(init_sd) and rmeta == wmeta
    for k, v in init_sd.items():
        assert np.array_equal(rt[k], v.numpy()) and rt[k].shape == tuple(v.shape)

    ntrain = sum(p.numel() for _, p in models.trainable_named_parameters(model))
    print("%-18s keys %3d params %6d  max|logit| %.6g  loss %.7f  step5 loss %.7f  "
          "lr %s" % (name, len(init_sd), ntrain, logits.abs().max().item(), loss.item(), t_losses[-1],
                     ",".join("%.6g" % r for r in t_lrs)))
    print("%-18s fp64 check: logits rel %.2e, worst grad rel %.2e (%s); train.loss fp32-fp64 max %.2e; "
          "final weights max |fp32-fp64| %.2e (= %.3f lr)"
          % ("", e_logit, worst[0], worst[1], max(abs(a - b) for a, b in zip(t_losses, t64_losses)),
             fin_dev, fin_dev / LR))
    return [os.path.join(OUT_DIR, name + s) for s in (".weights.safetensors", ".debug.safetensors")]


def main():
    torch.set_num_threads(1)
    if hasattr(torch, "use_deterministic_algorithms"):
        torch.use_deterministic_algorithms(True)
    torch.set_default_dtype(torch.float32)
    print("torch", torch.__version__, "numpy", np.__version__)
    files = []
    for i, (name, spec) in enumerate(CASES):
        files += gen_case(i, name, spec)
    total = 0
    for f in files:
        sz = os.path.getsize(f)
        total += sz
        print("%8d  %s" % (sz, os.path.relpath(f, HERE)))
    print("%8d  total" % total)


if __name__ == "__main__":
    main()
