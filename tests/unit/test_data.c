// test_data.c: the IDX reader (src/data/idx.c) and the loader (src/data/loader.c) against spec/data.md §1.4, §5
// and §6. IDX fixtures (plain and gzip, good and broken) are generated here under a mkdtemp directory; the real
// Fashion-MNIST is checked when Debian's dataset-fashion-mnist is installed. Loader properties are checked on small
// in-memory datasets: normalization bits, augmentation geometry, per-image determinism, one-hot targets, and the
// world-size independence of the global batch sequence.
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "data/dataset.h"
#include "rng.h"
#include "testlib.h"
#include "util.h"

#define FMNIST_ROOT "/usr/share/datasets/fashion-mnist"

static char g_dir[256];

// ---------------------------------------------------------------- IDX fixtures

static void put_be32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

// Writes an IDX file: magic, ndims dims, then payload (plain, or gzip through zlib's gzwrite).
static void write_idx(const char *path, int gz, uint32_t magic, const uint32_t *dims, int ndims,
                      const unsigned char *payload, size_t len) {
    unsigned char hdr[16];
    put_be32(hdr, magic);
    for (int i = 0; i < ndims; i++) put_be32(hdr + 4 + 4 * i, dims[i]);
    size_t hlen = 4 + 4 * (size_t)ndims;
    if (gz) {
        gzFile f = gzopen(path, "wb");
        if (!f || gzwrite(f, hdr, (unsigned)hlen) != (int)hlen ||
            (len && gzwrite(f, payload, (unsigned)len) != (int)len) || gzclose(f) != Z_OK) {
            fprintf(stderr, "cannot write %s\n", path);
            exit(1);
        }
    } else {
        FILE *f = fopen(path, "wb");
        if (!f || fwrite(hdr, 1, hlen, f) != hlen || (len && fwrite(payload, 1, len, f) != len) || fclose(f) != 0) {
            fprintf(stderr, "cannot write %s\n", path);
            exit(1);
        }
    }
}

// A fixture: n images of rows x cols with deterministic pixels, and labels i % 10.
typedef struct {
    uint32_t n, rows, cols;
    unsigned char *pix, *lab;
} Fixture;

static Fixture make_fixture(uint32_t n, uint32_t rows, uint32_t cols) {
    Fixture f = {n, rows, cols, malloc((size_t)n * rows * cols + 64), malloc(n + 64)};
    Rng r = rng_stream(7, 1, 2, 3);
    for (size_t i = 0; i < (size_t)n * rows * cols + 64; i++) f.pix[i] = (unsigned char)rng_below(&r, 256);
    for (uint32_t i = 0; i < n + 64; i++) f.lab[i] = (unsigned char)(i % 10);
    return f;
}

static void fixture_free(Fixture *f) {
    free(f->pix);
    free(f->lab);
}

static void path_in(char *out, size_t n, const char *name) { snprintf(out, n, "%s/%s", g_dir, name); }

// Writes images and labels of fx to <dir>/<img>, <dir>/<lab>.
static void write_pair(const Fixture *fx, const char *img, int img_gz, const char *lab, int lab_gz, char *ip,
                       char *lp, size_t n) {
    path_in(ip, n, img);
    path_in(lp, n, lab);
    uint32_t idims[3] = {fx->n, fx->rows, fx->cols}, ldims[1] = {fx->n};
    write_idx(ip, img_gz, 0x00000803, idims, 3, fx->pix, (size_t)fx->n * fx->rows * fx->cols);
    write_idx(lp, lab_gz, 0x00000801, ldims, 1, fx->lab, fx->n);
}

static int one_line(const char *s) { return s[0] != 0 && strchr(s, '\n') == NULL; }

// Expects dataset_load_idx to fail with one line naming `name1` (and `name2` if non-NULL).
static void expect_load_err_at(int line, const char *ip, const char *lp, const char *name1, const char *name2) {
    Dataset d;
    char e[2048] = "";
    int rc = dataset_load_idx(&d, ip, lp, e, sizeof e);
    if (rc == 0) dataset_free(&d);
    int ok = rc == -1 && one_line(e) && strstr(e, name1) && (!name2 || strstr(e, name2));
    if (!ok) {
        tl_state.case_failures++;
        printf("    %s:%d: dataset_load_idx rc %d, message [%s]; want -1 and one line naming %s%s%s\n", __FILE__, line,
               rc, e, name1, name2 ? " and " : "", name2 ? name2 : "");
    }
}
#define EXPECT_LOAD_ERR(ip, lp, name1, name2) expect_load_err_at(__LINE__, (ip), (lp), (name1), (name2))

static void check_loaded(const Dataset *d, const Fixture *fx) {
    EXPECT(d->n == fx->n, "n %lld", (long long)d->n);
    EXPECT(d->height == (int)fx->rows && d->width == (int)fx->cols && d->channels == 1, "dims %dx%dx%d", d->height,
           d->width, d->channels);
    EXPECT(d->num_classes == 10, "classes %d", d->num_classes);
    if (d->n == fx->n) {
        EXPECT(memcmp(d->pixels, fx->pix, (size_t)fx->n * fx->rows * fx->cols) == 0, "pixels differ");
        int lab_ok = 1;
        for (uint32_t i = 0; i < fx->n; i++) lab_ok &= d->labels[i] == fx->lab[i];
        EXPECT(lab_ok, "labels differ");
    }
}

static void truncate_file(const char *path, long keep) {
    if (truncate(path, keep) != 0) {
        perror(path);
        exit(1);
    }
}

static long file_size(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return -1;
    fseek(f, 0, SEEK_END);
    long s = ftell(f);
    fclose(f);
    return s;
}

