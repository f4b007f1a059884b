#!/usr/bin/python3
"""bench/serve — serving Med-MoE at real size the way users do: a local cluster
(orchestration/medmoe-cluster: medmoe-router + 4 medmoe-expert) behind the gRPC front door,
1 / 4 / 16 concurrent cases from two tenants, beside medmoe-run's single case in the same run.

    bench_serve.py --router BIN --expert BIN --run BIN --data DIR
                   [--layers 24] [--clip-layers 24] [--tiny] [--auto]
                   [--concurrency 1,4,16] [--max-tokens 16] [--slots N|0=auto]
                   [--threads 2] [--run-threads 2] [--workdir DIR] [--model DIR]

Checkpoint: tools/make_tiny_checkpoint.py, random bf16 weights with the real sizes —
StableLM-2-1.6B (hidden 2048, 32 heads x 64, MLP 5632, vocab 100352, max_pos 4096, MoE with
4 experts + the meta expert, top-1, on layers 0, 2, ..) and a CLIP ViT-L/14-336 tower (width
1024, MLP 4096, 16 heads, 336 px, patch 14: 576 image tokens + CLS); --layers of the 24
decoder layers and --clip-layers of the 24 CLIP layers (defaults: all). It lives in
DIR/stablelm2-1.6b-<L>L-clip<C>L/ (the name and maker-args.json stamp bench/model uses) and is
generated when missing (24+24 layers: ~6.8 GB, slow). --tiny: the tools' tiny test checkpoint
instead (hidden 64; quick). --auto (what `make bench` passes): the full size if DIR already
holds it, else print how to make it and run --tiny.

Figures:
  * medmoe-run --json on one image case (MEDMOE_THREADS=--run-threads, the whole machine to
    itself), load excluded: vision ms, prefill ms, decode ms/token, first-token = vision +
    prefill.
  * the cluster: `medmoe-cluster up` with MEDMOE_THREADS=--threads for every process,
    OMP_WAIT_POLICY=PASSIVE, router --slots; two tenants (two API keys in the tenants file);
    for each N in --concurrency, N image cases started at once (tenants alternate), each on
    its own channel with AskStream (clients/python/medmoe_client.py). Client side: time to
    first token (call to first streamed token) p50 / p99, per-case decode tokens/s (tokens
    after the first / time from first to last token), total tokens/s over the wave, and the
    server's own queue_ms / ttft_ms. With N > slots the rest queue (the router maps an f32 KV
    cache of --context positions for every slot: layers x context x kv_width x 8 bytes, whose
    pages cost memory only as positions are reached).
  * small case during a prefill: a text-only case's time to first token alone (median of 3),
    then sent while an image case is prefilling (at vision + --prefill-frac of its prefill
    after it), beside that image case's own first-token time alone.
Machine load (os.getloadavg) is printed at the start, before each phase and at the end.
Prints; never fails (exit 0 with a message when something is missing or breaks).
"""

import argparse
import hashlib
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.dont_write_bytecode = True  # no __pycache__ in the source tree
MAKER = os.path.join(ROOT, "tools", "make_tiny_checkpoint.py")
IMAGER = os.path.join(ROOT, "tests", "make_test_image.py")
CLUSTER = os.path.join(ROOT, "orchestration", "medmoe-cluster")
PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable

QUESTIONS = ["What modality is this image, and what abnormality does it show?",
             "Is there a fracture?", "Describe the findings.", "Which organ is shown?"]
TEXT_QUESTION = "Is a chest X-ray enough to rule out a pneumothorax?"

P = "bench/serve:"


def say(msg=""):
    print("%s %s" % (P, msg) if msg else P, flush=True)


def load_str():
    l1, l5, l15 = os.getloadavg()
    return "load %.2f %.2f %.2f (1/5/15 min, %d cores)" % (l1, l5, l15, os.cpu_count() or 0)


def mem_available():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_of(pid):
    """Private (anonymous) resident bytes: the KV cache, buffers (and weights only when copied:
    --weights f32 / int8).
    The mmapped checkpoint files (RssFile) are page cache shared between processes and
    reclaimable, so they are left out (VmRSS would count them once per process)."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def gib(n):
    if n is None:
        return "?"
    return "%.1f GiB" % (n / 2.0 ** 30) if n >= 2 ** 30 else "%.0f MiB" % (n / 2.0 ** 20)


def pct(xs, p):
    """Nearest rank; with few samples p99 is the maximum."""
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, int(round(p / 100.0 * (len(xs) - 1)))))
    return xs[k]


def ms(v):
    if v is None or v != v:
        return "-"
    return "%.0f" % v if abs(v) >= 100 else "%.1f" % v


# -- checkpoint and image -----------------------------------------------------------------------
def real_args(layers, clip_layers):
    """Exactly bench/model's maker arguments (same directory name and stamp: interchangeable)."""
    return ["--backbone", "stablelm", "--dtype", "bf16", "--shards", "4",
            "--hidden", "2048", "--heads", "32", "--intermediate", "5632",
            "--vocab-size", "100352", "--max-pos", "4096", "--layers", str(layers),
            "--clip-hidden", "1024", "--clip-intermediate", "4096", "--clip-heads", "16",
            "--clip-layers", str(clip_layers), "--clip-image-size", "336",
            "--clip-patch-size", "14"]


