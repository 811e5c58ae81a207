// test_jpeg.c: the crop-aware JPEG decoder (src/data/jpeg.c) against spec/data.md §3, §5.4 and §6.
// Fixtures are real JPEGs made in the test: TurboJPEG (tjCompress2) for 4:4:4, 4:2:2, 4:2:0, 4:4:0, 4:1:1, grey and
// YCCK (TJPF_CMYK), baseline and progressive, at odd and even sizes; the libjpeg compression API for plain CMYK,
// restart intervals and a progressive file with more than 500 scans. Checks:
//   - a full decode equals tjDecompress2 (ISLOW IDCT, fancy upsampling) bit for bit;
//   - 200 random crops per kind (edges included) equal the full decode's crop at 1/1, and at 1/2, 1/4, 1/8 the crop
//     of tjDecompress2 at the same scaling factor, with the box where the crop maps;
//   - grey gives R = G = B = the grey decode; CMYK/YCCK give Pillow's CMYK;I -> RGB of the stored CMYK;
//   - a corrupt-file corpus gives the expected status, with no crash and no stall (each file under a time limit, the
//     whole program under alarm()), and one decoder reused across good and bad files keeps decoding exactly.
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <jpeglib.h>
#include <turbojpeg.h>

#include "data/jpeg.h"
#include "testlib.h"

// ---------------------------------------------------------------- helpers

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t rnd(void) {  // xorshift64*
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1Dull;
}
static int rndi(int n) { return (int)(rnd() % (uint64_t)n); }

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

typedef struct {
    uint8_t *p;
    size_t n;
} Buf;

// A photo-like test image with nc channels: smooth gradients, edges and some noise, so that every subsampling and
// the fancy upsampler have something to do.
static uint8_t *make_pixels(int w, int h, int nc, uint32_t seed) {
    uint8_t *px = malloc((size_t)w * h * nc);
    uint64_t s = seed * 2654435761u + 1;
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++)
            for (int c = 0; c < nc; c++) {
                s = s * 6364136223846793005ull + 1442695040888963407ull;
                int noise = (int)((s >> 33) % 41) - 20;
                int v = (x * (37 + 11 * c)) / (w > 1 ? w : 1) * 4 + (y * (23 + 7 * c)) / (h > 1 ? h : 1) * 3;
                if (((x / 7) + (y / 5) + c) % 3 == 0) v += 60;
                v += noise;
                px[((size_t)y * w + x) * nc + c] = (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
            }
    return px;
}

static Buf tj_encode(const uint8_t *px, int w, int h, int pf, int samp, int quality, int flags) {
    tjhandle t = tjInitCompress();
    unsigned char *jb = NULL;
    unsigned long n = 0;
    if (tjCompress2(t, px, w, 0, h, pf, &jb, &n, samp, quality, flags | TJFLAG_ACCURATEDCT) != 0) {
        fprintf(stderr, "tjCompress2: %s\n", tjGetErrorStr2(t));
        exit(1);
    }
    tjDestroy(t);
    Buf b = {malloc(n), n};
    memcpy(b.p, jb, n);
    tjFree(jb);
    return b;
}

// tjDecompress2 of the whole image at 1/denom into pixel format pf: *ow x *oh. NULL if TurboJPEG would not pick
// exactly 1/denom for these dimensions (it picks the largest factor whose output fits).
static uint8_t *tj_decode(const Buf *b, int denom, int pf, int *ow, int *oh) {
    tjhandle t = tjInitDecompress();
    int w, h, ss, cs;
    if (tjDecompressHeader3(t, b->p, b->n, &w, &h, &ss, &cs) != 0) {
        fprintf(stderr, "tjDecompressHeader3: %s\n", tjGetErrorStr2(t));
        exit(1);
    }
    int tw = (w + denom - 1) / denom, th = (h + denom - 1) / denom;
    int nsf;
    tjscalingfactor *sf = tjGetScalingFactors(&nsf);
    for (int i = 0; i < nsf; i++) {
        if (sf[i].num * denom == sf[i].denom) break;
        if (TJSCALED(w, sf[i]) <= tw && TJSCALED(h, sf[i]) <= th) {
            tjDestroy(t);
            return NULL;  // a larger factor would be chosen
        }
    }
    uint8_t *out = malloc((size_t)tw * th * tjPixelSize[pf]);
    if (tjDecompress2(t, b->p, b->n, out, tw, 0, th, pf, TJFLAG_ACCURATEDCT) != 0) {
        fprintf(stderr, "tjDecompress2: %s\n", tjGetErrorStr2(t));
        exit(1);
    }
    tjDestroy(t);
    *ow = tw;
    *oh = th;
    return out;
}

// libjpeg compression, for what TurboJPEG 2 cannot write: plain CMYK (in_cs = jpeg_cs = JCS_CMYK), restart
// intervals, a custom scan script.
typedef struct {
    J_COLOR_SPACE in_cs, jpeg_cs;
    int nc, quality, progressive, restart_rows;
    const jpeg_scan_info *scans;
    int nscans;
} LjOpts;

