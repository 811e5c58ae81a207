// bench_decode.c: the training input path per core, through the loader's own code (pipe_image): read the file,
// decode only the RandomResizedCrop box (libjpeg, crop-aware), Pillow-exact bilinear resize to 224, flip, normalize
// to fp32 CHW. RandAugment is off (the measured path); the files are small enough to stay in the page
// cache, as the peer (tests/bench/torch_decode.py) keeps them in memory. One PipeWorker per thread. Prints one
// JSON line per thread count: images/s in all and per thread.
//   bench_decode ROOT [--threads 1,2] [--seconds 3] [--dct-scaling 0|1] [--u8 0|1]
// --u8 1: the loader's default training output (data.u8_batches): uint8 HWC, the normalization left to the device.
// ROOT is an ImageFolder (ROOT/train/<class>/*.jpg), as tests/bench/make_jpegs.py writes it.
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "data/pipeline.h"
#include "util.h"

typedef struct {
    const Dataset *ds;
    double seconds;
    int tid, u8;
    long images, skipped;
} Work;

static void *worker(void *arg) {
    Work *w = arg;
    PipeWorker *pw = pipe_worker_create(w->ds);
    pipe_worker_set_u8(pw, w->u8);
    float *chw = xmalloc((size_t)3 * w->ds->height * w->ds->width * sizeof(float), "bench output");
    double t0 = now_sec();
    int64_t i = 0;
    while (now_sec() - t0 < w->seconds) {
        for (int rep = 0; rep < 16; rep++, i++) {
            int64_t idx = (i * 7 + w->tid * 13) % w->ds->n;
            // epoch = thread, key = i: every image draws its own crop and flip, as in training
            if (pipe_image(pw, w->ds, 1, 3407, w->tid, i, idx, chw) == IMG_OK)
                w->images++;
            else
                w->skipped++;
        }
    }
    free(chw);
    pipe_worker_free(pw);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 2)
        die_user("usage: bench_decode ROOT [--threads 1,2] [--seconds 3] [--dct-scaling 0|1] [--u8 0|1] "
                 "[--transform train|eval] [--randaugment 0|1]");
    const char *root = argv[1], *threads = "1,2";
    double seconds = 3.0;
    int dct = 0, u8 = 0, eval = 0, ra = 0;
    for (int i = 2; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--threads")) threads = argv[i + 1];
        else if (!strcmp(argv[i], "--seconds")) seconds = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--dct-scaling")) dct = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--u8")) u8 = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--transform")) eval = !strcmp(argv[i + 1], "eval");
        else if (!strcmp(argv[i], "--randaugment")) ra = atoi(argv[i + 1]);
        else die_user("bench_decode: unknown option %s", argv[i]);
    }
    Dataset ds;
    char err[1024];
    if (dataset_open(&ds, "imagenet", root, 1, 0, err, sizeof err) != 0) die_user("%s", err);
    data_options_default(&ds.opt);
    ds.opt.augment = !eval;  // RandomResizedCrop + flip, or Resize(256) + CenterCrop(224)
    ds.opt.flip = 1;
    ds.opt.randaugment = ra;  // RandAugment(2, 10) after the flip (train transform)
    ds.opt.dct_scaling = dct;
    for (const char *p = threads; *p;) {
        int nt = atoi(p);
        Work *w = xcalloc((size_t)nt * sizeof(Work), "workers");
        pthread_t *th = xcalloc((size_t)nt * sizeof(pthread_t), "threads");
        double t0 = now_sec();
        for (int t = 0; t < nt; t++) {
            w[t] = (Work){&ds, seconds, t, u8, 0, 0};
            pthread_create(&th[t], NULL, worker, &w[t]);
        }
        long images = 0, skipped = 0;
        for (int t = 0; t < nt; t++) {
            pthread_join(th[t], NULL);
            images += w[t].images;
            skipped += w[t].skipped;
        }
        double el = now_sec() - t0;
        printf("{\"impl\": \"simplest-dist\", \"threads\": %d, \"files\": %lld, \"size\": %d, \"dct_scaling\": %d, "
               "\"transform\": \"%s\", \"output\": \"%s\", \"images\": %ld, \"skipped\": %ld, \"img_per_s\": %.1f, "
               "\"img_per_s_per_thread\": %.1f}\n",
               nt, (long long)ds.n, ds.width, dct,
               eval ? "Resize(256) + CenterCrop(224)" : ra ? "RandomResizedCrop + flip + RandAugment(2, 10)" : "RandomResizedCrop + flip",
               u8 ? "uint8 HWC (normalized on the device)" : "fp32 CHW normalized", images, skipped, images / el,
               images / el / nt);
        fflush(stdout);
        free(w);
        free(th);
        p = strchr(p, ',');
        if (!p) break;
        p++;
    }
    dataset_free(&ds);
    return 0;
}
