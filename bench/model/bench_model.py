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

medmoe-run: --backend cpu --json, MEDMOE_THREADS = --threads, once with the weights as
stored (bf16, used in place) and once with --weights f32 (widened at load: the baseline); its
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


def run_engine(a, ckpt, image, weights="stored"):
    env = dict(os.environ, MEDMOE_THREADS=str(a.threads))
    argv = [a.run, "--model", ckpt, "--vision", os.path.join(ckpt, "clip"), "--image", image,
            "--question", QUESTION, "--max-tokens", str(a.max_tokens), "--backend", "cpu",
            "--weights", weights, "--json"]
    import tempfile
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        t0 = time.time()
        p = subprocess.Popen(argv, stdout=fo, stderr=fe, env=env)
        _, status, ru = os.wait4(p.pid, 0)  # rusage of this child alone: its peak RSS
        p.returncode = os.waitstatus_to_exitcode(status)
        wall = time.time() - t0
        fo.seek(0)
        fe.seek(0)
        out_b, err_b = fo.read(), fe.read()
    rss_kb = ru.ru_maxrss
    if p.returncode != 0:
        raise RuntimeError("medmoe-run failed (%d): %s" % (p.returncode, err_b.decode()[-2000:]))
    out = json.loads(out_b)
    out["wall_s"] = wall
    out["peak_rss_mb"] = rss_kb / 1024 if rss_kb else None
    return out


def st_header(path):
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))


def weight_bytes(ckpt):
    """(bytes of all tensors, bytes a decode step reads): every decoder tensor except the
    routed experts, plus one routed expert per MoE layer (top-1), plus the LM head."""
    hdrs = {}
    for fn in os.listdir(ckpt):
        if fn.endswith(".safetensors"):
            hdrs.update({k: v for k, v in st_header(os.path.join(ckpt, fn)).items()
                         if k != "__metadata__"})
    total = per_tok = 0
    for name, t in hdrs.items():
        b = t["data_offsets"][1] - t["data_offsets"][0]
        total += b
        if name == "model.embed_tokens.weight":
            continue  # a lookup reads one row (unless tied: then it is the head, below)
        if ".deepspeed_moe.experts.deepspeed_experts." in name:
            if ".deepspeed_experts.0." in name:
                per_tok += b
            continue
        per_tok += b
    if "lm_head.weight" not in hdrs and "model.embed_tokens.weight" in hdrs:
        t = hdrs["model.embed_tokens.weight"]
        per_tok += t["data_offsets"][1] - t["data_offsets"][0]
    return total, per_tok


