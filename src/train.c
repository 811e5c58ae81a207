// train.c: see train.h.
#include "train.h"

#include <errno.h>
#include <math.h>
#include <omp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cJSON.h>

#include "checkpoint.h"
#include "data/pipeline.h"
#include "safetensors.h"
#include "status.h"
#include "util.h"

// The one process-wide global: set by SIGINT/SIGTERM/SIGUSR1, read by the loop between steps.
static volatile sig_atomic_t g_stop_signal = 0;

static void on_signal(int sig) { g_stop_signal = sig; }

void train_catch_stop_signals(void) {
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
    signal(SIGUSR1, on_signal);
}

Backend *backend_for_config(const Config *cfg, Comm *comm, int training) {
    const char *dev = cfg->run.device;
#ifdef USE_CUDA
    int gpu = !strcmp(dev, "cuda");
    if (!strcmp(dev, "auto")) {
        gpu = backend_cuda_available();
        if (comm->world > 1) {  // one choice for all: a CPU rank and a GPU rank would meet in different collectives
            double n = gpu;
            comm_allreduce_sum_f64(comm, &n, 1);
            if (n > 0 && n < comm->world)
                die_user("config key 'run.device': \"auto\" finds a usable GPU on %.0f of %d ranks; set \"cuda\" "
                         "or \"cpu\"", n, comm->world);
        }
    }
    if (gpu) {
        // Several GPU ranks sum their gradients over NCCL; the fixed-order sum of comm.deterministic exists only
        // for host buffers (MPI) so far.
        if (training && comm->world > 1 && cfg->comm.deterministic)
            die_user("config key 'comm.deterministic': not available with run.device \"cuda\" and %d ranks yet "
                     "(the fixed-order sum runs on host buffers); set it false or use \"cpu\"", comm->world);
        Backend *be = backend_cuda_create(comm->local_rank);
        const char *env_attn = getenv("SD_ATTN");  // its values (backend_cuda_create) override run.attention
        if (!env_attn || (strcmp(env_attn, "flash") && strcmp(env_attn, "unfused")))
            backend_cuda_set_attention(be, strcmp(cfg->run.attention, "unfused") != 0);
        if (training && (comm->world > 1 || comm_nccl_forced())) {  // eval sums host buffers only (MPI)
            if (!comm_gpu_init(comm, be->native_stream(be)))
                die_user("config key 'run.device': \"cuda\" with %d ranks%s needs NCCL, and this build has none "
                         "(a CUDA toolkit with nccl.h, or USE_NCCL=1 with pip's nvidia-nccl paths; several ranks also "
                         "need MPI)",
                         comm->world, comm->world == 1 ? " and SD_NCCL_FORCE=1" : "");
            if (comm->rank == 0)
                printf("warning: the NCCL gradient all-reduce has compiled but has not yet run on GPUs in this "
                       "project's checks (docs/gpu-validation.md)\n");
        }
        return be;
    }
    if (!strcmp(dev, "auto") && comm->rank == 0) printf("run.device auto: no usable GPU found, using the CPU\n");
#else
    if (!strcmp(dev, "cuda")) die_user("config key 'run.device': \"cuda\" but this build has no CUDA backend");
    if (!strcmp(dev, "auto") && comm->rank == 0)
        printf("run.device auto: no CUDA backend in this build, using the CPU\n");
#endif
    // Ranks on one node share its cores: more threads than cores makes OpenMP barriers spin against each other.
    // omp_get_num_procs() honours the affinity mask: divide only when every rank sees the whole node (unbound).
    int threads = cfg->run.threads;
    if (threads <= 0) {
        threads = omp_get_num_procs();
        if (threads == (int)sysconf(_SC_NPROCESSORS_ONLN)) threads /= comm->local_world;
        threads = threads > 0 ? threads : 1;
    }
    return backend_cpu_create(threads);
}

// ---------------------------------------------------------------- one step

void trainer_init(Trainer *t, const Config *cfg, Comm *comm, Model *model, int64_t total_steps) {
    memset(t, 0, sizeof *t);
    t->cfg = cfg;
    t->comm = comm;
    t->model = model;
    t->be = model->be;
    t->global_batch = cfg->train.batch_size;
    if (cfg->comm.deterministic) {
        if (cfg->comm.shards % comm->world != 0)
            die_user("config key 'comm.shards': %d is not divisible by the %d ranks", cfg->comm.shards, comm->world);
        t->accum = cfg->comm.shards / comm->world;
        t->shard_grads = xcalloc((size_t)t->accum * sizeof(float *), "shard gradients");
        for (int i = 0; i < t->accum; i++)
            t->shard_grads[i] = model->be->alloc(model->be, model->num_params * sizeof(float), "shard gradients");
    } else {
        t->accum = cfg->train.grad_accum;
        if (t->global_batch % (comm->world * t->accum) != 0)
            die_user("config key 'train.batch_size': %d is not divisible by ranks (%d) x train.grad_accum (%d)",
                     t->global_batch, comm->world, t->accum);
        // (SD_NCCL_FORCE=1 with one rank: the bucketed NCCL path runs too, on a one-rank communicator)
        t->overlap = cfg->comm.overlap && (comm->world > 1 || (comm_nccl_forced() && !strcmp(model->be->name, "cuda")));
    }
    t->micro = config_micro_batch(cfg, comm->world);
    t->seed = (uint64_t)cfg->train.seed;
    t->total_steps = total_steps;
    AdamConfig ac = {.lr0 = cfg->opt.lr,
                     .weight_decay = cfg->opt.weight_decay,
                     .beta1 = cfg->opt.beta1,
                     .beta2 = cfg->opt.beta2,
                     .eps = cfg->opt.eps,
                     .decoupled = !strcmp(cfg->opt.weight_decay_mode, "decoupled")};
    if (!strcmp(cfg->opt.name, "shampoo")) {
        ShampooConfig sc = {.lr0 = cfg->opt.lr,
                            .weight_decay = cfg->opt.weight_decay,
                            .decoupled = ac.decoupled,
                            .beta1 = cfg->shampoo.betas[0],
                            .beta2 = cfg->shampoo.betas[1],
                            .eps = cfg->shampoo.eps,
                            .frequency = cfg->shampoo.precondition_frequency,
                            .start_step = cfg->shampoo.start_preconditioning_step,
                            .max_dim = cfg->shampoo.max_preconditioner_dim,
                            .graft_beta2 = cfg->shampoo.graft_beta2,
                            .graft_eps = cfg->shampoo.graft_eps,
                            .root_fp64 = strcmp(cfg->shampoo.root_dtype, "fp32") != 0,
                            .one_d_adam = !strcmp(cfg->shampoo.one_d, "adam"),
                            .root_delay = cfg->shampoo.root_delay,
                            .root_threads = cfg->shampoo.root_threads,
                            .apply_owners = !strcmp(cfg->shampoo.apply, "owners"),
                            .check_replicas = cfg->shampoo.check_replicas};
        char err[512];
        if (shampoo_config_check(&sc, err, sizeof err) != 0) die_user("%s", err);
        t->shampoo = xcalloc(sizeof(Shampoo), "shampoo");
        shampoo_create(t->shampoo, model, comm, &sc, NULL);
    } else {
        adam_create(&t->adam, model, &ac);
    }
    size_t pbytes = model->num_params * sizeof(float);
    if (cfg->train.ema) {
        t->ema = t->be->alloc(t->be, pbytes, "EMA weights");
        t->be->copy(t->be, t->ema, model->params, pbytes);
    }
    if (cfg->train.sam) t->sam_e = t->be->alloc(t->be, pbytes, "SAM perturbation");
    const ModelConfig *mc = &model->cfg;
    size_t img = (size_t)mc->channels * mc->image_size * mc->image_size;
    // The host image buffers are allocated at their first use (load_slot), unless trainer_no_host_images said the
    // source never writes them (the loader's own batches, with no Mixup): pinned, they cost 2 x 600 KB per image
    // slot at 224 px, 1.2 GB at 1024 images per rank.
    for (int s = 0; s < 2; s++)
        t->h_targets[s] = t->be->alloc_host(t->be, (size_t)t->micro * mc->num_classes * sizeof(float), "host targets");
    t->d_input[0] = model->input;
    t->d_targets[0] = model->targets;
    // model-sized (max_batch): eval batches go through whichever slot m->input points to
    t->d_input[1] = t->be->alloc(t->be, (size_t)model->max_batch * img * sizeof(float), "second input batch");
    t->d_targets[1] = t->be->alloc(t->be, (size_t)model->max_batch * mc->num_classes * sizeof(float), "second targets");
    t->be->sync(t->be);  // the buffers' zeroing (compute stream) before the first upload into them (copy stream)
}

void trainer_free(Trainer *t) {
    Backend *be = t->be;
    if (t->shampoo) {
        shampoo_free(t->shampoo);
        free(t->shampoo);
    } else {
        adam_free(&t->adam, t->model);
    }
    for (int i = 0; t->shard_grads && i < t->accum; i++) be->free(be, t->shard_grads[i]);
    free(t->shard_grads);
    if (t->ema) be->free(be, t->ema);
    if (t->sam_e) be->free(be, t->sam_e);
    be->sync(be);
    for (int s = 0; s < 2; s++) {
        be->input_host_free(be, s);
        be->free_host(be, t->h_images[s]);
        be->free_host(be, t->h_targets[s]);
    }
    be->free(be, t->d_input[1]);
    be->free(be, t->d_targets[1]);
    for (int s = 0; s < 2; s++)
        if (t->d_u8[s]) be->free(be, t->d_u8[s]);
    t->model->input = t->d_input[0];
    t->model->targets = t->d_targets[0];
}

