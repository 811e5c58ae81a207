// test_signalprop.c: the TAT and E-SPA facts of spec/model.md §14 items 1-11 (slope table of §7, buffers of §6.3).
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "signalprop.h"
#include "testlib.h"
#include "util.h"

#define EPS32 0x1p-23
#define LDEPTH 12
#define GAMMA_L 0.005

// ---- helpers ----

// C_a composed n times from c = 0.
static double compose(int n, double a) {
    double c = 0.0;
    for (int i = 0; i < n; i++) c = tat_cmap(c, a);
    return c;
}

// The slope for (depth, eta), or NAN when tat_slope fails.
static double slope_of(int depth, double eta) {
    char err[256];
    double a = NAN;
    return tat_slope(depth, eta, &a, err, sizeof err) == 0 ? a : NAN;
}

// TAT leaky ReLU phi(z) of §7.
static double phi(double z, double a) { return tat_scale(a) * (z >= 0 ? z : a * z); }

// Everything one (N, l) needs: fp64 A, its fp32 copy, and both modes' fp32 buffers.
typedef struct {
    int N;
    double *A;
    float *A32, *Bdef, *ddef, *Bcmp, *dcmp;
} Layer;

// Builds layer l's matrices once; all cases share them.
static Layer layer_build(int N, int l) {
    size_t nn = (size_t)N * N;
    Layer y = {N, xmalloc(nn * sizeof(double), "A"), xmalloc(nn * sizeof(float), "A32"),
               xmalloc(nn * sizeof(float), "B"), xmalloc(N * sizeof(float), "d"),
               xmalloc(nn * sizeof(float), "Bc"), xmalloc(N * sizeof(float), "dc")};
    CHECK(espa_attention_matrix(N, l, LDEPTH, GAMMA_L, y.A) == 0, "A N=%d l=%d", N, l);
    CHECK(espa_layer_buffers(N, l, LDEPTH, GAMMA_L, 0, y.Bdef, y.ddef) == 0, "buffers N=%d l=%d", N, l);
    CHECK(espa_layer_buffers(N, l, LDEPTH, GAMMA_L, 1, y.Bcmp, y.dcmp) == 0, "compat N=%d l=%d", N, l);
    for (size_t i = 0; i < nn; i++) y.A32[i] = (float)y.A[i];
    return y;
}

static void layer_free(Layer *y) {
    free(y->A);
    free(y->A32);
    free(y->Bdef);
    free(y->ddef);
    free(y->Bcmp);
    free(y->dcmp);
}

// out = P X P^T for N x N row-major P (fp32, as stored) and X (fp64): the kernel after one attention layer.
static void congruence(int N, const float *P, const double *X, double *out) {
    double *t = xmalloc((size_t)N * N * sizeof(double), "PX");
    for (int i = 0; i < N; i++)
        for (int j = 0; j < N; j++) {
            double s = 0.0;
            for (int k = 0; k < N; k++) s += (double)P[(size_t)i * N + k] * X[(size_t)k * N + j];
            t[(size_t)i * N + j] = s;
        }
    for (int i = 0; i < N; i++)
        for (int j = 0; j < N; j++) {
            double s = 0.0;
            for (int k = 0; k < N; k++) s += t[(size_t)i * N + k] * (double)P[(size_t)j * N + k];
            out[(size_t)i * N + j] = s;
        }
    free(t);
}

static double max_abs_diff(size_t n, const double *x, const double *y) {
    double m = 0.0;
    for (size_t i = 0; i < n; i++) m = fmax(m, fabs(x[i] - y[i]));
    return m;
}

// ||x - y||_F / ||y||_F.
static double rel_frob(size_t n, const double *x, const double *y) {
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < n; i++) {
        num += (x[i] - y[i]) * (x[i] - y[i]);
        den += y[i] * y[i];
    }
    return sqrt(num / den);
}

