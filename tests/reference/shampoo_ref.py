"""Independent float64 NumPy implementation of spec/shampoo.md §2, and the fixture it writes.

Run with Debian's python:  /usr/bin/python3 tests/reference/shampoo_ref.py [--check]

Written from the spec text only (not from src/shampoo.c):
  §2.1  merge (no squeezing, no minimum order) and split into chunks of b, chunk order row-major
        (the first dimension's chunk index varies slowest);
  §2.2  factors start at eps*I; m, v start at 0;
  §2.3  t <- t+1; L2 decay into G (tensors whose name has no "bias"); factor statistics from the raw G;
        graft v; refresh; first moment and bias correction; decoupled decay; per-block update, a graft step
        (t <= S, or no active roots, or one_d "adam" on a 1-D parameter) or a Shampoo step grafted to the
        Adam step's Frobenius norm per block;
  §2.4  A = F / (1 - beta2^t); lambda <- lambda - min(lambda_min, 0) + eps; X = Q diag(lambda^(-1/r)) Q^T
        with r = 2 * order (general order k: factor i is the contraction of G over every other dimension);
  §2.5  refresh at t mod f == 0 and t >= max(S, 1); root_delay 0: used from step t on; 1: from t + 1;
  §2.6  one_d "full" or "adam", decided by the parameter's own rank;
  §2.7  a non-finite factor at a refresh raises.
Everything runs in float64. The fixture rounds only what the C side must read (initial weights, gradients,
per-step scale and lr, all exactly representable in fp32) and the trajectory snapshots (rounded to fp32).

The fixture tests/reference/fixtures/shampoo_ref.safetensors holds (steps are 1-based):
  init.<name>          fp32 initial weights: the trainable tensors of simplest_default.weights.safetensors
                       (names ending in ".d" or ".B" skipped), in file order
  grad.<k>.<name>      I8: the raw gradient of step k (before grad_scale) in units of metadata "grad_unit"
                       (2^-5), i.e. gradient = int8 * 0.03125 exactly; int8 keeps 60 steps under 2 MB
  scale                F32 [T]: per-step grad_scale (clip factor) in [0.5, 1], fp32-representable
  lr                   F32 [T]: lr_k = 0.01 f(k) (model.md §12.6, W = 5, T = 60), rounded to fp32; the
                       reference uses exactly these values
  w20.<name>           F32: the fp64 trajectory after step 20, rounded to fp32
  final.<name>         F32: after step T
metadata: "config" (JSON of the Shampoo settings), "blocks" (JSON list of [name, merged shape, block shapes]),
"grad_unit", "steps", "refresh_steps", "generator".
"""

import itertools
import json
import math
import os
import sys
from collections import OrderedDict

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import st  # noqa: E402

FIXTURES = os.path.join(HERE, "fixtures")


# ---------------------------------------------------------------- §2.1 blocking

def merge_dims(shape, b):
    """Spec §2.1 step 1."""
    shape = list(shape)
    new = [shape[0]] if shape else [1]
    for s in shape[1:]:
        if new[-1] == 1 or s == 1 or new[-1] * s <= b:
            new[-1] = new[-1] * s
        else:
            new.append(s)
    return new


def split_blocks(merged, b):
    """Spec §2.1 step 2: tuples of slices into the merged tensor, first dimension's chunk slowest."""
    chunks = [[slice(a, min(a + b, d)) for a in range(0, d, b)] for d in merged]
    return list(itertools.product(*chunks))


def block_table(names, shapes, b):
    """[(name, merged, [block shapes])] for the metadata and for the tests' block counts."""
    out = []
    for name, shape in zip(names, shapes):
        merged = merge_dims(shape, b)
        out.append((name, merged, [[s.stop - s.start for s in sl] for sl in split_blocks(merged, b)]))
    return out


# ---------------------------------------------------------------- §2.4 roots

def inverse_root(F, bias_corr, order, eps):
    """X = (A shifted + eps)^(-1/r), A = F / bias_corr, r = 2 * order, in float64."""
    A = F / bias_corr
    if not np.all(np.isfinite(A)):
        raise FloatingPointError("non-finite factor")
    A = 0.5 * (A + A.T)  # F is symmetric by construction; guard against asymmetric rounding in the sum
    lam, Q = np.linalg.eigh(A)
    lam = lam - min(lam.min(), 0.0)
    lam = lam + eps
    r = 2 * order
    return (Q * lam ** (-1.0 / r)) @ Q.T


def factor_stat(Gb, i):
    """Contraction of G over every dimension but i: G_b G_b^T (i = 0) / G_b^T G_b (i = 1) for 2-D, g g^T for 1-D."""
    axes = [a for a in range(Gb.ndim) if a != i]
    return np.tensordot(Gb, Gb, axes=(axes, axes))