void trainer_set_u8_input(Trainer *t, const float *mean, const float *std) {
    const ModelConfig *mc = &t->model->cfg;
    size_t img = (size_t)mc->channels * mc->image_size * mc->image_size;
    for (int s = 0; s < 2; s++)
        if (!t->d_u8[s]) t->d_u8[s] = t->be->alloc(t->be, (size_t)t->model->max_batch * img, "uint8 input batch");
    for (int c = 0; c < mc->channels && c < 3; c++) {
        t->u8_mean[c] = mean[c];
        t->u8_std[c] = std[c];
    }
    t->u8_input = 1;
    t->be->sync(t->be);  // the buffers' zeroing (compute stream) before any upload on the copy stream
}

// Position of this rank's micro-batch within the step's global slice (keys dropout and mixup groups).
static uint64_t slice_pos(const Trainer *t, int micro) {
    return (uint64_t)t->comm->rank * (t->global_batch / t->comm->world) + (uint64_t)micro * t->micro;
}

// Starts the all-reduce of a range of gradients that the backward pass has just finished.
static void start_bucket(void *ctx, size_t offset, size_t count) {
    Trainer *t = ctx;
    comm_allreduce_start_f32(t->comm, t->model->grads + offset, count);
    comm_progress(t->comm);
}

// Sources micro-batch (k, mi) into input slot s and starts its upload (the copy stream on a GPU).
static void load_slot(Trainer *t, int s, int64_t k, int mi, BatchSource src, void *ctx) {
    Backend *be = t->be;
    const ModelConfig *mc = &t->model->cfg;
    size_t img = (size_t)mc->channels * mc->image_size * mc->image_size;
    // Every earlier copy has read its host buffer: this slot's own, and the other slot's, whose source buffer the
    // call below may hand back to the loader (a ring slot is released two calls later, or at once on a jump back).
    // In steady state both copies finished long ago, so this costs no overlap.
    be->input_host_free(be, s);
    be->input_host_free(be, s ^ 1);
    if (!t->h_images[s] && !t->no_host_images)
        t->h_images[s] = be->alloc_host(be, (size_t)t->micro * img * sizeof(float), "host image batch");
    const void *images = src(ctx, t, k, mi, t->h_images[s], t->h_targets[s]);
    CHECK(images, "the batch source returned no images");
    if (t->u8_input)
        be->upload_async(be, t->d_u8[s], images, (size_t)t->micro * img, s);
    else
        be->upload_async(be, t->d_input[s], images, (size_t)t->micro * img * sizeof(float), s);
    be->upload_async(be, t->d_targets[s], t->h_targets[s], (size_t)t->micro * mc->num_classes * sizeof(float), s);
}

// Forward + backward of micro-batch mi; adds its per-sample losses to *loss_sum. The batch comes from the slot
// prefetched during the previous micro-batch when it is the one wanted (else it is sourced now: a stall), and the
// next micro-batch (this step's next, or the next step's first) is prefetched into the other slot while this one
// computes. A prefetched batch that is never used (a repeated step, the last step) costs nothing but the work.
static void micro_step(Trainer *t, int64_t k, int mi, BatchSource src, void *ctx, int hooked, double *loss_sum) {
    Model *m = t->model;
    Backend *be = t->be;
    int s;
    if (t->pf_valid && t->pf_k == k && t->pf_mi == mi) {
        s = t->pf_slot;
        t->pf_valid = 0;
    } else {
        s = t->pf_valid ? t->pf_slot ^ 1 : t->next_slot;  // never the slot that holds a prefetched batch
        double t0 = now_sec();
        load_slot(t, s, k, mi, src, ctx);
        t->stall_s += now_sec() - t0;
    }
    be->input_wait(be, s);
    if (t->u8_input)
        be->images_from_u8(be, t->d_input[s], t->d_u8[s], t->micro, m->cfg.channels, m->cfg.image_size,
                           m->cfg.image_size, t->u8_mean, t->u8_std);
    m->input = t->d_input[s];
    m->targets = t->d_targets[s];
    model_forward(m, t->micro, 1, t->seed, (uint64_t)k, slice_pos(t, mi));
    t->next_slot = s ^ 1;
    int64_t nk = mi + 1 < t->accum ? k : k + 1;
    int nmi = mi + 1 < t->accum ? mi + 1 : 0;
    if (nk <= t->total_steps && !(t->pf_valid && t->pf_k == nk && t->pf_mi == nmi)) {
        load_slot(t, s ^ 1, nk, nmi, src, ctx);
        t->pf_valid = 1;
        t->pf_k = nk;
        t->pf_mi = nmi;
        t->pf_slot = s ^ 1;
    }
    model_loss(m, t->micro, (float)t->cfg->train.label_smoothing, 1.0f / (float)t->global_batch, 1);
    // The forward's read of the images and the loss's read of the targets are enqueued: the slot may be refilled
    // after them (not only after the forward: the loss reads the targets of the same slot).
    be->input_consumed(be, s);
    model_backward_hooked(m, t->micro, t->seed, (uint64_t)k, slice_pos(t, mi), hooked ? start_bucket : NULL, t);
    float *losses = xmalloc((size_t)t->micro * sizeof(float), "losses");  // (micro)
    be->download(be, losses, m->losses, (size_t)t->micro * sizeof(float));
    for (int i = 0; i < t->micro; i++) *loss_sum += losses[i];
    free(losses);
}

// Forward + backward over the step's micro-batches; grads end summed over ranks. Returns the loss sum.
static double accumulate_grads(Trainer *t, int64_t k, BatchSource src, void *ctx) {
    Model *m = t->model;
    Backend *be = t->be;
    double loss_sum = 0.0;
    if (t->shard_grads) {  // deterministic: each shard into its own buffer, then the fixed-order chain sum
        float *grads = m->grads;
        for (int mi = 0; mi < t->accum; mi++) {
            m->grads = t->shard_grads[mi];
            model_zero_grad(m);
            micro_step(t, k, mi, src, ctx, 0, &loss_sum);
        }
        m->grads = grads;
        double t0 = now_sec();
        if (t->comm->world == 1) {  // the same chain in backend memory (a CUDA backend's buffers are on the device)
            be->copy(be, m->grads, t->shard_grads[0], m->num_params * sizeof(float));
            for (int mi = 1; mi < t->accum; mi++) be->axpy(be, m->grads, t->shard_grads[mi], m->num_params, 1.0f);
        } else {
            be->sync(be);
            comm_ordered_sum_f32(t->comm, t->shard_grads, t->accum, m->grads, m->num_params);
        }
        t->reduce_wait_s += now_sec() - t0;
        return loss_sum;
    }
    model_zero_grad(m);
    for (int mi = 0; mi < t->accum; mi++) micro_step(t, k, mi, src, ctx, t->overlap && mi == t->accum - 1, &loss_sum);
    be->sync(be);
    double t0 = now_sec();
    if (t->overlap) {
        comm_wait_all(t->comm);
    } else {  // debug mode: a barrier first separates waiting for slower ranks from the sum itself
        comm_barrier(t->comm);
        t->skew_wait_s += now_sec() - t0;
        comm_allreduce_sum_f32(t->comm, m->grads, m->num_params);
    }
    t->reduce_wait_s += now_sec() - t0;
    return loss_sum;
}

StepResult trainer_step(Trainer *t, int64_t k, BatchSource src, void *ctx) {
    const Config *cfg = t->cfg;
    Model *m = t->model;
    Backend *be = t->be;
    StepResult r = {0};
    r.loss_sum = accumulate_grads(t, k, src, ctx);
    r.count = (int64_t)t->micro * t->accum;
    r.grad_norm = grad_global_norm(m);
    if (!isfinite(r.grad_norm)) {
        r.diverged = 1;
        return r;
    }
    double cf = clip_factor(r.grad_norm, cfg->train.clip);
    if (t->sam_e && k % cfg->train.sam_every == 0) {
        // SAM: ascend to w + rho g/|g| with the clipped g, take the gradient there, come back (§12.9).
        double gnorm = r.grad_norm * cf;
        be->copy(be, t->sam_e, m->grads, m->num_params * sizeof(float));
        be->scale(be, t->sam_e, m->num_params, (float)(cf * cfg->train.sam_rho / (gnorm + 1e-12)));
        be->axpy(be, m->params, t->sam_e, m->num_params, 1.0f);
        be->params_changed(be, m->params, m->num_params);
        accumulate_grads(t, k, src, ctx);
        cf = clip_factor(grad_global_norm(m), cfg->train.clip);
        be->axpy(be, m->params, t->sam_e, m->num_params, -1.0f);
    }
    r.lr = lr_at_step(cfg->opt.lr, k, cfg->train.warmup_steps, t->total_steps, m->cfg.seed_compat);
    if (t->shampoo)
        shampoo_step(t->shampoo, r.lr, cf);
    else
        adam_step(&t->adam, m, r.lr, cf);
    if (t->ema && k % cfg->train.ema_every == 0)
        be->ema_update(be, t->ema, m->params, m->num_params, (float)cfg->train.ema_decay);
    return r;
}

// ---------------------------------------------------------------- eval

// Top-1 and top-5 hits of one row of logits against label y.
static void topk_hits(const float *z, int C, int y, int *hit1, int *hit5) {
    int above = 0;  // classes ranking above the label: higher, tied at a lower index, or not finite
    for (int c = 0; c < C; c++)
        if (c != y && (!isfinite(z[c]) || z[c] > z[y] || (z[c] == z[y] && c < y))) above++;
    if (!isfinite(z[y])) above = C;  // a NaN logit is never a hit
    *hit1 = above == 0;
    *hit5 = above < 5;
}

