// test_loader.c: the dataset readers (ImageFolder, TinyImageNet both layouts, CIFAR-10/100) on fixtures written
// here, and the threaded loader (spec/data.md §5, §6): sharding at world sizes 1, 2, 3, eval exactly once, bits
// independent of the thread count, exact resume from the loader state, and a corrupt-file corpus that trains on.
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <turbojpeg.h>
#include <unistd.h>

#include "data/dataset.h"
#include "backend.h"
#include "data/augment.h"
#include "data/pipeline.h"
#include "prepare.h"
#include "testlib.h"
#include "util.h"

static char g_dir[512];

static void put_file(const char *path, const void *data, size_t n) {
    char dir[1024];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash) {
        *slash = 0;
        mkdir_p(dir);
    }
    FILE *f = fopen(path, "wb");
    if (!f) { perror(path); exit(1); }
    if (n) fwrite(data, 1, n, f);
    fclose(f);
}

// A w x h RGB JPEG (4:2:0, quality 90) with a pattern seeded by `seed`; the caller frees *out with tjFree.
static unsigned long make_jpeg(int w, int h, int seed, unsigned char **out) {
    unsigned char *rgb = malloc((size_t)w * h * 3);
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++)
            for (int c = 0; c < 3; c++) rgb[((size_t)y * w + x) * 3 + c] = (unsigned char)(x * 7 + y * 3 + c * 50 + seed * 31);
    tjhandle tj = tjInitCompress();
    unsigned long size = 0;
    *out = NULL;
    if (tjCompress2(tj, rgb, w, 0, h, TJPF_RGB, out, &size, TJSAMP_420, 90, 0) != 0) {
        fprintf(stderr, "tjCompress2: %s\n", tjGetErrorStr2(tj));
        exit(1);
    }
    tjDestroy(tj);
    free(rgb);
    return size;
}

static void put_jpeg(const char *path, int w, int h, int seed) {
    unsigned char *j;
    unsigned long n = make_jpeg(w, h, seed, &j);
    put_file(path, j, n);
    tjFree(j);
}

static const char *base(const char *p) {
    const char *s = strrchr(p, '/');
    return s ? s + 1 : p;
}

// ---------------------------------------------------------------- readers

static void test_folder_reader(void) {
    char root[700], p[1024];
    snprintf(root, sizeof root, "%s/inet", g_dir);
    const char *classes[] = {"n03000000", "n01000000", "n02000000"};  // created out of order
    for (int c = 0; c < 3; c++) {
        snprintf(p, sizeof p, "%s/train/%s/%s_10.JPEG", root, classes[c], classes[c]);
        put_jpeg(p, 40, 30, c);
        snprintf(p, sizeof p, "%s/train/%s/%s_2.jpg", root, classes[c], classes[c]);
        put_jpeg(p, 30, 40, c + 10);
        snprintf(p, sizeof p, "%s/train/%s/notes.txt", root, classes[c]);
        put_file(p, "x", 1);
        snprintf(p, sizeof p, "%s/train/%s/sub/%s_1.jpeg", root, classes[c], classes[c]);
        put_jpeg(p, 32, 32, c + 20);
    }
    TEST_CASE("ImageFolder: classes by sorted wnid, files in bytewise order of relative path, extension filter") {
        Dataset d;
        char err[512];
        int rc = dataset_open(&d, "imagenet", root, 1, 0, err, sizeof err);
        EXPECT(rc == 0, "open: %s", err);
        if (rc == 0) {
            EXPECT(d.n == 9 && d.num_classes == 3, "n %lld classes %d", (long long)d.n, d.num_classes);
            EXPECT(d.kind == DS_IMAGENET && d.height == 224 && d.channels == 3, "shape");
            const char *want[] = {"n01000000_10.JPEG", "n01000000_2.jpg", "n01000000_1.jpeg"};
            for (int i = 0; i < 9 && i < d.n; i++) {
                EXPECT(d.labels[i] == i / 3, "label of %d is %d", i, d.labels[i]);
                if (i < 3) EXPECT(!strcmp(base(d.paths[i]), want[i]), "file %d is %s", i, d.paths[i]);
            }
            dataset_free(&d);
        }
        rc = dataset_open(&d, "imagenet", root, 0, 0, err, sizeof err);
        EXPECT(rc != 0 && strstr(err, "val"), "a missing val split names it: %s", err);
    }
}

