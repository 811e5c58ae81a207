// Fused flash-style attention, forward and backward (see flash_attn.cuh for the semantics).
//
// Design (the simplest that is clearly correct and uses tensor cores):
//   * Tiles of 64 queries x 64 keys; a CTA has 4 warps (128 threads) and each warp owns 16 rows of its tile.
//   * Every matrix product is nvcuda::wmma bf16 16x16x16 with fp32 accumulators. Operand tiles are staged in shared
//     memory (rows padded by 8 bf16 / 4 floats against bank conflicts; every fragment pointer is 32-byte aligned).
//   * Elementwise work (softmax, masking, dS) is done by lanes on fp32 tiles the warp stored to shared memory, so the
//     opaque accumulator layout never matters.
//   * Forward: one CTA per (b, h, query tile); loops over key tiles with the online softmax. The running output is
//     kept in shared memory (fp32, per warp) so that rescaling a row by exp(m_old - m_new) is a plain lane loop.
//   * Backward: (1) Delta_i = sum_e dO_ie O_ie into the workspace; (2) one CTA per (b, h, key tile) loops over all
//     query tiles accumulating dK and dV in registers; (3) one CTA per (b, h, query tile) loops over all key tiles
//     accumulating dQ. Both recompute P = exp(S - lse). No atomics: deterministic.
//
// Ragged tiles (N not a multiple of 64). Example N = 197: tiles start at 0, 64, 128, 192; the last one holds rows
// 192..196 (5 valid) and 59 padded rows. Loads zero-fill padded rows of Q, K, V and dO in shared memory (so no
// garbage, never NaN, enters a product: 0 * NaN would poison P V). Padded keys (j >= N) get P = 0 exactly (forced,
// not computed) and dS = 0; padded queries (i >= N) get P = dS = 0 in the backward and are never written (out, o_saved,
// lse, dq); padded keys' dk/dv rows are never written. bias is read only at (i < N, j < N); lse/Delta only for i < N.
// In the forward every key tile holds at least one valid key (k0 < N), so a valid row's running max is finite after
// the first tile and l >= 1 at the end (the max element contributes exp(0) = 1).
//
// Resources (nvcc 13.0, -O3, no spills; registers sm_80 / sm_90; dynamic shared memory per CTA):
//   fa_fwd_kernel<64>       128 / 128 regs   71,680 B      fa_fwd_kernel<32>       126 / 128 regs   51,200 B
//   fa_bwd_dkdv_kernel<64>  168 / 167 regs   90,624 B      fa_bwd_dkdv_kernel<32>   96 / 128 regs   74,240 B
//   fa_bwd_dq_kernel<64>    128 / 134 regs   90,624 B      fa_bwd_dq_kernel<32>     80 /  80 regs   74,240 B
//   fa_delta_kernel          26 regs, no shared memory (256 threads, one warp per row)
// All exceed the 48 KB static limit, so launches raise cudaFuncAttributeMaxDynamicSharedMemorySize first.
//
// Checked off-device by a host emulation of these exact loops (same shared-memory strides and offsets, WMMA loads
// and products emulated by their documented row/col-major + ldm semantics, lanes as loops, bf16 rounding where the
// kernels round) against a double-precision reference of backend_cpu.c for dh 32/64, N = 1, 50, 64, 65, 197, 256,
// with and without bias and rowscale, outputs pre-filled with NaN: all finite, max error ~0.3-0.5% of max |ref|.
#include "flash_attn.cuh"

#include <math.h>
#include <mma.h>
#include <stdio.h>
#include <stdlib.h>

using namespace nvcuda;
typedef __nv_bfloat16 bf16;

