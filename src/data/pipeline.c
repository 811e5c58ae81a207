// pipeline.c: see pipeline.h. The transforms of spec/data.md §2, per dataset:
//   IDX        loader_image (random crop with padding + flip when data.augment; the core issue's behaviour)
//   CIFAR      RandomCrop(32, pad) -> flip -> RandAugment when augmenting, else the image as is
//   Tiny       decode -> RandomCrop(64, pad) -> flip -> RandAugment when augmenting, else the image as is
//   ImageNet   train: RandomResizedCrop(224) (crop-aware decode) -> flip -> RandAugment
//              eval, and training with augmentation off: Resize(256) -> CenterCrop(224)
// then ToTensor + Normalize. Every draw comes from the stream (seed, AUG, epoch, key index), in the order crop,
// flip, RandAugment (§5.3).
#include "data/pipeline.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "data/augment.h"
#include "util.h"

struct PipeWorker {
    JpegDecoder *dec;
    uint8_t *buf;  // the file being decoded
    size_t cap;
    Image dec_out, a, b, tmp;
    ResizeScratch rs;  // the resampler's buffers, kept between images
    int64_t warnings_seen;
    int u8;  // output uint8 (H, W, C) instead of normalized fp32 (C, H, W)
};

PipeWorker *pipe_worker_create(const Dataset *ds) {
    PipeWorker *w = xcalloc(sizeof *w, "pipeline worker");
    if (ds->paths) w->dec = jpeg_decoder_create(ds->opt.max_pixels, (size_t)512 << 20);
    return w;
}

void pipe_worker_free(PipeWorker *w) {
    if (!w) return;
    if (w->dec) jpeg_decoder_free(w->dec);
    free(w->buf);
    image_free(&w->dec_out);
    image_free(&w->a);
    image_free(&w->b);
    image_free(&w->tmp);
    resize_scratch_free(&w->rs);
    free(w);
}

// Copies the w x h window at (x, y) of src into dst.
static void crop_copy(const Image *src, int x, int y, int w, int h, Image *dst) {
    image_reserve(dst, w, h, src->c);
    for (int r = 0; r < h; r++)
        memcpy(dst->px + (size_t)r * dst->stride, src->px + (size_t)(y + r) * src->stride + (size_t)x * src->c,
               (size_t)w * src->c);
}

// Reads the whole file into w->buf.
static ImgStatus read_file(PipeWorker *w, const char *path, int64_t max_bytes, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return IMG_READ_ERROR;
    struct stat st;
    if (fstat(fileno(f), &st) != 0) {
        fclose(f);
        return IMG_READ_ERROR;
    }
    if (st.st_size == 0) {
        fclose(f);
        return IMG_EMPTY;
    }
    if (max_bytes > 0 && st.st_size > max_bytes) {
        fclose(f);
        return IMG_FILE_TOO_BIG;
    }
    size_t n = (size_t)st.st_size;
    if (n > w->cap) {
        free(w->buf);
        w->cap = n + n / 4;
        w->buf = xmalloc(w->cap, "file buffer");
    }
    size_t got = fread(w->buf, 1, n, f);
    fclose(f);
    if (got != n) return IMG_READ_ERROR;
    *len = n;
    return IMG_OK;
}

// Reads the file of src_idx and opens it as a JPEG: *W, *H are its size, the decoder waits for jpeg_read_crop.
static ImgStatus open_image(PipeWorker *w, const Dataset *ds, int64_t src_idx, int *W, int *H) {
    size_t len = 0;
    ImgStatus st = read_file(w, ds->paths[src_idx], ds->opt.max_file_bytes, &len);
    if (st != IMG_OK) return st;
    if ((st = img_sniff(w->buf, len)) != IMG_OK) return st;
    return jpeg_open(w->dec, w->buf, len, W, H);
}

// Decodes the file of src_idx whole (full scale) into w->a.
static ImgStatus decode_full(PipeWorker *w, const Dataset *ds, int64_t src_idx, int *W, int *H) {
    ImgStatus st = open_image(w, ds, src_idx, W, H);
    if (st != IMG_OK) return st;
    double box[4];
    int sd;
    st = jpeg_read_crop(w->dec, 0, 0, *W, *H, *W, *H, 0, &w->dec_out, box, &sd);
    if (st != IMG_OK) return st;
    crop_copy(&w->dec_out, (int)box[0], (int)box[1], *W, *H, &w->a);
    return IMG_OK;
}

