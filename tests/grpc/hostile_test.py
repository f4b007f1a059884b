#!/usr/bin/python3
"""Hostile traffic at medmoe-router's gRPC front door, the router's memory measured (VmRSS from
/proc) before, at the peak and after (docs/ARCHITECTURE.md, "The gRPC front door").

    hostile_test.py --scenario flood|stalled_reader --router BIN --expert BIN --run BIN
                    --model DIR --image PNG --workdir DIR

flood           (1) 20,000 HTTP/2 streams opened and reset at once (HEADERS + RST_STREAM, no API
                key, tests/grpc/h2raw.py) on one connection, twice. gRPC 1.51's transport holds
                every stream of one uninterrupted burst until the burst ends (~12.9 KB each,
                linear in the burst: 5,000 -> +65 MB, 20,000 -> +258 MB, whatever the read chunk,
                SO_RCVBUF, memory quota or poll engine; gRPC >= 1.57 bounds it per read), so the
                peak limit FLOOD_PEAK_MB is 16 KB a stream: it catches anything the router adds
                per call. After the burst the router must be back within FLOOD_AFTER_MB of the
                baseline (malloc_trim; without it +233 MB stayed for good).
                (2) 5,000 streams opened and held (no body, no key) on one connection: the
                transport takes --grpc-max-streams (100) and refuses the rest; the peak at most
                HELD_MB above the baseline.
                Meanwhile the server answers health checks and real cases; the audit log holds
                one aggregated "unauthenticated" record per address per interval, not one per
                call.
stalled_reader  a client whose HTTP/2 receive window stays shut (SETTINGS_INITIAL_WINDOW_SIZE 0,
                no WINDOW_UPDATE) holds all of its tenant's max_concurrent slots; after
                --grpc-write-timeout-ms (1 s here) the router cancels those calls and the tenant's
                next cases are admitted. RSS before/peak/after within STALL_MB.
"""

import argparse
import os
import sys
import threading
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import grpclib as G  # noqa: E402
import grpc_test as T  # noqa: E402
import h2raw  # noqa: E402

D = G.D
TestFailure = G.TestFailure
log = G.log

# Limits (MB of router RSS above the baseline taken after a warm-up). Measured on the 2-core
# test machine: see docs/ARCHITECTURE.md ("Resource limits") for the figures behind them.
FLOOD_STREAMS = 20000
FLOOD_PEAK_MB = FLOOD_STREAMS * 16 // 1024
FLOOD_AFTER_MB = 16
HELD_STREAMS = 5000
HELD_MB = 16
STALL_MB = 16


def sanitized(pid):
    """An ASan build: its quarantine holds freed memory (up to 256 MB) and its shadow grows with
    the heap, so the RSS limits are reported but not enforced there; everything else is."""
    with open("/proc/%d/maps" % pid) as f:
        return "libasan" in f.read()


def over(mb, limit, pid):
    if mb <= limit:
        return False
    if sanitized(pid):
        log("(ASan build: +%.1f MB over the limit of %d MB not enforced)" % (mb, limit))
        return False
    return True


def rss_mb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise TestFailure("no VmRSS for pid %d" % pid)


class Peak:
    """Samples a process's RSS every 5 ms in a thread; .stop() -> the highest seen."""

    def __init__(self, pid):
        self.pid, self.peak, self.run = pid, rss_mb(pid), True
        self.t = threading.Thread(target=self._loop, daemon=True)
        self.t.start()

    def _loop(self):
        while self.run:
            try:
                self.peak = max(self.peak, rss_mb(self.pid))
            except (OSError, TestFailure):
                return
            time.sleep(0.005)

    def stop(self):
        self.run = False
        self.t.join(5)
        return self.peak


def settle(cl, pid, limit_mb, base, timeout=30):
    """Waits until the router's RSS is within limit_mb of base (it has let the burst go), the
    server answering health checks all along; returns the last RSS."""
    deadline = time.monotonic() + timeout
    last = rss_mb(pid)
    while time.monotonic() < deadline:
        cl.wait_health("SERVING", 10)
        last = rss_mb(pid)
        if last - base <= limit_mb:
            return last
        time.sleep(0.2)
    return last


