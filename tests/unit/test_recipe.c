// test_recipe.c: the training recipe of spec/model.md §12: the LR schedule (fact 18), clipping (fact 19), gradient
// accumulation against one large batch (with and without dropout), EMA and SAM against host-side recurrences,
// Mixup (fact 20 and world-size independence), the symmetric Beta sampler, and the loader's permutation and eval
// sharding.
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm.h"
#include "config.h"
#include "data/dataset.h"
#include "model.h"
#include "optim.h"
#include "rng.h"
#include "testlib.h"
#include "train.h"

static Backend *be;

static void fill_normal(float *x, size_t n, double std, uint64_t seed) {
    Rng r = rng_stream(seed, 0x7E57, 21, 0);
    for (size_t i = 0; i < n; i++) x[i] = (float)(std * rng_normal(&r));
}

// ================================================================ schedule and clipping

// f(s) of §12.6, written out independently.
static double f_ref(double s, double W, double T) {
    if (s < W) return s / fmax(1.0, W);
    return fmax(0.0, 0.5 * (1.0 + cos(M_PI * (s - W) / fmax(1.0, T - W))));
}

static void test_schedule(void) {
    TEST_CASE("LR factors (fact 18): the §12.6 table for T = 2160, W = 75, both modes (+-1e-7 relative)") {
        const int64_t ks[7] = {1, 2, 75, 76, 1117, 2159, 2160};
        // The printed table, with half a unit of its last digit as the tolerance.
        const double def[7] = {0.0133333, 0.0266667, 1, 0.9999994, 0.5003767, 5.675806e-7, 0};
        const double def_tol[7] = {5e-8, 5e-8, 0, 5e-8, 5e-8, 5e-14, 0};
        const double cmp[7] = {0, 0.0133333, 0.9866667, 1, 0.5011301, 2.270321e-6, 5.675806e-7};
        const double cmp_tol[7] = {0, 5e-8, 5e-8, 0, 5e-8, 5e-13, 5e-14};
        for (int i = 0; i < 7; i++) {
            double fd = lr_at_step(1.0, ks[i], 75, 2160, 0), fc = lr_at_step(1.0, ks[i], 75, 2160, 1);
            double rd = f_ref((double)ks[i], 75, 2160), rc = f_ref((double)(ks[i] - 1), 75, 2160);
            printf("    k = %4lld: default %.9g, seed_compat %.9g\n", (long long)ks[i], fd, fc);
            EXPECT(fabs(fd - rd) <= 1e-7 * fabs(rd), "default k=%lld: %.12g vs closed form %.12g", (long long)ks[i], fd, rd);
            EXPECT(fabs(fc - rc) <= 1e-7 * fabs(rc), "compat k=%lld: %.12g vs closed form %.12g", (long long)ks[i], fc, rc);
            EXPECT_NEAR(fd, def[i], def_tol[i]);
            EXPECT_NEAR(fc, cmp[i], cmp_tol[i]);
            EXPECT_NEAR(lr_factor(ks[i], 75, 2160), fd, 0.0);
        }
        // lr_at_step scales by lr0.
        EXPECT_REL(lr_at_step(5e-4, 1117, 75, 2160, 0), 5e-4 * f_ref(1117, 75, 2160), 1e-12);
        EXPECT_REL(lr_at_step(3e-4, 1117, 75, 2160, 1), 3e-4 * f_ref(1116, 75, 2160), 1e-12);
    }
    TEST_CASE("LR factors: ImageNet (W = 10000, T = 112590) step 1 is 1e-4 by default and 0 in seed_compat") {
        EXPECT_REL(lr_at_step(1.0, 1, 10000, 112590, 0), 1e-4, 1e-12);
        EXPECT(lr_at_step(1.0, 1, 10000, 112590, 1) == 0.0, "compat step 1: %g", lr_at_step(1.0, 1, 10000, 112590, 1));
        EXPECT_REL(lr_at_step(3e-4, 10000, 10000, 112590, 0), 3e-4, 1e-12);  // the peak at k = W
        EXPECT(lr_at_step(3e-4, 112590, 10000, 112590, 0) == 0.0, "last step not 0");
        // No warmup (W = 0): the cosine starts at once.
        EXPECT_REL(lr_factor(0, 0, 100), 1.0, 1e-15);
        EXPECT_REL(lr_factor(50, 0, 100), 0.5, 1e-12);
    }
    TEST_CASE("clip_factor (fact 19): min(1, c / (n + 1e-6)); n = 4 gives 0.2499999375; off for c <= 0") {
        EXPECT_REL(clip_factor(4.0, 1.0), 0.2499999375, 1e-7);
        EXPECT(clip_factor(0.5, 1.0) == 1.0, "n = 0.5: %.17g", clip_factor(0.5, 1.0));
        EXPECT(clip_factor(0.0, 1.0) == 1.0, "n = 0: %.17g", clip_factor(0.0, 1.0));
        EXPECT_REL(clip_factor(1.0, 1.0), 1.0 / (1.0 + 1e-6), 1e-15);
        EXPECT_REL(clip_factor(10.0, 2.5), 2.5 / (10.0 + 1e-6), 1e-15);
        EXPECT(clip_factor(100.0, 0.0) == 1.0, "clip 0 must be off");
    }
}

