// test_ops.c: every op of the CPU backend (backend.h) against an independent double-precision reference (forward)
// and against finite differences (backward).
//
// Gradient check: for an op out = f(x), a fixed random R and the loss L(x) = sum(out * R) (summed in double), the
// backward called with dout = R gives g = dL/dx. Along a random direction v we compare the central difference
// L(x + h v) - L(x - h v) with <g, x+ - x->, where x+ and x- are the perturbed inputs as actually stored in fp32 (so
// the rounding of the perturbation itself is not an error source). Relative tolerance FD_TOL = 1e-3: the fp32
// forward rounds L by about 1e-7 * sqrt(n) * |out| |R|, which divided by 2h (h = 1e-2) is 1e-5 relative or less at
// these sizes, and the O(h^2) truncation error of the central difference is about 1e-5 relative for these smooth ops
// (measured errors are printed, and are below 1e-4). A wrong index, a transposed operand or a missing term
// changes <g, v> by O(1) relative. Piecewise-linear ops (TReLU) use inputs kept at least 10 h away from the kink.
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "rng.h"
#include "testlib.h"

#define FD_TOL 1e-3
#define FD_H 1e-2

static Backend *be;

static float *fbuf(size_t n) { return be->alloc(be, (n ? n : 1) * sizeof(float), "test buffer"); }
static void ffree(void *p) { be->free(be, p); }

static void fill_normal(float *x, size_t n, double std, uint64_t seed) {
    Rng r = rng_stream(seed, 0x7E57, 1, 0);
    for (size_t i = 0; i < n; i++) x[i] = (float)(std * rng_normal(&r));
}

static void fill_uniform(float *x, size_t n, double lo, double hi, uint64_t seed) {
    Rng r = rng_stream(seed, 0x7E57, 2, 0);
    for (size_t i = 0; i < n; i++) x[i] = (float)(lo + (hi - lo) * rng_uniform(&r));
}

static double dot_d(const float *a, const float *b, size_t n) {
    double s = 0.0;
    for (size_t i = 0; i < n; i++) s += (double)a[i] * b[i];
    return s;
}

static double max_abs_diff(const float *a, const double *b, size_t n) {
    double e = 0.0;
    for (size_t i = 0; i < n; i++) e = fmax(e, fabs((double)a[i] - b[i]));
    return e;
}

static double max_abs_d(const double *b, size_t n) {
    double e = 0.0;
    for (size_t i = 0; i < n; i++) e = fmax(e, fabs(b[i]));
    return e;
}

// The loss of the current inputs held in ctx.
typedef double (*LossFn)(void *ctx);

// Perturbs x (n) in place along a random direction (seeded), evaluates loss at x +- h v, restores x and returns the
// relative error of the central difference against <g, x+ - x->. Prints the measured error under `what`.
// With mask non-NULL the direction is zero where mask[i] == 0 (checks one part of an input on its own).
static double fd_rel_err_masked(const char *what, LossFn loss, void *ctx, float *x, const float *g, size_t n,
                                double h, uint64_t seed, const unsigned char *mask) {
    float *x0 = malloc(n * sizeof(float)), *xp = malloc(n * sizeof(float)), *v = malloc(n * sizeof(float));
    memcpy(x0, x, n * sizeof(float));
    fill_normal(v, n, 1.0, seed);
    if (mask)
        for (size_t i = 0; i < n; i++)
            if (!mask[i]) v[i] = 0.0f;
    for (size_t i = 0; i < n; i++) x[i] = (float)(x0[i] + h * v[i]);
    memcpy(xp, x, n * sizeof(float));
    double lp = loss(ctx);
    for (size_t i = 0; i < n; i++) x[i] = (float)(x0[i] - h * v[i]);
    double lm = loss(ctx);
    double an = 0.0;
    for (size_t i = 0; i < n; i++) an += (double)g[i] * ((double)xp[i] - x[i]);
    memcpy(x, x0, n * sizeof(float));
    double rel = fabs((lp - lm) - an) / fabs(an);
    printf("    %-40s FD %.9g vs analytic %.9g, rel err %.2e\n", what, (lp - lm) / (2 * h), an / (2 * h), rel);
    free(x0);
    free(xp);
    free(v);
    return rel;
}

static double fd_rel_err(const char *what, LossFn loss, void *ctx, float *x, const float *g, size_t n, double h,
                         uint64_t seed) {
    return fd_rel_err_masked(what, loss, ctx, x, g, n, h, seed, NULL);
}

#define EXPECT_FD(what, loss, ctx, x, g, n, seed)                                      \
    do {                                                                               \
        double e_ = fd_rel_err(what, loss, ctx, x, g, n, FD_H, seed);                  \
        EXPECT(e_ <= FD_TOL, "%s: finite-difference rel err %.3g > %.1g", what, e_, FD_TOL); \
    } while (0)

// ---------------------------------------------------------------- patch_unfold

static void test_patch_unfold(void) {
    TEST_CASE("patch_unfold: exact index map, token n = r*w + c, feature ch*p*p + ky*p + kx (non-square image)") {
        int B = 2, C = 3, H = 12, W = 8, p = 4, h = H / p, w = W / p, N = h * w, K = C * p * p;
        float *img = fbuf((size_t)B * C * H * W), *patches = fbuf((size_t)B * N * K);
        for (size_t i = 0; i < (size_t)B * C * H * W; i++) img[i] = (float)i;  // every pixel is its own index
        be->patch_unfold(be, patches, img, B, C, H, W, p);
        int bad = 0;
        for (int b = 0; b < B; b++)
            for (int r = 0; r < h; r++)
                for (int c = 0; c < w; c++)
                    for (int ch = 0; ch < C; ch++)
                        for (int ky = 0; ky < p; ky++)
                            for (int kx = 0; kx < p; kx++) {
                                float want = img[(((size_t)b * C + ch) * H + r * p + ky) * W + c * p + kx];
                                float got = patches[((size_t)b * N + r * w + c) * K + (ch * p + ky) * p + kx];
                                if (got != want && bad++ < 5)
                                    printf("    b %d r %d c %d ch %d ky %d kx %d: got %g want %g\n", b, r, c, ch, ky, kx,
                                           got, want);
                            }
        EXPECT(bad == 0, "%d patch elements in the wrong place", bad);
        ffree(img);
        ffree(patches);
    }
}

