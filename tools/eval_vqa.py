#!/usr/bin/python3
"""eval_vqa.py — VQA evaluation of a Med-MoE checkpoint served by medmoe-run, as in the paper.

    eval_vqa.py --run BUILD/model/medmoe-run --model DIR [--vision DIR] --data FILE
                [--images DIR] [--format auto|jsonl|vqa-rad|slake|pathvqa] [--limit N]
                [--max-tokens 8] [--weights stored|f32|int8]
                [--expert-names ct,mri,x-ray,pathology] [--jobs 1]
                [--json-out REPORT.json] [--min-closed-acc X]

Data formats (--format auto looks at the file):
  jsonl     one object per line: {"image", "question", "answer", "answer_type"?,
            "qtype"?, "modality"?}  (tools/demo_data.py writes it)
  vqa-rad   JSON list of {"image_name", "question", "answer", "answer_type": "CLOSED"|"OPEN",
            "question_type"?, "image_organ"?, ...}  (answer may be a number; answer_type
            may carry stray spaces: both are normalised)
  slake     JSON list of {"img_name", "question", "answer", "answer_type", "q_lang",
            "modality"?, "content_type"?, ...}; only q_lang == "en" is kept
  pathvqa   the LLaVA-Med / Med-MoE style: JSON list (or JSON lines) of {"id", "image",
            "conversations": [{"from": "human", "value": "<image>\\nQ"}, {"from": "gpt",
            "value": "A"}], "answer_type"?}; without answer_type, yes/no answers are CLOSED
Images are looked up relative to --images (default: the data file's folder).
Items with no answer_type: CLOSED when the answer is yes/no, else OPEN.

Metrics (docs/MODEL.md "Evaluation, as in the paper"; LLaVA-Med's script, re-implemented):
  closed  accuracy: the lower-cased ground truth is a substring of the lower-cased prediction
  open    recall of the ground truth's unigrams in the prediction after normalisation
          (lower case, number words -> digits, punctuation -> space; hyphens kept), plus
          exact match (normalised strings equal), precision and F1 (unigram counts)
  every item also gets "hit" (the substring test) so per-type tables are comparable
Grouped by answer type, question type (qtype / question_type / content_type) and
modality (modality field), and routing: for every item whose modality names an expert
(config.json moe.expert_names, or --expert-names), the share of its image tokens that
each MoE layer sent to that expert (from medmoe-run --json's expert_summary).

Python: load_items(path, fmt, images) -> [dict]; score(pred, gt, answer_type) -> dict;
normalize(text) -> str. Exit status 0, or 1 with --min-closed-acc when closed accuracy is
below it (2 on usage or engine errors).
"""

import argparse
import collections
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

NUMBER_WORDS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10", "none": "0"}
MODALITY_ALIASES = {"ct": "ct", "ct scan": "ct", "mri": "mri", "mr": "mri", "x-ray": "x-ray",
                    "xray": "x-ray", "x ray": "x-ray", "cxr": "x-ray", "pathology": "pathology",
                    "histopathology": "pathology"}


# ------------------------------------------------------------------ metrics
def normalize(text):
    t = str(text).lower().replace("\u2019", "'")
    t = re.sub(r"[^\w\s'-]", " ", t)  # punctuation -> space (hyphen kept: "x-ray")
    t = re.sub(r"(?<!\w)-|-(?!\w)|'", " ", t)
    return " ".join(NUMBER_WORDS.get(w, w) for w in t.split())


def score(pred, gt, answer_type):
    """Scores of one prediction. hit: ground truth substring of prediction (the closed
    metric); recall/precision/f1/exact: normalised unigram metrics (the open ones)."""
    p, g = normalize(pred), normalize(gt)
    pw, gw = collections.Counter(p.split()), collections.Counter(g.split())
    common = sum((pw & gw).values())
    recall = common / sum(gw.values()) if gw else 0.0
    precision = common / sum(pw.values()) if pw else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    gl = str(gt).strip().lower()
    return {"hit": float(bool(gl) and gl in str(pred).lower()), "recall": recall,
            "precision": precision, "f1": f1, "exact": float(p == g),
            "correct": float(bool(gl) and gl in str(pred).lower()) if answer_type == "CLOSED" else recall}


# ------------------------------------------------------------------ data
def _answer_type(t, answer):
    t = (t or "").strip().upper()
    if t in ("CLOSED", "OPEN"):
        return t
    return "CLOSED" if str(answer).strip().lower() in ("yes", "no") else "OPEN"


