// fuzz_checkpoint.c: the readers of a training checkpoint (docs/checkpoints.md) on arbitrary bytes: the weights
// (checkpoint.c weights_load, both architectures), the Shampoo state (shampoo.c shampoo_load), the Adam state
// (adam_state_read) and trainer.json (train_state_read). The first byte picks the reader; the rest is the file.
//   0: weights_load into a tiny SimplEsT-ViT, 1: into a tiny SimpleViT (seed_compat, so to_out is checked),
//   2: shampoo_load into the optimizer of a tiny SimplEsT-ViT after 9 steps, 3: adam_state_read for that model,
//   4: train_state_read, 5: loader_state_read (loader.json), 6: weights_init_read (model.init_from) into the tiny
//   SimplEsT-ViT with init_skip "linear_head", 7: into the tiny SimpleViT with init_skip "linear_head.1".
// Accepted Adam states are finite with second moments >= 0 and a step count >= 0. An accepted trainer.json has a
// step >= 0, a world >= 1, a config that parses as a JSON object, and a best eval in 0 .. 1 at a step <= step.
// Accepted weights are finite. An accepted init file leaves finite weights, and the skipped tensors as they were. A refused Shampoo state leaves the optimizer exactly as it was (its saved state has
// the same bytes). An accepted one is a state the optimizer can step from: one step runs without a fatal error and,
// when every value in the file is below 1e9, gives finite weights; then the original is reloaded.
// `--write-seeds DIR` (standalone build) writes valid files of each kind.
#include <cJSON.h>
#include <math.h>

#include "backend.h"
#include "checkpoint.h"
#include "comm.h"
#include "data/dataset.h"
#include "fuzz.h"
#include "model.h"
#include "rng.h"
#include "safetensors.h"
#include "shampoo.h"
#include "util.h"

static Backend *be;
static Model *m_st, *m_vit, *m_opt;
static Shampoo opt;
static Comm comm1 = {.rank = 0, .world = 1, .local_world = 1};
static uint8_t *ref_state;  // the optimizer's saved state after setup
static float *ref_params;   // and the model's weights then (not part of the state: reset by hand)
static size_t ref_len;

static ModelConfig tiny(Arch arch) {
    ModelConfig c = {.arch = arch, .image_size = 8, .patch_size = 2, .channels = 3, .num_classes = 3, .dim = 8,
                     .depth = 3, .heads = 2, .mlp_dim = 16, .eta = 0.5, .gamma_L = 0.005, .qkv_bias = 1,
                     .mlp_bias = 1, .seed_compat = arch == ARCH_SIMPLEVIT};
    return c;
}

static void fake_grads(Model *m, int64_t k) {
    Rng r = rng_stream(99, 7, (uint64_t)k, 0);
    for (size_t i = 0; i < m->num_params; i++) m->grads[i] = (float)rng_normal(&r);
}

// A file's bytes (util's reader); the harness's own files, so a failure is the harness's.
static uint8_t *slurp(const char *path, size_t *len) {
    uint8_t *b = read_file_all(path, len);
    if (!b) abort();
    return b;
}

static void setup(void) {
    if (be) return;
    be = backend_cpu_create(1);
    ModelConfig a = tiny(ARCH_SIMPLEST), b = tiny(ARCH_SIMPLEVIT);
    m_st = model_create(&a, be, 1);
    m_vit = model_create(&b, be, 1);
    m_opt = model_create(&a, be, 1);
    model_init(m_st, 1);
    model_init(m_vit, 2);
    model_init(m_opt, 3);
    // f = 4 from step 2 with root_delay 3, blocks of at most 12 (the MLP's 16 splits): after 9 steps the roots of
    // step 4 are installed and those of step 8 are pending (due at 11), so the state holds every kind of tensor.
    ShampooConfig sc = {.lr0 = 1e-2, .weight_decay = 0.01, .decoupled = 0, .beta1 = 0.9, .beta2 = 0.999,
                        .eps = 1e-6, .frequency = 4, .start_step = 2, .max_dim = 12, .graft_beta2 = 0.999,
                        .graft_eps = 1e-8, .root_fp64 = 1, .one_d_adam = 0, .root_delay = 3, .root_threads = 1};
    shampoo_create(&opt, m_opt, &comm1, &sc, NULL);
    for (int k = 1; k <= 9; k++) {
        fake_grads(m_opt, k);
        shampoo_step(&opt, 1e-2, 1.0);
    }
    char path[300];
    if (shampoo_save(&opt, fuzz_path(path, sizeof path, "ref.state")) != 0) abort();
    ref_state = slurp(path, &ref_len);
    ref_params = malloc(m_opt->num_params * sizeof(float));
    memcpy(ref_params, m_opt->params, m_opt->num_params * sizeof(float));
}