namespace {

constexpr int BQ = 64;          // queries per tile
constexpr int BK = 64;          // keys per tile
constexpr int NWARP = 4;        // warps per CTA; warp w owns rows 16w..16w+15 of its CTA's tile
constexpr int NTHR = NWARP * 32;
static_assert(BQ == 16 * NWARP && BK == 16 * NWARP, "each warp owns 16 rows of a tile");
static_assert(BK % 32 == 0 && BQ % 32 == 0, "lane loops cover tile columns in steps of 32");

// Shared-memory row strides (elements). Multiples of 8 (bf16) / 4 (fp32) as WMMA requires; 16 rows of any of them
// span a multiple of 32 bytes, and 16-column offsets are 32 (bf16) / 64 (fp32) bytes, so fragment pointers stay
// 32-byte aligned given 128-byte aligned buffer bases.
template <int DH> struct Strides {
    static constexpr int LDB = DH + 8;  // bf16 (64, DH) operand tiles: Q, K, V, dO
    static constexpr int LDS = 64 + 4;  // fp32 (16, 64) per-warp scratch (also holds (16, DH) results, DH <= 64)
    static constexpr int LDP = 64 + 8;  // bf16 (16, 64) per-warp P / dS tiles
    static constexpr int LDO = DH + 4;  // fp32 (16, DH) per-warp running output (forward)
};

typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> FragA;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> FragBRow;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> FragBCol;  // B = X^T with X row-major
typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> FragC;

__host__ __device__ constexpr size_t align128(size_t x) { return (x + 127) & ~(size_t)127; }

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// dst (rows, DH) with row stride LD (shared) = src rows r0 .. r0+rows-1 (global, row stride `stride` elements);
// rows at or past N are zero. With rowscale != NULL, row r is multiplied by rowscale[r0 + r] (in fp32, then rounded
// to bf16). 16-byte loads along the feature axis: src rows start 16-byte aligned (see the header's alignment notes).
template <int DH, int LD>
__device__ __forceinline__ void load_rows(bf16 *dst, const bf16 *__restrict__ src, size_t stride, int r0, int N,
                                          int rows, const float *__restrict__ rowscale) {
    constexpr int CH = DH / 8;  // int4 chunks (8 bf16) per row
    for (int idx = threadIdx.x; idx < rows * CH; idx += NTHR) {
        int r = idx / CH, ch = idx % CH, g = r0 + r;
        int4 v = make_int4(0, 0, 0, 0);
        if (g < N) {
            v = *reinterpret_cast<const int4 *>(src + (size_t)g * stride + ch * 8);
            if (rowscale) {
                float rs = rowscale[g];
                __nv_bfloat162 *p = reinterpret_cast<__nv_bfloat162 *>(&v);
#pragma unroll
                for (int t = 0; t < 4; t++) {
                    float2 f = __bfloat1622float2(p[t]);
                    p[t] = __floats2bfloat162_rn(f.x * rs, f.y * rs);
                }
            }
        }
        *reinterpret_cast<int4 *>(dst + r * LD + ch * 8) = v;
    }
}

// Which (b, h, tile) a CTA handles: blockIdx.x = (b*H + h)*ntiles + tile.
struct TileIdx {
    int b, h, t;
};
__device__ __forceinline__ TileIdx tile_index(int H, int ntiles) {
    TileIdx ti;
    int bh = blockIdx.x / ntiles;
    ti.t = blockIdx.x % ntiles;
    ti.h = bh % H;
    ti.b = bh / H;
    return ti;
}

// ------------------------------------------------------------------------------------------------ forward

template <int DH> struct FwdSmem {
    typedef Strides<DH> S;
    static constexpr size_t q = 0;
    static constexpr size_t k = q + align128((size_t)BQ * S::LDB * sizeof(bf16));
    static constexpr size_t v = k + align128((size_t)BK * S::LDB * sizeof(bf16));
    static constexpr size_t s = v + align128((size_t)BK * S::LDB * sizeof(bf16));
    static constexpr size_t p = s + align128((size_t)NWARP * 16 * S::LDS * sizeof(float));
    static constexpr size_t o = p + align128((size_t)NWARP * 16 * S::LDP * sizeof(bf16));
    static constexpr size_t bytes = o + align128((size_t)NWARP * 16 * S::LDO * sizeof(float));
};

template <int DH>
__global__ void __launch_bounds__(NTHR)
    fa_fwd_kernel(bf16 *__restrict__ out, float *__restrict__ lse, bf16 *__restrict__ o_saved,
                  const bf16 *__restrict__ qkv, const float *__restrict__ bias, const float *__restrict__ rowscale,
                  int N, int H, float scale) {
    typedef Strides<DH> ST;
    typedef FwdSmem<DH> SM;
    constexpr int LDB = ST::LDB, LDS = ST::LDS, LDP = ST::LDP, LDO = ST::LDO;
    extern __shared__ __align__(128) unsigned char smem[];
    bf16 *sQ = reinterpret_cast<bf16 *>(smem + SM::q);
    bf16 *sK = reinterpret_cast<bf16 *>(smem + SM::k);
    bf16 *sV = reinterpret_cast<bf16 *>(smem + SM::v);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float *sS = reinterpret_cast<float *>(smem + SM::s) + warp * 16 * LDS;  // this warp's S rows (16, BK)
    bf16 *sP = reinterpret_cast<bf16 *>(smem + SM::p) + warp * 16 * LDP;    // this warp's P rows (16, BK)
    float *sO = reinterpret_cast<float *>(smem + SM::o) + warp * 16 * LDO;  // this warp's running O (16, DH)

    const int D = H * DH;
    const size_t D3 = 3 * (size_t)D;
    const TileIdx ti = tile_index(H, (N + BQ - 1) / BQ);
    const int q0 = ti.t * BQ;
    const bf16 *base = qkv + (size_t)ti.b * N * D3 + ti.h * DH;  // q of token 0; k at +D, v at +2D

    load_rows<DH, LDB>(sQ, base, D3, q0, N, BQ, nullptr);
    for (int idx = lane; idx < 16 * LDO; idx += 32) sO[idx] = 0.0f;
    __syncthreads();
    FragA qf[DH / 16];
#pragma unroll
    for (int kk = 0; kk < DH / 16; kk++) wmma::load_matrix_sync(qf[kk], sQ + warp * 16 * LDB + kk * 16, LDB);

    // Running max and sum of row r = 16*warp + r; every lane holds the same values.
    float m_run[16], l_run[16];
#pragma unroll
    for (int r = 0; r < 16; r++) m_run[r] = -INFINITY, l_run[r] = 0.0f;

    for (int k0 = 0; k0 < N; k0 += BK) {
        __syncthreads();  // every warp is done with the previous K, V tile
        load_rows<DH, LDB>(sK, base + D, D3, k0, N, BK, nullptr);
        load_rows<DH, LDB>(sV, base + 2 * D, D3, k0, N, BK, nullptr);
        __syncthreads();

        // S (16, BK) = Q_w K^T: B = K^T is K (row-major) read column-major.
#pragma unroll
        for (int n = 0; n < BK / 16; n++) {
            FragC acc;
            wmma::fill_fragment(acc, 0.0f);
#pragma unroll
            for (int kk = 0; kk < DH / 16; kk++) {
                FragBCol kb;
                wmma::load_matrix_sync(kb, sK + n * 16 * LDB + kk * 16, LDB);
                wmma::mma_sync(acc, qf[kk], kb, acc);
            }
            wmma::store_matrix_sync(sS + n * 16, acc, LDS, wmma::mem_row_major);
        }
        __syncwarp();

        // Online softmax, one row at a time, lanes over keys (j = k0 + lane + 32c: coalesced bias reads).
#pragma unroll
        for (int r = 0; r < 16; r++) {
            const int i = q0 + warp * 16 + r;
            const float *brow = (bias && i < N) ? bias + (size_t)i * N : nullptr;
            float s[BK / 32], mx = -INFINITY;
#pragma unroll
            for (int c = 0; c < BK / 32; c++) {
                const int j = k0 + lane + 32 * c;
                float v = sS[r * LDS + lane + 32 * c] * scale;
                if (j < N) {
                    if (brow) v += brow[j];
                } else {
                    v = -INFINITY;
                }
                s[c] = v;
                mx = fmaxf(mx, v);
            }
            mx = warp_max(mx);
            const float m_new = fmaxf(m_run[r], mx);
            const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // guards -inf - -inf (all-masked row so far)
            const float alpha = __expf(m_run[r] - m_use);          // 0 on the first tile (m_run = -inf)
            float sum = 0.0f;
#pragma unroll
            for (int c = 0; c < BK / 32; c++) {
                const int j = k0 + lane + 32 * c;
                const float p = j < N ? __expf(s[c] - m_use) : 0.0f;  // padded keys: exactly 0
                sum += p;
                sP[r * LDP + lane + 32 * c] = __float2bfloat16(p);
            }
            sum = warp_sum(sum);
            l_run[r] = l_run[r] * alpha + sum;
            m_run[r] = m_new;
#pragma unroll
            for (int c = lane; c < DH; c += 32) sO[r * LDO + c] *= alpha;
        }
        __syncwarp();

        // O_w (16, DH) += P_w (16, BK) V (BK, DH), accumulated through shared memory.
        FragA pa[BK / 16];
#pragma unroll
        for (int kk = 0; kk < BK / 16; kk++) wmma::load_matrix_sync(pa[kk], sP + kk * 16, LDP);
#pragma unroll
        for (int d = 0; d < DH / 16; d++) {
            FragC acc;
            wmma::load_matrix_sync(acc, sO + d * 16, LDO, wmma::mem_row_major);
#pragma unroll
            for (int kk = 0; kk < BK / 16; kk++) {
                FragBRow vb;
                wmma::load_matrix_sync(vb, sV + kk * 16 * LDB + d * 16, LDB);
                wmma::mma_sync(acc, pa[kk], vb, acc);
            }
            wmma::store_matrix_sync(sO + d * 16, acc, LDO, wmma::mem_row_major);
        }
    }
    __syncwarp();

    // Epilogue: O = O_acc / l; o_saved = O, out = rowscale * O (bf16); lse = m + log l. Valid rows only.
#pragma unroll
    for (int r = 0; r < 16; r++) {
        const int i = q0 + warp * 16 + r;
        if (i >= N) continue;
        const float inv = 1.0f / l_run[r];
        const float rs = rowscale ? rowscale[i] : 1.0f;
        const size_t off = ((size_t)ti.b * N + i) * D + ti.h * DH;
#pragma unroll
        for (int c = lane; c < DH; c += 32) {
            const float o = sO[r * LDO + c] * inv;
            o_saved[off + c] = __float2bfloat16(o);
            out[off + c] = __float2bfloat16(o * rs);
        }
        if (lane == 0) lse[((size_t)ti.b * H + ti.h) * N + i] = m_run[r] + logf(l_run[r]);
    }
}

// ------------------------------------------------------------------------------------------------ backward

// delta[(b*H + h)*N + i] = sum_e dO_ie O_ie with dO = rowscale_i * dout (fp32). One warp per row.
template <int DH>
__global__ void __launch_bounds__(256)
    fa_delta_kernel(float *__restrict__ delta, const bf16 *__restrict__ dout, const bf16 *__restrict__ o,
                    const float *__restrict__ rowscale, int B, int N, int H) {
    const long long row = (long long)blockIdx.x * 8 + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= (long long)B * H * N) return;
    const int i = (int)(row % N);
    const long long bh = row / N;
    const int h = (int)(bh % H), b = (int)(bh / H);
    const size_t off = ((size_t)b * N + i) * ((size_t)H * DH) + (size_t)h * DH;
    float s = 0.0f;
#pragma unroll
    for (int e = lane; e < DH; e += 32) s += __bfloat162float(dout[off + e]) * __bfloat162float(o[off + e]);
    s = warp_sum(s);
    if (lane == 0) delta[row] = s * (rowscale ? rowscale[i] : 1.0f);
}

