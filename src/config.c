// config.c: see config.h. Every key lives in KEYS below; nothing else lists config keys.
#include "config.h"

#include <cJSON.h>
#include <errno.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

typedef enum { KT_INT, KT_I64, KT_DOUBLE, KT_BOOL, KT_STR, KT_PAIR } KeyType;  // PAIR: [number, number]

typedef struct {
    const char *path;
    KeyType type;
    size_t offset, size;
    const char *def;  // default as JSON text; NULL = required
    double min, max;  // inclusive range for numbers
    const char *choices;  // "a|b|c" for strings; NULL = free text
    const char *doc;
} KeySpec;

#define FIELD(f) offsetof(Config, f), sizeof(((Config *)0)->f)
#define NOLIM -DBL_MAX, DBL_MAX

static const KeySpec KEYS[] = {
    {"model.arch", KT_STR, FIELD(model.arch), "\"simplest\"", NOLIM, "simplest|simplevit",
     "SimplEsT-ViT (E-SPA + TAT, no skips, no norms) or the SimpleViT baseline"},
    {"model.width", KT_STR, FIELD(model.width), "\"s\"", NOLIM, "ti|s|b|custom",
     "width preset: ti (192/3/768/12), s (384/6/1536/12), b (768/12/3072/12) for dim/heads/mlp_dim/depth; "
     "custom needs all four"},
    {"model.dim", KT_INT, FIELD(model.dim), "0", 0, 65536, NULL, "width D; 0 = from model.width"},
    {"model.heads", KT_INT, FIELD(model.heads), "0", 0, 1024, NULL, "attention heads; 0 = from model.width"},
    {"model.mlp_dim", KT_INT, FIELD(model.mlp_dim), "0", 0, 1 << 20, NULL, "MLP hidden width; 0 = from model.width"},
    {"model.depth", KT_INT, FIELD(model.depth), "0", 0, 1024, NULL,
     "blocks L; 0 = from model.width. SimplEsT with eta 0.9 needs depth >= 7"},
    {"model.image_size", KT_INT, FIELD(model.image_size), "0", 0, 8192, NULL,
     "input side in pixels; 0 = the dataset's"},
    {"model.patch_size", KT_INT, FIELD(model.patch_size), "4", 1, 1024, NULL, "patch side p; must divide image_size"},
    {"model.num_classes", KT_INT, FIELD(model.num_classes), "0", 0, 1 << 20, NULL, "classes; 0 = the dataset's"},
    {"model.channels", KT_INT, FIELD(model.channels), "0", 0, 16, NULL, "input channels; 0 = the dataset's"},
    {"model.eta", KT_DOUBLE, FIELD(model.eta), "0.9", 1e-6, 0.999999, NULL, "TAT target C_f(0) (spec/model.md §7)"},
    {"model.gamma_L", KT_DOUBLE, FIELD(model.gamma_L), "0.005", 1e-9, 100, NULL,
     "E-SPA gamma at the last layer (§6)"},
    {"model.qkv_bias", KT_BOOL, FIELD(model.qkv_bias), "true", NOLIM, NULL, "SimplEsT: bias on the qkv projection"},
    {"model.mlp_bias", KT_BOOL, FIELD(model.mlp_bias), "true", NOLIM, NULL, "SimplEsT: biases on both MLP linears"},
    {"model.drop_p", KT_DOUBLE, FIELD(model.drop_p), "0", 0, 0.99, NULL, "token dropout before pooling (train only)"},
    {"model.seed_compat", KT_BOOL, FIELD(model.seed_compat), "false", NOLIM, NULL,
     "reproduce the reference's quirks (column-normalized B, swapped SUO gains, no SimpleViT to_out, LR offset)"},
    {"model.recompute", KT_BOOL, FIELD(model.recompute), "false", NOLIM, NULL,
     "recompute cheap activations in backward instead of keeping them (SimpleViT: both LayerNorm outputs and the GELU "
     "output of every block; about 37 % less activation memory for one more LayerNorm and GELU pass)"},
    {"model.init_from", KT_STR, FIELD(model.init_from), "\"\"", NOLIM, NULL,
     "a fresh run starts from this weights file (safetensors with the reference's names: a run's model.safetensors, a "
     "checkpoint's, or a PyTorch state_dict) instead of the random init: its trainable tensors are loaded, the fixed "
     "E-SPA buffers are the config's; a resumed run ignores it; \"\" = random init"},
    {"model.init_skip", KT_STR, FIELD(model.init_skip), "\"\"", NOLIM, NULL,
     "with model.init_from: comma-separated tensor-name prefixes that keep their random init and may be absent or "
     "shaped differently in the file (a new classifier for other classes: \"linear_head\")"},

    {"data.dataset", KT_STR, FIELD(data.dataset), "\"fashion-mnist\"", NOLIM,
     "fashion-mnist|mnist|cifar10|cifar100|tiny-imagenet|imagenet",
     "dataset (spec/data.md §1): IDX (fashion-mnist, mnist), CIFAR binary (cifar10, cifar100: fine label), "
     "TinyImageNet-200 (zip or class-folder layout), imagenet (ImageFolder train/ and val/ after extract_ILSVRC.sh, "
     "or a `simplest-dist prepare` copy)"},
    {"data.root", KT_STR, FIELD(data.root), "\"\"", NOLIM, NULL,
     "dataset folder; \"\" = the default (/usr/share/datasets/fashion-mnist or /usr/share/datasets/mnist; the "
     "other datasets need it)"},
    {"data.augment", KT_BOOL, FIELD(data.augment), "false", NOLIM, NULL,
     "training augmentation (spec/data.md §2): IDX: random crop with zero padding, then horizontal flip; CIFAR and "
     "Tiny: RandomCrop(pad) -> flip -> RandAugment; ImageNet: RandomResizedCrop(224) -> flip -> RandAugment (off: "
     "the eval transform Resize(256) -> CenterCrop(224))"},
    {"data.randaugment", KT_BOOL, FIELD(data.randaugment), "true", NOLIM, NULL,
     "RandAugment(2 ops, data.randaugment_magnitude) after the flip when data.augment (CIFAR, Tiny, ImageNet)"},
    {"data.randaugment_magnitude", KT_INT, FIELD(data.randaugment_magnitude), "10", 0, 30, NULL,
     "RandAugment magnitude bin (of 31)"},
    {"data.threads", KT_INT, FIELD(data.workers), "0", 0, 1024, NULL,
     "decoder threads per rank; 0 = the rank's CPU affinity count - 2, at least 1; ranks sharing a node whose "
     "affinity sets together exceed its CPUs take the node's CPUs / ranks - 2 each"},
    {"data.prefetch", KT_INT, FIELD(data.prefetch), "3", 1, 64, NULL,
     "micro-batches the decoder threads may prepare ahead of the trainer (ring buffers, pinned on CUDA)"},
    {"data.u8_batches", KT_BOOL, FIELD(data.u8_batches), "true", NOLIM, NULL,
     "training batches leave the decoder threads as uint8 (H, W, C) and are normalized on the device: 4x fewer "
     "bytes in the pinned ring and the upload, no normalization on the decoder threads (spec/data.md §4); the "
     "same bits as false. Not with Mixup (train.mixup_alpha > 0), which mixes normalized images on the host"},
    {"data.max_file_bytes", KT_I64, FIELD(data.max_file_bytes), "67108864", 1, 1e15, NULL,
     "image files larger than this are skipped and counted (file_too_big)"},
    {"data.max_pixels", KT_I64, FIELD(data.max_pixels), "67108864", 1, 1e15, NULL,
     "JPEGs whose header declares more pixels are skipped and counted (too_many_pixels)"},
    {"data.jpeg.dct_scaling", KT_BOOL, FIELD(data.jpeg_dct_scaling), "false", NOLIM, NULL,
     "training decodes may use 1/2, 1/4, 1/8 DCT-domain scaling when the crop still covers 224 px (faster; "
     "pixels differ from the reference); eval never does"},
    {"data.crop_padding", KT_INT, FIELD(data.crop_padding), "4", 0, 64, NULL,
     "padding of the random crop when data.augment; 0 = no crop"},
    {"data.flip", KT_BOOL, FIELD(data.flip), "true", NOLIM, NULL, "horizontal flip (p = 0.5) when data.augment"},
    {"data.eval_batch_size", KT_INT, FIELD(data.eval_batch_size), "0", 0, 1 << 20, NULL,
     "images per eval batch on each rank; 0 = the training micro-batch"},
    {"data.train_limit", KT_I64, FIELD(data.train_limit), "0", 0, 1e15, NULL,
     "use only the first N training images; 0 = all"},
    {"data.eval_limit", KT_I64, FIELD(data.eval_limit), "0", 0, 1e15, NULL,
     "evaluate only the first N eval images; 0 = all"},

    {"train.epochs", KT_INT, FIELD(train.epochs), "90", 0, 1e6, NULL, "epochs (used when train.steps is 0)"},
    {"train.steps", KT_I64, FIELD(train.steps), "0", 0, 1e12, NULL,
     "total optimizer steps T; 0 = epochs x floor(train images / batch_size)"},
    {"train.seed", KT_I64, FIELD(train.seed), "3407", 0, 9.0e15, NULL,
     "one seed for init, data order, augmentation, mixup and dropout"},
    {"train.batch_size", KT_INT, FIELD(train.batch_size), NULL, 1, 1 << 24, NULL,
     "global batch per optimizer step (required); = micro-batch x ranks x grad_accum"},
    {"train.grad_accum", KT_INT, FIELD(train.grad_accum), "1", 1, 4096, NULL, "micro-batches per optimizer step"},
    {"train.warmup_steps", KT_INT, FIELD(train.warmup_steps), "0", 0, 1e9, NULL, "linear LR warmup W (§12.6)"},
    {"train.clip", KT_DOUBLE, FIELD(train.clip), "1.0", 0, 1e12, NULL,
     "clip the global grad norm to this (0 = off)"},
    {"train.label_smoothing", KT_DOUBLE, FIELD(train.label_smoothing), "0", 0, 1, NULL, "label smoothing epsilon"},
    {"train.mixup_alpha", KT_DOUBLE, FIELD(train.mixup_alpha), "0", 0, 100, NULL,
     "Mixup Beta(alpha, alpha); 0 = off; lambda = min(z, 1 - z)"},
    {"train.eval_every", KT_INT, FIELD(train.eval_every), "0", 0, 1e9, NULL,
     "evaluate every N optimizer steps (and always at the end); 0 = only at the end"},
    {"train.log_every", KT_INT, FIELD(train.log_every), "10", 1, 1e9, NULL,
     "optimizer steps per progress line and metrics.jsonl record"},
    {"train.ema", KT_BOOL, FIELD(train.ema), "false", NOLIM, NULL,
     "keep an EMA of the weights; eval and the exported weights use it"},
    {"train.ema_every", KT_INT, FIELD(train.ema_every), "5", 1, 1e9, NULL, "EMA update every N optimizer steps"},
    {"train.ema_decay", KT_DOUBLE, FIELD(train.ema_decay), "0.99", 0, 1, NULL, "EMA decay"},
    {"train.sam", KT_BOOL, FIELD(train.sam), "false", NOLIM, NULL, "sharpness-aware minimization (§12.9)"},
    {"train.sam_rho", KT_DOUBLE, FIELD(train.sam_rho), "0.05", 0, 1e6, NULL, "SAM radius rho"},
    {"train.sam_every", KT_INT, FIELD(train.sam_every), "1", 1, 1e9, NULL, "SAM on steps k with k mod N = 0"},

    {"mixup.group", KT_INT, FIELD(mixup.group), "0", 0, 1 << 24, NULL,
     "images per Mixup group (one lambda and permutation each); 0 = the micro-batch; must divide it"},

    {"comm.overlap", KT_BOOL, FIELD(comm.overlap), "true", NOLIM, NULL,
     "start each block's gradient all-reduce as soon as its gradients are final, overlapping the rest of the "
     "backward pass (false: one all-reduce after backward, for debugging)"},
    {"comm.deterministic", KT_BOOL, FIELD(comm.deterministic), "false", NOLIM, NULL,
     "sum the gradient in a fixed order so that any world size gives the same bits: the global batch is cut "
     "into comm.shards micro-batches, each rank computes its own in order, and the sums chain rank to rank. "
     "Slower; replaces train.grad_accum (which must be 1)"},
    {"comm.shards", KT_INT, FIELD(comm.shards), "12", 1, 1 << 20, NULL,
     "micro-batches per global batch in deterministic mode; must divide train.batch_size and be divisible by "
     "the world size (12 suits 1, 2, 3, 4, 6 and 12 ranks)"},
    {"comm.timeout_s", KT_DOUBLE, FIELD(comm.timeout_s), "300", 0, 1e7, NULL,
     "a rank that waits this long for its peers stops the job with a line naming the silent ranks (0 = wait "
     "forever)"},

    {"opt.name", KT_STR, FIELD(opt.name), "\"adam\"", NOLIM, "adam|shampoo",
     "optimizer: adam, or shampoo (Distributed Shampoo with Adam grafting, keys shampoo.*)"},
    {"opt.lr", KT_DOUBLE, FIELD(opt.lr), NULL, 0, 1e3, NULL, "peak learning rate lr0 (required)"},
    {"opt.weight_decay", KT_DOUBLE, FIELD(opt.weight_decay), "0", 0, 1e3, NULL,
     "weight decay lambda on tensors whose name has no \"bias\""},
    {"opt.weight_decay_mode", KT_STR, FIELD(opt.weight_decay_mode), "\"l2\"", NOLIM, "l2|decoupled",
     "l2: g += lambda w before the moments (the reference); decoupled: w *= 1 - lr lambda (AdamW)"},
    {"opt.beta1", KT_DOUBLE, FIELD(opt.beta1), "0.9", 0, 0.999999, NULL, "Adam beta1"},
    {"opt.beta2", KT_DOUBLE, FIELD(opt.beta2), "0.999", 0, 0.9999999, NULL, "Adam beta2"},
    {"opt.eps", KT_DOUBLE, FIELD(opt.eps), "1e-8", 0, 1, NULL, "Adam epsilon"},

    {"shampoo.betas", KT_PAIR, FIELD(shampoo.betas), "[0.9, 0.999]", 0, 0.9999999, NULL,
     "[beta1, beta2]: the first moment's decay and the Kronecker factors' EMA decay"},
    {"shampoo.eps", KT_DOUBLE, FIELD(shampoo.eps), "1e-12", 0, 1, NULL,
     "added to every eigenvalue (after the shift of negative ones) before the inverse root"},
    {"shampoo.momentum", KT_DOUBLE, FIELD(shampoo.momentum), "0", 0, 0, NULL, "only 0 is supported"},
    {"shampoo.precondition_frequency", KT_INT, FIELD(shampoo.precondition_frequency), "25", 1, 1e9, NULL,
     "f: the inverse roots are recomputed (by the owner ranks) and broadcast every f steps"},
    {"shampoo.start_preconditioning_step", KT_INT, FIELD(shampoo.start_preconditioning_step), "25", 0, 1e9, NULL,
     "S: steps 1..S are Adam (grafting) steps; 0 or a multiple of f"},
    {"shampoo.max_preconditioner_dim", KT_INT, FIELD(shampoo.max_preconditioner_dim), "1024", 1, 1 << 16, NULL,
     "b: dimensions are merged up to b and cut into blocks of at most b (the reference ran 8192)"},
    {"shampoo.graft_beta2", KT_DOUBLE, FIELD(shampoo.graft_beta2), "0.999", 0, 0.9999999, NULL,
     "beta2 of the Adam grafting direction"},
    {"shampoo.graft_eps", KT_DOUBLE, FIELD(shampoo.graft_eps), "1e-8", 0, 1, NULL, "epsilon of the Adam grafting"},
    {"shampoo.root_dtype", KT_STR, FIELD(shampoo.root_dtype), "\"fp64\"", NOLIM, "fp64|fp32",
     "precision of the eigendecomposition (roots are stored and applied in fp32)"},
    {"shampoo.one_d", KT_STR, FIELD(shampoo.one_d), "\"full\"", NOLIM, "full|adam",
     "1-D parameters: full-matrix factors (the reference), or plain Adam"},
    {"shampoo.root_delay", KT_INT, FIELD(shampoo.root_delay), "0", 0, 1e9, NULL,
     "d: roots computed at step t are used from t + d on (0: from t, the reference; 1: the spec's overlap; up to "
     "precondition_frequency: the decomposition runs behind d steps, docs/spec-deviations.md)"},
    {"shampoo.apply", KT_STR, FIELD(shampoo.apply), "\"replicated\"", NOLIM, "replicated|owners",
     "who computes each block's step: every rank for every block (replicated, the spec's design), or each block's "
     "owner, the steps then all-gathered every step (owners: 1/P of the apply GEMMs per rank for 4 bytes per "
     "parameter of traffic; spec/shampoo.md §3.6)"},
    {"shampoo.root_threads", KT_INT, FIELD(shampoo.root_threads), "1", 1, 1024, NULL,
     "LAPACK threads for the roots (the same on every rank, whatever the world size)"},
    {"shampoo.check_replicas", KT_BOOL, FIELD(shampoo.check_replicas), "false", NOLIM, NULL,
     "checksum every owner's roots on every rank after each broadcast, and the parameters at each refresh step; a "
     "mismatch stops the run naming step, owner and rank (spec/shampoo.md §3.4; costs a download of the roots on a "
     "GPU)"},

    {"run.dir", KT_STR, FIELD(run.dir), "\"\"", NOLIM, NULL,
     "run directory (config.json, status.json, metrics.jsonl, weights, checkpoints/); \"\" = runs/<config file name>. An earlier run there is resumed from its newest checkpoint (run.resume), or else moved aside to <dir>.1, .2, ... first"},
    {"run.device", KT_STR, FIELD(run.device), "\"cpu\"", NOLIM, "cpu|cuda|auto",
     "backend: cpu, cuda, or auto (cuda when a GPU is present, else cpu)"},
    {"run.attention", KT_STR, FIELD(run.attention), "\"fused\"", NOLIM, "fused|unfused",
     "CUDA attention: fused (FlashAttention-2-style kernels; dh 32 or 64, else unfused) or unfused (cuBLAS batched "
     "GEMMs and softmax kernels, the probabilities kept in bf16); the CPU has one implementation"},
    {"run.threads", KT_INT, FIELD(run.threads), "0", 0, 4096, NULL, "CPU threads per rank; 0 = the cores this rank may use, divided by the ranks on its node"},
    {"run.status_every_s", KT_DOUBLE, FIELD(run.status_every_s), "5", 0.1, 86400, NULL,
     "status.json refresh interval in seconds (it is also written at every log line)"},
    {"run.resume", KT_STR, FIELD(run.resume), "\"auto\"", NOLIM, "auto|never|require",
     "auto: a run directory holding a complete checkpoint (<dir>/checkpoints/step_N/) continues from the newest "
     "one that loads, bit for bit, provided every key that changes the training agrees with the saved config "
     "(docs/checkpoints.md); never: an earlier run is moved aside and training starts over; require: as auto, "
     "but a directory without a checkpoint is an error"},
    {"run.checkpoint_every", KT_INT, FIELD(run.checkpoint_every), "0", 0, 1e9, NULL,
     "also write a checkpoint every N optimizer steps (0: at evaluations, at the end, on a stop signal and by "
     "run.checkpoint_every_s only)"},
    {"run.checkpoint_every_s", KT_DOUBLE, FIELD(run.checkpoint_every_s), "1800", 0, 1e9, NULL,
     "also write a checkpoint when this many seconds have passed since the last one (rank 0's clock; 0 = off)"},
    {"run.keep_checkpoints", KT_INT, FIELD(run.keep_checkpoints), "2", 1, 1e6, NULL,
     "complete checkpoints kept: older ones are deleted once a newer one is complete"},
    {"run.checkpoint_timeout_s", KT_DOUBLE, FIELD(run.checkpoint_timeout_s), "3600", 0, 1e7, NULL,
     "while rank 0 writes or reads a checkpoint, the other ranks wait this long for it (in place of "
     "comm.timeout_s) before the job is failed as hung (0 = wait forever)"},
};
#define NKEYS (int)(sizeof KEYS / sizeof KEYS[0])

