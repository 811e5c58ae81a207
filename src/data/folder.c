// folder.c: class-folder datasets (spec/data.md §1.1, §1.2, §1.5): ImageNet after extract_ILSVRC.sh as
// torchvision's ImageFolder reads it (class = position of the sorted folder name, files in bytewise order of their
// relative path, only .jpeg/.jpg/.png in any case), and TinyImageNet-200 in its zip layout or in the class-folder
// layout of the reference's download script, both mapped onto the keys <wnid>/<wnid>_<k>.JPEG.
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

#include "data/dataset.h"
#include "util.h"

typedef struct {
    char *key;   // "<class>/<relative path>" (Tiny: "<wnid>/<file name>")
    char *path;  // the file
    int32_t label;
} Entry;

typedef struct {
    Entry *e;
    int64_t n, cap;
} EntryList;

static void push(EntryList *l, const char *key, const char *path, int32_t label) {
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 1024;
        Entry *ne = realloc(l->e, (size_t)l->cap * sizeof(Entry));
        CHECK(ne, "out of memory listing dataset files");
        l->e = ne;
    }
    l->e[l->n++] = (Entry){xstrdup(key), xstrdup(path), label};
}

static void entries_free(EntryList *l) {
    for (int64_t i = 0; i < l->n; i++) {
        free(l->e[i].key);
        free(l->e[i].path);
    }
    free(l->e);
    memset(l, 0, sizeof *l);
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static int cmp_entry(const void *a, const void *b) {
    const Entry *x = a, *y = b;
    if (x->label != y->label) return x->label < y->label ? -1 : 1;
    return strcmp(x->key, y->key);
}

static int is_dir(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

// Sorted names in dir (dirs_only: subdirectories only; else every entry). NULL if dir cannot be opened.
static char **list_dir(const char *dir, int dirs_only, int *count) {
    DIR *d = opendir(dir);
    if (!d) return NULL;
    int n = 0, cap = 64;
    char **names = xmalloc((size_t)cap * sizeof(char *), "directory listing");
    struct dirent *de;
    char path[4096];
    while ((de = readdir(d))) {
        if (de->d_name[0] == '.') continue;  // ".", ".." and hidden entries (as os.scandir-based finders skip none,
                                             // but hidden folders are never classes in these datasets)
        if (dirs_only) {
            snprintf(path, sizeof path, "%s/%s", dir, de->d_name);
            if (!is_dir(path)) continue;
        }
        if (n == cap) {
            cap *= 2;
            char **nn = realloc(names, (size_t)cap * sizeof(char *));
            CHECK(nn, "out of memory listing %s", dir);
            names = nn;
        }
        names[n++] = xstrdup(de->d_name);
    }
    closedir(d);
    qsort(names, (size_t)n, sizeof(char *), cmp_str);
    *count = n;
    return names;
}

static void free_names(char **names, int n) {
    for (int i = 0; i < n; i++) free(names[i]);
    free(names);
}

static int image_ext(const char *name) {
    const char *dot = strrchr(name, '.');
    return dot && (!strcasecmp(dot, ".jpeg") || !strcasecmp(dot, ".jpg") || !strcasecmp(dot, ".png"));
}

// Every image file under dir (recursively), keyed "<prefix>/<relative path>" or, with flat, "<prefix>/<name>".
static void walk(EntryList *l, const char *dir, const char *rel, const char *prefix, int flat, int32_t label,
                 int depth) {
    int n;
    char **names = list_dir(dir, 0, &n);
    if (!names || depth > 16) {
        if (names) free_names(names, n);
        return;
    }
    char path[4096], r[4096], key[4400];
    for (int i = 0; i < n; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        snprintf(r, sizeof r, "%s%s%s", rel, rel[0] ? "/" : "", names[i]);
        if (is_dir(path)) {
            walk(l, path, r, prefix, flat, label, depth + 1);
        } else if (image_ext(names[i])) {
            snprintf(key, sizeof key, "%s/%s", prefix, flat ? names[i] : r);
            push(l, key, path, label);
        }
    }
    free_names(names, n);
}

// Moves the sorted entries into ds (paths, labels, fingerprint).
static void fill(Dataset *ds, EntryList *l, int num_classes) {
    qsort(l->e, (size_t)l->n, sizeof(Entry), cmp_entry);
    ds->n = ds->n_paths = l->n;
    ds->num_classes = num_classes;
    ds->paths = xmalloc((size_t)(l->n ? l->n : 1) * sizeof(char *), "file paths");
    ds->labels = xmalloc((size_t)(l->n ? l->n : 1) * sizeof(int32_t), "labels");
    uint64_t fp = 0xCBF29CE484222325ULL;
    for (int64_t i = 0; i < l->n; i++) {
        ds->paths[i] = l->e[i].path;
        ds->labels[i] = l->e[i].label;
        fp = dataset_fingerprint_add(fp, l->e[i].key, l->e[i].label);
        free(l->e[i].key);
    }
    free(l->e);
    memset(l, 0, sizeof *l);
    ds->fingerprint = fp;
    data_options_default(&ds->opt);
}

int dataset_load_folder(Dataset *ds, const char *dir, char *err, size_t n) {
    memset(ds, 0, sizeof *ds);
    int nc;
    char **classes = list_dir(dir, 1, &nc);
    if (!classes) return set_err(err, n, "dataset folder '%s': cannot open: %s", dir, strerror(errno));
    if (nc == 0) {
        free(classes);
        return set_err(err, n, "dataset folder '%s': no class folders", dir);
    }
    EntryList l = {0};
    char path[4096];
    for (int c = 0; c < nc; c++) {
        int64_t before = l.n;
        snprintf(path, sizeof path, "%s/%s", dir, classes[c]);
        walk(&l, path, "", classes[c], 0, c, 0);
        if (l.n == before) {
            set_err(err, n, "dataset folder '%s': class folder '%s' holds no .jpeg/.jpg/.png file", dir, classes[c]);
            free_names(classes, nc);
            entries_free(&l);
            return -1;
        }
    }
    free_names(classes, nc);
    fill(ds, &l, nc);
    snprintf(ds->name, sizeof ds->name, "imagefolder");
    return 0;
}

// Position of wnid in the sorted list, or -1.
static int class_of(char **classes, int nc, const char *wnid) {
    const char *key = wnid;
    char **hit = bsearch(&key, classes, (size_t)nc, sizeof(char *), cmp_str);
    return hit ? (int)(hit - classes) : -1;
}

int dataset_load_tiny(Dataset *ds, const char *root, int train, char *err, size_t n) {
    memset(ds, 0, sizeof *ds);
    char path[4096], split[2048];
    snprintf(split, sizeof split, "%s/%s", root, train ? "train" : "val");
    // The classes: the train folders (sorted), so that both splits share them; else the split's own folders.
    int nc;
    snprintf(path, sizeof path, "%s/train", root);
    char **classes = list_dir(is_dir(path) ? path : split, 1, &nc);
    if (!classes || nc == 0) {
        if (classes) free(classes);
        return set_err(err, n, "dataset folder '%s': no TinyImageNet class folders in %s", root, path);
    }
    EntryList l = {0};
    char ann[2100];
    snprintf(ann, sizeof ann, "%s/val_annotations.txt", split);
    if (!train && path_exists(ann)) {  // zip layout: val/images/val_<k>.JPEG, wnid from val_annotations.txt
        FILE *f = fopen(ann, "r");
        if (!f) {
            free_names(classes, nc);
            return set_err(err, n, "dataset file '%s': cannot open: %s", ann, strerror(errno));
        }
        char line[1024];
        int lineno = 0;
        while (fgets(line, sizeof line, f)) {
            lineno++;
            char *file = strtok(line, "\t\r\n"), *wnid = strtok(NULL, "\t\r\n");
            if (!file) continue;
            int c = wnid ? class_of(classes, nc, wnid) : -1;
            const char *k = strrchr(file, '_');
            if (c < 0 || !k) {
                fclose(f);
                free_names(classes, nc);
                entries_free(&l);
                return set_err(err, n, "dataset file '%s': line %d: unknown wnid or file name", ann, lineno);
            }
            char key[1100];
            snprintf(key, sizeof key, "%s/%s%s", wnid, wnid, k);  // val_<k>.JPEG -> <wnid>/<wnid>_<k>.JPEG
            snprintf(path, sizeof path, "%s/images/%s", split, file);
            push(&l, key, path, c);
        }
        fclose(f);
    } else {  // class folders: train/<wnid>/images/*.JPEG (zip) or <split>/<wnid>/*.JPEG (download script)
        int ns;
        char **dirs = list_dir(split, 1, &ns);
        if (!dirs) {
            free_names(classes, nc);
            return set_err(err, n, "dataset folder '%s': cannot open: %s", split, strerror(errno));
        }
        for (int i = 0; i < ns; i++) {
            if (!train && !strcmp(dirs[i], "images")) continue;
            int c = class_of(classes, nc, dirs[i]);
            if (c < 0) {
                set_err(err, n, "dataset folder '%s': class folder '%s' is not a training class", split, dirs[i]);
                free_names(dirs, ns);
                free_names(classes, nc);
                entries_free(&l);
                return -1;
            }
            snprintf(path, sizeof path, "%s/%s", split, dirs[i]);
            walk(&l, path, "", dirs[i], 1, c, 0);
        }
        free_names(dirs, ns);
    }
    free_names(classes, nc);
    if (l.n == 0) {
        entries_free(&l);
        return set_err(err, n, "dataset folder '%s': no images", split);
    }
    fill(ds, &l, nc);
    snprintf(ds->name, sizeof ds->name, "tiny-imagenet");
    return 0;
}
