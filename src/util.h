// util.h: error handling (bugs abort, user errors exit 2), checked allocation, timing, atomic file writes.
#pragma once
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

// Exit code for user errors: bad config, bad data, bad checkpoint. Bugs abort().
#define EXIT_USER 2
#define EXIT_BUSY 75  // the run directory is in use by another job (sysexits EX_TEMPFAIL: try again later)

// Abort every rank after printing file:line and what failed (a bug or a system failure).
void die_at(const char *file, int line, const char *fmt, ...) __attribute__((noreturn, format(printf, 3, 4)));
#define DIE(...) die_at(__FILE__, __LINE__, __VA_ARGS__)
#define CHECK(cond, ...) do { if (!(cond)) die_at(__FILE__, __LINE__, __VA_ARGS__); } while (0)

// One clear line on stderr (control characters escaped) and exit code 2 (a user error: config, data, checkpoint).
// Under MPI with several ranks, both DIE and die_user take every rank down with MPI_Abort (from the main thread; see
// util_note_rank).
void die_user(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
// die_user with EXIT_BUSY: the run directory is another job's (a launcher retries; bad input does not).
void die_busy(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
// comm_init's note of this process's rank and of the main thread (the only one that may call MPI): a DIE or
// die_user on another thread then names the rank and exits without calling MPI.
void util_note_rank(int rank, int world);

void *xmalloc_at(size_t n, const char *what, const char *file, int line);
void *xcalloc_at(size_t n, const char *what, const char *file, int line);
#define xmalloc(n, what) xmalloc_at((n), (what), __FILE__, __LINE__)
#define xcalloc(n, what) xcalloc_at((n), (what), __FILE__, __LINE__)
char *xstrdup(const char *s);

// Formats a one-line reason into err and returns -1 (the convention of every *_err / validating reader). Control
// characters in it (from quoted user bytes) are escaped, as in die_user: the reason is always one line.
int set_err(char *err, size_t n, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

// A count from a file's metadata: decimal digits only, 0 .. 2^53. -1 if it is anything else.
int64_t parse_count(const char *s);

double now_sec(void);  // monotonic clock, seconds

// A bound on a blocking call that cannot poll (a library's setup, such as ncclCommInitRank waiting for every
// peer): unless watchdog_stop comes within `seconds`, a thread prints one line naming `what` and the limit's
// config key, and takes every rank down (exit code 1). seconds <= 0: no bound (NULL is returned).
typedef struct Watchdog Watchdog;
Watchdog *watchdog_start(double seconds, const char *what, const char *key);
void watchdog_stop(Watchdog *w);

// Reads a whole file; NULL (and errno) on failure. *len gets its size.
unsigned char *read_file_all(const char *path, size_t *len);
// Writes path atomically: path.tmp, fsync, rename, fsync of the directory. 0 on success, -1 with errno.
int write_file_atomic(const char *path, const void *data, size_t len);
// Makes path a second name of the (complete, fsynced) file src, atomically replacing what path held: a hard link
// to path.tmp, then a rename. The file is shared, not copied; neither name may be written in place afterwards
// (nothing here does: every write is write_file_atomic's new file). 0, or -1 with errno (EXDEV, EPERM where the
// file system has no hard links: then write the file instead).
int link_atomic(const char *src, const char *path);
int fsync_path(const char *path);  // fsync of a file or directory by name; 0, or -1 with errno
int mkdir_p(const char *path);  // 0 on success or if it exists
int path_exists(const char *path);

// printf-style append into a growing heap string (for JSON lines and reports).
typedef struct {
    char *s;
    size_t len, cap;
} StrBuf;
void sb_printf(StrBuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void sb_free(StrBuf *b);

// A duration in seconds for people: compact for the progress line ("1h05m", "4m07s"), else for status summaries
// ("3 d 4 h", "4 h 12 min", "12 min", "35 s"); "?" when unknown or negative.
void format_duration(char *buf, size_t n, int compact, double s);
