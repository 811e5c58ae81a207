// backend_cpu.c: the reference backend. fp32 everywhere, OpenBLAS sgemm for the linear layers, OpenMP loops for
// the rest. Every reduction runs over fixed-size chunks combined in a fixed order, so the bits do not depend on
// the thread count or on scheduling.
#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "backend.h"
#include "data/augment.h"
#include "mathf.h"
#include "rng.h"
#include "util.h"

#define CHUNK_ROWS 64  // rows per partial sum in column reductions

typedef struct {
    int threads;
    int deterministic;  // fixed GEMM chunks: the same bits at any thread count
} CpuImpl;

// ---------------------------------------------------------------- memory

static void *cpu_alloc(Backend *be, size_t bytes, const char *what) {
    void *p = NULL;
    size_t rounded = (bytes + 63) & ~(size_t)63;
    if (posix_memalign(&p, 64, rounded ? rounded : 64) != 0)
        die_user("out of memory: %s needs %.1f MiB (lower train.batch_size or raise train.grad_accum)", what,
                 (double)bytes / (1 << 20));
    memset(p, 0, rounded);
    return p;
}

static void cpu_free(Backend *be, void *p) { free(p); }
static void cpu_upload(Backend *be, void *dst, const void *src, size_t n) { memcpy(dst, src, n); }
static void cpu_download(Backend *be, void *dst, const void *src, size_t n) { memcpy(dst, src, n); }
static void cpu_zero(Backend *be, void *p, size_t n) { memset(p, 0, n); }
static void cpu_copy(Backend *be, void *dst, const void *src, size_t n) { memmove(dst, src, n); }
static void cpu_sync(Backend *be) {}
static void cpu_mem_info(Backend *be, size_t *free_b, size_t *total_b) {
    long pg = sysconf(_SC_PAGESIZE);
    *free_b = (size_t)sysconf(_SC_AVPHYS_PAGES) * (size_t)pg;
    *total_b = (size_t)sysconf(_SC_PHYS_PAGES) * (size_t)pg;
}
static void cpu_upload_async(Backend *be, void *dst, const void *src, size_t n, int slot) { memcpy(dst, src, n); }
static void cpu_input_slot(Backend *be, int slot) {}
static void cpu_download_act(Backend *be, float *dst, const void *src, size_t n) { memcpy(dst, src, n * 4); }
static void cpu_set_params(Backend *be, float *params, size_t n) {}
static void cpu_params_changed(Backend *be, float *params, size_t n) {}

// ---------------------------------------------------------------- linear algebra

static void cpu_patch_unfold(Backend *be, void *patches_, const float *img, int B, int C, int H, int W, int p) {
    float *patches = patches_;  // (B*N, C*p*p)
    int h = H / p, w = W / p, N = h * w, K = C * p * p;
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++)
        for (int n = 0; n < N; n++) {
            int r = n / w, c = n % w;
            float *dst = patches + ((size_t)b * N + n) * K;
            for (int ch = 0; ch < C; ch++)
                for (int ky = 0; ky < p; ky++) {
                    const float *src = img + (((size_t)b * C + ch) * H + (size_t)r * p + ky) * W + (size_t)c * p;
                    memcpy(dst + (ch * p + ky) * p, src, (size_t)p * sizeof(float));
                }
        }
}

#define GEMM_CHUNK_ROWS 256  // deterministic mode: every GEMM call (and its bits) is the same at any thread count

// C (M, N) = alpha op(A) op(B) + beta C, row-major, split over rows of C across the OpenMP threads; OpenBLAS runs
// single-threaded inside each, so there is one thread pool (OpenMP) for everything. By default each thread takes
// one equal share (fastest). OpenBLAS's kernels may round a row differently depending on where it falls in a call,
// so deterministic mode splits into fixed chunks that do not depend on the thread count instead.
static void par_sgemm(const Backend *be, int transA, int transB, int M, int N, int K, float alpha, const float *A,
                      int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    const CpuImpl *impl = be->impl;
    int chunk;
    if (impl->deterministic) {
        chunk = GEMM_CHUNK_ROWS;
    } else {
        int nt = omp_get_max_threads();
        chunk = (M + nt - 1) / nt;
        chunk = (chunk + 15) & ~15;
    }
#pragma omp parallel for schedule(static)
    for (int m0 = 0; m0 < M; m0 += chunk) {
        int rows = M - m0 < chunk ? M - m0 : chunk;
        const float *Am = transA ? A + m0 : A + (size_t)m0 * lda;
        cblas_sgemm(CblasRowMajor, transA ? CblasTrans : CblasNoTrans, transB ? CblasTrans : CblasNoTrans, rows, N,
                    K, alpha, Am, lda, B, ldb, beta, C + (size_t)m0 * ldc, ldc);
    }
}

