// Fast fused attention, forward and backward, FlashAttention-2 style (see flash2.cuh for the semantics).
//
// Building blocks (inline PTX, sm_80+): mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, ldmatrix.x4 (plain and
// .trans) from shared memory, cp.async 16-byte copies with zero fill, ex2.approx. Tiles are 64 rows; a CTA has 4 warps
// and warp w owns rows 16w..16w+15 of its CTA's tile. Shared tiles are (64, DH) bf16 with rows padded by 16 bytes
// (stride DH + 8 elements), which makes every ldmatrix phase (8 rows x 16 bytes) and cp.async store conflict free.
//
// m16n8k16 fragment layouts (PTX ISA), lane = 4*g + q (g = lane/4, q = lane%4):
//   A (16x16, row): reg0 = A[g][2q..2q+1], reg1 = A[g+8][2q..], reg2 = A[g][2q+8..], reg3 = A[g+8][2q+8..]
//   B (16x8, col):  reg0 = B[2q..2q+1][g], reg1 = B[2q+8..2q+9][g]
//   C (16x8):       c0,c1 = C[g][2q..2q+1], c2,c3 = C[g+8][2q..2q+1]
// ldmatrix.x4 gives reg m = 8x8 matrix m, lane holding row g, elements 2q, 2q+1 (with .trans: the transpose);
// lanes 8m..8m+7 supply the row addresses of matrix m. Hence, for a row-major shared tile X:
//   * A fragment of X[r0.., c0..]:                           lane address row r0 + (lane & 15), col c0 + 8*(lane >> 4)
//   * B fragments with B[k][n] = X[n][k] (two n8 tiles, k16): row n0 + (lane & 7) + 8*(lane >> 4),
//     col k0 + 8*((lane >> 3) & 1); regs {0,1} = n-tile n0, {2,3} = n-tile n0 + 8 (no .trans)
//   * B fragments with B[k][n] = X[k][n] (two n8 tiles, k16): row k0 + (lane & 15), col n0 + 8*(lane >> 4), .trans;
//     regs {0,1} = n-tile n0, {2,3} = n-tile n0 + 8
//   * an accumulator tile pair (n-tiles 2c, 2c+1) is the A fragment of k-chunk c after packing to bf16:
//     {pack(C2c[0], C2c[1]), pack(C2c[2], C2c[3]), pack(C2c+1[0], C2c+1[1]), pack(C2c+1[2], C2c+1[3])}.
//
// Forward: CTA per (b, h, 64-query tile). Q and the first K, V tile arrive by cp.async; each warp keeps its Q rows as A
// fragments. Key tiles of 64 are double buffered (the next tile's cp.async overlaps this tile's math). S (16x64 per
// warp, 32 fp32 registers) is turned into log2-domain logits s*scale*log2e + bias*log2e (bias read from global, L2
// resident), masked (keys >= N -> -inf, so P = ex2(-inf) = 0 exactly), then the online softmax (row max over the quad
// with shfl_xor 1, 2; the row sum is kept per lane and reduced once at the end). P goes to bf16 A fragments straight
// from the accumulators; O (16 x DH) accumulates in registers (V as B operand by ldmatrix.trans). The epilogue stages
// O and rowscale*O through the warp's own shared rows and writes 16-byte rows; lse = ln2 * (m + log2 l).
//
// Backward: (1) f2_delta_kernel: Delta_i = sum_e dO_ie O_ie with dO = bf16(rowscale_i * dout) (the same rounded dO
// the products use); when rowscale != NULL it also writes that dO into the workspace, so that the tile kernels can
// cp.async it. (2) f2_bwd_dkdv_kernel: CTA per (b, h, 64-key tile), warp w owns 16 keys (K, V rows as A fragments);
// loops over query tiles (Q, dO, lse, Delta double buffered by cp.async) in sub-blocks of 32 queries:
//   S^T = K_w Q^T, P^T = ex2(S^T*scale*log2e + bias^T*log2e - lse*log2e), dV += P^T dO, dP^T = V_w dO^T,
//   dS^T = P^T (dP^T - Delta), dK += dS^T Q; writes dK*scale, dV. (3) f2_bwd_dq_kernel: CTA per (b, h, 64-query
// tile), warp w owns 16 queries (Q, dO rows as A fragments); loops over key tiles (K, V double buffered) in sub-blocks
// of 32 keys: S = Q_w K^T, P, dP = dO_w V^T, dS = P (dP - Delta), dQ += dS K; writes dQ*scale. No atomics.
//
// Ragged tiles: cp.async zero-fills rows >= N (never garbage in a product), keys >= N get P = 0 exactly (forced),
// queries >= N get P = dS = 0 in the backward and are never written; lse/Delta are read only for rows < N (zero
// filled otherwise). In the forward every key tile holds a valid key, so the running max is finite after tile 0.
//
// Resources (nvcc 13.0 -O3, registers sm_80 / sm_90, dynamic shared memory; __launch_bounds__(128, 3) on the three
// tile kernels, which measured faster on H200 than unconstrained 217-234 registers despite a few spilled bytes):
//   f2_fwd_kernel<64>       168 / 167 regs (4 B spill on sm_80)   46,080 B    f2_fwd_kernel<32>       142 / 140   25,600 B
//   f2_bwd_dkdv_kernel<64>  168 / 168 regs (20 / 16 B spill)      56,320 B    f2_bwd_dkdv_kernel<32>  165 / 168   31,744 B
//   f2_bwd_dq_kernel<64>    168 / 167 regs                        55,296 B    f2_bwd_dq_kernel<32>    128 / 128   30,720 B
//   f2_delta_kernel          32 regs, no shared memory (256 threads, one thread per 8 features)
// Build with -DFWD_MINB=1 -DDKDV_MINB=1 -DDQ_MINB=1 for spill-free code (measured 15-25% slower on H200).
//
// Checked on an H200 against a float64 reference (dh 32/64, N = 1, 16, 50, 64, 65, 197, 256, 131, with and without
// bias and rowscale, outputs pre-filled with NaN): all finite, max error 0.2-0.6% of max |ref| (lse ~1e-7 relative).
// ViT-S/16 shapes (B 256, N 196, H 6, dh 64, bias + rowscale), H200: forward 176 us, backward 544 us
// (flash_attn.cu: 579 us, 1900 us).
#include "flash2.cuh"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

