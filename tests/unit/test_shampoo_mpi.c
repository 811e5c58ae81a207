// test_shampoo_mpi.c: Distributed Shampoo at the optimizer API across MPI ranks (spec/shampoo.md §5):
//  P14 rank-count invariance: the parameters after each of 100 steps (a per-step checksum trace) for root_delay 0,
//      1 and 4 and one_d "full" and "adam"; tests/mpi/test_mpi_shampoo_api.sh compares the traces of np = 1..4;
//  P16 replica consistency: the debug checks (cfg.check_replicas) run after every broadcast and at every refresh
//      step and pass; modes corrupt-roots / corrupt-params show that a divergent replica stops the run naming the
//      step and ranks;
//  P17 checkpoint/resume: state saved at t = 37 (mid-interval) and t = 50 (a refresh step; with root_delay 1 the
//      roots are pending and installed by the save, with root_delay 4 they are saved as their factor snapshot) and
//      resumed, possibly at another rank count, gives the uninterrupted trace through 100;
//  P18 traffic: the bytes broadcast per refresh equal 4 sum_blocks sum_k n_k^2 + 4 per preconditioned block, each
//      rank receives exactly the blocks it does not own, and no bytes move on other steps.
// Every rank computes the same pseudo-gradient (a function of the step and of the parameters, so that any
// divergence feeds back), as the all-reduce would give. Without arguments (tests/run.sh, one process) it runs every
// check at the current world size in a temporary folder. Modes for the MPI script:
//   trace DIR           write DIR/trace_<cfg>_np<P>.txt (rank 0), run the P16 and P18 checks, then save as below
//   save DIR            run to t = 37 and t = 50 and save DIR/state_<cfg>_t<T>_np<P>.* (state and weights)
//   resume DIR FROM     resume the states saved at np = FROM, run to 100, compare with DIR/trace_<cfg>_np1.txt
//   corrupt-roots | corrupt-params   (np >= 2) a replica diverges at step 15; the run must stop at step 20
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "rng.h"
#include "util.h"
#include "shampoo.h"
#include "device_roots_emu.h"

#define STEPS 100
static Comm comm;
static Backend *be;
static int failed_cases, passed_cases;

// One TAP line on rank 0 for a check every rank took part in: it passes when it passed on every rank.
static void report(const char *name, int ok, const char *why) {
    double bad = ok ? 0.0 : 1.0;
    comm_allreduce_sum_f64(&comm, &bad, 1);
    if (!ok) fprintf(stderr, "rank %d: %s: %s\n", comm.rank, name, why ? why : "");
    if (bad == 0.0)
        passed_cases++;
    else
        failed_cases++;
    if (comm.rank == 0) {
        printf("%s - %s (np = %d)\n", bad == 0.0 ? "ok" : "not ok", name, comm.world);
        fflush(stdout);
    }
}

static ModelConfig tiny(void) {
    ModelConfig c = {.arch = ARCH_SIMPLEST, .image_size = 8, .patch_size = 2, .channels = 3, .num_classes = 5,
                     .dim = 16, .depth = 7, .heads = 2, .mlp_dim = 64, .eta = 0.9, .gamma_L = 0.005,
                     .qkv_bias = 1, .mlp_bias = 1};
    return c;
}

typedef struct {
    const char *name;
    int delay, one_d_adam, owners;
} Variant;
// *_own: shampoo.apply "owners" (each owner computes its blocks' steps, all-gathered every step); on the CPU backend
// its traces must equal the replicated variants' as well as each other's at every np.
// d4_full: root_delay 4 (roots of step 10k active from 10k + 4); its state saved at t = 50 has a refresh pending
// that is due at 54, so the save writes the factor snapshot and the resume recomputes the roots.
static const Variant variants[] = {{"d0_full", 0, 0, 0},     {"d1_full", 1, 0, 0},        {"d0_adam", 0, 1, 0},
                                   {"d1_adam", 1, 1, 0},     {"d0_full_own", 0, 0, 1},    {"d1_adam_own", 1, 1, 1},
                                   {"d4_full", 4, 0, 0}};
#define NVAR 7
static const int64_t save_points[] = {37, 50};

// f = S = 10: refreshes at 10, 20, ..., 100; b = 24 cuts the 64-wide MLP weights into uneven blocks.
static ShampooConfig scfg(const Variant *v) {
    ShampooConfig c = {.lr0 = 1e-2, .weight_decay = 0.01, .decoupled = 0, .beta1 = 0.9, .beta2 = 0.999,
                       .eps = 1e-6, .frequency = 10, .start_step = 10, .max_dim = 24, .graft_beta2 = 0.999,
                       .graft_eps = 1e-8, .root_fp64 = 1, .one_d_adam = v->one_d_adam, .root_delay = v->delay,
                       .root_threads = 1, .check_replicas = 1, .apply_owners = v->owners};
    return c;
}