static const KeySpec *find_key(const char *path) {
    for (int i = 0; i < NKEYS; i++)
        if (!strcmp(KEYS[i].path, path)) return &KEYS[i];
    return NULL;
}

// 1 if some key lives below this path ("model" for "model.arch").
static int is_section(const char *path) {
    size_t n = strlen(path);
    for (int i = 0; i < NKEYS; i++)
        if (!strncmp(KEYS[i].path, path, n) && KEYS[i].path[n] == '.') return 1;
    return 0;
}

// Rejects keys that the table does not know, walking nested objects.
static int check_unknown(const cJSON *obj, const char *prefix, char *err, size_t n) {
    const cJSON *it;
    cJSON_ArrayForEach(it, obj) {
        if (!*prefix && !strcmp(it->string, "derived") && cJSON_IsObject(it)) continue;  // config_to_json's notes
        char path[256];
        snprintf(path, sizeof path, "%s%s%s", prefix, *prefix ? "." : "", it->string);
        if (find_key(path)) {
            if (cJSON_IsObject(it)) return set_err(err, n, "config key '%s': expected a value, got an object", path);
            continue;
        }
        if (is_section(path)) {
            if (!cJSON_IsObject(it)) return set_err(err, n, "config key '%s': expected an object of keys", path);
            if (check_unknown(it, path, err, n) != 0) return -1;
            continue;
        }
        return set_err(err, n, "unknown config key '%s' (see docs/config.md)", path);
    }
    return 0;
}

