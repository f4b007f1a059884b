#!/usr/bin/python3
"""Black-box tests of distributed serving (docs/ARCHITECTURE.md, "Router ↔ expert wire"):
medmoe-router + medmoe-expert processes on 127.0.0.1 (ephemeral ports) against medmoe-run on
the same tiny checkpoint. The fault scenarios marked (gRPC) drive the router through its
production entry point, the gRPC front door (tests/grpc/grpclib.py: --grpc-listen 127.0.0.1:0,
concurrent cases from the Python client); the others feed it --cases JSON lines.

    dist_test.py --scenario NAME --router BIN --expert BIN --run BIN [--keygen BIN]
                 --model DIR --image PNG --workdir DIR [--maker make_tiny_checkpoint.py]

Scenarios (one ctest each, see tests/distributed.cmake):
  equiv        router + 4 experts answer 3 cases (generation, no_pad, candidates) exactly
               like medmoe-run (compare.py: tokens, routing, candidates)
  replicas     two replicas of one expert: both serve batches (stats), answers equal
  kill         (gRPC, concurrent streamed cases) kill -9, mid-generation, of the replica of the
               busiest expert that is next in line, once it holds a batch (frozen until a Work
               sits unread in its socket, or the router timed one out): every case equal to
               medmoe-run, the replica dropped, its batch re-sent; a round after, exact
  freeze       (gRPC, concurrent streamed cases) SIGSTOP of that replica holding a batch:
               dropped after ~3 heartbeats, its batch re-sent, the round within the healthy
               time + 3 heartbeats + 2 s, exact; SIGCONT: it joins again (its late reply
               discarded) and a round after is exact
  unavailable  all replicas of an expert gone: UNAVAILABLE naming it within the wait; the
               router stays up and serves the next case once a replica is back
  fingerprint  an expert on another checkpoint (other seed) exits 3 "refused by router: ..."
  garbage      random frames, empty, truncated, version 999, unknown batch ids, Work from
               an expert, wrong tensor sizes, spoofed Results mid-case: router stays up,
               answers stay equal
  rogue        (gRPC) a peer welcomed with a real expert's Hello answers its Work wrongly (bad
               rows, sizes, ids, no tensor, BUSY/DRAINING + late replies): dropped, re-sent, exact
  curve        (gRPC) CurveZMQ: the unlisted key is refused (ZAP), a case needing only it gets
               UNAVAILABLE naming the expert; the allowed key serves, cases exact
  cli          --help, bad arguments, SIGTERM → exit 0 promptly
  silent       (gRPC, concurrent cases) a replica that heartbeats and never answers beside a
               healthy one: every case exact and within seconds (hedged re-sends); the silent one
               gets one batch, is quarantined, and gets none again — also after it says Hello
               again on a new connection (SIGSTOP until dropped, SIGCONT)
  failing      (gRPC, concurrent cases) a replica that answers ERROR_INTERNAL to every batch
               beside a healthy one: zero failed cases; quarantined after one batch
  expired      the wire alone: a real expert behind a busy compute thread answers EXPIRED to
               Work whose deadline_ms ran out before compute, computes the others
Every process is SIGKILLed at the end (process groups); every wait is bounded.
"""

import argparse
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import distlib as D  # noqa: E402
from distlib import TestFailure, log  # noqa: E402

HB_MS = 200          # heartbeat interval used by every test (dead after 3 = 0.6 s)
CASE_TIMEOUT = 30.0  # seconds for any one case (tiny model: normally well under 1 s)


def std_cases(image):
    return [
        {"id": "gen", "image": image, "question": "What modality is this image?", "max_tokens": 16},
        {"id": "nopad", "image": image, "question": "Is there a fracture?", "max_tokens": 6,
         "no_pad": True},
        {"id": "classify", "image": image, "question": "What modality is this image?", "max_tokens": 0,
         "candidates": "ct,mri,x-ray,pathology"},
    ]


def long_case(image, n=32):
    return {"id": "long", "image": image, "question": "Describe the findings in this image.", "max_tokens": n}


class Ctx:
    def __init__(self, a):
        self.a = a
        self.bins = {"router": a.router, "expert": a.expert, "run": a.run, "keygen": a.keygen}
        self.work = D.fresh_dir(a.workdir)
        with open(os.path.join(a.model, "config.json")) as f:
            cfg = json.load(f)
        self.hidden = cfg["hidden_size"]
        self.n_experts = cfg["moe"]["num_experts"][0]

    def cluster(self, sub):
        return D.Cluster(self.bins, os.path.join(self.work, sub), hb_ms=HB_MS)

    def ref(self, case):
        return D.reference(self.a.run, self.a.model, case, self.work)

    def ask_equal(self, cl, case, what=None, timeout=CASE_TIMEOUT):
        _, ref_path = self.ref(case)
        t0 = time.monotonic()
        ans = cl.router.ask(case, timeout)
        dt = time.monotonic() - t0
        D.check_equal(ans, ref_path, cl.workdir, what or case["id"])
        return ans, dt

    def start_all(self, cl, extra=(), skip=()):
        return [cl.start_expert(self.a.model, k, extra=extra) for k in range(self.n_experts) if k not in skip]


def replicas_of(stats, k):
    return [r for r in stats.get("replicas", []) if r.get("expert") == k]


def busiest_decode_expert(ref, from_frac=0.25):
    """The expert chosen most often by the decode steps after the first quarter."""
    p0 = ref["prompt_len"]
    n = len(ref["tokens"])
    counts = {}
    for r in ref["routing"]:
        ex = r["experts"]
        for pos in range(p0 + int(n * from_frac), len(ex)):
            for e in ex[pos]:
                counts[e] = counts.get(e, 0) + 1
    if not counts:
        raise TestFailure("reference routing has no decode positions (prompt_len %d, %d positions)"
                          % (p0, max(len(r["experts"]) for r in ref["routing"])))
    return max(sorted(counts), key=lambda e: counts[e]), counts


# ---------------------------------------------------------------------------------------------
def sc_equiv(c):
    cases = std_cases(c.a.image)
    for case in cases:
        c.ref(case)
    with c.cluster("equiv") as cl:
        cl.start_router(c.a.model)
        c.start_all(cl)
        for case in cases:
            c.ask_equal(cl, case)
        stats = cl.finish_router()
        for k in range(c.n_experts):
            served = sum(r.get("batches", 0) for r in replicas_of(stats, k))
            if served <= 0:
                raise TestFailure("stats: expert %d served no batches, but the cases use it: %s"
                                  % (k, json.dumps(stats.get("replicas"))))


def sc_replicas(c):
    cases = std_cases(c.a.image)
    ref, _ = c.ref(cases[0])
    k, _ = busiest_decode_expert(ref, 0.0)
    with c.cluster("replicas") as cl:
        cl.start_router(c.a.model)
        c.start_all(cl)
        cl.start_expert(c.a.model, k, tag="b")
        for rep in range(2):
            for case in cases:
                case = dict(case, id="%s-%d" % (case["id"], rep))
                c.ask_equal(cl, case)
        stats = cl.finish_router()
        reps = replicas_of(stats, k)
        if len(reps) != 2:
            raise TestFailure("stats list %d replicas of expert %d, want 2: %s" % (len(reps), k, json.dumps(reps)))
        for r in reps:
            if r.get("batches", 0) <= 0:
                raise TestFailure("replica %r of expert %d served no batches (both replicas must receive "
                                  "work): %s" % (r.get("id"), k, json.dumps(reps)))
        log("expert %d replicas: %s" % (k, json.dumps(reps)))


