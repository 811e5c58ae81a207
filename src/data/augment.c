// augment.c: the reference's preprocessing with Pillow 9.4 / torchvision 0.14 arithmetic (spec/data.md §2).
// Every op reproduces the library's own operation order and number types (double, float or fixed point), so
// that the uint8 results are bit-identical; tests/unit/test_augment.c checks them against
// tests/reference/gen_augment_fixtures.py. This file must not be built with FP contraction (FMA): the project
// compiles with -std=c11, which turns GCC's contraction off.
#include "data/augment.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "util.h"

#define PX(im, x, y) ((im)->px + (size_t)(y) * (size_t)(im)->stride + (size_t)(x) * (size_t)(im)->c)

static inline void px_copy(uint8_t *d, const uint8_t *s, int c) {
    if (c == 3) {
        d[0] = s[0];
        d[1] = s[1];
        d[2] = s[2];
    } else {
        for (int i = 0; i < c; i++) d[i] = s[i];
    }
}

static void copy_image(const Image *src, Image *dst) {
    image_reserve(dst, src->w, src->h, src->c);
    size_t row = (size_t)src->w * src->c;
    for (int y = 0; y < src->h; y++) memcpy(PX(dst, 0, y), PX(src, 0, y), row);
}

// ------------------------------------------------------------------------------------------------ resampler
// Pillow's Resample.c, BILINEAR (triangle filter, support 1), 8 bits per channel.

#define PRECISION_BITS (32 - 8 - 2)

static double tri_filter(double x) {
    if (x < 0.0) x = -x;
    return x < 1.0 ? 1.0 - x : 0.0;
}

static inline uint8_t clip8_fixed(int v) {
    v >>= PRECISION_BITS;  // arithmetic shift, as Pillow's lookup table index
    return v < 0 ? 0 : v > 255 ? 255 : (uint8_t)v;
}

// Scratch slots of the resampler (ResizeScratch in augment.h), grown as needed and kept between calls.
enum { RS_HBOUNDS, RS_HKK, RS_VBOUNDS, RS_VKK, RS_WEIGHTS, RS_PAIRK, RS_PAIRINFO, RS_TMP };

static void *scratch(ResizeScratch *s, int slot, size_t bytes) {
    if (bytes > s->cap[slot] || !s->p[slot]) {
        free(s->p[slot]);
        s->p[slot] = xmalloc(bytes ? bytes : 1, "resample scratch");
        s->cap[slot] = bytes;
    }
    return s->p[slot];
}

void resize_scratch_free(ResizeScratch *s) {
    for (int i = 0; i < RS_SLOTS; i++) {
        free(s->p[i]);
        s->p[i] = NULL;
        s->cap[i] = 0;
    }
    s->coeffs_valid = 0;
}

// The coefficients for one axis: for each output position, the first input index, the tap count and ksize
// fixed-point weights. The box edges are single precision, as Pillow parses them.
typedef struct {
    int ksize;
    int *bounds;   // [out][2]: xmin, count
    int32_t *kk;   // [out][ksize]
} Coeffs;

static void precompute_coeffs(int in_size, float in0, float in1, int out_size, Coeffs *cf, ResizeScratch *s,
                              int slot_bounds, int slot_kk) {
    double scale = (double)(in1 - in0) / out_size;
    double filterscale = scale < 1.0 ? 1.0 : scale;
    double support = 1.0 * filterscale;
    int ksize = (int)ceil(support) * 2 + 1;
    cf->ksize = ksize;
    cf->bounds = scratch(s, slot_bounds, sizeof(int) * 2 * (size_t)out_size);
    cf->kk = scratch(s, slot_kk, sizeof(int32_t) * (size_t)ksize * (size_t)out_size);
    double *k = scratch(s, RS_WEIGHTS, sizeof(double) * (size_t)ksize);
    for (int xx = 0; xx < out_size; xx++) {
        double center = in0 + (xx + 0.5) * scale;
        double ww = 0.0, ss = 1.0 / filterscale;
        int xmin = (int)(center - support + 0.5);
        if (xmin < 0) xmin = 0;
        int xmax = (int)(center + support + 0.5);
        if (xmax > in_size) xmax = in_size;
        xmax -= xmin;
        int x = 0;
        for (; x < xmax; x++) {
            double w = tri_filter((x + xmin - center + 0.5) * ss);
            k[x] = w;
            ww += w;
        }
        for (x = 0; x < xmax; x++)
            if (ww != 0.0) k[x] /= ww;
        for (; x < ksize; x++) k[x] = 0;
        int32_t *kf = cf->kk + (size_t)xx * ksize;
        for (x = 0; x < ksize; x++)
            kf[x] = k[x] < 0 ? (int32_t)(-0.5 + k[x] * (1 << PRECISION_BITS))
                             : (int32_t)(0.5 + k[x] * (1 << PRECISION_BITS));
        cf->bounds[2 * xx] = xmin;
        cf->bounds[2 * xx + 1] = xmax;
    }
}

// Mirrors the output positions (xx <-> out_size - 1 - xx): resampling with the mirrored coefficients gives the
// mirrored rows, byte for byte, because every output sample is computed from its own coefficients alone. This is
// how a horizontal flip after the resize (RandomResizedCrop, then RandomHorizontalFlip) costs nothing.
static void mirror_coeffs(Coeffs *cf, int out_size) {
    int ks = cf->ksize;
    for (int a = 0, b = out_size - 1; a < b; a++, b--) {
        for (int i = 0; i < 2; i++) {
            int t = cf->bounds[2 * a + i];
            cf->bounds[2 * a + i] = cf->bounds[2 * b + i];
            cf->bounds[2 * b + i] = t;
        }
        for (int i = 0; i < ks; i++) {
            int32_t t = cf->kk[(size_t)a * ks + i];
            cf->kk[(size_t)a * ks + i] = cf->kk[(size_t)b * ks + i];
            cf->kk[(size_t)b * ks + i] = t;
        }
    }
}

// Both axes' coefficients of the resize of box (of a full_w x full_h image) to out_w x out_h, in scr's H and V
// slots. They stay valid there until a resize shifts them in place, so that pil_resize_window_source followed by
// pil_resize_bilinear_window of the same resize (the eval transform, per image) computes them once.
static void resize_coeffs(ResizeScratch *scr, int full_w, int full_h, const float b[4], int out_w, int out_h,
                          Coeffs *ch, Coeffs *cv) {
    int key[4] = {full_w, full_h, out_w, out_h};
    if (scr->coeffs_valid && !memcmp(scr->key_dims, key, sizeof key) && !memcmp(scr->key_box, b, sizeof scr->key_box)) {
        *ch = (Coeffs){scr->key_ksize[0], scr->p[RS_HBOUNDS], scr->p[RS_HKK]};
        *cv = (Coeffs){scr->key_ksize[1], scr->p[RS_VBOUNDS], scr->p[RS_VKK]};
        return;
    }
    precompute_coeffs(full_w, b[0], b[2], out_w, ch, scr, RS_HBOUNDS, RS_HKK);
    precompute_coeffs(full_h, b[1], b[3], out_h, cv, scr, RS_VBOUNDS, RS_VKK);
    memcpy(scr->key_dims, key, sizeof key);
    memcpy(scr->key_box, b, sizeof scr->key_box);
    scr->key_ksize[0] = ch->ksize;
    scr->key_ksize[1] = cv->ksize;
    scr->coeffs_valid = 1;
}

// The two passes below are Pillow's ImagingResampleHorizontal/Vertical_8bpc: for every output sample, a sum of
// input bytes times int32 coefficients (non-negative here, at most 1 << 22) started at 1 << 21, then >> 22 and
// clipped. Each product is below 2^30 and each sum below 2^31, so the int32 arithmetic never overflows, and integer
// addition is associative: the AVX2 paths give the scalar paths' bytes, tap by tap.

#ifdef __AVX2__
// >> 22 (arithmetic) of 8 int32 sums; the callers then use the signed-saturating pack to int16 (exact: |a >> 22| <
// 512) and the unsigned-saturating pack to uint8 (the clip to 0..255, as clip8_fixed).
static inline __m256i shift22(__m256i a) { return _mm256_srai_epi32(a, PRECISION_BITS); }
#endif

static inline void h_pixel_rgb(const uint8_t *p, const int32_t *k, int n, uint8_t *o) {
    int s0 = 1 << (PRECISION_BITS - 1), s1 = s0, s2 = s0;
    for (int x = 0; x < n; x++) {
        s0 += p[3 * x] * k[x];
        s1 += p[3 * x + 1] * k[x];
        s2 += p[3 * x + 2] * k[x];
    }
    o[0] = clip8_fixed(s0);
    o[1] = clip8_fixed(s1);
    o[2] = clip8_fixed(s2);
}

