#!/usr/bin/python3
"""Metrics and logs end to end (docs/ARCHITECTURE.md, "Observability"): medmoe-router + 4 medmoe-expert processes started with
--metrics-listen 127.0.0.1:0 (--metrics-port-file), a case answered, then both kinds of
/metrics endpoint scraped over HTTP and their series checked for presence and sane values.

    metrics_e2e.py --scenario cases|grpc --router BIN --expert BIN --model DIR --image PNG
                   --workdir DIR

  cases  router reading --cases from stdin (tenant label "local"); expert 0 logs JSON lines
         (every line parsed); router rows routed == experts' rows computed; replica batch
         counts == experts' batch counts; /healthz 200, unknown path 404, POST 405
  grpc   router serving gRPC (tests/grpc/grpclib.py): an Ask and an AskStream by a tenant,
         one call with a bad key: medmoe_cases_total{tenant,status} for each, TTFT and
         token-latency histograms filled, queue depths back to 0
Every process is killed at the end (distlib.Cluster); every wait is bounded.
"""

import argparse
import json
import math
import os
import re
import sys
import time
import urllib.error
import urllib.request

sys.dont_write_bytecode = True
HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(TESTS, "distributed"))
import distlib as D  # noqa: E402
from distlib import TestFailure, log  # noqa: E402

LINE_RE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_exposition(text, where):
    """{name: [(labels dict, value)]} and {name: type}; any line that does not parse fails."""
    series, types = {}, {}
    for ln in text.splitlines():
        if not ln:
            continue
        if ln.startswith("# TYPE "):
            _, _, name, typ = ln.split(" ", 3)
            types[name] = typ
            continue
        if ln.startswith("# HELP "):
            continue
        m = LINE_RE.match(ln)
        if not m:
            raise TestFailure("%s: line is not in the text exposition format: %r" % (where, ln))
        labels = dict(LABEL_RE.findall(m.group(3) or ""))
        try:
            v = float(m.group(4))
        except ValueError:
            raise TestFailure("%s: bad value in %r" % (where, ln))
        series.setdefault(m.group(1), []).append((labels, v))
    return series, types


def http(port, path, method="GET"):
    req = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path), method=method,
                                 data=b"x" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()


class Scrape:
    def __init__(self, port, what):
        st, ctype, body = http(port, "/metrics")
        if st != 200 or not ctype.startswith("text/plain; version=0.0.4"):
            raise TestFailure("%s /metrics: status %d, Content-Type %r" % (what, st, ctype))
        self.what = what
        self.text = body
        self.series, self.types = parse_exposition(body, what)

    def get(self, name, **labels):
        """Values of `name` whose labels include `labels`."""
        return [v for lab, v in self.series.get(name, []) if all(lab.get(k) == x for k, x in labels.items())]

    def one(self, name, **labels):
        vs = self.get(name, **labels)
        if len(vs) != 1:
            raise TestFailure("%s: want one series %s%s, found %d\n%s"
                              % (self.what, name, labels or "", len(vs), self.excerpt(name)))
        return vs[0]

    def total(self, name, **labels):
        return sum(self.get(name, **labels))

    def typed(self, name, typ):
        if self.types.get(name) != typ:
            raise TestFailure("%s: %s has TYPE %r, want %r" % (self.what, name, self.types.get(name), typ))

    def excerpt(self, name):
        return "\n".join("    | " + x for x in self.text.splitlines() if name in x)[:3000] or "    | (absent)"

    def histogram(self, name, min_count=1, **labels):
        """Checks a histogram's buckets (cumulative, ending in +Inf == count); returns (count, sum)."""
        self.typed(name, "histogram")
        count = self.total(name + "_count", **labels)
        s = self.total(name + "_sum", **labels)
        if count < min_count or not (s >= 0) or math.isinf(s):
            raise TestFailure("%s: %s count %s sum %s (want count >= %d)\n%s"
                              % (self.what, name, count, s, min_count, self.excerpt(name)))
        groups = {}
        for lab, v in self.series.get(name + "_bucket", []):
            if any(lab.get(k) != x for k, x in labels.items()):
                continue
            key = tuple(sorted((k, x) for k, x in lab.items() if k != "le"))
            groups.setdefault(key, []).append((float(lab["le"]), v))
        for key, bs in groups.items():
            bs.sort()
            if bs[-1][0] != math.inf or any(b[1] > c[1] for b, c in zip(bs, bs[1:])):
                raise TestFailure("%s: %s%s buckets not cumulative or no +Inf: %s" % (self.what, name, key, bs))
        if sum(bs[-1][1] for bs in groups.values()) != count:
            raise TestFailure("%s: %s +Inf buckets do not add up to _count" % (self.what, name))
        return count, s


