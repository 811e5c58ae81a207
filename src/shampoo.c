// shampoo.c: see shampoo.h and spec/shampoo.md. The per-block math runs on the backend (GEMMs for statistics and
// the preconditioned update, the grafted block update). The eigendecompositions run by the block's owner only: on
// the host with LAPACK (CPU backend), or on the device with cuSOLVER (be->inverse_root, CUDA backend), whose roots
// never leave the GPU (NCCL broadcast).
#include "shampoo.h"

#include <cblas.h>
#include <lapacke.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "safetensors.h"
#include "util.h"

// A refresh in flight: the owner's factor snapshot, and its packed roots once computed.
// Host roots (CPU backend): a host snapshot of the factors and the packed buffer on the host. Device roots
// (be->inverse_root, the CUDA backend): the factors stay on the device (a device snapshot under root_delay >= 1),
// the roots go straight into this rank's slot of the device broadcast area, and only the status header is on the
// host.
typedef struct RootJob {
    Shampoo *s;
    float *factors;       // host: snapshot of this rank's factors (NULL in device mode)
    const float *dsrc;    // device: what the decompositions read (s->factors, or the snapshot s->snap)
    unsigned char *out;   // host: this rank's packed buffer (device mode: its status header only)
    float *bad;           // per owned block: the non-finite factor's index (status 2)
    int *inject;          // per block: an injected failure (tests), taken from the blocks when the job starts
    int64_t t;            // the refresh step
    int threaded;         // runs on s->thread beside the steps (then it must not change the BLAS thread count)
    double eig_s;         // time of the decompositions (added to s->eig_s by the main thread, in finish_refresh)
} RootJob;

typedef struct {
    int kind, order, rows, cols;  // the (rows, cols) view: a 1-D block of n is (1, n)
    int nb, nbc;                  // blocks, blocks per chunk
    int64_t *offs;                // backend (nb): element offsets of the blocks
    int *lds;                     // backend (nb): row strides
    int64_t *toffs;               // backend (nb): where the step goes: offs (into the parameters), or with
    int *tlds;                    //   shampoo.apply "owners" the blocks' slots in the direction buffer (ld = cols)
    const float **x0, **x1;       // backend (nb each, one allocation): the roots
    float **gb, **tmp, **ps;      // backend (nbc each, one allocation): chunk slots in the scratch
} UpdGroup;

struct ShampooPlan {
    signed char *kind;  // per block, as built
    int ngroups;
    UpdGroup *g;
};

static void job_free(RootJob *job) {
    free(job->factors);
    free(job->out);
    free(job->bad);
    free(job->inject);
    free(job);
}

int shampoo_config_check(const ShampooConfig *c, char *err, size_t n) {
    if (c->frequency < 1) return set_err(err, n, "config key 'shampoo.precondition_frequency': must be >= 1");
    if (c->start_step < 0 || c->start_step % c->frequency != 0)
        return set_err(err, n, "config key 'shampoo.start_preconditioning_step': %d must be 0 or a multiple of "
                               "shampoo.precondition_frequency %d (otherwise the zero roots would be used)",
                       c->start_step, c->frequency);
    if (c->root_delay < 0 || c->root_delay > c->frequency)
        return set_err(err, n, "config key 'shampoo.root_delay': %d must be 0 .. shampoo.precondition_frequency %d",
                       c->root_delay, c->frequency);
    if (c->max_dim < 1) return set_err(err, n, "config key 'shampoo.max_preconditioner_dim': must be >= 1");
    return 0;
}

// ---------------------------------------------------------------- blocking

int shampoo_merge_dims(const int *shape, int ndim, int b, int *merged) {
    int order = 1;
    merged[0] = ndim > 0 ? shape[0] : 1;
    for (int i = 1; i < ndim; i++) {
        int64_t last = merged[order - 1], s = shape[i];
        if (last == 1 || s == 1 || last * s <= b)
            merged[order - 1] = (int)(last * s);
        else
            merged[order++] = (int)s;
    }
    return order;
}

typedef struct {
    ShampooBlock *b;
    int n, cap;
} BlockList;

static ShampooBlock *push_block(BlockList *l) {
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 64;
        l->b = realloc(l->b, (size_t)l->cap * sizeof(ShampooBlock));
        CHECK(l->b, "out of memory for Shampoo blocks");
    }
    ShampooBlock *b = &l->b[l->n++];
    memset(b, 0, sizeof *b);
    return b;
}

// Cuts one trainable tensor into blocks of at most b per merged dimension, chunks in row-major order.
static void block_tensor(BlockList *l, const TensorInfo *t, int param, int b) {
    int merged[8];
    int order = shampoo_merge_dims(t->shape, t->ndim, b, merged);
    if (order > 2)
        die_user("shampoo: tensor %s merges to %d dimensions at shampoo.max_preconditioner_dim %d; only 1-D and 2-D "
                 "blocks are supported (raise the dimension)",
                 t->name, order, b);
    int m = merged[0], ncols = order == 2 ? merged[1] : 1;
    for (int r0 = 0; r0 < m; r0 += b)
        for (int c0 = 0; c0 < ncols; c0 += b) {
            ShampooBlock *x = push_block(l);
            x->param = param;
            x->order = order;
            x->rows = m - r0 < b ? m - r0 : b;
            x->cols = order == 2 ? (ncols - c0 < b ? ncols - c0 : b) : 1;
            x->offset = t->offset + (size_t)r0 * ncols + c0;
            x->ld = order == 2 ? ncols : 1;
            x->dim[0] = x->rows;
            x->dim[1] = order == 2 ? x->cols : 0;
            x->cost = pow(x->dim[0], 3) + (order == 2 ? pow(x->dim[1], 3) : 0.0);
        }
}

static int root_sides(void);

// Longest-processing-time assignment: blocks by (cost desc, index asc) to the least-loaded rank (ties: lowest).
static void assign_owners(ShampooBlock *blocks, int n, int world, double *max_mean) {
    int *idx = xmalloc((size_t)n * sizeof(int), "block order");
    double *load = xcalloc((size_t)world * sizeof(double), "rank loads");
    for (int i = 0; i < n; i++) idx[i] = i;
    for (int i = 1; i < n; i++)  // insertion sort: n is a few hundred
        for (int j = i; j > 0; j--) {
            const ShampooBlock *a = &blocks[idx[j - 1]], *b = &blocks[idx[j]];
            if (a->cost > b->cost || (a->cost == b->cost && idx[j - 1] < idx[j])) break;
            int t = idx[j];
            idx[j] = idx[j - 1];
            idx[j - 1] = t;
        }
    for (int i = 0; i < n; i++) {
        int best = 0;
        for (int r = 1; r < world; r++)
            if (load[r] < load[best]) best = r;
        blocks[idx[i]].owner = best;
        load[best] += blocks[idx[i]].cost;
    }
    double mx = 0.0, sum = 0.0;
    for (int r = 0; r < world; r++) {
        mx = fmax(mx, load[r]);
        sum += load[r];
    }
    *max_mean = sum > 0 ? mx / (sum / world) : 1.0;
    free(idx);
    free(load);
}

static size_t packed_size(const Shampoo *s, int r, int *nblocks);
struct ShampooPlan;
static void plan_free(Shampoo *s, struct ShampooPlan **pp);

static int block_preconditioned(const Shampoo *s, const ShampooBlock *b) {
    const TensorInfo *t = &s->model->tensors[b->param];
    return !(s->cfg.one_d_adam && t->ndim == 1);  // the parameter's own rank decides (spec §2.6)
}

// Device roots: the owned factors' snapshot that a delayed refresh reads (allocated once, at creation under
// root_delay >= 1, or when a state with a pending refresh is loaded into a run without delay).
static float *snap_buffer(Shampoo *s) {
    if (!s->snap)
        s->snap = s->model->be->alloc(s->model->be, (s->factor_floats ? s->factor_floats : 1) * sizeof(float),
                                      "Shampoo factor snapshot");
    return s->snap;
}