// ================================================================ trainer: accumulation, EMA, SAM

#define NB 16  // images in the fixed batch

typedef struct {
    float *images, *targets;  // (NB, img), (NB, C)
    size_t img;
    int C;
} FixedBatch;

// Micro-batch `micro` is slice [micro * t->micro, (micro + 1) * t->micro) of the fixed batch, at every step.
static const void *slice_source(void *ctx, const Trainer *t, int64_t k, int micro, float *images,
                                 float *targets) {
    FixedBatch *fb = ctx;
    size_t i0 = (size_t)micro * t->micro;
    memcpy(images, fb->images + i0 * fb->img, (size_t)t->micro * fb->img * sizeof(float));
    memcpy(targets, fb->targets + i0 * fb->C, (size_t)t->micro * fb->C * sizeof(float));
    return images;
}

static ModelConfig tiny_simplest(float drop_p) {
    ModelConfig c;
    memset(&c, 0, sizeof c);
    c.arch = ARCH_SIMPLEST;
    c.image_size = 8;
    c.patch_size = 4;
    c.channels = 3;
    c.num_classes = 5;
    c.dim = 16;
    c.heads = 2;
    c.mlp_dim = 64;
    c.depth = 7;
    c.eta = 0.9;
    c.gamma_L = 0.005;
    c.qkv_bias = c.mlp_bias = 1;
    c.drop_p = drop_p;
    return c;
}

static Config base_config(int accum) {
    Config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.train.batch_size = NB;
    cfg.train.grad_accum = accum;
    cfg.train.seed = 5;
    cfg.train.warmup_steps = 2;
    cfg.train.clip = 1.0;
    cfg.train.label_smoothing = 0.1;
    cfg.train.ema_every = 5;
    cfg.train.ema_decay = 0.99;
    cfg.train.sam_rho = 0.05;
    cfg.train.sam_every = 1;
    cfg.opt.lr = 1e-2;
    cfg.opt.weight_decay = 0.05;
    snprintf(cfg.opt.weight_decay_mode, sizeof cfg.opt.weight_decay_mode, "l2");
    cfg.opt.beta1 = 0.9;
    cfg.opt.beta2 = 0.999;
    // eps 1e-3 instead of 1e-8: the key part of the qkv bias has an exactly zero gradient (softmax is invariant to a
    // per-row shift), so its computed gradient is fp32 rounding noise (~1e-10) whose sign depends on the summation
    // order; with eps 1e-8 Adam turns that noise into +-lr steps. With 1e-3 such noise moves weights by ~1e-9 lr,
    // while real gradients (1e-3..1) still take Adam-sized steps.
    cfg.opt.eps = 1e-3;
    return cfg;
}

