// checkpoint.c: see checkpoint.h.
#include "checkpoint.h"

#include <cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <ctype.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

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

// A file's tensor is F32 with the model tensor's shape.
static int same_shape(const StTensor *st, const TensorInfo *t) {
    int same = strcmp(st->dtype, "F32") == 0 && st->ndim == t->ndim;
    for (int d = 0; same && d < t->ndim; d++) same = st->shape[d] == t->shape[d];
    return same;
}

// "PATH: tensor 'NAME' is DTYPE [a,b], the model needs F32 [c,d]" and a hint.
static void shape_error(char *err, size_t n, const char *path, const char *name, const StTensor *st,
                        const TensorInfo *t, const char *hint) {
    char want[64] = "", got[64] = "";
    for (int d = 0; d < t->ndim; d++)
        snprintf(want + strlen(want), sizeof want - strlen(want), "%s%d", d ? "," : "", t->shape[d]);
    for (int d = 0; d < st->ndim; d++)
        snprintf(got + strlen(got), sizeof got - strlen(got), "%s%lld", d ? "," : "", (long long)st->shape[d]);
    set_err(err, n, "%s: tensor '%s' is %s [%s], the model needs F32 [%s]%s", path, name, st->dtype, got, want, hint);
}

int weights_read(const Model *m, const char *path, float *params, float *buffers, char *err, size_t n) {
    StFile f;
    if (st_open(path, &f, err, n) != 0) return -1;
    int rc = -1;
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
        if (!same_shape(st, t)) {
            shape_error(err, n, path, name, st, t, "");
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
    rc = 0;
out:
    free(seen);
    st_close(&f);
    return rc;
}

// The next item of a comma-separated list, trimmed, into out (an item too long for out is cut, and flagged by
// *cut); returns where the rest of the list starts, or NULL at its end.
static const char *next_item(const char *p, char *out, size_t n, int *cut) {
    while (*p == ',' || isspace((unsigned char)*p)) p++;
    if (!*p) return NULL;
    size_t len = strcspn(p, ",");
    const char *rest = p + len;
    while (len > 0 && isspace((unsigned char)p[len - 1])) len--;
    *cut = len >= n;
    snprintf(out, n, "%.*s", (int)(*cut ? n - 1 : len), p);
    return rest;
}

// 1 if prefix is name or its start up to a '.': "transformer.layers.1" is layer 1's tensors, not layer 10's.
static int name_has_prefix(const char *name, const char *prefix) {
    size_t len = strlen(prefix);
    return len > 0 && !strncmp(name, prefix, len) && (name[len] == 0 || name[len] == '.' || prefix[len - 1] == '.');
}

// 1 if one of the comma-separated prefixes of list is name's (a cut item, longer than any name, is none).
static int name_in_list(const char *name, const char *list) {
    char item[256];
    int cut;
    for (const char *p = next_item(list, item, sizeof item, &cut); p; p = next_item(p, item, sizeof item, &cut))
        if (!cut && name_has_prefix(name, item)) return 1;
    return 0;
}

// The file's own record of the mode it was trained in (our weights files carry it; a PyTorch state_dict does not).
static int check_init_meta(const Model *m, const StFile *f, const char *path, char *err, size_t n) {
    const char *arch = st_meta(f, "arch"), *compat = st_meta(f, "seed_compat");
    const char *want = m->cfg.arch == ARCH_SIMPLEST ? "simplest" : "simplevit";
    if (arch && strcmp(arch, want))
        return set_err(err, n, "%s holds %s weights, but model.arch is \"%s\"", path, arch, want);
    if (compat && strcmp(compat, m->cfg.seed_compat ? "true" : "false"))
        return set_err(err, n, "%s was trained with model.seed_compat %s, this config says %s", path, compat,
                       m->cfg.seed_compat ? "true" : "false");
    return 0;
}

// A fixed tensor in the file: E-SPA's d and B are the config's (recomputed for its token count), but where the
// shapes agree B's form must match the mode; a seed_compat SimpleViT's to_out must be the identity it stands for.
static int check_init_fixed(const Model *m, const TensorInfo *t, const StTensor *st, const float *data,
                            const char *path, char *err, size_t n) {
    if (!same_shape(st, t)) return 0;
    if (m->cfg.arch == ARCH_SIMPLEST && m->blocks[0].B >= 0 && t == &m->tensors[m->blocks[0].B])
        return check_b_form(m, data, path, err, n);
    if (m->cfg.arch == ARCH_SIMPLEVIT && strstr(t->name, "to_out.weight"))
        return check_identity(data, m->cfg.dim, t->name, path, err, n);
    return 0;
}

int weights_init_read(const Model *m, const char *path, const char *skip, float *params, int *loaded, int *kept,
                      char *err, size_t n) {
    StFile f;
    if (st_open(path, &f, err, n) != 0) return -1;
    int rc = -1;
    *loaded = *kept = 0;
    int *seen = xcalloc((size_t)m->ntensors * sizeof(int), "seen tensors");
    if (check_init_meta(m, &f, path, err, n) != 0) goto out;
    char one[256];  // a prefix that matches nothing is a typo that would load what it meant to skip
    int cut;
    for (const char *p = next_item(skip, one, sizeof one, &cut); p; p = next_item(p, one, sizeof one, &cut)) {
        int hit = 0;
        for (int i = 0; i < m->ntensors && !hit && !cut; i++)
            hit = m->tensors[i].trainable && name_has_prefix(m->tensors[i].name, one);
        if (!hit) {
            set_err(err, n, "model.init_skip: '%s' is the start of no trainable tensor name of this model", one);
            goto out;
        }
    }
    for (int k = 0; k < f.ntensors; k++) {
        const StTensor *st = &f.tensors[k];
        const char *name = strip_prefix(st->name);
        if (name_in_list(name, skip)) continue;
        int i = model_find_tensor(m, name);
        if (i < 0) {
            set_err(err, n, "%s: tensor '%s' has no place in this model config (model.init_skip can leave it out)",
                    path, st->name);
            goto out;
        }
        if (seen[i]) {
            set_err(err, n, "%s: tensor '%s' is given twice", path, name);
            goto out;
        }
        seen[i] = 1;
        const TensorInfo *t = &m->tensors[i];
        if (!t->trainable) {
            // safetensors data need not be 4-byte aligned: read a copy (the same-shape case is all that is checked)
            float *fixed = NULL;
            if (strcmp(st->dtype, "F32") == 0 && st->numel == t->numel) {
                fixed = xmalloc((t->numel ? t->numel : 1) * sizeof(float), "fixed tensor to check");
                memcpy(fixed, st_data(&f, st), t->numel * sizeof(float));
            }
            int bad = fixed && check_init_fixed(m, t, st, fixed, path, err, n) != 0;
            free(fixed);
            if (bad) goto out;
            continue;
        }
        if (!same_shape(st, t)) {
            shape_error(err, n, path, name, st, t, " (model.init_skip can keep it at its random init)");
            goto out;
        }
        float *dst = params + t->offset;  // copied first: the file's data need not be 4-byte aligned
        memcpy(dst, st_data(&f, st), t->numel * sizeof(float));
        for (size_t j = 0; j < t->numel; j++)
            if (!isfinite(dst[j])) {
                set_err(err, n, "%s: tensor '%s' holds %g at element %zu (weights must be finite)", path, name,
                        (double)dst[j], j);
                goto out;
            }
        (*loaded)++;
    }
    for (int i = 0; i < m->ntensors; i++) {
        const TensorInfo *t = &m->tensors[i];
        if (!t->trainable || seen[i]) continue;
        if (!name_in_list(t->name, skip)) {
            set_err(err, n, "%s: tensor '%s' is missing (model.init_skip can keep it at its random init)", path,
                    t->name);
            goto out;
        }
        (*kept)++;
    }
    rc = 0;
out:
    free(seen);
    st_close(&f);
    return rc;
}

int weights_load(Model *m, const char *path, char *err, size_t n) {
    float *params = xmalloc((m->num_params ? m->num_params : 1) * sizeof(float), "weights to load");
    float *buffers = xmalloc((m->num_buffers ? m->num_buffers : 1) * sizeof(float), "buffers to load");
    int rc = weights_read(m, path, params, buffers, err, n);
    if (rc == 0) {
        m->be->upload(m->be, m->params, params, m->num_params * sizeof(float));
        m->be->upload(m->be, m->buffers, buffers, m->num_buffers * sizeof(float));
        m->be->params_changed(m->be, m->params, m->num_params);
    }
    free(params);
    free(buffers);
    return rc;
}

// ---------------------------------------------------------------- Adam state

static const char *const ADAM_SLOT[2] = {"exp_avg", "exp_avg_sq"};

int adam_state_save(const Adam *a, const Model *m, const char *path) {
    Backend *be = m->be;
    size_t np = m->num_params;
    float *mv = xmalloc((np ? 2 * np : 1) * sizeof(float), "Adam state to save");  // (2, num_params): m then v
    be->download(be, mv, a->m, 2 * np * sizeof(float));
    StEntry *e = xcalloc((size_t)(2 * m->ntensors + 1) * sizeof(StEntry), "Adam state entries");
    char (*names)[200] = xcalloc((size_t)(2 * m->ntensors + 1) * 200, "Adam state names");
    int n = 0;
    for (int i = 0; i < m->ntensors; i++) {
        const TensorInfo *t = &m->tensors[i];
        if (!t->trainable) continue;
        for (int w = 0; w < 2; w++) {
            snprintf(names[n], 200, "%s.%s", t->name, ADAM_SLOT[w]);
            e[n] = (StEntry){names[n], "F32", t->ndim, {0}, mv + (size_t)w * np + t->offset};
            for (int d = 0; d < t->ndim; d++) e[n].shape[d] = t->shape[d];
            n++;
        }
    }
    char tbuf[32];
    snprintf(tbuf, sizeof tbuf, "%lld", (long long)a->t);
    const char *keys[] = {"format", "t"}, *vals[] = {"simplest-dist-adam-state-1", tbuf};
    int rc = st_write(path, e, n, keys, vals, 2);
    int saved = errno;
    free(names);
    free(e);
    free(mv);
    errno = saved;
    return rc;
}

int adam_state_read(const Model *m, const char *path, float *m_out, float *v_out, int64_t *t_out, char *err,
                    size_t n) {
    StFile f;
    if (st_open(path, &f, err, n) != 0) return -1;
    int rc = -1;
    const char *fmt = st_meta(&f, "format");
    int64_t t = parse_count(st_meta(&f, "t"));
    if (!fmt || strcmp(fmt, "simplest-dist-adam-state-1") != 0) {
        set_err(err, n, "%s: not an Adam state file", path);
        goto out;
    }
    if (t < 0) {
        set_err(err, n, "%s: Adam state has no step count t", path);
        goto out;
    }
    int want = 0;
    for (int i = 0; i < m->ntensors; i++) {
        const TensorInfo *ti = &m->tensors[i];
        if (!ti->trainable) continue;
        for (int w = 0; w < 2; w++, want++) {
            char name[200];
            snprintf(name, sizeof name, "%s.%s", ti->name, ADAM_SLOT[w]);
            const StTensor *st = st_find(&f, name);
            int same = st && !strcmp(st->dtype, "F32") && st->ndim == ti->ndim;
            for (int d = 0; same && d < ti->ndim; d++) same = st->shape[d] == ti->shape[d];
            if (!same) {
                set_err(err, n, "%s: Adam state tensor '%s' is %s", path, name,
                        st ? "not F32 of the parameter's shape" : "missing");
                goto out;
            }
            float *dst = (w ? v_out : m_out) + ti->offset;
            memcpy(dst, st_data(&f, st), ti->numel * sizeof(float));
            for (size_t j = 0; j < ti->numel; j++)
                if (!isfinite(dst[j]) || (w && dst[j] < 0.0f)) {
                    set_err(err, n, "%s: Adam state tensor '%s' holds %g at element %zu (must be finite%s)", path,
                            name, (double)dst[j], j, w ? " and >= 0" : "");
                    goto out;
                }
        }
    }
    if (f.ntensors != want) {  // st_open refuses duplicate names, so extra ones are unknown ones
        set_err(err, n, "%s: Adam state has %d tensors, this model needs %d (another model?)", path, f.ntensors, want);
        goto out;
    }
    *t_out = t;
    rc = 0;
out:
    st_close(&f);
    return rc;
}

// ---------------------------------------------------------------- trainer state

int train_state_write(const char *path, const TrainState *s) {
    cJSON *o = cJSON_CreateObject();
    char num[40];
    cJSON_AddStringToObject(o, "format", "simplest-dist-trainer-1");
    snprintf(num, sizeof num, "%lld", (long long)s->step);
    cJSON_AddRawToObject(o, "step", num);
    if (s->best_top1 >= 0) {
        snprintf(num, sizeof num, "%.17g", s->best_top1);
        cJSON_AddRawToObject(o, "best_top1", num);
        snprintf(num, sizeof num, "%lld", (long long)s->best_step);
        cJSON_AddRawToObject(o, "best_step", num);
    }
    if (s->has_eval) {
        cJSON *e = cJSON_AddObjectToObject(o, "eval");
        snprintf(num, sizeof num, "%lld", (long long)s->eval_step);
        cJSON_AddRawToObject(e, "step", num);
        const char *names[3] = {"top1", "top5", "loss"};
        const double vals[3] = {s->eval_top1, s->eval_top5, s->eval_loss};
        for (int i = 0; i < 3; i++) {
            snprintf(num, sizeof num, "%.17g", isfinite(vals[i]) ? vals[i] : -1.0);  // JSON has no NaN
            cJSON_AddRawToObject(e, names[i], num);
        }
    }
    cJSON_AddNumberToObject(o, "world", s->world);
    cJSON *iv = cJSON_AddObjectToObject(o, "interval");
    snprintf(num, sizeof num, "%.17g", s->interval_loss);
    cJSON_AddRawToObject(iv, "loss_sum", num);
    snprintf(num, sizeof num, "%lld", (long long)s->interval_count);
    cJSON_AddRawToObject(iv, "count", num);
    cJSON *cfg = cJSON_Parse(s->config_json ? s->config_json : "{}");
    cJSON_AddItemToObject(o, "config", cfg ? cfg : cJSON_CreateObject());
    char *text = cJSON_Print(o);
    cJSON_Delete(o);
    int rc = write_file_atomic(path, text, strlen(text));
    int saved = errno;
    free(text);
    errno = saved;
    return rc;
}

// A whole number in [lo, hi] from a JSON number (exact: no fraction, within 2^53).
static int json_count(const cJSON *v, double lo, double hi, int64_t *out) {
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble) || v->valuedouble != floor(v->valuedouble) ||
        v->valuedouble < lo || v->valuedouble > hi)
        return -1;
    *out = (int64_t)v->valuedouble;
    return 0;
}