#ifdef __AVX2__
// The shifted sums of one pair of output pixels (2i, 2i + 1), lanes (R, G, B, 0) of pixel 2i then of 2i + 1. pi:
// the pair's byte offsets in the row; kv: its coefficient vectors (see resample_h). nblk and nm_last are constants
// at the call sites, so that the tap loops unroll.
static inline __attribute__((always_inline)) __m256i h_pair_avx2(const uint8_t *row, const int *pi, const __m256i *kv,
                                                                 const __m256i mask[3], int nblk, int nm_last) {
    __m256i lo = _mm256_set1_epi32(1 << (PRECISION_BITS - 1)), hi = _mm256_setzero_si256();
    for (int blk = 0, x0 = 0; blk < nblk; blk++, x0 += 5, kv += 6) {
        __m256i d = _mm256_inserti128_si256(
            _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(row + pi[0] + 3 * x0))),
            _mm_loadu_si128((const __m128i *)(row + pi[1] + 3 * x0)), 1);
        int nm = blk < nblk - 1 ? 3 : nm_last;
        for (int m = 0; m < nm; m++) {
            __m256i s = _mm256_shuffle_epi8(d, mask[m]);
            lo = _mm256_add_epi32(lo, _mm256_madd_epi16(s, _mm256_loadu_si256(kv + 2 * m)));
            hi = _mm256_add_epi32(hi, _mm256_madd_epi16(s, _mm256_loadu_si256(kv + 2 * m + 1)));
        }
    }
    return shift22(_mm256_add_epi32(lo, _mm256_slli_epi32(hi, 15)));
}

// One pair on its own: scalar when its 16-byte loads would pass the image's end (avail: readable bytes from row),
// else h_pair_avx2 with two 4-byte stores (the second writes 1 byte past pixel 2i + 1: a spare byte or a pixel that
// is written later).
static inline __attribute__((always_inline)) void h_pair_one(const uint8_t *row, size_t avail, uint8_t *o, int i,
                                                             const int16_t *pk, const int *pinfo, const Coeffs *cf,
                                                             const __m256i mask[3], int nblk, int nm_last) {
    const int *pi = pinfo + 4 * i;
    int ks = cf->ksize;
    if ((size_t)pi[3] > avail) {
        const int32_t *ka = cf->kk + (size_t)(2 * i) * ks;
        h_pixel_rgb(row + pi[0], ka, cf->bounds[4 * i + 1], o + 6 * i);
        h_pixel_rgb(row + pi[1], ka + ks, cf->bounds[4 * i + 3], o + 6 * i + 3);
        return;
    }
    __m256i v = h_pair_avx2(row, pi, (const __m256i *)(pk + (size_t)i * nblk * 3 * 2 * 16), mask, nblk, nm_last);
    v = _mm256_packs_epi32(v, v);
    v = _mm256_packus_epi16(v, v);
    int32_t r0 = _mm256_cvtsi256_si32(v), r1 = _mm256_extract_epi32(v, 4);
    memcpy(o + 6 * i, &r0, 4);
    memcpy(o + 6 * i + 3, &r1, 4);
}

// One intermediate row of the AVX2 RGB horizontal pass (see resample_h). Four pairs (8 pixels, 24 bytes) at a time
// share one pack, permute and compress, and two 16-byte stores whose last 4 bytes are written again by the next
// group, the tail or the next row (the buffer has 4 spare bytes after the last row). gmax[g]: the most bytes any
// pair of group g reads past the row start.
static inline __attribute__((always_inline)) void h_row_rgb_avx2(const uint8_t *row, size_t avail, uint8_t *o,
                                                                 int np, const int16_t *pk, const int *pinfo,
                                                                 const int *gmax, const Coeffs *cf,
                                                                 const __m256i mask[3], int nblk, int nm_last) {
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    const __m256i squeeze = _mm256_setr_epi8(0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1,  //
                                             0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1);
    size_t kstride = (size_t)nblk * 3 * 2 * 16;  // int16 per pair
    int ng = np / 4;
    for (int g = 0; g < ng; g++) {
        if ((size_t)gmax[g] > avail) {
            for (int i = 4 * g; i < 4 * g + 4; i++) h_pair_one(row, avail, o, i, pk, pinfo, cf, mask, nblk, nm_last);
            continue;
        }
        const int *pi = pinfo + 16 * g;
        const int16_t *kp = pk + (size_t)(4 * g) * kstride;
        __m256i v0 = h_pair_avx2(row, pi, (const __m256i *)kp, mask, nblk, nm_last);
        __m256i v1 = h_pair_avx2(row, pi + 4, (const __m256i *)(kp + kstride), mask, nblk, nm_last);
        __m256i v2 = h_pair_avx2(row, pi + 8, (const __m256i *)(kp + 2 * kstride), mask, nblk, nm_last);
        __m256i v3 = h_pair_avx2(row, pi + 12, (const __m256i *)(kp + 3 * kstride), mask, nblk, nm_last);
        // packs/packus per 128-bit lane: lane 0 holds pixels 8g, 8g+2, 8g+4, 8g+6 (4 bytes each, R G B 0), lane 1
        // the odd ones; the permute interleaves them, the shuffle drops every fourth byte (12 per lane).
        __m256i u = _mm256_packus_epi16(_mm256_packs_epi32(v0, v1), _mm256_packs_epi32(v2, v3));
        u = _mm256_shuffle_epi8(_mm256_permutevar8x32_epi32(u, perm), squeeze);
        _mm_storeu_si128((__m128i *)(o + 24 * g), _mm256_castsi256_si128(u));
        _mm_storeu_si128((__m128i *)(o + 24 * g + 12), _mm256_extracti128_si256(u, 1));
    }
    for (int i = 4 * ng; i < np; i++) h_pair_one(row, avail, o, i, pk, pinfo, cf, mask, nblk, nm_last);
}
#endif

