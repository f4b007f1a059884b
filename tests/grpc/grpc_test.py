#!/usr/bin/python3
"""Black-box tests of medmoe-router's gRPC front door (docs/ARCHITECTURE.md, "The gRPC front
door"), one scenario per ctest.

    grpc_test.py --scenario NAME --router BIN --expert BIN --run BIN --cli BIN
                 --model DIR --image PNG --workdir DIR [--node-modules DIR] [--keygen BIN]

Every scenario starts its own router (--grpc-listen 127.0.0.1:0) + experts on loopback
(grpclib.GrpcCluster, on top of tests/distributed/distlib.py: process groups, bounded waits,
cleanup, sanitizer reports) and compares answers with `medmoe-run --json` on the same case.

Why one file of ~1,500 lines: every scenario is one ctest started by name through the same
entry point, and they share the check helpers (answers, audit records, status codes); hostile
traffic with memory measurements lives apart in hostile_test.py.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import grpclib as G  # noqa: E402
import grpc  # noqa: E402

D = G.D
MC = G.MC
TestFailure = G.TestFailure
log = G.log

QUESTION = "What modality is this image?"
CANDIDATES = ["ct", "mri", "x-ray", "pathology"]
MAX_TOKENS = 16


def bins(a):
    return {"router": a.router, "expert": a.expert, "run": a.run}


def png(a):
    with open(a.image, "rb") as f:
        return f.read()


def good_case(cl, c, image, what, question=QUESTION, max_tokens=MAX_TOKENS, case_id="good"):
    """An Ask that must come back equal to medmoe-run (for 'runs beside' checks)."""
    ref = G.reference(cl, question, cl.image_path, max_tokens)
    ans = c.ask(question, image=image, max_tokens=max_tokens, case_id=case_id, timeout=60)
    G.check_answer(MC.to_dict(ans), ref, what, case_id=case_id)
    return ans


def beside(cl, c, image, what):
    """A good case running in the background while errors are provoked."""
    return G.Background(lambda: good_case(cl, c, image, what, case_id="beside"), what)


def run_cmd(cmd, timeout, env=None):
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout,
                           env=env)
    except subprocess.TimeoutExpired:
        raise TestFailure("did not finish within %d s: %s" % (timeout, " ".join(cmd)))
    return p


# ---- 1. the three clients agree with medmoe-run ------------------------------------------------------
def check_all_calls(cl, a, call, label):
    """call(kind, extra_args) → (rc, stdout, stderr) for one client; every method checked."""
    ref = G.reference(cl, QUESTION, a.image, MAX_TOKENS)
    ref_c = G.reference(cl, QUESTION, a.image, candidates=CANDIDATES)

    rc, out, err = call(["ask", "--image", a.image, "--question", QUESTION, "--max-tokens", str(MAX_TOKENS),
                         "--case-id", label + "-ask", "--json"])
    if rc != 0:
        raise TestFailure("%s ask: exit %d: %s" % (label, rc, err.strip()))
    G.check_answer(json.loads(out), ref, label + " Ask", case_id=label + "-ask")
    log("%s Ask: equal to medmoe-run" % label)

    rc, out, err = call(["ask", "--image", a.image, "--question", QUESTION, "--max-tokens", str(MAX_TOKENS),
                         "--case-id", label + "-stream", "--stream"])
    if rc != 0:
        raise TestFailure("%s ask --stream: exit %d: %s" % (label, rc, err.strip()))
    if out != ref["answer"] + "\n":
        raise TestFailure("%s AskStream: printed pieces %r, medmoe-run's answer %r" % (label, out, ref["answer"]))
    rc, out, err = call(["ask", "--image", a.image, "--question", QUESTION, "--max-tokens", str(MAX_TOKENS),
                         "--case-id", label + "-stream", "--stream", "--json"])
    if rc != 0:
        raise TestFailure("%s ask --stream --json: exit %d: %s" % (label, rc, err.strip()))
    G.check_answer(json.loads(out), ref, label + " AskStream final", case_id=label + "-stream")
    log("%s AskStream: pieces and final equal to medmoe-run" % label)

    rc, out, err = call(["classify", "--image", a.image, "--question", QUESTION, "--candidates",
                         ",".join(CANDIDATES), "--case-id", label + "-cls", "--json"])
    if rc != 0:
        raise TestFailure("%s classify: exit %d: %s" % (label, rc, err.strip()))
    G.check_classify(json.loads(out), ref_c, label + " Classify", case_id=label + "-cls")
    log("%s Classify: ranking equal to medmoe-run" % label)

    rc, out, err = call(["status", "--json"])
    if rc != 0:
        raise TestFailure("%s status: exit %d: %s" % (label, rc, err.strip()))
    st = json.loads(out)
    check_server_info(st["server_info"], ref, label)
    for k in ("health", "health_case_service"):
        if st[k] != "SERVING":
            raise TestFailure("%s status: %s %r, want SERVING" % (label, k, st[k]))
    log("%s GetServerInfo + health: ok" % label)

    # An error ends as the contract says: exit 1, "medmoe: STATUS: message".
    rc, out, err = call(["ask", "--question", QUESTION, "--key", "not-a-key"])
    if rc != 1 or not err.startswith("medmoe: UNAUTHENTICATED: "):
        raise TestFailure("%s with an unknown key: exit %d, stderr %r (want 1, 'medmoe: UNAUTHENTICATED: ...')"
                          % (label, rc, err))


def check_server_info(info, ref, label):
    if info.get("model") != ref.get("model"):
        raise TestFailure("%s GetServerInfo: model %r, medmoe-run says %r" % (label, info.get("model"), ref.get("model")))
    if info.get("backbone") not in ("stablelm", "phi"):
        raise TestFailure("%s GetServerInfo: backbone %r" % (label, info.get("backbone")))
    if not info.get("version"):
        raise TestFailure("%s GetServerInfo: empty version" % label)
    ex = sorted((int(e["expert"]), int(e["live_replicas"])) for e in info.get("experts", []))
    if ex != [(k, 1) for k in range(4)]:
        raise TestFailure("%s GetServerInfo: experts (expert, live_replicas) %s, want one replica of 0..3" % (label, ex))
    fps = [info.get("model_fingerprint", "")] + [e.get("fingerprint", "") for e in info.get("experts", [])]
    if not all(re.fullmatch(r"[0-9a-f]{64}", f) for f in fps) or len(set(fps)) != len(fps):
        raise TestFailure("%s GetServerInfo: model and expert fingerprints %s, want 5 distinct SHA-256 hex"
                          % (label, fps))


def cluster_for_clients(a, name):
    cl = G.GrpcCluster(bins(a), a.workdir)
    cl.image_path = a.image
    t = cl.tenant("hospital-a", max_concurrent=8)
    cl.start(a.model)
    return cl, t


def scenario_python(a):
    with cluster_for_clients(a, "python")[0] as cl:
        t = cl.tenants[0]
        script = os.path.join(G.ROOT, "clients", "python", "medmoe_client.py")

        def call(args):
            cmd = [D.PYTHON, script] + args[:1] + ["--server", cl.target, "--stubs", cl.stub_dir] + args[1:]
            if "--key" not in args:
                cmd += ["--key", t.key]
            p = run_cmd(cmd, 60)
            return p.returncode, p.stdout, p.stderr

        check_all_calls(cl, a, call, "python")
        # The library API too: AskStream pieces concatenate to the answer.
        c = cl.client(t)
        ref = G.reference(cl, QUESTION, a.image, MAX_TOKENS)
        _, _, final = G.stream_answer(c.ask_stream(QUESTION, image=png(a), max_tokens=MAX_TOKENS,
                                                   case_id="lib", timeout=60), "python AskStream (library)")
        G.check_answer(final, ref, "python AskStream (library)", case_id="lib")


def scenario_node(a):
    if not a.node_modules or not os.path.isdir(os.path.join(a.node_modules, "@grpc", "grpc-js")):
        raise TestFailure("no node_modules with @grpc/grpc-js at %r (the grpc_node_deps fixture runs npm ci)"
                          % a.node_modules)
    with cluster_for_clients(a, "node")[0] as cl:
        t = cl.tenants[0]
        env = dict(os.environ, NODE_PATH=a.node_modules)

        def call(args):
            cmd = ["node", G.NODE_CLIENT] + args[:1] + ["--server", cl.target] + args[1:]
            if "--key" not in args:
                cmd += ["--key", t.key]
            p = run_cmd(cmd, 60, env=env)
            return p.returncode, p.stdout, p.stderr

        check_all_calls(cl, a, call, "node")


def scenario_cli(a):
    with cluster_for_clients(a, "cli")[0] as cl:
        t = cl.tenants[0]

        def call(args):
            cmd = [a.cli] + args[:1] + ["--server", cl.target] + args[1:]
            env = dict(os.environ)
            if "--key" not in args:
                env["MEDMOE_API_KEY"] = t.key  # the key from the environment, not argv
            p = run_cmd(cmd, 60, env=env)
            return p.returncode, p.stdout, p.stderr

        check_all_calls(cl, a, call, "cli")
        # plain output formats
        ref = G.reference(cl, QUESTION, a.image, MAX_TOKENS)
        rc, out, err = call(["ask", "--image", a.image, "--question", QUESTION, "--max-tokens", str(MAX_TOKENS)])
        if rc != 0 or out != ref["answer"] + "\n":
            raise TestFailure("cli ask (plain): exit %d, printed %r, want %r (%s)" % (rc, out, ref["answer"], err))
        p = run_cmd([a.cli, "ask", "--server", cl.target, "--question", QUESTION], 30,
                    env={k: v for k, v in os.environ.items() if k != "MEDMOE_API_KEY"})
        if p.returncode != 1 or not p.stderr.startswith("medmoe: UNAUTHENTICATED: "):
            raise TestFailure("cli without a key: exit %d, stderr %r" % (p.returncode, p.stderr))


# ---- 2. status codes ---------------------------------------------------------------------------------
def scenario_status_auth(a):
    """UNAUTHENTICATED (no key, unknown key) and RESOURCE_EXHAUSTED (concurrent, per minute)."""
    with G.GrpcCluster(bins(a), a.workdir) as cl:
        cl.image_path = a.image
        good = cl.tenant("good", max_concurrent=8)
        tight = cl.tenant("tight", max_concurrent=1)
        rate = cl.tenant("rate", cases_per_minute=2)
        # Experts slowed down so that a case stays in flight long enough to hold a slot.
        cl.start(a.model, expert_extra=["--debug-delay-ms", "15"])
        image = png(a)
        g = cl.client(good)
        bg = beside(cl, g, image, "good case beside the auth/quota errors")

        if a.keygen:
            p = run_cmd([a.keygen, "--api-key"], 10)
            lines = p.stdout.split()
            if p.returncode != 0 or len(lines) < 2:
                raise TestFailure("medmoe-keygen --api-key: exit %d, %r" % (p.returncode, p.stdout))
            if hashlib.sha256(lines[0].encode()).hexdigest() != lines[1].lower():
                raise TestFailure("medmoe-keygen --api-key: line 2 %r is not the sha256 of line 1" % lines[1])

        anon = cl.client(None)
        G.expect_code(lambda: anon.ask(QUESTION, timeout=20), "UNAUTHENTICATED", "Ask without a key")
        G.expect_code(lambda: anon.ask_stream(QUESTION, timeout=20), "UNAUTHENTICATED", "AskStream without a key")
        G.expect_code(lambda: anon.classify(QUESTION, CANDIDATES, timeout=20), "UNAUTHENTICATED",
                      "Classify without a key")
        bad = cl.client("0" * 64)
        G.expect_code(lambda: bad.ask(QUESTION, timeout=20), "UNAUTHENTICATED", "Ask with an unknown key")
        G.expect_code(lambda: bad.ask(QUESTION, timeout=20, key=good.key[:-1]), "UNAUTHENTICATED",
                      "Ask with a truncated key")
        raw = grpc.insecure_channel(cl.target)
        cl.clients.append(raw)
        ask = raw.unary_unary("/medmoe.v1.CaseService/Ask")
        req = g.case_request(QUESTION).SerializeToString()
        G.expect_code(lambda: ask(req, timeout=20, metadata=[("authorization", good.key)]), "UNAUTHENTICATED",
                      "Ask with the key but no 'Bearer ' scheme")

        # max_concurrent 1: hold one case open (a stream, first chunk read), a second is refused.
        t = cl.client(tight)
        held = t.ask_stream(QUESTION, image=image, max_tokens=64, timeout=60)
        it = iter(held)
        first = next(it)
        G.expect_code(lambda: t.ask(QUESTION, image=image, max_tokens=4, timeout=20), "RESOURCE_EXHAUSTED",
                      "a second case over max_concurrent 1 (sent while the first was streaming)",
                      field="max_concurrent")
        for _ in it:
            pass
        log("the held stream completed (first chunk %r)" % first.text)
        # ... and once it ended, the slot is free again.
        wait_admitted(lambda: t.ask(QUESTION, max_tokens=2, timeout=30), 5, "tight's next case after the first ended")

        # cases_per_minute 2: the third within the minute is refused.
        r = cl.client(rate)
        r.ask(QUESTION, max_tokens=2, timeout=30)
        r.ask(QUESTION, max_tokens=2, timeout=30)
        G.expect_code(lambda: r.ask(QUESTION, max_tokens=2, timeout=30), "RESOURCE_EXHAUSTED",
                      "a third case over cases_per_minute 2", field="cases_per_minute")
        bg.join(90)
        log("the good case beside them was answered correctly")


def wait_admitted(fn, timeout, what):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            return fn()
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise TestFailure("%s: %s: %s" % (what, e.code().name, e.details()))
            last = e.details()
        time.sleep(0.1)
    raise TestFailure("%s: still RESOURCE_EXHAUSTED after %d s (%s): the slot was not freed" % (what, timeout, last))


def scenario_status_invalid(a):
    """INVALID_ARGUMENT, the field named in the message; a text-only Ask is valid."""
    with G.GrpcCluster(bins(a), a.workdir) as cl:
        cl.image_path = a.image
        t = cl.tenant("hospital-a", max_concurrent=16)
        cl.start(a.model, router_extra=["--max-image-bytes", "100000", "--max-question-bytes", "256",
                                        "--max-tokens-limit", "128"])
        image = png(a)
        if len(image) >= 100000:
            raise TestFailure("the test image is %d bytes, the test needs it under 100000" % len(image))
        c = cl.client(t)
        bg = beside(cl, c, image, "good case beside the INVALID_ARGUMENT calls")

        IA = "INVALID_ARGUMENT"
        G.expect_code(lambda: c.ask(QUESTION, image=b"this is not an image at all" * 10, media_type="image/png",
                                    timeout=20), IA, "Ask with undecodable PNG bytes", field="image")
        G.expect_code(lambda: c.ask(QUESTION, image=b"\xff\xd8\xff\xe0garbage" * 10, media_type="image/jpeg",
                                    timeout=20), IA, "Ask with undecodable JPEG bytes", field="image")
        G.expect_code(lambda: c.ask(QUESTION, image=b"\x00\x01\x02\x03" * 8, timeout=20), IA,
                      "Ask with bytes of no known format (media type to detect)", field="image")
        G.expect_code(lambda: c.ask(QUESTION, image=image + b"\0" * (100001 - len(image)), timeout=20), IA,
                      "Ask with an image over --max-image-bytes", field="image.data")
        G.expect_code(lambda: c.ask(QUESTION, image=image, media_type="image/gif", timeout=20), IA,
                      "Ask with media type image/gif", field="media_type")
        G.expect_code(lambda: c.ask("", image=image, timeout=20), IA, "Ask with an empty question", field="question")
        G.expect_code(lambda: c.ask("x" * 257, image=image, timeout=20), IA,
                      "Ask with a question over --max-question-bytes", field="question")
        G.expect_code(lambda: c.ask_stream("", image=image, timeout=20), IA, "AskStream with an empty question",
                      field="question")
        G.expect_code(lambda: c.ask(QUESTION, image=image, max_tokens=129, timeout=20), IA,
                      "Ask with max_tokens over --max-tokens-limit", field="max_tokens")
        G.expect_code(lambda: c.classify(QUESTION, [], image=image, timeout=20), IA,
                      "Classify with no candidates", field="candidates")
        G.expect_code(lambda: c.classify(QUESTION, ["ct", ""], image=image, timeout=20), IA,
                      "Classify with an empty candidate", field="candidates")
        G.expect_code(lambda: c.classify("", CANDIDATES, image=image, timeout=20), IA,
                      "Classify with an empty question", field="question")
        G.expect_code(lambda: c.classify(QUESTION, CANDIDATES, image=image, media_type="text/plain", timeout=20),
                      IA, "Classify with media type text/plain", field="media_type")

        # A text-only Ask is valid and equals medmoe-run without --image.
        ref = G.reference(cl, QUESTION, None, 8)
        ans = c.ask(QUESTION, max_tokens=8, case_id="text-only", timeout=60)
        G.check_answer(MC.to_dict(ans), ref, "text-only Ask", case_id="text-only")
        # The JPEG and an explicit media type work too.
        jpg = os.path.join(os.path.dirname(a.image), "case.jpg")
        if os.path.exists(jpg):
            with open(jpg, "rb") as f:
                jb = f.read()
            ref = G.reference(cl, QUESTION, jpg, 8)
            ans = c.ask(QUESTION, image=jb, media_type="image/jpeg", max_tokens=8, timeout=60)
            G.check_answer(MC.to_dict(ans), ref, "Ask with a JPEG (image/jpeg)")
        bg.join(90)
        log("the good case beside them was answered correctly")


# ---- 2b. strict inputs and the quota that counts what was served ----------------------------------
LONG_ID = "x" * 257


def strict_rules():
    """(what, method, request fields, field named, reason in the message): the front door's text
    rules (proto/medmoe.proto, "Text rules"), in the form every client can send."""
    return [
        ("NUL in the question", "ask", {"question": "What\0 modality is this image?"}, "question",
         "NUL byte at offset 4"),
        ("NUL in a candidate", "classify", {"question": QUESTION, "candidates": ["ct", "m\0ri"]},
         "candidates[1]", "NUL byte at offset 1"),
        ("a case id over 256 bytes", "ask", {"question": QUESTION, "case_id": LONG_ID}, "case_id",
         "257 bytes, over the limit of 256"),
        ("a BEL in the case id", "ask", {"question": QUESTION, "case_id": "case\x07id"}, "case_id",
         "U+0007 at offset 4"),
        ("a newline in the case id", "classify", {"question": QUESTION, "candidates": CANDIDATES,
                                                  "case_id": "a\nforged line"}, "case_id", "U+000A"),
        ("a right-to-left override in the case id", "ask", {"question": QUESTION, "case_id": "id\u202eevil"},
         "case_id", "U+202E"),
    ]


def check_refused(code, details, what, field, reason):
    if code != "INVALID_ARGUMENT":
        raise TestFailure("%s: %s (%s), want INVALID_ARGUMENT" % (what, code, details))
    if not (details or "").startswith(field + ": ") or reason not in details:
        raise TestFailure("%s: INVALID_ARGUMENT %r does not name %r and %r" % (what, details, field, reason))
    log("%s: INVALID_ARGUMENT: %s" % (what, details))


def scenario_strict(a):
    """Every text rule refused as INVALID_ARGUMENT naming the field and reason, through the Python,
    Node and C clients; none of those refusals (nor a case whose image fails to decode) uses the
    tenant's cases_per_minute: after ~30 of them the tenant's 3 cases are still all there."""
    with G.GrpcCluster(bins(a), a.workdir) as cl:
        cl.image_path = a.image
        t = cl.tenant("strict", max_concurrent=4, cases_per_minute=3)
        cl.start(a.model)
        c = cl.client(t)
        image = png(a)
        n_refused = 0

        # -- Python (grpcio): the library for what a str holds, raw bytes for invalid UTF-8
        for what, method, f, field, reason in strict_rules():
            kw = dict(f)
            q = kw.pop("question")
            fn = (lambda: c.classify(q, kw.pop("candidates"), timeout=20, **kw)) if method == "classify" \
                else (lambda: c.ask(q, max_tokens=2, timeout=20, **kw))
            e = G.expect_code(fn, "INVALID_ARGUMENT", "python: " + what)
            check_refused(e.code().name, e.details(), "python: " + what, field, reason)
            n_refused += 1
        raw = grpc.insecure_channel(cl.target)
        cl.clients.append(raw)
        ask = raw.unary_unary("/medmoe.v1.CaseService/Ask")
        classify = raw.unary_unary("/medmoe.v1.CaseService/Classify")
        bad_utf8 = [  # placeholder -> bytes of the same length (the message's lengths stay right)
            ("invalid UTF-8 in the question", ask, c.case_request("What QQ modality?"), b"QQ", b"\xff\xfe",
             "question", "not valid UTF-8 (byte 0xff at offset 5)"),
            ("a surrogate in the question", ask, c.case_request("What QQQ modality?"), b"QQQ", b"\xed\xa0\x80",
             "question", "not valid UTF-8 (byte 0xed at offset 5)"),
            ("invalid UTF-8 in the case id", ask, c.case_request(QUESTION, case_id="idZZ"), b"ZZ", b"\xc3\x28",
             "case_id", "not valid UTF-8 (byte 0xc3 at offset 2)"),
            ("an overlong '/' in a candidate", classify, c.classify_request(QUESTION, ["ct", "aWW"]), b"WW",
             b"\xc0\xaf", "candidates[1]", "not valid UTF-8 (byte 0xc0 at offset 1)"),
        ]
        for what, stub, req, ph, repl, field, reason in bad_utf8:
            body = req.SerializeToString()
            if body.count(ph) != 1:
                raise TestFailure("test bug: placeholder %r occurs %d times" % (ph, body.count(ph)))
            body = body.replace(ph, repl)
            e = G.expect_code(lambda: stub(body, timeout=20, metadata=c.metadata()), "INVALID_ARGUMENT",
                              "python (raw bytes): " + what)
            check_refused(e.code().name, e.details(), "python: " + what, field, reason)
            n_refused += 1

        # -- Node (@grpc/grpc-js + protobufjs): a lone surrogate is sent as ED A0 80
        if a.node_modules and os.path.isdir(os.path.join(a.node_modules, "@grpc", "grpc-js")):
            cases = [{"method": m, "req": dict(f)} for _, m, f, _, _ in strict_rules()]
            expect = [(w, fld, r) for w, _, _, fld, r in strict_rules()]
            cases += [{"method": "ask", "req": {"question": "What \ud800 modality?"}},
                      {"method": "ask", "req": {"question": QUESTION, "case_id": "id-\udc00"}}]
            expect += [("a lone surrogate in the question", "question", "byte 0xed at offset 5"),
                       ("a lone surrogate in the case id", "case_id", "byte 0xed at offset 3")]
            p = subprocess.run(["node", os.path.join(G.HERE, "strict_node.js"), cl.target, t.key],
                               input=json.dumps(cases), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, timeout=60, env=dict(os.environ, NODE_PATH=a.node_modules))
            if p.returncode != 0:
                raise TestFailure("strict_node.js: exit %d: %s" % (p.returncode, p.stderr[-2000:]))
            res = json.loads(p.stdout)
            for (what, field, reason), r in zip(expect, res):
                check_refused(r["code"], r.get("details"), "node: " + what, field, reason)
                n_refused += 1
        else:
            log("node: no node_modules with @grpc/grpc-js at %r: the Node client's part is skipped"
                % a.node_modules)

        # -- C (the medmoe CLI): argv carries any byte but NUL; a NUL comes from --question-file
        def cli(args):
            p = run_cmd([a.cli] + args[:1] + ["--server", cl.target, "--key", t.key] + args[1:], 30)
            return p.returncode, p.stderr.strip()

        qf = os.path.join(cl.workdir, "question-with-nul.txt")
        with open(qf, "wb") as fq:
            fq.write(b"What\0 modality is this image?")
        rc, err = cli(["ask", "--question-file", qf])
        if rc != 2 or "NUL byte at offset 4" not in err:
            raise TestFailure("cli: --question-file with a NUL: exit %d, %r (want 2 and the offset)" % (rc, err))
        log("cli: a NUL in --question-file refused before sending: %s" % err)
        cli_cases = [
            ("invalid UTF-8 in the question", ["ask", "--question", b"What \xff modality?"], "question",
             "byte 0xff at offset 5"),
            ("invalid UTF-8 in a candidate", ["classify", "--question", QUESTION, "--candidates", b"ct,m\xffri"],
             "candidates[1]", "byte 0xff at offset 1"),
            ("invalid UTF-8 in the case id", ["ask", "--question", QUESTION, "--case-id", b"id\xc3\x28"],
             "case_id", "byte 0xc3 at offset 2"),
            ("a case id over 256 bytes", ["ask", "--question", QUESTION, "--case-id", LONG_ID], "case_id",
             "over the limit of 256"),
            ("an ESC in the case id", ["ask", "--question", QUESTION, "--case-id", "a\x1bb"], "case_id",
             "U+001B at offset 1"),
        ]
        for what, args, field, reason in cli_cases:
            args = [x if isinstance(x, bytes) else x.encode() for x in args]
            p = subprocess.run([a.cli.encode(), args[0], b"--server", cl.target.encode(), b"--key",
                                t.key.encode()] + args[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               timeout=30)
            err = p.stderr.decode("utf-8", "replace").strip()
            m = re.match(r"^medmoe: (\w+): (.*)$", err)
            if p.returncode != 1 or not m:
                raise TestFailure("cli: %s: exit %d, %r" % (what, p.returncode, err))
            check_refused(m.group(1), m.group(2), "cli: " + what, field, reason)
            n_refused += 1

        # -- a refusal after admission (the image does not decode) gives its unit back too
        G.expect_code(lambda: c.ask(QUESTION, image=b"\x89PNG\r\n\x1a\n" + b"garbage" * 20, timeout=20),
                      "INVALID_ARGUMENT", "python: a PNG that does not decode", field="image")
        n_refused += 1
        # -- the quota: cases_per_minute 3 is untouched by the refusals above
        ok = [c.ask(QUESTION, max_tokens=2, case_id="caf\u00e9-%d" % i, timeout=30) for i in range(3)]
        if [x.case_id for x in ok] != ["caf\u00e9-%d" % i for i in range(3)]:
            raise TestFailure("valid non-ASCII case ids echoed as %r" % [x.case_id for x in ok])
        log("after %d refused requests, the tenant's 3 cases per minute were all admitted" % n_refused)
        G.expect_code(lambda: c.ask(QUESTION, max_tokens=2, timeout=30), "RESOURCE_EXHAUSTED",
                      "a 4th valid case within the minute (the bucket is still enforced)", field="cases_per_minute")
        cl.stop_router()


STREAM_QUESTIONS = [QUESTION, "Is there a fracture?", "Describe the lesion.", "what organ is shown",
                    "Where is the abnormality located in this image?", "Is this normal? Answer yes or no.",
                    " Leading and trailing spaces ", "Which plane: axial, sagittal or coronal?"]


def scenario_stream_contract(a):
    """AskStream's contract (proto/medmoe.proto): the chunks' text concatenated == final.answer
    and their tokens == final.tokens, on several cases (with and without the image, several
    lengths), through the Python library and the C and Node CLIs (printed pieces == answer)."""
    with G.GrpcCluster(bins(a), a.workdir) as cl:
        cl.image_path = a.image
        t = cl.tenant("hospital-a", max_concurrent=8)
        cl.start(a.model)
        c = cl.client(t)
        image = png(a)
        node = a.node_modules and os.path.isdir(os.path.join(a.node_modules, "@grpc", "grpc-js"))
        n = 0
        for i, q in enumerate(STREAM_QUESTIONS):
            for img, mt in ((image, 24), (None, 12 + i)):
                what = "stream %r %s max_tokens %d" % (q, "with image" if img else "text only", mt)
                joined, _, final = G.stream_answer(c.ask_stream(q, image=img, max_tokens=mt, timeout=60), what)
                n += 1
                if img is None or i % 3:
                    continue
                args = ["ask", "--question", q, "--max-tokens", str(mt), "--stream", "--image", a.image]
                p = run_cmd([a.cli, args[0], "--server", cl.target, "--key", t.key] + args[1:], 60)
                if p.returncode != 0 or p.stdout != final["answer"] + "\n":
                    raise TestFailure("cli %s: exit %d, printed %r, answer %r" % (what, p.returncode, p.stdout,
                                                                                 final["answer"]))
                if node:
                    p = run_cmd(["node", G.NODE_CLIENT, args[0], "--server", cl.target, "--key", t.key] + args[1:],
                                60, env=dict(os.environ, NODE_PATH=a.node_modules))
                    if p.returncode != 0 or p.stdout != final["answer"] + "\n":
                        raise TestFailure("node %s: exit %d, printed %r, answer %r"
                                          % (what, p.returncode, p.stdout, final["answer"]))
        log("%d streams: pieces concatenate to the final answer, tokens to its tokens" % n)


def scenario_status_unavailable(a):
    """A needed expert with no live replica → UNAVAILABLE naming it; health NOT_SERVING; recovery."""
    with G.GrpcCluster(bins(a), a.workdir) as cl:
        cl.image_path = a.image
        t = cl.tenant("hospital-a", max_concurrent=8)
        cl.start(a.model, expert_wait_ms=1000)
        image = png(a)
        c = cl.client(t)
        ref = G.reference(cl, QUESTION, a.image, MAX_TOKENS)
        used = D.experts_used(ref)
        k = used[0]
        victim = cl.experts[k]
        victim.kill()
        log("killed expert %d (pid %d); the case needs experts %s" % (k, victim.pid, used))
        e = G.expect_code(lambda: c.ask(QUESTION, image=image, max_tokens=MAX_TOKENS, timeout=30), "UNAVAILABLE",
                          "Ask needing expert %d with no replica" % k)
        if not re.search(r"\b%d\b" % k, e.details() or ""):
            raise TestFailure("UNAVAILABLE message does not name expert %d: %r" % (k, e.details()))
        G.expect_code(lambda: c.ask_stream(QUESTION, image=image, max_tokens=MAX_TOKENS, timeout=30),
                      "UNAVAILABLE", "AskStream needing expert %d with no replica" % k)
        cl.wait_health("NOT_SERVING", 10)
        info = c.server_info(timeout=10)
        live = {int(x.expert): int(x.live_replicas) for x in info.experts}
        if live.get(k) != 0:
            raise TestFailure("GetServerInfo after the kill: expert %d has %s live replicas, want 0" % (k, live.get(k)))
        # A new replica: serving again, answers correct.
        cl.experts[k] = cl.start_expert(cl.model, k)
        cl.wait_health("SERVING", 15)
        good_case(cl, c, image, "Ask after expert %d came back" % k)


def scenario_status_deadline(a):
    """A tiny deadline → DEADLINE_EXCEEDED; the case's slot is freed; a case beside it is fine."""
    with G.GrpcCluster(bins(a), a.workdir) as cl:
        cl.image_path = a.image
        one = cl.tenant("one-at-a-time", max_concurrent=1)
        good = cl.tenant("good", max_concurrent=8)
        cl.start(a.model, expert_extra=["--debug-delay-ms", "30"])
        image = png(a)
        bg = beside(cl, cl.client(good), image, "good case beside the deadlines")
        c = cl.client(one)
        G.expect_code(lambda: c.ask(QUESTION, image=image, max_tokens=64, timeout=0.3), "DEADLINE_EXCEEDED",
                      "Ask with a 300 ms deadline on a case of several seconds")
        # The server must drop the case at once: one-at-a-time's single slot is free again.
        wait_admitted(lambda: c.ask(QUESTION, max_tokens=2, timeout=30), 3, "the next case after the deadline")
        G.expect_code(lambda: c.ask_stream(QUESTION, image=image, max_tokens=64, timeout=0.5), "DEADLINE_EXCEEDED",
                      "AskStream with a 500 ms deadline")
        wait_admitted(lambda: c.ask(QUESTION, max_tokens=2, timeout=30), 3, "the next case after the stream's deadline")
        # The CLI says so too.
        p = run_cmd([a.cli, "ask", "--server", cl.target, "--key", one.key, "--image", a.image, "--question",
                     QUESTION, "--max-tokens", "64", "--timeout-ms", "300"], 30)
        if p.returncode != 1 or not p.stderr.startswith("medmoe: DEADLINE_EXCEEDED: "):
            raise TestFailure("medmoe --timeout-ms 300: exit %d, stderr %r" % (p.returncode, p.stderr))
        bg.join(120)
        log("the good case beside them was answered correctly")