// ---------------------------------------------------------------- matmul

typedef struct {
    float *inp, *W, *bias, *out, *R;
    int rows, din, dout;
} MatmulCtx;

static double matmul_loss(void *c_) {
    MatmulCtx *c = c_;
    be->matmul_fwd(be, c->out, c->inp, c->W, c->bias, c->rows, c->din, c->dout);
    return dot_d(c->out, c->R, (size_t)c->rows * c->dout);
}

static void test_matmul(void) {
    // R = 133 rows: not a multiple of the 16-row split of the parallel GEMM, and more than one 64-row chunk of the
    // column sum behind dbias.
    int R = 133, Din = 13, Dout = 11;
    MatmulCtx c = {fbuf((size_t)R * Din), fbuf((size_t)Dout * Din), fbuf(Dout), fbuf((size_t)R * Dout),
                   fbuf((size_t)R * Dout), R, Din, Dout};
    fill_normal(c.inp, (size_t)R * Din, 1.0, 1);
    fill_normal(c.W, (size_t)Dout * Din, 0.3, 2);
    fill_normal(c.bias, Dout, 1.0, 3);
    fill_normal(c.R, (size_t)R * Dout, 1.0, 4);
    TEST_CASE("matmul_fwd: out = inp W^T + bias, with and without bias, against fp64") {
        double *ref = malloc((size_t)R * Dout * sizeof(double));
        for (int with_bias = 0; with_bias < 2; with_bias++) {
            be->matmul_fwd(be, c.out, c.inp, c.W, with_bias ? c.bias : NULL, R, Din, Dout);
            for (int r = 0; r < R; r++)
                for (int o = 0; o < Dout; o++) {
                    double s = with_bias ? c.bias[o] : 0.0;
                    for (int i = 0; i < Din; i++) s += (double)c.inp[(size_t)r * Din + i] * c.W[(size_t)o * Din + i];
                    ref[(size_t)r * Dout + o] = s;
                }
            double e = max_abs_diff(c.out, ref, (size_t)R * Dout);
            printf("    bias %d: max-abs err %.2e (max |out| %.2f)\n", with_bias, e, max_abs_d(ref, (size_t)R * Dout));
            EXPECT(e <= 2e-6, "max-abs err %.3g", e);
        }
        free(ref);
    }
    TEST_CASE("matmul_bwd: dinp overwritten, dW += and dbias += match finite differences") {
        float *dinp = fbuf((size_t)R * Din), *dW = fbuf((size_t)Dout * Din), *db = fbuf(Dout);
        float *dW0 = fbuf((size_t)Dout * Din), *db0 = fbuf(Dout);
        fill_normal(dinp, (size_t)R * Din, 1e3, 5);  // garbage: must be overwritten
        fill_normal(dW0, (size_t)Dout * Din, 1.0, 6);  // prior contents: must be accumulated onto
        fill_normal(db0, Dout, 1.0, 7);
        memcpy(dW, dW0, (size_t)Dout * Din * sizeof(float));
        memcpy(db, db0, Dout * sizeof(float));
        be->matmul_bwd(be, dinp, dW, db, c.R, c.inp, c.W, R, Din, Dout);
        // Remove the prior contents to get this call's gradients (exactness is checked below against a 2nd call).
        float *gW = fbuf((size_t)Dout * Din), *gb = fbuf(Dout);
        for (int i = 0; i < Dout * Din; i++) gW[i] = dW[i] - dW0[i];
        for (int i = 0; i < Dout; i++) gb[i] = db[i] - db0[i];
        EXPECT_FD("d inp", matmul_loss, &c, c.inp, dinp, (size_t)R * Din, 11);
        EXPECT_FD("d W (accumulated)", matmul_loss, &c, c.W, gW, (size_t)Dout * Din, 12);
        EXPECT_FD("d bias (accumulated)", matmul_loss, &c, c.bias, gb, Dout, 13);
        // Accumulation: a second call from zero gives the same increment, and dinp = NULL is allowed.
        float *dW2 = fbuf((size_t)Dout * Din), *db2 = fbuf(Dout);
        be->matmul_bwd(be, NULL, dW2, db2, c.R, c.inp, c.W, R, Din, Dout);
        double e = 0.0;
        for (int i = 0; i < Dout * Din; i++) e = fmax(e, fabs((double)dW[i] - ((double)dW0[i] + dW2[i])));
        for (int i = 0; i < Dout; i++) e = fmax(e, fabs((double)db[i] - ((double)db0[i] + db2[i])));
        EXPECT(e <= 1e-5, "dW/dbias are not prior + increment: max-abs %.3g", e);
        // dbias is the column sum of dout.
        double eb = 0.0;
        for (int o = 0; o < Dout; o++) {
            double s = 0.0;
            for (int r = 0; r < R; r++) s += c.R[(size_t)r * Dout + o];
            eb = fmax(eb, fabs(db2[o] - s));
        }
        EXPECT(eb <= 1e-4, "dbias vs column sum: max-abs %.3g", eb);
        ffree(dinp), ffree(dW), ffree(db), ffree(dW0), ffree(db0), ffree(gW), ffree(gb), ffree(dW2), ffree(db2);
    }
    ffree(c.inp), ffree(c.W), ffree(c.bias), ffree(c.out), ffree(c.R);
}

// ---------------------------------------------------------------- add_posemb, add