// Horizontal pass: out rows 0..out_rows-1 from in rows offset.. (in has in_h rows of in_w pixels), widths from cf.
// Rows are written in order; out must have 4 spare bytes after its last row (the AVX2 path's stores).
static void resample_h(const uint8_t *in, size_t in_stride, int in_w, int in_h, int offset, int c, uint8_t *out,
                       size_t out_stride, int out_w, int out_rows, const Coeffs *cf, ResizeScratch *scr) {
    int ks = cf->ksize;
#ifdef __AVX2__
    if (c == 3 && out_w >= 2) {
        // Two output pixels per register: 128-bit lane 0 holds pixel xx, lane 1 pixel xx + 1. Per block of 5 taps,
        // one 16-byte load per pixel; a byte shuffle spreads taps (j, j + 1) to int16 pairs (R_j, R_j+1, G_j, G_j+1,
        // B_j, B_j+1, 0, 0), and vpmaddwd with the pixel's coefficient pair gives int32 partial sums (R, G, B, 0).
        // The coefficients (0 .. 1 << 22) do not fit int16, so k = kh << 15 | kl: two sums, one of p * kl (kl <
        // 2^15) and one of p * kh (kh <= 128), joined at the end as (hi << 15) + lo: the same integer.
        int np = out_w / 2, ng = np / 4;
        // Every pair runs the same number of taps, the most any pixel has (taps past a pixel's count have
        // coefficient 0: kk is padded to ksize), so that the loops' trip counts are the same for every pair.
        int t = 1;
        for (int xx = 0; xx < 2 * np; xx++)
            if (cf->bounds[2 * xx + 1] > t) t = cf->bounds[2 * xx + 1];
        int nblk = (t + 4) / 5, nm_last = ((t - 5 * (nblk - 1)) + 1) / 2, nb = nblk;
        int16_t *pk = scratch(scr, RS_PAIRK, sizeof(int16_t) * 16 * 2 * 3 * (size_t)nb * (size_t)np);
        int *pinfo = scratch(scr, RS_PAIRINFO, sizeof(int) * (4 * (size_t)np + (size_t)ng + 1));
        int *gmax = pinfo + 4 * (size_t)np;
        for (int i = 0; i < np; i++) {
            int xa = cf->bounds[4 * i], xb = cf->bounds[4 * i + 2];
            for (int px = 0; px < 2; px++) {
                const int32_t *kp = cf->kk + (size_t)(2 * i + px) * ks;
                for (int blk = 0; blk < nb; blk++)
                    for (int m = 0; m < 3; m++) {
                        int16_t *lo = pk + ((((size_t)i * nb + blk) * 3 + m) * 2) * 16 + 8 * px, *hi = lo + 16;
                        for (int q = 0; q < 2; q++) {
                            int j = 2 * m + q, x = 5 * blk + j;
                            int32_t kv = j < 5 && x < ks ? kp[x] : 0;
                            for (int ch = 0; ch < 4; ch++) {
                                lo[2 * ch + q] = (int16_t)(kv & 0x7fff);
                                hi[2 * ch + q] = (int16_t)(kv >> 15);
                            }
                        }
                    }
            }
            int xm = xa > xb ? xa : xb;
            pinfo[4 * i] = 3 * xa;
            pinfo[4 * i + 1] = 3 * xb;
            pinfo[4 * i + 2] = t;
            pinfo[4 * i + 3] = 3 * xm + 15 * ((t - 1) / 5) + 16;  // bytes read past the row start, at most
        }
        for (int g = 0; g < ng; g++) {
            int m = 0;
            for (int i = 4 * g; i < 4 * g + 4; i++) m = pinfo[4 * i + 3] > m ? pinfo[4 * i + 3] : m;
            gmax[g] = m;
        }
        __m256i mask[3];
        for (int m = 0; m < 3; m++) {
            int8_t mb[32];
            for (int b = 0; b < 32; b++) mb[b] = -128;  // zero
            for (int q = 0; q < 2; q++) {
                int j = 2 * m + q;
                if (j >= 5) continue;  // past the 16 loaded bytes: its coefficient is 0
                for (int ch = 0; ch < 3; ch++) mb[4 * ch + 2 * q] = mb[16 + 4 * ch + 2 * q] = (int8_t)(3 * j + ch);
            }
            mask[m] = _mm256_loadu_si256((const __m256i *)mb);
        }
        for (int yy = 0; yy < out_rows; yy++) {
            int y = yy + offset;
            const uint8_t *row = in + (size_t)y * in_stride;
            size_t avail = (size_t)(in_h - 1 - y) * in_stride + (size_t)in_w * 3;  // readable bytes from row
            uint8_t *o = out + (size_t)yy * out_stride;
            if (nblk == 1 && nm_last == 1)
                h_row_rgb_avx2(row, avail, o, np, pk, pinfo, gmax, cf, mask, 1, 1);
            else if (nblk == 1 && nm_last == 2)
                h_row_rgb_avx2(row, avail, o, np, pk, pinfo, gmax, cf, mask, 1, 2);
            else if (nblk == 1)
                h_row_rgb_avx2(row, avail, o, np, pk, pinfo, gmax, cf, mask, 1, 3);
            else
                h_row_rgb_avx2(row, avail, o, np, pk, pinfo, gmax, cf, mask, nblk, nm_last);
            if (out_w & 1) {
                int xx = out_w - 1;
                h_pixel_rgb(row + (size_t)cf->bounds[2 * xx] * 3, cf->kk + (size_t)xx * ks, cf->bounds[2 * xx + 1],
                            o + 3 * xx);
            }
        }
        return;
    }
#else
    (void)scr;
#endif
    for (int yy = 0; yy < out_rows; yy++) {
        const uint8_t *row = in + (size_t)(yy + offset) * in_stride;
        uint8_t *o = out + (size_t)yy * out_stride;
        for (int xx = 0; xx < out_w; xx++) {
            int xmin = cf->bounds[2 * xx], xmax = cf->bounds[2 * xx + 1];
            const int32_t *k = cf->kk + (size_t)xx * ks;
            const uint8_t *p = row + (size_t)xmin * c;
            if (c == 3) {
                h_pixel_rgb(p, k, xmax, o + 3 * xx);
                continue;
            }
            for (int ch = 0; ch < c; ch++) {
                int ss = 1 << (PRECISION_BITS - 1);
                for (int x = 0; x < xmax; x++) ss += p[x * c + ch] * k[x];
                o[xx * c + ch] = clip8_fixed(ss);
            }
        }
    }
}

// Vertical pass: out rows from in rows bounds (already relative to in). Each output byte is its column's sum over
// the row's taps, 32 adjacent bytes at a time (they share the coefficients).
static void resample_v(const uint8_t *in, size_t in_stride, int c, uint8_t *out, size_t out_stride, int w,
                       int out_h, const Coeffs *cf) {
    int n = w * c;
    for (int yy = 0; yy < out_h; yy++) {
        int ymin = cf->bounds[2 * yy], ymax = cf->bounds[2 * yy + 1];
        const int32_t *k = cf->kk + (size_t)yy * cf->ksize;
        const uint8_t *base = in + (size_t)ymin * in_stride;
        uint8_t *o = out + (size_t)yy * out_stride;
        int i = 0;
#ifdef __AVX2__
        // Taps two at a time: the bytes of rows y and y + 1, widened to int16 and interleaved, form pairs (p_y,
        // p_y+1) that vpmaddwd multiplies by (k_y, k_y+1) and sums into int32. As in the horizontal pass the
        // coefficients are split, k = kh << 15 | kl (kl < 2^15, kh <= 128), into two sums joined at the end as
        // (hi << 15) + lo: the same integer as the scalar sum. An odd last tap pairs with a zero row weight.
        const __m256i bias = _mm256_set1_epi32(1 << (PRECISION_BITS - 1));
        int npair = (ymax + 1) / 2;
        __m256i klo[4], khi[4];  // ksize <= 7 taps while downscaling by at most 3 (else the generic loop below)
        if (npair <= 4) {
            for (int q = 0; q < npair; q++) {
                int32_t k0 = k[2 * q], k1 = 2 * q + 1 < ymax ? k[2 * q + 1] : 0;
                klo[q] = _mm256_set1_epi32((int32_t)((uint32_t)(k1 & 0x7fff) << 16 | (uint32_t)(k0 & 0x7fff)));
                khi[q] = _mm256_set1_epi32((int32_t)((uint32_t)(k1 >> 15) << 16 | (uint32_t)(k0 >> 15)));
            }
            for (; i + 32 <= n; i += 32) {
                __m256i lo0 = bias, lo1 = bias, lo2 = bias, lo3 = bias;
                __m256i hi0 = _mm256_setzero_si256(), hi1 = hi0, hi2 = hi0, hi3 = hi0;
                for (int q = 0; q < npair; q++) {
                    const uint8_t *r0 = base + (size_t)(2 * q) * in_stride + i;
                    __m256i a0 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)r0));
                    __m256i c0 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(r0 + 16)));
                    __m256i a1 = _mm256_setzero_si256(), c1 = a1;
                    if (2 * q + 1 < ymax) {
                        a1 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(r0 + in_stride)));
                        c1 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(r0 + in_stride + 16)));
                    }
                    // per 128-bit lane: unpacklo holds outputs 0-3 (lane 0) and 8-11 (lane 1), unpackhi 4-7, 12-15
                    __m256i l0 = _mm256_unpacklo_epi16(a0, a1), h0 = _mm256_unpackhi_epi16(a0, a1);
                    __m256i l1 = _mm256_unpacklo_epi16(c0, c1), h1 = _mm256_unpackhi_epi16(c0, c1);
                    lo0 = _mm256_add_epi32(lo0, _mm256_madd_epi16(l0, klo[q]));
                    hi0 = _mm256_add_epi32(hi0, _mm256_madd_epi16(l0, khi[q]));
                    lo1 = _mm256_add_epi32(lo1, _mm256_madd_epi16(h0, klo[q]));
                    hi1 = _mm256_add_epi32(hi1, _mm256_madd_epi16(h0, khi[q]));
                    lo2 = _mm256_add_epi32(lo2, _mm256_madd_epi16(l1, klo[q]));
                    hi2 = _mm256_add_epi32(hi2, _mm256_madd_epi16(l1, khi[q]));
                    lo3 = _mm256_add_epi32(lo3, _mm256_madd_epi16(h1, klo[q]));
                    hi3 = _mm256_add_epi32(hi3, _mm256_madd_epi16(h1, khi[q]));
                }
                __m256i v0 = shift22(_mm256_add_epi32(lo0, _mm256_slli_epi32(hi0, 15)));
                __m256i v1 = shift22(_mm256_add_epi32(lo1, _mm256_slli_epi32(hi1, 15)));
                __m256i v2 = shift22(_mm256_add_epi32(lo2, _mm256_slli_epi32(hi2, 15)));
                __m256i v3 = shift22(_mm256_add_epi32(lo3, _mm256_slli_epi32(hi3, 15)));
                // packs(v0, v1): outputs 0-15 in order (int16); packus of the two halves: per lane 0-7, 16-23 |
                // 8-15, 24-31; the 64-bit permute restores 0..31.
                __m256i b = _mm256_packus_epi16(_mm256_packs_epi32(v0, v1), _mm256_packs_epi32(v2, v3));
                _mm256_storeu_si256((__m256i *)(o + i), _mm256_permute4x64_epi64(b, 0xD8));
            }
        }