static void test_tiny_reader(void) {
    char zip[700], cls[700], p[1024];
    snprintf(zip, sizeof zip, "%s/tiny-zip", g_dir);
    snprintf(cls, sizeof cls, "%s/tiny-cls", g_dir);
    const char *wnids[] = {"n09000000", "n01000000", "n05000000"};  // wnids.txt order, not sorted
    FILE *f;
    snprintf(p, sizeof p, "%s/wnids.txt", zip);
    put_file(p, "n09000000\nn01000000\nn05000000\n", 30);
    snprintf(p, sizeof p, "%s/val/val_annotations.txt", zip);
    mkdir_p(p);
    rmdir(p);
    f = fopen(p, "w");
    int seed = 0;
    for (int c = 0; c < 3; c++) {
        for (int k = 0; k < 3; k++, seed++) {
            snprintf(p, sizeof p, "%s/train/%s/images/%s_%d.JPEG", zip, wnids[c], wnids[c], k);
            put_jpeg(p, 64, 64, seed);
            snprintf(p, sizeof p, "%s/train/%s/%s_%d.JPEG", cls, wnids[c], wnids[c], k);
            put_jpeg(p, 64, 64, seed);
        }
        snprintf(p, sizeof p, "%s/train/%s/%s_boxes.txt", zip, wnids[c], wnids[c]);
        put_file(p, "b", 1);
    }
    for (int v = 0; v < 5; v++) {  // val_<v> belongs to wnids[v % 3]
        const char *w = wnids[v % 3];
        fprintf(f, "val_%d.JPEG\t%s\t0\t0\t10\t10\n", v, w);
        snprintf(p, sizeof p, "%s/val/images/val_%d.JPEG", zip, v);
        put_jpeg(p, 64, 64, 100 + v);
        snprintf(p, sizeof p, "%s/val/%s/%s_%d.JPEG", cls, w, w, v);
        put_jpeg(p, 64, 64, 100 + v);
    }
    fclose(f);
    TEST_CASE("TinyImageNet: zip and class-folder layouts give the same (key, label) list, sorted-wnid classes") {
        for (int train = 1; train >= 0; train--) {
            Dataset a, b;
            char err[512];
            int ra = dataset_open(&a, "tiny-imagenet", zip, train, 0, err, sizeof err);
            EXPECT(ra == 0, "zip layout: %s", err);
            int rb = dataset_open(&b, "tiny-imagenet", cls, train, 0, err, sizeof err);
            EXPECT(rb == 0, "class layout: %s", err);
            if (ra || rb) continue;
            EXPECT(a.n == (train ? 9 : 5) && b.n == a.n, "n %lld %lld", (long long)a.n, (long long)b.n);
            EXPECT(a.num_classes == 3 && a.height == 64, "classes %d", a.num_classes);
            EXPECT(a.fingerprint == b.fingerprint, "fingerprints differ (train %d)", train);
            for (int64_t i = 0; i < a.n; i++) EXPECT(a.labels[i] == b.labels[i], "label %lld", (long long)i);
            // sorted wnids: n01 -> 0, n05 -> 1, n09 -> 2
            if (train) EXPECT(a.labels[0] == 0 && a.labels[3] == 1 && a.labels[8] == 2, "sorted-wnid classes");
            if (!train) EXPECT(!strcmp(base(a.paths[0]), "val_1.JPEG") && a.labels[0] == 0, "val order %s",
                               a.paths[0]);
            dataset_free(&a);
            dataset_free(&b);
        }
    }
}

// CIFAR record i: label = (i * 7) % classes (fine), coarse = 99, pixel (c, p) = i + c * 3 + p.
static void write_cifar(const char *path, int cifar100, int n0, int n) {
    size_t rec = cifar100 ? 3074 : 3073;
    unsigned char *buf = calloc((size_t)n, rec);
    for (int r = 0; r < n; r++) {
        int i = n0 + r;
        unsigned char *p = buf + (size_t)r * rec;
        if (cifar100) {
            p[0] = 99 % 20;
            p[1] = (unsigned char)((i * 7) % 100);
        } else {
            p[0] = (unsigned char)((i * 7) % 10);
        }
        for (int c = 0; c < 3; c++)
            for (int q = 0; q < 1024; q++) p[rec - 3072 + (size_t)c * 1024 + q] = (unsigned char)(i + c * 3 + q);
    }
    put_file(path, buf, (size_t)n * rec);
    free(buf);
}