template <int DH> struct BwdSmem {  // the same layout serves both backward kernels
    typedef Strides<DH> S;
    static constexpr size_t q = 0;                                                   // Q tile (BQ, DH)
    static constexpr size_t du = q + align128((size_t)BQ * S::LDB * sizeof(bf16));   // dO tile (BQ, DH), rowscaled
    static constexpr size_t k = du + align128((size_t)BQ * S::LDB * sizeof(bf16));   // K tile (BK, DH)
    static constexpr size_t v = k + align128((size_t)BK * S::LDB * sizeof(bf16));    // V tile (BK, DH)
    static constexpr size_t lse = v + align128((size_t)BK * S::LDB * sizeof(bf16));  // lse of the Q tile (BQ)
    static constexpr size_t delta = lse + align128((size_t)BQ * sizeof(float));      // Delta of the Q tile (BQ)
    static constexpr size_t s = delta + align128((size_t)BQ * sizeof(float));        // per warp fp32 (16, 64)
    static constexpr size_t dp = s + align128((size_t)NWARP * 16 * S::LDS * sizeof(float));   // per warp fp32
    static constexpr size_t p = dp + align128((size_t)NWARP * 16 * S::LDS * sizeof(float));   // per warp bf16
    static constexpr size_t ds = p + align128((size_t)NWARP * 16 * S::LDP * sizeof(bf16));    // per warp bf16
    static constexpr size_t bytes = ds + align128((size_t)NWARP * 16 * S::LDP * sizeof(bf16));
};

