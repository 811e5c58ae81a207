// checkpoint.h: the weights file (spec/model.md §11): safetensors whose names, shapes, order and layouts equal the
// reference PyTorch state_dict, with metadata. Written atomically; read back bitwise. And the training checkpoint
// that a run resumes from (docs/checkpoints.md): <run.dir>/checkpoints/step_<N>/ holding model.safetensors, the
// optimizer state, the EMA weights, loader.json and trainer.json, made complete by a DONE file and a rename.
#pragma once
#include <stddef.h>
#include <stdint.h>

#include "model.h"
#include "optim.h"

// Writes the model's tensors (params from host_params if non-NULL, e.g. EMA weights, else the model's) to path.
// config_json is the full effective config. Returns 0, or -1 with errno.
int weights_save(const Model *m, const char *path, const float *host_params, const char *config_json, int64_t step,
                 int ema);
// Loads a weights file into the model: rejects missing, extra, repeated or mis-shaped tensors, a non-finite value,
// a layer-0 B whose form does not match the configured mode, and (seed_compat) a SimpleViT to_out that is not the
// identity. Strips the
// "_orig_mod." prefix of compiled reference checkpoints. Returns 0, or -1 with a one-line reason in err.
int weights_load(Model *m, const char *path, char *err, size_t errlen);
// weights_load's reading and checks into host buffers (params: num_params floats, buffers: num_buffers), leaving
// the model untouched.
int weights_read(const Model *m, const char *path, float *params, float *buffers, char *err, size_t errlen);

// model.init_from: the trainable tensors of a weights file into params (num_params floats, pre-filled with the
// random init), for a fresh run. Tensors whose names start with a prefix in skip (comma-separated) keep their init
// and may be absent or shaped otherwise; every other trainable tensor must be there with its shape, finite. Fixed
// tensors in the file are checked, not loaded (B's form, the identity to_out), and the file's recorded arch and
// seed_compat must match. Counts the tensors loaded and kept. Returns 0, or -1 with a one-line reason in err.
int weights_init_read(const Model *m, const char *path, const char *skip, float *params, int *loaded, int *kept,
                      char *err, size_t errlen);

// Adam's state (spec/shampoo.md §3.5's names): "<param>.exp_avg", "<param>.exp_avg_sq" and metadata t. adam_state_read
// checks every tensor (present once, shaped as the parameter, finite, exp_avg_sq >= 0) into host m and v
// (num_params floats each) and the step count. On failure *t_out is unchanged and m_out, v_out hold scratch: the
// trainer reads into buffers of its own and installs them only when every file of a checkpoint has been read.
int adam_state_save(const Adam *a, const Model *m, const char *path);
int adam_state_read(const Model *m, const char *path, float *m_out, float *v_out, int64_t *t_out, char *err,
                    size_t errlen);

// The trainer's part of a checkpoint: the step, the best and last eval, the world size that wrote it, the open log
// interval and the run's effective config (text, malloc'd).
typedef struct {
    int64_t step;
    double best_top1;  // < 0: no eval yet
    int64_t best_step;
    int has_eval;  // the last evaluation (status.json's "eval" continues from it)
    int64_t eval_step;
    double eval_top1, eval_top5, eval_loss;
    int world;
    double interval_loss;    // the training-loss sum and sample count of the log interval the checkpoint cuts
    int64_t interval_count;  // (all ranks), so that the resumed run logs that interval's mean as it would have
    char *config_json;
} TrainState;
int train_state_write(const char *path, const TrainState *s);
// Reads and checks a trainer.json; 0, or -1 with a reason naming the file. Free config_json after.
int train_state_read(const char *path, TrainState *s, char *err, size_t errlen);

// Checkpoint directories under <run_dir>/checkpoints/. A checkpoint is written into step_<N>.tmp/ (every file fsynced),
// completed by DONE, renamed to step_<N>/, and named in the file `latest`; older complete ones beyond `keep` are
// then deleted. Only a step_<N>/ holding DONE counts: a crash at any moment leaves the previous checkpoints whole.
void ckpt_dir(char *buf, size_t n, const char *run_dir, int64_t step);
// Creates an empty step_<N>.tmp/ (after ckpt_tidy) and puts its path in tmp. 0, or -1 with errno.
int ckpt_begin(const char *run_dir, int64_t step, char *tmp, size_t n);
// DONE, rename, `latest`, pruning. 0 once step_<N>/ is complete (a failure after that is a warning), else -1.
// Pruning keeps this checkpoint and the keep - 1 newest older ones; it never touches a newer step.
int ckpt_commit(const char *run_dir, int64_t step, int keep);
// Clears what killed runs left in checkpoints/: a step_<N>.tmp/ is removed, or renamed to step_<N>/ when it holds
// DONE and step_<N>/ is missing (a commit that replaced the same step cut short); a step_<N>/ without DONE (a crash
// while pruning it) is removed.
void ckpt_tidy(const char *run_dir);
// The bytes of the files in checkpoint step_<N>/ (0 if there is none).
int64_t ckpt_bytes(const char *run_dir, int64_t step);
// Removes the step_<N>.tmp/ of a checkpoint that failed part way.
void ckpt_abandon(const char *run_dir, int64_t step);
// The steps of the complete checkpoints, newest first (malloc'd; *steps NULL when there are none). Returns the count.
int ckpt_list(const char *run_dir, int64_t **steps);
// Moves a complete checkpoint that cannot be loaded aside to step_<N>.unreadable/ (kept for inspection, never
// loaded or deleted again). 0, or -1 with errno.
int ckpt_set_aside(const char *run_dir, int64_t step);
