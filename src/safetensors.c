// safetensors.c: see safetensors.h.
#include "safetensors.h"

#include <cJSON.h>
#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

#define ST_MAX_HEADER (100u << 20)

static size_t dtype_size(const char *dt) {
    if (!strcmp(dt, "F32") || !strcmp(dt, "I32") || !strcmp(dt, "U32")) return 4;
    if (!strcmp(dt, "I64") || !strcmp(dt, "U64") || !strcmp(dt, "F64")) return 8;
    if (!strcmp(dt, "F16") || !strcmp(dt, "BF16") || !strcmp(dt, "I16")) return 2;
    if (!strcmp(dt, "U8") || !strcmp(dt, "I8") || !strcmp(dt, "BOOL")) return 1;
    return 0;
}

static uint64_t read_le64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

// Parses one header entry into t; returns 0 or -1 with a reason.
static int parse_entry(const cJSON *item, size_t data_len, StTensor *t, const char *path, char *err, size_t n) {
    if (strlen(item->string) >= sizeof t->name) return set_err(err, n, "%s: tensor name too long", path);
    strcpy(t->name, item->string);
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(item, "dtype");
    const cJSON *sh = cJSON_GetObjectItemCaseSensitive(item, "shape");
    const cJSON *off = cJSON_GetObjectItemCaseSensitive(item, "data_offsets");
    if (!cJSON_IsString(dt) || !cJSON_IsArray(sh) || !cJSON_IsArray(off) || cJSON_GetArraySize(off) != 2)
        return set_err(err, n, "%s: tensor '%s' has a malformed header entry", path, t->name);
    size_t es = dtype_size(dt->valuestring);
    if (!es || strlen(dt->valuestring) >= sizeof t->dtype)
        return set_err(err, n, "%s: tensor '%s' has unknown dtype '%s'", path, t->name, dt->valuestring);
    strcpy(t->dtype, dt->valuestring);
    t->ndim = cJSON_GetArraySize(sh);
    if (t->ndim > 8) return set_err(err, n, "%s: tensor '%s' has more than 8 dims", path, t->name);
    t->numel = 1;
    for (int i = 0; i < t->ndim; i++) {
        const cJSON *d = cJSON_GetArrayItem(sh, i);
        if (!cJSON_IsNumber(d) || d->valuedouble < 0 || d->valuedouble > 1e12 ||
            d->valuedouble != (double)(int64_t)d->valuedouble)
            return set_err(err, n, "%s: tensor '%s' has a bad shape", path, t->name);
        t->shape[i] = (int64_t)d->valuedouble;
        if (t->shape[i] > 0 && t->numel > (SIZE_MAX / 8) / (size_t)t->shape[i])
            return set_err(err, n, "%s: tensor '%s' has a bad shape", path, t->name);
        t->numel *= (size_t)t->shape[i];
    }
    const cJSON *b = cJSON_GetArrayItem(off, 0), *e = cJSON_GetArrayItem(off, 1);
    if (!cJSON_IsNumber(b) || !cJSON_IsNumber(e) || b->valuedouble < 0 || e->valuedouble < b->valuedouble ||
        e->valuedouble > (double)data_len || b->valuedouble != (double)(int64_t)b->valuedouble ||
        e->valuedouble != (double)(int64_t)e->valuedouble)
        return set_err(err, n, "%s: tensor '%s' has data offsets outside the file (truncated?)", path, t->name);
    t->begin = (size_t)b->valuedouble;
    t->end = (size_t)e->valuedouble;
    if (t->end - t->begin != t->numel * es)
        return set_err(err, n, "%s: tensor '%s' has %zu bytes for %zu elements of %s", path, t->name, t->end - t->begin,
                    t->numel, t->dtype);
    return 0;
}

static int cmp_name(const void *a, const void *b) { return strcmp(*(const char *const *)a, *(const char *const *)b); }

// A key that an object names twice (sorted, so O(k log k)), or NULL; NULL for a non-object. The pointer lives in obj.
static const char *duplicate_key(const cJSON *obj) {
    if (!cJSON_IsObject(obj)) return NULL;
    int count = cJSON_GetArraySize(obj);
    if (count < 2) return NULL;
    const char **names = xmalloc((size_t)count * sizeof(char *), "safetensors keys");
    int k = 0;
    for (const cJSON *it = obj->child; it; it = it->next) names[k++] = it->string;
    qsort(names, (size_t)k, sizeof(char *), cmp_name);
    const char *dup = NULL;
    for (int i = 1; i < k && !dup; i++)
        if (!strcmp(names[i - 1], names[i])) dup = names[i];
    free(names);
    return dup;
}