def steady(pid, timeout=15):
    """The RSS once it has stopped falling (the router's trim after a burst has run): two
    readings 0.5 s apart within 0.5 MB."""
    deadline = time.monotonic() + timeout
    last = rss_mb(pid)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = rss_mb(pid)
        if abs(now - last) < 0.5:
            return now
        last = now
    return last


def scenario_flood(a):
    with G.GrpcCluster(T.bins(a), a.workdir) as cl:
        cl.image_path = a.image
        t = cl.tenant("hospital-a", max_concurrent=4)
        audit = os.path.join(cl.workdir, "audit.jsonl")
        cl.start(a.model, router_extra=["--audit-log", audit])
        pid = cl.router.pid
        c = cl.client(t)
        image = T.png(a)
        T.good_case(cl, c, image, "warm-up case")
        host, port = "127.0.0.1", cl.port
        # warm-up burst: gRPC's pools, the arenas' first growth; the baseline is taken after it
        w = h2raw.H2Conn(host, port)
        w.rapid_reset(2000, "/medmoe.v1.CaseService/Ask")
        w.close()
        cl.wait_health("SERVING", 10)
        base = steady(pid)
        figures = []
        for rnd in range(1 if sanitized(pid) else 2):  # ASan: one round (a round takes ~1 min)
            peak = Peak(pid)
            t0 = time.monotonic()
            f = h2raw.H2Conn(host, port)
            sent = f.rapid_reset(FLOOD_STREAMS, "/medmoe.v1.CaseService/Ask")
            cl.wait_health("SERVING", 60)  # answered once the burst is through (ASan: tens of s)
            f.close()
            after = settle(cl, pid, FLOOD_AFTER_MB, base)
            top = peak.stop()
            figures.append((top - base, after - base))
            log("flood %d: %d streams opened and reset in %.1f s; RSS base %.1f MB, peak +%.1f MB, after +%.1f MB "
                "(server: %d RST_STREAM, %d HEADERS, GOAWAY %s)"
                % (rnd + 1, sent, time.monotonic() - t0, base, top - base, after - base, f.rst,
                   len(f.headers_on), f.goaway))
            if over(top - base, FLOOD_PEAK_MB, pid):
                raise TestFailure("flood %d: router RSS peaked %.1f MB above the baseline (limit %d MB)"
                                  % (rnd + 1, top - base, FLOOD_PEAK_MB))
            if over(after - base, FLOOD_AFTER_MB, pid):
                raise TestFailure("flood %d: router RSS still %.1f MB above the baseline 30 s after the burst "
                                  "(limit %d MB)" % (rnd + 1, after - base, FLOOD_AFTER_MB))
        # (2) streams held open: only max_streams of them are taken
        peak = Peak(pid)
        h = h2raw.H2Conn(host, port)
        h.sync()  # the server's max concurrent streams is in force from the first stream
        opened, closed = 0, False
        try:
            for _ in range(HELD_STREAMS):
                h.open_stream("/medmoe.v1.CaseService/Ask")
                opened += 1
        except OSError:  # the server closed the connection (GOAWAY): the streams are gone with it
            closed = True
        deadline = time.monotonic() + (90 if sanitized(pid) else 30)
        while not closed and h.rst < HELD_STREAMS - 100 and not h.goaway and time.monotonic() < deadline:
            time.sleep(0.05)
        cl.wait_health("SERVING", 10)
        held = rss_mb(pid)
        if not (closed or h.goaway) and h.rst < HELD_STREAMS - 100:
            raise TestFailure("%d streams held open on one connection: the server refused %d and kept the "
                              "connection, want all but 100 refused (--grpc-max-streams)" % (HELD_STREAMS, h.rst))
        h.close()
        after = settle(cl, pid, FLOOD_AFTER_MB, base)
        top = peak.stop()
        log("%d streams held open: %d sent before the server %s, %d refused (RST_STREAM), GOAWAY %s; RSS while "
            "held +%.1f MB, peak +%.1f MB, after +%.1f MB"
            % (HELD_STREAMS, opened, "closed the connection" if closed else "stopped taking them", h.rst,
               h.goaway, held - base, top - base, after - base))
        if over(top - base, HELD_MB, pid):
            raise TestFailure("held streams: router RSS peaked %.1f MB above the baseline (limit %d MB)"
                              % (top - base, HELD_MB))
        T.good_case(cl, c, image, "a case after the floods")
        cl.stop_router()
        recs, _ = T.read_audit(audit)
        un = [r for r in recs if r.get("event") == "unauthenticated"]
        other = [r for r in recs if r.get("event") != "unauthenticated"]
        calls = sum(r.get("calls", 0) for r in un)
        if len(un) > 20 or any(r.get("peer") != "ipv4:127.0.0.1" for r in un):
            raise TestFailure("audit log: %d unauthenticated records (want one per address per 10 s): %s"
                              % (len(un), un[:5]))
        if len(other) != 4:  # the two good cases: admitted + end each
            raise TestFailure("audit log: %d case records, want 4 (2 cases): %s" % (len(other), other))
        log("audit log: %d aggregated unauthenticated record(s) for %d refused calls; figures (peak, after) MB: %s"
            % (len(un), calls, ["+%.1f/+%.1f" % f for f in figures]))


