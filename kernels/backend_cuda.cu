// backend_cuda.cu: the CUDA backend. bf16 activations, fp32 accumulation, fp32 master weights, gradients and
// optimizer state (src/backend.h has the contract). The linear layers run on cuBLASLt (bf16 in, fp32 accumulate,
// bias epilogue) against a bf16 shadow of the parameters that params_changed refreshes; parameter gradients are
// accumulated in fp32 by the same GEMMs (beta = 1). Attention runs as the fused FlashAttention-2-style kernels of
// flash2.cu (the default) or as cuBLAS strided-batched GEMMs around softmax kernels (P kept in bf16, "unfused").
// Every reduction is done in a fixed order (no float atomics), so a step's bits do not depend on scheduling.
// Compute runs on one stream (download() and the host-valued reductions synchronize it); input batches are
// uploaded on a second stream (upload_async) so that the copy overlaps the previous batch's compute.
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cusolverDn.h>
#include <cuda_runtime.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include "backend.h"
#include "rng.h"
#include "util.h"
}

#ifdef SD_HAVE_FLASH  // set by the Makefile when kernels/flash2.cu is there
#include "flash2.cuh"
#define HAVE_FLASH 1
#else
#define HAVE_FLASH 0
#endif

typedef __nv_bfloat16 bf16;

// ---------------------------------------------------------------- error checks

#define CUDA_CHECK(call)                                                                                           \
    do {                                                                                                           \
        cudaError_t err_ = (call);                                                                                 \
        if (err_ != cudaSuccess) die_at(__FILE__, __LINE__, "CUDA error %s in %s", cudaGetErrorString(err_), #call); \
    } while (0)
#define KERNEL_CHECK(name)                                                                                         \
    do {                                                                                                           \
        cudaError_t err_ = cudaGetLastError();                                                                     \
        if (err_ != cudaSuccess) die_at(__FILE__, __LINE__, "CUDA kernel %s: %s", name, cudaGetErrorString(err_)); \
    } while (0)
#define CUBLAS_CHECK(call)                                                                                         \
    do {                                                                                                           \
        cublasStatus_t st_ = (call);                                                                               \
        if (st_ != CUBLAS_STATUS_SUCCESS) die_at(__FILE__, __LINE__, "cuBLAS error %d in %s", (int)st_, #call);     \
    } while (0)

#define CUSOLVER_CHECK(call)                                                                                       \
    do {                                                                                                           \
        cusolverStatus_t st_ = (call);                                                                             \
        if (st_ != CUSOLVER_STATUS_SUCCESS) die_at(__FILE__, __LINE__, "cuSOLVER error %d in %s", (int)st_, #call); \
    } while (0)

// ---------------------------------------------------------------- state

// Shampoo's inverse roots (cu_inverse_root): a stream, solver and BLAS handles and work buffers grown to the largest
// n seen. Context 0 runs on the compute stream; contexts 1 .. BE_ROOT_SIDES each on a side stream of its own, for
// root threads (they overlap each other: one eigendecomposition is latency-bound).
typedef struct {
    int ready;
    cudaStream_t st;
    cusolverDnHandle_t sol;
    cublasHandle_t blas;
    int own_blas;  // context 1 owns its BLAS handle; context 0 borrows the backend's
    int cap;       // the buffers hold n x n for n <= cap
    int cap_f;     // ... and the fp32 ones (Af, wf), allocated only for fp32 roots
    double *A, *X, *w, *sc;
    float *Af, *wf;
    void *work;
    size_t work_bytes;
    int *dflag;  // [0] syevd info, [1] 1 = non-finite result, 2 = non-finite input
    int *hflag;  // pinned
    // The host waits for the flags on this event, created with cudaEventBlockingSync: a root thread sleeps through
    // its decomposition (100-300 ms per refresh, up to 4 threads per rank) instead of spinning on a core that the
    // data loader needs, which matters when root_delay hides the roots behind the steps.
    cudaEvent_t done;
} RootCtx;

// cuBLASLt's heuristic costs tens of microseconds per call: its answer is cached per GEMM signature.
typedef struct {
    int key[16];
    int found;  // 0: Lt has no algorithm for this signature
    cublasLtMatmulAlgo_t algo;
} LtAlgo;
#define LT_CACHE 256

typedef struct {
    LtAlgo lt_cache[LT_CACHE];
    int lt_cached;
    int device;
    cudaStream_t st;
    cublasHandle_t blas;
    cublasLtHandle_t lt;
    void *lt_ws;
    size_t lt_ws_bytes;
    float *params;  // registered fp32 params and their bf16 shadow
    size_t nparams;
    bf16 *shadow;
    void *scratch;  // grows on demand (stream-ordered reuse: one stream)
    size_t scratch_bytes;
    double *red;    // device reduction partials
    double *h_red;  // pinned host copy
    int fused_attn;
    int attn_sized;  // the attention (1 fused, 0 unfused) the last attn_saved_elems sized for; -1 before any
    int sms;
    cudaStream_t copy_st;                  // input uploads (upload_async)
    cudaEvent_t ev_copied[2], ev_consumed[2];  // per input slot: copies done; compute's last read enqueued
    int no_lt;      // SD_LT=0: every GEMM through cublasGemmEx (to compare with cuBLASLt)
    int lt_bgrad;   // SD_LT_BGRAD=1: bias gradients from the dW GEMM's BGRADB epilogue (not yet validated)
    long bgrad_used, bgrad_none, bgrad_failed;  // ... how many bias gradients it computed, and why not the others
    int ln_stream;  // SD_LN_REG=0: the LayerNorm kernels that re-read each row (to compare with the register ones)
    RootCtx rctx[1 + BE_ROOT_SIDES];  // Shampoo roots: compute stream, side streams
    pthread_mutex_t rmu[1 + BE_ROOT_SIDES];  // one caller per context at a time (two Shampoo instances may share)
    float *gcoef;     // graft_update_blocks: one coefficient per block
    int gcoef_cap;
    int profiling;  // SD_CUDA_PROFILE=1: every op timed with events (serializes the stream), table at destroy
    struct {
        const char *name;
        double ms;
        long calls;
    } prof[64];
    int nprof;
} CudaImpl;

static CudaImpl *IM(Backend *be) { return (CudaImpl *)be->impl; }

// Per-op GPU time when profiling: a pair of events around each op, recorded without synchronizing (the stream runs
// as usual); the pairs are read back when the pool fills, at destroy, or by prof_flush. Times include any gap
// in which the GPU waited for the host to launch the op.
#define PROF_POOL 16384
typedef struct {
    const char *name;
    cudaEvent_t e0, e1;
} ProfRec;
static ProfRec *g_prof_recs;  // PROF_POOL pairs, created on first use
static int g_prof_used, g_prof_depth;  // records in use; scopes open now

static void prof_add(CudaImpl *im, const char *name, float ms) {
    int k = 0;
    while (k < im->nprof && strcmp(im->prof[k].name, name)) k++;
    if (k == im->nprof) {
        if (im->nprof == 64) return;
        im->prof[im->nprof].name = name;
        im->prof[im->nprof].ms = 0.0;
        im->prof[im->nprof].calls = 0;
        im->nprof++;
    }
    im->prof[k].ms += ms;
    im->prof[k].calls++;
}

static void prof_flush(CudaImpl *im) {
    if (!g_prof_used) return;
    CUDA_CHECK(cudaStreamSynchronize(im->st));
    for (int i = 0; i < g_prof_used; i++) {
        float ms = 0;
        CUDA_CHECK(cudaEventElapsedTime(&ms, g_prof_recs[i].e0, g_prof_recs[i].e1));
        prof_add(im, g_prof_recs[i].name, ms);
    }
    g_prof_used = 0;
}

struct ProfScope {
    CudaImpl *im;
    ProfRec *r;
    ProfScope(CudaImpl *i, const char *n) : im(i), r(NULL) {
        if (!im->profiling) return;
        if (!g_prof_recs) {
            g_prof_recs = (ProfRec *)xcalloc(PROF_POOL * sizeof(ProfRec), "profile events");
            for (int k = 0; k < PROF_POOL; k++) {
                CUDA_CHECK(cudaEventCreate(&g_prof_recs[k].e0));
                CUDA_CHECK(cudaEventCreate(&g_prof_recs[k].e1));
            }
        }
        if (g_prof_used == PROF_POOL && g_prof_depth == 0) prof_flush(im);  // no open scope: every pair is complete
        if (g_prof_used == PROF_POOL) return;  // full inside an open scope: this one goes unmeasured
        g_prof_depth++;
        r = &g_prof_recs[g_prof_used++];
        r->name = n;
        CUDA_CHECK(cudaEventRecord(r->e0, im->st));
    }
    ~ProfScope() {
        if (!r) return;
        CUDA_CHECK(cudaEventRecord(r->e1, im->st));
        g_prof_depth--;
    }
};
#define PROF(be_or_im, name) ProfScope prof_scope_(prof_impl(be_or_im), name)
static inline CudaImpl *prof_impl(Backend *be) { return IM(be); }
static inline CudaImpl *prof_impl(CudaImpl *im) { return im; }

#define RED_BLOCKS 512  // partial sums per reduction (fixed: the bits do not depend on the GPU)

static void *scratch_get(CudaImpl *im, size_t bytes) {
    if (bytes > im->scratch_bytes) {
        // Stream-ordered (only the compute stream uses scratch): the old buffer is released after the kernels
        // queued before, with no device-wide sync, which would also wait for an NCCL sum in flight or a Shampoo
        // root on a side stream.
        if (im->scratch) CUDA_CHECK(cudaFreeAsync(im->scratch, im->st));
        size_t want = bytes + bytes / 4;
        cudaError_t e = cudaMallocAsync(&im->scratch, want, im->st);
        if (e != cudaSuccess) {  // the freed block stays in the pool until a sync: give it back, then try once more
            cudaGetLastError();
            CUDA_CHECK(cudaStreamSynchronize(im->st));
            cudaMemPool_t pool;
            if (cudaDeviceGetDefaultMemPool(&pool, im->device) == cudaSuccess) cudaMemPoolTrimTo(pool, 0);
            cudaGetLastError();  // a failed pool query must not surface in a later KERNEL_CHECK
            e = cudaMallocAsync(&im->scratch, want, im->st);
        }
        if (e != cudaSuccess) {
            size_t fr = 0, tot = 0;
            cudaGetLastError();
            if (e != cudaErrorMemoryAllocation)
                DIE("CUDA: cudaMallocAsync of the %.1f MiB scratch space failed: %s", want / 1048576.0,
                    cudaGetErrorString(e));
            cudaMemGetInfo(&fr, &tot);
            die_user("out of GPU memory: scratch space needs %.1f MiB (%.1f MiB free of %.1f); lower "
                     "train.batch_size or raise train.grad_accum",
                     want / 1048576.0, fr / 1048576.0, tot / 1048576.0);
        }
        im->scratch_bytes = want;
    }
    return im->scratch;
}

static inline size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

static inline unsigned grid_for(size_t n, int threads) {
    size_t g = (n + threads - 1) / threads;
    if (g > (1u << 30)) g = 1u << 30;
    return (unsigned)(g ? g : 1);
}

// ---------------------------------------------------------------- memory

static void *cu_alloc(Backend *be, size_t bytes, const char *what) {
    void *p = NULL;
    size_t n = bytes ? bytes : 16;
    if (cudaMalloc(&p, n) != cudaSuccess) {
        size_t fr = 0, tot = 0;
        cudaGetLastError();
        cudaMemGetInfo(&fr, &tot);
        die_user("out of GPU memory: %s needs %.1f MiB (%.1f MiB free of %.1f); lower train.batch_size or raise "
                 "train.grad_accum",
                 what, bytes / 1048576.0, fr / 1048576.0, tot / 1048576.0);
    }
    CUDA_CHECK(cudaMemsetAsync(p, 0, n, IM(be)->st));
    return p;
}

// The compute stream's queued work may still read p: wait for it explicitly (cudaFree "may" synchronize the
// device, the runtime's documentation says, not that it must).
static void cu_free(Backend *be, void *p) {
    if (!p) return;
    CUDA_CHECK(cudaStreamSynchronize(IM(be)->st));
    CUDA_CHECK(cudaFree(p));
}

static void *cu_alloc_host(Backend *be, size_t bytes, const char *what) {
    void *p = NULL;
    size_t n = bytes ? bytes : 16;
    if (cudaMallocHost(&p, n) != cudaSuccess) {
        cudaGetLastError();
        die_user("out of pinned host memory: %s needs %.1f MiB", what, bytes / 1048576.0);
    }
    memset(p, 0, n);
    return p;
}

static void cu_free_host(Backend *be, void *p) {
    if (p) CUDA_CHECK(cudaFreeHost(p));
}

static void cu_upload(Backend *be, void *dst, const void *src, size_t n) {
    PROF(be, "upload");
    if (n) CUDA_CHECK(cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, IM(be)->st));
}

static void cu_download(Backend *be, void *dst, const void *src, size_t n) {
    PROF(be, "download");
    if (n) CUDA_CHECK(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToHost, IM(be)->st));
    CUDA_CHECK(cudaStreamSynchronize(IM(be)->st));
}

static void cu_zero(Backend *be, void *p, size_t n) {
    PROF(be, "zero");
    if (n) CUDA_CHECK(cudaMemsetAsync(p, 0, n, IM(be)->st));
}

static void cu_copy(Backend *be, void *dst, const void *src, size_t n) {
    if (n && dst != src) CUDA_CHECK(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice, IM(be)->st));
}