static Buf lj_encode(const uint8_t *px, int w, int h, const LjOpts *o) {
    struct jpeg_compress_struct c;
    struct jpeg_error_mgr e;
    c.err = jpeg_std_error(&e);
    jpeg_create_compress(&c);
    unsigned char *mem = NULL;
    unsigned long n = 0;
    jpeg_mem_dest(&c, &mem, &n);
    c.image_width = (JDIMENSION)w;
    c.image_height = (JDIMENSION)h;
    c.input_components = o->nc;
    c.in_color_space = o->in_cs;
    jpeg_set_defaults(&c);
    jpeg_set_colorspace(&c, o->jpeg_cs);
    jpeg_set_quality(&c, o->quality, TRUE);
    if (o->progressive) jpeg_simple_progression(&c);
    if (o->scans) {
        c.scan_info = o->scans;
        c.num_scans = o->nscans;
    }
    c.restart_in_rows = o->restart_rows;
    jpeg_start_compress(&c, TRUE);
    while (c.next_scanline < c.image_height) {
        JSAMPROW r = (JSAMPROW)(px + (size_t)c.next_scanline * w * o->nc);
        jpeg_write_scanlines(&c, &r, 1);
    }
    jpeg_finish_compress(&c);
    jpeg_destroy_compress(&c);
    Buf b = {malloc(n), n};
    memcpy(b.p, mem, n);
    free(mem);
    return b;
}

static void cmyk_to_rgb_pillow(const uint8_t *cmyk, uint8_t *rgb, size_t n) {
    for (size_t i = 0; i < n; i++) {
        int k = cmyk[4 * i + 3];
        for (int c = 0; c < 3; c++) {
            int t = (255 - cmyk[4 * i + c]) * k + 128;
            rgb[3 * i + c] = (uint8_t)(k - (((t >> 8) + t) >> 8));
        }
    }
}

// ---------------------------------------------------------------- decode helpers

// Decodes the crop with the given scale forced through min_w/min_h (denom 1: no scaling).
// Every decode_crop also decodes the same crop with jpeg_read_crop_view (the loader's no-copy path) and counts
// the crops where the two differ in status, size, box, scale or any pixel (test_view_equals_copy checks the count).
static long view_checked, view_bad;

// b without its segments of one marker (0xC4 DHT, 0xDB DQT) before the first scan: a Motion-JPEG-style stream.
static Buf strip_marker(const Buf *b, uint8_t marker) {
    Buf o = {malloc(b->n), 0};
    memcpy(o.p, b->p, 2);  // SOI
    o.n = 2;
    size_t i = 2;
    while (i + 4 <= b->n && b->p[i] == 0xFF && b->p[i + 1] != 0xDA) {
        size_t seg = 2 + ((size_t)b->p[i + 2] << 8 | b->p[i + 3]);
        if (b->p[i + 1] != marker) memcpy(o.p + o.n, b->p + i, seg), o.n += seg;
        i += seg;
    }
    memcpy(o.p + o.n, b->p + i, b->n - i);  // the scans and EOI
    o.n += b->n - i;
    return o;
}

static ImgStatus decode_crop(JpegDecoder *d, const Buf *b, int x, int y, int cw, int ch, int denom, Image *out,
                             double box[4], int *got_denom) {
    int w, h;
    ImgStatus s = jpeg_open(d, b->p, b->n, &w, &h);
    if (s != IMG_OK) return s;
    int mw = denom > 1 ? cw / denom : 0, mh = denom > 1 ? ch / denom : 0;
    s = jpeg_read_crop(d, x, y, cw, ch, mw, mh, denom > 1, out, box, got_denom);
    Image v;
    double vbox[4];
    int vden = 0;
    ImgStatus vs = jpeg_open(d, b->p, b->n, &w, &h);
    if (vs == IMG_OK) vs = jpeg_read_crop_view(d, x, y, cw, ch, mw, mh, denom > 1, &v, vbox, &vden);
    view_checked++;
    int bad = vs != s;
    if (!bad && s == IMG_OK) {
        bad = v.w != out->w || v.h != out->h || v.c != 3 || v.cap != 0 || v.stride < v.w * 3 || vden != *got_denom ||
              memcmp(vbox, box, sizeof vbox) != 0;
        for (int r = 0; !bad && r < v.h; r++)
            bad = memcmp(v.px + (size_t)r * v.stride, out->px + (size_t)r * out->stride, (size_t)v.w * 3) != 0;
    }
    view_bad += bad;
    return s;
}

static void test_view_equals_copy(void) {
    TEST_CASE("jpeg_read_crop_view == jpeg_read_crop (status, size, box, scale, pixels) on every crop above") {
        EXPECT(view_checked > 3000, "only %ld crops compared", view_checked);
        EXPECT(view_bad == 0, "%ld of %ld views differ from the copied crop", view_bad, view_checked);
    }
}

// Compares out with the region [sx0, sx0 + out->w) x [sy0, ...) of ref (ref_w wide, RGB). Returns mismatches.
static long cmp_region(const Image *out, const uint8_t *ref, int ref_w, int sx0, int sy0) {
    long bad = 0;
    for (int r = 0; r < out->h; r++)
        if (memcmp(out->px + (size_t)r * out->stride, ref + ((size_t)(sy0 + r) * ref_w + sx0) * 3, (size_t)out->w * 3))
            bad++;
    return bad;
}

typedef struct {
    const char *name;
    int samp;         // TJSAMP_*, or -1 for a libjpeg-encoded fixture
    int pf;           // TJPF_RGB, TJPF_GRAY or TJPF_CMYK
    int progressive;
    int restart;      // libjpeg fixture with restart_in_rows = 1
    int cmyk_plain;   // libjpeg fixture, JCS_CMYK stored as is
} Kind;