static const cJSON *get_path(const cJSON *root, const char *path) {
    char buf[256];
    snprintf(buf, sizeof buf, "%s", path);
    const cJSON *cur = root;
    for (char *tok = strtok(buf, "."); tok && cur; tok = strtok(NULL, ".")) {
        if (!cJSON_IsObject(cur)) return NULL;
        cur = cJSON_GetObjectItemCaseSensitive(cur, tok);
    }
    return cur;
}

static const char *json_kind(const cJSON *v) {
    if (cJSON_IsString(v)) return "a string";
    if (cJSON_IsBool(v)) return "a boolean";
    if (cJSON_IsNumber(v)) return "a number";
    if (cJSON_IsNull(v)) return "null";
    if (cJSON_IsArray(v)) return "an array";
    return "an object";
}

// Stores one JSON value into the struct after checking type, range and choices.
static int store_value(Config *cfg, const KeySpec *k, const cJSON *v, char *err, size_t n) {
    char *dst = (char *)cfg + k->offset;
    switch (k->type) {
    case KT_BOOL:
        if (!cJSON_IsBool(v)) return set_err(err, n, "config key '%s': expected true or false, got %s", k->path,
                                            json_kind(v));
        *(int *)dst = cJSON_IsTrue(v);
        return 0;
    case KT_STR: {
        if (!cJSON_IsString(v)) return set_err(err, n, "config key '%s': expected a string, got %s", k->path,
                                              json_kind(v));
        const char *s = v->valuestring;
        if (strlen(s) >= k->size) return set_err(err, n, "config key '%s': longer than %zu characters", k->path,
                                                k->size - 1);
        if (k->choices) {
            char buf[128];
            snprintf(buf, sizeof buf, "%s", k->choices);
            int ok = 0;
            for (char *tok = strtok(buf, "|"); tok; tok = strtok(NULL, "|")) ok |= !strcmp(tok, s);
            if (!ok) return set_err(err, n, "config key '%s': \"%s\" is not one of %s", k->path, s, k->choices);
        }
        strcpy(dst, s);
        return 0;
    }
    case KT_PAIR: {
        if (!cJSON_IsArray(v) || cJSON_GetArraySize(v) != 2)
            return set_err(err, n, "config key '%s': expected [number, number], got %s", k->path, json_kind(v));
        for (int i = 0; i < 2; i++) {
            const cJSON *x = cJSON_GetArrayItem(v, i);
            if (!cJSON_IsNumber(x) || !isfinite(x->valuedouble))
                return set_err(err, n, "config key '%s': element %d is not a finite number", k->path, i);
            if (x->valuedouble < k->min || x->valuedouble > k->max)
                return set_err(err, n, "config key '%s': element %d (%g) is out of range [%g, %g]", k->path, i,
                               x->valuedouble, k->min, k->max);
            ((double *)dst)[i] = x->valuedouble;
        }
        return 0;
    }
    default: {
        if (!cJSON_IsNumber(v)) return set_err(err, n, "config key '%s': expected a number, got %s", k->path,
                                              json_kind(v));
        double x = v->valuedouble;
        if (!isfinite(x)) return set_err(err, n, "config key '%s': not a finite number", k->path);
        if (k->type != KT_DOUBLE && x != floor(x))
            return set_err(err, n, "config key '%s': expected an integer, got %g", k->path, x);
        if (x < k->min || x > k->max)
            return set_err(err, n, "config key '%s': %g is out of range [%g, %g]", k->path, x, k->min, k->max);
        if (k->type == KT_INT) *(int *)dst = (int)x;
        else if (k->type == KT_I64) *(int64_t *)dst = (int64_t)x;
        else *(double *)dst = x;
        return 0;
    }
    }
}