def _modality(m):
    return MODALITY_ALIASES.get(str(m).strip().lower(), str(m).strip().lower()) if m else None


def detect_format(path, first):
    if path.endswith(".jsonl"):
        return "pathvqa" if "conversations" in first else "jsonl"
    if "conversations" in first:
        return "pathvqa"
    if "img_name" in first:
        return "slake"
    if "image_name" in first:
        return "vqa-rad"
    return "jsonl"


def _read(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    s = text.lstrip()
    if s.startswith("["):
        return json.loads(s)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_items(path, fmt="auto", images=None):
    """-> [{"image", "question", "answer", "answer_type", "qtype", "modality", "id"}]."""
    rows = _read(path)
    if not rows:
        return []
    if fmt == "auto":
        fmt = detect_format(path, rows[0])
    base = images or os.path.dirname(os.path.abspath(path))
    out = []
    for n, r in enumerate(rows):
        if fmt == "vqa-rad":
            img, q, a = r["image_name"], r["question"], r["answer"]
            qt = r.get("question_type")
            mod = r.get("modality")
        elif fmt == "slake":
            if r.get("q_lang", "en") != "en":
                continue
            img, q, a = r["img_name"], r["question"], r["answer"]
            qt, mod = r.get("content_type"), r.get("modality")
        elif fmt == "pathvqa":
            conv = r["conversations"]
            q = next(c["value"] for c in conv if c.get("from") == "human")
            a = next(c["value"] for c in conv if c.get("from") == "gpt")
            q = q.replace("<image>", "").strip()
            img, qt, mod = r["image"], r.get("question_type"), r.get("modality", "pathology")
        else:
            img, q, a = r["image"], r["question"], r["answer"]
            qt, mod = r.get("qtype") or r.get("question_type"), r.get("modality")
        if isinstance(qt, list):
            qt = ",".join(map(str, qt))
        out.append({"id": r.get("id", r.get("qid", n)), "image": os.path.join(base, str(img)),
                    "question": str(q), "answer": str(a),
                    "answer_type": _answer_type(r.get("answer_type"), a),
                    "qtype": str(qt).strip() if qt else "all", "modality": _modality(mod)})
    return out


# ------------------------------------------------------------------ running
def run_one(args, item):
    cmd = [args.run, "--model", args.model, "--vision", args.vision, "--image", item["image"],
           "--question", item["question"], "--max-tokens", str(args.max_tokens), "--json"]
    if args.weights:
        cmd += ["--weights", args.weights]
    env = dict(os.environ)
    env.setdefault("MEDMOE_THREADS", "1")
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                       universal_newlines=True)
    if p.returncode != 0:
        raise RuntimeError("medmoe-run failed (%d) on %s: %s" % (p.returncode, item["image"],
                                                                p.stderr.strip()[-500:]))
    text = p.stdout
    start = text.find("{")
    return json.loads(text[start:])


def expert_names(args):
    if args.expert_names:
        return [s.strip().lower() for s in args.expert_names.split(",")]
    try:
        with open(os.path.join(args.model, "config.json")) as f:
            cfg = json.load(f)
        names = (cfg.get("moe") or {}).get("expert_names") or cfg.get("expert_names")
        return [str(s).lower() for s in names] if names else []
    except (OSError, ValueError):
        return []


def mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def report(items, names):
    """Aggregates the scored items into the report dict."""
    rep = {"n": len(items)}
    for at in ("CLOSED", "OPEN"):
        sub = [i for i in items if i["answer_type"] == at]
        rep[at.lower()] = {"n": len(sub), **{k: mean([i["scores"][k] for i in sub])
                                              for k in ("hit", "recall", "precision", "f1", "exact")}}
    for key in ("qtype", "modality"):
        groups = collections.OrderedDict()
        for i in sorted(items, key=lambda i: str(i[key])):
            groups.setdefault(str(i[key]), []).append(i)
        rep["by_" + key] = {
            g: {"n": len(v), "closed_n": sum(i["answer_type"] == "CLOSED" for i in v),
                "closed_acc": mean([i["scores"]["hit"] for i in v if i["answer_type"] == "CLOSED"]),
                "open_recall": mean([i["scores"]["recall"] for i in v if i["answer_type"] == "OPEN"]),
                "hit": mean([i["scores"]["hit"] for i in v])}
            for g, v in groups.items()}
    # Routing purity: image tokens of modality m sent to expert "m", per MoE layer.
    purity = {}
    for i in items:
        m = i["modality"]
        if not names or m not in names:
            continue
        e = names.index(m)
        for s in i.get("expert_summary", []):
            c = s["image_tokens_per_expert"]
            d = purity.setdefault(m, {}).setdefault(str(s["layer"]), [0, 0, [0] * len(c)])
            d[0] += c[e] if e < len(c) else 0
            d[1] += sum(c)
            d[2] = [x + y for x, y in zip(d[2], c)]
    rep["routing"] = {"expert_names": names, "image_token_purity": {
        m: {layer: {"to_own_expert": v[0] / v[1] if v[1] else float("nan"), "image_tokens": v[1],
                    "per_expert": v[2]} for layer, v in sorted(layers.items())}
        for m, layers in sorted(purity.items())}}
    return rep