// Loads the query-side tile q0 of (b, h): Q, dO * rowscale, lse and Delta (0 for padded rows).
template <int DH>
__device__ __forceinline__ void load_query_side(unsigned char *smem, const bf16 *qbase, size_t D3,
                                                const bf16 *dobase, size_t D, const float *lse_bh,
                                                const float *delta_bh, const float *rowscale, int q0, int N) {
    typedef BwdSmem<DH> SM;
    constexpr int LDB = Strides<DH>::LDB;
    load_rows<DH, LDB>(reinterpret_cast<bf16 *>(smem + SM::q), qbase, D3, q0, N, BQ, nullptr);
    load_rows<DH, LDB>(reinterpret_cast<bf16 *>(smem + SM::du), dobase, D, q0, N, BQ, rowscale);
    float *sL = reinterpret_cast<float *>(smem + SM::lse), *sD = reinterpret_cast<float *>(smem + SM::delta);
    for (int c = threadIdx.x; c < BQ; c += NTHR) {
        const int i = q0 + c;
        sL[c] = i < N ? lse_bh[i] : 0.0f;
        sD[c] = i < N ? delta_bh[i] : 0.0f;
    }
}

// dK, dV for key tile k0 of (b, h): warp w owns keys k0 + 16w .. +15. Loops over all query tiles:
//   S^T (16, BQ) = K_w Q^T, dP^T = V_w dO^T, P^T = exp(S^T*scale + bias^T - lse), dS^T = P^T (dP^T - Delta) * scale,
//   dV_w += P^T dO, dK_w += dS^T Q   (fp32 fragments in registers across the loop).
template <int DH>
__global__ void __launch_bounds__(NTHR)
    fa_bwd_dkdv_kernel(bf16 *__restrict__ dqkv, const bf16 *__restrict__ dout, const bf16 *__restrict__ qkv,
                       const float *__restrict__ lse, const float *__restrict__ delta,
                       const float *__restrict__ bias, const float *__restrict__ rowscale, int N, int H,
                       float scale) {
    typedef Strides<DH> ST;
    typedef BwdSmem<DH> SM;
    constexpr int LDB = ST::LDB, LDS = ST::LDS, LDP = ST::LDP;
    extern __shared__ __align__(128) unsigned char smem[];
    const bf16 *sQ = reinterpret_cast<const bf16 *>(smem + SM::q);
    const bf16 *sU = reinterpret_cast<const bf16 *>(smem + SM::du);
    bf16 *sK = reinterpret_cast<bf16 *>(smem + SM::k);
    bf16 *sV = reinterpret_cast<bf16 *>(smem + SM::v);
    const float *sL = reinterpret_cast<const float *>(smem + SM::lse);
    const float *sD = reinterpret_cast<const float *>(smem + SM::delta);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float *sS = reinterpret_cast<float *>(smem + SM::s) + warp * 16 * LDS;   // S^T rows (16 keys, BQ queries)
    float *sdP = reinterpret_cast<float *>(smem + SM::dp) + warp * 16 * LDS; // dP^T rows
    bf16 *sP = reinterpret_cast<bf16 *>(smem + SM::p) + warp * 16 * LDP;     // P^T rows, bf16
    bf16 *sdS = reinterpret_cast<bf16 *>(smem + SM::ds) + warp * 16 * LDP;   // dS^T rows, bf16

    const int D = H * DH;
    const size_t D3 = 3 * (size_t)D;
    const TileIdx ti = tile_index(H, (N + BK - 1) / BK);
    const int k0 = ti.t * BK;
    const bf16 *base = qkv + (size_t)ti.b * N * D3 + ti.h * DH;
    const bf16 *dobase = dout + (size_t)ti.b * N * D + ti.h * DH;
    const float *lse_bh = lse + ((size_t)ti.b * H + ti.h) * N;
    const float *delta_bh = delta + ((size_t)ti.b * H + ti.h) * N;

    load_rows<DH, LDB>(sK, base + D, D3, k0, N, BK, nullptr);
    load_rows<DH, LDB>(sV, base + 2 * D, D3, k0, N, BK, nullptr);
    __syncthreads();
    FragA kf[DH / 16], vf[DH / 16];  // this warp's 16 keys as A operands
#pragma unroll
    for (int kk = 0; kk < DH / 16; kk++) {
        wmma::load_matrix_sync(kf[kk], sK + warp * 16 * LDB + kk * 16, LDB);
        wmma::load_matrix_sync(vf[kk], sV + warp * 16 * LDB + kk * 16, LDB);
    }
    FragC dk[DH / 16], dv[DH / 16];
#pragma unroll
    for (int d = 0; d < DH / 16; d++) wmma::fill_fragment(dk[d], 0.0f), wmma::fill_fragment(dv[d], 0.0f);

    // Elementwise mapping: lane -> key row r = lane & 15, query columns c = 2*c2 + (lane >> 4); for a fixed c2 the
    // 16 lanes of a half-warp read 16 consecutive bias entries bias[i*N + k0 + 16w + r].
    const int er = lane & 15, ec = lane >> 4;
    const int j = k0 + warp * 16 + er;  // this lane's key

    for (int q0 = 0; q0 < N; q0 += BQ) {
        __syncthreads();  // every warp is done with the previous query-side tile
        load_query_side<DH>(smem, base, D3, dobase, D, lse_bh, delta_bh, rowscale, q0, N);
        __syncthreads();

#pragma unroll
        for (int n = 0; n < BQ / 16; n++) {
            FragC acc;
            wmma::fill_fragment(acc, 0.0f);
#pragma unroll
            for (int kk = 0; kk < DH / 16; kk++) {
                FragBCol qb;  // Q^T
                wmma::load_matrix_sync(qb, sQ + n * 16 * LDB + kk * 16, LDB);
                wmma::mma_sync(acc, kf[kk], qb, acc);
            }
            wmma::store_matrix_sync(sS + n * 16, acc, LDS, wmma::mem_row_major);
            wmma::fill_fragment(acc, 0.0f);
#pragma unroll
            for (int kk = 0; kk < DH / 16; kk++) {
                FragBCol ub;  // dO^T
                wmma::load_matrix_sync(ub, sU + n * 16 * LDB + kk * 16, LDB);
                wmma::mma_sync(acc, vf[kk], ub, acc);
            }
            wmma::store_matrix_sync(sdP + n * 16, acc, LDS, wmma::mem_row_major);
        }
        __syncwarp();

#pragma unroll 4
        for (int c2 = 0; c2 < BQ / 2; c2++) {
            const int c = 2 * c2 + ec, i = q0 + c;
            float p = 0.0f, ds = 0.0f;
            if (i < N && j < N) {
                float s = sS[er * LDS + c] * scale;
                if (bias) s += bias[(size_t)i * N + j];
                p = __expf(s - sL[c]);
                ds = p * (sdP[er * LDS + c] - sD[c]) * scale;
            }
            sP[er * LDP + c] = __float2bfloat16(p);
            sdS[er * LDP + c] = __float2bfloat16(ds);
        }
        __syncwarp();

#pragma unroll
        for (int kk = 0; kk < BQ / 16; kk++) {
            FragA pa, dsa;
            wmma::load_matrix_sync(pa, sP + kk * 16, LDP);
            wmma::load_matrix_sync(dsa, sdS + kk * 16, LDP);
#pragma unroll
            for (int d = 0; d < DH / 16; d++) {
                FragBRow ub, qb;
                wmma::load_matrix_sync(ub, sU + kk * 16 * LDB + d * 16, LDB);
                wmma::mma_sync(dv[d], pa, ub, dv[d]);
                wmma::load_matrix_sync(qb, sQ + kk * 16 * LDB + d * 16, LDB);
                wmma::mma_sync(dk[d], dsa, qb, dk[d]);
            }
        }
    }

    // Epilogue: through this warp's fp32 scratch (last read by lanes before the __syncwarp above), valid keys only.
#pragma unroll
    for (int d = 0; d < DH / 16; d++) {
        wmma::store_matrix_sync(sS + d * 16, dk[d], LDS, wmma::mem_row_major);
        wmma::store_matrix_sync(sdP + d * 16, dv[d], LDS, wmma::mem_row_major);
    }
    __syncwarp();
    for (int r = 0; r < 16; r++) {
        const int jj = k0 + warp * 16 + r;
        if (jj >= N) break;
        bf16 *row = dqkv + ((size_t)ti.b * N + jj) * D3 + ti.h * DH;
#pragma unroll
        for (int e = lane; e < DH; e += 32) {
            row[D + e] = __float2bfloat16(sS[r * LDS + e]);
            row[2 * D + e] = __float2bfloat16(sdP[r * LDS + e]);
        }
    }
}

