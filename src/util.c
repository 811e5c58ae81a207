// util.c: see util.h.
#include "util.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#ifdef USE_MPI
#include <mpi.h>
#endif

// This process's rank and the main thread, noted by comm_init (util_note_rank). MPI runs at MPI_THREAD_FUNNELED:
// only the main thread may call it, and a fatal error on another thread (a loader worker, a Shampoo root thread,
// the watchdog) may come while the main thread is inside an MPI call.
static int g_noted, g_rank, g_world = 1;
static pthread_t g_main;

void util_note_rank(int rank, int world) {
    g_main = pthread_self();
    g_rank = rank;
    g_world = world;
    g_noted = 1;
}

static int on_main_thread(void) { return !g_noted || pthread_equal(pthread_self(), g_main); }

// Takes the whole job down when several ranks run, so that no rank waits forever on a dead one. On another thread
// than the main one it calls no MPI: the caller's exit ends the job (mpirun stops every rank when one exits
// non-zero; without that, the peers' comm.timeout_s names this rank).
static void abort_all_ranks(int code) {
#ifdef USE_MPI
    if (!on_main_thread()) return;
    int init = 0, fin = 0, size = 1;
    MPI_Initialized(&init);
    MPI_Finalized(&fin);
    if (init && !fin) {
        MPI_Comm_size(MPI_COMM_WORLD, &size);
        if (size > 1) MPI_Abort(MPI_COMM_WORLD, code);
    }
#else
    (void)code;
#endif
}

// This process's MPI rank, or 0 outside MPI.
static int mpi_rank(void) {
    if (g_noted) return g_rank;
#ifdef USE_MPI
    int init = 0, fin = 0, rank = 0;
    MPI_Initialized(&init);
    MPI_Finalized(&fin);
    if (init && !fin) MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    return rank;
#else
    return 0;
#endif
}

void die_at(const char *file, int line, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "simplest-dist: internal error (rank %d) at %s:%d: ", mpi_rank(), file, line);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    fflush(stderr);
    abort_all_ranks(1);
    abort();
}

struct Watchdog {
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int stopped, rank;  // rank: asked on the calling (main) thread, not on the watchdog's
    double seconds;
    struct timespec deadline;  // CLOCK_MONOTONIC (the condition variable's clock): a wall-clock step cannot fire it
    char what[200], key[64];
};

static void *watchdog_main(void *arg) {
    Watchdog *w = arg;
    pthread_mutex_lock(&w->mu);
    int rc = 0;
    while (!w->stopped && rc != ETIMEDOUT) rc = pthread_cond_timedwait(&w->cv, &w->mu, &w->deadline);
    int fire = !w->stopped;
    pthread_mutex_unlock(&w->mu);
    if (fire) {
        fprintf(stderr, "simplest-dist: error: rank %d: %s did not finish within %g s (%s): a peer rank is "
                        "unresponsive or dead; stopping the job\n",
                w->rank, w->what, w->seconds, w->key);
        fflush(stderr);
        abort_all_ranks(1);
        _exit(1);
    }
    return NULL;
}

Watchdog *watchdog_start(double seconds, const char *what, const char *key) {
    if (seconds <= 0) return NULL;
    Watchdog *w = xcalloc(sizeof *w, "watchdog");
    w->seconds = seconds;
    snprintf(w->what, sizeof w->what, "%s", what);
    snprintf(w->key, sizeof w->key, "%s", key);
    w->rank = mpi_rank();
    clock_gettime(CLOCK_MONOTONIC, &w->deadline);
    double end = (double)w->deadline.tv_sec + 1e-9 * (double)w->deadline.tv_nsec + seconds;
    w->deadline.tv_sec = (time_t)end;
    w->deadline.tv_nsec = (long)((end - (double)(time_t)end) * 1e9);
    pthread_condattr_t ca;
    CHECK(pthread_condattr_init(&ca) == 0 && pthread_condattr_setclock(&ca, CLOCK_MONOTONIC) == 0 &&
              pthread_mutex_init(&w->mu, NULL) == 0 && pthread_cond_init(&w->cv, &ca) == 0,
          "watchdog: init");
    pthread_condattr_destroy(&ca);
    CHECK(pthread_create(&w->thread, NULL, watchdog_main, w) == 0, "watchdog: cannot start its thread");
    return w;
}

