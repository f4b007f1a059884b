#!/usr/bin/python3
"""Sanity checks of a generated tiny checkpoint and its golden output.

    check_fixtures.py --ckpt DIR --golden G.json --golden-logits G.f32 -- MAKER_ARGS...

1. Determinism: make_tiny_checkpoint.py with MAKER_ARGS written again into a temporary
   directory gives byte-identical files.
2. Layout: every safetensors file has contiguous, in-bounds data (as the official reader
   demands), the index (if any) maps every tensor, config.json vocab_size is a multiple
   of 64 above len(tokenizer).
3. Fixture strength: in the golden logits, taking the argmax over ALL rows would pick a
   padding id (so an engine that forgets to mask them fails), and routing uses >= 3
   experts in every MoE layer.
"""

import argparse
import filecmp
import json
import os
import struct
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)


def check_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    spans = sorted(tuple(v["data_offsets"]) for v in header.values())
    pos = 0
    for b, e in spans:
        if b != pos:
            raise SystemExit("%s: data not contiguous at offset %d" % (path, b))
        pos = e
    if 8 + n + pos != len(data):
        raise SystemExit("%s: data ends at %d, file is %d bytes" % (path, 8 + n + pos, len(data)))
    return list(header)


def main():
    argv = sys.argv[1:]
    if "--" not in argv:
        raise SystemExit(__doc__)
    cut = argv.index("--")
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--golden", required=True)
    ap.add_argument("--golden-logits", required=True)
    a = ap.parse_args(argv[:cut])
    maker_args = argv[cut + 1:]

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_tiny_checkpoint.py"),
                        "--out", tmp] + maker_args, check=True, stdout=subprocess.DEVNULL)
        cmp = filecmp.dircmp(tmp, a.ckpt)
        for d in (cmp, cmp.subdirs.get("clip")):
            if d is None:
                raise SystemExit("clip/ missing")
            _, mismatch, errors = filecmp.cmpfiles(d.left, d.right, d.left_only + d.common_files,
                                                   shallow=False)
            if mismatch or errors:
                raise SystemExit("not deterministic: %s differ / missing %s" % (mismatch, errors))
    print("deterministic: regenerated files are byte-identical")

    names = []
    for root in (a.ckpt, os.path.join(a.ckpt, "clip")):
        for f in sorted(os.listdir(root)):
            if f.endswith(".safetensors"):
                names += check_safetensors(os.path.join(root, f)) if root == a.ckpt else []
                if root != a.ckpt:
                    check_safetensors(os.path.join(root, f))
    idx = os.path.join(a.ckpt, "model.safetensors.index.json")
    if os.path.exists(idx):
        with open(idx) as f:
            wm = json.load(f)["weight_map"]
        if sorted(wm) != sorted(names):
            raise SystemExit("index weight_map does not match the shards' tensors")
    from bpe_ref import BPETokenizer
    n_tok = len(BPETokenizer.from_dir(a.ckpt))
    with open(os.path.join(a.ckpt, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    if vocab % 64 or vocab <= n_tok:
        raise SystemExit("vocab_size %d vs tokenizer %d: want padding rows, multiple of 64" % (vocab, n_tok))
    print("layout: %d LLM tensors, contiguous safetensors, vocab %d > tokenizer %d" % (len(names), vocab, n_tok))

    with open(a.golden) as f:
        g = json.load(f)
    L = np.fromfile(a.golden_logits, dtype="<f4").reshape(-1, vocab)
    wrong = int((L.argmax(1) >= n_tok).sum())
    if wrong == 0:
        raise SystemExit("padding rows never win the unmasked argmax: fixture too weak")
    for r in g["routing"]:
        used = {e for ch in r["experts"] for e in ch}
        if len(used) < 3:
            raise SystemExit("layer %d routes to only %s" % (r["layer"], sorted(used)))
    print("strength: unmasked argmax would pick a padding id in %d/%d steps; experts used per layer %s"
          % (wrong, L.shape[0], [len({e for ch in r["experts"] for e in ch}) for r in g["routing"]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