// Crop (padding pad) -> flip -> RandAugment on w->a (size x size), per the options; the result is left in w->a.
static void small_augment(PipeWorker *w, const Dataset *ds, Rng *r, int size) {
    const DataOptions *o = &ds->opt;
    if (o->crop_padding > 0) {
        random_crop_pad(&w->a, size, o->crop_padding, r, &w->b);
        Image t = w->a;
        w->a = w->b;
        w->b = t;
    }
    if (o->flip && rng_uniform(r) < 0.5) hflip(&w->a);
    if (o->randaugment) randaugment(&w->a, r, o->ra_ops, o->ra_magnitude, 31, &w->tmp);
}

static void account_warnings(PipeWorker *w) {
    if (!w->dec) return;
    w->warnings_seen = jpeg_warning_count(w->dec);
}

void pipe_worker_set_u8(PipeWorker *w, int u8) { w->u8 = u8; }

// Where the final S x S RGB resize of a JPEG goes: uint8 output with nothing after the resize is written straight
// into the batch slot (direct), anything else into the worker's image a. *stride: the rows' stride.
static uint8_t *resize_target(PipeWorker *w, void *out, int S, int direct, size_t *stride) {
    if (direct) {
        *stride = (size_t)S * 3;
        return out;
    }
    image_reserve(&w->a, S, S, 3);
    *stride = (size_t)w->a.stride;
    return w->a.px;
}

ImgStatus pipe_image(PipeWorker *w, const Dataset *ds, int train, uint64_t seed, int64_t epoch, int64_t key_idx,
                     int64_t src_idx, void *out) {
    const DataOptions *o = &ds->opt;
    int aug = train && o->augment;
    if (ds->kind == DS_IDX) {
        AugmentConfig ac = {o->augment, o->crop_padding, o->flip};
        if (key_idx == src_idx) {
            if (w->u8)
                loader_image_u8(ds, src_idx, aug ? &ac : NULL, seed, epoch, out);
            else
                loader_image(ds, src_idx, aug ? &ac : NULL, seed, epoch, out);
            return IMG_OK;
        }
    }
    Rng r = rng_stream(seed, RNG_AUG, (uint64_t)epoch, (uint64_t)key_idx);
    ImgStatus st = IMG_OK;
    int S = ds->height;
    if (ds->pixels) {  // IDX (a substitute) and CIFAR: in memory
        Image view = {ds->width, ds->height, ds->channels, ds->width * ds->channels,
                      ds->pixels + (size_t)src_idx * ds->height * ds->width * ds->channels, 0};
        crop_copy(&view, 0, 0, view.w, view.h, &w->a);
        if (aug) small_augment(w, ds, &r, S);
    } else if (ds->kind == DS_TINY) {
        int W, H;
        if ((st = decode_full(w, ds, src_idx, &W, &H)) != IMG_OK) goto out;
        if (W != S || H != S) {  // TinyImageNet is 64x64; anything else is resized whole
            double box[4] = {0, 0, W, H};
            pil_resize_bilinear(&w->a, box, S, S, &w->b);
            Image t = w->a;
            w->a = w->b;
            w->b = t;
        }
        if (aug) small_augment(w, ds, &r, S);
    } else {  // ImageNet-style folder
        int W, H;
        if (aug) {
            if ((st = open_image(w, ds, src_idx, &W, &H)) != IMG_OK) goto out;
            int x, y, cw, ch, sd;
            rrc_params(&r, W, H, &x, &y, &cw, &ch);
            double box[4];
            Image crop;  // a view of the decoder's rows: no copy
            if ((st = jpeg_read_crop_view(w->dec, x, y, cw, ch, S, S, o->dct_scaling, &crop, box, &sd)) != IMG_OK)
                goto out;
            // The flip is drawn after the crop, as before the resize consumed no draws, and done by the resize
            // itself (mirrored coefficients: the bytes of resize + hflip). Without RandAugment, uint8 output is
            // written by the resize straight into out.
            int flip = o->flip && rng_uniform(&r) < 0.5, direct = w->u8 && !o->randaugment;
            size_t stride;
            uint8_t *dst = resize_target(w, out, S, direct, &stride);
            pil_resize_bilinear_to(&crop, box, S, S, flip, dst, stride, &w->rs);
            if (direct) goto out;
            if (o->randaugment) randaugment(&w->a, &r, o->ra_ops, o->ra_magnitude, 31, &w->tmp);
        } else {  // Resize(256) + CenterCrop(224)
            if ((st = open_image(w, ds, src_idx, &W, &H)) != IMG_OK) goto out;
            int rw, rh, cx, cy, rect[4], sd;
            resize_short_size(W, H, 256 * S / 224, &rw, &rh);
            center_crop_pos(rw, rh, S, &cx, &cy);
            // Only the source rows and columns the centre crop reads are decoded and resampled (spec/data.md §3.2):
            // the bytes of the whole image resized, then cropped.
            double whole[4] = {0, 0, W, H}, box[4];
            pil_resize_window_source(W, H, whole, rw, rh, cx, cy, S, S, &w->rs, rect);
            Image part;  // a view of the decoder's rows
            if ((st = jpeg_read_crop_view(w->dec, rect[0], rect[1], rect[2] - rect[0], rect[3] - rect[1], 0, 0, 0,
                                          &part, box, &sd)) != IMG_OK)
                goto out;
            size_t stride;
            uint8_t *dst = resize_target(w, out, S, w->u8, &stride);
            pil_resize_bilinear_window(&part, rect[0], rect[1], W, H, whole, rw, rh, cx, cy, S, S, dst, stride,
                                       &w->rs);
            if (w->u8) goto out;
        }
    }
    if (w->u8)
        image_to_hwc(&w->a, out);
    else
        normalize_chw(&w->a, ds->mean, ds->std, out);
out:
    account_warnings(w);
    return st;
}