void shampoo_create(Shampoo *s, Model *model, Comm *comm, const ShampooConfig *cfg, const int *owner_map) {
    memset(s, 0, sizeof *s);
    s->cfg = *cfg;
    s->model = model;
    s->comm = comm;
    BlockList l = {0};
    for (int i = 0; i < model->ntensors; i++)
        if (model->tensors[i].trainable) block_tensor(&l, &model->tensors[i], i, cfg->max_dim);
    s->blocks = l.b;
    s->nblocks = l.n;
    assign_owners(s->blocks, s->nblocks, comm->world, &s->max_mean_load);
    if (owner_map)
        for (int i = 0; i < s->nblocks; i++) s->blocks[i].owner = owner_map[i] % comm->world;
    // Test hook (spec §3.2, P15): SD_SHAMPOO_OWNERS=roundrobin|reversed|random<seed> replaces the LPT map in a
    // whole run; the trajectory must not change. Every rank derives the same map from the same string.
    const char *ov = owner_map ? NULL : getenv("SD_SHAMPOO_OWNERS");
    if (ov && *ov && strcmp(ov, "lpt") != 0) {
        uint64_t seed = 0;
        int mode = !strcmp(ov, "roundrobin") ? 0 : !strcmp(ov, "reversed") ? 1 : !strncmp(ov, "random", 6) ? 2 : -1;
        if (mode < 0) die_user("SD_SHAMPOO_OWNERS: '%s' is not lpt, roundrobin, reversed or random<seed>", ov);
        if (mode == 2) seed = strtoull(ov + 6, NULL, 10);
        for (int i = 0; i < s->nblocks; i++) {
            int o = i % comm->world;
            if (mode == 1) o = comm->world - 1 - o;
            if (mode == 2) {  // splitmix64 of (seed, i)
                uint64_t z = seed * 0x9E3779B97F4A7C15ull + (uint64_t)i + 1;
                z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
                z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
                o = (int)((z ^ (z >> 31)) % (uint64_t)comm->world);
            }
            s->blocks[i].owner = o;
        }
        if (comm->rank == 0) fprintf(stderr, "simplest-dist: shampoo: ownership map replaced (%s)\n", ov);
    }
    const char *chk = getenv("SD_SHAMPOO_CHECK");  // debug mode (spec §3.4 item 5) without a config key
    if (chk && *chk && strcmp(chk, "0") != 0) s->cfg.check_replicas = 1;
    size_t largest = 1;
    s->owned = xmalloc((size_t)(s->nblocks ? s->nblocks : 1) * sizeof(int), "owned blocks");
    for (int i = 0; i < s->nblocks; i++) {
        ShampooBlock *b = &s->blocks[i];
        size_t area = (size_t)b->rows * b->cols;
        largest = area > largest ? area : largest;
        if (!block_preconditioned(s, b)) continue;
        for (int k = 0; k < b->order; k++) {
            size_t sq = (size_t)b->dim[k] * b->dim[k];
            largest = sq > largest ? sq : largest;
            b->root_off[k] = s->root_floats;
            s->root_floats += sq;
            if (b->owner == comm->rank) {
                b->fac_off[k] = s->factor_floats;
                s->factor_floats += sq;
            }
        }
        if (b->owner == comm->rank) s->owned[s->nowned++] = i;
    }
    Backend *be = model->be;
    if (cfg->apply_owners) {  // the direction buffer: owner r's blocks (ascending) back to back, owners in rank order
        s->dseg = xcalloc((size_t)(comm->world + 1) * sizeof(size_t), "direction segments");
        size_t at = 0;
        for (int r = 0; r < comm->world; r++) {
            s->dseg[r] = at;
            for (int i = 0; i < s->nblocks; i++)  // (a 1-D block under one_d "adam" never takes a block step)
                if (s->blocks[i].owner == r && block_preconditioned(s, &s->blocks[i])) {
                    s->blocks[i].dir_off = at;
                    at += (size_t)s->blocks[i].rows * s->blocks[i].cols;
                }
        }
        s->dseg[comm->world] = at;
        s->dirs = be->alloc(be, (at ? at : 1) * sizeof(float), "Shampoo directions");
        if (be->inverse_root && !comm_device_collectives(comm) && comm->world > 1)
            s->dirs_host = xmalloc((at ? at : 1) * sizeof(float), "Shampoo directions, host stage");
    }
    size_t np = model->num_params;
    s->m = be->alloc(be, 3 * np * sizeof(float), "Shampoo m, v and G");  // one allocation: m, v, G
    s->v = s->m + np;
    s->G = s->v + np;
    s->roots = be->alloc(be, (s->root_floats ? s->root_floats : 1) * sizeof(float), "Shampoo roots");
    s->factors = be->alloc(be, (s->factor_floats ? s->factor_floats : 1) * sizeof(float), "Shampoo factors");
    // The update runs block groups of one shape in chunks of up to chunk_floats elements (at least the largest
    // block; 2^21 floats = 8 MiB otherwise, or the model if smaller), so that a group is a handful of batched calls.
    s->chunk_floats = largest > ((size_t)1 << 21) ? largest : ((size_t)1 << 21);
    if (s->chunk_floats > model->num_params && model->num_params >= largest) s->chunk_floats = model->num_params;
    s->scratch_floats = 4 * s->chunk_floats;
    s->scratch = be->alloc(be, s->scratch_floats * sizeof(float), "Shampoo scratch");
    s->kind = xmalloc((size_t)(s->nblocks ? s->nblocks : 1), "Shampoo block kinds");
    if (be->inverse_root) {  // device roots: the broadcast area (every owner's packed buffer, in rank order)
        s->area_off = xcalloc((size_t)(comm->world + 1) * sizeof(size_t), "root area offsets");
        for (int r = 0; r < comm->world; r++) {
            int nb;
            s->area_off[r + 1] = s->area_off[r] + packed_size(s, r, &nb);
        }
        s->area = be->alloc(be, s->area_off[comm->world] + 4, "Shampoo root broadcast area");
        int nmax = 0;  // the largest factor this rank owns: every root context sized once, here
        for (int i = 0; i < s->nowned; i++)
            for (int k = 0; k < s->blocks[s->owned[i]].order; k++)
                nmax = s->blocks[s->owned[i]].dim[k] > nmax ? s->blocks[s->owned[i]].dim[k] : nmax;
        if (nmax && be->reserve_roots) be->reserve_roots(be, nmax, cfg->root_fp64, root_sides());
        if (cfg->root_delay) snap_buffer(s);
    }
    // Factors start at eps I (the reference's local change), on the host then uploaded once.
    float *f = xcalloc((s->factor_floats ? s->factor_floats : 1) * sizeof(float), "factor init");
    for (int i = 0; i < s->nowned; i++) {
        const ShampooBlock *b = &s->blocks[s->owned[i]];
        for (int k = 0; k < b->order; k++)
            for (int d = 0; d < b->dim[k]; d++) f[b->fac_off[k] + (size_t)d * b->dim[k] + d] = (float)cfg->eps;
    }
    be->upload(be, s->factors, f, s->factor_floats * sizeof(float));
    free(f);
}

void shampoo_free(Shampoo *s) {
    Backend *be = s->model->be;
    if (s->cfg.check_replicas && s->comm->rank == 0)
        fprintf(stderr, "simplest-dist: shampoo: replica checks passed: %lld root broadcasts, %lld parameter sets "
                        "(last at step %lld, %d ranks)\n",
                (long long)s->root_checks, (long long)s->param_checks, (long long)s->last_check_step, s->comm->world);
    be->free(be, s->m);
    be->free(be, s->roots);
    if (s->job) {  // a root thread still running at the end of a run
        pthread_join(s->thread, NULL);
        job_free(s->job);
    }
    if (s->area) be->free(be, s->area);
    if (s->snap) be->free(be, s->snap);
    free(s->area_off);
    be->free(be, s->factors);
    be->free(be, s->scratch);
    plan_free(s, &s->plan);
    plan_free(s, &s->aplan);
    plan_free(s, &s->fplan);
    if (s->dirs) be->free(be, s->dirs);
    free(s->dirs_host);
    free(s->dseg);
    free(s->kind);
    free(s->blocks);
    free(s->owned);
}

void shampoo_inject_failure(Shampoo *s, int block) { s->blocks[block].inject = 1; }

// ---------------------------------------------------------------- statistics and roots

// Plan modes: the blocks the plan takes and where their steps go.
enum { PLAN_REPLICATED, PLAN_OWNERS, PLAN_APPLY };
static struct ShampooPlan *plan_build(Shampoo *s, const signed char *kind, int mode);

// F <- beta2 F + (1 - beta2) G_b G_b^T (and G_b^T G_b): owner only, from the raw G of this step. The owned blocks
// run group by group (one shape each: the statistics plan, built once), gathered into the scratch, as batched GEMMs.
static void update_factors(Shampoo *s) {
    Backend *be = s->model->be;
    // 1 - beta2 rounded once from double: 1.0f - (float)0.999 would be 1.3e-5 off 0.001, a bias of the statistics.
    float b2 = (float)s->cfg.beta2, a = (float)(1.0 - s->cfg.beta2);
    if (!s->fplan) {
        signed char *kind = xmalloc((size_t)(s->nblocks ? s->nblocks : 1), "Shampoo statistics plan");
        memset(kind, -1, (size_t)s->nblocks);
        for (int i = 0; i < s->nowned; i++) kind[s->owned[i]] = 2;
        s->fplan = plan_build(s, kind, PLAN_REPLICATED);
        free(kind);
    }
    float *Gb = s->scratch + s->chunk_floats;
    for (int gi = 0; gi < s->fplan->ngroups; gi++) {
        const UpdGroup *g = &s->fplan->g[gi];
        const float *const *gb = (const float *const *)g->gb;
        float *const *F0 = (float *const *)g->x0, *const *F1 = (float *const *)g->x1;
        for (int c0 = 0; c0 < g->nb; c0 += g->nbc) {
            int n = g->nb - c0 < g->nbc ? g->nb - c0 : g->nbc;
            be->gather_blocks(be, Gb, s->G, g->offs + c0, g->lds + c0, n, g->rows, g->cols);
            if (g->order == 1) {
                int d = g->cols;
                be->gemm_batched(be, 0, 1, d, d, 1, a, gb, 1, gb, 1, b2, F0 + c0, d, n);
            } else {
                be->gemm_batched(be, 0, 1, g->rows, g->rows, g->cols, a, gb, g->cols, gb, g->cols, b2, F0 + c0, g->rows, n);
                be->gemm_batched(be, 1, 0, g->cols, g->cols, g->rows, a, gb, g->cols, gb, g->cols, b2, F1 + c0, g->cols, n);
            }
        }
    }
}