EvalResult evaluate(Model *m, Comm *comm, const Dataset *ds, int eval_batch, int bm_batch, float *logits_out) {
    Backend *be = m->be;
    int C = m->cfg.num_classes;
    size_t img = (size_t)ds->channels * ds->height * ds->width;
    int64_t begin, end;
    loader_eval_shard(ds->n, comm->rank, comm->world, &begin, &end);
    float *targets = xmalloc((size_t)eval_batch * C * sizeof(float), "eval targets");
    float *logits = xmalloc((size_t)eval_batch * C * sizeof(float), "eval logits");
    float *losses = xmalloc((size_t)eval_batch * sizeof(float), "eval losses");
    // sums[0..3]: top-1 hits, top-5 hits, loss, images; then (hits, loss) per reference batch.
    int64_t nbm = (ds->n + bm_batch - 1) / bm_batch;
    double *sums = xcalloc((size_t)(4 + 2 * nbm) * sizeof(double), "eval sums");
    if (logits_out) memset(logits_out, 0, (size_t)ds->n * C * sizeof(float));
    // This rank's shard in order, decoded by the loader threads (no randomness, no drop, no duplicate).
    LoaderConfig lc = {.ds = ds, .train = 0, .micro = eval_batch, .begin = begin, .end = end,
                       .workers = ds->opt.workers, .prefetch = ds->opt.prefetch, .local_world = comm->local_world};
    Loader *ld = end > begin ? loader_create(&lc) : NULL;
    for (int64_t i0 = begin, q = 0; i0 < end; i0 += eval_batch, q++) {
        const float *images;
        const int32_t *labels;
        int n = loader_get(ld, q, &images, &labels);
        if (n < 0) die_user("data error in the eval split of %s (see the lines above)", ds->name);
        memset(targets, 0, (size_t)n * C * sizeof(float));
        for (int i = 0; i < n; i++) targets[(size_t)i * C + labels[i]] = 1.0f;
        be->upload(be, m->input, images, (size_t)n * img * sizeof(float));
        be->upload(be, m->targets, targets, (size_t)n * C * sizeof(float));
        model_forward(m, n, 0, 0, 0, 0);
        model_loss(m, n, 0.0f, 1.0f, 0);
        be->download_act(be, logits, m->logits, (size_t)n * C);
        be->download(be, losses, m->losses, (size_t)n * sizeof(float));
        for (int i = 0; i < n; i++) {
            int h1, h5;
            topk_hits(logits + (size_t)i * C, C, labels[i], &h1, &h5);
            sums[0] += h1;
            sums[1] += h5;
            sums[2] += losses[i];
            double *bm = sums + 4 + 2 * ((i0 + i) / bm_batch);
            bm[0] += h1;
            bm[1] += losses[i];
        }
        sums[3] += n;
        if (logits_out) memcpy(logits_out + (size_t)i0 * C, logits, (size_t)n * C * sizeof(float));
    }
    comm_allreduce_sum_f64(comm, sums, (size_t)(4 + 2 * nbm));
    if (logits_out) comm_allreduce_sum_f32(comm, logits_out, (size_t)ds->n * C);  // zeros elsewhere: exact
    EvalResult r = {sums[0] / sums[3], sums[1] / sums[3], sums[2] / sums[3], 0.0, 0.0, (int64_t)sums[3]};
    for (int64_t k = 0; k < nbm; k++) {
        int64_t size = (k + 1) * bm_batch <= ds->n ? bm_batch : ds->n - k * bm_batch;
        r.top1_bm += sums[4 + 2 * k] / size / nbm;
        r.loss_bm += sums[5 + 2 * k] / size / nbm;
    }
    loader_destroy(ld);
    free(targets);
    free(logits);
    free(losses);
    free(sums);
    return r;
}

// ---------------------------------------------------------------- the run

typedef struct {
    const Dataset *ds;
    Loader *loader;  // the decoder threads and their ring of micro-batches (training plan)
    int64_t steps_per_epoch;
    int mixup_group;
    double mixup_alpha;
    int u8;  // the loader makes uint8 batches (data.u8_batches, no Mixup)
} LoaderCtx;

// The loader's batch source: global slice [s B, (s + 1) B) of epoch e's permutation, this rank's sub-slice, made by
// the decoder threads (micro-batch q = (k - 1) accum + micro of the plan), then one-hot targets and mixup.
static const void *loader_source(void *ctx_, const Trainer *t, int64_t k, int micro, float *images,
                                 float *targets) {
    LoaderCtx *c = ctx_;
    const ModelConfig *mc = &t->model->cfg;
    size_t img = (size_t)mc->channels * mc->image_size * mc->image_size;
    int K = mc->num_classes;
    const float *src = NULL;
    const uint8_t *px = NULL;  // uint8 batches, normalized on the device (trainer_set_u8_input); never with Mixup
    const int32_t *labels;
    int64_t q = (k - 1) * t->accum + micro;
    int n = c->u8 ? loader_get_u8(c->loader, q, &px, &labels) : loader_get(c->loader, q, &src, &labels);
    if (n != t->micro) die_user("data error in the training split of %s (see the lines above)", c->ds->name);
    memset(targets, 0, (size_t)n * K * sizeof(float));
    for (int i = 0; i < n; i++) targets[(size_t)i * K + labels[i]] = 1.0f;
    if (c->u8) return px;  // the loader's pinned ring buffer is uploaded as it is
    if (c->mixup_alpha <= 0.0) return src;
    // Mixup writes a copy, so that the ring's batch stays as decoded (a repeated step, SAM, takes it again).
    memcpy(images, src, (size_t)n * img * sizeof(float));
    uint64_t pos = slice_pos(t, micro);
    mixup_apply(images, targets, t->micro, img, K, c->mixup_group, c->mixup_alpha, t->seed, (uint64_t)k,
                pos / (uint64_t)c->mixup_group);
    return images;
}

static void *host_alloc(void *ctx, size_t bytes, const char *what) {
    Backend *be = ctx;
    return be->alloc_host(be, bytes, what);
}
static void host_free(void *ctx, void *p) {
    Backend *be = ctx;
    be->free_host(be, p);
}

// Opens a split and checks that its images fit the model (the loader writes model-sized buffers).
static void load_dataset(Dataset *ds, const Config *cfg, int train) {
    char err[1024];
    if (dataset_open(ds, cfg->data.dataset, cfg->data.root, train, train ? cfg->data.train_limit
                                                                            : cfg->data.eval_limit,
                     err, sizeof err) != 0)
        die_user("%s", err);
    const char *split = train ? "training" : "eval";
    if (ds->height != cfg->model.image_size || ds->width != cfg->model.image_size ||
        ds->channels != cfg->model.channels)
        die_user("data.root '%s': the %s images are %dx%dx%d, the model takes %dx%dx%d", cfg->data.root, split,
                 ds->height, ds->width, ds->channels, cfg->model.image_size, cfg->model.image_size,
                 cfg->model.channels);
    if (ds->num_classes != cfg->model.num_classes)
        die_user("data.root '%s': the %s split has %d classes, model.num_classes is %d", cfg->data.root, split,
                 ds->num_classes, cfg->model.num_classes);
    DataOptions *o = &ds->opt;
    o->augment = cfg->data.augment;
    o->crop_padding = cfg->data.crop_padding;
    o->flip = cfg->data.flip;
    o->randaugment = cfg->data.randaugment;
    o->ra_magnitude = cfg->data.randaugment_magnitude;
    o->dct_scaling = train && cfg->data.jpeg_dct_scaling;
    o->max_file_bytes = cfg->data.max_file_bytes;
    o->max_pixels = cfg->data.max_pixels;
    o->workers = cfg->data.workers;
    o->prefetch = cfg->data.prefetch;
}

// 1 if dir exists and holds anything; *is_run set if it holds files that only a run writes.
static int dir_nonempty(const char *dir, int *is_run) {
    DIR *d = opendir(dir);
    *is_run = 0;
    if (!d) return 0;
    struct dirent *e;
    int any = 0;
    const char *run_files[] = {"config.json", "status.json", "metrics.jsonl", "model.safetensors", "checkpoints"};
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        any = 1;
        for (int i = 0; i < 5; i++) *is_run |= !strcmp(e->d_name, run_files[i]);
    }
    closedir(d);
    return any;
}

// Moves an earlier run's directory aside (<dir>.1, .2, ...) so that a new run never overwrites it. A non-empty
// directory that is not a run directory is refused rather than renamed.
static void prepare_run_dir(const char *dir) {
    int is_run;
    if (dir_nonempty(dir, &is_run)) {
        if (!is_run)
            die_user("config key 'run.dir': '%s' is not empty and holds no earlier run; choose another directory",
                     dir);
        char aside[1200];
        for (int i = 1;; i++) {
            snprintf(aside, sizeof aside, "%s.%d", dir, i);
            if (!path_exists(aside)) break;
        }
        if (rename(dir, aside) != 0)
            die_user("run directory '%s': cannot move the earlier run aside: %s", dir, strerror(errno));
        printf("run directory %s held an earlier run: moved it to %s\n", dir, aside);
    }
    if (mkdir_p(dir) != 0) die_user("run directory '%s': cannot create: %s", dir, strerror(errno));
}

