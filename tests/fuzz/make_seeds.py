#!/usr/bin/python3
"""Write the seed corpora of the fuzz targets into tests/fuzz/corpus/<target>/.

Run once by hand (its output is committed, so CI needs no Python for it):
    /usr/bin/python3 tests/fuzz/make_seeds.py
Seeds are small valid (and a few nearly valid) inputs of each format, so the
fuzzers start from deep in the parsers instead of rediscovering the format.
Crash reproducers are added by hand next to them (named crash-*), never by
this script, which only (re)writes the seed-* files.
"""
import base64
import io
import json
import os
import struct
import sys

from PIL import Image

ROOT = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(ROOT))


def put(target, name, data):
    d = os.path.join(ROOT, "corpus", target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def safetensors(tensors, meta=None, pad=True):
    """tensors: name -> (dtype, shape, bytes)."""
    hdr, off, blob = {}, 0, b""
    for name, (dt, shape, data) in tensors.items():
        hdr[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(data)]}
        off += len(data)
        blob += data
    if meta is not None:
        hdr["__metadata__"] = meta
    h = json.dumps(hdr).encode()
    if pad:
        h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + blob


def seeds_safetensors():
    t = "safetensors"
    put(t, "f32", safetensors({"w": ("F32", [2, 2], bytes(16))}, {"format": "pt"}))
    put(t, "dtypes", safetensors({
        "a.bf16": ("BF16", [3], bytes(6)), "b.f16": ("F16", [1, 2], bytes(4)),
        "c.i64": ("I64", [2], bytes(16)), "d.bool": ("BOOL", [3], bytes(3)),
        "e.f8": ("F8_E4M3", [2], bytes(2)), "f.u8": ("U8", [0, 4], b""),
        "g.scalar": ("F64", [], bytes(8)), "h.i32": ("I32", [1, 1, 1, 2], bytes(8))}))
    put(t, "unpadded", safetensors({"x": ("F32", [1], bytes(4)), "y": ("F16", [3], bytes(6))},
                                   {"k": "v", "format": "np"}, pad=False))
    put(t, "empty", safetensors({}, {"format": "pt"}))
    bad = safetensors({"w": ("F32", [2, 2], bytes(16))})
    put(t, "short", bad[:-4])  # data section too short: refused


def seeds_config():
    t = "config"
    for rel in ("demo/model/config.json", "demo/model/clip/config.json"):
        with open(os.path.join(REPO, rel), "rb") as f:
            put(t, os.path.basename(os.path.dirname(rel)) + "-config.json", f.read())
    put(t, "phi2.json", json.dumps({
        "model_type": "phi", "hidden_size": 64, "intermediate_size": 256,
        "num_hidden_layers": 4, "num_attention_heads": 4, "partial_rotary_factor": 0.5,
        "layer_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "gelu_new",
        "vocab_size": 512, "max_position_embeddings": 2048, "bos_token_id": None,
        "eos_token_id": 50256, "tie_word_embeddings": False, "mm_hidden_size": 32,
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
        "moe": {"moe_enable": True, "moe_mode": "sparse", "moe_layers_idx": [1, 3],
                "num_experts": [4, 4], "top_k_experts": 2, "use_residual": False,
                "expert_names": ["ct", "mri", "xray", "path"]}}, indent=1))
    put(t, "clip-nested.json", json.dumps({"vision_config": {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
        "num_attention_heads": 4, "image_size": 28, "patch_size": 14, "hidden_act": "quick_gelu"}}))


def byte_tokens():
    return [bytes([b]) for b in range(256)]