int st_open(const char *path, StFile *f, char *err, size_t n) {
    memset(f, 0, sizeof *f);
    f->file = read_file_all(path, &f->len);
    if (!f->file) return set_err(err, n, "%s: cannot read: %s", path, strerror(errno));
    if (f->len < 8) {
        set_err(err, n, "%s: not a safetensors file (%zu bytes)", path, f->len);
        st_close(f);
        return -1;
    }
    uint64_t hlen = read_le64(f->file);
    if (hlen > ST_MAX_HEADER || hlen > f->len - 8) {
        set_err(err, n, "%s: not a safetensors file (header length %llu, file %zu bytes)", path,
                (unsigned long long)hlen, f->len);
        st_close(f);
        return -1;
    }
    f->data_start = 8 + (size_t)hlen;
    cJSON *root = cJSON_ParseWithLength((const char *)f->file + 8, (size_t)hlen);
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        st_close(f);
        return set_err(err, n, "%s: safetensors header is not a JSON object", path);
    }
    int count = cJSON_GetArraySize(root);
    // A key given twice (cJSON keeps both), at the top level, in __metadata__ or in an entry: which one a reader
    // would take is undefined (serde-based readers take the last, cJSON's lookups the first), so the file is refused.
    const char *dup = duplicate_key(root);
    for (const cJSON *it = root->child; !dup && it; it = it->next) dup = duplicate_key(it);
    if (dup) {
        set_err(err, n, "%s: safetensors header names '%s' twice in one object", path, dup);
        cJSON_Delete(root);
        st_close(f);
        return -1;
    }
    f->tensors = xcalloc((size_t)(count ? count : 1) * sizeof(StTensor), "safetensors index");
    size_t data_len = f->len - f->data_start;
    const cJSON *item;
    cJSON_ArrayForEach(item, root) {
        if (!strcmp(item->string, "__metadata__")) {
            if (!cJSON_IsObject(item)) {
                cJSON_Delete(root);
                st_close(f);
                return set_err(err, n, "%s: safetensors __metadata__ is not a JSON object", path);
            }
            f->metadata = cJSON_Duplicate(item, 1);
            continue;
        }
        if (parse_entry(item, data_len, &f->tensors[f->ntensors], path, err, n) != 0) {
            cJSON_Delete(root);
            st_close(f);
            return -1;
        }
        f->ntensors++;
    }
    cJSON_Delete(root);
    return 0;
}

void st_close(StFile *f) {
    free(f->file);
    free(f->tensors);
    cJSON_Delete(f->metadata);
    memset(f, 0, sizeof *f);
}

const StTensor *st_find(const StFile *f, const char *name) {
    for (int i = 0; i < f->ntensors; i++)
        if (!strcmp(f->tensors[i].name, name)) return &f->tensors[i];
    return NULL;
}

const void *st_data(const StFile *f, const StTensor *t) { return f->file + f->data_start + t->begin; }

