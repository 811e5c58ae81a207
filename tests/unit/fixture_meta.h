// fixture_meta.h: reading the metadata of the committed reference fixtures (tests/reference/*.py writes them):
// a number, and the model section of the "config" JSON as a ModelConfig. Shared by the parity tests.
#pragma once
#include <cJSON.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"
#include "safetensors.h"

static double meta_num(const StFile *f, const char *key) {
    const char *v = st_meta(f, key);
    return v ? atof(v) : NAN;
}

// Reads the model section of the weights file's config metadata.
static int model_config_from_meta(const StFile *w, ModelConfig *mc) {
    const char *cfg = st_meta(w, "config");
    cJSON *root = cfg ? cJSON_Parse(cfg) : NULL;
    cJSON *m = root ? cJSON_GetObjectItem(root, "model") : NULL;
    if (!m) return -1;
#define NUM(k) cJSON_GetObjectItem(m, k)->valuedouble
#define FLAG(k) cJSON_IsTrue(cJSON_GetObjectItem(m, k))
    memset(mc, 0, sizeof *mc);
    mc->arch = strcmp(cJSON_GetObjectItem(m, "arch")->valuestring, "simplevit") == 0 ? ARCH_SIMPLEVIT : ARCH_SIMPLEST;
    mc->image_size = (int)NUM("image_size");
    mc->patch_size = (int)NUM("patch_size");
    mc->channels = (int)NUM("channels");
    mc->num_classes = (int)NUM("num_classes");
    mc->dim = (int)NUM("dim");
    mc->depth = (int)NUM("depth");
    mc->heads = (int)NUM("heads");
    mc->mlp_dim = (int)NUM("mlp_dim");
    mc->eta = NUM("eta");
    mc->gamma_L = NUM("gamma_L");
    mc->qkv_bias = FLAG("qkv_bias");
    mc->mlp_bias = FLAG("mlp_bias");
    mc->drop_p = (float)NUM("drop_p");
    mc->seed_compat = FLAG("seed_compat");
    cJSON_Delete(root);
    return 0;
}