# ---- 3. tenants -------------------------------------------------------------------------------------
def scenario_tenants(a):
    with G.GrpcCluster(bins(a), a.workdir) as cl:
        cl.image_path = a.image
        ta = cl.tenant("hospital-a", max_concurrent=4)
        tb = cl.tenant("hospital-b", max_concurrent=4)
        cl.start(a.model, expert_extra=["--debug-delay-ms", "5"])
        image = png(a)
        ca, cb = cl.client(ta), cl.client(tb)
        qa, qb = QUESTION, "Is there a fracture?"
        ref_a = G.reference(cl, qa, a.image, 12)
        ref_b = G.reference(cl, qb, None, 6)

        # Same case id from both tenants at once: each gets its own answer.
        results = {}

        def one(who, c, q, img, n, ref, i):
            ans = MC.to_dict(c.ask(q, image=img, max_tokens=n, case_id="same-id", timeout=60))
            G.check_answer(ans, ref, "%s case %d (case id 'same-id' on both tenants)" % (who, i), case_id="same-id")
            results[(who, i)] = True

        jobs = []
        for i in range(3):
            jobs.append(G.Background(lambda i=i: one("A", ca, qa, image, 12, ref_a, i), "tenant A case %d" % i))
            jobs.append(G.Background(lambda i=i: one("B", cb, qb, None, 6, ref_b, i), "tenant B case %d" % i))
        for j in jobs:
            j.join(90)
        log("6 interleaved cases with the same case id: each tenant got its own answers")

        # Alone, how long does one of B's cases take?
        t0 = time.monotonic()
        one("B", cb, qb, None, 6, ref_b, 99)
        alone = time.monotonic() - t0

        # B's case arriving while one of A's long cases runs joins the batch at the next step.
        long_a = iter(ca.ask_stream(qa, image=image, max_tokens=250, case_id="long-a", timeout=120))
        next(long_a)
        t0 = time.monotonic()
        one("B", cb, qb, None, 6, ref_b, 50)
        during = time.monotonic() - t0
        rest = sum(1 for _ in long_a)
        log("B's case took %.2f s while A's long case ran (%.2f s alone; A's case then sent %d more chunks)"
            % (during, alone, rest))
        if during > alone + 3.0:
            raise TestFailure("B's case took %.2f s while one of A's cases was generating, %.2f s alone: "
                              "it was not admitted until A's case ended" % (during, alone))

        # A floods: 40 concurrent asks, quota 4.
        codes = {}
        lock = threading.Lock()

        def flood(i):
            try:
                ca.ask(qa, image=image, max_tokens=12, case_id="flood-%d" % i, timeout=120)
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
            with lock:
                codes[code] = codes.get(code, 0) + 1

        floods = [threading.Thread(target=flood, args=(i,), daemon=True) for i in range(40)]
        for th in floods:
            th.start()
        # ... while B's cases complete promptly.
        worst = 0.0
        for i in range(3):
            t0 = time.monotonic()
            one("B", cb, qb, None, 6, ref_b, 100 + i)
            worst = max(worst, time.monotonic() - t0)
        for th in floods:
            th.join(120)
            if th.is_alive():
                raise TestFailure("tenant A's flood did not finish within 120 s")
        log("A's flood of 40: %s; B's cases: %.2f s each at worst (%.2f s alone)" % (codes, worst, alone))
        if set(codes) - {"OK", "RESOURCE_EXHAUSTED"}:
            raise TestFailure("A's flood got codes %s (only OK and RESOURCE_EXHAUSTED expected)" % codes)
        if codes.get("RESOURCE_EXHAUSTED", 0) < 1:
            raise TestFailure("40 concurrent cases over max_concurrent 4: none refused (%s)" % codes)
        if codes.get("OK", 0) < 1:
            raise TestFailure("A's flood: not one case admitted (%s)" % codes)
        limit = max(4 * alone, alone + 5.0)
        if worst > limit:
            raise TestFailure("B's cases took up to %.2f s during A's flood, %.2f s alone (limit %.2f s)"
                              % (worst, alone, limit))


