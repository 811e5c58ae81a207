// status.c: see status.h.
#include "status.h"

#include <cJSON.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#include "util.h"

double unix_time(void) {
    struct timeval tv;
    gettimeofday(&tv, NULL);
    return (double)tv.tv_sec + 1e-6 * (double)tv.tv_usec;
}

// NaN and Inf are not JSON: they become null.
static void add_num(cJSON *o, const char *k, double v) {
    if (isfinite(v))
        cJSON_AddNumberToObject(o, k, v);
    else
        cJSON_AddNullToObject(o, k);
}

int status_write(const char *dir, const StatusInfo *s) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "schema", "simplest-dist-status-1");
    cJSON_AddStringToObject(o, "state", s->state);
    add_num(o, "updated_unix", unix_time());
    cJSON_AddStringToObject(o, "run_dir", s->run_dir);
    cJSON_AddStringToObject(o, "arch", s->arch);
    cJSON_AddStringToObject(o, "device", s->device);
    add_num(o, "step", (double)s->step);
    add_num(o, "total_steps", (double)s->total_steps);
    add_num(o, "epoch", s->epoch);
    add_num(o, "images_per_sec", s->images_per_sec);
    add_num(o, "loss", s->loss);
    add_num(o, "lr", s->lr);
    add_num(o, "grad_norm", s->grad_norm);
    add_num(o, "elapsed_s", s->elapsed_s);
    add_num(o, "eta_s", s->eta_s);
    if (s->has_eval) {
        cJSON *e = cJSON_AddObjectToObject(o, "eval");
        add_num(e, "step", (double)s->eval_step);
        add_num(e, "top1", s->eval_top1);
        add_num(e, "top5", s->eval_top5);
        add_num(e, "loss", s->eval_loss);
        add_num(e, "best_top1", s->best_top1);
        add_num(e, "best_step", (double)s->best_step);
    } else {
        cJSON_AddNullToObject(o, "eval");
    }
    add_num(o, "world_size", s->world_size);
    cJSON *ranks = cJSON_AddArrayToObject(o, "ranks");
    for (int r = 0; r < s->world_size && s->ranks; r++) {
        cJSON *x = cJSON_CreateObject();
        add_num(x, "rank", s->ranks[r].rank);
        add_num(x, "step", (double)s->ranks[r].step);
        add_num(x, "heartbeat_unix", s->ranks[r].heartbeat_unix);
        add_num(x, "images_per_sec", s->ranks[r].images_per_sec);
        add_num(x, "loader_stall_s", s->ranks[r].loader_stall_s);
        add_num(x, "pid", s->ranks[r].pid);
        cJSON_AddItemToArray(ranks, x);
    }
    if (s->last_checkpoint)
        cJSON_AddStringToObject(o, "last_checkpoint", s->last_checkpoint);
    else
        cJSON_AddNullToObject(o, "last_checkpoint");
    add_num(o, "last_checkpoint_s", s->last_checkpoint_s);
    if (s->resumed_from > 0)
        add_num(o, "resumed_from", (double)s->resumed_from);
    else
        cJSON_AddNullToObject(o, "resumed_from");
    if (s->has_shampoo) {
        cJSON *sh = cJSON_AddObjectToObject(o, "shampoo");
        add_num(sh, "blocks", s->shampoo_blocks);
        add_num(sh, "owned_by_rank0", s->shampoo_owned);
        add_num(sh, "ownership_max_over_mean", s->shampoo_max_mean_load);
        add_num(sh, "refreshes", (double)s->shampoo_refreshes);
        add_num(sh, "failed_decompositions", (double)s->shampoo_failed);
        add_num(sh, "last_refresh_s", s->shampoo_last_refresh_s);
        add_num(sh, "eig_s_total", s->shampoo_eig_s);
        add_num(sh, "root_delay", s->shampoo_root_delay);
        if (s->shampoo_pending_step)
            add_num(sh, "pending_refresh_step", (double)s->shampoo_pending_step);
        else
            cJSON_AddNullToObject(sh, "pending_refresh_step");
        add_num(sh, "root_wait_s_total", s->shampoo_root_wait_s);
        add_num(sh, "last_root_wait_s", s->shampoo_last_root_wait_s);
        add_num(sh, "broadcast_s_total", s->shampoo_bcast_s);
        add_num(sh, "apply_s_total", s->shampoo_apply_s);
        cJSON_AddStringToObject(sh, "apply", s->shampoo_apply_owners ? "owners" : "replicated");
        add_num(sh, "step_gather_s_total", s->shampoo_gather_s);
        add_num(sh, "step_bytes_sent", s->shampoo_steps_sent);
        add_num(sh, "step_bytes_received", s->shampoo_steps_received);
        add_num(sh, "broadcast_bytes_sent", s->shampoo_bytes_sent);
        add_num(sh, "broadcast_bytes_received", s->shampoo_bytes_received);
        add_num(sh, "broadcast_bytes_per_refresh", s->shampoo_bytes_per_refresh);
        if (s->shampoo_checks_on) {
            add_num(sh, "replica_root_checks_passed", (double)s->shampoo_root_checks);
            add_num(sh, "replica_param_checks_passed", (double)s->shampoo_param_checks);
        } else {
            cJSON_AddNullToObject(sh, "replica_root_checks_passed");
            cJSON_AddNullToObject(sh, "replica_param_checks_passed");
        }
    } else {
        cJSON_AddNullToObject(o, "shampoo");
    }
    if (s->sp_mean_sq) {
        cJSON *sp = cJSON_AddObjectToObject(o, "signalprop");
        add_num(sp, "step", (double)s->sp_step);
        cJSON *layers = cJSON_AddArrayToObject(sp, "blocks");
        for (int l = 0; l < s->depth; l++) {
            cJSON *x = cJSON_CreateObject();
            add_num(x, "block", l + 1);
            add_num(x, "mean_sq", s->sp_mean_sq[l]);
            add_num(x, "mean_token_cos", s->sp_mean_cos[l]);
            cJSON_AddItemToArray(layers, x);
        }
    } else {
        cJSON_AddNullToObject(o, "signalprop");
    }
    if (s->data_dataset) {
        cJSON *d = cJSON_AddObjectToObject(o, "data");
        cJSON_AddStringToObject(d, "dataset", s->data_dataset);
        add_num(d, "decoder_threads", s->data_threads);
        add_num(d, "loader_wait_s", s->data_wait_s);
        cJSON *sk = cJSON_AddObjectToObject(d, "skipped");
        int64_t total = 0;
        for (int i = 0; i < s->data_nreasons; i++) {
            if (s->data_skip_names[i]) add_num(sk, s->data_skip_names[i], (double)s->data_skipped[i]);
            total += s->data_skipped[i];
        }
        add_num(d, "skipped_total", (double)total);
        add_num(d, "decode_warnings", (double)s->data_warnings);
    } else {
        cJSON_AddNullToObject(o, "data");
    }
    char *text = cJSON_Print(o);
    cJSON_Delete(o);
    CHECK(text, "out of memory printing status.json");
    char path[1200];
    snprintf(path, sizeof path, "%s/status.json", dir);
    int rc = write_file_atomic(path, text, strlen(text));
    free(text);
    return rc;
}

void metrics_append(FILE *f, const char *const *keys, const double *vals, int n) {
    if (!f) return;
    cJSON *o = cJSON_CreateObject();
    for (int i = 0; i < n; i++) add_num(o, keys[i], vals[i]);
    char *line = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    CHECK(line, "out of memory printing a metrics line");
    if (fputs(line, f) < 0 || fputc('\n', f) < 0 || fflush(f) != 0)
        fprintf(stderr, "simplest-dist: warning: cannot append to metrics.jsonl\n");
    free(line);
}