static uint64_t fnv(const float *x, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, x + i, 4);
        h = (h ^ u) * 0x100000001b3ull;
    }
    return h;
}

// Step k: g = N(0, 1) noise of the step + 0.1 W (so that a divergent replica diverges further).
static void one_step(Shampoo *s, int64_t k) {
    Model *m = s->model;
    Rng r = rng_stream(99, 7, (uint64_t)k, 0);
    for (size_t i = 0; i < m->num_params; i++) m->grads[i] = (float)rng_normal(&r) + 0.1f * m->params[i];
    shampoo_step(s, 1e-2 * (1.0 + 0.01 * (double)k), 0.8);
}

typedef struct {
    Model *m;
    Shampoo s;
} Run;

static void run_open(Run *r, const Variant *v) {
    ModelConfig mc = tiny();
    ShampooConfig sc = scfg(v);
    r->m = model_create(&mc, be, 1);
    model_init(r->m, 5);
    shampoo_create(&r->s, r->m, &comm, &sc, NULL);
}

static void run_close(Run *r) {
    shampoo_free(&r->s);
    model_free(r->m);
}

// P18, independently of shampoo.c's layout code: 4 bytes per root element and per preconditioned block's status.
static void expected_bytes(const Shampoo *s, size_t *all, size_t *own) {
    *all = *own = 0;
    for (int i = 0; i < s->nblocks; i++) {
        const ShampooBlock *b = &s->blocks[i];
        const TensorInfo *t = &s->model->tensors[b->param];
        if (s->cfg.one_d_adam && t->ndim == 1) continue;
        size_t bytes = 4;
        for (int k = 0; k < b->order; k++) bytes += 4 * (size_t)b->dim[k] * b->dim[k];
        *all += bytes;
        if (b->owner == comm.rank) *own += bytes;
    }
}

// Uninterrupted 100 steps: the trace, and the P16 and P18 checks along the way.
static void trace(const char *dir, const Variant *v) {
    Run r;
    run_open(&r, v);
    Shampoo *s = &r.s;
    char path[512], why[512] = "";
    snprintf(path, sizeof path, "%s/trace_%s_np%d.txt", dir, v->name, comm.world);
    FILE *f = comm.rank == 0 ? fopen(path, "w") : NULL;
    if (comm.rank == 0 && !f) {
        fprintf(stderr, "cannot write %s\n", path);
        exit(1);
    }
    size_t all, own;
    expected_bytes(s, &all, &own);
    ShampooTraffic tr;
    shampoo_traffic(s, &tr);
    int traffic_ok = tr.per_refresh == all && all > 0;
    if (!traffic_ok) snprintf(why, sizeof why, "layout size %zu, expected %zu", tr.per_refresh, all);
    int nref = 0;
    // apply "owners": after step S every step all-gathers 4 bytes per element of every block that takes block
    // steps (under one_d "adam" not the 1-D ones), each rank sending its own blocks'; nothing through step S.
    size_t st_all = 0, st_own = 0;
    for (int i = 0; i < s->nblocks; i++) {
        const ShampooBlock *b = &s->blocks[i];
        if (v->one_d_adam && r.m->tensors[b->param].ndim == 1) continue;
        st_all += 4 * (size_t)b->rows * b->cols;
        if (b->owner == comm.rank) st_own += 4 * (size_t)b->rows * b->cols;
    }
    int steps_ok = 1;
    char why2[300] = "";
    for (int64_t k = 1; k <= STEPS; k++) {
        size_t before = s->bcast_bytes, sent0 = s->bcast_sent, recv0 = s->bcast_recv;
        size_t ds0 = s->dirs_sent, dr0 = s->dirs_recv;
        one_step(s, k);
        int gstep = v->owners && k > 10;
        size_t ds = s->dirs_sent - ds0, dr = s->dirs_recv - dr0;
        if (steps_ok && (ds != (gstep ? st_own : 0) || dr != (gstep ? st_all - st_own : 0))) {
            steps_ok = 0;
            snprintf(why2, sizeof why2, "step %lld: sent %zu, received %zu step bytes, expected %zu, %zu",
                     (long long)k, ds, dr, gstep ? st_own : 0, gstep ? st_all - st_own : 0);
        }
        int refresh = k % 10 == 0;
        nref += refresh;
        // Broadcast steps: the refresh step itself (delay 0) or d steps after it (delay d).
        int bstep = k - v->delay >= 10 && (k - v->delay) % 10 == 0;
        size_t moved = s->bcast_bytes - before, sent = s->bcast_sent - sent0, recv = s->bcast_recv - recv0;
        if (traffic_ok && (moved != (bstep ? all : 0) || sent != (bstep ? own : 0) || recv != (bstep ? all - own : 0) ||
                           (bstep && s->bcast_last != all))) {
            traffic_ok = 0;
            snprintf(why, sizeof why, "step %lld: %zu bytes (sent %zu, received %zu), expected %zu (%zu, %zu)",
                     (long long)k, moved, sent, recv, bstep ? all : 0, bstep ? own : 0, bstep ? all - own : 0);
        }
        if (f) fprintf(f, "%lld %016llx\n", (long long)k, (unsigned long long)fnv(r.m->params, r.m->num_params));
    }
    if (f) fclose(f);
    char name[200];
    snprintf(name, sizeof name, "P18 %s: each refresh broadcasts 4 sum n_k^2 + 4 per block (%zu bytes), each rank "
                                "receives the blocks it does not own, other steps move nothing",
             v->name, all);
    report(name, traffic_ok, why);
    if (v->owners)
        snprintf(name, sizeof name, "%s: block steps all-gathered every step after S (%zu bytes, this rank's own "
                                    "%zu), nothing through S", v->name, st_all, st_own);
    else
        snprintf(name, sizeof name, "%s: replicated apply, no step is all-gathered", v->name);
    report(name, steps_ok, why2);
    int64_t rc, pc;
    int en = shampoo_replica_checks(s, &rc, &pc);
    // delay >= 1: the refresh of step 100 is still pending at the end (installed by a later step or a save)
    int64_t want_rc = v->delay ? nref - 1 : nref;
    snprintf(why, sizeof why, "enabled %d, %lld root checks (want %lld), %lld parameter checks (want %d)", en,
             (long long)rc, (long long)want_rc, (long long)pc, nref);
    snprintf(name, sizeof name, "P16 %s: root checksums equal the owner's after every broadcast, parameter checksums "
                                "agree at every refresh step",
             v->name);
    report(name, en && rc == want_rc && pc == nref, why);
    run_close(&r);
}

