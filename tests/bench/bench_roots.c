// bench_roots.c: time of one inverse root (eigendecomposition + root build) by factor size, fp64 and fp32, with
// 1 and all LAPACK threads: the measured part of the Shampoo refresh cost (docs/benchmarks.md, docs/scaling.md).
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>

#include "backend.h"
#include "rng.h"
#include "shampoo.h"
#include "util.h"

int main(int argc, char **argv) {
    backend_cpu_fix_blas_core(argv);
    int sizes[] = {128, 256, 384, 512, 768, 1024};
    int nsizes = (int)(sizeof sizes / sizeof sizes[0]);
    int all = openblas_get_num_procs();
    printf("{\"bench\": \"shampoo inverse root\", \"threads_all\": %d, \"rows\": [\n", all);
    for (int si = 0; si < nsizes; si++) {
        int n = sizes[si];
        float *G = malloc((size_t)n * 2 * n * sizeof(float)), *F = calloc((size_t)n * n, sizeof(float));
        float *X = malloc((size_t)n * n * sizeof(float));
        Rng r = rng_stream(1, 2, (uint64_t)n, 0);
        for (size_t i = 0; i < (size_t)n * 2 * n; i++) G[i] = (float)rng_normal(&r);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, 2 * n, 1.0f / n, G, 2 * n, G, 2 * n, 0.0f, F, n);
        for (int fp64 = 1; fp64 >= 0; fp64--)
            for (int th = 1; th <= all; th += all - 1 > 0 ? all - 1 : 1) {
                openblas_set_num_threads(th);
                double best = 1e9;
                for (int rep = 0; rep < 3; rep++) {
                    double t0 = now_sec();
                    CHECK(shampoo_inverse_root(F, n, 1.0, 4, 1e-12, fp64, X) == 0, "root failed");
                    best = best < now_sec() - t0 ? best : now_sec() - t0;
                }
                printf("  {\"n\": %d, \"dtype\": \"%s\", \"threads\": %d, \"ms\": %.1f}%s\n", n, fp64 ? "fp64" : "fp32", th,
                       1e3 * best, si == nsizes - 1 && fp64 == 0 && th == all ? "" : ",");
                if (all == 1) break;
            }
        free(G);
        free(F);
        free(X);
    }
    printf("]}\n");
    return 0;
}