static FixedBatch make_batch(const ModelConfig *mc) {
    FixedBatch fb;
    fb.img = (size_t)mc->channels * mc->image_size * mc->image_size;
    fb.C = mc->num_classes;
    fb.images = malloc(NB * fb.img * sizeof(float));
    fb.targets = calloc((size_t)NB * fb.C, sizeof(float));
    fill_normal(fb.images, NB * fb.img, 1.0, 31);
    for (int i = 0; i < NB; i++) fb.targets[i * fb.C + (i * 7) % fb.C] = 1.0f;
    return fb;
}

static double max_abs(const float *x, size_t n) {
    double m = 0.0;
    for (size_t i = 0; i < n; i++) m = fmax(m, fabs(x[i]));
    return m;
}

static double max_abs_diff(const float *a, const float *b, size_t n) {
    double m = 0.0;
    for (size_t i = 0; i < n; i++) m = fmax(m, fabs((double)a[i] - b[i]));
    return m;
}

static Comm comm1 = {.rank = 0, .world = 1, .local_rank = 0, .local_world = 1, .mpi = 0};

// Runs `steps` trainer steps on a fresh model (init seed 3) and returns the final params (malloc'd).
// Runs `steps` trainer steps on a fresh model (init seed 3); returns the final params (malloc'd) and, in grads, the
// summed gradient of every step (steps x num_params, malloc'd).
static float *train_steps(const ModelConfig *mc, const Config *cfg, FixedBatch *fb, int steps, double *loss_out,
                          float **grads) {
    Model *m = model_create(mc, be, NB / cfg->train.grad_accum);
    model_init(m, 3);
    Trainer t;
    trainer_init(&t, cfg, &comm1, m, 10);
    double loss = 0.0;
    *grads = malloc((size_t)steps * m->num_params * sizeof(float));
    for (int k = 1; k <= steps; k++) {
        StepResult r = trainer_step(&t, k, slice_source, fb);
        loss = r.loss_sum / r.count;
        memcpy(*grads + (size_t)(k - 1) * m->num_params, m->grads, m->num_params * sizeof(float));
    }
    float *w = malloc(m->num_params * sizeof(float));
    memcpy(w, m->params, m->num_params * sizeof(float));
    if (loss_out) *loss_out = loss;
    trainer_free(&t);
    model_free(m);
    return w;
}

static void test_accumulation(void) {
    for (int drop = 0; drop < 2; drop++) {
        char title[160];
        snprintf(title, sizeof title,
                 "gradient accumulation: batch 16 x accum 1 == 4 micro-batches of 4, 3 Adam steps%s",
                 drop ? ", dropout 0.2 (keyed by the position in the global slice)" : "");
        TEST_CASE(title) {
            ModelConfig mc = tiny_simplest(drop ? 0.2f : 0.0f);
            FixedBatch fb = make_batch(&mc);
            Config c1 = base_config(1), c4 = base_config(4);
            double l1, l4;
            float *g1, *g4;
            float *w1 = train_steps(&mc, &c1, &fb, 3, &l1, &g1), *w4 = train_steps(&mc, &c4, &fb, 3, &l4, &g4);
            Model *m0 = model_create(&mc, be, 1);
            model_init(m0, 3);
            size_t n = m0->num_params;
            // The summed gradient of each step (fp32 sums in a different order: ~1e-7 relative).
            for (int k = 0; k < 3; k++) {
                double gs = max_abs(g1 + (size_t)k * n, n), gd = max_abs_diff(g1 + (size_t)k * n, g4 + (size_t)k * n, n);
                printf("    step %d gradient: max |g| %.3e, accum 1 vs 4 max-abs diff %.2e (%.2e of max |g|)\n", k + 1,
                       gs, gd, gd / gs);
                EXPECT(gd <= 4e-6 * gs, "step %d gradients differ by %.3g (scale %.3g)", k + 1, gd, gs);
            }
            double scale = max_abs(w1, n), diff = max_abs_diff(w1, w4, n), moved = max_abs_diff(w1, m0->params, n);
            printf("    weights after 3 steps: max |w| %.3f, moved %.2e from init, accum 1 vs 4 max-abs diff %.2e (%.2e of "
                   "|w|); losses %.9f %.9f\n",
                   scale, moved, diff, diff / scale, l1, l4);
            EXPECT(diff <= 1e-6 * scale, "weights differ by %.3g (scale %.3g)", diff, scale);
            EXPECT(moved >= 1e-3, "training did not move the weights (%.3g)", moved);
            EXPECT_REL(l4, l1, 1e-6);
            if (drop) {  // the masks really depend on the position (so the equality above says something)
                Model *m = model_create(&mc, be, 4);
                model_init(m, 3);
                float *a = malloc((size_t)4 * mc.num_classes * sizeof(float));
                memcpy(m->input, fb.images + 4 * fb.img, 4 * fb.img * sizeof(float));
                model_forward(m, 4, 1, 5, 1, 0);
                memcpy(a, m->logits, (size_t)4 * mc.num_classes * sizeof(float));
                model_forward(m, 4, 1, 5, 1, 4);
                EXPECT(memcmp(a, m->logits, (size_t)4 * mc.num_classes * sizeof(float)) != 0,
                       "dropout masks do not depend on first_pos");
                free(a);
                model_free(m);
            }
            free(g1), free(g4);
            model_free(m0);
            free(w1), free(w4), free(fb.images), free(fb.targets);
        }
    }
}

