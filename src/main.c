// main.c: the command line. `simplest-dist [train] CONFIG [--set key=value ...]`, `eval`, `check`, `status`,
// `prepare`, `config-doc`, `version`.
// MPI init/finalize and exit codes (0 ok, 1 bug or system failure, 2 user error) live here.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm.h"
#include "backend.h"
#include "config.h"
#include "prepare.h"
#include "status.h"
#include "train.h"
#include "util.h"

#define VERSION "0.1.0"

static void usage(FILE *f) {
    fprintf(f,
            "usage:\n"
            "  simplest-dist [train] CONFIG.json [--set key.path=value ...]\n"
            "  simplest-dist eval CONFIG.json --checkpoint FILE [--logits out.npy] [--input images.npy] [--set ...]\n"
            "  simplest-dist prepare SRC DST (--short-side N | --max-side N) [--quality Q]\n"
            "                                a pre-resized copy of an ImageFolder tree (JPEG 4:2:0, same layout)\n"
            "  simplest-dist check CONFIG.json [--set ...]\n"
            "                                validate a config (and its --set overrides) and print the effective\n"
            "                                config, without touching data, devices or the run directory\n"
            "  simplest-dist status RUN_DIR [--stale SECONDS]\n"
            "                                a run's progress and health from its status.json; exit 0 when\n"
            "                                healthy or finished, 1 when it failed or a live run has not updated\n"
            "                                status.json (or a rank its heartbeat) for SECONDS (default 600)\n"
            "  simplest-dist config-doc      print docs/config.md (every config key)\n"
            "  simplest-dist version\n"
            "Runs alone or under mpirun/srun (one rank per GPU, or per CPU share on the CPU backend).\n");
}

typedef struct {
    const char *config, *checkpoint, *logits, *input;
    const char **sets;
    int nsets;
} Args;

// Parses everything after the subcommand; a bad argument is a user error.
static void parse_args(Args *a, int argc, char **argv, int first, int is_eval) {
    memset(a, 0, sizeof *a);
    a->sets = xcalloc((size_t)argc * sizeof(char *), "overrides");
    for (int i = first; i < argc; i++) {
        const char *s = argv[i];
        int has_val = i + 1 < argc;
        if (!strcmp(s, "--set") && has_val) {
            a->sets[a->nsets++] = argv[++i];
        } else if (!strncmp(s, "--set=", 6)) {
            a->sets[a->nsets++] = s + 6;
        } else if (is_eval && !strcmp(s, "--checkpoint") && has_val) {
            a->checkpoint = argv[++i];
        } else if (is_eval && !strcmp(s, "--logits") && has_val) {
            a->logits = argv[++i];
        } else if (is_eval && !strcmp(s, "--input") && has_val) {
            a->input = argv[++i];
        } else if (s[0] == '-' && s[1] == '-') {
            die_user("unknown or incomplete option '%s' (see simplest-dist --help)", s);
        } else if (!a->config) {
            a->config = s;
        } else {
            die_user("unexpected argument '%s': one config file only", s);
        }
    }
    if (!a->config) die_user("no config file given (see simplest-dist --help)");
    if (is_eval && !a->checkpoint) die_user("eval needs --checkpoint FILE");
}

// `simplest-dist status RUN_DIR [--stale S]`: for people and for health checks (cron, a node agent).
static int status_main(int argc, char **argv) {
    const char *dir = NULL;
    double stale = 600;
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "--stale") && i + 1 < argc) {
            char *end;
            stale = strtod(argv[++i], &end);
            if (*end || end == argv[i] || !(stale > 0))
                die_user("--stale needs a positive number of seconds, not '%s'", argv[i]);
        } else if (argv[i][0] == '-') {
            die_user("unknown or incomplete option '%s' (status RUN_DIR [--stale SECONDS])", argv[i]);
        } else if (!dir) {
            dir = argv[i];
        } else {
            die_user("unexpected argument '%s': one run directory only", argv[i]);
        }
    }
    if (!dir) die_user("status needs a run directory (status RUN_DIR [--stale SECONDS])");
    char err[1600];
    int rc = status_report(dir, stale, unix_time(), stdout, err, sizeof err);
    if (rc < 0) die_user("%s", err);
    return rc;
}

int main(int argc, char **argv) {
    // a training run takes stop signals as "checkpoint and exit" from its first line (before the BLAS re-exec and
    // MPI's start, which take a while): a launcher may stop a job it has just started
    static const char *const not_training[] = {"version", "prepare", "check", "status", "config-doc", "eval",
                                               "--help", "-h"};
    int training = argc >= 2;
    for (size_t i = 0; training && i < sizeof not_training / sizeof not_training[0]; i++)
        training = strcmp(argv[1], not_training[i]) != 0;
    if (training) train_catch_stop_signals();
    backend_cpu_fix_blas_core(argv);
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? EXIT_USER : 0;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "version")) {
        printf("simplest-dist %s\n", VERSION);
        return 0;
    }
    if (!strcmp(cmd, "prepare")) return prepare_main(argc, argv);
    if (!strcmp(cmd, "check")) {  // before a job is queued: the same validation as a run, nothing else
        Args a;
        parse_args(&a, argc, argv, 2, 0);
        Config cfg;
        config_load(&cfg, a.config, a.sets, a.nsets);  // a bad key: one line naming it, exit 2
        char *json = config_to_json(&cfg);
        printf("%s\n", json);
        int64_t ntrain, spe, T;
        if (config_standard_plan(&cfg, &ntrain, &spe, &T) == 0 && spe == 0)
            fprintf(stderr, "simplest-dist: warning: config key 'train.batch_size': %d is larger than the %lld training "
                            "images of %s's standard split: a run on that split stops at once\n",
                    cfg.train.batch_size, (long long)ntrain, cfg.data.dataset);
        fprintf(stderr, "simplest-dist: %s: config ok\n", a.config);
        free(json);
        free(a.sets);
        return 0;
    }
    if (!strcmp(cmd, "status")) return status_main(argc, argv);
    if (!strcmp(cmd, "config-doc")) {
        char *doc = config_doc_markdown();
        fputs(doc, stdout);
        free(doc);
        return 0;
    }
    int is_eval = !strcmp(cmd, "eval");
    int first = (is_eval || !strcmp(cmd, "train")) ? 2 : 1;
    if (first == 2 && argc > 2 && (!strcmp(argv[2], "--help") || !strcmp(argv[2], "-h"))) {
        usage(stdout);
        return 0;
    }
    if (first == 1 && cmd[0] != '-' && !path_exists(cmd) && !strchr(cmd, '.') && !strchr(cmd, '/')) {
        fprintf(stderr, "simplest-dist: error: unknown command '%s' (commands: train, eval, check, status, prepare, config-doc, version)\n",
                cmd);
        return EXIT_USER;
    }
    Comm comm;
    comm_init(&comm, &argc, &argv);
    Args a;
    parse_args(&a, argc, argv, first, is_eval);
    Config cfg;
    config_load(&cfg, a.config, a.sets, a.nsets);
    int rc = is_eval ? eval_main(&cfg, &comm, a.checkpoint, a.logits, a.input) : train_main(&cfg, &comm);
    free(a.sets);
    comm_finalize(&comm);
    return rc;
}