// dQ for query tile q0 of (b, h): warp w owns queries q0 + 16w .. +15. Loops over all key tiles:
//   S = Q_w K^T, dP = dO_w V^T, P = exp(S*scale + bias - lse), dS = P (dP - Delta) * scale, dQ_w += dS K.
template <int DH>
__global__ void __launch_bounds__(NTHR)
    fa_bwd_dq_kernel(bf16 *__restrict__ dqkv, const bf16 *__restrict__ dout, const bf16 *__restrict__ qkv,
                     const float *__restrict__ lse, const float *__restrict__ delta, const float *__restrict__ bias,
                     const float *__restrict__ rowscale, int N, int H, float scale) {
    typedef Strides<DH> ST;
    typedef BwdSmem<DH> SM;
    constexpr int LDB = ST::LDB, LDS = ST::LDS, LDP = ST::LDP;
    extern __shared__ __align__(128) unsigned char smem[];
    const bf16 *sQ = reinterpret_cast<const bf16 *>(smem + SM::q);
    const bf16 *sU = reinterpret_cast<const bf16 *>(smem + SM::du);
    bf16 *sK = reinterpret_cast<bf16 *>(smem + SM::k);
    bf16 *sV = reinterpret_cast<bf16 *>(smem + SM::v);
    const float *sL = reinterpret_cast<const float *>(smem + SM::lse);
    const float *sD = reinterpret_cast<const float *>(smem + SM::delta);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float *sS = reinterpret_cast<float *>(smem + SM::s) + warp * 16 * LDS;   // S rows (16 queries, BK keys)
    float *sdP = reinterpret_cast<float *>(smem + SM::dp) + warp * 16 * LDS; // dP rows
    bf16 *sdS = reinterpret_cast<bf16 *>(smem + SM::ds) + warp * 16 * LDP;   // dS rows, bf16

    const int D = H * DH;
    const size_t D3 = 3 * (size_t)D;
    const TileIdx ti = tile_index(H, (N + BQ - 1) / BQ);
    const int q0 = ti.t * BQ;
    const bf16 *base = qkv + (size_t)ti.b * N * D3 + ti.h * DH;
    const bf16 *dobase = dout + (size_t)ti.b * N * D + ti.h * DH;
    const float *lse_bh = lse + ((size_t)ti.b * H + ti.h) * N;
    const float *delta_bh = delta + ((size_t)ti.b * H + ti.h) * N;

    load_query_side<DH>(smem, base, D3, dobase, D, lse_bh, delta_bh, rowscale, q0, N);
    __syncthreads();
    FragA qf[DH / 16], uf[DH / 16];  // this warp's 16 queries (Q and rowscaled dO) as A operands
#pragma unroll
    for (int kk = 0; kk < DH / 16; kk++) {
        wmma::load_matrix_sync(qf[kk], sQ + warp * 16 * LDB + kk * 16, LDB);
        wmma::load_matrix_sync(uf[kk], sU + warp * 16 * LDB + kk * 16, LDB);
    }
    FragC dq[DH / 16];
#pragma unroll
    for (int d = 0; d < DH / 16; d++) wmma::fill_fragment(dq[d], 0.0f);

    for (int k0 = 0; k0 < N; k0 += BK) {
        __syncthreads();  // every warp is done with the previous K, V tile
        load_rows<DH, LDB>(sK, base + D, D3, k0, N, BK, nullptr);
        load_rows<DH, LDB>(sV, base + 2 * D, D3, k0, N, BK, nullptr);
        __syncthreads();

#pragma unroll
        for (int n = 0; n < BK / 16; n++) {
            FragC acc;
            wmma::fill_fragment(acc, 0.0f);
#pragma unroll
            for (int kk = 0; kk < DH / 16; kk++) {
                FragBCol kb;  // K^T
                wmma::load_matrix_sync(kb, sK + n * 16 * LDB + kk * 16, LDB);
                wmma::mma_sync(acc, qf[kk], kb, acc);
            }
            wmma::store_matrix_sync(sS + n * 16, acc, LDS, wmma::mem_row_major);
            wmma::fill_fragment(acc, 0.0f);
#pragma unroll
            for (int kk = 0; kk < DH / 16; kk++) {
                FragBCol vb;  // V^T
                wmma::load_matrix_sync(vb, sV + n * 16 * LDB + kk * 16, LDB);
                wmma::mma_sync(acc, uf[kk], vb, acc);
            }
            wmma::store_matrix_sync(sdP + n * 16, acc, LDS, wmma::mem_row_major);
        }
        __syncwarp();

        // Lanes over keys (coalesced bias rows), one query row at a time.
#pragma unroll 4
        for (int r = 0; r < 16; r++) {
            const int i = q0 + warp * 16 + r;
            const float l = sL[warp * 16 + r], dl = sD[warp * 16 + r];
#pragma unroll
            for (int c = lane; c < BK; c += 32) {
                const int j = k0 + c;
                float ds = 0.0f;
                if (i < N && j < N) {
                    float s = sS[r * LDS + c] * scale;
                    if (bias) s += bias[(size_t)i * N + j];
                    const float p = __expf(s - l);
                    ds = p * (sdP[r * LDS + c] - dl) * scale;
                }
                sdS[r * LDP + c] = __float2bfloat16(ds);
            }
        }
        __syncwarp();

#pragma unroll
        for (int kk = 0; kk < BK / 16; kk++) {
            FragA dsa;
            wmma::load_matrix_sync(dsa, sdS + kk * 16, LDP);
#pragma unroll
            for (int d = 0; d < DH / 16; d++) {
                FragBRow kb;  // K (BK, DH) row-major
                wmma::load_matrix_sync(kb, sK + kk * 16 * LDB + d * 16, LDB);
                wmma::mma_sync(dq[d], dsa, kb, dq[d]);
            }
        }
    }

#pragma unroll
    for (int d = 0; d < DH / 16; d++) wmma::store_matrix_sync(sS + d * 16, dq[d], LDS, wmma::mem_row_major);
    __syncwarp();
    for (int r = 0; r < 16; r++) {
        const int i = q0 + warp * 16 + r;
        if (i >= N) break;
        bf16 *row = dqkv + ((size_t)ti.b * N + i) * D3 + ti.h * DH;
#pragma unroll
        for (int e = lane; e < DH; e += 32) row[e] = __float2bfloat16(sS[r * LDS + e]);
    }
}

