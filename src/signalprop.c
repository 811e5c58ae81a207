// signalprop.c: TAT slope and C-map (spec/model.md §7) and the E-SPA attention buffers (§6.2), all in fp64.
#include "signalprop.h"

#include <lapacke.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "util.h"

#ifndef M_PI
#define M_PI 3.14159265358979323846
#endif

#define EPS32 0x1p-23   // fp32 machine epsilon: the E-SPA positivity floor (§6.2 step 5)
#define EPS64 0x1p-52   // fp64 machine epsilon: the eigenvalue clamp factor (§6.2 step 3)

// ---- TAT (§7) ----

// Same operation order as the reference's Python expression, so the doubles match:
// c + ((1-a)**2 / (pi*(1+a**2))) * (sqrt(1-c**2) - c*acos(c)).
double tat_cmap(double c, double a) {
    double k = ((1.0 - a) * (1.0 - a)) / (M_PI * (1.0 + a * a));
    return c + k * (sqrt(1.0 - c * c) - c * acos(c));
}

// d/dc of the C-map: the sqrt and c/sqrt terms cancel, leaving 1 - k*acos(c).
double tat_cmap_deriv(double c, double a) {
    double k = ((1.0 - a) * (1.0 - a)) / (M_PI * (1.0 + a * a));
    return 1.0 - k * acos(c);
}

// Makes E[phi(g)^2] = 1 for g ~ N(0,1).
double tat_scale(double a) { return sqrt(2.0 / (1.0 + a * a)); }

// C_a composed n times starting from c = 0: the correlation after n activations.
static double tat_compose(int n, double a) {
    double c = 0.0;
    for (int i = 0; i < n; i++) c = tat_cmap(c, a);
    return c;
}

// The reference bisects f(a) = eta - C_a^(2L)(0) towards 0; C decreases in a, so v < eta means a is too large.
int tat_slope(int depth, double eta, double *slope, char *err, size_t errlen) {
    double x = 0.5, lo = 0.0, hi = 1.0;
    for (int it = 0; it < 100; it++) {
        double v = tat_compose(2 * depth, x);
        if (!isfinite(v)) {
            snprintf(err, errlen, "TAT: C-map gave %g at slope %.17g (depth %d, eta %g)", v, x, depth, eta);
            return -1;
        }
        double f = eta - v;
        if (fabs(f) < 1e-8) {
            *slope = x;
            return 0;
        }
        if (f > 0) hi = x;
        else if (f < 0) lo = x;
        x = 0.5 * (lo + hi);
    }
    snprintf(err, errlen, "TAT: eta %g is unachievable with depth %d (%d activations): bisection did not converge",
             eta, depth, 2 * depth);
    return -1;
}

// ---- E-SPA (§6) ----

// Correlation decay per token step at kernel rate gamma.
double espa_alpha(double gamma) { return sqrt(1.0 - exp(-2.0 * gamma)); }

// alpha_l = alpha_L^(l/L), so gamma_l = -1/2 ln(1 - alpha_L^(2l/L)); l = 0 is the identity kernel.
double espa_gamma(int l, int L, double gamma_L) {
    if (l <= 0) return INFINITY;
    double aL = espa_alpha(gamma_L);
    return -0.5 * log(1.0 - pow(aL, 2.0 * l / L));
}

// Exponential kernel over flattened token indices; gamma = inf is special-cased since inf*0 is NaN.
void espa_sigma(int N, double gamma, double *sigma) {
    for (int i = 0; i < N; i++)
        for (int j = 0; j < N; j++)
            sigma[(size_t)i * N + j] = isinf(gamma) ? (i == j ? 1.0 : 0.0) : exp(-gamma * fabs((double)(i - j)));
}