# ---- 4. many streams; cancellation frees the slot ---------------------------------------------------
def scenario_stream32(a):
    with G.GrpcCluster(bins(a), a.workdir) as cl:
        cl.image_path = a.image
        t = cl.tenant("hospital-a", max_concurrent=64)
        cl.start(a.model)
        image = png(a)
        c = cl.client(t)
        qs = [(QUESTION, image, a.image, 16), ("Describe the findings.", None, None, 8)]
        refs = [G.reference(cl, q, ip, n) for q, _, ip, n in qs]

        def one(i):
            q, img, _, n = qs[i % 2]
            _, _, final = G.stream_answer(c.ask_stream(q, image=img, max_tokens=n, case_id="s%d" % i, timeout=120),
                                          "stream %d" % i)
            G.check_answer(final, refs[i % 2], "stream %d" % i, case_id="s%d" % i)

        t0 = time.monotonic()
        jobs = [G.Background(lambda i=i: one(i), "stream %d" % i) for i in range(32)]
        for j in jobs:
            j.join(150)
        log("32 concurrent streams correct in %.2f s" % (time.monotonic() - t0))


def scenario_cancel(a):
    """--slots 1, slow experts: cancel the running stream, the queued case is admitted at once."""
    with G.GrpcCluster(bins(a), a.workdir) as cl:
        cl.image_path = a.image
        t = cl.tenant("hospital-a", max_concurrent=8)
        audit = os.path.join(cl.workdir, "audit.jsonl")
        cl.start(a.model, router_extra=["--slots", "1", "--audit-log", audit],
                 expert_extra=["--debug-delay-ms", "40"])
        image = png(a)
        c = cl.client(t)
        ref = G.reference(cl, QUESTION, None, 4)
        # Alone: the short case's time.
        t0 = time.monotonic()
        G.check_answer(MC.to_dict(c.ask(QUESTION, max_tokens=4, timeout=60)), ref, "short case alone")
        alone = time.monotonic() - t0

        long_call = c.ask_stream(QUESTION, image=image, max_tokens=120, case_id="long", timeout=120)
        it = iter(long_call)
        next(it)  # admitted and generating: it holds the only slot
        t_start = time.monotonic()
        queued = G.Background(lambda: MC.to_dict(c.ask(QUESTION, max_tokens=4, case_id="queued", timeout=120)),
                              "the queued case")
        time.sleep(0.5)
        if queued.done_at is not None:
            raise TestFailure("the second case finished while the only slot was held (--slots 1 not honoured?)")
        # The long case's remaining time: ~120 steps x 2 MoE layers x 40 ms.
        long_call.cancel()
        t_cancel = time.monotonic()
        ans = queued.join(60)
        G.check_answer(ans, ref, "the queued case", case_id="queued")
        waited = queued.done_at - t_cancel
        log("queued case finished %.2f s after the cancel (%.2f s alone; the long case had %.1f s to go)"
            % (waited, alone, 120 * 2 * 0.04 - (t_cancel - t_start)))
        if waited > alone + 3.0:
            raise TestFailure("the queued case finished %.2f s after the cancel (alone it takes %.2f s): "
                              "the cancelled case's slot was not freed at once" % (waited, alone))
        try:
            for _ in it:
                pass
            raise TestFailure("the cancelled stream ended without an error")
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                raise TestFailure("the cancelled stream ended with %s, want CANCELLED" % e.code().name)
        # The audit log records the cancelled case (server side status CANCELLED).
        lines = wait_audit(audit, lambda recs: any(r.get("case_id") == "long" and r.get("event") == "end"
                                                   for r in recs), 5)
        st = [r.get("status") for r in lines if r.get("case_id") == "long" and r.get("event") == "end"]
        if st != ["CANCELLED"]:
            raise TestFailure("audit log: case 'long' has statuses %s, want ['CANCELLED']" % st)


