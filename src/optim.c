// optim.c: see optim.h.
#include "optim.h"

#include <math.h>

#include "util.h"

double lr_factor(int64_t s, int64_t W, int64_t T) {
    if (s < W) return (double)s / (double)(W > 1 ? W : 1);
    int64_t span = T - W > 1 ? T - W : 1;
    double f = 0.5 * (1.0 + cos(M_PI * (double)(s - W) / (double)span));
    return f > 0.0 ? f : 0.0;
}

double lr_at_step(double lr0, int64_t k, int64_t W, int64_t T, int seed_compat) {
    return lr0 * lr_factor(seed_compat ? k - 1 : k, W, T);
}

double clip_factor(double norm, double clip) {
    if (clip <= 0.0) return 1.0;
    double f = clip / (norm + 1e-6);
    return f < 1.0 ? f : 1.0;
}

void adam_create(Adam *a, const Model *model, const AdamConfig *cfg) {
    Backend *be = model->be;
    a->cfg = *cfg;
    a->m = be->alloc(be, 2 * model->num_params * sizeof(float), "Adam moments");  // m then v, one allocation
    a->v = a->m + model->num_params;
    a->t = 0;
}

void adam_free(Adam *a, const Model *model) {
    model->be->free(model->be, a->m);
}

void adam_step(Adam *a, Model *model, double lr, double grad_scale) {
    Backend *be = model->be;
    a->t++;
    AdamArgs args = {.lr = (float)lr,
                     .beta1 = (float)a->cfg.beta1,
                     .beta2 = (float)a->cfg.beta2,
                     .eps = (float)a->cfg.eps,
                     .decoupled = a->cfg.decoupled,
                     .t = a->t,
                     .grad_scale = (float)grad_scale};
    // Runs of consecutive trainable tensors with the same decay flag go in one call.
    int i = 0;
    while (i < model->ntensors) {
        const TensorInfo *t = &model->tensors[i];
        if (!t->trainable) {
            i++;
            continue;
        }
        size_t begin = t->offset, end = t->offset + t->numel;
        int decay = t->decay, j = i + 1;
        for (; j < model->ntensors; j++) {
            const TensorInfo *u = &model->tensors[j];
            if (!u->trainable) continue;
            if (u->decay != decay || u->offset != end) break;
            end = u->offset + u->numel;
        }
        args.weight_decay = decay ? (float)a->cfg.weight_decay : 0.0f;
        be->adam_step(be, model->params + begin, model->grads + begin, a->m + begin, a->v + begin, end - begin,
                      &args);
        i = j;
    }
    be->params_changed(be, model->params, model->num_params);
}

double grad_global_norm(const Model *model) {
    return sqrt(model->be->sumsq(model->be, model->grads, model->num_params));
}