// An accepted file must be one the model can run from: finite weights (the CPU backend's params are host memory).
static void check_finite(const Model *m, const char *what) {
    for (size_t i = 0; i < m->num_params; i++)
        if (!isfinite(m->params[i])) {
            fprintf(stderr, "%s: parameter %zu is %g\n", what, i, (double)m->params[i]);
            abort();
        }
}

// The largest |x| over a file's F32 tensors. Only NaN and Inf are refused, since any finite bound would be
// arbitrary, and a finite state can still overflow in the step: the update X_L m X_R of values up to B over blocks of
// n = 12 reaches B^3 n^2, past FLT_MAX (3.4e38) from B = 1.3e12 (a review's state of 1e14 gave NaN weights). Runs
// do not save such values (a root is at most eps^(-1/2) = 1e6 at the default eps 1e-12), so the finite-step
// property is asked of states below 1e9.
static double largest_value(const char *path) {
    StFile f;
    char err[512];
    double big = 0;
    if (st_open(path, &f, err, sizeof err) != 0) abort();  // shampoo_load just read it
    for (int i = 0; i < f.ntensors; i++) {
        if (strcmp(f.tensors[i].dtype, "F32") != 0) continue;
        const float *v = st_data(&f, &f.tensors[i]);
        for (size_t k = 0; k < f.tensors[i].numel; k++) {
            float x;
            memcpy(&x, v + k, 4);  // the data need not be 4-byte aligned in the file
            big = fabs(x) > big ? fabs(x) : big;
        }
    }
    st_close(&f);
    return big;
}

static int same_as_ref(void) {
    char path[300];
    if (shampoo_save(&opt, fuzz_path(path, sizeof path, "now.state")) != 0) abort();
    size_t n;
    uint8_t *b = slurp(path, &n);
    int same = n == ref_len && memcmp(b, ref_state, n) == 0;
    free(b);
    return same;
}

static void one_line(const char *err) {
    if (!err[0] || strchr(err, '\n')) {
        fprintf(stderr, "a refusal must be one line: '%s'\n", err);
        abort();
    }
}

static void adam_case(const char *path) {
    size_t np = m_opt->num_params;
    float *mv = malloc(2 * np * sizeof(float));
    int64_t t = -7;
    char err[1024] = "";
    if (adam_state_read(m_opt, path, mv, mv + np, &t, err, sizeof err) != 0) {
        one_line(err);
        if (t != -7) {
            fprintf(stderr, "a refused Adam state set the step count\n");
            abort();
        }
    } else {
        for (size_t i = 0; i < 2 * np; i++)
            if (!isfinite(mv[i]) || (i >= np && mv[i] < 0.0f)) {
                fprintf(stderr, "accepted Adam state: element %zu is %g\n", i, (double)mv[i]);
                abort();
            }
        if (t < 0) abort();
    }
    free(mv);
}

static void trainer_case(const char *path) {
    TrainState s;
    char err[1024] = "";
    if (train_state_read(path, &s, err, sizeof err) != 0) {
        one_line(err);
        if (s.config_json) abort();
        return;
    }
    cJSON *cfg = cJSON_Parse(s.config_json);
    int ok = s.step >= 0 && s.world >= 1 && cJSON_IsObject(cfg) &&
             (s.best_top1 < 0 || (s.best_top1 <= 1.0 && s.best_step >= 1 && s.best_step <= s.step)) &&
             (!s.has_eval || (s.eval_step >= 1 && s.eval_step <= s.step && isfinite(s.eval_loss)));
    cJSON_Delete(cfg);
    free(s.config_json);
    if (!ok) {
        fprintf(stderr, "accepted trainer.json breaks its rules (step %lld, world %d)\n", (long long)s.step, s.world);
        abort();
    }
}

