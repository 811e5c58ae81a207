// test_checkpoint.c: the training checkpoint's parts (docs/checkpoints.md): the Adam state file, trainer.json,
// the checkpoint directories (complete only with DONE; pruning; setting aside) and which config keys a resumed run
// may change. The end-to-end resume (bit-identical weights and metrics after a kill) is tests/cli/test_resume.sh.
#include <cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "backend.h"
#include "checkpoint.h"
#include "config.h"
#include "model.h"
#include "optim.h"
#include "safetensors.h"
#include "testlib.h"
#include "util.h"

static Backend *be;
static char g_dir[256];

static ModelConfig tiny(void) {
    return (ModelConfig){.arch = ARCH_SIMPLEVIT, .image_size = 8, .patch_size = 4, .channels = 3, .num_classes = 5,
                         .dim = 8, .heads = 2, .mlp_dim = 16, .depth = 2, .eta = 0.9, .gamma_L = 0.005};
}

static void write_text(const char *path, const char *text) {
    FILE *f = fopen(path, "wb");
    if (!f) return;
    fputs(text, f);
    fclose(f);
}

// Adam state with distinct, exactly representable values; m in [-1, 1), v in [0, 2).
static void fill_adam(Adam *a, const Model *m, int64_t t) {
    for (size_t i = 0; i < m->num_params; i++) {
        a->m[i] = (float)((int)(i % 97) - 48) / 48.0f;
        a->v[i] = (float)(i % 89) / 44.0f;
    }
    a->t = t;
}

static void test_adam_state(void) {
    ModelConfig mc = tiny();
    Model *m = model_create(&mc, be, 1);
    model_init(m, 1);
    AdamConfig ac = {.lr0 = 1e-3, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8};
    Adam a;
    adam_create(&a, m, &ac);
    fill_adam(&a, m, 37);
    char path[400];
    snprintf(path, sizeof path, "%s/adam.safetensors", g_dir);
    size_t np = m->num_params;
    float *mv = malloc(2 * np * sizeof(float));
    TEST_CASE("Adam state: save then read gives the same bits and step count") {
        EXPECT(adam_state_save(&a, m, path) == 0, "save: %s", strerror(errno));
        int64_t t = -1;
        char err[1024] = "";
        EXPECT(adam_state_read(m, path, mv, mv + np, &t, err, sizeof err) == 0, "read: %s", err);
        EXPECT(t == 37, "t = %lld", (long long)t);
        EXPECT(memcmp(mv, a.m, np * sizeof(float)) == 0 && memcmp(mv + np, a.v, np * sizeof(float)) == 0,
               "moments differ");
        StFile f;
        EXPECT(st_open(path, &f, err, sizeof err) == 0, "%s", err);
        int trainable = 0;
        for (int i = 0; i < m->ntensors; i++) trainable += m->tensors[i].trainable;
        EXPECT(f.ntensors == 2 * trainable, "%d tensors for %d trainable ones", f.ntensors, trainable);
        int named = 1;
        for (int i = 0; i < f.ntensors; i++) {
            const char *n = f.tensors[i].name, *dot = strrchr(n, '.');
            named &= dot && (!strcmp(dot, ".exp_avg") || !strcmp(dot, ".exp_avg_sq"));
        }
        EXPECT(named, "every tensor is <param>.exp_avg or <param>.exp_avg_sq");
        st_close(&f);
    }
    TEST_CASE("Adam state: refuses a NaN moment, a negative second moment, another model and a bad step, naming "
              "the file and tensor") {
        struct {
            const char *what, *needle;
            int kind;
        } cases[] = {{"NaN exp_avg", "exp_avg", 0},
                     {"negative exp_avg_sq", ">= 0", 1},
                     {"another model", "another model", 2},
                     {"bad t", "step count", 3},
                     {"not a state file", "not an Adam state", 4}};
        for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
            fill_adam(&a, m, 5);
            Model *other = NULL;
            if (cases[c].kind == 0) a.m[3] = NAN;
            if (cases[c].kind == 1) a.v[7] = -1.0f;
            int rc;
            if (cases[c].kind == 2) {  // a deeper model's file
                ModelConfig oc = tiny();
                oc.depth = 3;
                other = model_create(&oc, be, 1);
                Adam oa;
                adam_create(&oa, other, &ac);
                rc = adam_state_save(&oa, other, path);
                adam_free(&oa, other);
            } else if (cases[c].kind == 3 || cases[c].kind == 4) {
                size_t n = 2 * np;
                StEntry e = {"x.exp_avg", "F32", 1, {(int64_t)n}, mv};
                memset(mv, 0, n * sizeof(float));
                const char *keys[] = {"format", "t"};
                const char *vals[] = {cases[c].kind == 3 ? "simplest-dist-adam-state-1" : "other", "-5"};
                rc = st_write(path, &e, 1, keys, vals, 2);
            } else {
                rc = adam_state_save(&a, m, path);
            }
            EXPECT(rc == 0, "%s: cannot write the test file", cases[c].what);
            int64_t t = -1;
            char err[1024] = "";
            EXPECT(adam_state_read(m, path, mv, mv + np, &t, err, sizeof err) == -1, "%s: accepted", cases[c].what);
            EXPECT(strstr(err, path) && strstr(err, cases[c].needle), "%s: reason '%s'", cases[c].what, err);
            EXPECT(t == -1, "%s: the step count was set", cases[c].what);
            if (other) model_free(other);
        }
    }
    free(mv);
    adam_free(&a, m);
    model_free(m);
}

