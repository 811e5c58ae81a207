// status.c: see status.h.
#include "status.h"

#include <cJSON.h>
#include <errno.h>
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

// ---------------------------------------------------------------- `simplest-dist status RUN_DIR`

static double num_or_nan(const cJSON *o, const char *k) {
    const cJSON *x = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsNumber(x) ? x->valuedouble : NAN;
}

static const char *str_or(const cJSON *o, const char *k, const char *dflt) {
    const cJSON *x = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsString(x) ? x->valuestring : dflt;
}

int status_report(const char *run_dir, double stale_s, double now, FILE *out, char *err, size_t n) {
    char path[1200];
    snprintf(path, sizeof path, "%s/status.json", run_dir);
    size_t len = 0;
    char *text = (char *)read_file_all(path, &len);
    if (!text) return set_err(err, n, "%s: cannot read it: %s", path, strerror(errno));
    cJSON *o = cJSON_ParseWithLength(text, len);
    free(text);
    const cJSON *schema = o ? cJSON_GetObjectItemCaseSensitive(o, "schema") : NULL;
    if (!cJSON_IsString(schema) || strcmp(schema->valuestring, "simplest-dist-status-1") != 0) {
        cJSON_Delete(o);
        return set_err(err, n, "%s: not a simplest-dist status file (schema simplest-dist-status-1)", path);
    }
    const char *state = str_or(o, "state", "?");
    double updated = num_or_nan(o, "updated_unix"), age = now - updated;
    double step = num_or_nan(o, "step"), total = num_or_nan(o, "total_steps");
    int live = !strcmp(state, "training") || !strcmp(state, "evaluating");
    char dur[64], problems[1024] = "";
    format_duration(dur, sizeof dur, 0, age);
    fprintf(out, "%s: %s, step %.0f of %.0f (%.1f %%, epoch %.2f), updated %s ago\n", run_dir, state, step, total,
            total > 0 ? 100.0 * step / total : 0.0, num_or_nan(o, "epoch"), dur);
    format_duration(dur, sizeof dur, 0, num_or_nan(o, "eta_s"));
    fprintf(out, "  loss %.4f, lr %.3g, grad norm %.3g, %.0f img/s%s%s\n", num_or_nan(o, "loss"), num_or_nan(o, "lr"),
            num_or_nan(o, "grad_norm"), num_or_nan(o, "images_per_sec"), live ? ", ETA " : "", live ? dur : "");
    const cJSON *ev = cJSON_GetObjectItemCaseSensitive(o, "eval");
    if (cJSON_IsObject(ev))
        fprintf(out, "  eval at step %.0f: top-1 %.4f, top-5 %.4f, loss %.4f; best top-1 %.4f at step %.0f\n",
                num_or_nan(ev, "step"), num_or_nan(ev, "top1"), num_or_nan(ev, "top5"), num_or_nan(ev, "loss"),
                num_or_nan(ev, "best_top1"), num_or_nan(ev, "best_step"));
    const char *ck = str_or(o, "last_checkpoint", NULL);
    if (ck) fprintf(out, "  checkpoint: %s (took %.1f s)\n", ck, num_or_nan(o, "last_checkpoint_s"));
    const cJSON *ranks = cJSON_GetObjectItemCaseSensitive(o, "ranks");
    int nr = cJSON_IsArray(ranks) ? cJSON_GetArraySize(ranks) : 0;
    double hb_max = -1, stall_max = -1;
    int hb_rank = -1, stall_rank = -1;
    for (int i = 0; i < nr; i++) {
        const cJSON *r = cJSON_GetArrayItem(ranks, i);
        double hb = updated - num_or_nan(r, "heartbeat_unix"), st = num_or_nan(r, "loader_stall_s");
        int rk = (int)num_or_nan(r, "rank");
        if (hb > hb_max) hb_max = hb, hb_rank = rk;
        if (st > stall_max) stall_max = st, stall_rank = rk;
    }
    if (nr > 0)
        fprintf(out, "  ranks: %d; oldest heartbeat %.1f s before the update (rank %d); loader stall up to %.2f s "
                     "(rank %d)\n", nr, hb_max, hb_rank, stall_max, stall_rank);
    const cJSON *sh = cJSON_GetObjectItemCaseSensitive(o, "shampoo");
    if (cJSON_IsObject(sh))
        fprintf(out, "  shampoo: %.0f blocks, %.0f refreshes, %.0f failed decompositions, last refresh %.2f s\n",
                num_or_nan(sh, "blocks"), num_or_nan(sh, "refreshes"), num_or_nan(sh, "failed_decompositions"),
                num_or_nan(sh, "last_refresh_s"));
    const cJSON *data = cJSON_GetObjectItemCaseSensitive(o, "data");
    double skipped = cJSON_IsObject(data) ? num_or_nan(data, "skipped_total") : NAN;
    if (skipped > 0) fprintf(out, "  data: %.0f images skipped (status.json's data.skipped says why)\n", skipped);
    // what needs a person: a failed run, a live run whose file stopped changing, a rank that stopped reporting
    size_t used = 0;
#define PROBLEM(...) used += (size_t)snprintf(problems + used, used < sizeof problems ? sizeof problems - used : 0, __VA_ARGS__)
    if (!strcmp(state, "failed")) PROBLEM("%sthe run failed (its output says why; the last checkpoint is kept)", used ? "; " : "");
    if (live && !(age <= stale_s)) {
        format_duration(dur, sizeof dur, 0, age);
        PROBLEM("%sno update for %s while %s (over %.0f s: the process may be dead or hung)", used ? "; " : "", dur,
                state, stale_s);
    }
    if (live && nr > 1 && hb_max > stale_s)
        PROBLEM("%srank %d has not reported for %.0f s", used ? "; " : "", hb_rank, hb_max);
#undef PROBLEM
    fprintf(out, "  health: %s\n", problems[0] ? problems : "ok");
    cJSON_Delete(o);
    return problems[0] ? 1 : 0;
}