static void cpu_set_deterministic(Backend *be, int on) { ((CpuImpl *)be->impl)->deterministic = on; }

static void cpu_matmul_fwd(Backend *be, void *out_, const void *inp, const float *W, const float *bias, int R, int Din,
                           int Dout) {
    float *out = out_;  // (R, Dout)
    float beta = 0.0f;
    if (bias) {
#pragma omp parallel for schedule(static)
        for (int r = 0; r < R; r++) memcpy(out + (size_t)r * Dout, bias, (size_t)Dout * sizeof(float));
        beta = 1.0f;
    }
    par_sgemm(be, 0, 1, R, Dout, Din, 1.0f, inp, Din, W, Din, beta, out, Dout);
}

// acc (cols) += sum over rows of x (rows, cols): fp32 within fixed chunks of rows, fp64 across chunks, in order.
static void colsum_acc(float *acc, const float *x, int rows, int cols) {
    int nchunks = (rows + CHUNK_ROWS - 1) / CHUNK_ROWS;
    float *part = xmalloc((size_t)nchunks * cols * sizeof(float), "column partial sums");  // (nchunks, cols)
#pragma omp parallel for schedule(static)
    for (int c = 0; c < nchunks; c++) {
        float *pc = part + (size_t)c * cols;
        memset(pc, 0, (size_t)cols * sizeof(float));
        int r1 = (c + 1) * CHUNK_ROWS < rows ? (c + 1) * CHUNK_ROWS : rows;
        for (int r = c * CHUNK_ROWS; r < r1; r++) {
            const float *xr = x + (size_t)r * cols;
#pragma omp simd
            for (int j = 0; j < cols; j++) pc[j] += xr[j];
        }
    }
    for (int j = 0; j < cols; j++) {
        double s = 0.0;
        for (int c = 0; c < nchunks; c++) s += part[(size_t)c * cols + j];
        acc[j] += (float)s;
    }
    free(part);
}

static void cpu_matmul_bwd(Backend *be, void *dinp, float *dW, float *dbias, const void *dout, const void *inp,
                           const float *W, int R, int Din, int Dout) {
    if (dinp) par_sgemm(be, 0, 0, R, Din, Dout, 1.0f, dout, Dout, W, Din, 0.0f, dinp, Din);
    par_sgemm(be, 1, 0, Dout, Din, R, 1.0f, dout, Dout, inp, Din, 1.0f, dW, Din);
    if (dbias) colsum_acc(dbias, dout, R, Dout);
}

// ---------------------------------------------------------------- elementwise

static void cpu_add_posemb(Backend *be, void *x_, const float *pe, int B, int N, int D) {
    float *x = x_;
#pragma omp parallel for schedule(static)
    for (int b = 0; b < B; b++) {
        float *xb = x + (size_t)b * N * D;
#pragma omp simd
        for (size_t i = 0; i < (size_t)N * D; i++) xb[i] += pe[i];
    }
}