static void test_idx(void) {
    char ip[600], lp[600];
    Fixture fx = make_fixture(37, 5, 7);  // non-square on purpose: rows 5, cols 7
    TEST_CASE("idx: plain files") {
        write_pair(&fx, "plain-img", 0, "plain-lab", 0, ip, lp, sizeof ip);
        Dataset d;
        char err[2048] = "";
        int rc = dataset_load_idx(&d, ip, lp, err, sizeof err);
        EXPECT(rc == 0, "%s", err);
        if (rc == 0) {
            check_loaded(&d, &fx);
            dataset_free(&d);
        }
    }
    TEST_CASE("idx: gzip files (and gzip images with plain labels)") {
        write_pair(&fx, "gz-img.gz", 1, "gz-lab.gz", 1, ip, lp, sizeof ip);
        Dataset d;
        char err[2048] = "";
        int rc = dataset_load_idx(&d, ip, lp, err, sizeof err);
        EXPECT(rc == 0, "%s", err);
        if (rc == 0) {
            check_loaded(&d, &fx);
            dataset_free(&d);
        }
        write_pair(&fx, "mix-img.gz", 1, "mix-lab", 0, ip, lp, sizeof ip);
        rc = dataset_load_idx(&d, ip, lp, err, sizeof err);
        EXPECT(rc == 0, "%s", err);
        if (rc == 0) {
            check_loaded(&d, &fx);
            dataset_free(&d);
        }
    }
    TEST_CASE("idx: bad image magic names the image file") {
        for (int gz = 0; gz < 2; gz++) {
            write_pair(&fx, gz ? "badmag-img.gz" : "badmag-img", gz, "badmag-lab", 0, ip, lp, sizeof ip);
            uint32_t dims[3] = {fx.n, fx.rows, fx.cols};
            write_idx(ip, gz, 0x00000801, dims, 3, fx.pix, (size_t)fx.n * fx.rows * fx.cols);  // the label magic
            EXPECT_LOAD_ERR(ip, lp, ip, NULL);
            write_idx(ip, gz, 0x00000903, dims, 3, fx.pix, (size_t)fx.n * fx.rows * fx.cols);  // wrong type byte
            EXPECT_LOAD_ERR(ip, lp, ip, NULL);
        }
    }
    TEST_CASE("idx: bad label magic names the label file") {
        write_pair(&fx, "badlab-img", 0, "badlab-lab.gz", 1, ip, lp, sizeof ip);
        uint32_t dims[1] = {fx.n};
        write_idx(lp, 1, 0x00000803, dims, 1, fx.lab, fx.n);
        EXPECT_LOAD_ERR(ip, lp, lp, NULL);
    }
    TEST_CASE("idx: count mismatch between images and labels names both files") {
        write_pair(&fx, "cnt-img", 0, "cnt-lab", 0, ip, lp, sizeof ip);
        uint32_t dims[1] = {fx.n - 1};
        write_idx(lp, 0, 0x00000801, dims, 1, fx.lab, fx.n - 1);
        EXPECT_LOAD_ERR(ip, lp, ip, lp);
    }
    TEST_CASE("idx: truncated image data names the image file") {
        write_pair(&fx, "trunc-img", 0, "trunc-lab", 0, ip, lp, sizeof ip);
        truncate_file(ip, 16 + (long)fx.n * fx.rows * fx.cols - 3);
        EXPECT_LOAD_ERR(ip, lp, ip, NULL);
        truncate_file(ip, 10);  // inside the header
        EXPECT_LOAD_ERR(ip, lp, ip, NULL);
        truncate_file(ip, 0);  // empty file
        EXPECT_LOAD_ERR(ip, lp, ip, NULL);
    }
    TEST_CASE("idx: a 100-byte file whose header claims 2^20 images of 256x256 (64 GiB) is a truncation naming it, "
              "read without allocating the claim (address space limited to 2 GiB)") {
        uint32_t big[3] = {1u << 20, 256, 256}, nl[1] = {1u << 20};
        unsigned char payload[100] = {0};
        path_in(ip, sizeof ip, "huge-img");
        path_in(lp, sizeof lp, "huge-lab");
        for (int gz = 0; gz < 2; gz++) {
            write_idx(ip, gz, 0x00000803, big, 3, payload, sizeof payload);
            write_idx(lp, 0, 0x00000801, nl, 1, payload, 10);
            fflush(NULL);
            pid_t pid = fork();
            if (pid == 0) {
#ifndef __SANITIZE_ADDRESS__  // ASan's shadow memory needs terabytes of address space (its allocator caught this)
                struct rlimit rl = {(rlim_t)2 << 30, (rlim_t)2 << 30};
                setrlimit(RLIMIT_AS, &rl);  // an allocation of the claim fails here: DIE, exit 1
#endif
                Dataset d;
                char e[2048] = "";
                int rc = dataset_load_idx(&d, ip, lp, e, sizeof e);
                _exit(rc == -1 && one_line(e) && strstr(e, ip) && strstr(e, "truncated") ? 0 : 3);
            }
            int status = 0;
            waitpid(pid, &status, 0);
            EXPECT(WIFEXITED(status) && WEXITSTATUS(status) == 0, "%s: child status %d (a DIE, status 6 or exit 1: the claim was "
                   "allocated; exit 3: the wrong error)", gz ? "gzip" : "plain", status);
        }
    }
    TEST_CASE("idx: truncated gzip stream names the file") {
        write_pair(&fx, "truncgz-img.gz", 1, "truncgz-lab.gz", 1, ip, lp, sizeof ip);
        truncate_file(ip, file_size(ip) / 2);
        EXPECT_LOAD_ERR(ip, lp, ip, NULL);
        write_pair(&fx, "truncgz2-img.gz", 1, "truncgz2-lab.gz", 1, ip, lp, sizeof ip);
        truncate_file(lp, 20);  // inside the deflate data of the labels
        EXPECT_LOAD_ERR(ip, lp, lp, NULL);
    }
    // Regression: a .gz cut inside its 8-byte CRC/ISIZE trailer inflates every data byte; zlib reports "unexpected
    // end of file" only through gzerror after the last read, which the reader must check.
    {
        char ip2[600], lp2[600], ip3[600], lp3[600];
        write_pair(&fx, "notrailer-img.gz", 1, "notrailer-lab.gz", 1, ip2, lp2, sizeof ip2);
        truncate_file(ip2, file_size(ip2) - 8);  // the CRC-32 and ISIZE trailer
        write_pair(&fx, "badcrc-img.gz", 1, "badcrc-lab.gz", 1, ip3, lp3, sizeof ip3);
        FILE *f = fopen(lp3, "r+b");
        fseek(f, -8, SEEK_END);
        int c = fgetc(f);
        fseek(f, -8, SEEK_END);
        fputc(c ^ 0x5a, f);  // corrupt the stored CRC-32
        fclose(f);
        Dataset d;
        char e[2048];
        int rc2 = dataset_load_idx(&d, ip2, lp2, e, sizeof e);
        if (rc2 == 0) dataset_free(&d);
        int rc3 = dataset_load_idx(&d, ip3, lp3, e, sizeof e);
        if (rc3 == 0) dataset_free(&d);
        TEST_CASE("idx: a gzip file without its trailer or with a bad CRC is an error naming the file") {
            EXPECT_LOAD_ERR(ip2, lp2, ip2, NULL);
            EXPECT_LOAD_ERR(ip3, lp3, lp3, NULL);
        }
    }
    TEST_CASE("idx: truncated label data names the label file") {
        write_pair(&fx, "truncl-img", 0, "truncl-lab", 0, ip, lp, sizeof ip);
        truncate_file(lp, 8 + (long)fx.n - 1);
        EXPECT_LOAD_ERR(ip, lp, lp, NULL);
    }
    TEST_CASE("idx: a file longer than its header says names the file") {
        write_pair(&fx, "long-img", 0, "long-lab", 0, ip, lp, sizeof ip);
        uint32_t idims[3] = {fx.n, fx.rows, fx.cols}, ldims[1] = {fx.n};
        write_idx(ip, 0, 0x00000803, idims, 3, fx.pix, (size_t)fx.n * fx.rows * fx.cols + 1);
        EXPECT_LOAD_ERR(ip, lp, ip, NULL);
        write_pair(&fx, "long2-img.gz", 1, "long2-lab.gz", 1, ip, lp, sizeof ip);
        write_idx(lp, 1, 0x00000801, ldims, 1, fx.lab, fx.n + 5);
        EXPECT_LOAD_ERR(ip, lp, lp, NULL);
    }
    TEST_CASE("idx: a missing file is named") {
        write_pair(&fx, "miss-img", 0, "miss-lab", 0, ip, lp, sizeof ip);
        char none[600];
        path_in(none, sizeof none, "no-such-file");
        EXPECT_LOAD_ERR(none, lp, none, NULL);
        EXPECT_LOAD_ERR(ip, none, none, NULL);
        path_in(none, sizeof none, "no-such-file.gz");
        EXPECT_LOAD_ERR(ip, none, none, NULL);
    }
    TEST_CASE("idx: a label above 9 names the label file") {
        write_pair(&fx, "lab10-img", 0, "lab10-lab", 0, ip, lp, sizeof ip);
        unsigned char *lab = malloc(fx.n);
        memcpy(lab, fx.lab, fx.n);
        lab[fx.n - 1] = 10;
        uint32_t dims[1] = {fx.n};
        write_idx(lp, 0, 0x00000801, dims, 1, lab, fx.n);
        EXPECT_LOAD_ERR(ip, lp, lp, NULL);
        lab[fx.n - 1] = 255;
        write_idx(lp, 0, 0x00000801, dims, 1, lab, fx.n);
        EXPECT_LOAD_ERR(ip, lp, lp, NULL);
        free(lab);
    }
    TEST_CASE("idx: zero images is an error naming the file") {
        Fixture z = fx;
        z.n = 0;
        write_pair(&z, "zero-img", 0, "zero-lab", 0, ip, lp, sizeof ip);
        EXPECT_LOAD_ERR(ip, lp, ip, NULL);
    }
    TEST_CASE("dataset_open: split file names, .gz or plain, limit, normalization constants") {
        char sub[600];
        path_in(sub, sizeof sub, "root");
        mkdir_p(sub);
        Fixture te = make_fixture(13, 28, 28), tr = make_fixture(50, 28, 28);
        char a[700], b[700];
        uint32_t tri[3] = {tr.n, 28, 28}, trl[1] = {tr.n}, tei[3] = {te.n, 28, 28}, tel[1] = {te.n};
        snprintf(a, sizeof a, "%s/train-images-idx3-ubyte.gz", sub);
        write_idx(a, 1, 0x803, tri, 3, tr.pix, (size_t)tr.n * 784);
        snprintf(a, sizeof a, "%s/train-labels-idx1-ubyte.gz", sub);
        write_idx(a, 1, 0x801, trl, 1, tr.lab, tr.n);
        snprintf(a, sizeof a, "%s/t10k-images-idx3-ubyte", sub);  // plain, no .gz
        write_idx(a, 0, 0x803, tei, 3, te.pix, (size_t)te.n * 784);
        snprintf(b, sizeof b, "%s/t10k-labels-idx1-ubyte", sub);
        write_idx(b, 0, 0x801, tel, 1, te.lab, te.n);
        int64_t limits[] = {0, 1, 20, 50, 1000};
        int64_t want[] = {50, 1, 20, 50, 50};
        for (int i = 0; i < 5; i++) {
            Dataset d;
            char err[2048] = "";
            int rc = dataset_open(&d, "fashion-mnist", sub, 1, limits[i], err, sizeof err);
            EXPECT(rc == 0, "train limit %lld: %s", (long long)limits[i], err);
            if (rc) continue;
            EXPECT(d.n == want[i], "limit %lld: n %lld, want %lld", (long long)limits[i], (long long)d.n,
                   (long long)want[i]);
            int same = memcmp(d.pixels, tr.pix, (size_t)d.n * 784) == 0;
            for (int64_t k = 0; k < d.n; k++) same &= d.labels[k] == tr.lab[k];
            EXPECT(same, "limit %lld: the first images/labels differ", (long long)limits[i]);
            EXPECT(d.mean[0] == 0.2860f && d.std[0] == 0.3530f, "fashion-mnist mean/std %g/%g", d.mean[0],
                   d.std[0]);
            dataset_free(&d);
        }
        Dataset d;
        char err[2048] = "";
        int rc = dataset_open(&d, "mnist", sub, 0, 0, err, sizeof err);
        EXPECT(rc == 0, "t10k: %s", err);
        if (rc == 0) {
            EXPECT(d.n == 13 && d.height == 28 && d.width == 28, "t10k n %lld", (long long)d.n);
            EXPECT(d.mean[0] == 0.1307f && d.std[0] == 0.3081f, "mnist mean/std %g/%g", d.mean[0], d.std[0]);
            dataset_free(&d);
        }
        // An empty root names the missing file.
        char empty[600];
        path_in(empty, sizeof empty, "empty-root");
        mkdir_p(empty);
        rc = dataset_open(&d, "fashion-mnist", empty, 1, 0, err, sizeof err);
        EXPECT(rc == -1 && one_line(err) && strstr(err, empty) && strstr(err, "train-images-idx3-ubyte"), "[%s]",
               err);
        fixture_free(&te);
        fixture_free(&tr);
    }
    fixture_free(&fx);
}