def tiny_args(layers, clip_layers):
    args = ["--backbone", "stablelm", "--dtype", "bf16"]
    if layers:
        args += ["--layers", str(layers)]
    if clip_layers:
        args += ["--clip-layers", str(clip_layers)]
    return args


def ckpt_dir(data, tiny, layers, clip_layers):
    if tiny:
        return os.path.join(data, "tiny-stablelm-bf16%s%s" % ("-%dL" % layers if layers else "",
                                                              "-clip%dL" % clip_layers if clip_layers else ""))
    return os.path.join(data, "stablelm2-1.6b-%dL-clip%dL" % (layers, clip_layers))


def have_checkpoint(d, args):
    try:
        with open(os.path.join(d, "maker-args.json")) as f:
            return json.load(f) == args and os.path.exists(os.path.join(d, "config.json")) \
                and os.path.exists(os.path.join(d, "clip", "config.json"))
    except (OSError, ValueError):
        return False


def make_checkpoint(d, args):
    shutil.rmtree(d, ignore_errors=True)
    say("generating the checkpoint into %s (%s) ..." % (d, " ".join(args)))
    t0 = time.time()
    subprocess.run([PY, MAKER, "--out", d] + args, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(d, "maker-args.json"), "w") as f:
        json.dump(args, f)
    say("generated in %.0f s" % (time.time() - t0))


def dir_bytes(d):
    n = 0
    for base, _, files in os.walk(d):
        for f in files:
            if f.endswith(".safetensors"):
                n += os.path.getsize(os.path.join(base, f))
    return n


def ensure_image(data):
    p = os.path.join(data, "images", "case.png")
    if not os.path.exists(p):
        subprocess.run([PY, IMAGER, os.path.dirname(p)], check=True, stdout=subprocess.DEVNULL)
    return p


def model_shape(model):
    with open(os.path.join(model, "config.json")) as f:
        c = json.load(f)
    with open(os.path.join(model, "clip", "config.json")) as f:
        v = json.load(f)
    heads = c.get("num_attention_heads", 1)
    kv_heads = c.get("num_key_value_heads") or heads
    kv_width = c["hidden_size"] // heads * kv_heads
    return dict(hidden=c["hidden_size"], layers=c["num_hidden_layers"], max_pos=c["max_position_embeddings"],
                inter=c.get("intermediate_size"), vocab=c.get("vocab_size"), kv_width=kv_width,
                clip_layers=v["num_hidden_layers"], clip_hidden=v["hidden_size"], image=v["image_size"],
                patch=v["patch_size"], dtype=c.get("torch_dtype"),
                kv_slot_bytes=c["num_hidden_layers"] * c["max_position_embeddings"] * kv_width * 2 * 4)


# -- medmoe-run baseline ---------------------------------------------------------------------------
def thread_env(n):
    env = dict(os.environ)
    env["MEDMOE_THREADS"] = str(n)
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    env.pop("OMP_NUM_THREADS", None)
    env.pop("OPENBLAS_NUM_THREADS", None)
    return env