void pipe_failures_init(PipeFailures *f, int64_t n) {
    memset(f, 0, sizeof *f);
    f->n = n;
    f->seen = xcalloc((size_t)(n + 8) / 8, "failure bitmap");
}

void pipe_failures_free(PipeFailures *f) {
    free(f->seen);
    f->seen = NULL;
}

int64_t pipe_failures_total(const PipeFailures *f) {
    int64_t t = 0;
    for (int i = 1; i < IMG_STATUS_COUNT; i++) t += __atomic_load_n(&f->counts[i], __ATOMIC_RELAXED);
    return t;
}

int pipe_sample(PipeWorker *w, const Dataset *ds, int train, uint64_t seed, int64_t epoch, int64_t idx, void *out,
                int32_t *label, PipeFailures *fails, char *err, size_t errlen) {
    int64_t warn0 = w->warnings_seen;
    for (int t = 0; t < 16; t++) {
        int64_t src = (idx + t) % ds->n;
        ImgStatus st = pipe_image(w, ds, train, seed, epoch, idx, src, out);
        if (w->warnings_seen > warn0) __atomic_fetch_add(&fails->warnings, w->warnings_seen - warn0, __ATOMIC_RELAXED);
        warn0 = w->warnings_seen;
        if (st == IMG_OK) {
            *label = ds->labels[src];
            return 0;
        }
        uint8_t bit = (uint8_t)(1u << (src & 7));
        if (!(__atomic_fetch_or(&fails->seen[src >> 3], bit, __ATOMIC_RELAXED) & bit)) {
            __atomic_fetch_add(&fails->counts[st], 1, __ATOMIC_RELAXED);
            if (!fails->quiet)
                fprintf(stderr, "simplest-dist: warning: skipping '%s' (%s); image %lld takes the next one\n",
                        ds->paths ? ds->paths[src] : "?", img_status_name(st), (long long)src);
        }
    }
    set_err(err, errlen, "data error: 16 consecutive images from index %lld ('%s' ... '%s') could not be decoded",
            (long long)idx, ds->paths ? ds->paths[idx] : "?", ds->paths ? ds->paths[(idx + 15) % ds->n] : "?");
    return -1;
}
