// test_model.c: whole-model checks on the CPU backend.
//   (a) Finite-difference directional derivatives of the full training loss (soft targets, label smoothing 0.1,
//       dropout p = 0.2 in train mode) with respect to all parameters together and to every trainable tensor on its
//       own, for tiny models of both archs, both modes, with and without the SimplEsT biases.
//   (b) The init, parameter-count, key, posemb, token-order, decay-set and weights-file facts of spec/model.md §14
//       (12-17, 21, 22, 24) and the weights_load rejections of §11.
// Debugging knobs: FD_VERBOSE=1 prints every finite-difference check; FD_CASE=substring runs only matching (a) cases.
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cblas.h>

#include "backend.h"
#include "checkpoint.h"
#include "model.h"
#include "optim.h"
#include "rng.h"
#include "safetensors.h"
#include "testlib.h"

static Backend *be;

static void fill_normal(float *x, size_t n, double std, uint64_t seed) {
    Rng r = rng_stream(seed, 0x7E57, 11, 0);
    for (size_t i = 0; i < n; i++) x[i] = (float)(std * rng_normal(&r));
}

static ModelConfig tiny_config(Arch arch, int seed_compat, int bias, float drop_p) {
    ModelConfig c;
    memset(&c, 0, sizeof c);
    c.arch = arch;
    c.image_size = 8;
    c.patch_size = 4;  // 2 x 2 grid: N = 4 tokens (few TReLU units, so kink-free directions are easy to find)
    c.channels = 3;
    c.num_classes = 5;
    c.dim = 8;
    c.heads = 2;
    c.mlp_dim = 4 * c.dim;
    c.depth = arch == ARCH_SIMPLEST ? 7 : 2;  // 7: the smallest depth at which eta = 0.9 is achievable
    c.eta = 0.9;
    c.gamma_L = 0.005;
    c.qkv_bias = c.mlp_bias = bias;
    c.drop_p = drop_p;
    c.seed_compat = seed_compat;
    return c;
}

static ModelConfig preset_config(Arch arch, int seed_compat, int D, int H, int depth, int image, int patch, int C) {
    ModelConfig c;
    memset(&c, 0, sizeof c);
    c.arch = arch;
    c.image_size = image;
    c.patch_size = patch;
    c.channels = 3;
    c.num_classes = C;
    c.dim = D;
    c.heads = H;
    c.mlp_dim = 4 * D;
    c.depth = depth;
    c.eta = 0.9;
    c.gamma_L = 0.005;
    c.qkv_bias = c.mlp_bias = 1;
    c.seed_compat = seed_compat;
    return c;
}

// ================================================================ (a) gradients

#define FD_SEED 77
#define FD_STEP 3
#define FD_POS 5

// Mean training loss of the current params on the batch already in m->input / m->targets.
static double model_mean_loss(Model *m, int B) {
    model_forward(m, B, 1, FD_SEED, FD_STEP, FD_POS);
    model_loss(m, B, 0.1f, 1.0f / B, 0);
    double s = 0.0;
    for (int i = 0; i < B; i++) s += m->losses[i];
    return s / B;
}

// Moves every trainable tensor off its init (W_q = 0 and zero biases are special points) to a generic state.
static void perturb_params(Model *m) {
    for (int i = 0; i < m->ntensors; i++) {
        const TensorInfo *t = &m->tensors[i];
        if (!t->trainable) continue;
        float *p = m->params + t->offset;
        double ss = 0.0;
        for (size_t j = 0; j < t->numel; j++) ss += (double)p[j] * p[j];
        double rms = sqrt(ss / t->numel);
        float *noise = malloc(t->numel * sizeof(float));
        fill_normal(noise, t->numel, rms > 0 ? 0.3 * rms : 0.1, 1000 + i);
        if (m->cfg.arch == ARCH_SIMPLEST && strstr(t->name, "to_qkv.weight"))  // W_q rows, zero at init
            fill_normal(noise, (size_t)m->cfg.dim * m->cfg.dim, 0.5 / sqrt((double)m->cfg.dim), 2000 + i);
        for (size_t j = 0; j < t->numel; j++) p[j] += noise[j];
        free(noise);
    }
}

static double tensor_rms(const Model *m, const TensorInfo *t) {
    double ss = 0.0;
    for (size_t j = 0; j < t->numel; j++) ss += (double)m->params[t->offset + j] * m->params[t->offset + j];
    return sqrt(ss / t->numel);
}

// Signs of every TReLU output of the last forward (SimplEsT): the loss is smooth between two parameter points with
// the same pattern, since TReLU is the model's only kink.
static size_t kink_units(const Model *m, int B) {
    return m->cfg.arch == ARCH_SIMPLEST ? (size_t)m->cfg.depth * B * m->N * (m->cfg.mlp_dim + m->cfg.dim) : 0;
}

static void kink_signs(const Model *m, int B, unsigned char *sg) {
    if (m->cfg.arch != ARCH_SIMPLEST) return;
    size_t R = (size_t)B * m->N, k = 0;
    for (int l = 0; l < m->cfg.depth; l++) {
        const float *f = m->acts[l].fc1, *o = m->acts[l].out;
        for (size_t i = 0; i < R * m->cfg.mlp_dim; i++) sg[k++] = f[i] > 0.0f;
        for (size_t i = 0; i < R * m->cfg.dim; i++) sg[k++] = o[i] > 0.0f;
    }
}

static size_t kink_flips(const Model *m, int B, const unsigned char *ref, unsigned char *tmp) {
    size_t n = kink_units(m, B), flips = 0;
    kink_signs(m, B, tmp);
    for (size_t i = 0; i < n; i++) flips += tmp[i] != ref[i];
    return flips;
}

typedef struct {
    Model *m;
    int B;
    const float *grad;        // analytic gradient of the mean loss at the base point
    const float *scale;       // per-parameter direction scale (the tensor's RMS)
    const unsigned char *ref;  // kink signs at the base point
    unsigned char *tmp;
} FdSetup;

// Central difference of the mean loss along a random direction (seeded, restricted to [begin, end) of params)
// against <grad, w+ - w->. Returns the relative error; *flips counts TReLU units whose sign differs at w+ or w-.
static double model_fd(const FdSetup *s, size_t begin, size_t end, double h, uint64_t seed, double *fd_out,
                       double *an_out, size_t *flips) {
    Model *m = s->m;
    size_t n = end - begin;
    float *w0 = malloc(n * sizeof(float)), *wp = malloc(n * sizeof(float)), *v = malloc(n * sizeof(float));
    float *w = m->params + begin;
    fill_normal(v, n, 1.0, seed);
    for (size_t i = 0; i < n; i++) v[i] *= s->scale[begin + i];
    memcpy(w0, w, n * sizeof(float));
    for (size_t i = 0; i < n; i++) w[i] = (float)(w0[i] + h * v[i]);
    memcpy(wp, w, n * sizeof(float));
    double lp = model_mean_loss(m, s->B);
    *flips = kink_flips(m, s->B, s->ref, s->tmp);
    for (size_t i = 0; i < n; i++) w[i] = (float)(w0[i] - h * v[i]);
    double lm = model_mean_loss(m, s->B);
    *flips += kink_flips(m, s->B, s->ref, s->tmp);
    double an = 0.0;
    for (size_t i = 0; i < n; i++) an += (double)s->grad[begin + i] * ((double)wp[i] - w[i]);
    memcpy(w, w0, n * sizeof(float));
    free(w0), free(wp), free(v);
    *fd_out = (lp - lm) / (2 * h);
    *an_out = an / (2 * h);
    return fabs((lp - lm) - an) / fabs(an);
}