void watchdog_stop(Watchdog *w) {
    if (!w) return;
    pthread_mutex_lock(&w->mu);
    w->stopped = 1;
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
    pthread_join(w->thread, NULL);
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->cv);
    free(w);
}

// Writes src into dst (capacity n) as one line: control characters (a newline in a JSON string value, a file name,
// an override) become C escapes (\n, \r, \t, \xNN), so a reason quoting the user's bytes stays one line.
static void one_line(char *dst, size_t n, const char *src) {
    if (n == 0) return;
    size_t k = 0;
    for (const unsigned char *p = (const unsigned char *)src; *p && k + 1 < n; p++) {
        char esc[5];
        int len = 1;
        if (*p == '\n' || *p == '\r' || *p == '\t') {
            esc[0] = '\\', esc[1] = *p == '\n' ? 'n' : *p == '\r' ? 'r' : 't', len = 2;
        } else if (*p < 0x20 || *p == 0x7f) {
            snprintf(esc, sizeof esc, "\\x%02x", *p);
            len = 4;
        } else {
            esc[0] = (char)*p;
        }
        if (k + (size_t)len >= n) break;  // no half escape at the end
        memcpy(dst + k, esc, (size_t)len);
        k += (size_t)len;
    }
    dst[k] = 0;
}

static void die_with(int code, const char *fmt, va_list ap) __attribute__((noreturn));

void die_user(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    die_with(EXIT_USER, fmt, ap);
}

void die_busy(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    die_with(EXIT_BUSY, fmt, ap);
}

static void die_with(int code, const char *fmt, va_list ap) {
    char raw[2048], line[2048];
    vsnprintf(raw, sizeof raw, fmt, ap);
    va_end(ap);
    one_line(line, sizeof line, raw);
    // User errors on the main thread are (nearly always) the same on every rank: rank 0 says it once. One on
    // another thread is this rank's own (its data shard, say): it says so itself.
    if (!on_main_thread() && g_world > 1)
        fprintf(stderr, "simplest-dist: error (rank %d): %s\n", g_rank, line);
    else if (mpi_rank() == 0)
        fprintf(stderr, "simplest-dist: error: %s\n", line);
    fflush(stderr);
    // Off the main thread, no exit handlers either: they would tear down CUDA and MPI under the main thread's feet
    // (it may be inside either); the process's end is what stops the job (see abort_all_ranks).
    if (!on_main_thread()) {
        fflush(stdout);
        _exit(code);
    }
    abort_all_ranks(code);
    exit(code);
}

void *xmalloc_at(size_t n, const char *what, const char *file, int line) {
    void *p = malloc(n ? n : 1);
    if (!p) die_at(file, line, "out of memory allocating %zu bytes for %s", n, what);
    return p;
}

void *xcalloc_at(size_t n, const char *what, const char *file, int line) {
    void *p = calloc(n ? n : 1, 1);
    if (!p) die_at(file, line, "out of memory allocating %zu bytes for %s", n, what);
    return p;
}

char *xstrdup(const char *s) {
    size_t n = strlen(s) + 1;
    char *d = xmalloc(n, "string");
    memcpy(d, s, n);
    return d;
}

int set_err(char *err, size_t n, const char *fmt, ...) {
    char raw[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(raw, sizeof raw, fmt, ap);
    va_end(ap);
    one_line(err, n, raw);
    return -1;
}

double now_sec(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

unsigned char *read_file_all(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    struct stat st;
    if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode)) {
        fclose(f);
        errno = EISDIR;
        return NULL;
    }
    size_t n = (size_t)st.st_size;
    unsigned char *buf = xmalloc(n + 1, path);
    size_t got = fread(buf, 1, n, f);
    fclose(f);
    if (got != n) {
        free(buf);
        errno = EIO;
        return NULL;
    }
    buf[n] = 0;
    *len = n;
    return buf;
}

int fsync_path(const char *path) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return -1;
    int rc = fsync(fd);
    close(fd);
    return rc;
}

static int fsync_dir_of(const char *path) {
    char *copy = xstrdup(path);
    int rc = fsync_path(dirname(copy));
    free(copy);
    return rc;
}