// X = A^(-1/r) of the bias-corrected factor (spec §2.4), into root (fp32, n x n). Returns 0, 1 if the
// decomposition failed, 2 if the factor is not finite.
int shampoo_inverse_root(const float *F, int n, double bias_corr, int r, double eps, int fp64, float *root) {
    size_t nn = (size_t)n * n;
    double *A = xmalloc(nn * sizeof(double), "root matrix");
    double *w = xmalloc((size_t)n * sizeof(double), "eigenvalues");
    int rc = 0;
    for (size_t i = 0; i < nn; i++) {
        A[i] = (double)F[i] / bias_corr;
        if (!isfinite(A[i])) rc = 2;
    }
    if (rc == 0) {
        int info;
        if (fp64) {
            info = LAPACKE_dsyevd(LAPACK_ROW_MAJOR, 'V', 'L', n, A, n, w);
        } else {
            float *Af = xmalloc(nn * sizeof(float), "root matrix fp32");
            float *wf = xmalloc((size_t)n * sizeof(float), "eigenvalues fp32");
            for (size_t i = 0; i < nn; i++) Af[i] = (float)A[i];
            info = LAPACKE_ssyevd(LAPACK_ROW_MAJOR, 'V', 'L', n, Af, n, wf);
            for (size_t i = 0; i < nn; i++) A[i] = Af[i];
            for (int i = 0; i < n; i++) w[i] = wf[i];
            free(Af);
            free(wf);
        }
        if (info != 0) rc = 1;
    }
    if (rc == 0) {
        double lmin = w[0];
        for (int i = 1; i < n; i++) lmin = fmin(lmin, w[i]);
        double shift = lmin < 0.0 ? lmin : 0.0;  // the reference's shift rule
        for (int j = 0; j < n; j++) {            // Y = Q diag(lambda^(-1/(2r))), in place (column j of Q)
            double sc = pow(w[j] - shift + eps, -1.0 / (2.0 * r));
            if (!isfinite(sc)) rc = 1;
            for (int i = 0; i < n; i++) A[(size_t)i * n + j] *= sc;
        }
        if (rc == 0) {
            double *X = xmalloc(nn * sizeof(double), "root");
            // X = Y Y^T: one triangle by SYRK, mirrored, so X is exactly symmetric.
            cblas_dsyrk(CblasRowMajor, CblasLower, CblasNoTrans, n, n, 1.0, A, n, 0.0, X, n);
            for (int i = 0; i < n && rc == 0; i++)
                for (int j = 0; j <= i; j++) {
                    double x = X[(size_t)i * n + j];
                    if (!isfinite(x) || !isfinite((float)x)) {
                        rc = 1;
                        break;
                    }
                    root[(size_t)i * n + j] = root[(size_t)j * n + i] = (float)x;
                }
            free(X);
        }
    }
    free(A);
    free(w);
    return rc;
}

// j of "<param> block j": the index of block i among the blocks of its parameter.
static int param_block_index(const Shampoo *s, int i) {
    int j = 0;
    for (int k = 0; k < i; k++) j += s->blocks[k].param == s->blocks[i].param;
    return j;
}

// The packed broadcast buffer of owner r: an int32 status per owned block (0 = new roots, 1 = failed, previous
// roots kept, 2 = non-finite factor), then the roots of those blocks in block order, factor by factor (fp32).
static size_t packed_size(const Shampoo *s, int r, int *nblocks) {
    int nb = 0;
    size_t floats = 0;
    for (int i = 0; i < s->nblocks; i++) {
        const ShampooBlock *b = &s->blocks[i];
        if (b->owner != r || !block_preconditioned(s, b)) continue;
        nb++;
        for (int k = 0; k < b->order; k++) floats += (size_t)b->dim[k] * b->dim[k];
    }
    *nblocks = nb;
    return (size_t)nb * sizeof(int32_t) + floats * sizeof(float);
}


// The owner's roots, block by block from a shared counter: on the host with LAPACK (CPU backend: one worker, on
// the calling thread), or on the device by up to BE_ROOT_SIDES root threads, each on a side context of its own
// (one cuSOLVER eigendecomposition is latency-bound, so several overlap). Each root depends only on its factor, so
// the bits do not depend on which worker computes it. Status and a non-finite factor's index go to job->out and
// job->bad (finish_refresh writes the index into the block's first root slot).
typedef struct {
    Shampoo *s;
    RootJob *job;
    const float *src;  // the factors (host snapshot, or device factors / snapshot)
    float *roots;      // this rank's packed roots (host buffer or device area slot)
    double bias;
    int device;        // be->inverse_root, else shampoo_inverse_root
    int *blk;          // owned preconditioned blocks, ascending
    size_t *at;        // their slots in the packed roots
    int n, next;       // blocks; the next to take (atomic)
} RootWork;

typedef struct {
    RootWork *w;
    int side;  // the device context (1 .. BE_ROOT_SIDES)
} RootWorker;

// SD_ROOT_SIDES (1 .. BE_ROOT_SIDES, default BE_ROOT_SIDES): how many root threads (and side streams) an owner uses.
static int root_sides(void) {
    const char *e = getenv("SD_ROOT_SIDES");
    int n = e ? atoi(e) : BE_ROOT_SIDES;
    return n < 1 ? 1 : n > BE_ROOT_SIDES ? BE_ROOT_SIDES : n;
}

static void *root_worker(void *arg) {
    RootWorker *a = arg;
    RootWork *w = a->w;
    Shampoo *s = w->s;
    Backend *be = s->model->be;
    int32_t *status = (int32_t *)w->job->out;
    for (;;) {
        int j = __atomic_fetch_add(&w->next, 1, __ATOMIC_RELAXED);
        if (j >= w->n) break;
        const ShampooBlock *b = &s->blocks[w->blk[j]];
        int st = w->job->inject[w->blk[j]] ? 1 : 0;  // an injected failure (tests)
        size_t slot = w->at[j];
        int k = 0;
        for (; k < b->order && st == 0; k++) {
            const float *F = w->src + b->fac_off[k];
            st = w->device ? be->inverse_root(be, F, b->dim[k], w->bias, 2 * b->order, s->cfg.eps, s->cfg.root_fp64,
                                              w->roots + slot, a->side)
                           : shampoo_inverse_root(F, b->dim[k], w->bias, 2 * b->order, s->cfg.eps, s->cfg.root_fp64,
                                                  w->roots + slot);
            slot += (size_t)b->dim[k] * b->dim[k];
        }
        w->job->bad[j] = st == 2 ? (float)(k - 1) : 0.0f;
        status[j] = st;
    }
    return NULL;
}

// Owner work: roots of every owned block from the factor snapshot (it may run on a thread while the next step
// computes).
static void *compute_roots(void *arg) {
    RootJob *job = arg;
    Shampoo *s = job->s;
    double te = now_sec();
    int nb;
    packed_size(s, s->comm->rank, &nb);
    RootWork w = {.s = s, .job = job, .bias = 1.0 - pow(s->cfg.beta2, (double)job->t), .device = s->area != NULL};
    if (w.device) {  // into this rank's slot of the broadcast area
        w.src = job->dsrc;
        w.roots = (float *)((char *)s->area + s->area_off[s->comm->rank] + (size_t)nb * sizeof(int32_t));
    } else {
        w.src = job->factors;
        w.roots = (float *)(job->out + (size_t)nb * sizeof(int32_t));
    }
    w.blk = xmalloc((size_t)(nb ? nb : 1) * sizeof(int), "owned root blocks");
    w.at = xmalloc((size_t)(nb ? nb : 1) * sizeof(size_t), "owned root slots");
    size_t at = 0;
    for (int i = 0; i < s->nblocks; i++) {
        const ShampooBlock *b = &s->blocks[i];
        if (b->owner != s->comm->rank || !block_preconditioned(s, b)) continue;
        w.blk[w.n] = i;
        w.at[w.n++] = at;
        for (int k = 0; k < b->order; k++) at += (size_t)b->dim[k] * b->dim[k];
    }
    if (w.device) {
        int nt = root_sides() < w.n ? root_sides() : w.n;
        pthread_t th[BE_ROOT_SIDES];
        RootWorker args[BE_ROOT_SIDES];
        for (int k = 0; k < nt; k++) {
            args[k] = (RootWorker){&w, k + 1};
            CHECK(pthread_create(&th[k], NULL, root_worker, &args[k]) == 0, "cannot start a root thread");
        }
        for (int k = 0; k < nt; k++) pthread_join(th[k], NULL);
    } else {
        // The same on every rank: the root bits depend on it. Only without a concurrent step (the setting is global).
        if (!job->threaded) openblas_set_num_threads(s->cfg.root_threads);
        RootWorker one = {&w, 0};
        root_worker(&one);
        if (!job->threaded) openblas_set_num_threads(1);
    }
    free(w.blk);
    free(w.at);
    job->eig_s = now_sec() - te;
    return NULL;
}