def apply_roots(X, Gb):
    """P_s = X_0 G X_1 (2-D), X_0 g (1-D); in general the mode-i product with X_i for every i."""
    P = Gb
    for i, Xi in enumerate(X):
        P = np.moveaxis(np.tensordot(Xi, P, axes=([1], [i])), 0, i)
    return P


# ---------------------------------------------------------------- §2.2-2.7 the optimizer

class Shampoo:
    def __init__(self, names, params, lr0=None, weight_decay=0.0, decoupled=False, betas=(0.9, 0.999),
                 eps=1e-12, frequency=25, start=25, max_dim=1024, graft_beta2=0.999, graft_eps=1e-8,
                 one_d="full", root_delay=0):
        assert frequency >= 1 and start >= 0 and start % frequency == 0 and root_delay in (0, 1)
        assert one_d in ("full", "adam")
        self.names = list(names)
        self.W = [np.array(p, dtype=np.float64) for p in params]
        self.wd, self.decoupled = weight_decay, decoupled
        self.b1, self.b2 = betas
        self.eps, self.f, self.S, self.b = eps, frequency, start, max_dim
        self.gb2, self.geps = graft_beta2, graft_eps
        self.one_d, self.delay = one_d, root_delay
        self.t = 0
        self.m = [np.zeros_like(w) for w in self.W]
        self.v = [np.zeros_like(w) for w in self.W]
        self.decay = ["bias" not in n for n in self.names]
        # Blocks: (param index, merged shape, slices, preconditioned)
        self.blocks = []
        for p, w in enumerate(self.W):
            merged = merge_dims(w.shape, self.b)
            pre = not (one_d == "adam" and w.ndim == 1)  # the parameter's own rank decides (§2.6)
            for sl in split_blocks(merged, self.b):
                self.blocks.append(dict(param=p, merged=merged, sl=sl, pre=pre))
        for blk in self.blocks:
            dims = [s.stop - s.start for s in blk["sl"]]
            blk["F"] = [self.eps * np.eye(d) for d in dims] if blk["pre"] else []
            blk["X"] = None        # active roots
            blk["pending"] = None  # root_delay 1: computed, active from the next step
        self.refreshes = 0

    def _view(self, arr, blk):
        return arr.reshape(blk["merged"])[blk["sl"]]

    def refresh_step(self, t):
        return t % self.f == 0 and t >= max(self.S, 1)

    def step(self, grads, lr, grad_scale=1.0):
        self.t += 1
        t = self.t
        # 2. L2 decay
        G = []
        for p, g in enumerate(grads):
            g = np.asarray(g, dtype=np.float64) * grad_scale
            if not self.decoupled and self.wd != 0.0 and self.decay[p]:
                g = g + self.wd * self.W[p]
            G.append(g)
        # root_delay 1: the roots computed at the previous step go live now
        for blk in self.blocks:
            if blk["pending"] is not None:
                blk["X"], blk["pending"] = blk["pending"], None
        # 3. statistics (raw G) and graft second moment
        for blk in self.blocks:
            if not blk["pre"]:
                continue
            Gb = self._view(G[blk["param"]], blk)
            blk["F"] = [self.b2 * F + (1.0 - self.b2) * factor_stat(Gb, i) for i, F in enumerate(blk["F"])]
        for p in range(len(G)):
            self.v[p] = self.gb2 * self.v[p] + (1.0 - self.gb2) * G[p] * G[p]
        # 4. refresh
        if self.refresh_step(t):
            bias = 1.0 - self.b2 ** t
            for blk in self.blocks:
                if not blk["pre"]:
                    continue
                order = len(blk["F"])
                X = [inverse_root(F, bias, order, self.eps) for F in blk["F"]]
                if self.delay == 0:
                    blk["X"] = X
                else:
                    blk["pending"] = X
            self.refreshes += 1
        # 5. first moment
        bc1, bc2 = 1.0 - self.b1 ** t, 1.0 - self.gb2 ** t
        Gbar = []
        for p in range(len(G)):
            self.m[p] = self.b1 * self.m[p] + (1.0 - self.b1) * G[p]
            Gbar.append(self.m[p] / bc1)
        # 6. decoupled decay
        if self.decoupled and self.wd != 0.0:
            for p in range(len(G)):
                if self.decay[p]:
                    self.W[p] = self.W[p] * (1.0 - lr * self.wd)
        # 7. per-block update
        for blk in self.blocks:
            p = blk["param"]
            gbar = self._view(Gbar[p], blk)
            vb = self._view(self.v[p], blk)
            Pg = gbar / (np.sqrt(vb / bc2) + self.geps)
            Wb = self._view(self.W[p], blk)  # a view: updated in place
            if t <= self.S or blk["X"] is None or not blk["pre"]:
                Wb -= lr * Pg
            else:
                Ps = apply_roots(blk["X"], gbar)
                Wb -= lr * (np.linalg.norm(Pg) / (np.linalg.norm(Ps) + 1e-16)) * Ps