// Tolerances and steps (fp32 forward; measured errors are printed):
//   The fp32 forward makes the loss a noisy function of the weights: loss_noise() measures the rms deviation sigma
//   of the loss from a quadratic along a line, on a 1e-7 scale (3e-8 to 7e-7 for these models). The central
//   difference then carries a rounding error of about sqrt(2) sigma / (2 h |derivative|) relative.
//   A check passes when its relative error is at most max(1e-3, 6 x that noise term), sigma being the largest of
//   three directions. 1e-3 is far above the O(h^2) truncation error at these steps (1e-5 to 1e-4) and far below
//   what a wrong or missing gradient term gives (O(1) for the affected tensor). The noise term only matters for
//   directions with a tiny derivative (a few bias vectors); every tolerance used is printed when FD_VERBOSE is set.
//   Steps: h times each tensor's RMS per element, h = 3e-3 first, then 1e-3, 3e-4, 1e-4.
//   SimplEsT's TReLU makes the loss piecewise smooth; a step that crosses a kink has an error unrelated to the
//   gradient. So a SimplEsT check only counts a direction along which no TReLU unit changes sign at w +- h v (the
//   loss is then smooth on the segment); it draws up to FD_TRIES directions per step size, then a smaller step.
#define FD_TOL_MODEL 1e-3
#define FD_NOISE_SIGMAS 6.0
#define FD_TRIES 10
static const double fd_steps[] = {3e-3, 1e-3, 3e-4, 1e-4};

// rms deviation of the loss from its quadratic fit over 41 points w + t v, |t| <= 2e-6 relative to the RMS: steps of
// about one ulp of the weights, too small to cross TReLU kinks, so what remains is the fp32 rounding of the loss.
static double loss_noise(const FdSetup *s, uint64_t seed) {
    Model *m = s->m;
    size_t n = m->num_params;
    float *w0 = malloc(n * sizeof(float)), *v = malloc(n * sizeof(float));
    memcpy(w0, m->params, n * sizeof(float));
    fill_normal(v, n, 1.0, seed);
    enum { K = 41 };
    double x[K], L[K], S[5] = {0}, T[3] = {0};
    for (int k = 0; k < K; k++) {
        x[k] = k - 20;
        for (size_t i = 0; i < n; i++) m->params[i] = (float)(w0[i] + 1e-7 * x[k] * v[i] * s->scale[i]);
        L[k] = model_mean_loss(m, s->B);
        double p = 1.0;
        for (int j = 0; j < 5; j++) S[j] += p, p *= x[k];
        T[0] += L[k], T[1] += L[k] * x[k], T[2] += L[k] * x[k] * x[k];
    }
    memcpy(m->params, w0, n * sizeof(float));
    // Least squares c0 + c1 x + c2 x^2 (normal equations, Gaussian elimination).
    double A[3][4] = {{S[0], S[1], S[2], T[0]}, {S[1], S[2], S[3], T[1]}, {S[2], S[3], S[4], T[2]}}, c[3];
    for (int i = 0; i < 3; i++)
        for (int j = i + 1; j < 3; j++) {
            double f = A[j][i] / A[i][i];
            for (int k = i; k < 4; k++) A[j][k] -= f * A[i][k];
        }
    for (int i = 2; i >= 0; i--) {
        double r = A[i][3];
        for (int k = i + 1; k < 3; k++) r -= A[i][k] * c[k];
        c[i] = r / A[i][i];
    }
    double ss = 0.0;
    for (int k = 0; k < K; k++) {
        double e = L[k] - (c[0] + c[1] * x[k] + c[2] * x[k] * x[k]);
        ss += e * e;
    }
    free(w0), free(v);
    return sqrt(ss / K);
}

typedef struct {
    double err, tol, fd, an, h;
    int draws;  // directions drawn in all
    int found;  // a kink-free direction was found
} FdResult;

// One directional check over [begin, end) of params: smooth segment (kink-free for SimplEsT), noise-aware tolerance.
static FdResult fd_check(const FdSetup *s, size_t begin, size_t end, uint64_t seed, double sigma) {
    FdResult r = {0};
    for (size_t hi = 0; hi < sizeof fd_steps / sizeof fd_steps[0]; hi++)
        for (int t = 0; t < FD_TRIES; t++) {
            size_t flips;
            r.h = fd_steps[hi];
            r.err = model_fd(s, begin, end, r.h, seed * 1000 + r.draws, &r.fd, &r.an, &flips);
            r.draws++;
            if (flips == 0) {
                r.found = 1;
                r.tol = fmax(FD_TOL_MODEL, FD_NOISE_SIGMAS * sqrt(2.0) * sigma / (2 * r.h * fabs(r.an)));
                return r;
            }
        }
    return r;
}

static void check_model_grads(const char *label, ModelConfig mc, int B) {
    if (getenv("FD_CASE") && !strstr(label, getenv("FD_CASE"))) return;
    Model *m = model_create(&mc, be, B);
    model_init(m, 11);
    perturb_params(m);
    size_t img = (size_t)mc.channels * mc.image_size * mc.image_size;
    fill_normal(m->input, B * img, 1.0, 21);
    Rng r = rng_stream(22, 0x7E57, 12, 0);
    for (int b = 0; b < B; b++) {  // soft targets summing to 1
        double s = 0.0;
        for (int c = 0; c < mc.num_classes; c++) s += (m->targets[b * mc.num_classes + c] = (float)rng_uniform(&r));
        for (int c = 0; c < mc.num_classes; c++) m->targets[b * mc.num_classes + c] /= (float)s;
    }
    // Analytic gradient of the mean loss (grad_scale 1/B), and the kink pattern at the base point.
    model_zero_grad(m);
    model_forward(m, B, 1, FD_SEED, FD_STEP, FD_POS);
    model_loss(m, B, 0.1f, 1.0f / B, 1);
    model_backward(m, B, FD_SEED, FD_STEP, FD_POS);
    size_t nk = kink_units(m, B);
    unsigned char *ref = malloc(nk + 1), *tmp = malloc(nk + 1);
    kink_signs(m, B, ref);
    float *grad = malloc(m->num_params * sizeof(float)), *scale = malloc(m->num_params * sizeof(float));
    memcpy(grad, m->grads, m->num_params * sizeof(float));
    for (int i = 0; i < m->ntensors; i++) {
        const TensorInfo *t = &m->tensors[i];
        if (!t->trainable) continue;
        double rms = tensor_rms(m, t);
        for (size_t j = 0; j < t->numel; j++) scale[t->offset + j] = (float)rms;
    }
    FdSetup s = {m, B, grad, scale, ref, tmp};
    char title[200];
    snprintf(title, sizeof title, "%s: FD directional derivative of the loss along all %zu parameters", label,
             m->num_params);
    double sigma = 0.0;  // the largest of three directions
    for (int k = 0; k < 3; k++) sigma = fmax(sigma, loss_noise(&s, 900 + k));
    TEST_CASE(title) {
        printf("    loss %.7f, fp32 noise of the loss %.2e\n", model_mean_loss(m, B), sigma);
        for (int k = 0; k < 3; k++) {
            FdResult r = fd_check(&s, 0, m->num_params, 31 + k, sigma);
            printf("    direction %d: FD %.9g vs analytic %.9g: rel err %.2e (tol %.1e; h %.0e, %d draws)\n", k, r.fd,
                   r.an, r.err, r.tol, r.h, r.draws);
            EXPECT(r.found, "no kink-free direction in %d draws", r.draws);
            EXPECT(r.err <= r.tol, "rel err %.3g (tol %.3g)", r.err, r.tol);
        }
        if (mc.drop_p > 0) {  // dropout is really on: the eval-mode loss differs
            double train_loss = model_mean_loss(m, B);
            model_forward(m, B, 0, FD_SEED, FD_STEP, FD_POS);
            model_loss(m, B, 0.1f, 1.0f / B, 0);
            double eval_loss = 0.0;
            for (int i = 0; i < B; i++) eval_loss += m->losses[i] / B;
            EXPECT(fabs(train_loss - eval_loss) > 1e-4, "dropout had no effect on the loss");
        }
    }
    snprintf(title, sizeof title, "%s: FD directional derivative along each trainable tensor", label);
    TEST_CASE(title) {
        double worst = 0.0, max_tol = 0.0;
        const char *worst_name = "";
        int checked = 0, max_draws = 0;
        for (int i = 0; i < m->ntensors; i++) {
            const TensorInfo *t = &m->tensors[i];
            if (!t->trainable) continue;
            FdResult r = fd_check(&s, t->offset, t->offset + t->numel, 100 + i, sigma);
            int key = i == m->patch_w || i == m->head_w || i == m->blocks[0].qkv_w;
            if (getenv("FD_VERBOSE") || key || r.err > r.tol || !r.found)
                printf("    %-45s FD %.9g vs analytic %.9g: rel err %.2e (tol %.1e; h %.0e, %d draws)\n", t->name,
                       r.fd, r.an, r.err, r.tol, r.h, r.draws);
            EXPECT(r.found, "%s: no kink-free direction in %d draws", t->name, r.draws);
            EXPECT(r.err <= r.tol, "%s: rel err %.3g (tol %.3g)", t->name, r.err, r.tol);
            if (r.err / r.tol > worst) worst = r.err / r.tol, worst_name = t->name;
            if (r.draws > max_draws) max_draws = r.draws;
            max_tol = fmax(max_tol, r.tol);
            checked++;
        }
        printf("    %d tensors, worst rel err / tol %.2f (%s); largest tol %.1e; at most %d draws for a smooth "
               "direction\n", checked, worst, worst_name, max_tol, max_draws);
    }
    free(grad), free(scale), free(ref), free(tmp);
    model_free(m);
}