static void state_paths(const char *dir, const Variant *v, int64_t T, int np, char *st, char *w, size_t n) {
    snprintf(st, n, "%s/state_%s_t%lld_np%d.safetensors", dir, v->name, (long long)T, np);
    snprintf(w, n, "%s/state_%s_t%lld_np%d.weights", dir, v->name, (long long)T, np);
}

static void save(const char *dir, const Variant *v) {
    for (int p = 0; p < 2; p++) {
        int64_t T = save_points[p];
        Run r;
        run_open(&r, v);
        for (int64_t k = 1; k <= T; k++) one_step(&r.s, k);
        char st[512], w[512];
        state_paths(dir, v, T, comm.world, st, w, sizeof st);
        int ok = shampoo_save(&r.s, st) == 0;
        if (comm.rank == 0) {
            FILE *f = fopen(w, "wb");
            ok = ok && f && fwrite(r.m->params, sizeof(float), r.m->num_params, f) == r.m->num_params;
            if (f) ok = (fclose(f) == 0) && ok;
        }
        char name[200];
        snprintf(name, sizeof name, "P17 %s: state saved at t = %lld", v->name, (long long)T);
        report(name, ok, "save failed");
        run_close(&r);
    }
}

// Reads the reference trace's hashes (index = step).
static int read_trace(const char *path, uint64_t *h) {
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    long long k;
    unsigned long long x;
    int n = 0;
    while (fscanf(f, "%lld %llx", &k, &x) == 2)
        if (k >= 1 && k <= STEPS) h[k] = x, n++;
    fclose(f);
    return n == STEPS ? 0 : -1;
}

static void resume(const char *dir, const Variant *v, int from) {
    uint64_t ref[STEPS + 1];
    char path[512], why[1200] = "";
    snprintf(path, sizeof path, "%s/trace_%s_np1.txt", dir, v->name);
    int have_ref = read_trace(path, ref) == 0;
    for (int p = 0; p < 2; p++) {
        int64_t T = save_points[p];
        Run r;
        run_open(&r, v);
        char st[512], w[512], err[512] = "";
        state_paths(dir, v, T, from, st, w, sizeof st);
        FILE *f = fopen(w, "rb");
        int ok = f && fread(r.m->params, sizeof(float), r.m->num_params, f) == r.m->num_params;
        if (f) fclose(f);
        if (!ok) snprintf(why, sizeof why, "cannot read %s", w);
        if (ok && shampoo_load(&r.s, st, err, sizeof err) != 0) ok = 0, snprintf(why, sizeof why, "%s", err);
        if (ok && r.s.t != T) ok = 0, snprintf(why, sizeof why, "t = %lld after the load", (long long)r.s.t);
        if (ok && !have_ref) ok = 0, snprintf(why, sizeof why, "no reference trace %s", path);
        if (ok) {
            if (fnv(r.m->params, r.m->num_params) != ref[T])
                ok = 0, snprintf(why, sizeof why, "the saved weights are not those of step %lld", (long long)T);
            for (int64_t k = T + 1; k <= STEPS && ok; k++) {
                one_step(&r.s, k);
                if (fnv(r.m->params, r.m->num_params) != ref[k])
                    ok = 0, snprintf(why, sizeof why, "step %lld differs from the uninterrupted np = 1 run",
                                     (long long)k);
            }
        }
        char name[256];
        snprintf(name, sizeof name, "P17 %s: saved at t = %lld with np = %d, resumed, bit for bit the uninterrupted "
                                    "run through t = %d",
                 v->name, (long long)T, from, STEPS);
        report(name, ok, why);
        run_close(&r);
    }
}