// One job per run directory: two (a launcher started twice, a requeued job beside its predecessor) would overwrite
// each other's checkpoints and metrics. Rank 0 holds an flock on <parent>/.<name>.lock, outside the directory a
// fresh run moves aside, until the process ends (a killed one too); the file names the holder. The name comes from
// the resolved path (runs/x/., a symlink and its target lock the same file). A busy lock exits EXIT_BUSY; a file
// system without locks, or a parent this user cannot write, gets a warning, not a refusal.
static void lock_run_dir(const char *dir) {
    char path[1200], lock[4400];
    snprintf(path, sizeof path, "%s", dir);
    for (;;) {  // "runs/x/", "runs/x/.": the directory itself
        size_t n = strlen(path);
        if (n > 1 && path[n - 1] == '/')
            path[n - 1] = 0;
        else if (n > 2 && !strcmp(path + n - 2, "/."))
            path[n - 2] = 0;
        else
            break;
    }
    char *slash = strrchr(path, '/');
    const char *name = slash ? slash + 1 : path;
    char parent[1200];
    snprintf(parent, sizeof parent, "%.*s", slash ? (slash == path ? 1 : (int)(slash - path)) : 1, slash ? path : ".");
    if (mkdir_p(parent) != 0) die_user("run directory '%s': cannot create %s: %s", dir, parent, strerror(errno));
    char real[4096];
    char *rs;
    if (path_exists(path) && realpath(path, real) && (rs = strrchr(real, '/')) != NULL)  // the directory, resolved
        snprintf(lock, sizeof lock, "%.*s/.%s.lock", (int)(rs - real), real, rs + 1);
    else if (realpath(parent, real))  // not made yet: its parent, resolved
        snprintf(lock, sizeof lock, "%s/.%s.lock", strcmp(real, "/") ? real : "", name);
    else
        snprintf(lock, sizeof lock, "%s/.%s.lock", parent, name);
    int fd = open(lock, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0 && (errno == EACCES || errno == EPERM || errno == EROFS)) {
        fprintf(stderr, "simplest-dist: warning: run directory '%s': no lock (%s: %s); make sure no other job uses "
                        "it\n", dir, lock, strerror(errno));
        return;
    }
    if (fd < 0) die_user("run directory '%s': cannot create its lock file %s: %s", dir, lock, strerror(errno));
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        if (errno == EWOULDBLOCK) {
            char holder[256] = "";
            ssize_t got = pread(fd, holder, sizeof holder - 1, 0);
            holder[got > 0 ? got : 0] = 0;
            holder[strcspn(holder, "\n")] = 0;
            die_busy("run directory '%s' is in use by another simplest-dist job (%s; lock %s): two jobs would "
                     "overwrite each other's checkpoints", dir, holder[0] ? holder : "holder unknown", lock);
        }
        fprintf(stderr, "simplest-dist: warning: run directory '%s': no lock (%s on %s); make sure no other job uses "
                        "it\n", dir, strerror(errno), lock);
        close(fd);
        return;
    }
    char host[128] = "?", line[300];
    gethostname(host, sizeof host - 1);
    int len = snprintf(line, sizeof line, "pid %d on %s\n", (int)getpid(), host);
    if (ftruncate(fd, 0) == 0 && pwrite(fd, line, (size_t)len, 0) < 0) { /* the name is a courtesy */ }
    // fd stays open: the lock lives as long as the process
}

// Every rank's step, heartbeat, speed and stall as rank 0 last heard them (heartbeats: no collective, no wait).
static void rank_statuses(const Comm *comm, RankStatus *out, int64_t step, double ips, double stall) {
    for (int r = 0; r < comm->world; r++) {
        RankStatus *x = &out[r];
        x->rank = r;
        if (r == 0 || !comm_rank_info(comm, r, &x->step, &x->heartbeat_unix, &x->images_per_sec,
                                      &x->loader_stall_s, &x->pid)) {
            if (r != 0) continue;  // not heard from yet: keep the last known values
            *x = (RankStatus){0, step, unix_time(), ips, stall, (int)getpid()};
        }
    }
}

// Everything one training run holds, so that the loop reads as setup, steps, logs, evals, finish.
typedef struct {
    const Config *cfg;
    Comm *comm;
    Backend *be;
    Model *m;
    Trainer t;
    Dataset train_ds, eval_ds;
    LoaderCtx lctx;
    int eval_batch;
    char *config_json;
    FILE *metrics;  // rank 0 only
    StatusInfo si;
    RankStatus *ranks;      // (world)
    double *sp_sq, *sp_cos;  // (depth) signal-propagation diagnostics
    char last_ckpt[1200];
    double t_start, t_log, t_status, t_ckpt;
    double interval_loss;
    int64_t interval_count, interval_steps, saved_step;
    int64_t start_step;  // the checkpoint step this run resumed from (0: a fresh run)
    // fault injection for the resume tests (docs/checkpoints.md), read once: the step named by SD_FAULT_*, or -1
    int64_t fault_kill_after, fault_kill_in_ckpt, fault_fail_ckpt, fault_slow_ckpt;
    double rank_ips;  // this rank's images/s over the last log interval (sent in heartbeats)
    double rank_stall, stall_mark;  // seconds this rank waited on the loader in the last interval; running mark
} Run;

static void run_status(Run *r) {
    r->si.data_wait_s = loader_wait_s(r->lctx.loader);
    r->si.data_warnings = loader_failures(r->lctx.loader)->warnings;
    if (r->comm->rank == 0 && status_write(r->cfg->run.dir, &r->si) != 0)
        fprintf(stderr, "simplest-dist: warning: cannot write %s/status.json: %s\n", r->cfg->run.dir,
                strerror(errno));
}

// The step named by an SD_FAULT_* environment variable, or -1.
static int64_t fault_step(const char *name) {
    const char *v = getenv(name);
    return v ? parse_count(v) : -1;
}

// Host copy of a device buffer of floats (a checkpoint's EMA weights).
static float *download_floats(Backend *be, const float *dev, size_t n, const char *what) {
    float *h = xmalloc((n ? n : 1) * sizeof(float), what);
    be->download(be, h, dev, n * sizeof(float));
    return h;
}

// The checkpoint's files other than the optimizer's (rank 0): raw weights, EMA weights, Adam, loader and trainer.
static int write_ckpt_files(Run *r, int64_t step, const char *tmp, const double interval[2]) {
    const Trainer *t = &r->t;
    char path[1400];
    snprintf(path, sizeof path, "%s/model.safetensors", tmp);
    if (weights_save(r->m, path, NULL, r->config_json, step, 0) != 0) return -1;
    if (t->ema) {
        float *host = download_floats(r->be, t->ema, r->m->num_params, "EMA weights");
        snprintf(path, sizeof path, "%s/ema.safetensors", tmp);
        int rc = weights_save(r->m, path, host, r->config_json, step, 1);
        free(host);
        if (rc != 0) return -1;
    }
    snprintf(path, sizeof path, "%s/optimizer.safetensors", tmp);
    if (!t->shampoo && adam_state_save(&t->adam, r->m, path) != 0) return -1;
    // where the data order stands: the next step's (epoch, step in epoch), for an exact resume (spec/data.md §5.5)
    LoaderState ls = loader_state_at(r->lctx.loader, step + 1);
    snprintf(path, sizeof path, "%s/loader.json", tmp);
    if (loader_state_write(path, &ls) != 0) return -1;
    const StatusInfo *si = &r->si;
    TrainState ts = {.step = step, .best_top1 = si->has_eval ? si->best_top1 : -1.0, .best_step = si->best_step,
                     .has_eval = si->has_eval, .eval_step = si->eval_step, .eval_top1 = si->eval_top1,
                     .eval_top5 = si->eval_top5, .eval_loss = si->eval_loss, .world = r->comm->world,
                     .interval_loss = interval[0], .interval_count = (int64_t)interval[1],
                     .config_json = r->config_json};
    snprintf(path, sizeof path, "%s/trainer.json", tmp);
    return train_state_write(path, &ts);
}

// Rank 0: the exported weights <run.dir>/model.safetensors, the EMA weights when EMA is on. The checkpoint in tmp
// (NULL: none was written) holds a file of the same bytes, so the export is a second name of it, not a second
// serialization of the same tensors; where the file system has no hard links, it is written.
static void export_weights(Run *r, int64_t step, const char *tmp) {
    const Trainer *t = &r->t;
    char path[1200], src[1400];
    snprintf(path, sizeof path, "%s/model.safetensors", r->cfg->run.dir);
    if (tmp) {
        snprintf(src, sizeof src, "%s/%s", tmp, t->ema ? "ema.safetensors" : "model.safetensors");
        if (link_atomic(src, path) == 0) return;
    }
    float *host = t->ema ? download_floats(r->be, t->ema, r->m->num_params, "EMA weights") : NULL;
    if (weights_save(r->m, path, host, r->config_json, step, t->ema != NULL) != 0)
        fprintf(stderr, "simplest-dist: warning: cannot write %s: %s\n", path, strerror(errno));
    free(host);
}

// Every rank: a checkpoint of step `step` (docs/checkpoints.md), written by rank 0, and the exported weights
// <run.dir>/model.safetensors (EMA weights when EMA is on). A failed write is reported and tried again at the next
// checkpoint; it is never fatal, and the previous checkpoints stay whole.
static int run_checkpoint(Run *r, int64_t step) {
    const char *dir = r->cfg->run.dir;
    int rank0 = r->comm->rank == 0;
    double t0 = now_sec();
    char tmp[1300] = "", path[1400];
    double ok = 1.0;
    // the other ranks wait while rank 0 writes, under the checkpoint's own limit
    comm_set_timeout(r->comm, r->cfg->run.checkpoint_timeout_s, "run.checkpoint_timeout_s");
    if (rank0 && ckpt_begin(dir, step, tmp, sizeof tmp) != 0) {
        fprintf(stderr, "simplest-dist: warning: cannot create checkpoint %s: %s\n", tmp, strerror(errno));
        ok = 0.0;
    }
    comm_bcast(r->comm, &ok, sizeof ok, 0);  // the collectives below: all ranks or none
    // the training loss of a log interval that the checkpoint cuts: all ranks' sums, so that a resume logs the
    // same interval mean
    double part[2] = {r->interval_loss, (double)r->interval_count};
    if (ok > 0.0) comm_allreduce_sum_f64(r->comm, part, 2);
    int files_ok = rank0 && ok > 0.0, why = 0;  // rank 0: every file written so far; why: the first failure's errno
    if (ok > 0.0 && r->t.shampoo) {
        snprintf(path, sizeof path, "%s/optimizer.safetensors", tmp);
        if (shampoo_save(r->t.shampoo, path) != 0 && rank0) {
            files_ok = 0;
            why = errno;
        }
    }
    if (files_ok && r->fault_slow_ckpt == step) sleep(3);  // tests: a slow file system, the others waiting
    if (files_ok && r->fault_fail_ckpt == step) {  // tests: a write that fails on rank 0 only, as Shampoo's could
        files_ok = 0;
        why = EIO;
    }
    if (files_ok && write_ckpt_files(r, step, tmp, part) != 0) {
        files_ok = 0;
        why = errno;
    }
    if (rank0) {
        // before the commit: a complete checkpoint implies that the exported weights and the metrics records up to
        // its step (which a resume cuts metrics.jsonl back to) are on disk and at least as new
        export_weights(r, step, files_ok ? tmp : NULL);
        if (r->metrics && (fflush(r->metrics) != 0 || fsync(fileno(r->metrics)) != 0))
            fprintf(stderr, "simplest-dist: warning: cannot sync metrics.jsonl: %s\n", strerror(errno));
    }
    if (files_ok && r->fault_kill_in_ckpt == step)
        raise(SIGKILL);  // tests: a crash with every file written but the checkpoint not yet complete
    if (files_ok && ckpt_commit(dir, step, r->cfg->run.keep_checkpoints) != 0) {
        files_ok = 0;
        why = errno;
    }
    if (rank0 && ok > 0.0 && !files_ok) {
        fprintf(stderr, "simplest-dist: warning: checkpoint of step %lld not written: %s (tried again at the next)\n",
                (long long)step, strerror(why));
        ckpt_abandon(dir, step);
        ok = 0.0;
    }
    comm_bcast(r->comm, &ok, sizeof ok, 0);  // every rank agrees whether step is saved (run_finish retries if not)
    comm_set_timeout(r->comm, r->cfg->comm.timeout_s, "comm.timeout_s");
    r->t_ckpt = now_sec();
    r->t_log += r->t_ckpt - t0;  // checkpoint time does not count against training speed
    if (ok <= 0.0) return -1;
    ckpt_dir(r->last_ckpt, sizeof r->last_ckpt, dir, step);
    r->si.last_checkpoint = r->last_ckpt;
    r->si.last_checkpoint_s = r->t_ckpt - t0;
    r->saved_step = step;
    if (rank0) {
        printf("checkpoint step %lld: %.1f MB in %.2f s, %s\n", (long long)step,
               (double)ckpt_bytes(dir, step) / 1e6, r->t_ckpt - t0, r->last_ckpt);
        fflush(stdout);
    }
    return 0;
}

