#!/usr/bin/python3
"""Runs medmoe-run on a tiny checkpoint and compares it with the oracle's golden files.

    run_equivalence.py --run BIN --model DIR --image IMG --question TEXT --backend B
                       --golden G.json [--golden-logits G.f32] --out-dir D
                       [--max-tokens 16] [--candidates a,b] [--tol 1e-3]

Command run:  BIN --model DIR --vision DIR/clip --image IMG --question TEXT
                  --max-tokens N --backend B --json [--dump-logits D/run.f32] [--candidates ...]
stdout must be the JSON object (a leading non-JSON line, e.g. a banner, is tolerated:
the last line that starts with '{' begins the object). The result is compared with
compare.py; the exit status is compare.py's (or 2 when medmoe-run itself fails).
"""

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_json_stdout(text):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        lines = text.splitlines()
        for i in range(len(lines) - 1, -1, -1):
            if lines[i].lstrip().startswith("{"):
                try:
                    return json.loads("\n".join(lines[i:]))
                except json.JSONDecodeError:
                    continue
    raise ValueError("no JSON object on stdout")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--vision", default=None)
    ap.add_argument("--image", required=True)
    ap.add_argument("--question", required=True)
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--golden", required=True)
    ap.add_argument("--golden-logits", default=None)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--candidates", default=None)
    ap.add_argument("--tol", type=float, default=1e-3)
    a = ap.parse_args(argv)

    os.makedirs(a.out_dir, exist_ok=True)
    out_json = os.path.join(a.out_dir, "run-%s.json" % a.backend)
    out_logits = os.path.join(a.out_dir, "run-%s.f32" % a.backend)
    cmd = [a.run, "--model", a.model, "--vision", a.vision or os.path.join(a.model, "clip"),
           "--image", a.image, "--question", a.question, "--max-tokens", str(a.max_tokens),
           "--backend", a.backend, "--json"]
    if a.golden_logits:
        cmd += ["--dump-logits", out_logits]
    if a.candidates is not None:
        cmd += ["--candidates", a.candidates]
    print("+ " + " ".join(cmd), flush=True)
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sys.stderr.write(p.stderr)
    if p.returncode != 0:
        print("medmoe-run failed with status %d" % p.returncode)
        return 2
    try:
        obj = parse_json_stdout(p.stdout)
    except ValueError as e:
        print("medmoe-run output: %s\n%s" % (e, p.stdout[-2000:]))
        return 2
    with open(out_json, "w") as f:
        json.dump(obj, f, indent=1)
    with open(os.path.join(a.model, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    cargs = [a.golden, out_json, "--tol", str(a.tol)]
    if a.golden_logits:
        cargs += ["--logits", a.golden_logits, out_logits, "--vocab", str(vocab)]
    sys.path.insert(0, HERE)
    import compare
    try:
        return compare.main(cargs)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1


if __name__ == "__main__":
    sys.exit(main())