int link_atomic(const char *src, const char *path) {
    size_t plen = strlen(path);
    char *tmp = xmalloc(plen + 32, "tmp path");
    snprintf(tmp, plen + 32, "%s.tmp.%d", path, (int)getpid());
    unlink(tmp);
    int rc = link(src, tmp);
    if (rc == 0 && (rc = rename(tmp, path)) != 0) {
        int e = errno;
        unlink(tmp);
        errno = e;
    }
    free(tmp);
    if (rc == 0) fsync_dir_of(path);  // best effort, as in write_file_atomic
    return rc;
}

int64_t parse_count(const char *s) {
    if (!s || !*s || strlen(s) > 16) return -1;
    int64_t v = 0;
    for (const char *p = s; *p; p++) {
        if (*p < '0' || *p > '9') return -1;
        v = v * 10 + (*p - '0');
    }
    return v <= ((int64_t)1 << 53) ? v : -1;
}

int write_file_atomic(const char *path, const void *data, size_t len) {
    size_t plen = strlen(path);
    char *tmp = xmalloc(plen + 32, "tmp path");
    snprintf(tmp, plen + 32, "%s.tmp.%d", path, (int)getpid());
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) {
        free(tmp);
        return -1;
    }
    const char *p = data;
    size_t left = len;
    while (left > 0) {
        ssize_t w = write(fd, p, left);
        if (w < 0) {
            if (errno == EINTR) continue;
            close(fd);
            unlink(tmp);
            free(tmp);
            return -1;
        }
        p += w;
        left -= (size_t)w;
    }
    int synced = fsync(fd) == 0;
    int e = errno;
    int closed = close(fd) == 0;
    if (!closed) e = errno;
    if (!synced || !closed || rename(tmp, path) != 0) {
        if (synced && closed) e = errno;
        unlink(tmp);
        free(tmp);
        errno = e;
        return -1;
    }
    free(tmp);
    fsync_dir_of(path);  // best effort: the rename is already visible
    return 0;
}

int mkdir_p(const char *path) {
    char *p = xstrdup(path);
    for (char *s = p + 1; *s; s++) {
        if (*s != '/') continue;
        *s = 0;
        if (mkdir(p, 0755) != 0 && errno != EEXIST) {
            free(p);
            return -1;
        }
        *s = '/';
    }
    int rc = mkdir(p, 0755);
    free(p);
    return (rc == 0 || errno == EEXIST) ? 0 : -1;
}

int path_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

void sb_printf(StrBuf *b, const char *fmt, ...) {
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        size_t room = b->cap - b->len;
        int n = vsnprintf(b->s ? b->s + b->len : NULL, b->s ? room : 0, fmt, ap);
        va_end(ap);
        CHECK(n >= 0, "vsnprintf failed");
        if (b->s && (size_t)n < room) {
            b->len += (size_t)n;
            return;
        }
        size_t need = b->len + (size_t)n + 1;
        size_t cap = b->cap ? b->cap : 256;
        while (cap < need) cap *= 2;
        char *s = realloc(b->s, cap);
        CHECK(s, "out of memory growing a string to %zu bytes", cap);
        b->s = s;
        b->cap = cap;
    }
}

void sb_free(StrBuf *b) {
    free(b->s);
    b->s = NULL;
    b->len = b->cap = 0;
}

void format_duration(char *buf, size_t n, int compact, double s) {
    if (!isfinite(s) || s < 0) {
        snprintf(buf, n, "?");
        return;
    }
    long t = (long)(s + 0.5);
    if (compact && t >= 3600)
        snprintf(buf, n, "%ldh%02ldm", t / 3600, (t / 60) % 60);
    else if (compact)
        snprintf(buf, n, "%ldm%02lds", t / 60, t % 60);
    else if (t >= 86400)
        snprintf(buf, n, "%ld d %ld h", t / 86400, t % 86400 / 3600);
    else if (t >= 3600)
        snprintf(buf, n, "%ld h %ld min", t / 3600, t % 3600 / 60);
    else if (t >= 60)
        snprintf(buf, n, "%ld min", t / 60);
    else
        snprintf(buf, n, "%ld s", t);
}