// The job of the refresh of step t, without its factor snapshot (the caller fills job->factors on the host path,
// or points job->dsrc at the device factors or snapshot).
static RootJob *job_new(Shampoo *s, int64_t t) {
    RootJob *job = xcalloc(sizeof(RootJob), "root job");
    int nb;
    job->s = s;
    job->t = t;
    size_t own = packed_size(s, s->comm->rank, &nb);
    if (s->area) {
        job->out = xcalloc((size_t)nb * sizeof(int32_t) + 1, "own root status");
    } else {
        job->factors = xmalloc((s->factor_floats ? s->factor_floats : 1) * sizeof(float), "factor snapshot");
        job->out = xcalloc(own + 1, "own root buffer");
    }
    job->bad = xcalloc((size_t)nb * sizeof(float) + 1, "non-finite factor indices");
    job->inject = xcalloc((size_t)(s->nblocks ? s->nblocks : 1) * sizeof(int), "injected failures");
    for (int i = 0; i < s->nblocks; i++) {
        job->inject[i] = s->blocks[i].inject;
        s->blocks[i].inject = 0;
    }
    return job;
}

// Snapshot of the owned factors and the job that turns them into roots.
static RootJob *start_refresh(Shampoo *s) {
    Backend *be = s->model->be;
    RootJob *job = job_new(s, s->t);
    if (s->area) {
        job->dsrc = s->factors;
        if (s->cfg.root_delay) {  // later steps update the factors while the side streams read the snapshot
            be->copy(be, s->snap, s->factors, s->factor_floats * sizeof(float));
            job->dsrc = s->snap;
        }
        be->sync(be);  // the side streams read what the compute stream wrote
    } else {
        be->download(be, job->factors, s->factors, s->factor_floats * sizeof(float));
    }
    return job;
}

// root_delay >= 1: the decompositions of `job` run on s->thread while the next steps compute; the step that
// installs them (shampoo_step, at t >= job->t + root_delay) or a save joins it.
static void launch_refresh(Shampoo *s, RootJob *job) {
    CHECK(s->job == NULL, "shampoo: a refresh started while the one of step %lld is pending", (long long)s->job->t);
    job->threaded = 1;
    s->job = job;
    CHECK(pthread_create(&s->thread, NULL, compute_roots, job) == 0, "cannot start the root thread");
}

static void finish_refresh(Shampoo *s, RootJob *job);

// Waits for the pending refresh and installs its roots (a collective: every rank calls it at the same step).
static void install_pending(Shampoo *s) {
    double tw = now_sec();
    pthread_join(s->thread, NULL);
    s->last_root_wait_s = now_sec() - tw;
    s->root_wait_s += s->last_root_wait_s;
    finish_refresh(s, s->job);
    s->job = NULL;
    s->last_refresh_s = now_sec() - s->refresh_t0;
}

// ---------------------------------------------------------------- replica checks (spec §3.4 item 5, P16)

#define FNV_OFFSET 0xcbf29ce484222325ull
static uint64_t fnv_words(uint64_t h, const float *x, size_t n) {  // FNV-1a over 32-bit words
    for (size_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, x + i, sizeof u);
        h = (h ^ u) * 0x100000001b3ull;
    }
    return h;
}

// Every rank's nslot checksums reach every rank (one all-reduce of 32-bit halves, exact in fp64), so that all ranks
// take the same decision. Returns 0, or 1 with the first slot (ascending) and rank (ascending) whose checksum
// differs from that of rank ref[slot], and both checksums.
static int replicas_agree(Shampoo *s, const uint64_t *h, int nslot, const int *ref, int *bad_slot, int *bad_rank,
                          uint64_t *got, uint64_t *want) {
    Comm *c = s->comm;
    size_t n = (size_t)c->world * nslot * 2;
    double *all = xcalloc(n * sizeof(double), "replica checksums");
    for (int k = 0; k < nslot; k++) {
        all[((size_t)c->rank * nslot + k) * 2] = (double)(uint32_t)h[k];
        all[((size_t)c->rank * nslot + k) * 2 + 1] = (double)(uint32_t)(h[k] >> 32);
    }
    comm_allreduce_sum_f64(c, all, n);
    int bad = 0;
    for (int k = 0; k < nslot && !bad; k++)
        for (int q = 0; q < c->world && !bad; q++) {
            const double *a = all + ((size_t)q * nslot + k) * 2, *b = all + ((size_t)ref[k] * nslot + k) * 2;
            if (a[0] != b[0] || a[1] != b[1]) {
                bad = 1;
                *bad_slot = k;
                *bad_rank = q;
                *got = (uint64_t)a[0] | (uint64_t)a[1] << 32;
                *want = (uint64_t)b[0] | (uint64_t)b[1] << 32;
            }
        }
    free(all);
    return bad;
}

// After a root broadcast: each owner's roots, as installed on every rank, against the owner's own.
static void check_roots(Shampoo *s, int64_t refresh_t) {
    Comm *c = s->comm;
    int P = c->world;
    float *roots = xmalloc((s->root_floats ? s->root_floats : 1) * sizeof(float), "root check");
    s->model->be->download(s->model->be, roots, s->roots, s->root_floats * sizeof(float));
    uint64_t *h = xmalloc((size_t)P * sizeof(uint64_t), "root checksums");
    int *ref = xmalloc((size_t)P * sizeof(int), "root check owners");
    for (int r = 0; r < P; r++) {
        h[r] = FNV_OFFSET;
        ref[r] = r;
    }
    for (int i = 0; i < s->nblocks; i++) {
        const ShampooBlock *b = &s->blocks[i];
        if (!block_preconditioned(s, b)) continue;
        for (int k = 0; k < b->order; k++)
            h[b->owner] = fnv_words(h[b->owner], roots + b->root_off[k], (size_t)b->dim[k] * b->dim[k]);
    }
    int slot, rank;
    uint64_t got, want;
    if (replicas_agree(s, h, P, ref, &slot, &rank, &got, &want))
        die_user("shampoo: replica check failed at step %lld: the roots of refresh %lld of the blocks owned by rank %d "
                 "differ on rank %d from the owner's (checksum %016llx, owner %016llx)",
                 (long long)s->t, (long long)refresh_t, slot, rank, (unsigned long long)got,
                 (unsigned long long)want);
    uint64_t all = FNV_OFFSET;
    for (int r = 0; r < P; r++) all = (all ^ h[r]) * 0x100000001b3ull;
    s->root_hash = all;
    s->root_checks++;
    s->last_check_step = s->t;
    free(roots);
    free(h);
    free(ref);
}

// At a refresh step, after the update: the parameters of every rank against rank 0's.
static void check_params(Shampoo *s) {
    Model *m = s->model;
    float *w = xmalloc(m->num_params * sizeof(float), "parameter check");
    m->be->download(m->be, w, m->params, m->num_params * sizeof(float));
    uint64_t h = fnv_words(FNV_OFFSET, w, m->num_params);
    int ref = 0, slot, rank;
    uint64_t got, want;
    if (replicas_agree(s, &h, 1, &ref, &slot, &rank, &got, &want))
        die_user("shampoo: replica check failed at step %lld: the parameters on rank %d differ from rank 0's "
                 "(checksum %016llx, rank 0 %016llx)",
                 (long long)s->t, rank, (unsigned long long)got, (unsigned long long)want);
    s->param_hash = h;
    s->param_checks++;
    s->last_check_step = s->t;
    free(w);
}

int shampoo_replica_checks(const Shampoo *s, int64_t *root_checks, int64_t *param_checks) {
    if (root_checks) *root_checks = s->root_checks;
    if (param_checks) *param_checks = s->param_checks;
    return s->cfg.check_replicas;
}

int64_t shampoo_pending_step(const Shampoo *s) { return s->job ? s->job->t : 0; }

void shampoo_traffic(const Shampoo *s, ShampooTraffic *out) {
    memset(out, 0, sizeof *out);
    out->total = s->bcast_bytes;
    out->sent = s->bcast_sent;
    out->received = s->bcast_recv;
    out->last_refresh = s->bcast_last;
    out->refreshes = s->refreshes;
    for (int r = 0; r < s->comm->world; r++) {
        int nb;
        out->per_refresh += packed_size(s, r, &nb);
    }
}

// Every owner r broadcasts its segment [off[r], off[r + 1]) (in units of `unit` bytes; world + 1 entries) of the
// contiguous buffer base to all ranks, in one call: by MPI (host memory), by NCCL (device memory, comm_bcast_all),
// or, on a device backend without NCCL, staged through host memory (stage: the whole buffer's size; NULL: one is
// allocated for the call). The root broadcast and apply "owners"' all-gather of the steps.
static void bcast_segments(Shampoo *s, char *base, const size_t *off, size_t unit, int dev, char *stage) {
    Backend *be = s->model->be;
    Comm *comm = s->comm;
    int P = comm->world;
    void **bufs = xcalloc((size_t)P * sizeof(void *), "broadcast buffers");
    size_t *bytes = xcalloc((size_t)P * sizeof(size_t), "broadcast sizes");
    size_t total = off[P] * unit;
    char *own_stage = NULL, *src = base;
    if (dev && !comm_device_collectives(comm)) {  // no NCCL: through the host
        src = stage ? stage : (own_stage = xmalloc(total + 1, "staged broadcast"));
        be->download(be, src, base, total);
    }
    for (int r = 0; r < P; r++) {
        bufs[r] = src + off[r] * unit;
        bytes[r] = (off[r + 1] - off[r]) * unit;
    }
    comm_bcast_all(comm, bufs, bytes, dev && src == base);
    if (src != base) be->upload(be, base, src, total);
    free(own_stage);
    free(bufs);
    free(bytes);
}

