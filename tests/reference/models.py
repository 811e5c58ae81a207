"""Reference PyTorch models for simplest-dist tests (spec: /work/shared/spec/model.md).

A self-written reimplementation of the two models of the reference repository
(richardcepka/SimplEsT-ViT, models/simplEsT_vit.py and models/simple_vit.py), following the
project spec: SimplEsT-ViT (E-SPA attention + TAT leaky-ReLU MLPs, no residuals, no norms)
and SimpleViT (pre-LN baseline).  `state_dict()` keys, shapes and order are exactly those of
spec section 11, so a project weights file loads with `load_state_dict(strict=True)`.

Written for torch 1.13 (no F.scaled_dot_product_attention: attention is explicit).
Run `python3 models.py` (Debian python with torch) for the self-test.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

EPS32 = 2.0 ** -23
EPS64 = 2.0 ** -52

# Width presets (spec 3.1): D, H, M, L.
WIDTH_PRESETS = {
    "ti": dict(dim=192, heads=3, mlp_dim=768, depth=12),
    "s": dict(dim=384, heads=6, mlp_dim=1536, depth=12),
    "b": dict(dim=768, heads=12, mlp_dim=3072, depth=12),
}


# ---------------------------------------------------------------------------------------------
# TAT (spec 7)
# ---------------------------------------------------------------------------------------------
def lrelu_cmap(c, a):
    """C-map of the normalized leaky ReLU with negative slope a (Python doubles)."""
    return c + ((1 - a) ** 2) / (math.pi * (1 + a ** 2)) * (math.sqrt(1 - c ** 2) - c * math.acos(c))


def tat_cf0(a, n_act):
    """n_act-fold composition of the C-map starting from c = 0."""
    c = 0.0
    for _ in range(n_act):
        c = lrelu_cmap(c, a)
    return c


class TATUnachievable(ValueError):
    pass


def tat_slope(depth, eta=0.9, tol=1e-8, max_eval=100):
    """The reference's bisection, bit for bit.

    It bisects on value = eta - C_a^(2L)(0) with target 0: value > 0 (i.e. C < eta, the slope is
    too large) sets hi = x; value < 0 sets lo = x.  C_a^(2L)(0) decreases in a.
    """
    x, lo, hi = 0.5, 0.0, 1.0
    for _ in range(max_eval):
        value = eta - tat_cf0(x, 2 * depth)
        if math.isinf(value) or math.isnan(value):
            raise ValueError("TAT C-map returned %r" % value)
        if abs(value - 0) < tol:
            return x
        if value > 0:
            hi = x
        elif value < 0:
            lo = x
        x = 0.5 * (lo + hi)
    raise TATUnachievable(
        "TAT target C_f(0) = %g unachievable with %d leaky-ReLU activations (max evaluations %d)"
        % (eta, 2 * depth, max_eval))


class TReLU(nn.Module):
    """phi(z) = s*z (z >= 0), s*a*z (z < 0), s = sqrt(2/(1+a^2))."""

    def __init__(self, neg_slope):
        super().__init__()
        self.neg_slope = float(neg_slope)
        self.output_scale = math.sqrt(2.0 / (1.0 + self.neg_slope ** 2))

    def forward(self, x):
        return self.output_scale * F.leaky_relu(x, negative_slope=self.neg_slope)

    def extra_repr(self):
        return "neg_slope=%r, output_scale=%r" % (self.neg_slope, self.output_scale)


# ---------------------------------------------------------------------------------------------
# E-SPA (spec 6.2)
# ---------------------------------------------------------------------------------------------
def espa_alpha_L(gamma_L):
    return math.sqrt(1.0 - math.exp(-2.0 * gamma_L))


def espa_gamma(l, depth, gamma_L):
    """gamma_l = -1/2 ln(1 - alpha_L^(2l/L)); gamma_L returned exactly for l = L."""
    if l == depth:
        return float(gamma_L)
    aL = espa_alpha_L(gamma_L)
    return -0.5 * math.log(1.0 - aL ** (2.0 * l / depth))


def espa_kernel(n, gamma):
    """Sigma[i, j] = exp(-gamma |i - j|), fp64, flattened token indices."""
    idx = torch.arange(n, dtype=torch.float64)
    return torch.exp(-gamma * (idx[:, None] - idx[None, :]).abs())


def _sym_root(sigma, inverse):
    """Symmetric (inverse) square root with eigenvalues clamped at lambda_max * N * 2^-52."""
    evals, evecs = torch.linalg.eigh(sigma)
    thr = evals.max() * sigma.shape[-1] * EPS64
    ev = torch.clamp(evals, min=thr)
    r = torch.rsqrt(ev) if inverse else torch.sqrt(ev)
    return (evecs * r.unsqueeze(-2)) @ evecs.t()


def espa_attention_matrix(n, l, depth, gamma_L):
    """A_l = Sigma_l^{1/2} Sigma_{l-1}^{-1/2} in fp64 with the eps32 positivity floor."""
    assert 1 <= l <= depth
    S = _sym_root(espa_kernel(n, espa_gamma(l, depth, gamma_L)), inverse=False)
    if l == 1:
        Sinv = torch.eye(n, dtype=torch.float64)
    else:
        Sinv = _sym_root(espa_kernel(n, espa_gamma(l - 1, depth, gamma_L)), inverse=True)
    A = S @ Sinv
    return torch.clamp(A, min=EPS32)


def espa_buffers(n, l, depth, gamma_L, seed_compat=False, return_A=False):
    """(d [1,1,N,1], B [1,1,N,N]) fp32 for layer l (1-based)."""
    A = espa_attention_matrix(n, l, depth, gamma_L)
    d = A.sum(dim=1)
    logA = torch.log(A)
    if seed_compat:
        B = logA - torch.log(d)[None, :]  # ln A_ij - ln d_j
    else:
        B = logA - torch.log(d)[:, None]  # ln A_ij - ln d_i
    out = (d.reshape(1, 1, n, 1).float().contiguous(), B.reshape(1, 1, n, n).float().contiguous())
    if return_A:
        return out + (A,)
    return out


# ---------------------------------------------------------------------------------------------
# Shared input stage (spec 4)
# ---------------------------------------------------------------------------------------------
def posemb_sincos_2d(dim, h, w, dtype=torch.float32, device=None):
    """[sin(x w) | cos(x w) | sin(y w) | cos(y w)], token n = y*w + x; computed in fp64."""
    assert dim % 4 == 0, "dim must be a multiple of 4 for the sincos embedding"
    K = dim // 4
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                          indexing="ij")
    k = torch.arange(K, dtype=torch.float64)
    omega = 1.0 / (10000.0 ** (k / (K - 1))) if K > 1 else torch.ones(1, dtype=torch.float64)
    yo = y.flatten()[:, None] * omega[None, :]
    xo = x.flatten()[:, None] * omega[None, :]
    pe = torch.cat((xo.sin(), xo.cos(), yo.sin(), yo.cos()), dim=1)
    return pe.to(dtype=dtype, device=device)


def _pair(t):
    return tuple(t) if isinstance(t, (tuple, list)) else (t, t)


def _patch_and_pe(conv, img):
    x = conv(img)  # [B, D, h, w]
    Bn, D, h, w = x.shape
    pe = posemb_sincos_2d(D, h, w, dtype=x.dtype, device=x.device)
    return x.reshape(Bn, D, h * w).permute(0, 2, 1) + pe


# ---------------------------------------------------------------------------------------------
# SUO init (spec 8)
# ---------------------------------------------------------------------------------------------
def suo_gain(n_out, n_in, seed_compat):
    if seed_compat:
        return max(math.sqrt(n_in / n_out), 1.0)
    return max(math.sqrt(n_out / n_in), 1.0)


@torch.no_grad()
def suo_(weight, gain):
    """Scaled uniform orthogonal: Householder QR of G (max x min), sign fix (sign(0)=+1)."""
    n_out, n_in = weight.shape
    r, c = max(n_out, n_in), min(n_out, n_in)
    G = torch.randn(r, c, dtype=weight.dtype)
    Q, R = torch.linalg.qr(G)
    sgn = torch.where(torch.diagonal(R) >= 0, torch.ones(c, dtype=G.dtype), -torch.ones(c, dtype=G.dtype))
    Q = Q * sgn[None, :]
    W = Q if n_out >= n_in else Q.t()
    weight.copy_(gain * W)
    return weight


# ---------------------------------------------------------------------------------------------
# SimplEsT-ViT
# ---------------------------------------------------------------------------------------------
class Layer(nn.Module):
    def __init__(self, n_in, n_out, act_fn, bias, seed_compat):
        super().__init__()
        self.lin = nn.Linear(n_in, n_out, bias=bias)
        self.act_fn = act_fn
        suo_(self.lin.weight, suo_gain(n_out, n_in, seed_compat))
        if bias:
            nn.init.zeros_(self.lin.bias)

    def forward(self, x):
        return self.act_fn(self.lin(x))


class FeedForward(nn.Module):
    def __init__(self, dim, mlp_dim, act_fn, bias, seed_compat):
        super().__init__()
        self.layer1 = Layer(dim, mlp_dim, act_fn, bias, seed_compat)
        self.layer2 = Layer(mlp_dim, dim, act_fn, bias, seed_compat)

    def forward(self, x):
        return self.layer2(self.layer1(x))


class ESPAAttention(nn.Module):
    def __init__(self, dim, heads, num_tokens, layer_idx, depth, gamma_L, qkv_bias, seed_compat):
        super().__init__()
        assert dim % heads == 0
        self.dim, self.heads, self.dim_head = dim, heads, dim // heads
        self.scale = self.dim_head ** -0.5
        d, B = espa_buffers(num_tokens, layer_idx, depth, gamma_L, seed_compat)
        # buffers first so that the state_dict lists d, B before to_qkv (spec 11)
        self.register_buffer("d", d)
        self.register_buffer("B", B)
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        with torch.no_grad():
            self.to_qkv.weight[:dim].zero_()
            self.to_qkv.weight[dim:].normal_(0.0, dim ** -0.5)
            if qkv_bias:
                self.to_qkv.bias.zero_()

    def forward(self, x):
        Bn, N, D = x.shape
        qkv = self.to_qkv(x).reshape(Bn, N, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [B, H, N, dh]
        dots = torch.matmul(q, k.transpose(-1, -2)) * self.scale + self.B
        attn = torch.softmax(dots, dim=-1)
        out = self.d * torch.matmul(attn, v)
        return out.transpose(1, 2).reshape(Bn, N, D)


class ESPATransformer(nn.Module):
    def __init__(self, dim, depth, heads, mlp_dim, num_tokens, act_fn, gamma_L, qkv_bias, mlp_bias,
                 seed_compat):
        super().__init__()
        layers = []
        for l in range(1, depth + 1):
            layers.append(ESPAAttention(dim, heads, num_tokens, l, depth, gamma_L, qkv_bias, seed_compat))
            layers.append(FeedForward(dim, mlp_dim, act_fn, mlp_bias, seed_compat))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


class SimplEsTViT(nn.Module):
    def __init__(self, image_size, patch_size, num_classes, dim, depth, heads, mlp_dim, channels=3,
                 eta=0.9, gamma_L=0.005, qkv_bias=True, mlp_bias=True, drop_p=0.0, seed_compat=False):
        super().__init__()
        ih, iw = _pair(image_size)
        ph, pw = _pair(patch_size)
        assert ih % ph == 0 and iw % pw == 0, "image size must be divisible by the patch size"
        assert dim % 4 == 0 and dim % heads == 0
        num_tokens = (ih // ph) * (iw // pw)
        self.seed_compat = bool(seed_compat)
        self.neg_slope = tat_slope(depth, eta)
        act_fn = TReLU(self.neg_slope)

        self.to_patch_embedding = nn.Conv2d(channels, dim, kernel_size=(ph, pw), stride=(ph, pw), bias=True)
        with torch.no_grad():
            self.to_patch_embedding.weight.normal_(0.0, (channels * ph * pw) ** -0.5)
            self.to_patch_embedding.bias.zero_()
        self.transformer = ESPATransformer(dim, depth, heads, mlp_dim, num_tokens, act_fn, gamma_L,
                                           qkv_bias, mlp_bias, seed_compat)
        self.drop = nn.Dropout(p=drop_p)
        self.linear_head = nn.Linear(dim, num_classes, bias=True)
        suo_(self.linear_head.weight, suo_gain(num_classes, dim, seed_compat))
        with torch.no_grad():
            self.linear_head.bias.zero_()

    def forward(self, img):
        x = _patch_and_pe(self.to_patch_embedding, img)
        x = self.transformer(x)
        x = self.drop(x)
        return self.linear_head(x.mean(dim=1))


# ---------------------------------------------------------------------------------------------
# SimpleViT
# ---------------------------------------------------------------------------------------------
class SVAttention(nn.Module):
    def __init__(self, dim, heads, seed_compat):
        super().__init__()
        assert dim % heads == 0
        self.heads, self.dim_head = heads, dim // heads
        self.scale = self.dim_head ** -0.5
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)
        if seed_compat:
            # the published runs had no output projection: exact identity, never trained
            with torch.no_grad():
                self.to_out.weight.copy_(torch.eye(dim))
            self.to_out.weight.requires_grad_(False)

    def forward(self, x):
        x = self.norm(x)
        Bn, N, D = x.shape
        qkv = self.to_qkv(x).reshape(Bn, N, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * self.scale, dim=-1)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(Bn, N, D)
        return self.to_out(out)


class SVFeedForward(nn.Module):
    def __init__(self, dim, mlp_dim):
        super().__init__()
        self.ff = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x):
        return self.ff(x)


class SVTransformer(nn.Module):
    def __init__(self, dim, depth, heads, mlp_dim, seed_compat):
        super().__init__()
        self.layers = nn.ModuleList(
            [nn.ModuleList([SVAttention(dim, heads, seed_compat), SVFeedForward(dim, mlp_dim)])
             for _ in range(depth)])

    def forward(self, x):
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return x


class SimpleViT(nn.Module):
    def __init__(self, image_size, patch_size, num_classes, dim, depth, heads, mlp_dim, channels=3,
                 drop_p=0.0, seed_compat=False):
        super().__init__()
        ih, iw = _pair(image_size)
        ph, pw = _pair(patch_size)
        assert ih % ph == 0 and iw % pw == 0, "image size must be divisible by the patch size"
        assert dim % 4 == 0 and dim % heads == 0
        self.seed_compat = bool(seed_compat)
        self.to_patch_embedding = nn.Conv2d(channels, dim, kernel_size=(ph, pw), stride=(ph, pw), bias=True)
        self.transformer = SVTransformer(dim, depth, heads, mlp_dim, seed_compat)
        self.drop = nn.Dropout(p=drop_p)
        self.linear_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def forward(self, img):
        x = _patch_and_pe(self.to_patch_embedding, img)
        x = self.transformer(x)
        x = self.drop(x)
        return self.linear_head(x.mean(dim=1))


# ---------------------------------------------------------------------------------------------
# Config helper
# ---------------------------------------------------------------------------------------------
MODEL_DEFAULTS = dict(arch="simplest", channels=3, eta=0.9, gamma_L=0.005, qkv_bias=True, mlp_bias=True,
                      drop_p=0.0, seed_compat=False)


def resolve_model_config(model_cfg):
    """Fill defaults; explicit dim/depth/heads/mlp_dim win over `width`; unknown keys ignored."""
    cfg = dict(MODEL_DEFAULTS)
    preset = WIDTH_PRESETS.get(str(model_cfg.get("width", "s")).lower(), WIDTH_PRESETS["s"])
    cfg.update(preset)
    for k in list(MODEL_DEFAULTS) + ["image_size", "patch_size", "num_classes", "dim", "depth", "heads",
                                     "mlp_dim"]:
        if k in model_cfg and model_cfg[k] is not None:
            cfg[k] = model_cfg[k]
    for k in ("image_size", "patch_size", "num_classes"):
        if k not in cfg:
            raise KeyError("model config lacks %r" % k)
    return cfg


def build_from_config(model_cfg):
    c = resolve_model_config(model_cfg)
    arch = str(c["arch"]).lower()
    common = dict(image_size=int(c["image_size"]), patch_size=int(c["patch_size"]),
                  num_classes=int(c["num_classes"]), dim=int(c["dim"]), depth=int(c["depth"]),
                  heads=int(c["heads"]), mlp_dim=int(c["mlp_dim"]), channels=int(c["channels"]),
                  drop_p=float(c["drop_p"]), seed_compat=bool(c["seed_compat"]))
    if arch == "simplest":
        return SimplEsTViT(eta=float(c["eta"]), gamma_L=float(c["gamma_L"]), qkv_bias=bool(c["qkv_bias"]),
                           mlp_bias=bool(c["mlp_bias"]), **common)
    if arch == "simplevit":
        return SimpleViT(**common)
    raise ValueError("unknown arch %r" % arch)


def trainable_named_parameters(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def count_trainable(model):
    return sum(p.numel() for _, p in trainable_named_parameters(model))


# ---------------------------------------------------------------------------------------------
# Self-test
# ---------------------------------------------------------------------------------------------
def _close(a, b, tol, what):
    assert abs(a - b) <= tol, "%s: %r vs %r (tol %g)" % (what, a, b, tol)


def selftest(full_counts=True):
    torch.manual_seed(0)
    ok = []

    # TAT (facts 1-4)
    a = tat_slope(12, 0.9)
    assert a == 0.2385026216506958, repr(a)
    _close(math.sqrt(2 / (1 + a * a)), 1.3756293678, 1e-10, "s")
    _close(tat_cf0(a, 24), 0.9, 1e-8, "C^24(0)")
    _close(lrelu_cmap(0.0, a), 0.17464647897988936, 1e-15, "C_a(0)")
    table = {7: 0.053989410400390625, 8: 0.10449862480163574, 10: 0.1813802719116211,
             12: 0.2385026216506958, 16: 0.3202233910560608, 24: 0.4211617410182953,
             32: 0.48432663083076477, 64: 0.6125125288963318}
    for L, v in table.items():
        assert tat_slope(L) == v, (L, tat_slope(L), v)
    assert tat_slope(12, 0.8) == 0.39370471239089966 and tat_slope(12, 0.95) == 0.06734687089920044
    for L in range(1, 7):
        try:
            tat_slope(L)
            raise AssertionError("L=%d should be unachievable" % L)
        except TATUnachievable:
            pass
    act = TReLU(a)
    phi = act(torch.tensor([1.0, -1.0], dtype=torch.float64))
    _close(phi[0].item(), 1.3756294, 1e-7, "phi(1)")
    _close(phi[1].item(), -0.3280912, 1e-7, "phi(-1)")
    ok.append("TAT slope table")

    # E-SPA (facts 5, 6, 9, 10)
    _close(espa_alpha_L(0.005), 0.09975052005293954, 1e-15, "alpha_L")
    _close(espa_gamma(1, 12, 0.005), 0.5712954001179985, 1e-14, "gamma_1")
    _close(espa_gamma(2, 12, 0.005), 0.3115984467495441, 1e-14, "gamma_2")
    rows = {1: (1.466249, 1.896187, 0.949773, 0.906332), 2: (1.184726, 1.341468, 0.904893, 0.836356),
            7: (1.115163, 1.139959, 0.859400, 0.826131), 12: (1.032144, 1.022708, 0.837408, 0.826789)}
    for l, (d0, d32, a00, a3232) in rows.items():
        d, B, A = espa_buffers(64, l, 12, 0.005, False, return_A=True)
        _close(d[0, 0, 0, 0].item(), d0, 1e-6, "d0 l=%d" % l)
        _close(d[0, 0, 32, 0].item(), d32, 1e-6, "d32 l=%d" % l)
        _close(A[0, 0].item(), a00, 1e-6, "A00 l=%d" % l)
        _close(A[32, 32].item(), a3232, 1e-6, "A3232 l=%d" % l)
        rs = torch.exp(B[0, 0].double()).sum(-1)
        assert (rs - 1).abs().max().item() < 1e-6
    for N, l, d0, dc in ((196, 1, 1.466265, 1.896202), (196, 12, 1.076659, 1.068732)):
        d, B = espa_buffers(N, l, 12, 0.005, False)
        _close(d[0, 0, 0, 0].item(), d0, 1e-6, "N196 d0")
        _close(d[0, 0, 105, 0].item(), dc, 1e-6, "N196 d105")
    brow = {(1, False): (-0.434240, -1.650822, -2.500364, -3.251382),
            (12, False): (-0.209082, -4.813569, -5.022960, -5.165600),
            (1, True): (-0.434240, -1.793447, -2.701737, -3.480233),
            (12, True): (-0.209082, -4.812810, -5.021512, -5.163516)}
    for (l, compat), vals in brow.items():
        _, B = espa_buffers(64, l, 12, 0.005, compat)
        for j, v in enumerate(vals):
            _close(B[0, 0, 0, j].item(), v, 1e-5, "B[0,%d] l=%d compat=%s" % (j, l, compat))
    d, B, A = espa_buffers(64, 1, 12, 0.005, True, return_A=True)
    M = d[0, 0].double() * torch.softmax(B[0, 0].double(), -1)
    rel = (torch.linalg.norm(M - A) / torch.linalg.norm(A)).item()
    assert abs(rel - 1.6e-2) < 1.6e-3, rel
    ok.append("E-SPA buffers (6.3 table, B rows, compat distance %.4f)" % rel)

    # PE (fact 16)
    pe = posemb_sincos_2d(384, 8, 8, dtype=torch.float64)
    for idx, v in zip((0, 96, 192, 288), (0.9092974, -0.4161468, 0.8414710, 0.5403023)):
        _close(pe[10, idx].item(), v, 1e-6, "PE[10,%d]" % idx)
    assert ((pe ** 2).sum(-1) - 192).abs().max().item() < 1e-4
    ok.append("posemb")

    # Keys (fact 22) and counts (section 10)
    st = SimplEsTViT(32, 4, 10, 384, 12, 6, 1536)
    sd = st.state_dict()
    assert len(sd) == 100, len(sd)
    keys = list(sd)
    assert keys[:6] == ["to_patch_embedding.weight", "to_patch_embedding.bias", "transformer.layers.0.d",
                        "transformer.layers.0.B", "transformer.layers.0.to_qkv.weight",
                        "transformer.layers.0.to_qkv.bias"], keys[:6]
    assert keys[6:10] == ["transformer.layers.1.layer1.lin.weight", "transformer.layers.1.layer1.lin.bias",
                          "transformer.layers.1.layer2.lin.weight", "transformer.layers.1.layer2.lin.bias"]
    assert keys[-2:] == ["linear_head.weight", "linear_head.bias"]
    assert sd["transformer.layers.22.d"].shape == (1, 1, 64, 1)
    assert sd["transformer.layers.22.B"].shape == (1, 1, 64, 64)
    assert sd["transformer.layers.0.to_qkv.weight"].shape == (1152, 384)
    assert sd["to_patch_embedding.weight"].shape == (384, 3, 4, 4)
    assert count_trainable(st) == 19523722, count_trainable(st)
    # init facts 12, 13 on the S model
    W = st.transformer.layers[0].to_qkv.weight.detach()
    assert (W[:384] == 0).all() and (st.transformer.layers[0].to_qkv.bias == 0).all()
    _close(W[384:].std().item(), 384 ** -0.5, 0.02 * 384 ** -0.5, "Wk/Wv std")
    _close(st.to_patch_embedding.weight.std().item(), 48 ** -0.5, 0.02 * 48 ** -0.5, "patch std")
    W1 = st.transformer.layers[1].layer1.lin.weight.detach()
    W2 = st.transformer.layers[1].layer2.lin.weight.detach()
    assert (W1.t() @ W1 - 4 * torch.eye(384)).abs().max().item() <= 4e-5
    assert (W2 @ W2.t() - torch.eye(384)).abs().max().item() <= 1e-5
    Wh = st.linear_head.weight.detach()
    assert (Wh @ Wh.t() - torch.eye(10)).abs().max().item() <= 1e-5
    del st, sd

    sv = SimpleViT(32, 4, 10, 384, 12, 6, 1536)
    sd = sv.state_dict()
    assert len(sd) == 126, len(sd)
    keys = list(sd)
    assert keys[2:14] == ["transformer.layers.0.0.norm.weight", "transformer.layers.0.0.norm.bias",
                          "transformer.layers.0.0.to_qkv.weight", "transformer.layers.0.0.to_out.weight",
                          "transformer.layers.0.1.ff.0.weight", "transformer.layers.0.1.ff.0.bias",
                          "transformer.layers.0.1.ff.1.weight", "transformer.layers.0.1.ff.1.bias",
                          "transformer.layers.0.1.ff.3.weight", "transformer.layers.0.1.ff.3.bias",
                          "transformer.layers.1.0.norm.weight", "transformer.layers.1.0.norm.bias"], keys[2:14]
    assert keys[-4:] == ["linear_head.0.weight", "linear_head.0.bias", "linear_head.1.weight",
                         "linear_head.1.bias"]
    assert count_trainable(sv) == 21298570, count_trainable(sv)
    del sv, sd
    svc = SimpleViT(32, 4, 10, 384, 12, 6, 1536, seed_compat=True)
    assert len(svc.state_dict()) == 126
    assert torch.equal(svc.transformer.layers[3][0].to_out.weight, torch.eye(384))
    assert count_trainable(svc) == 19529098, count_trainable(svc)
    del svc
    st_nb = SimplEsTViT(32, 4, 10, 384, 12, 6, 1536, qkv_bias=False, mlp_bias=False)
    assert len(st_nb.state_dict()) == 100 - 12 - 24
    assert count_trainable(st_nb) == 19523722 - 12 * 3 * 384 - 12 * (1536 + 384)
    del st_nb
    ok.append("keys 100/126 and S/4 CIFAR-10 counts")

    if full_counts:
        # (preset, image, patch, classes): (SimplEsT, SimpleViT default, SimpleViT compat)
        counts = {("s", 32, 4, 100): (19558372, 21333220, 19563748),
                  ("s", 64, 8, 200): (19652168, 21427016, 19657544),
                  ("s", 224, 16, 1000): (20181352, 21956200, 20186728),
                  ("ti", 32, 4, 10): (4895818, 5340874, 4898506),
                  ("ti", 224, 16, 1000): (5225128, 5670184, 5227816),
                  ("b", 32, 4, 10): (77975818, 85064458, 77986570),
                  ("b", 224, 16, 1000): (79290088, 86378728, 79300840)}
        for (w, img, p, C), (c_st, c_sv, c_svc) in counts.items():
            base = dict(image_size=img, patch_size=p, num_classes=C, width=w)
            for arch, compat, want in (("simplest", False, c_st), ("simplevit", False, c_sv),
                                       ("simplevit", True, c_svc)):
                m = build_from_config(dict(base, arch=arch, seed_compat=compat))
                got = count_trainable(m)
                assert got == want, (w, img, p, C, arch, compat, got, want)
                del m
        ok.append("all section-10 parameter counts")

    # Small-model init facts (13 compat, C > D heads) and fact 14
    for compat in (False, True):
        for C in (5, 24):
            torch.manual_seed(1)
            m = SimplEsTViT(8, 2, C, 16, 7, 2, 64, seed_compat=compat)
            W1 = m.transformer.layers[1].layer1.lin.weight.detach()
            W2 = m.transformer.layers[1].layer2.lin.weight.detach()
            g1, g2 = (1.0, 4.0) if compat else (4.0, 1.0)
            assert (W1.t() @ W1 - g1 * torch.eye(16)).abs().max().item() <= 1e-5 * g1
            assert (W2 @ W2.t() - g2 * torch.eye(16)).abs().max().item() <= 1e-5 * g2
            Wh = m.linear_head.weight.detach()
            if C <= 16:
                g = 16 / C if compat else 1.0
                G = Wh @ Wh.t()
                assert (G - g * torch.eye(C)).abs().max().item() <= 1e-5 * g, (compat, C)
            else:
                g = 1.0 if compat else C / 16
                G = Wh.t() @ Wh
                assert (G - g * torch.eye(16)).abs().max().item() <= 1e-5 * g, (compat, C)
    torch.manual_seed(5)
    md = SimplEsTViT(8, 2, 5, 16, 7, 2, 64, seed_compat=False)
    torch.manual_seed(5)
    mc = SimplEsTViT(8, 2, 5, 16, 7, 2, 64, seed_compat=True)
    xin = torch.randn(3, 16, 16)
    with torch.no_grad():
        assert torch.equal(md.transformer.layers[1](xin), mc.transformer.layers[1](xin))
    ok.append("SUO Gram matrices, head gains, default/compat MLP bitwise equal")

    # fact 11 / zero-query: the attention layer at init computes d * softmax(B) V
    att = md.transformer.layers[0]
    with torch.no_grad():
        y = att(xin)
        v = xin @ att.to_qkv.weight[32:].t()
        ref = (att.d[0, 0] * torch.softmax(att.B[0, 0], -1)) @ v
        assert (y - ref).abs().max().item() < 1e-5
    ok.append("zero-query attention")

    for line in ok:
        print("ok:", line)
    print("selftest passed")


if __name__ == "__main__":
    import sys
    selftest(full_counts="--quick" not in sys.argv)