static const Kind kinds[] = {
    {"444", TJSAMP_444, TJPF_RGB, 0, 0, 0},        {"422", TJSAMP_422, TJPF_RGB, 0, 0, 0},
    {"420", TJSAMP_420, TJPF_RGB, 0, 0, 0},        {"440", TJSAMP_440, TJPF_RGB, 0, 0, 0},
    {"411", TJSAMP_411, TJPF_RGB, 0, 0, 0},        {"grey", TJSAMP_GRAY, TJPF_GRAY, 0, 0, 0},
    {"444 prog", TJSAMP_444, TJPF_RGB, 1, 0, 0},   {"422 prog", TJSAMP_422, TJPF_RGB, 1, 0, 0},
    {"420 prog", TJSAMP_420, TJPF_RGB, 1, 0, 0},   {"440 prog", TJSAMP_440, TJPF_RGB, 1, 0, 0},
    {"grey prog", TJSAMP_GRAY, TJPF_GRAY, 1, 0, 0}, {"ycck 420", TJSAMP_420, TJPF_CMYK, 0, 0, 0},
    {"ycck 444 prog", TJSAMP_444, TJPF_CMYK, 1, 0, 0}, {"420 restart", -1, TJPF_RGB, 0, 1, 0},
    {"cmyk plain", -1, TJPF_CMYK, 0, 0, 1},
};
#define NKINDS ((int)(sizeof kinds / sizeof kinds[0]))

static const int sizes[][2] = {{1, 1}, {7, 5}, {17, 13}, {64, 48}, {123, 77}, {257, 191}, {333, 250}};
#define NSIZES ((int)(sizeof sizes / sizeof sizes[0]))

static Buf make_fixture(const Kind *k, int w, int h, int quality, uint32_t seed) {
    int nc = tjPixelSize[k->pf];
    uint8_t *px = make_pixels(w, h, nc, seed);
    Buf b;
    if (k->samp >= 0) {
        b = tj_encode(px, w, h, k->pf, k->samp, quality, k->progressive ? TJFLAG_PROGRESSIVE : 0);
    } else if (k->cmyk_plain) {
        LjOpts o = {JCS_CMYK, JCS_CMYK, 4, quality, 0, 0, NULL, 0};
        b = lj_encode(px, w, h, &o);
    } else {  // 4:2:0 with a restart marker every MCU row
        LjOpts o = {JCS_RGB, JCS_YCbCr, 3, quality, 0, 1, NULL, 0};
        b = lj_encode(px, w, h, &o);
    }
    free(px);
    return b;
}

// The reference RGB decode at 1/denom (NULL when TurboJPEG cannot give exactly that factor).
static uint8_t *reference_rgb(const Kind *k, const Buf *b, int denom, int *rw, int *rh) {
    if (k->pf != TJPF_CMYK) return tj_decode(b, denom, TJPF_RGB, rw, rh);
    uint8_t *cmyk = tj_decode(b, denom, TJPF_CMYK, rw, rh);
    if (!cmyk) return NULL;
    uint8_t *rgb = malloc((size_t)*rw * *rh * 3);
    cmyk_to_rgb_pillow(cmyk, rgb, (size_t)*rw * *rh);
    free(cmyk);
    return rgb;
}

// ---------------------------------------------------------------- cases

static JpegDecoder *dec;
static Image img;

static void test_status_names(void) {
    TEST_CASE("img_status_name and img_sniff") {
        EXPECT(strcmp(img_status_name(IMG_OK), "ok") == 0, "%s", img_status_name(IMG_OK));
        EXPECT(strcmp(img_status_name(IMG_TOO_MANY_SCANS), "too_many_scans") == 0, "%s", "sniff");
        EXPECT(strcmp(img_status_name(IMG_READ_ERROR), "read_error") == 0, "%s", "sniff");
        const uint8_t jpg[] = {0xFF, 0xD8, 0xFF, 0xE0}, png[] = {0x89, 'P', 'N', 'G', 0x0D, 0x0A, 0x1A, 0x0A};
        EXPECT(img_sniff(jpg, 4) == IMG_OK, "%s", "sniff");
        EXPECT(img_sniff(jpg, 2) == IMG_UNKNOWN_FORMAT, "%s", "sniff");
        EXPECT(img_sniff(png, 8) == IMG_PNG, "%s", "sniff");
        EXPECT(img_sniff(png, 0) == IMG_EMPTY, "%s", "sniff");
        EXPECT(img_sniff((const uint8_t *)"hello", 5) == IMG_UNKNOWN_FORMAT, "%s", "sniff");
    }
}

// Full decode == tjDecompress2, and crops == full decode's crop, for every kind and size.
static void test_full_and_crops(void) {
    for (int ki = 0; ki < NKINDS; ki++) {
        const Kind *k = &kinds[ki];
        char name[96];
        snprintf(name, sizeof name, "%s: full decode == tjDecompress2, 200 crops == full decode + crop", k->name);
        TEST_CASE(name) {
            long crops = 0, bad = 0;
            for (int si = 0; si < NSIZES; si++) {
                int w = sizes[si][0], h = sizes[si][1];
                int quality = 90 + (si + ki) % 7;
                Buf b = make_fixture(k, w, h, quality, (uint32_t)(ki * 100 + si));
                int rw, rh;
                uint8_t *ref = reference_rgb(k, &b, 1, &rw, &rh);
                double box[4];
                int denom = 0;
                ImgStatus s = decode_crop(dec, &b, 0, 0, w, h, 1, &img, box, &denom);
                EXPECT(s == IMG_OK, "%dx%d: %s", w, h, img_status_name(s));
                if (s == IMG_OK) {
                    EXPECT(img.w == w && img.h == h && img.c == 3 && denom == 1, "%dx%d: got %dx%dx%d /%d", w, h,
                           img.w, img.h, img.c, denom);
                    EXPECT(cmp_region(&img, ref, rw, 0, 0) == 0, "%dx%d q%d: full decode differs", w, h, quality);
                    EXPECT(box[0] == 0 && box[1] == 0 && box[2] == w && box[3] == h, "box");
                }
                if (k->pf == TJPF_GRAY && s == IMG_OK) {  // R = G = B = the grey decode
                    int gw, gh;
                    uint8_t *g = tj_decode(&b, 1, TJPF_GRAY, &gw, &gh);
                    long badg = 0;
                    for (int i = 0; i < w * h; i++)
                        badg += img.px[3 * i] != g[i] || img.px[3 * i + 1] != g[i] || img.px[3 * i + 2] != g[i];
                    EXPECT(badg == 0, "%dx%d: %ld grey pixels not replicated", w, h, badg);
                    free(g);
                }
                // Random crops, about 200 per kind over the sizes, biased to touch the edges.
                int n = si == 0 ? 4 : 200 / (NSIZES - 1) + 1;
                for (int i = 0; i < n; i++) {
                    int cw = 1 + rndi(w), ch = 1 + rndi(h);
                    int x = rndi(w - cw + 1), y = rndi(h - ch + 1);
                    if (i % 4 == 1) x = 0;
                    if (i % 4 == 2) x = w - cw;
                    if (i % 5 == 3) y = h - ch;
                    s = decode_crop(dec, &b, x, y, cw, ch, 1, &img, box, &denom);
                    crops++;
                    if (s != IMG_OK || img.w != cw || img.h != ch || cmp_region(&img, ref, rw, x, y)) {
                        if (bad < 5)
                            printf("    %dx%d crop (%d,%d) %dx%d: %s, %dx%d, differs\n", w, h, x, y, cw, ch,
                                   img_status_name(s), img.w, img.h);
                        bad++;
                    }
                    if (box[0] != 0 || box[1] != 0 || box[2] != cw || box[3] != ch) bad++;
                }
                free(ref);
                free(b.p);
            }
            EXPECT(bad == 0, "%ld of %ld crops differ", bad, crops);
        }
    }
}