const char *st_meta(const StFile *f, const char *key) {
    const cJSON *v = f->metadata ? cJSON_GetObjectItemCaseSensitive(f->metadata, key) : NULL;
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

int st_write(const char *path, const StEntry *e, int n, const char *const *keys, const char *const *vals, int nmeta) {
    cJSON *root = cJSON_CreateObject();
    if (nmeta > 0) {
        cJSON *meta = cJSON_AddObjectToObject(root, "__metadata__");
        for (int i = 0; i < nmeta; i++) cJSON_AddStringToObject(meta, keys[i], vals[i]);
    }
    size_t off = 0;
    for (int i = 0; i < n; i++) {
        cJSON *t = cJSON_AddObjectToObject(root, e[i].name);
        cJSON_AddStringToObject(t, "dtype", e[i].dtype);
        cJSON *sh = cJSON_AddArrayToObject(t, "shape");
        size_t numel = 1;
        for (int d = 0; d < e[i].ndim; d++) {
            cJSON_AddItemToArray(sh, cJSON_CreateNumber((double)e[i].shape[d]));
            numel *= (size_t)e[i].shape[d];
        }
        size_t bytes = numel * dtype_size(e[i].dtype);
        cJSON *offs = cJSON_AddArrayToObject(t, "data_offsets");
        cJSON_AddItemToArray(offs, cJSON_CreateNumber((double)off));
        cJSON_AddItemToArray(offs, cJSON_CreateNumber((double)(off + bytes)));
        off += bytes;
    }
    char *hdr = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    size_t hlen = strlen(hdr), padded = (hlen + 7) & ~(size_t)7;
    size_t total = 8 + padded + off;
    unsigned char *buf = xmalloc(total, "safetensors file");
    for (int i = 0; i < 8; i++) buf[i] = (unsigned char)((uint64_t)padded >> (8 * i));
    memcpy(buf + 8, hdr, hlen);
    memset(buf + 8 + hlen, ' ', padded - hlen);
    free(hdr);
    unsigned char *p = buf + 8 + padded;
    for (int i = 0; i < n; i++) {
        size_t numel = 1;
        for (int d = 0; d < e[i].ndim; d++) numel *= (size_t)e[i].shape[d];
        size_t bytes = numel * dtype_size(e[i].dtype);
        memcpy(p, e[i].data, bytes);  // x86-64 and aarch64 are little-endian, as the format is
        p += bytes;
    }
    int rc = write_file_atomic(path, buf, total);
    free(buf);
    return rc;
}

// ---------------------------------------------------------------- npy

float *npy_read_f32(const char *path, int64_t *shape, int *ndim, char *err, size_t n) {
    size_t len;
    unsigned char *f = read_file_all(path, &len);
    if (!f) {
        set_err(err, n, "%s: cannot read: %s", path, strerror(errno));
        return NULL;
    }
    float *out = NULL;
    if (len < 10 || memcmp(f, "\x93NUMPY", 6) != 0) {
        set_err(err, n, "%s: not a .npy file", path);
        goto done;
    }
    int major = f[6];
    size_t hlen = major == 1 ? (size_t)(f[8] | f[9] << 8) : (len >= 12 ? (size_t)(f[8] | f[9] << 8 | f[10] << 16) : 0);
    size_t hstart = major == 1 ? 10 : 12;
    if (hstart + hlen > len) {
        set_err(err, n, "%s: truncated .npy header", path);
        goto done;
    }
    char hdr[4096];
    size_t hl = hlen < sizeof hdr - 1 ? hlen : sizeof hdr - 1;
    memcpy(hdr, f + hstart, hl);
    hdr[hl] = 0;
    if (!strstr(hdr, "'descr': '<f4'") || !strstr(hdr, "'fortran_order': False")) {
        set_err(err, n, "%s: must be float32 ('<f4') in C order", path);
        goto done;
    }
    char *sp = strstr(hdr, "'shape': (");
    if (!sp) {
        set_err(err, n, "%s: .npy header has no shape", path);
        goto done;
    }
    sp += 10;
    *ndim = 0;
    size_t numel = 1;
    while (*sp && *sp != ')') {
        char *end;
        long long v = strtoll(sp, &end, 10);
        if (end == sp) break;
        if (*ndim >= 8 || v < 0 || (v > 0 && numel > (SIZE_MAX / 4) / (size_t)v)) {
            set_err(err, n, "%s: bad .npy shape", path);
            goto done;
        }
        shape[(*ndim)++] = v;
        numel *= (size_t)v;
        sp = end;
        while (*sp == ',' || *sp == ' ') sp++;
    }
    if (hstart + hlen + numel * 4 != len) {
        set_err(err, n, "%s: .npy data has %zu bytes, shape needs %zu", path, len - hstart - hlen, numel * 4);
        goto done;
    }
    out = xmalloc(numel * 4, path);
    memcpy(out, f + hstart + hlen, numel * 4);
done:
    free(f);
    return out;
}

int npy_write_f32(const char *path, const float *data, const int64_t *shape, int ndim) {
    char dict[512];
    int k = snprintf(dict, sizeof dict, "{'descr': '<f4', 'fortran_order': False, 'shape': (");
    size_t numel = 1;
    for (int i = 0; i < ndim; i++) {
        k += snprintf(dict + k, sizeof dict - k, "%lld,%s", (long long)shape[i], i + 1 < ndim ? " " : "");
        numel *= (size_t)shape[i];
    }
    k += snprintf(dict + k, sizeof dict - k, "), }");
    size_t hlen = 10 + (size_t)k + 1, padded = (hlen + 63) & ~(size_t)63;
    size_t total = padded + numel * 4;
    unsigned char *buf = xmalloc(total, "npy file");
    memcpy(buf, "\x93NUMPY\x01\x00", 8);
    size_t dl = padded - 10;
    buf[8] = (unsigned char)(dl & 0xff);
    buf[9] = (unsigned char)(dl >> 8);
    memcpy(buf + 10, dict, (size_t)k);
    memset(buf + 10 + k, ' ', padded - 10 - (size_t)k - 1);
    buf[padded - 1] = '\n';
    memcpy(buf + padded, data, numel * 4);
    int rc = write_file_atomic(path, buf, total);
    free(buf);
    return rc;
}
