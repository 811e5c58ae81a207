// bench_decode.c: the training input path per core: JPEG decode of the RandomResizedCrop box (libjpeg, crop-aware)
// + Pillow-exact bilinear resize to 224 + flip + normalize to fp32 CHW, on in-memory files (disk excluded, as the
// peer, tests/bench/torch_decode.py, does). Prints one JSON line per thread count: images/s in all and per thread.
//   bench_decode DIR [--threads 1,2] [--seconds 3] [--dct-scaling 0|1] [--size 224]
#include <dirent.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "data/augment.h"
#include "data/jpeg.h"
#include "rng.h"
#include "util.h"

typedef struct {
    unsigned char **data;
    size_t *len;
    int nfiles;
    int size, dct_scaling;
    double seconds;
    int tid;
    long images, skipped;
} Work;

static void *worker(void *arg) {
    Work *w = arg;
    JpegDecoder *d = jpeg_decoder_create(64ll << 20, 256u << 20);
    Image crop = {0}, out = {0};
    float *chw = xmalloc((size_t)3 * w->size * w->size * sizeof(float), "bench output");
    const float mean[3] = {0.485f, 0.456f, 0.406f}, std[3] = {0.229f, 0.224f, 0.225f};
    double t0 = now_sec();
    long i = 0;
    while (now_sec() - t0 < w->seconds) {
        for (int rep = 0; rep < 16; rep++, i++) {
            int f = (int)((i * 7 + w->tid * 13) % w->nfiles), W, H;
            Rng r = rng_stream(3407, RNG_AUG, (uint64_t)w->tid, (uint64_t)i);
            if (jpeg_open(d, w->data[f], w->len[f], &W, &H) != IMG_OK) {
                w->skipped++;
                continue;
            }
            int x, y, cw, ch, denom;
            rrc_params(&r, W, H, &x, &y, &cw, &ch);
            double box[4];
            if (jpeg_read_crop(d, x, y, cw, ch, w->size, w->size, w->dct_scaling, &crop, box, &denom) != IMG_OK) {
                w->skipped++;
                continue;
            }
            pil_resize_bilinear(&crop, box, w->size, w->size, &out);
            if (rng_uniform(&r) < 0.5) hflip(&out);
            normalize_chw(&out, mean, std, chw);
            w->images++;
        }
    }
    image_free(&crop);
    image_free(&out);
    free(chw);
    jpeg_decoder_free(d);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 2) die_user("usage: bench_decode DIR [--threads 1,2] [--seconds 3] [--dct-scaling 0|1] [--size 224]");
    const char *dir = argv[1], *threads = "1,2";
    double seconds = 3.0;
    int dct = 0, size = 224;
    for (int i = 2; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--threads")) threads = argv[i + 1];
        else if (!strcmp(argv[i], "--seconds")) seconds = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--dct-scaling")) dct = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--size")) size = atoi(argv[i + 1]);
        else die_user("bench_decode: unknown option %s", argv[i]);
    }
    DIR *dd = opendir(dir);
    if (!dd) die_user("bench_decode: cannot open directory '%s'", dir);
    unsigned char **data = NULL;
    size_t *len = NULL;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(dd))) {
        size_t l = strlen(e->d_name);
        if (l < 5 || (strcasecmp(e->d_name + l - 4, ".jpg") && strcasecmp(e->d_name + l - 5, ".jpeg"))) continue;
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        data = realloc(data, (size_t)(n + 1) * sizeof *data);
        len = realloc(len, (size_t)(n + 1) * sizeof *len);
        data[n] = read_file_all(path, &len[n]);
        if (!data[n]) die_user("bench_decode: cannot read '%s'", path);
        n++;
    }
    closedir(dd);
    if (n == 0) die_user("bench_decode: no .jpg files in '%s' (tests/bench/make_jpegs.py makes some)", dir);
    for (const char *p = threads; *p;) {
        int nt = atoi(p);
        Work *w = xcalloc((size_t)nt * sizeof(Work), "workers");
        pthread_t *th = xcalloc((size_t)nt * sizeof(pthread_t), "threads");
        double t0 = now_sec();
        for (int t = 0; t < nt; t++) {
            w[t] = (Work){data, len, n, size, dct, seconds, t, 0, 0};
            pthread_create(&th[t], NULL, worker, &w[t]);
        }
        long images = 0, skipped = 0;
        for (int t = 0; t < nt; t++) {
            pthread_join(th[t], NULL);
            images += w[t].images;
            skipped += w[t].skipped;
        }
        double el = now_sec() - t0;
        printf("{\"impl\": \"simplest-dist\", \"threads\": %d, \"files\": %d, \"size\": %d, \"dct_scaling\": %d, "
               "\"images\": %ld, \"skipped\": %ld, \"img_per_s\": %.1f, \"img_per_s_per_thread\": %.1f}\n",
               nt, n, size, dct, images, skipped, images / el, images / el / nt);
        fflush(stdout);
        free(w);
        free(th);
        p = strchr(p, ',');
        if (!p) break;
        p++;
    }
    return 0;
}
