#!/usr/bin/python3
"""Harness for the gRPC front-door tests and benchmark (docs/ARCHITECTURE.md, "The gRPC
front door").

Builds on tests/distributed/distlib.py (process groups, bounded waits, log tails, cleanup,
medmoe-run references): a GrpcCluster is a distlib.Cluster whose router serves gRPC
(--grpc-listen 127.0.0.1:0 --grpc-port-file F --tenants F) instead of reading --cases.

    with GrpcCluster(bins, workdir) as cl:
        t = cl.tenant("hospital-a", max_concurrent=4)
        cl.start(model, experts=4)            # router + experts + health SERVING
        c = cl.client(t)                      # medmoe_client.Client with t's key
        ans = c.ask("What modality?", image=png, max_tokens=16)
"""

import hashlib
import json
import os
import secrets
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.join(ROOT, "tests", "distributed"))
sys.path.insert(0, os.path.join(ROOT, "clients", "python"))
import distlib as D  # noqa: E402
import grpc  # noqa: E402
import medmoe_client as MC  # noqa: E402

TestFailure = D.TestFailure
log = D.log
NODE_CLIENT = os.path.join(ROOT, "clients", "node", "client.js")


class Tenant:
    def __init__(self, tid, key, max_concurrent, cases_per_minute):
        self.id = tid
        self.key = key
        self.max_concurrent = max_concurrent
        self.cases_per_minute = cases_per_minute

    def entry(self):
        return {"id": self.id, "key_sha256": hashlib.sha256(self.key.encode()).hexdigest(),
                "max_concurrent": self.max_concurrent, "cases_per_minute": self.cases_per_minute}


def code_name(e):
    return e.code().name if isinstance(e, grpc.RpcError) else type(e).__name__


def expect_code(fn, code, what, field=None, timeout_note=""):
    """fn() must raise grpc.RpcError with `code` (and `field` in its message)."""
    t0 = time.monotonic()
    try:
        r = fn()
        if hasattr(r, "__iter__") and not isinstance(r, (bytes, str)):
            for _ in r:  # a stream: the error comes while reading
                pass
    except grpc.RpcError as e:
        if e.code().name != code:
            raise TestFailure("%s: expected %s, got %s: %s" % (what, code, e.code().name, e.details()))
        if field and field not in (e.details() or ""):
            raise TestFailure("%s: %s as expected, but the message does not name %r: %r"
                              % (what, code, field, e.details()))
        log("%s: %s: %s" % (what, code, e.details()))
        return e
    raise TestFailure("%s: expected %s, the call succeeded after %.2f s%s"
                      % (what, code, time.monotonic() - t0, timeout_note))


