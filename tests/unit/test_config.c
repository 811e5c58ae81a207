// test_config.c: the config loader (src/config.c) through config_load_err, which returns -1 with a one-line message
// instead of exiting. Covers the defaults, every error class (each must give exactly one line that names the key
// path or the file), --set overrides, width presets, the config_to_json round trip, and docs/config.md against
// config_doc_markdown(). Config files are written under a mkdtemp directory.
#include <cJSON.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "testlib.h"
#include "util.h"

static char g_dir[256];

// A minimal valid config: the two required keys only.
#define MINIMAL "{\"train\": {\"batch_size\": 64}, \"opt\": {\"lr\": 0.001}}"

// Writes text to <tmp>/<name> and returns the path (static buffer per call site is not needed: callers copy).
static const char *write_cfg(const char *name, const char *text) {
    static char path[512];
    snprintf(path, sizeof path, "%s/%s", g_dir, name);
    FILE *f = fopen(path, "w");
    if (!f) {
        perror(path);
        exit(1);
    }
    fputs(text, f);
    fclose(f);
    return path;
}

// Loads text as a config file with overrides; returns config_load_err's result.
static int load_text(Config *c, const char *text, const char *const *ov, int nov, char *err, size_t errlen) {
    const char *path = write_cfg("cfg.json", text);
    err[0] = 0;
    return config_load_err(c, path, ov, nov, err, errlen);
}

static int one_line(const char *s) { return s[0] != 0 && strchr(s, '\n') == NULL; }

// Expects a load error whose single-line message contains every given substring.
#define EXPECT_ERR(text, ov, nov, ...)                                                                   \
    do {                                                                                                 \
        Config c_;                                                                                       \
        char e_[1024];                                                                                   \
        int rc_ = load_text(&c_, (text), (ov), (nov), e_, sizeof e_);                                    \
        EXPECT(rc_ == -1, "rc %d for %s", rc_, (text));                                                  \
        EXPECT(one_line(e_), "message is not one non-empty line: [%s]", e_);                             \
        const char *subs_[] = {__VA_ARGS__};                                                             \
        for (size_t s_ = 0; s_ < sizeof subs_ / sizeof subs_[0]; s_++)                                   \
            EXPECT(strstr(e_, subs_[s_]) != NULL, "message [%s] should contain '%s'", e_, subs_[s_]);    \
    } while (0)