static void cpu_add(Backend *be, void *out_, const void *a_, const void *b_, size_t n) {
    float *out = out_;
    const float *a = a_, *b = b_;
#pragma omp parallel for simd schedule(static)
    for (size_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

static void cpu_trelu_fwd(Backend *be, void *y_, const void *x_, size_t n, float s, float a) {
    float *y = y_;
    const float *x = x_;
    float sn = s * a;
#pragma omp parallel for simd schedule(static)
    for (size_t i = 0; i < n; i++) y[i] = x[i] > 0.0f ? s * x[i] : sn * x[i];
}

static void cpu_trelu_bwd(Backend *be, void *dx_, const void *dy_, const void *y_, size_t n, float s, float a) {
    float *dx = dx_;
    const float *dy = dy_, *y = y_;
    float sn = s * a;
#pragma omp parallel for simd schedule(static)
    for (size_t i = 0; i < n; i++) dx[i] = dy[i] * (y[i] > 0.0f ? s : sn);
}

static void cpu_gelu_fwd(Backend *be, void *y_, const void *x_, size_t n) {
    float *y = y_;
    const float *x = x_;
#pragma omp parallel for simd schedule(static)
    for (size_t i = 0; i < n; i++) y[i] = 0.5f * x[i] * (1.0f + verff(x[i] * (float)M_SQRT1_2));
}

static void cpu_gelu_bwd(Backend *be, void *dx_, const void *dy_, const void *x_, size_t n) {
    float *dx = dx_;
    const float *dy = dy_, *x = x_;
    const float inv_sqrt_2pi = 0.3989422804014327f;
#pragma omp parallel for simd schedule(static)
    for (size_t i = 0; i < n; i++) {
        float xi = x[i];
        float cdf = 0.5f * (1.0f + verff(xi * (float)M_SQRT1_2));
        float pdf = inv_sqrt_2pi * vexpf(-0.5f * xi * xi);
        dx[i] = dy[i] * (cdf + xi * pdf);
    }
}

static void cpu_layernorm_fwd(Backend *be, void *y_, float *mean, float *rstd, const void *x_, const float *gamma,
                              const float *beta, int R, int D, float eps) {
    float *y = y_;
    const float *x = x_;
#pragma omp parallel for schedule(static)
    for (int r = 0; r < R; r++) {
        const float *xr = x + (size_t)r * D;
        float *yr = y + (size_t)r * D;
        float m = 0.0f, var = 0.0f;
#pragma omp simd reduction(+ : m)
        for (int i = 0; i < D; i++) m += xr[i];
        m /= (float)D;
#pragma omp simd reduction(+ : var)
        for (int i = 0; i < D; i++) var += (xr[i] - m) * (xr[i] - m);
        var /= (float)D;
        float rs = 1.0f / sqrtf(var + eps);
#pragma omp simd
        for (int i = 0; i < D; i++) yr[i] = (xr[i] - m) * rs * gamma[i] + beta[i];
        mean[r] = m;
        rstd[r] = rs;
    }
}

static void cpu_layernorm_bwd(Backend *be, void *dx_, float *dgamma, float *dbeta, const void *dy_, const void *x_,
                              const float *mean, const float *rstd, const float *gamma, int R, int D) {
    float *dx = dx_;
    const float *dy = dy_, *x = x_;
    int nchunks = (R + CHUNK_ROWS - 1) / CHUNK_ROWS;
    float *part = xmalloc((size_t)nchunks * 2 * D * sizeof(float), "layernorm partial sums");
#pragma omp parallel for schedule(static)
    for (int c = 0; c < nchunks; c++) {
        float *pg = part + (size_t)c * 2 * D, *pb = pg + D;
        memset(pg, 0, 2 * (size_t)D * sizeof(float));
        int r1 = (c + 1) * CHUNK_ROWS < R ? (c + 1) * CHUNK_ROWS : R;
        for (int r = c * CHUNK_ROWS; r < r1; r++) {
            const float *xr = x + (size_t)r * D, *dyr = dy + (size_t)r * D;
            float *dxr = dx + (size_t)r * D;
            float m = mean[r], rs = rstd[r];
            float sum_dn = 0.0f, sum_dn_xh = 0.0f;  // sums of dnorm and dnorm * xhat over the row
#pragma omp simd reduction(+ : sum_dn, sum_dn_xh)
            for (int i = 0; i < D; i++) {
                float xh = (xr[i] - m) * rs;
                float dn = dyr[i] * gamma[i];
                sum_dn += dn;
                sum_dn_xh += dn * xh;
                pg[i] += dyr[i] * xh;
                pb[i] += dyr[i];
            }
            sum_dn /= (float)D;
            sum_dn_xh /= (float)D;
#pragma omp simd
            for (int i = 0; i < D; i++) {
                float xh = (xr[i] - m) * rs;
                dxr[i] += (dyr[i] * gamma[i] - sum_dn - xh * sum_dn_xh) * rs;
            }
        }
    }
    for (int i = 0; i < D; i++) {
        double sg = 0.0, sb = 0.0;
        for (int c = 0; c < nchunks; c++) {
            sg += part[(size_t)c * 2 * D + i];
            sb += part[(size_t)c * 2 * D + D + i];
        }
        dgamma[i] += (float)sg;
        dbeta[i] += (float)sb;
    }
    free(part);
}

// ---------------------------------------------------------------- attention

static size_t cpu_attn_saved_elems(Backend *be, int B, int N, int H, int dh) { return (size_t)B * H * N * N; }

// Per (image, head): S = Q K^T / sqrt(dh) + bias, P = softmax_rows(S), O = diag(rowscale) P V, as small GEMMs on
// strided views of qkv (row stride 3D). Heads run in parallel; each GEMM is single-threaded.
static void cpu_attention_fwd(Backend *be, void *out_, float *probs, const void *qkv_, const float *bias,
                              const float *rowscale, int B, int N, int H, int dh) {
    float *out = out_;  // (B, N, D)
    const float *qkv = qkv_;
    int D = H * dh, D3 = 3 * D;
    float scale = 1.0f / sqrtf((float)dh);
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            const float *Q = qkv + (size_t)b * N * D3 + h * dh, *K = Q + D, *V = Q + 2 * D;
            float *P = probs + ((size_t)b * H + h) * N * N;  // (N, N)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, N, dh, scale, Q, D3, K, D3, 0.0f, P, N);
            for (int i = 0; i < N; i++) {
                float *Pi = P + (size_t)i * N, mx = -INFINITY, sum = 0.0f;
                if (bias) {
                    const float *Bi = bias + (size_t)i * N;
#pragma omp simd
                    for (int j = 0; j < N; j++) Pi[j] += Bi[j];
                }
#pragma omp simd reduction(max : mx)
                for (int j = 0; j < N; j++) mx = Pi[j] > mx ? Pi[j] : mx;
#pragma omp simd reduction(+ : sum)
                for (int j = 0; j < N; j++) {
                    Pi[j] = vexpf(Pi[j] - mx);
                    sum += Pi[j];
                }
                float inv = 1.0f / sum;
#pragma omp simd
                for (int j = 0; j < N; j++) Pi[j] *= inv;
            }
            float *O = out + (size_t)b * N * D + h * dh;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, dh, N, 1.0f, P, N, V, D3, 0.0f, O, D);
            if (rowscale)
                for (int i = 0; i < N; i++)
                    for (int e = 0; e < dh; e++) O[(size_t)i * D + e] *= rowscale[i];
        }
}

