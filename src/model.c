// model.c: see model.h. Forward and backward are written layer by layer against the backend ops.
#include "model.h"

#include <lapacke.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rng.h"
#include "signalprop.h"
#include "util.h"

// ---------------------------------------------------------------- config and table

int model_config_check(const ModelConfig *c, char *err, size_t n) {
    if (c->image_size <= 0 || c->patch_size <= 0 || c->image_size % c->patch_size != 0) {
        snprintf(err, n, "model.image_size (%d) must be a positive multiple of model.patch_size (%d)", c->image_size,
                 c->patch_size);
        return -1;
    }
    if (c->dim <= 0 || c->dim % 4 != 0) {
        snprintf(err, n, "model.dim (%d) must be a positive multiple of 4 (sin-cos posemb)", c->dim);
        return -1;
    }
    if (c->heads <= 0 || c->dim % c->heads != 0) {
        snprintf(err, n, "model.dim (%d) must be divisible by model.heads (%d)", c->dim, c->heads);
        return -1;
    }
    if (c->dim / 4 < 2) {
        snprintf(err, n, "model.dim (%d) must be at least 8 (posemb needs dim/4 >= 2)", c->dim);
        return -1;
    }
    if (c->depth <= 0 || c->mlp_dim <= 0 || c->num_classes <= 0 || c->channels <= 0) {
        snprintf(err, n, "model.depth, model.mlp_dim, model.num_classes and model.channels must be positive");
        return -1;
    }
    if (c->drop_p < 0.0f || c->drop_p >= 1.0f) {
        snprintf(err, n, "model.drop_p (%g) must be in [0, 1)", c->drop_p);
        return -1;
    }
    if (c->arch == ARCH_SIMPLEST) {
        double a;
        char why[256];
        if (tat_slope(c->depth, c->eta, &a, why, sizeof why) != 0) {
            snprintf(err, n, "model.depth %d with model.eta %g: %s", c->depth, c->eta, why);
            return -1;
        }
    }
    return 0;
}

typedef struct {
    TensorInfo *t;
    int n, cap;
    size_t nparams, nbuffers;
} TableBuilder;

// Appends a tensor; trainable ones go to params, fixed ones to buffers.
static int add_tensor(TableBuilder *tb, int trainable, int ndim, const int *shape, const char *fmt, ...) {
    if (tb->n == tb->cap) {
        tb->cap = tb->cap ? 2 * tb->cap : 64;
        tb->t = realloc(tb->t, (size_t)tb->cap * sizeof(TensorInfo));
        CHECK(tb->t, "out of memory growing the tensor table");
    }
    TensorInfo *t = &tb->t[tb->n];
    memset(t, 0, sizeof *t);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t->name, sizeof t->name, fmt, ap);
    va_end(ap);
    t->ndim = ndim;
    t->numel = 1;
    for (int i = 0; i < ndim; i++) {
        t->shape[i] = shape[i];
        t->numel *= (size_t)shape[i];
    }
    t->trainable = trainable;
    t->decay = trainable && strstr(t->name, "bias") == NULL;
    if (trainable) {
        t->offset = tb->nparams;
        tb->nparams += t->numel;
    } else {
        t->offset = tb->nbuffers;
        tb->nbuffers += t->numel;
    }
    return tb->n++;
}

#define SHAPE(...) (int[]){__VA_ARGS__}
#define NDIM(...) (int)(sizeof((int[]){__VA_ARGS__}) / sizeof(int))
#define ADD(tb, trainable, shape_list, ...) \
    add_tensor(tb, trainable, NDIM shape_list, SHAPE shape_list, __VA_ARGS__)

