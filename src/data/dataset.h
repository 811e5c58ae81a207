// dataset.h: in-memory image datasets (IDX for MNIST and Fashion-MNIST) and the loader semantics of
// spec/data.md §5: seeded epoch permutations, world-size-independent global batches, per-image augmentation keyed
// by (seed, epoch, dataset index), normalization, exact eval sharding, and Mixup groups.
#pragma once
#include <stddef.h>
#include <stdint.h>

typedef struct {
    char name[32];
    int64_t n;  // images
    int channels, height, width, num_classes;
    uint8_t *pixels;  // (n, H, W, C) uint8
    int32_t *labels;  // (n)
    float mean[3], std[3];
} Dataset;

// Reads IDX images + labels (gzip or plain, through zlib). 0, or -1 with a one-line reason naming the file.
int dataset_load_idx(Dataset *ds, const char *images_path, const char *labels_path, char *err, size_t errlen);
// Opens the config's dataset split (train = 1: training split). limit > 0 keeps the first `limit` images.
int dataset_open(Dataset *ds, const char *name, const char *root, int train, int64_t limit, char *err,
                 size_t errlen);
void dataset_free(Dataset *ds);

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