static void test_gradients(void) {
    int B = 2;
    check_model_grads("SimplEsT default, biases, dropout 0.2", tiny_config(ARCH_SIMPLEST, 0, 1, 0.2f), B);
    check_model_grads("SimplEsT seed_compat, biases, dropout 0.2", tiny_config(ARCH_SIMPLEST, 1, 1, 0.2f), B);
    check_model_grads("SimplEsT default, no biases, dropout 0.2", tiny_config(ARCH_SIMPLEST, 0, 0, 0.2f), B);
    check_model_grads("SimplEsT seed_compat, no biases, dropout 0.2", tiny_config(ARCH_SIMPLEST, 1, 0, 0.2f), B);
    check_model_grads("SimplEsT default, biases, no dropout", tiny_config(ARCH_SIMPLEST, 0, 1, 0.0f), B);
    check_model_grads("SimpleViT default, dropout 0.2", tiny_config(ARCH_SIMPLEVIT, 0, 1, 0.2f), B);
    check_model_grads("SimpleViT seed_compat, dropout 0.2", tiny_config(ARCH_SIMPLEVIT, 1, 1, 0.2f), B);
}

// ================================================================ (b) init facts (§8, §14 facts 12-14)

// The S preset at depth 7 (the smallest depth TAT allows for eta 0.9), image 32, patch 4: every init identity holds
// per layer, so 7 layers stand for 12 at half the QR work.
static void gram(const float *W, int rows, int cols, int transpose_first, double *G) {
    // transpose_first: G = W^T W (cols x cols); else G = W W^T (rows x rows). In fp64.
    size_t n = (size_t)rows * cols;
    double *Wd = malloc(n * sizeof(double));
    for (size_t i = 0; i < n; i++) Wd[i] = W[i];
    if (transpose_first)
        cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, cols, rows, 1.0, Wd, cols, 0.0, G, cols);
    else
        cblas_dsyrk(CblasRowMajor, CblasUpper, CblasNoTrans, rows, cols, 1.0, Wd, cols, 0.0, G, rows);
    free(Wd);
}

// max |G - want I| over the upper triangle of the k x k Gram matrix G.
static double gram_err(const double *G, int k, double want) {
    double e = 0.0;
    for (int i = 0; i < k; i++)
        for (int j = i; j < k; j++) e = fmax(e, fabs(G[(size_t)i * k + j] - (i == j ? want : 0.0)));
    return e;
}

static double sample_std(const float *x, size_t n, double *mean_out) {
    double s = 0.0, ss = 0.0;
    for (size_t i = 0; i < n; i++) s += x[i];
    double mean = s / n;
    for (size_t i = 0; i < n; i++) ss += (x[i] - mean) * (x[i] - mean);
    if (mean_out) *mean_out = mean;
    return sqrt(ss / (n - 1));
}

typedef struct {
    Model *m;
    float *params, *buffers;
} HostInit;

static HostInit host_init(ModelConfig mc, uint64_t seed) {
    HostInit h;
    h.m = model_create(&mc, be, 1);
    h.params = malloc(h.m->num_params * sizeof(float));
    h.buffers = malloc((h.m->num_buffers ? h.m->num_buffers : 1) * sizeof(float));
    model_init_host(h.m, seed, h.params, h.buffers);
    return h;
}

static void host_free(HostInit *h) {
    free(h->params);
    free(h->buffers);
    model_free(h->m);
}

// Checks the SUO Gram identities of every MLP and of the head (fact 13). C <= D: W W^T; C > D: W^T W.
static void check_suo(const HostInit *h, double g1sq, double g2sq, double headsq, const char *mode) {
    const Model *m = h->m;
    int D = m->cfg.dim, M = m->cfg.mlp_dim, C = m->cfg.num_classes;
    double *G = malloc((size_t)M * M * sizeof(double));
    double worst1 = 0.0, worst2 = 0.0;
    for (int l = 0; l < m->cfg.depth; l++) {
        const float *W1 = h->params + m->tensors[m->blocks[l].fc1_w].offset;  // (M, D)
        const float *W2 = h->params + m->tensors[m->blocks[l].fc2_w].offset;  // (D, M)
        gram(W1, M, D, 1, G);
        worst1 = fmax(worst1, gram_err(G, D, g1sq) / g1sq);
        gram(W2, D, M, 0, G);
        worst2 = fmax(worst2, gram_err(G, D, g2sq) / g2sq);
    }
    const float *Wh = h->params + m->tensors[m->head_w].offset;  // (C, D)
    int k = C <= D ? C : D;
    gram(Wh, C, D, C > D, G);
    double eh = gram_err(G, k, headsq) / headsq;
    printf("    %s: max-abs Gram error / diagonal: W1^T W1 = %g I %.2e, W2 W2^T = %g I %.2e, head (C=%d) %g I %.2e\n",
           mode, g1sq, worst1, g2sq, worst2, C, headsq, eh);
    EXPECT(worst1 <= 1e-5, "%s: W1^T W1 != %g I: %.3g", mode, g1sq, worst1);
    EXPECT(worst2 <= 1e-5, "%s: W2 W2^T != %g I: %.3g", mode, g2sq, worst2);
    EXPECT(eh <= 1e-5, "%s: head Gram != %g I: %.3g", mode, headsq, eh);
    free(G);
}

// phi(W2 phi(W1 x)) with zero biases through the backend ops; x (R, D) -> y (R, D).
static void mlp_apply(const float *W1, const float *W2, const float *x, float *y, int R, int D, int M, float s, float a) {
    float *h = malloc((size_t)R * M * sizeof(float));
    be->matmul_fwd(be, h, x, W1, NULL, R, D, M);
    be->trelu_fwd(be, h, h, (size_t)R * M, s, a);
    be->matmul_fwd(be, y, h, W2, NULL, R, M, D);
    be->trelu_fwd(be, y, y, (size_t)R * D, s, a);
    free(h);
}