static void build_table(Model *m) {
    const ModelConfig *c = &m->cfg;
    int D = c->dim, M = c->mlp_dim, C = c->num_classes, p = c->patch_size, N = m->N;
    TableBuilder tb = {0};
    m->blocks = xmalloc((size_t)c->depth * sizeof(BlockTensors), "block table");
    m->block_params = xmalloc((size_t)(c->depth + 1) * sizeof(size_t), "block ranges");
    m->patch_w = ADD(&tb, 1, (D, c->channels, p, p), "to_patch_embedding.weight");
    m->patch_b = ADD(&tb, 1, (D), "to_patch_embedding.bias");
    m->patch_params = tb.nparams;
    m->head_ln_w = m->head_ln_b = -1;
    for (int i = 0; i < c->depth; i++) {
        m->block_params[i] = tb.nparams;
        BlockTensors *bt = &m->blocks[i];
        memset(bt, -1, sizeof *bt);
        if (c->arch == ARCH_SIMPLEST) {
            bt->d = ADD(&tb, 0, (1, 1, N, 1), "transformer.layers.%d.d", 2 * i);
            bt->B = ADD(&tb, 0, (1, 1, N, N), "transformer.layers.%d.B", 2 * i);
            bt->qkv_w = ADD(&tb, 1, (3 * D, D), "transformer.layers.%d.to_qkv.weight", 2 * i);
            if (c->qkv_bias) bt->qkv_b = ADD(&tb, 1, (3 * D), "transformer.layers.%d.to_qkv.bias", 2 * i);
            bt->fc1_w = ADD(&tb, 1, (M, D), "transformer.layers.%d.layer1.lin.weight", 2 * i + 1);
            if (c->mlp_bias) bt->fc1_b = ADD(&tb, 1, (M), "transformer.layers.%d.layer1.lin.bias", 2 * i + 1);
            bt->fc2_w = ADD(&tb, 1, (D, M), "transformer.layers.%d.layer2.lin.weight", 2 * i + 1);
            if (c->mlp_bias) bt->fc2_b = ADD(&tb, 1, (D), "transformer.layers.%d.layer2.lin.bias", 2 * i + 1);
        } else {
            bt->ln1_w = ADD(&tb, 1, (D), "transformer.layers.%d.0.norm.weight", i);
            bt->ln1_b = ADD(&tb, 1, (D), "transformer.layers.%d.0.norm.bias", i);
            bt->qkv_w = ADD(&tb, 1, (3 * D, D), "transformer.layers.%d.0.to_qkv.weight", i);
            // seed_compat: the reference never applied to_out; it is stored as the fixed identity.
            bt->out_w = ADD(&tb, !c->seed_compat, (D, D), "transformer.layers.%d.0.to_out.weight", i);
            bt->ln2_w = ADD(&tb, 1, (D), "transformer.layers.%d.1.ff.0.weight", i);
            bt->ln2_b = ADD(&tb, 1, (D), "transformer.layers.%d.1.ff.0.bias", i);
            bt->fc1_w = ADD(&tb, 1, (M, D), "transformer.layers.%d.1.ff.1.weight", i);
            bt->fc1_b = ADD(&tb, 1, (M), "transformer.layers.%d.1.ff.1.bias", i);
            bt->fc2_w = ADD(&tb, 1, (D, M), "transformer.layers.%d.1.ff.3.weight", i);
            bt->fc2_b = ADD(&tb, 1, (D), "transformer.layers.%d.1.ff.3.bias", i);
        }
    }
    m->block_params[c->depth] = tb.nparams;
    if (c->arch == ARCH_SIMPLEST) {
        m->head_w = ADD(&tb, 1, (C, D), "linear_head.weight");
        m->head_b = ADD(&tb, 1, (C), "linear_head.bias");
    } else {
        m->head_ln_w = ADD(&tb, 1, (D), "linear_head.0.weight");
        m->head_ln_b = ADD(&tb, 1, (D), "linear_head.0.bias");
        m->head_w = ADD(&tb, 1, (C, D), "linear_head.1.weight");
        m->head_b = ADD(&tb, 1, (C), "linear_head.1.bias");
    }
    m->tensors = tb.t;
    m->ntensors = tb.n;
    m->num_params = tb.nparams;
    m->num_buffers = tb.nbuffers;
}

// The parameter table alone, for `simplest-dist check`: no backend, nothing allocated but the table.
int model_param_counts(const ModelConfig *cfg, size_t *trainable, size_t *fixed) {
    char err[512];
    if (model_config_check(cfg, err, sizeof err) != 0) return -1;
    Model m;
    memset(&m, 0, sizeof m);
    m.cfg = *cfg;
    m.grid_h = m.grid_w = cfg->image_size / cfg->patch_size;
    m.N = m.grid_h * m.grid_w;
    build_table(&m);
    *trainable = m.num_params;
    *fixed = m.num_buffers;
    free(m.tensors);
    free(m.blocks);
    free(m.block_params);
    return 0;
}

int model_find_tensor(const Model *m, const char *name) {
    for (int i = 0; i < m->ntensors; i++)
        if (strcmp(m->tensors[i].name, name) == 0) return i;
    return -1;
}

size_t model_num_trainable(const Model *m) { return m->num_params; }

// Device pointer of tensor idx (params or buffers), its gradient, or NULL for an absent tensor.
static float *T(const Model *m, int idx) {
    if (idx < 0) return NULL;
    const TensorInfo *t = &m->tensors[idx];
    return (t->trainable ? m->params : m->buffers) + t->offset;
}

static float *G(const Model *m, int idx) {
    if (idx < 0 || !m->tensors[idx].trainable) return NULL;
    return m->grads + m->tensors[idx].offset;
}

