// test_util.c: util.c's watchdog, the bound on blocking calls that cannot poll (NCCL setup waiting for every peer):
// stopped in time it does nothing; left running it ends the process with exit code 1 and one line naming the call
// and the config key; a limit of 0 means no bound. set_err's one-line reasons; link_atomic (the exported weights as
// a second name of the checkpoint's file).
// With --mpi-thread-die die|user|watchdog under mpirun -np 2 (tests/mpi/test_mpi_thread_die.sh): rank 1 fails on a
// thread other than the main one (DIE, die_user, the watchdog firing) while its main thread waits inside MPI.
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "comm.h"
#include "testlib.h"
#include "util.h"

static void sleep_s(double s) {
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    while (nanosleep(&ts, &ts) != 0) {
    }
}

static void *die_on_thread(void *arg) {
    sleep_s(0.3);
    if (!strcmp((const char *)arg, "user")) die_user("planted user error on a helper thread");
    DIE("planted failure on a helper thread");
}

// Rank 1's main thread waits in a barrier that rank 0 never joins (comm.timeout_s 0: no bound), so only the
// failing thread can end the job; rank 0 sleeps outside MPI. Returns 3 if the job outlived it.
static int mpi_thread_die(int argc, char **argv, const char *kind) {
    Comm c;
    comm_init(&c, &argc, &argv);
    comm_set_timeout(&c, 0, "comm.timeout_s");
    if (c.world != 2) die_user("--mpi-thread-die runs at np 2");
    if (c.rank == 0) {
        sleep_s(60);
        return 3;
    }
    pthread_t th;
    if (!strcmp(kind, "watchdog"))
        watchdog_start(0.3, "a planted hang", "test.timeout_s");
    else if (pthread_create(&th, NULL, die_on_thread, (void *)kind) != 0)
        DIE("pthread_create");
    comm_barrier(&c);
    return 3;
}

int main(int argc, char **argv) {
    if (argc == 3 && !strcmp(argv[1], "--mpi-thread-die")) return mpi_thread_die(argc, argv, argv[2]);
    TEST_CASE("watchdog stopped before its limit: the process goes on") {
        Watchdog *w = watchdog_start(0.5, "a quick call", "test.timeout_s");
        EXPECT(w != NULL, "no watchdog for a 0.5 s limit");
        sleep_s(0.05);
        watchdog_stop(w);
        sleep_s(0.6);  // past the limit: a watchdog that still ran would have ended this process (exit 1) by now
    }
    TEST_CASE("watchdog with limit 0: no bound (NULL), and stopping NULL is a no-op") {
        Watchdog *w = watchdog_start(0.0, "an unbounded call", "test.timeout_s");
        EXPECT(w == NULL, "a watchdog for limit 0");
        watchdog_stop(w);
    }
    TEST_CASE("watchdog past its limit (0.2 s) in a call that hangs: exit code 1 within a second, one line naming the "
              "call and the key") {
        int fd[2];
        EXPECT(pipe(fd) == 0, "pipe");
        double t0 = now_sec();
        pid_t pid = fork();
        if (pid == 0) {
            dup2(fd[1], 2);
            close(fd[0]);
            watchdog_start(0.2, "a hung call", "test.timeout_s");
            sleep_s(5.0);  // the hang
            _exit(0);      // not reached when the watchdog works
        }
        close(fd[1]);
        char buf[1024] = "";
        size_t n = 0;
        ssize_t k;
        while (n < sizeof buf - 1 && (k = read(fd[0], buf + n, sizeof buf - 1 - n)) > 0) n += (size_t)k;
        buf[n] = 0;
        close(fd[0]);
        int status = 0;
        waitpid(pid, &status, 0);
        double took = now_sec() - t0;
        EXPECT(WIFEXITED(status) && WEXITSTATUS(status) == 1, "child status %d (want exit 1)", status);
        EXPECT(took >= 0.15 && took < 1.5, "ended after %.2f s (limit 0.2 s)", took);
        EXPECT(strstr(buf, "error: rank 0: a hung call did not finish within 0.2 s (test.timeout_s)"), "message: %s",
               buf);
        printf("    %s", buf);
    }
    TEST_CASE("set_err is one line whatever it quotes: control characters escaped, no half escape when cut") {
        char err[64];
        EXPECT(set_err(err, sizeof err, "key 'x': \"%s\" is bad", "s\nimple\r\tv\x01\x7f") == -1, "returns -1");
        EXPECT(!strcmp(err, "key 'x': \"s\\nimple\\r\\tv\\x01\\x7f\" is bad"), "got '%s'", err);
        char small[12];
        set_err(small, sizeof small, "abcdefgh\n\n\n");  // "abcdefgh\n" fits (10 + NUL), the next escape does not
        EXPECT(!strcmp(small, "abcdefgh\\n"), "got '%s'", small);
        set_err(small, sizeof small, "abcdefghi\x02");  // 9 + 4 bytes do not fit in 11: the escape is dropped whole
        EXPECT(!strcmp(small, "abcdefghi"), "got '%s'", small);
        set_err(small, sizeof small, "%s", "caf\xc3\xa9 ok");  // UTF-8 passes through
        EXPECT(!strcmp(small, "caf\xc3\xa9 ok"), "got '%s'", small);
    }
    TEST_CASE("link_atomic: the target becomes a second name of the source, replacing what it held; a missing "
              "source leaves the target as it was; no temp file stays") {
        char dir[] = "/tmp/test_util_XXXXXX", src[64], dst[64];
        EXPECT(mkdtemp(dir) != NULL, "mkdtemp");
        snprintf(src, sizeof src, "%s/src", dir);
        snprintf(dst, sizeof dst, "%s/dst", dir);
        EXPECT(write_file_atomic(src, "new bytes", 9) == 0 && write_file_atomic(dst, "old", 3) == 0, "setup");
        EXPECT(link_atomic(src, dst) == 0, "link_atomic failed: %s", strerror(errno));
        struct stat a, b;
        EXPECT(stat(src, &a) == 0 && stat(dst, &b) == 0 && a.st_ino == b.st_ino && b.st_nlink == 2,
               "dst is not a second name of src");
        size_t len = 0;
        char *text = (char *)read_file_all(dst, &len);
        EXPECT(text && len == 9 && !memcmp(text, "new bytes", 9), "dst holds the wrong bytes");
        free(text);
        unlink(src);  // the checkpoint pruned: the export keeps its bytes
        text = (char *)read_file_all(dst, &len);
        EXPECT(text && len == 9, "dst lost its bytes with src's name");
        free(text);
        EXPECT(link_atomic(src, dst) == -1 && errno == ENOENT, "a missing source was accepted");
        text = (char *)read_file_all(dst, &len);
        EXPECT(text && len == 9 && !memcmp(text, "new bytes", 9), "a failed link changed dst");
        free(text);
        char cmd[128];
        snprintf(cmd, sizeof cmd, "test $(ls %s | wc -l) = 1", dir);
        EXPECT(system(cmd) == 0, "a temp file was left in %s", dir);
        snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
        if (system(cmd) != 0) printf("# could not remove %s\n", dir);
    }
    return tl_finish();
}