// M = diag(d) softmax_rows(B + shift_i) in fp64 from fp32 buffers: the layer's effective matrix with W_q = 0.
static void effective(int N, const float *B, const float *d, const double *shift, double *M) {
    for (int i = 0; i < N; i++) {
        const float *b = B + (size_t)i * N;
        double *m = M + (size_t)i * N, sh = shift ? shift[i] : 0.0, mx = -INFINITY, z = 0.0;
        for (int j = 0; j < N; j++) mx = fmax(mx, b[j] + sh);
        for (int j = 0; j < N; j++) z += (m[j] = exp(b[j] + sh - mx));
        for (int j = 0; j < N; j++) m[j] *= d[i] / z;
    }
}

static void sigma_of(int N, int l, double *S) { espa_sigma(N, espa_gamma(l, LDEPTH, GAMMA_L), S); }

// ---- TAT ----

static void test_tat_main_slope(void) {
    TEST_CASE("tat: L=12 eta=0.9 slope is the reference's double, s and C^(24)(0)") {
        double a = slope_of(12, 0.9);
        EXPECT(a == 0.2385026216506958, "a = %.17g", a);
        EXPECT_NEAR(tat_scale(a), 1.3756293678, 1e-10);
        double v = compose(24, a);
        EXPECT(fabs(v - 0.9) < 1e-8, "C^(24)(0) = %.17g", v);
        EXPECT_NEAR(v, 0.8999999915, 5e-11);
        EXPECT(fabs(0.2385026216506958 - 0.23850260214712) < 2e-8, "bisection is close to the exact root");
    }
}

static void test_tat_cmap_values(void) {
    TEST_CASE("tat: C_a(0), C_a(1), C_a'(0), C_a'(1)") {
        double a = 0.2385026216506958;
        EXPECT_NEAR(tat_cmap(0.0, a), 0.17464647897988936, 1e-15);
        EXPECT(tat_cmap(1.0, a) == 1.0, "C_a(1) = %.17g", tat_cmap(1.0, a));
        EXPECT_NEAR(tat_cmap_deriv(0.0, a), 0.7256660, 1e-7);
        for (double b = 0.0; b <= 1.0; b += 0.125) {
            EXPECT_NEAR(tat_cmap(1.0, b), 1.0, 1e-15);
            EXPECT_NEAR(tat_cmap_deriv(1.0, b), 1.0, 1e-15);
            EXPECT_NEAR(tat_cmap_deriv(0.0, b), 1.0 - (1 - b) * (1 - b) / (2 * (1 + b * b)), 1e-15);
        }
        EXPECT_NEAR(tat_cmap(0.3, 1.0), 0.3, 0);  // a = 1 is linear: C is the identity
    }
}

static void test_tat_deriv_fd(void) {
    TEST_CASE("tat: C_a' matches a central finite difference") {
        double cs[] = {-0.7, -0.2, 0.0, 0.35, 0.8, 0.95}, as[] = {0.0, 0.2385026216506958, 0.6};
        for (int i = 0; i < 6; i++)
            for (int k = 0; k < 3; k++) {
                double h = 1e-6, c = cs[i], a = as[k];
                double fd = (tat_cmap(c + h, a) - tat_cmap(c - h, a)) / (2 * h);
                EXPECT_NEAR(tat_cmap_deriv(c, a), fd, 1e-8);
            }
    }
}

static void test_tat_table(void) {
    TEST_CASE("tat: slope table of spec §7 (eta 0.9)") {
        static const struct {
            int L;
            double a, s, phim1;
        } rows[] = {
            {7, 0.053989410400390625, 1.4121569426, -0.0762415},
            {8, 0.10449862480163574, 1.4065546523, -0.1469830},
            {10, 0.1813802719116211, 1.3915092920, -0.2523923},
            {12, 0.2385026216506958, 1.3756293678, -0.3280912},
            {16, 0.3202233910560608, 1.3468437824, -0.4312909},
            {24, 0.4211617410182953, 1.3033383817, -0.5489163},
            {32, 0.48432663083076477, 1.2727899462, -0.6164461},
            {64, 0.6125125288963318, 1.2059701290, -0.7386718},
        };
        for (size_t r = 0; r < sizeof rows / sizeof rows[0]; r++) {
            double a = slope_of(rows[r].L, 0.9);
            EXPECT(a == rows[r].a, "L=%d: a = %.17g, want %.17g", rows[r].L, a, rows[r].a);
            EXPECT_NEAR(tat_scale(a), rows[r].s, 5e-11);
            EXPECT_NEAR(phi(-1.0, a), rows[r].phim1, 5e-8);
            EXPECT(fabs(compose(2 * rows[r].L, a) - 0.9) < 1e-8, "L=%d misses eta", rows[r].L);
        }
    }
}

