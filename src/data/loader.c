// loader.c: batch composition for in-memory datasets (spec/data.md §5). Every draw comes from a stream keyed by
// (seed, purpose, epoch or step, dataset index or group), never by rank, thread or time.
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "data/augment.h"
#include "data/dataset.h"
#include "rng.h"
#include "util.h"

void loader_permutation(uint64_t seed, int64_t epoch, int64_t n, int64_t *perm) {
    for (int64_t i = 0; i < n; i++) perm[i] = i;
    Rng r = rng_stream(seed, RNG_SHUFFLE, (uint64_t)epoch, 0);
    for (int64_t i = n - 1; i > 0; i--) {
        int64_t j = (int64_t)rng_below(&r, (uint64_t)i + 1);
        int64_t t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
}

void loader_image_u8(const Dataset *ds, int64_t idx, const AugmentConfig *aug, uint64_t seed, int64_t epoch,
                     uint8_t *out) {
    int H = ds->height, W = ds->width, C = ds->channels;
    int oy = 0, ox = 0, flip = 0, pad = 0;
    if (aug && aug->augment) {
        Rng r = rng_stream(seed, RNG_AUG, (uint64_t)epoch, (uint64_t)idx);
        pad = aug->crop_padding;
        if (pad > 0) {  // torchvision RandomCrop: i then j, uniform over the padded image
            oy = (int)rng_below(&r, (uint64_t)(2 * pad + 1)) - pad;
            ox = (int)rng_below(&r, (uint64_t)(2 * pad + 1)) - pad;
        }
        if (aug->flip) flip = rng_uniform(&r) < 0.5;
    }
    const uint8_t *src = ds->pixels + (size_t)idx * H * W * C;
    for (int y = 0; y < H; y++)
        for (int x = 0; x < W; x++) {
            int sy = y + oy, sx = (flip ? W - 1 - x : x) + ox;
            int in = sy >= 0 && sy < H && sx >= 0 && sx < W;
            for (int c = 0; c < C; c++) out[((size_t)y * W + x) * C + c] = in ? src[((size_t)sy * W + sx) * C + c] : 0;
        }
}

void loader_image(const Dataset *ds, int64_t idx, const AugmentConfig *aug, uint64_t seed, int64_t epoch,
                  float *out) {
    size_t n = (size_t)ds->height * ds->width * ds->channels;
    uint8_t small[4096];  // MNIST 784 and CIFAR 3072 bytes: no allocation per image
    uint8_t *px = n <= sizeof small ? small : xmalloc(n, "image pixels");
    loader_image_u8(ds, idx, aug, seed, epoch, px);
    normalize_u8_hwc(px, ds->channels, ds->height, ds->width, ds->mean, ds->std, out);  // ToTensor, then Normalize
    if (px != small) free(px);
}

void loader_train_batch(const Dataset *ds, const int64_t *perm, int64_t epoch, int64_t pos0, int count,
                        const AugmentConfig *aug, uint64_t seed, float *images, float *targets, int32_t *labels) {
    size_t img = (size_t)ds->channels * ds->height * ds->width;
    int K = ds->num_classes;
    memset(targets, 0, (size_t)count * K * sizeof(float));
#pragma omp parallel for schedule(static)
    for (int i = 0; i < count; i++) {
        int64_t idx = perm[pos0 + i];
        loader_image(ds, idx, aug, seed, epoch, images + (size_t)i * img);
        targets[(size_t)i * K + ds->labels[idx]] = 1.0f;
        if (labels) labels[i] = ds->labels[idx];
    }
}

void loader_eval_shard(int64_t n, int rank, int world, int64_t *begin, int64_t *end) {
    *begin = (int64_t)((__int128)n * rank / world);
    *end = (int64_t)((__int128)n * (rank + 1) / world);
}

double mixup_apply(float *images, float *targets, int count, size_t img_elems, int classes, int g, double alpha,
                   uint64_t seed, uint64_t step, uint64_t group0) {
    CHECK(g > 0 && count % g == 0, "mixup group %d does not divide %d", g, count);
    float *img_copy = xmalloc((size_t)g * img_elems * sizeof(float), "mixup images");
    float *tgt_copy = xmalloc((size_t)g * classes * sizeof(float), "mixup targets");
    int *perm = xmalloc((size_t)g * sizeof(int), "mixup permutation");
    double lam_sum = 0.0;
    for (int k = 0; k < count / g; k++) {
        Rng r = rng_stream(seed, RNG_MIXUP, step, group0 + (uint64_t)k);
        double z = rng_beta_sym(&r, alpha);
        float lam = (float)(z < 1.0 - z ? z : 1.0 - z);  // the original image stays dominant
        for (int i = 0; i < g; i++) perm[i] = i;
        for (int i = g - 1; i > 0; i--) {
            int j = (int)rng_below(&r, (uint64_t)i + 1);
            int t = perm[i];
            perm[i] = perm[j];
            perm[j] = t;
        }
        float *im = images + (size_t)k * g * img_elems, *tg = targets + (size_t)k * g * classes;
        memcpy(img_copy, im, (size_t)g * img_elems * sizeof(float));
        memcpy(tgt_copy, tg, (size_t)g * classes * sizeof(float));
        for (int i = 0; i < g; i++) {
            const float *oi = img_copy + (size_t)perm[i] * img_elems, *ot = tgt_copy + (size_t)perm[i] * classes;
            for (size_t e = 0; e < img_elems; e++)
                im[i * img_elems + e] = (1.0f - lam) * img_copy[i * img_elems + e] + lam * oi[e];
            for (int c = 0; c < classes; c++)
                tg[(size_t)i * classes + c] = (1.0f - lam) * tgt_copy[(size_t)i * classes + c] + lam * ot[c];
        }
        lam_sum += lam;
    }
    free(img_copy);
    free(tgt_copy);
    free(perm);
    return lam_sum / (count / g);
}

// ---------------------------------------------------------------- the threaded loader

#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <unistd.h>

#include "data/pipeline.h"

typedef struct {
    int64_t q;      // plan position held (-1: none)
    int64_t epoch;  // the AUG key's epoch (eval: 0)
    int count;      // images in this batch
    int next;       // first image not yet claimed by a thread
    int done;       // images finished (with or without success)
    int inflight;   // threads working on this slot now
    int failed;     // a slot ran out of substitutes (err says which)
    char err[600];
    int64_t *idx;   // (micro) key indices
    void *images;   // (micro, C, H, W) fp32 or (micro, H, W, C) uint8 (cfg.u8), from the caller's allocator
    int32_t *labels;  // (micro)
} Slot;

struct Loader {
    LoaderConfig c;
    int nslots;
    Slot *slots;
    int64_t base;      // slots hold q in [base, base + nslots), q at slots[q % nslots]
    int64_t plan_len;  // micro-batches in the plan (training: unbounded)
    pthread_mutex_t mu;
    pthread_cond_t work_cv, done_cv;
    pthread_t *threads;
    int nthreads, stop, chunk;
    int64_t *perm, perm_epoch;
    size_t img_elems, img_bytes;  // per image; bytes: 4 per element, 1 with cfg.u8
    PipeFailures fails;
    double wait_s;
    int keep;          // batches before the requested one kept (LoaderConfig.keep, at least 1)
    int64_t rebuilds;
};

static void *loader_malloc(void *ctx, size_t bytes, const char *what) { return xmalloc(bytes, what); }
static void loader_mfree(void *ctx, void *p) { free(p); }

static int affinity_cpus(void) {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) return CPU_COUNT(&set);
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

// data.threads 0: the cores this rank may run on, less 2 (its main thread, the copies), at least 1. Ranks on one
// node share its cores: when their affinity sets together hold more CPUs than the node has (unbound ranks, or
// mpirun's binding to a socket beyond 2 ranks), each takes the node's CPUs / ranks, not its whole affinity set.
static int default_workers(int local_world) {
    int a = affinity_cpus();
    long o = sysconf(_SC_NPROCESSORS_ONLN);
    int share = a;
    if (local_world > 1 && o > 0 && (long)a * local_world > o && o / local_world < a) share = (int)(o / local_world);
    return share - 2 > 0 ? share - 2 : 1;
}

// Fills slot metadata for plan position q (called with no thread working on the slot).
static void slot_assign(Loader *l, int64_t q) {
    Slot *s = &l->slots[q % l->nslots];
    s->q = q;
    s->next = s->done = s->failed = 0;
    s->err[0] = 0;
    if (q >= l->plan_len) {
        s->count = 0;
        return;
    }
    const LoaderConfig *c = &l->c;
    if (c->train) {
        int64_t k = q / c->accum + 1, mi = q % c->accum;
        int64_t e = (k - 1) / c->steps_per_epoch, st = (k - 1) % c->steps_per_epoch;
        if (e != l->perm_epoch) {
            loader_permutation(c->seed, e, c->ds->n, l->perm);
            l->perm_epoch = e;
        }
        int64_t pos0 = st * c->global_batch + (int64_t)c->rank * (c->global_batch / c->world) + mi * c->micro;
        s->epoch = e;
        s->count = c->micro;
        for (int j = 0; j < c->micro; j++) s->idx[j] = l->perm[pos0 + j];
    } else {
        int64_t i0 = c->begin + q * c->micro;
        s->epoch = 0;
        s->count = (int)(c->end - i0 < c->micro ? c->end - i0 : c->micro);
        for (int j = 0; j < s->count; j++) s->idx[j] = i0 + j;
    }
}

// Stops new claims on a slot and waits for its threads (mu held).
static void slot_quiesce(Loader *l, Slot *s) {
    s->next = s->count;
    while (s->inflight > 0) pthread_cond_wait(&l->done_cv, &l->mu);
}

static void *loader_thread(void *arg) {
    Loader *l = arg;
    const LoaderConfig *c = &l->c;
    PipeWorker *w = pipe_worker_create(c->ds);
    pipe_worker_set_u8(w, c->u8);
    pthread_mutex_lock(&l->mu);
    while (!l->stop) {
        Slot *s = NULL;
        for (int64_t q = l->base; q < l->base + l->nslots; q++) {
            Slot *t = &l->slots[q % l->nslots];
            if (t->q == q && t->next < t->count) {
                s = t;
                break;
            }
        }
        if (!s) {
            pthread_cond_wait(&l->work_cv, &l->mu);
            continue;
        }
        int j0 = s->next, j1 = j0 + l->chunk < s->count ? j0 + l->chunk : s->count;
        s->next = j1;
        s->inflight++;
        int64_t epoch = s->epoch;
        pthread_mutex_unlock(&l->mu);
        char err[600] = "";
        int bad = 0;
        for (int j = j0; j < j1; j++)
            if (pipe_sample(w, c->ds, c->train, c->seed, epoch, s->idx[j], (char *)s->images + (size_t)j * l->img_bytes,
                            &s->labels[j], &l->fails, err, sizeof err) != 0)
                bad = 1;
        pthread_mutex_lock(&l->mu);
        if (bad && !s->failed) {
            s->failed = 1;
            snprintf(s->err, sizeof s->err, "%s", err);
        }
        s->done += j1 - j0;
        s->inflight--;
        pthread_cond_broadcast(&l->done_cv);
    }
    pthread_mutex_unlock(&l->mu);
    pipe_worker_free(w);
    return NULL;
}

Loader *loader_create(const LoaderConfig *cfg) {
    Loader *l = xcalloc(sizeof *l, "loader");
    l->c = *cfg;
    LoaderConfig *c = &l->c;
    if (!c->alloc) {
        c->alloc = loader_malloc;
        c->free = loader_mfree;
    }
    const Dataset *ds = c->ds;
    CHECK(c->micro > 0, "loader: micro-batch %d", c->micro);
    if (c->train) {
        CHECK(c->world > 0 && c->accum > 0 && c->global_batch == c->micro * c->world * c->accum,
              "loader: batch %d != %d x %d x %d", c->global_batch, c->micro, c->world, c->accum);
        CHECK(c->steps_per_epoch > 0 && c->steps_per_epoch * c->global_batch <= ds->n, "loader: steps per epoch");
        l->plan_len = INT64_MAX;
        l->perm = xmalloc((size_t)ds->n * sizeof(int64_t), "permutation");  // (n)
    } else {
        l->plan_len = (c->end - c->begin + c->micro - 1) / c->micro;
    }
    l->perm_epoch = -1;
    l->img_elems = (size_t)ds->channels * ds->height * ds->width;
    l->img_bytes = l->img_elems * (c->u8 ? 1 : sizeof(float));
    int prefetch = c->prefetch > 0 ? c->prefetch : 3;
    l->keep = c->keep > 1 ? c->keep : 1;
    // the batch requested, `keep` before it (the caller may still be copying one out; or revisit a step's
    // micro-batches), and `prefetch` ahead
    l->nslots = prefetch + 1 + l->keep;
    l->slots = xcalloc((size_t)l->nslots * sizeof(Slot), "loader slots");
    for (int i = 0; i < l->nslots; i++) {
        Slot *s = &l->slots[i];
        s->q = -1;
        s->idx = xmalloc((size_t)c->micro * sizeof(int64_t), "slot indices");
        s->labels = xmalloc((size_t)c->micro * sizeof(int32_t), "slot labels");
        s->images = c->alloc(c->alloc_ctx, (size_t)c->micro * l->img_bytes, "loader batch buffer");
    }
    l->nthreads = c->workers > 0 ? c->workers : default_workers(c->local_world);
    l->chunk = ds->paths ? 1 : (c->micro / (4 * l->nthreads) > 32 ? 32 : c->micro / (4 * l->nthreads));
    if (l->chunk < 1) l->chunk = 1;
    pipe_failures_init(&l->fails, ds->n);
    l->fails.quiet = c->quiet;
    pthread_mutex_init(&l->mu, NULL);
    pthread_cond_init(&l->work_cv, NULL);
    pthread_cond_init(&l->done_cv, NULL);
    l->base = 0;
    for (int64_t q = 0; q < l->nslots; q++) slot_assign(l, q);
    l->threads = xmalloc((size_t)l->nthreads * sizeof(pthread_t), "loader threads");
    for (int i = 0; i < l->nthreads; i++)
        CHECK(pthread_create(&l->threads[i], NULL, loader_thread, l) == 0, "cannot start a loader thread");
    return l;
}

void loader_destroy(Loader *l) {
    if (!l) return;
    pthread_mutex_lock(&l->mu);
    l->stop = 1;
    pthread_cond_broadcast(&l->work_cv);
    pthread_mutex_unlock(&l->mu);
    for (int i = 0; i < l->nthreads; i++) pthread_join(l->threads[i], NULL);
    for (int i = 0; i < l->nslots; i++) {
        free(l->slots[i].idx);
        free(l->slots[i].labels);
        l->c.free(l->c.alloc_ctx, l->slots[i].images);
    }
    free(l->slots);
    free(l->threads);
    free(l->perm);
    pipe_failures_free(&l->fails);
    pthread_mutex_destroy(&l->mu);
    pthread_cond_destroy(&l->work_cv);
    pthread_cond_destroy(&l->done_cv);
    free(l);
}

static int get_slot(Loader *l, int64_t q, const void **images, const int32_t **labels);

int loader_get(Loader *l, int64_t q, const float **images, const int32_t **labels) {
    CHECK(!l->c.u8, "loader_get on a uint8 loader (loader_get_u8)");
    const void *p;
    int n = get_slot(l, q, &p, labels);
    *images = p;
    return n;
}

int loader_get_u8(Loader *l, int64_t q, const uint8_t **images, const int32_t **labels) {
    CHECK(l->c.u8, "loader_get_u8 on an fp32 loader (loader_get)");
    const void *p;
    int n = get_slot(l, q, &p, labels);
    *images = p;
    return n;
}

static int get_slot(Loader *l, int64_t q, const void **images, const int32_t **labels) {
    double t0 = now_sec();
    pthread_mutex_lock(&l->mu);
    if (q < l->base || q >= l->base + l->nslots) {  // a jump (resume, a repeated step): rebuild the ring at q
        for (int i = 0; i < l->nslots; i++) slot_quiesce(l, &l->slots[i]);
        l->base = q;
        for (int64_t p = q; p < q + l->nslots; p++) slot_assign(l, p);
        l->rebuilds++;
    } else if (q - l->keep > l->base) {
        // Release the batches before q - keep (the caller may still be copying q - 1 out, or come back to the
        // step's first micro-batch); their slots run ahead.
        for (int64_t p = l->base; p < q - l->keep; p++) {
            slot_quiesce(l, &l->slots[p % l->nslots]);
            slot_assign(l, p + l->nslots);
        }
        l->base = q - l->keep;
    }
    pthread_cond_broadcast(&l->work_cv);
    Slot *s = &l->slots[q % l->nslots];
    while (s->done < s->count) pthread_cond_wait(&l->done_cv, &l->mu);
    int count = s->count;
    if (s->failed) {
        fprintf(stderr, "simplest-dist: error: %s\n", s->err);
        count = -1;
    }
    pthread_mutex_unlock(&l->mu);
    *images = s->images;
    *labels = s->labels;
    l->wait_s += now_sec() - t0;
    return count;
}

int64_t loader_eval_batches(const Loader *l) { return l->c.train ? -1 : l->plan_len; }
double loader_wait_s(const Loader *l) { return l->wait_s; }
const PipeFailures *loader_failures(const Loader *l) { return &l->fails; }
int loader_threads(const Loader *l) { return l->nthreads; }
int64_t loader_rebuilds(const Loader *l) { return l->rebuilds; }

LoaderState loader_state_at(const Loader *l, int64_t k) {
    const LoaderConfig *c = &l->c;
    LoaderState s = {(k - 1) / c->steps_per_epoch, (k - 1) % c->steps_per_epoch, c->seed, c->global_batch,
                     c->ds->fingerprint, pipe_failures_total(&l->fails)};
    return s;
}

int64_t loader_state_resume(const Loader *l, const LoaderState *s, char *err, size_t n) {
    const LoaderConfig *c = &l->c;
    if (s->seed != c->seed) return set_err(err, n, "loader state: seed %llu, this run has %llu",
                                           (unsigned long long)s->seed, (unsigned long long)c->seed);
    if (s->global_batch != c->global_batch)
        return set_err(err, n, "loader state: train.batch_size %lld, this run has %d", (long long)s->global_batch,
                       c->global_batch);
    if (s->fingerprint != c->ds->fingerprint)
        return set_err(err, n, "loader state: the dataset changed (fingerprint %016llx, now %016llx)",
                       (unsigned long long)s->fingerprint, (unsigned long long)c->ds->fingerprint);
    if (s->step_in_epoch < 0 || s->step_in_epoch >= c->steps_per_epoch || s->epoch < 0)
        return set_err(err, n, "loader state: step %lld of epoch %lld is outside the %lld steps per epoch",
                       (long long)s->step_in_epoch, (long long)s->epoch, (long long)c->steps_per_epoch);
    // the step count below must fit in int64 (a corrupt epoch would overflow it: undefined behaviour)
    if (s->epoch > (INT64_MAX - c->steps_per_epoch) / c->steps_per_epoch)
        return set_err(err, n, "loader state: epoch %lld is outside any run (%lld steps per epoch)",
                       (long long)s->epoch, (long long)c->steps_per_epoch);
    return s->epoch * c->steps_per_epoch + s->step_in_epoch + 1;
}

int loader_state_write(const char *path, const LoaderState *s) {
    char text[512];
    int len = snprintf(text, sizeof text,
                       "{\"epoch\": %lld, \"step_in_epoch\": %lld, \"seed\": %llu, \"global_batch\": %lld, "
                       "\"fingerprint\": \"%016llx\", \"failures\": %lld}\n",
                       (long long)s->epoch, (long long)s->step_in_epoch, (unsigned long long)s->seed,
                       (long long)s->global_batch, (unsigned long long)s->fingerprint, (long long)s->failures);
    return write_file_atomic(path, text, (size_t)len);
}

int loader_state_read(const char *path, LoaderState *s, char *err, size_t n) {
    size_t len;
    char *text = (char *)read_file_all(path, &len);
    if (!text) return set_err(err, n, "loader state '%s': cannot read", path);
    long long e, st, b, f;
    unsigned long long seed, fp;
    int got = sscanf(text,
                     " {\"epoch\": %lld, \"step_in_epoch\": %lld, \"seed\": %llu, \"global_batch\": %lld, "
                     "\"fingerprint\": \"%llx\", \"failures\": %lld}",
                     &e, &st, &seed, &b, &fp, &f);
    free(text);
    if (got != 6) return set_err(err, n, "loader state '%s': not a loader state file", path);
    *s = (LoaderState){e, st, seed, b, fp, f};
    return 0;
}