// model.init_from's reader over the model's own weights: accepted, every weight is finite and the skipped tensors
// are untouched; refused, it says why.
static void init_case(const Model *m, const char *skip, const char *path) {
    size_t np = m->num_params;
    float *w = malloc(np * sizeof(float));
    memcpy(w, m->params, np * sizeof(float));
    int loaded = 0, kept = 0;
    char err[1024] = "";
    if (weights_init_read(m, path, skip, w, &loaded, &kept, err, sizeof err) != 0) {
        one_line(err);
    } else {
        for (size_t i = 0; i < np; i++)
            if (!isfinite(w[i])) abort();
        for (int t = 0; t < m->ntensors; t++) {
            const TensorInfo *ti = &m->tensors[t];
            if (ti->trainable && !strncmp(ti->name, skip, strlen(skip)) &&
                memcmp(w + ti->offset, m->params + ti->offset, ti->numel * sizeof(float)) != 0) {
                fprintf(stderr, "init_skip '%s' did not keep %s\n", skip, ti->name);
                abort();
            }
        }
        if (kept < 1) abort();  // the skipped head is counted
    }
    free(w);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    setup();
    char path[300], err[1024] = "";
    fuzz_write(fuzz_path(path, sizeof path, "in.bin"), data + 1, size - 1);
    int mode = data[0] % 8;
    if (mode >= 6) {
        init_case(mode == 7 ? m_vit : m_st, mode == 7 ? "linear_head.1" : "linear_head", path);
        return 0;
    }
    if (mode == 5) {
        LoaderState ls;
        if (loader_state_read(path, &ls, err, sizeof err) != 0) one_line(err);
        return 0;
    }
    if (mode == 3) {
        adam_case(path);
        return 0;
    }
    if (mode == 4) {
        trainer_case(path);
        return 0;
    }
    if (mode < 2) {
        Model *m = mode ? m_vit : m_st;
        if (weights_load(m, path, err, sizeof err) != 0) {
            one_line(err);
        } else {
            check_finite(m, "accepted weights");
        }
        return 0;
    }
    if (shampoo_load(&opt, path, err, sizeof err) != 0) {
        one_line(err);
        if (!same_as_ref()) {
            fprintf(stderr, "a refused Shampoo state changed the optimizer (%s)\n", err);
            abort();
        }
        return 0;
    }
    // The step starts from the weights of setup: each input is judged on its own, not after earlier steps.
    be->upload(be, m_opt->params, ref_params, m_opt->num_params * sizeof(float));
    be->params_changed(be, m_opt->params, m_opt->num_params);
    fake_grads(m_opt, 10);
    shampoo_step(&opt, 1e-2, 1.0);
    if (largest_value(path) <= 1e9) check_finite(m_opt, "a step from an accepted Shampoo state");
    char ref[300];
    fuzz_write(fuzz_path(ref, sizeof ref, "ref.state"), ref_state, ref_len);
    if (shampoo_load(&opt, ref, err, sizeof err) != 0 || !same_as_ref()) {
        fprintf(stderr, "the optimizer's own state did not reload: %s\n", err);
        abort();
    }
    return 0;
}

#ifdef SD_FUZZ_STANDALONE
// Seeds: the file each reader accepts, with its mode byte.
int fuzz_write_seeds(const char *dir) {
    setup();
    char path[600], tmp[300];
    const char *cfg = "{\"model\": {\"arch\": \"tiny\"}}";
    struct { const char *name; int mode; } seeds[] = {{"weights_simplest", 0}, {"weights_simplevit", 1},
                                                     {"shampoo_state", 2}, {"adam_state", 3}, {"trainer_json", 4},
                                                     {"loader_json", 5}, {"init_simplest", 6}, {"init_simplevit", 7}};
    for (int i = 0; i < 8; i++) {
        fuzz_path(tmp, sizeof tmp, "seed.bin");
        if (seeds[i].mode == 2) {
            if (shampoo_save(&opt, tmp) != 0) return -1;
        } else if (seeds[i].mode == 3) {
            AdamConfig ac = {.lr0 = 1e-3, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8};
            Adam a;
            adam_create(&a, m_opt, &ac);
            for (size_t k = 0; k < m_opt->num_params; k++) {
                a.m[k] = (float)k * 1e-3f;
                a.v[k] = (float)k * 1e-6f;
            }
            a.t = 12;
            int rc = adam_state_save(&a, m_opt, tmp);
            adam_free(&a, m_opt);
            if (rc != 0) return -1;
        } else if (seeds[i].mode == 5) {
            LoaderState ls = {.epoch = 3, .step_in_epoch = 7, .seed = 3407, .global_batch = 256,
                              .fingerprint = 0x0123456789abcdefULL, .failures = 2};
            if (loader_state_write(tmp, &ls) != 0) return -1;
        } else if (seeds[i].mode == 4) {
            TrainState ts = {.step = 40, .best_top1 = 0.5, .best_step = 30, .has_eval = 1, .eval_step = 40,
                             .eval_top1 = 0.25, .eval_top5 = 0.75, .eval_loss = 1.5, .world = 2,
                             .config_json = "{\"opt\": {\"lr\": 0.001}, \"run\": {\"dir\": \"runs/x\"}}"};
            if (train_state_write(tmp, &ts) != 0) return -1;
        } else if (weights_save(seeds[i].mode % 6 ? m_vit : m_st, tmp, NULL, cfg, 7, 0) != 0) {
            return -1;
        }
        size_t n;
        uint8_t *b = slurp(tmp, &n);
        uint8_t *s = malloc(n + 1);
        s[0] = (uint8_t)seeds[i].mode;
        memcpy(s + 1, b, n);
        snprintf(path, sizeof path, "%s/%s", dir, seeds[i].name);
        fuzz_write(path, s, n + 1);
        free(b);
        free(s);
    }
    return 0;
}
#endif
