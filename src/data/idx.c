// idx.c: MNIST / Fashion-MNIST IDX files (spec/data.md §1.4), read through zlib so that .gz and plain files work.
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "data/dataset.h"
#include "util.h"

static uint32_t be32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

// Reads exactly n bytes; 0 on success.
static int gz_read_exact(gzFile f, void *buf, size_t n) {
    unsigned char *p = buf;
    while (n > 0) {
        unsigned chunk = n > (1u << 30) ? (1u << 30) : (unsigned)n;
        int got = gzread(f, p, chunk);
        if (got <= 0) return -1;
        p += got;
        n -= (size_t)got;
    }
    return 0;
}

// Reads exactly n bytes into a new buffer that grows with the data that arrives (64 MiB at first, then doubling),
// so that a corrupt header claiming gigabytes costs no more memory than the file holds. NULL if the data ends early.
static uint8_t *gz_read_alloc(gzFile f, size_t n, const char *what) {
    size_t cap = n < ((size_t)64 << 20) ? n : ((size_t)64 << 20), got = 0;
    uint8_t *buf = xmalloc(cap ? cap : 1, what);
    while (got < n) {
        if (got == cap) {
            cap = cap > n / 2 ? n : 2 * cap;
            uint8_t *b = realloc(buf, cap);
            if (!b) DIE("out of memory growing %s to %zu bytes", what, cap);
            buf = b;
        }
        if (gz_read_exact(f, buf + got, cap - got) != 0) {
            free(buf);
            return NULL;
        }
        got = cap;
    }
    return buf;
}

// Opens an IDX file, checks its magic and reads the dims. Returns the open file or NULL with err set.
static gzFile open_idx(const char *path, uint32_t magic, int ndims, uint32_t *dims, char *err, size_t n) {
    gzFile f = gzopen(path, "rb");
    if (!f) {
        set_err(err, n, "dataset file '%s': cannot open: %s", path, strerror(errno ? errno : ENOENT));
        return NULL;
    }
    unsigned char hdr[16];
    if (gz_read_exact(f, hdr, 4 + 4 * (size_t)ndims) != 0) {
        set_err(err, n, "dataset file '%s': truncated or corrupt header", path);
        gzclose(f);
        return NULL;
    }
    if (be32(hdr) != magic) {
        set_err(err, n, "dataset file '%s': bad IDX magic 0x%08x (want 0x%08x)", path, be32(hdr), magic);
        gzclose(f);
        return NULL;
    }
    for (int i = 0; i < ndims; i++) dims[i] = be32(hdr + 4 + 4 * i);
    return f;
}

// 1 if anything is left after the expected data (a file longer than its header says), or if the gzip stream is
// damaged past it (a cut-off trailer or a bad CRC makes gzread fail at the end).
static int has_trailing(gzFile f) {
    unsigned char b;
    int errnum = Z_OK;
    if (gzread(f, &b, 1) != 0) return 1;
    gzerror(f, &errnum);  // zlib reports a missing trailer only here ("unexpected end of file")
    return errnum != Z_OK;
}

int dataset_load_idx(Dataset *ds, const char *images_path, const char *labels_path, char *err, size_t n) {
    memset(ds, 0, sizeof *ds);
    uint32_t idims[3], ldims[1];
    gzFile fi = open_idx(images_path, 0x00000803, 3, idims, err, n);
    if (!fi) return -1;
    gzFile fl = open_idx(labels_path, 0x00000801, 1, ldims, err, n);
    if (!fl) {
        gzclose(fi);
        return -1;
    }
    int rc = -1;
    if (idims[0] != ldims[0]) {
        set_err(err, n, "dataset files '%s' and '%s': %u images but %u labels", images_path, labels_path, idims[0],
             ldims[0]);
        goto out;
    }
    if (idims[1] == 0 || idims[2] == 0 || idims[1] > 4096 || idims[2] > 4096 || idims[0] == 0) {
        set_err(err, n, "dataset file '%s': implausible dims %u x %u x %u", images_path, idims[0], idims[1], idims[2]);
        goto out;
    }
    if ((uint64_t)idims[0] * idims[1] * idims[2] > ((uint64_t)1 << 36)) {
        set_err(err, n, "dataset file '%s': header claims %u images of %ux%u, more than 64 GiB", images_path,
                idims[0], idims[1], idims[2]);
        goto out;
    }
    ds->n = idims[0];
    ds->height = (int)idims[1];
    ds->width = (int)idims[2];
    ds->channels = 1;
    size_t npix = (size_t)ds->n * ds->height * ds->width;
    ds->pixels = gz_read_alloc(fi, npix, "IDX pixels");
    if (!ds->pixels || has_trailing(fi)) {
        set_err(err, n, "dataset file '%s': truncated, corrupt, or not the length its header gives (%u images of %ux%u)", images_path,
             idims[0], idims[1], idims[2]);
        goto out;
    }
    uint8_t *lab = gz_read_alloc(fl, (size_t)ds->n, "IDX labels");
    if (!lab || has_trailing(fl)) {
        set_err(err, n, "dataset file '%s': truncated, corrupt, or not the length its header gives (%u labels)", labels_path, ldims[0]);
        free(lab);
        goto out;
    }
    ds->labels = xmalloc((size_t)ds->n * sizeof(int32_t), "labels");
    int maxlab = 0;
    for (int64_t i = 0; i < ds->n; i++) {
        ds->labels[i] = lab[i];
        maxlab = lab[i] > maxlab ? lab[i] : maxlab;
    }
    free(lab);
    if (maxlab > 9) {
        set_err(err, n, "dataset file '%s': label %d outside 0..9", labels_path, maxlab);
        goto out;
    }
    ds->num_classes = 10;
    rc = 0;
out:
    gzclose(fi);
    gzclose(fl);
    if (rc != 0) dataset_free(ds);
    return rc;
}