static void cpu_attention_bwd(Backend *be, void *dqkv_, const void *dout_, const void *qkv_, const float *probs,
                              const float *bias, const float *rowscale, int B, int N, int H, int dh) {
    float *dqkv = dqkv_;
    const float *dout = dout_, *qkv = qkv_;
    int D = H * dh, D3 = 3 * D;
    float scale = 1.0f / sqrtf((float)dh);
    int nt = omp_get_max_threads();
    size_t per = (size_t)N * dh + (size_t)N * N;
    float *scratch = xmalloc((size_t)nt * per * sizeof(float), "attention backward scratch");  // (threads, per)
#pragma omp parallel
    {
        float *dU = scratch + (size_t)omp_get_thread_num() * per;  // (N, dh) rowscale * dout
        float *dS = dU + (size_t)N * dh;                             // (N, N)
#pragma omp for collapse(2) schedule(static)
        for (int b = 0; b < B; b++)
            for (int h = 0; h < H; h++) {
                const float *Q = qkv + (size_t)b * N * D3 + h * dh, *K = Q + D, *V = Q + 2 * D;
                float *dQ = dqkv + (size_t)b * N * D3 + h * dh, *dK = dQ + D, *dV = dQ + 2 * D;
                const float *P = probs + ((size_t)b * H + h) * N * N;
                const float *dO = dout + (size_t)b * N * D + h * dh;
                for (int i = 0; i < N; i++) {
                    float rsc = rowscale ? rowscale[i] : 1.0f;
                    for (int e = 0; e < dh; e++) dU[(size_t)i * dh + e] = rsc * dO[(size_t)i * D + e];
                }
                // dP = dU V^T; dS = P * (dP - rowsum(P * dP)) / sqrt(dh)
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, N, dh, 1.0f, dU, dh, V, D3, 0.0f, dS, N);
                for (int i = 0; i < N; i++) {
                    const float *Pi = P + (size_t)i * N;
                    float *dSi = dS + (size_t)i * N, rowdot = 0.0f;
#pragma omp simd reduction(+ : rowdot)
                    for (int j = 0; j < N; j++) rowdot += Pi[j] * dSi[j];
#pragma omp simd
                    for (int j = 0; j < N; j++) dSi[j] = Pi[j] * (dSi[j] - rowdot) * scale;
                }
                cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, N, dh, N, 1.0f, P, N, dU, dh, 0.0f, dV, D3);
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, dh, N, 1.0f, dS, N, K, D3, 0.0f, dQ, D3);
                cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, N, dh, N, 1.0f, dS, N, Q, D3, 0.0f, dK, D3);
            }
    }
    free(scratch);
}