// ---------------------------------------------------------------- allocation

// Carves named views out of one activation allocation.
typedef struct {
    size_t used;
    char *base;
} Arena;

static void *carve(Arena *a, size_t bytes) {
    size_t at = (a->used + 255) & ~(size_t)255;  // 256-byte aligned views (GPU vector loads, cuBLASLt)
    a->used = at + bytes;
    return a->base ? a->base + at : NULL;
}

// Two passes: first measure (base NULL), then point the views into the allocation.
static void layout_acts(Model *m, Arena *a) {
    const ModelConfig *c = &m->cfg;
    Backend *be = m->be;
    size_t B = (size_t)m->max_batch, R = B * m->N, D = c->dim, M = c->mlp_dim, C = c->num_classes, as = be->act_size;
    size_t big = 3 * D > M ? 3 * D : M, mid = D > M ? D : M;
    int simplest = c->arch == ARCH_SIMPLEST;
    m->input = carve(a, B * c->channels * c->image_size * c->image_size * sizeof(float));
    m->targets = carve(a, B * C * sizeof(float));
    m->losses = carve(a, B * sizeof(float));
    m->patches = carve(a, R * m->patch_dim * as);
    m->x0 = carve(a, R * D * as);
    size_t saved = be->attn_saved_elems(be, (int)B, m->N, c->heads, m->dh);
    for (int l = 0; l < c->depth; l++) {
        BlockActs *x = &m->acts[l];
        memset(x, 0, sizeof *x);
        if (!simplest) {
            x->ln1 = c->recompute ? NULL : carve(a, R * D * as);
            x->ln1_mean = carve(a, R * sizeof(float));
            x->ln1_rstd = carve(a, R * sizeof(float));
        }
        x->qkv = carve(a, R * 3 * D * as);
        x->attn_saved = carve(a, saved * sizeof(float));
        x->att = carve(a, R * D * as);
        if (!simplest) {
            x->res1 = carve(a, R * D * as);
            x->ln2 = c->recompute ? NULL : carve(a, R * D * as);
            x->ln2_mean = carve(a, R * sizeof(float));
            x->ln2_rstd = carve(a, R * sizeof(float));
            x->gelu = c->recompute ? NULL : carve(a, R * M * as);
        }
        x->fc1 = carve(a, R * M * as);
        x->out = carve(a, R * D * as);
    }
    m->dropped = carve(a, R * D * as);
    m->pooled = carve(a, B * D * as);
    if (!simplest) {
        m->head_ln = carve(a, B * D * as);
        m->head_ln_mean = carve(a, B * sizeof(float));
        m->head_ln_rstd = carve(a, B * sizeof(float));
    }
    m->logits = carve(a, B * C * as);
    m->dlogits = carve(a, B * C * as);
    m->g_x = carve(a, R * D * as);
    m->g_mid = carve(a, R * mid * as);
    m->g_big = carve(a, R * big * as);
    m->g_ln = carve(a, R * D * as);
    m->g_pooled = carve(a, B * D * as);
    m->g_head = carve(a, B * D * as);
    m->rc_ln = !simplest && c->recompute ? carve(a, R * D * as) : NULL;
    m->rc_gelu = !simplest && c->recompute ? carve(a, R * M * as) : NULL;
}

// The LayerNorm and GELU outputs of a SimpleViT block: its own buffers, or (model.recompute) the shared ones.
static void *ln1_buf(const Model *m, int l) { return m->cfg.recompute ? m->rc_ln : m->acts[l].ln1; }
static void *ln2_buf(const Model *m, int l) { return m->cfg.recompute ? m->rc_ln : m->acts[l].ln2; }
static void *gelu_buf(const Model *m, int l) { return m->cfg.recompute ? m->rc_gelu : m->acts[l].gelu; }