def seeds_tiktoken():
    t = "tiktoken"
    toks = byte_tokens() + [b"th", b"the", b" the", b"in", b"ing", b"\xe2\x80", b"le", b"sion"]
    lines = "".join("%s %d\n" % (base64.b64encode(tok).decode(), i) for i, tok in enumerate(toks))
    put(t, "small.tiktoken", lines.encode() + b"\0\0" + "Is there a lesion? 123 — the thing".encode())
    put(t, "plain.tiktoken", lines)
    put(t, "holes.tiktoken", "".join("%s %d\n" % (base64.b64encode(tok).decode(), 3 * i)
                                     for i, tok in enumerate(toks[:300])))


def seeds_tokenizer_json():
    t = "tokenizer_json"
    with open(os.path.join(REPO, "demo/model/tokenizer.json"), "rb") as f:
        demo = f.read()
    put(t, "demo.json", demo + b"\0\0" + "What modality is this image?\n  CT ✓ 42".encode())
    # GPT-2 style: ByteLevel pre-tokenizer, merges as "a b" strings and as pairs
    b2u = {}
    n = 0
    for b in range(256):
        if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255:
            b2u[b] = chr(b)
        else:
            b2u[b] = chr(256 + n)
            n += 1
    vocab = {b2u[b]: b for b in range(256)}
    merges = [("t", "h"), ("th", "e"), ("Ġ", "the"), ("i", "n")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    base = {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": len(vocab), "content": "<|endoftext|>", "single_word": False,
                              "lstrip": False, "rstrip": False, "normalized": False,
                              "special": True}],
            "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                              "use_regex": True},
            "post_processor": None, "decoder": {"type": "ByteLevel"},
            "model": {"type": "BPE", "dropout": None, "unk_token": None,
                      "continuing_subword_prefix": None, "end_of_word_suffix": None,
                      "fuse_unk": False, "byte_fallback": False, "vocab": vocab,
                      "merges": ["%s %s" % m for m in merges]}}
    put(t, "gpt2.json", json.dumps(base).encode() + b"\0\0the thing<|endoftext|> in")
    base["model"]["merges"] = [list(m) for m in merges]
    put(t, "pairs.json", json.dumps(base))


def img_bytes(im, fmt, **kw):
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def seeds_image():
    t = "image"
    rgb = Image.new("RGB", (7, 5))
    for y in range(5):
        for x in range(7):
            rgb.putpixel((x, y), (x * 36, y * 50, (x * y * 13) % 256))
    put(t, "rgb.png", img_bytes(rgb, "PNG"))
    put(t, "grey.png", img_bytes(rgb.convert("L"), "PNG"))
    put(t, "la.png", img_bytes(rgb.convert("LA"), "PNG"))
    put(t, "rgba.png", img_bytes(rgb.convert("RGBA"), "PNG"))
    put(t, "palette.png", img_bytes(rgb.convert("P"), "PNG"))
    put(t, "bilevel.png", img_bytes(rgb.convert("1"), "PNG"))
    put(t, "interlaced.png", img_bytes(rgb, "PNG", optimize=False, interlace=1))
    put(t, "grey16.png", img_bytes(rgb.convert("I").point(lambda v: v * 250), "PNG"))
    put(t, "tall.png", img_bytes(Image.new("L", (1, 40), 200), "PNG"))
    put(t, "rgb.jpg", img_bytes(rgb.resize((20, 12)), "JPEG", quality=80))
    put(t, "grey.jpg", img_bytes(rgb.convert("L").resize((17, 9)), "JPEG"))
    put(t, "progressive.jpg", img_bytes(rgb.resize((24, 16)), "JPEG", progressive=True))
    put(t, "444.jpg", img_bytes(rgb.resize((16, 16)), "JPEG", subsampling=0))
    put(t, "cmyk.jpg", img_bytes(rgb.convert("CMYK"), "JPEG"))


def varint(v):
    v &= (1 << 64) - 1
    out = b""
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def pb(fields):
    """fields: [(number, int | str | bytes)] -> protobuf bytes (varint or length-delimited)."""
    out = b""
    for num, val in fields:
        if isinstance(val, float):
            out += varint(num << 3 | 5) + struct.pack("<f", val)
        elif isinstance(val, int):
            out += varint(num << 3) + varint(val)
        else:
            val = val.encode() if isinstance(val, str) else val
            out += varint(num << 3 | 2) + varint(len(val)) + val
    return out