def run_baseline(a, model, image):
    argv = [a.run, "--model", model, "--vision", os.path.join(model, "clip"), "--image", image,
            "--question", QUESTIONS[0], "--max-tokens", str(a.max_tokens), "--backend", "cpu",
            "--weights", a.weights, "--json"]
    outs = []
    for _ in range(a.run_reps):
        t0 = time.monotonic()
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=thread_env(a.run_threads))
        hwm = [0]

        def sample():  # the process's peak RSS (VmHWM), read until it exits
            while p.poll() is None:
                try:
                    with open("/proc/%d/status" % p.pid) as f:
                        for line in f:
                            if line.startswith("VmHWM:"):
                                hwm[0] = max(hwm[0], int(line.split()[1]) * 1024)
                except (OSError, ValueError):
                    pass
                time.sleep(0.5)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        try:
            out, err = p.communicate(timeout=a.case_timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            raise RuntimeError("medmoe-run did not finish within %.0f s" % a.case_timeout)
        wall = time.monotonic() - t0
        if p.returncode != 0:
            raise RuntimeError("medmoe-run exited %d: %s" % (p.returncode, err[-1500:]))
        o = json.loads(out)
        o["peak_rss"] = hwm[0] if wall > 2 else None  # sampled every 0.5 s
        for k in ("vision_ms", "prefill_ms", "decode_ms_per_token", "load_ms"):
            if k not in o:
                o[k] = (o.get("timings") or {}).get(k)
        o["wall_s"] = wall
        outs.append(o)
    # the median case by time to first token
    outs.sort(key=lambda o: (o["vision_ms"] or 0) + (o["prefill_ms"] or 0))
    return outs[len(outs) // 2], outs


# -- the cluster ---------------------------------------------------------------------------------------
class Tenant:
    def __init__(self, tid):
        self.id = tid
        self.key = secrets.token_hex(32)


class Cluster:
    """medmoe-cluster up/down on a config of our own (ephemeral ports: nothing else collides)."""

    def __init__(self, a, model, work):
        self.a = a
        self.work = work
        self.cfg = os.path.join(work, "cluster.json")
        self.tenants = [Tenant("hospital-a"), Tenant("hospital-b")]
        self.up_done = False
        os.makedirs(work, exist_ok=True)
        with open(os.path.join(work, "tenants.json"), "w") as f:
            json.dump({"tenants": [{"id": t.id, "key_sha256": hashlib.sha256(t.key.encode()).hexdigest(),
                                    "max_concurrent": 0, "cases_per_minute": 0} for t in self.tenants]},
                      f, indent=1)
        with open(os.path.join(work, "status.key"), "w") as f:
            f.write(self.tenants[0].key + "\n")
        os.chmod(os.path.join(work, "status.key"), 0o600)
        cfg = {
            "_comment": "written by bench/serve/bench_serve.py",
            "router_bin": a.router, "expert_bin": a.expert, "model": model,
            "keygen_bin": os.path.join(os.path.dirname(a.router), "medmoe-keygen"),
            "vision": os.path.join(model, "clip"), "backend": "cpu", "threads": a.threads,
            "log_dir": os.path.join(work, "logs"), "state_dir": os.path.join(work, "state"),
            "status_key_file": os.path.join(work, "status.key"), "up_timeout_s": a.up_timeout,
            "router": {"experts_bind": "tcp://127.0.0.1:*", "grpc_listen": "127.0.0.1:0",
                       "tenants": os.path.join(work, "tenants.json"), "heartbeat_ms": a.heartbeat_ms,
                       "expert_wait_ms": 60000, "args": ["--slots", str(a.slots_used),
                                                         "--context", str(a.context_used),
                                                         "--max-tokens-limit", str(max(512, a.max_tokens)),
                                                         "--weights", a.weights]},
            "experts": {"count": 4, "replicas": 1, "args": ["--weights", a.weights]},
        }
        with open(self.cfg, "w") as f:
            json.dump(cfg, f, indent=1)

    def ctl(self, *args, timeout=60):
        env = dict(os.environ)
        env["OMP_WAIT_POLICY"] = "PASSIVE"  # inherited by supervisor -> router, experts
        return subprocess.run([PY, CLUSTER] + list(args) + ["--config", self.cfg], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env, timeout=timeout)

    def up(self):
        self.ctl("down", timeout=60)  # a leftover of an interrupted run of ours (same state dir)
        t0 = time.monotonic()
        env = dict(os.environ)
        env["OMP_WAIT_POLICY"] = "PASSIVE"
        sup_log = os.path.join(self.work, "logs", "supervisor.log")
        off = os.path.getsize(sup_log) if os.path.exists(sup_log) else 0
        router_log = os.path.join(self.work, "logs", "router.log")
        self.router_log_off = os.path.getsize(router_log) if os.path.exists(router_log) else 0
        p = subprocess.Popen([PY, CLUSTER, "up", "--config", self.cfg], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=env)
        self.up_done = True
        # `up` waits up_timeout_s; a process that cannot start or keeps crashing ends it sooner
        while p.poll() is None:
            time.sleep(1.0)
            try:
                with open(sup_log, "rb") as f:
                    f.seek(off)
                    tail = f.read().decode(errors="replace")
            except OSError:
                tail = ""
            if "cannot start" in tail or tail.count("restart in") >= 3:
                p.kill()
                p.wait()
                raise RuntimeError("processes fail to start or keep exiting:\n%s\nrouter log tail:\n%s"
                                   % (tail[-1500:], self.log_tail("router")))
        out = p.stdout.read()
        if p.returncode != 0:
            raise RuntimeError("medmoe-cluster up failed (%d): %s\nrouter log tail:\n%s"
                               % (p.returncode, out[-1500:], self.log_tail("router")))
        self.up_s = time.monotonic() - t0
        with open(os.path.join(self.work, "state", "state.json")) as f:
            st = json.load(f)
        self.state = st
        self.target = "127.0.0.1:%d" % int(st["grpc_port"])
        return st

    def pids(self):
        out = [("router", self.state["router"]["pid"])]
        for e, reps in sorted(self.state.get("experts", {}).items()):
            for r in reps:
                out.append((r["name"], r["pid"]))
        return out

    def churn(self):
        """What the router logged since this start: replicas that left (and why), batches re-sent."""
        import re
        try:
            with open(os.path.join(self.work, "logs", "router.log"), "rb") as f:
                f.seek(self.router_log_off)  # the logs are appended to across runs
                text = f.read().decode(errors="replace")
        except (OSError, AttributeError):
            return None
        left = re.findall(r"replica \S+ \(expert \d+, [^)]*\) left: ([^;(]*)", text)
        resent = sum(int(x) for x in re.findall(r"; (\d+) in-flight batch\(es\) to re-send", text))
        why = {}
        for w in left:
            w = w.strip()
            why[w] = why.get(w, 0) + 1
        return dict(left=len(left), why=why, resent=resent)

    def log_tail(self, name, n=1500):
        try:
            with open(os.path.join(self.work, "logs", name + ".log"), "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return "(no log)"

    def down(self):
        if self.up_done:
            p = self.ctl("down", timeout=120)
            if p.returncode != 0:
                say("medmoe-cluster down: %s" % p.stdout[-500:])


def stream_case(MC, target, stub_dir, key, question, image, max_tokens, timeout, start_evt=None):
    """One AskStream on its own channel; client-side times (monotonic seconds)."""
    rec = {"question": question, "image": image is not None, "error": None, "tokens": 0,
           "t_first": None, "t_last": None, "final": None}
    c = MC.Client(target, key=key, stub_dir=stub_dir)
    try:
        if start_evt is not None:
            start_evt.wait()
        rec["t0"] = time.monotonic()
        call = c.ask_stream(question, image=image, max_tokens=max_tokens, timeout=timeout)
        for ch in call:
            now = time.monotonic()
            if len(ch.tokens):
                if rec["t_first"] is None:
                    rec["t_first"] = now
                rec["t_last"] = now
                rec["tokens"] += len(ch.tokens)
            if ch.HasField("final"):
                rec["final"] = ch.final
        rec["t_end"] = time.monotonic()
    except Exception as e:  # noqa: BLE001 — recorded, printed
        rec["t_end"] = time.monotonic()
        code = getattr(e, "code", None)
        rec["error"] = "%s: %s" % (code().name if callable(code) else type(e).__name__,
                                   (e.details() if hasattr(e, "details") else str(e))[:200])
    finally:
        c.close()
    return rec


def wave(MC, cl, image, n, a):
    """n cases at once, tenants alternating; returns the records and the wave's wall."""
    recs = [None] * n
    evt = threading.Event()

    def worker(i):
        t = cl.tenants[i % 2]
        recs[i] = stream_case(MC, cl.target, a.stub_dir, t.key, QUESTIONS[i % len(QUESTIONS)], image,
                              a.max_tokens, a.case_timeout, evt)
        recs[i]["tenant"] = t.id

    ths = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    for t in ths:
        t.start()
    time.sleep(0.2)  # every channel made; then all start together
    t0 = time.monotonic()
    evt.set()
    for t in ths:
        t.join(a.case_timeout + 60)
    wall = time.monotonic() - t0
    return [r for r in recs if r is not None], t0, wall


def union_len(intervals):
    tot, end = 0.0, None
    for s, e in sorted(intervals):
        if end is None or s > end:
            tot += e - s
            end = e
        elif e > end:
            tot += e - end
            end = e
    return tot


def summarize(recs, t0, wall):
    ok = [r for r in recs if not r["error"] and r["t_first"] is not None]
    errs = {}
    for r in recs:
        if r["error"]:
            k = r["error"].split(":")[0]
            errs[k] = errs.get(k, 0) + 1
    ttft = [(r["t_first"] - r["t0"]) * 1e3 for r in ok]
    dec = [(r["tokens"] - 1) / (r["t_last"] - r["t_first"]) for r in ok
           if r["tokens"] > 1 and r["t_last"] > r["t_first"]]
    toks = sum(r["tokens"] for r in ok)
    dsteps = sum(max(r["tokens"] - 1, 0) for r in ok)
    dspan = union_len([(r["t_first"], r["t_last"]) for r in ok if r["tokens"] > 1])
    srv = [r["final"].timings for r in ok if r["final"] is not None]
    return dict(n=len(recs), ok=len(ok), errors=errs, ttft=ttft, dec=dec, tokens=toks, wall=wall,
                total_tps=toks / wall if wall > 0 else 0.0,
                decode_tps=dsteps / dspan if dspan > 0 else float("nan"),
                srv_queue=[t.queue_ms for t in srv], srv_ttft=[t.ttft_ms for t in srv],
                srv_vision=[t.vision_ms for t in srv], srv_dec=[t.decode_ms_per_token for t in srv],
                prompt=[r["final"].prompt_tokens for r in ok if r["final"] is not None],
                first_err=next((r["error"] for r in recs if r["error"]), None))


# -- main ---------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--router", required=True, help="medmoe-router binary")
    ap.add_argument("--expert", required=True, help="medmoe-expert binary")
    ap.add_argument("--run", required=True, help="medmoe-run binary")
    ap.add_argument("--data", required=True, help="checkpoints + image (kept between runs)")
    ap.add_argument("--workdir", help="cluster config, logs, state (default DATA/serve-work)")
    ap.add_argument("--model", help="use this checkpoint dir as is (no generation, no size check)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 24; --tiny: 4)")
    ap.add_argument("--clip-layers", type=int, default=None, help="CLIP layers (default 24; --tiny: 3)")
    ap.add_argument("--tiny", action="store_true", help="the tools' tiny test checkpoint (hidden 64)")
    ap.add_argument("--auto", action="store_true",
                    help="full size only if DATA already holds it, else print how to make it and run --tiny")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--weights", default="stored", choices=("stored", "f32", "int8"),
                    help="--weights of medmoe-run, the router and the experts (default stored)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--slots", type=int, default=0,
                    help="router --slots (0 = auto: what MemAvailable leaves after the weights, <= max concurrency)")
    ap.add_argument("--context", type=int, default=1024,
                    help="router --context: positions per KV-cache slot (0 = the model's max_pos)")
    ap.add_argument("--threads", type=int, default=0,
                    help="MEDMOE_THREADS of every cluster process (default 0: unset, every core, as "
                         "medmoe-cluster; idle threads sleep: at full size on 2 cores, 2 threads "
                         "decoded at 351 ms/token vs 387 with 1)")
    ap.add_argument("--run-threads", type=int, default=2, help="MEDMOE_THREADS of the medmoe-run baseline")
    ap.add_argument("--run-reps", type=int, default=1, help="medmoe-run repetitions (median shown)")
    ap.add_argument("--small-reps", type=int, default=3, help="text-only cases alone (median shown)")
    ap.add_argument("--prefill-frac", type=float, default=0.25,
                    help="the small case arrives at vision + this fraction of the image case's prefill")
    ap.add_argument("--no-interference", action="store_true", help="skip the small-case-during-prefill figure")
    ap.add_argument("--heartbeat-ms", type=int, default=1000, help="router.heartbeat_ms (medmoe-cluster's default)")
    ap.add_argument("--case-timeout", type=float, default=3600.0, help="seconds, per gRPC call")
    ap.add_argument("--up-timeout", type=float, default=900.0, help="seconds for medmoe-cluster up")
    a = ap.parse_args()
    for k in ("router", "expert", "run", "data", "workdir", "model"):
        if getattr(a, k):
            setattr(a, k, os.path.abspath(getattr(a, k)))

    t_start = time.monotonic()
    say("start: %s, MemAvailable %s" % (load_str(), gib(mem_available())))
    for what, path in (("medmoe-router", a.router), ("medmoe-expert", a.expert), ("medmoe-run", a.run),
                       ("orchestration/medmoe-cluster", CLUSTER)):
        if not os.access(path, os.X_OK):
            say("%s not found at %s: skipped" % (what, path))
            return 0
    try:
        sys.path.insert(0, os.path.join(ROOT, "clients", "python"))
        import medmoe_client as MC  # needs python3-grpcio (+ python3-grpc-tools for the stubs)
    except ImportError as e:
        say("cannot import clients/python/medmoe_client.py (%s): skipped (apt install python3-grpcio "
            "python3-grpc-tools)" % e)
        return 0
    os.makedirs(a.data, exist_ok=True)
    work = a.workdir or os.path.join(a.data, "serve-work")
    a.stub_dir = os.path.join(work, "py-stubs")

    # the checkpoint
    if a.model:
        model = os.path.abspath(a.model)
        if not os.path.exists(os.path.join(model, "config.json")):
            say("--model %s: no config.json: skipped" % model)
            return 0
    else:
        if a.auto and not a.tiny:
            L, C = a.layers or 24, a.clip_layers or 24
            d = ckpt_dir(a.data, False, L, C)
            if not have_checkpoint(d, real_args(L, C)):
                say("no full-size checkpoint in %s; to make it (~6.8 GB, tens of minutes on 2 cores):" % d)
                say("  %s %s --out %s %s && echo '%s' > %s/maker-args.json"
                    % (PY, MAKER, d, " ".join(real_args(L, C)), json.dumps(real_args(L, C)), d))
                say("and run this bench again (or: %s --router .. --expert .. --run .. --data %s --slots 4)"
                    % (os.path.abspath(__file__), a.data))
                say("running the small configuration instead (--tiny: hidden 64, 4+3 layers)")
                a.tiny = True
                a.layers = a.clip_layers = None
        if a.tiny:
            args = tiny_args(a.layers, a.clip_layers)
            model = ckpt_dir(a.data, True, a.layers, a.clip_layers)
        else:
            a.layers, a.clip_layers = a.layers or 24, a.clip_layers or 24
            args = real_args(a.layers, a.clip_layers)
            model = ckpt_dir(a.data, False, a.layers, a.clip_layers)
        if not have_checkpoint(model, args):
            make_checkpoint(model, args)
    image = ensure_image(a.data)
    with open(image, "rb") as f:
        png = f.read()
    sh = model_shape(model)
    # positions per router slot: the prompt (image + text) and the answer fit
    # in 1024 at the real size; the KV cache is sized for it (router --context)
    a.context_used = min(sh["max_pos"], a.context if a.context > 0 else sh["max_pos"])
    sh["kv_slot_bytes"] = sh["kv_slot_bytes"] * a.context_used // sh["max_pos"]
    wbytes = dir_bytes(model)
    sizes = [int(x) for x in a.concurrency.split(",") if x.strip()]
    if a.slots <= 0:
        avail = mem_available() or 0
        # the cpu backend uses the weights in place from the page cache (shared by the five
        # processes: once, the checkpoint's bytes); --weights f32 widens a private copy (~2x
        # the bf16 bytes); + ~1 GiB the five processes hold besides, + 4 GiB for the rest
        wf32 = wbytes * (2 if a.weights == "f32" and "16" in str(sh["dtype"]) else 1)
        fit = int((avail - wf32 - 5 * 2 ** 30) // sh["kv_slot_bytes"])
        a.slots_used = max(1, min(max(sizes or [1]), fit))
        slots_note = "auto: (MemAvailable %s - weights %s - 5 GiB) / %s per slot" % (
            gib(avail), gib(wf32), gib(sh["kv_slot_bytes"]))
    else:
        a.slots_used = a.slots
        slots_note = "given"
    say("checkpoint %s: %s, hidden %d, MLP %s, %d decoder layers (MoE 4 experts + meta, top-1, on every "
        "other one), vocab %s, max_pos %d; CLIP width %d, %d layers, %d px / patch %d; %s of safetensors"
        % (model, sh["dtype"], sh["hidden"], sh["inter"], sh["layers"], sh["vocab"], sh["max_pos"],
           sh["clip_hidden"], sh["clip_layers"], sh["image"], sh["patch"], gib(wbytes)))
    say("KV cache per router slot: %d layers x %d positions (--context) x %d x 2 x f32 = %s; --slots %d (%s) = %s"
        % (sh["layers"], a.context_used, sh["kv_width"], gib(sh["kv_slot_bytes"]), a.slots_used, slots_note,
           gib(sh["kv_slot_bytes"] * a.slots_used)))

    # 1. the baseline
    say("medmoe-run baseline (%s) ..." % load_str())
    try:
        base, allb = run_baseline(a, model, image)
    except Exception as e:  # noqa: BLE001
        say("medmoe-run failed: %s" % e)
        base = None
    if base:
        n_tok = len(base.get("tokens", []))
        b_ttft = base["vision_ms"] + base["prefill_ms"]
        b_dec = base["decode_ms_per_token"] if n_tok > 1 else None
        say("medmoe-run, one image case, MEDMOE_THREADS=%d, OMP_WAIT_POLICY=PASSIVE, load excluded "
            "(load %s ms, process wall %.1f s; %d run(s), median shown):"
            % (a.run_threads, ms(base.get("load_ms")), base["wall_s"], len(allb)))
        say("  prompt %d positions (%d image), %d tokens generated; peak RSS %s (the mapped "
            "checkpoint pages it touched + 1 KV slot + buffers)" % (base.get("prompt_len", 0), base.get("image_len", 0), n_tok,
                                               gib(base.get("peak_rss"))))
        say("  vision %s ms | prefill %s ms | first token (vision+prefill) %s ms | decode %s ms/token = %s tok/s"
            % (ms(base["vision_ms"]), ms(base["prefill_ms"]), ms(b_ttft), ms(b_dec),
               "%.2f" % (1e3 / b_dec) if b_dec else "-"))

    # 2. the cluster
    cl = Cluster(a, model, work)
    results = {}
    try:
        say("medmoe-cluster up: router --slots %d + 4 experts, MEDMOE_THREADS=%d each, OMP_WAIT_POLICY=PASSIVE "
            "(%s) ..." % (a.slots_used, a.threads, load_str()))
        try:
            cl.up()
        except Exception as e:  # noqa: BLE001
            say("the cluster did not come up: %s" % e)
            return 0
        rss = [(n, rss_of(pid)) for n, pid in cl.pids()]
        say("cluster up in %.0f s at %s; private RSS (RssAnon) %s; total %s; MemAvailable now %s"
            % (cl.up_s, cl.target, ", ".join("%s %s" % (n, gib(r)) for n, r in rss),
               gib(sum(r or 0 for _, r in rss)), gib(mem_available())))
        # warm-up: one short text case (first-touch effects out of the figures)
        w = stream_case(MC, cl.target, a.stub_dir, cl.tenants[0].key, TEXT_QUESTION, None, 2, a.case_timeout)
        if w["error"]:
            say("warm-up case failed: %s\nrouter log:\n%s" % (w["error"], cl.log_tail("router")))
            return 0

        for n in sizes:
            say("N=%d: %d image case(s) at once, tenants alternating (%s) ..." % (n, n, load_str()))
            recs, t0, wall = wave(MC, cl, png, n, a)
            s = summarize(recs, t0, wall)
            results[n] = s
            if s["first_err"]:
                say("  N=%d: %d error(s), first: %s" % (n, sum(s["errors"].values()), s["first_err"]))

        # 3. small case during a prefill
        inter = None
        if not a.no_interference:
            say("small case during a prefill (%s) ..." % load_str())
            inter = interference(MC, cl, png, a, results.get(1), base)
    finally:
        peak = [(n, rss_of(pid)) for n, pid in cl.pids()] if getattr(cl, "state", None) else []
        churn = cl.churn() if getattr(cl, "state", None) else None
        cl.down()

    # report
    say("")
    say("RESULTS (%s%s, %d max tokens, greedy; random weights, so a case may stop early at EOS)"
        % ("tiny checkpoint" if a.tiny else "real widths, %d+%d layers" % (sh["layers"], sh["clip_layers"]),
           "" if a.tiny else (" = FULL SIZE" if sh["layers"] == 24 and sh["clip_layers"] == 24 else ""),
           a.max_tokens))
    if peak:
        say("private RSS (RssAnon) at the end: %s; total %s" % (", ".join("%s %s" % (n, gib(r)) for n, r in peak),
                                              gib(sum(r or 0 for _, r in peak))))
    if base:
        say("medmoe-run 1 case (%d threads): vision %s ms, prefill %s ms, first token %s ms, decode %s ms/token "
            "(%s tok/s)" % (a.run_threads, ms(base["vision_ms"]), ms(base["prefill_ms"]), ms(b_ttft), ms(b_dec),
                            "%.2f" % (1e3 / b_dec) if b_dec else "-"))
    say("cluster: router --slots %d + 4 experts, MEDMOE_THREADS=%d, two tenants; TTFT = client call -> first "
        "streamed token; nearest-rank percentiles (p50 of 4 = the 3rd; p99 of <100 cases = the max)"
        % (a.slots_used, a.threads))
    hdr = ("%4s %5s %8s %9s %9s %9s %9s %9s %9s %11s %9s %9s %7s %s"
           % ("N", "ok", "wall s", "TTFT min", "TTFT p50", "TTFT p99", "srv queue", "srv vis", "srv dec",
              "dec tok/s/c", "total", "decoding", "tokens", "errors"))
    say(hdr)
    say("%4s %5s %8s %9s %9s %9s %9s %9s %9s %11s %9s %9s %7s" % ("", "", "", "ms", "ms", "ms", "p50 ms",
                                                                 "p50 ms", "ms/tok", "p50 (min)", "tok/s",
                                                                 "tok/s", ""))
    if base:
        say("%4s %5s %8s %9s %9s %9s %9s %9s %9s %11s %9s %9s %7s %s"
            % ("run", "1", "%.1f" % base["wall_s"], ms(b_ttft), ms(b_ttft), ms(b_ttft), "-", ms(base["vision_ms"]),
               ms(b_dec), "%.2f" % (1e3 / b_dec) if b_dec else "-", "-", "-", n_tok, "(medmoe-run, load excl.)"))
    for n in sizes:
        s = results.get(n)
        if not s:
            continue
        decs = "%.2f (%.2f)" % (statistics.median(s["dec"]), min(s["dec"])) if s["dec"] else "-"
        say("%4d %5s %8.1f %9s %9s %9s %9s %9s %9s %11s %9.2f %9.2f %7d %s"
            % (n, "%d/%d" % (s["ok"], s["n"]), s["wall"], ms(min(s["ttft"] or [float("nan")])),
               ms(pct(s["ttft"], 50)), ms(pct(s["ttft"], 99)),
               ms(pct(s["srv_queue"], 50)), ms(pct(s["srv_vision"], 50)), ms(pct(s["srv_dec"], 50)),
               decs, s["total_tps"], s["decode_tps"], s["tokens"], s["errors"] or "-"))
    say("columns: srv = the router's own timings (queue = arrival to admission; vision = decode + tower + "
        "projector); dec tok/s/c = one case's tokens after its first / first-to-last token time; total = all "
        "tokens / wave wall (vision + prefill included); decoding = tokens after each case's first / time any "
        "case was decoding")
    if base and results.get(1) and results[1]["ttft"]:
        s1 = results[1]
        say("one case through the cluster vs medmoe-run: TTFT %s vs %s ms (%.2fx), decode %s vs %s ms/token"
            % (ms(s1["ttft"][0]), ms(b_ttft), s1["ttft"][0] / b_ttft if b_ttft else 0,
               ms(1e3 / s1["dec"][0]) if s1["dec"] else "-", ms(b_dec)))
    for n in sizes:
        if n > a.slots_used and results.get(n):
            say("N=%d > --slots %d: %d case(s) waited for a slot (server queue p50 %s ms, max %s ms)"
                % (n, a.slots_used, n - a.slots_used, ms(pct(results[n]["srv_queue"], 50)),
                   ms(max(results[n]["srv_queue"] or [float("nan")]))))
    if inter:
        report_interference(inter)
    if churn and churn["left"]:
        say("NOTE: while serving, expert replicas left the router %d time(s) (%s) and rejoined; %d in-flight "
            "batch(es) were re-sent. 'connection gone' = the expert stopped hearing the router's heartbeat "
            "for 3 x %d ms (a busy router on a loaded machine) and reconnected; see %s"
            % (churn["left"], ", ".join("%s: %d" % kv for kv in sorted(churn["why"].items())), churn["resent"],
               a.heartbeat_ms, os.path.join(work, "logs")))
    elif churn is not None:
        say("expert replicas: none left or rejoined while serving")
    say("end: %s; bench wall %.0f s" % (load_str(), time.monotonic() - t_start))
    return 0


def interference(MC, cl, png, a, s1, base):
    key_a, key_b = cl.tenants[0].key, cl.tenants[1].key
    alone = []
    for _ in range(max(1, a.small_reps)):
        r = stream_case(MC, cl.target, a.stub_dir, key_b, TEXT_QUESTION, None, a.max_tokens, a.case_timeout)
        if r["error"]:
            say("  text-only case failed: %s" % r["error"])
            return None
        alone.append(r)
    # when does the image case prefill? its vision and prefill, alone (N=1 wave, else medmoe-run)
    if s1 and s1["srv_vision"] and s1["srv_ttft"]:
        vis = s1["srv_vision"][0]
        pre = max(s1["srv_ttft"][0] - s1["srv_queue"][0] - vis, 0.0)
        src = "the N=1 case's server timings"
    elif base:
        vis, pre, src = base["vision_ms"], base["prefill_ms"], "medmoe-run"
    else:
        vis, pre, src = 0.0, 0.0, "nothing (sent at once)"
    delay = (vis + a.prefill_frac * pre) / 1e3
    big = {}

    def run_big():
        big["r"] = stream_case(MC, cl.target, a.stub_dir, key_a, QUESTIONS[0], png, a.max_tokens, a.case_timeout)

    th = threading.Thread(target=run_big, daemon=True)
    t_big = time.monotonic()
    th.start()
    time.sleep(delay)
    small = stream_case(MC, cl.target, a.stub_dir, key_b, TEXT_QUESTION, None, a.max_tokens, a.case_timeout)
    th.join(a.case_timeout + 60)
    return dict(alone=alone, small=small, big=big.get("r"), t_big=t_big, delay=delay, vis=vis, pre=pre, src=src,
                big_alone=(s1["ttft"][0] if s1 and s1["ttft"] else None), frac=a.prefill_frac)


def report_interference(x):
    al = [(r["t_first"] - r["t0"]) * 1e3 for r in x["alone"] if r["t_first"]]
    sm, bg = x["small"], x["big"]
    say("small case during a prefill: a text-only case (prompt %s positions) vs an image case (vision %s ms, "
        "prefill ~%s ms alone, from %s)" % (x["alone"][0]["final"].prompt_tokens if x["alone"][0]["final"] else "?",
                                             ms(x["vis"]), ms(x["pre"]), x["src"]))
    say("  text-only TTFT alone: median %s ms (%s)" % (ms(statistics.median(al)) if al else "-",
                                                      ", ".join(ms(v) for v in al)))
    if sm["error"] or not sm["t_first"]:
        say("  text-only case during the prefill failed: %s" % sm["error"])
        return
    s_ttft = (sm["t_first"] - sm["t0"]) * 1e3
    arr = sm["t0"] - x["t_big"]
    note = ""
    if bg and bg["t_first"]:
        bf = bg["t_first"] - x["t_big"]
        in_prefill = x["vis"] / 1e3 <= arr < bf
        note = "; the image case's first token came at +%.1f s, so it %s in prefill when the small one arrived" % (
            bf, "WAS" if in_prefill else "was NOT (vision still running, or already decoding)")
    say("  text-only TTFT while the image case prefills (sent +%.1f s after it = vision + %.0f%% of prefill): "
        "%s ms = %.1fx alone%s" % (arr, 100 * x["frac"], ms(s_ttft),
                                   s_ttft / statistics.median(al) if al else float("nan"), note))
    if bg and bg["t_first"]:
        say("  the image case's TTFT with the small one arriving: %s ms (alone, N=1: %s ms)"
            % (ms((bg["t_first"] - bg["t0"]) * 1e3), ms(x["big_alone"])))
    elif bg:
        say("  the image case failed: %s" % bg["error"])


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # noqa: BLE001 — a benchmark never fails
        import traceback
        traceback.print_exc()
        say("stopped: %s" % e)
        sys.exit(0)
