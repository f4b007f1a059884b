#!/usr/bin/python3
"""Hostile peers on the expert socket (docs/ARCHITECTURE.md, "Router ↔ expert wire": security,
bounded memory under hostile traffic): medmoe-router + real medmoe-expert processes on 127.0.0.1,
attacked by test peers made of raw ZeroMQ / TCP sockets.

    hostile_test.py --scenario NAME --router BIN --expert BIN --run BIN --model DIR --image PNG
                    --workdir DIR

Scenarios (one ctest each, tests/distributed.cmake):
  intruder     (gRPC, CurveZMQ on) two peers that present a real expert's Hello (the right
               model fingerprint) — one in plaintext, one with a CURVE key not in --curve-allow —
               keep saying Hello and sending made-up Results while 16 cases (4 at a time) run:
               neither is ever welcomed or sent Work, every case equals medmoe-run (before this
               was secure by default, such a peer joined and 4 of 16 cases came back wrong with
               OK); control: a router started with --insecure-experts welcomes the same plaintext
               Hello, so the check can see a breach.
  hello_flood  (plaintext router, the worst case: --insecure-experts) 100,000 Hellos with a wrong
               fingerprint, on one connection and on 200 short ones, while the router also serves
               its experts. Router RSS before / peak (sampled every 20 ms) / after and the bytes it
               logs are held under the limits below; a case after it equals medmoe-run.
  big_frame    (plaintext router) 4 connections at once, each a raw ZMTP 3.0 peer announcing a
               512 MiB frame and streaming zeros: ZMQ_MAXMSGSIZE (the largest batch) makes the
               router close each before it allocates; RSS held under the limit; a case after it
               equals medmoe-run.
Limits (tiny model, whose largest legitimate frame is 512 rows x 64 x 4 = 128 KiB): RSS peak and
after at most +24 MiB over before (before the fix: +93 MB per 100,000 Hellos, +524 MB per
512 MiB frame); log at most 64 KiB for the Hello flood (before: ~31 MB per 100,000).
"""

import argparse
import os
import socket
import struct
import sys
import threading
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import distlib as D  # noqa: E402
import dist_test as T  # noqa: E402
from distlib import TestFailure, log  # noqa: E402

RSS_LIMIT = 24 << 20      # bytes of router RSS growth allowed at peak and after
FLOOD_LOG_LIMIT = 64 << 10  # bytes the router may log during the Hello flood
N_CASES, AT_ONCE = 16, 4


def rss(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise TestFailure("no VmRSS for pid %d" % pid)


class RssSampler:
    """Peak RSS of pid, sampled every 20 ms on a thread while the attack runs."""

    def __init__(self, pid):
        self.pid, self.peak, self._stop = pid, rss(pid), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, rss(self.pid))
            except (OSError, TestFailure):
                return
            time.sleep(0.02)

    def stop(self):
        self._stop.set()
        self._t.join(5)
        return self.peak


def settle_rss(pid, seconds=2.0):
    """RSS once the router had `seconds` to take back what the attack left (freed buffers)."""
    time.sleep(seconds)
    return rss(pid)


def check_memory(what, before, peak, after):
    mib = lambda b: b / 1048576.0  # noqa: E731
    log("%s: router RSS before %.1f MiB, peak %.1f MiB (+%.1f), after %.1f MiB (+%.1f); limit +%.0f MiB"
        % (what, mib(before), mib(peak), mib(peak - before), mib(after), mib(after - before), mib(RSS_LIMIT)))
    if peak - before > RSS_LIMIT or after - before > RSS_LIMIT:
        raise TestFailure("%s: router RSS grew by %.1f MiB at peak, %.1f MiB after (limit %.0f MiB)"
                          % (what, mib(peak - before), mib(after - before), mib(RSS_LIMIT)))