static void cu_sync(Backend *be) { CUDA_CHECK(cudaStreamSynchronize(IM(be)->st)); }

static void cu_mem_info(Backend *be, size_t *free_b, size_t *total_b) { CUDA_CHECK(cudaMemGetInfo(free_b, total_b)); }

static inline float host_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static void cu_upload_async(Backend *be, void *dst, const void *src, size_t n, int slot) {
    PROF(be, "upload_async (copy stream)");
    CudaImpl *im = IM(be);
    CUDA_CHECK(cudaStreamWaitEvent(im->copy_st, im->ev_consumed[slot], 0));  // no read of the old contents pending
    if (n) CUDA_CHECK(cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, im->copy_st));
    CUDA_CHECK(cudaEventRecord(im->ev_copied[slot], im->copy_st));
}

static void cu_input_wait(Backend *be, int slot) {
    CudaImpl *im = IM(be);
    CUDA_CHECK(cudaStreamWaitEvent(im->st, im->ev_copied[slot], 0));
}

static void cu_input_consumed(Backend *be, int slot) {
    CudaImpl *im = IM(be);
    CUDA_CHECK(cudaEventRecord(im->ev_consumed[slot], im->st));
}

static void cu_input_host_free(Backend *be, int slot) { CUDA_CHECK(cudaEventSynchronize(IM(be)->ev_copied[slot])); }

static void cu_download_act(Backend *be, float *dst, const void *src, size_t n) {
    uint16_t *tmp = (uint16_t *)xmalloc(n * 2 + 2, "activation download");
    cu_download(be, tmp, src, n * 2);
    for (size_t i = 0; i < n; i++) dst[i] = host_bf16_to_f32(tmp[i]);
    free(tmp);
}

static void cu_set_deterministic(Backend *be, int on) {}  // every kernel here is deterministic already

__global__ void k_f32_to_bf16(bf16 *dst, const float *src, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dst[i] = __float2bfloat16(src[i]);
}

static void cu_set_params(Backend *be, float *params, size_t n) {
    CudaImpl *im = IM(be);
    if (im->shadow) CUDA_CHECK(cudaFree(im->shadow));
    im->params = params;
    im->nparams = n;
    im->shadow = (bf16 *)cu_alloc(be, n * sizeof(bf16), "bf16 weight shadow");
}

static void cu_params_changed(Backend *be, float *params, size_t n) {
    PROF(be, "params_to_bf16");
    CudaImpl *im = IM(be);
    CHECK(params == im->params && n == im->nparams, "params_changed on a buffer that was not registered");
    k_f32_to_bf16<<<grid_for(n, 256), 256, 0, im->st>>>(im->shadow, params, n);
    KERNEL_CHECK("f32_to_bf16");
}

// The bf16 copy of a weight (or bias) pointer into the registered params.
static const bf16 *shadow_of(CudaImpl *im, const float *w) {
    CHECK(w >= im->params && w < im->params + im->nparams, "matmul weight outside the registered params");
    return im->shadow + (w - im->params);
}

// ---------------------------------------------------------------- GEMMs

static size_t ptr_align(const void *p) {
    uintptr_t a = (uintptr_t)p;
    size_t al = 256;
    while (al > 1 && (a % al)) al >>= 1;
    return al;
}

// Column-major D (m, n) = alpha op(A) op(B) + beta D through cuBLASLt, with an optional bias (length m, bf16,
// added along the rows) epilogue. Returns 0 when Lt offers no algorithm (the caller falls back).
// bgrad: instead of a bias, the BGRADB epilogue writes the sums of op(B) over k (length n, fp32) there.
static int lt_try_ep(CudaImpl *im, int transA, int transB, int m, int n, int k, float alpha, const void *A,
                     cudaDataType ta, int lda, const void *B, cudaDataType tb, int ldb, float beta, void *D,
                     cudaDataType td, int ldd, const bf16 *bias, float *bgrad) {
    if (im->no_lt) return 0;
    cublasLtMatmulDesc_t op;
    CUBLAS_CHECK(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    cublasOperation_t oa = transA ? CUBLAS_OP_T : CUBLAS_OP_N, ob = transB ? CUBLAS_OP_T : CUBLAS_OP_N;
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &oa, sizeof oa));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &ob, sizeof ob));
    if (bias) {
        cublasLtEpilogue_t ep = CUBLASLT_EPILOGUE_BIAS;
        cudaDataType bt = CUDA_R_16BF;
        CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE, &ep, sizeof ep));
        CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias));
        CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bt, sizeof bt));
    } else if (bgrad) {
        cublasLtEpilogue_t ep = CUBLASLT_EPILOGUE_BGRADB;
        cudaDataType bt = CUDA_R_32F;
        CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE, &ep, sizeof ep));
        CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bgrad, sizeof bgrad));
        CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bt, sizeof bt));
    }
    cublasLtMatrixLayout_t la, lb, ld;
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&la, ta, transA ? k : m, transA ? m : k, lda));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&lb, tb, transB ? n : k, transB ? k : n, ldb));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&ld, td, m, n, ldd));
    cublasLtMatmulPreference_t pref;
    CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &im->lt_ws_bytes,
                                                      sizeof im->lt_ws_bytes));
    uint32_t al_a = (uint32_t)ptr_align(A), al_b = (uint32_t)ptr_align(B), al_d = (uint32_t)ptr_align(D);
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_a, 4));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_b, 4));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_d, 4));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_d, 4));
    int key[16] = {transA, transB, m, n, k, (int)ta, lda, (int)tb, ldb, (int)td, ldd, (int)al_a, (int)al_b,
                   (int)al_d, bias != NULL, bgrad != NULL};
    LtAlgo *hit = NULL;
    for (int i = 0; i < im->lt_cached && !hit; i++)
        if (!memcmp(im->lt_cache[i].key, key, sizeof key)) hit = &im->lt_cache[i];
    if (!hit) {
        cublasLtMatmulHeuristicResult_t res;
        int found = 0;
        cublasStatus_t hs = cublasLtMatmulAlgoGetHeuristic(im->lt, op, la, lb, ld, ld, pref, 1, &res, &found);
        LtAlgo fresh;
        memcpy(fresh.key, key, sizeof key);
        fresh.found = hs == CUBLAS_STATUS_SUCCESS && found > 0;
        if (fresh.found) fresh.algo = res.algo;
        if (im->lt_cached < LT_CACHE) {
            im->lt_cache[im->lt_cached] = fresh;
            hit = &im->lt_cache[im->lt_cached++];
        } else {
            im->lt_cache[0] = fresh;  // full (not expected: a model has a few dozen signatures)
            hit = &im->lt_cache[0];
        }
    }
    cublasStatus_t ms = CUBLAS_STATUS_NOT_SUPPORTED;
    if (hit->found)
        ms = cublasLtMatmul(im->lt, op, &alpha, A, la, B, lb, &beta, D, ld, D, ld, &hit->algo, im->lt_ws,
                            im->lt_ws_bytes, im->st);
    cublasLtMatmulPreferenceDestroy(pref);
    cublasLtMatrixLayoutDestroy(la);
    cublasLtMatrixLayoutDestroy(lb);
    cublasLtMatrixLayoutDestroy(ld);
    cublasLtMatmulDescDestroy(op);
    if (ms == CUBLAS_STATUS_SUCCESS) return 1;
    if (hit->found && bgrad) {  // the experimental epilogue: offered, then failed; the plain path from now on
        hit->found = 0;
        im->bgrad_failed++;
        return 0;
    }
    if (hit->found) CUBLAS_CHECK(ms);  // an algorithm was offered and then failed
    return 0;
}

static int lt_try(CudaImpl *im, int transA, int transB, int m, int n, int k, float alpha, const void *A,
                  cudaDataType ta, int lda, const void *B, cudaDataType tb, int ldb, float beta, void *D,
                  cudaDataType td, int ldd, const bf16 *bias) {
    return lt_try_ep(im, transA, transB, m, n, k, alpha, A, ta, lda, B, tb, ldb, beta, D, td, ldd, bias, NULL);
}

// lt_try without a bias, else plain cublasGemmEx (any alignment).
static void lt_matmul(CudaImpl *im, int transA, int transB, int m, int n, int k, float alpha, const void *A,
                      cudaDataType ta, int lda, const void *B, cudaDataType tb, int ldb, float beta, void *D,
                      cudaDataType td, int ldd) {
    if (lt_try(im, transA, transB, m, n, k, alpha, A, ta, lda, B, tb, ldb, beta, D, td, ldd, NULL)) return;
    CUBLAS_CHECK(cublasGemmEx(im->blas, transA ? CUBLAS_OP_T : CUBLAS_OP_N, transB ? CUBLAS_OP_T : CUBLAS_OP_N, m, n,
                              k, &alpha, A, ta, lda, B, tb, ldb, &beta, D, td, ldd, CUBLAS_COMPUTE_32F,
                              CUBLAS_GEMM_DEFAULT));
}

// out (R, Dout) += bias along columns (row-major), for biases that the epilogue cannot take.
__global__ void k_add_bias(bf16 *out, const float *bias, size_t R, int Dout) {
    size_t n = R * Dout;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = __float2bfloat16(__bfloat162float(out[i]) + bias[i % Dout]);
}

static void cu_matmul_fwd(Backend *be, void *out, const void *inp, const float *W, const float *bias, int R, int Din,
                          int Dout) {
    PROF(be, "matmul_fwd");
    CudaImpl *im = IM(be);
    // Row-major out (R, Dout) = inp W^T is column-major out^T (Dout, R) = W (op T on the (Din, Dout) view) inp^T.
    // The bias rides in the epilogue when its bf16 copy is 16-byte aligned; otherwise (or when Lt has no algorithm)
    // a kernel adds the fp32 bias afterwards.
    const bf16 *bsh = bias ? shadow_of(im, bias) : NULL, *Wsh = shadow_of(im, W);
    int epi = bsh && ptr_align(bsh) >= 16;
    if (epi && !lt_try(im, 1, 0, Dout, R, Din, 1.0f, Wsh, CUDA_R_16BF, Din, inp, CUDA_R_16BF, Din, 0.0f, out,
                       CUDA_R_16BF, Dout, bsh))
        epi = 0;
    if (!epi) lt_matmul(im, 1, 0, Dout, R, Din, 1.0f, Wsh, CUDA_R_16BF, Din, inp, CUDA_R_16BF, Din, 0.0f, out, CUDA_R_16BF, Dout);
    if (bias && !epi) {
        k_add_bias<<<grid_for((size_t)R * Dout, 256), 256, 0, im->st>>>((bf16 *)out, bias, (size_t)R, Dout);
        KERNEL_CHECK("add_bias");
    }
}

// Column sums of x (rows, cols) bf16 (and, for layernorm, of x * xhat) into fixed chunks of rows, then a fixed-order
// fp64 sum over the chunks added into acc (fp32). mode 0: acc0 += colsum(dy). mode 1: acc0 += colsum(dy * xhat),
// acc1 += colsum(dy) with xhat = (x - mean) * rstd.
#define COL_CHUNK 64
__global__ void k_col_partial(float *part, const bf16 *dy, const bf16 *x, const float *mean, const float *rstd,
                              int rows, int cols, int mode) {
    __shared__ float s0[8][33], s1[8][33];
    int c = blockIdx.x * 32 + threadIdx.x, chunk = blockIdx.y;
    int r0 = chunk * COL_CHUNK, r1 = min(rows, r0 + COL_CHUNK);
    float a0 = 0.0f, a1 = 0.0f;
    if (c < cols)
        for (int r = r0 + threadIdx.y; r < r1; r += 8) {
            float g = __bfloat162float(dy[(size_t)r * cols + c]);
            if (mode) {
                float xh = (__bfloat162float(x[(size_t)r * cols + c]) - mean[r]) * rstd[r];
                a0 += g * xh;
                a1 += g;
            } else {
                a0 += g;
            }
        }
    s0[threadIdx.y][threadIdx.x] = a0;
    s1[threadIdx.y][threadIdx.x] = a1;
    __syncthreads();
    if (threadIdx.y == 0 && c < cols) {
        float t0 = 0.0f, t1 = 0.0f;
        for (int y = 0; y < 8; y++) {
            t0 += s0[y][threadIdx.x];
            t1 += s1[y][threadIdx.x];
        }
        int nchunks = gridDim.y;
        part[(size_t)chunk * cols + c] = t0;
        if (mode) part[((size_t)nchunks + chunk) * cols + c] = t1;
    }
}

__global__ void k_col_finish(float *acc0, float *acc1, const float *part, int nchunks, int cols) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    double s0 = 0.0, s1 = 0.0;
    for (int k = 0; k < nchunks; k++) {
        s0 += part[(size_t)k * cols + c];
        if (acc1) s1 += part[((size_t)nchunks + k) * cols + c];
    }
    acc0[c] += (float)s0;
    if (acc1) acc1[c] += (float)s1;
}

