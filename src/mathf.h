// mathf.h: branch-free float exp and erf that the compiler vectorizes inside `#pragma omp simd` loops (libm's
// expf/erff are scalar calls and were a quarter of a SimpleViT step). Accuracy is within a few ulp of libm, far
// inside the 1e-5 parity tolerances (tests/unit/test_ops.c checks both against fp64).
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

// exp(x) for x in [-87.3, 88.3] (clamped outside): Cody-Waite reduction by ln 2, degree-5 minimax polynomial on
// [-ln2/2, ln2/2] (the Cephes coefficients), scaled by 2^n through the exponent bits.
static inline float vexpf(float x) {
    x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);  // ternaries, not fminf/fmaxf: those stay libm calls
    const float shifter = 12582912.0f;                    // 1.5 * 2^23: adding it rounds to the nearest integer
    float n = (x * 1.44269504088896341f + shifter) - shifter;
    float r = fmaf(n, -0.693359375f, x);
    r = fmaf(n, 2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = fmaf(p, r, 1.3981999507e-3f);
    p = fmaf(p, r, 8.3334519073e-3f);
    p = fmaf(p, r, 4.1665795894e-2f);
    p = fmaf(p, r, 1.6666665459e-1f);
    p = fmaf(p, r, 5.0000001201e-1f);
    float e = fmaf(p, r * r, r) + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return e * scale;
}

// erf(x): odd rational minimax approximation x P(x^2) / Q(x^2) on [-4, 4] (erf is +-1 in fp32 outside), with the
// widely used single-precision coefficients (as in XLA and Eigen); max error about 2 ulp.
static inline float verff(float x) {
    x = x < -4.0f ? -4.0f : (x > 4.0f ? 4.0f : x);
    float x2 = x * x;
    float p = -2.72614225801306e-10f;
    p = fmaf(p, x2, 2.77068142495902e-08f);
    p = fmaf(p, x2, -2.10102402082508e-06f);
    p = fmaf(p, x2, -5.69250639462346e-05f);
    p = fmaf(p, x2, -7.34990630326855e-04f);
    p = fmaf(p, x2, -2.95459980854025e-03f);
    p = fmaf(p, x2, -1.60960333262415e-02f);
    float q = -1.45660718464996e-05f;
    q = fmaf(q, x2, -2.13374055278905e-04f);
    q = fmaf(q, x2, -1.68282697438203e-03f);
    q = fmaf(q, x2, -7.37332916720468e-03f);
    q = fmaf(q, x2, -1.42647390514189e-02f);
    return x * p / q;
}