static void test_tat_unachievable(void) {
    TEST_CASE("tat: depth 1..6 is unachievable for eta 0.9") {
        for (int L = 1; L <= 6; L++) {
            char err[256] = "";
            double a = -7.0;
            int rc = tat_slope(L, 0.9, &a, err, sizeof err);
            EXPECT(rc == -1, "L=%d: rc = %d", L, rc);
            EXPECT(a == -7.0, "L=%d: slope written on failure (%g)", L, a);
            EXPECT(strstr(err, "unachievable") != NULL, "L=%d: err = '%s'", L, err);
        }
        EXPECT_NEAR(compose(12, 0.0), 0.897148, 5e-7);  // the most a ReLU can reach in 12 activations
        EXPECT(compose(14, 0.0) > 0.9, "14 ReLU activations pass eta");
    }
}

static void test_tat_other_eta(void) {
    TEST_CASE("tat: L=12 with eta 0.8 and 0.95") {
        double a8 = slope_of(12, 0.8), a95 = slope_of(12, 0.95);
        EXPECT(a8 == 0.39370471239089966, "eta 0.8: a = %.17g", a8);
        EXPECT(a95 == 0.06734687089920044, "eta 0.95: a = %.17g", a95);
    }
}

static void test_tat_phi(void) {
    TEST_CASE("tat: phi(+-1) and the unit q-map") {
        double a = 0.2385026216506958, s = tat_scale(a);
        EXPECT_NEAR(phi(1.0, a), 1.3756294, 1e-7);
        EXPECT_NEAR(phi(-1.0, a), -0.3280912, 1e-7);
        EXPECT_NEAR(s * s * (1 + a * a) / 2, 1.0, 1e-15);
        EXPECT_NEAR(tat_scale(0.0), sqrt(2.0), 1e-15);
        EXPECT_NEAR(tat_scale(1.0), 1.0, 1e-15);
    }
}

static void test_tat_iterates(void) {
    TEST_CASE("tat: the 24 iterates from 0 at the L=12 slope") {
        double a = 0.2385026216506958, c = 0.0, it[24];
        for (int i = 0; i < 24; i++) it[i] = c = tat_cmap(c, a);
        const double first[4] = {0.174646, 0.304052, 0.403423, 0.481812};
        for (int i = 0; i < 4; i++) EXPECT_NEAR(it[i], first[i], 5e-7);
        EXPECT_NEAR(it[21], 0.888115, 5e-7);
        EXPECT_NEAR(it[22], 0.894312, 5e-7);
        EXPECT_NEAR(it[23], 0.900000, 5e-7);
        for (int i = 1; i < 24; i++) EXPECT(it[i] > it[i - 1], "iterate %d not increasing", i);
    }
}

// ---- E-SPA schedule and kernel ----