// ------------------------------------------------------------------------------------------------ host side

void fa_check(const char *what) {
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) {
        fprintf(stderr, "flash_attn: %s: %s\n", what, cudaGetErrorString(e));
        exit(1);
    }
}

void fa_fail(const char *what, const char *why) {
    fprintf(stderr, "flash_attn: %s: %s\n", what, why);
    exit(1);
}

template <typename K> void fa_set_smem(K kernel, size_t bytes, const char *what) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
    if (e != cudaSuccess) {
        fprintf(stderr, "flash_attn: %s: cudaFuncSetAttribute(%zu bytes): %s\n", what, bytes, cudaGetErrorString(e));
        exit(1);
    }
}

unsigned fa_grid(int B, int H, int N, int tile, const char *what) {
    long long n = (long long)B * H * ((N + tile - 1) / tile);
    if (n <= 0 || n > 0x7fffffffLL) fa_fail(what, "grid size out of range");
    return (unsigned)n;
}

template <int DH>
void fwd_impl(bf16 *out, float *lse, bf16 *o_saved, const bf16 *qkv, const float *bias, const float *rowscale, int B,
              int N, int H, cudaStream_t st) {
    const size_t smem = FwdSmem<DH>::bytes;
    fa_set_smem(fa_fwd_kernel<DH>, smem, "fa_fwd_kernel");
    fa_fwd_kernel<DH><<<fa_grid(B, H, N, BQ, "fa_fwd_kernel"), NTHR, smem, st>>>(
        out, lse, o_saved, qkv, bias, rowscale, N, H, 1.0f / sqrtf((float)DH));
    fa_check("fa_fwd_kernel");
}

