#!/usr/bin/python3
"""Multi-host without Kubernetes: medmoe-router and its experts in three network namespaces.

    ns R (router)  10.<n>.1.1 ---veth--- 10.<n>.1.2  ns B (experts 0, 1)
                   10.<n>.2.1 ---veth--- 10.<n>.2.2  ns C (experts 2, 3)

Each namespace has its own loopback and sees the others only through its veth, so anything
that assumed one host (127.0.0.1, shared files between router and experts, a shared port
space) fails here. The router binds tcp://0.0.0.0:PORT in R; experts in B and C connect to
R's address on their own link. Cases go in over gRPC (the router listens on 0.0.0.0:PORT in R)
from the Python client CLI (clients/python/medmoe_client.py) run in ns B, so a client on another
host reaches the front door across its link; the cases go at once, their answers must equal
medmoe-run's (tokens, routing, ranked candidates), and the router must have welcomed every
replica from its own namespace's link.

Needs root (CAP_NET_ADMIN) and `ip netns`; skipped (exit 77) only without them. Namespaces
are deleted at the end, on failure and on SIGTERM/SIGINT too; a stale namespace of an earlier
run that was killed (-9) is deleted at the start.
"""

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests", "distributed"))
sys.path.insert(0, os.path.join(ROOT, "tests", "grpc"))
import distlib as D  # noqa: E402
import grpclib as G  # noqa: E402

CLIENT = os.path.join(ROOT, "clients", "python", "medmoe_client.py")

PREFIX = "mmorch"
SKIP = 77


def log(msg):
    print("netns: " + msg, flush=True)


