// jpeg.c: crop-aware JPEG decoding with the libjpeg API of libjpeg-turbo 2.1.5 (spec/data.md §3, jpeg.h).
//
// One jpeg_decompress_struct per JpegDecoder, reused for every image (jpeg_mem_src; reset by
// jpeg_abort_decompress). libjpeg errors longjmp back to the setjmp of jpeg_open / jpeg_read_crop, which aborts the
// image and returns a status; warnings (msg_level -1) are counted, never printed.
//
// Status of a libjpeg error (status_of_error):
//   - the progress monitor saw scan 501              -> IMG_TOO_MANY_SCANS (TurboJPEG's TJFLAG_LIMITSCANS rule)
//   - JERR_BAD_PRECISION (12-bit), SOF3/5-15 unsupported (lossless, hierarchical), 2-component or otherwise
//     unconvertible colour space, features not compiled in  -> IMG_UNSUPPORTED
//   - a dimension over JPEG_MAX_DIMENSION (65500), a coefficient buffer over max_memory_to_use (progressive files:
//     libjpeg then asks for a backing store, which jmemnobs.c refuses), out of memory -> IMG_TOO_MANY_PIXELS
//   - any other error after a premature end of data (JWRN_JPEG_EOF) -> IMG_TRUNCATED; else IMG_CORRUPT.
// An image whose rows were read but that hit JWRN_JPEG_EOF on the way is IMG_TRUNCATED as well (libjpeg would have
// padded it with grey; PIL raises "image file is truncated"). For a progressive file jpeg_start_decompress reads
// every scan, so any truncation of a progressive file is IMG_TRUNCATED whatever the crop; for a baseline file only
// a truncation inside the rows [0, crop bottom] is seen (rows below the crop are never entropy-decoded).
// Other corrupt-data warnings (bad Huffman code, extraneous bytes, hit marker, ...) leave the image IMG_OK; they are
// added to jpeg_warning_count() when the image comes back IMG_OK.
//
// CMYK and YCCK: libjpeg has no CMYK->RGB conversion, so the library is asked for JCS_CMYK (it converts YCCK to
// CMYK itself) and the stored values are converted as Pillow does. Pillow opens every 4-component JPEG with raw mode
// "CMYK;I" (Adobe-inverted CMYK, whether or not an Adobe marker is present) and convert("RGB") computes
// nk = 255 - K = sK, R = nk - MULDIV255(C, nk) with C = 255 - sC (Convert.c cmyk2rgb), i.e. on the stored bytes
//   R = sK - muldiv255(255 - sC, sK),  muldiv255(a, b) = (t = a*b + 128, ((t >> 8) + t) >> 8)
// and likewise G (sM) and B (sY). Pillow's CMYK;I result is always in [0, sK], so no clipping is needed.
//
// setjmp: the handlers read only d, which is never changed after setjmp, so no local needs to be volatile.
//
// Crop: with a one-iMCU margin on each side (as scaled) the columns of the crop are those of a full decode
// (libjpeg's fancy upsampling treats the ends of a partial row as image edges, and the margin keeps those edge
// effects outside the crop). The margin is dropped when copying, so out holds exactly the columns covering the
// crop at the chosen scale.
#include "data/jpeg.h"

#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jerror.h>
#include <jpeglib.h>

#include "util.h"

#define JPEG_MAX_SCANS 500
#define JPEG_BAND 16  // rows per jpeg_read_scanlines call

typedef struct {
    struct jpeg_error_mgr pub;
    jmp_buf jb;
} ErrMgr;

struct JpegDecoder {
    struct jpeg_decompress_struct cinfo;
    ErrMgr err;
    struct jpeg_progress_mgr progress;
    int64_t max_pixels;
    size_t max_memory;
    int64_t warnings;        // corrupt-data warnings of images that came back IMG_OK
    int image_warnings;      // warnings of the current image
    int eof;                 // JWRN_JPEG_EOF seen in the current image
    int too_many_scans;      // the progress monitor stopped the current image
    int open;                // a header was read and the image is not finished
    int cmyk;                // the current image is decoded as JCS_CMYK
    uint8_t *row;            // a band of output rows as libjpeg writes them (RGB or CMYK, cropped width)
    size_t row_cap;
    Image own;               // the rows of jpeg_read_crop_view (decoded width), which the view borrows
};