static int read_eval(const cJSON *e, TrainState *s) {
    const cJSON *v[3] = {cJSON_GetObjectItemCaseSensitive(e, "top1"), cJSON_GetObjectItemCaseSensitive(e, "top5"),
                         cJSON_GetObjectItemCaseSensitive(e, "loss")};
    if (!cJSON_IsObject(e) || json_count(cJSON_GetObjectItemCaseSensitive(e, "step"), 1, (double)s->step,
                                         &s->eval_step) != 0)
        return -1;
    for (int i = 0; i < 3; i++)
        if (!cJSON_IsNumber(v[i]) || !isfinite(v[i]->valuedouble)) return -1;
    s->eval_top1 = v[0]->valuedouble;
    s->eval_top5 = v[1]->valuedouble;
    s->eval_loss = v[2]->valuedouble;
    s->has_eval = 1;
    return 0;
}

int train_state_read(const char *path, TrainState *s, char *err, size_t n) {
    memset(s, 0, sizeof *s);
    s->best_top1 = -1.0;
    size_t len;
    char *text = (char *)read_file_all(path, &len);
    if (!text) return set_err(err, n, "%s: cannot read: %s", path, strerror(errno));
    cJSON *o = strlen(text) == len ? cJSON_Parse(text) : NULL;
    free(text);
    int rc = -1;
    const cJSON *fmt = cJSON_GetObjectItemCaseSensitive(o, "format");
    const cJSON *cfg = cJSON_GetObjectItemCaseSensitive(o, "config");
    const cJSON *best = cJSON_GetObjectItemCaseSensitive(o, "best_top1");
    const cJSON *eval = cJSON_GetObjectItemCaseSensitive(o, "eval");
    const cJSON *iv = cJSON_GetObjectItemCaseSensitive(o, "interval");
    const cJSON *iloss = cJSON_GetObjectItemCaseSensitive(iv, "loss_sum");
    int64_t world = 0;
    if (!cJSON_IsObject(o) || !cJSON_IsString(fmt) || strcmp(fmt->valuestring, "simplest-dist-trainer-1") != 0) {
        set_err(err, n, "%s: not a trainer state file", path);
    } else if (json_count(cJSON_GetObjectItemCaseSensitive(o, "step"), 0, 9007199254740992.0, &s->step) != 0) {
        set_err(err, n, "%s: 'step' must be a whole number of steps", path);
    } else if (json_count(cJSON_GetObjectItemCaseSensitive(o, "world"), 1, 1 << 24, &world) != 0) {
        set_err(err, n, "%s: 'world' must be a rank count", path);
    } else if (!cJSON_IsObject(cfg)) {
        set_err(err, n, "%s: 'config' must be the run's config object", path);
    } else if (best && (!cJSON_IsNumber(best) || !(best->valuedouble >= 0.0 && best->valuedouble <= 1.0) ||
                        json_count(cJSON_GetObjectItemCaseSensitive(o, "best_step"), 1, (double)s->step,
                                   &s->best_step) != 0)) {
        set_err(err, n, "%s: 'best_top1' must be in 0 .. 1 with a 'best_step' in 1 .. step", path);
    } else if (!cJSON_IsObject(iv) || !cJSON_IsNumber(iloss) || !isfinite(iloss->valuedouble) ||
               iloss->valuedouble < 0 ||
               json_count(cJSON_GetObjectItemCaseSensitive(iv, "count"), 0, 9007199254740992.0,
                          &s->interval_count) != 0) {
        set_err(err, n, "%s: 'interval' must hold a finite 'loss_sum' >= 0 and a whole 'count' >= 0", path);
    } else if (eval && read_eval(eval, s) != 0) {
        set_err(err, n, "%s: 'eval' must hold a 'step' in 1 .. step and numbers 'top1', 'top5', 'loss'", path);
    } else {
        s->world = (int)world;
        s->interval_loss = iloss->valuedouble;
        if (best) s->best_top1 = best->valuedouble;
        s->config_json = cJSON_PrintUnformatted(cfg);
        rc = 0;
    }
    cJSON_Delete(o);
    return rc;
}