// V diag(f(lambda)) V^T with the eigenvalues clamped at lambda_max*N*eps64, f = sqrt or 1/sqrt.
int espa_sqrtm(int N, const double *m, int inverse, double *out) {
    size_t nn = (size_t)N * N;
    double *v = xmalloc(nn * sizeof(double), "sqrtm eigenvectors");
    double *w = xmalloc((size_t)N * sizeof(double), "sqrtm eigenvalues");
    memcpy(v, m, nn * sizeof(double));
    lapack_int info = LAPACKE_dsyevd(LAPACK_ROW_MAJOR, 'V', 'U', N, v, N, w);
    if (info != 0) {
        free(v);
        free(w);
        return -1;
    }
    double floor_ = w[N - 1] * N * EPS64;  // dsyevd returns ascending eigenvalues
    for (int k = 0; k < N; k++) {
        double lam = w[k] > floor_ ? w[k] : floor_;
        w[k] = inverse ? 1.0 / sqrt(lam) : sqrt(lam);
    }
    for (int i = 0; i < N; i++)
        for (int j = 0; j < N; j++) {
            double s = 0.0;
            for (int k = 0; k < N; k++) s += v[(size_t)i * N + k] * w[k] * v[(size_t)j * N + k];
            out[(size_t)i * N + j] = s;
        }
    free(v);
    free(w);
    return 0;
}

// Square root (or inverse square root) of Sigma at layer l; layer 0 is the identity.
static int espa_layer_root(int N, int l, int L, double gamma_L, int inverse, double *out) {
    double *sig = xmalloc((size_t)N * N * sizeof(double), "sigma");
    espa_sigma(N, espa_gamma(l, L, gamma_L), sig);
    int rc = 0;
    if (l == 0) memcpy(out, sig, (size_t)N * N * sizeof(double));  // Sigma_0 = I is its own (inverse) root
    else rc = espa_sqrtm(N, sig, inverse, out);
    free(sig);
    return rc;
}

// A_l = S_l S_{l-1}^{-1} maps Sigma_{l-1} to Sigma_l; the floor keeps ln A finite (§6.2 steps 3-5).
int espa_attention_matrix(int N, int l, int L, double gamma_L, double *A) {
    if (N <= 0 || l < 1 || l > L) return -1;
    size_t nn = (size_t)N * N;
    double *s = xmalloc(nn * sizeof(double), "S_l");
    double *si = xmalloc(nn * sizeof(double), "S_{l-1}^-1");
    int rc = espa_layer_root(N, l, L, gamma_L, 0, s);
    if (rc == 0) rc = espa_layer_root(N, l - 1, L, gamma_L, 1, si);
    if (rc == 0) {
        for (int i = 0; i < N; i++)
            for (int j = 0; j < N; j++) {
                double acc = 0.0;
                for (int k = 0; k < N; k++) acc += s[(size_t)i * N + k] * si[(size_t)k * N + j];
                A[(size_t)i * N + j] = acc > EPS32 ? acc : EPS32;
            }
    }
    free(s);
    free(si);
    return rc;
}

// d = row sums of A; B = ln A minus ln d of the row (default, row-stochastic exp(B)) or of the column (compat).
int espa_layer_buffers(int N, int l, int L, double gamma_L, int seed_compat, float *B, float *d) {
    if (N <= 0) return -1;
    size_t nn = (size_t)N * N;
    double *A = xmalloc(nn * sizeof(double), "A_l");
    double *ld = xmalloc((size_t)N * sizeof(double), "ln d");
    if (espa_attention_matrix(N, l, L, gamma_L, A) != 0) {
        free(A);
        free(ld);
        return -1;
    }
    for (int i = 0; i < N; i++) {
        double s = 0.0;
        for (int j = 0; j < N; j++) s += A[(size_t)i * N + j];
        d[i] = (float)s;
        ld[i] = log(s);
    }
    for (int i = 0; i < N; i++)
        for (int j = 0; j < N; j++)
            B[(size_t)i * N + j] = (float)(log(A[(size_t)i * N + j]) - (seed_compat ? ld[j] : ld[i]));
    free(A);
    free(ld);
    return 0;
}