// Picks "<root>/<stem>.gz" when it exists, else the plain "<root>/<stem>".
static void idx_path(char *out, size_t n, const char *root, const char *stem) {
    snprintf(out, n, "%s/%s.gz", root, stem);
    if (!path_exists(out)) snprintf(out, n, "%s/%s", root, stem);
}

void data_options_default(DataOptions *o) {
    *o = (DataOptions){.augment = 0, .crop_padding = 4, .flip = 1, .randaugment = 1, .ra_ops = 2,
                       .ra_magnitude = 10, .dct_scaling = 0, .max_file_bytes = (int64_t)64 << 20,
                       .max_pixels = (int64_t)64 << 20, .workers = 0, .prefetch = 3};
}

static int open_idx_split(Dataset *ds, const char *name, const char *root, int train, char *err, size_t n) {
    char ip[1100], lp[1100];
    const char *split = train ? "train" : "t10k";
    char stem[64];
    snprintf(stem, sizeof stem, "%s-images-idx3-ubyte", split);
    idx_path(ip, sizeof ip, root, stem);
    snprintf(stem, sizeof stem, "%s-labels-idx1-ubyte", split);
    idx_path(lp, sizeof lp, root, stem);
    if (dataset_load_idx(ds, ip, lp, err, n) != 0) return -1;
    // Fashion-MNIST: mean/std of its 60,000 training images; MNIST: the customary values (spec/data.md §2).
    int fashion = strcmp(name, "fashion-mnist") == 0;
    ds->mean[0] = fashion ? 0.2860f : 0.1307f;
    ds->std[0] = fashion ? 0.3530f : 0.3081f;
    ds->kind = DS_IDX;
    uint64_t fp = 0xCBF29CE484222325ULL;
    char key[32];
    for (int64_t i = 0; i < ds->n; i++) {
        snprintf(key, sizeof key, "%s#%lld", split, (long long)i);
        fp = dataset_fingerprint_add(fp, key, ds->labels[i]);
    }
    ds->fingerprint = fp;
    data_options_default(&ds->opt);
    return 0;
}

// CIFAR's folder: root itself, or the archive's folder inside it.
static void cifar_dir(char *out, size_t n, const char *root, const char *sub, const char *probe) {
    snprintf(out, n, "%s/%s", root, probe);
    if (path_exists(out)) {
        snprintf(out, n, "%s", root);
        return;
    }
    snprintf(out, n, "%s/%s", root, sub);
}

int dataset_open(Dataset *ds, const char *name, const char *root, int train, int64_t limit, char *err, size_t n) {
    int rc;
    char dir[1200];
    if (!strcmp(name, "fashion-mnist") || !strcmp(name, "mnist")) {
        rc = open_idx_split(ds, name, root, train, err, n);
    } else if (!strcmp(name, "cifar10")) {
        cifar_dir(dir, sizeof dir, root, "cifar-10-batches-bin", train ? "data_batch_1.bin" : "test_batch.bin");
        rc = dataset_load_cifar(ds, dir, 0, train, err, n);
    } else if (!strcmp(name, "cifar100")) {
        cifar_dir(dir, sizeof dir, root, "cifar-100-binary", train ? "train.bin" : "test.bin");
        rc = dataset_load_cifar(ds, dir, 1, train, err, n);
    } else if (!strcmp(name, "tiny-imagenet")) {
        rc = dataset_load_tiny(ds, root, train, err, n);
        if (rc == 0) {
            ds->kind = DS_TINY;
            ds->channels = 3;
            ds->height = ds->width = 64;
            const float m[3] = {0.4802f, 0.4481f, 0.3975f}, s[3] = {0.2770f, 0.2691f, 0.2821f};
            memcpy(ds->mean, m, sizeof m);
            memcpy(ds->std, s, sizeof s);
        }
    } else if (!strcmp(name, "imagenet")) {
        snprintf(dir, sizeof dir, "%s/%s", root, train ? "train" : "val");
        rc = dataset_load_folder(ds, dir, err, n);
        if (rc == 0) {
            ds->kind = DS_IMAGENET;
            ds->channels = 3;
            ds->height = ds->width = 224;
            const float m[3] = {0.485f, 0.456f, 0.406f}, s[3] = {0.229f, 0.224f, 0.225f};
            memcpy(ds->mean, m, sizeof m);
            memcpy(ds->std, s, sizeof s);
        }
    } else {
        return set_err(err, n, "config key 'data.dataset': unknown dataset '%s'", name);
    }
    if (rc != 0) return -1;
    snprintf(ds->name, sizeof ds->name, "%s", name);
    if (limit > 0 && limit < ds->n) ds->n = limit;
    return 0;
}

void dataset_free(Dataset *ds) {
    if (ds->paths) {
        // every path the reader listed, including those a limit cut off
        for (int64_t i = 0; i < ds->n_paths; i++) free(ds->paths[i]);
    }
    free(ds->paths);
    free(ds->pixels);
    free(ds->labels);
    ds->paths = NULL;
    ds->pixels = NULL;
    ds->labels = NULL;
}