static void test_espa_schedule(void) {
    TEST_CASE("espa: alpha_L and the gamma, rho, alpha list of §6.3") {
        EXPECT_NEAR(espa_alpha(GAMMA_L), 0.09975052005293954, 1e-15);
        EXPECT_NEAR(espa_gamma(12, 12, GAMMA_L), 0.005, 1e-15);
        EXPECT_NEAR(espa_gamma(1, 12, GAMMA_L), 0.5712954001179985, 1e-14);
        EXPECT_NEAR(espa_gamma(2, 12, GAMMA_L), 0.3115984467495441, 1e-14);
        EXPECT(isinf(espa_gamma(0, 12, GAMMA_L)), "gamma_0 = %g", espa_gamma(0, 12, GAMMA_L));
        static const double tab[12][3] = {
            {0.5712954, 0.564793, 0.825232}, {0.3115984, 0.732276, 0.681008}, {0.1897767, 0.827144, 0.561990},
            {0.1210899, 0.885954, 0.463773}, {0.0791901, 0.923864, 0.382720}, {0.0525417, 0.948815, 0.315833},
            {0.0351742, 0.965437, 0.260636}, {0.0236829, 0.976595, 0.215085}, {0.0160057, 0.984122, 0.177495},
            {0.0108442, 0.989214, 0.146475}, {0.0073594, 0.992668, 0.120876}, {0.0050000, 0.995012, 0.099751},
        };
        for (int l = 1; l <= 12; l++) {
            double g = espa_gamma(l, 12, GAMMA_L);
            EXPECT_NEAR(g, tab[l - 1][0], 5e-8);
            EXPECT_NEAR(exp(-g), tab[l - 1][1], 5e-7);
            EXPECT_NEAR(espa_alpha(g), tab[l - 1][2], 5e-7);
            // geometric in alpha from alpha_0 = 1: alpha_l = alpha_L^(l/L)
            EXPECT_NEAR(espa_alpha(g), pow(0.09975052005293954, l / 12.0), 1e-14);
        }
    }
}

static void test_espa_sigma(void) {
    TEST_CASE("espa: Sigma entries over flattened token indices") {
        double *S = xmalloc(64 * 64 * sizeof(double), "S");
        sigma_of(64, 1, S);
        EXPECT_NEAR(S[1], 0.564793, 5e-7);
        EXPECT_NEAR(S[8], pow(0.5647933, 8), 1e-6);  // vertical neighbour is 8 tokens away
        EXPECT(S[0] == 1.0 && S[64 * 5 + 5] == 1.0, "unit diagonal");
        sigma_of(64, 12, S);
        EXPECT_NEAR(S[63], 0.729789, 5e-7);
        EXPECT_NEAR(S[63 * 64], exp(-0.315), 1e-13);  // 63 * gamma_12 is 0.315 only to ~1e-15
        EXPECT(S[63 * 64] == exp(-63.0 * espa_gamma(12, 12, GAMMA_L)), "Sigma_12[63,0] = %.17g", S[63 * 64]);
        sigma_of(64, 0, S);
        int eye = 1;
        for (int i = 0; i < 64 * 64; i++) eye &= S[i] == (i % 65 == 0 ? 1.0 : 0.0);
        EXPECT(eye, "Sigma_0 is I");
        free(S);
    }
}

