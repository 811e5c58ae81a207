"""torch_ops.py: PyTorch's time for the ops that tests/gpu/bench_ops.c times, at the same ViT-S/16 shapes (batch 256:
50,176 token rows, D 384, MLP 1536, 6 heads of 64, 196 tokens), bf16 on the GPU: the peer for each op.
Prints one JSON line per op (us per call, TFLOP/s). Timed with CUDA events over `reps` calls after a warm-up."""
import json
import sys

import torch
import torch.nn.functional as F


def timeit(name, flops, fn, reps=20):
    fn()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(reps):
        fn()
    e1.record()
    torch.cuda.synchronize()
    us = e0.elapsed_time(e1) / reps * 1e3
    print(json.dumps({"op": name, "impl": "pytorch", "us": round(us, 1), "tflops": round(flops / us * 1e-6, 1)}),
          flush=True)


def main():
    if not torch.cuda.is_available():
        print("torch_ops: no GPU", file=sys.stderr)
        return 77
    dev, dt = "cuda", torch.bfloat16
    B, N, D, M, H, dh = 256, 196, 384, 1536, 6, 64
    R = B * N
    g = torch.Generator(device=dev).manual_seed(0)
    r = lambda *s: torch.randn(*s, device=dev, dtype=dt, generator=g)
    x, big, qkv = r(R, D), r(R, M), r(R, 3 * D)
    for name, din, dout in (("qkv 384->1152", D, 3 * D), ("fc1 384->1536", D, M), ("fc2 1536->384", M, D)):
        W, b = r(dout, din) * 0.05, r(dout) * 0.05
        inp = x if din == D else big
        dy = r(R, dout)
        f = 2.0 * R * din * dout
        timeit(f"matmul_fwd {name} +bias", f, lambda: F.linear(inp, W, b))
        # backward of a linear layer: dinp = dy W, dW = dy^T inp (fp32 accumulate into a bf16 grad here), db = sum dy
        timeit(f"matmul_bwd {name}", 2 * f, lambda: (dy @ W, dy.t() @ inp, dy.sum(0)))
    # explicit attention as the reference model computes it (bf16 autocast): S = q k^T / 8 + bias, softmax, P v
    q, k, v = (qkv.view(B, N, 3, H, dh).permute(2, 0, 3, 1, 4)[i].contiguous() for i in range(3))
    bias = torch.randn(N, N, device=dev, dtype=torch.float32) * 0.1
    fa = 4.0 * B * H * N * N * dh

    def fwd():
        s = (q @ k.transpose(-1, -2)) * dh ** -0.5 + bias
        return s.softmax(-1).to(dt) @ v

    timeit("attention_fwd explicit +bias (eager)", fa, fwd)
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    out = None

    def fwd_bwd():
        s = (qq @ kk.transpose(-1, -2)) * dh ** -0.5 + bias
        o = s.softmax(-1).to(dt) @ vv
        o.backward(torch.ones_like(o))

    timeit("attention_fwd+bwd explicit +bias (eager)", 3.5 * fa, fwd_bwd)
    timeit("attention_fwd sdpa (flash)", fa, lambda: F.scaled_dot_product_attention(q, k, v))
    timeit("attention_fwd sdpa +bias (mem-efficient)", fa,
           lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(dt)))
    timeit("gelu R x 1536", 0, lambda: F.gelu(big))
    timeit("layernorm R x 384", 0, lambda: F.layer_norm(x, (D,)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
