#!/usr/bin/env python3
"""Sampling through medmoe-run: the same seed gives the same tokens, other seeds
other tokens, a tiny top-p is greedy, and temperature 0 is greedy.

usage: sampling.py MEDMOE_RUN MODEL_DIR IMAGE
"""
import json
import subprocess
import sys


def run(exe, model, image, *extra):
    cmd = [exe, "--model", model, "--vision", model + "/clip", "--image", image,
           "--question", "Describe the image.", "--max-tokens", "12", "--json", *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        sys.exit("FAIL: %s exited %d: %s" % (" ".join(cmd), p.returncode, p.stderr))
    return json.loads(p.stdout)["tokens"]


def main():
    exe, model, image = sys.argv[1:4]
    greedy = run(exe, model, image)
    t0 = run(exe, model, image, "--temperature", "0")
    if t0 != greedy:
        sys.exit("FAIL: temperature 0 %s differs from greedy %s" % (t0, greedy))
    a = run(exe, model, image, "--temperature", "1.5", "--seed", "7")
    b = run(exe, model, image, "--temperature", "1.5", "--seed", "7")
    if a != b:
        sys.exit("FAIL: seed 7 twice gave %s and %s" % (a, b))
    others = [run(exe, model, image, "--temperature", "1.5", "--seed", str(s)) for s in (8, 9, 10)]
    if all(o == a for o in others):
        sys.exit("FAIL: seeds 7..10 all gave %s: the seed is not used" % a)
    if a == greedy and all(o == greedy for o in others):
        sys.exit("FAIL: temperature 1.5 always gave the greedy tokens")
    # top-p so small that only the most likely token survives: greedy again
    tiny_p = run(exe, model, image, "--temperature", "1.5", "--top-p", "1e-6", "--seed", "3")
    if tiny_p != greedy:
        sys.exit("FAIL: top-p 1e-6 %s differs from greedy %s" % (tiny_p, greedy))
    print("OK: greedy %s; seeded samples reproducible and seed-dependent; top-p 1e-6 == greedy"
          % greedy)


if __name__ == "__main__":
    main()