static void test_ema(void) {
    TEST_CASE("EMA: starts at the init; after steps 5 and 10 equals 0.99 ema + 0.01 w (host fp64), unchanged between") {
        ModelConfig mc = tiny_simplest(0.0f);
        FixedBatch fb = make_batch(&mc);
        Config cfg = base_config(1);
        cfg.train.ema = 1;
        Model *m = model_create(&mc, be, NB);
        model_init(m, 3);
        size_t n = m->num_params;
        Trainer t;
        trainer_init(&t, &cfg, &comm1, m, 10);
        double *ema_ref = malloc(n * sizeof(double));
        for (size_t i = 0; i < n; i++) ema_ref[i] = m->params[i];
        float *ema_prev = malloc(n * sizeof(float));
        memcpy(ema_prev, t.ema, n * sizeof(float));
        EXPECT(memcmp(t.ema, m->params, n * sizeof(float)) == 0, "EMA does not start at the initial weights");
        double worst = 0.0;
        for (int64_t k = 1; k <= 10; k++) {
            trainer_step(&t, k, slice_source, &fb);
            if (k % 5 == 0) {
                for (size_t i = 0; i < n; i++) ema_ref[i] = 0.99 * ema_ref[i] + 0.01 * (double)m->params[i];
                double e = 0.0;
                for (size_t i = 0; i < n; i++) e = fmax(e, fabs(t.ema[i] - ema_ref[i]) / (fabs(ema_ref[i]) + 1e-3));
                printf("    step %lld: EMA vs fp64 recurrence, max rel err %.2e; EMA moved %.2e\n", (long long)k, e,
                       max_abs_diff(t.ema, ema_prev, n));
                worst = fmax(worst, e);
                EXPECT(max_abs_diff(t.ema, ema_prev, n) > 1e-5, "EMA did not move at step %lld", (long long)k);
            } else {
                EXPECT(memcmp(t.ema, ema_prev, n * sizeof(float)) == 0, "EMA changed at step %lld", (long long)k);
            }
            memcpy(ema_prev, t.ema, n * sizeof(float));
        }
        EXPECT(worst <= 1e-6, "EMA off the recurrence by %.3g relative", worst);
        trainer_free(&t);
        model_free(m);
        free(ema_ref), free(ema_prev), free(fb.images), free(fb.targets);
    }
}

// Gradient of the mean training loss at the model's current weights for step k (dropout keys as the trainer uses).
static void host_grad(Model *m, const FixedBatch *fb, const Config *cfg, int64_t k) {
    memcpy(m->input, fb->images, NB * fb->img * sizeof(float));
    memcpy(m->targets, fb->targets, (size_t)NB * fb->C * sizeof(float));
    model_zero_grad(m);
    model_forward(m, NB, 1, (uint64_t)cfg->train.seed, (uint64_t)k, 0);
    model_loss(m, NB, (float)cfg->train.label_smoothing, 1.0f / NB, 1);
    model_backward(m, NB, (uint64_t)cfg->train.seed, (uint64_t)k, 0);
}

