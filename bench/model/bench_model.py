#!/usr/bin/python3
"""bench/model: time to first token and decode speed of medmoe-run (CPU backend) on a
checkpoint with the real StableLM-2-1.6B dimensions, beside the PyTorch reference
(tests/reference/medmoe_ref.py) on the same checkpoint, image, question and thread count.

    bench_model.py --run MEDMOE_RUN --data DIR [--layers 4] [--clip-layers 4]
                   [--threads 2] [--max-tokens 8] [--no-ref]

Checkpoint (tools/make_tiny_checkpoint.py, random weights, generated once into
DIR/<name>/ and reused while its maker arguments are unchanged):
  LLM    StableLM-2-1.6B sizes: hidden 2048, intermediate 5632, 32 heads x 64, rotary 25 %,
         vocab 100352 (a small tokenizer; the rest are padding rows), MoE on layers 0, 2, ..
         with 4 experts + the meta expert, top-1, bf16 storage, 4 shards.
         Layers: --layers (default 4 of the real 24: disk, RAM and time on 2 cores).
  vision CLIP ViT-L/14-336 sizes: width 1024, MLP 4096, 16 heads, image 336, patch 14
         (576 image tokens + CLS), layers: --clip-layers (default 4 of the real 24;
         mm_vision_select_layer -2, so the last one is loaded but not run).

medmoe-run: --backend cpu --json, OMP_NUM_THREADS = OPENBLAS_NUM_THREADS = --threads; its
own timings (load_ms, vision_ms = decode + preprocess + CLIP + projector, prefill_ms,
decode_ms_per_token with the KV cache). Time to first token = vision_ms + prefill_ms.
Reference: torch.set_num_threads(--threads), fp32 math (bf16 upcast at load); vision =
preprocess + CLIP + projector; prefill = one forward over the prompt; 'decode' = one
forward over prompt + 1 token, because the oracle has no KV cache and recomputes the
whole sequence each step (so its decode figure is NOT a per-token cost comparable in
kind: it is what the oracle pays per generated token).
Prints a table; never fails the build (exit 0 unless medmoe-run itself is missing).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
MAKER = os.path.join(ROOT, "tools", "make_tiny_checkpoint.py")
IMAGER = os.path.join(ROOT, "tests", "make_test_image.py")
REF = os.path.join(ROOT, "tests", "reference")
QUESTION = "What modality is this image, and what abnormality does it show?"


def maker_args(a):
    return ["--backbone", "stablelm", "--dtype", "bf16", "--shards", "4",
            "--hidden", "2048", "--heads", "32", "--intermediate", "5632",
            "--vocab-size", "100352", "--max-pos", "4096", "--layers", str(a.layers),
            "--clip-hidden", "1024", "--clip-intermediate", "4096", "--clip-heads", "16",
            "--clip-layers", str(a.clip_layers), "--clip-image-size", "336",
            "--clip-patch-size", "14"]


def ensure_checkpoint(a):
    """Generates the checkpoint unless DIR holds one made with the same arguments."""
    d = os.path.join(a.data, "stablelm2-1.6b-%dL-clip%dL" % (a.layers, a.clip_layers))
    stamp = os.path.join(d, "maker-args.json")
    args = maker_args(a)
    try:
        with open(stamp) as f:
            if json.load(f) == args and os.path.exists(os.path.join(d, "config.json")):
                return d
    except (OSError, ValueError):
        pass
    shutil.rmtree(d, ignore_errors=True)
    print("bench/model: generating the benchmark checkpoint once into %s (~1 min) ..." % d,
          flush=True)
    t0 = time.time()
    subprocess.run([sys.executable, MAKER, "--out", d] + args, check=True,
                   stdout=subprocess.DEVNULL)
    with open(stamp, "w") as f:
        json.dump(args, f)
    print("bench/model: generated in %.0f s" % (time.time() - t0), flush=True)
    return d


def ensure_image(a):
    p = os.path.join(a.data, "images", "case.png")
    if not os.path.exists(p):
        subprocess.run([sys.executable, IMAGER, os.path.dirname(p)], check=True,
                       stdout=subprocess.DEVNULL)
    return p


def run_engine(a, ckpt, image):
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), OPENBLAS_NUM_THREADS=str(a.threads))
    argv = [a.run, "--model", ckpt, "--vision", os.path.join(ckpt, "clip"), "--image", image,
            "--question", QUESTION, "--max-tokens", str(a.max_tokens), "--backend", "cpu",
            "--json"]
    t0 = time.time()
    p = subprocess.run(argv, capture_output=True, env=env)
    wall = time.time() - t0
    if p.returncode != 0:
        raise RuntimeError("medmoe-run failed (%d): %s" % (p.returncode, p.stderr.decode()[-2000:]))
    out = json.loads(p.stdout)
    out["wall_s"] = wall
    return out


def run_reference(a, ckpt, image):
    import torch
    sys.path.insert(0, REF)
    import medmoe_ref as R
    from bpe_ref import BPETokenizer
    from image_ref import preprocess

    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    model = R.MedMoE(ckpt)
    clip = R.Clip(os.path.join(ckpt, "clip"))
    tok = BPETokenizer.from_dir(ckpt)
    load_ms = (time.perf_counter() - t0) * 1e3

    t0 = time.perf_counter()
    pixels = preprocess(image, clip.size, pad=True)
    img = R.image_features(clip, model, pixels)
    vision_ms = (time.perf_counter() - t0) * 1e3

    prompt, _, _ = R.build_prompt(tok, model, img, QUESTION, "train")
    t0 = time.perf_counter()
    logits, _, _ = model.forward(prompt)
    prefill_ms = (time.perf_counter() - t0) * 1e3
    nxt = int(torch.argmax(logits[-1, :len(tok)]))
    E = model.t["model.embed_tokens.weight"]
    seq = torch.cat([prompt, E[nxt][None, :]], 0)
    t0 = time.perf_counter()
    model.forward(seq)
    decode_ms = (time.perf_counter() - t0) * 1e3
    return dict(load_ms=load_ms, vision_ms=vision_ms, prefill_ms=prefill_ms,
                decode_ms=decode_ms, prompt_len=prompt.shape[0], first=nxt)


def fmt_ms(v):
    return "-" if v is None else ("%.0f ms" % v if v >= 100 else "%.1f ms" % v)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="medmoe-run binary")
    ap.add_argument("--data", required=True, help="cache dir for the checkpoint and image")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--clip-layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--no-ref", action="store_true", help="skip the PyTorch reference")
    a = ap.parse_args()
    if not os.path.exists(a.run):
        print("bench/model: %s not built" % a.run)
        return 1
    os.makedirs(a.data, exist_ok=True)
    ckpt = ensure_checkpoint(a)
    image = ensure_image(a)

    e = run_engine(a, ckpt, image)
    n_tok = len(e["tokens"])
    print("bench/model: StableLM-2-1.6B dims (hidden 2048, inter 5632, 32x64 heads, vocab 100352),"
          " %d of 24 layers (MoE 4+meta top-1 on %s), bf16; CLIP ViT-L/14-336 dims, %d of 24"
          " layers; prompt %d positions (%d image); %d threads"
          % (a.layers, ",".join(str(i) for i in range(0, a.layers, 2)), a.clip_layers,
             e["prompt_len"], e["image_len"], a.threads))
    print("bench/model: medmoe-run generated %d tokens, %s backend, process wall %.1f s"
          % (n_tok, e.get("backend", "?"), e["wall_s"]))
    r = None
    if not a.no_ref:
        try:
            r = run_reference(a, ckpt, image)
        except Exception as ex:  # a benchmark prints, never fails
            print("bench/model: reference failed: %s" % ex)
        if r and r["prompt_len"] != e["prompt_len"]:
            print("bench/model: note: prompt lengths differ (engine %d, reference %d)"
                  % (e["prompt_len"], r["prompt_len"]))
        if r and e["tokens"] and r["first"] != e["tokens"][0]:
            print("bench/model: note: first token differs (engine %d, reference %d; bf16 random "
                  "weights, near-ties possible)" % (e["tokens"][0], r["first"]))

    e_ttft = e["vision_ms"] + e["prefill_ms"]
    e_dec = e["decode_ms_per_token"] if n_tok > 1 else None
    rows = [("load (weights)", e["load_ms"], r and r["load_ms"]),
            ("vision (preproc+CLIP+proj)", e["vision_ms"], r and r["vision_ms"]),
            ("prefill (%d positions)" % e["prompt_len"], e["prefill_ms"], r and r["prefill_ms"]),
            ("time to first token", e_ttft, r and r["vision_ms"] + r["prefill_ms"]),
            ("decode, per token", e_dec, r and r["decode_ms"])]
    print("bench/model: %-28s %14s %18s %9s" % ("", "medmoe-run cpu", "PyTorch reference",
                                                "ref/ours"))
    for name, ours, ref in rows:
        ratio = "%.2fx" % (ref / ours) if ours and ref else "-"
        print("bench/model: %-28s %14s %18s %9s" % (name, fmt_ms(ours), fmt_ms(ref), ratio))
    tps = 1e3 / e_dec if e_dec else None
    rtps = 1e3 / r["decode_ms"] if r else None
    print("bench/model: %-28s %14s %18s %9s" % (
        "decode tokens/s", "%.2f" % tps if tps else "-", "%.3f" % rtps if rtps else "-",
        "%.2fx" % (tps / rtps) if tps and rtps else "-"))
    print("bench/model: reference decode = one full forward over prompt+1 (the oracle has no KV "
          "cache); ours = KV-cache step, mean over %d steps" % max(n_tok - 1, 0))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as ex:  # benchmarks print, never fail
        print("bench/model: failed: %s" % ex)
        sys.exit(0)