static void test_add_ops(void) {
    TEST_CASE("add_posemb: x[b, n, d] += pe[n, d] exactly, for every image") {
        int B = 3, N = 5, D = 8;
        float *x = fbuf((size_t)B * N * D), *x0 = fbuf((size_t)B * N * D), *pe = fbuf((size_t)N * D);
        fill_normal(x0, (size_t)B * N * D, 1.0, 21);
        fill_normal(pe, (size_t)N * D, 1.0, 22);
        memcpy(x, x0, (size_t)B * N * D * sizeof(float));
        be->add_posemb(be, x, pe, B, N, D);
        int bad = 0;
        for (int b = 0; b < B; b++)
            for (int i = 0; i < N * D; i++)
                bad += x[(size_t)b * N * D + i] != x0[(size_t)b * N * D + i] + pe[i];
        EXPECT(bad == 0, "%d elements differ", bad);
        ffree(x), ffree(x0), ffree(pe);
    }
    TEST_CASE("add: out = a + b exactly, also in place (out aliases a or b)") {
        size_t n = 1001;
        float *a = fbuf(n), *b = fbuf(n), *out = fbuf(n), *a2 = fbuf(n), *b2 = fbuf(n);
        fill_normal(a, n, 1.0, 23);
        fill_normal(b, n, 1.0, 24);
        memcpy(a2, a, n * 4);
        memcpy(b2, b, n * 4);
        be->add(be, out, a, b, n);
        be->add(be, a2, a2, b, n);
        be->add(be, b2, a, b2, n);
        int bad = 0;
        for (size_t i = 0; i < n; i++) {
            float want = a[i] + b[i];
            bad += out[i] != want || a2[i] != want || b2[i] != want;
        }
        EXPECT(bad == 0, "%d elements differ", bad);
        ffree(a), ffree(b), ffree(out), ffree(a2), ffree(b2);
    }
}

// ---------------------------------------------------------------- elementwise activations

typedef struct {
    float *x, *y, *R;
    size_t n;
    float s, a;
    int gelu;
} ActCtx;

static double act_loss(void *c_) {
    ActCtx *c = c_;
    if (c->gelu)
        be->gelu_fwd(be, c->y, c->x, c->n);
    else
        be->trelu_fwd(be, c->y, c->x, c->n, c->s, c->a);
    return dot_d(c->y, c->R, c->n);
}

static void test_trelu(void) {
    size_t n = 999;
    // TAT values for L = 12, eta = 0.9 (spec §7).
    ActCtx c = {fbuf(n), fbuf(n), fbuf(n), n, 1.3756293678f, 0.2385026216506958f, 0};
    Rng r = rng_stream(31, 0x7E57, 3, 0);
    for (size_t i = 0; i < n; i++) {  // |x| >= 0.2: at least 10 h * |v| from the kink for |v| < 2
        double u = rng_uniform(&r);
        c.x[i] = (float)((u < 0.5 ? -1.0 : 1.0) * (0.2 + 2.0 * rng_uniform(&r)));
    }
    fill_normal(c.R, n, 1.0, 32);
    TEST_CASE("trelu_fwd: y = s x (x > 0), s a x (x <= 0); also in place") {
        act_loss(&c);
        double e = 0.0;
        for (size_t i = 0; i < n; i++) {
            double want = c.x[i] > 0 ? (double)c.s * c.x[i] : (double)c.s * c.a * c.x[i];
            e = fmax(e, fabs(c.y[i] - want) / fabs(want));
        }
        EXPECT(e <= 2.5e-7, "rel err %.3g", e);
        float *z = fbuf(n);
        memcpy(z, c.x, n * 4);
        be->trelu_fwd(be, z, z, n, c.s, c.a);
        EXPECT(memcmp(z, c.y, n * 4) == 0, "in-place result differs");
        ffree(z);
    }
    TEST_CASE("trelu_bwd: matches finite differences (reads the output y), also in place") {
        act_loss(&c);
        float *dx = fbuf(n);
        be->trelu_bwd(be, dx, c.R, c.y, n, c.s, c.a);
        EXPECT_FD("d x", act_loss, &c, c.x, dx, n, 33);
        float *dd = fbuf(n);
        memcpy(dd, c.R, n * 4);
        act_loss(&c);
        be->trelu_bwd(be, dd, dd, c.y, n, c.s, c.a);
        EXPECT(memcmp(dd, dx, n * 4) == 0, "in-place backward differs");
        ffree(dx), ffree(dd);
    }
    ffree(c.x), ffree(c.y), ffree(c.R);
}

static void test_gelu(void) {
    size_t n = 1000;
    ActCtx c = {fbuf(n), fbuf(n), fbuf(n), n, 0, 0, 1};
    fill_normal(c.x, n, 2.0, 41);
    fill_normal(c.R, n, 1.0, 42);
    TEST_CASE("gelu_fwd: exact GELU 0.5 x (1 + erf(x / sqrt 2)) against fp64") {
        act_loss(&c);
        double e = 0.0;
        for (size_t i = 0; i < n; i++) {
            double x = c.x[i], want = 0.5 * x * (1.0 + erf(x / sqrt(2.0)));
            e = fmax(e, fabs(c.y[i] - want));
        }
        printf("    max-abs err %.2e\n", e);
        EXPECT(e <= 1e-6, "max-abs err %.3g", e);
        // The tanh approximation differs by up to 5e-4 near |x| = 2; make sure that is what we would catch.
        double t = 2.0, tanh_approx = 0.5 * t * (1 + tanh(sqrt(2 / M_PI) * (t + 0.044715 * t * t * t)));
        EXPECT(fabs(tanh_approx - 0.5 * t * (1 + erf(t / sqrt(2.0)))) > 1e-5, "tanh GELU would pass");
    }
    TEST_CASE("gelu_bwd: matches finite differences (reads the input x)") {
        float *dx = fbuf(n);
        be->gelu_bwd(be, dx, c.R, c.x, n);
        EXPECT_FD("d x", act_loss, &c, c.x, dx, n, 43);
        ffree(dx);
    }
    ffree(c.x), ffree(c.y), ffree(c.R);
}

// ---------------------------------------------------------------- layernorm

typedef struct {
    float *x, *gamma, *beta, *y, *mean, *rstd, *R;
    int rows, D;
} LnCtx;

static double ln_loss(void *c_) {
    LnCtx *c = c_;
    be->layernorm_fwd(be, c->y, c->mean, c->rstd, c->x, c->gamma, c->beta, c->rows, c->D, 1e-5f);
    return dot_d(c->y, c->R, (size_t)c->rows * c->D);
}