Model *model_create(const ModelConfig *cfg, Backend *be, int max_batch) {
    char err[512];
    if (model_config_check(cfg, err, sizeof err) != 0) die_user("%s", err);
    Model *m = xcalloc(sizeof(Model), "model");
    m->cfg = *cfg;
    m->be = be;
    m->grid_h = m->grid_w = cfg->image_size / cfg->patch_size;
    m->N = m->grid_h * m->grid_w;
    m->patch_dim = cfg->channels * cfg->patch_size * cfg->patch_size;
    m->dh = cfg->dim / cfg->heads;
    if (cfg->arch == ARCH_SIMPLEST) {
        CHECK(tat_slope(cfg->depth, cfg->eta, &m->tat_a, err, sizeof err) == 0, "%s", err);
        m->tat_s = tat_scale(m->tat_a);
    }
    build_table(m);
    m->params = be->alloc(be, m->num_params * sizeof(float), "params");
    m->grads = be->alloc(be, m->num_params * sizeof(float), "grads");
    m->buffers = be->alloc(be, (m->num_buffers ? m->num_buffers : 1) * sizeof(float), "fixed buffers");
    m->posemb = be->alloc(be, (size_t)m->N * cfg->dim * sizeof(float), "posemb");
    be->set_params(be, m->params, m->num_params);
    if ((int64_t)max_batch * m->N * (cfg->mlp_dim > 3 * cfg->dim ? cfg->mlp_dim : 3 * cfg->dim) > INT32_MAX)
        die_user("a batch of %d images of %d tokens is too large for one rank (rows x width exceed 2^31); lower "
                 "train.batch_size or data.eval_batch_size, or raise train.grad_accum", max_batch, m->N);
    m->max_batch = max_batch;
    m->acts = xcalloc((size_t)cfg->depth * sizeof(BlockActs), "block activations");
    Arena a = {0, NULL};
    layout_acts(m, &a);
    m->act_bytes = a.used;
    m->act_mem = be->alloc(be, a.used, "activations");
    a = (Arena){0, m->act_mem};
    layout_acts(m, &a);
    return m;
}

void model_free(Model *m) {
    if (!m) return;
    Backend *be = m->be;
    be->free(be, m->params);
    be->free(be, m->grads);
    be->free(be, m->buffers);
    be->free(be, m->posemb);
    be->free(be, m->act_mem);
    free(m->tensors);
    free(m->blocks);
    free(m->block_params);
    free(m->acts);
    free(m);
}

// ---------------------------------------------------------------- init

void posemb_sincos_2d(float *pe, int h, int w, int D) {
    int K = D / 4;
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++) {
            float *row = pe + ((size_t)y * w + x) * D;
            for (int k = 0; k < K; k++) {
                double omega = pow(10000.0, -(double)k / (K - 1));
                row[k] = (float)sin(x * omega);
                row[K + k] = (float)cos(x * omega);
                row[2 * K + k] = (float)sin(y * omega);
                row[3 * K + k] = (float)cos(y * omega);
            }
        }
}

// Scaled uniform orthogonal W (n_out, n_in) with gain g: Householder QR of a Gaussian, sign-fixed (spec §8).
static void suo_init(float *W, int n_out, int n_in, double gain, Rng *rng) {
    int r = n_out > n_in ? n_out : n_in, c = n_out > n_in ? n_in : n_out;
    double *G = xmalloc((size_t)r * c * sizeof(double), "SUO matrix");
    double *tau = xmalloc((size_t)c * sizeof(double), "SUO tau");
    double *diag = xmalloc((size_t)c * sizeof(double), "SUO diag");
    for (size_t i = 0; i < (size_t)r * c; i++) G[i] = rng_normal(rng);
    CHECK(LAPACKE_dgeqrf(LAPACK_ROW_MAJOR, r, c, G, c, tau) == 0, "dgeqrf failed");
    for (int j = 0; j < c; j++) diag[j] = G[(size_t)j * c + j] < 0.0 ? -1.0 : 1.0;  // sign(R_jj), sign(0) = +1
    CHECK(LAPACKE_dorgqr(LAPACK_ROW_MAJOR, r, c, c, G, c, tau) == 0, "dorgqr failed");
    for (int i = 0; i < r; i++)
        for (int j = 0; j < c; j++) {
            double q = gain * G[(size_t)i * c + j] * diag[j];  // Q (r, c)
            if (n_out >= n_in)
                W[(size_t)i * n_in + j] = (float)q;  // W = g Q
            else
                W[(size_t)j * n_in + i] = (float)q;  // W = g Q^T
        }
    free(G);
    free(tau);
    free(diag);
}

// DKS gain max(sqrt(out/in), 1); seed_compat swaps in and out as the reference does.
static double suo_gain(int n_out, int n_in, int compat) {
    double ratio = compat ? (double)n_in / n_out : (double)n_out / n_in;
    return ratio > 1.0 ? sqrt(ratio) : 1.0;
}

static void fill_normal(float *x, size_t n, double std, Rng *rng) {
    for (size_t i = 0; i < n; i++) x[i] = (float)(std * rng_normal(rng));
}

static void fill_uniform(float *x, size_t n, double bound, Rng *rng) {
    for (size_t i = 0; i < n; i++) x[i] = (float)(bound * (2.0 * rng_uniform(rng) - 1.0));
}