def read_bandwidth(threads):
    """GB/s of reading a 1 GiB buffer with `threads` threads (numpy sums release the GIL)."""
    try:
        import numpy as np
        import threading
        buf = np.ones(1 << 28, dtype=np.float32)  # 1 GiB, touched
        parts = np.array_split(buf, threads)
        best = 0.0
        for _ in range(3):
            ts = [threading.Thread(target=np.sum, args=(p_,)) for p_ in parts]
            t0 = time.perf_counter()
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            best = max(best, buf.nbytes / (time.perf_counter() - t0) / 1e9)
        return best
    except Exception:
        return None


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
    ap.add_argument("--no-int8", action="store_true", help="skip the --weights int8 run")
    ap.add_argument("--no-f32", action="store_true",
                    help="skip the --weights f32 run (the widened baseline)")
    a = ap.parse_args()
    if not os.path.exists(a.run):
        print("bench/model: %s not built" % a.run)
        return 1
    os.makedirs(a.data, exist_ok=True)
    ckpt = ensure_checkpoint(a)
    image = ensure_image(a)

    # Warm the page cache: every run then starts as a hospital's second start does (the
    # weights are read from the page cache, not the disk; a cold first read is the disk's).
    t0 = time.perf_counter()
    nbytes = 0
    for root, _, files in os.walk(ckpt):
        for fn in files:
            if fn.endswith(".safetensors"):
                with open(os.path.join(root, fn), "rb") as fh:
                    while True:
                        b = fh.read(16 << 20)
                        if not b:
                            break
                        nbytes += len(b)
    print("bench/model: page cache warmed: %.2f GB of safetensors read in %.1f s"
          % (nbytes / 1e9, time.perf_counter() - t0))
    e = run_engine(a, ckpt, image, "stored")
    runs = [("stored (bf16)", e)]
    for mode, skip in (("int8", a.no_int8), ("f32", a.no_f32)):
        if skip:
            continue
        try:
            runs.append(("int8 (q8)" if mode == "int8" else "f32 (widened)",
                         run_engine(a, ckpt, image, mode)))
        except Exception as ex:  # a benchmark prints, never fails
            print("bench/model: medmoe-run --weights %s failed: %s" % (mode, ex))
    n_tok = len(e["tokens"])
    print("bench/model: StableLM-2-1.6B dims (hidden 2048, inter 5632, 32x64 heads, vocab 100352),"
          " %d of 24 layers (MoE 4+meta top-1 on %s), bf16; CLIP ViT-L/14-336 dims, %d of 24"
          " layers; prompt %d positions (%d image); %d threads"
          % (a.layers, ",".join(str(i) for i in range(0, a.layers, 2)), a.clip_layers,
             e["prompt_len"], e["image_len"], a.threads))
    la = os.getloadavg()
    print("bench/model: host %d CPUs, load average %.2f %.2f %.2f (other work on the host slows "
          "every column alike)" % ((os.cpu_count() or 0,) + la))
    print("bench/model: medmoe-run generated %d tokens, %s backend, process wall %.1f s"
          % (n_tok, e.get("backend", "?"), e["wall_s"]))
    for name, x in runs[1:]:
        if x["tokens"] != e["tokens"]:
            print("bench/model: note: %s generated other tokens (%s vs %s)"
                  % (name, x["tokens"][:8], e["tokens"][:8]))
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

    def ttft(x):
        return x["vision_ms"] + x["prefill_ms"]

    def dec(x):
        return x["decode_ms_per_token"] if x and len(x["tokens"]) > 1 else None

    rows = [("load (weights)", "load_ms"), ("vision (preproc+CLIP+proj)", "vision_ms"),
            ("prefill (%d positions)" % e["prompt_len"], "prefill_ms"),
            ("time to first token", ttft), ("decode, per token", dec)]
    cols = "".join("%15s" % n for n, _ in runs)
    print("bench/model: %-28s%s %18s" % ("", cols, "PyTorch reference"))
    for name, key in rows:
        get = key if callable(key) else (lambda x, k=key: x[k] if x else None)
        rv = None
        if r:
            rv = {"load_ms": r["load_ms"], "vision_ms": r["vision_ms"],
                  "prefill_ms": r["prefill_ms"]}.get(key if isinstance(key, str) else "", None)
            if key is ttft:
                rv = r["vision_ms"] + r["prefill_ms"]
            if key is dec:
                rv = r["decode_ms"]
        print("bench/model: %-28s%s %18s" % (name, "".join("%15s" % fmt_ms(get(x)) for _, x in runs),
                                             fmt_ms(rv)))
    print("bench/model: %-28s%s" % ("peak RSS", "".join(
        "%15s" % ("%.0f MB" % x["peak_rss_mb"] if x.get("peak_rss_mb") else "-") for _, x in runs)))
    print("bench/model: %-28s%s" % ("decode tokens/s", "".join(
        "%15s" % ("%.2f" % (1e3 / dec(x)) if dec(x) else "-") for _, x in runs)))
    tps = 1e3 / dec(e) if dec(e) else None
    total, per_tok = weight_bytes(ckpt)
    bw = read_bandwidth(a.threads)
    if bw:
        lim = bw * 1e9 / per_tok
        print("bench/model: memory read bandwidth %.1f GB/s (%d threads, 1 GiB, numpy); a decode "
              "step reads %.2f GB of bf16 weights (of %.2f GB): limit %.1f tokens/s in bf16, "
              "%.1f in int8 (1.125 B/weight), %.1f in f32; medmoe-run bf16 at %s of its limit"
              % (bw, a.threads, per_tok / 1e9, total / 1e9, lim, lim * 2 / 1.125, lim / 2,
                 "%.0f %%" % (100 * tps / lim) if tps else "-"))
    print("bench/model: reference decode = one full forward over prompt+1 (the oracle has no KV "
          "cache); ours = KV-cache step, mean over %d steps" % max(n_tok - 1, 0))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as ex:  # benchmarks print, never fail
        print("bench/model: failed: %s" % ex)
        sys.exit(0)