static void test_cifar_reader(void) {
    char d10[700], d100[700], p[1024];
    snprintf(d10, sizeof d10, "%s/c10/cifar-10-batches-bin", g_dir);
    snprintf(d100, sizeof d100, "%s/c100", g_dir);
    for (int b = 1; b <= 5; b++) {
        snprintf(p, sizeof p, "%s/data_batch_%d.bin", d10, b);
        write_cifar(p, 0, (b - 1) * 3, 3);
    }
    snprintf(p, sizeof p, "%s/test_batch.bin", d10);
    write_cifar(p, 0, 0, 4);
    snprintf(p, sizeof p, "%s/train.bin", d100);
    write_cifar(p, 1, 0, 6);
    snprintf(p, sizeof p, "%s/test.bin", d100);
    write_cifar(p, 1, 0, 2);
    TEST_CASE("CIFAR-10: batches 1..5 in order, labels, planar -> HWC; found inside the root too") {
        Dataset d;
        char err[512], parent[700];
        snprintf(parent, sizeof parent, "%s/c10", g_dir);
        int rc = dataset_open(&d, "cifar10", parent, 1, 0, err, sizeof err);
        EXPECT(rc == 0, "%s", err);
        if (rc == 0) {
            EXPECT(d.n == 15 && d.num_classes == 10 && d.kind == DS_CIFAR, "n %lld", (long long)d.n);
            int ok = 1;
            for (int i = 0; i < 15; i++) {
                ok &= d.labels[i] == (i * 7) % 10;
                for (int q = 0; q < 1024; q += 97)
                    for (int c = 0; c < 3; c++) ok &= d.pixels[(size_t)i * 3072 + q * 3 + c] == (uint8_t)(i + c * 3 + q);
            }
            EXPECT(ok, "labels or pixels differ");
            dataset_free(&d);
        }
        rc = dataset_open(&d, "cifar10", d10, 0, 0, err, sizeof err);
        EXPECT(rc == 0 && d.n == 4, "test split: %s", err);
        if (rc == 0) dataset_free(&d);
    }
    TEST_CASE("CIFAR-100: the fine label; a partial record is a data error naming the file") {
        Dataset d;
        char err[512];
        int rc = dataset_open(&d, "cifar100", d100, 1, 0, err, sizeof err);
        EXPECT(rc == 0, "%s", err);
        if (rc == 0) {
            EXPECT(d.n == 6 && d.num_classes == 100, "n %lld", (long long)d.n);
            for (int i = 0; i < 6; i++) EXPECT(d.labels[i] == (i * 7) % 100, "fine label of %d: %d", i, d.labels[i]);
            dataset_free(&d);
        }
        snprintf(p, sizeof p, "%s/test.bin", d100);
        FILE *f = fopen(p, "ab");
        fputc(0, f);
        fclose(f);
        rc = dataset_open(&d, "cifar100", d100, 0, 0, err, sizeof err);
        EXPECT(rc != 0 && strstr(err, "test.bin") && strstr(err, "record"), "%s", err);
    }
}

// ---------------------------------------------------------------- the loader

// An in-memory CIFAR-like dataset whose label is the index (num_classes = n), so labels identify samples.
static Dataset mem_ds(int64_t n) {
    Dataset d;
    memset(&d, 0, sizeof d);
    snprintf(d.name, sizeof d.name, "mem");
    d.kind = DS_CIFAR;
    d.n = n;
    d.channels = 3;
    d.height = d.width = 32;
    d.num_classes = (int)n;
    d.pixels = malloc((size_t)n * 3072);
    d.labels = malloc((size_t)n * sizeof(int32_t));
    for (int64_t i = 0; i < n; i++) {
        d.labels[i] = (int32_t)i;
        for (int q = 0; q < 3072; q++) d.pixels[i * 3072 + q] = (uint8_t)((i * 13 + q * 7) ^ (q >> 5));
    }
    for (int c = 0; c < 3; c++) {
        d.mean[c] = 0.5f;
        d.std[c] = 0.25f;
    }
    data_options_default(&d.opt);
    d.opt.augment = 1;
    return d;
}

static LoaderConfig train_cfg(const Dataset *d, int B, int world, int rank, int accum, int workers) {
    LoaderConfig c = {.ds = d, .train = 1, .seed = 77, .global_batch = B, .world = world, .rank = rank,
                      .accum = accum, .micro = B / (world * accum), .steps_per_epoch = d->n / B,
                      .workers = workers, .prefetch = 2, .quiet = 1};
    return c;
}