def sc_unavailable(c):
    cases = std_cases(c.a.image)
    refs = [c.ref(x)[0] for x in cases]
    wait_ms = 1500
    with c.cluster("unavailable") as cl:
        cl.start_router(c.a.model, expert_wait_ms=wait_ms)
        experts = c.start_all(cl)
        c.ask_equal(cl, cases[0], "before")
        k = D.experts_used(refs[0])[-1]
        victim = experts[k]
        victim.signal(signal.SIGKILL)
        victim.wait(5)
        log("killed the only replica of expert %d" % k)
        t0 = time.monotonic()
        ans = cl.router.ask(dict(cases[0], id="no-replica"), CASE_TIMEOUT)
        dt = time.monotonic() - t0
        log("answer without expert %d after %.2f s: %s" % (k, dt, json.dumps(
            {x: ans.get(x) for x in ("status", "code", "message")})))
        if ans.get("status") != "error":
            raise TestFailure("case needing dead expert %d answered status %r, want 'error'" % (k, ans.get("status")))
        if ans.get("code") != "UNAVAILABLE":
            raise TestFailure("error code %r, want 'UNAVAILABLE' (message %r)" % (ans.get("code"), ans.get("message")))
        if not re.search(r"\bexpert %d\b" % k, str(ans.get("message", ""))):
            raise TestFailure("error message %r does not name 'expert %d'" % (ans.get("message"), k))
        bound = wait_ms / 1000.0 + 3 * HB_MS / 1000.0 + 2.0
        if dt > bound:
            raise TestFailure("UNAVAILABLE came after %.2f s > --expert-wait-ms %d + 3 heartbeats + 2 s"
                              % (dt, wait_ms))
        if not cl.router.alive():
            raise TestFailure("router exited after the UNAVAILABLE case\n" + cl.router.describe())
        # A following case that needs only live experts must succeed.
        spare = [(x, r) for x, r in zip(cases, refs) if k not in D.experts_used(r)]
        if spare:
            c.ask_equal(cl, dict(spare[0][0], id="live-only"))
        else:
            log("every case uses expert %d with this checkpoint: restarting a replica instead" % k)
            cl.start_expert(c.a.model, k, tag="again")
            for x in cases:
                c.ask_equal(cl, dict(x, id="after-restart-" + x["id"]))
        if not cl.router.alive():
            raise TestFailure("router exited\n" + cl.router.describe())
        cl.finish_router()