class GrpcCluster(D.Cluster):
    def __init__(self, bins, workdir, hb_ms=200, curve=True):
        super().__init__(bins, workdir, hb_ms, curve)
        self.tenants = []
        self.target = None
        self.stub_dir = os.path.join(workdir, "py-stubs")
        self.clients = []

    # -- setup -------------------------------------------------------------------------------
    def tenant(self, tid, max_concurrent=0, cases_per_minute=0):
        t = Tenant(tid, secrets.token_hex(32), max_concurrent, cases_per_minute)
        self.tenants.append(t)
        return t

    def write_tenants(self):
        path = os.path.join(self.workdir, "tenants.json")
        with open(path, "w") as f:
            json.dump({"tenants": [t.entry() for t in self.tenants]}, f, indent=1)
        return path

    def start(self, model, experts=4, router_extra=(), expert_extra=(), tls=None, wait_serving=True,
              wait_experts_ms=10000, expert_wait_ms=3000):
        """Router (gRPC) + one replica of each of `experts` experts; waits for SERVING."""
        name = self._name("router")
        self.endpoint_file = os.path.join(self.workdir, name + ".endpoint")
        self.port_file = os.path.join(self.workdir, name + ".grpc-port")
        self.stats_file = None
        for f in (self.endpoint_file, self.port_file):
            if os.path.exists(f):
                os.remove(f)
        cmd = [self.bins["router"], "--model", model, "--vision", os.path.join(model, "clip"),
               "--experts-bind", "tcp://127.0.0.1:*", "--endpoint-file", self.endpoint_file,
               "--heartbeat-ms", str(self.hb_ms), "--wait-experts", str(wait_experts_ms),
               "--expert-wait-ms", str(expert_wait_ms),
               "--grpc-listen", "127.0.0.1:0", "--grpc-port-file", self.port_file,
               "--tenants", self.write_tenants()]
        if tls:
            cmd += ["--tls-cert", tls["cert"], "--tls-key", tls["key"]]
            if tls.get("client_ca"):
                cmd += ["--tls-client-ca", tls["client_ca"]]
        cmd += D.router_security(self.curve, router_extra) + list(router_extra)
        r = D.Proc(name, cmd, self.workdir, stdin=subprocess.DEVNULL)
        self.procs.append(r)
        self.router = r
        self.endpoint = self.wait_endpoint(r, 20)
        self.model = model
        self.expert_extra = list(expert_extra)
        self.experts = [self.start_expert(model, k, extra=self.expert_extra) for k in range(experts)]
        self.port = self.wait_port(20)
        self.target = "127.0.0.1:%d" % self.port
        log("%s: experts at %s, gRPC at %s" % (name, self.endpoint, self.target))
        if wait_serving:
            self.wait_health("SERVING", 30, tls=tls)
        return r

    def wait_port(self, timeout):
        deadline = time.monotonic() + timeout
        r = self.router
        while time.monotonic() < deadline:
            if not r.alive():
                raise TestFailure("router exited (status %d) before writing --grpc-port-file\n%s"
                                  % (r.p.returncode, r.describe()))
            try:
                with open(self.port_file) as f:
                    s = f.read().strip()
                if s:
                    if not s.isdigit() or not 0 < int(s) < 65536:
                        raise TestFailure("--grpc-port-file holds %r, expected a port number" % s)
                    return int(s)
            except FileNotFoundError:
                pass
            time.sleep(0.02)
        raise TestFailure("router wrote no --grpc-port-file within %d s\n%s" % (timeout, r.describe()))

    def wait_health(self, want, timeout, service="", tls=None):
        """Polls grpc.health.v1.Health/Check until it answers `want`."""
        c = self.client(None, tls=self.client_tls(tls))
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if not self.router.alive():
                raise TestFailure("router exited (status %d) while waiting for health %s\n%s"
                                  % (self.router.p.returncode, want, self.router.describe()))
            try:
                last = c.health(service, timeout=2)
                if last == want:
                    return
            except grpc.RpcError as e:
                last = "%s: %s" % (e.code().name, e.details())
            time.sleep(0.1)
        raise TestFailure("health Check(%r) did not answer %s within %d s (last: %s)\n%s"
                          % (service, want, timeout, last, self.router.describe()))

    def client_tls(self, tls):
        if not tls:
            return None
        return {"ca": tls.get("ca"), "cert": tls.get("client_cert"), "key": tls.get("client_key")}

    def client(self, tenant, tls=None, target=None):
        """A Python client for `tenant` (None = no key; a str = that literal key)."""
        key = tenant.key if isinstance(tenant, Tenant) else tenant
        c = MC.Client(target or self.target, key=key, tls=tls, stub_dir=self.stub_dir)
        self.clients.append(c)
        return c

    def close(self):
        for c in self.clients:
            try:
                c.close()
            except Exception:
                pass
        super().close()

    def stop_router(self, timeout=15):
        """SIGTERM: the router must shut down cleanly and exit 0 (the contract)."""
        import signal
        r = self.router
        r.signal(signal.SIGTERM)
        rc = r.wait(timeout)
        if rc is None:
            raise TestFailure("router did not exit within %d s of SIGTERM\n%s" % (timeout, r.describe()))
        if rc != 0:
            raise TestFailure("router exited with status %d after SIGTERM (want 0)\n%s" % (rc, r.describe()))
        log("router exited 0 after SIGTERM")


# -- references and comparisons ------------------------------------------------------------------
def reference(cl, question, image=None, max_tokens=16, candidates=None):
    case = {"question": question, "max_tokens": max_tokens}
    if image:
        case["image"] = image
    if candidates:
        case["candidates"] = ",".join(candidates)
        case["max_tokens"] = 0
    ref, _ = D.reference(cl.bins["run"], cl.model, case, cl.workdir)
    return ref


def summary_of(ref):
    return {s["layer"]: (list(s["image_tokens_per_expert"]), list(s["text_tokens_per_expert"]))
            for s in ref.get("expert_summary", [])}