static void test_train_state(void) {
    char path[400];
    snprintf(path, sizeof path, "%s/trainer.json", g_dir);
    TEST_CASE("trainer.json: write then read keeps step, best and last eval, world, the open log interval and the "
              "config") {
        TrainState s = {.step = 1234567890123LL, .best_top1 = 0.70375, .best_step = 1000, .has_eval = 1,
                        .eval_step = 1200, .eval_top1 = 0.6875, .eval_top5 = 0.9, .eval_loss = 1.25, .world = 8,
                        .interval_loss = 123.456789012345678, .interval_count = 4096,
                        .config_json = "{\"opt\": {\"lr\": 0.001}}"};
        EXPECT(train_state_write(path, &s) == 0, "write: %s", strerror(errno));
        TrainState r;
        char err[1024] = "";
        EXPECT(train_state_read(path, &r, err, sizeof err) == 0, "read: %s", err);
        EXPECT(r.step == s.step && r.best_top1 == s.best_top1 && r.best_step == s.best_step && r.world == 8,
               "step %lld best %g at %lld world %d", (long long)r.step, r.best_top1, (long long)r.best_step, r.world);
        EXPECT(r.interval_loss == s.interval_loss && r.interval_count == 4096, "interval %.17g / %lld",
               r.interval_loss, (long long)r.interval_count);
        EXPECT(r.has_eval && r.eval_step == 1200 && r.eval_top1 == 0.6875 && r.eval_top5 == 0.9 &&
                   r.eval_loss == 1.25,
               "last eval not kept");
        EXPECT(r.config_json && strstr(r.config_json, "\"lr\":0.001"), "config '%s'", r.config_json);
        free(r.config_json);
        TrainState z = {.step = 3, .best_top1 = -1.0, .world = 1, .config_json = "{}"};
        EXPECT(train_state_write(path, &z) == 0 && train_state_read(path, &r, err, sizeof err) == 0, "%s", err);
        EXPECT(r.best_top1 < 0 && !r.has_eval, "no eval must stay no eval");
        free(r.config_json);
    }
    TEST_CASE("trainer.json: refuses damaged files with one line naming the file") {
        // each case is a valid file (GOOD, accepted below) with one thing wrong; the reason must name that thing
#define TS_HEAD "{\"format\": \"simplest-dist-trainer-1\", "
#define TS_IV "\"interval\": {\"loss_sum\": 0.5, \"count\": 3}"
        const char *good = TS_HEAD "\"step\": 10, \"world\": 1, \"config\": {}, " TS_IV "}";
        struct {
            const char *text, *why;
        } bad[] = {
            {"", "not a trainer"},
            {TS_HEAD "\"step\": 10, \"world\": 1, \"config\": {}, " TS_IV, "not a trainer"},  // cut off
            {"{\"format\": \"x\", \"step\": 10, \"world\": 1, \"config\": {}, " TS_IV "}", "not a trainer"},
            {TS_HEAD "\"step\": -1, \"world\": 1, \"config\": {}, " TS_IV "}", "'step'"},
            {TS_HEAD "\"step\": 2.5, \"world\": 1, \"config\": {}, " TS_IV "}", "'step'"},
            {TS_HEAD "\"step\": 10, \"world\": 0, \"config\": {}, " TS_IV "}", "'world'"},
            {TS_HEAD "\"step\": 10, \"world\": 1, \"config\": 3, " TS_IV "}", "'config'"},
            {TS_HEAD "\"step\": 10, \"world\": 1, \"config\": {}}", "'interval'"},
            {TS_HEAD "\"step\": 10, \"world\": 1, \"config\": {}, \"interval\": {\"loss_sum\": -1, \"count\": 3}}",
             "'interval'"},
            {TS_HEAD "\"step\": 10, \"world\": 1, \"config\": {}, \"interval\": {\"loss_sum\": 1, \"count\": 2.5}}",
             "'interval'"},
            {TS_HEAD "\"step\": 10, \"world\": 1, \"config\": {}, " TS_IV ", \"best_top1\": 2, \"best_step\": 5}",
             "'best_top1'"},
            {TS_HEAD "\"step\": 10, \"world\": 1, \"config\": {}, " TS_IV ", \"best_top1\": 0.5, \"best_step\": 11}",
             "'best_top1'"},
            {TS_HEAD "\"step\": 10, \"world\": 1, \"config\": {}, " TS_IV
                     ", \"eval\": {\"step\": 4, \"top1\": 0.5, \"top5\": \"x\", \"loss\": 1}}",
             "'eval'"},
        };
        write_text(path, good);
        TrainState g;
        char gerr[1024] = "";
        EXPECT(train_state_read(path, &g, gerr, sizeof gerr) == 0 && g.interval_count == 3, "the valid base: %s", gerr);
        free(g.config_json);
        for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
            write_text(path, bad[i].text);
            TrainState r;
            char err[1024] = "";
            EXPECT(train_state_read(path, &r, err, sizeof err) == -1, "case %zu accepted", i);
            EXPECT(strstr(err, path) && strstr(err, bad[i].why) && !strchr(err, '\n'), "case %zu: reason '%s'", i,
                   err);
            EXPECT(r.config_json == NULL, "case %zu: config kept", i);
        }
    }
}