// Every owner broadcasts its packed buffer; every rank (the owner included) installs the roots from the bytes it
// holds, so that all ranks take the same decisions and hold the same bits. Device mode: the area is broadcast in
// place (NCCL, or staged through the host without it), the status headers are read back, and roots are installed
// by device copies.
static void finish_refresh(Shampoo *s, RootJob *job) {
    Model *m = s->model;
    Backend *be = m->be;
    Comm *comm = s->comm;
    int P = comm->world, dev = s->area != NULL;
    s->bcast_last = 0;
    void **bufs = xcalloc((size_t)P * sizeof(void *), "root broadcast buffers");
    size_t *bytes = xcalloc((size_t)P * sizeof(size_t), "root broadcast sizes");
    int *nbs = xcalloc((size_t)P * sizeof(int), "root broadcast counts");
    for (int r = 0; r < P; r++) bytes[r] = packed_size(s, r, &nbs[r]);
    double tb = now_sec();
    int nb_own = nbs[comm->rank];
    char *own = dev ? (char *)s->area + s->area_off[comm->rank] : (char *)job->out;
    const int32_t *st = (const int32_t *)job->out;
    size_t at = 0;  // a non-finite factor's index rides in the block's first root slot, so that every rank names it
    for (int i = 0, j = 0; i < s->nblocks; i++) {
        const ShampooBlock *b = &s->blocks[i];
        if (b->owner != comm->rank || !block_preconditioned(s, b)) continue;
        char *slot = own + (size_t)nb_own * sizeof(int32_t) + at * sizeof(float);
        if (st[j] == 2 && dev) be->upload(be, slot, &job->bad[j], sizeof(float));
        if (st[j] == 2 && !dev) memcpy(slot, &job->bad[j], sizeof(float));
        j++;
        for (int k = 0; k < b->order; k++) at += (size_t)b->dim[k] * b->dim[k];
    }
    if (dev) {
        if (nb_own) be->upload(be, own, job->out, (size_t)nb_own * sizeof(int32_t));  // the status header
        bcast_segments(s, s->area, s->area_off, 1, 1, NULL);
        for (int r = 0; r < P; r++) bufs[r] = (char *)s->area + s->area_off[r];  // what is installed from
    } else {
        for (int r = 0; r < P; r++)
            bufs[r] = r == comm->rank ? job->out : (nbs[r] ? xcalloc(bytes[r], "root broadcast buffer") : NULL);
        comm_bcast_all(comm, bufs, bytes, 0);
    }
    s->bcast_s += now_sec() - tb;
    for (int r = 0; r < P; r++) {
        int nb = nbs[r];
        if (nb == 0) continue;
        s->bcast_bytes += bytes[r];
        s->bcast_last += bytes[r];
        if (r == comm->rank)
            s->bcast_sent += bytes[r];
        else
            s->bcast_recv += bytes[r];
        int32_t *status = (int32_t *)bufs[r];
        const float *roots = (const float *)((const char *)bufs[r] + (size_t)nb * sizeof(int32_t));
        if (dev) {  // the header to the host; roots stay on the device
            status = xmalloc((size_t)nb * sizeof(int32_t), "root status");
            be->download(be, status, bufs[r], (size_t)nb * sizeof(int32_t));
        }
        int j = 0;
        size_t at = 0;
        for (int i = 0; i < s->nblocks; i++) {
            ShampooBlock *b = &s->blocks[i];
            if (b->owner != r || !block_preconditioned(s, b)) continue;
            int st = status[j++];
            size_t len = 0;
            for (int k = 0; k < b->order; k++) len += (size_t)b->dim[k] * b->dim[k];
            int pj = param_block_index(s, i);  // blocks are named within their parameter (spec §2.7, §3.5)
            if (st == 2) {
                float fk = 0.0f;
                if (dev)
                    be->download(be, &fk, roots + at, sizeof fk);
                else
                    fk = roots[at];
                die_user("shampoo: non-finite factor %d of %s block %d (%dx%d) at step %lld (lower opt.lr or check "
                         "the data)",
                         (int)fk, m->tensors[b->param].name, pj, b->rows, b->cols, (long long)job->t);
            }
            if (st == 0) {
                if (dev)
                    be->copy(be, s->roots + b->root_off[0], roots + at, len * sizeof(float));
                else
                    be->upload(be, s->roots + b->root_off[0], roots + at, len * sizeof(float));
                b->has_roots = 1;
                b->fails = 0;
            } else {
                b->fails++;
                s->failed_decomps++;
                if (comm->rank == 0)
                    fprintf(stderr, "simplest-dist: warning: shampoo: decomposition failed for %s block %d (%dx%d) at "
                                    "step %lld (%d in a row); keeping its previous roots\n",
                            m->tensors[b->param].name, pj, b->rows, b->cols, (long long)job->t, b->fails);
                if (b->fails > 3)
                    die_user("shampoo: decomposition failed 4 times in a row for %s block %d (%dx%d) (step %lld)",
                             m->tensors[b->param].name, pj, b->rows, b->cols, (long long)job->t);
            }
            at += len;
        }
        if (dev) free(status);
        else if (r != comm->rank) free(bufs[r]);
    }
    free(bufs);
    free(bytes);
    free(nbs);
    if (s->cfg.check_replicas) check_roots(s, job->t);
    s->eig_s += job->eig_s;
    job_free(job);
    s->refreshes++;
}

// ---------------------------------------------------------------- the step

// The update's plan: the blocks that take a block step, grouped by (kind, shape) in block order, each group with
// its backend index arrays (block offsets and row strides, root pointers, scratch slots), so that a group costs a
// few batched calls however many blocks it has. kind: 1 = Shampoo step, 0 = graft step, -1 = the block's tensor took
// the whole-tensor Adam step. Kinds change only when roots are installed or S is passed; then the plan is rebuilt.
static void plan_free(Shampoo *s, struct ShampooPlan **pp) {
    struct ShampooPlan *p = *pp;
    if (!p) return;
    Backend *be = s->model->be;
    for (int i = 0; i < p->ngroups; i++) {
        UpdGroup *g = &p->g[i];
        be->free(be, g->offs);
        be->free(be, g->lds);
        if (g->toffs != g->offs) be->free(be, g->toffs);
        if (g->tlds != g->lds) be->free(be, g->tlds);
        be->free(be, (void *)g->x0);
        be->free(be, g->gb);
    }
    free(p->g);
    free(p->kind);
    free(p);
    *pp = NULL;
}

static void *upload_array(Backend *be, const void *host, size_t bytes, const char *what) {
    void *d = be->alloc(be, bytes ? bytes : 1, what);
    be->upload(be, d, host, bytes);
    return d;
}

