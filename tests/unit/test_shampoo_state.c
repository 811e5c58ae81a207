// test_shampoo_state.c: Shampoo's optimizer state round trip (spec/shampoo.md §3.5, property 17 at one rank).
// A run saved mid-interval, or at a refresh step with root_delay 1 (roots pending), or with root_delay 4 and 5 (= f)
// while a refresh is pending for more than the next step (saved as its factor snapshot and recomputed on resume),
// and resumed into a fresh optimizer continues bit for bit like the uninterrupted run. A pending refresh resumed
// under another f and d is installed before the next refresh starts. A state file for another model, a bad
// pending_t or a missing pending factor is refused with one line naming the file (and the tensor), and the optimizer
// is left as it was.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "rng.h"
#include "safetensors.h"
#include "shampoo.h"
#include "testlib.h"

static ModelConfig tiny(void) {
    ModelConfig c = {.arch = ARCH_SIMPLEST, .image_size = 8, .patch_size = 2, .channels = 3, .num_classes = 5,
                     .dim = 16, .depth = 7, .heads = 2, .mlp_dim = 64, .eta = 0.9, .gamma_L = 0.005,
                     .qkv_bias = 1, .mlp_bias = 1};
    return c;
}

static ShampooConfig shampoo_cfg(int delay) {
    ShampooConfig c = {.lr0 = 1e-2, .weight_decay = 0.01, .decoupled = 0, .beta1 = 0.9, .beta2 = 0.999,
                       .eps = 1e-6, .frequency = 5, .start_step = 5, .max_dim = 24, .graft_beta2 = 0.999,
                       .graft_eps = 1e-8, .root_fp64 = 1, .one_d_adam = 0, .root_delay = delay, .root_threads = 1};
    return c;
}

// The same pseudo-gradient for step k on every run.
static void fake_grads(Model *m, int64_t k) {
    Rng r = rng_stream(99, 7, (uint64_t)k, 0);
    for (size_t i = 0; i < m->num_params; i++) m->grads[i] = (float)rng_normal(&r);
}

static void run_steps(Shampoo *s, int64_t from, int64_t to) {
    for (int64_t k = from; k <= to; k++) {
        fake_grads(s->model, k);
        shampoo_step(s, 1e-2 * (1.0 + 0.01 * (double)k), 0.8);
    }
}

static int same_bits(const float *a, const float *b, size_t n) { return memcmp(a, b, n * sizeof(float)) == 0; }

// Overwrites, in the file's header, the first occurrence of `find` from its byte `at` on with `repl` (same length
// kept: the header size does not change). Returns 1 if found. (The header follows an 8-byte length with zero
// bytes, so no strstr.)
static int patch_header(const char *path, const char *find, size_t at, const char *repl) {
    static char head[1 << 18];  // the whole JSON header (about 90 KB here)
    FILE *f = fopen(path, "r+b");
    if (!f) return 0;
    size_t n = fread(head, 1, sizeof head, f), len = strlen(find);
    int found = 0;
    for (size_t i = 0; i + len <= n && !found; i++)
        if (!memcmp(head + i, find, len)) {
            found = fseek(f, (long)(i + at), SEEK_SET) == 0 && fwrite(repl, 1, strlen(repl), f) == strlen(repl);
        }
    return (fclose(f) == 0) && found;
}

// Overwrites element i (4 bytes) of tensor `name` in a saved state file. Returns 1 if done.
static int poke(const char *path, const char *name, size_t i, const void *bytes4) {
    StFile f;
    char err[512];
    if (st_open(path, &f, err, sizeof err) != 0) return 0;
    const StTensor *t = st_find(&f, name);
    long at = t && i < t->numel ? (long)(f.data_start + t->begin + 4 * i) : -1;
    st_close(&f);
    FILE *fh = at >= 0 ? fopen(path, "r+b") : NULL;
    if (!fh) return 0;
    int ok = fseek(fh, at, SEEK_SET) == 0 && fwrite(bytes4, 4, 1, fh) == 1;
    return (fclose(fh) == 0) && ok;
}

