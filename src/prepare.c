// prepare.c: see prepare.h.
#include "prepare.h"

#include <dirent.h>
#include <errno.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <turbojpeg.h>

#include "data/augment.h"
#include "data/jpeg.h"
#include "util.h"

typedef struct {
    char **rel;
    int64_t n, cap;
} FileList;

static void list_push(FileList *l, const char *rel) {
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 1024;
        char **nr = realloc(l->rel, (size_t)l->cap * sizeof(char *));
        CHECK(nr, "out of memory listing files");
        l->rel = nr;
    }
    l->rel[l->n++] = xstrdup(rel);
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static void walk(FileList *l, const char *root, const char *rel, int depth) {
    char dir[4096];
    snprintf(dir, sizeof dir, "%s%s%s", root, rel[0] ? "/" : "", rel);
    DIR *d = opendir(dir);
    if (!d || depth > 32) {
        if (d) closedir(d);
        return;
    }
    struct dirent *e;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        char r[4096], full[8300];
        snprintf(r, sizeof r, "%s%s%s", rel, rel[0] ? "/" : "", e->d_name);
        snprintf(full, sizeof full, "%s/%s", root, r);
        struct stat st;
        if (stat(full, &st) != 0) continue;
        if (S_ISDIR(st.st_mode))
            walk(l, root, r, depth + 1);
        else if (S_ISREG(st.st_mode))
            list_push(l, r);
    }
    closedir(d);
}

static int is_image(const char *name) {
    const char *dot = strrchr(name, '.');
    return dot && (!strcasecmp(dot, ".jpeg") || !strcasecmp(dot, ".jpg") || !strcasecmp(dot, ".png"));
}

static int write_atomic_mkdir(const char *path, const void *data, size_t n) {
    char dir[8300];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash) {
        *slash = 0;
        if (mkdir_p(dir) != 0) return -1;
    }
    return write_file_atomic(path, data, n);
}

// The output size: never larger than the input.
static void target_size(int W, int H, int short_side, int max_side, int *ow, int *oh) {
    *ow = W;
    *oh = H;
    if (short_side > 0 && (W < H ? W : H) > short_side) {
        resize_short_size(W, H, short_side, ow, oh);
    } else if (max_side > 0 && (W > H ? W : H) > max_side) {
        if (W >= H) {
            *ow = max_side;
            *oh = (int)((double)H * max_side / W + 0.5);
        } else {
            *oh = max_side;
            *ow = (int)((double)W * max_side / H + 0.5);
        }
        if (*ow < 1) *ow = 1;
        if (*oh < 1) *oh = 1;
    }
}

int prepare_main(int argc, char **argv) {
    const char *src = NULL, *dst = NULL;
    int short_side = 0, max_side = 0, quality = 90;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--short-side") && i + 1 < argc)
            short_side = atoi(argv[++i]);
        else if (!strcmp(a, "--max-side") && i + 1 < argc)
            max_side = atoi(argv[++i]);
        else if (!strcmp(a, "--quality") && i + 1 < argc)
            quality = atoi(argv[++i]);
        else if (a[0] == '-')
            die_user("prepare: unknown or incomplete option '%s'", a);
        else if (!src)
            src = a;
        else if (!dst)
            dst = a;
        else
            die_user("prepare: unexpected argument '%s'", a);
    }
    if (!src || !dst) die_user("usage: simplest-dist prepare SRC DST (--short-side N | --max-side N) [--quality Q]");
    if ((short_side > 0) == (max_side > 0)) die_user("prepare: give exactly one of --short-side N and --max-side N");
    if (short_side < 0 || max_side < 0 || short_side > 65535 || max_side > 65535)
        die_user("prepare: the side must be 1..65535");
    if (quality < 1 || quality > 100) die_user("prepare: --quality must be 1..100");
    struct stat st;
    if (stat(src, &st) != 0 || !S_ISDIR(st.st_mode)) die_user("prepare: '%s' is not a directory", src);
    FileList files = {0};
    walk(&files, src, "", 0);
    qsort(files.rel, (size_t)files.n, sizeof(char *), cmp_str);
    if (mkdir_p(dst) != 0) die_user("prepare: cannot create '%s': %s", dst, strerror(errno));
    printf("prepare: %lld files from %s to %s (%s %d, quality %d, 4:2:0)\n", (long long)files.n, src, dst,
           short_side ? "short side" : "max side", short_side ? short_side : max_side, quality);
    fflush(stdout);
    int64_t done = 0, converted = 0, copied = 0, kept = 0, skipped = 0, failed_writes = 0;
    double t0 = now_sec(), last = t0;