typedef __nv_bfloat16 bf16;

namespace {

constexpr int TILE = 64;   // rows per tile (queries or keys)
constexpr int NWARP = 4;   // warp w owns rows 16w..16w+15
constexpr int NTHR = 32 * NWARP;
constexpr int SUB = 32;    // backward sub-block (columns of S handled at once)
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;
#ifndef FWD_MINB
#define FWD_MINB 3
#endif
#ifndef DKDV_MINB
#define DKDV_MINB 3
#endif
#ifndef DQ_MINB
#define DQ_MINB 3
#endif
static_assert(TILE == 16 * NWARP, "each warp owns 16 rows");

__host__ __device__ constexpr size_t align128(size_t x) { return (x + 127) & ~(size_t)127; }

template <int DH> struct Cfg {
    static constexpr int LD = DH + 8;                            // shared row stride (elements)
    static constexpr int TILE_ELEMS = TILE * LD;                 // one (64, DH) tile
    static constexpr size_t TILE_BYTES = (size_t)TILE_ELEMS * sizeof(bf16);
    static constexpr size_t FWD_SMEM = 5 * TILE_BYTES;           // Q, K[2], V[2]
    static constexpr size_t DKDV_SMEM = 6 * TILE_BYTES + 4 * TILE * sizeof(float);  // K, V, Q[2], dO[2], lse/Delta[2]
    static constexpr size_t DQ_SMEM = 6 * TILE_BYTES;            // Q, dO, K[2], V[2]
};

// ------------------------------------------------------------------------------------------------ PTX wrappers

__device__ __forceinline__ uint32_t smem_u32(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void cp_async16(uint32_t dst, const void *src, bool valid) {
    const int n = valid ? 16 : 0;  // 0: no bytes read, 16 zero bytes written
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n) : "memory");
}
__device__ __forceinline__ void cp_async4(uint32_t dst, const void *src, bool valid) {
    const int n = valid ? 4 : 0;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(n) : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// c += A B (16x8x16, bf16 in, fp32 accumulate)
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {  // lo -> low 16 bits (smaller column)
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&v);
}