static void test_sharding(void) {
    Dataset d = mem_ds(100);
    const int B = 24, steps = 8;  // 4 steps per epoch: two epochs, 4 of 100 unseen in each
    size_t img = 3072;
    int32_t ref_lab[8][24];
    float *ref_img = malloc((size_t)steps * B * img * sizeof(float));
    TEST_CASE("sharding: world 1, 2, 3, 4, 8 (and accum 2): disjoint rank slices whose union is the same global "
              "batch") {
        int configs[][2] = {{1, 1}, {2, 1}, {3, 1}, {4, 1}, {8, 1}, {1, 2}, {2, 2}, {4, 2}};
        for (int ci = 0; ci < 8; ci++) {
            int world = configs[ci][0], accum = configs[ci][1], micro = B / (world * accum);
            int32_t lab[8][24];
            float *imgs = malloc((size_t)steps * B * img * sizeof(float));
            for (int r = 0; r < world; r++) {
                LoaderConfig c = train_cfg(&d, B, world, r, accum, 2);
                Loader *l = loader_create(&c);
                for (int k = 1; k <= steps; k++)
                    for (int mi = 0; mi < accum; mi++) {
                        const float *im;
                        const int32_t *lb;
                        int n = loader_get(l, (int64_t)(k - 1) * accum + mi, &im, &lb);
                        EXPECT(n == micro, "count %d", n);
                        int pos = r * (B / world) + mi * micro;
                        memcpy(&lab[k - 1][pos], lb, (size_t)micro * sizeof(int32_t));
                        memcpy(imgs + ((size_t)(k - 1) * B + pos) * img, im, (size_t)micro * img * sizeof(float));
                    }
                loader_destroy(l);
            }
            if (ci == 0) {
                memcpy(ref_lab, lab, sizeof lab);
                memcpy(ref_img, imgs, (size_t)steps * B * img * sizeof(float));
                for (int e = 0; e < 2; e++) {  // an epoch covers floor(N/B) B distinct indices
                    int seen[100] = {0}, distinct = 0;
                    for (int k = e * 4; k < e * 4 + 4; k++)
                        for (int i = 0; i < B; i++) distinct += seen[lab[k][i]]++ == 0;
                    EXPECT(distinct == 96, "epoch %d covers %d distinct", e, distinct);
                }
            } else {
                EXPECT(!memcmp(lab, ref_lab, sizeof lab), "world %d accum %d: another global batch sequence", world,
                       accum);
                EXPECT(!memcmp(imgs, ref_img, (size_t)steps * B * img * sizeof(float)),
                       "world %d accum %d: other pixels", world, accum);
            }
            free(imgs);
        }
    }
    TEST_CASE("eval: every index exactly once across ranks (world 1 to 8; N = 23 divisible by none)") {
        Dataset e = mem_ds(23);
        for (int world = 1; world <= 8; world++) {
            int seen[23] = {0};
            for (int r = 0; r < world; r++) {
                int64_t b, en;
                loader_eval_shard(e.n, r, world, &b, &en);
                LoaderConfig c = {.ds = &e, .train = 0, .micro = 4, .begin = b, .end = en, .workers = 2,
                                  .prefetch = 2, .quiet = 1};
                Loader *l = loader_create(&c);
                for (int64_t q = 0; q < loader_eval_batches(l); q++) {
                    const float *im;
                    const int32_t *lb;
                    int n = loader_get(l, q, &im, &lb);
                    for (int i = 0; i < n; i++) seen[lb[i]]++;
                }
                loader_destroy(l);
            }
            int ok = 1;
            for (int i = 0; i < 23; i++) ok &= seen[i] == 1;
            EXPECT(ok, "world %d: an index seen other than once", world);
        }
        dataset_free(&e);
    }
    TEST_CASE("loader state: save at step 3, restore in a new loader (another world size): the same batches") {
        LoaderConfig c = train_cfg(&d, B, 1, 0, 1, 2);
        Loader *l = loader_create(&c);
        const float *im;
        const int32_t *lb;
        for (int k = 1; k <= 2; k++) loader_get(l, k - 1, &im, &lb);
        char path[700], err[512];
        snprintf(path, sizeof path, "%s/loader.json", g_dir);
        LoaderState s = loader_state_at(l, 3);
        EXPECT(loader_state_write(path, &s) == 0, "write");
        loader_destroy(l);
        LoaderState r;
        EXPECT(loader_state_read(path, &r, err, sizeof err) == 0, "%s", err);
        LoaderConfig c2 = train_cfg(&d, B, 2, 1, 1, 3);
        Loader *l2 = loader_create(&c2);
        int64_t k0 = loader_state_resume(l2, &r, err, sizeof err);
        EXPECT(k0 == 3, "resume at %lld: %s", (long long)k0, err);
        const int h = B / 2;  // rank 1 of 2 holds the second half of each global batch
        for (int k = (int)k0; k <= 6 && k0 > 0; k++) {
            int n = loader_get(l2, k - 1, &im, &lb);
            EXPECT(n == h && !memcmp(lb, &ref_lab[k - 1][h], h * sizeof(int32_t)), "step %d labels", k);
            EXPECT(!memcmp(im, ref_img + ((size_t)(k - 1) * B + h) * img, h * img * sizeof(float)), "step %d pixels",
                   k);
        }
        // going back (a repeated step) rebuilds it
        int n = loader_get(l2, 2, &im, &lb);
        EXPECT(n == h && !memcmp(lb, &ref_lab[2][h], h * sizeof(int32_t)), "repeated step");
        LoaderConfig c3 = train_cfg(&d, 10, 1, 0, 1, 1);
        Loader *l3 = loader_create(&c3);
        EXPECT(loader_state_resume(l3, &r, err, sizeof err) < 0 && strstr(err, "batch"), "another B: %s", err);
        LoaderState far = r;  // a corrupt epoch whose step count would overflow int64
        int64_t spe = c2.steps_per_epoch, last = (INT64_MAX - spe) / spe;  // the largest epoch whose steps fit
        far.epoch = last + 1;
        EXPECT(loader_state_resume(l2, &far, err, sizeof err) < 0 && strstr(err, "outside"), "epoch %lld: %s",
               (long long)far.epoch, err);
        far.epoch = last;
        far.step_in_epoch = spe - 1;
        EXPECT(loader_state_resume(l2, &far, err, sizeof err) == last * spe + spe, "epoch %lld: %s",
               (long long)far.epoch, err);
        far.step_in_epoch = r.step_in_epoch;
        far.epoch = -1;
        EXPECT(loader_state_resume(l2, &far, err, sizeof err) < 0 && strstr(err, "outside"), "epoch -1: %s", err);
        r.fingerprint ^= 1;
        EXPECT(loader_state_resume(l2, &r, err, sizeof err) < 0 && strstr(err, "dataset"), "another dataset");
        loader_destroy(l2);
        loader_destroy(l3);
    }
    TEST_CASE("SAM with accum 2 (each step's micro-batches requested twice, with the next one prefetched between): "
              "keep 2 serves the second pass from the ring (no rebuild), keep 1 re-decodes; the same batches") {
        int64_t rebuilds[2] = {0, 0};
        for (int keep = 1; keep <= 2; keep++) {
            LoaderConfig c = train_cfg(&d, B, 1, 0, 2, 2);
            c.keep = keep;
            Loader *l = loader_create(&c);
            const float *im;
            const int32_t *lb;
            for (int k = 1; k <= steps; k++)
                for (int pass = 0; pass < 2; pass++) {
                    for (int mi = 0; mi < 2; mi++) {
                        int n = loader_get(l, (int64_t)(k - 1) * 2 + mi, &im, &lb);
                        EXPECT(n == B / 2 && !memcmp(lb, &ref_lab[k - 1][mi * (B / 2)], (size_t)n * sizeof(int32_t)) &&
                                   !memcmp(im, ref_img + ((size_t)(k - 1) * B + mi * (B / 2)) * img,
                                           (size_t)n * img * sizeof(float)),
                               "keep %d step %d pass %d micro %d: another batch", keep, k, pass, mi);
                    }
                    if (k < steps) loader_get(l, (int64_t)k * 2, &im, &lb);  // the trainer's prefetch
                }
            rebuilds[keep - 1] = loader_rebuilds(l);
            loader_destroy(l);
        }
        EXPECT(rebuilds[1] == 0, "keep 2: %lld rebuilds", (long long)rebuilds[1]);
        EXPECT(rebuilds[0] >= steps - 1, "keep 1: %lld rebuilds (expected one per step)", (long long)rebuilds[0]);
        printf("    SAM, accum 2, %d steps: %lld ring rebuilds with keep 1, %lld with keep 2\n", steps,
               (long long)rebuilds[0], (long long)rebuilds[1]);
    }
    free(ref_img);
    dataset_free(&d);
}