// Applies "a.b.c=value" to the tree; the value is JSON if it parses, else a string.
static int apply_override(cJSON *root, const char *ov, char *err, size_t n) {
    const char *eq = strchr(ov, '=');
    if (!eq || eq == ov) return set_err(err, n, "--set '%s': expected key.path=value", ov);
    char path[256];
    size_t plen = (size_t)(eq - ov);
    if (plen >= sizeof path) return set_err(err, n, "--set '%s': key too long", ov);
    memcpy(path, ov, plen);
    path[plen] = 0;
    const KeySpec *k = find_key(path);
    if (!k) return set_err(err, n, "unknown config key '%s' in --set (see docs/config.md)", path);
    // The whole value must parse as JSON; otherwise (and for string keys, unless it is a quoted string) it is text.
    cJSON *val = cJSON_ParseWithOpts(eq + 1, NULL, 1);
    if (val && k->type == KT_STR && !cJSON_IsString(val)) {
        cJSON_Delete(val);
        val = NULL;
    }
    if (!val) val = cJSON_CreateString(eq + 1);
    cJSON *cur = root;
    char *save = NULL, *tok = strtok_r(path, ".", &save);
    for (char *next = strtok_r(NULL, ".", &save); next; tok = next, next = strtok_r(NULL, ".", &save)) {
        cJSON *child = cJSON_GetObjectItemCaseSensitive(cur, tok);
        if (!child) child = cJSON_AddObjectToObject(cur, tok);
        if (!cJSON_IsObject(child)) {
            cJSON_Delete(val);
            return set_err(err, n, "--set '%s': '%s' is not an object in the config", ov, tok);
        }
        cur = child;
    }
    if (cJSON_GetObjectItemCaseSensitive(cur, tok))
        cJSON_ReplaceItemInObjectCaseSensitive(cur, tok, val);
    else
        cJSON_AddItemToObject(cur, tok, val);
    return 0;
}