template <int DH>
void bwd_impl(bf16 *dqkv, const bf16 *dout, const bf16 *qkv, const bf16 *o_saved, const float *lse,
              const float *bias, const float *rowscale, int B, int N, int H, float *delta, cudaStream_t st) {
    const float scale = 1.0f / sqrtf((float)DH);
    const long long rows = (long long)B * H * N;
    if ((rows + 7) / 8 > 0x7fffffffLL) fa_fail("fa_delta_kernel", "grid size out of range");
    fa_delta_kernel<DH><<<(unsigned)((rows + 7) / 8), 256, 0, st>>>(delta, dout, o_saved, rowscale, B, N, H);
    fa_check("fa_delta_kernel");

    const size_t smem = BwdSmem<DH>::bytes;
    fa_set_smem(fa_bwd_dkdv_kernel<DH>, smem, "fa_bwd_dkdv_kernel");
    fa_bwd_dkdv_kernel<DH><<<fa_grid(B, H, N, BK, "fa_bwd_dkdv_kernel"), NTHR, smem, st>>>(
        dqkv, dout, qkv, lse, delta, bias, rowscale, N, H, scale);
    fa_check("fa_bwd_dkdv_kernel");

    fa_set_smem(fa_bwd_dq_kernel<DH>, smem, "fa_bwd_dq_kernel");
    fa_bwd_dq_kernel<DH><<<fa_grid(B, H, N, BQ, "fa_bwd_dq_kernel"), NTHR, smem, st>>>(
        dqkv, dout, qkv, lse, delta, bias, rowscale, N, H, scale);
    fa_check("fa_bwd_dq_kernel");
}

}  // namespace

