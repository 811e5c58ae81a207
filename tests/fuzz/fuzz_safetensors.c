// fuzz_safetensors.c: the safetensors and .npy readers (src/safetensors.c) on arbitrary bytes. An accepted file's
// every tensor is read whole (so ASan sees any range that passes the file's end) and looked up by name.
#include "fuzz.h"
#include "safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char path[300], err[512];
    fuzz_write(fuzz_path(path, sizeof path, "x.safetensors"), data, size);
    StFile f;
    err[0] = 0;
    if (st_open(path, &f, err, sizeof err) == 0) {
        volatile uint8_t sink = 0;
        for (int i = 0; i < f.ntensors; i++) {
            const StTensor *t = &f.tensors[i];
            if (st_find(&f, t->name) != t) abort();  // every listed tensor is found by its name, as itself
            const uint8_t *p = st_data(&f, t);
            for (size_t b = t->begin; b < t->end; b++) sink ^= p[b - t->begin];
        }
        const char *m = st_meta(&f, "step");
        if (m) sink ^= (uint8_t)strlen(m);
        (void)sink;
        st_close(&f);
    } else if (!err[0]) {
        abort();  // a refusal must say why
    }
    fuzz_write(fuzz_path(path, sizeof path, "x.npy"), data, size);
    int64_t shape[8];
    int ndim = 0;
    err[0] = 0;
    float *a = npy_read_f32(path, shape, &ndim, err, sizeof err);
    if (a) {
        size_t n = 1;
        for (int i = 0; i < ndim; i++) n *= (size_t)shape[i];
        volatile float s = 0;
        for (size_t i = 0; i < n; i++) s += a[i];
        (void)s;
        free(a);
    } else if (!err[0]) {
        abort();
    }
    return 0;
}

#ifdef SD_FUZZ_STANDALONE
// Seeds: a safetensors file with F32, I32 and I64 tensors (a scalar, an empty one) and metadata; an .npy array.
int fuzz_write_seeds(const char *dir) {
    float w[6] = {1, -2, 3.5f, 0, 1e-30f, -7};
    int32_t i32[1] = {42};
    int64_t i64[3] = {-1, 0, 1LL << 40};
    StEntry e[4] = {{"w", "F32", 2, {2, 3}, w}, {"step", "I32", 0, {0}, i32}, {"ids", "I64", 1, {3}, i64},
                    {"empty", "F32", 2, {0, 4}, w}};
    const char *keys[2] = {"format", "step"}, *vals[2] = {"pt", "12"};
    char p[600];
    snprintf(p, sizeof p, "%s/tensors.safetensors", dir);
    if (st_write(p, e, 4, keys, vals, 2) != 0) return -1;
    int64_t shape[3] = {2, 1, 3};
    snprintf(p, sizeof p, "%s/array.npy", dir);
    return npy_write_f32(p, w, shape, 3);
}
#endif