// ---------------------------------------------------------------- checkpoint directories

void ckpt_dir(char *buf, size_t n, const char *run_dir, int64_t step) {
    snprintf(buf, n, "%s/checkpoints/step_%08lld", run_dir, (long long)step);
}

// Deletes a directory of plain files (a checkpoint's); a missing one is fine. DONE goes first: a crash part way
// leaves an incomplete directory, never one that claims to be complete with files missing.
static int remove_flat_dir(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return errno == ENOENT ? 0 : -1;
    struct dirent *e;
    char path[1400];
    snprintf(path, sizeof path, "%s/DONE", dir);
    if (unlink(path) != 0 && errno != ENOENT) {
        closedir(d);
        return -1;
    }
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        unlink(path);
    }
    closedir(d);
    return rmdir(dir);
}

// "step_<digits>" (suffix "") or "step_<digits>.tmp" (suffix ".tmp") exactly: the step, or -1.
static int64_t step_of(const char *name, const char *suffix) {
    size_t n = strlen(name), k = strlen(suffix);
    if (n < 5 + k || strncmp(name, "step_", 5) != 0 || strcmp(name + n - k, suffix) != 0) return -1;
    char digits[32];
    if (n - 5 - k >= sizeof digits) return -1;
    memcpy(digits, name + 5, n - 5 - k);
    digits[n - 5 - k] = 0;
    return parse_count(digits);
}

