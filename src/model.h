// model.h: the two ViTs of spec/model.md (SimplEsT-ViT and SimpleViT). Owns the parameter table (names = the
// reference state_dict keys, in its order), one allocation each for params, grads, fixed buffers and activations,
// the init, and the explicit layer-by-layer forward and backward over the backend ops.
#pragma once
#include <stddef.h>
#include <stdint.h>

#include "backend.h"

typedef enum { ARCH_SIMPLEST = 0, ARCH_SIMPLEVIT = 1 } Arch;

typedef struct {
    Arch arch;
    int image_size, patch_size, channels, num_classes;
    int dim, depth, heads, mlp_dim;
    double eta, gamma_L;  // TAT target C(0) and E-SPA gamma at the last layer (SimplEsT only)
    int qkv_bias, mlp_bias;  // SimplEsT only
    float drop_p;            // token dropout before pooling
    int seed_compat;         // reference quirks (spec/model.md §1)
    int recompute;           // SimpleViT: LayerNorm and GELU outputs recomputed in backward, not kept per block
} ModelConfig;

typedef struct {
    char name[96];
    int ndim;
    int shape[4];
    size_t numel;
    size_t offset;  // in floats, into params (trainable) or into buffers (fixed)
    int trainable;  // 0: E-SPA d and B, and SimpleViT's identity to_out in seed_compat
    int decay;      // in the weight-decay set (the name has no "bias"; trainable only)
} TensorInfo;

// Indices into the tensor table for one block (-1 where absent).
typedef struct {
    int d, B, qkv_w, qkv_b;                 // attention (SimplEsT: d, B; SimpleViT: none)
    int ln1_w, ln1_b, out_w;                // SimpleViT attention LN and to_out
    int fc1_w, fc1_b, fc2_w, fc2_b;         // MLP
    int ln2_w, ln2_b;                       // SimpleViT MLP LN
} BlockTensors;

// Activation views of one block, all (R, *) with R = max_batch * N unless noted.
typedef struct {
    void *ln1;                  // (R, D) SimpleViT
    float *ln1_mean, *ln1_rstd;  // (R)
    void *qkv;                  // (R, 3D)
    float *attn_saved;          // backend-defined (probabilities on CPU)
    void *att;                  // (R, D) attention output
    void *res1;                 // (R, D) SimpleViT x + attn
    void *ln2;                  // (R, D) SimpleViT
    float *ln2_mean, *ln2_rstd;  // (R)
    void *fc1;                  // (R, M) SimplEsT: after TReLU; SimpleViT: before GELU
    void *gelu;                 // (R, M) SimpleViT
    void *out;                  // (R, D) block output (SimplEsT: after the second TReLU; SimpleViT: res2)
} BlockActs;

typedef struct {
    ModelConfig cfg;
    Backend *be;
    int grid_h, grid_w, N, patch_dim, dh;
    double tat_a, tat_s;  // TAT negative slope and output scale (SimplEsT)

    TensorInfo *tensors;  // weights-file order
    int ntensors;
    size_t num_params, num_buffers;  // floats in params (trainable) and buffers (fixed)
    int patch_w, patch_b, head_ln_w, head_ln_b, head_w, head_b;  // tensor indices (-1 where absent)
    BlockTensors *blocks;
    size_t *block_params;  // (depth + 1) block l's trainable floats are [block_params[l], block_params[l + 1])
    size_t patch_params;   // floats of the patch embedding (the first range); the head is [block_params[depth], num_params)

    float *params, *grads;  // device, num_params each
    float *buffers;         // device, num_buffers
    float *posemb;          // device (N, D)

    int max_batch;
    void *act_mem;    // one allocation for every activation
    size_t act_bytes; // its size, for max_batch images
    float *input;     // (B, C, H, W) fp32: the trainer uploads images here
    float *targets;   // (B, num_classes) fp32 soft targets
    float *losses;    // (B) per-sample loss
    void *patches;    // (R, C*p*p)
    void *x0;         // (R, D) embedding + posemb
    BlockActs *acts;  // per block
    void *dropped;    // (R, D) after dropout
    void *pooled;     // (B, D)
    void *head_ln;    // (B, D) SimpleViT
    float *head_ln_mean, *head_ln_rstd;  // (B)
    void *logits;     // (B, C)
    void *dlogits;    // (B, C)
    void *g_x, *g_mid, *g_big, *g_ln;  // backward scratch: (R, D), (R, max(D,M)), (R, max(3D,M)), (R, D)
    void *g_pooled, *g_head;           // (B, D) each
    void *rc_ln, *rc_gelu;             // model.recompute: the one (R, D) and (R, M) buffer all blocks share
    int last_training;  // whether the last forward ran in train mode (dropout)
} Model;

// Fills in derived fields and checks the shape rules; returns 0 or -1 with a one-line reason in err.
int model_config_check(const ModelConfig *c, char *err, size_t errlen);

Model *model_create(const ModelConfig *cfg, Backend *be, int max_batch);
void model_free(Model *m);

// Random init per arch and mode (spec/model.md §8, §9) from the seed; builds E-SPA buffers and posemb.
void model_init(Model *m, uint64_t seed);
// Host-side init into host arrays (params: num_params floats, buffers: num_buffers floats); used by model_init.
void model_init_host(const Model *m, uint64_t seed, float *params, float *buffers);

// Forward on the first B images of m->input. training enables dropout, keyed (seed, step, first_pos + i).
void model_forward(Model *m, int B, int training, uint64_t seed, uint64_t step, uint64_t first_pos);
// Per-sample losses into m->losses (from the soft targets in m->targets); with want_grad also
// dlogits = grad_scale * dloss/dlogits for the backward.
void model_loss(Model *m, int B, float smoothing, float grad_scale, int want_grad);
// Accumulates parameter gradients into m->grads (call model_zero_grad first).
void model_backward(Model *m, int B, uint64_t seed, uint64_t step, uint64_t first_pos);
// The same, calling ready(ctx, offset, count) each time a contiguous range of gradients is final (head, then each
// block from the last, then the patch embedding), so that their all-reduce can start during the backward pass.
typedef void (*GradReadyFn)(void *ctx, size_t offset, size_t count);
void model_backward_hooked(Model *m, int B, uint64_t seed, uint64_t step, uint64_t first_pos, GradReadyFn ready,
                           void *ctx);
void model_zero_grad(Model *m);

// Signal-propagation diagnostics of the last forward: per block output, mean square and mean token cosine.
void model_signal_stats(Model *m, int B, double *mean_sq, double *mean_cos);

// Fixed sin-cos 2-D posemb (N, D) in fp32, column terms first (spec §4).
void posemb_sincos_2d(float *pe, int h, int w, int D);

// Trainable and fixed floats of the model cfg describes (spec/model.md §10), without a backend; -1 if cfg is bad.
int model_param_counts(const ModelConfig *cfg, size_t *trainable, size_t *fixed);

// Index of a tensor by name, or -1.
int model_find_tensor(const Model *m, const char *name);
size_t model_num_trainable(const Model *m);
