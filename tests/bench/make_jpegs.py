"""make_jpegs.py OUT_DIR: ImageNet-like JPEGs from real photographs for the decode benchmark (issue 3), as an
ImageFolder (OUT_DIR/train/<class>/*.jpg: bench_decode reads it through the loader's own dataset code).

Sources: Debian's python3-sklearn (china.jpg, flower.jpg, 427x640) and python3-skimage (rocket.jpg 427x640,
hubble_deep_field.jpg, retina.jpg). Each is resized so that it is about 500x375 (landscape) or 375x500 (portrait),
cut and flipped into variants, and saved at quality 90-96 with 4:2:0 and 4:4:4 chroma: 48 files."""
import os
import sys

from PIL import Image

SOURCES = [
    "/usr/lib/python3/dist-packages/sklearn/datasets/images/china.jpg",
    "/usr/lib/python3/dist-packages/sklearn/datasets/images/flower.jpg",
    "/usr/lib/python3/dist-packages/skimage/data/rocket.jpg",
    "/usr/lib/python3/dist-packages/skimage/data/hubble_deep_field.jpg",
    "/usr/lib/python3/dist-packages/skimage/data/retina.jpg",
]


def main(out):
    os.makedirs(out, exist_ok=True)
    for c in range(4):
        os.makedirs(os.path.join(out, "train", f"n{c:08d}"), exist_ok=True)
    srcs = [Image.open(p).convert("RGB") for p in SOURCES if os.path.exists(p)]
    if not srcs:
        sys.exit("make_jpegs: no source photographs (apt-get install python3-sklearn python3-skimage)")
    n = 0
    for k in range(48):
        im = srcs[k % len(srcs)]
        landscape = k % 3 != 0
        w, h = (500, 375) if landscape else (375, 500)
        # a crop of the source with the target aspect ratio, at an offset that differs per variant
        sw, sh = im.size
        scale = min(sw / w, sh / h)
        cw, ch = int(w * scale * (0.8 + 0.2 * ((k * 7) % 5) / 4)), int(h * scale * (0.8 + 0.2 * ((k * 7) % 5) / 4))
        x0, y0 = ((k * 37) % max(1, sw - cw + 1)), ((k * 53) % max(1, sh - ch + 1))
        v = im.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BILINEAR)
        if k % 2:
            v = v.transpose(Image.FLIP_LEFT_RIGHT)
        q = 90 + (k % 7)
        sub = 2 if k % 2 == 0 else 0  # PIL: 2 = 4:2:0, 0 = 4:4:4
        v.save(os.path.join(out, "train", f"n{k % 4:08d}", f"img{k:03d}_q{q}_{'420' if sub == 2 else '444'}.jpg"), quality=q, subsampling=sub)
        n += 1
    print(f"make_jpegs: {n} files in {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/sd-bench-jpegs")