def frames(router, *fr):
    """fuzz_wire's input layout (see tests/fuzz/fuzz_wire.c)."""
    out = bytes([(len(fr) - 1) << 1 | router])
    for i, f in enumerate(fr):
        out += (struct.pack("<H", len(f)) if i + 1 < len(fr) else b"") + f
    return out


def seeds_wire():
    t = "wire"
    ident = b"\x00\x6b\x8b\x45\x67"
    work = pb([(1, 7), (2, 3), (3, 1), (4, 2), (5, 2), (6, 8), (7, 1), (8, 250)])
    put(t, "work", frames(0, pb([(4, work)]), struct.pack("<16f", *range(16))))
    put(t, "work-probe", frames(0, pb([(4, work + pb([(9, 1)]))]), bytes(64)))
    put(t, "welcome", frames(0, pb([(2, pb([(1, 1), (2, 1000), (3, "e2-r1")]))])))
    put(t, "refuse", frames(0, pb([(3, pb([(1, "fingerprint mismatch")]))])))
    put(t, "heartbeat", frames(0, pb([(6, b"")])))
    hello = pb([(1, 1), (2, 2), (3, "2" * 64), (4, "cpu"), (5, 16), (6, "host:42")])
    put(t, "hello", frames(1, ident, pb([(1, hello)])))
    res = pb([(1, 7), (2, 3), (3, 1), (4, 2), (5, 5), (6, 8), (7, 1), (8, 1234)])
    put(t, "result", frames(1, ident, pb([(5, res)]), bytes(160)))
    put(t, "result-busy", frames(1, ident, pb([(5, res + pb([(9, 1), (10, "busy")]))])))
    put(t, "bye", frames(1, ident, pb([(7, pb([(1, "SIGTERM")]))])))
    put(t, "extra-frame", frames(1, ident, pb([(6, b"")]), b"x", b"y"))


def seeds_case_request():
    t = "case_request"
    with open(os.path.join(ROOT, "corpus", "image", "seed-rgb.png"), "rb") as f:
        png = f.read()
    img = pb([(1, png), (2, "image/png")])
    opts = pb([(1, 32), (2, 0.7), (3, 0.9), (4, 1234)])
    ask = pb([(1, "case-0001"), (2, img), (3, "What modality is this image?"), (4, opts),
              (5, "stablelm")])
    put(t, "ask", b"\x00" + ask)
    put(t, "ask-small-limits", b"\x02" + pb([(1, "c"), (3, "Is it CT?"), (4, pb([(1, 4)]))]))
    put(t, "ask-text-only", b"\x00" + pb([(3, "Hello — ✓ 日本語")]))
    put(t, "ask-jpeg-sniff", b"\x00" + pb([(2, pb([(1, b"\xff\xd8\xff\xe0" + bytes(12))])),
                                          (3, "q")]))
    cls = pb([(1, "uid.1.2.840"), (2, pb([(1, png)])), (3, "Which organ?"),
              (4, "lung"), (4, "liver, left lobe"), (4, "brain"), (5, "phi")])
    put(t, "classify", b"\x01" + cls)
    put(t, "classify-small-limits", b"\x03" + pb([(3, "Which?"), (4, "a"), (4, "b")]))
    put(t, "nul-question", b"\x00" + pb([(3, b"What\x00 modality?")]))
    put(t, "repeated-field", b"\x00" + pb([(1, "a"), (3, "q"), (1, "b\x01")]))


def main():
    seeds_safetensors()
    seeds_config()
    seeds_tiktoken()
    seeds_tokenizer_json()
    seeds_image()
    seeds_wire()
    seeds_case_request()
    return 0


if __name__ == "__main__":
    sys.exit(main())