void ckpt_tidy(const char *run_dir) {
    char root[1200];
    snprintf(root, sizeof root, "%s/checkpoints", run_dir);
    DIR *d = opendir(root);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d))) {
        int64_t t = step_of(e->d_name, ".tmp"), c = step_of(e->d_name, "");
        char path[1600], done[1700], dir[1200];
        snprintf(path, sizeof path, "%s/%s", root, e->d_name);
        snprintf(done, sizeof done, "%s/DONE", path);
        if (t >= 0) {
            ckpt_dir(dir, sizeof dir, run_dir, t);
            char dir_done[1300];
            snprintf(dir_done, sizeof dir_done, "%s/DONE", dir);
            // complete but not yet renamed (a commit that replaced the same step was cut short): finish it, over
            // an incomplete step_N; beside a complete step_N (the same step's bits) it is redundant
            if (!(path_exists(done) && !path_exists(dir_done) && remove_flat_dir(dir) == 0 && rename(path, dir) == 0))
                remove_flat_dir(path);
        } else if (c >= 0 && !path_exists(done)) {
            remove_flat_dir(path);  // a crash while pruning it
        }
    }
    closedir(d);
}

int ckpt_begin(const char *run_dir, int64_t step, char *tmp, size_t n) {
    char root[1200];
    snprintf(root, sizeof root, "%s/checkpoints", run_dir);
    if (mkdir_p(root) != 0) return -1;
    ckpt_tidy(run_dir);  // what killed runs left, a step_N.tmp among it
    char dir[1200];
    ckpt_dir(dir, sizeof dir, run_dir, step);
    snprintf(tmp, n, "%s.tmp", dir);
    return mkdir(tmp, 0755);
}

