"""torch_decode.py DIR: the peer (DIR and the folders below it) of bench_decode.c: Pillow decode + torchvision RandomResizedCrop(224) +
RandomHorizontalFlip + ToTensor + Normalize (the reference's ImageNet train transform without RandAugment), on the
same in-memory files, one image at a time per process, torch limited to one thread. --procs 1,2 runs 1 and 2
processes at once (the per-core figure and the scaling). --transform eval: Resize(256) + CenterCrop(224) instead
(bench_decode --transform eval); train_ra: the train transform + RandAugment(2, 10) (bench_decode --randaugment 1).
Prints one JSON line per process count."""
import io
import json
import multiprocessing as mp
import os
import sys
import time


def work(args):
    files, seconds, seed, transform = args
    import torch
    import torchvision.transforms as T
    from PIL import Image

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    geo = [T.Resize(256), T.CenterCrop(224)] if transform == "eval" else [T.RandomResizedCrop(224),
                                                                          T.RandomHorizontalFlip()]
    if transform == "train_ra":
        geo.append(T.RandAugment(num_ops=2, magnitude=10, num_magnitude_bins=31))
    tf = T.Compose(geo + [T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    n, i, t0 = 0, seed, time.time()
    while time.time() - t0 < seconds:
        for _ in range(16):
            im = Image.open(io.BytesIO(files[i % len(files)])).convert("RGB")
            tf(im)
            n += 1
            i += 7
    return n, time.time() - t0


def main():
    d = sys.argv[1]
    procs = [int(x) for x in (sys.argv[sys.argv.index("--procs") + 1] if "--procs" in sys.argv else "1,2").split(",")]
    seconds = float(sys.argv[sys.argv.index("--seconds") + 1]) if "--seconds" in sys.argv else 3.0
    transform = sys.argv[sys.argv.index("--transform") + 1] if "--transform" in sys.argv else "train"
    paths = sorted(os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs if f.lower().endswith((".jpg", ".jpeg")))
    files = [open(p, "rb").read() for p in paths]
    import PIL
    import torchvision
    for p in procs:
        with mp.get_context("fork").Pool(p) as pool:
            t0 = time.time()
            res = pool.map(work, [(files, seconds, 1000 * k, transform) for k in range(p)])
            el = time.time() - t0
        n = sum(r[0] for r in res)
        print(json.dumps({"impl": f"pillow {PIL.__version__} + torchvision {torchvision.__version__}", "procs": p,
                          "transform": transform, "files": len(files), "images": n,
                          "img_per_s": round(n / max(r[1] for r in res), 1),
                          "img_per_s_per_proc": round(n / max(r[1] for r in res) / p, 1)}), flush=True)


if __name__ == "__main__":
    main()
