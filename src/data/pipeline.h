// pipeline.h: one image from its dataset index to the normalized (C, H, W) fp32 the model takes, per dataset and
// split (spec/data.md §2 table): decode (JPEG datasets), crop / RandomResizedCrop / Resize + CenterCrop, flip,
// RandAugment, ToTensor + Normalize. Randomness comes only from the stream (seed, AUG, epoch, key index). Images
// that cannot be decoded are skipped, counted by reason and replaced by the next dataset index (§5.4).
#pragma once
#include <stdint.h>

#include "data/dataset.h"
#include "data/jpeg.h"

// Per-thread state: a JPEG decoder, the file buffer and scratch images. Never shared between threads.
typedef struct PipeWorker PipeWorker;

PipeWorker *pipe_worker_create(const Dataset *ds);
void pipe_worker_free(PipeWorker *w);
// Output of pipe_image / pipe_sample: 0 (the default) normalized (C, H, W) fp32; 1 uint8 (H, W, C) before ToTensor
// and Normalize (the loader's uint8 batches; normalize_u8_hwc or the backend's images_from_u8 finish them).
void pipe_worker_set_u8(PipeWorker *w, int u8);

// Makes image src_idx of ds with the transform of the split (train: the training transform when ds->opt.augment)
// and the draws of stream (seed, AUG, epoch, key_idx), into out (C, H, W). IMG_OK, or why it was skipped.
ImgStatus pipe_image(PipeWorker *w, const Dataset *ds, int train, uint64_t seed, int64_t epoch, int64_t key_idx,
                     int64_t src_idx, void *out);

// Failure bookkeeping shared by the threads of one dataset: each failing index is counted (by reason) and logged
// once per run.
typedef struct PipeFailures {
    int64_t counts[IMG_STATUS_COUNT];  // distinct failing files by reason (counts[IMG_OK] unused)
    int64_t warnings;                  // corrupt-data warnings of images used anyway
    uint8_t *seen;                     // (n + 7) / 8 bits: index already counted
    int64_t n;
    int quiet;                         // no log lines (tests)
} PipeFailures;

void pipe_failures_init(PipeFailures *f, int64_t n);
void pipe_failures_free(PipeFailures *f);
int64_t pipe_failures_total(const PipeFailures *f);

// Slot with key idx: image idx, or the substitute (idx + 1) mod n, (idx + 2), ... with idx's AUG key. Writes the
// image and the label actually used. 0, or -1 after 16 consecutive failures (a data error; err names the files).
int pipe_sample(PipeWorker *w, const Dataset *ds, int train, uint64_t seed, int64_t epoch, int64_t idx, void *out,
                int32_t *label, PipeFailures *fails, char *err, size_t errlen);