// Scaled crops (1/2, 1/4, 1/8) == tjDecompress2 at that factor, cropped; scaling only for the allowed samplings.
static void test_scaled_crops(void) {
    for (int ki = 0; ki < NKINDS; ki++) {
        const Kind *k = &kinds[ki];
        char name[96];
        snprintf(name, sizeof name, "%s: crops at 1/2, 1/4, 1/8 == tjDecompress2 scaled + crop", k->name);
        TEST_CASE(name) {
            long crops = 0, bad = 0;
            int allowed = k->samp != TJSAMP_411;
            for (int si = 3; si < NSIZES; si++) {
                int w = sizes[si][0], h = sizes[si][1];
                Buf b = make_fixture(k, w, h, 92 + si % 5, (uint32_t)(ki * 100 + si + 7));
                for (int denom = 2; denom <= 8; denom *= 2) {
                    int rw, rh;
                    uint8_t *ref = allowed ? reference_rgb(k, &b, denom, &rw, &rh) : reference_rgb(k, &b, 1, &rw, &rh);
                    if (!ref) continue;
                    for (int i = 0; i < 200 / 3 / (NSIZES - 3) + 1; i++) {
                        int cw = denom + rndi(w - denom + 1), ch = denom + rndi(h - denom + 1);
                        int x = rndi(w - cw + 1), y = rndi(h - ch + 1);
                        if (i % 4 == 1) x = 0;
                        if (i % 4 == 2) x = w - cw;
                        if (i % 5 == 3) y = h - ch;
                        double box[4];
                        int got = 0;
                        ImgStatus s = decode_crop(dec, &b, x, y, cw, ch, denom, &img, box, &got);
                        crops++;
                        int want = allowed ? denom : 1;
                        int sx0 = x / want, sy0 = y / want;
                        int sx1 = (x + cw + want - 1) / want, sy1 = (y + ch + want - 1) / want;
                        int ok = s == IMG_OK && got == want && img.w == sx1 - sx0 && img.h == sy1 - sy0 &&
                                 cmp_region(&img, ref, rw, sx0, sy0) == 0;
                        ok = ok && box[0] == (double)x / want - sx0 && box[1] == (double)y / want - sy0 &&
                             box[2] == (double)(x + cw) / want - sx0 && box[3] == (double)(y + ch) / want - sy0;
                        ok = ok && box[0] >= 0 && box[0] < 1 && box[2] <= img.w && box[2] > img.w - 1;
                        if (!ok) {
                            if (bad < 5)
                                printf("    %dx%d /%d crop (%d,%d) %dx%d: %s /%d %dx%d differs\n", w, h, denom, x, y,
                                       cw, ch, img_status_name(s), got, img.w, img.h);
                            bad++;
                        }
                    }
                    free(ref);
                }
                free(b.p);
            }
            EXPECT(crops >= 150, "only %ld crops", crops);
            EXPECT(bad == 0, "%ld of %ld scaled crops differ", bad, crops);
        }
    }
    TEST_CASE("scale choice: smallest of 1/2, 1/4, 1/8 covering min_w x min_h; none without dct_scaling") {
        Buf b = make_fixture(&kinds[2], 333, 250, 95, 5);
        int w, h, got;
        double box[4];
        struct {
            int cw, ch, mw, mh, scaling, want;
        } t[] = {{333, 250, 224, 224, 1, 1}, {333, 250, 160, 120, 1, 2}, {333, 250, 83, 62, 1, 4},
                 {333, 250, 41, 31, 1, 8},   {333, 250, 41, 31, 0, 1},   {300, 100, 150, 51, 1, 1},
                 {300, 100, 150, 50, 1, 2}};
        for (size_t i = 0; i < sizeof t / sizeof t[0]; i++) {
            jpeg_open(dec, b.p, b.n, &w, &h);
            ImgStatus s = jpeg_read_crop(dec, 0, 0, t[i].cw, t[i].ch, t[i].mw, t[i].mh, t[i].scaling, &img, box, &got);
            EXPECT(s == IMG_OK && got == t[i].want, "case %zu: %s, denom %d, want %d", i, img_status_name(s), got,
                   t[i].want);
        }
        free(b.p);
    }
}

