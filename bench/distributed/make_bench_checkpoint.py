#!/usr/bin/python3
"""A larger random Med-MoE checkpoint for bench/distributed, built with the tiny maker's
own tensor factory (tools/make_tiny_checkpoint.py) and bigger shapes.

    make_bench_checkpoint.py --out DIR [--hidden 256] [--layers 8] [--inter 1024]

StableLM backbone, f32, top-1, 4 experts, MoE on every other layer, the tiny CLIP tower.
Weights are random (answers are nonsense); only the shapes matter for timing.
Skips the work when DIR/config.json already describes the same shapes.
"""

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TOOLS = os.path.join(os.path.dirname(os.path.dirname(HERE)), "tools")
sys.path.insert(0, TOOLS)
import make_tiny_checkpoint as M  # noqa: E402
import numpy as np  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--inter", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=3)
    a = ap.parse_args()
    M.HIDDEN, M.LAYERS = a.hidden, a.layers
    M.MOE_LAYERS = list(range(0, a.layers, 2))
    cfg_path = os.path.join(a.out, "config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            c = json.load(f)
        if (c.get("hidden_size"), c.get("num_hidden_layers"), c.get("intermediate_size")) == \
                (a.hidden, a.layers, a.inter):
            print("reusing %s" % a.out)
            return 0
    os.makedirs(os.path.join(a.out, "clip"), exist_ok=True)
    from make_tokenizer import write_tokenizer
    sys.path.insert(0, os.path.join(os.path.dirname(TOOLS), "tests", "reference"))
    from bpe_ref import BPETokenizer
    n_tok = write_tokenizer(a.out, "cl100k", tiktoken=False, merges=M.TOKENIZER_MERGES)
    tok = BPETokenizer.from_dir(a.out)
    eos_id = tok.token_id("<|endoftext|>")
    vocab = (n_tok + 63) // 64 * 64 + 64
    g = M.Gen(a.seed)
    M.llm_tensors(g, "stablelm", vocab, n_tok, a.inter, M.CLIP["hidden_size"], False, False)
    n = sum(v.size for v in g.tensors.values())
    M.write_shards(a.out, M.stored(g.tensors, "f32"), 1)
    M.dump_json(cfg_path, M.llm_config("stablelm", "f32", vocab, eos_id, a.inter, 1, False,
                                       M.CLIP["hidden_size"]))
    gc = M.Gen(a.seed + 7919)
    npos = M.clip_tensors(gc)
    ct = M.stored(gc.tensors, "f32")
    ct["vision_model.embeddings.position_ids"] = ("I64", np.arange(npos, dtype=np.int64)[None, :])
    M.write_safetensors(os.path.join(a.out, "clip", "model.safetensors"), ct, {"format": "pt"})
    M.dump_json(os.path.join(a.out, "clip", "config.json"), M.clip_config("f32"))
    print("wrote %s: hidden %d, %d layers (MoE %s), inter %d, %.1f M parameters"
          % (a.out, a.hidden, a.layers, M.MOE_LAYERS, a.inter, n / 1e6))
    return 0


if __name__ == "__main__":
    sys.exit(main())
