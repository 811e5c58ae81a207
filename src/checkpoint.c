// checkpoint.c: see checkpoint.h.
#include "checkpoint.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "safetensors.h"
#include "util.h"

int weights_save(const Model *m, const char *path, const float *host_params, const char *config_json, int64_t step,
                 int ema) {
    Backend *be = m->be;
    float *params = xmalloc(m->num_params * sizeof(float), "weights to save");
    float *buffers = xmalloc((m->num_buffers ? m->num_buffers : 1) * sizeof(float), "buffers to save");
    if (host_params)
        memcpy(params, host_params, m->num_params * sizeof(float));
    else
        be->download(be, params, m->params, m->num_params * sizeof(float));
    be->download(be, buffers, m->buffers, m->num_buffers * sizeof(float));
    StEntry *e = xcalloc((size_t)m->ntensors * sizeof(StEntry), "safetensors entries");
    for (int i = 0; i < m->ntensors; i++) {
        const TensorInfo *t = &m->tensors[i];
        e[i].name = t->name;
        e[i].dtype = "F32";
        e[i].ndim = t->ndim;
        for (int d = 0; d < t->ndim; d++) e[i].shape[d] = t->shape[d];
        e[i].data = (t->trainable ? params : buffers) + t->offset;
    }
    char stepbuf[32];
    snprintf(stepbuf, sizeof stepbuf, "%lld", (long long)step);
    const char *keys[] = {"format", "arch", "seed_compat", "step", "ema", "config"};
    const char *vals[] = {"simplest-dist-weights-1", m->cfg.arch == ARCH_SIMPLEST ? "simplest" : "simplevit",
                          m->cfg.seed_compat ? "true" : "false", stepbuf, ema ? "true" : "false",
                          config_json ? config_json : "{}"};
    int rc = st_write(path, e, m->ntensors, keys, vals, 6);
    free(e);
    free(params);
    free(buffers);
    return rc;
}

// Checks the form of the first layer's B against the mode: default rows of exp(B) sum to 1 within 1e-4.
static int check_b_form(const Model *m, const float *B, const char *path, char *err, size_t n) {
    int N = m->N;
    double worst = 0.0;
    for (int i = 0; i < N; i++) {
        double s = 0.0;
        for (int j = 0; j < N; j++) s += exp((double)B[(size_t)i * N + j]);
        worst = fmax(worst, fabs(s - 1.0));
    }
    int row_form = worst <= 1e-4;
    if (N > 1 && row_form == m->cfg.seed_compat)
        return set_err(err, n, "%s: transformer.layers.0.B is in the %s form but model.seed_compat is %s", path,
                    row_form ? "default (row-normalized)" : "seed_compat (column-normalized)",
                    m->cfg.seed_compat ? "true" : "false");
    return 0;
}

static int check_identity(const float *W, int D, const char *name, const char *path, char *err, size_t n) {
    for (int i = 0; i < D; i++)
        for (int j = 0; j < D; j++)
            if (W[(size_t)i * D + j] != (i == j ? 1.0f : 0.0f))
                return set_err(err, n, "%s: %s must be the identity with model.seed_compat (the reference has no to_out)",
                            path, name);
    return 0;
}

static const char *strip_prefix(const char *name) {
    const char *pre = "_orig_mod.";
    return strncmp(name, pre, strlen(pre)) == 0 ? name + strlen(pre) : name;
}

int weights_load(Model *m, const char *path, char *err, size_t n) {
    StFile f;
    if (st_open(path, &f, err, n) != 0) return -1;
    int rc = -1;
    float *params = xmalloc(m->num_params * sizeof(float), "weights to load");
    float *buffers = xmalloc((m->num_buffers ? m->num_buffers : 1) * sizeof(float), "buffers to load");
    int *seen = xcalloc((size_t)m->ntensors * sizeof(int), "seen tensors");
    for (int k = 0; k < f.ntensors; k++) {
        const StTensor *st = &f.tensors[k];
        const char *name = strip_prefix(st->name);
        int i = model_find_tensor(m, name);
        if (i < 0) {
            set_err(err, n, "%s: unexpected tensor '%s' for this model config", path, st->name);
            goto out;
        }
        if (seen[i]) {  // "x" and "_orig_mod.x" in one file
            set_err(err, n, "%s: tensor '%s' is given twice", path, name);
            goto out;
        }
        const TensorInfo *t = &m->tensors[i];
        int same = strcmp(st->dtype, "F32") == 0 && st->ndim == t->ndim;
        for (int d = 0; same && d < t->ndim; d++) same = st->shape[d] == t->shape[d];
        if (!same) {
            char want[64] = "", got[64] = "";
            for (int d = 0; d < t->ndim; d++)
                snprintf(want + strlen(want), sizeof want - strlen(want), "%s%d", d ? "," : "", t->shape[d]);
            for (int d = 0; d < st->ndim; d++)
                snprintf(got + strlen(got), sizeof got - strlen(got), "%s%lld", d ? "," : "",
                         (long long)st->shape[d]);
            set_err(err, n, "%s: tensor '%s' is %s [%s], the model needs F32 [%s]", path, name, st->dtype, got, want);
            goto out;
        }
        float *dst = (t->trainable ? params : buffers) + t->offset;
        memcpy(dst, st_data(&f, st), t->numel * sizeof(float));
        for (size_t j = 0; j < t->numel; j++)
            if (!isfinite(dst[j])) {  // a diverged run's weights: nothing can be trained or evaluated from them
                set_err(err, n, "%s: tensor '%s' holds %g at element %zu (weights must be finite)", path, name,
                        (double)dst[j], j);
                goto out;
            }
        seen[i] = 1;
    }
    for (int i = 0; i < m->ntensors; i++)
        if (!seen[i]) {
            set_err(err, n, "%s: tensor '%s' is missing", path, m->tensors[i].name);
            goto out;
        }
    if (m->cfg.arch == ARCH_SIMPLEST) {
        if (check_b_form(m, buffers + m->tensors[m->blocks[0].B].offset, path, err, n) != 0) goto out;
    } else if (m->cfg.seed_compat) {
        for (int l = 0; l < m->cfg.depth; l++) {
            const TensorInfo *t = &m->tensors[m->blocks[l].out_w];
            if (check_identity(buffers + t->offset, m->cfg.dim, t->name, path, err, n) != 0) goto out;
        }
    }
    m->be->upload(m->be, m->params, params, m->num_params * sizeof(float));
    m->be->upload(m->be, m->buffers, buffers, m->num_buffers * sizeof(float));
    m->be->params_changed(m->be, m->params, m->num_params);
    rc = 0;
out:
    free(params);
    free(buffers);
    free(seen);
    st_close(&f);
    return rc;
}