static void test_espa_sqrtm(void) {
    TEST_CASE("espa: symmetric square root and inverse square root") {
        int N = 64;
        size_t nn = (size_t)N * N;
        double *S = xmalloc(nn * sizeof(double), "S"), *R = xmalloc(nn * sizeof(double), "R"),
               *Ri = xmalloc(nn * sizeof(double), "Ri");
        sigma_of(N, 6, S);
        EXPECT(espa_sqrtm(N, S, 0, R) == 0, "sqrt");
        EXPECT(espa_sqrtm(N, S, 1, Ri) == 0, "inverse sqrt");
        double e_sq = 0.0, e_id = 0.0, e_sym = 0.0;
        for (int i = 0; i < N; i++)
            for (int j = 0; j < N; j++) {
                double sq = 0.0, id = 0.0;
                for (int k = 0; k < N; k++) {
                    sq += R[i * N + k] * R[k * N + j];
                    id += R[i * N + k] * Ri[k * N + j];
                }
                e_sq = fmax(e_sq, fabs(sq - S[i * N + j]));
                e_id = fmax(e_id, fabs(id - (i == j)));
                e_sym = fmax(e_sym, fabs(R[i * N + j] - R[j * N + i]));
            }
        EXPECT(e_sq < 1e-12, "|R R - Sigma| = %g", e_sq);
        EXPECT(e_id < 1e-10, "|R R^-1 - I| = %g", e_id);
        EXPECT(e_sym < 1e-13, "R asymmetric by %g", e_sym);
        free(S);
        free(R);
        free(Ri);
    }
    TEST_CASE("espa: eigenvalues clamped below at lambda_max * N * 2^-52, negatives included") {
        enum { n = 5 };
        const double diag[n] = {4.0, 1e-20, 0.0, -1e-18, 2.0};
        double m[n * n] = {0}, r[n * n], ri[n * n], floor_ = 4.0 * n * 0x1p-52;
        for (int i = 0; i < n; i++) m[i * n + i] = diag[i];
        EXPECT(espa_sqrtm(n, m, 0, r) == 0 && espa_sqrtm(n, m, 1, ri) == 0, "sqrtm failed");
        for (int i = 0; i < n; i++) {
            double lam = diag[i] > floor_ ? diag[i] : floor_;
            EXPECT_REL(r[i * n + i], sqrt(lam), 1e-14);
            EXPECT_REL(ri[i * n + i], 1.0 / sqrt(lam), 1e-14);
        }
        double off = 0.0;
        for (int i = 0; i < n * n; i++) off = fmax(off, i % (n + 1) ? fabs(r[i]) + fabs(ri[i]) : 0.0);
        EXPECT(off == 0.0, "off-diagonal %g", off);
    }
}

// ---- E-SPA buffers (tables of §6.3) ----

static void test_espa_table(Layer ly[2][13]) {
    TEST_CASE("espa: d and A diagonals of §6.3, N=64 and N=196") {
        static const double t64[12][4] = {
            {1.466249, 1.896187, 0.949773, 0.906332}, {1.184726, 1.341468, 0.904893, 0.836356},
            {1.154516, 1.277591, 0.893030, 0.830499}, {1.141759, 1.245576, 0.883203, 0.828211},
            {1.134377, 1.215747, 0.874395, 0.827058}, {1.126870, 1.179605, 0.866460, 0.826431},
            {1.115163, 1.139959, 0.859400, 0.826131}, {1.098479, 1.102998, 0.853243, 0.826067},
            {1.079270, 1.072718, 0.848004, 0.826163}, {1.060684, 1.049985, 0.843667, 0.826350},
            {1.044751, 1.033828, 0.840170, 0.826570}, {1.032144, 1.022708, 0.837408, 0.826789},
        };
        static const double t196[12][2] = {
            {1.466265, 1.896202}, {1.184741, 1.341491}, {1.154532, 1.278150}, {1.141818, 1.250782},
            {1.135138, 1.236037}, {1.131249, 1.226116}, {1.128759, 1.214370}, {1.126252, 1.194336},
            {1.121103, 1.164591}, {1.110684, 1.129860}, {1.094985, 1.096542}, {1.076659, 1.068732},
        };
        for (int l = 1; l <= 12; l++) {
            const Layer *a = &ly[0][l], *b = &ly[1][l];
            EXPECT_NEAR(a->ddef[0], t64[l - 1][0], 1e-6);
            EXPECT_NEAR(a->ddef[32], t64[l - 1][1], 1e-6);
            EXPECT_NEAR(a->A[0], t64[l - 1][2], 1e-6);
            EXPECT_NEAR(a->A[32 * 64 + 32], t64[l - 1][3], 1e-6);
            EXPECT_NEAR(b->ddef[0], t196[l - 1][0], 1e-6);
            EXPECT_NEAR(b->ddef[105], t196[l - 1][1], 1e-6);
            for (int i = 0; i < 64; i++) EXPECT(a->ddef[i] == a->dcmp[i], "d differs between modes (l=%d)", l);
            for (int i = 0; i < 196; i++) EXPECT(b->ddef[i] == b->dcmp[i], "d differs between modes (l=%d)", l);
        }
    }
}

