"""Minimal safetensors reader/writer (Debian ships no `safetensors` package).

Format (https://huggingface.co/docs/safetensors): an 8-byte little-endian u64 N,
then N bytes of UTF-8 JSON {name: {"dtype", "shape", "data_offsets": [begin, end]},
"__metadata__": {str: str}}, then the raw little-endian tensor bytes; offsets are
relative to the end of the header.

Writer: deterministic (tensors sorted by element size, largest first, then in the order
given, with no gaps; header padded with spaces to a multiple of 8), so the same inputs always give
the same bytes. Tensors are numpy arrays; BF16 is passed as a numpy uint16 array of
raw bf16 bits together with dtype "BF16" (numpy has no bfloat16).

Reader: checks every offset and shape (a corrupt file raises ValueError, never reads
out of bounds) and returns numpy arrays (BF16 → uint16 bits, see `to_float32`).

    from safetensors_io import write_safetensors, read_safetensors, to_float32
    write_safetensors("m.safetensors", {"w": ("F32", np.ones((2, 3), np.float32))})
    tensors, meta = read_safetensors("m.safetensors")   # {"w": ("F32", array)}
    w = to_float32(*tensors["w"])
"""

import json
import os
import struct

import numpy as np

# dtype name -> (numpy dtype for the raw storage, bytes per element)
DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # raw bits
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("u1"),
}


def f32_to_bf16_bits(a):
    """Round float32 to bfloat16 (round to nearest, ties to even); return uint16 bits."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounding = ((u >> 16) & 1) + 0x7FFF
    return ((u + rounding) >> 16).astype(np.uint16)


def bf16_bits_to_f32(bits):
    """Exact widening of bfloat16 bits (uint16) to float32."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def to_float32(dtype, arr):
    """Upcast a stored tensor to float32 (exact for F16/BF16/F32)."""
    if dtype == "BF16":
        return bf16_bits_to_f32(arr)
    return np.asarray(arr).astype(np.float32)


def encode_tensor(dtype, arr):
    """(dtype, array) -> raw little-endian bytes, checking the storage type."""
    if dtype not in DTYPES:
        raise ValueError("unsupported dtype %s" % dtype)
    a = np.ascontiguousarray(arr)
    want = DTYPES[dtype]
    if a.dtype.kind != want.kind or a.dtype.itemsize != want.itemsize:
        raise ValueError("tensor stored as %s must be numpy %s, got %s" % (dtype, want, a.dtype))
    return a.astype(want, copy=False).tobytes()


def build_safetensors(tensors, metadata=None):
    """tensors: ordered dict name -> (dtype, numpy array). Returns the file bytes."""
    header = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs = []
    offset = 0
    # Like the official writer: larger element sizes first, so every tensor is aligned
    # to its element size without gaps (the official reader rejects holes).
    order = sorted(tensors.keys(), key=lambda k: -DTYPES[tensors[k][0]].itemsize)
    for name in order:
        dtype, arr = tensors[name]
        raw = encode_tensor(dtype, arr)
        header[name] = {
            "dtype": dtype,
            "shape": [int(d) for d in np.shape(arr)],
            "data_offsets": [offset, offset + len(raw)],
        }
        blobs.append(raw)
        offset += len(raw)
    hjson = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hjson += b" " * ((-(8 + len(hjson))) % 8)
    return struct.pack("<Q", len(hjson)) + hjson + b"".join(blobs)


def write_safetensors(path, tensors, metadata=None):
    data = build_safetensors(tensors, metadata)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return len(data)


def read_safetensors(path):
    """Returns ({name: (dtype, numpy array)}, metadata dict). Validates the header."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise ValueError("%s: file shorter than the 8-byte header length" % path)
    (hlen,) = struct.unpack("<Q", data[:8])
    if hlen > len(data) - 8:
        raise ValueError("%s: header length %d exceeds file size %d" % (path, hlen, len(data)))
    try:
        header = json.loads(data[8:8 + hlen].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError("%s: bad header JSON: %s" % (path, e))
    if not isinstance(header, dict):
        raise ValueError("%s: header is not a JSON object" % path)
    body = memoryview(data)[8 + hlen:]
    meta = header.pop("__metadata__", {}) or {}
    out = {}
    for name, info in header.items():
        try:
            dtype = info["dtype"]
            shape = [int(d) for d in info["shape"]]
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError("%s: tensor %s: malformed entry %r" % (path, name, info))
        if dtype not in DTYPES:
            raise ValueError("%s: tensor %s: unsupported dtype %s" % (path, name, dtype))
        if any(d < 0 for d in shape):
            raise ValueError("%s: tensor %s: negative dim in %s" % (path, name, shape))
        n = 1
        for d in shape:
            n *= d
        nbytes = n * DTYPES[dtype].itemsize
        if not (0 <= begin <= end <= len(body)) or end - begin != nbytes:
            raise ValueError("%s: tensor %s: offsets [%d, %d] do not fit shape %s %s (body %d bytes)"
                             % (path, name, begin, end, shape, dtype, len(body)))
        arr = np.frombuffer(body[begin:end], dtype=DTYPES[dtype]).reshape(shape)
        out[name] = (dtype, arr)
    return out, meta


def load_checkpoint_dir(model_dir, prefix="model"):
    """Loads `<prefix>.safetensors` or the shards named in `<prefix>.safetensors.index.json`.
    Returns {name: (dtype, array)}."""
    single = os.path.join(model_dir, prefix + ".safetensors")
    index = os.path.join(model_dir, prefix + ".safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            idx = json.load(f)
        wmap = idx["weight_map"]
        out = {}
        for shard in sorted(set(wmap.values())):
            tensors, _ = read_safetensors(os.path.join(model_dir, shard))
            for name, t in tensors.items():
                if wmap.get(name) != shard:
                    raise ValueError("%s: tensor %s not mapped to this shard in the index" % (shard, name))
                out[name] = t
        missing = set(wmap) - set(out)
        if missing:
            raise ValueError("%s: tensors listed in the index but absent: %s" % (index, sorted(missing)[:5]))
        return out
    if os.path.exists(single):
        return read_safetensors(single)[0]
    raise FileNotFoundError("no %s.safetensors or index in %s" % (prefix, model_dir))