int64_t ckpt_bytes(const char *run_dir, int64_t step) {
    char dir[1200], path[1500];
    ckpt_dir(dir, sizeof dir, run_dir, step);
    DIR *d = opendir(dir);
    if (!d) return 0;
    int64_t total = 0;
    struct dirent *e;
    struct stat st;
    while ((e = readdir(d)))
        if (snprintf(path, sizeof path, "%s/%s", dir, e->d_name) > 0 && stat(path, &st) == 0 && S_ISREG(st.st_mode))
            total += st.st_size;
    closedir(d);
    return total;
}

void ckpt_abandon(const char *run_dir, int64_t step) {
    char dir[1200], tmp[1300];
    ckpt_dir(dir, sizeof dir, run_dir, step);
    snprintf(tmp, sizeof tmp, "%s.tmp", dir);
    remove_flat_dir(tmp);
}

static int cmp_desc(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x < y) - (x > y);
}

int ckpt_list(const char *run_dir, int64_t **steps) {
    *steps = NULL;
    char root[1200];
    snprintf(root, sizeof root, "%s/checkpoints", run_dir);
    DIR *d = opendir(root);
    if (!d) return 0;
    int count = 0, cap = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        int64_t st = step_of(e->d_name, "");
        char done[1600];
        snprintf(done, sizeof done, "%s/%s/DONE", root, e->d_name);
        if (st < 0 || !path_exists(done)) continue;
        if (count == cap) {
            cap = cap ? 2 * cap : 16;
            int64_t *grown = realloc(*steps, (size_t)cap * sizeof(int64_t));
            if (!grown) DIE("out of memory listing checkpoints");
            *steps = grown;
        }
        (*steps)[count++] = st;
    }
    closedir(d);
    if (count) qsort(*steps, (size_t)count, sizeof(int64_t), cmp_desc);
    return count;
}