# ---- 5. TLS ----------------------------------------------------------------------------------------
def make_pki(d):
    """CA, server cert (127.0.0.1 / localhost), client cert; and a second, untrusted CA."""
    os.makedirs(d, exist_ok=True)

    def ossl(*args):
        p = run_cmd(["openssl"] + list(args), 60)
        if p.returncode != 0:
            raise TestFailure("openssl %s failed: %s" % (" ".join(args[:2]), p.stderr[-800:]))

    for ca in ("ca", "rogue-ca"):
        ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=medmoe test %s" % ca,
             "-keyout", os.path.join(d, ca + ".key"), "-out", os.path.join(d, ca + ".pem"))
    ext = os.path.join(d, "server.ext")
    with open(ext, "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    cext = os.path.join(d, "client.ext")
    with open(cext, "w") as f:
        f.write("extendedKeyUsage=clientAuth\n")
    for name, ca, e in (("server", "ca", ext), ("client", "ca", cext), ("rogue-client", "rogue-ca", cext)):
        ossl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=%s" % name,
             "-keyout", os.path.join(d, name + ".key"), "-out", os.path.join(d, name + ".csr"))
        ossl("x509", "-req", "-in", os.path.join(d, name + ".csr"), "-CA", os.path.join(d, ca + ".pem"),
             "-CAkey", os.path.join(d, ca + ".key"), "-CAcreateserial", "-days", "2", "-extfile", e,
             "-out", os.path.join(d, name + ".pem"))
    return {k: os.path.join(d, k) for k in
            ("ca.pem", "rogue-ca.pem", "server.pem", "server.key", "client.pem", "client.key",
             "rogue-client.pem", "rogue-client.key")}