#endif
        for (; i < n; i++) {
            int ss = 1 << (PRECISION_BITS - 1);
            for (int y = 0; y < ymax; y++) ss += base[(size_t)y * in_stride + i] * k[y];
            o[i] = clip8_fixed(ss);
        }
    }
}

// Reverses the order of the pixels of each of h rows of w pixels (c bytes each) in place.
static void flip_rows(uint8_t *px, size_t stride, int w, int h, int c) {
    for (int y = 0; y < h; y++) {
        uint8_t *row = px + (size_t)y * stride;
        if (c == 3) {  // RGB, the common case: whole pixels at a time
            for (int a = 0, b = w - 1; a < b; a++, b--) {
                uint8_t *p = row + 3 * a, *q = row + 3 * b, t0 = p[0], t1 = p[1], t2 = p[2];
                p[0] = q[0];
                p[1] = q[1];
                p[2] = q[2];
                q[0] = t0;
                q[1] = t1;
                q[2] = t2;
            }
            continue;
        }
        for (int a = 0, b = w - 1; a < b; a++, b--)
            for (int ch = 0; ch < c; ch++) {
                uint8_t t = row[a * c + ch];
                row[a * c + ch] = row[b * c + ch];
                row[b * c + ch] = t;
            }
    }
}

// _imaging.c: an integer box whose size is the output size is a plain crop (no resampling).
static int plain_crop(const float b[4], int out_w, int out_h) {
    return b[0] - (int)b[0] == 0 && b[2] - b[0] == out_w && b[1] - (int)b[1] == 0 && b[3] - b[1] == out_h;
}

// The window [wx, wx + ww) x [wy, wy + wh) of Pillow's resize of the box of a full_w x full_h image to out_w x out_h,
// from src, which holds the image's pixels [ox, ox + src->w) x [oy, oy + src->h) (at least the rectangle that
// pil_resize_window_source names). Each output byte depends only on its own coefficients (computed for the whole
// resize) and on the intermediate bytes of its own column, so the window's bytes are the whole resize's, exactly.
static void resize_window(const Image *src, int ox, int oy, int full_w, int full_h, const double box[4], int out_w,
                          int out_h, int wx, int wy, int ww, int wh, int flip, uint8_t *dst, size_t dst_stride,
                          ResizeScratch *scr) {
    float b[4] = {(float)box[0], (float)box[1], (float)box[2], (float)box[3]};
    int c = src->c;
    size_t row_bytes = (size_t)ww * c;
    if (ww <= 0 || wh <= 0) return;
    if (plain_crop(b, out_w, out_h)) {
        int x0 = (int)b[0] + wx - ox, y0 = (int)b[1] + wy - oy;
        for (int y = 0; y < wh; y++) memcpy(dst + (size_t)y * dst_stride, PX(src, x0, y0 + y), row_bytes);
        if (flip) flip_rows(dst, dst_stride, ww, wh, c);
        return;
    }
    int need_h = out_w != full_w || b[0] != 0 || b[2] != out_w;
    int need_v = out_h != full_h || b[1] != 0 || b[3] != out_h;
    Coeffs ch, cv;
    resize_coeffs(scr, full_w, full_h, b, out_w, out_h, &ch, &cv);
    scr->coeffs_valid = 0;  // shifted (and maybe mirrored) in place below
    // the window's coefficients, with first taps in src's coordinates
    ch.bounds += 2 * (size_t)wx;
    ch.kk += (size_t)wx * ch.ksize;
    cv.bounds += 2 * (size_t)wy;
    cv.kk += (size_t)wy * cv.ksize;
    for (int i = 0; i < ww; i++) ch.bounds[2 * i] -= ox;
    for (int i = 0; i < wh; i++) cv.bounds[2 * i] -= oy;
    int yfirst = cv.bounds[0];
    int ylast = cv.bounds[2 * wh - 2] + cv.bounds[2 * wh - 1];

    const uint8_t *vin = src->px + (size_t)(wx - ox) * c;  // without a horizontal pass, column x is the image's x
    size_t vin_stride = (size_t)src->stride;
    int mirrored = 0;
    if (need_h) {
        if (flip) {
            mirror_coeffs(&ch, ww);
            mirrored = 1;
        }
        for (int i = 0; i < wh; i++) cv.bounds[2 * i] -= yfirst;
        // Without a vertical pass the window's rows are the intermediate's rows [wy, wy + wh): the identity
        // coefficients' zero-weight second tap would otherwise add a row below the window (the whole image's last
        // row has none, so there rows == out_h either way).
        int rows = need_v ? ylast - yfirst : wh;
        uint8_t *tmp = scratch(scr, RS_TMP, row_bytes * (size_t)(rows > 0 ? rows : 1) + 4);  // + 4: resample_h
        resample_h(src->px, (size_t)src->stride, src->w, src->h, yfirst, c, tmp, row_bytes, ww, rows, &ch, scr);
        vin = tmp;
        vin_stride = row_bytes;
        if (!need_v)  // Pillow returns the intermediate itself (its rows are the output rows here)
            for (int y = 0; y < rows; y++) memcpy(dst + (size_t)y * dst_stride, tmp + (size_t)y * row_bytes, row_bytes);
    }
    if (need_v) {
        resample_v(vin, vin_stride, c, dst, dst_stride, ww, wh, &cv);
    } else if (!need_h) {
        for (int y = 0; y < wh; y++) memcpy(dst + (size_t)y * dst_stride, PX(src, wx - ox, wy - oy + y), row_bytes);
    }
    if (flip && !mirrored) flip_rows(dst, dst_stride, ww, wh, c);
}

void pil_resize_window_source(int full_w, int full_h, const double box[4], int out_w, int out_h, int wx, int wy,
                              int ww, int wh, ResizeScratch *scr, int rect[4]) {
    float b[4] = {(float)box[0], (float)box[1], (float)box[2], (float)box[3]};
    if (plain_crop(b, out_w, out_h)) {
        rect[0] = (int)b[0] + wx;
        rect[1] = (int)b[1] + wy;
        rect[2] = rect[0] + ww;
        rect[3] = rect[1] + wh;
        return;
    }
    int need[2] = {out_w != full_w || b[0] != 0 || b[2] != out_w, out_h != full_h || b[1] != 0 || b[3] != out_h};
    int full[2] = {full_w, full_h}, w0[2] = {wx, wy}, wn[2] = {ww, wh};
    Coeffs cfs[2];
    resize_coeffs(scr, full_w, full_h, b, out_w, out_h, &cfs[0], &cfs[1]);  // left valid for the resize itself
    for (int ax = 0; ax < 2; ax++) {
        int lo = w0[ax], hi = w0[ax] + wn[ax];  // identity along an axis without a pass
        if (need[ax]) {
            const Coeffs cf = cfs[ax];
            lo = full[ax];
            hi = 0;
            for (int i = w0[ax]; i < w0[ax] + wn[ax]; i++) {
                int x0 = cf.bounds[2 * i], x1 = x0 + cf.bounds[2 * i + 1];
                lo = x0 < lo ? x0 : lo;
                hi = x1 > hi ? x1 : hi;
            }
            if (hi <= lo) hi = lo + 1;
        }
        rect[ax] = lo;
        rect[ax + 2] = hi;
    }
}

void pil_resize_bilinear_window(const Image *src, int ox, int oy, int full_w, int full_h, const double box[4],
                                int out_w, int out_h, int wx, int wy, int ww, int wh, uint8_t *dst, size_t dst_stride,
                                ResizeScratch *scr) {
    resize_window(src, ox, oy, full_w, full_h, box, out_w, out_h, wx, wy, ww, wh, 0, dst, dst_stride, scr);
}

void pil_resize_bilinear_to(const Image *src, const double box[4], int out_w, int out_h, int flip, uint8_t *dst,
                            size_t dst_stride, ResizeScratch *scr) {
    resize_window(src, 0, 0, src->w, src->h, box, out_w, out_h, 0, 0, out_w, out_h, flip, dst, dst_stride, scr);
}

void pil_resize_bilinear(const Image *src, const double box[4], int out_w, int out_h, Image *dst) {
    ResizeScratch scr = {0};
    image_reserve(dst, out_w, out_h, src->c);
    pil_resize_bilinear_to(src, box, out_w, out_h, 0, dst->px, (size_t)dst->stride, &scr);
    resize_scratch_free(&scr);
}

// ------------------------------------------------------------------------------------------------ geometry