__device__ __forceinline__ float ex2(float x) {  // 2^x; ex2(-inf) = +0
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Issues cp.async copies of tile rows r0 .. r0+63 (global rows of `stride` elements from src) into dst (row stride
// DH + 8); rows >= N are zero filled.
template <int DH>
__device__ __forceinline__ void load_tile(bf16 *dst, const bf16 *__restrict__ src, size_t stride, int r0, int N) {
    constexpr int CH = DH / 8, LD = Cfg<DH>::LD;
    static_assert((TILE * CH) % NTHR == 0, "whole chunks per thread");
#pragma unroll
    for (int it = 0; it < TILE * CH / NTHR; it++) {
        const int idx = threadIdx.x + it * NTHR, r = idx / CH, ch = idx % CH, gr = r0 + r;
        const bool v = gr < N;
        cp_async16(smem_u32(dst + r * LD + ch * 8), src + (size_t)(v ? gr : 0) * stride + ch * 8, v);
    }
}

// Writes 16 rows of a warp-private staging area (stride LD) to global rows row0 .. row0+15 (< N only), 16 bytes a
// lane at a time. dst points at row 0's first element; rows are `stride` elements apart.
template <int DH>
__device__ __forceinline__ void store_rows(bf16 *__restrict__ dst, size_t stride, const bf16 *stage, int row0, int N,
                                           int lane) {
    constexpr int CH = DH / 8, LD = Cfg<DH>::LD;
#pragma unroll
    for (int idx = lane; idx < 16 * CH; idx += 32) {
        const int r = idx / CH, ch = idx % CH;
        if (row0 + r < N)
            *reinterpret_cast<int4 *>(dst + (size_t)(row0 + r) * stride + ch * 8) =
                *reinterpret_cast<const int4 *>(stage + r * LD + ch * 8);
    }
}

// Stages accumulator tiles acc[ND][4] (16 x DH, this lane's elements) times mul into stage rows (stride LD) as bf16.
template <int DH>
__device__ __forceinline__ void stage_acc(bf16 *stage, const float (&acc)[DH / 8][4], float mul0, float mul1,
                                          int g, int q) {
    constexpr int LD = Cfg<DH>::LD;
#pragma unroll
    for (int d = 0; d < DH / 8; d++) {
        const int col = 8 * d + 2 * q;
        *reinterpret_cast<uint32_t *>(stage + g * LD + col) = pack_bf16(acc[d][0] * mul0, acc[d][1] * mul0);
        *reinterpret_cast<uint32_t *>(stage + (g + 8) * LD + col) = pack_bf16(acc[d][2] * mul1, acc[d][3] * mul1);
    }
}

// bias[row][col], bias[row][col + 1] (0 where absent or >= N); col is even. One 8-byte load when N is even.
__device__ __forceinline__ float2 load_bias2(const float *__restrict__ row, int col, int N, bool even) {
    float2 v = make_float2(0.0f, 0.0f);
    if (row && col < N) {
        if (even) {
            v = __ldg(reinterpret_cast<const float2 *>(row + col));
        } else {
            v.x = __ldg(row + col);
            if (col + 1 < N) v.y = __ldg(row + col + 1);
        }
    }
    return v;
}

struct TileIdx {
    int b, h, t;
};
__device__ __forceinline__ TileIdx tile_index(int H, int ntiles) {
    TileIdx ti;
    const int bh = blockIdx.x / ntiles;
    ti.t = blockIdx.x % ntiles;
    ti.h = bh % H;
    ti.b = bh / H;
    return ti;
}

// ------------------------------------------------------------------------------------------------ forward

template <int DH>
__global__ void __launch_bounds__(NTHR, FWD_MINB)
    f2_fwd_kernel(bf16 *__restrict__ out, float *__restrict__ lse, bf16 *__restrict__ o_saved,
                  const bf16 *__restrict__ qkv, const float *__restrict__ bias, const float *__restrict__ rowscale,
                  int N, int H, float scale_log2) {
    constexpr int LD = Cfg<DH>::LD, TE = Cfg<DH>::TILE_ELEMS, KD = DH / 16, ND = DH / 8;
    extern __shared__ __align__(128) unsigned char smem[];
    bf16 *sQ = reinterpret_cast<bf16 *>(smem);
    bf16 *sK = sQ + TE;      // 2 buffers
    bf16 *sV = sK + 2 * TE;  // 2 buffers
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    const int a_row = lane & 15, a_col = (lane >> 4) * 8;                        // A / .trans B addressing
    const int b_row = (lane & 7) + ((lane >> 4) << 3), b_col = ((lane >> 3) & 1) * 8;  // plain B addressing

    const int D = H * DH;
    const size_t D3 = 3 * (size_t)D;
    const int nt = (N + TILE - 1) / TILE;
    const TileIdx ti = tile_index(H, nt);
    const int q0 = ti.t * TILE;
    const bf16 *base = qkv + (size_t)ti.b * N * D3 + ti.h * DH;

    load_tile<DH>(sQ, base, D3, q0, N);
    load_tile<DH>(sK, base + D, D3, 0, N);
    load_tile<DH>(sV, base + 2 * D, D3, 0, N);
    cp_commit();

    const int i0 = q0 + warp * 16 + g, i1 = i0 + 8;  // this lane's two rows
    const float *brow0 = (bias && i0 < N) ? bias + (size_t)i0 * N : nullptr;
    const float *brow1 = (bias && i1 < N) ? bias + (size_t)i1 * N : nullptr;
    const bool even = (N & 1) == 0;  // bias rows 8-byte aligned: float2 loads

    uint32_t qf[KD][4];
    float o[ND][4];
#pragma unroll
    for (int d = 0; d < ND; d++) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.0f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;  // log2-domain running max, per-lane partial sums

    for (int t = 0; t < nt; t++) {
        const int buf = t & 1;
        if (t + 1 < nt) {
            load_tile<DH>(sK + (buf ^ 1) * TE, base + D, D3, (t + 1) * TILE, N);
            load_tile<DH>(sV + (buf ^ 1) * TE, base + 2 * D, D3, (t + 1) * TILE, N);
            cp_commit();
            cp_wait<1>();
        } else {
            cp_wait<0>();
        }
        __syncthreads();
        if (t == 0) {
#pragma unroll
            for (int kk = 0; kk < KD; kk++) ldsm_x4(qf[kk], smem_u32(sQ + (warp * 16 + a_row) * LD + kk * 16 + a_col));
        }
        const bf16 *cK = sK + buf * TE, *cV = sV + buf * TE;
        const int k0 = t * TILE;

        // Bias of this lane's two rows (issued before the products to hide the L2 latency).
        float2 bb0[8], bb1[8];
#pragma unroll
        for (int j = 0; j < 8; j++) {
            bb0[j] = load_bias2(brow0, k0 + 8 * j + 2 * q, N, even);
            bb1[j] = load_bias2(brow1, k0 + 8 * j + 2 * q, N, even);
        }

        // S (16 x 64) = Q_w K^T
        float s[8][4];
#pragma unroll
        for (int j = 0; j < 8; j++) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < KD; kk++) {
#pragma unroll
            for (int np = 0; np < 4; np++) {
                uint32_t r[4];
                ldsm_x4(r, smem_u32(cK + (np * 16 + b_row) * LD + kk * 16 + b_col));
                mma16816(s[2 * np], qf[kk], r[0], r[1]);
                mma16816(s[2 * np + 1], qf[kk], r[2], r[3]);
            }
        }

        // Logits in log2 units, masking, online softmax.
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int j = 0; j < 8; j++) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int col = k0 + 8 * j + 2 * q + e;
                if (col < N) {
                    s[j][e] = fmaf(s[j][e], scale_log2, (e ? bb0[j].y : bb0[j].x) * LOG2E);
                    s[j][2 + e] = fmaf(s[j][2 + e], scale_log2, (e ? bb1[j].y : bb1[j].x) * LOG2E);
                } else {
                    s[j][e] = -INFINITY;
                    s[j][2 + e] = -INFINITY;
                }
                mx0 = fmaxf(mx0, s[j][e]);
                mx1 = fmaxf(mx1, s[j][2 + e]);
            }
        }
        mx0 = quad_max(mx0);
        mx1 = quad_max(mx1);
        const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);  // finite: every tile has a valid key
        const float al0 = ex2(m0 - mn0), al1 = ex2(m1 - mn1);     // 0 on the first tile
        m0 = mn0;
        m1 = mn1;
        float rs0 = 0.0f, rs1 = 0.0f;
