#!/usr/bin/python3
"""Black-box bad-input tests of medmoe-run: every broken input ends in a clean failure.

    run_errors.py --run BIN --model DIR --images DIR --work DIR [-k SUBSTRING]

DIR is a tiny checkpoint (tools/make_tiny_checkpoint.py, single-file safetensors) with
its CLIP tower in DIR/clip; --images holds case.png and case.jpg
(tests/make_test_image.py). Each case builds a broken copy under --work (checkpoint files
copied and modified in Python; nothing in DIR is touched), runs medmoe-run on it and
demands:
  * an exit status of 1 or 2 — not 0, not killed by a signal (a crash), and not the
    sanitizers' codes (ASan/LSan report through a different status and text);
  * stderr naming the right thing (file, tensor, field, shapes), case-insensitively;
  * no sanitizer report on stderr (the same test runs in the ASan build, so a leak on
    an error path fails here).
--help must exit 0 and print the usage on stdout. -k runs only the cases whose name
contains SUBSTRING. Prints one line per case; exits 1 if any failed.
"""

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "tools"))
import numpy as np  # noqa: E402
from safetensors_io import read_safetensors, write_safetensors  # noqa: E402

QUESTION = "What modality is this image?"
SANITIZER_MARKS = ("AddressSanitizer", "LeakSanitizer", "UndefinedBehaviorSanitizer",
                   "runtime error:")
Q_PROJ_1 = "model.layers.1.self_attn.q_proj.weight"


# ---------------------------------------------------------------------------------------
# safetensors surgery (raw header edits keep the data bytes as they are)

def st_split(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def st_join(path, header, body):
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((-(8 + len(h))) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + body)


def st_edit(path, fn):
    header, body = st_split(path)
    fn(header, len(body))
    st_join(path, header, body)


def st_rewrite(path, fn):
    """Decode all tensors, let fn change the dict, write a well-formed file again."""
    tensors, meta = read_safetensors(path)
    tensors = dict(tensors)
    fn(tensors)
    write_safetensors(path, tensors, meta)


def biggest_tensor(header):
    names = [k for k in header if k != "__metadata__"]
    return max(names, key=lambda k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0])


# ---------------------------------------------------------------------------------------
# images

def png_chunk(kind, payload):
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))


