#!/usr/bin/env python3
"""Seeds for fuzz_image: small JPEGs of each kind the decoder handles (baseline 4:2:0, 4:2:2, 4:4:4, grey, CMYK,
progressive, odd sizes, EXIF), a truncated progressive file and a PNG, written by Pillow. Usage: DIR."""
import io
import os
import sys

from PIL import Image


def picture(w, h, mode="RGB"):
    im = Image.new("RGB", (w, h))
    im.putdata([((x * 37 + y * 11) % 256, (x * 5 + y * 53) % 256, (x * y * 3) % 256)
                for y in range(h) for x in range(w)])
    return im.convert(mode)


def jpeg(im, **kw):
    b = io.BytesIO()
    im.save(b, "JPEG", **kw)
    return b.getvalue()


def main(out):
    os.makedirs(out, exist_ok=True)
    seeds = {
        "baseline_420_37x23.jpg": jpeg(picture(37, 23), quality=75, subsampling=2),
        "baseline_422_33x17.jpg": jpeg(picture(33, 17), quality=80, subsampling=1),
        "baseline_444_16x16.jpg": jpeg(picture(16, 16), quality=95, subsampling=0),
        "grey_20x9.jpg": jpeg(picture(20, 9, "L"), quality=70),
        "cmyk_12x12.jpg": jpeg(picture(12, 12, "CMYK"), quality=80),
        "progressive_45x30.jpg": jpeg(picture(45, 30), quality=70, progressive=True),
        "one_pixel.jpg": jpeg(picture(1, 1), quality=90),
        "tall_3x70.jpg": jpeg(picture(3, 70), quality=60),
        "wide_300x8_optimized.jpg": jpeg(picture(300, 8), quality=50, optimize=True),
        "exif_24x24.jpg": jpeg(picture(24, 24), quality=85, exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x00"),
    }
    prog = jpeg(picture(64, 48), quality=70, progressive=True)
    seeds["progressive_truncated.jpg"] = prog[: len(prog) * 3 // 5]
    b = io.BytesIO()
    picture(5, 4).save(b, "PNG")
    seeds["image.png"] = b.getvalue()
    for name, data in seeds.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main(sys.argv[1])