static const char *const status_names[IMG_STATUS_COUNT] = {
    "ok", "empty", "file_too_big", "unknown_format", "png", "too_many_pixels", "unsupported", "too_many_scans",
    "truncated", "corrupt", "read_error",
};

const char *img_status_name(ImgStatus s) {
    return (s >= 0 && s < IMG_STATUS_COUNT) ? status_names[s] : "invalid";
}

ImgStatus img_sniff(const uint8_t *buf, size_t len) {
    static const uint8_t png[8] = {0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A};
    if (len == 0) return IMG_EMPTY;
    if (len >= 3 && buf[0] == 0xFF && buf[1] == 0xD8 && buf[2] == 0xFF) return IMG_OK;
    if (len >= 8 && memcmp(buf, png, 8) == 0) return IMG_PNG;
    return IMG_UNKNOWN_FORMAT;
}

// ---------------------------------------------------------------- libjpeg callbacks

static void on_error_exit(j_common_ptr cinfo) {
    ErrMgr *e = (ErrMgr *)cinfo->err;
    longjmp(e->jb, 1);
}

static void on_emit_message(j_common_ptr cinfo, int msg_level) {
    if (msg_level >= 0) return;  // trace messages: ignored
    JpegDecoder *d = (JpegDecoder *)cinfo->client_data;
    cinfo->err->num_warnings++;
    d->image_warnings++;
    if (cinfo->err->msg_code == JWRN_JPEG_EOF) d->eof = 1;
}

static void on_output_message(j_common_ptr cinfo) { (void)cinfo; }  // never print

static void on_progress(j_common_ptr cinfo) {
    if (!cinfo->is_decompressor) return;
    j_decompress_ptr dinfo = (j_decompress_ptr)cinfo;
    if (dinfo->input_scan_number > JPEG_MAX_SCANS) {
        JpegDecoder *d = (JpegDecoder *)cinfo->client_data;
        d->too_many_scans = 1;
        longjmp(d->err.jb, 1);
    }
}

// ---------------------------------------------------------------- decoder

// A new decompress object for the next image. libjpeg keeps the quantization and Huffman tables an image defined
// in its decompress object, for abbreviated streams (Motion-JPEG): a later file that lacks a table, or uses a slot
// it did not define, decodes with the previous file's table where a fresh decoder (Pillow's, one per image) would
// use the standard Huffman table or stop. Fuzzing found such a file decoding to other pixels after another image.
// A fresh object per image (a few allocations, microseconds against milliseconds of decoding) makes an image's
// pixels depend on its own bytes alone, whichever thread decodes it after whichever file.
static void fresh_object(JpegDecoder *d) {
    jpeg_destroy_decompress(&d->cinfo);  // a no-op on the zeroed struct of jpeg_decoder_create (no memory manager)
    if (setjmp(d->err.jb)) DIE("jpeg_create_decompress failed");  // only out of memory
    jpeg_create_decompress(&d->cinfo);  // keeps cinfo.err and cinfo.client_data
    d->cinfo.progress = &d->progress;
}

JpegDecoder *jpeg_decoder_create(int64_t max_pixels, size_t max_memory) {
    JpegDecoder *d = xcalloc(sizeof *d, "jpeg decoder");
    d->max_pixels = max_pixels;
    d->max_memory = max_memory;
    d->cinfo.err = jpeg_std_error(&d->err.pub);
    d->err.pub.error_exit = on_error_exit;
    d->err.pub.emit_message = on_emit_message;
    d->err.pub.output_message = on_output_message;
    d->cinfo.client_data = d;
    d->progress.progress_monitor = on_progress;
    fresh_object(d);
    return d;
}

void jpeg_decoder_free(JpegDecoder *d) {
    if (!d) return;
    jpeg_destroy_decompress(&d->cinfo);
    free(d->row);
    image_free(&d->own);
    free(d);
}

int64_t jpeg_warning_count(const JpegDecoder *d) { return d->warnings; }

void jpeg_close(JpegDecoder *d) {
    if (d->open) jpeg_abort_decompress(&d->cinfo);
    d->open = 0;
}

