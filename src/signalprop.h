// signalprop.h: pure math of signal propagation (spec/model.md §6, §7). TAT leaky-ReLU slope and C-map, and the
// E-SPA attention matrices (Sigma, symmetric square roots, A, d, B). Everything runs in fp64; no backend, no I/O.
#pragma once
#include <stddef.h>

// ---- TAT (§7) ----
// C-map of the TAT leaky ReLU with negative slope a, for unit-variance inputs with correlation c.
double tat_cmap(double c, double a);
// Derivative of the C-map with respect to c.
double tat_cmap_deriv(double c, double a);
// Output scale s = sqrt(2 / (1 + a^2)).
double tat_scale(double a);
// Solves C_a^(2*depth)(0) = eta with the reference's bisection, bit for bit (start 0.5, bounds [0, 1], tol 1e-8,
// at most 100 evaluations). Returns 0 and sets *slope; returns -1 and writes a one-line reason into err when the
// target is unachievable (e.g. depth <= 6 for eta 0.9) or the map gives NaN/Inf.
int tat_slope(int depth, double eta, double *slope, char *err, size_t errlen);

// ---- E-SPA (§6) ----
// alpha = sqrt(1 - exp(-2 gamma)).
double espa_alpha(double gamma);
// gamma_l for layer l = 1..L given gamma_L (alpha geometric from alpha_0 = 1 to alpha_L); l = 0 gives +INFINITY.
double espa_gamma(int l, int L, double gamma_L);
// Sigma[i,j] = exp(-gamma |i - j|) over flattened token indices, N x N row-major; gamma = +INFINITY gives I.
void espa_sigma(int N, double gamma, double *sigma);
// Symmetric (inverse) square root of a symmetric PSD N x N matrix by eigendecomposition, eigenvalues clamped below
// at lambda_max * N * 2^-52. Returns 0 on success, -1 if LAPACK fails.
int espa_sqrtm(int N, const double *m, int inverse, double *out);
// A_l = Sigma_l^{1/2} Sigma_{l-1}^{-1/2}, then the positivity floor A_ij = max(A_ij, 2^-23). N x N row-major.
// Returns 0 on success, -1 if an eigendecomposition fails.
int espa_attention_matrix(int N, int l, int L, double gamma_L, double *A);
// The layer's buffers in fp32: d[i] = sum_j A_ij (N) and B (N x N row-major): B_ij = ln A_ij - ln d_i by default,
// B_ij = ln A_ij - ln d_j when seed_compat. Returns 0 on success, -1 on failure.
int espa_layer_buffers(int N, int l, int L, double gamma_L, int seed_compat, float *B, float *d);