// kind 2 (the statistics plan): the owned blocks, with factor pointers in place of the roots. mode PLAN_OWNERS: only
// the blocks this rank owns, their steps written to their slots of the direction buffer; PLAN_APPLY: every block,
// with both its parameter offsets and its slots (the steps are read back from the gathered buffer).
static struct ShampooPlan *plan_build(Shampoo *s, const signed char *kind, int mode) {
    Backend *be = s->model->be;
    size_t nbl = (size_t)(s->nblocks ? s->nblocks : 1);
    struct ShampooPlan *p = xcalloc(sizeof *p, "Shampoo plan");
    p->kind = xmalloc(nbl, "Shampoo plan kinds");
    memcpy(p->kind, kind, (size_t)s->nblocks);
    p->g = xcalloc(nbl * sizeof(UpdGroup), "Shampoo plan groups");
    int64_t *offs = xmalloc(nbl * sizeof(int64_t), "Shampoo plan offsets");
    int *lds = xmalloc(nbl * sizeof(int), "Shampoo plan strides");
    int64_t *toffs = xmalloc(nbl * sizeof(int64_t), "Shampoo plan slot offsets");
    int *tlds = xmalloc(nbl * sizeof(int), "Shampoo plan slot strides");
    const float **roots = xmalloc(2 * nbl * sizeof(float *), "Shampoo plan roots");
    float **slots = NULL;
    char *taken = xcalloc(nbl, "Shampoo plan taken");
    for (int i = 0; i < s->nblocks; i++) {
        if (mode == PLAN_OWNERS && s->blocks[i].owner != s->comm->rank) taken[i] = 1;
    }
    for (int i = 0; i < s->nblocks; i++) {
        if (kind[i] < 0 || taken[i]) continue;
        const ShampooBlock *b0 = &s->blocks[i];
        UpdGroup *g = &p->g[p->ngroups++];
        g->kind = kind[i];
        g->order = b0->order;
        g->rows = b0->order == 2 ? b0->rows : 1;
        g->cols = b0->order == 2 ? b0->cols : b0->rows;
        int n = 0;
        for (int j = i; j < s->nblocks; j++) {  // the members, in block order
            const ShampooBlock *b = &s->blocks[j];
            int rows = b->order == 2 ? b->rows : 1, cols = b->order == 2 ? b->cols : b->rows;
            if (taken[j] || kind[j] != g->kind || b->order != g->order || rows != g->rows || cols != g->cols) continue;
            taken[j] = 1;
            offs[n] = (int64_t)b->offset;
            lds[n] = b->order == 2 ? b->ld : b->rows;
            toffs[n] = (int64_t)b->dir_off;
            tlds[n] = cols;
            const float *base = g->kind == 2 ? s->factors : s->roots;
            const size_t *off = g->kind == 2 ? b->fac_off : b->root_off;
            roots[n] = base + off[0];
            roots[nbl + n] = b->order == 2 ? base + off[1] : NULL;
            n++;
        }
        g->nb = n;
        size_t area = (size_t)g->rows * g->cols;
        g->nbc = (int)(s->chunk_floats / area);
        if (g->nbc > g->nb) g->nbc = g->nb;
        g->offs = upload_array(be, offs, (size_t)n * sizeof(int64_t), "Shampoo plan offsets");
        g->lds = upload_array(be, lds, (size_t)n * sizeof(int), "Shampoo plan strides");
        g->toffs = g->offs;
        g->tlds = g->lds;
        if (mode != PLAN_REPLICATED) {
            g->toffs = upload_array(be, toffs, (size_t)n * sizeof(int64_t), "Shampoo plan slot offsets");
            g->tlds = upload_array(be, tlds, (size_t)n * sizeof(int), "Shampoo plan slot strides");
        }
        memmove(roots + n, roots + nbl, (size_t)n * sizeof(float *));  // x0 (n) then x1 (n)
        g->x0 = upload_array(be, roots, (size_t)2 * n * sizeof(float *), "Shampoo plan root pointers");
        g->x1 = g->x0 + n;
        // scratch: Pg | Gb | tmp | Ps, chunk_floats each; slot k of a chunk at k * area
        slots = xmalloc((size_t)3 * g->nbc * sizeof(float *), "Shampoo plan slots");
        for (int k = 0; k < g->nbc; k++)
            for (int q = 0; q < 3; q++) slots[q * g->nbc + k] = s->scratch + (q + 1) * s->chunk_floats + k * area;
        g->gb = upload_array(be, slots, (size_t)3 * g->nbc * sizeof(float *), "Shampoo plan slots");
        g->tmp = g->gb + g->nbc;
        g->ps = g->gb + 2 * g->nbc;
        free(slots);
    }
    free(offs);
    free(lds);
    free(toffs);
    free(tlds);
    free(roots);
    free(taken);
    return p;
}

int shampoo_update_groups(const Shampoo *s, int *chunks) {
    int ng = s->plan ? s->plan->ngroups : 0, nc = 0;
    for (int i = 0; i < ng; i++) nc += (s->plan->g[i].nb + s->plan->g[i].nbc - 1) / s->plan->g[i].nbc;
    if (chunks) *chunks = nc;
    return ng;
}

// One group's update (spec §2.3 step 7) from m and v already updated, chunk by chunk: gather m and v, the Adam
// direction, then either the graft step, or G-bar = m / bc1, X_0 G-bar (X_1) and the grafted step.
static void update_group(Shampoo *s, const UpdGroup *g, double lr, float bc1, float bc2) {
    Backend *be = s->model->be;
    size_t area = (size_t)g->rows * g->cols;
    // the scratch's four chunks: Pg | Gb | tmp (v, then X_0 G-bar: the slots behind g->tmp) | Ps
    float *Pg = s->scratch, *Gb = Pg + s->chunk_floats, *tmp = Gb + s->chunk_floats, *Ps = tmp + s->chunk_floats;
    for (int c0 = 0; c0 < g->nb; c0 += g->nbc) {
        int n = g->nb - c0 < g->nbc ? g->nb - c0 : g->nbc;
        be->gather_blocks(be, Gb, s->m, g->offs + c0, g->lds + c0, n, g->rows, g->cols);
        be->gather_blocks(be, tmp, s->v, g->offs + c0, g->lds + c0, n, g->rows, g->cols);
        be->adam_dir(be, Pg, Gb, tmp, n * area, bc1, bc2, (float)s->cfg.graft_eps);
        float *target = g->toffs == g->offs ? s->model->params : s->dirs;
        if (g->kind == 0) {
            be->graft_update_blocks(be, target, g->toffs + c0, g->tlds + c0, Pg, NULL, n, g->rows, g->cols, lr);
            continue;
        }
        be->scale(be, Gb, n * area, 1.0f / bc1);  // G-bar = m / (1 - beta1^t)
        const float *const *gb = (const float *const *)g->gb, *const *tm = (const float *const *)g->tmp;
        if (g->order == 1) {
            int d = g->cols;
            be->gemm_batched(be, 0, 0, d, 1, d, 1.0f, g->x0 + c0, d, gb, 1, 0.0f, g->ps, 1, n);
        } else {
            be->gemm_batched(be, 0, 0, g->rows, g->cols, g->rows, 1.0f, g->x0 + c0, g->rows, gb, g->cols, 0.0f, g->tmp,
                             g->cols, n);
            be->gemm_batched(be, 0, 0, g->rows, g->cols, g->cols, 1.0f, tm, g->cols, g->x1 + c0, g->cols, 0.0f, g->ps,
                             g->cols, n);
        }
        be->graft_update_blocks(be, target, g->toffs + c0, g->tlds + c0, Pg, Ps, n, g->rows, g->cols, lr);
    }
}

// shampoo.apply "owners": every owner's steps (written at its blocks' slots of s->dirs, minus the sign: 0 - lr d)
// go to every rank in one grouped broadcast (an all-gather), then every rank adds each block's slot to its
// parameters with the graft kernel at lr = -1 (w + 1 * u): the same additions, so the same bits, as the replicated
// update's w + (-c p) on the CPU backend, and the same u on every rank whatever the world size.
static void gather_dirs(Shampoo *s) {
    double t0 = now_sec();
    // device buffers when the backend computes roots (as finish_refresh)
    bcast_segments(s, (char *)s->dirs, s->dseg, sizeof(float), s->area != NULL, (char *)s->dirs_host);
    for (int r = 0; r < s->comm->world; r++) {
        size_t bytes = (s->dseg[r + 1] - s->dseg[r]) * sizeof(float);
        if (r == s->comm->rank)
            s->dirs_sent += bytes;
        else
            s->dirs_recv += bytes;
    }
    s->gather_s += now_sec() - t0;
}

static void apply_dirs(Shampoo *s) {
    Backend *be = s->model->be;
    float *D = s->scratch;  // the first chunk of the scratch
    for (int gi = 0; gi < s->aplan->ngroups; gi++) {
        const UpdGroup *g = &s->aplan->g[gi];
        for (int c0 = 0; c0 < g->nb; c0 += g->nbc) {
            int n = g->nb - c0 < g->nbc ? g->nb - c0 : g->nbc;
            be->gather_blocks(be, D, s->dirs, g->toffs + c0, g->tlds + c0, n, g->rows, g->cols);
            be->graft_update_blocks(be, s->model->params, g->offs + c0, g->lds + c0, D, NULL, n, g->rows, g->cols,
                                    -1.0);
        }
    }
}

// A run of adjacent tensors [off, off + n) for one elementwise launch. run_add extends it with [o, o + k), or, if that
// is not adjacent, returns 1 with the finished run in flush0/flushn and starts a new one.
typedef struct {
    size_t off, n, flush0, flushn;
} Run;

static int run_add(Run *r, size_t o, size_t k) {
    if (r->n && r->off + r->n == o) {
        r->n += k;
        return 0;
    }
    int flush = r->n > 0;
    r->flush0 = r->off;
    r->flushn = r->n;
    r->off = o;
    r->n = k;
    return flush;
}

// Refresh steps: t mod f = 0 and t >= max(S, 1).
static int refresh_step(const Shampoo *s) {
    int64_t lo = s->cfg.start_step > 1 ? s->cfg.start_step : 1;
    return s->t % s->cfg.frequency == 0 && s->t >= lo;
}

