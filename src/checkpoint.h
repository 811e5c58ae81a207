// checkpoint.h: the weights file (spec/model.md §11): safetensors whose names, shapes, order and layouts equal the
// reference PyTorch state_dict, with metadata. Written atomically; read back bitwise.
#pragma once
#include <stddef.h>
#include <stdint.h>

#include "model.h"

// Writes the model's tensors (params from host_params if non-NULL, e.g. EMA weights, else the model's) to path.
// config_json is the full effective config. Returns 0, or -1 with errno.
int weights_save(const Model *m, const char *path, const float *host_params, const char *config_json, int64_t step,
                 int ema);
// Loads a weights file into the model: rejects missing, extra, repeated or mis-shaped tensors, a non-finite value,
// a layer-0 B whose form does not match the configured mode, and (seed_compat) a SimpleViT to_out that is not the
// identity. Strips the
// "_orig_mod." prefix of compiled reference checkpoints. Returns 0, or -1 with a one-line reason in err.
int weights_load(Model *m, const char *path, char *err, size_t errlen);
