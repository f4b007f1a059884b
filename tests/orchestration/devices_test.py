#!/usr/bin/python3
"""medmoe-cluster's per-process Vulkan device (vk_device keys): the command lines it builds for the
router and for each expert replica carry the right --vk-device, bad specs are refused with a
message naming the key, and the programs accept --vk-device (their --help lists it). Then one
real medmoe-expert started with a --vk-device naming no device must exit with an error that
names the selector and lists the devices (when a Vulkan device exists: lavapipe in CI).

usage: devices_test.py --cluster orchestration/medmoe-cluster [--router BIN --expert BIN]
"""

import argparse
import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
import tempfile


def load_cluster(path):
    loader = importlib.machinery.SourceFileLoader("medmoe_cluster", path)
    spec = importlib.util.spec_from_loader("medmoe_cluster", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def flag(cmd, name):
    return cmd[cmd.index(name) + 1] if name in cmd else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cluster", required=True)
    ap.add_argument("--router")
    ap.add_argument("--expert")
    a = ap.parse_args()
    mc = load_cluster(a.cluster)
    fails = []

    def check(cond, what):
        print(("ok   " if cond else "FAIL ") + what, flush=True)
        if not cond:
            fails.append(what)

    with tempfile.TemporaryDirectory() as d:
        def cfg(extra):
            c = {"model": d, "router_bin": "/bin/true", "expert_bin": "/bin/true", "backend": "vulkan",
                 "experts": {"count": 3, "replicas": 2}}
            for k, v in extra.items():
                if isinstance(v, dict) and isinstance(c.get(k), dict):
                    c[k] = dict(c[k], **v)
                else:
                    c[k] = v
            p = os.path.join(d, "cluster.json")
            with open(p, "w") as f:
                json.dump(c, f)
            return mc.Config(p)

        # nothing set: no flag (the backend's default device)
        c = cfg({})
        s = mc.Supervisor(c)
        check(flag(s.router_cmd(), "--vk-device") is None and flag(s.expert_cmd(0, 0), "--vk-device") is None,
              "no vk_device: no --vk-device")
        # one GPU per expert replica on an 8-GPU node, router on its own GPU by UUID
        c = cfg({"vk_device": "7", "router": {"vk_device": "GPU-0a1b2c3d"},
                 "experts": {"vk_device": {"default": 6, "0.0": "0000:3b:00.0", "0.1": 1, "1": "H100"}}})
        s = mc.Supervisor(c)
        check(flag(s.router_cmd(), "--vk-device") == "GPU-0a1b2c3d", "router.vk_device -> router --vk-device")
        got = {(e, r): flag(s.expert_cmd(e, r), "--vk-device") for e in range(3) for r in range(2)}
        want = {(0, 0): "0000:3b:00.0", (0, 1): "1", (1, 0): "H100", (1, 1): "H100", (2, 0): "6", (2, 1): "6"}
        check(got == want, "experts.vk_device object: per replica, per expert, default (%s)" % got)
        # a list per expert, with a list per replica; the top-level value fills the gaps
        c = cfg({"vk_device": "llvmpipe", "experts": {"vk_device": [["0", "1"], None, "2"]}})
        s = mc.Supervisor(c)
        got = [flag(s.expert_cmd(e, r), "--vk-device") for e in range(3) for r in range(2)]
        check(got == ["0", "1", "llvmpipe", "llvmpipe", "2", "2"], "experts.vk_device list (%s)" % got)
        check(flag(s.router_cmd(), "--vk-device") == "llvmpipe", "top-level vk_device -> router")
        # bad specs name the key
        for bad, key in ((({"experts": {"vk_device": ["0", "1"]}}), "experts.vk_device: 2 entries"),
                         (({"experts": {"vk_device": {"5": "0"}}}), "key '5'"),
                         (({"experts": {"vk_device": {"x.y": "0"}}}), "key 'x.y'"),
                         (({"router": {"vk_device": ""}}), "router.vk_device"),
                         (({"vk_device": -1}), "vk_device"),
                         (({"experts": {"vk_device": {"default": [1]}}}), "experts.vk_device")):
            try:
                cfg(bad)
                check(False, "bad spec %s refused" % bad)
            except mc.ClusterError as e:
                check(key in str(e), "bad spec %s -> %s" % (bad, e))

    for b in (a.router, a.expert):
        if b:
            h = subprocess.run([b, "--help"], capture_output=True, text=True, timeout=30)
            check("--vk-device" in h.stdout + h.stderr, "%s --help lists --vk-device" % os.path.basename(b))
    if a.expert:
        with tempfile.TemporaryDirectory() as d:
            p = subprocess.run([a.expert, "--model", d, "--expert", "0", "--router", "tcp://127.0.0.1:1",
                                "--backend", "vulkan", "--vk-device", "no-such-gpu-42", "--give-up-ms", "1000"],
                               capture_output=True, text=True, timeout=60)
            out = p.stdout + p.stderr
            if "no Vulkan device" in out or "vkCreateInstance" in out:
                print("skip: no Vulkan device here (%s)" % out.strip()[:200])
            else:
                check(p.returncode != 0 and "no-such-gpu-42" in out and "have: 0: " in out,
                      "medmoe-expert --vk-device naming nothing exits %d listing the devices: %s"
                      % (p.returncode, out.strip()[-300:]))
    print("%d failures" % len(fails))
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