static void test_layernorm(void) {
    int R = 70, D = 24;  // 70 rows: two 64-row chunks for the dgamma/dbeta partial sums
    size_t n = (size_t)R * D;
    LnCtx c = {fbuf(n), fbuf(D), fbuf(D), fbuf(n), fbuf(R), fbuf(R), fbuf(n), R, D};
    fill_normal(c.x, n, 1.5, 51);
    for (int r = 0; r < R; r++)  // per-row offsets, so that the mean term matters
        for (int i = 0; i < D; i++) c.x[(size_t)r * D + i] += (float)(0.1 * (r % 7) - 0.3);
    fill_normal(c.gamma, D, 1.0, 52);
    fill_normal(c.beta, D, 1.0, 53);
    fill_normal(c.R, n, 1.0, 54);
    TEST_CASE("layernorm_fwd: biased variance, eps 1e-5, saves mean and rstd, against fp64") {
        ln_loss(&c);
        double ey = 0.0, em = 0.0, er = 0.0;
        for (int r = 0; r < R; r++) {
            const float *xr = c.x + (size_t)r * D;
            double m = 0.0, v = 0.0;
            for (int i = 0; i < D; i++) m += xr[i];
            m /= D;
            for (int i = 0; i < D; i++) v += (xr[i] - m) * (xr[i] - m);
            v /= D;
            double rs = 1.0 / sqrt(v + 1e-5);
            em = fmax(em, fabs(c.mean[r] - m));
            er = fmax(er, fabs(c.rstd[r] - rs) / rs);
            for (int i = 0; i < D; i++)
                ey = fmax(ey, fabs(c.y[(size_t)r * D + i] - ((xr[i] - m) * rs * c.gamma[i] + c.beta[i])));
        }
        printf("    y max-abs err %.2e, mean %.2e, rstd rel %.2e\n", ey, em, er);
        EXPECT(ey <= 5e-6, "y max-abs err %.3g", ey);
        EXPECT(em <= 1e-6, "mean max-abs err %.3g", em);
        EXPECT(er <= 1e-6, "rstd rel err %.3g", er);
    }
    TEST_CASE("layernorm_bwd: dx +=, dgamma +=, dbeta += match finite differences") {
        float *dx = fbuf(n), *dx0 = fbuf(n), *dg = fbuf(D), *dg0 = fbuf(D), *db = fbuf(D), *db0 = fbuf(D);
        float *gx = fbuf(n), *gg = fbuf(D), *gb = fbuf(D);
        fill_normal(dx0, n, 1.0, 55);  // the residual stream's gradient already there
        fill_normal(dg0, D, 1.0, 56);
        fill_normal(db0, D, 1.0, 57);
        memcpy(dx, dx0, n * 4), memcpy(dg, dg0, D * 4), memcpy(db, db0, D * 4);
        ln_loss(&c);
        be->layernorm_bwd(be, dx, dg, db, c.R, c.x, c.mean, c.rstd, c.gamma, R, D);
        for (size_t i = 0; i < n; i++) gx[i] = dx[i] - dx0[i];
        for (int i = 0; i < D; i++) gg[i] = dg[i] - dg0[i], gb[i] = db[i] - db0[i];
        EXPECT_FD("d x (accumulated)", ln_loss, &c, c.x, gx, n, 58);
        EXPECT_FD("d gamma (accumulated)", ln_loss, &c, c.gamma, gg, D, 59);
        EXPECT_FD("d beta (accumulated)", ln_loss, &c, c.beta, gb, D, 60);
        // From zero, the same increments (so the op really adds rather than overwrites).
        float *dxz = fbuf(n), *dgz = fbuf(D), *dbz = fbuf(D);
        ln_loss(&c);
        be->layernorm_bwd(be, dxz, dgz, dbz, c.R, c.x, c.mean, c.rstd, c.gamma, R, D);
        double e = 0.0;
        for (size_t i = 0; i < n; i++) e = fmax(e, fabs((double)dx[i] - ((double)dx0[i] + dxz[i])));
        for (int i = 0; i < D; i++) e = fmax(e, fabs((double)dg[i] - ((double)dg0[i] + dgz[i])));
        for (int i = 0; i < D; i++) e = fmax(e, fabs((double)db[i] - ((double)db0[i] + dbz[i])));
        EXPECT(e <= 1e-5, "not prior + increment: max-abs %.3g", e);
        ffree(dx), ffree(dx0), ffree(dg), ffree(dg0), ffree(db), ffree(db0), ffree(gx), ffree(gg), ffree(gb);
        ffree(dxz), ffree(dgz), ffree(dbz);
    }
    ffree(c.x), ffree(c.gamma), ffree(c.beta), ffree(c.y), ffree(c.mean), ffree(c.rstd), ffree(c.R);
}

// ---------------------------------------------------------------- attention

typedef struct {
    float *qkv, *out, *saved, *bias, *rowscale, *R;
    int B, N, H, dh;
} AttnCtx;

static double attn_loss(void *c_) {
    AttnCtx *c = c_;
    be->attention_fwd(be, c->out, c->saved, c->qkv, c->bias, c->rowscale, c->B, c->N, c->H, c->dh);
    return dot_d(c->out, c->R, (size_t)c->B * c->N * c->H * c->dh);
}

// out[b, i, h dh + e] = rowscale_i sum_j softmax_j(q_i . k_j / sqrt(dh) + bias_ij) v_j[e], in fp64.
static void attn_ref(const AttnCtx *c, double *out) {
    int N = c->N, H = c->H, dh = c->dh, D = H * dh;
    double *s = malloc((size_t)N * sizeof(double));
    for (int b = 0; b < c->B; b++)
        for (int h = 0; h < H; h++)
            for (int i = 0; i < N; i++) {
                const float *q = c->qkv + ((size_t)b * N + i) * 3 * D + h * dh;
                double mx = -INFINITY, sum = 0.0;
                for (int j = 0; j < N; j++) {
                    const float *k = c->qkv + ((size_t)b * N + j) * 3 * D + D + h * dh;
                    double d = 0.0;
                    for (int e = 0; e < dh; e++) d += (double)q[e] * k[e];
                    s[j] = d / sqrt((double)dh) + (c->bias ? c->bias[(size_t)i * N + j] : 0.0);
                    mx = fmax(mx, s[j]);
                }
                for (int j = 0; j < N; j++) sum += (s[j] = exp(s[j] - mx));
                for (int e = 0; e < dh; e++) {
                    double o = 0.0;
                    for (int j = 0; j < N; j++) o += s[j] / sum * c->qkv[((size_t)b * N + j) * 3 * D + 2 * D + h * dh + e];
                    out[((size_t)b * N + i) * D + h * dh + e] = o * (c->rowscale ? c->rowscale[i] : 1.0);
                }
            }
    free(s);
}