static double grad_norm_d(const Model *m) {
    double s = 0.0;
    for (size_t i = 0; i < m->num_params; i++) s += (double)m->grads[i] * m->grads[i];
    return sqrt(s);
}

static void test_sam(void) {
    TEST_CASE("SAM: two steps equal a host reimplementation (e = rho g/|g| with clipped g, second gradient clipped)") {
        ModelConfig mc = tiny_simplest(0.2f);
        FixedBatch fb = make_batch(&mc);
        Config cfg = base_config(1);
        cfg.train.sam = 1;
        cfg.train.clip = 0.05;  // below the gradient norms: both clip factors are active
        cfg.train.sam_rho = 0.05;
        // The trainer.
        Model *m = model_create(&mc, be, NB);
        model_init(m, 3);
        size_t n = m->num_params;
        Trainer t;
        trainer_init(&t, &cfg, &comm1, m, 10);
        float *w_trainer[2];
        for (int64_t k = 1; k <= 2; k++) {
            trainer_step(&t, k, slice_source, &fb);
            w_trainer[k - 1] = malloc(n * sizeof(float));
            memcpy(w_trainer[k - 1], m->params, n * sizeof(float));
        }
        trainer_free(&t);
        // The reimplementation: fp64 perturbation, the model's own forward/backward, optim's Adam.
        model_init(m, 3);
        Adam adam;
        AdamConfig ac = {.lr0 = cfg.opt.lr, .weight_decay = cfg.opt.weight_decay, .beta1 = 0.9, .beta2 = 0.999,
                         .eps = cfg.opt.eps, .decoupled = 0};
        adam_create(&adam, m, &ac);
        float *w0 = malloc(n * sizeof(float)), *g2 = malloc(n * sizeof(float));
        double worst = 0.0;
        for (int64_t k = 1; k <= 2; k++) {
            memcpy(w0, m->params, n * sizeof(float));
            host_grad(m, &fb, &cfg, k);
            double n1 = grad_norm_d(m), c1 = clip_factor(n1, cfg.train.clip), gn = n1 * c1;
            for (size_t i = 0; i < n; i++)
                m->params[i] = (float)(w0[i] + (double)m->grads[i] * c1 * cfg.train.sam_rho / (gn + 1e-12));
            host_grad(m, &fb, &cfg, k);
            double n2 = grad_norm_d(m), c2 = clip_factor(n2, cfg.train.clip);
            memcpy(g2, m->grads, n * sizeof(float));
            memcpy(m->params, w0, n * sizeof(float));
            memcpy(m->grads, g2, n * sizeof(float));
            adam_step(&adam, m, lr_at_step(cfg.opt.lr, k, cfg.train.warmup_steps, 10, 0), c2);
            double scale = max_abs(m->params, n), d = max_abs_diff(m->params, w_trainer[k - 1], n);
            printf("    step %lld: |g| %.4f, |g at w + e| %.4f (clip %.2f); trainer vs host max-abs %.2e (%.2e of |w|)\n",
                   (long long)k, n1, n2, cfg.train.clip, d, d / scale);
            EXPECT(c1 < 1.0 && c2 < 1.0, "clipping inactive (%.3g, %.3g)", c1, c2);
            worst = fmax(worst, d / scale);
        }
        // Adam's first steps are nearly sign(g) lr: a wrong e flips signs and moves weights by ~lr = 1e-2.
        EXPECT(worst <= 1e-6, "SAM trainer vs reimplementation: %.3g of the weight scale", worst);
        // SAM really differs from a plain step (so the comparison above can fail).
        cfg.train.sam = 0;
        model_init(m, 3);
        trainer_init(&t, &cfg, &comm1, m, 10);
        trainer_step(&t, 1, slice_source, &fb);
        trainer_step(&t, 2, slice_source, &fb);
        double plain = max_abs_diff(m->params, w_trainer[1], n);
        printf("    plain (no SAM) vs SAM after 2 steps: max-abs %.2e\n", plain);
        EXPECT(plain > 1e-4, "SAM made no difference (%.3g)", plain);
        trainer_free(&t);
        adam_free(&adam, m);
        model_free(m);
        free(w0), free(g2), free(w_trainer[0]), free(w_trainer[1]), free(fb.images), free(fb.targets);
    }
}