// Width presets and dataset shapes fill the fields left at 0; then cross-key rules.
static int resolve(Config *c, char *err, size_t n) {
    static const struct { const char *name; int dim, heads, mlp, depth; } presets[] = {
        {"ti", 192, 3, 768, 12}, {"s", 384, 6, 1536, 12}, {"b", 768, 12, 3072, 12}};
    int *fields[] = {&c->model.dim, &c->model.heads, &c->model.mlp_dim, &c->model.depth};
    const char *names[] = {"model.dim", "model.heads", "model.mlp_dim", "model.depth"};
    for (int p = 0; p < 3; p++) {
        if (strcmp(c->model.width, presets[p].name)) continue;
        int vals[] = {presets[p].dim, presets[p].heads, presets[p].mlp, presets[p].depth};
        for (int i = 0; i < 4; i++)
            if (*fields[i] == 0) *fields[i] = vals[i];
    }
    for (int i = 0; i < 4; i++)
        if (*fields[i] == 0) return set_err(err, n, "config key '%s': required with model.width \"custom\"", names[i]);
    // The shape each dataset's pipeline produces (spec/data.md §1, §2).
    static const struct { const char *name; int size, channels, classes; } shapes[] = {
        {"fashion-mnist", 28, 1, 10}, {"mnist", 28, 1, 10},          {"cifar10", 32, 3, 10},
        {"cifar100", 32, 3, 100},     {"tiny-imagenet", 64, 3, 200}, {"imagenet", 224, 3, 1000}};
    int si = 0;
    for (int i = 0; i < (int)(sizeof shapes / sizeof shapes[0]); i++)
        if (!strcmp(c->data.dataset, shapes[i].name)) si = i;
    struct { int *field; int value; const char *name; } ds[] = {
        {&c->model.image_size, shapes[si].size, "model.image_size"},
        {&c->model.channels, shapes[si].channels, "model.channels"},
        {&c->model.num_classes, shapes[si].classes, "model.num_classes"}};
    for (int i = 0; i < 3; i++) {
        if (*ds[i].field == 0) *ds[i].field = ds[i].value;
        if (*ds[i].field != ds[i].value)
            return set_err(err, n, "config key '%s': %s has %d, not %d", ds[i].name, c->data.dataset, ds[i].value,
                          *ds[i].field);
    }
    ModelConfig mc = config_model(c);
    char why[400];
    if (model_config_check(&mc, why, sizeof why) != 0) return set_err(err, n, "config: %s", why);
    if (c->train.batch_size % c->train.grad_accum != 0)
        return set_err(err, n, "config key 'train.batch_size': %d is not divisible by train.grad_accum %d",
                      c->train.batch_size, c->train.grad_accum);
    if (c->train.epochs == 0 && c->train.steps == 0)
        return set_err(err, n, "config key 'train.steps': 0 with train.epochs 0 leaves nothing to train");
    if (c->comm.deterministic && c->train.grad_accum != 1)
        return set_err(err, n, "config key 'train.grad_accum': must be 1 with comm.deterministic (comm.shards "
                               "sets the micro-batches)");
    if (c->comm.deterministic && c->train.batch_size % c->comm.shards != 0)
        return set_err(err, n, "config key 'comm.shards': %d does not divide train.batch_size %d", c->comm.shards,
                       c->train.batch_size);
    if (!strcmp(c->opt.name, "shampoo") && c->shampoo.start_preconditioning_step % c->shampoo.precondition_frequency)
        return set_err(err, n, "config key 'shampoo.start_preconditioning_step': %d must be 0 or a multiple of "
                               "shampoo.precondition_frequency %d (otherwise zero roots would be used)",
                       c->shampoo.start_preconditioning_step, c->shampoo.precondition_frequency);
    if (!strcmp(c->opt.name, "shampoo") && c->shampoo.root_delay > c->shampoo.precondition_frequency)
        return set_err(err, n, "config key 'shampoo.root_delay': %d exceeds shampoo.precondition_frequency %d (a "
                               "refresh must be installed before the next one starts)",
                       c->shampoo.root_delay, c->shampoo.precondition_frequency);
    if (c->model.init_skip[0] && !c->model.init_from[0])
        return set_err(err, n, "config key 'model.init_skip': \"%s\" is set, but model.init_from names no weights "
                               "file", c->model.init_skip);
    if (c->train.sam && c->model.seed_compat)
        return set_err(err, n, "config key 'train.sam': the seed_compat variant (second pass on the next batch) is "
                               "not supported; use model.seed_compat false");
    if (c->mixup.group > 0 && c->train.mixup_alpha > 0 && (c->train.batch_size / c->train.grad_accum) % c->mixup.group)
        return set_err(err, n, "config key 'mixup.group': %d does not divide the micro-batch %d", c->mixup.group,
                       c->train.batch_size / c->train.grad_accum);
    for (size_t len = strlen(c->run.dir); len > 1 && c->run.dir[len - 1] == '/'; len--) c->run.dir[len - 1] = 0;
    int idx_data = !strcmp(c->data.dataset, "mnist") || !strcmp(c->data.dataset, "fashion-mnist");
    if (!strcmp(c->data.root, "") && !idx_data)
        return set_err(err, n, "config key 'data.root': required for data.dataset \"%s\"", c->data.dataset);
    if (!strcmp(c->data.root, "")) {
        const char *def = !strcmp(c->data.dataset, "mnist") ? "/usr/share/datasets/mnist"
                                                             : "/usr/share/datasets/fashion-mnist";
        snprintf(c->data.root, sizeof c->data.root, "%s", def);
    }
    return 0;
}

