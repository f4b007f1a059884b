#!/usr/bin/python3
"""bench/grpc — the gRPC front door: cases/s and latency for 1, 8, 32 concurrent clients.

    bench_grpc.py --router BIN --expert BIN --run BIN --workdir DIR [--cli BIN]
                  [--sizes 1,8,32] [--seconds 8] [--max-tokens 16] [--slots 32]

  * medmoe-router (--grpc-listen on loopback) + 4 medmoe-expert on the tiny StableLM
    checkpoint (tools/make_tiny_checkpoint.py, made in the workdir when missing).
  * N client threads (Python, clients/python/medmoe_client.py, one channel each) each ask
    the same case (image + question, greedy, --max-tokens) back to back for --seconds;
    figures: cases/s over the run, latency p50/p99 (client side: call to answer).
  * baseline in the same run: medmoe-run --json on the same case, its own compute time
    (vision + prefill + decode, load excluded) and its process wall time; the front door's
    overhead is the 1-client p50 minus medmoe-run's compute.
  * with --cli: the C CLI `medmoe ask` one case at a time (process start included).
Prints figures; never fails (exit 0 with a message when something is missing).
"""

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.join(ROOT, "tests", "grpc"))

QUESTION = "What modality is this image?"


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, int(round(p / 100.0 * (len(xs) - 1)))))
    return xs[k]


def ensure_fixtures(workdir):
    model = os.path.join(workdir, "tiny-stablelm-f32")
    images = os.path.join(workdir, "images")
    if not os.path.exists(os.path.join(model, "config.json")):
        subprocess.run(["/usr/bin/python3", os.path.join(ROOT, "tools", "make_tiny_checkpoint.py"), "--out", model,
                        "--backbone", "stablelm", "--dtype", "f32"], check=True, stdout=subprocess.DEVNULL)
    if not os.path.exists(os.path.join(images, "case.png")):
        subprocess.run(["/usr/bin/python3", os.path.join(ROOT, "tests", "make_test_image.py"), images], check=True,
                       stdout=subprocess.DEVNULL)
    return model, os.path.join(images, "case.png")


def baseline(run_bin, model, image, max_tokens, reps=3):
    import json
    walls, computes, out = [], [], None
    for _ in range(reps):
        t0 = time.monotonic()
        p = subprocess.run([run_bin, "--model", model, "--vision", os.path.join(model, "clip"), "--image", image,
                            "--question", QUESTION, "--max-tokens", str(max_tokens), "--json"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
        walls.append((time.monotonic() - t0) * 1000)
        if p.returncode != 0:
            raise RuntimeError("medmoe-run failed: %s" % p.stderr[-500:])
        out = json.loads(p.stdout)
        computes.append(out.get("vision_ms", 0) + out.get("prefill_ms", 0)
                        + out.get("decode_ms_per_token", 0) * max(len(out.get("tokens", [])) - 1, 0))
    return statistics.median(walls), statistics.median(computes), out


def run_clients(G, cl, tenant, image, n, seconds, max_tokens):
    lat, errors = [], {}
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds
    clients = [cl.client(tenant) for _ in range(n)]

    def worker(c):
        while time.monotonic() < stop_at:
            t0 = time.monotonic()
            try:
                c.ask(QUESTION, image=image, max_tokens=max_tokens, timeout=120)
                with lock:
                    lat.append((time.monotonic() - t0) * 1000)
            except Exception as e:  # noqa: BLE001 — counted, printed
                name = G.code_name(e)
                with lock:
                    errors[name] = errors.get(name, 0) + 1
                time.sleep(0.05)

    t0 = time.monotonic()
    ths = [threading.Thread(target=worker, args=(c,), daemon=True) for c in clients]
    for t in ths:
        t.start()
    for t in ths:
        t.join(seconds + 130)
    wall = time.monotonic() - t0
    for c in clients:
        c.close()
    return lat, errors, wall


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--router", required=True)
    ap.add_argument("--expert", required=True)
    ap.add_argument("--run", required=True)
    ap.add_argument("--cli")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--sizes", default="1,8,32")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--slots", type=int, default=32)
    a = ap.parse_args()
    try:
        import grpclib as G
    except ImportError as e:
        print("bench grpc: cannot import the client harness (%s); skipped" % e)
        return 0
    os.makedirs(a.workdir, exist_ok=True)
    model, image_path = ensure_fixtures(a.workdir)
    with open(image_path, "rb") as f:
        image = f.read()

    wall_ms, compute_ms, ref = baseline(a.run, model, image_path, a.max_tokens)
    print("bench grpc: case = tiny StableLM checkpoint (%s), image + question, %d tokens greedy"
          % (ref.get("model"), len(ref.get("tokens", []))))
    print("bench grpc: medmoe-run (one process, same case): compute %.1f ms (vision+prefill+decode), "
          "process wall %.1f ms (load included)" % (compute_ms, wall_ms))

    bins = {"router": a.router, "expert": a.expert, "run": a.run}
    with G.GrpcCluster(bins, os.path.join(a.workdir, "cluster")) as cl:
        t = cl.tenant("bench", max_concurrent=1000)
        cl.start(model, router_extra=["--slots", str(a.slots)])
        warm = cl.client(t)
        warm.ask(QUESTION, image=image, max_tokens=a.max_tokens, timeout=60)
        print("bench grpc: medmoe-router --slots %d + 4 medmoe-expert on 127.0.0.1, Python client threads, "
              "%.0f s per size" % (a.slots, a.seconds))
        print("bench grpc: %8s %9s %9s %10s %10s %s" % ("clients", "cases", "cases/s", "p50 ms", "p99 ms", "errors"))
        p50_1 = None
        for n in [int(x) for x in a.sizes.split(",") if x]:
            lat, errors, wall = run_clients(G, cl, t, image, n, a.seconds, a.max_tokens)
            p50 = pct(lat, 50)
            if n == 1:
                p50_1 = p50
            print("bench grpc: %8d %9d %9.2f %10.1f %10.1f %s"
                  % (n, len(lat), len(lat) / wall if wall > 0 else 0, p50, pct(lat, 99), errors or "-"))
        if p50_1 is not None:
            print("bench grpc: front door overhead at 1 client: p50 %.1f ms - medmoe-run compute %.1f ms = %.1f ms "
                  "(gRPC + auth + scheduler + expert dispatch over ZeroMQ)" % (p50_1, compute_ms, p50_1 - compute_ms))
        if a.cli and os.path.exists(a.cli):
            ws = []
            for _ in range(5):
                t0 = time.monotonic()
                p = subprocess.run([a.cli, "ask", "--server", cl.target, "--key", t.key, "--image", image_path,
                                    "--question", QUESTION, "--max-tokens", str(a.max_tokens)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=60)
                if p.returncode == 0:
                    ws.append((time.monotonic() - t0) * 1000)
            if ws:
                print("bench grpc: C CLI `medmoe ask`, one case per process: median %.1f ms (process start "
                      "+ connect + case)" % statistics.median(ws))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # noqa: BLE001 — a benchmark never fails
        print("bench grpc: stopped: %s" % e)
        sys.exit(0)
