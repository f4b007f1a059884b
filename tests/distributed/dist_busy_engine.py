#!/usr/bin/python3
"""The router never looks dead to its experts while its engine thread is busy outside any MoE
layer (docs/ARCHITECTURE.md, "Threads in the router": the dispatch thread "heartbeats however
long a step or a vision encode takes").

    dist_busy_engine.py --router BIN --expert BIN --run BIN --model DIR --image PNG --workdir DIR
                        [--backend vulkan]

Why: a serving benchmark (bench/serve: router + 4 experts at nice 10 on a loaded 2-core machine)
saw all 4 experts log "silent for ~3000 ms (connection lost): reconnecting" at the same moment,
~30 times in a run, each at the start of a wave of image cases. Its binaries were built before
the dispatch thread existed: the one loop that ran the scheduler's steps also serviced the
expert socket between steps, so a step that ran vision encodes (no expert traffic) for longer
than 3 heartbeats silenced the router. This test puts exactly that on the current router: on the
vulkan backend (lavapipe here) the vision tower runs on the engine thread, inside the step and
before its first MoE layer, and --debug-vision-delay-ms makes that encode last DELAY_MS (10
heartbeat intervals; a peer is dead after 3). The experts run on the cpu backend.

Exit 77 (skipped) when no Vulkan device answers (medmoe-run --backend vulkan fails).

Holds: the image case's answer equals medmoe-run's on the router's backend and its vision_ms
is at least DELAY_MS (the delay was on the engine thread's path); no expert logged "silent for"
(so none reconnected); the router dropped no replica ("left:") and quarantined none; every
expert joined exactly once; the stats show one replica per expert, alive and healthy, without
timeouts; a text case after it is exact too. Every wait is for an event (an answer, the
router's exit) and bounded. The margins (a heartbeat every 500 ms, dead after 1.5 s) hold on a
loaded 2-core machine: with every process at nice 10 beside busy loops at nice 0, no round of
the dispatch thread was measured to take more than its poll timeout + 0.2 s.
"""

import argparse
import json
import os
import re
import subprocess
import sys

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import distlib as D  # noqa: E402
from distlib import TestFailure, log  # noqa: E402

HB_MS = 500          # heartbeat interval: a peer silent for 1.5 s is dead
DELAY_MS = 5000      # the engine thread's vision encode sleeps this long first (10 intervals)
CASE_TIMEOUT = 60.0  # seconds for one case (tiny model: DELAY_MS + well under a second)


def reference(a, case, work):
    """medmoe-run's answer on --backend (None: that backend has no device here)."""
    path = os.path.join(work, "ref-%s-%s.json" % (case["id"], a.backend))
    cmd = [a.run, "--model", a.model, "--vision", os.path.join(a.model, "clip"), "--json",
           "--backend", a.backend] + D.case_run_args(case)
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise TestFailure("medmoe-run did not finish within 120 s: %s" % " ".join(cmd))
    if p.returncode != 0:
        log("medmoe-run --backend %s failed (status %d): %s" % (a.backend, p.returncode, p.stderr.strip()[-500:]))
        return None
    with open(path, "w") as f:
        json.dump(D.parse_json_stdout(p.stdout), f, indent=1)
    return path


def run(a):
    work = D.fresh_dir(a.workdir)
    with open(os.path.join(a.model, "config.json")) as f:
        n_experts = json.load(f)["moe"]["num_experts"][0]
    bins = {"router": a.router, "expert": a.expert, "run": a.run, "keygen": None}
    image_case = {"id": "busy", "image": a.image, "question": "What modality is this image?", "max_tokens": 8}
    text_case = {"id": "after", "question": "Is a chest X-ray enough to rule out a pneumothorax?",
                 "max_tokens": 6}
    refs = {c["id"]: reference(a, c, work) for c in (image_case, text_case)}
    if None in refs.values():
        print("SKIP: no %s device for the router (medmoe-run --backend %s fails)" % (a.backend, a.backend),
              flush=True)
        sys.exit(77)
    with D.Cluster(bins, os.path.join(work, "cluster"), hb_ms=HB_MS) as cl:
        router = cl.start_router(a.model, extra=["--backend", a.backend,
                                                 "--debug-vision-delay-ms", str(DELAY_MS)])
        experts = [cl.start_expert(a.model, k) for k in range(n_experts)]

        ans = router.ask(image_case, CASE_TIMEOUT)
        D.check_equal(ans, refs["busy"], cl.workdir, "image case (engine-thread encode)")
        vision_ms = ans.get("vision_ms") or 0
        if vision_ms < DELAY_MS:
            raise TestFailure("the image case's vision_ms is %.0f with --debug-vision-delay-ms %d: the "
                              "delay was not on its path" % (vision_ms, DELAY_MS))
        log("image case: vision %.0f ms on the engine thread (%d ms of it asleep)" % (vision_ms, DELAY_MS))
        D.check_equal(router.ask(text_case, CASE_TIMEOUT), refs["after"], cl.workdir, "text case after it")

        # The logs are read while the router still runs: once it exits, the experts rightly
        # notice its silence.
        for e in experts:
            silent = [ln for ln in e.log_text().splitlines() if "silent for" in ln]
            if silent:
                raise TestFailure("%s heard nothing from the router for 3 heartbeats while its engine "
                                  "thread was busy:\n  %s" % (e.name, "\n  ".join(silent)))
        text = router.log_text()
        bad = [ln for ln in text.splitlines() if re.search(r"\bleft:|quarantin", ln)]
        if bad:
            raise TestFailure("the router dropped or quarantined a replica while its engine thread was "
                              "busy:\n  %s" % "\n  ".join(bad))
        for k in range(n_experts):
            joins = len(D.router_joined_re(k).findall(text))
            if joins != 1:
                raise TestFailure("expert %d joined %d times (want 1: no reconnection)" % (k, joins))
        stats = cl.finish_router()
        for k in range(n_experts):
            reps = [r for r in stats.get("replicas", []) if r.get("expert") == k]
            if len(reps) != 1 or not reps[0].get("alive") or reps[0].get("health") != "healthy" \
                    or reps[0].get("timeouts", 0) != 0:
                raise TestFailure("stats for expert %d: want one alive, healthy replica without "
                                  "timeouts, got %s" % (k, json.dumps(reps)))
        log("%d experts: none silent, none dropped, each joined once" % n_experts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--router", required=True)
    ap.add_argument("--expert", required=True)
    ap.add_argument("--run", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--backend", default="vulkan", help="the router's (one that encodes on the engine thread)")
    a = ap.parse_args()
    D.main_wrapper(lambda: run(a))


if __name__ == "__main__":
    main()