static void test_init_facts(void) {
    ModelConfig dc = preset_config(ARCH_SIMPLEST, 0, 384, 6, 7, 32, 4, 10);
    ModelConfig cc = preset_config(ARCH_SIMPLEST, 1, 384, 6, 7, 32, 4, 10);
    HostInit hd = host_init(dc, 3407), hc = host_init(cc, 3407);
    const Model *m = hd.m;
    int D = 384, M = 1536;
    TEST_CASE("init (fact 12): W_q = 0 exactly, every bias 0, std of patch W and W_k, W_v within 2% (S, both modes)") {
        HostInit *hs[2] = {&hd, &hc};
        for (int k = 0; k < 2; k++) {
            const Model *mm = hs[k]->m;
            const float *P = hs[k]->params;
            size_t nonzero_q = 0, nonzero_b = 0;
            for (int i = 0; i < mm->ntensors; i++) {
                const TensorInfo *t = &mm->tensors[i];
                if (t->trainable && strstr(t->name, "bias"))
                    for (size_t j = 0; j < t->numel; j++) nonzero_b += P[t->offset + j] != 0.0f;
            }
            double worst_kv = 0.0;
            for (int l = 0; l < mm->cfg.depth; l++) {
                const float *Wqkv = P + mm->tensors[mm->blocks[l].qkv_w].offset;
                for (size_t j = 0; j < (size_t)D * D; j++) nonzero_q += Wqkv[j] != 0.0f;
                for (int part = 1; part <= 2; part++) {
                    double sd = sample_std(Wqkv + (size_t)part * D * D, (size_t)D * D, NULL);
                    worst_kv = fmax(worst_kv, fabs(sd * sqrt((double)D) - 1.0));
                }
            }
            double mean, sd = sample_std(P + mm->tensors[mm->patch_w].offset, mm->tensors[mm->patch_w].numel, &mean);
            printf("    %s: patch W std %.6f (target 0.144338, rel dev %.2e, mean %.1e); worst W_k/W_v std rel dev %.2e\n",
                   k ? "seed_compat" : "default", sd, fabs(sd / 0.1443375673 - 1), mean, worst_kv);
            EXPECT(nonzero_q == 0, "%zu nonzero entries in W_q", nonzero_q);
            EXPECT(nonzero_b == 0, "%zu nonzero bias entries", nonzero_b);
            EXPECT(fabs(sd / (1.0 / sqrt(48.0)) - 1.0) <= 0.02, "patch W std %.6f", sd);
            EXPECT(worst_kv <= 0.02, "W_k/W_v std off by %.3g", worst_kv);
            EXPECT(fabs(mean) <= 0.005, "patch W mean %.3g", mean);
        }
    }
    TEST_CASE("init (fact 13): SUO Gram identities of MLP and head, C <= D, both modes (S, C = 10)") {
        check_suo(&hd, 4.0, 1.0, 1.0, "default");
        check_suo(&hc, 1.0, 4.0, 384.0 / 10.0, "seed_compat");
    }
    TEST_CASE("init (fact 13): head Gram for C > D (C = 1000, D = 64): default W^T W = (C/D) I, compat W^T W = I") {
        ModelConfig d2 = preset_config(ARCH_SIMPLEST, 0, 64, 2, 7, 8, 4, 1000), c2 = d2;
        c2.seed_compat = 1;
        HostInit a = host_init(d2, 5), b = host_init(c2, 5);
        check_suo(&a, 4.0, 1.0, 1000.0 / 64.0, "default");
        check_suo(&b, 1.0, 4.0, 1.0, "seed_compat");
        host_free(&a);
        host_free(&b);
    }
    TEST_CASE("init (fact 14): identical orthogonal draws; default and compat MLPs give bitwise-identical outputs") {
        // model_init_host draws each SUO matrix from the stream (seed, INIT, tensor index), and the tensor tables of
        // the two modes are identical, so the modes differ only by the exact factor 2 on W1 (default) or W2 (compat).
        size_t bad1 = 0, bad2 = 0;
        for (int l = 0; l < m->cfg.depth; l++) {
            const float *W1d = hd.params + m->tensors[m->blocks[l].fc1_w].offset;
            const float *W1c = hc.params + hc.m->tensors[hc.m->blocks[l].fc1_w].offset;
            const float *W2d = hd.params + m->tensors[m->blocks[l].fc2_w].offset;
            const float *W2c = hc.params + hc.m->tensors[hc.m->blocks[l].fc2_w].offset;
            for (size_t j = 0; j < (size_t)M * D; j++) {
                bad1 += W1d[j] != 2.0f * W1c[j];
                bad2 += W2c[j] != 2.0f * W2d[j];
            }
        }
        EXPECT(bad1 == 0, "%zu entries with W1_default != 2 W1_compat", bad1);
        EXPECT(bad2 == 0, "%zu entries with W2_compat != 2 W2_default", bad2);
        int R = 64;
        float *x = malloc((size_t)R * D * sizeof(float)), *yd = malloc((size_t)R * D * sizeof(float));
        float *yc = malloc((size_t)R * D * sizeof(float));
        fill_normal(x, (size_t)R * D, 1.0, 41);
        float s = (float)m->tat_s, a = (float)m->tat_a;
        size_t differ = 0;
        double scale = 0.0;
        for (int l = 0; l < m->cfg.depth; l++) {
            mlp_apply(hd.params + m->tensors[m->blocks[l].fc1_w].offset, hd.params + m->tensors[m->blocks[l].fc2_w].offset,
                      x, yd, R, D, M, s, a);
            mlp_apply(hc.params + hc.m->tensors[hc.m->blocks[l].fc1_w].offset,
                      hc.params + hc.m->tensors[hc.m->blocks[l].fc2_w].offset, x, yc, R, D, M, s, a);
            for (size_t j = 0; j < (size_t)R * D; j++) differ += memcmp(&yd[j], &yc[j], sizeof(float)) != 0;
            for (size_t j = 0; j < (size_t)R * D; j++) scale = fmax(scale, fabs(yd[j]));
        }
        printf("    %d layers x %d tokens: %zu of %zu outputs differ (max |y| %.2f)\n", m->cfg.depth, R, differ,
               (size_t)m->cfg.depth * R * D, scale);
        EXPECT(differ == 0, "%zu outputs differ", differ);
        EXPECT(scale > 0.1, "degenerate MLP outputs");
        free(x), free(yd), free(yc);
    }
    host_free(&hd);
    host_free(&hc);
}

// ================================================================ parameter counts, keys, decay sets (§10-§12.4)

typedef struct {
    const char *name;
    int D, H, image, patch, C;
    long long simplest, simplevit, simplevit_compat;
} CountRow;