def print_report(rep, out=sys.stdout):
    w = out.write
    w("items %d\n" % rep["n"])
    c, o = rep["closed"], rep["open"]
    w("closed: n %d  accuracy %.2f %%\n" % (c["n"], 100 * c["hit"]) if c["n"] else "closed: n 0\n")
    if o["n"]:
        w("open:   n %d  recall %.2f %%  exact %.2f %%  F1 %.2f %%  precision %.2f %%"
          "  (substring hit %.2f %%)\n" % (o["n"], 100 * o["recall"], 100 * o["exact"], 100 * o["f1"],
                                           100 * o["precision"], 100 * o["hit"]))
    for key in ("qtype", "modality"):
        w("by %s:\n" % key)
        for g, v in rep["by_" + key].items():
            parts = ["n %4d" % v["n"]]
            if v["closed_n"]:
                parts.append("closed acc %6.2f %%" % (100 * v["closed_acc"]))
            if v["n"] - v["closed_n"]:
                parts.append("open recall %6.2f %%" % (100 * v["open_recall"]))
            parts.append("hit %6.2f %%" % (100 * v["hit"]))
            w("  %-14s %s\n" % (g, "  ".join(parts)))
    r = rep["routing"]
    if r["image_token_purity"]:
        w("image tokens routed to their modality's expert (experts %s):\n" % ",".join(r["expert_names"]))
        for m, layers in r["image_token_purity"].items():
            w("  %-10s %s\n" % (m, "  ".join("layer %s %.2f %% (per expert %s)"
                                          % (layer, 100 * v["to_own_expert"], v["per_expert"])
                                          for layer, v in layers.items())))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="medmoe-run binary")
    ap.add_argument("--model", required=True)
    ap.add_argument("--vision", default=None, help="CLIP tower dir (default MODEL/clip)")
    ap.add_argument("--data", required=True)
    ap.add_argument("--images", default=None)
    ap.add_argument("--format", default="auto", choices=("auto", "jsonl", "vqa-rad", "slake", "pathvqa"))
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--weights", default=None, choices=("stored", "f32", "int8"),
                    help="medmoe-run --weights (default: its own, stored)")
    ap.add_argument("--expert-names", default=None)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--min-closed-acc", type=float, default=None)
    a = ap.parse_args(argv)
    a.vision = a.vision or os.path.join(a.model, "clip")
    try:
        items = load_items(a.data, a.format, a.images)
    except (OSError, ValueError, KeyError, StopIteration) as e:
        print("eval_vqa.py: cannot read %s: %s" % (a.data, e), file=sys.stderr)
        return 2
    if a.limit:
        items = items[:a.limit]
    try:
        with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as ex:
            results = list(ex.map(lambda it: run_one(a, it), items))
    except (RuntimeError, ValueError) as e:
        print("eval_vqa.py: %s" % e, file=sys.stderr)
        return 2
    for it, res in zip(items, results):
        it["prediction"] = res.get("answer", "")
        it["expert_summary"] = res.get("expert_summary", [])
        it["scores"] = score(it["prediction"], it["answer"], it["answer_type"])
    rep = report(items, expert_names(a))
    print_report(rep)
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"report": rep, "items": items}, f, indent=1)
            f.write("\n")
    if a.min_closed_acc is not None and rep["closed"]["n"] and rep["closed"]["hit"] < a.min_closed_acc:
        print("FAIL: closed accuracy %.4f below %.4f" % (rep["closed"]["hit"], a.min_closed_acc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
