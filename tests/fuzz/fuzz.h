// fuzz.h: what the fuzz targets in tests/fuzz share. Each target defines LLVMFuzzerTestOneInput, which feeds one
// input to the readers of files a user hands the daemon (config, weights, Shampoo state, datasets, images). Every
// reader must answer bad bytes with an error (or a skipped image), never a crash, a sanitizer report or an exit.
//
// Built two ways (Makefile):
//   make fuzz         clang + libFuzzer + ASan/UBSan: coverage-guided fuzzing for FUZZ_S seconds per target
//   make fuzz-bins    gcc + ASan/UBSan with the standalone main below, in build-asan/fuzz/; `make test` runs every
//                     file of tests/fuzz/corpus/<target>/ (seeds, merged fuzzer inputs and every input that once
//                     failed) through its target (tests/cli/test_fuzz_corpus.sh)
#pragma once
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

// A private folder for this process's files (removed at exit), made on first use.
static char fuzz_dir_path[256];
static void fuzz_dir_remove(void) {
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", fuzz_dir_path);
    if (system(cmd) != 0) fprintf(stderr, "fuzz: could not remove %s\n", fuzz_dir_path);
}
static const char *fuzz_dir(void) {
    if (!fuzz_dir_path[0]) {
        const char *t = getenv("TMPDIR");
        snprintf(fuzz_dir_path, sizeof fuzz_dir_path, "%s/sd-fuzz-XXXXXX", t && *t ? t : "/tmp");
        if (!mkdtemp(fuzz_dir_path)) {
            perror("fuzz: mkdtemp");
            abort();
        }
        atexit(fuzz_dir_remove);
    }
    return fuzz_dir_path;
}

// Writes bytes to a file (replacing it); aborts on an I/O error, which is the harness's fault, not the target's.
static void fuzz_write(const char *path, const uint8_t *data, size_t size) {
    FILE *f = fopen(path, "wb");
    if (!f || (size && fwrite(data, 1, size, f) != size) || fclose(f) != 0) {
        perror(path);
        abort();
    }
}

// Joins fuzz_dir() and a relative name into out.
static const char *fuzz_path(char *out, size_t n, const char *name) {
    snprintf(out, n, "%s/%s", fuzz_dir(), name);
    return out;
}

#ifdef SD_FUZZ_STANDALONE
// The regression driver: runs the target on each file named, or on each file of each folder named (sorted), and
// prints how many ran. A sanitizer report or a crash ends the process non-zero, naming the input first.
static int fuzz_name_cmp(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static int fuzz_run_file(const char *path) {
    size_t n = 0;
    uint8_t *buf = read_file_all(path, &n);
    if (!buf) {
        perror(path);
        return -1;
    }
    fprintf(stderr, "input %s\n", path);
    LLVMFuzzerTestOneInput(buf, n);
    free(buf);
    return 0;
}

// Each target's seeds: valid inputs of each kind it reads, written into dir (`--write-seeds DIR`).
int fuzz_write_seeds(const char *dir);

int main(int argc, char **argv) {
    if (argc == 3 && !strcmp(argv[1], "--write-seeds")) return fuzz_write_seeds(argv[2]) == 0 ? 0 : 1;
    int ran = 0, bad = 0;
    for (int a = 1; a < argc; a++) {
        struct stat st;
        if (stat(argv[a], &st) != 0) {
            perror(argv[a]);
            bad++;
            continue;
        }
        if (!S_ISDIR(st.st_mode)) {
            if (fuzz_run_file(argv[a]) == 0) ran++; else bad++;
            continue;
        }
        DIR *d = opendir(argv[a]);
        if (!d) {
            perror(argv[a]);
            bad++;
            continue;
        }
        char **names = NULL;
        size_t count = 0;
        for (struct dirent *e; (e = readdir(d));) {
            if (e->d_name[0] == '.') continue;
            names = realloc(names, (count + 1) * sizeof *names);
            names[count] = malloc(strlen(argv[a]) + strlen(e->d_name) + 2);
            sprintf(names[count++], "%s/%s", argv[a], e->d_name);
        }
        closedir(d);
        qsort(names, count, sizeof *names, fuzz_name_cmp);
        for (size_t i = 0; i < count; i++) {
            if (fuzz_run_file(names[i]) == 0) ran++; else bad++;
            free(names[i]);
        }
        free(names);
    }
    printf("%d inputs ran, %d unreadable\n", ran, bad);
    return bad || ran == 0 ? 1 : 0;
}
#endif