static void test_fashion_mnist(void) {
    char probe[256];
    snprintf(probe, sizeof probe, "%s/train-images-idx3-ubyte.gz", FMNIST_ROOT);
    if (!path_exists(probe)) {
        printf("ok - fashion-mnist: 60,000 + 10,000 images, 6,000 / 1,000 per class # SKIP %s not installed\n",
               FMNIST_ROOT);
        return;
    }
    TEST_CASE("fashion-mnist: 60,000 + 10,000 images, 6,000 / 1,000 per class") {
        for (int train = 1; train >= 0; train--) {
            Dataset d;
            char err[2048] = "";
            int rc = dataset_open(&d, "fashion-mnist", FMNIST_ROOT, train, 0, err, sizeof err);
            EXPECT(rc == 0, "%s", err);
            if (rc) continue;
            int64_t want = train ? 60000 : 10000;
            EXPECT(d.n == want, "n %lld, want %lld", (long long)d.n, (long long)want);
            EXPECT(d.height == 28 && d.width == 28 && d.channels == 1 && d.num_classes == 10, "dims %dx%dx%d/%d",
                   d.height, d.width, d.channels, d.num_classes);
            int64_t counts[10] = {0};
            for (int64_t i = 0; i < d.n; i++)
                if (d.labels[i] >= 0 && d.labels[i] < 10) counts[d.labels[i]]++;
            for (int c = 0; c < 10; c++)
                EXPECT(counts[c] == want / 10, "%s class %d: %lld images", train ? "train" : "test", c,
                       (long long)counts[c]);
            if (train) {  // the normalization constants are this split's pixel mean and std (spec/data.md §2)
                double s = 0, s2 = 0;
                size_t np = (size_t)d.n * 784;
                for (size_t i = 0; i < np; i++) {
                    double v = d.pixels[i] / 255.0;
                    s += v;
                    s2 += v * v;
                }
                double mean = s / np, sd = sqrt(s2 / np - mean * mean);
                EXPECT_NEAR(mean, d.mean[0], 5e-4);
                EXPECT_NEAR(sd, d.std[0], 5e-4);
            }
            dataset_free(&d);
        }
    }
}