#pragma unroll
        for (int j = 0; j < 8; j++) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                s[j][e] = ex2(s[j][e] - mn0);
                s[j][2 + e] = ex2(s[j][2 + e] - mn1);
                rs0 += s[j][e];
                rs1 += s[j][2 + e];
            }
        }
        l0 = l0 * al0 + rs0;
        l1 = l1 * al1 + rs1;
#pragma unroll
        for (int d = 0; d < ND; d++) {
            o[d][0] *= al0;
            o[d][1] *= al0;
            o[d][2] *= al1;
            o[d][3] *= al1;
        }

        // O += P V
#pragma unroll
        for (int kc = 0; kc < 4; kc++) {
            const uint32_t pa[4] = {pack_bf16(s[2 * kc][0], s[2 * kc][1]), pack_bf16(s[2 * kc][2], s[2 * kc][3]),
                                    pack_bf16(s[2 * kc + 1][0], s[2 * kc + 1][1]),
                                    pack_bf16(s[2 * kc + 1][2], s[2 * kc + 1][3])};
#pragma unroll
            for (int dp = 0; dp < DH / 16; dp++) {
                uint32_t r[4];
                ldsm_x4_t(r, smem_u32(cV + (kc * 16 + a_row) * LD + dp * 16 + a_col));
                mma16816(o[2 * dp], pa, r[0], r[1]);
                mma16816(o[2 * dp + 1], pa, r[2], r[3]);
            }
        }
        __syncthreads();  // every warp is done with buffer `buf` before it is refilled
    }

    // Epilogue. sQ rows 16w.. were only read by warp w; sK buffer 0 is free after the loop's last barrier.
    l0 = quad_sum(l0);
    l1 = quad_sum(l1);
    const float inv0 = 1.0f / l0, inv1 = 1.0f / l1;
    const float rsc0 = (rowscale && i0 < N) ? rowscale[i0] : 1.0f, rsc1 = (rowscale && i1 < N) ? rowscale[i1] : 1.0f;
    bf16 *stO = sQ + warp * 16 * LD, *stOut = sK + warp * 16 * LD;
#pragma unroll
    for (int d = 0; d < ND; d++) {
        const int col = 8 * d + 2 * q;
        const float a = o[d][0] * inv0, b = o[d][1] * inv0, c = o[d][2] * inv1, e = o[d][3] * inv1;
        *reinterpret_cast<uint32_t *>(stO + g * LD + col) = pack_bf16(a, b);
        *reinterpret_cast<uint32_t *>(stO + (g + 8) * LD + col) = pack_bf16(c, e);
        *reinterpret_cast<uint32_t *>(stOut + g * LD + col) = pack_bf16(a * rsc0, b * rsc0);
        *reinterpret_cast<uint32_t *>(stOut + (g + 8) * LD + col) = pack_bf16(c * rsc1, e * rsc1);
    }
    __syncwarp();
    const size_t obase = (size_t)ti.b * N * D + ti.h * DH;
    store_rows<DH>(o_saved + obase, D, stO, q0 + warp * 16, N, lane);
    store_rows<DH>(out + obase, D, stOut, q0 + warp * 16, N, lane);
    if (q == 0) {
        float *lrow = lse + ((size_t)ti.b * H + ti.h) * N;
        if (i0 < N) lrow[i0] = (m0 + log2f(l0)) * LN2;
        if (i1 < N) lrow[i1] = (m1 + log2f(l1)) * LN2;
    }
}

// ------------------------------------------------------------------------------------------------ backward