// Every rank starts from rank 0's weights: LAPACK and BLAS kernels may differ by a bit across nodes.
static void broadcast_weights(Model *m, Comm *comm) {
    if (comm->world == 1) return;
    Backend *be = m->be;
    float *p = xmalloc(m->num_params * sizeof(float), "weights to broadcast");  // (num_params)
    float *b = xmalloc((m->num_buffers ? m->num_buffers : 1) * sizeof(float), "buffers to broadcast");
    be->download(be, p, m->params, m->num_params * sizeof(float));
    be->download(be, b, m->buffers, m->num_buffers * sizeof(float));
    comm_bcast(comm, p, m->num_params * sizeof(float), 0);
    comm_bcast(comm, b, m->num_buffers * sizeof(float), 0);
    be->upload(be, m->params, p, m->num_params * sizeof(float));
    be->upload(be, m->buffers, b, m->num_buffers * sizeof(float));
    be->params_changed(be, m->params, m->num_params);
    free(p);
    free(b);
}

// ---------------------------------------------------------------- resume

// A resumed run's metrics.jsonl: the records of steps up to the checkpoint (those after it are from steps that
// will run again), then this run's, appended.
static FILE *metrics_reopen(const char *path, int64_t step) {
    size_t len = 0;
    char *text = (char *)read_file_all(path, &len);
    if (!text && errno != ENOENT) die_user("%s: cannot read it to resume: %s", path, strerror(errno));
    StrBuf keep = {0};
    for (char *line = text, *next; line && line < text + len; line = next) {
        char *nl = memchr(line, '\n', (size_t)(text + len - line));
        next = nl ? nl + 1 : text + len;
        if (!nl) break;  // a last line without its newline was cut off by the crash
        *nl = 0;
        cJSON *o = cJSON_Parse(line);
        const cJSON *k = cJSON_GetObjectItemCaseSensitive(o, "step");
        if (cJSON_IsNumber(k) && k->valuedouble <= (double)step) sb_printf(&keep, "%s\n", line);
        cJSON_Delete(o);
    }
    free(text);
    int rc = write_file_atomic(path, keep.s ? keep.s : "", keep.len);
    sb_free(&keep);
    return rc == 0 ? fopen(path, "a") : NULL;
}

// What rank 0 reads of a checkpoint before anything changes: every file checked, into host memory.
typedef struct {
    TrainState ts;
    float *params, *buffers;  // (num_params), (num_buffers)
    float *ema;               // (num_params), or NULL without EMA
    float *mv;                // (2, num_params) Adam's m then v, or NULL with Shampoo
    int64_t adam_t;
} CkptHost;

static void ckpt_host_free(CkptHost *h) {
    free(h->ts.config_json);
    free(h->params);
    free(h->buffers);
    free(h->ema);
    free(h->mv);
    memset(h, 0, sizeof *h);
}

// Rank 0: reads checkpoint `step` into h. -1 (err set) if a file is unreadable, so that an older checkpoint may be
// tried; a config or dataset that differs from the checkpoint's stops the run (the user's choice, not damage).
static int ckpt_host_read(Run *r, int64_t step, CkptHost *h, char *err, size_t n) {
    const Model *m = r->m;
    char dir[1200], path[1400];
    ckpt_dir(dir, sizeof dir, r->cfg->run.dir, step);
    memset(h, 0, sizeof *h);
    snprintf(path, sizeof path, "%s/trainer.json", dir);
    if (train_state_read(path, &h->ts, err, n) != 0) return -1;
    if (h->ts.step != step) return set_err(err, n, "%s: step %lld in a checkpoint of step %lld", path,
                                           (long long)h->ts.step, (long long)step);
    if (config_resume_check(r->cfg, h->ts.config_json, dir, err, n) != 0) die_user("%s", err);
    LoaderState ls;
    snprintf(path, sizeof path, "%s/loader.json", dir);
    if (loader_state_read(path, &ls, err, n) != 0) return -1;
    if (ls.fingerprint != r->train_ds.fingerprint)
        die_user("data.root: the training set differs from the one %s was trained on (fingerprint %016llx, now "
                 "%016llx); set run.resume \"never\" to start a new run instead",
                 dir, (unsigned long long)ls.fingerprint, (unsigned long long)r->train_ds.fingerprint);
    int64_t next = loader_state_resume(r->lctx.loader, &ls, err, n);
    if (next < 0) return -1;
    if (next != step + 1)
        return set_err(err, n, "%s: the data plan stands at step %lld, not at step %lld", path, (long long)next,
                       (long long)step + 1);
    size_t np = m->num_params ? m->num_params : 1;
    h->params = xmalloc(np * sizeof(float), "checkpoint weights");
    h->buffers = xmalloc((m->num_buffers ? m->num_buffers : 1) * sizeof(float), "checkpoint buffers");
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    if (weights_read(m, path, h->params, h->buffers, err, n) != 0) return -1;
    if (r->t.ema) {
        float *scratch = xmalloc((m->num_buffers ? m->num_buffers : 1) * sizeof(float), "checkpoint buffers");
        h->ema = xmalloc(np * sizeof(float), "checkpoint EMA weights");
        snprintf(path, sizeof path, "%s/ema.safetensors", dir);
        int rc = weights_read(m, path, h->ema, scratch, err, n);
        free(scratch);
        if (rc != 0) return -1;
    }
    if (!r->t.shampoo) {
        h->mv = xmalloc(2 * np * sizeof(float), "checkpoint Adam state");
        snprintf(path, sizeof path, "%s/optimizer.safetensors", dir);
        if (adam_state_read(m, path, h->mv, h->mv + m->num_params, &h->adam_t, err, n) != 0) return -1;
        if (h->adam_t != step)  // Adam steps once per optimizer step: another count would change its bias correction
            return set_err(err, n, "%s: Adam's step count is %lld in a checkpoint of step %lld", path,
                           (long long)h->adam_t, (long long)step);
    }
    return 0;
}

// Every rank: rank 0's checked copy of the weights, EMA and Adam state goes to every rank's backend.
static void ckpt_install(Run *r, CkptHost *h) {
    Model *m = r->m;
    Backend *be = r->be;
    Trainer *t = &r->t;
    size_t np = m->num_params, pb = np * sizeof(float);
    if (r->comm->rank == 0) {
        be->upload(be, m->params, h->params, pb);
        be->upload(be, m->buffers, h->buffers, m->num_buffers * sizeof(float));
        be->params_changed(be, m->params, np);
    }
    broadcast_weights(m, r->comm);
    if (t->ema) {
        if (!h->ema) h->ema = xmalloc((np ? np : 1) * sizeof(float), "checkpoint EMA weights");
        comm_bcast(r->comm, h->ema, pb, 0);
        be->upload(be, t->ema, h->ema, pb);
    }
    if (!t->shampoo) {
        if (!h->mv) h->mv = xmalloc((np ? 2 * np : 1) * sizeof(float), "checkpoint Adam state");
        comm_bcast(r->comm, h->mv, 2 * pb, 0);
        comm_bcast(r->comm, &h->adam_t, sizeof h->adam_t, 0);
        be->upload(be, t->adam.m, h->mv, 2 * pb);
        t->adam.t = h->adam_t;
    }
}

// Every rank loads the Shampoo state of checkpoint `step` in dir; owners take their factors (spec/shampoo.md
// §3.5). 1 when every rank did, else 0 with a reason in err (the first rank's that has one).
static int shampoo_load_all(Run *r, const char *dir, int64_t step, char *err, size_t n) {
    Comm *comm = r->comm;
    char path[1400];
    snprintf(path, sizeof path, "%s/optimizer.safetensors", dir);
    double mine = shampoo_load(r->t.shampoo, path, err, n) == 0;
    if (mine > 0.0 && r->t.shampoo->t != step) {
        snprintf(err, n, "%s: Shampoo's step count is %lld in a checkpoint of step %lld", path,
                 (long long)r->t.shampoo->t, (long long)step);
        mine = 0.0;
    }
    if (mine == 0.0 && comm->rank != 0) fprintf(stderr, "simplest-dist: rank %d: %s\n", comm->rank, err);
    comm_allreduce_sum_f64(comm, &mine, 1);
    if (mine < comm->world && !err[0]) snprintf(err, n, "%s: another rank could not load it", path);
    return mine == comm->world;
}