// ---------------------------------------------------------------- in-memory datasets for the loader

// n images of h x w x c, pixels in [lo, 255] from a fixed stream; labels from the same stream.
static Dataset mem_dataset(int64_t n, int h, int w, int c, int lo) {
    Dataset d;
    memset(&d, 0, sizeof d);
    snprintf(d.name, sizeof d.name, "synthetic");
    d.n = n;
    d.height = h;
    d.width = w;
    d.channels = c;
    d.num_classes = 10;
    d.pixels = malloc((size_t)n * h * w * c);
    d.labels = malloc((size_t)n * sizeof(int32_t));
    Rng r = rng_stream(11, 22, 33, 44);
    for (size_t i = 0; i < (size_t)n * h * w * c; i++) d.pixels[i] = (uint8_t)(lo + rng_below(&r, 256 - lo));
    for (int64_t i = 0; i < n; i++) d.labels[i] = (int32_t)rng_below(&r, 10);
    for (int k = 0; k < 3; k++) {
        d.mean[k] = 0.2860f + 0.01f * k;
        d.std[k] = 0.3530f - 0.02f * k;
    }
    return d;
}

// What the image should be, built the torchvision way: zero-pad by p, crop H x W at (p + oy, p + ox), mirror.
static void reference_image(const Dataset *d, int64_t idx, int p, int oy, int ox, int flip, float *out) {
    int H = d->height, W = d->width, C = d->channels, PH = H + 2 * p, PW = W + 2 * p;
    uint8_t *padded = calloc((size_t)PH * PW * C, 1);
    const uint8_t *src = d->pixels + (size_t)idx * H * W * C;
    for (int y = 0; y < H; y++)
        for (int x = 0; x < W; x++)
            for (int c = 0; c < C; c++)
                padded[((size_t)(y + p) * PW + x + p) * C + c] = src[((size_t)y * W + x) * C + c];
    uint8_t *crop = malloc((size_t)H * W * C);
    for (int y = 0; y < H; y++)
        for (int x = 0; x < W; x++)
            for (int c = 0; c < C; c++)
                crop[((size_t)y * W + x) * C + c] = padded[((size_t)(y + p + oy) * PW + x + p + ox) * C + c];
    for (int c = 0; c < C; c++)
        for (int y = 0; y < H; y++)
            for (int x = 0; x < W; x++) {
                uint8_t u = crop[((size_t)y * W + (flip ? W - 1 - x : x)) * C + c];
                volatile float t = (float)u / 255.0f;  // ToTensor: fp32 divide, then Normalize: subtract, divide
                volatile float v = t - d->mean[c];
                out[((size_t)c * H + y) * W + x] = v / d->std[c];
            }
    free(padded);
    free(crop);
}