// A complete checkpoint directory for step s, written the way the trainer writes one.
static int make_ckpt(const char *run, int64_t s, int keep) {
    char tmp[1300], path[1400];
    if (ckpt_begin(run, s, tmp, sizeof tmp) != 0) return -1;
    snprintf(path, sizeof path, "%s/trainer.json", tmp);
    write_text(path, "{}");
    return ckpt_commit(run, s, keep);
}

// The complete checkpoints of run are exactly want[0..n) (newest first).
static void expect_steps(const char *run, const int64_t *want, int n, const char *what) {
    int64_t *st;
    int got = ckpt_list(run, &st);
    int same = got == n;
    for (int i = 0; same && i < n; i++) same = st[i] == want[i];
    EXPECT(same, "%s: %d complete, newest %lld, want %d, newest %lld", what, got, got ? (long long)st[0] : -1LL, n,
           n ? (long long)want[0] : -1LL);
    free(st);
}

// checkpoints/<name> must not exist.
static void expect_gone(const char *run, const char *name, const char *what) {
    char path[1400];
    snprintf(path, sizeof path, "%s/checkpoints/%s", run, name);
    EXPECT(!path_exists(path), "%s: %s is still there", what, name);
}

// A fresh run directory g_dir/name in run.
static void new_run(char *run, size_t n, const char *name) {
    snprintf(run, n, "%s/%s", g_dir, name);
    mkdir(run, 0755);
}