void shampoo_step(Shampoo *s, double lr, double grad_scale) {
    Model *m = s->model;
    Backend *be = m->be;
    const ShampooConfig *c = &s->cfg;
    size_t np = m->num_params;
    s->t++;
    // G = clipped gradient, plus L2 decay on the decay set: exactly the ops of the Adam kernel.
    be->copy(be, s->G, m->grads, np * sizeof(float));
    be->scale(be, s->G, np, (float)grad_scale);
    if (!c->decoupled && c->weight_decay != 0.0) {
        Run r = {0, 0, 0, 0};
        for (int i = 0; i < m->ntensors; i++) {
            const TensorInfo *t = &m->tensors[i];
            if (t->decay && run_add(&r, t->offset, t->numel))
                be->axpy(be, s->G + r.flush0, m->params + r.flush0, r.flushn, (float)c->weight_decay);
        }
        if (r.n) be->axpy(be, s->G + r.off, m->params + r.off, r.n, (float)c->weight_decay);
    }
    update_factors(s);
    // root_delay d >= 1: the roots of step t - d were computed on a thread during the compute of steps t - d + 1
    // .. t, and become active now (d <= f, so this comes before the next refresh starts, even at d = f). A refresh
    // step installs a pending one in any case: after a resume with another f or d the two need not line up.
    int refresh = refresh_step(s);
    if (s->job && (refresh || s->t >= s->job->t + c->root_delay)) install_pending(s);
    if (refresh) {
        s->refresh_t0 = now_sec();
        RootJob *job = start_refresh(s);
        if (c->root_delay) {
            launch_refresh(s, job);
        } else {
            compute_roots(job);
            finish_refresh(s, job);
            s->last_refresh_s = now_sec() - s->refresh_t0;
        }
    }
    // A tensor that takes the graft step as a whole (the graft-only phase t <= S, a 1-D parameter under one_d
    // "adam", or no block with roots yet) takes it with the Adam kernel itself, so it is bitwise the project's Adam
    // (spec §2.3 step 7, §2.6). The other tensors: moments, decoupled decay, then the per-block update.
    AdamArgs a = {.lr = (float)lr, .beta1 = (float)c->beta1, .beta2 = (float)c->graft_beta2,
                  .eps = (float)c->graft_eps, .decoupled = c->decoupled, .t = s->t, .grad_scale = (float)grad_scale};
    float bc1 = (float)(1.0 - pow(c->beta1, (double)s->t)), bc2 = (float)(1.0 - pow(c->graft_beta2, (double)s->t));
    double ta = now_sec();
    int any_block_step = 0;
    signed char *kind = s->kind;  // this step's kind of every block (see the plan)
    memset(kind, -1, (size_t)s->nblocks);
    Run mom = {0, 0, 0, 0}, dec = {0, 0, 0, 0};  // elementwise ops over runs of adjacent tensors: one launch per run
    for (int i = 0, bi = 0; i < m->ntensors; i++) {
        const TensorInfo *t = &m->tensors[i];
        if (!t->trainable) continue;
        while (bi < s->nblocks && s->blocks[bi].param < i) bi++;
        int b0 = bi, b1 = bi, rooted = 0;
        while (b1 < s->nblocks && s->blocks[b1].param == i) rooted |= s->blocks[b1++].has_roots;
        int whole_graft = s->t <= c->start_step || !rooted || (c->one_d_adam && t->ndim == 1);
        if (whole_graft) {
            a.weight_decay = t->decay ? (float)c->weight_decay : 0.0f;
            be->adam_step(be, m->params + t->offset, m->grads + t->offset, s->m + t->offset, s->v + t->offset,
                          t->numel, &a);
            continue;
        }
        any_block_step = 1;
        if (run_add(&mom, t->offset, t->numel))
            be->moments(be, s->m + mom.flush0, s->v + mom.flush0, s->G + mom.flush0, mom.flushn, (float)c->beta1,
                        (float)c->graft_beta2);
        if (c->decoupled && c->weight_decay != 0.0 && t->decay && run_add(&dec, t->offset, t->numel))
            be->scale(be, m->params + dec.flush0, dec.flushn, (float)(1.0 - lr * c->weight_decay));
        for (int j = b0; j < b1; j++) {
            const ShampooBlock *b = &s->blocks[j];
            kind[j] = b->has_roots && block_preconditioned(s, b) && s->t > c->start_step;
        }
    }
    if (mom.n) be->moments(be, s->m + mom.off, s->v + mom.off, s->G + mom.off, mom.n, (float)c->beta1, (float)c->graft_beta2);
    if (dec.n) be->scale(be, m->params + dec.off, dec.n, (float)(1.0 - lr * c->weight_decay));
    if (any_block_step) {  // every tensor's moments first, then the blocks group by group (no block reads another)
        if (!s->plan || memcmp(s->plan->kind, kind, (size_t)s->nblocks) != 0) {
            plan_free(s, &s->plan);
            plan_free(s, &s->aplan);
            s->plan = plan_build(s, kind, c->apply_owners ? PLAN_OWNERS : PLAN_REPLICATED);
            if (c->apply_owners) s->aplan = plan_build(s, kind, PLAN_APPLY);
        }
        if (c->apply_owners) {  // this rank's slots start at 0: the graft kernel adds the step to them
            size_t own = s->dseg[s->comm->rank];
            if (s->dseg[s->comm->rank + 1] > own)
                be->zero(be, s->dirs + own, (s->dseg[s->comm->rank + 1] - own) * sizeof(float));
        }
        for (int gi = 0; gi < s->plan->ngroups; gi++) update_group(s, &s->plan->g[gi], lr, bc1, bc2);
        if (c->apply_owners) {
            gather_dirs(s);
            apply_dirs(s);
        }
        s->apply_s += now_sec() - ta;
    }
    be->params_changed(be, m->params, np);
    if (refresh && c->check_replicas) check_params(s);
}

// ---------------------------------------------------------------- state

// "<param>.block<j>" where j counts the blocks of the same parameter.
static void block_name(const Shampoo *s, int i, char *out, size_t n) {
    snprintf(out, n, "%s.block%d", s->model->tensors[s->blocks[i].param].name, param_block_index(s, i));
}

// Every block's factors from `own` (this rank's owned factors, host, fac_off layout) onto every rank, in global
// root order (root_off doubles as the factor slot).
static float *gather_factors(Shampoo *s, const float *own) {
    float *fac = xcalloc((s->root_floats ? s->root_floats : 1) * sizeof(float), "all factors");
    for (int i = 0; i < s->nblocks; i++) {
        const ShampooBlock *b = &s->blocks[i];
        if (!block_preconditioned(s, b)) continue;
        size_t len = 0;
        for (int k = 0; k < b->order; k++) len += (size_t)b->dim[k] * b->dim[k];
        if (b->owner == s->comm->rank) memcpy(fac + b->root_off[0], own + b->fac_off[0], len * sizeof(float));
        comm_bcast(s->comm, fac + b->root_off[0], len * sizeof(float), b->owner);
    }
    return fac;
}

int shampoo_save(Shampoo *s, const char *path) {
    Model *m = s->model;
    Backend *be = m->be;
    Comm *comm = s->comm;
    // A pending refresh that the next step would install is installed now, so that its roots are saved as active
    // (spec §3.5). One that is due later (root_delay d > 1) is saved as its factor snapshot and step: a resume
    // recomputes the same roots from the same bits (spec §3.4 item 3) and installs them at the same step.
    if (s->job && s->t + 1 >= s->job->t + s->cfg.root_delay) install_pending(s);
    int64_t pending_t = s->job ? s->job->t : 0;
    size_t np = m->num_params;
    float *mv = xmalloc(2 * np * sizeof(float), "Shampoo m and v");
    float *roots = xmalloc((s->root_floats ? s->root_floats : 1) * sizeof(float), "roots");
    float *own = xmalloc((s->factor_floats ? s->factor_floats : 1) * sizeof(float), "factors");
    be->download(be, mv, s->m, 2 * np * sizeof(float));
    be->download(be, roots, s->roots, s->root_floats * sizeof(float));
    be->download(be, own, s->factors, s->factor_floats * sizeof(float));
    // Gather every block's factors (and a pending refresh's snapshot) onto every rank in global root order
    // (root_off doubles as the factor slot).
    float *fac = gather_factors(s, own);
    float *snap = NULL;
    if (pending_t) {
        if (s->area) {
            be->download(be, own, s->job->dsrc, s->factor_floats * sizeof(float));  // read beside the side streams
            snap = gather_factors(s, own);
        } else {
            snap = gather_factors(s, s->job->factors);
        }
    }
    int rc = 0;
    if (comm->rank == 0) {
        int cap = 2 * m->ntensors + 8 * s->nblocks + 1, n = 0;
        StEntry *e = xcalloc((size_t)cap * sizeof(StEntry), "state entries");
        char (*names)[200] = xcalloc((size_t)cap * 200, "state names");
        int32_t *flags = xmalloc((size_t)(2 * s->nblocks + 1) * sizeof(int32_t), "block flags");
        for (int i = 0; i < m->ntensors; i++) {
            const TensorInfo *t = &m->tensors[i];
            if (!t->trainable) continue;
            for (int w = 0; w < 2; w++) {
                snprintf(names[n], 200, "%s.%s", t->name, w ? "graft_v" : "exp_avg");
                e[n] = (StEntry){names[n], "F32", t->ndim, {0}, mv + (size_t)w * np + t->offset};
                for (int d = 0; d < t->ndim; d++) e[n].shape[d] = t->shape[d];
                n++;
            }
        }
        for (int i = 0; i < s->nblocks; i++) {
            const ShampooBlock *b = &s->blocks[i];
            char base[160];
            block_name(s, i, base, sizeof base);
            flags[2 * i] = b->fails;
            flags[2 * i + 1] = b->has_roots;
            snprintf(names[n], 200, "%s.fails", base);
            e[n] = (StEntry){names[n], "I32", 1, {1}, &flags[2 * i]};
            n++;
            snprintf(names[n], 200, "%s.has_roots", base);
            e[n] = (StEntry){names[n], "I32", 1, {1}, &flags[2 * i + 1]};
            n++;
            if (!block_preconditioned(s, b)) continue;
            size_t off = b->root_off[0];
            for (int k = 0; k < b->order; k++) {
                snprintf(names[n], 200, "%s.factor%d", base, k);
                e[n] = (StEntry){names[n], "F32", 2, {b->dim[k], b->dim[k]}, fac + off};
                n++;
                snprintf(names[n], 200, "%s.root%d", base, k);
                e[n] = (StEntry){names[n], "F32", 2, {b->dim[k], b->dim[k]}, roots + off};
                n++;
                if (snap) {
                    snprintf(names[n], 200, "%s.pending_factor%d", base, k);
                    e[n] = (StEntry){names[n], "F32", 2, {b->dim[k], b->dim[k]}, snap + off};
                    n++;
                }
                off += (size_t)b->dim[k] * b->dim[k];
            }
        }
        char tbuf[32], pbuf[32];
        snprintf(tbuf, sizeof tbuf, "%lld", (long long)s->t);
        snprintf(pbuf, sizeof pbuf, "%lld", (long long)pending_t);
        const char *keys[] = {"format", "t", "pending_t"}, *vals[] = {"simplest-dist-shampoo-state-1", tbuf, pbuf};
        rc = st_write(path, e, n, keys, vals, pending_t ? 3 : 2);
        free(e);
        free(names);
        free(flags);
    }
    free(mv);
    free(roots);
    free(own);
    free(fac);
    free(snap);
    return rc;
}

