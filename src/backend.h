// backend.h: the op interface that the model, the loss and the optimizers call. The model is written once against
// it; each backend (CPU fp32 in backend_cpu.c, CUDA bf16 in kernels/) owns its memory and dtypes.
//
// Memory classes and dtypes:
//   - "device" buffers come from be->alloc and are opaque to the host: never dereference them outside a backend.
//   - params, grads, optimizer state, E-SPA buffers, images, targets and per-sample losses are fp32 (float *).
//   - activations and activation gradients are in be->act_dtype (fp32 on CPU, bf16 on CUDA); they are passed as
//     void * and sized with be->act_size bytes per element.
//   - Weight pointers passed to matmul ops always point into the params buffer that was registered with
//     be->set_params; a backend may keep a low-precision shadow of it, refreshed by be->params_changed.
// Accumulation: every parameter-gradient output (dW, dbias, dgamma, dbeta) is ACCUMULATED (+=), so gradient
// accumulation needs no extra buffer. Activation-gradient outputs overwrite, except layernorm_bwd's dx (+=, the
// residual stream). Shapes are in comments as (rows, cols); R = B*N rows of tokens.
#pragma once
#include <stddef.h>
#include <stdint.h>

typedef enum { DTYPE_F32 = 0, DTYPE_BF16 = 1 } DType;

typedef struct AdamArgs {
    float lr;            // scheduled learning rate of this step
    float beta1, beta2;  // moment decays
    float eps;           // added to sqrt(v_hat)
    float weight_decay;  // 0 for tensors outside the decay set
    int decoupled;       // 1: w *= 1 - lr*wd before the update; 0: g += wd*w (L2) before the moments
    int64_t t;           // 1-based step for bias correction
    float grad_scale;    // clip factor applied to g first
} AdamArgs;

typedef struct Backend Backend;
#define BE_ROOT_SIDES 4  // side contexts of inverse_root (Shampoo's concurrent root threads)
struct Backend {
    const char *name;  // "cpu" or "cuda"
    DType act_dtype;
    size_t act_size;  // bytes per activation element
    void *impl;       // backend-private state

    // ---- memory ----
    void *(*alloc)(Backend *be, size_t bytes, const char *what);  // zeroed; fails with the buffer's name and size
    void (*free)(Backend *be, void *p);
    void *(*alloc_host)(Backend *be, size_t bytes, const char *what);  // pinned on CUDA, for async uploads
    void (*free_host)(Backend *be, void *p);
    void (*upload)(Backend *be, void *dst, const void *src, size_t bytes);    // host -> device
    void (*download)(Backend *be, void *dst, const void *src, size_t bytes);  // device -> host, synchronous
    void (*zero)(Backend *be, void *p, size_t bytes);
    void (*copy)(Backend *be, void *dst, const void *src, size_t bytes);  // device -> device
    void (*sync)(Backend *be);
    // Free and total bytes of the memory that alloc draws on (GPU memory; host RAM on the CPU).
    void (*mem_info)(Backend *be, size_t *free_bytes, size_t *total_bytes);
    // Input double buffering (the train loop prefetches the next micro-batch while this one computes); slot 0 or 1.
    // upload_async copies host (alloc_host) -> device on a copy stream, after the compute stream has passed the
    // input_consumed mark of that slot; input_wait makes the compute stream wait for the slot's copies;
    // input_host_free returns once the slot's copies have read their host buffers (before the host rewrites them).
    // On the CPU the copy is a memcpy and the waits are no-ops.
    void (*upload_async)(Backend *be, void *dst, const void *src, size_t bytes, int slot);
    void (*input_wait)(Backend *be, int slot);
    void (*input_consumed)(Backend *be, int slot);
    void (*input_host_free)(Backend *be, int slot);
    // Device activations -> host fp32 (logits for metrics, tests): n elements, synchronous.
    void (*download_act)(Backend *be, float *host_dst, const void *src, size_t n);
    // Bits independent of the thread count (the CPU backend then splits GEMMs in fixed chunks; slower). Needed for
    // comm.deterministic, where ranks at different world sizes run different thread counts.
    void (*set_deterministic)(Backend *be, int on);
    void (*set_params)(Backend *be, float *params, size_t n);       // register the param buffer
    void (*params_changed)(Backend *be, float *params, size_t n);  // after an optimizer step or a load