static void init_simplest_block(const Model *m, int l, float *params, float *buffers, uint64_t seed) {
    const ModelConfig *c = &m->cfg;
    const BlockTensors *bt = &m->blocks[l];
    int D = c->dim, M = c->mlp_dim;
    const TensorInfo *tq = &m->tensors[bt->qkv_w];
    float *Wqkv = params + tq->offset;
    memset(Wqkv, 0, (size_t)D * D * sizeof(float));  // W_q = 0: attention starts as exactly A
    Rng rng = rng_stream(seed, RNG_INIT, (uint64_t)bt->qkv_w, 0);
    fill_normal(Wqkv + (size_t)D * D, (size_t)2 * D * D, 1.0 / sqrt((double)D), &rng);
    rng = rng_stream(seed, RNG_INIT, (uint64_t)bt->fc1_w, 0);
    suo_init(params + m->tensors[bt->fc1_w].offset, M, D, suo_gain(M, D, c->seed_compat), &rng);
    rng = rng_stream(seed, RNG_INIT, (uint64_t)bt->fc2_w, 0);
    suo_init(params + m->tensors[bt->fc2_w].offset, D, M, suo_gain(D, M, c->seed_compat), &rng);
    float *Bm = buffers + m->tensors[bt->B].offset, *d = buffers + m->tensors[bt->d].offset;
    CHECK(espa_layer_buffers(m->N, l + 1, c->depth, c->gamma_L, c->seed_compat, Bm, d) == 0,
          "E-SPA construction failed at layer %d", l + 1);
}

static void init_simplevit_block(const Model *m, int l, float *params, float *buffers, uint64_t seed) {
    const ModelConfig *c = &m->cfg;
    const BlockTensors *bt = &m->blocks[l];
    int D = c->dim, M = c->mlp_dim;
    int uniform_tensors[] = {bt->qkv_w, bt->fc1_w, bt->fc1_b, bt->fc2_w, bt->fc2_b};
    int fan_in[] = {D, D, D, M, M};
    for (int k = 0; k < 5; k++) {
        const TensorInfo *t = &m->tensors[uniform_tensors[k]];
        Rng rng = rng_stream(seed, RNG_INIT, (uint64_t)uniform_tensors[k], 0);
        fill_uniform(params + t->offset, t->numel, 1.0 / sqrt((double)fan_in[k]), &rng);
    }
    int ones[] = {bt->ln1_w, bt->ln2_w};
    for (int k = 0; k < 2; k++) {
        const TensorInfo *t = &m->tensors[ones[k]];
        for (size_t i = 0; i < t->numel; i++) params[t->offset + i] = 1.0f;
    }
    const TensorInfo *to = &m->tensors[bt->out_w];
    if (c->seed_compat) {
        float *W = buffers + to->offset;
        for (int i = 0; i < D; i++) W[(size_t)i * D + i] = 1.0f;
    } else {
        Rng rng = rng_stream(seed, RNG_INIT, (uint64_t)bt->out_w, 0);
        fill_uniform(params + to->offset, to->numel, 1.0 / sqrt((double)D), &rng);
    }
}

void model_init_host(const Model *m, uint64_t seed, float *params, float *buffers) {
    const ModelConfig *c = &m->cfg;
    int D = c->dim, C = c->num_classes;
    memset(params, 0, m->num_params * sizeof(float));
    memset(buffers, 0, m->num_buffers * sizeof(float));
    const TensorInfo *pw = &m->tensors[m->patch_w];
    Rng rng = rng_stream(seed, RNG_INIT, (uint64_t)m->patch_w, 0);
    if (c->arch == ARCH_SIMPLEST) {
        fill_normal(params + pw->offset, pw->numel, 1.0 / sqrt((double)m->patch_dim), &rng);
        for (int l = 0; l < c->depth; l++) init_simplest_block(m, l, params, buffers, seed);
        rng = rng_stream(seed, RNG_INIT, (uint64_t)m->head_w, 0);
        suo_init(params + m->tensors[m->head_w].offset, C, D, suo_gain(C, D, c->seed_compat), &rng);
    } else {
        double bound = 1.0 / sqrt((double)m->patch_dim);
        fill_uniform(params + pw->offset, pw->numel, bound, &rng);
        rng = rng_stream(seed, RNG_INIT, (uint64_t)m->patch_b, 0);
        fill_uniform(params + m->tensors[m->patch_b].offset, (size_t)D, bound, &rng);
        for (int l = 0; l < c->depth; l++) init_simplevit_block(m, l, params, buffers, seed);
        for (int i = 0; i < D; i++) params[m->tensors[m->head_ln_w].offset + i] = 1.0f;
        int head[] = {m->head_w, m->head_b};
        for (int k = 0; k < 2; k++) {
            const TensorInfo *t = &m->tensors[head[k]];
            rng = rng_stream(seed, RNG_INIT, (uint64_t)head[k], 0);
            fill_uniform(params + t->offset, t->numel, 1.0 / sqrt((double)D), &rng);
        }
    }
}