static void default_run_dir(Config *c, const char *path) {
    if (c->run.dir[0]) return;
    const char *base = path ? strrchr(path, '/') : NULL;
    base = base ? base + 1 : (path ? path : "default");
    char name[256];
    snprintf(name, sizeof name, "%s", base);
    char *dot = strrchr(name, '.');
    if (dot && !strcmp(dot, ".json")) *dot = 0;
    snprintf(c->run.dir, sizeof c->run.dir, "runs/%s", name);
}

int config_load_err(Config *cfg, const char *path, const char *const *ov, int nov, char *err, size_t n) {
    memset(cfg, 0, sizeof *cfg);
    cJSON *root = NULL;
    if (path) {
        size_t len;
        char *text = (char *)read_file_all(path, &len);
        if (!text) return set_err(err, n, "config file '%s': %s", path, strerror(errno));
        const char *end = NULL;
        root = cJSON_ParseWithOpts(text, &end, 1);
        if (!root) {
            int line = 1;
            for (const char *p = text; end && p < end; p++) line += *p == '\n';
            free(text);
            return set_err(err, n, "config file '%s': invalid JSON near line %d", path, line);
        }
        free(text);
        if (!cJSON_IsObject(root)) {
            cJSON_Delete(root);
            return set_err(err, n, "config file '%s': the top level must be a JSON object", path);
        }
    } else {
        root = cJSON_CreateObject();
    }
    int rc = 0;
    for (int i = 0; i < nov && rc == 0; i++) rc = apply_override(root, ov[i], err, n);
    if (rc == 0) rc = check_unknown(root, "", err, n);
    for (int i = 0; i < NKEYS && rc == 0; i++) {
        const cJSON *v = get_path(root, KEYS[i].path);
        if (!v) {
            if (!KEYS[i].def) {
                rc = set_err(err, n, "config key '%s' is required (%s)", KEYS[i].path, KEYS[i].doc);
                break;
            }
            cJSON *d = cJSON_Parse(KEYS[i].def);
            CHECK(d, "bad default for %s", KEYS[i].path);
            rc = store_value(cfg, &KEYS[i], d, err, n);
            cJSON_Delete(d);
        } else {
            rc = store_value(cfg, &KEYS[i], v, err, n);
        }
    }
    cJSON_Delete(root);
    if (rc == 0) rc = resolve(cfg, err, n);
    if (rc == 0) default_run_dir(cfg, path);
    return rc;
}

void config_load(Config *cfg, const char *path, const char *const *ov, int nov) {
    char err[1024];
    if (config_load_err(cfg, path, ov, nov, err, sizeof err) != 0) die_user("%s", err);
}

int config_micro_batch(const Config *c, int world) {
    if (c->comm.deterministic) return c->train.batch_size / c->comm.shards;
    return c->train.batch_size / (world * c->train.grad_accum);
}

int config_eval_batch(const Config *c, int world) {
    if (c->data.eval_batch_size > 0) return c->data.eval_batch_size;
    int micro = config_micro_batch(c, world);
    return micro > 0 ? micro : 1;
}

ModelConfig config_model(const Config *c) {
    ModelConfig m = {
        .arch = strcmp(c->model.arch, "simplevit") == 0 ? ARCH_SIMPLEVIT : ARCH_SIMPLEST,
        .image_size = c->model.image_size,
        .patch_size = c->model.patch_size,
        .channels = c->model.channels,
        .num_classes = c->model.num_classes,
        .dim = c->model.dim,
        .depth = c->model.depth,
        .heads = c->model.heads,
        .mlp_dim = c->model.mlp_dim,
        .eta = c->model.eta,
        .gamma_L = c->model.gamma_L,
        .qkv_bias = c->model.qkv_bias,
        .mlp_bias = c->model.mlp_bias,
        .drop_p = (float)c->model.drop_p,
        .seed_compat = c->model.seed_compat,
        .recompute = c->model.recompute,
    };
    return m;
}

// Finds or creates the object for the section part of a key path; *leaf gets the last name.
static cJSON *section_of(cJSON *root, const char *path, char *leaf, size_t leafn) {
    char buf[64];
    snprintf(buf, sizeof buf, "%s", path);
    char *last = strrchr(buf, '.');
    snprintf(leaf, leafn, "%s", last ? last + 1 : buf);
    if (!last) return root;
    *last = 0;
    cJSON *cur = root;
    for (char *tok = strtok(buf, "."); tok; tok = strtok(NULL, ".")) {
        cJSON *child = cJSON_GetObjectItemCaseSensitive(cur, tok);
        if (!child) child = cJSON_AddObjectToObject(cur, tok);
        cur = child;
    }
    return cur;
}

