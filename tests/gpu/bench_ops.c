// bench_ops.c: time the backend's heavy ops one by one at the ViT-S/16 shapes (224 px, batch 256: 50,176 token
// rows, D 384, MLP 1536, 6 heads of 64, 196 tokens), to see where a training step's time goes and how far each op
// is from the GPU's ceilings. Each op runs `reps` times back to back after a warm-up; the time per call is the
// wall time over the reps after a sync (launches are asynchronous, so host overhead hides unless it dominates).
// Prints one JSON line per op: name, us per call, TFLOP/s (GEMMs and attention) or GB/s (memory-bound ops).
//   bench_ops [--device cuda|cpu] [--batch 256] [--reps 20]
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "rng.h"
#include "util.h"

static Backend *be;
static int reps = 20;

static void *dev_rand(size_t n, size_t elem, float scale, uint64_t seed) {
    // random fp32 values; for bf16 buffers the device gets the upper halves (a valid bf16 of about the same value)
    float *h = xmalloc(n * sizeof(float), "bench host");
    Rng r = rng_stream(seed, 99, 0, 0);
    for (size_t i = 0; i < n; i++) h[i] = (float)(rng_normal(&r) * scale);
    void *d = be->alloc(be, n * elem, "bench buffer");
    if (elem == 4) {
        be->upload(be, d, h, n * 4);
    } else {
        uint16_t *b = xmalloc(n * 2, "bench host bf16");
        for (size_t i = 0; i < n; i++) {
            uint32_t u;
            memcpy(&u, &h[i], 4);
            b[i] = (uint16_t)(u >> 16);
        }
        be->upload(be, d, b, n * 2);
        be->sync(be);
        free(b);
    }
    be->sync(be);
    free(h);
    return d;
}

#define TIME(name, flops, bytes, stmt)                                                                            \
    do {                                                                                                          \
        stmt;                                                                                                     \
        be->sync(be);                                                                                             \
        double t0 = now_sec();                                                                                    \
        for (int r_ = 0; r_ < reps; r_++) stmt;                                                                   \
        be->sync(be);                                                                                             \
        double us = (now_sec() - t0) / reps * 1e6;                                                                \
        printf("{\"op\": \"%s\", \"us\": %.1f, \"tflops\": %.1f, \"gbps\": %.0f}\n", name, us,                   \
               (flops) / us * 1e-6, (bytes) / us * 1e-3);                                                         \
        fflush(stdout);                                                                                           \
    } while (0)

int main(int argc, char **argv) {
    const char *device = "cuda";
    int B = 256;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--device")) device = argv[i + 1];
        else if (!strcmp(argv[i], "--batch")) B = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--reps")) reps = atoi(argv[i + 1]);
        else die_user("bench_ops: unknown option %s", argv[i]);
    }
#ifdef USE_CUDA
    be = strcmp(device, "cpu") ? backend_cuda_create(0) : backend_cpu_create(0);
#else
    if (strcmp(device, "cpu")) die_user("bench_ops: this build has no CUDA backend");
    be = backend_cpu_create(0);