// One thread per 8 features: dO = bf16(rowscale_i * dout) (written to dos when rowscale != NULL),
// Delta[(b*H + h)*N + i] = sum_e dO_ie O_ie, reduced over the DH/8 lanes of a (row, head).
template <int DH>
__global__ void __launch_bounds__(256)
    f2_delta_kernel(float *__restrict__ delta, bf16 *__restrict__ dos, const bf16 *__restrict__ dout,
                    const bf16 *__restrict__ o, const float *__restrict__ rowscale, int N, int H, long long nchunks) {
    constexpr int G = DH / 8;
    const long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const bool valid = c < nchunks;
    const int D = H * DH;
    const long long e0 = valid ? c * 8 : 0;
    const long long row = e0 / D;  // b*N + i
    const int h = (int)(e0 % D) / DH;
    float s = 0.0f;
    if (valid) {
        int4 dv = *reinterpret_cast<const int4 *>(dout + e0);
        const int4 ov = *reinterpret_cast<const int4 *>(o + e0);
        __nv_bfloat162 *dp = reinterpret_cast<__nv_bfloat162 *>(&dv);
        const __nv_bfloat162 *op = reinterpret_cast<const __nv_bfloat162 *>(&ov);
        const float rs = rowscale ? rowscale[row % N] : 1.0f;
#pragma unroll
        for (int t = 0; t < 4; t++) {
            float2 a = __bfloat1622float2(dp[t]);
            if (rowscale) {
                dp[t] = __floats2bfloat162_rn(a.x * rs, a.y * rs);
                a = __bfloat1622float2(dp[t]);
            }
            const float2 b = __bfloat1622float2(op[t]);
            s = fmaf(a.x, b.x, s);
            s = fmaf(a.y, b.y, s);
        }
        if (rowscale) *reinterpret_cast<int4 *>(dos + e0) = dv;
    }
#pragma unroll
    for (int off = 1; off < G; off <<= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (valid && (c % G) == 0) {
        const long long b = row / N;
        const int i = (int)(row % N);
        delta[((size_t)b * H + h) * N + i] = s;
    }
}

// dK, dV for one 64-key tile of (b, h). dO points at the rowscaled dO (B, N, D).
template <int DH>
__global__ void __launch_bounds__(NTHR, DKDV_MINB)
    f2_bwd_dkdv_kernel(bf16 *__restrict__ dqkv, const bf16 *__restrict__ dO, const bf16 *__restrict__ qkv,
                       const float *__restrict__ lse, const float *__restrict__ delta,
                       const float *__restrict__ bias, int N, int H, float scale, float scale_log2) {
    constexpr int LD = Cfg<DH>::LD, TE = Cfg<DH>::TILE_ELEMS, KD = DH / 16, ND = DH / 8;
    extern __shared__ __align__(128) unsigned char smem[];
    bf16 *sK = reinterpret_cast<bf16 *>(smem);
    bf16 *sV = sK + TE;
    bf16 *sQ = sV + TE;      // 2 buffers
    bf16 *sU = sQ + 2 * TE;  // 2 buffers (dO)
    float *sL = reinterpret_cast<float *>(sU + 2 * TE);  // [2][64] lse
    float *sD = sL + 2 * TILE;                            // [2][64] Delta
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    const int a_row = lane & 15, a_col = (lane >> 4) * 8;
    const int b_row = (lane & 7) + ((lane >> 4) << 3), b_col = ((lane >> 3) & 1) * 8;

    const int D = H * DH;
    const size_t D3 = 3 * (size_t)D;
    const int nt = (N + TILE - 1) / TILE;
    const TileIdx ti = tile_index(H, nt);
    const int k0 = ti.t * TILE;
    const bf16 *base = qkv + (size_t)ti.b * N * D3 + ti.h * DH;
    const bf16 *ubase = dO + (size_t)ti.b * N * D + ti.h * DH;
    const float *lse_bh = lse + ((size_t)ti.b * H + ti.h) * N;
    const float *delta_bh = delta + ((size_t)ti.b * H + ti.h) * N;

    auto load_query_side = [&](int buf, int qs) {
        load_tile<DH>(sQ + buf * TE, base, D3, qs, N);
        load_tile<DH>(sU + buf * TE, ubase, D, qs, N);
        if (threadIdx.x < 2 * TILE) {
            const int c = threadIdx.x & (TILE - 1), i = qs + c;
            const bool v = i < N;
            const float *src = (threadIdx.x < TILE ? lse_bh : delta_bh) + (v ? i : 0);
            float *dst = (threadIdx.x < TILE ? sL : sD) + buf * TILE + c;
            cp_async4(smem_u32(dst), src, v);
        }
    };

    load_tile<DH>(sK, base + D, D3, k0, N);
    load_tile<DH>(sV, base + 2 * D, D3, k0, N);
    load_query_side(0, 0);
    cp_commit();

    const int j0 = k0 + warp * 16 + g, j1 = j0 + 8;  // this lane's two keys
    const bool vj0 = j0 < N, vj1 = j1 < N;
    uint32_t kf[KD][4], vf[KD][4];
    float dk[ND][4], dv[ND][4];
#pragma unroll
    for (int d = 0; d < ND; d++)
#pragma unroll
        for (int e = 0; e < 4; e++) dk[d][e] = dv[d][e] = 0.0f;

    for (int t = 0; t < nt; t++) {
        const int buf = t & 1;
        if (t + 1 < nt) {
            load_query_side(buf ^ 1, (t + 1) * TILE);
            cp_commit();
            cp_wait<1>();
        } else {
            cp_wait<0>();
        }
        __syncthreads();
        if (t == 0) {
#pragma unroll
            for (int kk = 0; kk < KD; kk++) {
                ldsm_x4(kf[kk], smem_u32(sK + (warp * 16 + a_row) * LD + kk * 16 + a_col));
                ldsm_x4(vf[kk], smem_u32(sV + (warp * 16 + a_row) * LD + kk * 16 + a_col));
            }
        }
        const bf16 *cQ = sQ + buf * TE, *cU = sU + buf * TE;
        const float *cL = sL + buf * TILE, *cD = sD + buf * TILE;
        const int q0 = t * TILE;

#pragma unroll
        for (int sb = 0; sb < TILE / SUB; sb++) {
            const int c0 = sb * SUB;
            // S^T (16 keys x 32 queries) = K_w Q^T
            float s[4][4];
#pragma unroll
            for (int j = 0; j < 4; j++) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < KD; kk++) {
#pragma unroll
                for (int np = 0; np < 2; np++) {
                    uint32_t r[4];
                    ldsm_x4(r, smem_u32(cQ + (c0 + np * 16 + b_row) * LD + kk * 16 + b_col));
                    mma16816(s[2 * np], kf[kk], r[0], r[1]);
                    mma16816(s[2 * np + 1], kf[kk], r[2], r[3]);
                }
            }
            // P^T = exp(S^T*scale + bias^T - lse); zero for padded keys or queries
#pragma unroll
            for (int j = 0; j < 4; j++) {
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const int cl = c0 + 8 * j + 2 * q + e, i = q0 + cl;
                    const bool vi = i < N;
                    const float nl = -cL[cl] * LOG2E;
                    float b0 = 0.0f, b1 = 0.0f;
                    if (bias && vi) {
                        if (vj0) b0 = bias[(size_t)i * N + j0];
                        if (vj1) b1 = bias[(size_t)i * N + j1];
                    }
                    s[j][e] = (vi && vj0) ? ex2(fmaf(s[j][e], scale_log2, fmaf(b0, LOG2E, nl))) : 0.0f;
                    s[j][2 + e] = (vi && vj1) ? ex2(fmaf(s[j][2 + e], scale_log2, fmaf(b1, LOG2E, nl))) : 0.0f;
                }
            }
            // dV += P^T dO
#pragma unroll
            for (int kc = 0; kc < SUB / 16; kc++) {
                const uint32_t pa[4] = {pack_bf16(s[2 * kc][0], s[2 * kc][1]), pack_bf16(s[2 * kc][2], s[2 * kc][3]),
                                        pack_bf16(s[2 * kc + 1][0], s[2 * kc + 1][1]),
                                        pack_bf16(s[2 * kc + 1][2], s[2 * kc + 1][3])};
#pragma unroll
                for (int dp = 0; dp < DH / 16; dp++) {
                    uint32_t r[4];
                    ldsm_x4_t(r, smem_u32(cU + (c0 + kc * 16 + a_row) * LD + dp * 16 + a_col));
                    mma16816(dv[2 * dp], pa, r[0], r[1]);
                    mma16816(dv[2 * dp + 1], pa, r[2], r[3]);
                }
            }
            // dP^T = V_w dO^T
            float dpt[4][4];
#pragma unroll
            for (int j = 0; j < 4; j++) dpt[j][0] = dpt[j][1] = dpt[j][2] = dpt[j][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < KD; kk++) {
#pragma unroll
                for (int np = 0; np < 2; np++) {
                    uint32_t r[4];
                    ldsm_x4(r, smem_u32(cU + (c0 + np * 16 + b_row) * LD + kk * 16 + b_col));
                    mma16816(dpt[2 * np], vf[kk], r[0], r[1]);
                    mma16816(dpt[2 * np + 1], vf[kk], r[2], r[3]);
                }
            }
            // dS^T = P^T (dP^T - Delta)
#pragma unroll
            for (int j = 0; j < 4; j++) {
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const float dl = cD[c0 + 8 * j + 2 * q + e];
                    s[j][e] *= dpt[j][e] - dl;
                    s[j][2 + e] *= dpt[j][2 + e] - dl;
                }
            }
            // dK += dS^T Q
#pragma unroll
            for (int kc = 0; kc < SUB / 16; kc++) {
                const uint32_t pa[4] = {pack_bf16(s[2 * kc][0], s[2 * kc][1]), pack_bf16(s[2 * kc][2], s[2 * kc][3]),
                                        pack_bf16(s[2 * kc + 1][0], s[2 * kc + 1][1]),
                                        pack_bf16(s[2 * kc + 1][2], s[2 * kc + 1][3])};
#pragma unroll
                for (int dp = 0; dp < DH / 16; dp++) {
                    uint32_t r[4];
                    ldsm_x4_t(r, smem_u32(cQ + (c0 + kc * 16 + a_row) * LD + dp * 16 + a_col));
                    mma16816(dk[2 * dp], pa, r[0], r[1]);
                    mma16816(dk[2 * dp + 1], pa, r[2], r[3]);
                }
            }
        }
        __syncthreads();  // every warp is done with buffer `buf` before it is refilled
    }

    // Epilogue through the warp's own rows of sK / sV (read only by this warp, at t == 0).
    bf16 *stK = sK + warp * 16 * LD, *stV = sV + warp * 16 * LD;
    stage_acc<DH>(stK, dk, scale, scale, g, q);
    stage_acc<DH>(stV, dv, 1.0f, 1.0f, g, q);
    __syncwarp();
    bf16 *drow = dqkv + (size_t)ti.b * N * D3 + ti.h * DH;
    store_rows<DH>(drow + D, D3, stK, k0 + warp * 16, N, lane);
    store_rows<DH>(drow + 2 * D, D3, stV, k0 + warp * 16, N, lane);
}