    // ---- model ops ----
    // img (B, C, H, W) fp32 -> patches (B*N, C*p*p) act, token n = r*w + c, feature ch*p*p + ky*p + kx.
    void (*patch_unfold)(Backend *be, void *patches, const float *img, int B, int C, int H, int W, int p);
    // out (R, Dout) = inp (R, Din) @ W(Dout, Din)^T + bias (Dout, may be NULL).
    void (*matmul_fwd)(Backend *be, void *out, const void *inp, const float *W, const float *bias, int R, int Din,
                       int Dout);
    // dinp (R, Din) = dout @ W (skipped if NULL); dW (Dout, Din) += dout^T @ inp; dbias (Dout) += colsum(dout) (if non-NULL).
    void (*matmul_bwd)(Backend *be, void *dinp, float *dW, float *dbias, const void *dout, const void *inp,
                       const float *W, int R, int Din, int Dout);
    // Input images: dst (B, C, H, W) fp32 = ((float)src / 255 - mean[c]) / std[c] from src (B, H, W, C) uint8, the
    // loader's uint8 batches (ToTensor + Normalize on the device; bit for bit normalize_u8_hwc). mean, std: host (C).
    void (*images_from_u8)(Backend *be, float *dst, const uint8_t *src, int B, int C, int H, int W, const float *mean,
                           const float *std);
    // x (B, N, D) += pe (N, D), in place.
    void (*add_posemb)(Backend *be, void *x, const float *pe, int B, int N, int D);
    // out = a + b, n elements (out may alias a or b).
    void (*add)(Backend *be, void *out, const void *a, const void *b, size_t n);
    // TAT leaky ReLU: y = s*x (x > 0), s*a*x (else). Backward reads the output y (sign-preserving since s, a > 0).
    void (*trelu_fwd)(Backend *be, void *y, const void *x, size_t n, float s, float a);
    void (*trelu_bwd)(Backend *be, void *dx, const void *dy, const void *y, size_t n, float s, float a);
    // Exact GELU 0.5 x (1 + erf(x / sqrt 2)); backward reads the input x.
    void (*gelu_fwd)(Backend *be, void *y, const void *x, size_t n);
    void (*gelu_bwd)(Backend *be, void *dx, const void *dy, const void *x, size_t n);
    // LayerNorm over the last axis (biased variance, eps): y (R, D); saves mean, rstd (R) fp32.
    void (*layernorm_fwd)(Backend *be, void *y, float *mean, float *rstd, const void *x, const float *gamma,
                          const float *beta, int R, int D, float eps);
    // dx (R, D) += ...; dgamma, dbeta (D) += ...
    void (*layernorm_bwd)(Backend *be, void *dx, float *dgamma, float *dbeta, const void *dy, const void *x,
                          const float *mean, const float *rstd, const float *gamma, int R, int D);
    // Attention per head h: out[b, i, h*dh + e] = rowscale_i * sum_j P_ij v_j, P = softmax(q k^T / sqrt(dh) + bias).
    // qkv (B, N, 3D) with feature s*D + h*dh + e; bias (N, N) and rowscale (N) fp32, each may be NULL.
    // saved: attn_saved_elems(B, N, H, dh) fp32 elements the backend keeps for backward (probabilities on CPU; the
    // CUDA backend's own layout).
    size_t (*attn_saved_elems)(Backend *be, int B, int N, int H, int dh);
    void (*attention_fwd)(Backend *be, void *out, float *saved, const void *qkv, const float *bias,
                          const float *rowscale, int B, int N, int H, int dh);
    // dqkv (B, N, 3D) overwritten.
    void (*attention_bwd)(Backend *be, void *dqkv, const void *dout, const void *qkv, const float *saved,
                          const float *bias, const float *rowscale, int B, int N, int H, int dh);
    // Inverted dropout on x (B, per_sample) with drop probability p. Sample i's mask is the counter stream
    // rng_key(seed, RNG_DROPOUT, step, first_pos + i): element j is kept iff rng_counter_uniform(key, j) >= p.
    // The backward recomputes the same mask (nothing is stored).
    void (*dropout_fwd)(Backend *be, void *y, const void *x, int B, size_t per_sample, float p, uint64_t seed,
                        uint64_t step, uint64_t first_pos);
    void (*dropout_bwd)(Backend *be, void *dx, const void *dy, int B, size_t per_sample, float p, uint64_t seed,
                        uint64_t step, uint64_t first_pos);
    // pooled (B, D) = mean over tokens of x (B, N, D); backward spreads dpooled / N.
    void (*meanpool_fwd)(Backend *be, void *pooled, const void *x, int B, int N, int D);
    void (*meanpool_bwd)(Backend *be, void *dx, const void *dpooled, int B, int N, int D);
    // Softmax cross-entropy with soft targets t (B, C) fp32 and label smoothing eps (t <- (1-eps) t + eps/C):
    // losses (B) fp32 per sample; dlogits (B, C) = grad_scale * (softmax - t) unless dlogits is NULL.
    void (*xent_fwd_bwd)(Backend *be, float *losses, void *dlogits, const void *logits, const float *targets, int B,
                         int C, float smoothing, float grad_scale);