static void test_espa_brows(Layer ly[2][13]) {
    TEST_CASE("espa: B[0, 0:4] rows of §6.3 in both modes (N=64)") {
        static const double def1[4] = {-0.434240, -1.650822, -2.500364, -3.251382};
        static const double cmp1[4] = {-0.434240, -1.793447, -2.701737, -3.480233};
        static const double def12[4] = {-0.209082, -4.813569, -5.022960, -5.165600};
        static const double cmp12[4] = {-0.209082, -4.812810, -5.021512, -5.163516};
        for (int j = 0; j < 4; j++) {
            EXPECT_NEAR(ly[0][1].Bdef[j], def1[j], 1e-5);
            EXPECT_NEAR(ly[0][1].Bcmp[j], cmp1[j], 1e-5);
            EXPECT_NEAR(ly[0][12].Bdef[j], def12[j], 1e-5);
            EXPECT_NEAR(ly[0][12].Bcmp[j], cmp12[j], 1e-5);
        }
        // the definitions themselves, from the fp64 A: ln A_ij - ln d_i (default), ln A_ij - ln d_j (compat)
        const Layer *y = &ly[0][5];
        double d0 = 0.0, d7 = 0.0;
        for (int k = 0; k < 64; k++) d0 += y->A[k], d7 += y->A[7 * 64 + k];
        EXPECT_NEAR(y->Bdef[7], log(y->A[7]) - log(d0), 1e-6);
        EXPECT_NEAR(y->Bcmp[7], log(y->A[7]) - log(d7), 1e-6);
    }
}

static void test_espa_symmetry_floor(Layer ly[2][13]) {
    TEST_CASE("espa: A_1 symmetric, A_l non-symmetric for l >= 2, positivity floor") {
        for (int n = 0; n < 2; n++) {
            int N = ly[n][1].N;
            double asym1 = 0.0, asym2 = 0.0;
            for (int i = 0; i < N; i++)
                for (int j = 0; j < N; j++) {
                    asym1 = fmax(asym1, fabs(ly[n][1].A[i * N + j] - ly[n][1].A[j * N + i]));
                    asym2 = fmax(asym2, fabs(ly[n][2].A[i * N + j] - ly[n][2].A[j * N + i]));
                }
            EXPECT(asym1 < 1e-13, "N=%d: A_1 asymmetric by %g", N, asym1);
            EXPECT(asym2 > 1e-3, "N=%d: A_2 asymmetric by only %g", N, asym2);
            int last_floored = n == 0 ? 2 : 5;
            for (int l = 1; l <= 12; l++) {
                double mn = INFINITY;
                for (int i = 0; i < N * N; i++) mn = fmin(mn, ly[n][l].A[i]);
                if (l <= last_floored) EXPECT(mn == EPS32, "N=%d l=%d: min A = %.17g, want eps32", N, l, mn);
                else EXPECT(mn > EPS32, "N=%d l=%d: min A = %.17g at the floor", N, l, mn);
            }
        }
        double mn64 = INFINITY, mn196 = INFINITY;
        for (int i = 0; i < 64 * 64; i++) mn64 = fmin(mn64, ly[0][12].A[i]);
        for (int i = 0; i < 196 * 196; i++) mn196 = fmin(mn196, ly[1][12].A[i]);
        EXPECT_NEAR(mn64, 2.30e-3, 5e-6);
        EXPECT_NEAR(mn196, 6.83e-4, 5e-7);
    }
}

// ---- kernel recursion ----