// Collects `steps` training batches of a folder dataset (labels and pixels).
static void run_epochs(const Dataset *d, int B, int steps, int workers, int32_t *labels, float *imgs) {
    LoaderConfig c = train_cfg(d, B, 1, 0, 1, workers);
    c.steps_per_epoch = d->n / B;
    Loader *l = loader_create(&c);
    size_t img = (size_t)d->channels * d->height * d->width;
    for (int k = 1; k <= steps; k++) {
        const float *im;
        const int32_t *lb;
        int n = loader_get(l, k - 1, &im, &lb);
        EXPECT(n == B, "batch %d has %d", k, n);
        if (labels) memcpy(labels + (size_t)(k - 1) * B, lb, (size_t)B * sizeof(int32_t));
        if (imgs) memcpy(imgs + (size_t)(k - 1) * B * img, im, (size_t)B * img * sizeof(float));
    }
    loader_destroy(l);
}

// The same batches as uint8 (cfg.u8), normalized on the host (normalize_u8_hwc) into imgs, and by the CPU backend's
// images_from_u8 into imgs_be.
static void run_epochs_u8(const Dataset *d, int B, int steps, int workers, float *imgs, float *imgs_be) {
    LoaderConfig c = train_cfg(d, B, 1, 0, 1, workers);
    c.steps_per_epoch = d->n / B;
    c.u8 = 1;
    Loader *l = loader_create(&c);
    Backend *be = backend_cpu_create(1);
    size_t img = (size_t)d->channels * d->height * d->width;
    for (int k = 1; k <= steps; k++) {
        const uint8_t *px;
        const int32_t *lb;
        int n = loader_get_u8(l, k - 1, &px, &lb);
        EXPECT(n == B, "batch %d has %d", k, n);
        float *out = imgs + (size_t)(k - 1) * B * img;
        for (int i = 0; i < n; i++)
            normalize_u8_hwc(px + i * img, d->channels, d->height, d->width, d->mean, d->std, out + i * img);
        be->images_from_u8(be, imgs_be + (size_t)(k - 1) * B * img, px, n, d->channels, d->height, d->width, d->mean,
                           d->std);
    }
    be->destroy(be);
    loader_destroy(l);
}