// Every rank: the run continues from checkpoint `step` (dir), which every rank has loaded (h: rank 0's files).
static void resume_from(Run *r, CkptHost *h, int64_t step, const char *dir) {
    ckpt_install(r, h);
    StatusInfo *si = &r->si;  // rank 0 writes it; only rank 0 read trainer.json
    if (h->ts.best_top1 >= 0) {
        si->best_top1 = h->ts.best_top1;
        si->best_step = h->ts.best_step;
    }
    si->has_eval = h->ts.has_eval;
    si->eval_step = h->ts.eval_step;
    si->eval_top1 = h->ts.eval_top1;
    si->eval_top5 = h->ts.eval_top5;
    si->eval_loss = h->ts.eval_loss;
    si->resumed_from = si->step = step;
    r->interval_loss = h->ts.interval_loss;  // rank 0 holds the interval's sums; run_log adds every rank's
    r->interval_count = h->ts.interval_count;
    snprintf(r->last_ckpt, sizeof r->last_ckpt, "%s", dir);
    si->last_checkpoint = r->last_ckpt;
    r->saved_step = step;
    if (r->comm->rank == 0)
        printf("resuming from %s: step %lld of %lld (written by %d rank%s, now %d)\n", dir, (long long)step,
               (long long)r->t.total_steps, h->ts.world, h->ts.world == 1 ? "" : "s", r->comm->world);
}

// model.init_from, for a fresh run: rank 0 reads the file over the random init and every rank takes its bits; the
// EMA copy starts from them too.
static void run_init_from(Run *r) {
    const Config *cfg = r->cfg;
    Model *m = r->m;
    Backend *be = r->be;
    size_t bytes = m->num_params * sizeof(float);
    float *host = download_floats(be, m->params, m->num_params, "initial weights");  // (num_params)
    char err[1600] = "";
    int loaded = 0, kept = 0;
    double ok = 1.0;
    if (r->comm->rank == 0)
        ok = weights_init_read(m, cfg->model.init_from, cfg->model.init_skip, host, &loaded, &kept, err, sizeof err) == 0;
    comm_bcast(r->comm, &ok, sizeof ok, 0);
    if (ok == 0.0) die_user("config key 'model.init_from': %s", err);
    comm_bcast(r->comm, host, bytes, 0);
    be->upload(be, m->params, host, bytes);
    be->params_changed(be, m->params, m->num_params);
    if (r->t.ema) be->copy(be, r->t.ema, m->params, bytes);
    free(host);
    if (r->comm->rank == 0)
        printf("model.init_from %s: %d tensors loaded, %d kept at their random init (model.init_skip)\n",
               cfg->model.init_from, loaded, kept);
}

// run.resume: continues from the newest checkpoint of run.dir that loads; checkpoints newer than it that do not
// load are set aside (step_N.unreadable). Returns the step resumed from, or 0 for a fresh run.
static int64_t run_resume(Run *r) {
    const Config *cfg = r->cfg;
    Comm *comm = r->comm;
    int rank0 = comm->rank == 0;
    if (!strcmp(cfg->run.resume, "never")) return 0;
    // the other ranks wait while rank 0 tidies and reads, under the checkpoint's own limit (comm.timeout_s after)
    comm_set_timeout(comm, cfg->run.checkpoint_timeout_s, "run.checkpoint_timeout_s");
    int64_t *steps = NULL, count = 0;
    if (rank0) {
        ckpt_tidy(cfg->run.dir);
        count = ckpt_list(cfg->run.dir, &steps);
    }
    comm_bcast(comm, &count, sizeof count, 0);
    if (count == 0) {
        comm_set_timeout(comm, cfg->comm.timeout_s, "comm.timeout_s");
        if (!strcmp(cfg->run.resume, "require"))
            die_user("config key 'run.resume': \"require\", but '%s' holds no complete checkpoint", cfg->run.dir);
        return 0;
    }
    if (!rank0) steps = xmalloc((size_t)count * sizeof(int64_t), "checkpoint steps");
    comm_bcast(comm, steps, (size_t)count * sizeof(int64_t), 0);
    char newest_err[1600] = "";
    int64_t found = -1;
    for (int64_t i = 0; i < count && found < 0; i++) {
        char dir[1200], err[1600] = "";
        ckpt_dir(dir, sizeof dir, cfg->run.dir, steps[i]);
        CkptHost h = {0};
        double ok = rank0 ? ckpt_host_read(r, steps[i], &h, err, sizeof err) == 0 : 1.0;
        comm_bcast(comm, &ok, sizeof ok, 0);
        if (ok > 0.0 && r->t.shampoo) ok = shampoo_load_all(r, dir, steps[i], err, sizeof err);
        if (ok > 0.0) {
            resume_from(r, &h, steps[i], dir);
            found = i;
        } else {
            if (rank0) fprintf(stderr, "simplest-dist: warning: checkpoint %s cannot be loaded: %s\n", dir, err);
            if (!newest_err[0]) snprintf(newest_err, sizeof newest_err, "%s", err);
        }
        ckpt_host_free(&h);
    }
    if (found < 0)
        die_user("run directory '%s': none of its %lld checkpoints can be loaded (the newest: %s); set run.resume "
                 "\"never\" to start a new run (this one is moved aside)",
                 cfg->run.dir, (long long)count, newest_err);
    for (int64_t j = 0; rank0 && j < found; j++)  // else the next pruning would keep them and delete loadable ones
        if (ckpt_set_aside(cfg->run.dir, steps[j]) != 0)
            die_user("run directory '%s': cannot rename the unreadable checkpoint of step %lld aside: %s",
                     cfg->run.dir, (long long)steps[j], strerror(errno));
    int64_t step = steps[found];
    free(steps);
    comm_set_timeout(comm, cfg->comm.timeout_s, "comm.timeout_s");
    return step;
}

// Removes what a killed write_file_atomic left in dir: files named <name>.tmp.<pid>.
static void remove_stale_tmp(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d))) {
        const char *t = strstr(e->d_name, ".tmp.");
        if (!t || parse_count(t + 5) < 0) continue;
        char path[1400];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        unlink(path);
    }
    closedir(d);
}

// Rank 0's run directory: a fresh run moves an earlier one aside; a resumed one keeps it, with metrics.jsonl cut
// back to the checkpoint's step. Then the banner and the memory line.
static void run_open_dir(Run *r, int micro, int64_t T, int64_t spe) {
    const Config *cfg = r->cfg;
    Comm *comm = r->comm;
    if (comm->rank != 0) return;
    if (!r->start_step)
        prepare_run_dir(cfg->run.dir);
    else
        remove_stale_tmp(cfg->run.dir);
    char path[1200];
    snprintf(path, sizeof path, "%s/config.json", cfg->run.dir);
    if (write_file_atomic(path, r->config_json, strlen(r->config_json)) != 0)
        die_user("run directory '%s': cannot write config.json: %s", cfg->run.dir, strerror(errno));
    snprintf(path, sizeof path, "%s/metrics.jsonl", cfg->run.dir);
    r->metrics = r->start_step ? metrics_reopen(path, r->start_step) : fopen(path, "w");
    if (!r->metrics)
        die_user("run directory '%s': cannot write metrics.jsonl: %s", cfg->run.dir, strerror(errno));
    printf("simplest-dist: %s%s, %zu params, %d ranks x %d images x %d accum = batch %d, %lld steps "
           "(%lld per epoch), %s backend, run dir %s\n",
           cfg->model.arch, cfg->model.seed_compat ? " (seed_compat)" : "", r->m->num_params, comm->world,
           micro, cfg->train.batch_size / (micro * comm->world), cfg->train.batch_size, (long long)T, (long long)spe,
           r->be->name, cfg->run.dir);
    // Memory: activations scale with the per-rank batch; everything else (params, grads, optimizer state,
    // scratch) does not. The largest batch assumes the free memory all goes to activations.
    size_t fr = 0, tot = 0;
    r->be->mem_info(r->be, &fr, &tot);
    double per_img = (double)r->m->act_bytes / r->m->max_batch;
    printf("memory: %.2f MiB of activations per image (%.0f MiB for %d), %.0f MiB free of %.0f on the %s: "
           "largest per-rank batch that fits about %.0f\n",
           per_img / 1048576.0, r->m->act_bytes / 1048576.0, r->m->max_batch, fr / 1048576.0, tot / 1048576.0,
           r->be->name, floor((fr + (double)r->m->act_bytes) / per_img));
    fflush(stdout);
}

