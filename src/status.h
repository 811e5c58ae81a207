// status.h: what monitoring reads. status.json (schema in docs/status.md), replaced atomically, and metrics.jsonl,
// one JSON object per line, appended and flushed. Only rank 0 writes them.
#pragma once
#include <stdint.h>
#include <stdio.h>

typedef struct {
    int rank;
    int64_t step;
    double heartbeat_unix;  // wall-clock time of the rank's last report
    double images_per_sec;
    double loader_stall_s;  // total time spent waiting on the loader
    int pid;                // the rank's process id (to find it on its node)
} RankStatus;

typedef struct {
    const char *state;  // "training" | "evaluating" | "done" | "stopped" | "failed"
    const char *run_dir, *arch, *device;
    int64_t step, total_steps;
    double epoch;  // fractional
    double images_per_sec, loss, lr, grad_norm;
    double elapsed_s, eta_s;
    int has_eval;
    int64_t eval_step, best_step;
    double eval_top1, eval_top5, eval_loss, best_top1;
    int world_size;
    const RankStatus *ranks;  // world_size entries
    const char *last_checkpoint;  // NULL: none yet
    int64_t resumed_from;         // the checkpoint step this run continued from; 0: it started fresh
    double last_checkpoint_s;     // seconds the last checkpoint took (every rank waited that long), NaN: none yet
    int has_shampoo;  // Shampoo root-refresh statistics below are valid
    int shampoo_blocks, shampoo_owned;
    int64_t shampoo_refreshes, shampoo_failed;
    double shampoo_last_refresh_s, shampoo_eig_s, shampoo_bcast_s, shampoo_apply_s, shampoo_max_mean_load;
    double shampoo_gather_s, shampoo_steps_sent, shampoo_steps_received;  // shampoo.apply "owners"
    int shampoo_apply_owners;
    int shampoo_root_delay;
    int64_t shampoo_pending_step;                  // the refresh whose roots are being computed, or 0
    double shampoo_root_wait_s, shampoo_last_root_wait_s;  // root_delay >= 1: waits for the roots at install
    double shampoo_bytes_sent, shampoo_bytes_received, shampoo_bytes_per_refresh;  // root broadcast traffic
    int shampoo_checks_on;                       // shampoo.check_replicas
    int64_t shampoo_root_checks, shampoo_param_checks;  // replica checks passed
    int depth;
    const double *sp_mean_sq, *sp_mean_cos;  // per block, NULL before the first measurement
    int64_t sp_step;
    // Data pipeline (this rank's; spec/data.md §5.4): NULL before the loader exists.
    const char *data_dataset;
    int data_threads;
    double data_wait_s;  // time the trainer waited on the decoder threads' ring
    int data_nreasons;   // entries in data_skip_names / data_skipped
    const char *const *data_skip_names;
    const int64_t *data_skipped;  // distinct files skipped, by reason
    int64_t data_warnings;        // corrupt-data warnings of images used anyway
} StatusInfo;

// Writes <dir>/status.json atomically. Returns 0 or -1 with errno.
int status_write(const char *dir, const StatusInfo *s);
// Appends one JSON object {keys[i]: vals[i]} as a line of metrics.jsonl and flushes it (NaN/Inf as null).
void metrics_append(FILE *f, const char *const *keys, const double *vals, int n);
double unix_time(void);
// `simplest-dist status`: prints a summary of <run_dir>/status.json to out and judges it at time now (unix
// seconds): 1 when the run failed, when a training or evaluating run's file is older than stale_s, or when a rank's
// last heartbeat is older than stale_s at the file's update; else 0. -1 with a one-line reason in err when the file
// cannot be read or is not a status file.
int status_report(const char *run_dir, double stale_s, double now, FILE *out, char *err, size_t errlen);