static void test_counts_and_keys(void) {
    const CountRow rows[] = {{"S/4 CIFAR-10", 384, 6, 32, 4, 10, 19523722, 21298570, 19529098},
                             {"S/16 ImageNet", 384, 6, 224, 16, 1000, 20181352, 21956200, 20186728},
                             {"Ti/4 CIFAR-10", 192, 3, 32, 4, 10, 4895818, 5340874, 4898506}};
    TEST_CASE("parameter counts (fact 15): S/4 CIFAR-10, S/16 ImageNet, Ti/4 CIFAR-10, all three columns of §10") {
        for (int r = 0; r < 3; r++) {
            const CountRow *row = &rows[r];
            long long want[3] = {row->simplest, row->simplevit, row->simplevit_compat};
            for (int k = 0; k < 3; k++) {
                ModelConfig mc = preset_config(k == 0 ? ARCH_SIMPLEST : ARCH_SIMPLEVIT, k == 2, row->D, row->H, 12,
                                               row->image, row->patch, row->C);
                Model *m = model_create(&mc, be, 1);
                long long got = (long long)model_num_trainable(m);
                // The table's sum of trainable numels agrees with the count.
                long long sum = 0;
                for (int i = 0; i < m->ntensors; i++)
                    if (m->tensors[i].trainable) sum += (long long)m->tensors[i].numel;
                EXPECT(got == want[k], "%s column %d: %lld trainable, want %lld", row->name, k, got, want[k]);
                EXPECT(sum == got, "%s column %d: tensor table sums to %lld", row->name, k, sum);
                model_free(m);
            }
        }
        ModelConfig mc = preset_config(ARCH_SIMPLEST, 0, 384, 6, 12, 32, 4, 10);
        mc.qkv_bias = 0;
        Model *m = model_create(&mc, be, 1);
        EXPECT(model_num_trainable(m) == 19523722 - 13824, "without qkv bias: %zu", model_num_trainable(m));
        model_free(m);
    }
    TEST_CASE("weights keys (fact 22): 100 SimplEsT-S and 126 SimpleViT-S keys, names, shapes and order of §11") {
        for (int k = 0; k < 3; k++) {
            Arch arch = k == 0 ? ARCH_SIMPLEST : ARCH_SIMPLEVIT;
            ModelConfig mc = preset_config(arch, k == 2, 384, 6, 12, 32, 4, 10);
            Model *m = model_create(&mc, be, 1);
            int D = 384, M = 1536, N = 64, C = 10, want_n = arch == ARCH_SIMPLEST ? 100 : 126;
            EXPECT(m->ntensors == want_n, "%d keys, want %d", m->ntensors, want_n);
            // The expected list, built from §11's tables.
            typedef struct {
                char name[96];
                int ndim, shape[4];
            } Key;
            Key *want = calloc(200, sizeof(Key));
            int n = 0;
#define KEY(nd, s0, s1, s2, s3, ...)                                   \
    do {                                                               \
        snprintf(want[n].name, sizeof want[n].name, __VA_ARGS__);      \
        want[n].ndim = nd;                                             \
        want[n].shape[0] = s0, want[n].shape[1] = s1, want[n].shape[2] = s2, want[n].shape[3] = s3; \
        n++;                                                           \
    } while (0)
            KEY(4, D, 3, 4, 4, "to_patch_embedding.weight");
            KEY(1, D, 0, 0, 0, "to_patch_embedding.bias");
            for (int i = 0; i < 12; i++) {
                if (arch == ARCH_SIMPLEST) {
                    KEY(4, 1, 1, N, 1, "transformer.layers.%d.d", 2 * i);
                    KEY(4, 1, 1, N, N, "transformer.layers.%d.B", 2 * i);
                    KEY(2, 3 * D, D, 0, 0, "transformer.layers.%d.to_qkv.weight", 2 * i);
                    KEY(1, 3 * D, 0, 0, 0, "transformer.layers.%d.to_qkv.bias", 2 * i);
                    KEY(2, M, D, 0, 0, "transformer.layers.%d.layer1.lin.weight", 2 * i + 1);
                    KEY(1, M, 0, 0, 0, "transformer.layers.%d.layer1.lin.bias", 2 * i + 1);
                    KEY(2, D, M, 0, 0, "transformer.layers.%d.layer2.lin.weight", 2 * i + 1);
                    KEY(1, D, 0, 0, 0, "transformer.layers.%d.layer2.lin.bias", 2 * i + 1);
                } else {
                    KEY(1, D, 0, 0, 0, "transformer.layers.%d.0.norm.weight", i);
                    KEY(1, D, 0, 0, 0, "transformer.layers.%d.0.norm.bias", i);
                    KEY(2, 3 * D, D, 0, 0, "transformer.layers.%d.0.to_qkv.weight", i);
                    KEY(2, D, D, 0, 0, "transformer.layers.%d.0.to_out.weight", i);
                    KEY(1, D, 0, 0, 0, "transformer.layers.%d.1.ff.0.weight", i);
                    KEY(1, D, 0, 0, 0, "transformer.layers.%d.1.ff.0.bias", i);
                    KEY(2, M, D, 0, 0, "transformer.layers.%d.1.ff.1.weight", i);
                    KEY(1, M, 0, 0, 0, "transformer.layers.%d.1.ff.1.bias", i);
                    KEY(2, D, M, 0, 0, "transformer.layers.%d.1.ff.3.weight", i);
                    KEY(1, D, 0, 0, 0, "transformer.layers.%d.1.ff.3.bias", i);
                }
            }
            if (arch == ARCH_SIMPLEST) {
                KEY(2, C, D, 0, 0, "linear_head.weight");
                KEY(1, C, 0, 0, 0, "linear_head.bias");
            } else {
                KEY(1, D, 0, 0, 0, "linear_head.0.weight");
                KEY(1, D, 0, 0, 0, "linear_head.0.bias");
                KEY(2, C, D, 0, 0, "linear_head.1.weight");
                KEY(1, C, 0, 0, 0, "linear_head.1.bias");
            }
#undef KEY
            EXPECT(n == want_n, "expected list has %d keys", n);
            int bad = 0;
            for (int i = 0; i < n && i < m->ntensors; i++) {
                const TensorInfo *t = &m->tensors[i];
                int same = !strcmp(t->name, want[i].name) && t->ndim == want[i].ndim;
                for (int d = 0; same && d < t->ndim; d++) same = t->shape[d] == want[i].shape[d];
                if (!same && bad++ < 3)
                    printf("    key %d: got %s (ndim %d), want %s (ndim %d)\n", i, t->name, t->ndim, want[i].name,
                           want[i].ndim);
            }
            EXPECT(bad == 0, "%s%s: %d keys differ in name, shape or order", arch == ARCH_SIMPLEST ? "SimplEsT" : "SimpleViT",
                   k == 2 ? " (seed_compat)" : "", bad);
            free(want);
            model_free(m);
        }
    }
}

// §12.4: the decay set by name pattern.
static int want_decay(const char *name, Arch arch, int seed_compat) {
    static const char *simplest[] = {"to_patch_embedding.weight", "to_qkv.weight", "layer1.lin.weight",
                                     "layer2.lin.weight", "linear_head.weight"};
    static const char *simplevit[] = {"to_patch_embedding.weight", "norm.weight", "ff.0.weight", "to_qkv.weight",
                                      "to_out.weight", "ff.1.weight", "ff.3.weight", "linear_head.0.weight",
                                      "linear_head.1.weight"};
    const char **list = arch == ARCH_SIMPLEST ? simplest : simplevit;
    int n = arch == ARCH_SIMPLEST ? 5 : 9;
    if (arch == ARCH_SIMPLEVIT && seed_compat && strstr(name, "to_out.weight")) return 0;  // not a parameter
    size_t ln = strlen(name);
    for (int i = 0; i < n; i++) {
        size_t lp = strlen(list[i]);
        if (ln >= lp && !strcmp(name + ln - lp, list[i])) return 1;
    }
    return 0;
}

static void test_decay_sets(void) {
    TEST_CASE("decay sets (fact 21): exactly the §12.4 lists; E-SPA buffers and compat to_out are not trainable") {
        for (int k = 0; k < 4; k++) {
            Arch arch = k < 2 ? ARCH_SIMPLEST : ARCH_SIMPLEVIT;
            int compat = k & 1;
            ModelConfig mc = preset_config(arch, compat, 384, 6, 12, 32, 4, 10);
            Model *m = model_create(&mc, be, 1);
            int decayed = 0, bad = 0;
            for (int i = 0; i < m->ntensors; i++) {
                const TensorInfo *t = &m->tensors[i];
                int fixed = (arch == ARCH_SIMPLEST && (strstr(t->name, ".d") == t->name + strlen(t->name) - 2 ||
                                                       strstr(t->name, ".B") == t->name + strlen(t->name) - 2)) ||
                            (arch == ARCH_SIMPLEVIT && compat && strstr(t->name, "to_out.weight"));
                int wd = want_decay(t->name, arch, compat);
                if (t->decay != wd || t->trainable == fixed) {
                    if (bad++ < 3)
                        printf("    %s: decay %d (want %d), trainable %d (want %d)\n", t->name, t->decay, wd,
                               t->trainable, !fixed);
                }
                decayed += t->decay;
            }
            int want_n = arch == ARCH_SIMPLEST ? 1 + 12 * 3 + 1 : 1 + 12 * (compat ? 5 : 6) + 2;
            printf("    %s%s: %d decayed tensors\n", arch == ARCH_SIMPLEST ? "SimplEsT" : "SimpleViT",
                   compat ? " (seed_compat)" : "", decayed);
            EXPECT(bad == 0, "%d tensors with the wrong decay or trainable flag", bad);
            EXPECT(decayed == want_n, "%d decayed, want %d", decayed, want_n);
            model_free(m);
        }
    }
    TEST_CASE("decay sets (fact 21): Adam decays exactly the decayed tensors; weight decay 0 is a bitwise no-op") {
        for (int k = 0; k < 4; k++) {
            ModelConfig mc = tiny_config(k < 2 ? ARCH_SIMPLEST : ARCH_SIMPLEVIT, k & 1, 1, 0.0f);
            Model *m = model_create(&mc, be, 1);
            model_init(m, 3);
            perturb_params(m);
            size_t n = m->num_params;
            float *w0 = malloc(n * sizeof(float));
            memcpy(w0, m->params, n * sizeof(float));
            // Zero gradient, decoupled decay: decayed tensors scale by exactly (1 - lr wd) in fp32, others keep their bits.
            Adam a;
            AdamConfig ac = {.lr0 = 0.1, .weight_decay = 0.1, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8, .decoupled = 1};
            adam_create(&a, m, &ac);
            model_zero_grad(m);
            adam_step(&a, m, 0.1, 1.0);
            int bad = 0;
            for (int i = 0; i < m->ntensors; i++) {
                const TensorInfo *t = &m->tensors[i];
                if (!t->trainable) continue;
                float f = 1.0f - 0.1f * 0.1f;
                for (size_t j = 0; j < t->numel; j++) {
                    float want = t->decay ? w0[t->offset + j] * f : w0[t->offset + j];
                    if (m->params[t->offset + j] != want) {
                        if (bad++ < 3) printf("    %s[%zu]: %.9g, want %.9g\n", t->name, j, m->params[t->offset + j], want);
                        break;
                    }
                }
            }
            EXPECT(bad == 0, "%d tensors decayed wrongly (arch %d compat %d)", bad, mc.arch, mc.seed_compat);
            adam_free(&a, m);
            // Weight decay 0 with real gradients: L2 and decoupled give the same bits after 3 steps.
            float *res[2];
            for (int mode = 0; mode < 2; mode++) {
                memcpy(m->params, w0, n * sizeof(float));
                AdamConfig c0 = {.lr0 = 0.01, .weight_decay = 0.0, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8,
                                 .decoupled = mode};
                adam_create(&a, m, &c0);
                for (int step = 0; step < 3; step++) {
                    fill_normal(m->grads, n, 1.0, 60 + step);
                    adam_step(&a, m, 0.01, 0.5);
                }
                res[mode] = malloc(n * sizeof(float));
                memcpy(res[mode], m->params, n * sizeof(float));
                adam_free(&a, m);
            }
            EXPECT(memcmp(res[0], res[1], n * sizeof(float)) == 0, "wd 0: L2 and decoupled differ");
            EXPECT(memcmp(res[0], w0, n * sizeof(float)) != 0, "the steps did not move the weights");
            free(res[0]), free(res[1]), free(w0);
            model_free(m);
        }
    }
}