def png_header_only(w, h):
    """A PNG whose IHDR claims w x h RGB pixels, with one tiny IDAT (valid CRCs)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + png_chunk(b"IEND", b""))


# ---------------------------------------------------------------------------------------

class Runner:
    def __init__(self, a):
        self.a = a
        self.bin = a.run
        self.model = a.model
        self.png = os.path.join(a.images, "case.png")
        self.jpg = os.path.join(a.images, "case.jpg")
        self.work = a.work
        self.failures = []
        self.count = 0

    def copy_model(self, name):
        """A private copy of the checkpoint (and clip/) to break."""
        d = os.path.join(self.work, name)
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(self.model, d, ignore=shutil.ignore_patterns("golden", "out*"))
        return d

    def file(self, name, data):
        p = os.path.join(self.work, name)
        with open(p, "wb") as f:
            f.write(data)
        return p

    def argv(self, model=None, vision=None, image=None, question=QUESTION, extra=()):
        model = model or self.model
        vision = os.path.join(model, "clip") if vision is None else vision
        v = [self.bin, "--model", model]
        if vision:
            v += ["--vision", vision]
        v += ["--image", image or self.png]
        if question is not None:
            v += ["--question", question]
        return v + ["--max-tokens", "2"] + list(extra)

    def case(self, name, argv, expect, codes=(1, 2)):
        """Run argv; the exit status must be in codes and stderr must contain every
        string in expect (case-insensitive)."""
        if self.a.k and self.a.k not in name:
            return
        self.count += 1
        try:
            p = subprocess.run(argv, capture_output=True, timeout=60)
        except subprocess.TimeoutExpired:
            self.fail(name, "timed out after 60 s", "")
            return
        err = p.stderr.decode("utf-8", "replace")
        problems = []
        if p.returncode < 0:
            problems.append("killed by signal %d" % -p.returncode)
        elif p.returncode not in codes:
            problems.append("exit status %d, want %s" % (p.returncode, "/".join(map(str, codes))))
        for mark in SANITIZER_MARKS:
            if mark in err:
                problems.append("sanitizer report (%s)" % mark)
                break
        missing = [s for s in expect if s.lower() not in err.lower()]
        if missing:
            problems.append("stderr lacks %s" % ", ".join(repr(s) for s in missing))
        first = err.strip().splitlines()[0] if err.strip() else "(no stderr)"
        if problems:
            self.fail(name, "; ".join(problems), err)
        else:
            print("ok    %-28s rc=%d  %s" % (name, p.returncode, first[:150]))
        return p

    def fail(self, name, why, err):
        self.failures.append(name)
        print("FAIL  %-28s %s" % (name, why))
        for line in err.strip().splitlines()[:40]:
            print("        | " + line)


def checkpoint_cases(r):
    st = "model.safetensors"

    d = r.copy_model("truncated")
    p = os.path.join(d, st)
    os.truncate(p, os.path.getsize(p) // 2)
    r.case("truncated-safetensors", r.argv(model=d), [st])

    d = r.copy_model("short-file")
    with open(os.path.join(d, st), "wb") as f:
        f.write(b"\x10\0\0")  # shorter than the 8-byte length
    r.case("safetensors-3-bytes", r.argv(model=d), [st])

    d = r.copy_model("header-beyond")
    p = os.path.join(d, st)
    size = os.path.getsize(p)
    with open(p, "r+b") as f:
        f.write(struct.pack("<Q", size + 1000))
    r.case("header-length-beyond-file", r.argv(model=d), [st, "header"])

    d = r.copy_model("header-huge")
    with open(os.path.join(d, st), "r+b") as f:
        f.write(struct.pack("<Q", 0xFFFFFFFFFFFFFFF0))  # overflows 8 + n
    r.case("header-length-2^64", r.argv(model=d), [st, "header"])

    d = r.copy_model("header-json")
    p = os.path.join(d, st)
    with open(p, "r+b") as f:
        f.seek(8)
        f.write(b"{\"x\":[")  # not JSON any more
    r.case("header-bad-json", r.argv(model=d), [st])

    # Overlap: the second tensor's span is moved to start inside the first one.
    d = r.copy_model("overlap")
    p = os.path.join(d, st)

    def overlap(h, body_len):
        names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
        a, b = names[0], names[1]
        ab, ae = h[a]["data_offsets"]
        bb, be = h[b]["data_offsets"]
        h[b]["data_offsets"] = [ab + 4, ab + 4 + (be - bb)]
    st_edit(p, overlap)
    r.case("offsets-overlap", r.argv(model=d), [st, "overlap"])

    # Outside: the largest tensor ends past the data section.
    d = r.copy_model("outside")
    p = os.path.join(d, st)

    def outside(h, body_len):
        n = biggest_tensor(h)
        b, e = h[n]["data_offsets"]
        h[n]["data_offsets"] = [body_len - (e - b) + 64, body_len + 64]
        outside.name = n
    st_edit(p, outside)
    r.case("offsets-outside-data", r.argv(model=d), [st, outside.name])

    # Offsets that disagree with shape x dtype size (end - begin too small).
    d = r.copy_model("offsets-size")
    p = os.path.join(d, st)

    def shrink(h, body_len):
        b, e = h[Q_PROJ_1]["data_offsets"]
        h[Q_PROJ_1]["data_offsets"] = [b, e - 4]
    st_edit(p, shrink)
    r.case("offsets-size-mismatch", r.argv(model=d), [st, Q_PROJ_1])

    d = r.copy_model("missing")
    st_rewrite(os.path.join(d, st), lambda t: t.pop(Q_PROJ_1))
    r.case("missing-tensor", r.argv(model=d), [Q_PROJ_1])

    d = r.copy_model("missing-clip")
    clip_name = "vision_model.encoder.layers.1.mlp.fc1.weight"
    st_rewrite(os.path.join(d, "clip", st), lambda t: t.pop(clip_name))
    r.case("missing-clip-tensor", r.argv(model=d), [clip_name])

    d = r.copy_model("shape")
    p = os.path.join(d, st)
    tensors, _ = read_safetensors(p)
    want = list(tensors[Q_PROJ_1][1].shape)
    got = [want[0], want[1] - 16]

    def reshape(t):
        dt, arr = t[Q_PROJ_1]
        t[Q_PROJ_1] = (dt, np.ascontiguousarray(arr[:, :got[1]]))
    st_rewrite(p, reshape)
    fmt = lambda s: "[" + ", ".join(str(x) for x in s) + "]"  # noqa: E731
    r.case("wrong-shape", r.argv(model=d), [Q_PROJ_1, fmt(want), fmt(got)])

    d = r.copy_model("dtype")
    st_edit(os.path.join(d, st), lambda h, n: h[Q_PROJ_1].update(dtype="F12"))
    r.case("unknown-dtype", r.argv(model=d), ["F12", Q_PROJ_1])

    d = r.copy_model("dtype-int")
    st_edit(os.path.join(d, st), lambda h, n: h[Q_PROJ_1].update(dtype="I32"))
    r.case("integer-dtype-weight", r.argv(model=d), ["I32", Q_PROJ_1])

    d = r.copy_model("no-safetensors")
    os.remove(os.path.join(d, st))
    r.case("no-safetensors", r.argv(model=d), ["safetensors"])

    # Sharded layouts made from the single file: two shards + model.safetensors.index.json.
    def sharded(name):
        d = r.copy_model(name)
        tensors, meta = read_safetensors(os.path.join(d, st))
        os.remove(os.path.join(d, st))
        names = sorted(tensors)
        half = len(names) // 2
        wmap = {}
        for i, part in enumerate((names[:half], names[half:])):
            fname = "model-%05d-of-00002.safetensors" % (i + 1)
            write_safetensors(os.path.join(d, fname), {n: tensors[n] for n in part}, meta)
            wmap.update({n: fname for n in part})
        return d, wmap

    def write_index(d, wmap):
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": wmap}, f)

    d, wmap = sharded("shard-gone")
    write_index(d, wmap)
    os.remove(os.path.join(d, "model-00002-of-00002.safetensors"))
    r.case("index-shard-missing", r.argv(model=d), ["model-00002-of-00002.safetensors"])

    d, wmap = sharded("shard-wrong")
    moved = next(n for n, f in sorted(wmap.items()) if f.startswith("model-00002"))
    wmap[moved] = "model-00001-of-00002.safetensors"
    write_index(d, wmap)
    r.case("index-maps-wrong-shard", r.argv(model=d), [moved])

    d, wmap = sharded("shard-unlisted")
    wmap.pop(Q_PROJ_1)
    write_index(d, wmap)
    r.case("index-lacks-tensor", r.argv(model=d), [Q_PROJ_1])

    d, wmap = sharded("shard-escape")
    wmap[Q_PROJ_1] = "../../../etc/passwd"
    write_index(d, wmap)
    r.case("index-shard-path-escape", r.argv(model=d), ["passwd"])

    r.case("model-dir-missing", r.argv(model=os.path.join(r.work, "does-not-exist"),
                                       vision=os.path.join(r.model, "clip")), ["does-not-exist"])


def config_cases(r):
    def with_config(name, fn, sub=""):
        d = r.copy_model(name)
        p = os.path.join(d, sub, "config.json")
        with open(p) as f:
            c = json.load(f)
        fn(c)
        with open(p, "w") as f:
            json.dump(c, f, indent=2)
        return d

    d = with_config("cfg-no-hidden", lambda c: c.pop("hidden_size"))
    r.case("config-missing-hidden_size", r.argv(model=d), ["config.json", "hidden_size"])

    d = with_config("cfg-heads", lambda c: c.update(num_attention_heads=5))
    r.case("config-heads-not-dividing", r.argv(model=d), ["num_attention_heads"])

    d = with_config("cfg-kv-heads", lambda c: c.update(num_key_value_heads=3))
    r.case("config-kv-heads-not-dividing", r.argv(model=d), ["num_key_value_heads"])

    d = with_config("cfg-moe-idx", lambda c: c["moe"].update(moe_layers_idx=[0, 7]))
    r.case("config-moe_layers_idx-range", r.argv(model=d), ["moe_layers_idx", "7"])

    d = with_config("cfg-moe-neg", lambda c: c["moe"].update(moe_layers_idx=[0, -1]))
    r.case("config-moe_layers_idx-neg", r.argv(model=d), ["moe_layers_idx"])

    d = with_config("cfg-topk", lambda c: c["moe"].update(top_k_experts=5))
    r.case("config-top_k-gt-experts", r.argv(model=d), ["top_k"])

    d = with_config("cfg-num-experts", lambda c: c["moe"].update(num_experts=[4]))
    r.case("config-num_experts-length", r.argv(model=d), ["num_experts"])

    d = with_config("cfg-hidden-str", lambda c: c.update(hidden_size="64"))
    r.case("config-hidden_size-string", r.argv(model=d), ["hidden_size"])

    d = with_config("cfg-hidden-neg", lambda c: c.update(hidden_size=-64))
    r.case("config-hidden_size-negative", r.argv(model=d), ["hidden_size"])

    d = with_config("cfg-vocab", lambda c: c.update(vocab_size=8))
    r.case("config-vocab-too-small", r.argv(model=d), ["vocab"])

    d = with_config("cfg-clip-patch", lambda c: c.update(patch_size=7), sub="clip")
    r.case("clip-config-patch-not-dividing", r.argv(model=d), ["patch_size"])

    d = r.copy_model("cfg-broken-json")
    with open(os.path.join(d, "config.json"), "w") as f:
        f.write('{"hidden_size": 64,')
    r.case("config-not-json", r.argv(model=d), ["config.json"])

    d = r.copy_model("cfg-gone")
    os.remove(os.path.join(d, "config.json"))
    r.case("config-missing", r.argv(model=d), ["config.json"])


def image_cases(r):
    with open(r.png, "rb") as f:
        png = f.read()
    with open(r.jpg, "rb") as f:
        jpg = f.read()

    bad = bytearray(png)
    # Keep the signature and IHDR (33 bytes), scramble the compressed data after it.
    for i in range(60, len(bad) - 12):
        bad[i] ^= 0x5A
    p = r.file("corrupt.png", bytes(bad))
    r.case("corrupt-png", r.argv(image=p), ["PNG"])

    p = r.file("truncated.png", png[: len(png) // 2])
    r.case("truncated-png", r.argv(image=p), ["PNG"])

    bad = bytearray(jpg)
    for i in range(len(bad) // 3, len(bad) - 2):
        bad[i] = 0xFF if i % 7 == 0 else bad[i] ^ 0xA5
    p = r.file("corrupt.jpg", bytes(bad))
    r.case("corrupt-jpeg", r.argv(image=p), ["JPEG"])

    p = r.file("truncated.jpg", jpg[:200])
    r.case("truncated-jpeg", r.argv(image=p), ["JPEG"])

    p = r.file("empty.png", b"")
    r.case("zero-byte-image", r.argv(image=p), ["empty.png"])

    p = r.file("garbage.png", b"this is not an image at all\n" * 8)
    r.case("not-an-image", r.argv(image=p), ["garbage.png"])

    p = r.file("huge.png", png_header_only(100000, 100000))
    r.case("png-100000x100000", r.argv(image=p), ["huge.png", "100000 x 100000"])

    # Sides a PNG may have, but 400 M pixels: above the default pixel limit (89478485),
    # refused from the header before any pixel buffer is allocated.
    p = r.file("big.png", png_header_only(20000, 20000))
    r.case("png-20000x20000", r.argv(image=p), ["big.png", "pixel limit"])

    p = r.file("zero.png", png_header_only(0, 0))
    r.case("png-0x0", r.argv(image=p), ["PNG"])

    # A JPEG whose frame header (SOF) claims 60000 x 60000: refused from the header.
    sof = max(jpg.find(b"\xff\xc0"), jpg.find(b"\xff\xc2"))
    big = bytearray(jpg)
    big[sof + 5:sof + 9] = struct.pack(">HH", 60000, 60000)
    p = r.file("big.jpg", bytes(big))
    r.case("jpeg-60000x60000", r.argv(image=p), ["big.jpg", "pixel limit"])

    r.case("max-pixels-100", r.argv(extra=["--max-pixels", "100"]), ["pixel limit", "100"])

    r.case("image-missing", r.argv(image=os.path.join(r.work, "nope.png")), ["nope.png"])


def cli_cases(r):
    r.case("empty-question", r.argv(question=""), ["question"])
    r.case("blank-question", r.argv(question="   "), ["question"])
    r.case("unknown-backend", r.argv(extra=["--backend", "bogus"]), ["bogus"])
    r.case("conv-mode-bogus", r.argv(extra=["--conv-mode", "bogus"]), ["bogus"])
    r.case("missing-vision", r.argv(vision=""), ["vision"])
    r.case("max-tokens-negative", r.argv(extra=["--max-tokens", "-3"]), ["max-tokens"])
    r.case("unknown-option", r.argv(extra=["--frobnicate"]), ["frobnicate"])
    r.case("empty-candidates", r.argv(extra=["--candidates", ","]), ["candidate"])

    if not r.a.k or r.a.k in "help":
        r.count += 1
        p = subprocess.run([r.bin, "--help"], capture_output=True, timeout=30)
        out = p.stdout.decode("utf-8", "replace")
        if p.returncode != 0 or "usage" not in out.lower():
            r.fail("help", "--help: exit %d, stdout %r" % (p.returncode, out[:80]),
                   p.stderr.decode("utf-8", "replace"))
        else:
            print("ok    %-28s rc=0" % "help")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="medmoe-run binary")
    ap.add_argument("--model", required=True, help="tiny checkpoint dir (with clip/)")
    ap.add_argument("--images", required=True, help="dir with case.png and case.jpg")
    ap.add_argument("--work", required=True, help="scratch dir (recreated)")
    ap.add_argument("-k", default="", help="only cases whose name contains this")
    a = ap.parse_args()
    shutil.rmtree(a.work, ignore_errors=True)
    os.makedirs(a.work)
    r = Runner(a)
    cli_cases(r)
    image_cases(r)
    config_cases(r)
    checkpoint_cases(r)
    if r.failures:
        print("%d of %d cases failed: %s" % (len(r.failures), r.count, ", ".join(r.failures)))
        return 1
    shutil.rmtree(a.work, ignore_errors=True)
    print("all %d bad-input cases fail cleanly" % r.count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