// The same with 16-byte loads: a block is 8 warps over a strip of 256 columns (8 per lane) and COL_CHUNK_V rows;
// warp w takes rows w, w + 8, ...; the 8 warps' sums are combined in a fixed order. Needs cols % 8 == 0 and
// 16-byte aligned rows.
#define COL_CHUNK_V 128
__device__ __forceinline__ void bf16x8_to_f32(int4 v, float *f) {
    const bf16 *p = (const bf16 *)&v;
#pragma unroll
    for (int k = 0; k < 8; k++) f[k] = __bfloat162float(p[k]);
}

__global__ void __launch_bounds__(256) k_col_partial_vec(float *part, const bf16 *dy, const bf16 *x, const float *mean,
                                                         const float *rstd, int rows, int cols, int mode) {
    __shared__ float s0[8][256], s1[8][256];
    int lane = threadIdx.x % 32, w = threadIdx.x / 32;
    int c0 = blockIdx.x * 256 + lane * 8, chunk = blockIdx.y, nchunks = gridDim.y;
    int r0 = chunk * COL_CHUNK_V, r1 = min(rows, r0 + COL_CHUNK_V);
    float a0[8] = {0, 0, 0, 0, 0, 0, 0, 0}, a1[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (c0 < cols)
        for (int r = r0 + w; r < r1; r += 8) {
            float g[8];
            bf16x8_to_f32(*(const int4 *)(dy + (size_t)r * cols + c0), g);
            if (mode) {
                float xv[8], m = mean[r], rs = rstd[r];
                bf16x8_to_f32(*(const int4 *)(x + (size_t)r * cols + c0), xv);
#pragma unroll
                for (int k = 0; k < 8; k++) {
                    a0[k] += g[k] * ((xv[k] - m) * rs);
                    a1[k] += g[k];
                }
            } else {
#pragma unroll
                for (int k = 0; k < 8; k++) a0[k] += g[k];
            }
        }
#pragma unroll
    for (int k = 0; k < 8; k++) {
        s0[w][lane * 8 + k] = a0[k];
        s1[w][lane * 8 + k] = a1[k];
    }
    __syncthreads();
    int c = blockIdx.x * 256 + threadIdx.x;
    if (c < cols) {
        float t0 = 0.0f, t1 = 0.0f;
        for (int k = 0; k < 8; k++) {
            t0 += s0[k][threadIdx.x];
            t1 += s1[k][threadIdx.x];
        }
        part[(size_t)chunk * cols + c] = t0;
        if (mode) part[((size_t)nchunks + chunk) * cols + c] = t1;
    }
}

static void col_sums(CudaImpl *im, float *acc0, float *acc1, const bf16 *dy, const bf16 *x, const float *mean,
                     const float *rstd, int rows, int cols) {
    int vec = cols % 8 == 0 && (uintptr_t)dy % 16 == 0 && (!acc1 || (uintptr_t)x % 16 == 0);
    if (vec) {
        PROF(im, acc1 ? "  layernorm dgamma/dbeta" : "  matmul dbias (colsum)");
        int nchunks = (rows + COL_CHUNK_V - 1) / COL_CHUNK_V;
        CHECK(nchunks <= 65535, "column sums: %d rows exceed the grid's y limit (%d chunks)", rows, nchunks);
        float *part = (float *)scratch_get(im, (size_t)2 * nchunks * cols * sizeof(float));
        dim3 grid((cols + 255) / 256, nchunks);
        k_col_partial_vec<<<grid, 256, 0, im->st>>>(part, dy, x, mean, rstd, rows, cols, acc1 ? 1 : 0);
        KERNEL_CHECK("col_partial_vec");
        k_col_finish<<<(cols + 127) / 128, 128, 0, im->st>>>(acc0, acc1, part, nchunks, cols);
        KERNEL_CHECK("col_finish");
        return;
    }
    PROF(im, acc1 ? "  layernorm dgamma/dbeta" : "  matmul dbias (colsum)");
    int nchunks = (rows + COL_CHUNK - 1) / COL_CHUNK;
    CHECK(nchunks <= 65535, "column sums: %d rows exceed the grid's y limit (%d chunks)", rows, nchunks);
    float *part = (float *)scratch_get(im, (size_t)2 * nchunks * cols * sizeof(float));
    dim3 grid((cols + 31) / 32, nchunks), block(32, 8);
    k_col_partial<<<grid, block, 0, im->st>>>(part, dy, x, mean, rstd, rows, cols, acc1 ? 1 : 0);
    KERNEL_CHECK("col_partial");
    k_col_finish<<<(cols + 127) / 128, 128, 0, im->st>>>(acc0, acc1, part, nchunks, cols);
    KERNEL_CHECK("col_finish");
}

// y (n) += x (n), fp32 (the bias gradient that the BGRADB epilogue wrote into scratch).
__global__ void k_acc_f32(float *y, const float *x, size_t n) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i < n) y[i] += x[i];
}

static void launch_axpy(CudaImpl *im, float *y, const float *x, size_t n) {
    k_acc_f32<<<grid_for(n, 256), 256, 0, im->st>>>(y, x, n);
    KERNEL_CHECK("acc_f32");
}

static void cu_matmul_bwd(Backend *be, void *dinp, float *dW, float *dbias, const void *dout, const void *inp,
                          const float *W, int R, int Din, int Dout) {
    PROF(be, "matmul_bwd");
    CudaImpl *im = IM(be);
    // dinp (R, Din) = dout W: column-major dinp^T (Din, R) = W-view (Din, Dout) dout^T (Dout, R).
    if (dinp)
        lt_matmul(im, 0, 0, Din, R, Dout, 1.0f, shadow_of(im, W), CUDA_R_16BF, Din, dout, CUDA_R_16BF, Dout, 0.0f,
                  dinp, CUDA_R_16BF, Din);
    // dW (Dout, Din) += dout^T inp: column-major dW^T (Din, Dout) = inp^T (Din, R) (dout^T)^T, fp32 out, beta 1.
    // With SD_LT_BGRAD=1 the same GEMM also sums op(B) = dout over its k = R rows (the BGRADB epilogue) into a
    // scratch vector that is then added to dbias: one read of dout fewer. Opt-in until a GPU run validates it.
    if (dbias && im->lt_bgrad) {
        float *bg = (float *)scratch_get(im, (size_t)Dout * sizeof(float));
        if (lt_try_ep(im, 0, 1, Din, Dout, R, 1.0f, inp, CUDA_R_16BF, Din, dout, CUDA_R_16BF, Dout, 1.0f, dW,
                      CUDA_R_32F, Din, NULL, bg)) {
            im->bgrad_used++;
            launch_axpy(im, dbias, bg, (size_t)Dout);
            return;
        }
        im->bgrad_none++;  // (including the ones that failed at run time, counted apart as well)
    }
    lt_matmul(im, 0, 1, Din, Dout, R, 1.0f, inp, CUDA_R_16BF, Din, dout, CUDA_R_16BF, Dout, 1.0f, dW, CUDA_R_32F,
              Din);
    if (dbias) col_sums(im, dbias, NULL, (const bf16 *)dout, NULL, NULL, NULL, R, Dout);
}

// ---------------------------------------------------------------- elementwise

#define GRID_STRIDE(i, n) \
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (n); i += (size_t)gridDim.x * blockDim.x)

__global__ void k_patch_unfold(bf16 *patches, const float *img, int B, int C, int H, int W, int p) {
    int w = W / p, N = (H / p) * w, K = C * p * p;
    size_t total = (size_t)B * N * K;
    GRID_STRIDE(i, total) {
        int k = (int)(i % K);
        size_t row = i / K;
        int n = (int)(row % N), b = (int)(row / N);
        int ch = k / (p * p), ky = (k / p) % p, kx = k % p;
        int r = n / w, c = n % w;
        patches[i] = __float2bfloat16(img[(((size_t)b * C + ch) * H + (size_t)r * p + ky) * W + (size_t)c * p + kx]);
    }
}

static void cu_patch_unfold(Backend *be, void *patches, const float *img, int B, int C, int H, int W, int p) {
    PROF(be, "patch_unfold");
    size_t total = (size_t)B * (H / p) * (W / p) * C * p * p;
    k_patch_unfold<<<grid_for(total, 256), 256, 0, IM(be)->st>>>((bf16 *)patches, img, B, C, H, W, p);
    KERNEL_CHECK("patch_unfold");
}

// Elementwise maps over bf16: out[i] = f(a[i], b[i], i) in fp32, rounded once. Eight elements (16 bytes) per
// thread when every pointer is 16-byte aligned (the tail and unaligned buffers go element by element).
template <class F>
__global__ void k_map(bf16 *out, const bf16 *a, const bf16 *b, size_t n, size_t nvec, F f) {
    size_t tid = blockIdx.x * (size_t)blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    for (size_t v = tid; v < nvec; v += stride) {
        int4 ra = ((const int4 *)a)[v], rb = b ? ((const int4 *)b)[v] : ra, ro;
        const bf16 *pa = (const bf16 *)&ra, *pb = (const bf16 *)&rb;
        bf16 *po = (bf16 *)&ro;
#pragma unroll
        for (int k = 0; k < 8; k++)
            po[k] = __float2bfloat16(f(__bfloat162float(pa[k]), __bfloat162float(pb[k]), v * 8 + k));
        ((int4 *)out)[v] = ro;
    }
    for (size_t i = nvec * 8 + tid; i < n; i += stride)
        out[i] = __float2bfloat16(f(__bfloat162float(a[i]), b ? __bfloat162float(b[i]) : 0.0f, i));
}

template <class F>
static void launch_map(CudaImpl *im, void *out, const void *a, const void *b, size_t n, F f, const char *name) {
    int vec = ((uintptr_t)out % 16 == 0) && ((uintptr_t)a % 16 == 0) && (!b || (uintptr_t)b % 16 == 0);
    size_t nvec = vec ? n / 8 : 0;
    size_t work = nvec ? nvec : n;
    unsigned grid = grid_for(work, 256);
    unsigned cap = (unsigned)im->sms * 16;  // grid-stride beyond a few waves
    if (grid > cap) grid = cap;
    k_map<<<grid, 256, 0, im->st>>>((bf16 *)out, (const bf16 *)a, (const bf16 *)b, n, nvec, f);
    KERNEL_CHECK(name);
}

struct PosembF {
    const float *pe;
    size_t nd;
    __device__ float operator()(float x, float, size_t i) const { return x + pe[i % nd]; }
};
struct AddF {
    __device__ float operator()(float x, float y, size_t) const { return x + y; }
};
struct TreluF {
    float s, sn;
    __device__ float operator()(float x, float, size_t) const { return x > 0.0f ? s * x : sn * x; }
};
struct TreluBwdF {  // (dy, y)
    float s, sn;
    __device__ float operator()(float g, float y, size_t) const { return g * (y > 0.0f ? s : sn); }
};
struct GeluF {
    __device__ float operator()(float x, float, size_t) const {
        return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
    }
};
struct GeluBwdF {  // (dy, x)
    __device__ float operator()(float g, float x, size_t) const {
        float cdf = 0.5f * (1.0f + erff(x * 0.70710678118654752f));
        float pdf = 0.3989422804014327f * expf(-0.5f * x * x);
        return g * (cdf + x * pdf);
    }
};
struct RowscaleF {  // x (B, N, D): row n scaled by rs[n]
    const float *rs;
    int N, D;
    __device__ float operator()(float x, float, size_t i) const { return x * rs[(i / D) % N]; }
};
struct DropoutF {  // sample i / per_sample keeps element j iff its counter uniform >= p (rng.h, same as the CPU)
    size_t per_sample;
    float p, keep_scale;
    uint64_t seed, step, first_pos;
    __device__ float operator()(float x, float, size_t i) const {
        uint64_t b = i / per_sample, j = i % per_sample;
        uint64_t key = rng_key(seed, RNG_DROPOUT, step, first_pos + b);
        return rng_counter_uniform(key, j) >= p ? x * keep_scale : 0.0f;
    }
};

static void cu_add_posemb(Backend *be, void *x, const float *pe, int B, int N, int D) {
    PROF(be, "add_posemb");
    launch_map(IM(be), x, x, NULL, (size_t)B * N * D, PosembF{pe, (size_t)N * D}, "add_posemb");
}

static void cu_add(Backend *be, void *out, const void *a, const void *b, size_t n) {
    PROF(be, "add");
    launch_map(IM(be), out, a, b, n, AddF{}, "add");
}

static void cu_trelu_fwd(Backend *be, void *y, const void *x, size_t n, float s, float a) {
    PROF(be, "trelu_fwd");
    launch_map(IM(be), y, x, NULL, n, TreluF{s, s * a}, "trelu_fwd");
}

static void cu_trelu_bwd(Backend *be, void *dx, const void *dy, const void *y, size_t n, float s, float a) {
    PROF(be, "trelu_bwd");
    launch_map(IM(be), dx, dy, y, n, TreluBwdF{s, s * a}, "trelu_bwd");
}

static void cu_gelu_fwd(Backend *be, void *y, const void *x, size_t n) {
    PROF(be, "gelu_fwd");
    launch_map(IM(be), y, x, NULL, n, GeluF{}, "gelu_fwd");
}

static void cu_gelu_bwd(Backend *be, void *dx, const void *dy, const void *x, size_t n) {
    PROF(be, "gelu_bwd");
    launch_map(IM(be), dx, dy, x, n, GeluBwdF{}, "gelu_bwd");
}