static void test_u8_batches(void) {
    // in-memory records (CIFAR's crop + flip path, and IDX's own), then JPEGs (RandomResizedCrop, RandAugment)
    for (int kind = 0; kind < 2; kind++) {
        char title[200];
        snprintf(title, sizeof title, "uint8 batches (%s path): normalized on the host or by the backend's "
                 "images_from_u8, the same bits as the fp32 batches, 2 epochs with 3 threads", kind ? "IDX" : "CIFAR");
        TEST_CASE(title) {
            Dataset d = mem_ds(40);
            if (kind) d.kind = DS_IDX;
            size_t img = 3072, n = (size_t)2 * 40 * img;
            float *a = malloc(n * sizeof(float)), *b = malloc(n * sizeof(float)), *c = malloc(n * sizeof(float));
            run_epochs(&d, 8, 10, 3, NULL, a);
            run_epochs_u8(&d, 8, 10, 3, b, c);
            EXPECT(!memcmp(a, b, n * sizeof(float)), "host-normalized uint8 batches differ from the fp32 batches");
            EXPECT(!memcmp(a, c, n * sizeof(float)), "images_from_u8 differs from the fp32 batches");
            free(a);
            free(b);
            free(c);
            dataset_free(&d);
        }
    }
}

static void test_threads_and_corrupt(void) {
    char root[700], p[1024];
    snprintf(root, sizeof root, "%s/inet2", g_dir);
    for (int i = 0; i < 12; i++) {
        snprintf(p, sizeof p, "%s/train/n0%d/img_%02d.JPEG", root, i % 3, i);
        put_jpeg(p, 120 + 8 * i, 100 + 5 * (i % 4), i);
    }
    TEST_CASE("ImageNet train path (RandomResizedCrop, flip, RandAugment): 1, 3 and 7 threads give the same bits") {
        Dataset d;
        char err[512];
        int rc = dataset_open(&d, "imagenet", root, 1, 0, err, sizeof err);
        EXPECT(rc == 0, "%s", err);
        if (rc == 0) {
            d.opt.augment = 1;
            size_t img = (size_t)3 * 224 * 224;
            float *a = malloc(6 * 4 * img * sizeof(float)), *b = malloc(6 * 4 * img * sizeof(float));
            run_epochs(&d, 4, 6, 1, NULL, a);
            run_epochs(&d, 4, 6, 3, NULL, b);
            EXPECT(!memcmp(a, b, 6 * 4 * img * sizeof(float)), "batches differ between 1 and 3 threads");
            run_epochs(&d, 4, 6, 7, NULL, b);
            EXPECT(!memcmp(a, b, 6 * 4 * img * sizeof(float)), "batches differ between 1 and 7 threads");
            float *c = malloc(6 * 4 * img * sizeof(float));
            run_epochs_u8(&d, 4, 6, 2, b, c);  // uint8 batches (data.u8_batches), normalized after the loader
            EXPECT(!memcmp(a, b, 6 * 4 * img * sizeof(float)), "uint8 batches normalized on the host differ");
            EXPECT(!memcmp(a, c, 6 * 4 * img * sizeof(float)), "uint8 batches through images_from_u8 differ");
            // Without RandAugment, uint8 output is resized (and flipped) straight into the batch slot: the same
            // bits as the fp32 path through the worker's image
            d.opt.randaugment = 0;
            run_epochs(&d, 4, 6, 1, NULL, a);
            run_epochs_u8(&d, 4, 6, 2, b, c);
            EXPECT(!memcmp(a, b, 6 * 4 * img * sizeof(float)), "uint8 batches without RandAugment differ");
            d.opt.randaugment = 1;
            free(c);
            // The eval transform (decoded and resampled only where the centre crop reads) against the whole
            // image decoded, resized to short side 256 and cropped, for every file, fp32 and uint8 output
            {
                PipeWorker *pw = pipe_worker_create(&d), *pw8 = pipe_worker_create(&d);
                pipe_worker_set_u8(pw8, 1);
                JpegDecoder *dec = jpeg_decoder_create(1 << 26, (size_t)256 << 20);
                Image full = {0}, big = {0}, crop = {0};
                float *got = malloc(img * sizeof(float)), *want = malloc(img * sizeof(float));
                uint8_t *got8 = malloc(img);
                int bad = 0;
                for (int64_t i = 0; i < d.n; i++) {
                    size_t len;
                    uint8_t *buf = read_file_all(d.paths[i], &len);
                    int W, H, sd, rw, rh, cx, cy;
                    double box[4];
                    ImgStatus st = jpeg_open(dec, buf, len, &W, &H);
                    if (st == IMG_OK) st = jpeg_read_crop(dec, 0, 0, W, H, 0, 0, 0, &full, box, &sd);
                    resize_short_size(W, H, 256, &rw, &rh);
                    double whole[4] = {0, 0, W, H};
                    pil_resize_bilinear(&full, whole, rw, rh, &big);
                    center_crop_pos(rw, rh, 224, &cx, &cy);
                    image_reserve(&crop, 224, 224, 3);
                    for (int y = 0; y < 224; y++)
                        memcpy(crop.px + (size_t)y * crop.stride, big.px + (size_t)(cy + y) * big.stride + (size_t)cx * 3,
                               224 * 3);
                    normalize_chw(&crop, d.mean, d.std, want);
                    ImgStatus s1 = pipe_image(pw, &d, 0, 1, 0, i, i, got);
                    ImgStatus s2 = pipe_image(pw8, &d, 0, 1, 0, i, i, got8);
                    int ok = st == IMG_OK && s1 == IMG_OK && s2 == IMG_OK && !memcmp(got, want, img * sizeof(float));
                    for (int y = 0; y < 224 && ok; y++)
                        ok = !memcmp(got8 + (size_t)y * 224 * 3, crop.px + (size_t)y * crop.stride, 224 * 3);
                    if (!ok && bad++ < 3) printf("    %s (%dx%d): the eval image differs\n", d.paths[i], W, H);
                    free(buf);
                }
                EXPECT(bad == 0, "%d of %lld eval images differ from decode + Resize(256) + CenterCrop(224)", bad,
                       (long long)d.n);
                free(got);
                free(want);
                free(got8);
                image_free(&full);
                image_free(&big);
                image_free(&crop);
                jpeg_decoder_free(dec);
                pipe_worker_free(pw);
                pipe_worker_free(pw8);
            }
            d.opt.augment = 0;  // the eval transform: Resize(256) + CenterCrop(224), no draws
            run_epochs(&d, 4, 1, 2, NULL, a);
            float mx = 0;
            for (size_t i = 0; i < 4 * img; i++) mx = fabsf(a[i]) > mx ? fabsf(a[i]) : mx;
            EXPECT(mx > 0.1f && mx < 3.0f, "normalized range %g", mx);
            free(a);
            free(b);
            dataset_free(&d);
        }
    }
    // The corrupt corpus, in a class of its own beside the good files.
    snprintf(p, sizeof p, "%s/train/n09/a_empty.JPEG", root);
    put_file(p, "", 0);
    unsigned char junk[3000];
    for (int i = 0; i < 3000; i++) junk[i] = (unsigned char)(i * 131 + 7);
    snprintf(p, sizeof p, "%s/train/n09/b_random.JPEG", root);
    put_file(p, junk, sizeof junk);
    const unsigned char png[] = {0x89, 'P', 'N', 'G', 0x0D, 0x0A, 0x1A, 0x0A, 0, 0, 0, 13, 'I', 'H', 'D', 'R'};
    snprintf(p, sizeof p, "%s/train/n09/c_png.JPEG", root);
    put_file(p, png, sizeof png);
    unsigned char *j;
    unsigned long jn = make_jpeg(200, 160, 3, &j);
    snprintf(p, sizeof p, "%s/train/n09/d_truncated.JPEG", root);
    put_file(p, j, jn / 3);
    unsigned char *big = malloc(jn);
    memcpy(big, j, jn);
    for (unsigned long i = 0; i + 8 < jn; i++)
        if (big[i] == 0xFF && big[i + 1] == 0xC0) {  // SOF0: height and width to 65000 x 65000
            big[i + 5] = big[i + 7] = 0xFD;
            big[i + 6] = big[i + 8] = 0xE8;
            break;
        }
    snprintf(p, sizeof p, "%s/train/n09/e_huge.JPEG", root);
    put_file(p, big, jn);
    free(big);
    unsigned char *large = calloc(1, 300000);
    memcpy(large, j, jn);
    snprintf(p, sizeof p, "%s/train/n09/f_toolarge.JPEG", root);
    put_file(p, large, 300000);
    free(large);
    snprintf(p, sizeof p, "%s/train/n09/g_good.JPEG", root);
    put_file(p, j, jn);
    tjFree(j);
    TEST_CASE("corrupt corpus (empty, random, PNG, truncated, 65000^2 header, over the byte limit): two epochs "
              "train on with full batches, each file counted once under its reason") {
        alarm(120);  // a stall fails the test instead of hanging it
        Dataset d;
        char err[512];
        int rc = dataset_open(&d, "imagenet", root, 1, 0, err, sizeof err);
        EXPECT(rc == 0 && d.n == 19, "%s (n %lld)", err, (long long)d.n);
        if (rc == 0) {
            d.opt.augment = 1;
            d.opt.max_file_bytes = 200000;
            LoaderConfig c = train_cfg(&d, 6, 1, 0, 1, 2);
            Loader *l = loader_create(&c);
            int full = 1, bad_label = 0;
            for (int k = 1; k <= 6; k++) {
                const float *im;
                const int32_t *lb;
                int n = loader_get(l, k - 1, &im, &lb);
                full &= n == 6;
                for (int i = 0; i < n; i++) bad_label |= lb[i] < 0 || lb[i] >= 4;
            }
            EXPECT(full && !bad_label, "full batches %d, labels ok %d", full, !bad_label);
            const PipeFailures *f = loader_failures(l);
            // every index was drawn in the two epochs (3 steps of 6 cover 18 of 19; the second epoch another 18)
            int64_t tr = f->counts[IMG_TRUNCATED] + f->counts[IMG_CORRUPT];
            EXPECT(f->counts[IMG_EMPTY] <= 1 && f->counts[IMG_UNKNOWN_FORMAT] <= 1 && f->counts[IMG_PNG] <= 1 &&
                       f->counts[IMG_TOO_MANY_PIXELS] <= 1 && f->counts[IMG_FILE_TOO_BIG] <= 1 && tr <= 1,
                   "a file counted twice");
            EXPECT(pipe_failures_total(f) == 6, "total %lld (empty %lld unknown %lld png %lld pixels %lld big %lld "
                   "truncated/corrupt %lld)", (long long)pipe_failures_total(f), (long long)f->counts[IMG_EMPTY],
                   (long long)f->counts[IMG_UNKNOWN_FORMAT], (long long)f->counts[IMG_PNG],
                   (long long)f->counts[IMG_TOO_MANY_PIXELS], (long long)f->counts[IMG_FILE_TOO_BIG], (long long)tr);
            loader_destroy(l);
            // substitution is deterministic: the same labels with 1 thread and with 3
            int32_t la[36], lb2[36];
            run_epochs(&d, 6, 6, 1, la, NULL);
            run_epochs(&d, 6, 6, 3, lb2, NULL);
            EXPECT(!memcmp(la, lb2, sizeof la), "substitutes differ with the thread count");
            dataset_free(&d);
        }
        alarm(0);
    }
}

