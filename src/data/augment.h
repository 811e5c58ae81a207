// augment.h: the reference's preprocessing on uint8 images, with torchvision/Pillow semantics (spec/data.md §2):
// the Pillow BILINEAR resampler (antialiased, Resample.c), RandomResizedCrop and RandomCrop geometry, Resize(256) and
// CenterCrop(224), horizontal flip, RandAugment(2, 10, 31) with torchvision's 14 ops, and ToTensor + Normalize.
// Every random draw comes from the caller's Rng (keyed by seed, epoch and dataset index), in a documented order.
#pragma once
#include <stdint.h>

#include "data/image.h"
#include "rng.h"

// Pillow's resize(size, BILINEAR, box) of src's box (x0, y0, x1, y1; fractional allowed) to out_w x out_h: separable,
// horizontal pass first into a uint8 intermediate, fixed-point coefficients, antialiased when downscaling. dst may
// not alias src.
void pil_resize_bilinear(const Image *src, const double box[4], int out_w, int out_h, Image *dst);

// The resampler's working buffers (coefficients, the intermediate rows), kept between calls by a caller that
// resizes many images (one per thread; zero-initialize, release with resize_scratch_free).
#define RS_SLOTS 8
typedef struct ResizeScratch {
    void *p[RS_SLOTS];
    size_t cap[RS_SLOTS];
    // the resize whose coefficients the slots hold, unshifted (pil_resize_window_source leaves them there for the
    // pil_resize_bilinear_window of the same resize, which shifts them): dims = full w, h, out w, h
    int coeffs_valid, key_dims[4], key_ksize[2];
    float key_box[4];
} ResizeScratch;
void resize_scratch_free(ResizeScratch *s);
// The same resize into dst (out_h rows of out_w * c bytes, dst_stride apart; dst may not alias src), mirrored
// left-right when flip is set: the bytes of pil_resize_bilinear followed by hflip, computed as one pass (the
// horizontal coefficients are mirrored, so the flip costs nothing).
void pil_resize_bilinear_to(const Image *src, const double box[4], int out_w, int out_h, int flip, uint8_t *dst,
                            size_t dst_stride, ResizeScratch *s);
// The window [wx, wx + ww) x [wy, wy + wh) of that resize (of a full_w x full_h image) into dst: the bytes of the
// whole resize cropped to the window, computing only the window. src holds the image's pixels [ox, ox + src->w) x
// [oy, oy + src->h), which must cover the rectangle pil_resize_window_source gives: Resize(256) + CenterCrop(224)
// decodes and resamples just what the crop needs.
void pil_resize_bilinear_window(const Image *src, int ox, int oy, int full_w, int full_h, const double box[4],
                                int out_w, int out_h, int wx, int wy, int ww, int wh, uint8_t *dst, size_t dst_stride,
                                ResizeScratch *s);
// The pixels of the full image that window reads: rect = x0, y0, x1, y1 (exclusive ends).
void pil_resize_window_source(int full_w, int full_h, const double box[4], int out_w, int out_h, int wx, int wy,
                              int ww, int wh, ResizeScratch *s, int rect[4]);

// torchvision RandomResizedCrop.get_params(scale (0.08, 1), ratio (3/4, 4/3)) on a W x H image: crop (x, y, w, h).
// Draws, in order, per attempt: U(0.08, 1) for the area, U(ln 3/4, ln 4/3) for the log-ratio; then U{0..H-h} for
// the top and U{0..W-w} for the left.
void rrc_params(Rng *r, int W, int H, int *x, int *y, int *w, int *h);

// Resize(size): the short side to size, the long side to int(size * long / short) (unchanged if short == size).
void resize_short_size(int W, int H, int size, int *out_w, int *out_h);
// CenterCrop(size): top = round((H - size) / 2), left = round((W - size) / 2), halves to even.
void center_crop_pos(int W, int H, int size, int *x, int *y);

// RandomCrop(size, padding pad): zero padding, then i, j uniform in {0..2 pad + H - size} (drawn i then j).
void random_crop_pad(const Image *src, int size, int pad, Rng *r, Image *dst);
// Horizontal flip in place.
void hflip(Image *im);

typedef enum {
    RA_IDENTITY, RA_SHEAR_X, RA_SHEAR_Y, RA_TRANSLATE_X, RA_TRANSLATE_Y, RA_ROTATE, RA_BRIGHTNESS, RA_COLOR,
    RA_CONTRAST, RA_SHARPNESS, RA_POSTERIZE, RA_SOLARIZE, RA_AUTOCONTRAST, RA_EQUALIZE, RA_NUM_OPS
} RaOp;

// One RandAugment op at a signed value (the torchvision value: shear 0.1, translate pixels, degrees, enhance factor
// delta, posterize bits, solarize threshold), NEAREST and fill 0 for the geometric ones. tmp is scratch.
void ra_apply(Image *im, RaOp op, double value, Image *tmp);
// The op's value at bin `magnitude` of `bins` for an image of w x h (torchvision _augmentation_space), unsigned.
double ra_value(RaOp op, int magnitude, int bins, int w, int h);
// RandAugment(num_ops, magnitude, bins): per op, draws rng_below(RA_NUM_OPS) then, for a signed op, a sign
// (rng_uniform < 0.5 negates).
void randaugment(Image *im, Rng *r, int num_ops, int magnitude, int bins, Image *tmp);

// ToTensor + Normalize: out (C, H, W) fp32 = (u / 255 - mean) / std, computed in that order in fp32.
void normalize_chw(const Image *im, const float *mean, const float *std, float *out);
// The same ToTensor + Normalize from a contiguous uint8 (H, W, C) buffer into (C, H, W) fp32: the loader's uint8
// batches are normalized by this (host) or by the backend's images_from_u8 (the same expression, bit for bit).
void normalize_u8_hwc(const uint8_t *in, int C, int H, int W, const float *mean, const float *std, float *out);
// The image's pixels as a contiguous uint8 (H, W, C) buffer.
void image_to_hwc(const Image *im, uint8_t *out);
