// rng.h: the project's counter-based randomness (spec/data.md §5.3). SplitMix64 streams keyed by
// (seed, domain, a, b); nothing depends on rank, thread or time. Header-only so that every module and the CUDA
// kernels can derive the same bits.
#pragma once
#include <math.h>
#include <stdint.h>

#define RNG_GOLDEN 0x9E3779B97F4A7C15ULL
// The counter functions compile for the GPU too (kernels/ derive the same dropout bits).
#ifdef __CUDACC__
#define RNG_HD __host__ __device__
#else
#define RNG_HD
#endif

// Domains: one per purpose, so that streams never collide.
enum {
    RNG_SHUFFLE = 0x5348554646ULL,  // epoch permutation: (epoch, 0)
    RNG_AUG = 0x415547ULL,          // per-image augmentation: (epoch, dataset index)
    RNG_MIXUP = 0x4D49585550ULL,    // mixup: (global step, group)
    RNG_DROPOUT = 0x44524F50ULL,    // dropout: (optimizer step, position in the step's global slice)
    RNG_INIT = 0x494E4954ULL,       // parameter init: (parameter index, 0)
};

RNG_HD static inline uint64_t rng_mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

RNG_HD static inline uint64_t rng_key(uint64_t seed, uint64_t domain, uint64_t a, uint64_t b) {
    return rng_mix64(rng_mix64(rng_mix64(seed ^ domain) + a) + b);
}

typedef struct {
    uint64_t state;
    int has_spare;  // Box-Muller makes normals in pairs
    double spare;
} Rng;

static inline Rng rng_stream(uint64_t seed, uint64_t domain, uint64_t a, uint64_t b) {
    Rng r = {rng_key(seed, domain, a, b), 0, 0.0};
    return r;
}

static inline uint64_t rng_next(Rng *r) { return rng_mix64(r->state += RNG_GOLDEN); }

// Uniform double in [0, 1).
static inline double rng_uniform(Rng *r) { return (double)(rng_next(r) >> 11) * 0x1.0p-53; }

// Uniform integer in [0, n).
static inline uint64_t rng_below(Rng *r, uint64_t n) {
    return (uint64_t)(((unsigned __int128)rng_next(r) * n) >> 64);
}

// Standard normal by Box-Muller.
static inline double rng_normal(Rng *r) {
    if (r->has_spare) {
        r->has_spare = 0;
        return r->spare;
    }
    double u1 = rng_uniform(r), u2 = rng_uniform(r);
    double rad = sqrt(-2.0 * log(1.0 - u1));  // 1 - u1 in (0, 1]: no log(0)
    double th = 2.0 * M_PI * u2;
    r->spare = rad * sin(th);
    r->has_spare = 1;
    return rad * cos(th);
}

// Gamma(alpha, 1) by Marsaglia-Tsang, with the alpha < 1 boost.
static inline double rng_gamma(Rng *r, double alpha) {
    if (alpha < 1.0) {
        double u = rng_uniform(r);
        return rng_gamma(r, alpha + 1.0) * pow(1.0 - u, 1.0 / alpha);
    }
    double d = alpha - 1.0 / 3.0, c = 1.0 / sqrt(9.0 * d);
    for (;;) {
        double x, v;
        do {
            x = rng_normal(r);
            v = 1.0 + c * x;
        } while (v <= 0.0);
        v = v * v * v;
        double u = 1.0 - rng_uniform(r);
        if (u < 1.0 - 0.0331 * x * x * x * x) return d * v;
        if (log(u) < 0.5 * x * x + d * (1.0 - v + log(v))) return d * v;
    }
}

// Beta(alpha, alpha) as X / (X + Y) with X, Y ~ Gamma(alpha).
static inline double rng_beta_sym(Rng *r, double alpha) {
    double x = rng_gamma(r, alpha), y = rng_gamma(r, alpha);
    if (x + y == 0.0) return rng_uniform(r) < 0.5 ? 0.0 : 1.0;  // both underflowed (tiny alpha): an endpoint
    return x / (x + y);
}

// Counter-based uniform for element j of a keyed stream (dropout masks): the same bits on CPU and GPU.
RNG_HD static inline float rng_counter_uniform(uint64_t key, uint64_t j) {
    return (float)(rng_mix64(key + (j + 1) * RNG_GOLDEN) >> 40) * 0x1.0p-24f;
}