# ---------------------------------------------------------------- the fixture

def lr_factor(s, W, T):
    """model.md §12.6: linear warmup over W steps, then half-cosine to zero at T."""
    if s < W:
        return s / max(1, W)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * (s - W) / max(1, T - W))))


# eps 1e-3, not smaller: until step 32 the 32-wide 1-D blocks are rank-deficient, their null-space eigenvalues are
# ~eps (1 + b2^t / (1 - b2^t)), and the spec's fp32 factor storage perturbs them by ~1e-7 of the factor's norm. Measured
# with this script's own float64 run against the same run with F rounded to fp32 after every update (nothing else
# changed): worst cumulative-update difference 9.1e-6 (step 20) / 1.3e-5 (step 60) at eps 1e-4, 8.2e-7 / 1.7e-6 at
# eps 1e-3, 1.2e-7 / 2.0e-7 at eps 1e-2. At 1e-3 a spec-conforming fp32 implementation can meet 1e-5.
CONFIG = dict(lr=0.01, warmup_steps=5, steps=60, weight_decay=0.01, weight_decay_mode="l2", betas=[0.9, 0.999],
              eps=1e-3, precondition_frequency=5, start_preconditioning_step=10, max_preconditioner_dim=32,
              graft_beta2=0.999, graft_eps=1e-8, root_dtype="fp64", one_d="full", root_delay=0)
GRAD_UNIT = 2.0 ** -5
SEED = 20240611


def make_gradients(names, shapes, T, rng):
    """int8 gradients (units of 2^-5): N(0,1) entries plus a persistent rank-2 direction per tensor (so the
    factors have a dominant, slowly rotating part and the preconditioner is far from a multiple of I)."""
    out = []
    lowrank = []
    for shape in shapes:
        rows = shape[0]
        cols = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        u, v = rng.standard_normal((rows, 2)), rng.standard_normal((2, cols))
        lowrank.append((u, v))
    for k in range(T):
        step = []
        for (u, v), shape in zip(lowrank, shapes):
            rows = shape[0]
            cols = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            c = np.array([math.cos(0.05 * k), math.sin(0.05 * k)])  # the direction turns slowly
            g = rng.standard_normal((rows, cols)) + 1.5 * (u * c) @ v
            q = np.clip(np.rint(g / GRAD_UNIT), -127, 127).astype(np.int8)
            step.append(q.reshape(shape))
        out.append(step)
    return out


def build_fixture(path_out, check=False):
    weights, _ = st.load(os.path.join(FIXTURES, "simplest_default.weights.safetensors"))
    names = [n for n in weights if not (n.endswith(".d") or n.endswith(".B"))]
    init = [weights[n].astype(np.float32) for n in names]
    shapes = [w.shape for w in init]
    c = CONFIG
    T = c["steps"]
    rng = np.random.default_rng(SEED)
    grads_q = make_gradients(names, shapes, T, rng)
    scale = rng.uniform(0.5, 1.0, T).astype(np.float32)
    lr = np.array([c["lr"] * lr_factor(k, c["warmup_steps"], T) for k in range(1, T + 1)], dtype=np.float32)

    opt = Shampoo(names, init, weight_decay=c["weight_decay"], decoupled=c["weight_decay_mode"] == "decoupled",
                  betas=tuple(c["betas"]), eps=c["eps"], frequency=c["precondition_frequency"],
                  start=c["start_preconditioning_step"], max_dim=c["max_preconditioner_dim"],
                  graft_beta2=c["graft_beta2"], graft_eps=c["graft_eps"], one_d=c["one_d"],
                  root_delay=c["root_delay"])
    table = block_table(names, shapes, c["max_preconditioner_dim"])
    nblocks = sum(len(b) for _, _, b in table)
    split = [n for n, _, b in table if len(b) > 1]
    merged = [n for (n, m, _), s in zip(table, shapes) if len(m) < len(s)]
    assert split and merged, "the fixture must exercise both splitting and merging"
    w20 = None
    refresh_steps = []
    for k in range(1, T + 1):
        g = [q.astype(np.float64) * GRAD_UNIT for q in grads_q[k - 1]]
        opt.step(g, float(lr[k - 1]), float(scale[k - 1]))
        if opt.refresh_step(k):
            refresh_steps.append(k)
        if k == 20:
            w20 = [w.astype(np.float32) for w in opt.W]
    final = [w.astype(np.float32) for w in opt.W]
    assert len([s for s in refresh_steps if s > c["start_preconditioning_step"]]) >= 4

    tensors = OrderedDict()
    for n, w in zip(names, init):
        tensors["init." + n] = w
    for k in range(1, T + 1):
        for n, q in zip(names, grads_q[k - 1]):
            tensors["grad.%d.%s" % (k, n)] = q
    tensors["scale"] = scale
    tensors["lr"] = lr
    for n, w in zip(names, w20):
        tensors["w20." + n] = w
    for n, w in zip(names, final):
        tensors["final." + n] = w
    meta = {
        "config": json.dumps(c),
        "blocks": json.dumps(table),
        "grad_unit": repr(GRAD_UNIT),
        "steps": str(T),
        "refresh_steps": json.dumps(refresh_steps),
        "generator": "tests/reference/shampoo_ref.py (float64 NumPy, spec/shampoo.md §2), seed %d" % SEED,
    }
    st.save(path_out, tensors, meta)
    size = os.path.getsize(path_out)
    print("wrote %s: %d tensors, %d blocks (%d split tensors, %d merged tensors), refreshes at %s, %.2f MB"
          % (path_out, len(tensors), nblocks, len(split), len(merged), refresh_steps, size / 1e6))
    for n, m, b in table:
        print("  %-44s merged %-10s blocks %s" % (n, m, b))
    dw = [np.linalg.norm(f.astype(np.float64) - i) for f, i in zip(final, init)]
    print("movement ||final - init||_F per tensor: min %.3g, max %.3g" % (min(dw), max(dw)))
    if check:
        self_check()