void model_init(Model *m, uint64_t seed) {
    Backend *be = m->be;
    float *hp = xmalloc(m->num_params * sizeof(float), "host params");
    float *hb = xmalloc((m->num_buffers ? m->num_buffers : 1) * sizeof(float), "host buffers");
    float *pe = xmalloc((size_t)m->N * m->cfg.dim * sizeof(float), "host posemb");
    model_init_host(m, seed, hp, hb);
    posemb_sincos_2d(pe, m->grid_h, m->grid_w, m->cfg.dim);
    be->upload(be, m->params, hp, m->num_params * sizeof(float));
    be->upload(be, m->buffers, hb, m->num_buffers * sizeof(float));
    be->upload(be, m->posemb, pe, (size_t)m->N * m->cfg.dim * sizeof(float));
    be->params_changed(be, m->params, m->num_params);
    free(hp);
    free(hb);
    free(pe);
}

// ---------------------------------------------------------------- forward

static void simplest_block_fwd(Model *m, int l, const void *x, int B) {
    Backend *be = m->be;
    const ModelConfig *c = &m->cfg;
    const BlockTensors *bt = &m->blocks[l];
    BlockActs *a = &m->acts[l];
    int R = B * m->N, D = c->dim, M = c->mlp_dim;
    float s = (float)m->tat_s, slope = (float)m->tat_a;
    be->matmul_fwd(be, a->qkv, x, T(m, bt->qkv_w), T(m, bt->qkv_b), R, D, 3 * D);
    be->attention_fwd(be, a->att, a->attn_saved, a->qkv, T(m, bt->B), T(m, bt->d), B, m->N, c->heads, m->dh);
    be->matmul_fwd(be, a->fc1, a->att, T(m, bt->fc1_w), T(m, bt->fc1_b), R, D, M);
    be->trelu_fwd(be, a->fc1, a->fc1, (size_t)R * M, s, slope);
    be->matmul_fwd(be, a->out, a->fc1, T(m, bt->fc2_w), T(m, bt->fc2_b), R, M, D);
    be->trelu_fwd(be, a->out, a->out, (size_t)R * D, s, slope);
}

static void simplevit_block_fwd(Model *m, int l, const void *x, int B) {
    Backend *be = m->be;
    const ModelConfig *c = &m->cfg;
    const BlockTensors *bt = &m->blocks[l];
    BlockActs *a = &m->acts[l];
    int R = B * m->N, D = c->dim, M = c->mlp_dim;
    void *ln1 = ln1_buf(m, l), *ln2 = ln2_buf(m, l), *gelu = gelu_buf(m, l);
    be->layernorm_fwd(be, ln1, a->ln1_mean, a->ln1_rstd, x, T(m, bt->ln1_w), T(m, bt->ln1_b), R, D, 1e-5f);
    be->matmul_fwd(be, a->qkv, ln1, T(m, bt->qkv_w), NULL, R, D, 3 * D);
    be->attention_fwd(be, a->att, a->attn_saved, a->qkv, NULL, NULL, B, m->N, c->heads, m->dh);
    if (c->seed_compat) {
        be->add(be, a->res1, x, a->att, (size_t)R * D);  // to_out is the identity
    } else {
        be->matmul_fwd(be, a->res1, a->att, T(m, bt->out_w), NULL, R, D, D);
        be->add(be, a->res1, a->res1, x, (size_t)R * D);
    }
    be->layernorm_fwd(be, ln2, a->ln2_mean, a->ln2_rstd, a->res1, T(m, bt->ln2_w), T(m, bt->ln2_b), R, D, 1e-5f);
    be->matmul_fwd(be, a->fc1, ln2, T(m, bt->fc1_w), T(m, bt->fc1_b), R, D, M);
    be->gelu_fwd(be, gelu, a->fc1, (size_t)R * M);
    be->matmul_fwd(be, a->out, gelu, T(m, bt->fc2_w), T(m, bt->fc2_b), R, M, D);
    be->add(be, a->out, a->out, a->res1, (size_t)R * D);
}

// The tensor that pooling reads: the dropout output in training with p > 0, else the last block's output.
static const void *pool_input(const Model *m) {
    return m->last_training && m->cfg.drop_p > 0.0f ? m->dropped : m->acts[m->cfg.depth - 1].out;
}