// ---------------------------------------------------------------- dropout, pooling, loss

static void dropout_apply(void *y_, const void *x_, int B, size_t per_sample, float p, uint64_t seed, uint64_t step,
                          uint64_t first_pos) {
    float *y = y_;
    const float *x = x_;
    float keep_scale = 1.0f / (1.0f - p);
#pragma omp parallel for schedule(static)
    for (int b = 0; b < B; b++) {
        uint64_t key = rng_key(seed, RNG_DROPOUT, step, first_pos + (uint64_t)b);
        const float *xb = x + (size_t)b * per_sample;
        float *yb = y + (size_t)b * per_sample;
        for (size_t j = 0; j < per_sample; j++) yb[j] = rng_counter_uniform(key, j) >= p ? xb[j] * keep_scale : 0.0f;
    }
}

static void cpu_dropout_fwd(Backend *be, void *y, const void *x, int B, size_t per_sample, float p, uint64_t seed,
                            uint64_t step, uint64_t first_pos) {
    dropout_apply(y, x, B, per_sample, p, seed, step, first_pos);
}

static void cpu_dropout_bwd(Backend *be, void *dx, const void *dy, int B, size_t per_sample, float p, uint64_t seed,
                            uint64_t step, uint64_t first_pos) {
    dropout_apply(dx, dy, B, per_sample, p, seed, step, first_pos);  // the mask is linear: same op
}

static void cpu_meanpool_fwd(Backend *be, void *pooled_, const void *x_, int B, int N, int D) {
    float *pooled = pooled_;
    const float *x = x_;
#pragma omp parallel for schedule(static)
    for (int b = 0; b < B; b++) {
        float *pb = pooled + (size_t)b * D;
        memset(pb, 0, (size_t)D * sizeof(float));
        for (int n = 0; n < N; n++) {
            const float *xn = x + ((size_t)b * N + n) * D;
#pragma omp simd
            for (int d = 0; d < D; d++) pb[d] += xn[d];
        }
        for (int d = 0; d < D; d++) pb[d] /= (float)N;
    }
}

static void cpu_meanpool_bwd(Backend *be, void *dx_, const void *dpooled_, int B, int N, int D) {
    float *dx = dx_;
    const float *dpooled = dpooled_;
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++)
        for (int n = 0; n < N; n++) {
            float *dxn = dx + ((size_t)b * N + n) * D;
            const float *dp = dpooled + (size_t)b * D;
            for (int d = 0; d < D; d++) dxn[d] = dp[d] / (float)N;
        }
}