def self_check():
    """Spot checks of the reference itself against closed forms (spec §5 P6 and the §2.1 table)."""
    # §2.1 table, SimplEsT-ViT-S/4 CIFAR-10.
    assert merge_dims([384, 3, 4, 4], 1024) == [384, 48]
    assert merge_dims([384, 3, 8, 8], 1024) == [384, 192]
    assert merge_dims([384, 3, 16, 16], 1024) == [384, 768]
    assert merge_dims([384, 3, 4, 4], 8192) == [4608, 4]
    assert merge_dims([384, 3, 8, 8], 8192) == [1152, 64]
    assert merge_dims([384, 3, 16, 16], 8192) == [1152, 256]
    assert merge_dims([10, 384], 8192) == [3840] and merge_dims([100, 384], 8192) == [100, 384]
    assert [[s.stop - s.start for s in b] for b in split_blocks([1152, 384], 1024)] == [[1024, 384], [128, 384]]
    assert [[s.stop - s.start for s in b] for b in split_blocks([384, 1536], 1024)] == [[384, 1024], [384, 512]]

    def count(C, b):
        D, M, L = 384, 1536, 12
        shapes = [[D, 3, 4, 4], [D]]
        for _ in range(L):
            shapes += [[3 * D, D], [3 * D], [M, D], [M], [D, M], [D]]
        shapes += [[C, D], [C]]
        n2 = n1 = 0
        for s in shapes:
            m = merge_dims(s, b)
            n = len(split_blocks(m, b))
            if len(m) == 2:
                n2 += n
            else:
                n1 += n
        return n2 + n1, n2, n1
    assert count(10, 1024) == (136, 74, 62), count(10, 1024)
    assert count(10, 8192) == (76, 37, 39), count(10, 8192)
    assert count(100, 8192) == (76, 38, 38), count(100, 8192)
    # P6: step 1 closed form.
    rng = np.random.default_rng(0)
    G = rng.standard_normal((7, 4))
    o = Shampoo(["w"], [np.zeros((7, 4))], frequency=1, start=0, max_dim=16)  # 7 * 4 > 16: stays 2-D
    o.step([G], 0.1)
    U, s, Vt = np.linalg.svd(G, full_matrices=False)
    Ps = U @ np.diag(s / np.sqrt(s ** 2 + 1e-12 / 1e-3)) @ Vt
    Pg = G / (np.abs(G) + 1e-8)
    want = -0.1 * np.linalg.norm(Pg) / np.linalg.norm(Ps) * Ps
    assert np.linalg.norm(o.W[0] - want) <= 1e-7 * np.linalg.norm(want)
    g = rng.standard_normal(9)
    o = Shampoo(["b.bias"], [np.zeros(9)], frequency=1, start=0, max_dim=64)
    o.step([g], 0.1)
    Ps = g / math.sqrt(g @ g + 1e-9)
    want = -0.1 * np.linalg.norm(g / (np.abs(g) + 1e-8)) / np.linalg.norm(Ps) * Ps
    assert np.linalg.norm(o.W[0] - want) <= 1e-7 * np.linalg.norm(want)  # eps'^(-1/2) = 3e4 amplifies rounding
    print("self-check: §2.1 table and block counts, P6 closed forms: ok")


if __name__ == "__main__":
    build_fixture(os.path.join(FIXTURES, "shampoo_ref.safetensors"), check="--check" in sys.argv)
