// cifar.c: CIFAR-10 and CIFAR-100 binary records (spec/data.md §1.3). Planar RGB records become HWC uint8;
// CIFAR-100 trains on the fine label.
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "data/dataset.h"
#include "util.h"

uint64_t dataset_fingerprint_add(uint64_t h, const char *key, int32_t label) {
    // FNV-1a over the key bytes, a separator and the label's four bytes
    for (const unsigned char *p = (const unsigned char *)key; *p; p++) h = (h ^ *p) * 0x100000001B3ULL;
    h = (h ^ 0xFF) * 0x100000001B3ULL;
    for (int i = 0; i < 4; i++) h = (h ^ (((uint32_t)label >> (8 * i)) & 0xFF)) * 0x100000001B3ULL;
    return h;
}

int dataset_load_cifar(Dataset *ds, const char *dir, int cifar100, int train, char *err, size_t n) {
    memset(ds, 0, sizeof *ds);
    const char *files10[] = {"data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin",
                             "data_batch_5.bin"};
    const char *test10[] = {"test_batch.bin"}, *train100[] = {"train.bin"}, *test100[] = {"test.bin"};
    const char **files = cifar100 ? (train ? train100 : test100) : (train ? files10 : test10);
    int nfiles = (!cifar100 && train) ? 5 : 1;
    size_t rec = cifar100 ? 3074 : 3073, hdr = cifar100 ? 2 : 1;
    int64_t counts[5];
    int64_t total = 0;
    char path[1200];
    for (int f = 0; f < nfiles; f++) {
        snprintf(path, sizeof path, "%s/%s", dir, files[f]);
        struct stat st;
        if (stat(path, &st) != 0)
            return set_err(err, n, "dataset file '%s': cannot open: %s", path, strerror(errno));
        if (st.st_size == 0 || (size_t)st.st_size % rec != 0)
            return set_err(err, n, "dataset file '%s': %lld bytes is not a whole number of %zu-byte records", path,
                           (long long)st.st_size, rec);
        counts[f] = (int64_t)((size_t)st.st_size / rec);
        total += counts[f];
    }
    ds->kind = DS_CIFAR;
    ds->n = total;
    ds->channels = 3;
    ds->height = ds->width = 32;
    ds->num_classes = cifar100 ? 100 : 10;
    ds->pixels = xmalloc((size_t)total * 3072, "CIFAR pixels");
    ds->labels = xmalloc((size_t)total * sizeof(int32_t), "CIFAR labels");
    unsigned char *buf = xmalloc(rec * 1024, "CIFAR read buffer");
    uint64_t fp = 0xCBF29CE484222325ULL;
    int64_t i = 0;
    for (int f = 0; f < nfiles; f++) {
        snprintf(path, sizeof path, "%s/%s", dir, files[f]);
        FILE *fh = fopen(path, "rb");
        if (!fh) {
            free(buf);
            dataset_free(ds);
            return set_err(err, n, "dataset file '%s': cannot open: %s", path, strerror(errno));
        }
        for (int64_t r0 = 0; r0 < counts[f]; r0 += 1024) {
            size_t m = (size_t)(counts[f] - r0 < 1024 ? counts[f] - r0 : 1024);
            if (fread(buf, rec, m, fh) != m) {
                fclose(fh);
                free(buf);
                dataset_free(ds);
                return set_err(err, n, "dataset file '%s': read error", path);
            }
            for (size_t r = 0; r < m; r++, i++) {
                const unsigned char *p = buf + r * rec;
                int label = cifar100 ? p[1] : p[0];
                if (label >= ds->num_classes) {
                    fclose(fh);
                    free(buf);
                    dataset_free(ds);
                    return set_err(err, n, "dataset file '%s': record %lld has label %d, outside 0..%d", path,
                                   (long long)(r0 + (int64_t)r), label, ds->num_classes - 1);
                }
                ds->labels[i] = label;
                uint8_t *dst = ds->pixels + (size_t)i * 3072;
                for (int px = 0; px < 1024; px++)
                    for (int c = 0; c < 3; c++) dst[px * 3 + c] = p[hdr + (size_t)c * 1024 + px];
                char key[1300];
                snprintf(key, sizeof key, "%s#%lld", files[f], (long long)(r0 + (int64_t)r));
                fp = dataset_fingerprint_add(fp, key, label);
            }
        }
        fclose(fh);
    }
    free(buf);
    ds->fingerprint = fp;
    const float m10[3] = {0.4914f, 0.4822f, 0.4465f}, s10[3] = {0.2023f, 0.1994f, 0.2010f};
    const float m100[3] = {0.5071f, 0.4867f, 0.4408f}, s100[3] = {0.2675f, 0.2565f, 0.2761f};
    memcpy(ds->mean, cifar100 ? m100 : m10, sizeof ds->mean);
    memcpy(ds->std, cifar100 ? s100 : s10, sizeof ds->std);
    snprintf(ds->name, sizeof ds->name, "%s", cifar100 ? "cifar100" : "cifar10");
    data_options_default(&ds->opt);
    return 0;
}
