// dataset.h: in-memory image datasets (IDX for MNIST and Fashion-MNIST) and the loader semantics of
// spec/data.md §5: seeded epoch permutations, world-size-independent global batches, per-image augmentation keyed
// by (seed, epoch, dataset index), normalization, exact eval sharding, and Mixup groups.
#pragma once
#include <stddef.h>
#include <stdint.h>

// The per-image transform (spec/data.md §2 table), chosen by the dataset.
typedef enum { DS_IDX = 0, DS_CIFAR, DS_TINY, DS_IMAGENET } DatasetKind;

// How images are made (data.* config keys; workers is data.threads); dataset_open sets the defaults, the trainer overrides them.
typedef struct {
    int augment;           // training augmentation on (data.augment); off = the eval transform (ImageNet)
    int crop_padding;      // RandomCrop padding (IDX, CIFAR, Tiny); 0 = no crop
    int flip;              // horizontal flip when augmenting
    int randaugment;       // RandAugment(2, magnitude) when augmenting (CIFAR, Tiny, ImageNet; never IDX)
    int ra_ops, ra_magnitude;
    int dct_scaling;       // training decodes may use 1/2, 1/4, 1/8 DCT scaling (data.jpeg.dct_scaling)
    int64_t max_file_bytes, max_pixels;
    int workers;           // decoder threads (0: the CPU affinity count - 2, at least 1)
    int prefetch;          // micro-batches the threads may run ahead
} DataOptions;

typedef struct {
    char name[32];
    DatasetKind kind;
    int64_t n;  // images
    int channels, height, width, num_classes;  // the output image (C, H, W) the pipeline produces
    uint8_t *pixels;  // record datasets: (n, H, W, C) uint8; NULL for folder datasets
    char **paths;     // folder datasets: (n) file paths; NULL for record datasets
    int64_t n_paths;  // paths allocated (n before a limit)
    int32_t *labels;  // (n)
    float mean[3], std[3];
    uint64_t fingerprint;  // hash of the ordered (key, label) list (spec/data.md §1.5)
    DataOptions opt;
} Dataset;

// Reads IDX images + labels (gzip or plain, through zlib). 0, or -1 with a one-line reason naming the file.
int dataset_load_idx(Dataset *ds, const char *images_path, const char *labels_path, char *err, size_t errlen);
// Opens the config's dataset split (train = 1: training split). limit > 0 keeps the first `limit` images.
// name: fashion-mnist | mnist | cifar10 | cifar100 | tiny-imagenet | imagenet.
int dataset_open(Dataset *ds, const char *name, const char *root, int train, int64_t limit, char *err,
                 size_t errlen);
void dataset_free(Dataset *ds);
void data_options_default(DataOptions *o);

// Readers (folder.c, cifar.c). Each fills ds (kind, shape, labels, pixels or paths, mean/std, fingerprint).
// CIFAR: `dir` holds data_batch_1..5.bin / test_batch.bin (cifar10) or train.bin / test.bin (cifar100, fine label).
int dataset_load_cifar(Dataset *ds, const char *dir, int cifar100, int train, char *err, size_t errlen);
// ImageFolder: dir/<class>/**/<file>.{jpeg,jpg,png} (any case); class = index of the sorted folder name; files in
// bytewise order of their path relative to the class folder.
int dataset_load_folder(Dataset *ds, const char *dir, char *err, size_t errlen);
// TinyImageNet-200 split at root (train or val), in the zip layout (train/<wnid>/images/, val/images/ +
// val/val_annotations.txt) or the class-folder layout; both give the same keys <wnid>/<wnid>_<k>.JPEG.
int dataset_load_tiny(Dataset *ds, const char *root, int train, char *err, size_t errlen);
// Key of sample i for the fingerprint and logs ("<class>/<file>" or "<file>#<record>").
uint64_t dataset_fingerprint_add(uint64_t h, const char *key, int32_t label);

// Epoch permutation P_e of 0..n-1: Fisher-Yates on the stream (seed, SHUFFLE, epoch).
void loader_permutation(uint64_t seed, int64_t epoch, int64_t n, int64_t *perm);

typedef struct {
    int augment;       // random crop (pad) + flip
    int crop_padding;  // 0: no crop
    int flip;
} AugmentConfig;

// Writes image idx, normalized, as (C, H, W) fp32 into out. With aug non-NULL it draws its crop and flip from the
// stream (seed, AUG, epoch, idx): the pixels depend only on (seed, epoch, idx).
void loader_image(const Dataset *ds, int64_t idx, const AugmentConfig *aug, uint64_t seed, int64_t epoch,
                  float *out);
// The same image before ToTensor + Normalize: uint8 (H, W, C), the padding 0.
void loader_image_u8(const Dataset *ds, int64_t idx, const AugmentConfig *aug, uint64_t seed, int64_t epoch,
                     uint8_t *out);