# -- intruder ------------------------------------------------------------------------------------
def sc_intruder(c):
    import zmq
    pb = T._pb2(c)
    cl, G = T._grpc(c, "intruder")
    with cl:
        cl.start(c.a.model, experts=4)
        client = cl.client(cl.tenant_)
        with open(c.a.image, "rb") as f:
            png = f.read()
        q, n = "What modality is this image?", 12
        ref = G.reference(cl, q, c.a.image, n)
        k, _ = T.busiest_decode_expert(ref)
        hello = T._capture_hello(c, cl, pb, k)  # the right fingerprint for expert k
        hello.node = "intruder:%d" % os.getpid()
        hello_bytes = pb.Envelope(hello=hello).SerializeToString()
        ctx = zmq.Context.instance()
        plain = ctx.socket(zmq.DEALER)
        unknown = cl.curve.secure(ctx.socket(zmq.DEALER), pair=zmq.curve_keypair())
        peers = {"plaintext": plain, "unknown CURVE key": unknown}
        for s in peers.values():
            s.setsockopt(zmq.LINGER, 0)
            s.connect(cl.endpoint)
        at = len(cl.router.log_text())
        got = {name: [] for name in peers}
        stop = threading.Event()
        noise = pb.Envelope(result=pb.Result(batch_id=1, layer=0, moe=0, expert=k, rows=1, width=c.hidden,
                                             dtype=1, error=0)).SerializeToString()

        def attack():
            while not stop.is_set():
                for name, s in peers.items():
                    try:
                        s.send(hello_bytes, zmq.NOBLOCK)
                        s.send_multipart([noise, b"\0" * (4 * c.hidden)], zmq.NOBLOCK)
                    except zmq.Again:
                        pass
                    while s.poll(0):
                        got[name].append(s.recv_multipart())
                time.sleep(0.05)
        t = threading.Thread(target=attack, daemon=True)
        t.start()
        try:
            done = 0
            while done < N_CASES:
                T._concurrent_round(cl, G, client, [(q, png, n, ref)] * AT_ONCE, "intruder-%d" % done, 60)
                done += AT_ONCE
        finally:
            stop.set()
            t.join(5)
        for name, msgs in got.items():
            if msgs:
                raise TestFailure("the %s peer with expert %d's real Hello got %d message(s) from the router "
                                  "(want none: it must never join): first %r" % (name, k, len(msgs), msgs[0][:1]))
        text = cl.router.log_text()[at:]
        if "joined: expert %d, node intruder" % k in text:
            raise TestFailure("an intruder joined as a replica:\n" + text[-2000:])
        m = T._wait_log(cl.router, r"refused a connection: curve key \S+ from 127\.0\.0\.1 is not in "
                        r"--curve-allow", 10, "the refusal of the unknown key", at)
        log("%d cases equal to medmoe-run while both intruders kept trying; router: %s"
            % (N_CASES, m.group(0)))
        for s in peers.values():
            s.close(0)

    # control: the same plaintext Hello IS welcomed by a router told --insecure-experts
    cl2 = G.GrpcCluster(c.bins, os.path.join(c.work, "intruder-control"), hb_ms=T.HB_MS, curve=False)
    cl2.tenant("hospital-a")
    with cl2:
        cl2.start(c.a.model, experts=0, wait_serving=False, wait_experts_ms=0,
                  router_extra=["--insecure-warn-ms", "300"])
        s = zmq.Context.instance().socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(cl2.endpoint)
        s.send(hello_bytes)
        if not s.poll(10000):
            raise TestFailure("control: a router with --insecure-experts answered nothing to the Hello")
        env = pb.Envelope()
        env.ParseFromString(s.recv_multipart()[0])
        if env.WhichOneof("body") != "welcome":
            raise TestFailure("control: --insecure-experts did not welcome the Hello: %s" % env)
        s.close(0)
        log("control: with --insecure-experts the same Hello is welcomed (as %s): the check above can "
            "see a breach" % env.welcome.replica_id)
        # the WARNING at start and again every --insecure-warn-ms (60 s by default; 300 ms here)
        warn = r"WARNING: the expert socket \S+ is plaintext \(--insecure-experts\)"
        first = T._wait_log(cl2.router, warn, 5, "the WARNING of --insecure-experts")
        again = T._wait_log(cl2.router, warn + r"[^\n]*", 5, "the WARNING repeated", first.end())
        log("router, repeated: %s" % again.group(0))


# -- floods ----------------------------------------------------------------------------------------
def _plain_cluster(c, sub):
    """A cluster whose router runs in plaintext (--insecure-experts: the worst case)."""
    return D.Cluster(c.bins, os.path.join(c.work, sub), hb_ms=T.HB_MS, curve=False)


def _plain_start(c, cl, sub):
    """Router (--cases) + one replica per expert; one case equal to medmoe-run (a warm router)."""
    cl.start_router(c.a.model)
    c.start_all(cl)
    c.ask_equal(cl, T.std_cases(c.a.image)[0], "%s-before" % sub)