// dQ for one 64-query tile of (b, h).
template <int DH>
__global__ void __launch_bounds__(NTHR, DQ_MINB)
    f2_bwd_dq_kernel(bf16 *__restrict__ dqkv, const bf16 *__restrict__ dO, const bf16 *__restrict__ qkv,
                     const float *__restrict__ lse, const float *__restrict__ delta, const float *__restrict__ bias,
                     int N, int H, float scale, float scale_log2) {
    constexpr int LD = Cfg<DH>::LD, TE = Cfg<DH>::TILE_ELEMS, KD = DH / 16, ND = DH / 8;
    extern __shared__ __align__(128) unsigned char smem[];
    bf16 *sQ = reinterpret_cast<bf16 *>(smem);
    bf16 *sU = sQ + TE;
    bf16 *sK = sU + TE;      // 2 buffers
    bf16 *sV = sK + 2 * TE;  // 2 buffers
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    const int a_row = lane & 15, a_col = (lane >> 4) * 8;
    const int b_row = (lane & 7) + ((lane >> 4) << 3), b_col = ((lane >> 3) & 1) * 8;

    const int D = H * DH;
    const size_t D3 = 3 * (size_t)D;
    const int nt = (N + TILE - 1) / TILE;
    const TileIdx ti = tile_index(H, nt);
    const int q0 = ti.t * TILE;
    const bf16 *base = qkv + (size_t)ti.b * N * D3 + ti.h * DH;
    const bf16 *ubase = dO + (size_t)ti.b * N * D + ti.h * DH;
    const float *lse_bh = lse + ((size_t)ti.b * H + ti.h) * N;
    const float *delta_bh = delta + ((size_t)ti.b * H + ti.h) * N;

    load_tile<DH>(sQ, base, D3, q0, N);
    load_tile<DH>(sU, ubase, D, q0, N);
    load_tile<DH>(sK, base + D, D3, 0, N);
    load_tile<DH>(sV, base + 2 * D, D3, 0, N);
    cp_commit();

    const int i0 = q0 + warp * 16 + g, i1 = i0 + 8;  // this lane's two queries
    const bool vi0 = i0 < N, vi1 = i1 < N;
    const float nl0 = vi0 ? -lse_bh[i0] * LOG2E : 0.0f, nl1 = vi1 ? -lse_bh[i1] * LOG2E : 0.0f;
    const float dl0 = vi0 ? delta_bh[i0] : 0.0f, dl1 = vi1 ? delta_bh[i1] : 0.0f;
    const float *brow0 = (bias && vi0) ? bias + (size_t)i0 * N : nullptr;
    const float *brow1 = (bias && vi1) ? bias + (size_t)i1 * N : nullptr;
    const bool even = (N & 1) == 0;

    uint32_t qf[KD][4], uf[KD][4];
    float dq[ND][4];
#pragma unroll
    for (int d = 0; d < ND; d++) dq[d][0] = dq[d][1] = dq[d][2] = dq[d][3] = 0.0f;

    for (int t = 0; t < nt; t++) {
        const int buf = t & 1;
        if (t + 1 < nt) {
            load_tile<DH>(sK + (buf ^ 1) * TE, base + D, D3, (t + 1) * TILE, N);
            load_tile<DH>(sV + (buf ^ 1) * TE, base + 2 * D, D3, (t + 1) * TILE, N);
            cp_commit();
            cp_wait<1>();
        } else {
            cp_wait<0>();
        }
        __syncthreads();
        if (t == 0) {
#pragma unroll
            for (int kk = 0; kk < KD; kk++) {
                ldsm_x4(qf[kk], smem_u32(sQ + (warp * 16 + a_row) * LD + kk * 16 + a_col));
                ldsm_x4(uf[kk], smem_u32(sU + (warp * 16 + a_row) * LD + kk * 16 + a_col));
            }
        }
        const bf16 *cK = sK + buf * TE, *cV = sV + buf * TE;
        const int k0 = t * TILE;

#pragma unroll
        for (int sb = 0; sb < TILE / SUB; sb++) {
            const int c0 = sb * SUB;
            float s[4][4], dp_[4][4];
#pragma unroll
            for (int j = 0; j < 4; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) s[j][e] = dp_[j][e] = 0.0f;
            float2 bb0[4], bb1[4];
#pragma unroll
            for (int j = 0; j < 4; j++) {
                bb0[j] = load_bias2(brow0, k0 + c0 + 8 * j + 2 * q, N, even);
                bb1[j] = load_bias2(brow1, k0 + c0 + 8 * j + 2 * q, N, even);
            }
            // S = Q_w K^T, dP = dO_w V^T (16 queries x 32 keys)
#pragma unroll
            for (int kk = 0; kk < KD; kk++) {
#pragma unroll
                for (int np = 0; np < 2; np++) {
                    uint32_t r[4];
                    ldsm_x4(r, smem_u32(cK + (c0 + np * 16 + b_row) * LD + kk * 16 + b_col));
                    mma16816(s[2 * np], qf[kk], r[0], r[1]);
                    mma16816(s[2 * np + 1], qf[kk], r[2], r[3]);
                    ldsm_x4(r, smem_u32(cV + (c0 + np * 16 + b_row) * LD + kk * 16 + b_col));
                    mma16816(dp_[2 * np], uf[kk], r[0], r[1]);
                    mma16816(dp_[2 * np + 1], uf[kk], r[2], r[3]);
                }
            }
            // dS = P (dP - Delta), P = exp(S*scale + bias - lse); zero for padded keys or queries
#pragma unroll
            for (int j = 0; j < 4; j++) {
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const int col = k0 + c0 + 8 * j + 2 * q + e;
                    const bool vj = col < N;
                    const float b0 = e ? bb0[j].y : bb0[j].x, b1 = e ? bb1[j].y : bb1[j].x;
                    const float p0 = (vj && vi0) ? ex2(fmaf(s[j][e], scale_log2, fmaf(b0, LOG2E, nl0))) : 0.0f;
                    const float p1 = (vj && vi1) ? ex2(fmaf(s[j][2 + e], scale_log2, fmaf(b1, LOG2E, nl1))) : 0.0f;
                    s[j][e] = p0 * (dp_[j][e] - dl0);
                    s[j][2 + e] = p1 * (dp_[j][2 + e] - dl1);
                }
            }
            // dQ += dS K
#pragma unroll
            for (int kc = 0; kc < SUB / 16; kc++) {
                const uint32_t pa[4] = {pack_bf16(s[2 * kc][0], s[2 * kc][1]), pack_bf16(s[2 * kc][2], s[2 * kc][3]),
                                        pack_bf16(s[2 * kc + 1][0], s[2 * kc + 1][1]),
                                        pack_bf16(s[2 * kc + 1][2], s[2 * kc + 1][3])};
#pragma unroll
                for (int dp = 0; dp < DH / 16; dp++) {
                    uint32_t r[4];
                    ldsm_x4_t(r, smem_u32(cK + (c0 + kc * 16 + a_row) * LD + dp * 16 + a_col));
                    mma16816(dq[2 * dp], pa, r[0], r[1]);
                    mma16816(dq[2 * dp + 1], pa, r[2], r[3]);
                }
            }
        }
        __syncthreads();  // every warp is done with buffer `buf` before it is refilled
    }

    bf16 *stQ = sQ + warp * 16 * LD;  // read only by this warp, at t == 0
    stage_acc<DH>(stQ, dq, scale, scale, g, q);
    __syncwarp();
    store_rows<DH>(dqkv + (size_t)ti.b * N * D3 + ti.h * DH, D3, stQ, q0 + warp * 16, N, lane);
}