def scenario_tls(a):
    if not shutil.which("openssl"):
        raise TestFailure("the openssl command is missing (Debian package openssl)")
    pki = make_pki(os.path.join(a.workdir, "pki"))
    ref = None
    env = dict(os.environ, NODE_PATH=a.node_modules or "")
    for mutual in (False, True):
        with G.GrpcCluster(bins(a), os.path.join(a.workdir, "mtls" if mutual else "tls")) as cl:
            cl.image_path = a.image
            t = cl.tenant("hospital-a", max_concurrent=8)
            tls = {"cert": pki["server.pem"], "key": pki["server.key"], "ca": pki["ca.pem"]}
            if mutual:
                tls.update(client_ca=pki["ca.pem"], client_cert=pki["client.pem"], client_key=pki["client.key"])
            cl.start(a.model, tls=tls)
            ref = G.reference(cl, QUESTION, a.image, 8)
            image = png(a)
            what = "mTLS" if mutual else "TLS"

            def ok(ctls, label):
                c = cl.client(t, tls=ctls)
                G.check_answer(MC.to_dict(c.ask(QUESTION, image=image, max_tokens=8, timeout=30)), ref,
                               "%s: %s" % (what, label))
                log("%s: %s: answered correctly" % (what, label))

            def refused(ctls, label):
                c = cl.client(t, tls=ctls)
                G.expect_code(lambda: c.ask(QUESTION, image=image, max_tokens=8, timeout=10), "UNAVAILABLE",
                              "%s: %s" % (what, label))

            good = {"ca": pki["ca.pem"]}
            if mutual:
                good.update(cert=pki["client.pem"], key=pki["client.key"])
            ok(good, "client with the CA" + (" and its certificate" if mutual else ""))
            refused({}, "client without the CA (system roots)")
            refused({"ca": pki["rogue-ca.pem"]}, "client trusting another CA")
            refused(None, "plaintext client")
            if mutual:
                refused({"ca": pki["ca.pem"]}, "client without a certificate")
                refused({"ca": pki["ca.pem"], "cert": pki["rogue-client.pem"], "key": pki["rogue-client.key"]},
                        "client with a certificate from another CA")
            # The C CLI (and Node, when its modules are there) the same way.
            base = [a.cli, "ask", "--server", cl.target, "--key", t.key, "--image", a.image, "--question", QUESTION,
                    "--max-tokens", "8", "--timeout-ms", "20000", "--tls-ca", pki["ca.pem"]]
            mt = ["--tls-cert", pki["client.pem"], "--tls-key", pki["client.key"]] if mutual else []
            p = run_cmd(base + mt, 40)
            if p.returncode != 0 or p.stdout != ref["answer"] + "\n":
                raise TestFailure("%s: medmoe CLI with the CA: exit %d, %r (%s)" % (what, p.returncode, p.stdout, p.stderr))
            p = run_cmd(base[:-2] + ["--tls"], 40)
            if p.returncode != 1 or "UNAVAILABLE" not in p.stderr:
                raise TestFailure("%s: medmoe CLI without the CA: exit %d, stderr %r" % (what, p.returncode, p.stderr))
            if mutual:
                p = run_cmd(base, 40)
                if p.returncode != 1 or "UNAVAILABLE" not in p.stderr:
                    raise TestFailure("mTLS: medmoe CLI without a certificate: exit %d, stderr %r"
                                      % (p.returncode, p.stderr))
            if a.node_modules and os.path.isdir(os.path.join(a.node_modules, "@grpc", "grpc-js")):
                nb = ["node", G.NODE_CLIENT, "ask", "--server", cl.target, "--key", t.key, "--image", a.image,
                      "--question", QUESTION, "--max-tokens", "8", "--timeout-ms", "20000", "--tls-ca", pki["ca.pem"]]
                p = run_cmd(nb + mt, 40, env=env)
                if p.returncode != 0 or p.stdout != ref["answer"] + "\n":
                    raise TestFailure("%s: node client with the CA: exit %d, %r (%s)"
                                      % (what, p.returncode, p.stdout, p.stderr))
                log("%s: node client with the CA: answered correctly" % what)


# ---- 6. audit log ----------------------------------------------------------------------------------
def read_audit(path):
    try:
        with open(path, encoding="utf-8", errors="strict") as f:
            text = f.read()
    except FileNotFoundError:
        return [], ""
    recs = []
    for i, line in enumerate(text.splitlines()):
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise TestFailure("audit log line %d is not JSON (%s): %.300s" % (i + 1, e, line))
        if not isinstance(r, dict):
            raise TestFailure("audit log line %d is not a JSON object: %.300s" % (i + 1, line))
        recs.append(r)
    if text and not text.endswith("\n"):
        raise TestFailure("audit log does not end with a newline (a record was not flushed whole)")
    return recs, text


def wait_audit(path, pred, timeout):
    deadline = time.monotonic() + timeout
    while True:
        recs, _ = read_audit(path)
        if pred(recs):
            return recs
        if time.monotonic() > deadline:
            raise TestFailure("audit log %s: the expected records did not appear within %d s (has %d lines)"
                              % (path, timeout, len(recs)))
        time.sleep(0.05)