// Fills a training micro-batch: global positions [pos0, pos0 + count) of epoch `epoch`'s permutation, as images
// (count, C, H, W) and one-hot targets (count, num_classes).
void loader_train_batch(const Dataset *ds, const int64_t *perm, int64_t epoch, int64_t pos0, int count,
                        const AugmentConfig *aug, uint64_t seed, float *images, float *targets, int32_t *labels);

// Eval shard of rank r among world: indices [floor(r n / world), floor((r + 1) n / world)).
void loader_eval_shard(int64_t n, int rank, int world, int64_t *begin, int64_t *end);

// Mixup over consecutive groups of g images (spec/data.md §2.3): group k draws lambda = min(z, 1 - z) with
// z ~ Beta(alpha, alpha) and a permutation from the stream (seed, MIXUP, step, group0 + k). images (count, F) and
// targets (count, C) are mixed in place. Returns the mean lambda (for logs).
double mixup_apply(float *images, float *targets, int count, size_t img_elems, int classes, int g, double alpha,
                   uint64_t seed, uint64_t step, uint64_t group0);

// ---------------------------------------------------------------- the threaded loader (spec/data.md §5)
// A pool of decoder threads fills a bounded ring of `prefetch` micro-batch buffers, allocated through the caller's
// allocator (the backend's alloc_host: pinned on CUDA). A batch is a pure function of its plan position, so the
// number of threads and their timing never change its bits.
typedef void *(*LoaderAllocFn)(void *ctx, size_t bytes, const char *what);
typedef void (*LoaderFreeFn)(void *ctx, void *p);

typedef struct {
    const Dataset *ds;
    int train;  // 1: training plan (permutations, augmentation); 0: eval plan (this rank's shard, in order)
    uint64_t seed;
    // training plan: micro-batch q = (k - 1) accum + mi of optimizer step k takes global positions
    // s B + rank B / world + mi micro + [0, micro) of epoch e's permutation, e = (k - 1) / spe, s = (k - 1) % spe
    int global_batch, world, rank, accum, micro;
    int64_t steps_per_epoch;
    // eval plan: indices [begin, end) in batches of `micro` (the last one short)
    int64_t begin, end;
    int workers, prefetch;
    int local_world;  // ranks on this node (0 or 1: this process alone): workers 0 then takes this rank's share
    // micro-batches before the one requested that stay in the ring (0 or 1: the one the caller may still copy out;
    // accum when a step's micro-batches are requested again, as SAM's second pass does: no re-decode then)
    int keep;
    LoaderAllocFn alloc;  // NULL: malloc
    LoaderFreeFn free;
    void *alloc_ctx;
    int quiet;  // no log lines for skipped files
    int u8;     // batches as uint8 (count, H, W, C), 4x smaller, normalized by the consumer (loader_get_u8)
} LoaderConfig;

typedef struct Loader Loader;
typedef struct PipeFailures PipeFailures;  // data/pipeline.h

Loader *loader_create(const LoaderConfig *cfg);
void loader_destroy(Loader *l);
// Micro-batch q of the plan (training: (k - 1) accum + mi; eval: 0, 1, ...): waits until every slot has reported
// and returns its images (count, C, H, W) and labels (count). The pointers stay valid until the loader_get after
// the next one (the trainer uploads a batch while it fetches the next: see train.c, load_slot).
// Any q works (a repeated or earlier one is rebuilt); the ring then runs ahead from q. Exits with a data error
// (exit 2) after 16 consecutive failures of one slot.
int loader_get(Loader *l, int64_t q, const float **images, const int32_t **labels);
// The same for a loader with cfg.u8: images (count, H, W, C) uint8 before ToTensor + Normalize.
int loader_get_u8(Loader *l, int64_t q, const uint8_t **images, const int32_t **labels);
// Micro-batches in the eval plan.
int64_t loader_eval_batches(const Loader *l);
double loader_wait_s(const Loader *l);            // time loader_get spent waiting for the threads
const PipeFailures *loader_failures(const Loader *l);
int loader_threads(const Loader *l);
int64_t loader_rebuilds(const Loader *l);  // jumps outside the ring (a resume, a step repeated beyond `keep`)

// Loader state for exact resume (spec §5.5): where the training plan stands. Prefetched batches are not part of it.
typedef struct {
    int64_t epoch, step_in_epoch;  // the next step to train
    uint64_t seed;
    int64_t global_batch;
    uint64_t fingerprint;
    int64_t failures;
} LoaderState;
// State before optimizer step k (1-based).
LoaderState loader_state_at(const Loader *l, int64_t k);
// Checks a saved state against this loader (seed, B and fingerprint must match; any world size): the step k to
// resume at, or -1 with err set.
int64_t loader_state_resume(const Loader *l, const LoaderState *s, char *err, size_t errlen);
int loader_state_write(const char *path, const LoaderState *s);
int loader_state_read(const char *path, LoaderState *s, char *err, size_t errlen);