static void test_attention_shape(int N, int H, int dh) {
    int B = 2, D = H * dh;
    size_t nq = (size_t)B * N * 3 * D, no = (size_t)B * N * D;
    float *bias = fbuf((size_t)N * N), *rowscale = fbuf(N);
    fill_normal(bias, (size_t)N * N, 1.0, 71);
    fill_uniform(rowscale, N, 0.5, 2.0, 72);
    AttnCtx c = {fbuf(nq), fbuf(no), fbuf(be->attn_saved_elems(be, B, N, H, dh)), NULL, NULL, fbuf(no), B, N, H, dh};
    fill_normal(c.qkv, nq, 1.0, 73);
    fill_normal(c.R, no, 1.0, 74);
    double *ref = malloc(no * sizeof(double));
    float *dqkv = fbuf(nq);
    for (int variant = 0; variant < 4; variant++) {
        c.bias = variant & 1 ? bias : NULL;
        c.rowscale = variant & 2 ? rowscale : NULL;
        char title[160];
        snprintf(title, sizeof title, "attention N=%d H=%d dh=%d, bias %s, rowscale %s: forward vs fp64, backward vs FD",
                 N, H, dh, c.bias ? "on" : "off", c.rowscale ? "on" : "off");
        TEST_CASE(title) {
            attn_loss(&c);
            attn_ref(&c, ref);
            double e = max_abs_diff(c.out, ref, no);
            printf("    forward max-abs err %.2e\n", e);
            EXPECT(e <= 2e-6, "forward max-abs err %.3g", e);
            fill_normal(dqkv, nq, 1e3, 75);  // garbage: must be overwritten
            be->attention_bwd(be, dqkv, c.R, c.qkv, c.saved, c.bias, c.rowscale, B, N, H, dh);
            // Per part (q, k, v) and together: a missing term in one part cannot hide behind the others.
            unsigned char *mask = malloc(nq);
            const char *names[] = {"d q", "d k", "d v"};
            for (int s = 0; s < 3; s++) {
                for (size_t i = 0; i < nq; i++) mask[i] = (int)(i % (3 * D)) / D == s;
                double rel = fd_rel_err_masked(names[s], attn_loss, &c, c.qkv, dqkv, nq, FD_H, 76 + s, mask);
                EXPECT(rel <= FD_TOL, "%s: FD rel err %.3g", names[s], rel);
            }
            free(mask);
            EXPECT_FD("d qkv (all parts)", attn_loss, &c, c.qkv, dqkv, nq, 79);
        }
    }
    free(ref);
    ffree(dqkv), ffree(bias), ffree(rowscale), ffree(c.qkv), ffree(c.out), ffree(c.saved), ffree(c.R);
}

// ---------------------------------------------------------------- dropout

static void test_dropout(void) {
    int B = 4;
    size_t per = 25000, n = (size_t)B * per;
    float p = 0.2f;
    uint64_t seed = 3407, step = 7, pos = 5;
    float *x = fbuf(n), *y = fbuf(n), *y2 = fbuf(n), *dy = fbuf(n), *dx = fbuf(n);
    fill_normal(x, n, 1.0, 81);
    for (size_t i = 0; i < n; i++)
        if (x[i] == 0.0f) x[i] = 1.0f;  // a zero input would hide the mask
    fill_normal(dy, n, 1.0, 82);
    TEST_CASE("dropout_fwd: mask from rng_counter_uniform(rng_key(seed, DROPOUT, step, first_pos + i), j) >= p") {
        be->dropout_fwd(be, y, x, B, per, p, seed, step, pos);
        size_t kept = 0, bad_mask = 0, bad_scale = 0;
        for (int b = 0; b < B; b++) {
            uint64_t key = rng_key(seed, RNG_DROPOUT, step, pos + (uint64_t)b);
            for (size_t j = 0; j < per; j++) {
                size_t i = (size_t)b * per + j;
                int keep = rng_counter_uniform(key, j) >= p;
                bad_mask += keep != (y[i] != 0.0f);
                if (keep) {
                    kept++;
                    bad_scale += fabs((double)y[i] - (double)x[i] / (1.0 - p)) > 2.4e-7 * fabs((double)x[i] / (1 - p));
                }
            }
        }
        double rate = (double)kept / n, sigma = sqrt(p * (1 - p) / n);
        printf("    keep rate %.5f (1 - p = %.1f, sigma %.1e)\n", rate, 1 - p, sigma);
        EXPECT(bad_mask == 0, "%zu elements disagree with the keyed mask", bad_mask);
        EXPECT(bad_scale == 0, "%zu survivors not scaled by 1/(1-p)", bad_scale);
        EXPECT(fabs(rate - (1 - p)) <= 5 * sigma, "keep rate %.5f", rate);
    }
    TEST_CASE("dropout: deterministic in (seed, step, first_pos); keyed per sample; changes with step and seed") {
        be->dropout_fwd(be, y, x, B, per, p, seed, step, pos);
        be->dropout_fwd(be, y2, x, B, per, p, seed, step, pos);
        EXPECT(memcmp(y, y2, n * 4) == 0, "same arguments, different output");
        // Sample b at first_pos f equals sample b + 1 at first_pos f - 1 (same input there).
        float *xs = fbuf(n);
        for (int b = 0; b < B; b++) memcpy(xs + (size_t)b * per, x, per * 4);
        be->dropout_fwd(be, y, xs, B, per, p, seed, step, pos);
        be->dropout_fwd(be, y2, xs, B, per, p, seed, step, pos - 1);
        EXPECT(memcmp(y, y2 + per, (size_t)(B - 1) * per * 4) == 0, "mask not keyed by first_pos + i");
        EXPECT(memcmp(y, y + per, per * 4) != 0, "two samples share a mask");
        be->dropout_fwd(be, y2, xs, B, per, p, seed, step + 1, pos);
        EXPECT(memcmp(y, y2, per * 4) != 0, "mask does not change with the step");
        be->dropout_fwd(be, y2, xs, B, per, p, seed + 1, step, pos);
        EXPECT(memcmp(y, y2, per * 4) != 0, "mask does not change with the seed");
        ffree(xs);
    }
    TEST_CASE("dropout_bwd: the same mask and scale as the forward (the transpose of a diagonal op)") {
        be->dropout_fwd(be, y, x, B, per, p, seed, step, pos);
        be->dropout_bwd(be, dx, dy, B, per, p, seed, step, pos);
        size_t bad = 0;
        for (size_t i = 0; i < n; i++) {
            double want = y[i] != 0.0f ? (double)dy[i] / (1.0 - p) : 0.0;
            bad += fabs(dx[i] - want) > 2.4e-7 * fabs(want);
        }
        EXPECT(bad == 0, "%zu gradient elements disagree with the forward mask", bad);
        double lhs = dot_d(y, dy, n), rhs = dot_d(x, dx, n);  // <D x, dy> = <x, D dy> up to fp32 rounding of both
        EXPECT_REL(lhs, rhs, 1e-6);
        float *dd = fbuf(n);  // in place, as the model calls it
        memcpy(dd, dy, n * 4);
        be->dropout_bwd(be, dd, dd, B, per, p, seed, step, pos);
        EXPECT(memcmp(dd, dx, n * 4) == 0, "in-place backward differs");
        ffree(dd);
    }
    ffree(x), ffree(y), ffree(y2), ffree(dy), ffree(dx);
}