static int same_bits(const float *a, const float *b, size_t n) { return memcmp(a, b, n * sizeof(float)) == 0; }

static void test_normalization(void) {
    TEST_CASE("loader_image: ((u/255f) - mean)/std bitwise, CHW, no augmentation") {
        // Every uint8 value appears: 16x16 image with 3 channels of distinct orders.
        Dataset d = mem_dataset(2, 16, 16, 3, 0);
        for (int i = 0; i < 256; i++)
            for (int c = 0; c < 3; c++) d.pixels[(size_t)i * 3 + c] = (uint8_t)(c == 1 ? 255 - i : (i * (c + 1)) & 255);
        size_t img = 16 * 16 * 3;
        float *got = malloc(img * sizeof(float)), *want = malloc(img * sizeof(float));
        for (int64_t idx = 0; idx < 2; idx++) {
            reference_image(&d, idx, 0, 0, 0, 0, want);
            loader_image(&d, idx, NULL, 123, 0, got);
            EXPECT(same_bits(got, want, img), "image %lld (aug NULL) differs", (long long)idx);
            AugmentConfig off = {0, 4, 1};
            loader_image(&d, idx, &off, 123, 5, got);
            EXPECT(same_bits(got, want, img), "image %lld (augment false) differs", (long long)idx);
            AugmentConfig noop = {1, 0, 0};
            loader_image(&d, idx, &noop, 123, 5, got);
            EXPECT(same_bits(got, want, img), "image %lld (augment with no crop, no flip) differs", (long long)idx);
        }
        // Spot values: u = 0 and u = 255 of channel 0.
        Dataset g = mem_dataset(1, 1, 2, 1, 0);
        g.pixels[0] = 0;
        g.pixels[1] = 255;
        g.mean[0] = 0.2860f;
        g.std[0] = 0.3530f;
        float two[2];
        loader_image(&g, 0, NULL, 0, 0, two);
        volatile float m = 0.2860f, s = 0.3530f, z = 0.0f / 255.0f, one = 255.0f / 255.0f;
        float w0 = (z - m) / s, w1 = (one - m) / s;
        EXPECT(two[0] == w0 && two[1] == w1, "got %.9g %.9g want %.9g %.9g", two[0], two[1], w0, w1);
        dataset_free(&g);
        dataset_free(&d);
        free(got);
        free(want);
    }
}

// Finds the (oy, ox, flip) within +-pad whose reference image equals out; returns the number of matches.
static int match_geometry(const Dataset *d, int64_t idx, int pad, const float *out, int *oy, int *ox, int *flip) {
    size_t img = (size_t)d->channels * d->height * d->width;
    float *ref = malloc(img * sizeof(float));
    int matches = 0;
    for (int f = 0; f < 2; f++)
        for (int y = -pad; y <= pad; y++)
            for (int x = -pad; x <= pad; x++) {
                reference_image(d, idx, pad, y, x, f, ref);
                if (same_bits(ref, out, img)) {
                    matches++;
                    *oy = y;
                    *ox = x;
                    *flip = f;
                }
            }
    free(ref);
    return matches;
}