def check_answer(ans, ref, what, case_id=None):
    """ans: CaseAnswer as a dict (proto field names) — equal to medmoe-run's ref."""
    if case_id is not None and ans.get("case_id") != case_id:
        raise TestFailure("%s: case_id %r echoed, sent %r" % (what, ans.get("case_id"), case_id))
    toks = [int(t) for t in ans.get("tokens", [])]
    if toks != ref["tokens"]:
        raise TestFailure("%s: tokens %s, medmoe-run %s" % (what, toks, ref["tokens"]))
    if ans.get("answer") != ref["answer"]:
        raise TestFailure("%s: answer %r, medmoe-run %r" % (what, ans.get("answer"), ref["answer"]))
    if int(ans.get("generated_tokens", -1)) != len(ref["tokens"]):
        raise TestFailure("%s: generated_tokens %s, medmoe-run generated %d"
                          % (what, ans.get("generated_tokens"), len(ref["tokens"])))
    if int(ans.get("prompt_tokens", -1)) != ref["prompt_len"]:
        raise TestFailure("%s: prompt_tokens %s, medmoe-run prompt_len %d"
                          % (what, ans.get("prompt_tokens"), ref["prompt_len"]))
    check_routing(ans.get("routing", []), ref, what)
    if ans.get("finish_reason") not in ("eos", "max_tokens"):
        raise TestFailure("%s: finish_reason %r (want eos or max_tokens)" % (what, ans.get("finish_reason")))


def check_routing(routing, ref, what):
    want = summary_of(ref)
    got = {int(r["layer"]): ([int(x) for x in r.get("image_tokens_per_expert", [])],
                             [int(x) for x in r.get("text_tokens_per_expert", [])]) for r in routing}
    if want and got != want:
        raise TestFailure("%s: routing (layer: image, text tokens per expert) %s, medmoe-run %s"
                          % (what, got, want))


def check_classify(res, ref, what, case_id=None, tol=1e-3):
    if case_id is not None and res.get("case_id") != case_id:
        raise TestFailure("%s: case_id %r echoed, sent %r" % (what, res.get("case_id"), case_id))
    got = res.get("candidates", [])
    want = ref["candidates"]
    if [c["text"] for c in got] != [c["text"] for c in want]:
        raise TestFailure("%s: ranking %s, medmoe-run %s" % (what, [c["text"] for c in got],
                                                             [c["text"] for c in want]))
    for x, y in zip(got, want):
        if abs(float(x["logprob"]) - y["logprob"]) > tol or abs(float(x["prob"]) - y["prob"]) > tol:
            raise TestFailure("%s: candidate %r logprob %s prob %s, medmoe-run %.6f %.6f"
                              % (what, x["text"], x["logprob"], x["prob"], y["logprob"], y["prob"]))
    check_routing(res.get("routing", []), ref, what)


def stream_answer(call, what):
    """Reads an AskStream call: (concatenated text, chunk tokens, final as dict)."""
    text, toks, final = [], [], None
    for ch in call:
        if final is not None:
            raise TestFailure("%s: a chunk came after the one carrying `final`" % what)
        text.append(ch.text)
        toks += list(ch.tokens)
        if ch.HasField("final"):
            final = MC.to_dict(ch.final)
    if final is None:
        raise TestFailure("%s: the stream ended without a chunk carrying `final`" % what)
    joined = "".join(text)
    if joined != final["answer"]:
        raise TestFailure("%s: streamed pieces concatenate to %r, final answer %r" % (what, joined, final["answer"]))
    if toks != [int(t) for t in final["tokens"]]:
        raise TestFailure("%s: streamed tokens %s, final tokens %s" % (what, toks, final["tokens"]))
    return joined, toks, final


class Background:
    """fn() in a thread; .join(timeout) → its result or raises its exception."""

    def __init__(self, fn, name="bg"):
        self.result = None
        self.error = None
        self.done_at = None
        self.name = name
        self.t = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.t.start()

    def _run(self, fn):
        try:
            self.result = fn()
        except BaseException as e:  # noqa: B902 — re-raised in join
            self.error = e
        self.done_at = time.monotonic()

    def join(self, timeout):
        self.t.join(timeout)
        if self.t.is_alive():
            raise TestFailure("%s did not finish within %.0f s" % (self.name, timeout))
        if self.error:
            if isinstance(self.error, TestFailure):
                raise self.error
            if isinstance(self.error, grpc.RpcError):
                raise TestFailure("%s: %s: %s" % (self.name, self.error.code().name, self.error.details()))
            raise TestFailure("%s: %r" % (self.name, self.error))
        return self.result