void rrc_params(Rng *r, int W, int H, int *x, int *y, int *w, int *h) {
    double area = (double)H * (double)W;
    const double lr0 = log(3.0 / 4.0), lr1 = log(4.0 / 3.0);
    for (int attempt = 0; attempt < 10; attempt++) {
        double target = area * (0.08 + (1.0 - 0.08) * rng_uniform(r));
        double ratio = exp(lr0 + (lr1 - lr0) * rng_uniform(r));
        int ww = (int)rint(sqrt(target * ratio));
        int hh = (int)rint(sqrt(target / ratio));
        if (0 < ww && ww <= W && 0 < hh && hh <= H) {
            *y = (int)rng_below(r, (uint64_t)(H - hh + 1));
            *x = (int)rng_below(r, (uint64_t)(W - ww + 1));
            *w = ww;
            *h = hh;
            return;
        }
    }
    double in_ratio = (double)W / (double)H;
    int ww, hh;
    if (in_ratio < 3.0 / 4.0) {
        ww = W;
        hh = (int)rint(ww / (3.0 / 4.0));
    } else if (in_ratio > 4.0 / 3.0) {
        hh = H;
        ww = (int)rint(hh * (4.0 / 3.0));
    } else {
        ww = W;
        hh = H;
    }
    *y = (H - hh) / 2;  // both >= 0 here: Python's // equals C's /
    *x = (W - ww) / 2;
    *w = ww;
    *h = hh;
}

void resize_short_size(int W, int H, int size, int *out_w, int *out_h) {
    int s = W <= H ? W : H, l = W <= H ? H : W;
    int nl = (int)((double)size * l / s);  // Python int(size * long / short): true division, truncation
    if (W <= H) {
        *out_w = size;
        *out_h = nl;
    } else {
        *out_w = nl;
        *out_h = size;
    }
}

void center_crop_pos(int W, int H, int size, int *x, int *y) {
    *y = (int)rint((H - size) / 2.0);
    *x = (int)rint((W - size) / 2.0);
}

void random_crop_pad(const Image *src, int size, int pad, Rng *r, Image *dst) {
    int PH = src->h + 2 * pad, PW = src->w + 2 * pad;
    int i = 0, j = 0;
    if (!(PW == size && PH == size)) {  // torchvision draws nothing when the padded image is the crop
        i = (int)rng_below(r, (uint64_t)(PH - size + 1));
        j = (int)rng_below(r, (uint64_t)(PW - size + 1));
    }
    int c = src->c;
    image_reserve(dst, size, size, c);
    for (int y = 0; y < size; y++) {
        uint8_t *o = PX(dst, 0, y);
        int sy = i + y - pad;
        if (sy < 0 || sy >= src->h) {
            memset(o, 0, (size_t)size * c);
            continue;
        }
        for (int x = 0; x < size; x++) {
            int sx = j + x - pad;
            if (sx < 0 || sx >= src->w)
                memset(o + x * c, 0, (size_t)c);
            else
                px_copy(o + x * c, PX(src, sx, sy), c);
        }
    }
}

void hflip(Image *im) { flip_rows(im->px, (size_t)im->stride, im->w, im->h, im->c); }

// ------------------------------------------------------------------------------------------------ PIL AFFINE
// Image.transform(size, AFFINE, a, NEAREST) with a zero fill: Geometry.c's ImagingTransformAffine. a maps
// output pixel centres (x + 0.5, y + 0.5) to input coordinates. Pillow picks one of three engines, and they
// differ in rounding, so all three are reproduced.

#define COORD(v) ((v) < 0.0 ? -1 : ((int)(v)))
#define FLOORI(v) ((v) < 0.0 ? ((int)floor(v)) : ((int)(v)))

static int check_fixed(const double a[6], int x, int y) {
    return fabs(x * a[0] + y * a[1] + a[2]) < 32768.0 && fabs(x * a[3] + y * a[4] + a[5]) < 32768.0;
}

static void pil_affine_nearest(const Image *src, const double a[6], Image *dst) {
    int W = src->w, H = src->h, c = src->c;
    image_reserve(dst, W, H, c);
    for (int y = 0; y < H; y++) memset(PX(dst, 0, y), 0, (size_t)W * c);
    if (a[1] == 0 && a[3] == 0) {  // ImagingScaleAffine
        int *xintab = xcalloc(sizeof(int) * (size_t)(W > 0 ? W : 1), "affine table");
        double xo = a[2] + a[0] * 0.5, yo = a[5] + a[4] * 0.5;
        int xmin = W, xmax = 0;
        for (int x = 0; x < W; x++) {
            int xin = COORD(xo);
            if (xin >= 0 && xin < W) {
                xmax = x + 1;
                if (x < xmin) xmin = x;
                xintab[x] = xin;
            }
            xo += a[0];
        }
        // A translation maps consecutive output pixels to consecutive input pixels: then each row is one copy.
        int runs = xmin < xmax;
        for (int x = xmin + 1; x < xmax && runs; x++) runs = xintab[x] == xintab[x - 1] + 1;
        for (int y = 0; y < H; y++) {
            int yi = COORD(yo);
            if (yi >= 0 && yi < H) {
                uint8_t *o = PX(dst, 0, y);
                const uint8_t *row = PX(src, 0, yi);
                if (runs) {
                    memcpy(o + (size_t)xmin * c, row + (size_t)xintab[xmin] * c, (size_t)(xmax - xmin) * c);
                } else if (c == 3) {
                    for (int x = xmin; x < xmax; x++) {
                        const uint8_t *q = row + 3 * (size_t)xintab[x];
                        o[3 * x] = q[0];
                        o[3 * x + 1] = q[1];
                        o[3 * x + 2] = q[2];
                    }
                } else {
                    for (int x = xmin; x < xmax; x++) px_copy(o + x * c, row + (size_t)xintab[x] * c, c);
                }
            }
            yo += a[4];
        }
        free(xintab);
        return;
    }
    if (check_fixed(a, 0, 0) && check_fixed(a, W, H) && check_fixed(a, 0, H) && check_fixed(a, W, 0)) {
        // affine_fixed: 16.16 fixed point
#define FIX(v) FLOORI((v)*65536.0 + 0.5)
        int a0 = FIX(a[0]), a1 = FIX(a[1]), a3 = FIX(a[3]), a4 = FIX(a[4]);
        int a2 = FIX(a[2] + a[0] * 0.5 + a[1] * 0.5);
        int a5 = FIX(a[5] + a[3] * 0.5 + a[4] * 0.5);
#undef FIX
        for (int y = 0; y < H; y++) {
            int xx = a2, yy = a5;
            uint8_t *o = PX(dst, 0, y);
            if (c == 3) {  // RGB: one unsigned compare per coordinate, the row pointer from one multiply
                const uint8_t *base = src->px;
                size_t stride = (size_t)src->stride;
                int x = 0;
#ifdef __AVX2__
                // 8 pixels at a time: the same xx >> 16, yy >> 16 (a2 + x a0 exactly: the sums never overflow, as
                // check_fixed bounds every coordinate), one 4-byte gather per pixel inside the image, 0 outside
                // (dst starts zeroed), then R G B of each. The gather reads one byte past a pixel, so the image's
                // last pixel, whose fourth byte would be past the buffer, is copied on its own.
                if (stride * (size_t)H < ((size_t)1 << 31)) {
                    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), minus1 = _mm256_set1_epi32(-1);
                    const __m256i squeeze = _mm256_setr_epi8(0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1,  //
                                                             0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1);
                    const __m256i join = _mm256_setr_epi32(0, 1, 2, 4, 5, 6, 7, 7);
                    const __m256i vW = _mm256_set1_epi32(W), vH = _mm256_set1_epi32(H);
                    const __m256i vs = _mm256_set1_epi32((int)stride), three = _mm256_set1_epi32(3);
                    const __m256i last = _mm256_set1_epi32((int)((size_t)(H - 1) * stride + 3 * (size_t)(W - 1)));
                    __m256i vx = _mm256_add_epi32(_mm256_set1_epi32(xx), _mm256_mullo_epi32(lane, _mm256_set1_epi32(a0)));
                    __m256i vy = _mm256_add_epi32(_mm256_set1_epi32(yy), _mm256_mullo_epi32(lane, _mm256_set1_epi32(a3)));
                    const __m256i dx = _mm256_set1_epi32((int)((unsigned)a0 * 8u)), dy = _mm256_set1_epi32((int)((unsigned)a3 * 8u));
                    for (; x + 8 <= W; x += 8, o += 24) {
                        __m256i xi = _mm256_srai_epi32(vx, 16), yi = _mm256_srai_epi32(vy, 16);
                        __m256i ok = _mm256_and_si256(
                            _mm256_and_si256(_mm256_cmpgt_epi32(vW, xi), _mm256_cmpgt_epi32(xi, minus1)),
                            _mm256_and_si256(_mm256_cmpgt_epi32(vH, yi), _mm256_cmpgt_epi32(yi, minus1)));
                        __m256i off = _mm256_add_epi32(_mm256_mullo_epi32(yi, vs), _mm256_mullo_epi32(xi, three));
                        __m256i tail = _mm256_and_si256(ok, _mm256_cmpeq_epi32(off, last));
                        __m256i g = _mm256_mask_i32gather_epi32(_mm256_setzero_si256(), (const int *)base, off,
                                                                _mm256_andnot_si256(tail, ok), 1);
                        // R G B of each lane (12 bytes per 128-bit lane), then the two lanes' 12 bytes side by side:
                        // exactly 24 bytes stored, nothing past the group
                        __m256i u = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(g, squeeze), join);
                        _mm_storeu_si128((__m128i *)o, _mm256_castsi256_si128(u));
                        _mm_storel_epi64((__m128i *)(o + 16), _mm256_extracti128_si256(u, 1));
                        int tm = _mm256_movemask_ps(_mm256_castsi256_ps(tail));
                        if (tm) {
                            int k = __builtin_ctz((unsigned)tm);
                            memcpy(o + 3 * k, base + (size_t)(H - 1) * stride + 3 * (size_t)(W - 1), 3);
                        }
                        vx = _mm256_add_epi32(vx, dx);
                        vy = _mm256_add_epi32(vy, dy);
                    }
                    xx = (int)((unsigned)a2 + (unsigned)x * (unsigned)a0);
                    yy = (int)((unsigned)a5 + (unsigned)x * (unsigned)a3);
                }
#endif
                for (; x < W; x++, o += 3) {
                    unsigned xin = (unsigned)(xx >> 16), yin = (unsigned)(yy >> 16);
                    if (xin < (unsigned)W && yin < (unsigned)H) {
                        const uint8_t *q = base + yin * stride + 3 * (size_t)xin;
                        o[0] = q[0];
                        o[1] = q[1];
                        o[2] = q[2];
                    }
                    xx += a0;
                    yy += a3;
                }
            } else {
                for (int x = 0; x < W; x++) {
                    int xin = xx >> 16;
                    if (xin >= 0 && xin < W) {
                        int yin = yy >> 16;
                        if (yin >= 0 && yin < H) px_copy(o + x * c, PX(src, xin, yin), c);
                    }
                    xx += a0;
                    yy += a3;
                }
            }
            a2 += a1;
            a5 += a4;
        }
        return;
    }
    double xo = a[2] + a[1] * 0.5 + a[0] * 0.5, yo = a[5] + a[4] * 0.5 + a[3] * 0.5;
    for (int y = 0; y < H; y++) {
        double xx = xo, yy = yo;
        uint8_t *o = PX(dst, 0, y);
        for (int x = 0; x < W; x++) {
            int xin = COORD(xx);
            if (xin >= 0 && xin < W) {
                int yin = COORD(yy);
                if (yin >= 0 && yin < H) px_copy(o + x * c, PX(src, xin, yin), c);
            }
            xx += a[0];
            yy += a[3];
        }
        xo += a[1];
        yo += a[4];
    }
}