static void test_dirs(void) {
    char run[400], path[1400];
    new_run(run, sizeof run, "run");
    TEST_CASE("checkpoint directories: only step_N/ with DONE counts, newest first; `latest` names the newest; "
              "older ones beyond keep are deleted") {
        int64_t *st;
        EXPECT(ckpt_list(run, &st) == 0 && st == NULL, "an empty run has checkpoints");
        EXPECT(make_ckpt(run, 4, 3) == 0 && make_ckpt(run, 8, 3) == 0 && make_ckpt(run, 12, 3) == 0, "commit failed");
        char tmp[1300];
        EXPECT(ckpt_begin(run, 16, tmp, sizeof tmp) == 0, "begin");  // a crash while writing 16: no DONE, no rename
        snprintf(path, sizeof path, "%s/checkpoints/step_00000020", run);
        mkdir(path, 0755);  // a directory without DONE (a crash while pruning)
        snprintf(path, sizeof path, "%s/checkpoints/step_12x", run);
        mkdir(path, 0755);
        expect_steps(run, (int64_t[]){12, 8, 4}, 3, "incomplete ones ignored");
        size_t len = 0;
        snprintf(path, sizeof path, "%s/checkpoints/latest", run);
        char *latest = (char *)read_file_all(path, &len);
        EXPECT(latest && !strcmp(latest, "step_00000012\n"), "latest is '%s'", latest ? latest : "(none)");
        free(latest);
        EXPECT(make_ckpt(run, 16, 2) == 0, "commit of 16 over its leftover .tmp");
        expect_steps(run, (int64_t[]){16, 12}, 2, "keep = 2");
        expect_gone(run, "step_00000004", "pruned");
        expect_gone(run, "step_00000016.tmp", "committed");
        EXPECT(make_ckpt(run, 12, 5) == 0, "the same step written again (a resume from an older checkpoint)");
    }
    TEST_CASE("checkpoint directories: an unreadable checkpoint is set aside, never listed or deleted again") {
        EXPECT(ckpt_set_aside(run, 16) == 0, "set aside: %s", strerror(errno));
        expect_steps(run, (int64_t[]){12}, 1, "after setting 16 aside");
        EXPECT(make_ckpt(run, 16, 1) == 0 && ckpt_set_aside(run, 16) == 0, "a second one of the same step");
        snprintf(path, sizeof path, "%s/checkpoints/step_00000016.unreadable", run);
        EXPECT(path_exists(path), "first set-aside copy gone");
        snprintf(path, sizeof path, "%s/checkpoints/step_00000016.unreadable.2", run);
        EXPECT(path_exists(path), "second set-aside copy missing");
        EXPECT(make_ckpt(run, 20, 1) == 0, "commit");
        snprintf(path, sizeof path, "%s/checkpoints/step_00000016.unreadable", run);
        EXPECT(path_exists(path), "pruning deleted a set-aside checkpoint");
    }
}

static void test_tidy_and_prune(void) {
    char run[400], path[1400];
    new_run(run, sizeof run, "tidy");
    TEST_CASE("tidy: a .tmp holding DONE whose step is missing or incomplete is completed; other leftovers are "
              "removed") {
        char tmp[1300];
        EXPECT(make_ckpt(run, 4, 9) == 0, "commit 4");
        // a commit of step 12 that replaced step_12 and was killed before its rename: step_12.tmp with DONE
        EXPECT(ckpt_begin(run, 12, tmp, sizeof tmp) == 0, "begin 12");
        snprintf(path, sizeof path, "%s/DONE", tmp);
        write_text(path, "step 12\n");
        // ... beside its old step_12 half deleted (DONE gone first, one file left)
        char half[1300];
        snprintf(half, sizeof half, "%s/checkpoints/step_00000012", run);
        mkdir(half, 0755);
        snprintf(path, sizeof path, "%s/optimizer.safetensors", half);
        write_text(path, "x");
        // a checkpoint killed while being written (no DONE), and one killed while being pruned (no DONE)
        char other[1300];
        snprintf(other, sizeof other, "%s/checkpoints/step_00000016.tmp", run);
        mkdir(other, 0755);
        snprintf(path, sizeof path, "%s/model.safetensors", other);
        write_text(path, "x");
        snprintf(other, sizeof other, "%s/checkpoints/step_00000008", run);
        mkdir(other, 0755);
        ckpt_tidy(run);
        expect_steps(run, (int64_t[]){12, 4}, 2, "after tidying");
        expect_gone(run, "step_00000016.tmp", "a .tmp without DONE");
        expect_gone(run, "step_00000008", "a step directory without DONE");
        expect_gone(run, "step_00000012.tmp", "the completed .tmp");
        snprintf(path, sizeof path, "%s/checkpoints/step_00000012/optimizer.safetensors", run);
        EXPECT(!path_exists(path), "the half-deleted step_12's file survived the completion");
    }
    TEST_CASE("pruning keeps the new checkpoint and the keep - 1 newest older ones, never a newer step") {
        EXPECT(make_ckpt(run, 20, 9) == 0, "commit 20");  // complete: 4, 12, 20
        EXPECT(make_ckpt(run, 16, 2) == 0, "commit 16");  // a resume from 12 writing 16: keep 16 and 12, not 4; 20 stays
        expect_steps(run, (int64_t[]){20, 16, 12}, 3, "pruned below 16 only");
    }
}