void model_forward(Model *m, int B, int training, uint64_t seed, uint64_t step, uint64_t first_pos) {
    Backend *be = m->be;
    const ModelConfig *c = &m->cfg;
    CHECK(B > 0 && B <= m->max_batch, "batch %d outside 1..%d", B, m->max_batch);
    int R = B * m->N, D = c->dim, C = c->num_classes;
    be->patch_unfold(be, m->patches, m->input, B, c->channels, c->image_size, c->image_size, c->patch_size);
    be->matmul_fwd(be, m->x0, m->patches, T(m, m->patch_w), T(m, m->patch_b), R, m->patch_dim, D);
    be->add_posemb(be, m->x0, m->posemb, B, m->N, D);
    const void *x = m->x0;
    for (int l = 0; l < c->depth; l++) {
        if (c->arch == ARCH_SIMPLEST)
            simplest_block_fwd(m, l, x, B);
        else
            simplevit_block_fwd(m, l, x, B);
        x = m->acts[l].out;
    }
    m->last_training = training;
    if (training && c->drop_p > 0.0f)
        be->dropout_fwd(be, m->dropped, x, B, (size_t)m->N * D, c->drop_p, seed, step, first_pos);
    be->meanpool_fwd(be, m->pooled, pool_input(m), B, m->N, D);
    const void *feat = m->pooled;
    if (c->arch == ARCH_SIMPLEVIT) {
        be->layernorm_fwd(be, m->head_ln, m->head_ln_mean, m->head_ln_rstd, m->pooled, T(m, m->head_ln_w),
                          T(m, m->head_ln_b), B, D, 1e-5f);
        feat = m->head_ln;
    }
    be->matmul_fwd(be, m->logits, feat, T(m, m->head_w), T(m, m->head_b), B, D, C);
}

void model_loss(Model *m, int B, float smoothing, float grad_scale, int want_grad) {
    m->be->xent_fwd_bwd(m->be, m->losses, want_grad ? m->dlogits : NULL, m->logits, m->targets, B,
                        m->cfg.num_classes, smoothing, grad_scale);
}

// ---------------------------------------------------------------- backward

// g_x holds dL/d(block output) on entry and dL/d(block input) on exit.
static void simplest_block_bwd(Model *m, int l, const void *x, int B) {
    Backend *be = m->be;
    const ModelConfig *c = &m->cfg;
    const BlockTensors *bt = &m->blocks[l];
    BlockActs *a = &m->acts[l];
    int R = B * m->N, D = c->dim, M = c->mlp_dim;
    float s = (float)m->tat_s, slope = (float)m->tat_a;
    be->trelu_bwd(be, m->g_x, m->g_x, a->out, (size_t)R * D, s, slope);
    be->matmul_bwd(be, m->g_mid, G(m, bt->fc2_w), G(m, bt->fc2_b), m->g_x, a->fc1, T(m, bt->fc2_w), R, M, D);
    be->trelu_bwd(be, m->g_mid, m->g_mid, a->fc1, (size_t)R * M, s, slope);
    be->matmul_bwd(be, m->g_x, G(m, bt->fc1_w), G(m, bt->fc1_b), m->g_mid, a->att, T(m, bt->fc1_w), R, D, M);
    be->attention_bwd(be, m->g_big, m->g_x, a->qkv, a->attn_saved, T(m, bt->B), T(m, bt->d), B, m->N, c->heads,
                      m->dh);
    be->matmul_bwd(be, m->g_x, G(m, bt->qkv_w), G(m, bt->qkv_b), m->g_big, x, T(m, bt->qkv_w), R, D, 3 * D);
}

