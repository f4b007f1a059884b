#!/usr/bin/python3
"""Process harness for the distributed-serving tests and benchmark (docs/ARCHITECTURE.md,
"Router ↔ expert wire").

Starts medmoe-router / medmoe-expert as real processes on 127.0.0.1 with ephemeral
ports, talks to the router over its --cases stdin / stdout JSON lines (tests/grpc/grpclib.py's
GrpcCluster builds on this for the gRPC front door), computes the single-process answer with
medmoe-run, and compares them with tests/reference/compare.py.

CurveZMQ is on by default, as in production: each Cluster makes a router key pair and one
expert key pair (Curve) and passes them to every router and expert it starts, unless the test
gives its own --curve-* flags or --insecure-experts. Test peers made of raw ZeroMQ sockets join
with cl.curve.secure(sock).

Rules every user relies on:
  * every process gets its own process group (start_new_session) and is SIGKILLed at the
    end by Cluster.close() — also on failure (use `with Cluster(...) as cl:`);
  * every wait is bounded: a hang becomes TestFailure with a message and the log tails;
  * stderr of each process goes to WORKDIR/<name>.log (printed, tail only, on failure).
"""

import hashlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
COMPARE = os.path.join(os.path.dirname(HERE), "reference", "compare.py")
sys.path.insert(0, os.path.dirname(COMPARE))
from run_equivalence import parse_json_stdout  # noqa: E402  (one parser for medmoe-run's stdout)
PYTHON = "/usr/bin/python3"

# The expert has been welcomed by the router: either the expert says so (the contract: it
# "logs one line per accepted connection") or the router logs "replica R joined: expert K".
JOINED_RE = re.compile(r"welcomed|accepted|joined|as replica|serving expert|registered", re.I)


def router_joined_re(k):
    return re.compile(r"joined: expert %d\b" % k)


class TestFailure(Exception):
    pass


def log(msg):
    print("dist: " + msg, flush=True)


