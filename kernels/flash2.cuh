// Fast fused attention, FlashAttention-2 style (mma.sync m16n8k16 bf16 via inline PTX, ldmatrix, cp.async).
// It replaced the first WMMA kernels (flash_attn.cu, retired in 45b36f0) with the same semantics and saved state.
//
// Per (batch b, head h), with D = H*dh and scale = 1/sqrt(dh):
//   qkv (B, N, 3D) bf16, feature s*D + h*dh + e (s = 0 q, 1 k, 2 v)
//   S = q k^T * scale + bias (bias fp32 (N, N) shared by batch and heads, or NULL)
//   P = softmax(S) over keys, O = P V
//   out[b, i, h*dh + e] = rowscale[i] * O[i, e]  (rowscale fp32 (N) or NULL = 1), bf16 (B, N, D)
// The forward also saves lse (fp32 (B, H, N), index (b*H + h)*N + i, natural log) and the un-rowscaled O (bf16,
// layout of out). The backward overwrites all of dqkv (B, N, 3D) bf16; bias and rowscale get no gradient. It is
// deterministic (no float atomics): a pre-kernel computes Delta (and dO = rowscale * dout when rowscale != NULL)
// into the workspace, one kernel accumulates dK, dV per key tile, another dQ per query tile.
//
// Supported: dh in {32, 64}, any N >= 1 (tiles of 64 with masking). Device sm_80 or newer. Global rows must be
// 16-byte aligned (cudaMalloc'd buffers; D a multiple of 8, which dh in {32, 64} guarantees).
// Errors (bad sizes, launch failures) print "flash2: <what>: <why>" to stderr and exit(1).
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stddef.h>

// Returns 1 if (N, dh) is supported by these kernels.
int flash2_supported(int N, int dh);
// Scratch bytes the backward needs, for given sizes (Delta fp32 (B, H, N) plus a rowscaled dO copy bf16 (B, N, D)).
size_t flash2_bwd_workspace(int B, int N, int H, int dh);
void flash2_fwd(__nv_bfloat16 *out, float *lse, __nv_bfloat16 *o_saved, const __nv_bfloat16 *qkv,
                const float *bias, const float *rowscale, int B, int N, int H, int dh, cudaStream_t st);
void flash2_bwd(__nv_bfloat16 *dqkv, const __nv_bfloat16 *dout, const __nv_bfloat16 *qkv,
                const __nv_bfloat16 *o_saved, const float *lse, const float *bias, const float *rowscale, int B,
                int N, int H, int dh, void *workspace, cudaStream_t st);