// ---------------------------------------------------------------- meanpool

typedef struct {
    float *x, *pooled, *R;
    int B, N, D;
} PoolCtx;

static double pool_loss(void *c_) {
    PoolCtx *c = c_;
    be->meanpool_fwd(be, c->pooled, c->x, c->B, c->N, c->D);
    return dot_d(c->pooled, c->R, (size_t)c->B * c->D);
}

static void test_meanpool(void) {
    int B = 3, N = 17, D = 10;
    size_t n = (size_t)B * N * D;
    PoolCtx c = {fbuf(n), fbuf((size_t)B * D), fbuf((size_t)B * D), B, N, D};
    fill_normal(c.x, n, 1.0, 91);
    fill_normal(c.R, (size_t)B * D, 1.0, 92);
    TEST_CASE("meanpool_fwd: mean over tokens against fp64") {
        pool_loss(&c);
        double e = 0.0;
        for (int b = 0; b < B; b++)
            for (int d = 0; d < D; d++) {
                double s = 0.0;
                for (int i = 0; i < N; i++) s += c.x[((size_t)b * N + i) * D + d];
                e = fmax(e, fabs(c.pooled[(size_t)b * D + d] - s / N));
            }
        EXPECT(e <= 1e-6, "max-abs err %.3g", e);
    }
    TEST_CASE("meanpool_bwd: dx = dpooled / N (overwritten) matches finite differences") {
        float *dx = fbuf(n);
        fill_normal(dx, n, 1e3, 93);
        be->meanpool_bwd(be, dx, c.R, B, N, D);
        EXPECT_FD("d x", pool_loss, &c, c.x, dx, n, 94);
        double e = 0.0;
        for (int b = 0; b < B; b++)
            for (int i = 0; i < N; i++)
                for (int d = 0; d < D; d++)
                    e = fmax(e, fabs(dx[((size_t)b * N + i) * D + d] - (double)c.R[(size_t)b * D + d] / N));
        EXPECT(e <= 1e-7, "max-abs err %.3g", e);
        ffree(dx);
    }
    ffree(c.x), ffree(c.pooled), ffree(c.R);
}

// ---------------------------------------------------------------- cross-entropy

typedef struct {
    float *z, *t, *losses;
    int B, C;
    float eps;
} XentCtx;

static double xent_loss(void *c_) {
    XentCtx *c = c_;
    be->xent_fwd_bwd(be, c->losses, NULL, c->z, c->t, c->B, c->C, c->eps, 1.0f);
    double s = 0.0;
    for (int b = 0; b < c->B; b++) s += c->losses[b];
    return s;
}

static double xent_example(const float *z, const float *t, float eps) {
    float loss, dl[3];
    be->xent_fwd_bwd(be, &loss, dl, z, t, 1, 3, eps, 1.0f);
    return loss;
}