// ================================================================ posemb and token order (§4, facts 16-17)

static void test_posemb_and_tokens(void) {
    TEST_CASE("posemb (fact 16): PE(y=1, x=2) entries, omega_1, omega_{K-1}, squared norm D/2 for every token") {
        int D = 384, K = 96;
        float *pe = malloc((size_t)64 * D * sizeof(float));
        posemb_sincos_2d(pe, 8, 8, D);
        const float *p10 = pe + 10 * D;
        EXPECT_NEAR(p10[0], 0.9092974, 1e-6);
        EXPECT_NEAR(p10[96], -0.4161468, 1e-6);
        EXPECT_NEAR(p10[192], 0.8414710, 1e-6);
        EXPECT_NEAR(p10[288], 0.5403023, 1e-6);
        EXPECT_NEAR(pe[1 * D + 1], sin(0.9076005216818144), 1e-7);  // token x = 1: sin(omega_1)
        EXPECT_NEAR(pe[1 * D + K - 1], sin(1e-4), 1e-9);          // omega_{K-1} = 1e-4
        double worst = 0.0;
        for (int n = 0; n < 64; n++) worst = fmax(worst, fabs(cblas_sdot(D, pe + n * D, 1, pe + n * D, 1) - 192.0));
        EXPECT(worst <= 1e-4, "squared norm off 192 by %.3g", worst);
        free(pe);
    }
    TEST_CASE("posemb (fact 17): non-square grid, token n = y w + x, column terms first, against fp64") {
        int h = 3, w = 5, D = 16, K = 4;
        float *pe = malloc((size_t)h * w * D * sizeof(float));
        posemb_sincos_2d(pe, h, w, D);
        double e = 0.0;
        for (int y = 0; y < h; y++)
            for (int x = 0; x < w; x++)
                for (int k = 0; k < K; k++) {
                    const float *row = pe + (size_t)(y * w + x) * D;
                    double om = pow(10000.0, -(double)k / (K - 1));
                    e = fmax(e, fabs(row[k] - sin(x * om)));
                    e = fmax(e, fabs(row[K + k] - cos(x * om)));
                    e = fmax(e, fabs(row[2 * K + k] - sin(y * om)));
                    e = fmax(e, fabs(row[3 * K + k] - cos(y * om)));
                }
        EXPECT(e <= 1e-7, "max-abs err %.3g", e);
        free(pe);
    }
    TEST_CASE("token order (fact 17): the model's x0 = conv patch embedding of token r*w + c, plus PE(y = r, x = c)") {
        for (int arch = 0; arch < 2; arch++) {
            ModelConfig mc = tiny_config((Arch)arch, 0, 1, 0.0f);
            mc.image_size = 12;  // 3 x 3 grid
            Model *m = model_create(&mc, be, 2);
            model_init(m, 5);
            perturb_params(m);  // nonzero patch bias
            int B = 2, C = 3, H = 12, p = 4, g = 3, D = mc.dim;
            fill_normal(m->input, (size_t)B * C * H * H, 1.0, 51);
            model_forward(m, B, 0, 0, 0, 0);
            const float *W = m->params + m->tensors[m->patch_w].offset, *bias = m->params + m->tensors[m->patch_b].offset;
            float *pe = malloc((size_t)g * g * D * sizeof(float));
            posemb_sincos_2d(pe, g, g, D);
            double e = 0.0;
            const float *x0 = m->x0;
            for (int b = 0; b < B; b++)
                for (int r = 0; r < g; r++)
                    for (int c = 0; c < g; c++)
                        for (int o = 0; o < D; o++) {
                            double s = bias[o];
                            for (int ch = 0; ch < C; ch++)
                                for (int ky = 0; ky < p; ky++)
                                    for (int kx = 0; kx < p; kx++)
                                        s += (double)W[((o * C + ch) * p + ky) * p + kx] *
                                             m->input[(((size_t)b * C + ch) * H + r * p + ky) * H + c * p + kx];
                            int K = D / 4, k = o % K, part = o / K;
                            double om = pow(10000.0, -(double)k / (K - 1)), pos = part < 2 ? c : r;
                            s += part % 2 == 0 ? sin(pos * om) : cos(pos * om);
                            e = fmax(e, fabs(x0[((size_t)b * g * g + r * g + c) * D + o] - s));
                        }
            printf("    %s: x0 max-abs err %.2e\n", arch ? "SimpleViT" : "SimplEsT", e);
            EXPECT(e <= 1e-5, "x0 max-abs err %.3g", e);
            free(pe);
            model_free(m);
        }
    }
}

// ================================================================ weights file (§11, fact 24)

static char *temp_path(void) {
    char *p = strdup("/tmp/test_model_XXXXXX");
    int fd = mkstemp(p);
    if (fd >= 0) close(fd);
    return p;
}

static int write_bytes(const char *path, const void *data, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    size_t w = n ? fwrite(data, 1, n, f) : 0;
    fclose(f);
    return w == n ? 0 : -1;
}

// Rewrites src into dst with one edit: drop tensor `drop`, append an extra tensor, give tensor `reshape` the
// transposed 2-D shape, prefix every name, or replace `modify`'s data. Returns 0 on success.
typedef struct {
    const char *drop, *reshape, *modify, *prefix;
    int extra;
    const float *modify_data;
} Edit;

static int rewrite(const char *src, const char *dst, const Edit *ed) {
    StFile f;
    char err[512];
    if (st_open(src, &f, err, sizeof err) != 0) return -1;
    StEntry *e = calloc((size_t)f.ntensors + 1, sizeof(StEntry));
    char (*names)[200] = calloc((size_t)f.ntensors + 1, 200);
    int n = 0;
    static const float extra_data[2] = {1.0f, 2.0f};
    for (int i = 0; i < f.ntensors; i++) {
        const StTensor *t = &f.tensors[i];
        if (ed->drop && !strcmp(t->name, ed->drop)) continue;
        snprintf(names[n], 200, "%s%s", ed->prefix ? ed->prefix : "", t->name);
        e[n].name = names[n];
        e[n].dtype = t->dtype;
        e[n].ndim = t->ndim;
        for (int d = 0; d < t->ndim; d++) e[n].shape[d] = t->shape[d];
        if (ed->reshape && !strcmp(t->name, ed->reshape) && t->ndim == 2)
            e[n].shape[0] = t->shape[1], e[n].shape[1] = t->shape[0];
        e[n].data = ed->modify && !strcmp(t->name, ed->modify) ? ed->modify_data : st_data(&f, t);
        n++;
    }
    if (ed->extra) e[n++] = (StEntry){"extra.weight", "F32", 1, {2}, extra_data};
    const char *keys[] = {"format"}, *vals[] = {"simplest-dist-weights-1"};
    int rc = st_write(dst, e, n, keys, vals, 1);
    st_close(&f);
    free(e);
    free(names);
    return rc;
}

