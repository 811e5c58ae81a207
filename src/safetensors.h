// safetensors.h: the safetensors container (u64 LE header length, JSON header, raw little-endian data) and .npy
// float32 arrays. Readers validate everything and report one line naming the file and the problem.
#pragma once
#include <stddef.h>
#include <stdint.h>

typedef struct cJSON cJSON;

typedef struct {
    char name[160];
    char dtype[8];  // "F32", "I32", "I64", ...
    int ndim;
    int64_t shape[8];
    size_t numel;
    size_t begin, end;  // byte range within the data section
} StTensor;

typedef struct {
    unsigned char *file;  // the whole file
    size_t len;
    size_t data_start;  // 8 + header length
    StTensor *tensors;
    int ntensors;
    cJSON *metadata;  // the __metadata__ object, or NULL
} StFile;

// Opens and validates a file. Returns 0, or -1 with a one-line reason (naming the path) in err.
int st_open(const char *path, StFile *f, char *err, size_t errlen);
void st_close(StFile *f);
const StTensor *st_find(const StFile *f, const char *name);
const void *st_data(const StFile *f, const StTensor *t);
const char *st_meta(const StFile *f, const char *key);  // a __metadata__ string, or NULL

typedef struct {
    const char *name;
    const char *dtype;  // "F32", "I32" or "I64"
    int ndim;
    int64_t shape[8];
    const void *data;
} StEntry;

// Writes entries in the given order with string metadata pairs (keys[i] -> vals[i]), atomically.
// Returns 0, or -1 with errno set.
int st_write(const char *path, const StEntry *entries, int n, const char *const *keys, const char *const *vals,
             int nmeta);

// .npy float32, C order. npy_read returns the data (malloc'd) and its shape; NULL with a reason in err.
float *npy_read_f32(const char *path, int64_t *shape, int *ndim, char *err, size_t errlen);
int npy_write_f32(const char *path, const float *data, const int64_t *shape, int ndim);
