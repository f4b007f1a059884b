#!/usr/bin/python3
"""Cross-checks the C checkpoint reader against an independent Python parse.

    checkpoint_crosscheck.py TEST_BINARY TOOLS_DIR WORKDIR

Makes tiny Med-MoE checkpoints with tools/make_tiny_checkpoint.py (StableLM bf16 in
1 and 3 shards, Phi f32), runs `TEST_BINARY --dump DIR` and compares every tensor's
dtype, shape, file and SHA-256 of its bytes with this script's own reading of the
files (struct + json + hashlib, not the tools' reader), checks the config summary,
and checks that expert fingerprints do not depend on the shard layout.
"""
import hashlib
import json
import os
import struct
import subprocess
import sys


def read_dir(d):
    """name -> (dtype, shape, sha256 hex, file) from the files on disk."""
    idx = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(idx):
        files = sorted(set(json.load(open(idx))["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out = {}
    for fn in files:
        raw = open(os.path.join(d, fn), "rb").read()
        (n,) = struct.unpack("<Q", raw[:8])
        hdr = json.loads(raw[8:8 + n])
        base = 8 + n
        for name, e in hdr.items():
            if name == "__metadata__":
                continue
            b, en = e["data_offsets"]
            out[name] = (e["dtype"], "[" + ", ".join(str(s) for s in e["shape"]) + "]",
                         hashlib.sha256(raw[base + b:base + en]).hexdigest(), fn)
    return out


def dump(binary, d):
    res = subprocess.run([binary, "--dump", d], capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit("dump of %s failed: %s" % (d, res.stderr))
    tensors, experts, other = {}, {}, {}
    for line in res.stdout.splitlines():
        f = line.split("\t")
        if f[0] == "tensor":
            tensors[f[1]] = tuple(f[2:6])
        elif f[0] == "expert":
            experts[int(f[1])] = f[2]
        else:
            other[f[0]] = dict(kv.split("=", 1) for kv in f[1].split())
    return tensors, experts, other


def check(cond, msg):
    if not cond:
        sys.exit("FAIL: " + msg)


def main():
    binary, tools, work = sys.argv[1:4]
    os.makedirs(work, exist_ok=True)
    maker = os.path.join(tools, "make_tiny_checkpoint.py")
    cases = [("stablelm", "bf16", 1), ("stablelm", "bf16", 3), ("phi", "f32", 2)]
    fps = {}
    for backbone, dtype, shards in cases:
        d = os.path.join(work, "tiny_%s_%s_%d" % (backbone, dtype, shards))
        subprocess.run([sys.executable, maker, "--out", d, "--backbone", backbone, "--dtype",
                        dtype, "--shards", str(shards), "--seed", "7"], check=True,
                       stdout=subprocess.DEVNULL)
        want = read_dir(d)
        got, experts, other = dump(binary, d)
        check(set(got) == set(want), "%s: tensor sets differ: %s" %
              (d, sorted(set(got) ^ set(want))[:5]))
        for name in want:
            check(got[name] == want[name], "%s: %s: C %s, Python %s" %
                  (d, name, got[name], want[name]))
        cfg = json.load(open(os.path.join(d, "config.json")))
        c = other["config"]
        heads = cfg["num_attention_heads"]
        hd = cfg["hidden_size"] // heads
        pct = cfg.get("partial_rotary_factor", cfg.get("rope_pct"))
        check(c["arch"] == backbone, "arch %s" % c["arch"])
        check(int(c["hidden"]) == cfg["hidden_size"], "hidden")
        check(int(c["layers"]) == cfg["num_hidden_layers"], "layers")
        check(int(c["head_dim"]) == hd, "head_dim")
        check(int(c["rotary"]) == int(pct * hd) // 2 * 2, "rotary %s" % c["rotary"])
        check(int(c["vocab"]) == cfg["vocab_size"], "vocab")
        moe = ",".join("%d:%d" % (l, e) for l, e in
                       zip(cfg["moe"]["moe_layers_idx"], cfg["moe"]["num_experts"]))
        check(c["moe"] == moe, "moe %s vs %s" % (c["moe"], moe))
        check(other.get("vision", {}).get("check") == "OK", "vision check: %s" % other.get("vision"))
        n_exp = cfg["moe"]["num_experts"][0]
        check(len(experts) == n_exp and len(set(experts.values())) == n_exp,
              "expert fingerprints not distinct: %s" % experts)
        check(all(len(v) == 64 for v in experts.values()), "fingerprint format")
        fps[(backbone, dtype, shards)] = experts
        print("ok %s: %d tensors, %d experts" % (d, len(want), n_exp))
    check(fps[("stablelm", "bf16", 1)] == fps[("stablelm", "bf16", 3)],
          "fingerprints depend on the shard layout")
    print("ok: fingerprints identical for 1 and 3 shards")


if __name__ == "__main__":
    main()