static void cpu_xent_fwd_bwd(Backend *be, float *losses, void *dlogits_, const void *logits_, const float *targets,
                             int B, int C, float smoothing, float grad_scale) {
    float *dlogits = dlogits_;
    const float *logits = logits_;
#pragma omp parallel for schedule(static)
    for (int b = 0; b < B; b++) {
        const float *z = logits + (size_t)b * C;
        const float *t = targets + (size_t)b * C;
        float mx = -INFINITY;
        for (int c = 0; c < C; c++) mx = z[c] > mx ? z[c] : mx;
        double sum = 0.0;
        for (int c = 0; c < C; c++) sum += exp((double)z[c] - mx);
        double lse = mx + log(sum);
        double loss = 0.0;
        for (int c = 0; c < C; c++) {
            double tc = (1.0 - smoothing) * t[c] + smoothing / C;
            loss -= tc * ((double)z[c] - lse);
            if (dlogits) dlogits[(size_t)b * C + c] = (float)(grad_scale * (exp((double)z[c] - lse) - tc));
        }
        losses[b] = (float)loss;
    }
}

// ---------------------------------------------------------------- optimizer

#define SUM_CHUNK 4096

static double cpu_sumsq(Backend *be, const float *x, size_t n) {
    size_t nchunks = (n + SUM_CHUNK - 1) / SUM_CHUNK;
    double *part = xmalloc(nchunks * sizeof(double), "sumsq partials");
#pragma omp parallel for schedule(static)
    for (size_t c = 0; c < nchunks; c++) {
        size_t i1 = (c + 1) * SUM_CHUNK < n ? (c + 1) * SUM_CHUNK : n;
        double s = 0.0;
        for (size_t i = c * SUM_CHUNK; i < i1; i++) s += (double)x[i] * x[i];
        part[c] = s;
    }
    double total = 0.0;
    for (size_t c = 0; c < nchunks; c++) total += part[c];
    free(part);
    return total;
}

static void cpu_adam_step(Backend *be, float *w, const float *g, float *m, float *v, size_t n, const AdamArgs *a) {
    float b1 = a->beta1, b2 = a->beta2, lr = a->lr, eps = a->eps, wd = a->weight_decay, gs = a->grad_scale;
    float bc1 = (float)(1.0 - pow(b1, (double)a->t)), bc2 = (float)(1.0 - pow(b2, (double)a->t));
    int decoupled = a->decoupled;
#pragma omp parallel for simd schedule(static)
    for (size_t i = 0; i < n; i++) {
        float gi = g[i] * gs;
        float wi = w[i];
        if (decoupled)
            wi *= 1.0f - lr * wd;
        else
            gi += wd * wi;
        float mi = b1 * m[i] + (1.0f - b1) * gi;
        float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        w[i] = wi - lr * (mi / bc1) / (sqrtf(vi / bc2) + eps);
    }
}

static void cpu_scale(Backend *be, float *x, size_t n, float s) {
#pragma omp parallel for simd schedule(static)
    for (size_t i = 0; i < n; i++) x[i] *= s;
}

static void cpu_axpy(Backend *be, float *y, const float *x, size_t n, float a) {
#pragma omp parallel for simd schedule(static)
    for (size_t i = 0; i < n; i++) y[i] += a * x[i];
}

static void cpu_gather_blocks(Backend *be, float *dst, const float *base, const int64_t *offs, const int *lds, int nb,
                              int rows, int cols) {
    size_t area = (size_t)rows * cols;
    for (int b = 0; b < nb; b++)
        for (int r = 0; r < rows; r++)
            memcpy(dst + b * area + (size_t)r * cols, base + offs[b] + (size_t)r * lds[b], (size_t)cols * sizeof(float));
}

static void cpu_graft_update_blocks(Backend *be, float *base, const int64_t *offs, const int *lds, const float *Pg,
                                    const float *Ps, int nb, int rows, int cols, double lr) {
    size_t area = (size_t)rows * cols;
    for (int b = 0; b < nb; b++) {
        const float *pg = Pg + b * area, *P = pg;
        float c = (float)lr;
        if (Ps) {
            P = Ps + b * area;
            double ng = sqrt(cpu_sumsq(be, pg, area)), ns = sqrt(cpu_sumsq(be, P, area));
            c = (float)(lr * ng / (ns + 1e-16));
        }
        float a = -c;  // exactly axpy's y += a x, element by element
        float *W = base + offs[b];
#pragma omp parallel for schedule(static) if (area > 65536)
        for (int r = 0; r < rows; r++) {
            float *w = W + (size_t)r * lds[b];
            const float *p = P + (size_t)r * cols;
            for (int j = 0; j < cols; j++) w[j] += a * p[j];
        }
    }
}