// Whether a fresh optimizer is still fresh (what a refused load must leave).
static int still_fresh(const Shampoo *s) {
    int changed = s->t != 0 || shampoo_pending_step(s) != 0;
    for (int i = 0; i < s->nblocks; i++) changed |= s->blocks[i].has_roots || s->blocks[i].fails;
    for (size_t i = 0; i < s->root_floats; i++) changed |= s->roots[i] != 0.0f;
    return !changed;
}

static Backend *be;  // one CPU backend for every case
static Comm comm1 = {.rank = 0, .world = 1, .local_world = 1};

// A model (initialized from seed 5, as every run here) and its optimizer.
typedef struct {
    Model *m;
    Shampoo s;
} Opt;

static void opt_open(Opt *o, const ModelConfig *mc, const ShampooConfig *sc) {
    o->m = model_create(mc, be, 1);
    model_init(o->m, 5);
    shampoo_create(&o->s, o->m, &comm1, sc, NULL);
}

static void opt_close(Opt *o) {
    shampoo_free(&o->s);
    model_free(o->m);
}

// A fresh empty file for a state: path is "/tmp/shampoo_stateXXXXXX", filled in.
static void temp_state(char *path) {
    int fd = mkstemp(path);
    if (fd >= 0) close(fd);
}

static void round_trip(int delay, int64_t save_at, int64_t end) {
    char title[128];
    snprintf(title, sizeof title, "root_delay %d: save at step %lld, resume, equal to the uninterrupted run at %lld",
             delay, (long long)save_at, (long long)end);
    TEST_CASE(title) {
        ModelConfig mc = tiny();
        ShampooConfig sc = shampoo_cfg(delay);
        Opt a, b;
        opt_open(&a, &mc, &sc);
        opt_open(&b, &mc, &sc);
        char path[] = "/tmp/shampoo_stateXXXXXX";
        temp_state(path);
        size_t np = a.m->num_params;
        run_steps(&a.s, 1, save_at);
        EXPECT(shampoo_save(&a.s, path) == 0, "save failed");
        float *w = malloc(np * sizeof(float));
        memcpy(w, a.m->params, np * sizeof(float));
        run_steps(&a.s, save_at + 1, end);
        memcpy(b.m->params, w, np * sizeof(float));  // the weights come from the model checkpoint
        char err[512] = "";
        EXPECT(shampoo_load(&b.s, path, err, sizeof err) == 0, "%s", err);
        EXPECT(b.s.t == save_at, "t %lld after load", (long long)b.s.t);
        run_steps(&b.s, save_at + 1, end);
        EXPECT(same_bits(a.m->params, b.m->params, np), "weights differ after resume");
        EXPECT(same_bits(a.s.roots, b.s.roots, a.s.root_floats), "roots differ after resume");
        EXPECT(same_bits(a.s.factors, b.s.factors, a.s.factor_floats), "factors differ after resume");
        EXPECT(a.s.refreshes > 0 && b.s.refreshes > 0, "no refresh happened");
        // A control: resuming at the wrong step must differ, so the comparison can fail.
        memcpy(b.m->params, w, np * sizeof(float));
        EXPECT(shampoo_load(&b.s, path, err, sizeof err) == 0, "%s", err);
        run_steps(&b.s, save_at + 2, end + 1);
        EXPECT(!same_bits(a.m->params, b.m->params, np), "a shifted resume gave the same weights");
        opt_close(&a);
        opt_close(&b);
        free(w);
        unlink(path);
    }
}