// ================================================================ mixup, Beta, loader

// Reads group structure back from mixed one-hot targets (label i -> class i): partner[i] and lambda per row
// (lambda -1 where the row was mixed with itself).
static void infer_mix(const float *targets, int count, int C, int *partner, double *lam) {
    for (int i = 0; i < count; i++) {
        partner[i] = i;
        lam[i] = -1.0;
        for (int c = 0; c < C; c++)
            if (c != i && targets[(size_t)i * C + c] != 0.0f) partner[i] = c, lam[i] = targets[(size_t)i * C + c];
    }
}

static void test_mixup(void) {
    int count = 16, C = 16, g = 4;
    size_t F = 12;
    float *img0 = malloc(count * F * sizeof(float)), *tg0 = calloc((size_t)count * C, sizeof(float));
    fill_normal(img0, count * F, 1.0, 41);
    for (int i = 0; i < count; i++) tg0[i * C + i] = 1.0f;  // unique labels: the targets reveal the partners
    float *img = malloc(count * F * sizeof(float)), *tg = malloc((size_t)count * C * sizeof(float));
    TEST_CASE("mixup (fact 20): lambda <= 1/2 per group, targets sum to 1, images are the matching convex combinations") {
        int steps_mixed = 0, bad = 0;
        double max_lam = 0.0;
        for (uint64_t step = 1; step <= 60; step++) {
            memcpy(img, img0, count * F * sizeof(float));
            memcpy(tg, tg0, (size_t)count * C * sizeof(float));
            double mean_lam = mixup_apply(img, tg, count, F, C, g, 0.2, 3407, step, 0);
            int partner[16];
            double lam[16], lam_sum = 0.0;
            infer_mix(tg, count, C, partner, lam);
            int groups_known = 0;
            for (int k = 0; k < count / g; k++) {
                double lk = -1.0;
                int seen[16] = {0};
                for (int i = k * g; i < (k + 1) * g; i++) {
                    bad += partner[i] / g != k;  // partners stay within the group
                    if (partner[i] >= 0 && partner[i] < count) bad += seen[partner[i]]++ != 0;  // a permutation
                    if (lam[i] >= 0) {
                        if (lk >= 0) bad += fabs(lam[i] - lk) > 1e-7;  // one lambda per group
                        lk = lam[i];
                    }
                }
                if (lk >= 0) {
                    max_lam = fmax(max_lam, lk);
                    bad += lk > 0.5;
                    lam_sum += lk;
                    groups_known++;
                    // Images: x_i <- (1 - lambda) x_i + lambda x_partner(i).
                    for (int i = k * g; i < (k + 1) * g; i++)
                        for (size_t e = 0; e < F; e++) {
                            double want = (1 - lk) * img0[i * F + e] + lk * img0[partner[i] * F + e];
                            bad += fabs(img[i * F + e] - want) > 1e-6;
                        }
                }
            }
            for (int i = 0; i < count; i++) {
                double s = 0.0;
                for (int c = 0; c < C; c++) s += tg[(size_t)i * C + c];
                bad += fabs(s - 1.0) > 1e-6;
            }
            if (groups_known == count / g) {
                steps_mixed++;
                bad += fabs(mean_lam - lam_sum / groups_known) > 1e-6;  // the returned mean lambda
            }
            bad += mean_lam > 0.5;
        }
        printf("    60 steps x 4 groups: largest lambda %.4f; %d steps with every group's lambda visible\n", max_lam,
               steps_mixed);
        EXPECT(bad == 0, "%d violations", bad);
        EXPECT(steps_mixed >= 30, "too few steps with visible lambdas (%d)", steps_mixed);
    }
    TEST_CASE("mixup: world-size independent (the 16-batch with g = 4 == two 8-halves with group0 = 0 and 2)") {
        memcpy(img, img0, count * F * sizeof(float));
        memcpy(tg, tg0, (size_t)count * C * sizeof(float));
        mixup_apply(img, tg, count, F, C, g, 0.2, 3407, 7, 0);
        float *img2 = malloc(count * F * sizeof(float)), *tg2 = malloc((size_t)count * C * sizeof(float));
        memcpy(img2, img0, count * F * sizeof(float));
        memcpy(tg2, tg0, (size_t)count * C * sizeof(float));
        mixup_apply(img2, tg2, 8, F, C, g, 0.2, 3407, 7, 0);
        mixup_apply(img2 + 8 * F, tg2 + 8 * C, 8, F, C, g, 0.2, 3407, 7, 2);
        EXPECT(memcmp(img, img2, count * F * sizeof(float)) == 0, "images differ");
        EXPECT(memcmp(tg, tg2, (size_t)count * C * sizeof(float)) == 0, "targets differ");
        EXPECT(memcmp(img, img0, count * F * sizeof(float)) != 0, "nothing was mixed");
        // A different step or seed mixes differently.
        memcpy(img2, img0, count * F * sizeof(float));
        memcpy(tg2, tg0, (size_t)count * C * sizeof(float));
        mixup_apply(img2, tg2, count, F, C, g, 0.2, 3407, 8, 0);
        EXPECT(memcmp(img, img2, count * F * sizeof(float)) != 0, "step 7 and 8 mix identically");
        free(img2), free(tg2);
    }
    free(img0), free(tg0), free(img), free(tg);
}