// CPython's math.radians / math.degrees constants.
static const double DEG2RAD = 3.141592653589793238462643383279502884 / 180.0;
static const double RAD2DEG = 180.0 / 3.141592653589793238462643383279502884;

// torchvision functional._get_inverse_affine_matrix (inverted = True), angles and shears in degrees.
static void tv_inverse_affine(double cx, double cy, double angle, double tx, double ty, double scale, double shx,
                              double shy, double m[6]) {
    double rot = angle * DEG2RAD, sx = shx * DEG2RAD, sy = shy * DEG2RAD;
    double a = cos(rot - sy) / cos(sy);
    double b = -cos(rot - sy) * tan(sx) / cos(sy) - sin(rot);
    double c = sin(rot - sy) / cos(sy);
    double d = -sin(rot - sy) * tan(sx) / cos(sy) + cos(rot);
    m[0] = d / scale;
    m[1] = -b / scale;
    m[2] = 0.0 / scale;
    m[3] = -c / scale;
    m[4] = a / scale;
    m[5] = 0.0 / scale;
    m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty);
    m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty);
    m[2] += cx;
    m[5] += cy;
}

// Python's round(v, 15): correctly rounded to 15 decimals, as glibc's printf rounds the exact binary value.
static double round15(double v) {
    char buf[64];
    snprintf(buf, sizeof buf, "%.15f", v);
    return strtod(buf, NULL);
}

// Python float modulo (result takes the divisor's sign).
static double py_fmod(double v, double m) {
    double r = fmod(v, m);
    if (r != 0.0 && ((m < 0) != (r < 0))) r += m;
    return r;
}

// Image.rotate(angle, NEAREST, expand=False, center=None, fillcolor=0), as torchvision's F.rotate calls it on a
// PIL image: counter-clockwise about (W/2, H/2), with Pillow's fast paths for multiples of 90 degrees.
static void pil_rotate(Image *im, double angle, Image *tmp) {
    int W = im->w, H = im->h, c = im->c;
    angle = py_fmod(angle, 360.0);
    if (angle == 0) return;
    if (angle == 180 || ((angle == 90 || angle == 270) && W == H)) {
        copy_image(im, tmp);
        for (int y = 0; y < H; y++)
            for (int x = 0; x < W; x++) {
                int sx, sy;
                if (angle == 180) {
                    sx = W - 1 - x;
                    sy = H - 1 - y;
                } else if (angle == 90) {  // ROTATE_90: counter-clockwise
                    sx = W - 1 - y;
                    sy = x;
                } else {  // ROTATE_270
                    sx = y;
                    sy = H - 1 - x;
                }
                px_copy(PX(im, x, y), PX(tmp, sx, sy), c);
            }
        return;
    }
    double cx = W / 2.0, cy = H / 2.0;
    double r = -(angle * DEG2RAD);
    double m[6] = {round15(cos(r)), round15(sin(r)), 0.0, round15(-sin(r)), round15(cos(r)), 0.0};
    double x0 = -cx - 0, y0 = -cy - 0;
    double t2 = m[0] * x0 + m[1] * y0 + m[2];
    double t5 = m[3] * x0 + m[4] * y0 + m[5];
    m[2] = t2 + cx;
    m[5] = t5 + cy;
    copy_image(im, tmp);
    pil_affine_nearest(tmp, m, im);
}

static void tv_affine(Image *im, const double m[6], Image *tmp) {
    copy_image(im, tmp);
    pil_affine_nearest(tmp, m, im);
}

// ------------------------------------------------------------------------------------------------ colour ops

// Image.blend(degenerate, im, alpha) (Blend.c: alpha is single precision) on n bytes: out = d + alpha * (p - d) in
// float, truncated, clipped to 0..255 (for 0 <= alpha <= 1 the value is in range and Pillow skips the clip). d is
// per byte, or the constant dc when d is NULL. The AVX2 path does the same single-precision operations in the same
// order (no fused multiply-add): p - d exactly in int32, then one rounding for the product and one for the sum;
// cvttps truncates toward zero and the saturating packs give the clip (a value in (-1, 0) truncates to 0 like the
// scalar code; below, or at 256 and above, the packs saturate to 0 or 255).
static void blend_bytes(uint8_t *p, const uint8_t *d, uint8_t dc, size_t n, float alpha) {
    size_t i = 0;
#ifdef __AVX2__
    const __m256 va = _mm256_set1_ps(alpha);
    const __m256i vdc = _mm256_set1_epi32(dc);
    for (; i + 16 <= n; i += 16) {
        __m256i r[2];
        for (int h = 0; h < 2; h++) {
            __m256i pi = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + i + 8 * h)));
            __m256i di = d ? _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(d + i + 8 * h))) : vdc;
            __m256 t = _mm256_add_ps(_mm256_cvtepi32_ps(di),
                                     _mm256_mul_ps(va, _mm256_cvtepi32_ps(_mm256_sub_epi32(pi, di))));
            r[h] = _mm256_cvttps_epi32(t);
        }
        __m256i w = _mm256_packs_epi32(r[0], r[1]);  // per lane: r0 lo, r1 lo | r0 hi, r1 hi
        __m128i b = _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
        // b holds r0[0..3], r1[0..3], r0[4..7], r1[4..7]: back to byte order
        b = _mm_shuffle_epi32(b, _MM_SHUFFLE(3, 1, 2, 0));
        _mm_storeu_si128((__m128i *)(p + i), b);
    }