static void test_cmyk_formula(void) {
    TEST_CASE("CMYK/YCCK -> RGB is Pillow's CMYK;I convert('RGB') on the stored values") {
        // Stored (inverted) CMYK -> RGB: R = sK - muldiv255(255 - sC, sK).
        uint8_t in[4 * 5] = {255, 255, 255, 255, 0, 0, 0, 255, 255, 255, 255, 0, 200, 100, 50, 128, 0, 128, 255, 77};
        uint8_t want[3 * 5] = {255, 255, 255, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
        // 200,100,50 K128: 128 - muldiv255(55,128) = 128 - 28 = 100; 100: 128 - 78 = 50; 50: 128 - 103 = 25.
        want[9] = 100, want[10] = 50, want[11] = 25;
        // 0,128,255 K77: 77 - muldiv255(255,77) = 0; 77 - muldiv255(127,77) = 77 - 38 = 39; 77 - 0 = 77.
        want[12] = 0, want[13] = 39, want[14] = 77;
        uint8_t got[15];
        cmyk_to_rgb_pillow(in, got, 5);
        EXPECT(memcmp(got, want, 15) == 0, "%d %d %d / %d %d %d", got[9], got[10], got[11], got[12], got[13],
               got[14]);
        // And the decoder applies it to a flat plain-CMYK JPEG (quality 100, 4:4:4: values survive within 1-2).
        int w = 16, h = 16;
        uint8_t *px = malloc((size_t)w * h * 4);
        for (int i = 0; i < w * h; i++) px[4 * i] = 200, px[4 * i + 1] = 100, px[4 * i + 2] = 50, px[4 * i + 3] = 128;
        LjOpts o = {JCS_CMYK, JCS_CMYK, 4, 100, 0, 0, NULL, 0};
        Buf b = lj_encode(px, w, h, &o);
        double box[4];
        int denom;
        ImgStatus s = decode_crop(dec, &b, 0, 0, w, h, 1, &img, box, &denom);
        EXPECT(s == IMG_OK, "%s", img_status_name(s));
        if (s == IMG_OK)
            EXPECT(abs(img.px[0] - 100) <= 2 && abs(img.px[1] - 50) <= 2 && abs(img.px[2] - 25) <= 2,
                   "got %d %d %d, want about 100 50 25", img.px[0], img.px[1], img.px[2]);
        free(px);
        free(b.p);
    }
}

// ---------------------------------------------------------------- corrupt-file corpus

// A progressive greyscale file with many scans: the DC and every AC coefficient in its own band, first at
// Al = al_top and then refined bit by bit: 64 * (al_top + 1) scans (al_top 7: 512 scans; 5: 384 scans).
static Buf many_scans_jpeg(int al_top) {
    static jpeg_scan_info sc[600];
    int n = 0;
    sc[n++] = (jpeg_scan_info){1, {0}, 0, 0, 0, al_top};
    for (int al = al_top - 1; al >= 0; al--) sc[n++] = (jpeg_scan_info){1, {0}, 0, 0, al + 1, al};
    for (int k = 1; k < 64; k++) {
        sc[n++] = (jpeg_scan_info){1, {0}, k, k, 0, al_top};
        for (int al = al_top - 1; al >= 0; al--) sc[n++] = (jpeg_scan_info){1, {0}, k, k, al + 1, al};
    }
    uint8_t *px = make_pixels(32, 32, 1, 3);
    LjOpts o = {JCS_GRAYSCALE, JCS_GRAYSCALE, 1, 95, 1, 0, sc, n};
    Buf b = lj_encode(px, 32, 32, &o);
    free(px);
    return b;
}

// Offset of the SOF marker's segment (FF C0..C2) in a JPEG, or -1.
static long find_sof(const Buf *b) {
    for (size_t i = 2; i + 9 < b->n; i++)
        if (b->p[i] == 0xFF && (b->p[i + 1] == 0xC0 || b->p[i + 1] == 0xC1 || b->p[i + 1] == 0xC2)) return (long)i;
    return -1;
}
static long find_sos(const Buf *b) {
    for (size_t i = 2; i + 4 < b->n; i++)
        if (b->p[i] == 0xFF && b->p[i + 1] == 0xDA) return (long)i;
    return -1;
}

static Buf copy_prefix(const Buf *b, size_t n) {
    Buf c = {malloc(n ? n : 1), n};
    memcpy(c.p, b->p, n);
    return c;
}

typedef struct {
    const char *name;
    Buf b;
    ImgStatus want;     // status of a full decode (jpeg_open, then jpeg_read_crop of the whole image)
    int want_warnings;  // an OK image must have counted warnings
} CorpusItem;

static void test_corpus(void) {
    // Good sources.
    int W = 256, H = 192;
    uint8_t *px = make_pixels(W, H, 3, 77);
    Buf base = tj_encode(px, W, H, TJPF_RGB, TJSAMP_420, 95, 0);
    Buf prog = tj_encode(px, W, H, TJPF_RGB, TJSAMP_444, 92, TJFLAG_PROGRESSIVE);
    uint8_t *big = make_pixels(1600, 1200, 3, 78);
    Buf bigprog = tj_encode(big, 1600, 1200, TJPF_RGB, TJSAMP_444, 90, TJFLAG_PROGRESSIVE);
    free(big);
    int rw, rh;
    uint8_t *base_ref = tj_decode(&base, 1, TJPF_RGB, &rw, &rh);

    CorpusItem items[32];
    int n = 0;
    items[n++] = (CorpusItem){"zero bytes", {malloc(1), 0}, IMG_EMPTY, 0};
    items[n++] = (CorpusItem){"SOI marker only", copy_prefix(&base, 2), IMG_UNKNOWN_FORMAT, 0};
    items[n++] = (CorpusItem){"SOI + FF only", copy_prefix(&base, 3), IMG_TRUNCATED, 0};
    items[n++] = (CorpusItem){"truncated in the header (100 bytes)", copy_prefix(&base, 100), IMG_TRUNCATED, 0};
    items[n++] = (CorpusItem){"baseline truncated at 10%", copy_prefix(&base, base.n / 10), IMG_TRUNCATED, 0};
    items[n++] = (CorpusItem){"baseline truncated at 50%", copy_prefix(&base, base.n / 2), IMG_TRUNCATED, 0};
    items[n++] = (CorpusItem){"baseline truncated at 90%", copy_prefix(&base, base.n * 9 / 10), IMG_TRUNCATED, 0};
    // Without EOI the Huffman decoder's read-ahead runs off the end of the data on the last MCU row: JWRN_JPEG_EOF,
    // hence truncated (PIL, whose source suspends there, says "image file is truncated" as well).
    items[n++] = (CorpusItem){"baseline without EOI", copy_prefix(&base, base.n - 2), IMG_TRUNCATED, 0};
    items[n++] = (CorpusItem){"progressive truncated at 10%", copy_prefix(&prog, prog.n / 10), IMG_TRUNCATED, 0};
    items[n++] = (CorpusItem){"progressive truncated at 50%", copy_prefix(&prog, prog.n / 2), IMG_TRUNCATED, 0};
    items[n++] = (CorpusItem){"progressive truncated at 90%", copy_prefix(&prog, prog.n * 9 / 10), IMG_TRUNCATED, 0};
    {
        Buf r = {malloc(4096), 4096};
        for (size_t i = 0; i < r.n; i++) r.p[i] = (uint8_t)rnd();
        r.p[0] = 0x12;
        items[n++] = (CorpusItem){"random bytes", r, IMG_UNKNOWN_FORMAT, 0};
    }
    {
        Buf r = {malloc(4096), 4096};
        for (size_t i = 0; i < r.n; i++) r.p[i] = (uint8_t)rnd();
        r.p[0] = 0xFF, r.p[1] = 0xD8, r.p[2] = 0xFF, r.p[3] = 0x01;  // TEM: a parameterless marker, then noise
        items[n++] = (CorpusItem){"JPEG magic + random bytes", r, IMG_CORRUPT, 0};
    }
    {
        static const uint8_t png[] = {0x89, 'P', 'N', 'G', 0x0D, 0x0A, 0x1A, 0x0A, 0, 0, 0, 13, 'I', 'H', 'D', 'R',
                                      0, 0, 0, 1, 0, 0, 0, 1, 8, 2, 0, 0, 0, 0x90, 0x77, 0x53, 0xDE};
        Buf r = {malloc(sizeof png), sizeof png};
        memcpy(r.p, png, sizeof png);
        items[n++] = (CorpusItem){"PNG named .JPEG", r, IMG_PNG, 0};
    }
    {
        const char *t = "n01440764/n01440764_10026.JPEG 0\nthis is a text file\n";
        Buf r = {malloc(strlen(t)), strlen(t)};
        memcpy(r.p, t, r.n);
        items[n++] = (CorpusItem){"text file", r, IMG_UNKNOWN_FORMAT, 0};
    }
    {  // Noise (no 0xFF byte, so no false marker) over 64 bytes in the middle of the entropy-coded data.
        Buf r = copy_prefix(&base, base.n);
        size_t at = r.n / 2;
        while (r.p[at - 1] == 0xFF) at++;
        for (size_t i = at; i < at + 64; i++) r.p[i] = (uint8_t)(rnd() % 0xFF);
        // Random bits mostly form valid Huffman codes: libjpeg decodes garbage blocks, often without a warning.
        items[n++] = (CorpusItem){"noise in the entropy-coded data", r, IMG_OK, 0};
    }
    {  // A false RST0 marker in the middle of the scan: "premature end of data segment", the rest is grey.
        Buf r = copy_prefix(&base, base.n);
        size_t at = r.n / 2;
        while (r.p[at - 1] == 0xFF) at++;
        r.p[at] = 0xFF, r.p[at + 1] = 0xD0;
        items[n++] = (CorpusItem){"false marker in the entropy-coded data", r, IMG_OK, 1};
    }
    {  // Three junk bytes before the second marker: "extraneous bytes before marker".
        long sof = find_sof(&base);
        Buf r = {malloc(base.n + 3), base.n + 3};
        memcpy(r.p, base.p, (size_t)sof);
        r.p[sof] = 0x12, r.p[sof + 1] = 0x34, r.p[sof + 2] = 0x56;
        memcpy(r.p + sof + 3, base.p + sof, base.n - (size_t)sof);
        items[n++] = (CorpusItem){"extraneous bytes before a marker", r, IMG_OK, 1};
    }
    {
        Buf r = copy_prefix(&base, base.n);
        long sof = find_sof(&r);
        r.p[sof + 5] = 0xFD, r.p[sof + 6] = 0xE8;  // height 65000
        r.p[sof + 7] = 0xFD, r.p[sof + 8] = 0xE8;  // width 65000
        items[n++] = (CorpusItem){"SOF claiming 65000x65000", r, IMG_TOO_MANY_PIXELS, 0};
    }
    {
        Buf r = copy_prefix(&base, base.n);
        long sof = find_sof(&r);
        r.p[sof + 5] = 0xFF, r.p[sof + 6] = 0xFF;  // height 65535: over libjpeg's JPEG_MAX_DIMENSION
        r.p[sof + 7] = 0x00, r.p[sof + 8] = 0x10;
        items[n++] = (CorpusItem){"SOF claiming 16x65535", r, IMG_TOO_MANY_PIXELS, 0};
    }
    {
        Buf r = copy_prefix(&base, base.n);
        long sof = find_sof(&r);
        r.p[sof + 1] = 0xC1;  // extended sequential
        r.p[sof + 4] = 12;    // 12-bit precision
        items[n++] = (CorpusItem){"12-bit precision", r, IMG_UNSUPPORTED, 0};
    }
    {
        Buf r = copy_prefix(&base, base.n);
        long sof = find_sof(&r);
        r.p[sof + 1] = 0xC3;  // lossless
        items[n++] = (CorpusItem){"lossless SOF3", r, IMG_UNSUPPORTED, 0};
    }
    {  // Two components: neither grey, YCbCr/RGB nor CMYK. Built by patching a grey file's SOF and SOS.
        uint8_t *g = make_pixels(16, 16, 1, 9);
        Buf gb = tj_encode(g, 16, 16, TJPF_GRAY, TJSAMP_GRAY, 90, 0);
        free(g);
        long sof = find_sof(&gb), sos = find_sos(&gb);
        Buf r = {malloc(gb.n + 6), 0};
        size_t o = 0;
        memcpy(r.p, gb.p, (size_t)sof);
        o = (size_t)sof;
        // SOF0: length 8 + 3*2, precision, height, width, 2 components (id, 0x11, table 0).
        const uint8_t sof2[] = {0xFF, 0xC0, 0, 14, 8, 0, 16, 0, 16, 2, 1, 0x11, 0, 2, 0x11, 0};
        memcpy(r.p + o, sof2, sizeof sof2);
        o += sizeof sof2;
        size_t sof_len = ((size_t)gb.p[sof + 2] << 8 | gb.p[sof + 3]) + 2;
        memcpy(r.p + o, gb.p + sof + sof_len, (size_t)(sos - sof - (long)sof_len));
        o += (size_t)(sos - sof - (long)sof_len);
        memcpy(r.p + o, gb.p + sos, gb.n - (size_t)sos);
        r.n = o + gb.n - (size_t)sos;
        items[n++] = (CorpusItem){"two-component image", r, IMG_UNSUPPORTED, 0};
        free(gb.p);
    }
    items[n++] = (CorpusItem){"progressive with 512 scans", many_scans_jpeg(7), IMG_TOO_MANY_SCANS, 0};
    items[n++] = (CorpusItem){"progressive with 384 scans (decoded)", many_scans_jpeg(5), IMG_OK, 0};
    items[n++] = (CorpusItem){"progressive 1600x1200 over max_memory (1 MiB)", copy_prefix(&bigprog, bigprog.n),
                              IMG_TOO_MANY_PIXELS, 0};

    JpegDecoder *small = jpeg_decoder_create(64ll << 20, 1u << 20);
    TEST_CASE("corrupt-file corpus: each file gives its status, no crash, no stall; the decoder keeps working") {
        printf("    %-48s %-16s %s\n", "file", "status", "warnings");
        for (int i = 0; i < n; i++) {
            CorpusItem *it = &items[i];
            JpegDecoder *d = strstr(it->name, "max_memory") ? small : dec;
            int64_t w0 = jpeg_warning_count(d);
            double t0 = now_s();
            int w = 0, h = 0, got = 0;
            double box[4];
            ImgStatus s = jpeg_open(d, it->b.p, it->b.n, &w, &h);
            if (s == IMG_OK) s = jpeg_read_crop(d, 0, 0, w, h, 0, 0, 0, &img, box, &got);
            double dt = now_s() - t0;
            int64_t nw = jpeg_warning_count(d) - w0;
            printf("    %-48s %-16s %lld\n", it->name, img_status_name(s), (long long)nw);
            EXPECT(s == it->want, "%s: got %s, want %s", it->name, img_status_name(s), img_status_name(it->want));
            EXPECT(dt < 2.0, "%s: %.2f s", it->name, dt);
            if (it->want_warnings) EXPECT(nw > 0, "%s: no warning counted", it->name);
            if (s != IMG_OK) EXPECT(nw == 0, "%s: warnings of a skipped image counted", it->name);
            // The same decoder decodes a good file exactly right after every bad one.
            s = decode_crop(d, &base, 0, 0, W, H, 1, &img, box, &got);
            EXPECT(s == IMG_OK && cmp_region(&img, base_ref, rw, 0, 0) == 0, "good file after %s: %s", it->name,
                   img_status_name(s));
        }
        // The big progressive file decodes with the default memory limit (and its scans are under 500).
        int w, h, got;
        double box[4];
        ImgStatus s = decode_crop(dec, &bigprog, 100, 50, 300, 200, 1, &img, box, &got);
        EXPECT(s == IMG_OK, "1600x1200 progressive with 256 MiB: %s", img_status_name(s));
        // jpeg_close after jpeg_open, then a new image; jpeg_close when idle is harmless.
        EXPECT(jpeg_open(dec, base.p, base.n, &w, &h) == IMG_OK && w == W && h == H, "open");
        jpeg_close(dec);
        jpeg_close(dec);
        EXPECT(jpeg_open(dec, prog.p, prog.n, &w, &h) == IMG_OK, "open after close");
        EXPECT(jpeg_open(dec, base.p, base.n, &w, &h) == IMG_OK, "open while open");
        s = jpeg_read_crop(dec, 0, 0, W, H, 0, 0, 0, &img, box, &got);
        EXPECT(s == IMG_OK && cmp_region(&img, base_ref, rw, 0, 0) == 0, "decode after open while open");
        // A bad crop is refused without decoding.
        EXPECT(jpeg_open(dec, base.p, base.n, &w, &h) == IMG_OK, "open");
        EXPECT(jpeg_read_crop(dec, W - 10, 0, 11, 5, 0, 0, 0, &img, box, &got) == IMG_CORRUPT, "crop outside");
        EXPECT(jpeg_read_crop(dec, 0, 0, 5, 5, 0, 0, 0, &img, box, &got) == IMG_CORRUPT, "read_crop when idle");
    }
    TEST_CASE("truncation counts only in the rows read; a baseline top crop above the cut is OK") {
        int w, h, got;
        double box[4];
        Buf cut = copy_prefix(&base, base.n * 9 / 10);
        ImgStatus s = decode_crop(dec, &cut, 10, 0, 100, 40, 1, &img, box, &got);
        EXPECT(s == IMG_OK, "top crop of a file cut at 90%%: %s", img_status_name(s));
        if (s == IMG_OK) EXPECT(cmp_region(&img, base_ref, rw, 10, 0) == 0, "pixels");
        s = decode_crop(dec, &cut, 10, H - 40, 100, 40, 1, &img, box, &got);
        EXPECT(s == IMG_TRUNCATED, "bottom crop of a file cut at 90%%: %s", img_status_name(s));
        free(cut.p);
        (void)w, (void)h;
    }
    TEST_CASE("an image's pixels depend on its bytes alone: a file without Huffman tables (standard ones, as "
              "Motion-JPEG) decodes as tjDecompress2 does, fresh or after a progressive file's optimized tables; a "
              "file without quantization tables is corrupt, after files that had them") {
        Buf nodht = strip_marker(&base, 0xC4), nodqt = strip_marker(&base, 0xDB);
        EXPECT(nodht.n < base.n && nodqt.n < base.n, "markers not found (%zu, %zu of %zu bytes)", nodht.n, nodqt.n,
               base.n);
        int rw2, rh2, got;
        double box[4];
        uint8_t *ref = tj_decode(&nodht, 1, TJPF_RGB, &rw2, &rh2);  // a fresh TurboJPEG handle: standard tables
        for (int after = 0; after < 2; after++) {
            JpegDecoder *d = jpeg_decoder_create((int64_t)1 << 26, 0);
            if (after) {  // the progressive file first: its optimized Huffman tables, its quantization tables
                ImgStatus p = decode_crop(d, &prog, 0, 0, W, H, 1, &img, box, &got);
                EXPECT(p == IMG_OK, "progressive file: %s", img_status_name(p));
            }
            ImgStatus s = decode_crop(d, &nodht, 0, 0, W, H, 1, &img, box, &got);
            EXPECT(s == IMG_OK && cmp_region(&img, ref, rw2, 0, 0) == 0, "%s: no-DHT file %s, pixels %s",
                   after ? "after another file" : "fresh", img_status_name(s),
                   s == IMG_OK && cmp_region(&img, ref, rw2, 0, 0) ? "differ" : "equal");
            if (after) decode_crop(d, &prog, 0, 0, W, H, 1, &img, box, &got);
            s = decode_crop(d, &nodqt, 0, 0, W, H, 1, &img, box, &got);
            EXPECT(s == IMG_CORRUPT, "no-DQT file after the %s file gave %s", after ? "progressive" : "no-DHT",
                   img_status_name(s));
            jpeg_decoder_free(d);
        }
        free(ref);
        free(nodht.p);
        free(nodqt.p);
    }
    TEST_CASE("1000 corpus files in a loop on one decoder: same statuses, good files exact") {
        long bad = 0;
        double t0 = now_s();
        for (int r = 0; r < 1000; r++) {
            CorpusItem *it = &items[r % n];
            if (strstr(it->name, "max_memory")) continue;
            int w, h, got;
            double box[4];
            ImgStatus s = jpeg_open(dec, it->b.p, it->b.n, &w, &h);
            if (s == IMG_OK) {
                int cw = 1 + rndi(w), ch = 1 + rndi(h);
                s = jpeg_read_crop(dec, rndi(w - cw + 1), rndi(h - ch + 1), cw, ch, 0, 0, 0, &img, box, &got);
                if (it->want == IMG_OK && s != IMG_OK) bad++, printf("    %s: %s\n", it->name, img_status_name(s));
                if (it->want != IMG_OK && s == IMG_OK && it->want != IMG_TRUNCATED) bad++;  // a crop may miss the cut
            } else if (s != it->want) {
                bad++;
                printf("    %s: open %s\n", it->name, img_status_name(s));
            }
            if (r % 10 == 0) {
                s = decode_crop(dec, &base, 0, 0, W, H, 1, &img, box, &got);
                if (s != IMG_OK || cmp_region(&img, base_ref, rw, 0, 0)) bad++;
            }
        }
        EXPECT(bad == 0, "%ld failures", bad);
        EXPECT(now_s() - t0 < 30, "took %.1f s", now_s() - t0);
    }
    jpeg_decoder_free(small);
    for (int i = 0; i < n; i++) free(items[i].b.p);
    free(base.p);
    free(prog.p);
    free(bigprog.p);
    free(base_ref);
    free(px);
}

static void on_alarm(int sig) {
    (void)sig;
    static const char m[] = "not ok - test_jpeg timed out (a decode stalled)\n";
    if (write(1, m, sizeof m - 1) < 0) _exit(1);
    _exit(1);
}

int main(void) {
    signal(SIGALRM, on_alarm);
    const char *limit = getenv("TEST_JPEG_TIMEOUT_S");  // valgrind runs need more
    alarm(limit ? (unsigned)atoi(limit) : 300);
    dec = jpeg_decoder_create(64ll << 20, (size_t)256 << 20);
    test_status_names();
    test_cmyk_formula();
    test_full_and_crops();
    test_scaled_crops();
    test_corpus();
    test_view_equals_copy();
    jpeg_decoder_free(dec);
    image_free(&img);
    return tl_finish();
}