static ImgStatus status_of_error(JpegDecoder *d) {
    if (d->too_many_scans) return IMG_TOO_MANY_SCANS;
    switch (d->err.pub.msg_code) {
    case JERR_BAD_PRECISION:
    case JERR_SOF_UNSUPPORTED:
    case JERR_CONVERSION_NOTIMPL:
    case JERR_BAD_J_COLORSPACE:
    case JERR_ARITH_NOTIMPL:
    case JERR_NOT_COMPILED:
        return IMG_UNSUPPORTED;
    case JERR_IMAGE_TOO_BIG:
    case JERR_WIDTH_OVERFLOW:
    case JERR_NO_BACKING_STORE:
    case JERR_OUT_OF_MEMORY:
        return IMG_TOO_MANY_PIXELS;
    default:
        return d->eof ? IMG_TRUNCATED : IMG_CORRUPT;
    }
}

// Ends the current image after an error or a rejection and says why.
static ImgStatus fail(JpegDecoder *d, ImgStatus s) {
    jpeg_abort_decompress(&d->cinfo);
    d->open = 0;
    return s;
}

ImgStatus jpeg_open(JpegDecoder *d, const uint8_t *buf, size_t len, int *w, int *h) {
    jpeg_close(d);
    ImgStatus s = img_sniff(buf, len);
    if (s != IMG_OK) return s;
    fresh_object(d);  // no table of an earlier image may reach this one
    d->image_warnings = 0;
    d->eof = 0;
    d->too_many_scans = 0;
    d->cmyk = 0;
    struct jpeg_decompress_struct *ci = &d->cinfo;
    if (setjmp(d->err.jb)) return fail(d, status_of_error(d));
    d->open = 1;
    ci->mem->max_memory_to_use = (long)d->max_memory;
    jpeg_mem_src(ci, buf, (unsigned long)len);
    jpeg_read_header(ci, TRUE);  // require_image: errors out (JERR_NO_IMAGE) on a tables-only stream
    if ((int64_t)ci->image_width * (int64_t)ci->image_height > d->max_pixels) return fail(d, IMG_TOO_MANY_PIXELS);
    if (ci->data_precision != 8) return fail(d, IMG_UNSUPPORTED);
    switch (ci->jpeg_color_space) {
    case JCS_GRAYSCALE:
        if (ci->num_components != 1) return fail(d, IMG_UNSUPPORTED);
        break;
    case JCS_YCbCr:
    case JCS_RGB:
        if (ci->num_components != 3) return fail(d, IMG_UNSUPPORTED);
        break;
    case JCS_CMYK:
    case JCS_YCCK:
        if (ci->num_components != 4) return fail(d, IMG_UNSUPPORTED);
        d->cmyk = 1;
        break;
    default:
        return fail(d, IMG_UNSUPPORTED);
    }
    *w = (int)ci->image_width;
    *h = (int)ci->image_height;
    return IMG_OK;
}

// DCT scaling is used only where 2.1.5 crops correctly: every component subsampled by 1 or 2 in each direction
// relative to the largest factors, i.e. 4:4:4, 4:2:2, 4:4:0, 4:2:0 and grey (and CMYK/YCCK with such factors);
// never 4:1:1, 4:1:0 or 4x2 / 2x4 layouts (jpeg_crop_scanline miscomputes their widths when scaled).
static int scaling_allowed(const struct jpeg_decompress_struct *ci) {
    int mh = ci->max_h_samp_factor, mv = ci->max_v_samp_factor;
    for (int i = 0; i < ci->num_components; i++) {
        const jpeg_component_info *c = &ci->comp_info[i];
        if (mh % c->h_samp_factor || mv % c->v_samp_factor) return 0;
        int rh = mh / c->h_samp_factor, rv = mv / c->v_samp_factor;
        if (rh > 2 || rv > 2) return 0;
    }
    return 1;
}

static inline uint8_t muldiv255(int a, int b) {
    int t = a * b + 128;
    return (uint8_t)(((t >> 8) + t) >> 8);
}