#endif
    for (; i < n; i++) {
        int dv = d ? d[i] : dc;
        float t = (float)(dv + alpha * ((int)p[i] - dv));
        p[i] = t <= 0.0 ? 0 : t >= 255.0 ? 255 : (uint8_t)t;
    }
}

// Image.blend(degenerate, im, alpha) in place on im.
static void pil_blend_into(Image *im, const Image *deg, float alpha) {
    if (alpha == 1.0f) return;
    size_t n = (size_t)im->w * im->c;
    for (int y = 0; y < im->h; y++) {
        if (alpha == 0.0f)
            memcpy(PX(im, 0, y), PX(deg, 0, y), n);
        else
            blend_bytes(PX(im, 0, y), PX(deg, 0, y), 0, n, alpha);
    }
}

// The same with a constant degenerate image (every byte dc).
static void pil_blend_const(Image *im, uint8_t dc, float alpha) {
    if (alpha == 1.0f) return;
    size_t n = (size_t)im->w * im->c;
    for (int y = 0; y < im->h; y++) {
        if (alpha == 0.0f)
            memset(PX(im, 0, y), dc, n);
        else
            blend_bytes(PX(im, 0, y), NULL, dc, n, alpha);
    }
}

static inline uint8_t rgb_to_l(const uint8_t *p) {
    return (uint8_t)((p[0] * 19595 + p[1] * 38470 + p[2] * 7471 + 0x8000) >> 16);
}

// ImageFilter.SMOOTH (Filter.c's 3x3 path, single precision), border pixels copied. Every interior byte is
// offset + (row below) + (row) + (row above), each row's three products added left to right, as Filter.c does;
// the AVX2 path runs those operations 8 bytes at a time (a pixel's neighbours are c bytes away).
static void pil_smooth(const Image *src, Image *dst) {
    int W = src->w, H = src->h, c = src->c;
    copy_image(src, dst);
    if (W < 3 || H < 3) return;
    const float k1 = 1.0f / 13.0f, k5 = 5.0f / 13.0f;
    const float kern[9] = {k1, k1, k1, k1, k5, k1, k1, k1, k1};
    const float offset = 0.0f + 0.5f;
    int i_end = (W - 1) * c;  // interior bytes [c, i_end)
    for (int y = 1; y < H - 1; y++) {
        const uint8_t *rm = PX(src, 0, y - 1), *r0 = PX(src, 0, y), *rp = PX(src, 0, y + 1);
        uint8_t *o = PX(dst, 0, y);
        int i = c;
#ifdef __AVX2__
        const __m256 K1 = _mm256_set1_ps(k1), K5 = _mm256_set1_ps(k5), OFF = _mm256_set1_ps(offset);
#define LD8(ptr) _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(ptr))))
        for (; i + 8 <= i_end; i += 8) {
            __m256 ss = OFF;
            __m256 t = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(LD8(rp + i - c), K1), _mm256_mul_ps(LD8(rp + i), K1)),
                                     _mm256_mul_ps(LD8(rp + i + c), K1));
            ss = _mm256_add_ps(ss, t);
            t = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(LD8(r0 + i - c), K1), _mm256_mul_ps(LD8(r0 + i), K5)),
                              _mm256_mul_ps(LD8(r0 + i + c), K1));
            ss = _mm256_add_ps(ss, t);
            t = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(LD8(rm + i - c), K1), _mm256_mul_ps(LD8(rm + i), K1)),
                              _mm256_mul_ps(LD8(rm + i + c), K1));
            ss = _mm256_add_ps(ss, t);
            // ss > 0 here: truncation, then the saturating packs clip at 255
            __m256i v = _mm256_cvttps_epi32(ss);
            __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
            _mm_storel_epi64((__m128i *)(o + i), _mm_packus_epi16(w, w));
        }
#undef LD8
#endif
        for (; i < i_end; i++) {
            float ss = offset;
            ss += (float)rp[i - c] * kern[0] + (float)rp[i] * kern[1] + (float)rp[i + c] * kern[2];
            ss += (float)r0[i - c] * kern[3] + (float)r0[i] * kern[4] + (float)r0[i + c] * kern[5];
            ss += (float)rm[i - c] * kern[6] + (float)rm[i] * kern[7] + (float)rm[i + c] * kern[8];
            o[i] = ss <= 0.0 ? 0 : ss >= 255.0 ? 255 : (uint8_t)ss;
        }
    }
}

static void enhance(Image *im, RaOp op, double factor, Image *tmp) {
    int W = im->w, H = im->h, c = im->c;
    float alpha = (float)factor;
    if (op == RA_BRIGHTNESS) {  // blend with black
        pil_blend_const(im, 0, alpha);
    } else if (op == RA_COLOR) {  // blend with the image's L replicated (a grey image is its own L)
        if (c != 3) return;
        image_reserve(tmp, W, H, c);
        for (int y = 0; y < H; y++) {
            const uint8_t *p = PX(im, 0, y);
            uint8_t *q = PX(tmp, 0, y);
            for (int x = 0; x < W; x++, p += 3, q += 3) q[0] = q[1] = q[2] = rgb_to_l(p);
        }
        pil_blend_into(im, tmp, alpha);
    } else if (op == RA_CONTRAST) {  // blend with the rounded mean of L: the sum of L is the histogram's sum
        long long sum = 0;
        for (int y = 0; y < H; y++) {
            const uint8_t *p = PX(im, 0, y);
            if (c == 3)
                for (int x = 0; x < W; x++, p += 3) sum += rgb_to_l(p);
            else
                for (int x = 0; x < W; x++) sum += p[x];
        }
        double mean = (double)sum / (double)((long long)W * H);
        pil_blend_const(im, (uint8_t)(int)(mean + 0.5), alpha);
    } else {  // RA_SHARPNESS
        pil_smooth(im, tmp);
        pil_blend_into(im, tmp, alpha);
    }
}

// A table per channel.
static void apply_lut(Image *im, const uint8_t lut[][256]) {
    int c = im->c;
    for (int y = 0; y < im->h; y++) {
        uint8_t *p = PX(im, 0, y);
        if (c == 3) {
            for (int x = 0; x < im->w; x++, p += 3) {
                p[0] = lut[0][p[0]];
                p[1] = lut[1][p[1]];
                p[2] = lut[2][p[2]];
            }
        } else {
            for (int x = 0; x < im->w; x++)
                for (int ch = 0; ch < c; ch++) p[x * c + ch] = lut[ch][p[x * c + ch]];
        }
    }
}

// Per-channel histograms. RGB counts even and odd pixels into separate tables (added at the end), so that runs of
// equal bytes, common in real images, do not chain every increment through the same memory word.
static void channel_hist(const Image *im, long long hist[][256]) {
    int c = im->c;
    memset(hist, 0, sizeof(long long) * 256 * (size_t)c);
    if (c == 3) {
        uint32_t h[2][3][256];
        memset(h, 0, sizeof h);
        for (int y = 0; y < im->h; y++) {
            const uint8_t *p = PX(im, 0, y);
            int x = 0;
            for (; x + 2 <= im->w; x += 2, p += 6) {
                h[0][0][p[0]]++;
                h[0][1][p[1]]++;
                h[0][2][p[2]]++;
                h[1][0][p[3]]++;
                h[1][1][p[4]]++;
                h[1][2][p[5]]++;
            }
            if (x < im->w) {
                h[0][0][p[0]]++;
                h[0][1][p[1]]++;
                h[0][2][p[2]]++;
            }
        }
        for (int ch = 0; ch < 3; ch++)
            for (int i = 0; i < 256; i++) hist[ch][i] = (long long)h[0][ch][i] + h[1][ch][i];
        return;
    }
    for (int y = 0; y < im->h; y++) {
        const uint8_t *p = PX(im, 0, y);
        for (int x = 0; x < im->w; x++)
            for (int ch = 0; ch < c; ch++) hist[ch][p[x * c + ch]]++;
    }
}

static inline uint8_t clip8_int(long long v) { return v <= 0 ? 0 : v < 256 ? (uint8_t)v : 255; }

// ImageOps.autocontrast(image) with cutoff 0, no ignore.
static void autocontrast(Image *im) {
    long long hist[4][256];
    uint8_t lut[4][256];
    channel_hist(im, hist);
    for (int ch = 0; ch < im->c; ch++) {
        int lo, hi;
        for (lo = 0; lo < 255 && !hist[ch][lo]; lo++) {}
        for (hi = 255; hi > 0 && !hist[ch][hi]; hi--) {}
        if (hi <= lo) {
            for (int i = 0; i < 256; i++) lut[ch][i] = (uint8_t)i;
        } else {
            double scale = 255.0 / (hi - lo);
            double offset = -lo * scale;
            for (int i = 0; i < 256; i++) {
                long long v = (long long)(i * scale + offset);
                lut[ch][i] = v < 0 ? 0 : v > 255 ? 255 : (uint8_t)v;
            }
        }
    }
    apply_lut(im, (const uint8_t(*)[256])lut);
}