def tail(path, n=25):
    try:
        with open(path, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    | " + x for x in lines[-n:])


class Proc:
    """One child process in its own process group; stderr → log file."""

    def __init__(self, name, cmd, workdir, stdin=None, stdout=None):
        self.name = name
        self.cmd = cmd
        self.log_path = os.path.join(workdir, name + ".log")
        self._log = open(self.log_path, "wb")
        self.started = time.monotonic()
        self.p = subprocess.Popen(cmd, stdin=stdin, stdout=stdout if stdout is not None else self._log,
                                  stderr=self._log, start_new_session=True)
        self.pid = self.p.pid
        self.stopped = False

    def alive(self):
        return self.p.poll() is None

    def signal(self, sig):
        if self.alive():
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass
        if sig == signal.SIGSTOP:
            self.stopped = True
        elif sig == signal.SIGCONT:
            self.stopped = False

    def kill(self):
        if self.alive():
            self.signal(signal.SIGKILL)
        try:
            self.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        # also the rest of its group, if it forked
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def wait(self, timeout):
        try:
            return self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def log_text(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def describe(self):
        rc = self.p.poll()
        return "%s (pid %d, %s):\n%s" % (self.name, self.pid,
                                         "running" if rc is None else "exit status %d" % rc,
                                         tail(self.log_path))


def unread_bytes(pid, port):
    """Bytes the kernel holds unread on process pid's TCP connections to 127.0.0.1:port (the
    receive queue in /proc/PID/net/tcp of the sockets among pid's fds). A SIGSTOPped process
    reads nothing, so what is here was sent to it after it froze: the only outside sign that a
    frozen expert holds a message. 0 when the process is gone."""
    inodes = set()
    try:
        for fd in os.listdir("/proc/%d/fd" % pid):
            try:
                m = re.match(r"socket:\[(\d+)\]$", os.readlink("/proc/%d/fd/%s" % (pid, fd)))
            except OSError:
                continue
            if m:
                inodes.add(m.group(1))
        with open("/proc/%d/net/tcp" % pid) as f:
            rows = f.read().splitlines()[1:]
    except OSError:
        return 0
    total = 0
    for row in rows:
        # sl local_address rem_address st tx_queue:rx_queue tr:when retrnsmt uid timeout inode
        x = row.split()
        if len(x) > 9 and x[9] in inodes and x[2] == "0100007F:%04X" % port:
            total += int(x[4].split(":")[1], 16)
    return total


class Router(Proc):
    """medmoe-router reading cases from stdin (--cases -), answers read from stdout."""

    def __init__(self, name, cmd, workdir):
        super().__init__(name, cmd, workdir, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.lines = queue.Queue()
        self.noise = []
        self._t = threading.Thread(target=self._reader, daemon=True)
        self._t.start()

    def _reader(self):
        for raw in self.p.stdout:
            self.lines.put(raw.decode("utf-8", "replace"))
        self.lines.put(None)

    def send(self, case):
        try:
            self.p.stdin.write((json.dumps(case) + "\n").encode())
            self.p.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise TestFailure("router stdin closed while sending case %s: %s" % (case.get("id"), e))

    def receive(self, case_id, timeout):
        """The next JSON answer line (must carry id case_id), within timeout seconds."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TestFailure("no answer for case %r from the router within %.1f s" % (case_id, timeout))
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise TestFailure("router stdout closed (exit status %s) before answering case %r"
                                  % (self.p.poll(), case_id))
            s = line.strip()
            if not s.startswith("{"):
                self.noise.append(s)
                continue
            try:
                obj = json.loads(s)
            except json.JSONDecodeError as e:
                raise TestFailure("router printed a line that is not JSON (%s): %.300s" % (e, s))
            if obj.get("id") != case_id:
                raise TestFailure("expected the answer to case %r, got one with id %r" % (case_id, obj.get("id")))
            return obj

    def ask(self, case, timeout):
        self.send(case)
        return self.receive(case["id"], timeout)

    def close_input(self):
        try:
            self.p.stdin.close()
        except OSError:
            pass


def _write_key(path, key, mode):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")


class Curve:
    """CurveZMQ keys of one test cluster (pyzmq's keypair, the format medmoe-keygen writes):
    the router's pair and one expert pair that every expert of the cluster shares."""

    def __init__(self, workdir):
        import zmq
        self.dir = os.path.join(workdir, "curve")
        os.makedirs(self.dir, exist_ok=True)
        self.pairs = {}
        for name in ("router", "expert"):
            pub, sec = (k.decode() for k in zmq.curve_keypair())
            _write_key(self.path(name + ".key"), sec, 0o600)
            _write_key(self.path(name + ".pub"), pub, 0o644)
            self.pairs[name] = (pub, sec)
        _write_key(self.path("experts.allow"), self.pairs["expert"][0], 0o644)

    def path(self, name):
        return os.path.join(self.dir, name)

    def router_args(self):
        return ["--curve-secret-key", self.path("router.key"), "--curve-allow", self.path("experts.allow")]

    def expert_args(self):
        return ["--curve-server-key", self.path("router.pub"), "--curve-key", self.path("expert.key")]

    def secure(self, sock, pair=None):
        """Make a pyzmq DEALER a CURVE client of the router: with the cluster's allowed expert
        key, or with pair=(public, secret) (an unlisted key, say)."""
        import zmq
        pub, sec = pair or self.pairs["expert"]
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.pairs["router"][0].encode())
        sock.setsockopt(zmq.CURVE_PUBLICKEY, pub.encode() if isinstance(pub, str) else pub)
        sock.setsockopt(zmq.CURVE_SECRETKEY, sec.encode() if isinstance(sec, str) else sec)
        return sock


def router_security(curve, extra):
    """The router's CurveZMQ flags: none when extra has its own (or --insecure-experts)."""
    if any(a in ("--curve-secret-key", "--insecure-experts") for a in extra):
        return []
    return curve.router_args() if curve else ["--insecure-experts"]


def expert_security(curve, extra):
    if "--curve-key" in extra or not curve:
        return []
    return curve.expert_args()


class Cluster:
    """Owns every process a test starts; `with Cluster(args, workdir) as cl:`.
    curve=False: routers run with --insecure-experts (the plaintext wire)."""

    def __init__(self, bins, workdir, hb_ms=200, curve=True):
        self.bins = bins  # dict: router, expert, run, keygen
        self.workdir = workdir
        self.hb_ms = hb_ms
        self.procs = []
        self._n = 0
        os.makedirs(workdir, exist_ok=True)
        self.curve = Curve(workdir) if curve else None

    def __enter__(self):
        return self

    def __exit__(self, et, ev, tb):
        if et is not None:
            self.dump()
        self.close()
        if et is None:
            self.check_sanitizers()
        return False

    def close(self):
        """SIGTERM first (a clean exit lets LeakSanitizer check a sanitizer build), SIGKILL
        whatever is left after 3 s; every process group is killed in the end."""
        for p in self.procs:
            if p.stopped:
                p.signal(signal.SIGCONT)
            if p.alive():
                p.signal(signal.SIGTERM)
        deadline = time.monotonic() + 3.0
        for p in self.procs:
            p.wait(max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            p.kill()

    SANITIZER_RE = re.compile(r"ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:")

    def check_sanitizers(self):
        for p in self.procs:
            m = self.SANITIZER_RE.search(p.log_text())
            if m:
                raise TestFailure("%s reported a sanitizer error (%s)\n%s" % (p.name, m.group(0), tail(p.log_path, 40)))

    def dump(self):
        for p in self.procs:
            print("---- " + p.describe(), flush=True)

    def _name(self, base):
        self._n += 1
        return "%02d-%s" % (self._n, base)

    # -- router --------------------------------------------------------------------------
    def start_router(self, model, vision=None, wait_experts_ms=10000, expert_wait_ms=5000, extra=(),
                     stats=True):
        name = self._name("router")
        self.endpoint_file = os.path.join(self.workdir, name + ".endpoint")
        self.stats_file = os.path.join(self.workdir, name + ".stats.json") if stats else None
        for f in (self.endpoint_file, self.stats_file):
            if f and os.path.exists(f):
                os.remove(f)
        cmd = [self.bins["router"], "--model", model, "--vision", vision or os.path.join(model, "clip"),
               "--experts-bind", "tcp://127.0.0.1:*", "--endpoint-file", self.endpoint_file,
               "--cases", "-", "--heartbeat-ms", str(self.hb_ms),
               "--wait-experts", str(wait_experts_ms), "--expert-wait-ms", str(expert_wait_ms)]
        if self.stats_file:
            cmd += ["--stats-file", self.stats_file]
        cmd += router_security(self.curve, extra) + list(extra)
        r = Router(name, cmd, self.workdir)
        self.procs.append(r)
        self.router = r
        self.endpoint = self.wait_endpoint(r, 15)
        log("%s up at %s" % (name, self.endpoint))
        return r

    def wait_endpoint(self, r, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not r.alive():
                raise TestFailure("router exited (status %d) before writing --endpoint-file\n%s"
                                  % (r.p.returncode, r.describe()))
            try:
                with open(self.endpoint_file) as f:
                    ep = f.read().strip()
                if ep:
                    if not re.match(r"^tcp://127\.0\.0\.1:\d+$", ep):
                        raise TestFailure("--endpoint-file holds %r, expected tcp://127.0.0.1:PORT" % ep)
                    if ep.endswith(":0"):
                        raise TestFailure("--endpoint-file holds port 0 (%r): not the bound port" % ep)
                    return ep
            except FileNotFoundError:
                pass
            time.sleep(0.02)
        raise TestFailure("router wrote no --endpoint-file within %d s\n%s" % (timeout, r.describe()))

    def finish_router(self, timeout=15):
        """Closes the case input; the router must exit 0 and write its stats file."""
        r = self.router
        r.close_input()
        rc = r.wait(timeout)
        if rc is None:
            raise TestFailure("router did not exit within %d s after its --cases input ended" % timeout)
        if rc != 0:
            raise TestFailure("router exited with status %d after its cases (want 0)\n%s" % (rc, r.describe()))
        return self.read_stats()

    def read_stats(self):
        try:
            with open(self.stats_file) as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise TestFailure("router --stats-file %s unreadable: %s" % (self.stats_file, e))

    def bare_router(self):
        """(socket, endpoint): a pyzmq ROUTER on 127.0.0.1 that this cluster's real experts can
        connect to — a CURVE server with the cluster's router key when CURVE is on (no ZAP
        handler: any client key gets in)."""
        import zmq
        s = zmq.Context.instance().socket(zmq.ROUTER)
        s.setsockopt(zmq.LINGER, 0)
        if self.curve:
            s.setsockopt(zmq.CURVE_SERVER, 1)
            s.setsockopt(zmq.CURVE_SECRETKEY, self.curve.pairs["router"][1].encode())
        s.bind("tcp://127.0.0.1:*")
        return s, s.getsockopt_string(zmq.LAST_ENDPOINT)

    # -- experts -------------------------------------------------------------------------
    def start_expert(self, model, k, endpoint=None, extra=(), wait_joined=True, timeout=15, tag=""):
        name = self._name("expert%d%s" % (k, tag))
        cmd = [self.bins["expert"], "--model", model, "--expert", str(k),
               "--router", endpoint or self.endpoint, "--heartbeat-ms", str(self.hb_ms)]
        cmd += expert_security(self.curve, extra) + list(extra)
        r = getattr(self, "router", None)
        before = len(router_joined_re(k).findall(r.log_text())) if r else 0
        e = Proc(name, cmd, self.workdir)
        e.expert = k
        e.router_joins_before = before
        self.procs.append(e)
        if wait_joined:
            self.wait_joined(e, timeout)
        return e

    def wait_joined(self, e, timeout=15):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if JOINED_RE.search(e.log_text()):
                return
            r = getattr(self, "router", None)
            if r and len(router_joined_re(e.expert).findall(r.log_text())) > e.router_joins_before:
                return
            if not e.alive():
                raise TestFailure("%s exited (status %d) before being welcomed by the router\n%s"
                                  % (e.name, e.p.returncode, e.describe()))
            time.sleep(0.02)
        raise TestFailure("%s logged no 'welcomed/accepted' line within %d s (looked for /%s/)\n%s"
                          % (e.name, timeout, JOINED_RE.pattern, e.describe()))


# -- cases and the single-process reference ---------------------------------------------------
def case_run_args(case):
    """medmoe-run arguments for a router case line."""
    a = ["--question", case["question"], "--max-tokens", str(case.get("max_tokens", 64))]
    if case.get("image"):
        a += ["--image", case["image"]]
    if case.get("candidates"):
        a += ["--candidates", case["candidates"]]
    if case.get("no_pad"):
        a += ["--no-pad"]
    return a


def reference(run_bin, model, case, workdir, vision=None, timeout=60):
    """medmoe-run's answer to `case` (cached in workdir/ref-<id>.json)."""
    key = hashlib.sha1(json.dumps({k: v for k, v in case.items() if k != "id"}, sort_keys=True).encode())
    path = os.path.join(workdir, "ref-%s-%s.json" % (os.path.basename(model.rstrip("/")), key.hexdigest()[:12]))
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f), path
    cmd = [run_bin, "--model", model, "--vision", vision or os.path.join(model, "clip"), "--json"]
    cmd += case_run_args(case)
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise TestFailure("medmoe-run did not finish within %d s: %s" % (timeout, " ".join(cmd)))
    if p.returncode != 0:
        raise TestFailure("medmoe-run failed (status %d): %s\n%s" % (p.returncode, " ".join(cmd), p.stderr[-2000:]))
    obj = parse_json_stdout(p.stdout)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
    return obj, path


def check_equal(answer, ref_path, workdir, what):
    """compare.py(reference, router answer) must exit 0."""
    if answer.get("status") != "ok":
        raise TestFailure("%s: router answered status %r (code %r): %s"
                          % (what, answer.get("status"), answer.get("code"), answer.get("message")))
    path = os.path.join(workdir, "got-%s.json" % re.sub(r"[^A-Za-z0-9_.-]", "_", what))
    with open(path, "w") as f:
        json.dump(answer, f, indent=1)
    p = subprocess.run([PYTHON, COMPARE, ref_path, path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=60)
    if p.returncode != 0:
        raise TestFailure("%s: router's answer differs from medmoe-run's: %s (files %s vs %s)"
                          % (what, p.stdout.strip(), ref_path, path))
    log("%s: equal to medmoe-run (%s)" % (what, p.stdout.strip()))


def experts_used(ref):
    return sorted({e for r in ref.get("routing", []) for pos in r["experts"] for e in pos})


def fresh_dir(path):
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def main_wrapper(fn):
    """Runs fn(); TestFailure → message + exit 1."""
    try:
        fn()
    except TestFailure as e:
        print("FAIL: %s" % e, flush=True)
        sys.exit(1)
    print("PASS", flush=True)
    sys.exit(0)
