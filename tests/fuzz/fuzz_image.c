// fuzz_image.c: one image file through the loader's decode path (data/pipeline.c, data/jpeg.c) on arbitrary bytes:
//   - ImageNet training: RandomResizedCrop by a partial decode (DCT scaling on and off), flip, RandAugment, as fp32
//     and as the uint8 batch the resize writes directly;
//   - ImageNet eval: Resize + CenterCrop from the rows and columns the crop reads;
//   - TinyImageNet: a whole decode resized to 64 x 64;
//   - jpeg_read_crop on a crop rectangle drawn from the input, whose pixels must equal the same rectangle of a
//     whole decode at the scale the crop chose (jpeg.h's promise), for files that decode without a warning.
// An image either comes out, every byte written, the same on a second call and on a worker that has decoded no other
// file, or is skipped with a reason (the same one each time).
#include "data/jpeg.h"
#include "data/pipeline.h"
#include "fuzz.h"
#include "rng.h"

#define NDS 3
static Dataset ds[NDS];  // ImageNet at 96 and at 40 px, TinyImageNet at 64
static PipeWorker *pw[NDS];
static JpegDecoder *dec;
static char *img_path;
static float *out;     // an image made twice, over two different fillings of its buffer
static uint8_t *out2;

static void setup(void) {
    if (dec) return;
    char p[300];
    img_path = strdup(fuzz_path(p, sizeof p, "img.JPEG"));
    const int sizes[NDS] = {96, 40, 64};
    for (int i = 0; i < NDS; i++) {
        Dataset *d = &ds[i];
        d->kind = i == 2 ? DS_TINY : DS_IMAGENET;
        d->n = d->n_paths = 1;
        d->channels = 3;
        d->height = d->width = sizes[i];
        d->num_classes = 1;
        d->paths = &img_path;
        static int32_t label0;
        d->labels = &label0;
        for (int c = 0; c < 3; c++) d->mean[c] = 0.5f, d->std[c] = 0.25f;
        data_options_default(&d->opt);
        d->opt.augment = 1;
        d->opt.max_pixels = (int64_t)4 << 20;  // small enough that the fuzzer also meets the limit
        d->opt.dct_scaling = i == 1;
        d->opt.randaugment = i != 1;
        pw[i] = pipe_worker_create(d);
    }
    dec = jpeg_decoder_create((int64_t)4 << 20, (size_t)256 << 20);
    out = malloc((size_t)96 * 96 * 3 * sizeof(float));
    out2 = malloc((size_t)96 * 96 * 3 * sizeof(float));
}