// weights_load must fail with one line that names the file, and leave the model untouched.
static void expect_reject(Model *m, const char *path, const char *what, const char *needle) {
    float *before = malloc(m->num_params * sizeof(float));
    memcpy(before, m->params, m->num_params * sizeof(float));
    char err[1024] = "";
    int rc = weights_load(m, path, err, sizeof err);
    printf("    %-28s -> %s\n", what, err);
    EXPECT(rc == -1, "%s: weights_load returned %d", what, rc);
    EXPECT(err[0] != '\0', "%s: empty error", what);
    EXPECT(strchr(err, '\n') == NULL, "%s: error is not one line", what);
    EXPECT(strstr(err, path) != NULL, "%s: error does not name the file", what);
    if (needle) EXPECT(strstr(err, needle) != NULL, "%s: error does not mention '%s'", what, needle);
    EXPECT(memcmp(before, m->params, m->num_params * sizeof(float)) == 0, "%s: a failed load changed the weights", what);
    free(before);
}

static void test_weights_file(void) {
    TEST_CASE("weights file (fact 24): save -> load is bitwise, in table order, with the §11 metadata (4 variants)") {
        for (int k = 0; k < 4; k++) {
            ModelConfig mc = tiny_config(k < 2 ? ARCH_SIMPLEST : ARCH_SIMPLEVIT, k & 1, 1, 0.0f);
            Model *a = model_create(&mc, be, 1), *b = model_create(&mc, be, 1);
            model_init(a, 1);
            perturb_params(a);
            model_init(b, 2);
            char *path = temp_path();
            const char *cfg_json = "{\"model\": {\"arch\": \"test\"}}";
            EXPECT(weights_save(a, path, NULL, cfg_json, 1234, 0) == 0, "weights_save failed");
            char err[1024] = "";
            EXPECT(weights_load(b, path, err, sizeof err) == 0, "weights_load: %s", err);
            EXPECT(memcmp(a->params, b->params, a->num_params * sizeof(float)) == 0, "params differ");
            EXPECT(memcmp(a->buffers, b->buffers, a->num_buffers * sizeof(float)) == 0, "buffers differ");
            StFile f;
            EXPECT(st_open(path, &f, err, sizeof err) == 0, "%s", err);
            EXPECT(f.ntensors == a->ntensors, "%d tensors in the file", f.ntensors);
            int order = 1;
            for (int i = 0; i < f.ntensors && i < a->ntensors; i++) {
                order &= !strcmp(f.tensors[i].name, a->tensors[i].name) && !strcmp(f.tensors[i].dtype, "F32");
                order &= f.tensors[i].begin <= (i + 1 < f.ntensors ? f.tensors[i + 1].begin : f.tensors[i].begin);
            }
            EXPECT(order, "tensors not written in table order as F32");
            const char *fmt = st_meta(&f, "format"), *arch = st_meta(&f, "arch"), *sc = st_meta(&f, "seed_compat");
            const char *step = st_meta(&f, "step"), *ema = st_meta(&f, "ema"), *cfg = st_meta(&f, "config");
            EXPECT(fmt && !strcmp(fmt, "simplest-dist-weights-1"), "format %s", fmt ? fmt : "(none)");
            EXPECT(arch && !strcmp(arch, k < 2 ? "simplest" : "simplevit"), "arch %s", arch ? arch : "(none)");
            EXPECT(sc && !strcmp(sc, k & 1 ? "true" : "false"), "seed_compat %s", sc ? sc : "(none)");
            EXPECT(step && !strcmp(step, "1234"), "step %s", step ? step : "(none)");
            EXPECT(ema && !strcmp(ema, "false"), "ema %s", ema ? ema : "(none)");
            EXPECT(cfg && !strcmp(cfg, cfg_json), "config %s", cfg ? cfg : "(none)");
            st_close(&f);
            // host_params (the EMA path) are written instead of the model's, and ema = "true".
            float *hp = malloc(a->num_params * sizeof(float));
            fill_normal(hp, a->num_params, 1.0, 7);
            EXPECT(weights_save(a, path, hp, cfg_json, 5, 1) == 0, "weights_save (host params) failed");
            EXPECT(weights_load(b, path, err, sizeof err) == 0, "weights_load: %s", err);
            EXPECT(memcmp(hp, b->params, a->num_params * sizeof(float)) == 0, "host params not written");
            EXPECT(st_open(path, &f, err, sizeof err) == 0, "%s", err);
            EXPECT(st_meta(&f, "ema") && !strcmp(st_meta(&f, "ema"), "true"), "ema metadata not true");
            st_close(&f);
            free(hp);
            // Reference training checkpoints prefix every key with "_orig_mod.": accepted, same bits.
            EXPECT(weights_save(a, path, NULL, cfg_json, 1, 0) == 0, "weights_save failed");
            char *p2 = temp_path();
            Edit pre = {.prefix = "_orig_mod."};
            EXPECT(rewrite(path, p2, &pre) == 0, "rewrite failed");
            model_init(b, 3);
            EXPECT(weights_load(b, p2, err, sizeof err) == 0, "prefixed keys: %s", err);
            EXPECT(memcmp(a->params, b->params, a->num_params * sizeof(float)) == 0, "prefixed load differs");
            unlink(path), unlink(p2);
            free(path), free(p2);
            model_free(a), model_free(b);
        }
    }
    TEST_CASE("weights_load rejects bad files with one line naming the file, leaving the model unchanged") {
        ModelConfig dc = tiny_config(ARCH_SIMPLEST, 0, 1, 0.0f), cc = tiny_config(ARCH_SIMPLEST, 1, 1, 0.0f);
        ModelConfig vc = tiny_config(ARCH_SIMPLEVIT, 1, 1, 0.0f);
        Model *md = model_create(&dc, be, 1), *mcpt = model_create(&cc, be, 1), *mv = model_create(&vc, be, 1);
        model_init(md, 1), model_init(mcpt, 1), model_init(mv, 1);
        char *good = temp_path(), *goodc = temp_path(), *goodv = temp_path(), *bad = temp_path();
        EXPECT(weights_save(md, good, NULL, "{}", 0, 0) == 0, "save");
        EXPECT(weights_save(mcpt, goodc, NULL, "{}", 0, 0) == 0, "save");
        EXPECT(weights_save(mv, goodv, NULL, "{}", 0, 0) == 0, "save");
        Edit e1 = {.drop = "transformer.layers.3.layer1.lin.bias"};
        rewrite(good, bad, &e1);
        expect_reject(md, bad, "missing tensor", "transformer.layers.3.layer1.lin.bias");
        Edit e2 = {.extra = 1};
        rewrite(good, bad, &e2);
        expect_reject(md, bad, "extra tensor", "extra.weight");
        Edit e3 = {.reshape = "linear_head.weight"};  // [C, D] stored as [D, C]: same size, wrong shape
        rewrite(good, bad, &e3);
        expect_reject(md, bad, "wrong shape", "linear_head.weight");
        expect_reject(mcpt, good, "default-form B, compat model", "B");
        expect_reject(md, goodc, "compat-form B, default model", "B");
        // seed_compat SimpleViT with a to_out that is not the identity.
        int D = vc.dim;
        float *not_eye = calloc((size_t)D * D, sizeof(float));
        for (int i = 0; i < D; i++) not_eye[i * D + i] = 1.0f;
        not_eye[1] = 1e-3f;
        Edit e4 = {.modify = "transformer.layers.1.0.to_out.weight", .modify_data = not_eye};
        rewrite(goodv, bad, &e4);
        expect_reject(mv, bad, "non-identity to_out (compat)", "to_out");
        free(not_eye);
        // A diverged run's weights: one NaN, one Inf.
        size_t hw = (size_t)dc.num_classes * dc.dim;
        float *nonfinite = malloc(hw * sizeof(float));
        for (int k = 0; k < 2; k++) {
            for (size_t i = 0; i < hw; i++) nonfinite[i] = 0.01f * (float)i;
            nonfinite[hw / 2] = k ? INFINITY : NAN;
            Edit e5 = {.modify = "linear_head.weight", .modify_data = nonfinite};
            rewrite(good, bad, &e5);
            expect_reject(md, bad, k ? "an Inf weight" : "a NaN weight", "linear_head.weight");
        }
        free(nonfinite);
        // The same tensor twice, bare and with the compiled prefix; and twice by the same name (the header's JSON
        // holds both, so which one counts would be undefined).
        {
            StFile a;
            char err[1024];
            EXPECT(st_open(good, &a, err, sizeof err) == 0, "%s", err);
            const void *bias = st_data(&a, st_find(&a, "linear_head.bias"));
            StEntry ents[2] = {{"linear_head.bias", "F32", 1, {dc.num_classes}, bias},
                               {"_orig_mod.linear_head.bias", "F32", 1, {dc.num_classes}, bias}};
            EXPECT(st_write(bad, ents, 2, NULL, NULL, 0) == 0, "write");
            expect_reject(md, bad, "a tensor bare and prefixed", "given twice");
            st_close(&a);
        }
        const char dup[] = "{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                           "\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}";
        const char frac[] = "{\"w\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,4]}}  ";
        const char dupmeta[] = "{\"__metadata__\":{\"t\":\"5\",\"t\":\"999\"},"
                               "\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}";
        const char dupfield[] = "{\"w\":{\"dtype\":\"F32\",\"dtype\":\"I32\",\"shape\":[1],\"data_offsets\":[0,4]}}";
        const char *raw[4] = {dup, frac, dupmeta, dupfield};
        const char *what[4] = {"a name twice in the header", "a fractional shape", "a metadata key twice",
                               "an entry's dtype twice"};
        for (int k = 0; k < 4; k++) {
            size_t hl = strlen(raw[k]);
            unsigned char buf[256] = {0};
            for (int b = 0; b < 8; b++) buf[b] = (unsigned char)(hl >> (8 * b));
            memcpy(buf + 8, raw[k], hl);
            write_bytes(bad, buf, 8 + hl + 4);
            expect_reject(md, bad, what[k], k == 1 ? "shape" : "twice");
        }
        // Truncated, empty, random.
        FILE *f = fopen(good, "rb");
        fseek(f, 0, SEEK_END);
        long len = ftell(f);
        fseek(f, 0, SEEK_SET);
        unsigned char *bytes = malloc((size_t)len);
        EXPECT(fread(bytes, 1, (size_t)len, f) == (size_t)len, "read");
        fclose(f);
        write_bytes(bad, bytes, (size_t)len / 2);
        expect_reject(md, bad, "truncated file (half)", NULL);
        write_bytes(bad, bytes, (size_t)len - 4);
        expect_reject(md, bad, "truncated file (4 bytes short)", NULL);
        write_bytes(bad, bytes, 0);
        expect_reject(md, bad, "zero-byte file", NULL);
        Rng r = rng_stream(9, 0x7E57, 13, 0);
        for (long i = 0; i < len; i++) bytes[i] = (unsigned char)rng_next(&r);
        write_bytes(bad, bytes, (size_t)len);
        expect_reject(md, bad, "random bytes", NULL);
        bytes[0] = 16, memset(bytes + 1, 0, 7);  // a plausible header length, then garbage JSON
        write_bytes(bad, bytes, (size_t)len);
        expect_reject(md, bad, "garbage header", NULL);
        expect_reject(md, "/tmp/test_model_no_such_file.safetensors", "missing file", NULL);
        // The good files still load (the rejections above did not come from the harness).
        char err[1024];
        EXPECT(weights_load(md, good, err, sizeof err) == 0, "%s", err);
        EXPECT(weights_load(mcpt, goodc, err, sizeof err) == 0, "%s", err);
        EXPECT(weights_load(mv, goodv, err, sizeof err) == 0, "%s", err);
        free(bytes);
        unlink(good), unlink(goodc), unlink(goodv), unlink(bad);
        free(good), free(goodc), free(goodv), free(bad);
        model_free(md), model_free(mcpt), model_free(mv);
    }
}

