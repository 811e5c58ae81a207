// image.h: the uint8 image that the decoder, the augmentations and the loader pass around (spec/data.md §2: every
// op works on uint8 RGB, as PIL does).
#pragma once
#include <stddef.h>
#include <stdint.h>

typedef struct {
    int w, h, c;   // width, height, channels (3 = RGB, 1 = grey)
    int stride;    // bytes per row (>= w * c)
    uint8_t *px;   // row-major HWC
    size_t cap;    // bytes allocated at px (buffers are reused: image_reserve grows, never shrinks)
} Image;

// Makes im a w x h x c image with stride w * c, growing its buffer when needed (contents undefined).
void image_reserve(Image *im, int w, int h, int c);
void image_free(Image *im);