static void cpu_gemm(Backend *be, int transA, int transB, int M, int N, int K, float alpha, const float *A, int lda,
                     const float *B, int ldb, float beta, float *C, int ldc);
static void cpu_gemm_batched(Backend *be, int transA, int transB, int M, int N, int K, float alpha,
                             const float *const *A, int lda, const float *const *B, int ldb, float beta,
                             float *const *C, int ldc, int nb) {
    for (int b = 0; b < nb; b++) cpu_gemm(be, transA, transB, M, N, K, alpha, A[b], lda, B[b], ldb, beta, C[b], ldc);
}

static void cpu_images_from_u8(Backend *be, float *dst, const uint8_t *src, int B, int C, int H, int W,
                               const float *mean, const float *std) {
    size_t img = (size_t)C * H * W;
#pragma omp parallel for schedule(static)
    for (int b = 0; b < B; b++) normalize_u8_hwc(src + b * img, C, H, W, mean, std, dst + b * img);
}

static void cpu_ema_update(Backend *be, float *ema, const float *w, size_t n, float decay) {
#pragma omp parallel for simd schedule(static)
    for (size_t i = 0; i < n; i++) ema[i] = decay * ema[i] + (1.0f - decay) * w[i];
}

static void cpu_gemm(Backend *be, int transA, int transB, int M, int N, int K, float alpha, const float *A, int lda,
                     const float *B, int ldb, float beta, float *C, int ldc) {
    par_sgemm(be, transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

static void cpu_copy2d(Backend *be, float *dst, int ldd, const float *src, int lds, int rows, int cols) {
#pragma omp parallel for schedule(static) if (rows > 64)
    for (int r = 0; r < rows; r++) memcpy(dst + (size_t)r * ldd, src + (size_t)r * lds, (size_t)cols * sizeof(float));
}

static void cpu_moments(Backend *be, float *m, float *v, const float *g, size_t n, float b1, float b2) {
#pragma omp parallel for simd schedule(static)
    for (size_t i = 0; i < n; i++) {
        m[i] = b1 * m[i] + (1.0f - b1) * g[i];
        v[i] = b2 * v[i] + (1.0f - b2) * g[i] * g[i];
    }
}

static void cpu_adam_dir(Backend *be, float *out, const float *m, const float *v, size_t n, float bc1, float bc2,
                         float eps) {
#pragma omp parallel for simd schedule(static)
    for (size_t i = 0; i < n; i++) out[i] = (m[i] / bc1) / (sqrtf(v[i] / bc2) + eps);
}

// ---------------------------------------------------------------- diagnostics

static void cpu_signal_stats(Backend *be, const void *x_, int B, int N, int D, double *mean_sq, double *mean_cos) {
    const float *x = x_;
    double *sq = xmalloc((size_t)B * 2 * sizeof(double), "signal stats");          // (B, 2)
    double *usum = xcalloc((size_t)B * D * sizeof(double), "signal stats unit sums");  // (B, D)
#pragma omp parallel for schedule(static)
    for (int b = 0; b < B; b++) {
        double ssq = 0.0, *u = usum + (size_t)b * D;
        for (int n = 0; n < N; n++) {
            const float *xn = x + ((size_t)b * N + n) * D;
            double nn = 0.0;
            for (int d = 0; d < D; d++) nn += (double)xn[d] * xn[d];
            ssq += nn;
            double inv = nn > 0.0 ? 1.0 / sqrt(nn) : 0.0;
            for (int d = 0; d < D; d++) u[d] += xn[d] * inv;
        }
        double su = 0.0;
        for (int d = 0; d < D; d++) su += u[d] * u[d];
        sq[2 * b] = ssq / ((double)N * D);
        sq[2 * b + 1] = N > 1 ? (su - N) / ((double)N * (N - 1)) : 1.0;  // |sum of unit vectors|^2 = N + pair sum
    }
    double ms = 0.0, mc = 0.0;
    for (int b = 0; b < B; b++) {
        ms += sq[2 * b];
        mc += sq[2 * b + 1];
    }
    free(sq);
    free(usum);
    *mean_sq = ms / B;
    *mean_cos = mc / B;
}

static void cpu_destroy(Backend *be) {
    free(be->impl);
    free(be);
}

void backend_cpu_fix_blas_core(char **argv) {
    if (getenv("OPENBLAS_CORETYPE")) return;
    const char *core = openblas_get_corename();
    if (!core || (strcasecmp(core, "prescott") != 0 && strcasecmp(core, "core2") != 0)) return;
    const char *want = __builtin_cpu_supports("avx512f") ? "SkylakeX" : __builtin_cpu_supports("avx2") ? "Haswell" : NULL;
    if (!want) return;
    setenv("OPENBLAS_CORETYPE", want, 1);
    execv("/proc/self/exe", argv);  // returns only on failure: then carry on with the slow kernels
    unsetenv("OPENBLAS_CORETYPE");
}

Backend *backend_cpu_create(int threads) {
    if (threads <= 0) threads = omp_get_num_procs();
    omp_set_num_threads(threads);
    openblas_set_num_threads(1);  // par_sgemm parallelizes over OpenMP: one thread pool, no spinning contention
    Backend *be = xcalloc(sizeof(Backend), "backend");
    CpuImpl *impl = xcalloc(sizeof(CpuImpl), "cpu backend");
    impl->threads = threads;
    *be = (Backend){
        .name = "cpu",
        .act_dtype = DTYPE_F32,
        .act_size = sizeof(float),
        .impl = impl,
        .alloc = cpu_alloc,
        .free = cpu_free,
        .alloc_host = cpu_alloc,
        .free_host = cpu_free,
        .upload = cpu_upload,
        .download = cpu_download,
        .zero = cpu_zero,
        .copy = cpu_copy,
        .sync = cpu_sync,
        .mem_info = cpu_mem_info,
        .download_act = cpu_download_act,
        .upload_async = cpu_upload_async,
        .input_wait = cpu_input_slot,
        .input_consumed = cpu_input_slot,
        .input_host_free = cpu_input_slot,
        .set_deterministic = cpu_set_deterministic,
        .set_params = cpu_set_params,
        .params_changed = cpu_params_changed,
        .patch_unfold = cpu_patch_unfold,
        .matmul_fwd = cpu_matmul_fwd,
        .matmul_bwd = cpu_matmul_bwd,
        .add_posemb = cpu_add_posemb,
        .add = cpu_add,
        .trelu_fwd = cpu_trelu_fwd,
        .trelu_bwd = cpu_trelu_bwd,
        .gelu_fwd = cpu_gelu_fwd,
        .gelu_bwd = cpu_gelu_bwd,
        .layernorm_fwd = cpu_layernorm_fwd,
        .layernorm_bwd = cpu_layernorm_bwd,
        .attn_saved_elems = cpu_attn_saved_elems,
        .attention_fwd = cpu_attention_fwd,
        .attention_bwd = cpu_attention_bwd,
        .dropout_fwd = cpu_dropout_fwd,
        .dropout_bwd = cpu_dropout_bwd,
        .meanpool_fwd = cpu_meanpool_fwd,
        .meanpool_bwd = cpu_meanpool_bwd,
        .xent_fwd_bwd = cpu_xent_fwd_bwd,
        .sumsq = cpu_sumsq,
        .adam_step = cpu_adam_step,
        .scale = cpu_scale,
        .axpy = cpu_axpy,
        .ema_update = cpu_ema_update,
        .images_from_u8 = cpu_images_from_u8,
        .gather_blocks = cpu_gather_blocks,
        .graft_update_blocks = cpu_graft_update_blocks,
        .gemm_batched = cpu_gemm_batched,
        .inverse_root = NULL,  // roots on the host (LAPACK) in src/shampoo.c
        .gemm = cpu_gemm,
        .copy2d = cpu_copy2d,
        .moments = cpu_moments,
        .adam_dir = cpu_adam_dir,
        .signal_stats = cpu_signal_stats,
        .native_stream = NULL,
        .destroy = cpu_destroy,
    };
    return be;
}
