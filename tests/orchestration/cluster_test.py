#!/usr/bin/python3
"""medmoe-cluster end to end on the tiny checkpoint (gRPC front door on ephemeral ports):

  up -> status -> a case answered over gRPC, equal to medmoe-run -> kill -9 an expert the case
  uses -> the supervisor restarts it, the router sees it live again, the case still answers ->
  scale that expert 1 -> 2 -> 1 while two clients keep asking (no case may fail, every answer
  equal to medmoe-run) -> down (every process gone, pid files removed).

Every wait is bounded; `down` (and SIGKILL of anything in the pid files) runs also on failure.
"""

import argparse
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "clients", "python"))
PY = "/usr/bin/python3"


class Fail(Exception):
    pass


def log(msg):
    print("orch: " + msg, flush=True)


def tail(path, n=30):
    try:
        with open(path, errors="replace") as f:
            return "\n".join("    | " + x for x in f.read().splitlines()[-n:])
    except OSError:
        return "    (no %s)" % path


class Cluster:
    def __init__(self, script, cfg_path, workdir):
        self.script = script
        self.cfg_path = cfg_path
        self.workdir = workdir

    def run(self, *args, timeout=90, check=True):
        cmd = [PY, self.script] + list(args) + ["--config", self.cfg_path]
        try:
            p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise Fail("%s did not return within %d s" % (" ".join(cmd), timeout))
        out = p.stdout.strip()
        if check and p.returncode != 0:
            raise Fail("medmoe-cluster %s: exit %d:\n%s\n%s" % (" ".join(args), p.returncode, out, self.logs()))
        return p.returncode, out

    def status(self):
        rc, out = self.run("status", "--json", check=False)
        try:
            return json.loads(out)
        except json.JSONDecodeError:
            raise Fail("status --json printed no JSON (exit %d):\n%s" % (rc, out))

    def logs(self):
        d = os.path.join(self.workdir, "logs")
        parts = []
        for n in sorted(os.listdir(d)) if os.path.isdir(d) else []:
            parts.append("  %s:\n%s" % (n, tail(os.path.join(d, n), 15)))
        return "\n".join(parts)

    def kill_all(self):
        """Last resort after `down`: SIGKILL anything left in the pid files."""
        pids = os.path.join(self.workdir, "state", "pids")
        for n in os.listdir(pids) if os.path.isdir(pids) else []:
            try:
                with open(os.path.join(pids, n)) as f:
                    pid = int(f.read())
                os.kill(pid, signal.SIGKILL)
                log("killed leftover %s (pid %d)" % (n, pid))
            except (OSError, ValueError):
                pass
        sp = os.path.join(self.workdir, "state", "supervisor.pid")
        try:
            with open(sp) as f:
                os.kill(int(f.read()), signal.SIGKILL)
        except (OSError, ValueError):
            pass


def reference(run_bin, model, image, question, max_tokens, workdir):
    cmd = [run_bin, "--model", model, "--vision", os.path.join(model, "clip"), "--json",
           "--image", image, "--question", question, "--max-tokens", str(max_tokens)]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60,
                       env=dict(os.environ, MEDMOE_THREADS="1"))
    if p.returncode != 0:
        raise Fail("medmoe-run failed (%d): %s" % (p.returncode, p.stderr[-1500:]))
    text = p.stdout
    ref = json.loads(text[text.index("{"):])
    with open(os.path.join(workdir, "reference.json"), "w") as f:
        json.dump(ref, f, indent=1)
    return ref


def experts_by_use(ref):
    """Experts the case's tokens were routed to, most used first."""
    count = {}
    for r in ref.get("routing", []):
        for pos in r["experts"]:
            for e in pos:
                count[e] = count.get(e, 0) + 1
    return sorted(count, key=lambda e: (-count[e], e))


def check_answer(ans, ref, what):
    toks = list(ans.tokens)
    if toks != ref["tokens"] or ans.answer != ref["answer"]:
        raise Fail("%s: answer %r tokens %s, medmoe-run %r %s" % (what, ans.answer, toks, ref["answer"], ref["tokens"]))


def procs_of(st, expert):
    return [p for p in st["processes"] if p.get("expert") == expert]


def wait_for(what, fn, timeout, cl):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        ok, last = fn()
        if ok:
            return last
        time.sleep(0.2)
    raise Fail("%s: not within %.0f s (last: %s)\n%s" % (what, timeout, last, cl.logs()))


