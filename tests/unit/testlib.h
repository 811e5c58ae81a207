// testlib.h: a tiny TAP-like harness. Each test case prints "ok - name" or "not ok - name" followed by the failing
// checks; tests/run.sh counts those lines. A test program exits non-zero if any case failed.
#pragma once
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

typedef struct {
    int cases_failed;
    int cases_run;
    int case_failures;  // failures in the current case
    const char *case_name;
} TestState;

static TestState tl_state;  // one per test program

static inline void tl_begin(const char *name) {
    tl_state.case_name = name;
    tl_state.case_failures = 0;
}

static inline void tl_end(void) {
    tl_state.cases_run++;
    if (tl_state.case_failures) {
        tl_state.cases_failed++;
        printf("not ok - %s\n", tl_state.case_name);
    } else {
        printf("ok - %s\n", tl_state.case_name);
    }
    fflush(stdout);
}

// Runs one case: TEST_CASE(name) { ...checks... }
#define TEST_CASE(name) \
    for (int tl_once_ = (tl_begin(name), 1); tl_once_; tl_once_ = 0, tl_end())

#define EXPECT(cond, ...)                                              \
    do {                                                               \
        if (!(cond)) {                                                 \
            tl_state.case_failures++;                                  \
            printf("    %s:%d: expected %s: ", __FILE__, __LINE__, #cond); \
            printf(__VA_ARGS__);                                       \
            printf("\n");                                              \
        }                                                              \
    } while (0)

// |got - want| <= tol
#define EXPECT_NEAR(got, want, tol)                                                                  \
    do {                                                                                             \
        double g_ = (double)(got), w_ = (double)(want), t_ = (double)(tol);                          \
        if (!(fabs(g_ - w_) <= t_)) {                                                                \
            tl_state.case_failures++;                                                                \
            printf("    %s:%d: %s = %.17g, want %.17g (tol %.3g, err %.3g)\n", __FILE__, __LINE__, #got, \
                   g_, w_, t_, fabs(g_ - w_));                                                       \
        }                                                                                            \
    } while (0)

// |got - want| <= rtol * |want|
#define EXPECT_REL(got, want, rtol)                                                                     \
    do {                                                                                                \
        double g_ = (double)(got), w_ = (double)(want), t_ = (double)(rtol);                            \
        if (!(fabs(g_ - w_) <= t_ * fabs(w_))) {                                                        \
            tl_state.case_failures++;                                                                   \
            printf("    %s:%d: %s = %.17g, want %.17g (rtol %.3g, rel err %.3g)\n", __FILE__, __LINE__, \
                   #got, g_, w_, t_, fabs(g_ - w_) / fabs(w_));                                         \
        }                                                                                               \
    } while (0)

static inline int tl_finish(void) {
    fprintf(stderr, "%d of %d cases passed\n", tl_state.cases_run - tl_state.cases_failed, tl_state.cases_run);
    return tl_state.cases_failed ? 1 : 0;
}
