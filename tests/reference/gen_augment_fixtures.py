#!/usr/bin/python3
"""Fixtures for tests/unit/test_augment.c: Pillow 9.4 / torchvision 0.14 outputs of the reference's preprocessing
(spec/data.md §2) on deterministic inputs, for bit-exact comparison with src/data/augment.c.

Run with Debian's python3 (it has PIL, torch and torchvision):  /usr/bin/python3 tests/reference/gen_augment_fixtures.py
Writes tests/reference/fixtures/augment.safetensors. Small inputs are stored; the two large ones (500x375, 375x500)
are procedural (proc_image below, mirrored in the C test) so that only outputs take space. The case list is JSON in
the metadata key "cases"; each case names its input and output tensors.
"""

import json
import math
import os
import sys

import numpy as np
import torch
import torchvision
import PIL
from PIL import Image
import torchvision.transforms as T
import torchvision.transforms.functional as F
from torchvision.transforms.autoaugment import _apply_op

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st  # noqa: E402

assert PIL.__version__.startswith("9.4"), PIL.__version__
assert torchvision.__version__.startswith("0.14"), torchvision.__version__

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "augment.safetensors")
M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


def mix64(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def mix64_np(z):
    z = z.astype(np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def proc_image(w, h, seed):
    """A smooth gradient per channel plus 5 bits of hash noise (mirrored by proc_image in test_augment.c)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.int64)
    out = np.zeros((h, w, 3), np.uint8)
    for c in range(3):
        if c == 0:
            base = x * 224 // (w - 1)
        elif c == 1:
            base = y * 224 // (h - 1)
        else:
            base = (x + y) * 224 // (w + h - 2)
        idx = (np.uint64(seed) * np.uint64(1 << 32) + ((y * w + x) * 3 + c).astype(np.uint64))
        noise = (mix64_np(idx) >> np.uint64(59)).astype(np.int64)
        out[:, :, c] = (base + noise).astype(np.uint8)
    return out


class Rng:
    """The project's SplitMix64 stream (src/rng.h), from a raw state."""

    def __init__(self, state):
        self.state = state

    def next(self):
        self.state = (self.state + GOLDEN) & M64
        return mix64(self.state)

    def uniform(self):
        return (self.next() >> 11) * 2.0 ** -53

    def below(self, n):
        return (self.next() * n) >> 64


def rrc_reference(rng, width, height):
    """torchvision RandomResizedCrop.get_params(scale (0.08, 1), ratio (3/4, 4/3)) with the project's draws."""
    area = height * width
    lr0, lr1 = math.log(3.0 / 4.0), math.log(4.0 / 3.0)
    draws = 0
    for _ in range(10):
        target_area = area * (0.08 + (1.0 - 0.08) * rng.uniform())
        aspect_ratio = math.exp(lr0 + (lr1 - lr0) * rng.uniform())
        draws += 2
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = rng.below(height - h + 1)
            j = rng.below(width - w + 1)
            return j, i, w, h, draws + 2, 0
    ratio = (3.0 / 4.0, 4.0 / 3.0)
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w = width
        h = height
    i = (height - h) // 2
    j = (width - w) // 2
    return j, i, w, h, draws, 1


def fuzz(seed, path):
    """Random resize boxes and RandAugment values on random images (not committed: a wider check, run with
    --fuzz SEED PATH and AUGMENT_FIXTURE=PATH build/tests/test_augment)."""
    rs = np.random.RandomState(seed)
    tensors, cases = [], []
    op_names = ["Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
                "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize"]
    for k in range(300):
        w, h = rs.randint(1, 90), rs.randint(1, 90)
        grey = rs.rand() < 0.15
        lo = rs.randint(0, 100)
        hi = rs.randint(lo + 1, 257)
        a = rs.randint(lo, hi, size=(h, w) if grey else (h, w, 3)).astype(np.uint8)
        if rs.rand() < 0.3:  # smooth
            yy, xx = np.mgrid[0:h, 0:w]
            a = ((xx * rs.randint(1, 9) + yy * rs.randint(1, 9)) % 256).astype(np.uint8)
            if not grey:
                a = np.stack([a, a[::-1, :], a[:, ::-1]], -1).copy()
        name = "F%d" % k
        tensors.append(("in." + name, a))
        im = Image.fromarray(a, "L" if grey else "RGB")
        # a resize with a random box
        x0, x1 = sorted(rs.uniform(0, w, 2))
        y0, y1 = sorted(rs.uniform(0, h, 2))
        if rs.rand() < 0.3:
            x0, y0, x1, y1 = 0, 0, w, h
        if x1 - x0 < 0.01 or y1 - y0 < 0.01:
            x0, y0, x1, y1 = 0, 0, w, h
        ow, oh = rs.randint(1, 120), rs.randint(1, 120)
        box = (float(x0), float(y0), float(x1), float(y1))
        out = im.resize((ow, oh), Image.BILINEAR, box=box)
        nm = "out.%d" % len(cases)
        tensors.append((nm, np.asarray(out)))
        cases.append(dict(kind="resize", input=name, out=nm, box=list(box), w=ow, h=oh))
        for _ in range(3):
            op = op_names[rs.randint(0, 14)]
            v = {"ShearX": rs.uniform(-1, 1), "ShearY": rs.uniform(-1, 1), "TranslateX": rs.uniform(-50, 50),
                 "TranslateY": rs.uniform(-50, 50), "Rotate": rs.uniform(-200, 200), "Posterize": rs.randint(1, 9),
                 "Solarize": rs.uniform(0, 256)}.get(op, rs.uniform(-1, 1.5))
            v = float(v)
            out = _apply_op(im, op, v, interpolation=T.InterpolationMode.NEAREST, fill=None)
            nm = "out.%d" % len(cases)
            tensors.append((nm, np.asarray(out)))
            cases.append(dict(kind="ra", input=name, out=nm, op=op_names.index(op), value=v))
    st.save(path, tensors, metadata=dict(cases=json.dumps(cases)))
    print("wrote %s: %d cases" % (path, len(cases)))


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--fuzz":
        fuzz(int(sys.argv[2]), sys.argv[3])
        return
    rs = np.random.RandomState(20240503)
    tensors = []
    cases = []
    inputs = {}

    def add_input(name, arr):
        inputs[name] = arr
        tensors.append(("in." + name, arr))

    def pil(name):
        a = inputs[name]
        return Image.fromarray(a, "L" if a.ndim == 2 else "RGB")

    def add_out(kind, out, **kw):
        name = "out.%d" % len(cases)
        arr = np.asarray(out)
        tensors.append((name, arr))
        d = dict(kind=kind, out=name)
        d.update(kw)
        cases.append(d)

    add_input("A", rs.randint(20, 221, size=(17, 23, 3)).astype(np.uint8))             # 23x17, range 20..220
    yy, xx = np.mgrid[0:32, 0:32]
    grad = np.stack([40 + xx * 5, 40 + yy * 5, 40 + (xx + yy) * 5 // 2], -1).clip(0, 255).astype(np.uint8)
    add_input("B", grad)                                                                   # 32x32 smooth
    add_input("R64", rs.randint(0, 256, size=(64, 64, 3)).astype(np.uint8))              # 64x64 full range
    yy, xx = np.mgrid[0:90, 0:120]
    g2 = np.stack([(xx * 2 + yy) % 256, (yy * 3 + (xx * xx) // 40) % 256, (xx * yy // 17) % 256], -1)
    add_input("G120", g2.astype(np.uint8))                                                # 120x90 structured
    d = np.zeros((32, 32, 3), np.uint8)
    d[:, :, 0] = 77
    d[:, :, 1] = 10
    d[:4, :1, 1] = 200
    d[:, :, 2] = rs.randint(0, 40, size=(32, 32))
    add_input("D", d)                                                                      # equalize edge cases
    add_input("E", rs.randint(0, 256, size=(5, 2, 3)).astype(np.uint8))                  # 2x5 tiny
    add_input("L", rs.randint(30, 190, size=(29, 37)).astype(np.uint8))                  # grey 37x29

    # ---- resize with boxes (Image.resize(size, BILINEAR, box))
    def resize_case(name, box, size):
        out = pil(name).resize(size, Image.BILINEAR, box=box)
        add_out("resize", out, input=name, box=list(box), w=size[0], h=size[1])

    resize_case("R64", (0, 0, 64, 64), (49, 49))        # down 1.3
    resize_case("R64", (0, 0, 64, 64), (24, 24))        # down 2.7
    resize_case("R64", (0, 0, 64, 64), (8, 8))          # down 7.9
    resize_case("G120", (0, 0, 120, 90), (15, 11))      # down ~7.9
    resize_case("G120", (0, 0, 120, 90), (44, 33))      # down ~2.7
    resize_case("A", (0, 0, 23, 17), (80, 61))          # up
    resize_case("A", (0, 0, 23, 17), (23, 40))          # vertical only
    resize_case("A", (0, 0, 23, 17), (11, 17))          # horizontal only
    resize_case("R64", (3.3, 5.7, 60.1, 50.2), (30, 20))
    resize_case("R64", (0.5, 0.25, 63.75, 63.5), (100, 90))
    resize_case("G120", (7.125, 3.6, 113.9, 88.05), (41, 13))
    resize_case("G120", (10, 12, 42, 44), (32, 32))     # integer box of the output size: a crop
    resize_case("G120", (10, 12, 42, 44), (33, 32))
    resize_case("L", (0, 0, 37, 29), (16, 13))
    resize_case("L", (1.5, 2.5, 30.0, 27.0), (50, 40))

    # ---- RandomResizedCrop's functional part: crop then resize (F.resized_crop, bilinear)
    def rcrop_case(name, top, left, h, w, size):
        out = F.resized_crop(pil(name), top, left, h, w, [size[1], size[0]], T.InterpolationMode.BILINEAR)
        add_out("resized_crop", out, input=name, top=top, left=left, ch=h, cw=w, w=size[0], h=size[1])

    rcrop_case("R64", 5, 9, 40, 30, (32, 32))
    rcrop_case("G120", 0, 0, 90, 120, (32, 32))
    rcrop_case("G120", 10, 20, 17, 13, (56, 56))
    proc = {}
    for (w, h, seed) in ((500, 375, 1), (375, 500, 2)):
        nm = "proc:%d:%d:%d" % (w, h, seed)
        proc[nm] = proc_image(w, h, seed)
        inputs[nm] = proc[nm]
    out = F.resized_crop(pil("proc:500:375:1"), 37, 61, 301, 257, [112, 112], T.InterpolationMode.BILINEAR)
    add_out("resized_crop", out, input="proc:500:375:1", top=37, left=61, ch=301, cw=257, w=112, h=112)

    # ---- eval: Resize(256) + CenterCrop(224)
    ev = T.Compose([T.Resize(256), T.CenterCrop(224)])
    for nm in proc:
        add_out("eval", ev(pil(nm)), input=nm, size=256, crop=224)

    # ---- RandomCrop(32, padding 4): the padded image, and two crops at given (i, j)
    padded = F.pad(pil("B"), 4, fill=0)
    add_out("pad", padded, input="B", pad=4)
    for (i, j) in ((0, 8), (3, 5)):
        add_out("crop_at", F.crop(padded, i, j, 32, 32), input="B", pad=4, i=i, j=j, size=32)
    padded = F.pad(pil("A"), 4, fill=0)
    add_out("pad", padded, input="A", pad=4)

    # ---- hflip
    add_out("hflip", F.hflip(pil("A")), input="A")
    add_out("hflip", F.hflip(pil("L")), input="L")

    # ---- RandAugment ops: every op at bin 10 of 31, both signs where signed, via torchvision's _apply_op
    ra = T.RandAugment(num_ops=2, magnitude=10, num_magnitude_bins=31)
    op_names = ["Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
                "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize"]

    def ra_case(name, op, value):
        out = _apply_op(pil(name), op, value, interpolation=T.InterpolationMode.NEAREST, fill=None)
        add_out("ra", out, input=name, op=op_names.index(op), value=value)

    values = []
    for name in ("A", "B", "D", "E", "L"):
        a = inputs[name]
        h, w = a.shape[:2]
        meta = ra._augmentation_space(31, (h, w))
        assert list(meta.keys()) == op_names
        for op in op_names:
            if name == "D" and op_names.index(op) < 6:
                continue  # D is for the histogram and colour ops
            mags, signed = meta[op]
            v = float(mags[10].item()) if mags.ndim > 0 else 0.0
            values.append(dict(op=op_names.index(op), mag=10, bins=31, w=w, h=h, value=v))
            ra_case(name, op, v)
            if signed:
                ra_case(name, op, -v)
    # other magnitudes, and values that take Pillow's other code paths
    for name in ("A",):
        a = inputs[name]
        h, w = a.shape[:2]
        meta = ra._augmentation_space(31, (h, w))
        for op in op_names:
            mags, signed = meta[op]
            if mags.ndim == 0:
                continue
            for m in (0, 1, 7, 30):
                v = float(mags[m].item())
                if m in (0, 1, 5, 7):  # torch's vectorised linspace can round later bins differently
                    values.append(dict(op=op_names.index(op), mag=m, bins=31, w=w, h=h, value=v))
                ra_case(name, op, v if (m % 2 == 0 or not signed) else -v)
    for name in ("A", "E"):
        for v in (90.0, -90.0, 180.0, 270.0, 360.0, 45.0, -137.25):
            ra_case(name, "Rotate", v)
        for v in (0.9, -0.9, 1.5, -1.0):
            for op in ("Brightness", "Color", "Contrast", "Sharpness"):
                ra_case(name, op, v)
        for v in (128.0, 0.0, 255.5, 170.5):
            ra_case(name, "Solarize", v)
        for v in (1, 4, 8):
            ra_case(name, "Posterize", v)
        for v in (0.99, -0.7):
            ra_case(name, "ShearX", v)
            ra_case(name, "ShearY", v)
        for v in (20.9, -31.5):
            ra_case(name, "TranslateX", v)
            ra_case(name, "TranslateY", v)

    for v in (90.0, 270.0, -90.0):
        ra_case("B", "Rotate", v)

    # ---- ToTensor + Normalize
    for name, mean, std in (("A", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                            ("B", (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))):
        t = T.Normalize(mean, std)(T.ToTensor()(pil(name)))
        add_out("norm", t.numpy().astype(np.float32), input=name, mean=list(mean), std=list(std))
    t = T.Normalize((0.2860,), (0.3530,))(T.ToTensor()(pil("L")))
    add_out("norm", t.numpy().astype(np.float32), input="L", mean=[0.2860], std=[0.3530])

    # ---- numbers: RandomResizedCrop parameters with the project's draws, Resize and CenterCrop sizes
    rrc = []
    for k, (w, h) in enumerate([(500, 375), (375, 500), (64, 64), (32, 32), (1000, 10), (10, 1000), (3000, 100),
                                 (100, 3000), (224, 224), (500, 333), (7, 5), (1, 1), (2, 9)]):
        for s in range(6):
            state = mix64(0xA5A5 + 7919 * k + s)
            x, y, cw, ch, draws, fb = rrc_reference(Rng(state), w, h)
            rrc.append(dict(state=str(state), W=w, H=h, x=x, y=y, w=cw, h=ch, draws=draws, fallback=fb))
    short = []
    for (w, h) in [(500, 375), (375, 500), (256, 256), (256, 300), (341, 256), (1000, 3), (3, 1000), (257, 2560),
                   (4000, 3000), (333, 500), (299, 299)]:
        r = F._compute_resized_output_size((h, w), [256])
        short.append(dict(W=w, H=h, size=256, ow=r[1], oh=r[0]))
    center = []
    for (w, h) in [(341, 256), (256, 341), (256, 256), (225, 227), (300, 301), (226, 229), (500, 375), (224, 224)]:
        center.append(dict(W=w, H=h, size=224, x=int(round((w - 224) / 2.0)), y=int(round((h - 224) / 2.0))))

    meta = dict(cases=json.dumps(cases), rrc=json.dumps(rrc), short=json.dumps(short),
                center=json.dumps(center), ra_values=json.dumps(values),
                versions="Pillow %s, torchvision %s, torch %s" % (PIL.__version__, torchvision.__version__,
                                                                  torch.__version__))
    st.save(OUT, tensors, metadata=meta)
    print("wrote %s: %d cases, %d bytes" % (OUT, len(cases), os.path.getsize(OUT)))


if __name__ == "__main__":
    main()