static void simplevit_block_bwd(Model *m, int l, const void *x, int B) {
    Backend *be = m->be;
    const ModelConfig *c = &m->cfg;
    const BlockTensors *bt = &m->blocks[l];
    BlockActs *a = &m->acts[l];
    int R = B * m->N, D = c->dim, M = c->mlp_dim;
    void *ln1 = ln1_buf(m, l), *ln2 = ln2_buf(m, l), *gelu = gelu_buf(m, l);
    // model.recompute: the outputs the weight gradients need are recomputed from the kept inputs just before use
    // (the same kernels on the same inputs: the same bits as in the forward; mean and rstd are rewritten equal).
    if (c->recompute) be->gelu_fwd(be, gelu, a->fc1, (size_t)R * M);
    // MLP branch: out = res1 + fc2(gelu(fc1(ln2(res1)))); g_x keeps the residual gradient.
    be->matmul_bwd(be, m->g_mid, G(m, bt->fc2_w), G(m, bt->fc2_b), m->g_x, gelu, T(m, bt->fc2_w), R, M, D);
    be->gelu_bwd(be, m->g_mid, m->g_mid, a->fc1, (size_t)R * M);
    if (c->recompute)
        be->layernorm_fwd(be, ln2, a->ln2_mean, a->ln2_rstd, a->res1, T(m, bt->ln2_w), T(m, bt->ln2_b), R, D, 1e-5f);
    be->matmul_bwd(be, m->g_ln, G(m, bt->fc1_w), G(m, bt->fc1_b), m->g_mid, ln2, T(m, bt->fc1_w), R, D, M);
    be->layernorm_bwd(be, m->g_x, G(m, bt->ln2_w), G(m, bt->ln2_b), m->g_ln, a->res1, a->ln2_mean, a->ln2_rstd,
                      T(m, bt->ln2_w), R, D);
    // Attention branch: res1 = x + to_out(attn(ln1(x))).
    const void *datt = m->g_x;
    if (!c->seed_compat) {
        be->matmul_bwd(be, m->g_mid, G(m, bt->out_w), NULL, m->g_x, a->att, T(m, bt->out_w), R, D, D);
        datt = m->g_mid;
    }
    be->attention_bwd(be, m->g_big, datt, a->qkv, a->attn_saved, NULL, NULL, B, m->N, c->heads, m->dh);
    if (c->recompute)
        be->layernorm_fwd(be, ln1, a->ln1_mean, a->ln1_rstd, x, T(m, bt->ln1_w), T(m, bt->ln1_b), R, D, 1e-5f);
    be->matmul_bwd(be, m->g_ln, G(m, bt->qkv_w), NULL, m->g_big, ln1, T(m, bt->qkv_w), R, D, 3 * D);
    be->layernorm_bwd(be, m->g_x, G(m, bt->ln1_w), G(m, bt->ln1_b), m->g_ln, x, a->ln1_mean, a->ln1_rstd,
                      T(m, bt->ln1_w), R, D);
}

void model_backward(Model *m, int B, uint64_t seed, uint64_t step, uint64_t first_pos) {
    model_backward_hooked(m, B, seed, step, first_pos, NULL, NULL);
}

void model_backward_hooked(Model *m, int B, uint64_t seed, uint64_t step, uint64_t first_pos, GradReadyFn ready,
                           void *ctx) {
    Backend *be = m->be;
    const ModelConfig *c = &m->cfg;
    int R = B * m->N, D = c->dim, C = c->num_classes;
    if (c->arch == ARCH_SIMPLEST) {
        be->matmul_bwd(be, m->g_pooled, G(m, m->head_w), G(m, m->head_b), m->dlogits, m->pooled, T(m, m->head_w), B,
                       D, C);
    } else {
        be->matmul_bwd(be, m->g_head, G(m, m->head_w), G(m, m->head_b), m->dlogits, m->head_ln, T(m, m->head_w), B,
                       D, C);
        be->zero(be, m->g_pooled, (size_t)B * D * be->act_size);
        be->layernorm_bwd(be, m->g_pooled, G(m, m->head_ln_w), G(m, m->head_ln_b), m->g_head, m->pooled,
                          m->head_ln_mean, m->head_ln_rstd, T(m, m->head_ln_w), B, D);
    }
    if (ready) ready(ctx, m->block_params[c->depth], m->num_params - m->block_params[c->depth]);  // the head
    be->meanpool_bwd(be, m->g_x, m->g_pooled, B, m->N, D);
    if (m->last_training && c->drop_p > 0.0f)
        be->dropout_bwd(be, m->g_x, m->g_x, B, (size_t)m->N * D, c->drop_p, seed, step, first_pos);
    for (int l = c->depth - 1; l >= 0; l--) {
        const void *x = l > 0 ? m->acts[l - 1].out : m->x0;
        if (c->arch == ARCH_SIMPLEST)
            simplest_block_bwd(m, l, x, B);
        else
            simplevit_block_bwd(m, l, x, B);
        if (ready) ready(ctx, m->block_params[l], m->block_params[l + 1] - m->block_params[l]);
    }
    be->matmul_bwd(be, NULL, G(m, m->patch_w), G(m, m->patch_b), m->g_x, m->patches, T(m, m->patch_w), R,
                   m->patch_dim, D);
    if (ready) ready(ctx, 0, m->patch_params);
}

void model_zero_grad(Model *m) { m->be->zero(m->be, m->grads, m->num_params * sizeof(float)); }

void model_signal_stats(Model *m, int B, double *mean_sq, double *mean_cos) {
    for (int l = 0; l < m->cfg.depth; l++)
        m->be->signal_stats(m->be, m->acts[l].out, B, m->N, m->cfg.dim, &mean_sq[l], &mean_cos[l]);
}