// Short side of the JPEG at path (0 if it is not one).
static int jpeg_short_side(const char *path, int *w, int *h) {
    size_t n;
    unsigned char *buf = read_file_all(path, &n);
    if (!buf) return 0;
    tjhandle tj = tjInitDecompress();
    int ss, cs;
    int rc = tjDecompressHeader3(tj, buf, (unsigned long)n, w, h, &ss, &cs);
    tjDestroy(tj);
    free(buf);
    return rc == 0 ? (*w < *h ? *w : *h) : 0;
}

static void test_prepare(void) {
    char src[700], dst[700];
    snprintf(src, sizeof src, "%s/inet2/train", g_dir);
    snprintf(dst, sizeof dst, "%s/inet2-prepared/train", g_dir);
    TEST_CASE("prepare: short side 64, same layout, labels and fingerprint; bad files copied verbatim; rerun "
              "resumes") {
        char *argv[] = {"simplest-dist", "prepare", src, dst, "--short-side", "64", "--quality", "85", NULL};
        int rc = prepare_main(8, argv);
        EXPECT(rc == 0, "prepare exit %d", rc);
        Dataset a, b;
        char err[512], sroot[700], droot[700];
        snprintf(sroot, sizeof sroot, "%s/inet2", g_dir);
        snprintf(droot, sizeof droot, "%s/inet2-prepared", g_dir);
        int ra = dataset_open(&a, "imagenet", sroot, 1, 0, err, sizeof err);
        int rb = dataset_open(&b, "imagenet", droot, 1, 0, err, sizeof err);
        EXPECT(ra == 0 && rb == 0, "%s", err);
        if (ra == 0 && rb == 0) {
            EXPECT(a.n == b.n && a.fingerprint == b.fingerprint, "n %lld vs %lld, fingerprints differ",
                   (long long)a.n, (long long)b.n);
            int good = 0;
            for (int64_t i = 0; i < a.n && i < b.n; i++) {
                int w, h, w2, h2;
                int s0 = jpeg_short_side(a.paths[i], &w, &h), s1 = jpeg_short_side(b.paths[i], &w2, &h2);
                if (strstr(a.paths[i], "img_")) {
                    good++;
                    EXPECT(s0 > 64 && s1 == 64 && abs(w2 * h - h2 * w) <= w + h, "%s: %dx%d -> %dx%d", b.paths[i],
                           w, h, w2, h2);
                }
            }
            EXPECT(good == 12, "good images %d", good);
            struct stat s0, s1;
            char p0[1024], p1[1024];
            snprintf(p0, sizeof p0, "%s/n09/b_random.JPEG", src);
            snprintf(p1, sizeof p1, "%s/n09/b_random.JPEG", dst);
            EXPECT(stat(p0, &s0) == 0 && stat(p1, &s1) == 0 && s0.st_size == s1.st_size, "verbatim copy");
            dataset_free(&a);
            dataset_free(&b);
        }
        rc = prepare_main(8, argv);
        EXPECT(rc == 0, "rerun exit %d", rc);
    }
}

int main(void) {
    const char *tmp = getenv("TEST_TMP");
    snprintf(g_dir, sizeof g_dir, "%s/loader.XXXXXX", tmp ? tmp : "/tmp");
    if (!mkdtemp(g_dir)) {
        perror("mkdtemp");
        return 1;
    }
    test_folder_reader();
    test_tiny_reader();
    test_cifar_reader();
    test_sharding();
    test_u8_batches();
    test_threads_and_corrupt();
    test_prepare();
    char cmd[700];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", g_dir);
    return tl_state.cases_failed ? 1 : 0;
}
