// loader.c: batch composition for in-memory datasets (spec/data.md §5). Every draw comes from a stream keyed by
// (seed, purpose, epoch or step, dataset index or group), never by rank, thread or time.
#include <math.h>
#include <stdlib.h>
#include <string.h>

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

void loader_image(const Dataset *ds, int64_t idx, const AugmentConfig *aug, uint64_t seed, int64_t epoch,
                  float *out) {
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
    for (int c = 0; c < C; c++) {
        float mean = ds->mean[c], std = ds->std[c];
        for (int y = 0; y < H; y++)
            for (int x = 0; x < W; x++) {
                int sy = y + oy, sx = (flip ? W - 1 - x : x) + ox;
                uint8_t u = (sy >= 0 && sy < H && sx >= 0 && sx < W) ? src[((size_t)sy * W + sx) * C + c] : 0;
                out[((size_t)c * H + y) * W + x] = ((float)u / 255.0f - mean) / std;  // ToTensor, then Normalize
            }
    }
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