// ---------------------------------------------------------------- layernorm (one warp per row)

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__global__ void k_layernorm_fwd(bf16 *y, float *mean, float *rstd, const bf16 *x, const float *gamma,
                                const float *beta, int R, int D, float eps) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= R) return;
    const bf16 *xr = x + (size_t)row * D;
    float s = 0.0f;
    for (int i = lane; i < D; i += 32) s += __bfloat162float(xr[i]);
    float m = warp_sum(s) / (float)D;
    float v = 0.0f;
    for (int i = lane; i < D; i += 32) {
        float d = __bfloat162float(xr[i]) - m;
        v += d * d;
    }
    float rs = rsqrtf(warp_sum(v) / (float)D + eps);
    bf16 *yr = y + (size_t)row * D;
    for (int i = lane; i < D; i += 32) yr[i] = __float2bfloat16((__bfloat162float(xr[i]) - m) * rs * gamma[i] + beta[i]);
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = rs;
    }
}

// 16-byte variants (D % 8 == 0, aligned rows): each lane takes 8 consecutive features per step.
__global__ void k_layernorm_fwd_vec(bf16 *y, float *mean, float *rstd, const bf16 *x, const float *gamma,
                                    const float *beta, int R, int D, float eps) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= R) return;
    const bf16 *xr = x + (size_t)row * D;
    float f[8], s = 0.0f;
    for (int i = lane * 8; i < D; i += 256) {
        bf16x8_to_f32(*(const int4 *)(xr + i), f);
#pragma unroll
        for (int k = 0; k < 8; k++) s += f[k];
    }
    float m = warp_sum(s) / (float)D, v = 0.0f;
    for (int i = lane * 8; i < D; i += 256) {
        bf16x8_to_f32(*(const int4 *)(xr + i), f);
#pragma unroll
        for (int k = 0; k < 8; k++) v += (f[k] - m) * (f[k] - m);
    }
    float rs = rsqrtf(warp_sum(v) / (float)D + eps);
    bf16 *yr = y + (size_t)row * D;
    for (int i = lane * 8; i < D; i += 256) {
        bf16x8_to_f32(*(const int4 *)(xr + i), f);
        int4 o;
        bf16 *po = (bf16 *)&o;
#pragma unroll
        for (int k = 0; k < 8; k++) po[k] = __float2bfloat16((f[k] - m) * rs * gamma[i + k] + beta[i + k]);
        *(int4 *)(yr + i) = o;
    }
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = rs;
    }
}

__global__ void k_layernorm_bwd_dx_vec(bf16 *dx, const bf16 *dy, const bf16 *x, const float *mean, const float *rstd,
                                       const float *gamma, int R, int D) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= R) return;
    const bf16 *xr = x + (size_t)row * D, *dyr = dy + (size_t)row * D;
    bf16 *dxr = dx + (size_t)row * D;
    float m = mean[row], rs = rstd[row], sdn = 0.0f, sdx = 0.0f, xf[8], gf[8];
    for (int i = lane * 8; i < D; i += 256) {
        bf16x8_to_f32(*(const int4 *)(xr + i), xf);
        bf16x8_to_f32(*(const int4 *)(dyr + i), gf);
#pragma unroll
        for (int k = 0; k < 8; k++) {
            float dn = gf[k] * gamma[i + k];
            sdn += dn;
            sdx += dn * ((xf[k] - m) * rs);
        }
    }
    sdn = warp_sum(sdn) / (float)D;
    sdx = warp_sum(sdx) / (float)D;
    for (int i = lane * 8; i < D; i += 256) {
        float of[8];
        bf16x8_to_f32(*(const int4 *)(xr + i), xf);
        bf16x8_to_f32(*(const int4 *)(dyr + i), gf);
        bf16x8_to_f32(*(const int4 *)(dxr + i), of);
        int4 o;
        bf16 *po = (bf16 *)&o;
#pragma unroll
        for (int k = 0; k < 8; k++)
            po[k] = __float2bfloat16(of[k] + (gf[k] * gamma[i + k] - sdn - ((xf[k] - m) * rs) * sdx) * rs);
        *(int4 *)(dxr + i) = o;
    }
}

// Register-resident variants for D <= 256 CH (D % 8 == 0, aligned rows): each lane loads its CH 16-byte chunks of
// the row once and keeps them in registers, where the _vec kernels read the row three times (forward) or x and dy
// twice (backward); at ViT-S/16 (50,176 rows of 384) they were at about 1.5 TB/s (docs/gpu-validation.md, run 3).
// The arithmetic and the summation order are the _vec kernels', chunk by chunk.
template <int CH>
__global__ void __launch_bounds__(256) k_layernorm_fwd_reg(bf16 *y, float *mean, float *rstd, const bf16 *x,
                                                           const float *gamma, const float *beta, int R, int D,
                                                           float eps) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= R) return;
    const bf16 *xr = x + (size_t)row * D;
    float f[CH][8], s = 0.0f;
#pragma unroll
    for (int c = 0; c < CH; c++) {
        int i = lane * 8 + c * 256;
        if (i < D) {
            bf16x8_to_f32(*(const int4 *)(xr + i), f[c]);
#pragma unroll
            for (int k = 0; k < 8; k++) s += f[c][k];
        }
    }
    float m = warp_sum(s) / (float)D, v = 0.0f;
#pragma unroll
    for (int c = 0; c < CH; c++)
        if (lane * 8 + c * 256 < D) {
#pragma unroll
            for (int k = 0; k < 8; k++) v += (f[c][k] - m) * (f[c][k] - m);
        }
    float rs = rsqrtf(warp_sum(v) / (float)D + eps);
    bf16 *yr = y + (size_t)row * D;
#pragma unroll
    for (int c = 0; c < CH; c++) {
        int i = lane * 8 + c * 256;
        if (i < D) {
            int4 o;
            bf16 *po = (bf16 *)&o;
#pragma unroll
            for (int k = 0; k < 8; k++) po[k] = __float2bfloat16((f[c][k] - m) * rs * gamma[i + k] + beta[i + k]);
            *(int4 *)(yr + i) = o;
        }
    }
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = rs;
    }
}

template <int CH>
__global__ void __launch_bounds__(256) k_layernorm_bwd_dx_reg(bf16 *dx, const bf16 *dy, const bf16 *x,
                                                              const float *mean, const float *rstd,
                                                              const float *gamma, int R, int D) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= R) return;
    const bf16 *xr = x + (size_t)row * D, *dyr = dy + (size_t)row * D;
    bf16 *dxr = dx + (size_t)row * D;
    float m = mean[row], rs = rstd[row], sdn = 0.0f, sdx = 0.0f, xf[CH][8], gf[CH][8];
#pragma unroll
    for (int c = 0; c < CH; c++) {
        int i = lane * 8 + c * 256;
        if (i < D) {
            bf16x8_to_f32(*(const int4 *)(xr + i), xf[c]);
            bf16x8_to_f32(*(const int4 *)(dyr + i), gf[c]);
#pragma unroll
            for (int k = 0; k < 8; k++) {
                float dn = gf[c][k] * gamma[i + k];
                sdn += dn;
                sdx += dn * ((xf[c][k] - m) * rs);
            }
        }
    }
    sdn = warp_sum(sdn) / (float)D;
    sdx = warp_sum(sdx) / (float)D;
#pragma unroll
    for (int c = 0; c < CH; c++) {
        int i = lane * 8 + c * 256;
        if (i < D) {
            float of[8];
            bf16x8_to_f32(*(const int4 *)(dxr + i), of);
            int4 o;
            bf16 *po = (bf16 *)&o;
#pragma unroll
            for (int k = 0; k < 8; k++)
                po[k] = __float2bfloat16(of[k] + (gf[c][k] * gamma[i + k] - sdn - ((xf[c][k] - m) * rs) * sdx) * rs);
            *(int4 *)(dxr + i) = o;
        }
    }
}

static int rows16(const void *p, int D) { return D % 8 == 0 && (uintptr_t)p % 16 == 0; }

// The register kernels' chunks per lane for D (1 .. 4), or 0 when they do not apply.
static int ln_chunks(const CudaImpl *im, int D) { return im->ln_stream || D > 1024 ? 0 : (D + 255) / 256; }

template <int CH>
static void ln_fwd_reg(cudaStream_t st, bf16 *y, float *mean, float *rstd, const bf16 *x, const float *gamma,
                       const float *beta, int R, int D, float eps) {
    k_layernorm_fwd_reg<CH><<<(R + 7) / 8, 256, 0, st>>>(y, mean, rstd, x, gamma, beta, R, D, eps);
    KERNEL_CHECK("layernorm_fwd_reg");
}

template <int CH>
static void ln_bwd_dx_reg(cudaStream_t st, bf16 *dx, const bf16 *dy, const bf16 *x, const float *mean,
                          const float *rstd, const float *gamma, int R, int D) {
    k_layernorm_bwd_dx_reg<CH><<<(R + 7) / 8, 256, 0, st>>>(dx, dy, x, mean, rstd, gamma, R, D);
    KERNEL_CHECK("layernorm_bwd_dx_reg");
}

static void cu_layernorm_fwd(Backend *be, void *y, float *mean, float *rstd, const void *x, const float *gamma,
                             const float *beta, int R, int D, float eps) {
    int ch = ln_chunks(IM(be), D);
    if (rows16(x, D) && rows16(y, D) && ch) {
        PROF(be, "layernorm_fwd");
        cudaStream_t st = IM(be)->st;
        bf16 *yb = (bf16 *)y;
        const bf16 *xb = (const bf16 *)x;
        if (ch == 1) ln_fwd_reg<1>(st, yb, mean, rstd, xb, gamma, beta, R, D, eps);
        else if (ch == 2) ln_fwd_reg<2>(st, yb, mean, rstd, xb, gamma, beta, R, D, eps);
        else if (ch == 3) ln_fwd_reg<3>(st, yb, mean, rstd, xb, gamma, beta, R, D, eps);
        else ln_fwd_reg<4>(st, yb, mean, rstd, xb, gamma, beta, R, D, eps);
        return;
    }
    if (rows16(x, D) && rows16(y, D)) {
        PROF(be, "layernorm_fwd");
        k_layernorm_fwd_vec<<<(R + 7) / 8, 256, 0, IM(be)->st>>>((bf16 *)y, mean, rstd, (const bf16 *)x, gamma, beta,
                                                                 R, D, eps);
        KERNEL_CHECK("layernorm_fwd_vec");
        return;
    }
    PROF(be, "layernorm_fwd");
    k_layernorm_fwd<<<(R + 7) / 8, 256, 0, IM(be)->st>>>((bf16 *)y, mean, rstd, (const bf16 *)x, gamma, beta, R, D,
                                                         eps);
    KERNEL_CHECK("layernorm_fwd");
}

__global__ void k_layernorm_bwd_dx(bf16 *dx, const bf16 *dy, const bf16 *x, const float *mean, const float *rstd,
                                   const float *gamma, int R, int D) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= R) return;
    const bf16 *xr = x + (size_t)row * D, *dyr = dy + (size_t)row * D;
    bf16 *dxr = dx + (size_t)row * D;
    float m = mean[row], rs = rstd[row];
    float sdn = 0.0f, sdx = 0.0f;
    for (int i = lane; i < D; i += 32) {
        float xh = (__bfloat162float(xr[i]) - m) * rs;
        float dn = __bfloat162float(dyr[i]) * gamma[i];
        sdn += dn;
        sdx += dn * xh;
    }
    sdn = warp_sum(sdn) / (float)D;
    sdx = warp_sum(sdx) / (float)D;
    for (int i = lane; i < D; i += 32) {
        float xh = (__bfloat162float(xr[i]) - m) * rs;
        float g = (__bfloat162float(dyr[i]) * gamma[i] - sdn - xh * sdx) * rs;
        dxr[i] = __float2bfloat16(__bfloat162float(dxr[i]) + g);
    }
}

static void cu_layernorm_bwd(Backend *be, void *dx, float *dgamma, float *dbeta, const void *dy, const void *x,
                             const float *mean, const float *rstd, const float *gamma, int R, int D) {
    PROF(be, "layernorm_bwd");
    CudaImpl *im = IM(be);
    col_sums(im, dgamma, dbeta, (const bf16 *)dy, (const bf16 *)x, mean, rstd, R, D);
    int ch = ln_chunks(im, D);
    if (rows16(x, D) && rows16(dy, D) && rows16(dx, D) && ch) {
        bf16 *dxb = (bf16 *)dx;
        const bf16 *dyb = (const bf16 *)dy, *xb = (const bf16 *)x;
        if (ch == 1) ln_bwd_dx_reg<1>(im->st, dxb, dyb, xb, mean, rstd, gamma, R, D);
        else if (ch == 2) ln_bwd_dx_reg<2>(im->st, dxb, dyb, xb, mean, rstd, gamma, R, D);
        else if (ch == 3) ln_bwd_dx_reg<3>(im->st, dxb, dyb, xb, mean, rstd, gamma, R, D);
        else ln_bwd_dx_reg<4>(im->st, dxb, dyb, xb, mean, rstd, gamma, R, D);
        return;
    }
    if (rows16(x, D) && rows16(dy, D) && rows16(dx, D)) {
        k_layernorm_bwd_dx_vec<<<(R + 7) / 8, 256, 0, im->st>>>((bf16 *)dx, (const bf16 *)dy, (const bf16 *)x, mean,
                                                                rstd, gamma, R, D);
        KERNEL_CHECK("layernorm_bwd_dx_vec");
        return;
    }
    k_layernorm_bwd_dx<<<(R + 7) / 8, 256, 0, im->st>>>((bf16 *)dx, (const bf16 *)dy, (const bf16 *)x, mean, rstd,
                                                        gamma, R, D);
    KERNEL_CHECK("layernorm_bwd_dx");
}