static void test_resume_keys(void) {
    const char *base[] = {"opt.lr=0.001", "train.batch_size=64", "train.steps=100"};
    Config saved, cur;
    char err[1024] = "";
    TEST_CASE("resume: the same config passes; a key that changes training fails naming it and both values") {
        EXPECT(config_load_err(&saved, NULL, base, 3, err, sizeof err) == 0, "%s", err);
        char *json = config_to_json(&saved);
        EXPECT(config_load_err(&cur, NULL, base, 3, err, sizeof err) == 0 &&
                   config_resume_check(&cur, json, "CKPT", err, sizeof err) == 0,
               "same config refused: %s", err);
        const char *changes[][2] = {{"opt.lr=0.002", "'opt.lr'"},
                                    {"opt.lr=0.0010000000000000002", "'opt.lr'"},  // the next double: exact compare
                                    {"train.steps=200", "'train.steps'"},
                                    {"model.arch=simplevit", "'model.arch'"},
                                    {"train.seed=1", "'train.seed'"},
                                    {"shampoo.root_delay=1", "'shampoo.root_delay'"},
                                    {"data.max_pixels=1000", "'data.max_pixels'"}};
        for (size_t i = 0; i < sizeof changes / sizeof changes[0]; i++) {
            const char *ov[4] = {base[0], base[1], base[2], changes[i][0]};
            EXPECT(config_load_err(&cur, NULL, ov, 4, err, sizeof err) == 0, "%s", err);
            EXPECT(config_resume_check(&cur, json, "CKPT", err, sizeof err) == -1, "%s accepted", changes[i][0]);
            EXPECT(strstr(err, changes[i][1]) && strstr(err, "CKPT") && !strchr(err, '\n'), "%s: '%s'", changes[i][0],
                   err);
        }
        free(json);
    }
    TEST_CASE("resume: where and how the run goes may change (run.*, threads, logging, eval cadence, the data "
              "root, timeouts)") {
        char *json = config_to_json(&saved);
        const char *ov[] = {base[0], base[1], base[2], "run.device=auto", "run.dir=/elsewhere", "data.threads=3",
                            "train.log_every=7", "train.eval_every=50", "comm.timeout_s=10", "data.root=/mnt/x",
                            "run.keep_checkpoints=9", "model.recompute=true", "data.eval_limit=100"};
        EXPECT(config_load_err(&cur, NULL, ov, 13, err, sizeof err) == 0, "%s", err);
        EXPECT(config_resume_check(&cur, json, "CKPT", err, sizeof err) == 0, "refused: %s", err);
        free(json);
    }
    TEST_CASE("resume: a key missing from an older saved config counts as its default") {
        char *json = config_to_json(&saved);
        cJSON_Minify(json);
        EXPECT(config_resume_check(&saved, json, "CKPT", err, sizeof err) == 0, "%s", err);
        char *cut = strstr(json, "\"one_d\":\"full\",");  // drop a key that has a default
        EXPECT(cut != NULL, "no shampoo.one_d in '%s'", json);
        if (cut) memmove(cut, cut + strlen("\"one_d\":\"full\","), strlen(cut + strlen("\"one_d\":\"full\",")) + 1);
        EXPECT(config_resume_check(&saved, json, "CKPT", err, sizeof err) == 0, "missing default key: %s", err);
        const char *ov[] = {base[0], base[1], base[2], "shampoo.one_d=adam"};
        EXPECT(config_load_err(&cur, NULL, ov, 4, err, sizeof err) == 0, "%s", err);
        EXPECT(config_resume_check(&cur, json, "CKPT", err, sizeof err) == -1 && strstr(err, "shampoo.one_d"),
               "a non-default value against a missing key: '%s'", err);
        EXPECT(config_resume_check(&cur, "[1]", "CKPT", err, sizeof err) == -1 && strstr(err, "CKPT"),
               "a non-object config accepted");
        free(json);
    }
}

int main(void) {
    snprintf(g_dir, sizeof g_dir, "/tmp/test_checkpoint_XXXXXX");
    if (!mkdtemp(g_dir)) return 1;
    be = backend_cpu_create(1);
    test_adam_state();
    test_train_state();
    test_dirs();
    test_tidy_and_prune();
    test_resume_keys();
    be->destroy(be);
    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf %s", g_dir);
    if (system(cmd) != 0) fprintf(stderr, "cannot remove %s\n", g_dir);
    return tl_finish();
}
