// test_shampoo_state.c: Shampoo's optimizer state round trip (spec/shampoo.md §3.5, property 17 at one rank).
// A run saved mid-interval, or at a refresh step with root_delay 1 (roots pending), or with root_delay 4 and 5
// while a refresh is pending for more than the next step (saved as its factor snapshot and recomputed on resume),
// and resumed into a fresh optimizer continues bit for bit like the uninterrupted run. Also: a state file for another model is refused
// with one line naming the file and the tensor.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "rng.h"
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

static void round_trip(int delay, int64_t save_at, int64_t end) {
    char title[128];
    snprintf(title, sizeof title, "root_delay %d: save at step %lld, resume, equal to the uninterrupted run at %lld",
             delay, (long long)save_at, (long long)end);
    TEST_CASE(title) {
        Backend *be = backend_cpu_create(1);
        Comm comm = {.rank = 0, .world = 1, .local_world = 1};
        ModelConfig mc = tiny();
        ShampooConfig sc = shampoo_cfg(delay);
        Model *a = model_create(&mc, be, 1), *b = model_create(&mc, be, 1);
        model_init(a, 5);
        model_init(b, 5);
        Shampoo sa, sb;
        shampoo_create(&sa, a, &comm, &sc, NULL);
        shampoo_create(&sb, b, &comm, &sc, NULL);
        char path[] = "/tmp/shampoo_stateXXXXXX";
        int fd = mkstemp(path);
        close(fd);
        run_steps(&sa, 1, save_at);
        EXPECT(shampoo_save(&sa, path) == 0, "save failed");
        float *w = malloc(a->num_params * sizeof(float));
        memcpy(w, a->params, a->num_params * sizeof(float));
        run_steps(&sa, save_at + 1, end);
        memcpy(b->params, w, a->num_params * sizeof(float));  // the weights come from the model checkpoint
        char err[512] = "";
        EXPECT(shampoo_load(&sb, path, err, sizeof err) == 0, "%s", err);
        EXPECT(sb.t == save_at, "t %lld after load", (long long)sb.t);
        run_steps(&sb, save_at + 1, end);
        EXPECT(same_bits(a->params, b->params, a->num_params), "weights differ after resume");
        EXPECT(same_bits(sa.roots, sb.roots, sa.root_floats), "roots differ after resume");
        EXPECT(same_bits(sa.factors, sb.factors, sa.factor_floats), "factors differ after resume");
        EXPECT(sa.refreshes > 0 && sb.refreshes > 0, "no refresh happened");
        // A control: resuming at the wrong step must differ, so the comparison can fail.
        memcpy(b->params, w, a->num_params * sizeof(float));
        EXPECT(shampoo_load(&sb, path, err, sizeof err) == 0, "%s", err);
        run_steps(&sb, save_at + 2, end + 1);
        EXPECT(!same_bits(a->params, b->params, a->num_params), "a shifted resume gave the same weights");
        shampoo_free(&sa);
        shampoo_free(&sb);
        model_free(a);
        model_free(b);
        be->destroy(be);
        free(w);
        unlink(path);
    }
}

int main(void) {
    round_trip(0, 12, 30);  // mid-interval
    round_trip(1, 10, 30);  // at a refresh step: the roots are still pending on the thread
    round_trip(1, 12, 30);
    round_trip(4, 10, 30);  // due at 14: saved as the snapshot of step 10
    round_trip(4, 12, 30);
    round_trip(4, 13, 30);  // due at the next step: installed by the save
    round_trip(5, 14, 30);  // d = f: due at 15, when the next refresh starts
    TEST_CASE("a state whose pending_t is not in 1 .. t is refused, naming the file") {
        Backend *be = backend_cpu_create(1);
        Comm comm = {.rank = 0, .world = 1, .local_world = 1};
        ModelConfig mc = tiny();
        ShampooConfig sc = shampoo_cfg(4);
        Model *a = model_create(&mc, be, 1);
        model_init(a, 5);
        Shampoo sa;
        shampoo_create(&sa, a, &comm, &sc, NULL);
        char path[] = "/tmp/shampoo_stateXXXXXX";
        int fd = mkstemp(path);
        close(fd);
        run_steps(&sa, 1, 12);
        EXPECT(shampoo_save(&sa, path) == 0, "save failed");
        // Rewrite "pending_t":"10" as "pending_t":"99" in the header (same length).
        FILE *f = fopen(path, "r+b");
        char head[8192];
        size_t n = f ? fread(head, 1, sizeof head - 1, f) : 0;
        head[n] = 0;
        char *at = NULL;
        for (size_t i = 0; i + 15 < n && !at; i++)
            if (!memcmp(head + i, "\"pending_t\":\"10\"", 16)) at = head + i;
        EXPECT(at != NULL, "no pending_t 10 in the header");
        if (f && at) {
            fseek(f, (long)(at - head) + 13, SEEK_SET);
            fwrite("99", 1, 2, f);
        }
        if (f) fclose(f);
        char err[512] = "";
        EXPECT(shampoo_load(&sa, path, err, sizeof err) != 0 && strstr(err, path) && strstr(err, "pending_t"),
               "message: %s", err);
        shampoo_free(&sa);
        model_free(a);
        be->destroy(be);
        unlink(path);
    }
    TEST_CASE("a state file of another model is refused, naming the file and the tensor") {
        Backend *be = backend_cpu_create(1);
        Comm comm = {.rank = 0, .world = 1, .local_world = 1};
        ModelConfig mc = tiny(), other = tiny();
        other.mlp_dim = 32;
        ShampooConfig sc = shampoo_cfg(0);
        Model *a = model_create(&mc, be, 1), *b = model_create(&other, be, 1);
        model_init(a, 5);
        model_init(b, 5);
        Shampoo sa, sb;
        shampoo_create(&sa, a, &comm, &sc, NULL);
        shampoo_create(&sb, b, &comm, &sc, NULL);
        char path[] = "/tmp/shampoo_stateXXXXXX";
        int fd = mkstemp(path);
        close(fd);
        run_steps(&sa, 1, 6);
        EXPECT(shampoo_save(&sa, path) == 0, "save failed");
        char err[512] = "";
        EXPECT(shampoo_load(&sb, path, err, sizeof err) != 0, "loaded a mismatched state");
        EXPECT(strstr(err, path) && strstr(err, "layer1.lin"), "message: %s", err);
        EXPECT(shampoo_load(&sb, "/nonexistent/state.safetensors", err, sizeof err) != 0 &&
                   strstr(err, "/nonexistent/state.safetensors"),
               "message: %s", err);
        shampoo_free(&sa);
        shampoo_free(&sb);
        model_free(a);
        model_free(b);
        be->destroy(be);
        unlink(path);
    }
    return tl_finish();
}
