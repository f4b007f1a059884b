#!/usr/bin/python3
"""Multi-host without Kubernetes: medmoe-router and its experts in three network namespaces.

    ns R (router)  10.<n>.1.1 ---veth--- 10.<n>.1.2  ns B (experts 0, 1)
                   10.<n>.2.1 ---veth--- 10.<n>.2.2  ns C (experts 2, 3)

Each namespace has its own loopback and sees the others only through its veth, so anything
that assumed one host (127.0.0.1, shared files between router and experts, a shared port
space) fails here. The router binds tcp://0.0.0.0:PORT in R; experts in B and C connect to
R's address on their own link. Cases go in on the router's --cases stdin; the answers must
equal medmoe-run's (tests/reference/compare.py), and the router must have welcomed every
replica from its own namespace's link.

Needs root (CAP_NET_ADMIN) and `ip netns`; skipped (exit 77) only without them. Namespaces
are deleted at the end, on failure and on SIGTERM/SIGINT too; a stale namespace of an earlier
run that was killed (-9) is deleted at the start.
"""

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "distributed"))
import distlib as D  # noqa: E402

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
        router = D.Router("router", net.exec_prefix("r") + [
            a.router, "--model", a.model, "--vision", os.path.join(a.model, "clip"),
            "--experts-bind", "tcp://0.0.0.0:%d" % port, "--endpoint-file", endpoint_file,
            "--cases", "-", "--heartbeat-ms", "200", "--expert-wait-ms", "10000"], a.workdir)
        procs.append(router)
        deadline = time.monotonic() + 20
        while not os.path.exists(endpoint_file):
            if not router.alive() or time.monotonic() > deadline:
                raise D.TestFailure("router wrote no endpoint file\n%s" % router.describe())
            time.sleep(0.05)
        with open(endpoint_file) as f:
            log("router in ns R bound %s" % f.read().strip())
        placement = {0: ("b", 1), 1: ("b", 1), 2: ("c", 2), 3: ("c", 2)}
        for k, (nsk, link) in placement.items():
            ep = "tcp://%s:%d" % (net.addr(link, 1), port)
            e = D.Proc("expert%d-ns%s" % (k, nsk.upper()), net.exec_prefix(nsk) + [
                a.expert, "--model", a.model, "--expert", str(k), "--router", ep, "--heartbeat-ms", "200"],
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

        cases = [{"id": "gen", "image": a.image, "question": "What modality is this image?", "max_tokens": 16},
                 {"id": "cls", "image": a.image, "question": "What modality is this image?", "max_tokens": 0,
                  "candidates": "ct,mri,x-ray,pathology"}]
        for case in cases:
            ref, ref_path = D.reference(a.run, a.model, {k: v for k, v in case.items() if k != "id"}, a.workdir)
            ans = router.ask(case, 60)
            D.check_equal(ans, ref_path, a.workdir, "case %s across namespaces" % case["id"])
            used = D.experts_used(ref)
            log("case %s: experts used %s (ns B hosts 0,1; ns C hosts 2,3)" % (case["id"], used))
        router.close_input()
        if router.wait(20) != 0:
            raise D.TestFailure("router did not exit 0 after its cases\n%s" % router.describe())
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