// model.recompute: SimpleViT's LayerNorm and GELU outputs recomputed in backward instead of kept per block. The
// same kernels on the same inputs: the loss, logits and every gradient must equal the kept-activation run bit for
// bit (with token dropout, both init modes), and the activation memory must shrink by exactly (L-1)(2D + M) rows.
static void test_recompute(void) {
    for (int compat = 0; compat <= 1; compat++) {
        char title[200];
        snprintf(title, sizeof title, "model.recompute (SimpleViT%s, depth 3, dropout 0.2): loss, logits and every "
                 "gradient bitwise equal to keeping the activations; memory smaller by (L-1)(2D+M) rows",
                 compat ? " seed_compat" : "");
        TEST_CASE(title) {
            ModelConfig mc = tiny_config(ARCH_SIMPLEVIT, compat, 1, 0.2f);
            mc.depth = 3;
            int B = 3;
            Model *m[2];
            float *g[2], *lg[2];
            for (int k = 0; k < 2; k++) {
                mc.recompute = k;
                m[k] = model_create(&mc, be, B);
                model_init(m[k], 42);
                size_t img = (size_t)B * mc.channels * mc.image_size * mc.image_size;
                fill_normal(m[k]->input, img, 1.0, 5);
                memset(m[k]->targets, 0, (size_t)B * mc.num_classes * sizeof(float));
                for (int b = 0; b < B; b++) ((float *)m[k]->targets)[b * mc.num_classes + b % mc.num_classes] = 1.0f;
                perturb_params(m[k]);
                model_zero_grad(m[k]);
                model_forward(m[k], B, 1, 9, 4, 2);
                model_loss(m[k], B, 0.1f, 1.0f / B, 1);
                model_backward(m[k], B, 9, 4, 2);
                g[k] = m[k]->grads;
                lg[k] = m[k]->logits;
            }
            EXPECT(memcmp(lg[0], lg[1], (size_t)B * mc.num_classes * sizeof(float)) == 0, "logits differ");
            EXPECT(memcmp(m[0]->losses, m[1]->losses, (size_t)B * sizeof(float)) == 0, "losses differ");
            size_t bad = 0;
            for (size_t i = 0; i < m[0]->num_params; i++) bad += memcmp(&g[0][i], &g[1][i], sizeof(float)) != 0;
            EXPECT(bad == 0, "%zu of %zu gradient entries differ", bad, m[0]->num_params);
            size_t rows = (size_t)B * m[0]->N, saved_elems = (size_t)(mc.depth - 1) * (2 * mc.dim + mc.mlp_dim) * rows;
            size_t diff = m[0]->act_bytes - m[1]->act_bytes, want = saved_elems * be->act_size;
            // views are 256-byte aligned: allow the rounding of the (3 L - 2) views that moved
            EXPECT(diff + 256 * (3 * (size_t)mc.depth) >= want && diff <= want + 256 * (3 * (size_t)mc.depth),
                   "activation bytes %zu -> %zu: saved %zu, want about %zu", m[0]->act_bytes, m[1]->act_bytes, diff,
                   want);
            model_free(m[0]);
            model_free(m[1]);
        }
    }
}

int main(void) {
    // One thread: these models are tiny, and on a loaded 2-core machine OpenMP's fork/join costs 50x the work.
    be = backend_cpu_create(1);
    test_gradients();
    test_init_facts();
    test_counts_and_keys();
    test_decay_sets();
    test_posemb_and_tokens();
    test_weights_file();
    test_recompute();
    be->destroy(be);
    return tl_finish();
}