#endif
    const int N = 196, D = 384, M = 1536, H = 6, dh = 64, P = 768;
    const size_t R = (size_t)B * N, as = be->act_size;
    // one params buffer holding every weight and bias used below
    size_t nW = (size_t)3 * D * D + 3 * D + (size_t)D * M + M + (size_t)M * D + D + (size_t)D * D + (size_t)P * D + D;
    float *params = dev_rand(nW, 4, 0.05f, 1), *grads = dev_rand(nW, 4, 0.0f, 2);
    be->set_params(be, params, nW);
    be->params_changed(be, params, nW);
    size_t off = 0;
    float *Wqkv = params + off, *gWqkv = grads + off;
    off += (size_t)3 * D * D;
    float *bqkv = params + off, *gbqkv = grads + off;
    off += 3 * D;
    float *W1 = params + off, *gW1 = grads + off;
    off += (size_t)D * M;
    float *b1 = params + off, *gb1 = grads + off;
    off += M;
    float *W2 = params + off, *gW2 = grads + off;
    off += (size_t)M * D;
    float *b2 = params + off, *gb2 = grads + off;
    off += D;
    float *Wo = params + off, *gWo = grads + off;
    off += (size_t)D * D;
    float *Wp = params + off, *gWp = grads + off;
    off += (size_t)P * D;
    float *bp = params + off, *gbp = grads + off;
    void *x = dev_rand(R * D, as, 1.0f, 3), *big = dev_rand(R * M, as, 1.0f, 4), *qkv = dev_rand(R * 3 * D, as, 1.0f, 5);
    void *y = dev_rand(R * M, as, 1.0f, 6), *g = dev_rand(R * 3 * D, as, 0.01f, 7), *patches = dev_rand(R * P, as, 1.0f, 8);
    double f;
    f = 2.0 * R * D * 3 * D;
    TIME("matmul_fwd qkv 384->1152 +bias", f, (double)as * R * 4 * D, be->matmul_fwd(be, y, x, Wqkv, bqkv, R, D, 3 * D));
    TIME("matmul_bwd qkv (dinp, dW, dbias)", 2 * f, (double)as * R * 8 * D,
         be->matmul_bwd(be, x, gWqkv, gbqkv, g, x, Wqkv, R, D, 3 * D));
    f = 2.0 * R * D * M;
    TIME("matmul_fwd fc1 384->1536 +bias", f, (double)as * R * (D + M), be->matmul_fwd(be, big, x, W1, b1, R, D, M));
    TIME("matmul_bwd fc1", 2 * f, (double)as * R * (2 * D + 2 * M), be->matmul_bwd(be, x, gW1, gb1, big, x, W1, R, D, M));
    TIME("matmul_fwd fc2 1536->384 +bias", f, (double)as * R * (D + M), be->matmul_fwd(be, x, big, W2, b2, R, M, D));
    TIME("matmul_bwd fc2", 2 * f, (double)as * R * (2 * D + 2 * M), be->matmul_bwd(be, big, gW2, gb2, x, big, W2, R, M, D));
    f = 2.0 * R * D * D;
    TIME("matmul_fwd out 384->384", f, (double)as * R * 2 * D, be->matmul_fwd(be, y, x, Wo, NULL, R, D, D));
    TIME("matmul_bwd out", 2 * f, (double)as * R * 4 * D, be->matmul_bwd(be, y, gWo, NULL, x, y, Wo, R, D, D));
    f = 2.0 * R * P * D;
    TIME("matmul_fwd patch 768->384 +bias", f, (double)as * R * (P + D), be->matmul_fwd(be, y, patches, Wp, bp, R, P, D));
    TIME("matmul_bwd patch (no dinp)", f, (double)as * R * (P + D), be->matmul_bwd(be, NULL, gWp, gbp, y, patches, Wp, R, P, D));
    // attention, with and without the E-SPA bias and row scale
    float *bias = dev_rand((size_t)N * N, 4, 0.1f, 9), *rs = dev_rand(N, 4, 0.3f, 10);
    double fa = 4.0 * B * H * (double)N * N * dh;  // two GEMMs of 2 N^2 dh per head
    double ba = (double)as * R * 4 * D;             // qkv in, out: the least a fused kernel moves
    for (int fused = 0; fused <= 1; fused++) {
#ifdef USE_CUDA
        if (!strcmp(be->name, "cuda")) backend_cuda_set_attention(be, fused);
#else
        if (fused) break;
#endif
        // sized for the attention just chosen (the CUDA backend checks it)
        float *saved = be->alloc(be, be->attn_saved_elems(be, B, N, H, dh) * sizeof(float), "saved");
        char nm[96];
        snprintf(nm, sizeof nm, "attention_fwd %s +bias +rowscale", fused ? "fused" : "unfused");
        TIME(nm, fa, ba, be->attention_fwd(be, x, saved, qkv, bias, rs, B, N, H, dh));
        snprintf(nm, sizeof nm, "attention_bwd %s +bias +rowscale", fused ? "fused" : "unfused");
        TIME(nm, 2.5 * fa, 2 * ba, be->attention_bwd(be, g, x, qkv, saved, bias, rs, B, N, H, dh));
        snprintf(nm, sizeof nm, "attention_fwd %s plain", fused ? "fused" : "unfused");
        TIME(nm, fa, ba, be->attention_fwd(be, x, saved, qkv, NULL, NULL, B, N, H, dh));
        snprintf(nm, sizeof nm, "attention_bwd %s plain", fused ? "fused" : "unfused");
        TIME(nm, 2.5 * fa, 2 * ba, be->attention_bwd(be, g, x, qkv, saved, NULL, NULL, B, N, H, dh));
        be->free(be, saved);
    }
    // memory-bound ops (bytes: read + write once)
    TIME("trelu_fwd R x 1536", 0, (double)as * R * M * 2, be->trelu_fwd(be, big, big, R * M, 1.1f, 0.2f));
    TIME("trelu_bwd R x 1536", 0, (double)as * R * M * 3, be->trelu_bwd(be, big, big, y, R * M, 1.1f, 0.2f));
    TIME("gelu_fwd R x 1536", 0, (double)as * R * M * 2, be->gelu_fwd(be, y, big, R * M));
    TIME("gelu_bwd R x 1536", 0, (double)as * R * M * 3, be->gelu_bwd(be, y, y, big, R * M));
    TIME("add R x 384", 0, (double)as * R * D * 3, be->add(be, x, x, y, R * D));
    float *mean = be->alloc(be, R * 4, "mean"), *rstd = be->alloc(be, R * 4, "rstd");
    float *gam = dev_rand(D, 4, 1.0f, 11), *bet = dev_rand(D, 4, 0.1f, 12), *dg = dev_rand(D, 4, 0, 13), *db = dev_rand(D, 4, 0, 14);
    TIME("layernorm_fwd R x 384", 0, (double)as * R * D * 2, be->layernorm_fwd(be, y, mean, rstd, x, gam, bet, R, D, 1e-5f));
    TIME("layernorm_bwd R x 384", 0, (double)as * R * D * 4, be->layernorm_bwd(be, g, dg, db, y, x, mean, rstd, gam, R, D));
    float *w = dev_rand(22000000, 4, 0.02f, 15), *gr = dev_rand(22000000, 4, 0.001f, 16);
    float *m1 = dev_rand(22000000, 4, 0.0f, 17), *v1 = dev_rand(22000000, 4, 0.0f, 18);
    AdamArgs aa = {.lr = 1e-3f, .beta1 = 0.9f, .beta2 = 0.999f, .eps = 1e-8f, .weight_decay = 0.05f, .decoupled = 1,
                   .t = 10, .grad_scale = 1.0f};
    TIME("adam 22M params", 0, 22e6 * 4 * 7, be->adam_step(be, w, gr, m1, v1, 22000000, &aa));
    TIME("sumsq 22M", 0, 22e6 * 4, be->sumsq(be, gr, 22000000));
    be->destroy(be);
    return 0;
}