// ---------------------------------------------------------------- attention

// Unfused layout of `saved`: P (B, H, N, pad8(N)) in bf16. Fused layout: lse (B, H, N) fp32, then O (B, N, D) bf16.
// Rows of S, P, dP and dS are padded to a multiple of 8 elements (16 bytes in bf16): cuBLAS's fast kernels need
// 16-byte aligned leading dimensions (N = 196 gives 392-byte rows otherwise).
static inline int pad8(int n) { return (n + 7) & ~7; }
static size_t unfused_saved_floats(int B, int N, int H) { return ((size_t)B * H * N * pad8(N) + 1) / 2; }
static size_t fused_o_offset(int B, int N, int H) { return align_up((size_t)B * H * N, 64); }  // 256-byte aligned O
static size_t fused_saved_floats(int B, int N, int H, int dh) {
    return fused_o_offset(B, N, H) + ((size_t)B * N * H * dh + 1) / 2;
}

// 1 if attention at (N, dh) runs the fused kernels: fused chosen, and supported at this N and head dim (else the
// unfused kernels run, whatever the choice).
static int attn_fused_at(const CudaImpl *im, int N, int dh) {
#if HAVE_FLASH
    return im->fused_attn && flash2_supported(N, dh);
#else
    (void)im, (void)N, (void)dh;
    return 0;
#endif
}

// Sized for the attention kernels that will run (the unfused layout is 3x the fused one at ViT-S/16: about 1 GB
// of a batch of 256); the buffers then serve only those kernels, which attention_fwd/bwd check.
static size_t cu_attn_saved_elems(Backend *be, int B, int N, int H, int dh) {
    CudaImpl *im = IM(be);
    im->attn_sized = attn_fused_at(im, N, dh);
    return im->attn_sized ? fused_saved_floats(B, N, H, dh) : unfused_saved_floats(B, N, H);
}

static void attn_sized_check(const CudaImpl *im, int N, int dh) {
    int fused = attn_fused_at(im, N, dh);
    CHECK(im->attn_sized < 0 || im->attn_sized == fused,
          "attention: the %s kernels (N %d, dh %d) run on buffers sized for the %s ones (choose the attention "
          "before sizing)", fused ? "fused" : "unfused", N, dh, im->attn_sized ? "fused" : "unfused");
}

// One warp per row (b, i) of one head: P = softmax(S + bias) (S already scaled), written as bf16 into the saved
// (B, H, N, Np) block of head h (row stride Np).
__global__ void k_softmax_rows(bf16 *P, const float *S, const float *bias, int B, int N, int Np, int H, int h) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= B * N) return;
    int b = row / N, i = row % N;
    const float *Si = S + (size_t)row * Np;
    const float *Bi = bias ? bias + (size_t)i * N : NULL;
    float mx = -INFINITY;
    for (int j = lane; j < N; j += 32) mx = fmaxf(mx, Si[j] + (Bi ? Bi[j] : 0.0f));
    mx = warp_max(mx);
    float sum = 0.0f;
    for (int j = lane; j < N; j += 32) sum += __expf(Si[j] + (Bi ? Bi[j] : 0.0f) - mx);
    float inv = 1.0f / warp_sum(sum);
    bf16 *Pi = P + (((size_t)b * H + h) * N + i) * Np;
    for (int j = lane; j < N; j += 32) Pi[j] = __float2bfloat16(__expf(Si[j] + (Bi ? Bi[j] : 0.0f) - mx) * inv);
}

// dS = P * (dP - rowsum(P * dP)) * scale, one warp per row, for head h; dP fp32 (B, N, N), dS bf16 (B, N, N).
__global__ void k_softmax_bwd(bf16 *dS, const float *dP, const bf16 *P, int B, int N, int Np, int H, int h,
                              float scale) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= B * N) return;
    int b = row / N, i = row % N;
    const bf16 *Pi = P + (((size_t)b * H + h) * N + i) * Np;
    const float *dPi = dP + (size_t)row * Np;
    float dot = 0.0f;
    for (int j = lane; j < N; j += 32) dot += __bfloat162float(Pi[j]) * dPi[j];
    dot = warp_sum(dot);
    bf16 *dSi = dS + (size_t)row * Np;
    for (int j = lane; j < N; j += 32) dSi[j] = __float2bfloat16(__bfloat162float(Pi[j]) * (dPi[j] - dot) * scale);
}

static void batched_gemm(CudaImpl *im, int transA, int transB, int m, int n, int k, float alpha, const void *A,
                         int lda, long long sA, const void *Bm, int ldb, long long sB, float beta, void *C,
                         cudaDataType tc, int ldc, long long sC, int batch) {
    CUBLAS_CHECK(cublasGemmStridedBatchedEx(im->blas, transA ? CUBLAS_OP_T : CUBLAS_OP_N, transB ? CUBLAS_OP_T : CUBLAS_OP_N,
                                            m, n, k, &alpha, A, CUDA_R_16BF, lda, sA, Bm, CUDA_R_16BF, ldb, sB, &beta, C,
                                            tc, ldc, sC, batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

static void attn_fwd_unfused(CudaImpl *im, bf16 *out, bf16 *P, const bf16 *qkv, const float *bias,
                             const float *rowscale, int B, int N, int H, int dh) {
    int D = H * dh, D3 = 3 * D;
    float scale = 1.0f / sqrtf((float)dh);
    int Np = pad8(N);
    float *S = (float *)scratch_get(im, (size_t)B * N * Np * sizeof(float));
    long long sq = (long long)N * D3, sNN = (long long)N * Np, sO = (long long)N * D;
    for (int h = 0; h < H; h++) {
        const bf16 *Q = qkv + h * dh, *K = Q + D, *V = Q + 2 * D;
        // S (N_i, N_j) row-major = column-major (j, i) = K (op T on the (dh, N) view) Q-view (dh, N).
        {
            PROF(im, "  attn fwd gemms");
            batched_gemm(im, 1, 0, N, N, dh, scale, K, D3, sq, Q, D3, sq, 0.0f, S, CUDA_R_32F, Np, sNN, B);
        }
        {
            PROF(im, "  attn fwd softmax");
            k_softmax_rows<<<(B * N + 7) / 8, 256, 0, im->st>>>(P, S, bias, B, N, Np, H, h);
            KERNEL_CHECK("softmax_rows");
        }
        // O (N, dh) row-major (ld D) = column-major (dh, N) = V-view (dh, N_j) P-view (N_j, N_i).
        PROF(im, "  attn fwd gemms");
        batched_gemm(im, 0, 0, dh, N, N, 1.0f, V, D3, sq, P + (size_t)h * N * Np, Np, (long long)H * N * Np, 0.0f,
                     out + h * dh, CUDA_R_16BF, D, sO, B);
    }
    if (rowscale) {
        size_t total = (size_t)B * N * D;
        launch_map(im, out, out, NULL, total, RowscaleF{rowscale, N, D}, "rowscale");
    }
}

static void attn_bwd_unfused(CudaImpl *im, bf16 *dqkv, const bf16 *dout, const bf16 *qkv, const bf16 *P,
                             const float *rowscale, int B, int N, int H, int dh) {
    int D = H * dh, D3 = 3 * D;
    float scale = 1.0f / sqrtf((float)dh);
    int Np = pad8(N);
    size_t nU = align_up((size_t)B * N * D * sizeof(bf16), 256), nP = align_up((size_t)B * N * Np * sizeof(float), 256);
    size_t nS = align_up((size_t)B * N * Np * sizeof(bf16), 256);
    char *base = (char *)scratch_get(im, nU + nP + nS);
    bf16 *dU = (bf16 *)base;
    float *dP = (float *)(base + nU);
    bf16 *dS = (bf16 *)(base + nU + nP);
    const bf16 *U = dout;
    if (rowscale) {
        size_t total = (size_t)B * N * D;
        launch_map(im, dU, dout, NULL, total, RowscaleF{rowscale, N, D}, "rowscale");
        U = dU;
    }
    long long sq = (long long)N * D3, sNN = (long long)N * Np, sO = (long long)N * D, sP = (long long)H * N * Np;
    for (int h = 0; h < H; h++) {
        const bf16 *Q = qkv + h * dh, *K = Q + D, *V = Q + 2 * D, *Ph = P + (size_t)h * N * Np, *Uh = U + h * dh;
        bf16 *dQ = dqkv + h * dh, *dK = dQ + D, *dV = dQ + 2 * D;
        // dP (i, j) = sum_e U(i, e) V(j, e): column-major (j, i) = V (op T on the (dh, N) view) U-view (dh, N).
        {
            PROF(im, "  attn bwd gemms");
            batched_gemm(im, 1, 0, N, N, dh, 1.0f, V, D3, sq, Uh, D, sO, 0.0f, dP, CUDA_R_32F, Np, sNN, B);
            // dV (j, e) = sum_i P(i, j) U(i, e): column-major (e, j) = U-view (dh, N_i) (P-view (N_j, N_i))^T.
            batched_gemm(im, 0, 1, dh, N, N, 1.0f, Uh, D, sO, Ph, Np, sP, 0.0f, dV, CUDA_R_16BF, D3, sq, B);
        }
        {
            PROF(im, "  attn bwd softmax");
            k_softmax_bwd<<<(B * N + 7) / 8, 256, 0, im->st>>>(dS, dP, P, B, N, Np, H, h, scale);
            KERNEL_CHECK("softmax_bwd");
        }
        PROF(im, "  attn bwd gemms");
        // dQ (i, e) = sum_j dS(i, j) K(j, e): column-major (e, i) = K-view (dh, N_j) dS-view (N_j, N_i).
        batched_gemm(im, 0, 0, dh, N, N, 1.0f, K, D3, sq, dS, Np, sNN, 0.0f, dQ, CUDA_R_16BF, D3, sq, B);
        // dK (j, e) = sum_i dS(i, j) Q(i, e): column-major (e, j) = Q-view (dh, N_i) (dS-view (N_j, N_i))^T.
        batched_gemm(im, 0, 1, dh, N, N, 1.0f, Q, D3, sq, dS, Np, sNN, 0.0f, dK, CUDA_R_16BF, D3, sq, B);
    }
}

static void cu_attention_fwd(Backend *be, void *out, float *saved, const void *qkv, const float *bias,
                             const float *rowscale, int B, int N, int H, int dh) {
    PROF(be, "attention_fwd");
    CudaImpl *im = IM(be);
    attn_sized_check(im, N, dh);
#if HAVE_FLASH
    if (attn_fused_at(im, N, dh)) {
        float *lse = saved;
        bf16 *o = (bf16 *)(saved + fused_o_offset(B, N, H));
        flash2_fwd((bf16 *)out, lse, o, (const bf16 *)qkv, bias, rowscale, B, N, H, dh, im->st);
        return;
    }
#endif
    attn_fwd_unfused(im, (bf16 *)out, (bf16 *)saved, (const bf16 *)qkv, bias, rowscale, B, N, H, dh);
}

static void cu_attention_bwd(Backend *be, void *dqkv, const void *dout, const void *qkv, const float *saved,
                             const float *bias, const float *rowscale, int B, int N, int H, int dh) {
    PROF(be, "attention_bwd");
    CudaImpl *im = IM(be);
    attn_sized_check(im, N, dh);
#if HAVE_FLASH
    if (attn_fused_at(im, N, dh)) {
        const float *lse = saved;
        const bf16 *o = (const bf16 *)(saved + fused_o_offset(B, N, H));
        size_t ws = flash2_bwd_workspace(B, N, H, dh);
        void *w = ws ? scratch_get(im, ws) : NULL;
        flash2_bwd((bf16 *)dqkv, (const bf16 *)dout, (const bf16 *)qkv, o, lse, bias, rowscale, B, N, H, dh, w,
                       im->st);
        return;
    }
#endif
    attn_bwd_unfused(im, (bf16 *)dqkv, (const bf16 *)dout, (const bf16 *)qkv, (const bf16 *)saved, rowscale, B, N, H,
                     dh);
}

void backend_cuda_set_attention(Backend *be, int fused) { IM(be)->fused_attn = fused && HAVE_FLASH; }
int backend_cuda_get_attention(Backend *be) { return IM(be)->fused_attn; }

// ---------------------------------------------------------------- dropout, pooling, loss

static void cu_dropout_fwd(Backend *be, void *y, const void *x, int B, size_t per_sample, float p, uint64_t seed,
                           uint64_t step, uint64_t first_pos) {
    PROF(be, "dropout");
    launch_map(IM(be), y, x, NULL, (size_t)B * per_sample,
               DropoutF{per_sample, p, 1.0f / (1.0f - p), seed, step, first_pos}, "dropout");
}

static void cu_dropout_bwd(Backend *be, void *dx, const void *dy, int B, size_t per_sample, float p, uint64_t seed,
                           uint64_t step, uint64_t first_pos) {
    cu_dropout_fwd(be, dx, dy, B, per_sample, p, seed, step, first_pos);  // the mask is linear: the same op
}

__global__ void k_meanpool_fwd(bf16 *pooled, const bf16 *x, int B, int N, int D) {
    size_t total = (size_t)B * D;
    GRID_STRIDE(i, total) {
        int b = (int)(i / D), d = (int)(i % D);
        float s = 0.0f;
        for (int n = 0; n < N; n++) s += __bfloat162float(x[((size_t)b * N + n) * D + d]);
        pooled[i] = __float2bfloat16(s / (float)N);
    }
}

__global__ void k_meanpool_bwd(bf16 *dx, const bf16 *dp, int B, int N, int D) {
    size_t total = (size_t)B * N * D;
    GRID_STRIDE(i, total) {
        int d = (int)(i % D);
        size_t b = i / ((size_t)N * D);
        dx[i] = __float2bfloat16(__bfloat162float(dp[b * D + d]) / (float)N);
    }
}

static void cu_meanpool_fwd(Backend *be, void *pooled, const void *x, int B, int N, int D) {
    PROF(be, "meanpool_fwd");
    k_meanpool_fwd<<<grid_for((size_t)B * D, 256), 256, 0, IM(be)->st>>>((bf16 *)pooled, (const bf16 *)x, B, N, D);
    KERNEL_CHECK("meanpool_fwd");
}

static void cu_meanpool_bwd(Backend *be, void *dx, const void *dpooled, int B, int N, int D) {
    PROF(be, "meanpool_bwd");
    k_meanpool_bwd<<<grid_for((size_t)B * N * D, 256), 256, 0, IM(be)->st>>>((bf16 *)dx, (const bf16 *)dpooled, B, N,
                                                                              D);
    KERNEL_CHECK("meanpool_bwd");
}

// Block-wide sums (256 threads) in double, deterministic order.
__device__ double block_sum_d(double v, double *sh) {
    int t = threadIdx.x;
    sh[t] = v;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (t < s) sh[t] += sh[t + s];
        __syncthreads();
    }
    double r = sh[0];
    __syncthreads();
    return r;
}

__global__ void k_xent(float *losses, bf16 *dlogits, const bf16 *logits, const float *targets, int C, float smoothing,
                       float grad_scale) {
    __shared__ double sh[256];
    int b = blockIdx.x;
    const bf16 *z = logits + (size_t)b * C;
    const float *t = targets + (size_t)b * C;
    double mx = -INFINITY;
    for (int c = threadIdx.x; c < C; c += blockDim.x) mx = fmax(mx, (double)__bfloat162float(z[c]));
    // max through the same tree (as a sum would not do): reuse sh
    sh[threadIdx.x] = mx;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) sh[threadIdx.x] = fmax(sh[threadIdx.x], sh[threadIdx.x + s]);
        __syncthreads();
    }
    mx = sh[0];
    __syncthreads();
    double se = 0.0;
    for (int c = threadIdx.x; c < C; c += blockDim.x) se += exp((double)__bfloat162float(z[c]) - mx);
    double lse = mx + log(block_sum_d(se, sh));
    double loss = 0.0;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        double zc = (double)__bfloat162float(z[c]);
        double tc = (1.0 - smoothing) * t[c] + smoothing / C;
        loss -= tc * (zc - lse);
        if (dlogits) dlogits[(size_t)b * C + c] = __float2bfloat16((float)(grad_scale * (exp(zc - lse) - tc)));
    }
    loss = block_sum_d(loss, sh);
    if (threadIdx.x == 0) losses[b] = (float)loss;
}

