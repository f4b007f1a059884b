#!/usr/bin/python3
"""bench/distributed — distributed serving vs one process, on the same checkpoint, same run.

    bench_distributed.py --router BIN --expert BIN --run BIN --rtt BIN --workdir DIR
                         [--sizes 1,8,32] [--max-tokens 24] [--tiny]

  * checkpoint: a random StableLM-shaped one made by make_bench_checkpoint.py (hidden 256,
    8 layers, 4 MoE layers x 4 experts, ~21 M parameters) — or with --tiny, or when making
    it fails, tools/make_tiny_checkpoint.py's tiny one (hidden 64). The output says which.
  * N "concurrent" cases (N in --sizes) are handed to medmoe-router at once (--cases on
    stdin). The router answers them ONE AFTER THE OTHER (no batching across cases yet), so
    aggregate throughput is sequential throughput and time to first token includes queueing.
  * baseline: medmoe-run (one process, experts local) on the same cases; its figures are
    its own timings (vision + prefill + decode x tokens, load excluded), cases run back to
    back — the same sequential schedule.
  * per-MoE-layer dispatch: the router's stats ('dispatch': batch_rtt_us_mean ...) if it reports them, and an
    estimate from the decode step times, beside bench_zmq_rtt (bare DEALER/ROUTER round trip
    of the same bytes).
Prints figures; never fails (exit 0 with a message when something is missing).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.join(ROOT, "tests", "distributed"))
import distlib as D  # noqa: E402

QUESTIONS = [
    "What modality is this image?", "Is there a fracture?", "Describe the findings.",
    "Which organ is shown?", "Is this image normal?", "What abnormality is seen?",
    "Where is the lesion located?", "Is there any sign of pneumonia?",
]


def case(i, image, max_tokens):
    return {"id": "c%d" % i, "image": image, "question": QUESTIONS[i % len(QUESTIONS)],
            "max_tokens": max_tokens}


def compute_ms(ans):
    return ans["vision_ms"] + ans["prefill_ms"] + ans["decode_ms_per_token"] * max(len(ans["tokens"]) - 1, 0)


def timing(ans, key):
    """Timings may be top-level keys or under 'timings' (case.h documents the latter)."""
    if key in ans:
        return ans[key]
    return ans.get("timings", {}).get(key)


def norm(ans):
    for k in ("vision_ms", "prefill_ms", "decode_ms_per_token"):
        ans[k] = timing(ans, k) or 0.0
    return ans


def fmt_row(label, n, tokens, total_ms, ttft):
    return ("  %-22s N=%-3d %6d tokens in %8.1f ms: %8.1f tok/s   TTFT mean %8.1f ms  max %8.1f ms"
            % (label, n, tokens, total_ms, 1000.0 * tokens / total_ms if total_ms > 0 else 0.0,
               statistics.mean(ttft), max(ttft)))


def measure(a, model, image, hidden, n_moe, sizes, work):
    """One configuration: medmoe-run baseline, then the router + 4 experts, in `work`
    (emptied first: D.reference caches answers, and stale timings must not be reused)."""
    D.fresh_dir(work)
    distinct = min(max(sizes), len(QUESTIONS))
    base = []
    for i in range(distinct):
        ref, _ = D.reference(a.run, model, case(i, image, a.max_tokens), work, timeout=300)
        base.append(norm(ref))
    print("medmoe-run per case (same checkpoint, cpu): decode %.2f ms/token, prefill %.1f ms, vision %.1f ms "
          "(mean of %d cases)" % (statistics.mean(b["decode_ms_per_token"] for b in base),
                                  statistics.mean(b["prefill_ms"] for b in base),
                                  statistics.mean(b["vision_ms"] for b in base), distinct))

    results = {}
    with D.Cluster({"router": a.router, "expert": a.expert}, os.path.join(work, "cluster"),
                   hb_ms=1000) as cl:
        try:
            cl.start_router(model, wait_experts_ms=30000)
            for k in range(4):
                cl.start_expert(model, k, timeout=60)
            warm = cl.router.ask(dict(case(0, image, 4), id="warmup"), 120)
            if warm.get("status") != "ok":
                print("bench: router warm-up case failed: %s" % json.dumps(warm)[:500])
                return 0
            rss = []
            for p in cl.procs:
                try:
                    with open("/proc/%d/status" % p.pid) as f:
                        st = dict(x.split(":", 1) for x in f.read().splitlines() if ":" in x)
                    rss.append("%s %s" % (p.name.split("-", 1)[1], st["VmHWM"].strip()))
                except (OSError, KeyError):
                    pass
            ck_mb = sum(os.path.getsize(os.path.join(model, f)) for f in os.listdir(model)
                        if f.endswith(".safetensors")) / 2**20
            print("peak RSS after a warm-up case (checkpoint %.0f MiB of safetensors): %s" % (ck_mb, ", ".join(rss)))
            serial = 0
            mismatches = 0
            for n in sizes:
                cs = []
                for i in range(n):
                    c = case(i % distinct, image, a.max_tokens)
                    serial += 1
                    c["id"] = "n%d-%d" % (n, serial)
                    cs.append(c)
                t0 = time.monotonic()
                for c in cs:
                    cl.router.send(c)
                arrivals, answers = [], []
                for c in cs:
                    ans = cl.router.receive(c["id"], 600)
                    arrivals.append((time.monotonic() - t0) * 1000.0)
                    if ans.get("status") != "ok":
                        raise D.TestFailure("case %s: %s" % (c["id"], json.dumps(ans)[:300]))
                    answers.append(norm(ans))
                for i, ans in enumerate(answers):
                    if ans["tokens"] != base[i % distinct]["tokens"]:
                        mismatches += 1
                tokens = sum(len(x["tokens"]) for x in answers)
                ttft = [(arrivals[i - 1] if i else 0.0) + x["vision_ms"] + x["prefill_ms"]
                        for i, x in enumerate(answers)]
                results[n] = dict(tokens=tokens, total=arrivals[-1], ttft=ttft,
                                  decode=statistics.mean(x["decode_ms_per_token"] for x in answers),
                                  prefill=statistics.mean(x["prefill_ms"] for x in answers))
            cl.router.close_input()
            cl.router.wait(30)
            stats = cl.read_stats() if cl.stats_file and os.path.exists(cl.stats_file) else {}
        except D.TestFailure as e:
            print("bench: distributed run failed: %s" % e)
            cl.dump()
            return 0

    print("\nthroughput and time to first token (N cases handed over at once, answered in sequence):")
    for n in sizes:
        r = results[n]
        bs = [base[i % distinct] for i in range(n)]
        btot, bttft, acc = 0.0, [], 0.0
        for b in bs:
            bttft.append(acc + b["vision_ms"] + b["prefill_ms"])
            acc += compute_ms(b)
        btot = acc
        btok = sum(len(b["tokens"]) for b in bs)
        print(fmt_row("medmoe-run (1 process)", n, btok, btot, bttft))
        print(fmt_row("router + 4 experts", n, r["tokens"], r["total"], r["ttft"]))
        if btot > 0 and r["total"] > 0:
            print("  -> distributed / single-process throughput at N=%d: %.2fx (goal >= 0.9x at N=8)"
                  % (n, (r["tokens"] / r["total"]) / (btok / btot)))
    print("  (router tokens differing from medmoe-run: %d cases)" % mismatches)

    print("\nper-MoE-layer dispatch round trip:")
    rd = statistics.mean(results[n]["decode"] for n in sizes)
    bd = statistics.mean(b["decode_ms_per_token"] for b in base)
    print("  decode step: router %.3f ms/token vs medmoe-run %.3f ms/token -> %+.1f us per MoE layer "
          "(%d MoE layers; estimate: extra time of a decode step / MoE layers)"
          % (rd, bd, 1000.0 * (rd - bd) / n_moe, n_moe))
    dsp = stats.get("dispatch") or stats.get("layer_rtt_us")
    if isinstance(dsp, dict):
        print("  router stats (whole run, prefill + decode): " + ", ".join(
            "%s %s" % (k, ("%.1f" % v) if isinstance(v, float) else v) for k, v in dsp.items()))
        if "batch_rtt_us_mean" in dsp and "expert_compute_us_mean" in dsp:
            print("  -> router-measured batch round trip minus expert compute: %.1f us (transport + "
                  "queueing + (de)serialisation)" % (dsp["batch_rtt_us_mean"] - dsp["expert_compute_us_mean"]))
    else:
        print("  (the router's stats report no dispatch timings)")
    for k in ("resent_batches", "dropped_messages"):
        if k in stats:
            print("  router stats %s: %s" % (k, stats[k]))
    if a.rtt:
        prompt = base[0].get("prompt_len", 134)
        p = subprocess.run([a.rtt, "--width", str(hidden), "--rows", "1,%d" % prompt, "--iters", "2000"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
        print("  " + p.stdout.strip().replace("\n", "\n  "))
        print("  (decode sends 1 row per MoE layer to one expert, top-1; prefill %d rows split over experts)"
              % prompt)
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--router", required=True)
    ap.add_argument("--expert", required=True)
    ap.add_argument("--run", required=True)
    ap.add_argument("--rtt", default=None)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--sizes", default="1,8,32")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args()
    os.makedirs(a.workdir, exist_ok=True)
    sizes = [int(x) for x in a.sizes.split(",") if x]

    # 5 processes x OpenMP threads share the cores: libgomp's default spin-wait makes idle
    # processes burn the CPU the busy one needs (10x slower decode on a loaded 2-core box).
    # Both sides run with the same setting.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    print("== bench/distributed: medmoe-router + 4 medmoe-expert on loopback vs medmoe-run ==")
    print("host: %d CPUs, load average %.2f %.2f %.2f; OMP_WAIT_POLICY=%s (router, experts and medmoe-run)"
          % ((os.cpu_count() or 0,) + os.getloadavg() + (os.environ["OMP_WAIT_POLICY"],)))
    images = os.path.join(a.workdir, "images")
    image = os.path.join(images, "case.png")
    if not os.path.exists(image):
        subprocess.run([D.PYTHON, os.path.join(ROOT, "tests", "make_test_image.py"), images],
                       check=True, stdout=subprocess.DEVNULL, timeout=60)
    model = os.path.join(a.workdir, "bench-ckpt")
    what = "bench checkpoint (random, hidden 256, 8 layers, MoE layers 0,2,4,6 x 4 experts, inter 1024)"
    ok = False
    if not a.tiny:
        p = subprocess.run([D.PYTHON, os.path.join(HERE, "make_bench_checkpoint.py"), "--out", model],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
        ok = p.returncode == 0
        if not ok:
            print("  (make_bench_checkpoint.py failed, using the tiny checkpoint): " + p.stdout[-500:])
    if not ok:
        model = os.path.join(a.workdir, "tiny-stablelm-f32")
        subprocess.run([D.PYTHON, os.path.join(ROOT, "tools", "make_tiny_checkpoint.py"), "--out", model,
                        "--backbone", "stablelm", "--dtype", "f32"], check=True, stdout=subprocess.DEVNULL,
                       timeout=120)
        what = "TINY checkpoint (hidden 64, 4 layers, MoE layers 0,2 x 4 experts)"
    with open(os.path.join(model, "config.json")) as f:
        cfg = json.load(f)
    hidden = cfg["hidden_size"]
    n_moe = len(cfg["moe"]["moe_layers_idx"])
    print("checkpoint: %s, %s" % (what, model))
    print("NOTE: the router answers cases one after the other (no batching across cases yet): N cases\n"
          "      handed over at once run back to back; TTFT includes the wait behind earlier cases.")

    variants = [("as configured (OpenBLAS threads = its default)", {}),
                ("OPENBLAS_NUM_THREADS=1 (router, experts and medmoe-run)", {"OPENBLAS_NUM_THREADS": "1"})]
    saved = dict(os.environ)
    for i, (label, env) in enumerate(variants):
        print("\n==== configuration %d: %s ====" % (i + 1, label))
        os.environ.clear()
        os.environ.update(saved)
        os.environ.update(env)
        measure(a, model, image, hidden, n_moe, sizes, os.path.join(a.workdir, "run%d" % (i + 1)))
    os.environ.clear()
    os.environ.update(saved)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # noqa: BLE001 — a benchmark prints, never fails
        print("bench/distributed: failed: %r" % e)
        sys.exit(0)