// The columns of margin (scaled pixels) to decode on each side of a crop so that its own columns are those of a full
// decode; called after jpeg_start_decompress. Only two things reach across columns:
//   - fancy 2:1 horizontal upsampling (h2v1, h2v2: jdsample.c picks it when a component's h_in_group * 2 ==
//     h_out_group), which gives the first and the last column of a partial row the image-edge formula; a margin of
//     2 columns (1 would do) keeps them outside the crop. Replication (int_upsample), vertical-only h1v2 and
//     full-size components use no neighbouring column;
//   - progressive block smoothing, which reads the neighbouring blocks: one iMCU of margin, as before.
// The IDCT itself is block-local. jpeg_crop_scanline then widens the left end to an iMCU boundary anyway, so the
// margin costs at most its own columns. A narrower margin decodes up to ~30 fewer columns per row (4:2:0) than the
// one-iMCU rule, and none on 4:4:4, where no column reaches across.
static int crop_margin(const struct jpeg_decompress_struct *ci) {
    int imcu = (ci->num_components == 1) ? ci->min_DCT_scaled_size
                                         : ci->min_DCT_scaled_size * ci->max_h_samp_factor;
    if (ci->progressive_mode) return imcu;
    if (ci->num_components == 1) return 0;
    int margin = 0;
    for (int i = 0; i < ci->num_components; i++) {
        const jpeg_component_info *c = &ci->comp_info[i];
        int h_in = c->h_samp_factor * c->DCT_scaled_size / ci->min_DCT_scaled_size;
        if (h_in * 2 == ci->max_h_samp_factor) margin = 2;
        else if (h_in != ci->max_h_samp_factor && ci->max_h_samp_factor % h_in) return imcu;  // not a libjpeg case
    }
    return margin;
}

// The largest of 8, 4, 2 at which a cw x ch crop still covers min_w x min_h, else 1 (spec/data.md §3.3).
__attribute__((noinline)) static int pick_denom(int cw, int ch, int min_w, int min_h) {
    for (int s = 8; s >= 2; s /= 2)
        if ((int64_t)cw >= (int64_t)s * min_w && (int64_t)ch >= (int64_t)s * min_h) return s;
    return 1;
}