int main(void) {
    be = backend_cpu_create(1);
    round_trip(0, 12, 30);  // mid-interval
    round_trip(1, 10, 30);  // at a refresh step: the roots are still pending on the thread
    round_trip(1, 12, 30);
    round_trip(4, 10, 30);  // due at 14: saved as the snapshot of step 10
    round_trip(4, 12, 30);
    round_trip(4, 13, 30);  // due at the next step: installed by the save
    round_trip(5, 11, 30);  // d = f: saved as the snapshot of step 10, due at 15 when the next refresh starts
    round_trip(5, 14, 30);  // d = f: due at the next step, installed by the save
    TEST_CASE("a pending refresh resumed under another f and d (10 -> 8): installed at the next refresh step, before "
              "that refresh starts, so two are never in flight") {
        ModelConfig mc = tiny();
        ShampooConfig sc = shampoo_cfg(10);
        sc.frequency = sc.start_step = 10;
        Opt a, b;
        opt_open(&a, &mc, &sc);
        sc.frequency = sc.start_step = sc.root_delay = 8;
        opt_open(&b, &mc, &sc);
        char path[] = "/tmp/shampoo_stateXXXXXX";
        temp_state(path);
        run_steps(&a.s, 1, 15);
        EXPECT(shampoo_pending_step(&a.s) == 10 && shampoo_save(&a.s, path) == 0, "save (pending %lld)",
               (long long)shampoo_pending_step(&a.s));
        char err[512] = "";
        EXPECT(shampoo_load(&b.s, path, err, sizeof err) == 0, "%s", err);
        EXPECT(shampoo_pending_step(&b.s) == 10, "pending %lld after the load", (long long)shampoo_pending_step(&b.s));
        run_steps(&b.s, 16, 16);  // a refresh step under f = 8: installs step 10's roots, then starts its own
        EXPECT(b.s.refreshes == 1 && shampoo_pending_step(&b.s) == 16, "after step 16: %lld installed, pending %lld",
               (long long)b.s.refreshes, (long long)shampoo_pending_step(&b.s));
        run_steps(&b.s, 17, 30);  // 16's roots at 24, 24's pending from 24 (due 32)
        EXPECT(b.s.refreshes == 2 && shampoo_pending_step(&b.s) == 24, "after step 30: %lld installed, pending %lld",
               (long long)b.s.refreshes, (long long)shampoo_pending_step(&b.s));
        opt_close(&a);
        opt_close(&b);
        unlink(path);
    }
    TEST_CASE("a state whose pending_t is not in 1 .. t, or that lacks a pending factor, is refused naming the file "
              "(and the tensor), and leaves the optimizer as it was") {
        ModelConfig mc = tiny();
        ShampooConfig sc = shampoo_cfg(4);
        Opt a, b;  // b: a fresh optimizer, which a refused load must leave fresh
        opt_open(&a, &mc, &sc);
        opt_open(&b, &mc, &sc);
        char path[] = "/tmp/shampoo_stateXXXXXX";
        temp_state(path);
        run_steps(&a.s, 1, 12);
        EXPECT(shampoo_save(&a.s, path) == 0, "save failed");
        EXPECT(patch_header(path, "\"pending_t\":\"10\"", 13, "99"), "no pending_t 10 in the header");
        char err[512] = "";
        EXPECT(shampoo_load(&b.s, path, err, sizeof err) != 0 && strstr(err, path) && strstr(err, "pending_t"),
               "message: %s", err);
        // The same with pending_t intact but a pending factor renamed ("pending_factor0" -> "pending_factorX").
        EXPECT(patch_header(path, "\"pending_t\":\"99\"", 13, "10") &&
                   patch_header(path, "pending_factor0", 14, "X"),
               "header fields not found");
        EXPECT(shampoo_load(&b.s, path, err, sizeof err) != 0 && strstr(err, path) && strstr(err, "pending_factor0"),
               "message: %s", err);
        EXPECT(still_fresh(&b.s), "a refused load changed the optimizer: t %lld, pending %lld", (long long)b.s.t,
               (long long)shampoo_pending_step(&b.s));
        opt_close(&a);
        opt_close(&b);
        unlink(path);
    }
    TEST_CASE("a state holding what no run could have saved (NaN or Inf moments, roots, factors or pending factors; "
              "a negative second moment; fails outside 0..3; has_roots not 0/1; a step t that is not a count) is "
              "refused naming the file and the tensor, and leaves the optimizer as it was") {
        ModelConfig mc = tiny();
        ShampooConfig sc = shampoo_cfg(4);
        Opt a, b;
        opt_open(&a, &mc, &sc);
        opt_open(&b, &mc, &sc);
        char path[] = "/tmp/shampoo_stateXXXXXX";
        temp_state(path);
        run_steps(&a.s, 1, 12);  // roots of step 5 installed, the refresh of step 10 pending (due at 14)
        char blk[160], name[200];
        snprintf(blk, sizeof blk, "%s.block0", a.m->tensors[a.s.blocks[0].param].name);
        const float nan = NAN, inf = INFINITY, neg = -1.0f;
        const int32_t fails_bad = 4, bool_bad = 2;
        struct { const char *suffix; const void *value; size_t i; } bad[] = {
            {"exp_avg", &nan, 3}, {"graft_v", &neg, 0}, {"graft_v", &inf, 1}, {"root0", &inf, 2},
            {"factor1", &nan, 0}, {"pending_factor0", &nan, 5}, {"fails", &fails_bad, 0}, {"has_roots", &bool_bad, 0}};
        for (size_t c = 0; c < sizeof bad / sizeof bad[0]; c++) {
            EXPECT(shampoo_save(&a.s, path) == 0, "save failed");
            int per_param = !strcmp(bad[c].suffix, "exp_avg") || !strcmp(bad[c].suffix, "graft_v");
            snprintf(name, sizeof name, "%s.%s", per_param ? a.m->tensors[a.s.blocks[0].param].name : blk,
                     bad[c].suffix);
            EXPECT(poke(path, name, bad[c].i, bad[c].value), "no tensor %s in the state", name);
            char err[512] = "";
            EXPECT(shampoo_load(&b.s, path, err, sizeof err) != 0 && strstr(err, path) && strstr(err, name) &&
                       !strchr(err, '\n'),
                   "%s: message: %s", name, err);
            EXPECT(still_fresh(&b.s), "%s: a refused load changed the optimizer", name);
        }
        const char *bad_t[] = {"-2", "1x", " 9"};  // the saved t is "12": same length, so the header keeps its size
        for (int c = 0; c < 3; c++) {
            EXPECT(shampoo_save(&a.s, path) == 0, "save failed");
            EXPECT(patch_header(path, "\"t\":\"12\"", 5, bad_t[c]), "no t 12 in the header");
            char err[512] = "";
            EXPECT(shampoo_load(&b.s, path, err, sizeof err) != 0 && strstr(err, path) && strstr(err, "step t"),
                   "t '%s': message: %s", bad_t[c], err);
            EXPECT(still_fresh(&b.s), "t '%s': a refused load changed the optimizer", bad_t[c]);
        }
        EXPECT(shampoo_save(&a.s, path) == 0, "save failed");  // and the intact state still loads
        char err[512] = "";
        EXPECT(shampoo_load(&b.s, path, err, sizeof err) == 0 && b.s.t == 12, "the intact state: %s", err);
        opt_close(&a);
        opt_close(&b);
        unlink(path);
    }
    TEST_CASE("a state file of another model is refused, naming the file and the tensor") {
        ModelConfig mc = tiny(), other = tiny();
        other.mlp_dim = 32;
        ShampooConfig sc = shampoo_cfg(0);
        Opt a, b;
        opt_open(&a, &mc, &sc);
        opt_open(&b, &other, &sc);
        char path[] = "/tmp/shampoo_stateXXXXXX";
        temp_state(path);
        run_steps(&a.s, 1, 6);
        EXPECT(shampoo_save(&a.s, path) == 0, "save failed");
        char err[512] = "";
        EXPECT(shampoo_load(&b.s, path, err, sizeof err) != 0, "loaded a mismatched state");
        EXPECT(strstr(err, path) && strstr(err, "layer1.lin"), "message: %s", err);
        EXPECT(shampoo_load(&b.s, "/nonexistent/state.safetensors", err, sizeof err) != 0 &&
                   strstr(err, "/nonexistent/state.safetensors"),
               "message: %s", err);
        opt_close(&a);
        opt_close(&b);
        unlink(path);
    }
    be->destroy(be);
    return tl_finish();
}