def sc_hello_flood(c):
    import zmq
    pb = T._pb2(c)
    hello = pb.Envelope(hello=pb.Hello(version=1, expert=0, fingerprint="0" * 64, backend="flood",
                                       capacity=0, node="flood")).SerializeToString()
    with _plain_cluster(c, "hello_flood") as cl:
        _plain_start(c, cl, "hello_flood")
        pid = cl.router.pid
        time.sleep(0.5)
        before = rss(pid)
        log_at = os.path.getsize(cl.router.log_path)
        sampler = RssSampler(pid)
        ctx = zmq.Context()
        t0 = time.monotonic()
        sent = 0
        # 200 short connections of 250 Hellos each (new routing ids, new TCP peers) ...
        for i in range(200):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 2000)
            s.connect(cl.endpoint)
            for _ in range(250):
                s.send(hello)
                sent += 1
            s.close()
        # ... and 50,000 on one connection, whose Refuse replies are never read
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 0)
        s.connect(cl.endpoint)
        for _ in range(50000):
            s.send(hello)
            sent += 1
        # wait for the router to have counted every one (its stats come at exit; its log
        # summaries count them too): bounded by the time it takes, at most 60 s
        deadline = time.monotonic() + 60
        counted = 0
        while time.monotonic() < deadline:
            counted = _refusals_logged(cl.router.log_text())
            if counted >= sent:
                break
            time.sleep(0.25)
        dt = time.monotonic() - t0
        peak = sampler.stop()
        s.close(0)
        ctx.term()
        after = settle_rss(pid)
        logged = os.path.getsize(cl.router.log_path) - log_at
        log("%d Hellos sent in %.1f s; the router's log accounts for %d refusals in %d bytes (limit %d)"
            % (sent, dt, counted, logged, FLOOD_LOG_LIMIT))
        if counted < sent:
            raise TestFailure("the router's log accounts for %d refusals of %d Hellos after %.0f s"
                              % (counted, sent, dt))
        if logged > FLOOD_LOG_LIMIT:
            raise TestFailure("the router logged %d bytes for the flood (limit %d)" % (logged, FLOOD_LOG_LIMIT))
        check_memory("Hello flood", before, peak, after)
        if not cl.router.alive():
            raise TestFailure("router died in the flood\n" + cl.router.describe())
        c.ask_equal(cl, dict(T.std_cases(c.a.image)[0], id="after-flood"), "hello_flood-after")
        stats = cl.finish_router()
        ref = [r for r in stats.get("refused", []) if r.get("kind") == "fingerprint"]
        if stats.get("refused_total", 0) < sent or len(stats.get("refused", [])) > 64 or not ref:
            raise TestFailure("stats: refused_total %s (sent %d), %d entries: %s"
                              % (stats.get("refused_total"), sent, len(stats.get("refused", [])),
                                 stats.get("refused")))
        log("stats: refused_total %d in %d tally entr%s" % (stats["refused_total"], len(stats["refused"]),
                                                             "y" if len(stats["refused"]) == 1 else "ies"))


def _refusals_logged(text):
    """Refusals the router's log accounts for: one per 'refused ... fingerprint' line plus the
    counts of the summary lines."""
    import re
    n = len(re.findall(r"refused flood \(expert 0\): model fingerprint mismatch", text))
    n += sum(int(x) for x in re.findall(r"(\d+) more fingerprint event\(s\) from", text))
    return n


def _zmtp_big_frame(port, size, stream_bytes):
    """A raw ZMTP 3.0 peer (NULL mechanism, DEALER) that announces one frame of `size` bytes and
    streams zeros. Returns (bytes of the frame's body the router took before it closed the
    connection, closed: bool)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    greeting = b"\xff" + b"\0" * 8 + b"\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\0") + b"\0" + b"\0" * 31
    s.sendall(greeting)
    body = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"
    s.sendall(bytes([0x04, len(body)]) + body)  # a short command frame
    s.sendall(bytes([0x02]) + struct.pack(">Q", size))  # a long message frame, the last
    chunk = b"\0" * (1 << 20)
    took = 0
    s.settimeout(5)
    try:
        while took < stream_bytes:
            took += s.send(chunk)
    except OSError:  # reset / broken pipe: the router closed it
        return took, True
    try:  # the router may close only once it reads the header: EOF (or a reset) on read
        s.settimeout(5)
        while s.recv(65536):
            pass
        return took, True
    except socket.timeout:  # still open, reading what we send: the frame is being taken
        return took, False
    except OSError:
        return took, True
    finally:
        s.close()


def sc_big_frame(c):
    with _plain_cluster(c, "big_frame") as cl:
        _plain_start(c, cl, "big_frame")
        pid = cl.router.pid
        port = int(cl.endpoint.rsplit(":", 1)[1])
        time.sleep(0.5)
        before = rss(pid)
        sampler = RssSampler(pid)
        results = [None] * 4

        def one(i):
            results[i] = _zmtp_big_frame(port, 512 << 20, 64 << 20)
        ts = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        peak = sampler.stop()
        after = settle_rss(pid)
        log("4 peers announced 512 MiB frames: the router took %s MiB of them and closed %s"
            % ([round(r[0] / 1048576.0, 1) if r else None for r in results],
               [r[1] if r else None for r in results]))
        if not all(r and r[1] for r in results):
            raise TestFailure("the router did not close every connection that announced a 512 MiB frame: %s"
                              % results)
        check_memory("4 x 512 MiB frames", before, peak, after)
        if not cl.router.alive():
            raise TestFailure("router died\n" + cl.router.describe())
        c.ask_equal(cl, dict(T.std_cases(c.a.image)[0], id="after-big"), "big_frame-after")


SCENARIOS = {"intruder": sc_intruder, "hello_flood": sc_hello_flood, "big_frame": sc_big_frame}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenario", required=True, choices=sorted(SCENARIOS))
    for k in ("router", "expert", "run", "model", "image", "workdir"):
        ap.add_argument("--" + k, required=True)
    ap.add_argument("--keygen", default=None)
    a = ap.parse_args()
    c = T.Ctx(a)
    D.main_wrapper(lambda: SCENARIOS[a.scenario](c))


if __name__ == "__main__":
    main()