def ip(*args, check=True):
    p = subprocess.run(["ip"] + list(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=20)
    if check and p.returncode != 0:
        raise D.TestFailure("ip %s: exit %d: %s" % (" ".join(args), p.returncode, p.stdout.strip()))
    return p


def stale_cleanup():
    """Deletes namespaces of earlier runs whose test process is gone (killed -9 by a timeout)."""
    p = ip("netns", "list", check=False)
    for line in p.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.match(r"^%s-(\d+)-[a-z]$" % PREFIX, name)
        if m and not os.path.exists("/proc/%s" % m.group(1)):
            ip("netns", "del", name, check=False)
            log("deleted stale namespace %s" % name)


class Net:
    def __init__(self):
        pid = os.getpid()
        self.ns = {k: "%s-%d-%s" % (PREFIX, pid, k) for k in "rbc"}
        # a /16 per run: different runs never share addresses (not that namespaces could see them)
        self.net = 100 + pid % 100
        self.made = []

    def addr(self, link, side):
        return "10.%d.%d.%d" % (self.net, link, side)

    def up(self):
        for k in "rbc":
            ip("netns", "add", self.ns[k])
            self.made.append(self.ns[k])
            ip("-n", self.ns[k], "link", "set", "lo", "up")
        tag = os.getpid() % 100000
        for link, peer in ((1, "b"), (2, "c")):
            a, b = "mo%d%sr" % (tag, peer), "mo%d%s" % (tag, peer)
            ip("link", "add", a, "netns", self.ns["r"], "type", "veth", "peer", "name", b, "netns", self.ns[peer])
            ip("-n", self.ns["r"], "addr", "add", self.addr(link, 1) + "/24", "dev", a)
            ip("-n", self.ns[peer], "addr", "add", self.addr(link, 2) + "/24", "dev", b)
            ip("-n", self.ns["r"], "link", "set", a, "up")
            ip("-n", self.ns[peer], "link", "set", b, "up")
        log("namespaces %s; R=%s|%s, B=%s, C=%s" % (", ".join(self.made), self.addr(1, 1), self.addr(2, 1),
                                                    self.addr(1, 2), self.addr(2, 2)))

    def down(self):
        for n in self.made:
            ip("netns", "del", n, check=False)
        self.made = []

    def exec_prefix(self, k):
        return ["ip", "netns", "exec", self.ns[k]]


def client_cmd(net, nsk, target, stubs, cmd, *args):
    """medmoe_client.py CMD --json run in namespace nsk against target (the key comes from
    $MEDMOE_API_KEY)."""
    return net.exec_prefix(nsk) + [sys.executable, CLIENT, cmd, "--server", target, "--stubs", stubs,
                                   "--json", "--timeout-ms", "60000"] + list(args)


def client_json(p, what, timeout):
    """The JSON a client process printed (it must exit 0 within timeout)."""
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise D.TestFailure("%s: the client did not finish within %d s" % (what, timeout))
    if p.returncode != 0:
        raise D.TestFailure("%s: the client exited %d: %s" % (what, p.returncode, (err or out).strip()[-2000:]))
    try:
        return json.loads(out)
    except ValueError as e:
        raise D.TestFailure("%s: the client printed no JSON (%s): %.300s" % (what, e, out))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--router", required=True)
    ap.add_argument("--expert", required=True)
    ap.add_argument("--run", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--workdir", required=True)
    a = ap.parse_args()
    for k in ("router", "expert", "run", "model", "image", "workdir"):
        setattr(a, k, os.path.abspath(getattr(a, k)))

    if os.geteuid() != 0:
        print("SKIP: not root (ip netns needs CAP_NET_ADMIN)")
        return SKIP
    if not shutil.which("ip"):
        print("SKIP: iproute2 (ip) not installed")
        return SKIP
    stale_cleanup()
    probe = "%s-%d-p" % (PREFIX, os.getpid())
    p = ip("netns", "add", probe, check=False)
    if p.returncode != 0:
        print("SKIP: ip netns unavailable here: %s" % p.stdout.strip())
        return SKIP
    ip("netns", "del", probe, check=False)

    shutil.rmtree(a.workdir, ignore_errors=True)
    os.makedirs(a.workdir)
    net = Net()

    def on_signal(sig, frm):
        raise SystemExit(128 + sig)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    procs = []
    env = dict(os.environ, MEDMOE_THREADS="1")
    os.environ.update(env)
    try:
        net.up()
        # The namespaces really are apart: R cannot reach B's address on C's link, and B
        # has no route to C at all.
        probe = ("import socket,sys\ns=socket.socket(); s.settimeout(2)\n"
                 "try:\n s.connect((sys.argv[1], 9)); print('connected')\n"
                 "except OSError as e:\n print(e.strerror or e)\n")
        r = ip("netns", "exec", net.ns["b"], sys.executable, "-c", probe, net.addr(2, 2), check=False)
        if "unreachable" not in r.stdout.lower():
            raise D.TestFailure("ns B -> ns C's address: %r (want 'Network is unreachable'): the namespaces "
                                "are not apart" % r.stdout.strip())
        log("ns B cannot reach ns C (%s): separate hosts" % r.stdout.strip())
        port = 5555
        endpoint_file = os.path.join(a.workdir, "router.endpoint")
        grpc_port_file = os.path.join(a.workdir, "router.grpc-port")
        tenant = G.Tenant("hospital-b", secrets.token_hex(32), 4, 0)
        tenants = os.path.join(a.workdir, "tenants.json")
        with open(tenants, "w") as f:
            json.dump({"tenants": [tenant.entry()]}, f)
        curve = D.Curve(a.workdir)  # across hosts CURVE is the rule
        router = D.Proc("router", net.exec_prefix("r") + [
            a.router, "--model", a.model, "--vision", os.path.join(a.model, "clip"),
            "--experts-bind", "tcp://0.0.0.0:%d" % port, "--endpoint-file", endpoint_file,
            "--grpc-listen", "0.0.0.0:0", "--grpc-port-file", grpc_port_file, "--tenants", tenants,
            "--heartbeat-ms", "200", "--expert-wait-ms", "10000"] + curve.router_args(), a.workdir,
            stdin=subprocess.DEVNULL)
        procs.append(router)
        deadline = time.monotonic() + 20
        while not (os.path.exists(endpoint_file) and os.path.exists(grpc_port_file)):
            if not router.alive() or time.monotonic() > deadline:
                raise D.TestFailure("router wrote no endpoint / gRPC port file\n%s" % router.describe())
            time.sleep(0.05)
        with open(endpoint_file) as f, open(grpc_port_file) as g:
            target = "%s:%d" % (net.addr(1, 1), int(g.read().strip()))
            log("router in ns R bound %s; gRPC on port %s" % (f.read().strip(), target.rsplit(":", 1)[1]))
        placement = {0: ("b", 1), 1: ("b", 1), 2: ("c", 2), 3: ("c", 2)}
        for k, (nsk, link) in placement.items():
            ep = "tcp://%s:%d" % (net.addr(link, 1), port)
            e = D.Proc("expert%d-ns%s" % (k, nsk.upper()), net.exec_prefix(nsk) + [
                a.expert, "--model", a.model, "--expert", str(k), "--router", ep, "--heartbeat-ms", "200"]
                + curve.expert_args(),
                a.workdir)
            procs.append(e)
            log("expert %d in ns %s -> %s" % (k, nsk.upper(), ep))
        deadline = time.monotonic() + 30
        while True:
            text = router.log_text()
            joined = {int(m) for m in re.findall(r"joined: expert (\d+)", text)}
            if joined == {0, 1, 2, 3}:
                break
            for pr in procs[1:]:
                if not pr.alive():
                    raise D.TestFailure("%s exited\n%s" % (pr.name, pr.describe()))
            if time.monotonic() > deadline:
                raise D.TestFailure("experts joined: %s of 0..3 within 30 s\n%s"
                                    % (sorted(joined), "\n".join(pr.describe() for pr in procs)))
            time.sleep(0.1)
        log("every expert joined the router across the veth links")

        # The client in ns B (a host of its own) reaches the router's front door across link 1.
        os.environ["MEDMOE_API_KEY"] = tenant.key
        stubs = os.path.join(a.workdir, "py-stubs")
        deadline = time.monotonic() + 30
        while True:  # also makes the stubs, before the concurrent clients below
            p = subprocess.Popen(client_cmd(net, "b", target, stubs, "status"), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
            st = client_json(p, "status from ns B", 60)
            live = {int(e.get("expert", 0)): int(e.get("live_replicas", 0))
                    for e in st["server_info"].get("experts", [])}
            if st["health"] == "SERVING" and all(live.get(k, 0) >= 1 for k in range(4)):
                break
            if time.monotonic() > deadline:
                raise D.TestFailure("status from ns B: health %s, live replicas %s within 30 s"
                                    % (st["health"], live))
            time.sleep(0.2)
        log("ns B -> %s: health %s, live replicas per expert %s" % (target, st["health"], live))

        question, cands = "What modality is this image?", ["ct", "mri", "x-ray", "pathology"]
        ref_gen, _ = D.reference(a.run, a.model, {"image": a.image, "question": question, "max_tokens": 16},
                                 a.workdir)
        ref_cls, _ = D.reference(a.run, a.model, {"image": a.image, "question": question, "max_tokens": 0,
                                                  "candidates": ",".join(cands)}, a.workdir)
        gen = subprocess.Popen(client_cmd(net, "b", target, stubs, "ask", "--image", a.image, "--question",
                                          question, "--max-tokens", "16", "--case-id", "gen"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        cls = subprocess.Popen(client_cmd(net, "b", target, stubs, "classify", "--image", a.image,
                                          "--question", question, "--candidates", ",".join(cands),
                                          "--case-id", "cls"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        G.check_answer(client_json(gen, "Ask from ns B", 90), ref_gen, "Ask from ns B", case_id="gen")
        G.check_classify(client_json(cls, "Classify from ns B", 90), ref_cls, "Classify from ns B",
                         case_id="cls")
        for what, ref in (("Ask", ref_gen), ("Classify", ref_cls)):
            log("%s from ns B equal to medmoe-run; experts used %s (ns B hosts 0,1; ns C hosts 2,3)"
                % (what, D.experts_used(ref)))
        router.signal(signal.SIGTERM)
        rc = router.wait(20)
        if rc != 0:
            raise D.TestFailure("router did not exit 0 within 20 s of SIGTERM (%r)\n%s" % (rc, router.describe()))
    except D.TestFailure as e:
        for pr in procs:
            print("---- " + pr.describe(), flush=True)
        print("FAIL: %s" % e, flush=True)
        return 1
    finally:
        for pr in procs:
            if pr.alive():
                pr.signal(signal.SIGTERM)
        deadline = time.monotonic() + 3
        for pr in procs:
            pr.wait(max(0.0, deadline - time.monotonic()))
        for pr in procs:
            pr.kill()
        net.down()
        left = [n for n in ip("netns", "list", check=False).stdout.split() if n.startswith("%s-%d-" % (PREFIX, os.getpid()))]
        if left:
            print("FAIL: namespaces left behind: %s" % left, flush=True)
            return 1
    print("PASS", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
