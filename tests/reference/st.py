"""Minimal safetensors reader/writer (numpy only).

Layout: little-endian u64 header length, JSON header (padded with spaces to a multiple of 8),
then the raw little-endian C-contiguous tensor data.  Tensors are written in the given order.
"""

import json
import struct
from collections import OrderedDict

import numpy as np

_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


def _dtype_name(arr):
    for name, d in _DTYPES.items():
        if d.kind == arr.dtype.kind and d.itemsize == arr.dtype.itemsize:
            return name
    raise TypeError("unsupported dtype %s" % arr.dtype)


def save(path, tensors, metadata=None):
    """tensors: iterable of (name, array) pairs or an (ordered) dict; metadata: dict of str -> str."""
    items = list(tensors.items()) if hasattr(tensors, "items") else list(tensors)
    header = OrderedDict()
    if metadata:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError("metadata must map str to str (%r: %r)" % (k, v))
        header["__metadata__"] = OrderedDict(metadata)
    blobs = []
    off = 0
    for name, arr in items:
        if name == "__metadata__" or name in header:
            raise ValueError("bad or duplicate tensor name %r" % name)
        arr = np.asarray(arr)
        dname = _dtype_name(arr)
        data = np.ascontiguousarray(arr, dtype=_DTYPES[dname]).tobytes(order="C")
        header[name] = OrderedDict([("dtype", dname), ("shape", [int(s) for s in arr.shape]),
                                    ("data_offsets", [off, off + len(data)])])
        blobs.append(data)
        off += len(data)
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * ((8 - len(hb) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for b in blobs:
            f.write(b)


def load(path):
    """Returns (OrderedDict name -> numpy array in file order of offsets, metadata dict)."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise ValueError("%s: too short for a safetensors file" % path)
    (n,) = struct.unpack("<Q", raw[:8])
    if n > len(raw) - 8:
        raise ValueError("%s: header length %d exceeds file size" % (path, n))
    header = json.loads(raw[8:8 + n].decode("utf-8"), object_pairs_hook=OrderedDict)
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    out = OrderedDict()
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        dt = _DTYPES[info["dtype"]]
        a, b = info["data_offsets"]
        shape = tuple(info["shape"])
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if b - a != count * dt.itemsize or base + b > len(raw):
            raise ValueError("%s: bad offsets for %s" % (path, name))
        out[name] = np.frombuffer(raw, dtype=dt, count=count, offset=base + a).reshape(shape).copy()
    return out, dict(meta)