// ------------------------------------------------------------------------------------------------ host side

void f2_check(const char *what) {
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) {
        fprintf(stderr, "flash2: %s: %s\n", what, cudaGetErrorString(e));
        exit(1);
    }
}

void f2_fail(const char *what, const char *why) {
    fprintf(stderr, "flash2: %s: %s\n", what, why);
    exit(1);
}

template <typename K> void f2_set_smem(K kernel, size_t bytes, const char *what) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
    if (e != cudaSuccess) {
        fprintf(stderr, "flash2: %s: cudaFuncSetAttribute(%zu bytes): %s\n", what, bytes, cudaGetErrorString(e));
        exit(1);
    }
}

unsigned f2_grid(int B, int H, int N, const char *what) {
    long long n = (long long)B * H * ((N + TILE - 1) / TILE);
    if (n <= 0 || n > 0x7fffffffLL) f2_fail(what, "grid size out of range");
    return (unsigned)n;
}

template <int DH>
void fwd_impl(bf16 *out, float *lse, bf16 *o_saved, const bf16 *qkv, const float *bias, const float *rowscale, int B,
              int N, int H, cudaStream_t st) {
    const size_t smem = Cfg<DH>::FWD_SMEM;
    f2_set_smem(f2_fwd_kernel<DH>, smem, "f2_fwd_kernel");
    f2_fwd_kernel<DH><<<f2_grid(B, H, N, "f2_fwd_kernel"), NTHR, smem, st>>>(
        out, lse, o_saved, qkv, bias, rowscale, N, H, LOG2E / sqrtf((float)DH));
    f2_check("f2_fwd_kernel");
}