static void run_setup(Run *r, const Config *cfg, Comm *comm) {
    memset(r, 0, sizeof *r);
    r->cfg = cfg;
    r->comm = comm;
    load_dataset(&r->train_ds, cfg, 1);
    load_dataset(&r->eval_ds, cfg, 0);
    int64_t spe = r->train_ds.n / cfg->train.batch_size;
    if (spe == 0)
        die_user("config key 'train.batch_size': %d is larger than the %lld training images", cfg->train.batch_size,
                 (long long)r->train_ds.n);
    int64_t T = cfg->train.steps > 0 ? cfg->train.steps : (int64_t)cfg->train.epochs * spe;
    if (!cfg->comm.deterministic && cfg->train.batch_size % (comm->world * cfg->train.grad_accum) != 0)
        die_user("config key 'train.batch_size': %d is not divisible by ranks (%d) x train.grad_accum (%d)",
                 cfg->train.batch_size, comm->world, cfg->train.grad_accum);
    if (cfg->comm.deterministic && cfg->comm.shards % comm->world != 0)
        die_user("config key 'comm.shards': %d is not divisible by the %d ranks", cfg->comm.shards, comm->world);
    int micro = config_micro_batch(cfg, comm->world);
    int group = cfg->mixup.group > 0 ? cfg->mixup.group : micro;
    if (cfg->train.mixup_alpha > 0 && micro % group != 0)
        die_user("config key 'mixup.group': %d does not divide the per-rank micro-batch %d", group, micro);
    r->eval_batch = config_eval_batch(cfg, comm->world);
    r->be = backend_for_config(cfg, comm, 1);
    if (cfg->comm.deterministic) r->be->set_deterministic(r->be, 1);
    ModelConfig mc = config_model(cfg);
    r->m = model_create(&mc, r->be, micro > r->eval_batch ? micro : r->eval_batch);
    model_init(r->m, (uint64_t)cfg->train.seed);
    broadcast_weights(r->m, comm);
    trainer_init(&r->t, cfg, comm, r->m, T);
    LoaderConfig lc = {.ds = &r->train_ds, .train = 1, .seed = r->t.seed, .global_batch = r->t.global_batch,
                       .world = comm->world, .rank = comm->rank, .accum = r->t.accum, .micro = r->t.micro,
                       .steps_per_epoch = spe, .workers = cfg->data.workers, .prefetch = cfg->data.prefetch,
                       .local_world = comm->local_world, .keep = cfg->train.sam ? r->t.accum : 1,
                       .alloc = host_alloc, .free = host_free, .alloc_ctx = r->be,
                       .u8 = cfg->data.u8_batches && cfg->train.mixup_alpha <= 0.0};
    r->lctx = (LoaderCtx){.ds = &r->train_ds,
                          .loader = loader_create(&lc),
                          .steps_per_epoch = spe,
                          .mixup_group = group,
                          .mixup_alpha = cfg->train.mixup_alpha,
                          .u8 = lc.u8};
    if (lc.u8) trainer_set_u8_input(&r->t, r->train_ds.mean, r->train_ds.std);
    r->t.no_host_images = cfg->train.mixup_alpha <= 0.0;  // loader_source writes images only for Mixup
    r->config_json = config_to_json(cfg);
    r->ranks = xcalloc((size_t)comm->world * sizeof(RankStatus), "rank status");  // (world)
    r->sp_sq = xcalloc((size_t)mc.depth * sizeof(double), "signalprop");           // (depth)
    r->sp_cos = xcalloc((size_t)mc.depth * sizeof(double), "signalprop");          // (depth)
    r->si = (StatusInfo){.state = "training", .run_dir = cfg->run.dir, .arch = cfg->model.arch,
                         .device = r->be->name, .total_steps = T, .world_size = comm->world, .ranks = r->ranks,
                         .depth = mc.depth, .best_top1 = -1.0, .loss = NAN, .lr = NAN, .grad_norm = NAN,
                         .images_per_sec = NAN, .eta_s = NAN, .last_checkpoint_s = NAN};
    static const char *skip_names[IMG_STATUS_COUNT];
    for (int i = 1; i < IMG_STATUS_COUNT; i++) skip_names[i] = img_status_name((ImgStatus)i);
    const PipeFailures *pf = loader_failures(r->lctx.loader);
    r->si.data_dataset = cfg->data.dataset;
    r->si.data_threads = loader_threads(r->lctx.loader);
    r->si.data_nreasons = IMG_STATUS_COUNT;
    r->si.data_skip_names = skip_names;
    r->si.data_skipped = pf->counts;
    r->saved_step = -1;
    r->fault_kill_after = fault_step("SD_FAULT_KILL_AFTER_STEP");
    r->fault_kill_in_ckpt = fault_step("SD_FAULT_KILL_IN_CHECKPOINT");
    r->fault_fail_ckpt = fault_step("SD_FAULT_FAIL_CHECKPOINT");
    r->fault_slow_ckpt = fault_step("SD_FAULT_SLOW_CHECKPOINT");
    if (comm->rank == 0) lock_run_dir(cfg->run.dir);
    r->start_step = run_resume(r);
    if (r->start_step == 0 && cfg->model.init_from[0])
        run_init_from(r);
    else if (cfg->model.init_from[0] && comm->rank == 0)
        printf("model.init_from %s: not used, the run resumes from its own checkpoint\n", cfg->model.init_from);
    run_open_dir(r, micro, T, spe);
    r->t_start = r->t_log = r->t_status = r->t_ckpt = now_sec();
    // at once, not at the first log line: a monitor sees the (re)started run, and which checkpoint it continues
    if (r->start_step < T) run_status(r);
}

// The progress line, metrics.jsonl record, rank heartbeats and signal-propagation diagnostics of one interval.
static void run_log(Run *r, int64_t k, const StepResult *sr) {
    double now = now_sec();
    double sums[2] = {r->interval_loss, (double)r->interval_count};
    comm_allreduce_sum_f64(r->comm, sums, 2);
    double ips = (double)r->interval_steps * r->t.global_batch / fmax(now - r->t_log, 1e-9);
    r->rank_ips = ips / r->comm->world;
    r->rank_stall = r->t.stall_s - r->stall_mark;
    r->stall_mark = r->t.stall_s;
    rank_statuses(r->comm, r->ranks, k, r->rank_ips, r->rank_stall);
    model_signal_stats(r->m, r->t.micro, r->sp_sq, r->sp_cos);
    StatusInfo *si = &r->si;
    si->step = k;
    si->epoch = (double)k / r->lctx.steps_per_epoch;
    si->loss = sums[0] / sums[1];
    si->lr = sr->lr;
    si->grad_norm = sr->grad_norm;
    si->images_per_sec = ips;
    si->elapsed_s = now - r->t_start;
    si->eta_s = (now - r->t_start) / (double)(k - r->start_step) * (r->t.total_steps - k);
    si->sp_mean_sq = r->sp_sq;
    si->sp_mean_cos = r->sp_cos;
    si->sp_step = k;
    const Shampoo *sh = r->t.shampoo;
    if (sh) {
        si->has_shampoo = 1;
        si->shampoo_blocks = sh->nblocks;
        si->shampoo_owned = sh->nowned;
        si->shampoo_max_mean_load = sh->max_mean_load;
        si->shampoo_refreshes = sh->refreshes;
        si->shampoo_failed = sh->failed_decomps;
        si->shampoo_last_refresh_s = sh->last_refresh_s;
        si->shampoo_eig_s = sh->eig_s;
        si->shampoo_root_delay = sh->cfg.root_delay;
        si->shampoo_pending_step = shampoo_pending_step(sh);
        si->shampoo_root_wait_s = sh->root_wait_s;
        si->shampoo_last_root_wait_s = sh->last_root_wait_s;
        si->shampoo_bcast_s = sh->bcast_s;
        si->shampoo_apply_s = sh->apply_s;
        si->shampoo_apply_owners = sh->cfg.apply_owners;
        si->shampoo_gather_s = sh->gather_s;
        si->shampoo_steps_sent = (double)sh->dirs_sent;
        si->shampoo_steps_received = (double)sh->dirs_recv;
        ShampooTraffic tr;
        shampoo_traffic(sh, &tr);
        si->shampoo_bytes_sent = (double)tr.sent;
        si->shampoo_bytes_received = (double)tr.received;
        si->shampoo_bytes_per_refresh = (double)tr.per_refresh;
        si->shampoo_checks_on = shampoo_replica_checks(sh, &si->shampoo_root_checks, &si->shampoo_param_checks);
    }
    if (r->comm->rank == 0) {
        char eta[32];
        format_duration(eta, sizeof eta, 1, si->eta_s);
        printf("step %lld/%lld | epoch %.2f | loss %.4f | lr %.3e | grad norm %.3f | %.0f img/s | ETA %s\n",
               (long long)k, (long long)r->t.total_steps, si->epoch, si->loss, sr->lr, sr->grad_norm, ips, eta);
        fflush(stdout);
        const char *keys[] = {"step", "epoch", "train/loss", "lr", "grad_norm", "images_per_sec", "time_s",
                              "allreduce_wait_s", "skew_wait_s"};
        double vals[] = {(double)k, si->epoch, si->loss, sr->lr, sr->grad_norm, ips, now - r->t_start,
                         r->t.reduce_wait_s, r->t.skew_wait_s};
        metrics_append(r->metrics, keys, vals, 9);
    }
    r->interval_loss = 0.0;
    r->interval_count = r->interval_steps = 0;
    r->t_log = now;
}

// Evaluation with the EMA weights when EMA is on (swapped in and back).
static EvalResult eval_current(Trainer *t, const Dataset *ds, int eval_batch) {
    Model *m = t->model;
    Backend *be = t->be;
    size_t bytes = m->num_params * sizeof(float);
    float *saved = NULL;
    if (t->ema) {
        saved = be->alloc(be, bytes, "weights during EMA eval");
        be->copy(be, saved, m->params, bytes);
        be->copy(be, m->params, t->ema, bytes);
        be->params_changed(be, m->params, m->num_params);
    }
    EvalResult r = evaluate(m, t->comm, ds, eval_batch, t->cfg->train.batch_size / t->cfg->train.grad_accum, NULL);
    if (saved) {
        be->copy(be, m->params, saved, bytes);
        be->params_changed(be, m->params, m->num_params);
        be->free(be, saved);
    }
    return r;
}

static void run_eval(Run *r, int64_t k) {
    double t0 = now_sec();
    StatusInfo *si = &r->si;
    si->state = "evaluating";
    run_status(r);
    EvalResult ev = eval_current(&r->t, &r->eval_ds, r->eval_batch);
    si->state = "training";
    si->has_eval = 1;
    si->eval_step = k;
    si->eval_top1 = ev.top1;
    si->eval_top5 = ev.top5;
    si->eval_loss = ev.loss;
    if (ev.top1 > si->best_top1) {
        si->best_top1 = ev.top1;
        si->best_step = k;
    }
    if (r->comm->rank == 0) {
        printf("eval step %lld | top-1 %.4f | top-5 %.4f | loss %.4f | best %.4f (step %lld) | %lld images\n",
               (long long)k, ev.top1, ev.top5, ev.loss, si->best_top1, (long long)si->best_step,
               (long long)ev.count);
        fflush(stdout);
        const char *keys[] = {"step", "val/acc", "val/acc5", "val/loss", "val/acc_bm", "val/loss_bm", "time_s"};
        double vals[] = {(double)k, ev.top1, ev.top5, ev.loss, ev.top1_bm, ev.loss_bm, now_sec() - r->t_start};
        metrics_append(r->metrics, keys, vals, 7);
    }
    r->t_log += now_sec() - t0;  // eval time does not count against training speed
    run_checkpoint(r, k);         // spec §12.1: a checkpoint at every evaluation
}