// jpeg_read_crop and jpeg_read_crop_view. view: out becomes a view of d->own (its rows at the decoded width, with
// the margin columns beside the crop), so that an RGB crop is written once, by libjpeg, and never copied.
static ImgStatus read_crop(JpegDecoder *d, int x, int y, int cw, int ch, int min_w, int min_h, int dct_scaling,
                           Image *out, double box[4], int *scale_denom, int view) {
    struct jpeg_decompress_struct *ci = &d->cinfo;
    if (!d->open) return IMG_CORRUPT;
    int W = (int)ci->image_width, H = (int)ci->image_height;
    if (x < 0 || y < 0 || cw < 1 || ch < 1 || x > W - cw || y > H - ch) return fail(d, IMG_CORRUPT);  // a bad crop

    int denom = dct_scaling && min_w > 0 && min_h > 0 && scaling_allowed(ci) ? pick_denom(cw, ch, min_w, min_h) : 1;
    // The crop in scaled pixels: scaled pixel i covers original pixels [i*denom, (i+1)*denom).
    int sx0 = x / denom, sy0 = y / denom;
    int sx1 = (x + cw + denom - 1) / denom, sy1 = (y + ch + denom - 1) / denom;
    int ow = sx1 - sx0, oh = sy1 - sy0;

    if (setjmp(d->err.jb)) return fail(d, status_of_error(d));
    ci->scale_num = 1;
    ci->scale_denom = (unsigned)denom;
    ci->out_color_space = d->cmyk ? JCS_CMYK : JCS_RGB;
    ci->dct_method = JDCT_ISLOW;         // Pillow's defaults: parity with the reference
    ci->do_fancy_upsampling = TRUE;
    ci->buffered_image = FALSE;
    jpeg_start_decompress(ci);  // progressive: reads every scan here (the progress monitor counts them)
    if (sx1 > (int)ci->output_width || sy1 > (int)ci->output_height) return fail(d, IMG_CORRUPT);  // cannot happen

    int margin = crop_margin(ci);
    int wx0 = sx0 - margin < 0 ? 0 : sx0 - margin;
    int wx1 = sx1 + margin > (int)ci->output_width ? (int)ci->output_width : sx1 + margin;
    JDIMENSION xoff = (JDIMENSION)wx0, width = (JDIMENSION)(wx1 - wx0);
    if (xoff != 0 || width != ci->output_width) jpeg_crop_scanline(ci, &xoff, &width);  // may widen
    int col0 = sx0 - (int)xoff;  // the crop's first column in a decoded row
    int ncomp = ci->output_components;
    size_t row_bytes = (size_t)ci->output_width * (size_t)ncomp;
    Image *dst = out;
    if (view && !d->cmyk) {  // every decoded row straight into d->own; out looks at its columns col0 .. col0 + ow
        image_reserve(&d->own, (int)ci->output_width, oh, 3);
        dst = &d->own;
    } else {
        if (view) dst = &d->own;
        image_reserve(dst, ow, oh, 3);
    }
    // Rows are read straight into dst when the decoded rows are exactly dst's rows; else through a scratch band
    // of up to JPEG_BAND rows (libjpeg hands out at most one row group per call anyway), trimmed or converted.
    int direct = !d->cmyk && (view || (col0 == 0 && (int)ci->output_width == ow));
    if (!direct && row_bytes * JPEG_BAND > d->row_cap) {
        free(d->row);
        d->row = xmalloc(row_bytes * JPEG_BAND, "jpeg rows");
        d->row_cap = row_bytes * JPEG_BAND;
    }
    if (sy0 > 0) {
        JDIMENSION skipped = jpeg_skip_scanlines(ci, (JDIMENSION)sy0);
        if ((int)skipped != sy0) return fail(d, d->eof ? IMG_TRUNCATED : IMG_CORRUPT);
    }
    JSAMPROW rows[JPEG_BAND];
    for (int r = 0; r < oh;) {
        int want = oh - r < JPEG_BAND ? oh - r : JPEG_BAND;
        for (int i = 0; i < want; i++)
            rows[i] = direct ? dst->px + (size_t)(r + i) * (size_t)dst->stride : d->row + (size_t)i * row_bytes;
        int got = (int)jpeg_read_scanlines(ci, rows, (JDIMENSION)want);
        if (got <= 0) return fail(d, d->eof ? IMG_TRUNCATED : IMG_CORRUPT);
        for (int i = 0; !direct && i < got; i++) {
            uint8_t *o = dst->px + (size_t)(r + i) * (size_t)dst->stride;
            const uint8_t *src = rows[i] + (size_t)col0 * (size_t)ncomp;
            if (!d->cmyk) {
                memcpy(o, src, (size_t)ow * 3);
            } else {
                for (int k = 0; k < ow; k++, src += 4, o += 3) {
                    int kk = src[3];
                    o[0] = (uint8_t)(kk - muldiv255(255 - src[0], kk));
                    o[1] = (uint8_t)(kk - muldiv255(255 - src[1], kk));
                    o[2] = (uint8_t)(kk - muldiv255(255 - src[2], kk));
                }
            }
        }
        r += got;
    }
    jpeg_abort_decompress(ci);  // rows below the crop are never entropy-decoded
    d->open = 0;
    if (d->eof) return IMG_TRUNCATED;
    if (view) {  // a borrowed view (cap 0): the crop's columns of d->own
        *out = d->own;
        out->cap = 0;
        if (!d->cmyk) {
            out->px = d->own.px + (size_t)col0 * 3;
            out->w = ow;
        }
    }
    d->warnings += d->image_warnings;
    box[0] = (double)x / denom - sx0;
    box[1] = (double)y / denom - sy0;
    box[2] = (double)(x + cw) / denom - sx0;
    box[3] = (double)(y + ch) / denom - sy0;
    *scale_denom = denom;
    return IMG_OK;
}

ImgStatus jpeg_read_crop(JpegDecoder *d, int x, int y, int cw, int ch, int min_w, int min_h, int dct_scaling,
                         Image *out, double box[4], int *scale_denom) {
    return read_crop(d, x, y, cw, ch, min_w, min_h, dct_scaling, out, box, scale_denom, 0);
}

ImgStatus jpeg_read_crop_view(JpegDecoder *d, int x, int y, int cw, int ch, int min_w, int min_h, int dct_scaling,
                              Image *view, double box[4], int *scale_denom) {
    return read_crop(d, x, y, cw, ch, min_w, min_h, dct_scaling, view, box, scale_denom, 1);
}