// The data pipeline's transforms in words (src/data/pipeline.c), for the effective config's "derived" section:
// spec/data.md §2 asks that ImageNet's training transform with augmentation off (the eval transform) be recorded.
static void describe_transforms(const Config *c, char *train, char *eval, size_t n) {
    const char *d = c->data.dataset;
    int S = c->model.image_size, imagenet = !strcmp(d, "imagenet");
    int idx = !strcmp(d, "fashion-mnist") || !strcmp(d, "mnist");
    char aug[256] = "";
    if (c->data.augment && !imagenet) {
        if (c->data.crop_padding > 0)
            snprintf(aug + strlen(aug), sizeof aug - strlen(aug), "RandomCrop(%d, padding %d) + ", S,
                     c->data.crop_padding);
        if (c->data.flip) snprintf(aug + strlen(aug), sizeof aug - strlen(aug), "flip + ");
        if (c->data.randaugment && !idx)
            snprintf(aug + strlen(aug), sizeof aug - strlen(aug), "RandAugment(2, %d) + ",
                     c->data.randaugment_magnitude);
    }
    const char *tail = "ToTensor + Normalize (the dataset's mean and std)";
    if (imagenet) {
        if (c->data.augment)
            snprintf(train, n, "RandomResizedCrop(%d) + %s%s%s", S, c->data.flip ? "flip + " : "",
                     c->data.randaugment ? "RandAugment + " : "", tail);
        else
            snprintf(train, n, "Resize(%d) + CenterCrop(%d) + %s: the eval transform, because data.augment is false "
                     "(spec/data.md §2)", 256 * S / 224, S, tail);
        snprintf(eval, n, "Resize(%d) + CenterCrop(%d) + %s", 256 * S / 224, S, tail);
    } else {
        snprintf(train, n, "%s%s", aug, tail);
        snprintf(eval, n, "%s", tail);
    }
}

// Image counts of the standard splits (spec/data.md §1): what `check` plans with before any data is read.
static int standard_split(const char *dataset, int64_t *train, int64_t *eval) {
    static const struct {
        const char *name;
        int64_t train, eval;
    } sizes[] = {{"fashion-mnist", 60000, 10000}, {"mnist", 60000, 10000}, {"cifar10", 50000, 10000},
                 {"cifar100", 50000, 10000}, {"tiny-imagenet", 100000, 10000}, {"imagenet", 1281167, 50000}};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
        if (!strcmp(sizes[i].name, dataset)) {
            *train = sizes[i].train;
            *eval = sizes[i].eval;
            return 0;
        }
    return -1;
}

int config_standard_plan(const Config *cfg, int64_t *ntrain, int64_t *steps_per_epoch, int64_t *total_steps) {
    int64_t neval;
    if (standard_split(cfg->data.dataset, ntrain, &neval) != 0 || cfg->train.batch_size <= 0) return -1;
    if (cfg->data.train_limit > 0 && cfg->data.train_limit < *ntrain) *ntrain = cfg->data.train_limit;
    *steps_per_epoch = *ntrain / cfg->train.batch_size;
    *total_steps = cfg->train.steps > 0 ? cfg->train.steps : (int64_t)cfg->train.epochs * *steps_per_epoch;
    return 0;
}

// The model's size and the run's length on the dataset's standard split, so that a job can be sized before it is
// queued (the run itself counts the images it finds and prints its own numbers).
static void add_derived_plan(cJSON *derived, const Config *cfg) {
    ModelConfig mc = config_model(cfg);
    size_t trainable = 0, fixed = 0;
    if (model_param_counts(&mc, &trainable, &fixed) == 0) {
        cJSON_AddNumberToObject(derived, "params", (double)trainable);
        cJSON_AddNumberToObject(derived, "fixed_buffers", (double)fixed);
    }
    int64_t ntrain, full_train, neval, spe, T;
    if (config_standard_plan(cfg, &ntrain, &spe, &T) != 0 || standard_split(cfg->data.dataset, &full_train, &neval))
        return;
    if (cfg->data.eval_limit > 0 && cfg->data.eval_limit < neval) neval = cfg->data.eval_limit;
    cJSON *plan = cJSON_AddObjectToObject(derived, "standard_split");
    cJSON_AddNumberToObject(plan, "train_images", (double)ntrain);
    cJSON_AddNumberToObject(plan, "eval_images", (double)neval);
    cJSON_AddNumberToObject(plan, "steps_per_epoch", (double)spe);
    cJSON_AddNumberToObject(plan, "total_steps", (double)T);
    int64_t every = cfg->train.eval_every;
    int64_t evals = every > 0 ? T / every + (T % every != 0) : 1;
    cJSON_AddNumberToObject(plan, "evaluations", (double)(T > 0 ? evals : 0));
    cJSON_AddNumberToObject(plan, "train_images_seen", (double)T * cfg->train.batch_size);
}

char *config_to_json(const Config *cfg) {
    cJSON *root = cJSON_CreateObject();
    for (int i = 0; i < NKEYS; i++) {
        const KeySpec *k = &KEYS[i];
        char leaf[64];
        cJSON *sec = section_of(root, k->path, leaf, sizeof leaf);
        const char *src = (const char *)cfg + k->offset;
        char num[80];
        switch (k->type) {
        case KT_BOOL: cJSON_AddBoolToObject(sec, leaf, *(const int *)src); break;
        case KT_STR: cJSON_AddStringToObject(sec, leaf, src); break;
        case KT_INT: cJSON_AddNumberToObject(sec, leaf, *(const int *)src); break;
        case KT_I64:  // exact: cJSON's own number printing rounds to 15 digits
            snprintf(num, sizeof num, "%lld", (long long)*(const int64_t *)src);
            cJSON_AddRawToObject(sec, leaf, num);
            break;
        case KT_DOUBLE:
            snprintf(num, sizeof num, "%.17g", *(const double *)src);
            cJSON_AddRawToObject(sec, leaf, num);
            break;
        case KT_PAIR:
            snprintf(num, sizeof num, "[%.17g, %.17g]", ((const double *)src)[0], ((const double *)src)[1]);
            cJSON_AddRawToObject(sec, leaf, num);
            break;
        }
    }
    // Written for readers, ignored when the file is read back (check_unknown skips it).
    char tr[512], ev[512];
    describe_transforms(cfg, tr, ev, sizeof tr);
    cJSON *derived = cJSON_AddObjectToObject(root, "derived");
    cJSON_AddStringToObject(derived, "train_transform", tr);
    cJSON_AddStringToObject(derived, "eval_transform", ev);
    add_derived_plan(derived, cfg);
    char *s = cJSON_Print(root);
    cJSON_Delete(root);
    return s;
}