// The end of a run: its last checkpoint, status and message. Returns 0, or -1 when that checkpoint could not be
// written (the run then ends as "failed": a batch script must not take it for done, or requeue it in a loop).
static int run_finish(Run *r, int64_t done, const char *state) {
    StatusInfo *si = &r->si;
    int rc = 0;
    if (r->saved_step != done && strcmp(state, "failed") != 0 && run_checkpoint(r, done) != 0) {
        if (r->comm->rank == 0)
            fprintf(stderr, "simplest-dist: error: the checkpoint of step %lld, the run's last, could not be written "
                            "(see the warning above); the newest complete checkpoint is %s\n",
                    (long long)done, r->last_ckpt[0] ? r->last_ckpt : "none");
        state = "failed";
        rc = -1;
    }
    si->state = state;
    si->step = done;
    si->elapsed_s = now_sec() - r->t_start;
    si->eta_s = 0.0;
    run_status(r);
    if (r->comm->rank == 0) {
        if (strcmp(state, "failed") != 0)
            printf("%s after %lld steps in %.1f s; weights in %s/model.safetensors, checkpoint %s\n",
                   strcmp(state, "stopped") == 0 ? "stopped by a signal" : "done", (long long)done, si->elapsed_s,
                   r->cfg->run.dir, r->last_ckpt[0] ? r->last_ckpt : "none");
        if (r->metrics && fclose(r->metrics) != 0)
            fprintf(stderr, "simplest-dist: warning: closing metrics.jsonl: %s\n", strerror(errno));
        r->metrics = NULL;
    }
    return rc;
}

static void run_free(Run *r) {
    free(r->config_json);
    trainer_free(&r->t);  // first: it drains the input copies, which may still read the loader's pinned ring
    loader_destroy(r->lctx.loader);
    free(r->ranks);
    free(r->sp_sq);
    free(r->sp_cos);
    model_free(r->m);
    r->be->destroy(r->be);
    dataset_free(&r->train_ds);
    dataset_free(&r->eval_ds);
}

int train_main(const Config *cfg, Comm *comm) {
    Run r;
    // from the start: a rank silent during setup fails the job too
    comm_set_timeout(comm, cfg->comm.timeout_s, "comm.timeout_s");
    // before the setup (main installs them before MPI starts, too): a signal while the data or a checkpoint loads
    // stops the run after its first step
    train_catch_stop_signals();
    run_setup(&r, cfg, comm);
    int64_t T = r.t.total_steps, done = r.start_step;
    const char *state = "done";
    int rc = 0;
    if (done >= T && comm->rank == 0)
        printf("the run in %s is already complete (to train again: --set run.resume=never, which moves it aside, or "
               "another run.dir)\n", cfg->run.dir);
    for (int64_t k = r.start_step + 1; k <= T; k++) {
        comm_heartbeat(comm, k, r.rank_ips, r.rank_stall);
        StepResult sr = trainer_step(&r.t, k, loader_source, &r.lctx);
        if (sr.diverged) {  // identical on every rank: the norm is computed after the all-reduce
            if (comm->rank == 0)
                fprintf(stderr, "simplest-dist: error: training diverged at step %lld: the gradient norm is %g "
                                "(the weights of step %lld are kept; lower opt.lr or check the data)\n",
                        (long long)k, sr.grad_norm, (long long)done);
            state = "failed";
            rc = 1;
            break;
        }
        r.interval_loss += sr.loss_sum;
        r.interval_count += sr.count;
        r.interval_steps++;
        done = k;
        if (r.fault_kill_after == k) raise(SIGKILL);  // tests: a crash between two checkpoints
        // every rank stops, and checkpoints by rank 0's clock, at the same step
        double flags[2] = {g_stop_signal ? 1.0 : 0.0,
                           comm->rank == 0 && cfg->run.checkpoint_every_s > 0 &&
                                   now_sec() - r.t_ckpt >= cfg->run.checkpoint_every_s ? 1.0 : 0.0};
        if (comm->world > 1) comm_allreduce_sum_f64(comm, flags, 2);
        int stopped = flags[0] > 0.0 && k < T;
        // a stop changes no record: the log interval it cuts is saved, and an evaluation due now runs
        if (k % cfg->train.log_every == 0 || k == T) run_log(&r, k, &sr);
        if ((cfg->train.eval_every > 0 && k % cfg->train.eval_every == 0) || k == T) run_eval(&r, k);
        if (!stopped && r.saved_step != k &&
            (flags[1] > 0.0 || (cfg->run.checkpoint_every > 0 && k % cfg->run.checkpoint_every == 0)))
            run_checkpoint(&r, k);
        if (k % cfg->train.log_every == 0 || now_sec() - r.t_status >= cfg->run.status_every_s) {
            run_status(&r);
            r.t_status = now_sec();
        }
        if (stopped) {
            state = "stopped";
            break;
        }
    }
    if (r.start_step >= T) {  // nothing ran: status.json and the files stay as the finished run left them
        if (r.metrics) fclose(r.metrics);
        run_free(&r);
        return 0;
    }
    if (run_finish(&r, done, state) != 0) rc = 1;
    run_free(&r);
    return rc;
}

// ---------------------------------------------------------------- eval command

// Runs the model on a normalized (N, C, H, W) .npy instead of the dataset.
static float *logits_for_input(Model *m, Comm *comm, const char *input_path, int eval_batch, int64_t *n_out) {
    char err[1024];
    int64_t shape[8];
    int ndim = 0;
    float *x = npy_read_f32(input_path, shape, &ndim, err, sizeof err);
    if (!x) die_user("%s", err);
    const ModelConfig *mc = &m->cfg;
    if (ndim != 4 || shape[1] != mc->channels || shape[2] != mc->image_size || shape[3] != mc->image_size)
        die_user("%s: expected float32 [N, %d, %d, %d], got shape [%lld, %lld, %lld, %lld] (%d-d)", input_path,
                 mc->channels, mc->image_size, mc->image_size, (long long)shape[0], ndim > 1 ? (long long)shape[1] : 0,
                 ndim > 2 ? (long long)shape[2] : 0, ndim > 3 ? (long long)shape[3] : 0, ndim);
    int64_t n = shape[0], begin, end;
    int C = mc->num_classes;
    size_t img = (size_t)mc->channels * mc->image_size * mc->image_size;
    float *logits = xcalloc((size_t)(n ? n : 1) * C * sizeof(float), "logits");
    loader_eval_shard(n, comm->rank, comm->world, &begin, &end);
    for (int64_t i0 = begin; i0 < end; i0 += eval_batch) {
        int b = (int)(end - i0 < eval_batch ? end - i0 : eval_batch);
        m->be->upload(m->be, m->input, x + (size_t)i0 * img, (size_t)b * img * sizeof(float));
        model_forward(m, b, 0, 0, 0, 0);
        m->be->download_act(m->be, logits + (size_t)i0 * C, m->logits, (size_t)b * C);
    }
    comm_allreduce_sum_f32(comm, logits, (size_t)n * C);
    free(x);
    *n_out = n;
    return logits;
}

int eval_main(const Config *cfg, Comm *comm, const char *checkpoint, const char *logits_path,
              const char *input_path) {
    comm_set_timeout(comm, cfg->comm.timeout_s, "comm.timeout_s");
    Backend *be = backend_for_config(cfg, comm, 0);
    ModelConfig mc = config_model(cfg);
    int eval_batch = config_eval_batch(cfg, comm->world);
    Model *m = model_create(&mc, be, eval_batch);
    model_init(m, (uint64_t)cfg->train.seed);  // posemb; every tensor is then replaced from the file
    char err[1400], path[1200];
    struct stat st;
    if (stat(checkpoint, &st) == 0 && S_ISDIR(st.st_mode)) {  // a checkpoint directory: its EMA weights if it has
        snprintf(path, sizeof path, "%s/ema.safetensors", checkpoint);  // them (what the run evaluated), else the
        if (!path_exists(path)) snprintf(path, sizeof path, "%s/model.safetensors", checkpoint);  // trained ones
        checkpoint = path;
    }
    if (weights_load(m, checkpoint, err, sizeof err) != 0) die_user("%s", err);
    float *logits = NULL;
    int64_t n = 0;
    if (input_path) {
        logits = logits_for_input(m, comm, input_path, eval_batch, &n);
        if (comm->rank == 0) printf("ran %lld images from %s\n", (long long)n, input_path);
    } else {
        Dataset ds;
        load_dataset(&ds, cfg, 0);
        n = ds.n;
        if (logits_path) logits = xmalloc((size_t)n * mc.num_classes * sizeof(float), "logits");
        EvalResult r = evaluate(m, comm, &ds, eval_batch, cfg->train.batch_size / cfg->train.grad_accum, logits);
        if (comm->rank == 0)
            printf("eval %s: top-1 %.4f | top-5 %.4f | loss %.4f | %lld images\n", checkpoint, r.top1, r.top5, r.loss,
                   (long long)r.count);
        dataset_free(&ds);
    }
    if (logits_path && comm->rank == 0) {
        int64_t shape[2] = {n, mc.num_classes};
        if (npy_write_f32(logits_path, logits, shape, 2) != 0)
            die_user("cannot write logits to '%s': %s", logits_path, strerror(errno));
        printf("wrote logits [%lld, %d] to %s\n", (long long)n, mc.num_classes, logits_path);
    }
    free(logits);
    model_free(m);
    be->destroy(be);
    return 0;
}