class Load:
    """Clients asking the case in a loop until stop(); every outcome recorded."""

    def __init__(self, make_client, ask, n_threads=2):
        self.ask = ask
        self.make_client = make_client
        self.halt = threading.Event()
        self.ok = 0
        self.failures = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n_threads)]
        for t in self.threads:
            t.start()

    def _run(self, i):
        c = self.make_client()
        n = 0
        while not self.halt.is_set():
            n += 1
            try:
                self.ask(c, "load-%d-%d" % (i, n))
                with self.lock:
                    self.ok += 1
            except Exception as e:  # gRPC errors and wrong answers alike
                with self.lock:
                    self.failures.append("load-%d-%d: %s" % (i, n, str(e).splitlines()[0] if str(e) else repr(e)))
        c.close()

    def stop(self, timeout=60):
        self.halt.set()
        for t in self.threads:
            t.join(timeout)
            if t.is_alive():
                raise Fail("a load client did not finish its case within %d s" % timeout)


def check_secure(st, wd):
    """CurveZMQ on by default: the router runs with the keys `up` made (secret keys 0600 in a
    0700 dir), never --insecure-experts, every expert with its own key."""
    curve = os.path.join(wd, "state", "curve")
    mode = os.stat(curve).st_mode & 0o777
    if mode != 0o700:
        raise Fail("%s has mode %o, want 700" % (curve, mode))
    for n in sorted(os.listdir(curve)):
        m = os.stat(os.path.join(curve, n)).st_mode & 0o777
        if n.endswith(".key") and m != 0o600:
            raise Fail("%s/%s has mode %o, want 600" % (curve, n, m))
    with open(os.path.join(curve, "experts.allow")) as f:
        allowed = [x for x in f.read().split() if x]
    if len(allowed) != 4 or len(set(allowed)) != 4:
        raise Fail("experts.allow lists %d keys (%d distinct), want one per expert: 4" % (len(allowed), len(set(allowed))))
    for p in st["processes"]:
        with open("/proc/%d/cmdline" % p["pid"], "rb") as f:
            argv = f.read().decode().split("\0")
        if p["name"] == "router":
            if "--insecure-experts" in argv or "--curve-secret-key" not in argv or "--curve-allow" not in argv:
                raise Fail("router runs without CurveZMQ: %s" % " ".join(argv))
        elif "--curve-key" not in argv or "--curve-server-key" not in argv:
            raise Fail("%s runs without CurveZMQ: %s" % (p["name"], " ".join(argv)))
        elif argv[argv.index("--curve-key") + 1] != os.path.join(curve, "expert-%d.key" % p["expert"]):
            raise Fail("%s does not use expert %d's key: %s" % (p["name"], p["expert"], " ".join(argv)))
    with open(os.path.join(wd, "logs", "router.log"), errors="replace") as f:
        text = f.read()
    if "CurveZMQ, allowed keys only" not in text or "insecure" in text.lower():
        raise Fail("router log does not show a CurveZMQ expert socket:\n%s" % tail(os.path.join(wd, "logs", "router.log")))
    log("CurveZMQ on: router and %d experts use the keys made at up (0600 in a 0700 dir)" % (len(st["processes"]) - 1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cluster", required=True)
    ap.add_argument("--router", required=True)
    ap.add_argument("--expert", required=True)
    ap.add_argument("--keygen", required=True)
    ap.add_argument("--run", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--workdir", required=True)
    a = ap.parse_args()
    for k in ("cluster", "router", "expert", "keygen", "run", "model", "image", "workdir"):
        setattr(a, k, os.path.abspath(getattr(a, k)))

    try:
        import grpc  # noqa: F401
        import medmoe_client
    except ImportError as e:
        print("SKIP: python3-grpcio / clients/python not importable: %s" % e)
        return 77

    wd = a.workdir
    shutil.rmtree(wd, ignore_errors=True)
    os.makedirs(wd)
    key = secrets.token_hex(32)
    with open(os.path.join(wd, "status.key"), "w") as f:
        f.write(key + "\n")
    with open(os.path.join(wd, "tenants.json"), "w") as f:
        json.dump({"tenants": [{"id": "ops", "key_sha256": hashlib.sha256(key.encode()).hexdigest(),
                                "max_concurrent": 8, "cases_per_minute": 100000}]}, f)
    cfg = {
        "router_bin": a.router, "expert_bin": a.expert, "keygen_bin": a.keygen, "model": a.model,
        "log_dir": "logs", "state_dir": "state", "status_key_file": "status.key", "threads": 1,
        "up_timeout_s": 60,
        "router": {"experts_bind": "tcp://127.0.0.1:*", "grpc_listen": "127.0.0.1:0",
                   "tenants": "tenants.json", "audit_log": "audit.jsonl", "heartbeat_ms": 200,
                   "expert_wait_ms": 5000},
        # a little delay per batch so that a replica stopped by `scale` has work in flight
        "experts": {"replicas": 1, "args": ["--debug-delay-ms", "15"]},
        "supervisor": {"backoff_initial_ms": 300, "stop_timeout_s": 8},
    }
    cfg_path = os.path.join(wd, "cluster.json")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=1)
    cl = Cluster(a.cluster, cfg_path, wd)

    question, max_tokens = "What modality is this image?", 12
    ref = reference(a.run, a.model, a.image, question, max_tokens, wd)
    used = experts_by_use(ref)
    with open(a.image, "rb") as f:
        png = f.read()
    log("reference: %r, experts used (most first) %s" % (ref["answer"], used))

    try:
        t0 = time.monotonic()
        cl.run("up", timeout=90)
        log("up in %.1f s" % (time.monotonic() - t0))
        rc, _ = cl.run("up", check=False, timeout=30)
        if rc == 0:
            raise Fail("a second `up` succeeded while the cluster runs")

        st = cl.status()
        names = [p["name"] for p in st["processes"]]
        if not st["up"] or len(st["processes"]) != 5 or not all(p["alive"] for p in st["processes"]):
            raise Fail("status after up: %s" % json.dumps(st))
        view = st["router_view"]
        if view["source"] != "metrics" or view["health"] != "SERVING" or view["live"] != [1, 1, 1, 1]:
            raise Fail("router's view after up: %s" % view)
        log("status: %s; router's view %s" % (names, view))
        check_secure(st, wd)

        target = st["grpc"]
        stubs = os.path.join(wd, "py-stubs")

        def client():
            return medmoe_client.Client(target, key=key, stub_dir=stubs)

        def ask(c, case_id):
            ans = c.ask(question, image=png, max_tokens=max_tokens, case_id=case_id, timeout=60)
            check_answer(ans, ref, case_id)
            return ans

        c = client()
        ask(c, "first")
        log("case answered over gRPC, equal to medmoe-run")

        # -- kill -9 an expert the case needs; the supervisor brings it back
        victim = used[0]
        old = procs_of(st, victim)[0]
        os.kill(old["pid"], signal.SIGKILL)
        log("kill -9 expert %d (pid %d)" % (victim, old["pid"]))

        def restarted():
            s = cl.status()
            p = procs_of(s, victim)
            with open(os.path.join(wd, "logs", "router.log"), errors="replace") as f:
                joins = f.read().count("joined: expert %d," % victim)
            ok = (len(p) == 1 and p[0]["alive"] and p[0]["pid"] != old["pid"] and p[0]["restarts"] == 1
                  and joins >= 2 and s["router_view"]["live"] == [1, 1, 1, 1])
            return ok, {"procs": p, "view": s["router_view"]}
        got = wait_for("supervisor restarts expert %d" % victim, restarted, 20, cl)
        log("expert %d restarted as pid %d (restarts %d); router sees %s"
            % (victim, got["procs"][0]["pid"], got["procs"][0]["restarts"], got["view"]["live"]))
        ask(c, "after-kill")
        log("case answered after the restart")

        # -- kill -9 the router: the supervisor restarts it on the same ports (chosen once at up),
        # the experts rejoin, and the client's channel to the same address is answered again
        st = cl.status()
        state_path = os.path.join(wd, "state", "state.json")
        with open(state_path) as f:
            before = json.load(f)
        old_router = st["processes"][0]
        os.kill(old_router["pid"], signal.SIGKILL)
        log("kill -9 the router (pid %d); gRPC %s, experts %s, metrics port %s"
            % (old_router["pid"], st["grpc"], st["endpoint"], before["metrics_port"]))

        def router_back():
            s2 = cl.status()
            r = s2["processes"][0] if s2["processes"] else {}
            ok = (r.get("alive") and r.get("pid") != old_router["pid"] and s2["grpc"]
                  and s2["router_view"]["live"] == [1, 1, 1, 1] and s2["router_view"]["health"] == "SERVING")
            return ok, s2
        s2 = wait_for("supervisor restarts the router", router_back, 40, cl)
        with open(state_path) as f:
            after = json.load(f)
        moved = [(k, before[k], after[k]) for k in ("grpc_port", "metrics_port", "endpoint") if before[k] != after[k]]
        if moved or s2["grpc"] != target:
            raise Fail("the restarted router moved: %s (gRPC %s -> %s)" % (moved, target, s2["grpc"]))
        log("router restarted as pid %d on the same ports (gRPC %s, metrics %s, experts %s)"
            % (s2["processes"][0]["pid"], s2["grpc"], after["metrics_port"], after["endpoint"]))
        # the client's channel may still be in its reconnect back-off: it retries UNAVAILABLE,
        # as a gRPC client does, at the same address
        import grpc
        t_retry = time.monotonic() + 20
        while True:
            try:
                ask(c, "after-router-restart")
                break
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > t_retry:
                    raise Fail("the same client after the router's restart: %s: %s" % (e.code(), e.details()))
                time.sleep(0.2)
        log("case answered through the same client (same address) after the router's restart")
        check_secure(s2, wd)

        # -- scale 1 -> 2 -> 1 while two clients keep asking
        load = Load(client, ask, n_threads=2)
        try:
            time.sleep(1.0)
            cl.run("scale", str(victim), "2", timeout=60)
            s = cl.status()
            if len(procs_of(s, victim)) != 2 or s["router_view"]["live"][victim] != 2:
                raise Fail("after scale %d 2: %s" % (victim, json.dumps(s)))
            log("scaled expert %d to 2 (router sees %s), %d cases so far" % (victim, s["router_view"]["live"], load.ok))
            time.sleep(2.0)
            cl.run("scale", str(victim), "1", timeout=60)
            s = cl.status()
            if len(procs_of(s, victim)) != 1 or s["router_view"]["live"][victim] != 1:
                raise Fail("after scale %d 1: %s" % (victim, json.dumps(s)))
            log("scaled expert %d back to 1 (router sees %s)" % (victim, s["router_view"]["live"]))
            time.sleep(1.0)
        finally:
            load.stop()
        if load.failures:
            raise Fail("%d case(s) failed while scaling (%d ok): %s\n%s"
                       % (len(load.failures), load.ok, load.failures[:5], cl.logs()))
        if load.ok < 4:
            raise Fail("only %d cases answered while scaling" % load.ok)
        with open(os.path.join(wd, "logs", "router.log"), errors="replace") as f:
            rlog = f.read()
        byes = [x for x in rlog.splitlines() if "said Bye" in x]
        if not byes:
            raise Fail("the router never logged the drained replica's Bye:\n%s" % tail(os.path.join(wd, "logs", "router.log")))
        log("%d cases answered while scaling, none failed; drain: %s" % (load.ok, byes[-1].strip()))
        ask(c, "after-scale")
        c.close()

        # -- down: every process stops
        pids = [p["pid"] for p in cl.status()["processes"]] + [st["supervisor_pid"]]
        t0 = time.monotonic()
        cl.run("down", timeout=60)
        left = [p for p in pids if os.path.exists("/proc/%d" % p) and
                open("/proc/%d/stat" % p).read().rsplit(")", 1)[1].split()[0] != "Z"]
        if left:
            raise Fail("after down, still running: %s" % left)
        st = cl.status()
        if st["up"]:
            raise Fail("status after down: %s" % st)
        if os.listdir(os.path.join(wd, "state", "pids")):
            raise Fail("pid files left: %s" % os.listdir(os.path.join(wd, "state", "pids")))
        log("down in %.1f s; every process gone" % (time.monotonic() - t0))
        for n in sorted(os.listdir(os.path.join(wd, "logs"))):
            with open(os.path.join(wd, "logs", n), errors="replace") as f:
                m = re.search(r"ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:", f.read())
            if m:
                raise Fail("%s reports a sanitizer error (%s)\n%s" % (n, m.group(0), tail(os.path.join(wd, "logs", n), 40)))
    except Fail as e:
        print("FAIL: %s" % e, flush=True)
        return 1
    finally:
        cl.run("down", timeout=60, check=False)
        cl.kill_all()
    print("PASS", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
