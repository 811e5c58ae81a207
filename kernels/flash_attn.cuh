// Fused flash-style attention (forward and backward) on tensor cores (WMMA bf16 16x16x16, fp32 accumulation).
//
// Per (batch b, head h), with D = H*dh and scale = 1/sqrt(dh):
//   qkv (B, N, 3D) bf16, feature s*D + h*dh + e (s = 0 q, 1 k, 2 v)
//   S = q k^T * scale + bias (bias fp32 (N, N) shared by batch and heads, or NULL)
//   P = softmax(S) over keys, O = P V
//   out[b, i, h*dh + e] = rowscale[i] * O[i, e]  (rowscale fp32 (N) or NULL = 1), bf16 (B, N, D)
// The forward also saves lse (fp32 (B, H, N), index (b*H + h)*N + i) and the un-rowscaled O (bf16, layout of out).
// The backward overwrites all of dqkv (B, N, 3D) bf16; bias and rowscale get no gradient. It is deterministic
// (no float atomics): one kernel accumulates dK, dV per key tile, another dQ per query tile.
//
// Supported: dh in {32, 64}, any N >= 1 (tiles of 64 with masking). Device sm_80 or newer.
// Errors (bad sizes, launch failures) print "flash_attn: <what>: <why>" to stderr and exit(1).
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stddef.h>

// Returns 1 if (N, dh) is supported by these kernels.
int flash_attn_supported(int N, int dh);
// Scratch bytes the backward needs (0 if none), for given sizes.
size_t flash_attn_bwd_workspace(int B, int N, int H, int dh);
void flash_attn_fwd(__nv_bfloat16 *out, float *lse, __nv_bfloat16 *o_saved, const __nv_bfloat16 *qkv,
                    const float *bias, const float *rowscale, int B, int N, int H, int dh, cudaStream_t st);
void flash_attn_bwd(__nv_bfloat16 *dqkv, const __nv_bfloat16 *dout, const __nv_bfloat16 *qkv,
                    const __nv_bfloat16 *o_saved, const float *lse, const float *bias, const float *rowscale,
                    int B, int N, int H, int dh, void *workspace, cudaStream_t st);