def scenario_audit(a):
    with G.GrpcCluster(bins(a), a.workdir) as cl:
        cl.image_path = a.image
        t = cl.tenant("hospital-a", max_concurrent=8)
        t2 = cl.tenant("hospital-b", max_concurrent=1)
        audit = os.path.join(cl.workdir, "audit.jsonl")
        # Experts that take 20 ms a batch: the case given a 50 ms deadline below must still be
        # running when it expires (the cpu kernels answer this tiny case in ~30 ms otherwise).
        cl.start(a.model, router_extra=["--audit-log", audit], expert_extra=["--debug-delay-ms", "20"])
        image = png(a)
        secret = "Zebra-quokka 7431 secret patient question: what modality is this image?"
        ref = G.reference(cl, secret, a.image, MAX_TOKENS)
        ref_c = G.reference(cl, secret, a.image, candidates=CANDIDATES)
        c = cl.client(t)
        expect = {}  # case_id -> (tenant, method, status)

        ans = c.ask(secret, image=image, max_tokens=MAX_TOKENS, case_id="au-ask", timeout=60)
        G.check_answer(MC.to_dict(ans), ref, "audit: Ask", case_id="au-ask")
        expect["au-ask"] = ("hospital-a", "Ask", "OK")
        G.stream_answer(c.ask_stream(secret, image=image, max_tokens=MAX_TOKENS, case_id="au-stream", timeout=60),
                        "audit: AskStream")
        expect["au-stream"] = ("hospital-a", "AskStream", "OK")
        G.check_classify(MC.to_dict(c.classify(secret, CANDIDATES, image=image, case_id="au-cls", timeout=60)),
                         ref_c, "audit: Classify", case_id="au-cls")
        expect["au-cls"] = ("hospital-a", "Classify", "OK")
        G.expect_code(lambda: c.ask(secret, image=b"not an image" * 20, media_type="image/png", case_id="au-bad",
                                    timeout=20), "INVALID_ARGUMENT", "audit: undecodable image")
        expect["au-bad"] = ("hospital-a", "Ask", "INVALID_ARGUMENT")
        # Unauthenticated calls: no per-call record; one "unauthenticated" record per client
        # address per interval (written at the latest at shutdown), counting them.
        bad = cl.client("f" * 64)
        for k in range(5):
            G.expect_code(lambda: bad.ask(secret, case_id="au-unauth", timeout=20), "UNAUTHENTICATED",
                          "audit: unknown key (%d)" % k)
        G.expect_code(lambda: c.ask(secret, image=image, max_tokens=64, case_id="au-late", timeout=0.05),
                      "DEADLINE_EXCEEDED", "audit: a 50 ms deadline")
        expect["au-late"] = ("hospital-a", "Ask", "DEADLINE_EXCEEDED")

        def ends(rs):
            return {r.get("case_id") for r in rs if r.get("event") == "end"}

        recs = wait_audit(audit, lambda rs: ends(rs) >= set(expect), 10)
        cl.stop_router()  # SIGTERM: clean shutdown, the log flushed
        recs, text = read_audit(audit)
        # one record per 10 s interval (a slow run may span two), together counting the 5 calls
        unauth = [r for r in recs if r.get("event") == "unauthenticated"]
        if not 1 <= len(unauth) <= 2 or sum(r.get("calls", 0) for r in unauth) != 5 \
                or any(r.get("peer") != "ipv4:127.0.0.1" or set(r.get("methods", {})) != {"Ask"} for r in unauth):
            raise TestFailure("audit log: unauthenticated records %s, want one (or two) for ipv4:127.0.0.1 counting "
                              "5 Ask calls" % unauth)
        if "au-unauth" in text:
            raise TestFailure("audit log: an unauthenticated call's case id was written")
        recs = [r for r in recs if r.get("event") != "unauthenticated"]
        if secret in text or "Zebra-quokka" in text or "7431 secret" in text:
            raise TestFailure("the audit log contains the question text:\n%s" % text[:2000])
        if len(ref["answer"]) >= 12 and ref["answer"] in text:
            raise TestFailure("the audit log contains the answer text %r" % ref["answer"])
        if t.key in text or t2.key in text:
            raise TestFailure("the audit log contains an API key")
        by_id, admitted = {}, {}
        for r in recs:
            for k in ("time", "event", "tenant", "case_id", "method", "peer") + (("status",) if r["event"] == "end" else ()):
                if k not in r:
                    raise TestFailure("audit record without %r: %s" % (k, json.dumps(r)))
            if not re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$", str(r["time"])):
                raise TestFailure("audit record time %r is not an RFC 3339 UTC time" % r["time"])
            if not re.match(r"^ipv4:127\.0\.0\.1:\d+$", r["peer"]):
                raise TestFailure("audit record peer %r, want the client's ipv4:127.0.0.1:PORT" % r["peer"])
            if r["event"] == "admitted":
                admitted.setdefault(r["case_id"], []).append(r)
            elif r["event"] == "end":
                by_id.setdefault(r["case_id"], []).append(r)
            else:
                raise TestFailure("audit record with event %r: %s" % (r["event"], json.dumps(r)))
        if sum(map(len, by_id.values())) != len(expect):
            raise TestFailure("audit log has %d end records for %d cases: %s"
                              % (sum(map(len, by_id.values())), len(expect), sorted(by_id)))
        for cid, (tenant, method, status) in expect.items():
            rs = by_id.get(cid, [])
            if len(rs) != 1:
                raise TestFailure("audit log: %d end records for case %r, want 1" % (len(rs), cid))
            r = rs[0]
            ad = admitted.get(cid, [])
            if cid == "au-bad":  # refused at the front door (not PNG bytes): never admitted
                if ad or "seq" in r:
                    raise TestFailure("audit log: au-bad was refused before admission, records %s %s" % (ad, r))
                continue
            if len(ad) != 1 or (ad[0]["run"], ad[0]["seq"]) != (r.get("run"), r.get("seq")) \
                    or ad[0]["tenant"] != r["tenant"] or recs.index(ad[0]) > recs.index(r):
                raise TestFailure("audit log: case %r: admitted records %s do not match its end %s"
                                  % (cid, ad, json.dumps(r)))
            if r["status"] != status or r["method"] != method:
                raise TestFailure("audit log: case %r has method %r status %r, want %r %r"
                                  % (cid, r["method"], r["status"], method, status))
            if tenant is not None and r["tenant"] != tenant:
                raise TestFailure("audit log: case %r has tenant %r, want %r" % (cid, r["tenant"], tenant))
            if tenant is None and r["tenant"] not in ("", "unknown", None):
                raise TestFailure("audit log: the unauthenticated case is logged for tenant %r" % r["tenant"])
        r = by_id["au-ask"][0]
        if r.get("prompt_tokens") != ref["prompt_len"] or r.get("generated_tokens") != len(ref["tokens"]):
            raise TestFailure("audit log: au-ask prompt_tokens %r generated_tokens %r, want %d %d"
                              % (r.get("prompt_tokens"), r.get("generated_tokens"), ref["prompt_len"],
                                 len(ref["tokens"])))
        G.check_routing(r.get("experts", []), ref, "audit log: au-ask experts")
        for k in ("queue_ms", "ttft_ms", "total_ms"):
            if not isinstance(r.get(k), (int, float)) or r[k] < 0:
                raise TestFailure("audit log: au-ask %s = %r" % (k, r.get(k)))
        log("audit log: admitted + end per case, one aggregated unauthenticated record, no question/answer/key "
            "text (%d lines)" % len(recs))


def scenario_audit_crash(a):
    """Cases in flight when the router is killed (-9) leave their "admitted" records (written as
    each was admitted); the restarted router reports each as admitted and never finished, in its
    log and as an "unfinished" audit record."""
    with G.GrpcCluster(bins(a), a.workdir) as cl:
        cl.image_path = a.image
        t = cl.tenant("hospital-a", max_concurrent=8)
        audit = os.path.join(cl.workdir, "audit.jsonl")
        cl.start(a.model, router_extra=["--audit-log", audit], expert_extra=["--debug-delay-ms", "40"])
        c = cl.client(t)
        done = cl.client(t).ask(QUESTION, max_tokens=2, case_id="finished", timeout=60)
        ids = ["crash-%d" % k for k in range(3)]
        streams = [c.ask_stream(QUESTION, image=png(a), max_tokens=200, case_id=cid, timeout=120) for cid in ids]
        for s in streams:  # each case has started streaming: admitted and in the scheduler
            next(iter(s))

        def admitted(rs):
            return {r.get("case_id") for r in rs if r.get("event") == "admitted"}

        wait_audit(audit, lambda rs: admitted(rs) >= set(ids), 10)
        old = cl.router
        old.kill()
        log("router killed (-9) with %s in flight" % ids)
        for s in streams:
            s.cancel()
        recs, _ = read_audit(audit)
        ends = {r.get("case_id") for r in recs if r.get("event") == "end"}
        if ends & set(ids) or "finished" not in ends or done.case_id != "finished":
            raise TestFailure("audit log before the restart: end records for %s, want 'finished' and none of %s"
                              % (sorted(ends), ids))
        adm = {r["case_id"]: r for r in recs if r.get("event") == "admitted"}
        cl.start(a.model, router_extra=["--audit-log", audit], expert_extra=["--debug-delay-ms", "40"])
        recs = wait_audit(audit, lambda rs: {r.get("case_id") for r in rs if r.get("event") == "unfinished"}
                          >= set(ids), 10)
        unf = [r for r in recs if r.get("event") == "unfinished"]
        if sorted(r["case_id"] for r in unf) != sorted(ids):
            raise TestFailure("unfinished records for %s, want exactly %s" % ([r["case_id"] for r in unf], ids))
        text = cl.router.log_text()
        for r in unf:
            want = adm[r["case_id"]]
            if (r.get("run"), r.get("seq"), r.get("admitted_at"), r.get("peer"), r.get("tenant")) != \
                    (want["run"], want["seq"], want["time"], want["peer"], want["tenant"]):
                raise TestFailure("unfinished record %s does not match the admitted one %s" % (r, want))
            line = "case '%s' (tenant hospital-a" % r["case_id"]
            if line not in text or ("admitted at %s never finished" % want["time"]) not in text:
                raise TestFailure("the restarted router's log does not say %r ... admitted at %s never finished:\n%s"
                                  % (line, want["time"], text[-3000:]))
        log("restart: %d cases admitted at %s never finished, logged and recorded"
            % (len(unf), [adm[i]["time"] for i in ids]))
        # the new run serves, and a clean stop leaves nothing unfinished of its own
        good_case(cl, cl.client(t), png(a), "a case after the restart", case_id="after")
        cl.stop_router()
        recs, _ = read_audit(audit)
        if [r for r in recs if r.get("event") == "unfinished"] != unf:
            raise TestFailure("unfinished records changed after a clean stop")