    // ---- optimizer ops (fp32) ----
    double (*sumsq)(Backend *be, const float *x, size_t n);  // result on the host, accumulated in fp64
    void (*adam_step)(Backend *be, float *w, const float *g, float *m, float *v, size_t n, const AdamArgs *a);
    void (*scale)(Backend *be, float *x, size_t n, float s);
    void (*axpy)(Backend *be, float *y, const float *x, size_t n, float a);  // y += a x
    // ema = decay * ema + (1 - decay) * w
    void (*ema_update)(Backend *be, float *ema, const float *w, size_t n, float decay);
    // Shampoo: C (M, N) = alpha op(A) op(B) + beta C on fp32 buffers, row-major with leading dimensions.
    void (*gemm)(Backend *be, int transA, int transB, int M, int N, int K, float alpha, const float *A, int lda,
                 const float *B, int ldb, float beta, float *C, int ldc);
    // dst (rows, cols) with row stride ldd = src (rows, cols) with row stride lds (block gather and scatter).
    void (*copy2d)(Backend *be, float *dst, int ldd, const float *src, int lds, int rows, int cols);
    // m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2 (the Adam moments without the update).
    void (*moments)(Backend *be, float *m, float *v, const float *g, size_t n, float b1, float b2);
    // out = (m / bc1) / (sqrt(v / bc2) + eps): the Adam direction (Shampoo's graft).
    void (*adam_dir)(Backend *be, float *out, const float *m, const float *v, size_t n, float bc1, float bc2,
                     float eps);