// Copies tensor `name` of the file into dst (n floats or int32s) after checking its dtype and size.
// What a loaded tensor's values must be: a state that passes can be stepped from without NaN (spec §3.5).
enum { VAL_FINITE, VAL_NONNEG, VAL_FAILS, VAL_BOOL };
static const char *const val_rule[] = {"finite", "finite and >= 0", "0 .. 3", "0 or 1"};

static int value_ok(int rule, float v, int32_t k) {
    switch (rule) {
    case VAL_FINITE: return isfinite(v);
    case VAL_NONNEG: return isfinite(v) && v >= 0.0f;
    case VAL_FAILS: return k >= 0 && k <= 3;  // a fourth consecutive failure stops the run
    default: return k == 0 || k == 1;
    }
}

static int load_tensor(const StFile *f, const char *path, const char *name, const char *dtype, size_t n, void *dst,
                       int rule, char *err, size_t errlen) {
    const StTensor *t = st_find(f, name);
    if (!t) return set_err(err, errlen, "%s: Shampoo state lacks tensor '%s'", path, name);
    if (strcmp(t->dtype, dtype) != 0 || t->numel != n)
        return set_err(err, errlen, "%s: Shampoo state tensor '%s' is %s with %zu elements, expected %s with %zu",
                       path, name, t->dtype, t->numel, dtype, n);
    memcpy(dst, st_data(f, t), n * 4);
    const float *v = dst;
    const int32_t *k = dst;
    for (size_t i = 0; i < n; i++) {
        if (value_ok(rule, v[i], k[i])) continue;
        char val[40];
        if (rule >= VAL_FAILS)
            snprintf(val, sizeof val, "%d", k[i]);
        else
            snprintf(val, sizeof val, "%g", (double)v[i]);
        return set_err(err, errlen, "%s: Shampoo state tensor '%s' holds %s at element %zu (must be %s)", path, name,
                       val, i, val_rule[rule]);
    }
    return 0;
}

int shampoo_load(Shampoo *s, const char *path, char *err, size_t errlen) {
    Model *m = s->model;
    Backend *be = m->be;
    StFile f;
    if (st_open(path, &f, err, errlen) != 0) return -1;
    const char *fmt = st_meta(&f, "format"), *tstr = st_meta(&f, "t");
    if (!fmt || strcmp(fmt, "simplest-dist-shampoo-state-1") != 0 || !tstr) {
        st_close(&f);
        return set_err(err, errlen, "%s: not a Shampoo state file", path);
    }
    // A refresh still pending when the state was saved (root_delay d > 1): its factor snapshot and step.
    const char *pstr = st_meta(&f, "pending_t");
    int64_t t = parse_count(tstr), pending_t = pstr ? parse_count(pstr) : 0;
    if (t < 0) {
        set_err(err, errlen, "%s: Shampoo state has step t '%.40s', not a count of steps", path, tstr);
        st_close(&f);  // tstr points into the file's header
        return -1;
    }
    if (pstr && (pending_t < 1 || pending_t > t)) {
        set_err(err, errlen, "%s: Shampoo state has pending_t %.40s outside 1 .. t = %lld", path, pstr, (long long)t);
        st_close(&f);  // pstr points into the file's header
        return -1;
    }
    size_t np = m->num_params;
    float *mv = xmalloc(2 * np * sizeof(float), "Shampoo m and v");
    float *roots = xmalloc((s->root_floats ? s->root_floats : 1) * sizeof(float), "roots");
    float *own = xmalloc((s->factor_floats ? s->factor_floats : 1) * sizeof(float), "factors");
    float *snap = pending_t ? xmalloc((s->factor_floats ? s->factor_floats : 1) * sizeof(float), "snapshot") : NULL;
    float *tmp = xmalloc(((size_t)s->scratch_floats + 1) * sizeof(float), "factor");
    int32_t *flags = xmalloc((size_t)(2 * s->nblocks + 1) * sizeof(int32_t), "block flags");  // applied on success
    int rc = 0;
    for (int i = 0; i < m->ntensors && rc == 0; i++) {
        const TensorInfo *t = &m->tensors[i];
        if (!t->trainable) continue;
        char name[200];
        for (int w = 0; w < 2 && rc == 0; w++) {
            snprintf(name, sizeof name, "%s.%s", t->name, w ? "graft_v" : "exp_avg");
            rc = load_tensor(&f, path, name, "F32", t->numel, mv + (size_t)w * np + t->offset,
                             w ? VAL_NONNEG : VAL_FINITE, err, errlen);
        }
    }
    for (int i = 0; i < s->nblocks && rc == 0; i++) {
        const ShampooBlock *b = &s->blocks[i];
        char base[160], name[200];
        block_name(s, i, base, sizeof base);
        snprintf(name, sizeof name, "%s.fails", base);
        rc = load_tensor(&f, path, name, "I32", 1, &flags[2 * i], VAL_FAILS, err, errlen);
        snprintf(name, sizeof name, "%s.has_roots", base);
        if (rc == 0) rc = load_tensor(&f, path, name, "I32", 1, &flags[2 * i + 1], VAL_BOOL, err, errlen);
        if (!block_preconditioned(s, b)) continue;
        size_t off = b->root_off[0];
        for (int k = 0; k < b->order && rc == 0; k++) {
            size_t sq = (size_t)b->dim[k] * b->dim[k];
            snprintf(name, sizeof name, "%s.root%d", base, k);
            rc = load_tensor(&f, path, name, "F32", sq, roots + off, VAL_FINITE, err, errlen);
            snprintf(name, sizeof name, "%s.factor%d", base, k);
            if (rc == 0) rc = load_tensor(&f, path, name, "F32", sq, tmp, VAL_FINITE, err, errlen);
            if (rc == 0 && b->owner == s->comm->rank) memcpy(own + b->fac_off[k], tmp, sq * sizeof(float));
            if (rc == 0 && snap) {
                snprintf(name, sizeof name, "%s.pending_factor%d", base, k);
                rc = load_tensor(&f, path, name, "F32", sq, tmp, VAL_FINITE, err, errlen);
                if (rc == 0 && b->owner == s->comm->rank) memcpy(snap + b->fac_off[k], tmp, sq * sizeof(float));
            }
            off += sq;
        }
    }
    if (rc == 0) {
        be->upload(be, s->m, mv, 2 * np * sizeof(float));
        be->upload(be, s->roots, roots, s->root_floats * sizeof(float));
        be->upload(be, s->factors, own, s->factor_floats * sizeof(float));
        for (int i = 0; i < s->nblocks; i++) {
            s->blocks[i].fails = flags[2 * i];
            s->blocks[i].has_roots = flags[2 * i + 1];
        }
        s->t = t;
        if (s->job) {  // a refresh of the run before the load: its roots are not wanted
            pthread_join(s->thread, NULL);
            job_free(s->job);
            s->job = NULL;
        }
        if (snap) {  // the pending refresh again, from the same factor bits: installed at pending_t + root_delay
            RootJob *job = job_new(s, pending_t);
            if (s->area) {
                be->upload(be, snap_buffer(s), snap, s->factor_floats * sizeof(float));
                be->sync(be);
                job->dsrc = s->snap;
            } else {
                memcpy(job->factors, snap, s->factor_floats * sizeof(float));
            }
            s->refresh_t0 = now_sec();
            launch_refresh(s, job);
        }
    }
    free(mv);
    free(roots);
    free(own);
    free(snap);
    free(tmp);
    free(flags);
    st_close(&f);
    return rc;
}