// P16 negative: one replica diverges at step 15; the check at the refresh of step 20 stops the run on every rank.
static void corrupt(int roots) {
    Variant v = {"d0_full", 0, 0, 0};
    Run r;
    run_open(&r, &v);
    Shampoo *s = &r.s;
    int blk = -1;
    for (int i = 0; i < s->nblocks && blk < 0; i++)
        if (s->blocks[i].owner == 0) blk = i;
    for (int64_t k = 1; k <= 25; k++) {
        if (k == 15) {
            if (roots) {
                // rank 1 changes a root of a block that rank 0 owns; rank 0 makes its next refresh fail, so that
                // every rank keeps its previous roots of the block and rank 1's stays different
                if (comm.rank == 1) s->roots[s->blocks[blk].root_off[0]] += 1.0f;
                if (comm.rank == 0) shampoo_inject_failure(s, blk);
            } else if (comm.rank == 1) {
                r.m->params[0] = -r.m->params[0];
            }
        }
        one_step(s, k);
    }
    if (comm.rank == 0) printf("corrupt: reached step 25 without a replica check failure\n");
    run_close(&r);
}

int main(int argc, char **argv) {
    comm_init(&comm, &argc, &argv);
    be = backend_cpu_create(1);
    if (device_roots_from_env(be) && comm.rank == 0) printf("# Shampoo's device-roots path (SD_TEST_DEVICE_ROOTS=1)\n");
    const char *mode = argc > 1 ? argv[1] : "all";
    char tmp[] = "/tmp/shampoo_mpiXXXXXX";
    const char *dir = argc > 2 ? argv[2] : NULL;
    if (!strcmp(mode, "all")) {  // every check at this world size, in a temporary folder of rank 0's
        if (comm.rank == 0 && !mkdtemp(tmp)) {
            perror("mkdtemp");
            return 1;
        }
        comm_bcast(&comm, tmp, sizeof tmp, 0);
        dir = tmp;
    }
    if (!dir && strncmp(mode, "corrupt", 7) != 0) {
        fprintf(stderr, "usage: %s [trace DIR | save DIR | resume DIR FROM_NP | corrupt-roots | corrupt-params]\n",
                argv[0]);
        return 2;
    }
    if (!strcmp(mode, "all") || !strcmp(mode, "trace"))
        for (int i = 0; i < NVAR; i++) trace(dir, &variants[i]);
    if (!strcmp(mode, "all") && comm.world > 1)  // the np = 1 reference traces, for resume
        for (int i = 0; i < NVAR; i++) {
            char a[600], b[600];
            snprintf(a, sizeof a, "%s/trace_%s_np%d.txt", dir, variants[i].name, comm.world);
            snprintf(b, sizeof b, "%s/trace_%s_np1.txt", dir, variants[i].name);
            if (comm.rank == 0) CHECK(rename(a, b) == 0, "rename %s", a);
        }
    if (!strcmp(mode, "all") || !strcmp(mode, "trace") || !strcmp(mode, "save"))
        for (int i = 0; i < NVAR; i++) save(dir, &variants[i]);
    if (!strcmp(mode, "all") || !strcmp(mode, "resume")) {
        int from = !strcmp(mode, "all") ? comm.world : (argc > 3 ? atoi(argv[3]) : 0);
        for (int i = 0; i < NVAR; i++) resume(dir, &variants[i], from);
    }
    if (!strcmp(mode, "corrupt-roots")) corrupt(1);
    if (!strcmp(mode, "corrupt-params")) corrupt(0);
    if (!strcmp(mode, "all") && comm.rank == 0) {
        char cmd[600];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp);
        if (system(cmd) != 0) fprintf(stderr, "cannot remove %s\n", tmp);
    }
    if (comm.rank == 0) printf("%d of %d cases passed\n", passed_cases, passed_cases + failed_cases);
    be->destroy(be);
    comm_finalize(&comm);
    return failed_cases ? 1 : 0;
}