// ImageOps.equalize(image): per channel; the step is (count - count of the top level) // 255, and Image.point
// clips the table to 0..255.
static void equalize(Image *im) {
    long long hist[4][256];
    uint8_t lut[4][256];
    channel_hist(im, hist);
    for (int ch = 0; ch < im->c; ch++) {
        long long total = 0, last = 0;
        int nonzero = 0;
        for (int i = 0; i < 256; i++)
            if (hist[ch][i]) {
                nonzero++;
                total += hist[ch][i];
                last = hist[ch][i];
            }
        long long step = nonzero <= 1 ? 0 : (total - last) / 255;
        if (!step) {
            for (int i = 0; i < 256; i++) lut[ch][i] = (uint8_t)i;
        } else {
            long long n = step / 2;
            for (int i = 0; i < 256; i++) {
                lut[ch][i] = clip8_int(n / step);
                n += hist[ch][i];
            }
        }
    }
    apply_lut(im, (const uint8_t(*)[256])lut);
}

// ------------------------------------------------------------------------------------------------ RandAugment

void ra_apply(Image *im, RaOp op, double value, Image *tmp) {
    double m[6];
    switch (op) {
    case RA_IDENTITY:
        return;
    case RA_SHEAR_X:
        tv_inverse_affine(0, 0, 0.0, 0, 0, 1.0, atan(value) * RAD2DEG, 0.0, m);
        tv_affine(im, m, tmp);
        return;
    case RA_SHEAR_Y:
        tv_inverse_affine(0, 0, 0.0, 0, 0, 1.0, 0.0, atan(value) * RAD2DEG, m);
        tv_affine(im, m, tmp);
        return;
    case RA_TRANSLATE_X:
        tv_inverse_affine(im->w * 0.5, im->h * 0.5, 0.0, (double)(long long)value, 0, 1.0, 0.0, 0.0, m);
        tv_affine(im, m, tmp);
        return;
    case RA_TRANSLATE_Y:
        tv_inverse_affine(im->w * 0.5, im->h * 0.5, 0.0, 0, (double)(long long)value, 1.0, 0.0, 0.0, m);
        tv_affine(im, m, tmp);
        return;
    case RA_ROTATE:
        pil_rotate(im, value, tmp);
        return;
    case RA_BRIGHTNESS:
    case RA_COLOR:
    case RA_CONTRAST:
    case RA_SHARPNESS:
        enhance(im, op, 1.0 + value, tmp);
        return;
    case RA_POSTERIZE: {  // keep the top bits: a mask on every byte (vectorized by the compiler)
        int bits = (int)value;
        uint8_t mask = (uint8_t)~((1 << (8 - bits)) - 1);
        size_t n = (size_t)im->w * im->c;
        for (int y = 0; y < im->h; y++) {
            uint8_t *p = PX(im, 0, y);
            for (size_t i = 0; i < n; i++) p[i] &= mask;
        }
        return;
    }
    case RA_SOLARIZE: {  // invert the bytes at or above the threshold: i < value <=> i < ceil(value) for integers i
        double cv = ceil(value);
        int thr = cv <= 0 ? 0 : cv >= 256 ? 256 : (int)cv;
        if (thr >= 256) return;
        uint8_t t = (uint8_t)thr;
        size_t n = (size_t)im->w * im->c;
        for (int y = 0; y < im->h; y++) {
            uint8_t *p = PX(im, 0, y);
            for (size_t i = 0; i < n; i++) p[i] = p[i] >= t ? (uint8_t)(255 - p[i]) : p[i];
        }
        return;
    }
    case RA_AUTOCONTRAST:
        autocontrast(im);
        return;
    case RA_EQUALIZE:
        equalize(im);
        return;
    default:
        return;
    }
}

// torch.linspace(start, end, bins)[idx] in float32 (the scalar kernel: from the start in the first half, from
// the end in the second). torch's vectorised kernel can round some later bins differently; bins 0..7 and 10 of
// 31 agree for every range used here (checked against torch 1.13).
static double linspace_f32(double start, double end, int bins, int idx) {
    float s = (float)start, e = (float)end;
    if (bins <= 1) return s;
    float step = (e - s) / (float)(bins - 1);
    if (idx < bins / 2) return (float)(s + step * (float)idx);
    return (float)(e - step * (float)(bins - idx - 1));
}

double ra_value(RaOp op, int magnitude, int bins, int w, int h) {
    switch (op) {
    case RA_SHEAR_X:
    case RA_SHEAR_Y:
        return linspace_f32(0.0, 0.3, bins, magnitude);
    case RA_TRANSLATE_X:
        return linspace_f32(0.0, 150.0 / 331.0 * w, bins, magnitude);
    case RA_TRANSLATE_Y:
        return linspace_f32(0.0, 150.0 / 331.0 * h, bins, magnitude);
    case RA_ROTATE:
        return linspace_f32(0.0, 30.0, bins, magnitude);
    case RA_BRIGHTNESS:
    case RA_COLOR:
    case RA_CONTRAST:
    case RA_SHARPNESS:
        return linspace_f32(0.0, 0.9, bins, magnitude);
    case RA_POSTERIZE: {
        // 8 - (arange(bins) / ((bins - 1) / 4)).round().int(), in float32
        float q = (float)magnitude / (float)((bins - 1) / 4.0);
        return 8 - (int)rintf(q);
    }
    case RA_SOLARIZE:
        return linspace_f32(255.0, 0.0, bins, magnitude);
    default:
        return 0.0;
    }
}

static int ra_signed(RaOp op) { return op >= RA_SHEAR_X && op <= RA_SHARPNESS; }

void randaugment(Image *im, Rng *r, int num_ops, int magnitude, int bins, Image *tmp) {
    for (int k = 0; k < num_ops; k++) {
        RaOp op = (RaOp)rng_below(r, RA_NUM_OPS);
        double v = ra_value(op, magnitude, bins, im->w, im->h);
        if (ra_signed(op) && rng_uniform(r) < 0.5) v = -v;
        ra_apply(im, op, v, tmp);
    }
}

// ------------------------------------------------------------------------------------------------ normalize

// The 256 values ((float)u / 255 - m) / s of one channel, each by the same fp32 operations as the expression
// itself, so that a lookup gives the expression's bits (and 3 loads per pixel instead of 6 divisions).
static void norm_table(float m, float s, float t[256]) {
    for (int u = 0; u < 256; u++) t[u] = ((float)u / 255.0f - m) / s;
}

// n pixels of c channels (HWC bytes at in) into the planes out + ch * plane (CHW), through the tables.
static void normalize_run(const uint8_t *in, int c, size_t n, const float (*t)[256], float *out, size_t plane) {
    if (c == 3) {
        float *o0 = out, *o1 = out + plane, *o2 = out + 2 * plane;
        for (size_t i = 0; i < n; i++) {
            o0[i] = t[0][in[3 * i]];
            o1[i] = t[1][in[3 * i + 1]];
            o2[i] = t[2][in[3 * i + 2]];
        }
        return;
    }
    for (int ch = 0; ch < c; ch++)
        for (size_t i = 0; i < n; i++) out[ch * plane + i] = t[ch][in[i * c + ch]];
}

void normalize_u8_hwc(const uint8_t *in, int C, int H, int W, const float *mean, const float *std, float *out) {
    float t[4][256];
    CHECK(C >= 1 && C <= 3, "normalize_u8_hwc: %d channels (mean and std have 3)", C);
    for (int ch = 0; ch < C; ch++) norm_table(mean[ch], std[ch], t[ch]);
    normalize_run(in, C, (size_t)W * H, (const float(*)[256])t, out, (size_t)W * H);
}

void image_to_hwc(const Image *im, uint8_t *out) {
    size_t row = (size_t)im->w * im->c;
    for (int y = 0; y < im->h; y++) memcpy(out + (size_t)y * row, PX(im, 0, y), row);
}

void normalize_chw(const Image *im, const float *mean, const float *std, float *out) {
    int W = im->w, H = im->h, c = im->c;
    size_t plane = (size_t)W * H;
    float t[4][256];
    CHECK(c >= 1 && c <= 4, "normalize_chw: %d channels", c);
    for (int ch = 0; ch < c; ch++) norm_table(mean[ch], std[ch], t[ch]);
    for (int y = 0; y < H; y++)
        normalize_run(PX(im, 0, y), c, (size_t)W, (const float(*)[256])t, out + (size_t)y * W, plane);
}