static void test_augmentation(void) {
    // Pixels in [1, 255]: a 0 before normalization can only come from the padding.
    Dataset d = mem_dataset(64, 12, 10, 1, 1);
    size_t img = (size_t)d.height * d.width;
    float *out = malloc(img * sizeof(float));
    const int pad = 4;
    AugmentConfig aug = {1, pad, 1};
    const uint64_t seed = 3407;
    TEST_CASE("augment: crop offsets in range, padding reads as 0, the draws of spec/data.md §5.3") {
        int seen_y[9] = {0}, seen_x[9] = {0}, seen_flip[2] = {0}, bad_match = 0, bad_pad = 0, bad_draw = 0;
        const float zero_norm = (0.0f / 255.0f - d.mean[0]) / d.std[0];
        for (int64_t e = 0; e < 3; e++)
            for (int64_t idx = 0; idx < d.n; idx++) {
                loader_image(&d, idx, &aug, seed, e, out);
                int oy = 99, ox = 99, fl = 0;
                int m = match_geometry(&d, idx, pad, out, &oy, &ox, &fl);
                if (m != 1) {
                    bad_match++;
                    continue;
                }
                seen_y[oy + pad] = seen_x[ox + pad] = 1;
                seen_flip[fl] = 1;
                int zeros = 0;
                for (size_t i = 0; i < img; i++) zeros += out[i] == zero_norm;
                int inside = (d.height - abs(oy)) * (d.width - abs(ox));
                bad_pad += zeros != (int)img - inside;
                // RandomCrop draws i then j uniform in {0..2p}; the flip is uniform < 0.5 (spec/data.md §2.1, §5.3).
                Rng r = rng_stream(seed, RNG_AUG, (uint64_t)e, (uint64_t)idx);
                int i = (int)rng_below(&r, 2 * pad + 1), j = (int)rng_below(&r, 2 * pad + 1);
                int f = rng_uniform(&r) < 0.5;
                bad_draw += i - pad != oy || j - pad != ox || f != fl;
            }
        EXPECT(bad_match == 0, "%d images match no (or several) crop/flip within +-%d", bad_match, pad);
        EXPECT(bad_pad == 0, "%d images whose zero-pixel count is not the padded area", bad_pad);
        EXPECT(bad_draw == 0, "%d images whose crop/flip is not the spec's draw from (seed, AUG, epoch, idx)",
               bad_draw);
        for (int k = 0; k < 9; k++) EXPECT(seen_y[k] && seen_x[k], "offset %d never drawn (y %d, x %d)", k - pad,
                                           seen_y[k], seen_x[k]);
        EXPECT(seen_flip[0] && seen_flip[1], "flip never %s", seen_flip[0] ? "on" : "off");
    }
    TEST_CASE("augment: flip alone mirrors each row") {
        AugmentConfig flip_only = {1, 0, 1};
        float *plain = malloc(img * sizeof(float));
        int flipped = 0, kept = 0, other = 0;
        for (int64_t idx = 0; idx < d.n; idx++) {
            loader_image(&d, idx, NULL, 0, 0, plain);
            loader_image(&d, idx, &flip_only, seed, 1, out);
            int is_same = same_bits(out, plain, img), is_mirror = 1;
            for (int y = 0; y < d.height; y++)
                for (int x = 0; x < d.width; x++)
                    is_mirror &= out[y * d.width + x] == plain[y * d.width + (d.width - 1 - x)];
            kept += is_same;
            flipped += is_mirror && !is_same;
            other += !is_same && !is_mirror;
        }
        EXPECT(other == 0, "%d images are neither the original nor its mirror", other);
        EXPECT(kept > 0 && flipped > 0, "kept %d flipped %d of %lld", kept, flipped, (long long)d.n);
        AugmentConfig crop_only = {1, pad, 0};
        int bad = 0;
        for (int64_t idx = 0; idx < d.n; idx++) {
            loader_image(&d, idx, &crop_only, seed, 1, out);
            int oy = 0, ox = 0, fl = 0;
            bad += match_geometry(&d, idx, pad, out, &oy, &ox, &fl) != 1 || fl != 0;
        }
        EXPECT(bad == 0, "%d crop-only images are flipped or not a crop", bad);
        free(plain);
    }
    TEST_CASE("augment: pixels depend only on (seed, epoch, idx)") {
        // Reference: each image alone, in ascending order.
        float *ref = malloc((size_t)d.n * 3 * img * sizeof(float));
        for (int64_t e = 0; e < 3; e++)
            for (int64_t idx = 0; idx < d.n; idx++)
                loader_image(&d, idx, &aug, seed, e, ref + ((size_t)e * d.n + idx) * img);
        // Reverse order, epochs interleaved.
        int bad = 0;
        for (int64_t idx = d.n - 1; idx >= 0; idx--)
            for (int64_t e = 2; e >= 0; e--) {
                loader_image(&d, idx, &aug, seed, e, out);
                bad += !same_bits(out, ref + ((size_t)e * d.n + idx) * img, img);
            }
        EXPECT(bad == 0, "%d images changed with the call order", bad);
        // Through loader_train_batch in batches of different composition (a custom order, odd batch sizes, and
        // 1 or several OpenMP threads).
        int64_t *perm = malloc((size_t)d.n * sizeof(int64_t));
        for (int64_t i = 0; i < d.n; i++) perm[i] = (i * 37 + 5) % d.n;  // 37 is coprime with 64
        float *imgs = malloc((size_t)d.n * img * sizeof(float)), *tg = malloc((size_t)d.n * 10 * sizeof(float));
        int sizes[] = {1, 7, 13, 64};
        bad = 0;
        for (int t = 1; t <= 3; t += 2) {
#ifdef _OPENMP
            omp_set_num_threads(t);
#endif
            for (int si = 0; si < 4; si++) {
                int bsz = sizes[si];
                for (int64_t pos = 0; pos + bsz <= d.n; pos += bsz) {
                    loader_train_batch(&d, perm, 2, pos, bsz, &aug, seed, imgs, tg, NULL);
                    for (int i = 0; i < bsz; i++)
                        bad += !same_bits(imgs + (size_t)i * img, ref + ((size_t)2 * d.n + perm[pos + i]) * img, img);
                }
            }
        }
#ifdef _OPENMP
        omp_set_num_threads(omp_get_num_procs());
#endif
        EXPECT(bad == 0, "%d images differ between loader_train_batch and loader_image", bad);
        // The key matters: another seed or epoch changes some images.
        int diff_seed = 0, diff_epoch = 0;
        for (int64_t idx = 0; idx < d.n; idx++) {
            loader_image(&d, idx, &aug, seed + 1, 0, out);
            diff_seed += !same_bits(out, ref + (size_t)idx * img, img);
            diff_epoch += !same_bits(ref + (size_t)idx * img, ref + ((size_t)d.n + idx) * img, img);
        }
        EXPECT(diff_seed > d.n / 2, "only %d of %lld images change with the seed", diff_seed, (long long)d.n);
        EXPECT(diff_epoch > d.n / 2, "only %d of %lld images change with the epoch", diff_epoch, (long long)d.n);
        free(perm);
        free(imgs);
        free(tg);
        free(ref);
    }
    free(out);
    dataset_free(&d);
}

