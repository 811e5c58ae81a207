// config.h: the JSON config, read through cJSON into a typed struct. One table (config.c) lists every key with its
// type, default, range and documentation; it drives parsing, validation, --set overrides, the effective config
// written to the run directory, and docs/config.md (`simplest-dist config-doc`).
#pragma once
#include <stdint.h>

#include "model.h"

typedef struct {
    struct {
        char arch[16];   // "simplest" | "simplevit"
        char width[8];   // "ti" | "s" | "b" | "custom"
        int dim, heads, mlp_dim, depth;  // 0: from the width preset
        int image_size, patch_size, num_classes, channels;  // 0: from the dataset
        double eta, gamma_L;
        int qkv_bias, mlp_bias;
        double drop_p;
        int seed_compat;
        int recompute;
        char init_from[512];  // "" = random init; else a weights file a fresh run starts from
        char init_skip[256];  // comma-separated tensor-name prefixes that keep their random init
    } model;
    struct {
        char dataset[32];  // "fashion-mnist" | "mnist" | "cifar10" | "cifar100" | "tiny-imagenet" | "imagenet"
        char root[512];    // "" = the dataset's default location
        int augment;       // random crop with padding + horizontal flip
        int crop_padding;
        int flip;
        int eval_batch_size;  // 0: the training micro-batch
        int64_t train_limit, eval_limit;  // 0: all images; otherwise the first N (tests, smoke runs)
        int randaugment, randaugment_magnitude;
        int workers, prefetch;  // decoder threads (0: auto), micro-batches prepared ahead
        int u8_batches;         // uint8 training batches, normalized on the device (not with Mixup)
        int64_t max_file_bytes, max_pixels;
        int jpeg_dct_scaling;
    } data;
    struct {
        int epochs;
        int64_t steps;  // 0: from epochs
        int64_t seed;
        int batch_size;  // global per optimizer step
        int grad_accum;
        int warmup_steps;
        double clip;
        double label_smoothing;
        double mixup_alpha;
        int eval_every;  // optimizer steps; 0: only at the end
        int log_every;
        int ema;
        int ema_every;
        double ema_decay;
        int sam;
        double sam_rho;
        int sam_every;
    } train;
    struct {
        int group;  // images per mixup group; 0: the micro-batch
    } mixup;
    struct {
        int overlap;        // start the gradient all-reduce during backward
        int deterministic;  // fixed-order gradient sum: the same bits at any world size
        int shards;         // micro-shards of the global batch in deterministic mode
        double timeout_s;   // a peer silent this long fails the job
    } comm;
    struct {
        char name[16];  // "adam"
        double lr;
        double weight_decay;
        char weight_decay_mode[16];  // "l2" | "decoupled"
        double beta1, beta2, eps;
    } opt;
    struct {
        double betas[2];  // beta1 (first moment), beta2 (factor EMA)
        double eps;
        double momentum;  // only 0
        int precondition_frequency;
        int start_preconditioning_step;
        int max_preconditioner_dim;
        double graft_beta2, graft_eps;
        char root_dtype[8];  // "fp64" | "fp32"
        char one_d[8];       // "full" | "adam"
        int root_delay;      // 0 .. precondition_frequency
        char apply[12];      // "replicated" | "owners"
        int root_threads;
        int check_replicas;
    } shampoo;
    struct {
        char dir[512];    // run directory; "" = runs/<config file name>
        char device[8];   // "cpu" | "cuda" | "auto"
        char attention[8];  // "fused" | "unfused" (CUDA)
        int threads;      // CPU threads per rank; 0 = all available
        double status_every_s;
        char resume[8];             // "auto" | "never" | "require"
        int checkpoint_every;       // optimizer steps between checkpoints; 0 = only at evals, the end, signals
        double checkpoint_every_s;  // seconds between checkpoints; 0 = off
        int keep_checkpoints;       // complete checkpoints kept (the newest)
        double checkpoint_timeout_s;  // how long ranks wait for rank 0 to write or read a checkpoint (0 = forever)
    } run;
} Config;

// Loads path (may be NULL for pure defaults), applies "key.path=value" overrides, validates. On a user error it
// prints one line naming the key (or file) and exits with code 2.
void config_load(Config *cfg, const char *path, const char *const *overrides, int noverrides);
// Same, but returns -1 with the one-line message in err instead of exiting (for tests).
int config_load_err(Config *cfg, const char *path, const char *const *overrides, int noverrides, char *err,
                    size_t errlen);
// The effective config as JSON text (every key, resolved values). Caller frees.
char *config_to_json(const Config *cfg);
// docs/config.md as markdown text. Caller frees.
char *config_doc_markdown(void);
// Images per training micro-batch on each rank at this world size (train.batch_size / (world x grad_accum), or
// train.batch_size / comm.shards in deterministic mode).
int config_micro_batch(const Config *cfg, int world);
// The run's length on the dataset's standard split (data.train_limit counted), without reading data: training
// images, steps per epoch and T. -1 for a dataset of unknown size.
int config_standard_plan(const Config *cfg, int64_t *ntrain, int64_t *steps_per_epoch, int64_t *total_steps);
// Images per eval batch on each rank: data.eval_batch_size, or the training micro-batch at this world size.
int config_eval_batch(const Config *cfg, int world);
// Whether cfg may resume a run trained with saved_json (config_to_json text): every key that changes training must
// be equal. 0, or -1 with a line naming the first key that differs and `what` (e.g. the checkpoint) in err.
int config_resume_check(const Config *cfg, const char *saved_json, const char *what, char *err, size_t errlen);
// The model part as a ModelConfig.
ModelConfig config_model(const Config *cfg);