static void test_beta(void) {
    TEST_CASE("rng_beta_sym(0.2): mean 1/2 and variance 1/5.6 over 200k draws (5 standard errors), all in [0, 1]") {
        int n = 200000, outside = 0;
        double *x = malloc(n * sizeof(double)), s = 0.0;
        Rng r = rng_stream(3407, RNG_MIXUP, 1, 0);
        for (int i = 0; i < n; i++) {
            x[i] = rng_beta_sym(&r, 0.2);
            outside += !(x[i] >= 0.0 && x[i] <= 1.0);
            s += x[i];
        }
        double mean = s / n, m2 = 0.0, m4 = 0.0;
        for (int i = 0; i < n; i++) {
            double d = x[i] - mean;
            m2 += d * d, m4 += d * d * d * d;
        }
        m2 /= n, m4 /= n;
        double want_var = 1.0 / 5.6, se_mean = sqrt(want_var / n), se_var = sqrt((m4 - m2 * m2) / n);
        printf("    mean %.5f (se %.1e), variance %.5f (want %.5f, se %.1e)\n", mean, se_mean, m2, want_var, se_var);
        EXPECT(outside == 0, "%d draws outside [0, 1]", outside);
        EXPECT(fabs(mean - 0.5) <= 5 * se_mean, "mean %.5f", mean);
        EXPECT(fabs(m2 - want_var) <= 5 * se_var, "variance %.5f", m2);
        // Beta(1, 1) is uniform: variance 1/12 (the sampler's alpha >= 1 branch).
        Rng r1 = rng_stream(1, RNG_MIXUP, 2, 0);
        double s1 = 0.0, ss1 = 0.0;
        for (int i = 0; i < n; i++) {
            double v = rng_beta_sym(&r1, 1.0);
            s1 += v, ss1 += v * v;
        }
        double mean1 = s1 / n, var1 = ss1 / n - mean1 * mean1;
        EXPECT(fabs(mean1 - 0.5) <= 5 * sqrt(1.0 / 12 / n), "Beta(1,1) mean %.5f", mean1);
        EXPECT(fabs(var1 - 1.0 / 12) <= 5 * sqrt((1.0 / 80 - 1.0 / 144) / n), "Beta(1,1) variance %.5f", var1);
        free(x);
    }
}