# ---- 7. robustness ---------------------------------------------------------------------------------
def scenario_robust(a):
    with G.GrpcCluster(bins(a), a.workdir) as cl:
        cl.image_path = a.image
        t = cl.tenant("hospital-a", max_concurrent=8)
        cl.start(a.model, router_extra=["--slots", "1", "--grpc-max-message", str(32 << 20)],
                 expert_extra=["--debug-delay-ms", "20"])
        image = png(a)
        c = cl.client(t)
        md = c.metadata()
        raw = grpc.insecure_channel(cl.target, options=[("grpc.max_send_message_length", -1)])
        cl.clients.append(raw)

        def alive(what):
            if not cl.router.alive():
                raise TestFailure("router died after %s\n%s" % (what, cl.router.describe()))
            if c.health(timeout=5) != "SERVING":
                raise TestFailure("router not SERVING after %s" % what)

        garbage = [b"\xff" * 7, b"\x0a\xff\xff\xff\xff\x0f", bytes(range(256)) * 4,
                   c.case_request(QUESTION, image=image).SerializeToString()[:-7],  # truncated
                   b"\x12\x05\x0a\x03abc\x1a"]  # nested field cut short
        for m in ("Ask", "Classify"):
            call = raw.unary_unary("/medmoe.v1.CaseService/" + m)
            for i, g in enumerate(garbage):
                G.expect_code(lambda: call(g, timeout=20, metadata=md), "INVALID_ARGUMENT",
                              "%s with malformed protobuf bytes #%d" % (m, i))
        sc = raw.unary_stream("/medmoe.v1.CaseService/AskStream")
        G.expect_code(lambda: sc(garbage[0], timeout=20, metadata=md), "INVALID_ARGUMENT",
                      "AskStream with malformed protobuf bytes")
        G.expect_code(lambda: raw.unary_unary("/medmoe.v1.CaseService/NoSuchMethod")(b"", timeout=20, metadata=md),
                      "UNIMPLEMENTED", "an unknown method")
        alive("malformed requests")
        good_case(cl, c, image, "Ask after malformed requests", max_tokens=4)

        # 100 MB: refused by gRPC's receive limit, the server keeps serving.
        big = c.case_request(QUESTION, image=b"\0" * (100 << 20)).SerializeToString()
        t0 = time.monotonic()
        G.expect_code(lambda: raw.unary_unary("/medmoe.v1.CaseService/Ask")(big, timeout=60, metadata=md),
                      "RESOURCE_EXHAUSTED", "a 100 MB request")
        log("100 MB request refused in %.2f s" % (time.monotonic() - t0))
        big = None  # noqa: F841 (free the 100 MB)
        alive("a 100 MB request")
        good_case(cl, c, image, "Ask after the 100 MB request", max_tokens=4)

        # A client killed mid-stream: the server keeps serving and frees the (only) slot.
        ref = G.reference(cl, QUESTION, None, 4)
        t0 = time.monotonic()
        G.check_answer(MC.to_dict(c.ask(QUESTION, max_tokens=4, timeout=60)), ref, "short case alone")
        alone = time.monotonic() - t0
        script = os.path.join(G.ROOT, "clients", "python", "medmoe_client.py")
        victim = D.Proc("client-killed", [D.PYTHON, "-u", script, "ask", "--server", cl.target, "--key", t.key,
                                          "--image", a.image, "--question", QUESTION, "--max-tokens", "200",
                                          "--stream", "--stubs", cl.stub_dir],
                        cl.workdir, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        cl.procs.append(victim)
        os.set_blocking(victim.p.stdout.fileno(), False)
        deadline = time.monotonic() + 30
        got = b""
        while not got and time.monotonic() < deadline:
            try:
                got = victim.p.stdout.read() or b""
            except BlockingIOError:
                pass
            if not victim.alive():
                raise TestFailure("the streaming client exited before its first piece\n%s" % victim.describe())
            time.sleep(0.05)
        if not got:
            raise TestFailure("the streaming client printed nothing within 30 s\n%s" % victim.describe())
        victim.kill()
        t_kill = time.monotonic()
        log("killed the streaming client mid-stream (it had printed %r)" % got[:40])
        ans = c.ask(QUESTION, max_tokens=4, timeout=60)
        G.check_answer(MC.to_dict(ans), ref, "Ask after a client died mid-stream")
        waited = time.monotonic() - t_kill
        # 200 tokens x 2 MoE layers x 20 ms = 8 s left for the dead client's case.
        if waited > alone + 3.0:
            raise TestFailure("with --slots 1 the next case took %.2f s after the client was killed (%.2f s "
                              "alone): the dead client's case kept its slot" % (waited, alone))
        log("the next case was admitted and answered %.2f s after the kill" % waited)
        alive("a client killed mid-stream")


# ---- 8. one engine: threads that do not wait on each other ------------------------------------------
def metrics_port(cl, path, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                s = f.read().strip()
            if s.isdigit():
                return int(s)
        except FileNotFoundError:
            pass
        if not cl.router.alive():
            raise TestFailure("router exited before writing --metrics-port-file\n%s" % cl.router.describe())
        time.sleep(0.02)
    raise TestFailure("no --metrics-port-file within %d s" % timeout)


def gauge(port, name):
    import urllib.request
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=5) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise TestFailure("/metrics has no %s:\n%s" % (name, text[:1500]))


def wait_in_image_stage(port, bg, timeout=20):
    """Until the scheduler holds a case that is not running yet (medmoe_queue_depth >= 1): the
    image case `bg` sent just before is in the image stage."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if bg.done_at is not None:
            raise TestFailure("the image case ended before it was seen in the image stage (%r)" % bg.error)
        if gauge(port, "medmoe_queue_depth") >= 1:
            return
        time.sleep(0.02)
    raise TestFailure("medmoe_queue_depth never reached 1 within %d s of sending the image case" % timeout)


def start_slow_vision(cl, a, delay_ms):
    """Tenants A and B; a router whose every vision encode sleeps delay_ms, one image worker, metrics."""
    cl.image_path = a.image
    ta = cl.tenant("hospital-a", max_concurrent=8)
    tb = cl.tenant("hospital-b", max_concurrent=8)
    mport = os.path.join(a.workdir, "metrics.port")
    cl.start(a.model, router_extra=["--debug-vision-delay-ms", str(delay_ms), "--image-workers", "1",
                                    "--metrics-listen", "127.0.0.1:0", "--metrics-port-file", mport])
    return ta, tb, metrics_port(cl, mport)


def scenario_slow_image(a):
    """An image that takes 5 s in the image stage delays no other tenant's text-only case."""
    with G.GrpcCluster(bins(a), a.workdir) as cl:
        ta, tb, mport = start_slow_vision(cl, a, 5000)
        ca, cb = cl.client(ta), cl.client(tb)
        qb = "Is there a fracture?"
        ref_a = G.reference(cl, QUESTION, a.image, 8)
        ref_b = G.reference(cl, qb, None, 6)

        def b_case(what):
            t0 = time.monotonic()
            ans = MC.to_dict(cb.ask(qb, max_tokens=6, case_id="b", timeout=60))
            G.check_answer(ans, ref_b, what, case_id="b")
            return time.monotonic() - t0

        b_case("B warm-up")
        times = sorted(b_case("B alone %d" % i) for i in range(3))
        alone = times[1]
        t_a = time.monotonic()
        bg = G.Background(lambda: MC.to_dict(ca.ask(QUESTION, image=png(a), max_tokens=8, case_id="slow-a",
                                                      timeout=90)), "A's slow image case")
        wait_in_image_stage(mport, bg)
        during = b_case("B while A's image is in the image stage")
        a_pending = bg.done_at is None
        ans_a = bg.join(60)
        a_took = bg.done_at - t_a
        log("B's text-only case: %.3f s alone (median of 3), %.3f s while A's image was encoding; "
            "A's case took %.2f s" % (alone, during, a_took))
        G.check_answer(ans_a, ref_a, "A's slow image case", case_id="slow-a")
        if a_took < 5.0:
            raise TestFailure("A's image case took %.2f s with --debug-vision-delay-ms 5000: the delay did not "
                              "apply, the test proves nothing" % a_took)
        if not a_pending:
            raise TestFailure("B's case ended after A's (%.2f s): it waited for A's image" % during)
        if during > alone + 1.0:
            raise TestFailure("B's text-only case took %.3f s while A's image was in the image stage, %.3f s "
                              "alone (limit +1 s)" % (during, alone))


def scenario_slow_image_30s(a):
    """A 30 s vision encode: no expert is dropped, other cases keep decoding, the slow case ends."""
    with G.GrpcCluster(bins(a), a.workdir) as cl:
        ta, tb, mport = start_slow_vision(cl, a, 30000)
        ca, cb = cl.client(ta), cl.client(tb)
        qb = "Describe the findings."
        ref_a = G.reference(cl, QUESTION, a.image, 8)
        ref_b = G.reference(cl, qb, None, 8)
        joins = {k: len(D.router_joined_re(k).findall(cl.router.log_text())) for k in range(4)}
        t_a = time.monotonic()
        bg = G.Background(lambda: MC.to_dict(ca.ask(QUESTION, image=png(a), max_tokens=8, case_id="slow-a",
                                                      timeout=120)), "A's 30 s image case")
        wait_in_image_stage(mport, bg)
        done = streamed = infos = 0
        while bg.done_at is None and time.monotonic() - t_a < 100:
            G.check_answer(MC.to_dict(cb.ask(qb, max_tokens=8, case_id="b%d" % done, timeout=30)), ref_b,
                           "B's case %d during A's encode" % done, case_id="b%d" % done)
            done += 1
            if done % 5 == 0:
                _, _, final = G.stream_answer(cb.ask_stream(qb, max_tokens=8, case_id="s", timeout=30),
                                              "B's stream during A's encode")
                G.check_answer(final, ref_b, "B's stream during A's encode", case_id="s")
                streamed += 1
                info = cb.server_info(timeout=10)
                live = sorted((int(x.expert), int(x.live_replicas)) for x in info.experts)
                if live != [(k, 1) for k in range(4)]:
                    raise TestFailure("GetServerInfo %.1f s into A's encode: (expert, live replicas) %s, want one "
                                      "of each\n%s" % (time.monotonic() - t_a, live, cl.router.describe()))
                infos += 1
        ans_a = bg.join(30)
        a_took = bg.done_at - t_a
        G.check_answer(ans_a, ref_a, "A's 30 s image case", case_id="slow-a")
        log("during A's %.1f s case: %d Ask + %d AskStream cases of B answered correctly, %d GetServerInfo "
            "with every expert live" % (a_took, done, streamed, infos))
        if a_took < 30.0:
            raise TestFailure("A's case took %.1f s with --debug-vision-delay-ms 30000" % a_took)
        if infos < 2:
            raise TestFailure("only %d GetServerInfo checks during the encode (B's cases too slow?)" % infos)
        text = cl.router.log_text()
        bad = [ln for ln in text.splitlines() if re.search(r"\bleft:|quarantin", ln)]
        if bad:
            raise TestFailure("the router dropped or quarantined replicas during the encode:\n  %s"
                              % "\n  ".join(bad[:10]))
        again = {k: len(D.router_joined_re(k).findall(text)) for k in range(4)}
        if again != joins:
            raise TestFailure("experts joined again during the encode (joins before %s, after %s)" % (joins, again))
        for e in cl.experts:
            if not e.alive():
                raise TestFailure("%s exited during the encode\n%s" % (e.name, e.describe()))
        cl.wait_health("SERVING", 10)


def scenario_one_engine(a):
    """medmoe-run --json, the router's --cases and gRPC give the same tokens, routing and logits."""
    cases = [{"id": "img", "image": a.image, "question": QUESTION, "max_tokens": 16},
             {"id": "text", "question": "Describe the findings.", "max_tokens": 8},
             {"id": "cls", "image": a.image, "question": QUESTION, "candidates": ",".join(CANDIDATES),
              "max_tokens": 0}]
    refs = {c["id"]: D.reference(a.run, a.model, {k: v for k, v in c.items() if k != "id"}, a.workdir)
            for c in cases}
    # medmoe-run's logits of the image case, for the router's dump_logits
    ref_logits = os.path.join(a.workdir, "run-img.f32")
    p = run_cmd([a.run, "--model", a.model, "--vision", os.path.join(a.model, "clip"), "--json",
                 "--dump-logits", ref_logits] + D.case_run_args(cases[0]), 60)
    if p.returncode != 0:
        raise TestFailure("medmoe-run --dump-logits: exit %d: %s" % (p.returncode, p.stderr[-1500:]))
    with open(os.path.join(a.model, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]

    cases_out = {}
    with D.Cluster(bins(a), os.path.join(a.workdir, "cases")) as cl:
        cl.start_router(a.model)
        for k in range(4):
            cl.start_expert(a.model, k)
        got_logits = os.path.join(cl.workdir, "router-img.f32")
        for c in cases:
            case = dict(c, dump_logits=got_logits) if c["id"] == "img" else c
            ans = cl.router.ask(case, 60)
            D.check_equal(ans, refs[c["id"]][1], cl.workdir, "--cases %s" % c["id"])
            cases_out[c["id"]] = ans
        cl.finish_router()
        got_img = os.path.join(cl.workdir, "answer-img.json")
        with open(got_img, "w") as f:
            json.dump(cases_out["img"], f)
        cmp = run_cmd([D.PYTHON, D.COMPARE, refs["img"][1], got_img,
                       "--logits", ref_logits, got_logits, "--vocab", str(vocab)], 60)
        if cmp.returncode != 0:
            raise TestFailure("--cases dump_logits differs from medmoe-run --dump-logits: %s" % cmp.stdout.strip())
        log("--cases dump_logits equal to medmoe-run --dump-logits (%s)" % cmp.stdout.strip())

    with G.GrpcCluster(bins(a), os.path.join(a.workdir, "grpc")) as cl:
        cl.image_path = a.image
        t = cl.tenant("hospital-a", max_concurrent=8)
        cl.start(a.model)
        c = cl.client(t)
        image = png(a)
        ans = MC.to_dict(c.ask(QUESTION, image=image, max_tokens=16, case_id="img", timeout=60))
        G.check_answer(ans, refs["img"][0], "gRPC Ask (image)", case_id="img")
        _, _, fin = G.stream_answer(c.ask_stream(QUESTION, image=image, max_tokens=16, case_id="img-s",
                                                 timeout=60), "gRPC AskStream (image)")
        G.check_answer(fin, refs["img"][0], "gRPC AskStream (image)", case_id="img-s")
        ans_t = MC.to_dict(c.ask("Describe the findings.", max_tokens=8, case_id="text", timeout=60))
        G.check_answer(ans_t, refs["text"][0], "gRPC Ask (text only)", case_id="text")
        res = MC.to_dict(c.classify(QUESTION, CANDIDATES, image=image, case_id="cls", timeout=60))
        G.check_classify(res, refs["cls"][0], "gRPC Classify", case_id="cls")
        for cid, g in (("img", ans), ("text", ans_t)):
            if [int(x) for x in g["tokens"]] != cases_out[cid]["tokens"]:
                raise TestFailure("case %s: gRPC tokens %s, --cases tokens %s" % (cid, g["tokens"],
                                                                                 cases_out[cid]["tokens"]))
        if [x["text"] for x in res["candidates"]] != [x["text"] for x in cases_out["cls"]["candidates"]]:
            raise TestFailure("Classify ranking differs between gRPC and --cases")
    log("medmoe-run, --cases and gRPC: same tokens, routing, candidates and logits")


def scenario_node_deps(a):
    """npm ci into the build tree (the package-lock pins @grpc/grpc-js and @grpc/proto-loader)."""
    dst = os.path.dirname(a.node_modules.rstrip("/"))
    src = os.path.join(G.ROOT, "clients", "node")
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "package-lock.json"), "rb") as f:
        lock = f.read()
    stamp = os.path.join(dst, "lock.sha256")
    digest = hashlib.sha256(lock).hexdigest()
    if os.path.exists(stamp) and open(stamp).read() == digest and os.path.isdir(a.node_modules):
        log("node_modules up to date (%s)" % a.node_modules)
        return
    for n in ("package.json", "package-lock.json"):
        shutil.copy(os.path.join(src, n), os.path.join(dst, n))
    p = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--ignore-scripts"], cwd=dst,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=280)
    if p.returncode != 0:
        raise TestFailure("npm ci in %s failed (%d):\n%s" % (dst, p.returncode, p.stdout[-3000:]))
    with open(stamp, "w") as f:
        f.write(digest)
    log("npm ci: %s" % p.stdout.strip().splitlines()[-1] if p.stdout.strip() else "npm ci: done")