#define EXPECT_STR(got, want) EXPECT(strcmp((got), (want)) == 0, "%s = \"%s\", want \"%s\"", #got, (got), (want))
#define EXPECT_INT(got, want) \
    EXPECT((int64_t)(got) == (int64_t)(want), "%s = %lld, want %lld", #got, (long long)(got), (long long)(want))

static void test_defaults(void) {
    TEST_CASE("defaults of a minimal config") {
        Config c;
        char err[1024];
        int rc = load_text(&c, MINIMAL, NULL, 0, err, sizeof err);
        EXPECT(rc == 0, "rc %d: %s", rc, err);
        EXPECT_STR(c.model.arch, "simplest");
        EXPECT_STR(c.model.width, "s");
        EXPECT_INT(c.model.dim, 384);
        EXPECT_INT(c.model.heads, 6);
        EXPECT_INT(c.model.mlp_dim, 1536);
        EXPECT_INT(c.model.depth, 12);
        EXPECT_INT(c.model.image_size, 28);
        EXPECT_INT(c.model.patch_size, 4);
        EXPECT_INT(c.model.num_classes, 10);
        EXPECT_INT(c.model.channels, 1);
        EXPECT(c.model.eta == 0.9, "eta %g", c.model.eta);
        EXPECT(c.model.gamma_L == 0.005, "gamma_L %g", c.model.gamma_L);
        EXPECT_INT(c.model.qkv_bias, 1);
        EXPECT_INT(c.model.mlp_bias, 1);
        EXPECT(c.model.drop_p == 0.0, "drop_p %g", c.model.drop_p);
        EXPECT_INT(c.model.seed_compat, 0);
        EXPECT_STR(c.data.dataset, "fashion-mnist");
        EXPECT_STR(c.data.root, "/usr/share/datasets/fashion-mnist");
        EXPECT_INT(c.data.augment, 0);
        EXPECT_INT(c.data.crop_padding, 4);
        EXPECT_INT(c.data.flip, 1);
        EXPECT_INT(c.data.eval_batch_size, 0);
        EXPECT_INT(c.data.train_limit, 0);
        EXPECT_INT(c.data.eval_limit, 0);
        EXPECT_INT(c.train.epochs, 90);
        EXPECT_INT(c.train.steps, 0);
        EXPECT_INT(c.train.seed, 3407);
        EXPECT_INT(c.train.batch_size, 64);
        EXPECT_INT(c.train.grad_accum, 1);
        EXPECT_INT(c.train.warmup_steps, 0);
        EXPECT(c.train.clip == 1.0, "clip %g", c.train.clip);
        EXPECT(c.train.label_smoothing == 0.0, "label_smoothing %g", c.train.label_smoothing);
        EXPECT(c.train.mixup_alpha == 0.0, "mixup_alpha %g", c.train.mixup_alpha);
        EXPECT_INT(c.train.eval_every, 0);
        EXPECT_INT(c.train.log_every, 10);
        EXPECT_INT(c.train.ema, 0);
        EXPECT_INT(c.train.ema_every, 5);
        EXPECT(c.train.ema_decay == 0.99, "ema_decay %g", c.train.ema_decay);
        EXPECT_INT(c.train.sam, 0);
        EXPECT(c.train.sam_rho == 0.05, "sam_rho %g", c.train.sam_rho);
        EXPECT_INT(c.train.sam_every, 1);
        EXPECT_INT(c.mixup.group, 0);
        EXPECT_STR(c.opt.name, "adam");
        EXPECT(c.opt.lr == 0.001, "lr %g", c.opt.lr);
        EXPECT(c.opt.weight_decay == 0.0, "weight_decay %g", c.opt.weight_decay);
        EXPECT_STR(c.opt.weight_decay_mode, "l2");
        EXPECT(c.opt.beta1 == 0.9, "beta1 %g", c.opt.beta1);
        EXPECT(c.opt.beta2 == 0.999, "beta2 %g", c.opt.beta2);
        EXPECT(c.opt.eps == 1e-8, "eps %g", c.opt.eps);
        EXPECT_STR(c.run.dir, "runs/cfg");  // runs/<config file name without .json>
        EXPECT_STR(c.run.device, "cpu");
        EXPECT_INT(c.run.threads, 0);
        EXPECT(c.run.status_every_s == 5.0, "status_every_s %g", c.run.status_every_s);
    }
    TEST_CASE("no file: defaults plus --set for the required keys") {
        Config c;
        char err[1024] = "";
        const char *ov[] = {"train.batch_size=32", "opt.lr=0.01"};
        int rc = config_load_err(&c, NULL, ov, 2, err, sizeof err);
        EXPECT(rc == 0, "rc %d: %s", rc, err);
        EXPECT_INT(c.train.batch_size, 32);
        EXPECT(c.opt.lr == 0.01, "lr %g", c.opt.lr);
        EXPECT_STR(c.run.dir, "runs/default");
    }
    TEST_CASE("mnist root default") {
        Config c;
        char err[1024];
        const char *ov[] = {"data.dataset=mnist"};
        int rc = load_text(&c, MINIMAL, ov, 1, err, sizeof err);
        EXPECT(rc == 0, "rc %d: %s", rc, err);
        EXPECT_STR(c.data.root, "/usr/share/datasets/mnist");
    }
    TEST_CASE("the shipped configs/fashion-mnist.json loads") {
        Config c;
        char err[1024] = "";
        int rc = config_load_err(&c, "configs/fashion-mnist.json", NULL, 0, err, sizeof err);
        EXPECT(rc == 0, "rc %d: %s", rc, err);
        EXPECT_STR(c.run.dir, "runs/fashion-mnist");
    }
}

static void test_errors(void) {
    TEST_CASE("error: unknown top-level key") {
        EXPECT_ERR("{\"train\": {\"batch_size\": 64}, \"opt\": {\"lr\": 0.001}, \"modle\": {}}", NULL, 0, "'modle'");
    }
    TEST_CASE("error: unknown nested key model.dimm") {
        EXPECT_ERR("{\"model\": {\"dimm\": 32}, \"train\": {\"batch_size\": 64}, \"opt\": {\"lr\": 0.001}}", NULL, 0,
                   "model.dimm");
        EXPECT_ERR("{\"train\": {\"batch_size\": 64, \"lr\": 0.1}, \"opt\": {\"lr\": 0.001}}", NULL, 0, "train.lr");
    }
    TEST_CASE("error: wrong type (string for int)") {
        EXPECT_ERR("{\"model\": {\"dim\": \"32\"}, \"train\": {\"batch_size\": 64}, \"opt\": {\"lr\": 0.001}}", NULL,
                   0, "model.dim", "number");
    }
    TEST_CASE("error: wrong type (number for bool)") {
        EXPECT_ERR("{\"model\": {\"qkv_bias\": 1}, \"train\": {\"batch_size\": 64}, \"opt\": {\"lr\": 0.001}}", NULL,
                   0, "model.qkv_bias");
    }
    TEST_CASE("error: wrong type (number for string)") {
        EXPECT_ERR("{\"model\": {\"arch\": 3}, \"train\": {\"batch_size\": 64}, \"opt\": {\"lr\": 0.001}}", NULL, 0,
                   "model.arch", "string");
    }
    TEST_CASE("error: wrong type (object for a value)") {
        EXPECT_ERR("{\"model\": {\"dim\": {\"x\": 1}}, \"train\": {\"batch_size\": 64}, \"opt\": {\"lr\": 0.001}}",
                   NULL, 0, "model.dim", "object");
    }
    TEST_CASE("error: wrong type (array, null)") {
        EXPECT_ERR("{\"model\": {\"dim\": [32]}, \"train\": {\"batch_size\": 64}, \"opt\": {\"lr\": 0.001}}", NULL, 0,
                   "model.dim");
        EXPECT_ERR("{\"model\": {\"eta\": null}, \"train\": {\"batch_size\": 64}, \"opt\": {\"lr\": 0.001}}", NULL, 0,
                   "model.eta");
    }
    TEST_CASE("error: a section that is not an object") {
        EXPECT_ERR("{\"model\": 3, \"train\": {\"batch_size\": 64}, \"opt\": {\"lr\": 0.001}}", NULL, 0, "'model'");
    }
    TEST_CASE("error: non-integer for an int key") {
        EXPECT_ERR("{\"model\": {\"dim\": 32.5}, \"train\": {\"batch_size\": 64}, \"opt\": {\"lr\": 0.001}}", NULL, 0,
                   "model.dim", "integer");
        EXPECT_ERR("{\"train\": {\"batch_size\": 64, \"steps\": 1.5}, \"opt\": {\"lr\": 0.001}}", NULL, 0,
                   "train.steps", "integer");
    }
    TEST_CASE("error: out of range") {
        EXPECT_ERR("{\"model\": {\"drop_p\": 1.5}, \"train\": {\"batch_size\": 64}, \"opt\": {\"lr\": 0.001}}", NULL,
                   0, "model.drop_p", "range");
        EXPECT_ERR("{\"train\": {\"batch_size\": 64, \"grad_accum\": 0}, \"opt\": {\"lr\": 0.001}}", NULL, 0,
                   "train.grad_accum", "range");
        EXPECT_ERR("{\"train\": {\"batch_size\": 0}, \"opt\": {\"lr\": 0.001}}", NULL, 0, "train.batch_size");
        EXPECT_ERR("{\"train\": {\"batch_size\": 64}, \"opt\": {\"lr\": -1}}", NULL, 0, "opt.lr", "range");
        EXPECT_ERR("{\"model\": {\"eta\": 1.0}, \"train\": {\"batch_size\": 64}, \"opt\": {\"lr\": 0.001}}", NULL, 0,
                   "model.eta");
    }
    TEST_CASE("error: bad enum") {
        EXPECT_ERR("{\"model\": {\"arch\": \"vit\"}, \"train\": {\"batch_size\": 64}, \"opt\": {\"lr\": 0.001}}", NULL,
                   0, "model.arch", "vit");
        EXPECT_ERR("{\"model\": {\"width\": \"xl\"}, \"train\": {\"batch_size\": 64}, \"opt\": {\"lr\": 0.001}}",
                   NULL, 0, "model.width");
        EXPECT_ERR("{\"train\": {\"batch_size\": 64}, \"opt\": {\"lr\": 0.001, \"weight_decay_mode\": \"adamw\"}}",
                   NULL, 0, "opt.weight_decay_mode");
        EXPECT_ERR("{\"train\": {\"batch_size\": 64}, \"opt\": {\"lr\": 0.001}, \"run\": {\"device\": \"tpu\"}}",
                   NULL, 0, "run.device");
    }
    TEST_CASE("error: missing required train.batch_size") {
        EXPECT_ERR("{\"opt\": {\"lr\": 0.001}}", NULL, 0, "train.batch_size", "required");
    }
    TEST_CASE("error: missing required opt.lr") {
        EXPECT_ERR("{\"train\": {\"batch_size\": 64}}", NULL, 0, "opt.lr", "required");
    }
    TEST_CASE("error: batch not divisible by grad_accum") {
        EXPECT_ERR("{\"train\": {\"batch_size\": 64, \"grad_accum\": 3}, \"opt\": {\"lr\": 0.001}}", NULL, 0,
                   "train.batch_size", "grad_accum");
    }
    TEST_CASE("error: SimplEsT depth 6 with eta 0.9 is unachievable") {
        EXPECT_ERR("{\"model\": {\"width\": \"custom\", \"dim\": 32, \"heads\": 2, \"mlp_dim\": 64, \"depth\": 6}, "
                   "\"train\": {\"batch_size\": 64}, \"opt\": {\"lr\": 0.001}}",
                   NULL, 0, "model.depth", "unachievable");
        EXPECT_ERR("{\"model\": {\"width\": \"custom\", \"dim\": 32, \"heads\": 2, \"mlp_dim\": 64, \"depth\": 3}, "
                   "\"train\": {\"batch_size\": 64}, \"opt\": {\"lr\": 0.001}}",
                   NULL, 0, "model.depth", "unachievable");
        // depth 7 works; SimpleViT has no TAT constraint at depth 6.
        Config c;
        char err[1024];
        EXPECT(load_text(&c,
                         "{\"model\": {\"width\": \"custom\", \"dim\": 32, \"heads\": 2, \"mlp_dim\": 64, \"depth\": "
                         "7}, \"train\": {\"batch_size\": 64}, \"opt\": {\"lr\": 0.001}}",
                         NULL, 0, err, sizeof err) == 0,
               "depth 7: %s", err);
        EXPECT(load_text(&c,
                         "{\"model\": {\"arch\": \"simplevit\", \"width\": \"custom\", \"dim\": 32, \"heads\": 2, "
                         "\"mlp_dim\": 64, \"depth\": 6}, \"train\": {\"batch_size\": 64}, \"opt\": {\"lr\": 0.001}}",
                         NULL, 0, err, sizeof err) == 0,
               "simplevit depth 6: %s", err);
    }
    TEST_CASE("error: image not divisible by patch") {
        EXPECT_ERR("{\"model\": {\"patch_size\": 5}, \"train\": {\"batch_size\": 64}, \"opt\": {\"lr\": 0.001}}", NULL,
                   0, "model.patch_size");
    }
    TEST_CASE("error: image/channels/classes that the dataset does not have") {
        EXPECT_ERR("{\"model\": {\"image_size\": 32}, \"train\": {\"batch_size\": 64}, \"opt\": {\"lr\": 0.001}}",
                   NULL, 0, "model.image_size");
        EXPECT_ERR("{\"model\": {\"num_classes\": 100}, \"train\": {\"batch_size\": 64}, \"opt\": {\"lr\": 0.001}}",
                   NULL, 0, "model.num_classes");
    }
    TEST_CASE("error: dim not divisible by heads") {
        EXPECT_ERR("{\"model\": {\"width\": \"custom\", \"dim\": 32, \"heads\": 3, \"mlp_dim\": 64, \"depth\": 8}, "
                   "\"train\": {\"batch_size\": 64}, \"opt\": {\"lr\": 0.001}}",
                   NULL, 0, "model.dim", "model.heads");
    }
    TEST_CASE("error: invalid JSON names the file and the line") {
        const char *text = "{\n  \"train\": {\"batch_size\": 64},\n  \"opt\": {\"lr\": 0.001,}\n}\n";
        EXPECT_ERR(text, NULL, 0, "cfg.json", "line 3");
        EXPECT_ERR("{\n\n\n\n\"train\": {\"batch_size\": 64}\n\"opt\": {}}", NULL, 0, "cfg.json", "line 6");
        EXPECT_ERR("", NULL, 0, "cfg.json");
        EXPECT_ERR(MINIMAL " trailing", NULL, 0, "cfg.json");
    }
    TEST_CASE("error: non-object top level") {
        EXPECT_ERR("[1, 2, 3]", NULL, 0, "cfg.json", "object");
        EXPECT_ERR("42", NULL, 0, "cfg.json", "object");
    }
    TEST_CASE("error: missing file") {
        Config c;
        char err[1024] = "", path[512];
        snprintf(path, sizeof path, "%s/does-not-exist.json", g_dir);
        int rc = config_load_err(&c, path, NULL, 0, err, sizeof err);
        EXPECT(rc == -1, "rc %d", rc);
        EXPECT(one_line(err), "[%s]", err);
        EXPECT(strstr(err, path) != NULL, "[%s] should name %s", err, path);
    }
    TEST_CASE("error: a directory as the config file") {
        Config c;
        char err[1024] = "";
        int rc = config_load_err(&c, g_dir, NULL, 0, err, sizeof err);
        EXPECT(rc == -1, "rc %d", rc);
        EXPECT(one_line(err) && strstr(err, g_dir), "[%s]", err);
    }
}

static void test_overrides(void) {
    TEST_CASE("--set numbers, bools and strings without quotes") {
        Config c;
        char err[1024];
        const char *ov[] = {"train.batch_size=128", "opt.lr=3e-4",        "model.qkv_bias=false",
                            "data.augment=true",    "model.arch=simplevit", "run.dir=/tmp/some run/x",
                            "opt.weight_decay_mode=\"decoupled\"", "train.seed=12345678901"};
        int rc = load_text(&c, MINIMAL, ov, 8, err, sizeof err);
        EXPECT(rc == 0, "rc %d: %s", rc, err);
        EXPECT_INT(c.train.batch_size, 128);
        EXPECT(c.opt.lr == 3e-4, "lr %g", c.opt.lr);
        EXPECT_INT(c.model.qkv_bias, 0);
        EXPECT_INT(c.data.augment, 1);
        EXPECT_STR(c.model.arch, "simplevit");
        EXPECT_STR(c.run.dir, "/tmp/some run/x");
        EXPECT_STR(c.opt.weight_decay_mode, "decoupled");
        EXPECT_INT(c.train.seed, 12345678901LL);
    }
    TEST_CASE("--set creates missing sections and wins over the file") {
        Config c;
        char err[1024];
        const char *ov[] = {"mixup.group=8", "data.train_limit=100", "train.batch_size=16", "model.depth=9"};
        int rc = load_text(&c, "{\"train\": {\"batch_size\": 64}, \"opt\": {\"lr\": 0.001}, \"model\": {\"depth\": 8}}",
                           ov, 4, err, sizeof err);
        EXPECT(rc == 0, "rc %d: %s", rc, err);
        EXPECT_INT(c.mixup.group, 8);
        EXPECT_INT(c.data.train_limit, 100);
        EXPECT_INT(c.train.batch_size, 16);
        EXPECT_INT(c.model.depth, 9);
        // The last --set of a key wins.
        const char *ov2[] = {"model.depth=9", "model.depth=10"};
        rc = load_text(&c, MINIMAL, ov2, 2, err, sizeof err);
        EXPECT(rc == 0 && c.model.depth == 10, "rc %d depth %d: %s", rc, c.model.depth, err);
    }
    TEST_CASE("--set value with '=' inside is kept whole") {
        Config c;
        char err[1024];
        const char *ov[] = {"run.dir=runs/a=b"};
        int rc = load_text(&c, MINIMAL, ov, 1, err, sizeof err);
        EXPECT(rc == 0, "rc %d: %s", rc, err);
        EXPECT_STR(c.run.dir, "runs/a=b");
    }
    // Regression: the value must parse as JSON as a whole ("train.steps=30abc" once became 30), and a string key
    // takes text that merely starts like JSON ("run.dir=2024-01-run", "run.dir=true_story").
    {
        Config c;
        char e1[1024] = "", e2[1024] = "", e3[1024] = "";
        const char *ov1[] = {"train.steps=30abc"}, *ov2[] = {"run.dir=2024-01-run"}, *ov3[] = {"run.dir=true_story"};
        int rc1 = load_text(&c, MINIMAL, ov1, 1, e1, sizeof e1);
        int rc2 = load_text(&c, MINIMAL, ov2, 1, e2, sizeof e2);
        int dir2 = rc2 == 0 && strcmp(c.run.dir, "2024-01-run") == 0;
        int rc3 = load_text(&c, MINIMAL, ov3, 1, e3, sizeof e3);
        int dir3 = rc3 == 0 && strcmp(c.run.dir, "true_story") == 0;
        TEST_CASE("--set takes the whole value: trailing junk is an error, strings may start like JSON") {
            EXPECT(rc1 == -1 && strstr(e1, "train.steps"), "train.steps=30abc: rc %d [%s]", rc1, e1);
            EXPECT(dir2, "run.dir=2024-01-run: rc %d [%s]", rc2, e2);
            EXPECT(dir3, "run.dir=true_story: rc %d [%s]", rc3, e3);
        }
    }
    TEST_CASE("error: unknown key in --set") {
        const char *ov[] = {"model.dimm=32"};
        EXPECT_ERR(MINIMAL, ov, 1, "model.dimm", "--set");
        const char *ov2[] = {"foo=1"};
        EXPECT_ERR(MINIMAL, ov2, 1, "foo");
    }
    TEST_CASE("error: --set on a section path") {
        const char *ov[] = {"model=3"};
        EXPECT_ERR(MINIMAL, ov, 1, "model");
        const char *ov2[] = {"model={\"dim\": 32}"};
        EXPECT_ERR(MINIMAL, ov2, 1, "model");
    }
    TEST_CASE("error: malformed --set") {
        const char *ov[] = {"train.batch_size"};
        EXPECT_ERR(MINIMAL, ov, 1, "train.batch_size");
        const char *ov2[] = {"=3"};
        EXPECT_ERR(MINIMAL, ov2, 1, "=3");
    }
    TEST_CASE("error: --set with a value of the wrong type or range") {
        const char *ov[] = {"model.dim=abc"};
        EXPECT_ERR(MINIMAL, ov, 1, "model.dim");
        const char *ov2[] = {"model.drop_p=1.5"};
        EXPECT_ERR(MINIMAL, ov2, 1, "model.drop_p");
        const char *ov3[] = {"model.qkv_bias=1"};
        EXPECT_ERR(MINIMAL, ov3, 1, "model.qkv_bias");
    }
    TEST_CASE("error: --set through a non-object in the file") {
        const char *ov[] = {"model.dim=32"};
        EXPECT_ERR("{\"model\": 3, \"train\": {\"batch_size\": 64}, \"opt\": {\"lr\": 0.001}}", ov, 1, "model");
    }
}

static void test_presets(void) {
    static const struct { const char *w; int dim, heads, mlp, depth; } P[] = {
        {"ti", 192, 3, 768, 12}, {"s", 384, 6, 1536, 12}, {"b", 768, 12, 3072, 12}};
    TEST_CASE("width presets ti/s/b") {
        for (int i = 0; i < 3; i++) {
            Config c;
            char err[1024], ov0[64];
            snprintf(ov0, sizeof ov0, "model.width=%s", P[i].w);
            const char *ov[] = {ov0};
            int rc = load_text(&c, MINIMAL, ov, 1, err, sizeof err);
            EXPECT(rc == 0, "%s: %s", P[i].w, err);
            EXPECT_INT(c.model.dim, P[i].dim);
            EXPECT_INT(c.model.heads, P[i].heads);
            EXPECT_INT(c.model.mlp_dim, P[i].mlp);
            EXPECT_INT(c.model.depth, P[i].depth);
        }
    }
    TEST_CASE("explicit values override a preset") {
        Config c;
        char err[1024];
        const char *ov[] = {"model.width=ti", "model.dim=96", "model.depth=8"};
        int rc = load_text(&c, MINIMAL, ov, 3, err, sizeof err);
        EXPECT(rc == 0, "%s", err);
        EXPECT_INT(c.model.dim, 96);
        EXPECT_INT(c.model.heads, 3);
        EXPECT_INT(c.model.mlp_dim, 768);
        EXPECT_INT(c.model.depth, 8);
        const char *ov2[] = {"model.width=b", "model.heads=16", "model.mlp_dim=1000"};
        rc = load_text(&c, MINIMAL, ov2, 3, err, sizeof err);
        EXPECT(rc == 0, "%s", err);
        EXPECT_INT(c.model.dim, 768);
        EXPECT_INT(c.model.heads, 16);
        EXPECT_INT(c.model.mlp_dim, 1000);
        EXPECT_INT(c.model.depth, 12);
    }
    TEST_CASE("custom width needs all four") {
        const char *names[] = {"dim", "heads", "mlp_dim", "depth"};
        const char *vals[] = {"32", "2", "64", "8"};
        for (int skip = 0; skip < 4; skip++) {
            char ovs[4][64];
            const char *ov[4];
            int n = 0;
            snprintf(ovs[n], sizeof ovs[n], "model.width=custom");
            ov[n] = ovs[n];
            n++;
            for (int i = 0; i < 4; i++) {
                if (i == skip) continue;
                snprintf(ovs[n], sizeof ovs[n], "model.%s=%s", names[i], vals[i]);
                ov[n] = ovs[n];
                n++;
            }
            char want[64];
            snprintf(want, sizeof want, "model.%s", names[skip]);
            EXPECT_ERR(MINIMAL, ov, n, want, "custom");
        }
        Config c;
        char err[1024];
        const char *ov[] = {"model.width=custom", "model.dim=32", "model.heads=2", "model.mlp_dim=64",
                            "model.depth=8"};
        EXPECT(load_text(&c, MINIMAL, ov, 5, err, sizeof err) == 0, "%s", err);
        EXPECT(c.model.dim == 32 && c.model.heads == 2 && c.model.mlp_dim == 64 && c.model.depth == 8, "custom");
    }
}

static int config_equal(const Config *a, const Config *b, char *why, size_t n) {
#define CMP_S(f) if (strcmp(a->f, b->f)) return snprintf(why, n, #f ": \"%s\" vs \"%s\"", a->f, b->f), 0
#define CMP_N(f) if (a->f != b->f) return snprintf(why, n, #f ": %.17g vs %.17g", (double)a->f, (double)b->f), 0
    CMP_S(model.arch); CMP_S(model.width);
    CMP_N(model.dim); CMP_N(model.heads); CMP_N(model.mlp_dim); CMP_N(model.depth);
    CMP_N(model.image_size); CMP_N(model.patch_size); CMP_N(model.num_classes); CMP_N(model.channels);
    CMP_N(model.eta); CMP_N(model.gamma_L); CMP_N(model.qkv_bias); CMP_N(model.mlp_bias); CMP_N(model.drop_p);
    CMP_N(model.seed_compat);
    CMP_S(data.dataset); CMP_S(data.root);
    CMP_N(data.augment); CMP_N(data.crop_padding); CMP_N(data.flip); CMP_N(data.eval_batch_size);
    CMP_N(data.train_limit); CMP_N(data.eval_limit);
    CMP_N(train.epochs); CMP_N(train.steps); CMP_N(train.seed); CMP_N(train.batch_size); CMP_N(train.grad_accum);
    CMP_N(train.warmup_steps); CMP_N(train.clip); CMP_N(train.label_smoothing); CMP_N(train.mixup_alpha);
    CMP_N(train.eval_every); CMP_N(train.log_every); CMP_N(train.ema); CMP_N(train.ema_every);
    CMP_N(train.ema_decay); CMP_N(train.sam); CMP_N(train.sam_rho); CMP_N(train.sam_every);
    CMP_N(mixup.group);
    CMP_S(opt.name); CMP_N(opt.lr); CMP_N(opt.weight_decay); CMP_S(opt.weight_decay_mode);
    CMP_N(opt.beta1); CMP_N(opt.beta2); CMP_N(opt.eps);
    CMP_S(run.dir); CMP_S(run.device); CMP_N(run.threads); CMP_N(run.status_every_s);
#undef CMP_S
#undef CMP_N
    return 1;
}

static void test_derived(void) {
    TEST_CASE("effective config: a 'derived' section names the transforms (ImageNet with augmentation off: the eval "
              "transform), and is ignored when read back") {
        const char *sets[][4] = {{"data.dataset=imagenet", "data.root=/x", "data.augment=false", NULL},
                                 {"data.dataset=imagenet", "data.root=/x", "data.augment=true", NULL},
                                 {"data.dataset=cifar10", "data.root=/x", "data.augment=true", NULL}};
        const char *want[] = {"CenterCrop(224)", "RandomResizedCrop(224) + flip + RandAugment", "RandAugment(2, 10)"};
        for (int i = 0; i < 3; i++) {
            Config a, b;
            char err[1024] = "";
            int rc = load_text(&a, MINIMAL, sets[i], 3, err, sizeof err);
            EXPECT(rc == 0, "set %d: %s", i, err);
            if (rc) continue;
            char *j = config_to_json(&a);
            cJSON *root = cJSON_Parse(j);
            const cJSON *tr = cJSON_GetObjectItem(cJSON_GetObjectItem(root, "derived"), "train_transform");
            EXPECT(tr && cJSON_IsString(tr) && strstr(tr->valuestring, want[i]), "set %d: train_transform %s", i,
                   tr && cJSON_IsString(tr) ? tr->valuestring : "(missing)");
            if (i == 0) EXPECT(tr && strstr(tr->valuestring, "eval transform"), "the aug-off note is missing");
            cJSON_Delete(root);
            rc = config_load_err(&b, write_cfg("derived.json", j), NULL, 0, err, sizeof err);
            EXPECT(rc == 0, "set %d: reading the effective config back: %s", i, err);
            free(j);
        }
        Config c;
        char err[1024] = "";
        const char *bad = "{\"model\": {\"derived\": {}}}";
        EXPECT(config_load_err(&c, write_cfg("bad_derived.json", bad), NULL, 0, err, sizeof err) != 0 &&
                   strstr(err, "model.derived"),
               "'derived' is skipped only at the top level: %s", err);
    }
}

static void test_roundtrip(void) {
    TEST_CASE("config_to_json round-trips (struct and text)") {
        const char *sets[][12] = {
            {NULL},
            {"model.arch=simplevit", "model.width=custom", "model.dim=48", "model.heads=3", "model.mlp_dim=100",
             "model.depth=5", "opt.lr=0.0123456789012345", "train.seed=123456789012", "run.dir=/tmp/r \"q\"",
             "model.drop_p=0.1", "train.label_smoothing=0.3", NULL},
            {"model.seed_compat=true", "data.augment=true", "train.ema=true", "train.ema_decay=0.999",
             "train.grad_accum=4", "train.batch_size=256", "data.train_limit=2048", "mixup.group=16",
             "opt.weight_decay_mode=decoupled", "run.status_every_s=0.25", "model.eta=0.123456789", NULL},
        };
        for (int s = 0; s < 3; s++) {
            int nov = 0;
            while (nov < 12 && sets[s][nov]) nov++;
            Config a, b;
            char err[1024] = "", why[2048] = "";
            int rc = load_text(&a, MINIMAL, sets[s], nov, err, sizeof err);
            EXPECT(rc == 0, "set %d: %s", s, err);
            if (rc) continue;
            char *j1 = config_to_json(&a);
            cJSON *parsed = cJSON_Parse(j1);
            EXPECT(parsed && cJSON_IsObject(parsed), "set %d: config_to_json is not a JSON object", s);
            cJSON_Delete(parsed);
            const char *path = write_cfg("effective.json", j1);
            rc = config_load_err(&b, path, NULL, 0, err, sizeof err);
            EXPECT(rc == 0, "set %d: reloading the effective config: %s", s, err);
            if (rc == 0) {
                EXPECT(config_equal(&a, &b, why, sizeof why), "set %d: %s", s, why);
                char *j2 = config_to_json(&b);
                EXPECT(strcmp(j1, j2) == 0, "set %d: JSON texts differ", s);
                free(j2);
            }
            free(j1);
        }
    }
    // Regression: cJSON prints numbers with 15 digits, which lost the last ulp of doubles and rounded int64 seeds;
    // config_to_json now prints them exactly, so config.json reproduces the run.
    {
        Config a, b;
        char err[1024] = "", why[2048] = "";
        const char *ov[] = {"train.seed=8999999999999999", "opt.lr=0.10000000000000002"};
        int rc = load_text(&a, MINIMAL, ov, 2, err, sizeof err);
        int exact = 0;
        if (rc == 0) {
            char *j = config_to_json(&a);
            const char *path = write_cfg("effective2.json", j);
            exact = config_load_err(&b, path, NULL, 0, err, sizeof err) == 0 && config_equal(&a, &b, why, sizeof why);
            free(j);
        }
        TEST_CASE("config_to_json is exact for 1-ulp doubles and large int64 seeds") {
            EXPECT(rc == 0, "%s", err);
            EXPECT(exact, "%s", why);
        }
    }
    TEST_CASE("config_to_json has every section and a resolved model") {
        Config a;
        char err[1024];
        int rc = load_text(&a, MINIMAL, NULL, 0, err, sizeof err);
        EXPECT(rc == 0, "%s", err);
        char *j = config_to_json(&a);
        cJSON *root = cJSON_Parse(j);
        const char *secs[] = {"model", "data", "train", "mixup", "comm", "opt", "run"};
        for (int i = 0; i < 7; i++)
            EXPECT(cJSON_IsObject(cJSON_GetObjectItem(root, secs[i])), "section %s", secs[i]);
        cJSON *m = cJSON_GetObjectItem(root, "model");
        EXPECT(cJSON_GetObjectItem(m, "dim") && cJSON_GetObjectItem(m, "dim")->valuedouble == 384, "model.dim");
        cJSON_Delete(root);
        free(j);
    }
}

static void test_doc(void) {
    TEST_CASE("docs/config.md equals config_doc_markdown()") {
        char *doc = config_doc_markdown();
        size_t len = 0;
        char *file = (char *)read_file_all("docs/config.md", &len);
        EXPECT(file != NULL, "docs/config.md is missing (regenerate: ./simplest-dist config-doc > docs/config.md)");
        if (file) {
            int same = strlen(doc) == len && memcmp(doc, file, len) == 0;
            if (!same) {
                size_t i = 0;
                while (i < len && doc[i] && doc[i] == file[i]) i++;
                int line = 1;
                for (size_t k = 0; k < i; k++) line += file[k] == '\n';
                EXPECT(same, "docs/config.md differs from config_doc_markdown() at line %d "
                             "(regenerate: ./simplest-dist config-doc > docs/config.md)", line);
            }
        }
        // Every key that the loader accepts is documented (spot check one per section).
        const char *keys[] = {"`model.seed_compat`", "`data.eval_limit`", "`train.sam_every`", "`mixup.group`",
                              "`opt.eps`", "`run.status_every_s`"};
        for (int i = 0; i < 6; i++) EXPECT(strstr(doc, keys[i]) != NULL, "%s missing from the doc", keys[i]);
        free(file);
        free(doc);
    }
}

int main(void) {
    snprintf(g_dir, sizeof g_dir, "/tmp/test_config.XXXXXX");
    if (!mkdtemp(g_dir)) {
        perror("mkdtemp");
        return 1;
    }
    test_defaults();
    test_errors();
    test_overrides();
    test_presets();
    test_roundtrip();
    test_derived();
    test_doc();
    char cmd[400];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", g_dir);
    return tl_finish();
}