static void test_espa_recursion(Layer ly[2][13]) {
    TEST_CASE("espa: A_l Sigma_{l-1} A_l^T = Sigma_l with fp32 A, one layer and chained") {
        for (int n = 0; n < 2; n++) {
            int N = ly[n][1].N;
            size_t nn = (size_t)N * N;
            double *prev = xmalloc(nn * sizeof(double), "S_{l-1}"), *cur = xmalloc(nn * sizeof(double), "S_l"),
                   *got = xmalloc(nn * sizeof(double), "A S A^T"), *chain = xmalloc(nn * sizeof(double), "chain");
            sigma_of(N, 0, chain);
            for (int l = 1; l <= 12; l++) {
                sigma_of(N, l - 1, prev);
                sigma_of(N, l, cur);
                congruence(N, ly[n][l].A32, prev, got);
                double e = max_abs_diff(nn, got, cur);
                EXPECT(e <= 1e-5, "N=%d l=%d: max|A S A^T - S_l| = %g", N, l, e);
                congruence(N, ly[n][l].A32, chain, got);
                memcpy(chain, got, nn * sizeof(double));
            }
            double e = max_abs_diff(nn, chain, cur), tol = N == 64 ? 1e-5 : 1e-4;
            EXPECT(e <= tol, "N=%d: chained 12 layers miss Sigma_12 by %g", N, e);
            free(prev);
            free(cur);
            free(got);
            free(chain);
        }
    }
}

// ---- both modes' effective matrices ----

static void test_espa_default_mode(Layer ly[2][13]) {
    TEST_CASE("espa default: exp(B) row-stochastic and diag(d) softmax(B) = A") {
        for (int n = 0; n < 2; n++)
            for (int l = 1; l <= 12; l++) {
                const Layer *y = &ly[n][l];
                int N = y->N;
                double worst = 0.0, *M = xmalloc((size_t)N * N * sizeof(double), "M");
                for (int i = 0; i < N; i++) {
                    double s = 0.0;
                    for (int j = 0; j < N; j++) s += exp((double)y->Bdef[(size_t)i * N + j]);
                    worst = fmax(worst, fabs(s - 1.0));
                }
                EXPECT(worst <= 1e-6, "N=%d l=%d: exp(B) row sum off by %g", N, l, worst);
                effective(N, y->Bdef, y->ddef, NULL, M);
                double r = rel_frob((size_t)N * N, M, y->A);
                EXPECT(r <= 1e-6, "N=%d l=%d: rel Frobenius to A = %g", N, l, r);
                free(M);
            }
    }
}

// M_compat for layer 1 at N, with its row sums checked against the fp64 d; returns ||M - A||_F / ||A||_F.
static double compat_layer1(const Layer *y, double *prop_err) {
    int N = y->N;
    size_t nn = (size_t)N * N;
    double *M = xmalloc(nn * sizeof(double), "M"), *I = xmalloc(nn * sizeof(double), "I"),
           *S1 = xmalloc(nn * sizeof(double), "S1"), *out = xmalloc(nn * sizeof(double), "MM^T");
    float *M32 = xmalloc(nn * sizeof(float), "M32");
    effective(N, y->Bcmp, y->dcmp, NULL, M);
    double worst = 0.0;
    for (int i = 0; i < N; i++) {
        double s = 0.0, d = 0.0;
        for (int j = 0; j < N; j++) s += M[(size_t)i * N + j], d += y->A[(size_t)i * N + j];
        worst = fmax(worst, fabs(s - d));
    }
    EXPECT(worst <= 1e-6, "N=%d: compat row sums miss d by %g", N, worst);
    for (size_t i = 0; i < nn; i++) M32[i] = (float)M[i];
    sigma_of(N, 0, I);
    sigma_of(N, 1, S1);
    congruence(N, M32, I, out);
    *prop_err = max_abs_diff(nn, out, S1);
    double r = rel_frob(nn, M, y->A);
    free(M);
    free(I);
    free(S1);
    free(out);
    free(M32);
    return r;
}

static void test_espa_compat_mode(Layer ly[2][13]) {
    TEST_CASE("espa seed_compat: row sums d_i, distance to A, propagation of I through layer 1") {
        double p64, p196;
        double r64 = compat_layer1(&ly[0][1], &p64), r196 = compat_layer1(&ly[1][1], &p196);
        EXPECT_REL(r64, 1.6e-2, 0.10);
        EXPECT_REL(r196, 9.2e-3, 0.10);
        EXPECT_REL(p64, 0.095, 0.10);
        EXPECT_REL(p196, 0.095, 0.10);
    }
}