static void check_crop(const uint8_t *data, size_t size) {
    int W, H;
    if (jpeg_open(dec, data, size, &W, &H) != IMG_OK) return;
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < size; i++) h = (h ^ data[i]) * 1099511628211ULL;
    Rng r = rng_stream(h, 1, 2, 3);
    int cw = 1 + (int)(rng_uniform(&r) * W), ch = 1 + (int)(rng_uniform(&r) * H);
    cw = cw > W ? W : cw;
    ch = ch > H ? H : ch;
    int x = (int)(rng_uniform(&r) * (W - cw + 1)), y = (int)(rng_uniform(&r) * (H - ch + 1));
    x = x > W - cw ? W - cw : x;
    y = y > H - ch ? H - ch : y;
    int min_w = 1 + (int)(rng_uniform(&r) * cw), min_h = 1 + (int)(rng_uniform(&r) * ch);
    Image crop = {0}, full = {0};
    double box[4], fbox[4];
    int sd = 0, fsd = 0;
    int64_t warn0 = jpeg_warning_count(dec);
    ImgStatus s = jpeg_read_crop(dec, x, y, cw, ch, min_w, min_h, 1, &crop, box, &sd);
    if (s == IMG_OK) {
        if (box[0] < 0 || box[1] < 0 || box[2] > crop.w + 1e-9 || box[3] > crop.h + 1e-9 || box[2] <= box[0] ||
            box[3] <= box[1] || crop.c != 3) {
            fprintf(stderr, "crop %d,%d %dx%d of %dx%d: box (%g %g %g %g) outside the %dx%d output\n", x, y, cw, ch,
                    W, H, box[0], box[1], box[2], box[3], crop.w, crop.h);
            abort();
        }
        // The whole image at the crop's scale: the smallest scale whose output covers W/sd x H/sd (floor) is sd
        // itself, as long as W and H are at least sd (a ceiling would make W not a multiple of sd pick a larger one).
        int64_t warn1 = jpeg_warning_count(dec);
        if (warn1 == warn0 && jpeg_open(dec, data, size, &W, &H) == IMG_OK) {
            int fw = W / sd > 0 ? W / sd : 1, fh = H / sd > 0 ? H / sd : 1;
            s = jpeg_read_crop(dec, 0, 0, W, H, fw, fh, 1, &full, fbox, &fsd);
            if (s == IMG_OK && fsd == sd && jpeg_warning_count(dec) == warn1) {
                int x0 = x / sd, y0 = y / sd;  // out covers [floor(x/s), ceil((x+cw)/s)) in this implementation
                for (int row = 0; row < crop.h; row++) {
                    if (y0 + row >= full.h || x0 + crop.w > full.w) {
                        fprintf(stderr, "crop output %dx%d at (%d,%d) passes the %dx%d image at 1/%d\n", crop.w,
                                crop.h, x0, y0, full.w, full.h, sd);
                        abort();
                    }
                    if (memcmp(crop.px + (size_t)row * crop.stride,
                               full.px + (size_t)(y0 + row) * full.stride + (size_t)x0 * 3, (size_t)crop.w * 3)) {
                        fprintf(stderr, "crop %d,%d %dx%d of %dx%d at 1/%d: row %d differs from the whole decode\n",
                                x, y, cw, ch, W, H, sd, row);
                        abort();
                    }
                }
            }
        }
    }
    image_free(&crop);
    image_free(&full);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    setup();
    fuzz_write(img_path, data, size);
    for (int i = 0; i < NDS; i++) {
        int S = ds[i].height;
        // A worker that has seen no other file: the image must not depend on what pw[i] decoded before.
        PipeWorker *fresh = pipe_worker_create(&ds[i]);
        for (int mode = 0; mode < 3; mode++) {  // train fp32, train uint8, eval fp32
            int train = mode < 2, u8 = mode == 1;
            if (i == 2 && mode == 1) continue;
            size_t bytes = (size_t)S * S * 3 * (u8 ? 1 : sizeof(float));
            pipe_worker_set_u8(pw[i], u8);
            memset(out, 0xA5, bytes);
            ImgStatus st = pipe_image(pw[i], &ds[i], train, 7, 1, 0, 0, out);
            memset(out2, 0x5A, bytes);
            ImgStatus st2 = pipe_image(pw[i], &ds[i], train, 7, 1, 0, 0, out2);
            if ((int)st < 0 || st >= IMG_STATUS_COUNT || st2 != st) {
                fprintf(stderr, "dataset %d mode %d: status %d, then %d\n", i, mode, (int)st, (int)st2);
                abort();
            }
            // Every byte written, and a pure function of the file and the key: the two fillings must not show.
            if (st == IMG_OK && memcmp(out, out2, bytes) != 0) {
                fprintf(stderr, "dataset %d mode %d: the output depends on the buffer's old contents\n", i, mode);
                abort();
            }
            pipe_worker_set_u8(fresh, u8);
            memset(out2, 0x3C, bytes);
            ImgStatus st3 = pipe_image(fresh, &ds[i], train, 7, 1, 0, 0, out2);
            if (st3 != st || (st == IMG_OK && memcmp(out, out2, bytes) != 0)) {
                fprintf(stderr, "dataset %d mode %d: status %d, %d on a fresh worker; the output depends on the files "
                        "the worker decoded before\n", i, mode, (int)st, (int)st3);
                abort();
            }
        }
        pipe_worker_free(fresh);
    }
    check_crop(data, size);
    return 0;
}

#ifdef SD_FUZZ_STANDALONE
int fuzz_write_seeds(const char *dir) {
    (void)dir;
    return 0;  // the JPEG seeds come from tests/fuzz/make_jpeg_seeds.py
}
#endif