static void test_loader(void) {
    TEST_CASE("loader_permutation: a permutation of 0..n-1, deterministic in (seed, epoch), different across epochs") {
        int64_t ns[3] = {1, 1000, 10007};
        for (int k = 0; k < 3; k++) {
            int64_t n = ns[k];
            int64_t *p = malloc(n * sizeof(int64_t)), *q = malloc(n * sizeof(int64_t));
            char *seen = calloc(n, 1);
            loader_permutation(3407, 0, n, p);
            int bad = 0;
            for (int64_t i = 0; i < n; i++) {
                if (p[i] < 0 || p[i] >= n || seen[p[i]]++) bad++;
            }
            EXPECT(bad == 0, "n = %lld: not a permutation (%d bad entries)", (long long)n, bad);
            loader_permutation(3407, 0, n, q);
            EXPECT(memcmp(p, q, n * sizeof(int64_t)) == 0, "n = %lld: not deterministic", (long long)n);
            if (n > 1) {
                loader_permutation(3407, 1, n, q);
                EXPECT(memcmp(p, q, n * sizeof(int64_t)) != 0, "n = %lld: epoch 1 equals epoch 0", (long long)n);
                loader_permutation(3408, 0, n, q);
                EXPECT(memcmp(p, q, n * sizeof(int64_t)) != 0, "n = %lld: seed does not matter", (long long)n);
                int fixed = 0;
                for (int64_t i = 0; i < n; i++) fixed += p[i] == i;
                EXPECT(n < 100 || fixed < n / 50, "n = %lld: %d fixed points: not shuffled", (long long)n, fixed);
            }
            free(p), free(q), free(seen);
        }
        // Uniform over all n! orders (Fisher-Yates, not e.g. Sattolo's cycles): 24000 epochs of n = 4, each of the
        // 24 orders 1000 +- 5 sigma times.
        int counts[256] = {0}, worst = 0;
        for (int64_t e = 0; e < 24000; e++) {
            int64_t p[4];
            loader_permutation(11, e, 4, p);
            counts[p[0] * 64 + p[1] * 16 + p[2] * 4 + p[3]]++;
        }
        int distinct = 0;
        for (int i = 0; i < 256; i++)
            if (counts[i]) distinct++, worst = abs(counts[i] - 1000) > worst ? abs(counts[i] - 1000) : worst;
        printf("    n = 4: %d distinct orders in 24000 epochs, largest deviation from 1000: %d\n", distinct, worst);
        EXPECT(distinct == 24, "%d distinct orders of 4", distinct);
        EXPECT(worst <= 5 * sqrt(1000.0 * 23 / 24), "order counts deviate by %d", worst);
    }
    TEST_CASE("loader_eval_shard: ranks cover [0, n) exactly once, contiguous, sizes within 1, for world 1..8") {
        int64_t ns[3] = {10007, 3, 0};
        for (int k = 0; k < 3; k++) {
            int64_t n = ns[k];
            for (int world = 1; world <= 8; world++) {
                int64_t expect_begin = 0, lo = INT64_MAX, hi = 0;
                int bad = 0;
                for (int r = 0; r < world; r++) {
                    int64_t b, e;
                    loader_eval_shard(n, r, world, &b, &e);
                    bad += b != expect_begin || e < b;
                    expect_begin = e;
                    lo = e - b < lo ? e - b : lo;
                    hi = e - b > hi ? e - b : hi;
                }
                bad += expect_begin != n;
                bad += hi - lo > 1;
                EXPECT(bad == 0, "n = %lld, world %d: shards do not tile [0, n) evenly", (long long)n, world);
            }
        }
    }
}

int main(void) {
    // One thread: the models here are tiny, and on a loaded 2-core machine OpenMP's fork/join costs more than the work.
    be = backend_cpu_create(1);
    test_schedule();
    test_accumulation();
    test_ema();
    test_sam();
    test_mixup();
    test_beta();
    test_loader();
    be->destroy(be);
    return tl_finish();
}
