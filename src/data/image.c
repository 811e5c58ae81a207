// image.c: the reusable uint8 image buffer (image.h).
#include "data/image.h"

#include <stdlib.h>

#include "util.h"

void image_reserve(Image *im, int w, int h, int c) {
    CHECK(w >= 0 && h >= 0 && c >= 1, "image_reserve: bad size %dx%dx%d", w, h, c);
    size_t need = (size_t)w * (size_t)h * (size_t)c;
    if (need > im->cap || !im->px) {
        free(im->px);  // contents are undefined after a reserve: no copy
        im->px = xmalloc(need ? need : 1, "image");
        im->cap = need ? need : 1;
    }
    im->w = w;
    im->h = h;
    im->c = c;
    im->stride = w * c;
}

void image_free(Image *im) {
    free(im->px);
    im->px = NULL;
    im->cap = 0;
    im->w = im->h = im->c = im->stride = 0;
}
