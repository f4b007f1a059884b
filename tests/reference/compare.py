#!/usr/bin/python3
"""Compares two Med-MoE result files (medmoe_ref.py --json vs medmoe-run --json).

    compare.py A.json B.json [--logits A.f32 B.f32 --vocab V] [--tol 1e-3]

Requires: identical prompt_len / image_start / image_len, identical generated tokens and
answer, identical routing (every MoE layer, every position), identical candidate ranking
with |logprob diff| <= tol and |prob diff| <= tol, and, with --logits, the same number of
rows and max |logit diff| <= tol over ALL vocab_size columns (padding rows included).
Prints the measured maxima; exits 1 with a message naming the first mismatch.

Default tol 1e-3 (absolute): both sides compute in fp32 from identical (upcast) weights,
so they differ only by summation order and libm/shader rounding: ~1e-6 relative per op,
growing to ~1e-5 relative through a tiny model, i.e. ~1e-4 on logits of size O(10-80).
1e-3 leaves a 10x margin and is still 10x below the fixtures' smallest top1-top2 gap.
"""

import argparse
import json
import sys

import numpy as np


def fail(msg):
    print("MISMATCH: " + msg)
    sys.exit(1)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--logits", nargs=2, metavar=("A_F32", "B_F32"))
    ap.add_argument("--vocab", type=int)
    ap.add_argument("--tol", type=float, default=1e-3)
    a = ap.parse_args(argv)
    with open(a.a) as f:
        A = json.load(f)
    with open(a.b) as f:
        B = json.load(f)

    for k in ("prompt_len", "image_start", "image_len"):
        if A.get(k) != B.get(k):
            fail("%s: %r vs %r" % (k, A.get(k), B.get(k)))
    ta, tb = A.get("tokens", []), B.get("tokens", [])
    if ta != tb:
        n = next((i for i in range(min(len(ta), len(tb))) if ta[i] != tb[i]), min(len(ta), len(tb)))
        fail("tokens differ at step %d: %s vs %s (A %s, B %s)" % (n, ta[n:n + 1], tb[n:n + 1], ta, tb))
    if A.get("answer") != B.get("answer"):
        fail("answer: %r vs %r" % (A.get("answer"), B.get("answer")))

    ra = {r["layer"]: r["experts"] for r in A.get("routing", [])}
    rb = {r["layer"]: r["experts"] for r in B.get("routing", [])}
    if sorted(ra) != sorted(rb):
        fail("MoE layers in routing: %s vs %s" % (sorted(ra), sorted(rb)))
    for layer in sorted(ra):
        ea, eb = ra[layer], rb[layer]
        if len(ea) != len(eb):
            fail("routing layer %d: %d positions vs %d" % (layer, len(ea), len(eb)))
        for pos, (x, y) in enumerate(zip(ea, eb)):
            if list(x) != list(y):
                fail("routing layer %d position %d: experts %s vs %s" % (layer, pos, x, y))
    n_routes = sum(len(v) for v in ra.values())

    max_lp = 0.0
    if "candidates" in A or "candidates" in B:
        ca, cb = A.get("candidates"), B.get("candidates")
        if ca is None or cb is None:
            fail("candidates present in only one file")
        if [c["text"] for c in ca] != [c["text"] for c in cb]:
            fail("candidate ranking: %s vs %s" % ([c["text"] for c in ca], [c["text"] for c in cb]))
        for x, y in zip(ca, cb):
            d = abs(x["logprob"] - y["logprob"])
            dp = abs(x["prob"] - y["prob"])
            max_lp = max(max_lp, d, dp)
            if d > a.tol or dp > a.tol:
                fail("candidate %r: logprob %.6f vs %.6f, prob %.6f vs %.6f (tol %g)"
                     % (x["text"], x["logprob"], y["logprob"], x["prob"], y["prob"], a.tol))

    max_logit = None
    if a.logits:
        if not a.vocab:
            fail("--logits needs --vocab")
        la = np.fromfile(a.logits[0], dtype="<f4")
        lb = np.fromfile(a.logits[1], dtype="<f4")
        for name, arr in ((a.logits[0], la), (a.logits[1], lb)):
            if arr.size % a.vocab:
                fail("%s: %d floats is not a multiple of vocab %d" % (name, arr.size, a.vocab))
        la, lb = la.reshape(-1, a.vocab), lb.reshape(-1, a.vocab)
        if la.shape != lb.shape:
            fail("logit rows: %d vs %d" % (la.shape[0], lb.shape[0]))
        if la.shape[0] != len(ta):
            fail("logit rows %d but %d generated tokens" % (la.shape[0], len(ta)))
        if not (np.isfinite(la).all() and np.isfinite(lb).all()):
            fail("non-finite logits")
        diff = np.abs(la.astype(np.float64) - lb.astype(np.float64))
        max_logit = float(diff.max()) if diff.size else 0.0
        if max_logit > a.tol:
            r, c = np.unravel_index(int(diff.argmax()), diff.shape)
            fail("logits: max |diff| %.3g > tol %g at step %d, id %d (%.6f vs %.6f)"
                 % (max_logit, a.tol, r, c, la[r, c], lb[r, c]))

    print("OK: %d tokens identical, %d routing decisions identical, %s, %s (tol %g)"
          % (len(ta), n_routes,
             "max |logit diff| %.3g" % max_logit if max_logit is not None else "logits not compared",
             "max |candidate logprob/prob diff| %.3g" % max_lp if "candidates" in A else "no candidates",
             a.tol))
    return 0


if __name__ == "__main__":
    sys.exit(main())
