// optim.h: the LR schedule, global-norm clipping, Adam (L2 or decoupled weight decay, over the decay groups of the
// parameter table) and the weight EMA (spec/model.md §12.4-12.8).
#pragma once
#include <stdint.h>

#include "model.h"

// f(s): linear warmup over W steps, then half-cosine to zero at T (§12.6).
double lr_factor(int64_t s, int64_t W, int64_t T);
// The LR of optimizer step k = 1..T: lr0 f(k), or lr0 f(k - 1) in seed_compat.
double lr_at_step(double lr0, int64_t k, int64_t W, int64_t T, int seed_compat);
// min(1, clip / (norm + 1e-6)); 1 when clip <= 0 (off).
double clip_factor(double norm, double clip);

typedef struct {
    double lr0, weight_decay, beta1, beta2, eps;
    int decoupled;
} AdamConfig;

typedef struct {
    AdamConfig cfg;
    float *m, *v;  // device, num_params each, in one allocation (v = m + num_params)
    int64_t t;     // steps taken
} Adam;

void adam_create(Adam *a, const Model *model, const AdamConfig *cfg);
void adam_free(Adam *a, const Model *model);
// One Adam step over every trainable tensor at learning rate lr, with the gradient scaled by grad_scale first.
void adam_step(Adam *a, Model *model, double lr, double grad_scale);

// The global gradient norm sqrt(sum g^2) over all trainable parameters.
double grad_global_norm(const Model *model);