// Keys that a resumed run may change: where, how fast and how verbosely it runs, never what it computes. The data
// root may move (the loader state's fingerprint checks the data itself); the world size may change too.
static const char *const RESUME_FREE[] = {"run.",          "data.root",          "data.threads",
                                          "data.prefetch", "data.u8_batches",    "data.eval_batch_size",
                                          "data.eval_limit", "train.log_every",  "train.eval_every",
                                          "comm.timeout_s", "comm.overlap",      "model.recompute", "model.init_from", "model.init_skip",
                                          "shampoo.check_replicas"};

static int resume_free(const char *path) {
    for (size_t i = 0; i < sizeof RESUME_FREE / sizeof RESUME_FREE[0]; i++) {
        size_t n = strlen(RESUME_FREE[i]);
        if (RESUME_FREE[i][n - 1] == '.' ? !strncmp(path, RESUME_FREE[i], n) : !strcmp(path, RESUME_FREE[i]))
            return 1;
    }
    return 0;
}

// Exact equality of two config values: cJSON_Compare takes numbers within DBL_EPSILON (relative) as equal, and a
// last-bit change of a learning rate changes the run.
static int json_equal(const cJSON *a, const cJSON *b) {
    if (cJSON_IsNumber(a) && cJSON_IsNumber(b)) return a->valuedouble == b->valuedouble;
    if (cJSON_IsArray(a) && cJSON_IsArray(b)) {
        if (cJSON_GetArraySize(a) != cJSON_GetArraySize(b)) return 0;
        for (const cJSON *x = a->child, *y = b->child; x && y; x = x->next, y = y->next)
            if (!json_equal(x, y)) return 0;
        return 1;
    }
    return cJSON_Compare(a, b, 1);
}

int config_resume_check(const Config *cfg, const char *saved_json, const char *what, char *err, size_t n) {
    cJSON *saved = cJSON_Parse(saved_json);
    if (!saved || !cJSON_IsObject(saved)) {
        cJSON_Delete(saved);
        return set_err(err, n, "%s: the saved config is not a JSON object", what);
    }
    char *cur_text = config_to_json(cfg);
    cJSON *cur = cJSON_Parse(cur_text);
    free(cur_text);
    int rc = 0;
    for (int i = 0; i < NKEYS && rc == 0; i++) {
        const KeySpec *k = &KEYS[i];
        if (resume_free(k->path)) continue;
        const cJSON *a = get_path(saved, k->path), *b = get_path(cur, k->path);
        cJSON *def = NULL;
        if (!a && k->def) a = def = cJSON_Parse(k->def);  // written before the key existed: its default
        if (!a || !json_equal(a, b)) {
            char *sa = a ? cJSON_PrintUnformatted(a) : NULL, *sb = cJSON_PrintUnformatted(b);
            rc = set_err(err, n,
                         "config key '%s': %s was trained with %s, this config says %s (a resumed run must agree on "
                         "every key that changes training; set run.resume \"never\" to start a new run instead)",
                         k->path, what, sa ? sa : "no value", sb ? sb : "?");
            free(sa);
            free(sb);
        }
        cJSON_Delete(def);
    }
    cJSON_Delete(saved);
    cJSON_Delete(cur);
    return rc;
}

char *config_doc_markdown(void) {
    static const char *types[] = {"int", "int", "number", "bool", "string", "[number, number]"};
    StrBuf b = {0};
    sb_printf(&b, "# Config reference\n\n"
                  "Generated by `simplest-dist config-doc` from the key table in `src/config.c`; "
                  "`make test` checks that this file matches it.\n\n"
                  "A config is a JSON object of sections. Every key below is optional unless its default says "
                  "*required*. An unknown key, a wrong type or a value out of range stops the run with one line "
                  "naming the key and exit code 2. `--set key.path=value` overrides any key (the value is parsed as "
                  "JSON, else taken as a string). The effective config, with every key resolved, is written to "
                  "`<run.dir>/config.json`, with a top-level `derived` object that names the training and eval "
                  "transforms the data pipeline applies, counts the model's trainable parameters (`params`, spec/model.md "
                  "§10) and fixed buffers, and, for a dataset of known size, gives the run's length on its standard "
                  "split (`standard_split`: images, steps per epoch, total steps T, evaluations), so that "
                  "`simplest-dist check` sizes a job before it is queued (written for readers; ignored when the file "
                  "is read back, "
                  "e.g. by `simplest-dist eval`). A run that resumes from a checkpoint must agree with the saved "
                  "config on every key except those marked *may change when a run resumes* "
                  "(docs/checkpoints.md).\n");
    const char *section = "";
    size_t seclen = 0;
    for (int i = 0; i < NKEYS; i++) {
        const KeySpec *k = &KEYS[i];
        const char *dot = strchr(k->path, '.');
        size_t sl = (size_t)(dot - k->path);
        if (sl != seclen || strncmp(section, k->path, sl)) {
            section = k->path;
            seclen = sl;
            sb_printf(&b, "\n## `%.*s`\n\n| key | type | default | allowed | meaning |\n|---|---|---|---|---|\n",
                      (int)sl, k->path);
        }
        char allowed[160] = "";
        if (k->choices)
            snprintf(allowed, sizeof allowed, "%s", k->choices);
        else if (k->type != KT_BOOL && k->type != KT_STR)
            snprintf(allowed, sizeof allowed, "%g .. %g", k->min, k->max);
        for (char *p = allowed; *p; p++)
            if (*p == '|') *p = ',';
        sb_printf(&b, "| `%s` | %s | %s | %s | %s%s |\n", k->path, types[k->type], k->def ? k->def : "*required*",
                  allowed, k->doc, resume_free(k->path) ? " *(may change when a run resumes)*" : "");
    }
    return b.s;
}