def sc_fingerprint(c):
    other = os.path.join(c.work, "other-seed")
    with open(os.path.join(c.a.model, "config.json")) as f:
        cfg = json.load(f)
    backbone = "phi" if "phi" in cfg["model_type"] else "stablelm"
    dtype = "bf16" if cfg.get("torch_dtype") == "bfloat16" else "f32"
    p = subprocess.run([D.PYTHON, c.a.maker, "--out", other, "--backbone", backbone, "--dtype", dtype,
                        "--seed", "7"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    if p.returncode != 0:
        raise TestFailure("make_tiny_checkpoint.py --seed 7 failed: " + p.stdout)
    case = std_cases(c.a.image)[0]
    c.ref(case)
    with c.cluster("fingerprint") as cl:
        cl.start_router(c.a.model, wait_experts_ms=5000)
        k = 1
        bad = cl.start_expert(other, k, wait_joined=False, tag="other")
        rc = bad.wait(15)
        if rc is None:
            raise TestFailure("expert on another checkpoint still running after 15 s; it must be refused and "
                              "exit 3\n" + bad.describe())
        text = bad.log_text()
        if rc != 3:
            raise TestFailure("refused expert exited with status %d, want 3\n%s" % (rc, bad.describe()))
        m = re.search(r"refused by router: *(\S.*)", text)
        if not m:
            raise TestFailure("refused expert did not print 'refused by router: <reason>'\n" + bad.describe())
        log("refused as expected: %s" % m.group(1))
        c.start_all(cl)
        c.ask_equal(cl, case, "after-refusal")
        stats = cl.finish_router()
        refused = stats.get("refused")
        if not refused or not any(str(r.get("reason", "")).strip() for r in refused):
            raise TestFailure("stats 'refused' does not list the refusal with a reason: %r" % (refused,))
        log("stats refused: %s" % json.dumps(refused))
        if len(replicas_of(stats, k)) != 1:
            raise TestFailure("stats list %d replicas of expert %d (want 1: the refused one is no replica): %s"
                              % (len(replicas_of(stats, k)), k, json.dumps(stats.get("replicas"))))


def _pb2(c):
    """Python classes for proto/expert_wire.proto, generated into the work dir."""
    proto = os.path.join(os.path.dirname(os.path.dirname(D.HERE)), "proto", "expert_wire.proto")
    out = os.path.join(c.work, "pb")
    os.makedirs(out, exist_ok=True)
    p = subprocess.run([D.PYTHON, "-m", "grpc_tools.protoc", "-I" + os.path.dirname(proto),
                        "--python_out=" + out, proto], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=60)
    if p.returncode != 0:
        raise TestFailure("grpc_tools.protoc on %s failed: %s" % (proto, p.stdout))
    sys.path.insert(0, out)
    import expert_wire_pb2
    return expert_wire_pb2


def sc_garbage(c):
    import zmq
    pb = _pb2(c)
    cases = std_cases(c.a.image)
    long = long_case(c.a.image, 24)
    for x in cases + [long]:
        c.ref(x)
    H = c.hidden

    def env(**kw):
        e = pb.Envelope(**kw)
        return e.SerializeToString()

    def tensor(rows, width):
        return os.urandom(rows * width * 4)

    with c.cluster("garbage") as cl:
        cl.start_router(c.a.model)
        # batches stay in flight 20 ms each, so the spoofed results below meet live batch ids
        c.start_all(cl, extra=["--debug-delay-ms", "20"])
        c.ask_equal(cl, cases[0], "before-garbage")
        ctx = zmq.Context()
        socks = []
        try:
            def dealer():
                s = cl.curve.secure(ctx.socket(zmq.DEALER))
                s.setsockopt(zmq.LINGER, 0)
                s.setsockopt(zmq.SNDTIMEO, 2000)
                s.connect(cl.endpoint)
                socks.append(s)
                return s

            s = dealer()
            sent = 0
            msgs = []
            for n in (1, 3, 17, 300, 5000):
                msgs.append([os.urandom(n)])
            msgs.append([os.urandom(40), os.urandom(7), os.urandom(999)])
            msgs.append([b""])
            msgs.append([b"", b""])
            hello_ok = env(hello=pb.Hello(version=1, expert=0, fingerprint="0" * 64, backend="cpu",
                                          capacity=0, node="garbage:1"))
            msgs.append([hello_ok[: len(hello_ok) // 2]])                         # truncated protobuf
            msgs.append([env()])                                                 # no oneof field set
            msgs.append([env(hello=pb.Hello(version=999, expert=0, fingerprint="0" * 64))])
            msgs.append([env(hello=pb.Hello(version=1, expert=99, fingerprint="0" * 64))])
            msgs.append([env(hello=pb.Hello(version=1, expert=-1, fingerprint="0" * 64))])
            res = dict(batch_id=987654321, layer=0, moe=0, expert=0, rows=2, width=H, dtype=1, error=0)
            msgs.append([env(result=pb.Result(**res)), tensor(2, H)])             # unknown batch id
            msgs.append([env(result=pb.Result(**res))])                          # result without tensor
            msgs.append([env(result=pb.Result(**dict(res, batch_id=1))), os.urandom(5)])  # wrong size
            msgs.append([env(result=pb.Result(**dict(res, rows=1 << 30))), tensor(1, H)])   # absurd rows
            msgs.append([env(work=pb.Work(batch_id=1, layer=0, moe=0, expert=0, rows=2, width=H, dtype=1)),
                         tensor(2, H)])                                           # wrong direction
            msgs.append([env(welcome=pb.Welcome(version=1, heartbeat_ms=1, replica_id="x"))])
            msgs.append([env(refuse=pb.Refuse(reason="x"))])
            msgs.append([env(heartbeat=pb.Heartbeat())])
            msgs.append([env(bye=pb.Bye(reason="garbage"))])
            for m in msgs:
                s.send_multipart(m)
                sent += 1
            # the version-999 Hello and the bad fingerprints may get a Refuse; never a Welcome
            deadline = time.monotonic() + 1.0
            replies = []
            while time.monotonic() < deadline:
                if s.poll(100):
                    replies.append(s.recv_multipart())
            for r in replies:
                e = pb.Envelope()
                try:
                    e.ParseFromString(r[0])
                except Exception as ex:  # noqa: BLE001
                    raise TestFailure("router replied with a frame that is not an Envelope: %r (%s)" % (r[:1], ex))
                kind = e.WhichOneof("body")
                if kind == "welcome":
                    raise TestFailure("router WELCOMED a garbage peer (bad fingerprint / version 999): %s" % e)
                log("garbage peer got a %s: %s" % (kind, str(e).strip().replace("\n", " ")))
            if not cl.router.alive():
                raise TestFailure("router died from garbage on its socket\n" + cl.router.describe())
            log("sent %d garbage messages; router alive" % sent)

            # A second peer spoofs Results for plausible batch ids (rows 1 = one decode token)
            # while a case is decoding: a reply from a peer that was never sent that batch must
            # be discarded, so the answer must stay exact.
            spoof = dealer()
            with open(os.path.join(c.a.model, "config.json")) as f:
                moe_layers = json.load(f)["moe"]["moe_layers_idx"]
            zeros = b"\0" * (H * 4)
            spoofed = 0
            cl.router.send(dict(long, id="spoofed"))
            t_end = time.monotonic() + 20
            bid = 0
            got = None
            while got is None and time.monotonic() < t_end:
                for _ in range(20):
                    for moe, layer in enumerate(moe_layers):
                        for e in range(c.n_experts):
                            r = pb.Result(batch_id=bid, layer=layer, moe=moe, expert=e, rows=1, width=H,
                                          dtype=1, error=0)
                            try:
                                spoof.send_multipart([env(result=r), zeros], zmq.NOBLOCK)
                                spoofed += 1
                            except zmq.Again:
                                pass
                    bid = (bid + 1) % 400  # this router has sent far fewer batches than 400 by now
                try:
                    line = cl.router.lines.get(timeout=0.01)
                except Exception:  # noqa: BLE001
                    continue
                if line is None:
                    raise TestFailure("router stdout closed during the spoofing (status %s)\n%s"
                                      % (cl.router.p.poll(), cl.router.describe()))
                if line.strip().startswith("{"):
                    got = json.loads(line)
            if got is None:
                raise TestFailure("no answer to the spoofed case within 20 s")
            ref_path = c.ref(long)[1]
            D.check_equal(got, ref_path, cl.workdir, "spoofed-results")
            log("%d spoofed results (batch ids 0..399, every layer/expert, 1 row of zeros) did not "
                "change the answer" % spoofed)
        finally:
            for s in socks:
                s.close(0)
            ctx.term()
        for x in cases:
            c.ask_equal(cl, dict(x, id="after-garbage-" + x["id"]))
        stats = cl.finish_router()
        dropped = stats.get("dropped_messages")
        log("stats dropped_messages = %r" % dropped)
        if not isinstance(dropped, int) or dropped < 10:
            raise TestFailure("stats dropped_messages = %r after %d garbage messages (want >= 10)" % (dropped, sent))


def _capture_hello(c, cl, pb, k):
    """The Hello a real medmoe-expert for expert k sends (fingerprint included): a real expert
    is pointed at our own ROUTER socket, its first message kept, the expert killed."""
    s, ep = cl.bare_router()
    e = cl.start_expert(c.a.model, k, endpoint=ep, wait_joined=False, tag="-hello-donor")
    try:
        if not s.poll(15000):
            raise TestFailure("a real expert sent no Hello to a bare ROUTER within 15 s\n" + e.describe())
        frames = s.recv_multipart()
        env = pb.Envelope()
        env.ParseFromString(frames[1])
        if env.WhichOneof("body") != "hello":
            raise TestFailure("the expert's first message is a %s, not a Hello" % env.WhichOneof("body"))
        return env.hello
    finally:
        e.kill()
        s.close(0)


def sc_rogue(c):
    """A peer that presents a real expert's Hello (so it is welcomed as a replica of expert K)
    and then misbehaves on the Work it gets: results for other batch ids, Work sent back,
    random frames, wrong row counts, wrong tensor sizes, a missing tensor frame, BUSY then a
    late result, DRAINING then a late result. The router must drop / re-send each time (the
    contract: malformed → dropped; a reply from a replica the batch is not assigned to is
    discarded) and the case must still equal medmoe-run."""
    import threading
    import zmq
    pb = _pb2(c)
    cl, G = _grpc(c, "rogue")
    with cl:
        stats_file = os.path.join(cl.workdir, "router.stats.json")
        cl.start(c.a.model, experts=0, wait_serving=False, router_extra=["--stats-file", stats_file])
        client = cl.client(cl.tenant_)
        with open(c.a.image, "rb") as f:
            png = f.read()
        case = long_case(c.a.image, 24)
        ref = G.reference(cl, case["question"], c.a.image, case["max_tokens"])
        k, _ = busiest_decode_expert(ref)
        hello = _capture_hello(c, cl, pb, k)
        hello.node = "rogue:%d" % os.getpid()
        ctx = zmq.Context.instance()
        sock = cl.curve.secure(ctx.socket(zmq.DEALER))
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(cl.endpoint)
        hello_bytes = pb.Envelope(hello=hello).SerializeToString()
        sock.send(hello_bytes)
        if not sock.poll(5000):
            raise TestFailure("router answered nothing to a real expert's Hello sent by the test peer")
        env = pb.Envelope()
        env.ParseFromString(sock.recv_multipart()[0])
        if env.WhichOneof("body") != "welcome":
            raise TestFailure("router did not welcome a real expert's Hello: %s" % env)
        log("test peer welcomed as %s (expert %d)" % (env.welcome.replica_id, k))
        events, stop, errors = [], threading.Event(), []

        def result(w, **kw):
            f = dict(batch_id=w.batch_id, layer=w.layer, moe=w.moe, expert=w.expert, rows=w.rows,
                     width=w.width, dtype=w.dtype, error=0)
            f.update(kw)
            return pb.Envelope(result=pb.Result(**f)).SerializeToString()

        beat = pb.Envelope(heartbeat=pb.Heartbeat()).SerializeToString()

        def rogue():
            try:
                n = 0
                last_beat = 0.0
                while not stop.is_set():
                    # stay alive as a replica (under load, starting the real experts can take
                    # longer than three heartbeat intervals)
                    if time.monotonic() - last_beat > 0.1:
                        sock.send(beat)
                        last_beat = time.monotonic()
                    if not sock.poll(50):
                        continue
                    fr = sock.recv_multipart()
                    e = pb.Envelope()
                    try:
                        e.ParseFromString(fr[0])
                    except Exception:  # noqa: BLE001
                        errors.append("router sent a frame that is not an Envelope")
                        continue
                    kind = e.WhichOneof("body")
                    if kind in ("welcome", "refuse"):
                        events.append("%s %s" % (kind, str(getattr(e, kind)).strip().replace("\n", " ")))
                        continue
                    if kind != "work":
                        continue
                    w = e.work
                    good = b"\0" * (w.rows * w.width * 4)
                    if len(fr) != 2 or len(fr[1]) != len(good):
                        errors.append("Work %d came with %d frames / %d tensor bytes (rows %d width %d)"
                                      % (w.batch_id, len(fr), len(fr[1]) if len(fr) > 1 else -1, w.rows, w.width))
                    step = n % 5
                    n += 1
                    sock.send_multipart([result(w, batch_id=w.batch_id + 100000), good])  # unknown id
                    sock.send_multipart([pb.Envelope(work=w).SerializeToString(), good])  # wrong direction
                    sock.send_multipart([os.urandom(33)])
                    if step == 0:
                        sock.send_multipart([result(w, rows=w.rows + 1), good])           # wrong rows
                    elif step == 1:
                        sock.send_multipart([result(w), good[:-4]])                       # short tensor
                    elif step == 2:
                        sock.send_multipart([result(w)])                                 # no tensor
                    elif step == 3:
                        sock.send_multipart([result(w, error=1, message="test: busy")])   # BUSY
                    else:
                        sock.send_multipart([result(w, error=2, message="test: draining")])  # DRAINING
                    events.append("%.3f work %d (layer %d expert %d rows %d): misbehaviour %d"
                                  % (time.monotonic(), w.batch_id, w.layer, w.expert, w.rows, step))
                    # A late, well-formed reply of zeros for a batch no longer assigned to this
                    # peer must be discarded. It is only sent while that is certain: after steps
                    # 0 and 1 this replica has been removed (and not yet joined again); after
                    # BUSY / DRAINING the batch went to another replica. After step 2 (a Result
                    # without its tensor is dropped as malformed, the batch stays ours) zeros
                    # would rightly be accepted — wrong values from a replica in good standing
                    # cannot be detected — so none are sent.
                    if step != 2:
                        time.sleep(0.03)
                        sock.send_multipart([result(w), good])
                    if step < 3:
                        # join again; after step 2 a second Hello on the connection removes the
                        # replica and re-sends its batch
                        sock.send(hello_bytes)
            except Exception as ex:  # noqa: BLE001
                errors.append("rogue thread: %r" % ex)

        t = threading.Thread(target=rogue, daemon=True)
        t.start()  # heartbeats from here on, while the real experts start
        try:
            for kk in range(c.n_experts):
                cl.start_expert(c.a.model, kk)
            cl.wait_health("SERVING", 30)
            _concurrent_round(cl, G, client, [(case["question"], png, case["max_tokens"], ref)], "with-rogue",
                              CASE_TIMEOUT)
            _std_grpc(c, cl, G, client, "rogue")
        finally:
            stop.set()
            t.join(5)
            sock.close(0)
            for ev in events:
                log("test peer: " + ev)
        if errors:
            raise TestFailure("; ".join(errors))
        if not any(" work " in ev for ev in events):
            raise TestFailure("the misbehaving replica (joined first) was sent no Work, so nothing was tested")
        if not cl.router.alive():
            raise TestFailure("router died\n" + cl.router.describe())
        cl.stop_router()
        stats = _read_stats(stats_file)
        log("stats: dropped_messages %s, resent_batches %s" % (stats.get("dropped_messages"),
                                                             stats.get("resent_batches")))


def sc_curve(c):
    keys = os.path.join(c.work, "keys")
    os.makedirs(keys, exist_ok=True)
    for name in ("router", "a", "b"):
        prefix = os.path.join(keys, name)
        p = subprocess.run([c.a.keygen, prefix], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=20)
        if p.returncode != 0:
            raise TestFailure("medmoe-keygen %s failed (%d): %s" % (prefix, p.returncode, p.stdout))
        for ext, n in ((".key", 40), (".pub", 40)):
            with open(prefix + ext) as f:
                v = f.read().strip()
            if len(v) != n:
                raise TestFailure("%s%s holds %d characters, want a %d-character Z85 key" % (prefix, ext, len(v), n))
        mode = stat.S_IMODE(os.stat(prefix + ".key").st_mode)
        if mode & 0o077:
            raise TestFailure("%s.key has mode %o: a secret key must be 0600" % (prefix, mode))
    with open(os.path.join(keys, "a.pub")) as fa, open(os.path.join(keys, "b.pub")) as fb:
        if fa.read() == fb.read():
            raise TestFailure("medmoe-keygen wrote the same key twice")
    k = 2
    K = lambda n: os.path.join(keys, n)  # noqa: E731
    curve_a = ["--curve-server-key", K("router.pub"), "--curve-key", K("a.key")]
    curve_b = ["--curve-server-key", K("router.pub"), "--curve-key", K("b.key")]
    with open(K("b.pub")) as f:
        b_pub = f.read().strip()
    cl, G = _grpc(c, "curve")
    with cl:
        stats_file = os.path.join(cl.workdir, "router.stats.json")
        cl.start(c.a.model, experts=0, wait_serving=False, wait_experts_ms=2000, expert_wait_ms=1500,
                 router_extra=["--stats-file", stats_file, "--curve-secret-key", K("router.key"),
                               "--curve-allow", K("a.pub")])
        client = cl.client(cl.tenant_)
        with open(c.a.image, "rb") as f:
            png = f.read()
        question = std_cases(c.a.image)[0]["question"]
        at = len(cl.router.log_text())
        bexp = cl.start_expert(c.a.model, k, extra=curve_b, wait_joined=False, tag="keyB")
        for kk in range(c.n_experts):
            if kk != k:
                cl.start_expert(c.a.model, kk, extra=curve_a)
        m = _wait_log(cl.router, r"refused a connection: curve key %s [^\n]*" % re.escape(b_pub), 15,
                      "the refusal of the unlisted key", at)
        log("router: %s" % m.group(0))
        e = G.expect_code(lambda: client.ask(question, image=png, max_tokens=16, timeout=CASE_TIMEOUT),
                          "UNAVAILABLE", "case needing expert %d, served only by the unlisted key" % k)
        if not re.search(r"\bexpert %d\b" % k, e.details() or ""):
            raise TestFailure("UNAVAILABLE does not name expert %d: %r" % (k, e.details()))
        cl.start_expert(c.a.model, k, extra=curve_a, tag="keyA")
        cl.wait_health("SERVING", 15)
        _std_grpc(c, cl, G, client, "curve")
        if not bexp.alive() and bexp.p.returncode == 0:
            log("note: the expert with the unlisted key exited 0")
        cl.stop_router()
        stats = _read_stats(stats_file)
        reps = replicas_of(stats, k)
        if len(reps) != 1:
            raise TestFailure("stats list %d replicas of expert %d, want 1 (the unlisted key must not be a "
                              "replica): %s" % (len(reps), k, json.dumps(reps)))
        for kk in range(c.n_experts):
            if not any(r.get("batches", 0) > 0 for r in replicas_of(stats, kk)):
                raise TestFailure("over CURVE, expert %d served no batches: %s" % (kk, json.dumps(stats)))


def sc_cli(c):
    problems = []  # collected, so that one bad answer does not hide the others
    progs = [("router", c.a.router), ("expert", c.a.expert)]
    if c.a.keygen:
        progs.append(("keygen", c.a.keygen))
    scratch = os.path.join(c.work, "cwd")  # a program that takes an option for a file name writes here
    os.makedirs(scratch, exist_ok=True)
    for name, b in progs:
        p = subprocess.run([b, "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=10,
                           cwd=scratch)
        if p.returncode != 0:
            problems.append("%s --help exited %d, want 0" % (name, p.returncode))
        elif "usage" not in p.stdout.lower():
            problems.append("%s --help printed no 'usage' on stdout: %r" % (name, p.stdout[:300]))
        p = subprocess.run([b, "--no-such-option"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           timeout=10, cwd=scratch)
        if p.returncode == 0:
            problems.append("%s --no-such-option exited 0 (want a usage error)%s"
                            % (name, "; it wrote %s" % sorted(os.listdir(scratch)) if os.listdir(scratch) else ""))
    for name, b in progs[:2]:
        p = subprocess.run([b], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=10, cwd=scratch)
        if p.returncode == 0:
            problems.append("%s without its required options exited 0" % name)
    with c.cluster("cli") as cl:
        r = cl.start_router(c.a.model, extra=["--serve"])
        e = c.start_all(cl)[0]
        c.ask_equal(cl, dict(std_cases(c.a.image)[0], max_tokens=2, id="one"))
        for proc, what in ((e, "expert"), (r, "router")):
            t0 = time.monotonic()
            proc.signal(signal.SIGTERM)
            rc = proc.wait(5)
            if rc is None:
                problems.append("%s still running 5 s after SIGTERM\n%s" % (what, proc.describe()))
            elif rc != 0:
                problems.append("%s exited %d after SIGTERM, want 0\n%s" % (what, rc, proc.describe()))
            else:
                log("%s exited 0 %.2f s after SIGTERM" % (what, time.monotonic() - t0))
        # --serve: the case input ending does not stop the router; SIGINT does
        r2 = cl.start_router(c.a.model, wait_experts_ms=0, extra=["--serve"])
        r2.close_input()
        if r2.wait(1.0) is not None:
            problems.append("router --serve exited (%d) when its case input ended" % r2.p.returncode)
        else:
            r2.signal(signal.SIGINT)
            rc = r2.wait(5)
            if rc != 0:
                problems.append("router --serve: SIGINT gave %r, want exit 0 within 5 s\n%s" % (rc, r2.describe()))
            else:
                log("router --serve exited 0 on SIGINT")
    if problems:
        raise TestFailure("%d problem(s):\n  - %s" % (len(problems), "\n  - ".join(problems)))


# ---------------------------------------------------------------------------------------------
# Replica faults under concurrent load (gRPC front door: the scheduler batches the cases together,
# so every step carries several cases' rows to the faulty replica's expert).

CONCURRENT = 4  # cases at once per round


def _grpc(c, sub):
    """A tests/grpc GrpcCluster (router with --grpc-listen) and the grpclib module."""
    sys.path.insert(0, os.path.join(os.path.dirname(D.HERE), "grpc"))
    import grpclib as G
    cl = G.GrpcCluster(c.bins, os.path.join(c.work, sub), hb_ms=HB_MS)
    cl.tenant_ = cl.tenant("hospital-a", max_concurrent=2 * CONCURRENT)
    return cl, G


def _wait_log(proc, pattern, timeout, what, start=0):
    """The first match of pattern in proc's log after offset start, within timeout seconds."""
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = rx.search(proc.log_text(), start)
        if m:
            return m
        if not proc.alive():
            raise TestFailure("%s exited while waiting for %s\n%s" % (proc.name, what, proc.describe()))
        time.sleep(0.02)
    raise TestFailure("no %s within %d s (looked for /%s/ in %s)\n%s"
                      % (what, timeout, pattern, proc.name, proc.describe()))


def _concurrent_round(cl, G, client, cases, label, bound):
    """Asks every (question, image, max_tokens, ref) at once; each must equal medmoe-run and
    finish within bound seconds. Returns the slowest time."""
    import medmoe_client as MC
    jobs = []
    for i, (q, img, n, ref) in enumerate(cases):
        def one(q=q, img=img, n=n, ref=ref, i=i):
            t0 = time.monotonic()
            ans = MC.to_dict(client.ask(q, image=img, max_tokens=n, case_id="%s-%d" % (label, i),
                                        timeout=bound + 30))
            dt = time.monotonic() - t0
            G.check_answer(ans, ref, "%s case %d" % (label, i), case_id="%s-%d" % (label, i))
            return dt
        jobs.append(G.Background(one, "%s case %d" % (label, i)))
    times = [j.join(bound + 60) for j in jobs]  # raises the case's failure
    log("%s: %d concurrent cases equal to medmoe-run, %s s" % (label, len(times),
                                                                ", ".join("%.2f" % t for t in times)))
    slow = [t for t in times if t > bound]
    if slow:
        raise TestFailure("%s: case(s) took %s s, bound %.1f s: a faulty replica froze the step"
                          % (label, ", ".join("%.2f" % t for t in slow), bound))
    return max(times)


def _fault_cases(c, cl, G):
    with open(c.a.image, "rb") as f:
        png = f.read()
    qs = [("What modality is this image?", png, 12), ("Is there a fracture?", None, 8)]
    refs = [(q, img, n, G.reference(cl, q, c.a.image if img else None, n)) for q, img, n in qs]
    return [refs[i % len(refs)] for i in range(CONCURRENT)], refs[0][3]


def _replicas_of_pid(stats, k, pid):
    return [r for r in replicas_of(stats, k) if str(r.get("node", "")).endswith(":%d" % pid)]


def _check_accounting(stats):
    if stats.get("inflight_exact") is not True:
        raise TestFailure("stats inflight_exact = %r: in-flight counts drifted from the open sends"
                          % stats.get("inflight_exact"))
    busy = [r for r in stats.get("replicas", []) if r.get("inflight") or r.get("inflight_rows")]
    if busy:
        raise TestFailure("in flight after every case ended: %s" % json.dumps(busy))


def _read_stats(stats_file):
    try:
        with open(stats_file) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise TestFailure("router --stats-file %s unreadable: %s" % (stats_file, e))


def _std_grpc(c, cl, G, client, label):
    """The std cases over gRPC: a generation with the image and a text-only one at once, then a
    Classify of the image over four candidates; each equal to medmoe-run."""
    import medmoe_client as MC
    cases, _ = _fault_cases(c, cl, G)
    _concurrent_round(cl, G, client, cases[:2], label, CASE_TIMEOUT)
    with open(c.a.image, "rb") as f:
        png = f.read()
    q, cands = "What modality is this image?", ["ct", "mri", "x-ray", "pathology"]
    ref = G.reference(cl, q, c.a.image, candidates=cands)
    cid = label + "-classify"
    res = MC.to_dict(client.classify(q, cands, image=png, case_id=cid, timeout=CASE_TIMEOUT))
    G.check_classify(res, ref, cid, case_id=cid)
    log("%s: equal to medmoe-run (ranking %s)" % (cid, [x["text"] for x in res["candidates"]]))


def _faulty_replica(c, sub, flag, ignore_re):
    """Router (gRPC) + one replica per expert; a warm-up case; then a second replica of the busiest
    expert started with `flag`; two rounds of concurrent cases (the second after the faulty one said
    Hello again on a new connection). Returns (stats, k, faulty Proc, batches it was handed)."""
    cl, G = _grpc(c, sub)
    with cl:
        stats_file = os.path.join(cl.workdir, "router.stats.json")
        cl.start(c.a.model, router_extra=["--stats-file", stats_file])
        client = cl.client(cl.tenant_)
        cases, ref0 = _fault_cases(c, cl, G)
        k, _ = busiest_decode_expert(ref0, 0.0)
        alone = _concurrent_round(cl, G, client, cases[:1], "warm-up", 60)
        bound = max(8.0, 3 * alone + 3.0)
        bad = cl.start_expert(c.a.model, k, extra=[flag], tag="-faulty")
        log("faulty replica of expert %d: pid %d (%s); bound per case %.1f s" % (k, bad.pid, flag, bound))
        node = r"[^,)]*:%d" % bad.pid
        _concurrent_round(cl, G, client, cases, "round1", bound)
        q = _wait_log(cl.router, r"replica (e%d-r\d+) \(expert %d, %s\) quarantined for \d+ ms: ([^;]*)"
                      % (k, k, node), 10, "quarantine of the faulty replica")
        log("router: %s quarantined: %s" % (q.group(1), q.group(2)))
        handed = len(re.findall(ignore_re, bad.log_text())) if ignore_re else None
        # Hello again on a new connection: frozen until the router drops it, then it reconnects.
        at = len(cl.router.log_text())
        bad.signal(signal.SIGSTOP)
        _wait_log(cl.router, r"\(expert %d, %s\) left: silent" % (k, node), 15,
                  "removal of the frozen replica", at)
        bad.signal(signal.SIGCONT)
        j = _wait_log(cl.router, r"joined: expert %d, node %s[^;]*; still quarantined[^;]*" % (k, node), 20,
                      "the faulty replica joining again, still quarantined", at)
        log("router: %s" % j.group(0))
        _concurrent_round(cl, G, client, cases, "round2", bound)
        if ignore_re:
            again = len(re.findall(ignore_re, bad.log_text()))
            if again != handed:
                raise TestFailure("the faulty replica was handed %d batch(es) after its quarantine (%d before, "
                                  "%d in all)" % (again - handed, handed, again))
        if not cl.router.alive():
            raise TestFailure("router died\n" + cl.router.describe())
        cl.stop_router()
        stats = _read_stats(stats_file)
        mine = _replicas_of_pid(stats, k, bad.pid)
        others = [r for r in replicas_of(stats, k) if r not in mine]
        log("expert %d: faulty %s; healthy %s" % (k, json.dumps(mine), json.dumps(others)))
        _check_accounting(stats)
        if len(mine) < 2:
            raise TestFailure("stats list %d record(s) of the faulty replica, want 2 (it joined twice)"
                              % len(mine))
        sent = sum(r.get("sent", 0) for r in mine)
        if sent != 1:
            raise TestFailure("stats: the faulty replica was sent %d case batch(es), want exactly 1 (after its "
                              "first fault it is quarantined and probes never pass)" % sent)
        if any(r.get("batches", 0) for r in mine):
            raise TestFailure("stats: an answer of the faulty replica was used: %s" % json.dumps(mine))
        if any(r.get("health") == "healthy" for r in mine if r.get("alive")):
            raise TestFailure("stats: the faulty replica is back in service: %s" % json.dumps(mine))
        if not any(r.get("batches", 0) > 0 and r.get("health") == "healthy" for r in others):
            raise TestFailure("stats: no healthy replica of expert %d served batches" % k)
        return stats, mine


# -- kill -9 and SIGSTOP of a replica mid-generation ------------------------------------------

LONG_QS = [("Describe the findings in this image.", True, 32), ("What modality is this image?", False, 24)]
# The other experts' batches take >= 40 ms each, so a case decodes for seconds; the faulted
# expert's replicas answer at once, so they are idle between batches and one frozen at any moment
# is soon handed a batch it never reads.
FAULT_DELAY = ["--debug-delay-ms", "40"]


class _StreamRound:
    """Concurrent AskStream cases, started at once; the tokens each has streamed so far can be read
    while they run (the moment generation is under way is an event, not a guess)."""

    def __init__(self, G, client, cases, label, timeout):
        self.label = label
        self.got = [0] * len(cases)
        self.t0 = time.monotonic()
        self.jobs = []
        for i, (q, img, n, ref) in enumerate(cases):
            def one(i=i, q=q, img=img, n=n, ref=ref):
                cid = "%s-%d" % (label, i)

                def counted(call):
                    for ch in call:
                        self.got[i] += len(ch.tokens)
                        yield ch
                call = client.ask_stream(q, image=img, max_tokens=n, case_id=cid, timeout=timeout)
                _, _, final = G.stream_answer(counted(call), "%s case %d" % (label, i))
                G.check_answer(final, ref, "%s case %d" % (label, i), case_id=cid)
                return time.monotonic() - self.t0
            self.jobs.append(G.Background(one, "%s case %d" % (label, i)))

    def running(self):
        return any(j.t.is_alive() for j in self.jobs)

    def wait_tokens(self, n, timeout):
        """Until every case has streamed at least n tokens (they all decode now)."""
        deadline = time.monotonic() + timeout
        while min(self.got) < n:
            if not self.running() or time.monotonic() > deadline:
                for j in self.jobs:
                    if not j.t.is_alive():
                        j.join(0)  # a case's own failure first
                raise TestFailure("%s: tokens streamed per case %s, want >= %d each within %d s"
                                  % (self.label, self.got, n, timeout))
            time.sleep(0.01)

    def join(self, timeout):
        """Every case equal to medmoe-run; the round's duration (the slowest case)."""
        times = [j.join(timeout) for j in self.jobs]
        log("%s: %d concurrent streamed cases equal to medmoe-run, %s s"
            % (self.label, len(times), ", ".join("%.2f" % t for t in times)))
        return max(times)


def _long_cases(c, cl, G):
    with open(c.a.image, "rb") as f:
        png = f.read()
    refs = [(q, png if img else None, n, G.reference(cl, q, c.a.image if img else None, n))
            for q, img, n in LONG_QS]
    for q, _, n, ref in refs:
        if len(ref["tokens"]) < n // 2:
            raise TestFailure("medmoe-run generates only %d tokens for %r: too short to fault a replica "
                              "mid-generation" % (len(ref["tokens"]), q))
    return [refs[i % len(refs)] for i in range(CONCURRENT)]


def _replica_fault_setup(c, cl, G):
    """gRPC router (--stats-file) + one replica of every expert (FAULT_DELAY) and a second replica of
    the expert k the long case's decode uses most (k's two replicas without the delay, with a
    metrics endpoint). Returns (client, stats_file, k, [k's replicas], long cases, short cases)."""
    stats_file = os.path.join(cl.workdir, "router.stats.json")
    cl.start(c.a.model, experts=0, wait_serving=False, router_extra=["--stats-file", stats_file])
    client = cl.client(cl.tenant_)
    cases = _long_cases(c, cl, G)
    k, _ = busiest_decode_expert(cases[0][3])
    pair = []
    for kk in list(range(c.n_experts)) + [k]:
        tag = "" if kk != k else "ab"[len(pair)]
        extra = list(FAULT_DELAY)
        if kk == k:
            port_file = os.path.join(cl.workdir, "expert%d%s.metrics-port" % (kk, tag))
            extra = ["--metrics-listen", "127.0.0.1:0", "--metrics-port-file", port_file]
        e = cl.start_expert(c.a.model, kk, extra=extra, tag=tag)
        if kk == k:
            e.metrics_port_file = port_file
            pair.append(e)
    cl.wait_health("SERVING", 30)
    short, _ = _fault_cases(c, cl, G)
    log("expert %d: replicas %s" % (k, ", ".join("%s pid %d" % (e.name, e.pid) for e in pair)))
    return client, stats_file, k, pair, cases, short


def _rows_served(e):
    """medmoe_expert_rows_total from expert e's /metrics (rows of the batches it answered)."""
    import urllib.request
    with open(e.metrics_port_file) as f:
        port = int(f.read().strip())
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=10) as r:
        text = r.read().decode()
    m = re.search(r"^medmoe_expert_rows_total(?:\{\})? (\S+)$", text, re.M)
    if not m:
        raise TestFailure("%s /metrics has no medmoe_expert_rows_total" % e.name)
    return float(m.group(1))


def _next_in_line(pair):
    """Of the two replicas, the one the router hands the expert's next batch: it gives ties (nothing
    in flight) to the replica that has served fewer rows, so that one, frozen now, is sure to be
    handed a batch while the cases decode. Returns (victim, survivor)."""
    rows = [_rows_served(e) for e in pair]
    log("rows served: %s" % ", ".join("%s %d" % (e.name, n) for e, n in zip(pair, rows)))
    return (pair[0], pair[1]) if rows[0] <= rows[1] else (pair[1], pair[0])


def _node_re(pid):
    return r"[^,)]*:%d" % pid


def _freeze_holding_work(cl, rnd, k, a, hidden, timeout=20):
    """SIGSTOP replica a while rnd decodes, then wait until a certainly holds a batch it will not
    answer: a Work unread in its socket (sent after it froze: at least one row's tensor bytes;
    heartbeats are a few bytes) or, when it froze with a batch already read, the router's timeout
    of that batch. Returns (router log offset at the freeze, how it was seen)."""
    port = int(cl.endpoint.rsplit(":", 1)[1])
    at = len(cl.router.log_text())
    a.signal(signal.SIGSTOP)
    timed_out = re.compile(r"\(expert %d, %s\) quarantined for \d+ ms: batch \d+ \(\d+ rows\) unanswered"
                           % (k, _node_re(a.pid)))
    deadline = time.monotonic() + timeout
    while True:
        unread = D.unread_bytes(a.pid, port)
        if unread >= hidden * 4:
            return at, "%d bytes of Work unread in its socket" % unread
        m = timed_out.search(cl.router.log_text(), at)
        if m:
            return at, "router: " + m.group(0)
        if not rnd.running():
            raise TestFailure("%s: every case ended before the frozen replica %s of expert %d was handed a "
                              "batch (streamed %s)" % (rnd.label, a.name, k, rnd.got))
        if time.monotonic() > deadline:
            raise TestFailure("the frozen replica %s of expert %d was handed no batch within %d s while "
                              "cases decoded\n%s" % (a.name, k, timeout, cl.router.describe()))
        time.sleep(0.01)


def _check_resent(cl, k, a, at, left):
    """The router re-sent what a held: a timeout of one of its batches after offset at (the batch
    goes to another replica), or its removal with batches in flight (re-sent at once)."""
    text = cl.router.log_text()
    timed_out = re.search(r"\(expert %d, %s\) quarantined for \d+ ms: batch \d+ \(\d+ rows\) unanswered"
                          % (k, _node_re(a.pid)), text[at:])
    moved = int(re.search(r"; (\d+) in-flight batch\(es\) to re-send", left.group(0)).group(1))
    if not timed_out and moved < 1:
        raise TestFailure("the router neither timed out a batch of %s nor re-sent any at its removal (%s)"
                          % (a.name, left.group(0)))
    log("re-sent: %s" % (timed_out.group(0) if timed_out else left.group(0)))


def _check_fault_stats(stats_file, k, a, b):
    """The stats file (router stopped): a listed dead, batches served by a before its fault and by b,
    some batch re-sent, exact in-flight accounting."""
    stats = _read_stats(stats_file)
    ra, rb = _replicas_of_pid(stats, k, a.pid), _replicas_of_pid(stats, k, b.pid)
    log("expert %d: faulted %s; other %s; resent_batches %s" % (k, json.dumps(ra), json.dumps(rb),
                                                                 stats.get("resent_batches")))
    _check_accounting(stats)
    if not ra or ra[0].get("alive") is not False:
        raise TestFailure("stats: the faulted replica is not listed with alive=false: %s" % json.dumps(ra))
    if ra[0].get("batches", 0) <= 0:
        raise TestFailure("stats: the faulted replica served no batches before its fault, so nothing was "
                          "re-sent from a working replica: %s" % json.dumps(ra))
    if not any(r.get("batches", 0) > 0 for r in rb):
        raise TestFailure("stats: the other replica of expert %d served no batches: %s" % (k, json.dumps(rb)))
    if not stats.get("resent_batches"):
        raise TestFailure("stats: resent_batches = %r after a replica died holding a batch"
                          % stats.get("resent_batches"))
    return stats


def sc_kill(c):
    """kill -9 of a replica holding a batch while concurrent gRPC cases decode: every case equal to
    medmoe-run, the replica dropped, its batch re-sent to the other replica."""
    cl, G = _grpc(c, "kill")
    with cl:
        client, stats_file, k, pair, cases, short = _replica_fault_setup(c, cl, G)
        base = _StreamRound(G, client, cases, "baseline", CASE_TIMEOUT).join(CASE_TIMEOUT + 30)
        rnd = _StreamRound(G, client, cases, "killed", CASE_TIMEOUT)
        rnd.wait_tokens(2, CASE_TIMEOUT)
        a, b = _next_in_line(pair)
        # Frozen only until it is seen holding a batch: then the kill -9 takes that batch with it.
        at, seen = _freeze_holding_work(cl, rnd, k, a, c.hidden)
        a.signal(signal.SIGKILL)
        t_kill = time.monotonic()
        log("kill -9 replica %s (pid %d) of expert %d after %s; cases had streamed %s tokens"
            % (a.name, a.pid, k, seen, rnd.got))
        left = _wait_log(cl.router, r"replica \S+ \(expert %d, %s\) left: [^;]*; \d+ in-flight batch\(es\) to "
                         r"re-send" % (k, _node_re(a.pid)), 15, "removal of the killed replica", at)
        log("router, %.2f s after the kill: %s" % (time.monotonic() - t_kill, left.group(0)))
        dt = rnd.join(CASE_TIMEOUT + 30)
        log("round with a kill -9 took %.2f s (baseline %.2f s)" % (dt, base))
        _check_resent(cl, k, a, at, left)
        if not cl.router.alive():
            raise TestFailure("router died\n" + cl.router.describe())
        _concurrent_round(cl, G, client, short, "after-kill", CASE_TIMEOUT)
        cl.stop_router()
        _check_fault_stats(stats_file, k, a, b)


def sc_freeze(c):
    """SIGSTOP of a replica holding a batch while concurrent gRPC cases decode: declared dead after
    ~3 heartbeats, its batch re-sent, every case equal to medmoe-run within the healthy time + 3
    heartbeats + 2 s; after SIGCONT it says Hello again (its late reply discarded) and cases stay
    exact."""
    cl, G = _grpc(c, "freeze")
    with cl:
        client, stats_file, k, pair, cases, short = _replica_fault_setup(c, cl, G)
        base = _StreamRound(G, client, cases, "baseline", CASE_TIMEOUT).join(CASE_TIMEOUT + 30)
        rnd = _StreamRound(G, client, cases, "frozen", CASE_TIMEOUT)
        rnd.wait_tokens(2, CASE_TIMEOUT)
        a, b = _next_in_line(pair)
        t_stop = time.monotonic()
        at, seen = _freeze_holding_work(cl, rnd, k, a, c.hidden)
        log("SIGSTOP replica %s (pid %d) of expert %d: %s after %.2f s; cases had streamed %s tokens"
            % (a.name, a.pid, k, seen, time.monotonic() - t_stop, rnd.got))
        dead_after = 3 * HB_MS / 1000.0 + 2.0
        left = _wait_log(cl.router, r"replica \S+ \(expert %d, %s\) left: silent[^;]*; \d+ in-flight "
                         r"batch\(es\) to re-send" % (k, _node_re(a.pid)), 15, "removal of the frozen replica",
                         at)
        t_left = time.monotonic() - t_stop
        log("router, %.2f s after SIGSTOP: %s" % (t_left, left.group(0)))
        if t_left > dead_after:
            raise TestFailure("the frozen replica was removed %.2f s after SIGSTOP, want within 3 heartbeats "
                              "+ 2 s (%.1f s)" % (t_left, dead_after))
        dt = rnd.join(CASE_TIMEOUT + 30)
        bound = base + 3 * HB_MS / 1000.0 + 2.0
        log("round with a frozen replica took %.2f s (baseline %.2f s, bound %.2f s)" % (dt, base, bound))
        if dt > bound:
            raise TestFailure("round with a frozen replica took %.2f s > baseline %.2f s + 3 heartbeats + 2 s: "
                              "the frozen replica held the cases up" % (dt, base))
        _check_resent(cl, k, a, at, left)
        at = len(cl.router.log_text())
        a.signal(signal.SIGCONT)
        j = _wait_log(cl.router, r"joined: expert %d, node %s[^;]*" % (k, _node_re(a.pid)), 20,
                      "the woken replica joining again", at)
        log("router after SIGCONT: %s" % j.group(0))
        if not cl.router.alive():
            raise TestFailure("router died after the frozen replica woke up\n" + cl.router.describe())
        _concurrent_round(cl, G, client, short, "after-cont", CASE_TIMEOUT)
        cl.stop_router()
        stats = _check_fault_stats(stats_file, k, a, b)
        if len(_replicas_of_pid(stats, k, a.pid)) < 2:
            raise TestFailure("stats list the frozen replica once: it did not join again after SIGCONT")


def sc_silent(c):
    stats, mine = _faulty_replica(c, "silent", "--debug-never-answer",
                                  r"--debug-never-answer: ignoring batch")
    if sum(r.get("timeouts", 0) for r in mine) < 1:
        raise TestFailure("stats: no timeout counted for the silent replica: %s" % json.dumps(mine))


def sc_failing(c):
    stats, mine = _faulty_replica(c, "failing", "--debug-fail-batches", None)
    if sum(r.get("errors", 0) for r in mine) < 1:
        raise TestFailure("stats: no error answer counted for the failing replica: %s" % json.dumps(mine))


def sc_expired(c):
    """A real expert whose compute thread is busy (--debug-delay-ms) behind our own ROUTER socket:
    Work with deadline_ms 0 (none) and 60000 is computed, Work whose deadline passes while it is
    queued is answered EXPIRED without compute."""
    import struct
    import zmq
    pb = _pb2(c)
    with open(os.path.join(c.a.model, "config.json")) as f:
        layer0 = json.load(f)["moe"]["moe_layers_idx"][0]
    H = c.hidden
    with c.cluster("expired") as cl:
        s, ep = cl.bare_router()
        e = cl.start_expert(c.a.model, 0, endpoint=ep, wait_joined=False, extra=["--debug-delay-ms", "400"])
        try:
            if not s.poll(20000):
                raise TestFailure("the expert sent no Hello within 20 s\n" + e.describe())
            ident, hello = s.recv_multipart()[:2]
            env = pb.Envelope()
            env.ParseFromString(hello)
            if env.WhichOneof("body") != "hello":
                raise TestFailure("first message is a %s, not a Hello" % env.WhichOneof("body"))
            s.send_multipart([ident, pb.Envelope(welcome=pb.Welcome(version=1, heartbeat_ms=HB_MS,
                                                                     replica_id="wire-test")).SerializeToString()])
            rows = 2
            x = struct.pack("<%df" % (rows * H), *([0.125] * (rows * H)))
            works = {1: dict(deadline_ms=0), 2: dict(deadline_ms=50), 3: dict(deadline_ms=60000),
                     4: dict(deadline_ms=1), 5: dict(deadline_ms=60000, probe=True)}
            for bid, kw in works.items():
                w = pb.Work(batch_id=bid, layer=layer0, moe=0, expert=0, rows=rows, width=H, dtype=1, **kw)
                s.send_multipart([ident, pb.Envelope(work=w).SerializeToString(), x])
            beat = pb.Envelope(heartbeat=pb.Heartbeat()).SerializeToString()
            got = {}
            deadline = time.monotonic() + 30
            last_beat = 0
            while len(got) < len(works) and time.monotonic() < deadline:
                if time.monotonic() - last_beat > HB_MS / 1000.0:
                    s.send_multipart([ident, beat])
                    last_beat = time.monotonic()
                if not s.poll(50):
                    continue
                fr = s.recv_multipart()
                r = pb.Envelope()
                r.ParseFromString(fr[1])
                if r.WhichOneof("body") == "result":
                    got[r.result.batch_id] = (r.result, fr[2:])
            if len(got) < len(works):
                raise TestFailure("answers to batches %s only within 30 s\n%s" % (sorted(got), e.describe()))
            names = {v: k for k, v in pb.ErrorCode.items()}
            for bid, (res, tensor) in sorted(got.items()):
                log("batch %d (deadline_ms %d%s): %s %s" % (bid, works[bid]["deadline_ms"],
                                                           ", probe" if works[bid].get("probe") else "",
                                                           names.get(res.error), res.message))
            for bid in (1, 3, 5):
                res, tensor = got[bid]
                if res.error != pb.ERROR_OK or len(tensor) != 1 or len(tensor[0]) != rows * H * 4:
                    raise TestFailure("batch %d (deadline %d ms) was not computed: %s %s"
                                      % (bid, works[bid]["deadline_ms"], names.get(res.error), res.message))
            for bid in (2, 4):
                res, tensor = got[bid]
                if res.error != pb.ERROR_EXPIRED or tensor:
                    raise TestFailure("batch %d (deadline %d ms, queued behind a 400 ms batch) answered %s, want "
                                      "EXPIRED" % (bid, works[bid]["deadline_ms"], names.get(res.error)))
                if "deadline" not in res.message:
                    raise TestFailure("EXPIRED without a message naming the deadline: %r" % res.message)
            if got[1][0].compute_us < 400000:
                raise TestFailure("batch 1 took %d us: --debug-delay-ms 400 did not hold the compute thread"
                                  % got[1][0].compute_us)
        finally:
            s.close(0)


SCENARIOS = {f.__name__[3:]: f for f in (sc_equiv, sc_replicas, sc_kill, sc_freeze, sc_unavailable,
                                         sc_fingerprint, sc_garbage, sc_rogue, sc_curve, sc_cli,
                                         sc_silent, sc_failing, sc_expired)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenario", required=True, choices=sorted(SCENARIOS))
    ap.add_argument("--router", required=True)
    ap.add_argument("--expert", required=True)
    ap.add_argument("--run", required=True)
    ap.add_argument("--keygen", default=None)
    ap.add_argument("--model", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--maker", default=os.path.join(os.path.dirname(os.path.dirname(D.HERE)), "tools",
                                                    "make_tiny_checkpoint.py"))
    a = ap.parse_args()
    c = Ctx(a)
    D.main_wrapper(lambda: SCENARIOS[a.scenario](c))


if __name__ == "__main__":
    main()