SCENARIOS = {
    "python": scenario_python, "node": scenario_node, "cli": scenario_cli,
    "status_auth": scenario_status_auth, "status_invalid": scenario_status_invalid, "strict": scenario_strict,
    "stream_contract": scenario_stream_contract,
    "status_unavailable": scenario_status_unavailable, "status_deadline": scenario_status_deadline,
    "tenants": scenario_tenants, "stream32": scenario_stream32, "cancel": scenario_cancel,
    "tls": scenario_tls, "audit": scenario_audit, "audit_crash": scenario_audit_crash, "robust": scenario_robust, "node_deps": scenario_node_deps,
    "slow_image": scenario_slow_image, "slow_image_30s": scenario_slow_image_30s, "one_engine": scenario_one_engine,
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenario", required=True, choices=sorted(SCENARIOS))
    ap.add_argument("--router")
    ap.add_argument("--expert")
    ap.add_argument("--run")
    ap.add_argument("--cli")
    ap.add_argument("--keygen")
    ap.add_argument("--model")
    ap.add_argument("--image")
    ap.add_argument("--workdir")
    ap.add_argument("--node-modules")
    a = ap.parse_args()
    if a.scenario != "node_deps":
        a.workdir = D.fresh_dir(a.workdir)
    D.main_wrapper(lambda: SCENARIOS[a.scenario](a))


if __name__ == "__main__":
    main()