def scenario_stalled_reader(a):
    with G.GrpcCluster(T.bins(a), a.workdir) as cl:
        cl.image_path = a.image
        t = cl.tenant("stalled", max_concurrent=4)
        audit = os.path.join(cl.workdir, "audit.jsonl")
        cl.start(a.model, router_extra=["--audit-log", audit, "--grpc-write-timeout-ms", "1000"])
        pid = cl.router.pid
        c = cl.client(t)
        T.good_case(cl, c, T.png(a), "warm-up case")
        base = rss_mb(pid)
        peak = Peak(pid)
        # the stalled client: four unary Asks (the tenant's max_concurrent) and an AskStream's
        # worth of refused ones, on a connection whose stream window is 0 and never opened
        s = h2raw.H2Conn("127.0.0.1", cl.port, initial_window=0)
        body = c.case_request(T.QUESTION, max_tokens=16, case_id="stalled").SerializeToString()
        for _ in range(4):
            s.call("/medmoe.v1.CaseService/Ask", body, key=t.key)
        T.wait_audit(audit, lambda rs: sum(1 for r in rs if r.get("event") == "admitted"
                                           and r.get("case_id") == "stalled") == 4, 20)
        t_admitted = time.monotonic()
        log("4 calls admitted for the stalled client (its tenant's max_concurrent 4)")
        # while they hold the slots the tenant is refused; once the write timeout cancels them
        # (1 s after their answers were ready) its cases are admitted again
        ans = T.wait_admitted(lambda: c.ask(T.QUESTION, max_tokens=2, case_id="after-stall", timeout=30), 20,
                              "the tenant's case after the write timeout")
        waited = time.monotonic() - t_admitted
        recs, _ = T.read_audit(audit)
        ends = [r for r in recs if r.get("event") == "end" and r.get("case_id") == "stalled"]
        if len(ends) != 4 or any(r.get("status") != "CANCELLED" for r in ends):
            raise TestFailure("audit log: the stalled calls ended %s, want 4 CANCELLED" % [r.get("status") for r in ends])
        text = cl.router.log_text()
        if text.count("write timeout (1000 ms without progress)") != 4:
            raise TestFailure("router log: %d 'write timeout' lines, want 4:\n%s"
                              % (text.count("write timeout (1000 ms without progress)"), text[-3000:]))
        s.close()
        after = rss_mb(pid)
        top = peak.stop()
        log("stalled reader: slots freed %.1f s after admission (write timeout 1 s); next case %r admitted; "
            "RSS base %.1f MB, peak +%.1f MB, after +%.1f MB" % (waited, ans.case_id, base, top - base, after - base))
        if over(max(top, after) - base, STALL_MB, pid):
            raise TestFailure("stalled reader: RSS peak +%.1f / after +%.1f MB over the limit of %d MB"
                              % (top - base, after - base, STALL_MB))


SCENARIOS = {"flood": scenario_flood, "stalled_reader": scenario_stalled_reader}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenario", required=True, choices=sorted(SCENARIOS))
    for k in ("router", "expert", "run", "model", "image", "workdir"):
        ap.add_argument("--" + k)
    a, _ = ap.parse_known_args()  # the grpc tests' other flags (--cli, --node-modules) are not used
    a.workdir = D.fresh_dir(a.workdir)
    D.main_wrapper(lambda: SCENARIOS[a.scenario](a))


if __name__ == "__main__":
    main()