int ckpt_commit(const char *run_dir, int64_t step, int keep) {
    char root[1200], dir[1200], tmp[1300], path[1400];
    snprintf(root, sizeof root, "%s/checkpoints", run_dir);
    ckpt_dir(dir, sizeof dir, run_dir, step);
    snprintf(tmp, sizeof tmp, "%s.tmp", dir);
    snprintf(path, sizeof path, "%s/DONE", tmp);
    char text[64];
    int len = snprintf(text, sizeof text, "step %lld\n", (long long)step);
    // every file is already fsynced (write_file_atomic); DONE and the directory entries follow them
    if (write_file_atomic(path, text, (size_t)len) != 0 || fsync_path(tmp) != 0) return -1;
    // the same step written again (a resume from an older one): a crash between the two leaves step_N.tmp with its
    // DONE, which ckpt_tidy completes
    if (remove_flat_dir(dir) != 0) return -1;
    if (rename(tmp, dir) != 0) return -1;
    fsync_path(root);
    // complete from here on: what follows is bookkeeping, and its failures are warnings
    const char *base = strrchr(dir, '/') + 1;
    len = snprintf(text, sizeof text, "%s\n", base);
    snprintf(path, sizeof path, "%s/latest", root);
    if (write_file_atomic(path, text, (size_t)len) != 0)
        fprintf(stderr, "simplest-dist: warning: cannot write %s: %s\n", path, strerror(errno));
    int64_t *steps;
    int count = ckpt_list(run_dir, &steps), kept = 0;
    for (int i = 0; i < count; i++) {  // newest first; only older steps than this one (never a newer one)
        if (steps[i] > step || ++kept <= keep) continue;
        char old[1200];
        ckpt_dir(old, sizeof old, run_dir, steps[i]);
        remove_flat_dir(old);
    }
    free(steps);
    return 0;
}

int ckpt_set_aside(const char *run_dir, int64_t step) {
    char dir[1200], aside[1300];
    ckpt_dir(dir, sizeof dir, run_dir, step);
    snprintf(aside, sizeof aside, "%s.unreadable", dir);
    for (int i = 2; path_exists(aside); i++) snprintf(aside, sizeof aside, "%s.unreadable.%d", dir, i);
    return rename(dir, aside);
}