int flash_attn_supported(int N, int dh) { return N >= 1 && (dh == 32 || dh == 64); }

size_t flash_attn_bwd_workspace(int B, int N, int H, int dh) {
    (void)dh;
    return align128((size_t)B * H * N * sizeof(float));  // Delta (B, H, N) fp32
}

void flash_attn_fwd(__nv_bfloat16 *out, float *lse, __nv_bfloat16 *o_saved, const __nv_bfloat16 *qkv,
                    const float *bias, const float *rowscale, int B, int N, int H, int dh, cudaStream_t st) {
    if (B <= 0 || H <= 0 || !flash_attn_supported(N, dh)) fa_fail("flash_attn_fwd", "unsupported sizes");
    if (dh == 32)
        fwd_impl<32>(out, lse, o_saved, qkv, bias, rowscale, B, N, H, st);
    else
        fwd_impl<64>(out, lse, o_saved, qkv, bias, rowscale, B, N, H, st);
}

void flash_attn_bwd(__nv_bfloat16 *dqkv, const __nv_bfloat16 *dout, const __nv_bfloat16 *qkv,
                    const __nv_bfloat16 *o_saved, const float *lse, const float *bias, const float *rowscale,
                    int B, int N, int H, int dh, void *workspace, cudaStream_t st) {
    if (B <= 0 || H <= 0 || !flash_attn_supported(N, dh)) fa_fail("flash_attn_bwd", "unsupported sizes");
    if (!workspace) fa_fail("flash_attn_bwd", "workspace is NULL (see flash_attn_bwd_workspace)");
    float *delta = static_cast<float *>(workspace);
    if (dh == 32)
        bwd_impl<32>(dqkv, dout, qkv, o_saved, lse, bias, rowscale, B, N, H, delta, st);
    else
        bwd_impl<64>(dqkv, dout, qkv, o_saved, lse, bias, rowscale, B, N, H, delta, st);
}