template <int DH>
void bwd_impl(bf16 *dqkv, const bf16 *dout, const bf16 *qkv, const bf16 *o_saved, const float *lse,
              const float *bias, const float *rowscale, int B, int N, int H, float *delta, bf16 *dos,
              cudaStream_t st) {
    const float scale = 1.0f / sqrtf((float)DH), scale_log2 = LOG2E / sqrtf((float)DH);
    const long long nchunks = (long long)B * N * H * (DH / 8);
    const long long nblk = (nchunks + 255) / 256;
    if (nblk > 0x7fffffffLL) f2_fail("f2_delta_kernel", "grid size out of range");
    f2_delta_kernel<DH><<<(unsigned)nblk, 256, 0, st>>>(delta, dos, dout, o_saved, rowscale, N, H, nchunks);
    f2_check("f2_delta_kernel");
    const bf16 *dO = rowscale ? dos : dout;

    const size_t smem_kv = Cfg<DH>::DKDV_SMEM;
    f2_set_smem(f2_bwd_dkdv_kernel<DH>, smem_kv, "f2_bwd_dkdv_kernel");
    f2_bwd_dkdv_kernel<DH><<<f2_grid(B, H, N, "f2_bwd_dkdv_kernel"), NTHR, smem_kv, st>>>(
        dqkv, dO, qkv, lse, delta, bias, N, H, scale, scale_log2);
    f2_check("f2_bwd_dkdv_kernel");

    const size_t smem_q = Cfg<DH>::DQ_SMEM;
    f2_set_smem(f2_bwd_dq_kernel<DH>, smem_q, "f2_bwd_dq_kernel");
    f2_bwd_dq_kernel<DH><<<f2_grid(B, H, N, "f2_bwd_dq_kernel"), NTHR, smem_q, st>>>(
        dqkv, dO, qkv, lse, delta, bias, N, H, scale, scale_log2);
    f2_check("f2_bwd_dq_kernel");
}

}  // namespace

int flash2_supported(int N, int dh) { return N >= 1 && (dh == 32 || dh == 64); }

size_t flash2_bwd_workspace(int B, int N, int H, int dh) {
    // Delta (B, H, N) fp32, then the rowscaled dO (B, N, H*dh) bf16.
    return align128((size_t)B * H * N * sizeof(float)) + align128((size_t)B * N * H * dh * sizeof(bf16));
}

void flash2_fwd(__nv_bfloat16 *out, float *lse, __nv_bfloat16 *o_saved, const __nv_bfloat16 *qkv,
                const float *bias, const float *rowscale, int B, int N, int H, int dh, cudaStream_t st) {
    if (B <= 0 || H <= 0 || !flash2_supported(N, dh)) f2_fail("flash2_fwd", "unsupported sizes");
    if (dh == 32)
        fwd_impl<32>(out, lse, o_saved, qkv, bias, rowscale, B, N, H, st);
    else
        fwd_impl<64>(out, lse, o_saved, qkv, bias, rowscale, B, N, H, st);
}

void flash2_bwd(__nv_bfloat16 *dqkv, const __nv_bfloat16 *dout, const __nv_bfloat16 *qkv,
                const __nv_bfloat16 *o_saved, const float *lse, const float *bias, const float *rowscale, int B,
                int N, int H, int dh, void *workspace, cudaStream_t st) {
    if (B <= 0 || H <= 0 || !flash2_supported(N, dh)) f2_fail("flash2_bwd", "unsupported sizes");
    if (!workspace) f2_fail("flash2_bwd", "workspace is NULL (see flash2_bwd_workspace)");
    float *delta = static_cast<float *>(workspace);
    bf16 *dos = reinterpret_cast<bf16 *>(static_cast<unsigned char *>(workspace) +
                                         align128((size_t)B * H * N * sizeof(float)));
    if (dh == 32)
        bwd_impl<32>(dqkv, dout, qkv, o_saved, lse, bias, rowscale, B, N, H, delta, dos, st);
    else
        bwd_impl<64>(dqkv, dout, qkv, o_saved, lse, bias, rowscale, B, N, H, delta, dos, st);
}