static void cu_xent_fwd_bwd(Backend *be, float *losses, void *dlogits, const void *logits, const float *targets, int B,
                            int C, float smoothing, float grad_scale) {
    PROF(be, "xent");
    k_xent<<<B, 256, 0, IM(be)->st>>>(losses, (bf16 *)dlogits, (const bf16 *)logits, targets, C, smoothing,
                                      grad_scale);
    KERNEL_CHECK("xent");
}

// ---------------------------------------------------------------- optimizer

__global__ void k_sumsq_partial(double *part, const float *x, size_t n) {
    __shared__ double sh[256];
    double s = 0.0;
    GRID_STRIDE(i, n) s += (double)x[i] * x[i];
    s = block_sum_d(s, sh);
    if (threadIdx.x == 0) part[blockIdx.x] = s;
}

__global__ void k_sum_partials(double *out, const double *part, int n) {
    __shared__ double sh[256];
    double s = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += part[i];
    s = block_sum_d(s, sh);
    if (threadIdx.x == 0) out[0] = s;
}

static double cu_sumsq(Backend *be, const float *x, size_t n) {
    PROF(be, "sumsq");
    CudaImpl *im = IM(be);
    k_sumsq_partial<<<RED_BLOCKS, 256, 0, im->st>>>(im->red, x, n);
    KERNEL_CHECK("sumsq_partial");
    k_sum_partials<<<1, 256, 0, im->st>>>(im->red + RED_BLOCKS, im->red, RED_BLOCKS);
    KERNEL_CHECK("sum_partials");
    cu_download(be, im->h_red, im->red + RED_BLOCKS, sizeof(double));
    return im->h_red[0];
}

