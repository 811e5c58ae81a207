// train.h: the training loop (spec/model.md §12.1): schedule, micro-batches, gradient all-reduce, clipping,
// optimizer, EMA, SAM, eval cadence, status.json, metrics.jsonl, the final weights, and the eval command.
#pragma once
#include <stdint.h>

#include "comm.h"
#include "config.h"
#include "data/dataset.h"
#include "model.h"
#include "optim.h"
#include "shampoo.h"

typedef struct {
    const Config *cfg;
    Comm *comm;
    Backend *be;
    Model *model;
    Adam adam;          // opt.name "adam"
    Shampoo *shampoo;   // opt.name "shampoo", else NULL
    float *ema;    // device copy of the EMA weights (train.ema), else NULL
    float *sam_e;  // device SAM perturbation (train.sam), else NULL
    int global_batch;  // images per optimizer step, all ranks
    int accum;         // micro-batches per step on this rank (train.grad_accum, or comm.shards / world)
    int micro;         // images per micro-batch: global_batch / (world * accum)
    int overlap;       // all-reduce each block's gradients during backward
    float **shard_grads;  // deterministic mode: one gradient buffer per local shard (accum of them), else NULL
    double reduce_wait_s;  // time this rank spent waiting for the gradient sum after its backward (exposed comm)
    double skew_wait_s;    // with comm.overlap off: the part of it spent waiting for slower ranks (a barrier)
    // Input double buffering: slot s has host staging (pinned on CUDA) and device buffers; slot 0's device buffers
    // are the model's own. While micro-batch (k, mi) computes, the next one is sourced and uploaded into the other
    // slot (prefetch), so the copy and the host's batch work overlap the GPU's compute.
    float *h_images[2], *h_targets[2];
    float *d_input[2], *d_targets[2];
    // uint8 input (trainer_set_u8_input): the source returns (micro, H, W, C) uint8 batches; they are uploaded to
    // d_u8[s] (4x fewer bytes) and normalized into d_input[s] on the device.
    int u8_input;
    int no_host_images;  // the batch source never writes h_images (it returns its own buffers): none allocated
    uint8_t *d_u8[2];
    float u8_mean[3], u8_std[3];
    int pf_valid, pf_slot, pf_mi, next_slot;
    int64_t pf_k;
    double stall_s;  // time spent sourcing micro-batches that were not prefetched (the loader on the critical path)
    uint64_t seed;
    int64_t total_steps;
} Trainer;

// Fills micro-batch `micro` (0..accum-1) of optimizer step k: t->micro images (C, H, W) and soft targets. Returns
// the images to upload: `images` itself, or a buffer of the source's own (allocated with the backend's alloc_host,
// so the copy can be asynchronous) that stays unchanged until the source has been called twice more, which spares
// a copy of the batch on the host.
// With u8 input the returned buffer is (micro, H, W, C) uint8 instead. `images` is NULL when the trainer was told
// (no_host_images) that the source always returns its own buffer.
typedef const void *(*BatchSource)(void *ctx, const Trainer *t, int64_t k, int micro, float *images, float *targets);

typedef struct {
    double loss_sum;  // sum of per-sample training losses on this rank
    int64_t count;    // samples on this rank
    double grad_norm;  // global norm before clipping (after the all-reduce)
    double lr;
    int diverged;  // the gradient norm was not finite: nothing was applied
} StepResult;

// Sets up backend-independent trainer state for a model; micro-batch sizes from cfg and the world size.
void trainer_init(Trainer *t, const Config *cfg, Comm *comm, Model *model, int64_t total_steps);
void trainer_free(Trainer *t);
// From now on the batch source returns uint8 (micro, H, W, C) images, normalized on the device with the
// dataset's mean and std (C values each).
void trainer_set_u8_input(Trainer *t, const float *mean, const float *std);
// One optimizer step k (1-based).
StepResult trainer_step(Trainer *t, int64_t k, BatchSource src, void *ctx);

typedef struct {
    double top1, top5, loss;  // exact means over images
    double top1_bm, loss_bm;  // the reference's means of per-batch means (spec/model.md §12.10)
    int64_t count;
} EvalResult;

// Evaluates the dataset, sharded exactly once across ranks; metrics summed over ranks. The batch-mean metrics use
// consecutive batches of bm_batch images in dataset order, the last one partial, as the reference's eval loader
// (bm_batch = the training micro-batch). With logits_out non-NULL (host, n x classes), every rank gets all logits
// in dataset order.
EvalResult evaluate(Model *m, Comm *comm, const Dataset *ds, int eval_batch, int bm_batch, float *logits_out);

// `simplest-dist [train] CONFIG`: the whole run. Returns the process exit code.
// SIGINT, SIGTERM and SIGUSR1 stop a training run cleanly from here on (a checkpoint, state "stopped"); main calls
// it first thing, so that a signal in the first moments of a start (a launcher's stop) is not fatal.
void train_catch_stop_signals(void);
int train_main(const Config *cfg, Comm *comm);
// `simplest-dist eval CONFIG --checkpoint FILE [--logits out.npy] [--input images.npy]`.
int eval_main(const Config *cfg, Comm *comm, const char *checkpoint, const char *logits_path,
              const char *input_path);

// Creates the backend named by run.device ("auto" falls back to the CPU with a log line; every rank must make the
// same choice). CPU threads default to this rank's share of the node's cores. training: bind NCCL for the gradient
// sums when GPU ranks need it (eval sums host buffers only).
Backend *backend_for_config(const Config *cfg, Comm *comm, int training);