static void test_batches(void) {
    TEST_CASE("loader_permutation: a permutation, deterministic, keyed by seed and epoch") {
        const int64_t n = 1000;
        int64_t *p = malloc(n * sizeof(int64_t)), *q = malloc(n * sizeof(int64_t));
        char *seen = calloc(n, 1);
        loader_permutation(42, 3, n, p);
        int ok = 1;
        for (int64_t i = 0; i < n; i++) {
            ok &= p[i] >= 0 && p[i] < n && !seen[p[i]];
            if (p[i] >= 0 && p[i] < n) seen[p[i]] = 1;
        }
        EXPECT(ok, "not a permutation of 0..%lld", (long long)n - 1);
        loader_permutation(42, 3, n, q);
        EXPECT(memcmp(p, q, n * sizeof(int64_t)) == 0, "same key, different permutation");
        loader_permutation(42, 4, n, q);
        EXPECT(memcmp(p, q, n * sizeof(int64_t)) != 0, "epochs 3 and 4 give the same permutation");
        loader_permutation(43, 3, n, q);
        EXPECT(memcmp(p, q, n * sizeof(int64_t)) != 0, "seeds 42 and 43 give the same permutation");
        int fixed = 0;
        for (int64_t i = 0; i < n; i++) fixed += p[i] == i;
        EXPECT(fixed < 20, "%d fixed points: not shuffled", fixed);
        int64_t one;
        loader_permutation(1, 0, 1, &one);
        EXPECT(one == 0, "n = 1");
        free(p);
        free(q);
        free(seen);
    }
    TEST_CASE("loader_train_batch: images and one-hot targets of the right labels") {
        Dataset d = mem_dataset(50, 6, 6, 1, 0);
        size_t img = 36;
        int64_t *perm = malloc(50 * sizeof(int64_t));
        loader_permutation(9, 1, 50, perm);
        AugmentConfig aug = {1, 2, 1};
        float *imgs = malloc(20 * img * sizeof(float)), *tg = malloc(20 * 10 * sizeof(float)), *one = malloc(img * 4);
        int32_t labels[20];
        memset(tg, 0x7f, 20 * 10 * sizeof(float));  // garbage that must be overwritten
        loader_train_batch(&d, perm, 1, 17, 20, &aug, 9, imgs, tg, labels);
        int bad_t = 0, bad_l = 0, bad_i = 0;
        for (int i = 0; i < 20; i++) {
            int64_t idx = perm[17 + i];
            for (int c = 0; c < 10; c++) bad_t += tg[i * 10 + c] != (c == d.labels[idx] ? 1.0f : 0.0f);
            bad_l += labels[i] != d.labels[idx];
            loader_image(&d, idx, &aug, 9, 1, one);
            bad_i += !same_bits(one, imgs + i * img, img);
        }
        EXPECT(bad_t == 0, "%d target entries are not one-hot of the label", bad_t);
        EXPECT(bad_l == 0, "%d labels differ", bad_l);
        EXPECT(bad_i == 0, "%d images differ from loader_image of perm[pos]", bad_i);
        loader_train_batch(&d, perm, 1, 0, 20, NULL, 9, imgs, tg, NULL);  // labels may be NULL, aug may be NULL
        bad_t = 0;
        for (int i = 0; i < 20; i++)
            for (int c = 0; c < 10; c++) bad_t += tg[i * 10 + c] != (c == d.labels[perm[i]] ? 1.0f : 0.0f);
        EXPECT(bad_t == 0, "NULL labels: %d bad target entries", bad_t);
        free(perm);
        free(imgs);
        free(tg);
        free(one);
        dataset_free(&d);
    }
    TEST_CASE("sharding: rank sub-slices concatenate to the world-1 batch bitwise, world 1/2/3/4/8") {
        // N = 250, B = 48: 5 steps per epoch, 10 images dropped; checked over 2 epochs with augmentation on.
        Dataset d = mem_dataset(250, 8, 8, 1, 0);
        const int B = 48, steps = (int)(d.n / B), K = 10;
        const size_t img = 64;
        const uint64_t seed = 77;
        AugmentConfig aug = {1, 3, 1};
        int64_t *perm = malloc((size_t)d.n * sizeof(int64_t));
        float *g_img = malloc((size_t)B * img * sizeof(float)), *g_tg = malloc((size_t)B * K * sizeof(float));
        float *r_img = malloc((size_t)B * img * sizeof(float)), *r_tg = malloc((size_t)B * K * sizeof(float));
        int worlds[] = {1, 2, 3, 4, 8}, bad_bits = 0, bad_cover = 0, bad_idx = 0;
        for (int64_t e = 0; e < 2; e++) {
            loader_permutation(seed, e, d.n, perm);
            char *covered = calloc((size_t)d.n, 1);
            for (int s = 0; s < steps; s++) {
                loader_train_batch(&d, perm, e, (int64_t)s * B, B, &aug, seed, g_img, g_tg, NULL);
                for (int i = 0; i < B; i++) {
                    bad_cover += covered[perm[(int64_t)s * B + i]];
                    covered[perm[(int64_t)s * B + i]] = 1;
                }
                for (int wi = 0; wi < 5; wi++) {
                    int W = worlds[wi];
                    for (int A = 1; A <= 2; A++) {
                        if (B % (W * A)) continue;
                        int b = B / (W * A);
                        memset(r_img, 0xff, (size_t)B * img * sizeof(float));
                        // Index arithmetic: rank r's slice [sB + rB/W, sB + (r+1)B/W) as A micro-batches of b.
                        int64_t next = (int64_t)s * B;
                        for (int r = 0; r < W; r++)
                            for (int mi = 0; mi < A; mi++) {
                                int64_t pos = (int64_t)s * B + (int64_t)r * (B / W) + (int64_t)mi * b;
                                bad_idx += pos != next;
                                next = pos + b;
                                int64_t off = pos - (int64_t)s * B;
                                loader_train_batch(&d, perm, e, pos, b, &aug, seed, r_img + off * img,
                                                   r_tg + off * K, NULL);
                            }
                        bad_idx += next != (int64_t)(s + 1) * B;
                        if (!same_bits(r_img, g_img, (size_t)B * img) || !same_bits(r_tg, g_tg, (size_t)B * K)) {
                            bad_bits++;
                            printf("    epoch %lld step %d world %d accum %d: batch differs\n", (long long)e, s, W, A);
                        }
                    }
                }
            }
            int64_t ncov = 0;
            for (int64_t i = 0; i < d.n; i++) ncov += covered[i];
            EXPECT(ncov == (int64_t)steps * B, "epoch %lld covers %lld distinct indices, want %d", (long long)e,
                   (long long)ncov, steps * B);
            free(covered);
        }
        EXPECT(bad_bits == 0, "%d (epoch, step, world, accum) batches differ from world 1", bad_bits);
        EXPECT(bad_idx == 0, "%d rank slices are not contiguous and disjoint", bad_idx);
        EXPECT(bad_cover == 0, "%d indices repeat within an epoch", bad_cover);
        free(perm);
        free(g_img);
        free(g_tg);
        free(r_img);
        free(r_tg);
        dataset_free(&d);
    }
    TEST_CASE("eval shards cover every index exactly once") {
        int64_t ns[] = {1, 7, 1001, 10000, 60001};
        int bad = 0;
        for (int ni = 0; ni < 5; ni++)
            for (int W = 1; W <= 8; W++) {
                int64_t expect_begin = 0, min = INT64_MAX, max = 0;
                for (int r = 0; r < W; r++) {
                    int64_t b, e;
                    loader_eval_shard(ns[ni], r, W, &b, &e);
                    bad += b != expect_begin || e < b;
                    expect_begin = e;
                    min = e - b < min ? e - b : min;
                    max = e - b > max ? e - b : max;
                }
                bad += expect_begin != ns[ni] || max - min > 1;
            }
        EXPECT(bad == 0, "%d shard layouts are not an exact, balanced partition", bad);
    }
    TEST_CASE("mixup: lambda <= 0.5, soft targets sum to 1, fixed group is world-size independent") {
        const int B = 32, K = 10, g = 8;
        const size_t F = 12;
        float *img = malloc(B * F * sizeof(float)), *tg = calloc(B * K, sizeof(float));
        float *img0 = malloc(B * F * sizeof(float)), *tg0 = malloc(B * K * sizeof(float));
        Rng r = rng_stream(1, 2, 3, 4);
        for (int i = 0; i < B; i++) {
            for (size_t f = 0; f < F; f++) img[i * F + f] = (float)rng_normal(&r);
            tg[i * K + (int)rng_below(&r, K)] = 1.0f;
        }
        memcpy(img0, img, B * F * sizeof(float));
        memcpy(tg0, tg, B * K * sizeof(float));
        double lam = mixup_apply(img, tg, B, F, K, g, 0.2, 5, 17, 0);
        EXPECT(lam >= 0.0 && lam <= 0.5, "mean lambda %g", lam);
        int bad = 0;
        for (int i = 0; i < B; i++) {
            double s = 0;
            for (int c = 0; c < K; c++) s += tg[i * K + c];
            bad += fabs(s - 1.0) > 1e-6;
        }
        EXPECT(bad == 0, "%d soft targets do not sum to 1", bad);
        // The same mix computed as W ranks, each mixing its own B/W slice with group offset pos/g.
        for (int W = 2; W <= 4; W *= 2) {
            float *wi = malloc(B * F * sizeof(float)), *wt = malloc(B * K * sizeof(float));
            memcpy(wi, img0, B * F * sizeof(float));
            memcpy(wt, tg0, B * K * sizeof(float));
            int b = B / W;
            for (int rk = 0; rk < W; rk++)
                mixup_apply(wi + (size_t)rk * b * F, wt + (size_t)rk * b * K, b, F, K, g, 0.2, 5, 17,
                            (uint64_t)(rk * b / g));
            EXPECT(same_bits(wi, img, B * F) && same_bits(wt, tg, B * K), "world %d: mixed batch differs", W);
            free(wi);
            free(wt);
        }
        free(img);
        free(tg);
        free(img0);
        free(tg0);
    }
}

int main(void) {
    snprintf(g_dir, sizeof g_dir, "/tmp/test_data.XXXXXX");
    if (!mkdtemp(g_dir)) {
        perror("mkdtemp");
        return 1;
    }
    test_idx();
    test_fashion_mnist();
    test_normalization();
    test_augmentation();
    test_batches();
    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", g_dir);
    return tl_finish();
}