__global__ void k_adam(float *w, const float *g, float *m, float *v, size_t n, float lr, float b1, float b2, float eps,
                       float wd, int decoupled, float bc1, float bc2, float gs) {
    GRID_STRIDE(i, n) {
        float gi = g[i] * gs, wi = w[i];
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

static void cu_adam_step(Backend *be, float *w, const float *g, float *m, float *v, size_t n, const AdamArgs *a) {
    PROF(be, "adam");
    float bc1 = (float)(1.0 - pow(a->beta1, (double)a->t)), bc2 = (float)(1.0 - pow(a->beta2, (double)a->t));
    k_adam<<<grid_for(n, 256), 256, 0, IM(be)->st>>>(w, g, m, v, n, a->lr, a->beta1, a->beta2, a->eps, a->weight_decay,
                                                     a->decoupled, bc1, bc2, a->grad_scale);
    KERNEL_CHECK("adam");
}

__global__ void k_scale(float *x, size_t n, float s) { GRID_STRIDE(i, n) x[i] *= s; }
__global__ void k_axpy(float *y, const float *x, size_t n, float a) { GRID_STRIDE(i, n) y[i] += a * x[i]; }
__global__ void k_ema(float *e, const float *w, size_t n, float d) { GRID_STRIDE(i, n) e[i] = d * e[i] + (1.0f - d) * w[i]; }
__global__ void k_moments(float *m, float *v, const float *g, size_t n, float b1, float b2) {
    GRID_STRIDE(i, n) {
        m[i] = b1 * m[i] + (1.0f - b1) * g[i];
        v[i] = b2 * v[i] + (1.0f - b2) * g[i] * g[i];
    }
}
__global__ void k_adam_dir(float *out, const float *m, const float *v, size_t n, float bc1, float bc2, float eps) {
    GRID_STRIDE(i, n) out[i] = (m[i] / bc1) / (sqrtf(v[i] / bc2) + eps);
}

static void cu_scale(Backend *be, float *x, size_t n, float s) {
    PROF(be, "scale");
    k_scale<<<grid_for(n, 256), 256, 0, IM(be)->st>>>(x, n, s);
    KERNEL_CHECK("scale");
}
static void cu_axpy(Backend *be, float *y, const float *x, size_t n, float a) {
    PROF(be, "axpy");
    k_axpy<<<grid_for(n, 256), 256, 0, IM(be)->st>>>(y, x, n, a);
    KERNEL_CHECK("axpy");
}
static void cu_ema_update(Backend *be, float *ema, const float *w, size_t n, float decay) {
    k_ema<<<grid_for(n, 256), 256, 0, IM(be)->st>>>(ema, w, n, decay);
    KERNEL_CHECK("ema");
}
static void cu_moments(Backend *be, float *m, float *v, const float *g, size_t n, float b1, float b2) {
    k_moments<<<grid_for(n, 256), 256, 0, IM(be)->st>>>(m, v, g, n, b1, b2);
    KERNEL_CHECK("moments");
}
static void cu_adam_dir(Backend *be, float *out, const float *m, const float *v, size_t n, float bc1, float bc2,
                        float eps) {
    k_adam_dir<<<grid_for(n, 256), 256, 0, IM(be)->st>>>(out, m, v, n, bc1, bc2, eps);
    KERNEL_CHECK("adam_dir");
}

// Row-major C (M, N) = alpha op(A) op(B) + beta C in fp32 (no TF32): column-major C^T = op(B)^T op(A)^T.
static void cu_gemm(Backend *be, int transA, int transB, int M, int N, int K, float alpha, const float *A, int lda,
                    const float *B, int ldb, float beta, float *C, int ldc) {
    PROF(be, "gemm_f32");
    CudaImpl *im = IM(be);
    CUBLAS_CHECK(cublasSgemm(im->blas, transB ? CUBLAS_OP_T : CUBLAS_OP_N, transA ? CUBLAS_OP_T : CUBLAS_OP_N, N, M, K,
                             &alpha, B, ldb, A, lda, &beta, C, ldc));
}

static void cu_copy2d(Backend *be, float *dst, int ldd, const float *src, int lds, int rows, int cols) {
    if (rows <= 0 || cols <= 0) return;
    CUDA_CHECK(cudaMemcpy2DAsync(dst, (size_t)ldd * 4, src, (size_t)lds * 4, (size_t)cols * 4, rows,
                                 cudaMemcpyDeviceToDevice, IM(be)->st));
}

// ---------------------------------------------------------------- input images

// dst (B, C, H, W) = ((float)src / 255 - mean[c]) / std[c], src (B, H, W, C) uint8: the CPU's normalize_u8_hwc bit
// for bit (IEEE division and subtraction, nothing contracted).
__global__ void k_images_from_u8(float *dst, const uint8_t *src, int C, size_t plane, size_t n, float m0, float m1,
                                 float m2, float s0, float s1, float s2) {
    GRID_STRIDE(i, n) {
        size_t img = (size_t)C * plane, b = i / img, r = i % img, ch = r / plane, p = r % plane;
        float m = ch == 0 ? m0 : ch == 1 ? m1 : m2, sd = ch == 0 ? s0 : ch == 1 ? s1 : s2;
        float u = (float)src[b * img + p * C + ch];
        dst[i] = __fdiv_rn(__fsub_rn(__fdiv_rn(u, 255.0f), m), sd);
    }
}

static void cu_images_from_u8(Backend *be, float *dst, const uint8_t *src, int B, int C, int H, int W,
                              const float *mean, const float *std) {
    PROF(be, "images_from_u8");
    CHECK(C >= 1 && C <= 3, "images_from_u8: %d channels", C);
    size_t plane = (size_t)H * W, n = (size_t)B * C * plane;
    float m[3] = {mean[0], C > 1 ? mean[1] : 0.0f, C > 2 ? mean[2] : 0.0f};
    float sd[3] = {std[0], C > 1 ? std[1] : 1.0f, C > 2 ? std[2] : 1.0f};
    k_images_from_u8<<<grid_for(n, 256), 256, 0, IM(be)->st>>>(dst, src, C, plane, n, m[0], m[1], m[2], sd[0], sd[1],
                                                               sd[2]);
    KERNEL_CHECK("images_from_u8");
}

// ---------------------------------------------------------------- Shampoo

// dst (nb, rows, cols) = the blocks at base + offs[b] with row stride lds[b].
__global__ void k_gather_blocks(float *dst, const float *base, const int64_t *offs, const int *lds, size_t area,
                                int cols, size_t n) {
    GRID_STRIDE(i, n) {
        size_t b = i / area, e = i % area, r = e / cols, c = e % cols;
        dst[i] = base[offs[b] + r * lds[b] + c];
    }
}

static void cu_gather_blocks(Backend *be, float *dst, const float *base, const int64_t *offs, const int *lds, int nb,
                             int rows, int cols) {
    PROF(be, "shampoo_gather");
    size_t area = (size_t)rows * cols, n = area * nb;
    if (!n) return;
    k_gather_blocks<<<grid_for(n, 256), 256, 0, IM(be)->st>>>(dst, base, offs, lds, area, cols, n);
    KERNEL_CHECK("gather_blocks");
}

// One thread block per matrix: coef[b] = -(float)(lr * ||Pg_b|| / (||Ps_b|| + 1e-16)), sums in fp64, fixed order.
__global__ void k_graft_coefs(float *coef, const float *Pg, const float *Ps, size_t area, double lr) {
    __shared__ double sh[256];
    const float *a = Pg + blockIdx.x * area, *p = Ps + blockIdx.x * area;
    double sa = 0.0, sp = 0.0;
    for (size_t i = threadIdx.x; i < area; i += blockDim.x) {
        sa += (double)a[i] * a[i];
        sp += (double)p[i] * p[i];
    }
    sa = block_sum_d(sa, sh);
    sp = block_sum_d(sp, sh);
    if (threadIdx.x == 0) coef[blockIdx.x] = -(float)(lr * sqrt(sa) / (sqrt(sp) + 1e-16));
}

// W_b[r * lds[b] + c] += a_b * P[b, r, c], a_b = coef[b] (device) or a_host.
__global__ void k_blocks_axpy(float *base, const int64_t *offs, const int *lds, const float *P, const float *coef,
                              float a_host, size_t area, int cols, size_t n) {
    GRID_STRIDE(i, n) {
        size_t b = i / area, e = i % area, r = e / cols, c = e % cols;
        float a = coef ? coef[b] : a_host;
        base[offs[b] + r * lds[b] + c] += a * P[i];
    }
}

static void cu_graft_update_blocks(Backend *be, float *base, const int64_t *offs, const int *lds, const float *Pg,
                                   const float *Ps, int nb, int rows, int cols, double lr) {
    PROF(be, "shampoo_graft_update");
    CudaImpl *im = IM(be);
    size_t area = (size_t)rows * cols, n = area * nb;
    if (!n) return;
    if (!Ps) {
        k_blocks_axpy<<<grid_for(n, 256), 256, 0, im->st>>>(base, offs, lds, Pg, NULL, -(float)lr, area, cols, n);
        KERNEL_CHECK("blocks_axpy");
        return;
    }
    if (nb > im->gcoef_cap) {  // rarely: the first call takes 4096 (a free would synchronize the device)
        if (im->gcoef) CUDA_CHECK(cudaFree(im->gcoef));  // implicit device sync: no kernel still reads it
        im->gcoef_cap = nb > 4096 ? nb : 4096;
        CUDA_CHECK(cudaMalloc(&im->gcoef, (size_t)im->gcoef_cap * sizeof(float)));
    }
    k_graft_coefs<<<nb, 256, 0, im->st>>>(im->gcoef, Pg, Ps, area, lr);
    KERNEL_CHECK("graft_coefs");
    k_blocks_axpy<<<grid_for(n, 256), 256, 0, im->st>>>(base, offs, lds, Ps, im->gcoef, 0.0f, area, cols, n);
    KERNEL_CHECK("blocks_axpy");
}

// Row-major C_b = alpha op(A_b) op(B_b) + beta C_b, fp32 (no TF32): column-major C^T = op(B)^T op(A)^T, as cu_gemm.
static void cu_gemm_batched(Backend *be, int transA, int transB, int M, int N, int K, float alpha,
                            const float *const *A, int lda, const float *const *B, int ldb, float beta,
                            float *const *C, int ldc, int nb) {
    PROF(be, "gemm_f32_batched");
    if (nb <= 0) return;
    CUBLAS_CHECK(cublasSgemmBatched(IM(be)->blas, transB ? CUBLAS_OP_T : CUBLAS_OP_N, transA ? CUBLAS_OP_T : CUBLAS_OP_N,
                                    N, M, K, &alpha, B, ldb, A, lda, &beta, C, ldc, nb));
}

// A = F / bc in fp64 (and its fp32 rounding Af for an fp32 solve); flag[1] = 2 if any entry is not finite.
__global__ void k_root_prep(double *A, float *Af, const float *F, size_t nn, double bc, int *flag) {
    GRID_STRIDE(i, nn) {
        double a = (double)F[i] / bc;
        if (!isfinite(a)) flag[1] = 2;
        A[i] = a;
        if (Af) Af[i] = (float)a;
    }
}

__global__ void k_f32_to_f64(double *y, const float *x, size_t n) { GRID_STRIDE(i, n) y[i] = x[i]; }

// The shift rule and the eigenvalue powers: sc[j] = (w[j] - min(w_min, 0) + eps)^(-1/(2r)). One block.
__global__ void __launch_bounds__(256) k_root_powers(double *sc, const double *w, int n, int r, double eps, int *flag) {
    __shared__ double sh[256];
    double mn = INFINITY;
    for (int i = threadIdx.x; i < n; i += blockDim.x) mn = fmin(mn, w[i]);
    sh[threadIdx.x] = mn;
    __syncthreads();
    for (int k = blockDim.x / 2; k > 0; k >>= 1) {
        if (threadIdx.x < k) sh[threadIdx.x] = fmin(sh[threadIdx.x], sh[threadIdx.x + k]);
        __syncthreads();
    }
    double shift = sh[0] < 0.0 ? sh[0] : 0.0;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        double v = pow(w[j] - shift + eps, -1.0 / (2.0 * r));
        if (!isfinite(v)) flag[1] = 1;
        sc[j] = v;
    }
}

// Y = Q diag(sc): column j of the column-major eigenvector matrix scaled by sc[j].
__global__ void k_col_scale(double *A, const double *sc, int n) {
    size_t nn = (size_t)n * n;
    GRID_STRIDE(i, nn) A[i] *= sc[i / n];
}

// X (row-major fp32) from the lower triangle of the column-major SYRK result, mirrored: exactly symmetric.
__global__ void k_root_out(float *X, const double *Xd, int n, int *flag) {
    size_t nn = (size_t)n * n;
    GRID_STRIDE(idx, nn) {
        size_t i = idx / n, j = idx % n;
        double x = i >= j ? Xd[i + j * (size_t)n] : Xd[j + i * (size_t)n];
        float f = (float)x;
        if (!isfinite(x) || !isfinite(f)) flag[1] = 1;
        X[idx] = f;
    }
}

static void root_bufs_free(RootCtx *c) {
    cudaFree(c->A);
    cudaFree(c->X);
    cudaFree(c->w);
    cudaFree(c->sc);
    cudaFree(c->Af);
    cudaFree(c->wf);
    c->A = c->X = c->w = c->sc = NULL;
    c->Af = c->wf = NULL;
    c->cap = c->cap_f = 0;
}

static RootCtx *root_ctx(CudaImpl *im, int side, int n, int fp64) {
    CHECK(side >= 0 && side <= BE_ROOT_SIDES, "inverse_root: side context %d", side);
    RootCtx *c = &im->rctx[side];
    if (!c->ready) {
        if (side) {
            CUDA_CHECK(cudaStreamCreateWithFlags(&c->st, cudaStreamNonBlocking));
            CUBLAS_CHECK(cublasCreate(&c->blas));
            CUBLAS_CHECK(cublasSetStream(c->blas, c->st));
            CUBLAS_CHECK(cublasSetMathMode(c->blas, CUBLAS_DEFAULT_MATH));
            c->own_blas = 1;
        } else {
            c->st = im->st;
            c->blas = im->blas;
        }
        CUSOLVER_CHECK(cusolverDnCreate(&c->sol));
        CUSOLVER_CHECK(cusolverDnSetStream(c->sol, c->st));
        // Replicas and reruns must get the same root bits from the same factor (the default; made explicit).
        CUSOLVER_CHECK(cusolverDnSetDeterministicMode(c->sol, CUSOLVER_DETERMINISTIC_RESULTS));
        CUDA_CHECK(cudaMalloc(&c->dflag, 2 * sizeof(int)));
        CUDA_CHECK(cudaMallocHost(&c->hflag, 2 * sizeof(int)));
        CUDA_CHECK(cudaEventCreateWithFlags(&c->done, cudaEventBlockingSync | cudaEventDisableTiming));
        c->ready = 1;
    }
    if (n > c->cap || (!fp64 && n > c->cap_f)) {
        int keep_f = c->cap_f > 0;  // fp32 buffers once allocated stay (a run uses one root_dtype)
        int cap = n > c->cap ? n : c->cap;  // never below what reserve_roots sized
        CUDA_CHECK(cudaStreamSynchronize(c->st));
        root_bufs_free(c);
        size_t nn = (size_t)cap * cap;
        CUDA_CHECK(cudaMalloc(&c->A, nn * sizeof(double)));
        CUDA_CHECK(cudaMalloc(&c->X, nn * sizeof(double)));
        CUDA_CHECK(cudaMalloc(&c->w, (size_t)cap * sizeof(double)));
        CUDA_CHECK(cudaMalloc(&c->sc, (size_t)cap * sizeof(double)));
        if (!fp64 || keep_f) {
            CUDA_CHECK(cudaMalloc(&c->Af, nn * sizeof(float)));
            CUDA_CHECK(cudaMalloc(&c->wf, (size_t)cap * sizeof(float)));
            c->cap_f = cap;
        }
        c->cap = cap;
    }
    return c;
}

static void root_ctx_free(RootCtx *c) {
    if (!c->ready) return;
    cudaStreamSynchronize(c->st);
    root_bufs_free(c);
    cudaFree(c->work);
    cudaFree(c->dflag);
    cudaFreeHost(c->hflag);
    cudaEventDestroy(c->done);
    cusolverDnDestroy(c->sol);
    if (c->own_blas) {
        cublasDestroy(c->blas);
        cudaStreamDestroy(c->st);
    }
    memset(c, 0, sizeof *c);
}

// The row-major factor's lower triangle is the upper triangle of the column-major matrix that cuSOLVER sees (the
// same entries LAPACKE_?syevd(ROW_MAJOR, 'L') reads on the CPU). Eigenvectors come back as columns.
static int inverse_root_locked(Backend *be, const float *F, int n, double bias_corr, int r, double eps, int fp64,
                               float *X, int side);

// The syevd work buffer of context c for n, grown if needed; returns syevd's lwork for n (the size it asks for,
// whatever the buffer holds, so that a decomposition never depends on the context's history).
static int root_work(RootCtx *c, int n, int fp64) {
    int lwork = 0;
    if (fp64)
        CUSOLVER_CHECK(cusolverDnDsyevd_bufferSize(c->sol, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_UPPER, n, c->A, n,
                                                   c->w, &lwork));
    else
        CUSOLVER_CHECK(cusolverDnSsyevd_bufferSize(c->sol, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_UPPER, n, c->Af,
                                                   n, c->wf, &lwork));
    size_t wbytes = (size_t)lwork * (fp64 ? sizeof(double) : sizeof(float));
    if (wbytes > c->work_bytes) {
        CUDA_CHECK(cudaStreamSynchronize(c->st));
        cudaFree(c->work);
        CUDA_CHECK(cudaMalloc(&c->work, wbytes));
        c->work_bytes = wbytes;
    }
    return lwork;
}

static void cu_reserve_roots(Backend *be, int n, int fp64, int sides) {
    CudaImpl *im = IM(be);
    CHECK(sides >= 1 && sides <= BE_ROOT_SIDES, "reserve_roots: %d side contexts", sides);
    for (int k = 1; k <= sides; k++) {  // the root threads' contexts (context 0 is for direct callers: tests)
        pthread_mutex_lock(&im->rmu[k]);
        root_work(root_ctx(im, k, n, fp64), n, fp64);
        pthread_mutex_unlock(&im->rmu[k]);
    }
}

static int cu_inverse_root(Backend *be, const float *F, int n, double bias_corr, int r, double eps, int fp64, float *X,
                           int side) {
    CudaImpl *im = IM(be);
    CHECK(side >= 0 && side <= BE_ROOT_SIDES, "inverse_root: side context %d", side);
    pthread_mutex_lock(&im->rmu[side]);
    int rc = inverse_root_locked(be, F, n, bias_corr, r, eps, fp64, X, side);
    pthread_mutex_unlock(&im->rmu[side]);
    return rc;
}

// The status flags to the host once the context's stream has done its work (a sleeping wait: see RootCtx.done).
static void root_flags(RootCtx *c) {
    CUDA_CHECK(cudaMemcpyAsync(c->hflag, c->dflag, 2 * sizeof(int), cudaMemcpyDeviceToHost, c->st));
    CUDA_CHECK(cudaEventRecord(c->done, c->st));
    CUDA_CHECK(cudaEventSynchronize(c->done));
}

static int inverse_root_locked(Backend *be, const float *F, int n, double bias_corr, int r, double eps, int fp64,
                               float *X, int side) {
    CudaImpl *im = IM(be);
    // The current device is per host thread: a root thread (side >= 1) starts on device 0, not on this rank's GPU.
    if (side) CUDA_CHECK(cudaSetDevice(im->device));
    RootCtx *c = root_ctx(im, side, n, fp64);
    size_t nn = (size_t)n * n;
    cudaStream_t st = c->st;
    CUDA_CHECK(cudaMemsetAsync(c->dflag, 0, 2 * sizeof(int), st));
    k_root_prep<<<grid_for(nn, 256), 256, 0, st>>>(c->A, fp64 ? NULL : c->Af, F, nn, bias_corr, c->dflag);
    KERNEL_CHECK("root_prep");
    root_flags(c);
    if (c->hflag[1] == 2) return 2;  // as the host path: no decomposition of a non-finite factor
    int lwork = root_work(c, n, fp64);
    if (fp64) {
        CUSOLVER_CHECK(cusolverDnDsyevd(c->sol, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_UPPER, n, c->A, n, c->w,
                                        (double *)c->work, lwork, c->dflag));
    } else {  // fp32 solve, then the powers and the product in fp64 as on the CPU
        CUSOLVER_CHECK(cusolverDnSsyevd(c->sol, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_UPPER, n, c->Af, n, c->wf,
                                        (float *)c->work, lwork, c->dflag));
        k_f32_to_f64<<<grid_for(nn, 256), 256, 0, st>>>(c->A, c->Af, nn);
        KERNEL_CHECK("f32_to_f64");
        k_f32_to_f64<<<grid_for(n, 256), 256, 0, st>>>(c->w, c->wf, n);
        KERNEL_CHECK("f32_to_f64");
    }
    k_root_powers<<<1, 256, 0, st>>>(c->sc, c->w, n, r, eps, c->dflag);
    KERNEL_CHECK("root_powers");
    k_col_scale<<<grid_for(nn, 256), 256, 0, st>>>(c->A, c->sc, n);
    KERNEL_CHECK("col_scale");
    const double one = 1.0, zero = 0.0;
    CUBLAS_CHECK(cublasDsyrk(c->blas, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N, n, n, &one, c->A, n, &zero, c->X, n));
    k_root_out<<<grid_for(nn, 256), 256, 0, st>>>(X, c->X, n, c->dflag);
    KERNEL_CHECK("root_out");
    root_flags(c);
    // info > 0: syevd did not converge (a failed decomposition: counted, the previous roots kept); info < 0: an
    // invalid argument, a bug here
    CHECK(c->hflag[0] >= 0, "cusolverDn%ssyevd (n %d): argument %d is invalid", fp64 ? "D" : "S", n, -c->hflag[0]);
    return c->hflag[0] != 0 || c->hflag[1] != 0 ? 1 : 0;
}

// ---------------------------------------------------------------- diagnostics

// One block per image: (mean of x^2, mean cosine between distinct tokens), as the CPU backend defines them.
__global__ void k_signal_stats(double *out, const bf16 *x, int N, int D) {
    extern __shared__ double u[];  // (D) sum of unit vectors, then 256 for the reductions
    double *sh = u + D;
    int b = blockIdx.x;
    for (int d = threadIdx.x; d < D; d += blockDim.x) u[d] = 0.0;
    __syncthreads();
    double ssq = 0.0;
    for (int n = 0; n < N; n++) {
        const bf16 *xn = x + ((size_t)b * N + n) * D;
        double nn = 0.0;
        for (int d = threadIdx.x; d < D; d += blockDim.x) {
            double v = __bfloat162float(xn[d]);
            nn += v * v;
        }
        nn = block_sum_d(nn, sh);
        ssq += nn;
        double inv = nn > 0.0 ? 1.0 / sqrt(nn) : 0.0;
        for (int d = threadIdx.x; d < D; d += blockDim.x) u[d] += (double)__bfloat162float(xn[d]) * inv;
        __syncthreads();
    }
    double su = 0.0;
    for (int d = threadIdx.x; d < D; d += blockDim.x) su += u[d] * u[d];
    su = block_sum_d(su, sh);
    if (threadIdx.x == 0) {
        out[2 * b] = ssq / ((double)N * D);
        out[2 * b + 1] = N > 1 ? (su - N) / ((double)N * (N - 1)) : 1.0;
    }
}

static void cu_signal_stats(Backend *be, const void *x, int B, int N, int D, double *mean_sq, double *mean_cos) {
    CudaImpl *im = IM(be);
    double *d = (double *)scratch_get(im, (size_t)B * 2 * sizeof(double));
    size_t smem = ((size_t)D + 256) * sizeof(double);
    if (smem > 48 * 1024) CUDA_CHECK(cudaFuncSetAttribute(k_signal_stats, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                          (int)smem));
    k_signal_stats<<<B, 256, smem, im->st>>>(d, (const bf16 *)x, N, D);
    KERNEL_CHECK("signal_stats");
    double *h = (double *)xmalloc((size_t)B * 2 * sizeof(double), "signal stats");
    cu_download(be, h, d, (size_t)B * 2 * sizeof(double));
    double ms = 0.0, mc = 0.0;
    for (int b = 0; b < B; b++) {
        ms += h[2 * b];
        mc += h[2 * b + 1];
    }
    free(h);
    *mean_sq = ms / B;
    *mean_cos = mc / B;
}

// ---------------------------------------------------------------- create / destroy

static void *cu_native_stream(Backend *be) { return (void *)IM(be)->st; }

static void cu_destroy(Backend *be) {
    CudaImpl *im = IM(be);
    cudaStreamSynchronize(im->st);
    if (im->lt_bgrad)  // so that a check or a timing with SD_LT_BGRAD=1 says whether the epilogue ran at all
        fprintf(stderr, "simplest-dist: SD_LT_BGRAD=1: the BGRADB epilogue computed %ld of %ld bias gradients (%ld "
                        "fell back to the column sums, %ld of them after the algorithm failed at run time)\n",
                im->bgrad_used, im->bgrad_used + im->bgrad_none, im->bgrad_none, im->bgrad_failed);
    if (im->profiling) prof_flush(im);
    if (im->profiling && im->nprof) {
        double total = 0;
        for (int k = 0; k < im->nprof; k++) total += im->prof[k].ms;
        fprintf(stderr, "cuda profile (SD_CUDA_PROFILE=1; nested rows are also inside their parent):\n");
        for (int done = 0; done < im->nprof; done++) {  // largest first
            int best = -1;
            for (int k = 0; k < im->nprof; k++)
                if (im->prof[k].calls >= 0 && (best < 0 || im->prof[k].ms > im->prof[best].ms)) best = k;
            fprintf(stderr, "  %-28s %10.2f ms %6.1f %%  %8ld calls  %8.1f us/call\n", im->prof[best].name,
                    im->prof[best].ms, 100 * im->prof[best].ms / total, im->prof[best].calls,
                    1000 * im->prof[best].ms / im->prof[best].calls);
            im->prof[best].calls = -1;
        }
    }
    for (int k = BE_ROOT_SIDES; k >= 0; k--) {
        root_ctx_free(&im->rctx[k]);  // context 0 borrows the backend's BLAS handle
        pthread_mutex_destroy(&im->rmu[k]);
    }
    if (im->gcoef) cudaFree(im->gcoef);
    if (im->shadow) cudaFree(im->shadow);
    if (im->scratch) cudaFree(im->scratch);
    cudaFree(im->red);
    cudaFreeHost(im->h_red);
    cudaFree(im->lt_ws);
    cublasLtDestroy(im->lt);
    cublasDestroy(im->blas);
    cudaStreamSynchronize(im->copy_st);
    for (int k = 0; k < 2; k++) {
        cudaEventDestroy(im->ev_copied[k]);
        cudaEventDestroy(im->ev_consumed[k]);
    }
    cudaStreamDestroy(im->copy_st);
    cudaStreamDestroy(im->st);
    free(im);
    free(be);
}

int backend_cuda_available(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return n > 0;
}

Backend *backend_cuda_create(int device) {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0)
        die_user("config key 'run.device': \"cuda\" but no usable GPU (%s)",
                 e != cudaSuccess ? cudaGetErrorString(e) : "no devices");
    // One visible GPU for a local rank above 0: the launcher gave each rank its own (srun --gpus-per-task=1, or
    // CUDA_VISIBLE_DEVICES per rank). Ranks that truly share one GPU are refused by NCCL ("duplicate GPU").
    if (device >= n && n == 1) device = 0;
    if (device >= n)
        die_user("config key 'run.device': this rank (local rank %d) wants GPU %d but it sees %d (one rank per GPU)",
                 device, device, n);
    CUDA_CHECK(cudaSetDevice(device));
    cudaDeviceProp prop;
    CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
    if (prop.major < 8)
        die_user("config key 'run.device': GPU %d (%s, sm_%d%d) has no bf16 tensor cores; sm_80 or newer is needed",
                 device, prop.name, prop.major, prop.minor);
    CudaImpl *im = (CudaImpl *)xcalloc(sizeof(CudaImpl), "cuda backend");
    im->device = device;
    im->sms = prop.multiProcessorCount;
    CUDA_CHECK(cudaStreamCreate(&im->st));
    CUDA_CHECK(cudaStreamCreateWithFlags(&im->copy_st, cudaStreamNonBlocking));
    for (int k = 0; k < 2; k++) {
        CUDA_CHECK(cudaEventCreateWithFlags(&im->ev_copied[k], cudaEventDisableTiming));
        CUDA_CHECK(cudaEventCreateWithFlags(&im->ev_consumed[k], cudaEventDisableTiming));
        CUDA_CHECK(cudaEventRecord(im->ev_copied[k], im->copy_st));  // recorded once: waits on them pass at first
        CUDA_CHECK(cudaEventRecord(im->ev_consumed[k], im->st));
    }
    CUBLAS_CHECK(cublasCreate(&im->blas));
    CUBLAS_CHECK(cublasSetStream(im->blas, im->st));
    CUBLAS_CHECK(cublasSetMathMode(im->blas, CUBLAS_DEFAULT_MATH));  // fp32 GEMMs stay fp32 (no TF32)
    CUBLAS_CHECK(cublasLtCreate(&im->lt));
    im->lt_ws_bytes = 32u << 20;
    CUDA_CHECK(cudaMalloc(&im->lt_ws, im->lt_ws_bytes));
    CUBLAS_CHECK(cublasSetWorkspace(im->blas, im->lt_ws, im->lt_ws_bytes));
    CUDA_CHECK(cudaMalloc(&im->red, (RED_BLOCKS + 8) * sizeof(double)));
    CUDA_CHECK(cudaMallocHost(&im->h_red, 8 * sizeof(double)));
    for (int k = 0; k <= BE_ROOT_SIDES; k++) pthread_mutex_init(&im->rmu[k], NULL);
    im->attn_sized = -1;
    im->fused_attn = HAVE_FLASH;  // fused by default (tests/gpu checks both; run.attention / SD_ATTN choose)
    const char *lt = getenv("SD_LT");
    im->no_lt = lt && !strcmp(lt, "0");
    const char *bgr = getenv("SD_LT_BGRAD");
    im->lt_bgrad = bgr && !strcmp(bgr, "1");
    const char *lnr = getenv("SD_LN_REG");
    im->ln_stream = lnr && !strcmp(lnr, "0");
    const char *pe = getenv("SD_CUDA_PROFILE");
    im->profiling = pe && *pe && strcmp(pe, "0");
    const char *env = getenv("SD_ATTN");
    if (env && !strcmp(env, "flash")) im->fused_attn = HAVE_FLASH;
    if (env && !strcmp(env, "unfused")) im->fused_attn = 0;
    Backend *be = (Backend *)xcalloc(sizeof(Backend), "backend");
    be->name = "cuda";
    be->act_dtype = DTYPE_BF16;
    be->act_size = 2;
    be->impl = im;
    be->alloc = cu_alloc;
    be->free = cu_free;
    be->alloc_host = cu_alloc_host;
    be->free_host = cu_free_host;
    be->upload = cu_upload;
    be->download = cu_download;
    be->zero = cu_zero;
    be->copy = cu_copy;
    be->sync = cu_sync;
    be->mem_info = cu_mem_info;
    be->download_act = cu_download_act;
    be->upload_async = cu_upload_async;
    be->input_wait = cu_input_wait;
    be->input_consumed = cu_input_consumed;
    be->input_host_free = cu_input_host_free;
    be->set_deterministic = cu_set_deterministic;
    be->set_params = cu_set_params;
    be->params_changed = cu_params_changed;
    be->patch_unfold = cu_patch_unfold;
    be->matmul_fwd = cu_matmul_fwd;
    be->matmul_bwd = cu_matmul_bwd;
    be->add_posemb = cu_add_posemb;
    be->add = cu_add;
    be->trelu_fwd = cu_trelu_fwd;
    be->trelu_bwd = cu_trelu_bwd;
    be->gelu_fwd = cu_gelu_fwd;
    be->gelu_bwd = cu_gelu_bwd;
    be->layernorm_fwd = cu_layernorm_fwd;
    be->layernorm_bwd = cu_layernorm_bwd;
    be->attn_saved_elems = cu_attn_saved_elems;
    be->attention_fwd = cu_attention_fwd;
    be->attention_bwd = cu_attention_bwd;
    be->dropout_fwd = cu_dropout_fwd;
    be->dropout_bwd = cu_dropout_bwd;
    be->meanpool_fwd = cu_meanpool_fwd;
    be->meanpool_bwd = cu_meanpool_bwd;
    be->xent_fwd_bwd = cu_xent_fwd_bwd;
    be->sumsq = cu_sumsq;
    be->adam_step = cu_adam_step;
    be->scale = cu_scale;
    be->axpy = cu_axpy;
    be->ema_update = cu_ema_update;
    be->gemm = cu_gemm;
    be->copy2d = cu_copy2d;
    be->moments = cu_moments;
    be->adam_dir = cu_adam_dir;
    be->images_from_u8 = cu_images_from_u8;
    be->gather_blocks = cu_gather_blocks;
    be->graft_update_blocks = cu_graft_update_blocks;
    be->gemm_batched = cu_gemm_batched;
    be->inverse_root = cu_inverse_root;
    be->reserve_roots = cu_reserve_roots;
    be->signal_stats = cu_signal_stats;
    be->native_stream = cu_native_stream;
    be->destroy = cu_destroy;
    size_t fr = 0, tot = 0;
    cudaMemGetInfo(&fr, &tot);
    printf("cuda: GPU %d %s (sm_%d%d, %d SMs, %.0f MiB free of %.0f), attention %s\n", device, prop.name, prop.major,
           prop.minor, prop.multiProcessorCount, fr / 1048576.0, tot / 1048576.0, im->fused_attn ? "fused" : "unfused");
    return be;
}