static void test_xent(void) {
    TEST_CASE("xent: spec §12.2 examples (z = (2, 0, -1); hard label 0 and the lambda = 0.3 mixup of 0 and 1)") {
        float z[3] = {2, 0, -1}, hard[3] = {1, 0, 0}, mixed[3] = {0.7f, 0.3f, 0};
        double l1 = xent_example(z, hard, 0.1f), l0 = xent_example(z, hard, 0.0f);
        double m0 = xent_example(z, mixed, 0.0f), m1 = xent_example(z, mixed, 0.1f);
        printf("    %.7f %.7f %.7f %.7f\n", l1, l0, m0, m1);
        EXPECT_NEAR(l1, 0.3365127, 1e-6);
        EXPECT_NEAR(l0, 0.1698460, 1e-6);
        EXPECT_NEAR(m0, 0.7698460, 1e-6);
        EXPECT_NEAR(m1, 0.8765127, 1e-6);
    }
    int B = 5, C = 7;
    XentCtx c = {fbuf((size_t)B * C), fbuf((size_t)B * C), fbuf(B), B, C, 0.1f};
    fill_normal(c.z, (size_t)B * C, 2.0, 101);
    fill_uniform(c.t, (size_t)B * C, 0.0, 1.0, 102);
    for (int b = 0; b < B; b++) {  // soft targets summing to 1
        double s = 0.0;
        for (int k = 0; k < C; k++) s += c.t[b * C + k];
        for (int k = 0; k < C; k++) c.t[b * C + k] = (float)(c.t[b * C + k] / s);
    }
    TEST_CASE("xent: soft targets with smoothing: losses and dlogits = grad_scale (softmax - t') against fp64") {
        float *dl = fbuf((size_t)B * C);
        float gs = 0.25f;
        be->xent_fwd_bwd(be, c.losses, dl, c.z, c.t, B, C, c.eps, gs);
        double el = 0.0, eg = 0.0;
        for (int b = 0; b < B; b++) {
            const float *z = c.z + b * C;
            double mx = -INFINITY, s = 0.0, loss = 0.0;
            for (int k = 0; k < C; k++) mx = fmax(mx, z[k]);
            for (int k = 0; k < C; k++) s += exp(z[k] - mx);
            double lse = mx + log(s);
            for (int k = 0; k < C; k++) {
                double tk = (1 - 0.1) * c.t[b * C + k] + 0.1 / C;
                loss -= tk * (z[k] - lse);
                eg = fmax(eg, fabs(dl[b * C + k] - gs * (exp(z[k] - lse) - tk)));
            }
            el = fmax(el, fabs(c.losses[b] - loss) / loss);
        }
        EXPECT(el <= 2e-7, "loss rel err %.3g", el);
        EXPECT(eg <= 1e-7, "dlogits max-abs err %.3g", eg);
        // The gradient itself against finite differences of the summed loss (grad_scale 1).
        be->xent_fwd_bwd(be, c.losses, dl, c.z, c.t, B, C, c.eps, 1.0f);
        EXPECT_FD("d logits (smoothing 0.1)", xent_loss, &c, c.z, dl, (size_t)B * C, 103);
        c.eps = 0.0f;
        be->xent_fwd_bwd(be, c.losses, dl, c.z, c.t, B, C, c.eps, 1.0f);
        EXPECT_FD("d logits (no smoothing)", xent_loss, &c, c.z, dl, (size_t)B * C, 104);
        c.eps = 0.1f;
        ffree(dl);
    }
    ffree(c.z), ffree(c.t), ffree(c.losses);
}

// ---------------------------------------------------------------- optimizer ops

static void test_sumsq(void) {
    TEST_CASE("sumsq: sum of squares in fp64 over several 4096-element chunks") {
        size_t sizes[] = {1, 4096, 10007};
        for (int k = 0; k < 3; k++) {
            size_t n = sizes[k];
            float *x = fbuf(n);
            fill_normal(x, n, 3.0, 111 + k);
            double want = 0.0;
            for (size_t i = 0; i < n; i++) want += (double)x[i] * x[i];
            double got = be->sumsq(be, x, n);
            EXPECT_REL(got, want, 1e-12);
            ffree(x);
        }
    }
}

// One Adam step of spec §12.5 in fp64 for one element (g already multiplied by nothing: grad_scale is applied here).
static void adam_ref(double *w, double *m, double *v, double g, const AdamArgs *a) {
    g *= a->grad_scale;
    if (a->decoupled)
        *w *= 1.0 - (double)a->lr * a->weight_decay;
    else
        g += (double)a->weight_decay * *w;
    *m = a->beta1 * *m + (1.0 - a->beta1) * g;
    *v = a->beta2 * *v + (1.0 - a->beta2) * g * g;
    double mh = *m / (1.0 - pow(a->beta1, (double)a->t)), vh = *v / (1.0 - pow(a->beta2, (double)a->t));
    *w -= a->lr * mh / (sqrt(vh) + a->eps);
}

static void test_adam(void) {
    size_t n = 2000;
    for (int decoupled = 0; decoupled < 2; decoupled++) {
        char title[128];
        snprintf(title, sizeof title, "adam_step (%s weight decay): 6 steps against a scalar fp64 reference",
                 decoupled ? "decoupled" : "L2");
        TEST_CASE(title) {
            float *w = fbuf(n), *g = fbuf(n), *m = fbuf(n), *v = fbuf(n);
            fill_normal(w, n, 1.0, 121);
            AdamArgs a = {.lr = 1e-2f, .beta1 = 0.9f, .beta2 = 0.999f, .eps = 1e-8f, .weight_decay = 0.1f,
                          .decoupled = decoupled, .t = 0, .grad_scale = 0.5f};
            double worst_w = 0.0, worst_mv = 0.0;
            for (int step = 1; step <= 6; step++) {
                a.t = step == 6 ? 1000 : step;  // also a late step: bias corrections near 1 - 0.999^1000
                fill_normal(g, n, step == 3 ? 1e-3 : 1.0, 122 + step);
                float *w0 = malloc(n * 4), *m0 = malloc(n * 4), *v0 = malloc(n * 4);
                memcpy(w0, w, n * 4), memcpy(m0, m, n * 4), memcpy(v0, v, n * 4);
                be->adam_step(be, w, g, m, v, n, &a);
                for (size_t i = 0; i < n; i++) {
                    double wd = w0[i], md = m0[i], vd = v0[i];
                    adam_ref(&wd, &md, &vd, g[i], &a);
                    double upd = fabs(wd - w0[i]);
                    // fp32 storage of w (1 ulp ~ 1.2e-7 |w|) plus fp32 arithmetic in the update (1e-5 of it).
                    double tol_w = 2.4e-7 * fabs(wd) + 1e-5 * upd + 1e-12;
                    worst_w = fmax(worst_w, fabs(w[i] - wd) / tol_w);
                    EXPECT(fabs(w[i] - wd) <= tol_w, "step %d element %zu: w %.9g want %.9g (update %.3g)", step, i,
                           w[i], wd, upd);
                    // m and v relative to the size of their terms (b1 m and (1 - b1) g can nearly cancel).
                    // So is g' = g gs + wd w in the L2 mode: scale by the sizes of the terms.
                    double gi = fabs((double)g[i] * a.grad_scale) + (decoupled ? 0.0 : fabs(a.weight_decay * w0[i]));
                    double em = fabs(m[i] - md) / (a.beta1 * fabs(m0[i]) + (1 - a.beta1) * gi + 1e-30);
                    double ev = fabs(v[i] - vd) / (a.beta2 * v0[i] + (1 - a.beta2) * gi * gi + 1e-30);
                    worst_mv = fmax(worst_mv, fmax(em, ev));
                    EXPECT(em <= 1e-6 && ev <= 1e-6, "step %d element %zu: m rel %.3g, v rel %.3g", step, i, em, ev);
                    if (tl_state.case_failures > 10) break;
                }
                free(w0), free(m0), free(v0);
            }
            printf("    worst w error / tolerance %.2f, worst m, v rel err %.2e\n", worst_w, worst_mv);
            ffree(w), ffree(g), ffree(m), ffree(v);
        }
    }
    TEST_CASE("adam_step: with weight_decay 0, L2 and decoupled modes are bitwise identical") {
        float *w[2], *m[2], *v[2], *g = fbuf(n);
        for (int k = 0; k < 2; k++) {
            w[k] = fbuf(n), m[k] = fbuf(n), v[k] = fbuf(n);
            fill_normal(w[k], n, 1.0, 131);
        }
        for (int step = 1; step <= 3; step++) {
            fill_normal(g, n, 1.0, 132 + step);
            for (int k = 0; k < 2; k++) {
                AdamArgs a = {.lr = 1e-2f, .beta1 = 0.9f, .beta2 = 0.999f, .eps = 1e-8f, .weight_decay = 0.0f,
                              .decoupled = k, .t = step, .grad_scale = 0.7f};
                be->adam_step(be, w[k], g, m[k], v[k], n, &a);
            }
        }
        EXPECT(memcmp(w[0], w[1], n * 4) == 0, "weights differ");
        EXPECT(memcmp(m[0], m[1], n * 4) == 0 && memcmp(v[0], v[1], n * 4) == 0, "moments differ");
        for (int k = 0; k < 2; k++) ffree(w[k]), ffree(m[k]), ffree(v[k]);
        ffree(g);
    }
}