#pragma omp parallel reduction(+ : converted, copied, kept, skipped, failed_writes)
    {
        JpegDecoder *dec = jpeg_decoder_create((int64_t)1 << 28, (size_t)1 << 30);
        tjhandle tj = tjInitCompress();
        Image full = {0}, out = {0}, crop = {0};
#pragma omp for schedule(dynamic, 4)
        for (int64_t i = 0; i < files.n; i++) {
            char in[8300], op[8300];
            snprintf(in, sizeof in, "%s/%s", src, files.rel[i]);
            snprintf(op, sizeof op, "%s/%s", dst, files.rel[i]);
            if (path_exists(op)) {  // a rerun resumes: the write was atomic, so an existing file is complete
                kept++;
            } else {
                size_t len = 0;
                unsigned char *buf = read_file_all(in, &len);
                int ok = 0;
                if (buf && is_image(files.rel[i]) && img_sniff(buf, len) == IMG_OK) {
                    int W, H, sd;
                    double box[4];
                    if (jpeg_open(dec, buf, len, &W, &H) == IMG_OK &&
                        jpeg_read_crop(dec, 0, 0, W, H, W, H, 0, &full, box, &sd) == IMG_OK) {
                        int ow, oh;
                        target_size(W, H, short_side, max_side, &ow, &oh);
                        double b[4] = {box[0], box[1], box[2], box[3]};
                        const Image *im = &full;
                        if (ow != W || oh != H) {
                            pil_resize_bilinear(&full, b, ow, oh, &out);
                            im = &out;
                        } else if ((int)box[0] != 0 || full.w != W) {  // extra columns: copy the exact image out
                            image_reserve(&crop, W, H, 3);
                            for (int y = 0; y < H; y++)
                                memcpy(crop.px + (size_t)y * crop.stride,
                                       full.px + (size_t)(y + (int)box[1]) * full.stride + (size_t)box[0] * 3,
                                       (size_t)W * 3);
                            im = &crop;
                        }
                        unsigned char *jpg = NULL;
                        unsigned long jlen = 0;
                        if (tjCompress2(tj, im->px, im->w, im->stride, im->h, TJPF_RGB, &jpg, &jlen, TJSAMP_420,
                                        quality, TJFLAG_ACCURATEDCT) == 0) {
                            if (write_atomic_mkdir(op, jpg, jlen) == 0)
                                converted++;
                            else
                                failed_writes++;
                            ok = 1;
                        }
                        tjFree(jpg);
                    } else {
                        jpeg_close(dec);
                    }
                    if (!ok) skipped++;
                } else if (buf && is_image(files.rel[i])) {
                    skipped++;  // PNG, zero bytes, unknown format: copied verbatim below
                }
                if (!ok) {
                    if (buf && write_atomic_mkdir(op, buf, len) == 0)
                        copied++;
                    else
                        failed_writes++;
                }
                free(buf);
            }
            int64_t d = __atomic_add_fetch(&done, 1, __ATOMIC_RELAXED);
            if (omp_get_thread_num() == 0 && (now_sec() - last >= 1.0 || d == files.n)) {
                double el = now_sec() - t0, rate = d / (el > 1e-9 ? el : 1e-9);
                printf("prepare: %lld/%lld files (%.1f %%), %.0f files/s, ETA %.0f s\n", (long long)d,
                       (long long)files.n, 100.0 * d / (files.n ? files.n : 1), rate, (files.n - d) / rate);
                fflush(stdout);
                last = now_sec();
            }
        }
        image_free(&full);
        image_free(&out);
        image_free(&crop);
        tjDestroy(tj);
        jpeg_decoder_free(dec);
    }
    double el = now_sec() - t0;
    printf("prepare: done in %.1f s: %lld re-encoded, %lld copied verbatim (%lld undecodable images), %lld already "
           "there, %lld write failures\n",
           el, (long long)converted, (long long)copied, (long long)skipped, (long long)kept, (long long)failed_writes);
    char json[2048], path[8300];
    int n = snprintf(json, sizeof json,
                     "{\"source\": \"%s\", \"files\": %lld, \"short_side\": %d, \"max_side\": %d, \"quality\": %d, "
                     "\"subsampling\": \"4:2:0\", \"converted\": %lld, \"copied\": %lld, \"skipped\": %lld, "
                     "\"write_failures\": %lld}\n",
                     src, (long long)files.n, short_side, max_side, quality, (long long)converted, (long long)copied,
                     (long long)skipped, (long long)failed_writes);
    snprintf(path, sizeof path, "%s/prepare.json", dst);
    if (write_file_atomic(path, json, (size_t)n) != 0) fprintf(stderr, "prepare: cannot write %s\n", path);
    for (int64_t i = 0; i < files.n; i++) free(files.rel[i]);
    free(files.rel);
    return failed_writes ? 1 : 0;
}
