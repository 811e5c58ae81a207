// jpeg.h: crop-aware JPEG decoding with the libjpeg API of libjpeg-turbo 2.1.5 (spec/data.md §3): DCT scaling to
// 1/2, 1/4 or 1/8 only, jpeg_crop_scanline with a one-iMCU margin, jpeg_skip_scanlines, jpeg_abort_decompress after
// the last needed row; greyscale and CMYK/YCCK converted to RGB; errors longjmp to a per-image handler and come back
// as a status, never an exit or a crash. One JpegDecoder per thread, reused for every image; each image gets a fresh
// libjpeg decompress object inside it, so no quantization or Huffman table of an earlier file reaches a later one.
#pragma once
#include <stddef.h>
#include <stdint.h>

#include "data/image.h"

// Why an image was skipped (IMG_OK: it was not). The loader counts each kind; status.json reports the counts.
typedef enum {
    IMG_OK = 0,
    IMG_EMPTY,            // zero bytes
    IMG_FILE_TOO_BIG,     // over data.max_file_bytes
    IMG_UNKNOWN_FORMAT,   // neither JPEG nor PNG magic
    IMG_PNG,              // a PNG (possibly named .JPEG, as ImageNet has one): skipped
    IMG_TOO_MANY_PIXELS,  // header width x height over data.max_pixels, a side over 65500, or a progressive
                          // coefficient buffer over max_memory_to_use
    IMG_UNSUPPORTED,      // precision other than 8 bits, lossless/hierarchical SOF, an unlisted colour space
    IMG_TOO_MANY_SCANS,   // progressive file with more than 500 scans
    IMG_TRUNCATED,        // premature end of data (JWRN_JPEG_EOF) in the rows read or in the header; any
                          // truncation of a progressive file (PIL: "image file is truncated")
    IMG_CORRUPT,          // any other libjpeg error
    IMG_READ_ERROR,       // the file could not be read
    IMG_STATUS_COUNT
} ImgStatus;

const char *img_status_name(ImgStatus s);  // "ok", "empty", "file_too_big", ... (status.json keys)

// Looks at the magic bytes: IMG_OK for JPEG (FF D8 FF), IMG_PNG, IMG_EMPTY or IMG_UNKNOWN_FORMAT.
ImgStatus img_sniff(const uint8_t *buf, size_t len);

typedef struct JpegDecoder JpegDecoder;

// max_pixels: header width x height limit (data.max_pixels); max_memory: libjpeg's max_memory_to_use (0: none).
JpegDecoder *jpeg_decoder_create(int64_t max_pixels, size_t max_memory);
void jpeg_decoder_free(JpegDecoder *d);

// Reads the header of the JPEG in buf (which must stay valid until jpeg_read_crop or jpeg_close): *w, *h are the
// full image size. Sniffs the magic first (img_sniff), then checks the limits before any allocation. IMG_OK, or why
// it is skipped (the decoder is then idle). An image still open from an earlier jpeg_open is closed first.
ImgStatus jpeg_open(JpegDecoder *d, const uint8_t *buf, size_t len, int *w, int *h);

// Decodes the crop [x, x + cw) x [y, y + ch) of the opened image (full-image pixel coordinates, inside the image)
// and ends this image. With dct_scaling, picks the smallest of 1/2, 1/4, 1/8 at which the scaled crop still covers
// min_w x min_h (else 1/1; only for 4:4:4, 4:2:2, 4:4:0, 4:2:0 and grey: other samplings, 4:1:1 say, decode at
// 1/1). out receives RGB rows covering the crop at that scale (it may hold a few more columns), and box the crop's
// exact position in out's pixel coordinates (x0, y0, x1, y1; fractional when scaled), ready for the Pillow
// resampler's box. *scale_denom gets 1, 2, 4 or 8.
// The pixels inside the crop are exactly those of a full decode at that scale. In this implementation out holds
// exactly the scaled pixels [floor(x/s), ceil((x+cw)/s)) x [floor(y/s), ceil((y+ch)/s)): at 1/1, exactly the crop,
// with box = (0, 0, cw, ch). A crop outside the image, or a call without an open image: IMG_CORRUPT.
ImgStatus jpeg_read_crop(JpegDecoder *d, int x, int y, int cw, int ch, int min_w, int min_h, int dct_scaling,
                         Image *out, double box[4], int *scale_denom);

// jpeg_read_crop without the final copy: *view (the same pixels, size and box) borrows the decoder's buffer, with a
// stride that may exceed w * 3 (the decoded rows keep the margin columns around the crop). The view stays valid
// until the next jpeg_open or jpeg_read_crop_view on d, and must not be passed to image_reserve or image_free.
ImgStatus jpeg_read_crop_view(JpegDecoder *d, int x, int y, int cw, int ch, int min_w, int min_h, int dct_scaling,
                              Image *view, double box[4], int *scale_denom);

// Ends the opened image without decoding (after jpeg_open returned IMG_OK); harmless when idle.
void jpeg_close(JpegDecoder *d);

// Corrupt-data warnings (extraneous bytes, bad Huffman codes, ...) of the images that came back IMG_OK since create:
// the image was used anyway. Warnings of skipped images are not counted.
int64_t jpeg_warning_count(const JpegDecoder *d);