static void test_blas1(void) {
    size_t n = 5003;
    float *x = fbuf(n), *y = fbuf(n), *y0 = fbuf(n);
    fill_normal(x, n, 1.0, 141);
    fill_normal(y0, n, 1.0, 142);
    TEST_CASE("scale, axpy, ema_update: elementwise against fp64") {
        double es = 0.0, ea = 0.0, ee = 0.0;
        memcpy(y, y0, n * 4);
        be->scale(be, y, n, 0.37f);
        for (size_t i = 0; i < n; i++) es = fmax(es, fabs(y[i] - 0.37f * (double)y0[i]) / fabs(0.37 * y0[i]));
        memcpy(y, y0, n * 4);
        be->axpy(be, y, x, n, -1.7f);
        for (size_t i = 0; i < n; i++) ea = fmax(ea, fabs(y[i] - (y0[i] + (double)-1.7f * x[i])));
        memcpy(y, y0, n * 4);
        be->ema_update(be, y, x, n, 0.99f);
        for (size_t i = 0; i < n; i++)
            ee = fmax(ee, fabs(y[i] - ((double)0.99f * y0[i] + (1.0 - (double)0.99f) * x[i])));
        printf("    scale rel %.2e, axpy abs %.2e, ema abs %.2e\n", es, ea, ee);
        EXPECT(es <= 1.2e-7, "scale rel err %.3g", es);
        EXPECT(ea <= 1e-6, "axpy max-abs err %.3g", ea);
        EXPECT(ee <= 5e-7, "ema max-abs err %.3g", ee);
        // ema with decay 1 keeps ema; decay 0 copies w.
        memcpy(y, y0, n * 4);
        be->ema_update(be, y, x, n, 1.0f);
        EXPECT(memcmp(y, y0, n * 4) == 0, "decay 1 changed the EMA");
        be->ema_update(be, y, x, n, 0.0f);
        EXPECT(memcmp(y, x, n * 4) == 0, "decay 0 did not copy w");
    }
    ffree(x), ffree(y), ffree(y0);
}

static void test_signal_stats(void) {
    TEST_CASE("signal_stats: mean square and mean pairwise token cosine against a direct fp64 computation") {
        int B = 3, N = 9, D = 16;
        size_t n = (size_t)B * N * D;
        float *x = fbuf(n), *common = fbuf((size_t)B * D);
        fill_normal(x, n, 1.0, 151);
        fill_normal(common, (size_t)B * D, 1.0, 152);
        for (int b = 0; b < B; b++)  // a shared component per image: cosines around 0.3-0.6, not ~0
            for (int i = 0; i < N; i++)
                for (int d = 0; d < D; d++) x[((size_t)b * N + i) * D + d] += (0.5f + 0.3f * b) * common[b * D + d];
        double ms = 0.0, mc = 0.0;
        be->signal_stats(be, x, B, N, D, &ms, &mc);
        double want_sq = 0.0, want_cos = 0.0;
        for (size_t i = 0; i < n; i++) want_sq += (double)x[i] * x[i];
        want_sq /= n;
        for (int b = 0; b < B; b++) {
            double s = 0.0;
            for (int i = 0; i < N; i++)
                for (int j = 0; j < N; j++) {
                    if (i == j) continue;
                    const float *a = x + ((size_t)b * N + i) * D, *c = x + ((size_t)b * N + j) * D;
                    s += dot_d(a, c, D) / sqrt(dot_d(a, a, D) * dot_d(c, c, D));
                }
            want_cos += s / (N * (N - 1.0));
        }
        want_cos /= B;
        printf("    mean_sq %.12f (want %.12f), mean_cos %.12f (want %.12f)\n", ms, want_sq, mc, want_cos);
        EXPECT_REL(ms, want_sq, 1e-12);
        EXPECT_REL(mc, want_cos, 1e-10);
        ffree(x), ffree(common);
    }
}

int main(void) {
    be = backend_cpu_create(0);
    test_patch_unfold();
    test_matmul();
    test_add_ops();
    test_trelu();
    test_gelu();
    test_layernorm();
    test_attention_shape(7, 2, 4);
    test_attention_shape(17, 3, 8);
    test_dropout();
    test_meanpool();
    test_xent();
    test_sumsq();
    test_adam();
    test_blas1();
    test_signal_stats();
    be->destroy(be);
    return tl_finish();
}