def read_port(path, proc, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                t = f.read().strip()
            if t:
                p = int(t)
                if not 0 < p < 65536:
                    raise TestFailure("%s holds %r: not a bound port" % (path, t))
                return p
        except FileNotFoundError:
            pass
        if not proc.alive():
            raise TestFailure("%s exited before writing %s\n%s" % (proc.name, path, proc.describe()))
        time.sleep(0.02)
    raise TestFailure("%s wrote no %s within %d s\n%s" % (proc.name, path, timeout, proc.describe()))


def metrics_args(workdir, name):
    pf = os.path.join(workdir, name + ".metrics-port")
    if os.path.exists(pf):
        os.remove(pf)
    return ["--metrics-listen", "127.0.0.1:0", "--metrics-port-file", pf], pf


def check_expert(sc, used):
    """An expert's own series after serving; returns (batches, rows)."""
    for n, t in (("medmoe_expert_batches_total", "counter"), ("medmoe_expert_rows_total", "counter"),
                 ("medmoe_expert_queue_depth", "gauge"), ("medmoe_expert_memory_bytes", "gauge"),
                 ("medmoe_expert_errors_total", "counter")):
        sc.typed(n, t)
    b = sc.one("medmoe_expert_batches_total")
    rows = sc.one("medmoe_expert_rows_total")
    if used and (b < 1 or rows < b):
        raise TestFailure("%s: batches %s rows %s after a case that used it" % (sc.what, b, rows))
    n, s = sc.histogram("medmoe_expert_compute_seconds", min_count=1 if used else 0)
    if n != b + sc.total("medmoe_expert_errors_total"):
        raise TestFailure("%s: compute_seconds_count %s != batches %s + errors" % (sc.what, n, b))
    if sc.one("medmoe_expert_queue_depth") != 0:
        raise TestFailure("%s: queue depth %s when idle" % (sc.what, sc.one("medmoe_expert_queue_depth")))
    mem = sc.one("medmoe_expert_memory_bytes")
    if not 1e6 < mem < 64e9:
        raise TestFailure("%s: memory_bytes %s is not a plausible RSS" % (sc.what, mem))
    return b, rows


def check_router_dispatch(sc, n_experts, used):
    sc.typed("medmoe_live_replicas", "gauge")
    sc.typed("medmoe_expert_queue_depth", "gauge")
    sc.typed("medmoe_tokens_routed_total", "counter")
    for k in range(n_experts):
        if sc.one("medmoe_live_replicas", expert=str(k)) != 1:
            raise TestFailure("router: live replicas of expert %d: %s, want 1" % (k, sc.excerpt("live_replicas")))
        if sc.one("medmoe_expert_queue_depth", expert=str(k)) != 0:
            raise TestFailure("router: expert_queue_depth{expert=%d} not 0 when idle" % k)
    routed = sc.series.get("medmoe_tokens_routed_total", [])
    if not routed or any(set(lab) != {"layer", "expert"} for lab, _ in routed):
        raise TestFailure("router: medmoe_tokens_routed_total{layer,expert} missing\n" + sc.excerpt("routed"))
    for k in used:
        if sc.total("medmoe_tokens_routed_total", expert=str(k)) <= 0:
            raise TestFailure("router: no tokens routed to expert %d, which the case used" % k)
        sc.histogram("medmoe_replica_batch_seconds", expert=str(k))
    if sc.one("medmoe_queue_depth") != 0:
        raise TestFailure("router: medmoe_queue_depth %s when idle" % sc.one("medmoe_queue_depth"))


def check_http_errors(port, what):
    st, _, body = http(port, "/healthz")
    if st != 200 or body.strip() != "ok":
        raise TestFailure("%s /healthz: %d %r" % (what, st, body))
    st, _, _ = http(port, "/nope")
    if st != 404:
        raise TestFailure("%s /nope: status %d, want 404" % (what, st))
    st, _, _ = http(port, "/metrics", method="POST")
    if st != 405:
        raise TestFailure("%s POST /metrics: status %d, want 405" % (what, st))


def check_json_log(proc):
    n = 0
    for ln in proc.log_text().splitlines():
        if not ln.strip():
            continue
        try:
            o = json.loads(ln)
        except json.JSONDecodeError:
            raise TestFailure("%s: --log-format json wrote a line that is not JSON: %r" % (proc.name, ln))
        if not {"ts", "level", "component", "msg"} <= set(o) or o["component"] != "medmoe-expert":
            raise TestFailure("%s: JSON log line lacks ts/level/component/msg: %r" % (proc.name, ln))
        n += 1
    if n < 2:
        raise TestFailure("%s: only %d JSON log line(s)" % (proc.name, n))
    log("%s: %d JSON log lines, all parsed" % (proc.name, n))


def n_experts_of(model):
    with open(os.path.join(model, "config.json")) as f:
        return json.load(f)["moe"]["num_experts"][0]


# ---------------------------------------------------------------------------------------------
def sc_cases(a):
    n = n_experts_of(a.model)
    with D.Cluster({"router": a.router, "expert": a.expert}, a.workdir, hb_ms=200) as cl:
        rargs, rport_file = metrics_args(a.workdir, "router")
        cl.start_router(a.model, extra=rargs + ["--log-level", "info"])
        rport = read_port(rport_file, cl.router)
        eports = []
        for k in range(n):
            eargs, pf = metrics_args(a.workdir, "expert%d" % k)
            if k == 0:
                eargs += ["--log-format", "json"]
            e = cl.start_expert(a.model, k, extra=eargs)
            eports.append((e, read_port(pf, e)))
        # before any case: the families exist, at 0
        sc0 = Scrape(rport, "router (before)")
        sc0.typed("medmoe_cases_total", "counter")
        sc0.histogram("medmoe_ttft_seconds", min_count=0)
        case = {"id": "m1", "image": a.image, "question": "What modality is this image?", "max_tokens": 8}
        ans = cl.router.ask(case, 60)
        if ans.get("status") != "ok":
            raise TestFailure("case answered %r" % ans)
        used = sorted({e for r in ans.get("routing", []) for pos in r["experts"] for e in pos})
        bad = cl.router.ask({"id": "m2", "question": 7}, 30)  # wrong type: INVALID_ARGUMENT
        if bad.get("status") != "error":
            raise TestFailure("a bad case answered %r" % bad)
        log("case answered; experts used %s" % used)

        sc = Scrape(rport, "router")
        if sc.one("medmoe_cases_total", tenant="local", status="OK") != 1:
            raise TestFailure("router: cases_total{local,OK} != 1\n" + sc.excerpt("cases_total"))
        if sc.one("medmoe_cases_total", tenant="local", status="INVALID_ARGUMENT") != 1:
            raise TestFailure("router: cases_total{local,INVALID_ARGUMENT} != 1\n" + sc.excerpt("cases_total"))
        ntok = len(ans["tokens"])
        tc, ts = sc.histogram("medmoe_ttft_seconds")
        lc, _ = sc.histogram("medmoe_token_latency_seconds", min_count=0)
        if tc != 1 or lc != ntok - 1 or not 0 < ts < 60:
            raise TestFailure("router: ttft count %s sum %s, token latency count %s (%d tokens)" % (tc, ts, lc, ntok))
        check_router_dispatch(sc, n, used)
        check_http_errors(rport, "router")

        sum_batches = sum_rows = 0
        for e, port in eports:
            b, rows = check_expert(Scrape(port, e.name), e.expert in used)
            sum_batches += b
            sum_rows += rows
            # the router's view of the same expert
            rb = sc.total("medmoe_replica_batch_seconds_count", expert=str(e.expert))
            if rb != b:
                raise TestFailure("expert %d: %s batches computed, router timed %s" % (e.expert, b, rb))
        routed = sc.total("medmoe_tokens_routed_total")
        if routed != sum_rows:
            raise TestFailure("router routed %s rows, experts computed %s" % (routed, sum_rows))
        check_http_errors(eports[0][1], "expert 0")
        check_json_log(eports[0][0])
        log("router: %d rows routed = experts' rows; %d batches; series OK" % (routed, sum_batches))
        stats = cl.finish_router()
        if not stats:
            raise TestFailure("no router stats")


def sc_grpc(a):
    sys.path.insert(0, os.path.join(TESTS, "grpc"))
    import grpclib as G
    import grpc
    n = n_experts_of(a.model)
    with open(a.image, "rb") as f:
        png = f.read()
    with G.GrpcCluster({"router": a.router, "expert": a.expert}, a.workdir) as cl:
        t = cl.tenant("hospital-a", max_concurrent=4)
        rargs, rport_file = metrics_args(a.workdir, "router")
        cl.start(a.model, experts=n, router_extra=rargs + ["--log-format", "json"],
                 expert_extra=["--metrics-listen", "127.0.0.1:0"])
        rport = read_port(rport_file, cl.router)
        c = cl.client(t)
        ans = c.ask("What modality is this image?", image=png, max_tokens=8, case_id="g1", timeout=60)
        ntok = len(ans.tokens)
        _, toks, _ = G.stream_answer(c.ask_stream("Is there a fracture?", image=png, max_tokens=6,
                                                  case_id="g2", timeout=60), "AskStream")
        try:
            c.ask("What modality is this image?", image=png, max_tokens=4, key="0" * 64, timeout=30)
            raise TestFailure("a call with a bad key succeeded")
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAUTHENTICATED:
                raise TestFailure("bad key: %s, want UNAUTHENTICATED" % e.code())
        # the call log line is written when the call's state is freed, just after the status
        deadline = time.monotonic() + 10
        while True:
            sc = Scrape(rport, "router (grpc)")
            if sum(sc.get("medmoe_cases_total")) >= 3 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if sc.one("medmoe_cases_total", tenant="hospital-a", status="OK") != 2:
            raise TestFailure("cases_total{hospital-a,OK} != 2\n" + sc.excerpt("cases_total"))
        if sc.one("medmoe_cases_total", tenant="-", status="UNAUTHENTICATED") != 1:
            raise TestFailure("cases_total{-,UNAUTHENTICATED} != 1\n" + sc.excerpt("cases_total"))
        tc, _ = sc.histogram("medmoe_ttft_seconds")
        lc, _ = sc.histogram("medmoe_token_latency_seconds")
        if tc != 2 or lc != (ntok - 1) + (len(toks) - 1):
            raise TestFailure("ttft count %s (want 2), token latency count %s (want %d)"
                              % (tc, lc, ntok + len(toks) - 2))
        if sc.one("medmoe_active_cases") != 0:
            raise TestFailure("medmoe_active_cases not 0 when idle")
        check_router_dispatch(sc, n, [])
        if sc.total("medmoe_tokens_routed_total") <= 0:
            raise TestFailure("no tokens routed")
        # JSON call log lines carry the case id
        lines = [json.loads(x) for x in cl.router.log_text().splitlines() if x.startswith("{")]
        if not any(x.get("case") == "g1" and "status=OK" in x.get("msg", "") for x in lines):
            raise TestFailure("no JSON call log line with case g1\n" + cl.router.describe())
        log("grpc: cases by tenant/status, ttft %d, token latency %d, queue depths 0" % (tc, lc))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenario", required=True, choices=["cases", "grpc"])
    ap.add_argument("--router", required=True)
    ap.add_argument("--expert", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--workdir", required=True)
    a = ap.parse_args()
    a.workdir = D.fresh_dir(a.workdir)
    D.main_wrapper(lambda: {"cases": sc_cases, "grpc": sc_grpc}[a.scenario](a))


if __name__ == "__main__":
    main()
