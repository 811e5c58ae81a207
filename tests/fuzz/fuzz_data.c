// fuzz_data.c: the dataset readers on arbitrary bytes. The first byte picks the reader; the rest is its file(s).
//   0: IDX images + labels (data/idx.c; gzip or plain): bytes 1-2 give the images file's length (little-endian),
//      the rest after it is the labels file
//   1: CIFAR-10 test_batch.bin, 2: CIFAR-100 test.bin (data/cifar.c)
//   3: TinyImageNet's val/val_annotations.txt (data/folder.c), with train classes n01 and n02
// An accepted dataset is consistent: labels inside 0 .. classes-1, and every image can be made (loader_image).
#include "data/dataset.h"
#include "fuzz.h"

static void check_dataset(const Dataset *d) {
    if (d->n <= 0 || d->num_classes <= 0) abort();
    for (int64_t i = 0; i < d->n; i++)
        if (d->labels[i] < 0 || d->labels[i] >= d->num_classes) {
            fprintf(stderr, "image %lld has label %d of %d classes\n", (long long)i, d->labels[i], d->num_classes);
            abort();
        }
    if (!d->pixels) return;
    float *img = malloc((size_t)d->channels * d->height * d->width * sizeof(float));
    AugmentConfig ac = {1, 4, 1};
    for (int64_t i = 0; i < d->n && i < 4; i++) loader_image(d, i, &ac, 1, 0, img);
    free(img);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    char a[300], b[300], err[1024] = "";
    Dataset d;
    int mode = data[0] % 4, rc;
    data++;
    size--;
    if (mode == 0) {
        if (size < 2) return 0;
        size_t ilen = (size_t)data[0] | (size_t)data[1] << 8;
        data += 2;
        size -= 2;
        ilen = ilen > size ? size : ilen;
        fuzz_write(fuzz_path(a, sizeof a, "images"), data, ilen);
        fuzz_write(fuzz_path(b, sizeof b, "labels"), data + ilen, size - ilen);
        rc = dataset_load_idx(&d, a, b, err, sizeof err);
    } else if (mode < 3) {
        fuzz_write(fuzz_path(a, sizeof a, mode == 1 ? "test_batch.bin" : "test.bin"), data, size);
        rc = dataset_load_cifar(&d, fuzz_dir(), mode == 2, 0, err, sizeof err);
        if (rc == 0) {
            d.kind = DS_CIFAR;
            data_options_default(&d.opt);
        }
    } else {
        static int made;
        if (!made) {  // root/train/<wnid>/images/ for the classes, root/val/images/ for the files named
            char cmd[1200];
            snprintf(cmd, sizeof cmd, "mkdir -p '%s/tiny/train/n01/images' '%s/tiny/train/n02/images' '%s/tiny/val/images'",
                     fuzz_dir(), fuzz_dir(), fuzz_dir());
            if (system(cmd) != 0) abort();
            made = 1;
        }
        fuzz_write(fuzz_path(a, sizeof a, "tiny/val/val_annotations.txt"), data, size);
        rc = dataset_load_tiny(&d, fuzz_path(b, sizeof b, "tiny"), 0, err, sizeof err);
    }
    if (rc == 0) {
        if (mode == 0) data_options_default(&d.opt);
        check_dataset(&d);
        dataset_free(&d);
    } else if (!err[0] || strchr(err, '\n')) {
        fprintf(stderr, "a refusal must be one line: '%s'\n", err);
        abort();
    }
    return 0;
}

#ifdef SD_FUZZ_STANDALONE
#include <zlib.h>
// Seeds: a valid file of each kind (IDX plain and gzip, CIFAR-10, CIFAR-100, an annotations file).
static void put_be32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24), p[1] = (uint8_t)(v >> 16), p[2] = (uint8_t)(v >> 8), p[3] = (uint8_t)v;
}

static void seed(const char *dir, const char *name, const uint8_t *b, size_t n) {
    char p[600];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    fuzz_write(p, b, n);
}

// gzip of n bytes into out (capacity cap); returns the length.
static size_t gz(const uint8_t *in, size_t n, uint8_t *out, size_t cap) {
    z_stream z = {0};
    if (deflateInit2(&z, 9, Z_DEFLATED, 31, 8, Z_DEFAULT_STRATEGY) != Z_OK) abort();
    z.next_in = (uint8_t *)in;
    z.avail_in = (uInt)n;
    z.next_out = out;
    z.avail_out = (uInt)cap;
    if (deflate(&z, Z_FINISH) != Z_STREAM_END) abort();
    size_t len = z.total_out;
    deflateEnd(&z);
    return len;
}

int fuzz_write_seeds(const char *dir) {
    enum { N = 3, R = 5, C = 4 };
    uint8_t img[16 + N * R * C], lab[8 + N], buf[4096], gi[1024], gl[256];
    put_be32(img, 0x803), put_be32(img + 4, N), put_be32(img + 8, R), put_be32(img + 12, C);
    for (int i = 0; i < N * R * C; i++) img[16 + i] = (uint8_t)(i * 37);
    put_be32(lab, 0x801), put_be32(lab + 4, N);
    for (int i = 0; i < N; i++) lab[8 + i] = (uint8_t)(i * 4);
    for (int g = 0; g < 2; g++) {  // plain, then both files gzip'd
        size_t il = sizeof img, ll = sizeof lab;
        const uint8_t *ip = img, *lp = lab;
        if (g) {
            il = gz(img, sizeof img, gi, sizeof gi), ll = gz(lab, sizeof lab, gl, sizeof gl);
            ip = gi, lp = gl;
        }
        buf[0] = 0, buf[1] = (uint8_t)il, buf[2] = (uint8_t)(il >> 8);
        memcpy(buf + 3, ip, il);
        memcpy(buf + 3 + il, lp, ll);
        seed(dir, g ? "idx_gzip" : "idx_plain", buf, 3 + il + ll);
    }
    static uint8_t cif[1 + 2 * 3074];
    for (int c100 = 0; c100 < 2; c100++) {
        size_t rec = c100 ? 3074 : 3073;
        cif[0] = (uint8_t)(1 + c100);
        for (size_t i = 0; i < 2 * rec; i++) cif[1 + i] = (uint8_t)(i * 13);
        for (int r = 0; r < 2; r++) cif[1 + r * rec] = (uint8_t)(r + 3), cif[1 + r * rec + c100] = (uint8_t)(r + 7);
        seed(dir, c100 ? "cifar100" : "cifar10", cif, 1 + 2 * rec);
    }
    const char ann[] = "\003val_0.JPEG\tn01\t0\t0\t63\t63\nval_1.JPEG\tn02\t1\t2\t40\t50\r\n";
    seed(dir, "tiny_annotations", (const uint8_t *)ann, sizeof ann - 1);
    return 0;
}
#endif