    // Shampoo's batched block work (spec/shampoo.md §2.3 step 7): nb blocks of one shape (rows, cols), block b at
    // element offset offs[b] of a buffer with row stride lds[b]; offs and lds are backend buffers (be->alloc).
    // gather_blocks: dst (nb, rows, cols), contiguous, = the blocks of base.
    void (*gather_blocks)(Backend *be, float *dst, const float *base, const int64_t *offs, const int *lds, int nb,
                          int rows, int cols);
    // The grafted block update, block by block: W_b += -c_b * P_b with P (nb, rows, cols) contiguous. Ps NULL: the
    // graft step, P = Pg and c_b = (float)lr. Else P = Ps and c_b = (float)(lr * ||Pg_b||_F / (||Ps_b||_F + 1e-16)),
    // the norms accumulated in fp64 on the device (no host round trip on the CUDA backend).
    void (*graft_update_blocks)(Backend *be, float *base, const int64_t *offs, const int *lds, const float *Pg,
                                const float *Ps, int nb, int rows, int cols, double lr);
    // C_b (M, N) = alpha op(A_b) op(B_b) + beta C_b for b < nb, fp32 (no TF32), row-major; A, B and C are backend
    // buffers holding nb pointers each (be->alloc, filled with be->upload).
    void (*gemm_batched)(Backend *be, int transA, int transB, int M, int N, int K, float alpha, const float *const *A,
                         int lda, const float *const *B, int ldb, float beta, float *const *C, int ldc, int nb);
    // Shampoo's inverse root on the device (spec/shampoo.md §2.4): X (n, n) = (F / bias_corr + shift + eps I)^(-1/r)
    // of the symmetric factor F (n, n, row-major; its lower triangle is read), by a symmetric eigendecomposition in
    // fp64 (fp64 = 1) or fp32, X exactly symmetric, fp32. Returns 0, 1 if the decomposition failed or gave
    // non-finite values, 2 if F is not finite. side = 0 runs it on the compute stream; side = 1 .. BE_ROOT_SIDES on
    // side context `side` (a stream and handles of its own), for root threads that overlap each other and the step
    // (callers of one context are serialized; the caller orders the inputs with be->sync first). It returns when X
    // is written.
    // NULL on the CPU backend: the owner computes roots on the host with LAPACK (src/shampoo.c).
    int (*inverse_root)(Backend *be, const float *F, int n, double bias_corr, int r, double eps, int fp64, float *X,
                        int side);
    // Sizes the inverse_root contexts 1 .. sides (those of the root threads) for factors up to n x n in advance, so
    // that no root thread grows (and frees, which synchronizes the device) its buffers during training; fp32
    // buffers only for fp32 roots. NULL on the CPU backend.
    void (*reserve_roots)(Backend *be, int n, int fp64, int sides);

    // ---- diagnostics ----
    // Over x (B, N, D): mean of x^2, and the mean cosine between distinct tokens of the same image.
    void (*signal_stats)(Backend *be, const void *x, int B, int N, int D, double *mean_sq, double *mean_cos);

    // The backend's compute stream (a cudaStream_t) for NCCL to order against; NULL on the CPU.
    void *(*native_stream)(Backend *be);

    void (*destroy)(Backend *be);
};

// Backend constructors. threads <= 0 means the machine's count.
Backend *backend_cpu_create(int threads);
// OpenBLAS picks its kernels when the library loads; on CPUs it does not recognize (common in VMs) it falls back to
// the SSE3 "Prescott" kernels, 3-5x slower. Call first thing in main: if that happened on a CPU with AVX2/AVX-512,
// it re-executes the program with OPENBLAS_CORETYPE set (once; a user's own setting always wins).
void backend_cpu_fix_blas_core(char **argv);
#ifdef USE_CUDA
// The CUDA backend on GPU `device` (bf16 activations, fp32 master weights and optimizer state). Exits with a clear
// message when no usable GPU is there; backend_cuda_available() asks first (for run.device "auto").
Backend *backend_cuda_create(int device);
int backend_cuda_available(void);
// Attention implementation: 0 = cuBLAS batched GEMMs + softmax kernels (P kept in bf16), 1 = fused flash-style
// kernels. The default is the one tests/gpu validated; SD_ATTN=flash|unfused overrides it at create time, and the
// daemon's run.attention then applies only when SD_ATTN is unset.
void backend_cuda_set_attention(Backend *be, int fused);
int backend_cuda_get_attention(Backend *be);  // 1 if the fused attention runs
#endif
