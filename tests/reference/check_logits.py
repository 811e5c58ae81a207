"""check_logits.py WEIGHTS.safetensors IMAGES.npy LOGITS.npy

Round-trip check (spec 14, fact 23): build the reference PyTorch model from the weights file's
`config` metadata (its `model` section), load the weights with load_state_dict(strict=True), run
eval mode in fp32 on IMAGES (float32 [N,C,H,W], already normalized) and compare with LOGITS
(float32 [N,classes]).  Pass iff max-abs error <= 1e-4 * max|reference logit|.

Exit status: 0 pass, 1 fail (including a weights file that does not load strictly), 2 bad input.
Run with Debian's python (torch 1.13): /usr/bin/python3 tests/reference/check_logits.py ...
"""

import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

REL_TOL = 1e-4


def bad(msg):
    print("check_logits: BAD INPUT: %s" % msg)
    sys.exit(2)


def main(argv):
    if len(argv) != 4:
        print(__doc__.strip().splitlines()[0])
        sys.exit(2)
    wpath, ipath, lpath = argv[1:]
    try:
        import torch
    except ImportError:
        bad("torch is not importable by %s (use /usr/bin/python3)" % sys.executable)
    import models
    import st

    try:
        tensors, meta = st.load(wpath)
    except Exception as e:  # noqa: BLE001
        bad("cannot read %s: %s" % (wpath, e))
    try:
        cfg = json.loads(meta["config"])
        mcfg = cfg["model"]
        if not isinstance(mcfg, dict):
            raise TypeError("model section is not an object")
    except Exception as e:  # noqa: BLE001
        bad("%s: no usable `config` metadata with a `model` section (%s)" % (wpath, e))
    try:
        images = np.load(ipath, allow_pickle=False)
        ref_logits = np.load(lpath, allow_pickle=False)
    except Exception as e:  # noqa: BLE001
        bad("cannot read .npy input: %s" % e)

    try:
        rc = models.resolve_model_config(mcfg)
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
        model = models.build_from_config(mcfg).float()
    except Exception as e:  # noqa: BLE001
        bad("cannot build the reference model from the config: %s" % e)

    if images.dtype != np.float32 or images.ndim != 4:
        bad("images must be float32 [N,C,H,W], got %s %s" % (images.dtype, images.shape))
    n, c, h, w = images.shape
    if c != int(rc["channels"]) or h != int(rc["image_size"]) or w != int(rc["image_size"]) or n == 0:
        bad("images shape %s does not match the config (C=%s, image %s)"
            % (images.shape, rc["channels"], rc["image_size"]))
    if ref_logits.dtype != np.float32 or ref_logits.shape != (n, int(rc["num_classes"])):
        bad("logits must be float32 [%d,%s], got %s %s" % (n, rc["num_classes"], ref_logits.dtype,
                                                           ref_logits.shape))
    if not np.isfinite(images).all():
        bad("images contain non-finite values")

    sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}
    try:
        model.load_state_dict(sd, strict=True)
    except Exception as e:  # noqa: BLE001
        msg = str(e).replace("\n", " ")
        print("check_logits: FAIL load_state_dict(strict=True): %s" % msg[:2000])
        return 1
    nonf32 = [k for k, v in tensors.items() if v.dtype != np.float32]
    if nonf32:
        print("check_logits: FAIL non-F32 tensors in the weights file: %s" % ", ".join(nonf32[:5]))
        return 1

    model.eval()
    with torch.no_grad():
        out = []
        for i in range(0, n, 256):
            out.append(model(torch.from_numpy(np.ascontiguousarray(images[i:i + 256]))).numpy())
    mine = np.concatenate(out, axis=0).astype(np.float32)

    if not np.isfinite(ref_logits).all():
        err = float("inf")
    else:
        err = float(np.abs(mine.astype(np.float64) - ref_logits.astype(np.float64)).max())
    scale = float(np.abs(mine).max())
    tol = REL_TOL * scale
    ok = err <= tol
    print("check_logits: %s arch=%s seed_compat=%s n=%d classes=%d max_abs_err=%.3e max_abs_logit=%.6g "
          "tol=%.3e ratio=%.3g" % ("PASS" if ok else "FAIL", rc["arch"], bool(rc["seed_compat"]), n,
                                    mine.shape[1], err, scale, tol, err / tol if tol > 0 else float("inf")))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