// out = diag(d) softmax(B + shift) V for a fixed N x 3 V: the layer's output with W_q = 0.
static void layer_out(int N, const float *B, const float *d, const double *shift, double *out) {
    double *M = xmalloc((size_t)N * N * sizeof(double), "M");
    effective(N, B, d, shift, M);
    for (int i = 0; i < N; i++)
        for (int e = 0; e < 3; e++) {
            double s = 0.0;
            for (int j = 0; j < N; j++) s += M[(size_t)i * N + j] * sin(0.37 * j + 1.3 * e + 0.1);
            out[i * 3 + e] = s;
        }
    free(M);
}

static void test_espa_softmax_invariance(Layer ly[2][13]) {
    TEST_CASE("espa: per-row constants in B leave the layer output unchanged") {
        const Layer *y = &ly[0][3];
        enum { N = 64 };
        CHECK(y->N == N, "layer 3 is the N=64 one");
        double shift[64], o0[64 * 3], o1[64 * 3], oc0[64 * 3], oc1[64 * 3], olnA[64 * 3];
        float lnA[64 * 64];
        for (int i = 0; i < N; i++) shift[i] = 40.0 * sin(1.7 * i) - 3.0 * i;
        layer_out(N, y->Bdef, y->ddef, NULL, o0);
        layer_out(N, y->Bdef, y->ddef, shift, o1);
        layer_out(N, y->Bcmp, y->dcmp, NULL, oc0);
        layer_out(N, y->Bcmp, y->dcmp, shift, oc1);
        for (int i = 0; i < N * N; i++) lnA[i] = (float)log(y->A[i]);
        layer_out(N, lnA, y->ddef, NULL, olnA);
        EXPECT(max_abs_diff(64 * 3, o0, o1) <= 1e-6, "default: %g", max_abs_diff(64 * 3, o0, o1));
        EXPECT(max_abs_diff(64 * 3, oc0, oc1) <= 1e-6, "compat: %g", max_abs_diff(64 * 3, oc0, oc1));
        // default B is ln A shifted per row, so it matches ln A's output; compat B is not
        EXPECT(max_abs_diff(64 * 3, o0, olnA) <= 1e-6, "default vs ln A: %g", max_abs_diff(64 * 3, o0, olnA));
        EXPECT(max_abs_diff(64 * 3, oc0, olnA) > 1e-3, "compat vs ln A: %g", max_abs_diff(64 * 3, oc0, olnA));
    }
}

static void test_espa_bad_args(void) {
    TEST_CASE("espa: layer outside 1..L is refused") {
        double A[16];
        float B[16], d[4];
        EXPECT(espa_attention_matrix(4, 0, 12, GAMMA_L, A) == -1, "l = 0");
        EXPECT(espa_attention_matrix(4, 13, 12, GAMMA_L, A) == -1, "l = L + 1");
        EXPECT(espa_layer_buffers(4, 0, 12, GAMMA_L, 0, B, d) == -1, "buffers l = 0");
    }
}

int main(void) {
    test_tat_main_slope();
    test_tat_cmap_values();
    test_tat_deriv_fd();
    test_tat_table();
    test_tat_unachievable();
    test_tat_other_eta();
    test_tat_phi();
    test_tat_iterates();
    test_espa_schedule();
    test_espa_sigma();
    test_espa_sqrtm();
    test_espa_bad_args();
    static Layer ly[2][13];
    for (int l = 1; l <= 12; l++) ly[0][l] = layer_build(64, l), ly[1][l] = layer_build(196, l);
    test_espa_table(ly);
    test_espa_brows(ly);
    test_espa_symmetry_floor(ly);
    test_espa_recursion(ly);
    test_espa_default_mode(ly);
    test_espa_compat_mode(ly);
    test_espa_softmax_invariance(ly);
    for (int l = 1; l <= 12; l++) layer_free(&ly[0][l]), layer_free(&ly[1][l]);
    return tl_finish();
}
